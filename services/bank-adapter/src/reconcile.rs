//! Daily reconciliation, the safety net behind the synchronous path (architecture: "daily reconciliation
//! files remain as the safety net that proves both sides agree").
//!
//! (a) [`BankAdapter::daily_file`] writes the day's activations, rollbacks, freezes and unfreezes as this
//! adapter recorded them (its outbox of `socialcard.financial.v1` events), in the bank's layout.
//! (b) [`BankAdapter::reconcile`] reads the bank core's own file of the same day and layout and checks
//! every card it names, and every card this adapter activated that day, against the adapter's records
//! and the registry (GetCard). Each mismatch has a kind and a repair; repairs run only when asked and
//! each uses an idempotency key derived from the bank, the day and the card, so a second run changes
//! nothing. The bank is the owner of the financial function (R3): its file is the reference for it.
//!
//! A malformed bank file is refused whole (INVALID_ARGUMENT, reason `RECONCILIATION_FILE_*`) before
//! anything is looked up or written.

pub mod file;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use prost::Message;
use socialcard_domain::RejectionKind;
use socialcard_domain::bank::ReconciliationLayout;
use socialcard_proto::bank::v1 as bank;
use socialcard_proto::bank::v1::bank_card_service_server::BankCardService;
use socialcard_proto::events::v1 as ev;
use socialcard_proto::registry::v1 as reg;
use socialcard_server::ApiError;
use socialcard_server::error::reason_of;
use sqlx::Row;
use time::{Date, OffsetDateTime};
use tonic::{Code, Request};

pub use file::{BUSINESS_OFFSET, DailyFile, DailyRecord, RecordKind, day_window};

use crate::{BankAdapter, db, micros, reject};

/// How long each registry call of a reconciliation run may take.
const REGISTRY_TIMEOUT: Duration = Duration::from_secs(10);

/// How a card's records disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MismatchKind {
    /// The bank's file names a card number the registry does not know.
    UnknownCard,
    /// The bank's file names a card of another bank (audited).
    OtherBankCard,
    /// The bank activated the card; this adapter has no active activation of it.
    ActivationMissingAtAdapter,
    /// The activation is recorded here but the registry has not switched the social function on.
    SocialNotOn,
    /// Financial function active, social function auto-locked (R22): the holder must go to a bureau point.
    SocialAwaitsBureauUnlock,
    /// This adapter (and the registry) hold an activation of that day the bank's file does not.
    ActivationMissingAtBank,
    /// The bank ended the day with the card frozen by a loss; the registry's financial function is not frozen.
    LossMissingAtAdapter,
    /// The bank ended the day with the card unlocked; the registry still has it frozen.
    UnlockMissingAtAdapter,
    /// This adapter froze the card that day; the bank's file has no loss for it.
    LossMissingAtBank,
    /// This adapter unfroze the card at a branch unlock that day; the bank's file has no unlock.
    UnlockMissingAtBank,
}

/// What reconciliation does (or would do) about one mismatch.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Repair {
    /// Would run with `--repair`.
    Proposed {
        action: String,
    },
    Done {
        action: String,
    },
    Failed {
        action: String,
        code: String,
        reason: String,
        message: String,
    },
    /// No automatic repair: what a person has to do.
    Manual {
        action: String,
    },
}

/// The registry's view of a card, as the report shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RegistryView {
    pub bank_code: String,
    pub social_state: String,
    pub financial_state: String,
}

/// One mismatch.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Mismatch {
    pub card_number: String,
    pub kind: MismatchKind,
    /// The bank's records of the card that day.
    pub bank_records: Vec<DailyRecord>,
    pub registry: Option<RegistryView>,
    pub repair: Repair,
}

/// A reconciliation run's result, serialized as the JSON report.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ReconciliationReport {
    pub bank_code: String,
    pub date: String,
    pub layout: ReconciliationLayout,
    pub bank_records: usize,
    pub cards_checked: usize,
    pub matched: usize,
    pub mismatches_by_kind: BTreeMap<MismatchKind, usize>,
    pub repair_requested: bool,
    pub repaired: usize,
    pub repair_failed: usize,
    pub manual: usize,
    pub mismatches: Vec<Mismatch>,
}

impl ReconciliationReport {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// The adapter's record of a card's activation.
#[derive(Debug)]
struct Activation {
    card_id: String,
    state: String,
    teller_id: String,
    branch_id: String,
    activated_at: i64,
}

/// The end of a card's day on one side: the last activation-or-rollback and the last loss-or-unlock.
#[derive(Debug, Default)]
struct DayView {
    activated: Option<bool>,
    frozen: Option<Option<bool>>,
}

impl DayView {
    fn of<'a>(records: impl Iterator<Item = &'a DailyRecord>) -> Self {
        let mut view = Self::default();
        for r in records {
            match r.kind {
                RecordKind::Activation => view.activated = Some(true),
                RecordKind::ActivationRolledBack => view.activated = Some(false),
                RecordKind::Loss { written } => view.frozen = Some(Some(written)),
                RecordKind::Unlock => view.frozen = Some(None),
            }
        }
        view
    }
}

fn name<E: TryFrom<i32>>(value: i32, as_str: impl Fn(E) -> &'static str) -> String {
    E::try_from(value).map(as_str).unwrap_or("UNKNOWN").to_string()
}

fn view(card: &reg::Card) -> RegistryView {
    RegistryView {
        bank_code: card.bank_code.clone(),
        social_state: name(card.social_state, |s: reg::SocialState| s.as_str_name()),
        financial_state: name(card.financial_state, |s: reg::FinancialState| s.as_str_name()),
    }
}

fn failed(action: &str, status: &tonic::Status) -> Repair {
    Repair::Failed {
        action: action.to_string(),
        code: format!("{:?}", status.code()),
        reason: reason_of(status).unwrap_or_default(),
        message: status.message().to_string(),
    }
}

impl BankAdapter {
    /// The day's file of this adapter: what it recorded on `date` (business time), in its outbox order.
    pub async fn daily_file(&self, date: Date) -> Result<DailyFile, ApiError> {
        let (start, end) = day_window(date);
        let rows = sqlx::query(
            "SELECT payload FROM outbox WHERE topic = $1 AND occurred_at >= $2 AND occurred_at < $3 ORDER BY seq",
        )
        .bind(socialcard_events::topics::FINANCIAL)
        .bind(micros(start))
        .bind(micros(end))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        let mut file = DailyFile::new(self.bank.code.clone(), date);
        let mut numbers: BTreeMap<String, String> = BTreeMap::new();
        for row in rows {
            let payload: Vec<u8> = row.try_get("payload").map_err(db)?;
            let event =
                ev::FinancialEvent::decode(payload.as_slice()).map_err(|e| ApiError::Internal(e.to_string()))?;
            let at =
                event.occurred_at.and_then(|t| OffsetDateTime::from_unix_timestamp(t.seconds).ok()).unwrap_or(start);
            let (kind, teller, branch) = match &event.kind {
                Some(ev::financial_event::Kind::FinancialActivated(a)) => {
                    (RecordKind::Activation, a.teller_id.clone(), a.branch_id.clone())
                }
                Some(ev::financial_event::Kind::FinancialActivationRolledBack(_)) => {
                    (RecordKind::ActivationRolledBack, String::new(), String::new())
                }
                Some(ev::financial_event::Kind::FinancialFrozen(f)) => {
                    let written = f.loss_kind == reg::LossKind::Written as i32;
                    (RecordKind::Loss { written }, String::new(), String::new())
                }
                Some(ev::financial_event::Kind::FinancialUnfrozen(_)) => {
                    (RecordKind::Unlock, String::new(), String::new())
                }
                None => continue,
            };
            let number = match numbers.get(&event.card_id) {
                Some(n) => n.clone(),
                None => {
                    let n = self.card_number_of(&event.card_id).await?;
                    numbers.insert(event.card_id.clone(), n.clone());
                    n
                }
            };
            file.records.push(DailyRecord {
                kind,
                card_number: number,
                occurred_at: at.max(start),
                teller_id: teller,
                branch_id: branch,
            });
        }
        Ok(file)
    }

    /// The card number of a card this adapter has seen, else the registry's.
    async fn card_number_of(&self, card_id: &str) -> Result<String, ApiError> {
        let known = sqlx::query("SELECT card_number FROM financial_cards WHERE card_id = $1")
            .bind(card_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(db)?;
        if let Some(row) = known {
            return row.try_get("card_number").map_err(db);
        }
        let mut req = Request::new(reg::GetCardRequest {
            lookup: Some(reg::get_card_request::Lookup::CardId(card_id.to_string())),
        });
        req.set_timeout(REGISTRY_TIMEOUT);
        let card = self.registry.clone().get_card(req).await.map_err(|s| ApiError::Unavailable(s.to_string()))?;
        Ok(card.into_inner().card.map(|c| c.card_number).unwrap_or_default())
    }

    /// Reconciles the bank core's file for `date` (its text, in this bank's layout) and, with `repair`,
    /// repairs what can be repaired.
    pub async fn reconcile(
        &self,
        date: Date,
        bank_file_text: &str,
        repair: bool,
    ) -> Result<ReconciliationReport, ApiError> {
        let layout = self.bank.reconciliation.layout;
        let bank_file = DailyFile::parse(bank_file_text, layout, &self.bank.code, date)?;
        let adapter_file = self.daily_file(date).await?;
        let (start, end) = day_window(date);

        // Every card the bank names, and every card activated here that day.
        let mut cards: BTreeSet<String> = bank_file.records.iter().map(|r| r.card_number.clone()).collect();
        let activated_here = sqlx::query(
            "SELECT card_number FROM financial_cards WHERE activated_at >= $1 AND activated_at < $2 AND state = 'active'",
        )
        .bind(micros(start))
        .bind(micros(end))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        for row in activated_here {
            cards.insert(row.try_get("card_number").map_err(db)?);
        }
        cards.extend(
            adapter_file
                .records
                .iter()
                .filter(|r| matches!(r.kind, RecordKind::Loss { .. } | RecordKind::Unlock))
                .map(|r| r.card_number.clone()),
        );

        let mut report = ReconciliationReport {
            bank_code: self.bank.code.clone(),
            date: date.to_string(),
            layout,
            bank_records: bank_file.records.len(),
            cards_checked: cards.len(),
            matched: 0,
            mismatches_by_kind: BTreeMap::new(),
            repair_requested: repair,
            repaired: 0,
            repair_failed: 0,
            manual: 0,
            mismatches: Vec::new(),
        };
        for number in cards {
            let bank_records: Vec<DailyRecord> =
                bank_file.records.iter().filter(|r| r.card_number == number).cloned().collect();
            let found = self.check_card(date, &number, &bank_records, &adapter_file, repair).await?;
            if found.is_empty() {
                report.matched += 1;
            }
            for m in found {
                *report.mismatches_by_kind.entry(m.kind).or_default() += 1;
                match m.repair {
                    Repair::Done { .. } => report.repaired += 1,
                    Repair::Failed { .. } => report.repair_failed += 1,
                    Repair::Manual { .. } => report.manual += 1,
                    Repair::Proposed { .. } => {}
                }
                report.mismatches.push(m);
            }
        }
        tracing::info!(
            bank = %self.bank.code,
            %date,
            matched = report.matched,
            mismatched = report.mismatches.len(),
            repaired = report.repaired,
            "reconciliation finished"
        );
        Ok(report)
    }

    async fn activation_of(&self, card_number: &str) -> Result<Option<Activation>, ApiError> {
        let row = sqlx::query(
            "SELECT card_id, state, teller_id, branch_id, activated_at FROM financial_cards WHERE card_number = $1",
        )
        .bind(card_number)
        .fetch_optional(&self.pool)
        .await
        .map_err(db)?;
        row.map(|r| {
            Ok(Activation {
                card_id: r.try_get("card_id").map_err(db)?,
                state: r.try_get("state").map_err(db)?,
                teller_id: r.try_get("teller_id").map_err(db)?,
                branch_id: r.try_get("branch_id").map_err(db)?,
                activated_at: r.try_get("activated_at").map_err(db)?,
            })
        })
        .transpose()
    }

    async fn registry_card(&self, card_number: &str) -> Result<Result<reg::Card, tonic::Status>, ApiError> {
        let mut req = Request::new(reg::GetCardRequest {
            lookup: Some(reg::get_card_request::Lookup::CardNumber(card_number.to_string())),
        });
        req.set_timeout(REGISTRY_TIMEOUT);
        match self.registry.clone().get_card(req).await {
            Ok(r) => Ok(r.into_inner().card.ok_or_else(|| tonic::Status::internal("registry answered without a card"))),
            Err(s) if matches!(s.code(), Code::NotFound | Code::InvalidArgument) => Ok(Err(s)),
            Err(s) => Err(ApiError::Unavailable(format!("registry: {}", s.message()))),
        }
    }

    /// The mismatches of one card (none: it matches), repaired when asked.
    async fn check_card(
        &self,
        date: Date,
        number: &str,
        bank_records: &[DailyRecord],
        adapter_file: &DailyFile,
        repair: bool,
    ) -> Result<Vec<Mismatch>, ApiError> {
        let mismatch = |kind, registry: Option<RegistryView>, repair: Repair| Mismatch {
            card_number: number.to_string(),
            kind,
            bank_records: bank_records.to_vec(),
            registry,
            repair,
        };
        let card = match self.registry_card(number).await? {
            Ok(card) => card,
            Err(_) => {
                let action = "none: the bank's record names no card of the registry; the bank must correct its file";
                return Ok(vec![mismatch(MismatchKind::UnknownCard, None, Repair::Manual { action: action.into() })]);
            }
        };
        let registry = view(&card);
        if card.bank_code != self.bank.code {
            tracing::warn!(
                target: "socialcard::audit",
                bank = %self.bank.code,
                card_bank = %card.bank_code,
                "the bank's reconciliation file names another bank's card"
            );
            let action = "none: another bank's card; this bank's file must not name it";
            return Ok(vec![mismatch(
                MismatchKind::OtherBankCard,
                Some(registry),
                Repair::Manual { action: action.into() },
            )]);
        }

        let bank = DayView::of(bank_records.iter());
        let ours = DayView::of(adapter_file.records.iter().filter(|r| r.card_number == number));
        let activation = self.activation_of(number).await?;
        let active_here = activation.as_ref().is_some_and(|a| a.state == "active");
        let (start, end) = day_window(date);
        let activated_that_day =
            activation.as_ref().is_some_and(|a| a.activated_at >= micros(start) && a.activated_at < micros(end));
        let financial = reg::FinancialState::try_from(card.financial_state).unwrap_or(reg::FinancialState::Unspecified);
        let social = reg::SocialState::try_from(card.social_state).unwrap_or(reg::SocialState::Unspecified);
        let mut found = Vec::new();

        match (bank.activated, active_here) {
            (Some(true), false) => {
                let action = "activate through this adapter under a key derived from the day and the card (the registry switches the social function on)";
                let outcome = if repair {
                    self.repair_missing_activation(date, number, bank_records, action).await
                } else {
                    Repair::Proposed { action: action.into() }
                };
                found.push(mismatch(MismatchKind::ActivationMissingAtAdapter, Some(registry.clone()), outcome));
            }
            (Some(true), true) | (None, true) if financial == reg::FinancialState::NotActivated => {
                let action =
                    "replay the adapter's RecordFinancialActivation under its own idempotency key (exactly once)";
                let outcome = match (&activation, repair) {
                    (Some(a), true) => self.repair_social_not_on(date, a, action).await?,
                    _ => Repair::Proposed { action: action.into() },
                };
                found.push(mismatch(MismatchKind::SocialNotOn, Some(registry.clone()), outcome));
            }
            (None | Some(false), true) if activated_that_day => {
                let action = "roll the activation back at the registry and here (the bank's file is the reference for the financial function)";
                let outcome = match (&activation, repair) {
                    (Some(a), true) => self.repair_rollback(date, number, a, action).await?,
                    _ => Repair::Proposed { action: action.into() },
                };
                found.push(mismatch(MismatchKind::ActivationMissingAtBank, Some(registry.clone()), outcome));
            }
            _ => {}
        }
        if active_here
            && bank.activated != Some(false)
            && social == reg::SocialState::LossLocked
            && card.social_loss_kind == reg::LossKind::Automatic as i32
        {
            let action = "none: the holder has the social function unlocked at a bureau point (R22)";
            found.push(mismatch(
                MismatchKind::SocialAwaitsBureauUnlock,
                Some(registry.clone()),
                Repair::Manual { action: action.into() },
            ));
        }

        let frozen_at_registry = financial == reg::FinancialState::Frozen;
        match bank.frozen {
            Some(Some(written)) if !frozen_at_registry => {
                let action = "report the loss through this adapter under a key derived from the day and the card";
                let outcome = if repair {
                    self.repair_loss(date, number, written, bank_records, action).await
                } else {
                    Repair::Proposed { action: action.into() }
                };
                found.push(mismatch(MismatchKind::LossMissingAtAdapter, Some(registry.clone()), outcome));
            }
            Some(None) if frozen_at_registry => {
                let action = "unlock through this adapter under a key derived from the day and the card";
                let outcome = if repair {
                    self.repair_unlock(date, number, bank_records, action).await
                } else {
                    Repair::Proposed { action: action.into() }
                };
                found.push(mismatch(MismatchKind::UnlockMissingAtAdapter, Some(registry.clone()), outcome));
            }
            _ => {}
        }
        match (ours.frozen, bank.frozen) {
            (Some(Some(_)), None | Some(None)) => {
                let action = "none: a loss is never lifted by a file; the bank confirms the loss or the holder unlocks at a branch";
                found.push(mismatch(
                    MismatchKind::LossMissingAtBank,
                    Some(registry.clone()),
                    Repair::Manual { action: action.into() },
                ));
            }
            (Some(None), None) if self.unfrozen_by_branch(date, &card.card_id).await? => {
                let action = "none: the bank confirms the unlock, or the card is reported lost again";
                found.push(mismatch(
                    MismatchKind::UnlockMissingAtBank,
                    Some(registry.clone()),
                    Repair::Manual { action: action.into() },
                ));
            }
            _ => {}
        }
        Ok(found)
    }

    /// Whether the card's last unfreeze that day was a branch unlock (a lapsed temporary loss is the
    /// bank's own rule and needs no line in its file).
    async fn unfrozen_by_branch(&self, date: Date, card_id: &str) -> Result<bool, ApiError> {
        let (start, end) = day_window(date);
        let rows = sqlx::query(
            "SELECT payload FROM outbox WHERE topic = $1 AND event_key = $2 AND occurred_at >= $3 AND occurred_at < $4
             ORDER BY seq DESC",
        )
        .bind(socialcard_events::topics::FINANCIAL)
        .bind(card_id)
        .bind(micros(start))
        .bind(micros(end))
        .fetch_all(&self.pool)
        .await
        .map_err(db)?;
        for row in rows {
            let payload: Vec<u8> = row.try_get("payload").map_err(db)?;
            if let Ok(ev::FinancialEvent { kind: Some(ev::financial_event::Kind::FinancialUnfrozen(u)), .. }) =
                ev::FinancialEvent::decode(payload.as_slice())
            {
                return Ok(!u.reason.to_ascii_lowercase().contains("expire"));
            }
        }
        Ok(false)
    }

    fn derived_key(&self, date: Date, number: &str, what: &str) -> String {
        format!("reconcile:{}:{date}:{number}:{what}", self.bank.code)
    }

    /// Teller and branch of the bank's own record of `kind`, or the reconciliation run as the actor.
    fn actor_of(bank_records: &[DailyRecord], kind: impl Fn(RecordKind) -> bool) -> (String, String) {
        bank_records
            .iter()
            .rev()
            .find(|r| kind(r.kind) && !r.teller_id.is_empty() && !r.branch_id.is_empty())
            .map(|r| (r.teller_id.clone(), r.branch_id.clone()))
            .unwrap_or_else(|| ("reconciliation".into(), "reconciliation".into()))
    }

    async fn repair_missing_activation(
        &self,
        date: Date,
        number: &str,
        bank_records: &[DailyRecord],
        action: &str,
    ) -> Repair {
        let (teller, branch) = Self::actor_of(bank_records, |k| k == RecordKind::Activation);
        let request = bank::ActivateFinancialRequest {
            idempotency_key: self.derived_key(date, number, "activation"),
            card_number: number.to_string(),
            teller_id: teller,
            branch_id: branch,
            // The bank verified the holder at its branch that day; its file is the evidence.
            face_verification_ref: format!("reconciliation:{}:{date}", self.bank.code),
            bank_pin_changed: true,
        };
        match self.activate_financial(request, Some(REGISTRY_TIMEOUT)).await {
            Ok(_) => Repair::Done { action: action.into() },
            Err(e) => failed(action, &tonic::Status::from(e)),
        }
    }

    async fn repair_social_not_on(&self, date: Date, a: &Activation, action: &str) -> Result<Repair, ApiError> {
        let request = match self.stored_registry_request(&a.card_id).await? {
            Some(r) => r,
            // No event of it survives: the same request under a key derived from the day and the card.
            None => reg::RecordFinancialActivationRequest {
                idempotency_key: format!("bank:{}", self.derived_key(date, &a.card_id, "activation")),
                card_id: a.card_id.clone(),
                actor: Some(reg::Actor {
                    channel: reg::Channel::BankBranch as i32,
                    operator_id: a.teller_id.clone(),
                    site_id: a.branch_id.clone(),
                    ..Default::default()
                }),
                bank_code: self.bank.code.clone(),
                face_verification_ref: format!("reconciliation:{}:{date}", self.bank.code),
                bank_pin_changed: true,
                presenter: reg::Presenter::Holder as i32,
            },
        };
        let mut call = Request::new(request);
        call.set_timeout(REGISTRY_TIMEOUT);
        match self.registry.clone().record_financial_activation(call).await {
            Ok(_) => {
                sqlx::query("UPDATE financial_cards SET social_confirmed = 1 WHERE card_id = $1")
                    .bind(&a.card_id)
                    .execute(&self.writer)
                    .await
                    .map_err(db)?;
                Ok(Repair::Done { action: action.into() })
            }
            Err(s) => Ok(failed(action, &s)),
        }
    }

    /// The registry request of the card's latest `FinancialActivated` event.
    async fn stored_registry_request(
        &self,
        card_id: &str,
    ) -> Result<Option<reg::RecordFinancialActivationRequest>, ApiError> {
        let rows = sqlx::query("SELECT payload FROM outbox WHERE topic = $1 AND event_key = $2 ORDER BY seq DESC")
            .bind(socialcard_events::topics::FINANCIAL)
            .bind(card_id)
            .fetch_all(&self.pool)
            .await
            .map_err(db)?;
        for row in rows {
            let payload: Vec<u8> = row.try_get("payload").map_err(db)?;
            if let Ok(ev::FinancialEvent { kind: Some(ev::financial_event::Kind::FinancialActivated(a)), .. }) =
                ev::FinancialEvent::decode(payload.as_slice())
            {
                return Ok(a.registry_request);
            }
        }
        Ok(None)
    }

    /// Rolls back an activation the bank does not have: at the registry (when it has it) and here, with
    /// the rollback's event, as CancelActivation does but outside the bank's cancel window.
    async fn repair_rollback(
        &self,
        date: Date,
        number: &str,
        a: &Activation,
        action: &str,
    ) -> Result<Repair, ApiError> {
        let reason = format!("absent from the bank's reconciliation file of {date}");
        let registry_request = reg::CancelFinancialActivationRequest {
            idempotency_key: format!("bank:{}", self.derived_key(date, number, "rollback")),
            card_id: a.card_id.clone(),
            actor: Some(reg::Actor {
                channel: reg::Channel::BankBranch as i32,
                operator_id: a.teller_id.clone(),
                site_id: a.branch_id.clone(),
                ..Default::default()
            }),
            bank_code: self.bank.code.clone(),
            reason: reason.clone(),
        };
        let mut call = Request::new(registry_request.clone());
        call.set_timeout(REGISTRY_TIMEOUT);
        let confirmed = match self.registry.clone().cancel_financial_activation(call).await {
            Ok(_) => true,
            Err(s)
                if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled) =>
            {
                false
            }
            Err(s) => return Ok(failed(action, &s)),
        };
        let now = OffsetDateTime::now_utc();
        let mut tx = self.writer.begin().await.map_err(db)?;
        let changed =
            sqlx::query("UPDATE financial_cards SET state = 'rolled_back' WHERE card_id = $1 AND state = 'active'")
                .bind(&a.card_id)
                .execute(&mut *tx)
                .await
                .map_err(db)?
                .rows_affected();
        if changed == 1 {
            let event = ev::FinancialEvent {
                card_id: a.card_id.clone(),
                bank_code: self.bank.code.clone(),
                occurred_at: Some(prost_types::Timestamp { seconds: now.unix_timestamp(), nanos: 0 }),
                kind: Some(ev::financial_event::Kind::FinancialActivationRolledBack(
                    ev::FinancialActivationRolledBack {
                        reason,
                        registry_request: Some(registry_request),
                        registry_confirmed: confirmed,
                    },
                )),
            };
            self.append_event(
                &mut tx,
                &a.card_id,
                "socialcard.financial.v1.FinancialActivationRolledBack",
                &event,
                now,
            )
            .await?;
        }
        tx.commit().await.map_err(db)?;
        if confirmed {
            Ok(Repair::Done { action: action.into() })
        } else {
            Ok(failed(
                action,
                &tonic::Status::from(reject(
                    RejectionKind::Unavailable,
                    "ROLLBACK_PENDING",
                    "rolled back here; the registry applies it from the event as soon as it is back",
                )),
            ))
        }
    }

    async fn repair_loss(
        &self,
        date: Date,
        number: &str,
        written: bool,
        bank_records: &[DailyRecord],
        action: &str,
    ) -> Repair {
        let (teller, branch) = Self::actor_of(bank_records, |k| matches!(k, RecordKind::Loss { .. }));
        let request = bank::ReportLossRequest {
            idempotency_key: self.derived_key(date, number, "loss"),
            card_number: number.to_string(),
            loss_kind: if written { reg::LossKind::Written } else { reg::LossKind::Temporary } as i32,
            teller_id: teller,
            branch_id: branch,
            // The bank took the loss at its branch with the holder's ID; its file is the evidence.
            holder_id_checked: true,
        };
        match BankCardService::report_loss(self, Request::new(request)).await {
            Ok(_) => Repair::Done { action: action.into() },
            Err(s) => failed(action, &s),
        }
    }

    async fn repair_unlock(&self, date: Date, number: &str, bank_records: &[DailyRecord], action: &str) -> Repair {
        let (teller, branch) = Self::actor_of(bank_records, |k| k == RecordKind::Unlock);
        let request = bank::UnlockFinancialRequest {
            idempotency_key: self.derived_key(date, number, "unlock"),
            card_number: number.to_string(),
            teller_id: teller,
            branch_id: branch,
            // As for a loss: the bank unlocked at its branch, in person, by its own rules.
            holder_id_checked: true,
            card_presented: true,
        };
        match BankCardService::unlock_financial(self, Request::new(request)).await {
            Ok(_) => Repair::Done { action: action.into() },
            Err(s) => failed(action, &s),
        }
    }
}
