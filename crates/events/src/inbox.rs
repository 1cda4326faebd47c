//! The inbox: one row per processed event id, written in the handler's own transaction. Its unique key
//! is what makes a redelivered event a no-op.

/// `inbox` and the embedded log's consumer tables, for a consumer's SQLite migrations.
pub const SQLITE_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS inbox (event_id TEXT PRIMARY KEY, processed_at INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS consumer_offsets (consumer_group TEXT NOT NULL, topic TEXT NOT NULL, next_seq INTEGER NOT NULL,
    PRIMARY KEY (consumer_group, topic));
CREATE TABLE IF NOT EXISTS dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT, consumer_group TEXT NOT NULL, topic TEXT NOT NULL,
    event_id TEXT NOT NULL, error TEXT NOT NULL, payload BLOB NOT NULL, at INTEGER NOT NULL);
-- Once per consumer and event (copies from before the key: the first kept).
DELETE FROM dead_letters WHERE id NOT IN (SELECT MIN(id) FROM dead_letters GROUP BY consumer_group, event_id);
CREATE UNIQUE INDEX IF NOT EXISTS dead_letters_once ON dead_letters (consumer_group, event_id);
";

/// The same for PostgreSQL.
pub const POSTGRES_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS inbox (event_id TEXT PRIMARY KEY, processed_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS consumer_offsets (consumer_group TEXT NOT NULL, topic TEXT NOT NULL, next_seq BIGINT NOT NULL,
    PRIMARY KEY (consumer_group, topic));
CREATE TABLE IF NOT EXISTS dead_letters (id BIGSERIAL PRIMARY KEY, consumer_group TEXT NOT NULL, topic TEXT NOT NULL,
    event_id TEXT NOT NULL, error TEXT NOT NULL, payload BYTEA NOT NULL, at BIGINT NOT NULL);
-- Once per consumer and event (copies from before the key: the first kept).
DELETE FROM dead_letters a USING dead_letters b
    WHERE a.consumer_group = b.consumer_group AND a.event_id = b.event_id AND a.id > b.id;
CREATE UNIQUE INDEX IF NOT EXISTS dead_letters_once ON dead_letters (consumer_group, event_id);
";

fn now_micros() -> i64 {
    crate::unix_micros(time::OffsetDateTime::now_utc())
}

/// The inbox row of an event, none when it is there already (the same SQL on both databases).
const RECORD: &str = "INSERT INTO inbox (event_id, processed_at) VALUES ($1, $2) ON CONFLICT (event_id) DO NOTHING";

/// [`record_sqlite`] on a group writer's connection ([`crate::direct::Direct`], inside the write's
/// savepoint); false when the event was there already.
pub fn record_direct(conn: &mut crate::direct::Direct<'_>, event_id: &str) -> Result<bool, crate::direct::DirectError> {
    Ok(conn.execute(RECORD, &[event_id.into(), now_micros().into()])? == 1)
}

/// Records `event_id` in the inbox inside `tx`; false when it was there already (skip the effect).
pub async fn record_sqlite(tx: &mut sqlx::SqliteConnection, event_id: &str) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(RECORD).bind(event_id).bind(now_micros()).execute(tx).await?;
    Ok(r.rows_affected() == 1)
}

/// Records `event_id` in the inbox inside `tx`; false when it was there already (skip the effect).
pub async fn record_postgres(tx: &mut sqlx::PgConnection, event_id: &str) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(RECORD).bind(event_id).bind(now_micros()).execute(tx).await?;
    Ok(r.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    /// A database from before the dead letters' key may hold an event twice: the schema keeps the first.
    #[tokio::test]
    async fn the_schema_keeps_the_first_of_dead_letters_kept_twice_before_the_key() {
        let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT, consumer_group TEXT NOT NULL,
                 topic TEXT NOT NULL, event_id TEXT NOT NULL, error TEXT NOT NULL, payload BLOB NOT NULL, at INTEGER NOT NULL);
             INSERT INTO dead_letters (consumer_group, topic, event_id, error, payload, at) VALUES
                 ('g', 't', 'e1', 'first', x'', 1), ('g', 't', 'e1', 'again', x'', 2), ('g', 't', 'e2', 'other', x'', 3),
                 ('h', 't', 'e1', 'another group', x'', 4), ('g', 't', 'e1', 'and again', x'', 5);",
        )
        .execute(&pool)
        .await
        .unwrap();
        sqlx::raw_sql(super::SQLITE_SCHEMA).execute(&pool).await.unwrap();
        let kept: Vec<(String, String, String)> =
            sqlx::query_as("SELECT consumer_group, event_id, error FROM dead_letters ORDER BY id")
                .fetch_all(&pool)
                .await
                .unwrap();
        let row = |g: &str, e: &str, error: &str| (g.to_string(), e.to_string(), error.to_string());
        assert_eq!(kept, [row("g", "e1", "first"), row("g", "e2", "other"), row("h", "e1", "another group")]);
        let again = sqlx::query(
            "INSERT INTO dead_letters (consumer_group, topic, event_id, error, payload, at) VALUES ('g', 't', 'e2', 'x', x'', 6)",
        )
        .execute(&pool)
        .await;
        assert!(again.is_err(), "the key holds from now on");
        // Run again (every start runs it): nothing changes.
        sqlx::raw_sql(super::SQLITE_SCHEMA).execute(&pool).await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM dead_letters").fetch_one(&pool).await.unwrap();
        assert_eq!(n, 3);
    }
}
