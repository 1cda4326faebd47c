-- The registry's tables (SQLite). Times are unix microseconds (UTC).
CREATE TABLE persons (
    citizen_id    TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    phone         TEXT NOT NULL,
    registered_at INTEGER NOT NULL,
    version       INTEGER NOT NULL
);

CREATE TABLE cards (
    card_id         TEXT PRIMARY KEY,
    citizen_id      TEXT NOT NULL REFERENCES persons (citizen_id),
    card_number     TEXT UNIQUE,
    bank_code       TEXT NOT NULL,
    physical_state  TEXT NOT NULL,
    social_state    TEXT NOT NULL,
    financial_state TEXT NOT NULL,
    version         INTEGER NOT NULL,
    data            TEXT NOT NULL,
    pin_digest      BLOB NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX cards_by_holder ON cards (citizen_id);
CREATE INDEX cards_by_bank_state ON cards (bank_code, physical_state, social_state, financial_state);

CREATE TABLE audit_log (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    card_id         TEXT NOT NULL,
    at              INTEGER NOT NULL,
    action          TEXT NOT NULL,
    channel         TEXT NOT NULL,
    actor           TEXT NOT NULL,
    documents       TEXT NOT NULL,
    from_state      TEXT NOT NULL,
    to_state        TEXT NOT NULL,
    idempotency_key TEXT NOT NULL
);
CREATE INDEX audit_by_card ON audit_log (card_id, seq);

CREATE TABLE outbox (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT NOT NULL UNIQUE,
    topic        TEXT NOT NULL,
    event_key    TEXT NOT NULL,
    event_type   TEXT NOT NULL,
    payload      BLOB NOT NULL,
    occurred_at  INTEGER NOT NULL,
    -- socialcard_events::bucket_of(event_key): one relay at a time per bucket keeps a card's order.
    bucket       INTEGER NOT NULL,
    source       TEXT NOT NULL,
    traceparent  TEXT,
    published_at INTEGER
);
CREATE INDEX outbox_unpublished ON outbox (bucket, seq) WHERE published_at IS NULL;
CREATE INDEX outbox_by_topic ON outbox (topic, seq);

CREATE TABLE idempotency (
    idempotency_key TEXT PRIMARY KEY,
    operation       TEXT NOT NULL,
    request_hash    BLOB NOT NULL,
    response        BLOB NOT NULL,
    created_at      INTEGER NOT NULL
);

CREATE TABLE sequences (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO sequences (name, value) VALUES ('card_number', 0);
