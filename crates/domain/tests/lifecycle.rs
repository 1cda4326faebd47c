//! Random operation sequences through every entry point of the card aggregate never reach a state the
//! rules forbid, and a refused operation never changes anything.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use socialcard_domain::card::{
    CollectionMethod, DeliveryAddress, PinState, ProductionFailure, ProductionStage, ShipmentProgress,
};
use socialcard_domain::channel::{Actor, Context, Documents, Presenter};
use socialcard_domain::numbers::luhn_check_digit;
use socialcard_domain::photo::PhotoSource;
use socialcard_domain::state::{FinancialState, LossKind, PhysicalState, SocialState};
use socialcard_domain::{
    Application, BankAccountNumber, BankDirectory, Card, CardNumber, CardType, Channel, CitizenId, CityPolicy,
    HolderStatus,
};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

const START: OffsetDateTime = datetime!(2026-11-23 02:00 UTC);

#[derive(Clone, Debug)]
enum Op {
    Review(bool),
    StartProduction,
    ProductionOk(bool),
    ProductionFailed,
    Shipment(ShipmentProgress),
    Collect(CollectionMethod),
    Remake,
    ActivateSocial(Channel, bool),
    FinancialActivation(bool, bool, bool),
    ReportLoss(LossKind, Channel),
    Unlock(Channel),
    Pin(bool),
    ChangePin,
    ResetPin,
    Cancel,
    Disable,
    Wait(i64),
}

fn channel() -> impl Strategy<Value = Channel> {
    prop_oneof![
        Just(Channel::BankBranch),
        Just(Channel::Online),
        Just(Channel::CommunityPoint),
        Just(Channel::BureauWindow),
        Just(Channel::Hotline),
        Just(Channel::Hotline12333SelfService),
        Just(Channel::Hotline12333Operator),
        Just(Channel::MedicalTerminal),
        Just(Channel::Courier),
        Just(Channel::Production),
        Just(Channel::Scheduler),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let loss = prop_oneof![Just(LossKind::Temporary), Just(LossKind::Written), Just(LossKind::Automatic)];
    prop_oneof![
        any::<bool>().prop_map(Op::Review),
        Just(Op::StartProduction),
        any::<bool>().prop_map(Op::ProductionOk),
        Just(Op::ProductionFailed),
        prop_oneof![
            Just(ShipmentProgress::Dispatched),
            Just(ShipmentProgress::DeliveryFailed),
            Just(ShipmentProgress::AtBackupPoint)
        ]
        .prop_map(Op::Shipment),
        prop_oneof![
            Just(CollectionMethod::Delivered),
            Just(CollectionMethod::PickedUpAtPoint),
            Just(CollectionMethod::InstantIssue)
        ]
        .prop_map(Op::Collect),
        Just(Op::Remake),
        (channel(), any::<bool>()).prop_map(|(c, p)| Op::ActivateSocial(c, p)),
        (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(a, b, c)| Op::FinancialActivation(a, b, c)),
        (loss, channel()).prop_map(|(k, c)| Op::ReportLoss(k, c)),
        channel().prop_map(Op::Unlock),
        any::<bool>().prop_map(Op::Pin),
        Just(Op::ChangePin),
        Just(Op::ResetPin),
        Just(Op::Cancel),
        Just(Op::Disable),
        (1i64..400).prop_map(Op::Wait),
    ]
}

fn ctx(channel: Channel) -> Context {
    Context::new(channel)
        .with_actor(Actor {
            operator_id: Some("op-1".into()),
            site_id: Some("site-1".into()),
            caller_phone: Some("13800000000".into()),
            verification_ref: Some("face-1".into()),
        })
        .with_documents(Documents {
            presenter: Presenter::Holder,
            holder_id_card: true,
            card_presented: true,
            ..Documents::default()
        })
}

fn account(prefix: &str) -> BankAccountNumber {
    let body = format!("{prefix}000000000123");
    BankAccountNumber::parse(&format!("{body}{}", luhn_check_digit(&body))).unwrap()
}

fn new_card(card_type: CardType) -> Card {
    let holder = if card_type == CardType::Minor { "31010520150601002" } else { "31010519800601002" };
    let holder = format!("{holder}{}", socialcard_domain::citizen_id::check_char(holder.as_bytes()) as char);
    let app = Application {
        holder: CitizenId::parse(&holder, START.date()).unwrap(),
        registered_phone: "13800000000".into(),
        card_type,
        holder_status: if card_type == CardType::Minor { HolderStatus::Student } else { HolderStatus::Employed },
        bank_code: "icbc".into(),
        pension_bank_code: None,
        payroll_bank_codes: vec![],
        employer_id: None,
        photo_source: PhotoSource::CommunityPoint,
        backup_point_id: "point-1".into(),
        delivery: None,
        replaces: None,
    };
    Card::apply_for(
        "card-1".into(),
        app,
        &ctx(Channel::CommunityPoint),
        START,
        &CityPolicy::shanghai(),
        &BankDirectory::shanghai(),
        &[],
    )
    .unwrap()
}

fn step(card: &Card, op: &Op, now: &mut OffsetDateTime, policy: &CityPolicy, banks: &BankDirectory) -> Option<Card> {
    let r = match op.clone() {
        Op::Review(approve) => card.review(approve, "photo unclear", &ctx(Channel::BureauWindow)),
        Op::StartProduction => card.start_production(CardNumber::issue('A', 1), &ctx(Channel::Production)),
        Op::ProductionOk(with_account) => card.production_succeeded(
            with_account.then(|| account("621226")),
            &ctx(Channel::Production),
            *now,
            policy,
            banks,
        ),
        Op::ProductionFailed => card.production_failed(
            ProductionFailure { stage: ProductionStage::CardFactory, reason: "chip".into() },
            &ctx(Channel::Production),
        ),
        Op::Shipment(p) => card.shipment(p, &ctx(Channel::Courier)),
        Op::Collect(m) => {
            let c = match m {
                CollectionMethod::Delivered => Channel::Courier,
                _ => Channel::CommunityPoint,
            };
            card.collect(m, *now, &ctx(c), *now)
        }
        Op::Remake => card.return_for_remake("name misspelt", &ctx(Channel::BureauWindow)),
        Op::ActivateSocial(c, proxy) => {
            let mut x = ctx(c);
            if proxy {
                x.documents.presenter = Presenter::Agent;
            }
            card.activate_social(&x, *now)
        }
        Op::FinancialActivation(right_bank, pin_changed, in_person) => card
            .record_financial_activation(
                if right_bank { "icbc" } else { "ccb" },
                "face-1",
                pin_changed,
                if in_person { Presenter::Holder } else { Presenter::Agent },
                &ctx(Channel::BankBranch),
                banks,
            )
            .map(|(c, _)| c),
        Op::ReportLoss(k, c) => card.report_loss(k, &ctx(c), *now, policy),
        Op::Unlock(c) => card.unlock_social(&ctx(c)),
        Op::Pin(ok) => card.pin_attempt(ok, policy).map(|(c, _)| c),
        Op::ChangePin => card.change_pin("852741", &ctx(Channel::Hotline12333SelfService), policy),
        Op::ResetPin => card.reset_pin("852741", &ctx(Channel::BureauWindow), policy),
        Op::Cancel => card.cancel("moved away", &ctx(Channel::BureauWindow)),
        Op::Disable => card.disable(&ctx(Channel::Scheduler)),
        Op::Wait(days) => {
            *now += Duration::days(days);
            return None;
        }
    };
    r.ok()
}

/// The rules no sequence may break.
fn check_invariants(card: &Card, history: &[(Op, bool)]) -> Result<(), TestCaseError> {
    // An active, PIN-locked or loss-locked social function implies a card in the holder's hands.
    if matches!(card.social, SocialState::Active | SocialState::PinLocked | SocialState::LossLocked { .. }) {
        prop_assert!(
            card.physical == PhysicalState::Collected,
            "social {:?} on a {:?} card; {:?}",
            card.social,
            card.physical,
            history
        );
    }
    if matches!(card.financial, FinancialState::Active | FinancialState::Frozen { was_active: true, .. }) {
        prop_assert!(card.physical == PhysicalState::Collected, "financial on a {:?} card", card.physical);
        prop_assert!(card.card_type != CardType::Temporary, "a temporary card with a financial function");
        prop_assert!(card.social != SocialState::NotActivated, "financial active while social never switched on (R20)");
    }
    if card.physical.is_terminal() {
        prop_assert_eq!(card.social, SocialState::Cancelled);
        prop_assert_eq!(card.financial, FinancialState::Cancelled);
    }
    if card.social == SocialState::Cancelled {
        prop_assert!(card.physical.is_terminal(), "social cancelled on a live card");
    }
    prop_assert_eq!(
        card.collected_at.is_some(),
        card.physical == PhysicalState::Collected || (card.physical.is_terminal() && card.collected_at.is_some())
    );
    let produced_once =
        !matches!(card.physical, PhysicalState::Applied | PhysicalState::Approved | PhysicalState::Rejected);
    if produced_once && card.physical != PhysicalState::Cancelled {
        prop_assert!(card.card_number.is_some(), "a card past approval without a number");
    }
    if card.social != SocialState::PinLocked {
        prop_assert!(card.pin.wrong_attempts < CityPolicy::shanghai().social_pin_max_wrong);
    }
    if card.card_type != CardType::Temporary
        && matches!(card.physical, PhysicalState::Produced | PhysicalState::Dispatched | PhysicalState::Collected)
    {
        prop_assert!(card.account_number.is_some(), "a produced formal card without an account");
    }
    Ok(())
}

/// The card's optional fields, as the registry's stored JSON names them: whether each is absent, and
/// whether it is left out of the JSON when absent (registries before the compact form required
/// `collected_at`, `expires_at` and `pin`, so those are always written).
fn optional_fields(card: &Card) -> [(&'static str, bool, bool); 10] {
    [
        ("delivery", card.delivery.is_none(), true),
        ("card_number", card.card_number.is_none(), true),
        ("account_number", card.account_number.is_none(), true),
        ("collected_at", card.collected_at.is_none(), false),
        ("expires_at", card.expires_at.is_none(), false),
        ("pin", card.pin == PinState::default(), false),
        ("rejection_reason", card.rejection_reason.is_none(), true),
        ("last_production_failure", card.last_production_failure.is_none(), true),
        ("replaces", card.replaces.is_none(), true),
        ("replaced_by", card.replaced_by.is_none(), true),
    ]
}

/// The card as the registry stores it (JSON, absent fields left out) reads back the same, and so does
/// the form written before, with every field spelled out; also with a delivery address and both links
/// to other cards, which the random sequences never set.
fn check_stored_form(card: &Card) -> Result<(), TestCaseError> {
    let mut linked = card.clone();
    linked.delivery = Some(DeliveryAddress {
        recipient: "Li Lei".into(),
        phone: "13800000001".into(),
        line: "1 Road".into(),
        district: "Xuhui".into(),
        postal_code: "200030".into(),
    });
    linked.replaces = Some("card-0".into());
    linked.replaced_by = Some("card-2".into());
    for card in [card, &linked] {
        let stored = serde_json::to_string(card).unwrap();
        prop_assert_eq!(&serde_json::from_str::<Card>(&stored).unwrap(), card);
        let mut spelled_out: serde_json::Value = serde_json::from_str(&stored).unwrap();
        let fields = spelled_out.as_object_mut().unwrap();
        for (key, absent, left_out) in optional_fields(card) {
            prop_assert_eq!(fields.contains_key(key), !(absent && left_out), "{} stored: {}", key, stored);
            if absent && left_out {
                fields.insert(key.to_string(), serde_json::Value::Null);
            }
        }
        prop_assert_eq!(&serde_json::from_value::<Card>(spelled_out).unwrap(), card);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_sequences_keep_every_rule(ops in proptest::collection::vec(op(), 1..60), card_type in prop_oneof![Just(CardType::Adult), Just(CardType::Minor), Just(CardType::Temporary)]) {
        let policy = CityPolicy::shanghai();
        let banks = BankDirectory::shanghai();
        let mut card = new_card(card_type);
        let mut now = START;
        let mut history = Vec::new();
        for op in &ops {
            let before = card.clone();
            match step(&card, op, &mut now, &policy, &banks) {
                Some(next) => {
                    prop_assert_eq!(next.version, before.version + 1, "every change bumps the version");
                    card = next;
                    history.push((op.clone(), true));
                }
                None => {
                    prop_assert_eq!(&card, &before);
                    history.push((op.clone(), false));
                }
            }
            check_invariants(&card, &history)?;
            check_stored_form(&card)?;
        }
    }
}

#[test]
fn a_bank_activation_switches_the_social_function_on() {
    let policy = CityPolicy::shanghai();
    let banks = BankDirectory::shanghai();
    let mut now = START;
    let mut card = new_card(CardType::Adult);
    for op in [
        Op::Review(true),
        Op::StartProduction,
        Op::ProductionOk(true),
        Op::Collect(CollectionMethod::PickedUpAtPoint),
        Op::FinancialActivation(true, true, true),
    ] {
        card = step(&card, &op, &mut now, &policy, &banks).unwrap_or_else(|| panic!("{op:?} refused"));
    }
    assert_eq!(card.social, SocialState::Active);
    assert_eq!(card.financial, FinancialState::Active);
    assert_eq!(card.status_code(), "1");
}

#[test]
fn r22_lock_then_bank_activation_then_bureau_unlock() {
    let policy = CityPolicy::shanghai();
    let banks = BankDirectory::shanghai();
    let mut now = START;
    let mut card = new_card(CardType::Adult);
    for op in
        [Op::Review(true), Op::StartProduction, Op::ProductionOk(true), Op::Collect(CollectionMethod::PickedUpAtPoint)]
    {
        card = step(&card, &op, &mut now, &policy, &banks).unwrap();
    }
    // Too early.
    let early = card
        .report_loss(LossKind::Automatic, &ctx(Channel::Scheduler), now + Duration::days(299), &policy)
        .unwrap_err();
    assert_eq!(early.reason, "DEADLINE_NOT_REACHED");
    let later = now + Duration::days(300);
    card = card.report_loss(LossKind::Automatic, &ctx(Channel::Scheduler), later, &policy).unwrap();
    // The bureau cannot unlock before the bank activation.
    assert_eq!(card.unlock_social(&ctx(Channel::BureauWindow)).unwrap_err().reason, "FINANCIAL_NOT_ACTIVE");
    let (activated, awaits) = card
        .record_financial_activation("icbc", "face", true, Presenter::Holder, &ctx(Channel::BankBranch), &banks)
        .unwrap();
    assert!(awaits);
    assert_eq!(activated.financial, FinancialState::Active);
    assert_eq!(activated.social.loss_kind(), Some(LossKind::Automatic));
    let unlocked = activated.unlock_social(&ctx(Channel::BureauWindow)).unwrap();
    assert_eq!(unlocked.social, SocialState::Active);
}

#[test]
fn temporary_loss_blocks_the_bank_and_needs_a_written_unlock_at_the_bureau() {
    let policy = CityPolicy::shanghai();
    let banks = BankDirectory::shanghai();
    let mut now = START;
    let mut card = new_card(CardType::Adult);
    for op in
        [Op::Review(true), Op::StartProduction, Op::ProductionOk(true), Op::Collect(CollectionMethod::PickedUpAtPoint)]
    {
        card = step(&card, &op, &mut now, &policy, &banks).unwrap();
    }
    let locked = card.report_loss(LossKind::Temporary, &ctx(Channel::Hotline), now, &policy).unwrap();
    let refused = locked
        .record_financial_activation("icbc", "face", true, Presenter::Holder, &ctx(Channel::BankBranch), &banks)
        .unwrap_err();
    assert_eq!(refused.reason, "CARD_LOSS_LOCKED");
    assert_eq!(locked.unlock_social(&ctx(Channel::CommunityPoint)).unwrap_err().reason, "CHANNEL_NOT_ALLOWED");
    assert_eq!(locked.unlock_social(&ctx(Channel::BureauWindow)).unwrap().social, SocialState::NotActivated);
}
