//! What the coordinator consumes: the registry's card events (topic `socialcard.card.v1`).
//!
//! - `CardCollected` starts the deadlines that run from collection (R22, R23, R24).
//! - `SocialLossLocked` that the coordinator did not finish recording (a crash between the registry's
//!   answer and the case's insert), or that was made straight at the registry, opens the case that freezes
//!   the financial side too: a loss anywhere locks everywhere.
//! - `SocialUnlocked`, `SocialPinLocked`/`SocialPinReset` (R30) and `CardReplaced` (R28) keep cases in
//!   step with the registry; `FinancialActivationRecorded` and the card's end settle its timers.
//!
//! Each event is applied with its inbox row in one transaction, so a redelivery changes nothing.

use async_trait::async_trait;
use prost::Message;
use socialcard_domain::LossKind;
use socialcard_domain::loss::{CaseSides, CaseState, Release};
use socialcard_events::{Applied, Envelope, Handler, HandlerError, unix_micros};
use socialcard_proto::events::v1 as ev;
use socialcard_proto::registry::v1 as reg;
use socialcard_server::ApiError;

use crate::Coordinator;
use crate::store::CaseRow;
use crate::timers::{TimerKind, schedule, settle};

#[derive(Clone, Debug)]
pub struct CardEvents {
    coordinator: Coordinator,
}

impl CardEvents {
    pub fn new(coordinator: Coordinator) -> Self {
        Self { coordinator }
    }
}

/// A refusal is permanent, except a lost race (`Aborted`: the case or card changed meanwhile, e.g. under
/// the coordinator's own call or timer), which the next try decides again.
fn transient(e: ApiError) -> HandlerError {
    match e {
        ApiError::Rejected(r) if r.kind == socialcard_domain::RejectionKind::Aborted => {
            HandlerError::Transient(r.to_string())
        }
        ApiError::Rejected(r) => HandlerError::Permanent(r.to_string()),
        other => HandlerError::Transient(other.to_string()),
    }
}

fn micros_of(t: Option<&prost_types::Timestamp>) -> Option<i64> {
    t.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t.seconds).ok()).map(unix_micros)
}

/// The report key a coordinator-made social lock carries (`loss:<report key>:social`), if this is one.
fn own_report_key(idempotency_key: &str) -> Option<&str> {
    idempotency_key.strip_prefix("loss:")?.strip_suffix(":social")
}

/// The Unlock key a coordinator-made social unlock carries (`unlock:<unlock key>:social`), if this is one.
fn own_unlock_key(idempotency_key: &str) -> Option<&str> {
    idempotency_key.strip_prefix("unlock:")?.strip_suffix(":social")
}

#[async_trait]
impl Handler for CardEvents {
    /// Events of different cards at once (each card's in order), as concurrent reports and unlocks
    /// already run: one card's registry lookup no longer waits behind another's commit.
    fn concurrency(&self) -> usize {
        16
    }

    async fn handle(&self, event: &Envelope) -> Result<Applied, HandlerError> {
        let e = ev::CardEvent::decode(event.payload.as_slice()).map_err(|e| HandlerError::Permanent(e.to_string()))?;
        let Some(kind) = e.kind.clone() else { return Ok(Applied::Duplicate) };
        // Most card events are none of the coordinator's business (an employer batch's import alone
        // writes three per card): they are passed over here, without a read, an inbox row or a commit.
        if !concerns(&kind) {
            return Ok(Applied::Duplicate);
        }
        let c = &self.coordinator;
        // Network lookups happen before the transaction (a loss lock made elsewhere needs the card's bank).
        let card = match &kind {
            ev::card_event::Kind::SocialLossLocked(l)
                if l.loss_kind != reg::LossKind::Automatic as i32
                    && own_report_key(&e.idempotency_key).is_none_or(|k| !k.starts_with("timer:")) =>
            {
                Some(c.get_card(reg::get_card_request::Lookup::CardId(e.card_id.clone())).await.map_err(transient)?)
            }
            _ => None,
        };
        let mut open = c.open_case_of(&e.card_id).await.map_err(transient)?;
        // A written lock on a card whose open case is temporary (or automatic): the coordinator's own
        // upgrade may not have been recorded yet (or the upgrade was made at the registry): record it.
        if let ev::card_event::Kind::SocialLossLocked(l) = &kind
            && l.loss_kind == reg::LossKind::Written as i32
            && let Some(case) = open.as_ref()
        {
            let report_key =
                own_report_key(&e.idempotency_key).map_or_else(|| format!("event:{}", event.id), str::to_string);
            if case.kind != LossKind::Written && case.lock_key != report_key {
                let actor = e.actor.clone().unwrap_or_default();
                let upgraded = c
                    .upgrade_to_written(case.clone(), &report_key, actor, None, c.clock.now())
                    .await
                    .map_err(transient)?;
                open = Some(upgraded);
            }
        }
        let open_pin = c.open_pin_case_of(&e.card_id).await.map_err(transient)?;
        let now = c.clock.now();
        let mut tx = c.writer.begin().await.map_err(|e| HandlerError::Transient(e.to_string()))?;
        if !socialcard_events::inbox::record_sqlite(&mut tx, &event.id)
            .await
            .map_err(|e| HandlerError::Transient(e.to_string()))?
        {
            return Ok(Applied::Duplicate);
        }
        let result: Result<(), ApiError> = async {
            match kind {
                ev::card_event::Kind::CardCollected(collected) => {
                    let deadlines = [
                        (TimerKind::AutoLock, micros_of(collected.auto_lock_due_at.as_ref())),
                        (TimerKind::MinorExchange, micros_of(collected.minor_exchange_due_at.as_ref())),
                        (TimerKind::TemporaryCardExpiry, micros_of(collected.expires_at.as_ref())),
                    ];
                    for (kind, due) in deadlines {
                        if let Some(due) = due {
                            schedule(&mut tx, kind, &e.card_id, None, due).await?;
                        }
                    }
                }
                ev::card_event::Kind::FinancialActivationRecorded(_) => {
                    settle(&mut tx, &e.card_id, None, &[TimerKind::AutoLock], "financial function activated", now)
                        .await?;
                }
                ev::card_event::Kind::SocialLossLocked(l) if l.loss_kind != reg::LossKind::Automatic as i32 => {
                    let kind = if l.loss_kind == reg::LossKind::Written as i32 {
                        LossKind::Written
                    } else {
                        LossKind::Temporary
                    };
                    let report_key = own_report_key(&e.idempotency_key)
                        .map_or_else(|| format!("event:{}", event.id), str::to_string);
                    match (open, card) {
                        // The card's case exists (opened, or upgraded above, for this very lock).
                        (Some(_), _) => {}
                        (None, Some(card)) => {
                            let case = case_from_lock(&e, &card, kind, &report_key, c, now);
                            if case.insert(&mut tx, now, true).await? {
                                c.schedule_case_timers(&mut tx, &case).await?;
                                tracing::info!(case = %case.case_id, "loss case opened from a registry lock");
                            }
                        }
                        (None, None) => {}
                    }
                }
                ev::card_event::Kind::SocialUnlocked(_) => {
                    if let Some(before) = open.filter(|o| o.sides.social_locked && o.sides.social_released.is_none()) {
                        if let Some(unlock_key) = own_unlock_key(&e.idempotency_key) {
                            // The Unlock call that made it may not live to store its answer: its retry finds the case.
                            sqlx::query(
                                "INSERT INTO unlocked_by (unlock_key, case_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                            )
                            .bind(unlock_key)
                            .bind(&before.case_id)
                            .execute(&mut *tx)
                            .await
                            .map_err(crate::store::db)?;
                        }
                        let mut case = before.clone();
                        // A lapse made by the coordinator's own timer: that timer records its outcome.
                        let lapsed = e.idempotency_key.starts_with("timer:");
                        case.sides.social_released = Some(if lapsed { Release::Expired } else { Release::Unlocked });
                        case.update(&mut tx, &before, now).await?;
                        if !lapsed {
                            c.settle_case_timers(&mut tx, &case, now).await?;
                        }
                    }
                }
                ev::card_event::Kind::SocialPinLocked(_) if open_pin.is_none() => {
                    pin_case(&e, &event.id, now).insert(&mut tx, now, true).await?;
                }
                ev::card_event::Kind::SocialPinReset(_) => {
                    if let Some(before) = open_pin {
                        let mut case = before.clone();
                        case.sides.social_released = Some(Release::Unlocked);
                        case.update(&mut tx, &before, now).await?;
                    }
                }
                ev::card_event::Kind::CardReplaced(_) => {
                    for before in [open, open_pin].into_iter().flatten() {
                        let mut case = before.clone();
                        case.closed_as = Some(CaseState::Replaced);
                        case.update(&mut tx, &before, now).await?;
                    }
                    settle(&mut tx, &e.card_id, None, ALL_TIMERS, "card replaced", now).await?;
                }
                ev::card_event::Kind::CardCancelled(_) | ev::card_event::Kind::TemporaryCardExpired(_) => {
                    // An expiry made by the coordinator's own R24 timer: that timer records its outcome.
                    let others: Vec<TimerKind> = ALL_TIMERS
                        .iter()
                        .copied()
                        .filter(|k| *k != TimerKind::TemporaryCardExpiry || !e.idempotency_key.starts_with("timer:"))
                        .collect();
                    settle(&mut tx, &e.card_id, None, &others, "card ended", now).await?;
                }
                // Kinds `concerns` passes over never get here; an arm above whose guard failed does.
                _ => {}
            }
            Ok(())
        }
        .await;
        result.map_err(transient)?;
        tx.commit().await.map_err(|e| HandlerError::Transient(e.to_string()))?;
        Ok(Applied::Applied)
    }
}

/// Whether the coordinator acts on a card event of this kind: the arms of [`CardEvents::handle`]'s
/// match that do something. Every other event is passed over before any read or write.
fn concerns(kind: &ev::card_event::Kind) -> bool {
    use ev::card_event::Kind;
    match kind {
        Kind::SocialLossLocked(l) => l.loss_kind != reg::LossKind::Automatic as i32,
        Kind::CardCollected(_)
        | Kind::FinancialActivationRecorded(_)
        | Kind::SocialUnlocked(_)
        | Kind::SocialPinLocked(_)
        | Kind::SocialPinReset(_)
        | Kind::CardReplaced(_)
        | Kind::CardCancelled(_)
        | Kind::TemporaryCardExpired(_) => true,
        Kind::ApplicationSubmitted(_)
        | Kind::ApplicationApproved(_)
        | Kind::ApplicationRejected(_)
        | Kind::ProductionStarted(_)
        | Kind::CardProduced(_)
        | Kind::ProductionFailed(_)
        | Kind::ShipmentProgressed(_)
        | Kind::ReturnedForRemake(_)
        | Kind::SocialActivated(_)
        | Kind::SocialPinChanged(_)
        | Kind::FinancialActivationCancelled(_)
        | Kind::SocialDisabled(_)
        | Kind::FinancialFreezeRecorded(_) => false,
    }
}

const ALL_TIMERS: &[TimerKind] = &[
    TimerKind::AutoLock,
    TimerKind::MinorExchange,
    TimerKind::TemporaryCardExpiry,
    TimerKind::FinancialLossExpiry,
    TimerKind::SocialLossExpiry,
];

fn case_from_lock(
    e: &ev::CardEvent,
    card: &reg::Card,
    kind: LossKind,
    report_key: &str,
    c: &Coordinator,
    now: time::OffsetDateTime,
) -> CaseRow {
    let actor = e.actor.clone().unwrap_or_default();
    let days = |d: Option<u32>| {
        d.filter(|_| kind == LossKind::Temporary).map(|d| unix_micros(now + time::Duration::days(i64::from(d))))
    };
    CaseRow {
        case_id: uuid::Uuid::now_v7().to_string(),
        report_key: report_key.to_string(),
        lock_key: report_key.to_string(),
        request_hash: None,
        card_id: card.card_id.clone(),
        card_number: card.card_number.clone(),
        bank_code: card.bank_code.clone(),
        kind,
        channel: actor.channel,
        actor,
        documents: None,
        sides: CaseSides {
            freezes_financial: true,
            social_locked: true,
            financial_frozen: false,
            social_released: None,
            financial_released: None,
        },
        pin_lock: false,
        closed_as: None,
        last_error: None,
        opened_at: unix_micros(now),
        expires_at: days(c.config.banks.get(&card.bank_code).map(|b| b.policy.temporary_loss_expiry_days)),
        social_expires_at: days(c.config.policy.temporary_loss_expiry_days_social),
        closed_at: None,
        attempts: 0,
        next_attempt_at: 0,
        version: 0,
    }
}

fn pin_case(e: &ev::CardEvent, event_id: &str, now: time::OffsetDateTime) -> CaseRow {
    let actor = e.actor.clone().unwrap_or_default();
    CaseRow {
        case_id: uuid::Uuid::now_v7().to_string(),
        report_key: format!("event:{event_id}"),
        lock_key: format!("event:{event_id}"),
        request_hash: None,
        card_id: e.card_id.clone(),
        card_number: String::new(),
        bank_code: String::new(),
        kind: LossKind::Temporary,
        channel: actor.channel,
        actor,
        documents: None,
        sides: CaseSides {
            freezes_financial: false,
            social_locked: true,
            financial_frozen: false,
            social_released: None,
            financial_released: None,
        },
        pin_lock: true,
        closed_as: None,
        last_error: None,
        opened_at: unix_micros(now),
        expires_at: None,
        social_expires_at: None,
        closed_at: None,
        attempts: 0,
        next_attempt_at: 0,
        version: 0,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use prost::Message;
    use socialcard_domain::{BankDirectory, CityPolicy};
    use socialcard_events::{Applied, Envelope, Handler};
    use socialcard_proto::events::v1 as ev;
    use socialcard_proto::registry::v1 as reg;
    use socialcard_server::SystemClock;

    use super::CardEvents;
    use crate::{Coordinator, CoordinatorConfig};

    fn envelope(kind: ev::card_event::Kind) -> Envelope {
        let event = ev::CardEvent { card_id: "card-1".into(), kind: Some(kind), ..Default::default() };
        Envelope {
            id: uuid::Uuid::now_v7().to_string(),
            event_type: "socialcard.card.v1.test".into(),
            source: "registry".into(),
            subject: "card-1".into(),
            time: time::OffsetDateTime::now_utc(),
            traceparent: None,
            topic: socialcard_events::topics::CARD.into(),
            payload: event.encode_to_vec(),
        }
    }

    /// A lost race is tried again; any other refusal dead-letters the event at once.
    #[test]
    fn only_a_lost_race_is_tried_again() {
        use socialcard_domain::{Rejection, RejectionKind};
        use socialcard_events::HandlerError;
        use socialcard_server::ApiError;
        let refused = |kind| super::transient(ApiError::Rejected(Rejection::new(kind, "REASON", "m")));
        assert!(matches!(refused(RejectionKind::Aborted), HandlerError::Transient(_)));
        assert!(matches!(refused(RejectionKind::FailedPrecondition), HandlerError::Permanent(_)));
        assert!(matches!(refused(RejectionKind::NotFound), HandlerError::Permanent(_)));
        assert!(matches!(super::transient(ApiError::Unavailable("down".into())), HandlerError::Transient(_)));
    }

    /// The card events the coordinator has no part in (an import writes three per card) leave its
    /// database as it was; one it acts on is applied with its inbox row.
    #[tokio::test]
    async fn events_of_no_concern_are_passed_over_without_a_write() {
        let dir = std::env::temp_dir().join(format!("socialcard-lc-events-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        // Neither the registry nor a bank is called for these events.
        let unused = tonic::transport::Channel::from_static("http://127.0.0.1:9").connect_lazy();
        let coordinator = Coordinator::open(
            &dir.join("coordinator.db"),
            unused,
            Vec::new(),
            Arc::new(SystemClock),
            CoordinatorConfig::new(CityPolicy::shanghai(), BankDirectory::shanghai()),
        )
        .await
        .unwrap();
        let handler = CardEvents::new(coordinator.clone());
        let inbox = || async {
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM inbox").fetch_one(&coordinator.pool).await.unwrap()
        };
        use ev::card_event::Kind;
        let passed_over = [
            Kind::ApplicationSubmitted(ev::ApplicationSubmitted::default()),
            Kind::ApplicationApproved(ev::ApplicationApproved::default()),
            Kind::ProductionStarted(ev::ProductionStarted::default()),
            Kind::CardProduced(ev::CardProduced::default()),
            Kind::SocialActivated(ev::SocialActivated::default()),
            Kind::SocialLossLocked(ev::SocialLossLocked { loss_kind: reg::LossKind::Automatic as i32 }),
        ];
        for kind in passed_over {
            let outcome = handler.handle(&envelope(kind.clone())).await.unwrap();
            assert_eq!(outcome, Applied::Duplicate, "{kind:?}");
        }
        assert_eq!(inbox().await, 0, "no inbox row for an event of no concern");

        let activated = envelope(Kind::FinancialActivationRecorded(ev::FinancialActivationRecorded::default()));
        assert_eq!(handler.handle(&activated).await.unwrap(), Applied::Applied);
        assert_eq!(handler.handle(&activated).await.unwrap(), Applied::Duplicate, "redelivered");
        assert_eq!(inbox().await, 1, "an event acted on commits with its inbox row");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
