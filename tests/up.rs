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
    postal: String,
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
        // Every service says where it listens, and the registry where its events go.
        let ready =
            ["registry listening on", "loss-coordinator listening on", "postal listening on", "ops listening on"];
        let mut printed: Vec<String> = Vec::new();
        while !(ready.iter().all(|r| printed.iter().any(|l| l.starts_with(r)))
            && printed.iter().any(|l| l.starts_with("registry events")))
        {
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
        let postal = printed
            .iter()
            .find_map(|l| l.strip_prefix("postal listening on "))
            .map(|a| format!("http://{a}"))
            .expect("no postal line");
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
        Up { child, endpoint, loss, postal, banks }
    }

    fn stop(mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "up did not stop cleanly on SIGTERM: {status}");
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN).arg("--endpoint").arg(&self.endpoint).args(args).output().unwrap()
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

/// The courier's batch file through `socialcard postal-import`: a bad file is refused whole, naming its
/// bad lines; a good one is streamed with a progress bar, delivers the card (the registry shows it
/// collected), keeps an unknown waybill's update aside, and importing it again changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postal_import_streams_a_courier_file_and_refuses_a_bad_one_whole() {
    use socialcard_proto::postal::v1 as postal_pb;
    use socialcard_proto::postal::v1::postal_service_client::PostalServiceClient;

    let dir = temp_dir();
    let up = Up::start(&dir);
    let id = "110105198001010040";
    up.cli(&["register", "--id", id, "--name", "Wang Fang", "--phone", "13900000000"]);
    let applied = up.cli(&["apply", "--id", id, "--bank", "ccb", "--address", "8 Huaihai Road"]);
    let card_id = applied.lines().next().unwrap().strip_prefix("card ").unwrap().to_string();
    up.cli(&["approve", &card_id]);
    up.cli(&["produce", &card_id]);

    // Postal opens the shipment from the registry's CardProduced event.
    let mut postal = PostalServiceClient::connect(up.postal.clone()).await.unwrap();
    let by_card = postal_pb::GetShipmentRequest {
        lookup: Some(postal_pb::get_shipment_request::Lookup::CardId(card_id.clone())),
    };
    let start = std::time::Instant::now();
    let waybill = loop {
        if let Ok(r) = postal.get_shipment(by_card.clone()).await {
            break r.into_inner().shipment.unwrap().waybill;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(30), "postal never opened the shipment");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let unknown = socialcard_postal::feed::Waybill::issue(99_999_999).to_string();
    let unknown_total = |mut p: PostalServiceClient<tonic::transport::Channel>| async move {
        p.list_unknown_waybill_updates(postal_pb::ListUnknownWaybillUpdatesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .total
    };
    let header = "event_id,waybill,status,occurred_at\n";
    let at = |m: i64| {
        (time::OffsetDateTime::now_utc() - time::Duration::minutes(60 - m))
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };

    // One bad line refuses the whole file: nothing reaches postal.
    let bad = dir.join("bad.csv");
    std::fs::write(&bad, format!("{header}b1,{waybill},accepted,{}\nb2,{waybill},teleported,{}\n", at(1), at(2)))
        .unwrap();
    let refused = up.run(&["postal-import", bad.to_str().unwrap(), "--postal-endpoint", &up.postal]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("bad.csv:3: UNKNOWN_STATUS") && stderr.contains("nothing was imported"), "{stderr}");
    let shipment = postal.get_shipment(by_card.clone()).await.unwrap().into_inner().shipment.unwrap();
    assert_eq!(shipment.status(), postal_pb::ShipmentStatus::Pending, "the good line before it was not sent either");

    let good = dir.join("good.csv");
    std::fs::write(
        &good,
        format!(
            "{header}e1,{waybill},accepted,{}\ne2,{waybill},with_courier,{}\ne3,{waybill},signed_by_holder,{}\ne4,{unknown},accepted,{}\n",
            at(10),
            at(20),
            at(30),
            at(31)
        ),
    )
    .unwrap();
    let imported = up.run(&["postal-import", good.to_str().unwrap(), "--postal-endpoint", &up.postal, "--batch", "2"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&imported.stdout), String::from_utf8_lossy(&imported.stderr));
    assert!(imported.status.success(), "{stderr}");
    assert!(stdout.contains("4 updates: 3 applied (0 out of order), 0 duplicates, 1 for unknown waybills"), "{stdout}");
    assert!(stderr.contains(&format!("[{}] 100%  4/4", "=".repeat(30))), "the bar ends full: {stderr}");
    assert!(stderr.contains("  50%  2/4"), "and passed half way: {stderr}");
    assert_eq!(unknown_total(postal.clone()).await, 1, "the unknown waybill's update is kept aside");

    // Delivered: the registry shows the card collected.
    let mut registry = RegistryServiceClient::connect(up.endpoint.clone()).await.unwrap();
    let start = std::time::Instant::now();
    let collected_at = loop {
        let card = registry
            .get_card(pb::GetCardRequest { lookup: Some(pb::get_card_request::Lookup::CardId(card_id.clone())) })
            .await
            .unwrap()
            .into_inner()
            .card
            .unwrap();
        if card.physical_state() == pb::PhysicalState::Collected {
            break card.collected_at.unwrap();
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(30), "the delivery never reached the registry");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };

    // The loss coordinator heard of the collection too: R22's timer runs from the courier's delivery date.
    let mut loss = socialcard_proto::loss::v1::loss_coordinator_service_client::LossCoordinatorServiceClient::connect(
        up.loss.clone(),
    )
    .await
    .unwrap();
    let start = std::time::Instant::now();
    let auto_lock = loop {
        let timers = loss
            .list_timers(socialcard_proto::loss::v1::ListTimersRequest {
                card_id: card_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .timers;
        if let Some(t) = timers.into_iter().find(|t| t.kind() == socialcard_proto::loss::v1::TimerKind::AutoLock) {
            break t;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(30), "the coordinator never scheduled R22");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(auto_lock.due_at.unwrap().seconds, collected_at.seconds + 300 * 86_400, "300 days (R22)");
    assert!(auto_lock.fired_at.is_none());

    // The same file again: postal has seen every event id.
    let again = up.cli(&["postal-import", good.to_str().unwrap(), "--postal-endpoint", &up.postal]);
    assert!(again.contains("4 updates: 0 applied"), "{again}");
    assert_eq!(unknown_total(postal.clone()).await, 1);
    up.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
