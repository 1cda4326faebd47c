//! What postal consumes: the registry's card events (topic `socialcard.card.v1`). `CardProduced` opens
//! the card's shipment (R14) with its delivery address and backup point (R15); a card collected at a
//! counter before the courier took it (instant issue, R16) withdraws its shipment. Each effect commits
//! with the event's inbox row, so a redelivered event changes nothing. Events that come together (a
//! consumer's poll) are applied together, in order, in one transaction.

use async_trait::async_trait;
use prost::Message;
use socialcard_events::{Applied, Envelope, Handler, HandlerError};
use socialcard_proto::events::v1 as ev;
use socialcard_proto::registry::v1 as reg;
use socialcard_server::ApiError;

use crate::app::Postal;
use crate::storage::{Address, CardDone, CardWork, NewShipment};

#[derive(Clone, Debug)]
pub struct CardEvents {
    postal: Postal,
}

impl CardEvents {
    pub fn new(postal: Postal) -> Self {
        Self { postal }
    }

    /// Applies `events` in order in one transaction: the answer for each.
    async fn apply(&self, events: &[Envelope]) -> Result<Vec<Applied>, HandlerError> {
        let work: Vec<Option<CardWork>> = events.iter().map(work_of).collect::<Result<_, _>>()?;
        let to_do: Vec<(&str, &CardWork)> =
            events.iter().zip(&work).filter_map(|(e, w)| w.as_ref().map(|w| (e.id.as_str(), w))).collect();
        let mut done = match to_do.is_empty() {
            true => Vec::new(),
            false => self.postal.apply_card_work(&to_do).await.map_err(handler_error)?,
        }
        .into_iter();
        Ok(work
            .iter()
            .map(|w| match w.as_ref().and_then(|_| done.next()) {
                Some(CardDone::Opened(_) | CardDone::Withdrawn(_) | CardDone::Nothing) => Applied::Applied,
                Some(CardDone::Seen) | None => Applied::Duplicate,
            })
            .collect())
    }
}

/// What `event` asks of postal: `None` when nothing (the event is someone else's business).
fn work_of(event: &Envelope) -> Result<Option<CardWork>, HandlerError> {
    let e = ev::CardEvent::decode(event.payload.as_slice()).map_err(|e| HandlerError::Permanent(e.to_string()))?;
    Ok(match e.kind {
        // No delivery address: the card is handed over at a counter (an instant replacement point
        // prints it on the spot, R16), so there is nothing to mail.
        Some(ev::card_event::Kind::CardProduced(p)) if p.delivery_address.is_none() => None,
        Some(ev::card_event::Kind::CardProduced(p)) => {
            let a = p.delivery_address.unwrap_or_default();
            Some(CardWork::Open(NewShipment {
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
            }))
        }
        Some(ev::card_event::Kind::CardCollected(c)) if c.method == reg::CollectionMethod::InstantIssue as i32 => {
            Some(CardWork::Withdraw { card_id: e.card_id, reason: "instant_issue" })
        }
        Some(ev::card_event::Kind::CardCollected(c)) if c.method == reg::CollectionMethod::PickedUpAtPoint as i32 => {
            Some(CardWork::Withdraw { card_id: e.card_id, reason: "collected_at_counter" })
        }
        // Every other card event is someone else's business.
        _ => None,
    })
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
        let mut applied = self.apply(std::slice::from_ref(event)).await?;
        Ok(applied.pop().unwrap_or(Applied::Duplicate))
    }

    fn has_batch_form(&self) -> bool {
        true
    }

    async fn handle_batch(&self, events: &[Envelope]) -> Option<Result<Vec<Applied>, HandlerError>> {
        Some(self.apply(events).await)
    }
}
