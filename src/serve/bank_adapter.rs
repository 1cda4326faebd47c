//! One bank's adapter as `up` (eleven of them) and `serve bank-adapter` start it: its own SQLite
//! database, its `FinancialActivated` events to the registry, and its two gRPC services (the bank core's
//! and the loss coordinator's).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use socialcard_bank_adapter::loss::COORDINATION_SERVICE_NAME as COORDINATION_SERVICE;
use socialcard_bank_adapter::{BankAdapter, SERVICE_NAME as ADAPTER_SERVICE};
use socialcard_domain::PartnerBank;
use socialcard_events::embedded::EmbeddedConsumer;
use socialcard_events::{Handler, Metrics, topics};
use socialcard_registry::events::FinancialEvents;
use socialcard_server::tls::{TlsDir, adapter_service_name};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Channel;

use super::{Events, Started, spawn_relay, until_stopped};

#[derive(Debug, Args)]
pub struct AdapterArgs {
    /// The bank's code (its file `<code>.toml` in `--banks-dir`, or one of the Shanghai files).
    #[arg(long, env = "SOCIALCARD_BANK")]
    pub bank: String,
    /// Host the adapter listens on, at the port of its bank file.
    #[arg(long, env = "SOCIALCARD_BANK_HOST", default_value = "127.0.0.1")]
    pub bank_host: String,
    /// The adapter's address, instead of `--bank-host` and the bank file's port (port 0 picks a free one).
    #[arg(long, env = "SOCIALCARD_BANK_LISTEN")]
    pub bank_listen: Option<String>,
    /// The registry's gRPC endpoint.
    #[arg(long, env = "SOCIALCARD_REGISTRY_ENDPOINT", default_value = "http://127.0.0.1:50051")]
    pub registry_endpoint: String,
    /// The loss coordinator's gRPC endpoint (branch losses and unlocks go to it).
    #[arg(long, env = "SOCIALCARD_LOSS_ENDPOINT", default_value = "http://127.0.0.1:50083")]
    pub loss_endpoint: String,
}

/// The database file of a bank's adapter in its data directory (ops reads it in the embedded mode).
pub fn database_file(code: &str) -> String {
    format!("bank-{code}.db")
}

/// What an adapter needs around it.
#[derive(Debug)]
pub struct Wiring<'a> {
    pub bank: PartnerBank,
    pub data_dir: &'a Path,
    pub listen: &'a str,
    /// To the registry, with the adapter's service certificate under TLS.
    pub registry: Channel,
    /// To the loss coordinator, likewise.
    pub coordinator: Channel,
    pub events: &'a Events,
    pub metrics: Metrics,
    pub stopped: watch::Receiver<bool>,
    /// Under mutual TLS the adapter serves with its certificate and admits only its own bank (and, on
    /// the coordination service, our services).
    pub tls: Option<&'a TlsDir>,
}

/// Opens the adapter's database, binds its address (printing `bank-adapter[<code>] listening on <addr>`)
/// and serves it. Returns where it listens and its tasks.
pub async fn start(w: Wiring<'_>) -> anyhow::Result<(std::net::SocketAddr, Started)> {
    let code = w.bank.code.clone();
    let adapter = BankAdapter::open(w.bank, &w.data_dir.join(database_file(&code)), w.registry)
        .await
        .with_context(|| format!("cannot open the database of bank {code}"))?
        .with_coordinator(w.coordinator);
    let listener =
        TcpListener::bind(w.listen).await.with_context(|| format!("cannot listen on {} for bank {code}", w.listen))?;
    let addr = listener.local_addr()?;
    println!("bank-adapter[{code}] listening on {addr}");
    // Its FinancialActivated events reach the registry through Kafka or, embedded, straight from its outbox.
    let background = match w.events {
        Events::Kafka(k) => {
            vec![spawn_relay(k, adapter.outbox(), &format!("bank-adapter.{code}"), &w.metrics, &w.stopped)?]
        }
        Events::Embedded(log) => {
            let financial_events: Arc<dyn Handler> = Arc::new(FinancialEvents::new(log.registry.clone()));
            let mut consumer = EmbeddedConsumer::new(
                &format!("registry.{code}"),
                topics::FINANCIAL,
                adapter.outbox(),
                log.registry_offsets.clone(),
                financial_events,
            );
            consumer.metrics = Some(w.metrics.clone());
            // The registry may be briefly unable to write: keep trying rather than dead-letter.
            consumer.max_attempts = 50;
            vec![tokio::spawn(consumer.run(w.stopped.clone()))]
        }
    };
    let coordination = adapter.clone();
    // Under TLS only the bank's own certificate reaches its adapter.
    let (routes, server_tls) = match w.tls {
        Some(t) => (
            tonic::service::Routes::new(adapter.into_mtls_server())
                .add_service(coordination.into_mtls_coordination_server()),
            Some(t.server_config(&adapter_service_name(&code))?),
        ),
        None => (
            tonic::service::Routes::new(adapter.into_server()).add_service(coordination.into_coordination_server()),
            None,
        ),
    };
    let serving = until_stopped(w.stopped.clone());
    let server = tokio::spawn(async move {
        let served = socialcard_server::grpc::serve_with_tls(
            listener,
            routes,
            &[ADAPTER_SERVICE, COORDINATION_SERVICE],
            server_tls,
            serving,
        );
        if let Err(e) = served.await {
            tracing::error!(bank = %code, error = %e, "bank adapter stopped");
        }
    });
    Ok((addr, Started { server, background }))
}
