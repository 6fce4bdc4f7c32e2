//! The SQL database: one `sqlx::AnyPool` over SQLite (WAL mode, shared by
//! every process on the machine) or PostgreSQL, and a small migrator that
//! applies each component's numbered migrations once, under a lock, so
//! several instances starting together never race.
//!
//! SQL written against `Database` must run on both engines: `$1` style
//! parameters, BIGINT millisecond timestamps, TEXT ids and JSON, and
//! `ON CONFLICT` upserts. Branch on [`Database::kind`] where they differ.

use crate::direct;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool, Connection, Executor, Transaction};
use std::str::FromStr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatabaseKind {
    Sqlite,
    Postgres,
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database URL `{0}` is not sqlite: or postgres://")]
    UnsupportedUrl(String),
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("migration {component}/{version} ({name}) failed: {source}")]
    Migration {
        component: String,
        version: i64,
        name: String,
        #[source]
        source: sqlx::Error,
    },
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    #[error("SQLite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{0}")]
    Unsupported(&'static str),
    #[error("the SQLite write did not commit: {0}")]
    Lost(String),
}

/// How a [`Database::sqlite_write`] transaction ends.
#[derive(Debug)]
pub enum Finish<T> {
    /// Commit, and answer `T`.
    Commit(T),
    /// Roll back everything the transaction wrote, and answer `T`.
    Rollback(T),
}

/// A pooled connection idle this long is pinged before it is handed out.
const IDLE_PING_AFTER: Duration = Duration::from_secs(1);

/// One schema change of one component. `sql` may hold several statements,
/// each ending with `;` at the end of a line.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i64,
    pub name: &'static str,
    pub sql: &'static str,
}

/// The table that records which migrations ran.
const CREATE_MIGRATIONS: &str = "CREATE TABLE IF NOT EXISTS shoal_migrations (
    component TEXT NOT NULL,
    version BIGINT NOT NULL,
    name TEXT NOT NULL,
    applied_at BIGINT NOT NULL,
    PRIMARY KEY (component, version))";

/// A pool over SQLite or PostgreSQL. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Database {
    pool: AnyPool,
    kind: DatabaseKind,
    /// SQLite: this process's one writing connection, opened on first
    /// use, lent to one task at a time ([`Database::write`]).
    writer: Arc<tokio::sync::Mutex<WriterSlot>>,
    /// How to open the writing connection (SQLite).
    options: Arc<AnyConnectOptions>,
    /// The longest wait for the writer, as for a pooled connection.
    acquire_timeout: Duration,
    /// SQLite: the database file, for [`Database::sqlite_write`]'s own
    /// connection (None for PostgreSQL and for `:memory:`).
    sqlite_path: Option<Arc<str>>,
    /// SQLite: the transactions waiting for [`Database::sqlite_write`]'s
    /// next batch.
    direct_queue: direct::SharedQueue,
    /// When the pool last lent a connection (ms since [`process_epoch`],
    /// plus one; 0 = never): with every connection in use, proof that
    /// queries still finish ([`Database::ping`]).
    lent_at: Arc<std::sync::atomic::AtomicU64>,
}

/// How recent a loan must be for a pool with every connection in use to
/// count as answering without a ping of its own.
const BUSY_PROOF: Duration = Duration::from_secs(1);

/// The zero of [`Database::lent_at`].
fn process_epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn ms_since_epoch(t: Instant) -> u64 {
    t.saturating_duration_since(process_epoch()).as_millis() as u64 + 1
}

/// The SQLite writing connections and when one was last lent. Both are
/// behind the one lock: this process writes through one at a time.
#[derive(Default)]
struct WriterSlot {
    conn: Option<AnyConnection>,
    last_used: Option<Instant>,
    /// The connection [`Database::sqlite_write`] runs transactions on,
    /// synchronously (rusqlite, the same SQLite library as sqlx's).
    direct: Option<rusqlite::Connection>,
}

impl std::fmt::Debug for WriterSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriterSlot")
            .field("conn", &self.conn.is_some())
            .field("direct", &self.direct.is_some())
            .field("last_used", &self.last_used)
            .finish()
    }
}

/// A connection to write with, from [`Database::write`]: deref to the
/// connection, or [`Writer::begin`] a transaction on it.
pub struct Writer {
    inner: WriterInner,
}

enum WriterInner {
    Sqlite(tokio::sync::OwnedMutexGuard<WriterSlot>),
    Pool(PoolConnection<Any>),
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.inner {
            WriterInner::Sqlite(_) => "Writer(sqlite)",
            WriterInner::Pool(_) => "Writer(pool)",
        })
    }
}

impl Writer {
    /// Starts a transaction on the writing connection.
    ///
    /// A plain (deferred) `BEGIN` on SQLite, not `BEGIN IMMEDIATE`:
    /// sqlx runs a custom begin statement with a second hand-off to the
    /// worker thread, and a request cancelled between the two leaves the
    /// connection inside a transaction nobody will end (sqlx-sqlite 0.8.6,
    /// `SqliteTransactionManager::begin`). In this process the writer is
    /// already exclusive, and a transaction whose first statement writes
    /// waits in SQLite's busy handler for other processes as `IMMEDIATE`
    /// would; one that reads first may get SQLITE_BUSY from another
    /// process's write (as before this connection existed).
    pub async fn begin(&mut self) -> Result<Transaction<'_, Any>, sqlx::Error> {
        (**self).begin().await
    }
}

impl std::ops::Deref for Writer {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        match &self.inner {
            WriterInner::Sqlite(slot) => slot.conn.as_ref().expect("opened by write()"),
            WriterInner::Pool(conn) => conn,
        }
    }
}

impl std::ops::DerefMut for Writer {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        match &mut self.inner {
            WriterInner::Sqlite(slot) => slot.conn.as_mut().expect("opened by write()"),
            WriterInner::Pool(conn) => conn,
        }
    }
}

/// How long a PostgreSQL session may sit idle inside a transaction
/// before the server ends it. No transaction of Shoal's waits on anything
/// but its own statements between `BEGIN` and `COMMIT` (calls to other
/// services, providers and storage come before or after), so only a
/// process that stopped mid-transaction (frozen, or cut off from the
/// network) reaches it; it then gives back the row locks it held, which
/// every other writer of those rows would wait on until its connection
/// died.
pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "30s";

/// Settings of every PostgreSQL session of the pool.
async fn postgres_session(conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
    sqlx::query(&format!(
        "SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION_TIMEOUT}'"
    ))
    .execute(conn)
    .await
    .map(|_| ())
}

impl Database {
    /// Connects to `url` (`sqlite://path?mode=rwc` or `postgres://...`).
    /// SQLite connections get [`sqlite_pragmas`].
    pub async fn connect(
        url: &str,
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> Result<Self, DbError> {
        sqlx::any::install_default_drivers();
        let kind = if url.starts_with("sqlite:") {
            DatabaseKind::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            DatabaseKind::Postgres
        } else {
            return Err(DbError::UnsupportedUrl(
                shoal_core::settings::redact_url_password(url),
            ));
        };
        if kind == DatabaseKind::Sqlite {
            create_sqlite_parent_dir(url);
        }
        let options = AnyConnectOptions::from_str(url).map_err(DbError::Connect)?;
        let lent_at = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let lent = Arc::clone(&lent_at);
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .min_connections(0)
            .acquire_timeout(acquire_timeout)
            // sqlx pings every connection it hands out by default: one
            // more round trip (a thread hand-off on SQLite, a network
            // round trip on PostgreSQL) per checkout, on top of the ping
            // it always makes when one is returned. A connection that was
            // in use a moment ago is alive; ping only those that sat idle
            // (as HikariCP's 500 ms bypass window does).
            .test_before_acquire(false)
            .before_acquire(move |conn, meta| {
                lent.store(ms_since_epoch(Instant::now()), Ordering::Relaxed);
                Box::pin(async move {
                    if meta.idle_for >= IDLE_PING_AFTER {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    match kind {
                        DatabaseKind::Sqlite => sqlite_pragmas(conn).await?,
                        DatabaseKind::Postgres => postgres_session(conn).await?,
                    }
                    Ok(())
                })
            })
            .connect_with(options.clone())
            .await
            .map_err(DbError::Connect)?;
        Ok(Database {
            pool,
            kind,
            writer: Arc::default(),
            options: Arc::new(options),
            acquire_timeout,
            lent_at,
            direct_queue: direct::SharedQueue::default(),
            sqlite_path: match kind {
                DatabaseKind::Sqlite => sqlite_file(url).map(Arc::from),
                DatabaseKind::Postgres => None,
            },
        })
    }

    /// A connection for a transaction that writes. On SQLite it is this
    /// process's one writing connection, and the call waits until no other
    /// task holds it: SQLite has one writer at a time, and connections
    /// that race for it get SQLITE_BUSY and sleep in its busy handler,
    /// whose growing sleeps made the tail latency of writes under load
    /// (bench/README.md, "Profile of the service path"). Keeping the
    /// connection also spares the two pings sqlx makes when a pooled
    /// connection is lent and returned (each a hand-off to SQLite's
    /// worker thread). Hold it from `begin()` past `commit()`. On
    /// PostgreSQL, which has row locks, it is a connection from the pool.
    /// Waits at most the pool's acquire timeout (`PoolTimedOut` past it).
    pub async fn write(&self) -> Result<Writer, sqlx::Error> {
        if self.kind == DatabaseKind::Postgres {
            return Ok(Writer {
                inner: WriterInner::Pool(self.pool.acquire().await?),
            });
        }
        // Bounded as a pooled checkout is: a holder that never lets go
        // (a bug) makes writers fail with PoolTimedOut, not wait forever.
        let mut slot =
            tokio::time::timeout(self.acquire_timeout, Arc::clone(&self.writer).lock_owned())
                .await
                .map_err(|_| sqlx::Error::PoolTimedOut)?;
        let idle = slot
            .last_used
            .is_none_or(|t| t.elapsed() >= IDLE_PING_AFTER);
        if let Some(conn) = slot.conn.as_mut() {
            if let Err(error) = settle_writer(conn, idle).await {
                // The connection's worker stopped (it does after a failed
                // rollback): open another.
                tracing::warn!(%error, "the SQLite writing connection failed; reopening it");
                slot.conn = None;
            }
        }
        if slot.conn.is_none() {
            let mut conn = AnyConnection::connect_with(&self.options).await?;
            sqlite_pragmas(&mut conn).await?;
            slot.conn = Some(conn);
        }
        slot.last_used = Some(Instant::now());
        Ok(Writer {
            inner: WriterInner::Sqlite(slot),
        })
    }

    /// SQLite only: runs `f` as one write transaction: `SAVEPOINT`, then
    /// `RELEASE` or `ROLLBACK TO` as `f` answers ([`Finish`]; rolled back
    /// when it fails or panics), inside a `BEGIN IMMEDIATE … COMMIT` it
    /// may share with other callers' transactions (group commit: one
    /// commit for every transaction queued while the last batch ran, up
    /// to 64). It answers after that commit. The batch runs on a
    /// connection of its own, synchronously, on the calling thread of the
    /// caller that holds the lock [`Database::write`] takes.
    ///
    /// Why: sqlx runs each SQLite statement on the connection's worker
    /// thread, so every statement is a hand-off to that thread and back;
    /// a checkout spent more CPU switching threads than in SQLite
    /// (bench/README.md, "The SQLite write path, in one hand-off"). Here a
    /// transaction costs the lock and SQLite's own work, as with a
    /// synchronous driver in Node.js, and concurrent ones share the
    /// commit's WAL append. Keep `f` short: it holds a runtime thread, and
    /// every transaction of its batch waits for it; no network, no
    /// waiting.
    ///
    /// When another process holds SQLite's write lock, the batch is not
    /// begun here but on tokio's blocking pool, where it waits in the busy
    /// handler (the 10 s busy timeout) without stalling the runtime.
    /// Either way `f` runs at most once, and once a batch has taken it,
    /// it runs and ends (commit or rollback, never half) even if the
    /// caller stops waiting; a caller that stops waiting before that
    /// takes it back. A panic in `f` is raised again in the caller. Fails
    /// with [`DbError::Unsupported`] on PostgreSQL and on an in-memory
    /// SQLite database (which another connection would not see).
    pub async fn sqlite_write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&rusqlite::Connection) -> Result<Finish<T>, E> + Send + 'static,
        T: Send + 'static,
        E: From<DbError> + Send + 'static,
    {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let queued = direct::push(&self.direct_queue, direct::job(f, tx));
        while queued.pending() {
            // The lock, unless another caller's batch answers first: a
            // caller whose transaction is done does not wait behind the
            // batches queued for the lock after it.
            let slot = tokio::select! {
                biased;
                answer = &mut rx => return unpack(answer),
                slot = self.direct_slot() => slot,
            };
            let slot = match slot {
                Ok(slot) => slot,
                // Not taken by a batch yet: it never will be.
                Err(e) if queued.withdraw() => return Err(e.into()),
                // Taken while this caller waited: its answer will come.
                Err(_) => break,
            };
            let batch = direct::take(&self.direct_queue);
            if !batch.is_empty() {
                let conn = slot.direct.as_ref().expect("opened by direct_slot");
                match direct::begin_now(conn) {
                    Err(e) if direct::is_busy(&e) => {
                        // Another process writes: wait for it off the runtime.
                        metrics::counter!("shoal_db_sqlite_write_waits_total").increment(1);
                        tokio::task::spawn_blocking(move || {
                            let conn = slot.direct.as_ref().expect("opened by direct_slot");
                            let begun = conn.execute_batch("BEGIN IMMEDIATE");
                            direct::run(conn, begun, batch);
                        })
                        .await
                        .map_err(|e| DbError::Lost(e.to_string()))?;
                    }
                    begun => {
                        direct::run(conn, begun, batch);
                        drop(slot);
                    }
                }
            } else {
                drop(slot);
            }
        }
        drop(queued);
        unpack(rx.await)
    }

    /// SQLite only: runs `f` on [`Database::sqlite_write`]'s connection,
    /// outside a transaction, under the same lock: a read (or single
    /// statement) on the calling thread, with no hand-off. A read in WAL
    /// mode does not wait for writers.
    pub async fn sqlite_read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&rusqlite::Connection) -> Result<T, E>,
        E: From<DbError>,
    {
        let slot = self.direct_slot().await?;
        f(slot.direct.as_ref().expect("opened by direct_slot"))
    }

    /// The writer's lock, with the direct connection opened and outside
    /// any transaction.
    async fn direct_slot(&self) -> Result<tokio::sync::OwnedMutexGuard<WriterSlot>, DbError> {
        let Some(path) = self.sqlite_path.as_deref() else {
            return Err(DbError::Unsupported(
                "the direct SQLite connection needs a SQLite database in a file (not PostgreSQL, not :memory:)",
            ));
        };
        let mut slot =
            tokio::time::timeout(self.acquire_timeout, Arc::clone(&self.writer).lock_owned())
                .await
                .map_err(|_| DbError::Sql(sqlx::Error::PoolTimedOut))?;
        if slot.direct.is_none() {
            slot.direct = Some(direct::open(path)?);
        }
        let conn = slot.direct.as_ref().expect("opened above");
        // A transaction left open (a panic while a batch ran, outside
        // its callers' closures) is rolled back first.
        if !conn.is_autocommit() {
            tracing::warn!(
                "the direct SQLite connection was left in a transaction; rolling it back"
            );
            conn.execute_batch("ROLLBACK")?;
        }
        Ok(slot)
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn kind(&self) -> DatabaseKind {
        self.kind
    }

    /// True when a trivial query succeeds: used by `/readyz`.
    ///
    /// With every connection of the pool in use and one lent within the
    /// last second, true at once: queries finish, so the database
    /// answers; this process is busy. A `SELECT 1` would wait behind
    /// every queued checkout (thousands of event streams coming back
    /// from a drained instance, each reading what it missed) and make a
    /// readiness check report the database down, taking the busy
    /// instance out of the gateways' pools. A pool whose connections are
    /// all stuck lends none, so this gives way to the query, which waits.
    pub async fn ping(&self) -> bool {
        if self.busy_but_answering(Instant::now()) {
            return true;
        }
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    fn busy_but_answering(&self, now: Instant) -> bool {
        let saturated = self.pool.num_idle() == 0
            && self.pool.size() >= self.pool.options().get_max_connections();
        let lent = self.lent_at.load(Ordering::Relaxed);
        saturated
            && lent != 0
            && ms_since_epoch(now).saturating_sub(lent) <= BUSY_PROOF.as_millis() as u64
    }

    /// Whether `component`'s migration `version` was applied here.
    pub async fn is_applied(&self, component: &str, version: i64) -> Result<bool, DbError> {
        let mut conn = self.pool.acquire().await?;
        conn.execute(CREATE_MIGRATIONS).await?;
        let done: Option<(i64,)> = sqlx::query_as(
            "SELECT version FROM shoal_migrations WHERE component = $1 AND version = $2",
        )
        .bind(component)
        .bind(version)
        .fetch_optional(&mut *conn)
        .await?;
        Ok(done.is_some())
    }

    /// Applies `component`'s migrations that have not run yet, in version
    /// order, each in its own transaction, holding a lock so concurrent
    /// starters wait instead of racing. Idempotent.
    pub async fn migrate(&self, component: &str, migrations: &[Migration]) -> Result<(), DbError> {
        let mut conn = self.pool.acquire().await?;
        conn.execute(CREATE_MIGRATIONS).await?;
        for m in migrations {
            let begin = match self.kind {
                DatabaseKind::Sqlite => "BEGIN IMMEDIATE",
                DatabaseKind::Postgres => "BEGIN",
            };
            conn.execute(begin).await?;
            let result: Result<(), sqlx::Error> = async {
                if self.kind == DatabaseKind::Postgres {
                    // Serialises migrators across instances until commit.
                    sqlx::query("SELECT pg_advisory_xact_lock(7426001)")
                        .execute(&mut *conn)
                        .await?;
                }
                let done: Option<(i64,)> = sqlx::query_as(
                    "SELECT version FROM shoal_migrations WHERE component = $1 AND version = $2",
                )
                .bind(component)
                .bind(m.version)
                .fetch_optional(&mut *conn)
                .await?;
                if done.is_none() {
                    for statement in split_statements(m.sql) {
                        sqlx::query(statement).execute(&mut *conn).await?;
                    }
                    sqlx::query(
                        "INSERT INTO shoal_migrations (component, version, name, applied_at)
                         VALUES ($1, $2, $3, $4)",
                    )
                    .bind(component)
                    .bind(m.version)
                    .bind(m.name)
                    .bind(crate::now_millis())
                    .execute(&mut *conn)
                    .await?;
                    tracing::info!(
                        component,
                        version = m.version,
                        name = m.name,
                        "migration applied"
                    );
                }
                Ok(())
            }
            .await;
            match result {
                Ok(()) => {
                    conn.execute("COMMIT").await?;
                }
                Err(source) => {
                    let _ = conn.execute("ROLLBACK").await;
                    return Err(DbError::Migration {
                        component: component.into(),
                        version: m.version,
                        name: m.name.into(),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    pub async fn close(&self) {
        // A writer still lent at shutdown is left to its holder.
        if let Ok(mut slot) = self.writer.try_lock() {
            if let Some(conn) = slot.conn.take() {
                let _ = conn.close().await;
            }
        }
        self.pool.close().await;
    }
}

/// The file of a `sqlite:` URL (`sqlite://path?mode=rwc`, `sqlite:path`),
/// or None for an in-memory database.
fn sqlite_file(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" || url.contains("mode=memory") {
        return None;
    }
    Some(path.to_string())
}

/// A `sqlite_write` caller's answer: its closure's result, or its panic
/// raised again here.
fn unpack<T, E: From<DbError>>(
    answer: Result<direct::Answer<T, E>, tokio::sync::oneshot::error::RecvError>,
) -> Result<T, E> {
    match answer {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => Err(DbError::Lost("its batch ended without an answer".into()).into()),
    }
}

/// Makes the SQLite writing connection fit to lend: pinged when it sat
/// idle, and never lent inside a transaction. A transaction dropped
/// unfinished (its request cancelled) queues its rollback, which the
/// worker runs before the next command; the ping waits for it. One still
/// open after that is rolled back here.
async fn settle_writer(conn: &mut AnyConnection, idle: bool) -> Result<(), sqlx::Error> {
    if idle || conn.is_in_transaction() {
        conn.ping().await?;
    }
    if conn.is_in_transaction() {
        tracing::warn!("the SQLite writing connection was left in a transaction; rolling it back");
        <<Any as sqlx::Database>::TransactionManager as sqlx::TransactionManager>::rollback(conn)
            .await?;
    }
    Ok(())
}

/// WAL (readers and the writer do not block each other; shared by every
/// process on the machine), NORMAL sync (a commit survives a killed
/// process; the log is synced at checkpoints, so a power cut may take the
/// last commits back but never corrupts), a 10 s busy timeout and foreign
/// keys.
async fn sqlite_pragmas(conn: &mut AnyConnection) -> Result<(), sqlx::Error> {
    conn.execute("PRAGMA journal_mode = WAL").await?;
    conn.execute("PRAGMA synchronous = NORMAL").await?;
    conn.execute("PRAGMA busy_timeout = 10000").await?; // direct::SQLITE_BUSY_TIMEOUT
    conn.execute("PRAGMA foreign_keys = ON").await?;
    Ok(())
}

/// Splits a migration into statements at `;` that ends a line.
fn split_statements(sql: &str) -> impl Iterator<Item = &str> {
    sql.split(";\n")
        .map(|s| s.trim().trim_end_matches(';').trim())
        .filter(|s| !s.is_empty())
}

fn create_sqlite_parent_dir(url: &str) {
    let path = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let path = path.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return;
    }
    if let Some(parent) = std::path::Path::new(path).parent() {
        let _ = std::fs::create_dir_all(parent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_split_at_line_ends() {
        let sql = "CREATE TABLE a (x TEXT);\nCREATE INDEX i ON a (x);\n";
        let parts: Vec<_> = split_statements(sql).collect();
        assert_eq!(
            parts,
            vec!["CREATE TABLE a (x TEXT)", "CREATE INDEX i ON a (x)"]
        );
    }

    /// Every PostgreSQL session bounds its idle time inside a
    /// transaction, so a process that stops mid-transaction gives its row
    /// locks back.
    #[tokio::test]
    async fn postgres_sessions_end_a_transaction_left_idle() {
        let Some(url) =
            shoal_testkit::postgres_url("postgres_sessions_end_a_transaction_left_idle")
        else {
            return;
        };
        let db = Database::connect(&url, 2, Duration::from_secs(5))
            .await
            .unwrap();
        let mut writer = db.write().await.unwrap();
        let mut tx = writer.begin().await.unwrap();
        let (value,): (String,) = sqlx::query_as("SHOW idle_in_transaction_session_timeout")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(value, IDLE_IN_TRANSACTION_TIMEOUT);
        tx.rollback().await.unwrap();
    }

    #[tokio::test]
    async fn a_busy_pool_answers_its_ping_and_a_stuck_one_does_not() {
        let dir = shoal_testkit::TempDir::new("busyping");
        let url = format!("sqlite://{}/p.db?mode=rwc", dir.path().display());
        let db = Database::connect(&url, 1, Duration::from_secs(10))
            .await
            .unwrap();
        // Busy: 40 tasks take the one connection in turn, 50 ms each.
        let busy: Vec<_> = (0..40)
            .map(|_| {
                let db = db.clone();
                tokio::spawn(async move {
                    let mut conn = db.pool().acquire().await.unwrap();
                    sqlx::query("SELECT 1").execute(&mut *conn).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let ping = tokio::time::timeout(Duration::from_millis(500), db.ping()).await;
        assert_eq!(ping, Ok(true), "busy, its queries finishing: it answers");
        for task in busy {
            task.await.unwrap();
        }
        // Stuck: the one connection held, nothing lent for over a second.
        let held = db.pool().acquire().await.unwrap();
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        let ping = tokio::time::timeout(Duration::from_millis(500), db.ping()).await;
        assert!(ping.is_err(), "stuck: the ping waits ({ping:?})");
        drop(held);
        assert!(db.ping().await);
    }

    #[tokio::test]
    async fn sqlite_writers_take_turns_and_many_writes_all_land_quickly() {
        let dir = std::env::temp_dir().join(format!("shoal-turn-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let url = format!("sqlite://{}/t.db?mode=rwc", dir.display());
        let db = Database::connect(&url, 8, Duration::from_secs(5))
            .await
            .unwrap();
        sqlx::query("CREATE TABLE IF NOT EXISTS t (n BIGINT NOT NULL)")
            .execute(db.pool())
            .await
            .unwrap();
        // While the writer is lent, the next waits.
        let held = db.write().await.unwrap();
        let waiting = tokio::time::timeout(Duration::from_millis(50), db.write()).await;
        assert!(waiting.is_err(), "a second writer waits for the first");
        drop(held);
        // 64 writers at once, each a read-then-write transaction (the
        // shape that deadlocks into SQLITE_BUSY sleeps without turns).
        let started = std::time::Instant::now();
        let writers = (0..64).map(|i| {
            let db = db.clone();
            tokio::spawn(async move {
                let mut writer = db.write().await.unwrap();
                let mut tx = writer.begin().await.unwrap();
                let (_,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM t")
                    .fetch_one(&mut *tx)
                    .await
                    .unwrap();
                sqlx::query("INSERT INTO t (n) VALUES ($1)")
                    .bind(i as i64)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
            })
        });
        for w in writers.collect::<Vec<_>>() {
            w.await.unwrap();
        }
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM t")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(n, 64);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    async fn direct_db(name: &str) -> (Database, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("shoal-direct-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("sqlite://{}/d.db?mode=rwc", dir.display());
        let db = Database::connect(&url, 4, Duration::from_secs(5))
            .await
            .unwrap();
        sqlx::query("CREATE TABLE d (n BIGINT NOT NULL UNIQUE)")
            .execute(db.pool())
            .await
            .unwrap();
        (db, dir)
    }

    async fn count(db: &Database) -> i64 {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM d")
            .fetch_one(db.pool())
            .await
            .unwrap();
        n
    }

    fn insert(conn: &rusqlite::Connection, n: i64) -> Result<usize, DbError> {
        Ok(conn.execute("INSERT INTO d (n) VALUES ($1)", [n])?)
    }

    /// `sqlite_write` commits what `f` wrote when it says so, and nothing
    /// of it when it says roll back, fails, or panics; the pool's
    /// connections see the commits at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_write_commits_or_rolls_back_whole() {
        let (db, dir) = direct_db("whole").await;
        let n = db
            .sqlite_write(|c| {
                insert(c, 1)?;
                insert(c, 2)?;
                Ok::<_, DbError>(Finish::Commit(2))
            })
            .await
            .unwrap();
        assert_eq!((n, count(&db).await), (2, 2));
        db.sqlite_write(|c| {
            insert(c, 3)?;
            Ok::<_, DbError>(Finish::Rollback(()))
        })
        .await
        .unwrap();
        assert_eq!(count(&db).await, 2, "rolled back");
        // The second insert breaks the unique key: the first goes too.
        let failed = db
            .sqlite_write(|c| {
                insert(c, 4)?;
                insert(c, 1)?;
                Ok::<_, DbError>(Finish::Commit(()))
            })
            .await;
        assert!(matches!(failed, Err(DbError::Sqlite(_))), "{failed:?}");
        assert_eq!(count(&db).await, 2, "a failed transaction leaves nothing");
        // A panic inside `f` leaves the transaction open on the connection;
        // the next write rolls it back before it begins.
        let db2 = db.clone();
        let panicked = tokio::spawn(async move {
            db2.sqlite_write(|c| -> Result<Finish<()>, DbError> {
                insert(c, 5).unwrap();
                panic!("on purpose");
            })
            .await
        })
        .await;
        assert!(panicked.is_err());
        db.sqlite_write(|c| {
            insert(c, 6)?;
            Ok::<_, DbError>(Finish::Commit(()))
        })
        .await
        .unwrap();
        let (ns,): (String,) =
            sqlx::query_as("SELECT group_concat(n) FROM (SELECT n FROM d ORDER BY n)")
                .fetch_one(db.pool())
                .await
                .unwrap();
        assert_eq!(ns, "1,2,6", "5 went with the panic");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Transactions queued together commit in one batch, and each still
    /// ends on its own: in one batch (the lock held while they queue),
    /// the ones that commit land, and one that rolls back, one that fails
    /// on a unique key after writing and one that panics leave nothing.
    /// A caller that stops waiting before its batch takes its
    /// transaction back: it never runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite_write_batches_keep_each_transaction_whole() {
        let (db, dir) = direct_db("batch").await;
        db.sqlite_write(|c| {
            insert(c, 1000)?;
            Ok::<_, DbError>(Finish::Commit(()))
        })
        .await
        .unwrap();
        let held = db.write().await.unwrap();
        let mut tasks = Vec::new();
        for n in 0..40i64 {
            let db = db.clone();
            tasks.push(tokio::spawn(async move {
                db.sqlite_write(move |c| {
                    insert(c, n)?;
                    insert(c, n + 100)?;
                    match n {
                        7 => Ok(Finish::Rollback(n)),
                        8 => {
                            insert(c, 1000)?; // taken: fails, after two inserts
                            Ok(Finish::Commit(n))
                        }
                        9 => panic!("on purpose"),
                        _ => Ok::<_, DbError>(Finish::Commit(n)),
                    }
                })
                .await
            }));
        }
        // One more that gives up while queued.
        let db2 = db.clone();
        let gave_up = tokio::spawn(async move {
            db2.sqlite_write(|c| {
                insert(c, 5000)?;
                Ok::<_, DbError>(Finish::Commit(()))
            })
            .await
        });
        // All 41 queued (not a timing guess), then one gives up.
        let queued = || direct::lock(&db.direct_queue).pending_len();
        let deadline = Instant::now() + Duration::from_secs(10);
        while queued() < 41 {
            assert!(Instant::now() < deadline, "only {} queued", queued());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let batches = direct::lock(&db.direct_queue).batches;
        gave_up.abort();
        let _ = gave_up.await;
        assert_eq!(
            queued(),
            40,
            "the one that gave up took its transaction back"
        );
        drop(held);
        for (n, task) in tasks.into_iter().enumerate() {
            match (n, task.await) {
                (9, Err(join)) => assert!(join.is_panic(), "the panic comes back to its caller"),
                (8, Ok(Err(DbError::Sqlite(_)))) => {}
                (n, Ok(Ok(answer))) => assert_eq!(answer, n as i64),
                (n, other) => panic!("transaction {n}: {other:?}"),
            }
        }
        assert_eq!(
            direct::lock(&db.direct_queue).batches,
            batches + 1,
            "the 40 queued together commit in one batch"
        );
        let (rows, sum): (i64, i64) = sqlx::query_as("SELECT COUNT(*), SUM(n) FROM d")
            .fetch_one(db.pool())
            .await
            .unwrap();
        let kept: Vec<i64> = (0..40).filter(|n| ![7, 8, 9].contains(n)).collect();
        assert_eq!(
            rows,
            1 + 2 * kept.len() as i64,
            "two rows per committed transaction"
        );
        assert_eq!(sum, 1000 + kept.iter().map(|n| 2 * n + 100).sum::<i64>());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// While another connection (another process, in production) holds
    /// SQLite's write lock, `sqlite_write` waits for it off the runtime's
    /// threads and then writes; `write()` and `sqlite_write` take turns.
    #[tokio::test(flavor = "current_thread")]
    async fn sqlite_write_waits_for_another_writer_off_the_runtime() {
        let (db, dir) = direct_db("busy").await;
        let other = rusqlite::Connection::open(dir.join("d.db")).unwrap();
        other
            .execute_batch("BEGIN IMMEDIATE; INSERT INTO d (n) VALUES (100);")
            .unwrap();
        let db2 = db.clone();
        let writing = tokio::spawn(async move {
            db2.sqlite_write(|c| {
                insert(c, 1)?;
                Ok::<_, DbError>(Finish::Commit(()))
            })
            .await
        });
        // The runtime has one thread: if the write waited on it, this
        // timer could not fire until the write was done.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!writing.is_finished(), "waits while the lock is held");
        other.execute_batch("COMMIT").unwrap();
        writing.await.unwrap().unwrap();
        assert_eq!(count(&db).await, 2);
        // Turns with `write()`: a held writer keeps `sqlite_write` waiting.
        let held = db.write().await.unwrap();
        let db3 = db.clone();
        let turn = tokio::spawn(async move {
            db3.sqlite_write(|c| {
                insert(c, 2)?;
                Ok::<_, DbError>(Finish::Commit(()))
            })
            .await
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!turn.is_finished(), "waits for the lent writer");
        drop(held);
        turn.await.unwrap().unwrap();
        assert_eq!(count(&db).await, 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Writers cancelled at every await point (a client that hangs up
    /// mid-request) leave the writing connection fit for the next: no
    /// transaction left open, no stopped worker, no write half-done.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cancelled_writers_leave_the_writing_connection_usable() {
        let dir = std::env::temp_dir().join(format!("shoal-cancel-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let url = format!("sqlite://{}/c.db?mode=rwc", dir.display());
        let db = Database::connect(&url, 4, Duration::from_secs(5))
            .await
            .unwrap();
        sqlx::query("CREATE TABLE IF NOT EXISTS c (a BIGINT NOT NULL, b BIGINT NOT NULL)")
            .execute(db.pool())
            .await
            .unwrap();
        let mut cancelled = 0;
        for i in 0..400i64 {
            let db2 = db.clone();
            let work = tokio::spawn(async move {
                let mut writer = db2.write().await.unwrap();
                let mut tx = writer.begin().await.unwrap();
                for column in ["a", "b"] {
                    sqlx::query(&format!(
                        "INSERT INTO c ({column}, {}) VALUES ($1, 0)",
                        if column == "a" { "b" } else { "a" }
                    ))
                    .bind(i)
                    .execute(&mut *tx)
                    .await
                    .unwrap();
                }
                tx.commit().await.unwrap();
            });
            // Cut it off anywhere from before its first await to after its
            // commit: after a few yields (its first awaits) or a sleep
            // (tokio's timer rounds that up to a millisecond, by which a
            // fast machine has often committed, too few cut off).
            if i % 2 == 0 {
                for _ in 0..rand::random_range(0..64) {
                    tokio::task::yield_now().await;
                }
            } else {
                tokio::time::sleep(Duration::from_micros(rand::random_range(0..400))).await;
            }
            work.abort();
            match work.await {
                Ok(()) => {}
                Err(e) if e.is_cancelled() => cancelled += 1,
                Err(e) => panic!("writer {i} failed after earlier ones were cut off: {e}"),
            }
        }
        assert!(
            cancelled > 10,
            "only {cancelled} of 400 writers were cut off"
        );
        // Every transaction committed whole or not at all: rows come in pairs.
        let mut writer = db.write().await.unwrap();
        assert!(!writer.is_in_transaction());
        let mut tx = writer.begin().await.unwrap();
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM c")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(n % 2, 0, "{n} rows: a transaction was cut in half");
        sqlx::query("INSERT INTO c (a, b) VALUES (-1, -1)")
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        drop(writer);
        let (after,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM c")
            .fetch_one(db.pool())
            .await
            .unwrap();
        assert_eq!(after, n + 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The writer is waited for as long as a pooled connection, no longer.
    #[tokio::test]
    async fn waiting_for_the_writer_times_out_like_a_pool_checkout() {
        let dir = std::env::temp_dir().join(format!("shoal-wtimeout-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let url = format!("sqlite://{}/w.db?mode=rwc", dir.display());
        let db = Database::connect(&url, 2, Duration::from_millis(200))
            .await
            .unwrap();
        let held = db.write().await.unwrap();
        let started = Instant::now();
        let second = db.write().await;
        assert!(
            matches!(second, Err(sqlx::Error::PoolTimedOut)),
            "{second:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(held);
        assert!(db.write().await.is_ok(), "free again once let go");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
