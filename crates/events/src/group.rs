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
use std::sync::atomic::{AtomicBool, AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use sqlx::SqlitePool;
use tokio::sync::{mpsc, oneshot, watch};

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
    /// Counts the groups committed: a reader of what the writes leave (the outbox relay) waits on it
    /// rather than polling.
    commits: watch::Receiver<u64>,
}

impl GroupWriter {
    /// Starts the writer task on the current runtime. It takes a connection from `pool` for a run of
    /// back-to-back groups (at most 20 ms of them) and gives it back after, so other users of `pool`
    /// take their turn between runs.
    /// A group holds at most `max_group` writes (at least one).
    ///
    /// It also starts the database's checkpointer, which copies the WAL back off the writer's path and
    /// stops with the writer.
    pub fn spawn(pool: SqlitePool, max_group: usize) -> Self {
        Self::lingering(pool, max_group, Duration::ZERO)
    }

    /// [`Self::spawn`], and the writer, its queue empty after a group, waits up to `linger` for another
    /// write before it lets go of the connection (and finalizes its prepared statements). For a writer
    /// whose callers write again as soon as they hear back (postal's streams: the next batch follows its
    /// predecessor's answer by microseconds). The pool's other users then wait up to the hold (20 ms)
    /// plus a group for their turn, rather than about a group. Waits only on a multi-threaded runtime.
    pub fn lingering(pool: SqlitePool, max_group: usize, linger: Duration) -> Self {
        let (jobs, queue) = mpsc::channel(4 * max_group.max(1));
        let queued = Arc::new(AtomicIsize::new(0));
        let committed = Arc::new(AtomicBool::new(false));
        let (running, stopped) = oneshot::channel::<()>();
        let (count, commits) = watch::channel(0);
        tokio::spawn(checkpoint_loop((*pool.connect_options()).clone(), committed.clone(), stopped));
        let counter = queued.clone();
        tokio::spawn(async move {
            let signals = Signals { queued: counter, committed, commits: count };
            write_loop(pool, queue, max_group.max(1), linger, &signals).await;
            drop(running);
        });
        Self { jobs, queued, commits }
    }

    /// Changes after every group this writer commits (its value counts them). A task that reads what the
    /// writes leave behind (the outbox relay) marks the current value seen before it reads and then
    /// waits for a change, so a commit between its read and its wait is not missed. Closed once the
    /// writer has stopped.
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.commits.clone()
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

/// What the writer tells others: writes waiting (the queue gauge), whether the checkpointer has work,
/// and each group committed.
struct Signals {
    queued: Arc<AtomicIsize>,
    committed: Arc<AtomicBool>,
    commits: watch::Sender<u64>,
}

async fn write_loop(
    pool: SqlitePool,
    mut queue: mpsc::Receiver<Job>,
    max_group: usize,
    linger: Duration,
    signals: &Signals,
) {
    let mut group = Vec::with_capacity(max_group);
    while queue.recv_many(&mut group, max_group).await > 0 {
        let outcome = write_groups(&pool, &mut queue, &mut group, max_group, linger, signals).await;
        signals.committed.store(true, Ordering::Relaxed);
        if let Err(e) = outcome {
            // No connection: the writes taken are dropped, which tells their callers nothing was stored.
            signals.queued.fetch_sub(isize::try_from(group.len()).unwrap_or(isize::MAX), Ordering::SeqCst);
            tracing::warn!(error = %e, writes = group.len(), "a group of writes was not committed");
            group.clear();
        }
    }
}

/// How long the writer keeps its connection over back-to-back groups. While it does, the groups'
/// statements stay prepared and the connection is not handed back and forth with its sqlx worker; the
/// pool's other users (a service's occasional sqlx transaction on the same writer) wait at most this
/// long, plus a group, for their turn.
const HOLD: Duration = Duration::from_millis(20);

/// Commits `group`, then the groups that queued meanwhile, on one connection taken from `pool`, until
/// the queue is empty (for `linger`: see [`GroupWriter::lingering`]) or [`HOLD`] has passed. Each group
/// is one transaction (see [`commit_group`]).
///
/// The connection's sqlx worker lets go of it once for all of them, and the writes run on it directly
/// ([`Direct`]). On a multi-threaded runtime they run in `block_in_place`, so the statements, each
/// `COMMIT` (a sync to disk where the database asks for one) and the linger do not hold up the
/// runtime's other tasks. On a current-thread runtime (tests) they run in place, without a linger,
/// blocking the runtime's one thread (and so commit one group at a time): a group waiting there for
/// SQLite's write lock held by another connection of the same runtime waits out the busy timeout and
/// fails, so such tests use a multi-threaded runtime.
async fn write_groups(
    pool: &SqlitePool,
    queue: &mut mpsc::Receiver<Job>,
    group: &mut Vec<Job>,
    max_group: usize,
    linger: Duration,
    signals: &Signals,
) -> Result<(), GroupError> {
    let mut conn = pool.acquire().await?;
    let (outcome, broken) = write_held(&mut conn, queue, group, max_group, linger, signals).await;
    if broken {
        conn.close_on_drop();
    }
    outcome
}

/// [`write_groups`] on `conn`; also says whether the connection must be closed rather than returned to
/// the pool (its worker is gone, or it is stuck in a transaction it could not roll back).
async fn write_held(
    conn: &mut sqlx::pool::PoolConnection<sqlx::Sqlite>,
    queue: &mut mpsc::Receiver<Job>,
    group: &mut Vec<Job>,
    max_group: usize,
    linger: Duration,
    signals: &Signals,
) -> (Result<(), GroupError>, bool) {
    let mut handle = match conn.lock_handle().await {
        Ok(h) => h,
        Err(e) => return (Err(e.into()), true),
    };
    let multi_thread =
        matches!(tokio::runtime::Handle::current().runtime_flavor(), tokio::runtime::RuntimeFlavor::MultiThread);
    // Only off the runtime's threads (`block_in_place`) may the writer wait for the next write: on a
    // current-thread runtime the writer's wait would keep that write from being sent.
    let linger = if multi_thread { linger } else { Duration::ZERO };
    let mut work = || {
        let mut direct = Direct::new(&mut handle);
        // The checkpointer copies the WAL back off this path; the connection's own checkpoint in COMMIT
        // is only a backstop for when it falls behind. (Set on every run: a pooled connection may be new.)
        if let Err(e) = direct.execute(BACKSTOP_AUTOCHECKPOINT, &[]) {
            tracing::warn!(error = %e, "could not set the writer's checkpoint backstop");
        }
        if let Err(e) = direct.execute(SUBJOURNALS_IN_MEMORY, &[]) {
            tracing::warn!(error = %e, "could not keep the writer's savepoint journals in memory");
        }
        let since = Instant::now();
        loop {
            signals.queued.fetch_sub(isize::try_from(group.len()).unwrap_or(isize::MAX), Ordering::SeqCst);
            let mut delivers = Vec::with_capacity(group.len());
            let (outcome, stuck) = commit_group(&mut direct, group, &mut delivers);
            // Writes a failed group never reached are dropped (their callers hear so); the buffer is reused.
            group.clear();
            match &outcome {
                // Before the answers: a caller that hears its write committed and then waits for the
                // next commit must not be woken by its own.
                Ok(()) => signals.commits.send_modify(|n| *n = n.wrapping_add(1)),
                Err(e) => tracing::warn!(error = %e, writes = delivers.len(), "a group of writes was not committed"),
            }
            for deliver in delivers {
                deliver(outcome.clone());
            }
            if stuck {
                return true;
            }
            if since.elapsed() >= HOLD {
                return false;
            }
            // The writes queued meanwhile; with a linger, those that come within it.
            let until = Instant::now() + linger.min(HOLD.saturating_sub(since.elapsed()));
            while group.len() < max_group {
                match queue.try_recv() {
                    Ok(job) => group.push(job),
                    Err(mpsc::error::TryRecvError::Empty) if group.is_empty() && Instant::now() < until => {
                        std::thread::sleep(LINGER_POLL);
                    }
                    Err(_) => break,
                }
            }
            if group.is_empty() {
                return false;
            }
        }
    };
    let stuck = if multi_thread { tokio::task::block_in_place(work) } else { work() };
    drop(handle);
    if stuck {
        tracing::error!("a failed group could not be rolled back; its connection is closed");
    }
    (Ok(()), stuck)
}

/// How often a lingering writer ([`GroupWriter::lingering`]) looks at its empty queue. Polled with
/// `try_recv` and a sleep rather than awaited: the writer is in `block_in_place`, and a timer there
/// would need the runtime's time driver, which may be shutting down.
const LINGER_POLL: Duration = Duration::from_micros(50);

/// A savepoint (each write of a group) and a multi-row statement keep the pages they change first in a
/// journal of their own, to roll back to. SQLite keeps the first 64 KiB in memory and spills the rest
/// to a temporary file; a postal batch, writing a few MiB, spent more time in those files' `pwrite`s
/// than in the WAL's. Nothing in them needs to outlive the transaction. The setting is the
/// connection's: the pool's other users of the writer's connection also keep TEMP tables and sorts in
/// memory (they run small lookups and upserts, no large sorts).
const SUBJOURNALS_IN_MEMORY: &str = "PRAGMA temp_store = MEMORY";

/// The WAL size (pages) at which the writer's connection checkpoints in a `COMMIT` itself, a backstop:
/// the checkpointer normally copies the WAL back well before (SQLite's default is 1,000 pages).
/// (Tried beside it and dropped: `journal_size_limit`, to cut the WAL file back after a burst; the
/// truncations cost activations 6 % of their throughput and 5 ms of p99.)
const BACKSTOP_AUTOCHECKPOINT: &str = "PRAGMA wal_autocheckpoint = 10000";

/// How often the checkpointer runs, when anything was written since it last did.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);

/// Copies the database's WAL back into the database file, on a connection of its own, off the writer's
/// path: left to SQLite, the `COMMIT` that crosses the WAL's size limit copies it back itself (and syncs
/// the database file), and every write of that group waits for it. A PASSIVE checkpoint never blocks
/// the writer or the readers; it copies what no reader still needs, and SQLite starts the WAL over from
/// its beginning once all of it was copied back. Ends (closing its connection) when `stopped` resolves,
/// or at once for a database not in WAL mode (an in-memory one: nothing to copy back).
async fn checkpoint_loop(
    options: sqlx::sqlite::SqliteConnectOptions,
    committed: Arc<AtomicBool>,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut conn: Option<sqlx::SqliteConnection> = None;
    let mut every = tokio::time::interval(CHECKPOINT_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            _ = every.tick() => {}
        }
        if !committed.swap(false, Ordering::Relaxed) {
            continue;
        }
        if conn.is_none() {
            let mut c = match sqlx::ConnectOptions::connect(&options).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "the checkpointer could not connect; the writer checkpoints itself");
                    continue;
                }
            };
            let mode: Result<String, _> = sqlx::query_scalar("PRAGMA journal_mode").fetch_one(&mut c).await;
            if !mode.is_ok_and(|m| m.eq_ignore_ascii_case("wal")) {
                let _ = sqlx::Connection::close(c).await;
                return;
            }
            conn = Some(c);
        }
        if let Some(c) = conn.as_mut()
            && let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&mut *c).await
        {
            // Busy or locked: another checkpoint runs (the writer's backstop); try at the next tick.
            let busy = e
                .as_database_error()
                .and_then(|d| d.code())
                .is_some_and(|c| c.parse::<i32>().is_ok_and(|c| matches!(c & 0xff, 5 | 6)));
            if !busy {
                tracing::warn!(error = %e, "checkpoint failed; trying again with a new connection");
                conn = None;
            }
        }
    }
    if let Some(c) = conn {
        let _ = sqlx::Connection::close(c).await;
    }
}

/// Runs the group's writes in one transaction; a write that ran is in `delivers` whatever happens next.
/// Writes not reached (the group failed first) are dropped, which tells their callers so. Also says
/// whether the connection is stuck in a transaction it could not roll back (it must then be closed).
fn commit_group(
    direct: &mut Direct<'_>,
    group: &mut Vec<Job>,
    delivers: &mut Vec<Deliver>,
) -> (Result<(), GroupError>, bool) {
    // IMMEDIATE: the write lock is taken now (waiting out other writers in SQLite's busy handler), not
    // at the first write, where a reader turned writer could be refused outright.
    if let Err(e) = direct.execute("BEGIN IMMEDIATE", &[]) {
        return (Err(e.into()), false);
    }
    let outcome = run_group(direct, group, delivers);
    // The group failed part-way (or its COMMIT did): leave the connection as sqlx expects it, out of
    // any transaction. If even ROLLBACK fails, the connection must not serve anyone again.
    let stuck = direct.in_transaction() && direct.execute("ROLLBACK", &[]).is_err();
    (outcome, stuck)
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
