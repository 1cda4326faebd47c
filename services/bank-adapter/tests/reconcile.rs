//! Daily reconciliation against a real registry (SQLite, over gRPC) and real adapters: the adapter's
//! own file in the bank's layout, every mismatch kind found in a bank core's file, each repair run
//! once (a second run finds the day clean and changes nothing), and a bad file refused whole.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;

use socialcard_bank_adapter::BankAdapter;
use socialcard_bank_adapter::reconcile::{BUSINESS_OFFSET, DailyFile, DailyRecord, MismatchKind, RecordKind, Repair};
use socialcard_domain::bank::ReconciliationLayout;
use socialcard_domain::{BankDirectory, CardNumber};
use socialcard_proto::bank::v1 as bank;
use socialcard_proto::registry::v1 as reg;
use socialcard_proto::registry::v1::registry_service_client::RegistryServiceClient;
use socialcard_registry::fixtures::{HookedStore, WriteHook};
use socialcard_registry::storage::{Commit, RegistryStore, StoreError};
use socialcard_registry::{Registry, RegistryConfig};
use socialcard_server::SystemClock;
use time::{Date, OffsetDateTime};
use tokio::net::TcpListener;
use tonic::transport::Channel;

struct Dir(std::path::PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The registry's real store, whose writes can be cut off (its database down mid-call).
/// What the registry's real store does to its writes: cut them off (its database down mid-call).
#[derive(Debug)]
struct Switchable {
    down: AtomicBool,
}

#[async_trait]
impl WriteHook for Switchable {
    async fn before_commit(&self, _inner: &dyn RegistryStore, _commit: &Commit) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("database down (test)".into()));
        }
        Ok(())
    }
}

struct World {
    store: Arc<HookedStore<Switchable>>,
    registry: RegistryServiceClient<Channel>,
    registry_addr: String,
    dir: Dir,
}

async fn world() -> World {
    let dir = Dir(std::env::temp_dir().join(format!("socialcard-recon-{}", uuid::Uuid::new_v4().simple())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.0.join("registry.db").display());
    let built = socialcard_registry::build(&url, Arc::new(SystemClock), RegistryConfig::shanghai(b"k".repeat(32)))
        .await
        .unwrap();
    let store = Arc::new(HookedStore {
        inner: built.registry.store().clone(),
        hook: Switchable { down: AtomicBool::new(false) },
    });
    let registry = Registry::new(store.clone(), Arc::new(SystemClock), RegistryConfig::shanghai(b"k".repeat(32)));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let registry_addr = format!("http://{}", l.local_addr().unwrap());
    let routes = tonic::service::Routes::new(socialcard_registry::grpc::RegistryGrpc::new(registry).into_server());
    tokio::spawn(socialcard_server::grpc::serve(l, routes, &[], std::future::pending()));
    let registry = RegistryServiceClient::connect(registry_addr.clone()).await.unwrap();
    World { store, registry, registry_addr, dir }
}

impl World {
    /// `code`'s adapter on its database.
    async fn adapter(&self, code: &str) -> BankAdapter {
        let bank = BankDirectory::shanghai().get(code).unwrap().clone();
        let channel = Channel::from_shared(self.registry_addr.clone()).unwrap().connect_lazy();
        BankAdapter::open(bank, &self.dir.0.join(format!("bank-{code}.db")), channel).await.unwrap()
    }

    async fn collected(&mut self, n: u64, code: &str) -> (String, String) {
        let bin = BankDirectory::shanghai().get(code).unwrap().bin_prefixes[0].clone();
        let card = socialcard_registry::fixtures::collected_card(&mut self.registry, n, code, &bin).await.unwrap();
        (card.card_id, card.card_number)
    }

    async fn card(&mut self, id: &str) -> reg::Card {
        self.registry
            .get_card(reg::GetCardRequest { lookup: Some(reg::get_card_request::Lookup::CardId(id.into())) })
            .await
            .unwrap()
            .into_inner()
            .card
            .unwrap()
    }
}

fn today() -> Date {
    OffsetDateTime::now_utc().to_offset(BUSINESS_OFFSET).date()
}

fn activation(card_number: &str) -> bank::ActivateFinancialRequest {
    bank::ActivateFinancialRequest {
        idempotency_key: uuid::Uuid::now_v7().to_string(),
        card_number: card_number.into(),
        teller_id: "teller-9".into(),
        branch_id: "branch-310105".into(),
        face_verification_ref: "face-abc".into(),
        bank_pin_changed: true,
    }
}

fn record(kind: RecordKind, card_number: &str) -> DailyRecord {
    let now = OffsetDateTime::now_utc().to_offset(BUSINESS_OFFSET);
    DailyRecord {
        kind,
        card_number: card_number.into(),
        occurred_at: now.replace_nanosecond(0).unwrap(),
        teller_id: "teller-7".into(),
        branch_id: "branch-200".into(),
    }
}

fn kinds(report: &socialcard_bank_adapter::reconcile::ReconciliationReport, number: &str) -> Vec<MismatchKind> {
    report.mismatches.iter().filter(|m| m.card_number == number).map(|m| m.kind).collect()
}

#[tokio::test]
async fn the_adapter_writes_its_day_in_each_banks_layout_and_an_identical_bank_file_matches() {
    let mut w = world().await;
    for (code, layout) in [("icbc", ReconciliationLayout::FixedWidth), ("abc", ReconciliationLayout::Csv)] {
        let adapter = w.adapter(code).await;
        assert_eq!(adapter.bank().reconciliation.layout, layout);
        let mut numbers = Vec::new();
        for n in 0..2 {
            let (_, number) = w.collected(if code == "icbc" { n } else { 10 + n }, code).await;
            adapter.activate_financial(activation(&number), None).await.unwrap();
            numbers.push(number);
        }
        let file = adapter.daily_file(today()).await.unwrap();
        assert_eq!(file.records.len(), 2);
        assert!(file.records.iter().all(|r| r.kind == RecordKind::Activation && r.teller_id == "teller-9"));
        let text = file.render(layout);
        assert_eq!(DailyFile::parse(&text, layout, code, today()).unwrap(), file);

        // The bank core agrees: every card matches, nothing to repair.
        let report = adapter.reconcile(today(), &text, true).await.unwrap();
        assert_eq!((report.cards_checked, report.matched, report.mismatches.len()), (2, 2, 0), "{}", report.to_json());
        assert_eq!(report.repaired, 0);
        let json: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(json["bank_code"], code);
        assert_eq!(json["matched"], 2);
    }
}

#[tokio::test]
async fn every_mismatch_is_found_repaired_once_and_a_second_run_changes_nothing() {
    let mut w = world().await;
    let adapter = w.adapter("icbc").await;

    // A: the bank activated it; the adapter never heard of it.
    let (a_id, a) = w.collected(1, "icbc").await;
    // B: activated here while the registry was out of reach; its event has not reached the registry.
    let (b_id, b) = w.collected(2, "icbc").await;
    w.store.hook.down.store(true, Ordering::SeqCst);
    let pending = adapter.activate_financial(activation(&b), None).await.unwrap_err();
    w.store.hook.down.store(false, Ordering::SeqCst);
    assert_eq!(tonic::Status::from(pending).code(), tonic::Code::Unavailable);
    // C: activated here and at the registry, but the bank core has no such activation.
    let (c_id, c) = w.collected(3, "icbc").await;
    adapter.activate_financial(activation(&c), None).await.unwrap();
    // D: activated and matching, for contrast.
    let (_, d) = w.collected(4, "icbc").await;
    adapter.activate_financial(activation(&d), None).await.unwrap();
    // E: another bank's card in icbc's file; F: a card number nobody issued.
    let (_, e) = w.collected(5, "ccb").await;
    let f = CardNumber::issue('Z', 9_999_999).as_str().to_string();

    let mut bank_file = DailyFile::new("icbc", today());
    for n in [&a, &b, &d, &e, &f] {
        bank_file.records.push(record(RecordKind::Activation, n));
    }
    let text = bank_file.render(ReconciliationLayout::FixedWidth);

    // Without --repair: found and proposed, nothing written.
    let dry = adapter.reconcile(today(), &text, false).await.unwrap();
    assert_eq!(kinds(&dry, &a), [MismatchKind::ActivationMissingAtAdapter], "{}", dry.to_json());
    assert_eq!(kinds(&dry, &b), [MismatchKind::SocialNotOn]);
    assert_eq!(kinds(&dry, &c), [MismatchKind::ActivationMissingAtBank]);
    assert_eq!(kinds(&dry, &d), []);
    assert_eq!(kinds(&dry, &e), [MismatchKind::OtherBankCard]);
    assert_eq!(kinds(&dry, &f), [MismatchKind::UnknownCard]);
    assert_eq!((dry.cards_checked, dry.matched, dry.repaired), (6, 1, 0));
    assert!(dry.mismatches.iter().all(|m| matches!(m.repair, Repair::Proposed { .. } | Repair::Manual { .. })));
    assert_eq!(w.card(&a_id).await.financial_state, reg::FinancialState::NotActivated as i32);
    assert_eq!(w.card(&b_id).await.social_state, reg::SocialState::NotActivated as i32);
    assert_eq!(adapter.unconfirmed().await.unwrap(), 1);

    // With --repair: each repairable kind repaired.
    let repaired = adapter.reconcile(today(), &text, true).await.unwrap();
    assert_eq!((repaired.repaired, repaired.repair_failed, repaired.manual), (3, 0, 2), "{}", repaired.to_json());
    for id in [&a_id, &b_id] {
        let card = w.card(id).await;
        assert_eq!(card.financial_state, reg::FinancialState::Active as i32);
        assert_eq!(card.social_state, reg::SocialState::Active as i32);
    }
    assert_eq!(adapter.unconfirmed().await.unwrap(), 0);
    // The bank's file is the reference for the financial function; the social function stays on.
    let card_c = w.card(&c_id).await;
    assert_eq!(card_c.financial_state, reg::FinancialState::NotActivated as i32);
    assert_eq!(card_c.social_state, reg::SocialState::Active as i32);
    let trail_len = |w: &mut World, id: String| {
        let mut r = w.registry.clone();
        async move {
            r.list_audit_trail(reg::ListAuditTrailRequest { card_id: id }).await.unwrap().into_inner().entries.len()
        }
    };
    let before = [
        trail_len(&mut w, a_id.clone()).await,
        trail_len(&mut w, b_id.clone()).await,
        trail_len(&mut w, c_id.clone()).await,
    ];
    let own_records = adapter.daily_file(today()).await.unwrap().records.len();

    // A second run: the day is clean apart from what needs a person (C, rolled back, is no longer an
    // activation of the day), and nothing changes anywhere.
    let again = adapter.reconcile(today(), &text, true).await.unwrap();
    assert_eq!(
        (again.cards_checked, again.matched, again.repaired, again.repair_failed, again.manual),
        (5, 3, 0, 0, 2),
        "{}",
        again.to_json()
    );
    let after = [trail_len(&mut w, a_id).await, trail_len(&mut w, b_id).await, trail_len(&mut w, c_id).await];
    assert_eq!(before, after);
    assert_eq!(adapter.daily_file(today()).await.unwrap().records.len(), own_records);
}

#[tokio::test]
async fn a_loss_the_adapter_missed_is_found_and_its_repair_reported() {
    let mut w = world().await;
    let adapter = w.adapter("icbc").await;
    let (_, n) = w.collected(1, "icbc").await;
    adapter.activate_financial(activation(&n), None).await.unwrap();
    let mut bank_file = DailyFile::new("icbc", today());
    bank_file.records.push(record(RecordKind::Activation, &n));
    bank_file.records.push(record(RecordKind::Loss { written: true }, &n));
    let text = bank_file.render(ReconciliationLayout::FixedWidth);
    let report = adapter.reconcile(today(), &text, true).await.unwrap();
    assert_eq!(kinds(&report, &n), [MismatchKind::LossMissingAtAdapter], "{}", report.to_json());
    // This adapter has no loss coordinator to hand the loss to: the repair says why it failed.
    match &report.mismatches[0].repair {
        Repair::Failed { code, .. } => assert_eq!(code, "Unavailable"),
        other => panic!("unexpected repair {other:?}"),
    }
}

#[tokio::test]
async fn a_malformed_bank_file_is_refused_whole_and_nothing_is_repaired() {
    let mut w = world().await;
    let adapter = w.adapter("icbc").await;
    let (a_id, a) = w.collected(1, "icbc").await;
    let mut bank_file = DailyFile::new("icbc", today());
    bank_file.records.push(record(RecordKind::Activation, &a));
    let good = bank_file.render(ReconciliationLayout::FixedWidth);
    let yesterday = today().previous_day().unwrap();
    for (text, date, reason) in [
        // A record line broken after a valid one: the valid one is not repaired either.
        (format!("{good}D???\n"), today(), "RECONCILIATION_FILE_FORMAT"),
        (good.replace("T00000001", "T00000002"), today(), "RECONCILIATION_FILE_COUNT_MISMATCH"),
        (bank_file.render(ReconciliationLayout::Csv), today(), "RECONCILIATION_FILE_FORMAT"),
        (good.clone(), yesterday, "RECONCILIATION_FILE_DATE_MISMATCH"),
    ] {
        let status = tonic::Status::from(adapter.reconcile(date, &text, true).await.unwrap_err());
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(socialcard_server::error::reason_of(&status).as_deref(), Some(reason));
    }
    assert_eq!(w.card(&a_id).await.financial_state, reg::FinancialState::NotActivated as i32);
    assert!(adapter.daily_file(today()).await.unwrap().records.is_empty());
}
