//! The distributed shape on one machine: `socialcard serve` runs the registry, two bank adapters and the
//! loss coordinator as separate processes, each with its own data directory, talking gRPC to each other
//! and exchanging events only through Kafka (librdkafka's mock broker served from this test process, or
//! a real broker with `SOCIALCARD_TEST_KAFKA_BROKERS`). A bank activation crosses from the adapter's
//! process to the registry's; a loss through the coordinator freezes the adapter; the bank's own unlock
//! reaches the registry only as the adapter's event through Kafka.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use socialcard_proto::bank::v1 as bank_pb;
use socialcard_proto::bank::v1::bank_card_service_client::BankCardServiceClient;
use socialcard_proto::registry::v1 as pb;
use socialcard_proto::registry::v1::registry_service_client::RegistryServiceClient;

const BIN: &str = env!("CARGO_BIN_EXE_socialcard");

/// One `socialcard serve <service>` process, killed when dropped.
struct Served {
    child: Child,
    /// Every line it printed up to (and including) `<prefix> listening on ...`.
    printed: Vec<String>,
}

impl Served {
    /// Starts `serve <args>` and waits until it prints `<ready>`.
    fn start(args: &[&str], data_dir: &Path, brokers: &str, ready: &str) -> Served {
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(args)
            .args(["--metrics-listen", "127.0.0.1:0", "--kafka-partitions", "4", "--kafka-brokers", brokers])
            .arg("--data-dir")
            .arg(data_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut printed: Vec<String> = Vec::new();
        while !printed.last().is_some_and(|l| l.starts_with(ready)) {
            match lines.next() {
                Some(line) => printed.push(line.unwrap()),
                None => panic!("serve {args:?} stopped before it was ready: {printed:?}"),
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Served { child, printed }
    }

    /// The address after `<prefix> listening on `.
    fn addr(&self, prefix: &str) -> String {
        let marker = format!("{prefix} listening on ");
        self.printed
            .iter()
            .find_map(|l| l.strip_prefix(&marker))
            .unwrap_or_else(|| panic!("no {marker:?} in {:?}", self.printed))
            .to_string()
    }

    /// Stops it as `docker stop` would, and expects a clean exit.
    fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "serve did not stop cleanly on SIGTERM: {status}");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `socialcard health --endpoint <addr>`: the containers' health check.
fn health(addr: &str, service: &str) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["health", "--endpoint", &format!("http://{addr}"), "--service", service])
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn card(client: &mut RegistryServiceClient<tonic::transport::Channel>, card_id: &str) -> pb::Card {
    client
        .get_card(pb::GetCardRequest { lookup: Some(pb::get_card_request::Lookup::CardId(card_id.into())) })
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap()
}

/// The card once `done` holds for it at the registry (events take their time through Kafka).
async fn wait_for_card(
    client: &mut RegistryServiceClient<tonic::transport::Channel>,
    card_id: &str,
    done: impl Fn(&pb::Card) -> bool,
) -> pb::Card {
    let start = Instant::now();
    loop {
        let c = card(client, card_id).await;
        if done(&c) {
            return c;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "the event never reached the registry: {c:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_in_separate_processes_activate_and_lock_a_card_through_grpc_and_kafka() {
    // The mock broker lives in this test process and listens on a real port the children connect to.
    let mock = MockCluster::new(1).unwrap();
    // It does not implement CreateTopics: give it the topics `serve` would create.
    for topic in socialcard_events::topics::ALL {
        mock.create_topic(topic, 4, 1).unwrap();
        mock.create_topic(&socialcard_events::topics::dead_letter(topic), 1, 1).unwrap();
    }
    let brokers = std::env::var("SOCIALCARD_TEST_KAFKA_BROKERS")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| mock.bootstrap_servers());
    let dir = std::env::temp_dir().join(format!("socialcard-serve-{}", uuid::Uuid::new_v4().simple()));

    // Each service its own data directory, as each container has its own volume.
    let registry = Served::start(
        &["registry", "--registry-listen", "127.0.0.1:0"],
        &dir.join("registry"),
        &brokers,
        "registry events published to kafka",
    );
    let registry_addr = registry.addr("registry");
    let registry_endpoint = format!("http://{registry_addr}");
    // The adapters reach the coordinator lazily: it may start after them, at an address chosen now.
    let loss_addr = format!("127.0.0.1:{}", free_port());
    let adapter = |code: &str| {
        Served::start(
            &[
                "bank-adapter",
                "--bank",
                code,
                "--bank-listen",
                "127.0.0.1:0",
                "--registry-endpoint",
                &registry_endpoint,
                "--loss-endpoint",
                &format!("http://{loss_addr}"),
            ],
            &dir.join(format!("bank-{code}")),
            &brokers,
            &format!("bank-adapter[{code}] listening on"),
        )
    };
    let icbc = adapter("icbc");
    let ccb = adapter("ccb");
    let icbc_addr = icbc.addr("bank-adapter[icbc]");
    let ccb_addr = ccb.addr("bank-adapter[ccb]");
    let coordinator = Served::start(
        &[
            "loss-coordinator",
            "--loss-listen",
            &loss_addr,
            "--registry-endpoint",
            &registry_endpoint,
            "--adapter",
            &format!("icbc=http://{icbc_addr}"),
            "--adapter",
            &format!("ccb=http://{ccb_addr}"),
        ],
        &dir.join("loss-coordinator"),
        &brokers,
        "loss-coordinator listening on",
    );

    // Every process answers its own health check, SERVING for the services it serves, and has /metrics.
    for (addr, service) in [
        (registry_addr.as_str(), "socialcard.registry.v1.RegistryService"),
        (icbc_addr.as_str(), "socialcard.bank.v1.BankCardService"),
        (ccb_addr.as_str(), "socialcard.bank.v1.BankCoordinationService"),
        (loss_addr.as_str(), "socialcard.loss.v1.LossCoordinatorService"),
    ] {
        assert_eq!(health(addr, service), (true, "SERVING".to_string()), "{addr} {service}");
    }
    let (ok, _) = health(&registry_addr, "socialcard.bank.v1.BankCardService");
    assert!(!ok, "the registry's process does not serve the banks' service");
    for served in [&registry, &icbc, &ccb, &coordinator] {
        let metrics = http_get(&served.addr("metrics"), "/metrics");
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    }

    // A card collected at the registry, for ICBC.
    let mut client = RegistryServiceClient::connect(registry_endpoint.clone()).await.unwrap();
    let fixture = socialcard_registry::fixtures::collected_card(&mut client, 7, "icbc", "621226").await.unwrap();
    let card_id = fixture.card_id.clone();
    let card_number = card(&mut client, &card_id).await.card_number;

    // Another bank's adapter refuses it; ICBC's activates it: the registry's process switched the
    // social function on before the adapter answered (R20).
    let mut at_ccb = BankCardServiceClient::connect(format!("http://{ccb_addr}")).await.unwrap();
    let activation = |key: &str| bank_pb::ActivateFinancialRequest {
        idempotency_key: key.into(),
        card_number: card_number.clone(),
        teller_id: "teller-1".into(),
        branch_id: "branch-1".into(),
        face_verification_ref: "face-1".into(),
        bank_pin_changed: true,
    };
    let refused = at_ccb.activate_financial(activation("k-ccb")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let mut at_icbc = BankCardServiceClient::connect(format!("http://{icbc_addr}")).await.unwrap();
    let activated = at_icbc.activate_financial(activation("k-icbc")).await.unwrap().into_inner();
    assert_eq!(activated.financial_state, pb::FinancialState::Active as i32);
    assert_eq!(activated.social_state, pb::SocialState::Active as i32);
    let at_registry = card(&mut client, &card_id).await;
    assert_eq!(at_registry.social_state, pb::SocialState::Active as i32);
    assert_eq!(at_registry.financial_state, pb::FinancialState::Active as i32);

    // A loss by phone at the coordinator's process: the registry locks, ICBC's adapter freezes (R26).
    let reported = Command::new(BIN)
        .args(["--endpoint", &registry_endpoint, "report-loss", &card_id, "--kind", "temporary"])
        .args(["--phone", "13800000000", "--loss-endpoint", &format!("http://{loss_addr}")])
        .output()
        .unwrap();
    let reported_text = String::from_utf8_lossy(&reported.stdout);
    assert!(reported.status.success(), "{}", String::from_utf8_lossy(&reported.stderr));
    assert!(reported_text.contains("social locked: true, financial frozen: true"), "{reported_text}");
    // The adapter's own record is frozen: another activation is refused there (R26).
    let again = at_icbc.activate_financial(activation("k-icbc-2")).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition, "{again:?}");
    assert_eq!(socialcard_server::error::reason_of(&again).as_deref(), Some("FINANCIAL_FROZEN"), "{again:?}");
    // The registry locked its side in the coordinator's call, and learns of the freeze from the adapter's
    // event through Kafka; the bank's QueryCard shows the registry's view.
    wait_for_card(&mut client, &card_id, |c| c.financial_state == pb::FinancialState::Frozen as i32).await;
    let at_registry = card(&mut client, &card_id).await;
    assert_eq!(at_registry.social_state, pb::SocialState::LossLocked as i32);
    let at_bank =
        at_icbc.query_card(bank_pb::QueryCardRequest { card_number: card_number.clone() }).await.unwrap().into_inner();
    assert_eq!(at_bank.financial_state, pb::FinancialState::Frozen as i32);

    // The bank lifts its own side (R27) at the adapter. The registry learns of it only from the adapter's
    // event, relayed to Kafka by the adapter's process and consumed by the registry's.
    let unlocked = at_icbc
        .unlock_financial(bank_pb::UnlockFinancialRequest {
            idempotency_key: uuid::Uuid::now_v7().to_string(),
            card_number: card_number.clone(),
            teller_id: "teller-1".into(),
            branch_id: "branch-1".into(),
            holder_id_checked: true,
            card_presented: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unlocked.financial_state, pb::FinancialState::Active as i32);
    let c = wait_for_card(&mut client, &card_id, |c| c.financial_state == pb::FinancialState::Active as i32).await;
    // The social side stays locked until the bureau unlocks it.
    assert_eq!(c.social_state, pb::SocialState::LossLocked as i32);
    // The adapter's relay drained its outbox into Kafka.
    let icbc_metrics = icbc.addr("metrics");
    let start = Instant::now();
    loop {
        let text = http_get(&icbc_metrics, "/metrics");
        if text.contains("socialcard_outbox_backlog{source=\"bank-adapter.icbc\"} 0") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "backlog gauge not at 0: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    drop((client, at_icbc, at_ccb));
    for served in [coordinator, ccb, icbc, registry] {
        served.stop();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_service_on_its_own_refuses_to_start_without_kafka() {
    let dir = std::env::temp_dir().join(format!("socialcard-serve-{}", uuid::Uuid::new_v4().simple()));
    let out = Command::new(BIN)
        .args(["serve", "registry", "--registry-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&dir)
        .env_remove("SOCIALCARD_KAFKA_BROKERS")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--kafka-brokers"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn health_fails_when_nothing_answers() {
    let port = free_port();
    let (ok, _) = health(&format!("127.0.0.1:{port}"), "");
    assert!(!ok);
}

/// The shape docker-compose.yml and deploy/k8s/ run: mutual TLS between the processes, each with its own
/// certificates, and `socialcard health` probing a TLS port without a client certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_mutual_tls_each_process_is_probed_and_an_activation_crosses_them() {
    use socialcard_server::tls::TlsDir;
    use tonic::transport::Endpoint;

    let mock = MockCluster::new(1).unwrap();
    for topic in socialcard_events::topics::ALL {
        mock.create_topic(topic, 4, 1).unwrap();
        mock.create_topic(&socialcard_events::topics::dead_letter(topic), 1, 1).unwrap();
    }
    let brokers = std::env::var("SOCIALCARD_TEST_KAFKA_BROKERS")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| mock.bootstrap_servers());
    let dir = std::env::temp_dir().join(format!("socialcard-serve-tls-{}", uuid::Uuid::new_v4().simple()));
    let pki = dir.join("pki");
    let made = Command::new(BIN).args(["certs", "--out"]).arg(&pki).output().unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let pki_arg = pki.to_str().unwrap();

    let registry = Served::start(
        &["registry", "--registry-listen", "127.0.0.1:0", "--tls-dir", pki_arg],
        &dir.join("registry"),
        &brokers,
        "registry events published to kafka",
    );
    let registry_addr = registry.addr("registry");
    let icbc = Served::start(
        &[
            "bank-adapter",
            "--bank",
            "icbc",
            "--bank-listen",
            "127.0.0.1:0",
            "--tls-dir",
            pki_arg,
            "--registry-endpoint",
            &format!("https://{registry_addr}"),
            "--loss-endpoint",
            &format!("https://127.0.0.1:{}", free_port()),
        ],
        &dir.join("bank-icbc"),
        &brokers,
        "bank-adapter[icbc] listening on",
    );
    let icbc_addr = icbc.addr("bank-adapter[icbc]");

    // The probe the containers run: TLS trusting the CA, expecting the service's certificate.
    let probe = |addr: &str, server: &str, service: &str| {
        Command::new(BIN)
            .args(["--tls-dir", pki_arg, "health", "--endpoint", &format!("https://{addr}")])
            .args(["--tls-server", server, "--service", service])
            .output()
            .unwrap()
    };
    for (addr, server, service) in [
        (registry_addr.as_str(), "registry", "socialcard.registry.v1.RegistryService"),
        (icbc_addr.as_str(), "bank-adapter-icbc", "socialcard.bank.v1.BankCardService"),
    ] {
        let out = probe(addr, server, service);
        assert!(out.status.success(), "{server}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "SERVING");
    }
    // Expecting another service's certificate, or speaking plaintext, the probe fails.
    assert!(!probe(&registry_addr, "bank-adapter-icbc", "").status.success());
    assert!(!health(&registry_addr, "").0, "plaintext to a TLS port");

    // The bureau's CLI certificate at the registry, ICBC's core certificate at its adapter; the adapter
    // reaches the registry with its own service certificate.
    let tls = TlsDir::new(&pki);
    let registry_channel = Endpoint::from_shared(format!("https://{registry_addr}"))
        .unwrap()
        .tls_config(tls.client_config(&tls.service_client("cli"), "registry").unwrap())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = RegistryServiceClient::new(registry_channel);
    let fixture = socialcard_registry::fixtures::collected_card(&mut client, 11, "icbc", "621226").await.unwrap();
    let card_number = card(&mut client, &fixture.card_id).await.card_number;
    let bank_channel = Endpoint::from_shared(format!("https://{icbc_addr}"))
        .unwrap()
        .tls_config(tls.client_config(&tls.bank_client("icbc"), "bank-adapter-icbc").unwrap())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let activated = BankCardServiceClient::new(bank_channel)
        .activate_financial(bank_pb::ActivateFinancialRequest {
            idempotency_key: "k-tls".into(),
            card_number,
            teller_id: "teller-1".into(),
            branch_id: "branch-1".into(),
            face_verification_ref: "face-1".into(),
            bank_pin_changed: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(activated.social_state, pb::SocialState::Active as i32);
    let at_registry = card(&mut client, &fixture.card_id).await;
    assert_eq!(at_registry.social_state, pb::SocialState::Active as i32);
    assert_eq!(at_registry.financial_state, pb::FinancialState::Active as i32);

    drop(client);
    icbc.stop();
    registry.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
