//! What every fuzz target checks of a refusal, and the services the request targets run against.
//!
//! A refusal must say why (a non-empty reason code and message; on the wire, a machine-readable reason
//! for every client error) and must never echo the personal data it was sent (`Rejection`'s promise:
//! "Messages never contain personal data"; the bad-input suite's check, here for arbitrary input): no six
//! consecutive digits of an ID number, phone, PIN or account number the request carried.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use socialcard_domain::{Rejection, RejectionKind};
use time::{Date, OffsetDateTime};
use tonic::{Code, Status};

/// "Today" for the validators: birth dates after it are refused.
pub const TODAY: Date = time::macros::date!(2026 - 11 - 23);

/// Noon of [`TODAY`], Shanghai time, as the services' clock.
pub fn now() -> OffsetDateTime {
    time::macros::datetime!(2026-11-23 04:00 UTC)
}

/// The runs of at least six consecutive ASCII digits in `s` (ID numbers, phones, card and account numbers).
fn digit_runs(s: &str) -> Vec<&str> {
    s.split(|c: char| !c.is_ascii_digit()).filter(|r| r.len() >= 6).collect()
}

/// Panics if `text` repeats any six consecutive digits of `secret`. Only digits: a whole-string check
/// would be found out at once, the fuzzer learning the refusal's own words from the comparison and
/// sending them back as the "secret".
pub fn assert_no_echo(what: &str, text: &str, secret: &str) {
    for run in digit_runs(secret) {
        for w in run.as_bytes().windows(6) {
            let w = std::str::from_utf8(w).unwrap_or_default();
            assert!(!text.contains(w), "{what}: the refusal echoes digits {w:?} of {secret:?}: {text:?}");
        }
    }
}

/// A domain rejection of bad input: says why, names its field, echoes none of `secrets`.
pub fn check_rejection(what: &str, r: &Rejection, secrets: &[&str]) {
    assert!(!r.reason.is_empty(), "{what}: a rejection without a reason: {r:?}");
    assert!(r.reason.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'), "{what}: {r:?}");
    assert!(!r.message.trim().is_empty(), "{what}: a rejection without a message: {r:?}");
    if r.kind == RejectionKind::InvalidArgument {
        assert!(r.field.is_some_and(|f| !f.is_empty()), "{what}: an invalid argument names its field: {r:?}");
    }
    for s in secrets {
        assert_no_echo(what, &r.message, s);
    }
}

/// A service's error status: never an internal error or a panic's UNKNOWN for bad input, a
/// machine-readable reason on every client error, and none of `secrets` in its message or details.
pub fn check_status(what: &str, s: &Status, secrets: &[&str]) {
    assert!(!matches!(s.code(), Code::Internal | Code::Unknown), "{what}: bad input made an internal error: {s:?}");
    assert!(!s.message().trim().is_empty(), "{what}: a status without a message: {s:?}");
    if matches!(
        s.code(),
        Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::NotFound
            | Code::PermissionDenied
            | Code::AlreadyExists
    ) {
        let reason = socialcard_server::error::reason_of(s);
        assert!(reason.as_deref().is_some_and(|r| !r.is_empty()), "{what}: a refusal without a reason: {s:?}");
    }
    let details = String::from_utf8_lossy(s.details());
    for secret in secrets {
        assert_no_echo(what, s.message(), secret);
        assert_no_echo(what, &details, secret);
    }
}

/// A fresh directory for one fuzzing process's databases (removed at exit is not needed: the OS's tmp).
pub fn scratch_dir(name: &str) -> std::path::PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "socialcard-fuzz-{name}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("scratch dir {}: {e}", dir.display()));
    dir
}

/// One single-threaded runtime per fuzzing process.
pub fn block_on<F: Future>(f: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"));
    }
    RT.with(|rt| rt.block_on(f))
}

/// A channel to a port nothing listens on: the services' calls to the registry fail fast (UNAVAILABLE),
/// so only their own validation decides. Call it inside [`block_on`] (the channel's worker needs the runtime).
pub fn dead_channel() -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_static("http://127.0.0.1:9")
        .connect_timeout(std::time::Duration::from_millis(50))
        .timeout(std::time::Duration::from_millis(200))
        .connect_lazy()
}

/// Splits off the first byte as a selector.
pub fn select(data: &[u8]) -> Option<(u8, &[u8])> {
    data.split_first().map(|(s, rest)| (*s, rest))
}
