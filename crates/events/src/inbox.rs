//! The inbox: one row per processed event id, written in the handler's own transaction. Its unique key
//! is what makes a redelivered event a no-op.

/// `inbox` and the embedded log's consumer tables, for a consumer's SQLite migrations.
pub const SQLITE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS inbox (event_id TEXT PRIMARY KEY, processed_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS consumer_offsets (consumer_group TEXT NOT NULL, topic TEXT NOT NULL, next_seq INTEGER NOT NULL,
    PRIMARY KEY (consumer_group, topic));
CREATE TABLE IF NOT EXISTS dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT, consumer_group TEXT NOT NULL, topic TEXT NOT NULL,
    event_id TEXT NOT NULL, error TEXT NOT NULL, payload BLOB NOT NULL, at INTEGER NOT NULL);
";

/// The same for PostgreSQL.
pub const POSTGRES_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS inbox (event_id TEXT PRIMARY KEY, processed_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS consumer_offsets (consumer_group TEXT NOT NULL, topic TEXT NOT NULL, next_seq BIGINT NOT NULL,
    PRIMARY KEY (consumer_group, topic));
CREATE TABLE IF NOT EXISTS dead_letters (id BIGSERIAL PRIMARY KEY, consumer_group TEXT NOT NULL, topic TEXT NOT NULL,
    event_id TEXT NOT NULL, error TEXT NOT NULL, payload BYTEA NOT NULL, at BIGINT NOT NULL);
";

fn now_micros() -> i64 {
    crate::unix_micros(time::OffsetDateTime::now_utc())
}

/// Records `event_id` in the inbox inside `tx`; false when it was there already (skip the effect).
pub async fn record_sqlite(tx: &mut sqlx::SqliteConnection, event_id: &str) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("INSERT INTO inbox (event_id, processed_at) VALUES ($1, $2) ON CONFLICT (event_id) DO NOTHING")
        .bind(event_id)
        .bind(now_micros())
        .execute(tx)
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Records `event_id` in the inbox inside `tx`; false when it was there already (skip the effect).
pub async fn record_postgres(tx: &mut sqlx::PgConnection, event_id: &str) -> Result<bool, sqlx::Error> {
    let r = sqlx::query("INSERT INTO inbox (event_id, processed_at) VALUES ($1, $2) ON CONFLICT (event_id) DO NOTHING")
        .bind(event_id)
        .bind(now_micros())
        .execute(tx)
        .await?;
    Ok(r.rows_affected() == 1)
}
