//! Ops' read models from the four topics, as the embedded log serves them: the figures the bureau sees,
//! a rebuild from scratch that equals the model built incrementally, redelivery that changes nothing, and
//! bad input refused with a reason and nothing written.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use prost::Message;
use socialcard_events::outbox::SqliteOutbox;
use socialcard_events::{Applied, Envelope, HandlerError, Outbox, topics, unix_micros};
use socialcard_ops::feed::Source;
use socialcard_ops::grpc::OpsGrpc;
use socialcard_ops::store::Grouping;
use socialcard_ops::{Ops, OpsConfig};
use socialcard_proto::events::v1 as ev;
use socialcard_proto::events::v1::card_event::Kind;
use socialcard_proto::ops::v1 as pb;
use socialcard_proto::ops::v1::ops_service_server::OpsService;
use socialcard_proto::registry::v1 as reg;
use socialcard_server::ManualClock;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use time::OffsetDateTime;
use time::macros::datetime;
use tonic::Request;
use tonic_types::StatusExt;

struct Dir(std::path::PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp_dir() -> Dir {
    let d = std::env::temp_dir().join(format!("socialcard-ops-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

/// A producing service's outbox (the table every service's migrations create), written as it would be.
#[derive(Clone)]
struct Log {
    pool: sqlx::SqlitePool,
    source: &'static str,
}

impl Log {
    async fn open(dir: &Dir, source: &'static str) -> Log {
        let options = SqliteConnectOptions::new().filename(dir.0.join(format!("{source}.db"))).create_if_missing(true);
        let pool = SqlitePoolOptions::new().max_connections(1).connect_with(options).await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE, topic TEXT NOT NULL,
             event_key TEXT NOT NULL, event_type TEXT NOT NULL, payload BLOB NOT NULL, occurred_at INTEGER NOT NULL,
             bucket INTEGER NOT NULL, source TEXT NOT NULL, traceparent TEXT, published_at INTEGER)",
        )
        .execute(&pool)
        .await
        .unwrap();
        Log { pool, source }
    }

    fn outbox(&self) -> Arc<dyn Outbox> {
        Arc::new(SqliteOutbox::new(self.pool.clone()))
    }

    async fn append(&self, topic: &str, key: &str, event_type: &str, payload: Vec<u8>, at: OffsetDateTime) {
        sqlx::query(
            "INSERT INTO outbox (event_id, topic, event_key, event_type, payload, occurred_at, bucket, source)
             VALUES ($1, $2, $3, $4, $5, $6, 0, $7)",
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(topic)
        .bind(key)
        .bind(event_type)
        .bind(payload)
        .bind(unix_micros(at))
        .bind(self.source)
        .execute(&self.pool)
        .await
        .unwrap();
    }
}

fn ts(t: OffsetDateTime) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds: t.unix_timestamp(), nanos: 0 })
}

/// The four producers of `socialcard up`, each with its outbox.
struct Producers {
    registry: Log,
    bank: Log,
    postal: Log,
    loss: Log,
    versions: std::collections::HashMap<String, i64>,
}

impl Producers {
    async fn open(dir: &Dir) -> Producers {
        Producers {
            registry: Log::open(dir, "registry").await,
            bank: Log::open(dir, "bank-adapter-icbc").await,
            postal: Log::open(dir, "postal").await,
            loss: Log::open(dir, "loss-coordinator").await,
            versions: Default::default(),
        }
    }

    fn sources(&self) -> Vec<Source> {
        vec![
            Source { name: "registry".into(), topic: topics::CARD, log: self.registry.outbox() },
            Source { name: "bank-adapter.icbc".into(), topic: topics::FINANCIAL, log: self.bank.outbox() },
            Source { name: "postal".into(), topic: topics::SHIPMENT, log: self.postal.outbox() },
            Source { name: "loss-coordinator".into(), topic: topics::LOSS, log: self.loss.outbox() },
        ]
    }

    async fn card(&mut self, card: &str, at: OffsetDateTime, kind: Kind) {
        let version = self.versions.entry(card.to_string()).or_insert(0);
        *version += 1;
        let e = ev::CardEvent {
            card_id: card.into(),
            occurred_at: ts(at),
            card_version: *version,
            kind: Some(kind),
            ..Default::default()
        };
        self.registry.append(topics::CARD, card, "socialcard.card.v1.X", e.encode_to_vec(), at).await;
    }

    async fn submitted(&mut self, card: &str, bank: &str, region: &str, at: OffsetDateTime) {
        let kind = Kind::ApplicationSubmitted(ev::ApplicationSubmitted {
            bank_code: bank.into(),
            region_code: region.into(),
            card_type: reg::CardType::Adult as i32,
            ..Default::default()
        });
        self.card(card, at, kind).await;
    }

    /// Approved, in production and produced `hours` after `at`.
    async fn produced(&mut self, card: &str, at: OffsetDateTime, hours: i64) {
        self.card(card, at, Kind::ApplicationApproved(ev::ApplicationApproved {})).await;
        self.card(card, at, Kind::ProductionStarted(ev::ProductionStarted::default())).await;
        self.card(card, at + time::Duration::hours(hours), Kind::CardProduced(ev::CardProduced::default())).await;
    }

    async fn shipment(&self, card: &str, waybill: &str, milestone: ev::ShipmentMilestone, at: OffsetDateTime) {
        let e = ev::ShipmentEvent {
            card_id: card.into(),
            waybill: waybill.into(),
            occurred_at: ts(at),
            milestone: milestone as i32,
            ..Default::default()
        };
        self.postal.append(topics::SHIPMENT, card, "socialcard.shipment.v1.X", e.encode_to_vec(), at).await;
    }

    async fn loss(&self, case: &str, card: &str, state: &str, at: OffsetDateTime) {
        let e = ev::LossEvent {
            case_id: case.into(),
            card_id: card.into(),
            occurred_at: ts(at),
            loss_kind: reg::LossKind::Temporary as i32,
            state: state.into(),
            social_locked: state != "locking",
            financial_frozen: state == "locked",
            bank_code: "icbc".into(),
            ..Default::default()
        };
        self.loss.append(topics::LOSS, card, "socialcard.loss.v1.X", e.encode_to_vec(), at).await;
    }

    async fn bank_activated(&self, card: &str, at: OffsetDateTime) {
        let e = ev::FinancialEvent {
            card_id: card.into(),
            bank_code: "icbc".into(),
            occurred_at: ts(at),
            kind: Some(ev::financial_event::Kind::FinancialActivated(ev::FinancialActivated::default())),
        };
        self.bank.append(topics::FINANCIAL, card, "socialcard.financial.v1.X", e.encode_to_vec(), at).await;
    }
}

const T0: OffsetDateTime = datetime!(2025-03-03 09:00 UTC);

async fn open_ops(dir: &Dir, name: &str, producers: &Producers, clock: ManualClock) -> Ops {
    socialcard_ops::open(&dir.0.join(name), Arc::new(clock), OpsConfig::default())
        .await
        .unwrap()
        .with_embedded_feed(producers.sources(), None)
}

/// A morning at the bureau, written in steps; `between` runs after each step (e.g. ops reading what is there).
async fn scenario<F, Fut>(p: &mut Producers, mut between: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let h = |n: i64| T0 + time::Duration::hours(n);
    // Card a (icbc, Xuhui): produced in 10 h, couriered, delivered, activated at the bank.
    p.submitted("a", "icbc", "310104", h(0)).await;
    p.submitted("b", "icbc", "310115", h(0)).await;
    p.submitted("c", "ccb", "310104", h(1)).await;
    p.submitted("d", "boc", "310115", h(2)).await;
    between().await;
    p.produced("a", h(0), 10).await;
    p.produced("b", h(0), 30).await;
    p.produced("c", h(1), 20).await;
    // The shipment topic may run ahead of the card topic: ops must not care.
    p.shipment("a", "W-a", ev::ShipmentMilestone::Opened, h(10)).await;
    p.shipment("a", "W-a", ev::ShipmentMilestone::Dispatched, h(12)).await;
    p.shipment("b", "W-b", ev::ShipmentMilestone::Opened, h(30)).await;
    // c's shipment is withdrawn when c is collected at the counter: postal says nothing more of it.
    p.shipment("c", "W-c", ev::ShipmentMilestone::Opened, h(21)).await;
    between().await;
    p.shipment("a", "W-a", ev::ShipmentMilestone::Delivered, h(40)).await;
    p.card(
        "a",
        h(12),
        Kind::ShipmentProgressed(ev::ShipmentProgressed {
            progress: reg::ShipmentProgress::Dispatched as i32,
            waybill: "W-a".into(),
        }),
    )
    .await;
    p.card("a", h(40), Kind::CardCollected(ev::CardCollected { collected_at: ts(h(40)), ..Default::default() })).await;
    p.bank_activated("a", h(50)).await;
    p.card(
        "a",
        h(50),
        Kind::FinancialActivationRecorded(ev::FinancialActivationRecorded {
            bank_code: "icbc".into(),
            social_awaits_bureau_unlock: false,
        }),
    )
    .await;
    // Card c: collected at the counter (never met the courier), social activation only, then lost.
    p.card("c", h(25), Kind::CardCollected(ev::CardCollected { collected_at: ts(h(25)), ..Default::default() })).await;
    p.card("c", h(27), Kind::SocialActivated(ev::SocialActivated {})).await;
    between().await;
    p.loss("case-1", "c", "locking", h(60)).await;
    p.card("c", h(60), Kind::SocialLossLocked(ev::SocialLossLocked { loss_kind: reg::LossKind::Temporary as i32 }))
        .await;
    p.loss("case-1", "c", "one_sided", h(60)).await;
    p.loss("case-2", "a", "locking", h(61)).await;
    p.loss("case-2", "a", "expired", h(70)).await;
    // Card b: unlocked on one side, the other still to follow (open, not one-sided).
    p.loss("case-3", "b", "unlocking", h(62)).await;
    // Card d rejected; an event the domain refuses (collect a card never produced) is kept aside, not folded.
    p.card("d", h(3), Kind::ApplicationRejected(ev::ApplicationRejected { reason: "photo".into() })).await;
    p.card("d", h(4), Kind::CardCollected(ev::CardCollected::default())).await;
    // An undecodable payload: dead-lettered by ops' consumer.
    p.registry.append(topics::CARD, "x", "socialcard.card.v1.Broken", vec![0xff, 0xff, 0xff], h(80)).await;
    between().await;
}

async fn snapshot(ops: &Ops) -> Vec<String> {
    ops.store().dump().await.unwrap()
}

#[tokio::test]
async fn read_models_show_the_bureaus_morning_and_rebuild_to_the_same() {
    let dir = temp_dir();
    let mut producers = Producers::open(&dir).await;
    let clock = ManualClock::new(T0 + time::Duration::hours(100));
    let incremental = open_ops(&dir, "ops-a.db", &producers, clock.clone()).await;
    let feed = incremental.feed().unwrap();
    // Read after every step, one batch at a time, so the topics interleave.
    scenario(&mut producers, || {
        let feed = feed.clone();
        async move {
            feed.poll_once().await.unwrap();
        }
    })
    .await;
    feed.catch_up().await.unwrap();
    let before = snapshot(&incremental).await;

    // What the bureau sees.
    let counts = incremental.card_counts(Grouping::Bank, "icbc").await.unwrap();
    let icbc: Vec<_> =
        counts.iter().map(|c| (c.physical.as_str(), c.social.as_str(), c.financial.as_str(), c.count)).collect();
    assert_eq!(
        icbc,
        [("collected", "active", "active", 1), ("produced", "not_activated", "not_activated", 1)],
        "{counts:?}"
    );
    let ccb = incremental.card_counts(Grouping::Bank, "ccb").await.unwrap();
    assert_eq!((ccb[0].social.as_str(), ccb[0].count), ("loss_locked", 1));
    let districts = incremental.card_counts(Grouping::District, "").await.unwrap();
    let xuhui: u64 = districts.iter().filter(|c| c.group == "310104").map(|c| c.count).sum();
    assert_eq!(xuhui, 2);

    let funnel = incremental.funnel(&Default::default()).await.unwrap();
    let counts: Vec<u64> = funnel.iter().map(|s| s.count).collect();
    // c was collected at the counter, never couriered: past delivery all the same.
    assert_eq!(counts, [4, 3, 2, 2, 2], "{funnel:?}");
    let hours = |s: &socialcard_ops::app::FunnelStep| s.median_micros.map(|m| m / 3_600_000_000);
    assert_eq!(hours(&funnel[1]), Some(20), "production medians 10, 20, 30 h");
    assert_eq!((hours(&funnel[2]), funnel[2].timed), (Some(2), 1), "only a met the courier, 2 h after production");
    assert_eq!(hours(&funnel[3]), Some(28), "a: 40 - 12");
    assert_eq!((hours(&funnel[4]), funnel[4].timed), (Some(2), 2), "a 10 h, c 2 h: the lower median");

    let loss = incremental.loss_summary("").await.unwrap();
    assert_eq!((loss.open, loss.one_sided, loss.expired), (2, 1, 1));
    // The dashboard names the one-sided card, which side holds and since when.
    let listed: Vec<_> = loss
        .one_sided_cases
        .iter()
        .map(|c| (c.case_id.as_str(), c.card_id.as_str(), c.social_locked, c.financial_frozen, c.opened_at))
        .collect();
    assert_eq!(listed, [("case-1", "c", true, false, T0 + time::Duration::hours(60))]);
    // b's shipment has been open 70 h: overdue only once the clock passes 7 days.
    assert_eq!(incremental.overdue_shipments(0, 10).await.unwrap().0, 0);
    let (total, overdue) = incremental.overdue_shipments(2, 10).await.unwrap();
    assert_eq!((total, overdue[0].waybill.as_str()), (1, "W-b"), "c's withdrawn shipment is not overdue");
    clock.advance(time::Duration::days(6));
    assert_eq!(incremental.overdue_shipments(0, 10).await.unwrap().0, 1);
    let dead = incremental.dead_letters().await.unwrap();
    assert_eq!(dead, [("ops.registry".to_string(), 1)]);
    assert!(before.iter().any(|l| l.starts_with("inconsistencies:")), "the refused event is kept aside: {before:?}");

    // Rebuild: dropped and replayed, the same model.
    let replayed = incremental.rebuild("rebuild-1").await.unwrap();
    assert_eq!(replayed, producers_total(&producers).await);
    assert_eq!(snapshot(&incremental).await, before);
    assert_eq!(incremental.dead_letters().await.unwrap(), dead, "the dead letter comes back, once");

    // A second ops reading everything in one go builds the same model too.
    let at_once = open_ops(&dir, "ops-b.db", &producers, clock.clone()).await;
    at_once.feed().unwrap().catch_up().await.unwrap();
    assert_eq!(snapshot(&at_once).await, before);

    // The same key answers the same without replaying: a new event stays unread until the feed polls.
    producers.submitted("e", "icbc", "310104", T0).await;
    assert_eq!(incremental.rebuild("rebuild-1").await.unwrap(), replayed);
    assert_eq!(snapshot(&incremental).await, before);
    assert_eq!(incremental.rebuild("rebuild-2").await.unwrap(), replayed + 1);
}

async fn producers_total(p: &Producers) -> u64 {
    let mut n = 0;
    for (log, topic) in [
        (&p.registry, topics::CARD),
        (&p.bank, topics::FINANCIAL),
        (&p.postal, topics::SHIPMENT),
        (&p.loss, topics::LOSS),
    ] {
        n += log.outbox().last_seq(topic).await.unwrap();
    }
    n.unsigned_abs()
}

#[tokio::test]
async fn a_redelivered_event_changes_nothing() {
    let dir = temp_dir();
    let mut producers = Producers::open(&dir).await;
    producers.submitted("a", "icbc", "310104", T0).await;
    producers.produced("a", T0, 5).await;
    let ops = open_ops(&dir, "ops.db", &producers, ManualClock::new(T0)).await;
    let rows = producers.registry.outbox().read_after(topics::CARD, 0, 100).await.unwrap();
    let handler = ops.handler();
    for r in &rows {
        assert_eq!(handler.handle(&r.envelope).await.unwrap(), Applied::Applied);
    }
    let once = snapshot(&ops).await;
    for r in rows.iter().rev() {
        assert_eq!(handler.handle(&r.envelope).await.unwrap(), Applied::Duplicate);
    }
    // The same change under a new event id (a producer's retry) is recognised by the card's version.
    let again = Envelope { id: uuid::Uuid::now_v7().to_string(), ..rows[3].envelope.clone() };
    assert_eq!(handler.handle(&again).await.unwrap(), Applied::Applied);
    assert_eq!(snapshot(&ops).await, once);
}

/// A batch (one transaction) folds to what the same events fold to one at a time; a batch holding an
/// undecodable event writes nothing at all, so the consumer can apply its events one by one.
#[tokio::test]
async fn a_batch_applies_all_or_nothing_and_folds_as_one_at_a_time() {
    let dir = temp_dir();
    let mut producers = Producers::open(&dir).await;
    producers.submitted("a", "icbc", "310104", T0).await;
    producers.submitted("b", "ccb", "310115", T0).await;
    producers.produced("a", T0, 5).await;
    producers.card("b", T0, Kind::ApplicationRejected(ev::ApplicationRejected { reason: "photo".into() })).await;
    let rows = producers.registry.outbox().read_after(topics::CARD, 0, 100).await.unwrap();
    let events: Vec<Envelope> = rows.iter().map(|r| r.envelope.clone()).collect();

    let single = open_ops(&dir, "ops-single.db", &producers, ManualClock::new(T0)).await;
    for e in &events {
        assert_eq!(single.handler().handle(e).await.unwrap(), Applied::Applied);
    }

    let batched = open_ops(&dir, "ops-batched.db", &producers, ManualClock::new(T0)).await;
    let empty = snapshot(&batched).await;
    let broken = Envelope {
        id: uuid::Uuid::now_v7().to_string(),
        event_type: "socialcard.card.v1.Broken".into(),
        payload: vec![0xff, 0xff, 0xff],
        ..events[0].clone()
    };
    let mut with_broken = events.clone();
    with_broken.insert(2, broken);
    let refused = batched.handler().handle_batch(&with_broken).await.expect("ops has a batch form");
    assert!(matches!(refused, Err(HandlerError::Permanent(_))), "{refused:?}");
    assert_eq!(snapshot(&batched).await, empty, "the failed batch wrote nothing");
    // Nor inbox rows: its first event is new to the inbox.
    assert_eq!(batched.handler().handle(&events[0]).await.unwrap(), Applied::Applied);

    let answers = batched.handler().handle_batch(&events[1..]).await.unwrap().unwrap();
    assert_eq!(answers, vec![Applied::Applied; events.len() - 1]);
    assert_eq!(snapshot(&batched).await, snapshot(&single).await);
    // Redelivered as a batch, with one event twice: nothing new.
    let mut again = events.clone();
    again.push(events[0].clone());
    let answers = batched.handler().handle_batch(&again).await.unwrap().unwrap();
    assert_eq!(answers, vec![Applied::Duplicate; again.len()]);
    assert_eq!(snapshot(&batched).await, snapshot(&single).await);
}

fn reason(s: &tonic::Status) -> String {
    s.get_details_error_info().map(|i| i.reason).unwrap_or_default()
}

#[tokio::test]
async fn bad_input_is_refused_with_a_reason_and_writes_nothing() {
    let dir = temp_dir();
    let mut producers = Producers::open(&dir).await;
    producers.submitted("a", "icbc", "310104", T0).await;
    let ops = open_ops(&dir, "ops.db", &producers, ManualClock::new(T0)).await;
    ops.feed().unwrap().catch_up().await.unwrap();
    let before = snapshot(&ops).await;
    let api = OpsGrpc::new(ops.clone());

    let refused = [
        api.get_card_counts(Request::new(pb::GetCardCountsRequest::default())).await.unwrap_err(),
        api.get_card_counts(Request::new(pb::GetCardCountsRequest { group_by: 9, group: String::new() }))
            .await
            .unwrap_err(),
        api.get_card_counts(Request::new(pb::GetCardCountsRequest {
            group_by: pb::CardGrouping::Bank as i32,
            group: "ICBC'; DROP TABLE cards".into(),
        }))
        .await
        .unwrap_err(),
        api.get_funnel(Request::new(pb::GetFunnelRequest {
            applied_from: ts(T0),
            applied_until: ts(T0 - time::Duration::days(1)),
            bank_code: String::new(),
        }))
        .await
        .unwrap_err(),
        api.get_funnel(Request::new(pb::GetFunnelRequest {
            applied_from: Some(prost_types::Timestamp { seconds: 0, nanos: -1 }),
            ..Default::default()
        }))
        .await
        .unwrap_err(),
        api.list_overdue_shipments(Request::new(pb::ListOverdueShipmentsRequest {
            older_than_days: 366,
            page_size: 0,
        }))
        .await
        .unwrap_err(),
        api.list_overdue_shipments(Request::new(pb::ListOverdueShipmentsRequest {
            older_than_days: 0,
            page_size: 501,
        }))
        .await
        .unwrap_err(),
        api.rebuild(Request::new(pb::RebuildRequest { idempotency_key: String::new() })).await.unwrap_err(),
    ];
    let reasons: Vec<String> = refused.iter().map(reason).collect();
    assert!(refused.iter().all(|s| s.code() == tonic::Code::InvalidArgument), "{refused:?}");
    assert_eq!(
        reasons,
        [
            "ENUM_UNSPECIFIED",
            "UNKNOWN_ENUM_VALUE",
            "GROUP_NAME_INVALID",
            "TIME_RANGE_EMPTY",
            "TIMESTAMP_INVALID",
            "DAYS_OUT_OF_RANGE",
            "PAGE_SIZE_TOO_LARGE",
            "IDEMPOTENCY_KEY_REQUIRED"
        ]
    );
    assert_eq!(snapshot(&ops).await, before, "a refusal writes nothing");
    let counts = api
        .get_card_counts(Request::new(pb::GetCardCountsRequest {
            group_by: pb::CardGrouping::Bank as i32,
            group: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(counts.total, 1, "the read model is still there: {counts:?}");
}
