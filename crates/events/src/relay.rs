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
    /// Sleep when the outbox is empty; cut short by a commit of the outbox's group writer
    /// ([`Outbox::commits`]), so this is the wait only for rows written past it.
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
    let mut wake = Wake::new(outbox.commits(), Duration::from_millis(1), config.idle);
    loop {
        if *stop.borrow() {
            return;
        }
        wake.reading();
        if let Some(m) = &config.metrics
            && measured.elapsed() >= BACKLOG_EVERY
        {
            measured = tokio::time::Instant::now();
            if let Ok(rows) = outbox.backlog().await {
                m.outbox_backlog(&config.source, rows);
            }
        }
        let published = outbox.relay_once(config.batch, publisher.as_ref()).await;
        wake.read(!matches!(published, Ok(0)));
        let (wait, wake_on_commit) = match published {
            Ok(0) => (config.idle, true),
            Ok(n) => {
                tracing::trace!(published = n, "outbox batch published");
                backoff = Duration::from_millis(50);
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "outbox relay failed");
                let b = backoff;
                backoff = (backoff * 2).min(config.max_backoff);
                (b, false)
            }
        };
        wake.pause(wait, &mut stop, wake_on_commit).await;
    }
}

/// Waking on a database writer's commits. The signal says only that the database committed, not that
/// the reader's rows came: a consumer of a quiet topic in a busy database would read once per commit.
/// So a wake whose read found nothing counts as wasted, and from the second wasted wake in a row on
/// (one is expected: a commit landing between the mark and the read is read at once and wakes once
/// more), each doubles the least time between a read and the next woken one (`first_gap`, up to
/// `max_gap`); a read that finds rows starts over. A reader woken for its own rows reads at once; a
/// quiet one falls back to about its poll rate.
#[derive(Debug)]
pub(crate) struct Wake {
    commits: Option<watch::Receiver<u64>>,
    first_gap: Duration,
    max_gap: Duration,
    /// Woken reads in a row that found nothing.
    wasted: u32,
    /// The last pause ended on a commit.
    woken: bool,
    read_at: tokio::time::Instant,
}

impl Wake {
    pub(crate) fn new(commits: Option<watch::Receiver<u64>>, first_gap: Duration, max_gap: Duration) -> Self {
        Self { commits, first_gap, max_gap, wasted: 0, woken: false, read_at: tokio::time::Instant::now() }
    }

    /// Before a read: the commits so far are seen, so a commit after this point wakes the [`Self::pause`]
    /// that follows even if the read missed its rows.
    pub(crate) fn reading(&mut self) {
        if let Some(c) = self.commits.as_mut() {
            c.borrow_and_update();
        }
        self.read_at = tokio::time::Instant::now();
    }

    /// After a read: whether it found anything.
    pub(crate) fn read(&mut self, found: bool) {
        if found {
            self.wasted = 0;
        } else if self.woken {
            self.wasted = self.wasted.saturating_add(1);
        }
        self.woken = false;
    }

    /// The least time between a read and the next woken one.
    pub(crate) fn gap(&self) -> Duration {
        match self.wasted {
            0 | 1 => Duration::ZERO,
            n => self.first_gap.saturating_mul(1 << (n - 2).min(16)).min(self.max_gap),
        }
    }

    /// Sleeps `pause`, or until `stop` changes, or, if `wake`, until the writer commits again (and the
    /// [`Self::gap`] since the last read has passed). A writer that has stopped sends no more signals:
    /// its receiver is dropped, and from then on the pauses run out.
    pub(crate) async fn pause(&mut self, pause: Duration, stop: &mut watch::Receiver<bool>, wake: bool) {
        let not_before = self.read_at + self.gap();
        let commits = &mut self.commits;
        let committed = async {
            match commits.as_mut() {
                Some(c) if wake => {
                    let open = c.changed().await.is_ok();
                    // Only when there is a gap to keep: a timer, even one already due, waits for the
                    // timer wheel's next tick (up to a millisecond).
                    if open && not_before > tokio::time::Instant::now() {
                        tokio::time::sleep_until(not_before).await;
                    }
                    open
                }
                _ => std::future::pending().await,
            }
        };
        let (woken, open) = tokio::select! {
            _ = tokio::time::sleep(pause) => (false, true),
            _ = stop.changed() => (false, true),
            open = committed => (open, open),
        };
        self.woken = woken;
        if !open {
            self.commits = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wasted_wakes_double_the_gap_up_to_the_poll_and_rows_start_over() {
        let mut w = Wake::new(None, Duration::from_millis(2), Duration::from_millis(50));
        assert_eq!(w.gap(), Duration::ZERO);
        // A read after a timer ran out finding nothing wastes no wake.
        w.read(false);
        assert_eq!(w.gap(), Duration::ZERO);
        let gaps: Vec<u64> = (0..8)
            .map(|_| {
                w.woken = true;
                w.read(false);
                w.gap().as_millis() as u64
            })
            .collect();
        assert_eq!(gaps, [0, 2, 4, 8, 16, 32, 50, 50]);
        w.woken = true;
        w.read(true);
        assert_eq!(w.gap(), Duration::ZERO);
    }
}
