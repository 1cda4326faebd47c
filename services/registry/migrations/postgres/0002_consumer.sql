-- The registry's consumer tables (the Kafka consumer keeps its positions in Kafka; these serve the
-- inbox and the dead letters it records locally).
CREATE TABLE inbox (event_id TEXT PRIMARY KEY, processed_at BIGINT NOT NULL);
CREATE TABLE consumer_offsets (consumer_group TEXT NOT NULL, topic TEXT NOT NULL, next_seq BIGINT NOT NULL,
    PRIMARY KEY (consumer_group, topic));
CREATE TABLE dead_letters (id BIGSERIAL PRIMARY KEY, consumer_group TEXT NOT NULL, topic TEXT NOT NULL,
    event_id TEXT NOT NULL, error TEXT NOT NULL, payload BYTEA NOT NULL, at BIGINT NOT NULL);
