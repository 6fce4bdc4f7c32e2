//! Runs the broadcast conformance suite against every backend: SQLite (one
//! file shared by several handles, as by several processes), PostgreSQL
//! (`SHOAL_TEST_POSTGRES_URL`) and Redis (`SHOAL_TEST_REDIS_URL`); and checks
//! that the SQL log is pruned.

use shoal_backends::{
    conformance, Broadcast, Database, RedisBroadcast, SqlBroadcast, SqlBroadcastOptions,
};
use shoal_testkit as kit;
use std::sync::Arc;
use std::time::Duration;

/// Three handles, each on its own pool, like three instances.
async fn sql_handles(url: &str, options: SqlBroadcastOptions) -> Vec<Arc<dyn Broadcast>> {
    let mut handles: Vec<Arc<dyn Broadcast>> = Vec::new();
    for _ in 0..3 {
        let db = Database::connect(url, 4, Duration::from_secs(5))
            .await
            .unwrap();
        handles.push(Arc::new(SqlBroadcast::new(db, options).await.unwrap()));
    }
    handles
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_broadcast_conforms() {
    let dir = kit::TempDir::new("bus");
    let url = kit::sqlite_url(dir.path());
    conformance::broadcast(&sql_handles(&url, SqlBroadcastOptions::default()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_broadcast_conforms() {
    let Some(server) = kit::postgres_url("postgres_broadcast_conforms") else {
        return;
    };
    let url = kit::fresh_postgres_database(&server).await;
    conformance::broadcast(&sql_handles(&url, SqlBroadcastOptions::default()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_broadcast_conforms() {
    let Some(url) = kit::redis_url("redis_broadcast_conforms") else {
        return;
    };
    let prefix = kit::unique_name();
    let mut handles: Vec<Arc<dyn Broadcast>> = Vec::new();
    for _ in 0..3 {
        handles.push(Arc::new(
            RedisBroadcast::connect(&url, &prefix).await.unwrap(),
        ));
    }
    conformance::broadcast(&handles).await;
}

async fn sql_rows(db: &Database) -> i64 {
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM shoal_broadcast")
        .fetch_one(db.pool())
        .await
        .unwrap();
    n
}

async fn pruning(url: &str) {
    let db = Database::connect(url, 4, Duration::from_secs(5))
        .await
        .unwrap();
    let options = SqlBroadcastOptions {
        poll_interval: Duration::from_millis(20),
        retention: Duration::from_millis(300),
    };
    let bus = SqlBroadcast::new(db.clone(), options).await.unwrap();
    let mut sub = bus.subscribe("prune").await.unwrap();
    for i in 0..10u8 {
        bus.publish("prune", &[i]).await.unwrap();
    }
    for i in 0..10u8 {
        assert_eq!(&sub.recv().await.unwrap()[..], &[i]);
    }
    assert_eq!(sql_rows(&db).await, 10);
    tokio::time::sleep(Duration::from_millis(400)).await;
    bus.publish("prune", b"fresh").await.unwrap();
    let pruned = bus.prune().await.unwrap();
    assert_eq!(pruned, 10, "rows older than the retention are pruned");
    assert_eq!(sql_rows(&db).await, 1, "fresh rows are kept");
    assert_eq!(&sub.recv().await.unwrap()[..], b"fresh");
}

#[tokio::test]
async fn sqlite_broadcast_prunes_old_rows() {
    let dir = kit::TempDir::new("bus-prune");
    pruning(&kit::sqlite_url(dir.path())).await;
}

#[tokio::test]
async fn postgres_broadcast_prunes_old_rows() {
    let Some(server) = kit::postgres_url("postgres_broadcast_prunes_old_rows") else {
        return;
    };
    pruning(&kit::fresh_postgres_database(&server).await).await;
}
