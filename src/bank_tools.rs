//! The bank-side tools: `certs` (a development PKI for mutual TLS), `reconcile` (a bank's daily file
//! against its adapter and the registry) and `bank-sim` (a bank core's tellers against its adapter).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use socialcard_bank_adapter::BankAdapter;
use socialcard_domain::bank::{AdapterPorts, SHANGHAI_BANK_FILES};
use socialcard_domain::{BankDirectory, PartnerBank};
use socialcard_proto::bank::v1::bank_card_service_client::BankCardServiceClient;
use socialcard_proto::registry::v1::registry_service_client::RegistryServiceClient;
use socialcard_server::tls::{CertPaths, TlsDir, adapter_service_name};
use tonic::transport::Endpoint;

use crate::cli::Connection;

#[derive(Debug, Subcommand)]
pub enum BankTool {
    /// Generate a development CA and every certificate for mutual TLS: the banks' client certificates,
    /// server certificates for the registry and each adapter, our services' client certificates.
    Certs {
        /// Directory to write (`ca.pem`, `banks/`, `servers/`, `services/`); `up --tls-dir` reads it.
        #[arg(long)]
        out: PathBuf,
        /// Directory of bank files (`<code>.toml`); default: Shanghai's eleven.
        #[arg(long, env = "SOCIALCARD_BANKS_DIR")]
        banks_dir: Option<PathBuf>,
    },
    /// Reconcile a bank's day: write the adapter's file, and/or check the bank core's file against the
    /// adapter's records and the registry (the adapter's database is opened in this process; the
    /// registry is reached at --endpoint).
    Reconcile(ReconcileArgs),
    /// Simulate a bank core's tellers against its adapter: activations, losses, unlocks; writes the
    /// bank's daily file.
    BankSim(BankSimArgs),
}

#[derive(Debug, Args)]
pub struct ReconcileArgs {
    /// The bank's code (its adapter's database is `<data-dir>/bank-<code>.db`).
    #[arg(long)]
    bank: String,
    /// The business day, YYYY-MM-DD (Shanghai time).
    #[arg(long)]
    date: String,
    /// The bank core's file of the day, in the bank's layout.
    #[arg(long)]
    bank_file: Option<PathBuf>,
    /// Run the repairs (each under a key derived from the bank, day and card: safe to repeat).
    #[arg(long)]
    repair: bool,
    /// Where to write the JSON report; default: standard output.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write the adapter's own file of the day here.
    #[arg(long)]
    write_file: Option<PathBuf>,
    #[arg(long, env = "SOCIALCARD_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    #[arg(long, env = "SOCIALCARD_BANKS_DIR")]
    banks_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BankSimArgs {
    /// The bank whose core system is simulated.
    #[arg(long)]
    bank: String,
    /// Its adapter; default: the port of the bank's file on 127.0.0.1.
    #[arg(long)]
    adapter: Option<String>,
    /// Cards taken through the day (each activated).
    #[arg(long, default_value_t = 20)]
    cards: usize,
    /// Teller sessions in flight.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// At most this many bank calls per second (default: as fast as the adapter answers).
    #[arg(long)]
    rate: Option<f64>,
    /// Percent of activated cards then reported lost at a branch.
    #[arg(long, default_value_t = 20)]
    loss_percent: u8,
    /// Percent of lost cards then unlocked.
    #[arg(long, default_value_t = 50)]
    unlock_percent: u8,
    /// Number of the first fixture person (default: random, so runs on one registry do not collide).
    #[arg(long)]
    first_person: Option<u64>,
    /// Leave this many activations out of the bank's file (to demonstrate reconciliation).
    #[arg(long, default_value_t = 0)]
    omit_from_file: usize,
    /// Write the bank core's file of the day here, in the bank's layout.
    #[arg(long)]
    bank_file: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    #[arg(long, env = "SOCIALCARD_BANKS_DIR")]
    banks_dir: Option<PathBuf>,
}

/// The partner banks: the files in `dir`, or the Shanghai files compiled in.
fn banks(dir: Option<&PathBuf>) -> anyhow::Result<(BankDirectory, AdapterPorts)> {
    let texts: Vec<String> = match dir {
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

fn bank(dir: Option<&PathBuf>, code: &str) -> anyhow::Result<(PartnerBank, Option<u16>)> {
    let (directory, ports) = banks(dir)?;
    let bank = directory.require("bank", code).map_err(|r| anyhow::anyhow!("{r}"))?.clone();
    let port = ports.iter().find(|(c, _)| c == code).and_then(|(_, p)| *p);
    Ok((bank, port))
}

/// The endpoint `url` for a client of `service`. With `--tls-dir` it is mutual TLS (`http://` is read as
/// `https://`), presenting the certificate `identity` picks and expecting `service`'s server certificate.
pub(crate) fn client_endpoint(
    connection: &Connection,
    url: &str,
    identity: impl FnOnce(&TlsDir) -> CertPaths,
    service: &str,
) -> anyhow::Result<Endpoint> {
    let Some(dir) = connection.tls_dir.as_ref().map(TlsDir::new) else {
        return Endpoint::from_shared(url.to_string()).with_context(|| format!("bad endpoint {url}"));
    };
    let url = match url.strip_prefix("http://") {
        Some(rest) => format!("https://{rest}"),
        None => url.to_string(),
    };
    let endpoint = Endpoint::from_shared(url.clone()).with_context(|| format!("bad endpoint {url}"))?;
    Ok(endpoint.tls_config(dir.client_config(&identity(&dir), service)?)?)
}

pub async fn run(connection: &Connection, tool: BankTool) -> anyhow::Result<()> {
    match tool {
        BankTool::Certs { out, banks_dir } => {
            let (directory, _) = banks(banks_dir.as_ref())?;
            let codes: Vec<&str> = directory.banks().iter().map(|b| b.code.as_str()).collect();
            let dir = TlsDir::new(&out);
            let written = socialcard_server::tls::dev_ca::write_dev_pki(&dir, &codes)?;
            println!("wrote {written} files to {} (development CA, not for production)", out.display());
            println!("  ca.pem                     trust anchor for every client and server");
            println!("  banks/<code>.pem|.key      each bank core's client certificate ({} banks)", codes.len());
            println!("  servers/<service>.pem|.key registry and bank-adapter-<code> server certificates");
            println!("  services/<name>.pem|.key   our services' client certificates");
            println!("serve with: socialcard up --tls-dir {}", out.display());
            Ok(())
        }
        BankTool::Reconcile(a) => reconcile(connection, a).await,
        BankTool::BankSim(a) => bank_sim(connection, a).await,
    }
}

async fn reconcile(connection: &Connection, a: ReconcileArgs) -> anyhow::Result<()> {
    let date = time::Date::parse(&a.date, time::macros::format_description!("[year]-[month]-[day]"))
        .context("--date must be YYYY-MM-DD")?;
    anyhow::ensure!(a.bank_file.is_some() || a.write_file.is_some(), "give --bank-file, --write-file or both");
    let (bank, _) = bank(a.banks_dir.as_ref(), &a.bank)?;
    let layout = bank.reconciliation.layout;
    let database = a.data_dir.join(format!("bank-{}.db", bank.code));
    anyhow::ensure!(database.exists(), "no adapter database at {}", database.display());
    // Reconciliation acts as the bank's adapter: it reaches the registry with the adapter's identity.
    let service = adapter_service_name(&bank.code);
    let registry =
        client_endpoint(connection, &connection.endpoint, |t| t.service_client(&service), "registry")?.connect_lazy();
    let adapter = BankAdapter::open(bank, &database, registry).await.context("cannot open the adapter's database")?;
    if let Some(path) = &a.write_file {
        let file = adapter.daily_file(date).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        std::fs::write(path, file.render(layout)).with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("adapter file: {} records written to {}", file.records.len(), path.display());
    }
    let Some(path) = &a.bank_file else { return Ok(()) };
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let report = adapter.reconcile(date, &text, a.repair).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let json = report.to_json();
    match &a.out {
        Some(out) => std::fs::write(out, &json).with_context(|| format!("cannot write {}", out.display()))?,
        None => println!("{json}"),
    }
    eprintln!(
        "reconcile[{}] {date}: {} cards, {} matched, {} mismatched ({} repaired, {} repair failed, {} manual)",
        report.bank_code,
        report.cards_checked,
        report.matched,
        report.mismatches.len(),
        report.repaired,
        report.repair_failed,
        report.manual
    );
    Ok(())
}

async fn bank_sim(connection: &Connection, a: BankSimArgs) -> anyhow::Result<()> {
    let (bank, port) = bank(a.banks_dir.as_ref(), &a.bank)?;
    let adapter_url = match &a.adapter {
        Some(url) => url.clone(),
        None => format!("http://127.0.0.1:{}", port.context("the bank's file has no port; give --adapter")?),
    };
    let adapter_service = adapter_service_name(&bank.code);
    // The bank core presents its own bank certificate; preparing cards goes to the registry as a service.
    let adapter = client_endpoint(connection, &adapter_url, |t| t.bank_client(&bank.code), &adapter_service)?
        .connect()
        .await
        .with_context(|| format!("cannot reach the bank adapter at {adapter_url}"))?;
    let registry = client_endpoint(connection, &connection.endpoint, |t| t.service_client("bank-sim"), "registry")?
        .connect()
        .await
        .with_context(|| format!("cannot reach the registry at {}", connection.endpoint))?;
    let first_person = a.first_person.unwrap_or_else(|| u64::from(rand::random::<u32>()) % 17_000_000);
    let config = socialcard_bank_sim::SimConfig {
        cards: a.cards,
        concurrency: a.concurrency,
        rate: a.rate,
        loss_percent: a.loss_percent,
        unlock_percent: a.unlock_percent,
        first_person,
        omit_from_file: a.omit_from_file,
    };
    let layout = bank.reconciliation.layout;
    let summary = socialcard_bank_sim::run(
        bank,
        RegistryServiceClient::new(registry),
        BankCardServiceClient::new(adapter),
        config,
    )
    .await?;
    if let Some(path) = &a.bank_file {
        std::fs::write(path, summary.file.render(layout))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        summary.print();
        if let Some(path) = &a.bank_file {
            println!("  written to {}", path.display());
        }
    }
    Ok(())
}
