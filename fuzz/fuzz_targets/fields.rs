//! The single-field validators requests go through at the edge: card numbers (R5), bank account numbers
//! (R4), social PINs (R29), and the registry's free text, phone, idempotency key, card id and timestamp
//! checks. The first byte picks the validator, the rest is the value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use socialcard_domain::card::validate_pin;
use socialcard_domain::{BankAccountNumber, CardNumber};
use socialcard_fuzz::{check_rejection, select};
use socialcard_registry::convert;

fuzz_target!(|data: &[u8]| {
    let Some((which, rest)) = select(data) else { return };
    if which % 8 == 7 {
        // A timestamp: twelve bytes of seconds and nanos.
        let Some(b) = rest.get(..12) else { return };
        let seconds = i64::from_le_bytes(b[..8].try_into().unwrap_or_default());
        let nanos = i32::from_le_bytes(b[8..12].try_into().unwrap_or_default());
        match convert::from_timestamp("at", &prost_types::Timestamp { seconds, nanos }) {
            Ok(t) => {
                assert_eq!(convert::timestamp(t), prost_types::Timestamp { seconds, nanos }, "round trip");
            }
            Err(r) => check_rejection("from_timestamp", &r, &[]),
        }
        return;
    }
    let Ok(raw) = std::str::from_utf8(rest) else { return };
    match which % 8 {
        0 => match CardNumber::parse(raw) {
            Ok(n) => {
                assert_eq!(n.as_str(), raw);
                let series = raw.chars().next().unwrap_or('A');
                let seq: u64 = raw[1..8].parse().unwrap_or_else(|_| panic!("{raw}: digits"));
                assert_eq!(CardNumber::issue(series, seq), n, "{raw}: the check digit is the issuer's");
            }
            Err(r) => check_rejection("CardNumber::parse", &r, &[raw]),
        },
        1 => match BankAccountNumber::parse(raw) {
            Ok(n) => {
                assert_eq!(n.expose(), raw);
                let masked = n.masked();
                assert_eq!(masked.len(), raw.len());
                assert_eq!(masked, format!("{}{}{}", &raw[..6], "*".repeat(raw.len() - 10), &raw[raw.len() - 4..]));
                assert!(!format!("{n:?}").contains(raw));
            }
            Err(r) => check_rejection("BankAccountNumber::parse", &r, &[raw]),
        },
        2 => match validate_pin("pin", raw) {
            Ok(()) => assert!(raw.len() == 6 && raw.bytes().all(|b| b.is_ascii_digit()), "{raw:?}"),
            Err(r) => check_rejection("validate_pin", &r, &[raw]),
        },
        3 => match convert::text("name", raw, 50) {
            Ok(t) => {
                assert_eq!(t, raw.trim());
                assert!(t.chars().count() <= 50 && !t.chars().any(char::is_control), "{t:?}");
            }
            Err(r) => check_rejection("text", &r, &[raw]),
        },
        4 => match convert::phone("phone", raw) {
            Ok(p) => {
                let digits = p.strip_prefix('+').unwrap_or(&p);
                assert!((5..=20).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()), "{p:?}");
            }
            Err(r) => check_rejection("phone", &r, &[raw]),
        },
        5 => match convert::idempotency_key(raw) {
            Ok(k) => assert!((1..=128).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()), "{k:?}"),
            Err(r) => check_rejection("idempotency_key", &r, &[]),
        },
        _ => match convert::card_id(raw) {
            Ok(id) => assert_eq!(convert::card_id(&id).as_deref(), Ok(id.as_str()), "a card id is canonical"),
            Err(r) => check_rejection("card_id", &r, &[]),
        },
    }
});
