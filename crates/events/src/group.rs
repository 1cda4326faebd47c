//! Group commit for a SQLite writer.
//!
//! SQLite admits one writer at a time, so a service's writes already queue on one connection. Each
//! still paid for a transaction of its own: its `BEGIN` and `COMMIT`, the WAL frames of every page it
//! touched (the outbox's and audit log's last pages, the same index pages, written again by the next
//! transaction) and a share of the checkpoints those frames cause. A [`GroupWriter`] takes the writes
//! that are waiting when the connection frees up and commits them together: one transaction, each
//! write inside a savepoint of its own, so a write that fails (a version conflict, a taken key) rolls
//! back alone and the others commit. Nobody waits for a group to fill: a write that finds the writer
//! idle runs at once, alone; under load the group is whatever queued meanwhile.
//!
//! A write's caller learns its outcome only after the group's `COMMIT`, so an answer never reports a
//! write that could still be lost. If the `COMMIT` fails, every write of the group gets the error (none
//! of them is stored). A write that was queued runs even if its caller stopped waiting, like a commit
//! whose answer was lost on the way; the operations put through here are idempotent for that reason.
//! A write that panics is rolled back like a failed one (its caller gets a [`GroupError`]) and the
//! writer goes on with the rest of its group: one bad request must not stop a service's writes.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

use sqlx::SqlitePool;
use tokio::sync::{mpsc, oneshot};

use crate::direct::{Direct, DirectError};

/// Hands a write's outcome to its caller once the group's fate is known.
type Deliver = Box<dyn FnOnce(Result<(), GroupError>) + Send>;
/// A queued write: runs on the group's connection, says whether it succeeded and how to answer.
type Job = Box<dyn FnOnce(&mut Direct<'_>) -> (bool, Deliver) + Send>;

/// The group a write belonged to could not be committed (or the writer is gone); nothing of the write
/// was stored.
#[derive(Clone, Debug, thiserror::Error)]
#[error("write not committed: {0}")]
pub struct GroupError(pub String);

impl From<sqlx::Error> for GroupError {
    fn from(e: sqlx::Error) -> Self {
        Self(e.to_string())
    }
}

impl From<DirectError> for GroupError {
    fn from(e: DirectError) -> Self {
        Self(e.to_string())
    }
}

/// The most writes one group takes, for the services' writers: enough to absorb a burst of concurrent
/// requests, few enough that a group holds SQLite's write lock for milliseconds, not seconds.
pub const MAX_GROUP: usize = 64;

/// Commits the writes queued on one SQLite database in groups (see the module docs).
#[derive(Clone, Debug)]
pub struct GroupWriter {
    jobs: mpsc::Sender<Job>,
    /// Writes handed to the queue and not yet taken by the writer. Counted after the send completes
    /// (the channel's own capacity drops when a sender reserves its slot, before the write is in the
    /// queue), so it may dip below zero for a moment when the writer takes a write first.
    queued: Arc<AtomicIsize>,
}

impl GroupWriter {
    /// Starts the writer task on the current runtime. It takes a connection from `pool` for each group
    /// and gives it back after the group, so other users of `pool` take their turn between groups.
    /// A group holds at most `max_group` writes (at least one).
    pub fn spawn(pool: SqlitePool, max_group: usize) -> Self {
        let (jobs, queue) = mpsc::channel(4 * max_group.max(1));
        let queued = Arc::new(AtomicIsize::new(0));
        tokio::spawn(write_loop(pool, queue, max_group.max(1), queued.clone()));
        Self { jobs, queued }
    }

    /// Writes in the queue and not yet taken into a group (a load gauge).
    pub fn queued(&self) -> usize {
        usize::try_from(self.queued.load(Ordering::SeqCst)).unwrap_or(0)
    }

    /// Runs `write` on the writer's connection inside the next group and returns its result once the
    /// group committed. `Ok(Err(e))`: the write failed and was rolled back alone. `Err`: the write
    /// succeeded but its group was not committed, so nothing of it was stored.
    ///
    /// `write` runs synchronously on the writer's connection ([`Direct`]: no hand-off per statement),
    /// on a thread allowed to block. It must not begin or end transactions of its own (it runs inside a
    /// savepoint) and must not wait for anything that itself waits for this writer.
    pub async fn run<T, E, F>(&self, write: F) -> Result<Result<T, E>, GroupError>
    where
        T: Send + 'static,
        E: Send + 'static,
        F: FnOnce(&mut Direct<'_>) -> Result<T, E> + Send + 'static,
    {
        let (answer, outcome) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let result = write(conn);
            let ok = result.is_ok();
            let deliver: Deliver = Box::new(move |group| {
                let _ = answer.send(match (ok, group) {
                    (true, Err(e)) => Err(e),
                    _ => Ok(result),
                });
            });
            (ok, deliver)
        });
        self.jobs.send(job).await.map_err(|_| GroupError("the writer has stopped".into()))?;
        self.queued.fetch_add(1, Ordering::SeqCst);
        outcome.await.map_err(|_| GroupError("the writer stopped before the write committed".into()))?
    }
}

async fn write_loop(pool: SqlitePool, mut queue: mpsc::Receiver<Job>, max_group: usize, queued: Arc<AtomicIsize>) {
    let mut group = Vec::with_capacity(max_group);
    while queue.recv_many(&mut group, max_group).await > 0 {
        queued.fetch_sub(isize::try_from(group.len()).unwrap_or(isize::MAX), Ordering::SeqCst);
        let mut delivers = Vec::with_capacity(group.len());
        let outcome = commit_group(&pool, &mut group, &mut delivers).await;
        // Writes a failed group never reached are dropped (their callers hear so); the buffer is reused.
        group.clear();
        if let Err(e) = &outcome {
            tracing::warn!(error = %e, writes = delivers.len(), "a group of writes was not committed");
        }
        for deliver in delivers {
            deliver(outcome.clone());
        }
    }
}

/// Runs the group's writes in one transaction; a write that ran is in `delivers` whatever happens next.
/// Writes not reached (the group failed first) are dropped, which tells their callers so.
///
/// The connection's sqlx worker lets go of it for the whole group (one hand-off), and the writes run on
/// it directly ([`Direct`]). On a multi-threaded runtime they run in `block_in_place`, so the group's
/// statements and its `COMMIT` (a sync to disk where the database asks for one) do not hold up the
/// runtime's other tasks. On a current-thread runtime (tests) they run in place, blocking the runtime's
/// one thread: a group waiting there for SQLite's write lock held by another connection of the same
/// runtime waits out the busy timeout and fails, so such tests use a multi-threaded runtime.
async fn commit_group(pool: &SqlitePool, group: &mut Vec<Job>, delivers: &mut Vec<Deliver>) -> Result<(), GroupError> {
    let mut conn = pool.acquire().await?;
    let mut handle = conn.lock_handle().await?;
    let mut work = || {
        let mut direct = Direct::new(&mut handle);
        // IMMEDIATE: the write lock is taken now (waiting out other writers in SQLite's busy handler), not
        // at the first write, where a reader turned writer could be refused outright.
        if let Err(e) = direct.execute("BEGIN IMMEDIATE", &[]) {
            return (Err(e.into()), false);
        }
        let outcome = run_group(&mut direct, group, delivers);
        // The group failed part-way (or its COMMIT did): leave the connection as sqlx expects it, out of
        // any transaction. If even ROLLBACK fails, the connection must not serve anyone again.
        let stuck = direct.in_transaction() && direct.execute("ROLLBACK", &[]).is_err();
        (outcome, stuck)
    };
    let (outcome, stuck) = match tokio::runtime::Handle::current().runtime_flavor() {
        tokio::runtime::RuntimeFlavor::MultiThread => tokio::task::block_in_place(work),
        _ => work(),
    };
    drop(handle);
    if stuck {
        tracing::error!("a failed group could not be rolled back; its connection is closed");
        conn.close_on_drop();
    }
    outcome
}

/// Runs the group's writes inside the transaction `commit_group` began, and commits.
fn run_group(direct: &mut Direct<'_>, group: &mut Vec<Job>, delivers: &mut Vec<Deliver>) -> Result<(), GroupError> {
    if group.len() == 1 {
        // Alone: the transaction is the write's own, no savepoint needed.
        for job in group.drain(..) {
            if !run_job(direct, job, delivers) {
                direct.execute("ROLLBACK", &[])?;
                return Ok(());
            }
        }
    } else {
        for job in group.drain(..) {
            direct.execute("SAVEPOINT write", &[])?;
            if !run_job(direct, job, delivers) {
                direct.execute("ROLLBACK TO write", &[])?;
            }
            direct.execute("RELEASE write", &[])?;
        }
    }
    direct.execute("COMMIT", &[])?;
    Ok(())
}

/// Runs a write; false if it failed or panicked. A write that panicked has no answer to deliver: its
/// caller learns from the dropped answer channel that it was not committed, and it is rolled back like
/// a failed one.
fn run_job(direct: &mut Direct<'_>, job: Job, delivers: &mut Vec<Deliver>) -> bool {
    match std::panic::catch_unwind(AssertUnwindSafe(|| job(direct))) {
        Ok((ok, deliver)) => {
            delivers.push(deliver);
            ok
        }
        Err(_) => {
            tracing::error!("a write panicked; rolled back, the writer goes on");
            false
        }
    }
}
