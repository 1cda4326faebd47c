//! Idempotency conformance (issue 8): for every mutating RPC of the registry, the bank adapter and the
//! loss coordinator, 100 concurrent calls with one key give one effect and 100 identical answers, and the
//! same key with another payload is refused with ALREADY_EXISTS `IDEMPOTENCY_KEY_REUSED`. The effect is
//! measured where it lands: the card's version (one change), the audit trail, the adapters' events.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::fmt::Debug;
use std::future::Future;

use socialcard_proto::bank::v1 as bank;
use socialcard_proto::loss::v1 as loss;
use socialcard_proto::registry::v1 as reg;
use support::*;
use tonic::{Code, Status};

const CALLS: usize = 100;

/// Fires `CALLS` concurrent calls of `call` and checks they all answer the same, successfully.
async fn hammer<T, F, Fut>(rpc: &str, call: F) -> T
where
    T: PartialEq + Debug + Send + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = Result<T, Status>> + Send + 'static,
{
    let tasks: Vec<_> = (0..CALLS).map(|_| tokio::spawn(call())).collect();
    let mut answers = Vec::with_capacity(CALLS);
    for t in tasks {
        answers.push(t.await.unwrap().unwrap_or_else(|e| panic!("{rpc}: a retry failed: {e:?}")));
    }
    let first = answers.remove(0);
    assert!(answers.iter().all(|a| *a == first), "{rpc}: the retries answered differently");
    first
}

fn assert_reused<T: Debug>(rpc: &str, r: Result<T, Status>) {
    let e = r.expect_err(rpc);
    assert_eq!(e.code(), Code::AlreadyExists, "{rpc}: {e:?}");
    assert_eq!(reason_of(&e).as_deref(), Some("IDEMPOTENCY_KEY_REUSED"), "{rpc}");
}

macro_rules! conform {
    ($rpc:literal, $client:expr, $method:ident, $req:expr, $other:expr) => {{
        let req = $req;
        let client = $client.clone();
        let answer = hammer($rpc, || {
            let mut c = client.clone();
            let r = req.clone();
            async move { c.$method(r).await.map(|a| a.into_inner()) }
        })
        .await;
        let mut other = $other(req.clone());
        other.idempotency_key = req.idempotency_key.clone();
        assert_reused($rpc, $client.clone().$method(other).await);
        answer
    }};
}

/// Waits until the registry has mirrored `n` of the bank's freezes and unfreezes of the card (it applies
/// them from the adapter's events, asynchronously).
async fn mirrored(city: &City, card_id: &str, n: usize) {
    let start = std::time::Instant::now();
    while city.audited(card_id, "financial_freeze").await < n {
        assert!(start.elapsed() < std::time::Duration::from_secs(20), "the registry never mirrored the bank's freeze");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_mutating_call_has_one_effect_under_a_hundred_concurrent_retries() {
    let city = City::start().await;
    let lc = city.coordinator().await.client;
    let registry = city.registry.clone();
    let icbc = city.bank("icbc");
    let id = socialcard_registry::fixtures::adult_citizen_id(901);

    conform!(
        "RegisterPerson",
        registry,
        register_person,
        reg::RegisterPersonRequest {
            idempotency_key: key(),
            citizen_id: id.clone(),
            name: "Zhao Lei".into(),
            phone: "13800000000".into(),
        },
        |r: reg::RegisterPersonRequest| reg::RegisterPersonRequest { name: "Someone Else".into(), ..r }
    );

    let applied = conform!(
        "SubmitApplication",
        registry,
        submit_application,
        reg::SubmitApplicationRequest {
            idempotency_key: key(),
            citizen_id: id.clone(),
            actor: actor(reg::Channel::CommunityPoint),
            documents: holder(false),
            card_type: reg::CardType::Adult as i32,
            holder_status: reg::HolderStatus::Unemployed as i32,
            bank_code: "icbc".into(),
            photo: Some(reg::Photo { source: reg::PhotoSource::CommunityPoint as i32, ..Default::default() }),
            backup_point_id: "point-1".into(),
            ..Default::default()
        },
        |r: reg::SubmitApplicationRequest| reg::SubmitApplicationRequest { bank_code: "ccb".into(), ..r }
    );
    let card_id = applied.card.unwrap().card_id;
    let person =
        registry.clone().get_person(reg::GetPersonRequest { citizen_id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(person.cards.len(), 1, "one application, not a hundred");

    let version = |c: &City, id: String| {
        let c = c.registry.clone();
        async move {
            let mut c = c;
            c.get_card(reg::GetCardRequest { lookup: Some(reg::get_card_request::Lookup::CardId(id)) })
                .await
                .unwrap()
                .into_inner()
                .card
                .unwrap()
                .version
        }
    };
    // Each step below must move the card by exactly one version.
    macro_rules! one_change {
        ($card:expr, $rpc:literal, $client:expr, $method:ident, $req:expr, $other:expr) => {{
            let before = version(&city, $card.clone()).await;
            let answer = conform!($rpc, $client, $method, $req, $other);
            assert_eq!(version(&city, $card.clone()).await, before + 1, "{}: one change", $rpc);
            answer
        }};
    }

    one_change!(
        card_id,
        "ReviewApplication",
        registry,
        review_application,
        reg::ReviewApplicationRequest {
            idempotency_key: key(),
            card_id: card_id.clone(),
            actor: actor(reg::Channel::BureauWindow),
            decision: reg::ReviewDecision::Approve as i32,
            reason: String::new(),
        },
        |r: reg::ReviewApplicationRequest| reg::ReviewApplicationRequest {
            decision: reg::ReviewDecision::Reject as i32,
            reason: "no".into(),
            ..r
        }
    );
    let started = one_change!(
        card_id,
        "StartProduction",
        registry,
        start_production,
        reg::StartProductionRequest {
            idempotency_key: key(),
            card_id: card_id.clone(),
            actor: actor(reg::Channel::Production),
            batch_id: "b-1".into(),
        },
        |r: reg::StartProductionRequest| reg::StartProductionRequest { batch_id: "b-2".into(), ..r }
    );
    let number = started.card.unwrap().card_number;
    let body = "621226000000009010";
    let account = format!("{body}{}", socialcard_domain::numbers::luhn_check_digit(body));
    one_change!(
        card_id,
        "RecordProductionResult",
        registry,
        record_production_result,
        reg::RecordProductionResultRequest {
            idempotency_key: key(),
            card_id: card_id.clone(),
            actor: actor(reg::Channel::Production),
            result: Some(reg::record_production_result_request::Result::AccountNumber(account)),
        },
        |r: reg::RecordProductionResultRequest| reg::RecordProductionResultRequest {
            result: Some(reg::record_production_result_request::Result::Failure(reg::ProductionFailure {
                stage: reg::ProductionStage::CardFactory as i32,
                reason: "chip".into(),
            })),
            ..r
        }
    );
    one_change!(
        card_id,
        "RecordShipmentProgress",
        registry,
        record_shipment_progress,
        reg::RecordShipmentProgressRequest {
            idempotency_key: key(),
            card_id: card_id.clone(),
            actor: actor(reg::Channel::Courier),
            progress: reg::ShipmentProgress::Dispatched as i32,
            waybill: "EA000000001CN".into(),
        },
        |r: reg::RecordShipmentProgressRequest| reg::RecordShipmentProgressRequest {
            waybill: "EA000000002CN".into(),
            ..r
        }
    );
    one_change!(
        card_id,
        "RecordCollection",
        registry,
        record_collection,
        reg::RecordCollectionRequest {
            idempotency_key: key(),
            card_id: card_id.clone(),
            actor: actor(reg::Channel::Courier),
            method: reg::CollectionMethod::Delivered as i32,
            collected_at: None,
            documents: None,
        },
        |r: reg::RecordCollectionRequest| reg::RecordCollectionRequest {
            method: reg::CollectionMethod::PickedUpAtPoint as i32,
            ..r
        }
    );

    // The bank's activation: one financial activation, one FinancialActivated event.
    let activation = bank::ActivateFinancialRequest {
        idempotency_key: key(),
        card_number: number.clone(),
        teller_id: "teller-1".into(),
        branch_id: "branch-9".into(),
        face_verification_ref: "face-1".into(),
        bank_pin_changed: true,
    };
    one_change!(
        card_id,
        "ActivateFinancial",
        icbc,
        activate_financial,
        activation,
        |r: bank::ActivateFinancialRequest| { bank::ActivateFinancialRequest { branch_id: "branch-1".into(), ..r } }
    );
    assert_eq!(city.bank_events("icbc", &card_id, "socialcard.financial.v1.FinancialActivated").await, 1);
    one_change!(
        card_id,
        "CancelActivation",
        icbc,
        cancel_activation,
        bank::CancelActivationRequest {
            idempotency_key: key(),
            card_number: number.clone(),
            reason: "core rolled back".into()
        },
        |r: bank::CancelActivationRequest| bank::CancelActivationRequest { reason: "another".into(), ..r }
    );
    assert_eq!(city.bank_events("icbc", &card_id, "socialcard.financial.v1.FinancialActivationRolledBack").await, 1);

    // PINs: a hundred retries of one wrong entry count once (R30).
    let pin = hammer("VerifySocialPin", || {
        let mut c = registry.clone();
        let r = reg::VerifySocialPinRequest {
            idempotency_key: "pin-attempt-1".into(),
            card_id: card_id.clone(),
            actor: actor(reg::Channel::MedicalTerminal),
            pin: "000000".into(),
        };
        async move { c.verify_social_pin(r).await.map(|a| a.into_inner()) }
    })
    .await;
    assert!(!pin.verified);
    let next = registry
        .clone()
        .verify_social_pin(reg::VerifySocialPinRequest {
            idempotency_key: key(),
            card_id: card_id.clone(),
            actor: actor(reg::Channel::MedicalTerminal),
            pin: "000000".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next.remaining_attempts + 1, pin.remaining_attempts, "the hundred retries counted once");
    one_change!(
        card_id,
        "ChangeSocialPin",
        registry,
        change_social_pin,
        reg::ChangeSocialPinRequest {
            idempotency_key: key(),
            card_id: card_id.clone(),
            actor: actor(reg::Channel::Hotline12333SelfService),
            old_pin: "123456".into(),
            new_pin: "802417".into(),
        },
        |r: reg::ChangeSocialPinRequest| reg::ChangeSocialPinRequest { new_pin: "802418".into(), ..r }
    );
    one_change!(
        card_id,
        "ResetSocialPin",
        registry,
        reset_social_pin,
        reg::ResetSocialPinRequest {
            idempotency_key: key(),
            card_id: card_id.clone(),
            actor: actor(reg::Channel::BureauWindow),
            documents: holder(true),
            new_pin: "246810".into(),
        },
        |r: reg::ResetSocialPinRequest| reg::ResetSocialPinRequest { new_pin: "246811".into(), ..r }
    );

    // A loss through the coordinator: one case, one lock, one freeze.
    let case = conform!(
        "LossCoordinator.ReportLoss",
        lc,
        report_loss,
        report(&card_id, reg::LossKind::Temporary, reg::Channel::Hotline),
        |r: loss::ReportLossRequest| loss::ReportLossRequest { actor: actor(reg::Channel::Hotline12333Operator), ..r }
    )
    .loss_case
    .unwrap();
    assert_eq!(case.state, loss::CaseState::Locked as i32, "{case:?}");
    assert_eq!(city.audited(&card_id, "loss_lock").await, 1);
    assert_eq!(city.bank_events("icbc", &card_id, "socialcard.financial.v1.FinancialFrozen").await, 1);
    // The registry mirrors the bank's freeze from its event, a change of the card of its own: let it land
    // before counting the unlock's change.
    mirrored(&city, &card_id, 1).await;
    let cases = lc
        .clone()
        .list_cases(loss::ListCasesRequest { card_id: card_id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .cases;
    assert_eq!(cases.len(), 1);
    one_change!(
        card_id,
        "LossCoordinator.Unlock",
        lc,
        unlock,
        unlock(&card_id, reg::Channel::BureauWindow, true),
        |r: loss::UnlockRequest| loss::UnlockRequest { documents: holder(false), ..r }
    );
    conform!(
        "UnlockFinancial",
        icbc,
        unlock_financial,
        bank::UnlockFinancialRequest {
            idempotency_key: key(),
            card_number: number.clone(),
            teller_id: "teller-1".into(),
            branch_id: "branch-9".into(),
            holder_id_checked: true,
            card_presented: false,
        },
        |r: bank::UnlockFinancialRequest| bank::UnlockFinancialRequest { branch_id: "branch-2".into(), ..r }
    );
    assert_eq!(city.bank_events("icbc", &card_id, "socialcard.financial.v1.FinancialUnfrozen").await, 1);
    mirrored(&city, &card_id, 2).await;

    one_change!(
        card_id,
        "CancelCard",
        registry,
        cancel_card,
        reg::CancelCardRequest {
            idempotency_key: key(),
            card_id: card_id.clone(),
            actor: actor(reg::Channel::BureauWindow),
            documents: holder(true),
            reason: "emigration".into(),
        },
        |r: reg::CancelCardRequest| reg::CancelCardRequest { reason: "death".into(), ..r }
    );

    // A second card: the social function alone, then a written loss at a branch of the card's bank.
    let (second, second_number) = city.collected(902, "icbc").await;
    one_change!(
        second,
        "ActivateSocialFunction",
        registry,
        activate_social_function,
        reg::ActivateSocialFunctionRequest {
            idempotency_key: key(),
            card_id: second.clone(),
            actor: actor(reg::Channel::BureauWindow),
            documents: holder(true),
        },
        |r: reg::ActivateSocialFunctionRequest| reg::ActivateSocialFunctionRequest {
            actor: actor(reg::Channel::CommunityPoint),
            ..r
        }
    );
    conform!(
        "Bank.ReportLoss",
        icbc,
        report_loss,
        bank::ReportLossRequest {
            idempotency_key: key(),
            card_number: second_number,
            loss_kind: reg::LossKind::Written as i32,
            teller_id: "teller-1".into(),
            branch_id: "branch-9".into(),
            holder_id_checked: true,
        },
        |r: bank::ReportLossRequest| bank::ReportLossRequest { teller_id: "teller-2".into(), ..r }
    );
    assert_eq!(city.audited(&second, "loss_lock").await, 1);
    assert_eq!(city.bank_events("icbc", &second, "socialcard.financial.v1.FinancialFrozen").await, 1);

    // A third card, never activated, goes back for a remake.
    let (third, _) = city.collected(903, "icbc").await;
    one_change!(
        third,
        "ReturnForRemake",
        registry,
        return_for_remake,
        reg::ReturnForRemakeRequest {
            idempotency_key: key(),
            card_id: third.clone(),
            actor: actor(reg::Channel::BureauWindow),
            documents: holder(true),
            reason: "name misprinted".into(),
        },
        |r: reg::ReturnForRemakeRequest| reg::ReturnForRemakeRequest { reason: "photo".into(), ..r }
    );

    // The bank's answer for a production batch, recorded once per card.
    let id4 = socialcard_registry::fixtures::adult_citizen_id(904);
    let mut r = registry.clone();
    r.register_person(reg::RegisterPersonRequest {
        idempotency_key: key(),
        citizen_id: id4.clone(),
        name: "Qian Yu".into(),
        phone: "13800000000".into(),
    })
    .await
    .unwrap();
    let fourth = r
        .submit_application(reg::SubmitApplicationRequest {
            idempotency_key: key(),
            citizen_id: id4,
            actor: actor(reg::Channel::CommunityPoint),
            documents: holder(false),
            card_type: reg::CardType::Adult as i32,
            holder_status: reg::HolderStatus::Unemployed as i32,
            bank_code: "icbc".into(),
            photo: Some(reg::Photo { source: reg::PhotoSource::CommunityPoint as i32, ..Default::default() }),
            backup_point_id: "point-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap()
        .card_id;
    r.review_application(reg::ReviewApplicationRequest {
        idempotency_key: key(),
        card_id: fourth.clone(),
        actor: actor(reg::Channel::BureauWindow),
        decision: reg::ReviewDecision::Approve as i32,
        reason: String::new(),
    })
    .await
    .unwrap();
    r.start_production(reg::StartProductionRequest {
        idempotency_key: key(),
        card_id: fourth.clone(),
        actor: actor(reg::Channel::Production),
        batch_id: "b-9".into(),
    })
    .await
    .unwrap();
    let body = "621226000000009040";
    let account = format!("{body}{}", socialcard_domain::numbers::luhn_check_digit(body));
    let confirmed = one_change!(
        fourth,
        "ConfirmAccountOpening",
        icbc,
        confirm_account_opening,
        bank::ConfirmAccountOpeningRequest {
            idempotency_key: key(),
            batch_id: "b-9".into(),
            results: vec![bank::AccountOpeningResult {
                card_id: fourth.clone(),
                result: Some(bank::account_opening_result::Result::AccountNumber(account)),
            }],
        },
        |r: bank::ConfirmAccountOpeningRequest| bank::ConfirmAccountOpeningRequest { batch_id: "b-10".into(), ..r }
    );
    assert_eq!(confirmed.accepted, 1);
}
