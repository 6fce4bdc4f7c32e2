//! Server-side sessions behind the `SessionStore` trait, with an SQL backend
//! (the main database: SQLite embedded, shared by every process on the
//! machine, or PostgreSQL) and a Redis backend.
//!
//! The token a client holds is 32 random bytes (base64url); stores keep only
//! its SHA-256, so a copy of the store does not hand out live sessions.
//! Expiry slides: each use pushes the idle deadline forward, never past the
//! absolute deadline set at login.

use crate::db::{Database, DbError, Migration};
use async_trait::async_trait;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The client's token (only known at creation and when presented).
    pub token: String,
    pub user_id: String,
    pub created_at: i64,
    /// Idle deadline, ms since epoch.
    pub expires_at: i64,
    /// Absolute deadline, ms since epoch.
    pub absolute_expires_at: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("session store (SQL): {0}")]
    Sql(#[from] sqlx::Error),
    #[error("session store (Redis): {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Db(#[from] DbError),
    /// One read's failure, shared by every caller that waited on it (an
    /// in-process cache in front of the store joins concurrent reads of
    /// one session).
    #[error(transparent)]
    Shared(std::sync::Arc<SessionError>),
}

impl SessionError {
    /// No store connection came free in time: the instance is overloaded,
    /// not broken.
    pub fn is_pool_timeout(&self) -> bool {
        match self {
            SessionError::Sql(sqlx::Error::PoolTimedOut)
            | SessionError::Db(DbError::Sql(sqlx::Error::PoolTimedOut)) => true,
            SessionError::Shared(e) => e.is_pool_timeout(),
            _ => false,
        }
    }
}

/// Lifetimes a store applies to a new session.
#[derive(Debug, Clone, Copy)]
pub struct SessionLifetimes {
    pub idle: Duration,
    pub absolute: Duration,
}

#[async_trait]
pub trait SessionStore: Send + Sync + std::fmt::Debug {
    /// Creates a session for `user_id` and returns it with its new token.
    async fn create(&self, user_id: &str, life: SessionLifetimes) -> Result<Session, SessionError>;
    /// Returns the live session for `token` and slides its idle deadline;
    /// `None` when unknown or expired.
    async fn touch(
        &self,
        token: &str,
        life: SessionLifetimes,
    ) -> Result<Option<Session>, SessionError>;
    /// Ends one session. Unknown tokens are not an error.
    async fn delete(&self, token: &str) -> Result<(), SessionError>;
    /// Ends every session of a user ("log out everywhere"); returns how many.
    async fn delete_user(&self, user_id: &str) -> Result<u64, SessionError>;
    /// Removes expired sessions (stores without native expiry need it).
    async fn prune_expired(&self) -> Result<u64, SessionError>;
    /// True when the store answers.
    async fn ping(&self) -> bool;
}

/// A new random token: 32 bytes, base64url without padding (43 chars).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The stored key of a token.
pub fn token_hash(token: &str) -> String {
    shoal_core::ids::hex(&Sha256::digest(token.as_bytes()))
}

/// Tokens that cannot be ours are rejected before any I/O.
fn plausible(token: &str) -> bool {
    token.len() == 43
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Writes happen only when the deadline moved by a tenth of the idle time
/// (at most a minute), so a busy session is not written on every request.
fn slide_threshold_ms(idle: Duration) -> i64 {
    (idle.as_millis() as i64 / 10).min(60_000)
}

fn ms(d: Duration) -> i64 {
    d.as_millis() as i64
}

// ---------------------------------------------------------------- SQL

const SQL_MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "sessions",
    sql: "CREATE TABLE IF NOT EXISTS sessions (
        token_hash TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        expires_at BIGINT NOT NULL,
        absolute_expires_at BIGINT NOT NULL);
    CREATE INDEX IF NOT EXISTS sessions_user ON sessions (user_id);
    CREATE INDEX IF NOT EXISTS sessions_expiry ON sessions (expires_at);",
}];

/// Sessions in the main SQL database.
#[derive(Debug, Clone)]
pub struct SqlSessionStore {
    db: Database,
}

impl SqlSessionStore {
    /// Wraps `db`, creating the sessions table if needed.
    pub async fn new(db: Database) -> Result<Self, SessionError> {
        db.migrate("sessions", SQL_MIGRATIONS).await?;
        Ok(SqlSessionStore { db })
    }
}

#[async_trait]
impl SessionStore for SqlSessionStore {
    async fn create(&self, user_id: &str, life: SessionLifetimes) -> Result<Session, SessionError> {
        let now = crate::now_millis();
        let absolute = now + ms(life.absolute);
        let session = Session {
            token: new_token(),
            user_id: user_id.to_string(),
            created_at: now,
            expires_at: (now + ms(life.idle)).min(absolute),
            absolute_expires_at: absolute,
        };
        sqlx::query(
            "INSERT INTO sessions (token_hash, user_id, created_at, expires_at, absolute_expires_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(token_hash(&session.token))
        .bind(&session.user_id)
        .bind(session.created_at)
        .bind(session.expires_at)
        .bind(session.absolute_expires_at)
        .execute(self.db.pool())
        .await?;
        Ok(session)
    }

    async fn touch(
        &self,
        token: &str,
        life: SessionLifetimes,
    ) -> Result<Option<Session>, SessionError> {
        if !plausible(token) {
            return Ok(None);
        }
        let now = crate::now_millis();
        let hash = token_hash(token);
        let row: Option<(String, i64, i64, i64)> = sqlx::query_as(
            "SELECT user_id, created_at, expires_at, absolute_expires_at
             FROM sessions WHERE token_hash = $1 AND expires_at > $2",
        )
        .bind(&hash)
        .bind(now)
        .fetch_optional(self.db.pool())
        .await?;
        let Some((user_id, created_at, expires_at, absolute)) = row else {
            return Ok(None);
        };
        let wanted = (now + ms(life.idle)).min(absolute);
        let mut expires = expires_at;
        if wanted - expires_at > slide_threshold_ms(life.idle) {
            sqlx::query("UPDATE sessions SET expires_at = $1 WHERE token_hash = $2")
                .bind(wanted)
                .bind(&hash)
                .execute(self.db.pool())
                .await?;
            expires = wanted;
        }
        Ok(Some(Session {
            token: token.to_string(),
            user_id,
            created_at,
            expires_at: expires,
            absolute_expires_at: absolute,
        }))
    }

    async fn delete(&self, token: &str) -> Result<(), SessionError> {
        sqlx::query("DELETE FROM sessions WHERE token_hash = $1")
            .bind(token_hash(token))
            .execute(self.db.pool())
            .await?;
        Ok(())
    }

    async fn delete_user(&self, user_id: &str) -> Result<u64, SessionError> {
        let done = sqlx::query("DELETE FROM sessions WHERE user_id = $1")
            .bind(user_id)
            .execute(self.db.pool())
            .await?;
        Ok(done.rows_affected())
    }

    async fn prune_expired(&self) -> Result<u64, SessionError> {
        let done = sqlx::query("DELETE FROM sessions WHERE expires_at <= $1")
            .bind(crate::now_millis())
            .execute(self.db.pool())
            .await?;
        Ok(done.rows_affected())
    }

    async fn ping(&self) -> bool {
        self.db.ping().await
    }
}

// ---------------------------------------------------------------- Redis

/// Sessions in Redis: a hash per session with a native expiry, and a set
/// per user for "log out everywhere".
#[derive(Clone)]
pub struct RedisSessionStore {
    conn: redis::aio::ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for RedisSessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSessionStore")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl RedisSessionStore {
    /// Connects to `url`; every key starts with `prefix:`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, SessionError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2);
        let conn = redis::aio::ConnectionManager::new_with_config(client, config).await?;
        Ok(RedisSessionStore {
            conn,
            prefix: prefix.to_string(),
        })
    }

    fn session_key(&self, hash: &str) -> String {
        format!("{}:session:{hash}", self.prefix)
    }

    fn user_key(&self, user_id: &str) -> String {
        format!("{}:user-sessions:{user_id}", self.prefix)
    }
}

#[async_trait]
impl SessionStore for RedisSessionStore {
    async fn create(&self, user_id: &str, life: SessionLifetimes) -> Result<Session, SessionError> {
        let now = crate::now_millis();
        let absolute = now + ms(life.absolute);
        let session = Session {
            token: new_token(),
            user_id: user_id.to_string(),
            created_at: now,
            expires_at: (now + ms(life.idle)).min(absolute),
            absolute_expires_at: absolute,
        };
        let hash = token_hash(&session.token);
        let key = self.session_key(&hash);
        let user_key = self.user_key(user_id);
        let mut conn = self.conn.clone();
        redis::pipe()
            .atomic()
            .hset_multiple(
                &key,
                &[
                    ("user_id", session.user_id.clone()),
                    ("created_at", session.created_at.to_string()),
                    ("expires_at", session.expires_at.to_string()),
                    ("absolute", absolute.to_string()),
                ],
            )
            .ignore()
            .cmd("PEXPIREAT")
            .arg(&key)
            .arg(session.expires_at)
            .ignore()
            .sadd(&user_key, &hash)
            .ignore()
            .cmd("PEXPIREAT")
            .arg(&user_key)
            .arg(absolute)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(session)
    }

    async fn touch(
        &self,
        token: &str,
        life: SessionLifetimes,
    ) -> Result<Option<Session>, SessionError> {
        if !plausible(token) {
            return Ok(None);
        }
        let now = crate::now_millis();
        let key = self.session_key(&token_hash(token));
        let mut conn = self.conn.clone();
        let fields: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&key)
            .query_async(&mut conn)
            .await?;
        let num = |k: &str| fields.get(k).and_then(|v| v.parse::<i64>().ok());
        let (Some(user_id), Some(created_at), Some(expires_at), Some(absolute)) = (
            fields.get("user_id").cloned(),
            num("created_at"),
            num("expires_at"),
            num("absolute"),
        ) else {
            return Ok(None);
        };
        if expires_at <= now {
            return Ok(None);
        }
        let wanted = (now + ms(life.idle)).min(absolute);
        let mut expires = expires_at;
        if wanted - expires_at > slide_threshold_ms(life.idle) {
            // XX-like: only refresh a key that still exists.
            let refreshed: i64 = redis::cmd("PEXPIREAT")
                .arg(&key)
                .arg(wanted)
                .query_async(&mut conn)
                .await?;
            if refreshed == 0 {
                return Ok(None);
            }
            redis::cmd("HSET")
                .arg(&key)
                .arg("expires_at")
                .arg(wanted)
                .query_async::<()>(&mut conn)
                .await?;
            expires = wanted;
        }
        Ok(Some(Session {
            token: token.to_string(),
            user_id,
            created_at,
            expires_at: expires,
            absolute_expires_at: absolute,
        }))
    }

    async fn delete(&self, token: &str) -> Result<(), SessionError> {
        let hash = token_hash(token);
        let key = self.session_key(&hash);
        let mut conn = self.conn.clone();
        let user_id: Option<String> = redis::cmd("HGET")
            .arg(&key)
            .arg("user_id")
            .query_async(&mut conn)
            .await?;
        let mut pipe = redis::pipe();
        pipe.atomic().del(&key).ignore();
        if let Some(user_id) = user_id {
            pipe.srem(self.user_key(&user_id), &hash).ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    async fn delete_user(&self, user_id: &str) -> Result<u64, SessionError> {
        let user_key = self.user_key(user_id);
        let mut conn = self.conn.clone();
        let hashes: Vec<String> = redis::cmd("SMEMBERS")
            .arg(&user_key)
            .query_async(&mut conn)
            .await?;
        let mut removed = 0u64;
        for chunk in hashes.chunks(500) {
            let keys: Vec<String> = chunk.iter().map(|h| self.session_key(h)).collect();
            let n: u64 = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await?;
            removed += n;
        }
        redis::cmd("DEL")
            .arg(&user_key)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(removed)
    }

    async fn prune_expired(&self) -> Result<u64, SessionError> {
        // Redis expires session keys itself.
        Ok(0)
    }

    async fn ping(&self) -> bool {
        let mut conn = self.conn.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok()
    }
}
