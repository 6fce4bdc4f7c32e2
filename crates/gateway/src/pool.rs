//! Pools of upstream instances: each instance's health, ejection, load
//! (outstanding requests, peak-EWMA latency) and registration expiry, and
//! the pool's choice of an instance through its balancer.

use crate::balance::{Balancer, PickContext};
use http::uri::{Authority, Scheme};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};
use tower::retry::budget::{Budget, TpsBudget};

/// The per-request metric handles of one pool, looked up once each: a
/// labelled `metrics::counter!` call formats, hashes and looks up its
/// labels on every request. Lazy, so a recorder installed after the pool
/// was built is still the one used.
pub struct PoolMetrics {
    duration: OnceLock<metrics::Histogram>,
    /// `shoal_gateway_requests_total` by status, index `status - 100`.
    by_status: [OnceLock<metrics::Counter>; 500],
}

impl Default for PoolMetrics {
    fn default() -> Self {
        PoolMetrics {
            duration: OnceLock::new(),
            by_status: [const { OnceLock::new() }; 500],
        }
    }
}

impl PoolMetrics {
    /// Counts one answered request and records its duration.
    pub fn record(&self, pool: &str, status: u16, elapsed: Duration) {
        let counter = match status
            .checked_sub(100)
            .and_then(|i| self.by_status.get(usize::from(i)))
        {
            Some(slot) => slot.get_or_init(|| requests_counter(pool, status)),
            None => &requests_counter(pool, status),
        };
        counter.increment(1);
        self.duration
            .get_or_init(|| {
                metrics::histogram!("shoal_gateway_request_duration_seconds", "pool" => pool.to_string())
            })
            .record(elapsed.as_secs_f64());
    }
}

/// `shoal_gateway_requests_total{pool, status}`.
pub fn requests_counter(pool: &str, status: u16) -> metrics::Counter {
    metrics::counter!(
        "shoal_gateway_requests_total",
        "pool" => pool.to_string(),
        "status" => status.to_string()
    )
}

/// Longest passive ejection, however often an instance fails.
pub const MAX_EJECTION: Duration = Duration::from_secs(30);

/// The peak-EWMA decay time unless configured (`gateway.ewma_decay_ms`):
/// how long a latency peak (or an idle instance's estimate) takes to fade
/// by ~63%. Finagle and linkerd use 10 s; on a loaded host that keeps a
/// fast instance's scheduling hiccups for seconds, during which a slow
/// instance looks as good (bench/README.md, "slow instance").
pub const DEFAULT_EWMA_DECAY: Duration = Duration::from_secs(1);

/// The latency exponent of the P2C cost unless configured
/// (`gateway.ewma_latency_exponent`).
pub const DEFAULT_LATENCY_EXPONENT: f64 = 2.0;

/// Latency assumed for an instance with no sample yet.
const DEFAULT_RTT_NS: f64 = 1_000_000.0;

/// The knobs of a pool, taken from the gateway settings.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub eject_base: Duration,
    pub eject_after_errors: u32,
    pub max_ejection_percent: u32,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    pub retry_budget_percent: f32,
    pub retry_budget_min_per_sec: u32,
    pub ewma_decay: Duration,
    pub latency_exponent: f64,
}

/// Why an instance is not taking requests, for `/_gateway/pools`.
#[derive(Debug, Default)]
struct InstanceState {
    /// Up according to active checks (starts up, optimistically).
    healthy: bool,
    /// Its readiness check answered 503: it asked for no new requests.
    draining: bool,
    /// Passively ejected: out until `ejected_until`, then until a check passes.
    ejected: bool,
    ejected_until: Option<Instant>,
    /// Ejections in a row (the period doubles with each), reset after a
    /// long quiet spell.
    ejections: u32,
    last_ejected: Option<Instant>,
    /// Taken out by an operator through the admin API.
    admin_ejected: bool,
    /// Connection errors in a row since the last success.
    connect_errors: u32,
    checks_passed: u32,
    checks_failed: u32,
    /// For registered instances: when the registration lapses.
    expires: Option<Instant>,
    /// Peak-EWMA latency in nanoseconds, and when it was last updated.
    ewma_ns: f64,
    ewma_at: Option<Instant>,
}

/// One upstream instance of a pool.
#[derive(Debug)]
pub struct Instance {
    /// Base URL as configured, e.g. `http://127.0.0.1:3001`.
    pub url: String,
    pub scheme: Scheme,
    pub authority: Authority,
    /// Weight for weighted round robin (1 unless configured).
    pub weight: u32,
    /// Registered through the admin API (versus configured).
    pub registered: bool,
    in_flight: AtomicUsize,
    requests: AtomicU64,
    /// Smooth weighted round robin's running weight.
    pub(crate) wrr_current: Mutex<i64>,
    state: Mutex<InstanceState>,
    /// Peak-EWMA decay time, in seconds.
    ewma_decay_secs: f64,
    /// Power of the latency in the P2C cost.
    latency_exponent: f64,
    /// A 404 on the health path was logged (once per instance).
    missing_health_path_noted: std::sync::atomic::AtomicBool,
}

/// Parses `http://host:port` (an optional trailing `/` is allowed; a path is not).
pub fn parse_upstream(url: &str) -> Result<(Scheme, Authority), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    if uri.scheme() != Some(&Scheme::HTTP) {
        return Err(format!("`{url}` must start with http://"));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("`{url}` has no host"))?;
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "`{url}` must be a base URL without a path, such as http://127.0.0.1:3001"
        ));
    }
    Ok((Scheme::HTTP, authority))
}

impl Instance {
    pub fn new(url: &str, weight: u32, expires: Option<Instant>) -> Result<Instance, String> {
        let (scheme, authority) = parse_upstream(url)?;
        Ok(Instance {
            url: format!("{scheme}://{authority}"),
            scheme,
            authority,
            weight: weight.max(1),
            registered: expires.is_some(),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            missing_health_path_noted: std::sync::atomic::AtomicBool::new(false),
            wrr_current: Mutex::new(0),
            state: Mutex::new(InstanceState {
                healthy: true,
                expires,
                ..InstanceState::default()
            }),
            ewma_decay_secs: DEFAULT_EWMA_DECAY.as_secs_f64(),
            latency_exponent: DEFAULT_LATENCY_EXPONENT,
        })
    }

    /// Sets the peak-EWMA decay time and latency exponent from `config`.
    pub fn with_ewma(mut self, config: &PoolConfig) -> Instance {
        self.ewma_decay_secs = config.ewma_decay.as_secs_f64().max(0.001);
        self.latency_exponent = config.latency_exponent.clamp(0.0, 8.0);
        self
    }

    fn state(&self) -> std::sync::MutexGuard<'_, InstanceState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes requests now: healthy, not draining, not ejected, not expired.
    pub fn is_available(&self, now: Instant) -> bool {
        let s = self.state();
        s.healthy
            && !s.draining
            && !s.ejected
            && !s.admin_ejected
            && s.expires.is_none_or(|e| now < e)
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        self.state().expires.is_some_and(|e| now >= e)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests sent to this instance since start.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Peak-EWMA latency (ms) to the latency exponent, times
    /// (outstanding + 1): lower is better.
    pub fn load_cost(&self) -> f64 {
        // An idle instance's estimate decays with time (as in tower's and
        // linkerd's PeakEwma), so an instance that was slow once, or came
        // back after a restart, is probed again instead of starved by P2C.
        let ewma = {
            let s = self.state();
            match s.ewma_at {
                Some(at) => {
                    let idle = at.elapsed().as_secs_f64();
                    s.ewma_ns * (-idle / self.ewma_decay_secs).exp()
                }
                None => DEFAULT_RTT_NS,
            }
        };
        // In milliseconds, raised to the latency exponent: with 2, an
        // instance three times slower must have nine times fewer requests
        // outstanding to win, so a slow instance keeps less than its
        // queue-length share (see `gateway.ewma_latency_exponent`).
        (ewma / 1e6).powf(self.latency_exponent) * (self.in_flight() as f64 + 1.0)
    }

    /// Counts a request as outstanding until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlightGuard {
            instance: Arc::clone(self),
        }
    }

    /// Folds a latency sample into the peak-EWMA: a higher sample is taken
    /// at once, a lower one decays in over the decay time.
    pub fn observe_latency(&self, latency: Duration) {
        let sample = latency.as_nanos() as f64;
        let now = Instant::now();
        let mut s = self.state();
        match s.ewma_at {
            Some(at) if sample < s.ewma_ns => {
                let elapsed = now.saturating_duration_since(at).as_secs_f64();
                let w = (-elapsed / self.ewma_decay_secs).exp();
                s.ewma_ns = s.ewma_ns * w + sample * (1.0 - w);
            }
            _ => s.ewma_ns = sample,
        }
        s.ewma_at = Some(now);
    }

    pub fn record_success(&self) {
        self.state().connect_errors = 0;
    }

    /// Counts a connection error; true when it reached the threshold and the
    /// instance should be ejected.
    fn count_connection_error(&self, threshold: u32) -> bool {
        let mut s = self.state();
        s.connect_errors += 1;
        !s.ejected && s.connect_errors >= threshold.max(1)
    }

    fn is_ejected(&self) -> bool {
        self.state().ejected
    }

    /// Ejects for `base` doubled per ejection in a row (at most 30 s); the
    /// instance then needs passing health checks to come back.
    fn eject(&self, base: Duration, now: Instant) -> Duration {
        let mut s = self.state();
        if s.last_ejected
            .is_some_and(|t| now.duration_since(t) > MAX_EJECTION * 4)
        {
            s.ejections = 0;
        }
        let factor = 1u32 << s.ejections.min(16);
        let period = base.saturating_mul(factor).min(MAX_EJECTION);
        s.ejections = s.ejections.saturating_add(1);
        s.ejected = true;
        s.ejected_until = Some(now + period);
        s.last_ejected = Some(now);
        s.checks_passed = 0;
        s.connect_errors = 0;
        period
    }

    /// Applies one active health check result.
    /// Returns true when the instance's availability changed.
    pub fn record_check(&self, outcome: CheckOutcome, config: &PoolConfig, now: Instant) -> bool {
        let mut s = self.state();
        let before = (s.healthy, s.draining, s.ejected);
        match outcome {
            CheckOutcome::Passed | CheckOutcome::NoHealthPath => {
                s.checks_failed = 0;
                s.checks_passed = s.checks_passed.saturating_add(1);
                s.draining = false;
                if s.checks_passed >= config.healthy_threshold.max(1) {
                    if !s.healthy {
                        // Back from being down: start from the default
                        // latency, not what its failures taught us.
                        s.ewma_at = None;
                    }
                    s.healthy = true;
                    if s.ejected && s.ejected_until.is_none_or(|t| now >= t) {
                        s.ejected = false;
                        s.ejected_until = None;
                        // Back from an ejection: forget the latency learnt
                        // from its failures and start from the default.
                        s.ewma_at = None;
                    }
                }
            }
            CheckOutcome::Draining => {
                s.checks_passed = 0;
                s.draining = true;
            }
            CheckOutcome::Failed(_) => {
                s.checks_passed = 0;
                s.checks_failed = s.checks_failed.saturating_add(1);
                if s.checks_failed >= config.unhealthy_threshold.max(1) {
                    s.healthy = false;
                }
            }
        }
        before != (s.healthy, s.draining, s.ejected)
    }

    pub fn set_admin_ejected(&self, ejected: bool) {
        self.state().admin_ejected = ejected;
    }

    /// True the first time it is called: to log a missing health path
    /// once per instance.
    pub fn note_missing_health_path(&self) -> bool {
        !self.missing_health_path_noted.swap(true, Ordering::Relaxed)
    }

    /// For a registered instance: when its registration lapses.
    pub fn expires(&self) -> Option<Instant> {
        self.state().expires
    }

    pub fn renew(&self, expires: Instant) {
        self.state().expires = Some(expires);
    }

    /// A JSON view for `/_gateway/pools`.
    pub fn status_json(&self, now: Instant) -> serde_json::Value {
        let available = self.is_available(now);
        let s = self.state();
        serde_json::json!({
            "url": self.url,
            "available": available,
            "healthy": s.healthy,
            "draining": s.draining,
            "ejected": s.ejected,
            "ejected_for_ms": s.ejected_until.map(|t| t.saturating_duration_since(now).as_millis() as u64),
            "ejections": s.ejections,
            "admin_ejected": s.admin_ejected,
            "registered": self.registered,
            "expires_in_ms": s.expires.map(|t| t.saturating_duration_since(now).as_millis() as u64),
            "in_flight": self.in_flight(),
            "requests": self.requests(),
            "weight": self.weight,
            "ewma_ms": s.ewma_at.map(|_| s.ewma_ns / 1e6),
        })
    }
}

/// The result of one active health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckOutcome {
    /// 2xx.
    Passed,
    /// 404: the server answers but has no such path (not a Shoal
    /// service): up while it answers, as with a TCP connect check.
    NoHealthPath,
    /// 503: the instance is draining and wants no new requests.
    Draining,
    /// Anything else (with the status, when there was an answer), a
    /// connection error or a timeout.
    Failed(Option<u16>),
}

/// Holds one outstanding request on an instance; dropping it ends it.
#[derive(Debug)]
pub struct InFlightGuard {
    instance: Arc<Instance>,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.instance.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A named pool of instances with its balancer and retry budget.
pub struct Pool {
    pub name: String,
    pub balancer: Balancer,
    pub config: PoolConfig,
    instances: RwLock<Arc<Vec<Arc<Instance>>>>,
    budget: TpsBudget,
    /// DNS membership (`dns.rs`): configured name URL → the instance URLs
    /// its last resolution gave.
    dns: Mutex<std::collections::HashMap<String, Vec<String>>>,
    pub metrics: PoolMetrics,
    /// Instances speak HTTP/2 with prior knowledge (`protocol = "h2c"`).
    pub h2c: bool,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.name)
            .field("balancer", &self.balancer.name())
            .finish()
    }
}

impl Pool {
    pub fn new(
        name: String,
        balancer: Balancer,
        config: PoolConfig,
        instances: Vec<Arc<Instance>>,
    ) -> Pool {
        let budget = TpsBudget::new(
            Duration::from_secs(10),
            config.retry_budget_min_per_sec,
            config.retry_budget_percent / 100.0,
        );
        Pool {
            name,
            balancer,
            config,
            instances: RwLock::new(Arc::new(instances)),
            budget,
            dns: Mutex::default(),
            metrics: PoolMetrics::default(),
            h2c: false,
        }
    }

    /// Replaces the instance list with what `f` makes of the current one.
    pub fn update_instances(&self, f: impl FnOnce(&[Arc<Instance>]) -> Vec<Arc<Instance>>) {
        let mut guard = self.instances.write().unwrap_or_else(|p| p.into_inner());
        let next = f(&guard);
        *guard = Arc::new(next);
    }

    /// Makes the instances of the configured upstream `name_url` those at
    /// `resolved` (URLs such as `http://127.0.0.1:3001`): new ones are
    /// added, gone ones removed, kept ones keep their state. Returns
    /// (added, removed).
    pub fn follow_dns(&self, name_url: &str, resolved: Vec<String>) -> (usize, usize) {
        let mut dns = self.dns.lock().unwrap_or_else(|p| p.into_inner());
        let previous = dns
            .get(name_url)
            .cloned()
            .unwrap_or_else(|| vec![name_url.to_string()]);
        if previous == resolved {
            return (0, 0);
        }
        let weight = self
            .instances()
            .iter()
            .find(|i| previous.contains(&i.url))
            .map(|i| i.weight)
            .unwrap_or(1);
        let (mut added, mut removed) = (0, 0);
        self.update_instances(|current| {
            let mut next: Vec<Arc<Instance>> = current
                .iter()
                .filter(|i| {
                    let keep = !previous.contains(&i.url) || resolved.contains(&i.url);
                    removed += usize::from(!keep);
                    keep
                })
                .cloned()
                .collect();
            for url in &resolved {
                if !next.iter().any(|i| &i.url == url) {
                    if let Ok(i) = Instance::new(url, weight, None) {
                        next.push(Arc::new(i.with_ewma(&self.config)));
                        added += 1;
                    }
                }
            }
            next
        });
        dns.insert(name_url.to_string(), resolved);
        (added, removed)
    }

    /// On reload: takes over from `old` (the pool of the same name in the
    /// previous settings) every instance whose URL and weight did not
    /// change, with its health and load state, the instances DNS resolved
    /// for names still configured, and the registered instances.
    pub fn carry_from(&self, old: &Pool) {
        let old_instances = old.instances();
        let old_dns = old.dns.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut dns = self.dns.lock().unwrap_or_else(|p| p.into_inner());
        self.update_instances(|fresh| {
            let mut next: Vec<Arc<Instance>> = Vec::new();
            let reuse = |url: &str, weight: u32, next: &mut Vec<Arc<Instance>>| {
                if next.iter().any(|i| i.url == url) {
                    return true;
                }
                match old_instances
                    .iter()
                    .find(|o| o.url == url && o.weight == weight && !o.registered)
                {
                    Some(o) => {
                        next.push(Arc::clone(o));
                        true
                    }
                    None => false,
                }
            };
            for i in fresh {
                if let Some(resolved) = old_dns.get(&i.url) {
                    for url in resolved {
                        reuse(url, i.weight, &mut next);
                    }
                    dns.insert(i.url.clone(), resolved.clone());
                    continue;
                }
                if !reuse(&i.url, i.weight, &mut next) {
                    next.push(Arc::clone(i));
                }
            }
            for o in old_instances.iter().filter(|o| o.registered) {
                if !next.iter().any(|i| i.url == o.url) {
                    next.push(Arc::clone(o));
                }
            }
            next
        });
    }

    /// A snapshot of the instances.
    pub fn instances(&self) -> Arc<Vec<Arc<Instance>>> {
        Arc::clone(&self.instances.read().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn find(&self, url: &str) -> Option<Arc<Instance>> {
        let url = url.trim_end_matches('/');
        self.instances().iter().find(|i| i.url == url).cloned()
    }

    /// Adds a registered instance or renews its registration. Returns true
    /// when it is new. A configured instance with the same URL is renewed
    /// in place only if it was registered.
    pub fn register(&self, url: &str, ttl: Duration) -> Result<bool, String> {
        let expires = Instant::now() + ttl;
        let mut guard = self.instances.write().unwrap_or_else(|p| p.into_inner());
        let candidate = Instance::new(url, 1, Some(expires))?.with_ewma(&self.config);
        if let Some(existing) = guard.iter().find(|i| i.url == candidate.url) {
            if !existing.registered {
                return Err(format!(
                    "`{}` is configured in pool `{}`; only registered instances can be renewed",
                    candidate.url, self.name
                ));
            }
            existing.renew(expires);
            return Ok(false);
        }
        let mut next = Vec::clone(&guard);
        next.push(Arc::new(candidate));
        *guard = Arc::new(next);
        Ok(true)
    }

    /// Removes a registered instance. Returns false when none had that URL.
    pub fn deregister(&self, url: &str) -> Result<bool, String> {
        let url = url.trim_end_matches('/');
        let mut guard = self.instances.write().unwrap_or_else(|p| p.into_inner());
        match guard.iter().find(|i| i.url == url) {
            None => Ok(false),
            Some(i) if !i.registered => Err(format!(
                "`{url}` is configured, not registered; eject it instead"
            )),
            Some(_) => {
                let next: Vec<_> = guard.iter().filter(|i| i.url != url).cloned().collect();
                *guard = Arc::new(next);
                Ok(true)
            }
        }
    }

    /// Drops registrations whose TTL ran out.
    pub fn expire_registrations(&self, now: Instant) {
        if !self.instances().iter().any(|i| i.is_expired(now)) {
            return;
        }
        let mut guard = self.instances.write().unwrap_or_else(|p| p.into_inner());
        let next: Vec<_> = guard
            .iter()
            .filter(|i| !i.is_expired(now))
            .cloned()
            .collect();
        for gone in guard.iter().filter(|i| i.is_expired(now)) {
            tracing::info!(pool = %self.name, instance = %gone.url, "registration expired");
        }
        *guard = Arc::new(next);
    }

    /// Picks an available instance not in `tried`; when every available one
    /// was tried, any available one (a fresh connection may still work).
    pub fn pick(&self, ctx: &PickContext<'_>, tried: &[Arc<Instance>]) -> Option<Arc<Instance>> {
        let now = Instant::now();
        let all = self.instances();
        let available: Vec<&Arc<Instance>> = all.iter().filter(|i| i.is_available(now)).collect();
        if available.is_empty() {
            return None;
        }
        let untried: Vec<&Arc<Instance>> = available
            .iter()
            .copied()
            .filter(|i| !tried.iter().any(|t| Arc::ptr_eq(t, i)))
            .collect();
        let candidates = if untried.is_empty() {
            available
        } else {
            untried
        };
        self.balancer.pick(&candidates, ctx).cloned()
    }

    /// Counts a connection error against `instance` and ejects it when the
    /// threshold is reached and the ejection cap allows it.
    pub fn on_connection_error(&self, instance: &Instance) {
        if !instance.count_connection_error(self.config.eject_after_errors) {
            return;
        }
        let all = self.instances();
        let ejected = all.iter().filter(|i| i.is_ejected()).count();
        let cap = ((all.len() * self.config.max_ejection_percent as usize) / 100).max(usize::from(
            all.len() >= 2 && self.config.max_ejection_percent > 0,
        ));
        if ejected >= cap {
            tracing::warn!(
                pool = %self.name,
                instance = %instance.url,
                ejected,
                cap,
                "not ejecting: the pool's ejection cap is reached"
            );
            return;
        }
        let period = instance.eject(self.config.eject_base, Instant::now());
        metrics::counter!("shoal_gateway_ejections_total", "pool" => self.name.clone())
            .increment(1);
        tracing::warn!(
            pool = %self.name,
            instance = %instance.url,
            period_ms = period.as_millis() as u64,
            "instance ejected after connection errors"
        );
    }

    /// Counts a request into the retry budget.
    pub fn deposit(&self) {
        self.budget.deposit();
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw_retry(&self) -> bool {
        self.budget.withdraw()
    }

    pub fn status_json(&self) -> serde_json::Value {
        let now = Instant::now();
        let instances = self.instances();
        serde_json::json!({
            "name": self.name,
            "balancer": self.balancer.name(),
            "instances": instances.iter().map(|i| i.status_json(now)).collect::<Vec<_>>(),
            "available": instances.iter().filter(|i| i.is_available(now)).count(),
        })
    }
}

#[cfg(test)]
impl PoolConfig {
    /// Fast ejection and single-check thresholds, for unit tests.
    pub(crate) fn for_tests() -> PoolConfig {
        PoolConfig {
            eject_base: Duration::from_millis(100),
            eject_after_errors: 1,
            max_ejection_percent: 50,
            unhealthy_threshold: 1,
            healthy_threshold: 1,
            retry_budget_percent: 20.0,
            retry_budget_min_per_sec: 10,
            ewma_decay: DEFAULT_EWMA_DECAY,
            latency_exponent: DEFAULT_LATENCY_EXPONENT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool_of(urls: &[&str]) -> Pool {
        let config = PoolConfig::for_tests();
        let instances = urls
            .iter()
            .map(|u| Arc::new(Instance::new(u, 1, None).unwrap()))
            .collect();
        Pool::new(
            "p".into(),
            Balancer::from_name("round_robin", None).unwrap(),
            config,
            instances,
        )
    }

    fn urls(pool: &Pool) -> Vec<String> {
        let mut v: Vec<String> = pool.instances().iter().map(|i| i.url.clone()).collect();
        v.sort();
        v
    }

    #[test]
    fn dns_membership_follows_the_records_and_keeps_unchanged_instances() {
        let pool = pool_of(&["http://svc.internal:80", "http://10.9.9.9:80"]);
        let name = "http://svc.internal:80";
        let a = "http://10.0.0.1:80".to_string();
        let b = "http://10.0.0.2:80".to_string();
        let c = "http://10.0.0.3:80".to_string();
        assert_eq!(pool.follow_dns(name, vec![a.clone(), b.clone()]), (2, 1));
        assert_eq!(
            urls(&pool),
            vec![a.clone(), b.clone(), "http://10.9.9.9:80".into()]
        );
        let b_before = pool.find(&b).unwrap();
        b_before.set_admin_ejected(true);
        assert_eq!(pool.follow_dns(name, vec![b.clone(), c.clone()]), (1, 1));
        assert_eq!(
            urls(&pool),
            vec![b.clone(), c.clone(), "http://10.9.9.9:80".into()]
        );
        assert!(
            Arc::ptr_eq(&b_before, &pool.find(&b).unwrap()),
            "b kept its state"
        );
        assert_eq!(pool.follow_dns(name, vec![b.clone(), c.clone()]), (0, 0));
    }

    #[test]
    fn a_reloaded_pool_carries_over_unchanged_and_registered_instances() {
        let old = pool_of(&["http://10.0.0.1:80", "http://10.0.0.2:80"]);
        old.register("http://10.0.0.9:80", Duration::from_secs(30))
            .unwrap();
        let kept = old.find("http://10.0.0.2:80").unwrap();
        let new = pool_of(&["http://10.0.0.2:80", "http://10.0.0.3:80"]);
        new.carry_from(&old);
        assert_eq!(
            urls(&new),
            vec![
                "http://10.0.0.2:80",
                "http://10.0.0.3:80",
                "http://10.0.0.9:80"
            ]
        );
        assert!(Arc::ptr_eq(&kept, &new.find("http://10.0.0.2:80").unwrap()));
    }

    #[test]
    fn an_idle_instances_latency_estimate_decays_so_it_is_probed_again() {
        let slow = Instance::new("http://127.0.0.1:1", 1, None).unwrap();
        slow.observe_latency(Duration::from_millis(500));
        let fresh = slow.load_cost();
        // Cost in ms to the default exponent 2, nothing outstanding.
        assert!(
            fresh > 400.0 * 400.0,
            "a slow sample is taken at once: {fresh}"
        );
        // Pretend the last observation was 30 s ago.
        slow.state().ewma_at = Some(Instant::now() - Duration::from_secs(30));
        let later = slow.load_cost();
        assert!(
            later < fresh / 10.0,
            "idle estimate decays: {fresh} -> {later}"
        );
    }
}
