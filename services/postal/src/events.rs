//! What postal consumes: the registry's card events (topic `socialcard.card.v1`). `CardProduced` opens
//! the card's shipment (R14) with its delivery address and backup point (R15); a card collected at a
//! counter before the courier took it (instant issue, R16) withdraws its shipment. Each effect commits
//! with the event's inbox row, so a redelivered event changes nothing.

use async_trait::async_trait;
use prost::Message;
use socialcard_events::{Applied, Envelope, Handler, HandlerError};
use socialcard_proto::events::v1 as ev;
use socialcard_proto::registry::v1 as reg;
use socialcard_server::ApiError;

use crate::app::Postal;
use crate::storage::{Address, NewShipment};

#[derive(Clone, Debug)]
pub struct CardEvents {
    postal: Postal,
}

impl CardEvents {
    pub fn new(postal: Postal) -> Self {
        Self { postal }
    }
}

fn handler_error(e: ApiError) -> HandlerError {
    match e {
        ApiError::Unavailable(m) => HandlerError::Transient(m),
        ApiError::Rejected(r) => HandlerError::Permanent(r.to_string()),
        ApiError::Internal(m) => HandlerError::Permanent(m),
    }
}

#[async_trait]
impl Handler for CardEvents {
    async fn handle(&self, event: &Envelope) -> Result<Applied, HandlerError> {
        let e = ev::CardEvent::decode(event.payload.as_slice()).map_err(|e| HandlerError::Permanent(e.to_string()))?;
        let done = match e.kind {
            // No delivery address: the card is handed over at a counter (an instant replacement point
            // prints it on the spot, R16), so there is nothing to mail.
            Some(ev::card_event::Kind::CardProduced(p)) if p.delivery_address.is_none() => {
                return Ok(Applied::Duplicate);
            }
            Some(ev::card_event::Kind::CardProduced(p)) => {
                let a = p.delivery_address.unwrap_or_default();
                let new = NewShipment {
                    card_id: e.card_id,
                    card_number: p.card_number,
                    address: Address {
                        recipient: a.recipient,
                        phone: a.phone,
                        line: a.line,
                        district: a.district,
                        postal_code: a.postal_code,
                    },
                    backup_point_id: p.backup_point_id,
                };
                self.postal.open_shipment(&event.id, &new).await.map_err(handler_error)?.is_some()
            }
            Some(ev::card_event::Kind::CardCollected(c))
                if c.method == reg::CollectionMethod::InstantIssue as i32
                    || c.method == reg::CollectionMethod::PickedUpAtPoint as i32 =>
            {
                let reason = if c.method == reg::CollectionMethod::InstantIssue as i32 {
                    "instant_issue"
                } else {
                    "collected_at_counter"
                };
                self.postal.withdraw(&event.id, &e.card_id, reason).await.map_err(handler_error)?;
                true
            }
            // Every other card event is someone else's business.
            _ => return Ok(Applied::Duplicate),
        };
        Ok(if done { Applied::Applied } else { Applied::Duplicate })
    }
}
