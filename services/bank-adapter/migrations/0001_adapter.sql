-- A bank adapter's own tables (SQLite). Times are unix microseconds.
CREATE TABLE financial_cards (
    card_id          TEXT PRIMARY KEY,
    card_number      TEXT NOT NULL UNIQUE,
    state            TEXT NOT NULL,
    teller_id        TEXT NOT NULL,
    branch_id        TEXT NOT NULL,
    activated_at     INTEGER NOT NULL,
    -- 1 once the registry confirmed the social function (synchronously or through the event).
    social_confirmed INTEGER NOT NULL
);

CREATE TABLE idempotency (
    idempotency_key TEXT PRIMARY KEY,
    request_hash    BLOB NOT NULL,
    response        BLOB NOT NULL,
    created_at      INTEGER NOT NULL
);

CREATE TABLE outbox (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id     TEXT NOT NULL UNIQUE,
    topic        TEXT NOT NULL,
    event_key    TEXT NOT NULL,
    event_type   TEXT NOT NULL,
    payload      BLOB NOT NULL,
    occurred_at  INTEGER NOT NULL,
    bucket       INTEGER NOT NULL,
    source       TEXT NOT NULL,
    traceparent  TEXT,
    published_at INTEGER
);
CREATE INDEX outbox_unpublished ON outbox (bucket, seq) WHERE published_at IS NULL;
CREATE INDEX outbox_by_topic ON outbox (topic, seq);
