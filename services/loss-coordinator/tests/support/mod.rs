//! A small city in one test process: a registry (SQLite), two bank adapters (icbc, ccb) and the loss
//! coordinator, each served over gRPC on an ephemeral port, wired by the embedded log exactly as
//! `socialcard up` wires them, all on one clock the test moves.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use socialcard_bank_adapter::BankAdapter;
use socialcard_domain::{BankDirectory, CityPolicy};
use socialcard_events::Outbox;
use socialcard_events::embedded::EmbeddedConsumer;
use socialcard_loss_coordinator::events::CardEvents;
use socialcard_loss_coordinator::{Coordinator, CoordinatorConfig};
use socialcard_proto::bank::v1::bank_card_service_client::BankCardServiceClient;
use socialcard_proto::loss::v1 as loss;
use socialcard_proto::loss::v1::loss_coordinator_service_client::LossCoordinatorServiceClient;
use socialcard_proto::registry::v1 as reg;
use socialcard_proto::registry::v1::registry_service_client::RegistryServiceClient;
use socialcard_registry::RegistryConfig;
use socialcard_registry::events::FinancialEvents;
use socialcard_server::ManualClock;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Channel;

#[allow(unused_imports)]
pub use socialcard_server::error::reason_of;

pub struct Dir(pub PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub async fn listen() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = format!("http://{}", l.local_addr().unwrap());
    (l, a)
}

pub struct Bank {
    pub code: String,
    pub adapter: BankAdapter,
    pub client: BankCardServiceClient<Channel>,
    pub addr: String,
}

/// A running coordinator; dropping `stop` (or [`Running::kill`]) ends its tasks.
pub struct Running {
    pub coordinator: Coordinator,
    pub client: LossCoordinatorServiceClient<Channel>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Stops the coordinator abruptly, as a SIGKILL would: its tasks are aborted wherever they are.
    pub async fn kill(self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        drop(self.stop);
    }
}

pub struct City {
    pub clock: ManualClock,
    pub registry: RegistryServiceClient<Channel>,
    pub registry_addr: String,
    pub registry_outbox: Arc<dyn Outbox>,
    /// The registry's storage, to count rows (bad input must write none).
    pub registry_store: Arc<dyn socialcard_registry::storage::RegistryStore>,
    pub banks: Vec<Bank>,
    pub dir: Dir,
    /// Where the coordinator listens (the adapters hand branch losses and unlocks to it there).
    coordinator_addr: String,
    /// The city's policy, the registry's and the coordinator's alike.
    pub policy: CityPolicy,
    stop: watch::Sender<bool>,
}

/// Monday 23 November 2026, 10:00 in Shanghai (within the 12333 operator's working hours).
pub fn monday_morning() -> time::OffsetDateTime {
    time::macros::datetime!(2026-11-23 02:00 UTC)
}

impl City {
    pub async fn start() -> City {
        City::start_with(CityPolicy::shanghai()).await
    }

    /// A city under `policy` (e.g. a social-side lapse of temporary losses, R27).
    pub async fn start_with(policy: CityPolicy) -> City {
        let dir = Dir(std::env::temp_dir().join(format!("socialcard-loss-{}", uuid::Uuid::new_v4().simple())));
        std::fs::create_dir_all(&dir.0).unwrap();
        let clock = ManualClock::new(monday_morning());
        let url = format!("sqlite://{}?mode=rwc", dir.0.join("registry.db").display());
        let config = RegistryConfig { policy: policy.clone(), ..RegistryConfig::shanghai(b"k".repeat(32)) };
        let built = socialcard_registry::build(&url, Arc::new(clock.clone()), config).await.unwrap();
        let (stop, stopped) = watch::channel(false);
        let (l, registry_addr) = listen().await;
        let routes = tonic::service::Routes::new(
            socialcard_registry::grpc::RegistryGrpc::new(built.registry.clone()).into_server(),
        );
        tokio::spawn(socialcard_server::grpc::serve(l, routes, &[], std::future::pending()));
        let registry = RegistryServiceClient::connect(registry_addr.clone()).await.unwrap();

        let financial: Arc<dyn socialcard_events::Handler> = Arc::new(FinancialEvents::new(built.registry.clone()));
        let coordinator_addr = {
            let (l, a) = listen().await;
            drop(l);
            a
        };
        let mut banks = Vec::new();
        for code in ["icbc", "ccb"] {
            let bank = BankDirectory::shanghai().get(code).unwrap().clone();
            let channel = Channel::from_shared(registry_addr.clone()).unwrap().connect_lazy();
            let adapter = BankAdapter::open(bank, &dir.0.join(format!("bank-{code}.db")), channel)
                .await
                .unwrap()
                .with_coordinator(Channel::from_shared(coordinator_addr.clone()).unwrap().connect_lazy());
            let (l, addr) = listen().await;
            let routes = tonic::service::Routes::new(adapter.clone().into_server())
                .add_service(adapter.clone().into_coordination_server());
            tokio::spawn(socialcard_server::grpc::serve(l, routes, &[], std::future::pending()));
            let mut consumer = EmbeddedConsumer::new(
                &format!("registry.{code}"),
                socialcard_events::topics::FINANCIAL,
                adapter.outbox(),
                built.offsets.clone().unwrap(),
                financial.clone(),
            );
            consumer.max_attempts = 50;
            tokio::spawn(consumer.run(stopped.clone()));
            banks.push(Bank {
                code: code.to_string(),
                client: BankCardServiceClient::connect(addr.clone()).await.unwrap(),
                adapter,
                addr,
            });
        }
        City {
            clock,
            registry,
            registry_addr,
            registry_outbox: built.outbox,
            registry_store: built.registry.store().clone(),
            banks,
            dir,
            coordinator_addr,
            policy,
            stop,
        }
    }

    pub fn bank(&self, code: &str) -> BankCardServiceClient<Channel> {
        self.banks.iter().find(|b| b.code == code).unwrap().client.clone()
    }

    pub fn adapter(&self, code: &str) -> &BankAdapter {
        &self.banks.iter().find(|b| b.code == code).unwrap().adapter
    }

    /// Starts a coordinator on this city's database; `adapter_addr` overrides where it finds a bank.
    pub async fn coordinator_with(&self, adapter_addr: impl Fn(&str, &str) -> String) -> Running {
        let registry = Channel::from_shared(self.registry_addr.clone()).unwrap().connect_lazy();
        let adapters = self
            .banks
            .iter()
            .map(|b| (b.code.clone(), Channel::from_shared(adapter_addr(&b.code, &b.addr)).unwrap().connect_lazy()))
            .collect();
        let mut config = CoordinatorConfig::new(self.policy.clone(), BankDirectory::shanghai());
        config.tick = Duration::from_millis(20);
        config.call_timeout = Duration::from_secs(2);
        config.max_backoff = Duration::from_millis(200);
        let coordinator = Coordinator::open(
            &self.dir.0.join("coordinator.db"),
            registry,
            adapters,
            Arc::new(self.clock.clone()),
            config,
        )
        .await
        .unwrap();
        let (stop, stopped) = watch::channel(false);
        let addr = self.coordinator_addr.clone();
        let l = TcpListener::bind(addr.trim_start_matches("http://")).await.unwrap();
        let routes = tonic::service::Routes::new(coordinator.clone().into_server());
        let mut tasks = vec![tokio::spawn(async move {
            let _ = socialcard_server::grpc::serve(l, routes, &[], std::future::pending()).await;
        })];
        let consumer = EmbeddedConsumer::new(
            "loss-coordinator",
            socialcard_events::topics::CARD,
            self.registry_outbox.clone(),
            coordinator.offsets(),
            Arc::new(CardEvents::new(coordinator.clone())),
        );
        tasks.push(tokio::spawn(consumer.run(stopped.clone())));
        tasks.push(tokio::spawn(coordinator.clone().run(stopped)));
        let client = LossCoordinatorServiceClient::connect(addr).await.unwrap();
        Running { coordinator, client, stop, tasks }
    }

    pub async fn coordinator(&self) -> Running {
        self.coordinator_with(|_, addr| addr.to_string()).await
    }

    pub async fn card(&self, card_id: &str) -> reg::Card {
        self.registry
            .clone()
            .get_card(reg::GetCardRequest { lookup: Some(reg::get_card_request::Lookup::CardId(card_id.into())) })
            .await
            .unwrap()
            .into_inner()
            .card
            .unwrap()
    }

    /// A collected card of `bank`; returns (card id, card number).
    pub async fn collected(&self, n: u64, bank: &str) -> (String, String) {
        let bin = BankDirectory::shanghai().get(bank).unwrap().bin_prefixes[0].clone();
        let c = socialcard_registry::fixtures::collected_card(&mut self.registry.clone(), n, bank, &bin).await.unwrap();
        (c.card_id, c.card_number)
    }

    /// How many audit entries of `action` the registry holds for the card.
    pub async fn audited(&self, card_id: &str, action: &str) -> usize {
        let trail = self
            .registry
            .clone()
            .list_audit_trail(reg::ListAuditTrailRequest { card_id: card_id.into() })
            .await
            .unwrap()
            .into_inner()
            .entries;
        trail.iter().filter(|e| e.action == action).count()
    }

    /// How many `event_type` events the bank's adapter wrote for the card.
    pub async fn bank_events(&self, code: &str, card_id: &str, event_type: &str) -> usize {
        let rows =
            self.adapter(code).outbox().read_after(socialcard_events::topics::FINANCIAL, 0, 10_000).await.unwrap();
        rows.iter().filter(|r| r.envelope.subject == card_id && r.envelope.event_type == event_type).count()
    }
}

impl Drop for City {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Waits until `check` holds (the services settle through events); panics with `what` after 20 s.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..2000 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

pub fn key() -> String {
    uuid::Uuid::now_v7().to_string()
}

pub fn actor(channel: reg::Channel) -> Option<reg::Actor> {
    Some(reg::Actor {
        channel: channel as i32,
        operator_id: "clerk-7".into(),
        site_id: "site-3".into(),
        caller_phone: if matches!(
            channel,
            reg::Channel::Hotline | reg::Channel::Hotline12333SelfService | reg::Channel::Hotline12333Operator
        ) {
            "13800000000".into()
        } else {
            String::new()
        },
        ..Default::default()
    })
}

/// The holder in person with the ID card (and the card itself when `card`).
pub fn holder(card: bool) -> Option<reg::Documents> {
    Some(reg::Documents {
        presenter: reg::Presenter::Holder as i32,
        holder_id_card: true,
        card_presented: card,
        ..Default::default()
    })
}

pub fn report(card_id: &str, kind: reg::LossKind, channel: reg::Channel) -> loss::ReportLossRequest {
    loss::ReportLossRequest {
        idempotency_key: key(),
        card_id: card_id.into(),
        loss_kind: kind as i32,
        actor: actor(channel),
        documents: holder(false),
        card_number: String::new(),
    }
}

pub fn unlock(card_id: &str, channel: reg::Channel, card_presented: bool) -> loss::UnlockRequest {
    loss::UnlockRequest {
        idempotency_key: key(),
        case_id: String::new(),
        card_id: card_id.into(),
        actor: actor(channel),
        documents: holder(card_presented),
    }
}
