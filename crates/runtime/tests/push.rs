//! Push delivery: a queue bound to an HTTP endpoint. Each job is POSTed,
//! signed, with the job's id as `webhook-id` on every attempt; 2xx
//! completes it, a 4xx with `x-shoal-job: dead` dead-letters it, anything
//! else is retried.

use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use shoal_backends::Database;
use shoal_queue::conformance::{test_worker_options, wait_until};
use shoal_queue::{Backoff, JobState, JobStore, KindOptions, NewJob, SqlJobStore, Worker};
use shoal_runtime::push::{standard_webhooks_signature, PushHandler};
use shoal_testkit as kit;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "push-secret-0123456789";

/// An endpoint answering each request with the next of `plan`'s
/// (status, dead?) and keeping what it got.
#[derive(Clone, Default)]
struct Endpoint {
    plan: Arc<Vec<(u16, bool)>>,
    got: Arc<Mutex<Vec<(HeaderMap, String)>>>,
}

async fn endpoint(plan: Vec<(u16, bool)>) -> (String, Endpoint) {
    let e = Endpoint {
        plan: Arc::new(plan),
        ..Default::default()
    };
    let state = e.clone();
    let router = axum::Router::new()
        .route(
            "/jobs",
            axum::routing::post(
                |axum::extract::State(s): axum::extract::State<Endpoint>,
                 headers: HeaderMap,
                 body: String| async move {
                    let mut got = s.got.lock().unwrap();
                    let (status, dead) = *s.plan.get(got.len()).or(s.plan.last()).unwrap();
                    got.push((headers, body));
                    let mut answer = HeaderMap::new();
                    if dead {
                        answer.insert("x-shoal-job", "dead".parse().unwrap());
                    }
                    (StatusCode::from_u16(status).unwrap(), answer, "told you")
                },
            ),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/jobs", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, e)
}

async fn store(dir: &kit::TempDir) -> Arc<SqlJobStore> {
    let db = Database::connect(&kit::sqlite_url(dir.path()), 4, Duration::from_secs(5))
        .await
        .unwrap();
    Arc::new(SqlJobStore::new(db).await.unwrap())
}

/// Runs a worker pushing `queue` to `url` until the job `id` is `state`.
async fn push_until(store: Arc<SqlJobStore>, queue: &str, url: &str, id: &str, state: JobState) {
    let backoff = Backoff {
        base: Duration::from_millis(100),
        max: Duration::from_millis(200),
        jitter: 0.0,
    };
    let worker = Worker::new(store.clone(), test_worker_options(queue, 4)).register_queue(
        queue,
        PushHandler::new(url, SECRET).unwrap(),
        KindOptions {
            backoff,
            rate_limit: None,
        },
    );
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));
    wait_until(
        &format!("job {id} {state:?}"),
        Duration::from_secs(20),
        || {
            let store = store.clone();
            async move {
                store
                    .get(id)
                    .await
                    .unwrap()
                    .is_some_and(|j| j.state == state)
            }
        },
    )
    .await;
    stop.cancel();
    running.await.unwrap();
}

#[tokio::test]
async fn a_failed_push_is_retried_and_the_endpoint_can_tell_the_repeat() {
    let dir = kit::TempDir::new("push");
    let store = store(&dir).await;
    let (url, ep) = endpoint(vec![(500, false), (204, false)]).await;
    // Any kind: the queue is bound, not the kind.
    let job = store
        .enqueue(NewJob::new("greetings", "greeting.send", json!({"to": "ada"})).max_attempts(5))
        .await
        .unwrap();
    push_until(
        store.clone(),
        "greetings",
        &url,
        &job.id,
        JobState::Succeeded,
    )
    .await;
    let got = ep.got.lock().unwrap().clone();
    assert_eq!(got.len(), 2, "one failed attempt, one that completed");
    for (i, (headers, body)) in got.iter().enumerate() {
        let text = |name: &str| headers[name].to_str().unwrap().to_string();
        assert_eq!(text("webhook-id"), job.id, "the job's id on every attempt");
        let ts: i64 = text("webhook-timestamp").parse().unwrap();
        assert_eq!(
            text("webhook-signature"),
            standard_webhooks_signature(SECRET.as_bytes(), &job.id, ts, body.as_bytes())
        );
        assert!(text("x-shoal-deadline-ms").parse::<u64>().unwrap() > 0);
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["kind"], "greeting.send");
        assert_eq!(v["payload"]["to"], "ada");
        assert_eq!(v["attempt"], i as i64 + 1);
    }
    let done = store.get(&job.id).await.unwrap().unwrap();
    assert_eq!(done.attempts, 2);
    assert!(done.errors[0].error.contains("500"), "{:?}", done.errors);
}

#[tokio::test]
async fn a_4xx_that_says_dead_dead_letters_and_one_that_does_not_retries() {
    let dir = kit::TempDir::new("push");
    let store = store(&dir).await;
    let (url, ep) = endpoint(vec![(422, true)]).await;
    let job = store
        .enqueue(NewJob::new("hooks", "any", json!({})).max_attempts(5))
        .await
        .unwrap();
    push_until(store.clone(), "hooks", &url, &job.id, JobState::Dead).await;
    assert_eq!(ep.got.lock().unwrap().len(), 1, "dead at once, not retried");
    let dead = store.get(&job.id).await.unwrap().unwrap();
    assert!(
        dead.last_error.as_deref().unwrap_or("").contains("422"),
        "{:?}",
        dead.last_error
    );

    // A 4xx without the header is an ordinary failure: retried.
    let (url, ep) = endpoint(vec![(409, false), (200, false)]).await;
    let job = store
        .enqueue(NewJob::new("hooks2", "any", json!({})).max_attempts(5))
        .await
        .unwrap();
    push_until(store.clone(), "hooks2", &url, &job.id, JobState::Succeeded).await;
    assert_eq!(ep.got.lock().unwrap().len(), 2);
}

/// Jobs over HTTP end to end: a service without Rust enqueues on an
/// instance (`POST /api/jobs` with its service token, scoped
/// `jobs:enqueue`; a token without that scope is refused), a bound queue
/// pushes the
/// job back to it; a unique key makes a retried enqueue one job; bad input
/// or no token enqueues nothing.
#[tokio::test]
async fn a_job_enqueued_over_http_comes_back_by_push() {
    let dir = kit::TempDir::new("push-http");
    let mut s = shoal_core::Settings {
        data_dir: dir.path().to_path_buf(),
        ..shoal_core::Settings::default()
    };
    s.serve.listen = "127.0.0.1:0".parse().unwrap();
    let internal = s.clients.token.clone();
    // The service's own token, scoped to enqueueing; another scoped to
    // events only. Settings keep only their hashes.
    let (token, hash) = shoal_runtime::session::new_service_token();
    let (events_only, events_hash) = shoal_runtime::session::new_service_token();
    s.clients.service_tokens = vec![
        shoal_core::settings::ServiceTokenSettings {
            name: "greetings".into(),
            sha256: hash,
            scopes: vec!["jobs:enqueue".into()],
        },
        shoal_core::settings::ServiceTokenSettings {
            name: "notifier".into(),
            sha256: events_hash,
            scopes: vec!["events:publish".into()],
        },
    ];
    s.validate().unwrap();
    let app = shoal_runtime::Application::build(s, Vec::new())
        .await
        .unwrap();
    let base = format!("http://{}", app.local_addr());
    let jobs = app.context().jobs.clone();
    let stop = CancellationToken::new();
    tokio::spawn(app.run(stop.clone()));
    let http = reqwest::Client::new();
    let url = format!("{base}/api/jobs");
    let job = json!({"queue": "greetings", "kind": "greeting.send", "payload": {"to": "ada"},
        "unique_key": "greet:ada", "max_attempts": 3, "timeout_ms": 5000});

    let anonymous = http.post(&url).json(&job).send().await.unwrap();
    assert_eq!(anonymous.status(), 403);
    let wrong_scope = http
        .post(&url)
        .bearer_auth(&events_only)
        .json(&job)
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_scope.status(), 403);
    let p: Value = wrong_scope.json().await.unwrap();
    assert!(
        p["detail"].as_str().unwrap().contains("jobs:enqueue"),
        "{p}"
    );
    let bad = http
        .post(&url)
        .bearer_auth(&token)
        .json(&json!({"queue": "bad queue", "kind": "k", "max_attempts": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
    let problem: Value = bad.json().await.unwrap();
    let fields: Vec<&str> = problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["max_attempts", "job"], "{problem}");

    let first = http
        .post(&url)
        .bearer_auth(&token)
        .json(&job)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    // Shoal's own services' token opens it too.
    let again = http
        .post(&url)
        .bearer_auth(&internal)
        .json(&job)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200, "the same unique key: the same job");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["created"], false);
    let id = first["id"].as_str().unwrap().to_string();
    let stored = jobs.get(&id).await.unwrap().unwrap();
    assert_eq!((stored.max_attempts, stored.timeout_ms), (3, 5000));
    let listed = jobs
        .list(&shoal_queue::JobFilter {
            queue: Some("greetings".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 1, "the refused ones enqueued nothing");

    let (endpoint_url, ep) = endpoint(vec![(200, false)]).await;
    push_until(jobs, "greetings", &endpoint_url, &id, JobState::Succeeded).await;
    let got = ep.got.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0["webhook-id"], id.as_str());
    stop.cancel();
}
