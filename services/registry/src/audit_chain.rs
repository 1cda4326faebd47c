//! The audit trail as a hash chain per card: each entry stores the hash of the card's previous entry and
//! its own hash over that and every field it records, so an entry edited, removed or inserted afterwards
//! in the database breaks the chain at that point. `VerifyAuditTrail` (and `socialcard audit-verify`)
//! walks the chains and names every break.

use sha2::{Digest, Sha256};

use crate::storage::AuditRecord;

/// The `prev_hash` of a card's first entry.
pub const GENESIS: [u8; 32] = [0; 32];

fn field(h: &mut Sha256, bytes: &[u8]) {
    h.update(u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
    h.update(bytes);
}

/// The hash of an entry: SHA-256 over the previous hash and each field, length-prefixed.
pub fn link(prev: &[u8], a: &AuditRecord) -> Vec<u8> {
    let mut h = Sha256::new();
    field(&mut h, prev);
    field(&mut h, a.card_id.as_bytes());
    field(&mut h, &socialcard_events::unix_micros(a.at).to_be_bytes());
    for f in [&a.action, &a.channel, &a.actor, &a.documents, &a.from_state, &a.to_state, &a.idempotency_key] {
        field(&mut h, f.as_bytes());
    }
    h.finalize().to_vec()
}

/// One stored entry with its links.
#[derive(Clone, Debug)]
pub struct ChainedAudit {
    pub seq: i64,
    pub record: AuditRecord,
    pub prev_hash: Option<Vec<u8>>,
    pub hash: Option<Vec<u8>>,
}

/// Where a chain is broken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Break {
    pub card_id: String,
    pub seq: i64,
    pub reason: &'static str,
}

/// What a walk over the chains found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verification {
    pub cards: u64,
    pub entries: u64,
    /// Entries written before the chain existed (no hashes), at the start of a card's trail.
    pub unchained: u64,
    pub breaks: Vec<Break>,
}

/// Walks entries ordered by card, then sequence; `last` carries a card's chain across pages.
#[derive(Debug, Default)]
pub struct Walker {
    last: Option<(String, Vec<u8>)>,
    pub result: Verification,
}

impl Walker {
    pub fn step(&mut self, e: &ChainedAudit) {
        let expected_prev = match &self.last {
            Some((card, hash)) if *card == e.record.card_id => hash.clone(),
            _ => {
                self.result.cards += 1;
                GENESIS.to_vec()
            }
        };
        self.result.entries += 1;
        let (Some(prev), Some(hash)) = (&e.prev_hash, &e.hash) else {
            // A legacy entry: fine only before any chained entry of the card.
            if expected_prev != GENESIS {
                self.result.breaks.push(Break {
                    card_id: e.record.card_id.clone(),
                    seq: e.seq,
                    reason: "UNCHAINED_AFTER_CHAIN",
                });
            }
            self.result.unchained += 1;
            return;
        };
        if *prev != expected_prev {
            self.result.breaks.push(Break {
                card_id: e.record.card_id.clone(),
                seq: e.seq,
                reason: "PREVIOUS_ENTRY_CHANGED_OR_REMOVED",
            });
        }
        if link(prev, &e.record) != *hash {
            self.result.breaks.push(Break { card_id: e.record.card_id.clone(), seq: e.seq, reason: "ENTRY_CHANGED" });
        }
        self.last = Some((e.record.card_id.clone(), hash.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: i64, card: &str, action: &str, prev: &[u8]) -> ChainedAudit {
        let record = AuditRecord {
            card_id: card.into(),
            at: time::macros::datetime!(2026-11-23 02:00 UTC),
            action: action.into(),
            channel: "bureau_window".into(),
            actor: "{}".into(),
            documents: "{}".into(),
            from_state: "a".into(),
            to_state: "b".into(),
            idempotency_key: format!("k-{seq}"),
        };
        let hash = link(prev, &record);
        ChainedAudit { seq, record, prev_hash: Some(prev.to_vec()), hash: Some(hash) }
    }

    #[test]
    fn an_intact_chain_verifies_and_any_edit_or_removal_breaks_it() {
        let a = entry(1, "c1", "apply", &GENESIS);
        let b = entry(2, "c1", "approve", a.hash.as_ref().unwrap());
        let c = entry(3, "c1", "produce", b.hash.as_ref().unwrap());
        let mut w = Walker::default();
        for e in [&a, &b, &c] {
            w.step(e);
        }
        assert_eq!(w.result, Verification { cards: 1, entries: 3, unchained: 0, breaks: vec![] });

        let mut edited = b.clone();
        edited.record.to_state = "collected".into();
        let mut w = Walker::default();
        for e in [&a, &edited, &c] {
            w.step(e);
        }
        assert_eq!(w.result.breaks, vec![Break { card_id: "c1".into(), seq: 2, reason: "ENTRY_CHANGED" }]);

        let mut w = Walker::default();
        for e in [&a, &c] {
            w.step(e);
        }
        assert_eq!(w.result.breaks[0].reason, "PREVIOUS_ENTRY_CHANGED_OR_REMOVED");
    }
}
