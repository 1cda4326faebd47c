//! `socialcard up`: every service in one process. Configuration comes from flags or their
//! `SOCIALCARD_*` environment variables; each service prints `<service> listening on <host:port>`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use socialcard_bank_adapter::loss::COORDINATION_SERVICE_NAME as COORDINATION_SERVICE;
use socialcard_bank_adapter::{BankAdapter, SERVICE_NAME as ADAPTER_SERVICE};
use socialcard_domain::BankDirectory;
use socialcard_domain::bank::{AdapterPorts, SHANGHAI_BANK_FILES};
use socialcard_events::Metrics;
use socialcard_events::embedded::EmbeddedConsumer;
use socialcard_events::kafka::{ConsumerConfig, KafkaConsumer};
use socialcard_events::kafka::{KafkaConfig, KafkaPublisher};
use socialcard_events::relay::RelayConfig;
use socialcard_registry::RegistryConfig;
use socialcard_registry::events::FinancialEvents;
use socialcard_server::SystemClock;
use socialcard_server::tls::{Allow, RequirePeer, TlsDir, adapter_service_name};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;

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
    /// Directory of bank files (`<code>.toml`); default: Shanghai's eleven, as in `deploy/banks/`.
    #[arg(long, env = "SOCIALCARD_BANKS_DIR")]
    banks_dir: Option<PathBuf>,
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

/// The partner banks: the files in `--banks-dir`, or the Shanghai files compiled in.
fn banks(args: &UpArgs) -> anyhow::Result<(BankDirectory, AdapterPorts)> {
    let texts: Vec<String> = match &args.banks_dir {
        Some(dir) => {
            let mut files: Vec<_> = std::fs::read_dir(dir)
                .with_context(|| format!("cannot read {}", dir.display()))?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "toml"))
                .collect();
            files.sort();
            files.iter().map(std::fs::read_to_string).collect::<Result<_, _>>()?
        }
        None => SHANGHAI_BANK_FILES.iter().map(|t| (*t).to_string()).collect(),
    };
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    BankDirectory::from_files(&refs).map_err(|r| anyhow::anyhow!("{r}"))
}

/// Completes once `stop` turns true (or its sender is gone).
async fn until_stopped(mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data directory {}", args.data_dir.display()))?;
    let db_url = match &args.registry_database_url {
        Some(url) => url.clone(),
        None => format!("sqlite://{}?mode=rwc", args.data_dir.join("registry.db").display()),
    };
    let (directory, ports) = banks(&args)?;
    let built = socialcard_registry::build(
        &db_url,
        Arc::new(SystemClock),
        RegistryConfig { banks: directory.clone(), ..RegistryConfig::shanghai(pin_key(&args)?) },
    )
    .await
    .context("cannot open the registry's database")?;
    let metrics = Metrics::new();
    let (stop, stopped) = watch::channel(false);
    let mut background = Vec::new();

    let kafka = match &args.kafka_brokers {
        Some(brokers) => {
            let mut kafka = KafkaConfig::new(brokers.clone());
            kafka.partitions = args.kafka_partitions;
            let mut topics: Vec<String> = socialcard_events::topics::ALL.iter().map(|t| (*t).to_string()).collect();
            topics.extend(socialcard_events::topics::ALL.iter().map(|t| socialcard_events::topics::dead_letter(t)));
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            socialcard_events::kafka::ensure_topics(&kafka, &names).await.context("cannot create the Kafka topics")?;
            Some(kafka)
        }
        None => {
            anyhow::ensure!(built.embedded_log, "a PostgreSQL registry publishes its events through --kafka-brokers");
            None
        }
    };
    let relay = |outbox, source: String| -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let kafka = kafka.as_ref().context("no Kafka")?;
        let publisher = Arc::new(KafkaPublisher::new(kafka).context("cannot create the Kafka producer")?);
        let config = RelayConfig { source, metrics: Some(metrics.clone()), ..RelayConfig::default() };
        Ok(tokio::spawn(socialcard_events::relay::run(outbox, publisher, config, stopped.clone())))
    };
    let financial_events: Arc<dyn socialcard_events::Handler> = Arc::new(FinancialEvents::new(built.registry.clone()));

    let metrics_listener = TcpListener::bind(&args.metrics_listen)
        .await
        .with_context(|| format!("cannot listen on {} for metrics", args.metrics_listen))?;
    println!("metrics listening on {}", metrics_listener.local_addr()?);
    let render: socialcard_server::metrics_http::Render = {
        let metrics = metrics.clone();
        Arc::new(move || metrics.render())
    };
    background.push(tokio::spawn(socialcard_server::metrics_http::serve(
        metrics_listener,
        render,
        until_stopped(stopped.clone()),
    )));

    let listener = TcpListener::bind(&args.registry_listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.registry_listen))?;
    let registry_addr = listener.local_addr()?;
    println!("registry listening on {registry_addr}");
    let tls = args.tls_dir.as_ref().map(TlsDir::new);
    if let Some(t) = &tls {
        println!("mutual TLS with the certificates in {}", t.root().display());
    }
    let scheme = if tls.is_some() { "https" } else { "http" };
    let registry_endpoint = tonic::transport::Channel::from_shared(format!("{scheme}://{registry_addr}"))?;

    // The loss coordinator listens first: the adapters hand branch losses and unlocks to it.
    let loss = crate::loss::Listening::bind(&args.loss).await?;
    let mut adapter_channels = Vec::new();

    // The bank adapters, each with its own database; their FinancialActivated events reach the registry
    // through Kafka or, embedded, straight from each adapter's outbox.
    for bank in directory.banks() {
        let code = bank.code.clone();
        // Under TLS each adapter calls the registry with its own service certificate.
        let registry_channel = match &tls {
            Some(t) => {
                let identity = t.service_client(&adapter_service_name(&code));
                registry_endpoint.clone().tls_config(t.client_config(&identity, "registry")?)?.connect_lazy()
            }
            None => registry_endpoint.connect_lazy(),
        };
        let adapter = BankAdapter::open(bank.clone(), &args.data_dir.join(format!("bank-{code}.db")), registry_channel)
            .await
            .with_context(|| format!("cannot open the database of bank {code}"))?
            .with_coordinator(crate::loss::service_channel(
                tls.as_ref(),
                loss.addr,
                &adapter_service_name(&code),
                crate::loss::SERVICE,
            )?);
        let port = ports.iter().find(|(c, _)| *c == code).and_then(|(_, p)| *p).unwrap_or(0);
        let addr =
            if args.bank_ports_auto { format!("{}:0", args.bank_host) } else { format!("{}:{port}", args.bank_host) };
        let bank_listener =
            TcpListener::bind(&addr).await.with_context(|| format!("cannot listen on {addr} for bank {code}"))?;
        let bank_addr = bank_listener.local_addr()?;
        println!("bank-adapter[{code}] listening on {bank_addr}");
        adapter_channels.push((
            code.clone(),
            crate::loss::service_channel(tls.as_ref(), bank_addr, crate::loss::SERVICE, &adapter_service_name(&code))?,
        ));
        let coordination = adapter.clone();
        match &kafka {
            Some(_) => background.push(relay(adapter.outbox(), format!("bank-adapter.{code}"))?),
            None => {
                let offsets = built.offsets.clone().context("the embedded log needs the SQLite registry")?;
                let mut consumer = EmbeddedConsumer::new(
                    &format!("registry.{code}"),
                    socialcard_events::topics::FINANCIAL,
                    adapter.outbox(),
                    offsets,
                    financial_events.clone(),
                );
                consumer.metrics = Some(metrics.clone());
                // The registry may be briefly unable to write: keep trying rather than dead-letter.
                consumer.max_attempts = 50;
                background.push(tokio::spawn(consumer.run(stopped.clone())));
            }
        }
        // Under TLS only the bank's own certificate reaches its adapter.
        let (routes, server_tls) = match &tls {
            Some(t) => (
                tonic::service::Routes::new(adapter.into_mtls_server())
                    .add_service(coordination.into_mtls_coordination_server()),
                Some(t.server_config(&adapter_service_name(&code))?),
            ),
            None => (
                tonic::service::Routes::new(adapter.into_server())
                    .add_service(coordination.into_coordination_server()),
                None,
            ),
        };
        let serving = until_stopped(stopped.clone());
        background.push(tokio::spawn(async move {
            let served = socialcard_server::grpc::serve_with_tls(
                bank_listener,
                routes,
                &[ADAPTER_SERVICE, COORDINATION_SERVICE],
                server_tls,
                serving,
            );
            if let Err(e) = served.await {
                tracing::error!(bank = %code, error = %e, "bank adapter stopped");
            }
        }));
    }

    match &kafka {
        Some(k) => {
            background.push(relay(built.outbox.clone(), "registry".into())?);
            let group = "registry";
            let consumer = KafkaConsumer::new(
                k,
                ConsumerConfig::new(group, &[socialcard_events::topics::FINANCIAL]),
                financial_events.clone(),
            )?
            .with_metrics(metrics.clone());
            let consuming = stopped.clone();
            background.push(tokio::spawn(async move {
                if let Err(e) = consumer.run(consuming).await {
                    tracing::error!(error = %e, "financial events consumer stopped");
                }
            }));
            let _sampler = socialcard_events::kafka::spawn_lag_sampler(
                k,
                group,
                &[socialcard_events::topics::FINANCIAL],
                metrics.clone(),
                std::time::Duration::from_secs(5),
                stopped.clone(),
            )?;
            println!("registry events published to kafka at {}", k.brokers);
        }
        None => println!("registry events kept in the embedded log (SQLite outbox)"),
    }

    // Postal: its service and webhook, CardProduced to it, its shipment events to the registry.
    background.extend(
        crate::postal::start(
            &args.postal,
            crate::postal::Wiring {
                data_dir: &args.data_dir,
                registry: built.registry.clone(),
                registry_outbox: built.outbox.clone(),
                registry_offsets: built.offsets.clone(),
                kafka: kafka.as_ref(),
                metrics: metrics.clone(),
                stopped: stopped.clone(),
            },
        )
        .await?,
    );

    // The loss coordinator: card events to it, its cases' calls to the registry and the adapters.
    background.extend(
        crate::loss::start(
            loss,
            crate::loss::Wiring {
                data_dir: &args.data_dir,
                banks: directory.clone(),
                registry: crate::loss::service_channel(tls.as_ref(), registry_addr, crate::loss::SERVICE, "registry")?,
                adapters: adapter_channels,
                registry_outbox: built.outbox.clone(),
                kafka: kafka.as_ref(),
                metrics: metrics.clone(),
                stopped: stopped.clone(),
                tls: tls.as_ref(),
            },
        )
        .await?,
    );

    // Ops: read models from every topic, its gRPC service and dashboard (after the services it reads).
    background.extend(
        crate::ops::start(
            &args.ops,
            crate::ops::Wiring {
                data_dir: &args.data_dir,
                banks: directory.clone(),
                registry_outbox: built.outbox.clone(),
                registry_offsets: built.offsets.clone(),
                kafka: kafka.as_ref(),
                metrics: metrics.clone(),
                stopped: stopped.clone(),
            },
        )
        .await?,
    );

    let registry_server = socialcard_registry::grpc::RegistryGrpc::new(built.registry).into_server();
    // Under TLS the registry serves our services only, each by its certificate; banks go through adapters.
    let (routes, registry_tls) = match &tls {
        Some(t) => (
            tonic::service::Routes::new(InterceptedService::new(
                registry_server,
                RequirePeer::new("registry", Allow::services()),
            )),
            Some(t.server_config("registry")?),
        ),
        None => (tonic::service::Routes::new(registry_server), None),
    };
    let mut server = tokio::spawn(socialcard_server::grpc::serve_with_tls(
        listener,
        routes,
        &[socialcard_registry::SERVICE_NAME],
        registry_tls,
        until_stopped(stopped.clone()),
    ));
    tokio::select! {
        result = &mut server => result??,
        () = shutdown_signal() => {
            let _ = stop.send(true);
            // In-flight calls get a grace period; a client holding a stream open does not keep us up.
            match tokio::time::timeout(SHUTDOWN_GRACE, server).await {
                Ok(result) => result??,
                Err(_) => tracing::warn!("connections still open after the grace period; stopping anyway"),
            }
        }
    }
    let _ = stop.send(true);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, async {
        for task in background {
            let _ = task.await;
        }
    })
    .await;
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
