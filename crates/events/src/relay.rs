//! The outbox relay: publishes outbox rows in order and marks them only after the broker acknowledged
//! them. While the broker is away it backs off and retries the same rows: nothing is lost, and a card's
//! events are never reordered (a batch is marked all-or-nothing, and the next attempt starts from the
//! oldest unmarked row). A crash between publish and mark republishes; consumers' inboxes absorb that.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::{Metrics, Outbox, Publish};

/// How often the backlog gauge is refreshed (a COUNT over the unpublished index).
const BACKLOG_EVERY: Duration = Duration::from_millis(500);

#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// The producing service, the `source` label of the backlog gauge.
    pub source: String,
    pub metrics: Option<Metrics>,
    pub batch: i64,
    /// Sleep when the outbox is empty.
    pub idle: Duration,
    pub max_backoff: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            source: "outbox".into(),
            metrics: None,
            batch: 256,
            idle: Duration::from_millis(5),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// Runs the relay until `stop` turns true.
pub async fn run(
    outbox: Arc<dyn Outbox>,
    publisher: Arc<dyn Publish>,
    config: RelayConfig,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(50);
    let mut measured = tokio::time::Instant::now() - BACKLOG_EVERY;
    loop {
        if *stop.borrow() {
            return;
        }
        if let Some(m) = &config.metrics
            && measured.elapsed() >= BACKLOG_EVERY
        {
            measured = tokio::time::Instant::now();
            if let Ok(rows) = outbox.backlog().await {
                m.outbox_backlog(&config.source, rows);
            }
        }
        let pause = match outbox.relay_once(config.batch, publisher.as_ref()).await {
            Ok(0) => config.idle,
            Ok(n) => {
                tracing::trace!(published = n, "outbox batch published");
                backoff = Duration::from_millis(50);
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "outbox relay failed");
                let b = backoff;
                backoff = (backoff * 2).min(config.max_backoff);
                b
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => {}
        }
    }
}
