//! `CachedSessionStore`: a short-lived in-process layer in front of any
//! `SessionStore`, so a burst of requests with one cookie costs one store
//! read. Logout and logout-all go through it: the entry is dropped here at
//! once and on every other instance when the `Broadcast` bus delivers the
//! invalidation, so an ended session is refused everywhere within the bus
//! bound (and, if the bus is down, within the cache TTL).
//!
//! Entries are keyed by the SHA-256 of the token, which is also all that
//! travels on the bus; tokens never leave the process.

use async_trait::async_trait;
use moka::future::Cache;
use shoal_backends::sessions::token_hash;
use shoal_backends::{Broadcast, RecvError, Session, SessionError, SessionLifetimes, SessionStore};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The bus channel of session invalidations.
pub const SESSION_CHANNEL: &str = "sessions.invalidate";

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum SessionInvalidation {
    Token { hash: String },
    User { user_id: String },
}

/// Why a read of the store gave nothing to cache (shared by the callers
/// that waited on it).
enum Miss {
    NoSession,
    Failed(Arc<SessionError>),
}

/// A `SessionStore` that reuses reads for `ttl`.
pub struct CachedSessionStore {
    inner: Arc<dyn SessionStore>,
    shared: Arc<Shared>,
    bus: Arc<dyn Broadcast>,
}

struct Shared {
    /// token hash → session (without its token).
    /// foldhash, as the query cache's L1 (crate::cache).
    cache: Cache<String, Arc<Session>, foldhash::fast::RandomState>,
    /// Bumped by every invalidation; a read that raced one is not cached.
    epoch: AtomicU64,
}

impl std::fmt::Debug for CachedSessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedSessionStore")
            .field("inner", &self.inner)
            .finish()
    }
}

impl CachedSessionStore {
    /// Wraps `inner`, reusing reads for `ttl` (at most 100,000 sessions)
    /// and listening on `bus` for other instances' logouts.
    pub async fn new(
        inner: Arc<dyn SessionStore>,
        bus: Arc<dyn Broadcast>,
        ttl: Duration,
    ) -> Result<Self, shoal_backends::BroadcastError> {
        let shared = Arc::new(Shared {
            cache: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .build_with_hasher(foldhash::fast::RandomState::default()),
            epoch: AtomicU64::new(0),
        });
        let sub = bus.subscribe(SESSION_CHANNEL).await?;
        tokio::spawn(listen(Arc::downgrade(&shared), sub));
        Ok(CachedSessionStore { inner, shared, bus })
    }

    async fn broadcast(&self, message: &SessionInvalidation) {
        let payload = serde_json::to_vec(message).unwrap_or_default();
        if let Err(e) = self.bus.publish(SESSION_CHANNEL, &payload).await {
            metrics::counter!("shoal_cache_errors_total", "tier" => "bus").increment(1);
            tracing::warn!(error = %e, "session invalidation not broadcast; other instances may accept the session until their cache TTL");
        }
    }
}

impl Shared {
    async fn invalidate(&self, message: &SessionInvalidation) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        match message {
            SessionInvalidation::Token { hash } => self.cache.invalidate(hash).await,
            SessionInvalidation::User { user_id } => {
                let keys: Vec<Arc<String>> = self
                    .cache
                    .iter()
                    .filter(|(_, s)| s.user_id == *user_id)
                    .map(|(k, _)| k)
                    .collect();
                for k in keys {
                    self.cache.invalidate(&*k).await;
                }
            }
        }
    }

    fn clear(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate_all();
    }
}

async fn listen(weak: std::sync::Weak<Shared>, mut sub: shoal_backends::Subscription) {
    loop {
        let got = sub.recv().await;
        let Some(shared) = weak.upgrade() else { return };
        match got {
            Ok(payload) => match serde_json::from_slice::<SessionInvalidation>(&payload) {
                Ok(m) => shared.invalidate(&m).await,
                Err(e) => tracing::warn!(error = %e, "unreadable session invalidation"),
            },
            Err(RecvError::Missed) => shared.clear(),
            Err(RecvError::Closed) => return,
        }
    }
}

#[async_trait]
impl SessionStore for CachedSessionStore {
    async fn create(&self, user_id: &str, life: SessionLifetimes) -> Result<Session, SessionError> {
        self.inner.create(user_id, life).await
    }

    async fn touch(
        &self,
        token: &str,
        life: SessionLifetimes,
    ) -> Result<Option<Session>, SessionError> {
        let hash = token_hash(token);
        if let Some(s) = self.shared.cache.get(&hash).await {
            let now = shoal_backends::now_millis();
            if s.expires_at > now && s.absolute_expires_at > now {
                shoal_core::count_per_thread!("shoal_cache_requests_total", "tier" => "session", "result" => "hit");
                let mut session = (*s).clone();
                session.token = token.to_string();
                return Ok(Some(session));
            }
            // Expired here: read from the store below, not this entry.
            self.shared.cache.invalidate(&hash).await;
        }
        shoal_core::count_per_thread!("shoal_cache_requests_total", "tier" => "session", "result" => "miss");
        let epoch = self.shared.epoch.load(Ordering::Acquire);
        // Concurrent misses of one session (a client's burst of requests,
        // thousands of streams reconnecting after an instance restarted)
        // wait on one read of the store: each read also writes (the idle
        // expiry slides), and a herd of them would take every database
        // connection.
        let loaded = self
            .shared
            .cache
            .try_get_with(hash.clone(), async {
                match self.inner.touch(token, life).await {
                    Ok(Some(mut s)) => {
                        s.token = String::new();
                        Ok(Arc::new(s))
                    }
                    Ok(None) => Err(Miss::NoSession),
                    Err(e) => Err(Miss::Failed(Arc::new(e))),
                }
            })
            .await;
        match loaded {
            Ok(s) => {
                // An invalidation since this read began: not kept.
                if self.shared.epoch.load(Ordering::Acquire) != epoch {
                    self.shared.cache.invalidate(&hash).await;
                }
                let mut session = (*s).clone();
                session.token = token.to_string();
                Ok(Some(session))
            }
            Err(miss) => match &*miss {
                Miss::NoSession => Ok(None),
                Miss::Failed(e) => Err(SessionError::Shared(Arc::clone(e))),
            },
        }
    }

    async fn delete(&self, token: &str) -> Result<(), SessionError> {
        self.inner.delete(token).await?;
        let message = SessionInvalidation::Token {
            hash: token_hash(token),
        };
        self.shared.invalidate(&message).await;
        self.broadcast(&message).await;
        Ok(())
    }

    async fn delete_user(&self, user_id: &str) -> Result<u64, SessionError> {
        let n = self.inner.delete_user(user_id).await?;
        let message = SessionInvalidation::User {
            user_id: user_id.to_string(),
        };
        self.shared.invalidate(&message).await;
        self.broadcast(&message).await;
        Ok(n)
    }

    async fn prune_expired(&self) -> Result<u64, SessionError> {
        self.inner.prune_expired().await
    }

    async fn ping(&self) -> bool {
        self.inner.ping().await
    }
}
