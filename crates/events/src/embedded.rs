//! The embedded log: consumers read a SQLite outbox directly, as if it were the topic, with the same
//! semantics as the Kafka consumer: the handler's transaction (effect + inbox row) first, then the
//! consumer's position, stored durably in the consumer's own database; failures retried, then
//! dead-lettered. So `socialcard up` needs no broker and loses nothing across restarts.

use std::sync::Arc;
use std::time::Duration;

use sqlx::Row;
use tokio::sync::watch;

use crate::handler::handle_events;
use crate::{Applied, EventError, Handler, Metrics, Outbox};

/// A consumer's position and dead letters, in its own SQLite database (tables in
/// [`crate::inbox::SQLITE_SCHEMA`]).
#[derive(Clone, Debug)]
pub struct SqliteOffsets {
    pool: sqlx::SqlitePool,
}

impl SqliteOffsets {
    pub fn new(pool: sqlx::SqlitePool) -> Self {
        Self { pool }
    }

    pub async fn position(&self, group: &str, topic: &str) -> Result<i64, EventError> {
        let row = sqlx::query("SELECT next_seq FROM consumer_offsets WHERE consumer_group = $1 AND topic = $2")
            .bind(group)
            .bind(topic)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(r) => r.try_get("next_seq")?,
            None => 0,
        })
    }

    pub async fn commit(&self, group: &str, topic: &str, seq: i64) -> Result<(), EventError> {
        sqlx::query(
            "INSERT INTO consumer_offsets (consumer_group, topic, next_seq) VALUES ($1, $2, $3)
             ON CONFLICT (consumer_group, topic) DO UPDATE SET next_seq = excluded.next_seq",
        )
        .bind(group)
        .bind(topic)
        .bind(seq)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Keeps `event` as dead, once: an event dead-lettered again (its poll delivered anew after a failure
    /// before the position moved) keeps its first entry.
    async fn dead_letter(&self, group: &str, event: &crate::Envelope, error: &str) -> Result<(), EventError> {
        sqlx::query(
            "INSERT INTO dead_letters (consumer_group, topic, event_id, error, payload, at) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (consumer_group, event_id) DO NOTHING",
        )
            .bind(group)
            .bind(&event.topic)
            .bind(&event.id)
            .bind(error)
            .bind(&event.payload)
            .bind(time::OffsetDateTime::now_utc().unix_timestamp())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn dead_letter_count(&self, group: &str) -> Result<i64, EventError> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM dead_letters WHERE consumer_group = $1")
            .bind(group)
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?)
    }
}

#[derive(Clone)]
pub struct EmbeddedConsumer {
    pub group: String,
    pub topic: String,
    pub log: Arc<dyn Outbox>,
    pub offsets: SqliteOffsets,
    pub handler: Arc<dyn Handler>,
    pub max_attempts: u32,
    pub retry_backoff: Duration,
    /// The pause after the first empty poll.
    pub poll: Duration,
    /// The longest pause between polls of a log that stays empty (the pause doubles up to it).
    pub max_idle_poll: Duration,
    pub metrics: Option<Metrics>,
}

impl std::fmt::Debug for EmbeddedConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedConsumer").field("group", &self.group).field("topic", &self.topic).finish()
    }
}

impl EmbeddedConsumer {
    pub fn new(
        group: &str,
        topic: &str,
        log: Arc<dyn Outbox>,
        offsets: SqliteOffsets,
        handler: Arc<dyn Handler>,
    ) -> Self {
        Self {
            group: group.into(),
            topic: topic.into(),
            log,
            offsets,
            handler,
            max_attempts: 5,
            retry_backoff: Duration::from_millis(100),
            poll: Duration::from_millis(2),
            max_idle_poll: Duration::from_millis(50),
            metrics: None,
        }
    }

    /// Processes one batch; returns how many events it moved past.
    pub async fn poll_once(&self) -> Result<usize, EventError> {
        let position = self.offsets.position(&self.group, &self.topic).await?;
        let rows = self.log.read_after(&self.topic, position, 256).await?;
        let (mut applied, mut duplicates, mut dead) = (0, 0, 0);
        let count = rows.len();
        let last_seq = rows.last().map(|r| r.seq);
        let events: Vec<crate::Envelope> = rows.into_iter().map(|r| r.envelope).collect();
        let outcomes = handle_events(
            self.handler.as_ref(),
            &events,
            self.max_attempts,
            self.retry_backoff,
            "socialcard-embedded-log",
        )
        .await;
        for (event, outcome) in events.iter().zip(outcomes) {
            match outcome {
                Ok(Applied::Applied) => applied += 1,
                Ok(Applied::Duplicate) => duplicates += 1,
                Err(e) => {
                    dead += 1;
                    tracing::error!(group = %self.group, event_id = %event.id, error = %e, "dead-lettering event");
                    self.offsets.dead_letter(&self.group, event, &e.to_string()).await?;
                }
            }
        }
        // The position moves once per batch: a crash inside the batch redelivers its applied events,
        // which the handler's inbox turns into no-ops.
        let position = match last_seq {
            Some(last) => {
                self.offsets.commit(&self.group, &self.topic, last).await?;
                last
            }
            None => position,
        };
        if let Some(m) = &self.metrics {
            m.applied(&self.group, applied);
            m.duplicates(&self.group, duplicates);
            m.dead_lettered(&self.group, dead);
            m.consumer_lag(&self.group, &self.topic, self.log.last_seq(&self.topic).await? - position);
        }
        Ok(count)
    }

    pub async fn run(self, stop: watch::Receiver<bool>) {
        let group = self.group.clone();
        // Woken by the log's writer as it commits (when it has a group writer, as the services' logs do
        // in `up`), so an event is taken at once rather than at the next poll.
        let wake = self.log.commits();
        poll_until_stopped(self.poll, self.max_idle_poll, stop, wake, &group, || self.poll_once()).await;
    }
}

/// Runs `poll` until `stop`: again at once after it moved events, after a pause after it found none
/// (`first_pause`, doubling up to `max_pause` while the log stays empty) or sooner when `commits`
/// changes (the log's writer committed: [`Outbox::commits`]; see `relay::Wake` for commits that bring
/// nothing), and after 200 ms after a failure. Without the growing pause, the thirty-odd pollers of an
/// idle `up` kept a core busy.
pub async fn poll_until_stopped<F, Fut>(
    first_pause: Duration,
    max_pause: Duration,
    mut stop: watch::Receiver<bool>,
    commits: Option<watch::Receiver<u64>>,
    what: &str,
    mut poll: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<usize, EventError>>,
{
    let mut idle = first_pause;
    let mut wake = crate::relay::Wake::new(commits, first_pause, max_pause.max(first_pause));
    loop {
        if *stop.borrow() {
            return;
        }
        wake.reading();
        let polled = poll().await;
        wake.read(!matches!(polled, Ok(0)));
        let (pause, wakeable) = match polled {
            Ok(0) => {
                let pause = idle;
                idle = (idle * 2).min(max_pause.max(first_pause));
                (pause, true)
            }
            Ok(_) => {
                idle = first_pause;
                continue;
            }
            Err(e) => {
                tracing::warn!(poller = %what, error = %e, "polling the embedded log failed; retrying");
                (Duration::from_millis(200), false)
            }
        };
        wake.pause(pause, &mut stop, wakeable).await;
    }
}
