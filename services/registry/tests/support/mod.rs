//! Test harness: a registry served over gRPC on an ephemeral port, backed by a fresh SQLite database or
//! a fresh PostgreSQL schema (when `SOCIALCARD_TEST_DATABASE_URL` is set), with a clock tests can move.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use socialcard_domain::citizen_id::check_char;
use socialcard_domain::numbers::luhn_check_digit;
use socialcard_proto::registry::v1 as pb;
use socialcard_proto::registry::v1::registry_service_client::RegistryServiceClient;
use socialcard_registry::storage::{RegistryStore, TableCounts};
use socialcard_registry::{Registry, RegistryConfig};
use socialcard_server::ManualClock;
use time::macros::datetime;
use tokio::net::TcpListener;
use tonic::transport::Channel;

pub use socialcard_server::error::reason_of;

#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Sqlite,
    Postgres,
}

pub struct Harness {
    pub client: RegistryServiceClient<Channel>,
    pub store: Arc<dyn RegistryStore>,
    pub outbox: Arc<dyn socialcard_events::Outbox>,
    pub clock: ManualClock,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    pg_schema: Option<(String, String)>,
    _dir: Option<TempDir>,
}

/// A temporary directory removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("socialcard-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The PostgreSQL URL tests use, if any.
pub fn postgres_url() -> Option<String> {
    std::env::var("SOCIALCARD_TEST_DATABASE_URL").ok().filter(|u| !u.is_empty())
}

impl Harness {
    /// `None` when the backend is not available here (PostgreSQL without its URL).
    pub async fn start(backend: Backend) -> Option<Harness> {
        let mut dir = None;
        let mut pg_schema = None;
        let url = match backend {
            Backend::Sqlite => {
                let d = TempDir::new();
                let url = format!("sqlite://{}?mode=rwc", d.0.join("registry.db").display());
                dir = Some(d);
                url
            }
            Backend::Postgres => {
                let base = postgres_url()?;
                let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
                let pool = sqlx::PgPool::connect(&base).await.expect("cannot reach SOCIALCARD_TEST_DATABASE_URL");
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&pool).await.unwrap();
                pool.close().await;
                let sep = if base.contains('?') { '&' } else { '?' };
                let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
                pg_schema = Some((base, schema));
                url
            }
        };
        let clock = ManualClock::new(datetime!(2026-11-23 02:00 UTC)); // Monday 10:00 in Shanghai
        let built = socialcard_registry::build(
            &url,
            Arc::new(clock.clone()),
            RegistryConfig::shanghai(b"test-pin-key-0123456789".to_vec()),
        )
        .await
        .expect("registry starts");
        let store = built.registry.store().clone();
        let outbox = built.outbox.clone();
        let (client, shutdown) = serve(built.registry).await;
        Some(Harness { client, store, outbox, clock, shutdown: Some(shutdown), pg_schema, _dir: dir })
    }

    pub async fn counts(&self) -> TableCounts {
        self.store.counts().await.unwrap()
    }

    /// Every value of the first column of `sql`, as bytes, read straight from the registry's database.
    pub async fn raw_column(&self, sql: &str) -> Vec<Vec<u8>> {
        use sqlx::Row;
        match (&self.pg_schema, &self._dir) {
            (Some((base, schema)), _) => {
                let pool = sqlx::PgPool::connect(base).await.unwrap();
                let mut tx = pool.begin().await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!("SET LOCAL search_path TO {schema}")))
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_string())).fetch_all(&mut *tx).await.unwrap();
                rows.iter()
                    .map(|r| r.try_get::<Vec<u8>, _>(0).unwrap_or_else(|_| r.get::<String, _>(0).into_bytes()))
                    .collect()
            }
            (None, Some(dir)) => {
                let url = format!("sqlite://{}", dir.0.join("registry.db").display());
                let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql.to_string())).fetch_all(&pool).await.unwrap();
                rows.iter()
                    .map(|r| r.try_get::<Vec<u8>, _>(0).unwrap_or_else(|_| r.get::<String, _>(0).into_bytes()))
                    .collect()
            }
            _ => panic!("no database"),
        }
    }

    /// Runs SQL straight against the registry's database, behind the service's back (tampering tests).
    pub async fn raw_sql(&self, sql: &str) {
        match (&self.pg_schema, &self._dir) {
            (Some((base, schema)), _) => {
                let pool = sqlx::PgPool::connect(base).await.unwrap();
                let mut tx = pool.begin().await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(format!("SET LOCAL search_path TO {schema}")))
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                sqlx::query(sqlx::AssertSqlSafe(sql.to_string())).execute(&mut *tx).await.unwrap();
                tx.commit().await.unwrap();
                pool.close().await;
            }
            (None, Some(dir)) => {
                let url = format!("sqlite://{}", dir.0.join("registry.db").display());
                let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
                sqlx::query(sqlx::AssertSqlSafe(sql.to_string())).execute(&pool).await.unwrap();
                pool.close().await;
            }
            _ => panic!("no database to tamper with"),
        }
    }

    /// Stops the server and drops the test's PostgreSQL schema.
    pub async fn finish(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some((base, schema)) = self.pg_schema.take()
            && let Ok(pool) = sqlx::PgPool::connect(&base).await
        {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&pool).await;
            pool.close().await;
        }
    }
}

pub async fn serve(registry: Registry) -> (RegistryServiceClient<Channel>, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let routes = tonic::service::Routes::new(socialcard_registry::grpc::RegistryGrpc::new(registry).into_server());
    tokio::spawn(socialcard_server::grpc::serve(listener, routes, &[socialcard_registry::SERVICE_NAME], async {
        let _ = rx.await;
    }));
    let client = RegistryServiceClient::connect(format!("http://{addr}")).await.unwrap();
    (client, tx)
}

/// A valid citizen ID with the given first 17 digits.
pub fn citizen_id(first17: &str) -> String {
    format!("{first17}{}", check_char(first17.as_bytes()) as char)
}

/// A distinct adult born 1980 for each `n`.
pub fn adult(n: u32) -> String {
    citizen_id(&format!("31010519800601{:03}", n % 1000))
}

pub fn key() -> String {
    uuid::Uuid::now_v7().to_string()
}

pub fn actor(channel: pb::Channel) -> Option<pb::Actor> {
    Some(pb::Actor {
        channel: channel as i32,
        operator_id: "clerk-7".into(),
        site_id: "site-1".into(),
        ..Default::default()
    })
}

pub fn holder_docs() -> Option<pb::Documents> {
    Some(pb::Documents {
        presenter: pb::Presenter::Holder as i32,
        holder_id_card: true,
        card_presented: true,
        ..Default::default()
    })
}

pub const PHONE: &str = "13800000000";

pub fn account(bin: &str, n: u32) -> String {
    let body = format!("{bin}{n:012}");
    format!("{body}{}", luhn_check_digit(&body))
}

pub async fn register(h: &mut Harness, id: &str) {
    h.client
        .register_person(pb::RegisterPersonRequest {
            idempotency_key: key(),
            citizen_id: id.into(),
            name: "Wang Fang".into(),
            phone: PHONE.into(),
        })
        .await
        .unwrap();
}

pub fn application(id: &str, bank: &str) -> pb::SubmitApplicationRequest {
    pb::SubmitApplicationRequest {
        idempotency_key: key(),
        citizen_id: id.into(),
        actor: actor(pb::Channel::CommunityPoint),
        documents: holder_docs(),
        card_type: pb::CardType::Adult as i32,
        holder_status: pb::HolderStatus::Unemployed as i32,
        bank_code: bank.into(),
        photo: Some(pb::Photo { source: pb::PhotoSource::CommunityPoint as i32, ..Default::default() }),
        delivery_address: Some(pb::Address {
            recipient: "Wang Fang".into(),
            line: "1 Renmin Road".into(),
            postal_code: "200001".into(),
            ..Default::default()
        }),
        backup_point_id: "point-42".into(),
        ..Default::default()
    }
}

pub async fn apply(h: &mut Harness, id: &str) -> pb::Card {
    h.client.submit_application(application(id, "icbc")).await.unwrap().into_inner().card.unwrap()
}

pub async fn approve(h: &mut Harness, card_id: &str) -> pb::Card {
    h.client
        .review_application(pb::ReviewApplicationRequest {
            idempotency_key: key(),
            card_id: card_id.into(),
            actor: actor(pb::Channel::BureauWindow),
            decision: pb::ReviewDecision::Approve as i32,
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap()
}

pub async fn start_production(h: &mut Harness, card_id: &str) -> pb::Card {
    h.client
        .start_production(pb::StartProductionRequest {
            idempotency_key: key(),
            card_id: card_id.into(),
            actor: actor(pb::Channel::Production),
            batch_id: "b1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap()
}

pub fn production_ok(card_id: &str, account_number: String) -> pb::RecordProductionResultRequest {
    pb::RecordProductionResultRequest {
        idempotency_key: key(),
        card_id: card_id.into(),
        actor: actor(pb::Channel::Production),
        result: Some(pb::record_production_result_request::Result::AccountNumber(account_number)),
    }
}

pub async fn produce(h: &mut Harness, card_id: &str) -> pb::Card {
    start_production(h, card_id).await;
    h.client
        .record_production_result(production_ok(card_id, account("621226", 77)))
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap()
}

pub async fn pick_up(h: &mut Harness, card_id: &str) -> pb::Card {
    h.client
        .record_collection(pb::RecordCollectionRequest {
            idempotency_key: key(),
            card_id: card_id.into(),
            actor: actor(pb::Channel::CommunityPoint),
            method: pb::CollectionMethod::PickedUpAtPoint as i32,
            collected_at: None,
            documents: holder_docs(),
        })
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap()
}

/// Registered, applied, approved, produced and collected: a card in the holder's hands.
pub async fn collected_card(h: &mut Harness, n: u32) -> pb::Card {
    let id = adult(n);
    register(h, &id).await;
    let card = apply(h, &id).await;
    approve(h, &card.card_id).await;
    produce(h, &card.card_id).await;
    pick_up(h, &card.card_id).await
}

pub fn financial_activation(card_id: &str, bank: &str) -> pb::RecordFinancialActivationRequest {
    pb::RecordFinancialActivationRequest {
        idempotency_key: key(),
        card_id: card_id.into(),
        actor: actor(pb::Channel::BankBranch),
        bank_code: bank.into(),
        face_verification_ref: "face-123".into(),
        bank_pin_changed: true,
        presenter: pb::Presenter::Holder as i32,
    }
}

pub fn activate_at(card_id: &str, channel: pb::Channel) -> pb::ActivateSocialFunctionRequest {
    pb::ActivateSocialFunctionRequest {
        idempotency_key: key(),
        card_id: card_id.into(),
        actor: actor(channel),
        documents: holder_docs(),
    }
}

pub fn lock(card_id: &str, kind: pb::LossKind, channel: pb::Channel) -> pb::LockSocialFunctionRequest {
    pb::LockSocialFunctionRequest {
        idempotency_key: key(),
        card_id: card_id.into(),
        actor: actor(channel),
        documents: holder_docs(),
        loss_kind: kind as i32,
    }
}

pub fn unlock_at(card_id: &str, channel: pb::Channel) -> pb::UnlockSocialFunctionRequest {
    pb::UnlockSocialFunctionRequest {
        idempotency_key: key(),
        card_id: card_id.into(),
        actor: actor(channel),
        documents: holder_docs(),
    }
}

pub fn verify(card_id: &str, pin: &str) -> pb::VerifySocialPinRequest {
    pb::VerifySocialPinRequest {
        idempotency_key: key(),
        card_id: card_id.into(),
        actor: actor(pb::Channel::MedicalTerminal),
        pin: pin.into(),
    }
}

pub async fn get(h: &mut Harness, card_id: &str) -> pb::Card {
    h.client
        .get_card(pb::GetCardRequest { lookup: Some(pb::get_card_request::Lookup::CardId(card_id.into())) })
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap()
}

/// Asserts a call failed with `code` and `reason`.
#[track_caller]
pub fn assert_rejected<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: tonic::Code, reason: &str) {
    match result {
        Ok(v) => panic!("expected {code:?} {reason}, got {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{}", s.message());
            assert_eq!(reason_of(&s).as_deref(), Some(reason), "{}", s.message());
        }
    }
}
