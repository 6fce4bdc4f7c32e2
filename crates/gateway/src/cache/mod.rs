//! The gateway's HTTP cache (RFC 9111 shared cache, plus RFC 5861
//! stale-while-revalidate / stale-if-error, RFC 9213 targeted cache
//! control and RFC 9211 Cache-Status), sitting between routing and
//! forwarding. See `docs/gateway-cache.md`.
//!
//! Per request (`serve`): unsafe methods are forwarded and, on 2xx/3xx,
//! invalidate their URL and same-host `Location` / `Content-Location`.
//! GET and HEAD on a route with caching on are looked up by URL and
//! variant (`store`); a fresh entry is served with `Age`; a stale one is
//! served at once while one background refresh runs (within
//! stale-while-revalidate), or revalidated upstream with its validators
//! (a 304 merges headers into the stored response), falling back to the
//! stale copy on a 5xx or a failed origin (within stale-if-error).
//! Concurrent misses for one URL are coalesced into one origin request.
//! Freshness and storability come from `http-cache-semantics`
//! (`CachePolicy`, shared); our additions live in `rules`.

pub mod purge;
pub mod rules;
pub mod store;

use crate::body::{empty, full, problem_response, Body, BoxError, X_REQUEST_ID};
use crate::proxy::{GatewayState, Outcome};
use crate::stack::Next;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::{request, response, Method, Request, Response, StatusCode, Uri};
use http_body::Frame;
use http_body_util::{BodyExt, BodyStream, StreamBody};
use http_cache_semantics::{AfterResponse, BeforeRequest, CacheOptions, CachePolicy};
use rules::{CACHE_STATUS, SHOAL_CACHE_CONTROL};
use shoal_core::settings::GatewaySettings;
use shoal_core::Problem;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use store::{Entry, Lookup, Store};
use tokio::sync::watch;

/// Cache settings copied out of `[gateway.cache]`.
#[derive(Debug, Clone)]
struct Settings {
    enabled: bool,
    max_object_bytes: usize,
    coalesce_timeout: Duration,
    hit_for_pass: Duration,
    keep_stale: Duration,
    options: CacheOptions,
    purge_peers: Vec<String>,
    purge_peer_timeout: Duration,
    admin_token: Option<String>,
}

/// What outlives a settings reload: the stored responses and the
/// in-flight requests.
struct Core {
    store: Store,
    /// URL key → a receiver that wakes when the leading request is done.
    flights: Mutex<HashMap<String, watch::Receiver<()>>>,
    /// URLs whose last response was not storable: not coalesced for a while
    /// (Varnish's hit-for-pass).
    pass_marks: moka::sync::Cache<String, ()>,
    /// Bumped by every purge (by URL, tag or all, through the admin API);
    /// a response fetched across a bump is served but not stored (it may
    /// predate the purge).
    epoch: AtomicU64,
    /// Counts invalidations by unsafe methods; `invalidated` keeps, per
    /// URL, the count at its last one. A response fetched across an
    /// invalidation of its own URL is not stored; other URLs' writes do
    /// not matter (a global bump here kept a site with steady writes from
    /// storing much at all: cache-tests.fyi's parallel run found it).
    invalidation_seq: AtomicU64,
    invalidated: moka::sync::Cache<String, u64>,
}

/// When an origin fetch started, to tell whether a purge or an
/// invalidation of its URL came while it was in flight.
#[derive(Debug, Clone, Copy)]
struct Since {
    epoch: u64,
    invalidation: u64,
}

impl Core {
    fn since(&self) -> Since {
        Since {
            epoch: self.epoch.load(Ordering::SeqCst),
            invalidation: self.invalidation_seq.load(Ordering::SeqCst),
        }
    }

    /// True when nothing since `since` may have made a response for `url`
    /// fetched then outdated.
    fn may_store(&self, url: &str, since: Since) -> bool {
        self.epoch.load(Ordering::SeqCst) == since.epoch
            && self
                .invalidated
                .get(url)
                .is_none_or(|at| at <= since.invalidation)
    }
}

/// The HTTP cache of one gateway generation (see `carry_from`).
pub struct HttpCache {
    core: Arc<Core>,
    settings: Settings,
}

impl std::fmt::Debug for HttpCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpCache")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl HttpCache {
    /// A cache when caching is on globally or on any route; `None`
    /// otherwise (the proxy path is then untouched).
    pub fn from_settings(s: &GatewaySettings) -> Option<HttpCache> {
        let c = &s.cache;
        let any_route = s.routes.iter().any(|r| r.cache == Some(true));
        if !c.enabled && !any_route {
            return None;
        }
        let settings = Settings {
            enabled: c.enabled,
            max_object_bytes: usize::try_from(c.max_object_bytes).unwrap_or(usize::MAX),
            coalesce_timeout: Duration::from_millis(c.coalesce_timeout_ms),
            hit_for_pass: Duration::from_secs(c.hit_for_pass_secs),
            keep_stale: Duration::from_secs(c.keep_stale_secs),
            options: CacheOptions {
                shared: true,
                cache_heuristic: c.heuristic_percent as f32 / 100.0,
                ..CacheOptions::default()
            },
            purge_peers: c
                .purge_peers
                .iter()
                .map(|p| p.trim_end_matches('/').to_string())
                .collect(),
            purge_peer_timeout: Duration::from_millis(c.purge_peer_timeout_ms),
            admin_token: s.admin_token.clone(),
        };
        let core = Core {
            store: Store::new(c.max_bytes),
            flights: Mutex::new(HashMap::new()),
            pass_marks: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(settings.hit_for_pass.max(Duration::from_secs(1)))
                .build(),
            epoch: AtomicU64::new(0),
            invalidation_seq: AtomicU64::new(0),
            // Kept longer than any origin fetch may take.
            invalidated: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(
                    Duration::from_millis(s.request_timeout_ms).max(Duration::from_secs(60)) * 2,
                )
                .build(),
        };
        Some(HttpCache {
            core: Arc::new(core),
            settings,
        })
    }

    /// Keeps the stored responses of the previous generation on reload
    /// (its `max_bytes` too: a new size takes a restart).
    pub fn carry_from(&mut self, old: &HttpCache) {
        self.core = Arc::clone(&old.core);
    }

    /// `GET /_gateway/cache`.
    pub fn stats(&self) -> serde_json::Value {
        let mut v = self.core.store.stats();
        v["enabled"] = serde_json::Value::Bool(self.settings.enabled);
        v
    }

    fn bump_epoch(&self) {
        self.core.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Drops every variant of a URL key (and its hit-for-pass mark), and
    /// keeps a fetch of it already in flight from storing its answer.
    fn invalidate_url(&self, url: &str) {
        let seq = self.core.invalidation_seq.fetch_add(1, Ordering::SeqCst) + 1;
        self.core.invalidated.insert(url.to_string(), seq);
        self.core.store.purge_url(url);
        self.core.pass_marks.invalidate(url);
    }
}

/// `GET /_gateway/cache`: stats, or `{"enabled": false}`.
pub fn stats_json(state: &GatewayState) -> Response<Body> {
    let v = match &state.cache {
        Some(c) => c.stats(),
        None => serde_json::json!({ "enabled": false }),
    };
    crate::body::json_response(StatusCode::OK, &v)
}

/// Answers from the cache (fresh, coalesced, stale or revalidated) and
/// misses (none stored, or expired without a validator), for the
/// console's hit ratio; passes count in neither.
pub static HITS: AtomicU64 = AtomicU64::new(0);
pub static MISSES: AtomicU64 = AtomicU64::new(0);

fn count(result: &'static str) {
    match result {
        "hit" | "coalesced" | "stale" | "revalidated" => HITS.fetch_add(1, Ordering::Relaxed),
        "pass" => 0,
        _ => MISSES.fetch_add(1, Ordering::Relaxed),
    };
    metrics::counter!("shoal_gateway_cache_requests_total", "result" => result).increment(1);
}

/// The URL key's `http://host` part: host lowercased, `:80` dropped.
fn scheme_host(host: &str) -> String {
    let host = host.trim().to_ascii_lowercase();
    let host = host.strip_suffix(":80").unwrap_or(&host);
    format!("http://{host}")
}

/// Whether caching is on for the route that serves this host and path.
fn route_enabled(state: &GatewayState, cache: &HttpCache, host: Option<&str>, path: &str) -> bool {
    let Some(route) = state.router.find(host, path) else {
        return false;
    };
    let own = state.settings.routes.iter().find(|r| {
        r.prefix == route.prefix
            && r.host.as_deref().map(crate::routes::normalize_host) == route.host
            && r.pool == route.pool.name
    });
    own.and_then(|r| r.cache).unwrap_or(cache.settings.enabled)
}

fn cache_status(value: &str) -> HeaderValue {
    HeaderValue::from_str(value).unwrap_or(HeaderValue::from_static("shoal"))
}

/// Adds Cache-Status and drops Shoal-Cache-Control on a response that
/// went through the cache.
fn finish(mut response: Response<Body>, status: &str) -> Response<Body> {
    let h = response.headers_mut();
    h.remove(SHOAL_CACHE_CONTROL);
    h.append(CACHE_STATUS, cache_status(status));
    response
}

/// Sends `req` down the rest of the stack (the proxy) under the
/// request's context, and takes what the proxy learned into `outcome`.
async fn forward(
    next: &Next,
    rctx: &crate::stack::Ctx,
    mut req: Request<Body>,
    outcome: &mut Outcome,
) -> Response<Body> {
    req.extensions_mut().insert(rctx.clone());
    let mut response = match crate::stack::call(next, req).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    if let Some(learned) = response.extensions_mut().remove::<Outcome>() {
        *outcome = learned;
    }
    response
}

/// Handles one proxied request when the gateway has a cache; `next` is
/// the rest of the stack. The response carries the request's `Outcome`.
pub(crate) async fn serve(next: Next, req: Request<Body>) -> Response<Body> {
    let Some(rctx) = req.extensions().get::<crate::stack::Ctx>().cloned() else {
        return crate::stack::no_context();
    };
    let mut outcome = Outcome::default();
    let mut response = match rctx.state.cache.as_ref() {
        Some(cache) => cached(&next, &rctx, cache, req, &mut outcome).await,
        None => forward(&next, &rctx, req, &mut outcome).await,
    };
    response.extensions_mut().insert(outcome);
    response
}

async fn cached<'s>(
    next: &'s Next,
    rctx: &'s crate::stack::Ctx,
    cache: &'s HttpCache,
    req: Request<Body>,
    outcome: &mut Outcome,
) -> Response<Body> {
    let state = &rctx.state;
    let request_id = rctx.request_id.as_str();
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    let Some(host) = host else {
        return forward(next, rctx, req, outcome).await;
    };
    let path = req.uri().path().to_string();
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let base = scheme_host(&host);
    let url = format!("{base}{pq}");
    let method = req.method().clone();
    let enabled = route_enabled(state, cache, Some(&host), &path);

    if rules::is_unsafe(&method) {
        let response = forward(next, rctx, req, outcome).await;
        let s = response.status();
        if s.is_success() || s.is_redirection() {
            cache.invalidate_url(&url);
            for name in [header::LOCATION, header::CONTENT_LOCATION] {
                if let Some(other) = response
                    .headers()
                    .get(&name)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| rules::same_host_url(v, &base, &path))
                {
                    cache.invalidate_url(&other);
                }
            }
            metrics::counter!("shoal_gateway_cache_invalidations_total").increment(1);
        }
        if !enabled {
            return response;
        }
        count("pass");
        return finish(response, "shoal; fwd=method");
    }
    if !enabled {
        return forward(next, rctx, req, outcome).await;
    }
    if method != Method::GET && method != Method::HEAD {
        count("pass");
        let r = forward(next, rctx, req, outcome).await;
        return finish(r, "shoal; fwd=method");
    }
    if req.headers().contains_key(header::RANGE) {
        count("pass");
        let r = forward(next, rctx, req, outcome).await;
        return finish(r, "shoal; fwd=request; detail=range");
    }
    if let Some(route) = state.router.find(Some(&host), &path) {
        outcome.pool = Some(Arc::clone(&route.pool));
    }

    let (parts, _no_body) = req.into_parts();
    let ctx = Ctx {
        next,
        rctx,
        state,
        cache,
        request_id,
        head: parts.method == Method::HEAD,
        client: parts.headers.clone(),
        norm: normalized(&parts, &url, &host),
        url,
        pq,
    };
    ctx.run(outcome).await
}

/// The request as the cache sees it: GET (HEAD is served from a stored
/// GET), the absolute URL key, the client's headers without conditionals
/// or Range (the cache answers those itself) and with `Host`.
fn normalized(parts: &request::Parts, url: &str, host: &str) -> request::Parts {
    let mut headers = parts.headers.clone();
    for name in rules::CONDITIONAL {
        headers.remove(name);
    }
    if let Ok(h) = HeaderValue::from_str(host) {
        headers.insert(header::HOST, h);
    }
    let mut p = Request::new(()).into_parts().0;
    p.method = Method::GET;
    p.uri = url.parse().unwrap_or_else(|_| Uri::from_static("/"));
    p.headers = headers;
    p
}

/// One cached request's context.
struct Ctx<'s, 'r> {
    next: &'s Next,
    rctx: &'s crate::stack::Ctx,
    state: &'s Arc<GatewayState>,
    cache: &'s HttpCache,
    request_id: &'r str,
    head: bool,
    /// The client's headers as sent (for its own conditionals).
    client: HeaderMap,
    norm: request::Parts,
    url: String,
    pq: String,
}

/// The result of an origin request the cache made.
enum Fetched {
    /// A storable response, read whole (stored unless a purge raced it).
    Stored {
        entry: Arc<Entry>,
        /// The origin's headers for the client that caused the fetch.
        headers: HeaderMap,
        stored: bool,
    },
    /// 304 for the stale entry: the updated entry.
    Revalidated { entry: Arc<Entry>, stored: bool },
    /// Not storable: passed on as it came.
    Pass {
        response: Response<Body>,
        detail: &'static str,
    },
    /// A 5xx from the origin or the gateway's own 502/503/504.
    Failed(Response<Body>),
    /// A 304 that does not match the stored validators.
    Mismatch,
}

impl<'s, 'r> Ctx<'s, 'r> {
    async fn run(&self, outcome: &mut Outcome) -> Response<Body> {
        let mut waited = false;
        let mut leader: Option<FlightGuard> = None;
        loop {
            let now = SystemTime::now();
            let mut stale: Option<(Arc<Entry>, HeaderMap)> = None;
            let miss = match self.cache.core.store.lookup(&self.url, &self.norm.headers) {
                // The plain case first, without the full policy check.
                Lookup::Found(e) if plainly_fresh(&e, &self.norm, now) => {
                    return self.fresh_hit(&e, now, waited);
                }
                Lookup::Found(e) => match e.policy.before_request(&self.norm, now) {
                    BeforeRequest::Fresh(_) => return self.fresh_hit(&e, now, waited),
                    BeforeRequest::Stale { request, matches } if matches => {
                        let stale_for = now.duration_since(e.fresh_until).unwrap_or_default();
                        if e.may_serve_stale
                            && !client_no_cache(&self.norm.headers)
                            && !e.stale_while_revalidate.is_zero()
                            && stale_for <= e.stale_while_revalidate
                        {
                            self.spawn_refresh(&e, request.headers);
                            count("stale");
                            let ttl = rules::signed_secs(now, e.fresh_until);
                            return self.respond_stored(
                                &e,
                                now,
                                &format!("shoal; hit; ttl={ttl}; detail=stale-while-revalidate"),
                            );
                        }
                        stale = Some((e, request.headers));
                        "stale"
                    }
                    BeforeRequest::Stale { .. } => "vary-miss",
                },
                Lookup::UriMiss => "uri-miss",
                Lookup::VaryMiss => "vary-miss",
            };
            if leader.is_none() && !waited && !self.cache.core.pass_marks.contains_key(&self.url) {
                match join_flight(&self.cache.core, &self.url) {
                    Flight::Leader(g) => {
                        // Look again: a leader may have finished between
                        // our lookup and joining.
                        leader = Some(g);
                        continue;
                    }
                    Flight::Follower(mut rx) => {
                        let _ = tokio::time::timeout(
                            self.cache.settings.coalesce_timeout,
                            rx.changed(),
                        )
                        .await;
                        waited = true;
                        continue;
                    }
                }
            }
            let response = self.fetch(stale, miss, outcome).await;
            drop(leader);
            return response;
        }
    }

    /// Goes to the origin (conditionally when `stale` has validators),
    /// stores what may be stored and answers the client.
    async fn fetch(
        &self,
        stale: Option<(Arc<Entry>, HeaderMap)>,
        miss: &'static str,
        outcome: &mut Outcome,
    ) -> Response<Body> {
        let fwd = if stale.is_some() { "stale" } else { miss };
        let (stale_entry, headers) = match stale {
            Some((e, h)) => (Some(e), h),
            None => (None, self.norm.headers.clone()),
        };
        let mut fetched = self.origin(headers, stale_entry.as_ref(), outcome).await;
        if matches!(fetched, Fetched::Mismatch) {
            fetched = self.origin(self.norm.headers.clone(), None, outcome).await;
        }
        let now = SystemTime::now();
        match fetched {
            Fetched::Stored {
                entry,
                headers,
                stored,
            } => {
                count(if stale_entry.is_some() {
                    "revalidated"
                } else {
                    "miss"
                });
                let mut status = format!("shoal; fwd={fwd}; fwd-status={}", entry.status.as_u16());
                if stored {
                    status.push_str("; stored");
                }
                let age = entry.policy.age(now).as_secs();
                self.respond(entry.status, headers, &entry.body, Some(age), &status)
            }
            Fetched::Revalidated { entry, stored } => {
                count("revalidated");
                let mut status = format!("shoal; fwd={fwd}; fwd-status=304");
                if stored {
                    status.push_str("; stored");
                }
                self.respond_stored(&entry, now, &status)
            }
            Fetched::Pass { response, detail } => {
                count("pass");
                let status = format!(
                    "shoal; fwd={fwd}; fwd-status={}; detail={detail}",
                    response.status().as_u16()
                );
                let mut r = finish(response, &status);
                if self.head {
                    *r.body_mut() = empty();
                }
                r
            }
            Fetched::Failed(response) => {
                if let Some(e) = stale_entry {
                    let stale_for = now.duration_since(e.fresh_until).unwrap_or_default();
                    if e.may_serve_stale
                        && !e.stale_if_error.is_zero()
                        && stale_for <= e.stale_if_error
                    {
                        count("stale");
                        metrics::counter!("shoal_gateway_cache_stale_if_error_total").increment(1);
                        let ttl = rules::signed_secs(now, e.fresh_until);
                        return self.respond_stored(
                            &e,
                            now,
                            &format!(
                                "shoal; fwd=stale; fwd-status={}; ttl={ttl}; detail=stale-if-error",
                                response.status().as_u16()
                            ),
                        );
                    }
                }
                count("pass");
                let status = format!(
                    "shoal; fwd={fwd}; fwd-status={}",
                    response.status().as_u16()
                );
                finish(response, &status)
            }
            Fetched::Mismatch => {
                count("pass");
                let r = problem_response(
                    &Problem::bad_gateway("the origin answered 304 to an unconditional request"),
                    self.request_id,
                );
                finish(r, &format!("shoal; fwd={fwd}; fwd-status=304"))
            }
        }
    }

    /// One origin request through the proxy (balancing, retries, timeouts)
    /// and what to do with its answer.
    async fn origin(
        &self,
        headers: HeaderMap,
        stale: Option<&Arc<Entry>>,
        outcome: &mut Outcome,
    ) -> Fetched {
        let since = self.cache.core.since();
        let req = upstream_request(&self.pq, headers);
        let response = forward(self.next, self.rctx, req, outcome).await;
        process(
            self.cache,
            &self.norm,
            &self.url,
            &self.pq,
            stale,
            response,
            since,
            self.state.settings.request_timeout_ms,
        )
        .await
    }

    /// Stale-while-revalidate: one background refresh per stale entry.
    fn spawn_refresh(&self, entry: &Arc<Entry>, headers: HeaderMap) {
        if entry
            .refreshing
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return;
        }
        let state = Arc::clone(self.state);
        let core = Arc::clone(&self.cache.core);
        let entry = Arc::clone(entry);
        let norm = clone_parts(&self.norm);
        let url = self.url.clone();
        let pq = self.pq.clone();
        let next = self.next.clone();
        // The refresh is a request of its own, with its own id.
        let rctx = crate::stack::Ctx {
            request_id: shoal_core::ids::request_id_or_new(None),
            started: std::time::Instant::now(),
            ..self.rctx.clone()
        };
        tokio::spawn(async move {
            let Some(cache) = state.cache.as_ref() else {
                return;
            };
            // The generation of the request; carry_from shares the core.
            debug_assert!(Arc::ptr_eq(&cache.core, &core));
            let mut outcome = Outcome::default();
            let since = core.since();
            let req = upstream_request(&pq, headers);
            let response = forward(&next, &rctx, req, &mut outcome).await;
            let fetched = process(
                cache,
                &norm,
                &url,
                &pq,
                Some(&entry),
                response,
                since,
                state.settings.request_timeout_ms,
            )
            .await;
            let result = match fetched {
                Fetched::Stored { .. } => "stored",
                Fetched::Revalidated { .. } => "revalidated",
                Fetched::Pass { .. } => "pass",
                Fetched::Failed(_) | Fetched::Mismatch => {
                    // Let a later request try again.
                    entry.refreshing.store(false, Ordering::SeqCst);
                    "failed"
                }
            };
            tracing::debug!(url = %url, result, "background refresh");
            metrics::counter!("shoal_gateway_cache_refreshes_total", "result" => result)
                .increment(1);
        });
    }

    /// Answers from a stored entry: Age, Cache-Status, request id, HEAD
    /// without body, 304 when the client's conditional matches.
    /// Answers from a fresh stored entry (counted as coalesced when this
    /// request waited for another's origin fetch).
    fn fresh_hit(&self, e: &Entry, now: SystemTime, waited: bool) -> Response<Body> {
        count(if waited { "coalesced" } else { "hit" });
        let ttl = rules::signed_secs(now, e.fresh_until);
        self.respond_stored(e, now, &format!("shoal; hit; ttl={ttl}"))
    }

    fn respond_stored(&self, e: &Entry, now: SystemTime, status: &str) -> Response<Body> {
        let age = e.policy.age(now).as_secs();
        self.respond(e.status, e.headers.clone(), &e.body, Some(age), status)
    }

    fn respond(
        &self,
        code: StatusCode,
        headers: HeaderMap,
        body: &Bytes,
        age: Option<u64>,
        status: &str,
    ) -> Response<Body> {
        let not_modified =
            code == StatusCode::OK && rules::not_modified_for(&self.client, &headers);
        let (code, mut headers, body) = if not_modified {
            (
                StatusCode::NOT_MODIFIED,
                rules::not_modified_headers(&headers),
                empty(),
            )
        } else if self.head {
            (code, headers, empty())
        } else {
            (code, headers, full(body.clone()))
        };
        if let Some(age) = age {
            headers.insert(header::AGE, HeaderValue::from(age));
        }
        if let Ok(v) = HeaderValue::from_str(self.request_id) {
            headers.insert(X_REQUEST_ID, v);
        }
        let mut r = Response::new(body);
        *r.status_mut() = code;
        *r.headers_mut() = headers;
        finish(r, status)
    }
}

/// A hit that needs none of `CachePolicy::before_request`'s work (it
/// rebuilds and re-parses the stored headers on every call): the entry is
/// fresh and may be served without revalidation (no `no-cache`,
/// `must-revalidate`, `proxy-revalidate`), the variant already matched the
/// request's `Vary` fields in the lookup, and the request is a plain GET or
/// HEAD with no `Cache-Control` or `Pragma` of its own. Everything else
/// takes the full RFC 9111 path.
fn plainly_fresh(e: &Entry, req: &request::Parts, now: SystemTime) -> bool {
    e.may_serve_stale
        && now < e.fresh_until
        && (req.method == Method::GET || req.method == Method::HEAD)
        && !req.headers.contains_key(header::CACHE_CONTROL)
        && !req.headers.contains_key(header::PRAGMA)
}

fn client_no_cache(h: &HeaderMap) -> bool {
    rules::directives(h).iter().any(|(k, _)| k == "no-cache")
        || h.get(header::PRAGMA)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("no-cache"))
}

fn clone_parts(p: &request::Parts) -> request::Parts {
    let mut c = Request::new(()).into_parts().0;
    c.method = p.method.clone();
    c.uri = p.uri.clone();
    c.headers = p.headers.clone();
    c
}

/// A GET for the origin; `forward` adds the forwarding headers.
fn upstream_request(pq: &str, headers: HeaderMap) -> Request<Body> {
    let mut r = Request::new(empty());
    *r.method_mut() = Method::GET;
    *r.uri_mut() = pq.parse().unwrap_or_else(|_| Uri::from_static("/"));
    *r.headers_mut() = headers;
    r
}

fn response_parts(status: StatusCode, headers: HeaderMap) -> response::Parts {
    let mut p = Response::new(()).into_parts().0;
    p.status = status;
    p.headers = headers;
    p
}

/// Decides what an origin response means for the cache and stores it.
#[allow(clippy::too_many_arguments)]
async fn process(
    cache: &HttpCache,
    norm: &request::Parts,
    url: &str,
    pq: &str,
    stale: Option<&Arc<Entry>>,
    response: Response<Body>,
    since: Since,
    body_timeout_ms: u64,
) -> Fetched {
    let core = &cache.core;
    let now = SystemTime::now();
    let status = response.status();
    if status.is_server_error() {
        return Fetched::Failed(response);
    }
    let effective = rules::effective_headers(response.headers());
    if status == StatusCode::NOT_MODIFIED {
        let Some(old) = stale else {
            return Fetched::Pass {
                response,
                detail: "not-modified",
            };
        };
        let parts304 = response_parts(status, effective);
        return match old.policy.after_response(norm, &parts304, now) {
            AfterResponse::NotModified(policy, _) => {
                let merged = rules::merge_304(&old.headers, response.headers());
                let eff = rules::effective_headers(&merged);
                let vary = rules::vary_names(&eff).unwrap_or_default();
                let entry = make_entry(
                    cache,
                    url,
                    pq,
                    old.status,
                    merged,
                    old.body.clone(),
                    policy,
                    &eff,
                    now,
                );
                let stored = core.may_store(url, since);
                let entry = Arc::new(entry);
                if stored {
                    core.store
                        .replace(&norm.headers, old, vary, clone_entry(&entry));
                }
                Fetched::Revalidated { entry, stored }
            }
            AfterResponse::Modified(..) => Fetched::Mismatch,
        };
    }

    let policy = CachePolicy::new_options(
        norm,
        &response_parts(status, effective.clone()),
        now,
        cache.settings.options,
    );
    let content_length = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let reason = if !policy.is_storable() {
        Some("not-storable")
    } else if let Some(r) = rules::not_storable_reason(status, &effective) {
        Some(r)
    } else if content_length.is_some_and(|n| n > cache.settings.max_object_bytes as u64) {
        Some("too-large")
    } else {
        None
    };
    let mark_pass = |core: &Core| {
        if !cache.settings.hit_for_pass.is_zero() {
            core.pass_marks.insert(url.to_string(), ());
        }
    };
    if let Some(detail) = reason {
        mark_pass(core);
        return Fetched::Pass { response, detail };
    }
    let (parts, body) = response.into_parts();
    let read = read_limited(
        body,
        cache.settings.max_object_bytes,
        Duration::from_millis(body_timeout_ms),
    )
    .await;
    let bytes = match read {
        Read::Whole(b) => b,
        Read::TooLarge(body) => {
            mark_pass(core);
            return Fetched::Pass {
                response: Response::from_parts(parts, body),
                detail: "too-large",
            };
        }
        Read::Failed(cause) => {
            tracing::debug!(url, cause = %cause, "origin body failed");
            return Fetched::Failed(problem_response(
                &Problem::bad_gateway("the upstream response body broke off"),
                "",
            ));
        }
    };
    let stored_headers = rules::stored_headers(&parts.headers);
    let vary = rules::vary_names(&effective).unwrap_or_default();
    let entry = make_entry(
        cache,
        url,
        pq,
        status,
        stored_headers,
        bytes,
        policy,
        &effective,
        now,
    );
    let entry = Arc::new(entry);
    let worth_keeping = !entry.keep_for.is_zero();
    let stored = worth_keeping && core.may_store(url, since);
    if stored {
        core.store.insert(&norm.headers, vary, clone_entry(&entry));
        core.pass_marks.invalidate(url);
    } else if !worth_keeping {
        mark_pass(core);
    }
    let mut headers = parts.headers;
    headers.remove(header::AGE);
    Fetched::Stored {
        entry,
        headers,
        stored,
    }
}

fn clone_entry(e: &Entry) -> Entry {
    Entry {
        url: e.url.clone(),
        path_and_query: e.path_and_query.clone(),
        status: e.status,
        headers: e.headers.clone(),
        body: e.body.clone(),
        policy: e.policy.clone(),
        fresh_until: e.fresh_until,
        stale_while_revalidate: e.stale_while_revalidate,
        stale_if_error: e.stale_if_error,
        may_serve_stale: e.may_serve_stale,
        has_validator: e.has_validator,
        tags: e.tags.clone(),
        keep_for: e.keep_for,
        refreshing: std::sync::atomic::AtomicBool::new(false),
        weight: e.weight,
    }
}

#[allow(clippy::too_many_arguments)]
fn make_entry(
    cache: &HttpCache,
    url: &str,
    pq: &str,
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    policy: CachePolicy,
    effective: &HeaderMap,
    now: SystemTime,
) -> Entry {
    let ttl = policy.time_to_live(now);
    let stale = rules::stale_rules(effective);
    let has_validator = rules::has_validator(&headers);
    let mut keep_for = ttl;
    if stale.may_serve_stale {
        keep_for += stale.stale_while_revalidate.max(stale.stale_if_error);
    }
    if has_validator {
        keep_for += cache.settings.keep_stale;
    }
    let keep_for = keep_for.min(Duration::from_secs(365 * 24 * 3600));
    let tags = rules::tags(&headers);
    let weight = Entry::weigh(url, &headers, &body, &tags);
    Entry {
        url: url.to_string(),
        path_and_query: pq.to_string(),
        status,
        headers,
        body,
        policy,
        fresh_until: now + ttl,
        stale_while_revalidate: stale.stale_while_revalidate,
        stale_if_error: stale.stale_if_error,
        may_serve_stale: stale.may_serve_stale,
        has_validator,
        tags,
        keep_for,
        refreshing: std::sync::atomic::AtomicBool::new(false),
        weight,
    }
}

enum Read {
    Whole(Bytes),
    /// Past the limit: what was read, then the rest, streaming.
    TooLarge(Body),
    Failed(String),
}

async fn read_limited(mut body: Body, limit: usize, deadline: Duration) -> Read {
    let mut buf = BytesMut::new();
    let read = async {
        loop {
            match body.frame().await {
                None => return Ok(true),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        buf.extend_from_slice(&data);
                    }
                    if buf.len() > limit {
                        return Ok(false);
                    }
                }
            }
        }
    };
    match tokio::time::timeout(deadline, read).await {
        Err(_) => Read::Failed("timed out reading the body".into()),
        Ok(Err(e)) => Read::Failed(e),
        Ok(Ok(true)) => Read::Whole(buf.freeze()),
        Ok(Ok(false)) => {
            let head = futures_util::stream::iter([Ok::<_, BoxError>(Frame::data(buf.freeze()))]);
            Read::TooLarge(StreamBody::new(head.chain(BodyStream::new(body))).boxed_unsync())
        }
    }
}

/// Request coalescing: the first miss for a URL leads, the others wait.
enum Flight {
    Leader(FlightGuard),
    Follower(watch::Receiver<()>),
}

/// Held by the leading request; dropping it wakes the followers.
struct FlightGuard {
    core: Arc<Core>,
    key: String,
    _done: watch::Sender<()>,
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if let Ok(mut f) = self.core.flights.lock() {
            f.remove(&self.key);
        }
        // `_done` drops after this: followers see the sender closed.
    }
}

fn join_flight(core: &Arc<Core>, key: &str) -> Flight {
    let mut flights = match core.flights.lock() {
        Ok(f) => f,
        Err(p) => p.into_inner(),
    };
    if let Some(rx) = flights.get(key) {
        return Flight::Follower(rx.clone());
    }
    let (tx, rx) = watch::channel(());
    flights.insert(key.to_string(), rx);
    Flight::Leader(FlightGuard {
        core: Arc::clone(core),
        key: key.to_string(),
        _done: tx,
    })
}
