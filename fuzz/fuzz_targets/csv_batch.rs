//! The CSV batch file parser (the CLI's import): any text parses or reports its bad lines, each with a reason.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(lines) = socialcard_postal::feed::parse_csv(text, time::OffsetDateTime::UNIX_EPOCH) {
            assert!(!lines.is_empty(), "a refused file names its bad lines");
            for (line, r) in &lines {
                assert!(*line >= 1, "line numbers count from 1: {line}");
                socialcard_fuzz::check_rejection("parse_csv", r, &[]);
            }
        }
    }
});
