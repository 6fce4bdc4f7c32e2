//! Storage behind traits, each with an embedded backend and a distributed
//! one: the SQL database (SQLite or PostgreSQL through one pool type) with
//! per-component migrations, and session stores (SQL, Redis). Each trait has
//! a conformance suite in `conformance` that every backend must pass.
//! This crate knows its engines and nothing of HTTP or of services.

pub mod blobs;
pub mod broadcast;
pub mod conformance;
pub mod db;
mod direct;
pub mod sessions;

pub use blobs::{BlobError, BlobRead, BlobStore, PutResult, S3Config};
pub use broadcast::{
    Broadcast, BroadcastError, RecvError, RedisBroadcast, SqlBroadcast, SqlBroadcastOptions,
    Subscription,
};
pub use db::{Database, DatabaseKind, DbError, Finish, Migration};
pub use rusqlite;
pub use sessions::{
    RedisSessionStore, Session, SessionError, SessionLifetimes, SessionStore, SqlSessionStore,
};

/// Milliseconds since the Unix epoch: the one time representation in every
/// table, so SQLite and PostgreSQL store and compare it the same way.
pub fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
