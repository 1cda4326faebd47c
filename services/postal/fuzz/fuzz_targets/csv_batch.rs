//! The CSV batch file parser (the CLI's import): any text parses or reports its bad lines.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = socialcard_postal::feed::parse_csv(text, time::OffsetDateTime::UNIX_EPOCH);
    }
});
