//! Runs the job-store conformance suite against the SQL backend on SQLite
//! (a fresh file per test) and PostgreSQL (a fresh database per test, when
//! `SHOAL_TEST_POSTGRES_URL` is set).

use async_trait::async_trait;
use shoal_backends::Database;
use shoal_queue::conformance::{self, StoreFactory};
use shoal_queue::{JobStore, SqlJobStore};
use shoal_testkit as kit;
use std::sync::Arc;
use std::time::Duration;

struct SqlFactory {
    url: String,
    _dir: Option<kit::TempDir>,
}

#[async_trait]
impl StoreFactory for SqlFactory {
    async fn open(&self) -> Arc<dyn JobStore> {
        Arc::new(self.open_sql().await)
    }
}

impl SqlFactory {
    async fn open_sql(&self) -> SqlJobStore {
        let db = Database::connect(&self.url, 4, Duration::from_secs(10))
            .await
            .expect("connect");
        SqlJobStore::open(db, &self.url).await.expect("job store")
    }
}

fn sqlite() -> SqlFactory {
    let dir = kit::TempDir::new("queue");
    SqlFactory {
        url: kit::sqlite_url(dir.path()),
        _dir: Some(dir),
    }
}

async fn postgres(test: &str) -> Option<SqlFactory> {
    let server = kit::postgres_url(test)?;
    Some(SqlFactory {
        url: kit::fresh_postgres_database(&server).await,
        _dir: None,
    })
}

macro_rules! on_both {
    ($sqlite:ident, $postgres:ident, |$f:ident| $body:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sqlite() {
            let $f = sqlite();
            $body;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $postgres() {
            let Some($f) = postgres(stringify!($postgres)).await else {
                return;
            };
            $body;
        }
    };
}

on_both!(
    sqlite_enqueue_claim_complete,
    postgres_enqueue_claim_complete,
    |f| { conformance::enqueue_claim_complete(&f).await }
);
on_both!(
    sqlite_complete_many_matches_each_lease,
    postgres_complete_many_matches_each_lease,
    |f| { conformance::complete_many_matches_each_lease(&f).await }
);
on_both!(
    sqlite_enqueue_many_answers_each_job,
    postgres_enqueue_many_answers_each_job,
    |f| { conformance::enqueue_many_answers_each_job(&f).await }
);
on_both!(
    sqlite_claim_takes_lapsed_then_priority,
    postgres_claim_takes_lapsed_then_priority,
    |f| { conformance::claim_takes_lapsed_then_priority(&f).await }
);
on_both!(
    sqlite_trace_follows_enqueue_into_run,
    postgres_trace_follows_enqueue_into_run,
    |f| { conformance::trace_follows_enqueue_into_run(&f).await }
);
on_both!(
    sqlite_gauges_show_depth_and_oldest_age,
    postgres_gauges_show_depth_and_oldest_age,
    |f| { conformance::gauges_show_depth_and_oldest_age(&f).await }
);
on_both!(sqlite_unique_key, postgres_unique_key, |f| {
    conformance::unique_key(&f).await
});
on_both!(
    sqlite_list_sees_every_job_while_records_change,
    postgres_list_sees_every_job_while_records_change,
    |f| { conformance::list_sees_every_job_while_records_change(&f).await }
);
on_both!(
    sqlite_delayed_job_not_claimed_early,
    postgres_delayed_job_not_claimed_early,
    |f| conformance::delayed_job_not_claimed_early(&f).await
);
on_both!(
    sqlite_lease_expiry_reruns_job_of_dead_worker,
    postgres_lease_expiry_reruns_job_of_dead_worker,
    |f| conformance::lease_expiry_reruns_job_of_dead_worker(&f).await
);
on_both!(
    sqlite_heartbeating_slow_job_not_run_twice,
    postgres_heartbeating_slow_job_not_run_twice,
    |f| conformance::heartbeating_slow_job_not_run_twice(&f).await
);
on_both!(
    sqlite_retry_then_dead_letter,
    postgres_retry_then_dead_letter,
    |f| conformance::retry_then_dead_letter(&f).await
);
on_both!(
    sqlite_cancel_running_job,
    postgres_cancel_running_job,
    |f| { conformance::cancel_running_job(&f).await }
);
on_both!(
    sqlite_transactional_enqueue,
    postgres_transactional_enqueue,
    |f| conformance::sql_transactional_enqueue(&f.open_sql().await).await
);
on_both!(
    sqlite_cron_fires_once_per_tick,
    postgres_cron_fires_once_per_tick,
    |f| conformance::cron_fires_once_per_tick(&f).await
);
on_both!(
    sqlite_graceful_shutdown_leaves_nothing_running,
    postgres_graceful_shutdown_leaves_nothing_running,
    |f| conformance::graceful_shutdown_leaves_nothing_running(&f).await
);
on_both!(
    sqlite_2000_jobs_complete_exactly_once,
    postgres_2000_jobs_complete_exactly_once,
    |f| conformance::many_jobs_complete_exactly_once(&f, 2000, 4).await
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_notify_wakes_idle_worker_of_another_process() {
    let Some(f) = postgres("postgres_notify_wakes_idle_worker_of_another_process").await else {
        return;
    };
    conformance::idle_worker_wakes_on_enqueue_elsewhere(&f).await;
}

/// `enqueue_on_sqlite` inside `Database::sqlite_write` (the synchronous
/// SQLite write path): a job exists if and only if the transaction
/// commits, keeps its fields and the caller's trace, is claimable, and a
/// unique key answers the job holding it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_enqueue_on_sqlite_follows_the_transaction() {
    use serde_json::json;
    use shoal_backends::Finish;
    use shoal_queue::{JobState, NewJob, QueueError};
    let f = sqlite();
    let store = Arc::new(f.open_sql().await);
    let db = store.database().clone();
    let q = format!("direct{}", std::process::id());
    let job = |n: i64| NewJob::new(&q, "k", json!({ "n": n })).max_attempts(3);

    let prepared = store.prepare(job(1)).unwrap();
    let s = Arc::clone(&store);
    let rolled = db
        .sqlite_write(move |c| {
            let e = s.enqueue_on_sqlite(c, prepared)?;
            Ok::<_, QueueError>(Finish::Rollback(e))
        })
        .await
        .unwrap();
    assert!(
        store.get(&rolled.id).await.unwrap().is_none(),
        "rolled back: no job"
    );

    // Prepared in the request's task: it takes the task's trace.
    let s = Arc::clone(&store);
    let second = job(2).unique_key("once");
    let kept = shoal_core::trace::scope("tr-direct", async move {
        let prepared = s.prepare(second)?;
        db.sqlite_write(move |c| {
            let e = s.enqueue_on_sqlite(c, prepared)?;
            Ok::<_, QueueError>(Finish::Commit(e))
        })
        .await
    });
    let kept = kept.await.unwrap();
    assert!(kept.created);
    let stored = store.get(&kept.id).await.unwrap().expect("committed");
    assert_eq!(stored.state, JobState::Available);
    assert_eq!(stored.payload, json!({"n": 2}));
    assert_eq!(stored.max_attempts, 3);
    assert_eq!(stored.trace_id.as_deref(), Some("tr-direct"));

    // The same unique key again: no second job, the first one's id.
    let prepared = store.prepare(job(3).unique_key("once")).unwrap();
    let s = Arc::clone(&store);
    let again = store
        .database()
        .sqlite_write(move |c| {
            let e = s.enqueue_on_sqlite(c, prepared)?;
            Ok::<_, QueueError>(Finish::Commit(e))
        })
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.id, kept.id);

    let claimed = store
        .claim(&q, 10, Duration::from_secs(30), "w")
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].id, kept.id);
    // Bad jobs are refused before any write.
    assert!(store
        .prepare(NewJob::new("bad queue", "k", json!(1)))
        .is_err());
}
