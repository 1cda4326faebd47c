//! Personal data at rest: sealed with an AEAD (ChaCha20-Poly1305, through `ring`) under a key from
//! configuration, and found again through a keyed blind index (HMAC-SHA256) of the citizen ID, never an
//! unkeyed hash of it (18 digits with a known structure are cheap to enumerate).
//!
//! Each sealed value is bound to its row (the AEAD's associated data), so a value copied into another
//! row does not open. Stored form: `v1:` + hex(nonce || ciphertext || tag).

use hmac::{Hmac, KeyInit, Mac};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use sha2::Sha256;

const PREFIX: &str = "v1:";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the data key must be 32 bytes")]
    KeyLength,
    #[error("a sealed value does not open (wrong key, or moved or altered)")]
    Open,
    #[error("no randomness for a nonce")]
    Random,
}

fn derive(key: &[u8], label: &str) -> [u8; 32] {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(label.as_bytes());
    mac.finalize().into_bytes().into()
}

/// Seals and opens personal data and computes its blind index, from one 32-byte data key.
pub struct Sealer {
    aead: LessSafeKey,
    index_key: [u8; 32],
    rng: SystemRandom,
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
        Ok(Self {
            aead: LessSafeKey::new(unbound),
            index_key: derive(data_key, "socialcard/registry/blind-index/v1"),
            rng: SystemRandom::new(),
        })
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
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| SealError::Random)?;
        let mut buf = plaintext.as_bytes().to_vec();
        self.aead
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(row.as_bytes()), &mut buf)
            .map_err(|_| SealError::Open)?;
        // Hex straight into one buffer: `hex::encode` pushes a char at a time, and sealing card data
        // was 6 % of a batch import's CPU.
        let mut out = vec![0u8; PREFIX.len() + 2 * (NONCE_LEN + buf.len())];
        let (prefix, rest) = out.split_at_mut(PREFIX.len());
        prefix.copy_from_slice(PREFIX.as_bytes());
        let (hex_nonce, hex_sealed) = rest.split_at_mut(2 * NONCE_LEN);
        hex::encode_to_slice(nonce, hex_nonce).map_err(|_| SealError::Open)?;
        hex::encode_to_slice(&buf, hex_sealed).map_err(|_| SealError::Open)?;
        String::from_utf8(out).map_err(|_| SealError::Open)
    }

    /// Seals bytes for `row`: `0x01` + nonce + ciphertext + tag (a stored protobuf never starts with
    /// byte 1, field number 0 being invalid, so older unsealed values stay readable).
    pub fn seal_bytes(&self, plaintext: &[u8], row: &str) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| SealError::Random)?;
        let mut buf = plaintext.to_vec();
        self.aead
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(row.as_bytes()), &mut buf)
            .map_err(|_| SealError::Open)?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + buf.len());
        out.push(1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        Ok(out)
    }

    /// Opens bytes sealed for `row` (unsealed older values pass through).
    pub fn open_bytes(&self, stored: &[u8], row: &str) -> Result<Vec<u8>, SealError> {
        match stored.split_first() {
            Some((1, rest)) if rest.len() >= NONCE_LEN => {
                let (nonce, sealed) = rest.split_at(NONCE_LEN);
                let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Open)?;
                let mut buf = sealed.to_vec();
                let plain =
                    self.aead.open_in_place(nonce, Aad::from(row.as_bytes()), &mut buf).map_err(|_| SealError::Open)?;
                Ok(plain.to_vec())
            }
            _ => Ok(stored.to_vec()),
        }
    }

    /// Opens a value sealed for `row`. A value written before sealing existed (no `v1:` prefix) is
    /// returned as it is, so an older data directory still reads.
    pub fn open(&self, stored: &str, row: &str) -> Result<String, SealError> {
        let Some(hexed) = stored.strip_prefix(PREFIX) else { return Ok(stored.to_string()) };
        let raw = hex::decode(hexed).map_err(|_| SealError::Open)?;
        if raw.len() < NONCE_LEN {
            return Err(SealError::Open);
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Open)?;
        let mut buf = sealed.to_vec();
        let plain = self.aead.open_in_place(nonce, Aad::from(row.as_bytes()), &mut buf).map_err(|_| SealError::Open)?;
        String::from_utf8(plain.to_vec()).map_err(|_| SealError::Open)
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
        // The stored form: the prefix, then lowercase hex of nonce, ciphertext and tag.
        let hexed = sealed.strip_prefix(PREFIX).unwrap();
        assert_eq!(hexed.len(), 2 * (NONCE_LEN + "{\"name\":\"Li Hua\"}".len() + 16));
        assert!(hexed.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{hexed}");
        assert_eq!(s.open(&sealed, "card-1").unwrap(), "{\"name\":\"Li Hua\"}");
        assert!(s.open(&sealed, "card-2").is_err(), "moved to another row");
        assert!(Sealer::new(&[8; 32]).unwrap().open(&sealed, "card-1").is_err(), "another key");
        assert_ne!(s.seal("x", "r").unwrap(), s.seal("x", "r").unwrap(), "a fresh nonce each time");
        assert_eq!(s.open("{\"legacy\":true}", "card-1").unwrap(), "{\"legacy\":true}");
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
