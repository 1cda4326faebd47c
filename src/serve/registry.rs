//! The registry as `up` and `serve registry` start it: its database, the events it consumes (the banks'
//! financial activations, postal's shipments) and publishes, and its gRPC server.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use socialcard_domain::{BankDirectory, CityPolicy};
use socialcard_events::kafka::{ConsumerConfig, KafkaConsumer};
use socialcard_events::{Handler, Metrics, topics};
use socialcard_registry::events::FinancialEvents;
use socialcard_registry::shipment_events::ShipmentEvents;
use socialcard_registry::{Built, Registry, RegistryConfig};
use socialcard_server::SystemClock;
use socialcard_server::tls::{Allow, RequirePeer, TlsDir};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;

use super::{Events, spawn_relay, until_stopped};

#[derive(Debug, Args)]
pub struct RegistryArgs {
    /// The registry's gRPC address (port 0 picks a free one).
    #[arg(long, env = "SOCIALCARD_REGISTRY_LISTEN", default_value = "127.0.0.1:50051")]
    pub registry_listen: String,
    /// The registry's database; default: SQLite in the data directory. `postgres://...` for PostgreSQL.
    #[arg(long, env = "SOCIALCARD_REGISTRY_DATABASE_URL")]
    pub registry_database_url: Option<String>,
    /// Hex key for the social PIN digests; default: a random key kept in the data directory.
    #[arg(long, env = "SOCIALCARD_PIN_KEY", hide_env_values = true)]
    pin_key: Option<String>,
    /// Hex key (32 bytes) sealing personal data at rest and keying the citizen-ID blind index; default: a
    /// random key kept in the data directory (`data.key`). Keep it apart from the database's backups.
    #[arg(long, env = "SOCIALCARD_DATA_KEY", hide_env_values = true)]
    data_key: Option<String>,
}

/// The consumer group that applies the banks' financial events at the registry.
pub const FINANCIAL_GROUP: &str = "registry";
/// The consumer group that applies postal's shipment events at the registry.
pub const SHIPMENT_GROUP: &str = "registry.shipment";

/// Reads a key: given (hex), or from `file` in the data directory, creating a random one on first start.
fn key(
    given: Option<&String>,
    what: &str,
    data_dir: &Path,
    file: &str,
    valid: impl Fn(usize) -> bool,
) -> anyhow::Result<Vec<u8>> {
    if let Some(hex_key) = given {
        let key = hex::decode(hex_key).with_context(|| format!("the {what} must be hex"))?;
        anyhow::ensure!(valid(key.len()), "the {what} has the wrong length");
        return Ok(key);
    }
    let path = data_dir.join(file);
    if path.exists() {
        let key = hex::decode(std::fs::read_to_string(&path)?.trim()).with_context(|| format!("{file} is not hex"))?;
        anyhow::ensure!(valid(key.len()), "{file} has the wrong length");
        return Ok(key);
    }
    let mut key = vec![0u8; 32];
    rand::fill(&mut key[..]);
    write_private(&path, &hex::encode(&key))?;
    Ok(key)
}

/// The PIN key (at least 16 bytes).
fn pin_key(args: &RegistryArgs, data_dir: &Path) -> anyhow::Result<Vec<u8>> {
    key(args.pin_key.as_ref(), "PIN key (SOCIALCARD_PIN_KEY)", data_dir, "pin.key", |n| n >= 16)
}

/// The data key (32 bytes).
fn data_key(args: &RegistryArgs, data_dir: &Path) -> anyhow::Result<Vec<u8>> {
    key(args.data_key.as_ref(), "data key (SOCIALCARD_DATA_KEY)", data_dir, "data.key", |n| n == 32)
}

fn write_private(path: &Path, content: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)?.write_all(content.as_bytes())?;
    Ok(())
}

/// Opens (and migrates) the registry's database.
pub async fn open(
    args: &RegistryArgs,
    data_dir: &Path,
    policy: CityPolicy,
    banks: BankDirectory,
) -> anyhow::Result<Built> {
    let db_url = match &args.registry_database_url {
        Some(url) => url.clone(),
        None => format!("sqlite://{}?mode=rwc", data_dir.join("registry.db").display()),
    };
    socialcard_registry::build(
        &db_url,
        Arc::new(SystemClock),
        RegistryConfig {
            policy,
            banks,
            data_key: data_key(args, data_dir)?,
            ..RegistryConfig::shanghai(pin_key(args, data_dir)?)
        },
    )
    .await
    .context("cannot open the registry's database")
}

/// Binds the registry's gRPC address and prints `registry listening on <addr>`.
pub async fn bind(listen: &str) -> anyhow::Result<TcpListener> {
    let listener = TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    println!("registry listening on {}", listener.local_addr()?);
    Ok(listener)
}

/// The registry's events over Kafka: its outbox published, the banks' financial events and postal's
/// shipment events applied. Embedded, the producing services' outboxes are read where they are opened
/// (the adapters, postal), so nothing starts here. Prints where the registry's events go.
pub fn consume(
    built: &Built,
    events: &Events,
    metrics: &Metrics,
    stopped: &watch::Receiver<bool>,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let Events::Kafka(k) = events else {
        println!("registry events kept in the embedded log (SQLite outbox)");
        return Ok(Vec::new());
    };
    let mut tasks = vec![spawn_relay(k, built.outbox.clone(), "registry", metrics, stopped)?];
    let financial: Arc<dyn Handler> = Arc::new(FinancialEvents::new(built.registry.clone()));
    let shipment: Arc<dyn Handler> = Arc::new(ShipmentEvents::new(built.registry.clone()));
    for (group, topic, handler) in
        [(FINANCIAL_GROUP, topics::FINANCIAL, financial), (SHIPMENT_GROUP, topics::SHIPMENT, shipment)]
    {
        let consumer =
            KafkaConsumer::new(k, ConsumerConfig::new(group, &[topic]), handler)?.with_metrics(metrics.clone());
        let consuming = stopped.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = consumer.run(consuming).await {
                tracing::error!(group, error = %e, "registry consumer stopped");
            }
        }));
    }
    // A thread of its own, stopped with the rest.
    let _sampler = socialcard_events::kafka::spawn_lag_sampler(
        k,
        FINANCIAL_GROUP,
        &[topics::FINANCIAL],
        metrics.clone(),
        std::time::Duration::from_secs(5),
        stopped.clone(),
    )?;
    println!("registry events published to kafka at {}", k.brokers);
    Ok(tasks)
}

/// Serves the registry on `listener` until stopped. Under TLS it serves our services only, each by its
/// certificate; banks go through their adapters.
pub fn serve(
    listener: TcpListener,
    registry: Registry,
    tls: Option<&TlsDir>,
    stopped: &watch::Receiver<bool>,
) -> anyhow::Result<JoinHandle<Result<(), tonic::transport::Error>>> {
    let server = socialcard_registry::grpc::RegistryGrpc::new(registry).into_server();
    let (routes, server_tls) = match tls {
        Some(t) => (
            tonic::service::Routes::new(InterceptedService::new(
                server,
                RequirePeer::new("registry", Allow::services()),
            )),
            Some(t.server_config("registry")?),
        ),
        None => (tonic::service::Routes::new(server), None),
    };
    Ok(tokio::spawn(socialcard_server::grpc::serve_with_tls(
        listener,
        routes,
        &[socialcard_registry::SERVICE_NAME],
        server_tls,
        until_stopped(stopped.clone()),
    )))
}
