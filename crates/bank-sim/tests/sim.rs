//! The simulator against a real registry and adapter: its tellers' activations land on both sides, and
//! the bank file it writes reconciles against the adapter, showing exactly the records it left out.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use socialcard_bank_adapter::BankAdapter;
use socialcard_bank_adapter::reconcile::{MismatchKind, RecordKind};
use socialcard_bank_sim::{Operation, SimConfig};
use socialcard_domain::BankDirectory;
use socialcard_proto::bank::v1::bank_card_service_client::BankCardServiceClient;
use socialcard_proto::registry::v1::registry_service_client::RegistryServiceClient;
use socialcard_registry::RegistryConfig;
use socialcard_server::SystemClock;
use tokio::net::TcpListener;
use tonic::transport::Channel;

async fn listen() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = format!("http://{}", l.local_addr().unwrap());
    (l, a)
}

#[tokio::test]
async fn the_tellers_day_lands_on_both_sides_and_its_file_reconciles() {
    let dir = std::env::temp_dir().join(format!("socialcard-sim-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.join("registry.db").display());
    let built = socialcard_registry::build(&url, Arc::new(SystemClock), RegistryConfig::shanghai(b"k".repeat(32)))
        .await
        .unwrap();
    let (l, registry_addr) = listen().await;
    let routes =
        tonic::service::Routes::new(socialcard_registry::grpc::RegistryGrpc::new(built.registry).into_server());
    tokio::spawn(socialcard_server::grpc::serve(l, routes, &[], std::future::pending()));
    let bank = BankDirectory::shanghai().get("ccb").unwrap().clone();
    let channel = Channel::from_shared(registry_addr.clone()).unwrap().connect_lazy();
    let adapter = BankAdapter::open(bank.clone(), &dir.join("bank-ccb.db"), channel).await.unwrap();
    let (l, adapter_addr) = listen().await;
    tokio::spawn(socialcard_server::grpc::serve(
        l,
        tonic::service::Routes::new(adapter.clone().into_server()),
        &[],
        std::future::pending(),
    ));

    let config = SimConfig { cards: 6, concurrency: 3, loss_percent: 50, omit_from_file: 1, ..SimConfig::default() };
    let summary = socialcard_bank_sim::run(
        bank.clone(),
        RegistryServiceClient::connect(registry_addr).await.unwrap(),
        BankCardServiceClient::connect(adapter_addr).await.unwrap(),
        config,
    )
    .await
    .unwrap();
    let activations = &summary.operations[&Operation::Activation];
    assert_eq!(activations.ok, 6, "{summary:?}");
    // Losses were attempted for half the cards; this adapter has no loss coordinator, so none went
    // through and none is in the bank's file.
    let losses = &summary.operations[&Operation::Loss];
    let chosen = (0..6).filter(|i| socialcard_bank_sim::chosen(*i, 50)).count() as u64;
    assert_eq!(losses.ok + losses.refused.values().sum::<u64>(), chosen);
    assert_eq!(losses.ok, 0);
    assert_eq!(summary.file.records.len(), 5);
    assert!(summary.file.records.iter().all(|r| r.kind == RecordKind::Activation));

    // The adapter saw all six; the file left one out: reconciliation finds exactly that one.
    let text = summary.file.render(bank.reconciliation.layout);
    let report = adapter.reconcile(summary.file.date, &text, false).await.unwrap();
    assert_eq!((report.cards_checked, report.matched), (6, 5), "{}", report.to_json());
    assert_eq!(report.mismatches.len(), 1);
    assert_eq!(report.mismatches[0].kind, MismatchKind::ActivationMissingAtBank);
    let _ = std::fs::remove_dir_all(dir);
}
