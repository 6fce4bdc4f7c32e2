//! The worker's console endpoints (`jobs_console.rs`) on a real SQLite
//! job store: dead jobs listed, retried and discarded, one and many; ids
//! that are not dead jobs refused and left alone; bad bodies and missing
//! tokens refused. (The browser test covers retry through the page.)

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use shoal_backends::Database;
use shoal_queue::{
    handler_fn, JobContext, JobError, JobState, JobStore, NewJob, SqlJobStore, Worker,
    WorkerOptions,
};
use shoal_testkit as kit;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower::ServiceExt;

const TOKEN: &str = "console-admin-token-0123456789";

async fn call(
    router: &axum::Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req
        .header("content-type", "application/json")
        .body(Body::from(body.map(|b| b.to_string()).unwrap_or_default()))
        .unwrap();
    let res = router.clone().oneshot(req).await.unwrap();
    let status = res.status();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

/// Three jobs that fail for good, run until they are dead.
async fn three_dead_jobs(store: Arc<dyn JobStore>) -> Vec<String> {
    let mut ids = Vec::new();
    for n in 0..3 {
        let job = NewJob::new("console", "boom", json!({"n": n})).max_attempts(1);
        ids.push(store.enqueue(job).await.unwrap().id);
    }
    let options = WorkerOptions {
        queues: vec![("console".into(), 2)],
        poll_interval: Some(Duration::from_millis(20)),
        ..WorkerOptions::default()
    };
    let worker = Worker::new(store.clone(), options).register(
        "boom",
        handler_fn(|_ctx: JobContext| async { Err(JobError::permanent("boom")) }),
    );
    let progress = worker.progress();
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while progress.report().dead < 3 {
        assert!(Instant::now() < deadline, "the jobs did not die");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    running.await.unwrap();
    ids
}

#[tokio::test]
async fn dead_jobs_are_retried_and_discarded_one_and_many() {
    let dir = kit::TempDir::new("jobs-console");
    let url = kit::sqlite_url(dir.path());
    let db = Database::connect(&url, 4, Duration::from_secs(5))
        .await
        .unwrap();
    let store: Arc<dyn JobStore> = Arc::new(SqlJobStore::open(db, &url).await.unwrap());
    let ids = three_dead_jobs(store.clone()).await;
    let router = shoal_runtime::jobs_console::router(store.clone(), &[], Some(TOKEN));

    // Only with the admin token.
    let (status, _) = call(&router, "GET", "/_shoal/jobs?state=dead", None, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = call(
        &router,
        "POST",
        "/_shoal/jobs/discard",
        Some("wrong"),
        Some(json!({"ids": [ids[0]]})),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        store.get(&ids[0]).await.unwrap().unwrap().state,
        JobState::Dead,
        "a refused call changes nothing"
    );

    let (status, listed) = call(&router, "GET", "/_shoal/jobs?state=dead", Some(TOKEN), None).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    assert_eq!(listed["jobs"].as_array().map(Vec::len), Some(3), "{listed}");

    // Bad bodies: refused, nothing changes.
    for bad in [json!({}), json!({"ids": []}), json!({"ids": "x"})] {
        let (status, p) = call(
            &router,
            "POST",
            "/_shoal/jobs/discard",
            Some(TOKEN),
            Some(bad.clone()),
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{bad}: {p}");
    }

    // Discard one.
    let (status, r) = call(
        &router,
        "POST",
        "/_shoal/jobs/discard",
        Some(TOKEN),
        Some(json!({"ids": [ids[0]]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(r["done"], json!([ids[0]]));
    assert!(
        store.get(&ids[0]).await.unwrap().is_none(),
        "a discarded job is gone"
    );

    // Many at once: the gone one and an unknown id are refused, the dead
    // one is discarded.
    let (status, r) = call(
        &router,
        "POST",
        "/_shoal/jobs/discard",
        Some(TOKEN),
        Some(json!({"ids": [ids[0], ids[1], "no-such-job"]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(r["done"], json!([ids[1]]), "{r}");
    let refused: Vec<&str> = r["refused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["id"].as_str().unwrap())
        .collect();
    assert_eq!(refused, [ids[0].as_str(), "no-such-job"], "{r}");
    assert!(store.get(&ids[1]).await.unwrap().is_none());

    // Retry the last: back to available with its attempts reset; a second
    // retry is refused (it is no longer dead).
    let (status, r) = call(
        &router,
        "POST",
        "/_shoal/jobs/retry",
        Some(TOKEN),
        Some(json!({"ids": [ids[2]]})),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(r["done"], json!([ids[2]]));
    let job = store.get(&ids[2]).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Available, "{job:?}");
    let (_, r) = call(
        &router,
        "POST",
        "/_shoal/jobs/retry",
        Some(TOKEN),
        Some(json!({"ids": [ids[2]]})),
    )
    .await;
    assert_eq!(r["done"], json!([]), "{r}");
    let (_, listed) = call(&router, "GET", "/_shoal/jobs?state=dead", Some(TOKEN), None).await;
    assert_eq!(listed["jobs"].as_array().map(Vec::len), Some(0), "{listed}");
}
