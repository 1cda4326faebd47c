//! The web dashboard over plain HTTP/1.1 on tokio: `GET /` the page (HTML with inline JS and SVG, no
//! external resources, so it works offline), `GET /api/overview` the JSON it polls every second (built
//! by the same use cases as the gRPC API), `GET /metrics` ops' gauges in the Prometheus text format.
//! Read-only: every other method or path is refused.

use std::future::Future;

use serde_json::{Map, Value, json};
use socialcard_server::ApiError;
use time::format_description::well_known::Rfc3339;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::app::{FunnelQuery, Ops};
use crate::store::{Grouping, StateCount};

const PAGE: &str = include_str!("dashboard.html");
const MAX_HEAD: usize = 8 * 1024;

/// One group's cards: its name, total, and counts by state of the physical, social and financial functions.
type GroupCounts = (String, u64, Map<String, Value>, Map<String, Value>, Map<String, Value>);

/// Cards of each group by the state of each function: `[{group, total, physical: {state: n}, ...}]`.
fn by_group(rows: &[StateCount]) -> Value {
    let mut groups: Vec<GroupCounts> = Vec::new();
    for r in rows {
        if groups.last().is_none_or(|g| g.0 != r.group) {
            groups.push((r.group.clone(), 0, Map::new(), Map::new(), Map::new()));
        }
        let Some(g) = groups.last_mut() else { continue };
        g.1 += r.count;
        for (map, state) in [(&mut g.2, &r.physical), (&mut g.3, &r.social), (&mut g.4, &r.financial)] {
            let n = map.get(state).and_then(Value::as_u64).unwrap_or(0) + r.count;
            map.insert(state.clone(), json!(n));
        }
    }
    Value::Array(
        groups
            .into_iter()
            .map(|(group, total, physical, social, financial)| {
                json!({"group": group, "total": total, "physical": physical, "social": social, "financial": financial})
            })
            .collect(),
    )
}

/// Everything the page shows, in one document.
pub async fn overview(ops: &Ops) -> Result<Value, ApiError> {
    let by_bank = ops.card_counts(Grouping::Bank, "").await?;
    let by_district = ops.card_counts(Grouping::District, "").await?;
    let funnel = ops.funnel(&FunnelQuery::default()).await?;
    let loss = ops.loss_summary("").await?;
    let (overdue_total, overdue) = ops.overdue_shipments(0, 20).await?;
    let dead = ops.dead_letters().await?;
    let format = |t: time::OffsetDateTime| t.format(&Rfc3339).unwrap_or_default();
    Ok(json!({
        "generated_at": format(ops.now()),
        "cards": {
            "total": by_bank.iter().map(|r| r.count).sum::<u64>(),
            "by_bank": by_group(&by_bank),
            "by_district": by_group(&by_district),
        },
        "funnel": funnel.iter().map(|s| json!({
            "stage": s.stage.as_str(),
            "count": s.count,
            "median_micros": s.median_micros,
            "timed": s.timed,
        })).collect::<Vec<_>>(),
        "loss": {
            "open": loss.open,
            "one_sided": loss.one_sided,
            "expired": loss.expired,
            "by_state": loss.by_state.iter().map(|(s, n)| (s.clone(), json!(n))).collect::<Map<_, _>>(),
            "one_sided_cases": loss.one_sided_cases.iter().map(|c| json!({
                "case_id": c.case_id,
                "card_id": c.card_id,
                "bank_code": c.bank_code,
                "loss_kind": c.loss_kind,
                "locked": if c.social_locked { "social" } else if c.financial_frozen { "financial" } else { "neither" },
                "opened_at": format(c.opened_at),
                "updated_at": format(c.updated_at),
            })).collect::<Vec<_>>(),
        },
        "overdue": {
            "days": ops.overdue_days(),
            "total": overdue_total,
            "shipments": overdue.iter().map(|s| json!({
                "card_id": s.card_id,
                "waybill": s.waybill,
                "milestone": s.milestone,
                "opened_at": format(s.opened_at),
            })).collect::<Vec<_>>(),
        },
        "dead_letters": {
            "total": dead.iter().map(|(_, n)| n).sum::<u64>(),
            "by_group": dead.iter().map(|(g, n)| (g.clone(), json!(n))).collect::<Map<_, _>>(),
        },
    }))
}

/// Ops' gauges in the Prometheus text format.
pub async fn metrics(ops: &Ops) -> Result<String, ApiError> {
    let loss = ops.loss_summary("").await?;
    let dead: u64 = ops.dead_letters().await?.iter().map(|(_, n)| n).sum();
    let (overdue, _) = ops.overdue_shipments(0, 1).await?;
    let mut out = String::new();
    for (name, help, value) in [
        ("socialcard_ops_loss_cases_open", "Loss cases not yet over (locking, locked, one-sided).", loss.open),
        ("socialcard_ops_loss_cases_one_sided", "Open loss cases with one side confirmed.", loss.one_sided),
        ("socialcard_ops_dead_letters", "Events the consumers dead-lettered.", dead),
        ("socialcard_ops_overdue_shipments", "Shipments open longer than the overdue threshold.", overdue),
    ] {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"));
    }
    Ok(out)
}

async fn respond(ops: &Ops, method: &str, path: &str) -> (&'static str, &'static str, String) {
    const JSON: &str = "application/json";
    if method != "GET" {
        return ("405 Method Not Allowed", "text/plain", "the dashboard is read-only\n".into());
    }
    let path = path.split('?').next().unwrap_or_default();
    match path {
        "/" | "/index.html" => ("200 OK", "text/html; charset=utf-8", PAGE.to_string()),
        "/api/overview" => match overview(ops).await {
            Ok(v) => ("200 OK", JSON, v.to_string()),
            Err(e) => {
                tracing::warn!(error = %e, "dashboard overview failed");
                ("503 Service Unavailable", JSON, json!({"error": "read models unavailable"}).to_string())
            }
        },
        "/metrics" => match metrics(ops).await {
            Ok(text) => ("200 OK", "text/plain; version=0.0.4", text),
            Err(_) => ("503 Service Unavailable", "text/plain", "read models unavailable\n".into()),
        },
        _ => ("404 Not Found", "text/plain", "not found\n".into()),
    }
}

/// Serves the dashboard on `listener` until `shutdown` completes.
pub async fn serve(listener: TcpListener, ops: Ops, shutdown: impl Future<Output = ()>) {
    tokio::pin!(shutdown);
    loop {
        let (mut socket, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "dashboard accept failed");
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let ops = ops.clone();
        tokio::spawn(async move {
            let mut head = Vec::with_capacity(512);
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
                match socket.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let line = String::from_utf8_lossy(head.split(|b| *b == b'\r').next().unwrap_or_default()).into_owned();
            let mut parts = line.split(' ');
            let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
            let (status, content_type, body) = respond(&ops, method, path).await;
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}
