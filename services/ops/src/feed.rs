//! How ops reads the topics. [`OpsEvents`] is the one handler for every topic: each event is applied with
//! its inbox row in one transaction. [`EmbeddedFeed`] reads each producing service's SQLite outbox (the
//! embedded log) under a gate that [`EmbeddedFeed::replay_from_start`] takes, so a rebuild never races a
//! consumer committing a position it read before the read models were dropped. On Kafka, the ordinary
//! [`socialcard_events::kafka::KafkaConsumer`] drives the same handler.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use socialcard_events::embedded::{EmbeddedConsumer, SqliteOffsets};
use socialcard_events::outbox::SqliteOutbox;
use socialcard_events::{Applied, Envelope, EventError, Handler, HandlerError, Metrics, Outbox};
use sqlx::sqlite::SqliteConnectOptions;
use tokio::sync::{Mutex, watch};

use crate::store::{OpsStore, StoreError};

#[derive(Clone, Debug)]
pub struct OpsEvents {
    store: OpsStore,
}

impl OpsEvents {
    pub fn new(store: OpsStore) -> Self {
        Self { store }
    }
}

#[async_trait]
impl Handler for OpsEvents {
    async fn handle(&self, event: &Envelope) -> Result<Applied, HandlerError> {
        match self.store.apply(event).await {
            Ok(true) => Ok(Applied::Applied),
            Ok(false) => Ok(Applied::Duplicate),
            Err(e) => Err(handler_error(e)),
        }
    }

    fn has_batch_form(&self) -> bool {
        true
    }

    async fn handle_batch(&self, events: &[Envelope]) -> Option<Result<Vec<Applied>, HandlerError>> {
        Some(match self.store.apply_batch(events).await {
            Ok(applied) => {
                Ok(applied.into_iter().map(|new| if new { Applied::Applied } else { Applied::Duplicate }).collect())
            }
            Err(e) => Err(handler_error(e)),
        })
    }
}

fn handler_error(e: StoreError) -> HandlerError {
    match e {
        StoreError::Database(_) | StoreError::Feed(_) | StoreError::Write(_) => HandlerError::Transient(e.to_string()),
        StoreError::Undecodable(_) | StoreError::Corrupt(_) => HandlerError::Permanent(e.to_string()),
    }
}

/// Another service's SQLite database (it must exist), opened to read its outbox as the embedded log and
/// its consumers' dead letters. Ops never writes to it.
pub async fn open_service_database(path: &Path) -> Result<(Arc<dyn Outbox>, SqliteOffsets), StoreError> {
    let options =
        SqliteConnectOptions::new().filename(path).create_if_missing(false).busy_timeout(Duration::from_secs(10));
    let pool = socialcard_events::sqlite_pool(2).connect_with(options).await?;
    Ok((Arc::new(SqliteOutbox::new(pool.clone())), SqliteOffsets::new(pool)))
}

/// One producing service's log of one topic, e.g. the registry's outbox for `socialcard.card.v1`.
#[derive(Clone, Debug)]
pub struct Source {
    /// The producing service, e.g. `registry` or `bank-adapter.icbc`; ops reads it as group `ops.<name>`.
    pub name: String,
    pub topic: &'static str,
    pub log: Arc<dyn Outbox>,
}

/// Ops' consumers of the embedded log, one per source, polled together under one gate.
#[derive(Debug)]
pub struct EmbeddedFeed {
    consumers: Vec<EmbeddedConsumer>,
    gate: Mutex<()>,
    /// The pause after the first empty poll of every source.
    pub poll: Duration,
    /// The longest pause while every source stays empty (the dashboard is at most this stale).
    pub max_idle_poll: Duration,
}

impl EmbeddedFeed {
    pub fn new(store: &OpsStore, sources: Vec<Source>, metrics: Option<Metrics>) -> Self {
        let handler: Arc<dyn Handler> = Arc::new(OpsEvents::new(store.clone()));
        let consumers = sources
            .into_iter()
            .map(|s| {
                let mut c =
                    EmbeddedConsumer::new(&format!("ops.{}", s.name), s.topic, s.log, store.offsets(), handler.clone());
                c.metrics = metrics.clone();
                // A database briefly unable to write: keep trying rather than dead-letter.
                c.max_attempts = 50;
                c
            })
            .collect();
        Self {
            consumers,
            gate: Mutex::new(()),
            poll: Duration::from_millis(20),
            max_idle_poll: Duration::from_millis(250),
        }
    }

    async fn poll_all(&self) -> Result<usize, EventError> {
        let mut moved = 0;
        for c in &self.consumers {
            moved += c.poll_once().await?;
        }
        Ok(moved)
    }

    /// Reads every source once; returns how many events it moved past.
    pub async fn poll_once(&self) -> Result<usize, EventError> {
        let _gate = self.gate.lock().await;
        self.poll_all().await
    }

    /// Reads until every source is caught up; returns how many events it moved past.
    pub async fn catch_up(&self) -> Result<u64, EventError> {
        let _gate = self.gate.lock().await;
        self.drain().await
    }

    async fn drain(&self) -> Result<u64, EventError> {
        let mut total = 0u64;
        loop {
            let moved = self.poll_all().await?;
            if moved == 0 {
                return Ok(total);
            }
            total += moved as u64;
        }
    }

    /// Drops the read models and positions (through `drop`) and replays every source from its start,
    /// with no consumer running in between; returns how many events were replayed.
    pub async fn replay_from_start(&self, store: &OpsStore) -> Result<u64, StoreError> {
        let _gate = self.gate.lock().await;
        store.drop_read_models().await?;
        self.drain().await.map_err(|e| StoreError::Feed(e.to_string()))
    }

    pub async fn run(self: Arc<Self>, stop: watch::Receiver<bool>) {
        socialcard_events::embedded::poll_until_stopped(self.poll, self.max_idle_poll, stop, None, "ops feed", || {
            self.poll_once()
        })
        .await;
    }
}
