//! Account opening for a production batch through the bank-facing API: each card's result is recorded at
//! a real registry; another bank's card and a refused account are reported per card; bad input writes
//! nothing; a retried batch records nothing twice.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use socialcard_bank_adapter::BankAdapter;
use socialcard_domain::BankDirectory;
use socialcard_proto::bank::v1 as bank;
use socialcard_proto::bank::v1::bank_card_service_client::BankCardServiceClient;
use socialcard_proto::registry::v1 as reg;
use socialcard_proto::registry::v1::registry_service_client::RegistryServiceClient;
use socialcard_registry::RegistryConfig;
use socialcard_registry::fixtures::account_number;
use socialcard_server::SystemClock;
use socialcard_server::error::reason_of;
use tokio::net::TcpListener;
use tonic::Code;
use tonic::transport::Channel;

struct Dir(std::path::PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn listen() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = format!("http://{}", l.local_addr().unwrap());
    (l, a)
}

fn key() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// A card of `bank` sent to production (waiting for its account); returns its id.
async fn in_production(c: &mut RegistryServiceClient<Channel>, n: u64, bank: &str) -> String {
    socialcard_registry::fixtures::started_card(c, n, bank).await.unwrap().card_id
}

fn opened(card_id: &str, account: String) -> bank::AccountOpeningResult {
    bank::AccountOpeningResult {
        card_id: card_id.into(),
        result: Some(bank::account_opening_result::Result::AccountNumber(account)),
    }
}

async fn physical(c: &mut RegistryServiceClient<Channel>, card_id: &str) -> reg::Card {
    c.get_card(reg::GetCardRequest { lookup: Some(reg::get_card_request::Lookup::CardId(card_id.into())) })
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap()
}

#[tokio::test]
async fn a_batch_records_each_account_and_reports_each_refusal() {
    let dir = Dir(std::env::temp_dir().join(format!("socialcard-accounts-{}", uuid::Uuid::new_v4().simple())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.0.join("registry.db").display());
    let built = socialcard_registry::build(&url, Arc::new(SystemClock), RegistryConfig::shanghai(b"k".repeat(32)))
        .await
        .unwrap();
    let (l, registry_addr) = listen().await;
    let routes =
        tonic::service::Routes::new(socialcard_registry::grpc::RegistryGrpc::new(built.registry).into_server());
    tokio::spawn(socialcard_server::grpc::serve(l, routes, &[], std::future::pending()));
    let mut registry = RegistryServiceClient::connect(registry_addr.clone()).await.unwrap();
    let icbc = BankDirectory::shanghai().get("icbc").unwrap().clone();
    let channel = Channel::from_shared(registry_addr).unwrap().connect_lazy();
    let adapter = BankAdapter::open(icbc, &dir.0.join("bank-icbc.db"), channel).await.unwrap();
    let (l, addr) = listen().await;
    tokio::spawn(socialcard_server::grpc::serve(
        l,
        tonic::service::Routes::new(adapter.into_server()),
        &[],
        std::future::pending(),
    ));
    let mut bank_client = BankCardServiceClient::connect(addr).await.unwrap();

    let ok = in_production(&mut registry, 1, "icbc").await;
    let failed = in_production(&mut registry, 2, "icbc").await;
    let outside_bin = in_production(&mut registry, 3, "icbc").await;
    let other_bank = in_production(&mut registry, 4, "ccb").await;

    // Bad input: the whole batch is refused and nothing reaches the registry.
    let bad = [
        (
            bank::ConfirmAccountOpeningRequest {
                idempotency_key: key(),
                batch_id: String::new(),
                results: vec![opened(&ok, account_number(1, "621226"))],
            },
            "FIELD_REQUIRED",
        ),
        (
            bank::ConfirmAccountOpeningRequest { idempotency_key: key(), batch_id: "b".into(), results: vec![] },
            "RESULTS_REQUIRED",
        ),
        (
            bank::ConfirmAccountOpeningRequest {
                idempotency_key: key(),
                batch_id: "b".into(),
                results: vec![opened(&ok, account_number(1, "621226")), opened(&ok, account_number(2, "621226"))],
            },
            "DUPLICATE_CARD",
        ),
        (
            bank::ConfirmAccountOpeningRequest {
                idempotency_key: key(),
                batch_id: "b".into(),
                results: vec![opened(&ok, "62122６000000000001".into())],
            },
            "ACCOUNT_NUMBER_FORMAT",
        ),
        (
            bank::ConfirmAccountOpeningRequest {
                idempotency_key: key(),
                batch_id: "b".into(),
                results: vec![bank::AccountOpeningResult { card_id: ok.clone(), result: None }],
            },
            "RESULT_REQUIRED",
        ),
    ];
    for (req, reason) in bad {
        let e = bank_client.confirm_account_opening(req).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{reason}");
        assert_eq!(reason_of(&e).as_deref(), Some(reason));
    }
    assert_eq!(physical(&mut registry, &ok).await.physical_state, reg::PhysicalState::InProduction as i32);

    let batch = bank::ConfirmAccountOpeningRequest {
        idempotency_key: key(),
        batch_id: "batch-7".into(),
        results: vec![
            opened(&ok, account_number(11, "621226")),
            bank::AccountOpeningResult {
                card_id: failed.clone(),
                result: Some(bank::account_opening_result::Result::FailureReason("KYC incomplete".into())),
            },
            opened(&outside_bin, account_number(12, "999999")),
            opened(&other_bank, account_number(13, "621226")),
        ],
    };
    let answer = bank_client.confirm_account_opening(batch.clone()).await.unwrap().into_inner();
    assert_eq!((answer.accepted, answer.rejected), (2, 2));
    let reason = |id: &str| answer.outcomes.iter().find(|o| o.card_id == id).unwrap().reason.clone();
    assert_eq!(reason(&outside_bin), "ACCOUNT_NOT_IN_BANK_BIN");
    assert_eq!(reason(&other_bank), "WRONG_BANK");
    assert_eq!(physical(&mut registry, &ok).await.physical_state, reg::PhysicalState::Produced as i32);
    let f = physical(&mut registry, &failed).await;
    assert_eq!(f.physical_state, reg::PhysicalState::ProductionFailed as i32);
    assert_eq!(f.last_production_failure.unwrap().stage, reg::ProductionStage::BankAccount as i32);
    assert_eq!(physical(&mut registry, &other_bank).await.physical_state, reg::PhysicalState::InProduction as i32);

    // The bank's retry: the same answer, no second effect.
    let version = physical(&mut registry, &ok).await.version;
    let again = bank_client.confirm_account_opening(batch.clone()).await.unwrap().into_inner();
    assert_eq!(again, answer);
    assert_eq!(physical(&mut registry, &ok).await.version, version);
    let e = bank_client
        .confirm_account_opening(bank::ConfirmAccountOpeningRequest { batch_id: "other".into(), ..batch })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
}
