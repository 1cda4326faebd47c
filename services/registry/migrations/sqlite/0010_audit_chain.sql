-- The audit trail as a hash chain per card (see src/audit_chain.rs): the hash of the card's previous
-- entry and this entry's own hash. Entries written before this migration have neither.
ALTER TABLE audit_log ADD COLUMN prev_hash BLOB;
ALTER TABLE audit_log ADD COLUMN hash BLOB;
