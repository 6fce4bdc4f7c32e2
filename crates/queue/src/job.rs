//! The job model: what a job is, its states, how callers describe a new one,
//! and the errors of stores and handlers.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;
use std::time::Duration;

/// Where a job is in its life.
///
/// ```text
/// scheduled --(run_at passes)--> available --claim--> running --ok--> succeeded
///                                   ^                   |  \--permanent error / attempts used up--> dead
///                                   |                   \--retryable error--> retrying --(run_at)--+
///                                   +-------------------------------------------------------------+
/// any unfinished state --cancel--> cancelled;  dead --retry--> available
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for its `run_at` in the future.
    Scheduled,
    /// Ready to be claimed.
    Available,
    /// Claimed by a worker holding a lease.
    Running,
    /// Failed with a retryable error; runs again at `run_at`.
    Retrying,
    Succeeded,
    /// Failed permanently or used up its attempts: a dead letter.
    Dead,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Scheduled,
        JobState::Available,
        JobState::Running,
        JobState::Retrying,
        JobState::Succeeded,
        JobState::Dead,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Scheduled => "scheduled",
            JobState::Available => "available",
            JobState::Running => "running",
            JobState::Retrying => "retrying",
            JobState::Succeeded => "succeeded",
            JobState::Dead => "dead",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// Succeeded, dead or cancelled: nothing more happens unless an operator
    /// retries a dead job.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Dead | JobState::Cancelled
        )
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One failed attempt, kept in a job's error history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptError {
    pub attempt: i64,
    /// When it failed, ms since the Unix epoch.
    pub at: i64,
    pub error: String,
}

/// A stored job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub queue: String,
    pub kind: String,
    pub payload: Value,
    /// Higher runs first.
    pub priority: i64,
    pub state: JobState,
    /// Not claimed before this time (ms since the Unix epoch).
    pub run_at: i64,
    /// Attempts started so far (the running one included).
    pub attempts: i64,
    pub max_attempts: i64,
    pub unique_key: Option<String>,
    /// A handler running longer than this is stopped and the attempt fails.
    pub timeout_ms: i64,
    /// Request id of whoever enqueued the job, for logs across the hop.
    pub trace_id: Option<String>,
    /// W3C `traceparent` of the span that enqueued the job, while traces
    /// are on: the job's run is a child of it.
    #[serde(default)]
    pub traceparent: Option<String>,
    pub progress: Option<Value>,
    pub last_error: Option<String>,
    pub errors: Vec<AttemptError>,
    /// Set while running: proves ownership of the current attempt.
    pub lease_token: Option<String>,
    pub lease_until: Option<i64>,
    pub worker_id: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

impl Job {
    /// The payload as `T`.
    pub fn payload_as<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_value(self.payload.clone())
    }

    /// The lease of the current attempt, when the job is running.
    pub fn lease(&self) -> Option<Lease> {
        Some(Lease {
            job_id: self.id.clone(),
            token: self.lease_token.clone()?,
            attempt: self.attempts,
        })
    }
}

/// Proof that a worker owns one attempt of one job. Every state change a
/// worker makes names its lease; a stale lease changes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job_id: String,
    pub token: String,
    pub attempt: i64,
}

/// Default attempts before a job is dead-lettered.
pub const DEFAULT_MAX_ATTEMPTS: i64 = 20;
/// Default per-attempt time limit.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// A job to enqueue. Build with [`NewJob::new`] or [`NewJob::typed`].
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub queue: String,
    pub kind: String,
    pub payload: Value,
    pub priority: i64,
    /// ms since the Unix epoch; `None` means now.
    pub run_at: Option<i64>,
    pub max_attempts: i64,
    pub unique_key: Option<String>,
    pub timeout: Duration,
    pub trace_id: Option<String>,
    /// Set by the store when traces are on (`shoal_core::spans`).
    pub traceparent: Option<String>,
}

impl NewJob {
    pub fn new(queue: impl Into<String>, kind: impl Into<String>, payload: Value) -> Self {
        NewJob {
            queue: queue.into(),
            kind: kind.into(),
            payload,
            priority: 0,
            run_at: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            unique_key: None,
            timeout: DEFAULT_TIMEOUT,
            trace_id: None,
            traceparent: None,
        }
    }

    /// A job whose payload is `payload` serialised with serde.
    pub fn typed<T: Serialize>(
        queue: impl Into<String>,
        kind: impl Into<String>,
        payload: &T,
    ) -> Result<Self, serde_json::Error> {
        Ok(NewJob::new(queue, kind, serde_json::to_value(payload)?))
    }

    pub fn priority(mut self, priority: i64) -> Self {
        self.priority = priority;
        self
    }
    /// Not before `at` (ms since the Unix epoch).
    pub fn run_at(mut self, at: i64) -> Self {
        self.run_at = Some(at);
        self
    }
    /// Not before now + `delay`.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.run_at = Some(shoal_backends::now_millis() + delay.as_millis() as i64);
        self
    }
    pub fn max_attempts(mut self, n: i64) -> Self {
        self.max_attempts = n;
        self
    }
    /// At most one job ever exists with this key (until pruned): enqueueing
    /// a duplicate returns the existing job's id.
    pub fn unique_key(mut self, key: impl Into<String>) -> Self {
        self.unique_key = Some(key.into());
        self
    }
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
    pub fn trace_id(mut self, id: impl Into<String>) -> Self {
        self.trace_id = Some(id.into());
        self
    }

    /// Checks what a store would reject, before any I/O.
    pub fn validate(&self) -> Result<(), QueueError> {
        if !valid_name(&self.queue) {
            return Err(QueueError::InvalidJob(format!(
                "queue name `{}` must be 1-64 characters of a-z, A-Z, 0-9, `-`, `_`, `.`",
                self.queue
            )));
        }
        if self.kind.is_empty() || self.kind.len() > 128 {
            return Err(QueueError::InvalidJob(
                "job kind must be 1-128 characters".into(),
            ));
        }
        if self.max_attempts < 1 {
            return Err(QueueError::InvalidJob(
                "max_attempts must be at least 1".into(),
            ));
        }
        if self.timeout.is_zero() {
            return Err(QueueError::InvalidJob("timeout must be positive".into()));
        }
        if let Some(key) = &self.unique_key {
            if key.is_empty() || key.len() > 512 {
                return Err(QueueError::InvalidJob(
                    "unique key must be 1-512 characters".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Queue names travel in NOTIFY payloads and NATS subjects: keep them plain.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The result of an enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueued {
    pub id: String,
    /// False when a job with the same unique key already existed and `id`
    /// is that job's.
    pub created: bool,
}

/// Counts and depth of one queue.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    pub queue: String,
    /// Jobs that could be claimed right now.
    pub depth: i64,
    /// How long the oldest claimable job has waited, ms (0 when none).
    pub oldest_age_ms: i64,
    pub scheduled: i64,
    pub available: i64,
    pub running: i64,
    pub retrying: i64,
    pub succeeded: i64,
    pub dead: i64,
    pub cancelled: i64,
}

/// What a worker exports as per-queue gauges every `stats_interval`: the
/// cheap subset of [`QueueStats`] (on NATS, read from the consumer instead
/// of every job record).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct QueueGauges {
    pub queue: String,
    pub depth: i64,
    pub oldest_age_ms: i64,
    /// Dead jobs, where the backend can count them cheaply.
    pub dead: Option<i64>,
}

impl QueueStats {
    pub(crate) fn add(&mut self, state: JobState, n: i64) {
        match state {
            JobState::Scheduled => self.scheduled += n,
            JobState::Available => self.available += n,
            JobState::Running => self.running += n,
            JobState::Retrying => self.retrying += n,
            JobState::Succeeded => self.succeeded += n,
            JobState::Dead => self.dead += n,
            JobState::Cancelled => self.cancelled += n,
        }
    }
}

/// What to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    pub queue: Option<String>,
    pub state: Option<JobState>,
    pub kind: Option<String>,
    /// At most this many (default 100, at most 1,000).
    pub limit: Option<usize>,
}

/// Errors of job stores.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("invalid job: {0}")]
    InvalidJob(String),
    #[error("job store (SQL): {0}")]
    Sql(#[from] sqlx::Error),
    #[error(transparent)]
    Db(#[from] shoal_backends::DbError),
    #[error("job payload is not valid JSON: {0}")]
    Payload(#[from] serde_json::Error),
    #[error("job store (NATS): {0}")]
    Nats(String),
    #[error("job store: {0}")]
    Corrupt(String),
    /// The one statement that carried this and other requests failed; the
    /// same cause is shared by each of them.
    #[error("batched write failed: {0}")]
    Batch(#[source] std::sync::Arc<QueueError>),
}

/// How a handler says an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// Worth trying again later (after backoff), until attempts run out.
    #[error("{0}")]
    Retryable(String),
    /// Will never succeed: the job is dead-lettered now.
    #[error("permanent: {0}")]
    Permanent(String),
}

impl JobError {
    /// A retryable error carrying `e`'s message and cause chain.
    pub fn retryable(e: impl std::fmt::Display) -> Self {
        JobError::Retryable(e.to_string())
    }
    /// A permanent error carrying `e`'s message.
    pub fn permanent(e: impl std::fmt::Display) -> Self {
        JobError::Permanent(e.to_string())
    }
}

impl From<serde_json::Error> for JobError {
    /// A payload that does not decode never will: permanent.
    fn from(e: serde_json::Error) -> Self {
        JobError::Permanent(format!("payload: {e}"))
    }
}

/// While traces are on: the span of enqueueing `job` (a child of the
/// current span), whose context the job keeps as its `traceparent`.
/// The caller ends it once the job is stored.
pub(crate) fn enqueue_span(job: &mut NewJob) -> Option<shoal_core::spans::Span> {
    if job.traceparent.is_some() {
        return None;
    }
    let mut span = shoal_core::spans::start(
        format!("enqueue {} {}", job.queue, job.kind),
        shoal_core::spans::Kind::Producer,
        None,
    )?;
    span.attr("messaging.destination.name", job.queue.as_str());
    span.attr("shoal.job.kind", job.kind.as_str());
    job.traceparent = Some(span.ctx.traceparent());
    Some(span)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_strings() {
        for s in JobState::ALL {
            assert_eq!(JobState::parse(s.as_str()), Some(s));
        }
        assert_eq!(JobState::parse("nope"), None);
    }

    #[test]
    fn bad_jobs_are_rejected_before_io() {
        assert!(NewJob::new("q", "k", Value::Null).validate().is_ok());
        assert!(NewJob::new("bad queue", "k", Value::Null)
            .validate()
            .is_err());
        assert!(NewJob::new("q", "", Value::Null).validate().is_err());
        assert!(NewJob::new("q", "k", Value::Null)
            .max_attempts(0)
            .validate()
            .is_err());
    }
}
