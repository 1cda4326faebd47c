//! `activation`: dual activation as a bank's core system makes it, through the bank-facing gRPC API
//! (bank core -> adapter -> registry, both committed) at 16, 64 and 256 calls in flight. Baseline, same
//! run, same concurrency: the minimal database writes the operation needs (the registry's card row,
//! audit, outbox and idempotency rows; the adapter's activation, idempotency and outbox rows), done
//! directly through sqlx on SQLite files of the same shape.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use socialcard_bank_adapter::BankAdapter;
use socialcard_domain::BankDirectory;
use socialcard_proto::bank::v1 as bank;
use socialcard_proto::bank::v1::bank_card_service_client::BankCardServiceClient;
use socialcard_proto::registry::v1 as reg;
use socialcard_proto::registry::v1::registry_service_client::RegistryServiceClient;
use socialcard_registry::RegistryConfig;
use socialcard_registry::fixtures::opened_at_bank;
use socialcard_server::SystemClock;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use tokio::net::TcpListener;
use tonic::transport::Channel;

use crate::scratch::Dir;
use crate::stats::{Samples, Table};

fn key() -> String {
    uuid::Uuid::now_v7().to_string()
}

async fn sqlite(path: std::path::PathBuf) -> anyhow::Result<SqlitePool> {
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // As the registry and the adapters commit: every commit synced before it is acknowledged.
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(30));
    Ok(socialcard_events::sqlite_pool(8).connect_with(opts).await?)
}

/// Runs `op(i)` for i in 0..n with `in_flight` workers; returns latencies and the elapsed time.
async fn drive<F, Fut>(n: usize, in_flight: usize, op: F) -> anyhow::Result<(Samples, Duration)>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..in_flight {
        let (op, next) = (op.clone(), next.clone());
        workers.spawn(async move {
            let mut samples = Samples::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(samples);
                }
                let t = Instant::now();
                op(i).await?;
                samples.push(t.elapsed());
            }
        });
    }
    let mut all = Samples::default();
    for r in workers.join_all().await {
        all.append(r?);
    }
    Ok((all, start.elapsed()))
}

/// The registry side of the baseline: the same database kind as the registry under test.
#[derive(Clone)]
enum BaseRegistry {
    Sqlite(SqlitePool),
    Postgres(sqlx::PgPool),
}

const BASE_REGISTRY_SCHEMA: &str =
    "CREATE TABLE cards (card_id TEXT PRIMARY KEY, version BIGINT NOT NULL, data TEXT NOT NULL);
     CREATE TABLE audit_log (seq BIGINT, card_id TEXT, at BIGINT, action TEXT, actor TEXT, to_state TEXT);
     CREATE TABLE outbox (event_id TEXT UNIQUE, event_key TEXT, payload TEXT, published_at BIGINT);
     CREATE TABLE idempotency (idempotency_key TEXT PRIMARY KEY, request_hash TEXT, response TEXT);";

macro_rules! registry_writes {
    ($pool:expr, $card:expr, $json:expr) => {{
        let mut tx = $pool.begin().await?;
        sqlx::query("INSERT INTO idempotency VALUES ($1, 'h', 'r')").bind(key()).execute(&mut *tx).await?;
        sqlx::query("UPDATE cards SET version = version + 1, data = $1 WHERE card_id = $2 AND version = 1")
            .bind($json)
            .bind($card)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO audit_log VALUES (0, $1, 0, 'financial_activation', '{}', 'active')")
            .bind($card)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO outbox VALUES ($1, $2, 'p', NULL)").bind(key()).bind($card).execute(&mut *tx).await?;
        tx.commit().await?;
    }};
}

impl BaseRegistry {
    async fn writes(&self, card: &str, json: &str) -> anyhow::Result<()> {
        match self {
            BaseRegistry::Sqlite(p) => registry_writes!(p, card, json),
            BaseRegistry::Postgres(p) => registry_writes!(p, card, json),
        }
        Ok(())
    }

    async fn insert_card(&self, card: &str, json: &str) -> anyhow::Result<()> {
        let q = "INSERT INTO cards (card_id, version, data) VALUES ($1, 1, $2)";
        match self {
            BaseRegistry::Sqlite(p) => sqlx::query(q).bind(card).bind(json).execute(p).await.map(|_| ())?,
            BaseRegistry::Postgres(p) => sqlx::query(q).bind(card).bind(json).execute(p).await.map(|_| ())?,
        }
        Ok(())
    }
}

/// A fresh PostgreSQL schema; returns a URL whose connections use it. `drop_schemas` removes them.
async fn pg_schema(base: &str, created: &mut Vec<String>) -> anyhow::Result<String> {
    let schema = format!("bench_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(base).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&admin).await?;
    admin.close().await;
    created.push(schema.clone());
    let sep = if base.contains('?') { '&' } else { '?' };
    Ok(format!("{base}{sep}options=-c%20search_path%3D{schema}"))
}

async fn drop_schemas(base: &str, schemas: &[String]) -> anyhow::Result<()> {
    let admin = sqlx::PgPool::connect(base).await?;
    for schema in schemas {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&admin).await?;
    }
    admin.close().await;
    Ok(())
}

/// SQLite always; PostgreSQL too when a database URL is given.
pub async fn run(quick: bool, postgres: Option<String>) -> anyhow::Result<Table> {
    let mut rows = one_storage(quick, None).await?;
    if let Some(base) = postgres {
        rows.extend(one_storage(quick, Some(base)).await?);
    }
    let per_level = if quick { 40 } else { 2_000 };
    Ok(Table {
        name: "activation",
        columns: vec!["registry db", "in flight", "activations/s", "p50 ms", "p99 ms", "baseline/s", "base p50 ms", "base p99 ms", "ratio"],
        rows,
        notes: vec![
            format!("{per_level} activations per level through ActivateFinancial (gRPC: bank core -> adapter -> registry), each on a fresh collected card whose account icbc opened through its adapter"),
            "baseline: the same rows written directly with sqlx, same databases, same concurrency; targets: ratio >= 0.5, p99 <= 25 ms at 64 in flight".into(),
        ],
    })
}

async fn one_storage(quick: bool, postgres: Option<String>) -> anyhow::Result<Vec<Vec<String>>> {
    let levels: &[usize] = &[16, 64, 256];
    let per_level = if quick { 40 } else { 2_000 };
    let dir = Dir::new("act")?;

    // The system: a registry and the icbc adapter, served over gRPC on loopback.
    let mut schemas = Vec::new();
    let (url, label) = match &postgres {
        Some(base) => (pg_schema(base, &mut schemas).await?, "postgresql"),
        None => (format!("sqlite://{}?mode=rwc", dir.0.join("registry.db").display()), "sqlite"),
    };
    let built = socialcard_registry::build(&url, Arc::new(SystemClock), RegistryConfig::shanghai(vec![7; 32])).await?;
    let registry = built.registry;
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let registry_addr = format!("http://{}", l.local_addr()?);
    let routes = tonic::service::Routes::new(socialcard_registry::grpc::RegistryGrpc::new(registry).into_server());
    tokio::spawn(socialcard_server::grpc::serve(l, routes, &[], std::future::pending()));
    let mut icbc = BankDirectory::shanghai().get("icbc").cloned().ok_or_else(|| anyhow::anyhow!("no icbc"))?;
    // The whole load comes from one bank here: measure the system, not that bank's configured share.
    icbc.policy.requests_per_second = 1_000_000;
    icbc.policy.burst = 1_000_000;
    let adapter = BankAdapter::open(
        icbc,
        &dir.0.join("bank-icbc.db"),
        Channel::from_shared(registry_addr.clone())?.connect_lazy(),
    )
    .await?;
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let adapter_addr = format!("http://{}", l.local_addr()?);
    tokio::spawn(socialcard_server::grpc::serve(
        l,
        tonic::service::Routes::new(adapter.into_server()),
        &[],
        std::future::pending(),
    ));
    let client = BankCardServiceClient::connect(adapter_addr).await?;
    let mut registry_client = RegistryServiceClient::connect(registry_addr.clone()).await?;

    // The baseline's two databases, the same rows per activation.
    let base_registry = match &postgres {
        Some(base) => {
            let url = pg_schema(base, &mut schemas).await?;
            let pool = sqlx::postgres::PgPoolOptions::new().max_connections(16).connect(&url).await?;
            sqlx::raw_sql(BASE_REGISTRY_SCHEMA).execute(&pool).await?;
            BaseRegistry::Postgres(pool)
        }
        None => {
            let pool = sqlite(dir.0.join("base-registry.db")).await?;
            sqlx::raw_sql(BASE_REGISTRY_SCHEMA).execute(&pool).await?;
            BaseRegistry::Sqlite(pool)
        }
    };
    let base_adapter = sqlite(dir.0.join("base-adapter.db")).await?;
    sqlx::raw_sql(
        "CREATE TABLE financial_cards (card_id TEXT PRIMARY KEY, card_number TEXT UNIQUE, state TEXT, activated_at INTEGER);
         CREATE TABLE idempotency (idempotency_key TEXT PRIMARY KEY, request_hash BLOB, response BLOB);
         CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT UNIQUE, event_key TEXT, payload BLOB, published_at INTEGER);",
    )
    .execute(&base_adapter)
    .await?;
    let card_json = "x".repeat(900);

    let mut rows = Vec::new();
    let mut made = 0u64;
    for &in_flight in levels {
        let cards =
            opened_at_bank(&mut registry_client, &mut client.clone(), made, per_level as u64, "icbc", "621226").await?;
        made += per_level as u64;
        let numbers: Arc<Vec<String>> = Arc::new(cards.into_iter().map(|c| c.card_number).collect());
        let c = client.clone();
        let (mut latency, elapsed) = drive(per_level, in_flight, move |i| {
            let mut c = c.clone();
            let number = numbers[i].clone();
            async move {
                let r = c
                    .activate_financial(bank::ActivateFinancialRequest {
                        idempotency_key: key(),
                        card_number: number,
                        teller_id: "teller".into(),
                        branch_id: "branch".into(),
                        face_verification_ref: "face".into(),
                        bank_pin_changed: true,
                    })
                    .await?
                    .into_inner();
                anyhow::ensure!(r.social_state == reg::SocialState::Active as i32, "social function not on");
                Ok(())
            }
        })
        .await?;

        for i in 0..per_level {
            base_registry.insert_card(&format!("{in_flight}-{i}"), &card_json).await?;
        }
        let (r, a, json) = (base_registry.clone(), base_adapter.clone(), card_json.clone());
        let (mut base, base_elapsed) = drive(per_level, in_flight, move |i| {
            let (r, a, json) = (r.clone(), a.clone(), json.clone());
            async move {
                let card = format!("{in_flight}-{i}");
                r.writes(&card, &json).await?;
                let mut tx = a.begin().await?;
                sqlx::query("INSERT INTO financial_cards VALUES ($1, $1, 'active', 0)")
                    .bind(&card)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("INSERT INTO idempotency VALUES ($1, x'00', x'00')").bind(key()).execute(&mut *tx).await?;
                sqlx::query("INSERT INTO outbox (event_id, event_key, payload) VALUES ($1, $2, x'00')")
                    .bind(key())
                    .bind(&card)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(())
            }
        })
        .await?;
        let tps = per_level as f64 / elapsed.as_secs_f64();
        let base_tps = per_level as f64 / base_elapsed.as_secs_f64();
        rows.push(vec![
            label.to_string(),
            in_flight.to_string(),
            format!("{tps:.0}"),
            format!("{:.2}", latency.quantile_ms(0.50)),
            format!("{:.2}", latency.quantile_ms(0.99)),
            format!("{base_tps:.0}"),
            format!("{:.2}", base.quantile_ms(0.50)),
            format!("{:.2}", base.quantile_ms(0.99)),
            format!("{:.2}", tps / base_tps),
        ]);
    }
    if let Some(base) = &postgres {
        drop_schemas(base, &schemas).await?;
    }
    Ok(rows)
}
