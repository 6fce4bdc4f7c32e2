//! Runs the session-store conformance suite against every backend: SQLite,
//! PostgreSQL (`SHOAL_TEST_POSTGRES_URL`) and Redis (`SHOAL_TEST_REDIS_URL`).

use shoal_backends::{conformance, Database, RedisSessionStore, SqlSessionStore};
use shoal_testkit as kit;
use std::time::Duration;

#[tokio::test]
async fn sqlite_session_store_conforms() {
    let dir = kit::TempDir::new("sessions");
    let db = Database::connect(&kit::sqlite_url(dir.path()), 4, Duration::from_secs(5))
        .await
        .unwrap();
    let store = SqlSessionStore::new(db).await.unwrap();
    conformance::session_store(&store).await;
}

#[tokio::test]
async fn postgres_session_store_conforms() {
    let Some(server) = kit::postgres_url("postgres_session_store_conforms") else {
        return;
    };
    let url = kit::fresh_postgres_database(&server).await;
    let db = Database::connect(&url, 4, Duration::from_secs(5))
        .await
        .unwrap();
    let store = SqlSessionStore::new(db).await.unwrap();
    conformance::session_store(&store).await;
}

#[tokio::test]
async fn redis_session_store_conforms() {
    let Some(url) = kit::redis_url("redis_session_store_conforms") else {
        return;
    };
    let store = RedisSessionStore::connect(&url, &kit::unique_name())
        .await
        .unwrap();
    conformance::session_store(&store).await;
}

#[tokio::test]
async fn migrations_run_once_when_instances_start_together() {
    let dir = kit::TempDir::new("migrate");
    let url = kit::sqlite_url(dir.path());
    let mut handles = Vec::new();
    for _ in 0..4 {
        let url = url.clone();
        handles.push(tokio::spawn(async move {
            let db = Database::connect(&url, 2, Duration::from_secs(5))
                .await
                .unwrap();
            SqlSessionStore::new(db.clone()).await.unwrap();
            db
        }));
    }
    let mut dbs = Vec::new();
    for h in handles {
        dbs.push(h.await.unwrap());
    }
    let (count,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM shoal_migrations")
        .fetch_one(dbs[0].pool())
        .await
        .unwrap();
    assert_eq!(count, 1);
}
