//! `socialcard serve <service>`: one service per process, the distributed shape (`docker-compose.yml`,
//! `deploy/k8s/`). Each service starts through the same functions `socialcard up` uses to start it inside
//! one process; only the wiring differs: here events go through Kafka (the embedded log only works inside
//! one process and data directory) and the other services are reached at their network endpoints.
//!
//! Also the pieces both ways of running share: where events go ([`Events`]), the Kafka connection, the
//! relays, the metrics endpoint, the bank files, channels between services, and `socialcard health`.

pub mod bank_adapter;
pub mod registry;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use socialcard_domain::bank::{AdapterPorts, SHANGHAI_BANK_FILES};
use socialcard_domain::policy::SHANGHAI_CITY_FILE;
use socialcard_domain::{BankDirectory, CityPolicy};
use socialcard_events::embedded::SqliteOffsets;
use socialcard_events::kafka::{KafkaConfig, KafkaPublisher};
use socialcard_events::relay::RelayConfig;
use socialcard_events::{Metrics, Outbox};
use socialcard_registry::Registry;
use socialcard_server::tls::{TlsDir, adapter_service_name};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

/// Where a service's events go and where the events it consumes come from.
#[derive(Debug)]
pub enum Events {
    /// Kafka topics: every service publishes its outbox through a relay and consumes with a group.
    Kafka(KafkaConfig),
    /// The embedded log (`socialcard up` without a broker): consumers read the producing service's
    /// SQLite outbox directly, which works only with every service in one process and data directory.
    Embedded(EmbeddedLog),
}

impl Events {
    pub fn kafka(&self) -> Option<&KafkaConfig> {
        match self {
            Events::Kafka(k) => Some(k),
            Events::Embedded(_) => None,
        }
    }
}

/// The registry as the embedded log's consumers reach it: in process.
#[derive(Clone, Debug)]
pub struct EmbeddedLog {
    pub registry: Registry,
    pub registry_outbox: Arc<dyn Outbox>,
    /// Where the registry's embedded-log consumers keep their positions (and their dead letters).
    pub registry_offsets: SqliteOffsets,
}

/// Connects to Kafka and creates the topics (and their dead-letter topics) that are missing.
pub async fn connect_kafka(brokers: &str, partitions: i32) -> anyhow::Result<KafkaConfig> {
    let mut kafka = KafkaConfig::new(brokers.to_string());
    kafka.partitions = partitions;
    let mut topics: Vec<String> = socialcard_events::topics::ALL.iter().map(|t| (*t).to_string()).collect();
    topics.extend(socialcard_events::topics::ALL.iter().map(|t| socialcard_events::topics::dead_letter(t)));
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    socialcard_events::kafka::ensure_topics(&kafka, &names).await.context("cannot create the Kafka topics")?;
    Ok(kafka)
}

/// Publishes `outbox` to Kafka until stopped, its backlog in `metrics` under `source`.
pub fn spawn_relay(
    kafka: &KafkaConfig,
    outbox: Arc<dyn Outbox>,
    source: &str,
    metrics: &Metrics,
    stopped: &watch::Receiver<bool>,
) -> anyhow::Result<JoinHandle<()>> {
    let publisher = Arc::new(KafkaPublisher::new(kafka).context("cannot create the Kafka producer")?);
    let config = RelayConfig { source: source.into(), metrics: Some(metrics.clone()), ..RelayConfig::default() };
    Ok(tokio::spawn(socialcard_events::relay::run(outbox, publisher, config, stopped.clone())))
}

/// Serves Prometheus' `GET /metrics` for this process and prints `metrics listening on <addr>`.
pub async fn serve_metrics(
    listen: &str,
    metrics: &Metrics,
    stopped: &watch::Receiver<bool>,
) -> anyhow::Result<JoinHandle<()>> {
    let listener = TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen} for metrics"))?;
    println!("metrics listening on {}", listener.local_addr()?);
    let render: socialcard_server::metrics_http::Render = {
        let metrics = metrics.clone();
        Arc::new(move || metrics.render() + &socialcard_server::rpc_metrics::render())
    };
    Ok(tokio::spawn(socialcard_server::metrics_http::serve(listener, render, until_stopped(stopped.clone()))))
}

/// The partner banks: the files in `banks_dir`, or the Shanghai files compiled in.
pub fn banks(banks_dir: Option<&Path>) -> anyhow::Result<(BankDirectory, AdapterPorts)> {
    let texts: Vec<String> = match banks_dir {
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

/// The city's policy: the file at `path`, or Shanghai's compiled in (`deploy/city.toml`). The registry and
/// the loss coordinator must be given the same one.
pub fn city_policy(path: Option<&Path>) -> anyhow::Result<CityPolicy> {
    let text = match path {
        Some(p) => std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        None => SHANGHAI_CITY_FILE.to_string(),
    };
    CityPolicy::from_toml(&text).map_err(|r| match path {
        Some(p) => anyhow::anyhow!("{}: {r}", p.display()),
        None => anyhow::anyhow!("{r}"),
    })
}

/// A channel from one of our services (`client`) to another (`server`) at `target` (`host:port` or a
/// URL; its scheme is ignored): plaintext, or mutual TLS with `client`'s service certificate, expecting
/// `server`'s certificate whatever host name reaches it.
pub fn service_channel(tls: Option<&TlsDir>, target: &str, client: &str, server: &str) -> anyhow::Result<Channel> {
    let authority = target.split_once("://").map_or(target, |(_, rest)| rest).trim_end_matches('/');
    Ok(match tls {
        Some(t) => Endpoint::from_shared(format!("https://{authority}"))?
            .tls_config(t.client_config(&t.service_client(client), server)?)?
            .connect_lazy(),
        None => Endpoint::from_shared(format!("http://{authority}"))?.connect_lazy(),
    })
}

/// Completes once `stop` turns true (or its sender is gone).
pub async fn until_stopped(mut stop: watch::Receiver<bool>) {
    while !*stop.borrow() {
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// Completes on Ctrl-C or SIGTERM (what `docker stop` and Kubernetes send).
pub async fn shutdown_signal() {
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

const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs until a shutdown signal (or until the service's main server ends on its own), then stops
/// everything, giving in-flight calls and background tasks a grace period.
pub async fn run_until_signal(
    main: JoinHandle<anyhow::Result<()>>,
    background: Vec<JoinHandle<()>>,
    stop: watch::Sender<bool>,
) -> anyhow::Result<()> {
    let mut main = main;
    tokio::select! {
        result = &mut main => result??,
        () = shutdown_signal() => {
            let _ = stop.send(true);
            // A client holding a stream open does not keep us up.
            match tokio::time::timeout(SHUTDOWN_GRACE, main).await {
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

/// A started service: its gRPC server's task, and what runs beside it (relays, consumers, timers).
#[derive(Debug)]
pub struct Started {
    pub server: JoinHandle<()>,
    pub background: Vec<JoinHandle<()>>,
}

impl Started {
    /// Every task, for a process that runs many services (`socialcard up`).
    pub fn all(self) -> Vec<JoinHandle<()>> {
        let mut all = self.background;
        all.push(self.server);
        all
    }
}

/// The process' main task for a service whose server task logs its own error: a server that ends
/// before the process is told to stop is a failure (the container is restarted).
fn main_task(
    started: Started,
    background: &mut Vec<JoinHandle<()>>,
    stopped: &watch::Receiver<bool>,
) -> JoinHandle<anyhow::Result<()>> {
    background.extend(started.background);
    let stopped = stopped.clone();
    let server = started.server;
    tokio::spawn(async move {
        server.await.context("the server task failed")?;
        anyhow::ensure!(*stopped.borrow(), "the server stopped");
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------------
// `socialcard serve`

#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(subcommand)]
    service: Service,
    #[command(flatten)]
    common: Common,
}

/// What every service process takes.
#[derive(Debug, Args)]
struct Common {
    /// Kafka bootstrap servers (host:port,...): between processes events go through Kafka only.
    #[arg(long, global = true, env = "SOCIALCARD_KAFKA_BROKERS")]
    kafka_brokers: Option<String>,
    /// Partitions of each topic created at start (they cannot be grown later on every broker).
    #[arg(long, global = true, env = "SOCIALCARD_KAFKA_PARTITIONS", default_value_t = 8)]
    kafka_partitions: i32,
    /// Where this service's SQLite database and keys live (its own volume).
    #[arg(long, global = true, env = "SOCIALCARD_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// Directory of bank files (`<code>.toml`); default: Shanghai's eleven, as in `deploy/banks/`.
    #[arg(long, global = true, env = "SOCIALCARD_BANKS_DIR")]
    banks_dir: Option<PathBuf>,
    /// The city's policy file (as `deploy/city.toml`); default: Shanghai's. Give the registry and the loss
    /// coordinator the same file.
    #[arg(long, global = true, env = "SOCIALCARD_CITY_POLICY")]
    city_policy: Option<PathBuf>,
    /// Prometheus metrics over HTTP (`GET /metrics`).
    #[arg(long, global = true, env = "SOCIALCARD_METRICS_LISTEN", default_value = "127.0.0.1:9464")]
    metrics_listen: String,
    /// Serve (and call the other services) over mutual TLS with the certificates in this directory (the
    /// global `--tls-dir`).
    #[arg(skip)]
    tls_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Service {
    /// The registry: PostgreSQL (`--registry-database-url`) or SQLite in the data directory.
    Registry(registry::RegistryArgs),
    /// One bank's adapter (`--bank <code>`), its SQLite database in the data directory.
    BankAdapter(bank_adapter::AdapterArgs),
    /// The loss coordinator, reaching the registry and every bank's adapter.
    LossCoordinator(LossCoordinatorArgs),
    /// Postal: shipments and the courier webhook.
    Postal(crate::postal::PostalArgs),
    /// Ops: read models from every topic, its gRPC service and dashboard.
    Ops(crate::ops::OpsArgs),
}

impl Service {
    /// The service's name in traces (`OTEL_SERVICE_NAME` wins) and its certificates.
    pub fn name(&self) -> String {
        match self {
            Service::Registry(_) => "registry".into(),
            Service::BankAdapter(a) => adapter_service_name(&a.bank),
            Service::LossCoordinator(_) => crate::loss::SERVICE.into(),
            Service::Postal(_) => "postal".into(),
            Service::Ops(_) => "ops".into(),
        }
    }
}

impl ServeArgs {
    pub fn service_name(&self) -> String {
        self.service.name()
    }

    pub fn set_tls_dir(&mut self, tls_dir: Option<PathBuf>) {
        self.common.tls_dir = tls_dir;
    }
}

#[derive(Debug, Args)]
pub struct LossCoordinatorArgs {
    #[command(flatten)]
    listen: crate::loss::LossArgs,
    /// The registry's gRPC endpoint.
    #[arg(long, env = "SOCIALCARD_REGISTRY_ENDPOINT", default_value = "http://127.0.0.1:50051")]
    registry_endpoint: String,
    /// A bank's adapter, `<code>=<endpoint>` (repeatable); overrides the template for that bank.
    #[arg(long = "adapter", env = "SOCIALCARD_ADAPTERS", value_delimiter = ',', value_parser = parse_adapter)]
    adapters: Vec<(String, String)>,
    /// Every other bank's adapter: `{code}` is the bank's code, `{port}` the port of its bank file.
    #[arg(long, env = "SOCIALCARD_ADAPTER_ENDPOINT_TEMPLATE", default_value = "http://127.0.0.1:{port}")]
    adapter_endpoint_template: String,
}

fn parse_adapter(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((code, endpoint)) if !code.is_empty() && !endpoint.is_empty() => {
            Ok((code.trim().to_string(), endpoint.trim().to_string()))
        }
        _ => Err(format!("expected <bank code>=<endpoint>, got {s:?}")),
    }
}

/// The endpoint of each bank's adapter: given by `--adapter`, else from the template.
fn adapter_endpoints(
    args: &LossCoordinatorArgs,
    directory: &BankDirectory,
    ports: &AdapterPorts,
) -> anyhow::Result<Vec<(String, String)>> {
    for (code, _) in &args.adapters {
        anyhow::ensure!(directory.get(code).is_some(), "--adapter names {code}, which is no partner bank");
    }
    directory
        .banks()
        .iter()
        .map(|bank| {
            let code = &bank.code;
            if let Some((_, endpoint)) = args.adapters.iter().find(|(c, _)| c == code) {
                return Ok((code.clone(), endpoint.clone()));
            }
            let template = &args.adapter_endpoint_template;
            let port = ports.iter().find(|(c, _)| c == code).and_then(|(_, p)| *p);
            let endpoint = match port {
                Some(p) => template.replace("{port}", &p.to_string()),
                None if template.contains("{port}") => {
                    anyhow::bail!("bank {code} has no port in its file: give --adapter {code}=<endpoint>")
                }
                None => template.clone(),
            };
            Ok((code.clone(), endpoint.replace("{code}", code)))
        })
        .collect()
}

pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let common = args.common;
    std::fs::create_dir_all(&common.data_dir)
        .with_context(|| format!("cannot create data directory {}", common.data_dir.display()))?;
    let policy = city_policy(common.city_policy.as_deref())?;
    let brokers = common
        .kafka_brokers
        .as_deref()
        .context("a service on its own reaches the others' events through Kafka: give --kafka-brokers")?;
    let kafka = connect_kafka(brokers, common.kafka_partitions).await?;
    let events = Events::Kafka(kafka);
    let (directory, ports) = banks(common.banks_dir.as_deref())?;
    let tls = common.tls_dir.as_ref().map(TlsDir::new);
    if let Some(t) = &tls {
        println!("mutual TLS with the certificates in {}", t.root().display());
    }
    let metrics = Metrics::new();
    let (stop, stopped) = watch::channel(false);
    let mut background = vec![serve_metrics(&common.metrics_listen, &metrics, &stopped).await?];
    let data_dir = common.data_dir.as_path();

    let main = match args.service {
        Service::Registry(a) => {
            let listener = registry::bind(&a.registry_listen).await?;
            let built = registry::open(&a, data_dir, policy, directory).await?;
            background.extend(registry::consume(&built, &events, &metrics, &stopped)?);
            let kafka = events.kafka().context("no Kafka")?;
            println!("registry events published to kafka at {}", kafka.brokers);
            let served = registry::serve(listener, built.registry, tls.as_ref(), &stopped)?;
            tokio::spawn(async move { Ok(served.await??) })
        }
        Service::BankAdapter(a) => {
            let bank = directory.get(&a.bank).cloned().with_context(|| format!("no bank file for {:?}", a.bank))?;
            let port = ports.iter().find(|(c, _)| *c == bank.code).and_then(|(_, p)| *p);
            let listen = match (&a.bank_listen, port) {
                (Some(listen), _) => listen.clone(),
                (None, Some(port)) => format!("{}:{port}", a.bank_host),
                (None, None) => anyhow::bail!("bank {} has no port in its file: give --bank-listen", bank.code),
            };
            let service = adapter_service_name(&bank.code);
            let (_, started) = bank_adapter::start(bank_adapter::Wiring {
                registry: service_channel(tls.as_ref(), &a.registry_endpoint, &service, "registry")?,
                coordinator: service_channel(tls.as_ref(), &a.loss_endpoint, &service, crate::loss::SERVICE)?,
                bank,
                data_dir,
                listen: &listen,
                events: &events,
                metrics: metrics.clone(),
                stopped: stopped.clone(),
                tls: tls.as_ref(),
            })
            .await?;
            main_task(started, &mut background, &stopped)
        }
        Service::LossCoordinator(a) => {
            let listening = crate::loss::Listening::bind(&a.listen).await?;
            let client = crate::loss::SERVICE;
            let adapters = adapter_endpoints(&a, &directory, &ports)?
                .into_iter()
                .map(|(code, endpoint)| {
                    let channel = service_channel(tls.as_ref(), &endpoint, client, &adapter_service_name(&code))?;
                    Ok((code, channel))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let started = crate::loss::start(
                listening,
                crate::loss::Wiring {
                    data_dir,
                    policy,
                    banks: directory,
                    registry: service_channel(tls.as_ref(), &a.registry_endpoint, client, "registry")?,
                    adapters,
                    events: &events,
                    metrics: metrics.clone(),
                    stopped: stopped.clone(),
                    tls: tls.as_ref(),
                },
            )
            .await?;
            main_task(started, &mut background, &stopped)
        }
        Service::Postal(a) => {
            let w =
                crate::postal::Wiring { data_dir, events: &events, metrics: metrics.clone(), stopped: stopped.clone() };
            main_task(crate::postal::start(&a, w).await?, &mut background, &stopped)
        }
        Service::Ops(a) => {
            let w = crate::ops::Wiring {
                data_dir,
                banks: directory,
                events: &events,
                metrics: metrics.clone(),
                stopped: stopped.clone(),
            };
            main_task(crate::ops::start(&a, w).await?, &mut background, &stopped)
        }
    };
    run_until_signal(main, background, stop).await
}

// ---------------------------------------------------------------------------------------------------
// `socialcard health`

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The service name to ask about (`grpc.health.v1`); empty: the whole server.
    #[arg(long, default_value = "")]
    service: String,
    /// Under TLS (the global `--tls-dir`): whose server certificate to expect, e.g. `registry`,
    /// `loss-coordinator`, `bank-adapter-icbc`. No client certificate is presented (health needs none).
    #[arg(long)]
    tls_server: Option<String>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 3)]
    timeout: u64,
}

/// Exits 0 when the server at `endpoint` answers SERVING: the containers' health check, without a
/// separate probe binary.
pub async fn health(endpoint: &str, tls_dir: Option<&Path>, args: HealthArgs) -> anyhow::Result<()> {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let timeout = std::time::Duration::from_secs(args.timeout.max(1));
    let authority = endpoint.split_once("://").map_or(endpoint, |(_, rest)| rest).trim_end_matches('/');
    let endpoint = match (tls_dir, &args.tls_server) {
        (Some(dir), Some(server)) => {
            let ca = TlsDir::new(dir).ca_certificate()?;
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(ca)
                .domain_name(socialcard_server::tls::server_dns_name(server));
            Endpoint::from_shared(format!("https://{authority}"))?.tls_config(tls)?
        }
        (None, Some(_)) => anyhow::bail!("--tls-server needs the certificates: give --tls-dir"),
        (_, None) => Endpoint::from_shared(format!("http://{authority}"))?,
    };
    let check = async {
        let channel = endpoint.connect_timeout(timeout).connect().await?;
        let status = HealthClient::new(channel)
            .check(HealthCheckRequest { service: args.service.clone() })
            .await
            .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
            .into_inner()
            .status;
        anyhow::Ok(status)
    };
    let status = tokio::time::timeout(timeout, check).await.context("no answer in time")??;
    let name = ServingStatus::try_from(status).map_or("UNKNOWN", |s| s.as_str_name());
    println!("{name}");
    anyhow::ensure!(status == ServingStatus::Serving as i32, "not serving");
    Ok(())
}
