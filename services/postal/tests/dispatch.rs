//! Postal end to end against a real registry (SQLite, served over gRPC on an ephemeral port): a card
//! produced at the registry opens a shipment through the card events; courier statuses arrive through
//! the signed webhook and the gRPC stream; the registry learns dispatch, failed delivery, the backup
//! point and collection through postal's shipment events (R14-R17). Both event logs are the services'
//! own SQLite outboxes, read by the embedded consumers, polled here step by step.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use socialcard_events::embedded::EmbeddedConsumer;
use socialcard_events::topics;
use socialcard_postal::feed::{self, Waybill};
use socialcard_postal::storage::TableCounts;
use socialcard_postal::{Postal, PostalConfig};
use socialcard_proto::postal::v1 as pb;
use socialcard_proto::postal::v1::postal_service_client::PostalServiceClient;
use socialcard_proto::registry::v1 as reg;
use socialcard_proto::registry::v1::registry_service_client::RegistryServiceClient;
use socialcard_registry::RegistryConfig;
use socialcard_registry::fixtures::adult_citizen_id;
use socialcard_server::ManualClock;
use socialcard_server::error::reason_of;
use time::OffsetDateTime;
use time::macros::datetime;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tonic::Code;
use tonic::transport::Channel;

const SECRET: &[u8] = b"courier-webhook-secret";
/// Monday 10:00 in Shanghai: applications and production happen now.
const T0: OffsetDateTime = datetime!(2026-11-23 02:00 UTC);

struct Dir(std::path::PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct World {
    registry: RegistryServiceClient<Channel>,
    postal: Postal,
    client: PostalServiceClient<Channel>,
    webhook: std::net::SocketAddr,
    /// Card events (registry outbox) -> postal.
    to_postal: EmbeddedConsumer,
    /// Shipment events (postal outbox) -> registry.
    to_registry: EmbeddedConsumer,
    registry_clock: ManualClock,
    postal_clock: ManualClock,
    next_person: u64,
    _dir: Dir,
}

async fn listen() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = format!("http://{}", l.local_addr().unwrap());
    (l, a)
}

fn key() -> String {
    uuid::Uuid::now_v7().to_string()
}

fn actor(channel: reg::Channel) -> Option<reg::Actor> {
    Some(reg::Actor {
        channel: channel as i32,
        operator_id: "clerk-1".into(),
        site_id: "site-1".into(),
        ..Default::default()
    })
}

async fn world() -> World {
    let dir = Dir(std::env::temp_dir().join(format!("socialcard-postal-{}", uuid::Uuid::new_v4().simple())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let registry_clock = ManualClock::new(T0);
    let url = format!("sqlite://{}?mode=rwc", dir.0.join("registry.db").display());
    let built =
        socialcard_registry::build(&url, Arc::new(registry_clock.clone()), RegistryConfig::shanghai(b"k".repeat(32)))
            .await
            .unwrap();
    let (l, registry_addr) = listen().await;
    let routes =
        tonic::service::Routes::new(socialcard_registry::grpc::RegistryGrpc::new(built.registry.clone()).into_server());
    tokio::spawn(socialcard_server::grpc::serve(
        l,
        routes,
        &[socialcard_registry::SERVICE_NAME],
        std::future::pending(),
    ));
    let registry = RegistryServiceClient::connect(registry_addr).await.unwrap();

    let postal_clock = ManualClock::new(T0);
    let postal = socialcard_postal::open(
        &dir.0.join("postal.db"),
        Arc::new(postal_clock.clone()),
        PostalConfig::new(SECRET.to_vec()),
    )
    .await
    .unwrap();
    let (l, postal_addr) = listen().await;
    let routes = tonic::service::Routes::new(socialcard_postal::grpc::PostalGrpc::new(postal.clone()).into_server());
    tokio::spawn(socialcard_server::grpc::serve(l, routes, &[socialcard_postal::SERVICE_NAME], std::future::pending()));
    let client = PostalServiceClient::connect(postal_addr).await.unwrap();
    let wl = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let webhook = wl.local_addr().unwrap();
    tokio::spawn(socialcard_postal::webhook::serve(wl, postal.clone(), std::future::pending()));

    let to_postal = EmbeddedConsumer::new(
        socialcard_postal::CONSUMER_GROUP,
        topics::CARD,
        built.outbox.clone(),
        postal.store().offsets(),
        Arc::new(socialcard_postal::events::CardEvents::new(postal.clone())),
    );
    let to_registry = EmbeddedConsumer::new(
        "registry.postal",
        topics::SHIPMENT,
        postal.store().outbox(),
        built.offsets.clone().unwrap(),
        Arc::new(socialcard_registry::shipment_events::ShipmentEvents::new(built.registry.clone())),
    );
    World {
        registry,
        postal,
        client,
        webhook,
        to_postal,
        to_registry,
        registry_clock,
        postal_clock,
        next_person: 1,
        _dir: dir,
    }
}

/// Runs a consumer until it has caught up with its log.
async fn drain(c: &EmbeddedConsumer) {
    while c.poll_once().await.unwrap() > 0 {}
}

impl World {
    /// A card taken through the registry's public API from application to produced, with a delivery
    /// address and backup point `point`; postal has taken its CardProduced. Returns the card id.
    async fn produced_card(&mut self, point: &str) -> String {
        self.produced(point, Some(home())).await
    }

    /// The same, with `delivery` as the application's delivery address (none: handed over at a counter).
    async fn produced(&mut self, point: &str, delivery: Option<reg::Address>) -> String {
        let n = self.next_person;
        self.next_person += 1;
        let id = adult_citizen_id(n);
        let c = &mut self.registry;
        c.register_person(reg::RegisterPersonRequest {
            idempotency_key: key(),
            citizen_id: id.clone(),
            name: "Li Hua".into(),
            phone: "13800000000".into(),
        })
        .await
        .unwrap();
        let card = c
            .submit_application(reg::SubmitApplicationRequest {
                idempotency_key: key(),
                citizen_id: id,
                actor: actor(reg::Channel::CommunityPoint),
                documents: Some(reg::Documents {
                    presenter: reg::Presenter::Holder as i32,
                    holder_id_card: true,
                    card_presented: true,
                    ..Default::default()
                }),
                card_type: reg::CardType::Adult as i32,
                holder_status: reg::HolderStatus::Unemployed as i32,
                bank_code: "icbc".into(),
                photo: Some(reg::Photo { source: reg::PhotoSource::CommunityPoint as i32, ..Default::default() }),
                backup_point_id: point.into(),
                delivery_address: delivery,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .card
            .unwrap();
        let card_id = card.card_id;
        c.review_application(reg::ReviewApplicationRequest {
            idempotency_key: key(),
            card_id: card_id.clone(),
            actor: actor(reg::Channel::BureauWindow),
            decision: reg::ReviewDecision::Approve as i32,
            reason: String::new(),
        })
        .await
        .unwrap();
        c.start_production(reg::StartProductionRequest {
            idempotency_key: key(),
            card_id: card_id.clone(),
            actor: actor(reg::Channel::Production),
            batch_id: "batch-1".into(),
        })
        .await
        .unwrap();
        let body = format!("621226{n:012}");
        c.record_production_result(reg::RecordProductionResultRequest {
            idempotency_key: key(),
            card_id: card_id.clone(),
            actor: actor(reg::Channel::Production),
            result: Some(reg::record_production_result_request::Result::AccountNumber(format!(
                "{body}{}",
                socialcard_domain::numbers::luhn_check_digit(&body)
            ))),
        })
        .await
        .unwrap();
        drain(&self.to_postal).await;
        card_id
    }

    async fn shipment_of(&mut self, card_id: &str) -> pb::Shipment {
        self.client
            .get_shipment(pb::GetShipmentRequest {
                lookup: Some(pb::get_shipment_request::Lookup::CardId(card_id.into())),
            })
            .await
            .unwrap()
            .into_inner()
            .shipment
            .unwrap()
    }

    async fn card(&mut self, card_id: &str) -> reg::Card {
        self.registry
            .get_card(reg::GetCardRequest { lookup: Some(reg::get_card_request::Lookup::CardId(card_id.into())) })
            .await
            .unwrap()
            .into_inner()
            .card
            .unwrap()
    }

    async fn counts(&self) -> TableCounts {
        self.postal.store().counts().await.unwrap()
    }

    /// Moves both services' clocks to `t`.
    fn set_time(&self, t: OffsetDateTime) {
        self.registry_clock.set(t);
        self.postal_clock.set(t);
    }

    /// Posts `body` to the webhook with `headers`; returns the status code and the JSON answer.
    async fn post(&self, headers: &[(&str, String)], body: &[u8]) -> (u16, serde_json::Value) {
        let mut s = tokio::net::TcpStream::connect(self.webhook).await.unwrap();
        let mut head = format!("POST {} HTTP/1.1\r\nHost: postal\r\n", socialcard_postal::webhook::PATH);
        for (n, v) in headers {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        head.push_str("\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        // The server may refuse from the head alone (413, 401) and close before reading the body.
        let _ = s.write_all(body).await;
        let _ = s.shutdown().await;
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer).await;
        let text = String::from_utf8(answer).unwrap();
        let code = text[9..12].parse().unwrap();
        let json = text.split("\r\n\r\n").nth(1).unwrap();
        (code, serde_json::from_str(json).unwrap())
    }

    /// Posts `body` signed now with the courier's secret.
    async fn post_signed(&self, body: &str) -> (u16, serde_json::Value) {
        let ts = self.postal.now().unix_timestamp();
        let headers = [
            ("Content-Length", body.len().to_string()),
            ("X-Courier-Timestamp", ts.to_string()),
            ("X-Courier-Signature", feed::sign(SECRET, ts, body.as_bytes())),
        ];
        self.post(&headers, body.as_bytes()).await
    }
}

fn home() -> reg::Address {
    reg::Address {
        recipient: "Li Hua".into(),
        phone: "13800000000".into(),
        line: "100 Tianyaoqiao Road".into(),
        district: "Xuhui".into(),
        postal_code: "200030".into(),
    }
}

fn event(id: &str, waybill: &str, status: &str, at: OffsetDateTime) -> String {
    serde_json::json!({
        "event_id": id,
        "waybill": waybill,
        "status": status,
        "occurred_at": at.format(&time::format_description::well_known::Rfc3339).unwrap(),
    })
    .to_string()
}

fn update(id: &str, waybill: &str, status: pb::ShipmentStatus, at: OffsetDateTime, point: &str) -> pb::StatusUpdate {
    pb::StatusUpdate {
        waybill: waybill.into(),
        status: status as i32,
        sub_reason: String::new(),
        occurred_at: Some(prost_types::Timestamp { seconds: at.unix_timestamp(), nanos: 0 }),
        courier_event_id: id.into(),
        point_id: point.into(),
    }
}

/// The physical state in an audit entry's `physical=.. social=.. financial=..` label.
fn physical(label: &str) -> &str {
    label.split_whitespace().next().unwrap_or_default().trim_start_matches("physical=")
}

fn seconds(t: &Option<prost_types::Timestamp>) -> i64 {
    t.as_ref().unwrap().seconds
}

#[tokio::test]
async fn delivered_through_the_webhook_the_registry_shows_the_card_collected_with_its_date() {
    let mut w = world().await;
    let card_id = w.produced_card("point-xuhui-7").await;

    // The shipment opened from CardProduced, with the application's address and backup point.
    let s = w.shipment_of(&card_id).await;
    assert_eq!(s.status(), pb::ShipmentStatus::Pending);
    assert_eq!(s.backup_point_id, "point-xuhui-7");
    assert_eq!(s.address.as_ref().unwrap().postal_code, "200030");
    Waybill::parse("waybill", &s.waybill).unwrap();
    // A redelivered CardProduced opens nothing more.
    w.to_postal.offsets.commit(&w.to_postal.group, topics::CARD, 0).await.unwrap();
    drain(&w.to_postal).await;
    assert_eq!(w.counts().await.shipments, 1);

    let wb = s.waybill.clone();
    let accepted = T0 + time::Duration::hours(1);
    let out = accepted + time::Duration::hours(2);
    let delivered = out + time::Duration::minutes(40);
    w.set_time(delivered + time::Duration::minutes(5));
    let (code, r) = w.post_signed(&event("ems-1", &wb, "ACCEPTED", accepted)).await;
    assert_eq!((code, r["applied"].as_u64()), (200, Some(1)), "{r}");
    let (code, r) = w
        .post_signed(&format!(
            r#"{{"events":[{},{}]}}"#,
            event("ems-2", &wb, "WITH_COURIER", out),
            event("ems-3", &wb, "SIGNED_BY_HOLDER", delivered)
        ))
        .await;
    assert_eq!((code, r["applied"].as_u64()), (200, Some(2)), "{r}");
    // A repeat of ems-2 is ignored; a hub scan older than the delivery is kept but moves nothing.
    let late = accepted + time::Duration::minutes(30);
    let (code, r) = w
        .post_signed(&format!(
            r#"{{"events":[{},{}]}}"#,
            event("ems-2", &wb, "WITH_COURIER", out),
            event("ems-0", &wb, "ARRIVED_AT_HUB", late)
        ))
        .await;
    assert_eq!(code, 200);
    assert_eq!(
        (r["applied"].as_u64(), r["duplicates"].as_u64(), r["out_of_order"].as_u64()),
        (Some(1), Some(1), Some(1))
    );

    let s = w.shipment_of(&card_id).await;
    assert_eq!(s.status(), pb::ShipmentStatus::Delivered);
    assert_eq!(s.sub_reason, "signed_by_holder");
    assert!(!s.routed_to_backup_point);
    let timeline: Vec<_> =
        s.timeline.iter().map(|e| (e.update.as_ref().unwrap().courier_event_id.clone(), e.outcome())).collect();
    assert_eq!(timeline.len(), 5, "{timeline:?}");
    assert_eq!(timeline[2], ("ems-0".to_string(), pb::UpdateOutcome::OutOfOrder), "in the order things happened");
    assert_eq!(timeline[4], ("ems-3".to_string(), pb::UpdateOutcome::Applied));

    // The registry applies dispatch and delivery: collected on the courier's date (R17).
    drain(&w.to_registry).await;
    let card = w.card(&card_id).await;
    assert_eq!(card.physical_state(), reg::PhysicalState::Collected);
    assert_eq!(seconds(&card.collected_at), delivered.unix_timestamp());
    let trail = w
        .registry
        .list_audit_trail(reg::ListAuditTrailRequest { card_id: card_id.clone() })
        .await
        .unwrap()
        .into_inner();
    let states: Vec<_> = trail.entries.iter().map(|e| physical(&e.to_state)).collect();
    assert!(states.ends_with(&["dispatched", "collected"]), "{states:?}");

    // Redelivered shipment events change nothing at the registry (idempotency keys from event ids).
    let version = card.version;
    w.to_registry.offsets.commit(&w.to_registry.group, topics::SHIPMENT, 0).await.unwrap();
    drain(&w.to_registry).await;
    assert_eq!(w.card(&card_id).await.version, version);
    assert_eq!(w.to_registry.offsets.dead_letter_count(&w.to_registry.group).await.unwrap(), 0);
}

#[tokio::test]
async fn a_failed_delivery_goes_to_the_backup_point_and_ends_with_the_pick_up() {
    let mut w = world().await;
    let card_id = w.produced_card("point-minhang-3").await;
    let wb = w.shipment_of(&card_id).await.waybill;
    let t = T0 + time::Duration::hours(1);
    let at = |m: i64| t + time::Duration::minutes(m);
    w.set_time(at(600));

    let stranger = Waybill::issue(99_999_999).to_string();
    let updates = vec![
        update("s-1", &wb, pb::ShipmentStatus::InTransit, at(0), ""),
        update("s-2", &wb, pb::ShipmentStatus::OutForDelivery, at(60), ""),
        pb::StatusUpdate {
            sub_reason: "recipient_absent".into(),
            ..update("s-3", &wb, pb::ShipmentStatus::AttemptFailed, at(90), "")
        },
        // The feed repeats itself and sends a stray update for a waybill postal never issued.
        update("s-3", &wb, pb::ShipmentStatus::AttemptFailed, at(90), ""),
        update("s-x", &stranger, pb::ShipmentStatus::Delivered, at(95), ""),
        update("s-4", &wb, pb::ShipmentStatus::AvailableForPickup, at(240), "point-minhang-3"),
        // A delivery at the address after the card went to the backup point contradicts R15: kept, not applied.
        update("s-5", &wb, pb::ShipmentStatus::Delivered, at(250), ""),
        update("s-6", &wb, pb::ShipmentStatus::PickedUp, at(480), "point-minhang-3"),
    ];
    let r = w.client.stream_status_updates(tokio_stream::iter(updates)).await.unwrap().into_inner();
    assert_eq!((r.applied, r.duplicates, r.unknown_waybills, r.out_of_order), (6, 1, 1, 0));

    let s = w.shipment_of(&card_id).await;
    assert_eq!(s.status(), pb::ShipmentStatus::PickedUp);
    assert!(s.routed_to_backup_point);
    let conflict = s.timeline.iter().find(|e| e.update.as_ref().unwrap().courier_event_id == "s-5").unwrap();
    assert_eq!(conflict.outcome(), pb::UpdateOutcome::Conflict);

    // The stray update is kept aside and reported.
    let unknown = w
        .client
        .list_unknown_waybill_updates(pb::ListUnknownWaybillUpdatesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unknown.total, 1);
    assert_eq!(unknown.updates[0].update.as_ref().unwrap().waybill, stranger);

    // The registry: dispatched, delivery failed, at the backup point, collected on the pick-up date.
    drain(&w.to_registry).await;
    let card = w.card(&card_id).await;
    assert_eq!(card.physical_state(), reg::PhysicalState::Collected);
    assert_eq!(seconds(&card.collected_at), at(480).unix_timestamp());
    let trail = w.registry.list_audit_trail(reg::ListAuditTrailRequest { card_id }).await.unwrap().into_inner();
    let states: Vec<_> = trail.entries.iter().map(|e| physical(&e.to_state)).collect();
    assert!(states.ends_with(&["dispatched", "delivery_failed", "at_backup_point", "collected"]), "{states:?}");
    let pick_up = trail.entries.last().unwrap().actor.as_ref().unwrap();
    assert_eq!((pick_up.channel(), pick_up.site_id.as_str()), (reg::Channel::CommunityPoint, "point-minhang-3"));
    assert_eq!(w.to_registry.offsets.dead_letter_count(&w.to_registry.group).await.unwrap(), 0);
}

#[tokio::test]
async fn bad_feed_input_is_refused_with_a_clear_error_and_writes_nothing() {
    let mut w = world().await;
    let card_id = w.produced_card("point-1").await;
    let wb = w.shipment_of(&card_id).await.waybill;
    let t = T0 + time::Duration::hours(1);
    w.set_time(t + time::Duration::hours(1));
    let before = w.counts().await;
    let good = event("e-1", &wb, "ACCEPTED", t);
    let now = w.postal.now().unix_timestamp();

    // Unsigned.
    let (code, r) = w.post(&[("Content-Length", good.len().to_string())], good.as_bytes()).await;
    assert_eq!((code, r["error"].as_str()), (401, Some("SIGNATURE_MISSING")));
    // Signed with another key.
    let forged = [
        ("Content-Length", good.len().to_string()),
        ("X-Courier-Timestamp", now.to_string()),
        ("X-Courier-Signature", feed::sign(b"not-the-secret", now, good.as_bytes())),
    ];
    let (code, r) = w.post(&forged, good.as_bytes()).await;
    assert_eq!((code, r["error"].as_str()), (401, Some("SIGNATURE_MISMATCH")));
    // Correctly signed, but the body was changed on the way.
    let tampered = good.replace("ACCEPTED", "DELIVERED");
    let sig = [
        ("Content-Length", tampered.len().to_string()),
        ("X-Courier-Timestamp", now.to_string()),
        ("X-Courier-Signature", feed::sign(SECRET, now, good.as_bytes())),
    ];
    let (code, r) = w.post(&sig, tampered.as_bytes()).await;
    assert_eq!((code, r["error"].as_str()), (401, Some("SIGNATURE_MISMATCH")));
    // Signed ten minutes ago: a replay.
    let old = now - 600;
    let stale = [
        ("Content-Length", good.len().to_string()),
        ("X-Courier-Timestamp", old.to_string()),
        ("X-Courier-Signature", feed::sign(SECRET, old, good.as_bytes())),
    ];
    let (code, r) = w.post(&stale, good.as_bytes()).await;
    assert_eq!((code, r["error"].as_str()), (401, Some("SIGNATURE_STALE")));
    // Signed, but the status code is unknown, or the JSON broken, or one event of a batch is bad.
    let (code, r) = w.post_signed(&event("e-1", &wb, "TELEPORTED", t)).await;
    assert_eq!((code, r["error"].as_str()), (400, Some("UNKNOWN_STATUS")));
    let (code, r) = w.post_signed(r#"{"event_id":"e-1","waybill":"#).await;
    assert_eq!((code, r["error"].as_str()), (400, Some("MALFORMED_JSON")));
    let (code, r) =
        w.post_signed(&format!(r#"{{"events":[{good},{}]}}"#, event("e-2", "SC000000000XX", "ACCEPTED", t))).await;
    assert_eq!((code, r["error"].as_str()), (400, Some("WAYBILL_CHECK_DIGIT")));
    // Oversized: refused from its Content-Length, before the body is read.
    let big = format!(r#"{{"events":[{}]}}"#, vec![good.as_str(); 1000].join(","));
    assert!(big.len() > feed::MAX_WEBHOOK_BODY);
    let (code, r) = w.post_signed(&big).await;
    assert_eq!((code, r["error"].as_str()), (413, Some("BODY_TOO_LARGE")));
    assert_eq!(w.counts().await, before, "a refused webhook request writes nothing");

    // The stream: an update without a status ends it with INVALID_ARGUMENT; the one before it is taken.
    let updates = vec![
        update("g-1", &wb, pb::ShipmentStatus::InTransit, t, ""),
        update("g-2", &wb, pb::ShipmentStatus::Unspecified, t, ""),
        update("g-3", &wb, pb::ShipmentStatus::Delivered, t, ""),
    ];
    let e = w.client.stream_status_updates(tokio_stream::iter(updates)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(reason_of(&e).as_deref(), Some("UNKNOWN_STATUS"));
    assert_eq!(e.metadata().get("applied-before-error").unwrap(), "1");
    let after = w.counts().await;
    assert_eq!(after.history, before.history + 1);
    assert_eq!(after.unknown_waybill_updates, before.unknown_waybill_updates);
    assert_eq!(w.shipment_of(&card_id).await.status(), pb::ShipmentStatus::InTransit);

    // A future time, a bad lookup: INVALID_ARGUMENT with a reason; an unknown waybill: NOT_FOUND.
    let future = w.postal.now() + time::Duration::hours(2);
    let e = w
        .client
        .stream_status_updates(tokio_stream::iter(vec![update("f-1", &wb, pb::ShipmentStatus::Delivered, future, "")]))
        .await
        .unwrap_err();
    assert_eq!((e.code(), reason_of(&e).as_deref()), (Code::InvalidArgument, Some("OCCURRED_AT_IN_FUTURE")));
    let e = w
        .client
        .get_shipment(pb::GetShipmentRequest { lookup: Some(pb::get_shipment_request::Lookup::Waybill("x".into())) })
        .await
        .unwrap_err();
    assert_eq!((e.code(), reason_of(&e).as_deref()), (Code::InvalidArgument, Some("WAYBILL_FORMAT")));
    let e = w
        .client
        .get_shipment(pb::GetShipmentRequest {
            lookup: Some(pb::get_shipment_request::Lookup::Waybill(Waybill::issue(424_242).to_string())),
        })
        .await
        .unwrap_err();
    assert_eq!((e.code(), reason_of(&e).as_deref()), (Code::NotFound, Some("SHIPMENT_NOT_FOUND")));
    assert_eq!(w.counts().await, after);
}

#[tokio::test]
async fn shipments_by_state_by_point_and_overdue() {
    let mut w = world().await;
    let a = w.produced_card("point-a").await;
    let b = w.produced_card("point-b").await;
    let c = w.produced_card("point-a").await;
    let wa = w.shipment_of(&a).await.waybill;
    let t = T0 + time::Duration::hours(1);
    w.set_time(t + time::Duration::hours(1));
    let r = w
        .client
        .stream_status_updates(tokio_stream::iter(vec![
            update("a-1", &wa, pb::ShipmentStatus::InTransit, t, ""),
            update("a-2", &wa, pb::ShipmentStatus::Delivered, t + time::Duration::minutes(5), ""),
        ]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.applied, 2);

    let list = |status: pb::ShipmentStatus, point: &str, overdue: bool, sla: u32| pb::ListShipmentsRequest {
        status: status as i32,
        point_id: point.into(),
        overdue_only: overdue,
        sla_days: sla,
        ..Default::default()
    };
    let cards = |r: pb::ListShipmentsResponse| r.shipments.into_iter().map(|s| s.card_id).collect::<Vec<_>>();
    let pending = w.client.list_shipments(list(pb::ShipmentStatus::Pending, "", false, 0)).await.unwrap().into_inner();
    assert_eq!(cards(pending), vec![b.clone(), c.clone()]);
    let at_a = w.client.list_shipments(list(pb::ShipmentStatus::Unspecified, "point-a", false, 0)).await.unwrap();
    assert_eq!(cards(at_a.into_inner()), vec![a.clone(), c.clone()]);
    // Nothing is overdue yet; eight days on, the two still open are (SLA 7 days), the delivered one not.
    let none = w.client.list_shipments(list(pb::ShipmentStatus::Unspecified, "", true, 0)).await.unwrap();
    assert!(none.into_inner().shipments.is_empty());
    w.set_time(T0 + time::Duration::days(8));
    let overdue = w.client.list_shipments(list(pb::ShipmentStatus::Unspecified, "", true, 0)).await.unwrap();
    assert_eq!(cards(overdue.into_inner()), vec![b.clone(), c.clone()]);
    // A longer SLA asked for in the query.
    let lenient = w.client.list_shipments(list(pb::ShipmentStatus::Unspecified, "", true, 10)).await.unwrap();
    assert!(lenient.into_inner().shipments.is_empty());
    // Pages.
    let first = w
        .client
        .list_shipments(pb::ListShipmentsRequest { page_size: 2, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.shipments.len(), 2);
    let rest = w
        .client
        .list_shipments(pb::ListShipmentsRequest {
            page_size: 2,
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cards(rest), vec![c]);
}

#[tokio::test]
async fn a_card_collected_at_a_counter_before_dispatch_withdraws_its_shipment() {
    let mut w = world().await;
    let card_id = w.produced_card("point-1").await;
    // Handed over at the point before the courier took it.
    at_counter(&mut w, &card_id, reg::CollectionMethod::PickedUpAtPoint).await;
    drain(&w.to_postal).await;
    let s = w.shipment_of(&card_id).await;
    assert_eq!((s.status(), s.sub_reason.as_str()), (pb::ShipmentStatus::Withdrawn, "collected_at_counter"));
    // A late courier scan is kept but changes nothing, and the registry hears nothing of it.
    w.set_time(T0 + time::Duration::hours(1));
    let r = w
        .client
        .stream_status_updates(tokio_stream::iter(vec![update(
            "late-1",
            &s.waybill,
            pb::ShipmentStatus::InTransit,
            T0 + time::Duration::minutes(30),
            "",
        )]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.applied, r.out_of_order), (1, 1));
    assert_eq!(w.shipment_of(&card_id).await.status(), pb::ShipmentStatus::Withdrawn);
    drain(&w.to_registry).await;
    assert_eq!(w.to_registry.offsets.dead_letter_count(&w.to_registry.group).await.unwrap(), 0);
}

/// `card_id` handed to its holder at a community point: picked up, or (R16, an instant replacement
/// point) printed and handed over on the spot.
async fn at_counter(w: &mut World, card_id: &str, method: reg::CollectionMethod) {
    w.registry
        .record_collection(reg::RecordCollectionRequest {
            idempotency_key: key(),
            card_id: card_id.into(),
            actor: actor(reg::Channel::CommunityPoint),
            method: method as i32,
            collected_at: None,
            documents: Some(reg::Documents {
                presenter: reg::Presenter::Holder as i32,
                holder_id_card: true,
                ..Default::default()
            }),
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn an_instant_issue_involves_no_courier() {
    let mut w = world().await;
    // Applied for at an instant point without a delivery address: produced, nothing to mail.
    let before = w.counts().await;
    let card_id = w.produced("point-1", None).await;
    assert_eq!(w.counts().await, before, "no shipment, no waybill, no event");
    let missing = w
        .client
        .get_shipment(pb::GetShipmentRequest {
            lookup: Some(pb::get_shipment_request::Lookup::CardId(card_id.clone())),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    at_counter(&mut w, &card_id, reg::CollectionMethod::InstantIssue).await;
    drain(&w.to_postal).await;
    assert_eq!(w.counts().await, before, "the hand-over needs no shipment either");
    assert_eq!(w.to_postal.offsets.dead_letter_count(&w.to_postal.group).await.unwrap(), 0);
    assert_eq!(w.card(&card_id).await.physical_state(), reg::PhysicalState::Collected);

    // A card that had a delivery address but was printed and handed over at the point before the courier
    // took it: its shipment is withdrawn, saying why.
    let mailed = w.produced_card("point-1").await;
    assert_eq!(w.shipment_of(&mailed).await.status(), pb::ShipmentStatus::Pending);
    at_counter(&mut w, &mailed, reg::CollectionMethod::InstantIssue).await;
    drain(&w.to_postal).await;
    let s = w.shipment_of(&mailed).await;
    assert_eq!((s.status(), s.sub_reason.as_str()), (pb::ShipmentStatus::Withdrawn, "instant_issue"));
}

#[tokio::test]
async fn a_courier_clock_behind_never_dates_the_collection_before_the_shipment() {
    let mut w = world().await;
    let card_id = w.produced_card("point-1").await;
    let wb = w.shipment_of(&card_id).await.waybill;
    w.set_time(T0 + time::Duration::hours(1));
    // The courier's clock says the card was delivered before it was even produced.
    let r = w
        .client
        .stream_status_updates(tokio_stream::iter(vec![update(
            "skewed-1",
            &wb,
            pb::ShipmentStatus::Delivered,
            T0 - time::Duration::hours(3),
            "",
        )]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.applied, 1);
    drain(&w.to_registry).await;
    assert_eq!(w.to_registry.offsets.dead_letter_count(&w.to_registry.group).await.unwrap(), 0);
    let card = w.card(&card_id).await;
    assert_eq!(card.physical_state(), reg::PhysicalState::Collected);
    // Dated at the shipment's opening, the earliest it can have happened; the history keeps the courier's time.
    assert_eq!(seconds(&card.collected_at), T0.unix_timestamp());
    let s = w.shipment_of(&card_id).await;
    let entry = s.timeline.iter().find(|e| e.update.as_ref().unwrap().courier_event_id == "skewed-1").unwrap();
    assert_eq!(seconds(&entry.update.as_ref().unwrap().occurred_at), (T0 - time::Duration::hours(3)).unix_timestamp());
}

#[tokio::test]
async fn a_stream_of_many_batches_moves_every_shipment_step_by_step_and_a_replayed_feed_changes_nothing() {
    let w = world().await;
    let t = T0 + time::Duration::hours(1);
    let mut waybills = Vec::new();
    for i in 0..300 {
        let new = socialcard_postal::storage::NewShipment {
            card_id: format!("bulk-card-{i}"),
            card_number: format!("B{i:08}"),
            address: socialcard_postal::storage::Address { line: "1 Road".into(), ..Default::default() },
            backup_point_id: "point-minhang-3".into(),
        };
        waybills.push(w.postal.open_shipment(&format!("bulk-{i}"), &new).await.unwrap().unwrap().waybill);
    }
    w.set_time(t + time::Duration::hours(10));
    // Step after step over every shipment (900 updates): a shipment's three updates fall in different
    // batches, written while the next ones are received; then the whole feed once more.
    let steps = [pb::ShipmentStatus::InTransit, pb::ShipmentStatus::OutForDelivery, pb::ShipmentStatus::Delivered];
    let mut updates = Vec::new();
    for (step, status) in steps.iter().enumerate() {
        for (i, wb) in waybills.iter().enumerate() {
            let at = t + time::Duration::minutes(10 * step as i64);
            updates.push(update(&format!("bulk-{step}-{i}"), wb, *status, at, ""));
        }
    }
    updates.extend(updates.clone());
    let mut client = w.client.clone();
    let r = client.stream_status_updates(tokio_stream::iter(updates)).await.unwrap().into_inner();
    assert_eq!((r.applied, r.duplicates, r.unknown_waybills, r.out_of_order), (900, 900, 0, 0));
    for wb in &waybills {
        let s = client
            .get_shipment(pb::GetShipmentRequest {
                lookup: Some(pb::get_shipment_request::Lookup::Waybill(wb.clone())),
            })
            .await
            .unwrap()
            .into_inner()
            .shipment
            .unwrap();
        assert_eq!(s.status(), pb::ShipmentStatus::Delivered, "{wb}");
        let seen: Vec<_> = s.timeline.iter().map(|e| (e.update.as_ref().unwrap().status(), e.outcome())).collect();
        assert_eq!(
            seen,
            [
                (pb::ShipmentStatus::Pending, pb::UpdateOutcome::Applied),
                (pb::ShipmentStatus::InTransit, pb::UpdateOutcome::Applied),
                (pb::ShipmentStatus::OutForDelivery, pb::UpdateOutcome::Applied),
                (pb::ShipmentStatus::Delivered, pb::UpdateOutcome::Applied),
            ],
            "{wb}"
        );
    }
}

/// A registry card event as the registry's outbox carries it.
fn card_event(card_id: &str, kind: socialcard_proto::events::v1::card_event::Kind) -> socialcard_events::Envelope {
    use prost::Message as _;
    let payload =
        socialcard_proto::events::v1::CardEvent { card_id: card_id.into(), kind: Some(kind), ..Default::default() };
    socialcard_events::Envelope {
        id: uuid::Uuid::now_v7().to_string(),
        event_type: "socialcard.card.v1.Test".into(),
        source: "registry".into(),
        subject: card_id.into(),
        time: T0,
        traceparent: None,
        topic: topics::CARD.into(),
        payload: payload.encode_to_vec(),
    }
}

fn produced(number: &str, delivery: Option<reg::Address>) -> socialcard_proto::events::v1::card_event::Kind {
    socialcard_proto::events::v1::card_event::Kind::CardProduced(socialcard_proto::events::v1::CardProduced {
        card_number: number.into(),
        bank_code: "icbc".into(),
        backup_point_id: "point-7".into(),
        delivery_address: delivery,
    })
}

#[tokio::test]
async fn card_events_that_come_together_are_applied_in_order_in_one_transaction() {
    use socialcard_events::{Applied, Handler};
    use socialcard_postal::status::Status;
    use socialcard_proto::events::v1 as ev;

    let dir = Dir(std::env::temp_dir().join(format!("socialcard-postal-{}", uuid::Uuid::new_v4().simple())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let postal = socialcard_postal::open(
        &dir.0.join("postal.db"),
        Arc::new(ManualClock::new(T0)),
        PostalConfig::new(SECRET.to_vec()),
    )
    .await
    .unwrap();
    let handler = socialcard_postal::events::CardEvents::new(postal.clone());
    assert!(handler.has_batch_form());

    // Card b is produced and picked up at a counter within the batch: opened, then withdrawn.
    let collected = ev::card_event::Kind::CardCollected(ev::CardCollected {
        method: reg::CollectionMethod::PickedUpAtPoint as i32,
        ..Default::default()
    });
    // Events that ask nothing of postal (another card's activation, a card handed over at a counter)
    // among them, first included: each answer stays with its own event.
    let batch = vec![
        card_event("card-z", ev::card_event::Kind::SocialActivated(ev::SocialActivated {})),
        card_event("card-a", produced("A01", Some(home()))),
        card_event("card-b", produced("B01", Some(home()))),
        card_event("card-c", produced("C01", None)),
        card_event("card-b", collected),
        card_event("card-a", ev::card_event::Kind::SocialActivated(ev::SocialActivated {})),
    ];
    let answers = handler.handle_batch(&batch).await.unwrap().unwrap();
    let (new, seen) = (Applied::Applied, Applied::Duplicate);
    assert_eq!(answers, [seen, new, new, seen, new, seen]);
    let (a, _) = postal.shipment(None, Some("card-a")).await.unwrap();
    assert_eq!(a.progress.status, Status::Pending);
    let (b, _) = postal.shipment(None, Some("card-b")).await.unwrap();
    assert_eq!(b.progress.status, Status::Withdrawn, "the withdrawal applied after the opening");
    assert!(postal.shipment(None, Some("card-c")).await.is_err(), "a card handed over at a counter is not mailed");
    let counts = postal.store().counts().await.unwrap();
    assert_eq!(counts.shipments, 2);

    // Redelivered: every event a duplicate, nothing written.
    let again = handler.handle_batch(&batch).await.unwrap().unwrap();
    assert!(again.iter().all(|a| *a == Applied::Duplicate), "{again:?}");
    assert_eq!(postal.store().counts().await.unwrap(), counts);

    // An undecodable event fails its batch whole, before anything is written; the consumer's halving
    // then applies the events around it and leaves it alone to be dead-lettered.
    let mut poisoned =
        vec![card_event("card-d", produced("D01", Some(home()))), card_event("card-x", produced("X", None))];
    poisoned[1].payload = b"\xff not a card event".to_vec();
    poisoned.push(card_event("card-e", produced("E01", Some(home()))));
    assert!(handler.handle_batch(&poisoned).await.unwrap().is_err());
    assert_eq!(postal.store().counts().await.unwrap(), counts, "a failed batch writes nothing");
    let outcomes =
        socialcard_events::handler::handle_events(&handler, &poisoned, 1, std::time::Duration::ZERO, "test").await;
    assert!(matches!(outcomes[0], Ok(Applied::Applied)), "{outcomes:?}");
    assert!(outcomes[1].is_err(), "{outcomes:?}");
    assert!(matches!(outcomes[2], Ok(Applied::Applied)), "{outcomes:?}");
    assert_eq!(postal.store().counts().await.unwrap().shipments, 4);
}
