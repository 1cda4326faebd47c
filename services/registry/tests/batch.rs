//! Employer batch import: good rows applied, approved and in production with their audit trail and
//! events, bad rows refused with their reason, and a second import of the same batch a no-op. Run on
//! SQLite, and on PostgreSQL when `SOCIALCARD_TEST_DATABASE_URL` is set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use socialcard_domain::card::HolderStatus;
use socialcard_domain::citizen_id::check_char;
use socialcard_domain::photo::PhotoSource;
use socialcard_domain::{CardType, PhysicalState};
use socialcard_proto::registry::v1 as pb;
use socialcard_registry::batch::{EmployerBatch, EmployerBatchRow, RowOutcome};
use socialcard_registry::fixtures::{HookedStore, WriteHook};
use socialcard_registry::storage::{BatchCommit, Commit, PersonWrite, RegistryStore, StoreError};
use socialcard_registry::{Registry, RegistryConfig};
use socialcard_server::SystemClock;

fn citizen_id(n: u32) -> String {
    let first17 = format!("31010419800101{:03}", n);
    format!("{first17}{}", check_char(first17.as_bytes()) as char)
}

fn row(id: &str) -> EmployerBatchRow {
    EmployerBatchRow {
        citizen_id: id.to_string(),
        card_type: CardType::Adult,
        holder_status: HolderStatus::Employed,
        bank_code: "icbc".into(),
        payroll_bank_codes: vec!["icbc".into()],
        photo_source: PhotoSource::IdCard,
        backup_point_id: "point-1".into(),
        delivery: None,
    }
}

async fn registry(url: &str) -> Registry {
    socialcard_registry::build(url, Arc::new(SystemClock), RegistryConfig::shanghai(vec![7; 32]))
        .await
        .unwrap()
        .registry
}

async fn register(r: &Registry, id: &str) {
    r.register_person(pb::RegisterPersonRequest {
        idempotency_key: format!("register-{id}"),
        citizen_id: id.into(),
        name: "Employee".into(),
        phone: "13800000000".into(),
    })
    .await
    .unwrap();
}

async fn scenario(r: Registry) {
    // Six registered employees; one is not registered, one row names a bank outside the 11, one is
    // not an employee, one is on the list twice.
    for n in 0..6 {
        register(&r, &citizen_id(n)).await;
    }
    let mut rows: Vec<EmployerBatchRow> = (0..6).map(|n| row(&citizen_id(n))).collect();
    rows.push(row(&citizen_id(50)));
    rows[1].bank_code = "nobank".into();
    rows[2].holder_status = HolderStatus::Retired;
    rows.push(row(&citizen_id(3)));
    rows.push(row("310104198001010000"));
    let batch = EmployerBatch {
        batch_id: "list-2026-001".into(),
        employer_id: "employer-42".into(),
        site_id: "icbc-batch".into(),
        reviewer_id: "reviewer-1".into(),
        production_batch_id: "run-7".into(),
        rows,
    };
    let before = r.store().counts().await.unwrap();
    // Chunks of two: rows, refusals and the duplicate fall in different chunks.
    let report = r.import_employer_batch(&batch, 2).await.unwrap();
    assert_eq!(report.outcomes.len(), 9);
    assert_eq!((report.applied, report.already_applied, report.rejected), (4, 0, 5));
    let reason = |i: usize| match &report.outcomes[i] {
        RowOutcome::Rejected { reason, .. } => *reason,
        other => panic!("row {i} not rejected: {other:?}"),
    };
    assert_eq!(reason(1), "UNKNOWN_BANK");
    assert_eq!(reason(2), "EMPLOYER_BATCH_EMPLOYEES_ONLY");
    assert_eq!(reason(6), "PERSON_NOT_FOUND");
    assert_eq!(reason(7), "DUPLICATE_ROW");
    assert!(reason(8).starts_with("CITIZEN_ID"), "{}", reason(8));

    let after = r.store().counts().await.unwrap();
    assert_eq!(after.cards - before.cards, 4);
    assert_eq!(after.audit - before.audit, 12);
    assert_eq!(after.outbox - before.outbox, 12);
    assert_eq!(after.idempotency - before.idempotency, 4);

    let mut numbers = std::collections::HashSet::new();
    for o in &report.outcomes {
        let RowOutcome::Applied { card_id, card_number } = o else { continue };
        let card = r.store().card(card_id).await.unwrap().unwrap().card;
        assert_eq!(card.physical, PhysicalState::InProduction);
        assert_eq!(card.card_number.as_ref().map(|n| n.as_str()), Some(card_number.as_str()));
        assert!(numbers.insert(card_number.clone()));
        let trail: Vec<String> =
            r.store().audit_trail(card_id).await.unwrap().into_iter().map(|(_, a)| a.action).collect();
        assert_eq!(trail, ["submit_application", "approve", "start_production"]);
        // R2 still holds: the holder has one card, and a single application now is refused.
        let holder = card.holder.expose().to_string();
        assert_eq!(r.store().cards_of(&holder).await.unwrap().len(), 1);
    }

    // Every imported card's audit trail is a whole hash chain.
    let verified = r.verify_audit_trail(pb::VerifyAuditTrailRequest { card_id: String::new() }).await.unwrap();
    assert!(verified.breaks.is_empty(), "{:?}", verified.breaks);
    assert_eq!(verified.entries_checked, 12);

    // The same list again: the same answers, nothing written.
    let again = r.import_employer_batch(&batch, 3).await.unwrap();
    assert_eq!((again.applied, again.already_applied, again.rejected), (0, 4, 5));
    for (first, second) in report.outcomes.iter().zip(&again.outcomes) {
        if let RowOutcome::Applied { card_id, card_number } = first {
            assert_eq!(
                second,
                &RowOutcome::AlreadyApplied { card_id: card_id.clone(), card_number: card_number.clone() }
            );
        }
    }
    assert_eq!(r.store().counts().await.unwrap(), after);

    // The same list id with a changed row: refused, not a second card.
    let mut changed = batch.clone();
    changed.rows[0].backup_point_id = "point-2".into();
    let third = r.import_employer_batch(&changed, 100).await.unwrap();
    assert!(matches!(&third.outcomes[0], RowOutcome::Rejected { reason: "IDEMPOTENCY_KEY_REUSED", .. }));
    assert_eq!(r.store().counts().await.unwrap(), after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn employer_batch_on_sqlite() {
    let dir = std::env::temp_dir().join(format!("socialcard-batch-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.join("registry.db").display());
    scenario(registry(&url).await).await;
    // The rows' idempotency keys name holders by their blind index, never by ID number.
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    let keys: Vec<String> =
        sqlx::query_scalar("SELECT idempotency_key FROM idempotency WHERE idempotency_key LIKE 'employer-batch/%'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(keys.len(), 4, "{keys:?}");
    for n in 0..6 {
        let id = citizen_id(n);
        assert!(keys.iter().all(|k| !k.contains(&id[..17])), "{id} in clear: {keys:?}");
    }
    pool.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn employer_batch_on_postgres() {
    let Some(base) = std::env::var("SOCIALCARD_TEST_DATABASE_URL").ok().filter(|u| !u.is_empty()) else {
        eprintln!("skipped: set SOCIALCARD_TEST_DATABASE_URL to run against PostgreSQL");
        return;
    };
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&base).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&admin).await.unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    scenario(registry(&format!("{base}{sep}options=-c%20search_path%3D{schema}")).await).await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&admin).await.unwrap();
}

/// A hook that, once, lets a concurrent writer in just before a chunk commits: the holder's version is
/// bumped as a one-card `SubmitApplication` for that holder would bump it (R2).
#[derive(Debug)]
struct RaceOnce {
    commits: AtomicUsize,
    race_on: usize,
    raced: AtomicUsize,
}

#[async_trait::async_trait]
impl WriteHook for RaceOnce {
    async fn before_commit_batch(&self, inner: &dyn RegistryStore, commit: &BatchCommit) -> Result<(), StoreError> {
        if self.commits.fetch_add(1, Ordering::SeqCst) == self.race_on
            && let Some((citizen_id, version)) = commit.touch_persons.first()
        {
            let touch = PersonWrite::Touch { citizen_id: citizen_id.clone(), expected_version: *version };
            inner.commit(Commit { person: Some(touch), ..Commit::default() }).await?;
        }
        Ok(())
    }
    fn after_commit_batch(&self, result: &Result<(), StoreError>) {
        if matches!(result, Err(StoreError::VersionConflict)) {
            self.raced.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Chunks are decided while the one before commits; a chunk whose holder changed meanwhile fails its
/// version check as a whole, is decided again from fresh state, and every row still ends with one card.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_that_raced_a_concurrent_writer_is_decided_again() {
    raced_chunk_is_decided_again(6, 2).await;
}

/// The same with chunks of 300 rows: the writer runs a chunk's statements in parts of 256 as they are
/// made, so the refused holder's version check (after the chunk's 300 keys) comes in a later part than
/// the first keys, which were already written in the chunk's transaction: none of them may stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_refused_in_a_later_part_leaves_none_of_its_earlier_parts() {
    raced_chunk_is_decided_again(600, 300).await;
}

async fn raced_chunk_is_decided_again(holders: u32, chunk: usize) {
    let dir = std::env::temp_dir().join(format!("socialcard-batch-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.join("registry.db").display());
    let config = RegistryConfig::shanghai(vec![7; 32]);
    let inner = socialcard_registry::storage::connect(&url, &config.data_key).await.unwrap().store;
    let hook = RaceOnce { commits: AtomicUsize::new(0), race_on: 1, raced: AtomicUsize::new(0) };
    let store = Arc::new(HookedStore { inner, hook });
    let r = Registry::new(store.clone(), Arc::new(SystemClock), config);
    for n in 0..holders {
        register(&r, &citizen_id(n)).await;
    }
    let batch = EmployerBatch {
        batch_id: "list-2026-002".into(),
        employer_id: "employer-42".into(),
        site_id: "icbc-batch".into(),
        reviewer_id: "reviewer-1".into(),
        production_batch_id: "run-8".into(),
        rows: (0..holders).map(|n| row(&citizen_id(n))).collect(),
    };
    let before = r.store().counts().await.unwrap();
    let report = r.import_employer_batch(&batch, chunk).await.unwrap();
    assert_eq!(store.hook.raced.load(Ordering::SeqCst), 1, "the second chunk's commit met the concurrent change");
    let n = holders as usize;
    assert_eq!((report.applied, report.already_applied, report.rejected), (n, 0, 0), "{:?}", report.outcomes);
    let after = r.store().counts().await.unwrap();
    assert_eq!(
        (after.cards - before.cards, after.audit - before.audit, after.idempotency - before.idempotency),
        (i64::from(holders), 3 * i64::from(holders), i64::from(holders))
    );
    let mut numbers = std::collections::HashSet::new();
    for (i, o) in report.outcomes.iter().enumerate() {
        let RowOutcome::Applied { card_number, .. } = o else { panic!("row {i}: {o:?}") };
        assert!(numbers.insert(card_number.clone()), "card number {card_number} issued twice");
        assert_eq!(r.store().cards_of(&citizen_id(i as u32)).await.unwrap().len(), 1);
    }
    let verified = r.verify_audit_trail(pb::VerifyAuditTrailRequest { card_id: String::new() }).await.unwrap();
    assert!(verified.breaks.is_empty(), "{:?}", verified.breaks);
    let _ = std::fs::remove_dir_all(&dir);
}
