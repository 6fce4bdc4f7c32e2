//! A worker's endpoints for the gateway's console (`/_shoal/` on the
//! worker's listener, behind `gateway.admin_token`): the queues with their
//! counts, start latencies and cron schedules; jobs searched by state,
//! kind and queue; one job; retry or discard of dead jobs, one or many.
//! The worker owns the queue, so the console asks it rather than opening
//! the job store itself.

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use shoal_core::Problem;
use shoal_queue::{Job, JobFilter, JobState, JobStore, Schedule};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The latest succeeded jobs looked at for the start latencies.
const LATENCY_SAMPLE: usize = 1_000;
/// Most ids one retry or discard takes.
const MAX_IDS: usize = 1_000;

#[derive(Clone)]
struct Ops {
    store: Arc<dyn JobStore>,
    schedules: Arc<Vec<ScheduleView>>,
    token: Option<Arc<str>>,
    /// Start latencies by queue, and when they were taken: reading the
    /// latest succeeded jobs is a scan on some stores (all of NATS's), so
    /// it is done at most every [`LATENCY_EVERY`].
    latency: Arc<Mutex<Option<(Instant, Latencies)>>>,
}

/// p50 and p99 enqueue-to-start, ms, by queue.
type Latencies = HashMap<String, (Option<i64>, Option<i64>)>;

/// How long start latencies are reused.
const LATENCY_EVERY: Duration = Duration::from_secs(15);

#[derive(Clone)]
struct ScheduleView {
    name: String,
    expression: String,
    queue: String,
    kind: String,
    schedule: Arc<Schedule>,
}

/// The router; `schedules` are the worker's (`Worker::schedules`).
pub fn router(
    store: Arc<dyn JobStore>,
    schedules: &[Schedule],
    admin_token: Option<&str>,
) -> Router {
    let ops = Ops {
        store,
        schedules: Arc::new(
            schedules
                .iter()
                .map(|s| ScheduleView {
                    name: s.name.clone(),
                    expression: s.expression.clone(),
                    queue: s.job.queue.clone(),
                    kind: s.job.kind.clone(),
                    schedule: Arc::new(s.clone()),
                })
                .collect(),
        ),
        token: admin_token.map(Arc::from),
        latency: Arc::default(),
    };
    Router::new()
        .route("/_shoal/queues", get(queues))
        .route("/_shoal/jobs", get(list))
        .route("/_shoal/jobs/retry", post(retry))
        .route("/_shoal/jobs/discard", post(discard))
        .route("/_shoal/jobs/{id}", get(show))
        .with_state(ops)
}

fn problem(p: Problem) -> Response {
    crate::error::problem_response(&p)
}

fn authorize(ops: &Ops, headers: &HeaderMap) -> Result<(), Response> {
    check_admin(ops.token.as_deref(), headers)
}

/// `Ok` for a request with `Authorization: Bearer <token>`; the answer
/// otherwise (403 while no token is set).
pub fn check_admin(token: Option<&str>, headers: &HeaderMap) -> Result<(), Response> {
    let Some(token) = token else {
        return Err(problem(Problem::forbidden(
            "the console endpoints are off until gateway.admin_token is set",
        )));
    };
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if shoal_core::bearer::matches(header, &[token]) {
        Ok(())
    } else {
        Err(problem(Problem::unauthorized(
            "send `Authorization: Bearer <gateway.admin_token>`",
        )))
    }
}

fn store_error(e: impl std::fmt::Display) -> Response {
    problem(Problem::unavailable(
        format!("the job store failed: {e}"),
        1,
    ))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The `q` quantile of sorted values.
fn quantile(sorted: &[i64], q: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((sorted.len() as f64) * q).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Enqueue (or due) to start, by queue, over the latest succeeded jobs;
/// reused for [`LATENCY_EVERY`].
async fn start_latencies(ops: &Ops) -> Latencies {
    if let Some((at, cached)) = ops.latency.lock().expect("latency lock").as_ref() {
        if at.elapsed() < LATENCY_EVERY {
            return cached.clone();
        }
    }
    let recent = ops
        .store
        .list(&JobFilter {
            queue: None,
            state: Some(JobState::Succeeded),
            kind: None,
            limit: Some(LATENCY_SAMPLE),
        })
        .await
        .unwrap_or_default();
    let mut waits: HashMap<String, Vec<i64>> = HashMap::new();
    for j in &recent {
        if let Some(started) = j.started_at {
            waits
                .entry(j.queue.clone())
                .or_default()
                .push((started - j.run_at.max(j.created_at)).max(0));
        }
    }
    let latencies: Latencies = waits
        .into_iter()
        .map(|(queue, mut w)| {
            w.sort_unstable();
            (queue, (quantile(&w, 0.50), quantile(&w, 0.99)))
        })
        .collect();
    *ops.latency.lock().expect("latency lock") = Some((Instant::now(), latencies.clone()));
    latencies
}

async fn queues(State(ops): State<Ops>, headers: HeaderMap) -> Response {
    if let Err(denied) = authorize(&ops, &headers) {
        return denied;
    }
    let stats = match ops.store.stats().await {
        Ok(s) => s,
        Err(e) => return store_error(e),
    };
    let latencies = start_latencies(&ops).await;
    let mut queues = Vec::new();
    for s in stats {
        let (p50, p99) = latencies.get(&s.queue).copied().unwrap_or_default();
        let mut v = serde_json::to_value(&s).unwrap_or_default();
        v["start_latency_p50_ms"] = json!(p50);
        v["start_latency_p99_ms"] = json!(p99);
        queues.push(v);
    }
    let now = now_ms();
    let cron: Vec<Value> = ops
        .schedules
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "expression": s.expression,
                "queue": s.queue,
                "kind": s.kind,
                "next_run_at": s.schedule.next_tick_after(now),
            })
        })
        .collect();
    Json(json!({
        "backend": ops.store.backend_name(),
        "queues": queues,
        "cron": cron,
    }))
    .into_response()
}

#[derive(Deserialize)]
struct ListQuery {
    state: Option<String>,
    kind: Option<String>,
    queue: Option<String>,
    limit: Option<usize>,
}

async fn list(State(ops): State<Ops>, headers: HeaderMap, Query(q): Query<ListQuery>) -> Response {
    if let Err(denied) = authorize(&ops, &headers) {
        return denied;
    }
    let nonempty = |s: Option<String>| s.filter(|s| !s.trim().is_empty());
    let state = match nonempty(q.state) {
        None => None,
        Some(s) => match JobState::parse(&s) {
            Some(st) => Some(st),
            None => {
                let names: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
                return problem(
                    Problem::validation(format!(
                        "no job state `{s}`; use one of {}",
                        names.join(", ")
                    ))
                    .with_field("state", "unknown state"),
                );
            }
        },
    };
    let filter = JobFilter {
        queue: nonempty(q.queue),
        state,
        kind: nonempty(q.kind),
        limit: Some(q.limit.unwrap_or(100).clamp(1, 1_000)),
    };
    match ops.store.list(&filter).await {
        Ok(jobs) => {
            Json(json!({ "jobs": jobs.iter().map(view).collect::<Vec<_>>() })).into_response()
        }
        Err(e) => store_error(e),
    }
}

/// A job as the console shows it: without its lease token (which proves
/// ownership of the running attempt and is nobody else's business).
fn view(job: &Job) -> Value {
    let mut v = serde_json::to_value(job).unwrap_or_default();
    if let Value::Object(map) = &mut v {
        map.remove("lease_token");
    }
    v
}

async fn show(State(ops): State<Ops>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if let Err(denied) = authorize(&ops, &headers) {
        return denied;
    }
    match ops.store.get(&id).await {
        Ok(Some(job)) => Json(view(&job)).into_response(),
        Ok(None) => problem(Problem::not_found(format!("no job `{id}`"))),
        Err(e) => store_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Ids {
    ids: Vec<String>,
}

async fn retry(State(ops): State<Ops>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    each_dead(ops, headers, body, true).await
}

async fn discard(State(ops): State<Ops>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    each_dead(ops, headers, body, false).await
}

/// Retries (or discards) each dead job named; the others are refused
/// with the reason, and change nothing.
async fn each_dead(ops: Ops, headers: HeaderMap, body: axum::body::Bytes, retry: bool) -> Response {
    if let Err(denied) = authorize(&ops, &headers) {
        return denied;
    }
    let ids: Ids = match serde_json::from_slice(&body) {
        Ok(ids) => ids,
        Err(e) => {
            return problem(
                Problem::validation(format!("the body must be {{\"ids\": [\"...\"]}}: {e}"))
                    .with_field("ids", "a list of job ids"),
            )
        }
    };
    if ids.ids.is_empty() || ids.ids.len() > MAX_IDS {
        return problem(
            Problem::validation(format!("name 1 to {MAX_IDS} jobs"))
                .with_field("ids", format!("1 to {MAX_IDS} ids")),
        );
    }
    let mut done = Vec::new();
    let mut refused = Vec::new();
    for id in ids.ids {
        let result = if retry {
            ops.store.retry_dead(&id).await
        } else {
            ops.store.discard_dead(&id).await
        };
        match result {
            Ok(true) => {
                tracing::info!(job = %id, action = if retry { "retry" } else { "discard" }, "dead job handled from the console");
                done.push(id);
            }
            Ok(false) => refused.push(json!({"id": id, "reason": "not a dead job"})),
            Err(e) => refused.push(json!({"id": id, "reason": e.to_string()})),
        }
    }
    Json(json!({ "done": done, "refused": refused })).into_response()
}
