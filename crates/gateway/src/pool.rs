//! Pools of upstream instances: each instance's health, ejection, load
//! (outstanding requests, peak-EWMA latency) and registration expiry, and
//! the pool's choice of an instance through its balancer.

use crate::balance::{Balancer, PickContext};
use arc_swap::ArcSwap;
use http::uri::{Authority, Scheme};
use smallvec::SmallVec;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The per-request metric handles of one pool, looked up once each: a
/// labelled `metrics::counter!` call formats, hashes and looks up its
/// labels on every request. Lazy, so a recorder installed after the pool
/// was built is still the one used.
pub struct PoolMetrics {
    duration: OnceLock<metrics::Histogram>,
    /// `shoal_gateway_upstream_connections_total{pool, reused}`: upstream
    /// requests sent on a new connection (`false`) or a kept-alive one.
    connections: [OnceLock<metrics::Counter>; 2],
    /// `shoal_gateway_requests_total` by status, index `status - 100`.
    by_status: [OnceLock<metrics::Counter>; 500],
}

impl Default for PoolMetrics {
    fn default() -> Self {
        PoolMetrics {
            duration: OnceLock::new(),
            connections: [const { OnceLock::new() }; 2],
            by_status: [const { OnceLock::new() }; 500],
        }
    }
}

impl PoolMetrics {
    /// Counts an upstream request on a new (`reused = false`) or a
    /// kept-alive connection.
    pub fn connection(&self, pool: &str, reused: bool) {
        self.connections[usize::from(reused)]
            .get_or_init(|| {
                metrics::counter!(
                    "shoal_gateway_upstream_connections_total",
                    "pool" => pool.to_string(),
                    "reused" => if reused { "true" } else { "false" }
                )
            })
            .increment(1);
    }

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

/// Seconds a retry budget looks back over.
const BUDGET_WINDOW_SECS: usize = 10;
/// Counter shards of a retry budget: threads take them in turn.
const BUDGET_SHARDS: usize = 8;

/// A pool's retry budget, as tower's `TpsBudget` (and Finagle's): over
/// the last ten seconds, retries may number `min_per_sec` per second plus
/// `ratio` of the requests. Counted per second in a ring, in one shard
/// per thread (on its own cache line), so the threads serving requests
/// neither wait for a lock nor fight over one counter; a withdrawal
/// (rare: only a failed attempt asks) sums the shards.
struct RetryBudget {
    min_per_sec: u32,
    ratio: f32,
    shards: Box<[BudgetShard]>,
}

#[repr(align(64))]
#[derive(Default)]
struct BudgetShard {
    slots: [BudgetSlot; BUDGET_WINDOW_SECS],
}

#[derive(Default)]
struct BudgetSlot {
    /// Which second (since `epoch`, plus one) the counts are of.
    second: AtomicU64,
    deposits: AtomicU64,
    withdrawals: AtomicU64,
}

thread_local! {
    /// This thread's budget shard.
    static BUDGET_SHARD: Cell<Option<usize>> = const { Cell::new(None) };
}

fn budget_shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    BUDGET_SHARD.with(|shard| match shard.get() {
        Some(i) => i,
        None => {
            let i = NEXT.fetch_add(1, Ordering::Relaxed) % BUDGET_SHARDS;
            shard.set(Some(i));
            i
        }
    })
}

impl RetryBudget {
    fn new(min_per_sec: u32, ratio: f32) -> RetryBudget {
        RetryBudget {
            min_per_sec,
            ratio: ratio.max(0.0),
            shards: (0..BUDGET_SHARDS).map(|_| BudgetShard::default()).collect(),
        }
    }

    /// This thread's slot for the second of `now`, emptied if it still
    /// held an older second. (Threads beyond the shard count share
    /// shards; a race there may lose a count, which a budget can afford.)
    fn slot(&self, now: Instant) -> (&BudgetSlot, u64) {
        let second = to_ns(now) / 1_000_000_000 + 1;
        let slot = &self.shards[budget_shard()].slots[(second as usize) % BUDGET_WINDOW_SECS];
        if slot.second.load(Ordering::Relaxed) != second {
            slot.deposits.store(0, Ordering::Relaxed);
            slot.withdrawals.store(0, Ordering::Relaxed);
            slot.second.store(second, Ordering::Relaxed);
        }
        (slot, second)
    }

    fn deposit(&self, now: Instant) {
        self.slot(now).0.deposits.fetch_add(1, Ordering::Relaxed);
    }

    fn withdraw(&self, now: Instant) -> bool {
        let (slot, second) = self.slot(now);
        let (mut deposits, mut withdrawals) = (0u64, 0u64);
        for shard in self.shards.iter() {
            for s in &shard.slots {
                let at = s.second.load(Ordering::Relaxed);
                if at + (BUDGET_WINDOW_SECS as u64) > second && at <= second {
                    deposits += s.deposits.load(Ordering::Relaxed);
                    withdrawals += s.withdrawals.load(Ordering::Relaxed);
                }
            }
        }
        let allowed = f64::from(self.min_per_sec) * BUDGET_WINDOW_SECS as f64
            + f64::from(self.ratio) * deposits as f64;
        if (withdrawals + 1) as f64 <= allowed {
            slot.withdrawals.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
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

/// The most weight the estimate keeps against one lower sample: a peak
/// fades within the decay time, or within about sixteen faster answers
/// if those come sooner. A busy instance answers hundreds of times in a
/// decay time, and a peak that one stall of the gateway's own thread put
/// on every request then in flight (a loaded host) would otherwise make
/// it look as slow as a truly slow instance for most of a second
/// (bench/README.md, "slow instance"). A truly slow instance sends no
/// faster answers, so it keeps its estimate.
const PEAK_FORGET_WEIGHT: f64 = 1.0 - 1.0 / 16.0;

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
    /// Taken out by an operator through the admin API (`eject`): no new
    /// requests, and its open streams and tunnels cut.
    admin_ejected: bool,
    /// Drained by an operator (`drain`): no new requests; those in
    /// flight, streams and tunnels included, run to their end.
    admin_draining: bool,
    checks_passed: u32,
    checks_failed: u32,
    /// Every check failed in a row so far timed out (none refused the
    /// connection or answered an error): an instance down only by these
    /// is more likely busy than gone, and is tried when nothing else
    /// is up ([`Instance::worth_a_last_try`]).
    failures_all_timeouts: bool,
}

impl InstanceState {
    /// Takes requests as far as this state goes (registration expiry
    /// aside).
    fn up(&self) -> bool {
        self.healthy
            && !self.draining
            && !self.ejected
            && !self.admin_ejected
            && !self.admin_draining
    }
}

/// The zero of the instants kept in atomics.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// `t` as nanoseconds since [`epoch`], plus one: 0 stands for "none".
fn to_ns(t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(epoch()).as_nanos())
        .unwrap_or(u64::MAX - 1)
        .saturating_add(1)
}

fn from_ns(ns: u64) -> Option<Instant> {
    (ns != 0).then(|| epoch() + Duration::from_nanos(ns - 1))
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
    /// What every response writes, on a cache line of its own so that
    /// those writes do not evict what `pick` reads on other threads (nor
    /// the reference counts in front of the instance).
    hot: Hot,
    /// Smooth weighted round robin's running weight.
    pub(crate) wrr_current: Mutex<i64>,
    /// What every request reads, kept in atomics so that the threads
    /// serving requests never wait on one another (nor bounce a lock
    /// between cores): `state.up()`, published by whoever changes `state`;
    /// the registration's expiry (`to_ns`, 0 = none).
    up: AtomicBool,
    expires_ns: AtomicU64,
    /// The rest, changed by health checks, ejections and the admin API.
    state: Mutex<InstanceState>,
    /// Peak-EWMA decay time, in seconds.
    ewma_decay_secs: f64,
    /// Power of the latency in the P2C cost.
    latency_exponent: f64,
    /// A 404 on the health path was logged (once per instance).
    missing_health_path_noted: AtomicBool,
    /// Requests, errors and latencies for the console (`console/`).
    pub live: Box<crate::console::stats::Live>,
    /// Bumped when an operator ejects the instance: the answers and
    /// tunnels begun before (their guards hold the number they saw) are
    /// cut. Changed under `cut`, read without a lock by every `start`.
    cut_gen: AtomicU64,
    /// Cancelled (and replaced) with each bump of `cut_gen`; what waits
    /// to be cut waits on it.
    cut: Mutex<CancellationToken>,
    /// Ejected by an operator now: set before `cut_gen` is bumped, so a
    /// request picked just before the eject, whose guard saw the bumped
    /// number, is cut too.
    operator_ejected: AtomicBool,
}

/// An instance's counters that change with every request: outstanding
/// and total requests, the peak-EWMA latency (f64 bits, nanoseconds) and
/// when it was last updated (`to_ns`, 0 = no sample), when it last
/// answered a proxied request (`to_ns`), connection errors in a row
/// (read on every response, written on errors).
#[derive(Debug, Default)]
#[repr(align(64))]
struct Hot {
    in_flight: AtomicUsize,
    requests: AtomicU64,
    ewma_ns: AtomicU64,
    ewma_at_ns: AtomicU64,
    answered_ns: AtomicU64,
    connect_errors: AtomicU32,
}

/// Parses `http://host:port` or `https://host:port` (an optional trailing
/// `/` is allowed; a path is not).
pub fn parse_upstream(url: &str) -> Result<(Scheme, Authority), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    let scheme = match uri.scheme() {
        Some(s) if *s == Scheme::HTTP || *s == Scheme::HTTPS => s.clone(),
        _ => return Err(format!("`{url}` must start with http:// or https://")),
    };
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("`{url}` has no host"))?;
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "`{url}` must be a base URL without a path, such as http://127.0.0.1:3001"
        ));
    }
    Ok((scheme, authority))
}

/// The port of an upstream: its own, else its scheme's.
pub fn port_of(scheme: &Scheme, authority: &Authority) -> u16 {
    authority
        .port_u16()
        .unwrap_or(if *scheme == Scheme::HTTPS { 443 } else { 80 })
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
            hot: Hot::default(),
            missing_health_path_noted: AtomicBool::new(false),
            live: Box::default(),
            wrr_current: Mutex::new(0),
            up: AtomicBool::new(true),
            expires_ns: AtomicU64::new(expires.map_or(0, to_ns)),
            state: Mutex::new(InstanceState {
                healthy: true,
                ..InstanceState::default()
            }),
            ewma_decay_secs: DEFAULT_EWMA_DECAY.as_secs_f64(),
            latency_exponent: DEFAULT_LATENCY_EXPONENT,
            cut_gen: AtomicU64::new(0),
            cut: Mutex::new(CancellationToken::new()),
            operator_ejected: AtomicBool::new(false),
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

    /// Tells this instance apart from the others while it lives (its
    /// address), for lists of instances tried.
    pub fn id(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    /// Publishes what `s` says of availability; call after changing it.
    fn publish(&self, s: &InstanceState) {
        self.up.store(s.up(), Ordering::Release);
    }

    /// Takes requests now: healthy, not draining, not ejected, not expired.
    pub fn is_available(&self, now: Instant) -> bool {
        self.up.load(Ordering::Acquire) && !self.is_expired(now)
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        let expires = self.expires_ns.load(Ordering::Relaxed);
        expires != 0 && to_ns(now) >= expires
    }

    pub fn in_flight(&self) -> usize {
        self.hot.in_flight.load(Ordering::Relaxed)
    }

    /// Requests sent to this instance since start.
    pub fn requests(&self) -> u64 {
        self.hot.requests.load(Ordering::Relaxed)
    }

    /// Peak-EWMA latency (ms) to the latency exponent, times
    /// (outstanding + 1): lower is better.
    pub fn load_cost(&self, now: Instant) -> f64 {
        // An idle instance's estimate decays with time (as in tower's and
        // linkerd's PeakEwma), so an instance that was slow once, or came
        // back after a restart, is probed again instead of starved by P2C.
        // Unlike theirs, only while nothing is outstanding: once a probe
        // is on its way the instance costs its full estimate again, so a
        // slow instance gets one probe, not every request of the time its
        // answer takes; and an instance whose requests hang does not look
        // better the longer they hang.
        let in_flight = self.in_flight();
        let ewma = match self.hot.ewma_at_ns.load(Ordering::Relaxed) {
            0 => DEFAULT_RTT_NS,
            at => {
                let estimate = f64::from_bits(self.hot.ewma_ns.load(Ordering::Relaxed));
                if in_flight == 0 {
                    let idle = to_ns(now).saturating_sub(at) as f64 / 1e9;
                    estimate * (-idle / self.ewma_decay_secs).exp()
                } else {
                    estimate
                }
            }
        };
        // In milliseconds, raised to the latency exponent: with 2, an
        // instance three times slower must have nine times fewer requests
        // outstanding to win, so a slow instance keeps less than its
        // queue-length share (see `gateway.ewma_latency_exponent`).
        let ms = ewma / 1e6;
        let weighted = if self.latency_exponent == 2.0 {
            ms * ms
        } else {
            ms.powf(self.latency_exponent)
        };
        weighted * (in_flight as f64 + 1.0)
    }

    /// Counts a request as outstanding until the guard, which keeps the
    /// instance (reach it through [`InFlightGuard::instance`]), drops.
    pub fn start(self: Arc<Self>) -> InFlightGuard {
        self.hot.in_flight.fetch_add(1, Ordering::Relaxed);
        self.hot.requests.fetch_add(1, Ordering::Relaxed);
        let cut_gen = self.cut_gen.load(Ordering::Acquire);
        InFlightGuard {
            instance: self,
            cut_gen,
        }
    }

    /// [`Instance::observe_latency_at`] now (in tests).
    #[cfg(test)]
    pub fn observe_latency(&self, latency: Duration) {
        self.observe_latency_at(latency, Instant::now());
    }

    /// Folds a latency sample, which ended at `now`, into the peak-EWMA:
    /// a higher sample is taken at once, a lower one decays in over the
    /// decay time.
    ///
    /// Two threads folding samples at once may lose one of them: a
    /// latency estimate can afford that, a lock on every response cannot.
    pub fn observe_latency_at(&self, latency: Duration, now: Instant) {
        let sample = latency.as_nanos() as f64;
        let now = to_ns(now);
        let at = self.hot.ewma_at_ns.load(Ordering::Relaxed);
        let ewma = f64::from_bits(self.hot.ewma_ns.load(Ordering::Relaxed));
        let next = if at != 0 && sample < ewma {
            let elapsed = now.saturating_sub(at) as f64 / 1e9;
            let w = (-elapsed / self.ewma_decay_secs)
                .exp()
                .min(PEAK_FORGET_WEIGHT);
            ewma * w + sample * (1.0 - w)
        } else {
            sample
        };
        self.hot.ewma_ns.store(next.to_bits(), Ordering::Relaxed);
        self.hot.ewma_at_ns.store(now, Ordering::Relaxed);
    }

    /// Forgets the latency learnt so far (back from being down).
    fn reset_latency(&self) {
        self.hot.ewma_at_ns.store(0, Ordering::Relaxed);
    }

    /// A proxied request got its response head at `now`.
    pub fn record_success(&self, now: Instant) {
        self.hot.answered_ns.store(to_ns(now), Ordering::Relaxed);
        // Read first: most responses find no errors to reset, and a store
        // would take the cache line from the other threads.
        if self.hot.connect_errors.load(Ordering::Relaxed) != 0 {
            self.hot.connect_errors.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a connection error; true when it reached the threshold and the
    /// instance should be ejected.
    fn count_connection_error(&self, threshold: u32) -> bool {
        let errors = self.hot.connect_errors.fetch_add(1, Ordering::Relaxed) + 1;
        !self.state().ejected && errors >= threshold.max(1)
    }

    fn is_ejected(&self) -> bool {
        self.state().ejected
    }

    /// Worth a request when no instance of the pool is up: out only
    /// because passive ejection took it out (healthy by its checks), or
    /// down only by health checks that timed out (busy, likely: it
    /// answered none in time, but refused nothing and answered no
    /// error); not draining, not taken out by an operator, not expired.
    fn worth_a_last_try(&self, now: Instant) -> bool {
        let s = self.state();
        let only_passively_ejected = s.ejected && s.healthy;
        let only_slow = !s.healthy && !s.ejected && s.failures_all_timeouts;
        (only_passively_ejected || only_slow)
            && !s.draining
            && !s.admin_ejected
            && !s.admin_draining
            && !self.is_expired(now)
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
        self.publish(&s);
        self.hot.connect_errors.store(0, Ordering::Relaxed);
        period
    }

    /// Answered a proxied request at or after `t`.
    fn answered_since(&self, t: Instant) -> bool {
        from_ns(self.hot.answered_ns.load(Ordering::Relaxed)).is_some_and(|at| at >= t)
    }

    /// Applies the result of one active health check that began at
    /// `began`. Returns true when the instance's availability changed.
    ///
    /// A check that timed out while the instance answered proxied
    /// requests is not a failure: the instance is busy, not gone (an
    /// instance taking back thousands of streams from a drained one
    /// answers its check late; marking it down would leave the pool
    /// with nothing). It neither fails nor passes.
    pub fn record_check(
        &self,
        outcome: CheckOutcome,
        config: &PoolConfig,
        began: Instant,
        now: Instant,
    ) -> bool {
        if outcome == CheckOutcome::TimedOut && self.answered_since(began) {
            return false;
        }
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
                        self.reset_latency();
                    }
                    s.healthy = true;
                    if s.ejected && s.ejected_until.is_none_or(|t| now >= t) {
                        s.ejected = false;
                        s.ejected_until = None;
                        // Back from an ejection: forget the latency learnt
                        // from its failures and start from the default.
                        self.reset_latency();
                    }
                }
            }
            CheckOutcome::Draining => {
                s.checks_passed = 0;
                s.draining = true;
            }
            CheckOutcome::Failed(_) | CheckOutcome::TimedOut => {
                let timed_out = outcome == CheckOutcome::TimedOut;
                s.failures_all_timeouts =
                    timed_out && (s.checks_failed == 0 || s.failures_all_timeouts);
                s.checks_passed = 0;
                s.checks_failed = s.checks_failed.saturating_add(1);
                if s.checks_failed >= config.unhealthy_threshold.max(1) {
                    s.healthy = false;
                }
            }
        }
        self.publish(&s);
        before != (s.healthy, s.draining, s.ejected)
    }

    /// An operator's eject: no new requests, and every answer still
    /// streaming from it and every tunnel to it is cut (their clients
    /// reconnect, through the gateway, to another instance).
    pub fn eject_by_operator(&self) {
        {
            let mut s = self.state();
            s.admin_ejected = true;
            s.admin_draining = false;
            self.publish(&s);
        }
        self.operator_ejected.store(true, Ordering::Release);
        let mut token = self.cut.lock().unwrap_or_else(|p| p.into_inner());
        self.cut_gen.fetch_add(1, Ordering::AcqRel);
        std::mem::take(&mut *token).cancel();
    }

    /// An operator's drain: no new requests; those in flight run to their
    /// end (`in_flight` says how many are left).
    pub fn drain_by_operator(&self) {
        let mut s = self.state();
        s.admin_draining = true;
        self.publish(&s);
    }

    /// Undoes an operator's eject or drain.
    pub fn restore_by_operator(&self) {
        let mut s = self.state();
        s.admin_ejected = false;
        s.admin_draining = false;
        self.operator_ejected.store(false, Ordering::Release);
        self.publish(&s);
    }

    /// True the first time it is called: to log a missing health path
    /// once per instance.
    pub fn note_missing_health_path(&self) -> bool {
        !self.missing_health_path_noted.swap(true, Ordering::Relaxed)
    }

    /// For a registered instance: when its registration lapses.
    pub fn expires(&self) -> Option<Instant> {
        from_ns(self.expires_ns.load(Ordering::Relaxed))
    }

    pub fn renew(&self, expires: Instant) {
        self.expires_ns.store(to_ns(expires), Ordering::Relaxed);
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
            "admin_draining": s.admin_draining,
            "registered": self.registered,
            "expires_in_ms": self.expires().map(|t| t.saturating_duration_since(now).as_millis() as u64),
            "in_flight": self.in_flight(),
            "requests": self.requests(),
            "weight": self.weight,
            "ewma_ms": (self.hot.ewma_at_ns.load(Ordering::Relaxed) != 0)
                .then(|| f64::from_bits(self.hot.ewma_ns.load(Ordering::Relaxed)) / 1e6),
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
    /// Anything else (with the status, when there was an answer), or a
    /// connection error.
    Failed(Option<u16>),
    /// No answer within `health_timeout_ms`: a failure, unless the
    /// instance answered proxied requests meanwhile.
    TimedOut,
}

/// Holds one outstanding request on an instance; dropping it ends it.
#[derive(Debug)]
pub struct InFlightGuard {
    instance: Arc<Instance>,
    /// The instance's `cut_gen` when the request began.
    cut_gen: u64,
}

impl InFlightGuard {
    pub fn instance(&self) -> &Arc<Instance> {
        &self.instance
    }

    /// An operator has ejected the instance since this request began, or
    /// it is ejected now (one relaxed read of a read-mostly line, and one
    /// more in the rare case the first says no: cheap enough per frame).
    pub fn is_cut(&self) -> bool {
        self.instance.cut_gen.load(Ordering::Acquire) != self.cut_gen
            || self.instance.operator_ejected.load(Ordering::Acquire)
    }

    /// Resolves once an operator has ejected the instance since this
    /// request began (at once if that has happened already). For what
    /// outlives its response head: a streamed body, a tunnel. It waits on
    /// a clone of the instance's token. (A child token per body, which
    /// would not share its lock, made the drain test fail more often:
    /// bench/README.md, "Draining 9,000 streams".)
    pub fn cut(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let token = {
            let token = self.instance.cut.lock().unwrap_or_else(|p| p.into_inner());
            (!self.is_cut()).then(|| token.clone())
        };
        async move {
            if let Some(token) = token {
                token.cancelled_owned().await;
            }
        }
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.instance.hot.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A named pool of instances with its balancer and retry budget.
pub struct Pool {
    pub name: String,
    pub balancer: Balancer,
    pub config: PoolConfig,
    /// Read by every request without a lock; changed (rarely) under
    /// `changing`, one writer at a time.
    instances: ArcSwap<Vec<Arc<Instance>>>,
    changing: Mutex<()>,
    /// Held while passive ejection decides, so that two errors at once
    /// cannot each see the other instance available and eject both.
    ejecting: Mutex<()>,
    budget: RetryBudget,
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
        let budget = RetryBudget::new(
            config.retry_budget_min_per_sec,
            config.retry_budget_percent / 100.0,
        );
        Pool {
            name,
            balancer,
            config,
            instances: ArcSwap::from_pointee(instances),
            changing: Mutex::new(()),
            ejecting: Mutex::new(()),
            budget,
            dns: Mutex::default(),
            metrics: PoolMetrics::default(),
            h2c: false,
        }
    }

    /// Replaces the instance list with what `f` makes of the current one.
    pub fn update_instances(&self, f: impl FnOnce(&[Arc<Instance>]) -> Vec<Arc<Instance>>) {
        let _one_writer = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        let next = f(&self.instances.load());
        self.instances.store(Arc::new(next));
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
        self.instances.load_full()
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
        let _one_writer = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        let guard = self.instances.load();
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
        self.instances.store(Arc::new(next));
        Ok(true)
    }

    /// Removes a registered instance. Returns false when none had that URL.
    pub fn deregister(&self, url: &str) -> Result<bool, String> {
        let url = url.trim_end_matches('/');
        let _one_writer = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        let guard = self.instances.load();
        match guard.iter().find(|i| i.url == url) {
            None => Ok(false),
            Some(i) if !i.registered => Err(format!(
                "`{url}` is configured, not registered; eject it instead"
            )),
            Some(_) => {
                let next: Vec<_> = guard.iter().filter(|i| i.url != url).cloned().collect();
                self.instances.store(Arc::new(next));
                Ok(true)
            }
        }
    }

    /// Drops registrations whose TTL ran out.
    pub fn expire_registrations(&self, now: Instant) {
        if !self.instances().iter().any(|i| i.is_expired(now)) {
            return;
        }
        let _one_writer = self.changing.lock().unwrap_or_else(|p| p.into_inner());
        let guard = self.instances.load();
        let next: Vec<_> = guard
            .iter()
            .filter(|i| !i.is_expired(now))
            .cloned()
            .collect();
        for gone in guard.iter().filter(|i| i.is_expired(now)) {
            tracing::info!(pool = %self.name, instance = %gone.url, "registration expired");
        }
        self.instances.store(Arc::new(next));
    }

    /// Picks an available instance not in `tried` (instances already
    /// tried, by [`Instance::id`]); when every available one was tried,
    /// any available one (a fresh connection may still work). Takes no
    /// lock and, for pools of up to 16 instances, allocates nothing.
    pub fn pick(&self, ctx: &PickContext<'_>, tried: &[usize]) -> Option<Arc<Instance>> {
        self.pick_at(ctx, tried, Instant::now())
    }

    /// [`Pool::pick`] at `now`, when the caller has read the clock already.
    pub fn pick_at(
        &self,
        ctx: &PickContext<'_>,
        tried: &[usize],
        now: Instant,
    ) -> Option<Arc<Instance>> {
        let all = self.instances.load();
        let mut available: SmallVec<[&Arc<Instance>; 16]> =
            all.iter().filter(|i| i.is_available(now)).collect();
        if available.is_empty() {
            // Passive ejection must not leave the pool with nothing: when
            // the rest went (draining, down) after it took some out, those
            // are tried again rather than every request answered 503. So
            // are instances down only because their checks timed out: an
            // instance taking back thousands of streams from a drained
            // one can miss its checks while it serves (a pool of dead
            // instances refuses connections, and stays at 503).
            available = all.iter().filter(|i| i.worth_a_last_try(now)).collect();
            if available.is_empty() {
                return None;
            }
        }
        if !tried.is_empty() {
            let untried: SmallVec<[&Arc<Instance>; 16]> = available
                .iter()
                .copied()
                .filter(|i| !tried.contains(&i.id()))
                .collect();
            if !untried.is_empty() {
                available = untried;
            }
        }
        self.balancer.pick(&available, ctx, now).cloned()
    }

    /// Whether an instance not in `tried` takes requests at `now`: where
    /// a request refused by a busy instance may go instead.
    pub fn has_untried(&self, tried: &[usize], now: Instant) -> bool {
        self.instances
            .load()
            .iter()
            .any(|i| !tried.contains(&i.id()) && i.is_available(now))
    }

    /// Counts a connection error against `instance` and ejects it when the
    /// threshold is reached and the ejection cap allows it.
    pub fn on_connection_error(&self, instance: &Instance) {
        if !instance.count_connection_error(self.config.eject_after_errors) {
            return;
        }
        let _deciding = self.ejecting.lock().unwrap_or_else(|p| p.into_inner());
        let all = self.instances();
        // Ejecting the last instance that takes requests would turn every
        // request into a 503 for the ejection's period, even once the
        // instance answers again (a connect that timed out in a burst of
        // reconnects, say): it stays, and active checks decide.
        let now = Instant::now();
        if !all
            .iter()
            .any(|i| i.id() != instance.id() && i.is_available(now))
        {
            tracing::warn!(
                pool = %self.name,
                instance = %instance.url,
                "not ejecting: no other instance of the pool takes requests"
            );
            return;
        }
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
        let period = instance.eject(self.config.eject_base, now);
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
    pub fn deposit(&self, now: Instant) {
        self.budget.deposit(now);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn withdraw_retry(&self) -> bool {
        self.budget.withdraw(Instant::now())
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
    fn a_timed_out_check_fails_only_an_instance_that_answered_nothing_meanwhile() {
        let config = PoolConfig::for_tests(); // one failure marks down
        let t0 = Instant::now();
        let after = |ms| t0 + Duration::from_millis(ms);
        let busy = Instance::new("http://10.0.0.1:80", 1, None).unwrap();
        busy.record_success(after(200));
        // Began at 100 ms, timed out at 600: it answered at 200, so busy.
        assert!(!busy.record_check(CheckOutcome::TimedOut, &config, after(100), after(600)));
        assert!(busy.is_available(after(600)), "a busy instance stays up");
        // Its last answer was before the next check began: a failure.
        assert!(busy.record_check(CheckOutcome::TimedOut, &config, after(1100), after(1600)));
        assert!(
            !busy.is_available(after(1600)),
            "silent through a check: down"
        );
        // A refused connection or an error status fails whatever came
        // before.
        for outcome in [CheckOutcome::Failed(None), CheckOutcome::Failed(Some(500))] {
            let up = Instance::new("http://10.0.0.2:80", 1, None).unwrap();
            up.record_success(after(2200));
            assert!(up.record_check(outcome, &config, after(2100), after(2300)));
            assert!(!up.is_available(after(2300)), "{outcome:?}");
        }
    }

    #[test]
    fn a_pool_with_nothing_up_tries_an_instance_down_only_by_slow_checks() {
        let pool = pool_of(&["http://10.0.0.1:80", "http://10.0.0.2:80"]);
        let config = PoolConfig::for_tests();
        let a = pool.find("http://10.0.0.1:80").unwrap();
        let b = pool.find("http://10.0.0.2:80").unwrap();
        let t = Instant::now();
        let ctx = PickContext {
            headers: &http::HeaderMap::new(),
            client_ip: [127, 0, 0, 1].into(),
        };
        a.record_check(CheckOutcome::Draining, &config, t, t);
        b.record_check(CheckOutcome::TimedOut, &config, t, t);
        assert!(!b.is_available(t), "down by its check");
        let picked = pool.pick_at(&ctx, &[], t).expect("the slow one is tried");
        assert_eq!(picked.url, b.url);
        // A refused connection after the timeouts: gone, not busy.
        b.record_check(CheckOutcome::Failed(None), &config, t, t);
        assert!(pool.pick_at(&ctx, &[], t).is_none());
        // Down by an error status from the start: not tried either.
        let c = pool_of(&["http://10.0.0.3:80"]);
        c.instances()[0].record_check(CheckOutcome::Failed(Some(500)), &config, t, t);
        assert!(c.pick_at(&ctx, &[], t).is_none());
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
        b_before.eject_by_operator();
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
    fn the_retry_budget_allows_a_floor_plus_a_share_of_recent_requests() {
        let t0 = Instant::now();
        // 1 retry/s over 10 s, plus 20% of the requests.
        let budget = RetryBudget::new(1, 0.2);
        let granted = (0..30).filter(|_| budget.withdraw(t0)).count();
        assert_eq!(granted, 10, "the floor: 1/s over the 10 s window");
        for _ in 0..100 {
            budget.deposit(t0);
        }
        let granted = (0..30).filter(|_| budget.withdraw(t0)).count();
        assert_eq!(granted, 20, "20% of 100 requests");
        // Eleven seconds on, the window holds none of that.
        let later = t0 + Duration::from_secs(11);
        let granted = (0..30).filter(|_| budget.withdraw(later)).count();
        assert_eq!(granted, 10, "only the floor again");
        // Counts from other threads (other shards) are summed.
        let budget = Arc::new(RetryBudget::new(0, 0.5));
        let other = Arc::clone(&budget);
        std::thread::spawn(move || {
            for _ in 0..10 {
                other.deposit(t0);
            }
        })
        .join()
        .unwrap();
        let granted = (0..30).filter(|_| budget.withdraw(t0)).count();
        assert_eq!(granted, 5, "half of another thread's 10 requests");
    }

    #[test]
    fn an_idle_instances_latency_estimate_decays_so_it_is_probed_again() {
        let slow = Instance::new("http://127.0.0.1:1", 1, None).unwrap();
        slow.observe_latency(Duration::from_millis(500));
        let now = Instant::now();
        let fresh = slow.load_cost(now);
        // Cost in ms to the default exponent 2, nothing outstanding.
        assert!(
            fresh > 400.0 * 400.0,
            "a slow sample is taken at once: {fresh}"
        );
        // 30 s without a sample.
        let later = slow.load_cost(now + Duration::from_secs(30));
        assert!(
            later < fresh / 10.0,
            "idle estimate decays: {fresh} -> {later}"
        );
    }

    #[test]
    fn an_instance_with_requests_outstanding_keeps_its_estimate() {
        let slow = Arc::new(Instance::new("http://127.0.0.1:1", 1, None).unwrap());
        slow.observe_latency(Duration::from_millis(10));
        let probe = Arc::clone(&slow).start();
        let now = Instant::now() + Duration::from_secs(30);
        // 10 ms squared, times (1 outstanding + 1): the probe's time out
        // does not make the instance look faster.
        let cost = slow.load_cost(now);
        assert!(cost > 190.0, "no decay while a request is out: {cost}");
        drop(probe);
        assert!(slow.load_cost(now) < 1.0, "idle again: decays");
    }

    #[test]
    fn a_peak_fades_after_some_faster_answers_well_within_the_decay_time() {
        let fast = Instance::new("http://127.0.0.1:1", 1, None).unwrap();
        let t0 = Instant::now();
        fast.observe_latency_at(Duration::from_millis(1), t0);
        // One stall: every answer then in flight looks 8 ms slow.
        fast.observe_latency_at(Duration::from_millis(8), t0 + Duration::from_millis(1));
        let ms = |i: &Instance, at| i.load_cost(at).sqrt();
        let peak = ms(&fast, t0 + Duration::from_millis(1));
        assert!((peak - 8.0).abs() < 0.01, "a peak is taken at once: {peak}");
        // 48 answers at 1 ms, one every millisecond: 48 ms, a twentieth
        // of the decay time.
        let mut at = t0 + Duration::from_millis(1);
        for _ in 0..48 {
            at += Duration::from_millis(1);
            fast.observe_latency_at(Duration::from_millis(1), at);
        }
        let after = ms(&fast, at);
        assert!(after < 1.5, "the peak faded: {peak} ms -> {after} ms");
        // A slow instance's own answers keep it slow.
        let slow = Instance::new("http://127.0.0.1:2", 1, None).unwrap();
        for k in 0..48 {
            slow.observe_latency_at(
                Duration::from_millis(10),
                t0 + Duration::from_millis(k * 10),
            );
        }
        let kept = ms(&slow, t0 + Duration::from_millis(470));
        assert!(kept > 9.9, "{kept}");
    }
}
