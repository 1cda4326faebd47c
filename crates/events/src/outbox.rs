//! The outbox: rows a service writes in the same transaction as its state change. The relay publishes
//! them and marks them published only after the broker acknowledged them; the embedded log serves
//! consumers straight from them.
//!
//! Table `outbox` (each service's own migrations create it): `seq` (ascending), `event_id`, `topic`,
//! `event_key`, `event_type`, `source`, `traceparent`, `payload`, `occurred_at` (unix µs), `bucket`
//! ([`crate::bucket_of`] of the key) and `published_at` (NULL until published).

use std::sync::Arc;

use async_trait::async_trait;
use sqlx::Row;
use time::OffsetDateTime;

use crate::{Envelope, EventError, OUTBOX_BUCKETS};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxRow {
    pub seq: i64,
    pub envelope: Envelope,
}

/// Where the relay sends a batch; returns only when every row is acknowledged.
#[async_trait]
pub trait Publish: Send + Sync {
    async fn publish(&self, rows: &[OutboxRow]) -> Result<(), EventError>;
}

#[async_trait]
pub trait Outbox: Send + Sync + std::fmt::Debug {
    /// Publishes the oldest unpublished rows of one ordering bucket that no other relay holds, and
    /// marks them published if `publish` succeeded. Returns how many rows were published.
    async fn relay_once(&self, limit: i64, publish: &dyn Publish) -> Result<usize, EventError>;
    /// Rows of `topic` after `after_seq`, oldest first (the embedded log's read).
    async fn read_after(&self, topic: &str, after_seq: i64, limit: i64) -> Result<Vec<OutboxRow>, EventError>;
    /// Rows not yet published.
    async fn backlog(&self) -> Result<i64, EventError>;
    /// The newest `seq` of `topic` (0 when empty): the log end, for consumer lag.
    async fn last_seq(&self, topic: &str) -> Result<i64, EventError>;
    /// Changes when rows may have been added (the database's group writer committed), so the relay and
    /// the embedded log's consumers wake at once rather than at their next poll. `None`: no such
    /// signal; they poll.
    fn commits(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

const COLUMNS: &str = "seq, event_id, topic, event_key, event_type, source, traceparent, payload, occurred_at";

fn now_micros() -> i64 {
    crate::unix_micros(OffsetDateTime::now_utc())
}

fn row_of<R: Row>(r: &R) -> Result<OutboxRow, EventError>
where
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Vec<u8>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
{
    let micros: i64 = r.try_get("occurred_at")?;
    Ok(OutboxRow {
        seq: r.try_get("seq")?,
        envelope: Envelope {
            id: r.try_get("event_id")?,
            event_type: r.try_get("event_type")?,
            source: r.try_get("source")?,
            subject: r.try_get("event_key")?,
            time: crate::from_unix_micros(micros)
                .ok_or_else(|| EventError::Malformed(format!("occurred_at {micros} out of range")))?,
            traceparent: r.try_get("traceparent")?,
            topic: r.try_get("topic")?,
            payload: r.try_get("payload")?,
        },
    })
}

/// The reads both databases answer with the same SQL.
macro_rules! outbox_reads {
    ($outbox:ty) => {
        impl $outbox {
            async fn read_rows(&self, topic: &str, after_seq: i64, limit: i64) -> Result<Vec<OutboxRow>, EventError> {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "SELECT {COLUMNS} FROM outbox WHERE topic = $1 AND seq > $2 ORDER BY seq LIMIT $3"
                )))
                .bind(topic)
                .bind(after_seq)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(row_of)
                .collect()
            }

            async fn count_unpublished(&self) -> Result<i64, EventError> {
                Ok(sqlx::query("SELECT COUNT(*) AS n FROM outbox WHERE published_at IS NULL")
                    .fetch_one(&self.pool)
                    .await?
                    .try_get("n")?)
            }

            async fn log_end(&self, topic: &str) -> Result<i64, EventError> {
                Ok(sqlx::query("SELECT COALESCE(MAX(seq), 0) AS n FROM outbox WHERE topic = $1")
                    .bind(topic)
                    .fetch_one(&self.pool)
                    .await?
                    .try_get("n")?)
            }
        }
    };
}

outbox_reads!(SqliteOutbox);
outbox_reads!(PgOutbox);

/// The outbox of a SQLite database. SQLite serialises writers, so `seq` order is commit order and a
/// single relay per database keeps every key's order.
#[derive(Clone, Debug)]
pub struct SqliteOutbox {
    pool: sqlx::SqlitePool,
    relay_lock: Arc<tokio::sync::Mutex<()>>,
    /// The database's group writer, if it has one: published rows are marked through it.
    group: Option<crate::group::GroupWriter>,
}

impl SqliteOutbox {
    pub fn new(pool: sqlx::SqlitePool) -> Self {
        Self { pool, relay_lock: Arc::new(tokio::sync::Mutex::new(())), group: None }
    }

    /// Marks published rows through the database's group writer: the mark joins the next group's
    /// transaction rather than wait in SQLite's busy handler for the writer to let go of the lock (which
    /// it holds for runs of groups while the service is busy, and the busy handler's sleeps grow to tens
    /// of milliseconds), and shares that group's sync. The relay also wakes on the writer's commits
    /// ([`Outbox::commits`]) rather than only polling.
    pub fn with_group(mut self, group: crate::group::GroupWriter) -> Self {
        self.group = Some(group);
        self
    }
}

fn in_list(first: usize, n: usize) -> String {
    (first..first + n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

#[async_trait]
impl Outbox for SqliteOutbox {
    async fn relay_once(&self, limit: i64, publish: &dyn Publish) -> Result<usize, EventError> {
        let _one_relay = self.relay_lock.lock().await;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM outbox WHERE published_at IS NULL ORDER BY seq LIMIT $1"
        )))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(row_of)
        .collect::<Result<Vec<_>, _>>()?;
        if rows.is_empty() {
            return Ok(0);
        }
        publish.publish(&rows).await?;
        let sql = format!("UPDATE outbox SET published_at = $1 WHERE seq IN ({})", in_list(2, rows.len()));
        let now = now_micros();
        if let Some(group) = &self.group {
            let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
            group
                .run(move |conn| {
                    let params: Vec<crate::direct::Value<'_>> =
                        std::iter::once(now.into()).chain(seqs.iter().map(|s| (*s).into())).collect();
                    conn.execute(&sql, &params)
                })
                .await
                .map_err(|e| EventError::Database(e.to_string()))?
                .map_err(|e| EventError::Database(e.to_string()))?;
            return Ok(rows.len());
        }
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now);
        for r in &rows {
            q = q.bind(r.seq);
        }
        q.execute(&self.pool).await?;
        Ok(rows.len())
    }

    async fn read_after(&self, topic: &str, after_seq: i64, limit: i64) -> Result<Vec<OutboxRow>, EventError> {
        self.read_rows(topic, after_seq, limit).await
    }

    async fn backlog(&self) -> Result<i64, EventError> {
        self.count_unpublished().await
    }

    async fn last_seq(&self, topic: &str) -> Result<i64, EventError> {
        self.log_end(topic).await
    }

    fn commits(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.group.as_ref().map(crate::group::GroupWriter::commits)
    }
}

/// The outbox of a PostgreSQL database, safe for several relays at once: a relay takes a bucket with
/// a transaction-scoped advisory lock and its rows `FOR UPDATE SKIP LOCKED`, publishes, marks, commits.
/// A card's events share a bucket, so they are published by one relay at a time, in `seq` order.
#[derive(Clone, Debug)]
pub struct PgOutbox {
    pool: sqlx::PgPool,
    next_bucket: Arc<std::sync::atomic::AtomicI32>,
}

/// The advisory-lock namespace of outbox buckets.
const LOCK_SPACE: i32 = 0x5c0c;

impl PgOutbox {
    pub fn new(pool: sqlx::PgPool) -> Self {
        Self { pool, next_bucket: Arc::new(std::sync::atomic::AtomicI32::new(0)) }
    }
}

#[async_trait]
impl Outbox for PgOutbox {
    async fn relay_once(&self, limit: i64, publish: &dyn Publish) -> Result<usize, EventError> {
        // Start where the last call stopped, so no bucket starves behind a busy one.
        let start = self.next_bucket.fetch_add(1, std::sync::atomic::Ordering::Relaxed).rem_euclid(OUTBOX_BUCKETS);
        for i in 0..OUTBOX_BUCKETS {
            let bucket = (start + i) % OUTBOX_BUCKETS;
            let mut tx = self.pool.begin().await?;
            let locked: bool = sqlx::query("SELECT pg_try_advisory_xact_lock($1, $2) AS locked")
                .bind(LOCK_SPACE)
                .bind(bucket)
                .fetch_one(&mut *tx)
                .await?
                .try_get("locked")?;
            if !locked {
                continue;
            }
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM outbox WHERE published_at IS NULL AND bucket = $1 ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED"
            )))
            .bind(bucket)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(row_of)
            .collect::<Result<Vec<_>, _>>()?;
            if rows.is_empty() {
                continue;
            }
            publish.publish(&rows).await?;
            let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
            sqlx::query("UPDATE outbox SET published_at = $1 WHERE seq = ANY($2)")
                .bind(now_micros())
                .bind(&seqs)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            self.next_bucket.store(bucket, std::sync::atomic::Ordering::Relaxed);
            return Ok(rows.len());
        }
        Ok(0)
    }

    async fn read_after(&self, topic: &str, after_seq: i64, limit: i64) -> Result<Vec<OutboxRow>, EventError> {
        self.read_rows(topic, after_seq, limit).await
    }

    async fn backlog(&self) -> Result<i64, EventError> {
        self.count_unpublished().await
    }

    async fn last_seq(&self, topic: &str) -> Result<i64, EventError> {
        self.log_end(topic).await
    }
}
