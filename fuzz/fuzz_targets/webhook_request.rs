//! The webhook's request head and signature checks: the first bytes up to a blank line are the head,
//! the rest the body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use socialcard_postal::{feed, webhook};

fuzz_target!(|data: &[u8]| {
    let split = data.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(data.len());
    let (head, body) = data.split_at(split);
    if let Ok(h) = webhook::parse_head(head) {
        let _ = webhook::check_head(&h);
        let now = time::OffsetDateTime::UNIX_EPOCH;
        let _ = feed::verify_signature(
            b"secret",
            h.header(webhook::TIMESTAMP_HEADER),
            h.header(webhook::SIGNATURE_HEADER),
            body,
            now,
        );
    }
});
