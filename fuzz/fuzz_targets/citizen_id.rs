//! R1's citizen ID parser on any text: a refusal says why and never echoes the number; an accepted ID
//! round-trips, carries the right ISO 7064 MOD 11-2 check character and a real birth date, and its
//! masked forms hide the number.
#![no_main]

use libfuzzer_sys::fuzz_target;
use socialcard_domain::CitizenId;
use socialcard_domain::citizen_id::check_char;
use socialcard_fuzz::{TODAY, check_rejection};

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    match CitizenId::parse(raw, TODAY) {
        Err(r) => {
            check_rejection("CitizenId::parse", &r, &[raw]);
            assert_eq!(r.field, Some("citizen_id"));
        }
        Ok(id) => {
            let full = id.expose();
            assert_eq!(full.len(), 18);
            assert_eq!(full, raw.to_ascii_uppercase(), "only a lowercase x is normalised");
            assert!(full[..17].bytes().all(|b| b.is_ascii_digit()), "{full}");
            assert_eq!(check_char(full.as_bytes()), full.as_bytes()[17], "{full}: wrong check character accepted");
            let birth = id.birth_date();
            assert!(birth <= TODAY && birth.year() >= 1900, "{full}: birth date {birth}");
            assert_eq!(&full[6..14], format!("{:04}{:02}{:02}", birth.year(), birth.month() as u8, birth.day()));
            assert!(id.age_on(TODAY) < 130);
            assert_eq!(id.region_code(), &full[..6]);
            assert_ne!(id.province(), "unknown");
            assert_eq!(id.last_six(), &full[12..]);
            // Round trips: parsing the normalised form again, and the stored-value path.
            assert_eq!(CitizenId::parse(full, TODAY).as_ref(), Ok(&id));
            assert_eq!(full.parse::<CitizenId>().as_ref(), Ok(&id));
            // Masked everywhere but expose().
            for shown in [id.masked(), id.to_string(), format!("{id:?}")] {
                assert!(!shown.contains(&full[3..14]), "{shown} shows the number");
            }
        }
    }
});
