//! Batch imports on both databases: a chunk's snapshot in one query per table (same SQL text for SQLite
//! and PostgreSQL, stamped out per driver like `sql.rs`), and its commit in one transaction: on
//! PostgreSQL as multi-row INSERTs, on SQLite through the group writer (`SqliteStore::commit_rows`,
//! the rows as `storage::commit` builds them).

use sqlx::{QueryBuilder, Row};
use time::OffsetDateTime;

use super::sql::{card_from_json, db_error, from_micros, seal_error, social_label};
use super::{
    BatchCommit, BatchSnapshot, CardRecord, IdempotencyRecord, PersonRecord, PgStore, SqliteStore, StoreError,
};
use socialcard_events::unix_micros as micros;

/// Bind parameters per statement: below SQLite's 32,766 (and PostgreSQL's 65,535).
const MAX_BINDS: usize = 30_000;

macro_rules! batch_store {
    ($store:ident, $db:ty) => {
        impl $store {
            pub(super) async fn snapshot_rows(
                &self,
                citizen_ids: &[String],
                keys: &[String],
            ) -> Result<BatchSnapshot, StoreError> {
                let mut snapshot = BatchSnapshot::default();
                // Citizen IDs are stored as their blind index; personal data sealed (crate::seal).
                let sealer = self.sealer();
                for ids in citizen_ids.chunks(MAX_BINDS) {
                    let by_index: std::collections::HashMap<String, &String> =
                        ids.iter().map(|id| (sealer.blind_index(id), id)).collect();
                    let mut q = QueryBuilder::<$db>::new(
                        "SELECT citizen_id, name, phone, registered_at, version FROM persons WHERE citizen_id IN ",
                    );
                    q.push_tuples(by_index.keys(), |mut b, index| {
                        b.push_bind(index.clone());
                    });
                    for r in q.build().fetch_all(self.pool()).await.map_err(db_error)? {
                        let index: String = r.try_get("citizen_id").map_err(db_error)?;
                        let id = by_index.get(&index).ok_or_else(|| StoreError::Corrupt("unexpected person".into()))?;
                        snapshot.persons.push(PersonRecord {
                            citizen_id: (*id).clone(),
                            name: sealer.open(&r.try_get::<String, _>("name").map_err(db_error)?, &index).map_err(seal_error)?,
                            phone: sealer.open(&r.try_get::<String, _>("phone").map_err(db_error)?, &index).map_err(seal_error)?,
                            registered_at: from_micros(r.try_get("registered_at").map_err(db_error)?)?,
                            version: r.try_get("version").map_err(db_error)?,
                        });
                    }
                    let mut q = QueryBuilder::<$db>::new("SELECT card_id, data, pin_digest FROM cards WHERE citizen_id IN ");
                    q.push_tuples(by_index.keys(), |mut b, index| {
                        b.push_bind(index.clone());
                    });
                    for r in q.build().fetch_all(self.pool()).await.map_err(db_error)? {
                        let card_id: String = r.try_get("card_id").map_err(db_error)?;
                        let data: String = r.try_get("data").map_err(db_error)?;
                        let data = sealer.open(&data, &card_id).map_err(seal_error)?;
                        let card: CardRecord = card_from_json(&data, r.try_get("pin_digest").map_err(db_error)?)?;
                        snapshot.cards.push(card);
                    }
                }
                for keys in keys.chunks(MAX_BINDS) {
                    let mut q = QueryBuilder::<$db>::new(
                        "SELECT idempotency_key, operation, request_hash, response FROM idempotency WHERE idempotency_key IN ",
                    );
                    q.push_tuples(keys, |mut b, k| {
                        b.push_bind(k);
                    });
                    for r in q.build().fetch_all(self.pool()).await.map_err(db_error)? {
                        let key: String = r.try_get("idempotency_key").map_err(db_error)?;
                        let response: Vec<u8> = r.try_get("response").map_err(db_error)?;
                        snapshot.idempotency.push(IdempotencyRecord {
                            response: sealer.open_bytes(&response, &key).map_err(seal_error)?,
                            key,
                            operation: r.try_get("operation").map_err(db_error)?,
                            request_hash: r.try_get("request_hash").map_err(db_error)?,
                        });
                    }
                }
                Ok(snapshot)
            }

            pub(super) async fn reserve(&self, name: &str, count: i64) -> Result<i64, StoreError> {
                let row = sqlx::query("UPDATE sequences SET value = value + $1 WHERE name = $2 RETURNING value")
                    .bind(count)
                    .bind(name)
                    .fetch_optional(self.writer())
                    .await
                    .map_err(db_error)?
                    .ok_or_else(|| StoreError::Corrupt(format!("no sequence {name}")))?;
                let last: i64 = row.try_get("value").map_err(db_error)?;
                Ok(last - count + 1)
            }

        }
    };
}

batch_store!(SqliteStore, sqlx::Sqlite);
batch_store!(PgStore, sqlx::Postgres);

/// PostgreSQL: a chunk commits as multi-row INSERTs, a few round trips per chunk. (SQLite: through the
/// group writer, `SqliteStore::commit_rows`.)
impl PgStore {
    pub(super) async fn commit_rows(&self, commit: BatchCommit) -> Result<(), StoreError> {
        let mut tx = self.writer().begin().await.map_err(db_error)?;
        match Self::commit_rows_in(&mut tx, self.sealer(), &commit).await {
            Ok(()) => tx.commit().await.map_err(db_error),
            Err(e) => {
                let _ = tx.rollback().await;
                Err(e)
            }
        }
    }

    async fn commit_rows_in(
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        sealer: &crate::seal::Sealer,
        c: &BatchCommit,
    ) -> Result<(), StoreError> {
        let now = micros(OffsetDateTime::now_utc());
        let responses = c
            .idempotency
            .iter()
            .map(|i| sealer.seal_bytes(&i.response, &i.key))
            .collect::<Result<Vec<_>, _>>()
            .map_err(seal_error)?;
        let idempotency: Vec<_> = c.idempotency.iter().zip(responses).collect();
        // Keys first: a concurrent import of the same rows fails here, before any other write.
        for rows in idempotency.chunks(MAX_BINDS / 5) {
            let mut q = QueryBuilder::<sqlx::Postgres>::new(
                "INSERT INTO idempotency (idempotency_key, operation, request_hash, response, created_at) ",
            );
            q.push_values(rows, |mut b, (i, response)| {
                b.push_bind(&i.key)
                    .push_bind(&i.operation)
                    .push_bind(&i.request_hash)
                    .push_bind(response)
                    .push_bind(now);
            });
            match q.build().execute(&mut **tx).await {
                Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
                    return Err(StoreError::IdempotencyConflict);
                }
                Err(e) => return Err(db_error(e)),
                Ok(_) => {}
            }
        }
        // The holders' versions, as `PersonWrite::Touch` bumps them: a concurrent application for
        // one of them (R2) makes this chunk, or that call, plan again.
        let touch: Vec<(String, i64)> = c.touch_persons.iter().map(|(id, v)| (sealer.blind_index(id), *v)).collect();
        for persons in touch.chunks(MAX_BINDS) {
            let mut q =
                QueryBuilder::<sqlx::Postgres>::new("UPDATE persons SET version = version + 1 WHERE citizen_id IN ");
            q.push_tuples(persons, |mut b, (index, _)| {
                b.push_bind(index);
            });
            q.push(" RETURNING citizen_id, version");
            let rows = q.build().fetch_all(&mut **tx).await.map_err(db_error)?;
            if rows.len() != persons.len() {
                return Err(StoreError::VersionConflict);
            }
            let expected: std::collections::HashMap<&str, i64> =
                persons.iter().map(|(id, v)| (id.as_str(), *v)).collect();
            for r in rows {
                let id: String = r.try_get("citizen_id").map_err(db_error)?;
                let version: i64 = r.try_get("version").map_err(db_error)?;
                if expected.get(id.as_str()).is_none_or(|v| v + 1 != version) {
                    return Err(StoreError::VersionConflict);
                }
            }
        }
        let mut cards = Vec::with_capacity(c.cards.len());
        for rec in &c.cards {
            let data = serde_json::to_string(&rec.card).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let data = sealer.seal(&data, &rec.card.id).map_err(seal_error)?;
            cards.push((rec, data, sealer.blind_index(rec.card.holder.expose())));
        }
        for rows in cards.chunks(MAX_BINDS / 11) {
            let mut q = QueryBuilder::<sqlx::Postgres>::new(
                "INSERT INTO cards (card_id, citizen_id, card_number, bank_code, physical_state, social_state, financial_state, version, data, pin_digest, updated_at) ",
            );
            q.push_values(rows, |mut b, (rec, data, index)| {
                let card = &rec.card;
                b.push_bind(&card.id)
                    .push_bind(index.as_str())
                    .push_bind(card.card_number.as_ref().map(|n| n.as_str()))
                    .push_bind(&card.bank_code)
                    .push_bind(card.physical.as_str())
                    .push_bind(social_label(card))
                    .push_bind(card.financial.as_str())
                    .push_bind(card.version)
                    .push_bind(data.as_str())
                    .push_bind(&rec.pin_digest)
                    .push_bind(now);
            });
            match q.build().execute(&mut **tx).await {
                Err(sqlx::Error::Database(d)) if d.is_unique_violation() => {
                    return Err(StoreError::Duplicate("card"));
                }
                Err(e) => return Err(db_error(e)),
                Ok(_) => {}
            }
        }
        // Each card's trail is a hash chain (crate::audit_chain). A batch writes new cards only,
        // so each chain starts at the genesis hash and links the entries in the order given.
        let mut heads: std::collections::HashMap<&str, Vec<u8>> = std::collections::HashMap::new();
        let mut audit = Vec::with_capacity(c.audit.len());
        for a in &c.audit {
            let prev = heads.get(a.card_id.as_str()).cloned().unwrap_or_else(|| crate::audit_chain::GENESIS.to_vec());
            let hash = crate::audit_chain::link(&prev, a);
            heads.insert(a.card_id.as_str(), hash.clone());
            let actor = sealer.seal(&a.actor, &a.card_id).map_err(seal_error)?;
            let documents = sealer.seal(&a.documents, &a.card_id).map_err(seal_error)?;
            audit.push((a, prev, hash, actor, documents));
        }
        for rows in audit.chunks(MAX_BINDS / 11) {
            let mut q = QueryBuilder::<sqlx::Postgres>::new(
                "INSERT INTO audit_log (card_id, at, action, channel, actor, documents, from_state, to_state, idempotency_key, prev_hash, hash) ",
            );
            q.push_values(rows, |mut b, (a, prev, hash, actor, documents)| {
                b.push_bind(&a.card_id)
                    .push_bind(micros(a.at))
                    .push_bind(&a.action)
                    .push_bind(&a.channel)
                    .push_bind(actor)
                    .push_bind(documents)
                    .push_bind(&a.from_state)
                    .push_bind(&a.to_state)
                    .push_bind(&a.idempotency_key)
                    .push_bind(prev)
                    .push_bind(hash);
            });
            q.build().execute(&mut **tx).await.map_err(db_error)?;
        }
        for rows in c.outbox.chunks(MAX_BINDS / 9) {
            let mut q = QueryBuilder::<sqlx::Postgres>::new(
                "INSERT INTO outbox (event_id, topic, event_key, event_type, payload, occurred_at, bucket, source, traceparent) ",
            );
            q.push_values(rows, |mut b, o| {
                b.push_bind(&o.event_id)
                    .push_bind(&o.topic)
                    .push_bind(&o.key)
                    .push_bind(&o.event_type)
                    .push_bind(&o.payload)
                    .push_bind(micros(o.occurred_at))
                    .push_bind(socialcard_events::bucket_of(&o.key))
                    .push_bind(&o.source)
                    .push_bind(&o.traceparent);
            });
            q.build().execute(&mut **tx).await.map_err(db_error)?;
        }
        Ok(())
    }
}
