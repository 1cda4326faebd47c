//! A financial activation through the bank-facing API switches the social function on in the same call
//! (R20), against a real registry (SQLite) served over gRPC. The registry's store can be told to refuse
//! writes, standing in for its database being down mid-call.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use socialcard_bank_adapter::BankAdapter;
use socialcard_domain::BankDirectory;
use socialcard_events::embedded::{EmbeddedConsumer, SqliteOffsets};
use socialcard_proto::bank::v1 as bank;
use socialcard_proto::bank::v1::bank_card_service_client::BankCardServiceClient;
use socialcard_proto::registry::v1 as reg;
use socialcard_proto::registry::v1::registry_service_client::RegistryServiceClient;
use socialcard_registry::fixtures::{HookedStore, WriteHook};
use socialcard_registry::storage::{Commit, RegistryStore, StoreError};
use socialcard_registry::{Registry, RegistryConfig};
use socialcard_server::SystemClock;
use socialcard_server::error::reason_of;
use tokio::net::TcpListener;
use tonic::Code;
use tonic::transport::Channel;

/// The registry's real store, whose writes can be cut off or slowed down.
/// What the registry's real store does to its writes: cut them off or slow them down.
#[derive(Debug)]
struct Switchable {
    down: AtomicBool,
    /// Each commit first waits this long (milliseconds).
    slow_ms: AtomicU64,
}

#[async_trait]
impl WriteHook for Switchable {
    async fn before_commit(&self, _inner: &dyn RegistryStore, _commit: &Commit) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::Unavailable("database down (test)".into()));
        }
        let slow = self.slow_ms.load(Ordering::SeqCst);
        if slow > 0 {
            tokio::time::sleep(Duration::from_millis(slow)).await;
        }
        Ok(())
    }
}

struct World {
    registry: Registry,
    store: Arc<HookedStore<Switchable>>,
    registry_client: RegistryServiceClient<Channel>,
    adapters: Vec<(String, BankAdapter, BankCardServiceClient<Channel>)>,
    _dir: Dir,
}

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

async fn world() -> World {
    world_with_cancel_window(30).await
}

async fn world_with_cancel_window(minutes: u32) -> World {
    let dir = Dir(std::env::temp_dir().join(format!("socialcard-bank-{}", uuid::Uuid::new_v4().simple())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.0.join("registry.db").display());
    let built = socialcard_registry::build(&url, Arc::new(SystemClock), RegistryConfig::shanghai(b"k".repeat(32)))
        .await
        .unwrap();
    let store = Arc::new(HookedStore {
        inner: built.registry.store().clone(),
        hook: Switchable { down: AtomicBool::new(false), slow_ms: AtomicU64::new(0) },
    });
    let registry = Registry::new(store.clone(), Arc::new(SystemClock), RegistryConfig::shanghai(b"k".repeat(32)));
    let (l, registry_addr) = listen().await;
    let routes =
        tonic::service::Routes::new(socialcard_registry::grpc::RegistryGrpc::new(registry.clone()).into_server());
    tokio::spawn(socialcard_server::grpc::serve(
        l,
        routes,
        &[socialcard_registry::SERVICE_NAME],
        std::future::pending(),
    ));
    let registry_client = RegistryServiceClient::connect(registry_addr.clone()).await.unwrap();

    let mut adapters = Vec::new();
    for code in ["icbc", "ccb"] {
        let mut bank = BankDirectory::shanghai().get(code).unwrap().clone();
        bank.policy.activation_cancel_window_minutes = minutes;
        let channel = Channel::from_shared(registry_addr.clone()).unwrap().connect_lazy();
        let adapter = BankAdapter::open(bank, &dir.0.join(format!("bank-{code}.db")), channel).await.unwrap();
        let (l, addr) = listen().await;
        let routes = tonic::service::Routes::new(adapter.clone().into_server());
        tokio::spawn(socialcard_server::grpc::serve(l, routes, &[], std::future::pending()));
        adapters.push((code.to_string(), adapter, BankCardServiceClient::connect(addr).await.unwrap()));
    }
    World { registry, store, registry_client, adapters, _dir: dir }
}

fn key() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// A collected icbc card; returns (card id, card number).
async fn collected_icbc_card(c: &mut RegistryServiceClient<Channel>, n: u64) -> (String, String) {
    let card = socialcard_registry::fixtures::collected_card(c, n, "icbc", "621226").await.unwrap();
    (card.card_id, card.card_number)
}

fn activation(card_number: &str) -> bank::ActivateFinancialRequest {
    bank::ActivateFinancialRequest {
        idempotency_key: key(),
        card_number: card_number.into(),
        teller_id: "teller-9".into(),
        branch_id: "branch-310105".into(),
        face_verification_ref: "face-abc".into(),
        bank_pin_changed: true,
    }
}

async fn card(w: &mut World, id: &str) -> reg::Card {
    w.registry_client
        .get_card(reg::GetCardRequest { lookup: Some(reg::get_card_request::Lookup::CardId(id.into())) })
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activation_at_the_right_bank_switches_both_functions_on_in_the_call() {
    let mut w = world().await;
    let (cid, number) = collected_icbc_card(&mut w.registry_client, 1).await;
    let icbc = &mut w.adapters[0].2;
    let answer = icbc.activate_financial(activation(&number)).await.unwrap().into_inner();
    assert_eq!(answer.financial_state, reg::FinancialState::Active as i32);
    assert_eq!(answer.social_state, reg::SocialState::Active as i32);
    assert!(!answer.social_awaits_bureau_unlock);
    // Visible in the registry when the call returns.
    let now = card(&mut w, &cid).await;
    assert_eq!(
        (now.financial_state, now.social_state),
        (reg::FinancialState::Active as i32, reg::SocialState::Active as i32)
    );
    let q =
        w.adapters[0].2.query_card(bank::QueryCardRequest { card_number: number.clone() }).await.unwrap().into_inner();
    assert_eq!(q.status_code, "1");
    assert_eq!(w.adapters[0].1.unconfirmed().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_banks_card_is_refused_and_nothing_is_written() {
    let mut w = world().await;
    let (cid, number) = collected_icbc_card(&mut w.registry_client, 2).await;
    let before = w.store.counts().await.unwrap();
    let ccb = &mut w.adapters[1].2;
    let refused = ccb.activate_financial(activation(&number)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert_eq!(reason_of(&refused).as_deref(), Some("WRONG_BANK"));
    assert_eq!(
        ccb.query_card(bank::QueryCardRequest { card_number: number.clone() }).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let bad = ccb.activate_financial(activation("A00000019")).await.unwrap_err();
    assert_eq!((bad.code(), reason_of(&bad).as_deref()), (Code::InvalidArgument, Some("CARD_NUMBER_CHECK_DIGIT")));
    assert_eq!(w.store.counts().await.unwrap(), before, "the registry wrote nothing");
    assert_eq!(w.adapters[1].1.outbox().backlog().await.unwrap(), 0, "the adapter wrote no event");
    assert_eq!(card(&mut w, &cid).await.financial_state, reg::FinancialState::NotActivated as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_not_collected_or_cancelled_is_refused_with_its_reason_and_nothing_is_written() {
    let mut w = world().await;
    let produced =
        socialcard_registry::fixtures::produced_card(&mut w.registry_client, 8, "icbc", "621226").await.unwrap();
    let (cancelled, cancelled_number) = collected_icbc_card(&mut w.registry_client, 9).await;
    w.registry_client
        .cancel_card(reg::CancelCardRequest {
            idempotency_key: key(),
            card_id: cancelled.clone(),
            actor: Some(reg::Actor {
                channel: reg::Channel::BureauWindow as i32,
                operator_id: "clerk-1".into(),
                site_id: "window-1".into(),
                ..Default::default()
            }),
            documents: Some(reg::Documents {
                presenter: reg::Presenter::Holder as i32,
                holder_id_card: true,
                ..Default::default()
            }),
            reason: "emigration".into(),
        })
        .await
        .unwrap();
    let before = w.store.counts().await.unwrap();
    for (number, reason) in [(&produced.card_number, "NOT_COLLECTED"), (&cancelled_number, "CARD_CANCELLED")] {
        let refused = w.adapters[0].2.activate_financial(activation(number)).await.unwrap_err();
        assert_eq!((refused.code(), reason_of(&refused).as_deref()), (Code::FailedPrecondition, Some(reason)));
    }
    assert_eq!(w.store.counts().await.unwrap(), before, "the registry wrote nothing");
    assert_eq!(w.adapters[0].1.outbox().backlog().await.unwrap(), 0, "the adapter wrote no event");
    assert_eq!(card(&mut w, &produced.card_id).await.financial_state, reg::FinancialState::NotActivated as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_with_one_key_have_one_effect() {
    let mut w = world().await;
    let (cid, number) = collected_icbc_card(&mut w.registry_client, 3).await;
    let req = activation(&number);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let mut client = w.adapters[0].2.clone();
        let req = req.clone();
        calls.spawn(async move { client.activate_financial(req).await.map(|r| r.into_inner()) });
    }
    let answers: Vec<_> = calls.join_all().await.into_iter().map(|r| r.unwrap()).collect();
    assert!(answers.windows(2).all(|p| p[0] == p[1]), "same key, same answer");
    assert_eq!(activations_in_trail(&mut w, &cid).await, 1, "one effect");
    assert_eq!(w.adapters[0].1.outbox().backlog().await.unwrap(), 1, "one FinancialActivated event");
    let mut other = req.clone();
    other.teller_id = "teller-10".into();
    let reused = w.adapters[0].2.activate_financial(other).await.unwrap_err();
    assert_eq!((reused.code(), reason_of(&reused).as_deref()), (Code::AlreadyExists, Some("IDEMPOTENCY_KEY_REUSED")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_down_during_the_call_then_both_functions_on_once_it_is_back() {
    let mut w = world().await;
    let (cid, number) = collected_icbc_card(&mut w.registry_client, 4).await;
    w.store.hook.down.store(true, Ordering::SeqCst);
    let req = activation(&number);
    let pending = w.adapters[0].2.activate_financial(req.clone()).await.unwrap_err();
    assert_eq!(pending.code(), Code::Unavailable, "{}", pending.message());
    assert_eq!(reason_of(&pending).as_deref(), Some("SOCIAL_ACTIVATION_PENDING"));
    assert_eq!(w.adapters[0].1.unconfirmed().await.unwrap(), 1);
    assert_eq!(card(&mut w, &cid).await.financial_state, reg::FinancialState::NotActivated as i32);

    // The registry consumes the adapter's events (embedded log); while its database is down it retries.
    let applying = apply_bank_events(&w, 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(card(&mut w, &cid).await.social_state, reg::SocialState::NotActivated as i32, "still down");

    w.store.hook.down.store(false, Ordering::SeqCst);
    until_both_on(&mut w, &cid).await;
    applying.stop().await;

    // The bank's retry with the same key now gets OK, and nothing happened twice.
    let ok = w.adapters[0].2.activate_financial(req).await.unwrap().into_inner();
    assert_eq!(ok.social_state, reg::SocialState::Active as i32);
    assert_eq!(w.adapters[0].1.unconfirmed().await.unwrap(), 0);
    assert_eq!(activations_in_trail(&mut w, &cid).await, 1, "one effect across both paths");
}

/// The registry consuming adapter `i`'s events (the embedded log), retrying while its store refuses.
struct Applying(tokio::sync::watch::Sender<bool>, tokio::task::JoinHandle<()>);

impl Applying {
    async fn stop(self) {
        self.0.send(true).unwrap();
        self.1.await.unwrap();
    }
}

fn apply_bank_events(w: &World, i: usize) -> Applying {
    let offsets = w._dir.0.join("registry.db");
    let pool = sqlx::sqlite::SqlitePoolOptions::new().connect_lazy(&format!("sqlite://{}", offsets.display())).unwrap();
    let mut consumer = EmbeddedConsumer::new(
        "registry",
        socialcard_events::topics::FINANCIAL,
        w.adapters[i].1.outbox(),
        SqliteOffsets::new(pool),
        Arc::new(socialcard_registry::events::FinancialEvents::new(w.registry.clone())),
    );
    consumer.max_attempts = 1_000;
    consumer.retry_backoff = Duration::from_millis(20);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    Applying(stop, tokio::spawn(consumer.run(stopped)))
}

/// Waits until the registry shows both functions on.
async fn until_both_on(w: &mut World, cid: &str) {
    let start = Instant::now();
    loop {
        let c = card(w, cid).await;
        if c.financial_state == reg::FinancialState::Active as i32 && c.social_state == reg::SocialState::Active as i32
        {
            return;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "the event never switched the card on");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn activations_in_trail(w: &mut World, cid: &str) -> usize {
    let trail = w
        .registry_client
        .list_audit_trail(reg::ListAuditTrailRequest { card_id: cid.into() })
        .await
        .unwrap()
        .into_inner()
        .entries;
    trail.iter().filter(|e| e.action == "financial_activation").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_banks_deadline_bounds_the_registry_call_and_the_event_finishes_the_activation() {
    let mut w = world().await;
    let (cid, number) = collected_icbc_card(&mut w.registry_client, 6).await;
    // The registry answers, but each write takes 20 s: far beyond the bank's 2 s. Had the adapter not
    // passed the bank's deadline on, it would wait the registry out (its own default is 5 s) and the bank
    // would see its own DEADLINE_EXCEEDED instead of the adapter's answer.
    w.store.hook.slow_ms.store(20_000, Ordering::SeqCst);
    let req = activation(&number);
    let mut call = tonic::Request::new(req.clone());
    call.set_timeout(Duration::from_secs(2));
    let pending = w.adapters[0].2.activate_financial(call).await.unwrap_err();
    assert_eq!(pending.code(), Code::Unavailable, "{}", pending.message());
    assert_eq!(reason_of(&pending).as_deref(), Some("SOCIAL_ACTIVATION_PENDING"));
    assert_eq!(w.adapters[0].1.unconfirmed().await.unwrap(), 1);

    // The registry back to speed: the adapter's event switches both functions on, once.
    w.store.hook.slow_ms.store(0, Ordering::SeqCst);
    let applying = apply_bank_events(&w, 0);
    until_both_on(&mut w, &cid).await;
    applying.stop().await;
    let ok = w.adapters[0].2.activate_financial(req).await.unwrap().into_inner();
    assert_eq!(ok.social_state, reg::SocialState::Active as i32);
    assert_eq!(activations_in_trail(&mut w, &cid).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_key_is_replayed_by_a_restarted_adapter_without_a_second_effect() {
    let mut w = world().await;
    let (cid, number) = collected_icbc_card(&mut w.registry_client, 7).await;
    let req = activation(&number);
    let first = w.adapters[0].2.activate_financial(req.clone()).await.unwrap().into_inner();

    // What a restarted icbc adapter opens: the same database file, a fresh pool and no memory of the call.
    let bank = BankDirectory::shanghai().get("icbc").unwrap().clone();
    let channel = Channel::from_shared(format!("http://{}", "127.0.0.1:1")).unwrap().connect_lazy();
    let restarted = BankAdapter::open(bank, &w._dir.0.join("bank-icbc.db"), channel).await.unwrap();
    // Its registry link points nowhere: the replay must come from the adapter's own store.
    let again = restarted.activate_financial(req.clone(), None).await.unwrap();
    assert_eq!(again, first, "same key, same answer");
    assert_eq!(activations_in_trail(&mut w, &cid).await, 1, "one effect");
    assert_eq!(restarted.outbox().backlog().await.unwrap(), 1, "one FinancialActivated event");
    let mut other = req;
    other.branch_id = "branch-310106".into();
    let reused = restarted.activate_financial(other, None).await.unwrap_err();
    let reused = tonic::Status::from(reused);
    assert_eq!((reused.code(), reason_of(&reused).as_deref()), (Code::AlreadyExists, Some("IDEMPOTENCY_KEY_REUSED")));
}

fn cancel(card_number: &str) -> bank::CancelActivationRequest {
    bank::CancelActivationRequest {
        idempotency_key: key(),
        card_number: card_number.into(),
        reason: "core rolled back".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_within_the_window_undoes_the_financial_side_once() {
    let mut w = world().await;
    let (cid, number) = collected_icbc_card(&mut w.registry_client, 5).await;
    let refused = w.adapters[0].2.cancel_activation(cancel(&number)).await.unwrap_err();
    assert_eq!(
        (refused.code(), reason_of(&refused).as_deref()),
        (Code::FailedPrecondition, Some("NOT_ACTIVATED_HERE"))
    );

    w.adapters[0].2.activate_financial(activation(&number)).await.unwrap();
    let req = cancel(&number);
    let undone = w.adapters[0].2.cancel_activation(req.clone()).await.unwrap().into_inner();
    assert_eq!(undone.financial_state, reg::FinancialState::NotActivated as i32);
    let now = card(&mut w, &cid).await;
    assert_eq!(now.financial_state, reg::FinancialState::NotActivated as i32);
    assert_eq!(now.social_state, reg::SocialState::Active as i32, "a social function once on stays on");
    assert_eq!(w.adapters[0].2.cancel_activation(req).await.unwrap().into_inner(), undone, "a retry replays");
    let again = w.adapters[0].2.cancel_activation(cancel(&number)).await.unwrap_err();
    assert_eq!(reason_of(&again).as_deref(), Some("NOT_ACTIVATED_HERE"));
    let trail = w
        .registry_client
        .list_audit_trail(reg::ListAuditTrailRequest { card_id: cid })
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(trail.iter().filter(|e| e.action == "financial_activation_cancelled").count(), 1);
    // The bank may activate the card again afterwards, and roll that back too.
    let re = w.adapters[0].2.activate_financial(activation(&number)).await.unwrap().into_inner();
    assert_eq!(re.financial_state, reg::FinancialState::Active as i32);
    assert_eq!(
        w.adapters[0].1.outbox().backlog().await.unwrap(),
        3,
        "activated, rolled back, activated: one event each"
    );
    w.adapters[0].2.cancel_activation(cancel(&number)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_after_the_window_is_refused_and_changes_nothing() {
    let mut w = world_with_cancel_window(0).await;
    let (cid, number) = collected_icbc_card(&mut w.registry_client, 6).await;
    w.adapters[0].2.activate_financial(activation(&number)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let before = w.store.counts().await.unwrap();
    let late = w.adapters[0].2.cancel_activation(cancel(&number)).await.unwrap_err();
    assert_eq!((late.code(), reason_of(&late).as_deref()), (Code::FailedPrecondition, Some("CANCEL_WINDOW_CLOSED")));
    assert_eq!(w.store.counts().await.unwrap(), before);
    assert_eq!(card(&mut w, &cid).await.financial_state, reg::FinancialState::Active as i32);
}

/// A card whose account icbc opened through its adapter (`ConfirmAccountOpening`) is known to the adapter
/// by number, so its activation needs no registry lookup: with the registry out of reach it is recorded
/// and the adapter's event finishes it. A card the adapter never saw cannot be resolved then: Unavailable,
/// and nothing is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_whose_account_the_bank_opened_is_activated_while_the_registry_is_out_of_reach() {
    use socialcard_registry::fixtures::{account_number, collect, started_card};
    let mut w = world().await;
    let known = started_card(&mut w.registry_client, 11, "icbc").await.unwrap();
    let opened = w.adapters[0]
        .2
        .confirm_account_opening(bank::ConfirmAccountOpeningRequest {
            idempotency_key: key(),
            batch_id: "batch-11".into(),
            results: vec![bank::AccountOpeningResult {
                card_id: known.card_id.clone(),
                result: Some(bank::account_opening_result::Result::AccountNumber(account_number(11, "621226"))),
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((opened.accepted, opened.rejected), (1, 0));
    collect(&mut w.registry_client, &known.card_id).await.unwrap();
    let (unseen_id, unseen_number) = collected_icbc_card(&mut w.registry_client, 12).await;

    // The icbc adapter restarted with its registry link pointing nowhere.
    let bank = BankDirectory::shanghai().get("icbc").unwrap().clone();
    let channel = Channel::from_shared("http://127.0.0.1:1").unwrap().connect_lazy();
    let cut_off = BankAdapter::open(bank, &w._dir.0.join("bank-icbc.db"), channel).await.unwrap();

    let unseen = tonic::Status::from(cut_off.activate_financial(activation(&unseen_number), None).await.unwrap_err());
    assert_eq!(unseen.code(), Code::Unavailable, "{}", unseen.message());
    assert_ne!(reason_of(&unseen).as_deref(), Some("SOCIAL_ACTIVATION_PENDING"), "an unknown card is not recorded");
    assert_eq!(cut_off.unconfirmed().await.unwrap(), 0);

    let pending = cut_off.activate_financial(activation(&known.card_number), None).await.unwrap_err();
    let pending = tonic::Status::from(pending);
    assert_eq!(
        (pending.code(), reason_of(&pending).as_deref()),
        (Code::Unavailable, Some("SOCIAL_ACTIVATION_PENDING"))
    );
    assert_eq!(cut_off.unconfirmed().await.unwrap(), 1);

    // The registry applies the adapter's event: both functions on, once; the unseen card is untouched.
    let applying = apply_bank_events(&w, 0);
    until_both_on(&mut w, &known.card_id).await;
    applying.stop().await;
    assert_eq!(activations_in_trail(&mut w, &known.card_id).await, 1);
    assert_eq!(card(&mut w, &unseen_id).await.financial_state, reg::FinancialState::NotActivated as i32);
}
