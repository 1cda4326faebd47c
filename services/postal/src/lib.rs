//! Postal dispatch tracking (`socialcard.postal.v1.PostalService`): a shipment per produced card
//! (R14), the courier's status feeds normalised to one status set, failed deliveries routed to the
//! holder's backup community point (R15), and delivery or pick-up reported as the card's collection
//! (R17) through `socialcard.shipment.v1` events the registry consumes.
//!
//! Layers: [`grpc`] and [`webhook`] (transport; the CSV parser in [`feed`] serves the CLI's batch
//! import) -> [`app`] (use cases) -> [`status`] (the rules, no I/O) and [`storage`] (SQLite through
//! sqlx). [`events`] consumes the registry's card events. It never calls the registry: what the
//! registry must know travels as outbox events, written in the same transaction as the change, so a
//! courier's update is never half-applied. Status history is append-only; nothing a feed sends is
//! dropped: duplicates are counted, late updates kept without moving a shipment back, updates for
//! unknown waybills kept aside.

pub mod app;
pub mod events;
pub mod feed;
pub mod grpc;
pub mod status;
pub mod storage;
pub mod webhook;

use std::path::Path;
use std::sync::Arc;

pub use app::{Postal, PostalConfig};
use socialcard_proto::postal::v1::postal_service_server::PostalServiceServer;
use socialcard_server::Clock;
use tonic::server::NamedService;

/// The fully qualified gRPC service name, as health and reflection report it.
pub const SERVICE_NAME: &str = <PostalServiceServer<grpc::PostalGrpc> as NamedService>::NAME;

/// The consumer group postal reads the card events under.
pub const CONSUMER_GROUP: &str = "postal";

/// Opens (creating and migrating) postal's SQLite database at `path`.
pub async fn open(path: &Path, clock: Arc<dyn Clock>, config: PostalConfig) -> Result<Postal, storage::StoreError> {
    Ok(Postal::new(storage::PostalStore::open(path).await?, clock, config))
}
