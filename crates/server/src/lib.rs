//! The shared server kit every socialcard service is built with: the one mapping from domain rejections
//! to gRPC status codes (with a machine-readable `ErrorInfo` reason), the clock services read time from,
//! and the gRPC bootstrap that serves health and reflection beside each service.
//!
//! It must never hold business rules: those live in `socialcard-domain` and in each service.

pub mod clock;
pub mod error;
pub mod grpc;
pub mod limit;
pub mod metrics_http;
pub mod rpc_metrics;
pub mod tls;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{ApiError, ERROR_DOMAIN};
