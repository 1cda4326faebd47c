//! The card aggregate: one application's card through its whole life, with the rules that cross its
//! three state machines (R2, R7-R10, R13, R16-R31). Every operation takes the card by reference and
//! returns the changed copy or a rejection, so a refused operation can never leave a half-changed card.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::bank::BankDirectory;
use crate::channel::{Channel, Context, Presenter};
use crate::citizen_id::CitizenId;
use crate::numbers::{BankAccountNumber, CardNumber};
use crate::photo::PhotoSource;
use crate::policy::CityPolicy;
use crate::rejection::{Rejection, RejectionKind};
use crate::state::{FinancialEvent, FinancialState, LossKind, PhysicalEvent, PhysicalState, SocialEvent, SocialState};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CardType {
    Adult,
    Minor,
    /// R24: social function only, limited validity.
    Temporary,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HolderStatus {
    Employed,
    Unemployed,
    Retired,
    Student,
    Child,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProductionStage {
    BankAccount,
    CardFactory,
    KeyInitialisation,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProductionFailure {
    pub stage: ProductionStage,
    pub reason: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShipmentProgress {
    Dispatched,
    DeliveryFailed,
    AtBackupPoint,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CollectionMethod {
    Delivered,
    PickedUpAtPoint,
    /// R16: printed on the spot at an instant replacement point.
    InstantIssue,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinState {
    /// The holder changed the social PIN from the initial one (R25, R29).
    pub changed: bool,
    pub wrong_attempts: u32,
}

/// Where the courier takes the card (R14).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryAddress {
    pub recipient: String,
    pub phone: String,
    pub line: String,
    pub district: String,
    pub postal_code: String,
}

/// What an applicant asks for (R7-R9, R14, R15, R28).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Application {
    pub holder: CitizenId,
    pub registered_phone: String,
    pub card_type: CardType,
    pub holder_status: HolderStatus,
    pub bank_code: String,
    pub pension_bank_code: Option<String>,
    pub payroll_bank_codes: Vec<String>,
    pub employer_id: Option<String>,
    pub photo_source: PhotoSource,
    pub backup_point_id: String,
    pub delivery: Option<DeliveryAddress>,
    /// The card this one replaces (R28).
    pub replaces: Option<String>,
}

/// Stored as JSON (sealed) by the registry. Optional fields that are absent are left out and read back as
/// absent; data written before, with every field spelled out, reads the same. `collected_at`,
/// `expires_at` and `pin` are still always written: registries before this form required them, and one
/// of those may read the same database during a rolling update or after a rollback. They may be left out
/// (`skip_serializing_if`) once no such release runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Card {
    pub id: String,
    pub holder: CitizenId,
    pub registered_phone: String,
    pub card_type: CardType,
    pub holder_status: HolderStatus,
    pub bank_code: String,
    pub application_channel: Channel,
    pub backup_point_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliveryAddress>,
    pub fee_fen: i64,
    pub physical: PhysicalState,
    pub social: SocialState,
    pub financial: FinancialState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub card_number: Option<CardNumber>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_number: Option<BankAccountNumber>,
    #[serde(with = "time::serde::rfc3339")]
    pub applied_at: OffsetDateTime,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub collected_at: Option<OffsetDateTime>,
    /// Temporary cards only (R24).
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(default)]
    pub pin: PinState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejection_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_production_failure: Option<ProductionFailure>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaces: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_by: Option<String>,
    /// Bumped by every change; storage uses it for optimistic concurrency.
    pub version: i64,
}

/// The result of a PIN check (R30).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinOutcome {
    pub verified: bool,
    pub remaining_attempts: u32,
    pub locked: bool,
}

impl Card {
    /// R2, R7, R8, R9, R12, R24, R28: validates an application and opens the card in `Applied`.
    /// `holder_cards` are the holder's existing cards; `replaced` is the card being replaced, if any.
    pub fn apply_for(
        id: String,
        app: Application,
        ctx: &Context,
        now: OffsetDateTime,
        policy: &CityPolicy,
        banks: &BankDirectory,
        holder_cards: &[Card],
    ) -> Result<Card, Rejection> {
        let today = policy.local_date(now);
        let age = app.holder.age_on(today);
        let minor = age < policy.minor_below_age;

        // R7: application channels.
        match ctx.channel {
            Channel::BankBranch | Channel::CommunityPoint | Channel::BureauWindow => {
                ctx.require_counter_documents(minor, false)?;
            }
            Channel::EmployerBatch => {
                if app.employer_id.as_deref().is_none_or(str::is_empty) {
                    return Err(Rejection::invalid(
                        "employer_id",
                        "EMPLOYER_REQUIRED",
                        "an employer batch application names the employer",
                    ));
                }
                if app.holder_status != HolderStatus::Employed {
                    return Err(Rejection::invalid(
                        "holder_status",
                        "EMPLOYER_BATCH_EMPLOYEES_ONLY",
                        "employer batches are for employees",
                    ));
                }
            }
            Channel::Online => ctx.require_online_identity("applications")?,
            other => {
                return Err(channel_not_allowed(other, "submit an application"));
            }
        }
        if app.replaces.is_some() && !ctx.channel.is_counter() {
            return Err(Rejection::invalid(
                "actor.channel",
                "CHANNEL_NOT_ALLOWED",
                "replacements are applied for at a counter",
            ));
        }
        if app.backup_point_id.is_empty() {
            return Err(Rejection::invalid(
                "backup_point_id",
                "BACKUP_POINT_REQUIRED",
                "name the backup community service point (R15)",
            ));
        }

        // Card type and age (R23, R24).
        match (app.card_type, minor) {
            (CardType::Adult, true) => {
                return Err(Rejection::invalid(
                    "card_type",
                    "CARD_TYPE_AGE_MISMATCH",
                    format!("holders under {} get a minor card", policy.minor_below_age),
                ));
            }
            (CardType::Minor, false) => {
                return Err(Rejection::invalid(
                    "card_type",
                    "CARD_TYPE_AGE_MISMATCH",
                    format!("holders aged {} or over get an adult card", policy.minor_below_age),
                ));
            }
            _ => {}
        }

        // R9: photo source.
        let preschool = age < policy.preschool_below_age;
        match (app.photo_source, preschool) {
            (PhotoSource::None, false) => {
                return Err(Rejection::invalid("photo.source", "PHOTO_REQUIRED", "the card needs a photo"));
            }
            (source, true) if source != PhotoSource::None => {
                return Err(Rejection::invalid(
                    "photo.source",
                    "PHOTO_NOT_ALLOWED",
                    "preschool children's cards carry no photo",
                ));
            }
            (PhotoSource::StudentCard, _)
                if !matches!(app.holder_status, HolderStatus::Student | HolderStatus::Child) =>
            {
                return Err(Rejection::invalid(
                    "photo.source",
                    "PHOTO_SOURCE_NOT_ALLOWED",
                    "the electronic student card photo is for students",
                ));
            }
            _ => {}
        }

        // R8: the bank.
        let temporary = app.card_type == CardType::Temporary;
        if temporary {
            if !app.bank_code.is_empty() {
                banks.require("bank_code", &app.bank_code)?;
            }
        } else {
            choose_bank(&app, banks)?;
        }

        // R2, R24, R28: one valid card at a time.
        let replaced = match &app.replaces {
            Some(old_id) => {
                let old = holder_cards.iter().find(|c| &c.id == old_id).ok_or_else(|| {
                    Rejection::not_found("CARD_NOT_FOUND", "the card to replace is not one of the holder's cards")
                })?;
                let written_loss = old.social.loss_kind() == Some(LossKind::Written);
                let damaged_card_handed_in = old.physical == PhysicalState::Collected && ctx.documents.card_presented;
                if old.physical != PhysicalState::Collected || !(written_loss || damaged_card_handed_in) {
                    return Err(Rejection::precondition(
                        "REPLACEMENT_NOT_ALLOWED",
                        "a replacement needs a collected card under a written loss, or the damaged card handed in",
                    ));
                }
                if old.card_type == CardType::Temporary || temporary {
                    return Err(Rejection::precondition(
                        "REPLACEMENT_NOT_ALLOWED",
                        "temporary cards are not replaced; apply for a formal card",
                    ));
                }
                Some(old)
            }
            None => None,
        };
        let others: Vec<&Card> =
            holder_cards.iter().filter(|c| c.physical.is_live() && replaced.is_none_or(|r| r.id != c.id)).collect();
        if temporary && others.iter().any(|c| c.card_type != CardType::Temporary) {
            return Err(Rejection::precondition(
                "FORMAL_CARD_VALID",
                "no temporary card while a formal card is valid or pending (R24)",
            ));
        }
        // A temporary card does not stand in the way of a formal one: the formal card retires it (R24).
        if others.iter().any(|c| temporary || c.card_type != CardType::Temporary) {
            return Err(Rejection::precondition(
                "ACTIVE_CARD_EXISTS",
                "the holder already has a valid or pending card (R2)",
            ));
        }

        Ok(Card {
            id,
            holder: app.holder,
            registered_phone: app.registered_phone,
            card_type: app.card_type,
            holder_status: app.holder_status,
            bank_code: app.bank_code,
            application_channel: ctx.channel,
            backup_point_id: app.backup_point_id,
            delivery: app.delivery,
            fee_fen: if replaced.is_some() { policy.replacement_fee_fen } else { 0 },
            physical: PhysicalState::Applied,
            social: SocialState::NotActivated,
            financial: FinancialState::NotActivated,
            card_number: None,
            account_number: None,
            applied_at: now,
            collected_at: None,
            expires_at: None,
            pin: PinState::default(),
            rejection_reason: None,
            last_production_failure: None,
            replaces: app.replaces,
            replaced_by: None,
            version: 1,
        })
    }

    fn next(&self, f: impl FnOnce(&mut Card) -> Result<(), Rejection>) -> Result<Card, Rejection> {
        let mut c = self.clone();
        f(&mut c)?;
        c.version += 1;
        Ok(c)
    }

    /// R10: a reviewer approves or rejects (with a reason the applicant sees).
    pub fn review(&self, approve: bool, reason: &str, ctx: &Context) -> Result<Card, Rejection> {
        if ctx.actor.operator_id.as_deref().is_none_or(str::is_empty) {
            return Err(Rejection::invalid("actor.operator_id", "REVIEWER_REQUIRED", "a review names its reviewer"));
        }
        if !approve && reason.trim().is_empty() {
            return Err(Rejection::invalid("reason", "REJECTION_REASON_REQUIRED", "a rejection says why (R10)"));
        }
        self.next(|c| {
            c.physical = c.physical.apply(if approve { PhysicalEvent::Approve } else { PhysicalEvent::Reject })?;
            if !approve {
                c.rejection_reason = Some(reason.trim().to_string());
                c.social = SocialState::Cancelled;
                c.financial = FinancialState::Cancelled;
            }
            Ok(())
        })
    }

    /// R11, R13: into production; the card number is issued the first time and kept for a remake.
    pub fn start_production(&self, number: CardNumber, ctx: &Context) -> Result<Card, Rejection> {
        require_channel(ctx, &[Channel::Production, Channel::BureauWindow], "start production")?;
        self.next(|c| {
            c.physical = c.physical.apply(PhysicalEvent::StartProduction)?;
            if c.card_number.is_none() {
                c.card_number = Some(number);
            }
            Ok(())
        })
    }

    /// Production succeeded: a formal card carries an account at its own bank (R4); a temporary card
    /// carries none (R24) and its validity starts now.
    pub fn production_succeeded(
        &self,
        account: Option<BankAccountNumber>,
        ctx: &Context,
        now: OffsetDateTime,
        policy: &CityPolicy,
        banks: &BankDirectory,
    ) -> Result<Card, Rejection> {
        require_channel(ctx, &[Channel::Production], "record production")?;
        match (self.card_type, &account) {
            (CardType::Temporary, Some(_)) => {
                return Err(Rejection::invalid(
                    "account_number",
                    "TEMPORARY_CARD_NO_ACCOUNT",
                    "a temporary card carries no bank account",
                ));
            }
            (CardType::Temporary, None) => {}
            (_, None) => {
                return Err(Rejection::invalid(
                    "account_number",
                    "ACCOUNT_NUMBER_REQUIRED",
                    "a produced formal card carries its bank account number",
                ));
            }
            (_, Some(a)) => {
                let bank = banks.require("bank_code", &self.bank_code)?;
                if !bank.owns_account(a) {
                    return Err(Rejection::invalid(
                        "account_number",
                        "ACCOUNT_NOT_IN_BANK_BIN",
                        "the account number is not in the card's bank's BIN ranges",
                    ));
                }
            }
        }
        self.next(|c| {
            c.physical = c.physical.apply(PhysicalEvent::ProductionSucceeded)?;
            c.account_number = account;
            c.last_production_failure = None;
            if c.card_type == CardType::Temporary {
                c.expires_at = Some(now + time::Duration::days(i64::from(policy.temporary_card_validity_days)));
            }
            Ok(())
        })
    }

    pub fn production_failed(&self, failure: ProductionFailure, ctx: &Context) -> Result<Card, Rejection> {
        require_channel(ctx, &[Channel::Production], "record production")?;
        if failure.reason.trim().is_empty() {
            return Err(Rejection::invalid(
                "failure.reason",
                "FAILURE_REASON_REQUIRED",
                "a production failure says why",
            ));
        }
        self.next(|c| {
            c.physical = c.physical.apply(PhysicalEvent::ProductionFailed)?;
            c.last_production_failure = Some(failure);
            Ok(())
        })
    }

    /// R14, R15: the courier's progress.
    pub fn shipment(&self, progress: ShipmentProgress, ctx: &Context) -> Result<Card, Rejection> {
        require_channel(ctx, &[Channel::Courier], "record shipment progress")?;
        self.next(|c| {
            c.physical = c.physical.apply(match progress {
                ShipmentProgress::Dispatched => PhysicalEvent::Dispatch,
                ShipmentProgress::DeliveryFailed => PhysicalEvent::DeliveryFailed,
                ShipmentProgress::AtBackupPoint => PhysicalEvent::ArriveAtBackupPoint,
            })?;
            Ok(())
        })
    }

    /// R16, R17: the collection date, from which R22 runs.
    pub fn collect(
        &self,
        method: CollectionMethod,
        at: OffsetDateTime,
        ctx: &Context,
        now: OffsetDateTime,
    ) -> Result<Card, Rejection> {
        if at > now {
            return Err(Rejection::invalid(
                "collected_at",
                "COLLECTED_AT_IN_FUTURE",
                "the collection time lies in the future",
            ));
        }
        if at < self.applied_at {
            return Err(Rejection::invalid(
                "collected_at",
                "COLLECTED_AT_BEFORE_APPLICATION",
                "the collection time is before the application",
            ));
        }
        match method {
            CollectionMethod::Delivered => {
                require_channel(ctx, &[Channel::Courier], "record a delivery")?;
                if self.physical != PhysicalState::Dispatched {
                    return Err(Rejection::precondition(
                        "ILLEGAL_CARD_TRANSITION",
                        "only a dispatched card can be delivered",
                    ));
                }
            }
            CollectionMethod::PickedUpAtPoint => {
                require_channel(
                    ctx,
                    &[Channel::CommunityPoint, Channel::BureauWindow, Channel::BankBranch],
                    "record a pick-up",
                )?;
                ctx.require_counter_documents(self.card_type == CardType::Minor, false)?;
            }
            CollectionMethod::InstantIssue => {
                require_channel(ctx, &[Channel::CommunityPoint, Channel::BankBranch], "issue a card instantly")?;
                ctx.require_counter_documents(self.card_type == CardType::Minor, false)?;
                if self.physical != PhysicalState::Produced {
                    return Err(Rejection::precondition(
                        "ILLEGAL_CARD_TRANSITION",
                        "an instant issue hands over a card just produced",
                    ));
                }
            }
        }
        self.next(|c| {
            c.physical = c.physical.apply(PhysicalEvent::Collect)?;
            c.collected_at = Some(at);
            Ok(())
        })
    }

    /// R13: the holder found wrong data on the card; it goes back to be made again.
    pub fn return_for_remake(&self, reason: &str, ctx: &Context) -> Result<Card, Rejection> {
        require_channel(
            ctx,
            &[Channel::BureauWindow, Channel::CommunityPoint, Channel::BankBranch],
            "return a card for remake",
        )?;
        ctx.require_counter_documents(self.card_type == CardType::Minor, true)?;
        if reason.trim().is_empty() {
            return Err(Rejection::invalid("reason", "REMAKE_REASON_REQUIRED", "say what is wrong on the card"));
        }
        if self.social != SocialState::NotActivated || self.financial != FinancialState::NotActivated {
            return Err(Rejection::precondition(
                "REMAKE_AFTER_ACTIVATION",
                "an activated card is replaced, not remade",
            ));
        }
        self.next(|c| {
            c.physical = c.physical.apply(PhysicalEvent::ReturnForRemake)?;
            c.collected_at = None;
            Ok(())
        })
    }

    /// R18, R19: the social function alone, through every channel that may do it.
    pub fn activate_social(&self, ctx: &Context, now: OffsetDateTime) -> Result<Card, Rejection> {
        match ctx.channel {
            Channel::Online => ctx.require_online_identity("activation")?,
            Channel::CommunityPoint | Channel::BureauWindow => {
                ctx.require_counter_documents(self.card_type == CardType::Minor, true)?;
            }
            Channel::Hotline => {
                let caller = ctx.actor.caller_phone.as_deref().unwrap_or_default();
                if caller.is_empty() {
                    return Err(Rejection::invalid(
                        "actor.caller_phone",
                        "CALLER_PHONE_REQUIRED",
                        "hotline activation needs the calling number",
                    ));
                }
                if caller != self.registered_phone {
                    return Err(Rejection::denied(
                        "CALLER_PHONE_NOT_REGISTERED",
                        "hotline activation only from the phone registered at application",
                    ));
                }
            }
            Channel::MedicalTerminal => {
                ctx.require_site()?;
                if !ctx.documents.card_presented {
                    return Err(Rejection::invalid(
                        "documents.card_presented",
                        "CARD_REQUIRED",
                        "first use at a hospital or pharmacy presents the card",
                    ));
                }
            }
            Channel::BankBranch => {
                return Err(Rejection::invalid(
                    "actor.channel",
                    "CHANNEL_NOT_ALLOWED",
                    "a bank branch switches the social function on through the financial activation (R20)",
                ));
            }
            other => return Err(channel_not_allowed(other, "activate the social function")),
        }
        self.require_collected()?;
        if self.expires_at.is_some_and(|e| now >= e) {
            return Err(Rejection::precondition(
                "TEMPORARY_CARD_EXPIRED",
                "the temporary card's validity has ended (R24)",
            ));
        }
        self.next(|c| {
            c.social = c.social.apply(SocialEvent::Activate)?;
            Ok(())
        })
    }

    /// R20, R21: the card's own bank activated the financial function at a branch, in person; the
    /// social function is switched on with it, unless an automatic R22 lock awaits the bureau's unlock
    /// (then the answer's flag is true). Returns the new card and that flag.
    pub fn record_financial_activation(
        &self,
        bank_code: &str,
        face_verification_ref: &str,
        bank_pin_changed: bool,
        presenter: Presenter,
        ctx: &Context,
        banks: &BankDirectory,
    ) -> Result<(Card, bool), Rejection> {
        if ctx.channel != Channel::BankBranch {
            return Err(Rejection::invalid(
                "actor.channel",
                "CHANNEL_NOT_ALLOWED",
                "the financial function is activated only at a bank branch (R20)",
            ));
        }
        banks.require("bank_code", bank_code)?;
        ctx.require_site()?;
        if ctx.actor.operator_id.as_deref().is_none_or(str::is_empty) {
            return Err(Rejection::invalid(
                "actor.operator_id",
                "TELLER_REQUIRED",
                "a financial activation names the teller",
            ));
        }
        if presenter != Presenter::Holder {
            return Err(Rejection::invalid(
                "presenter",
                "PROXY_NOT_ALLOWED",
                "the financial function is activated by the holder in person, no proxy (R20)",
            ));
        }
        if face_verification_ref.is_empty() {
            return Err(Rejection::invalid(
                "face_verification_ref",
                "FACE_VERIFICATION_REQUIRED",
                "the branch verifies the holder's face (R20)",
            ));
        }
        if bank_code != self.bank_code {
            return Err(Rejection::denied("WRONG_BANK", "the card belongs to another bank"));
        }
        if self.card_type == CardType::Temporary {
            return Err(Rejection::precondition(
                "TEMPORARY_CARD_NO_FINANCIAL",
                "a temporary card has no financial function (R24)",
            ));
        }
        if !bank_pin_changed {
            return Err(Rejection::precondition(
                "BANK_PIN_NOT_CHANGED",
                "the bank's initial PIN must be changed during activation (R21)",
            ));
        }
        self.require_collected()?;
        let awaits_unlock = self.social.loss_kind() == Some(LossKind::Automatic);
        match self.social {
            SocialState::LossLocked { kind: LossKind::Automatic, .. }
            | SocialState::NotActivated
            | SocialState::Active => {}
            other => {
                // Loss-locked by the holder, PIN-locked, disabled or cancelled: the bank must not go ahead.
                other.apply(SocialEvent::Activate)?;
            }
        }
        let card = self.next(|c| {
            c.financial = c.financial.apply(FinancialEvent::Activate)?;
            if c.social == SocialState::NotActivated {
                c.social = SocialState::Active;
            }
            Ok(())
        })?;
        Ok((card, awaits_unlock))
    }

    /// A bank core that rolled its activation back (compensation): the financial side returns to not
    /// activated; the social function, once on, stays on.
    pub fn cancel_financial_activation(&self, bank_code: &str) -> Result<Card, Rejection> {
        if bank_code != self.bank_code {
            return Err(Rejection::denied("WRONG_BANK", "the card belongs to another bank"));
        }
        self.next(|c| {
            c.financial = c.financial.apply(FinancialEvent::CancelActivation)?;
            Ok(())
        })
    }

    /// R26 (financial side, as the card's bank adapter recorded it): the registry mirrors the freeze.
    pub fn freeze_financial(&self, bank_code: &str, kind: LossKind) -> Result<Card, Rejection> {
        if bank_code != self.bank_code {
            return Err(Rejection::denied("WRONG_BANK", "the card belongs to another bank"));
        }
        self.next(|c| {
            c.financial = c.financial.apply(FinancialEvent::Freeze(kind))?;
            Ok(())
        })
    }

    /// R27 (financial side): the bank lifted its freeze (unlock at a branch, or a lapsed temporary loss).
    pub fn unfreeze_financial(&self, bank_code: &str) -> Result<Card, Rejection> {
        if bank_code != self.bank_code {
            return Err(Rejection::denied("WRONG_BANK", "the card belongs to another bank"));
        }
        self.next(|c| {
            c.financial = c.financial.apply(FinancialEvent::Unfreeze)?;
            Ok(())
        })
    }

    /// R22: when the social function is loss-locked for want of a financial activation (none for a
    /// temporary card, which has no financial function).
    pub fn auto_lock_due(&self, policy: &CityPolicy) -> Option<OffsetDateTime> {
        if self.card_type == CardType::Temporary {
            return None;
        }
        self.collected_at.map(|at| at + time::Duration::days(i64::from(policy.auto_lock_days_without_financial)))
    }

    /// R23: when a minor card is disabled unless exchanged (midnight local time, the day the holder is
    /// 16 + the policy's years).
    pub fn minor_exchange_due(&self, policy: &CityPolicy) -> Option<OffsetDateTime> {
        if self.card_type != CardType::Minor {
            return None;
        }
        let birth = self.holder.birth_date();
        let years = 16 + i32::try_from(policy.minor_exchange_years_after_16).unwrap_or(i32::MAX - 16);
        let year = birth.year().checked_add(years)?;
        // A 29 February birthday falls on 1 March in other years.
        let day = time::Date::from_calendar_date(year, birth.month(), birth.day())
            .or_else(|_| time::Date::from_calendar_date(year, time::Month::March, 1))
            .ok()?;
        Some(day.midnight().assume_offset(policy.offset()))
    }

    /// R23: the scheduler disables a minor card not exchanged in time.
    pub fn disable_unexchanged_minor(
        &self,
        ctx: &Context,
        now: OffsetDateTime,
        policy: &CityPolicy,
    ) -> Result<Card, Rejection> {
        let due = self.minor_exchange_due(policy);
        if let Some(due) = due
            && now < due
        {
            return Err(Rejection::precondition("DEADLINE_NOT_REACHED", "the R23 exchange deadline has not passed"));
        }
        self.disable(ctx)
    }

    /// R24: the scheduler ends a temporary card whose validity is over.
    pub fn expire_temporary(&self, ctx: &Context, now: OffsetDateTime) -> Result<Card, Rejection> {
        require_channel(ctx, &[Channel::Scheduler], "expire a temporary card")?;
        if self.card_type != CardType::Temporary {
            return Err(Rejection::precondition("NOT_TEMPORARY", "only a temporary card expires (R24)"));
        }
        match self.expires_at {
            Some(at) if now >= at => self.end(PhysicalEvent::Cancel),
            _ => Err(Rejection::precondition("DEADLINE_NOT_REACHED", "the temporary card is still valid (R24)")),
        }
    }

    /// R27: a temporary loss lapses on the social side, only where the city's policy sets days for it.
    pub fn lapse_temporary_loss(
        &self,
        ctx: &Context,
        since: OffsetDateTime,
        now: OffsetDateTime,
        policy: &CityPolicy,
    ) -> Result<Card, Rejection> {
        require_channel(ctx, &[Channel::Scheduler], "lapse a temporary loss")?;
        let Some(days) = policy.temporary_loss_expiry_days_social else {
            return Err(Rejection::precondition(
                "NO_SOCIAL_LOSS_EXPIRY",
                "in this city a temporary loss lifts only through a written unlock at the bureau (R27)",
            ));
        };
        if self.social.loss_kind() != Some(LossKind::Temporary) {
            return Err(Rejection::precondition(
                "NOT_TEMPORARY_LOSS",
                "the social function is not under a temporary loss",
            ));
        }
        if now < since + time::Duration::days(i64::from(days)) {
            return Err(Rejection::precondition("DEADLINE_NOT_REACHED", "the temporary loss has not lapsed yet"));
        }
        self.next(|c| {
            c.social = c.social.apply(SocialEvent::Unlock)?;
            Ok(())
        })
    }

    /// R25, R26 (social side): a loss report through its channel, or the scheduler's R22 lock.
    pub fn report_loss(
        &self,
        kind: LossKind,
        ctx: &Context,
        now: OffsetDateTime,
        policy: &CityPolicy,
    ) -> Result<Card, Rejection> {
        crate::loss::report_channel_allowed(kind, ctx.channel)?;
        match (kind, ctx.channel) {
            (LossKind::Written, Channel::BankBranch | Channel::BureauWindow) => {
                // R31: an agent may not report a loss; the holder comes with ID (the card is lost).
                ctx.require_holder_in_person(false)?;
            }
            (LossKind::Temporary, Channel::Hotline) => {}
            (LossKind::Temporary, Channel::Hotline12333SelfService) => {
                if !self.pin.changed {
                    return Err(Rejection::precondition(
                        "INITIAL_PIN_HOLDER",
                        "12333 self-service loss needs a changed PIN; call the 12333 operator",
                    ));
                }
            }
            (LossKind::Temporary, Channel::Hotline12333Operator) => {
                if !policy.within_working_hours(now) {
                    return Err(Rejection::precondition(
                        "OUTSIDE_WORKING_HOURS",
                        "the 12333 operator takes loss reports in working hours",
                    ));
                }
            }
            (LossKind::Automatic, Channel::Scheduler) => {
                if self.financial != FinancialState::NotActivated {
                    return Err(Rejection::precondition(
                        "FINANCIAL_ACTIVATED",
                        "R22 locks only cards whose financial function was never activated",
                    ));
                }
                let Some(collected) = self.collected_at else {
                    return Err(Rejection::precondition("NOT_COLLECTED", "R22 runs from the collection date"));
                };
                if now < collected + time::Duration::days(i64::from(policy.auto_lock_days_without_financial)) {
                    return Err(Rejection::precondition("DEADLINE_NOT_REACHED", "the R22 deadline has not passed"));
                }
            }
            (_, channel) => {
                return Err(channel_not_allowed(channel, &format!("report a {} loss", kind.as_str())));
            }
        }
        if !matches!(self.physical, PhysicalState::Collected) {
            return Err(Rejection::precondition("NOT_COLLECTED", "only a collected card can be reported lost"));
        }
        self.next(|c| {
            c.social = c.social.apply(SocialEvent::ReportLoss(kind))?;
            Ok(())
        })
    }

    /// R22, R27: lifting a loss lock on the social side.
    pub fn unlock_social(&self, ctx: &Context) -> Result<Card, Rejection> {
        let Some(kind) = self.social.loss_kind() else {
            return Err(Rejection::precondition("NOT_LOSS_LOCKED", "the social function is not loss-locked"));
        };
        match kind {
            LossKind::Temporary => {
                require_channel(
                    ctx,
                    &[Channel::BureauWindow],
                    "unlock after a temporary loss (written unlock at the bureau, R27)",
                )?;
                ctx.require_counter_documents(self.card_type == CardType::Minor, true)?;
            }
            LossKind::Written => {
                require_channel(ctx, &[Channel::BureauWindow], "undo a written loss (R27)")?;
                ctx.require_holder_in_person(true)?;
                if self.replaced_by.is_some() {
                    return Err(Rejection::precondition(
                        "REPLACEMENT_ORDERED",
                        "a written loss cannot be undone once a replacement was ordered",
                    ));
                }
            }
            LossKind::Automatic => {
                require_channel(
                    ctx,
                    &[Channel::BureauWindow, Channel::CommunityPoint],
                    "unlock after an automatic lock (R22)",
                )?;
                ctx.require_counter_documents(self.card_type == CardType::Minor, true)?;
                if self.financial != FinancialState::Active {
                    return Err(Rejection::precondition(
                        "FINANCIAL_NOT_ACTIVE",
                        "activate the financial function at the bank first (R22)",
                    ));
                }
            }
        }
        self.next(|c| {
            c.social = c.social.apply(SocialEvent::Unlock)?;
            // The unlock that follows a financial activation switches the social function on (R22).
            if kind == LossKind::Automatic && c.social == SocialState::NotActivated {
                c.social = SocialState::Active;
            }
            Ok(())
        })
    }

    /// R30: one PIN entry; too many wrong ones lock the social function.
    pub fn pin_attempt(&self, correct: bool, policy: &CityPolicy) -> Result<(Card, PinOutcome), Rejection> {
        if self.social != SocialState::Active {
            return Err(Rejection::precondition(
                if self.social == SocialState::PinLocked { "SOCIAL_PIN_LOCKED" } else { "SOCIAL_NOT_ACTIVE" },
                format!("the social function is {}", self.social.as_str()),
            ));
        }
        let card = self.next(|c| {
            if correct {
                c.pin.wrong_attempts = 0;
            } else {
                c.pin.wrong_attempts += 1;
                if c.pin.wrong_attempts >= policy.social_pin_max_wrong {
                    c.social = c.social.apply(SocialEvent::PinLock)?;
                }
            }
            Ok(())
        })?;
        let outcome = PinOutcome {
            verified: correct,
            remaining_attempts: policy.social_pin_max_wrong.saturating_sub(card.pin.wrong_attempts),
            locked: card.social == SocialState::PinLocked,
        };
        Ok((card, outcome))
    }

    /// R29: a PIN change by phone (12333) or at a window, after the old PIN was checked.
    pub fn change_pin(&self, new_pin: &str, ctx: &Context, policy: &CityPolicy) -> Result<Card, Rejection> {
        require_channel(
            ctx,
            &[
                Channel::Hotline12333SelfService,
                Channel::Hotline12333Operator,
                Channel::BureauWindow,
                Channel::CommunityPoint,
            ],
            "change the social PIN",
        )?;
        validate_pin("new_pin", new_pin)?;
        if new_pin == policy.initial_social_pin(&self.holder) {
            return Err(Rejection::invalid(
                "new_pin",
                "PIN_IS_INITIAL",
                "the new PIN must differ from the initial PIN",
            ));
        }
        if self.social != SocialState::Active {
            return Err(Rejection::precondition(
                "SOCIAL_NOT_ACTIVE",
                format!("the social function is {}", self.social.as_str()),
            ));
        }
        self.next(|c| {
            c.pin = PinState { changed: true, wrong_attempts: 0 };
            Ok(())
        })
    }

    /// R30: a forgotten or locked PIN is reset at a bureau card window with the card and an ID card.
    pub fn reset_pin(&self, new_pin: &str, ctx: &Context, policy: &CityPolicy) -> Result<Card, Rejection> {
        require_channel(ctx, &[Channel::BureauWindow], "reset the social PIN")?;
        ctx.require_counter_documents(self.card_type == CardType::Minor, true)?;
        validate_pin("new_pin", new_pin)?;
        if new_pin == policy.initial_social_pin(&self.holder) {
            return Err(Rejection::invalid(
                "new_pin",
                "PIN_IS_INITIAL",
                "the new PIN must differ from the initial PIN",
            ));
        }
        self.next(|c| {
            c.social = c.social.apply(SocialEvent::PinReset)?;
            c.pin = PinState { changed: true, wrong_attempts: 0 };
            Ok(())
        })
    }

    /// Cancels the card for good (withdrawal, death, emigration).
    pub fn cancel(&self, reason: &str, ctx: &Context) -> Result<Card, Rejection> {
        require_channel(ctx, &[Channel::BureauWindow], "cancel a card")?;
        ctx.require_counter_documents(self.card_type == CardType::Minor, false)?;
        if reason.trim().is_empty() {
            return Err(Rejection::invalid("reason", "CANCEL_REASON_REQUIRED", "a cancellation says why"));
        }
        self.end(PhysicalEvent::Cancel)
    }

    /// R28: the old card is cancelled for good when its replacement is ordered.
    pub fn replace_with(&self, replacement_id: &str) -> Result<Card, Rejection> {
        let mut c = self.end(PhysicalEvent::Replace)?;
        c.replaced_by = Some(replacement_id.to_string());
        Ok(c)
    }

    /// R24: a formal card's collection retires the holder's temporary card.
    pub fn retire_temporary(&self) -> Result<Card, Rejection> {
        if self.card_type != CardType::Temporary {
            return Err(Rejection::precondition("NOT_TEMPORARY", "only a temporary card is retired by a formal one"));
        }
        self.end(PhysicalEvent::Cancel)
    }

    /// R23: a minor card not exchanged in time is disabled.
    pub fn disable(&self, ctx: &Context) -> Result<Card, Rejection> {
        require_channel(ctx, &[Channel::Scheduler], "disable a card")?;
        if self.card_type != CardType::Minor {
            return Err(Rejection::precondition(
                "NOT_MINOR_CARD",
                "only minor cards are disabled for want of exchange (R23)",
            ));
        }
        self.next(|c| {
            c.social = c.social.apply(SocialEvent::Disable)?;
            Ok(())
        })
    }

    fn end(&self, event: PhysicalEvent) -> Result<Card, Rejection> {
        self.next(|c| {
            c.physical = c.physical.apply(event)?;
            c.social = SocialState::Cancelled;
            c.financial = FinancialState::Cancelled;
            Ok(())
        })
    }

    fn require_collected(&self) -> Result<(), Rejection> {
        match self.physical {
            PhysicalState::Collected => Ok(()),
            PhysicalState::Cancelled | PhysicalState::Replaced | PhysicalState::Rejected => {
                Err(Rejection::precondition("CARD_CANCELLED", format!("the card is {}", self.physical.as_str())))
            }
            other => Err(Rejection::precondition(
                "NOT_COLLECTED",
                format!("the card is {}, not yet collected", other.as_str()),
            )),
        }
    }

    /// The national card-application status code (domain.md, standard status codes).
    pub fn status_code(&self) -> &'static str {
        if matches!(self.physical, PhysicalState::Cancelled | PhysicalState::Replaced | PhysicalState::Rejected)
            || self.social == SocialState::Cancelled
        {
            return "9";
        }
        match self.social {
            SocialState::NotActivated => "0",
            SocialState::Active => "1",
            SocialState::LossLocked { kind: LossKind::Written, .. } => "2",
            SocialState::LossLocked { kind: LossKind::Temporary, .. } => "4",
            SocialState::LossLocked { kind: LossKind::Automatic, .. }
            | SocialState::PinLocked
            | SocialState::Disabled => "3",
            SocialState::Cancelled => "9",
        }
    }

    /// A short label of all three states, for the audit trail.
    pub fn state_label(&self) -> String {
        let social = match self.social.loss_kind() {
            Some(k) => format!("loss_locked({})", k.as_str()),
            None => self.social.as_str().to_string(),
        };
        format!("physical={} social={} financial={}", self.physical.as_str(), social, self.financial.as_str())
    }
}

/// R8: the bank a holder may choose.
fn choose_bank(app: &Application, banks: &BankDirectory) -> Result<(), Rejection> {
    if app.bank_code.is_empty() {
        return Err(Rejection::invalid("bank_code", "BANK_REQUIRED", "choose one of the partner banks (R8)"));
    }
    banks.require("bank_code", &app.bank_code)?;
    let not_allowed = |msg: &str| Rejection::invalid("bank_code", "BANK_CHOICE_NOT_ALLOWED", msg);
    match app.holder_status {
        HolderStatus::Retired => {
            if let Some(pension) = app.pension_bank_code.as_deref().filter(|p| banks.contains(p))
                && pension != app.bank_code
            {
                return Err(not_allowed("a retiree whose pension bank is a partner bank takes that bank (R8)"));
            }
        }
        HolderStatus::Employed => {
            let partner_payroll: Vec<&String> = app.payroll_bank_codes.iter().filter(|p| banks.contains(p)).collect();
            if !partner_payroll.is_empty() && !partner_payroll.iter().any(|p| **p == app.bank_code) {
                return Err(not_allowed(
                    "an employee takes one of the employer's payroll banks that is a partner bank (R8)",
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

fn require_channel(ctx: &Context, allowed: &[Channel], what: &str) -> Result<(), Rejection> {
    if allowed.contains(&ctx.channel) { Ok(()) } else { Err(channel_not_allowed(ctx.channel, what)) }
}

fn channel_not_allowed(channel: Channel, what: &str) -> Rejection {
    Rejection::invalid(
        "actor.channel",
        "CHANNEL_NOT_ALLOWED",
        format!("the {} channel cannot {what}", channel.as_str()),
    )
}

/// A social PIN is six ASCII digits.
pub fn validate_pin(field: &'static str, pin: &str) -> Result<(), Rejection> {
    if pin.len() == 6 && pin.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(Rejection {
            kind: RejectionKind::InvalidArgument,
            reason: "PIN_FORMAT",
            message: "a PIN is six digits".into(),
            field: Some(field),
        })
    }
}
