//! The SQL database: one `sqlx::AnyPool` over SQLite (WAL mode, shared by
//! every process on the machine) or PostgreSQL, and a small migrator that
//! applies each component's numbered migrations once, under a lock, so
//! several instances starting together never race.
//!
//! SQL written against `Database` must run on both engines: `$1` style
//! parameters, BIGINT millisecond timestamps, TEXT ids and JSON, and
//! `ON CONFLICT` upserts. Branch on [`Database::kind`] where they differ.

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};
use std::str::FromStr;
use std::time::Duration;

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
    /// One write transaction at a time in this process on SQLite
    /// ([`Database::write_turn`]).
    writer: std::sync::Arc<tokio::sync::Mutex<()>>,
}

impl Database {
    /// Connects to `url` (`sqlite://path?mode=rwc` or `postgres://...`).
    /// SQLite connections get WAL, a 5 s busy timeout and foreign keys.
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
            .after_connect(move |conn, _meta| {
                Box::pin(async move {
                    if kind == DatabaseKind::Sqlite {
                        conn.execute("PRAGMA journal_mode = WAL").await?;
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                        conn.execute("PRAGMA busy_timeout = 10000").await?;
                        conn.execute("PRAGMA foreign_keys = ON").await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(DbError::Connect)?;
        Ok(Database {
            pool,
            kind,
            writer: std::sync::Arc::default(),
        })
    }

    /// On SQLite, waits for this process's turn to write and holds it
    /// until the guard drops: take it before `begin()` of a transaction
    /// that writes and keep it past `commit()`. SQLite has one writer at a
    /// time; connections that race for it instead get SQLITE_BUSY and
    /// sleep in its busy handler, whose growing sleeps made the tail
    /// latency of writes under load (bench/README.md, "Profile of the
    /// service path"). Waiting in line here costs nothing while idle. On PostgreSQL,
    /// which has row locks, it returns at once with `None`.
    pub async fn write_turn(&self) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        match self.kind {
            DatabaseKind::Sqlite => Some(std::sync::Arc::clone(&self.writer).lock_owned().await),
            DatabaseKind::Postgres => None,
        }
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
        self.pool.close().await;
    }
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
        // While a turn is held, the next waits.
        let held = db.write_turn().await.expect("SQLite has turns");
        let waiting = tokio::time::timeout(Duration::from_millis(50), db.write_turn()).await;
        assert!(waiting.is_err(), "a second writer waits for the first");
        drop(held);
        // 64 writers at once, each a read-then-write transaction (the
        // shape that deadlocks into SQLITE_BUSY sleeps without turns).
        let started = std::time::Instant::now();
        let writers = (0..64).map(|i| {
            let db = db.clone();
            tokio::spawn(async move {
                let turn = db.write_turn().await;
                let mut tx = db.pool().begin().await.unwrap();
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
                drop(turn);
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
}
