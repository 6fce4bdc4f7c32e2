//! A publish/subscribe bus between instances behind the `Broadcast` trait:
//! `SqlBroadcast` (a table polled with a sequence cursor; SQLite shared by
//! the processes of one machine, or PostgreSQL) and `RedisBroadcast`
//! (Redis pub/sub). Used for cache and session invalidation, later for
//! realtime notifications.
//!
//! Delivery is at most once and best effort: every subscriber of a channel
//! on every handle (including the publisher's own) receives each message
//! published after it subscribed, in the order one publisher published
//! them. When a subscriber may have missed messages (it lagged, the Redis
//! connection dropped, rows were pruned before it read them) it is told so
//! with [`RecvError::Missed`], so a cache can drop everything instead of
//! serving stale data.

use crate::db::{Database, DatabaseKind, Migration};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc, oneshot, Notify};

/// Messages buffered per channel and handle before a slow subscriber is
/// told it missed some.
const CHANNEL_CAPACITY: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum BroadcastError {
    #[error("broadcast bus (SQL): {0}")]
    Sql(#[from] sqlx::Error),
    #[error("broadcast bus (Redis): {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    #[error("broadcast bus: {0}")]
    Unavailable(&'static str),
}

/// Why `Subscription::recv` returned no message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RecvError {
    /// Messages may have been lost; the subscription still works.
    #[error("some broadcast messages may have been missed")]
    Missed,
    /// The bus handle is gone; no message will come again.
    #[error("the broadcast bus was closed")]
    Closed,
}

#[derive(Debug, Clone)]
enum Event {
    Message(Bytes),
    Missed,
}

/// Messages of one channel on one handle.
#[derive(Debug)]
pub struct Subscription {
    channel: String,
    rx: broadcast::Receiver<Event>,
}

impl Subscription {
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The next message. Cancel safe: a message is never half-received.
    pub async fn recv(&mut self) -> Result<Bytes, RecvError> {
        match self.rx.recv().await {
            Ok(Event::Message(b)) => Ok(b),
            Ok(Event::Missed) | Err(broadcast::error::RecvError::Lagged(_)) => {
                Err(RecvError::Missed)
            }
            Err(broadcast::error::RecvError::Closed) => Err(RecvError::Closed),
        }
    }
}

#[async_trait]
pub trait Broadcast: Send + Sync + std::fmt::Debug {
    /// Sends `payload` to every subscriber of `channel` on every handle.
    /// Returns once the backend has accepted it.
    async fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), BroadcastError>;
    /// Subscribes to `channel`. Messages published after this returns are
    /// delivered (when the backend is reachable; otherwise the
    /// subscription gets `Missed` once it reconnects).
    async fn subscribe(&self, channel: &str) -> Result<Subscription, BroadcastError>;
    /// Removes delivered history older than the retention; returns how
    /// many entries went (0 for backends without history).
    async fn prune(&self) -> Result<u64, BroadcastError>;
    /// Whether the backend answers now (for readiness). Bound it with a
    /// timeout: an unreachable server may take its connect timeout.
    async fn ping(&self) -> bool;
}

/// Local fan-out: one `tokio::sync::broadcast` sender per channel.
#[derive(Debug, Default)]
struct Channels {
    senders: Mutex<HashMap<String, broadcast::Sender<Event>>>,
}

impl Channels {
    fn subscribe(&self, channel: &str) -> (Subscription, bool) {
        let mut map = self.senders.lock().unwrap();
        let created = !map.contains_key(channel);
        let tx = map
            .entry(channel.to_string())
            .or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0);
        (
            Subscription {
                channel: channel.to_string(),
                rx: tx.subscribe(),
            },
            created,
        )
    }

    fn deliver(&self, channel: &str, payload: Bytes) {
        let map = self.senders.lock().unwrap();
        if let Some(tx) = map.get(channel) {
            let _ = tx.send(Event::Message(payload));
        }
    }

    fn missed_all(&self) {
        let map = self.senders.lock().unwrap();
        for tx in map.values() {
            let _ = tx.send(Event::Missed);
        }
    }

    fn names(&self) -> Vec<String> {
        self.senders.lock().unwrap().keys().cloned().collect()
    }
}

// ---------------------------------------------------------------- SQL

const SQLITE_MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "broadcast log",
    sql: "CREATE TABLE IF NOT EXISTS shoal_broadcast (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        channel TEXT NOT NULL,
        payload BLOB NOT NULL,
        created_at BIGINT NOT NULL);
    CREATE INDEX IF NOT EXISTS shoal_broadcast_created ON shoal_broadcast (created_at);",
}];

const POSTGRES_MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "broadcast log",
    sql: "CREATE TABLE IF NOT EXISTS shoal_broadcast (
        seq BIGSERIAL PRIMARY KEY,
        channel TEXT NOT NULL,
        payload BYTEA NOT NULL,
        created_at BIGINT NOT NULL);
    CREATE INDEX IF NOT EXISTS shoal_broadcast_created ON shoal_broadcast (created_at);",
}];

/// Advisory lock key that orders publishers on PostgreSQL.
const PG_PUBLISH_LOCK: i64 = 7_426_002;

/// Options of the SQL bus.
#[derive(Debug, Clone, Copy)]
pub struct SqlBroadcastOptions {
    /// How often the table is read for new rows.
    pub poll_interval: Duration,
    /// How long rows are kept (a handle that stops polling for longer may
    /// miss messages and is told so).
    pub retention: Duration,
}

impl Default for SqlBroadcastOptions {
    fn default() -> Self {
        SqlBroadcastOptions {
            poll_interval: Duration::from_millis(50),
            retention: Duration::from_secs(60),
        }
    }
}

/// The bus as a table in the main database: publishing inserts a row;
/// each handle polls rows past its cursor and fans them out locally.
///
/// Sequence numbers are assigned in commit order (SQLite has one writer;
/// on PostgreSQL publishers take a transaction-scoped advisory lock), so a
/// cursor never skips a row that commits late.
#[derive(Debug, Clone)]
pub struct SqlBroadcast {
    shared: Arc<SqlShared>,
}

#[derive(Debug)]
struct SqlShared {
    db: Database,
    channels: Channels,
    wake: Arc<Notify>,
    options: SqlBroadcastOptions,
}

impl SqlBroadcast {
    /// Creates the table if needed, starts this handle's poller at the
    /// current end of the log, and returns the handle. The poller stops
    /// when the last clone of the handle is dropped.
    pub async fn new(db: Database, options: SqlBroadcastOptions) -> Result<Self, BroadcastError> {
        let migrations = match db.kind() {
            DatabaseKind::Sqlite => SQLITE_MIGRATIONS,
            DatabaseKind::Postgres => POSTGRES_MIGRATIONS,
        };
        db.migrate("broadcast", migrations).await?;
        let (cursor,): (i64,) = sqlx::query_as("SELECT COALESCE(MAX(seq), 0) FROM shoal_broadcast")
            .fetch_one(db.pool())
            .await?;
        let shared = Arc::new(SqlShared {
            db,
            channels: Channels::default(),
            wake: Arc::new(Notify::new()),
            options,
        });
        tokio::spawn(sql_poller(Arc::downgrade(&shared), cursor));
        Ok(SqlBroadcast { shared })
    }
}

async fn sql_poller(weak: Weak<SqlShared>, mut cursor: i64) {
    let mut last_ok = Instant::now();
    let mut last_prune = Instant::now();
    loop {
        let Some(shared) = weak.upgrade() else { return };
        let interval = shared.options.poll_interval;
        let rows: Result<Vec<(i64, String, Vec<u8>)>, sqlx::Error> = sqlx::query_as(
            "SELECT seq, channel, payload FROM shoal_broadcast WHERE seq > $1 ORDER BY seq LIMIT 1000",
        )
        .bind(cursor)
        .fetch_all(shared.db.pool())
        .await;
        let mut full = false;
        match rows {
            Ok(rows) => {
                if last_ok.elapsed() > shared.options.retention / 2 {
                    // Rows may have been pruned while we could not read.
                    shared.channels.missed_all();
                }
                last_ok = Instant::now();
                full = rows.len() == 1000;
                for (seq, channel, payload) in rows {
                    cursor = seq;
                    shared.channels.deliver(&channel, Bytes::from(payload));
                }
            }
            Err(e) => {
                metrics::counter!("shoal_broadcast_errors_total", "backend" => "sql").increment(1);
                tracing::warn!(error = %e, "broadcast poll failed");
            }
        }
        if last_prune.elapsed() > Duration::from_secs(5) {
            last_prune = Instant::now();
            if let Err(e) = sql_prune(&shared).await {
                tracing::warn!(error = %e, "broadcast prune failed");
            }
        }
        if full {
            continue;
        }
        let wake = shared.wake.clone();
        drop(shared);
        // Woken early when this handle publishes; else poll on schedule.
        let _ = tokio::time::timeout(interval, wake.notified()).await;
    }
}

async fn sql_prune(shared: &SqlShared) -> Result<u64, sqlx::Error> {
    let before = crate::now_millis() - shared.options.retention.as_millis() as i64;
    let done = sqlx::query("DELETE FROM shoal_broadcast WHERE created_at < $1")
        .bind(before)
        .execute(shared.db.pool())
        .await?;
    Ok(done.rows_affected())
}

#[async_trait]
impl Broadcast for SqlBroadcast {
    async fn ping(&self) -> bool {
        self.shared.db.ping().await
    }

    async fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), BroadcastError> {
        let db = &self.shared.db;
        let insert =
            "INSERT INTO shoal_broadcast (channel, payload, created_at) VALUES ($1, $2, $3)";
        match db.kind() {
            DatabaseKind::Sqlite => {
                sqlx::query(insert)
                    .bind(channel)
                    .bind(payload)
                    .bind(crate::now_millis())
                    .execute(db.pool())
                    .await?;
            }
            DatabaseKind::Postgres => {
                let mut tx = db.pool().begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(PG_PUBLISH_LOCK)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(insert)
                    .bind(channel)
                    .bind(payload)
                    .bind(crate::now_millis())
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
        }
        self.shared.wake.notify_one();
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, BroadcastError> {
        Ok(self.shared.channels.subscribe(channel).0)
    }

    async fn prune(&self) -> Result<u64, BroadcastError> {
        Ok(sql_prune(&self.shared).await?)
    }
}

// ---------------------------------------------------------------- Redis

/// The bus on Redis pub/sub, with channel names under `prefix:bus:`. One
/// subscriber connection per handle, reconnected with backoff; after a
/// reconnect every subscription is told it may have missed messages.
#[derive(Clone)]
pub struct RedisBroadcast {
    shared: Arc<RedisShared>,
}

struct RedisShared {
    prefix: String,
    publisher: redis::aio::ConnectionManager,
    channels: Channels,
    commands: mpsc::UnboundedSender<(String, oneshot::Sender<()>)>,
}

impl std::fmt::Debug for RedisBroadcast {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroadcast")
            .field("prefix", &self.shared.prefix)
            .finish()
    }
}

impl RedisBroadcast {
    /// Connects the publisher to `url` (failing if Redis does not answer)
    /// and starts the subscriber task.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, BroadcastError> {
        let client = redis::Client::open(url)?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2);
        let publisher =
            redis::aio::ConnectionManager::new_with_config(client.clone(), config).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(RedisShared {
            prefix: prefix.to_string(),
            publisher,
            channels: Channels::default(),
            commands: tx,
        });
        tokio::spawn(redis_subscriber(client, Arc::downgrade(&shared), rx));
        Ok(RedisBroadcast { shared })
    }

    fn full_name(prefix: &str, channel: &str) -> String {
        format!("{prefix}:bus:{channel}")
    }
}

async fn redis_subscriber(
    client: redis::Client,
    weak: Weak<RedisShared>,
    mut commands: mpsc::UnboundedReceiver<(String, oneshot::Sender<()>)>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        let Some(shared) = weak.upgrade() else { return };
        let prefix = shared.prefix.clone();
        let names = shared.channels.names();
        drop(shared);
        let connected = tokio::time::timeout(Duration::from_secs(2), async {
            let mut pubsub = client.get_async_pubsub().await?;
            for name in &names {
                pubsub
                    .subscribe(RedisBroadcast::full_name(&prefix, name))
                    .await?;
            }
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        let pubsub = match connected {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "broadcast: cannot subscribe on Redis; retrying");
                redis_wait(&mut commands, &mut backoff).await;
                continue;
            }
            Err(_) => {
                tracing::warn!("broadcast: Redis subscribe timed out; retrying");
                redis_wait(&mut commands, &mut backoff).await;
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        if !first {
            if let Some(shared) = weak.upgrade() {
                shared.channels.missed_all();
            }
        }
        first = false;
        let (mut sink, mut stream) = pubsub.split();
        let strip = format!("{prefix}:bus:");
        loop {
            tokio::select! {
                cmd = commands.recv() => {
                    let Some((name, done)) = cmd else { return };
                    if sink.subscribe(RedisBroadcast::full_name(&prefix, &name)).await.is_err() {
                        // Resubscribed with the rest after reconnecting.
                        let _ = done.send(());
                        break;
                    }
                    let _ = done.send(());
                }
                msg = stream.next() => {
                    let Some(msg) = msg else { break };
                    let Some(shared) = weak.upgrade() else { return };
                    if let Some(channel) = msg.get_channel_name().strip_prefix(&strip) {
                        shared.channels.deliver(channel, Bytes::copy_from_slice(msg.get_payload_bytes()));
                    }
                }
            }
        }
        metrics::counter!("shoal_broadcast_errors_total", "backend" => "redis").increment(1);
        tracing::warn!("broadcast: Redis subscriber connection lost; reconnecting");
    }
}

/// Sleeps for the backoff while answering subscribe requests at once (they
/// are picked up on reconnect), then doubles the backoff up to 5 s.
async fn redis_wait(
    commands: &mut mpsc::UnboundedReceiver<(String, oneshot::Sender<()>)>,
    backoff: &mut Duration,
) {
    let until = tokio::time::Instant::now() + *backoff;
    loop {
        tokio::select! {
            cmd = commands.recv() => match cmd {
                Some((_, done)) => { let _ = done.send(()); }
                None => return,
            },
            _ = tokio::time::sleep_until(until) => break,
        }
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
}

#[async_trait]
impl Broadcast for RedisBroadcast {
    async fn ping(&self) -> bool {
        let mut conn = self.shared.publisher.clone();
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok()
    }

    async fn publish(&self, channel: &str, payload: &[u8]) -> Result<(), BroadcastError> {
        let mut conn = self.shared.publisher.clone();
        redis::cmd("PUBLISH")
            .arg(Self::full_name(&self.shared.prefix, channel))
            .arg(payload)
            .query_async::<i64>(&mut conn)
            .await?;
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<Subscription, BroadcastError> {
        let (sub, created) = self.shared.channels.subscribe(channel);
        if created {
            let (done, wait) = oneshot::channel();
            self.shared
                .commands
                .send((channel.to_string(), done))
                .map_err(|_| BroadcastError::Unavailable("the subscriber task has stopped"))?;
            // Wait for Redis to confirm, but never long: a subscription made
            // while Redis is away is completed on reconnect.
            let _ = tokio::time::timeout(Duration::from_secs(2), wait).await;
        }
        Ok(sub)
    }

    async fn prune(&self) -> Result<u64, BroadcastError> {
        Ok(0)
    }
}
