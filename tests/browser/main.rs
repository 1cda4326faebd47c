//! The operations dashboard in a real browser: `socialcard up` on an empty data directory, a scripted
//! morning through the CLI and the courier's feed (cards applied for, produced, delivered or collected,
//! activated, one reported lost), then the page loaded in headless Chromium (Debian's `chromium` through
//! npm `playwright-core`, `tests/browser/dashboard.mjs`): every number it shows must be the ops gRPC API's.
//!
//! Needs node, `/usr/bin/chromium` (or `CHROMIUM_PATH`) and `npm ci --prefix tests/browser`; without them
//! the test says so and passes, unless `SOCIALCARD_REQUIRE_BROWSER=1` (CI sets it). The screenshot goes to
//! `SOCIALCARD_DASHBOARD_SCREENSHOT` (default: a temporary file; `docs/dashboard.png` is made this way).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use socialcard_proto::ops::v1 as pb;
use socialcard_proto::ops::v1::ops_service_client::OpsServiceClient;
use socialcard_proto::postal::v1 as postal_pb;
use socialcard_proto::postal::v1::postal_service_client::PostalServiceClient;
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_socialcard");

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

fn chromium() -> PathBuf {
    std::env::var_os("CHROMIUM_PATH").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}

/// What is missing to run the browser, if anything.
fn missing_tools() -> Option<String> {
    if Command::new("node").arg("--version").output().map(|o| !o.status.success()).unwrap_or(true) {
        return Some("node is not installed".into());
    }
    if !chromium().exists() {
        return Some(format!("{} is missing (apt-get install chromium)", chromium().display()));
    }
    if !browser_dir().join("node_modules/playwright-core").exists() {
        return Some("playwright-core is not installed (npm ci --prefix tests/browser)".into());
    }
    None
}

struct Up {
    child: Child,
    /// Whether this build runs the loss coordinator (the scenario reports a loss through it).
    loss: bool,
    lines: BTreeMap<String, String>,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Up {
    fn start() -> Up {
        let dir = TempDir(std::env::temp_dir().join(format!("socialcard-browser-{}", uuid::Uuid::new_v4().simple())));
        std::fs::create_dir_all(&dir.0).unwrap();
        let help = Command::new(BIN).args(["up", "--help"]).output().unwrap();
        let loss = String::from_utf8_lossy(&help.stdout).contains("--loss-listen");
        let loss_flags: &[&str] = if loss { &["--loss-listen", "127.0.0.1:0"] } else { &[] };
        let mut child = Command::new(BIN)
            .arg("up")
            .args(["--registry-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--bank-ports-auto"])
            .args(loss_flags)
            .args(["--postal-listen", "127.0.0.1:0", "--postal-webhook-listen", "127.0.0.1:0"])
            .args(["--ops-listen", "127.0.0.1:0", "--ops-dashboard-listen", "127.0.0.1:0", "--data-dir"])
            .arg(&dir.0)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut lines = BTreeMap::new();
        while !lines.contains_key("ops dashboard") {
            let line = out.next().expect("up stopped before ops was ready").unwrap();
            if let Some((what, addr)) = line.split_once(" listening on ") {
                lines.insert(what.to_string(), addr.to_string());
            }
        }
        std::thread::spawn(move || for _ in out {});
        Up { child, loss, lines, _dir: dir }
    }

    fn addr(&self, what: &str) -> String {
        self.lines.get(what).unwrap_or_else(|| panic!("no `{what} listening on` line: {:?}", self.lines)).clone()
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(BIN)
            .args(["--endpoint", &format!("http://{}", self.addr("registry"))])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Registers a holder born in `region` and applies for a card at `bank`; returns the card id.
    fn apply(&self, n: u32, region: &str, bank: &str) -> String {
        let first17 = format!("{region}198001{:02}{n:03}", 10 + n % 10);
        let id = format!("{first17}{}", socialcard_domain::citizen_id::check_char(first17.as_bytes()) as char);
        self.cli(&["register", "--id", &id, "--name", "Holder", "--phone", "13800000000"]);
        let out = self.cli(&["apply", "--id", &id, "--bank", bank]);
        out.lines()
            .find_map(|l| l.strip_prefix("card "))
            .unwrap_or_else(|| panic!("no card id in {out}"))
            .trim()
            .to_string()
    }

    fn produce(&self, card: &str) {
        self.cli(&["approve", card]);
        self.cli(&["produce", card]);
    }

    fn activate_at_bank(&self, card: &str, bank: &str) {
        let adapter = format!("http://{}", self.addr(&format!("bank-adapter[{bank}]")));
        self.cli(&["activate", card, "--channel", "bank", "--bank-endpoint", &adapter]);
    }
}

async fn connect(addr: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

/// Polls `check` until it returns Some, or fails with what it last saw after a minute.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match check().await {
            Ok(v) => return v,
            Err(seen) if Instant::now() > deadline => panic!("{what}: never happened; last seen {seen}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The courier reports the card's shipment in transit, then delivered (postal tells the registry).
async fn courier_delivers(postal: &mut PostalServiceClient<Channel>, card: &str) {
    let waybill = eventually("postal opens the shipment", || {
        let mut postal = postal.clone();
        async move {
            let r = postal
                .get_shipment(postal_pb::GetShipmentRequest {
                    lookup: Some(postal_pb::get_shipment_request::Lookup::CardId(card.into())),
                })
                .await
                .map_err(|s| s.to_string())?;
            r.into_inner().shipment.map(|s| s.waybill).ok_or_else(|| "no shipment".to_string())
        }
    })
    .await;
    let now = time::OffsetDateTime::now_utc();
    let update = |status: postal_pb::ShipmentStatus, id: &str| postal_pb::StatusUpdate {
        waybill: waybill.clone(),
        status: status as i32,
        occurred_at: Some(prost_types::Timestamp {
            seconds: now.unix_timestamp(),
            nanos: i32::try_from(now.nanosecond()).unwrap_or(0),
        }),
        courier_event_id: format!("{id}-{card}"),
        ..Default::default()
    };
    let updates =
        vec![update(postal_pb::ShipmentStatus::InTransit, "t"), update(postal_pb::ShipmentStatus::Delivered, "d")];
    let r = postal.stream_status_updates(tokio_stream::iter(updates)).await.unwrap().into_inner();
    assert_eq!(r.applied, 2, "{r:?}");
}

/// Per function, per bank: the bank's total and its cards by state, as the page prints them.
type BankBars = BTreeMap<String, BTreeMap<String, (String, BTreeMap<String, String>)>>;
/// The same, counted.
type BankCounts = BTreeMap<String, BTreeMap<String, (u64, BTreeMap<String, u64>)>>;

/// What the ops API says, in the shape the page shows it.
#[derive(Debug, PartialEq)]
struct Figures {
    tiles: BTreeMap<String, String>,
    funnel: Vec<(String, String, Option<String>)>,
    /// function -> bank -> (total, state -> count)
    banks: BankBars,
    loss_states: BTreeMap<String, String>,
}

async fn api_figures(ops: &mut OpsServiceClient<Channel>) -> Figures {
    let counts = ops
        .get_card_counts(pb::GetCardCountsRequest { group_by: pb::CardGrouping::Bank as i32, group: String::new() })
        .await
        .unwrap()
        .into_inner();
    let funnel = ops.get_funnel(pb::GetFunnelRequest::default()).await.unwrap().into_inner();
    let loss = ops.get_loss_summary(pb::GetLossSummaryRequest::default()).await.unwrap().into_inner();
    let overdue = ops.list_overdue_shipments(pb::ListOverdueShipmentsRequest::default()).await.unwrap().into_inner();
    let dead = ops.get_dead_letters(pb::GetDeadLettersRequest {}).await.unwrap().into_inner();
    let activated = funnel.steps.iter().find(|s| s.stage == pb::FunnelStage::Activation as i32).unwrap().count;
    let tiles = [
        ("cards-total", counts.total),
        ("activated", activated),
        ("loss-open", loss.open),
        ("loss-one-sided", loss.one_sided),
        ("loss-expired", loss.expired),
        ("overdue-total", overdue.total),
        ("dead-letters-total", dead.total),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let stage_name =
        |s: i32| pb::FunnelStage::try_from(s).unwrap().as_str_name().trim_start_matches("FUNNEL_STAGE_").to_lowercase();
    let funnel = funnel
        .steps
        .iter()
        .map(|s| {
            let median =
                s.median_from_previous.map(|d| (d.seconds * 1_000_000 + i64::from(d.nanos) / 1_000).to_string());
            // The page shows a median for every stage after the first ("" when none is known).
            let median =
                if s.stage == pb::FunnelStage::Application as i32 { None } else { Some(median.unwrap_or_default()) };
            (stage_name(s.stage), s.count.to_string(), median)
        })
        .collect();
    let mut banks: BankCounts = BTreeMap::new();
    for c in &counts.counts {
        for (function, state) in
            [("physical", &c.physical_state), ("social", &c.social_state), ("financial", &c.financial_state)]
        {
            let bank = banks.entry(function.into()).or_default().entry(c.group.clone()).or_default();
            bank.0 += c.count;
            *bank.1.entry(state.clone()).or_default() += c.count;
        }
    }
    let banks = banks
        .into_iter()
        .map(|(f, bs)| {
            let bs = bs
                .into_iter()
                .map(|(b, (total, states))| {
                    (b, (total.to_string(), states.into_iter().map(|(s, n)| (s, n.to_string())).collect()))
                })
                .collect();
            (f, bs)
        })
        .collect();
    let loss_states = loss.by_state.iter().map(|s| (s.state.clone(), s.count.to_string())).collect();
    Figures { tiles, funnel, banks, loss_states }
}

fn shown_figures(shown: &Value) -> Figures {
    let text = |v: &Value| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
    let tiles = shown["tiles"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), text(v))).collect();
    let funnel = shown["funnel"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (text(&s["stage"]), text(&s["count"]), s["median_micros"].as_str().map(str::to_string)))
        .collect();
    let banks = shown["banks"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(f, bs)| {
            let bs = bs
                .as_array()
                .unwrap()
                .iter()
                .map(|b| {
                    let states = b["states"].as_object().unwrap().iter().map(|(s, n)| (s.clone(), text(n))).collect();
                    (text(&b["bank"]), (text(&b["total"]), states))
                })
                .collect();
            (f.clone(), bs)
        })
        .collect();
    let loss_states = shown["loss_states"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), text(v))).collect();
    Figures { tiles, funnel, banks, loss_states }
}

fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_what_the_ops_api_says() {
    if let Some(missing) = missing_tools() {
        assert!(
            std::env::var_os("SOCIALCARD_REQUIRE_BROWSER").is_none(),
            "SOCIALCARD_REQUIRE_BROWSER is set but {missing}"
        );
        eprintln!("skipping the browser test: {missing}");
        return;
    }
    let up = Up::start();
    let mut ops = OpsServiceClient::new(connect(&up.addr("ops")).await);
    let mut postal = PostalServiceClient::new(connect(&up.addr("postal")).await);

    // a (icbc, Xuhui): collected at the community point, activated at the bank (both functions, R20).
    let a = up.apply(1, "310104", "icbc");
    up.produce(&a);
    up.cli(&["collect", &a]);
    up.activate_at_bank(&a, "icbc");
    // b (icbc, Pudong): couriered and delivered; social function activated at the community point.
    let b = up.apply(2, "310115", "icbc");
    up.produce(&b);
    courier_delivers(&mut postal, &b).await;
    eventually("the delivery reaches the registry", || {
        let shown = up.cli(&["show", &b]);
        let collected = shown.lines().any(|l| l.trim_start().starts_with("physical") && l.contains("collected"));
        async move { if collected { Ok(()) } else { Err(shown) } }
    })
    .await;
    up.cli(&["activate", &b]);
    // c (ccb, Xuhui): activated at the bank, then reported lost by phone: locked and frozen.
    let c = up.apply(3, "310104", "ccb");
    up.produce(&c);
    up.cli(&["collect", &c]);
    up.activate_at_bank(&c, "ccb");
    if up.loss {
        up.cli(&[
            "report-loss",
            &c,
            "--kind",
            "temporary",
            "--phone",
            "13800000000",
            "--loss-endpoint",
            &format!("http://{}", up.addr("loss-coordinator")),
        ]);
    } else {
        eprintln!("this build runs no loss coordinator: the scenario reports no loss");
    }
    // d (boc, Pudong): applied for only. e (ccb, Pudong): produced, its shipment waiting for the courier.
    up.apply(4, "310115", "boc");
    let e = up.apply(5, "310115", "ccb");
    up.produce(&e);

    // Ops has caught up when the whole morning shows: the funnel and the loss case locked on both sides.
    let (losses, frozen_at_ccb) = if up.loss {
        (BTreeMap::from([("locked".to_string(), "1".to_string())]), Some("1"))
    } else {
        (BTreeMap::new(), None)
    };
    let settled = eventually("ops shows the morning", || {
        let mut ops = ops.clone();
        let losses = losses.clone();
        async move {
            let f = api_figures(&mut ops).await;
            let counts: Vec<&str> = f.funnel.iter().map(|s| s.1.as_str()).collect();
            let frozen = f.banks.get("financial").and_then(|b| b.get("ccb")).and_then(|b| b.1.get("frozen")).cloned();
            // The counts are read before the funnel: e's production must show in both before they are compared.
            let produced_at_ccb =
                f.banks.get("physical").and_then(|b| b.get("ccb")).and_then(|b| b.1.get("produced")).cloned();
            if counts == ["5", "4", "3", "3", "3"]
                && f.loss_states == losses
                && frozen.as_deref() == frozen_at_ccb
                && produced_at_ccb.as_deref() == Some("1")
            {
                Ok(f)
            } else {
                Err(format!("{f:?}"))
            }
        }
    })
    .await;
    // The scenario, as the API reports it.
    assert_eq!(settled.tiles["cards-total"], "5");
    assert_eq!(settled.tiles["loss-open"], if up.loss { "1" } else { "0" });
    assert_eq!(settled.tiles["dead-letters-total"], "0");
    let icbc = &settled.banks["social"]["icbc"];
    assert_eq!(icbc.1.get("active").map(String::as_str), Some("2"), "{icbc:?}");
    let ccb = &settled.banks["physical"]["ccb"];
    assert_eq!(ccb.1.get("produced").map(String::as_str), Some("1"), "{ccb:?} in {settled:?}");
    assert!(settled.funnel[2].2.as_deref().is_some_and(|m| !m.is_empty()), "b met the courier: a delivery time");
    let districts = ops
        .get_card_counts(pb::GetCardCountsRequest {
            group_by: pb::CardGrouping::District as i32,
            group: "310115".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(districts.total, 3, "b, d and e are from Pudong: {districts:?}");

    // The page.
    let dashboard = up.addr("ops dashboard");
    let screenshot = std::env::var_os("SOCIALCARD_DASHBOARD_SCREENSHOT").map_or_else(
        || std::env::temp_dir().join(format!("dashboard-{}.png", uuid::Uuid::new_v4().simple())),
        PathBuf::from,
    );
    let out = Command::new("node")
        .arg(browser_dir().join("dashboard.mjs"))
        .arg(format!("http://{dashboard}/"))
        .arg(&screenshot)
        .env("CHROMIUM_PATH", chromium())
        .output()
        .unwrap();
    assert!(out.status.success(), "the browser failed: {}", String::from_utf8_lossy(&out.stderr));
    let shown: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["errors"], Value::Array(vec![]), "errors in the page");
    assert_eq!(shown["external_requests"], Value::Array(vec![]), "the page must work offline");
    assert_eq!(shown_figures(&shown), settled, "the page shows what the API says");
    assert!(std::fs::metadata(&screenshot).unwrap().len() > 10_000, "a screenshot of the page");
    // Nothing moved while the browser looked.
    assert_eq!(api_figures(&mut ops).await, settled);

    // Prometheus sees the open case on the dashboard's port.
    let metrics = http_get(&dashboard, "/metrics");
    let open = format!("\nsocialcard_ops_loss_cases_open {}\n", settled.tiles["loss-open"]);
    assert!(metrics.contains(&open), "{metrics}");
    assert!(http_get(&dashboard, "/nowhere").starts_with("HTTP/1.1 404"));

    // A rebuild while everything runs replays every topic to the same figures.
    let replayed =
        ops.rebuild(pb::RebuildRequest { idempotency_key: "browser-test".into() }).await.unwrap().into_inner();
    assert!(replayed.events_replayed >= 30, "{replayed:?}");
    assert_eq!(api_figures(&mut ops).await, settled);
}
