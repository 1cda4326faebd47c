-- Ops' read models (SQLite). Times are unix microseconds (socialcard_events::unix_micros). Everything in
-- the read-model tables comes from events, so `rebuild` may empty them and replay.

-- One row per card, from socialcard.card.v1: its bank and district, the three functions' states (labels for
-- grouping, and the domain's full states as JSON so the next event folds through the same state machines),
-- and the time it reached each stage of the funnel.
CREATE TABLE cards (
    card_id        TEXT PRIMARY KEY,
    bank_code      TEXT NOT NULL,
    region_code    TEXT NOT NULL,
    physical       TEXT NOT NULL,
    social         TEXT NOT NULL,
    financial      TEXT NOT NULL,
    machine        TEXT NOT NULL,
    card_version   INTEGER NOT NULL,
    applied_at     INTEGER,
    produced_at    INTEGER,
    dispatched_at  INTEGER,
    collected_at   INTEGER,
    activated_at   INTEGER
);
CREATE INDEX cards_by_bank ON cards (bank_code);
CREATE INDEX cards_by_region ON cards (region_code);

-- One row per shipment, from socialcard.shipment.v1 (postal's milestones).
CREATE TABLE shipments (
    waybill        TEXT PRIMARY KEY,
    card_id        TEXT NOT NULL,
    milestone      TEXT NOT NULL,
    closed         INTEGER NOT NULL,
    opened_at      INTEGER NOT NULL,
    dispatched_at  INTEGER,
    last_event_at  INTEGER NOT NULL
);
CREATE INDEX shipments_by_card ON shipments (card_id);
CREATE INDEX shipments_open ON shipments (opened_at) WHERE closed = 0;

-- One row per loss case, from socialcard.loss.v1: the case's latest state.
CREATE TABLE loss_cases (
    case_id          TEXT PRIMARY KEY,
    card_id          TEXT NOT NULL,
    bank_code        TEXT NOT NULL,
    loss_kind        TEXT NOT NULL,
    state            TEXT NOT NULL,
    social_locked    INTEGER NOT NULL,
    financial_frozen INTEGER NOT NULL,
    opened_at        INTEGER NOT NULL,
    updated_at       INTEGER NOT NULL
);

-- The bank adapters' word on the financial function, from socialcard.financial.v1, per card.
CREATE TABLE financial_reports (
    card_id            TEXT PRIMARY KEY,
    bank_code          TEXT NOT NULL,
    activated          INTEGER NOT NULL,
    frozen             INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL
);

-- Dead letters seen on the Kafka `<topic>.dlt` topics (the embedded log keeps them in each consumer's DB).
CREATE TABLE kafka_dead_letters (
    event_id  TEXT NOT NULL,
    topic     TEXT NOT NULL,
    PRIMARY KEY (event_id, topic)
);

-- Events the projection could not fold (a transition the domain refuses): kept, not dead-lettered.
CREATE TABLE inconsistencies (
    event_id  TEXT PRIMARY KEY,
    card_id   TEXT NOT NULL,
    detail    TEXT NOT NULL
);

-- Answers of Rebuild by idempotency key (not a read model: survives rebuilds).
CREATE TABLE rebuilds (
    idempotency_key  TEXT PRIMARY KEY,
    events_replayed  INTEGER NOT NULL,
    at               INTEGER NOT NULL
);

CREATE TABLE inbox (event_id TEXT PRIMARY KEY, processed_at INTEGER NOT NULL);
CREATE TABLE consumer_offsets (consumer_group TEXT NOT NULL, topic TEXT NOT NULL, next_seq INTEGER NOT NULL,
    PRIMARY KEY (consumer_group, topic));
CREATE TABLE dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT, consumer_group TEXT NOT NULL, topic TEXT NOT NULL,
    event_id TEXT NOT NULL, error TEXT NOT NULL, payload BLOB NOT NULL, at INTEGER NOT NULL);
