//! Postal as `socialcard up` and `socialcard serve postal` start it (its gRPC service, the courier
//! webhook, and the two event paths: card events to postal, shipment events to the registry, which over
//! Kafka the registry consumes itself), and the CLI's CSV import
//! (`socialcard postal-import <file>`), which streams a courier's batch file to the running service.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use clap::Args;
use socialcard_events::Metrics;
use socialcard_events::embedded::EmbeddedConsumer;
use socialcard_events::kafka::{ConsumerConfig, KafkaConsumer};
use socialcard_events::{Handler, topics};
use socialcard_postal::PostalConfig;
use socialcard_proto::postal::v1::postal_service_client::PostalServiceClient;
use socialcard_server::SystemClock;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::serve::{Events, Started, spawn_relay, until_stopped};

#[derive(Debug, Args)]
pub struct PostalArgs {
    /// Postal's gRPC address (port 0 picks a free one).
    #[arg(long, env = "SOCIALCARD_POSTAL_LISTEN", default_value = "127.0.0.1:50081")]
    postal_listen: String,
    /// The courier webhook's HTTP address (`POST /courier/v1/events`; put TLS in front of it).
    #[arg(long, env = "SOCIALCARD_POSTAL_WEBHOOK_LISTEN", default_value = "127.0.0.1:50082")]
    postal_webhook_listen: String,
    /// The courier's webhook signing secret; default: a random one kept in `<data-dir>/postal-webhook.key`.
    #[arg(long, env = "SOCIALCARD_POSTAL_WEBHOOK_SECRET", hide_env_values = true)]
    postal_webhook_secret: Option<String>,
    /// Days after which an open shipment is overdue.
    #[arg(long, env = "SOCIALCARD_POSTAL_SLA_DAYS", default_value_t = 7)]
    postal_sla_days: u32,
}

/// The webhook secret: given, or read from (created in) the data directory.
fn webhook_secret(args: &PostalArgs, data_dir: &Path) -> anyhow::Result<Vec<u8>> {
    if let Some(s) = &args.postal_webhook_secret {
        anyhow::ensure!(s.len() >= 16, "the postal webhook secret needs at least 16 characters");
        return Ok(s.as_bytes().to_vec());
    }
    let path = data_dir.join("postal-webhook.key");
    if !path.exists() {
        let mut key = vec![0u8; 32];
        rand::fill(&mut key[..]);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options.open(&path)?.write_all(hex::encode(&key).as_bytes())?;
    }
    Ok(std::fs::read_to_string(&path)?.trim().as_bytes().to_vec())
}

/// What postal needs around it.
#[derive(Debug)]
pub struct Wiring<'a> {
    pub data_dir: &'a Path,
    pub events: &'a Events,
    pub metrics: Metrics,
    pub stopped: watch::Receiver<bool>,
}

/// Starts postal: its gRPC service, the webhook, and the events between it and the registry.
pub async fn start(args: &PostalArgs, w: Wiring<'_>) -> anyhow::Result<Started> {
    let mut config = PostalConfig::new(webhook_secret(args, w.data_dir)?);
    config.sla_days = args.postal_sla_days;
    let postal = socialcard_postal::open(&w.data_dir.join("postal.db"), Arc::new(SystemClock), config)
        .await
        .context("cannot open postal's database")?;
    let mut tasks = Vec::new();
    let card_events: Arc<dyn Handler> = Arc::new(socialcard_postal::events::CardEvents::new(postal.clone()));
    match w.events {
        Events::Kafka(k) => {
            tasks.push(spawn_relay(k, postal.store().outbox(), "postal", &w.metrics, &w.stopped)?);
            let group = socialcard_postal::CONSUMER_GROUP;
            let consumer = KafkaConsumer::new(k, ConsumerConfig::new(group, &[topics::CARD]), card_events)?
                .with_metrics(w.metrics.clone());
            let stopped = w.stopped.clone();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = consumer.run(stopped).await {
                    tracing::error!(group, error = %e, "consumer stopped");
                }
            }));
        }
        Events::Embedded(log) => {
            let shipment_events: Arc<dyn Handler> =
                Arc::new(socialcard_registry::shipment_events::ShipmentEvents::new(log.registry.clone()));
            for mut consumer in [
                EmbeddedConsumer::new(
                    socialcard_postal::CONSUMER_GROUP,
                    topics::CARD,
                    log.registry_outbox.clone(),
                    postal.store().offsets(),
                    card_events,
                ),
                EmbeddedConsumer::new(
                    "registry.postal",
                    topics::SHIPMENT,
                    postal.store().outbox(),
                    log.registry_offsets.clone(),
                    shipment_events,
                ),
            ] {
                consumer.metrics = Some(w.metrics.clone());
                // A database briefly unable to write: keep trying rather than dead-letter.
                consumer.max_attempts = 50;
                tasks.push(tokio::spawn(consumer.run(w.stopped.clone())));
            }
        }
    }

    let listener = TcpListener::bind(&args.postal_listen)
        .await
        .with_context(|| format!("cannot listen on {} for postal", args.postal_listen))?;
    println!("postal listening on {}", listener.local_addr()?);
    let webhook = TcpListener::bind(&args.postal_webhook_listen)
        .await
        .with_context(|| format!("cannot listen on {} for the postal webhook", args.postal_webhook_listen))?;
    println!("postal webhook listening on {}", webhook.local_addr()?);
    tasks.push(tokio::spawn(socialcard_postal::webhook::serve(
        webhook,
        postal.clone(),
        until_stopped(w.stopped.clone()),
    )));
    let routes = tonic::service::Routes::new(socialcard_postal::grpc::PostalGrpc::new(postal).into_server());
    let serving = until_stopped(w.stopped.clone());
    let server = tokio::spawn(async move {
        if let Err(e) =
            socialcard_server::grpc::serve(listener, routes, &[socialcard_postal::SERVICE_NAME], serving).await
        {
            tracing::error!(error = %e, "postal stopped");
        }
    });
    Ok(Started { server, background: tasks })
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The courier's CSV file: a header naming event_id, waybill, status, occurred_at (sub_reason,
    /// point_id optional), then one status update per line.
    file: PathBuf,
    /// Postal's gRPC endpoint.
    #[arg(long, env = "SOCIALCARD_POSTAL_ENDPOINT", default_value = "http://127.0.0.1:50081")]
    postal_endpoint: String,
    /// Updates per streamed batch (each acknowledged before the next).
    #[arg(long, default_value_t = 2000)]
    batch: usize,
}

/// Checks the whole file first (a bad line refuses the file: nothing is sent), then streams it to
/// postal in batches, with progress on stderr. Safe to run again: postal ignores event ids it has seen.
pub async fn import(args: ImportArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?;
    let updates = match socialcard_postal::feed::parse_csv(&text, time::OffsetDateTime::now_utc()) {
        Ok(u) => u,
        Err(errors) => {
            for (line, r) in errors.iter().take(50) {
                eprintln!("{}:{line}: {} {}", args.file.display(), r.reason, r.message);
            }
            anyhow::bail!("{} bad lines; nothing was imported", errors.len());
        }
    };
    let mut client = PostalServiceClient::connect(args.postal_endpoint.clone())
        .await
        .with_context(|| format!("cannot reach postal at {}", args.postal_endpoint))?;
    let total = updates.len();
    let (mut applied, mut duplicates, mut unknown, mut late) = (0, 0, 0, 0);
    let mut sent = 0;
    let mut progress = Progress::new(total, std::io::IsTerminal::is_terminal(&std::io::stderr()));
    progress.show(0);
    for chunk in updates.chunks(args.batch.max(1)) {
        let messages: Vec<_> = chunk.iter().map(socialcard_postal::grpc::update_to_pb).collect();
        let r = client
            .stream_status_updates(tokio_stream::iter(messages))
            .await
            .map_err(|s| {
                let reason = socialcard_server::error::reason_of(&s).unwrap_or_default();
                anyhow::anyhow!("{:?} {reason}: {} (the first {sent} updates were imported)", s.code(), s.message())
            })?
            .into_inner();
        sent += chunk.len();
        (applied, duplicates, unknown, late) =
            (applied + r.applied, duplicates + r.duplicates, unknown + r.unknown_waybills, late + r.out_of_order);
        progress.show(sent);
    }
    progress.finish();
    println!(
        "{total} updates: {applied} applied ({late} out of order), {duplicates} duplicates, {unknown} for unknown waybills (kept aside)"
    );
    Ok(())
}

/// The import's progress bar on stderr: redrawn in place on a terminal; on a pipe or a log file, a
/// new line at each tenth, so that logs stay readable.
struct Progress {
    total: usize,
    terminal: bool,
    last_tenth: Option<usize>,
}

impl Progress {
    const WIDTH: usize = 30;

    fn new(total: usize, terminal: bool) -> Self {
        Progress { total, terminal, last_tenth: None }
    }

    /// `[=============>                ]  45%  900/2000`
    fn bar(&self, done: usize) -> String {
        let total = self.total.max(1);
        let done = done.min(total);
        let filled = done * Self::WIDTH / total;
        let head = if filled < Self::WIDTH && done > 0 { ">" } else { "" };
        let pad = Self::WIDTH - filled - head.len();
        format!("[{}{head}{}] {:>3}%  {done}/{}", "=".repeat(filled), " ".repeat(pad), done * 100 / total, self.total)
    }

    fn show(&mut self, done: usize) {
        if self.terminal {
            eprint!("\r{}", self.bar(done));
            return;
        }
        let tenth = done * 10 / self.total.max(1);
        if self.last_tenth != Some(tenth) {
            self.last_tenth = Some(tenth);
            eprintln!("{}", self.bar(done));
        }
    }

    fn finish(&self) {
        if self.terminal {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Progress;

    #[test]
    fn the_bar_fills_with_the_share_done() {
        let p = Progress::new(2000, false);
        assert_eq!(p.bar(0), format!("[{}]   0%  0/2000", " ".repeat(30)));
        assert_eq!(p.bar(900), format!("[{}>{}]  45%  900/2000", "=".repeat(13), " ".repeat(16)));
        assert_eq!(p.bar(2000), format!("[{}] 100%  2000/2000", "=".repeat(30)));
        // An empty file is done at once, and more than the total never overflows the bar.
        assert_eq!(Progress::new(0, false).bar(0), format!("[{}]   0%  0/0", " ".repeat(30)));
        assert_eq!(p.bar(5000), p.bar(2000));
    }
}
