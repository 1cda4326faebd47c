//! Registry events reach Kafka and a consumer in another process applies them exactly once in effect:
//! `socialcard up --kafka-brokers` runs as its own process against librdkafka's mock broker (served from
//! this test process) or a real broker (`SOCIALCARD_TEST_KAFKA_BROKERS`), is SIGKILLed mid-way and
//! restarted, and the consumer here sees every card change once, in order.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use prost::Message;
use rdkafka::mocking::MockCluster;
use socialcard_events::kafka::{ConsumerConfig, KafkaConfig, KafkaConsumer};
use socialcard_events::{Applied, Envelope, Handler, HandlerError};
use socialcard_proto::events::v1 as ev;
use socialcard_proto::registry::v1::registry_service_client::RegistryServiceClient;
use sqlx::Row;
use tokio::sync::watch;

const BIN: &str = env!("CARGO_BIN_EXE_socialcard");

struct Up(Child, String, String);

impl Up {
    fn start(data_dir: &std::path::Path, brokers: &str) -> Up {
        let mut child = Command::new(BIN)
            .args([
                "up",
                "--registry-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
                "--bank-ports-auto",
                "--loss-listen",
                "127.0.0.1:0",
                "--postal-listen",
                "127.0.0.1:0",
                "--postal-webhook-listen",
                "127.0.0.1:0",
                "--ops-listen",
                "127.0.0.1:0",
                "--ops-dashboard-listen",
                "127.0.0.1:0",
                "--kafka-partitions",
                "4",
                "--kafka-brokers",
                brokers,
                "--data-dir",
            ])
            .arg(data_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut endpoint = None;
        let mut metrics = None;
        let mut publishing = false;
        for line in lines.by_ref() {
            let line = line.unwrap();
            if let Some(addr) = line.strip_prefix("registry listening on ") {
                endpoint = Some(format!("http://{addr}"));
            }
            if let Some(addr) = line.strip_prefix("metrics listening on ") {
                metrics = Some(addr.to_string());
            }
            publishing |= line.starts_with("registry events published to kafka");
            if publishing && endpoint.is_some() {
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Up(child, endpoint.expect("no listening line"), metrics.expect("no metrics line"))
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The consumer's effect: one row per applied card event, written with its inbox row.
struct CardLog {
    pool: sqlx::SqlitePool,
    versions: Mutex<HashMap<String, Vec<i64>>>,
}

#[async_trait]
impl Handler for CardLog {
    async fn handle(&self, event: &Envelope) -> Result<Applied, HandlerError> {
        let e = ev::CardEvent::decode(event.payload.as_slice()).map_err(|e| HandlerError::Permanent(e.to_string()))?;
        if e.card_id != event.subject {
            return Err(HandlerError::Permanent("subject is not the card".into()));
        }
        let t = |e: sqlx::Error| HandlerError::Transient(e.to_string());
        let mut tx = self.pool.begin().await.map_err(t)?;
        if !socialcard_events::inbox::record_sqlite(&mut tx, &event.id).await.map_err(t)? {
            return Ok(Applied::Duplicate);
        }
        sqlx::query("INSERT INTO card_log (event_id, card_id, version) VALUES ($1, $2, $3)")
            .bind(&event.id)
            .bind(&e.card_id)
            .bind(e.card_version)
            .execute(&mut *tx)
            .await
            .map_err(t)?;
        tx.commit().await.map_err(t)?;
        self.versions.lock().unwrap().entry(e.card_id).or_default().push(e.card_version);
        Ok(Applied::Applied)
    }
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// A card from application to collection: five card events.
async fn card_to_collection(client: &mut RegistryServiceClient<tonic::transport::Channel>, n: u64) -> String {
    socialcard_registry::fixtures::collected_card(client, n, "icbc", "621226").await.unwrap().card_id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_events_reach_kafka_and_are_applied_once_across_a_crash() {
    // The mock broker lives on this test's main task; the registry process connects to it over TCP.
    let mock = MockCluster::new(1).unwrap();
    // The mock broker does not implement CreateTopics: give it the topics `up` would create.
    for topic in socialcard_events::topics::ALL {
        mock.create_topic(topic, 4, 1).unwrap();
        mock.create_topic(&socialcard_events::topics::dead_letter(topic), 1, 1).unwrap();
    }
    let brokers = std::env::var("SOCIALCARD_TEST_KAFKA_BROKERS")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| mock.bootstrap_servers());

    let dir = std::env::temp_dir().join(format!("socialcard-kafka-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let pool = sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(
            sqlx::sqlite::SqliteConnectOptions::new().filename(dir.join("consumer.db")).create_if_missing(true),
        )
        .await
        .unwrap();
    sqlx::raw_sql(socialcard_events::inbox::SQLITE_SCHEMA).execute(&pool).await.unwrap();
    sqlx::raw_sql("CREATE TABLE card_log (event_id TEXT PRIMARY KEY, card_id TEXT NOT NULL, version INTEGER NOT NULL)")
        .execute(&pool)
        .await
        .unwrap();
    let log = Arc::new(CardLog { pool: pool.clone(), versions: Mutex::new(HashMap::new()) });

    let data = dir.join("registry");
    let mut cards = Vec::new();
    {
        let up = Up::start(&data, &brokers);
        let mut client = RegistryServiceClient::connect(up.1.clone()).await.unwrap();
        for n in 0..3 {
            cards.push(card_to_collection(&mut client, n).await);
        }
        // SIGKILL while events may still sit unpublished in the outbox.
    }
    let up = Up::start(&data, &brokers);
    let mut client = RegistryServiceClient::connect(up.1.clone()).await.unwrap();
    for n in 3..5 {
        cards.push(card_to_collection(&mut client, n).await);
    }

    let group = format!("test-{}", uuid::Uuid::new_v4().simple());
    let consumer = KafkaConsumer::new(
        &KafkaConfig::new(brokers.clone()),
        ConsumerConfig::new(group, &["socialcard.card.v1"]),
        log.clone(),
    )
    .unwrap();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(async move { consumer.run(stopped).await.unwrap() });
    let start = Instant::now();
    loop {
        let done = {
            let v = log.versions.lock().unwrap();
            cards.iter().all(|c| v.get(c).is_some_and(|versions| versions.len() >= 5))
        };
        if done {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not every card event arrived: {:?}",
            log.versions.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(true).unwrap();
    task.await.unwrap();

    // Prometheus sees the relay's backlog drained.
    let start = Instant::now();
    loop {
        let text = http_get(&up.2, "/metrics");
        if text.starts_with("HTTP/1.1 200") && text.contains("socialcard_outbox_backlog{source=\"registry\"} 0") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "backlog gauge not at 0: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Per-RPC metrics: the registry's calls above, counted by method and status code, with durations.
    let text = http_get(&up.2, "/metrics");
    assert!(
        text.contains("socialcard_rpc_calls_total{service=\"socialcard.registry.v1.RegistryService\",method=\"SubmitApplication\",code=\"Ok\"}"),
        "{text}"
    );
    assert!(text.contains("socialcard_rpc_duration_seconds_count{service=\"socialcard.registry.v1.RegistryService\""));
    assert!(http_get(&up.2, "/other").starts_with("HTTP/1.1 404"));
    drop(up);

    let versions = log.versions.lock().unwrap().clone();
    for c in &cards {
        assert_eq!(versions[c], vec![1, 2, 3, 4, 5], "card {c}: each change once, in order");
    }
    let rows: i64 = sqlx::query("SELECT COUNT(*) AS n FROM card_log").fetch_one(&pool).await.unwrap().get("n");
    assert!(rows >= 25);
    let _ = std::fs::remove_dir_all(&dir);
}
