//! What several gateways share through Redis (`gateway.redis_url`): one
//! rate-limit budget per key, and cache purges published to every gateway.
//!
//! Rate limits: the same GCRA as the local limiter (`limits.rs`), run as
//! a Lua script in Redis over one key per (limiter, client key), with
//! Redis's own clock, so N gateways admit what one would. Redis is off the
//! request path's critical section only by a timeout
//! (`gateway.redis_timeout_ms`): on an error or a timeout the request is
//! judged by the gateway's own limiter, and Redis is left alone for a
//! second (each gateway then enforces the limit on its own share: fail
//! open, counted in `shoal_gateway_redis_errors_total`).
//!
//! Purges: a purge received on the admin API is published on
//! `<prefix>:purge`; every gateway subscribed applies it unless it came
//! from itself. A gateway that lost its subscription cannot know what it
//! missed, so on re-subscribing it empties its whole cache.
//!
//! The connections live on the runtime that built the gateway (its main
//! one), so they outlast any worker thread's runtime.

use crate::reload::Shared;
use futures_util::StreamExt;
use sha2::Digest;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// How long Redis is left alone after an error.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// GCRA with Redis's clock. KEYS[1]: the key; ARGV[1]: emission interval
/// (µs per request); ARGV[2]: burst. Returns `{1, 0}` when admitted, else
/// `{0, µs to wait}`. The theoretical arrival time is kept as an integer
/// string so no precision is lost to Lua's number formatting.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
local over = new_tat - now - burst * interval
if over > 0 then
  return {0, math.ceil(over)}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, 0}
";

/// The gateways' shared Redis.
pub struct Coord {
    /// This process among the gateways (purges it published come back).
    id: String,
    prefix: String,
    client: redis::Client,
    /// The runtime the connections are made (and driven) on.
    handle: Handle,
    conn: RwLock<Option<redis::aio::ConnectionManager>>,
    connecting: tokio::sync::Mutex<()>,
    down_until: RwLock<Option<Instant>>,
    timeout: Duration,
    script: redis::Script,
}

impl std::fmt::Debug for Coord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coord")
            .field("id", &self.id)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

/// A purge as published to the other gateways.
#[derive(serde::Serialize, serde::Deserialize)]
struct Published {
    origin: String,
    purge: crate::cache::purge::PurgeRequest,
}

impl Coord {
    /// `None` when `redis_url` is empty. Must run inside a runtime that
    /// lives as long as the gateway.
    pub fn new(
        settings: &shoal_core::settings::GatewaySettings,
    ) -> Result<Option<Arc<Coord>>, String> {
        if settings.redis_url.is_empty() {
            return Ok(None);
        }
        let client = redis::Client::open(settings.redis_url.as_str())
            .map_err(|e| format!("`{}` is not a Redis URL: {e}", settings.redis_url))?;
        let handle = Handle::try_current()
            .map_err(|_| "the gateway must be built inside a Tokio runtime".to_string())?;
        Ok(Some(Arc::new(Coord {
            id: format!("{:016x}", rand::random::<u64>()),
            prefix: settings.redis_prefix.clone(),
            client,
            handle,
            conn: RwLock::new(None),
            connecting: tokio::sync::Mutex::new(()),
            down_until: RwLock::new(None),
            timeout: Duration::from_millis(settings.redis_timeout_ms),
            script: redis::Script::new(GCRA),
        })))
    }

    /// Whether Redis is worth asking now (not within a second of an error).
    pub fn available(&self) -> bool {
        match *self.down_until.read().unwrap_or_else(|p| p.into_inner()) {
            Some(until) => Instant::now() >= until,
            None => true,
        }
    }

    fn failed(&self, what: &str, error: &dyn std::fmt::Display) {
        metrics::counter!("shoal_gateway_redis_errors_total").increment(1);
        let mut down = self.down_until.write().unwrap_or_else(|p| p.into_inner());
        // One line per outage, not one per request.
        if down.is_none_or(|until| Instant::now() >= until) {
            tracing::warn!(error = %error, "gateway Redis {what} failed; rate limits are this gateway's own for a while");
        }
        *down = Some(Instant::now() + RETRY_AFTER);
    }

    async fn connection(&self) -> Option<redis::aio::ConnectionManager> {
        if !self.available() {
            return None;
        }
        if let Some(c) = self.conn.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Some(c.clone());
        }
        let _guard = self.connecting.lock().await;
        if let Some(c) = self.conn.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Some(c.clone());
        }
        let connect_timeout = self.timeout.max(Duration::from_millis(500));
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(self.timeout.max(Duration::from_millis(250))))
            .set_number_of_retries(1);
        let connect = self
            .handle
            .spawn(redis::aio::ConnectionManager::new_with_config(
                self.client.clone(),
                config,
            ));
        match tokio::time::timeout(connect_timeout * 2, connect).await {
            Ok(Ok(Ok(c))) => {
                *self.conn.write().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
                Some(c)
            }
            Ok(Ok(Err(e))) => {
                self.failed("connect", &e);
                None
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

    /// The shared verdict for `key` of limiter `limiter` (requests every
    /// `interval`, bursts of `burst`): `None` when Redis could not say
    /// (the caller then asks its own limiter).
    pub async fn rate_check(
        &self,
        limiter: &str,
        key: &str,
        interval: Duration,
        burst: u32,
    ) -> Option<Result<(), Duration>> {
        let mut conn = self.connection().await?;
        // Hashed: a key may be an API key, which has no business in Redis
        // key names.
        let digest = sha2::Sha256::digest(format!("{limiter}\n{key}").as_bytes());
        let mut invocation = self
            .script
            .key(format!("{}:rl:{}", self.prefix, hex(&digest[..16])));
        invocation
            .arg(interval.as_micros().max(1) as u64)
            .arg(burst.max(1));
        let reply = tokio::time::timeout(
            self.timeout,
            invocation.invoke_async::<(i64, i64)>(&mut conn),
        )
        .await;
        match reply {
            Ok(Ok((1, _))) => Some(Ok(())),
            Ok(Ok((_, wait_us))) => Some(Err(Duration::from_micros(wait_us.max(0) as u64))),
            Ok(Err(e)) => {
                self.failed("rate-limit check", &e);
                None
            }
            Err(_) => {
                self.failed("rate-limit check", &"timed out");
                None
            }
        }
    }

    fn channel(&self) -> String {
        format!("{}:purge", self.prefix)
    }

    /// Publishes a purge to the other gateways; `Err` says why it could not.
    pub async fn publish_purge(
        &self,
        purge: crate::cache::purge::PurgeRequest,
    ) -> Result<(), String> {
        let payload = serde_json::to_vec(&Published {
            origin: self.id.clone(),
            purge,
        })
        .map_err(|e| e.to_string())?;
        // A purge must not be skipped because a rate-limit check failed a
        // moment ago: connect whatever `down_until` says.
        *self.down_until.write().unwrap_or_else(|p| p.into_inner()) = None;
        let mut conn = self
            .connection()
            .await
            .ok_or_else(|| "Redis is unreachable".to_string())?;
        let sent = tokio::time::timeout(
            Duration::from_secs(2),
            redis::cmd("PUBLISH")
                .arg(self.channel())
                .arg(payload)
                .query_async::<i64>(&mut conn),
        )
        .await;
        match sent {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => {
                self.failed("purge publish", &e);
                Err(e.to_string())
            }
            Err(_) => {
                self.failed("purge publish", &"timed out");
                Err("timed out".into())
            }
        }
    }

    /// Applies the purges other gateways publish until `stop` is
    /// cancelled; re-subscribes with backoff, emptying the cache after a
    /// lost subscription (purges may have been missed).
    pub async fn follow_purges(self: Arc<Self>, shared: Arc<Shared>, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(100);
        let mut first = true;
        loop {
            let subscribed = tokio::time::timeout(Duration::from_secs(2), async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(self.channel()).await?;
                Ok::<_, redis::RedisError>(pubsub)
            });
            let pubsub = tokio::select! {
                _ = stop.cancelled() => return,
                s = subscribed => s,
            };
            let pubsub = match pubsub {
                Ok(Ok(p)) => p,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "gateway: cannot subscribe to purges on Redis; retrying");
                    if sleep_or_stop(&stop, &mut backoff).await {
                        return;
                    }
                    continue;
                }
                Err(_) => {
                    tracing::warn!("gateway: subscribing to purges on Redis timed out; retrying");
                    if sleep_or_stop(&stop, &mut backoff).await {
                        return;
                    }
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            if !first {
                if let Some(cache) = &shared.load().cache {
                    crate::cache::purge::purge_everything(cache);
                    tracing::warn!("gateway: purge subscription restored; emptied the cache, as purges may have been missed");
                }
            }
            first = false;
            let mut messages = pubsub.into_on_message();
            loop {
                let msg = tokio::select! {
                    _ = stop.cancelled() => return,
                    m = messages.next() => m,
                };
                let Some(msg) = msg else { break };
                let Ok(published) = serde_json::from_slice::<Published>(msg.get_payload_bytes())
                else {
                    tracing::warn!("gateway: ignored a purge message that is not JSON");
                    continue;
                };
                if published.origin == self.id {
                    continue;
                }
                let state = shared.load();
                if let Some(cache) = &state.cache {
                    match crate::cache::purge::apply(cache, &published.purge) {
                        Ok(()) => {
                            metrics::counter!("shoal_gateway_cache_purges_total").increment(1);
                            tracing::info!(
                                urls = published.purge.urls.len(),
                                tags = published.purge.tags.len(),
                                all = published.purge.all,
                                from = %published.origin,
                                "cache purge from another gateway"
                            );
                        }
                        Err(e) => tracing::warn!(error = %e, "gateway: ignored a published purge"),
                    }
                }
            }
            metrics::counter!("shoal_gateway_redis_errors_total").increment(1);
            tracing::warn!("gateway: purge subscription on Redis lost; re-subscribing");
        }
    }
}

/// Sleeps the backoff (doubled up to 5 s) unless stopped first: `true`
/// when stopped.
async fn sleep_or_stop(stop: &CancellationToken, backoff: &mut Duration) -> bool {
    let wait = *backoff;
    *backoff = (*backoff * 2).min(Duration::from_secs(5));
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(wait) => false,
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
