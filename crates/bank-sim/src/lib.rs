//! A partner bank's core system, simulated, for the demo, tests and benchmarks: its tellers take cards
//! through financial activation (R20), some of them through a loss report at the branch (R25) and some
//! of those through an unlock (R27), against the bank's adapter over gRPC, at a chosen rate and
//! concurrency. It keeps the bank core's own records and writes them as the bank's daily reconciliation
//! file, in the bank's layout, for `socialcard reconcile`.
//!
//! The cards it works on are made through the registry's public API first (the registry fixtures:
//! register, apply, approve, produce, collect), as the bureau's channels would. It must never write to
//! any service's storage: everything goes through gRPC.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use socialcard_bank_adapter::reconcile::{BUSINESS_OFFSET, DailyFile, DailyRecord, RecordKind};
use socialcard_domain::PartnerBank;
use socialcard_proto::bank::v1 as bank;
use socialcard_proto::bank::v1::bank_card_service_client::BankCardServiceClient;
use socialcard_proto::registry::v1 as reg;
use socialcard_proto::registry::v1::registry_service_client::RegistryServiceClient;
use socialcard_server::error::reason_of;
use time::OffsetDateTime;
use tokio::sync::Mutex;
use tonic::transport::Channel;

/// What to simulate.
#[derive(Clone, Debug, PartialEq)]
pub struct SimConfig {
    /// Cards taken through the day (each is activated).
    pub cards: usize,
    /// Teller sessions in flight at once.
    pub concurrency: usize,
    /// At most this many bank calls per second overall; `None`: as fast as the adapter answers.
    pub rate: Option<f64>,
    /// Percent of activated cards then reported lost at a branch (written loss).
    pub loss_percent: u8,
    /// Percent of lost cards then unlocked at a branch.
    pub unlock_percent: u8,
    /// The fixtures' person numbering starts here (distinct per run on one registry).
    pub first_person: u64,
    /// Leave this many activations out of the bank's file (a bank core that lost records, for a demo of
    /// reconciliation).
    pub omit_from_file: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            cards: 20,
            concurrency: 4,
            rate: None,
            loss_percent: 20,
            unlock_percent: 50,
            first_person: 0,
            omit_from_file: 0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("configuration: {0}")]
    Config(String),
    #[error("preparing card {n} at the registry: {status}")]
    Prepare { n: u64, status: tonic::Status },
}

/// A bank operation the tellers perform.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    Activation,
    Loss,
    Unlock,
}

/// How one kind of operation went.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct OperationFigures {
    pub ok: u64,
    /// Refused or failed, by code and reason (e.g. `FailedPrecondition CARD_LOSS_LOCKED`).
    pub refused: BTreeMap<String, u64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    #[serde(skip)]
    samples_us: Vec<u64>,
}

impl OperationFigures {
    fn finish(&mut self) {
        self.samples_us.sort_unstable();
        let q = |q: f64| {
            if self.samples_us.is_empty() {
                return 0.0;
            }
            let i = ((self.samples_us.len() as f64 - 1.0) * q).round() as usize;
            self.samples_us[i] as f64 / 1000.0
        };
        self.p50_ms = q(0.5);
        self.p99_ms = q(0.99);
    }
}

/// The run's figures and the bank core's records.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub bank_code: String,
    pub cards: usize,
    pub prepare_seconds: f64,
    pub run_seconds: f64,
    pub calls_per_second: f64,
    pub operations: BTreeMap<Operation, OperationFigures>,
    /// Records in the bank's file (after any left out on purpose).
    pub file_records: usize,
    #[serde(skip)]
    pub file: DailyFile,
}

impl Summary {
    pub fn print(&self) {
        println!(
            "bank-sim[{}]: {} cards prepared in {:.1}s; teller calls for {:.1}s, {:.0} calls/s",
            self.bank_code, self.cards, self.prepare_seconds, self.run_seconds, self.calls_per_second
        );
        for (op, f) in &self.operations {
            let refused: Vec<String> = f.refused.iter().map(|(k, v)| format!("{k} x{v}")).collect();
            println!(
                "  {:<11} ok {:>6}  p50 {:>7.2} ms  p99 {:>7.2} ms  refused: {}",
                format!("{op:?}").to_lowercase(),
                f.ok,
                f.p50_ms,
                f.p99_ms,
                if refused.is_empty() { "none".to_string() } else { refused.join(", ") }
            );
        }
        println!("  bank file: {} records for {}", self.file_records, self.file.date);
    }
}

/// Paces calls to at most `rate` per second across all tellers.
#[derive(Debug)]
struct Pace {
    start: Instant,
    rate: Option<f64>,
    next: AtomicU64,
}

impl Pace {
    async fn wait(&self) {
        if let Some(rate) = self.rate.filter(|r| *r > 0.0) {
            let slot = self.next.fetch_add(1, Ordering::Relaxed);
            let due = self.start + Duration::from_secs_f64(slot as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
    }
}

#[derive(Debug)]
struct Shared {
    bank: PartnerBank,
    config: SimConfig,
    pace: Pace,
    figures: Mutex<BTreeMap<Operation, OperationFigures>>,
    records: Mutex<Vec<DailyRecord>>,
}

impl Shared {
    async fn note(&self, op: Operation, started: Instant, result: &Result<(), tonic::Status>) {
        let mut figures = self.figures.lock().await;
        let f = figures.entry(op).or_default();
        f.samples_us.push(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
        match result {
            Ok(()) => f.ok += 1,
            Err(s) => {
                let key = format!("{:?} {}", s.code(), reason_of(s).unwrap_or_default()).trim_end().to_string();
                *f.refused.entry(key).or_default() += 1;
            }
        }
    }

    async fn keep(&self, kind: RecordKind, card_number: &str, teller: &str, branch: &str) {
        let now = OffsetDateTime::now_utc().to_offset(BUSINESS_OFFSET);
        self.records.lock().await.push(DailyRecord {
            kind,
            card_number: card_number.to_string(),
            occurred_at: now.replace_nanosecond(0).unwrap_or(now),
            teller_id: teller.to_string(),
            branch_id: branch.to_string(),
        });
    }
}

/// Whether the `i`-th card is in the first `percent` of every hundred (deterministic, evenly spread).
pub fn chosen(i: usize, percent: u8) -> bool {
    (i * 37 % 100) < usize::from(percent)
}

/// Makes `config.cards` collected cards of `bank` at the registry, then runs the tellers against the
/// adapter. Returns the figures and the bank core's file of the day.
pub async fn run(
    bank: PartnerBank,
    registry: RegistryServiceClient<Channel>,
    adapter: BankCardServiceClient<Channel>,
    config: SimConfig,
) -> Result<Summary, SimError> {
    if config.concurrency == 0 {
        return Err(SimError::Config("concurrency must be at least 1".into()));
    }
    if config.loss_percent > 100 || config.unlock_percent > 100 {
        return Err(SimError::Config("percentages are 0..=100".into()));
    }
    let bin = bank.bin_prefixes.first().cloned().ok_or_else(|| SimError::Config("the bank has no BIN".into()))?;

    let prepare_started = Instant::now();
    let numbers = prepare(&bank.code, &bin, registry, &config).await?;
    let prepare_seconds = prepare_started.elapsed().as_secs_f64();

    let shared = Arc::new(Shared {
        bank: bank.clone(),
        config: config.clone(),
        pace: Pace { start: Instant::now(), rate: config.rate, next: AtomicU64::new(0) },
        figures: Mutex::new(BTreeMap::new()),
        records: Mutex::new(Vec::new()),
    });
    let run_started = Instant::now();
    let queue = Arc::new(Mutex::new(numbers.into_iter().enumerate()));
    let mut tellers = tokio::task::JoinSet::new();
    for t in 0..config.concurrency {
        let (shared, queue, adapter) = (shared.clone(), queue.clone(), adapter.clone());
        tellers.spawn(async move {
            loop {
                let next = queue.lock().await.next();
                let Some((i, number)) = next else { break };
                teller_session(&shared, adapter.clone(), t, i, &number).await;
            }
        });
    }
    while tellers.join_next().await.is_some() {}
    let run_seconds = run_started.elapsed().as_secs_f64();

    let mut operations = std::mem::take(&mut *shared.figures.lock().await);
    let calls: u64 = operations.values().map(|f| f.samples_us.len() as u64).sum();
    operations.values_mut().for_each(OperationFigures::finish);
    let mut records = std::mem::take(&mut *shared.records.lock().await);
    records.sort_by_key(|r| r.occurred_at);
    let mut omitted = 0;
    records.retain(|r| {
        let omit = r.kind == RecordKind::Activation && omitted < config.omit_from_file;
        omitted += usize::from(omit);
        !omit
    });
    let date = OffsetDateTime::now_utc().to_offset(BUSINESS_OFFSET).date();
    let mut file = DailyFile::new(bank.code.clone(), date);
    file.records = records;
    Ok(Summary {
        bank_code: bank.code,
        cards: config.cards,
        prepare_seconds,
        run_seconds,
        calls_per_second: if run_seconds > 0.0 { calls as f64 / run_seconds } else { 0.0 },
        operations,
        file_records: file.records.len(),
        file,
    })
}

/// Collected cards of the bank, made through the registry's API, `concurrency` at a time.
async fn prepare(
    bank_code: &str,
    bin: &str,
    registry: RegistryServiceClient<Channel>,
    config: &SimConfig,
) -> Result<Vec<String>, SimError> {
    let mut numbers = vec![String::new(); config.cards];
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..config.concurrency.min(config.cards.max(1)) {
        let (mut registry, next, bank_code, bin) =
            (registry.clone(), next.clone(), bank_code.to_string(), bin.to_string());
        let (cards, first) = (config.cards as u64, config.first_person);
        workers.spawn(async move {
            let mut made = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= cards {
                    return Ok(made);
                }
                let card = socialcard_registry::fixtures::collected_card(&mut registry, first + i, &bank_code, &bin)
                    .await
                    .map_err(|status| SimError::Prepare { n: first + i, status })?;
                made.push((i, card.card_number));
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        let made = done.map_err(|e| SimError::Config(format!("a preparing task failed: {e}")))??;
        for (i, number) in made {
            if let Some(slot) = usize::try_from(i).ok().and_then(|i| numbers.get_mut(i)) {
                *slot = number;
            }
        }
    }
    Ok(numbers)
}

/// One holder at a teller's window: activation, and for some a loss report and an unlock later.
async fn teller_session(
    shared: &Shared,
    mut adapter: BankCardServiceClient<Channel>,
    t: usize,
    i: usize,
    number: &str,
) {
    let teller = format!("teller-{:03}", t + 1);
    let branch = format!("branch-{}-{:02}", shared.bank.code, t % 8 + 1);
    let key = |what: &str| format!("sim:{}:{number}:{what}", shared.bank.code);

    shared.pace.wait().await;
    let started = Instant::now();
    let result = adapter
        .activate_financial(bank::ActivateFinancialRequest {
            idempotency_key: key("activate"),
            card_number: number.to_string(),
            teller_id: teller.clone(),
            branch_id: branch.clone(),
            face_verification_ref: format!("face-{}", uuid::Uuid::now_v7().simple()),
            bank_pin_changed: true,
        })
        .await
        .map(|_| ());
    shared.note(Operation::Activation, started, &result).await;
    // The bank committed its side unless the adapter refused: an answer of "social activation
    // pending" still means the account is open (the registry catches up by event).
    let committed = match &result {
        Ok(()) => true,
        Err(s) => reason_of(s).as_deref() == Some("SOCIAL_ACTIVATION_PENDING"),
    };
    if !committed {
        return;
    }
    shared.keep(RecordKind::Activation, number, &teller, &branch).await;

    if !chosen(i, shared.config.loss_percent) {
        return;
    }
    shared.pace.wait().await;
    let started = Instant::now();
    let result = adapter
        .report_loss(bank::ReportLossRequest {
            idempotency_key: key("loss"),
            card_number: number.to_string(),
            loss_kind: reg::LossKind::Written as i32,
            teller_id: teller.clone(),
            branch_id: branch.clone(),
            holder_id_checked: true,
        })
        .await
        .map(|_| ());
    shared.note(Operation::Loss, started, &result).await;
    if result.is_err() {
        return;
    }
    shared.keep(RecordKind::Loss { written: true }, number, &teller, &branch).await;

    if !chosen(i / 3, shared.config.unlock_percent) {
        return;
    }
    shared.pace.wait().await;
    let started = Instant::now();
    let result = adapter
        .unlock_financial(bank::UnlockFinancialRequest {
            idempotency_key: key("unlock"),
            card_number: number.to_string(),
            teller_id: teller.clone(),
            branch_id: branch.clone(),
            holder_id_checked: true,
            card_presented: true,
        })
        .await
        .map(|_| ());
    shared.note(Operation::Unlock, started, &result).await;
    if result.is_ok() {
        shared.keep(RecordKind::Unlock, number, &teller, &branch).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chosen_share_is_spread_evenly() {
        let lost = (0..1000).filter(|i| chosen(*i, 20)).count();
        assert_eq!(lost, 200);
        assert_eq!((0..100).filter(|i| chosen(*i, 0)).count(), 0);
        assert_eq!((0..100).filter(|i| chosen(*i, 100)).count(), 100);
    }
}
