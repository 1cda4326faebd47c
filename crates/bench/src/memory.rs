//! `memory`: the all-in-one embedded process (`socialcard up`, the binary built beside this one) as an
//! operator sees it: start-up time from spawn to every announced gRPC server answering SERVING on
//! `grpc.health.v1`, idle RSS, and peak RSS (VmHWM) while the `activation` load runs against it
//! (cards made through the registry's API and icbc's account opening, then dual activations at the icbc adapter, 64 in flight).
//! Target: peak at most 200 MB.
//!
//! `up` runs every service in one process, so per-service idle RSS comes from this binary started again
//! with one service each (the registry, one bank adapter, postal; the same library code `up` runs).
//! Baseline, same run: the floor of any of our services, this binary serving only the shared gRPC kit
//! (tokio, tonic, health and reflection) on one port: its idle RSS and its start-up time to SERVING.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use socialcard_domain::BankDirectory;
use socialcard_proto::bank::v1 as bank;
use socialcard_proto::bank::v1::bank_card_service_client::BankCardServiceClient;
use socialcard_proto::registry::v1::registry_service_client::RegistryServiceClient;
use socialcard_registry::fixtures::opened_at_bank;
use socialcard_server::SystemClock;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::scratch::Dir;
use crate::stats::Table;

/// Set to `floor`, `registry`, `adapter` or `postal`: this binary serves only that and prints its address.
pub const SERVE_ENV: &str = "SOCIALCARD_BENCH_SERVE";

/// One service alone in this process (the child side of the per-service and floor measurements).
pub async fn serve_alone(what: &str) -> anyhow::Result<()> {
    let dir =
        std::env::var("SOCIALCARD_BENCH_SERVE_DIR").unwrap_or_else(|_| std::env::temp_dir().display().to_string());
    let dir = std::path::PathBuf::from(dir);
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let routes = match what {
        "floor" => tonic::service::Routes::default(),
        "registry" => {
            let url = format!("sqlite://{}?mode=rwc", dir.join("registry.db").display());
            let built = socialcard_registry::build(
                &url,
                Arc::new(SystemClock),
                socialcard_registry::RegistryConfig::shanghai(vec![7; 32]),
            )
            .await?;
            tonic::service::Routes::new(socialcard_registry::grpc::RegistryGrpc::new(built.registry).into_server())
        }
        "adapter" => {
            let icbc = BankDirectory::shanghai().get("icbc").cloned().ok_or_else(|| anyhow::anyhow!("no icbc"))?;
            let registry = tonic::transport::Channel::from_static("http://127.0.0.1:9").connect_lazy();
            let adapter = socialcard_bank_adapter::BankAdapter::open(icbc, &dir.join("bank-icbc.db"), registry).await?;
            tonic::service::Routes::new(adapter.into_server())
        }
        "postal" => {
            let postal = socialcard_postal::open(
                &dir.join("postal.db"),
                Arc::new(SystemClock),
                socialcard_postal::PostalConfig::new(vec![1; 32]),
            )
            .await?;
            tonic::service::Routes::new(socialcard_postal::grpc::PostalGrpc::new(postal).into_server())
        }
        other => anyhow::bail!("unknown service {other}"),
    };
    println!("{what} listening on {addr}");
    socialcard_server::grpc::serve(l, routes, &[], std::future::pending()).await?;
    Ok(())
}

/// (VmRSS, VmHWM) of a process, in MiB.
fn rss_mib(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .map(|kb| kb / 1024.0)
            .ok_or_else(|| anyhow::anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// A started process, its announced gRPC servers by name, and the time from spawn to all SERVING.
struct Started {
    child: Child,
    endpoints: BTreeMap<String, String>,
    startup: Duration,
}

/// Spawns `cmd`, reads its `<name> listening on <addr>` lines, and polls health on every gRPC server
/// announced until each answers SERVING and no new one appeared for `settle` (`expect` servers at least).
async fn start(mut cmd: Command, expect: usize, settle: Duration) -> anyhow::Result<Started> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::null()).kill_on_drop(true);
    let spawned = Instant::now();
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let announced = Arc::new(std::sync::Mutex::new(BTreeMap::<String, String>::new()));
    let a = announced.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some((name, addr)) = line.split_once(" listening on ")
                && !["webhook", "dashboard", "metrics"].iter().any(|w| name.contains(w))
                && let Ok(mut a) = a.lock()
            {
                a.insert(name.trim().to_string(), addr.trim().to_string());
            }
        }
    });
    let mut serving: BTreeMap<String, Duration> = BTreeMap::new();
    loop {
        anyhow::ensure!(spawned.elapsed() < Duration::from_secs(120), "services not SERVING within 120 s");
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("the process exited during start-up: {status}");
        }
        let now: BTreeMap<String, String> = announced.lock().map(|a| a.clone()).unwrap_or_default();
        for (name, addr) in &now {
            if serving.contains_key(name) {
                continue;
            }
            let Ok(channel) = tonic::transport::Channel::from_shared(format!("http://{addr}"))?.connect().await else {
                continue;
            };
            let r =
                HealthClient::new(channel).check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await;
            if r.is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32) {
                serving.insert(name.clone(), spawned.elapsed());
            }
        }
        let last = serving.values().max().copied().unwrap_or_default();
        if serving.len() >= expect && serving.len() == now.len() && spawned.elapsed() > last + settle {
            return Ok(Started { child, endpoints: now, startup: last });
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The all-in-one binary beside this one, built if missing (same profile).
async fn up_binary() -> anyhow::Result<std::path::PathBuf> {
    let me = std::env::current_exe()?;
    let dir = me.parent().ok_or_else(|| anyhow::anyhow!("no directory"))?;
    let bin = dir.join("socialcard");
    if !bin.exists() {
        let mut cargo = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cargo.args(["build", "-q", "-p", "socialcard", "--bin", "socialcard"]);
        if dir.ends_with("release") {
            cargo.arg("--release");
        }
        anyhow::ensure!(cargo.status().await?.success(), "cannot build the socialcard binary");
    }
    Ok(bin)
}

fn up_command(bin: &std::path::Path, data: &std::path::Path) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("up").env("SOCIALCARD_DATA_DIR", data).env("SOCIALCARD_BANK_PORTS_AUTO", "true");
    // Every listener on a free port: other engineers' `up` may hold the defaults on this machine.
    for var in [
        "REGISTRY_LISTEN",
        "METRICS_LISTEN",
        "POSTAL_LISTEN",
        "POSTAL_WEBHOOK_LISTEN",
        "LOSS_LISTEN",
        "OPS_LISTEN",
        "OPS_DASHBOARD_LISTEN",
    ] {
        cmd.env(format!("SOCIALCARD_{var}"), "127.0.0.1:0");
    }
    cmd.env("RUST_LOG", "warn");
    cmd
}

fn alone_command(what: &str, dir: &std::path::Path) -> anyhow::Result<Command> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("memory").env(SERVE_ENV, what).env("SOCIALCARD_BENCH_SERVE_DIR", dir);
    Ok(cmd)
}

fn row(what: &str, startup: Duration, idle: f64, peak: f64, floor: &(Duration, f64)) -> Vec<String> {
    vec![
        what.to_string(),
        format!("{:.0}", startup.as_secs_f64() * 1000.0),
        format!("{idle:.1}"),
        if peak > 0.0 { format!("{peak:.1}") } else { "-".into() },
        format!("{:.1}", startup.as_secs_f64() / floor.0.as_secs_f64().max(1e-6)),
        format!("{:.1}", idle / floor.1),
    ]
}

pub async fn run(quick: bool) -> anyhow::Result<Table> {
    let dir = Dir::new("mem")?;
    let settle = Duration::from_millis(if quick { 100 } else { 500 });

    // The floor: one gRPC server with health and reflection only. Started once before, so that neither
    // it nor what follows pays for reading this binary from disk the first time.
    drop(start(alone_command("floor", &dir.0)?, 1, settle).await?);
    let floor = start(alone_command("floor", &dir.0)?, 1, settle).await?;
    let floor_idle = rss_mib(floor.child.id().unwrap_or_default())?.0;
    let floor_m = (floor.startup, floor_idle);
    drop(floor);
    let mut rows = vec![row("floor (gRPC kit only)", floor_m.0, floor_m.1, 0.0, &floor_m)];

    for what in ["registry", "adapter", "postal"] {
        let d = dir.0.join(what);
        std::fs::create_dir_all(&d)?;
        let s = start(alone_command(what, &d)?, 1, settle).await?;
        let idle = rss_mib(s.child.id().unwrap_or_default())?.0;
        rows.push(row(&format!("{what} alone"), s.startup, idle, 0.0, &floor_m));
    }

    // The all-in-one process: start-up, idle, then the activation load.
    let data = dir.0.join("up");
    std::fs::create_dir_all(&data)?;
    let up = start(up_command(&up_binary().await?, &data), 12, settle).await?;
    let pid = up.child.id().ok_or_else(|| anyhow::anyhow!("up exited"))?;
    tokio::time::sleep(Duration::from_millis(if quick { 200 } else { 2_000 })).await;
    let (idle, _) = rss_mib(pid)?;
    let registry = up.endpoints.get("registry").ok_or_else(|| anyhow::anyhow!("no registry announced"))?;
    let icbc = up.endpoints.get("bank-adapter[icbc]").ok_or_else(|| anyhow::anyhow!("no icbc adapter announced"))?;
    let mut registry_client = RegistryServiceClient::connect(format!("http://{registry}")).await?;
    let client = BankCardServiceClient::connect(format!("http://{icbc}")).await?;

    let peak_sampled = Arc::new(AtomicU64::new(0));
    let sampler = {
        let peak = peak_sampled.clone();
        tokio::spawn(async move {
            while let Ok((rss, _)) = rss_mib(pid) {
                peak.fetch_max((rss * 1024.0) as u64, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let cards = if quick { 40 } else { 2_000 };
    let made = opened_at_bank(&mut registry_client, &mut client.clone(), 0, cards as u64, "icbc", "621226").await?;
    let numbers: Arc<Vec<String>> = Arc::new(made.into_iter().map(|c| c.card_number).collect());
    let next = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..64 {
        let (numbers, next, mut c) = (numbers.clone(), next.clone(), client.clone());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(number) = numbers.get(i) else { return Ok::<_, anyhow::Error>(()) };
                c.activate_financial(bank::ActivateFinancialRequest {
                    idempotency_key: uuid::Uuid::now_v7().to_string(),
                    card_number: number.clone(),
                    teller_id: "teller".into(),
                    branch_id: "branch".into(),
                    face_verification_ref: "face".into(),
                    bank_pin_changed: true,
                })
                .await?;
            }
        });
    }
    for r in workers.join_all().await {
        r?;
    }
    let load = t.elapsed();
    let (after, hwm) = rss_mib(pid)?;
    sampler.abort();
    let (up_startup, servers) = (up.startup, up.endpoints.len());
    drop(up);
    let peak = hwm.max(peak_sampled.load(Ordering::Relaxed) as f64 / 1024.0);
    rows.push(row("up (all-in-one)", up_startup, idle, peak, &floor_m));
    Ok(Table {
        name: "memory",
        columns: vec!["process", "start-up ms", "idle RSS MiB", "peak RSS MiB", "start-up / floor", "idle / floor"],
        rows,
        notes: vec![
            format!(
                "up: {servers} gRPC servers; load: {cards} cards made through the registry and icbc's account opening, then {cards} ActivateFinancial at 64 in flight in {:.1} s; RSS after the load {after:.1} MiB; target: peak <= 200 MiB",
                load.as_secs_f64()
            ),
            "start-up: spawn to every announced gRPC server answering SERVING; floor: this binary serving only health and reflection".into(),
        ],
    })
}
