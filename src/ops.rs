//! Ops as `socialcard up` and `socialcard serve ops` start it: its gRPC service, its web dashboard, and
//! its consumers of every topic (embedded: each producing service's SQLite outbox in the shared data
//! directory; Kafka: the topics and their dead-letter topics, the only way across processes).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use socialcard_domain::BankDirectory;
use socialcard_events::embedded::SqliteOffsets;
use socialcard_events::kafka::{ConsumerConfig, KafkaConsumer};
use socialcard_events::{Metrics, Outbox, topics};
use socialcard_ops::OpsConfig;
use socialcard_ops::feed::{Source, open_service_database};
use socialcard_server::SystemClock;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::serve::{Events, Started, until_stopped};

#[derive(Debug, Args)]
pub struct OpsArgs {
    /// Ops' gRPC address (port 0 picks a free one).
    #[arg(long, env = "SOCIALCARD_OPS_LISTEN", default_value = "127.0.0.1:50084")]
    ops_listen: String,
    /// The operations dashboard's HTTP address (`GET /`, `/api/overview`, `/metrics`).
    #[arg(long, env = "SOCIALCARD_OPS_DASHBOARD_LISTEN", default_value = "127.0.0.1:50085")]
    ops_dashboard_listen: String,
    /// Days after which a shipment still open counts as overdue on the dashboard.
    #[arg(long, env = "SOCIALCARD_OPS_OVERDUE_DAYS", default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..=365))]
    ops_overdue_days: u32,
}

/// The databases the other services of `up` keep in the data directory (named where they are opened:
/// `serve/bank_adapter.rs` for the adapters, `postal.rs`, `loss.rs`). Ops reads their outboxes as the
/// embedded log and counts their consumers' dead letters; it never writes to them.
const POSTAL_DATABASE: &str = "postal.db";
const LOSS_DATABASE: &str = "loss-coordinator.db";

/// What ops needs around it.
#[derive(Debug)]
pub struct Wiring<'a> {
    pub data_dir: &'a Path,
    pub banks: BankDirectory,
    pub events: &'a Events,
    pub metrics: Metrics,
    pub stopped: watch::Receiver<bool>,
}

async fn open_existing(path: &Path) -> anyhow::Result<(Arc<dyn Outbox>, SqliteOffsets)> {
    open_service_database(path).await.with_context(|| format!("ops cannot read {}", path.display()))
}

/// Starts ops (embedded: after the other services, whose databases it reads) and prints its two addresses.
pub async fn start(args: &OpsArgs, w: Wiring<'_>) -> anyhow::Result<Started> {
    let config = OpsConfig { overdue_days: args.ops_overdue_days };
    let mut ops = socialcard_ops::open(&w.data_dir.join("ops.db"), Arc::new(SystemClock), config)
        .await
        .context("cannot open ops' database")?;
    let mut tasks = Vec::new();
    match w.events {
        Events::Kafka(k) => {
            let topics_read: Vec<&str> = topics::ALL.to_vec();
            let dead_letter_topics: Vec<String> = topics::ALL.iter().map(|t| topics::dead_letter(t)).collect();
            let dead_letter_topics: Vec<&str> = dead_letter_topics.iter().map(String::as_str).collect();
            for (group, subscribed) in [("ops", topics_read), ("ops.dlt", dead_letter_topics)] {
                let consumer = KafkaConsumer::new(k, ConsumerConfig::new(group, &subscribed), ops.handler())?
                    .with_metrics(w.metrics.clone());
                let stopped = w.stopped.clone();
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = consumer.run(stopped).await {
                        tracing::error!(group, error = %e, "ops consumer stopped");
                    }
                }));
            }
        }
        Events::Embedded(embedded) => {
            let registry_offsets = embedded.registry_offsets.clone();
            let mut sources =
                vec![Source { name: "registry".into(), topic: topics::CARD, log: embedded.registry_outbox.clone() }];
            let mut dead_letters = vec![("registry.postal".to_string(), registry_offsets.clone())];
            for bank in w.banks.banks() {
                let (log, _) =
                    open_existing(&w.data_dir.join(crate::serve::bank_adapter::database_file(&bank.code))).await?;
                sources.push(Source { name: format!("bank-adapter.{}", bank.code), topic: topics::FINANCIAL, log });
                dead_letters.push((format!("registry.{}", bank.code), registry_offsets.clone()));
            }
            for (database, name, topic, group) in [
                (POSTAL_DATABASE, "postal", topics::SHIPMENT, socialcard_postal::CONSUMER_GROUP),
                (LOSS_DATABASE, "loss-coordinator", topics::LOSS, "loss-coordinator"),
            ] {
                let path = w.data_dir.join(database);
                // Started before ops, a service has created its database: none means it does not run here.
                if !path.exists() {
                    tracing::warn!(service = name, "not running: ops reads no {topic} events");
                    continue;
                }
                let (log, offsets) = open_existing(&path).await?;
                sources.push(Source { name: name.into(), topic, log });
                dead_letters.push((group.to_string(), offsets));
            }
            ops = ops.with_embedded_feed(sources, Some(w.metrics.clone())).with_dead_letter_sources(dead_letters);
            if let Some(feed) = ops.feed() {
                tasks.push(tokio::spawn(feed.run(w.stopped.clone())));
            }
        }
    }

    let listener = TcpListener::bind(&args.ops_listen)
        .await
        .with_context(|| format!("cannot listen on {} for ops", args.ops_listen))?;
    println!("ops listening on {}", listener.local_addr()?);
    let dashboard = TcpListener::bind(&args.ops_dashboard_listen)
        .await
        .with_context(|| format!("cannot listen on {} for the ops dashboard", args.ops_dashboard_listen))?;
    println!("ops dashboard listening on {}", dashboard.local_addr()?);
    tasks.push(tokio::spawn(socialcard_ops::dashboard::serve(
        dashboard,
        ops.clone(),
        until_stopped(w.stopped.clone()),
    )));
    let routes = tonic::service::Routes::new(socialcard_ops::grpc::OpsGrpc::new(ops).into_server());
    let serving = until_stopped(w.stopped.clone());
    let server = tokio::spawn(async move {
        if let Err(e) = socialcard_server::grpc::serve(listener, routes, &[socialcard_ops::SERVICE_NAME], serving).await
        {
            tracing::error!(error = %e, "ops stopped");
        }
    });
    Ok(Started { server, background: tasks })
}
