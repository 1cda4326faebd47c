//! The courier's feeds, parsed and checked before anything is written: the webhook's signed JSON
//! bodies, the CSV batch files and the gRPC stream's messages all become [`Update`]s here, or a
//! [`Rejection`] that says which field is wrong. Pure: no I/O, no clock (the caller passes `now`).

use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha2::Sha256;
use socialcard_domain::Rejection;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::status::{Status, normalise};

/// Webhook bodies larger than this are refused (413) before they are read.
pub const MAX_WEBHOOK_BODY: usize = 64 * 1024;
/// Events in one webhook body.
pub const MAX_WEBHOOK_EVENTS: usize = 500;
/// How far a signed request's timestamp may be from now, either way.
pub const SIGNATURE_TOLERANCE_SECS: i64 = 300;
/// A courier's clock may run a little ahead of ours; an event further in the future is refused.
pub const FUTURE_TOLERANCE_SECS: i64 = 300;
const MAX_TEXT: usize = 64;

/// A UPU S10 item identifier, as postal issues them for its shipments: two letters, an 8-digit serial,
/// a check digit and the country (`SC12345678 5CN` without the space).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Waybill(String);

const S10_WEIGHTS: [u32; 8] = [8, 6, 4, 2, 3, 5, 9, 7];

fn s10_check(serial: &[u8]) -> u8 {
    let sum: u32 = serial.iter().zip(S10_WEIGHTS).map(|(d, w)| u32::from(d - b'0') * w).sum();
    match 11 - sum % 11 {
        10 => b'0',
        11 => b'5',
        c => b'0' + c as u8,
    }
}

impl Waybill {
    /// The waybill with serial `serial` (taken modulo 10^8).
    pub fn issue(serial: u64) -> Waybill {
        let digits = format!("{:08}", serial % 100_000_000);
        let check = s10_check(digits.as_bytes()) as char;
        Waybill(format!("SC{digits}{check}CN"))
    }

    pub fn parse(field: &'static str, value: &str) -> Result<Waybill, Rejection> {
        let v = value.trim().to_ascii_uppercase();
        let b = v.as_bytes();
        let shaped = b.len() == 13
            && b[..2].iter().all(u8::is_ascii_uppercase)
            && b[2..11].iter().all(u8::is_ascii_digit)
            && b[11..].iter().all(u8::is_ascii_uppercase);
        if !shaped {
            return Err(Rejection::invalid(
                field,
                "WAYBILL_FORMAT",
                "a waybill is two letters, nine digits and two letters (UPU S10)",
            ));
        }
        if s10_check(&b[2..10]) != b[10] {
            return Err(Rejection::invalid(field, "WAYBILL_CHECK_DIGIT", "the waybill's check digit is wrong"));
        }
        Ok(Waybill(v))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Waybill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which feed an update came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Webhook,
    Stream,
    Csv,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Webhook => "webhook",
            Source::Stream => "stream",
            Source::Csv => "csv",
        }
    }
}

/// One courier status update, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Update {
    pub courier_event_id: String,
    pub waybill: Waybill,
    pub status: Status,
    pub sub_reason: String,
    pub occurred_at: OffsetDateTime,
    pub point_id: Option<String>,
}

/// Printable text of at most 64 characters; `required` refuses an empty one.
pub fn text(field: &'static str, value: &str, required: bool) -> Result<String, Rejection> {
    let v = value.trim();
    if required && v.is_empty() {
        return Err(Rejection::invalid(field, "FIELD_REQUIRED", format!("{field} is required")));
    }
    if v.chars().count() > MAX_TEXT || v.chars().any(char::is_control) {
        return Err(Rejection::invalid(field, "FIELD_FORMAT", format!("{field} is at most 64 printable characters")));
    }
    Ok(v.to_string())
}

fn occurred_at(value: OffsetDateTime, now: OffsetDateTime) -> Result<OffsetDateTime, Rejection> {
    if value > now + time::Duration::seconds(FUTURE_TOLERANCE_SECS) {
        return Err(Rejection::invalid("occurred_at", "OCCURRED_AT_IN_FUTURE", "the event's time lies in the future"));
    }
    if value.year() < 2000 {
        return Err(Rejection::invalid("occurred_at", "OCCURRED_AT_FORMAT", "the event's time is implausibly old"));
    }
    Ok(value)
}

fn parse_time(value: &str) -> Result<OffsetDateTime, Rejection> {
    OffsetDateTime::parse(value.trim(), &Rfc3339).map_err(|_| {
        Rejection::invalid("occurred_at", "OCCURRED_AT_FORMAT", "occurred_at is an RFC 3339 time with its offset")
    })
}

/// An update as a feed sent it, before checking.
#[derive(Clone, Copy, Debug)]
pub struct RawUpdate<'a> {
    pub courier_event_id: &'a str,
    pub waybill: &'a str,
    pub status: Status,
    /// The sub-reason the courier's code implies; `sub_reason`, when given, refines it.
    pub default_reason: &'a str,
    pub sub_reason: &'a str,
    pub occurred_at: OffsetDateTime,
    pub point_id: &'a str,
}

impl RawUpdate<'_> {
    /// Checks the fields shared by every feed.
    pub fn check(&self, now: OffsetDateTime) -> Result<Update, Rejection> {
        let sub_reason = text("sub_reason", self.sub_reason, false)?;
        let point_id = text("point_id", self.point_id, false)?;
        Ok(Update {
            courier_event_id: text("courier_event_id", self.courier_event_id, true)?,
            waybill: Waybill::parse("waybill", self.waybill)?,
            status: self.status,
            sub_reason: if sub_reason.is_empty() { self.default_reason.to_string() } else { sub_reason },
            occurred_at: occurred_at(self.occurred_at, now)?,
            point_id: if point_id.is_empty() { None } else { Some(point_id) },
        })
    }
}

fn status_code(code: &str) -> Result<(Status, &'static str), Rejection> {
    if code.trim().is_empty() {
        return Err(Rejection::invalid("status", "FIELD_REQUIRED", "status is required"));
    }
    normalise(code)
        .ok_or_else(|| Rejection::invalid("status", "UNKNOWN_STATUS", "the status code is not one postal knows"))
}

/// One event of a webhook body.
#[derive(Debug, Deserialize)]
struct WebhookEvent {
    event_id: String,
    waybill: String,
    status: String,
    #[serde(default)]
    sub_reason: String,
    occurred_at: String,
    #[serde(default)]
    point_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum WebhookBody {
    Batch { events: Vec<WebhookEvent> },
    One(WebhookEvent),
}

/// A webhook body: one event object, or `{"events": [...]}` with up to [`MAX_WEBHOOK_EVENTS`]. All or
/// nothing: one bad event refuses the body.
pub fn parse_webhook_body(body: &[u8], now: OffsetDateTime) -> Result<Vec<Update>, Rejection> {
    let parsed: WebhookBody = serde_json::from_slice(body).map_err(|e| {
        Rejection::invalid("body", "MALFORMED_JSON", format!("the body is not a status event in JSON: {e}"))
    })?;
    let events = match parsed {
        WebhookBody::Batch { events } => events,
        WebhookBody::One(e) => vec![e],
    };
    if events.is_empty() || events.len() > MAX_WEBHOOK_EVENTS {
        return Err(Rejection::invalid("events", "BATCH_SIZE", "a body carries 1 to 500 events"));
    }
    events
        .iter()
        .map(|e| {
            let (status, reason) = status_code(&e.status)?;
            RawUpdate {
                courier_event_id: &e.event_id,
                waybill: &e.waybill,
                status,
                default_reason: reason,
                sub_reason: &e.sub_reason,
                occurred_at: parse_time(&e.occurred_at)?,
                point_id: &e.point_id,
            }
            .check(now)
        })
        .collect()
}

/// Why a webhook request's signature is refused (401).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the request is not signed")]
    Missing,
    #[error("the signature or timestamp header is malformed")]
    Malformed,
    #[error("the signature does not match the body")]
    Mismatch,
    #[error("the signed timestamp is too old or too far ahead")]
    Stale,
}

impl SignatureError {
    pub fn reason(self) -> &'static str {
        match self {
            SignatureError::Missing => "SIGNATURE_MISSING",
            SignatureError::Malformed => "SIGNATURE_MALFORMED",
            SignatureError::Mismatch => "SIGNATURE_MISMATCH",
            SignatureError::Stale => "SIGNATURE_STALE",
        }
    }
}

fn mac(secret: &[u8], timestamp: &str, body: &[u8]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// The `X-Courier-Signature` value for `body` signed at `timestamp` (unix seconds): `sha256=<hex>` of
/// HMAC-SHA256 over `"<timestamp>.<body>"`.
pub fn sign(secret: &[u8], timestamp: i64, body: &[u8]) -> String {
    format!("sha256={}", hex::encode(mac(secret, &timestamp.to_string(), body).finalize().into_bytes()))
}

/// Checks a webhook request's signature (constant-time) and that its timestamp is within
/// [`SIGNATURE_TOLERANCE_SECS`] of `now`. The timestamp is signed, so it cannot be moved.
pub fn verify_signature(
    secret: &[u8],
    timestamp: Option<&str>,
    signature: Option<&str>,
    body: &[u8],
    now: OffsetDateTime,
) -> Result<(), SignatureError> {
    let (Some(timestamp), Some(signature)) = (timestamp, signature) else {
        return Err(SignatureError::Missing);
    };
    let timestamp = timestamp.trim();
    let at: i64 = timestamp.parse().map_err(|_| SignatureError::Malformed)?;
    let digest = signature.trim().strip_prefix("sha256=").ok_or(SignatureError::Malformed)?;
    let digest = hex::decode(digest).map_err(|_| SignatureError::Malformed)?;
    mac(secret, timestamp, body).verify_slice(&digest).map_err(|_| SignatureError::Mismatch)?;
    if (now.unix_timestamp() - at).abs() > SIGNATURE_TOLERANCE_SECS {
        return Err(SignatureError::Stale);
    }
    Ok(())
}

/// A CSV batch file's rows: a header naming at least `event_id, waybill, status, occurred_at`
/// (optionally `sub_reason`, `point_id`) in any order, then one event per line. Fields may be quoted
/// (RFC 4180). Every bad line is reported with its number; one bad line refuses the file.
pub fn parse_csv(input: &str, now: OffsetDateTime) -> Result<Vec<Update>, Vec<(usize, Rejection)>> {
    let mut records = csv_records(input).map_err(|(line, r)| vec![(line, r)])?.into_iter();
    let Some((_, header)) = records.next() else {
        return Err(vec![(1, Rejection::invalid("header", "CSV_HEADER", "the file is empty"))]);
    };
    let column = |name: &str| header.iter().position(|h| h.trim().eq_ignore_ascii_case(name));
    let required = ["event_id", "waybill", "status", "occurred_at"];
    let (Some(id), Some(wb), Some(st), Some(at)) =
        (column(required[0]), column(required[1]), column(required[2]), column(required[3]))
    else {
        return Err(vec![(
            1,
            Rejection::invalid(
                "header",
                "CSV_HEADER",
                "the header names event_id, waybill, status and occurred_at (sub_reason, point_id optional)",
            ),
        )]);
    };
    let (reason, point) = (column("sub_reason"), column("point_id"));
    let mut updates = Vec::new();
    let mut errors = Vec::new();
    for (line, fields) in records {
        if fields.len() == 1 && fields[0].trim().is_empty() {
            continue;
        }
        if fields.len() != header.len() {
            errors.push((
                line,
                Rejection::invalid(
                    "row",
                    "CSV_COLUMNS",
                    format!("{} fields, the header has {}", fields.len(), header.len()),
                ),
            ));
            continue;
        }
        let get = |i: Option<usize>| i.and_then(|i| fields.get(i)).map_or("", String::as_str);
        let row = status_code(get(Some(st))).and_then(|(status, default_reason)| {
            RawUpdate {
                courier_event_id: get(Some(id)),
                waybill: get(Some(wb)),
                status,
                default_reason,
                sub_reason: get(reason),
                occurred_at: parse_time(get(Some(at)))?,
                point_id: get(point),
            }
            .check(now)
        });
        match row {
            Ok(u) => updates.push(u),
            Err(r) => errors.push((line, r)),
        }
    }
    if errors.is_empty() { Ok(updates) } else { Err(errors) }
}

/// RFC 4180 records with the line each starts on; a quoted field may span lines.
/// A CSV record: the line it starts on and its fields.
type Record = (usize, Vec<String>);

fn csv_records(input: &str) -> Result<Vec<Record>, (usize, Rejection)> {
    let mut records = Vec::new();
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut line = 1;
    let mut start = 1;
    let mut chars = input.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() => quoted = true,
            ',' => fields.push(std::mem::take(&mut field)),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                fields.push(std::mem::take(&mut field));
                records.push((start, std::mem::take(&mut fields)));
                line += 1;
                start = line;
            }
            _ => field.push(c),
        }
    }
    if quoted {
        return Err((start, Rejection::invalid("row", "CSV_QUOTE", "a quoted field is not closed")));
    }
    if !field.is_empty() || !fields.is_empty() {
        fields.push(field);
        records.push((start, fields));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-23 02:00 UTC);

    #[test]
    fn waybills_carry_an_s10_check_digit() {
        let w = Waybill::issue(47_312_482);
        assert_eq!(w.as_str().len(), 13);
        assert_eq!(Waybill::parse("w", w.as_str()).unwrap(), w);
        // The UPU's own example: serial 47312482, check digit 9 (RR473124829GB).
        assert_eq!(Waybill::issue(47_312_482).as_str(), "SC473124829CN");
        let mut bad = w.as_str().to_string();
        bad.replace_range(10..11, if &bad[10..11] == "1" { "2" } else { "1" });
        assert_eq!(Waybill::parse("w", &bad).unwrap_err().reason, "WAYBILL_CHECK_DIGIT");
        assert_eq!(Waybill::parse("w", "nope").unwrap_err().reason, "WAYBILL_FORMAT");
    }

    #[test]
    fn webhook_bodies_one_or_many() {
        let w = Waybill::issue(1);
        let one = format!(
            r#"{{"event_id":"e1","waybill":"{w}","status":"FAILED_RECIPIENT_ABSENT","occurred_at":"2026-11-23T09:00:00+08:00"}}"#
        );
        let u = parse_webhook_body(one.as_bytes(), NOW).unwrap();
        assert_eq!((u[0].status, u[0].sub_reason.as_str()), (Status::AttemptFailed, "recipient_absent"));
        let many = format!(r#"{{"events":[{one},{one}]}}"#);
        assert_eq!(parse_webhook_body(many.as_bytes(), NOW).unwrap().len(), 2);
        assert_eq!(parse_webhook_body(b"{", NOW).unwrap_err().reason, "MALFORMED_JSON");
        let unknown = one.replace("FAILED_RECIPIENT_ABSENT", "TELEPORTED");
        assert_eq!(parse_webhook_body(unknown.as_bytes(), NOW).unwrap_err().reason, "UNKNOWN_STATUS");
        let future = one.replace("2026-11-23T09", "2026-11-24T09");
        assert_eq!(parse_webhook_body(future.as_bytes(), NOW).unwrap_err().reason, "OCCURRED_AT_IN_FUTURE");
    }

    #[test]
    fn signatures() {
        let body = b"{}";
        let ts = NOW.unix_timestamp();
        let sig = sign(b"secret", ts, body);
        let t = ts.to_string();
        assert_eq!(verify_signature(b"secret", Some(&t), Some(&sig), body, NOW), Ok(()));
        assert_eq!(verify_signature(b"other", Some(&t), Some(&sig), body, NOW), Err(SignatureError::Mismatch));
        assert_eq!(verify_signature(b"secret", Some(&t), Some(&sig), b"{ }", NOW), Err(SignatureError::Mismatch));
        assert_eq!(verify_signature(b"secret", None, Some(&sig), body, NOW), Err(SignatureError::Missing));
        assert_eq!(verify_signature(b"secret", Some(&t), Some("md5=00"), body, NOW), Err(SignatureError::Malformed));
        let old = ts - 301;
        let old_sig = sign(b"secret", old, body);
        assert_eq!(
            verify_signature(b"secret", Some(&old.to_string()), Some(&old_sig), body, NOW),
            Err(SignatureError::Stale)
        );
    }

    #[test]
    fn csv_files_report_every_bad_line() {
        let (a, b) = (Waybill::issue(1), Waybill::issue(2));
        let good = format!(
            "event_id,waybill,status,occurred_at,point_id\r\ne1,{a},accepted,2026-11-23T01:00:00Z,\n\"e,2\",{b},\"ready_at_point\",2026-11-23T01:00:00Z,point-1\n"
        );
        let u = parse_csv(&good, NOW).unwrap();
        assert_eq!(u.len(), 2);
        assert_eq!(u[1].courier_event_id, "e,2");
        assert_eq!(u[1].point_id.as_deref(), Some("point-1"));
        let bad = format!("{good}e3,{a},teleported,2026-11-23T01:00:00Z,\ne4,{a},accepted,yesterday,\ne5,{a}\n");
        let errors = parse_csv(&bad, NOW).unwrap_err();
        let lines: Vec<_> = errors.iter().map(|(l, r)| (*l, r.reason)).collect();
        assert_eq!(lines, vec![(4, "UNKNOWN_STATUS"), (5, "OCCURRED_AT_FORMAT"), (6, "CSV_COLUMNS")]);
        assert_eq!(parse_csv("a,b\n", NOW).unwrap_err()[0].1.reason, "CSV_HEADER");
    }

    proptest! {
        // Arbitrary bytes never panic a parser: they parse or they are refused with a reason.
        #[test]
        fn webhook_parser_never_panics(body in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_webhook_body(&body, NOW);
        }

        #[test]
        fn webhook_parser_on_json_like_input(body in r#"\{("[a-z_]{0,12}":("[-A-Za-z0-9:+T_]{0,30}"|\[\]|1|null),?){0,7}\}"#) {
            let _ = parse_webhook_body(body.as_bytes(), NOW);
        }

        #[test]
        fn csv_parser_never_panics(input in "(?s).{0,400}") {
            let _ = parse_csv(&input, NOW);
        }

        #[test]
        fn csv_parser_on_csv_like_input(rows in proptest::collection::vec("[-a-z0-9_:TZ\",\r]{0,40}", 0..8)) {
            let input = format!("event_id,waybill,status,occurred_at\n{}", rows.join("\n"));
            let _ = parse_csv(&input, NOW);
        }

        #[test]
        fn signature_check_never_panics(ts in ".{0,24}", sig in ".{0,80}", body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = verify_signature(b"k", Some(&ts), Some(&sig), &body, NOW);
        }
    }
}
