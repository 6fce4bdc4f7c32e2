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
on_nats!(nats_complete_many_matches_each_lease, |f| {
    conformance::complete_many_matches_each_lease(&f).await
});
on_nats!(nats_enqueue_many_answers_each_job, |f| {
    conformance::enqueue_many_answers_each_job(&f).await
});
on_nats!(nats_trace_follows_enqueue_into_run, |f| {
    conformance::trace_follows_enqueue_into_run(&f).await
});
on_nats!(nats_gauges_show_depth_and_oldest_age, |f| {
    conformance::gauges_show_depth_and_oldest_age(&f).await
});
on_nats!(nats_unique_key, |f| conformance::unique_key(&f).await);
on_nats!(nats_list_sees_every_job_while_records_change, |f| {
    conformance::list_sees_every_job_while_records_change(&f).await
});
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

/// An enqueue whose record was written but whose message never reached the
/// stream (the server went away in between) is completed by the caller's
/// retry with the same unique key: the retry finds the job, sends its
/// message again, and the job runs, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_retry_with_unique_key_resends_a_lost_message() {
    use async_nats::jetstream;
    use serde_json::json;
    use shoal_queue::{JobState, NewJob};

    let Some(f) = nats("nats_retry_with_unique_key_resends_a_lost_message") else {
        return;
    };
    let window = Duration::from_millis(500);
    let store = NatsJobStore::connect(
        &f.url,
        NatsJobStoreOptions {
            prefix: f.prefix.clone(),
            ack_wait: Duration::from_secs(1),
            poll_interval: Duration::from_millis(50),
            duplicate_window: window,
            ..NatsJobStoreOptions::default()
        },
    )
    .await
    .expect("connect to NATS");
    let job =
        || NewJob::new("mail", "send", json!({"to": "a@example.com"})).unique_key("welcome:1");
    let first = store.enqueue(job()).await.unwrap();
    assert!(first.created);

    // Lose the message, as if its publish never reached the server.
    let client = async_nats::connect(&f.url).await.unwrap();
    let mut stream = jetstream::new(client)
        .get_stream(format!("{}_JOBS", f.prefix))
        .await
        .unwrap();
    let seq = stream.info().await.unwrap().state.last_sequence;
    assert!(stream.delete_message(seq).await.unwrap());
    assert!(
        store
            .claim("mail", 10, Duration::from_secs(5), "w")
            .await
            .unwrap()
            .is_empty(),
        "the message is gone"
    );

    // Past the duplicate window the retry's message is not dropped as a
    // duplicate of the lost one.
    tokio::time::sleep(window + Duration::from_millis(200)).await;
    let again = store.enqueue(job()).await.unwrap();
    assert_eq!(again.id, first.id, "the retry finds the same job");
    assert!(!again.created);
    let claimed = store
        .claim("mail", 10, Duration::from_secs(5), "w")
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1, "the job can run again");
    assert_eq!(claimed[0].id, first.id);
    assert!(store.complete(&claimed[0].lease().unwrap()).await.unwrap());

    // A retry after the job ran sends nothing and changes nothing.
    let late = store.enqueue(job()).await.unwrap();
    assert_eq!(late.id, first.id);
    assert!(store
        .claim("mail", 10, Duration::from_secs(5), "w")
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        store.get(&first.id).await.unwrap().unwrap().state,
        JobState::Succeeded
    );
    f.cleanup().await;
}
