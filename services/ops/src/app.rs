//! Ops' use cases: the queries the gRPC API and the dashboard both answer from (so the page and the API
//! can never disagree), input checks, and the rebuild.

use std::sync::Arc;

use socialcard_domain::Rejection;
use socialcard_events::embedded::SqliteOffsets;
use socialcard_events::{Handler, Metrics, unix_micros};
use socialcard_server::{ApiError, Clock};
use time::OffsetDateTime;

use crate::feed::{EmbeddedFeed, OpsEvents, Source};
use crate::store::{Grouping, OneSidedRow, OpsStore, OverdueRow, StageTimes, StateCount, StoreError};

#[derive(Clone, Debug)]
pub struct OpsConfig {
    /// Days after which a shipment still open counts as overdue, unless the caller says otherwise.
    pub overdue_days: u32,
}

impl Default for OpsConfig {
    fn default() -> Self {
        Self { overdue_days: 7 }
    }
}

/// The longest `older_than_days` and page a caller may ask for.
pub const MAX_OVERDUE_DAYS: u32 = 365;
pub const MAX_PAGE: u32 = 500;
const DEFAULT_PAGE: u32 = 100;

/// A stage of the issuing funnel, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FunnelStage {
    Application,
    Production,
    Delivery,
    Collection,
    Activation,
}

impl FunnelStage {
    pub const ALL: [FunnelStage; 5] = [
        FunnelStage::Application,
        FunnelStage::Production,
        FunnelStage::Delivery,
        FunnelStage::Collection,
        FunnelStage::Activation,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FunnelStage::Application => "application",
            FunnelStage::Production => "production",
            FunnelStage::Delivery => "delivery",
            FunnelStage::Collection => "collection",
            FunnelStage::Activation => "activation",
        }
    }

    fn time(self, t: &StageTimes) -> Option<i64> {
        match self {
            FunnelStage::Application => t.applied_at,
            FunnelStage::Production => t.produced_at,
            FunnelStage::Delivery => t.dispatched_at,
            FunnelStage::Collection => t.collected_at,
            FunnelStage::Activation => t.activated_at,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FunnelStep {
    pub stage: FunnelStage,
    /// Cards that reached this stage or a later one.
    pub count: u64,
    /// Median microseconds from the previous stage, over `timed` cards with both times.
    pub median_micros: Option<i64>,
    pub timed: u64,
}

/// Which cards the funnel counts.
#[derive(Clone, Debug, Default)]
pub struct FunnelQuery {
    pub applied_from: Option<OffsetDateTime>,
    pub applied_until: Option<OffsetDateTime>,
    pub bank_code: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LossSummary {
    pub open: u64,
    pub one_sided: u64,
    pub expired: u64,
    pub by_state: Vec<(String, u64)>,
    /// The one-sided cases themselves, oldest first (at most `ONE_SIDED_LISTED`): the cards someone
    /// should look at.
    pub one_sided_cases: Vec<OneSidedRow>,
}

/// The loss case states that are not over (the coordinator's `cases` module names them).
const OPEN_CASE_STATES: [&str; 4] = ["locking", "locked", "one_sided", "unlocking"];

/// How many one-sided cases the summary lists (the count covers them all).
pub const ONE_SIDED_LISTED: u32 = 50;

#[derive(Clone)]
pub struct Ops {
    store: OpsStore,
    clock: Arc<dyn Clock>,
    config: Arc<OpsConfig>,
    feed: Option<Arc<EmbeddedFeed>>,
    /// Other consumers' dead-letter tables (embedded log): consumer group and the database holding it.
    dead_letter_sources: Arc<Vec<(String, SqliteOffsets)>>,
}

impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ops").field("config", &self.config).field("embedded", &self.feed.is_some()).finish()
    }
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Database(e) => ApiError::Unavailable(e.to_string()),
        StoreError::Feed(m) | StoreError::Write(m) => ApiError::Unavailable(m),
        other => ApiError::Internal(other.to_string()),
    }
}

/// A bank code or a region code: short, lowercase letters, digits, `-` or `_`.
fn group_name(field: &'static str, value: &str) -> Result<Option<String>, ApiError> {
    if value.is_empty() {
        return Ok(None);
    }
    if value.len() > 32
        || !value.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    {
        return Err(Rejection::invalid(
            field,
            "GROUP_NAME_INVALID",
            "a bank code or a six-digit region code: at most 32 of a-z, 0-9, '-' and '_'",
        )
        .into());
    }
    Ok(Some(value.to_string()))
}

/// The lower median (nearest rank), so it is always a duration some card really took.
fn median(mut values: Vec<i64>) -> Option<i64> {
    values.sort_unstable();
    let n = values.len();
    (n > 0).then(|| values[(n - 1) / 2])
}

impl Ops {
    pub fn new(store: OpsStore, clock: Arc<dyn Clock>, config: OpsConfig) -> Self {
        Self { store, clock, config: Arc::new(config), feed: None, dead_letter_sources: Arc::new(Vec::new()) }
    }

    /// Reads the embedded log: one consumer per source, positions in ops' database.
    pub fn with_embedded_feed(mut self, sources: Vec<Source>, metrics: Option<Metrics>) -> Self {
        self.feed = Some(Arc::new(EmbeddedFeed::new(&self.store, sources, metrics)));
        self
    }

    /// Counts, besides its own, the dead letters these consumer groups keep in these databases.
    pub fn with_dead_letter_sources(mut self, sources: Vec<(String, SqliteOffsets)>) -> Self {
        self.dead_letter_sources = Arc::new(sources);
        self
    }

    pub fn feed(&self) -> Option<Arc<EmbeddedFeed>> {
        self.feed.clone()
    }

    pub fn store(&self) -> &OpsStore {
        &self.store
    }

    /// The handler every topic's consumer calls (for Kafka consumers).
    pub fn handler(&self) -> Arc<dyn Handler> {
        Arc::new(OpsEvents::new(self.store.clone()))
    }

    pub fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    pub async fn card_counts(&self, by: Grouping, group: &str) -> Result<Vec<StateCount>, ApiError> {
        let only = group_name("group", group)?;
        self.store.card_counts(by, only.as_deref()).await.map_err(store_error)
    }

    pub async fn funnel(&self, q: &FunnelQuery) -> Result<Vec<FunnelStep>, ApiError> {
        if let (Some(from), Some(until)) = (q.applied_from, q.applied_until)
            && from >= until
        {
            return Err(Rejection::invalid(
                "applied_until",
                "TIME_RANGE_EMPTY",
                "applied_until must be after applied_from",
            )
            .into());
        }
        let bank = group_name("bank_code", &q.bank_code)?;
        let cards = self
            .store
            .stage_times(q.applied_from.map(unix_micros), q.applied_until.map(unix_micros), bank.as_deref())
            .await
            .map_err(store_error)?;
        let stages = FunnelStage::ALL;
        Ok(stages
            .iter()
            .enumerate()
            .map(|(i, stage)| {
                let count = cards.iter().filter(|c| stages[i..].iter().any(|s| s.time(c).is_some())).count() as u64;
                let durations: Vec<i64> = match i.checked_sub(1) {
                    Some(p) => cards
                        .iter()
                        .filter_map(|c| Some(stage.time(c)? - stages[p].time(c)?))
                        .map(|d| d.max(0))
                        .collect(),
                    None => Vec::new(),
                };
                FunnelStep { stage: *stage, count, timed: durations.len() as u64, median_micros: median(durations) }
            })
            .collect())
    }

    pub async fn loss_summary(&self, bank_code: &str) -> Result<LossSummary, ApiError> {
        let bank = group_name("bank_code", bank_code)?;
        let by_state = self.store.loss_states(bank.as_deref()).await.map_err(store_error)?;
        let one_sided_cases =
            self.store.one_sided_cases(bank.as_deref(), ONE_SIDED_LISTED).await.map_err(store_error)?;
        let count = |pred: &dyn Fn(&str) -> bool| by_state.iter().filter(|(s, _)| pred(s)).map(|(_, n)| n).sum();
        Ok(LossSummary {
            open: count(&|s| OPEN_CASE_STATES.contains(&s)),
            one_sided: count(&|s| s == "one_sided"),
            expired: count(&|s| s == "expired"),
            by_state,
            one_sided_cases,
        })
    }

    /// Shipments open longer than `older_than_days` (0: the configured default), oldest first.
    pub async fn overdue_shipments(
        &self,
        older_than_days: u32,
        page_size: u32,
    ) -> Result<(u64, Vec<OverdueRow>), ApiError> {
        if older_than_days > MAX_OVERDUE_DAYS {
            return Err(Rejection::invalid("older_than_days", "DAYS_OUT_OF_RANGE", "at most 365 days").into());
        }
        if page_size > MAX_PAGE {
            return Err(Rejection::invalid("page_size", "PAGE_SIZE_TOO_LARGE", "at most 500 per page").into());
        }
        let days = if older_than_days == 0 { self.config.overdue_days } else { older_than_days };
        let page = if page_size == 0 { DEFAULT_PAGE } else { page_size };
        let before = self.clock.now() - time::Duration::days(i64::from(days));
        self.store.overdue_shipments(before, page).await.map_err(store_error)
    }

    pub fn overdue_days(&self) -> u32 {
        self.config.overdue_days
    }

    /// Dead letters per consumer group: ops' own, those seen on Kafka's dead-letter topics, and the other
    /// consumers' of the embedded log.
    pub async fn dead_letters(&self) -> Result<Vec<(String, u64)>, ApiError> {
        let mut all = self.store.own_dead_letters().await.map_err(store_error)?;
        for (group, offsets) in self.dead_letter_sources.iter() {
            let n = offsets.dead_letter_count(group).await.map_err(|e| ApiError::Unavailable(e.to_string()))?;
            if n > 0 {
                all.push((group.clone(), n.unsigned_abs()));
            }
        }
        all.sort();
        Ok(all)
    }

    /// Drops the read models and replays every topic from its start. The same key answers the same again
    /// without replaying.
    pub async fn rebuild(&self, idempotency_key: &str) -> Result<u64, ApiError> {
        if idempotency_key.is_empty() || idempotency_key.len() > 128 {
            return Err(Rejection::invalid(
                "idempotency_key",
                "IDEMPOTENCY_KEY_REQUIRED",
                "a rebuild takes an idempotency key of 1 to 128 characters",
            )
            .into());
        }
        if let Some(n) = self.store.rebuild_answer(idempotency_key).await.map_err(store_error)? {
            return Ok(n);
        }
        let Some(feed) = &self.feed else {
            return Err(Rejection::precondition(
                "REBUILD_NEEDS_EMBEDDED_LOG",
                "on Kafka, rebuild by starting ops under a new consumer group with emptied read models",
            )
            .into());
        };
        let replayed = feed.replay_from_start(&self.store).await.map_err(store_error)?;
        self.store.record_rebuild(idempotency_key, replayed, self.clock.now()).await.map_err(store_error)?;
        tracing::info!(events = replayed, "ops read models rebuilt");
        Ok(replayed)
    }
}
