//! The system under test: `socialcard up` as a real child process on a data directory that outlives it,
//! SIGKILLed and started again by the harness, with a proxy in front of every listener the workload
//! reaches; and its backing services when the environment names them (PostgreSQL, a Kafka broker).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::proxy::Proxy;

/// Where `up` listens, as it printed it.
#[derive(Debug, Default)]
struct Printed {
    registry: Option<SocketAddr>,
    loss: Option<SocketAddr>,
    postal: Option<SocketAddr>,
    webhook: Option<SocketAddr>,
    banks: BTreeMap<String, SocketAddr>,
    events: bool,
    metrics: Option<SocketAddr>,
}

/// The proxies the workload talks through, one per link.
#[derive(Clone, Debug)]
pub struct Links {
    pub registry: Proxy,
    pub loss: Proxy,
    pub postal: Proxy,
    pub webhook: Proxy,
    pub banks: BTreeMap<String, Proxy>,
}

impl Links {
    pub fn all(&self) -> Vec<&Proxy> {
        let mut v = vec![&self.registry, &self.loss, &self.postal, &self.webhook];
        v.extend(self.banks.values());
        v
    }
}

/// `socialcard up` and how to start it again.
#[derive(Debug)]
pub struct Up {
    bin: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    pub links: Links,
    pub starts: u32,
    pub kills: u32,
    metrics: Option<SocketAddr>,
}

impl Up {
    /// Starts `up` with `extra` flags on `data_dir`, and the proxies in front of it.
    pub async fn start(bin: &Path, data_dir: &Path, webhook_secret: &str, extra: Vec<String>) -> anyhow::Result<Up> {
        let mut args: Vec<String> = [
            "up",
            "--registry-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--bank-ports-auto",
            "--loss-listen",
            "127.0.0.1:0",
            "--postal-listen",
            "127.0.0.1:0",
            "--postal-webhook-listen",
            "127.0.0.1:0",
            "--ops-listen",
            "127.0.0.1:0",
            "--ops-dashboard-listen",
            "127.0.0.1:0",
            "--postal-webhook-secret",
            webhook_secret,
            "--data-dir",
        ]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
        std::fs::create_dir_all(data_dir)?;
        args.push(data_dir.display().to_string());
        args.extend(extra);
        let links = Links {
            registry: Proxy::start("registry", None).await?,
            loss: Proxy::start("loss-coordinator", None).await?,
            postal: Proxy::start("postal", None).await?,
            webhook: Proxy::start("courier webhook", None).await?,
            banks: BTreeMap::new(),
        };
        let mut up = Up {
            bin: bin.to_path_buf(),
            args,
            log: data_dir.join("up.log"),
            child: None,
            links,
            starts: 0,
            kills: 0,
            metrics: None,
        };
        up.restart(Duration::from_secs(120)).await?;
        Ok(up)
    }

    /// Starts the process (again), retrying while it exits before it is ready (its database may be out of
    /// reach), and points the proxies at its new ports.
    pub async fn restart(&mut self, within: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + within;
        anyhow::ensure!(self.bin.is_file(), "no socialcard binary at {}", self.bin.display());
        loop {
            match self.spawn_once().await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < until => {
                    eprintln!("faults: up did not start ({e:#}); again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e.context(format!("up did not start; its log: {}", self.log.display()))),
            }
        }
    }

    async fn spawn_once(&mut self) -> anyhow::Result<()> {
        let (mut child, mut lines) = spawn_logged(&self.bin, &self.args, &self.log)?;
        let mut printed = Printed::default();
        let mut seen = Vec::new();
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                seen.push(line.clone());
                let addr = |prefix: &str| line.strip_prefix(prefix).and_then(|a| a.trim().parse::<SocketAddr>().ok());
                if let Some(a) = addr("metrics listening on ") {
                    printed.metrics = Some(a);
                } else if let Some(a) = addr("registry listening on ") {
                    printed.registry = Some(a);
                } else if let Some(a) = addr("loss-coordinator listening on ") {
                    printed.loss = Some(a);
                } else if let Some(a) = addr("postal listening on ") {
                    printed.postal = Some(a);
                } else if let Some(a) = addr("postal webhook listening on ") {
                    printed.webhook = Some(a);
                } else if let Some((code, a)) =
                    line.strip_prefix("bank-adapter[").and_then(|l| l.split_once("] listening on "))
                {
                    printed.banks.insert(code.to_string(), a.trim().parse()?);
                } else if line.starts_with("registry events") {
                    printed.events = true;
                }
                // Postal prints after the registry's events line; ops (if any) after postal.
                if printed.events && printed.postal.is_some() && printed.webhook.is_some() {
                    return anyhow::Ok(true);
                }
            }
            Ok(false)
        })
        .await;
        match ready {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => {
                let status = child.wait().await?;
                bail!("up exited before it was ready: {status}");
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                let _ = child.start_kill();
                bail!("up was not ready within 60 s; it printed {seen:?}")
            }
        }
        // Keep draining its stdout so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let need = |a: Option<SocketAddr>, what: &str| a.with_context(|| format!("up printed no {what} address"));
        self.links.registry.set_upstream(need(printed.registry, "registry")?);
        self.links.loss.set_upstream(need(printed.loss, "loss-coordinator")?);
        self.links.postal.set_upstream(need(printed.postal, "postal")?);
        self.links.webhook.set_upstream(need(printed.webhook, "postal webhook")?);
        for (code, addr) in printed.banks {
            match self.links.banks.get(&code) {
                Some(p) => p.set_upstream(addr),
                None => {
                    let p = Proxy::start(&format!("bank {code}"), Some(addr)).await?;
                    self.links.banks.insert(code, p);
                }
            }
        }
        self.metrics = printed.metrics;
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }

    /// The event backbone's lines of `/metrics` (backlogs, lags, dead letters), for a failure's report.
    pub async fn event_metrics(&self) -> Vec<String> {
        match self.metrics {
            Some(addr) => event_metrics(addr).await,
            None => Vec::new(),
        }
    }

    /// SIGKILL: no shutdown, no flush; whatever was not committed is gone.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.start_kill()?;
            child.wait().await?;
            self.kills += 1;
        }
        Ok(())
    }

    /// Whether the process died on its own (a crash is a failure of the suite).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM and wait for a clean exit.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
            }
            if tokio::time::timeout(Duration::from_secs(15), child.wait()).await.is_err() {
                child.start_kill()?;
                child.wait().await?;
            }
        }
        Ok(())
    }
}

/// The event backbone's lines of one process's `/metrics` (backlogs, lags, dead letters).
/// Starts `bin args` with its stderr appended to `log` and its stdout (the `listening on` lines) piped;
/// killed when dropped.
pub fn spawn_logged(
    bin: &Path,
    args: &[String],
    log: &Path,
) -> anyhow::Result<(Child, tokio::io::Lines<BufReader<tokio::process::ChildStdout>>)> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", std::env::var("SOCIALCARD_FAULTS_UP_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    Ok((child, BufReader::new(stdout).lines()))
}

pub async fn event_metrics(addr: SocketAddr) -> Vec<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: up\r\nConnection: close\r\n\r\n").await?;
        let mut body = String::new();
        s.read_to_string(&mut body).await?;
        std::io::Result::Ok(body)
    };
    let Ok(Ok(body)) = tokio::time::timeout(Duration::from_secs(5), fetch).await else { return Vec::new() };
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.contains("backlog") || l.contains("lag") || l.contains("dead_letter"))
        .filter(|l| !l.trim_end().ends_with(" 0"))
        .map(str::to_string)
        .collect()
}

/// The `socialcard` binary of the same profile as this harness: `SOCIALCARD_BIN`, or built by cargo.
pub async fn socialcard_binary() -> anyhow::Result<PathBuf> {
    if let Ok(bin) = std::env::var("SOCIALCARD_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let me = std::env::current_exe()?;
    let dir = me.parent().context("the harness has no directory")?;
    let release = !cfg!(debug_assertions);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut build = Command::new(cargo);
    // With this crate in the same build, features unify as in `cargo run -p socialcard-faults`: nothing
    // of the harness is rebuilt, and `socialcard` only when its sources changed.
    build.current_dir(&root).args(["build", "-q", "-p", "socialcard", "-p", "socialcard-faults"]);
    if release {
        build.arg("--release");
    }
    let status = build.status().await.context("cannot run cargo to build socialcard")?;
    anyhow::ensure!(status.success(), "cargo build of socialcard failed");
    Ok(dir.join("socialcard"))
}

/// A fresh PostgreSQL database for one run, behind a proxy.
#[derive(Debug)]
pub struct Postgres {
    base: String,
    pub name: String,
    pub proxy: Proxy,
}

impl Postgres {
    pub async fn create(base_url: &str, seed: u64) -> anyhow::Result<Postgres> {
        use sqlx::Connection as _;
        // Digits and underscores only: safe to splice into the DDL below.
        let name = format!("socialcard_faults_{seed}_{}", std::process::id());
        let mut c = sqlx::PgConnection::connect(base_url).await.context("cannot reach PostgreSQL")?;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name}"))).execute(&mut c).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut c).await?;
        c.close().await?;
        let (host, _) = split_url(base_url)?;
        let upstream = tokio::net::lookup_host(host).await?.next().context("PostgreSQL host does not resolve")?;
        let proxy = Proxy::start("postgres", Some(upstream)).await?;
        Ok(Postgres { base: base_url.to_string(), name, proxy })
    }

    /// The URL `up` gets: through the proxy, to this run's database.
    pub fn url(&self) -> anyhow::Result<String> {
        let (host, rest) = split_url(&self.base)?;
        let prefix = &self.base[..self.base.len() - rest.len() - host.len()];
        let query = rest.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
        Ok(format!("{prefix}{}/{}{query}", self.proxy.addr, self.name))
    }

    pub async fn drop_database(&self) {
        use sqlx::Connection as _;
        if let Ok(mut c) = sqlx::PgConnection::connect(&self.base).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)))
                .execute(&mut c)
                .await;
            let _ = c.close().await;
        }
    }
}

/// `postgres://user@host:port/db?x` -> (`host:port`, `/db?x`).
fn split_url(url: &str) -> anyhow::Result<(&str, &str)> {
    let (_, after) = url.split_once("://").context("the database URL has no scheme")?;
    let authority_end = after.find('/').unwrap_or(after.len());
    let authority = &after[..authority_end];
    let host = authority.rsplit_once('@').map(|(_, h)| h).unwrap_or(authority);
    Ok((host, &after[authority_end..]))
}

/// The Kafka-protocol broker of a run, and how to cut it.
#[derive(Debug)]
pub enum Broker {
    /// Our own nisshi, advertising the proxy's address so every connection goes through the proxy.
    Nisshi { child: Box<Child>, proxy: Proxy },
    /// librdkafka's mock cluster in this process; a cut takes its broker down.
    Mock { bootstrap: String, commands: std::sync::mpsc::Sender<MockCommand> },
}

#[derive(Debug, Clone, Copy)]
pub enum MockCommand {
    Down,
    Up,
    Stop,
}

impl Broker {
    pub async fn start(work: &Path) -> anyhow::Result<Broker> {
        if let Some(nisshi) = find_nisshi() {
            match Self::nisshi(&nisshi, work).await {
                Ok(b) => return Ok(b),
                // Said aloud: the run then cuts the mock broker instead.
                Err(e) => println!("(nisshi at {} did not start: {e:#}; using the mock cluster)", nisshi.display()),
            }
        }
        let (commands, receive) = std::sync::mpsc::channel::<MockCommand>();
        let (ready, bootstrap) = std::sync::mpsc::channel::<anyhow::Result<String>>();
        std::thread::spawn(move || {
            let cluster = match rdkafka::mocking::MockCluster::new(1) {
                Ok(c) => c,
                Err(e) => {
                    let _ = ready.send(Err(e.into()));
                    return;
                }
            };
            // Every topic up front: `up` then finds them and makes no admin call the mock would stall on.
            for t in socialcard_events::topics::ALL {
                let _ = cluster.create_topic(t, 2, 1);
                let _ = cluster.create_topic(&socialcard_events::topics::dead_letter(t), 1, 1);
            }
            let _ = ready.send(Ok(cluster.bootstrap_servers()));
            while let Ok(c) = receive.recv() {
                let _ = match c {
                    MockCommand::Down => cluster.broker_down(1),
                    MockCommand::Up => cluster.broker_up(1),
                    MockCommand::Stop => return,
                };
            }
        });
        let bootstrap = bootstrap.recv()??;
        Ok(Broker::Mock { bootstrap, commands })
    }

    /// Our own nisshi on a free port, advertising the proxy in front of it.
    async fn nisshi(nisshi: &Path, work: &Path) -> anyhow::Result<Broker> {
        let port = free_port()?;
        let proxy = Proxy::start("kafka", Some(SocketAddr::from(([127, 0, 0, 1], port)))).await?;
        let log = std::fs::File::create(work.join("nisshi.log"))?;
        let mut child = Command::new(nisshi)
            .args(["broker", "--listener-url", &format!("tcp://127.0.0.1:{port}")])
            .args(["--advertised-listener-url", &format!("tcp://{}", proxy.addr)])
            .args(["--storage-engine", "memory://nisshi/", "--group-initial-rebalance-delay", "0s"])
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()?;
        for _ in 0..60 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                return Ok(Broker::Nisshi { child: Box::new(child), proxy });
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!("nisshi exited: {status}");
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let _ = child.start_kill();
        bail!("nisshi did not listen on {port} within 30 s")
    }

    pub fn bootstrap(&self) -> String {
        match self {
            Broker::Nisshi { proxy, .. } => proxy.addr.to_string(),
            Broker::Mock { bootstrap, .. } => bootstrap.clone(),
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Broker::Nisshi { .. } => "nisshi (own instance, every connection through the harness's proxy)",
            Broker::Mock { .. } => "librdkafka mock cluster in the harness (cuts take its broker down)",
        }
    }

    pub fn cut(&self) {
        match self {
            Broker::Nisshi { proxy, .. } => proxy.cut(),
            Broker::Mock { commands, .. } => {
                let _ = commands.send(MockCommand::Down);
            }
        }
    }

    pub fn heal(&self) {
        match self {
            Broker::Nisshi { proxy, .. } => proxy.heal(),
            Broker::Mock { commands, .. } => {
                let _ = commands.send(MockCommand::Up);
            }
        }
    }

    pub async fn stop(self) {
        match self {
            Broker::Nisshi { mut child, .. } => {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
            Broker::Mock { commands, .. } => {
                let _ = commands.send(MockCommand::Stop);
            }
        }
    }
}

fn find_nisshi() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("SOCIALCARD_FAULTS_NISSHI") {
        return Some(PathBuf::from(p));
    }
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join("nisshi")).find(|p| p.is_file())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
