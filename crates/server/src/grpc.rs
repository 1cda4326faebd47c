//! gRPC bootstrap: every service is served with `grpc.health.v1` and reflection v1 beside it, so
//! `grpcurl list` and readiness probes work the same everywhere.

use std::future::Future;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Server, ServerTlsConfig};
use tonic_health::ServingStatus;

/// Serves `routes` on `listener` with health (each of `service_names` marked SERVING) and reflection
/// over every socialcard contract, until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    service_names: &[&str],
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    serve_with_tls(listener, routes, service_names, None, shutdown).await
}

/// [`serve`], over TLS when `tls` is given (see [`crate::tls`]: the services in `routes` check the
/// caller's certificate themselves, health and reflection answer anyone who completes the handshake).
pub async fn serve_with_tls(
    listener: TcpListener,
    routes: Routes,
    service_names: &[&str],
    tls: Option<ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in service_names {
        reporter.set_service_status(*name, ServingStatus::Serving).await;
    }
    // The empty name is the whole server's health.
    reporter.set_service_status("", ServingStatus::Serving).await;
    // Reflection lists exactly what this server serves, described from the socialcard contracts.
    let mut reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(socialcard_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("grpc.health.v1.Health");
    for name in service_names {
        reflection = reflection.with_service_name(*name);
    }
    let reflection = reflection.build_v1().map_err(|e| {
        tracing::error!(error = %e, "reflection descriptor set is invalid");
        e
    });
    let mut routes = routes.add_service(health);
    if let Ok(reflection) = reflection {
        routes = routes.add_service(reflection);
    }
    let mut server = Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    // tonic ignores the builder's `tcp_nodelay` for sockets it did not accept itself: set on the incoming
    // stream instead. With Nagle's algorithm on, a response's last small write waited for the client's
    // delayed ACK, 40 ms on Linux: about one call in a hundred took 42 ms instead of one.
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    server
        .timeout(Duration::from_secs(30))
        // One server span per call, continuing the caller's trace from its metadata.
        .trace_fn(socialcard_telemetry::server_span)
        // Calls by method and status code, and their durations, for `/metrics`.
        .layer(crate::rpc_metrics::RpcMetricsLayer)
        .add_routes(routes)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
