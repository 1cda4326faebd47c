//! Postal's SQLite database through sqlx: shipments, their append-only history, updates for unknown
//! waybills, the outbox (`socialcard.shipment.v1`) and the inbox of the card events it consumes.
//!
//! Every change commits with its history rows and outbox events in one transaction on the single
//! writer connection, so writers queue in order instead of in SQLite's busy handler.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use socialcard_events::direct::{Direct, DirectError, Value, bind_values};
use socialcard_events::group::{GroupError, GroupWriter};
use socialcard_events::outbox::SqliteOutbox;
use socialcard_events::{Outbox, from_unix_micros, unix_micros};
use socialcard_proto::events::v1 as ev;
use socialcard_proto::postal::v1 as pb;
use sqlx::Row;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqliteRow};
use time::OffsetDateTime;

use crate::feed::{Source, Update, Waybill};
use crate::status::{Decision, Milestone, Outcome, Progress, Status, decide};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("database: {0}")]
    Direct(#[from] DirectError),
    #[error("database: {0}")]
    Group(#[from] GroupError),
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

/// The shipment's delivery address, from the application (R14).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Address {
    pub recipient: String,
    pub phone: String,
    pub line: String,
    pub district: String,
    pub postal_code: String,
}

/// What a card event asks of postal.
#[derive(Clone, Debug)]
pub enum CardWork {
    /// R14: a produced card to mail.
    Open(NewShipment),
    /// R16: the card was handed over at a counter; its shipment, if not yet taken, is withdrawn.
    Withdraw { card_id: String, reason: &'static str },
}

/// What one card event did.
#[derive(Clone, Debug)]
pub enum CardDone {
    Opened(Box<ShipmentRecord>),
    Withdrawn(String),
    /// Nothing to withdraw (no shipment, or the courier has it).
    Nothing,
    /// The inbox had the event: nothing written.
    Seen,
}

/// What a shipment is opened with, from `CardProduced`.
#[derive(Clone, Debug)]
pub struct NewShipment {
    pub card_id: String,
    pub card_number: String,
    pub address: Address,
    pub backup_point_id: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShipmentRecord {
    pub seq: i64,
    pub waybill: String,
    pub card_id: String,
    pub card_number: String,
    pub address: Address,
    pub backup_point_id: String,
    pub progress: Progress,
    pub sub_reason: String,
    pub opened_at: OffsetDateTime,
    pub status_at: OffsetDateTime,
}

/// What taking a courier update needs of a shipment: whose card it carries, where a failed delivery
/// sends it and how far it got. Ingest reads only this, not the address.
#[derive(Clone, Debug)]
struct Tracked {
    seq: i64,
    waybill: String,
    card_id: String,
    backup_point_id: String,
    progress: Progress,
    sub_reason: String,
    opened_at: OffsetDateTime,
    status_at: OffsetDateTime,
}

impl Tracked {
    fn of(s: &ShipmentRecord) -> Self {
        Self {
            seq: s.seq,
            waybill: s.waybill.clone(),
            card_id: s.card_id.clone(),
            backup_point_id: s.backup_point_id.clone(),
            progress: s.progress,
            sub_reason: s.sub_reason.clone(),
            opened_at: s.opened_at,
            status_at: s.status_at,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryRecord {
    pub courier_event_id: String,
    pub status: Status,
    pub sub_reason: String,
    pub point_id: Option<String>,
    pub occurred_at: OffsetDateTime,
    pub received_at: OffsetDateTime,
    pub source: String,
    pub outcome: Outcome,
}

/// What an ingest did, update by update.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngestReport {
    /// Appended to a shipment's history (out-of-order and conflicting ones included).
    pub applied: u64,
    pub duplicates: u64,
    pub unknown_waybills: u64,
    pub out_of_order: u64,
    pub conflicts: u64,
}

impl IngestReport {
    pub fn add(&mut self, other: IngestReport) {
        self.applied += other.applied;
        self.duplicates += other.duplicates;
        self.unknown_waybills += other.unknown_waybills;
        self.out_of_order += other.out_of_order;
        self.conflicts += other.conflicts;
    }
}

/// Filters of a shipment listing.
#[derive(Clone, Debug, Default)]
pub struct ShipmentFilter {
    pub status: Option<Status>,
    pub point_id: Option<String>,
    /// Open shipments opened before this instant.
    pub opened_before: Option<OffsetDateTime>,
    pub after_seq: i64,
    pub limit: i64,
}

/// Row counts, for tests that prove a refusal wrote nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableCounts {
    pub shipments: i64,
    pub history: i64,
    pub unknown_waybill_updates: i64,
    pub outbox: i64,
}

#[derive(Clone, Debug)]
pub struct PostalStore {
    pool: SqlitePool,
    /// One connection for writes.
    writer: SqlitePool,
    /// Courier batches are committed through it (statements straight on `writer`'s connection).
    group: GroupWriter,
    outbox: Arc<SqliteOutbox>,
}

const SHIPMENT_COLUMNS: &str =
    "seq, waybill, card_id, card_number, recipient, phone, address_line, district, postal_code,
    backup_point_id, status, status_rank, milestone, sub_reason, opened_at, status_at";

fn time_of(us: i64) -> Result<OffsetDateTime, StoreError> {
    from_unix_micros(us).ok_or_else(|| StoreError::Corrupt(format!("time {us} out of range")))
}

/// A shipment's progress from its status, rank and milestone columns.
fn progress_of(status: &str, rank: i64, milestone: &str) -> Result<Progress, StoreError> {
    Ok(Progress {
        status: Status::from_label(status).ok_or_else(|| StoreError::Corrupt(format!("status {status}")))?,
        rank: u8::try_from(rank).map_err(|_| StoreError::Corrupt(format!("rank {rank}")))?,
        milestone: Milestone::from_label(milestone)
            .ok_or_else(|| StoreError::Corrupt(format!("milestone {milestone}")))?,
    })
}

/// The columns [`tracked_of`] reads, in its order.
const TRACKED_COLUMNS: &str =
    "seq, waybill, card_id, backup_point_id, status, status_rank, milestone, sub_reason, opened_at, status_at";

fn tracked_of(r: &socialcard_events::direct::Row<'_>) -> Result<Tracked, StoreError> {
    Ok(Tracked {
        seq: r.int(0),
        waybill: r.text(1)?,
        card_id: r.text(2)?,
        backup_point_id: r.text(3)?,
        progress: progress_of(r.str(4)?, r.int(5), r.str(6)?)?,
        sub_reason: r.text(7)?,
        opened_at: time_of(r.int(8))?,
        status_at: time_of(r.int(9))?,
    })
}

/// A row of [`SHIPMENT_COLUMNS`], its columns by position.
fn shipment_of(r: &SqliteRow) -> Result<ShipmentRecord, StoreError> {
    Ok(ShipmentRecord {
        seq: r.try_get(0)?,
        waybill: r.try_get(1)?,
        card_id: r.try_get(2)?,
        card_number: r.try_get(3)?,
        address: Address {
            recipient: r.try_get(4)?,
            phone: r.try_get(5)?,
            line: r.try_get(6)?,
            district: r.try_get(7)?,
            postal_code: r.try_get(8)?,
        },
        backup_point_id: r.try_get(9)?,
        progress: progress_of(r.try_get(10)?, r.try_get(11)?, r.try_get(12)?)?,
        sub_reason: r.try_get(13)?,
        opened_at: time_of(r.try_get(14)?)?,
        status_at: time_of(r.try_get(15)?)?,
    })
}

fn history_of(r: &SqliteRow) -> Result<HistoryRecord, StoreError> {
    let status: String = r.try_get("status")?;
    let outcome: String = r.try_get("outcome")?;
    Ok(HistoryRecord {
        courier_event_id: r.try_get("courier_event_id")?,
        status: Status::from_label(&status).ok_or_else(|| StoreError::Corrupt(format!("status {status}")))?,
        sub_reason: r.try_get("sub_reason")?,
        point_id: r.try_get("point_id")?,
        occurred_at: time_of(r.try_get("occurred_at")?)?,
        received_at: time_of(r.try_get("received_at")?)?,
        source: r.try_get("source")?,
        outcome: Outcome::from_label(&outcome).ok_or_else(|| StoreError::Corrupt(format!("outcome {outcome}")))?,
    })
}

pub fn milestone_to_pb(m: Milestone) -> ev::ShipmentMilestone {
    match m {
        Milestone::Opened => ev::ShipmentMilestone::Opened,
        Milestone::Dispatched => ev::ShipmentMilestone::Dispatched,
        Milestone::DeliveryFailed => ev::ShipmentMilestone::DeliveryFailed,
        Milestone::AtBackupPoint => ev::ShipmentMilestone::AtBackupPoint,
        Milestone::Delivered => ev::ShipmentMilestone::Delivered,
        Milestone::PickedUp => ev::ShipmentMilestone::PickedUp,
        Milestone::Returned => ev::ShipmentMilestone::Returned,
    }
}

pub fn status_to_pb(s: Status) -> pb::ShipmentStatus {
    match s {
        Status::Pending => pb::ShipmentStatus::Pending,
        Status::InfoReceived => pb::ShipmentStatus::InfoReceived,
        Status::InTransit => pb::ShipmentStatus::InTransit,
        Status::OutForDelivery => pb::ShipmentStatus::OutForDelivery,
        Status::AttemptFailed => pb::ShipmentStatus::AttemptFailed,
        Status::Delivered => pb::ShipmentStatus::Delivered,
        Status::AvailableForPickup => pb::ShipmentStatus::AvailableForPickup,
        Status::PickedUp => pb::ShipmentStatus::PickedUp,
        Status::Returned => pb::ShipmentStatus::Returned,
        Status::Exception => pb::ShipmentStatus::Exception,
        Status::Withdrawn => pb::ShipmentStatus::Withdrawn,
    }
}

pub fn timestamp(t: OffsetDateTime) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.unix_timestamp(), nanos: i32::try_from(t.nanosecond()).unwrap_or(0) }
}

/// A shipment's milestone event, written to the outbox in the caller's transaction.
struct MilestoneEvent<'a> {
    shipment: &'a Tracked,
    milestone: Milestone,
    implied: bool,
    occurred_at: OffsetDateTime,
    courier_status: Option<Status>,
    courier_event_id: &'a str,
    sub_reason: &'a str,
}

/// An outbox row, ready to be written.
struct OutboxRow {
    event_id: String,
    event_key: String,
    event_type: String,
    payload: Vec<u8>,
    occurred_at: i64,
    bucket: i64,
}

fn milestone_row(e: MilestoneEvent<'_>) -> OutboxRow {
    let s = e.shipment;
    // The point matters from the failed attempt on: that is where the card goes (R15).
    let point_id = match e.milestone {
        Milestone::DeliveryFailed | Milestone::AtBackupPoint | Milestone::PickedUp => s.backup_point_id.clone(),
        _ => String::new(),
    };
    let event = ev::ShipmentEvent {
        card_id: s.card_id.clone(),
        waybill: s.waybill.clone(),
        occurred_at: Some(timestamp(e.occurred_at)),
        sub_reason: e.sub_reason.to_string(),
        point_id,
        milestone: milestone_to_pb(e.milestone) as i32,
        courier_status: e.courier_status.map_or(0, |c| status_to_pb(c) as i32),
        courier_event_id: e.courier_event_id.to_string(),
        implied: e.implied,
    };
    OutboxRow {
        event_id: uuid::Uuid::now_v7().to_string(),
        event_key: s.card_id.clone(),
        event_type: format!("socialcard.shipment.v1.{}", e.milestone.as_str()),
        payload: event.encode_to_vec(),
        occurred_at: unix_micros(e.occurred_at),
        bucket: i64::from(socialcard_events::bucket_of(&s.card_id)),
    }
}

/// An outbox row's INSERT, up to its values (also for [`Direct::insert_rows`]).
macro_rules! outbox_into {
    () => {
        "INSERT INTO outbox (event_id, topic, event_key, event_type, payload, occurred_at, bucket, source)"
    };
}
const OUTBOX_ROW: &str = "(?, ?, ?, ?, ?, ?, ?, 'postal')";
const INSERT_OUTBOX: &str = concat!(outbox_into!(), " VALUES (?, ?, ?, ?, ?, ?, ?, 'postal')");

impl OutboxRow {
    fn values(&self) -> [Value<'_>; 7] {
        [
            (&self.event_id).into(),
            socialcard_events::topics::SHIPMENT.into(),
            (&self.event_key).into(),
            (&self.event_type).into(),
            (&self.payload).into(),
            self.occurred_at.into(),
            self.bucket.into(),
        ]
    }
}

/// One line of a shipment's history (or of the unknown waybills' list), ready to be written.
struct HistoryRow<'a> {
    waybill: &'a str,
    courier_event_id: &'a str,
    status: Status,
    sub_reason: &'a str,
    point_id: Option<&'a str>,
    occurred_at: i64,
    received_at: i64,
    source: &'a str,
    outcome: Outcome,
}

/// A history row's INSERT, up to its values (also for [`Direct::insert_rows`]).
macro_rules! history_into {
    () => {
        "INSERT INTO shipment_history (waybill, courier_event_id, status, sub_reason, point_id, occurred_at,
             received_at, source, outcome)"
    };
}
const HISTORY_ROW: &str = "(?, ?, ?, ?, ?, ?, ?, ?, ?)";
const INSERT_HISTORY: &str = concat!(history_into!(), " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)");

const INSERT_UNKNOWN: &str = "INSERT INTO unknown_waybill_updates (waybill, courier_event_id, status, sub_reason,
         point_id, occurred_at, received_at, source)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

impl HistoryRow<'_> {
    /// The history columns in `INSERT_HISTORY`'s order (the first eight are `INSERT_UNKNOWN`'s).
    fn values(&self) -> [Value<'_>; 9] {
        [
            self.waybill.into(),
            self.courier_event_id.into(),
            self.status.as_str().into(),
            self.sub_reason.into(),
            self.point_id.into(),
            self.occurred_at.into(),
            self.received_at.into(),
            self.source.into(),
            self.outcome.as_str().into(),
        ]
    }
}

/// Moves a shipment that stays open. `closed_at` is left alone: setting it, even to NULL again, would
/// rewrite the shipment's entry in the open-shipments index.
const SAVE_PROGRESS: &str = "UPDATE shipments SET status = $1, status_rank = $2, milestone = $3, sub_reason = $4,
         status_at = $5
     WHERE seq = $6";

/// Moves a shipment to a final status and closes it.
const SAVE_CLOSED: &str = "UPDATE shipments SET status = $1, status_rank = $2, milestone = $3, sub_reason = $4,
         status_at = $5, closed_at = $5
     WHERE seq = $6";

/// The statement that saves `s`'s progress, and its values.
fn progress_values(s: &Tracked) -> (&'static str, [Value<'_>; 6]) {
    let sql = if s.progress.status.is_final() { SAVE_CLOSED } else { SAVE_PROGRESS };
    (
        sql,
        [
            s.progress.status.as_str().into(),
            i64::from(s.progress.rank).into(),
            s.progress.milestone.as_str().into(),
            (&s.sub_reason).into(),
            unix_micros(s.status_at).into(),
            s.seq.into(),
        ],
    )
}

async fn insert_outbox(tx: &mut sqlx::SqliteConnection, row: &OutboxRow) -> Result<(), StoreError> {
    bind_values(sqlx::query(INSERT_OUTBOX), &row.values()).execute(tx).await?;
    Ok(())
}

async fn insert_history(tx: &mut sqlx::SqliteConnection, row: &HistoryRow<'_>) -> Result<(), StoreError> {
    bind_values(sqlx::query(INSERT_HISTORY), &row.values()).execute(tx).await?;
    Ok(())
}

async fn save_progress(tx: &mut sqlx::SqliteConnection, s: &Tracked) -> Result<(), StoreError> {
    let (sql, values) = progress_values(s);
    bind_values(sqlx::query(sql), &values).execute(tx).await?;
    Ok(())
}

impl PostalStore {
    /// Opens (creating if needed) postal's SQLite database at `path` and migrates it.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = socialcard_events::sqlite_pool(4).connect_with(options.clone()).await?;
        sqlx::migrate!("./migrations").run(&pool).await.map_err(|e| sqlx::Error::Migrate(Box::new(e)))?;
        let writer = socialcard_events::sqlite_pool(1).connect_with(options).await?;
        // A stream's next batch follows its predecessor's answer by microseconds: the writer waits 1 ms
        // for it rather than let go of the connection and prepare its statements again.
        let group =
            GroupWriter::lingering(writer.clone(), socialcard_events::group::MAX_GROUP, Duration::from_millis(1));
        let outbox = Arc::new(SqliteOutbox::new(pool.clone()).with_group(group.clone()));
        Ok(Self { outbox, pool, writer, group })
    }

    pub fn outbox(&self) -> Arc<dyn Outbox> {
        self.outbox.clone()
    }

    /// Where consumers of other services' embedded logs keep their positions in this database.
    pub fn offsets(&self) -> socialcard_events::embedded::SqliteOffsets {
        socialcard_events::embedded::SqliteOffsets::new(self.pool.clone())
    }

    /// Opens a shipment for a produced card, once per card event (`event_id` goes to the inbox in the
    /// same transaction). Returns the new shipment, or `None` for an event seen before.
    pub async fn open_shipment(
        &self,
        event_id: &str,
        new: &NewShipment,
        now: OffsetDateTime,
    ) -> Result<Option<ShipmentRecord>, StoreError> {
        let work = CardWork::Open(new.clone());
        match self.apply_card_work(&[(event_id, &work)], now).await?.pop() {
            Some(CardDone::Opened(record)) => Ok(Some(*record)),
            _ => Ok(None),
        }
    }

    /// Closes a card's open shipment the courier never took (R16 instant issue, or a pick-up at a
    /// counter): status withdrawn, no milestone. Once per card event. Returns the waybill withdrawn.
    pub async fn withdraw(
        &self,
        event_id: &str,
        card_id: &str,
        reason: &'static str,
        now: OffsetDateTime,
    ) -> Result<Option<String>, StoreError> {
        let work = CardWork::Withdraw { card_id: card_id.to_string(), reason };
        match self.apply_card_work(&[(event_id, &work)], now).await?.pop() {
            Some(CardDone::Withdrawn(waybill)) => Ok(Some(waybill)),
            _ => Ok(None),
        }
    }

    /// Does what card events ask of postal (each given with its event id), in order, in one
    /// transaction: all or nothing, each event's inbox row with its effect. What each did, in order.
    pub async fn apply_card_work(
        &self,
        work: &[(&str, &CardWork)],
        now: OffsetDateTime,
    ) -> Result<Vec<CardDone>, StoreError> {
        let mut tx = self.writer.begin().await?;
        let mut done = Vec::with_capacity(work.len());
        for (event_id, work) in work {
            if !socialcard_events::inbox::record_sqlite(&mut tx, event_id).await? {
                done.push(CardDone::Seen);
                continue;
            }
            done.push(match work {
                CardWork::Open(new) => CardDone::Opened(Box::new(Self::open_in(&mut tx, new, now).await?)),
                CardWork::Withdraw { card_id, reason } => match Self::withdraw_in(&mut tx, card_id, reason, now).await?
                {
                    Some(waybill) => CardDone::Withdrawn(waybill),
                    None => CardDone::Nothing,
                },
            });
        }
        tx.commit().await?;
        Ok(done)
    }

    /// R14: the card's shipment, with its waybill, its history's first entry and its `Opened` milestone.
    async fn open_in(
        tx: &mut sqlx::SqliteConnection,
        new: &NewShipment,
        now: OffsetDateTime,
    ) -> Result<ShipmentRecord, StoreError> {
        let serial: i64 = sqlx::query(
            "INSERT INTO sequences (name, value) VALUES ('waybill', 1)
             ON CONFLICT (name) DO UPDATE SET value = value + 1 RETURNING value",
        )
        .fetch_one(&mut *tx)
        .await?
        .try_get("value")?;
        let waybill = Waybill::issue(serial.unsigned_abs());
        let a = &new.address;
        let seq: i64 = sqlx::query(
            "INSERT INTO shipments (waybill, card_id, card_number, recipient, phone, address_line, district,
                 postal_code, backup_point_id, status, status_rank, milestone, sub_reason, opened_at, status_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0, $11, '', $12, $12) RETURNING seq",
        )
        .bind(waybill.as_str())
        .bind(&new.card_id)
        .bind(&new.card_number)
        .bind(&a.recipient)
        .bind(&a.phone)
        .bind(&a.line)
        .bind(&a.district)
        .bind(&a.postal_code)
        .bind(&new.backup_point_id)
        .bind(Status::Pending.as_str())
        .bind(Milestone::Opened.as_str())
        .bind(unix_micros(now))
        .fetch_one(&mut *tx)
        .await?
        .try_get("seq")?;
        let record = ShipmentRecord {
            seq,
            waybill: waybill.to_string(),
            card_id: new.card_id.clone(),
            card_number: new.card_number.clone(),
            address: new.address.clone(),
            backup_point_id: new.backup_point_id.clone(),
            progress: Progress::opened(),
            sub_reason: String::new(),
            opened_at: now,
            status_at: now,
        };
        let entry_id = format!("postal:opened:{waybill}");
        let entry = HistoryRow {
            waybill: waybill.as_str(),
            courier_event_id: &entry_id,
            status: Status::Pending,
            sub_reason: "",
            point_id: None,
            occurred_at: unix_micros(now),
            received_at: unix_micros(now),
            source: "postal",
            outcome: Outcome::Applied,
        };
        insert_history(tx, &entry).await?;
        let opened = milestone_row(MilestoneEvent {
            shipment: &Tracked::of(&record),
            milestone: Milestone::Opened,
            implied: false,
            occurred_at: now,
            courier_status: None,
            courier_event_id: "",
            sub_reason: "",
        });
        insert_outbox(tx, &opened).await?;
        Ok(record)
    }

    /// R16: the card's open shipment not yet taken by the courier, withdrawn; `None` when it has none.
    async fn withdraw_in(
        tx: &mut sqlx::SqliteConnection,
        card_id: &str,
        reason: &str,
        now: OffsetDateTime,
    ) -> Result<Option<String>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {SHIPMENT_COLUMNS} FROM shipments WHERE card_id = $1 AND closed_at IS NULL
                 AND status IN ('pending', 'info_received') ORDER BY seq DESC LIMIT 1"
        )))
        .bind(card_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let mut s = Tracked::of(&shipment_of(&row)?);
        s.progress = Progress { status: Status::Withdrawn, rank: 6, milestone: s.progress.milestone };
        s.sub_reason = reason.to_string();
        s.status_at = now;
        save_progress(tx, &s).await?;
        let entry_id = format!("postal:withdrawn:{}", s.waybill);
        let entry = HistoryRow {
            waybill: &s.waybill,
            courier_event_id: &entry_id,
            status: Status::Withdrawn,
            sub_reason: reason,
            point_id: None,
            occurred_at: unix_micros(now),
            received_at: unix_micros(now),
            source: "postal",
            outcome: Outcome::Applied,
        };
        insert_history(tx, &entry).await?;
        Ok(Some(s.waybill))
    }

    /// Takes a batch of checked updates all or nothing: duplicates (by courier event id) skipped,
    /// unknown waybills kept aside, every other update appended to its shipment's history with what it
    /// did, the shipment moved forward and its new milestones written to the outbox.
    ///
    /// The updates are decided one after the other in memory, in the order given (so a batch holding
    /// several updates of one shipment moves it step by step, and a courier event id repeated inside the
    /// batch is a duplicate), after two reads (the event ids already taken, the batch's shipments). The
    /// batch is one write of the group writer: batches of concurrent feeds share a transaction, each in
    /// a savepoint of its own, and its statements run straight on the writer's connection.
    pub async fn ingest(
        &self,
        updates: Vec<Update>,
        source: Source,
        now: OffsetDateTime,
    ) -> Result<IngestReport, StoreError> {
        if updates.is_empty() {
            return Ok(IngestReport::default());
        }
        self.group.run(move |conn| Self::ingest_in(conn, &updates, source, now)).await?
    }

    /// [`Self::ingest`] inside the group writer's transaction (a savepoint of its own).
    fn ingest_in(
        conn: &mut Direct<'_>,
        updates: &[Update],
        source: Source,
        now: OffsetDateTime,
    ) -> Result<IngestReport, StoreError> {
        let mut report = IngestReport::default();
        let json = |items: Vec<&str>| serde_json::to_string(&items).map_err(|e| StoreError::Corrupt(e.to_string()));
        let event_ids = json(updates.iter().map(|u| u.courier_event_id.as_str()).collect())?;
        let waybills = json(updates.iter().map(|u| u.waybill.as_str()).collect())?;
        // Courier event ids taken before (stored), and those of this batch (borrowed from it).
        let stored: HashSet<String> = conn
            .query(
                "SELECT courier_event_id FROM shipment_history WHERE courier_event_id IN (SELECT value FROM json_each($1))
                 UNION ALL
                 SELECT courier_event_id FROM unknown_waybill_updates
                 WHERE courier_event_id IN (SELECT value FROM json_each($1))",
                &[(&event_ids).into()],
                |r| r.text(0),
            )?
            .into_iter()
            .collect();
        let mut seen: HashSet<&str> = HashSet::with_capacity(updates.len());
        let mut shipments: HashMap<String, Tracked> = HashMap::with_capacity(updates.len());
        for s in conn.query(
            &format!(
                "SELECT {TRACKED_COLUMNS} FROM shipments WHERE waybill IN (SELECT DISTINCT value FROM json_each($1))"
            ),
            &[(&waybills).into()],
            |r| Ok(tracked_of(r)),
        )? {
            let s = s?;
            shipments.insert(s.waybill.clone(), s);
        }

        let received_at = unix_micros(now);
        let mut history = Vec::new();
        let mut unknown = Vec::new();
        let mut outbox = Vec::new();
        // Shipments moved, in the order they first moved (the set: to know a repeat without a scan).
        let mut moved: Vec<&str> = Vec::new();
        let mut moved_set: HashSet<&str> = HashSet::new();
        for u in updates {
            if stored.contains(&u.courier_event_id) || !seen.insert(&u.courier_event_id) {
                report.duplicates += 1;
                continue;
            }
            let waybill = u.waybill.as_str();
            let row = HistoryRow {
                waybill,
                courier_event_id: &u.courier_event_id,
                status: u.status,
                sub_reason: &u.sub_reason,
                point_id: u.point_id.as_deref(),
                occurred_at: unix_micros(u.occurred_at),
                received_at,
                source: source.as_str(),
                outcome: Outcome::Applied,
            };
            let Some(shipment) = shipments.get_mut(waybill) else {
                unknown.push(row);
                report.unknown_waybills += 1;
                tracing::warn!(waybill = %waybill, "status update for an unknown waybill kept aside");
                continue;
            };
            let decision = decide(shipment.progress, u.status);
            history.push(HistoryRow { outcome: decision.outcome(), ..row });
            report.applied += 1;
            match decision {
                Decision::OutOfOrder => report.out_of_order += 1,
                Decision::Conflict => {
                    report.conflicts += 1;
                    tracing::warn!(waybill = %waybill, status = %u.status, "status update contradicts the shipment's path");
                }
                Decision::Applied { progress, milestones } => {
                    let moves = progress.rank > shipment.progress.rank
                        || progress.status != shipment.progress.status
                        || u.occurred_at > shipment.status_at;
                    if moves {
                        shipment.progress = progress;
                        shipment.sub_reason = u.sub_reason.clone();
                        shipment.status_at = u.occurred_at.max(shipment.status_at);
                        if moved_set.insert(waybill) {
                            moved.push(waybill);
                        }
                    }
                    // The registry refuses a collection date in the future or before the application
                    // (R17): a courier clock running ahead, or behind to before the card was even
                    // produced, is brought within the shipment's life for the milestones.
                    let at = u.occurred_at.clamp(shipment.opened_at, now.max(shipment.opened_at));
                    if at != u.occurred_at && !milestones.is_empty() {
                        tracing::warn!(waybill = %waybill, "courier time outside the shipment's life; milestone dated within it");
                    }
                    for (milestone, implied) in milestones {
                        outbox.push(milestone_row(MilestoneEvent {
                            shipment,
                            milestone,
                            implied,
                            occurred_at: at,
                            courier_status: Some(u.status),
                            courier_event_id: &u.courier_event_id,
                            sub_reason: &u.sub_reason,
                        }));
                    }
                }
            }
        }
        // One prepared statement per table, run row by row on the writer's connection (no hand-off).
        let history: Vec<_> = history.iter().map(HistoryRow::values).collect();
        conn.insert_rows(history_into!(), HISTORY_ROW, &history)?;
        for row in &unknown {
            conn.execute(INSERT_UNKNOWN, &row.values()[..8])?;
        }
        for s in moved.iter().filter_map(|w| shipments.get(*w)) {
            let (sql, values) = progress_values(s);
            conn.execute(sql, &values)?;
        }
        let outbox: Vec<_> = outbox.iter().map(OutboxRow::values).collect();
        conn.insert_rows(outbox_into!(), OUTBOX_ROW, &outbox)?;
        Ok(report)
    }

    pub async fn shipment_by_waybill(&self, waybill: &str) -> Result<Option<ShipmentRecord>, StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {SHIPMENT_COLUMNS} FROM shipments WHERE waybill = $1")))
            .bind(waybill)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(shipment_of)
            .transpose()
    }

    /// The newest shipment of a card.
    pub async fn shipment_of_card(&self, card_id: &str) -> Result<Option<ShipmentRecord>, StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {SHIPMENT_COLUMNS} FROM shipments WHERE card_id = $1 ORDER BY seq DESC LIMIT 1"
        )))
        .bind(card_id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(shipment_of)
        .transpose()
    }

    /// A shipment's history in the order things happened (then in the order received).
    pub async fn history(&self, waybill: &str) -> Result<Vec<HistoryRecord>, StoreError> {
        sqlx::query(
            "SELECT courier_event_id, status, sub_reason, point_id, occurred_at, received_at, source, outcome
             FROM shipment_history WHERE waybill = $1 ORDER BY occurred_at, id",
        )
        .bind(waybill)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(history_of)
        .collect()
    }

    pub async fn list(&self, f: &ShipmentFilter) -> Result<Vec<ShipmentRecord>, StoreError> {
        let mut sql = format!("SELECT {SHIPMENT_COLUMNS} FROM shipments WHERE seq > $1");
        let mut n = 1;
        let mut arg = |sql: &mut String, clause: &str| {
            n += 1;
            sql.push_str(&clause.replace('?', &format!("${n}")));
        };
        if f.status.is_some() {
            arg(&mut sql, " AND status = ?");
        }
        if f.point_id.is_some() {
            arg(&mut sql, " AND backup_point_id = ?");
        }
        if f.opened_before.is_some() {
            arg(&mut sql, " AND closed_at IS NULL AND opened_at < ?");
        }
        arg(&mut sql, " ORDER BY seq LIMIT ?");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(f.after_seq);
        if let Some(s) = f.status {
            q = q.bind(s.as_str());
        }
        if let Some(p) = &f.point_id {
            q = q.bind(p.clone());
        }
        if let Some(t) = f.opened_before {
            q = q.bind(unix_micros(t));
        }
        q.bind(f.limit).fetch_all(&self.pool).await?.iter().map(shipment_of).collect()
    }

    /// Updates kept aside for unknown waybills, oldest first, after row `after_id`; with their total.
    pub async fn unknown_updates(
        &self,
        after_id: i64,
        limit: i64,
    ) -> Result<(Vec<(i64, Update, OffsetDateTime, String)>, i64), StoreError> {
        let rows = sqlx::query(
            "SELECT id, courier_event_id, waybill, status, sub_reason, point_id, occurred_at, received_at, source
             FROM unknown_waybill_updates WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in &rows {
            let status: String = r.try_get("status")?;
            let update = Update {
                courier_event_id: r.try_get("courier_event_id")?,
                waybill: Waybill::parse("waybill", &r.try_get::<String, _>("waybill")?)
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?,
                status: Status::from_label(&status).ok_or_else(|| StoreError::Corrupt(format!("status {status}")))?,
                sub_reason: r.try_get("sub_reason")?,
                occurred_at: time_of(r.try_get("occurred_at")?)?,
                point_id: r.try_get("point_id")?,
            };
            out.push((r.try_get("id")?, update, time_of(r.try_get("received_at")?)?, r.try_get("source")?));
        }
        let total: i64 = sqlx::query("SELECT COUNT(*) AS n FROM unknown_waybill_updates")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?;
        Ok((out, total))
    }

    pub async fn counts(&self) -> Result<TableCounts, StoreError> {
        let r = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM shipments) AS s, (SELECT COUNT(*) FROM shipment_history) AS h,
                 (SELECT COUNT(*) FROM unknown_waybill_updates) AS u, (SELECT COUNT(*) FROM outbox) AS o",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(TableCounts {
            shipments: r.try_get("s")?,
            history: r.try_get("h")?,
            unknown_waybill_updates: r.try_get("u")?,
            outbox: r.try_get("o")?,
        })
    }
}
