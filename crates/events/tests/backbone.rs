//! The backbone's promises, against librdkafka's mock broker always and against a real Kafka-protocol
//! broker when `SOCIALCARD_TEST_KAFKA_BROKERS` is set (CI sets it): per-card order, no loss when the
//! relay dies between produce and mark, no double effect when a consumer dies between its transaction
//! and the offset commit, dead letters, and a broker that goes away and comes back. And the embedded
//! log with the same semantics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use socialcard_events::direct::DirectError;
use socialcard_events::embedded::{EmbeddedConsumer, SqliteOffsets};
use socialcard_events::group::{GroupError, GroupWriter};
use socialcard_events::kafka::{ConsumerConfig, KafkaConfig, KafkaConsumer, KafkaPublisher};
use socialcard_events::outbox::SqliteOutbox;
use socialcard_events::{Applied, Envelope, EventError, Handler, HandlerError, Outbox, OutboxRow, Publish};
use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use tokio::sync::watch;

// ---------- fixtures ----------

struct TempDir(std::path::PathBuf);
impl TempDir {
    fn new() -> Self {
        let d = std::env::temp_dir().join(format!("socialcard-events-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn sqlite(dir: &TempDir, name: &str) -> SqlitePool {
    let opts = SqliteConnectOptions::new()
        .filename(dir.0.join(name))
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    SqlitePoolOptions::new().max_connections(4).connect_with(opts).await.unwrap()
}

/// A producing service's database: the outbox table as services create it.
async fn source_db(dir: &TempDir) -> SqlitePool {
    let pool = sqlite(dir, "source.db").await;
    sqlx::query(
        "CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE, topic TEXT NOT NULL,
         event_key TEXT NOT NULL, event_type TEXT NOT NULL, payload BLOB NOT NULL, occurred_at INTEGER NOT NULL,
         bucket INTEGER NOT NULL, source TEXT NOT NULL, traceparent TEXT, published_at INTEGER)",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool
}

async fn append(pool: &SqlitePool, topic: &str, key: &str, payload: &str) {
    sqlx::query(
        "INSERT INTO outbox (event_id, topic, event_key, event_type, payload, occurred_at, bucket, source, traceparent)
         VALUES ($1, $2, $3, 'test.v1.Counted', $4, $5, $6, 'test', '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01')",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(topic)
    .bind(key)
    .bind(payload.as_bytes())
    .bind(time::OffsetDateTime::now_utc().unix_timestamp() * 1_000_000)
    .bind(socialcard_events::bucket_of(key))
    .execute(pool)
    .await
    .unwrap();
}

/// `per_key` events for each of `keys` cards, interleaved, payload `<key>:<n>`.
async fn append_interleaved(pool: &SqlitePool, topic: &str, keys: usize, per_key: usize) {
    for n in 1..=per_key {
        for k in 0..keys {
            append(pool, topic, &format!("card-{k}"), &format!("card-{k}:{n}")).await;
        }
    }
}

/// A consumer whose effect is a ledger row per event and a per-key counter, written with the inbox row
/// in one transaction. It records order violations instead of hiding them.
struct Ledger {
    pool: SqlitePool,
    duplicates: AtomicUsize,
    /// With the batch form: each poll's events in one transaction.
    batch: bool,
    /// Transactions committed.
    commits: AtomicUsize,
    /// Batches still to refuse with a transient error (a database briefly busy).
    flaky_batches: AtomicUsize,
}

impl Ledger {
    async fn new(dir: &TempDir, name: &str) -> Arc<Ledger> {
        let pool = sqlite(dir, name).await;
        sqlx::raw_sql(socialcard_events::inbox::SQLITE_SCHEMA).execute(&pool).await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE applied (event_id TEXT PRIMARY KEY, event_key TEXT NOT NULL, n INTEGER NOT NULL);
             CREATE TABLE last_seen (event_key TEXT PRIMARY KEY, n INTEGER NOT NULL);
             CREATE TABLE violations (event_id TEXT NOT NULL, what TEXT NOT NULL);",
        )
        .execute(&pool)
        .await
        .unwrap();
        Arc::new(Ledger {
            pool,
            duplicates: AtomicUsize::new(0),
            batch: false,
            commits: AtomicUsize::new(0),
            flaky_batches: AtomicUsize::new(0),
        })
    }

    async fn batched(dir: &TempDir, name: &str) -> Arc<Ledger> {
        let plain = Ledger::new(dir, name).await;
        Arc::new(Ledger {
            pool: plain.pool.clone(),
            duplicates: AtomicUsize::new(0),
            batch: true,
            commits: AtomicUsize::new(0),
            flaky_batches: AtomicUsize::new(0),
        })
    }

    async fn count(&self, table: &str) -> i64 {
        sqlx::query(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) AS n FROM {table}")))
            .fetch_one(&self.pool)
            .await
            .unwrap()
            .try_get("n")
            .unwrap()
    }

    async fn wait_for(&self, applied: i64, within: Duration) {
        let start = Instant::now();
        while self.count("applied").await < applied {
            assert!(start.elapsed() < within, "only {} of {applied} applied", self.count("applied").await);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Ledger {
    /// One event's effect and inbox row inside `tx`.
    async fn apply_in(tx: &mut sqlx::SqliteConnection, event: &Envelope) -> Result<Applied, HandlerError> {
        let body = String::from_utf8(event.payload.clone()).map_err(|e| HandlerError::Permanent(e.to_string()))?;
        if body == "poison" {
            return Err(HandlerError::Permanent("poison payload".into()));
        }
        let (key, n) = body.rsplit_once(':').ok_or_else(|| HandlerError::Permanent("not key:n".into()))?;
        let n: i64 = n.parse().map_err(|_| HandlerError::Permanent("n is no number".into()))?;
        let t = |e: sqlx::Error| HandlerError::Transient(e.to_string());
        if !socialcard_events::inbox::record_sqlite(&mut *tx, &event.id).await.map_err(t)? {
            return Ok(Applied::Duplicate);
        }
        let last: Option<i64> = sqlx::query("SELECT n FROM last_seen WHERE event_key = $1")
            .bind(key)
            .fetch_optional(&mut *tx)
            .await
            .map_err(t)?
            .map(|r| r.get("n"));
        if last.is_some_and(|l| n != l + 1) || (last.is_none() && n != 1) {
            sqlx::query("INSERT INTO violations (event_id, what) VALUES ($1, $2)")
                .bind(&event.id)
                .bind(format!("{key}: {n} after {last:?}"))
                .execute(&mut *tx)
                .await
                .map_err(t)?;
        }
        sqlx::query(
            "INSERT INTO last_seen (event_key, n) VALUES ($1, $2) ON CONFLICT (event_key) DO UPDATE SET n = excluded.n",
        )
        .bind(key)
        .bind(n)
        .execute(&mut *tx)
        .await
        .map_err(t)?;
        sqlx::query("INSERT INTO applied (event_id, event_key, n) VALUES ($1, $2, $3)")
            .bind(&event.id)
            .bind(key)
            .bind(n)
            .execute(&mut *tx)
            .await
            .map_err(t)?;
        Ok(Applied::Applied)
    }

    fn committed(&self, answers: &[Applied]) {
        self.commits.fetch_add(1, Ordering::SeqCst);
        let duplicates = answers.iter().filter(|a| **a == Applied::Duplicate).count();
        self.duplicates.fetch_add(duplicates, Ordering::SeqCst);
    }
}

#[async_trait]
impl Handler for Ledger {
    async fn handle(&self, event: &Envelope) -> Result<Applied, HandlerError> {
        let t = |e: sqlx::Error| HandlerError::Transient(e.to_string());
        let mut tx = self.pool.begin().await.map_err(t)?;
        let applied = Self::apply_in(&mut tx, event).await?;
        tx.commit().await.map_err(t)?;
        self.committed(&[applied]);
        Ok(applied)
    }

    fn has_batch_form(&self) -> bool {
        self.batch
    }

    async fn handle_batch(&self, events: &[Envelope]) -> Option<Result<Vec<Applied>, HandlerError>> {
        if !self.batch {
            return None;
        }
        if self.flaky_batches.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Some(Err(HandlerError::Transient("database is locked".into())));
        }
        let t = |e: sqlx::Error| HandlerError::Transient(e.to_string());
        Some(
            async {
                let mut tx = self.pool.begin().await.map_err(t)?;
                let mut answers = Vec::with_capacity(events.len());
                for event in events {
                    answers.push(Self::apply_in(&mut tx, event).await?);
                }
                tx.commit().await.map_err(t)?;
                self.committed(&answers);
                Ok(answers)
            }
            .await,
        )
    }
}

/// Publishes through Kafka, then "dies" before the rows are marked (once).
struct DiesAfterPublish {
    inner: KafkaPublisher,
    died: AtomicBool,
}

#[async_trait]
impl Publish for DiesAfterPublish {
    async fn publish(&self, rows: &[OutboxRow]) -> Result<(), EventError> {
        self.inner.publish(rows).await?;
        if !self.died.swap(true, Ordering::SeqCst) {
            return Err(EventError::Kafka("relay killed after produce, before mark".into()));
        }
        Ok(())
    }
}

/// Publishes through Kafka and counts the rows it was handed.
struct Counting {
    inner: KafkaPublisher,
    rows: AtomicUsize,
}

#[async_trait]
impl Publish for Counting {
    async fn publish(&self, rows: &[OutboxRow]) -> Result<(), EventError> {
        self.inner.publish(rows).await?;
        self.rows.fetch_add(rows.len(), Ordering::SeqCst);
        Ok(())
    }
}

struct Broker {
    mock: Option<MockCluster<'static, rdkafka::producer::DefaultProducerContext>>,
    bootstrap: String,
}

impl Broker {
    fn mock() -> Broker {
        let mock = MockCluster::new(1).unwrap();
        let bootstrap = mock.bootstrap_servers();
        Broker { mock: Some(mock), bootstrap }
    }

    fn real() -> Option<Broker> {
        let b = std::env::var("SOCIALCARD_TEST_KAFKA_BROKERS").ok().filter(|b| !b.is_empty())?;
        Some(Broker { mock: None, bootstrap: b })
    }

    fn config(&self) -> KafkaConfig {
        let mut c = KafkaConfig::new(self.bootstrap.clone());
        c.partitions = 4;
        c.message_timeout = Duration::from_secs(5);
        c
    }

    /// A fresh topic (and its dead-letter topic) for one test.
    async fn topic(&self) -> String {
        let topic = format!("test-{}", uuid::Uuid::new_v4().simple());
        let dlt = socialcard_events::topics::dead_letter(&topic);
        match &self.mock {
            Some(m) => {
                m.create_topic(&topic, 4, 1).unwrap();
                m.create_topic(&dlt, 1, 1).unwrap();
            }
            None => socialcard_events::kafka::ensure_topics(&self.config(), &[&topic, &dlt]).await.unwrap(),
        }
        topic
    }
}

async fn wait_until(mut done: impl FnMut() -> bool, what: &str) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn relay_until_empty(outbox: &dyn Outbox, publisher: &dyn Publish) {
    let start = Instant::now();
    while outbox.backlog().await.unwrap() > 0 {
        assert!(start.elapsed() < Duration::from_secs(60), "relay did not drain the outbox");
        if let Err(e) = outbox.relay_once(100, publisher).await {
            eprintln!("relay attempt failed: {e}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn spawn_consumer(
    broker: &Broker,
    group: &str,
    topic: &str,
    handler: Arc<dyn Handler>,
) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let mut cfg = ConsumerConfig::new(group, &[topic]);
    cfg.max_attempts = 2;
    cfg.retry_backoff = Duration::from_millis(10);
    let consumer = KafkaConsumer::new(&broker.config(), cfg, handler).unwrap();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        consumer.run(stopped).await.unwrap();
    });
    (stop, task)
}

async fn stop(consumer: (watch::Sender<bool>, tokio::task::JoinHandle<()>)) {
    consumer.0.send(true).unwrap();
    consumer.1.await.unwrap();
}

/// A consumer group's lag as the broker reports it, sampled every 100 ms on a thread of its own.
struct LagSampler {
    metrics: socialcard_events::Metrics,
    stop: watch::Sender<bool>,
    thread: std::thread::JoinHandle<()>,
}

impl LagSampler {
    fn start(broker: &Broker, group: &str, topic: &str) -> LagSampler {
        let metrics = socialcard_events::Metrics::new();
        let (stop, stopped) = watch::channel(false);
        let thread = socialcard_events::kafka::spawn_lag_sampler(
            &broker.config(),
            group,
            &[topic],
            metrics.clone(),
            Duration::from_millis(100),
            stopped,
        )
        .unwrap();
        LagSampler { metrics, stop, thread }
    }

    fn lag(&self, group: &str, topic: &str) -> Option<i64> {
        self.metrics.value("socialcard_consumer_lag", &[("group", group), ("topic", topic)])
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join().unwrap()).await.unwrap();
    }
}

// ---------- the scenarios, each run on the mock and on a real broker ----------

macro_rules! on_every_broker {
    ($($test:ident),* $(,)?) => {
        mod mock {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let broker = super::Broker::mock();
                    super::$test(&broker).await;
                }
            )*
        }
        mod real_broker {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    match super::Broker::real() {
                        Some(broker) => super::$test(&broker).await,
                        None => eprintln!("skipped: set SOCIALCARD_TEST_KAFKA_BROKERS to run against a real broker"),
                    }
                }
            )*
        }
    };
}

on_every_broker!(
    per_card_order_and_one_effect_each,
    relay_killed_between_produce_and_mark_loses_nothing,
    consumer_killed_between_transaction_and_commit_has_no_double_effect,
    poison_messages_are_dead_lettered_and_the_consumer_moves_on,
    a_batched_consumer_commits_few_transactions_in_order_and_sets_poison_aside,
);

async fn per_card_order_and_one_effect_each(broker: &Broker) {
    let dir = TempDir::new();
    let source = source_db(&dir).await;
    let topic = broker.topic().await;
    append_interleaved(&source, &topic, 8, 25).await;
    let outbox = SqliteOutbox::new(source.clone());
    relay_until_empty(&outbox, &KafkaPublisher::new(&broker.config()).unwrap()).await;

    // The group's lag, sampled from the broker: everything before the consumer starts, nothing after.
    let group = format!("g-{topic}");
    let sampler = LagSampler::start(broker, &group, &topic);
    let lag = || sampler.lag(&group, &topic);
    wait_until(|| lag() == Some(200), "lag 200 before consuming").await;

    let ledger = Ledger::new(&dir, "ledger.db").await;
    let consumer = spawn_consumer(broker, &group, &topic, ledger.clone());
    ledger.wait_for(200, Duration::from_secs(60)).await;
    wait_until(|| lag() == Some(0), "lag 0 once everything is committed").await;
    stop(consumer).await;
    sampler.stop().await;
    assert_eq!(ledger.count("violations").await, 0, "a card's events arrived out of order");
    assert_eq!(ledger.count("applied").await, 200);
    assert_eq!(ledger.duplicates.load(Ordering::SeqCst), 0);
}

async fn relay_killed_between_produce_and_mark_loses_nothing(broker: &Broker) {
    let dir = TempDir::new();
    let source = source_db(&dir).await;
    let topic = broker.topic().await;
    append_interleaved(&source, &topic, 4, 10).await;
    // Rows marked as the services mark them: through the database's group writer.
    let outbox = SqliteOutbox::new(source.clone()).with_group(GroupWriter::spawn(source.clone(), 64));
    let dying =
        DiesAfterPublish { inner: KafkaPublisher::new(&broker.config()).unwrap(), died: AtomicBool::new(false) };
    // The first batch reaches Kafka but is not marked: it stays in the outbox and is sent again.
    assert!(outbox.relay_once(25, &dying).await.is_err());
    assert_eq!(outbox.backlog().await.unwrap(), 40);
    relay_until_empty(&outbox, &dying).await;

    let ledger = Ledger::new(&dir, "ledger.db").await;
    let consumer = spawn_consumer(broker, &format!("g-{topic}"), &topic, ledger.clone());
    ledger.wait_for(40, Duration::from_secs(60)).await;
    let start = Instant::now();
    while ledger.duplicates.load(Ordering::SeqCst) < 25 && start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop(consumer).await;
    assert_eq!(ledger.count("applied").await, 40, "every event applied exactly once");
    assert_eq!(ledger.duplicates.load(Ordering::SeqCst), 25, "the republished batch was absorbed by the inbox");
    assert_eq!(ledger.count("violations").await, 0);
}

async fn consumer_killed_between_transaction_and_commit_has_no_double_effect(broker: &Broker) {
    let dir = TempDir::new();
    let source = source_db(&dir).await;
    let topic = broker.topic().await;
    append_interleaved(&source, &topic, 1, 10).await;
    let outbox = SqliteOutbox::new(source.clone());
    relay_until_empty(&outbox, &KafkaPublisher::new(&broker.config()).unwrap()).await;
    let ledger = Ledger::new(&dir, "ledger.db").await;
    let group = format!("g-{topic}");

    {
        // The first member applies one event and dies before committing its offset.
        let first =
            KafkaConsumer::new(&broker.config(), ConsumerConfig::new(&group, &[&topic]), ledger.clone()).unwrap();
        let m = tokio::time::timeout(Duration::from_secs(30), first.consumer().recv()).await.unwrap().unwrap();
        assert_eq!(first.handle_only(&m).await.unwrap(), Some(Applied::Applied));
        drop(m);
        first.consumer().unsubscribe();
    }
    assert_eq!(ledger.count("applied").await, 1);

    // The next member gets the same event again; the inbox makes it a no-op.
    let consumer = spawn_consumer(broker, &group, &topic, ledger.clone());
    ledger.wait_for(10, Duration::from_secs(60)).await;
    stop(consumer).await;
    assert_eq!(ledger.count("applied").await, 10);
    assert_eq!(ledger.duplicates.load(Ordering::SeqCst), 1, "the redelivered event had no second effect");
    assert_eq!(ledger.count("violations").await, 0);
}

async fn poison_messages_are_dead_lettered_and_the_consumer_moves_on(broker: &Broker) {
    let dir = TempDir::new();
    let source = source_db(&dir).await;
    let topic = broker.topic().await;
    append(&source, &topic, "card-0", "card-0:1").await;
    append(&source, &topic, "card-0", "poison").await;
    append(&source, &topic, "card-0", "card-0:2").await;
    let outbox = SqliteOutbox::new(source.clone());
    relay_until_empty(&outbox, &KafkaPublisher::new(&broker.config()).unwrap()).await;
    // And a message that is not an event at all: no envelope headers.
    let raw: FutureProducer = ClientConfig::new().set("bootstrap.servers", &broker.bootstrap).create().unwrap();
    raw.send(FutureRecord::to(&topic).key("card-0").payload("garbage"), Duration::from_secs(10)).await.unwrap();

    let ledger = Ledger::new(&dir, "ledger.db").await;
    let consumer = spawn_consumer(broker, &format!("g-{topic}"), &topic, ledger.clone());
    ledger.wait_for(2, Duration::from_secs(60)).await;

    let dlt = socialcard_events::topics::dead_letter(&topic);
    let reader: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &broker.bootstrap)
        .set("group.id", format!("dlt-{topic}"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    reader.subscribe(&[&dlt]).unwrap();
    let mut errors = Vec::new();
    for _ in 0..2 {
        let m = tokio::time::timeout(Duration::from_secs(30), reader.recv()).await.unwrap().unwrap();
        let headers = m.headers().unwrap();
        let error = headers
            .iter()
            .find(|h| h.key == "dlt_error")
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned());
        let source_topic = headers
            .iter()
            .find(|h| h.key == "dlt_topic")
            .and_then(|h| h.value)
            .map(|v| String::from_utf8_lossy(v).into_owned());
        assert_eq!(source_topic.as_deref(), Some(topic.as_str()));
        errors.push((error.unwrap(), m.payload().map(<[u8]>::to_vec).unwrap_or_default()));
    }
    drop(reader);
    stop(consumer).await;
    errors.sort();
    assert!(errors.iter().any(|(e, p)| e.contains("ce_") && p == b"garbage"), "{errors:?}");
    assert!(errors.iter().any(|(e, p)| e.contains("poison") && p == b"poison"), "{errors:?}");
    assert_eq!(ledger.count("applied").await, 2, "the events around the poison were applied");
    assert_eq!(ledger.count("violations").await, 0);
}

/// A handler with a batch form gets what the consumer has fetched in one transaction: fewer commits
/// than events, each card's order kept, a poison event (which fails its batch) dead-lettered alone with
/// its batch's other events applied, and the offsets committed past everything.
async fn a_batched_consumer_commits_few_transactions_in_order_and_sets_poison_aside(broker: &Broker) {
    let dir = TempDir::new();
    let source = source_db(&dir).await;
    let topic = broker.topic().await;
    append_interleaved(&source, &topic, 8, 20).await;
    append(&source, &topic, "card-0", "poison").await;
    append_interleaved_from(&source, &topic, 8, 21, 25).await;
    let outbox = SqliteOutbox::new(source.clone());
    relay_until_empty(&outbox, &KafkaPublisher::new(&broker.config()).unwrap()).await;
    let raw: FutureProducer = ClientConfig::new().set("bootstrap.servers", &broker.bootstrap).create().unwrap();
    raw.send(FutureRecord::to(&topic).key("card-1").payload("garbage"), Duration::from_secs(10)).await.unwrap();

    let group = format!("g-{topic}");
    let sampler = LagSampler::start(broker, &group, &topic);
    let lag = || sampler.lag(&group, &topic);

    let ledger = Ledger::batched(&dir, "ledger.db").await;
    let consumer = spawn_consumer(broker, &group, &topic, ledger.clone());
    ledger.wait_for(200, Duration::from_secs(60)).await;
    wait_until(|| lag() == Some(0), "lag 0: offsets committed past every message").await;
    stop(consumer).await;
    sampler.stop().await;

    assert_eq!(ledger.count("applied").await, 200);
    assert_eq!(ledger.count("violations").await, 0, "a card's events were applied out of order");
    assert_eq!(ledger.duplicates.load(Ordering::SeqCst), 0);
    let commits = ledger.commits.load(Ordering::SeqCst);
    assert!(commits < 100, "{commits} transactions for 200 events: the consumer did not batch");
}

// ---------- broker outages: the mock broker can be taken down ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_for_seconds_then_back_loses_and_reorders_nothing() {
    let broker = Broker::mock();
    let dir = TempDir::new();
    let source = source_db(&dir).await;
    let topic = broker.topic().await;
    let outbox = Arc::new(SqliteOutbox::new(source.clone()));
    let mut config = broker.config();
    config.message_timeout = Duration::from_secs(2);
    let publisher = Arc::new(KafkaPublisher::new(&config).unwrap());
    let metrics = socialcard_events::Metrics::new();
    let backlog = || metrics.value("socialcard_outbox_backlog", &[("source", "test")]);
    let (stop_relay, relay_stopped) = watch::channel(false);
    let relay = tokio::spawn(socialcard_events::relay::run(
        outbox.clone(),
        publisher,
        socialcard_events::relay::RelayConfig {
            source: "test".into(),
            metrics: Some(metrics.clone()),
            batch: 16,
            idle: Duration::from_millis(5),
            max_backoff: Duration::from_millis(500),
        },
        relay_stopped,
    ));

    append_interleaved(&source, &topic, 3, 5).await;
    let mock = broker.mock.as_ref().unwrap();
    mock.broker_down(1).unwrap();
    append_interleaved_from(&source, &topic, 3, 6, 12).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(outbox.backlog().await.unwrap() > 0, "nothing can be published while the broker is down");
    wait_until(|| backlog().is_some_and(|b| b > 0), "the backlog gauge shows the stuck rows").await;
    mock.broker_up(1).unwrap();
    let start = Instant::now();
    while outbox.backlog().await.unwrap() > 0 {
        assert!(start.elapsed() < Duration::from_secs(60), "the relay did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_until(|| backlog() == Some(0), "the backlog gauge drains to 0").await;
    stop_relay.send(true).unwrap();
    relay.await.unwrap();

    let ledger = Ledger::new(&dir, "ledger.db").await;
    let consumer = spawn_consumer(&broker, &format!("g-{topic}"), &topic, ledger.clone());
    ledger.wait_for(36, Duration::from_secs(60)).await;
    stop(consumer).await;
    assert_eq!(ledger.count("applied").await, 36);
    assert_eq!(ledger.count("violations").await, 0, "order kept across the outage");
}

async fn append_interleaved_from(pool: &SqlitePool, topic: &str, keys: usize, from: usize, to: usize) {
    for n in from..=to {
        for k in 0..keys {
            append(pool, topic, &format!("card-{k}"), &format!("card-{k}:{n}")).await;
        }
    }
}

// ---------- the embedded log ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_log_delivers_in_order_once_and_survives_restart() {
    let dir = TempDir::new();
    let source = source_db(&dir).await;
    let topic = "socialcard.card.v1";
    append_interleaved(&source, topic, 4, 10).await;
    append(&source, "socialcard.other.v1", "card-0", "card-0:99").await;
    append(&source, topic, "card-0", "poison").await;
    let log: Arc<dyn Outbox> = Arc::new(SqliteOutbox::new(source.clone()));
    let ledger = Ledger::new(&dir, "ledger.db").await;
    let offsets = SqliteOffsets::new(ledger.pool.clone());
    let mut consumer = EmbeddedConsumer::new("ledger", topic, log.clone(), offsets.clone(), ledger.clone());
    consumer.retry_backoff = Duration::from_millis(1);
    let metrics = socialcard_events::Metrics::new();
    consumer.metrics = Some(metrics.clone());

    assert_eq!(consumer.poll_once().await.unwrap(), 41);
    assert_eq!(ledger.count("applied").await, 40);
    assert_eq!(offsets.dead_letter_count("ledger").await.unwrap(), 1, "the poison event was dead-lettered");
    assert_eq!(metrics.value("socialcard_events_applied_total", &[("group", "ledger")]), Some(40));
    assert_eq!(metrics.value("socialcard_events_dead_lettered_total", &[("group", "ledger")]), Some(1));
    assert_eq!(metrics.value("socialcard_consumer_lag", &[("group", "ledger"), ("topic", topic)]), Some(0));

    // A restart resumes from the stored position: new events only.
    append_interleaved_from(&source, topic, 4, 11, 12).await;
    let restarted = EmbeddedConsumer::new("ledger", topic, log.clone(), offsets.clone(), ledger.clone());
    assert_eq!(restarted.poll_once().await.unwrap(), 8);
    assert_eq!(ledger.count("applied").await, 48);

    // A crash after the handler's transaction but before the position was stored redelivers: no effect.
    let position = offsets.position("ledger", topic).await.unwrap();
    offsets.commit("ledger", topic, position - 3).await.unwrap();
    assert_eq!(restarted.poll_once().await.unwrap(), 3);
    assert_eq!(ledger.count("applied").await, 48);
    assert_eq!(ledger.duplicates.load(Ordering::SeqCst), 3);
    assert_eq!(ledger.count("violations").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_log_keeps_a_dead_letter_once_when_its_poll_is_delivered_again() {
    let dir = TempDir::new();
    let source = source_db(&dir).await;
    let topic = "socialcard.card.v1";
    append(&source, topic, "card-0", "card-0:1").await;
    append(&source, topic, "card-0", "poison").await;
    append(&source, topic, "card-0", "card-0:2").await;
    let log: Arc<dyn Outbox> = Arc::new(SqliteOutbox::new(source.clone()));
    let ledger = Ledger::new(&dir, "ledger.db").await;
    let offsets = SqliteOffsets::new(ledger.pool.clone());
    let mut consumer = EmbeddedConsumer::new("ledger", topic, log, offsets.clone(), ledger.clone());
    consumer.retry_backoff = Duration::from_millis(1);
    assert_eq!(consumer.poll_once().await.unwrap(), 3);
    assert_eq!(offsets.dead_letter_count("ledger").await.unwrap(), 1);

    // The poll delivered again, as after a crash between its dead letter and its position: the poison
    // event fails again and stays one dead letter; the others are duplicates.
    offsets.commit("ledger", topic, 0).await.unwrap();
    assert_eq!(consumer.poll_once().await.unwrap(), 3);
    assert_eq!(offsets.dead_letter_count("ledger").await.unwrap(), 1, "the poison event is kept once");
    assert_eq!(ledger.count("applied").await, 2);
    assert_eq!(ledger.duplicates.load(Ordering::SeqCst), 2);
    // Another consumer of the same database keeps its own dead letter of the same event.
    let mut other = EmbeddedConsumer::new(
        "audit",
        topic,
        Arc::new(SqliteOutbox::new(source.clone())),
        offsets.clone(),
        ledger.clone(),
    );
    other.retry_backoff = Duration::from_millis(1);
    assert_eq!(other.poll_once().await.unwrap(), 3);
    assert_eq!(offsets.dead_letter_count("audit").await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_log_applies_a_poll_in_one_transaction_and_a_poison_event_alone() {
    let dir = TempDir::new();
    let source = source_db(&dir).await;
    let topic = "socialcard.card.v1";
    append_interleaved(&source, topic, 4, 10).await;
    let log: Arc<dyn Outbox> = Arc::new(SqliteOutbox::new(source.clone()));
    let ledger = Ledger::batched(&dir, "ledger.db").await;
    let offsets = SqliteOffsets::new(ledger.pool.clone());
    let mut consumer = EmbeddedConsumer::new("ledger", topic, log.clone(), offsets.clone(), ledger.clone());
    consumer.retry_backoff = Duration::from_millis(1);

    // A batch refused twice with a transient error is retried whole, not split.
    ledger.flaky_batches.store(2, Ordering::SeqCst);
    assert_eq!(consumer.poll_once().await.unwrap(), 40);
    assert_eq!(ledger.flaky_batches.load(Ordering::SeqCst), 0, "both transient refusals were met");
    assert_eq!(ledger.count("applied").await, 40);
    assert_eq!(ledger.commits.load(Ordering::SeqCst), 1, "one transaction for the poll's 40 events");

    // A poison event fails its batch, which is rolled back and split until the poison is alone: halves
    // [0, 4) and [4, 9); [4, 9) fails again: [4, 6) and [6, 9); [4, 6) fails: the poison and one event.
    append_interleaved_from(&source, topic, 4, 11, 11).await;
    append(&source, topic, "card-0", "poison").await;
    append_interleaved_from(&source, topic, 4, 12, 12).await;
    assert_eq!(consumer.poll_once().await.unwrap(), 9);
    assert_eq!(ledger.count("applied").await, 48);
    assert_eq!(offsets.dead_letter_count("ledger").await.unwrap(), 1, "the poison event alone was dead-lettered");
    assert_eq!(ledger.commits.load(Ordering::SeqCst), 1 + 3, "[0, 4), [5, 6) and [6, 9) committed");

    // Redelivered after a crash before the position was stored: all duplicates, in one transaction.
    let position = offsets.position("ledger", topic).await.unwrap();
    offsets.commit("ledger", topic, position - 4).await.unwrap();
    assert_eq!(consumer.poll_once().await.unwrap(), 4);
    assert_eq!(ledger.count("applied").await, 48);
    assert_eq!(ledger.duplicates.load(Ordering::SeqCst), 4);
    assert_eq!(ledger.commits.load(Ordering::SeqCst), 5);
    assert_eq!(ledger.count("violations").await, 0);
}

// ---------- several relays on one PostgreSQL outbox ----------

/// Three relays drain one PostgreSQL outbox at once (advisory-locked buckets, `FOR UPDATE SKIP LOCKED`):
/// every event is published once and each card's events stay in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_relays_on_postgres_keep_each_cards_order() {
    let Some(base) = std::env::var("SOCIALCARD_TEST_DATABASE_URL").ok().filter(|u| !u.is_empty()) else {
        eprintln!("skipped: set SOCIALCARD_TEST_DATABASE_URL to run against PostgreSQL");
        return;
    };
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::PgPool::connect(&base).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&admin).await.unwrap();
    let sep = if base.contains('?') { '&' } else { '?' };
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(8)
        .connect(&format!("{base}{sep}options=-c%20search_path%3D{schema}"))
        .await
        .unwrap();
    sqlx::query(
        "CREATE TABLE outbox (seq BIGSERIAL PRIMARY KEY, event_id TEXT NOT NULL UNIQUE, topic TEXT NOT NULL,
         event_key TEXT NOT NULL, event_type TEXT NOT NULL, payload BYTEA NOT NULL, occurred_at BIGINT NOT NULL,
         bucket INTEGER NOT NULL, source TEXT NOT NULL, traceparent TEXT, published_at BIGINT)",
    )
    .execute(&pool)
    .await
    .unwrap();

    let broker = Broker::mock();
    let topic = broker.topic().await;
    for n in 1..=30 {
        for k in 0..8 {
            let key = format!("card-{k}");
            sqlx::query(
                "INSERT INTO outbox (event_id, topic, event_key, event_type, payload, occurred_at, bucket, source)
                 VALUES ($1, $2, $3, 'test.v1.Counted', $4, 0, $5, 'test')",
            )
            .bind(uuid::Uuid::now_v7().to_string())
            .bind(&topic)
            .bind(&key)
            .bind(format!("{key}:{n}").into_bytes())
            .bind(socialcard_events::bucket_of(&key))
            .execute(&pool)
            .await
            .unwrap();
        }
    }
    let outbox: Arc<dyn Outbox> = Arc::new(socialcard_events::outbox::PgOutbox::new(pool.clone()));
    let (stop_relays, stopped) = watch::channel(false);
    let mut relays = Vec::new();
    for _ in 0..3 {
        let publisher = Arc::new(KafkaPublisher::new(&broker.config()).unwrap());
        relays.push(tokio::spawn(socialcard_events::relay::run(
            outbox.clone(),
            publisher,
            socialcard_events::relay::RelayConfig { batch: 7, ..Default::default() },
            stopped.clone(),
        )));
    }
    let start = Instant::now();
    while outbox.backlog().await.unwrap() > 0 {
        assert!(start.elapsed() < Duration::from_secs(60), "the relays did not drain the outbox");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop_relays.send(true).unwrap();
    for r in relays {
        r.await.unwrap();
    }

    let dir = TempDir::new();
    let ledger = Ledger::new(&dir, "ledger.db").await;
    let consumer = spawn_consumer(&broker, &format!("g-{topic}"), &topic, ledger.clone());
    ledger.wait_for(240, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop(consumer).await;
    assert_eq!(ledger.count("applied").await, 240);
    assert_eq!(ledger.duplicates.load(Ordering::SeqCst), 0, "no event was published twice");
    assert_eq!(ledger.count("violations").await, 0, "a card's events were reordered across relays");
    pool.close().await;
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&admin).await.unwrap();
}

// ---------- group commit ----------

/// A writer whose loop is held inside a first write until `release` sends, so the writes queued
/// meanwhile form the next group together. (Writes run on a thread allowed to block: `block_in_place`
/// on these multi-threaded runtimes.)
async fn held_writer(pool: &SqlitePool) -> (GroupWriter, std::sync::mpsc::Sender<()>, tokio::task::JoinHandle<()>) {
    let group = GroupWriter::spawn(pool.clone(), 64);
    let (release, held) = std::sync::mpsc::channel::<()>();
    let (entered_tx, entered) = tokio::sync::oneshot::channel();
    let g = group.clone();
    let blocker = tokio::spawn(async move {
        g.run(move |_conn| {
            let _ = entered_tx.send(());
            let _ = held.recv();
            Ok::<_, DirectError>(())
        })
        .await
        .unwrap()
        .unwrap();
    });
    entered.await.unwrap();
    (group, release, blocker)
}

fn insert(
    group: &GroupWriter,
    sql: &'static str,
    id: i64,
) -> tokio::task::JoinHandle<Result<Result<(), DirectError>, GroupError>> {
    let group = group.clone();
    tokio::spawn(async move { group.run(move |conn| conn.execute(sql, &[id.into()]).map(|_| ())).await })
}

async fn queued(group: &GroupWriter, n: usize) {
    let start = Instant::now();
    while group.queued() < n {
        assert!(start.elapsed() < Duration::from_secs(10), "the writes were not queued");
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_write_rolls_back_alone_and_its_group_commits() {
    let dir = TempDir::new();
    let pool = sqlite(&dir, "group.db").await;
    sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY)").execute(&pool).await.unwrap();
    sqlx::query("INSERT INTO t (id) VALUES (2)").execute(&pool).await.unwrap();
    let (group, release, blocker) = held_writer(&pool).await;
    let first = insert(&group, "INSERT INTO t (id) VALUES ($1)", 1);
    queued(&group, 1).await;
    // Writes a row, then trips on a taken id: both of its rows must go, none of the others'.
    let g = group.clone();
    let taken = tokio::spawn(async move {
        g.run(|conn| {
            conn.execute("INSERT INTO t (id) VALUES (10)", &[])?;
            conn.execute("INSERT INTO t (id) VALUES (2)", &[]).map(|_| ())
        })
        .await
    });
    queued(&group, 2).await;
    let last = insert(&group, "INSERT INTO t (id) VALUES ($1)", 3);
    queued(&group, 3).await;
    // The writes wait their turn: nothing of them is visible yet.
    let count = || async { sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM t").fetch_one(&pool).await.unwrap() };
    assert_eq!(count().await, 1);
    release.send(()).unwrap();
    blocker.await.unwrap();
    assert!(matches!(first.await.unwrap(), Ok(Ok(()))));
    match taken.await.unwrap() {
        Ok(Err(e)) => assert!(e.is_unique_violation(), "{e}"),
        other => panic!("the duplicate must be refused alone, got {other:?}"),
    }
    assert!(matches!(last.await.unwrap(), Ok(Ok(()))));
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM t ORDER BY id").fetch_all(&pool).await.unwrap();
    assert_eq!(ids, vec![1, 2, 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_cannot_commit_stores_none_of_its_writes_and_says_so() {
    let dir = TempDir::new();
    let pool = sqlite(&dir, "group.db").await;
    sqlx::query("CREATE TABLE parent (id INTEGER PRIMARY KEY)").execute(&pool).await.unwrap();
    // A deferred foreign key is checked at COMMIT: the bad write passes its own savepoint and sinks
    // the group's COMMIT, which proves the three shared one transaction.
    sqlx::query(
        "CREATE TABLE child (id INTEGER PRIMARY KEY, parent INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let (group, release, blocker) = held_writer(&pool).await;
    let good = insert(&group, "INSERT INTO parent (id) VALUES ($1)", 1);
    queued(&group, 1).await;
    let orphan = insert(&group, "INSERT INTO child (id, parent) VALUES (1, $1)", 99);
    queued(&group, 2).await;
    let also_good = insert(&group, "INSERT INTO parent (id) VALUES ($1)", 2);
    queued(&group, 3).await;
    release.send(()).unwrap();
    blocker.await.unwrap();
    for write in [good, orphan, also_good] {
        let outcome = write.await.unwrap();
        assert!(outcome.is_err(), "no write of an uncommitted group may report success: {outcome:?}");
    }
    let parents: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM parent").fetch_one(&pool).await.unwrap();
    let children: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM child").fetch_one(&pool).await.unwrap();
    assert_eq!((parents, children), (0, 0));
    // The writer goes on: the next write commits.
    let after = insert(&group, "INSERT INTO parent (id) VALUES ($1)", 3);
    assert!(matches!(after.await.unwrap(), Ok(Ok(()))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_panics_is_rolled_back_and_the_writer_goes_on() {
    let dir = TempDir::new();
    let pool = sqlite(&dir, "group.db").await;
    sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY)").execute(&pool).await.unwrap();
    let (group, release, blocker) = held_writer(&pool).await;
    let before = insert(&group, "INSERT INTO t (id) VALUES ($1)", 1);
    queued(&group, 1).await;
    let g = group.clone();
    let panics = tokio::spawn(async move {
        g.run(|conn| {
            conn.execute("INSERT INTO t (id) VALUES (10)", &[])?;
            panic!("a bug in one request");
        })
        .await
    });
    queued(&group, 2).await;
    let after = insert(&group, "INSERT INTO t (id) VALUES ($1)", 2);
    queued(&group, 3).await;
    release.send(()).unwrap();
    blocker.await.unwrap();
    assert!(matches!(before.await.unwrap(), Ok(Ok(()))));
    let outcome: Result<Result<(), DirectError>, GroupError> = panics.await.unwrap();
    assert!(outcome.is_err(), "the panicked write must not report success: {outcome:?}");
    assert!(matches!(after.await.unwrap(), Ok(Ok(()))));
    // Alone in its group too, and the writer still serves the next write.
    let g = group.clone();
    let alone: Result<Result<(), DirectError>, GroupError> = g
        .run(|conn| {
            conn.execute("INSERT INTO t (id) VALUES (11)", &[])?;
            panic!("again");
        })
        .await;
    assert!(alone.is_err());
    assert!(matches!(insert(&group, "INSERT INTO t (id) VALUES ($1)", 3).await.unwrap(), Ok(Ok(()))));
    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM t ORDER BY id").fetch_all(&pool).await.unwrap();
    assert_eq!(ids, vec![1, 2, 3], "the panicked writes' rows were rolled back");
}

/// A writer's pool of one connection, as the services' writers have (the group writer and plain sqlx
/// transactions take turns on it), with a table `t` of who wrote each row.
async fn one_connection_writer_pool(dir: &TempDir) -> SqlitePool {
    let opts = SqliteConnectOptions::new()
        .filename(dir.0.join("group.db"))
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    let pool = socialcard_events::sqlite_pool(1).connect_with(opts).await.unwrap();
    sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY AUTOINCREMENT, who TEXT NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    pool
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writers_pool_serves_its_other_users_while_writes_keep_coming() {
    let dir = TempDir::new();
    let pool = one_connection_writer_pool(&dir).await;
    let group = GroupWriter::spawn(pool.clone(), 64);

    // A chain of writes that never lets the queue run dry: each write, once running, waits until the
    // next one is queued, so every group finds another waiting behind it.
    let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel::<()>();
    let write = |group: &GroupWriter| {
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let (group, entered_tx) = (group.clone(), entered_tx.clone());
        let done = tokio::spawn(async move {
            group
                .run(move |conn| {
                    conn.execute("INSERT INTO t (who) VALUES ('group')", &[])?;
                    let _ = entered_tx.send(());
                    let _ = wait.recv();
                    Ok::<_, DirectError>(())
                })
                .await
        });
        (go, done)
    };
    let (mut go, first) = write(&group);
    let mut done = vec![first];
    entered.recv().await.unwrap();
    let turn = tokio::spawn({
        let pool = pool.clone();
        async move {
            let mut tx = pool.begin().await.unwrap();
            sqlx::query("INSERT INTO t (who) VALUES ('sqlx')").execute(&mut *tx).await.unwrap();
            tx.commit().await.unwrap();
        }
    });
    let start = Instant::now();
    // The sqlx transaction gets the connection (the writer gives it back at least every HOLD) while the
    // chain goes on, rather than after it stops.
    while !turn.is_finished() && start.elapsed() < Duration::from_secs(30) {
        let (next_go, next) = write(&group);
        done.push(next);
        queued(&group, 1).await;
        go.send(()).unwrap();
        go = next_go;
        entered.recv().await.unwrap();
    }
    let got_its_turn = turn.is_finished();
    go.send(()).unwrap();
    for d in done {
        assert!(matches!(d.await.unwrap(), Ok(Ok(()))));
    }
    assert!(got_its_turn, "the pool's other user waited for the writes to stop");
    turn.await.unwrap();
    let sqlx_rows: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM t WHERE who = 'sqlx'").fetch_one(&pool).await.unwrap();
    assert_eq!(sqlx_rows, 1);
}

/// A writer that waits for its caller's next write (postal's streams) gives the connection back to the
/// pool's other users once no write comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lingering_writer_lets_go_when_no_write_follows() {
    let dir = TempDir::new();
    let pool = one_connection_writer_pool(&dir).await;
    // A linger as long as the test's patience: the writer must still let go when its queue is empty
    // and it has held the connection for its hold (20 ms), not wait out the whole linger.
    let group = GroupWriter::lingering(pool.clone(), 64, Duration::from_secs(600));
    for _ in 0..3 {
        group.run(|c| c.execute("INSERT INTO t (who) VALUES ('group')", &[])).await.unwrap().unwrap();
        let turn = tokio::time::timeout(Duration::from_secs(30), async {
            let mut tx = pool.begin().await.unwrap();
            sqlx::query("INSERT INTO t (who) VALUES ('sqlx')").execute(&mut *tx).await.unwrap();
            tx.commit().await.unwrap();
        })
        .await;
        assert!(turn.is_ok(), "the pool's other user never got the connection");
    }
    let rows: Vec<String> = sqlx::query_scalar("SELECT who FROM t ORDER BY id").fetch_all(&pool).await.unwrap();
    assert_eq!(rows, ["group", "sqlx", "group", "sqlx", "group", "sqlx"]);
}

/// A write's savepoint (and a multi-row statement's) journal stays in memory: spilled to temporary
/// files, it cost a postal batch more `pwrite`s than its WAL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_groups_savepoint_journals_stay_in_memory() {
    let dir = TempDir::new();
    let pool = sqlite(&dir, "group.db").await;
    let group = GroupWriter::spawn(pool.clone(), 64);
    let level = group.run(|conn| conn.query_row("PRAGMA temp_store", &[], |r| Ok(r.int(0)))).await.unwrap().unwrap();
    assert_eq!(level, Some(2), "temp_store = MEMORY on the writer's connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpointer_copies_the_wal_back_without_the_writer() {
    let dir = TempDir::new();
    let pool = sqlite(&dir, "group.db").await;
    sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY, data BLOB NOT NULL)").execute(&pool).await.unwrap();
    let group = GroupWriter::spawn(pool.clone(), 64);
    // About 2,500 pages of 4 KiB: past SQLite's default limit (1,000), below the writer's own backstop
    // (10,000), so only the checkpointer copies them into the database file.
    let data = vec![7_u8; 4000];
    for chunk in 0..10 {
        let data = data.clone();
        group
            .run(move |conn| {
                for i in 0..250 {
                    conn.execute(
                        "INSERT INTO t (id, data) VALUES ($1, $2)",
                        &[(chunk * 250 + i).into(), (&data).into()],
                    )?;
                }
                Ok::<_, DirectError>(())
            })
            .await
            .unwrap()
            .unwrap();
    }
    let file = dir.0.join("group.db");
    let start = Instant::now();
    while std::fs::metadata(&file).unwrap().len() < 8 * 1024 * 1024 {
        assert!(start.elapsed() < Duration::from_secs(20), "the WAL was never copied back into the database");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t").fetch_one(&pool).await.unwrap();
    assert_eq!(n, 2500);
}

/// A relay marking through the group writer: its mark waits for the busy writer, then shares a group
/// with the writes queued beside it; a group that cannot commit takes the mark with it, the relay hears
/// so, and the rows are published again next time round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relays_mark_rides_the_writers_group_and_fails_with_it() {
    let broker = Broker::mock();
    let dir = TempDir::new();
    let source = source_db(&dir).await;
    sqlx::raw_sql(
        "CREATE TABLE parent (id INTEGER PRIMARY KEY);
         CREATE TABLE child (id INTEGER PRIMARY KEY, parent INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);",
    )
    .execute(&source)
    .await
    .unwrap();
    let topic = broker.topic().await;
    append_interleaved(&source, &topic, 2, 5).await;
    let (group, release, blocker) = held_writer(&source).await;
    let outbox = Arc::new(SqliteOutbox::new(source.clone()).with_group(group.clone()));
    let publisher =
        Arc::new(Counting { inner: KafkaPublisher::new(&broker.config()).unwrap(), rows: AtomicUsize::new(0) });
    let relay = {
        let (outbox, publisher) = (outbox.clone(), publisher.clone());
        tokio::spawn(async move { outbox.relay_once(100, publisher.as_ref()).await })
    };
    // Published, its mark queued behind the held write; then a write whose group cannot commit (a
    // deferred foreign key, checked at COMMIT).
    queued(&group, 1).await;
    assert_eq!(publisher.rows.load(Ordering::SeqCst), 10);
    let orphan = insert(&group, "INSERT INTO child (id, parent) VALUES (1, $1)", 99);
    queued(&group, 2).await;
    assert_eq!(outbox.backlog().await.unwrap(), 10, "nothing marked while the writer is busy");
    release.send(()).unwrap();
    blocker.await.unwrap();
    assert!(relay.await.unwrap().is_err(), "a mark whose group did not commit is not reported done");
    assert!(orphan.await.unwrap().is_err());
    assert_eq!(outbox.backlog().await.unwrap(), 10, "the rows wait to be published again");
    // Next time round: published again and marked.
    assert_eq!(outbox.relay_once(100, publisher.as_ref()).await.unwrap(), 10);
    assert_eq!(publisher.rows.load(Ordering::SeqCst), 20);
    assert_eq!(outbox.backlog().await.unwrap(), 0);
}

/// An outbox row as a service writes it: through the database's group writer, in a group's commit.
async fn append_through(group: &GroupWriter, topic: &str, key: &str, payload: &str) {
    let (topic, key, payload) = (topic.to_string(), key.to_string(), payload.to_string());
    group
        .run(move |conn| {
            conn.execute(
                "INSERT INTO outbox (event_id, topic, event_key, event_type, payload, occurred_at, bucket, source)
                 VALUES ($1, $2, $3, 'test.v1.Counted', $4, 0, $5, 'test')",
                &[
                    (&uuid::Uuid::now_v7().to_string()).into(),
                    (&topic).into(),
                    (&key).into(),
                    socialcard_events::direct::Value::Blob(payload.as_bytes()),
                    socialcard_events::bucket_of(&key).into(),
                ],
            )
        })
        .await
        .unwrap()
        .unwrap();
}

/// A relay with nothing to publish sleeps up to its idle pause (here ten minutes); a commit of the
/// outbox's group writer wakes it, every time, so a row goes out at once rather than at the next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_relay_wakes_when_its_writer_commits() {
    let broker = Broker::mock();
    let dir = TempDir::new();
    let source = source_db(&dir).await;
    let topic = broker.topic().await;
    let group = GroupWriter::spawn(source.clone(), 8);
    let outbox = Arc::new(SqliteOutbox::new(source.clone()).with_group(group.clone()));
    let publisher =
        Arc::new(Counting { inner: KafkaPublisher::new(&broker.config()).unwrap(), rows: AtomicUsize::new(0) });
    let config = socialcard_events::relay::RelayConfig { idle: Duration::from_secs(600), ..Default::default() };
    let (stop, stopped) = watch::channel(false);
    let relay = tokio::spawn(socialcard_events::relay::run(outbox.clone(), publisher.clone(), config, stopped));
    for n in 1..=3 {
        // Long enough for the relay to find the outbox empty and fall asleep.
        tokio::time::sleep(Duration::from_millis(100)).await;
        append_through(&group, &topic, &format!("card-{n}"), &format!("card-{n}:1")).await;
        wait_until(|| publisher.rows.load(Ordering::SeqCst) == n, "the relay to publish the committed row").await;
    }
    let start = Instant::now();
    while outbox.backlog().await.unwrap() > 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "published rows were not marked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.send(true).unwrap();
    relay.await.unwrap();
}

/// The embedded log's consumer, like the relay, sleeps up to its longest pause (here ten minutes) on an
/// empty log and wakes when the log's writer commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_embedded_consumer_wakes_when_the_logs_writer_commits() {
    let dir = TempDir::new();
    let source = source_db(&dir).await;
    let topic = "socialcard.card.v1";
    let group = GroupWriter::spawn(source.clone(), 8);
    let log: Arc<dyn Outbox> = Arc::new(SqliteOutbox::new(source.clone()).with_group(group.clone()));
    let ledger = Ledger::new(&dir, "ledger.db").await;
    let mut consumer =
        EmbeddedConsumer::new("ledger", topic, log, SqliteOffsets::new(ledger.pool.clone()), ledger.clone());
    consumer.poll = Duration::from_secs(600);
    consumer.max_idle_poll = Duration::from_secs(600);
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(consumer.run(stopped));
    for n in 1..=3 {
        // Long enough for the consumer to find the log empty and fall asleep.
        tokio::time::sleep(Duration::from_millis(100)).await;
        append_through(&group, topic, "card-0", &format!("card-0:{n}")).await;
        ledger.wait_for(n, Duration::from_secs(30)).await;
    }
    assert_eq!(ledger.count("violations").await, 0);
    stop.send(true).unwrap();
    task.await.unwrap();
}
