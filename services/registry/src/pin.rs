//! Social PINs are stored as a keyed digest (HMAC-SHA256 under the registry's PIN key, salted with
//! the card id), so a copy of the database alone does not reveal them, and compared in constant time.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

#[derive(Clone)]
pub struct PinHasher {
    key: Vec<u8>,
}

impl std::fmt::Debug for PinHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PinHasher(..)")
    }
}

impl PinHasher {
    pub fn new(key: Vec<u8>) -> Self {
        Self { key }
    }

    fn mac(&self, card_id: &str, pin: &str) -> Hmac<Sha256> {
        // A key of any length is accepted by HMAC; `new_from_slice` cannot fail for it.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(card_id.as_bytes());
        mac.update(&[0]);
        mac.update(pin.as_bytes());
        mac
    }

    pub fn digest(&self, card_id: &str, pin: &str) -> Vec<u8> {
        self.mac(card_id, pin).finalize().into_bytes().to_vec()
    }

    pub fn verify(&self, card_id: &str, pin: &str, digest: &[u8]) -> bool {
        self.mac(card_id, pin).verify_slice(digest).is_ok()
    }
}
