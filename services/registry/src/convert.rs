//! The edge between wire and domain: proto requests become domain values here (rejecting bad input
//! with the field it came from), and domain cards become proto cards. Handlers hold no SQL and no rules.

use socialcard_domain::card::{CollectionMethod, ProductionFailure, ProductionStage, ShipmentProgress};
use socialcard_domain::channel::{Actor, Context, Documents, Presenter};
use socialcard_domain::photo::PhotoSource;
use socialcard_domain::state::{FinancialState, LossKind, PhysicalState, SocialState};
use socialcard_domain::{Card, CardType, Channel, HolderStatus, Rejection};
use socialcard_proto::registry::v1 as pb;
use time::OffsetDateTime;

/// The longest free-text field accepted (names, reasons, ids of sites and operators).
pub const MAX_TEXT: usize = 200;

/// Checks a free-text field: no control characters, bounded length. Returns it trimmed.
pub fn text(field: &'static str, value: &str, max: usize) -> Result<String, Rejection> {
    if value.chars().count() > max {
        return Err(Rejection::invalid(field, "FIELD_TOO_LONG", format!("{field} has more than {max} characters")));
    }
    if value.chars().any(char::is_control) {
        return Err(Rejection::invalid(
            field,
            "FIELD_CONTROL_CHARACTERS",
            format!("{field} contains control characters"),
        ));
    }
    Ok(value.trim().to_string())
}

pub fn optional_text(field: &'static str, value: &str) -> Result<Option<String>, Rejection> {
    let v = text(field, value, MAX_TEXT)?;
    Ok(if v.is_empty() { None } else { Some(v) })
}

pub fn required_text(field: &'static str, value: &str, reason: &'static str) -> Result<String, Rejection> {
    optional_text(field, value)?.ok_or_else(|| Rejection::invalid(field, reason, format!("{field} is required")))
}

/// A phone number: 5 to 20 ASCII digits, an optional leading '+'.
pub fn phone(field: &'static str, value: &str) -> Result<String, Rejection> {
    let digits = value.strip_prefix('+').unwrap_or(value);
    if (5..=20).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) {
        Ok(value.to_string())
    } else {
        Err(Rejection::invalid(field, "PHONE_FORMAT", "a phone number has 5 to 20 ASCII digits"))
    }
}

pub fn idempotency_key(key: &str) -> Result<String, Rejection> {
    if key.is_empty() {
        return Err(Rejection::invalid(
            "idempotency_key",
            "IDEMPOTENCY_KEY_REQUIRED",
            "every mutating call carries an idempotency key",
        ));
    }
    if key.len() > 128 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Rejection::invalid(
            "idempotency_key",
            "IDEMPOTENCY_KEY_FORMAT",
            "an idempotency key is 1 to 128 printable ASCII characters",
        ));
    }
    Ok(key.to_string())
}

pub fn card_id(value: &str) -> Result<String, Rejection> {
    if value.is_empty() {
        return Err(Rejection::invalid("card_id", "CARD_ID_REQUIRED", "card_id is required"));
    }
    uuid::Uuid::parse_str(value)
        .map(|u| u.to_string())
        .map_err(|_| Rejection::invalid("card_id", "CARD_ID_FORMAT", "card_id is a UUID"))
}

fn unknown(field: &'static str) -> Rejection {
    Rejection::invalid(field, "UNKNOWN_ENUM_VALUE", format!("{field} has a value this service does not know"))
}

fn unspecified(field: &'static str) -> Rejection {
    Rejection::invalid(field, "ENUM_UNSPECIFIED", format!("{field} must be set"))
}

pub fn channel(value: i32) -> Result<Channel, Rejection> {
    let field = "actor.channel";
    Ok(match pb::Channel::try_from(value).map_err(|_| unknown(field))? {
        pb::Channel::Unspecified => return Err(unspecified(field)),
        pb::Channel::BankBranch => Channel::BankBranch,
        pb::Channel::EmployerBatch => Channel::EmployerBatch,
        pb::Channel::Online => Channel::Online,
        pb::Channel::CommunityPoint => Channel::CommunityPoint,
        pb::Channel::BureauWindow => Channel::BureauWindow,
        pb::Channel::Hotline => Channel::Hotline,
        pb::Channel::Hotline12333SelfService => Channel::Hotline12333SelfService,
        pb::Channel::Hotline12333Operator => Channel::Hotline12333Operator,
        pb::Channel::MedicalTerminal => Channel::MedicalTerminal,
        pb::Channel::Courier => Channel::Courier,
        pb::Channel::Production => Channel::Production,
        pb::Channel::Scheduler => Channel::Scheduler,
    })
}

pub fn channel_to_pb(c: Channel) -> pb::Channel {
    match c {
        Channel::BankBranch => pb::Channel::BankBranch,
        Channel::EmployerBatch => pb::Channel::EmployerBatch,
        Channel::Online => pb::Channel::Online,
        Channel::CommunityPoint => pb::Channel::CommunityPoint,
        Channel::BureauWindow => pb::Channel::BureauWindow,
        Channel::Hotline => pb::Channel::Hotline,
        Channel::Hotline12333SelfService => pb::Channel::Hotline12333SelfService,
        Channel::Hotline12333Operator => pb::Channel::Hotline12333Operator,
        Channel::MedicalTerminal => pb::Channel::MedicalTerminal,
        Channel::Courier => pb::Channel::Courier,
        Channel::Production => pb::Channel::Production,
        Channel::Scheduler => pb::Channel::Scheduler,
    }
}

pub fn presenter(value: i32) -> Result<Presenter, Rejection> {
    Ok(match pb::Presenter::try_from(value).map_err(|_| unknown("documents.presenter"))? {
        // Unset means the holder came themselves.
        pb::Presenter::Unspecified | pb::Presenter::Holder => Presenter::Holder,
        pb::Presenter::Guardian => Presenter::Guardian,
        pb::Presenter::Agent => Presenter::Agent,
    })
}

pub fn presenter_to_pb(p: Presenter) -> pb::Presenter {
    match p {
        Presenter::Holder => pb::Presenter::Holder,
        Presenter::Guardian => pb::Presenter::Guardian,
        Presenter::Agent => pb::Presenter::Agent,
    }
}

/// The request's actor and documents as the domain's transition context.
pub fn context(actor: Option<&pb::Actor>, documents: Option<&pb::Documents>) -> Result<Context, Rejection> {
    let actor =
        actor.ok_or_else(|| Rejection::invalid("actor", "ACTOR_REQUIRED", "say who acts and through which channel"))?;
    let channel = channel(actor.channel)?;
    let caller_phone =
        if actor.caller_phone.is_empty() { None } else { Some(phone("actor.caller_phone", &actor.caller_phone)?) };
    let domain_actor = Actor {
        operator_id: optional_text("actor.operator_id", &actor.operator_id)?,
        site_id: optional_text("actor.site_id", &actor.site_id)?,
        caller_phone,
        verification_ref: optional_text("actor.verification_ref", &actor.verification_ref)?,
    };
    let docs = match documents {
        Some(d) => Documents {
            presenter: presenter(d.presenter)?,
            holder_id_card: d.holder_id_card,
            household_register: d.household_register,
            card_presented: d.card_presented,
            guardianship_proof: d.guardianship_proof,
            written_authorization: d.written_authorization,
            agent_id_card: d.agent_id_card,
        },
        None => Documents::default(),
    };
    Ok(Context::new(channel).with_actor(domain_actor).with_documents(docs))
}

pub fn actor_to_pb(channel: Channel, a: &Actor) -> pb::Actor {
    pb::Actor {
        channel: channel_to_pb(channel) as i32,
        operator_id: a.operator_id.clone().unwrap_or_default(),
        site_id: a.site_id.clone().unwrap_or_default(),
        caller_phone: a.caller_phone.clone().unwrap_or_default(),
        verification_ref: a.verification_ref.clone().unwrap_or_default(),
    }
}

pub fn documents_to_pb(d: &Documents) -> pb::Documents {
    pb::Documents {
        presenter: presenter_to_pb(d.presenter) as i32,
        holder_id_card: d.holder_id_card,
        household_register: d.household_register,
        card_presented: d.card_presented,
        guardianship_proof: d.guardianship_proof,
        written_authorization: d.written_authorization,
        agent_id_card: d.agent_id_card,
    }
}

pub fn card_type(value: i32) -> Result<CardType, Rejection> {
    Ok(match pb::CardType::try_from(value).map_err(|_| unknown("card_type"))? {
        pb::CardType::Unspecified => return Err(unspecified("card_type")),
        pb::CardType::Adult => CardType::Adult,
        pb::CardType::Minor => CardType::Minor,
        pb::CardType::Temporary => CardType::Temporary,
    })
}

pub fn card_type_to_pb(t: CardType) -> pb::CardType {
    match t {
        CardType::Adult => pb::CardType::Adult,
        CardType::Minor => pb::CardType::Minor,
        CardType::Temporary => pb::CardType::Temporary,
    }
}

pub fn holder_status(value: i32) -> Result<HolderStatus, Rejection> {
    Ok(match pb::HolderStatus::try_from(value).map_err(|_| unknown("holder_status"))? {
        pb::HolderStatus::Unspecified => return Err(unspecified("holder_status")),
        pb::HolderStatus::Employed => HolderStatus::Employed,
        pb::HolderStatus::Unemployed => HolderStatus::Unemployed,
        pb::HolderStatus::Retired => HolderStatus::Retired,
        pb::HolderStatus::Student => HolderStatus::Student,
        pb::HolderStatus::Child => HolderStatus::Child,
    })
}

pub fn holder_status_to_pb(s: HolderStatus) -> pb::HolderStatus {
    match s {
        HolderStatus::Employed => pb::HolderStatus::Employed,
        HolderStatus::Unemployed => pb::HolderStatus::Unemployed,
        HolderStatus::Retired => pb::HolderStatus::Retired,
        HolderStatus::Student => pb::HolderStatus::Student,
        HolderStatus::Child => pb::HolderStatus::Child,
    }
}

pub fn photo_source(value: i32) -> Result<PhotoSource, Rejection> {
    Ok(match pb::PhotoSource::try_from(value).map_err(|_| unknown("photo.source"))? {
        pb::PhotoSource::Unspecified => return Err(unspecified("photo.source")),
        pb::PhotoSource::None => PhotoSource::None,
        pb::PhotoSource::CommunityPoint => PhotoSource::CommunityPoint,
        pb::PhotoSource::IdCard => PhotoSource::IdCard,
        pb::PhotoSource::StudentCard => PhotoSource::StudentCard,
        pb::PhotoSource::Upload => PhotoSource::Upload,
    })
}

pub fn loss_kind(value: i32) -> Result<LossKind, Rejection> {
    Ok(match pb::LossKind::try_from(value).map_err(|_| unknown("loss_kind"))? {
        pb::LossKind::Unspecified => return Err(unspecified("loss_kind")),
        pb::LossKind::Temporary => LossKind::Temporary,
        pb::LossKind::Written => LossKind::Written,
        pb::LossKind::Automatic => LossKind::Automatic,
    })
}

pub fn loss_kind_to_pb(k: Option<LossKind>) -> pb::LossKind {
    match k {
        None => pb::LossKind::Unspecified,
        Some(LossKind::Temporary) => pb::LossKind::Temporary,
        Some(LossKind::Written) => pb::LossKind::Written,
        Some(LossKind::Automatic) => pb::LossKind::Automatic,
    }
}

pub fn production_failure(f: &pb::ProductionFailure) -> Result<ProductionFailure, Rejection> {
    let stage = match pb::ProductionStage::try_from(f.stage).map_err(|_| unknown("failure.stage"))? {
        pb::ProductionStage::Unspecified => return Err(unspecified("failure.stage")),
        pb::ProductionStage::BankAccount => ProductionStage::BankAccount,
        pb::ProductionStage::CardFactory => ProductionStage::CardFactory,
        pb::ProductionStage::KeyInitialisation => ProductionStage::KeyInitialisation,
    };
    Ok(ProductionFailure { stage, reason: text("failure.reason", &f.reason, MAX_TEXT)? })
}

pub fn production_failure_to_pb(f: &ProductionFailure) -> pb::ProductionFailure {
    pb::ProductionFailure {
        stage: match f.stage {
            ProductionStage::BankAccount => pb::ProductionStage::BankAccount,
            ProductionStage::CardFactory => pb::ProductionStage::CardFactory,
            ProductionStage::KeyInitialisation => pb::ProductionStage::KeyInitialisation,
        } as i32,
        reason: f.reason.clone(),
    }
}

pub fn shipment_progress(value: i32) -> Result<ShipmentProgress, Rejection> {
    Ok(match pb::ShipmentProgress::try_from(value).map_err(|_| unknown("progress"))? {
        pb::ShipmentProgress::Unspecified => return Err(unspecified("progress")),
        pb::ShipmentProgress::Dispatched => ShipmentProgress::Dispatched,
        pb::ShipmentProgress::DeliveryFailed => ShipmentProgress::DeliveryFailed,
        pb::ShipmentProgress::AtBackupPoint => ShipmentProgress::AtBackupPoint,
    })
}

pub fn collection_method(value: i32) -> Result<CollectionMethod, Rejection> {
    Ok(match pb::CollectionMethod::try_from(value).map_err(|_| unknown("method"))? {
        pb::CollectionMethod::Unspecified => return Err(unspecified("method")),
        pb::CollectionMethod::Delivered => CollectionMethod::Delivered,
        pb::CollectionMethod::PickedUpAtPoint => CollectionMethod::PickedUpAtPoint,
        pb::CollectionMethod::InstantIssue => CollectionMethod::InstantIssue,
    })
}

pub fn timestamp(t: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.unix_timestamp(), nanos: i32::try_from(t.nanosecond()).unwrap_or(0) }
}

pub fn from_timestamp(field: &'static str, t: &prost_types::Timestamp) -> Result<OffsetDateTime, Rejection> {
    let nanos = i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(Rejection::invalid(field, "TIMESTAMP_INVALID", format!("{field} is not a valid timestamp")));
    }
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .map_err(|_| Rejection::invalid(field, "TIMESTAMP_INVALID", format!("{field} is out of range")))
}

pub fn physical_to_pb(s: PhysicalState) -> pb::PhysicalState {
    match s {
        PhysicalState::Applied => pb::PhysicalState::Applied,
        PhysicalState::Approved => pb::PhysicalState::Approved,
        PhysicalState::Rejected => pb::PhysicalState::Rejected,
        PhysicalState::InProduction => pb::PhysicalState::InProduction,
        PhysicalState::ProductionFailed => pb::PhysicalState::ProductionFailed,
        PhysicalState::Produced => pb::PhysicalState::Produced,
        PhysicalState::Dispatched => pb::PhysicalState::Dispatched,
        PhysicalState::DeliveryFailed => pb::PhysicalState::DeliveryFailed,
        PhysicalState::AtBackupPoint => pb::PhysicalState::AtBackupPoint,
        PhysicalState::Collected => pb::PhysicalState::Collected,
        PhysicalState::ReturnedForRemake => pb::PhysicalState::ReturnedForRemake,
        PhysicalState::Replaced => pb::PhysicalState::Replaced,
        PhysicalState::Cancelled => pb::PhysicalState::Cancelled,
    }
}

pub fn social_to_pb(s: SocialState) -> pb::SocialState {
    match s {
        SocialState::NotActivated => pb::SocialState::NotActivated,
        SocialState::Active => pb::SocialState::Active,
        SocialState::LossLocked { .. } => pb::SocialState::LossLocked,
        SocialState::PinLocked => pb::SocialState::PinLocked,
        SocialState::Disabled => pb::SocialState::Disabled,
        SocialState::Cancelled => pb::SocialState::Cancelled,
    }
}

pub fn financial_to_pb(s: FinancialState) -> pb::FinancialState {
    match s {
        FinancialState::NotActivated => pb::FinancialState::NotActivated,
        FinancialState::Active => pb::FinancialState::Active,
        FinancialState::Frozen { .. } => pb::FinancialState::Frozen,
        FinancialState::Cancelled => pb::FinancialState::Cancelled,
    }
}

pub fn card_to_pb(c: &Card) -> pb::Card {
    pb::Card {
        card_id: c.id.clone(),
        citizen_id_masked: c.holder.masked(),
        card_type: card_type_to_pb(c.card_type) as i32,
        bank_code: c.bank_code.clone(),
        card_number: c.card_number.as_ref().map(|n| n.as_str().to_string()).unwrap_or_default(),
        account_number_masked: c.account_number.as_ref().map(|a| a.masked()).unwrap_or_default(),
        physical_state: physical_to_pb(c.physical) as i32,
        social_state: social_to_pb(c.social) as i32,
        social_loss_kind: loss_kind_to_pb(c.social.loss_kind()) as i32,
        financial_state: financial_to_pb(c.financial) as i32,
        financial_freeze_kind: loss_kind_to_pb(match c.financial {
            FinancialState::Frozen { kind, .. } => Some(kind),
            _ => None,
        }) as i32,
        status_code: c.status_code().to_string(),
        application_channel: channel_to_pb(c.application_channel) as i32,
        holder_status: holder_status_to_pb(c.holder_status) as i32,
        fee_fen: c.fee_fen,
        backup_point_id: c.backup_point_id.clone(),
        applied_at: Some(timestamp(c.applied_at)),
        collected_at: c.collected_at.map(timestamp),
        social_pin_changed: c.pin.changed,
        rejection_reason: c.rejection_reason.clone().unwrap_or_default(),
        last_production_failure: c.last_production_failure.as_ref().map(production_failure_to_pb),
        replaces_card_id: c.replaces.clone().unwrap_or_default(),
        replaced_by_card_id: c.replaced_by.clone().unwrap_or_default(),
        expires_at: c.expires_at.map(timestamp),
        version: c.version,
    }
}
