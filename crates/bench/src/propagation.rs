//! `propagation`: from the commit of a state change (a business row and its outbox row, committed as
//! the registry commits: through a group writer, concurrent changes sharing a SQLite transaction) to
//! the moment a consumer in another database has applied it (effect + inbox row committed), at a fixed
//! offered rate, through the embedded log and through Kafka (relay + consumer group). Baseline: the
//! commit itself, measured in the same run: the floor no propagation can beat.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::mocking::MockCluster;
use socialcard_events::direct::Value;
use socialcard_events::embedded::{EmbeddedConsumer, SqliteOffsets};
use socialcard_events::group::GroupWriter;
use socialcard_events::kafka::{ConsumerConfig, KafkaConfig, KafkaConsumer, KafkaPublisher};
use socialcard_events::outbox::SqliteOutbox;
use socialcard_events::relay::RelayConfig;
use socialcard_events::{Applied, Envelope, EventError, Handler, HandlerError, Outbox, OutboxRow, Publish};
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqliteSynchronous};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::scratch::Dir;
use crate::stats::{Samples, Table};

async fn db(path: std::path::PathBuf, connections: u32) -> anyhow::Result<SqlitePool> {
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        // As the services commit: every commit synced before anything sees it.
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10));
    Ok(socialcard_events::sqlite_pool(connections).connect_with(opts).await?)
}

/// How the consumer commits what it applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    /// One transaction per event, one event at a time (a handler with neither form below).
    Serial,
    /// One event at a time per card, up to 64 cards at once, each event's write through a group writer
    /// (as the registry's handlers apply the bank adapters' and postal's events).
    ByCard,
    /// Every event a poll brings, in one transaction (as ops and postal apply them).
    Batch,
}

impl Form {
    fn label(self) -> &'static str {
        match self {
            Form::Serial => "per event",
            Form::ByCard => "per event, cards at once",
            Form::Batch => "batch",
        }
    }
}

/// The consumer's effect, as a service would apply it: inbox row + effect row, one transaction;
/// then the latency from the event's commit.
struct Applier {
    pool: SqlitePool,
    form: Form,
    /// The target's group writer, for [`Form::ByCard`].
    group: Option<GroupWriter>,
    latencies: Mutex<Samples>,
}

impl Applier {
    /// Effect and inbox row of `event` inside `tx`; false when the inbox had it.
    async fn apply_in(tx: &mut sqlx::SqliteConnection, event: &Envelope) -> Result<bool, sqlx::Error> {
        if !socialcard_events::inbox::record_sqlite(&mut *tx, &event.id).await? {
            return Ok(false);
        }
        sqlx::query("INSERT INTO effects (event_id, card_id) VALUES ($1, $2)")
            .bind(&event.id)
            .bind(&event.subject)
            .execute(&mut *tx)
            .await?;
        Ok(true)
    }

    fn observe<'a>(&self, events: impl Iterator<Item = &'a Envelope>) {
        record_lags(&self.latencies, events);
    }
}

/// Records, for each of `events`, how long ago it was written (its `occurred_at`).
fn record_lags<'a>(samples: &Mutex<Samples>, events: impl Iterator<Item = &'a Envelope>) {
    let now = OffsetDateTime::now_utc();
    let mut samples = samples.lock().unwrap_or_else(|p| p.into_inner());
    for event in events {
        if let Ok(lag) = Duration::try_from(now - event.time) {
            samples.push(lag);
        }
    }
}

#[async_trait]
impl Handler for Applier {
    async fn handle(&self, event: &Envelope) -> Result<Applied, HandlerError> {
        let t = |e: sqlx::Error| HandlerError::Transient(e.to_string());
        if let Some(group) = &self.group {
            let (id, card) = (event.id.clone(), event.subject.clone());
            let new = group
                .run(move |conn| {
                    if !socialcard_events::inbox::record_direct(conn, &id)? {
                        return Ok(false);
                    }
                    conn.execute(
                        "INSERT INTO effects (event_id, card_id) VALUES ($1, $2)",
                        &[(&id).into(), (&card).into()],
                    )?;
                    Ok::<_, socialcard_events::direct::DirectError>(true)
                })
                .await
                .map_err(|e| HandlerError::Transient(e.to_string()))?
                .map_err(|e| HandlerError::Transient(e.to_string()))?;
            if !new {
                return Ok(Applied::Duplicate);
            }
            self.observe(std::iter::once(event));
            return Ok(Applied::Applied);
        }
        let mut tx = self.pool.begin().await.map_err(t)?;
        if !Self::apply_in(&mut tx, event).await.map_err(t)? {
            return Ok(Applied::Duplicate);
        }
        tx.commit().await.map_err(t)?;
        self.observe(std::iter::once(event));
        Ok(Applied::Applied)
    }

    fn concurrency(&self) -> usize {
        match self.form {
            Form::ByCard => socialcard_events::group::MAX_GROUP,
            Form::Serial | Form::Batch => 1,
        }
    }

    fn has_batch_form(&self) -> bool {
        self.form == Form::Batch
    }

    async fn handle_batch(&self, events: &[Envelope]) -> Option<Result<Vec<Applied>, HandlerError>> {
        if self.form != Form::Batch {
            return None;
        }
        let t = |e: sqlx::Error| HandlerError::Transient(e.to_string());
        Some(
            async {
                let mut tx = self.pool.begin().await.map_err(t)?;
                let mut answers = Vec::with_capacity(events.len());
                for event in events {
                    let new = Self::apply_in(&mut tx, event).await.map_err(t)?;
                    answers.push(if new { Applied::Applied } else { Applied::Duplicate });
                }
                tx.commit().await.map_err(t)?;
                self.observe(events.iter().zip(&answers).filter(|(_, a)| **a == Applied::Applied).map(|(e, _)| e));
                Ok(answers)
            }
            .await,
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Embedded,
    Kafka,
}

struct Run {
    path: Path,
    form: Form,
    rate: u32,
    offered: usize,
    /// How long the writer took to commit them all (it falls behind when the rate is beyond it).
    written: Duration,
    applied: usize,
    elapsed: Duration,
    latency: Samples,
    commit: Samples,
    /// From the change (its `occurred_at`, as for `latency`) to the broker's acknowledgement of the
    /// relay's publish (Kafka only).
    published: Samples,
}

/// The relay's publisher, timed: for every row the broker acknowledged, how long after its commit.
struct Timed {
    inner: Arc<dyn Publish>,
    published: Arc<Mutex<Samples>>,
}

#[async_trait]
impl Publish for Timed {
    async fn publish(&self, rows: &[OutboxRow]) -> Result<(), EventError> {
        self.inner.publish(rows).await?;
        record_lags(&self.published, rows.iter().map(|r| &r.envelope));
        Ok(())
    }
}

type Mock = MockCluster<'static, rdkafka::producer::DefaultProducerContext>;

async fn one_run(
    path: Path,
    form: Form,
    rate: u32,
    seconds: f64,
    brokers: &str,
    mock: Option<&Mock>,
) -> anyhow::Result<Run> {
    let dir = Dir::new("propagation")?;
    let source = db(dir.0.join("source.db"), 4).await?;
    sqlx::raw_sql(
        "CREATE TABLE cards (card_id TEXT PRIMARY KEY, version INTEGER NOT NULL);
         CREATE TABLE outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE, topic TEXT NOT NULL,
           event_key TEXT NOT NULL, event_type TEXT NOT NULL, payload BLOB NOT NULL, occurred_at INTEGER NOT NULL,
           bucket INTEGER NOT NULL, source TEXT NOT NULL, traceparent TEXT, published_at INTEGER);
         CREATE INDEX outbox_unpublished ON outbox (bucket, seq) WHERE published_at IS NULL;
         CREATE INDEX outbox_by_topic ON outbox (topic, seq);",
    )
    .execute(&source)
    .await?;
    // Writes go through one connection, in groups, as the registry's do.
    let group = GroupWriter::spawn(db(dir.0.join("source.db"), 1).await?, socialcard_events::group::MAX_GROUP);
    let target = db(dir.0.join("target.db"), 4).await?;
    sqlx::raw_sql(socialcard_events::inbox::SQLITE_SCHEMA).execute(&target).await?;
    sqlx::raw_sql("CREATE TABLE effects (event_id TEXT PRIMARY KEY, card_id TEXT NOT NULL)").execute(&target).await?;
    let applier = Arc::new(Applier {
        pool: target.clone(),
        form,
        group: match form {
            Form::ByCard => {
                Some(GroupWriter::spawn(db(dir.0.join("target.db"), 1).await?, socialcard_events::group::MAX_GROUP))
            }
            Form::Serial | Form::Batch => None,
        },
        latencies: Mutex::new(Samples::default()),
    });
    let topic = format!("bench-{}", uuid::Uuid::new_v4().simple());
    // Published rows are marked through the source's group writer, as the services mark theirs.
    let outbox: Arc<dyn Outbox> = Arc::new(SqliteOutbox::new(source.clone()).with_group(group.clone()));
    let (stop, stopped) = watch::channel(false);
    let published = Arc::new(Mutex::new(Samples::default()));
    let mut tasks = Vec::new();
    match path {
        Path::Embedded => {
            let consumer = EmbeddedConsumer::new(
                "bench",
                &topic,
                outbox.clone(),
                SqliteOffsets::new(target.clone()),
                applier.clone(),
            );
            tasks.push(tokio::spawn(consumer.run(stopped.clone())));
        }
        Path::Kafka => {
            let mut kafka = KafkaConfig::new(brokers);
            kafka.partitions = 8;
            let dlt = socialcard_events::topics::dead_letter(&topic);
            match mock {
                // The mock broker does not implement CreateTopics.
                Some(m) => {
                    m.create_topic(&topic, 8, 1)?;
                    m.create_topic(&dlt, 1, 1)?;
                }
                None => socialcard_events::kafka::ensure_topics(&kafka, &[&topic, &dlt]).await?,
            }
            let publisher =
                Arc::new(Timed { inner: Arc::new(KafkaPublisher::new(&kafka)?), published: published.clone() });
            // The services' relay: batches of 256, 5 ms asleep when the outbox is empty.
            let relay_config = RelayConfig::default();
            tasks.push(tokio::spawn(socialcard_events::relay::run(
                outbox.clone(),
                publisher,
                relay_config,
                stopped.clone(),
            )));
            let consumer = KafkaConsumer::new(&kafka, ConsumerConfig::new("bench", &[&topic]), applier.clone())?;
            let mut s = stopped.clone();
            tasks.push(tokio::spawn(async move {
                let _ = consumer.run(s.clone()).await;
                let _ = s.changed().await;
            }));
        }
    }
    // Warm up: one change must come through (the Kafka consumer has joined its group) before the clock starts.
    commit_change(&group, topic.clone(), "warm-up".into()).await?;
    let warm = Instant::now();
    while applier.latencies.lock().unwrap_or_else(|p| p.into_inner()).len() == 0 {
        anyhow::ensure!(warm.elapsed() < Duration::from_secs(60), "the warm-up event never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    *applier.latencies.lock().unwrap_or_else(|p| p.into_inner()) = Samples::default();
    *published.lock().unwrap_or_else(|p| p.into_inner()) = Samples::default();

    // Offer `rate` state changes per second, paced on a 1 ms tick, each as its own request would make
    // it: concurrently, through the group writer.
    let total = (f64::from(rate) * seconds) as usize;
    let mut commit = Samples::default();
    let mut commits = tokio::task::JoinSet::new();
    let start = Instant::now();
    let mut sent = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while sent < total {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * f64::from(rate)) as usize).min(total);
        while sent < due {
            let (group, topic, card) = (group.clone(), topic.clone(), format!("card-{}", sent % 1000));
            commits.spawn(async move { commit_change(&group, topic, card).await });
            sent += 1;
        }
        while let Some(done) = commits.try_join_next() {
            commit.push(done??);
        }
    }
    while let Some(done) = commits.join_next().await {
        commit.push(done??);
    }
    let written = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(30);
    while applier.latencies.lock().unwrap_or_else(|p| p.into_inner()).len() < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = start.elapsed();
    let _ = stop.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let latency = std::mem::take(&mut *applier.latencies.lock().unwrap_or_else(|p| p.into_inner()));
    let published = std::mem::take(&mut *published.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(Run { path, form, rate, offered: total, written, applied: latency.len(), elapsed, latency, commit, published })
}

/// One state change as a service commits it: its row and its outbox row, committed through a group
/// writer as the registry commits (concurrent changes share a transaction, each in a savepoint).
/// Returns how long the commit took, queueing included.
async fn commit_change(group: &GroupWriter, topic: String, card: String) -> anyhow::Result<Duration> {
    let began = Instant::now();
    group
        .run(move |conn| {
            conn.execute(
                "INSERT INTO cards (card_id, version) VALUES ($1, 1)
                 ON CONFLICT (card_id) DO UPDATE SET version = version + 1",
                &[(&card).into()],
            )?;
            let now = socialcard_events::unix_micros(OffsetDateTime::now_utc());
            let event_id = uuid::Uuid::now_v7().to_string();
            conn.execute(
                "INSERT INTO outbox (event_id, topic, event_key, event_type, payload, occurred_at, bucket, source)
                 VALUES ($1, $2, $3, 'bench.v1.Changed', $4, $5, $6, 'bench')",
                &[
                    (&event_id).into(),
                    (&topic).into(),
                    (&card).into(),
                    Value::Blob(&[0u8; 64]),
                    now.into(),
                    socialcard_events::bucket_of(&card).into(),
                ],
            )?;
            Ok::<_, socialcard_events::direct::DirectError>(())
        })
        .await??;
    Ok(began.elapsed())
}

pub async fn run(quick: bool, brokers: Option<String>) -> anyhow::Result<Table> {
    // The mock broker stays on this task for the whole scenario.
    let mock = if brokers.is_none() { Some(MockCluster::new(1)?) } else { None };
    let brokers = brokers.unwrap_or_else(|| mock.as_ref().map(MockCluster::bootstrap_servers).unwrap_or_default());
    let (rates, seconds): (&[u32], f64) = if quick { (&[200], 0.5) } else { (&[100, 1_000, 10_000], 5.0) };
    let mut rows = Vec::new();
    for &rate in rates {
        for path in [Path::Embedded, Path::Kafka] {
            for form in [Form::Serial, Form::ByCard, Form::Batch] {
                let mut r = one_run(path, form, rate, seconds, &brokers, mock.as_ref()).await?;
                rows.push(vec![
                    match r.path {
                        Path::Embedded => "embedded log".to_string(),
                        Path::Kafka => {
                            if mock.is_some() {
                                "kafka (mock broker)".to_string()
                            } else {
                                "kafka".to_string()
                            }
                        }
                    },
                    r.form.label().to_string(),
                    r.rate.to_string(),
                    format!("{:.0}", r.offered as f64 / r.written.as_secs_f64()),
                    format!("{:.0}", r.applied as f64 / r.elapsed.as_secs_f64()),
                    format!("{}/{}", r.applied, r.offered),
                    format!("{:.2}", r.latency.quantile_ms(0.50)),
                    format!("{:.2}", r.latency.quantile_ms(0.99)),
                    format!("{:.2}", r.commit.quantile_ms(0.50)),
                    format!("{:.2}", r.commit.quantile_ms(0.99)),
                    format!("{:.1}", r.latency.quantile_ms(0.99) / r.commit.quantile_ms(0.99).max(0.001)),
                    match r.path {
                        Path::Embedded => "-".to_string(),
                        Path::Kafka => {
                            format!("{:.2}/{:.2}", r.published.quantile_ms(0.50), r.published.quantile_ms(0.99))
                        }
                    },
                ]);
            }
        }
    }
    Ok(Table {
        name: "propagation",
        columns: vec![
            "path",
            "consumer txn",
            "offered/s",
            "committed/s",
            "applied/s",
            "applied",
            "p50 ms",
            "p99 ms",
            "commit p50 ms",
            "commit p99 ms",
            "p99 / commit p99",
            "published p50/p99 ms",
        ],
        rows,
        notes: vec![
            "latency: commit of the change (business row + outbox row) to the consumer's effect + inbox row committed"
                .into(),
            "baseline: the commit alone, same run; target p99 <= 50 ms at 1,000/s".into(),
            "published (Kafka): from the change (its occurred_at, as for the latency) to the broker's acknowledgement of the relay's publish"
                .into(),
            "consumer txn: one transaction per event, one at a time (per event); per event through a group writer, \
             up to 64 cards at once, each card's events in order (as the registry applies events); or per batch \
             (all a poll brings, as ops and postal apply them)"
                .into(),
        ],
    })
}
