//! R9: where the card's photo comes from, and what an uploaded photo must be.

use serde::{Deserialize, Serialize};

use crate::rejection::Rejection;

pub const PHOTO_WIDTH: u16 = 358;
pub const PHOTO_HEIGHT: u16 = 441;
pub const PHOTO_MAX_BYTES: usize = 40 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PhotoSource {
    /// Preschool children's cards carry no photo.
    None,
    CommunityPoint,
    IdCard,
    StudentCard,
    Upload,
}

/// Checks an uploaded photo: a JPEG of 358x441 px, at most 40 KB, named `<citizen id>.jpg`.
pub fn validate_upload(jpeg: &[u8], file_name: &str, citizen_id: &str) -> Result<(), Rejection> {
    let field = "photo";
    if jpeg.len() > PHOTO_MAX_BYTES {
        return Err(Rejection::invalid(
            field,
            "PHOTO_TOO_LARGE",
            format!("the photo has {} bytes; at most {PHOTO_MAX_BYTES} are allowed", jpeg.len()),
        ));
    }
    let expected = format!("{citizen_id}.jpg");
    if !file_name.eq_ignore_ascii_case(&expected) {
        return Err(Rejection::invalid(
            "photo.file_name",
            "PHOTO_FILE_NAME",
            "the photo file must be named by the holder's ID number, with .jpg",
        ));
    }
    let (w, h) = jpeg_dimensions(jpeg)
        .ok_or_else(|| Rejection::invalid(field, "PHOTO_NOT_JPEG", "the photo is not a readable JPEG"))?;
    if (w, h) != (PHOTO_WIDTH, PHOTO_HEIGHT) {
        return Err(Rejection::invalid(
            field,
            "PHOTO_DIMENSIONS",
            format!("the photo is {w}x{h} px; ID-photo style needs {PHOTO_WIDTH}x{PHOTO_HEIGHT}"),
        ));
    }
    Ok(())
}

/// Width and height from the first start-of-frame segment of a JPEG.
pub fn jpeg_dimensions(data: &[u8]) -> Option<(u16, u16)> {
    if data.get(..2)? != [0xFF, 0xD8] {
        return None;
    }
    let mut i = 2;
    while i + 4 <= data.len() {
        if data[i] != 0xFF {
            return None;
        }
        let marker = data[i + 1];
        if marker == 0xFF {
            i += 1;
            continue;
        }
        let len = usize::from(u16::from_be_bytes([data[i + 2], data[i + 3]]));
        // SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC).
        if (0xC0..=0xCF).contains(&marker) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
            let seg = data.get(i + 4..i + 2 + len)?;
            let h = u16::from_be_bytes([*seg.get(1)?, *seg.get(2)?]);
            let w = u16::from_be_bytes([*seg.get(3)?, *seg.get(4)?]);
            return Some((w, h));
        }
        if len < 2 {
            return None;
        }
        i += 2 + len;
    }
    None
}

/// A minimal JPEG header of the given size (SOI, SOF0, EOI), for tests and demos.
pub fn minimal_jpeg(width: u16, height: u16) -> Vec<u8> {
    let mut v = vec![0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x11, 0x08];
    v.extend_from_slice(&height.to_be_bytes());
    v.extend_from_slice(&width.to_be_bytes());
    v.extend_from_slice(&[0x03, 0x01, 0x22, 0x00, 0x02, 0x11, 0x01, 0x03, 0x11, 0x01, 0xFF, 0xD9]);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_dimensions_and_checks_the_upload() {
        let ok = minimal_jpeg(358, 441);
        assert_eq!(jpeg_dimensions(&ok), Some((358, 441)));
        assert!(validate_upload(&ok, "11010519491231002X.jpg", "11010519491231002X").is_ok());
        let r = |j: &[u8], n: &str| validate_upload(j, n, "11010519491231002X").unwrap_err().reason;
        assert_eq!(r(&minimal_jpeg(400, 441), "11010519491231002X.jpg"), "PHOTO_DIMENSIONS");
        assert_eq!(r(&ok, "photo.jpg"), "PHOTO_FILE_NAME");
        assert_eq!(r(b"GIF89a", "11010519491231002X.jpg"), "PHOTO_NOT_JPEG");
        assert_eq!(r(&vec![0xFF; PHOTO_MAX_BYTES + 1], "11010519491231002X.jpg"), "PHOTO_TOO_LARGE");
    }
}
