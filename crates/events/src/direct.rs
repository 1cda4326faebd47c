//! Statements run straight on a SQLite connection sqlx has opened, without a hand-off per statement.
//!
//! sqlx runs each SQLite connection on a worker thread of its own: every statement is a message to
//! that thread and its result a message back, two thread wake-ups per statement. For the writes of a
//! busy service (an activation is about ten statements across two databases) those wake-ups, not
//! SQLite's own work, were most of the CPU time (see docs/benchmarks.md). sqlx's documented way out is
//! [`SqliteConnection::lock_handle`](sqlx::SqliteConnection::lock_handle): the worker thread lets go of
//! the connection until the lock is dropped, and direct SQLite calls are safe meanwhile. [`Direct`] is
//! the small statement API the group writer ([`crate::group`]) hands its writes while it holds that
//! lock: the connection stays sqlx's (opened, configured, migrated and pooled by sqlx); one hand-off
//! per run of back-to-back groups instead of one per statement.
//!
//! Statements are prepared once per `Direct` and finalized when it is dropped, before the lock is
//! released, so sqlx never meets a statement it did not prepare.
//!
//! [`Readers`] applies the same to the hot paths' point reads: a few read-only connections held out of
//! their workers for good, so a lookup by key runs on the calling thread with a statement prepared once.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::ffi::{CStr, c_int};
use std::mem::ManuallyDrop;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError, TryLockError};

use libsqlite3_sys as ffi;
use sqlx::ConnectOptions;
use sqlx::sqlite::{LockedSqliteHandle, SqliteConnectOptions, SqliteConnection};

/// A value bound to a statement parameter (`$1`, `$2`, ... in order of first use).
#[derive(Clone, Copy, Debug)]
pub enum Value<'a> {
    Null,
    Int(i64),
    Text(&'a str),
    Blob(&'a [u8]),
}

impl From<i64> for Value<'_> {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}

impl From<i32> for Value<'_> {
    fn from(v: i32) -> Self {
        Value::Int(i64::from(v))
    }
}

impl From<bool> for Value<'_> {
    fn from(v: bool) -> Self {
        Value::Int(i64::from(v))
    }
}

impl<'a> From<&'a str> for Value<'a> {
    fn from(v: &'a str) -> Self {
        Value::Text(v)
    }
}

impl<'a> From<&'a String> for Value<'a> {
    fn from(v: &'a String) -> Self {
        Value::Text(v)
    }
}

impl<'a> From<&'a [u8]> for Value<'a> {
    fn from(v: &'a [u8]) -> Self {
        Value::Blob(v)
    }
}

impl<'a> From<&'a Vec<u8>> for Value<'a> {
    fn from(v: &'a Vec<u8>) -> Self {
        Value::Blob(v)
    }
}

impl<'a, T: Into<Value<'a>>> From<Option<T>> for Value<'a> {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

/// The same values bound to a sqlx query, for a statement that runs both through sqlx and directly.
pub fn bind_values<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    values: &[Value<'_>],
) -> sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments> {
    for v in values {
        query = match *v {
            Value::Null => query.bind(None::<i64>),
            Value::Int(n) => query.bind(n),
            Value::Text(t) => query.bind(t.to_string()),
            Value::Blob(b) => query.bind(b.to_vec()),
        };
    }
    query
}

/// What SQLite said when a statement failed.
#[derive(Clone, Debug, thiserror::Error)]
#[error("sqlite error {code}: {message}")]
pub struct DirectError {
    /// SQLite's extended result code.
    pub code: i32,
    pub message: String,
}

impl DirectError {
    /// A UNIQUE or PRIMARY KEY constraint refused the row.
    pub fn is_unique_violation(&self) -> bool {
        self.code == ffi::SQLITE_CONSTRAINT_UNIQUE || self.code == ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    }

    fn new(message: impl Into<String>) -> Self {
        Self { code: ffi::SQLITE_MISUSE, message: message.into() }
    }
}

/// One row of a query; columns by position.
#[derive(Debug)]
pub struct Row<'s> {
    stmt: NonNull<ffi::sqlite3_stmt>,
    _statement: std::marker::PhantomData<&'s ()>,
}

impl Row<'_> {
    pub fn is_null(&self, i: usize) -> bool {
        // SAFETY: the statement is live and stepped onto a row for the lifetime of `Row`.
        unsafe { ffi::sqlite3_column_type(self.stmt.as_ptr(), column(i)) == ffi::SQLITE_NULL }
    }

    pub fn int(&self, i: usize) -> i64 {
        // SAFETY: as above; an out-of-range column reads as NULL (0).
        unsafe { ffi::sqlite3_column_int64(self.stmt.as_ptr(), column(i)) }
    }

    pub fn blob(&self, i: usize) -> Vec<u8> {
        // SAFETY: as above. sqlite3_column_blob's pointer is valid for sqlite3_column_bytes bytes until
        // the next step/reset of the statement, and it is copied out at once.
        unsafe {
            let p = ffi::sqlite3_column_blob(self.stmt.as_ptr(), column(i));
            let n = ffi::sqlite3_column_bytes(self.stmt.as_ptr(), column(i));
            if p.is_null() || n <= 0 {
                return Vec::new();
            }
            std::slice::from_raw_parts(p.cast::<u8>(), n as usize).to_vec()
        }
    }

    pub fn text(&self, i: usize) -> Result<String, DirectError> {
        self.str(i).map(str::to_owned)
    }

    /// A text column, borrowed from the statement (no copy): valid while the row is.
    pub fn str(&self, i: usize) -> Result<&str, DirectError> {
        // SAFETY: as for `blob`. The text stays valid until the statement is stepped, reset or
        // finalised, none of which can happen while `self` (borrowed for the returned lifetime) lives:
        // a `Row` is only lent to a callback for the duration of one row.
        let bytes = unsafe {
            let p = ffi::sqlite3_column_text(self.stmt.as_ptr(), column(i));
            let n = ffi::sqlite3_column_bytes(self.stmt.as_ptr(), column(i));
            if p.is_null() || n <= 0 {
                return Ok("");
            }
            std::slice::from_raw_parts(p, n as usize)
        };
        std::str::from_utf8(bytes).map_err(|e| DirectError::new(format!("column {i}: {e}")))
    }
}

/// Rows per statement in [`Direct::insert_rows`].
pub const ROWS_PER_INSERT: usize = 64;

/// The most statements a [`Direct`] keeps prepared.
const MAX_STATEMENTS: usize = 256;

fn column(i: usize) -> c_int {
    c_int::try_from(i).unwrap_or(c_int::MAX)
}

/// Statements on a connection whose sqlx worker has let go of it (see the module docs).
#[derive(Debug)]
pub struct Direct<'h> {
    db: NonNull<ffi::sqlite3>,
    statements: HashMap<String, NonNull<ffi::sqlite3_stmt>>,
    _handle: std::marker::PhantomData<&'h mut ()>,
}

impl<'h> Direct<'h> {
    /// Statements on `handle`'s connection, for as long as the handle is locked.
    pub(crate) fn new(handle: &'h mut sqlx::sqlite::LockedSqliteHandle<'_>) -> Self {
        Self { db: handle.as_raw_handle(), statements: HashMap::new(), _handle: std::marker::PhantomData }
    }

    /// Runs a statement that returns no rows (or whose rows are not wanted); returns the rows it
    /// changed.
    pub fn execute(&mut self, sql: &str, params: &[Value<'_>]) -> Result<u64, DirectError> {
        let bound = self.bound(sql, params)?;
        let stmt = bound.0;
        let outcome = loop {
            // SAFETY: `stmt` is a live statement of `self.db`.
            match unsafe { ffi::sqlite3_step(stmt.as_ptr()) } {
                ffi::SQLITE_ROW => continue,
                ffi::SQLITE_DONE => break Ok(()),
                _ => break Err(self.error()),
            }
        };
        drop(bound);
        outcome?;
        // SAFETY: `self.db` is open and ours while the handle is locked.
        Ok(u64::try_from(unsafe { ffi::sqlite3_changes(self.db.as_ptr()) }).unwrap_or(0))
    }

    /// Writes `rows` with multi-row statements: `insert` is an INSERT up to its `VALUES`, `row` one
    /// row's tuple with `?` for each of its `N` values (constants allowed). Rows go in statements of
    /// [`ROWS_PER_INSERT`], the rest in halving sizes, so a table needs at most eight statements
    /// prepared. One statement runs a row's table and index cursors once for all its rows, about a
    /// third less work per row than a statement per row.
    pub fn insert_rows<const N: usize>(
        &mut self,
        insert: &str,
        row: &str,
        rows: &[[Value<'_>; N]],
    ) -> Result<(), DirectError> {
        let mut rest = rows;
        let mut size = ROWS_PER_INSERT;
        while !rest.is_empty() {
            while size > rest.len() {
                size /= 2;
            }
            let (chunk, after) = rest.split_at(size);
            let mut sql = String::with_capacity(insert.len() + 8 + size * (row.len() + 1));
            sql.push_str(insert);
            sql.push_str(" VALUES ");
            for i in 0..size {
                if i > 0 {
                    sql.push(',');
                }
                sql.push_str(row);
            }
            self.execute(&sql, chunk.as_flattened())?;
            rest = after;
        }
        Ok(())
    }

    /// Runs a query and hands each row to `f`, in order.
    pub fn query<T>(
        &mut self,
        sql: &str,
        params: &[Value<'_>],
        mut f: impl FnMut(&Row<'_>) -> Result<T, DirectError>,
    ) -> Result<Vec<T>, DirectError> {
        let bound = self.bound(sql, params)?;
        let stmt = bound.0;
        let mut out = Vec::new();
        let outcome = loop {
            // SAFETY: as in `execute`.
            match unsafe { ffi::sqlite3_step(stmt.as_ptr()) } {
                ffi::SQLITE_ROW => match f(&Row { stmt, _statement: std::marker::PhantomData }) {
                    Ok(v) => out.push(v),
                    Err(e) => break Err(e),
                },
                ffi::SQLITE_DONE => break Ok(()),
                _ => break Err(self.error()),
            }
        };
        outcome.map(|()| out)
    }

    /// The first row of a query, if any.
    pub fn query_row<T>(
        &mut self,
        sql: &str,
        params: &[Value<'_>],
        f: impl FnOnce(&Row<'_>) -> Result<T, DirectError>,
    ) -> Result<Option<T>, DirectError> {
        let bound = self.bound(sql, params)?;
        let stmt = bound.0;
        // SAFETY: as in `execute`.
        match unsafe { ffi::sqlite3_step(stmt.as_ptr()) } {
            ffi::SQLITE_ROW => f(&Row { stmt, _statement: std::marker::PhantomData }).map(Some),
            ffi::SQLITE_DONE => Ok(None),
            _ => Err(self.error()),
        }
    }

    /// Whether a transaction is open on the connection.
    pub fn in_transaction(&self) -> bool {
        // SAFETY: `self.db` is open and ours while the handle is locked.
        unsafe { ffi::sqlite3_get_autocommit(self.db.as_ptr()) == 0 }
    }

    /// The prepared statement for `sql` (prepared on first use), its parameters bound.
    fn bound(&mut self, sql: &str, params: &[Value<'_>]) -> Result<Bound, DirectError> {
        let stmt = match self.statements.get(sql) {
            Some(s) => *s,
            None => {
                // Callers' statements are constants, so this only bounds a long-lived connection's
                // cache against a caller that builds its SQL: start over rather than grow for ever.
                if self.statements.len() >= MAX_STATEMENTS {
                    self.finalize_all();
                }
                let s = self.prepare(sql)?;
                self.statements.insert(sql.to_string(), s);
                s
            }
        };
        // From here on the statement is reset and its bindings cleared whenever `Bound` goes: when the
        // caller is done with it, on any early return below, and on unwinding from a caller's panic.
        let bound = Bound(stmt);
        // SAFETY: `stmt` is a live statement of `self.db`.
        let expected = unsafe { ffi::sqlite3_bind_parameter_count(stmt.as_ptr()) };
        if usize::try_from(expected).unwrap_or(0) != params.len() {
            return Err(DirectError::new(format!("{} parameters for {expected} in: {sql}", params.len())));
        }
        for (i, v) in params.iter().enumerate() {
            let at = column(i + 1);
            let len = |n: usize| c_int::try_from(n).map_err(|_| DirectError::new("value too long"));
            // SAFETY: `at` is within the statement's parameters (checked above). SQLITE_STATIC: SQLite
            // reads text and blobs in place, without a copy. Every caller of `bound` borrows `params`
            // for longer than it keeps the returned `Bound`, whose drop clears the bindings, so SQLite
            // never reads a value after its borrow ended.
            let rc = unsafe {
                match *v {
                    Value::Null => ffi::sqlite3_bind_null(stmt.as_ptr(), at),
                    Value::Int(n) => ffi::sqlite3_bind_int64(stmt.as_ptr(), at, n),
                    Value::Text(s) => ffi::sqlite3_bind_text(
                        stmt.as_ptr(),
                        at,
                        s.as_ptr().cast(),
                        len(s.len())?,
                        ffi::SQLITE_STATIC(),
                    ),
                    Value::Blob(b) => ffi::sqlite3_bind_blob(
                        stmt.as_ptr(),
                        at,
                        b.as_ptr().cast(),
                        len(b.len())?,
                        ffi::SQLITE_STATIC(),
                    ),
                }
            };
            if rc != ffi::SQLITE_OK {
                return Err(self.error());
            }
        }
        Ok(bound)
    }

    fn prepare(&mut self, sql: &str) -> Result<NonNull<ffi::sqlite3_stmt>, DirectError> {
        let mut stmt = std::ptr::null_mut();
        let mut tail = std::ptr::null();
        let len = c_int::try_from(sql.len()).map_err(|_| DirectError::new("statement too long"))?;
        // SAFETY: `sql` is valid for `len` bytes; SQLite writes the statement (or null) and the tail.
        let rc = unsafe {
            ffi::sqlite3_prepare_v3(
                self.db.as_ptr(),
                sql.as_ptr().cast(),
                len,
                ffi::SQLITE_PREPARE_PERSISTENT,
                &mut stmt,
                &mut tail,
            )
        };
        if rc != ffi::SQLITE_OK {
            return Err(self.error());
        }
        let stmt = NonNull::new(stmt).ok_or_else(|| DirectError::new(format!("no statement in: {sql}")))?;
        // SAFETY: `tail` points into `sql` (at its end when it held one statement).
        let rest = unsafe { tail.cast::<u8>().offset_from(sql.as_ptr()) };
        if usize::try_from(rest).ok().and_then(|r| sql.get(r..)).is_some_and(|r| !r.trim().is_empty()) {
            // SAFETY: finalizing the statement just prepared.
            unsafe { ffi::sqlite3_finalize(stmt.as_ptr()) };
            return Err(DirectError::new(format!("one statement at a time: {sql}")));
        }
        // Values are bound by position; sqlx binds `$n` by its number. They agree only when the
        // parameters first appear in order (`$1`, then `$2`, ...), so anything else is refused here.
        // SAFETY: `stmt` was just prepared; parameter names are NUL-terminated strings owned by it.
        let count = unsafe { ffi::sqlite3_bind_parameter_count(stmt.as_ptr()) };
        for i in 1..=count {
            let name = unsafe { ffi::sqlite3_bind_parameter_name(stmt.as_ptr(), i) };
            if !name.is_null() {
                let name = unsafe { CStr::from_ptr(name) }.to_string_lossy();
                if name != format!("${i}") && name != format!("?{i}") {
                    unsafe { ffi::sqlite3_finalize(stmt.as_ptr()) };
                    return Err(DirectError::new(format!("parameter {i} is {name}, not ${i}, in: {sql}")));
                }
            }
        }
        Ok(stmt)
    }

    fn finalize_all(&mut self) {
        for (_, stmt) in self.statements.drain() {
            // SAFETY: each statement was prepared here and is finalized once; no `Bound` is alive (it
            // borrows from a call on `&mut self`).
            unsafe { ffi::sqlite3_finalize(stmt.as_ptr()) };
        }
    }

    fn error(&self) -> DirectError {
        // SAFETY: `self.db` is open; sqlite3_errmsg's text is copied before the next call.
        unsafe {
            let code = ffi::sqlite3_extended_errcode(self.db.as_ptr());
            let message = CStr::from_ptr(ffi::sqlite3_errmsg(self.db.as_ptr())).to_string_lossy().into_owned();
            DirectError { code, message }
        }
    }
}

/// A statement with its values bound; reset (bindings cleared) when dropped.
struct Bound(NonNull<ffi::sqlite3_stmt>);

impl Drop for Bound {
    fn drop(&mut self) {
        // SAFETY: the statement is live (statements are finalized only when `Direct` drops, and a `Bound`
        // never outlives the `Direct` call that made it); reset keeps it prepared, clear_bindings drops
        // the borrowed values.
        unsafe {
            ffi::sqlite3_reset(self.0.as_ptr());
            ffi::sqlite3_clear_bindings(self.0.as_ptr());
        }
    }
}

impl Drop for Direct<'_> {
    fn drop(&mut self) {
        self.finalize_all();
    }
}

/// Point reads without a hand-off: a few read-only connections, opened and configured by sqlx, whose
/// sqlx workers let go of them for good when they are opened ([`SqliteConnection::lock_handle`], held
/// until the readers are dropped). A read runs on the calling thread, on whichever connection is free,
/// its statements prepared once per connection and kept.
///
/// For the hot paths' lookups by key (a card, an idempotency row): each is microseconds of SQLite work,
/// and through sqlx's pool it was two thread wake-ups (the statement to the connection's worker, the row
/// back). A read blocks its thread for its duration, so scans and listings stay on sqlx's pool.
///
/// In WAL mode a read sees every transaction committed before it started, as a read through the pool
/// does.
#[derive(Debug)]
pub struct Readers {
    conns: Box<[Mutex<Held>]>,
    next: AtomicUsize,
}

impl Readers {
    /// `count` read-only connections (at least one) to the database `options` names, which must exist.
    pub async fn open(options: &SqliteConnectOptions, count: usize) -> Result<Self, sqlx::Error> {
        let mut conns = Vec::with_capacity(count.max(1));
        for _ in 0..count.max(1) {
            conns.push(Mutex::new(Held::open(options.clone().read_only(true)).await?));
        }
        Ok(Self { conns: conns.into_boxed_slice(), next: AtomicUsize::new(0) })
    }

    /// As many connections as the machine has cores (2 to 4), for a service's hot reads.
    pub async fn for_cores(options: &SqliteConnectOptions) -> Result<Self, sqlx::Error> {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get);
        Self::open(options, cores.clamp(2, 4)).await
    }

    /// Runs `read` on a free connection (waiting for one, blocking the thread, if all are busy). `read`
    /// must only read (the connections are read-only: a statement that writes fails) and must not call
    /// `read` again (it could wait for the connection it holds).
    pub fn read<T>(&self, read: impl FnOnce(&mut Direct<'_>) -> T) -> T {
        let n = self.conns.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        // A read that panicked left its statements reset (`Bound`), so a poisoned lock is still usable.
        let mut held = (0..n)
            .find_map(|i| match self.conns[(start + i) % n].try_lock() {
                Ok(held) => Some(held),
                Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(TryLockError::WouldBlock) => None,
            })
            .unwrap_or_else(|| self.conns[start].lock().unwrap_or_else(PoisonError::into_inner));
        let out = read(&mut held.direct);
        // A read that began a transaction and left it open would pin the WAL (no checkpoint could copy
        // past it): end it.
        if held.direct.in_transaction() && held.direct.execute("ROLLBACK", &[]).is_err() {
            tracing::error!("a reader's transaction could not be rolled back");
        }
        out
    }
}

/// A connection taken from its sqlx worker for as long as this lives (see [`Readers`]).
struct Held {
    direct: ManuallyDrop<Direct<'static>>,
    handle: ManuallyDrop<LockedSqliteHandle<'static>>,
    /// The connection, leaked from its box until `drop`; `handle` borrows it.
    conn: NonNull<SqliteConnection>,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held").field("statements", &self.direct.statements.len()).finish()
    }
}

// `Held` hands its lock guard to whichever thread drops it (see the `Send` impl below).
const _: fn() = || {
    fn send<T: Send>() {}
    send::<LockedSqliteHandle<'static>>();
};

impl Held {
    /// Opened at a service's start. (Cancelled while waiting for the worker to let go, it leaks that one
    /// connection: freeing it then could pull it from under the pending lock.)
    async fn open(options: SqliteConnectOptions) -> Result<Self, sqlx::Error> {
        let conn = NonNull::from(Box::leak(Box::new(options.connect().await?)));
        // SAFETY: `conn` is a live, leaked box that nothing else refers to; it is freed only in `drop`,
        // after the handle borrowed from it (or right below, if locking failed and nothing borrows it).
        let handle = match unsafe { &mut *conn.as_ptr() }.lock_handle().await {
            Ok(h) => h,
            Err(e) => {
                drop(unsafe { Box::from_raw(conn.as_ptr()) });
                return Err(e);
            }
        };
        let mut handle = ManuallyDrop::new(handle);
        let direct = ManuallyDrop::new(Direct {
            db: handle.as_raw_handle(),
            statements: HashMap::new(),
            _handle: std::marker::PhantomData,
        });
        Ok(Self { direct, handle, conn })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: each is dropped once, in this order: the statements are finalized, the worker gets the
        // connection back, then the connection goes (its worker closes it; no statement of ours is left).
        unsafe {
            ManuallyDrop::drop(&mut self.direct);
            ManuallyDrop::drop(&mut self.handle);
            drop(Box::from_raw(self.conn.as_ptr()));
        }
    }
}

// SAFETY: SQLite is built thread-safe (the bundled build), so a connection may be used from any thread,
// one at a time: a `Held` is only reached through its `Mutex`, and its sqlx worker is parked on the lock
// `handle` holds. The lock's guard is `Send` (checked above).
unsafe impl Send for Held {}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;
    use std::sync::Arc;

    async fn memory() -> sqlx::SqliteConnection {
        let mut conn = sqlx::SqliteConnection::connect("sqlite::memory:").await.unwrap_or_else(|e| panic!("{e}"));
        sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT UNIQUE, data BLOB)")
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        conn
    }

    #[tokio::test]
    async fn writes_reads_and_reports_what_sqlite_refused() {
        let mut conn = memory().await;
        {
            let mut handle = conn.lock_handle().await.unwrap_or_else(|e| panic!("{e}"));
            let mut d = Direct::new(&mut handle);
            let insert = "INSERT INTO t (id, name, data) VALUES ($1, $2, $3)";
            assert_eq!(d.execute(insert, &[1.into(), "a".into(), Value::Blob(&[1, 2])]).ok(), Some(1));
            assert_eq!(d.execute(insert, &[2.into(), "b".into(), Value::Null]).ok(), Some(1));
            let taken = d.execute(insert, &[3.into(), "a".into(), Value::Null]).err();
            assert!(taken.as_ref().is_some_and(DirectError::is_unique_violation), "{taken:?}");
            let wrong = d.execute(insert, &[4.into()]).err();
            assert!(wrong.is_some_and(|e| e.message.contains("1 parameters for 3")));
            assert_eq!(d.execute("UPDATE t SET name = $1 WHERE id > $2", &["x".into(), 5.into()]).ok(), Some(0));
            let rows = d
                .query("SELECT id, name, data FROM t ORDER BY id", &[], |r| {
                    Ok((r.int(0), r.text(1)?, r.blob(2), r.is_null(2)))
                })
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(rows, vec![(1, "a".to_string(), vec![1, 2], false), (2, "b".to_string(), vec![], true)]);
            let none = d.query_row("SELECT id FROM t WHERE id = $1", &[9.into()], |r| Ok(r.int(0)));
            assert_eq!(none.ok(), Some(None));
            assert!(d.execute("SELECT 1; SELECT 2", &[]).is_err(), "one statement at a time");
            let swapped = d.execute("UPDATE t SET name = $2 WHERE id = $1", &[1.into(), "z".into()]).err();
            assert!(
                swapped.is_some_and(|e| e.message.contains("parameter 1 is $2")),
                "bound by position, named out of order"
            );
            // A caller's callback that panics mid-query leaves the statement reset, usable again.
            let all = "SELECT id FROM t ORDER BY id";
            let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let _ = d.query(all, &[], |_| -> Result<i64, DirectError> { panic!("a bug in a caller") });
            }));
            assert!(panicked.is_err());
            assert_eq!(d.query(all, &[], |r| Ok(r.int(0))).ok(), Some(vec![1, 2]));
        }
        // The connection is sqlx's again and sees what was written; every statement prepared here was
        // finalized, so sqlx can close it (SQLite refuses to close a connection with live statements).
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM t").fetch_one(&mut conn).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n, 2);
        conn.close().await.unwrap_or_else(|e| panic!("{e}"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_see_commits_refuse_writes_and_give_their_connections_back() {
        let dir = std::env::temp_dir().join(format!("socialcard-readers-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
        let options = SqliteConnectOptions::new()
            .filename(dir.join("r.db"))
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
        let pool = crate::sqlite_pool(1).connect_with(options.clone()).await.unwrap_or_else(|e| panic!("{e}"));
        sqlx::query("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)")
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let readers = Arc::new(Readers::open(&options, 2).await.unwrap_or_else(|e| panic!("{e}")));
        let name = |readers: &Readers, id: i64| {
            readers.read(|d| d.query_row("SELECT name FROM t WHERE id = $1", &[id.into()], |r| r.text(0)))
        };
        assert_eq!(name(&readers, 1).ok(), Some(None));
        sqlx::query("INSERT INTO t (id, name) VALUES (1, 'a')").execute(&pool).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(name(&readers, 1).ok(), Some(Some("a".to_string())), "a read sees what committed before it");
        let write = readers.read(|d| d.execute("INSERT INTO t (id, name) VALUES (2, 'b')", &[]));
        assert!(write.is_err_and(|e| e.code & 0xff == ffi::SQLITE_READONLY), "readers are read-only");

        // Reads from many threads at once share the connections; a read that panicked leaves its
        // connection usable.
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            readers.read(|d| d.query("SELECT id FROM t", &[], |_| -> Result<i64, DirectError> { panic!("a bug") }))
        }));
        assert!(panicked.is_err());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let readers = readers.clone();
                std::thread::spawn(move || (0..200).filter(|_| name(&readers, 1).ok().flatten().is_some()).count())
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().ok(), Some(200));
        }

        // Dropped, the readers finalize their statements (as `Direct` does, tested above) and give their
        // connections back to sqlx, which closes them; the database is whole afterwards.
        drop(readers);
        let n: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM t").fetch_one(&pool).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(n, 1);
        pool.close().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
