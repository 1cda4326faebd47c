//! `cargo run --release -p socialcard-faults -- [--quick] [--seed N]`
//!
//! The fault suite: `socialcard up` as a real process (and, in the distributed phase, one `socialcard
//! serve` process per service) under a mixed workload of bank activations, losses, unlocks and courier
//! updates, while the harness SIGKILLs and restarts it (or one service) on the same data,
//! cuts and slows the links to it (and, when the environment names them, to PostgreSQL and the Kafka
//! broker) through TCP proxies of its own. After the faults heal it checks what the clients were told
//! against what the services hold, prints the figures, and exits non-zero on any violation, with the
//! seed that replays the schedule. It must never report a pass it did not check.

mod audit_chain;
mod checks;
mod cluster;
mod plan;
mod proxy;
mod system;
mod workload;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use socialcard_proto::postal::v1 as postal;
use socialcard_proto::registry::v1 as reg;
use tokio::sync::{Mutex, Semaphore};

use crate::checks::Figures;
use crate::cluster::Cluster;
use crate::plan::{Fault, Link, Phase, Plan, Size};
use crate::proxy::Proxy;
use crate::system::{Broker, Links, Postgres, Up};
use crate::workload::{CardRecord, Clients, Journal, SharedJournal, ShipmentRecord};

/// Whether the distributed phase runs without `--distributed` (it needs PostgreSQL, as the second).
const DISTRIBUTED_BY_DEFAULT: bool = true;

const WEBHOOK_SECRET: &str = "faults-courier-secret-0123456789";

#[derive(Debug, Parser)]
#[command(
    name = "socialcard-faults",
    about = "The fault suite: kill, cut and slow the system under load; check nothing is lost"
)]
struct Args {
    /// A short run for CI (about a minute).
    #[arg(long)]
    quick: bool,
    /// The seed of the schedule; default: from the clock (printed, to replay).
    #[arg(long)]
    seed: Option<u64>,
    /// Only the embedded phase, even when PostgreSQL and a broker are configured.
    #[arg(long)]
    embedded_only: bool,
    /// Skip the distributed phase (one process per service), which otherwise runs with PostgreSQL.
    #[arg(long, conflicts_with = "distributed")]
    no_distributed: bool,
    /// Run the distributed phase even where it is not on by default.
    #[arg(long)]
    distributed: bool,
    /// PostgreSQL for the second phase (a fresh database per run).
    #[arg(long, env = "SOCIALCARD_TEST_DATABASE_URL")]
    database_url: Option<String>,
    /// Sabotage, to prove the suite catches it: clients retry under a fresh idempotency key.
    #[arg(long, hide = true)]
    sabotage_fresh_keys: bool,
    /// Sabotage, to prove the suite catches it: every restart comes up without the last writes of the
    /// SQLite databases (their write-ahead logs dropped), as a disk that lied about fsync would.
    #[arg(long, hide = true)]
    sabotage_lose_wal: bool,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() % 100_000).unwrap_or(1)
    });
    let replay = format!(
        "cargo run --release -p socialcard-faults --{} --seed {seed}",
        if args.quick { " --quick" } else { "" }
    );
    let limit = if args.quick { Duration::from_secs(300) } else { Duration::from_secs(1200) };
    match tokio::time::timeout(limit, run(&args, seed)).await {
        Ok(Ok(0)) => {
            println!("fault suite: PASS (seed {seed})");
            std::process::ExitCode::SUCCESS
        }
        Ok(Ok(n)) => {
            println!("fault suite: FAIL, {n} violations (seed {seed}); replay: {replay}");
            std::process::ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            println!("fault suite: ERROR {e:#} (seed {seed}); replay: {replay}");
            std::process::ExitCode::FAILURE
        }
        Err(_) => {
            println!("fault suite: FAIL, not finished within {limit:?} (seed {seed}); replay: {replay}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args, seed: u64) -> anyhow::Result<u64> {
    let started = Instant::now();
    let bin = system::socialcard_binary().await?;
    println!(
        "fault suite: seed {seed}, {} run, {} build, system under test: {}",
        if args.quick { "quick" } else { "full" },
        if cfg!(debug_assertions) { "debug" } else { "release" },
        bin.display()
    );
    let mut phases = vec![Phase::Embedded];
    match (&args.database_url, args.embedded_only) {
        (Some(_), false) => {
            phases.push(Phase::PostgresKafka);
            if (DISTRIBUTED_BY_DEFAULT || args.distributed) && !args.no_distributed {
                phases.push(Phase::Distributed);
            }
        }
        (None, false) => println!("(SOCIALCARD_TEST_DATABASE_URL not set: PostgreSQL + Kafka phase skipped)"),
        (_, true) => {}
    }
    let mut violations = 0;
    for phase in phases {
        violations += run_phase(args, seed, phase, &bin).await?;
    }
    println!("total time      {:.1} s", started.elapsed().as_secs_f64());
    Ok(violations)
}

#[derive(Debug, Default)]
struct FaultCounts {
    counts: BTreeMap<String, u64>,
}

impl FaultCounts {
    fn add(&mut self, what: impl Into<String>) {
        *self.counts.entry(what.into()).or_default() += 1;
    }
}

/// The system under test: `up` (every service in one process), or one process per service.
#[derive(Debug)]
enum Sut {
    One(Box<Up>),
    Many(Box<Cluster>),
}

impl Sut {
    fn links(&self) -> &Links {
        match self {
            Sut::One(up) => &up.links,
            Sut::Many(c) => &c.links,
        }
    }

    /// Every proxy of the run (with the distributed phase's links between the services).
    fn proxies(&self) -> Vec<&Proxy> {
        match self {
            Sut::One(up) => up.links.all(),
            Sut::Many(c) => c.proxies(),
        }
    }

    fn proxy(&self, link: Link) -> Proxy {
        match self {
            Sut::Many(c) => c.proxy(link),
            Sut::One(up) => match link {
                Link::Registry | Link::RegistryFromServices => up.links.registry.clone(),
                Link::Loss | Link::CoordinatorFromAdapters => up.links.loss.clone(),
                Link::Postal => up.links.postal.clone(),
                Link::Webhook => up.links.webhook.clone(),
                Link::Bank(i) | Link::AdapterFromCoordinator(i) => {
                    up.links.banks.get(plan::BANKS[i % plan::BANKS.len()]).cloned().unwrap_or(up.links.registry.clone())
                }
            },
        }
    }

    /// What died on its own (a failure), started again.
    async fn restart_exited(&mut self) -> anyhow::Result<Vec<String>> {
        match self {
            Sut::One(up) => match up.exited() {
                Some(status) => {
                    up.restart(Duration::from_secs(60)).await?;
                    Ok(vec![format!("up exited on its own: {status}")])
                }
                None => Ok(Vec::new()),
            },
            Sut::Many(c) => c.restart_exited().await,
        }
    }

    fn starts(&self) -> String {
        match self {
            Sut::One(up) => format!("{} starts of up, {} kills", up.starts, up.kills),
            Sut::Many(c) => {
                let (starts, kills) = c.starts_and_kills();
                format!("{} processes, {starts} starts, {kills} kills", c.procs.len())
            }
        }
    }

    async fn event_metrics(&self) -> Vec<String> {
        match self {
            Sut::One(up) => up.event_metrics().await,
            Sut::Many(c) => c.event_metrics().await,
        }
    }

    async fn stop(&mut self) -> anyhow::Result<()> {
        match self {
            Sut::One(up) => up.stop().await,
            Sut::Many(c) => {
                c.stop().await;
                Ok(())
            }
        }
    }
}

async fn run_phase(args: &Args, seed: u64, phase: Phase, bin: &std::path::Path) -> anyhow::Result<u64> {
    let phase_started = Instant::now();
    let size = Size::new(args.quick);
    let plan = Plan::new(seed, size, phase);
    let work =
        std::env::temp_dir().join(format!("socialcard-faults-{seed}-{}-{}", std::process::id(), phase_tag(phase)));
    std::fs::create_dir_all(&work)?;
    println!("\n== phase: {} ==", phase.name());
    println!(
        "schedule        {} ({} cards, {} shipments, {} faults over {} s)",
        plan.digest(),
        plan.cards.len(),
        plan.shipments.len(),
        plan.faults.len(),
        plan.workload.as_secs()
    );

    let (pg, broker) = match phase {
        Phase::Embedded => (None, None),
        Phase::PostgresKafka | Phase::Distributed => {
            let url = args.database_url.as_deref().context("no database URL")?;
            let pg = Postgres::create(url, seed).await?;
            let broker = Broker::start(&work).await?;
            println!("backends        postgresql database {} via proxy; broker: {}", pg.name, broker.describe());
            (Some(pg), Some(broker))
        }
    };
    let mut extra = Vec::new();
    if let (Some(pg), Some(broker)) = (&pg, &broker) {
        extra.extend(["--registry-database-url".to_string(), pg.url()?]);
        extra.extend(["--kafka-brokers".to_string(), broker.bootstrap(), "--kafka-partitions".into(), "2".into()]);
    }
    let data = work.join("data");
    let mut up = match (phase, &pg, &broker) {
        (Phase::Distributed, Some(pg), Some(broker)) => {
            let cluster = Cluster::start(bin, &work, WEBHOOK_SECRET, &pg.url()?, &broker.bootstrap()).await?;
            let names: Vec<&str> = cluster.procs.iter().map(|p| p.name.as_str()).collect();
            println!("processes       {} ({})", names.len(), names.join(", "));
            Sut::Many(Box::new(cluster))
        }
        _ => Sut::One(Box::new(Up::start(bin, &data, WEBHOOK_SECRET, extra).await?)),
    };
    let clients = Clients::new(up.links(), WEBHOOK_SECRET, args.sabotage_fresh_keys)?;

    let setup = Instant::now();
    let journal: SharedJournal = Arc::new(Mutex::new(setup_journal(&clients, &plan).await?));
    println!(
        "setup           {} collected cards, {} shipments open, in {:.1} s",
        plan.cards.len(),
        plan.shipments.len(),
        setup.elapsed().as_secs_f64()
    );

    // The workload: every script as a task, at most `concurrency` at a time.
    let base = time::OffsetDateTime::now_utc().unix_timestamp() - 3 * 3600;
    let gate = Arc::new(Semaphore::new(plan.concurrency));
    let mut tasks = Vec::new();
    let t0 = Instant::now();
    for script in plan.cards.clone() {
        let (c, j, gate) = (clients.clone(), journal.clone(), gate.clone());
        let tag = phase_tag(phase);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(script.start).await;
            let Ok(_permit) = gate.acquire().await else { return };
            for (n, (pause, step)) in script.steps.iter().enumerate() {
                tokio::time::sleep(*pause).await;
                let key = format!("faults-{seed}-{tag}-card{}-step{n}", script.card);
                workload::card_step(&c, &j, script.card, *step, key).await;
            }
        }));
    }
    for script in plan.shipments.clone() {
        let (c, j, gate) = (clients.clone(), journal.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(script.start).await;
            let Ok(_permit) = gate.acquire().await else { return };
            for (pause, step) in &script.steps {
                tokio::time::sleep(*pause).await;
                workload::courier_step(&c, &j, script.shipment, step, base).await;
            }
        }));
    }

    // The faults, on their schedule, while the workload runs.
    let mut faults = FaultCounts::default();
    let mut crashed = Vec::new();
    for (at, fault) in &plan.faults {
        tokio::time::sleep((t0 + *at).saturating_duration_since(Instant::now())).await;
        crashed.extend(up.restart_exited().await?);
        let proxy_of = |link: Link| up.proxy(link);
        match *fault {
            Fault::KillService { service, down } => match &mut up {
                Sut::Many(cluster) => {
                    let p = cluster.proc_mut(service);
                    p.kill().await?;
                    faults.add(format!("kill -9 + restart {}", p.name));
                    tokio::time::sleep(down).await;
                    p.restart(Duration::from_secs(60)).await?;
                }
                Sut::One(_) => anyhow::bail!("a service's kill in a phase with one process"),
            },
            Fault::Kill { down } => {
                let Sut::One(up) = &mut up else { anyhow::bail!("a kill of up in the distributed phase") };
                up.kill().await?;
                faults.add("kill -9 + restart");
                if args.sabotage_lose_wal {
                    for entry in std::fs::read_dir(&data)?.filter_map(Result::ok) {
                        let name = entry.file_name().to_string_lossy().to_string();
                        if name.ends_with(".db-wal") || name.ends_with(".db-shm") {
                            let _ = std::fs::remove_file(entry.path());
                        }
                    }
                }
                tokio::time::sleep(down).await;
                up.restart(Duration::from_secs(60)).await?;
            }
            Fault::CutLink { link, for_ } => {
                let p = proxy_of(link);
                p.cut();
                faults.add(format!("link cut ({})", p.name));
                tokio::time::sleep(for_).await;
                p.heal();
            }
            Fault::DelayLink { link, delay, for_ } => {
                let p = proxy_of(link);
                p.delay(delay);
                faults.add(format!("link delay ({})", p.name));
                tokio::time::sleep(for_).await;
                p.heal();
            }
            Fault::CutDatabase { for_ } => {
                if let Some(pg) = &pg {
                    pg.proxy.cut();
                    faults.add("database cut");
                    tokio::time::sleep(for_).await;
                    pg.proxy.heal();
                }
            }
            Fault::DelayDatabase { delay, for_ } => {
                if let Some(pg) = &pg {
                    pg.proxy.delay(delay);
                    faults.add("database delay");
                    tokio::time::sleep(for_).await;
                    pg.proxy.heal();
                }
            }
            Fault::CutBroker { for_ } => {
                if let Some(b) = &broker {
                    b.cut();
                    faults.add("broker cut");
                    tokio::time::sleep(for_).await;
                    b.heal();
                }
            }
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let workload_time = t0.elapsed();
    crashed.extend(up.restart_exited().await?);
    // Every fault healed; the system catches up by itself (events, the coordinator's retries).
    for p in up.proxies() {
        p.heal();
    }
    let settle = Instant::now();
    // On Kafka a killed consumer's partitions wait for its session to time out (10 s) and a rebalance.
    let settle_limit = match (phase, args.quick) {
        (Phase::Embedded, true) => Duration::from_secs(20),
        (Phase::Embedded, false) => Duration::from_secs(60),
        (Phase::PostgresKafka | Phase::Distributed, _) => Duration::from_secs(60),
    };
    let journal = journal.lock().await;
    let figures = loop {
        let f = checks::run(&clients, &journal).await;
        if f.violations() == 0 || settle.elapsed() > settle_limit {
            break f;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let settled = settle.elapsed();
    let chain = audit_chain::verify(clients.registry_channel.clone()).await;
    let violations = report(&faults, &up, &clients, &journal, &figures, &chain, &crashed, workload_time, settled);
    if violations > 0 {
        for line in up.event_metrics().await {
            println!("  metrics: {line}");
        }
    }
    up.stop().await?;
    if let Some(pg) = pg {
        pg.drop_database().await;
    }
    if let Some(b) = broker {
        b.stop().await;
    }
    println!("phase time      {:.1} s", phase_started.elapsed().as_secs_f64());
    if violations == 0 {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        println!("kept for a look: {}", work.display());
    }
    Ok(violations)
}

fn phase_tag(phase: Phase) -> &'static str {
    match phase {
        Phase::Embedded => "embedded",
        Phase::PostgresKafka => "pg",
        Phase::Distributed => "distributed",
    }
}

#[allow(clippy::too_many_arguments)]
fn report(
    faults: &FaultCounts,
    up: &Sut,
    clients: &Clients,
    journal: &Journal,
    f: &Figures,
    chain: &audit_chain::Chain,
    crashed: &[String],
    workload: Duration,
    settled: Duration,
) -> u64 {
    let injected: Vec<String> = faults.counts.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("faults          {} ({})", injected.join(", "), up.starts());
    let (forwarded, refused) = up.proxies().iter().map(|p| p.counts()).fold((0, 0), |(a, b), (c, d)| (a + c, b + d));
    let links: Vec<&str> = up.proxies().iter().map(|p| p.name.as_str()).collect();
    println!(
        "proxies         {} links ({}); {forwarded} connections forwarded, {refused} refused while cut or down",
        links.len(),
        links.join(", ")
    );
    let acked: Vec<String> = journal.acked.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let total: u64 = journal.acked.values().sum();
    println!(
        "operations      {total} acknowledged in {:.1} s ({}); {} retries; {} not acknowledged; {} skipped after one",
        workload.as_secs_f64(),
        acked.join(", "),
        clients.retries.load(std::sync::atomic::Ordering::Relaxed),
        journal.failures.len(),
        journal.skipped
    );
    println!(
        "activations     {} acknowledged OK to a bank, {} lost (not on both sides)",
        f.activations_acked, f.activations_lost
    );
    println!(
        "audit trail     {} rows, {} (action, key) pairs, {} duplicate transitions",
        f.audit_rows, f.audit_keys, f.audit_duplicates
    );
    println!(
        "losses          {} acknowledged, {} not locked on both sides; {} unlocked on both sides, {} not effective; {} sides disagree",
        f.losses_acked, f.losses_not_locked_both_sides, f.unlocks_acked, f.unlocks_not_effective, f.sides_disagree
    );
    println!(
        "courier         {} shipments, {} events acknowledged, {} missing, {} duplicated, {} went backwards, {} wrong final status, {} collections not at the registry",
        f.shipments,
        f.courier_events_acked,
        f.courier_events_missing,
        f.courier_events_duplicated,
        f.shipments_went_backwards,
        f.shipments_wrong_final_status,
        f.collections_not_propagated
    );
    let chain_broken = match chain {
        audit_chain::Chain::NotAvailable => {
            println!("audit chain     not available (the registry answers UNIMPLEMENTED to VerifyAuditTrail)");
            0
        }
        audit_chain::Chain::Verified(v) => {
            println!(
                "audit chain     {} cards, {} entries verified ({} from before the chain), {} breaks",
                v.cards_checked,
                v.entries_checked,
                v.unchained_entries,
                v.breaks.len()
            );
            for b in v.breaks.iter().take(5) {
                println!("  chain break: card {} entry {} {}", b.card_id, b.sequence, b.reason);
            }
            v.breaks.len() as u64
        }
        audit_chain::Chain::Failed(s) => {
            println!("audit chain     verification failed: {}", workload::reason(s));
            1
        }
    };
    println!("settled in      {:.1} s after the last fault healed", settled.as_secs_f64());
    let violations = f.violations() + journal.failures.len() as u64 + crashed.len() as u64 + chain_broken;
    for c in crashed {
        println!("  crash: {c}");
    }
    for e in journal.failures.iter().take(12) {
        println!("  not acknowledged: {e}");
    }
    for e in &f.examples {
        println!("  violation: {e}");
    }
    println!("violations      {violations}");
    violations
}

/// The cards and shipments of the workload, made through the registry's public API before any fault.
async fn setup_journal(c: &Clients, plan: &Plan) -> anyhow::Result<Journal> {
    let directory = socialcard_domain::BankDirectory::shanghai();
    let bin_of = |code: &str| {
        directory
            .banks()
            .iter()
            .find(|b| b.code == code)
            .and_then(|b| b.bin_prefixes.first().cloned())
            .unwrap_or_default()
    };
    let mut journal = Journal::default();
    // Eight at a time: the setup is not what is measured.
    let gate = Arc::new(Semaphore::new(8));
    let mut making = Vec::new();
    for script in &plan.cards {
        let (registry, gate, bank, bin) = (c.registry.clone(), gate.clone(), script.bank, bin_of(script.bank));
        let n = script.card as u64 + 1;
        making.push(tokio::spawn(async move {
            let _permit = gate.acquire().await;
            let mut r = registry;
            make_card(&mut r, n, bank, &bin, true).await.with_context(|| format!("cannot make card {n}"))
        }));
    }
    for (script, made) in plan.cards.iter().zip(making) {
        let (card_id, card_number) = made.await??;
        journal.cards.push(CardRecord { card_id, card_number, bank: script.bank.to_string(), ..Default::default() });
    }
    let mut making = Vec::new();
    for script in &plan.shipments {
        let (mut registry, gate, bin) = (c.registry.clone(), gate.clone(), bin_of("icbc"));
        let n = 100_000 + script.shipment as u64;
        making.push(tokio::spawn(async move {
            let _permit = gate.acquire().await;
            make_card(&mut registry, n, "icbc", &bin, false).await
        }));
    }
    for made in making {
        journal.shipments.push(ShipmentRecord { card_id: made.await??.0, ..Default::default() });
    }
    // Postal opens each shipment from the registry's CardProduced event.
    let until = Instant::now() + Duration::from_secs(60);
    for s in &mut journal.shipments {
        loop {
            let found = c
                .postal
                .clone()
                .get_shipment(postal::GetShipmentRequest {
                    lookup: Some(postal::get_shipment_request::Lookup::CardId(s.card_id.clone())),
                })
                .await;
            if let Ok(found) = found
                && let Some(shipment) = found.into_inner().shipment
            {
                s.waybill = shipment.waybill;
                s.backup_point = shipment.backup_point_id;
                break;
            }
            anyhow::ensure!(Instant::now() < until, "postal opened no shipment for card {}", s.card_id);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(journal)
}

async fn until_ok<T, F, Fut>(mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(s) if workload::transient(&s) && Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => anyhow::bail!("{}", workload::reason(&s)),
        }
    }
}

/// The `n`-th holder's card at `bank`, produced (the courier has it to deliver) and, with `collect`,
/// collected at the community point. Every call under a key of its own, so a retry is harmless.
async fn make_card(
    r: &mut socialcard_proto::registry::v1::registry_service_client::RegistryServiceClient<tonic::transport::Channel>,
    n: u64,
    bank: &str,
    bin: &str,
    collect: bool,
) -> anyhow::Result<(String, String)> {
    let key = |what: &str| format!("faults-setup-{n}-{what}");
    let actor = |channel: reg::Channel| {
        Some(reg::Actor {
            channel: channel as i32,
            operator_id: "faults".into(),
            site_id: "site-1".into(),
            ..Default::default()
        })
    };
    let id = socialcard_registry::fixtures::adult_citizen_id(n);
    until_ok(|| {
        let mut r = r.clone();
        let request = reg::RegisterPersonRequest {
            idempotency_key: key("register"),
            citizen_id: id.clone(),
            name: "Fault Case".into(),
            phone: workload::PHONE.into(),
        };
        async move { r.register_person(request).await }
    })
    .await?;
    let card = until_ok(|| {
        let mut r = r.clone();
        let request = reg::SubmitApplicationRequest {
            idempotency_key: key("apply"),
            citizen_id: id.clone(),
            actor: actor(reg::Channel::CommunityPoint),
            documents: Some(reg::Documents {
                presenter: reg::Presenter::Holder as i32,
                holder_id_card: true,
                ..Default::default()
            }),
            card_type: reg::CardType::Adult as i32,
            holder_status: reg::HolderStatus::Unemployed as i32,
            bank_code: bank.into(),
            photo: Some(reg::Photo { source: reg::PhotoSource::CommunityPoint as i32, ..Default::default() }),
            backup_point_id: "point-7".into(),
            delivery_address: Some(reg::Address {
                recipient: "Fault Case".into(),
                line: "1 Courier Road".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        async move { r.submit_application(request).await }
    })
    .await?
    .into_inner()
    .card
    .unwrap_or_default();
    let card_id = card.card_id;
    until_ok(|| {
        let mut r = r.clone();
        let request = reg::ReviewApplicationRequest {
            idempotency_key: key("review"),
            card_id: card_id.clone(),
            actor: actor(reg::Channel::BureauWindow),
            decision: reg::ReviewDecision::Approve as i32,
            reason: String::new(),
        };
        async move { r.review_application(request).await }
    })
    .await?;
    let started = until_ok(|| {
        let mut r = r.clone();
        let request = reg::StartProductionRequest {
            idempotency_key: key("production"),
            card_id: card_id.clone(),
            actor: actor(reg::Channel::Production),
            batch_id: "faults".into(),
        };
        async move { r.start_production(request).await }
    })
    .await?
    .into_inner()
    .card
    .unwrap_or_default();
    let body = format!("{bin}{:0width$}", n, width = 18usize.saturating_sub(bin.len()));
    let account = format!("{body}{}", socialcard_domain::numbers::luhn_check_digit(&body));
    until_ok(|| {
        let mut r = r.clone();
        let request = reg::RecordProductionResultRequest {
            idempotency_key: key("produced"),
            card_id: card_id.clone(),
            actor: actor(reg::Channel::Production),
            result: Some(reg::record_production_result_request::Result::AccountNumber(account.clone())),
        };
        async move { r.record_production_result(request).await }
    })
    .await?;
    if collect {
        until_ok(|| {
            let mut r = r.clone();
            let request = reg::RecordCollectionRequest {
                idempotency_key: key("collected"),
                card_id: card_id.clone(),
                actor: actor(reg::Channel::CommunityPoint),
                method: reg::CollectionMethod::PickedUpAtPoint as i32,
                collected_at: None,
                documents: Some(reg::Documents {
                    presenter: reg::Presenter::Holder as i32,
                    holder_id_card: true,
                    card_presented: true,
                    ..Default::default()
                }),
            };
            async move { r.record_collection(request).await }
        })
        .await?;
    }
    Ok((card_id, started.card_number))
}
