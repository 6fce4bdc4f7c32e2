//! The SQL database: one `sqlx::AnyPool` over SQLite (WAL mode, shared by
//! every process on the machine) or PostgreSQL, and a small migrator that
//! applies each component's numbered migrations once, under a lock, so
//! several instances starting together never race.
//!
//! SQL written against `Database` must run on both engines: `$1` style
//! parameters, BIGINT millisecond timestamps, TEXT ids and JSON, and
//! `ON CONFLICT` upserts. Branch on [`Database::kind`] where they differ.

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::pool::PoolConnection;
use sqlx::{Any, AnyConnection, AnyPool, Connection, Executor, Transaction};
use std::str::FromStr;
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
}

/// The SQLite writing connection and when it was last lent.
#[derive(Debug, Default)]
struct WriterSlot {
    conn: Option<AnyConnection>,
    last_used: Option<Instant>,
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
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= IDLE_PING_AFTER {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if kind == DatabaseKind::Sqlite {
                        sqlite_pragmas(conn).await?;
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

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn kind(&self) -> DatabaseKind {
        self.kind
    }

    /// True when a trivial query succeeds: used by `/readyz`.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Applies `component`'s migrations that have not run yet, in version
    /// order, each in its own transaction, holding a lock so concurrent
    /// starters wait instead of racing. Idempotent.
    pub async fn migrate(&self, component: &str, migrations: &[Migration]) -> Result<(), DbError> {
        let mut conn = self.pool.acquire().await?;
        conn.execute(
            "CREATE TABLE IF NOT EXISTS shoal_migrations (
                component TEXT NOT NULL,
                version BIGINT NOT NULL,
                name TEXT NOT NULL,
                applied_at BIGINT NOT NULL,
                PRIMARY KEY (component, version))",
        )
        .await?;
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
    conn.execute("PRAGMA busy_timeout = 10000").await?;
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
            // commit.
            let after = Duration::from_micros(rand::random_range(0..400));
            tokio::time::sleep(after).await;
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
