//! Ops' SQLite database: the read models, each event written with its inbox row in the same
//! transaction, and the queries the gRPC API and the dashboard answer from (through sqlx).
//!
//! The read models are written by a group writer ([`GroupWriter`]): a consumer's batch of events is one
//! write (a savepoint of a group, all or nothing), its statements run straight on the writer's
//! connection, without a hand-off to sqlx's worker thread per statement. Writes go through that one
//! connection, so they queue in order. Cross-topic effects commute (a shipment's
//! dispatch time lives in `shipments`, the card's in `cards`, and the funnel takes the earlier), so the
//! order in which the topics' consumers interleave does not change the result: a rebuild equals the model
//! built incrementally.

use std::path::Path;
use std::time::Duration;

use prost::Message;
use socialcard_events::direct::{Direct, DirectError, Value};
use socialcard_events::group::{GroupError, GroupWriter};
use socialcard_events::{Envelope, from_unix_micros, topics, unix_micros};
use socialcard_proto::events::v1 as ev;
use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool};
use time::OffsetDateTime;

use crate::projection::{self, CardStates, Stage};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("undecodable event: {0}")]
    Undecodable(String),
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// Reading a log failed (its database away): retry later.
    #[error("event feed: {0}")]
    Feed(String),
    /// A write on the writer's connection failed, or its group was not committed: nothing was stored.
    #[error("write: {0}")]
    Write(String),
}

impl From<DirectError> for StoreError {
    fn from(e: DirectError) -> Self {
        Self::Write(e.to_string())
    }
}

impl From<GroupError> for StoreError {
    fn from(e: GroupError) -> Self {
        Self::Write(e.to_string())
    }
}

/// The read-model tables a rebuild empties (with the inbox and the consumer positions).
const READ_MODELS: [&str; 6] =
    ["cards", "shipments", "loss_cases", "financial_reports", "kafka_dead_letters", "inconsistencies"];

#[derive(Clone, Debug)]
pub struct OpsStore {
    pool: SqlitePool,
    writer: SqlitePool,
    /// The read models' writes: each batch of events in a savepoint of a group, its statements straight
    /// on the writer's connection (no hand-off to sqlx's worker per statement).
    group: GroupWriter,
}

fn micros(t: Option<&prost_types::Timestamp>, fallback: OffsetDateTime) -> i64 {
    t.and_then(|t| {
        OffsetDateTime::from_unix_timestamp(t.seconds).ok().map(|s| s + time::Duration::nanoseconds(t.nanos.into()))
    })
    .map_or_else(|| unix_micros(fallback), unix_micros)
}

/// A card as the funnel sees it: when it reached each stage.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageTimes {
    pub applied_at: Option<i64>,
    pub produced_at: Option<i64>,
    pub dispatched_at: Option<i64>,
    pub collected_at: Option<i64>,
    pub activated_at: Option<i64>,
}

/// One row of the cards-by-state count.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct StateCount {
    pub group: String,
    pub physical: String,
    pub social: String,
    pub financial: String,
    pub count: u64,
}

/// A card locked on one side only: which side holds, since when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OneSidedRow {
    pub case_id: String,
    pub card_id: String,
    pub bank_code: String,
    pub loss_kind: String,
    pub social_locked: bool,
    pub financial_frozen: bool,
    pub opened_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OverdueRow {
    pub card_id: String,
    pub waybill: String,
    pub milestone: String,
    pub opened_at: OffsetDateTime,
    pub last_event_at: OffsetDateTime,
}

/// A shipment still with the courier, opened before `$1`. Postal closes a shipment without an event when
/// the card is collected at a counter instead (it withdraws it), so a card collected or ended by the
/// registry's word closes its shipment here too.
const OUTSTANDING: &str = "s.closed = 0 AND s.opened_at < $1 AND NOT EXISTS (SELECT 1 FROM cards c
    WHERE c.card_id = s.card_id AND c.physical IN ('collected', 'cancelled', 'replaced', 'rejected'))";

/// Which way to group cards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grouping {
    Bank,
    District,
}

impl OpsStore {
    /// Opens (creating if needed) ops' SQLite database at `path` and migrates it.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        let pool = socialcard_events::sqlite_pool(4).connect_with(options.clone()).await?;
        sqlx::migrate!("./migrations").run(&pool).await.map_err(|e| sqlx::Error::Migrate(Box::new(e)))?;
        let writer = socialcard_events::sqlite_pool(1).connect_with(options).await?;
        let group = GroupWriter::spawn(writer.clone(), socialcard_events::group::MAX_GROUP);
        Ok(Self { pool, writer, group })
    }

    /// Where ops' embedded-log consumers keep their positions and dead letters.
    pub fn offsets(&self) -> socialcard_events::embedded::SqliteOffsets {
        socialcard_events::embedded::SqliteOffsets::new(self.pool.clone())
    }

    /// Applies one event of any topic with its inbox row in one write; false for an event seen before.
    pub async fn apply(&self, event: &Envelope) -> Result<bool, StoreError> {
        let event = event.clone();
        self.group.run(move |conn| apply_in(conn, &event)).await?
    }

    /// Applies `events` in order in one write of the group writer (a savepoint), all or nothing; for each, whether it was new (false:
    /// the inbox had it, or it came twice in the batch). One commit for many events is what lets the read
    /// models keep up with a burst, such as an employer batch of a million cards.
    pub async fn apply_batch(&self, events: &[Envelope]) -> Result<Vec<bool>, StoreError> {
        let events = events.to_vec();
        self.group.run(move |conn| events.iter().map(|event| apply_in(conn, event)).collect()).await?
    }

    /// Empties the read models, the inbox and ops' own consumer positions and dead letters, all or
    /// nothing. Through the group writer's queue, behind every write queued before it: a batch whose
    /// caller stopped waiting (a rebuild whose client went away) still commits, and must not land after
    /// the drop.
    pub async fn drop_read_models(&self) -> Result<(), StoreError> {
        self.group
            .run(|conn| {
                for table in READ_MODELS.iter().chain(&["inbox", "consumer_offsets", "dead_letters"]) {
                    conn.execute(&format!("DELETE FROM {table}"), &[])?;
                }
                Ok::<(), StoreError>(())
            })
            .await?
    }

    pub async fn rebuild_answer(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let row = sqlx::query("SELECT events_replayed FROM rebuilds WHERE idempotency_key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get::<i64, _>("events_replayed")).transpose()?.map(|n| n.unsigned_abs()))
    }

    pub async fn record_rebuild(&self, key: &str, events: u64, at: OffsetDateTime) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO rebuilds (idempotency_key, events_replayed, at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(key)
        .bind(i64::try_from(events).unwrap_or(i64::MAX))
        .bind(unix_micros(at))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    // ---- queries ----

    pub async fn card_counts(&self, by: Grouping, only: Option<&str>) -> Result<Vec<StateCount>, StoreError> {
        let column = match by {
            Grouping::Bank => "bank_code",
            Grouping::District => "region_code",
        };
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {column} AS grp, physical, social, financial, COUNT(*) AS n FROM cards
             WHERE ($1 IS NULL OR {column} = $1)
             GROUP BY {column}, physical, social, financial ORDER BY {column}, physical, social, financial"
        )))
        .bind(only)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(StateCount {
                    group: r.try_get("grp")?,
                    physical: r.try_get("physical")?,
                    social: r.try_get("social")?,
                    financial: r.try_get("financial")?,
                    count: r.try_get::<i64, _>("n")?.unsigned_abs(),
                })
            })
            .collect()
    }

    /// Each card's stage times (the delivery time: the earlier of the registry's and postal's dispatch).
    pub async fn stage_times(
        &self,
        applied_from: Option<i64>,
        applied_until: Option<i64>,
        bank: Option<&str>,
    ) -> Result<Vec<StageTimes>, StoreError> {
        let rows = sqlx::query(
            "SELECT c.applied_at, c.produced_at, c.collected_at, c.activated_at,
                    MIN(COALESCE(c.dispatched_at, s.dispatched_at), COALESCE(s.dispatched_at, c.dispatched_at)) AS dispatched_at
             FROM cards c
             LEFT JOIN (SELECT card_id, MIN(dispatched_at) AS dispatched_at FROM shipments GROUP BY card_id) s
               ON s.card_id = c.card_id
             WHERE ($1 IS NULL OR c.applied_at >= $1) AND ($2 IS NULL OR c.applied_at < $2)
               AND ($3 IS NULL OR c.bank_code = $3)",
        )
        .bind(applied_from)
        .bind(applied_until)
        .bind(bank)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(StageTimes {
                    applied_at: r.try_get("applied_at")?,
                    produced_at: r.try_get("produced_at")?,
                    dispatched_at: r.try_get("dispatched_at")?,
                    collected_at: r.try_get("collected_at")?,
                    activated_at: r.try_get("activated_at")?,
                })
            })
            .collect()
    }

    /// Loss cases by state (optionally of one bank's cards).
    pub async fn loss_states(&self, bank: Option<&str>) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT state, COUNT(*) AS n FROM loss_cases WHERE ($1 IS NULL OR bank_code = $1) GROUP BY state ORDER BY state",
        )
        .bind(bank)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok((r.try_get("state")?, r.try_get::<i64, _>("n")?.unsigned_abs()))).collect()
    }

    /// The cards of cases locked on one side only (state `one_sided`), oldest case first, at most `limit`.
    pub async fn one_sided_cases(&self, bank: Option<&str>, limit: u32) -> Result<Vec<OneSidedRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT case_id, card_id, bank_code, loss_kind, social_locked, financial_frozen, opened_at, updated_at
               FROM loss_cases WHERE state = 'one_sided' AND ($1 IS NULL OR bank_code = $1)
              ORDER BY opened_at, case_id LIMIT $2",
        )
        .bind(bank)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let time = |us: i64| from_unix_micros(us).ok_or_else(|| StoreError::Corrupt(format!("time {us}")));
        rows.iter()
            .map(|r| {
                Ok(OneSidedRow {
                    case_id: r.try_get("case_id")?,
                    card_id: r.try_get("card_id")?,
                    bank_code: r.try_get("bank_code")?,
                    loss_kind: r.try_get("loss_kind")?,
                    social_locked: r.try_get::<i64, _>("social_locked")? != 0,
                    financial_frozen: r.try_get::<i64, _>("financial_frozen")? != 0,
                    opened_at: time(r.try_get("opened_at")?)?,
                    updated_at: time(r.try_get("updated_at")?)?,
                })
            })
            .collect()
    }

    /// Open shipments opened before `before`, oldest first, and how many there are in all.
    pub async fn overdue_shipments(
        &self,
        before: OffsetDateTime,
        limit: u32,
    ) -> Result<(u64, Vec<OverdueRow>), StoreError> {
        let before = unix_micros(before);
        let total: i64 =
            sqlx::query(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) AS n FROM shipments s WHERE {OUTSTANDING}")))
                .bind(before)
                .fetch_one(&self.pool)
                .await?
                .try_get("n")?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT card_id, waybill, milestone, opened_at, last_event_at FROM shipments s
             WHERE {OUTSTANDING} ORDER BY opened_at, waybill LIMIT $2"
        )))
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let time = |us: i64| from_unix_micros(us).ok_or_else(|| StoreError::Corrupt(format!("time {us}")));
        let list = rows
            .iter()
            .map(|r| {
                Ok(OverdueRow {
                    card_id: r.try_get("card_id")?,
                    waybill: r.try_get("waybill")?,
                    milestone: r.try_get("milestone")?,
                    opened_at: time(r.try_get("opened_at")?)?,
                    last_event_at: time(r.try_get("last_event_at")?)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        Ok((total.unsigned_abs(), list))
    }

    /// Dead letters in ops' own database: its embedded consumers' (per group) and those seen on Kafka's
    /// dead-letter topics (as `kafka:<topic>`).
    pub async fn own_dead_letters(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT consumer_group AS g, COUNT(*) AS n FROM dead_letters GROUP BY consumer_group
             UNION ALL SELECT 'kafka:' || topic AS g, COUNT(*) AS n FROM kafka_dead_letters GROUP BY topic
             ORDER BY g",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(|r| Ok((r.try_get("g")?, r.try_get::<i64, _>("n")?.unsigned_abs()))).collect()
    }

    /// Every read-model row as text, table by table in key order: two models are equal iff their dumps are.
    pub async fn dump(&self) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for (table, key) in [
            ("cards", "card_id"),
            ("shipments", "waybill"),
            ("loss_cases", "case_id"),
            ("financial_reports", "card_id"),
            ("kafka_dead_letters", "event_id, topic"),
            ("inconsistencies", "event_id"),
        ] {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT * FROM {table} ORDER BY {key}")))
                .fetch_all(&self.pool)
                .await?;
            for r in &rows {
                let mut line = format!("{table}:");
                for i in 0..r.len() {
                    let v: Option<String> = r
                        .try_get::<Option<String>, _>(i)
                        .or_else(|_| r.try_get::<Option<i64>, _>(i).map(|v| v.map(|v| v.to_string())))?;
                    line.push_str(&format!(" {}", v.unwrap_or_else(|| "NULL".into())));
                }
                out.push(line);
            }
        }
        Ok(out)
    }
}

/// One event's effect and inbox row on the group writer's connection (inside the write's savepoint);
/// false when the inbox already had it (nothing written).
fn apply_in(conn: &mut Direct<'_>, event: &Envelope) -> Result<bool, StoreError> {
    if event.topic.ends_with(".dlt") {
        // A dead letter repeats the original's id (which the inbox already knows): its own key dedups it.
        let n = conn.execute(
            "INSERT INTO kafka_dead_letters (event_id, topic) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            &[(&event.id).into(), (&event.topic).into()],
        )?;
        return Ok(n == 1);
    }
    if !socialcard_events::inbox::record_direct(conn, &event.id)? {
        return Ok(false);
    }
    let payload = event.payload.as_slice();
    let undecodable = |e: prost::DecodeError| StoreError::Undecodable(format!("{}: {e}", event.event_type));
    match event.topic.as_str() {
        topics::CARD => apply_card(conn, event, ev::CardEvent::decode(payload).map_err(undecodable)?)?,
        topics::SHIPMENT => apply_shipment(conn, event, ev::ShipmentEvent::decode(payload).map_err(undecodable)?)?,
        topics::LOSS => apply_loss(conn, event, ev::LossEvent::decode(payload).map_err(undecodable)?)?,
        topics::FINANCIAL => apply_financial(conn, event, ev::FinancialEvent::decode(payload).map_err(undecodable)?)?,
        // Not ours to read: recorded in the inbox, nothing else.
        _ => {}
    }
    Ok(true)
}

/// Moves a card's projection (the time of a stage it reaches is set apart, and only ever moves earlier).
const UPDATE_CARD: &str = "UPDATE cards SET physical = $1, social = $2, financial = $3, machine = $4, card_version = $5
     WHERE card_id = $6";

fn apply_card(conn: &mut Direct<'_>, envelope: &Envelope, e: ev::CardEvent) -> Result<(), StoreError> {
    let Some(kind) = e.kind else { return Ok(()) };
    let at = micros(e.occurred_at.as_ref(), envelope.time);
    if let ev::card_event::Kind::ApplicationSubmitted(s) = &kind {
        let (bank, region) = projection::submitted(s);
        let states = CardStates::applied();
        let machine = machine_json(&states)?;
        conn.execute(
            "INSERT INTO cards (card_id, bank_code, region_code, physical, social, financial, machine, card_version, applied_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (card_id) DO NOTHING",
            &[
                (&e.card_id).into(),
                (&bank).into(),
                (&region).into(),
                states.physical.as_str().into(),
                states.social.as_str().into(),
                states.financial.as_str().into(),
                (&machine).into(),
                e.card_version.into(),
                at.into(),
            ],
        )?;
        return Ok(());
    }
    let row =
        conn.query_row("SELECT machine, card_version FROM cards WHERE card_id = $1", &[(&e.card_id).into()], |r| {
            Ok((r.text(0)?, r.int(1)))
        })?;
    let Some((machine, version)) = row else {
        return inconsistent(conn, envelope, &e.card_id, "an event for a card never applied for");
    };
    if e.card_version != 0 && e.card_version <= version {
        // A stale or repeated change of this card: its effect is already in the model.
        return Ok(());
    }
    let states: CardStates =
        serde_json::from_str(&machine).map_err(|err| StoreError::Corrupt(format!("card machine: {err}")))?;
    let (next, stage) = match projection::apply(states, &kind) {
        Ok(n) => n,
        Err(r) => return inconsistent(conn, envelope, &e.card_id, &format!("{}: {}", r.reason, r.message)),
    };
    let stage_column = match (&kind, stage) {
        (_, Some(Stage::Production)) => Some(("produced_at", at)),
        (_, Some(Stage::Delivery)) => Some(("dispatched_at", at)),
        // R17: the collection date is the holder's, which may be earlier than the record of it.
        (ev::card_event::Kind::CardCollected(c), Some(Stage::Collection)) => {
            Some(("collected_at", micros(c.collected_at.as_ref(), envelope.time)))
        }
        (_, Some(Stage::Collection)) => Some(("collected_at", at)),
        (_, Some(Stage::Activation)) => Some(("activated_at", at)),
        (_, None) => None,
    };
    let machine = machine_json(&next)?;
    let card_version = if e.card_version == 0 { version } else { e.card_version };
    let values: [Value<'_>; 6] = [
        next.physical.as_str().into(),
        next.social.as_str().into(),
        next.financial.as_str().into(),
        (&machine).into(),
        card_version.into(),
        (&e.card_id).into(),
    ];
    conn.execute(UPDATE_CARD, &values)?;
    if let Some((column, t)) = stage_column {
        conn.execute(
            &format!("UPDATE cards SET {column} = MIN(COALESCE({column}, $1), $1) WHERE card_id = $2"),
            &[t.into(), (&e.card_id).into()],
        )?;
    }
    Ok(())
}

fn machine_json(states: &CardStates) -> Result<String, StoreError> {
    serde_json::to_string(states).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn inconsistent(conn: &mut Direct<'_>, envelope: &Envelope, card_id: &str, detail: &str) -> Result<(), StoreError> {
    tracing::warn!(event_id = %envelope.id, event_type = %envelope.event_type, detail, "card event not folded into the read model");
    let detail = format!("{}: {detail}", envelope.event_type);
    conn.execute(
        "INSERT INTO inconsistencies (event_id, card_id, detail) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        &[(&envelope.id).into(), card_id.into(), (&detail).into()],
    )?;
    Ok(())
}

fn apply_shipment(conn: &mut Direct<'_>, envelope: &Envelope, e: ev::ShipmentEvent) -> Result<(), StoreError> {
    let at = micros(e.occurred_at.as_ref(), envelope.time);
    let closes = projection::milestone_closes(e.milestone);
    let dispatched = (e.milestone == ev::ShipmentMilestone::Dispatched as i32).then_some(at);
    // Milestones come in order per card; `closed` never reopens and times only move to the earliest seen.
    conn.execute(
        "INSERT INTO shipments (waybill, card_id, milestone, closed, opened_at, dispatched_at, last_event_at)
         VALUES ($1, $2, $3, $4, $5, $6, $5)
         ON CONFLICT (waybill) DO UPDATE SET
           milestone = excluded.milestone,
           closed = MAX(closed, excluded.closed),
           opened_at = MIN(opened_at, excluded.opened_at),
           dispatched_at = COALESCE(MIN(dispatched_at, excluded.dispatched_at), dispatched_at, excluded.dispatched_at),
           last_event_at = MAX(last_event_at, excluded.last_event_at)",
        &[
            (&e.waybill).into(),
            (&e.card_id).into(),
            projection::milestone_label(e.milestone).into(),
            i64::from(closes).into(),
            at.into(),
            dispatched.into(),
        ],
    )?;
    Ok(())
}

fn apply_loss(conn: &mut Direct<'_>, envelope: &Envelope, e: ev::LossEvent) -> Result<(), StoreError> {
    let at = micros(e.occurred_at.as_ref(), envelope.time);
    let kind = projection::loss_kind(e.loss_kind).map_or("unknown", |k| k.as_str());
    conn.execute(
        "INSERT INTO loss_cases (case_id, card_id, bank_code, loss_kind, state, social_locked, financial_frozen, opened_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)
         ON CONFLICT (case_id) DO UPDATE SET
           loss_kind = excluded.loss_kind, state = excluded.state, social_locked = excluded.social_locked,
           financial_frozen = excluded.financial_frozen,
           bank_code = CASE WHEN excluded.bank_code = '' THEN bank_code ELSE excluded.bank_code END,
           opened_at = MIN(opened_at, excluded.opened_at), updated_at = MAX(updated_at, excluded.updated_at)",
        &[
            (&e.case_id).into(),
            (&e.card_id).into(),
            (&e.bank_code).into(),
            kind.into(),
            (&e.state).into(),
            i64::from(e.social_locked).into(),
            i64::from(e.financial_frozen).into(),
            at.into(),
        ],
    )?;
    Ok(())
}

fn apply_financial(conn: &mut Direct<'_>, envelope: &Envelope, e: ev::FinancialEvent) -> Result<(), StoreError> {
    use ev::financial_event::Kind;
    let at = micros(e.occurred_at.as_ref(), envelope.time);
    // (activated, frozen) after the event; None leaves that column as it was.
    let (activated, frozen): (Option<bool>, Option<bool>) = match e.kind {
        Some(Kind::FinancialActivated(_)) => (Some(true), None),
        Some(Kind::FinancialActivationRolledBack(_)) => (Some(false), None),
        Some(Kind::FinancialFrozen(_)) => (None, Some(true)),
        Some(Kind::FinancialUnfrozen(_)) => (None, Some(false)),
        None => return Ok(()),
    };
    conn.execute(
        "INSERT INTO financial_reports (card_id, bank_code, activated, frozen, updated_at)
         VALUES ($1, $2, COALESCE($3, 0), COALESCE($4, 0), $5)
         ON CONFLICT (card_id) DO UPDATE SET
           activated = COALESCE($3, activated), frozen = COALESCE($4, frozen), updated_at = MAX(updated_at, $5)",
        &[
            (&e.card_id).into(),
            (&e.bank_code).into(),
            activated.map(i64::from).into(),
            frozen.map(i64::from).into(),
            at.into(),
        ],
    )?;
    Ok(())
}
