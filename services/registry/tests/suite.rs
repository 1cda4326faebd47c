//! The registry's behaviour through its public gRPC API, run once against SQLite and once against
//! PostgreSQL (when `SOCIALCARD_TEST_DATABASE_URL` is set; CI always sets it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use socialcard_proto::events::v1 as ev;
use socialcard_proto::registry::v1 as pb;
use support::*;
use time::Duration;
use tonic::Code;

macro_rules! backend_suite {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let h = super::Harness::start(super::Backend::Sqlite).await.expect("sqlite is always available");
                    super::$test(h).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    match super::Harness::start(super::Backend::Postgres).await {
                        Some(h) => super::$test(h).await,
                        None => eprintln!("skipped: set SOCIALCARD_TEST_DATABASE_URL to run against PostgreSQL"),
                    }
                }
            )*
        }
    };
}

backend_suite!(
    full_lifecycle_writes_audit_and_events,
    bad_input_is_rejected_with_a_reason_and_writes_nothing,
    same_key_replays_and_another_payload_is_refused,
    concurrent_retries_with_one_key_have_one_effect,
    concurrent_applications_leave_one_card,
    concurrent_changes_of_one_card_extend_one_chain,
    concurrent_registrations_of_one_person_keep_one,
    wrong_pins_lock_and_a_bureau_reset_unlocks,
    loss_channels_and_unlock_rules,
    r22_automatic_lock_then_bank_then_bureau,
    replacement_after_written_loss_cancels_the_old_card,
    formal_card_retires_the_temporary_card,
    production_failure_then_remake,
    uploaded_photo_is_checked,
    deadlines_are_enforced_only_once_due,
    the_audit_trail_is_a_hash_chain_that_names_tampering,
    personal_data_is_sealed_at_rest,
);

async fn full_lifecycle_writes_audit_and_events(mut h: Harness) {
    let id = adult(1);
    register(&mut h, &id).await;
    let card = apply(&mut h, &id).await;
    assert_eq!(card.physical_state, pb::PhysicalState::Applied as i32);
    assert_eq!(card.citizen_id_masked, format!("310***********{}", &id[14..]));
    assert_eq!(card.fee_fen, 0, "the first card is free (R12)");
    approve(&mut h, &card.card_id).await;
    let started = start_production(&mut h, &card.card_id).await;
    assert_eq!(started.card_number.len(), 9);
    h.client.record_production_result(production_ok(&card.card_id, account("621226", 1))).await.unwrap();
    for progress in [pb::ShipmentProgress::Dispatched] {
        h.client
            .record_shipment_progress(pb::RecordShipmentProgressRequest {
                idempotency_key: key(),
                card_id: card.card_id.clone(),
                actor: actor(pb::Channel::Courier),
                progress: progress as i32,
                waybill: "EMS123".into(),
            })
            .await
            .unwrap();
    }
    h.clock.advance(Duration::days(2));
    let delivered = h
        .client
        .record_collection(pb::RecordCollectionRequest {
            idempotency_key: key(),
            card_id: card.card_id.clone(),
            actor: actor(pb::Channel::Courier),
            method: pb::CollectionMethod::Delivered as i32,
            collected_at: None,
            documents: None,
        })
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap();
    assert_eq!(delivered.physical_state, pb::PhysicalState::Collected as i32);
    assert_eq!(
        delivered.collected_at.as_ref().unwrap().seconds,
        (time::macros::datetime!(2026-11-25 02:00 UTC)).unix_timestamp()
    );

    // Hotline activation from the registered phone (R19).
    let mut hotline = activate_at(&card.card_id, pb::Channel::Hotline);
    hotline.actor.as_mut().unwrap().caller_phone = PHONE.into();
    let active = h.client.activate_social_function(hotline).await.unwrap().into_inner().card.unwrap();
    assert_eq!(active.social_state, pb::SocialState::Active as i32);
    assert_eq!(active.status_code, "1");

    // Found by card number too.
    let by_number = h
        .client
        .get_card(pb::GetCardRequest {
            lookup: Some(pb::get_card_request::Lookup::CardNumber(started.card_number.clone())),
        })
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap();
    assert_eq!(by_number.card_id, card.card_id);

    let trail = h
        .client
        .list_audit_trail(pb::ListAuditTrailRequest { card_id: card.card_id.clone() })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let actions: Vec<&str> = trail.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "submit_application",
            "approve",
            "start_production",
            "production_result",
            "shipment_progress",
            "collect",
            "activate_social"
        ]
    );
    assert!(trail.windows(2).all(|w| w[0].sequence < w[1].sequence));
    assert_eq!(trail[6].actor.as_ref().unwrap().channel, pb::Channel::Hotline as i32);
    assert_eq!(trail[6].from_state, "physical=collected social=not_activated financial=not_activated");

    // Every change has its event, in order, keyed by the card, decodable.
    let outbox = h.outbox.read_after("socialcard.card.v1", 0, 100).await.unwrap();
    let types: Vec<&str> = outbox.iter().map(|r| r.envelope.event_type.rsplit('.').next().unwrap()).collect();
    assert_eq!(
        types,
        [
            "ApplicationSubmitted",
            "ApplicationApproved",
            "ProductionStarted",
            "CardProduced",
            "ShipmentProgressed",
            "CardCollected",
            "SocialActivated"
        ]
    );
    for r in &outbox {
        assert_eq!(r.envelope.topic, "socialcard.card.v1");
        assert_eq!(r.envelope.subject, card.card_id);
        assert_eq!(r.envelope.source, "registry");
        let e = <ev::CardEvent as prost::Message>::decode(r.envelope.payload.as_slice()).unwrap();
        assert_eq!(e.card_id, card.card_id);
    }
    assert_eq!(h.outbox.backlog().await.unwrap(), outbox.len() as i64, "nothing published without a relay");
    let produced = <ev::CardEvent as prost::Message>::decode(outbox[3].envelope.payload.as_slice()).unwrap();
    match produced.kind.unwrap() {
        ev::card_event::Kind::CardProduced(p) => {
            assert_eq!(p.backup_point_id, "point-42");
            assert_eq!(p.delivery_address.unwrap().postal_code, "200001");
        }
        other => panic!("unexpected {other:?}"),
    }
    h.finish().await;
}

async fn bad_input_is_rejected_with_a_reason_and_writes_nothing(mut h: Harness) {
    let card = collected_card(&mut h, 2).await;
    let cid = card.card_id.clone();
    let before = h.counts().await;
    let c = &mut h.client;

    // Identity (R1).
    let mut wrong_check = adult(3);
    wrong_check.replace_range(17..18, if wrong_check.ends_with('1') { "2" } else { "1" });
    let reg = |id: &str| pb::RegisterPersonRequest {
        idempotency_key: key(),
        citizen_id: id.into(),
        name: "Zhao Lei".into(),
        phone: PHONE.into(),
    };
    assert_rejected(c.register_person(reg(&wrong_check)).await, Code::InvalidArgument, "CITIZEN_ID_CHECK_DIGIT");
    assert_rejected(
        c.register_person(reg(&citizen_id("31010519800231001"))).await,
        Code::InvalidArgument,
        "CITIZEN_ID_BIRTH_DATE",
    );
    assert_rejected(
        c.register_person(reg(&citizen_id("31010520990101001"))).await,
        Code::InvalidArgument,
        "CITIZEN_ID_BIRTH_DATE_IN_FUTURE",
    );
    assert_rejected(
        c.register_person(reg(&citizen_id("99010519800101001"))).await,
        Code::InvalidArgument,
        "CITIZEN_ID_REGION",
    );
    assert_rejected(c.register_person(reg("３１0105198001010011")).await, Code::InvalidArgument, "CITIZEN_ID_LENGTH");
    let mut long_name = reg(&adult(3));
    long_name.name = "x".repeat(51);
    assert_rejected(c.register_person(long_name).await, Code::InvalidArgument, "FIELD_TOO_LONG");
    let mut control = reg(&adult(3));
    control.name = "Zhao\u{0}Lei".into();
    assert_rejected(c.register_person(control).await, Code::InvalidArgument, "FIELD_CONTROL_CHARACTERS");
    let mut no_key = reg(&adult(3));
    no_key.idempotency_key.clear();
    assert_rejected(c.register_person(no_key).await, Code::InvalidArgument, "IDEMPOTENCY_KEY_REQUIRED");
    let mut bad_phone = reg(&adult(3));
    bad_phone.phone = "call me".into();
    assert_rejected(c.register_person(bad_phone).await, Code::InvalidArgument, "PHONE_FORMAT");

    // Applications (R2, R8).
    assert_rejected(
        c.submit_application(application(&adult(2), "nobank")).await,
        Code::InvalidArgument,
        "UNKNOWN_BANK",
    );
    assert_rejected(
        c.submit_application(application(&adult(2), "icbc")).await,
        Code::FailedPrecondition,
        "ACTIVE_CARD_EXISTS",
    );
    assert_rejected(c.submit_application(application(&adult(9), "icbc")).await, Code::NotFound, "PERSON_NOT_FOUND");
    let mut unknown_enum = application(&adult(2), "icbc");
    unknown_enum.card_type = 99;
    assert_rejected(c.submit_application(unknown_enum).await, Code::InvalidArgument, "UNKNOWN_ENUM_VALUE");
    let mut no_channel = application(&adult(2), "icbc");
    no_channel.actor.as_mut().unwrap().channel = 0;
    assert_rejected(c.submit_application(no_channel).await, Code::InvalidArgument, "ENUM_UNSPECIFIED");
    let mut retiree = application(&adult(2), "icbc");
    retiree.holder_status = pb::HolderStatus::Retired as i32;
    retiree.pension_bank_code = "ccb".into();
    assert_rejected(c.submit_application(retiree).await, Code::InvalidArgument, "BANK_CHOICE_NOT_ALLOWED");

    // Illegal transitions.
    let approve_again = pb::ReviewApplicationRequest {
        idempotency_key: key(),
        card_id: cid.clone(),
        actor: actor(pb::Channel::BureauWindow),
        decision: pb::ReviewDecision::Approve as i32,
        reason: String::new(),
    };
    assert_rejected(c.review_application(approve_again).await, Code::FailedPrecondition, "ILLEGAL_CARD_TRANSITION");
    assert_rejected(
        c.unlock_social_function(unlock_at(&cid, pb::Channel::BureauWindow)).await,
        Code::FailedPrecondition,
        "NOT_LOSS_LOCKED",
    );

    // Channels and documents (R19, R31).
    assert_rejected(
        c.activate_social_function(activate_at(&cid, pb::Channel::Hotline12333SelfService)).await,
        Code::InvalidArgument,
        "CHANNEL_NOT_ALLOWED",
    );
    assert_rejected(
        c.activate_social_function(activate_at(&cid, pb::Channel::BankBranch)).await,
        Code::InvalidArgument,
        "CHANNEL_NOT_ALLOWED",
    );
    let mut proxy = activate_at(&cid, pb::Channel::CommunityPoint);
    proxy.documents = Some(pb::Documents {
        presenter: pb::Presenter::Agent as i32,
        holder_id_card: true,
        card_presented: true,
        ..Default::default()
    });
    assert_rejected(c.activate_social_function(proxy).await, Code::InvalidArgument, "PROXY_DOCUMENTS_MISSING");
    let mut stranger = activate_at(&cid, pb::Channel::Hotline);
    stranger.actor.as_mut().unwrap().caller_phone = "13999999999".into();
    assert_rejected(c.activate_social_function(stranger).await, Code::PermissionDenied, "CALLER_PHONE_NOT_REGISTERED");

    // The bank side (R20, R21).
    assert_rejected(
        c.record_financial_activation(financial_activation(&cid, "ccb")).await,
        Code::PermissionDenied,
        "WRONG_BANK",
    );
    assert_rejected(
        c.record_financial_activation(financial_activation(&cid, "nobank")).await,
        Code::InvalidArgument,
        "UNKNOWN_BANK",
    );
    let mut by_proxy = financial_activation(&cid, "icbc");
    by_proxy.presenter = pb::Presenter::Agent as i32;
    assert_rejected(c.record_financial_activation(by_proxy).await, Code::InvalidArgument, "PROXY_NOT_ALLOWED");
    let mut initial_pin = financial_activation(&cid, "icbc");
    initial_pin.bank_pin_changed = false;
    assert_rejected(c.record_financial_activation(initial_pin).await, Code::FailedPrecondition, "BANK_PIN_NOT_CHANGED");

    // A bank rollback: only through a bank branch, only for its own cards, only of an activation.
    let rollback = |channel, bank: &str| pb::CancelFinancialActivationRequest {
        idempotency_key: key(),
        card_id: cid.clone(),
        actor: actor(channel),
        bank_code: bank.into(),
        reason: "core rolled back".into(),
    };
    assert_rejected(
        c.cancel_financial_activation(rollback(pb::Channel::BureauWindow, "icbc")).await,
        Code::InvalidArgument,
        "CHANNEL_NOT_ALLOWED",
    );
    assert_rejected(
        c.cancel_financial_activation(rollback(pb::Channel::BankBranch, "ccb")).await,
        Code::PermissionDenied,
        "WRONG_BANK",
    );
    assert_rejected(
        c.cancel_financial_activation(rollback(pb::Channel::BankBranch, "icbc")).await,
        Code::FailedPrecondition,
        "ILLEGAL_FINANCIAL_TRANSITION",
    );

    // Malformed ids and lookups.
    assert_rejected(
        c.activate_social_function(activate_at("not-a-uuid", pb::Channel::CommunityPoint)).await,
        Code::InvalidArgument,
        "CARD_ID_FORMAT",
    );
    assert_rejected(
        c.get_card(pb::GetCardRequest { lookup: Some(pb::get_card_request::Lookup::CardNumber("A00000019".into())) })
            .await,
        Code::InvalidArgument,
        "CARD_NUMBER_CHECK_DIGIT",
    );
    assert_rejected(
        c.activate_social_function(activate_at(&uuid::Uuid::now_v7().to_string(), pb::Channel::CommunityPoint)).await,
        Code::NotFound,
        "CARD_NOT_FOUND",
    );
    // Well formed, but no card bears it.
    let unissued = format!("Z9999999{}", socialcard_domain::numbers::luhn_check_digit("9999999"));
    assert_rejected(
        c.get_card(pb::GetCardRequest { lookup: Some(pb::get_card_request::Lookup::CardNumber(unissued)) }).await,
        Code::NotFound,
        "CARD_NOT_FOUND",
    );

    assert_eq!(h.counts().await, before, "a refused request wrote something");
    assert_eq!(get(&mut h, &cid).await, card, "a refused request changed the card");
    h.finish().await;
}

async fn same_key_replays_and_another_payload_is_refused(mut h: Harness) {
    let card = collected_card(&mut h, 4).await;
    let req = activate_at(&card.card_id, pb::Channel::CommunityPoint);
    let first = h.client.activate_social_function(req.clone()).await.unwrap().into_inner();
    let after_first = h.counts().await;
    let replay = h.client.activate_social_function(req.clone()).await.unwrap().into_inner();
    assert_eq!(first, replay, "a replay returns the stored answer");
    assert_eq!(h.counts().await, after_first, "a replay writes nothing");

    let mut other = req.clone();
    other.actor.as_mut().unwrap().site_id = "site-2".into();
    assert_rejected(h.client.activate_social_function(other).await, Code::AlreadyExists, "IDEMPOTENCY_KEY_REUSED");
    // The same key on another operation is refused too.
    let mut lock_with_same_key = lock(&card.card_id, pb::LossKind::Written, pb::Channel::BureauWindow);
    lock_with_same_key.idempotency_key = req.idempotency_key.clone();
    assert_rejected(
        h.client.lock_social_function(lock_with_same_key).await,
        Code::AlreadyExists,
        "IDEMPOTENCY_KEY_REUSED",
    );
    assert_eq!(h.counts().await, after_first);
    h.finish().await;
}

async fn concurrent_retries_with_one_key_have_one_effect(mut h: Harness) {
    let card = collected_card(&mut h, 5).await;
    let req = financial_activation(&card.card_id, "icbc");
    let before = h.counts().await;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let mut client = h.client.clone();
        let req = req.clone();
        calls.spawn(async move { client.record_financial_activation(req).await.map(|r| r.into_inner()) });
    }
    let answers: Vec<_> = calls.join_all().await.into_iter().map(|r| r.unwrap()).collect();
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "every retry gets the same answer");
    let after = h.counts().await;
    assert_eq!(after.audit, before.audit + 1, "one effect");
    assert_eq!(after.outbox, before.outbox + 1);
    assert_eq!(after.idempotency, before.idempotency + 1);
    let now = get(&mut h, &card.card_id).await;
    assert_eq!(now.financial_state, pb::FinancialState::Active as i32);
    assert_eq!(
        now.social_state,
        pb::SocialState::Active as i32,
        "R20: the bank's activation switched the social function on"
    );
    h.finish().await;
}

async fn concurrent_applications_leave_one_card(mut h: Harness) {
    let id = adult(6);
    register(&mut h, &id).await;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let mut client = h.client.clone();
        let req = application(&id, "icbc");
        calls.spawn(async move { client.submit_application(req).await });
    }
    let results = calls.join_all().await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "R2: one card per person");
    for r in results.into_iter().filter(|r| r.is_err()) {
        assert_rejected(r, Code::FailedPrecondition, "ACTIVE_CARD_EXISTS");
    }
    assert_eq!(h.counts().await.cards, 1);
    h.finish().await;
}

/// Eight windows register one person at once, each its own request: one registers, the others hear
/// the person exists (from their plan, or from the database when they planned together). Eight
/// retries of one request: one effect, and every retry gets its answer (the key is written first, so
/// a twin fails on it, not on the person it would insert).
async fn concurrent_registrations_of_one_person_keep_one(h: Harness) {
    let registration = |id: &str, key: String| pb::RegisterPersonRequest {
        idempotency_key: key,
        citizen_id: id.into(),
        name: "Wang Fang".into(),
        phone: PHONE.into(),
    };
    let before = h.counts().await;
    let id = adult(9);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let mut client = h.client.clone();
        let req = registration(&id, key());
        calls.spawn(async move { client.register_person(req).await });
    }
    let results = calls.join_all().await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "one registration");
    for r in results.into_iter().filter(|r| r.is_err()) {
        assert_rejected(r, Code::AlreadyExists, "PERSON_EXISTS");
    }

    let twin = registration(&adult(10), key());
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let mut client = h.client.clone();
        let req = twin.clone();
        calls.spawn(async move { client.register_person(req).await.map(|r| r.into_inner()) });
    }
    let answers: Vec<_> = calls.join_all().await.into_iter().map(|r| r.expect("a retry gets the answer")).collect();
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "every retry gets the same answer");
    let after = h.counts().await;
    assert_eq!(after.persons, before.persons + 2);
    assert_eq!(after.idempotency, before.idempotency + 2);
    h.finish().await;
}

/// Six terminals send wrong PINs for one card at once, each its own request: all planned on the same
/// version, they commit one after another (the losers plan again), each counted once, and the card's
/// audit chain stays one unbroken line (each entry linked to the one committed before it).
async fn concurrent_changes_of_one_card_extend_one_chain(mut h: Harness) {
    let card = collected_card(&mut h, 8).await;
    let cid = card.card_id.clone();
    h.client.activate_social_function(activate_at(&cid, pb::Channel::CommunityPoint)).await.unwrap();
    let trail = pb::VerifyAuditTrailRequest { card_id: cid.clone() };
    let before = h.client.verify_audit_trail(trail.clone()).await.unwrap().into_inner();
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..6 {
        let mut client = h.client.clone();
        let req = verify(&cid, "000000");
        calls.spawn(async move { client.verify_social_pin(req).await.map(|r| r.into_inner()) });
    }
    let mut remaining: Vec<u32> =
        calls.join_all().await.into_iter().map(|r| r.expect("every attempt is recorded").remaining_attempts).collect();
    remaining.sort_unstable();
    assert_eq!(remaining, vec![0, 1, 2, 3, 4, 5], "each wrong PIN counted once, in some order");
    assert_eq!(get(&mut h, &cid).await.social_state, pb::SocialState::PinLocked as i32);
    let after = h.client.verify_audit_trail(trail).await.unwrap().into_inner();
    assert!(after.breaks.is_empty(), "{after:?}");
    assert_eq!(after.entries_checked, before.entries_checked + 6);
    h.finish().await;
}

async fn wrong_pins_lock_and_a_bureau_reset_unlocks(mut h: Harness) {
    let card = collected_card(&mut h, 7).await;
    let cid = card.card_id.clone();
    h.client.activate_social_function(activate_at(&cid, pb::Channel::CommunityPoint)).await.unwrap();
    let ok = h.client.verify_social_pin(verify(&cid, "123456")).await.unwrap().into_inner();
    assert!(ok.verified, "the initial PIN is 123456 (R29, Shanghai)");
    for remaining in (0..6).rev() {
        let r = h.client.verify_social_pin(verify(&cid, "000000")).await.unwrap().into_inner();
        assert!(!r.verified);
        assert_eq!(r.remaining_attempts, remaining);
        assert_eq!(r.locked, remaining == 0);
    }
    assert_eq!(get(&mut h, &cid).await.social_state, pb::SocialState::PinLocked as i32);
    assert_eq!(get(&mut h, &cid).await.status_code, "3");
    assert_rejected(
        h.client.verify_social_pin(verify(&cid, "123456")).await,
        Code::FailedPrecondition,
        "SOCIAL_PIN_LOCKED",
    );
    assert_rejected(h.client.verify_social_pin(verify(&cid, "12345")).await, Code::InvalidArgument, "PIN_FORMAT");

    let reset = |channel, pin: &str| pb::ResetSocialPinRequest {
        idempotency_key: key(),
        card_id: cid.clone(),
        actor: actor(channel),
        documents: holder_docs(),
        new_pin: pin.into(),
    };
    assert_rejected(
        h.client.reset_social_pin(reset(pb::Channel::Hotline12333Operator, "246810")).await,
        Code::InvalidArgument,
        "CHANNEL_NOT_ALLOWED",
    );
    assert_rejected(
        h.client.reset_social_pin(reset(pb::Channel::BureauWindow, "123456")).await,
        Code::InvalidArgument,
        "PIN_IS_INITIAL",
    );
    let after =
        h.client.reset_social_pin(reset(pb::Channel::BureauWindow, "246810")).await.unwrap().into_inner().card.unwrap();
    assert_eq!(after.social_state, pb::SocialState::Active as i32);
    assert!(after.social_pin_changed);
    assert!(!h.client.verify_social_pin(verify(&cid, "123456")).await.unwrap().into_inner().verified);
    assert!(h.client.verify_social_pin(verify(&cid, "246810")).await.unwrap().into_inner().verified);

    // A change with a wrong old PIN counts as a wrong entry and changes nothing else.
    let change = |old: &str, new: &str| pb::ChangeSocialPinRequest {
        idempotency_key: key(),
        card_id: cid.clone(),
        actor: actor(pb::Channel::Hotline12333SelfService),
        old_pin: old.into(),
        new_pin: new.into(),
    };
    let wrong = h.client.change_social_pin(change("111111", "135790")).await.unwrap().into_inner();
    assert!(!wrong.changed);
    assert_eq!(wrong.remaining_attempts, 5);
    let right = h.client.change_social_pin(change("246810", "135790")).await.unwrap().into_inner();
    assert!(right.changed);
    assert!(h.client.verify_social_pin(verify(&cid, "135790")).await.unwrap().into_inner().verified);
    h.finish().await;
}

async fn loss_channels_and_unlock_rules(mut h: Harness) {
    let card = collected_card(&mut h, 8).await;
    let cid = card.card_id.clone();
    // 12333 self-service only for holders who changed their PIN (R25).
    assert_rejected(
        h.client.lock_social_function(lock(&cid, pb::LossKind::Temporary, pb::Channel::Hotline12333SelfService)).await,
        Code::FailedPrecondition,
        "INITIAL_PIN_HOLDER",
    );
    // The 12333 operator works in working hours only: Saturday is not.
    h.clock.advance(Duration::days(5));
    assert_rejected(
        h.client.lock_social_function(lock(&cid, pb::LossKind::Temporary, pb::Channel::Hotline12333Operator)).await,
        Code::FailedPrecondition,
        "OUTSIDE_WORKING_HOURS",
    );
    // A written loss cannot be phoned in; an agent cannot report one (R31).
    assert_rejected(
        h.client.lock_social_function(lock(&cid, pb::LossKind::Written, pb::Channel::Hotline)).await,
        Code::InvalidArgument,
        "CHANNEL_NOT_ALLOWED",
    );
    let mut by_agent = lock(&cid, pb::LossKind::Written, pb::Channel::BureauWindow);
    by_agent.documents = Some(pb::Documents {
        presenter: pb::Presenter::Agent as i32,
        holder_id_card: true,
        agent_id_card: true,
        written_authorization: true,
        ..Default::default()
    });
    assert_rejected(h.client.lock_social_function(by_agent).await, Code::InvalidArgument, "PROXY_NOT_ALLOWED");
    // Only the scheduler sets an automatic lock.
    assert_rejected(
        h.client.lock_social_function(lock(&cid, pb::LossKind::Automatic, pb::Channel::BureauWindow)).await,
        Code::InvalidArgument,
        "CHANNEL_NOT_ALLOWED",
    );

    // Temporary loss by phone: locked, status 4, and the bank must not activate (R26).
    let locked = h
        .client
        .lock_social_function(lock(&cid, pb::LossKind::Temporary, pb::Channel::Hotline))
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap();
    assert_eq!(locked.social_state, pb::SocialState::LossLocked as i32);
    assert_eq!(locked.social_loss_kind, pb::LossKind::Temporary as i32);
    assert_eq!(locked.status_code, "4");
    assert_rejected(
        h.client.record_financial_activation(financial_activation(&cid, "icbc")).await,
        Code::FailedPrecondition,
        "CARD_LOSS_LOCKED",
    );
    assert_rejected(
        h.client.activate_social_function(activate_at(&cid, pb::Channel::CommunityPoint)).await,
        Code::FailedPrecondition,
        "CARD_LOSS_LOCKED",
    );
    // Written unlock at the bureau only (R27).
    assert_rejected(
        h.client.unlock_social_function(unlock_at(&cid, pb::Channel::CommunityPoint)).await,
        Code::InvalidArgument,
        "CHANNEL_NOT_ALLOWED",
    );
    let unlocked = h
        .client
        .unlock_social_function(unlock_at(&cid, pb::Channel::BureauWindow))
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap();
    assert_eq!(unlocked.social_state, pb::SocialState::NotActivated as i32, "back where it was before the loss");
    // And now the bank may activate, switching the social function on.
    let both = h.client.record_financial_activation(financial_activation(&cid, "icbc")).await.unwrap().into_inner();
    assert!(!both.social_awaits_bureau_unlock);
    assert_eq!(both.card.unwrap().social_state, pb::SocialState::Active as i32);
    h.finish().await;
}

async fn r22_automatic_lock_then_bank_then_bureau(mut h: Harness) {
    let card = collected_card(&mut h, 10).await;
    let cid = card.card_id.clone();
    h.clock.advance(Duration::days(299));
    assert_rejected(
        h.client.lock_social_function(lock(&cid, pb::LossKind::Automatic, pb::Channel::Scheduler)).await,
        Code::FailedPrecondition,
        "DEADLINE_NOT_REACHED",
    );
    h.clock.advance(Duration::days(1));
    let locked = h
        .client
        .lock_social_function(lock(&cid, pb::LossKind::Automatic, pb::Channel::Scheduler))
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap();
    assert_eq!(locked.social_loss_kind, pb::LossKind::Automatic as i32);
    assert_rejected(
        h.client.unlock_social_function(unlock_at(&cid, pb::Channel::BureauWindow)).await,
        Code::FailedPrecondition,
        "FINANCIAL_NOT_ACTIVE",
    );
    let at_bank = h.client.record_financial_activation(financial_activation(&cid, "icbc")).await.unwrap().into_inner();
    assert!(at_bank.social_awaits_bureau_unlock, "R22: the social side waits for the bureau");
    let c = at_bank.card.unwrap();
    assert_eq!(c.financial_state, pb::FinancialState::Active as i32);
    assert_eq!(c.social_state, pb::SocialState::LossLocked as i32);
    let unlocked = h
        .client
        .unlock_social_function(unlock_at(&cid, pb::Channel::CommunityPoint))
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap();
    assert_eq!(unlocked.social_state, pb::SocialState::Active as i32);
    h.finish().await;
}

async fn replacement_after_written_loss_cancels_the_old_card(mut h: Harness) {
    let old = collected_card(&mut h, 11).await;
    let id = adult(11);
    // No replacement without a written loss (or the damaged card handed in).
    let mut early = application(&id, "icbc");
    early.replaces_card_id = old.card_id.clone();
    early.documents.as_mut().unwrap().card_presented = false;
    assert_rejected(h.client.submit_application(early).await, Code::FailedPrecondition, "REPLACEMENT_NOT_ALLOWED");

    h.client.lock_social_function(lock(&old.card_id, pb::LossKind::Written, pb::Channel::BureauWindow)).await.unwrap();
    assert_eq!(get(&mut h, &old.card_id).await.status_code, "2");
    let mut replacement = application(&id, "icbc");
    replacement.replaces_card_id = old.card_id.clone();
    replacement.documents.as_mut().unwrap().card_presented = false;
    let new = h.client.submit_application(replacement).await.unwrap().into_inner().card.unwrap();
    assert_eq!(new.fee_fen, 2_000, "R12: a replacement costs the city's fee");
    assert_eq!(new.replaces_card_id, old.card_id);
    let old_now = get(&mut h, &old.card_id).await;
    assert_eq!(old_now.physical_state, pb::PhysicalState::Replaced as i32);
    assert_eq!(old_now.replaced_by_card_id, new.card_id);
    assert_eq!(old_now.status_code, "9");
    // Never undone once a replacement was ordered (R27).
    assert_rejected(
        h.client.unlock_social_function(unlock_at(&old.card_id, pb::Channel::BureauWindow)).await,
        Code::FailedPrecondition,
        "NOT_LOSS_LOCKED",
    );
    let new_card = approve(&mut h, &new.card_id).await;
    assert_eq!(new_card.physical_state, pb::PhysicalState::Approved as i32);
    let produced = produce(&mut h, &new.card_id).await;
    let old_number = get(&mut h, &old.card_id).await.card_number;
    assert_ne!(produced.card_number, old_number, "R28: a new card number");
    h.finish().await;
}

async fn formal_card_retires_the_temporary_card(mut h: Harness) {
    let id = adult(12);
    register(&mut h, &id).await;
    let mut temp = application(&id, "");
    temp.card_type = pb::CardType::Temporary as i32;
    let temp = h.client.submit_application(temp).await.unwrap().into_inner().card.unwrap();
    approve(&mut h, &temp.card_id).await;
    start_production(&mut h, &temp.card_id).await;
    assert_rejected(
        h.client.record_production_result(production_ok(&temp.card_id, account("621226", 5))).await,
        Code::InvalidArgument,
        "TEMPORARY_CARD_NO_ACCOUNT",
    );
    let produced = h
        .client
        .record_production_result(production_ok(&temp.card_id, String::new()))
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap();
    let expires = produced.expires_at.unwrap().seconds - socialcard_server::Clock::now(&h.clock).unix_timestamp();
    assert_eq!(expires, 180 * 86_400, "R24: Shanghai's temporary cards last 180 days");
    pick_up(&mut h, &temp.card_id).await;
    assert_rejected(
        h.client.record_financial_activation(financial_activation(&temp.card_id, "icbc")).await,
        Code::PermissionDenied,
        "WRONG_BANK",
    );

    // A formal card may be applied for while the temporary one is valid; its collection retires it.
    let formal = apply(&mut h, &id).await;
    let mut second_temp = application(&id, "");
    second_temp.card_type = pb::CardType::Temporary as i32;
    assert_rejected(h.client.submit_application(second_temp).await, Code::FailedPrecondition, "FORMAL_CARD_VALID");
    approve(&mut h, &formal.card_id).await;
    produce(&mut h, &formal.card_id).await;
    assert_eq!(get(&mut h, &temp.card_id).await.physical_state, pb::PhysicalState::Collected as i32);
    pick_up(&mut h, &formal.card_id).await;
    let retired = get(&mut h, &temp.card_id).await;
    assert_eq!(retired.physical_state, pb::PhysicalState::Cancelled as i32, "R24: the formal card wins");
    assert_eq!(retired.social_state, pb::SocialState::Cancelled as i32);
    h.finish().await;
}

async fn production_failure_then_remake(mut h: Harness) {
    let id = adult(13);
    register(&mut h, &id).await;
    let card = apply(&mut h, &id).await;
    approve(&mut h, &card.card_id).await;
    let first = start_production(&mut h, &card.card_id).await;
    assert_rejected(
        h.client.record_production_result(production_ok(&card.card_id, account("622848", 1))).await,
        Code::InvalidArgument,
        "ACCOUNT_NOT_IN_BANK_BIN",
    );
    let failed = h
        .client
        .record_production_result(pb::RecordProductionResultRequest {
            idempotency_key: key(),
            card_id: card.card_id.clone(),
            actor: actor(pb::Channel::Production),
            result: Some(pb::record_production_result_request::Result::Failure(pb::ProductionFailure {
                stage: pb::ProductionStage::BankAccount as i32,
                reason: "account match failed".into(),
            })),
        })
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap();
    assert_eq!(failed.physical_state, pb::PhysicalState::ProductionFailed as i32);
    assert_eq!(failed.last_production_failure.unwrap().stage, pb::ProductionStage::BankAccount as i32);
    let again = start_production(&mut h, &card.card_id).await;
    assert_eq!(again.card_number, first.card_number, "a remake keeps the card number");
    h.client.record_production_result(production_ok(&card.card_id, account("621226", 3))).await.unwrap();
    pick_up(&mut h, &card.card_id).await;

    // R13: wrong data on the card; back for remake, only before activation.
    let remake = |docs| pb::ReturnForRemakeRequest {
        idempotency_key: key(),
        card_id: card.card_id.clone(),
        actor: actor(pb::Channel::BureauWindow),
        documents: docs,
        reason: "name has a homophone character".into(),
    };
    let mut no_card = holder_docs();
    no_card.as_mut().unwrap().card_presented = false;
    assert_rejected(h.client.return_for_remake(remake(no_card)).await, Code::InvalidArgument, "CARD_REQUIRED");
    let back = h.client.return_for_remake(remake(holder_docs())).await.unwrap().into_inner().card.unwrap();
    assert_eq!(back.physical_state, pb::PhysicalState::ReturnedForRemake as i32);
    assert!(back.collected_at.is_none());
    h.finish().await;
}

async fn uploaded_photo_is_checked(mut h: Harness) {
    let id = adult(14);
    register(&mut h, &id).await;
    let online = |jpeg: Vec<u8>, name: String| {
        let mut a = application(&id, "icbc");
        a.actor = Some(pb::Actor {
            channel: pb::Channel::Online as i32,
            verification_ref: "qr-77".into(),
            ..Default::default()
        });
        a.photo = Some(pb::Photo { source: pb::PhotoSource::Upload as i32, jpeg, file_name: name });
        a
    };
    let jpeg = socialcard_domain::photo::minimal_jpeg;
    let before = h.counts().await;
    assert_rejected(
        h.client.submit_application(online(jpeg(400, 441), format!("{id}.jpg"))).await,
        Code::InvalidArgument,
        "PHOTO_DIMENSIONS",
    );
    assert_rejected(
        h.client.submit_application(online(jpeg(358, 441), "me.jpg".into())).await,
        Code::InvalidArgument,
        "PHOTO_FILE_NAME",
    );
    assert_rejected(
        h.client.submit_application(online(vec![0xFF; 50 * 1024], format!("{id}.jpg"))).await,
        Code::InvalidArgument,
        "PHOTO_TOO_LARGE",
    );
    let mut unverified = online(jpeg(358, 441), format!("{id}.jpg"));
    unverified.actor.as_mut().unwrap().verification_ref.clear();
    assert_rejected(
        h.client.submit_application(unverified).await,
        Code::InvalidArgument,
        "IDENTITY_VERIFICATION_REQUIRED",
    );
    assert_eq!(h.counts().await, before);
    let ok = h
        .client
        .submit_application(online(jpeg(358, 441), format!("{id}.jpg")))
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap();
    assert_eq!(ok.application_channel, pb::Channel::Online as i32);
    h.finish().await;
}

fn deadline(card_id: &str, d: pb::Deadline) -> pb::EnforceDeadlineRequest {
    pb::EnforceDeadlineRequest {
        idempotency_key: key(),
        card_id: card_id.into(),
        actor: actor(pb::Channel::Scheduler),
        deadline: d as i32,
        since: None,
    }
}

/// The collection event of a card, as the loss coordinator receives it.
async fn collected_event(h: &Harness, card_id: &str) -> ev::CardCollected {
    let rows = h.outbox.read_after(socialcard_events::topics::CARD, 0, 10_000).await.unwrap();
    rows.iter()
        .filter(|r| r.envelope.subject == card_id)
        .find_map(|r| match prost::Message::decode(r.envelope.payload.as_slice()) {
            Ok(ev::CardEvent { kind: Some(ev::card_event::Kind::CardCollected(c)), .. }) => Some(c),
            _ => None,
        })
        .expect("a CardCollected event")
}

async fn deadlines_are_enforced_only_once_due(mut h: Harness) {
    // R23: a minor born 1 December 2010 turns 16 on 1 December 2026; the card is disabled from
    // 1 December 2029 (local midnight) unless exchanged.
    let minor = citizen_id("31010520101201007");
    register(&mut h, &minor).await;
    let mut app = application(&minor, "icbc");
    app.card_type = pb::CardType::Minor as i32;
    app.holder_status = pb::HolderStatus::Student as i32;
    app.documents = Some(pb::Documents {
        presenter: pb::Presenter::Guardian as i32,
        household_register: true,
        guardianship_proof: true,
        agent_id_card: true,
        card_presented: true,
        ..Default::default()
    });
    let card = h.client.submit_application(app).await.unwrap().into_inner().card.unwrap();
    approve(&mut h, &card.card_id).await;
    produce(&mut h, &card.card_id).await;
    h.client
        .record_collection(pb::RecordCollectionRequest {
            idempotency_key: key(),
            card_id: card.card_id.clone(),
            actor: actor(pb::Channel::CommunityPoint),
            method: pb::CollectionMethod::PickedUpAtPoint as i32,
            collected_at: None,
            documents: Some(pb::Documents {
                presenter: pb::Presenter::Guardian as i32,
                household_register: true,
                guardianship_proof: true,
                agent_id_card: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let collected = collected_event(&h, &card.card_id).await;
    let due = time::macros::datetime!(2029-12-01 00:00 +08:00);
    assert_eq!(collected.minor_exchange_due_at.unwrap().seconds, due.unix_timestamp());
    let now = socialcard_server::Clock::now(&h.clock);
    assert_eq!(collected.auto_lock_due_at.unwrap().seconds, (now + Duration::days(300)).unix_timestamp(), "R22");
    assert!(collected.expires_at.is_none());

    let before = h.counts().await;
    assert_rejected(
        h.client.enforce_deadline(deadline(&card.card_id, pb::Deadline::MinorExchange)).await,
        Code::FailedPrecondition,
        "DEADLINE_NOT_REACHED",
    );
    let mut by_clerk = deadline(&card.card_id, pb::Deadline::MinorExchange);
    by_clerk.actor = actor(pb::Channel::BureauWindow);
    assert_rejected(h.client.enforce_deadline(by_clerk).await, Code::InvalidArgument, "CHANNEL_NOT_ALLOWED");
    assert_rejected(
        h.client.enforce_deadline(deadline(&card.card_id, pb::Deadline::Unspecified)).await,
        Code::InvalidArgument,
        "DEADLINE_UNKNOWN",
    );
    // Shanghai: a temporary loss lapses on the social side only through a written unlock (R27).
    let mut lapse = deadline(&card.card_id, pb::Deadline::TemporaryLossExpiry);
    lapse.since = Some(prost_types::Timestamp { seconds: now.unix_timestamp(), nanos: 0 });
    assert_rejected(h.client.enforce_deadline(lapse).await, Code::FailedPrecondition, "NO_SOCIAL_LOSS_EXPIRY");
    assert_eq!(h.counts().await, before, "refused deadlines write nothing");

    h.clock.set(due + Duration::minutes(1));
    let disabled = h
        .client
        .enforce_deadline(deadline(&card.card_id, pb::Deadline::MinorExchange))
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap();
    assert_eq!(disabled.social_state, pb::SocialState::Disabled as i32);
    assert_rejected(
        h.client.enforce_deadline(deadline(&card.card_id, pb::Deadline::MinorExchange)).await,
        Code::FailedPrecondition,
        "SOCIAL_DISABLED",
    );

    // R24: a temporary card ends when its validity does, not before.
    let adult_id = adult(31);
    register(&mut h, &adult_id).await;
    let mut temp = application(&adult_id, "");
    temp.card_type = pb::CardType::Temporary as i32;
    let temp = h.client.submit_application(temp).await.unwrap().into_inner().card.unwrap();
    approve(&mut h, &temp.card_id).await;
    start_production(&mut h, &temp.card_id).await;
    h.client.record_production_result(production_ok(&temp.card_id, String::new())).await.unwrap();
    pick_up(&mut h, &temp.card_id).await;
    let expires = collected_event(&h, &temp.card_id).await.expires_at.expect("R24: the expiry travels");
    assert!(collected_event(&h, &temp.card_id).await.auto_lock_due_at.is_none(), "no financial function");
    assert_rejected(
        h.client.enforce_deadline(deadline(&temp.card_id, pb::Deadline::TemporaryCardExpiry)).await,
        Code::FailedPrecondition,
        "DEADLINE_NOT_REACHED",
    );
    h.clock.set(time::OffsetDateTime::from_unix_timestamp(expires.seconds).unwrap() + Duration::seconds(1));
    let ended = h
        .client
        .enforce_deadline(deadline(&temp.card_id, pb::Deadline::TemporaryCardExpiry))
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap();
    assert_eq!(ended.physical_state, pb::PhysicalState::Cancelled as i32);
    assert_eq!(ended.status_code, "9");
    h.finish().await;
}

async fn the_audit_trail_is_a_hash_chain_that_names_tampering(mut h: Harness) {
    let first = collected_card(&mut h, 41).await;
    let second = collected_card(&mut h, 42).await;
    let verify = |card: &str| pb::VerifyAuditTrailRequest { card_id: card.to_string() };
    let intact = h.client.verify_audit_trail(verify("")).await.unwrap().into_inner();
    assert_eq!(intact.cards_checked, 2);
    assert_eq!(intact.entries_checked, 10, "five entries per collected card");
    assert!(intact.breaks.is_empty(), "{intact:?}");

    // Someone edits an entry in the database: the chain names it, and only it.
    h.raw_sql(&format!(
        "UPDATE audit_log SET to_state = 'physical=cancelled' WHERE card_id = '{}' AND action = 'approve'",
        first.card_id
    ))
    .await;
    let edited = h.client.verify_audit_trail(verify("")).await.unwrap().into_inner();
    assert_eq!(edited.breaks.len(), 1, "{edited:?}");
    assert_eq!(edited.breaks[0].card_id, first.card_id);
    assert_eq!(edited.breaks[0].reason, "ENTRY_CHANGED");

    // Someone removes an entry: the next one no longer links.
    h.raw_sql(&format!(
        "DELETE FROM audit_log WHERE seq = (SELECT MIN(seq) FROM audit_log WHERE card_id = '{}')",
        second.card_id
    ))
    .await;
    let removed = h.client.verify_audit_trail(verify(&second.card_id)).await.unwrap().into_inner();
    assert_eq!(removed.cards_checked, 1);
    assert_eq!(removed.breaks.len(), 1, "{removed:?}");
    assert_eq!(removed.breaks[0].reason, "PREVIOUS_ENTRY_CHANGED_OR_REMOVED");
    assert_rejected(
        h.client.verify_audit_trail(verify("not a card id")).await,
        Code::InvalidArgument,
        "CARD_ID_FORMAT",
    );
    h.finish().await;
}

async fn personal_data_is_sealed_at_rest(mut h: Harness) {
    let id = adult(51);
    h.client
        .register_person(pb::RegisterPersonRequest {
            idempotency_key: key(),
            citizen_id: id.clone(),
            name: "Ouyang Xiaoming".into(),
            phone: "13912345678".into(),
        })
        .await
        .unwrap();
    let card = apply(&mut h, &id).await;
    approve(&mut h, &card.card_id).await;
    let mut by_phone = lock(&card.card_id, pb::LossKind::Temporary, pb::Channel::Hotline);
    by_phone.actor.as_mut().unwrap().caller_phone = "13912345678".into();
    // Not collected: refused, but the point is what the database holds.
    let _ = h.client.lock_social_function(by_phone).await;
    produce(&mut h, &card.card_id).await;
    pick_up(&mut h, &card.card_id).await;
    let mut by_phone = lock(&card.card_id, pb::LossKind::Temporary, pb::Channel::Hotline);
    by_phone.actor.as_mut().unwrap().caller_phone = "13912345678".into();
    h.client.lock_social_function(by_phone).await.unwrap();

    // Everything the service reads back is as it was written.
    let person = h.client.get_person(pb::GetPersonRequest { citizen_id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(person.person.unwrap().name, "Ouyang Xiaoming");
    assert_eq!(person.cards.len(), 1);
    let trail = h.client.list_audit_trail(pb::ListAuditTrailRequest { card_id: card.card_id.clone() }).await.unwrap();
    assert!(
        trail.into_inner().entries.iter().any(|e| e.actor.as_ref().is_some_and(|a| a.caller_phone == "13912345678"))
    );

    // What the database holds names nobody: not the ID number (nor its birth-date part), the name or the
    // phone, in any table.
    let secrets = [id.as_str(), &id[6..14], "Ouyang Xiaoming", "13912345678"];
    for sql in [
        "SELECT citizen_id FROM persons",
        "SELECT name FROM persons",
        "SELECT phone FROM persons",
        "SELECT citizen_id FROM cards",
        "SELECT data FROM cards",
        "SELECT actor FROM audit_log",
        "SELECT documents FROM audit_log",
        "SELECT response FROM idempotency",
    ] {
        for value in h.raw_column(sql).await {
            let text = String::from_utf8_lossy(&value);
            for s in secrets {
                assert!(!text.contains(s), "{sql} holds personal data in the clear");
            }
        }
    }
    assert!(
        h.client
            .verify_audit_trail(pb::VerifyAuditTrailRequest::default())
            .await
            .unwrap()
            .into_inner()
            .breaks
            .is_empty()
    );
    h.finish().await;
}
