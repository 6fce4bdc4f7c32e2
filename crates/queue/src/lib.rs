//! Durable background jobs: the job model, the `JobStore` trait with an SQL
//! backend (SQLite, PostgreSQL) over the main `Database` and a NATS
//! JetStream backend, leases with heartbeats, retries with backoff, dead
//! letters, cron schedules, the outbox relay, the worker runtime, a
//! conformance suite and a benchmark.
//!
//! Delivery is at least once: a handler may run again after a crash or a
//! lost lease, so handlers make their effects idempotent (see
//! `JobContext::idempotency_key`) or commit them with
//! `SqlJobStore::complete_in_transaction`. See `docs/queue.md`.

pub mod bench;
pub mod conformance;
pub mod cron;
pub mod job;
pub mod nats;
pub mod relay;
pub mod sql;
pub mod store;
pub mod worker;

pub use bench::{bench, bench_via, BenchReport};
pub use cron::Schedule;
pub use job::{
    AttemptError, Enqueued, Job, JobError, JobFilter, JobState, Lease, NewJob, QueueError,
    QueueGauges, QueueStats,
};
pub use nats::{NatsJobStore, NatsJobStoreOptions};
pub use relay::OutboxRelay;
pub use sql::{PreparedJob, SqlJobStore};
pub use store::JobStore;
pub use worker::{
    handler_fn, Backoff, JobContext, JobHandler, KindOptions, RateLimit, Retention, Worker,
    WorkerLive, WorkerOptions, WorkerProgress, WorkerReport,
};
