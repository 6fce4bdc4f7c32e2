//! Admission of proxied requests: GCRA rate limits (per client address or
//! per API-key header; per route or one for the whole gateway) answered
//! with 429, and load shedding past a concurrency cap (gateway-wide and per
//! pool) answered with 503. Both carry Retry-After and are counted in
//! metrics. Also the body wrapper that holds a permit until a response
//! body ends.

use crate::body::{problem_response, Body};
use crate::proxy::GatewayState;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::{header, Request, Response};

use shoal_core::settings::{GatewaySettings, RateLimitSettings};
use shoal_core::Problem;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Forget keys idle for a while every this many checks, so a limiter keyed
/// by client address does not grow without bound.
const RETAIN_EVERY: u64 = 4096;

/// One keyed GCRA limiter and what it is keyed by.
pub struct Limiter {
    /// Names the limiter among the gateways sharing Redis (`coord.rs`):
    /// `all`, or the route's host and prefix.
    id: String,
    settings: RateLimitSettings,
    /// Time between two requests at the sustained rate.
    interval: Duration,
    /// Lowercase header name, or `None` for the client address.
    header: Option<http::HeaderName>,
    limiter: DefaultKeyedRateLimiter<String>,
    checks: AtomicU64,
}

impl Limiter {
    fn new(id: String, settings: &RateLimitSettings) -> Limiter {
        let period =
            Duration::from_secs_f64(1.0 / settings.requests_per_sec).max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(settings.burst.max(1)).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        let header = settings
            .key
            .strip_prefix("header:")
            .and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok());
        Limiter {
            id,
            settings: settings.clone(),
            interval: period,
            header,
            limiter: RateLimiter::keyed(quota),
            checks: AtomicU64::new(0),
        }
    }

    /// `Err(wait)` when the key is over its rate.
    fn check(&self, key: &str) -> Result<(), Duration> {
        if self.checks.fetch_add(1, Ordering::Relaxed) % RETAIN_EVERY == RETAIN_EVERY - 1 {
            self.limiter.retain_recent();
        }
        self.limiter
            .check_key(&key.to_string())
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    fn key<B>(&self, req: &Request<B>, client_addr: SocketAddr) -> String {
        if let Some(h) = &self.header {
            if let Some(v) = req.headers().get(h) {
                return format!("h:{}", String::from_utf8_lossy(v.as_bytes()));
            }
        }
        format!("ip:{}", client_addr.ip())
    }
}

/// A count of requests in flight against a cap.
#[derive(Debug)]
pub struct Concurrency {
    max: usize,
    in_flight: Arc<AtomicUsize>,
}

impl Concurrency {
    /// `Err` past the cap; `Ok(None)` when there is no cap.
    fn try_acquire(&self) -> Result<Option<Permit>, ()> {
        if self.max == 0 {
            return Ok(None);
        }
        let prev = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if prev >= self.max {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            return Err(());
        }
        Ok(Some(Permit(Arc::clone(&self.in_flight))))
    }
}

/// One request counted in a [`Concurrency`] until dropped.
#[derive(Debug)]
pub struct Permit(Arc<AtomicUsize>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Every limit of one generation of the settings.
pub struct Limits {
    global_rate: Option<Arc<Limiter>>,
    /// By (host, prefix) of a route with its own `rate_limit`.
    route_rate: HashMap<(Option<String>, String), Arc<Limiter>>,
    gateway: Concurrency,
    pools: HashMap<String, Concurrency>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("gateway", &self.gateway)
            .finish_non_exhaustive()
    }
}

impl Limits {
    pub fn new(settings: &GatewaySettings) -> Limits {
        let route_rate = settings
            .routes
            .iter()
            .filter_map(|r| {
                let limit = r.rate_limit.as_ref()?;
                let host = r.host.as_deref().map(crate::routes::normalize_host);
                let id = format!("route:{}{}", host.as_deref().unwrap_or(""), r.prefix);
                Some(((host, r.prefix.clone()), Arc::new(Limiter::new(id, limit))))
            })
            .collect();
        Limits {
            global_rate: settings
                .rate_limit
                .as_ref()
                .map(|r| Arc::new(Limiter::new("all".into(), r))),
            route_rate,
            gateway: Concurrency {
                max: settings.max_concurrent_requests,
                in_flight: Arc::default(),
            },
            pools: settings
                .pools
                .iter()
                .map(|p| {
                    let max = settings
                        .pool_max_concurrent_requests
                        .get(&p.name)
                        .copied()
                        .unwrap_or(0);
                    (
                        p.name.clone(),
                        Concurrency {
                            max,
                            in_flight: Arc::default(),
                        },
                    )
                })
                .collect(),
        }
    }

    /// Keeps the in-flight counts and, where the settings did not change,
    /// the rate limiters' state of the previous generation (on reload).
    pub fn carry_from(&mut self, old: &Limits) {
        self.gateway.in_flight = Arc::clone(&old.gateway.in_flight);
        for (name, c) in &mut self.pools {
            if let Some(o) = old.pools.get(name) {
                c.in_flight = Arc::clone(&o.in_flight);
            }
        }
        if let (Some(new), Some(o)) = (&self.global_rate, &old.global_rate) {
            if new.settings == o.settings {
                self.global_rate = Some(Arc::clone(o));
            }
        }
        for (key, new) in &mut self.route_rate {
            if let Some(o) = old.route_rate.get(key) {
                if new.settings == o.settings {
                    *new = Arc::clone(o);
                }
            }
        }
    }
}

/// What an admitted request holds until its response body ends.
#[derive(Debug)]
pub struct Admission {
    gateway: Option<Permit>,
    pool: Option<Permit>,
}

impl Admission {
    /// Holds a permit (else there is nothing to keep until the response
    /// body ends).
    pub fn holds_anything(&self) -> bool {
        self.gateway.is_some() || self.pool.is_some()
    }
}

/// What [`admit`] decided, or that it needs the gateways' shared verdict.
pub enum Admit {
    Decided(Result<Admission, Response<Body>>),
    /// The rate limit is shared through Redis: ask [`shared_verdict`],
    /// then call [`admit`] again with its answer.
    AskShared(Arc<Limiter>, String),
}

/// The shared verdict on a limiter's key, falling back to the gateway's
/// own limiter when Redis cannot say.
pub async fn shared_verdict(
    coord: &crate::coord::Coord,
    limiter: &Limiter,
    key: &str,
) -> Result<(), Duration> {
    match coord
        .rate_check(&limiter.id, key, limiter.interval, limiter.settings.burst)
        .await
    {
        Some(verdict) => verdict,
        None => limiter.check(key),
    }
}

/// Rate limit, then concurrency caps, for a proxied request. `Err` is the
/// 429 or 503 to answer at once, with the routed pool in its `Outcome`.
/// `rate` is the shared verdict when [`Admit::AskShared`] was answered.
pub fn admit<B>(
    state: &GatewayState,
    client_addr: SocketAddr,
    req: &Request<B>,
    request_id: &str,
    rate: Option<Result<(), Duration>>,
) -> Admit {
    let limits = &state.limits;
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    let route = state.router.find(host, req.uri().path());
    let pool_name = route.map(|r| r.pool.name.as_str()).unwrap_or("-");
    // The access log and the request metrics (`stack::AccessLog`) count
    // the rejection; this counts why.
    let reject = |problem: Problem, what: &'static str| {
        metrics::counter!(what, "pool" => pool_name.to_string()).increment(1);
        let mut response = problem_response(&problem, request_id);
        response.extensions_mut().insert(crate::proxy::Outcome {
            pool: route.map(|r| Arc::clone(&r.pool)),
            cause: problem.detail.clone(),
            ..Default::default()
        });
        response
    };

    let limiter = route
        .filter(|_| !limits.route_rate.is_empty())
        .and_then(|r| limits.route_rate.get(&(r.host.clone(), r.prefix.clone())))
        .or(limits.global_rate.as_ref());
    if let Some(limiter) = limiter {
        let verdict = match rate {
            Some(v) => v,
            None => {
                let key = limiter.key(req, client_addr);
                match &state.coord {
                    Some(coord) if coord.available() => {
                        return Admit::AskShared(Arc::clone(limiter), key)
                    }
                    _ => limiter.check(&key),
                }
            }
        };
        if let Err(wait) = verdict {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            return Admit::Decided(Err(reject(
                Problem::too_many_requests(
                    format!(
                        "rate limit of {} requests/s (burst {}) exceeded",
                        limiter.settings.requests_per_sec, limiter.settings.burst
                    ),
                    secs.max(1),
                ),
                "shoal_gateway_rate_limited_total",
            )));
        }
    }

    let gateway = match limits.gateway.try_acquire() {
        Ok(p) => p,
        Err(()) => {
            return Admit::Decided(Err(reject(
                Problem::unavailable(
                    format!(
                        "the gateway is at its limit of {} requests in flight",
                        limits.gateway.max
                    ),
                    1,
                ),
                "shoal_gateway_shed_total",
            )))
        }
    };
    let pool = match route.and_then(|r| limits.pools.get(&r.pool.name)) {
        None => None,
        Some(c) => match c.try_acquire() {
            Ok(p) => p,
            Err(()) => {
                return Admit::Decided(Err(reject(
                    Problem::unavailable(
                        format!(
                            "pool `{pool_name}` is at its limit of {} requests in flight",
                            c.max
                        ),
                        1,
                    ),
                    "shoal_gateway_shed_total",
                )))
            }
        },
    };
    Admit::Decided(Ok(Admission { gateway, pool }))
}
