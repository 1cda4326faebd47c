//! The embedded default as a newcomer meets it: `socialcard up` on an empty data directory serves the
//! registry with gRPC health SERVING and reflection, keeps its data across a restart, and the CLI
//! drives a card from application to activation against it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use socialcard_proto::bank::v1 as bank_pb;
use socialcard_proto::bank::v1::bank_card_service_client::BankCardServiceClient;
use socialcard_proto::registry::v1 as pb;
use socialcard_proto::registry::v1::registry_service_client::RegistryServiceClient;
use tokio_stream::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

const BIN: &str = env!("CARGO_BIN_EXE_socialcard");

struct Up {
    child: Child,
    endpoint: String,
    loss: String,
    banks: std::collections::HashMap<String, String>,
}

impl Up {
    /// Starts `socialcard up` and waits for its `registry listening on` line.
    fn start(data_dir: &Path) -> Up {
        let mut child = Command::new(BIN)
            .args([
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
                "--data-dir",
            ])
            .arg(data_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // Every service says where it listens; the last line says where events go.
        let mut printed = Vec::new();
        while !printed.last().is_some_and(|l: &String| l.starts_with("registry events")) {
            printed.push(lines.next().expect("up stopped before it was ready").unwrap());
        }
        let endpoint = printed
            .iter()
            .find_map(|l| l.strip_prefix("registry listening on "))
            .map(|a| format!("http://{a}"))
            .expect("no registry line");
        let loss = printed
            .iter()
            .find_map(|l| l.strip_prefix("loss-coordinator listening on "))
            .map(|a| format!("http://{a}"))
            .expect("no loss-coordinator line");
        let banks: std::collections::HashMap<String, String> = printed
            .iter()
            .filter_map(|l| l.strip_prefix("bank-adapter["))
            .filter_map(|l| l.split_once("] listening on "))
            .map(|(code, addr)| (code.to_string(), format!("http://{addr}")))
            .collect();
        assert_eq!(banks.len(), 11, "one adapter per partner bank: {printed:?}");
        assert!(
            printed.iter().any(|l| l.contains("embedded log")),
            "without a broker, events stay in the embedded log"
        );
        std::thread::spawn(move || for _ in lines {});
        Up { child, endpoint, loss, banks }
    }

    fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "up did not stop cleanly on SIGTERM: {status}");
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(BIN).arg("--endpoint").arg(&self.endpoint).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

fn temp_dir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("socialcard-up-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

// Multi-threaded: `stop` blocks while the client's connection tasks must still run to close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_health_reflection_and_the_registry() {
    let dir = temp_dir();
    let up = Up::start(&dir);

    let channel = tonic::transport::Endpoint::from_shared(up.endpoint.clone()).unwrap().connect().await.unwrap();
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "socialcard.registry.v1.RegistryService"] {
        let r = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "health of {service:?}");
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let listed = match responses.next().await.unwrap().unwrap().message_response.unwrap() {
        MessageResponse::ListServicesResponse(l) => l.service.into_iter().map(|s| s.name).collect::<Vec<_>>(),
        other => panic!("unexpected {other:?}"),
    };
    assert!(listed.contains(&"socialcard.registry.v1.RegistryService".to_string()), "{listed:?}");
    assert!(listed.contains(&"grpc.health.v1.Health".to_string()), "{listed:?}");
    assert!(!listed.iter().any(|s| s.contains("BankCardService")), "reflection lists only what is served: {listed:?}");
    drop((responses, reflection, health));

    // The demo walkthrough of the README, through the CLI.
    let id = "11010519491231002X";
    up.cli(&["register", "--id", id, "--name", "Li Hua", "--phone", "13800000000"]);
    let applied = up.cli(&["apply", "--id", id, "--bank", "icbc"]);
    let card_id = applied.lines().next().unwrap().strip_prefix("card ").unwrap().to_string();
    up.cli(&["approve", &card_id]);
    let produced = up.cli(&["produce", &card_id]);
    assert!(produced.contains("physical          produced"), "{produced}");
    up.cli(&["collect", &card_id]);
    let activated = up.cli(&["activate", &card_id, "--channel", "bank", "--bank-endpoint", &up.banks["icbc"]]);
    assert!(
        activated.contains("social function   active") && activated.contains("financial         active"),
        "{activated}"
    );
    // Another bank's adapter refuses the card.
    let wrong = Command::new(BIN)
        .args([
            "--endpoint",
            &up.endpoint,
            "activate",
            &card_id,
            "--channel",
            "bank",
            "--bank-endpoint",
            &up.banks["ccb"],
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("PermissionDenied WRONG_BANK"), "{wrong:?}");
    // A loss by phone: the loss coordinator locks both functions (R26).
    let reported = up.cli(&[
        "report-loss",
        &card_id,
        "--kind",
        "temporary",
        "--phone",
        "13800000000",
        "--loss-endpoint",
        &up.loss,
    ]);
    assert!(reported.contains("social locked: true, financial frozen: true"), "{reported}");
    let shown = up.cli(&["show", &card_id]);
    assert!(shown.contains("social function   loss locked") && shown.contains("status code       4"), "{shown}");
    // The bureau unlocks the social side; the bank unlocks its own (R27).
    let unlocked = up.cli(&["unlock", &card_id, "--loss-endpoint", &up.loss]);
    assert!(unlocked.contains("social locked: false, financial frozen: true"), "{unlocked}");
    let card_number = shown.lines().find_map(|l| l.trim().strip_prefix("card number")).unwrap().trim().to_string();
    let mut icbc = BankCardServiceClient::connect(up.banks["icbc"].clone()).await.unwrap();
    let bank_side = icbc
        .unlock_financial(bank_pb::UnlockFinancialRequest {
            idempotency_key: uuid::Uuid::now_v7().to_string(),
            card_number,
            teller_id: "teller-1".into(),
            branch_id: "branch-1".into(),
            holder_id_checked: true,
            card_presented: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bank_side.financial_state, pb::FinancialState::Active as i32);
    drop(icbc);

    // The audit trail's hash chains verify.
    let verified = up.cli(&["audit-verify"]);
    assert!(verified.contains("0 breaks") && verified.contains(" 1 cards"), "{verified}");

    // A refusal reaches the CLI user as a reason and a non-zero exit.
    let refused =
        Command::new(BIN).args(["--endpoint", &up.endpoint, "apply", "--id", id, "--bank", "nobank"]).output().unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("UNKNOWN_BANK"));

    // Everything survives a restart, including the PIN key: the initial PIN still verifies.
    up.stop();
    let up = Up::start(&dir);
    let mut client = RegistryServiceClient::connect(up.endpoint.clone()).await.unwrap();
    let mut card = pb::Card::default();
    // The bank's unfreeze reaches the registry through the adapter's event, also across the restart.
    for _ in 0..500 {
        card = client
            .get_card(pb::GetCardRequest { lookup: Some(pb::get_card_request::Lookup::CardId(card_id.clone())) })
            .await
            .unwrap()
            .into_inner()
            .card
            .unwrap();
        if card.financial_state == pb::FinancialState::Active as i32 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(card.social_state, pb::SocialState::Active as i32);
    assert_eq!(card.financial_state, pb::FinancialState::Active as i32);
    let verified = client
        .verify_social_pin(pb::VerifySocialPinRequest {
            idempotency_key: uuid::Uuid::now_v7().to_string(),
            card_id,
            actor: Some(pb::Actor {
                channel: pb::Channel::MedicalTerminal as i32,
                site_id: "hospital-1".into(),
                ..Default::default()
            }),
            pin: "123456".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(verified.verified);
    drop(client);
    up.stop();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn up_refuses_a_port_in_use_with_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = temp_dir();
    let out = Command::new(BIN)
        .args(["up", "--registry-listen", &addr, "--metrics-listen", "127.0.0.1:0", "--bank-ports-auto", "--data-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("cannot listen on {addr}")), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}
