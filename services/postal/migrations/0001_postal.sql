-- Postal's own tables (SQLite). Times are unix microseconds (socialcard_events::unix_micros).

-- One row per shipment; a card remade (R13) is shipped again under a new waybill.
CREATE TABLE shipments (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    waybill          TEXT NOT NULL UNIQUE,
    card_id          TEXT NOT NULL,
    card_number      TEXT NOT NULL,
    recipient        TEXT NOT NULL,
    phone            TEXT NOT NULL,
    address_line     TEXT NOT NULL,
    district         TEXT NOT NULL,
    postal_code      TEXT NOT NULL,
    backup_point_id  TEXT NOT NULL,
    -- The current normalised status, the rank of the furthest status reached, the furthest milestone.
    status           TEXT NOT NULL,
    status_rank      INTEGER NOT NULL,
    milestone        TEXT NOT NULL,
    sub_reason       TEXT NOT NULL,
    opened_at        INTEGER NOT NULL,
    status_at        INTEGER NOT NULL,
    -- Set once the shipment is over (delivered, picked up, returned, withdrawn).
    closed_at        INTEGER
);
CREATE INDEX shipments_by_card ON shipments (card_id, seq);
CREATE INDEX shipments_by_status ON shipments (status, seq);
CREATE INDEX shipments_by_point ON shipments (backup_point_id, seq);
CREATE INDEX shipments_open ON shipments (opened_at) WHERE closed_at IS NULL;

-- Every update a shipment received, in the order received, with what it did. Append-only.
CREATE TABLE shipment_history (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    waybill          TEXT NOT NULL REFERENCES shipments (waybill),
    courier_event_id TEXT NOT NULL UNIQUE,
    status           TEXT NOT NULL,
    sub_reason       TEXT NOT NULL,
    point_id         TEXT,
    occurred_at      INTEGER NOT NULL,
    received_at      INTEGER NOT NULL,
    source           TEXT NOT NULL,
    outcome          TEXT NOT NULL
);
CREATE INDEX shipment_history_by_waybill ON shipment_history (waybill, occurred_at);
CREATE TRIGGER shipment_history_no_update BEFORE UPDATE ON shipment_history
BEGIN SELECT RAISE(ABORT, 'shipment_history is append-only'); END;
CREATE TRIGGER shipment_history_no_delete BEFORE DELETE ON shipment_history
BEGIN SELECT RAISE(ABORT, 'shipment_history is append-only'); END;

-- Updates naming a waybill postal never issued: kept aside and reported, never dropped.
CREATE TABLE unknown_waybill_updates (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    courier_event_id TEXT NOT NULL UNIQUE,
    waybill          TEXT NOT NULL,
    status           TEXT NOT NULL,
    sub_reason       TEXT NOT NULL,
    point_id         TEXT,
    occurred_at      INTEGER NOT NULL,
    received_at      INTEGER NOT NULL,
    source           TEXT NOT NULL
);

-- Waybill serials.
CREATE TABLE sequences (name TEXT PRIMARY KEY, value INTEGER NOT NULL);

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

-- Postal consumes the registry's card events (CardProduced opens a shipment).
CREATE TABLE inbox (event_id TEXT PRIMARY KEY, processed_at INTEGER NOT NULL);
CREATE TABLE consumer_offsets (consumer_group TEXT NOT NULL, topic TEXT NOT NULL, next_seq INTEGER NOT NULL,
    PRIMARY KEY (consumer_group, topic));
CREATE TABLE dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT, consumer_group TEXT NOT NULL, topic TEXT NOT NULL,
    event_id TEXT NOT NULL, error TEXT NOT NULL, payload BLOB NOT NULL, at INTEGER NOT NULL);
