//! The clients: bank cores, the bureau's hotline and window, the courier. Each call carries an
//! idempotency key (a courier event id for the courier) and is retried with the same key on every
//! transient failure, as a real bank core does; what was acknowledged is written down for the checks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use socialcard_proto::bank::v1 as bank;
use socialcard_proto::bank::v1::bank_card_service_client::BankCardServiceClient;
use socialcard_proto::loss::v1 as loss;
use socialcard_proto::loss::v1::loss_coordinator_service_client::LossCoordinatorServiceClient;
use socialcard_proto::postal::v1 as postal;
use socialcard_proto::postal::v1::postal_service_client::PostalServiceClient;
use socialcard_proto::registry::v1 as reg;
use socialcard_proto::registry::v1::registry_service_client::RegistryServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Mutex;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::plan::{CardStep, CourierKind, CourierStep, Feed, LossVia};
use crate::system::Links;

/// Each call's deadline; delays on a link go beyond it.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a client keeps retrying one operation before it gives up (kills and cuts last seconds).
pub const RETRY_BUDGET: Duration = Duration::from_secs(60);
pub const PHONE: &str = "13800000000";

fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(1))
        .timeout(CALL_TIMEOUT)
        .connect_lazy())
}

/// Clients through the proxies.
#[derive(Clone, Debug)]
pub struct Clients {
    pub registry_channel: Channel,
    pub registry: RegistryServiceClient<Channel>,
    pub loss: LossCoordinatorServiceClient<Channel>,
    pub postal: PostalServiceClient<Channel>,
    pub banks: BTreeMap<String, BankCardServiceClient<Channel>>,
    webhook: SocketAddr,
    secret: Arc<Vec<u8>>,
    /// Sabotage for the suite's own test: a retry under a fresh key, as a careless client would.
    fresh_key_on_retry: bool,
    pub retries: Arc<AtomicU64>,
}

impl Clients {
    pub fn new(links: &Links, secret: &str, fresh_key_on_retry: bool) -> anyhow::Result<Clients> {
        let mut banks = BTreeMap::new();
        for (code, p) in &links.banks {
            banks.insert(code.clone(), BankCardServiceClient::new(channel(p.addr)?));
        }
        let registry_channel = channel(links.registry.addr)?;
        Ok(Clients {
            registry: RegistryServiceClient::new(registry_channel.clone()),
            registry_channel,
            loss: LossCoordinatorServiceClient::new(channel(links.loss.addr)?),
            postal: PostalServiceClient::new(channel(links.postal.addr)?),
            banks,
            webhook: links.webhook.addr,
            secret: Arc::new(secret.as_bytes().to_vec()),
            fresh_key_on_retry,
            retries: Arc::new(AtomicU64::new(0)),
        })
    }

    fn key(&self, base: &str, attempt: u32) -> String {
        if self.fresh_key_on_retry && attempt > 0 { format!("{base}-retry{attempt}") } else { base.to_string() }
    }
}

/// How one operation ended for its client.
#[derive(Debug)]
pub enum Outcome<T> {
    Acked(T),
    /// A definitive refusal (not a transient code).
    Refused(Status),
    GaveUp(String),
}

/// A transport failure or a transient answer: worth the same call again.
pub fn transient(s: &Status) -> bool {
    match s.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted | Code::Unknown => true,
        // A connection torn down mid-answer can surface as INTERNAL from h2.
        Code::Internal => {
            let m = s.message().to_ascii_lowercase();
            ["h2", "transport", "connection", "broken pipe", "reset", "stream", "frame"].iter().any(|w| m.contains(w))
        }
        _ => false,
    }
}

/// Calls `f(attempt)` until it answers OK, refuses for good, or the budget is spent.
pub async fn retry<T, F, Fut>(retries: &AtomicU64, mut f: F) -> Outcome<T>
where
    F: FnMut(u32) -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let until = Instant::now() + RETRY_BUDGET;
    let mut backoff = Duration::from_millis(100);
    let mut attempt = 0;
    loop {
        match f(attempt).await {
            Ok(v) => return Outcome::Acked(v),
            Err(s) if !transient(&s) => return Outcome::Refused(s),
            Err(s) => {
                if Instant::now() + backoff > until {
                    return Outcome::GaveUp(format!("{:?} {}", s.code(), s.message()));
                }
                retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                attempt += 1;
            }
        }
    }
}

pub fn reason(s: &Status) -> String {
    use tonic_types::StatusExt as _;
    let why = s.get_details_error_info().map(|i| i.reason).unwrap_or_else(|| s.message().to_string());
    format!("{:?} {why}", s.code())
}

/// What happened to one card, as its clients saw it.
#[derive(Clone, Debug, Default)]
pub struct CardRecord {
    pub card_id: String,
    pub card_number: String,
    pub bank: String,
    /// The activation's key, once acknowledged OK.
    pub activated: Option<String>,
    pub loss: Option<LossVia>,
    pub loss_key: Option<String>,
    pub unlocked_social: bool,
    pub unlocked_financial: bool,
    /// An operation ended without an answer or with an unexpected refusal: its effect is unknown, so
    /// the card's end state is not predicted (the failure itself is a violation).
    pub ambiguous: bool,
}

#[derive(Clone, Debug, Default)]
pub struct ShipmentRecord {
    pub card_id: String,
    pub waybill: String,
    pub backup_point: String,
    /// (event id, status, kind) acknowledged by a feed, in order.
    pub acked: Vec<(String, &'static str, CourierKind)>,
    pub ambiguous: bool,
}

/// Everything the workload saw.
#[derive(Debug, Default)]
pub struct Journal {
    pub cards: Vec<CardRecord>,
    pub shipments: Vec<ShipmentRecord>,
    /// (what, how it ended) for every operation that did not end acknowledged.
    pub failures: Vec<String>,
    pub acked: BTreeMap<&'static str, u64>,
    pub skipped: u64,
}

pub type SharedJournal = Arc<Mutex<Journal>>;

fn actor(channel: reg::Channel) -> Option<reg::Actor> {
    Some(reg::Actor {
        channel: channel as i32,
        operator_id: "faults".into(),
        site_id: "site-1".into(),
        ..Default::default()
    })
}

fn in_person() -> Option<reg::Documents> {
    Some(reg::Documents {
        presenter: reg::Presenter::Holder as i32,
        holder_id_card: true,
        card_presented: true,
        ..Default::default()
    })
}

fn step_name(step: CardStep) -> &'static str {
    match step {
        CardStep::Activate => "activate at bank",
        CardStep::Loss(LossVia::PhoneAtCoordinator) => "phone loss at coordinator",
        CardStep::Loss(LossVia::WrittenAtCoordinator) => "written loss at coordinator",
        CardStep::Loss(LossVia::WrittenAtBank) => "written loss at bank",
        CardStep::UnlockSocial => "unlock social at bureau",
        CardStep::UnlockFinancial => "unlock financial at bank",
    }
}

/// Runs one step of a card's script, with retries; records the outcome.
pub async fn card_step(c: &Clients, journal: &SharedJournal, card: usize, step: CardStep, key: String) {
    let rec = journal.lock().await.cards[card].clone();
    if rec.ambiguous {
        journal.lock().await.skipped += 1;
        return;
    }
    let name = step_name(step);
    let Some(bank_client) = c.banks.get(&rec.bank).cloned() else {
        journal.lock().await.failures.push(format!("card {card}: no adapter for bank {}", rec.bank));
        return;
    };
    // An unlock follows a loss the clerk sees locked on both sides.
    if matches!(step, CardStep::UnlockSocial | CardStep::UnlockFinancial)
        && !rec.unlocked_social
        && !rec.unlocked_financial
    {
        wait_locked(c, &rec.card_id).await;
    }
    let outcome: Outcome<()> = match step {
        CardStep::Activate => {
            retry(&c.retries, |attempt| {
                let mut b = bank_client.clone();
                let request = bank::ActivateFinancialRequest {
                    idempotency_key: c.key(&key, attempt),
                    card_number: rec.card_number.clone(),
                    teller_id: "teller-1".into(),
                    branch_id: "branch-1".into(),
                    face_verification_ref: format!("face-{card}"),
                    bank_pin_changed: true,
                };
                async move { b.activate_financial(request).await.map(|_| ()) }
            })
            .await
        }
        CardStep::Loss(via) => {
            retry(&c.retries, |attempt| {
                let k = c.key(&key, attempt);
                let mut l = c.loss.clone();
                let mut b = bank_client.clone();
                let card_id = rec.card_id.clone();
                let card_number = rec.card_number.clone();
                async move {
                    match via {
                        LossVia::PhoneAtCoordinator | LossVia::WrittenAtCoordinator => {
                            let (kind, actor) = if via == LossVia::PhoneAtCoordinator {
                                let mut a = actor(reg::Channel::Hotline);
                                if let Some(a) = a.as_mut() {
                                    a.caller_phone = PHONE.into();
                                    a.site_id = String::new();
                                }
                                (reg::LossKind::Temporary, a)
                            } else {
                                (reg::LossKind::Written, actor(reg::Channel::BureauWindow))
                            };
                            l.report_loss(loss::ReportLossRequest {
                                idempotency_key: k,
                                card_id,
                                loss_kind: kind as i32,
                                actor,
                                documents: Some(reg::Documents {
                                    presenter: reg::Presenter::Holder as i32,
                                    holder_id_card: true,
                                    ..Default::default()
                                }),
                                card_number: String::new(),
                            })
                            .await
                            .map(|_| ())
                        }
                        LossVia::WrittenAtBank => b
                            .report_loss(bank::ReportLossRequest {
                                idempotency_key: k,
                                card_number,
                                loss_kind: reg::LossKind::Written as i32,
                                teller_id: "teller-1".into(),
                                branch_id: "branch-1".into(),
                                holder_id_checked: true,
                            })
                            .await
                            .map(|_| ()),
                    }
                }
            })
            .await
        }
        CardStep::UnlockSocial => {
            retry(&c.retries, |attempt| {
                let mut l = c.loss.clone();
                let request = loss::UnlockRequest {
                    idempotency_key: c.key(&key, attempt),
                    case_id: String::new(),
                    actor: actor(reg::Channel::BureauWindow),
                    documents: in_person(),
                    card_id: rec.card_id.clone(),
                };
                async move { l.unlock(request).await.map(|_| ()) }
            })
            .await
        }
        CardStep::UnlockFinancial => {
            retry(&c.retries, |attempt| {
                let mut b = bank_client.clone();
                let request = bank::UnlockFinancialRequest {
                    idempotency_key: c.key(&key, attempt),
                    card_number: rec.card_number.clone(),
                    teller_id: "teller-1".into(),
                    branch_id: "branch-1".into(),
                    holder_id_checked: true,
                    card_presented: true,
                };
                async move { b.unlock_financial(request).await.map(|_| ()) }
            })
            .await
        }
    };
    let mut j = journal.lock().await;
    match outcome {
        Outcome::Acked(()) => {
            *j.acked.entry(name).or_default() += 1;
            let r = &mut j.cards[card];
            match step {
                CardStep::Activate => r.activated = Some(key),
                CardStep::Loss(via) => {
                    r.loss = Some(via);
                    r.loss_key = Some(key);
                }
                CardStep::UnlockSocial => r.unlocked_social = true,
                CardStep::UnlockFinancial => r.unlocked_financial = true,
            }
        }
        Outcome::Refused(s) => {
            j.failures.push(format!("card {card} {name}: refused {}", reason(&s)));
            j.cards[card].ambiguous = true;
        }
        Outcome::GaveUp(e) => {
            j.failures.push(format!("card {card} {name}: no answer within {RETRY_BUDGET:?} ({e})"));
            j.cards[card].ambiguous = true;
        }
    }
}

/// Waits (bounded) until the card's open loss case is locked on every side it needs.
async fn wait_locked(c: &Clients, card_id: &str) {
    let until = Instant::now() + Duration::from_secs(30);
    while Instant::now() < until {
        let answer = c
            .loss
            .clone()
            .list_cases(loss::ListCasesRequest { card_id: card_id.into(), page_size: 10, ..Default::default() })
            .await;
        if let Ok(a) = answer
            && a.into_inner().cases.iter().any(|k| k.state == loss::CaseState::Locked as i32)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A courier step through the webhook or the stream, retried with the same event id.
pub async fn courier_step(c: &Clients, journal: &SharedJournal, shipment: usize, step: &CourierStep, base: i64) {
    let rec = journal.lock().await.shipments[shipment].clone();
    if rec.ambiguous {
        journal.lock().await.skipped += 1;
        return;
    }
    let event_id = format!("ev-{shipment}-{}", step.event);
    let occurred = base + step.minute * 60;
    let point = if step.at_point { rec.backup_point.clone() } else { String::new() };
    let outcome: Outcome<()> = match step.feed {
        Feed::Stream => {
            let Ok(status) = socialcard_postal::status::Status::from_label(step.status)
                .map(|s| s.to_string())
                .ok_or(())
                .and_then(|label| {
                    postal::ShipmentStatus::from_str_name(&format!("SHIPMENT_STATUS_{}", label.to_ascii_uppercase()))
                        .ok_or(())
                })
            else {
                journal.lock().await.failures.push(format!("shipment {shipment}: unknown status {}", step.status));
                return;
            };
            retry(&c.retries, |attempt| {
                let mut p = c.postal.clone();
                let update = postal::StatusUpdate {
                    waybill: rec.waybill.clone(),
                    status: status as i32,
                    sub_reason: step.sub_reason.into(),
                    occurred_at: Some(prost_types::Timestamp { seconds: occurred, nanos: 0 }),
                    courier_event_id: c.key(&event_id, attempt),
                    point_id: point.clone(),
                };
                async move { p.stream_status_updates(tokio_stream::iter([update])).await.map(|_| ()) }
            })
            .await
        }
        Feed::Webhook => {
            let at = time::OffsetDateTime::from_unix_timestamp(occurred).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            let at = at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
            retry(&c.retries, |attempt| {
                let body = serde_json::json!({
                    "event_id": c.key(&event_id, attempt),
                    "waybill": rec.waybill,
                    "status": step.status,
                    "sub_reason": step.sub_reason,
                    "occurred_at": at,
                    "point_id": point,
                })
                .to_string();
                post_webhook(c.webhook, c.secret.clone(), body)
            })
            .await
        }
    };
    let mut j = journal.lock().await;
    let name = match step.feed {
        Feed::Webhook => "courier update by webhook",
        Feed::Stream => "courier update by stream",
    };
    match outcome {
        Outcome::Acked(()) => {
            *j.acked.entry(name).or_default() += 1;
            j.shipments[shipment].acked.push((event_id, step.status, step.kind));
        }
        Outcome::Refused(s) => {
            j.failures.push(format!("shipment {shipment} {name} {}: refused {}", step.status, reason(&s)));
            j.shipments[shipment].ambiguous = true;
        }
        Outcome::GaveUp(e) => {
            j.failures.push(format!("shipment {shipment} {name} {}: no answer ({e})", step.status));
            j.shipments[shipment].ambiguous = true;
        }
    }
}

/// One signed POST to the courier webhook; a lost connection or a 5xx is transient (UNAVAILABLE).
async fn post_webhook(addr: SocketAddr, secret: Arc<Vec<u8>>, body: String) -> Result<(), Status> {
    let ts = time::OffsetDateTime::now_utc().unix_timestamp();
    let signature = socialcard_postal::feed::sign(&secret, ts, body.as_bytes());
    let request = format!(
        "POST /courier/v1/events HTTP/1.1\r\nHost: courier\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Courier-Timestamp: {ts}\r\nX-Courier-Signature: {signature}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        std::io::Result::Ok(answer)
    };
    let answer = match tokio::time::timeout(CALL_TIMEOUT, exchange).await {
        Err(_) => return Err(Status::deadline_exceeded("webhook timed out")),
        Ok(Err(e)) => return Err(Status::unavailable(format!("webhook: {e}"))),
        Ok(Ok(a)) => a,
    };
    let text = String::from_utf8_lossy(&answer);
    let code: u16 = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    match code {
        200..=299 => Ok(()),
        // No status line: the connection went away before the answer.
        0 => Err(Status::unavailable("webhook: connection closed without an answer")),
        500..=599 => Err(Status::unavailable(format!("webhook answered {code}"))),
        _ => Err(Status::invalid_argument(format!("webhook answered {code}: {}", text.lines().last().unwrap_or("")))),
    }
}
