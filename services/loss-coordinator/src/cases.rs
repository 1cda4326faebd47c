//! Loss cases: opening one for a report (R25), driving both sides until they are locked (R26), unlocking
//! each side under its own rules (R27), and the queries the dashboard needs.

use prost::Message;
use sha2::{Digest, Sha256};
use socialcard_domain::loss::{
    CaseSides, CaseState, Release, Side, financial_unlock_allowed, report_channel_allowed, unlock_side,
};
use socialcard_domain::{LossKind, Rejection, RejectionKind};
use socialcard_events::unix_micros;
use socialcard_proto::bank::v1 as bank;
use socialcard_proto::loss::v1 as pb;
use socialcard_proto::registry::v1 as reg;
use socialcard_server::ApiError;
use socialcard_server::error::reason_of;
use time::OffsetDateTime;
use tonic::{Code, Request, Status};

use crate::Coordinator;
use crate::store::{
    CASE_COLUMNS, CaseRow, Claim, claim, db, kind_to_pb, not_found, release, store_answer, stored_answer,
};

/// How a call to another service ended, for the side it was meant to move.
pub(crate) enum SideError {
    /// A rule refused it: retrying the same call cannot succeed.
    Refused(Status),
    /// The service could not be reached or answered in time: retry later.
    Transient(String),
}

pub(crate) fn side_error(status: Status) -> SideError {
    match status.code() {
        Code::InvalidArgument | Code::FailedPrecondition | Code::PermissionDenied | Code::NotFound => {
            SideError::Refused(status)
        }
        // A reused key means the same call was made with other content: a bug, not a transient failure.
        Code::AlreadyExists => SideError::Refused(status),
        _ => SideError::Transient(format!("{:?}: {}", status.code(), status.message())),
    }
}

/// A refusal from the registry or an adapter, passed through to the caller with its code and reason.
pub(crate) fn passed_through(status: &Status) -> ApiError {
    let kind = match status.code() {
        Code::InvalidArgument => RejectionKind::InvalidArgument,
        Code::FailedPrecondition => RejectionKind::FailedPrecondition,
        Code::PermissionDenied => RejectionKind::PermissionDenied,
        Code::NotFound => RejectionKind::NotFound,
        Code::AlreadyExists => RejectionKind::AlreadyExists,
        Code::Aborted => RejectionKind::Aborted,
        _ => return ApiError::Unavailable(status.message().to_string()),
    };
    let reason = reason_of(status).unwrap_or_default();
    let reason: &'static str = PASSED_REASONS.iter().find(|r| **r == reason).copied().unwrap_or("REFUSED_DOWNSTREAM");
    ApiError::Rejected(Rejection::new(kind, reason, status.message()))
}

/// Reasons of the registry and the adapters a caller may see unchanged.
const PASSED_REASONS: &[&str] = &[
    "CARD_NOT_FOUND",
    "CARD_ID_FORMAT",
    "CARD_NUMBER_FORMAT",
    "CARD_NUMBER_CHECK_DIGIT",
    "NOT_COLLECTED",
    "CARD_CANCELLED",
    "CARD_LOSS_LOCKED",
    "INITIAL_PIN_HOLDER",
    "OUTSIDE_WORKING_HOURS",
    "CHANNEL_NOT_ALLOWED",
    "PROXY_NOT_ALLOWED",
    "HOLDER_ID_REQUIRED",
    "CARD_REQUIRED",
    "SITE_REQUIRED",
    "PROXY_DOCUMENTS_MISSING",
    "NOT_LOSS_LOCKED",
    "REPLACEMENT_ORDERED",
    "FINANCIAL_NOT_ACTIVE",
    "NOT_FROZEN",
    "WRONG_BANK",
    "ACTOR_REQUIRED",
    "ENUM_UNSPECIFIED",
    "UNKNOWN_ENUM_VALUE",
    "FIELD_FORMAT",
    "IDEMPOTENCY_KEY_REUSED",
    "IDEMPOTENCY_KEY_FORMAT",
];

fn invalid(field: &'static str, reason: &'static str, message: &str) -> ApiError {
    ApiError::Rejected(Rejection::invalid(field, reason, message))
}

/// An idempotency key: 1 to 96 printable ASCII characters (the keys derived from it for the registry and
/// the adapters must stay within their 128).
pub(crate) fn key_of(raw: &str) -> Result<String, ApiError> {
    let k = raw.trim();
    if k.is_empty() || k.len() > 96 || !k.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "idempotency_key",
            "IDEMPOTENCY_KEY_FORMAT",
            "an idempotency key is 1 to 96 printable ASCII characters",
        ));
    }
    Ok(k.to_string())
}

fn hash_of(operation: &str, request: &impl Message) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(operation.as_bytes());
    h.update(request.encode_to_vec());
    h.finalize().to_vec()
}

fn loss_kind_of(value: i32) -> Result<LossKind, ApiError> {
    match reg::LossKind::try_from(value) {
        Ok(reg::LossKind::Temporary) => Ok(LossKind::Temporary),
        Ok(reg::LossKind::Written) => Ok(LossKind::Written),
        Ok(reg::LossKind::Automatic) => Err(invalid(
            "loss_kind",
            "LOSS_KIND_NOT_REPORTABLE",
            "the automatic lock (R22) is the scheduler's, not a report",
        )),
        _ => Err(invalid("loss_kind", "LOSS_KIND_UNKNOWN", "a loss is temporary or written")),
    }
}

impl Coordinator {
    fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    pub(crate) async fn get_card(&self, lookup: reg::get_card_request::Lookup) -> Result<reg::Card, ApiError> {
        let mut req = Request::new(reg::GetCardRequest { lookup: Some(lookup) });
        req.set_timeout(self.config.call_timeout);
        socialcard_telemetry::inject(&mut req);
        match self.registry.clone().get_card(req).await {
            Ok(r) => r.into_inner().card.ok_or_else(|| ApiError::Internal("registry answered without a card".into())),
            Err(s) => Err(passed_through(&s)),
        }
    }

    pub(crate) async fn load_case(&self, case_id: &str) -> Result<Option<CaseRow>, ApiError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {CASE_COLUMNS} FROM cases WHERE case_id = $1")))
            .bind(case_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.map(|r| CaseRow::from_row(&r)).transpose()
    }

    /// The case whose social side the Unlock with caller key `key` released (see `unlocked_by`'s table).
    async fn unlocked_by(&self, key: &str) -> Result<Option<CaseRow>, ApiError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CASE_COLUMNS} FROM cases WHERE case_id = (SELECT case_id FROM unlocked_by WHERE unlock_key = $1)"
        )))
        .bind(key)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.map(|r| CaseRow::from_row(&r)).transpose()
    }

    pub(crate) async fn case_by_report(&self, report_key: &str) -> Result<Option<CaseRow>, ApiError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {CASE_COLUMNS} FROM cases WHERE report_key = $1")))
            .bind(report_key)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        row.map(|r| CaseRow::from_row(&r)).transpose()
    }

    /// The card's open loss case (the newest one not closed; PIN locks aside), if any.
    pub(crate) async fn open_case_of(&self, card_id: &str) -> Result<Option<CaseRow>, ApiError> {
        self.open_case_where(card_id, false).await
    }

    /// The card's open PIN-lock case (R30), if any.
    pub(crate) async fn open_pin_case_of(&self, card_id: &str) -> Result<Option<CaseRow>, ApiError> {
        self.open_case_where(card_id, true).await
    }

    async fn open_case_where(&self, card_id: &str, pin_lock: bool) -> Result<Option<CaseRow>, ApiError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CASE_COLUMNS} FROM cases WHERE card_id = $1 AND pin_lock = $2
               AND state NOT IN ('unlocked', 'expired', 'replaced', 'rejected')
             ORDER BY opened_at DESC LIMIT 1"
        )))
        .bind(card_id)
        .bind(i64::from(pin_lock))
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.map(|r| CaseRow::from_row(&r)).transpose()
    }

    /// R25: a loss report from any channel. The registry checks the channel's rules (R25, R31) while it
    /// locks the social side, so a refused report writes nothing here; the financial side is frozen
    /// through the card's bank adapter, now or, if it cannot be reached, by the background retries.
    pub async fn report_loss(&self, req: pb::ReportLossRequest) -> Result<pb::ReportLossResponse, ApiError> {
        const OP: &str = "ReportLoss";
        let key = key_of(&req.idempotency_key)?;
        let hash = hash_of(OP, &req);
        self.once(&key, OP, &hash, || self.report_loss_once(req, OP, key.clone(), hash.clone())).await
    }

    /// Runs `f` once per key: concurrent twins of a call (same key, same request) wait for the first one's
    /// answer instead of racing it through the registry and the adapters; a refusal releases the key.
    async fn once<R, F, Fut>(&self, key: &str, operation: &str, hash: &[u8], f: F) -> Result<R, ApiError>
    where
        R: Message + Default,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<R, ApiError>>,
    {
        // A call that died holding the claim is taken over after twice the downstream timeout.
        let stale = i64::try_from(self.config.call_timeout.as_micros() * 4).unwrap_or(i64::MAX / 2);
        loop {
            if let Some(stored) = stored_answer(&self.pool, key, operation, hash).await? {
                return Ok(stored);
            }
            match claim(&self.pool, key, operation, hash, self.real_now(), stale).await? {
                Claim::Run => break,
                Claim::Busy => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
            }
        }
        let result = f().await;
        if result.is_err() {
            release(&self.pool, key).await?;
        }
        result
    }

    async fn report_loss_once(
        &self,
        req: pb::ReportLossRequest,
        op: &str,
        key: String,
        hash: Vec<u8>,
    ) -> Result<pb::ReportLossResponse, ApiError> {
        if let Some(stored) = stored_answer(&self.pool, &key, op, &hash).await? {
            return Ok(stored);
        }
        let kind = loss_kind_of(req.loss_kind)?;
        let actor = req
            .actor
            .clone()
            .ok_or_else(|| invalid("actor", "ACTOR_REQUIRED", "say who reports the loss and through which channel"))?;
        let ctx = socialcard_registry_context(&actor, req.documents.as_ref())?;
        report_channel_allowed(kind, ctx.channel)?;
        let lookup = match (req.card_id.trim(), req.card_number.trim()) {
            (id, "") if !id.is_empty() => reg::get_card_request::Lookup::CardId(id.to_string()),
            ("", number) if !number.is_empty() => reg::get_card_request::Lookup::CardNumber(number.to_string()),
            _ => {
                return Err(invalid(
                    "card_id",
                    "CARD_REQUIRED",
                    "name the card by its id or by its number (one of them)",
                ));
            }
        };
        let card = self.get_card(lookup).await?;
        let open = self.open_case_of(&card.card_id).await?;
        if let Some(open) = &open
            && open.report_key != key
            && open.lock_key != key
            && !(kind == LossKind::Written && open.kind != LossKind::Written)
        {
            return Err(ApiError::Rejected(Rejection::new(
                RejectionKind::FailedPrecondition,
                "CASE_ALREADY_OPEN",
                format!("the card is already under loss case {}", open.case_id),
            )));
        }

        // The social side first: the registry applies R25/R31 and refuses before anything is written here.
        let mut lock = Request::new(reg::LockSocialFunctionRequest {
            idempotency_key: format!("loss:{key}:social"),
            card_id: card.card_id.clone(),
            actor: Some(actor.clone()),
            documents: req.documents,
            loss_kind: kind_to_pb(kind) as i32,
        });
        lock.set_timeout(self.config.call_timeout);
        socialcard_telemetry::inject(&mut lock);
        if let Err(s) = self.registry.clone().lock_social_function(lock).await {
            return Err(passed_through(&s));
        }

        let now = self.now();
        let case = match open.filter(|o| o.report_key != key) {
            // A written report upgrades the open temporary (or automatic) case (R27).
            Some(open) if open.lock_key == key => open,
            Some(open) => self.upgrade_to_written(open, &key, actor, req.documents, now).await?,
            None => self.open_case(&card, kind, &key, &hash, actor, req.documents, now).await?,
        };
        let case = self.drive_case(&case.case_id).await?.unwrap_or(case);
        let response = pb::ReportLossResponse { loss_case: Some(case.to_pb()) };
        let mut tx = self.writer.begin().await.map_err(db)?;
        store_answer(&mut tx, &key, op, &hash, &response, now).await?;
        tx.commit().await.map_err(db)?;
        Ok(stored_answer(&self.pool, &key, op, &hash).await?.unwrap_or(response))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn open_case(
        &self,
        card: &reg::Card,
        kind: LossKind,
        key: &str,
        hash: &[u8],
        actor: reg::Actor,
        documents: Option<reg::Documents>,
        now: OffsetDateTime,
    ) -> Result<CaseRow, ApiError> {
        let bank_days = self.config.banks.get(&card.bank_code).map(|b| b.policy.temporary_loss_expiry_days);
        let expires_at = match (kind, bank_days) {
            (LossKind::Temporary, Some(days)) => Some(now + time::Duration::days(i64::from(days))),
            _ => None,
        };
        let social_expires_at = match (kind, self.config.policy.temporary_loss_expiry_days_social) {
            (LossKind::Temporary, Some(days)) => Some(now + time::Duration::days(i64::from(days))),
            _ => None,
        };
        let case = CaseRow {
            case_id: uuid::Uuid::now_v7().to_string(),
            report_key: key.to_string(),
            lock_key: key.to_string(),
            request_hash: Some(hash.to_vec()),
            card_id: card.card_id.clone(),
            card_number: card.card_number.clone(),
            bank_code: card.bank_code.clone(),
            kind,
            channel: actor.channel,
            actor,
            documents,
            sides: CaseSides {
                freezes_financial: true,
                // The registry confirmed the lock just before.
                social_locked: true,
                financial_frozen: false,
                social_released: None,
                financial_released: None,
            },
            pin_lock: false,
            closed_as: None,
            last_error: None,
            opened_at: unix_micros(now),
            expires_at: expires_at.map(unix_micros),
            social_expires_at: social_expires_at.map(unix_micros),
            closed_at: None,
            attempts: 0,
            next_attempt_at: self.real_now(),
            version: 0,
        };
        let mut tx = self.writer.begin().await.map_err(db)?;
        let inserted = case.insert(&mut tx, now, true).await?;
        if inserted {
            self.schedule_case_timers(&mut tx, &case).await?;
        }
        tx.commit().await.map_err(db)?;
        if inserted {
            tracing::info!(case = %case.case_id, kind = kind.as_str(), "loss case opened");
            Ok(case)
        } else {
            // A twin of this report got there first.
            self.case_by_report(key).await?.ok_or_else(|| ApiError::Internal("case vanished".into()))
        }
    }

    pub(crate) async fn upgrade_to_written(
        &self,
        open: CaseRow,
        key: &str,
        actor: reg::Actor,
        documents: Option<reg::Documents>,
        now: OffsetDateTime,
    ) -> Result<CaseRow, ApiError> {
        let mut case = open.clone();
        case.kind = LossKind::Written;
        case.lock_key = key.to_string();
        case.channel = actor.channel;
        case.actor = actor;
        case.documents = documents;
        case.expires_at = None;
        case.social_expires_at = None;
        // The freeze is made written too (a temporary freeze would lapse), under the new key.
        case.sides = CaseSides {
            freezes_financial: true,
            social_locked: true,
            financial_frozen: false,
            social_released: None,
            financial_released: None,
        };
        let mut tx = self.writer.begin().await.map_err(db)?;
        if !case.update(&mut tx, &open, now).await? {
            return Err(ApiError::Rejected(Rejection::new(
                RejectionKind::Aborted,
                "CONCURRENT_CHANGE",
                "the case changed concurrently; retry",
            )));
        }
        tx.commit().await.map_err(db)?;
        tracing::info!(case = %case.case_id, "loss case made written");
        Ok(case)
    }

    /// Tries every side the case still needs once; records the outcome. Returns the case as stored
    /// afterwards (None if it does not exist).
    pub(crate) async fn drive_case(&self, case_id: &str) -> Result<Option<CaseRow>, ApiError> {
        let Some(before) = self.load_case(case_id).await? else { return Ok(None) };
        if before.state().is_closed() || !before.sides.needs_driving() {
            return Ok(Some(before));
        }
        let mut case = before.clone();
        let mut errors = Vec::new();
        if !case.sides.social_locked && case.sides.social_released.is_none() {
            match self.lock_social(&case).await {
                Ok(()) => case.sides.social_locked = true,
                Err(SideError::Refused(s)) => {
                    tracing::warn!(case = %case.case_id, code = ?s.code(), "registry refused the loss lock");
                    case.closed_as = Some(CaseState::Rejected);
                    case.last_error = Some(format!("{}: {}", reason_of(&s).unwrap_or_default(), s.message()));
                }
                Err(SideError::Transient(e)) => errors.push(format!("registry: {e}")),
            }
        }
        if case.closed_as.is_none()
            && case.sides.freezes_financial
            && !case.sides.financial_frozen
            && case.sides.financial_released.is_none()
        {
            match self.freeze(&case).await {
                Ok(()) => case.sides.financial_frozen = true,
                Err(SideError::Refused(s)) => {
                    errors.push(format!("{}: {}", reason_of(&s).unwrap_or_default(), s.message()));
                }
                Err(SideError::Transient(e)) => errors.push(format!("bank {}: {e}", case.bank_code)),
            }
        }
        let now = self.now();
        if case.closed_as.is_none() {
            case.last_error = if errors.is_empty() { None } else { Some(errors.join("; ")) };
        }
        if case.closed_as.is_none() && case.sides.needs_driving() {
            case.attempts += 1;
            case.next_attempt_at = self.retry_at(case.attempts);
        } else {
            case.attempts = 0;
        }
        let mut tx = self.writer.begin().await.map_err(db)?;
        let written = case.update(&mut tx, &before, now).await?;
        tx.commit().await.map_err(db)?;
        if written {
            if case.state() == CaseState::OneSided {
                tracing::warn!(case = %case.case_id, "loss case locked on one side only; retrying");
            }
            Ok(Some(case))
        } else {
            // Driven concurrently (a twin call or the background loop): what is stored stands.
            self.load_case(case_id).await
        }
    }

    async fn lock_social(&self, case: &CaseRow) -> Result<(), SideError> {
        let mut lock = Request::new(reg::LockSocialFunctionRequest {
            idempotency_key: format!("loss:{}:social", case.lock_key),
            card_id: case.card_id.clone(),
            actor: Some(case.actor.clone()),
            documents: case.documents,
            loss_kind: kind_to_pb(case.kind) as i32,
        });
        lock.set_timeout(self.config.call_timeout);
        socialcard_telemetry::inject(&mut lock);
        self.registry.clone().lock_social_function(lock).await.map(|_| ()).map_err(side_error)
    }

    async fn freeze(&self, case: &CaseRow) -> Result<(), SideError> {
        let Some(adapter) = self.adapters.get(&case.bank_code) else {
            return Err(SideError::Transient(format!("no adapter is configured for bank {}", case.bank_code)));
        };
        let mut call = Request::new(bank::FreezeFinancialRequest {
            idempotency_key: format!("loss:{}:freeze", case.lock_key),
            card_id: case.card_id.clone(),
            case_id: case.case_id.clone(),
            loss_kind: kind_to_pb(case.kind) as i32,
        });
        call.set_timeout(self.config.call_timeout);
        socialcard_telemetry::inject(&mut call);
        adapter.clone().freeze_financial(call).await.map(|_| ()).map_err(side_error)
    }

    /// Drives every case due for a retry. Returns how many it tried.
    pub async fn drive_pending(&self) -> Result<usize, ApiError> {
        let now = self.real_now();
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT case_id FROM cases WHERE state IN ('locking', 'one_sided') AND next_attempt_at <= $1
             ORDER BY next_attempt_at LIMIT 200",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        for id in &ids {
            if let Err(e) = self.drive_case(id).await {
                tracing::warn!(case = %id, error = %e, "driving a loss case failed");
            }
        }
        Ok(ids.len())
    }

    /// R27: an unlock. The side follows the channel: the bureau unlocks the social side (the registry
    /// applies its rules), a branch of the card's bank the financial side (the bank's rules, here).
    pub async fn unlock(&self, req: pb::UnlockRequest) -> Result<pb::UnlockResponse, ApiError> {
        const OP: &str = "Unlock";
        let key = key_of(&req.idempotency_key)?;
        let hash = hash_of(OP, &req);
        self.once(&key, OP, &hash, || self.unlock_once(req, OP, key.clone(), hash.clone())).await
    }

    async fn unlock_once(
        &self,
        req: pb::UnlockRequest,
        op: &str,
        key: String,
        hash: Vec<u8>,
    ) -> Result<pb::UnlockResponse, ApiError> {
        if let Some(stored) = stored_answer(&self.pool, &key, op, &hash).await? {
            return Ok(stored);
        }
        let actor = req
            .actor
            .clone()
            .ok_or_else(|| invalid("actor", "ACTOR_REQUIRED", "say who unlocks and through which channel"))?;
        let ctx = socialcard_registry_context(&actor, req.documents.as_ref())?;
        let side = unlock_side(ctx.channel)?;
        if side == Side::Social
            && let Some(case) = self.unlocked_by(&key).await?
            && (req.case_id.trim().is_empty() || req.case_id.trim() == case.case_id)
            && (req.card_id.trim().is_empty() || req.card_id.trim() == case.card_id)
        {
            // This very call's registry unlock committed, and its answer was lost (the coordinator died, or
            // the reply did): the registry's event released the case's social side. Answer as it would have.
            let response = pb::UnlockResponse { loss_case: Some(case.to_pb()) };
            let mut tx = self.writer.begin().await.map_err(db)?;
            store_answer(&mut tx, &key, op, &hash, &response, self.now()).await?;
            tx.commit().await.map_err(db)?;
            return Ok(response);
        }
        let before = match (req.case_id.trim(), req.card_id.trim()) {
            (id, "") if !id.is_empty() => self.load_case(id).await?.ok_or_else(|| not_found("loss case"))?,
            ("", card) if !card.is_empty() => self.open_case_of(card).await?.ok_or_else(|| {
                ApiError::Rejected(Rejection::new(
                    RejectionKind::FailedPrecondition,
                    "NO_OPEN_CASE",
                    "the card has no open loss case",
                ))
            })?,
            _ => {
                return Err(invalid(
                    "case_id",
                    "CASE_REQUIRED",
                    "name the case, or the card whose open case is meant (one of them)",
                ));
            }
        };
        if before.state().is_closed() {
            return Err(ApiError::Rejected(Rejection::precondition(
                "CASE_CLOSED",
                format!("the case is {}", before.state().as_str()),
            )));
        }
        let mut case = before.clone();
        match side {
            Side::Social => {
                if before.pin_lock {
                    return Err(ApiError::Rejected(Rejection::precondition(
                        "PIN_RESET_REQUIRED",
                        "a PIN lock ends with a PIN reset at a bureau window (R30)",
                    )));
                }
                if before.sides.social_released.is_some() {
                    return Err(ApiError::Rejected(Rejection::precondition(
                        "SIDE_ALREADY_UNLOCKED",
                        "the social side is already unlocked",
                    )));
                }
                let mut call = Request::new(reg::UnlockSocialFunctionRequest {
                    idempotency_key: format!("unlock:{key}:social"),
                    card_id: before.card_id.clone(),
                    actor: Some(actor.clone()),
                    documents: req.documents,
                });
                call.set_timeout(self.config.call_timeout);
                socialcard_telemetry::inject(&mut call);
                self.registry.clone().unlock_social_function(call).await.map_err(|s| passed_through(&s))?;
                case.sides.social_released = Some(Release::Unlocked);
            }
            Side::Financial => {
                if !before.sides.freezes_financial {
                    return Err(ApiError::Rejected(Rejection::precondition(
                        "NOT_FROZEN",
                        "this case did not freeze the financial function",
                    )));
                }
                if before.sides.financial_released.is_some() {
                    return Err(ApiError::Rejected(Rejection::precondition(
                        "SIDE_ALREADY_UNLOCKED",
                        "the financial side is already unlocked",
                    )));
                }
                let card = self.get_card(reg::get_card_request::Lookup::CardId(before.card_id.clone())).await?;
                financial_unlock_allowed(before.kind, &ctx, !card.replaced_by_card_id.is_empty())?;
                if before.sides.financial_frozen {
                    let adapter = self.adapters.get(&before.bank_code).ok_or_else(|| {
                        ApiError::Unavailable(format!("no adapter is configured for bank {}", before.bank_code))
                    })?;
                    let mut call = Request::new(bank::UnfreezeFinancialRequest {
                        idempotency_key: format!("unlock:{key}:financial"),
                        card_id: before.card_id.clone(),
                        case_id: before.case_id.clone(),
                        reason: bank::UnfreezeReason::Unlocked as i32,
                        teller_id: actor.operator_id.clone(),
                        branch_id: actor.site_id.clone(),
                    });
                    call.set_timeout(self.config.call_timeout);
                    socialcard_telemetry::inject(&mut call);
                    adapter.clone().unfreeze_financial(call).await.map_err(|s| passed_through(&s))?;
                }
                case.sides.financial_released = Some(Release::Unlocked);
            }
        }
        let release = match side {
            Side::Social => case.sides.social_released,
            Side::Financial => case.sides.financial_released,
        };
        let now = self.now();
        let (mut before, mut case) = (before, case);
        // The registry's event of this very unlock may be recorded first by the consumer: then the case
        // is read again and the release applied to what is stored.
        let response = loop {
            let mut tx = self.writer.begin().await.map_err(db)?;
            if case.update(&mut tx, &before, now).await? {
                self.settle_case_timers(&mut tx, &case, now).await?;
                let response = pb::UnlockResponse { loss_case: Some(case.to_pb()) };
                store_answer(&mut tx, &key, op, &hash, &response, now).await?;
                tx.commit().await.map_err(db)?;
                break response;
            }
            drop(tx);
            before = self.load_case(&case.case_id).await?.ok_or_else(|| not_found("loss case"))?;
            case = before.clone();
            match side {
                Side::Social if case.sides.social_released.is_none() => case.sides.social_released = release,
                Side::Financial if case.sides.financial_released.is_none() => case.sides.financial_released = release,
                _ => {}
            }
        };
        tracing::info!(case = %case.case_id, side = ?side, state = case.state().as_str(), "loss case side unlocked");
        Ok(response)
    }

    pub async fn get_case(&self, req: pb::GetCaseRequest) -> Result<pb::GetCaseResponse, ApiError> {
        if req.case_id.trim().is_empty() {
            return Err(invalid("case_id", "CASE_REQUIRED", "name the case"));
        }
        let case = self.load_case(req.case_id.trim()).await?.ok_or_else(|| not_found("loss case"))?;
        Ok(pb::GetCaseResponse { loss_case: Some(case.to_pb()) })
    }

    /// Cases newest first, filtered by state, card or one-sidedness; pages by an opaque token.
    pub async fn list_cases(&self, req: pb::ListCasesRequest) -> Result<pb::ListCasesResponse, ApiError> {
        let page = match req.page_size {
            0 => 100,
            n if n > 1000 => return Err(invalid("page_size", "PAGE_TOO_LARGE", "at most 1000 cases per page")),
            n => i64::from(n),
        };
        let state = match pb::CaseState::try_from(req.state) {
            Ok(pb::CaseState::Unspecified) => None,
            Ok(s) => Some(match s {
                pb::CaseState::Locking => "locking",
                pb::CaseState::Locked => "locked",
                pb::CaseState::OneSided => "one_sided",
                pb::CaseState::Unlocking => "unlocking",
                pb::CaseState::Unlocked => "unlocked",
                pb::CaseState::Expired => "expired",
                pb::CaseState::Replaced => "replaced",
                pb::CaseState::Rejected | pb::CaseState::Unspecified => "rejected",
            }),
            Err(_) => {
                return Err(invalid("state", "UNKNOWN_ENUM_VALUE", "state has a value this service does not know"));
            }
        };
        let state = if req.one_sided_only { Some("one_sided") } else { state };
        let before: i64 = if req.page_token.is_empty() {
            i64::MAX
        } else {
            req.page_token
                .parse()
                .map_err(|_| invalid("page_token", "PAGE_TOKEN_FORMAT", "use the token of the previous page"))?
        };
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CASE_COLUMNS} FROM cases
             WHERE ($1 IS NULL OR state = $1) AND ($2 = '' OR card_id = $2) AND opened_at < $3
             ORDER BY opened_at DESC LIMIT $4"
        )))
        .bind(state)
        .bind(req.card_id.trim())
        .bind(before)
        .bind(page + 1)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let mut cases = rows.iter().map(CaseRow::from_row).collect::<Result<Vec<_>, _>>()?;
        let next = if cases.len() > usize::try_from(page).unwrap_or(usize::MAX) {
            cases.truncate(usize::try_from(page).unwrap_or(usize::MAX));
            cases.last().map(|c| c.opened_at.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(pb::ListCasesResponse { cases: cases.iter().map(CaseRow::to_pb).collect(), next_page_token: next })
    }
}

/// The caller's actor and documents as the domain's context (the same conversion the registry uses).
fn socialcard_registry_context(
    actor: &reg::Actor,
    documents: Option<&reg::Documents>,
) -> Result<socialcard_domain::channel::Context, ApiError> {
    socialcard_registry::convert::context(Some(actor), documents).map_err(ApiError::from)
}
