//! Employer batches (R7: the employer submits a production list, 制卡清单): thousands to millions of
//! applications imported, approved and sent into production at once.
//!
//! Each row goes through the same domain rules as the one-card calls (`Card::apply_for`, `review`,
//! `start_production`) and leaves the same trail: three audit rows and three card events
//! (`ApplicationSubmitted`, `ApplicationApproved`, `ProductionStarted`), and the holder's version bumped
//! as `SubmitApplication` bumps it (R2). What differs is the I/O: rows are decided a chunk at a time
//! against one snapshot (one query per table), card numbers are reserved for the whole chunk at once,
//! and the chunk commits in one transaction of multi-row INSERTs. A bad row is refused with its reason
//! and never stops the good ones.
//!
//! Idempotency: a row's key is derived from the batch id and the holder's ID number; an accepted row
//! stores its answer under it, so importing the same batch again answers the same cards and writes
//! nothing, and the same key with different row contents is refused (`IDEMPOTENCY_KEY_REUSED`).
//! A chunk that races another writer (a one-card call for the same holder, a concurrent import) fails
//! its version check as a whole and is decided again from fresh state.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use prost::Message;
use sha2::{Digest, Sha256};
use socialcard_domain::card::{DeliveryAddress, HolderStatus};
use socialcard_domain::channel::{Actor, Context};
use socialcard_domain::photo::PhotoSource;
use socialcard_domain::{Application, Card, CardNumber, CardType, Channel, CitizenId, Rejection};
use socialcard_proto::events::v1 as ev;
use socialcard_proto::events::v1::card_event::Kind;
use socialcard_proto::registry::v1 as pb;
use socialcard_server::ApiError;
use time::OffsetDateTime;

use crate::app::{CARD_TOPIC, Registry, SOURCE, event_type};
use crate::convert;
use crate::storage::{AuditRecord, BatchCommit, CardRecord, OutboxRecord, StoreError};

/// The operation name under which a row's answer is stored.
pub const ROW_OPERATION: &str = "ImportEmployerBatchRow";
/// Rows decided and committed together.
pub const DEFAULT_CHUNK: usize = 2_000;
const MAX_ATTEMPTS: u32 = 8;

/// The list as the employer's bank hands it over, with the bureau's review of it.
#[derive(Clone, Debug)]
pub struct EmployerBatch {
    /// The employer's production list id; with a holder's ID number, the row's idempotency key.
    pub batch_id: String,
    pub employer_id: String,
    /// Where the list was taken in (the payroll bank's batch site).
    pub site_id: String,
    /// The bureau operator who reviewed and approved the list (R10).
    pub reviewer_id: String,
    /// The production run the cards go into.
    pub production_batch_id: String,
    pub rows: Vec<EmployerBatchRow>,
}

/// One employee on the list.
#[derive(Clone, Debug)]
pub struct EmployerBatchRow {
    pub citizen_id: String,
    pub card_type: CardType,
    pub holder_status: HolderStatus,
    pub bank_code: String,
    pub payroll_bank_codes: Vec<String>,
    pub photo_source: PhotoSource,
    pub backup_point_id: String,
    pub delivery: Option<DeliveryAddress>,
}

/// What became of one row, in the order of the list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RowOutcome {
    /// Applied, approved and in production now.
    Applied { card_id: String, card_number: String },
    /// Imported by an earlier run of the same batch: its answer, nothing written.
    AlreadyApplied { card_id: String, card_number: String },
    /// Refused with the machine-readable reason of the rule it broke; nothing written for it.
    Rejected { reason: &'static str, message: String },
}

#[derive(Clone, Debug, Default)]
pub struct BatchReport {
    pub outcomes: Vec<RowOutcome>,
    pub applied: usize,
    pub already_applied: usize,
    pub rejected: usize,
}

fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::Unavailable(m) => ApiError::Unavailable(m),
        other => ApiError::Internal(other.to_string()),
    }
}

/// A row's idempotency key: the batch id and the holder's key from the store (a keyed blind index, so
/// the idempotency table holds no citizen ID in clear).
fn row_key(batch_id: &str, holder_key: &str) -> String {
    format!("employer-batch/{batch_id}/{holder_key}")
}

/// A chunk of rows in import order, with their repeat flags and idempotency keys.
#[derive(Clone, Copy)]
struct Chunk<'a> {
    rows: &'a [&'a EmployerBatchRow],
    repeated: &'a [bool],
    keys: &'a [String],
}

/// What a row asks for, so that a reused key with other contents is told apart from a replay.
fn row_hash(batch: &EmployerBatch, row: &EmployerBatchRow) -> Vec<u8> {
    let mut h = Sha256::new();
    let mut field = |s: &str| {
        h.update(s.as_bytes());
        h.update([0]);
    };
    field(ROW_OPERATION);
    field(&batch.employer_id);
    field(&batch.production_batch_id);
    field(&row.citizen_id);
    field(&format!("{:?}/{:?}/{:?}", row.card_type, row.holder_status, row.photo_source));
    field(&row.bank_code);
    field(&row.payroll_bank_codes.join(","));
    field(&row.backup_point_id);
    if let Some(d) = &row.delivery {
        for s in [&d.recipient, &d.phone, &d.line, &d.district, &d.postal_code] {
            field(s);
        }
    }
    h.finalize().to_vec()
}

/// The three transition contexts of a batch, with their audit JSON computed once.
struct Contexts {
    submit: Context,
    review: Context,
    production: Context,
    json: [(String, String); 3],
}

impl Contexts {
    fn new(batch: &EmployerBatch) -> Self {
        let submit = Context::new(Channel::EmployerBatch)
            .with_actor(Actor { site_id: Some(batch.site_id.clone()), ..Actor::default() });
        let review = Context::new(Channel::BureauWindow)
            .with_actor(Actor { operator_id: Some(batch.reviewer_id.clone()), ..Actor::default() });
        let production = Context::new(Channel::Production);
        let json = [&submit, &review, &production].map(|c| {
            (
                serde_json::to_string(&c.actor).unwrap_or_default(),
                serde_json::to_string(&c.documents).unwrap_or_default(),
            )
        });
        Self { submit, review, production, json }
    }
}

/// A row after the rules up to approval.
enum Decided {
    Done(RowOutcome),
    Approved {
        applied: Box<Card>,
        approved: Box<Card>,
        pin_digest: Vec<u8>,
        key_index: usize,
        hash: Vec<u8>,
        /// The holder's stored version, checked and bumped on commit (R2).
        person_version: Option<i64>,
    },
}

/// A chunk's rows after the rules up to approval, and the time they were decided at.
struct DecidedChunk {
    rows: Vec<Decided>,
    now: OffsetDateTime,
}

/// A chunk whose commit runs in the background: its index, its rows' outcomes should it commit, the commit.
type Committing = (usize, Vec<RowOutcome>, tokio::task::JoinHandle<Result<(), StoreError>>);

/// A chunk's writes and its rows' outcomes, before they are committed.
struct ChunkPlan {
    commit: BatchCommit,
    outcomes: Vec<RowOutcome>,
}

impl Registry {
    /// Imports an employer batch: every good row applied, approved and in production (with its card
    /// number), every bad row refused with its reason. Chunks of `chunk` rows commit one at a time.
    pub async fn import_employer_batch(&self, batch: &EmployerBatch, chunk: usize) -> Result<BatchReport, ApiError> {
        if batch.batch_id.trim().is_empty() || batch.batch_id.len() > 64 {
            return Err(
                Rejection::invalid("batch_id", "BATCH_ID_REQUIRED", "a batch has an id of at most 64 bytes").into()
            );
        }
        if batch.reviewer_id.trim().is_empty() {
            return Err(Rejection::invalid("reviewer_id", "REVIEWER_REQUIRED", "a batch names its reviewer").into());
        }
        let contexts = Contexts::new(batch);
        let mut report = BatchReport { outcomes: Vec::with_capacity(batch.rows.len()), ..BatchReport::default() };
        // A holder listed twice: the later rows are refused, whichever chunk they fall in.
        let mut seen = HashSet::with_capacity(batch.rows.len());
        let repeated: Vec<bool> = batch.rows.iter().map(|r| !seen.insert(r.citizen_id.as_str())).collect();
        // Rows are imported in the order of their holders' keys, not the list's. Holders, the card index
        // by holder and the idempotency keys are all keyed that way (a blind index: random against the
        // list), so consecutive chunks then touch neighbouring B-tree pages instead of a page per row:
        // at a million rows, each chunk otherwise rewrote about a page per row in each of those indexes.
        let holder_keys: Vec<String> = batch.rows.iter().map(|r| self.store.holder_key(&r.citizen_id)).collect();
        let mut order: Vec<usize> = (0..batch.rows.len()).collect();
        order.sort_by(|&a, &b| holder_keys[a].cmp(&holder_keys[b]));
        let rows: Vec<&EmployerBatchRow> = order.iter().map(|&i| &batch.rows[i]).collect();
        let repeated: Vec<bool> = order.iter().map(|&i| repeated[i]).collect();
        let keys: Vec<String> = order.iter().map(|&i| row_key(&batch.batch_id, &holder_keys[i])).collect();
        let chunk = chunk.max(1);
        let chunks: Vec<Chunk<'_>> = rows
            .chunks(chunk)
            .zip(repeated.chunks(chunk))
            .zip(keys.chunks(chunk))
            .map(|((rows, repeated), keys)| Chunk { rows, repeated, keys })
            .collect();
        self.import_chunks(batch, &chunks, &contexts, &mut report).await?;
        // Back to the list's order.
        let mut outcomes: Vec<Option<RowOutcome>> = vec![None; batch.rows.len()];
        for (o, &i) in report.outcomes.drain(..).zip(&order) {
            outcomes[i] = Some(o);
        }
        report.outcomes = outcomes
            .into_iter()
            .map(|o| o.ok_or_else(|| ApiError::Internal("a row of the batch has no outcome".into())))
            .collect::<Result<_, _>>()?;
        for o in &report.outcomes {
            match o {
                RowOutcome::Applied { .. } => report.applied += 1,
                RowOutcome::AlreadyApplied { .. } => report.already_applied += 1,
                RowOutcome::Rejected { .. } => report.rejected += 1,
            }
        }
        Ok(report)
    }

    /// The chunks in order, pipelined: chunk n is read and decided while chunk n-1 commits (its sealing,
    /// encoding and SQL run on another thread). A list holds each holder once (repeats are refused
    /// above), so chunk n's snapshot cannot depend on chunk n-1's writes; should another writer race it,
    /// the version check fails that chunk's commit and it is decided again on its own.
    async fn import_chunks(
        &self,
        batch: &EmployerBatch,
        chunks: &[Chunk<'_>],
        contexts: &Contexts,
        report: &mut BatchReport,
    ) -> Result<(), ApiError> {
        let mut committing: Option<Committing> = None;
        for (n, chunk) in chunks.iter().enumerate() {
            let decided = self.decide_chunk(batch, *chunk, contexts).await?;
            // Card numbers are reserved on the writer, which the previous chunk holds until it commits.
            if let Some((m, outcomes, commit)) = committing.take() {
                self.finish_chunk(batch, chunks[m], m, outcomes, commit, contexts, report).await?;
            }
            let plan = self.number_chunk(batch, chunk.keys, contexts, decided).await?;
            let store = self.store.clone();
            committing = Some((n, plan.outcomes, tokio::spawn(async move { store.commit_batch(plan.commit).await })));
        }
        if let Some((m, outcomes, commit)) = committing.take() {
            self.finish_chunk(batch, chunks[m], m, outcomes, commit, contexts, report).await?;
        }
        Ok(())
    }

    /// The end of a pipelined chunk's commit: its outcomes, or the chunk decided again if it raced.
    #[allow(clippy::too_many_arguments)]
    async fn finish_chunk(
        &self,
        batch: &EmployerBatch,
        chunk: Chunk<'_>,
        n: usize,
        outcomes: Vec<RowOutcome>,
        commit: tokio::task::JoinHandle<Result<(), StoreError>>,
        contexts: &Contexts,
        report: &mut BatchReport,
    ) -> Result<(), ApiError> {
        let committed = commit.await.map_err(|e| ApiError::Internal(format!("chunk commit task: {e}")))?;
        let outcomes = match committed {
            Ok(()) => Ok(outcomes),
            Err(StoreError::VersionConflict | StoreError::IdempotencyConflict) => {
                tracing::debug!(batch = %batch.batch_id, chunk = n, "employer batch chunk raced, deciding again");
                self.import_chunk(batch, chunk, contexts).await
            }
            Err(e) => Err(store_error(e)),
        }
        .inspect_err(
            |e| tracing::warn!(batch = %batch.batch_id, chunk = n, error = %e, "employer batch chunk failed"),
        )?;
        report.outcomes.extend(outcomes);
        Ok(())
    }

    /// One chunk on its own, decided again from fresh state until it commits.
    async fn import_chunk(
        &self,
        batch: &EmployerBatch,
        chunk: Chunk<'_>,
        contexts: &Contexts,
    ) -> Result<Vec<RowOutcome>, ApiError> {
        for attempt in 0..MAX_ATTEMPTS {
            let decided = self.decide_chunk(batch, chunk, contexts).await?;
            let plan = self.number_chunk(batch, chunk.keys, contexts, decided).await?;
            match self.store.commit_batch(plan.commit).await {
                Ok(()) => return Ok(plan.outcomes),
                Err(StoreError::VersionConflict | StoreError::IdempotencyConflict) => {
                    tracing::debug!(batch = %batch.batch_id, attempt, "employer batch chunk raced, deciding again");
                    tokio::time::sleep(Duration::from_millis(u64::from(attempt) * 5 + 1)).await;
                }
                Err(e) => return Err(store_error(e)),
            }
        }
        Err(ApiError::Rejected(Rejection::new(
            socialcard_domain::RejectionKind::Aborted,
            "CONCURRENT_CHANGE",
            "the batch's holders kept changing concurrently; retry",
        )))
    }

    /// Reads a chunk's state (one query per table) and applies the rules up to approval; card numbers
    /// are drawn later, only for rows that pass them.
    async fn decide_chunk(
        &self,
        batch: &EmployerBatch,
        Chunk { rows, repeated, keys }: Chunk<'_>,
        contexts: &Contexts,
    ) -> Result<DecidedChunk, ApiError> {
        let ids: Vec<String> = rows.iter().map(|r| r.citizen_id.clone()).collect::<HashSet<_>>().into_iter().collect();
        let snapshot = self.store.batch_snapshot(&ids, keys).await.map_err(store_error)?;
        let now = self.clock.now();
        let today = self.policy.local_date(now);
        let persons: HashMap<String, _> = snapshot.persons.into_iter().map(|p| (p.citizen_id.clone(), p)).collect();
        let mut holder_cards: HashMap<String, Vec<Card>> = HashMap::new();
        for c in snapshot.cards {
            holder_cards.entry(c.card.holder.expose().to_string()).or_default().push(c.card);
        }
        let stored: HashMap<String, _> = snapshot.idempotency.into_iter().map(|i| (i.key.clone(), i)).collect();

        let mut decided = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            if repeated[i] {
                decided.push(Decided::Done(RowOutcome::Rejected {
                    reason: "DUPLICATE_ROW",
                    message: "the holder is on this list more than once".into(),
                }));
                continue;
            }
            let hash = row_hash(batch, row);
            if let Some(s) = stored.get(keys[i].as_str()) {
                decided.push(Decided::Done(replayed(s.operation.as_str(), &s.request_hash, &s.response, &hash)));
                continue;
            }
            match self.decide_row(batch, row, contexts, now, today, &persons, &holder_cards) {
                Ok((applied, approved, pin_digest)) => {
                    holder_cards.entry(applied.holder.expose().to_string()).or_default().push(approved.clone());
                    let person_version = persons.get(applied.holder.expose()).map(|p| p.version);
                    decided.push(Decided::Approved {
                        applied: Box::new(applied),
                        approved: Box::new(approved),
                        pin_digest,
                        key_index: i,
                        hash,
                        person_version,
                    });
                }
                Err(r) => decided.push(Decided::Done(RowOutcome::Rejected { reason: r.reason, message: r.message })),
            }
        }
        Ok(DecidedChunk { rows: decided, now })
    }

    /// Reserves card numbers for a chunk's approved rows and writes out what committing it takes.
    async fn number_chunk(
        &self,
        batch: &EmployerBatch,
        keys: &[String],
        contexts: &Contexts,
        decided: DecidedChunk,
    ) -> Result<ChunkPlan, ApiError> {
        let DecidedChunk { rows: decided, now } = decided;
        let approved_rows = decided.iter().filter(|d| matches!(d, Decided::Approved { .. })).count();
        let mut next_number = if approved_rows > 0 {
            self.store.reserve_sequence("card_number", approved_rows as i64).await.map_err(store_error)?
        } else {
            0
        };
        let mut plan = ChunkPlan { commit: BatchCommit::default(), outcomes: Vec::with_capacity(decided.len()) };
        let mut touched: HashSet<String> = HashSet::new();
        for d in decided {
            let (applied, approved, pin_digest, key_index, hash, person_version) = match d {
                Decided::Done(o) => {
                    plan.outcomes.push(o);
                    continue;
                }
                Decided::Approved { applied, approved, pin_digest, key_index, hash, person_version } => {
                    (*applied, *approved, pin_digest, key_index, hash, person_version)
                }
            };
            let number = CardNumber::issue(self.series, u64::try_from(next_number).unwrap_or(0));
            next_number += 1;
            let produced = match approved.start_production(number.clone(), &contexts.production) {
                Ok(c) => c,
                Err(r) => {
                    plan.outcomes.push(RowOutcome::Rejected { reason: r.reason, message: r.message });
                    continue;
                }
            };
            let key = &keys[key_index];
            let holder = applied.holder.clone();
            let submitted = Kind::ApplicationSubmitted(ev::ApplicationSubmitted {
                citizen_id_masked: holder.masked(),
                card_type: convert::card_type_to_pb(applied.card_type) as i32,
                bank_code: applied.bank_code.clone(),
                region_code: holder.region_code().to_string(),
                fee_fen: applied.fee_fen,
                backup_point_id: applied.backup_point_id.clone(),
                replaces_card_id: String::new(),
            });
            let started = Kind::ProductionStarted(ev::ProductionStarted {
                card_number: number.to_string(),
                batch_id: batch.production_batch_id.clone(),
            });
            let c = &mut plan.commit;
            record(c, key, "submit_application", &contexts.submit, &contexts.json[0], None, &applied, submitted, now);
            let approved_kind = Kind::ApplicationApproved(ev::ApplicationApproved {});
            record(
                c,
                key,
                "approve",
                &contexts.review,
                &contexts.json[1],
                Some(&applied),
                &approved,
                approved_kind,
                now,
            );
            record(
                c,
                key,
                "start_production",
                &contexts.production,
                &contexts.json[2],
                Some(&approved),
                &produced,
                started,
                now,
            );
            if let Some(version) = person_version
                && touched.insert(holder.expose().to_string())
            {
                c.touch_persons.push((holder.expose().to_string(), version));
            }
            let answer =
                pb::Card { card_id: produced.id.clone(), card_number: number.to_string(), ..pb::Card::default() };
            c.idempotency.push(crate::storage::IdempotencyRecord {
                key: key.clone(),
                operation: ROW_OPERATION.to_string(),
                request_hash: hash,
                response: answer.encode_to_vec(),
            });
            plan.outcomes.push(RowOutcome::Applied { card_id: produced.id.clone(), card_number: number.to_string() });
            c.cards.push(CardRecord { card: produced, pin_digest });
        }
        Ok(plan)
    }

    /// The rules of `SubmitApplication` and an approving `ReviewApplication` for one row.
    #[allow(clippy::too_many_arguments)]
    fn decide_row(
        &self,
        batch: &EmployerBatch,
        row: &EmployerBatchRow,
        contexts: &Contexts,
        now: OffsetDateTime,
        today: time::Date,
        persons: &HashMap<String, crate::storage::PersonRecord>,
        holder_cards: &HashMap<String, Vec<Card>>,
    ) -> Result<(Card, Card, Vec<u8>), Rejection> {
        let holder = CitizenId::parse(&row.citizen_id, today)?;
        let person = persons
            .get(holder.expose())
            .ok_or_else(|| Rejection::not_found("PERSON_NOT_FOUND", "register the person before applying"))?;
        let app = Application {
            holder: holder.clone(),
            registered_phone: person.phone.clone(),
            card_type: row.card_type,
            holder_status: row.holder_status,
            bank_code: row.bank_code.clone(),
            pension_bank_code: None,
            payroll_bank_codes: row.payroll_bank_codes.clone(),
            employer_id: Some(batch.employer_id.clone()).filter(|e| !e.is_empty()),
            photo_source: row.photo_source,
            backup_point_id: row.backup_point_id.clone(),
            delivery: row.delivery.clone(),
            replaces: None,
        };
        let existing = holder_cards.get(holder.expose()).map(Vec::as_slice).unwrap_or_default();
        let id = uuid::Uuid::now_v7().to_string();
        let applied = Card::apply_for(id.clone(), app, &contexts.submit, now, &self.policy, &self.banks, existing)?;
        let approved = applied.review(true, "", &contexts.review)?;
        let pin = self.policy.initial_social_pin(&holder);
        Ok((applied, approved, self.pins.digest(&id, &pin)))
    }
}

fn replayed(operation: &str, stored_hash: &[u8], response: &[u8], hash: &[u8]) -> RowOutcome {
    if operation != ROW_OPERATION || stored_hash != hash {
        return RowOutcome::Rejected {
            reason: "IDEMPOTENCY_KEY_REUSED",
            message: "this batch imported the holder with other details".into(),
        };
    }
    match pb::Card::decode(response) {
        Ok(c) => RowOutcome::AlreadyApplied { card_id: c.card_id, card_number: c.card_number },
        Err(e) => RowOutcome::Rejected { reason: "STORED_ANSWER_UNREADABLE", message: e.to_string() },
    }
}

/// The audit row and outbox event of one transition, as `Registry::record_change` writes them.
#[allow(clippy::too_many_arguments)]
fn record(
    commit: &mut BatchCommit,
    key: &str,
    action: &str,
    ctx: &Context,
    json: &(String, String),
    before: Option<&Card>,
    after: &Card,
    kind: Kind,
    now: OffsetDateTime,
) {
    commit.audit.push(AuditRecord {
        card_id: after.id.clone(),
        at: now,
        action: action.to_string(),
        channel: ctx.channel.as_str().to_string(),
        actor: json.0.clone(),
        documents: json.1.clone(),
        from_state: before.map(Card::state_label).unwrap_or_default(),
        to_state: after.state_label(),
        idempotency_key: key.to_string(),
    });
    let event_type = event_type(&kind);
    let event = ev::CardEvent {
        card_id: after.id.clone(),
        occurred_at: Some(convert::timestamp(now)),
        actor: Some(convert::actor_to_pb(ctx.channel, &ctx.actor)),
        card_version: after.version,
        idempotency_key: key.to_string(),
        kind: Some(kind),
    };
    commit.outbox.push(OutboxRecord {
        event_id: uuid::Uuid::now_v7().to_string(),
        topic: CARD_TOPIC.to_string(),
        key: after.id.clone(),
        event_type: event_type.to_string(),
        payload: event.encode_to_vec(),
        occurred_at: now,
        source: SOURCE.to_string(),
        traceparent: None,
    });
}
