//! `POST /api/jobs`: enqueue a job over HTTP, for services in any
//! language (a service token with the scope `jobs:enqueue`, or
//! `clients.token`), with the semantics of the Rust API
//! (`NewJob`): queue, kind, payload, unique key, run-at, attempts,
//! timeout, priority. Jobs of a queue bound to an endpoint
//! (`[[worker.push]]`) come back to it by push delivery.

use crate::error::ApiResult;
use crate::extract::ApiJson;
use crate::AppContext;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use shoal_core::Problem;
use shoal_queue::{JobStore, NewJob};
use std::time::Duration;

/// `POST /api/jobs`'s body.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EnqueueRequest {
    /// 1-64 characters of a-z, A-Z, 0-9, `-`, `_`, `.`.
    pub queue: String,
    /// 1-128 characters; a bound queue sends it along, a Rust worker picks
    /// its handler by it.
    pub kind: String,
    /// Any JSON, at most 64 KiB written out.
    #[serde(default)]
    pub payload: serde_json::Value,
    /// At most one job per key, ever: a second enqueue with it answers the
    /// first job's id with `created: false` (1-512 characters).
    #[serde(default)]
    pub unique_key: Option<String>,
    /// When to run it, ms since the Unix epoch; absent: now.
    #[serde(default)]
    pub run_at: Option<i64>,
    /// Attempts before it is dead-lettered, 1-100 (default 5).
    #[serde(default)]
    pub max_attempts: Option<i64>,
    /// One attempt's deadline, ms, 100-3,600,000 (default 30,000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Higher runs first among ready jobs of the queue (default 0).
    #[serde(default)]
    pub priority: Option<i64>,
}

/// What `POST /api/jobs` answers.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct EnqueueAnswer {
    /// The job's id (`shoal jobs show <id>`).
    pub id: String,
    /// False when the unique key named a job enqueued before.
    pub created: bool,
}

/// The largest payload taken, written out.
const MAX_PAYLOAD: usize = 64 * 1024;

pub(crate) async fn enqueue(
    State(ctx): State<AppContext>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<EnqueueRequest>,
) -> ApiResult<Response> {
    let caller = crate::session::require_scope(&ctx, &headers, "jobs:enqueue")?;
    let mut problem = Problem::validation("the job is invalid; see `errors`");
    let size = serde_json::to_string(&req.payload).map_or(0, |t| t.len());
    if size > MAX_PAYLOAD {
        problem = problem.with_field(
            "payload",
            format!("is {size} bytes written out; the limit is {MAX_PAYLOAD}"),
        );
    }
    if req.max_attempts.is_some_and(|n| !(1..=100).contains(&n)) {
        problem = problem.with_field("max_attempts", "must be between 1 and 100");
    }
    if req
        .timeout_ms
        .is_some_and(|ms| !(100..=3_600_000).contains(&ms))
    {
        problem = problem.with_field("timeout_ms", "must be between 100 and 3600000");
    }
    if req.run_at.is_some_and(|t| t < 0) {
        problem = problem.with_field("run_at", "must be ms since the Unix epoch");
    }
    let mut job = NewJob::new(req.queue, req.kind, req.payload);
    job.unique_key = req.unique_key;
    job.run_at = req.run_at;
    job.priority = req.priority.unwrap_or(0);
    if let Some(n) = req.max_attempts {
        job.max_attempts = n;
    }
    if let Some(ms) = req.timeout_ms {
        job.timeout = Duration::from_millis(ms);
    }
    if let Err(e) = job.validate() {
        problem = problem.with_field("job", e.to_string());
    }
    if !problem.errors.is_empty() {
        return Err(problem.into());
    }
    let enqueued = ctx
        .jobs
        .enqueue(job)
        .await
        .map_err(|e| crate::ApiError::internal("enqueueing a job", &e))?;
    let status = if enqueued.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    metrics::counter!("shoal_jobs_enqueued_over_http_total", "caller" => caller).increment(1);
    Ok((
        status,
        Json(EnqueueAnswer {
            id: enqueued.id,
            created: enqueued.created,
        }),
    )
        .into_response())
}
