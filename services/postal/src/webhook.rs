//! The courier's webhook: `POST /courier/v1/events` over HTTP/1.1 (TLS is the ingress's job), a JSON
//! body signed with HMAC-SHA256: `X-Courier-Timestamp: <unix seconds>` and
//! `X-Courier-Signature: sha256=<hex of HMAC(secret, "<timestamp>.<body>")>`.
//!
//! Answers: 200 with the counts; 401 unsigned, bad or stale signature; 400 malformed JSON or a bad
//! event (unknown status, bad waybill...); 413 body over 64 KiB; 411 without Content-Length; 404/405
//! elsewhere; 503 when storage is away. Every refusal happens before anything is written, and a body's
//! events are written all together or not at all. One request per connection.

use std::future::Future;
use std::time::Duration;

use socialcard_server::ApiError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::app::Postal;
use crate::feed::{self, MAX_WEBHOOK_BODY, Source};

pub const PATH: &str = "/courier/v1/events";
pub const TIMESTAMP_HEADER: &str = "x-courier-timestamp";
pub const SIGNATURE_HEADER: &str = "x-courier-signature";
const MAX_HEAD: usize = 8 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
const DRAIN_LIMIT: usize = 1024 * 1024;

/// A request's head, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub path: String,
    /// Header names lowercased, values trimmed, in order.
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }
}

/// An HTTP answer: status line, machine-readable reason and a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    fn error(status: u16, reason: &str, message: &str) -> Reply {
        Reply { status, body: serde_json::json!({ "error": reason, "message": message }).to_string() }
    }
}

fn status_text(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "Service Unavailable",
    }
}

/// Parses a request head (request line and headers, without the blank line).
pub fn parse_head(head: &[u8]) -> Result<Head, Reply> {
    let bad = || Reply::error(400, "MALFORMED_REQUEST", "the request head is not HTTP/1.1");
    let text = std::str::from_utf8(head).map_err(|_| bad())?;
    let mut lines = text.split("\r\n");
    let mut request_line = lines.next().ok_or_else(bad)?.split(' ');
    let (Some(method), Some(path), Some(version), None) =
        (request_line.next(), request_line.next(), request_line.next(), request_line.next())
    else {
        return Err(bad());
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || !path.starts_with('/') {
        return Err(bad());
    }
    let mut headers = Vec::new();
    for line in lines {
        if line.is_empty() {
            continue;
        }
        let (name, value) = line.split_once(':').ok_or_else(bad)?;
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(bad());
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok(Head { method: method.to_string(), path: path.to_string(), headers })
}

/// What to do with a request whose head is `head`, before reading its body: `Ok(length)` to read
/// `length` bytes, or the refusal.
pub fn check_head(head: &Head) -> Result<usize, Reply> {
    let path = head.path.split('?').next().unwrap_or_default();
    if path != PATH {
        return Err(Reply::error(404, "NOT_FOUND", "the courier posts to /courier/v1/events"));
    }
    if head.method != "POST" {
        return Err(Reply::error(405, "METHOD_NOT_ALLOWED", "POST only"));
    }
    if head.header(TIMESTAMP_HEADER).is_none() || head.header(SIGNATURE_HEADER).is_none() {
        let e = feed::SignatureError::Missing;
        return Err(Reply::error(401, e.reason(), &e.to_string()));
    }
    if head.header("transfer-encoding").is_some() {
        return Err(Reply::error(411, "LENGTH_REQUIRED", "send the body with a Content-Length"));
    }
    let length = head
        .header("content-length")
        .ok_or_else(|| Reply::error(411, "LENGTH_REQUIRED", "send the body with a Content-Length"))?
        .parse::<u64>()
        .map_err(|_| Reply::error(400, "MALFORMED_REQUEST", "Content-Length is not a number"))?;
    if length > MAX_WEBHOOK_BODY as u64 {
        return Err(Reply::error(413, "BODY_TOO_LARGE", "a body is at most 64 KiB"));
    }
    Ok(usize::try_from(length).unwrap_or(MAX_WEBHOOK_BODY))
}

/// Checks the signature and the events, then writes them: every refusal comes before the write.
pub async fn handle(postal: &Postal, head: &Head, body: &[u8]) -> Reply {
    let now = postal.now();
    let secret = &postal.config().webhook_secret;
    if let Err(e) =
        feed::verify_signature(secret, head.header(TIMESTAMP_HEADER), head.header(SIGNATURE_HEADER), body, now)
    {
        tracing::warn!(reason = e.reason(), "webhook request refused");
        return Reply::error(401, e.reason(), &e.to_string());
    }
    let updates = match feed::parse_webhook_body(body, now) {
        Ok(u) => u,
        Err(r) => return Reply::error(400, r.reason, &r.message),
    };
    match postal.ingest(updates, Source::Webhook).await {
        Ok(r) => Reply {
            status: 200,
            body: serde_json::json!({
                "applied": r.applied,
                "duplicates": r.duplicates,
                "unknown_waybills": r.unknown_waybills,
                "out_of_order": r.out_of_order,
            })
            .to_string(),
        },
        Err(ApiError::Rejected(r)) => Reply::error(400, r.reason, &r.message),
        Err(ApiError::Unavailable(m)) => {
            tracing::warn!(error = %m, "webhook: storage unavailable");
            Reply::error(503, "STORAGE_UNAVAILABLE", "storage is unavailable, retry later")
        }
        Err(ApiError::Internal(m)) => {
            tracing::error!(error = %m, "webhook: internal error");
            Reply::error(500, "INTERNAL", "internal error")
        }
    }
}

async fn read_head(socket: &mut TcpStream) -> Result<(Vec<u8>, Vec<u8>), Reply> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            buf.truncate(end);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(Reply::error(431, "HEAD_TOO_LARGE", "the request head is over 8 KiB"));
        }
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(Reply::error(400, "MALFORMED_REQUEST", "the request ended early")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn respond(socket: &mut TcpStream, reply: &Reply) {
    let response = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        reply.status,
        status_text(reply.status),
        reply.body.len(),
        reply.body
    );
    let _ = socket.write_all(response.as_bytes()).await;
    let _ = socket.shutdown().await;
    // A refusal may come before the client finished sending its body: closing with unread bytes would
    // reset the connection and lose the answer, so read what it still sends for a moment first.
    let mut sink = [0u8; 8192];
    let mut left = DRAIN_LIMIT;
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while left > 0 {
            match socket.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

async fn connection(postal: Postal, mut socket: TcpStream) {
    let request = async {
        let (head_bytes, mut body) = read_head(&mut socket).await?;
        let head = parse_head(&head_bytes)?;
        let length = check_head(&head)?;
        if body.len() > length {
            return Err(Reply::error(400, "MALFORMED_REQUEST", "more bytes than Content-Length"));
        }
        let mut chunk = vec![0u8; 8192];
        while body.len() < length {
            match socket.read(&mut chunk).await {
                Ok(0) | Err(_) => return Err(Reply::error(400, "MALFORMED_REQUEST", "the body ended early")),
                Ok(n) => body.extend_from_slice(&chunk[..n.min(length - body.len())]),
            }
        }
        Ok((head, body))
    };
    let reply = match tokio::time::timeout(READ_TIMEOUT, request).await {
        Err(_) => Reply::error(408, "REQUEST_TIMEOUT", "the request was not sent in time"),
        Ok(Err(reply)) => reply,
        Ok(Ok((head, body))) => handle(&postal, &head, &body).await,
    };
    respond(&mut socket, &reply).await;
}

/// Serves the webhook on `listener` until `shutdown` completes.
pub async fn serve(listener: TcpListener, postal: Postal, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let socket = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook accept failed");
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        tokio::spawn(connection(postal.clone(), socket));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn heads() {
        let h = parse_head(b"POST /courier/v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\nX-Courier-Timestamp: 1\r\nX-Courier-Signature: sha256=00").unwrap();
        assert_eq!(h.header("content-length"), Some("12"));
        assert_eq!(check_head(&h), Ok(12));
        let big = parse_head(
            b"POST /courier/v1/events HTTP/1.1\r\nContent-Length: 70000\r\nX-Courier-Timestamp: 1\r\nX-Courier-Signature: s",
        )
        .unwrap();
        assert_eq!(check_head(&big).unwrap_err().status, 413);
        let unsigned = parse_head(b"POST /courier/v1/events HTTP/1.1\r\nContent-Length: 2").unwrap();
        assert_eq!(check_head(&unsigned).unwrap_err().status, 401);
        let elsewhere = parse_head(b"GET / HTTP/1.1").unwrap();
        assert_eq!(check_head(&elsewhere).unwrap_err().status, 404);
        assert_eq!(parse_head(b"garbage").unwrap_err().status, 400);
    }

    proptest! {
        #[test]
        fn head_parser_never_panics(head in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(h) = parse_head(&head) {
                let _ = check_head(&h);
            }
        }

        #[test]
        fn head_parser_on_http_like_input(lines in proptest::collection::vec("[A-Za-z0-9:/ .-]{0,40}", 0..8)) {
            let head = format!("POST /courier/v1/events HTTP/1.1\r\n{}", lines.join("\r\n"));
            if let Ok(h) = parse_head(head.as_bytes()) {
                let _ = check_head(&h);
            }
        }
    }
}
