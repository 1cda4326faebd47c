//! Rows of the coordinator's tables and their wire form. Every change of a case is written with its
//! `LossEvent` in the outbox, in one transaction.

use prost::Message;
use socialcard_domain::loss::{CaseSides, CaseState, Release};
use socialcard_domain::{LossKind, Rejection, RejectionKind};
use socialcard_events::{from_unix_micros, unix_micros};
use socialcard_proto::events::v1 as ev;
use socialcard_proto::loss::v1 as pb;
use socialcard_proto::registry::v1 as reg;
use socialcard_server::ApiError;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};
use time::OffsetDateTime;

pub(crate) fn db(e: sqlx::Error) -> ApiError {
    ApiError::Unavailable(e.to_string())
}

pub(crate) fn kind_name(kind: LossKind) -> &'static str {
    kind.as_str()
}

pub(crate) fn kind_parse(s: &str) -> LossKind {
    match s {
        "written" => LossKind::Written,
        "automatic" => LossKind::Automatic,
        _ => LossKind::Temporary,
    }
}

pub(crate) fn kind_to_pb(kind: LossKind) -> reg::LossKind {
    match kind {
        LossKind::Temporary => reg::LossKind::Temporary,
        LossKind::Written => reg::LossKind::Written,
        LossKind::Automatic => reg::LossKind::Automatic,
    }
}

fn release_name(r: Option<Release>) -> Option<&'static str> {
    r.map(|r| match r {
        Release::Unlocked => "unlocked",
        Release::Expired => "expired",
    })
}

fn release_parse(s: Option<String>) -> Option<Release> {
    s.map(|s| if s == "expired" { Release::Expired } else { Release::Unlocked })
}

fn timestamp(us: i64) -> Option<prost_types::Timestamp> {
    from_unix_micros(us).map(|t| prost_types::Timestamp { seconds: t.unix_timestamp(), nanos: 0 })
}

#[derive(Clone, Debug)]
pub(crate) struct CaseRow {
    pub case_id: String,
    pub report_key: String,
    /// The key of the report that set the case's current kind: the sides' calls derive their keys from it.
    pub lock_key: String,
    pub request_hash: Option<Vec<u8>>,
    pub card_id: String,
    pub card_number: String,
    pub bank_code: String,
    pub kind: LossKind,
    pub channel: i32,
    pub actor: reg::Actor,
    pub documents: Option<reg::Documents>,
    pub sides: CaseSides,
    pub pin_lock: bool,
    /// Set for replaced and rejected cases; otherwise the state follows the sides.
    pub closed_as: Option<CaseState>,
    pub last_error: Option<String>,
    pub opened_at: i64,
    pub expires_at: Option<i64>,
    pub social_expires_at: Option<i64>,
    pub closed_at: Option<i64>,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub version: i64,
}

impl CaseRow {
    pub fn state(&self) -> CaseState {
        self.closed_as.unwrap_or_else(|| self.sides.state())
    }

    pub fn from_row(r: &SqliteRow) -> Result<Self, ApiError> {
        let actor: Vec<u8> = r.try_get("actor").map_err(db)?;
        let documents: Option<Vec<u8>> = r.try_get("documents").map_err(db)?;
        let state: String = r.try_get("state").map_err(db)?;
        let state =
            CaseState::parse(&state).ok_or_else(|| ApiError::Internal(format!("unknown case state {state}")))?;
        Ok(Self {
            case_id: r.try_get("case_id").map_err(db)?,
            report_key: r.try_get("report_key").map_err(db)?,
            lock_key: r.try_get("lock_key").map_err(db)?,
            request_hash: r.try_get("request_hash").map_err(db)?,
            card_id: r.try_get("card_id").map_err(db)?,
            card_number: r.try_get("card_number").map_err(db)?,
            bank_code: r.try_get("bank_code").map_err(db)?,
            kind: kind_parse(&r.try_get::<String, _>("loss_kind").map_err(db)?),
            channel: r.try_get("channel").map_err(db)?,
            actor: reg::Actor::decode(actor.as_slice()).map_err(|e| ApiError::Internal(e.to_string()))?,
            documents: documents
                .map(|d| reg::Documents::decode(d.as_slice()))
                .transpose()
                .map_err(|e| ApiError::Internal(e.to_string()))?,
            sides: CaseSides {
                freezes_financial: r.try_get::<i64, _>("freezes_financial").map_err(db)? != 0,
                social_locked: r.try_get::<i64, _>("social_locked").map_err(db)? != 0,
                financial_frozen: r.try_get::<i64, _>("financial_frozen").map_err(db)? != 0,
                social_released: release_parse(r.try_get("social_released").map_err(db)?),
                financial_released: release_parse(r.try_get("financial_released").map_err(db)?),
            },
            pin_lock: r.try_get::<i64, _>("pin_lock").map_err(db)? != 0,
            closed_as: matches!(state, CaseState::Replaced | CaseState::Rejected).then_some(state),
            last_error: r.try_get("last_error").map_err(db)?,
            opened_at: r.try_get("opened_at").map_err(db)?,
            expires_at: r.try_get("expires_at").map_err(db)?,
            social_expires_at: r.try_get("social_expires_at").map_err(db)?,
            closed_at: r.try_get("closed_at").map_err(db)?,
            attempts: r.try_get("attempts").map_err(db)?,
            next_attempt_at: r.try_get("next_attempt_at").map_err(db)?,
            version: r.try_get("version").map_err(db)?,
        })
    }

    pub fn to_pb(&self) -> pb::LossCase {
        let state = match self.state() {
            CaseState::Locking => pb::CaseState::Locking,
            CaseState::Locked => pb::CaseState::Locked,
            CaseState::OneSided => pb::CaseState::OneSided,
            CaseState::Unlocking => pb::CaseState::Unlocking,
            CaseState::Unlocked => pb::CaseState::Unlocked,
            CaseState::Expired => pb::CaseState::Expired,
            CaseState::Replaced => pb::CaseState::Replaced,
            CaseState::Rejected => pb::CaseState::Rejected,
        };
        pb::LossCase {
            case_id: self.case_id.clone(),
            card_id: self.card_id.clone(),
            loss_kind: kind_to_pb(self.kind) as i32,
            state: state as i32,
            social_locked: self.sides.social_locked && self.sides.social_released.is_none(),
            financial_frozen: self.sides.financial_frozen && self.sides.financial_released.is_none(),
            opened_at: timestamp(self.opened_at),
            expires_at: self.expires_at.and_then(timestamp),
            bank_code: self.bank_code.clone(),
            channel: self.channel,
            freezes_financial: self.sides.freezes_financial,
            pin_lock: self.pin_lock,
            last_error: self.last_error.clone().unwrap_or_default(),
            closed_at: self.closed_at.and_then(timestamp),
            social_expires_at: self.social_expires_at.and_then(timestamp),
        }
    }

    /// Inserts a new case, with its first event when `announce` (a case whose first side is still to be
    /// confirmed is announced by its first update, so a refused report leaves nothing behind).
    pub async fn insert(
        &self,
        tx: &mut SqliteConnection,
        now: OffsetDateTime,
        announce: bool,
    ) -> Result<bool, ApiError> {
        let inserted = sqlx::query(
            "INSERT INTO cases (case_id, report_key, lock_key, request_hash, card_id, card_number, bank_code, loss_kind, channel,
                 actor, documents, freezes_financial, pin_lock, social_locked, financial_frozen, social_released,
                 financial_released, state, last_error, opened_at, expires_at, social_expires_at, closed_at,
                 attempts, next_attempt_at, version)
             VALUES ($1, $2, $26, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20,
                 $21, $22, $23, $24, $25)
             ON CONFLICT (report_key) DO NOTHING",
        )
        .bind(&self.case_id)
        .bind(&self.report_key)
        .bind(&self.request_hash)
        .bind(&self.card_id)
        .bind(&self.card_number)
        .bind(&self.bank_code)
        .bind(kind_name(self.kind))
        .bind(self.channel)
        .bind(self.actor.encode_to_vec())
        .bind(self.documents.as_ref().map(Message::encode_to_vec))
        .bind(i64::from(self.sides.freezes_financial))
        .bind(i64::from(self.pin_lock))
        .bind(i64::from(self.sides.social_locked))
        .bind(i64::from(self.sides.financial_frozen))
        .bind(release_name(self.sides.social_released))
        .bind(release_name(self.sides.financial_released))
        .bind(self.state().as_str())
        .bind(&self.last_error)
        .bind(self.opened_at)
        .bind(self.expires_at)
        .bind(self.social_expires_at)
        .bind(self.closed_at)
        .bind(self.attempts)
        .bind(self.next_attempt_at)
        .bind(self.version)
        .bind(&self.lock_key)
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected()
            == 1;
        if inserted && announce {
            self.append_event(tx, now).await?;
        }
        Ok(inserted)
    }

    /// Writes the case back if nobody changed it since it was read (version check); appends its event
    /// when the state or a side changed. Returns false on a concurrent change.
    pub async fn update(
        &mut self,
        tx: &mut SqliteConnection,
        before: &CaseRow,
        now: OffsetDateTime,
    ) -> Result<bool, ApiError> {
        if self.state().is_closed() && self.closed_at.is_none() {
            self.closed_at = Some(unix_micros(now));
        }
        let updated = sqlx::query(
            "UPDATE cases SET loss_kind = $2, freezes_financial = $3, social_locked = $4, financial_frozen = $5,
                 social_released = $6, financial_released = $7, state = $8, last_error = $9, expires_at = $10,
                 social_expires_at = $11, closed_at = $12, attempts = $13, next_attempt_at = $14, version = $15,
                 actor = $16, documents = $17, channel = $18, lock_key = $20
             WHERE case_id = $1 AND version = $19",
        )
        .bind(&self.case_id)
        .bind(kind_name(self.kind))
        .bind(i64::from(self.sides.freezes_financial))
        .bind(i64::from(self.sides.social_locked))
        .bind(i64::from(self.sides.financial_frozen))
        .bind(release_name(self.sides.social_released))
        .bind(release_name(self.sides.financial_released))
        .bind(self.state().as_str())
        .bind(&self.last_error)
        .bind(self.expires_at)
        .bind(self.social_expires_at)
        .bind(self.closed_at)
        .bind(self.attempts)
        .bind(self.next_attempt_at)
        .bind(before.version + 1)
        .bind(self.actor.encode_to_vec())
        .bind(self.documents.as_ref().map(Message::encode_to_vec))
        .bind(self.channel)
        .bind(before.version)
        .bind(&self.lock_key)
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected()
            == 1;
        if !updated {
            return Ok(false);
        }
        self.version = before.version + 1;
        if self.state() != before.state() || self.sides != before.sides || self.kind != before.kind {
            self.append_event(tx, now).await?;
        }
        Ok(true)
    }

    async fn append_event(&self, tx: &mut SqliteConnection, now: OffsetDateTime) -> Result<(), ApiError> {
        let case = self.to_pb();
        let event = ev::LossEvent {
            case_id: self.case_id.clone(),
            card_id: self.card_id.clone(),
            occurred_at: Some(prost_types::Timestamp { seconds: now.unix_timestamp(), nanos: 0 }),
            loss_kind: case.loss_kind,
            state: self.state().as_str().to_string(),
            social_locked: case.social_locked,
            financial_frozen: case.financial_frozen,
            bank_code: self.bank_code.clone(),
            channel: self.channel,
            pin_lock: self.pin_lock,
        };
        sqlx::query(
            "INSERT INTO outbox (event_id, topic, event_key, event_type, payload, occurred_at, bucket, source,
                 traceparent)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 'loss-coordinator', $8)",
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(socialcard_events::topics::LOSS)
        .bind(&self.card_id)
        .bind("socialcard.loss.v1.LossEvent")
        .bind(event.encode_to_vec())
        .bind(unix_micros(now))
        .bind(socialcard_events::bucket_of(&self.card_id))
        .bind(socialcard_telemetry::current_traceparent())
        .execute(tx)
        .await
        .map_err(db)?;
        Ok(())
    }
}

pub(crate) const CASE_COLUMNS: &str =
    "case_id, report_key, lock_key, request_hash, card_id, card_number, bank_code, loss_kind,
    channel, actor, documents, freezes_financial, pin_lock, social_locked, financial_frozen, social_released,
    financial_released, state, last_error, opened_at, expires_at, social_expires_at, closed_at, attempts,
    next_attempt_at, version";

pub(crate) fn not_found(what: &str) -> ApiError {
    ApiError::Rejected(Rejection::new(RejectionKind::NotFound, "CASE_NOT_FOUND", format!("no such {what}")))
}

pub(crate) async fn stored_answer<R: Message + Default>(
    pool: &sqlx::SqlitePool,
    key: &str,
    operation: &str,
    hash: &[u8],
) -> Result<Option<R>, ApiError> {
    let row = sqlx::query("SELECT operation, request_hash, response FROM idempotency WHERE idempotency_key = $1")
        .bind(key)
        .fetch_optional(pool)
        .await
        .map_err(db)?;
    let Some(row) = row else { return Ok(None) };
    let op: String = row.try_get("operation").map_err(db)?;
    let stored: Vec<u8> = row.try_get("request_hash").map_err(db)?;
    if op != operation || stored != hash {
        return Err(ApiError::Rejected(Rejection::new(
            RejectionKind::AlreadyExists,
            "IDEMPOTENCY_KEY_REUSED",
            "this idempotency key was used for another request",
        )));
    }
    let response: Vec<u8> = row.try_get("response").map_err(db)?;
    if response.is_empty() {
        // Claimed by a call still in progress (see `claim`): no answer yet.
        return Ok(None);
    }
    R::decode(response.as_slice()).map(Some).map_err(|e| ApiError::Internal(e.to_string()))
}

/// How a call with an idempotency key may proceed.
pub(crate) enum Claim {
    /// This call runs the operation (its answer is stored by `store_answer`).
    Run,
    /// Another call with the same key is running it: wait for its answer.
    Busy,
}

/// Claims `key` for one running call: a pending row (empty answer) that twins wait on. A claim older
/// than `stale_micros` (its call died) is taken over; the downstream calls it made carry derived keys, so
/// running them again is safe.
pub(crate) async fn claim(
    pool: &sqlx::SqlitePool,
    key: &str,
    operation: &str,
    hash: &[u8],
    now_micros: i64,
    stale_micros: i64,
) -> Result<Claim, ApiError> {
    let inserted = sqlx::query(
        "INSERT INTO idempotency (idempotency_key, operation, request_hash, response, created_at)
         VALUES ($1, $2, $3, x'', $4) ON CONFLICT (idempotency_key) DO NOTHING",
    )
    .bind(key)
    .bind(operation)
    .bind(hash)
    .bind(now_micros)
    .execute(pool)
    .await
    .map_err(db)?
    .rows_affected()
        == 1;
    if inserted {
        return Ok(Claim::Run);
    }
    let taken = sqlx::query(
        "UPDATE idempotency SET created_at = $2
         WHERE idempotency_key = $1 AND response = x'' AND created_at < $3 AND operation = $4 AND request_hash = $5",
    )
    .bind(key)
    .bind(now_micros)
    .bind(now_micros - stale_micros)
    .bind(operation)
    .bind(hash)
    .execute(pool)
    .await
    .map_err(db)?
    .rows_affected()
        == 1;
    Ok(if taken { Claim::Run } else { Claim::Busy })
}

/// Gives a claim back after a refusal, so a later call with the key runs again.
pub(crate) async fn release(pool: &sqlx::SqlitePool, key: &str) -> Result<(), ApiError> {
    sqlx::query("DELETE FROM idempotency WHERE idempotency_key = $1 AND response = x''")
        .bind(key)
        .execute(pool)
        .await
        .map_err(db)?;
    Ok(())
}

pub(crate) async fn store_answer(
    tx: &mut SqliteConnection,
    key: &str,
    operation: &str,
    hash: &[u8],
    response: &impl Message,
    now: OffsetDateTime,
) -> Result<(), ApiError> {
    sqlx::query(
        "INSERT INTO idempotency (idempotency_key, operation, request_hash, response, created_at)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (idempotency_key) DO UPDATE SET response = excluded.response WHERE idempotency.response = x''",
    )
    .bind(key)
    .bind(operation)
    .bind(hash)
    .bind(response.encode_to_vec())
    .bind(unix_micros(now))
    .execute(tx)
    .await
    .map_err(db)?;
    Ok(())
}
