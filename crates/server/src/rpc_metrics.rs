//! Per-RPC metrics for every gRPC server of the process: calls by service, method and status code, and a
//! duration histogram, rendered in the Prometheus text format beside the event metrics (`GET /metrics`).
//! Recorded by a tower layer on each server, so no handler has to remember to count.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::codegen::http;

/// Upper bounds of the duration buckets, in seconds.
const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Default)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

#[derive(Default)]
struct Registry {
    calls: BTreeMap<(String, String, String), u64>,
    durations: BTreeMap<(String, String), Histogram>,
}

fn registry() -> &'static Mutex<Registry> {
    static R: OnceLock<Mutex<Registry>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(Registry::default()))
}

/// Records one finished call.
pub fn record(path: &str, code: &str, seconds: f64) {
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    let mut r = registry().lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    *r.calls.entry((service.to_string(), method.to_string(), code.to_string())).or_default() += 1;
    let h = r.durations.entry((service.to_string(), method.to_string())).or_default();
    h.count += 1;
    h.sum += seconds;
    for (i, le) in BUCKETS.iter().enumerate() {
        if seconds <= *le {
            h.buckets[i] += 1;
        }
    }
}

/// The process's RPC metrics in the Prometheus text format.
pub fn render() -> String {
    let r = registry().lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut out = String::new();
    out.push_str("# HELP socialcard_rpc_calls_total gRPC calls served, by service, method and status code.\n");
    out.push_str("# TYPE socialcard_rpc_calls_total counter\n");
    for ((service, method, code), n) in &r.calls {
        let _ = writeln!(
            out,
            "socialcard_rpc_calls_total{{service=\"{service}\",method=\"{method}\",code=\"{code}\"}} {n}"
        );
    }
    out.push_str("# HELP socialcard_rpc_duration_seconds gRPC call durations, by service and method.\n");
    out.push_str("# TYPE socialcard_rpc_duration_seconds histogram\n");
    for ((service, method), h) in &r.durations {
        let labels = format!("service=\"{service}\",method=\"{method}\"");
        for (i, le) in BUCKETS.iter().enumerate() {
            let _ = writeln!(out, "socialcard_rpc_duration_seconds_bucket{{{labels},le=\"{le}\"}} {}", h.buckets[i]);
        }
        let _ = writeln!(out, "socialcard_rpc_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}", h.count);
        let _ = writeln!(out, "socialcard_rpc_duration_seconds_sum{{{labels}}} {}", h.sum);
        let _ = writeln!(out, "socialcard_rpc_duration_seconds_count{{{labels}}} {}", h.count);
    }
    out
}

/// The tower layer that records every call of a server.
#[derive(Clone, Copy, Debug, Default)]
pub struct RpcMetricsLayer;

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService { inner }
    }
}

#[derive(Clone, Debug)]
pub struct RpcMetricsService<S> {
    inner: S,
}

/// The status of a finished call as the response headers tell it: a refusal is a trailers-only response
/// carrying `grpc-status` in its headers; a success sends its status in the trailers (0, OK).
fn code_of(headers: &http::HeaderMap) -> String {
    match headers.get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<i32>().ok()) {
        Some(code) => format!("{:?}", tonic::Code::from_i32(code)),
        None => "Ok".to_string(),
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for RpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let path = request.uri().path().to_string();
        let start = Instant::now();
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await;
            // Health checks and reflection are probes, not traffic.
            if !path.starts_with("/grpc.") {
                let code = match &result {
                    Ok(response) => code_of(response.headers()),
                    Err(_) => "Internal".to_string(),
                };
                record(&path, &code, start.elapsed().as_secs_f64());
            }
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_counted_by_code_and_timed() {
        record("/socialcard.test.v1.TestService/Do", "Ok", 0.003);
        record("/socialcard.test.v1.TestService/Do", "InvalidArgument", 0.0005);
        let text = render();
        assert!(text.contains(
            "socialcard_rpc_calls_total{service=\"socialcard.test.v1.TestService\",method=\"Do\",code=\"Ok\"} 1"
        ));
        assert!(text.contains("code=\"InvalidArgument\"} 1"));
        assert!(text.contains(
            "socialcard_rpc_duration_seconds_bucket{service=\"socialcard.test.v1.TestService\",method=\"Do\",le=\"0.001\"} 1"
        ));
        assert!(text.contains(
            "socialcard_rpc_duration_seconds_count{service=\"socialcard.test.v1.TestService\",method=\"Do\"} 2"
        ));
    }
}
