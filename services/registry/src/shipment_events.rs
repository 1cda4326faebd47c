//! What the registry consumes from postal: `ShipmentEvent`s (topic `socialcard.shipment.v1`), one per
//! shipment milestone, in order per card. Each is replayed as the registry request the courier channel
//! would make, under an idempotency key derived from the event id, so a redelivered event applies once:
//! dispatched, delivery failed and at the backup point (R14, R15) as `RecordShipmentProgress`; delivered
//! or picked up at the backup point as `RecordCollection` with the courier's time as the collection date
//! (R17).

use async_trait::async_trait;
use prost::Message;
use socialcard_domain::RejectionKind;
use socialcard_events::{Applied, Envelope, Handler, HandlerError};
use socialcard_proto::events::v1 as ev;
use socialcard_proto::registry::v1 as pb;
use socialcard_server::ApiError;

use crate::Registry;

#[derive(Clone, Debug)]
pub struct ShipmentEvents {
    registry: Registry,
}

impl ShipmentEvents {
    pub fn new(registry: Registry) -> Self {
        Self { registry }
    }

    /// A card already past the milestone (collected at a counter before the courier's news arrived,
    /// remade, replaced, cancelled) has nothing left to learn from it.
    async fn already_past(&self, card_id: &str) -> bool {
        let card = self
            .registry
            .get_card(pb::GetCardRequest { lookup: Some(pb::get_card_request::Lookup::CardId(card_id.to_string())) })
            .await;
        let state = card.ok().and_then(|c| c.card).map(|c| c.physical_state).unwrap_or_default();
        [
            pb::PhysicalState::Collected,
            pb::PhysicalState::ReturnedForRemake,
            pb::PhysicalState::Replaced,
            pb::PhysicalState::Cancelled,
        ]
        .iter()
        .any(|s| *s as i32 == state)
    }
}

fn courier(site: &str) -> Option<pb::Actor> {
    Some(pb::Actor {
        channel: pb::Channel::Courier as i32,
        operator_id: "postal".into(),
        site_id: site.into(),
        ..Default::default()
    })
}

#[async_trait]
impl Handler for ShipmentEvents {
    /// Events of different cards at once (each card's in order), as many as the store takes writes at
    /// once: on SQLite they share the group writer's commits, as concurrent courier calls do.
    fn concurrency(&self) -> usize {
        self.registry.store().concurrent_writes()
    }

    async fn handle(&self, event: &Envelope) -> Result<Applied, HandlerError> {
        let e =
            ev::ShipmentEvent::decode(event.payload.as_slice()).map_err(|e| HandlerError::Permanent(e.to_string()))?;
        let key = format!("postal:{}", event.id);
        let progress = |p: pb::ShipmentProgress| pb::RecordShipmentProgressRequest {
            idempotency_key: key.clone(),
            card_id: e.card_id.clone(),
            actor: courier(&e.point_id),
            progress: p as i32,
            waybill: e.waybill.clone(),
        };
        let milestone = ev::ShipmentMilestone::try_from(e.milestone).unwrap_or_default();
        let outcome = match milestone {
            ev::ShipmentMilestone::Dispatched => {
                self.registry.record_shipment_progress(progress(pb::ShipmentProgress::Dispatched)).await.map(|_| ())
            }
            ev::ShipmentMilestone::DeliveryFailed => {
                self.registry.record_shipment_progress(progress(pb::ShipmentProgress::DeliveryFailed)).await.map(|_| ())
            }
            ev::ShipmentMilestone::AtBackupPoint => {
                self.registry.record_shipment_progress(progress(pb::ShipmentProgress::AtBackupPoint)).await.map(|_| ())
            }
            ev::ShipmentMilestone::Delivered => self
                .registry
                .record_collection(pb::RecordCollectionRequest {
                    idempotency_key: key.clone(),
                    card_id: e.card_id.clone(),
                    actor: courier(""),
                    method: pb::CollectionMethod::Delivered as i32,
                    collected_at: e.occurred_at,
                    documents: None,
                })
                .await
                .map(|_| ()),
            ev::ShipmentMilestone::PickedUp => {
                // The backup point hands a mailed card over against the holder's ID card; the courier's
                // feed reports that hand-over from the point (R15).
                let site = if e.point_id.is_empty() { "backup-point" } else { e.point_id.as_str() };
                self.registry
                    .record_collection(pb::RecordCollectionRequest {
                        idempotency_key: key.clone(),
                        card_id: e.card_id.clone(),
                        actor: Some(pb::Actor {
                            channel: pb::Channel::CommunityPoint as i32,
                            operator_id: "postal".into(),
                            site_id: site.into(),
                            ..Default::default()
                        }),
                        method: pb::CollectionMethod::PickedUpAtPoint as i32,
                        collected_at: e.occurred_at,
                        documents: Some(pb::Documents {
                            presenter: pb::Presenter::Holder as i32,
                            holder_id_card: true,
                            ..Default::default()
                        }),
                    })
                    .await
                    .map(|_| ())
            }
            // Opening and return to sender change nothing in the registry.
            ev::ShipmentMilestone::Opened | ev::ShipmentMilestone::Returned | ev::ShipmentMilestone::Unspecified => {
                return Ok(Applied::Duplicate);
            }
        };
        match outcome {
            Ok(()) => Ok(Applied::Applied),
            Err(ApiError::Rejected(r)) if r.kind == RejectionKind::Aborted => {
                Err(HandlerError::Transient(r.to_string()))
            }
            Err(ApiError::Rejected(r))
                if r.reason == "ILLEGAL_CARD_TRANSITION" && self.already_past(&e.card_id).await =>
            {
                tracing::info!(card = %e.card_id, milestone = ?milestone, "card already past this shipment milestone");
                Ok(Applied::Duplicate)
            }
            Err(ApiError::Rejected(r)) => Err(HandlerError::Permanent(r.to_string())),
            Err(ApiError::Unavailable(m) | ApiError::Internal(m)) => Err(HandlerError::Transient(m)),
        }
    }
}
