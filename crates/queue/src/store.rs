//! The `JobStore` trait: the operations every queue backend offers, so the
//! worker runtime, the cron scheduler, the CLI and the conformance suite
//! work the same over SQLite, PostgreSQL or NATS JetStream.

use crate::job::{Enqueued, Job, JobFilter, Lease, NewJob, QueueError, QueueGauges, QueueStats};
use async_trait::async_trait;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// A durable job queue with leases.
///
/// Cancel safety: every method is a single request to the backend (or a
/// single SQL statement); dropping a future mid-way either applied that
/// change or did not, and every change is safe to repeat.
#[async_trait]
pub trait JobStore: Send + Sync + std::fmt::Debug {
    /// Stores a new job (or finds the one with the same unique key).
    async fn enqueue(&self, job: NewJob) -> Result<Enqueued, QueueError>;

    /// Enqueues several jobs, answering for each in order as
    /// [`JobStore::enqueue`] would. Every job is checked first: one invalid
    /// job fails the call and enqueues nothing. The SQL store writes them
    /// in one transaction (all or none); the default, used by NATS, sends
    /// them 64 at a time and is not atomic: an error may leave some
    /// enqueued, so give jobs unique keys to make a retry of the batch safe.
    async fn enqueue_many(&self, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>, QueueError> {
        use futures_util::{StreamExt, TryStreamExt};
        for job in &jobs {
            job.validate()?;
        }
        futures_util::stream::iter(jobs.into_iter().map(|job| self.enqueue(job)))
            .buffered(64)
            .try_collect()
            .await
    }

    /// Claims up to `max` runnable jobs of `queue`, highest priority and
    /// earliest `run_at` first, each with a fresh lease until now + `lease`.
    /// Jobs whose lease has expired (their worker died) are claimed again;
    /// claiming counts an attempt.
    async fn claim(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
        worker_id: &str,
    ) -> Result<Vec<Job>, QueueError>;

    /// Extends a lease to now + `extend` and stores `progress` when given.
    /// False when the lease is no longer the job's (expired and reclaimed,
    /// or the job was cancelled): the worker must stop the attempt.
    async fn heartbeat(
        &self,
        lease: &Lease,
        extend: Duration,
        progress: Option<&Value>,
    ) -> Result<bool, QueueError>;

    /// Marks the attempt succeeded. False (and nothing changed) when the
    /// lease is stale.
    async fn complete(&self, lease: &Lease) -> Result<bool, QueueError>;

    /// Marks several attempts succeeded at once, answering for each lease
    /// in order as [`JobStore::complete`] would. Workers send the
    /// completions that piled up while the previous write was in flight,
    /// so a busy worker makes one write for many jobs.
    ///
    /// `Err` means nothing was applied (the one statement failed), so every
    /// lease may be completed again one by one; otherwise each lease has
    /// its own answer, and only the failed ones need another try. The
    /// default runs the completions concurrently; the SQL store makes one
    /// statement of them.
    async fn complete_many(
        &self,
        leases: &[Lease],
    ) -> Result<Vec<Result<bool, QueueError>>, QueueError> {
        Ok(futures_util::future::join_all(leases.iter().map(|l| self.complete(l))).await)
    }

    /// Records a failed attempt: back to `retrying` at `retry_at`, or
    /// `dead` when `retry_at` is `None`. False when the lease is stale.
    async fn fail(
        &self,
        lease: &Lease,
        error: &str,
        retry_at: Option<i64>,
    ) -> Result<bool, QueueError>;

    /// Hands an attempt back without counting it (shutdown, rate limit):
    /// the job becomes available again at `run_at`.
    async fn release(&self, lease: &Lease, run_at: i64) -> Result<bool, QueueError>;

    /// Cancels a job that has not finished. A running attempt notices at
    /// its next heartbeat. False when the job is unknown or finished.
    async fn cancel(&self, id: &str) -> Result<bool, QueueError>;

    async fn get(&self, id: &str) -> Result<Option<Job>, QueueError>;

    /// Jobs matching `filter`, newest first.
    async fn list(&self, filter: &JobFilter) -> Result<Vec<Job>, QueueError>;

    /// Puts a dead job back to `available` with its attempts reset.
    async fn retry_dead(&self, id: &str) -> Result<bool, QueueError>;

    /// Deletes a dead job.
    async fn discard_dead(&self, id: &str) -> Result<bool, QueueError>;

    /// Per-queue counts, depth and oldest age.
    async fn stats(&self) -> Result<Vec<QueueStats>, QueueError>;

    /// Depth, oldest age and (where cheap) dead count per queue, for the
    /// gauges a worker refreshes every `stats_interval`. The default takes
    /// them from [`JobStore::stats`] (one grouped query on SQL).
    async fn gauges(&self) -> Result<Vec<QueueGauges>, QueueError> {
        Ok(self
            .stats()
            .await?
            .into_iter()
            .map(|s| QueueGauges {
                queue: s.queue,
                depth: s.depth,
                oldest_age_ms: s.oldest_age_ms,
                dead: Some(s.dead),
            })
            .collect())
    }

    /// Deletes succeeded and cancelled jobs finished more than
    /// `finished_older_than` ago, and dead ones older than
    /// `dead_older_than`. Returns how many.
    async fn prune(
        &self,
        finished_older_than: Duration,
        dead_older_than: Duration,
    ) -> Result<u64, QueueError>;

    /// Notified when new work may be there (in-process enqueues, Postgres
    /// NOTIFY). Workers also poll, so a missed wake-up only costs latency.
    fn wakeups(&self) -> Arc<Notify>;

    /// How often an idle worker polls this backend.
    fn poll_interval(&self) -> Duration {
        Duration::from_millis(500)
    }

    /// True when claims take higher priorities first (NATS JetStream
    /// delivers in enqueue order and ignores priority).
    fn orders_by_priority(&self) -> bool {
        true
    }

    /// Engine name for logs and reports (`sqlite`, `postgres`, `nats`).
    fn backend_name(&self) -> &'static str;
}
