//! Durable deadlines. A timer is a row: scheduled from the registry's events (R22, R23, R24 start at
//! collection) or by a case (a temporary loss lapsing per side, R27), fired by the background loop once
//! the clock passes its due time, retried with backoff while the other service cannot be reached, and
//! closed with an outcome. The registry re-checks every date, so a timer that fires for a card whose
//! situation changed (activated, exchanged, replaced) ends as moot and changes nothing.

use socialcard_domain::LossKind;
use socialcard_domain::loss::{CaseSides, CaseState, Release};
use socialcard_events::{from_unix_micros, unix_micros};
use socialcard_proto::bank::v1 as bank;
use socialcard_proto::loss::v1 as pb;
use socialcard_proto::registry::v1 as reg;
use socialcard_server::ApiError;
use socialcard_server::error::reason_of;
use sqlx::{Row, SqliteConnection};
use time::OffsetDateTime;
use tonic::Request;

use crate::Coordinator;
use crate::cases::{SideError, side_error};
use crate::store::{CaseRow, db};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TimerKind {
    AutoLock,
    MinorExchange,
    TemporaryCardExpiry,
    FinancialLossExpiry,
    SocialLossExpiry,
}

impl TimerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TimerKind::AutoLock => "auto_lock",
            TimerKind::MinorExchange => "minor_exchange",
            TimerKind::TemporaryCardExpiry => "temporary_card_expiry",
            TimerKind::FinancialLossExpiry => "financial_loss_expiry",
            TimerKind::SocialLossExpiry => "social_loss_expiry",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "auto_lock" => TimerKind::AutoLock,
            "minor_exchange" => TimerKind::MinorExchange,
            "temporary_card_expiry" => TimerKind::TemporaryCardExpiry,
            "financial_loss_expiry" => TimerKind::FinancialLossExpiry,
            "social_loss_expiry" => TimerKind::SocialLossExpiry,
            _ => return None,
        })
    }

    fn to_pb(self) -> pb::TimerKind {
        match self {
            TimerKind::AutoLock => pb::TimerKind::AutoLock,
            TimerKind::MinorExchange => pb::TimerKind::MinorExchange,
            TimerKind::TemporaryCardExpiry => pb::TimerKind::TemporaryCardExpiry,
            TimerKind::FinancialLossExpiry => pb::TimerKind::FinancialLossExpiry,
            TimerKind::SocialLossExpiry => pb::TimerKind::SocialLossExpiry,
        }
    }
}

#[derive(Clone, Debug)]
struct TimerRow {
    timer_id: String,
    kind: TimerKind,
    card_id: String,
    case_id: Option<String>,
    due_at: i64,
    attempts: i64,
}

/// How firing a timer ended.
enum Fired {
    /// The deadline was enforced.
    Done(String),
    /// Nothing to do any more (the card's situation changed): the reason.
    Moot(String),
}

fn scheduler() -> reg::Actor {
    reg::Actor {
        channel: reg::Channel::Scheduler as i32,
        operator_id: "loss-coordinator".into(),
        site_id: "timers".into(),
        ..Default::default()
    }
}

fn ts(us: i64) -> Option<prost_types::Timestamp> {
    from_unix_micros(us).map(|t| prost_types::Timestamp { seconds: t.unix_timestamp(), nanos: 0 })
}

/// Schedules (or moves) a timer; one that already fired stays fired unless its due time changed (a card
/// collected again after a remake starts its deadlines again).
pub(crate) async fn schedule(
    tx: &mut SqliteConnection,
    kind: TimerKind,
    card_id: &str,
    case_id: Option<&str>,
    due_at: i64,
) -> Result<(), ApiError> {
    let timer_id = match case_id {
        Some(case) => format!("{}:{case}", kind.as_str()),
        None => format!("{}:{card_id}", kind.as_str()),
    };
    sqlx::query(
        "INSERT INTO timers (timer_id, kind, card_id, case_id, due_at, fired_at, outcome, attempts, next_attempt_at)
         VALUES ($1, $2, $3, $4, $5, NULL, NULL, 0, 0)
         ON CONFLICT (timer_id) DO UPDATE SET due_at = excluded.due_at, next_attempt_at = 0,
             fired_at = NULL, outcome = NULL, attempts = 0
         WHERE timers.due_at <> excluded.due_at",
    )
    .bind(&timer_id)
    .bind(kind.as_str())
    .bind(card_id)
    .bind(case_id)
    .bind(due_at)
    .execute(tx)
    .await
    .map_err(db)?;
    Ok(())
}

/// Closes the card's (or the case's) pending timers of the given kinds as moot.
pub(crate) async fn settle(
    tx: &mut SqliteConnection,
    card_id: &str,
    case_id: Option<&str>,
    kinds: &[TimerKind],
    why: &str,
    now: OffsetDateTime,
) -> Result<(), ApiError> {
    for kind in kinds {
        sqlx::query(
            "UPDATE timers SET fired_at = $4, outcome = $5
             WHERE card_id = $1 AND kind = $2 AND ($3 IS NULL OR case_id = $3) AND fired_at IS NULL",
        )
        .bind(card_id)
        .bind(kind.as_str())
        .bind(case_id)
        .bind(unix_micros(now))
        .bind(format!("moot: {why}"))
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    }
    Ok(())
}

impl Coordinator {
    /// A temporary loss lapses per side (R27): the bank's days on the financial side, the city's (where
    /// set) on the social side.
    pub(crate) async fn schedule_case_timers(&self, tx: &mut SqliteConnection, case: &CaseRow) -> Result<(), ApiError> {
        if case.kind != LossKind::Temporary {
            return Ok(());
        }
        if let Some(at) = case.expires_at {
            schedule(tx, TimerKind::FinancialLossExpiry, &case.card_id, Some(&case.case_id), at).await?;
        }
        if let Some(at) = case.social_expires_at {
            schedule(tx, TimerKind::SocialLossExpiry, &case.card_id, Some(&case.case_id), at).await?;
        }
        Ok(())
    }

    /// After an unlock: a side released by hand no longer lapses.
    pub(crate) async fn settle_case_timers(
        &self,
        tx: &mut SqliteConnection,
        case: &CaseRow,
        now: OffsetDateTime,
    ) -> Result<(), ApiError> {
        if case.sides.social_released.is_some() || case.state().is_closed() {
            settle(tx, &case.card_id, Some(&case.case_id), &[TimerKind::SocialLossExpiry], "unlocked", now).await?;
        }
        if case.sides.financial_released.is_some() || case.state().is_closed() {
            settle(tx, &case.card_id, Some(&case.case_id), &[TimerKind::FinancialLossExpiry], "unlocked", now).await?;
        }
        Ok(())
    }

    /// Fires every timer that is due (and not waiting for a retry). Returns how many it tried.
    pub async fn fire_due_timers(&self) -> Result<usize, ApiError> {
        let now = self.clock.now();
        let rows = sqlx::query(
            "SELECT timer_id, kind, card_id, case_id, due_at, attempts FROM timers
             WHERE fired_at IS NULL AND due_at <= $1 AND next_attempt_at <= $2 ORDER BY due_at LIMIT 200",
        )
        .bind(unix_micros(now))
        .bind(self.real_now())
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let mut tried = 0;
        for r in rows {
            let kind: String = r.try_get("kind").map_err(db)?;
            let Some(kind) = TimerKind::parse(&kind) else { continue };
            let timer = TimerRow {
                timer_id: r.try_get("timer_id").map_err(db)?,
                kind,
                card_id: r.try_get("card_id").map_err(db)?,
                case_id: r.try_get("case_id").map_err(db)?,
                due_at: r.try_get("due_at").map_err(db)?,
                attempts: r.try_get("attempts").map_err(db)?,
            };
            tried += 1;
            if let Err(e) = self.fire(&timer).await {
                tracing::warn!(timer = %timer.timer_id, error = %e, "timer failed; retrying later");
                let attempts = timer.attempts + 1;
                let next = self.retry_at(attempts);
                sqlx::query("UPDATE timers SET attempts = $2, next_attempt_at = $3 WHERE timer_id = $1")
                    .bind(&timer.timer_id)
                    .bind(attempts)
                    .bind(next)
                    .execute(&self.writer)
                    .await
                    .map_err(db)?;
            }
        }
        Ok(tried)
    }

    /// Fires one timer: the call to the other service (under a key derived from the timer and its due
    /// time, so a refire after a crash is a replay), then the outcome and any case change in one
    /// transaction. An error leaves the timer pending.
    async fn fire(&self, timer: &TimerRow) -> Result<(), ApiError> {
        let key = format!("timer:{}:{}", timer.timer_id, timer.due_at);
        let outcome = match timer.kind {
            TimerKind::AutoLock => self.fire_auto_lock(timer, &key).await?,
            TimerKind::MinorExchange | TimerKind::TemporaryCardExpiry => {
                let deadline = if timer.kind == TimerKind::MinorExchange {
                    reg::Deadline::MinorExchange
                } else {
                    reg::Deadline::TemporaryCardExpiry
                };
                self.enforce(timer, &key, deadline, None).await?
            }
            TimerKind::FinancialLossExpiry | TimerKind::SocialLossExpiry => self.fire_loss_expiry(timer, &key).await?,
        };
        let (text, done) = match &outcome {
            Fired::Done(t) => (t.clone(), true),
            Fired::Moot(why) => (format!("moot: {why}"), false),
        };
        sqlx::query("UPDATE timers SET fired_at = $2, outcome = $3 WHERE timer_id = $1 AND fired_at IS NULL")
            .bind(&timer.timer_id)
            .bind(unix_micros(self.clock.now()))
            .bind(&text)
            .execute(&self.writer)
            .await
            .map_err(db)?;
        tracing::info!(timer = %timer.timer_id, kind = timer.kind.as_str(), enforced = done, outcome = %text, "timer fired");
        Ok(())
    }

    /// R22: the social function is loss-locked; the case needs no freeze (the financial function was
    /// never activated) and ends with a financial activation plus a bureau unlock.
    async fn fire_auto_lock(&self, timer: &TimerRow, key: &str) -> Result<Fired, ApiError> {
        let card = self.get_card(reg::get_card_request::Lookup::CardId(timer.card_id.clone())).await?;
        if card.financial_state != reg::FinancialState::NotActivated as i32 {
            return Ok(Fired::Moot("the financial function was activated".into()));
        }
        let mut call = Request::new(reg::LockSocialFunctionRequest {
            idempotency_key: format!("loss:{key}:social"),
            card_id: timer.card_id.clone(),
            actor: Some(scheduler()),
            documents: None,
            loss_kind: reg::LossKind::Automatic as i32,
        });
        call.set_timeout(self.config.call_timeout);
        socialcard_telemetry::inject(&mut call);
        match self.registry.clone().lock_social_function(call).await.map_err(side_error) {
            Ok(_) => {}
            Err(SideError::Refused(s)) if reason_of(&s).as_deref() == Some("DEADLINE_NOT_REACHED") => {
                return Err(ApiError::Unavailable("the registry's clock has not reached the deadline yet".into()));
            }
            Err(SideError::Refused(s)) => return Ok(Fired::Moot(reason_of(&s).unwrap_or_else(|| s.message().into()))),
            Err(SideError::Transient(e)) => return Err(ApiError::Unavailable(e)),
        }
        let now = self.clock.now();
        let case = CaseRow {
            case_id: uuid::Uuid::now_v7().to_string(),
            report_key: key.to_string(),
            lock_key: key.to_string(),
            request_hash: None,
            card_id: card.card_id.clone(),
            card_number: card.card_number.clone(),
            bank_code: card.bank_code.clone(),
            kind: LossKind::Automatic,
            channel: reg::Channel::Scheduler as i32,
            actor: scheduler(),
            documents: None,
            sides: CaseSides {
                freezes_financial: false,
                social_locked: true,
                financial_frozen: false,
                social_released: None,
                financial_released: None,
            },
            pin_lock: false,
            closed_as: None,
            last_error: None,
            opened_at: unix_micros(now),
            expires_at: None,
            social_expires_at: None,
            closed_at: None,
            attempts: 0,
            next_attempt_at: self.real_now(),
            version: 0,
        };
        let mut tx = self.writer.begin().await.map_err(db)?;
        case.insert(&mut tx, now, true).await?;
        tx.commit().await.map_err(db)?;
        Ok(Fired::Done("social function loss-locked (R22)".into()))
    }

    async fn enforce(
        &self,
        timer: &TimerRow,
        key: &str,
        deadline: reg::Deadline,
        since: Option<i64>,
    ) -> Result<Fired, ApiError> {
        let mut call = Request::new(reg::EnforceDeadlineRequest {
            idempotency_key: key.to_string(),
            card_id: timer.card_id.clone(),
            actor: Some(scheduler()),
            deadline: deadline as i32,
            since: since.and_then(ts),
        });
        call.set_timeout(self.config.call_timeout);
        socialcard_telemetry::inject(&mut call);
        match self.registry.clone().enforce_deadline(call).await.map_err(side_error) {
            Ok(_) => Ok(Fired::Done(match deadline {
                reg::Deadline::MinorExchange => "minor card disabled (R23)".into(),
                reg::Deadline::TemporaryCardExpiry => "temporary card expired (R24)".into(),
                _ => "temporary loss lapsed on the social side (R27)".into(),
            })),
            Err(SideError::Refused(s)) if reason_of(&s).as_deref() == Some("DEADLINE_NOT_REACHED") => {
                Err(ApiError::Unavailable("the registry's clock has not reached the deadline yet".into()))
            }
            Err(SideError::Refused(s)) => Ok(Fired::Moot(reason_of(&s).unwrap_or_else(|| s.message().into()))),
            Err(SideError::Transient(e)) => Err(ApiError::Unavailable(e)),
        }
    }

    /// R27: a temporary loss lapses on one side.
    async fn fire_loss_expiry(&self, timer: &TimerRow, key: &str) -> Result<Fired, ApiError> {
        let Some(case_id) = &timer.case_id else { return Ok(Fired::Moot("no case".into())) };
        let Some(before) = self.load_case(case_id).await? else { return Ok(Fired::Moot("no case".into())) };
        let financial = timer.kind == TimerKind::FinancialLossExpiry;
        let released = if financial { before.sides.financial_released } else { before.sides.social_released };
        if before.state().is_closed() || before.kind != LossKind::Temporary || released.is_some() {
            return Ok(Fired::Moot(format!("the case is {} ({})", before.state().as_str(), before.kind.as_str())));
        }
        let fired = if financial {
            if before.sides.financial_frozen {
                let adapter = self.adapters.get(&before.bank_code).ok_or_else(|| {
                    ApiError::Unavailable(format!("no adapter is configured for bank {}", before.bank_code))
                })?;
                let mut call = Request::new(bank::UnfreezeFinancialRequest {
                    idempotency_key: key.to_string(),
                    card_id: before.card_id.clone(),
                    case_id: before.case_id.clone(),
                    reason: bank::UnfreezeReason::Expired as i32,
                    teller_id: String::new(),
                    branch_id: String::new(),
                });
                call.set_timeout(self.config.call_timeout);
                socialcard_telemetry::inject(&mut call);
                match adapter.clone().unfreeze_financial(call).await.map_err(side_error) {
                    Ok(_) => Fired::Done("temporary loss lapsed on the financial side (R27)".into()),
                    Err(SideError::Refused(s)) => {
                        return Ok(Fired::Moot(reason_of(&s).unwrap_or_else(|| s.message().into())));
                    }
                    Err(SideError::Transient(e)) => return Err(ApiError::Unavailable(e)),
                }
            } else {
                // Never frozen (the adapter was out of reach): it lapses without a call.
                Fired::Done("temporary loss lapsed before the freeze took effect".into())
            }
        } else {
            match self.enforce(timer, key, reg::Deadline::TemporaryLossExpiry, Some(before.opened_at)).await? {
                Fired::Moot(why) => return Ok(Fired::Moot(why)),
                done => done,
            }
        };
        // The lapse is done; record it on the case. The registry's SocialUnlocked event for this very call
        // may have recorded it first (the case then changed under us): the lapse stays this timer's work.
        let mut before = before;
        for _ in 0..3 {
            let now = self.clock.now();
            let mut case = before.clone();
            if financial {
                case.sides.financial_released = Some(Release::Expired);
            } else {
                case.sides.social_released = Some(Release::Expired);
            }
            let mut tx = self.writer.begin().await.map_err(db)?;
            if case.update(&mut tx, &before, now).await? {
                tx.commit().await.map_err(db)?;
                if case.state() == CaseState::Expired {
                    tracing::info!(case = %case.case_id, "temporary loss lapsed on every side");
                }
                return Ok(fired);
            }
            drop(tx);
            before = match self.load_case(case_id).await? {
                Some(now) => now,
                None => return Ok(fired),
            };
            let released = if financial { before.sides.financial_released } else { before.sides.social_released };
            if released.is_some() || before.state().is_closed() {
                return Ok(fired);
            }
        }
        Err(ApiError::Unavailable("the case changed concurrently".into()))
    }

    /// Timers of a card, or all pending ones (`pending_only`), soonest first.
    pub async fn list_timers(&self, req: pb::ListTimersRequest) -> Result<pb::ListTimersResponse, ApiError> {
        let limit = match req.page_size {
            0 => 100,
            n if n > 1000 => {
                return Err(ApiError::Rejected(socialcard_domain::Rejection::invalid(
                    "page_size",
                    "PAGE_TOO_LARGE",
                    "at most 1000 timers per page",
                )));
            }
            n => i64::from(n),
        };
        let rows = sqlx::query(
            "SELECT timer_id, kind, card_id, case_id, due_at, fired_at, outcome, attempts FROM timers
             WHERE ($1 = '' OR card_id = $1) AND ($2 = 0 OR fired_at IS NULL) ORDER BY due_at LIMIT $3",
        )
        .bind(req.card_id.trim())
        .bind(i64::from(req.pending_only))
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let timers = rows
            .iter()
            .map(|r| {
                let kind: String = r.try_get("kind").map_err(db)?;
                Ok(pb::Timer {
                    timer_id: r.try_get("timer_id").map_err(db)?,
                    kind: TimerKind::parse(&kind).map_or(pb::TimerKind::Unspecified, TimerKind::to_pb) as i32,
                    card_id: r.try_get("card_id").map_err(db)?,
                    case_id: r.try_get::<Option<String>, _>("case_id").map_err(db)?.unwrap_or_default(),
                    due_at: ts(r.try_get("due_at").map_err(db)?),
                    fired_at: r.try_get::<Option<i64>, _>("fired_at").map_err(db)?.and_then(ts),
                    outcome: r.try_get::<Option<String>, _>("outcome").map_err(db)?.unwrap_or_default(),
                    attempts: u32::try_from(r.try_get::<i64, _>("attempts").map_err(db)?).unwrap_or(u32::MAX),
                })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        Ok(pb::ListTimersResponse { timers })
    }
}
