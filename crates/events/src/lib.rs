//! The event backbone every socialcard service shares.
//!
//! - [`Envelope`]: one event as it travels: CloudEvents-style attributes (id, type, source, subject,
//!   time) and the W3C `traceparent`, carried as Kafka headers, with a protobuf payload as the value.
//! - [`outbox`]: the outbox table a service writes in the same transaction as its state change, and
//!   the [`relay`] that publishes it in order, marking rows only after the broker acknowledged them.
//! - [`kafka`]: the rdkafka producer (idempotent, `acks=all`), topic creation, and the consumer loop
//!   (manual offset commits after the handler's transaction, retries, dead letters).
//! - [`embedded`]: the same consumer semantics served straight from a SQLite outbox, so the embedded
//!   default needs no broker.
//! - [`inbox`]: the "seen this event id" table that turns at-least-once delivery into exactly-once effect.
//! - [`group`]: group commit of the writes queued on one SQLite database.
//!
//! It must never rely on Kafka transactions (librdkafka lacks KIP-890 and the test brokers lack them):
//! exactly-once effect comes from the outbox on the way in and the inbox on the way out.

pub mod direct;
pub mod embedded;
pub mod envelope;
pub mod group;
pub mod handler;
pub mod inbox;
pub mod kafka;
pub mod metrics;
pub mod outbox;
pub mod relay;

pub use envelope::Envelope;
pub use handler::{Applied, Handler, HandlerError};
pub use metrics::Metrics;
pub use outbox::{Outbox, OutboxRow, Publish};

/// Topics per aggregate, versioned; every event is keyed by card id.
pub mod topics {
    pub const CARD: &str = "socialcard.card.v1";
    pub const FINANCIAL: &str = "socialcard.financial.v1";
    pub const SHIPMENT: &str = "socialcard.shipment.v1";
    pub const LOSS: &str = "socialcard.loss.v1";
    pub const ALL: [&str; 4] = [CARD, FINANCIAL, SHIPMENT, LOSS];

    /// Where a consumer puts what it could not process.
    pub fn dead_letter(topic: &str) -> String {
        format!("{topic}.dlt")
    }
}

/// Times in every outbox, inbox and service table are unix microseconds (UTC), portable across SQLite
/// and PostgreSQL. This is the one encoding.
/// Pool options for an SQLite database of `max` connections. SQLite runs in this process, so the pool
/// does not ping a connection before lending it: that ping was a second round trip to the connection's
/// worker thread for every query, and the bulk of an idle `up`'s CPU.
pub fn sqlite_pool(max: u32) -> sqlx::sqlite::SqlitePoolOptions {
    sqlx::sqlite::SqlitePoolOptions::new().max_connections(max).test_before_acquire(false)
}

pub fn unix_micros(t: time::OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000).unwrap_or(i64::MAX)
}

/// The inverse of [`unix_micros`]; `None` when the value is out of `OffsetDateTime`'s range.
pub fn from_unix_micros(us: i64) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1_000).ok()
}

/// Ordering buckets of the outbox: all events of one key share a bucket, and one relay at a time
/// publishes a bucket, so a card's events leave in the order they were written.
pub const OUTBOX_BUCKETS: i32 = 16;

/// The bucket of a key (FNV-1a, stable across processes and releases).
pub fn bucket_of(key: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % OUTBOX_BUCKETS.unsigned_abs()) as i32
}

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("database: {0}")]
    Database(String),
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("malformed event: {0}")]
    Malformed(String),
}

impl From<sqlx::Error> for EventError {
    fn from(e: sqlx::Error) -> Self {
        EventError::Database(e.to_string())
    }
}

impl From<rdkafka::error::KafkaError> for EventError {
    fn from(e: rdkafka::error::KafkaError) -> Self {
        EventError::Kafka(e.to_string())
    }
}
