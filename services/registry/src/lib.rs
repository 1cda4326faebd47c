//! The bureau's card registry (`socialcard.registry.v1.RegistryService`): persons, applications, cards,
//! the social function's lifecycle, social PINs and every card's audit trail.
//!
//! Layers: [`grpc`] (transport) -> [`app`] (use cases, idempotency) -> [`socialcard_domain`] (rules) and
//! [`storage`] (SQLite or PostgreSQL through sqlx). Every state change commits with its audit row and
//! outbox event in one transaction; this crate never publishes events itself (the event backbone does).

pub mod app;
pub mod audit_chain;
pub mod batch;
pub mod convert;
pub mod events;
#[cfg(feature = "fixtures")]
pub mod fixtures;
pub mod grpc;
pub mod pin;
pub mod seal;
pub mod shipment_events;
pub mod storage;

use std::sync::Arc;

pub use app::{CARD_TOPIC, Registry, RegistryConfig};
use socialcard_proto::registry::v1::registry_service_server::RegistryServiceServer;
use socialcard_server::Clock;
use tonic::server::NamedService;

/// The fully qualified gRPC service name, as health and reflection report it.
pub const SERVICE_NAME: &str = <RegistryServiceServer<grpc::RegistryGrpc> as NamedService>::NAME;

/// A registry and the outbox of its database.
#[derive(Clone, Debug)]
pub struct Built {
    pub registry: Registry,
    pub outbox: Arc<dyn socialcard_events::Outbox>,
    pub embedded_log: bool,
    /// SQLite only: where the registry's embedded-log consumers keep their positions.
    pub offsets: Option<socialcard_events::embedded::SqliteOffsets>,
}

/// Connects storage at `database_url` (migrating it) and builds the registry.
pub async fn build(
    database_url: &str,
    clock: Arc<dyn Clock>,
    config: RegistryConfig,
) -> Result<Built, storage::StoreError> {
    let c = storage::connect(database_url, &config.data_key).await?;
    Ok(Built {
        registry: Registry::new(c.store, clock, config),
        outbox: c.outbox,
        embedded_log: c.embedded_log,
        offsets: c.offsets,
    })
}
