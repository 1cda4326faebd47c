//! Per-bank rate limits: a bank core that floods its adapter beyond its policy's rate and burst is
//! refused at once with RESOURCE_EXHAUSTED (nothing done, nothing written), while another bank's calls go
//! through untouched.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use socialcard_bank_adapter::BankAdapter;
use socialcard_domain::BankDirectory;
use socialcard_proto::bank::v1 as bank;
use socialcard_proto::bank::v1::bank_card_service_client::BankCardServiceClient;
use socialcard_proto::registry::v1::registry_service_client::RegistryServiceClient;
use socialcard_registry::RegistryConfig;
use socialcard_server::SystemClock;
use socialcard_server::error::reason_of;
use tokio::net::TcpListener;
use tonic::Code;
use tonic::transport::Channel;

async fn listen() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = format!("http://{}", l.local_addr().unwrap());
    (l, a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_banks_flood_is_refused_while_another_bank_is_served() {
    let dir = std::env::temp_dir().join(format!("socialcard-limits-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.join("registry.db").display());
    let built = socialcard_registry::build(&url, Arc::new(SystemClock), RegistryConfig::shanghai(b"k".repeat(32)))
        .await
        .unwrap();
    let (l, registry_addr) = listen().await;
    let routes =
        tonic::service::Routes::new(socialcard_registry::grpc::RegistryGrpc::new(built.registry).into_server());
    tokio::spawn(socialcard_server::grpc::serve(l, routes, &[], std::future::pending()));
    let mut registry = RegistryServiceClient::connect(registry_addr.clone()).await.unwrap();

    let mut clients = Vec::new();
    for (code, rate) in [("icbc", 5), ("ccb", 2_000)] {
        let mut b = BankDirectory::shanghai().get(code).unwrap().clone();
        b.policy.requests_per_second = rate;
        b.policy.burst = rate;
        let channel = Channel::from_shared(registry_addr.clone()).unwrap().connect_lazy();
        let adapter = BankAdapter::open(b, &dir.join(format!("bank-{code}.db")), channel).await.unwrap();
        let (l, addr) = listen().await;
        tokio::spawn(socialcard_server::grpc::serve(
            l,
            tonic::service::Routes::new(adapter.into_server()),
            &[],
            std::future::pending(),
        ));
        clients.push(BankCardServiceClient::connect(addr).await.unwrap());
    }
    let icbc_card = socialcard_registry::fixtures::collected_card(&mut registry, 1, "icbc", "621226").await.unwrap();
    let ccb_bin = BankDirectory::shanghai().get("ccb").unwrap().bin_prefixes[0].clone();
    let ccb_card = socialcard_registry::fixtures::collected_card(&mut registry, 2, "ccb", &ccb_bin).await.unwrap();

    // icbc's core floods its adapter with 60 calls at once: 5 pass, the rest are refused at the door.
    let flood: Vec<_> = (0..60)
        .map(|_| {
            let mut c = clients[0].clone();
            let number = icbc_card.card_number.clone();
            tokio::spawn(async move { c.query_card(bank::QueryCardRequest { card_number: number }).await })
        })
        .collect();
    // Meanwhile ccb activates a card: served as usual.
    let activated = clients[1]
        .clone()
        .activate_financial(bank::ActivateFinancialRequest {
            idempotency_key: uuid::Uuid::now_v7().to_string(),
            card_number: ccb_card.card_number.clone(),
            teller_id: "teller-1".into(),
            branch_id: "branch-1".into(),
            face_verification_ref: "face-1".into(),
            bank_pin_changed: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(activated.social_state, socialcard_proto::registry::v1::SocialState::Active as i32);
    let mut refused = 0;
    for call in flood {
        match call.await.unwrap() {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted);
                assert_eq!(reason_of(&e).as_deref(), Some("RATE_LIMITED"));
                refused += 1;
            }
        }
    }
    assert!(refused >= 50, "at most the burst (5) and a token or two pass: {refused} refused");

    // Refused activations write nothing: the card is active only if one of them got through.
    let mut icbc = clients[0].clone();
    let mut passed = 0;
    for _ in 0..20 {
        let r = icbc
            .activate_financial(bank::ActivateFinancialRequest {
                idempotency_key: uuid::Uuid::now_v7().to_string(),
                card_number: icbc_card.card_number.clone(),
                teller_id: "teller-1".into(),
                branch_id: "branch-1".into(),
                face_verification_ref: "face-1".into(),
                bank_pin_changed: true,
            })
            .await;
        match r {
            Ok(_) => passed += 1,
            Err(e) if e.code() == Code::ResourceExhausted => {}
            // Once one got through, the next ones find the function active.
            Err(e) => assert_eq!(reason_of(&e).as_deref(), Some("FINANCIAL_ALREADY_ACTIVE"), "{e:?}"),
        }
    }
    let card = registry
        .get_card(socialcard_proto::registry::v1::GetCardRequest {
            lookup: Some(socialcard_proto::registry::v1::get_card_request::Lookup::CardId(icbc_card.card_id)),
        })
        .await
        .unwrap()
        .into_inner()
        .card
        .unwrap();
    let active = card.financial_state == socialcard_proto::registry::v1::FinancialState::Active as i32;
    assert_eq!(active, passed == 1, "{passed} activations got through");
    let _ = std::fs::remove_dir_all(&dir);
}
