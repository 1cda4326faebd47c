//! R9's uploaded photo: any bytes as the JPEG are refused with a reason that never names the holder, or
//! accepted only as a 358x441 JPEG within 40 KB. An odd first byte also fuzzes the file name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use socialcard_domain::photo::{PHOTO_HEIGHT, PHOTO_MAX_BYTES, PHOTO_WIDTH, jpeg_dimensions, validate_upload};
use socialcard_fuzz::{check_rejection, select};

const HOLDER: &str = "11010519491231002X";

fuzz_target!(|data: &[u8]| {
    let Some((flags, rest)) = select(data) else { return };
    let (name, jpeg) = if flags & 1 == 1 {
        let split = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        (String::from_utf8_lossy(&rest[..split]).into_owned(), rest.get(split + 1..).unwrap_or_default())
    } else {
        (format!("{HOLDER}.jpg"), rest)
    };
    let dims = jpeg_dimensions(jpeg);
    match validate_upload(jpeg, &name, HOLDER) {
        Ok(()) => {
            assert!(jpeg.len() <= PHOTO_MAX_BYTES);
            assert_eq!(dims, Some((PHOTO_WIDTH, PHOTO_HEIGHT)));
            assert!(name.eq_ignore_ascii_case(&format!("{HOLDER}.jpg")));
        }
        Err(r) => check_rejection("validate_upload", &r, &[HOLDER]),
    }
});
