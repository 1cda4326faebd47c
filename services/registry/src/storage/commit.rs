//! What one [`Commit`] writes, as statements with their values: built once here, run by either
//! driver's executor (sqlx on PostgreSQL; SQLite's group writer runs them straight on its connection,
//! `socialcard_events::direct`), so both databases store exactly the same rows.
//!
//! Only the audit trail needs a read in between: each card's entries form a hash chain, so the last
//! hash of every card the commit touches is read first ([`Commit::audited_cards`]), then the audit and
//! outbox statements are built on top of those heads.

use std::collections::HashMap;

use socialcard_events::unix_micros as micros;

use super::{
    AuditRecord, BatchCommit, CardRecord, CardWrite, Commit, IdempotencyRecord, OutboxRecord, PersonWrite, StoreError,
};
use crate::seal::Sealer;

/// The last audit hash of a card (none: the card's chain starts at genesis).
pub(super) const LAST_AUDIT_HASH: &str = "SELECT hash FROM audit_log WHERE card_id = $1 ORDER BY seq DESC LIMIT 1";

/// A value bound to a statement parameter, in `$n` order.
#[derive(Debug)]
pub(super) enum Param {
    Int(i64),
    Text(String),
    /// A text column that may be NULL (typed, for PostgreSQL).
    OptText(Option<String>),
    Blob(Vec<u8>),
}

/// What a statement must have done, and what its refusals mean.
#[derive(Debug)]
pub(super) struct Expect {
    /// It must change exactly one row, else the commit is a version conflict.
    pub one_row: bool,
    /// What a UNIQUE violation means here.
    pub unique: fn() -> StoreError,
}

#[derive(Debug)]
pub(super) struct Statement {
    pub sql: &'static str,
    pub params: Vec<Param>,
    pub expect: Expect,
}

impl Statement {
    fn new(sql: &'static str, params: Vec<Param>, unique: fn() -> StoreError) -> Self {
        Self { sql, params, expect: Expect { one_row: false, unique } }
    }

    fn one_row(mut self) -> Self {
        self.expect.one_row = true;
        self
    }

    /// Whether `changed` rows is what the statement had to do.
    pub fn check(&self, changed: u64) -> Result<(), StoreError> {
        if self.expect.one_row && changed != 1 {
            return Err(StoreError::VersionConflict);
        }
        Ok(())
    }
}

fn seal_error(e: crate::seal::SealError) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

impl Commit {
    /// The key, the person and the cards: everything before the audit trail.
    pub(super) fn head_statements(&self, sealer: &Sealer, now: i64) -> Result<Vec<Statement>, StoreError> {
        let mut out = Vec::new();
        // The key first: a concurrent twin of this request fails here, before any other write.
        if let Some(i) = &self.idempotency {
            out.push(idempotency_statement(sealer, i, now)?);
        }
        match &self.person {
            Some(PersonWrite::Insert(p)) => {
                let index = sealer.blind_index(&p.citizen_id);
                let name = sealer.seal(&p.name, &index).map_err(seal_error)?;
                let phone = sealer.seal(&p.phone, &index).map_err(seal_error)?;
                out.push(Statement::new(
                    "INSERT INTO persons (citizen_id, name, phone, registered_at, version) VALUES ($1, $2, $3, $4, $5)",
                    vec![
                        Param::Text(index),
                        Param::Text(name),
                        Param::Text(phone),
                        Param::Int(micros(p.registered_at)),
                        Param::Int(p.version),
                    ],
                    || StoreError::Duplicate("person"),
                ));
            }
            Some(PersonWrite::Touch { citizen_id, expected_version }) => {
                out.push(touch_statement(sealer, citizen_id, *expected_version));
            }
            None => {}
        }
        for w in &self.cards {
            out.push(match w {
                CardWrite::Insert(r) => card_statement(sealer, r, true, now)?,
                CardWrite::Update(r) => card_statement(sealer, r, false, now)?,
            });
        }
        Ok(out)
    }

    /// The cards whose audit chains this commit extends, each once, in the order first audited.
    pub(super) fn audited_cards(&self) -> Vec<&str> {
        let mut cards: Vec<&str> = Vec::new();
        for a in &self.audit {
            if !cards.contains(&a.card_id.as_str()) {
                cards.push(&a.card_id);
            }
        }
        cards
    }

    /// Whether the commit can be one statement with the audit heads read before it: every audited
    /// card is written by this commit, and audited once; no card is written twice. An update is
    /// version-checked and every audit row of a card comes with a change of its version (or its
    /// insert), so when the update succeeds no other commit has extended the card's chain since the
    /// card, then its head, were read; a new card has no chain. Once each: one statement's rows are
    /// not ordered among themselves, and its second update of a row would not see the first.
    pub(super) fn heads_readable_first(&self) -> bool {
        let written: Vec<&str> = self
            .cards
            .iter()
            .map(|w| match w {
                CardWrite::Insert(r) | CardWrite::Update(r) => r.card.id.as_str(),
            })
            .collect();
        let audited = self.audited_cards();
        audited.len() == self.audit.len()
            && written.iter().enumerate().all(|(i, id)| !written[..i].contains(id))
            && audited.iter().all(|id| written.contains(id))
    }

    /// The audit rows (each linked to its card's previous entry; `heads` holds each audited card's
    /// last hash, as read) and the outbox rows.
    pub(super) fn tail_statements(
        &self,
        sealer: &Sealer,
        heads: HashMap<String, Vec<u8>>,
    ) -> Result<Vec<Statement>, StoreError> {
        let mut out = audit_statements(sealer, &self.audit, heads)?;
        out.extend(self.outbox.iter().map(outbox_statement));
        Ok(out)
    }
}

/// Several statements as one: each a data-modifying CTE (`WITH w0 AS (...), w1 AS (...)`), run in
/// one round trip and atomically, a statement being its own transaction. A write that must change one
/// row has its count passed to `socialcard_one_row` (PostgreSQL migration 0012), whose error
/// ([`VERSION_CONFLICT`]) undoes the others. PostgreSQL only (SQLite has no writes in CTEs).
#[derive(Debug)]
pub(super) struct Combined {
    pub sql: String,
    pub params: Vec<Param>,
    /// The table each statement writes and what its refusals mean, in order.
    tables: Vec<(&'static str, Expect)>,
}

/// The SQLSTATE `socialcard_one_row` raises when a version-checked write changed no row.
pub(super) const VERSION_CONFLICT: &str = "SC409";

/// The table a single-table INSERT or UPDATE writes.
fn table_of(sql: &'static str) -> &'static str {
    let rest = sql.strip_prefix("INSERT INTO ").or_else(|| sql.strip_prefix("UPDATE ")).unwrap_or("");
    rest.split([' ', '(']).next().unwrap_or("")
}

/// `sql` with each placeholder `$n` written as `$(n + offset)`, appended to `out`. The statements
/// here hold no string literals or dollar quoting, only placeholders.
fn renumber(sql: &str, offset: usize, out: &mut String) {
    let mut rest = sql;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..=at]);
        rest = &rest[at + 1..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        match rest[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + offset).to_string()),
            Err(_) => out.push_str(&rest[..digits]),
        }
        rest = &rest[digits..];
    }
    out.push_str(rest);
}

impl Combined {
    pub(super) fn new(statements: Vec<Statement>) -> Self {
        let mut sql = String::from("WITH ");
        let mut params = Vec::new();
        let mut checks = Vec::new();
        let mut tables = Vec::new();
        for (i, s) in statements.into_iter().enumerate() {
            if i > 0 {
                sql.push_str(", ");
            }
            sql.push_str(&format!("w{i} AS ("));
            renumber(s.sql, params.len(), &mut sql);
            sql.push_str(" RETURNING 1)");
            // The final SELECT reads every write, in order: PostgreSQL runs a data-modifying CTE
            // when it is first read and evaluates these subqueries in select-list order (its
            // executor's behaviour, not a documented guarantee: keep every write read and no FROM,
            // and the twins test will tell). The key first, so a concurrent twin of the request
            // fails there, before any other write.
            checks.push(if s.expect.one_row {
                format!("socialcard_one_row((SELECT count(*) FROM w{i}))")
            } else {
                format!("(SELECT count(*) FROM w{i})")
            });
            tables.push((table_of(s.sql), s.expect));
            params.extend(s.params);
        }
        if tables.is_empty() {
            return Self { sql: "SELECT 1".into(), params, tables };
        }
        sql.push_str(" SELECT ");
        sql.push_str(&checks.join(", "));
        Self { sql, params, tables }
    }

    /// What a UNIQUE violation in `table` means (the first statement writing it decides).
    pub(super) fn unique_violation(&self, table: Option<&str>) -> Option<StoreError> {
        self.tables.iter().find(|(t, _)| Some(*t) == table).map(|(_, expect)| (expect.unique)())
    }
}

impl BatchCommit {
    /// Every row of an employer-batch chunk, as the one-card commits write them: keys first (a
    /// concurrent import of the same rows fails there, before any other write), the holders' versions
    /// bumped (a concurrent application for one of them makes the chunk plan again), new cards, their
    /// audit chains from genesis and their events. Handed to `take` in order, in parts of up to `part`
    /// statements, so a writer can run the first parts while the rest are sealed and encoded; stops
    /// early when `take` answers false (the writer gave up). True only when every statement was taken.
    pub(super) fn statements_in_parts(
        &self,
        sealer: &Sealer,
        now: i64,
        part: usize,
        mut take: impl FnMut(Vec<Statement>) -> bool,
    ) -> Result<bool, StoreError> {
        // Every card of a batch is new: its chain starts at genesis.
        let mut heads = HashMap::new();
        let statements = self
            .idempotency
            .iter()
            .map(|i| idempotency_statement(sealer, i, now))
            .chain(self.touch_persons.iter().map(|(id, version)| Ok(touch_statement(sealer, id, *version))))
            .chain(self.cards.iter().map(|c| card_statement(sealer, c, true, now)))
            .chain(self.audit.iter().map(|a| audit_statement(sealer, a, &mut heads)))
            .chain(self.outbox.iter().map(|o| Ok(outbox_statement(o))));
        let part = part.max(1);
        let mut out = Vec::with_capacity(part.min(1024));
        for s in statements {
            out.push(s?);
            if out.len() == part && !take(std::mem::replace(&mut out, Vec::with_capacity(part.min(1024)))) {
                return Ok(false);
            }
        }
        Ok(out.is_empty() || take(out))
    }
}

fn idempotency_statement(sealer: &Sealer, i: &IdempotencyRecord, now: i64) -> Result<Statement, StoreError> {
    Ok(Statement::new(
        "INSERT INTO idempotency (idempotency_key, operation, request_hash, response, created_at) VALUES ($1, $2, $3, $4, $5)",
        vec![
            Param::Text(i.key.clone()),
            Param::Text(i.operation.clone()),
            Param::Blob(i.request_hash.clone()),
            // A stored answer may carry a person's name and phone.
            Param::Blob(sealer.seal_bytes(&i.response, &i.key).map_err(seal_error)?),
            Param::Int(now),
        ],
        || StoreError::IdempotencyConflict,
    ))
}

/// The holder's version bumped, as `SubmitApplication` does (R2): a concurrent change fails it.
fn touch_statement(sealer: &Sealer, citizen_id: &str, expected_version: i64) -> Statement {
    Statement::new(
        "UPDATE persons SET version = version + 1 WHERE citizen_id = $1 AND version = $2",
        vec![Param::Text(sealer.blind_index(citizen_id)), Param::Int(expected_version)],
        || StoreError::Duplicate("row"),
    )
    .one_row()
}

/// The audit rows, each linked to its card's previous entry (`heads`: each card's last hash as read;
/// a card not in it starts at genesis).
fn audit_statements(
    sealer: &Sealer,
    audit: &[AuditRecord],
    mut heads: HashMap<String, Vec<u8>>,
) -> Result<Vec<Statement>, StoreError> {
    audit.iter().map(|a| audit_statement(sealer, a, &mut heads)).collect()
}

/// One audit row, linked to its card's head in `heads` (genesis when absent), which it then becomes.
fn audit_statement(
    sealer: &Sealer,
    a: &AuditRecord,
    heads: &mut HashMap<String, Vec<u8>>,
) -> Result<Statement, StoreError> {
    let prev = heads.get(&a.card_id).cloned().unwrap_or_else(|| crate::audit_chain::GENESIS.to_vec());
    let hash = crate::audit_chain::link(&prev, a);
    let statement = Statement::new(
        "INSERT INTO audit_log (card_id, at, action, channel, actor, documents, from_state, to_state, idempotency_key,
             prev_hash, hash)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        vec![
            Param::Text(a.card_id.clone()),
            Param::Int(micros(a.at)),
            Param::Text(a.action.clone()),
            Param::Text(a.channel.clone()),
            // Who acted and with which papers (a caller's phone): sealed, bound to the card.
            Param::Text(sealer.seal(&a.actor, &a.card_id).map_err(seal_error)?),
            Param::Text(sealer.seal(&a.documents, &a.card_id).map_err(seal_error)?),
            Param::Text(a.from_state.clone()),
            Param::Text(a.to_state.clone()),
            Param::Text(a.idempotency_key.clone()),
            Param::Blob(prev),
            Param::Blob(hash.clone()),
        ],
        || StoreError::Duplicate("row"),
    );
    heads.insert(a.card_id.clone(), hash);
    Ok(statement)
}

fn outbox_statement(o: &OutboxRecord) -> Statement {
    Statement::new(
        "INSERT INTO outbox (event_id, topic, event_key, event_type, payload, occurred_at, bucket, source, traceparent)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        vec![
            Param::Text(o.event_id.clone()),
            Param::Text(o.topic.clone()),
            Param::Text(o.key.clone()),
            Param::Text(o.event_type.clone()),
            Param::Blob(o.payload.clone()),
            Param::Int(micros(o.occurred_at)),
            Param::Int(i64::from(socialcard_events::bucket_of(&o.key))),
            Param::Text(o.source.clone()),
            Param::OptText(o.traceparent.clone()),
        ],
        || StoreError::Duplicate("row"),
    )
}

fn card_statement(sealer: &Sealer, rec: &CardRecord, insert: bool, now: i64) -> Result<Statement, StoreError> {
    let c = &rec.card;
    let data = serde_json::to_string(c).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    // The card's data holds its holder's ID, phone and address: sealed, bound to the card.
    let data = sealer.seal(&data, &c.id).map_err(seal_error)?;
    let number = c.card_number.as_ref().map(|n| n.as_str().to_string());
    let states =
        [c.physical.as_str(), super::sql::social_label(c), c.financial.as_str()].map(|s| Param::Text(s.into()));
    let [physical, social, financial] = states;
    let statement = if insert {
        Statement::new(
            "INSERT INTO cards (card_id, citizen_id, card_number, bank_code, physical_state, social_state, financial_state, version, data, pin_digest, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            vec![
                Param::Text(c.id.clone()),
                Param::Text(sealer.blind_index(c.holder.expose())),
                Param::OptText(number),
                Param::Text(c.bank_code.clone()),
                physical,
                social,
                financial,
                Param::Int(c.version),
                Param::Text(data),
                Param::Blob(rec.pin_digest.clone()),
                Param::Int(now),
            ],
            || StoreError::Duplicate("card"),
        )
    } else {
        Statement::new(
            "UPDATE cards SET card_number = $1, physical_state = $2, social_state = $3, financial_state = $4, version = $5,
             data = $6, pin_digest = $7, updated_at = $8 WHERE card_id = $9 AND version = $10",
            vec![
                Param::OptText(number),
                physical,
                social,
                financial,
                Param::Int(c.version),
                Param::Text(data),
                Param::Blob(rec.pin_digest.clone()),
                Param::Int(now),
                Param::Text(c.id.clone()),
                Param::Int(c.version - 1),
            ],
            || StoreError::Duplicate("card"),
        )
    };
    Ok(statement.one_row())
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::OffsetDateTime;

    /// A chunk of `n` holders' keys, audit rows (two cards, chains of `n`) and events: no cards, whose
    /// records need a domain card.
    fn chunk(n: usize) -> BatchCommit {
        let at = OffsetDateTime::UNIX_EPOCH;
        BatchCommit {
            idempotency: (0..n)
                .map(|i| IdempotencyRecord {
                    key: format!("key-{i}"),
                    operation: "import".into(),
                    request_hash: vec![1],
                    response: vec![2],
                })
                .collect(),
            touch_persons: (0..n).map(|i| (format!("1101011990010{i:05}"), 1)).collect(),
            cards: Vec::new(),
            audit: (0..2 * n)
                .map(|i| AuditRecord {
                    card_id: format!("card-{}", i % 2),
                    at,
                    action: format!("step-{i}"),
                    channel: "employer_batch".into(),
                    actor: "{}".into(),
                    documents: "{}".into(),
                    from_state: String::new(),
                    to_state: String::new(),
                    idempotency_key: format!("key-{i}"),
                })
                .collect(),
            outbox: (0..n)
                .map(|i| OutboxRecord {
                    event_id: format!("event-{i}"),
                    topic: "t".into(),
                    key: "card-0".into(),
                    event_type: "e".into(),
                    payload: vec![3],
                    occurred_at: at,
                    source: "registry".into(),
                    traceparent: None,
                })
                .collect(),
        }
    }

    /// What a statement writes, comparable across builds (sealed values differ by nonce: left out).
    fn shape(s: &Statement) -> (String, Vec<String>) {
        let sealed_blob = |i: usize| s.sql.starts_with("INSERT INTO idempotency") && i == 3;
        let params = s
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| match p {
                Param::Blob(_) if sealed_blob(i) => "sealed".into(),
                Param::Int(v) => v.to_string(),
                Param::Text(t) if t.starts_with("v2:") => "sealed".into(),
                Param::Text(t) => t.clone(),
                Param::OptText(t) => format!("{t:?}"),
                Param::Blob(b) => hex::encode(b),
            })
            .collect();
        (s.sql.to_string(), params)
    }

    fn parts(commit: &BatchCommit, part: usize) -> Vec<Vec<Statement>> {
        let sealer = Sealer::new(&[7; 32]).unwrap();
        let mut out = Vec::new();
        let complete = commit
            .statements_in_parts(&sealer, 5, part, |p| {
                out.push(p);
                true
            })
            .unwrap();
        assert!(complete, "every part taken");
        out
    }

    /// The writer runs the parts in the order given: together they must be every statement of the
    /// chunk, in the one-part order (keys, holders, audit chains linked in turn, events), none empty
    /// and none over the size.
    #[test]
    fn parts_hold_every_statement_in_order() {
        let commit = chunk(5);
        let whole = parts(&commit, usize::MAX);
        assert_eq!(whole.len(), 1);
        assert_eq!(whole[0].len(), 5 + 5 + 10 + 5);
        for size in [1, 3, 7, 25, 26] {
            let split = parts(&commit, size);
            assert_eq!(split.len(), 25usize.div_ceil(size), "parts of {size}");
            assert!(split.iter().all(|p| !p.is_empty() && p.len() <= size), "parts of {size}");
            let flat: Vec<_> = split.iter().flatten().map(shape).collect();
            let expected: Vec<_> = whole[0].iter().map(shape).collect();
            assert_eq!(flat, expected, "parts of {size}");
        }
        // The chains: card-0's second row links to its first, not to card-1's.
        let audit: Vec<&Statement> = whole[0][10..20].iter().collect();
        let hash = |s: &Statement| match (&s.params[9], &s.params[10]) {
            (Param::Blob(prev), Param::Blob(hash)) => (prev.clone(), hash.clone()),
            _ => panic!("audit row without its hashes"),
        };
        assert_eq!(hash(audit[0]).0, crate::audit_chain::GENESIS.to_vec());
        assert_eq!(hash(audit[2]).0, hash(audit[0]).1);
        assert_eq!(hash(audit[3]).0, hash(audit[1]).1);
    }

    /// Each statement's placeholders move past the ones before it (two digits too), every write is
    /// read by the final SELECT in order, and a version-checked one through `socialcard_one_row`; a
    /// UNIQUE violation means what the statement writing that table says.
    #[test]
    fn combined_statements_number_their_values_in_turn() {
        let key = Statement::new(
            "INSERT INTO idempotency (idempotency_key, operation) VALUES ($1, $2)",
            vec![Param::Text("k".into()), Param::Text("op".into())],
            || StoreError::IdempotencyConflict,
        );
        let card = Statement::new(
            "UPDATE cards SET version = $2 WHERE card_id = $1 AND version = $3",
            vec![Param::Text("c".into()), Param::Int(2), Param::Int(1)],
            || StoreError::Duplicate("card"),
        )
        .one_row();
        let many = Statement::new(
            "INSERT INTO outbox (a, b, c, d, e, f, g, h, i, j) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            (0..10).map(Param::Int).collect(),
            || StoreError::Duplicate("row"),
        );
        let combined = Combined::new(vec![key, card, many]);
        assert_eq!(
            combined.sql,
            "WITH w0 AS (INSERT INTO idempotency (idempotency_key, operation) VALUES ($1, $2) RETURNING 1), \
             w1 AS (UPDATE cards SET version = $4 WHERE card_id = $3 AND version = $5 RETURNING 1), \
             w2 AS (INSERT INTO outbox (a, b, c, d, e, f, g, h, i, j) \
             VALUES ($6, $7, $8, $9, $10, $11, $12, $13, $14, $15) RETURNING 1) \
             SELECT (SELECT count(*) FROM w0), socialcard_one_row((SELECT count(*) FROM w1)), \
             (SELECT count(*) FROM w2)"
        );
        assert_eq!(combined.params.len(), 15);
        assert!(matches!(combined.params[2], Param::Text(ref t) if t == "c"));
        assert!(matches!(combined.params[14], Param::Int(9)));
        assert!(matches!(combined.unique_violation(Some("idempotency")), Some(StoreError::IdempotencyConflict)));
        assert!(matches!(combined.unique_violation(Some("cards")), Some(StoreError::Duplicate("card"))));
        assert!(combined.unique_violation(Some("persons")).is_none());
        assert!(combined.unique_violation(None).is_none());
        assert_eq!(Combined::new(Vec::new()).sql, "SELECT 1");
    }

    /// A writer that stopped (a statement refused) hears of no more parts.
    #[test]
    fn building_stops_when_the_writer_does() {
        let sealer = Sealer::new(&[7; 32]).unwrap();
        let mut taken = 0;
        let complete = chunk(5)
            .statements_in_parts(&sealer, 5, 4, |_| {
                taken += 1;
                false
            })
            .unwrap();
        assert_eq!(taken, 1);
        assert!(!complete, "a build the writer stopped is not complete");
        // Refused at the very last part: still not complete.
        let mut taken = 0;
        let complete = chunk(5)
            .statements_in_parts(&sealer, 5, 4, |_| {
                taken += 1;
                taken < 7
            })
            .unwrap();
        assert_eq!((taken, complete), (7, false));
    }
}
