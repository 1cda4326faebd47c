//! `socialcard up`: every service in one process. Configuration comes from flags or their
//! `SOCIALCARD_*` environment variables; each service prints `<service> listening on <host:port>`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use socialcard_events::Metrics;
use socialcard_events::kafka::{KafkaConfig, KafkaPublisher};
use socialcard_events::relay::RelayConfig;
use socialcard_registry::RegistryConfig;
use socialcard_server::SystemClock;
use tokio::net::TcpListener;

const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where the embedded databases and keys live.
    #[arg(long, env = "SOCIALCARD_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// The registry's gRPC address (port 0 picks a free one).
    #[arg(long, env = "SOCIALCARD_REGISTRY_LISTEN", default_value = "127.0.0.1:50051")]
    registry_listen: String,
    /// The registry's database; default: SQLite in the data directory. `postgres://...` for PostgreSQL.
    #[arg(long, env = "SOCIALCARD_REGISTRY_DATABASE_URL")]
    registry_database_url: Option<String>,
    /// Hex key for the social PIN digests; default: a random key kept in the data directory.
    #[arg(long, env = "SOCIALCARD_PIN_KEY", hide_env_values = true)]
    pin_key: Option<String>,
    /// Kafka bootstrap servers (host:port,...). Without it, events stay in the embedded log.
    #[arg(long, env = "SOCIALCARD_KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// Partitions of each topic created at start (they cannot be grown later on every broker).
    #[arg(long, env = "SOCIALCARD_KAFKA_PARTITIONS", default_value_t = 8)]
    kafka_partitions: i32,
    /// Prometheus metrics over HTTP (`GET /metrics`).
    #[arg(long, env = "SOCIALCARD_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    metrics_listen: String,
}

/// Reads the PIN key from the data directory, creating a random one on first start.
fn pin_key(args: &UpArgs) -> anyhow::Result<Vec<u8>> {
    if let Some(hex_key) = &args.pin_key {
        let key = hex::decode(hex_key).context("SOCIALCARD_PIN_KEY must be hex")?;
        anyhow::ensure!(key.len() >= 16, "the PIN key needs at least 16 bytes");
        return Ok(key);
    }
    let path = args.data_dir.join("pin.key");
    if path.exists() {
        let key = hex::decode(std::fs::read_to_string(&path)?.trim()).context("pin.key is not hex")?;
        anyhow::ensure!(key.len() >= 16, "pin.key is too short");
        return Ok(key);
    }
    let mut key = vec![0u8; 32];
    rand::fill(&mut key[..]);
    write_private(&path, &hex::encode(&key))?;
    Ok(key)
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

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data directory {}", args.data_dir.display()))?;
    let db_url = match &args.registry_database_url {
        Some(url) => url.clone(),
        None => format!("sqlite://{}?mode=rwc", args.data_dir.join("registry.db").display()),
    };
    let built = socialcard_registry::build(&db_url, Arc::new(SystemClock), RegistryConfig::shanghai(pin_key(&args)?))
        .await
        .context("cannot open the registry's database")?;
    let metrics = Metrics::new();
    let (stop_relay, relay_stopped) = tokio::sync::watch::channel(false);
    let relay = match &args.kafka_brokers {
        Some(brokers) => {
            let mut kafka = KafkaConfig::new(brokers.clone());
            kafka.partitions = args.kafka_partitions;
            let mut topics: Vec<String> = socialcard_events::topics::ALL.iter().map(|t| (*t).to_string()).collect();
            topics.extend(socialcard_events::topics::ALL.iter().map(|t| socialcard_events::topics::dead_letter(t)));
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            socialcard_events::kafka::ensure_topics(&kafka, &names).await.context("cannot create the Kafka topics")?;
            let publisher = Arc::new(KafkaPublisher::new(&kafka).context("cannot create the Kafka producer")?);
            println!("registry events published to kafka at {brokers}");
            Some(tokio::spawn(socialcard_events::relay::run(
                built.outbox.clone(),
                publisher,
                RelayConfig { source: "registry".into(), metrics: Some(metrics.clone()), ..RelayConfig::default() },
                relay_stopped,
            )))
        }
        None => {
            anyhow::ensure!(built.embedded_log, "a PostgreSQL registry publishes its events through --kafka-brokers");
            println!("registry events kept in the embedded log (SQLite outbox)");
            None
        }
    };
    let registry = built.registry;

    let metrics_listener = TcpListener::bind(&args.metrics_listen)
        .await
        .with_context(|| format!("cannot listen on {} for metrics", args.metrics_listen))?;
    println!("metrics listening on {}", metrics_listener.local_addr()?);
    let render: socialcard_server::metrics_http::Render = {
        let metrics = metrics.clone();
        Arc::new(move || metrics.render())
    };
    let mut metrics_stopped = stop_relay.subscribe();
    tokio::spawn(socialcard_server::metrics_http::serve(metrics_listener, render, async move {
        let _ = metrics_stopped.changed().await;
    }));

    let listener = TcpListener::bind(&args.registry_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.registry_listen))?;
    println!("registry listening on {}", listener.local_addr()?);

    let routes = tonic::service::Routes::new(socialcard_registry::grpc::RegistryGrpc::new(registry).into_server());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut server =
        tokio::spawn(socialcard_server::grpc::serve(listener, routes, &[socialcard_registry::SERVICE_NAME], async {
            let _ = stopped.await;
        }));
    tokio::select! {
        result = &mut server => result??,
        () = shutdown_signal() => {
            let _ = stop.send(());
            // In-flight calls get a grace period; a client holding a stream open does not keep us up.
            match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
                Ok(result) => result??,
                Err(_) => tracing::warn!("connections still open after the grace period; stopping anyway"),
            }
        }
    }
    let _ = stop_relay.send(true);
    if let Some(relay) = relay {
        let _ = relay.await;
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}
