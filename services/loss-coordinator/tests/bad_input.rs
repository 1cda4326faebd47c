//! A corpus of generated invalid requests (issue 8): 10,000 requests from a seeded generator across the
//! registry, a bank adapter and the loss coordinator, each broken in one way (check digits, impossible
//! dates, unknown region codes, full-width digits, control characters, oversize fields, unknown enum
//! values, another bank's card). Every one is refused with the code it deserves, no row is written
//! anywhere, and no refusal echoes the personal data it was sent.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use socialcard_domain::citizen_id::check_char;
use socialcard_proto::bank::v1 as bank;
use socialcard_proto::loss::v1 as loss;
use socialcard_proto::registry::v1 as reg;
use support::*;
use tonic::{Code, Status};

const CORPUS: usize = 10_000;

/// One way to break a citizen ID; returns the broken ID.
fn broken_citizen_id(rng: &mut StdRng) -> String {
    let valid = |first17: String| format!("{first17}{}", check_char(first17.as_bytes()) as char);
    let base = format!(
        "31010419{:02}0{}15{:03}",
        rng.random_range(50..99),
        rng.random_range(1..9),
        rng.random_range(100..999)
    );
    match rng.random_range(0..9) {
        // A wrong check character.
        0 => {
            let ok = valid(base.clone());
            let last = ok.chars().last().unwrap();
            let wrong = if last == '0' { '1' } else { '0' };
            format!("{base}{wrong}")
        }
        // An impossible date (30 February).
        1 => valid(format!("3101041990023015{}", rng.random_range(0..9))),
        // A region code that does not exist.
        2 => valid(format!("000000199001011{:02}", rng.random_range(10..99))),
        // Full-width digits.
        3 => valid(base)
            .chars()
            .map(|c| if c.is_ascii_digit() { char::from_u32(c as u32 - 0x30 + 0xFF10).unwrap() } else { c })
            .collect(),
        // A control character inside.
        4 => {
            let mut id = valid(base);
            id.insert(rng.random_range(1..17), '\u{0007}');
            id
        }
        // Too long, too short.
        5 => format!("{}{}", valid(base), rng.random_range(0..9)),
        6 => valid(base)[..rng.random_range(1..17)].to_string(),
        // Letters where digits belong.
        7 => valid(base).replacen('1', "I", 1),
        // Born in the future.
        _ => valid(format!("3101042{:03}0101{:03}", rng.random_range(100..999), rng.random_range(100..999))),
    }
}

fn broken_card_number(rng: &mut StdRng) -> String {
    let n: u32 = rng.random_range(0..9_999_999);
    match rng.random_range(0..5) {
        0 => format!("A{n:07}{}", 10), // two check digits
        1 => format!("A{n:07}").replace('A', "a1"),
        2 => format!("Ａ{n:07}5"),
        3 => format!("A{n:07}\u{0000}"),
        _ => "A".repeat(rng.random_range(30..3000)),
    }
}

fn oversize(rng: &mut StdRng) -> String {
    "名".repeat(rng.random_range(65..5000))
}

#[derive(Debug)]
struct Expected {
    code: Code,
    /// Personal data the request carried, which the refusal must not echo.
    secrets: Vec<String>,
}

fn refused(what: &str, r: Result<(), Status>, e: &Expected) -> Code {
    let status = r.expect_err(what);
    assert_eq!(status.code(), e.code, "{what}: {status:?}");
    assert!(socialcard_server::error::reason_of(&status).is_some(), "{what}: a machine-readable reason");
    for s in &e.secrets {
        if s.chars().count() >= 6 {
            assert!(!status.message().contains(s.as_str()), "{what}: the refusal echoes personal data: {status:?}");
        }
    }
    status.code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_generated_invalid_requests_are_refused_and_write_nothing() {
    let city = City::start().await;
    let lc = city.coordinator().await.client;
    let (icbc_card, icbc_number) = city.collected(7001, "icbc").await;
    let (_, ccb_number) = city.collected(7002, "ccb").await;
    let registry_before = city.registry_store.counts().await.unwrap();
    let bank_events_before = city.bank_events("icbc", &icbc_card, "socialcard.financial.v1.FinancialActivated").await;

    let mut rng = StdRng::seed_from_u64(20261123);
    let mut by_code = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..CORPUS {
        let mut registry = city.registry.clone();
        let mut icbc = city.bank("icbc");
        let mut lc = lc.clone();
        let kind = rng.random_range(0..10);
        let code = match kind {
            0 => {
                let id = broken_citizen_id(&mut rng);
                let r = registry
                    .register_person(reg::RegisterPersonRequest {
                        idempotency_key: key(),
                        citizen_id: id.clone(),
                        name: "Wang Fang".into(),
                        phone: "13800000000".into(),
                    })
                    .await;
                refused(
                    "RegisterPerson(id)",
                    r.map(|_| ()),
                    &Expected { code: Code::InvalidArgument, secrets: vec![id] },
                )
            }
            1 => {
                let id = socialcard_registry::fixtures::adult_citizen_id(8000 + i as u64);
                let (name, phone) = match rng.random_range(0..4) {
                    0 => (oversize(&mut rng), "13800000000".to_string()),
                    1 => ("Wang\u{0000}Fang".to_string(), "13800000000".to_string()),
                    2 => ("Wang Fang".to_string(), "1380000000O".to_string()),
                    _ => ("Wang Fang".to_string(), "１３８００００００００".to_string()),
                };
                let r = registry
                    .register_person(reg::RegisterPersonRequest {
                        idempotency_key: key(),
                        citizen_id: id.clone(),
                        name: name.clone(),
                        phone: phone.clone(),
                    })
                    .await;
                refused(
                    "RegisterPerson(name/phone)",
                    r.map(|_| ()),
                    &Expected { code: Code::InvalidArgument, secrets: vec![id, phone] },
                )
            }
            2 => {
                let id = broken_citizen_id(&mut rng);
                let r = registry
                    .submit_application(reg::SubmitApplicationRequest {
                        idempotency_key: key(),
                        citizen_id: id.clone(),
                        actor: actor(reg::Channel::CommunityPoint),
                        documents: holder(false),
                        card_type: reg::CardType::Adult as i32,
                        holder_status: reg::HolderStatus::Unemployed as i32,
                        bank_code: "icbc".into(),
                        photo: Some(reg::Photo {
                            source: reg::PhotoSource::CommunityPoint as i32,
                            ..Default::default()
                        }),
                        backup_point_id: "point-1".into(),
                        ..Default::default()
                    })
                    .await;
                refused(
                    "SubmitApplication",
                    r.map(|_| ()),
                    &Expected { code: Code::InvalidArgument, secrets: vec![id] },
                )
            }
            3 => {
                // Unknown or unset enum values on a real card.
                let (channel, loss_kind) = match rng.random_range(0..3) {
                    0 => (rng.random_range(13..10_000), reg::LossKind::Written as i32),
                    1 => (0, reg::LossKind::Written as i32),
                    _ => (reg::Channel::BureauWindow as i32, rng.random_range(4..10_000)),
                };
                let r = registry
                    .lock_social_function(reg::LockSocialFunctionRequest {
                        idempotency_key: key(),
                        card_id: icbc_card.clone(),
                        actor: Some(reg::Actor {
                            channel,
                            operator_id: "c".into(),
                            site_id: "s".into(),
                            ..Default::default()
                        }),
                        documents: holder(false),
                        loss_kind,
                    })
                    .await;
                refused(
                    "LockSocialFunction(enum)",
                    r.map(|_| ()),
                    &Expected { code: Code::InvalidArgument, secrets: vec![] },
                )
            }
            4 => {
                let pin = match rng.random_range(0..4) {
                    0 => "12345".to_string(),
                    1 => "1234567".to_string(),
                    2 => "１２３４５６".to_string(),
                    _ => "12a456".to_string(),
                };
                let r = registry
                    .change_social_pin(reg::ChangeSocialPinRequest {
                        idempotency_key: key(),
                        card_id: icbc_card.clone(),
                        actor: actor(reg::Channel::Hotline12333SelfService),
                        old_pin: "123456".into(),
                        new_pin: pin.clone(),
                    })
                    .await;
                refused("ChangeSocialPin", r.map(|_| ()), &Expected { code: Code::InvalidArgument, secrets: vec![] })
            }
            5 => {
                let number = broken_card_number(&mut rng);
                let r = icbc
                    .activate_financial(bank::ActivateFinancialRequest {
                        idempotency_key: key(),
                        card_number: number.clone(),
                        teller_id: "teller-1".into(),
                        branch_id: "branch-1".into(),
                        face_verification_ref: "face-1".into(),
                        bank_pin_changed: true,
                    })
                    .await;
                refused(
                    "ActivateFinancial(number)",
                    r.map(|_| ()),
                    &Expected { code: Code::InvalidArgument, secrets: vec![] },
                )
            }
            6 => {
                // Another bank's card at icbc's adapter.
                let r = icbc
                    .activate_financial(bank::ActivateFinancialRequest {
                        idempotency_key: key(),
                        card_number: ccb_number.clone(),
                        teller_id: "teller-1".into(),
                        branch_id: "branch-1".into(),
                        face_verification_ref: "face-1".into(),
                        bank_pin_changed: true,
                    })
                    .await;
                refused(
                    "ActivateFinancial(other bank)",
                    r.map(|_| ()),
                    &Expected { code: Code::PermissionDenied, secrets: vec![] },
                )
            }
            7 => {
                // Teller fields: empty, oversize, control characters; or a key that is too long.
                let (teller, key_) = match rng.random_range(0..4) {
                    0 => (String::new(), key()),
                    1 => (oversize(&mut rng), key()),
                    2 => ("t\u{001b}[2J".to_string(), key()),
                    _ => ("teller-1".to_string(), "k".repeat(rng.random_range(65..500))),
                };
                let r = icbc
                    .activate_financial(bank::ActivateFinancialRequest {
                        idempotency_key: key_,
                        card_number: icbc_number.clone(),
                        teller_id: teller,
                        branch_id: "branch-1".into(),
                        face_verification_ref: "face-1".into(),
                        bank_pin_changed: true,
                    })
                    .await;
                refused(
                    "ActivateFinancial(fields)",
                    r.map(|_| ()),
                    &Expected { code: Code::InvalidArgument, secrets: vec![] },
                )
            }
            8 => {
                let mut r = report(&icbc_card, reg::LossKind::Written, reg::Channel::BureauWindow);
                match rng.random_range(0..4) {
                    0 => r.loss_kind = rng.random_range(4..1000),
                    1 => r.actor = actor(reg::Channel::Online),
                    2 => r.idempotency_key = "\u{00e9}".repeat(rng.random_range(1..50)),
                    _ => {
                        r.card_id = String::new();
                        r.card_number = broken_card_number(&mut rng);
                    }
                }
                let res = lc.report_loss(r).await;
                refused(
                    "Coordinator.ReportLoss",
                    res.map(|_| ()),
                    &Expected { code: Code::InvalidArgument, secrets: vec![] },
                )
            }
            _ => {
                let results = (0..rng.random_range(1..4))
                    .map(|_| bank::AccountOpeningResult {
                        card_id: icbc_card.clone(),
                        result: Some(bank::account_opening_result::Result::AccountNumber(
                            match rng.random_range(0..3) {
                                0 => "6212２6000000000001".to_string(),
                                1 => "1".repeat(rng.random_range(20..400)),
                                _ => "abc".to_string(),
                            },
                        )),
                    })
                    .collect();
                let res = icbc
                    .confirm_account_opening(bank::ConfirmAccountOpeningRequest {
                        idempotency_key: key(),
                        batch_id: "b-1".into(),
                        results,
                    })
                    .await;
                refused(
                    "ConfirmAccountOpening",
                    res.map(|_| ()),
                    &Expected { code: Code::InvalidArgument, secrets: vec![] },
                )
            }
        };
        *by_code.entry(format!("{code:?}")).or_default() += 1;
    }

    assert_eq!(by_code.values().sum::<usize>(), CORPUS);
    assert_eq!(city.registry_store.counts().await.unwrap(), registry_before, "no registry row written");
    assert_eq!(
        city.bank_events("icbc", &icbc_card, "socialcard.financial.v1.FinancialActivated").await,
        bank_events_before,
        "no adapter row written"
    );
    let cases = lc.clone().list_cases(loss::ListCasesRequest::default()).await.unwrap().into_inner().cases;
    assert!(cases.is_empty(), "no loss case opened");
    eprintln!("{CORPUS} invalid requests refused: {by_code:?}");
}
