//! Mutual TLS: each bank reaches its adapter with its own client certificate, and the adapter reaches
//! the registry with its service certificate. The matrix of bad certificates (none, self-signed, another
//! CA's, expired, another bank's) is refused, and a refused call writes nothing anywhere.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use socialcard_bank_adapter::BankAdapter;
use socialcard_domain::BankDirectory;
use socialcard_proto::bank::v1 as bank;
use socialcard_proto::bank::v1::bank_card_service_client::BankCardServiceClient;
use socialcard_proto::registry::v1 as reg;
use socialcard_proto::registry::v1::registry_service_client::RegistryServiceClient;
use socialcard_registry::RegistryConfig;
use socialcard_server::SystemClock;
use socialcard_server::error::reason_of;
use socialcard_server::tls::dev_ca::{DevCa, IssuedCert, LeafSpec};
use socialcard_server::tls::{Allow, RequirePeer, adapter_service_name, client_config, server_config, server_dns_name};
use tokio::net::TcpListener;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig};

struct Dir(std::path::PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct World {
    ca: DevCa,
    adapter_addr: String,
    registry_addr: String,
    adapter: BankAdapter,
    /// A registry client with the CLI's service certificate.
    registry: RegistryServiceClient<Channel>,
    _dir: Dir,
}

async fn listen() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = format!("https://{}", l.local_addr().unwrap());
    (l, a)
}

fn channel(addr: &str, tls: ClientTlsConfig) -> Channel {
    Channel::from_shared(addr.to_string()).unwrap().tls_config(tls).unwrap().connect_lazy()
}

/// A registry and icbc's adapter, both over mutual TLS with certificates of one development CA.
async fn world() -> World {
    let dir = Dir(std::env::temp_dir().join(format!("socialcard-tls-{}", uuid::Uuid::new_v4().simple())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let ca = DevCa::generate("test CA").unwrap();

    let url = format!("sqlite://{}?mode=rwc", dir.0.join("registry.db").display());
    let built = socialcard_registry::build(&url, Arc::new(SystemClock), RegistryConfig::shanghai(b"k".repeat(32)))
        .await
        .unwrap();
    let (l, registry_addr) = listen().await;
    let registry_server = socialcard_registry::grpc::RegistryGrpc::new(built.registry.clone()).into_server();
    let guarded = InterceptedService::new(registry_server, RequirePeer::new("registry", Allow::services()));
    let tls = server_config(ca.certificate(), ca.issue(&LeafSpec::server("registry")).unwrap().identity());
    tokio::spawn(socialcard_server::grpc::serve_with_tls(
        l,
        tonic::service::Routes::new(guarded),
        &[socialcard_registry::SERVICE_NAME],
        Some(tls),
        std::future::pending(),
    ));

    let service = adapter_service_name("icbc");
    let to_registry =
        client_config(ca.certificate(), ca.issue(&LeafSpec::service_client(&service)).unwrap().identity(), "registry");
    let bank = BankDirectory::shanghai().get("icbc").unwrap().clone();
    let adapter =
        BankAdapter::open(bank, &dir.0.join("bank-icbc.db"), channel(&registry_addr, to_registry)).await.unwrap();
    let (l, adapter_addr) = listen().await;
    let tls = server_config(ca.certificate(), ca.issue(&LeafSpec::server(&service)).unwrap().identity());
    tokio::spawn(socialcard_server::grpc::serve_with_tls(
        l,
        tonic::service::Routes::new(adapter.clone().into_mtls_server()),
        &[socialcard_bank_adapter::SERVICE_NAME],
        Some(tls),
        std::future::pending(),
    ));

    let cli = ca.issue(&LeafSpec::service_client("cli")).unwrap();
    let registry = RegistryServiceClient::new(channel(
        &registry_addr,
        client_config(ca.certificate(), cli.identity(), "registry"),
    ));
    World { ca, adapter_addr, registry_addr, adapter, registry, _dir: dir }
}

impl World {
    /// A client of icbc's adapter presenting `cert` (or none).
    fn bank_client(&self, cert: Option<&IssuedCert>) -> BankCardServiceClient<Channel> {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(self.ca.certificate())
            .domain_name(server_dns_name("bank-adapter-icbc"));
        if let Some(cert) = cert {
            tls = tls.identity(cert.identity());
        }
        BankCardServiceClient::new(channel(&self.adapter_addr, tls))
    }

    async fn collected_card(&mut self, n: u64) -> (String, String) {
        let card =
            socialcard_registry::fixtures::collected_card(&mut self.registry, n, "icbc", "621226").await.unwrap();
        (card.card_id, card.card_number)
    }

    async fn card(&mut self, id: &str) -> reg::Card {
        self.registry
            .get_card(reg::GetCardRequest { lookup: Some(reg::get_card_request::Lookup::CardId(id.into())) })
            .await
            .unwrap()
            .into_inner()
            .card
            .unwrap()
    }

    /// Refused: the card is untouched at the registry and the adapter recorded nothing.
    async fn assert_nothing_written(&mut self, card_id: &str) {
        let card = self.card(card_id).await;
        assert_eq!(card.financial_state, reg::FinancialState::NotActivated as i32);
        assert_eq!(card.social_state, reg::SocialState::NotActivated as i32);
        let today =
            time::OffsetDateTime::now_utc().to_offset(socialcard_bank_adapter::reconcile::BUSINESS_OFFSET).date();
        assert!(self.adapter.daily_file(today).await.unwrap().records.is_empty());
        assert_eq!(self.adapter.unconfirmed().await.unwrap(), 0);
    }
}

fn activation(card_number: &str) -> bank::ActivateFinancialRequest {
    bank::ActivateFinancialRequest {
        idempotency_key: uuid::Uuid::now_v7().to_string(),
        card_number: card_number.into(),
        teller_id: "teller-9".into(),
        branch_id: "branch-310105".into(),
        face_verification_ref: "face-abc".into(),
        bank_pin_changed: true,
    }
}

/// A certificate the TLS handshake refuses: the call never reaches the service.
fn assert_handshake_refused(status: &tonic::Status) {
    assert!(
        matches!(status.code(), Code::Unavailable | Code::Unknown),
        "expected a transport failure, got {:?}: {}",
        status.code(),
        status.message()
    );
    assert_eq!(reason_of(status), None, "the service itself never answered");
}

#[tokio::test]
async fn the_banks_own_certificate_activates_through_mutual_tls_end_to_end() {
    let mut w = world().await;
    let (card_id, number) = w.collected_card(1).await;
    let cert = w.ca.issue(&LeafSpec::bank_client("icbc")).unwrap();
    let r = w.bank_client(Some(&cert)).activate_financial(activation(&number)).await.unwrap().into_inner();
    assert_eq!(r.financial_state, reg::FinancialState::Active as i32);
    // The adapter reached the registry with its own service certificate: both functions are on there.
    let card = w.card(&card_id).await;
    assert_eq!(card.financial_state, reg::FinancialState::Active as i32);
    assert_eq!(card.social_state, reg::SocialState::Active as i32);
}

#[tokio::test]
async fn no_client_certificate_is_unauthenticated_and_writes_nothing() {
    let mut w = world().await;
    let (card_id, number) = w.collected_card(2).await;
    let status = w.bank_client(None).activate_financial(activation(&number)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert_eq!(reason_of(&status).as_deref(), Some("CLIENT_CERTIFICATE_REQUIRED"));
    w.assert_nothing_written(&card_id).await;
}

#[tokio::test]
async fn a_self_signed_certificate_fails_the_handshake() {
    let mut w = world().await;
    let (card_id, number) = w.collected_card(3).await;
    // It even claims to be icbc: no CA vouches for it.
    let cert = LeafSpec::bank_client("icbc").self_signed().unwrap();
    let status = w.bank_client(Some(&cert)).activate_financial(activation(&number)).await.unwrap_err();
    assert_handshake_refused(&status);
    w.assert_nothing_written(&card_id).await;
}

#[tokio::test]
async fn a_certificate_of_another_ca_fails_the_handshake() {
    let mut w = world().await;
    let (card_id, number) = w.collected_card(4).await;
    let other = DevCa::generate("someone else's CA").unwrap();
    let cert = other.issue(&LeafSpec::bank_client("icbc")).unwrap();
    let status = w.bank_client(Some(&cert)).activate_financial(activation(&number)).await.unwrap_err();
    assert_handshake_refused(&status);
    w.assert_nothing_written(&card_id).await;
}

#[tokio::test]
async fn an_expired_certificate_fails_the_handshake() {
    let mut w = world().await;
    let (card_id, number) = w.collected_card(5).await;
    let cert = w.ca.issue(&LeafSpec::bank_client("icbc").expired()).unwrap();
    let status = w.bank_client(Some(&cert)).activate_financial(activation(&number)).await.unwrap_err();
    assert_handshake_refused(&status);
    w.assert_nothing_written(&card_id).await;
}

#[tokio::test]
async fn another_banks_certificate_is_permission_denied_and_writes_nothing() {
    let mut w = world().await;
    let (card_id, number) = w.collected_card(6).await;
    let ccb = w.ca.issue(&LeafSpec::bank_client("ccb")).unwrap();
    let mut client = w.bank_client(Some(&ccb));
    let status = client.activate_financial(activation(&number)).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert_eq!(reason_of(&status).as_deref(), Some("WRONG_PEER_IDENTITY"));
    // Reading is refused too: another bank learns nothing about icbc's cards.
    let status = client.query_card(bank::QueryCardRequest { card_number: number.clone() }).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // A service certificate is no bank core either.
    let cli = w.ca.issue(&LeafSpec::service_client("cli")).unwrap();
    let status = w.bank_client(Some(&cli)).activate_financial(activation(&number)).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    w.assert_nothing_written(&card_id).await;
}

#[tokio::test]
async fn the_registry_admits_services_only() {
    let w = world().await;
    let get = reg::GetCardRequest { lookup: Some(reg::get_card_request::Lookup::CardNumber("A00000018".into())) };
    let tls = |cert: Option<&IssuedCert>| {
        let mut tls =
            ClientTlsConfig::new().ca_certificate(w.ca.certificate()).domain_name(server_dns_name("registry"));
        if let Some(cert) = cert {
            tls = tls.identity(cert.identity());
        }
        RegistryServiceClient::new(channel(&w.registry_addr, tls))
    };
    let icbc = w.ca.issue(&LeafSpec::bank_client("icbc")).unwrap();
    let status = tls(Some(&icbc)).get_card(get.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "a bank talks to its adapter, never to the registry");
    let status = tls(None).get_card(get.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let expired = w.ca.issue(&LeafSpec::service_client("cli").expired()).unwrap();
    assert_handshake_refused(&tls(Some(&expired)).get_card(get.clone()).await.unwrap_err());
    // A service certificate gets through to the registry's own answer.
    let cli = w.ca.issue(&LeafSpec::service_client("cli")).unwrap();
    let status = tls(Some(&cli)).get_card(get).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test]
async fn health_answers_over_tls_without_a_client_certificate() {
    let w = world().await;
    let tls =
        ClientTlsConfig::new().ca_certificate(w.ca.certificate()).domain_name(server_dns_name("bank-adapter-icbc"));
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(&w.adapter_addr, tls));
    let r = health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(r.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
}
