//! A partner bank's adapter (`socialcard.bank.v1.BankCardService`), one instance per bank, acting only
//! on that bank's cards. A financial activation returns OK only when the financial function is recorded
//! and the registry has switched the social function on (R20), in the bank's call. If the registry
//! cannot be reached after the bank committed, the activation is recorded here with a
//! `FinancialActivated` event in the same transaction; the registry applies it as soon as it can, with
//! the same idempotency key, so no card stays half-activated and nothing happens twice.
//!
//! The freeze side of losses (and the hand-over of branch losses and unlocks to the loss coordinator) is
//! in [`loss`]; account opening for production batches in [`accounts`].
//! Who may call (mutual TLS identities) is in [`identity`]; daily reconciliation in [`reconcile`].

pub mod accounts;
pub mod identity;
pub mod loss;
pub mod reconcile;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use sha2::{Digest, Sha256};
use socialcard_domain::{CardNumber, PartnerBank, Rejection, RejectionKind};
use socialcard_events::Outbox;
use socialcard_events::direct::{Direct, DirectError, Value, bind_values};
use socialcard_events::outbox::SqliteOutbox;
use socialcard_proto::bank::v1 as bank;
use socialcard_proto::events::v1 as ev;
use socialcard_proto::loss::v1::loss_coordinator_service_client::LossCoordinatorServiceClient;
use socialcard_proto::registry::v1 as reg;
use socialcard_proto::registry::v1::registry_service_client::RegistryServiceClient;
use socialcard_server::ApiError;
use socialcard_server::error::reason_of;
use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool};
use time::OffsetDateTime;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

/// How long a call to the registry may take when the bank's call carries no deadline.
pub(crate) const DEFAULT_REGISTRY_TIMEOUT: Duration = Duration::from_secs(5);

/// The time left of the bank's call: every onward call gets what remains, so a lookup followed by a
/// write never takes longer in total than the bank allowed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Budget(std::time::Instant);

impl Budget {
    pub(crate) fn new(deadline: Option<Duration>) -> Self {
        Budget(std::time::Instant::now() + deadline.unwrap_or(DEFAULT_REGISTRY_TIMEOUT))
    }

    /// What remains for an onward call, less a tenth (at most 250 ms) kept back so that the adapter can
    /// still record and answer before the bank's own deadline; at least a millisecond, so that a spent
    /// budget makes the call fail fast with DEADLINE_EXCEEDED rather than wait.
    pub(crate) fn left(&self) -> Duration {
        let remaining = self.0.saturating_duration_since(std::time::Instant::now());
        let reserve = (remaining / 10).min(Duration::from_millis(250));
        (remaining - reserve).max(Duration::from_millis(1))
    }
}

#[derive(Clone, Debug)]
pub struct BankAdapter {
    bank: Arc<PartnerBank>,
    registry: RegistryServiceClient<Channel>,
    pool: SqlitePool,
    /// One connection for writes: writers queue here in order rather than in SQLite's busy handler.
    writer: SqlitePool,
    /// Activations are committed through `writer` in groups (`socialcard_events::group`).
    group: socialcard_events::group::GroupWriter,
    /// The hot lookups by key (stored answers, freezes) without a hand-off.
    readers: Arc<socialcard_events::direct::Readers>,
    outbox: Arc<dyn Outbox>,
    /// Where branch losses and unlocks go (the loss coordinator owns the cases).
    coordinator: Option<LossCoordinatorServiceClient<Channel>>,
    /// The bank core's share of calls (its policy's rate and burst).
    limiter: Arc<socialcard_server::limit::RateLimiter>,
}

pub(crate) use socialcard_events::unix_micros as micros;

pub(crate) fn db(e: sqlx::Error) -> ApiError {
    ApiError::Unavailable(e.to_string())
}

pub(crate) fn reject(kind: RejectionKind, reason: &'static str, message: &str) -> ApiError {
    ApiError::Rejected(Rejection::new(kind, reason, message))
}

/// The caller's remaining deadline (`grpc-timeout`), passed on to the registry.
pub(crate) fn remaining_deadline<T>(request: &Request<T>) -> Option<Duration> {
    let v = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n = u64::from_str(n).ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

pub(crate) fn text(field: &'static str, value: &str) -> Result<String, Rejection> {
    let v = value.trim();
    if v.is_empty() {
        return Err(Rejection::invalid(field, "FIELD_REQUIRED", format!("{field} is required")));
    }
    if v.chars().count() > 64 || v.chars().any(char::is_control) {
        return Err(Rejection::invalid(field, "FIELD_FORMAT", format!("{field} is at most 64 printable characters")));
    }
    Ok(v.to_string())
}

impl BankAdapter {
    /// Opens (creating if needed) the adapter's SQLite database and migrates it.
    pub async fn open(
        bank: PartnerBank,
        database_path: &std::path::Path,
        registry: Channel,
    ) -> Result<Self, sqlx::Error> {
        let options = SqliteConnectOptions::new()
            .filename(database_path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = socialcard_events::sqlite_pool(4).connect_with(options.clone()).await?;
        sqlx::migrate!("./migrations").run(&pool).await.map_err(|e| sqlx::Error::Migrate(Box::new(e)))?;
        let readers = Arc::new(socialcard_events::direct::Readers::for_cores(&options).await?);
        let writer = socialcard_events::sqlite_pool(1).connect_with(options).await?;
        let group = socialcard_events::group::GroupWriter::spawn(writer.clone(), socialcard_events::group::MAX_GROUP);
        let limiter =
            Arc::new(socialcard_server::limit::RateLimiter::new(bank.policy.requests_per_second, bank.policy.burst));
        Ok(Self {
            bank: Arc::new(bank),
            registry: RegistryServiceClient::new(registry),
            outbox: Arc::new(SqliteOutbox::new(pool.clone()).with_group(group.clone())),
            pool,
            group,
            readers,
            writer,
            coordinator: None,
            limiter,
        })
    }

    /// Hands branch losses and unlocks to the loss coordinator at `channel`.
    pub fn with_coordinator(mut self, channel: Channel) -> Self {
        self.coordinator = Some(LossCoordinatorServiceClient::new(channel));
        self
    }

    pub fn bank(&self) -> &PartnerBank {
        &self.bank
    }

    /// The adapter's outbox (topic `socialcard.financial.v1`), for the relay or the embedded log.
    pub fn outbox(&self) -> Arc<dyn Outbox> {
        self.outbox.clone()
    }

    pub fn into_server(self) -> bank::bank_card_service_server::BankCardServiceServer<Self> {
        bank::bank_card_service_server::BankCardServiceServer::new(self)
    }

    /// Looks the card up at the registry and refuses another bank's card.
    pub(crate) async fn own_card(&self, card_number: &str, timeout: Duration) -> Result<reg::Card, ApiError> {
        let number = CardNumber::parse(card_number)?;
        let mut req = Request::new(reg::GetCardRequest {
            lookup: Some(reg::get_card_request::Lookup::CardNumber(number.as_str().to_string())),
        });
        req.set_timeout(timeout);
        socialcard_telemetry::inject(&mut req);
        let card = self.registry.clone().get_card(req).await.map_err(|s| registry_error(&s))?.into_inner().card;
        let card = card.ok_or_else(|| ApiError::Internal("registry answered without a card".into()))?;
        if card.bank_code != self.bank.code {
            tracing::warn!(bank = %self.bank.code, "refused another bank's card");
            return Err(reject(RejectionKind::PermissionDenied, "WRONG_BANK", "the card belongs to another bank"));
        }
        Ok(card)
    }

    /// Which of this bank's cards `card_number` is: from the adapter's own `bank_cards` when it knows the
    /// card (a card's number and bank never change), else from the registry, refusing another bank's card.
    /// A card learned from the registry is not stored here; the caller stores it with its own writes
    /// ([`OwnCard::learned`]).
    pub(crate) async fn card_ref(&self, card_number: &str, timeout: Duration) -> Result<OwnCard, ApiError> {
        let number = CardNumber::parse(card_number)?;
        let known = self
            .readers
            .read(|d| {
                d.query_row("SELECT card_id FROM bank_cards WHERE card_number = $1", &[number.as_str().into()], |r| {
                    r.text(0)
                })
            })
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        if let Some(card_id) = known {
            return Ok(OwnCard { card_id, card_number: number.as_str().to_string(), learned: false });
        }
        let card = self.own_card(number.as_str(), timeout).await?;
        Ok(OwnCard { card_id: card.card_id, card_number: card.card_number, learned: true })
    }

    /// Stores a card learned from the registry in `bank_cards` (a group write of its own).
    pub(crate) async fn remember(&self, card: &OwnCard) -> Result<(), ApiError> {
        if !card.learned {
            return Ok(());
        }
        let (number, id, at) = (card.card_number.clone(), card.card_id.clone(), micros(OffsetDateTime::now_utc()));
        self.group
            .run(move |conn| conn.execute(REMEMBER_CARD, &[(&number).into(), (&id).into(), at.into()]).map(drop))
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?
            .map_err(|e| ApiError::Unavailable(e.to_string()))
    }

    pub async fn activate_financial(
        &self,
        req: bank::ActivateFinancialRequest,
        deadline: Option<Duration>,
    ) -> Result<bank::ActivateFinancialResponse, ApiError> {
        let key = text("idempotency_key", &req.idempotency_key)?;
        let hash = Sha256::digest(req.encode_to_vec()).to_vec();
        if let Some(stored) = self.stored_answer(&key, &hash).await? {
            return Ok(stored);
        }
        let teller = text("teller_id", &req.teller_id)?;
        let branch = text("branch_id", &req.branch_id)?;
        let face = text("face_verification_ref", &req.face_verification_ref)?;
        let budget = Budget::new(deadline);
        let card = self.card_ref(&req.card_number, budget.left()).await?;
        if self.current_freeze(&card.card_id).await?.is_some() {
            return Err(reject(
                RejectionKind::FailedPrecondition,
                "FINANCIAL_FROZEN",
                "the card is under a loss; the financial function is frozen (R26)",
            ));
        }

        // The registry's key is derived from the bank's, so both paths (call and event) share it.
        let registry_request = reg::RecordFinancialActivationRequest {
            idempotency_key: format!("bank:{}:{key}", self.bank.code),
            card_id: card.card_id.clone(),
            actor: Some(reg::Actor {
                channel: reg::Channel::BankBranch as i32,
                operator_id: teller.clone(),
                site_id: branch.clone(),
                ..Default::default()
            }),
            bank_code: self.bank.code.clone(),
            face_verification_ref: face,
            bank_pin_changed: req.bank_pin_changed,
            presenter: reg::Presenter::Holder as i32,
        };
        let mut call = Request::new(registry_request.clone());
        call.set_timeout(budget.left());
        socialcard_telemetry::inject(&mut call);
        let now = OffsetDateTime::now_utc();
        match self.registry.clone().record_financial_activation(call).await {
            Ok(answer) => {
                let answer = answer.into_inner();
                let c = answer.card.unwrap_or_default();
                let response = bank::ActivateFinancialResponse {
                    financial_state: c.financial_state,
                    social_state: c.social_state,
                    social_awaits_bureau_unlock: answer.social_awaits_bureau_unlock,
                    activated_at: Some(prost_types::Timestamp { seconds: now.unix_timestamp(), nanos: 0 }),
                };
                let stored =
                    self.record(&card, &teller, &branch, &key, &hash, registry_request, Some(&response), now).await?;
                if stored {
                    return Ok(response);
                }
                // Concurrent retries with this key all return the answer stored first.
                Ok(self.stored_answer::<bank::ActivateFinancialResponse>(&key, &hash).await?.unwrap_or(response))
            }
            Err(status)
                if matches!(
                    status.code(),
                    Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
                ) =>
            {
                // The bank has committed; the registry is out of reach. Record the activation and its
                // event now; the registry applies it as soon as it can.
                tracing::warn!(bank = %self.bank.code, code = ?status.code(), "registry unreachable; social activation follows by event");
                self.record(&card, &teller, &branch, &key, &hash, registry_request, None, now).await?;
                Err(reject(
                    RejectionKind::Unavailable,
                    "SOCIAL_ACTIVATION_PENDING",
                    "the financial activation is recorded; the registry is unreachable and switches the social function on as soon as it is back",
                ))
            }
            Err(status) => Err(registry_error(&status)),
        }
    }

    /// A refusal may only mean that a concurrent twin of this very call (same key, same request) changed
    /// the state first: then its stored answer is the answer.
    pub(crate) async fn or_replay<R: Message + Default>(
        &self,
        key: &str,
        hash: &[u8],
        result: Result<R, ApiError>,
    ) -> Result<R, ApiError> {
        match result {
            Err(ApiError::Rejected(r)) if r.reason != "IDEMPOTENCY_KEY_REUSED" => {
                match self.stored_answer(key, hash).await? {
                    Some(stored) => Ok(stored),
                    None => Err(ApiError::Rejected(r)),
                }
            }
            other => other,
        }
    }

    pub(crate) async fn stored_answer<R: Message + Default>(
        &self,
        key: &str,
        hash: &[u8],
    ) -> Result<Option<R>, ApiError> {
        let row = self
            .readers
            .read(|d| {
                d.query_row(
                    "SELECT request_hash, response FROM idempotency WHERE idempotency_key = $1",
                    &[key.into()],
                    |r| Ok((r.blob(0), r.blob(1))),
                )
            })
            .map_err(|e| ApiError::Unavailable(e.to_string()))?;
        let Some((stored, response)) = row else { return Ok(None) };
        if stored != hash {
            return Err(reject(
                RejectionKind::AlreadyExists,
                "IDEMPOTENCY_KEY_REUSED",
                "this idempotency key was used for another request",
            ));
        }
        R::decode(response.as_slice()).map(Some).map_err(|e| ApiError::Internal(e.to_string()))
    }

    /// Compensation (`CancelActivation`): the bank core rolled its activation back on its side. Allowed
    /// within the bank's window; the registry's financial function returns to not activated (a social
    /// function once on stays on). The same fallback as activation when the registry is out of reach.
    pub async fn cancel_activation(
        &self,
        req: bank::CancelActivationRequest,
        deadline: Option<Duration>,
    ) -> Result<bank::CancelActivationResponse, ApiError> {
        let key = text("idempotency_key", &req.idempotency_key)?;
        let hash = Sha256::digest(req.encode_to_vec()).to_vec();
        let result = self.cancel_activation_once(req, deadline, &key, &hash).await;
        self.or_replay(&key, &hash, result).await
    }

    async fn cancel_activation_once(
        &self,
        req: bank::CancelActivationRequest,
        deadline: Option<Duration>,
        key: &str,
        hash: &[u8],
    ) -> Result<bank::CancelActivationResponse, ApiError> {
        let budget = Budget::new(deadline);
        let (key, hash) = (key.to_string(), hash.to_vec());
        if let Some(stored) = self.stored_answer(&key, &hash).await? {
            return Ok(stored);
        }
        let reason = text("reason", &req.reason)?;
        let number = CardNumber::parse(&req.card_number)?;
        let row = sqlx::query(
            "SELECT card_id, state, teller_id, branch_id, activated_at FROM financial_cards WHERE card_number = $1",
        )
        .bind(number.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?
        .ok_or_else(|| {
            reject(
                RejectionKind::FailedPrecondition,
                "NOT_ACTIVATED_HERE",
                "this adapter recorded no activation of the card",
            )
        })?;
        let state: String = row.try_get("state").map_err(db)?;
        if state != "active" {
            return Err(reject(
                RejectionKind::FailedPrecondition,
                "NOT_ACTIVATED_HERE",
                "the card's activation is not active here",
            ));
        }
        let activated_at: i64 = row.try_get("activated_at").map_err(db)?;
        let window = i64::from(self.bank.policy.activation_cancel_window_minutes) * 60_000_000;
        let now = OffsetDateTime::now_utc();
        if micros(now) > activated_at + window {
            return Err(reject(
                RejectionKind::FailedPrecondition,
                "CANCEL_WINDOW_CLOSED",
                "the activation is older than the bank's rollback window",
            ));
        }
        let card_id: String = row.try_get("card_id").map_err(db)?;
        let registry_request = reg::CancelFinancialActivationRequest {
            idempotency_key: format!("bank:{}:{key}", self.bank.code),
            card_id: card_id.clone(),
            actor: Some(reg::Actor {
                channel: reg::Channel::BankBranch as i32,
                operator_id: row.try_get("teller_id").map_err(db)?,
                site_id: row.try_get("branch_id").map_err(db)?,
                ..Default::default()
            }),
            bank_code: self.bank.code.clone(),
            reason: reason.clone(),
        };
        let mut call = Request::new(registry_request.clone());
        call.set_timeout(budget.left());
        socialcard_telemetry::inject(&mut call);
        let (confirmed, failure) = match self.registry.clone().cancel_financial_activation(call).await {
            Ok(_) => (true, None),
            Err(s)
                if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled) =>
            {
                (false, None)
            }
            Err(s) => (false, Some(registry_error(&s))),
        };
        if let Some(e) = failure {
            return Err(e);
        }
        let response = bank::CancelActivationResponse { financial_state: reg::FinancialState::NotActivated as i32 };
        let mut tx = self.writer.begin().await.map_err(db)?;
        let rolled_back =
            sqlx::query("UPDATE financial_cards SET state = 'rolled_back' WHERE card_id = $1 AND state = 'active'")
                .bind(&card_id)
                .execute(&mut *tx)
                .await
                .map_err(db)?
                .rows_affected()
                == 1;
        if confirmed {
            store_answer(&mut *tx, &key, &hash, &response, now).await?;
        }
        let event = ev::FinancialEvent {
            card_id: card_id.clone(),
            bank_code: self.bank.code.clone(),
            occurred_at: Some(prost_types::Timestamp { seconds: now.unix_timestamp(), nanos: 0 }),
            kind: Some(ev::financial_event::Kind::FinancialActivationRolledBack(ev::FinancialActivationRolledBack {
                reason,
                registry_request: Some(registry_request),
                registry_confirmed: confirmed,
            })),
        };
        // A concurrent twin of this call rolled it back first: its event is the one.
        if rolled_back {
            self.append_event(&mut tx, &card_id, "socialcard.financial.v1.FinancialActivationRolledBack", &event, now)
                .await?;
        }
        tx.commit().await.map_err(db)?;
        if confirmed {
            Ok(response)
        } else {
            Err(reject(
                RejectionKind::Unavailable,
                "ROLLBACK_PENDING",
                "the rollback is recorded; the registry is unreachable and applies it as soon as it is back",
            ))
        }
    }

    pub(crate) async fn append_event(
        &self,
        tx: &mut sqlx::SqliteConnection,
        card_id: &str,
        event_type: &'static str,
        event: &ev::FinancialEvent,
        now: OffsetDateTime,
    ) -> Result<(), ApiError> {
        self.event_row(card_id, event_type, event, now).insert(tx).await.map_err(db)
    }

    /// The outbox row of one financial event, built in the request's context (its trace) so it can be
    /// written later, by the group writer.
    pub(crate) fn event_row(
        &self,
        card_id: &str,
        event_type: &'static str,
        event: &ev::FinancialEvent,
        now: OffsetDateTime,
    ) -> EventRow {
        EventRow {
            event_id: uuid::Uuid::now_v7().to_string(),
            card_id: card_id.to_string(),
            event_type,
            payload: event.encode_to_vec(),
            occurred_at: micros(now),
            source: format!("bank-adapter.{}", self.bank.code),
            traceparent: socialcard_telemetry::current_traceparent(),
        }
    }

    /// Records the activation, its event and (when the registry confirmed) the bank's answer, in one
    /// transaction shared with the other activations queued at the same moment (group commit; the
    /// adapter's database syncs every commit to disk, so this is where concurrent activations win).
    /// A second recording of the same card keeps the first. Returns whether `response` became the
    /// stored answer to `key` (false: a concurrent twin stored its answer first).
    #[allow(clippy::too_many_arguments)]
    async fn record(
        &self,
        card: &OwnCard,
        teller: &str,
        branch: &str,
        key: &str,
        hash: &[u8],
        registry_request: reg::RecordFinancialActivationRequest,
        response: Option<&bank::ActivateFinancialResponse>,
        now: OffsetDateTime,
    ) -> Result<bool, ApiError> {
        let confirmed = response.is_some();
        // One event per activation (a re-activation after a rollback is a new one); a retry after a
        // pending one adds none.
        let event = ev::FinancialEvent {
            card_id: card.card_id.clone(),
            bank_code: self.bank.code.clone(),
            occurred_at: Some(prost_types::Timestamp { seconds: now.unix_timestamp(), nanos: 0 }),
            kind: Some(ev::financial_event::Kind::FinancialActivated(ev::FinancialActivated {
                teller_id: teller.to_string(),
                branch_id: branch.to_string(),
                idempotency_key: registry_request.idempotency_key.clone(),
                registry_request: Some(registry_request),
                registry_confirmed: confirmed,
            })),
        };
        let event = self.event_row(&card.card_id, "socialcard.financial.v1.FinancialActivated", &event, now);
        let answer = response.map(|r| (key.to_string(), hash.to_vec(), r.encode_to_vec()));
        let (card_id, card_number, learned) = (card.card_id.clone(), card.card_number.clone(), card.learned);
        let (teller, branch, at) = (teller.to_string(), branch.to_string(), micros(now));
        self.group
            .run(move |conn| {
                let inserted = conn.execute(
                    "INSERT INTO financial_cards (card_id, card_number, state, teller_id, branch_id, activated_at, social_confirmed)
                     VALUES ($1, $2, 'active', $3, $4, $5, $6)
                     ON CONFLICT (card_id) DO UPDATE SET state = 'active', teller_id = excluded.teller_id,
                         branch_id = excluded.branch_id, activated_at = excluded.activated_at,
                         social_confirmed = excluded.social_confirmed
                     WHERE financial_cards.state <> 'active'",
                    &[(&card_id).into(), (&card_number).into(), (&teller).into(), (&branch).into(), at.into(), confirmed.into()],
                )? == 1;
                if confirmed {
                    conn.execute("UPDATE financial_cards SET social_confirmed = 1 WHERE card_id = $1", &[(&card_id).into()])?;
                }
                let mut stored = false;
                if let Some((key, hash, response)) = &answer {
                    stored = conn.execute(STORE_ANSWER, &[key.into(), hash.into(), response.into(), at.into()])? == 1;
                }
                if inserted {
                    event.insert_direct(conn)?;
                }
                if learned {
                    conn.execute(REMEMBER_CARD, &[(&card_number).into(), (&card_id).into(), at.into()])?;
                }
                Ok::<_, DirectError>(stored)
            })
            .await
            .map_err(|e| ApiError::Unavailable(e.to_string()))?
            .map_err(|e| ApiError::Unavailable(e.to_string()))
    }

    pub async fn query_card(
        &self,
        req: bank::QueryCardRequest,
        deadline: Option<Duration>,
    ) -> Result<bank::QueryCardResponse, ApiError> {
        let card = self.own_card(&req.card_number, deadline.unwrap_or(DEFAULT_REGISTRY_TIMEOUT)).await?;
        Ok(bank::QueryCardResponse {
            physical_state: card.physical_state,
            social_state: card.social_state,
            financial_state: card.financial_state,
            status_code: card.status_code,
        })
    }

    /// Activations recorded here whose social side the registry has not confirmed yet.
    pub async fn unconfirmed(&self) -> Result<i64, sqlx::Error> {
        sqlx::query("SELECT COUNT(*) AS n FROM financial_cards WHERE social_confirmed = 0")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")
    }
}

/// Stores the answer to an idempotency key; a concurrent twin may have stored its answer first, and the
/// first one stands.
pub(crate) async fn store_answer<'c>(
    executor: impl sqlx::SqliteExecutor<'c>,
    key: &str,
    hash: &[u8],
    response: &impl Message,
    now: OffsetDateTime,
) -> Result<(), ApiError> {
    store_encoded_answer(executor, key, hash, &response.encode_to_vec(), micros(now)).await.map_err(db)?;
    Ok(())
}

/// One of this bank's cards, as an operation on it needs it.
#[derive(Clone, Debug)]
pub(crate) struct OwnCard {
    pub(crate) card_id: String,
    pub(crate) card_number: String,
    /// Learned from the registry just now: not in `bank_cards` yet.
    pub(crate) learned: bool,
}

/// Stores one of this bank's cards (number to id); a card stored already stays as it is.
pub(crate) const REMEMBER_CARD: &str =
    "INSERT INTO bank_cards (card_number, card_id, learned_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING";

/// Stores an answer unless one is stored already under its key (a concurrent twin's first answer stands).
const STORE_ANSWER: &str =
    "INSERT INTO idempotency (idempotency_key, request_hash, response, created_at) VALUES ($1, $2, $3, $4)
     ON CONFLICT (idempotency_key) DO NOTHING";

/// Stores an encoded answer under `key` unless one is stored already; returns the rows written (0 or 1).
async fn store_encoded_answer<'c>(
    executor: impl sqlx::SqliteExecutor<'c>,
    key: &str,
    hash: &[u8],
    response: &[u8],
    at: i64,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(STORE_ANSWER).bind(key).bind(hash).bind(response).bind(at).execute(executor).await?.rows_affected())
}

/// One outbox row of the adapter's financial events, ready to insert.
#[derive(Debug)]
pub(crate) struct EventRow {
    event_id: String,
    card_id: String,
    event_type: &'static str,
    payload: Vec<u8>,
    occurred_at: i64,
    source: String,
    traceparent: Option<String>,
}

/// One outbox row.
const INSERT_EVENT: &str =
    "INSERT INTO outbox (event_id, topic, event_key, event_type, payload, occurred_at, bucket, source,
         traceparent)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";

impl EventRow {
    /// The row's values in `INSERT_EVENT`'s order.
    fn values(&self) -> [Value<'_>; 9] {
        [
            (&self.event_id).into(),
            socialcard_events::topics::FINANCIAL.into(),
            (&self.card_id).into(),
            self.event_type.into(),
            (&self.payload).into(),
            self.occurred_at.into(),
            socialcard_events::bucket_of(&self.card_id).into(),
            (&self.source).into(),
            self.traceparent.as_ref().into(),
        ]
    }

    /// Inserts the row on the group writer's connection.
    fn insert_direct(&self, conn: &mut Direct<'_>) -> Result<(), DirectError> {
        conn.execute(INSERT_EVENT, &self.values())?;
        Ok(())
    }

    async fn insert(&self, conn: &mut sqlx::SqliteConnection) -> Result<(), sqlx::Error> {
        bind_values(sqlx::query(INSERT_EVENT), &self.values()).execute(conn).await?;
        Ok(())
    }
}

/// A registry refusal passes through to the bank with its code and reason; transport failures say the
/// registry is unavailable.
pub(crate) fn registry_error(status: &Status) -> ApiError {
    let reason = reason_of(status).unwrap_or_default();
    let kind = match status.code() {
        Code::InvalidArgument => RejectionKind::InvalidArgument,
        Code::FailedPrecondition => RejectionKind::FailedPrecondition,
        Code::PermissionDenied => RejectionKind::PermissionDenied,
        Code::NotFound => RejectionKind::NotFound,
        Code::AlreadyExists => RejectionKind::AlreadyExists,
        Code::Aborted => RejectionKind::Aborted,
        _ => return ApiError::Unavailable(format!("registry: {}", status.message())),
    };
    let reason: &'static str = KNOWN_REASONS.iter().find(|r| **r == reason).copied().unwrap_or("REGISTRY_REFUSED");
    ApiError::Rejected(Rejection::new(kind, reason, status.message()))
}

/// Registry reasons a bank may see passed through unchanged.
const KNOWN_REASONS: &[&str] = &[
    "CARD_NOT_FOUND",
    "CARD_NUMBER_FORMAT",
    "CARD_NUMBER_CHECK_DIGIT",
    "NOT_COLLECTED",
    "CARD_CANCELLED",
    "CARD_LOSS_LOCKED",
    "SOCIAL_PIN_LOCKED",
    "SOCIAL_DISABLED",
    "FINANCIAL_ALREADY_ACTIVE",
    "FINANCIAL_FROZEN",
    "BANK_PIN_NOT_CHANGED",
    "TEMPORARY_CARD_NO_FINANCIAL",
    "FACE_VERIFICATION_REQUIRED",
    "WRONG_BANK",
    "IDEMPOTENCY_KEY_REUSED",
    "CONCURRENT_CHANGE",
    "ILLEGAL_FINANCIAL_TRANSITION",
    "INITIAL_PIN_HOLDER",
    "OUTSIDE_WORKING_HOURS",
    "NOT_LOSS_LOCKED",
    "NO_OPEN_CASE",
    "REPLACEMENT_ORDERED",
    "CARD_REQUIRED",
    "HOLDER_IN_PERSON_REQUIRED",
    "ACCOUNT_NOT_IN_BANK_BIN",
    "ACCOUNT_NUMBER_REQUIRED",
    "ILLEGAL_PHYSICAL_TRANSITION",
    "CHANNEL_NOT_ALLOWED",
];

#[tonic::async_trait]
impl bank::bank_card_service_server::BankCardService for BankAdapter {
    async fn activate_financial(
        &self,
        request: Request<bank::ActivateFinancialRequest>,
    ) -> Result<Response<bank::ActivateFinancialResponse>, Status> {
        self.limiter.admit().map_err(|r| Status::from(ApiError::Rejected(r)))?;
        let deadline = remaining_deadline(&request);
        BankAdapter::activate_financial(self, request.into_inner(), deadline)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn query_card(
        &self,
        request: Request<bank::QueryCardRequest>,
    ) -> Result<Response<bank::QueryCardResponse>, Status> {
        self.limiter.admit().map_err(|r| Status::from(ApiError::Rejected(r)))?;
        let deadline = remaining_deadline(&request);
        BankAdapter::query_card(self, request.into_inner(), deadline).await.map(Response::new).map_err(Status::from)
    }

    async fn cancel_activation(
        &self,
        request: Request<bank::CancelActivationRequest>,
    ) -> Result<Response<bank::CancelActivationResponse>, Status> {
        self.limiter.admit().map_err(|r| Status::from(ApiError::Rejected(r)))?;
        let deadline = remaining_deadline(&request);
        BankAdapter::cancel_activation(self, request.into_inner(), deadline)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn report_loss(
        &self,
        request: Request<bank::ReportLossRequest>,
    ) -> Result<Response<bank::ReportLossResponse>, Status> {
        self.limiter.admit().map_err(|r| Status::from(ApiError::Rejected(r)))?;
        let deadline = remaining_deadline(&request);
        BankAdapter::report_loss(self, request.into_inner(), deadline).await.map(Response::new).map_err(Status::from)
    }

    async fn unlock_financial(
        &self,
        request: Request<bank::UnlockFinancialRequest>,
    ) -> Result<Response<bank::UnlockFinancialResponse>, Status> {
        self.limiter.admit().map_err(|r| Status::from(ApiError::Rejected(r)))?;
        let deadline = remaining_deadline(&request);
        BankAdapter::unlock_financial(self, request.into_inner(), deadline)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn confirm_account_opening(
        &self,
        request: Request<bank::ConfirmAccountOpeningRequest>,
    ) -> Result<Response<bank::ConfirmAccountOpeningResponse>, Status> {
        self.limiter.admit().map_err(|r| Status::from(ApiError::Rejected(r)))?;
        let deadline = remaining_deadline(&request);
        BankAdapter::confirm_account_opening(self, request.into_inner(), deadline)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }
}

/// The fully qualified gRPC service name, as health and reflection report it.
pub const SERVICE_NAME: &str =
    <bank::bank_card_service_server::BankCardServiceServer<BankAdapter> as tonic::server::NamedService>::NAME;
