//! The gRPC transport (`socialcard.postal.v1.PostalService`): wire types to checked domain values at
//! the edge, then the use cases in [`crate::app`]. Refusals carry their code and an `ErrorInfo` reason.

use std::time::Duration;

use socialcard_domain::Rejection;
use socialcard_proto::postal::v1 as pb;
use socialcard_proto::postal::v1::postal_service_server::{PostalService, PostalServiceServer};
use socialcard_server::ApiError;
use time::OffsetDateTime;
use tonic::{Request, Response, Status, Streaming};

use crate::app::{ListQuery, Postal};
use crate::feed::{self, Source, Update};
use crate::status::Status as ShipmentStatus;
use crate::storage::{HistoryRecord, IngestReport, ShipmentRecord, status_to_pb, timestamp};

/// Updates taken into one transaction at most, when a stream sends faster than they are written.
const STREAM_BATCH: usize = 512;
const MAX_PAGE: u32 = 500;
const DEFAULT_PAGE: u32 = 100;

#[derive(Clone, Debug)]
pub struct PostalGrpc {
    postal: Postal,
}

impl PostalGrpc {
    pub fn new(postal: Postal) -> Self {
        Self { postal }
    }

    pub fn into_server(self) -> PostalServiceServer<Self> {
        PostalServiceServer::new(self)
    }

    /// Starts writing `batch` (taken, leaving it empty) in its own task.
    fn write(&self, batch: &mut Vec<Update>) -> Write {
        let postal = self.postal.clone();
        let batch = std::mem::replace(batch, Vec::with_capacity(STREAM_BATCH));
        tokio::spawn(async move { postal.ingest(batch, Source::Stream).await })
    }
}

/// A batch of a stream being written.
type Write = tokio::task::JoinHandle<Result<IngestReport, ApiError>>;

fn joined(done: Result<Result<IngestReport, ApiError>, tokio::task::JoinError>) -> Result<IngestReport, Status> {
    match done {
        Ok(written) => Ok(written?),
        Err(e) => Err(Status::internal(format!("a batch write failed: {e}"))),
    }
}

/// Waits for the running write, if any, and adds what it did to `report`.
async fn finish(writing: &mut Option<Write>, report: &mut IngestReport) -> Result<(), Status> {
    if let Some(running) = writing.take() {
        report.add(joined(running.await)?);
    }
    Ok(())
}

pub fn status_from_pb(field: &'static str, value: i32) -> Result<ShipmentStatus, Rejection> {
    let unknown = || Rejection::invalid(field, "UNKNOWN_STATUS", "the status is not one a courier may report");
    Ok(match pb::ShipmentStatus::try_from(value).map_err(|_| unknown())? {
        pb::ShipmentStatus::Unspecified | pb::ShipmentStatus::Withdrawn => return Err(unknown()),
        pb::ShipmentStatus::Pending => ShipmentStatus::Pending,
        pb::ShipmentStatus::InfoReceived => ShipmentStatus::InfoReceived,
        pb::ShipmentStatus::InTransit => ShipmentStatus::InTransit,
        pb::ShipmentStatus::OutForDelivery => ShipmentStatus::OutForDelivery,
        pb::ShipmentStatus::AttemptFailed => ShipmentStatus::AttemptFailed,
        pb::ShipmentStatus::Delivered => ShipmentStatus::Delivered,
        pb::ShipmentStatus::AvailableForPickup => ShipmentStatus::AvailableForPickup,
        pb::ShipmentStatus::PickedUp => ShipmentStatus::PickedUp,
        pb::ShipmentStatus::Returned => ShipmentStatus::Returned,
        pb::ShipmentStatus::Exception => ShipmentStatus::Exception,
    })
}

fn time_from_pb(t: Option<&prost_types::Timestamp>) -> Result<OffsetDateTime, Rejection> {
    let t = t.ok_or_else(|| Rejection::invalid("occurred_at", "FIELD_REQUIRED", "occurred_at is required"))?;
    let nanos = i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .map_err(|_| Rejection::invalid("occurred_at", "OCCURRED_AT_FORMAT", "occurred_at is out of range"))
}

/// A streamed update, checked like every other feed's.
pub fn update_from_pb(u: &pb::StatusUpdate, now: OffsetDateTime) -> Result<Update, Rejection> {
    let status = status_from_pb("status", u.status)?;
    feed::RawUpdate {
        courier_event_id: &u.courier_event_id,
        waybill: &u.waybill,
        status,
        default_reason: "",
        sub_reason: &u.sub_reason,
        occurred_at: time_from_pb(u.occurred_at.as_ref())?,
        point_id: &u.point_id,
    }
    .check(now)
}

pub fn update_to_pb(u: &Update) -> pb::StatusUpdate {
    pb::StatusUpdate {
        waybill: u.waybill.to_string(),
        status: status_to_pb(u.status) as i32,
        sub_reason: u.sub_reason.clone(),
        occurred_at: Some(timestamp(u.occurred_at)),
        courier_event_id: u.courier_event_id.clone(),
        point_id: u.point_id.clone().unwrap_or_default(),
    }
}

fn shipment_to_pb(s: &ShipmentRecord, history: &[HistoryRecord]) -> pb::Shipment {
    pb::Shipment {
        waybill: s.waybill.clone(),
        card_id: s.card_id.clone(),
        card_number: s.card_number.clone(),
        status: status_to_pb(s.progress.status) as i32,
        sub_reason: s.sub_reason.clone(),
        backup_point_id: s.backup_point_id.clone(),
        routed_to_backup_point: s.progress.routed_to_backup_point(),
        opened_at: Some(timestamp(s.opened_at)),
        status_at: Some(timestamp(s.status_at)),
        address: Some(pb::DeliveryAddress {
            recipient: s.address.recipient.clone(),
            line: s.address.line.clone(),
            district: s.address.district.clone(),
            postal_code: s.address.postal_code.clone(),
        }),
        timeline: history
            .iter()
            .map(|h| pb::TimelineEntry {
                update: Some(pb::StatusUpdate {
                    waybill: s.waybill.clone(),
                    status: status_to_pb(h.status) as i32,
                    sub_reason: h.sub_reason.clone(),
                    occurred_at: Some(timestamp(h.occurred_at)),
                    courier_event_id: h.courier_event_id.clone(),
                    point_id: h.point_id.clone().unwrap_or_default(),
                }),
                outcome: match h.outcome {
                    crate::status::Outcome::Applied => pb::UpdateOutcome::Applied,
                    crate::status::Outcome::OutOfOrder => pb::UpdateOutcome::OutOfOrder,
                    crate::status::Outcome::Conflict => pb::UpdateOutcome::Conflict,
                } as i32,
                received_at: Some(timestamp(h.received_at)),
                source: h.source.clone(),
            })
            .collect(),
    }
}

fn page(size: u32, token: &str) -> Result<(i64, i64), Rejection> {
    let limit = match size {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    };
    let after = if token.is_empty() {
        0
    } else {
        token.parse::<i64>().map_err(|_| {
            Rejection::invalid("page_token", "PAGE_TOKEN", "the page token is not one this service gave")
        })?
    };
    Ok((after, i64::from(limit)))
}

fn report_to_pb(r: IngestReport) -> pb::StreamStatusUpdatesResponse {
    pb::StreamStatusUpdatesResponse {
        applied: r.applied,
        duplicates: r.duplicates,
        unknown_waybills: r.unknown_waybills,
        out_of_order: r.out_of_order,
    }
}

#[tonic::async_trait]
impl PostalService for PostalGrpc {
    async fn get_shipment(
        &self,
        request: Request<pb::GetShipmentRequest>,
    ) -> Result<Response<pb::GetShipmentResponse>, Status> {
        let (waybill, card_id) = match request.into_inner().lookup {
            Some(pb::get_shipment_request::Lookup::Waybill(w)) => (Some(w), None),
            Some(pb::get_shipment_request::Lookup::CardId(c)) => (None, Some(c)),
            None => (None, None),
        };
        let (s, history) = self.postal.shipment(waybill.as_deref(), card_id.as_deref()).await?;
        Ok(Response::new(pb::GetShipmentResponse { shipment: Some(shipment_to_pb(&s, &history)) }))
    }

    async fn list_shipments(
        &self,
        request: Request<pb::ListShipmentsRequest>,
    ) -> Result<Response<pb::ListShipmentsResponse>, Status> {
        let r = request.into_inner();
        let status = match r.status {
            0 => None,
            s => Some(
                status_from_pb("status", s)
                    .or_else(|e| {
                        if s == pb::ShipmentStatus::Withdrawn as i32 { Ok(ShipmentStatus::Withdrawn) } else { Err(e) }
                    })
                    .map_err(ApiError::from)?,
            ),
        };
        let point_id = feed::text("point_id", &r.point_id, false).map_err(ApiError::from)?;
        let (after_seq, limit) = page(r.page_size, &r.page_token).map_err(ApiError::from)?;
        let query = ListQuery {
            status,
            point_id: (!point_id.is_empty()).then_some(point_id),
            overdue_only: r.overdue_only,
            sla_days: (r.sla_days > 0).then_some(r.sla_days),
            after_seq,
            limit,
        };
        let found = self.postal.list(&query).await?;
        let next_page_token = match found.last() {
            Some(last) if i64::try_from(found.len()).unwrap_or(i64::MAX) == limit => last.seq.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListShipmentsResponse {
            shipments: found.iter().map(|s| shipment_to_pb(s, &[])).collect(),
            next_page_token,
        }))
    }

    /// Pipelined: while one batch is being written, the next one is received and checked; batches are
    /// written one at a time, in the order they arrived. A batch is written when it is full, or as soon
    /// as the previous write is done (or, with none running, the sender pauses).
    async fn stream_status_updates(
        &self,
        request: Request<Streaming<pb::StatusUpdate>>,
    ) -> Result<Response<pb::StreamStatusUpdatesResponse>, Status> {
        let mut stream = request.into_inner();
        let mut report = IngestReport::default();
        let mut batch: Vec<Update> = Vec::with_capacity(STREAM_BATCH);
        let mut writing: Option<Write> = None;
        let mut received: u64 = 0;
        loop {
            if batch.len() >= STREAM_BATCH {
                finish(&mut writing, &mut report).await?;
                writing = Some(self.write(&mut batch));
            }
            let next = match writing.as_mut() {
                // Nothing waits to be written: wait for the sender.
                _ if batch.is_empty() => stream.message().await,
                // A write is running: take what arrives until it is done, then write what arrived.
                Some(running) => tokio::select! {
                    biased;
                    done = running => {
                        report.add(joined(done)?);
                        writing = Some(self.write(&mut batch));
                        continue;
                    }
                    next = stream.message() => next,
                },
                // No write running: write as soon as the sender pauses.
                None => match tokio::time::timeout(Duration::ZERO, stream.message()).await {
                    Ok(next) => next,
                    Err(_) => {
                        writing = Some(self.write(&mut batch));
                        continue;
                    }
                },
            };
            let message = match next {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(status) => {
                    // The sender went away mid-stream: what arrived whole is kept.
                    finish(&mut writing, &mut report).await?;
                    report.add(self.postal.ingest(batch, Source::Stream).await?);
                    return Err(status);
                }
            };
            received += 1;
            match update_from_pb(&message, self.postal.now()) {
                Ok(u) => batch.push(u),
                Err(rejection) => {
                    finish(&mut writing, &mut report).await?;
                    report.add(self.postal.ingest(batch, Source::Stream).await?);
                    let accepted = received - 1;
                    let mut status = Status::from(ApiError::Rejected(Rejection {
                        message: format!(
                            "update #{received}: {}; the {accepted} updates before it were taken",
                            rejection.message
                        ),
                        ..rejection
                    }));
                    if let Ok(v) = accepted.to_string().parse() {
                        status.metadata_mut().insert("applied-before-error", v);
                    }
                    return Err(status);
                }
            }
        }
        finish(&mut writing, &mut report).await?;
        report.add(self.postal.ingest(batch, Source::Stream).await?);
        Ok(Response::new(report_to_pb(report)))
    }

    async fn list_unknown_waybill_updates(
        &self,
        request: Request<pb::ListUnknownWaybillUpdatesRequest>,
    ) -> Result<Response<pb::ListUnknownWaybillUpdatesResponse>, Status> {
        let r = request.into_inner();
        let (after, limit) = page(r.page_size, &r.page_token).map_err(ApiError::from)?;
        let (rows, total) = self.postal.store().unknown_updates(after, limit).await.map_err(crate::app::store_error)?;
        let next_page_token = match rows.last() {
            Some((id, ..)) if i64::try_from(rows.len()).unwrap_or(i64::MAX) == limit => id.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListUnknownWaybillUpdatesResponse {
            updates: rows
                .iter()
                .map(|(_, u, received_at, source)| pb::UnknownWaybillUpdate {
                    update: Some(update_to_pb(u)),
                    received_at: Some(timestamp(*received_at)),
                    source: source.clone(),
                })
                .collect(),
            next_page_token,
            total: u64::try_from(total).unwrap_or(0),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use prost::Message;

    proptest! {
        // Any bytes that decode as a stream message are checked or refused, never a panic.
        #[test]
        fn stream_messages_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(u) = pb::StatusUpdate::decode(data.as_slice()) {
                let _ = update_from_pb(&u, OffsetDateTime::UNIX_EPOCH);
            }
        }

        #[test]
        fn stream_fields_never_panic(
            waybill in ".{0,20}", status in any::<i32>(), id in ".{0,70}", seconds in any::<i64>(), nanos in any::<i32>()
        ) {
            let u = pb::StatusUpdate {
                waybill,
                status,
                courier_event_id: id,
                occurred_at: Some(prost_types::Timestamp { seconds, nanos }),
                ..Default::default()
            };
            let _ = update_from_pb(&u, OffsetDateTime::UNIX_EPOCH);
        }
    }
}
