//! The machinery of [`Database::sqlite_write`](crate::Database::sqlite_write):
//! transactions queued by their callers and run in batches, each batch
//! one SQLite transaction (group commit), each caller's part in a
//! savepoint of its own.
//!
//! Every queued transaction's caller waits for the writer's lock (or has
//! stopped waiting, and then took its transaction out of the queue if no
//! batch had taken it yet). Whoever holds the lock runs what is queued,
//! up to [`BATCH`] transactions, and lets go; a caller whose transaction
//! is still queued afterwards takes the lock again. So a queued
//! transaction always has someone to run it, and under load one commit
//! (one WAL append, one lock round) serves many callers.

use crate::db::{DbError, Finish};
use std::any::Any;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The most transactions one batch commits together.
pub(crate) const BATCH: usize = 64;

/// SQLite's busy timeout on every connection (as `sqlite_pragmas` sets).
pub(crate) const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// What a caller gets back: its closure's answer, or the panic it raised.
pub(crate) type Answer<T, E> = Result<Result<T, E>, Box<dyn Any + Send>>;

/// One caller's transaction, its types erased: given the batch's
/// connection (or why the batch could not begin), it runs in a savepoint
/// and returns what to tell the caller once the batch's commit is known.
pub(crate) type Job = Box<dyn FnOnce(Result<&rusqlite::Connection, &str>) -> Deliver + Send>;

/// Tells a caller its answer, given whether the batch committed (or why
/// not).
pub(crate) type Deliver = Box<dyn FnOnce(Result<(), &str>) + Send>;

/// The transactions waiting for a batch, in arrival order.
#[derive(Default)]
pub(crate) struct Queue {
    next_id: u64,
    pending: VecDeque<(u64, Job)>,
    /// Batches taken so far (what the tests check group commit by).
    pub(crate) batches: u64,
}

#[cfg(test)]
impl Queue {
    /// Transactions waiting for a batch.
    pub(crate) fn pending_len(&self) -> usize {
        self.pending.len()
    }
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("pending", &self.pending.len())
            .field("batches", &self.batches)
            .finish()
    }
}

pub(crate) type SharedQueue = Arc<Mutex<Queue>>;

pub(crate) fn lock(queue: &SharedQueue) -> std::sync::MutexGuard<'_, Queue> {
    queue.lock().unwrap_or_else(|e| e.into_inner())
}

/// Queues `job`; the guard takes it out again if it is dropped (its
/// caller stopped waiting) before a batch took it.
pub(crate) fn push(queue: &SharedQueue, job: Job) -> Queued {
    let mut q = lock(queue);
    q.next_id += 1;
    let id = q.next_id;
    q.pending.push_back((id, job));
    Queued {
        queue: Arc::clone(queue),
        id,
    }
}

/// A queued transaction, from its caller's side.
pub(crate) struct Queued {
    queue: SharedQueue,
    id: u64,
}

impl Queued {
    /// Whether no batch has taken it yet.
    pub(crate) fn pending(&self) -> bool {
        lock(&self.queue)
            .pending
            .iter()
            .any(|(id, _)| *id == self.id)
    }

    /// Takes it out of the queue; false when a batch had taken it.
    pub(crate) fn withdraw(&self) -> bool {
        let mut q = lock(&self.queue);
        let before = q.pending.len();
        q.pending.retain(|(id, _)| *id != self.id);
        q.pending.len() != before
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.withdraw();
    }
}

/// Takes up to [`BATCH`] queued transactions.
pub(crate) fn take(queue: &SharedQueue) -> Vec<Job> {
    let mut q = lock(queue);
    let n = q.pending.len().min(BATCH);
    if n > 0 {
        q.batches += 1;
    }
    q.pending.drain(..n).map(|(_, job)| job).collect()
}

/// Wraps a caller's closure into a [`Job`] answering on `tx`.
pub(crate) fn job<T, E, F>(f: F, tx: tokio::sync::oneshot::Sender<Answer<T, E>>) -> Job
where
    F: FnOnce(&rusqlite::Connection) -> Result<Finish<T>, E> + Send + 'static,
    T: Send + 'static,
    E: From<DbError> + Send + 'static,
{
    Box::new(move |conn| {
        let outcome = run_one(conn, f);
        Box::new(move |committed: Result<(), &str>| {
            let answer = match outcome {
                Ran::Commit(t) => Ok(match committed {
                    Ok(()) => Ok(t),
                    Err(why) => Err(DbError::Lost(why.to_string()).into()),
                }),
                Ran::Answer(answer) => answer,
            };
            let _ = tx.send(answer);
        })
    })
}

/// What running one caller's transaction came to.
enum Ran<T, E> {
    /// Released into the batch: `T` once the batch commits.
    Commit(T),
    /// Its answer whatever the batch does (rolled back, failed, panicked).
    Answer(Answer<T, E>),
}

fn run_one<T, E>(
    conn: Result<&rusqlite::Connection, &str>,
    f: impl FnOnce(&rusqlite::Connection) -> Result<Finish<T>, E>,
) -> Ran<T, E>
where
    E: From<DbError>,
{
    let fail = |e: DbError| Ran::Answer(Ok(Err(e.into())));
    let conn = match conn {
        Ok(conn) => conn,
        Err(why) => return fail(DbError::Lost(format!("the batch did not begin: {why}"))),
    };
    if conn.is_autocommit() {
        // An earlier part of the batch failed so badly that SQLite ended
        // the whole transaction; nothing of this one runs.
        return fail(DbError::Lost(
            "the batch's transaction was rolled back".into(),
        ));
    }
    if let Err(e) = conn.execute_batch("SAVEPOINT shoal_write") {
        return fail(e.into());
    }
    let undo = || {
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK TO shoal_write; RELEASE shoal_write");
        }
    };
    match std::panic::catch_unwind(AssertUnwindSafe(|| f(conn))) {
        Ok(Ok(Finish::Commit(t))) => match conn.execute_batch("RELEASE shoal_write") {
            Ok(()) => Ran::Commit(t),
            Err(e) => {
                undo();
                fail(e.into())
            }
        },
        Ok(Ok(Finish::Rollback(t))) => {
            undo();
            Ran::Answer(Ok(Ok(t)))
        }
        Ok(Err(e)) => {
            undo();
            Ran::Answer(Ok(Err(e)))
        }
        Err(panic) => {
            undo();
            Ran::Answer(Err(panic))
        }
    }
}

/// `BEGIN IMMEDIATE` without waiting: Err(busy) when another connection
/// (another process) holds SQLite's write lock.
pub(crate) fn begin_now(conn: &rusqlite::Connection) -> Result<(), rusqlite::Error> {
    conn.busy_timeout(Duration::ZERO)?;
    let begun = conn.execute_batch("BEGIN IMMEDIATE");
    conn.busy_timeout(SQLITE_BUSY_TIMEOUT)?;
    begun
}

pub(crate) fn is_busy(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _)
        if f.code == rusqlite::ErrorCode::DatabaseBusy || f.code == rusqlite::ErrorCode::DatabaseLocked)
}

/// Runs `batch` in the transaction `conn` has begun (or fails each of
/// it when `begun` is an error), commits, and answers every caller.
pub(crate) fn run(
    conn: &rusqlite::Connection,
    begun: Result<(), rusqlite::Error>,
    batch: Vec<Job>,
) {
    let size = batch.len() as u64;
    let (delivers, committed): (Vec<Deliver>, Result<(), String>) = match begun {
        Ok(()) => {
            let delivers = batch.into_iter().map(|job| job(Ok(conn))).collect();
            let committed = conn.execute_batch("COMMIT").map_err(|e| {
                if !conn.is_autocommit() {
                    let _ = conn.execute_batch("ROLLBACK");
                }
                format!("the commit failed: {e}")
            });
            (delivers, committed)
        }
        Err(e) => {
            tracing::warn!(error = %e, "a SQLite write batch could not begin");
            let why = e.to_string();
            (
                batch.into_iter().map(|job| job(Err(&why))).collect(),
                Ok(()),
            )
        }
    };
    metrics::counter!("shoal_db_sqlite_write_batches_total").increment(1);
    metrics::counter!("shoal_db_sqlite_writes_total").increment(size);
    for deliver in delivers {
        deliver(committed.as_ref().map(|_| ()).map_err(String::as_str));
    }
}

/// [`Database::sqlite_write`](crate::Database::sqlite_write)'s connection,
/// with the pragmas the pool's connections get (`sqlite_pragmas`).
pub(crate) fn open(path: &str) -> Result<rusqlite::Connection, rusqlite::Error> {
    use rusqlite::OpenFlags;
    let conn = rusqlite::Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
    )?;
    conn.busy_timeout(SQLITE_BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}
