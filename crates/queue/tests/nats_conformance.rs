//! Runs the job-store conformance suite against the NATS JetStream backend
//! (when `SHOAL_TEST_NATS_URL` is set), each test on its own stream and
//! buckets. SQL-only checks (transactions) do not apply.

use async_trait::async_trait;
use shoal_queue::conformance::{self, StoreFactory};
use shoal_queue::{JobStore, NatsJobStore, NatsJobStoreOptions};
use shoal_testkit as kit;
use std::sync::Arc;
use std::time::Duration;

struct NatsFactory {
    url: String,
    prefix: String,
}

#[async_trait]
impl StoreFactory for NatsFactory {
    async fn open(&self) -> Arc<dyn JobStore> {
        Arc::new(self.open_nats().await)
    }
}

impl NatsFactory {
    async fn open_nats(&self) -> NatsJobStore {
        let options = NatsJobStoreOptions {
            prefix: self.prefix.clone(),
            ack_wait: Duration::from_secs(1),
            poll_interval: Duration::from_millis(50),
            ..NatsJobStoreOptions::default()
        };
        NatsJobStore::connect(&self.url, options)
            .await
            .expect("connect to NATS")
    }

    async fn cleanup(&self) {
        self.open_nats()
            .await
            .delete_everything()
            .await
            .expect("delete test stream");
    }
}

fn nats(test: &str) -> Option<NatsFactory> {
    Some(NatsFactory {
        url: kit::nats_url(test)?,
        prefix: kit::unique_name(),
    })
}

macro_rules! on_nats {
    ($name:ident, |$f:ident| $body:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $name() {
            let Some($f) = nats(stringify!($name)) else {
                return;
            };
            $body;
            $f.cleanup().await;
        }
    };
}

on_nats!(nats_enqueue_claim_complete, |f| {
    conformance::enqueue_claim_complete(&f).await
});
on_nats!(nats_unique_key, |f| conformance::unique_key(&f).await);
on_nats!(nats_delayed_job_not_claimed_early, |f| {
    conformance::delayed_job_not_claimed_early(&f).await
});
on_nats!(nats_lease_expiry_reruns_job_of_dead_worker, |f| {
    conformance::lease_expiry_reruns_job_of_dead_worker(&f).await
});
on_nats!(nats_heartbeating_slow_job_not_run_twice, |f| {
    conformance::heartbeating_slow_job_not_run_twice(&f).await
});
on_nats!(nats_retry_then_dead_letter, |f| {
    conformance::retry_then_dead_letter(&f).await
});
on_nats!(nats_cancel_running_job, |f| {
    conformance::cancel_running_job(&f).await
});
on_nats!(nats_cron_fires_once_per_tick, |f| {
    conformance::cron_fires_once_per_tick(&f).await
});
on_nats!(nats_graceful_shutdown_leaves_nothing_running, |f| {
    conformance::graceful_shutdown_leaves_nothing_running(&f).await
});
on_nats!(nats_2000_jobs_complete_exactly_once, |f| {
    conformance::many_jobs_complete_exactly_once(&f, 2000, 4).await
});

/// Jobs enqueued in SQL transactions reach NATS once: rolled-back ones
/// never, committed ones exactly once even when the relay is interrupted
/// between sending and completing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_relay_moves_committed_jobs_to_nats_once() {
    use serde_json::json;
    use shoal_backends::Database;
    use shoal_queue::{JobFilter, JobState, NewJob, OutboxRelay, SqlJobStore};

    let Some(f) = nats("outbox_relay_moves_committed_jobs_to_nats_once") else {
        return;
    };
    let dir = kit::TempDir::new("outbox");
    let db = Database::connect(&kit::sqlite_url(dir.path()), 4, Duration::from_secs(5))
        .await
        .unwrap();
    let sql = SqlJobStore::new(db.clone()).await.unwrap();
    let target = f.open().await;

    let mut tx = db.pool().begin().await.unwrap();
    sql.enqueue_in_transaction(&mut tx, NewJob::new("mail", "send", json!({"n": 1})))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let mut tx = db.pool().begin().await.unwrap();
    let kept = sql
        .enqueue_in_transaction(&mut tx, NewJob::new("mail", "send", json!({"n": 2})))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    // A relay that sends and then dies before completing the outbox job.
    let claimed = sql
        .claim("mail", 10, Duration::from_millis(300), "dying-relay")
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    target
        .enqueue(OutboxRelay::target_job(&claimed[0]))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;

    let relay = OutboxRelay::new(Arc::new(sql.clone()), target.clone(), vec!["mail".into()]);
    assert_eq!(
        relay.relay_once().await.unwrap(),
        1,
        "re-sent after the lease"
    );
    assert_eq!(relay.relay_once().await.unwrap(), 0, "nothing left");
    let outbox_job = sql.get(&kept.id).await.unwrap().unwrap();
    assert_eq!(outbox_job.state, JobState::Succeeded);
    let moved = target
        .list(&JobFilter {
            queue: Some("mail".into()),
            ..JobFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(moved.len(), 1, "exactly one job reached NATS");
    assert_eq!(moved[0].payload, json!({"n": 2}));
    assert_eq!(
        moved[0].unique_key.as_deref(),
        Some(format!("outbox:{}", kept.id).as_str())
    );
    f.cleanup().await;
}
