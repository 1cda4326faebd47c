//! `batch`: an employer batch of 1,000,000 applications imported, approved and sent into production
//! through the registry's batch import (`socialcard_registry::batch`: every row through the domain
//! rules, three audit rows and three card events per card, the holder's version bumped, card numbers
//! reserved per chunk, one transaction per chunk of multi-row INSERTs). One row in a thousand names a
//! bank outside the 11 and must be refused. Target: at most 60 s.
//!
//! Baseline, same run, same database kind: the same rows (cards, audit, outbox, idempotency, the
//! holders' version bump) as raw multi-row INSERTs through sqlx in transactions of the same size, with
//! no rules, no snapshot reads and no serialisation (the rows are made before the clock starts).

use std::sync::Arc;
use std::time::{Duration, Instant};

use socialcard_domain::card::HolderStatus;
use socialcard_domain::photo::PhotoSource;
use socialcard_domain::{BankDirectory, CardType, CityPolicy};
use socialcard_events::embedded::{EmbeddedConsumer, SqliteOffsets};
use socialcard_loss_coordinator::events::CardEvents;
use socialcard_loss_coordinator::{Coordinator, CoordinatorConfig};
use socialcard_ops::feed::OpsEvents;
use socialcard_ops::store::OpsStore;
use socialcard_registry::RegistryConfig;
use socialcard_registry::batch::{DEFAULT_CHUNK, EmployerBatch, EmployerBatchRow, RowOutcome};
use socialcard_registry::fixtures::adult_citizen_id;
use socialcard_registry::seal::Sealer;
use socialcard_server::SystemClock;
use sqlx::QueryBuilder;

use crate::scratch::Dir;
use crate::stats::Table;

/// A database with the registry's schema (migrated by the registry itself) and a pool to reach it.
#[derive(Clone)]
pub(crate) enum Db {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

macro_rules! on_db {
    ($db:expr, $pool:ident, $body:expr) => {
        match $db {
            Db::Sqlite($pool) => $body,
            Db::Postgres($pool) => $body,
        }
    };
}

/// The registry's sealer under the bench's configuration: rows written directly are stored as the
/// registry stores them (citizen IDs as their blind index, personal data sealed).
pub(crate) fn sealer(config: &RegistryConfig) -> anyhow::Result<Sealer> {
    Sealer::new(&config.data_key).map_err(|e| anyhow::anyhow!("{e}"))
}

/// `n` holders (citizen IDs `offset..offset + n`) as (blind index, number), in blind-index order: the
/// persons table's key. Inserted in that order, rows append to the B-tree instead of landing on random
/// pages; at ten million holders random order wrote each page again for every few rows it gained.
pub(crate) fn holders_in_key_order(sealer: &Sealer, n: usize, offset: u64) -> Vec<(String, u64)> {
    let mut holders: Vec<(String, u64)> =
        (offset..offset + n as u64).map(|i| (sealer.blind_index(&adult_citizen_id(i)), i)).collect();
    holders.sort_unstable();
    holders
}

/// Registers `holders` (from [`holders_in_key_order`]) directly (the list's employees are insured
/// persons already), sealed as the registry stores them.
pub(crate) async fn load_persons(db: &Db, sealer: &Sealer, holders: &[(String, u64)]) -> anyhow::Result<()> {
    let now = socialcard_events::unix_micros(time::OffsetDateTime::now_utc());
    for chunk in holders.chunks(5_000) {
        let mut rows = Vec::with_capacity(chunk.len());
        for (index, _) in chunk {
            let name = sealer.seal("Employee", index).map_err(|e| anyhow::anyhow!("{e}"))?;
            let phone = sealer.seal("13800000000", index).map_err(|e| anyhow::anyhow!("{e}"))?;
            rows.push((index, name, phone));
        }
        on_db!(db, pool, {
            let mut tx = pool.begin().await?;
            let mut q = QueryBuilder::new("INSERT INTO persons (citizen_id, name, phone, registered_at, version) ");
            q.push_values(&rows, |mut b, (id, name, phone)| {
                b.push_bind(*id).push_bind(name).push_bind(phone).push_bind(now).push_bind(1i64);
            });
            q.build().execute(&mut *tx).await?;
            tx.commit().await?;
        });
    }
    Ok(())
}

fn rows(n: usize) -> Vec<EmployerBatchRow> {
    (0..n)
        .map(|i| EmployerBatchRow {
            citizen_id: adult_citizen_id(i as u64),
            card_type: CardType::Adult,
            holder_status: HolderStatus::Employed,
            // One row in a thousand names a bank outside the 11.
            bank_code: if i % 1_000 == 999 { "nobank".into() } else { "icbc".into() },
            payroll_bank_codes: vec!["icbc".into()],
            photo_source: PhotoSource::IdCard,
            backup_point_id: "point-1".into(),
            delivery: None,
        })
        .collect()
}

/// What the import wrote for one card, taken from the registry's own tables to size the baseline's rows.
struct Shapes {
    card_data: String,
    pin_digest: Vec<u8>,
    audit_actor: String,
    payload: Vec<u8>,
}

async fn shapes(db: &Db) -> anyhow::Result<Shapes> {
    use sqlx::Row;
    let (card_data, pin_digest, audit_actor, payload) = on_db!(db, pool, {
        let c = sqlx::query("SELECT data, pin_digest FROM cards LIMIT 1").fetch_one(pool).await?;
        let a = sqlx::query("SELECT actor FROM audit_log LIMIT 1").fetch_one(pool).await?;
        let o = sqlx::query("SELECT payload FROM outbox ORDER BY seq DESC LIMIT 1").fetch_one(pool).await?;
        (c.try_get("data")?, c.try_get("pin_digest")?, a.try_get("actor")?, o.try_get("payload")?)
    });
    Ok(Shapes { card_data, pin_digest, audit_actor, payload })
}

/// The baseline: the same rows as raw multi-row INSERTs, one transaction per chunk. Returns the time
/// spent in the database only.
async fn baseline(db: &Db, sealer: &Sealer, n: usize, chunk: usize, s: &Shapes) -> anyhow::Result<Duration> {
    let mut spent = Duration::ZERO;
    let now = socialcard_events::unix_micros(time::OffsetDateTime::now_utc());
    // In the holders' key order, as the import writes them.
    let mut all: Vec<(String, usize)> = (0..n).map(|i| (sealer.blind_index(&adult_citizen_id(i as u64)), i)).collect();
    all.sort_unstable();
    for start in (0..n).step_by(chunk) {
        let part = &all[start..n.min(start + chunk)];
        // Card ids and numbers in the order written (the registry's are time-ordered UUIDs).
        let idx: Vec<usize> = (start..start + part.len()).collect();
        let ids: Vec<String> = part.iter().map(|(id, _)| id.clone()).collect();
        let cards: Vec<String> = idx.iter().map(|&i| format!("00000000-0000-7000-8000-{i:012}")).collect();
        let numbers: Vec<String> = idx.iter().map(|&i| format!("A{i:08}")).collect();
        let keys: Vec<String> = ids.iter().map(|id| format!("employer-batch/base/{id}")).collect();
        let events: Vec<String> = (0..idx.len() * 3).map(|j| format!("{start}-{j}")).collect();
        let t = Instant::now();
        on_db!(db, pool, {
            let mut tx = pool.begin().await?;
            for k in keys.chunks(30_000 / 5) {
                let mut q = QueryBuilder::new(
                    "INSERT INTO idempotency (idempotency_key, operation, request_hash, response, created_at) ",
                );
                q.push_values(k, |mut b, k| {
                    b.push_bind(k)
                        .push_bind("ImportEmployerBatchRow")
                        .push_bind(&s.pin_digest)
                        .push_bind(&s.pin_digest);
                    b.push_bind(now);
                });
                q.build().execute(&mut *tx).await?;
            }
            let mut q = QueryBuilder::new("UPDATE persons SET version = version + 1 WHERE citizen_id IN ");
            q.push_tuples(&ids, |mut b, id| {
                b.push_bind(id);
            });
            q.push(" RETURNING citizen_id, version");
            q.build().fetch_all(&mut *tx).await?;
            let rows: Vec<usize> = (0..idx.len()).collect();
            for r in rows.chunks(30_000 / 11) {
                let mut q = QueryBuilder::new(
                    "INSERT INTO cards (card_id, citizen_id, card_number, bank_code, physical_state, social_state, financial_state, version, data, pin_digest, updated_at) ",
                );
                q.push_values(r, |mut b, &j| {
                    b.push_bind(&cards[j]).push_bind(&ids[j]).push_bind(&numbers[j]).push_bind("icbc");
                    b.push_bind("in_production").push_bind("not_activated").push_bind("not_activated");
                    b.push_bind(3i64).push_bind(&s.card_data).push_bind(&s.pin_digest).push_bind(now);
                });
                q.build().execute(&mut *tx).await?;
            }
            let rows: Vec<usize> = (0..idx.len() * 3).collect();
            for r in rows.chunks(30_000 / 11) {
                let mut q = QueryBuilder::new(
                    "INSERT INTO audit_log (card_id, at, action, channel, actor, documents, from_state, to_state, idempotency_key, prev_hash, hash) ",
                );
                q.push_values(r, |mut b, &j| {
                    b.push_bind(&cards[j / 3]).push_bind(now).push_bind("approve").push_bind("bureau_window");
                    b.push_bind(&s.audit_actor).push_bind("{}");
                    b.push_bind("physical=applied social=not_activated financial=not_activated");
                    b.push_bind("physical=approved social=not_activated financial=not_activated");
                    b.push_bind(&keys[j / 3]).push_bind(&s.pin_digest).push_bind(&s.pin_digest);
                });
                q.build().execute(&mut *tx).await?;
            }
            for r in rows.chunks(30_000 / 9) {
                let mut q = QueryBuilder::new(
                    "INSERT INTO outbox (event_id, topic, event_key, event_type, payload, occurred_at, bucket, source, traceparent) ",
                );
                q.push_values(r, |mut b, &j| {
                    b.push_bind(&events[j]).push_bind("socialcard.card.v1").push_bind(&cards[j / 3]);
                    b.push_bind("socialcard.card.v1.ApplicationApproved").push_bind(&s.payload).push_bind(now);
                    b.push_bind(socialcard_events::bucket_of(&cards[j / 3])).push_bind("registry");
                    b.push_bind(None::<String>);
                });
                q.build().execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
        spent += t.elapsed();
    }
    Ok(spent)
}

/// A fresh PostgreSQL schema; returns a URL whose connections use it.
pub(crate) async fn pg_schema(base: &str, created: &mut Vec<String>) -> anyhow::Result<String> {
    let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(base).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&admin).await?;
    admin.close().await;
    created.push(schema.clone());
    let sep = if base.contains('?') { '&' } else { '?' };
    Ok(format!("{base}{sep}options=-c%20search_path%3D{schema}"))
}

pub(crate) async fn drop_schemas(base: &str, schemas: &[String]) -> anyhow::Result<()> {
    let admin = sqlx::PgPool::connect(base).await?;
    for schema in schemas {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&admin).await?;
    }
    admin.close().await;
    Ok(())
}

/// A fresh database for the registry's schema: a SQLite file under `dir`, or a PostgreSQL schema.
async fn database(
    postgres: Option<&str>,
    dir: &std::path::Path,
    name: &str,
    schemas: &mut Vec<String>,
) -> anyhow::Result<String> {
    match postgres {
        Some(base) => pg_schema(base, schemas).await,
        None => Ok(format!("sqlite://{}?mode=rwc", dir.join(name).display())),
    }
}

/// A pool of the bench's own on a database the registry has migrated.
pub(crate) async fn connect(url: &str) -> anyhow::Result<Db> {
    if url.starts_with("sqlite:") {
        Ok(Db::Sqlite(socialcard_events::sqlite_pool(2).connect(url).await?))
    } else {
        Ok(Db::Postgres(sqlx::postgres::PgPoolOptions::new().max_connections(2).connect(url).await?))
    }
}

/// Rows per chunk: the registry's default, or SOCIALCARD_BENCH_BATCH_CHUNK (to study the trade-off
/// between a chunk's write-lock hold and the pages it rewrites).
fn chunk() -> usize {
    crate::size_from_env("SOCIALCARD_BENCH_BATCH_CHUNK", DEFAULT_CHUNK)
}

async fn one_storage(quick: bool, postgres: Option<&str>) -> anyhow::Result<Vec<String>> {
    // SOCIALCARD_BENCH_BATCH_ROWS overrides the size, for profiling.
    let default = if quick { 10_000 } else { 1_000_000 };
    let n = crate::size_from_env("SOCIALCARD_BENCH_BATCH_ROWS", default);
    let dir = Dir::new("batch")?;
    let mut schemas = Vec::new();
    let config = || RegistryConfig::shanghai(vec![7; 32]);

    // The registry, its holders loaded directly.
    let url = database(postgres, &dir.0, "registry.db", &mut schemas).await?;
    let built = socialcard_registry::build(&url, Arc::new(SystemClock), config()).await?;
    let registry = built.registry.clone();
    let db = connect(&url).await?;
    let sealer = sealer(&config())?;
    load_persons(&db, &sealer, &holders_in_key_order(&sealer, n, 0)).await?;
    let batch = EmployerBatch {
        batch_id: "bench-list-1".into(),
        employer_id: "employer-1".into(),
        site_id: "icbc-batch".into(),
        reviewer_id: "reviewer-1".into(),
        production_batch_id: "run-1".into(),
        rows: rows(n),
    };
    let t = Instant::now();
    let report = registry.import_employer_batch(&batch, chunk()).await?;
    let import = t.elapsed();
    anyhow::ensure!(report.applied + report.rejected == n, "rows lost: {report:?}");
    anyhow::ensure!(
        report.outcomes.iter().enumerate().all(|(i, o)| matches!(o, RowOutcome::Rejected { .. }) == (i % 1_000 == 999)),
        "wrong rows refused"
    );
    let shapes = shapes(&db).await?;
    let drained = downstream(&built.outbox, &dir, report.applied * 3).await?;
    drop(registry);

    // The baseline: the same rows into a second, empty database of the same schema.
    let base_url = database(postgres, &dir.0, "baseline.db", &mut schemas).await?;
    drop(socialcard_registry::build(&base_url, Arc::new(SystemClock), config()).await?);
    let base_db = connect(&base_url).await?;
    load_persons(&base_db, &sealer, &holders_in_key_order(&sealer, n, 0)).await?;
    let base = baseline(&base_db, &sealer, report.applied, chunk(), &shapes).await?;

    if let Some(base) = postgres {
        drop_schemas(base, &schemas).await?;
    }
    let rate = n as f64 / import.as_secs_f64();
    let base_rate = report.applied as f64 / base.as_secs_f64();
    Ok(vec![
        if postgres.is_some() { "postgresql" } else { "sqlite" }.to_string(),
        n.to_string(),
        report.applied.to_string(),
        report.rejected.to_string(),
        format!("{:.1}", import.as_secs_f64()),
        format!("{rate:.0}"),
        format!("{:.1}", base.as_secs_f64()),
        format!("{base_rate:.0}"),
        format!("{:.2}", rate / base_rate),
        drained.events.to_string(),
        format!("{:.0}", drained.log_alone),
        format!("{:.0}", drained.coordinator),
        format!("{:.2}", drained.coordinator / drained.log_alone),
        format!("{:.0}", drained.ops),
        format!("{:.2}", drained.ops / drained.log_alone),
    ])
}

/// How fast the import's card events are taken in downstream through the embedded log.
struct Drained {
    events: usize,
    /// Events per second through the loss coordinator's consumer.
    coordinator: f64,
    /// Events per second through ops' consumer (its read models, a batch a write of its group writer).
    ops: f64,
    /// Events per second through a consumer whose handler does nothing: reading the log and keeping
    /// the position alone.
    log_alone: f64,
}

/// Events taken in by the drain at most (SOCIALCARD_BENCH_DRAIN_EVENTS), from the start of the import.
const DRAIN_EVENTS: usize = 60_000;

/// A handler with no part in any event (the drain's baseline).
struct Ignores;

#[async_trait::async_trait]
impl socialcard_events::Handler for Ignores {
    async fn handle(
        &self,
        _: &socialcard_events::Envelope,
    ) -> Result<socialcard_events::Applied, socialcard_events::HandlerError> {
        Ok(socialcard_events::Applied::Duplicate)
    }
}

/// Runs a consumer of group `group` (positions and dead letters in `offsets`) until it has moved past
/// `events` events (or the log ends); returns its rate. An event it dead-lettered fails the run: moving
/// past events it could not apply is not taking them in.
async fn drain(consumer: EmbeddedConsumer, offsets: &SqliteOffsets, group: &str, events: usize) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut moved = 0;
    while moved < events {
        match consumer.poll_once().await? {
            0 => break,
            n => moved += n,
        }
    }
    let rate = moved as f64 / t.elapsed().as_secs_f64();
    anyhow::ensure!(moved >= events, "the log held {moved} events, {events} expected");
    let dead = offsets.dead_letter_count(group).await?;
    anyhow::ensure!(dead == 0, "{group} dead-lettered {dead} of the import's events");
    Ok(rate)
}

/// The loss coordinator and ops (each with its own SQLite database, as `up` runs them) consuming the
/// registry's card events of the import from the embedded log, against a consumer that only reads the
/// log and keeps its position, each over the first `min(written, DRAIN_EVENTS)` events.
async fn downstream(log: &Arc<dyn socialcard_events::Outbox>, dir: &Dir, written: usize) -> anyhow::Result<Drained> {
    let events = written.min(crate::size_from_env("SOCIALCARD_BENCH_DRAIN_EVENTS", DRAIN_EVENTS));
    // Nothing here calls the registry or a bank: the import's events need neither.
    let unused = tonic::transport::Channel::from_static("http://127.0.0.1:9").connect_lazy();
    let coordinator = Coordinator::open(
        &dir.0.join("coordinator.db"),
        unused,
        Vec::new(),
        Arc::new(SystemClock),
        CoordinatorConfig::new(CityPolicy::shanghai(), BankDirectory::shanghai()),
    )
    .await?;
    let store = OpsStore::open(&dir.0.join("ops.db")).await?;
    let run = |group: &'static str, offsets: SqliteOffsets, handler: Arc<dyn socialcard_events::Handler>| async move {
        let consumer =
            EmbeddedConsumer::new(group, socialcard_events::topics::CARD, log.clone(), offsets.clone(), handler);
        drain(consumer, &offsets, group, events).await
    };
    let log_alone = run("log-alone", coordinator.offsets(), Arc::new(Ignores)).await?;
    let applied =
        run("loss-coordinator", coordinator.offsets(), Arc::new(CardEvents::new(coordinator.clone()))).await?;
    let ops = run("ops.registry", store.offsets(), Arc::new(OpsEvents::new(store.clone()))).await?;
    Ok(Drained { events, coordinator: applied, ops, log_alone })
}

/// SQLite always; PostgreSQL too when a database URL is given.
pub async fn run(quick: bool, postgres: Option<String>) -> anyhow::Result<Table> {
    let mut rows = vec![one_storage(quick, None).await?];
    if let Some(base) = &postgres {
        rows.push(one_storage(quick, Some(base)).await?);
    }
    Ok(Table {
        name: "batch",
        columns: vec![
            "db",
            "rows",
            "applied",
            "refused",
            "import s",
            "rows/s",
            "baseline s",
            "baseline rows/s",
            "ratio",
            "events drained",
            "log alone events/s",
            "coordinator events/s",
            "coordinator ratio",
            "ops events/s",
            "ops ratio",
        ],
        rows,
        notes: vec![
            format!(
                "employer batch through Registry::import_employer_batch, chunks of {} rows: application, approval, production start (3 audit rows, 3 events per card); target: 1,000,000 rows in at most 60 s",
                chunk()
            ),
            "baseline: the same rows as raw multi-row INSERTs in transactions of the same size, database time only"
                .into(),
            format!(
                "drain: the loss coordinator and ops each taking in the import's first {DRAIN_EVENTS} card events, or all when fewer (SOCIALCARD_BENCH_DRAIN_EVENTS), from the embedded log, against a consumer that only reads the log and keeps its position (log alone)"
            ),
        ],
    })
}
