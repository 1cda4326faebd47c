//! One bank activation is one trace: the bank core's call carries a W3C `traceparent`; the adapter's
//! server span continues it, the adapter's call to the registry carries it on, the registry's handler span
//! is part of it, the card event written in that call carries it in Kafka headers, and the consumer's
//! `process` span continues it again. Spans are caught by an in-memory OpenTelemetry exporter.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::trace::InMemorySpanExporter;
use rdkafka::mocking::MockCluster;
use socialcard_bank_adapter::BankAdapter;
use socialcard_domain::BankDirectory;
use socialcard_events::kafka::{ConsumerConfig, KafkaConfig, KafkaConsumer, KafkaPublisher};
use socialcard_events::relay::RelayConfig;
use socialcard_events::{Applied, Envelope, Handler, HandlerError};
use socialcard_proto::bank::v1 as bank;
use socialcard_proto::bank::v1::bank_card_service_client::BankCardServiceClient;
use socialcard_proto::registry::v1::registry_service_client::RegistryServiceClient;
use socialcard_registry::RegistryConfig;
use socialcard_server::SystemClock;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::transport::Channel;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;

/// A consumer of card events that only acknowledges them: the span under test is the consumer's own.
struct Acknowledge;

#[async_trait]
impl Handler for Acknowledge {
    async fn handle(&self, _: &Envelope) -> Result<Applied, HandlerError> {
        Ok(Applied::Applied)
    }
}

async fn listen() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = format!("http://{}", l.local_addr().unwrap());
    (l, a)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bank_activation_is_one_trace_through_the_registry_to_a_kafka_consumer() {
    let exporter = InMemorySpanExporter::default();
    let provider = socialcard_telemetry::provider_with("trace-test", |b| b.with_simple_exporter(exporter.clone()));
    let subscriber = tracing_subscriber::registry().with(socialcard_telemetry::otel_layer(&provider, "trace-test"));
    tracing::subscriber::set_global_default(subscriber).unwrap();
    socialcard_telemetry::install_propagator();

    // Kafka (librdkafka's mock broker) carrying the registry's card events.
    let mock = MockCluster::new(1).unwrap();
    let topic = socialcard_events::topics::CARD;
    mock.create_topic(topic, 2, 1).unwrap();
    mock.create_topic(&socialcard_events::topics::dead_letter(topic), 1, 1).unwrap();
    let mut kafka = KafkaConfig::new(mock.bootstrap_servers());
    kafka.partitions = 2;
    kafka.message_timeout = Duration::from_secs(5);

    let dir = std::env::temp_dir().join(format!("socialcard-trace-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.join("registry.db").display());
    let built = socialcard_registry::build(&url, Arc::new(SystemClock), RegistryConfig::shanghai(b"k".repeat(32)))
        .await
        .unwrap();
    let (stop, stopped) = watch::channel(false);
    let publisher = Arc::new(KafkaPublisher::new(&kafka).unwrap());
    tokio::spawn(socialcard_events::relay::run(
        built.outbox.clone(),
        publisher,
        RelayConfig { source: "registry".into(), ..RelayConfig::default() },
        stopped.clone(),
    ));
    let consumer =
        KafkaConsumer::new(&kafka, ConsumerConfig::new("trace-test", &[topic]), Arc::new(Acknowledge)).unwrap();
    let consuming = stopped.clone();
    tokio::spawn(async move { consumer.run(consuming).await.unwrap() });

    let (l, registry_addr) = listen().await;
    let routes =
        tonic::service::Routes::new(socialcard_registry::grpc::RegistryGrpc::new(built.registry).into_server());
    tokio::spawn(socialcard_server::grpc::serve(l, routes, &[], std::future::pending()));
    let mut registry = RegistryServiceClient::connect(registry_addr.clone()).await.unwrap();
    let icbc = BankDirectory::shanghai().get("icbc").unwrap().clone();
    let adapter =
        BankAdapter::open(icbc, &dir.join("bank-icbc.db"), Channel::from_shared(registry_addr).unwrap().connect_lazy())
            .await
            .unwrap();
    let (l, adapter_addr) = listen().await;
    tokio::spawn(socialcard_server::grpc::serve(
        l,
        tonic::service::Routes::new(adapter.into_server()),
        &[],
        std::future::pending(),
    ));
    let card = socialcard_registry::fixtures::collected_card(&mut registry, 1, "icbc", "621226").await.unwrap();

    // The bank core's teller call, in the bank's own trace.
    let teller = tracing::info_span!("bank core: teller activation");
    let trace_id = teller.context().span().span_context().trace_id();
    let mut call = tonic::Request::new(bank::ActivateFinancialRequest {
        idempotency_key: uuid::Uuid::now_v7().to_string(),
        card_number: card.card_number,
        teller_id: "teller-1".into(),
        branch_id: "branch-1".into(),
        face_verification_ref: "face-1".into(),
        bank_pin_changed: true,
    });
    teller.in_scope(|| socialcard_telemetry::inject(&mut call));
    assert!(call.metadata().get("traceparent").is_some(), "the bank's call carries its trace");
    let mut bank_client = BankCardServiceClient::connect(adapter_addr).await.unwrap();
    bank_client.activate_financial(call).await.unwrap();
    drop(teller);

    let in_trace = |name: &str| {
        exporter.get_finished_spans().unwrap().iter().any(|s| s.span_context.trace_id() == trace_id && s.name == name)
    };
    let mut found = false;
    for _ in 0..1500 {
        if in_trace("process socialcard.card.v1") {
            found = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let names: Vec<String> = exporter
        .get_finished_spans()
        .unwrap()
        .iter()
        .filter(|s| s.span_context.trace_id() == trace_id)
        .map(|s| s.name.to_string())
        .collect();
    assert!(found, "a Kafka consumer's span continues the bank's trace: {names:?}");
    assert!(in_trace("socialcard.bank.v1.BankCardService/ActivateFinancial"), "{names:?}");
    assert!(in_trace("socialcard.registry.v1.RegistryService/RecordFinancialActivation"), "{names:?}");
    // The consumer span follows the RPC's semantic conventions' sibling for messaging.
    let spans = exporter.get_finished_spans().unwrap();
    let process =
        spans.iter().find(|s| s.span_context.trace_id() == trace_id && s.name == "process socialcard.card.v1");
    let attrs: Vec<(String, String)> =
        process.unwrap().attributes.iter().map(|kv| (kv.key.to_string(), kv.value.to_string())).collect();
    assert!(attrs.contains(&("messaging.system".into(), "kafka".into())), "{attrs:?}");
    assert!(attrs.contains(&("messaging.destination.name".into(), topic.into())), "{attrs:?}");
    let _ = stop.send(true);
    let _ = std::fs::remove_dir_all(&dir);
}
