//! Loss and unlock coordination through the public gRPC APIs (R22-R31): every channel of R25, every unlock
//! path of R27, the deadlines that fire by themselves, and a coordinator killed in the middle of a case.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use socialcard_proto::bank::v1 as bank;
use socialcard_proto::loss::v1 as loss;
use socialcard_proto::registry::v1 as reg;
use support::*;
use tonic::Code;

fn activation(card_number: &str) -> bank::ActivateFinancialRequest {
    bank::ActivateFinancialRequest {
        idempotency_key: key(),
        card_number: card_number.into(),
        teller_id: "teller-1".into(),
        branch_id: "branch-9".into(),
        face_verification_ref: "face-42".into(),
        bank_pin_changed: true,
    }
}

async fn case_of(
    client: &loss::loss_coordinator_service_client::LossCoordinatorServiceClient<tonic::transport::Channel>,
    card_id: &str,
) -> Vec<loss::LossCase> {
    client
        .clone()
        .list_cases(loss::ListCasesRequest { card_id: card_id.into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .cases
}

#[tokio::test]
async fn a_temporary_loss_by_phone_locks_both_sides_and_the_bank_refuses_activation_until_unlocked() {
    let city = City::start().await;
    let mut lc = city.coordinator().await.client;
    let (card_id, number) = city.collected(1, "icbc").await;

    let case = lc
        .report_loss(report(&card_id, reg::LossKind::Temporary, reg::Channel::Hotline))
        .await
        .unwrap()
        .into_inner()
        .loss_case
        .unwrap();
    assert_eq!(case.state, loss::CaseState::Locked as i32, "{case:?}");
    assert!(case.social_locked && case.financial_frozen);
    let card = city.card(&card_id).await;
    assert_eq!(card.social_state, reg::SocialState::LossLocked as i32);
    assert_eq!(card.social_loss_kind, reg::LossKind::Temporary as i32);
    // The registry mirrors the bank's freeze from the adapter's event.
    eventually("the registry shows the financial function frozen", || async {
        city.card(&card_id).await.financial_state == reg::FinancialState::Frozen as i32
    })
    .await;

    // The bank's activation attempt is refused while the card is under the loss.
    let refused = city.bank("icbc").activate_financial(activation(&number)).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert_eq!(reason_of(&refused).as_deref(), Some("FINANCIAL_FROZEN"));
    assert_eq!(city.audited(&card_id, "financial_activation").await, 0);

    // R27: after a temporary loss the social side comes back only through a written unlock at the bureau.
    let by_phone = lc.unlock(unlock(&card_id, reg::Channel::Hotline, true)).await.unwrap_err();
    assert_eq!(by_phone.code(), Code::InvalidArgument);
    assert_eq!(reason_of(&by_phone).as_deref(), Some("CHANNEL_NOT_ALLOWED"));
    // Nor at a community point: the registry's rule (a written unlock at a bureau window) refuses it, and
    // nothing changes on either side.
    let at_point = lc.unlock(unlock(&card_id, reg::Channel::CommunityPoint, true)).await.unwrap_err();
    assert_eq!(at_point.code(), Code::InvalidArgument, "{at_point:?}");
    assert_eq!(reason_of(&at_point).as_deref(), Some("CHANNEL_NOT_ALLOWED"));
    assert_eq!(city.card(&card_id).await.social_state, reg::SocialState::LossLocked as i32);
    let still = &case_of(&lc, &card_id).await[0];
    assert!(still.state == loss::CaseState::Locked as i32 && still.social_locked, "{still:?}");
    assert_eq!(city.audited(&card_id, "unlock").await, 0);
    let at_bureau = lc.unlock(unlock(&card_id, reg::Channel::BureauWindow, true)).await.unwrap().into_inner();
    let case = at_bureau.loss_case.unwrap();
    assert_eq!(case.state, loss::CaseState::Unlocking as i32, "the bank side is still frozen: {case:?}");
    assert!(!case.social_locked && case.financial_frozen);
    assert_eq!(city.card(&card_id).await.social_state, reg::SocialState::NotActivated as i32);

    // The bank's side under the bank's rules, at a branch of the card's bank.
    let unlocked = city
        .bank("icbc")
        .unlock_financial(bank::UnlockFinancialRequest {
            idempotency_key: key(),
            card_number: number.clone(),
            teller_id: "teller-1".into(),
            branch_id: "branch-9".into(),
            holder_id_checked: true,
            card_presented: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!unlocked.social_still_locked);
    assert_eq!(unlocked.financial_state, reg::FinancialState::NotActivated as i32);
    let case =
        lc.get_case(loss::GetCaseRequest { case_id: case.case_id }).await.unwrap().into_inner().loss_case.unwrap();
    assert_eq!(case.state, loss::CaseState::Unlocked as i32);
    eventually("the registry shows the freeze lifted", || async {
        city.card(&card_id).await.financial_state == reg::FinancialState::NotActivated as i32
    })
    .await;

    // Now the bank activates, and both functions are on when its call returns.
    let on = city.bank("icbc").activate_financial(activation(&number)).await.unwrap().into_inner();
    assert_eq!(on.financial_state, reg::FinancialState::Active as i32);
    assert_eq!(on.social_state, reg::SocialState::Active as i32);
}

#[tokio::test]
async fn each_loss_channel_of_r25_follows_its_rules_and_a_refused_report_writes_nothing() {
    let city = City::start().await;
    let mut lc = city.coordinator().await.client;

    // 12333 self-service only for holders who changed their PIN.
    let (initial_pin, _) = city.collected(11, "icbc").await;
    let e = lc
        .report_loss(report(&initial_pin, reg::LossKind::Temporary, reg::Channel::Hotline12333SelfService))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert_eq!(reason_of(&e).as_deref(), Some("INITIAL_PIN_HOLDER"));
    assert!(case_of(&lc, &initial_pin).await.is_empty(), "a refused report opens no case");
    assert_eq!(city.card(&initial_pin).await.social_state, reg::SocialState::NotActivated as i32);
    assert_eq!(city.bank_events("icbc", &initial_pin, "socialcard.financial.v1.FinancialFrozen").await, 0);

    // The 12333 operator takes initial-PIN holders, in working hours.
    let case = lc
        .report_loss(report(&initial_pin, reg::LossKind::Temporary, reg::Channel::Hotline12333Operator))
        .await
        .unwrap()
        .into_inner()
        .loss_case
        .unwrap();
    assert_eq!(case.state, loss::CaseState::Locked as i32);

    // A holder who changed the PIN may use self-service at any hour.
    let (changed, _) = city.collected(12, "icbc").await;
    let mut registry = city.registry.clone();
    registry
        .activate_social_function(reg::ActivateSocialFunctionRequest {
            idempotency_key: key(),
            card_id: changed.clone(),
            actor: actor(reg::Channel::BureauWindow),
            documents: holder(true),
        })
        .await
        .unwrap();
    let pin = registry
        .change_social_pin(reg::ChangeSocialPinRequest {
            idempotency_key: key(),
            card_id: changed.clone(),
            actor: actor(reg::Channel::Hotline12333SelfService),
            old_pin: "123456".into(),
            new_pin: "802417".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(pin.changed);
    city.clock.advance(time::Duration::hours(12)); // 22:00 in Shanghai
    let case = lc
        .report_loss(report(&changed, reg::LossKind::Temporary, reg::Channel::Hotline12333SelfService))
        .await
        .unwrap()
        .into_inner()
        .loss_case
        .unwrap();
    assert_eq!(case.state, loss::CaseState::Locked as i32);

    // The operator is off at night.
    let (night, _) = city.collected(13, "icbc").await;
    let e =
        lc.report_loss(report(&night, reg::LossKind::Temporary, reg::Channel::Hotline12333Operator)).await.unwrap_err();
    assert_eq!(reason_of(&e).as_deref(), Some("OUTSIDE_WORKING_HOURS"));
    assert!(case_of(&lc, &night).await.is_empty());

    // R31: nobody reports a written loss for someone else.
    let mut by_agent = report(&night, reg::LossKind::Written, reg::Channel::BureauWindow);
    by_agent.documents = Some(reg::Documents {
        presenter: reg::Presenter::Agent as i32,
        holder_id_card: true,
        agent_id_card: true,
        written_authorization: true,
        ..Default::default()
    });
    let e = lc.report_loss(by_agent).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(reason_of(&e).as_deref(), Some("PROXY_NOT_ALLOWED"));

    // A written loss at a branch of the card's bank, through the bank's own API: both sides locked.
    let (at_branch, number) = city.collected(14, "ccb").await;
    let loss_at_branch = bank::ReportLossRequest {
        idempotency_key: key(),
        card_number: number.clone(),
        loss_kind: reg::LossKind::Written as i32,
        teller_id: "teller-2".into(),
        branch_id: "branch-1".into(),
        holder_id_checked: true,
    };
    // Another bank's branch may not.
    let e = city.bank("icbc").report_loss(loss_at_branch.clone()).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(case_of(&lc, &at_branch).await.is_empty());
    let answer = city.bank("ccb").report_loss(loss_at_branch.clone()).await.unwrap().into_inner();
    assert_eq!(answer.social_state, reg::SocialState::LossLocked as i32);
    assert_eq!(answer.financial_state, reg::FinancialState::Frozen as i32);
    // The bank's retry with its key is the same case, not a second one.
    let again = city.bank("ccb").report_loss(loss_at_branch).await.unwrap().into_inner();
    assert_eq!(again.case_id, answer.case_id);
    assert_eq!(case_of(&lc, &at_branch).await.len(), 1);
    assert_eq!(city.audited(&at_branch, "loss_lock").await, 1);
    assert_eq!(city.bank_events("ccb", &at_branch, "socialcard.financial.v1.FinancialFrozen").await, 1);

    // A temporary loss on the bank's phone line (R25): no ID card over the phone, both sides locked, and
    // recorded as a phone report, so only a written unlock at the bureau brings the social side back (R27).
    let (by_phone, number) = city.collected(15, "ccb").await;
    let phoned = bank::ReportLossRequest {
        idempotency_key: key(),
        card_number: number,
        loss_kind: reg::LossKind::Temporary as i32,
        teller_id: "agent-7".into(),
        branch_id: "ccb-call-centre".into(),
        holder_id_checked: false,
    };
    let answer = city.bank("ccb").report_loss(phoned).await.unwrap().into_inner();
    assert_eq!(answer.social_state, reg::SocialState::LossLocked as i32);
    assert_eq!(answer.financial_state, reg::FinancialState::Frozen as i32);
    let cases = case_of(&lc, &by_phone).await;
    assert_eq!(cases.len(), 1);
    assert_eq!(cases[0].loss_kind, reg::LossKind::Temporary as i32);
    assert_eq!(cases[0].channel, reg::Channel::Hotline as i32);
    // A kind that is neither is refused before anything is asked of anyone.
    let (untouched, number) = city.collected(16, "ccb").await;
    let e = city
        .bank("ccb")
        .report_loss(bank::ReportLossRequest {
            idempotency_key: key(),
            card_number: number,
            loss_kind: reg::LossKind::Automatic as i32,
            teller_id: "teller-2".into(),
            branch_id: "branch-1".into(),
            holder_id_checked: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(reason_of(&e).as_deref(), Some("LOSS_KIND_UNKNOWN"));
    assert!(case_of(&lc, &untouched).await.is_empty());
}

#[tokio::test]
async fn bad_loss_reports_are_refused_with_a_reason_and_write_nothing() {
    let city = City::start().await;
    let mut lc = city.coordinator().await.client;
    let (card_id, _) = city.collected(21, "icbc").await;
    let good = report(&card_id, reg::LossKind::Written, reg::Channel::BureauWindow);
    let cases: Vec<(&str, loss::ReportLossRequest, Code, &str)> = vec![
        (
            "no key",
            loss::ReportLossRequest { idempotency_key: String::new(), ..good.clone() },
            Code::InvalidArgument,
            "IDEMPOTENCY_KEY_FORMAT",
        ),
        (
            "no kind",
            loss::ReportLossRequest { loss_kind: 0, ..good.clone() },
            Code::InvalidArgument,
            "LOSS_KIND_UNKNOWN",
        ),
        (
            "unknown kind",
            loss::ReportLossRequest { loss_kind: 99, ..good.clone() },
            Code::InvalidArgument,
            "LOSS_KIND_UNKNOWN",
        ),
        (
            "automatic is not a report",
            loss::ReportLossRequest { loss_kind: reg::LossKind::Automatic as i32, ..good.clone() },
            Code::InvalidArgument,
            "LOSS_KIND_NOT_REPORTABLE",
        ),
        ("no actor", loss::ReportLossRequest { actor: None, ..good.clone() }, Code::InvalidArgument, "ACTOR_REQUIRED"),
        (
            "online takes no loss",
            loss::ReportLossRequest { actor: actor(reg::Channel::Online), ..good.clone() },
            Code::InvalidArgument,
            "CHANNEL_NOT_ALLOWED",
        ),
        (
            "written loss by phone",
            loss::ReportLossRequest { actor: actor(reg::Channel::Hotline), ..good.clone() },
            Code::InvalidArgument,
            "CHANNEL_NOT_ALLOWED",
        ),
        (
            "no card",
            loss::ReportLossRequest { card_id: String::new(), ..good.clone() },
            Code::InvalidArgument,
            "CARD_REQUIRED",
        ),
        (
            "both card id and number",
            loss::ReportLossRequest { card_number: "A00000018".into(), ..good.clone() },
            Code::InvalidArgument,
            "CARD_REQUIRED",
        ),
        (
            "unknown card",
            loss::ReportLossRequest { card_id: uuid::Uuid::now_v7().to_string(), ..good.clone() },
            Code::NotFound,
            "CARD_NOT_FOUND",
        ),
        (
            "bad check digit",
            loss::ReportLossRequest { card_id: String::new(), card_number: "A00000019".into(), ..good.clone() },
            Code::InvalidArgument,
            "CARD_NUMBER_CHECK_DIGIT",
        ),
    ];
    for (what, req, code, reason) in cases {
        let e = lc.report_loss(req).await.unwrap_err();
        assert_eq!(e.code(), code, "{what}: {e:?}");
        assert_eq!(reason_of(&e).as_deref(), Some(reason), "{what}: {e:?}");
    }
    assert!(case_of(&lc, &card_id).await.is_empty());
    assert_eq!(city.audited(&card_id, "loss_lock").await, 0);

    // The same key with another request is refused; with the same request, the same answer.
    let first = lc.report_loss(good.clone()).await.unwrap().into_inner();
    let replay = lc.report_loss(good.clone()).await.unwrap().into_inner();
    assert_eq!(first, replay);
    let e =
        lc.report_loss(loss::ReportLossRequest { actor: actor(reg::Channel::BankBranch), ..good }).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert_eq!(reason_of(&e).as_deref(), Some("IDEMPOTENCY_KEY_REUSED"));
    assert_eq!(case_of(&lc, &card_id).await.len(), 1);
}

#[tokio::test]
async fn a_written_loss_is_undone_only_in_person_with_the_card_and_upgrades_a_temporary_one() {
    let city = City::start().await;
    let mut lc = city.coordinator().await.client;
    let (card_id, number) = city.collected(31, "icbc").await;
    city.bank("icbc").activate_financial(activation(&number)).await.unwrap();

    let temporary = lc
        .report_loss(report(&card_id, reg::LossKind::Temporary, reg::Channel::Hotline))
        .await
        .unwrap()
        .into_inner()
        .loss_case
        .unwrap();
    // The holder then comes to the bureau with ID: the temporary loss becomes written, on both sides.
    let written = lc
        .report_loss(report(&card_id, reg::LossKind::Written, reg::Channel::BureauWindow))
        .await
        .unwrap()
        .into_inner()
        .loss_case
        .unwrap();
    assert_eq!(written.case_id, temporary.case_id);
    assert_eq!(written.loss_kind, reg::LossKind::Written as i32);
    assert_eq!(written.state, loss::CaseState::Locked as i32);
    assert_eq!(city.card(&card_id).await.social_loss_kind, reg::LossKind::Written as i32);
    assert_eq!(case_of(&lc, &card_id).await.len(), 1);

    // R27: only in person with ID and the original card.
    let e = lc.unlock(unlock(&card_id, reg::Channel::BureauWindow, false)).await.unwrap_err();
    assert_eq!(reason_of(&e).as_deref(), Some("CARD_REQUIRED"));
    let e = city
        .bank("icbc")
        .unlock_financial(bank::UnlockFinancialRequest {
            idempotency_key: key(),
            card_number: number.clone(),
            teller_id: "teller-1".into(),
            branch_id: "branch-9".into(),
            holder_id_checked: true,
            card_presented: false,
        })
        .await
        .unwrap_err();
    assert_eq!(reason_of(&e).as_deref(), Some("CARD_REQUIRED"));
    lc.unlock(unlock(&card_id, reg::Channel::BureauWindow, true)).await.unwrap();
    let back = city
        .bank("icbc")
        .unlock_financial(bank::UnlockFinancialRequest {
            idempotency_key: key(),
            card_number: number.clone(),
            teller_id: "teller-1".into(),
            branch_id: "branch-9".into(),
            holder_id_checked: true,
            card_presented: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(back.financial_state, reg::FinancialState::Active as i32);
    let card = city.card(&card_id).await;
    assert_eq!(card.social_state, reg::SocialState::Active as i32);
    eventually("the registry shows the financial function active again", || async {
        city.card(&card_id).await.financial_state == reg::FinancialState::Active as i32
    })
    .await;
    let cases = case_of(&lc, &card_id).await;
    assert_eq!(cases[0].state, loss::CaseState::Unlocked as i32);
}

#[tokio::test]
async fn r22_after_n_days_locks_the_social_side_and_a_bank_activation_leaves_it_for_the_bureau() {
    let city = City::start().await;
    let running = city.coordinator().await;
    let mut lc = running.client.clone();
    let (card_id, number) = city.collected(41, "icbc").await;
    eventually("the R22 timer is scheduled at collection", || async {
        let timers = lc
            .clone()
            .list_timers(loss::ListTimersRequest { card_id: card_id.clone(), pending_only: true, page_size: 0 })
            .await
            .unwrap()
            .into_inner()
            .timers;
        timers.iter().any(|t| t.kind == loss::TimerKind::AutoLock as i32)
    })
    .await;

    city.clock.advance(time::Duration::days(299));
    running.coordinator.tick().await;
    assert_eq!(city.card(&card_id).await.social_state, reg::SocialState::NotActivated as i32, "not yet");

    city.clock.advance(time::Duration::days(2));
    eventually("R22 opens its case", || async { !case_of(&lc, &card_id).await.is_empty() }).await;
    assert_eq!(city.card(&card_id).await.social_loss_kind, reg::LossKind::Automatic as i32);
    let case = &case_of(&lc, &card_id).await[0];
    assert_eq!(case.loss_kind, reg::LossKind::Automatic as i32);
    assert_eq!(case.state, loss::CaseState::Locked as i32);
    assert!(!case.freezes_financial);

    // The bank activates the financial function; the social side waits for the bureau (R22).
    let on = city.bank("icbc").activate_financial(activation(&number)).await.unwrap().into_inner();
    assert_eq!(on.financial_state, reg::FinancialState::Active as i32);
    assert!(on.social_awaits_bureau_unlock);
    assert_eq!(on.social_state, reg::SocialState::LossLocked as i32);

    let unlocked = lc.unlock(unlock(&card_id, reg::Channel::BureauWindow, true)).await.unwrap().into_inner();
    assert_eq!(unlocked.loss_case.unwrap().state, loss::CaseState::Unlocked as i32);
    assert_eq!(city.card(&card_id).await.social_state, reg::SocialState::Active as i32);
    // The timer fired once and stays fired.
    running.coordinator.tick().await;
    assert_eq!(city.audited(&card_id, "loss_lock").await, 1);
}

#[tokio::test]
async fn a_temporary_loss_lapses_on_the_bank_side_after_the_bank_days_while_the_bureau_side_waits() {
    let city = City::start().await;
    let running = city.coordinator().await;
    let mut lc = running.client.clone();
    let (card_id, _) = city.collected(51, "icbc").await;
    let case = lc
        .report_loss(report(&card_id, reg::LossKind::Temporary, reg::Channel::Hotline))
        .await
        .unwrap()
        .into_inner()
        .loss_case
        .unwrap();
    assert!(case.expires_at.is_some());

    city.clock.advance(time::Duration::days(6)); // icbc: 5 days
    eventually("the bank side lapses", || async {
        let c = lc.clone().get_case(loss::GetCaseRequest { case_id: case.case_id.clone() }).await.unwrap().into_inner();
        !c.loss_case.unwrap().financial_frozen
    })
    .await;
    let now = lc
        .get_case(loss::GetCaseRequest { case_id: case.case_id.clone() })
        .await
        .unwrap()
        .into_inner()
        .loss_case
        .unwrap();
    assert_eq!(now.state, loss::CaseState::Unlocking as i32);
    assert!(now.social_locked, "Shanghai: the social side needs a written unlock at the bureau (R27)");
    assert_eq!(city.bank_events("icbc", &card_id, "socialcard.financial.v1.FinancialUnfrozen").await, 1);
    eventually("the registry shows the freeze lifted", || async {
        city.card(&card_id).await.financial_state == reg::FinancialState::NotActivated as i32
    })
    .await;
}

#[tokio::test]
async fn a_coordinator_killed_mid_case_completes_it_after_restart_with_each_side_locked_once() {
    let city = City::start().await;
    let (card_id, _) = city.collected(61, "icbc").await;

    // The icbc adapter is out of reach: the case locks the social side and stays one-sided.
    let dead = "http://127.0.0.1:9".to_string();
    let first = city.coordinator_with(|code, addr| if code == "icbc" { dead.clone() } else { addr.into() }).await;
    let mut lc = first.client.clone();
    let report = report(&card_id, reg::LossKind::Written, reg::Channel::BureauWindow);
    let case = lc.report_loss(report.clone()).await.unwrap().into_inner().loss_case.unwrap();
    assert_eq!(case.state, loss::CaseState::OneSided as i32);
    assert!(case.social_locked && !case.financial_frozen);
    let listed = lc.list_cases(loss::ListCasesRequest { one_sided_only: true, ..Default::default() }).await.unwrap();
    assert_eq!(listed.into_inner().cases.len(), 1, "the dashboard lists the one-sided card");
    first.kill().await;

    // Restarted with the adapter reachable: the case completes by itself.
    let second = city.coordinator().await;
    let mut lc = second.client.clone();
    eventually("the restarted coordinator freezes the financial side", || async {
        let c = lc.clone().get_case(loss::GetCaseRequest { case_id: case.case_id.clone() }).await.unwrap().into_inner();
        c.loss_case.unwrap().state == loss::CaseState::Locked as i32
    })
    .await;
    // The caller's retry is the same case.
    let again = lc.report_loss(report).await.unwrap().into_inner().loss_case.unwrap();
    assert_eq!(again.case_id, case.case_id);
    assert_eq!(city.audited(&card_id, "loss_lock").await, 1);
    assert_eq!(city.bank_events("icbc", &card_id, "socialcard.financial.v1.FinancialFrozen").await, 1);

    // Killed between the registry's answer and the case's insert: the registry's lock (made with the
    // coordinator's derived key) is found in the card events and the case completed from there.
    let (other, _) = city.collected(62, "icbc").await;
    let lost_key = key();
    city.registry
        .clone()
        .lock_social_function(reg::LockSocialFunctionRequest {
            idempotency_key: format!("loss:{lost_key}:social"),
            card_id: other.clone(),
            actor: actor(reg::Channel::Hotline),
            documents: holder(false),
            loss_kind: reg::LossKind::Temporary as i32,
        })
        .await
        .unwrap();
    eventually("the coordinator opens and completes the case from the registry's event", || async {
        let cases = case_of(&lc, &other).await;
        cases.len() == 1 && cases[0].state == loss::CaseState::Locked as i32
    })
    .await;
    let mut retry = support::report(&other, reg::LossKind::Temporary, reg::Channel::Hotline);
    retry.idempotency_key = lost_key;
    let retried = lc.report_loss(retry).await.unwrap().into_inner().loss_case.unwrap();
    assert_eq!(case_of(&lc, &other).await[0].case_id, retried.case_id);
    assert_eq!(city.audited(&other, "loss_lock").await, 1);
    assert_eq!(city.bank_events("icbc", &other, "socialcard.financial.v1.FinancialFrozen").await, 1);
}

#[tokio::test]
async fn an_unlock_whose_answer_was_lost_after_the_registry_committed_is_answered_on_retry() {
    let city = City::start().await;
    let mut lc = city.coordinator().await.client;
    let (card_id, number) = city.collected(63, "icbc").await;
    let case = lc
        .report_loss(report(&card_id, reg::LossKind::Temporary, reg::Channel::Hotline))
        .await
        .unwrap()
        .into_inner()
        .loss_case
        .unwrap();
    assert_eq!(case.state, loss::CaseState::Locked as i32);

    // The coordinator's registry call for this Unlock committed (with the key it derives), and then the
    // coordinator died before storing its answer: the registry's event releases the case's social side.
    let call = unlock(&card_id, reg::Channel::BureauWindow, true);
    city.registry
        .clone()
        .unlock_social_function(reg::UnlockSocialFunctionRequest {
            idempotency_key: format!("unlock:{}:social", call.idempotency_key),
            card_id: card_id.clone(),
            actor: call.actor.clone(),
            documents: call.documents,
        })
        .await
        .unwrap();
    eventually("the registry's unlock event releases the case's social side", || async {
        let c = lc.clone().get_case(loss::GetCaseRequest { case_id: case.case_id.clone() }).await.unwrap().into_inner();
        c.loss_case.unwrap().state == loss::CaseState::Unlocking as i32
    })
    .await;

    // The caller's retry gets the answer, not SIDE_ALREADY_UNLOCKED; nothing is unlocked twice.
    let retried = lc.unlock(call.clone()).await.unwrap().into_inner().loss_case.unwrap();
    assert_eq!(retried.case_id, case.case_id);
    assert!(!retried.social_locked && retried.financial_frozen, "{retried:?}");
    assert_eq!(city.audited(&card_id, "unlock").await, 1);

    // Once the bank's side is unlocked too the case is closed: the same retry still gets its answer.
    city.bank("icbc")
        .unlock_financial(bank::UnlockFinancialRequest {
            idempotency_key: key(),
            card_number: number,
            teller_id: "teller-1".into(),
            branch_id: "branch-9".into(),
            holder_id_checked: true,
            card_presented: false,
        })
        .await
        .unwrap();
    let again = lc.unlock(call.clone()).await.unwrap().into_inner().loss_case.unwrap();
    assert_eq!(again, retried, "a replay is the first answer");
    // Another caller's Unlock for the closed case is still refused.
    let other = lc.unlock(unlock(&card_id, reg::Channel::BureauWindow, true)).await.unwrap_err();
    assert_eq!(other.code(), Code::FailedPrecondition);
    assert_eq!(reason_of(&other).as_deref(), Some("NO_OPEN_CASE"));
}

#[tokio::test]
async fn a_pin_lock_reported_by_the_registry_becomes_a_case_closed_by_a_reset_at_the_window() {
    let city = City::start().await;
    let mut lc = city.coordinator().await.client;
    let (card_id, _) = city.collected(71, "icbc").await;
    let mut registry = city.registry.clone();
    registry
        .activate_social_function(reg::ActivateSocialFunctionRequest {
            idempotency_key: key(),
            card_id: card_id.clone(),
            actor: actor(reg::Channel::BureauWindow),
            documents: holder(true),
        })
        .await
        .unwrap();
    for _ in 0..6 {
        registry
            .verify_social_pin(reg::VerifySocialPinRequest {
                idempotency_key: key(),
                card_id: card_id.clone(),
                actor: actor(reg::Channel::MedicalTerminal),
                pin: "000000".into(),
            })
            .await
            .unwrap();
    }
    assert_eq!(city.card(&card_id).await.social_state, reg::SocialState::PinLocked as i32);
    eventually("the PIN lock becomes a case", || async {
        case_of(&lc, &card_id).await.iter().any(|c| c.pin_lock && c.state == loss::CaseState::Locked as i32)
    })
    .await;
    let e = lc.unlock(unlock(&card_id, reg::Channel::BureauWindow, true)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    registry
        .reset_social_pin(reg::ResetSocialPinRequest {
            idempotency_key: key(),
            card_id: card_id.clone(),
            actor: actor(reg::Channel::BureauWindow),
            documents: holder(true),
            new_pin: "246810".into(),
        })
        .await
        .unwrap();
    eventually("the reset closes the case", || async {
        case_of(&lc, &card_id).await.iter().any(|c| c.pin_lock && c.state == loss::CaseState::Unlocked as i32)
    })
    .await;
}

#[tokio::test]
async fn a_replacement_ordered_after_a_written_loss_closes_the_case_for_good() {
    let city = City::start().await;
    let mut lc = city.coordinator().await.client;
    let (card_id, number) = city.collected(81, "icbc").await;
    let case = lc
        .report_loss(report(&card_id, reg::LossKind::Written, reg::Channel::BureauWindow))
        .await
        .unwrap()
        .into_inner()
        .loss_case
        .unwrap();
    assert_eq!(case.state, loss::CaseState::Locked as i32);

    // R28: a new application replacing the lost card (new number, the old one cancelled for good).
    let holder_id = socialcard_registry::fixtures::adult_citizen_id(81);
    let replacement = city
        .registry
        .clone()
        .submit_application(reg::SubmitApplicationRequest {
            idempotency_key: key(),
            citizen_id: holder_id,
            actor: actor(reg::Channel::BureauWindow),
            documents: holder(false),
            card_type: reg::CardType::Adult as i32,
            holder_status: reg::HolderStatus::Unemployed as i32,
            bank_code: "icbc".into(),
            photo: Some(reg::Photo { source: reg::PhotoSource::CommunityPoint as i32, ..Default::default() }),
            backup_point_id: "point-1".into(),
            replaces_card_id: card_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap();
    assert_eq!(replacement.replaces_card_id, card_id);
    eventually("the case closes as replaced", || async {
        let c = lc.clone().get_case(loss::GetCaseRequest { case_id: case.case_id.clone() }).await.unwrap();
        c.into_inner().loss_case.unwrap().state == loss::CaseState::Replaced as i32
    })
    .await;
    // Never undone now, on either side (R27).
    let e = lc.unlock(unlock(&card_id, reg::Channel::BureauWindow, true)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = city
        .bank("icbc")
        .unlock_financial(bank::UnlockFinancialRequest {
            idempotency_key: key(),
            card_number: number,
            teller_id: "teller-1".into(),
            branch_id: "branch-9".into(),
            holder_id_checked: true,
            card_presented: true,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let timers = lc
        .list_timers(loss::ListTimersRequest { card_id: card_id.clone(), pending_only: true, page_size: 0 })
        .await
        .unwrap()
        .into_inner()
        .timers;
    assert!(timers.is_empty(), "a replaced card's deadlines are settled: {timers:?}");
}

async fn timers_of(
    client: &loss::loss_coordinator_service_client::LossCoordinatorServiceClient<tonic::transport::Channel>,
    card_id: &str,
    kind: loss::TimerKind,
) -> Vec<loss::Timer> {
    let timers = client
        .clone()
        .list_timers(loss::ListTimersRequest { card_id: card_id.into(), pending_only: false, page_size: 0 })
        .await
        .unwrap()
        .into_inner()
        .timers;
    timers.into_iter().filter(|t| t.kind == kind as i32).collect()
}

/// Waits until the card's `kind` timer has fired (its outcome is written just after its effect shows); returns it.
async fn fired(
    client: &loss::loss_coordinator_service_client::LossCoordinatorServiceClient<tonic::transport::Channel>,
    card_id: &str,
    kind: loss::TimerKind,
) -> Vec<loss::Timer> {
    eventually("the timer records how it ended", || async {
        timers_of(client, card_id, kind).await.iter().all(|t| t.fired_at.is_some())
    })
    .await;
    timers_of(client, card_id, kind).await
}

fn at(t: &prost_types::Timestamp) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp(t.seconds).unwrap()
}

/// Shanghai's city file with a social-side lapse of temporary losses (R27: Shenzhen's 10 days).
fn lapsing_after(days: u32) -> socialcard_domain::CityPolicy {
    let file = socialcard_domain::policy::SHANGHAI_CITY_FILE
        .replace("# temporary_loss_expiry_days_social = 10", &format!("temporary_loss_expiry_days_social = {days}"));
    socialcard_domain::CityPolicy::from_toml(&file).unwrap()
}

#[tokio::test]
async fn a_temporary_loss_lapses_on_the_social_side_after_the_city_days_unless_made_written() {
    let city = City::start_with(lapsing_after(10)).await;
    let running = city.coordinator().await;
    let mut lc = running.client.clone();
    let (card_id, _) = city.collected(91, "icbc").await;
    let (written_id, _) = city.collected(92, "icbc").await;
    let reported_at = socialcard_server::Clock::now(&city.clock);

    let case = lc
        .report_loss(report(&card_id, reg::LossKind::Temporary, reg::Channel::Hotline))
        .await
        .unwrap()
        .into_inner()
        .loss_case
        .unwrap();
    assert_eq!(at(case.social_expires_at.as_ref().unwrap()), reported_at + time::Duration::days(10));
    // The other holder's phone loss is made written at the bureau before it lapses.
    lc.report_loss(report(&written_id, reg::LossKind::Temporary, reg::Channel::Hotline)).await.unwrap();
    city.clock.advance(time::Duration::days(3));
    let written = lc
        .report_loss(report(&written_id, reg::LossKind::Written, reg::Channel::BureauWindow))
        .await
        .unwrap()
        .into_inner()
        .loss_case
        .unwrap();
    assert_eq!(written.loss_kind, reg::LossKind::Written as i32);

    // One day before the lapse (the bank's 5 days are over): the social side is still locked.
    city.clock.set(reported_at + time::Duration::days(9));
    eventually("the bank side lapses after its own days", || async {
        let c = lc.clone().get_case(loss::GetCaseRequest { case_id: case.case_id.clone() }).await.unwrap();
        !c.into_inner().loss_case.unwrap().financial_frozen
    })
    .await;
    running.coordinator.tick().await;
    running.coordinator.tick().await;
    assert_eq!(city.card(&card_id).await.social_state, reg::SocialState::LossLocked as i32, "not yet");
    let pending = timers_of(&lc, &card_id, loss::TimerKind::SocialLossExpiry).await;
    assert!(pending.len() == 1 && pending[0].fired_at.is_none(), "{pending:?}");

    // After it: the coordinator's timer gives the social side back, and the case has lapsed on both sides.
    city.clock.set(reported_at + time::Duration::days(10) + time::Duration::minutes(1));
    eventually("the social side lapses", || async {
        city.card(&card_id).await.social_state == reg::SocialState::NotActivated as i32
    })
    .await;
    eventually("the case ends as expired", || async {
        let c = lc.clone().get_case(loss::GetCaseRequest { case_id: case.case_id.clone() }).await.unwrap();
        c.into_inner().loss_case.unwrap().state == loss::CaseState::Expired as i32
    })
    .await;
    let lapse = fired(&lc, &card_id, loss::TimerKind::SocialLossExpiry).await;
    assert!(lapse.len() == 1 && lapse[0].outcome.contains("R27"), "{lapse:?}");
    assert_eq!(city.audited(&card_id, "deadline").await, 1);

    // The written loss does not lapse: its timer ends moot, its social side stays locked and its case open.
    let moot = fired(&lc, &written_id, loss::TimerKind::SocialLossExpiry).await;
    assert!(moot.len() == 1 && moot[0].outcome.starts_with("moot"), "{moot:?}");
    let card = city.card(&written_id).await;
    assert_eq!(card.social_state, reg::SocialState::LossLocked as i32);
    assert_eq!(card.social_loss_kind, reg::LossKind::Written as i32);
    let still = &case_of(&lc, &written_id).await[0];
    assert_eq!(still.state, loss::CaseState::Locked as i32, "{still:?}");
    assert!(still.social_locked && still.financial_frozen);
    assert_eq!(city.audited(&written_id, "deadline").await, 0);
}

/// Takes an application through approval, production (with `account`, empty for a temporary card) and
/// collection; returns the collected card.
async fn through_collection(
    city: &City,
    app: reg::SubmitApplicationRequest,
    account: String,
    documents: Option<reg::Documents>,
) -> reg::Card {
    let mut r = city.registry.clone();
    r.register_person(reg::RegisterPersonRequest {
        idempotency_key: key(),
        citizen_id: app.citizen_id.clone(),
        name: "Li Lei".into(),
        phone: "13800000000".into(),
    })
    .await
    .unwrap();
    let card = r.submit_application(app).await.unwrap().into_inner().card.unwrap();
    r.review_application(reg::ReviewApplicationRequest {
        idempotency_key: key(),
        card_id: card.card_id.clone(),
        actor: actor(reg::Channel::BureauWindow),
        decision: reg::ReviewDecision::Approve as i32,
        reason: String::new(),
    })
    .await
    .unwrap();
    r.start_production(reg::StartProductionRequest {
        idempotency_key: key(),
        card_id: card.card_id.clone(),
        actor: actor(reg::Channel::Production),
        batch_id: "b1".into(),
    })
    .await
    .unwrap();
    r.record_production_result(reg::RecordProductionResultRequest {
        idempotency_key: key(),
        card_id: card.card_id.clone(),
        actor: actor(reg::Channel::Production),
        result: Some(reg::record_production_result_request::Result::AccountNumber(account)),
    })
    .await
    .unwrap();
    r.record_collection(reg::RecordCollectionRequest {
        idempotency_key: key(),
        card_id: card.card_id.clone(),
        actor: actor(reg::Channel::CommunityPoint),
        method: reg::CollectionMethod::PickedUpAtPoint as i32,
        collected_at: None,
        documents,
    })
    .await
    .unwrap()
    .into_inner()
    .card
    .unwrap()
}

fn application(citizen_id: &str, card_type: reg::CardType, bank: &str) -> reg::SubmitApplicationRequest {
    reg::SubmitApplicationRequest {
        idempotency_key: key(),
        citizen_id: citizen_id.into(),
        actor: actor(reg::Channel::CommunityPoint),
        documents: holder(true),
        card_type: card_type as i32,
        holder_status: reg::HolderStatus::Unemployed as i32,
        bank_code: bank.into(),
        photo: Some(reg::Photo { source: reg::PhotoSource::CommunityPoint as i32, ..Default::default() }),
        backup_point_id: "point-1".into(),
        ..Default::default()
    }
}

/// Waits for the coordinator to schedule the card's `kind` timer from CardCollected; returns its due time.
async fn scheduled(
    lc: &loss::loss_coordinator_service_client::LossCoordinatorServiceClient<tonic::transport::Channel>,
    card_id: &str,
    kind: loss::TimerKind,
) -> time::OffsetDateTime {
    eventually("the timer is scheduled at collection", || async { !timers_of(lc, card_id, kind).await.is_empty() })
        .await;
    at(timers_of(lc, card_id, kind).await[0].due_at.as_ref().unwrap())
}

#[tokio::test]
async fn r23_and_r24_are_enforced_by_the_coordinators_own_timers() {
    let city = City::start().await;
    let running = city.coordinator().await;
    let lc = running.client.clone();

    // R23: a minor born 1 December 2010 turns 16 on 1 December 2026; unexchanged, the card is disabled
    // from 1 December 2029 (Shanghai midnight).
    let minor_id =
        format!("31010520101201007{}", socialcard_domain::citizen_id::check_char(b"31010520101201007") as char);
    let guardian = Some(reg::Documents {
        presenter: reg::Presenter::Guardian as i32,
        household_register: true,
        guardianship_proof: true,
        agent_id_card: true,
        card_presented: true,
        ..Default::default()
    });
    let mut app = application(&minor_id, reg::CardType::Minor, "icbc");
    app.holder_status = reg::HolderStatus::Student as i32;
    app.documents = guardian;
    let bin = socialcard_domain::BankDirectory::shanghai().get("icbc").unwrap().bin_prefixes[0].clone();
    let body = format!("{bin}{:0>width$}", 93, width = 18 - bin.len());
    let account = format!("{body}{}", socialcard_domain::numbers::luhn_check_digit(&body));
    let minor = through_collection(&city, app, account, guardian).await;
    let due = scheduled(&lc, &minor.card_id, loss::TimerKind::MinorExchange).await;
    assert_eq!(due, time::macros::datetime!(2029-12-01 00:00 +08:00));
    // Financially activated, so R22 never locks it first (the R22 timer is settled).
    city.bank("icbc").activate_financial(activation(&minor.card_number)).await.unwrap();
    eventually("the R22 timer is settled by the activation", || async {
        timers_of(&lc, &minor.card_id, loss::TimerKind::AutoLock).await.iter().all(|t| t.fired_at.is_some())
    })
    .await;

    // R24: a temporary card, valid for the city's 180 days from collection.
    let temp_id = socialcard_registry::fixtures::adult_citizen_id(93);
    let temp =
        through_collection(&city, application(&temp_id, reg::CardType::Temporary, ""), String::new(), holder(true))
            .await;
    let expires = scheduled(&lc, &temp.card_id, loss::TimerKind::TemporaryCardExpiry).await;
    assert_eq!(expires, socialcard_server::Clock::now(&city.clock) + time::Duration::days(180));
    assert!(timers_of(&lc, &temp.card_id, loss::TimerKind::AutoLock).await.is_empty(), "no financial function");

    // A day before the card's validity ends nothing happens; past it, the coordinator's timer expires it.
    city.clock.set(expires - time::Duration::days(1));
    running.coordinator.tick().await;
    assert_ne!(city.card(&temp.card_id).await.physical_state, reg::PhysicalState::Cancelled as i32);
    assert_eq!(city.audited(&temp.card_id, "deadline").await, 0);
    city.clock.set(expires + time::Duration::minutes(1));
    eventually("the temporary card expires (R24)", || async {
        city.card(&temp.card_id).await.physical_state == reg::PhysicalState::Cancelled as i32
    })
    .await;

    // The same for the minor card, a day before its exchange deadline and then past it.
    city.clock.set(due - time::Duration::days(1));
    running.coordinator.tick().await;
    assert_ne!(city.card(&minor.card_id).await.social_state, reg::SocialState::Disabled as i32);
    assert_eq!(city.audited(&minor.card_id, "deadline").await, 0);
    city.clock.set(due + time::Duration::minutes(1));
    eventually("the unexchanged minor card is disabled (R23)", || async {
        city.card(&minor.card_id).await.social_state == reg::SocialState::Disabled as i32
    })
    .await;
    assert_eq!(city.card(&temp.card_id).await.status_code, "9");
    let r23 = fired(&lc, &minor.card_id, loss::TimerKind::MinorExchange).await;
    assert!(r23.len() == 1 && r23[0].outcome.contains("R23"), "{r23:?}");
    let r24 = fired(&lc, &temp.card_id, loss::TimerKind::TemporaryCardExpiry).await;
    assert!(r24.len() == 1 && r24[0].outcome.contains("R24"), "{r24:?}");
    assert_eq!(city.audited(&minor.card_id, "deadline").await, 1);
    assert_eq!(city.audited(&temp.card_id, "deadline").await, 1);
}

#[tokio::test]
async fn a_pending_timer_survives_a_coordinator_restart_and_fires_once() {
    let city = City::start().await;
    let first = city.coordinator().await;
    let (card_id, _) = city.collected(94, "icbc").await;
    let due = scheduled(&first.client, &card_id, loss::TimerKind::AutoLock).await;
    first.kill().await;

    // A new coordinator on the same database: the R22 timer is still pending, and fires once due.
    let second = city.coordinator().await;
    let lc = second.client.clone();
    let pending = timers_of(&lc, &card_id, loss::TimerKind::AutoLock).await;
    assert!(pending.len() == 1 && pending[0].fired_at.is_none(), "{pending:?}");
    city.clock.set(due + time::Duration::minutes(1));
    eventually("R22 locks the social side after the restart", || async {
        city.card(&card_id).await.social_loss_kind == reg::LossKind::Automatic as i32
    })
    .await;
    let r22 = fired(&lc, &card_id, loss::TimerKind::AutoLock).await;
    assert!(r22.len() == 1 && r22[0].outcome.contains("R22"), "{r22:?}");
    for _ in 0..3 {
        second.coordinator.tick().await;
    }
    assert_eq!(city.audited(&card_id, "loss_lock").await, 1);
    let cases = case_of(&lc, &card_id).await;
    assert_eq!(cases.len(), 1);
    assert_eq!(cases[0].loss_kind, reg::LossKind::Automatic as i32);
}
