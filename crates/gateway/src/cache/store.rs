//! Storage of the HTTP cache: stored responses in a moka cache bounded in
//! bytes (TinyLFU admission, LRU eviction within a window; a weigher counts
//! body, headers and keys), one small per-URL record naming the request
//! headers its responses vary on, and purge by URL, path or tag.
//!
//! Keys: the *URL key* is `http://<host><path>?<query>` (host lowercased,
//! path and query as sent). The *variant key* adds a generation number of
//! the URL record and the request's values of the headers named by the
//! response's `Vary`, so several variants of one URL live side by side and
//! a URL record that is replaced or purged orphans its old variants at once.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, StatusCode};
use http_cache_semantics::CachePolicy;
use moka::notification::RemovalCause;
use moka::sync::Cache;
use moka::Expiry;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// One stored response (one variant of one URL).
pub struct Entry {
    /// URL key (`http://host/path?query`).
    pub url: String,
    /// `/path?query`, for purges that name no host.
    pub path_and_query: String,
    pub status: StatusCode,
    /// What clients get: the origin's headers minus hop-by-hop fields,
    /// `Set-Cookie` and `Shoal-Cache-Control`.
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Freshness, built from the *effective* headers (a targeted
    /// `Shoal-Cache-Control` / `CDN-Cache-Control` in place of
    /// `Cache-Control`), `shared = true`.
    pub policy: CachePolicy,
    /// When the response stops being fresh.
    pub fresh_until: SystemTime,
    /// RFC 5861 windows after `fresh_until`.
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// False under `must-revalidate`, `proxy-revalidate` or `no-cache`: a
    /// stale copy is never served without a successful revalidation.
    pub may_serve_stale: bool,
    /// Has an ETag or Last-Modified: worth keeping while stale.
    pub has_validator: bool,
    /// Surrogate keys from `Surrogate-Key` and `Cache-Tag`.
    pub tags: Vec<String>,
    /// How long moka keeps it after insertion.
    pub keep_for: Duration,
    /// Set while a background refresh (stale-while-revalidate) runs.
    pub refreshing: AtomicBool,
    /// Weight in bytes (for the weigher and the stored-bytes gauge).
    pub weight: u32,
}

impl Entry {
    /// Approximate memory of an entry: body, headers, key and a fixed
    /// overhead for the policy and bookkeeping.
    pub fn weigh(url: &str, headers: &HeaderMap, body: &Bytes, tags: &[String]) -> u32 {
        let headers: usize = headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 16)
            .sum();
        let tags: usize = tags.iter().map(|t| t.len() + 24).sum();
        // The policy keeps a copy of the request and response headers.
        let total = body.len() + 2 * headers + 3 * url.len() + tags + 512;
        u32::try_from(total).unwrap_or(u32::MAX)
    }
}

/// The per-URL record: which request headers select a variant.
pub struct UrlRecord {
    /// Lowercase header names from the response's `Vary`.
    pub vary: Vec<HeaderName>,
    /// Distinguishes this record's variants from those of a replaced or
    /// purged record of the same URL.
    pub generation: u64,
    /// Variant keys stored under this record (for purge by URL).
    pub variants: Mutex<HashSet<String>>,
}

struct EntryExpiry;

impl Expiry<String, Arc<Entry>> for EntryExpiry {
    fn expire_after_create(&self, _: &String, value: &Arc<Entry>, _: Instant) -> Option<Duration> {
        Some(value.keep_for)
    }

    fn expire_after_update(
        &self,
        _: &String,
        value: &Arc<Entry>,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.keep_for)
    }
}

/// The stored responses and the URL records.
pub struct Store {
    entries: Cache<String, Arc<Entry>>,
    urls: Cache<String, Arc<UrlRecord>>,
    generation: AtomicU64,
    max_bytes: u64,
}

impl Store {
    pub fn new(max_bytes: u64) -> Store {
        let entries = Cache::builder()
            .name("shoal-gateway-http-cache")
            .max_capacity(max_bytes)
            .weigher(|_k: &String, v: &Arc<Entry>| v.weight)
            .expire_after(EntryExpiry)
            .support_invalidation_closures()
            .eviction_listener(|_k, v: Arc<Entry>, cause| {
                let why = match cause {
                    RemovalCause::Size => Some("size"),
                    RemovalCause::Expired => Some("expired"),
                    RemovalCause::Explicit => Some("purged"),
                    RemovalCause::Replaced => None,
                };
                if let Some(why) = why {
                    metrics::counter!("shoal_gateway_cache_evictions_total", "cause" => why)
                        .increment(1);
                }
                metrics::gauge!("shoal_gateway_cache_stored_bytes").decrement(v.weight as f64);
            })
            .build();
        // URL records are small; bounded by count, they outlive their
        // variants by at most a day without use.
        let urls = Cache::builder()
            .max_capacity(1_000_000)
            .time_to_idle(Duration::from_secs(24 * 3600))
            .build();
        Store {
            entries,
            urls,
            generation: AtomicU64::new(1),
            max_bytes,
        }
    }

    /// The URL record, if any response for the URL was stored.
    pub fn url_record(&self, url: &str) -> Option<Arc<UrlRecord>> {
        self.urls.get(url)
    }

    /// The variant key of a request under a URL record.
    pub fn variant_key(url: &str, record: &UrlRecord, request: &HeaderMap) -> String {
        let mut key = format!("{url}\n{}", record.generation);
        for name in &record.vary {
            key.push('\n');
            key.push_str(name.as_str());
            key.push('=');
            let values: Vec<&str> = request
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .map(str::trim)
                .collect();
            key.push_str(&values.join(","));
        }
        key
    }

    /// The stored variant for a request, or why there is none.
    pub fn lookup(&self, url: &str, request: &HeaderMap) -> Lookup {
        let Some(record) = self.url_record(url) else {
            return Lookup::UriMiss;
        };
        let key = Self::variant_key(url, &record, request);
        match self.entries.get(&key) {
            Some(e) => Lookup::Found(e),
            None => Lookup::VaryMiss,
        }
    }

    /// Stores a response under its URL and the request's variant; `vary`
    /// is the response's `Vary` list (never `*`).
    pub fn insert(&self, request: &HeaderMap, vary: Vec<HeaderName>, entry: Entry) {
        let url = entry.url.clone();
        let record = match self.urls.get(&url) {
            Some(r) if r.vary == vary => r,
            old => {
                // New URL, or its responses vary on other headers now:
                // the old variants cannot be selected any more.
                if let Some(old) = old {
                    self.drop_variants(&old);
                }
                let r = Arc::new(UrlRecord {
                    vary,
                    generation: self.generation.fetch_add(1, Ordering::Relaxed),
                    variants: Mutex::new(HashSet::new()),
                });
                self.urls.insert(url.clone(), Arc::clone(&r));
                r
            }
        };
        let key = Self::variant_key(&url, &record, request);
        if let Ok(mut v) = record.variants.lock() {
            // A few variants per URL in practice; keys of evicted ones are
            // dropped when the set grows.
            if v.len() >= 64 {
                v.retain(|k| self.entries.contains_key(k));
            }
            v.insert(key.clone());
        }
        metrics::gauge!("shoal_gateway_cache_stored_bytes").increment(entry.weight as f64);
        self.entries.insert(key, Arc::new(entry));
    }

    /// Replaces the entry stored under `old`'s variant (after a 304), if
    /// it is still the one stored.
    pub fn replace(
        &self,
        request: &HeaderMap,
        old: &Arc<Entry>,
        vary: Vec<HeaderName>,
        entry: Entry,
    ) {
        if let Some(record) = self.urls.get(&old.url) {
            let key = Self::variant_key(&old.url, &record, request);
            let current = self.entries.get(&key);
            if current.as_ref().is_some_and(|c| !Arc::ptr_eq(c, old)) {
                // Someone stored a newer response meanwhile; keep it.
                return;
            }
        }
        self.insert(request, vary, entry);
    }

    fn drop_variants(&self, record: &UrlRecord) {
        let keys: Vec<String> = match record.variants.lock() {
            Ok(mut v) => v.drain().collect(),
            Err(_) => Vec::new(),
        };
        for k in keys {
            self.entries.invalidate(&k);
        }
    }

    /// Removes every variant of a URL key. True when one was stored.
    pub fn purge_url(&self, url: &str) -> bool {
        match self.urls.remove(url) {
            Some(record) => {
                self.drop_variants(&record);
                true
            }
            None => false,
        }
    }

    /// Removes every variant of `/path?query` on every host.
    pub fn purge_path(&self, path_and_query: &str) {
        let p = path_and_query.to_string();
        let _ = self
            .entries
            .invalidate_entries_if(move |_, v| v.path_and_query == p);
    }

    /// Removes every response tagged with one of `tags`.
    pub fn purge_tags(&self, tags: Vec<String>) {
        let tags: HashSet<String> = tags.into_iter().collect();
        let _ = self
            .entries
            .invalidate_entries_if(move |_, v| v.tags.iter().any(|t| tags.contains(t)));
    }

    /// Removes everything.
    pub fn purge_all(&self) {
        self.entries.invalidate_all();
        self.urls.invalidate_all();
    }

    /// Entries, stored bytes and the bound, after pending maintenance.
    pub fn stats(&self) -> serde_json::Value {
        self.entries.run_pending_tasks();
        serde_json::json!({
            "entries": self.entries.entry_count(),
            "urls": self.urls.entry_count(),
            "stored_bytes": self.entries.weighted_size(),
            "max_bytes": self.max_bytes,
        })
    }
}

/// The result of a lookup.
pub enum Lookup {
    Found(Arc<Entry>),
    /// No response stored for the URL.
    UriMiss,
    /// Responses stored for the URL, none for this request's variant.
    VaryMiss,
}
