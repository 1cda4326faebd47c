//! What the registry consumes: the bank adapters' `FinancialActivated`, `FinancialActivationRolledBack`,
//! `FinancialFrozen` and `FinancialUnfrozen` events (topic `socialcard.financial.v1`). Each carries the exact registry request the adapter made (or
//! could not make) during the bank's call; replaying it under its idempotency key applies it exactly once,
//! whether the synchronous call or the event gets there first (R20).

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
    /// Events of different cards at once (each card's in order), as many as the store takes writes at
    /// once: on SQLite they share the group writer's commits, as concurrent bank calls do.
    fn concurrency(&self) -> usize {
        self.registry.store().concurrent_writes()
    }

    async fn handle(&self, event: &Envelope) -> Result<Applied, HandlerError> {
        let e =
            ev::FinancialEvent::decode(event.payload.as_slice()).map_err(|e| HandlerError::Permanent(e.to_string()))?;
        let outcome = match e.kind {
            Some(ev::financial_event::Kind::FinancialActivated(a)) if !a.registry_confirmed => {
                let request = a
                    .registry_request
                    .ok_or_else(|| HandlerError::Permanent("FinancialActivated without its registry request".into()))?;
                self.registry.record_financial_activation(request).await.map(|_| ())
            }
            Some(ev::financial_event::Kind::FinancialActivationRolledBack(r)) if !r.registry_confirmed => {
                let request = r.registry_request.ok_or_else(|| {
                    HandlerError::Permanent("FinancialActivationRolledBack without its registry request".into())
                })?;
                self.registry.cancel_financial_activation(request).await.map(|_| ())
            }
            // The bank's freeze and its lifting, mirrored so the registry answers for both functions.
            Some(ev::financial_event::Kind::FinancialFrozen(f)) => {
                let request = socialcard_proto::registry::v1::RecordFinancialFreezeRequest {
                    idempotency_key: format!("event:{}", event.id),
                    card_id: e.card_id.clone(),
                    bank_code: e.bank_code.clone(),
                    frozen: true,
                    loss_kind: f.loss_kind,
                };
                self.registry.record_financial_freeze(request).await
            }
            Some(ev::financial_event::Kind::FinancialUnfrozen(_)) => {
                let request = socialcard_proto::registry::v1::RecordFinancialFreezeRequest {
                    idempotency_key: format!("event:{}", event.id),
                    card_id: e.card_id.clone(),
                    bank_code: e.bank_code.clone(),
                    frozen: false,
                    loss_kind: 0,
                };
                self.registry.record_financial_freeze(request).await
            }
            // Confirmed during the bank's call: nothing to do.
            _ => return Ok(Applied::Duplicate),
        };
        match outcome {
            Ok(()) => Ok(Applied::Applied),
            Err(ApiError::Rejected(r)) if r.kind == RejectionKind::Aborted => {
                Err(HandlerError::Transient(r.to_string()))
            }
            Err(ApiError::Rejected(r)) => Err(HandlerError::Permanent(r.to_string())),
            Err(ApiError::Unavailable(m) | ApiError::Internal(m)) => Err(HandlerError::Transient(m)),
        }
    }
}
