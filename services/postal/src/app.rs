//! Postal's use cases: open a shipment for a produced card, take courier updates from any feed,
//! answer shipment queries. Wire types are converted at the edges (`grpc`, `webhook`, `events`); here
//! everything is checked domain values and storage calls.

use std::sync::Arc;

use socialcard_domain::Rejection;
use socialcard_server::{ApiError, Clock};
use time::OffsetDateTime;

use crate::feed::{Source, Update};
use crate::status::Status;
use crate::storage::{
    CardDone, CardWork, HistoryRecord, IngestReport, NewShipment, PostalStore, ShipmentFilter, ShipmentRecord,
    StoreError,
};

/// Postal's settings.
#[derive(Clone)]
pub struct PostalConfig {
    /// A shipment still open this many days after it was opened is overdue.
    pub sla_days: u32,
    /// The courier's webhook signing key (HMAC-SHA256).
    pub webhook_secret: Vec<u8>,
}

impl std::fmt::Debug for PostalConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostalConfig").field("sla_days", &self.sla_days).finish_non_exhaustive()
    }
}

impl PostalConfig {
    /// Shanghai's expectation: a mailed card reaches its holder within a week.
    pub fn new(webhook_secret: Vec<u8>) -> Self {
        Self { sla_days: 7, webhook_secret }
    }
}

pub fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Database(e) => ApiError::Unavailable(e.to_string()),
        StoreError::Direct(e) => ApiError::Unavailable(e.to_string()),
        StoreError::Group(e) => ApiError::Unavailable(e.to_string()),
        StoreError::Corrupt(m) => ApiError::Internal(m),
    }
}

/// Where a listing of shipments looks.
#[derive(Clone, Debug, Default)]
pub struct ListQuery {
    pub status: Option<Status>,
    pub point_id: Option<String>,
    pub overdue_only: bool,
    /// Overrides the configured SLA.
    pub sla_days: Option<u32>,
    pub after_seq: i64,
    pub limit: i64,
}

#[derive(Clone, Debug)]
pub struct Postal {
    store: PostalStore,
    clock: Arc<dyn Clock>,
    config: Arc<PostalConfig>,
}

impl Postal {
    pub fn new(store: PostalStore, clock: Arc<dyn Clock>, config: PostalConfig) -> Self {
        Self { store, clock, config: Arc::new(config) }
    }

    pub fn store(&self) -> &PostalStore {
        &self.store
    }

    pub fn config(&self) -> &PostalConfig {
        &self.config
    }

    pub fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    /// R14: a produced card is mailed point to point; its shipment opens once per `CardProduced` event.
    pub async fn open_shipment(&self, event_id: &str, new: &NewShipment) -> Result<Option<ShipmentRecord>, ApiError> {
        let opened = self.store.open_shipment(event_id, new, self.clock.now()).await.map_err(store_error)?;
        if let Some(s) = &opened {
            tracing::info!(waybill = %s.waybill, card = %s.card_id, "shipment opened");
        }
        Ok(opened)
    }

    /// R16: a card handed over at a counter before the courier took it needs no shipment any more.
    pub async fn withdraw(
        &self,
        event_id: &str,
        card_id: &str,
        reason: &'static str,
    ) -> Result<Option<String>, ApiError> {
        let withdrawn = self.store.withdraw(event_id, card_id, reason, self.clock.now()).await.map_err(store_error)?;
        if let Some(w) = &withdrawn {
            tracing::info!(waybill = %w, card = %card_id, "shipment withdrawn: collected without the courier");
        }
        Ok(withdrawn)
    }

    /// What several card events ask (R14 opens, R16 withdrawals), in order, in one transaction: all or
    /// nothing, each event at most once.
    pub async fn apply_card_work(&self, work: &[(&str, &CardWork)]) -> Result<Vec<CardDone>, ApiError> {
        let done = self.store.apply_card_work(work, self.clock.now()).await.map_err(store_error)?;
        for (d, (_, w)) in done.iter().zip(work) {
            match (d, w) {
                (CardDone::Opened(s), _) => {
                    tracing::info!(waybill = %s.waybill, card = %s.card_id, "shipment opened");
                }
                (CardDone::Withdrawn(waybill), CardWork::Withdraw { card_id, .. }) => {
                    tracing::info!(waybill = %waybill, card = %card_id, "shipment withdrawn: collected without the courier");
                }
                _ => {}
            }
        }
        Ok(done)
    }

    /// Takes checked updates from a feed, all in one transaction.
    pub async fn ingest(&self, updates: Vec<Update>, source: Source) -> Result<IngestReport, ApiError> {
        self.store.ingest(updates, source, self.clock.now()).await.map_err(store_error)
    }

    pub async fn shipment(
        &self,
        waybill: Option<&str>,
        card_id: Option<&str>,
    ) -> Result<(ShipmentRecord, Vec<HistoryRecord>), ApiError> {
        let found = match (waybill, card_id) {
            (Some(w), _) => {
                let w = crate::feed::Waybill::parse("waybill", w)?;
                self.store.shipment_by_waybill(w.as_str()).await
            }
            (None, Some(c)) => {
                let c = crate::feed::text("card_id", c, true)?;
                self.store.shipment_of_card(&c).await
            }
            (None, None) => {
                return Err(Rejection::invalid("lookup", "FIELD_REQUIRED", "name a waybill or a card id").into());
            }
        }
        .map_err(store_error)?
        .ok_or_else(|| Rejection::not_found("SHIPMENT_NOT_FOUND", "no such shipment"))?;
        let history = self.store.history(&found.waybill).await.map_err(store_error)?;
        Ok((found, history))
    }

    pub async fn list(&self, q: &ListQuery) -> Result<Vec<ShipmentRecord>, ApiError> {
        let opened_before = q.overdue_only.then(|| {
            let days = q.sla_days.unwrap_or(self.config.sla_days);
            self.clock.now() - time::Duration::days(i64::from(days))
        });
        let filter = ShipmentFilter {
            status: q.status,
            point_id: q.point_id.clone(),
            opened_before,
            after_seq: q.after_seq,
            limit: q.limit,
        };
        self.store.list(&filter).await.map_err(store_error)
    }
}
