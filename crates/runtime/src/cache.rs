//! `QueryCache`: a two-tier read-through cache for query results. L1 is
//! in-process (`moka`, bounded by bytes, a TTL per entry); L2 is an
//! optional shared Redis. `get_or_load` runs at most one loader per key at
//! a time on an instance (single flight), spreads TTLs (jitter), refreshes
//! hot entries a little before they expire (XFetch), caches "not found"
//! for a shorter time, and never fails because Redis failed: L2 errors
//! count in a metric and reads go to the loader.
//!
//! Invalidation is by tag. Each entry remembers a sequence number taken
//! *before* its loader ran; `invalidate_tags` stamps each tag with a newer
//! number, so an entry whose load raced with an invalidation is stale at
//! once. L2 keeps a version counter per tag in Redis for the same effect
//! across instances, and the `Broadcast` bus carries invalidations to the
//! L1 of every other instance (within the bus's delivery bound).

use crate::error::ApiError;
use axum::http::HeaderValue;
use bytes::Bytes;
use moka::future::Cache;
use moka::ops::compute::{CompResult, Op};
use shoal_backends::{Broadcast, RecvError};
use shoal_core::settings::CacheSettings;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};

/// The bus channel of cache invalidations.
pub const INVALIDATION_CHANNEL: &str = "cache.invalidate";

/// A loader failed; the cache itself never fails a read.
#[derive(Debug, thiserror::Error)]
#[error("loading `{key}` failed: {source}")]
pub struct CacheError {
    pub key: String,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl From<CacheError> for ApiError {
    fn from(e: CacheError) -> Self {
        ApiError::internal("cache loader failed", &e)
    }
}

/// Tuning of a `QueryCache`; `from_settings` reads `[cache]`.
#[derive(Debug, Clone)]
pub struct QueryCacheOptions {
    pub l1_max_bytes: u64,
    pub max_ttl: Duration,
    pub negative_ttl: Duration,
    pub ttl_jitter_percent: u8,
    pub early_refresh_beta: f64,
    pub l2_redis_url: Option<String>,
    pub redis_prefix: String,
    pub l2_timeout: Duration,
    pub l2_retry_after: Duration,
}

impl QueryCacheOptions {
    pub fn from_settings(s: &CacheSettings) -> Self {
        QueryCacheOptions {
            l1_max_bytes: s.l1_max_bytes,
            max_ttl: Duration::from_secs(s.max_ttl_secs),
            negative_ttl: Duration::from_millis(s.negative_ttl_ms),
            ttl_jitter_percent: s.ttl_jitter_percent,
            early_refresh_beta: s.early_refresh_beta,
            l2_redis_url: s.l2_redis_url.clone(),
            redis_prefix: s.redis_prefix.clone(),
            l2_timeout: Duration::from_millis(s.l2_timeout_ms),
            l2_retry_after: Duration::from_millis(s.l2_retry_after_ms),
        }
    }
}

impl Default for QueryCacheOptions {
    fn default() -> Self {
        Self::from_settings(&CacheSettings::default())
    }
}

#[derive(Debug)]
struct L1Entry {
    /// `None` is a cached "not found".
    value: Option<Bytes>,
    /// The value's strong validator, computed on first use: once per entry,
    /// not once per response.
    etag: OnceLock<HeaderValue>,
    tags: Vec<String>,
    /// The invalidation sequence number when the load began.
    loaded_seq: u64,
    expires_at: Instant,
    /// How long the load took (XFetch's delta).
    delta: Duration,
}

struct EntryExpiry;

impl moka::Expiry<String, Arc<L1Entry>> for EntryExpiry {
    fn expire_after_create(
        &self,
        _key: &String,
        value: &Arc<L1Entry>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.expires_at.saturating_duration_since(Instant::now()))
    }

    fn expire_after_update(
        &self,
        _key: &String,
        value: &Arc<L1Entry>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.expires_at.saturating_duration_since(Instant::now()))
    }
}

/// A value found in (or just loaded into) the cache: its bytes, and what
/// a response derives from them, computed once per entry. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Cached {
    entry: Arc<L1Entry>,
}

impl Cached {
    /// `None` for a cached "not found".
    fn of(entry: &Arc<L1Entry>) -> Option<Cached> {
        entry.value.as_ref().map(|_| Cached {
            entry: Arc::clone(entry),
        })
    }

    pub fn bytes(&self) -> &Bytes {
        self.entry
            .value
            .as_ref()
            .expect("a Cached holds a value (Cached::of)")
    }

    /// The value's strong validator ([`strong_etag`]), computed on the
    /// entry's first use and kept with it.
    pub fn etag(&self) -> &HeaderValue {
        self.entry.etag.get_or_init(|| strong_etag(self.bytes()))
    }
}

/// A strong validator: the SHA-256 of `body` (its first 128 bits) in hex,
/// quoted, as a header value.
pub fn strong_etag(body: &[u8]) -> HeaderValue {
    use sha2::{Digest, Sha256};
    let hex = shoal_core::ids::hex(&Sha256::digest(body)[..16]);
    HeaderValue::try_from(format!("\"{hex}\"")).expect("hex and quotes")
}

/// A two-tier cache of byte values. Cheap to clone; clones share state.
#[derive(Clone)]
pub struct QueryCache {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for QueryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueryCache")
            .field("l1_entries", &self.inner.l1.entry_count())
            .field("l2", &self.inner.l2.is_some())
            .finish()
    }
}

struct Inner {
    /// Keys hashed with foldhash (randomly seeded per process, as
    /// hashbrown's default), not SipHash, which was a visible share of a
    /// cached read (bench/README.md, "Product by id and `/me`").
    l1: Cache<String, Arc<L1Entry>, foldhash::fast::RandomState>,
    /// Invalidation sequence: bumped by every invalidation.
    seq: AtomicU64,
    /// Entries loaded before this sequence number are all stale.
    cleared_seq: AtomicU64,
    /// tag → (sequence number of its last invalidation, when).
    tag_seqs: RwLock<HashMap<String, (u64, Instant)>>,
    l2: Option<L2>,
    bus: Option<Arc<dyn Broadcast>>,
    /// This cache's id on the bus, to skip its own invalidations.
    origin: String,
    options: QueryCacheOptions,
    loads: AtomicU64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct InvalidationMessage {
    origin: String,
    tags: Vec<String>,
}

impl QueryCache {
    /// A cache with `options`; with a bus, invalidations are sent to and
    /// received from the other instances. Never fails: an unreachable
    /// Redis is only connected to (again) when used.
    pub async fn new(options: QueryCacheOptions, bus: Option<Arc<dyn Broadcast>>) -> Self {
        let l1 = Cache::builder()
            .max_capacity(options.l1_max_bytes)
            .weigher(|k: &String, v: &Arc<L1Entry>| {
                let size = k.len() + v.value.as_ref().map_or(0, |b| b.len()) + 96;
                u32::try_from(size).unwrap_or(u32::MAX)
            })
            .expire_after(EntryExpiry)
            .build_with_hasher(foldhash::fast::RandomState::default());
        let l2 = options
            .l2_redis_url
            .as_deref()
            .and_then(|url| match redis::Client::open(url) {
                Ok(client) => Some(L2::new(client, &options)),
                Err(e) => {
                    tracing::error!(error = %e, "cache.l2_redis_url is not a Redis URL; L2 is off");
                    None
                }
            });
        let inner = Arc::new(Inner {
            l1,
            seq: AtomicU64::new(1),
            cleared_seq: AtomicU64::new(0),
            tag_seqs: RwLock::new(HashMap::new()),
            l2,
            bus: bus.clone(),
            origin: shoal_core::ids::new_id(),
            options,
            loads: AtomicU64::new(0),
        });
        if let Some(bus) = bus {
            match bus.subscribe(INVALIDATION_CHANNEL).await {
                Ok(sub) => {
                    tokio::spawn(listen(Arc::downgrade(&inner), sub));
                }
                Err(e) => {
                    tracing::error!(error = %e, "cache: cannot subscribe to invalidations; other instances' writes will only show after TTLs")
                }
            }
        }
        QueryCache { inner }
    }

    /// How many times a loader ran (on this instance).
    pub fn loads(&self) -> u64 {
        self.inner.loads.load(Ordering::Relaxed)
    }

    /// The cached value of `key`, else the value `loader` returns (`None`
    /// means "does not exist" and is cached for `cache.negative_ttl_ms`).
    /// `ttl` is capped to `cache.max_ttl_secs` and spread by the jitter.
    ///
    /// Concurrent callers for one key on one instance wait for a single
    /// load. Cancel safe: a cancelled caller loses only its own result.
    pub async fn get_or_load<F, Fut, E>(
        &self,
        key: &str,
        tags: &[String],
        ttl: Duration,
        loader: F,
    ) -> Result<Option<Bytes>, CacheError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Bytes>, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        Ok(self
            .get_or_load_cached(key, tags, ttl, loader)
            .await?
            .map(|c| c.bytes().clone()))
    }

    /// As [`get_or_load`](Self::get_or_load), with the entry itself: what
    /// a response derives from the value (its ETag) is kept with it and
    /// computed once per entry.
    pub async fn get_or_load_cached<F, Fut, E>(
        &self,
        key: &str,
        tags: &[String],
        ttl: Duration,
        loader: F,
    ) -> Result<Option<Cached>, CacheError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Bytes>, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let inner = &self.inner;
        let seen = inner.l1.get(key).await;
        if let Some(entry) = &seen {
            if inner.is_valid(entry) {
                if !inner.refresh_early(entry) {
                    shoal_core::count_per_thread!("shoal_cache_requests_total", "tier" => "l1", "result" => "hit");
                    return Ok(Cached::of(entry));
                }
                shoal_core::count_per_thread!("shoal_cache_requests_total", "tier" => "l1", "result" => "early_refresh");
            } else {
                shoal_core::count_per_thread!("shoal_cache_requests_total", "tier" => "l1", "result" => "stale");
            }
        } else {
            shoal_core::count_per_thread!("shoal_cache_requests_total", "tier" => "l1", "result" => "miss");
        }
        let result = inner
            .l1
            .entry_by_ref(key)
            .and_try_compute_with(|existing| async move {
                if let Some(existing) = existing {
                    let existing = existing.into_value();
                    let same = seen.as_ref().is_some_and(|s| Arc::ptr_eq(s, &existing));
                    // Someone else loaded while we waited: use theirs.
                    if !same && inner.is_valid(&existing) {
                        return Ok(Op::Nop);
                    }
                }
                inner.load(key, tags, ttl, loader).await.map(Op::Put)
            })
            .await
            .map_err(|source| CacheError {
                key: key.to_string(),
                source,
            })?;
        Ok(match result {
            CompResult::Inserted(e) | CompResult::ReplacedWith(e) | CompResult::Unchanged(e) => {
                Cached::of(e.value())
            }
            CompResult::StillNone(_) | CompResult::Removed(_) => None,
        })
    }

    /// Drops every entry tagged with any of `tags`: here at once (L1 and
    /// L2), on other instances when the bus delivers. Failures of L2 or the
    /// bus are logged and counted, not returned: the caller's write has
    /// happened and entries still expire with their TTL.
    pub async fn invalidate_tags(&self, tags: &[String]) {
        if tags.is_empty() {
            return;
        }
        self.inner.invalidate_local(tags);
        metrics::counter!("shoal_cache_invalidations_total").increment(tags.len() as u64);
        if let Some(l2) = &self.inner.l2 {
            l2.invalidate(tags, self.inner.options.max_ttl).await;
        }
        if let Some(bus) = &self.inner.bus {
            let message = InvalidationMessage {
                origin: self.inner.origin.clone(),
                tags: tags.to_vec(),
            };
            let payload = serde_json::to_vec(&message).unwrap_or_default();
            if let Err(e) = bus.publish(INVALIDATION_CHANNEL, &payload).await {
                metrics::counter!("shoal_cache_errors_total", "tier" => "bus").increment(1);
                tracing::warn!(error = %e, ?tags, "cache: invalidation not broadcast; other instances serve old data until TTL");
            }
        }
    }

    /// Drops every L1 entry of this instance.
    pub fn clear_local(&self) {
        self.inner.clear_local();
    }
}

async fn listen(weak: std::sync::Weak<Inner>, mut sub: shoal_backends::Subscription) {
    loop {
        let got = sub.recv().await;
        let Some(inner) = weak.upgrade() else { return };
        match got {
            Ok(payload) => match serde_json::from_slice::<InvalidationMessage>(&payload) {
                Ok(m) if m.origin != inner.origin => inner.invalidate_local(&m.tags),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cache: unreadable invalidation message"),
            },
            Err(RecvError::Missed) => {
                tracing::warn!("cache: invalidations may have been missed; clearing L1");
                inner.clear_local();
            }
            Err(RecvError::Closed) => return,
        }
    }
}

impl Inner {
    fn is_valid(&self, e: &L1Entry) -> bool {
        if Instant::now() >= e.expires_at || e.loaded_seq < self.cleared_seq.load(Ordering::Acquire)
        {
            return false;
        }
        let tag_seqs = self.tag_seqs.read().unwrap();
        e.tags
            .iter()
            .all(|t| tag_seqs.get(t).is_none_or(|(s, _)| *s <= e.loaded_seq))
    }

    /// XFetch: refresh with a probability that grows as expiry nears,
    /// scaled by how long the load took.
    fn refresh_early(&self, e: &L1Entry) -> bool {
        let beta = self.options.early_refresh_beta;
        if beta <= 0.0 || e.value.is_none() {
            return false;
        }
        let r: f64 = rand::random::<f64>().max(f64::MIN_POSITIVE);
        let gap = e.delta.as_secs_f64() * beta * -r.ln();
        Instant::now() + Duration::from_secs_f64(gap.min(3600.0)) >= e.expires_at
    }

    fn invalidate_local(&self, tags: &[String]) {
        let seq = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
        let now = Instant::now();
        let mut tag_seqs = self.tag_seqs.write().unwrap();
        for t in tags {
            tag_seqs.insert(t.clone(), (seq, now));
        }
        // Stamps older than the longest TTL cover no live entry.
        if tag_seqs.len() > 10_000 {
            let max = self.options.max_ttl;
            tag_seqs.retain(|_, (_, at)| at.elapsed() <= max);
        }
    }

    fn clear_local(&self) {
        let seq = self.seq.fetch_add(1, Ordering::AcqRel) + 1;
        self.cleared_seq.store(seq, Ordering::Release);
        self.l1.invalidate_all();
    }

    fn jittered(&self, ttl: Duration) -> Duration {
        let ttl = ttl.min(self.options.max_ttl);
        let pct = f64::from(self.options.ttl_jitter_percent) / 100.0;
        if pct <= 0.0 {
            return ttl;
        }
        let factor = 1.0 + pct * (rand::random::<f64>() * 2.0 - 1.0);
        ttl.mul_f64(factor.max(0.01))
    }

    /// One load: L2 when it has a current entry, else the loader (whose
    /// result then fills L2).
    async fn load<F, Fut, E>(
        &self,
        key: &str,
        tags: &[String],
        ttl: Duration,
        loader: F,
    ) -> Result<Arc<L1Entry>, Box<dyn std::error::Error + Send + Sync>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<Bytes>, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let loaded_seq = self.seq.load(Ordering::Acquire);
        let mut versions = None;
        if let Some(l2) = &self.l2 {
            if let Some(read) = l2.read(key, tags).await {
                if let Some((value, remaining)) = read.value {
                    metrics::counter!("shoal_cache_requests_total", "tier" => "l2", "result" => "hit")
                        .increment(1);
                    return Ok(Arc::new(L1Entry {
                        value,
                        etag: OnceLock::new(),
                        tags: tags.to_vec(),
                        loaded_seq,
                        expires_at: Instant::now() + remaining,
                        delta: Duration::from_millis(1),
                    }));
                }
                metrics::counter!("shoal_cache_requests_total", "tier" => "l2", "result" => "miss")
                    .increment(1);
                versions = Some(read.versions);
            }
        }
        let started = Instant::now();
        self.loads.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("shoal_cache_loads_total").increment(1);
        let value = loader().await.map_err(Into::into)?;
        let delta = started.elapsed();
        let ttl = match value {
            Some(_) => self.jittered(ttl),
            None => self.jittered(self.options.negative_ttl.min(ttl)),
        };
        if let (Some(l2), Some(versions)) = (&self.l2, versions) {
            l2.write(key, &versions, value.as_ref(), ttl).await;
        }
        Ok(Arc::new(L1Entry {
            value,
            etag: OnceLock::new(),
            tags: tags.to_vec(),
            loaded_seq,
            expires_at: Instant::now() + ttl,
            delta,
        }))
    }
}

// ---------------------------------------------------------------- L2

/// Redis tier. Connects lazily; after an error it is skipped for
/// `l2_retry_after` so a dead Redis costs one timeout, not one per read.
struct L2 {
    client: redis::Client,
    conn: RwLock<Option<redis::aio::ConnectionManager>>,
    connecting: tokio::sync::Mutex<()>,
    down_until: RwLock<Option<Instant>>,
    prefix: String,
    timeout: Duration,
    retry_after: Duration,
}

struct L2Read {
    /// A current entry and its remaining lifetime.
    value: Option<(Option<Bytes>, Duration)>,
    /// Tag versions now, for the entry this load may write.
    versions: Vec<i64>,
}

impl L2 {
    fn new(client: redis::Client, options: &QueryCacheOptions) -> Self {
        L2 {
            client,
            conn: RwLock::new(None),
            connecting: tokio::sync::Mutex::new(()),
            down_until: RwLock::new(None),
            prefix: options.redis_prefix.clone(),
            timeout: options.l2_timeout,
            retry_after: options.l2_retry_after,
        }
    }

    fn key(&self, key: &str) -> String {
        format!("{}:qc:key:{key}", self.prefix)
    }

    fn tag_key(&self, tag: &str) -> String {
        format!("{}:qc:tag:{tag}", self.prefix)
    }

    fn failed(&self, what: &str, error: &dyn std::fmt::Display) {
        metrics::counter!("shoal_cache_errors_total", "tier" => "l2").increment(1);
        tracing::warn!(error = %error, "cache L2 {what} failed; skipping L2 for a while");
        *self.down_until.write().unwrap() = Some(Instant::now() + self.retry_after);
    }

    async fn connection(&self) -> Option<redis::aio::ConnectionManager> {
        if let Some(until) = *self.down_until.read().unwrap() {
            if Instant::now() < until {
                return None;
            }
        }
        if let Some(c) = self.conn.read().unwrap().as_ref() {
            return Some(c.clone());
        }
        let _guard = self.connecting.lock().await;
        if let Some(c) = self.conn.read().unwrap().as_ref() {
            return Some(c.clone());
        }
        let connect_timeout = self.timeout.max(Duration::from_millis(250));
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1);
        let connect = redis::aio::ConnectionManager::new_with_config(self.client.clone(), config);
        match tokio::time::timeout(connect_timeout * 2, connect).await {
            Ok(Ok(c)) => {
                *self.conn.write().unwrap() = Some(c.clone());
                Some(c)
            }
            Ok(Err(e)) => {
                self.failed("connect", &e);
                None
            }
            Err(_) => {
                self.failed("connect", &"timed out");
                None
            }
        }
    }

    async fn read(&self, key: &str, tags: &[String]) -> Option<L2Read> {
        let mut conn = self.connection().await?;
        let mut pipe = redis::pipe();
        pipe.cmd("GET")
            .arg(self.key(key))
            .cmd("PTTL")
            .arg(self.key(key));
        for t in tags {
            pipe.cmd("GET").arg(self.tag_key(t));
        }
        let reply = tokio::time::timeout(
            self.timeout,
            pipe.query_async::<Vec<redis::Value>>(&mut conn),
        )
        .await;
        let values = match reply {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                self.failed("read", &e);
                return None;
            }
            Err(_) => {
                self.failed("read", &"timed out");
                return None;
            }
        };
        let mut values = values.into_iter();
        let raw: Option<Vec<u8>> = values.next().and_then(|v| redis::from_redis_value(v).ok());
        let pttl: i64 = values
            .next()
            .and_then(|v| redis::from_redis_value(v).ok())
            .unwrap_or(-2);
        let versions: Vec<i64> = values
            .map(|v| {
                redis::from_redis_value::<Option<i64>>(v)
                    .ok()
                    .flatten()
                    .unwrap_or(0)
            })
            .collect();
        let value = raw
            .filter(|_| pttl > 0)
            .and_then(|raw| decode(&raw, &versions))
            .map(|v| (v, Duration::from_millis(pttl as u64)));
        Some(L2Read { value, versions })
    }

    async fn write(&self, key: &str, versions: &[i64], value: Option<&Bytes>, ttl: Duration) {
        let Some(mut conn) = self.connection().await else {
            return;
        };
        let ms = ttl.as_millis().max(1) as u64;
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.key(key))
            .arg(encode(versions, value))
            .arg("PX")
            .arg(ms);
        let set = cmd.query_async::<()>(&mut conn);
        match tokio::time::timeout(self.timeout, set).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.failed("write", &e),
            Err(_) => self.failed("write", &"timed out"),
        }
    }

    async fn invalidate(&self, tags: &[String], max_ttl: Duration) {
        let Some(mut conn) = self.connection().await else {
            metrics::counter!("shoal_cache_errors_total", "tier" => "l2").increment(1);
            tracing::warn!(
                ?tags,
                "cache L2 is unreachable; its entries of these tags live until their TTL"
            );
            return;
        };
        let mut pipe = redis::pipe();
        for t in tags {
            // Version keys outlive every entry stamped with them.
            pipe.cmd("INCR").arg(self.tag_key(t)).ignore();
            pipe.cmd("PEXPIRE")
                .arg(self.tag_key(t))
                .arg((max_ttl.as_millis() as u64).saturating_mul(2))
                .ignore();
        }
        match tokio::time::timeout(self.timeout, pipe.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.failed("invalidate", &e),
            Err(_) => self.failed("invalidate", &"timed out"),
        }
    }
}

/// `[present: u8][n: u8][n × i64 LE tag versions][payload]`.
fn encode(versions: &[i64], value: Option<&Bytes>) -> Vec<u8> {
    let n = versions.len().min(255);
    let mut out = Vec::with_capacity(2 + n * 8 + value.map_or(0, |v| v.len()));
    out.push(u8::from(value.is_some()));
    out.push(n as u8);
    for v in &versions[..n] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    if let Some(v) = value {
        out.extend_from_slice(v);
    }
    out
}

/// The value of an encoded entry whose tag versions match `current`;
/// `None` when it is stale or unreadable.
fn decode(raw: &[u8], current: &[i64]) -> Option<Option<Bytes>> {
    let present = *raw.first()?;
    let n = *raw.get(1)? as usize;
    if n != current.len().min(255) || raw.len() < 2 + n * 8 {
        return None;
    }
    for (i, want) in current.iter().take(n).enumerate() {
        let at = 2 + i * 8;
        let got = i64::from_le_bytes(raw[at..at + 8].try_into().ok()?);
        if got != *want {
            return None;
        }
    }
    let payload = &raw[2 + n * 8..];
    Some((present == 1).then(|| Bytes::copy_from_slice(payload)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_go_stale_with_tag_versions() {
        let v = Bytes::from_static(b"{\"a\":1}");
        let raw = encode(&[3, 0], Some(&v));
        assert_eq!(decode(&raw, &[3, 0]), Some(Some(v)));
        assert_eq!(decode(&raw, &[4, 0]), None, "a bumped tag makes it stale");
        assert_eq!(decode(&raw, &[3]), None, "other tags, other entry");
        let none = encode(&[], None);
        assert_eq!(
            decode(&none, &[]),
            Some(None),
            "negative entries round trip"
        );
    }
}
