//! One SQL text, two databases: the statements use `$n` placeholders and portable types (TEXT, 64-bit
//! integers, bytes), so the same code body serves SQLite and PostgreSQL; the macro below stamps it out
//! once per driver, and each driver has its own migrations.

use std::str::FromStr;
use std::time::Duration;

use std::sync::Arc;

use async_trait::async_trait;
use socialcard_events::Outbox;
use socialcard_events::outbox::{PgOutbox, SqliteOutbox};
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use time::OffsetDateTime;

use super::commit::{Combined, LAST_AUDIT_HASH, Param, Statement, VERSION_CONFLICT};
use super::{
    AuditRecord, BatchCommit, BatchSnapshot, CardRecord, Commit, IdempotencyRecord, PersonRecord, RegistryStore,
    StoreError, TableCounts,
};
use socialcard_events::direct::{Direct, Value};
use std::collections::HashMap;

use socialcard_events::unix_micros as micros;

pub(super) fn from_micros(us: i64) -> Result<OffsetDateTime, StoreError> {
    socialcard_events::from_unix_micros(us).ok_or_else(|| StoreError::Corrupt(format!("time {us} out of range")))
}

pub(super) fn db_error(e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::Database(d) if d.is_unique_violation() => StoreError::Duplicate("row"),
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) | sqlx::Error::ColumnNotFound(_) => {
            StoreError::Corrupt(e.to_string())
        }
        other => StoreError::Unavailable(other.to_string()),
    }
}

pub(super) fn seal_error(e: crate::seal::SealError) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

pub(super) fn card_from_json(data: &str, pin_digest: Vec<u8>) -> Result<CardRecord, StoreError> {
    let card = serde_json::from_str(data).map_err(|e| StoreError::Corrupt(format!("card data: {e}")))?;
    Ok(CardRecord { card, pin_digest })
}

pub(super) fn social_label(card: &socialcard_domain::Card) -> &'static str {
    card.social.as_str()
}

/// A row's columns by position, read through sqlx (either database) or on a direct read.
pub(super) trait Columns {
    fn text(&self, at: usize) -> Result<String, StoreError>;
    fn bytes(&self, at: usize) -> Result<Vec<u8>, StoreError>;
}

impl Columns for sqlx::sqlite::SqliteRow {
    fn text(&self, at: usize) -> Result<String, StoreError> {
        self.try_get(at).map_err(db_error)
    }

    fn bytes(&self, at: usize) -> Result<Vec<u8>, StoreError> {
        self.try_get(at).map_err(db_error)
    }
}

impl Columns for sqlx::postgres::PgRow {
    fn text(&self, at: usize) -> Result<String, StoreError> {
        self.try_get(at).map_err(db_error)
    }

    fn bytes(&self, at: usize) -> Result<Vec<u8>, StoreError> {
        self.try_get(at).map_err(db_error)
    }
}

impl Columns for socialcard_events::direct::Row<'_> {
    fn text(&self, at: usize) -> Result<String, StoreError> {
        if self.is_null(at) {
            return Err(StoreError::Corrupt(format!("column {at} is NULL")));
        }
        socialcard_events::direct::Row::text(self, at).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    fn bytes(&self, at: usize) -> Result<Vec<u8>, StoreError> {
        if self.is_null(at) {
            return Err(StoreError::Corrupt(format!("column {at} is NULL")));
        }
        Ok(self.blob(at))
    }
}

/// Where a store's lookups by key run without sqlx: SQLite's readers, or nowhere (`()`, PostgreSQL).
trait DirectReads {
    /// The row `sql` finds by `key`, decoded; `None` when there is no reader (read through the pool).
    fn read_row<T>(
        &self,
        sql: &'static str,
        key: &str,
        decode: &dyn Fn(&dyn Columns) -> Result<T, StoreError>,
    ) -> Option<Result<Option<T>, StoreError>>;
}

impl DirectReads for () {
    fn read_row<T>(
        &self,
        _: &'static str,
        _: &str,
        _: &dyn Fn(&dyn Columns) -> Result<T, StoreError>,
    ) -> Option<Result<Option<T>, StoreError>> {
        None
    }
}

/// A file database's readers; `None` for an in-memory one.
impl DirectReads for Option<Arc<socialcard_events::direct::Readers>> {
    fn read_row<T>(
        &self,
        sql: &'static str,
        key: &str,
        decode: &dyn Fn(&dyn Columns) -> Result<T, StoreError>,
    ) -> Option<Result<Option<T>, StoreError>> {
        let readers = self.as_ref()?;
        Some(
            readers
                .read(|d| d.query_row(sql, &[key.into()], |r| Ok(decode(r))))
                .map_err(|e| StoreError::Unavailable(e.to_string()))
                .and_then(Option::transpose),
        )
    }
}

/// A card row: `card_id, data, pin_digest`.
const CARD_BY_ID: &str = "SELECT card_id, data, pin_digest FROM cards WHERE card_id = $1";
const CARD_BY_NUMBER: &str = "SELECT card_id, data, pin_digest FROM cards WHERE card_number = $1";
const IDEMPOTENCY: &str =
    "SELECT idempotency_key, operation, request_hash, response FROM idempotency WHERE idempotency_key = $1";

macro_rules! sql_store {
    ($store:ident, $db:ty, $pool:ty, $group:ty, $readers:ty) => {
        #[derive(Clone, Debug)]
        pub struct $store {
            pool: $pool,
            /// Where writes go. SQLite: one connection, so writers queue here in order instead of
            /// sleeping in SQLite's busy handler; PostgreSQL: the same pool.
            writer: $pool,
            /// Personal data is sealed at rest and citizen IDs are stored as blind indexes.
            sealer: Arc<crate::seal::Sealer>,
            /// SQLite: commits `writer`'s queued commits in groups; PostgreSQL: `()`, never read.
            #[allow(dead_code)]
            group: $group,
            /// SQLite: the hot lookups by key (cards, idempotency rows) without a hand-off (a file
            /// database; an in-memory one reads through `pool`); PostgreSQL: `()`, reads through `pool`.
            readers: $readers,
        }

        impl $store {
            /// The pool writes go through (see the `writer` field).
            pub fn writer(&self) -> &$pool {
                &self.writer
            }

            pub fn pool(&self) -> &$pool {
                &self.pool
            }

            pub(super) fn sealer(&self) -> &crate::seal::Sealer {
                &self.sealer
            }

            /// The row `sql` finds by `key`, if any, decoded by `decode`: on a reader where the store has
            /// them, else through the pool.
            async fn read_row<T>(
                &self,
                sql: &'static str,
                key: &str,
                decode: impl Fn(&dyn Columns) -> Result<T, StoreError>,
            ) -> Result<Option<T>, StoreError> {
                if let Some(row) = self.readers.read_row(sql, key, &decode) {
                    return row;
                }
                sqlx::query(sql)
                    .bind(key)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(db_error)?
                    .map(|r| decode(&r))
                    .transpose()
            }

            /// A row of [`CARD_BY_ID`]'s columns.
            fn card_row(&self, r: &dyn Columns) -> Result<CardRecord, StoreError> {
                let id = r.text(0)?;
                let data = self.sealer.open(&r.text(1)?, &id).map_err(seal_error)?;
                card_from_json(&data, r.bytes(2)?)
            }

            /// A sealed text column, bound to the row named by `row_column`.
            fn open_text(
                &self,
                r: &<$db as sqlx::Database>::Row,
                column: &str,
                row_column: &str,
            ) -> Result<String, StoreError> {
                let row: String = r.try_get(row_column).map_err(db_error)?;
                self.sealer.open(&r.try_get::<String, _>(column).map_err(db_error)?, &row).map_err(seal_error)
            }
        }

        #[async_trait]
        impl RegistryStore for $store {
            fn concurrent_writes(&self) -> usize {
                Self::CONCURRENT_WRITES
            }

            async fn person(&self, citizen_id: &str) -> Result<Option<PersonRecord>, StoreError> {
                let index = self.sealer.blind_index(citizen_id);
                let row = sqlx::query(
                    "SELECT citizen_id, name, phone, registered_at, version FROM persons WHERE citizen_id = $1",
                )
                .bind(&index)
                .fetch_optional(&self.pool)
                .await
                .map_err(db_error)?;
                row.map(|r| {
                    Ok(PersonRecord {
                        citizen_id: citizen_id.to_string(),
                        name: self
                            .sealer
                            .open(&r.try_get::<String, _>("name").map_err(db_error)?, &index)
                            .map_err(seal_error)?,
                        phone: self
                            .sealer
                            .open(&r.try_get::<String, _>("phone").map_err(db_error)?, &index)
                            .map_err(seal_error)?,
                        registered_at: from_micros(r.try_get("registered_at").map_err(db_error)?)?,
                        version: r.try_get("version").map_err(db_error)?,
                    })
                })
                .transpose()
            }

            async fn card(&self, card_id: &str) -> Result<Option<CardRecord>, StoreError> {
                self.read_row(CARD_BY_ID, card_id, |r| self.card_row(r)).await
            }

            async fn card_by_number(&self, card_number: &str) -> Result<Option<CardRecord>, StoreError> {
                self.read_row(CARD_BY_NUMBER, card_number, |r| self.card_row(r)).await
            }

            async fn cards_of(&self, citizen_id: &str) -> Result<Vec<CardRecord>, StoreError> {
                let rows =
                    sqlx::query("SELECT card_id, data, pin_digest FROM cards WHERE citizen_id = $1 ORDER BY card_id")
                        .bind(self.sealer.blind_index(citizen_id))
                        .fetch_all(&self.pool)
                        .await
                        .map_err(db_error)?;
                rows.iter().map(|r| self.card_row(r as &dyn Columns)).collect()
            }

            async fn idempotency(&self, key: &str) -> Result<Option<IdempotencyRecord>, StoreError> {
                self.read_row(IDEMPOTENCY, key, |r| {
                    Ok(IdempotencyRecord {
                        key: r.text(0)?,
                        operation: r.text(1)?,
                        request_hash: r.bytes(2)?,
                        response: self.sealer.open_bytes(&r.bytes(3)?, key).map_err(seal_error)?,
                    })
                })
                .await
            }

            async fn audit_chain(
                &self,
                card_id: Option<&str>,
                after: Option<(String, i64)>,
                limit: i64,
            ) -> Result<Vec<crate::audit_chain::ChainedAudit>, StoreError> {
                let (after_card, after_seq) = after.unwrap_or_default();
                let rows = sqlx::query(
                    "SELECT seq, card_id, at, action, channel, actor, documents, from_state, to_state, idempotency_key,
                            prev_hash, hash
                     FROM audit_log
                     WHERE ($1 = '' OR card_id = $1) AND (card_id > $2 OR (card_id = $2 AND seq > $3))
                     ORDER BY card_id, seq LIMIT $4",
                )
                .bind(card_id.unwrap_or(""))
                .bind(after_card)
                .bind(after_seq)
                .bind(limit)
                .fetch_all(&self.pool)
                .await
                .map_err(db_error)?;
                rows.iter()
                    .map(|r| {
                        Ok(crate::audit_chain::ChainedAudit {
                            seq: r.try_get("seq").map_err(db_error)?,
                            record: AuditRecord {
                                card_id: r.try_get("card_id").map_err(db_error)?,
                                at: from_micros(r.try_get("at").map_err(db_error)?)?,
                                action: r.try_get("action").map_err(db_error)?,
                                channel: r.try_get("channel").map_err(db_error)?,
                                actor: self.open_text(r, "actor", "card_id")?,
                                documents: self.open_text(r, "documents", "card_id")?,
                                from_state: r.try_get("from_state").map_err(db_error)?,
                                to_state: r.try_get("to_state").map_err(db_error)?,
                                idempotency_key: r.try_get("idempotency_key").map_err(db_error)?,
                            },
                            prev_hash: r.try_get("prev_hash").map_err(db_error)?,
                            hash: r.try_get("hash").map_err(db_error)?,
                        })
                    })
                    .collect()
            }

            async fn audit_trail(&self, card_id: &str) -> Result<Vec<(i64, AuditRecord)>, StoreError> {
                let rows = sqlx::query(
                    "SELECT seq, card_id, at, action, channel, actor, documents, from_state, to_state, idempotency_key
                     FROM audit_log WHERE card_id = $1 ORDER BY seq",
                )
                .bind(card_id)
                .fetch_all(&self.pool)
                .await
                .map_err(db_error)?;
                rows.iter()
                    .map(|r| {
                        Ok((
                            r.try_get("seq").map_err(db_error)?,
                            AuditRecord {
                                card_id: r.try_get("card_id").map_err(db_error)?,
                                at: from_micros(r.try_get("at").map_err(db_error)?)?,
                                action: r.try_get("action").map_err(db_error)?,
                                channel: r.try_get("channel").map_err(db_error)?,
                                actor: self.open_text(r, "actor", "card_id")?,
                                documents: self.open_text(r, "documents", "card_id")?,
                                from_state: r.try_get("from_state").map_err(db_error)?,
                                to_state: r.try_get("to_state").map_err(db_error)?,
                                idempotency_key: r.try_get("idempotency_key").map_err(db_error)?,
                            },
                        ))
                    })
                    .collect()
            }

            async fn next_sequence(&self, name: &str) -> Result<i64, StoreError> {
                let row = sqlx::query("UPDATE sequences SET value = value + 1 WHERE name = $1 RETURNING value")
                    .bind(name)
                    .fetch_optional(&self.writer)
                    .await
                    .map_err(db_error)?
                    .ok_or_else(|| StoreError::Corrupt(format!("no sequence {name}")))?;
                row.try_get("value").map_err(db_error)
            }

            async fn commit(&self, commit: Commit) -> Result<(), StoreError> {
                self.commit_one(commit).await
            }

            async fn counts(&self) -> Result<TableCounts, StoreError> {
                let row = sqlx::query(
                    "SELECT (SELECT COUNT(*) FROM persons) AS persons, (SELECT COUNT(*) FROM cards) AS cards,
                            (SELECT COUNT(*) FROM audit_log) AS audit, (SELECT COUNT(*) FROM outbox) AS outbox,
                            (SELECT COUNT(*) FROM idempotency) AS idempotency",
                )
                .fetch_one(&self.pool)
                .await
                .map_err(db_error)?;
                Ok(TableCounts {
                    persons: row.try_get("persons").map_err(db_error)?,
                    cards: row.try_get("cards").map_err(db_error)?,
                    audit: row.try_get("audit").map_err(db_error)?,
                    outbox: row.try_get("outbox").map_err(db_error)?,
                    idempotency: row.try_get("idempotency").map_err(db_error)?,
                })
            }

            async fn batch_snapshot(
                &self,
                citizen_ids: &[String],
                keys: &[String],
            ) -> Result<BatchSnapshot, StoreError> {
                self.snapshot_rows(citizen_ids, keys).await
            }

            async fn reserve_sequence(&self, name: &str, count: i64) -> Result<i64, StoreError> {
                self.reserve(name, count).await
            }

            async fn commit_batch(&self, commit: BatchCommit) -> Result<(), StoreError> {
                self.commit_rows(commit).await
            }

            fn holder_key(&self, citizen_id: &str) -> String {
                self.sealer.blind_index(citizen_id)
            }
        }
    };
}

sql_store!(
    SqliteStore,
    sqlx::Sqlite,
    sqlx::SqlitePool,
    socialcard_events::group::GroupWriter,
    Option<Arc<socialcard_events::direct::Readers>>
);
sql_store!(PgStore, sqlx::Postgres, sqlx::PgPool, (), ());

impl SqliteStore {
    /// A group's size: concurrent writes share one commit.
    const CONCURRENT_WRITES: usize = socialcard_events::group::MAX_GROUP;

    /// An employer-batch chunk goes to the group writer too, one write of its own, its rows one prepared
    /// statement each, straight on the writer's connection. Sealing, hashing and encoding the rows took
    /// about 40 % of the writer's time, in its lock: they are done on a thread of their own instead, in
    /// parts, and the writer runs each part as it comes while the next is made.
    pub(super) async fn commit_rows(&self, commit: BatchCommit) -> Result<(), StoreError> {
        /// Statements per part: small enough that the writer starts at once, large enough that the
        /// hand-overs cost nothing beside the rows.
        const PART: usize = 256;
        enum Part {
            Statements(Vec<Statement>),
            /// Every statement was made and handed over: only after this may the writer commit.
            Done,
        }
        let sealer = self.sealer.clone();
        let now = micros(OffsetDateTime::now_utc());
        let (parts, made) = std::sync::mpsc::sync_channel::<Result<Part, StoreError>>(4);
        // A thread of its own, not the runtime's blocking pool: the writer waits for it holding the
        // write lock, so it must start whatever else is queued. The writer drops its end when it stops
        // early (a statement refused): the builder then stops too, and sends no `Done`.
        let builder = std::thread::Builder::new()
            .name("registry-chunk".into())
            .spawn(move || {
                let built =
                    commit.statements_in_parts(&sealer, now, PART, |p| parts.send(Ok(Part::Statements(p))).is_ok());
                match built {
                    Ok(true) => {
                        let _ = parts.send(Ok(Part::Done));
                    }
                    Ok(false) => {}
                    Err(e) => {
                        let _ = parts.send(Err(e));
                    }
                }
            })
            .map_err(|e| StoreError::Unavailable(format!("cannot start the chunk's statement builder: {e}")))?;
        let written = self
            .group
            .run(move |conn| {
                for part in made {
                    match part? {
                        Part::Statements(statements) => {
                            for s in &statements {
                                run_direct(conn, s)?;
                            }
                        }
                        Part::Done => return Ok(()),
                    }
                }
                // The builder went away (it panicked) before making every statement: nothing of the
                // chunk may commit.
                Err(StoreError::Unavailable("the chunk's statements were not all made".into()))
            })
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        // Done or gone by now (the writer has its `Done`, or dropped its end): this does not wait long.
        let built = tokio::task::spawn_blocking(move || builder.join()).await;
        if !matches!(built, Ok(Ok(()))) {
            return Err(StoreError::Unavailable("the chunk's statement builder failed".into()));
        }
        written
    }

    /// A commit goes to the group writer: it shares a transaction with the commits queued beside it,
    /// in a savepoint of its own, so a refused one rolls back alone (`socialcard_events::group`). Its
    /// statements run straight on the writer's connection (`socialcard_events::direct`).
    async fn commit_one(&self, commit: Commit) -> Result<(), StoreError> {
        let sealer = self.sealer.clone();
        self.group
            .run(move |conn| Self::commit_direct(conn, &sealer, &commit))
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
    }

    /// Writes one commit inside the group's transaction (in a savepoint of its own).
    fn commit_direct(conn: &mut Direct<'_>, sealer: &crate::seal::Sealer, commit: &Commit) -> Result<(), StoreError> {
        let now = micros(OffsetDateTime::now_utc());
        for s in commit.head_statements(sealer, now)? {
            run_direct(conn, &s)?;
        }
        let mut heads = HashMap::new();
        for card in commit.audited_cards() {
            let head = conn
                .query_row(LAST_AUDIT_HASH, &[card.into()], |r| Ok((!r.is_null(0)).then(|| r.blob(0))))
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            if let Some(Some(hash)) = head {
                heads.insert(card.to_string(), hash);
            }
        }
        for s in commit.tail_statements(sealer, heads)? {
            run_direct(conn, &s)?;
        }
        Ok(())
    }

    /// The outbox of this database: what the relay publishes and the embedded log serves.
    pub fn outbox(&self) -> Arc<dyn Outbox> {
        Arc::new(SqliteOutbox::new(self.pool.clone()).with_group(self.group.clone()))
    }

    /// Opens (creating if needed) a SQLite database in WAL mode and migrates it.
    pub async fn connect(url: &str, sealer: Arc<crate::seal::Sealer>) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(db_error)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            // Every commit synced before it is answered: an activation the registry acknowledged
            // survives a power cut (at NORMAL only the next checkpoint made it durable).
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        // An in-memory database lives in one connection.
        let memory = url.contains(":memory:");
        let pool = socialcard_events::sqlite_pool(if memory { 1 } else { 8 })
            .connect_with(options.clone())
            .await
            .map_err(db_error)?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await.map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let (writer, readers) = if memory {
            (pool.clone(), None)
        } else {
            let readers = socialcard_events::direct::Readers::for_cores(&options).await.map_err(db_error)?;
            (socialcard_events::sqlite_pool(1).connect_with(options).await.map_err(db_error)?, Some(Arc::new(readers)))
        };
        let group = socialcard_events::group::GroupWriter::spawn(writer.clone(), socialcard_events::group::MAX_GROUP);
        Ok(Self { pool, writer, sealer, group, readers })
    }
}

/// Runs one statement of a commit on the group writer's connection.
pub(super) fn run_direct(conn: &mut Direct<'_>, s: &Statement) -> Result<(), StoreError> {
    let params: Vec<Value<'_>> = s
        .params
        .iter()
        .map(|p| match p {
            Param::Int(v) => Value::Int(*v),
            Param::Text(t) => Value::Text(t),
            Param::OptText(t) => t.as_deref().into(),
            Param::Blob(b) => Value::Blob(b),
        })
        .collect();
    match conn.execute(s.sql, &params) {
        Ok(changed) => s.check(changed),
        Err(e) if e.is_unique_violation() => Err((s.expect.unique)()),
        Err(e) => Err(StoreError::Unavailable(e.to_string())),
    }
}

/// `q` with `params` bound in order.
fn bind_pg<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    params: &'q [Param],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    for p in params {
        q = match p {
            Param::Int(v) => q.bind(*v),
            Param::Text(t) => q.bind(t.as_str()),
            Param::OptText(t) => q.bind(t.as_deref()),
            Param::Blob(b) => q.bind(b.as_slice()),
        };
    }
    q
}

impl PgStore {
    /// Half the pool (16): the other half stays for the API's reads and writes.
    const CONCURRENT_WRITES: usize = 8;

    /// How long a pooled connection may sit idle before it is checked on the way out.
    const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

    /// Writes one commit on `conn`, inside a transaction the caller owns.
    async fn commit_in(
        conn: &mut sqlx::PgConnection,
        sealer: &crate::seal::Sealer,
        commit: &Commit,
    ) -> Result<(), StoreError> {
        let now = micros(OffsetDateTime::now_utc());
        for s in commit.head_statements(sealer, now)? {
            Self::run_statement(conn, &s).await?;
        }
        let heads = Self::read_heads(conn, commit).await?;
        for s in commit.tail_statements(sealer, heads)? {
            Self::run_statement(conn, &s).await?;
        }
        Ok(())
    }

    /// The last audit hash of each card `commit` audits (a card without one starts at genesis).
    async fn read_heads(
        conn: &mut sqlx::PgConnection,
        commit: &Commit,
    ) -> Result<HashMap<String, Vec<u8>>, StoreError> {
        let mut heads = HashMap::new();
        for card in commit.audited_cards() {
            let head: Option<Option<Vec<u8>>> =
                sqlx::query_scalar(LAST_AUDIT_HASH).bind(card).fetch_optional(&mut *conn).await.map_err(db_error)?;
            if let Some(Some(hash)) = head {
                heads.insert(card.to_string(), hash);
            }
        }
        Ok(heads)
    }

    async fn run_statement(conn: &mut sqlx::PgConnection, s: &Statement) -> Result<(), StoreError> {
        match bind_pg(sqlx::query(s.sql), &s.params).execute(&mut *conn).await {
            Ok(r) => s.check(r.rows_affected()),
            Err(sqlx::Error::Database(d)) if d.is_unique_violation() => Err((s.expect.unique)()),
            Err(e) => Err(db_error(e)),
        }
    }

    /// PostgreSQL admits concurrent writers and groups their WAL flushes itself: a commit is one
    /// statement (see [`Combined`]), so a caller waits one round trip for it instead of a
    /// transaction's seven (BEGIN, the writes, the audit heads' read, COMMIT). The heads are read
    /// first, outside it, where that is sound ([`Commit::heads_readable_first`]); otherwise the commit
    /// runs as a transaction that reads them in between.
    async fn commit_one(&self, commit: Commit) -> Result<(), StoreError> {
        if !commit.heads_readable_first() {
            return self.commit_in_transaction(commit).await;
        }
        let now = micros(OffsetDateTime::now_utc());
        let heads = Self::read_heads(&mut *self.pool.acquire().await.map_err(db_error)?, &commit).await?;
        let mut statements = commit.head_statements(&self.sealer, now)?;
        statements.extend(commit.tail_statements(&self.sealer, heads)?);
        let combined = Combined::new(statements);
        let q = bind_pg(sqlx::query(sqlx::AssertSqlSafe(combined.sql.as_str())), &combined.params);
        match q.execute(&self.writer).await {
            Ok(_) => Ok(()),
            Err(sqlx::Error::Database(d)) if d.code().as_deref() == Some(VERSION_CONFLICT) => {
                Err(StoreError::VersionConflict)
            }
            Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
                combined.unique_violation(d.table()).map_or_else(|| Err(db_error(sqlx::Error::Database(d))), Err)
            }
            Err(e) => Err(db_error(e)),
        }
    }

    /// The commit as a transaction: the audit heads read after the cards' writes, under their locks.
    async fn commit_in_transaction(&self, commit: Commit) -> Result<(), StoreError> {
        let mut tx = self.writer.begin().await.map_err(db_error)?;
        match Self::commit_in(&mut tx, &self.sealer, &commit).await {
            Ok(()) => tx.commit().await.map_err(db_error),
            Err(e) => {
                // Dropping the transaction would roll back too; say so explicitly.
                let _ = tx.rollback().await;
                Err(e)
            }
        }
    }

    pub fn outbox(&self) -> Arc<dyn Outbox> {
        Arc::new(PgOutbox::new(self.pool.clone()))
    }

    pub async fn connect(url: &str, sealer: Arc<crate::seal::Sealer>) -> Result<Self, StoreError> {
        let options = PgConnectOptions::from_str(url).map_err(db_error)?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            // sqlx pings every connection it hands out, a round trip on the caller's path before
            // each query, though it pinged it already on its way back into the pool (off that
            // path). A connection idle for under a second is taken as it is (one broken since fails
            // its query with UNAVAILABLE and is closed; writes are retried under their key); one
            // idle longer is pinged again.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= Self::PING_AFTER_IDLE {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options)
            .await
            .map_err(db_error)?;
        sqlx::migrate!("./migrations/postgres").run(&pool).await.map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(Self { writer: pool.clone(), pool, sealer, group: (), readers: () })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The database restarted while the registry was quiet: every pooled connection is dead. Each is
    /// found out on its way out of the pool (it sat idle over a second), closed and replaced, so the
    /// next read answers instead of failing.
    #[tokio::test]
    async fn connections_broken_while_idle_are_replaced() {
        let Ok(base) = std::env::var("SOCIALCARD_TEST_DATABASE_URL") else {
            eprintln!("skipped: set SOCIALCARD_TEST_DATABASE_URL to run against PostgreSQL");
            return;
        };
        let tag = format!("t_{}", uuid::Uuid::new_v4().simple());
        let admin = sqlx::PgPool::connect(&base).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {tag}"))).execute(&admin).await.unwrap();
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}application_name={tag}&options=-c%20search_path%3D{tag}");
        let store = PgStore::connect(&url, Arc::new(crate::seal::Sealer::new(&[7; 32]).unwrap())).await.unwrap();
        assert!(store.idempotency("before").await.unwrap().is_none());
        // The read's connection back in the pool (sqlx checks it on the way, in a task of its own):
        // terminated before that check, it would be replaced there and prove nothing here.
        let back = async {
            while store.pool().num_idle() < store.pool().size() as usize {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), back).await.expect("connections back in the pool");
        let killed: Vec<bool> =
            sqlx::query_scalar("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1")
                .bind(&tag)
                .fetch_all(&admin)
                .await
                .unwrap();
        assert!(!killed.is_empty() && killed.iter().all(|k| *k), "the pool's connections terminated: {killed:?}");
        tokio::time::sleep(PgStore::PING_AFTER_IDLE + Duration::from_millis(100)).await;
        assert!(store.idempotency("after").await.expect("a fresh connection answers").is_none());
        store.pool().close().await;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {tag} CASCADE"))).execute(&admin).await.unwrap();
    }

    /// An acknowledged write survives a power cut: the registry's writer syncs the WAL at every commit
    /// (FULL), as postal's and the adapters' do. At NORMAL a commit was durable only after the next
    /// checkpoint, and that checkpoint's sync of everything since was the activation's worst stall.
    #[tokio::test]
    async fn sqlite_writer_syncs_every_commit() {
        let dir = std::env::temp_dir().join(format!("socialcard-registry-sync-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}", dir.join("registry.db").display());
        let store = SqliteStore::connect(&url, Arc::new(crate::seal::Sealer::new(&[7; 32]).unwrap())).await.unwrap();
        let level: i64 = sqlx::query_scalar("PRAGMA synchronous").fetch_one(store.writer()).await.unwrap();
        assert_eq!(level, 2, "the writer's synchronous level (2 = FULL)");
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
