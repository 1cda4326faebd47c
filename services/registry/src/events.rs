//! What the registry consumes: the bank adapters' `FinancialActivated` events (topic
//! `socialcard.financial.v1`). Each carries the exact `RecordFinancialActivation` request the adapter
//! made (or could not make) during the bank's call; replaying it under its idempotency key switches the
//! social function on exactly once, whether the synchronous call or the event gets there first (R20).

use async_trait::async_trait;
use prost::Message;
use socialcard_domain::RejectionKind;
use socialcard_events::{Applied, Envelope, Handler, HandlerError};
use socialcard_proto::events::v1 as ev;
use socialcard_server::ApiError;

use crate::Registry;

#[derive(Clone, Debug)]
pub struct FinancialEvents {
    registry: Registry,
}

impl FinancialEvents {
    pub fn new(registry: Registry) -> Self {
        Self { registry }
    }
}

#[async_trait]
impl Handler for FinancialEvents {
    async fn handle(&self, event: &Envelope) -> Result<Applied, HandlerError> {
        let e =
            ev::FinancialEvent::decode(event.payload.as_slice()).map_err(|e| HandlerError::Permanent(e.to_string()))?;
        let Some(ev::financial_event::Kind::FinancialActivated(activated)) = e.kind else {
            // Freezes and unfreezes are the loss coordinator's business, not the registry's.
            return Ok(Applied::Duplicate);
        };
        if activated.registry_confirmed {
            return Ok(Applied::Duplicate);
        }
        let request = activated
            .registry_request
            .ok_or_else(|| HandlerError::Permanent("FinancialActivated without its registry request".into()))?;
        match self.registry.record_financial_activation(request).await {
            Ok(_) => Ok(Applied::Applied),
            Err(ApiError::Rejected(r)) if r.kind == RejectionKind::Aborted => {
                Err(HandlerError::Transient(r.to_string()))
            }
            Err(ApiError::Rejected(r)) => Err(HandlerError::Permanent(r.to_string())),
            Err(ApiError::Unavailable(m) | ApiError::Internal(m)) => Err(HandlerError::Transient(m)),
        }
    }
}
