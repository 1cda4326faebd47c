//! `socialcard up`: every service in one process. Configuration comes from flags or their
//! `SOCIALCARD_*` environment variables; each service prints `<service> listening on <host:port>`.
//! Each service starts through the same function as `socialcard serve <service>` (see `serve`); only
//! the wiring differs: here the services reach each other on loopback, and without a broker events go
//! through the embedded log.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use socialcard_events::Metrics;
use socialcard_server::tls::{TlsDir, adapter_service_name};
use tokio::sync::watch;

use crate::serve::{EmbeddedLog, Events, service_channel};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Where the embedded databases and keys live.
    #[arg(long, env = "SOCIALCARD_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    #[command(flatten)]
    registry: crate::serve::registry::RegistryArgs,
    /// Kafka bootstrap servers (host:port,...). Without it, events stay in the embedded log.
    #[arg(long, env = "SOCIALCARD_KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// Partitions of each topic created at start (they cannot be grown later on every broker).
    #[arg(long, env = "SOCIALCARD_KAFKA_PARTITIONS", default_value_t = 8)]
    kafka_partitions: i32,
    /// Directory of bank files (`<code>.toml`); default: Shanghai's eleven, as in `deploy/banks/`.
    #[arg(long, env = "SOCIALCARD_BANKS_DIR")]
    banks_dir: Option<PathBuf>,
    /// The city's policy file (as `deploy/city.toml`); default: Shanghai's. The registry and the loss
    /// coordinator both follow it.
    #[arg(long, env = "SOCIALCARD_CITY_POLICY")]
    city_policy: Option<PathBuf>,
    /// Host the bank adapters listen on (each on the port of its bank file).
    #[arg(long, env = "SOCIALCARD_BANK_HOST", default_value = "127.0.0.1")]
    bank_host: String,
    /// Let every bank adapter pick a free port instead of its configured one.
    #[arg(long, env = "SOCIALCARD_BANK_PORTS_AUTO")]
    bank_ports_auto: bool,
    /// Prometheus metrics over HTTP (`GET /metrics`).
    #[arg(long, env = "SOCIALCARD_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    metrics_listen: String,
    #[command(flatten)]
    postal: crate::postal::PostalArgs,
    #[command(flatten)]
    loss: crate::loss::LossArgs,
    #[command(flatten)]
    ops: crate::ops::OpsArgs,
    /// Serve the registry and the bank adapters over mutual TLS with the certificates in this directory
    /// (the global `--tls-dir`, `socialcard certs --out <dir>`). Without it: plaintext, on loopback.
    #[arg(skip)]
    pub(crate) tls_dir: Option<PathBuf>,
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data directory {}", args.data_dir.display()))?;
    let (directory, ports) = crate::serve::banks(args.banks_dir.as_deref())?;
    let policy = crate::serve::city_policy(args.city_policy.as_deref())?;
    let built = crate::serve::registry::open(&args.registry, &args.data_dir, policy.clone(), directory.clone()).await?;
    let events = match &args.kafka_brokers {
        Some(brokers) => Events::Kafka(crate::serve::connect_kafka(brokers, args.kafka_partitions).await?),
        None => {
            anyhow::ensure!(built.embedded_log, "a PostgreSQL registry publishes its events through --kafka-brokers");
            Events::Embedded(EmbeddedLog {
                registry: built.registry.clone(),
                registry_outbox: built.outbox.clone(),
                registry_offsets: built.offsets.clone().context("the embedded log needs the SQLite registry")?,
            })
        }
    };
    let metrics = Metrics::new();
    let (stop, stopped) = watch::channel(false);
    let mut background = vec![crate::serve::serve_metrics(&args.metrics_listen, &metrics, &stopped).await?];

    let listener = crate::serve::registry::bind(&args.registry.registry_listen).await?;
    let registry_addr = listener.local_addr()?.to_string();
    let tls = args.tls_dir.as_ref().map(TlsDir::new);
    if let Some(t) = &tls {
        println!("mutual TLS with the certificates in {}", t.root().display());
    }

    // The loss coordinator listens first: the adapters hand branch losses and unlocks to it.
    let loss = crate::loss::Listening::bind(&args.loss).await?;
    let loss_addr = loss.addr.to_string();
    let mut adapter_channels = Vec::new();

    // The bank adapters, each with its own database.
    for bank in directory.banks() {
        let code = bank.code.clone();
        let service = adapter_service_name(&code);
        let port = ports.iter().find(|(c, _)| *c == code).and_then(|(_, p)| *p).unwrap_or(0);
        let listen =
            if args.bank_ports_auto { format!("{}:0", args.bank_host) } else { format!("{}:{port}", args.bank_host) };
        let (bank_addr, started) = crate::serve::bank_adapter::start(crate::serve::bank_adapter::Wiring {
            bank: bank.clone(),
            data_dir: &args.data_dir,
            listen: &listen,
            // Under TLS each adapter calls the registry and the coordinator with its own service certificate.
            registry: service_channel(tls.as_ref(), &registry_addr, &service, "registry")?,
            coordinator: service_channel(tls.as_ref(), &loss_addr, &service, crate::loss::SERVICE)?,
            events: &events,
            metrics: metrics.clone(),
            stopped: stopped.clone(),
            tls: tls.as_ref(),
        })
        .await?;
        adapter_channels
            .push((code, service_channel(tls.as_ref(), &bank_addr.to_string(), crate::loss::SERVICE, &service)?));
        background.extend(started.all());
    }

    // The registry's own events: published and consumed through Kafka (embedded: read where opened).
    background.extend(crate::serve::registry::consume(&built, &events, &metrics, &stopped)?);

    // Postal: its service and webhook, CardProduced to it, its shipment events to the registry.
    let postal_wiring = crate::postal::Wiring {
        data_dir: &args.data_dir,
        events: &events,
        metrics: metrics.clone(),
        stopped: stopped.clone(),
    };
    background.extend(crate::postal::start(&args.postal, postal_wiring).await?.all());

    // The loss coordinator: card events to it, its cases' calls to the registry and the adapters.
    background.extend(
        crate::loss::start(
            loss,
            crate::loss::Wiring {
                data_dir: &args.data_dir,
                policy,
                banks: directory.clone(),
                registry: service_channel(tls.as_ref(), &registry_addr, crate::loss::SERVICE, "registry")?,
                adapters: adapter_channels,
                events: &events,
                metrics: metrics.clone(),
                stopped: stopped.clone(),
                tls: tls.as_ref(),
            },
        )
        .await?
        .all(),
    );

    // Ops: read models from every topic, its gRPC service and dashboard (after the services it reads).
    background.extend(
        crate::ops::start(
            &args.ops,
            crate::ops::Wiring {
                data_dir: &args.data_dir,
                banks: directory.clone(),
                events: &events,
                metrics: metrics.clone(),
                stopped: stopped.clone(),
            },
        )
        .await?
        .all(),
    );

    let server = crate::serve::registry::serve(listener, built.registry, tls.as_ref(), &stopped)?;
    let main = tokio::spawn(async move { Ok(server.await??) });
    crate::serve::run_until_signal(main, background, stop).await
}
