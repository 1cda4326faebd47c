//! Kafka through rdkafka: the idempotent producer behind the relay, topic creation at start, and the
//! consumer loop (consumer group, manual commits after the handler's transaction, dead letters).
//!
//! Kafka features relied on: consumer groups with committed offsets, the idempotent producer
//! (`enable.idempotence`, `acks=all`), headers, and topic creation through the admin API. Not relied
//! on: transactions, growing partitions.

use std::future::Future as _;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::handler::{handle_events, handle_one};
use crate::{Applied, Envelope, EventError, Handler, Metrics, OutboxRow, Publish};

/// The most messages [`KafkaConsumer::run`] hands the handler at once.
pub const MAX_BATCH: usize = 256;

#[derive(Clone, Debug)]
pub struct KafkaConfig {
    pub brokers: String,
    /// Partitions of each topic created at start. Not every broker can grow them later: choose up front.
    pub partitions: i32,
    pub replication: i32,
    /// How long a produce may take before it counts as failed (and the relay retries).
    pub message_timeout: Duration,
}

impl KafkaConfig {
    pub fn new(brokers: impl Into<String>) -> Self {
        Self { brokers: brokers.into(), partitions: 8, replication: 1, message_timeout: Duration::from_secs(10) }
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers).set("socket.nagle.disable", "true");
        c
    }
}

/// Creates the topics that are missing (existing ones are left as they are).
pub async fn ensure_topics(config: &KafkaConfig, topics: &[&str]) -> Result<(), EventError> {
    let admin: AdminClient<DefaultClientContext> = config.client().create()?;
    // Ask only for what is missing: a restart then needs no admin call at all.
    let metadata = admin.inner().fetch_metadata(None, Duration::from_secs(10))?;
    let existing: Vec<&str> = metadata.topics().iter().filter(|t| t.error().is_none()).map(|t| t.name()).collect();
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .filter(|t| !existing.contains(t))
        .map(|t| NewTopic::new(t, config.partitions, TopicReplication::Fixed(config.replication)))
        .collect();
    if new.is_empty() {
        return Ok(());
    }
    let results =
        admin.create_topics(&new, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)))).await?;
    for r in results {
        match r {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(EventError::Kafka(format!("cannot create topic {topic}: {code}"))),
        }
    }
    Ok(())
}

/// The relay's producer: idempotent, `acks=all`, so retries inside librdkafka neither duplicate nor
/// reorder a partition's messages.
#[derive(Clone)]
pub struct KafkaPublisher {
    producer: FutureProducer,
}

impl std::fmt::Debug for KafkaPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KafkaPublisher")
    }
}

impl KafkaPublisher {
    pub fn new(config: &KafkaConfig) -> Result<Self, EventError> {
        let producer = config
            .client()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .set("message.timeout.ms", config.message_timeout.as_millis().to_string())
            .create()?;
        Ok(Self { producer })
    }
}

#[async_trait]
impl Publish for KafkaPublisher {
    async fn publish(&self, rows: &[OutboxRow]) -> Result<(), EventError> {
        let mut deliveries = Vec::with_capacity(rows.len());
        for row in rows {
            let e = &row.envelope;
            let mut record = FutureRecord::to(&e.topic).key(&e.subject).payload(&e.payload).headers(e.kafka_headers());
            // Enqueue all, then wait for all: one round trip for the batch, order kept by the producer.
            let delivery = loop {
                match self.producer.send_result(record) {
                    Ok(d) => break d,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err((e, _)) => return Err(e.into()),
                }
            };
            deliveries.push(delivery);
        }
        for d in deliveries {
            match d.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(e.into()),
                Err(_) => return Err(EventError::Kafka("producer dropped the delivery".into())),
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    pub group: String,
    pub topics: Vec<String>,
    /// Tries before an event is dead-lettered.
    pub max_attempts: u32,
    pub retry_backoff: Duration,
}

impl ConsumerConfig {
    pub fn new(group: impl Into<String>, topics: &[&str]) -> Self {
        Self {
            group: group.into(),
            topics: topics.iter().map(|t| (*t).to_string()).collect(),
            max_attempts: 50,
            retry_backoff: Duration::from_millis(100),
        }
    }
}

/// A consumer-group member: per message, the handler's transaction (effect + inbox row) commits first,
/// then the offset. A crash in between redelivers the message, and the inbox makes it a no-op.
pub struct KafkaConsumer {
    consumer: StreamConsumer,
    dead_letters: FutureProducer,
    config: ConsumerConfig,
    handler: Arc<dyn Handler>,
    metrics: Option<Metrics>,
}

impl std::fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConsumer").field("group", &self.config.group).finish()
    }
}

impl KafkaConsumer {
    pub fn new(kafka: &KafkaConfig, config: ConsumerConfig, handler: Arc<dyn Handler>) -> Result<Self, EventError> {
        let consumer: StreamConsumer = kafka
            .client()
            .set("group.id", &config.group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "10")
            .set("session.timeout.ms", "10000")
            .create()?;
        let topics: Vec<&str> = config.topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topics)?;
        let dead_letters = KafkaPublisher::new(kafka)?.producer;
        Ok(Self { consumer, dead_letters, config, handler, metrics: None })
    }

    /// Counts applied, duplicate and dead-lettered events into `metrics`.
    pub fn with_metrics(mut self, metrics: Metrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Processes messages until `stop` turns true: each message that arrives, together with those
    /// already fetched behind it (up to [`MAX_BATCH`]), as one batch.
    pub async fn run(&self, mut stop: watch::Receiver<bool>) -> Result<(), EventError> {
        loop {
            let message = tokio::select! {
                m = self.consumer.recv() => m,
                _ = stop.changed() => return Ok(()),
            };
            if *stop.borrow() {
                return Ok(());
            }
            match message {
                Ok(m) => {
                    let mut batch = vec![m];
                    // Only what librdkafka has already fetched: never wait for more. A poll that served
                    // another event (a commit's result, a rebalance) also answers "pending", so a few
                    // are allowed before the queue counts as empty.
                    let mut pending = 0;
                    while batch.len() < MAX_BATCH && pending < 4 {
                        let mut next = std::pin::pin!(self.consumer.recv());
                        match std::future::poll_fn(|cx| Poll::Ready(next.as_mut().poll(cx))).await {
                            Poll::Ready(Ok(m)) => {
                                batch.push(m);
                                pending = 0;
                            }
                            Poll::Ready(Err(e)) => {
                                tracing::warn!(error = %e, "consumer error");
                                break;
                            }
                            Poll::Pending => pending += 1,
                        }
                    }
                    self.process_batch(&batch).await?;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "consumer error");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Handles one message and commits its offset. Exposed so tests can stop between the two.
    pub async fn process(&self, m: &BorrowedMessage<'_>) -> Result<(), EventError> {
        self.handle_only(m).await?;
        self.consumer.commit_message(m, CommitMode::Async)?;
        Ok(())
    }

    /// Handles `messages` (in order; together, in one transaction, when the handler has a batch form:
    /// see [`handle_events`]), dead-letters those that cannot be handled, then commits the offsets past
    /// them. A crash before the commit redelivers them all, and the inbox makes the applied ones no-ops.
    /// The consumer does not poll while it handles a batch: if its database stays away for longer than
    /// `max.poll.interval.ms` (librdkafka's default, 5 minutes) while the retries run, the member loses
    /// its partitions and rejoins, and the batch comes again (applied events are no-ops, and an event
    /// dead-lettered meanwhile may be applied on its second delivery).
    pub async fn process_batch(&self, messages: &[BorrowedMessage<'_>]) -> Result<(), EventError> {
        let mut outcomes: Vec<Option<Result<Applied, String>>> = vec![None; messages.len()];
        let mut events = Vec::with_capacity(messages.len());
        let mut of_event = Vec::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            match Envelope::from_message(m) {
                Ok(event) => {
                    events.push(event);
                    of_event.push(i);
                }
                Err(e) => outcomes[i] = Some(Err(e.to_string())),
            }
        }
        let handled =
            handle_events(self.handler.as_ref(), &events, self.config.max_attempts, self.config.retry_backoff, "kafka")
                .await;
        for (i, outcome) in of_event.into_iter().zip(handled) {
            outcomes[i] = Some(outcome.map_err(|e| e.to_string()));
        }
        for (m, outcome) in messages.iter().zip(outcomes) {
            let outcome = outcome.unwrap_or_else(|| Err("no outcome".into()));
            self.settle(m, outcome).await?;
        }
        // The next offset of each partition: one past the last message of it in this batch.
        let mut next: Vec<(&str, i32, i64)> = Vec::new();
        for m in messages {
            match next.iter_mut().find(|(t, p, _)| *t == m.topic() && *p == m.partition()) {
                Some(entry) => entry.2 = entry.2.max(m.offset() + 1),
                None => next.push((m.topic(), m.partition(), m.offset() + 1)),
            }
        }
        let mut offsets = TopicPartitionList::new();
        for (topic, partition, offset) in next {
            offsets.add_partition_offset(topic, partition, Offset::Offset(offset))?;
        }
        self.consumer.commit(&offsets, CommitMode::Async)?;
        Ok(())
    }

    /// Handles one message (dead-lettering it when it cannot be handled) without committing its offset.
    pub async fn handle_only(&self, m: &BorrowedMessage<'_>) -> Result<Option<Applied>, EventError> {
        let outcome = match Envelope::from_message(m) {
            Ok(event) => {
                handle_one(self.handler.as_ref(), &event, self.config.max_attempts, self.config.retry_backoff, "kafka")
                    .await
                    .map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        self.settle(m, outcome).await
    }

    /// Counts a handled message, or dead-letters one that could not be.
    async fn settle(
        &self,
        m: &BorrowedMessage<'_>,
        outcome: Result<Applied, String>,
    ) -> Result<Option<Applied>, EventError> {
        let group = &self.config.group;
        match outcome {
            Ok(applied) => {
                if let Some(metrics) = &self.metrics {
                    match applied {
                        Applied::Applied => metrics.applied(group, 1),
                        Applied::Duplicate => metrics.duplicates(group, 1),
                    }
                }
                Ok(Some(applied))
            }
            Err(error) => {
                tracing::error!(topic = m.topic(), partition = m.partition(), offset = m.offset(), %error, "dead-lettering event");
                self.dead_letter(m, &error).await?;
                if let Some(metrics) = &self.metrics {
                    metrics.dead_lettered(group, 1);
                }
                Ok(None)
            }
        }
    }

    async fn dead_letter(&self, m: &BorrowedMessage<'_>, error: &str) -> Result<(), EventError> {
        let topic = crate::topics::dead_letter(m.topic());
        let mut headers = OwnedHeaders::new();
        if let Some(h) = m.headers() {
            for header in h.iter() {
                headers = headers.insert(Header { key: header.key, value: header.value });
            }
        }
        let partition = m.partition().to_string();
        let offset = m.offset().to_string();
        headers = headers
            .insert(Header { key: "dlt_error", value: Some(error) })
            .insert(Header { key: "dlt_topic", value: Some(m.topic()) })
            .insert(Header { key: "dlt_partition", value: Some(&partition) })
            .insert(Header { key: "dlt_offset", value: Some(&offset) })
            .insert(Header { key: "dlt_group", value: Some(&self.config.group) });
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic).headers(headers);
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if let Some(p) = m.payload() {
            record = record.payload(p);
        }
        self.dead_letters.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| EventError::from(e))?;
        Ok(())
    }

    pub fn consumer(&self) -> &StreamConsumer {
        &self.consumer
    }
}

/// Samples a consumer group's lag (high watermark minus committed offset, summed over partitions) every
/// `every` on a thread of its own, since librdkafka's offset queries block. Stops when `stop` turns true.
pub fn spawn_lag_sampler(
    kafka: &KafkaConfig,
    group: &str,
    topics: &[&str],
    metrics: Metrics,
    every: Duration,
    stop: watch::Receiver<bool>,
) -> Result<std::thread::JoinHandle<()>, EventError> {
    use rdkafka::consumer::BaseConsumer;
    // Not subscribed: it only reads the group's committed offsets, it never joins the group.
    let reader: BaseConsumer = kafka.client().set("group.id", group).set("enable.auto.commit", "false").create()?;
    let group = group.to_string();
    let topics: Vec<String> = topics.iter().map(|t| (*t).to_string()).collect();
    Ok(std::thread::spawn(move || {
        while !*stop.borrow() {
            for topic in &topics {
                let timeout = Duration::from_secs(2);
                let Ok(metadata) = reader.fetch_metadata(Some(topic), timeout) else { continue };
                let mut tpl = TopicPartitionList::new();
                for t in metadata.topics() {
                    for p in t.partitions() {
                        tpl.add_partition(topic, p.id());
                    }
                }
                let committed = reader.committed_offsets(tpl, timeout);
                let mut lag = 0;
                if let Ok(committed) = &committed {
                    for e in committed.elements() {
                        let Ok((low, high)) = reader.fetch_watermarks(topic, e.partition(), timeout) else { continue };
                        let position = match e.offset() {
                            Offset::Offset(o) => o,
                            _ => low,
                        };
                        lag += (high - position).max(0);
                    }
                    metrics.consumer_lag(&group, topic, lag);
                }
                // Dropped before the consumer, or its drop can hang.
                drop(committed);
            }
            std::thread::sleep(every);
        }
    }))
}
