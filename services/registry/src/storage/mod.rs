//! The registry's storage behind one trait, with a SQLite (embedded default) and a PostgreSQL
//! implementation picked by URL. Writes happen only through [`RegistryStore::commit`]: one transaction
//! that records the idempotency key, the card and person changes (optimistically, by version), the
//! audit rows and the outbox rows, so a state change without its audit row or event cannot exist.

mod batch;
mod commit;
mod sql;

use std::sync::Arc;

use async_trait::async_trait;
use socialcard_domain::Card;
use time::OffsetDateTime;

pub use sql::{PgStore, SqliteStore};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PersonRecord {
    pub citizen_id: String,
    pub name: String,
    pub phone: String,
    pub registered_at: OffsetDateTime,
    pub version: i64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CardRecord {
    pub card: Card,
    /// Keyed digest of the social PIN (never the PIN).
    pub pin_digest: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditRecord {
    pub card_id: String,
    pub at: OffsetDateTime,
    pub action: String,
    pub channel: String,
    /// JSON of the domain `Actor`.
    pub actor: String,
    /// JSON of the domain `Documents`.
    pub documents: String,
    pub from_state: String,
    pub to_state: String,
    pub idempotency_key: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxRecord {
    pub event_id: String,
    pub topic: String,
    pub key: String,
    pub event_type: String,
    pub payload: Vec<u8>,
    pub occurred_at: OffsetDateTime,
    /// The producing service.
    pub source: String,
    /// W3C trace context of the change.
    pub traceparent: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdempotencyRecord {
    pub key: String,
    pub operation: String,
    pub request_hash: Vec<u8>,
    pub response: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PersonWrite {
    Insert(PersonRecord),
    /// Bumps the person's version: serialises changes to a holder's set of cards (R2).
    Touch {
        citizen_id: String,
        expected_version: i64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CardWrite {
    Insert(CardRecord),
    /// Writes `record` if the stored version still is `record.card.version - 1`.
    Update(CardRecord),
}

/// Everything one successful request writes, committed atomically.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Commit {
    pub idempotency: Option<IdempotencyRecord>,
    pub person: Option<PersonWrite>,
    pub cards: Vec<CardWrite>,
    pub audit: Vec<AuditRecord>,
    pub outbox: Vec<OutboxRecord>,
}

/// What the rows of one employer-batch chunk need to be decided: their holders, the holders' cards and
/// the rows' idempotency records (see [`crate::batch`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchSnapshot {
    pub persons: Vec<PersonRecord>,
    pub cards: Vec<CardRecord>,
    pub idempotency: Vec<IdempotencyRecord>,
}

/// One chunk of a batch import, committed in one transaction with multi-row statements: new cards, the
/// holders whose version is bumped (as [`PersonWrite::Touch`] does, checked against `expected_version`),
/// and the audit, outbox and idempotency rows of every accepted row.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchCommit {
    pub idempotency: Vec<IdempotencyRecord>,
    /// (citizen id, expected version), each holder once.
    pub touch_persons: Vec<(String, i64)>,
    pub cards: Vec<CardRecord>,
    pub audit: Vec<AuditRecord>,
    pub outbox: Vec<OutboxRecord>,
}

/// Row counts, for operations dashboards and for tests that prove a refusal wrote nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableCounts {
    pub persons: i64,
    pub cards: i64,
    pub audit: i64,
    pub outbox: i64,
    pub idempotency: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The idempotency key was taken by a concurrent request.
    #[error("idempotency key already recorded")]
    IdempotencyConflict,
    /// A card or person changed since it was read.
    #[error("concurrent change")]
    VersionConflict,
    /// A row with the same identity exists (person, card number).
    #[error("already exists: {0}")]
    Duplicate(&'static str),
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("stored data unreadable: {0}")]
    Corrupt(String),
}

#[async_trait]
pub trait RegistryStore: Send + Sync + std::fmt::Debug {
    async fn person(&self, citizen_id: &str) -> Result<Option<PersonRecord>, StoreError>;
    async fn card(&self, card_id: &str) -> Result<Option<CardRecord>, StoreError>;
    /// The card that bears `card_number`, in one read.
    async fn card_by_number(&self, card_number: &str) -> Result<Option<CardRecord>, StoreError>;
    async fn cards_of(&self, citizen_id: &str) -> Result<Vec<CardRecord>, StoreError>;
    async fn idempotency(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError>;
    async fn audit_trail(&self, card_id: &str) -> Result<Vec<(i64, AuditRecord)>, StoreError>;
    /// Audit entries with their chain links, ordered by card then sequence, after `after` (card, seq),
    /// for one card or all; for `VerifyAuditTrail`.
    async fn audit_chain(
        &self,
        _card_id: Option<&str>,
        _after: Option<(String, i64)>,
        _limit: i64,
    ) -> Result<Vec<crate::audit_chain::ChainedAudit>, StoreError> {
        Err(StoreError::Unavailable("this store keeps no audit chain".into()))
    }
    /// How many writes are worth having in flight at once: SQLite's group writer commits that many
    /// together; PostgreSQL runs them on a pool of connections. Consumers take events of this many cards
    /// at once.
    fn concurrent_writes(&self) -> usize {
        1
    }
    /// The next value of a named counter (card numbers); gaps are allowed, repeats never.
    async fn next_sequence(&self, name: &str) -> Result<i64, StoreError>;
    async fn commit(&self, commit: Commit) -> Result<(), StoreError>;
    async fn counts(&self) -> Result<TableCounts, StoreError>;

    /// Batch imports: the state a chunk of rows is decided on (one query per table, not per row).
    async fn batch_snapshot(&self, _citizen_ids: &[String], _keys: &[String]) -> Result<BatchSnapshot, StoreError> {
        Err(StoreError::Unavailable("this store does not import batches".into()))
    }
    /// Reserves `count` values of a named counter at once; returns the first.
    async fn reserve_sequence(&self, _name: &str, _count: i64) -> Result<i64, StoreError> {
        Err(StoreError::Unavailable("this store does not import batches".into()))
    }
    /// Commits a chunk atomically; `VersionConflict` or `IdempotencyConflict` when it raced another writer.
    async fn commit_batch(&self, _commit: BatchCommit) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("this store does not import batches".into()))
    }
    /// The key a holder's rows are stored under in place of the citizen ID (the SQL stores' keyed blind
    /// index); batch imports key their rows' idempotency by it and import in its order. A store that
    /// keeps no data key hashes the ID.
    fn holder_key(&self, citizen_id: &str) -> String {
        use sha2::{Digest, Sha256};
        hex::encode(Sha256::digest(citizen_id.as_bytes()))
    }
}

/// A connected store and the outbox of the same database.
#[derive(Clone, Debug)]
pub struct Connected {
    pub store: Arc<dyn RegistryStore>,
    pub outbox: Arc<dyn socialcard_events::Outbox>,
    /// True for SQLite: its outbox can serve as the embedded log (commit order is `seq` order).
    pub embedded_log: bool,
    pub offsets: Option<socialcard_events::embedded::SqliteOffsets>,
}

/// Opens the store a URL names (`sqlite://path?mode=rwc`, `sqlite::memory:`, `postgres://...`) and
/// runs its migrations.
/// Personal data is sealed under `data_key` (32 bytes) and citizen IDs are stored as its blind index.
pub async fn connect(url: &str, data_key: &[u8]) -> Result<Connected, StoreError> {
    let sealer = Arc::new(crate::seal::Sealer::new(data_key).map_err(|e| StoreError::Unavailable(e.to_string()))?);
    if url.starts_with("sqlite:") {
        let s = SqliteStore::connect(url, sealer).await?;
        Ok(Connected {
            outbox: s.outbox(),
            offsets: Some(socialcard_events::embedded::SqliteOffsets::new(s.writer().clone())),
            store: Arc::new(s),
            embedded_log: true,
        })
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let s = PgStore::connect(url, sealer).await?;
        Ok(Connected { outbox: s.outbox(), store: Arc::new(s), embedded_log: false, offsets: None })
    } else {
        Err(StoreError::Unavailable("the database URL must start with sqlite: or postgres://".into()))
    }
}
