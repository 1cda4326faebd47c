-- The loss coordinator's own tables (SQLite). Times are unix microseconds.

-- One loss case per report (or per deadline / PIN lock), a saga over the card's two sides.
CREATE TABLE cases (
    case_id            TEXT PRIMARY KEY,
    -- What opened the case, unique: the caller's idempotency key, a timer or an event id.
    report_key         TEXT NOT NULL UNIQUE,
    -- The key of the report that set the current loss kind; the sides' calls derive their keys from it.
    lock_key           TEXT NOT NULL,
    request_hash       BLOB,
    card_id            TEXT NOT NULL,
    card_number        TEXT NOT NULL,
    bank_code          TEXT NOT NULL,
    -- 'temporary' | 'written' | 'automatic'
    loss_kind          TEXT NOT NULL,
    -- registry.v1.Channel number of the report
    channel            INTEGER NOT NULL,
    -- the report's registry.v1.Actor and Documents, replayed to the registry on every retry
    actor              BLOB NOT NULL,
    documents          BLOB,
    freezes_financial  INTEGER NOT NULL,
    pin_lock           INTEGER NOT NULL,
    social_locked      INTEGER NOT NULL DEFAULT 0,
    financial_frozen   INTEGER NOT NULL DEFAULT 0,
    -- NULL | 'unlocked' | 'expired'
    social_released    TEXT,
    financial_released TEXT,
    state              TEXT NOT NULL,
    last_error         TEXT,
    opened_at          INTEGER NOT NULL,
    expires_at         INTEGER,
    social_expires_at  INTEGER,
    closed_at          INTEGER,
    attempts           INTEGER NOT NULL DEFAULT 0,
    -- Wall-clock time of the next retry of a side still to be confirmed.
    next_attempt_at    INTEGER NOT NULL,
    version            INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX cases_by_card ON cases (card_id, opened_at);
CREATE INDEX cases_by_state ON cases (state, opened_at);
CREATE INDEX cases_to_drive ON cases (next_attempt_at) WHERE state IN ('locking', 'one_sided');

-- Durable deadlines (R22, R23, R24, temporary-loss expiry per side).
CREATE TABLE timers (
    timer_id        TEXT PRIMARY KEY,
    -- 'auto_lock' | 'minor_exchange' | 'temporary_card_expiry' | 'financial_loss_expiry' | 'social_loss_expiry'
    kind            TEXT NOT NULL,
    card_id         TEXT NOT NULL,
    case_id         TEXT,
    due_at          INTEGER NOT NULL,
    fired_at        INTEGER,
    outcome         TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    -- Wall-clock time of the next retry after a failed firing (0: none failed). `due_at` is on the
    -- business clock, which tests move.
    next_attempt_at INTEGER NOT NULL
);
CREATE INDEX timers_due ON timers (due_at) WHERE fired_at IS NULL;
CREATE INDEX timers_by_card ON timers (card_id);

CREATE TABLE idempotency (
    idempotency_key TEXT PRIMARY KEY,
    operation       TEXT NOT NULL,
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
