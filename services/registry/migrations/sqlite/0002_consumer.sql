-- The registry consumes the bank adapters' events (socialcard.financial.v1) from the embedded log:
-- its position per topic, and what it could not apply.
CREATE TABLE inbox (event_id TEXT PRIMARY KEY, processed_at INTEGER NOT NULL);
CREATE TABLE consumer_offsets (consumer_group TEXT NOT NULL, topic TEXT NOT NULL, next_seq INTEGER NOT NULL,
    PRIMARY KEY (consumer_group, topic));
CREATE TABLE dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT, consumer_group TEXT NOT NULL, topic TEXT NOT NULL,
    event_id TEXT NOT NULL, error TEXT NOT NULL, payload BLOB NOT NULL, at INTEGER NOT NULL);
