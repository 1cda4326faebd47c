//! The loss coordinator as `socialcard up` and `socialcard serve loss-coordinator` start it: its gRPC
//! service, the registry's card events to it (which start the deadlines and catch locks made elsewhere),
//! its outbox to Kafka, and the background loop that drives unfinished cases and fires due timers.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use socialcard_domain::{BankDirectory, CityPolicy};
use socialcard_events::Metrics;
use socialcard_events::embedded::EmbeddedConsumer;
use socialcard_events::kafka::{ConsumerConfig, KafkaConsumer};
use socialcard_events::{Handler, topics};
use socialcard_loss_coordinator::events::CardEvents;
use socialcard_loss_coordinator::{Coordinator, CoordinatorConfig};
use socialcard_server::SystemClock;
use socialcard_server::tls::{Allow, RequirePeer, TlsDir};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::serve::{Events, Started, spawn_relay, until_stopped};

#[derive(Debug, Args)]
pub struct LossArgs {
    /// The loss coordinator's gRPC address (port 0 picks a free one).
    #[arg(long, env = "SOCIALCARD_LOSS_LISTEN", default_value = "127.0.0.1:50083")]
    pub loss_listen: String,
}

/// The coordinator's service name, for its certificates.
pub const SERVICE: &str = "loss-coordinator";

/// The coordinator's listener, bound before the bank adapters start (they hand branch losses to it).
#[derive(Debug)]
pub struct Listening {
    listener: TcpListener,
    pub addr: std::net::SocketAddr,
}

impl Listening {
    pub async fn bind(args: &LossArgs) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(&args.loss_listen)
            .await
            .with_context(|| format!("cannot listen on {} for the loss coordinator", args.loss_listen))?;
        let addr = listener.local_addr()?;
        println!("loss-coordinator listening on {addr}");
        Ok(Self { listener, addr })
    }
}

/// What the coordinator needs around it.
#[derive(Debug)]
pub struct Wiring<'a> {
    pub data_dir: &'a Path,
    /// The city's policy, the registry's own (R22-R24 deadlines, R27 lapses).
    pub policy: CityPolicy,
    pub banks: BankDirectory,
    pub registry: Channel,
    /// Each bank's adapter (its coordination service) by bank code.
    pub adapters: Vec<(String, Channel)>,
    pub events: &'a Events,
    pub metrics: Metrics,
    pub stopped: watch::Receiver<bool>,
    /// Under mutual TLS the coordinator serves with its certificate and admits our services only.
    pub tls: Option<&'a TlsDir>,
}

/// Starts the coordinator on its SQLite database under the data directory.
pub async fn start(listening: Listening, w: Wiring<'_>) -> anyhow::Result<Started> {
    let coordinator = Coordinator::open(
        &w.data_dir.join("loss-coordinator.db"),
        w.registry,
        w.adapters,
        Arc::new(SystemClock),
        CoordinatorConfig::new(w.policy, w.banks),
    )
    .await
    .context("cannot open the loss coordinator's database")?;
    let mut tasks = Vec::new();
    let card_events: Arc<dyn Handler> = Arc::new(CardEvents::new(coordinator.clone()));
    const GROUP: &str = "loss-coordinator";
    match w.events {
        Events::Kafka(k) => {
            tasks.push(spawn_relay(k, coordinator.outbox(), SERVICE, &w.metrics, &w.stopped)?);
            let consumer = KafkaConsumer::new(k, ConsumerConfig::new(GROUP, &[topics::CARD]), card_events)?
                .with_metrics(w.metrics.clone());
            let stopped = w.stopped.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = consumer.run(stopped).await {
                    tracing::error!(error = %e, "loss coordinator's consumer stopped");
                }
            }));
        }
        Events::Embedded(log) => {
            let mut consumer = EmbeddedConsumer::new(
                GROUP,
                topics::CARD,
                log.registry_outbox.clone(),
                coordinator.offsets(),
                card_events,
            );
            consumer.metrics = Some(w.metrics.clone());
            consumer.max_attempts = 50;
            tasks.push(tokio::spawn(consumer.run(w.stopped.clone())));
        }
    }
    tasks.push(tokio::spawn(coordinator.clone().run(w.stopped.clone())));
    let (routes, server_tls) = match w.tls {
        Some(t) => (
            tonic::service::Routes::new(InterceptedService::new(
                coordinator.into_server(),
                RequirePeer::new(SERVICE, Allow::services()),
            )),
            Some(t.server_config(SERVICE)?),
        ),
        None => (tonic::service::Routes::new(coordinator.into_server()), None),
    };
    let serving = until_stopped(w.stopped.clone());
    let server = tokio::spawn(async move {
        if let Err(e) = socialcard_server::grpc::serve_with_tls(
            listening.listener,
            routes,
            &[socialcard_loss_coordinator::SERVICE_NAME],
            server_tls,
            serving,
        )
        .await
        {
            tracing::error!(error = %e, "loss coordinator stopped");
        }
    });
    Ok(Started { server, background: tasks })
}
