//! `queue-fault-worker`: one worker process for the fault tests
//! (`tests/faults_*.rs`). It runs a `Worker` on one queue of a SQLite,
//! PostgreSQL or NATS JetStream job store and records, in a SQL database:
//!
//! - `fault_completions`: one row per handler run that reached its end
//!   (job id, attempt, pid, when it started, when it was recorded), written
//!   *before* the handler returns `Ok`, so a job that ran twice shows two
//!   rows and a run after success shows a row started after the job's
//!   `finished_at`;
//! - `fault_successes`: one row per `complete` that the store accepted
//!   (`Ok(true)`), written by a wrapper around the store, so a job
//!   completed twice shows two rows.
//!
//! The tables must exist (the test creates them). Configured by
//! environment:
//!
//! | variable | meaning |
//! |---|---|
//! | `FAULT_BACKEND_URL` | `sqlite://..`, `postgres://..` or `nats://..` |
//! | `FAULT_NATS_PREFIX` | NATS stream/bucket prefix (NATS only) |
//! | `FAULT_RECORD_URL` | SQL database of the record tables (default: the backend, when SQL) |
//! | `FAULT_QUEUE` | queue name (default `faults`) |
//! | `FAULT_CONCURRENCY` | jobs at once (default 8) |
//! | `FAULT_LEASE_MS` | lease, and NATS `ack_wait` (default 1500) |
//! | `FAULT_SLEEP_MAX_MS` | each run sleeps 0..=this many ms (default 5) |
//! | `FAULT_MAX_SECONDS` | exits by itself after this long (default 180) |
//!
//! It also exits when its parent process goes away, so a test that dies
//! leaves no worker behind.

use async_trait::async_trait;
use rand::Rng;
use serde_json::Value;
use shoal_backends::{now_millis, Database};
use shoal_queue::{
    handler_fn, Enqueued, Job, JobError, JobFilter, JobStore, Lease, NatsJobStore,
    NatsJobStoreOptions, NewJob, QueueError, QueueStats, SqlJobStore, Worker, WorkerOptions,
};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn env_num(name: &str, default: u64) -> u64 {
    env(name)
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} must be a number"))
        })
        .unwrap_or(default)
}

/// Delegates to the real store and records every accepted completion.
#[derive(Debug)]
struct Recording {
    inner: Arc<dyn JobStore>,
    record: Database,
    pid: i64,
}

#[async_trait]
impl JobStore for Recording {
    async fn enqueue(&self, job: NewJob) -> Result<Enqueued, QueueError> {
        self.inner.enqueue(job).await
    }
    async fn claim(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
        worker_id: &str,
    ) -> Result<Vec<Job>, QueueError> {
        self.inner.claim(queue, max, lease, worker_id).await
    }
    async fn heartbeat(
        &self,
        lease: &Lease,
        extend: Duration,
        progress: Option<&Value>,
    ) -> Result<bool, QueueError> {
        self.inner.heartbeat(lease, extend, progress).await
    }
    async fn complete(&self, lease: &Lease) -> Result<bool, QueueError> {
        let done = self.inner.complete(lease).await?;
        if done {
            let at = now_millis();
            for _ in 0..20 {
                let inserted = sqlx::query(
                    "INSERT INTO fault_successes (job_id, attempt, pid, at_ms) VALUES ($1, $2, $3, $4)",
                )
                .bind(&lease.job_id)
                .bind(lease.attempt)
                .bind(self.pid)
                .bind(at)
                .execute(self.record.pool())
                .await;
                match inserted {
                    Ok(_) => break,
                    Err(e) => {
                        eprintln!("fault-worker {}: recording success failed: {e}", self.pid);
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            }
        }
        Ok(done)
    }
    async fn fail(
        &self,
        lease: &Lease,
        error: &str,
        retry_at: Option<i64>,
    ) -> Result<bool, QueueError> {
        self.inner.fail(lease, error, retry_at).await
    }
    async fn release(&self, lease: &Lease, run_at: i64) -> Result<bool, QueueError> {
        self.inner.release(lease, run_at).await
    }
    async fn cancel(&self, id: &str) -> Result<bool, QueueError> {
        self.inner.cancel(id).await
    }
    async fn get(&self, id: &str) -> Result<Option<Job>, QueueError> {
        self.inner.get(id).await
    }
    async fn list(&self, filter: &JobFilter) -> Result<Vec<Job>, QueueError> {
        self.inner.list(filter).await
    }
    async fn retry_dead(&self, id: &str) -> Result<bool, QueueError> {
        self.inner.retry_dead(id).await
    }
    async fn discard_dead(&self, id: &str) -> Result<bool, QueueError> {
        self.inner.discard_dead(id).await
    }
    /// Empty: the worker's gauge task calls this at start, and on NATS it
    /// reads every record (10,000 here) — too slow for a process that is
    /// restarted every second.
    async fn stats(&self) -> Result<Vec<QueueStats>, QueueError> {
        Ok(Vec::new())
    }
    async fn prune(
        &self,
        finished_older_than: Duration,
        dead_older_than: Duration,
    ) -> Result<u64, QueueError> {
        self.inner.prune(finished_older_than, dead_older_than).await
    }
    fn wakeups(&self) -> Arc<Notify> {
        self.inner.wakeups()
    }
    fn poll_interval(&self) -> Duration {
        self.inner.poll_interval()
    }
    fn orders_by_priority(&self) -> bool {
        self.inner.orders_by_priority()
    }
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }
}

async fn connect_with_retries(url: &str) -> Database {
    let mut last = None;
    for _ in 0..40 {
        match Database::connect(url, 8, Duration::from_secs(10)).await {
            Ok(db) => return db,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("cannot connect to {url}: {last:?}");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let url = env("FAULT_BACKEND_URL").expect("FAULT_BACKEND_URL");
    let queue = env("FAULT_QUEUE").unwrap_or_else(|| "faults".into());
    let concurrency = env_num("FAULT_CONCURRENCY", 8) as usize;
    let lease = Duration::from_millis(env_num("FAULT_LEASE_MS", 1500));
    let sleep_max = env_num("FAULT_SLEEP_MAX_MS", 5);
    let max_run = Duration::from_secs(env_num("FAULT_MAX_SECONDS", 180));
    let pid = std::process::id() as i64;

    let (store, record): (Arc<dyn JobStore>, Database) = if url.starts_with("nats://") {
        let prefix = env("FAULT_NATS_PREFIX").expect("FAULT_NATS_PREFIX");
        let options = NatsJobStoreOptions {
            prefix,
            ack_wait: lease,
            poll_interval: Duration::from_millis(50),
            ..NatsJobStoreOptions::default()
        };
        let store = NatsJobStore::connect(&url, options)
            .await
            .expect("connect to NATS");
        let record_url = env("FAULT_RECORD_URL").expect("FAULT_RECORD_URL (NATS)");
        (Arc::new(store), connect_with_retries(&record_url).await)
    } else {
        let db = connect_with_retries(&url).await;
        let store = SqlJobStore::open(db.clone(), &url)
            .await
            .expect("open the SQL job store");
        let record = match env("FAULT_RECORD_URL") {
            Some(r) if r != url => connect_with_retries(&r).await,
            _ => db,
        };
        (Arc::new(store), record)
    };
    let store: Arc<dyn JobStore> = Arc::new(Recording {
        inner: store,
        record: record.clone(),
        pid,
    });

    let started = now_millis();
    let handler_db = record.clone();
    let handler = handler_fn(move |ctx| {
        let db = handler_db.clone();
        async move {
            let started_ms = now_millis();
            let sleep = rand::rng().random_range(0..=sleep_max);
            if sleep > 0 {
                tokio::time::sleep(Duration::from_millis(sleep)).await;
            }
            sqlx::query(
                "INSERT INTO fault_completions (job_id, attempt, pid, started_ms, recorded_ms)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(ctx.id())
            .bind(ctx.attempt())
            .bind(pid)
            .bind(started_ms)
            .bind(now_millis())
            .execute(db.pool())
            .await
            .map_err(JobError::retryable)?;
            Ok(())
        }
    });

    let options = WorkerOptions {
        worker_id: format!("fault-{pid}"),
        queues: vec![(queue, concurrency)],
        lease,
        shutdown_timeout: Duration::from_secs(2),
        stats_interval: Duration::from_secs(3600),
        retention: None,
        ..WorkerOptions::default()
    };
    let worker = Worker::new(store, options).register("fault.noop", handler);
    let stop = CancellationToken::new();
    let watchdog = stop.clone();
    let parent = std::os::unix::process::parent_id();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let orphaned = std::os::unix::process::parent_id() != parent;
            let expired = now_millis() - started > max_run.as_millis() as i64;
            if orphaned || expired {
                eprintln!("fault-worker {pid}: stopping (orphaned={orphaned}, expired={expired})");
                watchdog.cancel();
                return;
            }
        }
    });
    let report = worker.run(stop).await;
    eprintln!("fault-worker {pid}: {report:?}");
}
