//! `socialcard.ops.v1.OpsService`: wire types to the use cases and back; bad input is refused with
//! INVALID_ARGUMENT and a reason before anything is read or written.

use socialcard_domain::Rejection;
use socialcard_proto::ops::v1 as pb;
use socialcard_proto::ops::v1::ops_service_server::{OpsService, OpsServiceServer};
use socialcard_server::ApiError;
use time::OffsetDateTime;
use tonic::{Request, Response, Status};

use crate::app::{FunnelQuery, FunnelStage, Ops};
use crate::store::Grouping;

#[derive(Clone, Debug)]
pub struct OpsGrpc {
    ops: Ops,
}

impl OpsGrpc {
    pub fn new(ops: Ops) -> Self {
        Self { ops }
    }

    pub fn into_server(self) -> OpsServiceServer<Self> {
        OpsServiceServer::new(self)
    }
}

fn timestamp(t: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.unix_timestamp(), nanos: i32::try_from(t.nanosecond()).unwrap_or(0) }
}

fn from_timestamp(field: &'static str, t: &prost_types::Timestamp) -> Result<OffsetDateTime, ApiError> {
    let invalid = || ApiError::from(Rejection::invalid(field, "TIMESTAMP_INVALID", "not a valid time"));
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(invalid());
    }
    OffsetDateTime::from_unix_timestamp(t.seconds)
        .map(|s| s + time::Duration::nanoseconds(t.nanos.into()))
        .map_err(|_| invalid())
}

pub fn stage_to_pb(s: FunnelStage) -> pb::FunnelStage {
    match s {
        FunnelStage::Application => pb::FunnelStage::Application,
        FunnelStage::Production => pb::FunnelStage::Production,
        FunnelStage::Delivery => pb::FunnelStage::Delivery,
        FunnelStage::Collection => pb::FunnelStage::Collection,
        FunnelStage::Activation => pb::FunnelStage::Activation,
    }
}

fn duration(micros: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: micros / 1_000_000,
        nanos: i32::try_from((micros % 1_000_000) * 1_000).unwrap_or(0),
    }
}

#[tonic::async_trait]
impl OpsService for OpsGrpc {
    async fn get_card_counts(
        &self,
        request: Request<pb::GetCardCountsRequest>,
    ) -> Result<Response<pb::GetCardCountsResponse>, Status> {
        let req = request.into_inner();
        let by = match pb::CardGrouping::try_from(req.group_by) {
            Ok(pb::CardGrouping::Bank) => Grouping::Bank,
            Ok(pb::CardGrouping::District) => Grouping::District,
            Ok(pb::CardGrouping::Unspecified) => {
                return Err(ApiError::from(Rejection::invalid(
                    "group_by",
                    "ENUM_UNSPECIFIED",
                    "group_by must be BANK or DISTRICT",
                ))
                .into());
            }
            Err(_) => {
                return Err(ApiError::from(Rejection::invalid(
                    "group_by",
                    "UNKNOWN_ENUM_VALUE",
                    "group_by has an unknown value",
                ))
                .into());
            }
        };
        let rows = self.ops.card_counts(by, &req.group).await?;
        let total = rows.iter().map(|r| r.count).sum();
        let counts = rows
            .into_iter()
            .map(|r| pb::CardCount {
                group: r.group,
                physical_state: r.physical,
                social_state: r.social,
                financial_state: r.financial,
                count: r.count,
            })
            .collect();
        Ok(Response::new(pb::GetCardCountsResponse { counts, total }))
    }

    async fn get_funnel(
        &self,
        request: Request<pb::GetFunnelRequest>,
    ) -> Result<Response<pb::GetFunnelResponse>, Status> {
        let req = request.into_inner();
        let query = FunnelQuery {
            applied_from: req.applied_from.as_ref().map(|t| from_timestamp("applied_from", t)).transpose()?,
            applied_until: req.applied_until.as_ref().map(|t| from_timestamp("applied_until", t)).transpose()?,
            bank_code: req.bank_code,
        };
        let steps = self
            .ops
            .funnel(&query)
            .await?
            .into_iter()
            .map(|s| pb::FunnelStep {
                stage: stage_to_pb(s.stage) as i32,
                count: s.count,
                median_from_previous: s.median_micros.map(duration),
                timed: s.timed,
            })
            .collect();
        Ok(Response::new(pb::GetFunnelResponse { steps }))
    }

    async fn get_loss_summary(
        &self,
        request: Request<pb::GetLossSummaryRequest>,
    ) -> Result<Response<pb::GetLossSummaryResponse>, Status> {
        let s = self.ops.loss_summary(&request.into_inner().bank_code).await?;
        Ok(Response::new(pb::GetLossSummaryResponse {
            open: s.open,
            one_sided: s.one_sided,
            expired: s.expired,
            by_state: s.by_state.into_iter().map(|(state, count)| pb::LossStateCount { state, count }).collect(),
            one_sided_cases: s
                .one_sided_cases
                .into_iter()
                .map(|c| pb::OneSidedCase {
                    case_id: c.case_id,
                    card_id: c.card_id,
                    bank_code: c.bank_code,
                    loss_kind: c.loss_kind,
                    social_locked: c.social_locked,
                    financial_frozen: c.financial_frozen,
                    opened_at: Some(timestamp(c.opened_at)),
                    updated_at: Some(timestamp(c.updated_at)),
                })
                .collect(),
        }))
    }

    async fn list_overdue_shipments(
        &self,
        request: Request<pb::ListOverdueShipmentsRequest>,
    ) -> Result<Response<pb::ListOverdueShipmentsResponse>, Status> {
        let req = request.into_inner();
        let (total, rows) = self.ops.overdue_shipments(req.older_than_days, req.page_size).await?;
        Ok(Response::new(pb::ListOverdueShipmentsResponse {
            total,
            shipments: rows
                .into_iter()
                .map(|r| pb::OverdueShipment {
                    card_id: r.card_id,
                    waybill: r.waybill,
                    milestone: r.milestone,
                    opened_at: Some(timestamp(r.opened_at)),
                    last_event_at: Some(timestamp(r.last_event_at)),
                })
                .collect(),
        }))
    }

    async fn get_dead_letters(
        &self,
        _request: Request<pb::GetDeadLettersRequest>,
    ) -> Result<Response<pb::GetDeadLettersResponse>, Status> {
        let groups = self.ops.dead_letters().await?;
        Ok(Response::new(pb::GetDeadLettersResponse {
            total: groups.iter().map(|(_, n)| n).sum(),
            by_group: groups
                .into_iter()
                .map(|(consumer_group, count)| pb::DeadLetterCount { consumer_group, count })
                .collect(),
        }))
    }

    async fn rebuild(&self, request: Request<pb::RebuildRequest>) -> Result<Response<pb::RebuildResponse>, Status> {
        let events_replayed = self.ops.rebuild(&request.into_inner().idempotency_key).await?;
        Ok(Response::new(pb::RebuildResponse { events_replayed }))
    }
}
