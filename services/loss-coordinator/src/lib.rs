//! The loss coordinator (`socialcard.loss.v1.LossCoordinatorService`): a loss reported through any channel
//! becomes a case that locks the social function at the registry and freezes the financial function
//! through the card's own bank adapter (R25, R26), retried until both sides confirm; unlocks follow each
//! side's rules (R27); deadlines (R22, R23, R24, temporary-loss expiry) are durable timers in this
//! service's database that fire by themselves, against a clock tests can move.
//!
//! Every call to another service carries an idempotency key derived from the case (or timer) and the
//! side, so a coordinator killed at any point and restarted completes its cases with each side locked
//! exactly once. This crate never holds another service's data: it keeps cases, timers and its outbox.

mod cases;
pub mod events;
pub mod grpc;
mod store;
mod timers;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use socialcard_domain::{BankDirectory, CityPolicy};
use socialcard_events::Outbox;
use socialcard_events::embedded::SqliteOffsets;
use socialcard_events::outbox::SqliteOutbox;
use socialcard_proto::bank::v1::bank_coordination_service_client::BankCoordinationServiceClient;
use socialcard_proto::registry::v1::registry_service_client::RegistryServiceClient;
use socialcard_server::Clock;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool};
use tokio::sync::watch;
use tonic::transport::Channel;

pub use grpc::SERVICE_NAME;

/// What the coordinator needs to know besides its database.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    pub policy: CityPolicy,
    pub banks: BankDirectory,
    /// How often the background loop drives unfinished cases and fires due timers.
    pub tick: Duration,
    /// Timeout of one call to the registry or an adapter.
    pub call_timeout: Duration,
    /// The longest wait between two retries of a side or a timer.
    pub max_backoff: Duration,
}

impl CoordinatorConfig {
    pub fn new(policy: CityPolicy, banks: BankDirectory) -> Self {
        Self {
            policy,
            banks,
            tick: Duration::from_millis(500),
            call_timeout: Duration::from_secs(5),
            max_backoff: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Coordinator {
    pool: SqlitePool,
    /// One connection for writes: writers queue here in order rather than in SQLite's busy handler.
    writer: SqlitePool,
    registry: RegistryServiceClient<Channel>,
    adapters: Arc<HashMap<String, BankCoordinationServiceClient<Channel>>>,
    clock: Arc<dyn Clock>,
    config: Arc<CoordinatorConfig>,
    outbox: Arc<dyn Outbox>,
}

impl Coordinator {
    /// Opens (creating if needed) the coordinator's SQLite database and migrates it. `adapters` maps each
    /// bank code to its adapter's channel.
    pub async fn open(
        database_path: &std::path::Path,
        registry: Channel,
        adapters: Vec<(String, Channel)>,
        clock: Arc<dyn Clock>,
        config: CoordinatorConfig,
    ) -> Result<Self, sqlx::Error> {
        let options = SqliteConnectOptions::new()
            .filename(database_path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = socialcard_events::sqlite_pool(4).connect_with(options.clone()).await?;
        sqlx::migrate!("./migrations").run(&pool).await.map_err(|e| sqlx::Error::Migrate(Box::new(e)))?;
        sqlx::raw_sql(socialcard_events::inbox::SQLITE_SCHEMA).execute(&pool).await?;
        let writer = socialcard_events::sqlite_pool(1).connect_with(options).await?;
        let adapters =
            adapters.into_iter().map(|(code, channel)| (code, BankCoordinationServiceClient::new(channel))).collect();
        Ok(Self {
            outbox: Arc::new(SqliteOutbox::new(pool.clone())),
            pool,
            writer,
            registry: RegistryServiceClient::new(registry),
            adapters: Arc::new(adapters),
            clock,
            config: Arc::new(config),
        })
    }

    /// The coordinator's outbox (topic `socialcard.loss.v1`), for the relay or the embedded log.
    pub fn outbox(&self) -> Arc<dyn Outbox> {
        self.outbox.clone()
    }

    /// Where this coordinator's embedded-log consumers keep their positions.
    pub fn offsets(&self) -> SqliteOffsets {
        SqliteOffsets::new(self.pool.clone())
    }

    pub fn into_server(
        self,
    ) -> socialcard_proto::loss::v1::loss_coordinator_service_server::LossCoordinatorServiceServer<grpc::CoordinatorGrpc>
    {
        grpc::CoordinatorGrpc::new(self).into_server()
    }

    /// One pass of the background work: drive unfinished cases, then fire due timers. Returns how many
    /// cases and timers it touched.
    pub async fn tick(&self) -> (usize, usize) {
        let driven = match self.drive_pending().await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "driving loss cases failed");
                0
            }
        };
        let fired = match self.fire_due_timers().await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "firing timers failed");
                0
            }
        };
        (driven, fired)
    }

    /// Runs [`Coordinator::tick`] every `config.tick` until `stop` turns true.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut interval = tokio::time::interval(self.config.tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => { self.tick().await; }
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow() {
                        return;
                    }
                }
            }
        }
    }

    /// Wall-clock now, for retry schedules (deadlines use the business clock, which tests move; retries
    /// must keep happening in real time whatever that clock says).
    fn real_now(&self) -> i64 {
        socialcard_events::unix_micros(time::OffsetDateTime::now_utc())
    }

    /// When to retry after `attempts` failures, in wall-clock microseconds.
    fn retry_at(&self, attempts: i64) -> i64 {
        self.real_now() + i64::try_from(self.backoff(attempts).as_micros()).unwrap_or(i64::MAX / 2)
    }

    /// The exponential backoff after `attempts` failures, capped.
    fn backoff(&self, attempts: i64) -> Duration {
        let exp = u32::try_from(attempts.clamp(0, 16)).unwrap_or(16);
        let base = Duration::from_millis(200).saturating_mul(2u32.saturating_pow(exp));
        base.min(self.config.max_backoff)
    }
}
