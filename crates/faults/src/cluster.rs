//! The distributed shape under test: one `socialcard serve <service>` process per service (registry,
//! loss coordinator, postal, the adapters of the banks the workload uses), the registry on PostgreSQL,
//! events between the processes through the broker only. The clients reach every listener through the
//! harness's proxies ([`Links`]), and so do the services each other: the adapters and the coordinator
//! reach the registry through one proxy, the adapters the coordinator through another, the coordinator
//! each adapter through one per bank. A kill takes one process down; the others keep running.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

use crate::plan::{BANKS, Link, Service};
use crate::proxy::Proxy;
use crate::system::{Links, spawn_logged};

/// One service's process and how to start it again.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    bin: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    child: Option<Child>,
    /// A line prefix the process prints before its address, and the proxies to point at that address.
    listens: Vec<(String, Vec<Proxy>)>,
    /// A line that must also have been printed before the process counts as ready.
    ready_line: Option<&'static str>,
    metrics: Option<SocketAddr>,
    pub starts: u32,
    pub kills: u32,
}

impl Proc {
    /// Starts the process (again), retrying while it exits before it is ready (its database or the
    /// broker may be out of reach), and points its proxies at its new ports.
    pub async fn restart(&mut self, within: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + within;
        loop {
            match self.spawn_once().await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < until => {
                    eprintln!("faults: {} did not start ({e:#}); again", self.name);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => {
                    return Err(e.context(format!("{} did not start; its log: {}", self.name, self.log.display())));
                }
            }
        }
    }

    async fn spawn_once(&mut self) -> anyhow::Result<()> {
        let (mut child, mut lines) = spawn_logged(&self.bin, &self.args, &self.log)?;
        let mut found: Vec<Option<SocketAddr>> = vec![None; self.listens.len()];
        let mut ready_seen = self.ready_line.is_none();
        let mut metrics = None;
        let mut seen = Vec::new();
        let listens = &self.listens;
        let ready_line = self.ready_line;
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                seen.push(line.clone());
                if let Some(a) = line.strip_prefix("metrics listening on ") {
                    metrics = a.trim().parse::<SocketAddr>().ok();
                }
                for (i, (prefix, _)) in listens.iter().enumerate() {
                    if let Some(a) = line.strip_prefix(prefix.as_str()) {
                        found[i] = Some(a.trim().parse()?);
                    }
                }
                if ready_line.is_some_and(|r| line.starts_with(r)) {
                    ready_seen = true;
                }
                if ready_seen && found.iter().all(Option::is_some) {
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
                bail!("{} exited before it was ready: {status}", self.name);
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                let _ = child.start_kill();
                bail!("{} was not ready within 60 s; it printed {seen:?}", self.name)
            }
        }
        // Keep draining its stdout so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        for ((_, proxies), addr) in self.listens.iter().zip(found) {
            for p in proxies {
                p.set_upstream(addr.context("no address")?);
            }
        }
        self.metrics = metrics;
        self.child = Some(child);
        self.starts += 1;
        Ok(())
    }

    /// SIGKILL: no shutdown, no flush.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.start_kill()?;
            child.wait().await?;
            self.kills += 1;
        }
        Ok(())
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
            }
            if tokio::time::timeout(Duration::from_secs(15), child.wait()).await.is_err() {
                let _ = child.start_kill();
                let _ = child.wait().await;
            }
        }
    }
}

/// Every service's process, the clients' proxies and the proxies between the services.
#[derive(Debug)]
pub struct Cluster {
    /// The registry, the coordinator, postal, then the adapters in [`BANKS`] order.
    pub procs: Vec<Proc>,
    pub links: Links,
    /// The adapters' and the coordinator's link to the registry.
    registry_from_services: Proxy,
    /// The adapters' link to the coordinator.
    coordinator_from_adapters: Proxy,
    /// The coordinator's link to each adapter, by bank.
    adapters_from_coordinator: BTreeMap<String, Proxy>,
}

impl Cluster {
    /// Starts the registry (it creates the topics and its schema), then the others.
    pub async fn start(
        bin: &Path,
        work: &Path,
        webhook_secret: &str,
        database_url: &str,
        brokers: &str,
    ) -> anyhow::Result<Cluster> {
        anyhow::ensure!(bin.is_file(), "no socialcard binary at {}", bin.display());
        let mut banks = BTreeMap::new();
        let mut adapters_from_coordinator = BTreeMap::new();
        for code in BANKS {
            banks.insert(code.to_string(), Proxy::start(&format!("bank {code}"), None).await?);
            adapters_from_coordinator
                .insert(code.to_string(), Proxy::start(&format!("coordinator -> bank {code}"), None).await?);
        }
        let links = Links {
            registry: Proxy::start("registry", None).await?,
            loss: Proxy::start("loss-coordinator", None).await?,
            postal: Proxy::start("postal", None).await?,
            webhook: Proxy::start("courier webhook", None).await?,
            banks,
        };
        let registry_from_services = Proxy::start("services -> registry", None).await?;
        let coordinator_from_adapters = Proxy::start("adapters -> coordinator", None).await?;
        let url = |p: &Proxy| format!("http://{}", p.addr);

        let proc = |name: &str, service: &[&str], listens: Vec<(String, Vec<Proxy>)>| -> anyhow::Result<Proc> {
            let data = work.join(name);
            std::fs::create_dir_all(&data)?;
            let mut args: Vec<String> = vec!["serve".into()];
            args.extend(service.iter().map(|s| (*s).to_string()));
            args.extend(["--kafka-brokers".into(), brokers.to_string(), "--kafka-partitions".into(), "2".into()]);
            args.extend(["--metrics-listen".into(), "127.0.0.1:0".into(), "--data-dir".into()]);
            args.push(data.display().to_string());
            Ok(Proc {
                name: name.to_string(),
                bin: bin.to_path_buf(),
                args,
                log: work.join(format!("{name}.log")),
                child: None,
                listens,
                ready_line: None,
                metrics: None,
                starts: 0,
                kills: 0,
            })
        };

        let mut registry = proc(
            "registry",
            &["registry", "--registry-listen", "127.0.0.1:0", "--registry-database-url", database_url],
            vec![("registry listening on ".into(), vec![links.registry.clone(), registry_from_services.clone()])],
        )?;
        registry.ready_line = Some("registry events");

        let mut coordinator_args: Vec<String> =
            ["loss-coordinator", "--loss-listen", "127.0.0.1:0", "--registry-endpoint"]
                .iter()
                .map(|s| (*s).to_string())
                .collect();
        coordinator_args.push(url(&registry_from_services));
        for (code, p) in &adapters_from_coordinator {
            coordinator_args.extend(["--adapter".into(), format!("{code}={}", url(p))]);
        }
        // The banks without an adapter in this run: a port nothing listens on (calls to them fail as
        // UNAVAILABLE and are retried; the workload has no card at them).
        coordinator_args.extend(["--adapter-endpoint-template".into(), "http://127.0.0.1:9".into()]);
        let coordinator_args: Vec<&str> = coordinator_args.iter().map(String::as_str).collect();
        let coordinator = proc(
            "loss-coordinator",
            &coordinator_args,
            vec![(
                "loss-coordinator listening on ".into(),
                vec![links.loss.clone(), coordinator_from_adapters.clone()],
            )],
        )?;

        let postal = proc(
            "postal",
            &[
                "postal",
                "--postal-listen",
                "127.0.0.1:0",
                "--postal-webhook-listen",
                "127.0.0.1:0",
                "--postal-webhook-secret",
                webhook_secret,
            ],
            vec![
                ("postal listening on ".into(), vec![links.postal.clone()]),
                ("postal webhook listening on ".into(), vec![links.webhook.clone()]),
            ],
        )?;

        let mut procs = vec![registry, coordinator, postal];
        for code in BANKS {
            let (registry_url, loss_url) = (url(&registry_from_services), url(&coordinator_from_adapters));
            procs.push(proc(
                &format!("bank-adapter-{code}"),
                &[
                    "bank-adapter",
                    "--bank",
                    code,
                    "--bank-listen",
                    "127.0.0.1:0",
                    "--registry-endpoint",
                    &registry_url,
                    "--loss-endpoint",
                    &loss_url,
                ],
                vec![(
                    format!("bank-adapter[{code}] listening on "),
                    vec![links.banks[code].clone(), adapters_from_coordinator[code].clone()],
                )],
            )?);
        }
        for p in &mut procs {
            p.restart(Duration::from_secs(120)).await?;
        }
        Ok(Cluster { procs, links, registry_from_services, coordinator_from_adapters, adapters_from_coordinator })
    }

    fn index(service: Service) -> usize {
        match service {
            Service::Registry => 0,
            Service::Coordinator => 1,
            Service::Postal => 2,
            Service::Adapter(i) => 3 + i % BANKS.len(),
        }
    }

    pub fn proc_mut(&mut self, service: Service) -> &mut Proc {
        &mut self.procs[Self::index(service)]
    }

    /// The proxy of a link; the client-facing ones and those between the services.
    pub fn proxy(&self, link: Link) -> Proxy {
        let bank = |i: usize| BANKS[i % BANKS.len()];
        match link {
            Link::Registry => self.links.registry.clone(),
            Link::Loss => self.links.loss.clone(),
            Link::Postal => self.links.postal.clone(),
            Link::Webhook => self.links.webhook.clone(),
            Link::Bank(i) => self.links.banks[bank(i)].clone(),
            Link::RegistryFromServices => self.registry_from_services.clone(),
            Link::CoordinatorFromAdapters => self.coordinator_from_adapters.clone(),
            Link::AdapterFromCoordinator(i) => self.adapters_from_coordinator[bank(i)].clone(),
        }
    }

    /// Every proxy: the clients' first, then those between the services.
    pub fn proxies(&self) -> Vec<&Proxy> {
        let mut v = self.links.all();
        v.push(&self.registry_from_services);
        v.push(&self.coordinator_from_adapters);
        v.extend(self.adapters_from_coordinator.values());
        v
    }

    /// The processes that died on their own (each a failure of the suite), started again.
    pub async fn restart_exited(&mut self) -> anyhow::Result<Vec<String>> {
        let mut crashed = Vec::new();
        for p in &mut self.procs {
            if let Some(status) = p.exited() {
                crashed.push(format!("{} exited on its own: {status}", p.name));
                p.child = None;
                p.restart(Duration::from_secs(60)).await?;
            }
        }
        Ok(crashed)
    }

    pub fn starts_and_kills(&self) -> (u32, u32) {
        self.procs.iter().fold((0, 0), |(s, k), p| (s + p.starts, k + p.kills))
    }

    /// Every process's non-zero event metrics, by process.
    pub async fn event_metrics(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for p in &self.procs {
            if let Some(addr) = p.metrics {
                lines.extend(crate::system::event_metrics(addr).await.into_iter().map(|l| format!("{}: {l}", p.name)));
            }
        }
        lines
    }

    pub async fn stop(&mut self) {
        // The clients' entry points first, the registry last.
        for p in self.procs.iter_mut().rev() {
            p.stop().await;
        }
    }
}
