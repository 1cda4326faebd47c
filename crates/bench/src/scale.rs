//! `scale`: a registry holding 10,000,000 cards (bulk-loaded directly through sqlx into the registry's
//! own schema, holders and cards, not through the API), measured against an empty registry in the same
//! run: GetCard point-lookup p50/p99 by card number over gRPC (random cards, 8 in flight), and dual
//! activation throughput through a bank adapter (64 in flight) on cards made through the API.
//!
//! The loaded cards are copies of a real card's stored JSON with their own id, holder and number, so a
//! lookup reads and decodes a real row. Audit and outbox rows are not loaded: lookups and activations
//! touch them only by appending.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use socialcard_bank_adapter::BankAdapter;
use socialcard_domain::BankDirectory;
use socialcard_domain::numbers::luhn_check_digit;
use socialcard_proto::bank::v1 as bank;
use socialcard_proto::bank::v1::bank_card_service_client::BankCardServiceClient;
use socialcard_proto::registry::v1 as reg;
use socialcard_proto::registry::v1::registry_service_client::RegistryServiceClient;
use socialcard_registry::RegistryConfig;
use socialcard_registry::fixtures::{adult_citizen_id, collected_card, opened_at_bank};
use socialcard_server::SystemClock;
use sqlx::{QueryBuilder, Row};
use tokio::net::TcpListener;
use tonic::transport::Channel;

use crate::scratch::Dir;
use crate::stats::{Samples, Table};

use crate::batch::{Db, connect, holders_in_key_order, load_persons, sealer};

/// The loader's own connection: on SQLite with a 1 GiB page cache (against the 2 MB default). It was
/// sized when holders were inserted in random blind-index order; they now go in key order (see
/// [`bulk_load`]), and the cache was left as it was.
async fn bulk_connect(url: &str) -> anyhow::Result<Db> {
    if url.starts_with("sqlite:") {
        let options = url.parse::<sqlx::sqlite::SqliteConnectOptions>()?.pragma("cache_size", "-1048576");
        Ok(Db::Sqlite(socialcard_events::sqlite_pool(1).connect_with(options).await?))
    } else {
        connect(url).await
    }
}

macro_rules! on_db {
    ($db:expr, $pool:ident, $body:expr) => {
        match $db {
            Db::Sqlite($pool) => $body,
            Db::Postgres($pool) => $body,
        }
    };
}

/// The bulk-loaded card number of `i`: series `S`, never issued by the registry (series `A`).
fn loaded_number(i: usize) -> String {
    let body = format!("{:07}", i % 10_000_000);
    format!("S{body}{}", luhn_check_digit(&body))
}

/// Loads `n` holders, then their collected cards in transactions of 50,000 rows, multi-row INSERTs,
/// stored as the registry stores them (card data sealed per card, holders by blind index).
async fn bulk_load(
    db: &Db,
    n: usize,
    template: &str,
    pin_digest: &[u8],
    template_ids: [&str; 3],
) -> anyhow::Result<()> {
    let [t_card, t_holder, t_number] = template_ids;
    let sealer = sealer(&RegistryConfig::shanghai(vec![7; 32]))?;
    // Holders and cards both in the holders' key order: card j is the j-th holder's, so the card id,
    // the card number and the holder index all grow together and every insert appends.
    let holders = holders_in_key_order(&sealer, n, 1_000_000);
    load_persons(db, &sealer, &holders).await?;
    let now = socialcard_events::unix_micros(time::OffsetDateTime::now_utc());
    const TX: usize = 50_000;
    for start in (0..n).step_by(TX) {
        let end = n.min(start + TX);
        let mut rows: Vec<(String, String, String, String)> = Vec::with_capacity(end - start);
        for (j, (index, i)) in holders.iter().enumerate().take(end).skip(start) {
            let (card, holder, number) =
                (format!("00000000-0000-7000-8000-{j:012}"), adult_citizen_id(*i), loaded_number(j));
            let data = template.replace(t_card, &card).replace(t_holder, &holder).replace(t_number, &number);
            let data = sealer.seal(&data, &card).map_err(|e| anyhow::anyhow!("{e}"))?;
            rows.push((card, index.clone(), number, data));
        }
        on_db!(db, pool, {
            let mut tx = pool.begin().await?;
            for part in rows.chunks(30_000 / 11) {
                let mut q = QueryBuilder::new(
                    "INSERT INTO cards (card_id, citizen_id, card_number, bank_code, physical_state, social_state, financial_state, version, data, pin_digest, updated_at) ",
                );
                q.push_values(part, |mut b, r| {
                    b.push_bind(&r.0).push_bind(&r.1).push_bind(&r.2).push_bind("icbc").push_bind("collected");
                    b.push_bind("not_activated").push_bind("not_activated").push_bind(5i64).push_bind(&r.3);
                    b.push_bind(pin_digest).push_bind(now);
                });
                q.build().execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
        if end.is_multiple_of(1_000_000) || end == n {
            eprintln!("scale: {end} of {n} cards loaded");
        }
    }
    Ok(())
}

struct System {
    registry: RegistryServiceClient<Channel>,
    adapter: BankCardServiceClient<Channel>,
}

/// A registry (and the icbc adapter before it) served over gRPC on loopback.
async fn system(url: &str, dir: &std::path::Path) -> anyhow::Result<System> {
    let built = socialcard_registry::build(url, Arc::new(SystemClock), RegistryConfig::shanghai(vec![7; 32])).await?;
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let registry_addr = format!("http://{}", l.local_addr()?);
    let routes =
        tonic::service::Routes::new(socialcard_registry::grpc::RegistryGrpc::new(built.registry).into_server());
    tokio::spawn(socialcard_server::grpc::serve(l, routes, &[], std::future::pending()));
    let icbc = BankDirectory::shanghai().get("icbc").cloned().ok_or_else(|| anyhow::anyhow!("no icbc"))?;
    let adapter =
        BankAdapter::open(icbc, &dir.join("bank-icbc.db"), Channel::from_shared(registry_addr.clone())?.connect_lazy())
            .await?;
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let adapter_addr = format!("http://{}", l.local_addr()?);
    tokio::spawn(socialcard_server::grpc::serve(
        l,
        tonic::service::Routes::new(adapter.into_server()),
        &[],
        std::future::pending(),
    ));
    Ok(System {
        registry: RegistryServiceClient::connect(registry_addr).await?,
        adapter: BankCardServiceClient::connect(adapter_addr).await?,
    })
}

/// Runs `op(i)` for i in 0..n with `in_flight` workers; latencies and elapsed time.
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

/// Lookups of `numbers`, then activations of fresh cards; (p50, p99, activations/s).
async fn measure(
    sys: &System,
    lookups: usize,
    numbers: Arc<Vec<String>>,
    activations: usize,
    first: u64,
) -> anyhow::Result<(f64, f64, f64)> {
    let c = sys.registry.clone();
    let (mut lat, _) = drive(lookups, 8, move |i| {
        let mut c = c.clone();
        let number = numbers[i % numbers.len()].clone();
        async move {
            let card = c
                .get_card(reg::GetCardRequest {
                    lookup: Some(reg::get_card_request::Lookup::CardNumber(number.clone())),
                })
                .await
                .with_context(|| format!("GetCard {number}"))?
                .into_inner();
            anyhow::ensure!(card.card.is_some(), "no card");
            Ok(())
        }
    })
    .await?;
    let mut registry = sys.registry.clone();
    let made = opened_at_bank(&mut registry, &mut sys.adapter.clone(), first, activations as u64, "icbc", "621226")
        .await
        .context("fixture cards")?;
    let fresh: Arc<Vec<String>> = Arc::new(made.into_iter().map(|c| c.card_number).collect());
    let a = sys.adapter.clone();
    let (_, elapsed) = drive(activations, 64, move |i| {
        let mut a = a.clone();
        let number = fresh[i].clone();
        async move {
            let r = a
                .activate_financial(bank::ActivateFinancialRequest {
                    idempotency_key: uuid::Uuid::now_v7().to_string(),
                    card_number: number,
                    teller_id: "teller".into(),
                    branch_id: "branch".into(),
                    face_verification_ref: "face".into(),
                    bank_pin_changed: true,
                })
                .await
                .context("ActivateFinancial")?
                .into_inner();
            anyhow::ensure!(r.social_state == reg::SocialState::Active as i32, "social function not on");
            Ok(())
        }
    })
    .await?;
    Ok((lat.quantile_ms(0.50), lat.quantile_ms(0.99), activations as f64 / elapsed.as_secs_f64()))
}

async fn one_storage(quick: bool, postgres: Option<&str>) -> anyhow::Result<Vec<String>> {
    let n = crate::size_from_env("SOCIALCARD_BENCH_SCALE_CARDS", if quick { 100_000 } else { 10_000_000 });
    let (lookups, activations) = if quick { (500, 40) } else { (20_000, 2_000) };
    let dir = Dir::new("scale")?;
    let (big_dir, empty_dir) = (dir.0.join("big"), dir.0.join("empty"));
    std::fs::create_dir_all(&big_dir)?;
    std::fs::create_dir_all(&empty_dir)?;
    let mut schemas = Vec::new();
    let url = |d: &std::path::Path| {
        let d = d.to_path_buf();
        async move {
            match postgres {
                Some(base) => {
                    let mut s = Vec::new();
                    let u = crate::batch::pg_schema(base, &mut s).await?;
                    Ok::<_, anyhow::Error>((u, s))
                }
                None => Ok((format!("sqlite://{}?mode=rwc", d.join("registry.db").display()), Vec::new())),
            }
        }
    };

    // The empty registry first: its fixture cards are the lookup targets there, and one of them is the
    // template of the loaded rows.
    let (empty_url, s) = url(&empty_dir).await?;
    schemas.extend(s);
    let empty = system(&empty_url, &empty_dir).await?;
    let mut registry = empty.registry.clone();
    let mut targets = Vec::new();
    for k in 0..20u64 {
        targets.push(collected_card(&mut registry, k, "icbc", "621226").await?);
    }
    let template_card = targets[0].clone();
    let empty_db = connect(&empty_url).await?;
    let (sealed, pin_digest): (String, Vec<u8>) = on_db!(&empty_db, pool, {
        let r = sqlx::query("SELECT data, pin_digest FROM cards WHERE card_id = $1")
            .bind(&template_card.card_id)
            .fetch_one(pool)
            .await?;
        (r.try_get("data")?, r.try_get("pin_digest")?)
    });
    let template = sealer(&RegistryConfig::shanghai(vec![7; 32]))?
        .open(&sealed, &template_card.card_id)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let holder = adult_citizen_id(0);
    let numbers: Vec<String> = targets.iter().map(|t| t.card_number.clone()).collect();
    let (e50, e99, e_tps) = measure(&empty, lookups, Arc::new(numbers), activations, 100).await?;

    // The full registry: migrated by the registry, loaded directly, then served.
    let (big_url, s) = url(&big_dir).await?;
    schemas.extend(s);
    drop(socialcard_registry::build(&big_url, Arc::new(SystemClock), RegistryConfig::shanghai(vec![7; 32])).await?);
    let big_db = bulk_connect(&big_url).await?;
    let t = Instant::now();
    bulk_load(&big_db, n, &template, &pin_digest, [&template_card.card_id, &holder, &template_card.card_number])
        .await?;
    if let Db::Postgres(p) = &big_db {
        sqlx::query("ANALYZE").execute(p).await?;
    }
    let load = t.elapsed();
    eprintln!("scale: loaded in {:.0} s; measuring", load.as_secs_f64());
    let big = system(&big_url, &big_dir).await?;
    // Random cards over the whole table (a fixed LCG: the same cards every run).
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let numbers: Vec<String> = (0..lookups)
        .map(|_| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            loaded_number((x >> 33) as usize % n)
        })
        .collect();
    let (b50, b99, b_tps) = measure(&big, lookups, Arc::new(numbers), activations, 100).await?;
    let size_mib = match &big_db {
        Db::Sqlite(_) => {
            std::fs::metadata(big_dir.join("registry.db")).map(|m| m.len()).unwrap_or(0) as f64 / 1048576.0
        }
        Db::Postgres(p) => {
            let r = sqlx::query("SELECT pg_total_relation_size('cards') + pg_total_relation_size('persons') AS s")
                .fetch_one(p)
                .await?;
            r.try_get::<i64, _>("s")? as f64 / 1048576.0
        }
    };
    if let Some(base) = postgres {
        crate::batch::drop_schemas(base, &schemas).await?;
    }
    Ok(vec![
        if postgres.is_some() { "postgresql" } else { "sqlite" }.to_string(),
        n.to_string(),
        format!("{:.0}", load.as_secs_f64()),
        format!("{size_mib:.0}"),
        format!("{b50:.2}"),
        format!("{b99:.2}"),
        format!("{e50:.2}"),
        format!("{e99:.2}"),
        format!("{:.2}", b99 / e99),
        format!("{b_tps:.0}"),
        format!("{e_tps:.0}"),
        format!("{:.2}", b_tps / e_tps),
    ])
}

/// SQLite always; PostgreSQL too when a database URL is given.
pub async fn run(quick: bool, postgres: Option<String>) -> anyhow::Result<Table> {
    let mut rows = vec![one_storage(quick, None).await?];
    if let Some(base) = &postgres {
        rows.push(one_storage(quick, Some(base)).await?);
    }
    Ok(Table {
        name: "scale",
        columns: vec![
            "db",
            "cards",
            "load s",
            "size MiB",
            "GetCard p50 ms",
            "GetCard p99 ms",
            "empty p50 ms",
            "empty p99 ms",
            "p99 ratio",
            "activations/s",
            "empty activations/s",
            "ratio",
        ],
        rows,
        notes: vec![
            "GetCard by card number over gRPC, random cards, 8 in flight; activations: ActivateFinancial through the icbc adapter, 64 in flight, fresh cards made through the API with their accounts opened through the adapter".into(),
            "baseline: the same measurements against an empty registry in the same run (ratio = full / empty)".into(),
        ],
    })
}
