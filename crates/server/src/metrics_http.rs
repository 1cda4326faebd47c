//! A minimal HTTP/1.1 endpoint for Prometheus: `GET /metrics` answers the text exposition format,
//! anything else 404. Prometheus speaks plain HTTP/1.1, which the gRPC port (HTTP/2) does not.

use std::future::Future;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Renders the current metrics.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

const MAX_HEAD: usize = 8 * 1024;

pub async fn serve(listener: TcpListener, render: Render, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let (mut socket, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let render = render.clone();
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(512);
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let request_line = head.split(|b| *b == b'\r').next().unwrap_or_default();
            let (status, body) = if request_line.starts_with(b"GET /metrics ") || request_line == b"GET /metrics" {
                ("200 OK", render())
            } else {
                ("404 Not Found", "not found\n".to_string())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}
