//! The `[cache]` settings section (the query cache's two tiers, the
//! invalidation bus, the session cache) and the `[catalog]` section (the
//! catalog service's admins, cache lifetimes, CDN headers and purge hook).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BusBackend {
    /// A table in the main database, polled every `cache.bus_poll_interval_ms`.
    #[serde(alias = "sqlite", alias = "postgres")]
    Database,
    /// Redis pub/sub on `cache.bus_redis_url`.
    Redis,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheSettings {
    /// Bytes of values the in-process (L1) cache holds before evicting.
    pub l1_max_bytes: u64,
    /// Redis for the shared (L2) tier; no L2 when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub l2_redis_url: Option<String>,
    /// Prefix of every Redis key and channel of the cache and the bus.
    pub redis_prefix: String,
    /// Longest wait for one L2 operation before falling back, ms.
    pub l2_timeout_ms: u64,
    /// After an L2 error, how long L2 is skipped before it is tried again, ms.
    pub l2_retry_after_ms: u64,
    /// Longest TTL any entry may have (callers' TTLs are capped to it), s.
    pub max_ttl_secs: u64,
    /// TTL of a cached "not found", ms.
    pub negative_ttl_ms: u64,
    /// Each TTL is spread by up to this many percent, so entries filled
    /// together do not expire together.
    pub ttl_jitter_percent: u8,
    /// XFetch beta: how eagerly an entry is refreshed before it expires
    /// (0 turns early refresh off; 1 is the paper's default).
    pub early_refresh_beta: f64,
    /// Where invalidations travel between instances.
    pub bus: BusBackend,
    /// Redis for the bus when `cache.bus = "redis"`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bus_redis_url: Option<String>,
    /// How often the database bus is read, ms.
    pub bus_poll_interval_ms: u64,
    /// How long the database bus keeps messages, s.
    pub bus_retention_secs: u64,
    /// How long a session read is reused in-process, ms (0 turns the
    /// session cache off).
    pub session_ttl_ms: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            l1_max_bytes: 64 * 1024 * 1024,
            l2_redis_url: None,
            redis_prefix: "shoal".into(),
            l2_timeout_ms: 100,
            l2_retry_after_ms: 1_000,
            max_ttl_secs: 3_600,
            negative_ttl_ms: 5_000,
            ttl_jitter_percent: 10,
            early_refresh_beta: 1.0,
            bus: BusBackend::Database,
            bus_redis_url: None,
            bus_poll_interval_ms: 50,
            bus_retention_secs: 60,
            session_ttl_ms: 1_000,
        }
    }
}

impl CacheSettings {
    pub(crate) fn validate(&self) -> Result<(), super::SettingsError> {
        let invalid = |key: &str, message: &str| {
            Err(super::SettingsError::Invalid {
                key: key.into(),
                message: message.into(),
            })
        };
        if self.bus == BusBackend::Redis && self.bus_redis_url.is_none() {
            return invalid(
                "cache.bus_redis_url",
                "required when cache.bus = \"redis\" (for example redis://127.0.0.1:6379)",
            );
        }
        if self.ttl_jitter_percent > 50 {
            return invalid("cache.ttl_jitter_percent", "must be between 0 and 50");
        }
        if !(0.0..=10.0).contains(&self.early_refresh_beta) {
            return invalid("cache.early_refresh_beta", "must be between 0 and 10");
        }
        if self.bus_poll_interval_ms == 0 || self.bus_poll_interval_ms > 10_000 {
            return invalid("cache.bus_poll_interval_ms", "must be between 1 and 10000");
        }
        if self.session_ttl_ms > 60_000 {
            return invalid(
                "cache.session_ttl_ms",
                "must be at most 60000: a logout takes effect elsewhere only after it",
            );
        }
        if self.max_ttl_secs == 0 {
            return invalid("cache.max_ttl_secs", "must be at least 1");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogSettings {
    /// User ids (as in the accounts service's `id`) allowed to create,
    /// change and delete products.
    pub admin_user_ids: Vec<String>,
    /// How long product reads stay in the query cache, s.
    pub cache_ttl_secs: u64,
    /// `Cache-Control: max-age` of public reads (browsers), s.
    pub max_age_secs: u64,
    /// `s-maxage` of public reads (the gateway and CDNs), s.
    pub s_maxage_secs: u64,
    /// `stale-while-revalidate` of public reads, s.
    pub stale_while_revalidate_secs: u64,
    /// URLs that receive `POST {"tags": [...]}` after each write, such as
    /// the gateway's `http://127.0.0.1:8080/_gateway/admin/purge`.
    pub purge_urls: Vec<String>,
    /// Sent as `Authorization: Bearer ...` with purge requests when set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purge_token: Option<String>,
    /// Timeout of one purge request, ms.
    pub purge_timeout_ms: u64,
}

impl Default for CatalogSettings {
    fn default() -> Self {
        CatalogSettings {
            admin_user_ids: Vec::new(),
            cache_ttl_secs: 300,
            max_age_secs: 10,
            s_maxage_secs: 60,
            stale_while_revalidate_secs: 30,
            purge_urls: Vec::new(),
            purge_token: None,
            purge_timeout_ms: 2_000,
        }
    }
}
