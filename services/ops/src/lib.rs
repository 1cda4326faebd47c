//! The bureau's operations view (`socialcard.ops.v1.OpsService` and a live web dashboard): read models
//! built from every event topic (cards by state per bank and district, the issuing funnel with its times,
//! loss cases, overdue shipments, dead letters) in ops' own SQLite database.
//!
//! Layers: [`grpc`] and [`dashboard`] (transport) -> [`app`] (the queries and the rebuild) ->
//! [`projection`] (how an event moves a card, through the domain's state machines; no I/O) and [`store`]
//! (sqlx). [`feed`] consumes the topics (embedded log or Kafka) with an inbox, one transaction per event.
//!
//! It must never write to another service or hold what the events do not say: everything here can be
//! dropped and rebuilt by replaying the topics from their start ([`app::Ops::rebuild`]).

pub mod app;
pub mod dashboard;
pub mod feed;
pub mod grpc;
pub mod projection;
pub mod store;

use std::path::Path;
use std::sync::Arc;

pub use app::{Ops, OpsConfig};
use socialcard_proto::ops::v1::ops_service_server::OpsServiceServer;
use socialcard_server::Clock;
use tonic::server::NamedService;

/// The fully qualified gRPC service name, as health and reflection report it.
pub const SERVICE_NAME: &str = <OpsServiceServer<grpc::OpsGrpc> as NamedService>::NAME;

/// Opens (creating and migrating) ops' SQLite database at `path`.
pub async fn open(path: &Path, clock: Arc<dyn Clock>, config: OpsConfig) -> Result<Ops, store::StoreError> {
    Ok(Ops::new(store::OpsStore::open(path).await?, clock, config))
}
