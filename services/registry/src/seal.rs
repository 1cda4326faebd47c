//! Personal data at rest: sealed with an AEAD (ChaCha20-Poly1305, through `ring`) under a key from
//! configuration, and found again through a keyed blind index (HMAC-SHA256) of the citizen ID, never an
//! unkeyed hash of it (18 digits with a known structure are cheap to enumerate).
//!
//! Each sealed value is bound to its row (the AEAD's associated data), so a value copied into another
//! row does not open. Stored form: `v2:` + base64 (standard alphabet, no padding) of nonce || ciphertext
//! || tag. Values written as `v1:` + hex of the same bytes (before 2026-11-24) still open: base64 takes
//! a third less room than hex, and sealed values are about half of what a card writes (its data, its
//! audit rows' actor and documents).

use hmac::{Hmac, KeyInit, Mac};
use rand::Rng;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use sha2::Sha256;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD;

const PREFIX: &str = "v2:";
const PREFIX_HEX: &str = "v1:";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the data key must be 32 bytes")]
    KeyLength,
    #[error("a sealed value does not open (wrong key, or moved or altered)")]
    Open,
}

/// A fresh random nonce.
fn fresh_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rng().fill_bytes(&mut nonce);
    nonce
}

fn derive(key: &[u8], label: &str) -> [u8; 32] {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(label.as_bytes());
    mac.finalize().into_bytes().into()
}

/// Seals and opens personal data and computes its blind index, from one 32-byte data key.
///
/// Nonces are 96 random bits each, drawn from the thread's CSPRNG (`rand::rng()`: ChaCha seeded and
/// reseeded from the operating system), not from a `getrandom` system call per value: a batch import
/// seals several values per card, and the system calls were 3 % of its CPU.
pub struct Sealer {
    aead: LessSafeKey,
    index_key: [u8; 32],
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(..)")
    }
}

impl Sealer {
    pub fn new(data_key: &[u8]) -> Result<Self, SealError> {
        if data_key.len() != 32 {
            return Err(SealError::KeyLength);
        }
        let aead_key = derive(data_key, "socialcard/registry/aead/v1");
        let unbound = UnboundKey::new(&CHACHA20_POLY1305, &aead_key).map_err(|_| SealError::KeyLength)?;
        Ok(Self { aead: LessSafeKey::new(unbound), index_key: derive(data_key, "socialcard/registry/blind-index/v1") })
    }

    /// The blind index of a citizen ID: what the database stores and looks up instead of the ID.
    pub fn blind_index(&self, citizen_id: &str) -> String {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.index_key)
            .unwrap_or_else(|_| unreachable!("any key length"));
        mac.update(citizen_id.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Seals `plaintext`, bound to `row` (the row's key).
    pub fn seal(&self, plaintext: &str, row: &str) -> Result<String, SealError> {
        let raw = self.seal_after(&[], plaintext.as_bytes(), row)?;
        let mut out = String::with_capacity(PREFIX.len() + (raw.len() * 4).div_ceil(3));
        out.push_str(PREFIX);
        STANDARD_NO_PAD.encode_string(&raw, &mut out);
        Ok(out)
    }

    /// Seals bytes for `row`: `0x01` + nonce + ciphertext + tag (a stored protobuf never starts with
    /// byte 1, field number 0 being invalid, so older unsealed values stay readable).
    pub fn seal_bytes(&self, plaintext: &[u8], row: &str) -> Result<Vec<u8>, SealError> {
        self.seal_after(&[1], plaintext, row)
    }

    /// `head` + nonce + ciphertext + tag of `plaintext` sealed for `row`, built in one buffer.
    fn seal_after(&self, head: &[u8], plaintext: &[u8], row: &str) -> Result<Vec<u8>, SealError> {
        let nonce = fresh_nonce();
        let start = head.len() + NONCE_LEN;
        let mut out = Vec::with_capacity(start + plaintext.len() + self.aead.algorithm().tag_len());
        out.extend_from_slice(head);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = self
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(row.as_bytes()),
                &mut out[start..],
            )
            .map_err(|_| SealError::Open)?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Opens nonce + ciphertext + tag sealed for `row`.
    fn open_sealed(&self, raw: &[u8], row: &str) -> Result<Vec<u8>, SealError> {
        if raw.len() < NONCE_LEN {
            return Err(SealError::Open);
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Open)?;
        let mut buf = sealed.to_vec();
        let len =
            self.aead.open_in_place(nonce, Aad::from(row.as_bytes()), &mut buf).map_err(|_| SealError::Open)?.len();
        buf.truncate(len);
        Ok(buf)
    }

    /// Opens bytes sealed for `row` (unsealed older values pass through).
    pub fn open_bytes(&self, stored: &[u8], row: &str) -> Result<Vec<u8>, SealError> {
        match stored.split_first() {
            Some((1, rest)) if rest.len() >= NONCE_LEN => self.open_sealed(rest, row),
            _ => Ok(stored.to_vec()),
        }
    }

    /// Opens a value sealed for `row`, in either stored form. A value written before sealing existed
    /// (no prefix) is returned as it is, so an older data directory still reads.
    pub fn open(&self, stored: &str, row: &str) -> Result<String, SealError> {
        let raw = if let Some(encoded) = stored.strip_prefix(PREFIX) {
            STANDARD_NO_PAD.decode(encoded).map_err(|_| SealError::Open)?
        } else if let Some(hexed) = stored.strip_prefix(PREFIX_HEX) {
            hex::decode(hexed).map_err(|_| SealError::Open)?
        } else {
            return Ok(stored.to_string());
        };
        String::from_utf8(self.open_sealed(&raw, row)?).map_err(|_| SealError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_row() {
        let s = Sealer::new(&[7; 32]).unwrap();
        let sealed = s.seal("{\"name\":\"Li Hua\"}", "card-1").unwrap();
        assert!(!sealed.contains("Li Hua"));
        // The stored form: the prefix, then base64 of nonce, ciphertext and tag, unpadded.
        let encoded = sealed.strip_prefix("v2:").unwrap();
        let raw = STANDARD_NO_PAD.decode(encoded).unwrap();
        assert_eq!(raw.len(), NONCE_LEN + "{\"name\":\"Li Hua\"}".len() + 16);
        assert_eq!(encoded.len(), (raw.len() * 4).div_ceil(3));
        assert_eq!(s.open(&sealed, "card-1").unwrap(), "{\"name\":\"Li Hua\"}");
        assert!(s.open(&sealed, "card-2").is_err(), "moved to another row");
        assert!(Sealer::new(&[8; 32]).unwrap().open(&sealed, "card-1").is_err(), "another key");
        assert_ne!(s.seal("x", "r").unwrap(), s.seal("x", "r").unwrap(), "a fresh nonce each time");
        assert_eq!(s.open("{\"legacy\":true}", "card-1").unwrap(), "{\"legacy\":true}");
    }

    #[test]
    fn values_sealed_in_the_earlier_hex_form_still_open() {
        let s = Sealer::new(&[7; 32]).unwrap();
        let sealed = s.seal("Li Hua", "person-1").unwrap();
        let raw = STANDARD_NO_PAD.decode(sealed.strip_prefix("v2:").unwrap()).unwrap();
        let hexed = format!("v1:{}", hex::encode(&raw));
        assert_eq!(s.open(&hexed, "person-1").unwrap(), "Li Hua");
        assert!(s.open(&hexed, "person-2").is_err(), "still bound to its row");
        let mut tampered = hexed.into_bytes();
        let last = tampered.len() - 1;
        tampered[last] = if tampered[last] == b'0' { b'1' } else { b'0' };
        assert!(s.open(&String::from_utf8(tampered).unwrap(), "person-1").is_err(), "altered");
    }

    #[test]
    fn the_blind_index_is_keyed() {
        let id = "11010519491231002X";
        let a = Sealer::new(&[1; 32]).unwrap();
        let b = Sealer::new(&[2; 32]).unwrap();
        assert_eq!(a.blind_index(id), a.blind_index(id));
        assert_ne!(a.blind_index(id), b.blind_index(id));
        assert!(!a.blind_index(id).contains("110105"));
    }
}
