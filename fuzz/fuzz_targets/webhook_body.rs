//! The webhook's JSON body parser: any bytes parse into checked updates or a refusal, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = time::OffsetDateTime::from_unix_timestamp(1_795_000_000).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    if let Err(r) = socialcard_postal::feed::parse_webhook_body(data, now) {
        socialcard_fuzz::check_rejection("parse_webhook_body", &r, &[]);
    }
});
