//! Runs the queue benchmark small on SQLite and PostgreSQL: it must finish,
//! report sane numbers, and show that idle workers wake on enqueue (NOTIFY
//! or the in-process wake-up) rather than waiting for the next poll.

use shoal_backends::Database;
use shoal_queue::{bench, JobStore, NatsJobStore, NatsJobStoreOptions, SqlJobStore};
use shoal_testkit as kit;
use std::sync::Arc;
use std::time::Duration;

async fn check(url: &str) {
    let db = Database::connect(url, 8, Duration::from_secs(10))
        .await
        .unwrap();
    let store = SqlJobStore::open(db.clone(), url).await.unwrap();
    check_store(Arc::new(store)).await;
}

async fn check_store(store: Arc<dyn JobStore>) {
    let poll = store.poll_interval();
    let report = bench(store, 300, 4).await;
    println!("{report}");
    assert!(report.enqueue_per_sec > 0.0 && report.complete_per_sec > 0.0);
    assert_eq!(report.latency_samples, 30, "every latency job ran");
    assert!(
        report.p50_enqueue_to_start_ms < poll.as_millis() as f64 / 2.0,
        "idle workers wake on enqueue, not on the {poll:?} poll: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_bench_runs() {
    let dir = kit::TempDir::new("queue-bench");
    check(&kit::sqlite_url(dir.path())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_bench_runs() {
    let Some(server) = kit::postgres_url("postgres_bench_runs") else {
        return;
    };
    check(&kit::fresh_postgres_database(&server).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_bench_runs() {
    let Some(url) = kit::nats_url("nats_bench_runs") else {
        return;
    };
    let options = NatsJobStoreOptions {
        prefix: kit::unique_name(),
        ..NatsJobStoreOptions::default()
    };
    let store = NatsJobStore::connect(&url, options).await.unwrap();
    check_store(Arc::new(store.clone())).await;
    store.delete_everything().await.unwrap();
}
