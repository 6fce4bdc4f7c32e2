//! The worker runtime: claims jobs from chosen queues with per-queue
//! concurrency, runs the handler registered for each job's kind under a
//! lease it keeps renewing, applies per-job timeouts, per-kind backoff and
//! rate limits, dead-letters jobs that used up their attempts, and shuts
//! down gracefully: it stops claiming, waits for running jobs up to a
//! deadline and hands back what cannot finish, so nothing is left running.

use crate::cron::Schedule;
use crate::job::{Job, JobError, Lease};
use crate::store::JobStore;
use async_trait::async_trait;
use futures_util::{FutureExt, StreamExt};
use rand::Rng;
use serde::de::DeserializeOwned;
use serde_json::Value;
use shoal_backends::now_millis;
use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Runs jobs of one kind.
#[async_trait]
pub trait JobHandler: Send + Sync + 'static {
    /// Runs one attempt. May run more than once for the same job (at least
    /// once delivery): make effects idempotent with
    /// [`JobContext::idempotency_key`].
    ///
    /// Cancel safety: the future is dropped when the job times out, is
    /// cancelled, loses its lease or is handed back at shutdown; anything
    /// half done must be safe to redo on the next attempt.
    async fn run(&self, ctx: JobContext) -> Result<(), JobError>;
}

/// A handler made from an async closure: `handler_fn(|ctx| async move { .. })`.
pub struct FnHandler<F>(F);

/// Wraps an async closure as a [`JobHandler`].
pub fn handler_fn<F, Fut>(f: F) -> FnHandler<F>
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), JobError>> + Send + 'static,
{
    FnHandler(f)
}

#[async_trait]
impl<F, Fut> JobHandler for FnHandler<F>
where
    F: Fn(JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), JobError>> + Send + 'static,
{
    async fn run(&self, ctx: JobContext) -> Result<(), JobError> {
        (self.0)(ctx).await
    }
}

/// What a handler sees of its job.
#[derive(Clone)]
pub struct JobContext {
    job: Arc<Job>,
    lease: Lease,
    store: Arc<dyn JobStore>,
    lease_duration: Duration,
    cancel: CancellationToken,
}

impl std::fmt::Debug for JobContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobContext")
            .field("id", &self.job.id)
            .field("kind", &self.job.kind)
            .field("attempt", &self.lease.attempt)
            .finish()
    }
}

impl JobContext {
    pub fn job(&self) -> &Job {
        &self.job
    }
    pub fn id(&self) -> &str {
        &self.job.id
    }
    /// 1 on the first attempt.
    pub fn attempt(&self) -> i64 {
        self.lease.attempt
    }
    pub fn payload(&self) -> &Value {
        &self.job.payload
    }
    /// The payload as `T`; a payload that does not decode is a permanent
    /// error (`?` converts it).
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        self.job.payload_as()
    }
    /// Request id of whoever enqueued the job.
    pub fn trace_id(&self) -> Option<&str> {
        self.job.trace_id.as_deref()
    }
    /// The lease of this attempt, for
    /// `SqlJobStore::complete_in_transaction`.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// A key that is the same on every attempt of this job for `step`, to
    /// pass to a payment provider or to a unique constraint, so a retried
    /// attempt does not repeat an effect: `job:<id>:<step>`.
    pub fn idempotency_key(&self, step: &str) -> String {
        format!("job:{}:{step}", self.job.id)
    }

    /// Stores `progress` (shown by `jobs show`) and renews the lease.
    /// Returns an error (and cancels this context) when the attempt is no
    /// longer this worker's.
    pub async fn report_progress(&self, progress: Value) -> Result<(), JobError> {
        match self
            .store
            .heartbeat(&self.lease, self.lease_duration, Some(&progress))
            .await
        {
            Ok(true) => Ok(()),
            Ok(false) => {
                self.cancel.cancel();
                Err(JobError::Retryable(
                    "lease lost (job cancelled or reclaimed)".into(),
                ))
            }
            Err(e) => Err(JobError::retryable(e)),
        }
    }

    /// Fires when the attempt is being stopped (cancel, lost lease,
    /// timeout, shutdown hand-back). Long handlers can `select!` on it.
    pub fn cancellation_token(&self) -> CancellationToken {
        self.cancel.clone()
    }
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

/// Exponential backoff with jitter: attempt n waits
/// `min(base * 2^(n-1), max)`, shortened by up to `jitter` (0..=1) at random.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(3600),
            jitter: 0.5,
        }
    }
}

impl Backoff {
    /// The wait after failed attempt `attempt` (1-based).
    pub fn delay(&self, attempt: i64) -> Duration {
        let exp = (attempt.max(1) - 1).min(40) as u32;
        let full = self
            .base
            .checked_mul(2u32.saturating_pow(exp.min(31)))
            .unwrap_or(self.max)
            .min(self.max);
        let jitter = self.jitter.clamp(0.0, 1.0);
        if jitter == 0.0 {
            return full;
        }
        let factor = 1.0 - jitter * rand::rng().random::<f64>();
        full.mul_f64(factor)
    }
}

/// At most `per_second` starts per second per worker process, with bursts
/// of `burst`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
}

/// Options of one job kind.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KindOptions {
    pub backoff: Backoff,
    pub rate_limit: Option<RateLimit>,
}

/// A generic cell rate limiter (token bucket without a timer).
#[derive(Debug)]
struct Limiter {
    interval: Duration,
    tolerance: Duration,
    tat: Mutex<Instant>,
}

impl Limiter {
    fn new(limit: RateLimit) -> Self {
        let interval = Duration::from_secs_f64(1.0 / limit.per_second.max(0.001));
        Limiter {
            interval,
            tolerance: interval * limit.burst.max(1).saturating_sub(1),
            tat: Mutex::new(Instant::now()),
        }
    }

    /// Takes a slot when it is free within `max_wait` and returns how long
    /// to wait for it; otherwise takes nothing and returns how long until
    /// one frees.
    fn reserve(&self, max_wait: Duration) -> Result<Duration, Duration> {
        let now = Instant::now();
        let mut tat = self.tat.lock().unwrap_or_else(|p| p.into_inner());
        let start = (*tat).max(now);
        let allowed_at = start.checked_sub(self.tolerance).unwrap_or(now);
        let wait = allowed_at.saturating_duration_since(now);
        if wait > max_wait {
            return Err(wait);
        }
        *tat = start + self.interval;
        Ok(wait)
    }
}

/// Old finished jobs to delete periodically.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub finished_older_than: Duration,
    pub dead_older_than: Duration,
}

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Shown in `jobs show` and logs.
    pub worker_id: String,
    /// Queues to take jobs from, each with its concurrency.
    pub queues: Vec<(String, usize)>,
    /// A claimed job is this worker's until now + lease; renewed every
    /// `heartbeat` while it runs. A crashed worker's jobs run again about
    /// one lease after its last renewal.
    pub lease: Duration,
    /// Defaults to a third of the lease.
    pub heartbeat: Option<Duration>,
    /// How long running jobs may take to finish after the stop signal
    /// before they are handed back.
    pub shutdown_timeout: Duration,
    /// How often queue gauges are refreshed.
    pub stats_interval: Duration,
    /// What old jobs to delete, checked every `prune_interval`.
    pub retention: Option<Retention>,
    pub prune_interval: Duration,
    /// Overrides the store's idle poll interval.
    pub poll_interval: Option<Duration>,
    /// How long a stopped attempt (cancelled, lease lost, timed out, handed
    /// back) may run on after its `JobContext` is cancelled, to clean up.
    pub cancel_grace: Duration,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            worker_id: format!(
                "worker-{}-{}",
                std::process::id(),
                &shoal_core::ids::new_id()[24..]
            ),
            queues: vec![("default".into(), 8)],
            lease: Duration::from_secs(30),
            heartbeat: None,
            shutdown_timeout: Duration::from_secs(20),
            stats_interval: Duration::from_secs(15),
            retention: Some(Retention {
                finished_older_than: Duration::from_secs(7 * 24 * 3600),
                dead_older_than: Duration::from_secs(30 * 24 * 3600),
            }),
            prune_interval: Duration::from_secs(300),
            poll_interval: None,
            cancel_grace: Duration::from_secs(1),
        }
    }
}

/// What a worker did, returned when it stops.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerReport {
    pub succeeded: u64,
    pub retried: u64,
    pub dead: u64,
    /// Handed back unfinished at shutdown or by a rate limit.
    pub released: u64,
    /// Attempts abandoned because the lease was lost (cancel, reclaim).
    pub lost: u64,
}

#[derive(Debug, Default)]
struct Counters {
    succeeded: AtomicU64,
    retried: AtomicU64,
    dead: AtomicU64,
    released: AtomicU64,
    lost: AtomicU64,
    /// Handlers running now.
    running: AtomicU64,
    /// When each handler of the last [`RUN_WINDOW`] finished, and how
    /// long it ran (µs); at most [`RUN_SAMPLES`].
    runs: std::sync::Mutex<std::collections::VecDeque<(Instant, u32)>>,
}

/// How far back a worker's run times are kept for their percentiles.
const RUN_WINDOW: Duration = Duration::from_secs(60);
/// The most run times kept (the latest).
const RUN_SAMPLES: usize = 8192;

/// A worker's state now, for the console (`WorkerProgress::live`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WorkerLive {
    /// Completions recorded since it started.
    pub succeeded: u64,
    /// Failed attempts (to be retried, and dead) since it started.
    pub failed: u64,
    /// Handlers running now.
    pub running: u64,
    /// Handler run times of the last minute, ms: median and 99th
    /// percentile (None with no run in that minute), and how many.
    pub run_p50_ms: Option<f64>,
    pub run_p99_ms: Option<f64>,
    pub runs_last_minute: usize,
}

impl Counters {
    fn ran(&self, took: Duration) {
        let now = Instant::now();
        let mut runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        while runs.len() >= RUN_SAMPLES
            || runs.front().is_some_and(|(at, _)| now - *at > RUN_WINDOW)
        {
            runs.pop_front();
        }
        runs.push_back((now, took.as_micros().min(u32::MAX as u128) as u32));
    }

    fn live(&self) -> WorkerLive {
        let now = Instant::now();
        let mut took: Vec<u32> = {
            let runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
            runs.iter()
                .filter(|(at, _)| now - *at <= RUN_WINDOW)
                .map(|(_, us)| *us)
                .collect()
        };
        took.sort_unstable();
        let at = |q: f64| -> Option<f64> {
            let i = ((took.len() as f64 * q).ceil() as usize).clamp(1, took.len().max(1)) - 1;
            took.get(i)
                .map(|us| (*us as f64 / 1000.0 * 100.0).round() / 100.0)
        };
        WorkerLive {
            succeeded: self.succeeded.load(Ordering::Relaxed),
            failed: self.retried.load(Ordering::Relaxed) + self.dead.load(Ordering::Relaxed),
            running: self.running.load(Ordering::Relaxed),
            run_p50_ms: at(0.50),
            run_p99_ms: at(0.99),
            runs_last_minute: took.len(),
        }
    }
}

/// Counts a running handler while it lives.
struct Running<'a>(&'a Counters);

impl<'a> Running<'a> {
    fn start(counters: &'a Counters) -> Self {
        counters.running.fetch_add(1, Ordering::Relaxed);
        Running(counters)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Registered {
    handler: Arc<dyn JobHandler>,
    options: KindOptions,
    limiter: Option<Limiter>,
}

impl Registered {
    fn new(handler: impl JobHandler, options: KindOptions) -> Registered {
        Registered {
            limiter: options.rate_limit.map(Limiter::new),
            handler: Arc::new(handler),
            options,
        }
    }
}

impl Counters {
    fn report(&self) -> WorkerReport {
        WorkerReport {
            succeeded: self.succeeded.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead: self.dead.load(Ordering::Relaxed),
            released: self.released.load(Ordering::Relaxed),
            lost: self.lost.load(Ordering::Relaxed),
        }
    }
}

/// Reads a worker's counters while it runs (see [`Worker::progress`]).
#[derive(Debug, Clone)]
pub struct WorkerProgress(Arc<Counters>);

impl WorkerProgress {
    /// What the worker has done so far: `succeeded` counts completions the
    /// store has recorded, not handlers that returned.
    pub fn report(&self) -> WorkerReport {
        self.0.report()
    }

    /// Its state now: totals, handlers running, run times of the last
    /// minute.
    pub fn live(&self) -> WorkerLive {
        self.0.live()
    }
}

/// A completion waiting for the completer, with where to send its answer.
type Completion = (Lease, oneshot::Sender<Result<bool, String>>);

/// How long a busy queue loop waits for more free slots before claiming.
const CLAIM_LINGER: Duration = Duration::from_millis(2);

/// Most completions one store write carries.
const COMPLETION_BATCH: usize = 256;

struct Shared {
    store: Arc<dyn JobStore>,
    handlers: HashMap<String, Registered>,
    /// Handlers of whole queues, whatever the job's kind (push delivery).
    queue_handlers: HashMap<String, Registered>,
    options: WorkerOptions,
    counters: Arc<Counters>,
    completions: mpsc::Sender<Completion>,
}

impl Shared {
    /// Records a successful attempt through the completer, which writes the
    /// completions that piled up while its previous write was in flight in
    /// one go: no waiting added when idle, one write for many jobs when
    /// busy.
    async fn complete(&self, lease: &Lease) -> Result<bool, String> {
        let (reply, answer) = oneshot::channel();
        self.completions
            .send((lease.clone(), reply))
            .await
            .map_err(|_| "the completer has stopped".to_string())?;
        answer
            .await
            .map_err(|_| "the completer has stopped".to_string())?
    }
}

/// How long a batch waits to fill while another batch is being written.
const COMPLETION_LINGER: Duration = Duration::from_millis(1);

/// Batch writes in flight at once: a slow or failing write (the store
/// went away mid-request) holds one of them, not the whole worker.
const COMPLETION_WRITERS: usize = 4;

/// Writes completions in batches until every sender is gone.
async fn completer(store: Arc<dyn JobStore>, mut rx: mpsc::Receiver<Completion>) {
    let writers = Arc::new(Semaphore::new(COMPLETION_WRITERS));
    while let Some(first) = rx.recv().await {
        let Ok(writer) = writers.clone().acquire_owned().await else {
            return;
        };
        // Whatever piled up while waiting for a writer goes in this batch.
        let mut batch: Vec<Completion> = Vec::with_capacity(COMPLETION_BATCH);
        batch.push(first);
        let gather = |batch: &mut Vec<Completion>, rx: &mut mpsc::Receiver<Completion>| {
            while batch.len() < COMPLETION_BATCH {
                match rx.try_recv() {
                    Ok(c) => batch.push(c),
                    Err(_) => break,
                }
            }
        };
        gather(&mut batch, &mut rx);
        // Busy (another write is in flight): let this batch fill for a
        // moment rather than write a handful of completions (each write is
        // a commit, which is what a busy database runs short of). Idle, a
        // lone completion is written at once.
        if writers.available_permits() < COMPLETION_WRITERS - 1 && batch.len() < COMPLETION_BATCH {
            tokio::time::sleep(COMPLETION_LINGER).await;
            gather(&mut batch, &mut rx);
        }
        let store = store.clone();
        tokio::spawn(async move {
            write_batch(store, batch).await;
            drop(writer);
        });
    }
}

/// Completions retried one by one at once, after a batch write failed.
const COMPLETION_RETRIES_AT_ONCE: usize = 8;

/// One batch in one write; the completions that failed (all of them if the
/// one statement failed) are retried each on its own, a few at a time, so
/// one bad write does not fail the others.
async fn write_batch(store: Arc<dyn JobStore>, batch: Vec<Completion>) {
    let leases: Vec<Lease> = batch.iter().map(|(l, _)| l.clone()).collect();
    metrics::histogram!("shoal_jobs_completion_batch_size").record(leases.len() as f64);
    let mut again = Vec::new();
    match store.complete_many(&leases).await {
        Ok(answers) => {
            for ((lease, reply), answer) in batch.into_iter().zip(answers) {
                match answer {
                    Ok(done) => {
                        let _ = reply.send(Ok(done));
                    }
                    Err(_) => again.push((lease, reply)),
                }
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, jobs = leases.len(), "batched completion failed; completing one by one");
            again = batch;
        }
    }
    futures_util::stream::iter(again)
        .for_each_concurrent(COMPLETION_RETRIES_AT_ONCE, |(lease, reply)| {
            let store = store.clone();
            async move {
                let result = with_retries(|| store.complete(&lease)).await;
                let _ = reply.send(result.map_err(|e| e.to_string()));
            }
        })
        .await;
}

/// A set of handlers bound to a store. Build, register, then [`Worker::run`].
pub struct Worker {
    store: Arc<dyn JobStore>,
    handlers: HashMap<String, Registered>,
    queue_handlers: HashMap<String, Registered>,
    options: WorkerOptions,
    schedules: Vec<Schedule>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("options", &self.options)
            .field("kinds", &self.handlers.keys().collect::<Vec<_>>())
            .field("queues", &self.queue_handlers.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Worker {
    pub fn new(store: Arc<dyn JobStore>, options: WorkerOptions) -> Self {
        Worker {
            store,
            handlers: HashMap::new(),
            queue_handlers: HashMap::new(),
            options,
            schedules: Vec::new(),
            counters: Arc::default(),
        }
    }

    /// A handle on this worker's counters, readable while it runs.
    pub fn progress(&self) -> WorkerProgress {
        WorkerProgress(self.counters.clone())
    }

    /// Runs `kind` jobs with `handler` and default options.
    pub fn register(self, kind: &str, handler: impl JobHandler) -> Self {
        self.register_with(kind, handler, KindOptions::default())
    }

    pub fn register_with(
        mut self,
        kind: &str,
        handler: impl JobHandler,
        options: KindOptions,
    ) -> Self {
        self.handlers
            .insert(kind.to_string(), Registered::new(handler, options));
        self
    }

    /// Runs every job of `queue` with `handler`, whatever its kind, ahead
    /// of the handlers by kind: what binds a queue to an HTTP endpoint
    /// (push delivery). The worker must take jobs from `queue`
    /// (`WorkerOptions::queues`).
    pub fn register_queue(
        mut self,
        queue: &str,
        handler: impl JobHandler,
        options: KindOptions,
    ) -> Self {
        self.queue_handlers
            .insert(queue.to_string(), Registered::new(handler, options));
        self
    }

    /// The id it claims jobs under (`WorkerOptions::worker_id`).
    pub fn worker_id(&self) -> &str {
        &self.options.worker_id
    }

    /// The schedules this worker carries (for the console's cron table).
    pub fn schedules(&self) -> &[Schedule] {
        &self.schedules
    }

    /// Enqueues `schedule`'s job on every tick while this worker runs (once
    /// per tick however many workers carry the same schedule).
    pub fn schedule(mut self, schedule: Schedule) -> Self {
        self.schedules.push(schedule);
        self
    }

    /// Runs until `shutdown` fires, then stops claiming, waits up to
    /// `shutdown_timeout` for running jobs and hands back the rest.
    pub async fn run(self, shutdown: CancellationToken) -> WorkerReport {
        let (completions, pending) = mpsc::channel(4 * COMPLETION_BATCH);
        // Ends by itself once the last `Shared` (and its sender) is gone.
        tokio::spawn(completer(self.store.clone(), pending));
        let shared = Arc::new(Shared {
            store: self.store.clone(),
            handlers: self.handlers,
            queue_handlers: self.queue_handlers,
            options: self.options,
            counters: self.counters,
            completions,
        });
        let mut loops = JoinSet::new();
        for (queue, concurrency) in shared.options.queues.clone() {
            loops.spawn(queue_loop(
                shared.clone(),
                queue,
                concurrency.max(1),
                shutdown.clone(),
            ));
        }
        let background = shutdown.child_token();
        loops.spawn(stats_loop(shared.clone(), background.clone()));
        if !self.schedules.is_empty() {
            loops.spawn(crate::cron::run_schedules(
                self.store.clone(),
                self.schedules,
                background.clone(),
            ));
        }
        while loops.join_next().await.is_some() {}
        shared.counters.report()
    }
}

async fn queue_loop(
    shared: Arc<Shared>,
    queue: String,
    concurrency: usize,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(concurrency));
    // A job whose handler succeeded gives its slot to the next job while
    // its completion is written; at most `concurrency` of those wait at
    // once, so claims and completion writes overlap without running more
    // handlers than asked.
    let completing = Arc::new(Semaphore::new(concurrency));
    let hand_back = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let wakeups = shared.store.wakeups();
    let poll = shared
        .options
        .poll_interval
        .unwrap_or_else(|| shared.store.poll_interval());
    loop {
        while tasks.try_join_next().is_some() {}
        if shutdown.is_cancelled() {
            break;
        }
        let free = permits.available_permits();
        if free == 0 {
            tokio::select! {
                permit = permits.clone().acquire_owned() => drop(permit),
                _ = shutdown.cancelled() => break,
            }
            continue;
        }
        // Busy: give the running jobs a moment (at most CLAIM_LINGER) to
        // free a quarter of the slots, so one claim fetches several jobs
        // instead of one store write per job. Idle workers claim at once.
        let batch = (concurrency / 4).max(1);
        if free < batch {
            let more = permits.clone().acquire_many_owned(batch as u32);
            if let Ok(Ok(p)) = tokio::time::timeout(CLAIM_LINGER, more).await {
                drop(p);
            }
        }
        let free = permits.available_permits();
        let notified = wakeups.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        metrics::histogram!("shoal_jobs_claim_request_size", "queue" => queue.clone())
            .record(free as f64);
        let claimed = shared
            .store
            .claim(
                &queue,
                free,
                shared.options.lease,
                &shared.options.worker_id,
            )
            .await;
        match claimed {
            Ok(jobs) => {
                let full = jobs.len() == free;
                for job in jobs {
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        break;
                    };
                    let span = tracing::info_span!(
                        "job",
                        job.id = %job.id,
                        job.kind = %job.kind,
                        attempt = job.attempts,
                        trace_id = job.trace_id.as_deref().unwrap_or("")
                    );
                    let shared = shared.clone();
                    let hand_back = hand_back.clone();
                    let slot = Slot {
                        running: permit,
                        completing: completing.clone(),
                    };
                    tasks.spawn(run_job(shared, job, hand_back, slot).instrument(span));
                }
                if full {
                    continue;
                }
                tokio::select! {
                    _ = &mut notified => {}
                    _ = tokio::time::sleep(poll) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
            Err(e) => {
                tracing::warn!(queue, error = %e, "claiming jobs failed; retrying in 1 s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => break,
                }
            }
        }
    }
    // Graceful stop: let running jobs finish, then hand back the rest.
    let deadline = shared.options.shutdown_timeout;
    let drained = tokio::time::timeout(deadline, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::info!(
            queue,
            running = tasks.len(),
            "shutdown deadline reached; handing back unfinished jobs"
        );
        hand_back.cancel();
        let released = tokio::time::timeout(Duration::from_secs(10), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if released.is_err() {
            tasks.abort_all();
        }
    }
}

enum Outcome {
    Finished(Result<(), JobError>),
    TimedOut,
    HandBack,
    Lost,
}

/// A job's place in its queue's concurrency: the running slot, and where to
/// wait for a completing one.
struct Slot {
    running: tokio::sync::OwnedSemaphorePermit,
    completing: Arc<Semaphore>,
}

async fn run_job(shared: Arc<Shared>, job: Job, hand_back: CancellationToken, slot: Slot) {
    let Some(lease) = job.lease() else {
        return;
    };
    let store = shared.store.clone();
    let queue = job.queue.clone();
    let now = now_millis();
    metrics::counter!("shoal_jobs_started_total", "queue" => queue.clone()).increment(1);
    metrics::histogram!("shoal_jobs_enqueue_to_start_seconds", "queue" => queue.clone())
        .record((now - job.run_at).max(0) as f64 / 1000.0);

    let registered = shared
        .queue_handlers
        .get(&job.queue)
        .or_else(|| shared.handlers.get(&job.kind));
    let Some(registered) = registered else {
        // Another worker (a newer version) may know this kind.
        let error = format!(
            "no handler for kind `{}` on worker {}",
            job.kind, shared.options.worker_id
        );
        finish_failed(&shared, &job, &lease, &error, true, &Backoff::default()).await;
        return;
    };

    if let Some(limiter) = &registered.limiter {
        match limiter.reserve(Duration::from_secs(1)) {
            Ok(wait) if !wait.is_zero() => {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = hand_back.cancelled() => {
                        release(&shared, &lease, now_millis()).await;
                        return;
                    }
                }
            }
            Ok(_) => {}
            Err(wait) => {
                release(&shared, &lease, now_millis() + wait.as_millis() as i64).await;
                return;
            }
        }
    }

    let lease_duration = shared.options.lease;
    let cancel = CancellationToken::new();
    let ctx = JobContext {
        job: Arc::new(job.clone()),
        lease: lease.clone(),
        store: store.clone(),
        lease_duration,
        cancel: cancel.clone(),
    };
    let handler = registered.handler.clone();
    // Jobs this one enqueues and services it calls carry its trace: the
    // request's that enqueued it, or else its own id.
    let trace = job.trace_id.clone().unwrap_or_else(|| job.id.clone());
    // With traces on, the run is a span of the enqueuer's trace (a child
    // of the enqueue, and linked to it), within which the handler's calls
    // are made.
    let mut span = run_span(&job);
    let span_ctx = span.as_ref().map(|s| s.ctx);
    let run = AssertUnwindSafe(shoal_core::trace::scope(trace, async move {
        match span_ctx {
            Some(c) => shoal_core::spans::within(c, handler.run(ctx)).await,
            None => handler.run(ctx).await,
        }
    }))
    .catch_unwind();
    tokio::pin!(run);
    let running = Running::start(&shared.counters);
    let started = Instant::now();
    let timeout = tokio::time::sleep(Duration::from_millis(job.timeout_ms.max(1) as u64));
    tokio::pin!(timeout);
    let every = shared
        .options
        .heartbeat
        .unwrap_or(lease_duration / 3)
        .max(Duration::from_millis(10));
    let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut lease_deadline = Instant::now() + lease_duration;
    let outcome = loop {
        tokio::select! {
            result = &mut run => break Outcome::Finished(match result {
                Ok(r) => r,
                Err(panic) => Err(JobError::Retryable(format!("handler panicked: {}", panic_message(&panic)))),
            }),
            _ = &mut timeout => break Outcome::TimedOut,
            _ = hand_back.cancelled() => break Outcome::HandBack,
            _ = cancel.cancelled() => break Outcome::Lost,
            _ = heartbeat.tick() => {
                let sent = Instant::now();
                match store.heartbeat(&lease, lease_duration, None).await {
                    Ok(true) => lease_deadline = sent + lease_duration,
                    Ok(false) => break Outcome::Lost,
                    Err(e) => {
                        tracing::warn!(job.id = %lease.job_id, error = %e, "heartbeat failed");
                        if Instant::now() >= lease_deadline {
                            break Outcome::Lost;
                        }
                    }
                }
            }
        }
    };
    cancel.cancel();
    if matches!(outcome, Outcome::Finished(_) | Outcome::TimedOut) {
        shared.counters.ran(started.elapsed());
    }
    drop(running);
    if let Some(mut s) = span.take() {
        match &outcome {
            Outcome::Finished(Ok(())) => {}
            Outcome::Finished(Err(e)) => s.fail(e.to_string()),
            Outcome::TimedOut => s.fail("timed out"),
            Outcome::HandBack => s.fail("handed back: the worker is stopping"),
            Outcome::Lost => s.fail("lease lost"),
        }
        s.end();
    }
    if !matches!(outcome, Outcome::Finished(_)) {
        // Let a cooperative handler see the cancellation and clean up; its
        // result no longer counts.
        let _ = tokio::time::timeout(shared.options.cancel_grace, &mut run).await;
    }
    let kind_backoff = registered.options.backoff;
    match outcome {
        Outcome::Finished(Ok(())) => {
            // The handler is done: hand its running slot to the next job
            // once a completing one is free.
            let _completing = slot.completing.clone().acquire_owned().await;
            drop(slot.running);
            // Keep renewing the lease while the completion waits its turn
            // and is written: a lease that lapsed here would let another
            // worker run the job again.
            let completion = shared.complete(&lease);
            tokio::pin!(completion);
            let recorded = loop {
                tokio::select! {
                    recorded = &mut completion => break recorded,
                    _ = heartbeat.tick() => {
                        if let Err(e) = store.heartbeat(&lease, lease_duration, None).await {
                            tracing::debug!(job.id = %lease.job_id, error = %e, "heartbeat while completing failed");
                        }
                    }
                }
            };
            match recorded {
                Ok(true) => {
                    shared.counters.succeeded.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("shoal_jobs_succeeded_total", "queue" => queue).increment(1);
                }
                Ok(false) => {
                    // Completed in the handler's own transaction, cancelled,
                    // or reclaimed after our lease lapsed.
                    tracing::debug!(job.id = %lease.job_id, "completion found the lease already gone");
                }
                Err(e) => {
                    tracing::error!(job.id = %lease.job_id, error = %e, "cannot record completion; the job will run again after its lease")
                }
            }
        }
        Outcome::Finished(Err(JobError::Retryable(msg))) => {
            finish_failed(&shared, &job, &lease, &msg, true, &kind_backoff).await;
        }
        Outcome::Finished(Err(JobError::Permanent(msg))) => {
            finish_failed(&shared, &job, &lease, &msg, false, &kind_backoff).await;
        }
        Outcome::TimedOut => {
            let msg = format!("timed out after {} ms", job.timeout_ms);
            finish_failed(&shared, &job, &lease, &msg, true, &kind_backoff).await;
        }
        Outcome::HandBack => release(&shared, &lease, now_millis()).await,
        Outcome::Lost => {
            shared.counters.lost.fetch_add(1, Ordering::Relaxed);
            tracing::info!(job.id = %lease.job_id, "attempt stopped: job cancelled or lease lost");
        }
    }
}

async fn finish_failed(
    shared: &Shared,
    job: &Job,
    lease: &Lease,
    error: &str,
    retryable: bool,
    backoff: &Backoff,
) {
    let queue = job.queue.clone();
    metrics::counter!("shoal_jobs_failed_total", "queue" => queue.clone()).increment(1);
    let retry_at = (retryable && lease.attempt < job.max_attempts)
        .then(|| now_millis() + backoff.delay(lease.attempt).as_millis() as i64);
    let result = with_retries(|| shared.store.fail(lease, error, retry_at)).await;
    match (result, retry_at) {
        (Ok(true), Some(_)) => {
            shared.counters.retried.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("shoal_jobs_retried_total", "queue" => queue).increment(1);
            tracing::info!(job.id = %job.id, attempt = lease.attempt, error, "job failed; will retry");
        }
        (Ok(true), None) => {
            shared.counters.dead.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("shoal_jobs_dead_total", "queue" => queue).increment(1);
            tracing::warn!(job.id = %job.id, attempt = lease.attempt, error, "job is dead");
        }
        (Ok(false), _) => {
            shared.counters.lost.fetch_add(1, Ordering::Relaxed);
        }
        (Err(e), _) => {
            tracing::error!(job.id = %job.id, error = %e, "cannot record failure; the job will run again after its lease")
        }
    }
}

async fn release(shared: &Shared, lease: &Lease, run_at: i64) {
    match with_retries(|| shared.store.release(lease, run_at)).await {
        Ok(true) => {
            shared.counters.released.fetch_add(1, Ordering::Relaxed);
        }
        Ok(false) => {}
        Err(e) => {
            tracing::error!(job.id = %lease.job_id, error = %e, "cannot hand back job; it runs again after its lease")
        }
    }
}

/// Retries a store write a few times (about 1.5 s in all): a completion
/// lost to a blip would rerun the job.
async fn with_retries<T, F, Fut>(mut f: F) -> Result<T, crate::QueueError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, crate::QueueError>>,
{
    let mut delay = Duration::from_millis(100);
    for _ in 0..3 {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                tracing::debug!(error = %e, "job store write failed; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
        }
    }
    f().await
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

async fn stats_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(
        shared
            .options
            .stats_interval
            .max(Duration::from_millis(100)),
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_prune: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        match shared.store.gauges().await {
            Ok(gauges) => {
                for g in gauges {
                    metrics::gauge!("shoal_jobs_queue_depth", "queue" => g.queue.clone())
                        .set(g.depth as f64);
                    metrics::gauge!("shoal_jobs_oldest_age_seconds", "queue" => g.queue.clone())
                        .set(g.oldest_age_ms as f64 / 1000.0);
                    if let Some(dead) = g.dead {
                        metrics::gauge!("shoal_jobs_dead", "queue" => g.queue).set(dead as f64);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "job stats failed"),
        }
        let prune_due =
            last_prune.is_none_or(|t: Instant| t.elapsed() >= shared.options.prune_interval);
        if let (Some(r), true) = (shared.options.retention, prune_due) {
            last_prune = Some(Instant::now());
            match shared
                .store
                .prune(r.finished_older_than, r.dead_older_than)
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(pruned = n, "old jobs deleted"),
                Err(e) => tracing::warn!(error = %e, "pruning jobs failed"),
            }
        }
    }
}

/// The span of one run of `job` (while traces are on): a child of the
/// span that enqueued it, and linked to it, so that a trace viewer shows
/// it under the request and beside it as its consequence.
fn run_span(job: &Job) -> Option<shoal_core::spans::Span> {
    use shoal_core::spans::{start, Kind, SpanContext};
    let parent = job.traceparent.as_deref().and_then(SpanContext::parse);
    let mut span = start(
        format!("run {} {}", job.queue, job.kind),
        Kind::Consumer,
        parent,
    )?;
    if let Some(p) = parent {
        span.link(p);
    }
    span.attr("messaging.destination.name", job.queue.as_str());
    span.attr("shoal.job.kind", job.kind.as_str());
    span.attr("shoal.job.id", job.id.as_str());
    span.attr("shoal.job.attempt", job.attempts);
    Some(span)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_run_times_are_the_last_minutes_percentiles() {
        let c = Counters::default();
        assert_eq!(c.live().run_p50_ms, None, "no run yet");
        for ms in 1..=100u64 {
            c.ran(Duration::from_millis(ms));
        }
        let live = c.live();
        assert_eq!(live.runs_last_minute, 100);
        assert_eq!(live.run_p50_ms, Some(50.0));
        assert_eq!(live.run_p99_ms, Some(99.0));
        // Older than the window: gone from the percentiles.
        c.runs
            .lock()
            .unwrap()
            .iter_mut()
            .take(90)
            .for_each(|(at, _)| {
                *at -= RUN_WINDOW + Duration::from_secs(1);
            });
        let live = c.live();
        assert_eq!(live.runs_last_minute, 10);
        assert_eq!(live.run_p50_ms, Some(95.0));
        // In flight while a guard lives.
        let a = Running::start(&c);
        let b = Running::start(&c);
        assert_eq!(c.live().running, 2);
        drop((a, b));
        assert_eq!(c.live().running, 0);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
            jitter: 0.0,
        };
        assert_eq!(b.delay(1), Duration::from_millis(100));
        assert_eq!(b.delay(2), Duration::from_millis(200));
        assert_eq!(b.delay(4), Duration::from_millis(800));
        assert_eq!(b.delay(5), Duration::from_secs(1));
        assert_eq!(b.delay(500), Duration::from_secs(1));
        let j = Backoff { jitter: 0.5, ..b };
        for _ in 0..100 {
            let d = j.delay(3);
            assert!(d <= Duration::from_millis(400) && d >= Duration::from_millis(200));
        }
    }

    #[test]
    fn rate_limiter_allows_a_burst_then_spaces_starts() {
        let l = Limiter::new(RateLimit {
            per_second: 10.0,
            burst: 3,
        });
        for _ in 0..3 {
            assert_eq!(l.reserve(Duration::ZERO), Ok(Duration::ZERO));
        }
        let wait = l.reserve(Duration::from_secs(1)).unwrap();
        assert!(wait > Duration::from_millis(50) && wait <= Duration::from_millis(100));
        // A slot too far away is not taken.
        assert!(l.reserve(Duration::ZERO).is_err());
    }
}
