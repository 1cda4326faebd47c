//! `ingest`: courier status updates per second through postal's gRPC client stream
//! (`StreamStatusUpdates`: every update checked, deduplicated by courier event id, decided against its
//! shipment, appended to the history, the shipment moved and its milestone events written to the
//! outbox), with 1 and 4 feeds streaming at once. Baseline, same run, same rows: the history rows
//! alone bulk-inserted with sqlx into a SQLite file of the same kind, in transactions of the same size.

use std::sync::Arc;
use std::time::{Duration, Instant};

use socialcard_postal::feed::Waybill;
use socialcard_postal::storage::{Address, NewShipment};
use socialcard_postal::{PostalConfig, grpc::PostalGrpc};
use socialcard_proto::postal::v1 as pb;
use socialcard_proto::postal::v1::postal_service_client::PostalServiceClient;
use socialcard_server::SystemClock;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use time::OffsetDateTime;
use tokio::net::TcpListener;

use crate::scratch::Dir;
use crate::stats::Table;

/// The courier's path for each shipment: accepted, out for delivery, delivered.
const STEPS: [pb::ShipmentStatus; 3] =
    [pb::ShipmentStatus::InTransit, pb::ShipmentStatus::OutForDelivery, pb::ShipmentStatus::Delivered];
/// Rows per transaction in the baseline, as postal batches a fast stream.
const BASE_BATCH: usize = 512;
/// Rows per INSERT statement in the baseline, as postal writes them.
const ROWS_PER_INSERT: usize = 256;

fn updates(waybills: &[String], feed: usize, start: OffsetDateTime) -> Vec<pb::StatusUpdate> {
    let mut out = Vec::with_capacity(waybills.len() * STEPS.len());
    for (step, status) in STEPS.iter().enumerate() {
        for (i, w) in waybills.iter().enumerate() {
            let at = start + time::Duration::seconds((step * 60) as i64);
            out.push(pb::StatusUpdate {
                waybill: w.clone(),
                status: *status as i32,
                sub_reason: String::new(),
                occurred_at: Some(prost_types::Timestamp { seconds: at.unix_timestamp(), nanos: 0 }),
                courier_event_id: format!("f{feed}-{step}-{i}"),
                point_id: String::new(),
            });
        }
    }
    out
}

/// Streams `feeds` shipments' updates over `feeds` concurrent streams; returns updates/s.
async fn through_stream(quick: bool, feeds: usize) -> anyhow::Result<(usize, f64)> {
    // SOCIALCARD_BENCH_INGEST_SHIPMENTS overrides the size, for profiling.
    let default = if quick { 50 } else { 5_000 };
    let shipments = crate::size_from_env("SOCIALCARD_BENCH_INGEST_SHIPMENTS", default);
    let dir = Dir::new("ingest")?;
    let postal =
        socialcard_postal::open(&dir.0.join("postal.db"), Arc::new(SystemClock), PostalConfig::new(vec![1; 32]))
            .await?;
    let mut per_feed: Vec<Vec<String>> = vec![Vec::new(); feeds];
    for i in 0..shipments * feeds {
        let new = NewShipment {
            card_id: format!("card-{i}"),
            card_number: format!("A{i:08}"),
            address: Address { line: "1 Road".into(), ..Default::default() },
            backup_point_id: format!("point-{}", i % 20),
        };
        let s =
            postal.open_shipment(&format!("bench-{i}"), &new).await?.ok_or_else(|| anyhow::anyhow!("not opened"))?;
        per_feed[i % feeds].push(s.waybill);
    }
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = format!("http://{}", l.local_addr()?);
    let routes = tonic::service::Routes::new(PostalGrpc::new(postal.clone()).into_server());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(socialcard_server::grpc::serve(l, routes, &[socialcard_postal::SERVICE_NAME], async {
        let _ = stopped.await;
    }));
    let start = OffsetDateTime::now_utc() - time::Duration::hours(1);
    let batches: Vec<Vec<pb::StatusUpdate>> = per_feed.iter().enumerate().map(|(f, w)| updates(w, f, start)).collect();
    let total: usize = batches.iter().map(Vec::len).sum();
    let t = Instant::now();
    let mut streams = tokio::task::JoinSet::new();
    for batch in batches {
        let addr = addr.clone();
        streams.spawn(async move {
            let mut client = PostalServiceClient::connect(addr).await?;
            let r = client.stream_status_updates(tokio_stream::iter(batch)).await?.into_inner();
            Ok::<_, anyhow::Error>(r.applied)
        });
    }
    let mut applied = 0;
    for r in streams.join_all().await {
        applied += r?;
    }
    let elapsed = t.elapsed();
    anyhow::ensure!(applied as usize == total, "applied {applied} of {total}");
    let _ = stop.send(());
    let _ = server.await;
    Ok((total, total as f64 / elapsed.as_secs_f64().max(1e-9)))
}

/// The same number of rows, bulk-inserted into a history table of the same shape.
async fn baseline(rows: usize) -> anyhow::Result<f64> {
    let dir = Dir::new("ingest-base")?;
    let opts = SqliteConnectOptions::new()
        .filename(dir.0.join("base.db"))
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(30));
    let pool = socialcard_events::sqlite_pool(1).connect_with(opts).await?;
    sqlx::query(
        "CREATE TABLE shipment_history (id INTEGER PRIMARY KEY AUTOINCREMENT, waybill TEXT NOT NULL,
             courier_event_id TEXT NOT NULL UNIQUE, status TEXT NOT NULL, sub_reason TEXT NOT NULL, point_id TEXT,
             occurred_at INTEGER NOT NULL, received_at INTEGER NOT NULL, source TEXT NOT NULL, outcome TEXT NOT NULL)",
    )
    .execute(&pool)
    .await?;
    let waybills: Vec<String> = (0..rows).map(|i| Waybill::issue(i as u64).to_string()).collect();
    let t = Instant::now();
    for (c, chunk) in waybills.chunks(BASE_BATCH).enumerate() {
        let mut tx = pool.begin().await?;
        // Multi-row INSERTs, as postal writes its history: the fastest way sqlx has to put rows in.
        for (part, rows) in chunk.chunks(ROWS_PER_INSERT).enumerate() {
            let mut q = sqlx::QueryBuilder::<sqlx::Sqlite>::new(
                "INSERT INTO shipment_history (waybill, courier_event_id, status, sub_reason, point_id, occurred_at,
                     received_at, source, outcome) ",
            );
            q.push_values(rows.iter().enumerate(), |mut b, (i, w)| {
                b.push_bind(w)
                    .push_bind(format!("b-{c}-{part}-{i}"))
                    .push_bind("in_transit")
                    .push_bind("")
                    .push_bind(None::<String>)
                    .push_bind(1_700_000_000_000_000_i64)
                    .push_bind(1_700_000_000_000_000_i64)
                    .push_bind("stream")
                    .push_bind("applied");
            });
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
    }
    Ok(rows as f64 / t.elapsed().as_secs_f64().max(1e-9))
}

pub async fn run(quick: bool) -> anyhow::Result<Table> {
    let mut rows = Vec::new();
    for feeds in [1, 4] {
        let (n, rate) = through_stream(quick, feeds).await?;
        let base = baseline(n).await?;
        rows.push(vec![
            feeds.to_string(),
            n.to_string(),
            format!("{rate:.0}"),
            format!("{base:.0}"),
            format!("{:.2}", rate / base.max(1e-9)),
        ]);
    }
    Ok(Table {
        name: "ingest",
        columns: vec!["feeds", "updates", "stream updates/s", "bulk insert/s", "ratio"],
        rows,
        notes: vec![
            "stream: StreamStatusUpdates over gRPC on loopback, 3 updates per shipment (in transit, out for delivery, delivered): checked, deduplicated, decided, history + shipment + outbox rows".into(),
            "baseline: the same number of history rows alone, bulk-inserted with sqlx into SQLite: multi-row INSERTs of 256, 512 rows per transaction".into(),
        ],
    })
}
