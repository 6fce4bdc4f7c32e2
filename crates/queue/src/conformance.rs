//! The job-store conformance suite: behaviour every `JobStore` backend must
//! show, store-level and through the worker runtime. Tests in `tests/` run
//! each check against every backend. Checks panic with a message naming
//! what broke. Each check takes a [`StoreFactory`] so it can open several
//! handles on one backing store, as separate worker processes would.

use crate::job::{JobFilter, JobState, Lease, NewJob};
use crate::sql::SqlJobStore;
use crate::store::JobStore;
use crate::worker::{handler_fn, Backoff, JobContext, KindOptions, Worker, WorkerOptions};
use crate::{JobError, Schedule};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Opens handles on one backing store (one database, one stream).
#[async_trait]
pub trait StoreFactory: Send + Sync {
    /// A new handle with its own connections, like another process's.
    async fn open(&self) -> Arc<dyn JobStore>;
}

fn queue_name() -> String {
    format!("q{}", &shoal_core::ids::new_id()[24..])
}

/// Options for test workers: short leases and polls.
pub fn test_worker_options(queue: &str, concurrency: usize) -> WorkerOptions {
    WorkerOptions {
        worker_id: format!("test-{}", &shoal_core::ids::new_id()[24..]),
        queues: vec![(queue.to_string(), concurrency)],
        lease: Duration::from_secs(5),
        heartbeat: None,
        shutdown_timeout: Duration::from_secs(5),
        stats_interval: Duration::from_secs(1),
        retention: None,
        prune_interval: Duration::from_secs(300),
        poll_interval: Some(Duration::from_millis(50)),
        cancel_grace: Duration::from_millis(200),
    }
}

/// Polls `check` every 50 ms until it is true; panics after `limit`.
pub async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn state_of(store: &dyn JobStore, id: &str) -> Option<JobState> {
    store.get(id).await.expect("get").map(|j| j.state)
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Email {
    to: String,
    n: u32,
}

/// Enqueues `n` jobs of kind `k` on `q`, payloads 0..n; their ids in
/// order.
async fn enqueue_numbered(store: &dyn JobStore, q: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(
            store
                .enqueue(NewJob::new(q, "k", json!(i)))
                .await
                .unwrap()
                .id,
        );
    }
    ids
}

/// A listing sees every job while their records change under it (each
/// claimed, heartbeated and completed meanwhile): none missing, none
/// twice.
pub async fn list_sees_every_job_while_records_change(factory: &dyn StoreFactory) {
    let store = factory.open().await;
    let q = queue_name();
    let mut ids = enqueue_numbered(&*store, &q, 60).await;
    ids.sort();
    let lease = Duration::from_secs(30);
    let writer = {
        let (store, q) = (Arc::clone(&store), q.clone());
        tokio::spawn(async move {
            loop {
                let claimed = store.claim(&q, 3, lease, "w").await.unwrap();
                if claimed.is_empty() {
                    return;
                }
                for job in claimed {
                    let l = job.lease().unwrap();
                    assert!(store
                        .heartbeat(&l, lease, Some(&json!({"p": 1})))
                        .await
                        .unwrap());
                    assert!(store.complete(&l).await.unwrap());
                }
            }
        })
    };
    let filter = JobFilter {
        queue: Some(q.clone()),
        limit: Some(1000),
        ..Default::default()
    };
    let mut listings = 0;
    while listings == 0 || !writer.is_finished() {
        let mut seen: Vec<String> = store
            .list(&filter)
            .await
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
        seen.sort();
        assert_eq!(seen, ids, "listing {listings}, while the records change");
        listings += 1;
    }
    writer.await.unwrap();
}

/// Enqueue, inspect, claim with a lease, heartbeat, complete; priority
/// order; cancel; stats; prune.
pub async fn enqueue_claim_complete(factory: &dyn StoreFactory) {
    let store = factory.open().await;
    let q = queue_name();
    let lease = Duration::from_secs(30);
    let payload = Email {
        to: "a@example.com".into(),
        n: 7,
    };
    let e = store
        .enqueue(
            NewJob::typed(&q, "email", &payload)
                .unwrap()
                .trace_id("req-1"),
        )
        .await
        .expect("enqueue");
    assert!(e.created, "a new job is created");
    let job = store.get(&e.id).await.unwrap().expect("job is stored");
    assert_eq!(job.state, JobState::Available);
    assert_eq!(job.attempts, 0);
    assert_eq!(job.trace_id.as_deref(), Some("req-1"));
    assert_eq!(
        job.payload_as::<Email>().unwrap(),
        payload,
        "payload round-trips"
    );

    let claimed = store.claim(&q, 10, lease, "w1").await.expect("claim");
    assert_eq!(claimed.len(), 1, "one job claimed");
    let running = &claimed[0];
    assert_eq!(running.id, e.id);
    assert_eq!(running.state, JobState::Running);
    assert_eq!(running.attempts, 1, "claiming counts an attempt");
    assert!(running.lease_until.unwrap() > shoal_backends::now_millis());
    assert!(
        store.claim(&q, 10, lease, "w2").await.unwrap().is_empty(),
        "a leased job is not claimed twice"
    );
    let l = running.lease().expect("lease");
    assert!(store
        .heartbeat(&l, lease, Some(&json!({"done": 1})))
        .await
        .unwrap());
    let seen = store.get(&e.id).await.unwrap().unwrap();
    assert_eq!(seen.progress, Some(json!({"done": 1})), "progress stored");
    assert!(store.complete(&l).await.unwrap(), "complete");
    let done = store.get(&e.id).await.unwrap().unwrap();
    assert_eq!(done.state, JobState::Succeeded);
    assert!(done.finished_at.is_some());
    assert!(
        !store.complete(&l).await.unwrap(),
        "second completion is a no-op"
    );
    assert!(
        !store.heartbeat(&l, lease, None).await.unwrap(),
        "heartbeat of a finished job says the lease is gone"
    );

    // Priority first, then age.
    let low = store.enqueue(NewJob::new(&q, "k", json!(1))).await.unwrap();
    let high = store
        .enqueue(NewJob::new(&q, "k", json!(2)).priority(10))
        .await
        .unwrap();
    let first = store.claim(&q, 1, lease, "w1").await.unwrap();
    if store.orders_by_priority() {
        assert_eq!(first[0].id, high.id, "higher priority claimed first");
    }
    let (low, _high) = if first[0].id == high.id {
        (low, high)
    } else {
        (high, low)
    };

    // Cancel an available job: it is never claimed.
    assert!(store.cancel(&low.id).await.unwrap(), "cancel");
    assert_eq!(state_of(&*store, &low.id).await, Some(JobState::Cancelled));
    assert!(!store.cancel(&low.id).await.unwrap(), "cancel is once");
    assert!(store.claim(&q, 10, lease, "w1").await.unwrap().is_empty());

    let stats = store.stats().await.unwrap();
    let s = stats
        .iter()
        .find(|s| s.queue == q)
        .expect("stats for queue");
    assert_eq!(
        (s.succeeded, s.running, s.cancelled, s.depth),
        (1, 1, 1, 0),
        "stats: {s:?}"
    );

    let listed = store
        .list(&JobFilter {
            queue: Some(q.clone()),
            ..JobFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.len(), 3, "list by queue");

    // Invalid jobs are refused before anything is stored.
    assert!(store
        .enqueue(NewJob::new("bad queue!", "k", json!(null)))
        .await
        .is_err());

    tokio::time::sleep(Duration::from_millis(20)).await;
    let pruned = store.prune(Duration::ZERO, Duration::ZERO).await.unwrap();
    assert!(pruned >= 2, "prune deletes finished jobs (got {pruned})");
    assert!(store.get(&e.id).await.unwrap().is_none());
    assert!(
        store.get(&first[0].id).await.unwrap().is_some(),
        "prune keeps running jobs"
    );
}

/// `complete_many` answers for each lease as `complete` would: valid
/// leases complete, a stale token (an attempt whose lease was taken over)
/// and an already completed attempt change nothing.
pub async fn complete_many_matches_each_lease(factory: &dyn StoreFactory) {
    let store = factory.open().await;
    let q = queue_name();
    let lease = Duration::from_secs(30);
    enqueue_numbered(&*store, &q, 4).await;
    let claimed = store.claim(&q, 10, lease, "w1").await.unwrap();
    assert_eq!(claimed.len(), 4);
    let leases: Vec<Lease> = claimed.iter().map(|j| j.lease().unwrap()).collect();
    assert!(store.complete(&leases[3]).await.unwrap());
    let stale = Lease {
        token: "not-the-lease".into(),
        ..leases[1].clone()
    };
    let asked = vec![
        leases[0].clone(),
        stale,
        leases[2].clone(),
        leases[3].clone(),
    ];
    let answers = |leases: Vec<Lease>| {
        let store = store.clone();
        async move {
            store
                .complete_many(&leases)
                .await
                .unwrap()
                .into_iter()
                .map(|answer| answer.unwrap())
                .collect::<Vec<bool>>()
        }
    };
    assert_eq!(answers(asked).await, vec![true, false, true, false]);
    let state = |id: &str| {
        let store = store.clone();
        let id = id.to_string();
        async move { store.get(&id).await.unwrap().unwrap().state }
    };
    assert_eq!(state(&leases[0].job_id).await, JobState::Succeeded);
    assert_eq!(state(&leases[1].job_id).await, JobState::Running);
    assert_eq!(state(&leases[2].job_id).await, JobState::Succeeded);
    assert_eq!(answers(vec![leases[1].clone()]).await, vec![true]);
    assert!(answers(Vec::new()).await.is_empty());
}

/// A claim takes attempts whose lease lapsed first, then ready jobs by
/// priority, even when there are more of both than it asked for (SQL
/// stores; JetStream delivers in enqueue order).
pub async fn claim_takes_lapsed_then_priority(factory: &dyn StoreFactory) {
    let store = factory.open().await;
    if !store.orders_by_priority() {
        return;
    }
    let q = queue_name();
    let lapsed = store
        .enqueue(NewJob::new(&q, "k", json!("lapsed")))
        .await
        .unwrap();
    let first = store
        .claim(&q, 1, Duration::from_millis(50), "doomed")
        .await
        .unwrap();
    assert_eq!(first[0].id, lapsed.id);
    let mut ids = Vec::new();
    for priority in [0, 3, 10, 5, 1] {
        let e = store
            .enqueue(NewJob::new(&q, "k", json!(priority)).priority(priority))
            .await
            .unwrap();
        ids.push((priority, e.id));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let got = store
        .claim(&q, 3, Duration::from_secs(30), "w")
        .await
        .unwrap();
    let id_of = |p: i64| ids.iter().find(|(q, _)| *q == p).unwrap().1.clone();
    let mut got_ids: Vec<String> = got.iter().map(|j| j.id.clone()).collect();
    got_ids.sort();
    let mut want = vec![lapsed.id.clone(), id_of(10), id_of(5)];
    want.sort();
    assert_eq!(
        got_ids, want,
        "the lapsed attempt, then priorities 10 and 5"
    );
}

/// A duplicate unique key returns the existing job, even under races.
pub async fn unique_key(factory: &dyn StoreFactory) {
    let a = factory.open().await;
    let b = factory.open().await;
    let q = queue_name();
    let key = format!("unique-{q}");
    let first = a
        .enqueue(NewJob::new(&q, "k", json!(1)).unique_key(&key))
        .await
        .unwrap();
    let again = b
        .enqueue(NewJob::new(&q, "k", json!(2)).unique_key(&key))
        .await
        .unwrap();
    assert!(first.created && !again.created);
    assert_eq!(first.id, again.id, "duplicate key returns the first id");

    let key2 = format!("race-{q}");
    let mut handles = Vec::new();
    for i in 0..10 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        let key2 = key2.clone();
        let q = q.clone();
        handles.push(tokio::spawn(async move {
            store
                .enqueue(NewJob::new(&q, "k", json!(i)).unique_key(key2))
                .await
                .unwrap()
        }));
    }
    let mut ids = Vec::new();
    for h in handles {
        ids.push(h.await.unwrap());
    }
    assert_eq!(ids.iter().filter(|e| e.created).count(), 1, "one created");
    assert!(ids.iter().all(|e| e.id == ids[0].id), "all see one id");
    let jobs = a
        .list(&JobFilter {
            queue: Some(q),
            ..JobFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(jobs.len(), 2, "two keys, two jobs");
}

/// A job with a future `run_at` is not claimed before it.
pub async fn delayed_job_not_claimed_early(factory: &dyn StoreFactory) {
    let store = factory.open().await;
    let q = queue_name();
    let e = store
        .enqueue(NewJob::new(&q, "k", json!(null)).delay(Duration::from_millis(1500)))
        .await
        .unwrap();
    assert_eq!(state_of(&*store, &e.id).await, Some(JobState::Scheduled));
    let lease = Duration::from_secs(30);
    assert!(
        store.claim(&q, 10, lease, "w").await.unwrap().is_empty(),
        "not claimed before run_at"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(store.claim(&q, 10, lease, "w").await.unwrap().is_empty());
    let start = Instant::now();
    loop {
        let got = store.claim(&q, 10, lease, "w").await.unwrap();
        if !got.is_empty() {
            assert_eq!(got[0].id, e.id);
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "claimed once due");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A job whose worker died (no heartbeats) runs again soon after its lease
/// lapses; the dead worker's late completion changes nothing.
pub async fn lease_expiry_reruns_job_of_dead_worker(factory: &dyn StoreFactory) {
    let store = factory.open().await;
    let q = queue_name();
    let e = store
        .enqueue(NewJob::new(&q, "work", json!(null)))
        .await
        .unwrap();
    let claimed = store
        .claim(&q, 1, Duration::from_millis(500), "doomed-worker")
        .await
        .unwrap();
    let stale = claimed[0].lease().unwrap();
    // The "doomed" worker now dies: it never heartbeats or completes.

    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let worker = Worker::new(factory.open().await, test_worker_options(&q, 2)).register(
        "work",
        handler_fn(move |_ctx: JobContext| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        }),
    );
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));
    let start = Instant::now();
    wait_until("the orphaned job reruns", Duration::from_secs(10), || {
        let store = store.clone();
        let id = e.id.clone();
        async move { state_of(&*store, &id).await == Some(JobState::Succeeded) }
    })
    .await;
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "rerun within seconds of the lease lapsing (took {:?})",
        start.elapsed()
    );
    stop.cancel();
    running.await.unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    let job = store.get(&e.id).await.unwrap().unwrap();
    assert_eq!(job.attempts, 2, "the lost attempt counts");
    assert!(
        job.errors
            .iter()
            .any(|err| err.error.contains("lease expired")),
        "history records the lost attempt: {:?}",
        job.errors
    );
    assert!(
        !store.complete(&stale).await.unwrap(),
        "a stale lease cannot complete"
    );
    assert!(
        !store.fail(&stale, "late", None).await.unwrap(),
        "a stale lease cannot fail the job"
    );
    assert_eq!(state_of(&*store, &e.id).await, Some(JobState::Succeeded));

    // A job whose last attempt's worker died is dead-lettered, not rerun.
    let last = store
        .enqueue(NewJob::new(&q, "other", json!(null)).max_attempts(1))
        .await
        .unwrap();
    store
        .claim(&q, 1, Duration::from_millis(200), "doomed-worker")
        .await
        .unwrap();
    // (JetStream redelivers only after its ack wait: poll for a while.)
    let start = Instant::now();
    while state_of(&*store, &last.id).await != Some(JobState::Dead) {
        let got = store
            .claim(&q, 10, Duration::from_secs(5), "w")
            .await
            .unwrap();
        assert!(
            got.iter().all(|j| j.id != last.id),
            "a job whose last attempt was lost is not run again"
        );
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the lost last attempt is dead-lettered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dead = store.get(&last.id).await.unwrap().unwrap();
    assert!(dead
        .last_error
        .unwrap_or_default()
        .contains("lease expired"));
}

/// A slow job whose worker keeps renewing its lease is never run twice,
/// even with a lease far shorter than the job and other workers polling.
pub async fn heartbeating_slow_job_not_run_twice(factory: &dyn StoreFactory) {
    let store = factory.open().await;
    let q = queue_name();
    let runs = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let mut workers = Vec::new();
    for _ in 0..2 {
        let r = runs.clone();
        let mut options = test_worker_options(&q, 2);
        options.lease = Duration::from_millis(600);
        options.heartbeat = Some(Duration::from_millis(150));
        let worker = Worker::new(factory.open().await, options).register(
            "slow",
            handler_fn(move |ctx: JobContext| {
                let r = r.clone();
                async move {
                    r.fetch_add(1, Ordering::SeqCst);
                    for i in 0..5 {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        ctx.report_progress(json!({ "step": i })).await?;
                    }
                    Ok(())
                }
            }),
        );
        workers.push(tokio::spawn(worker.run(stop.clone())));
    }
    let e = store
        .enqueue(NewJob::new(&q, "slow", json!(null)))
        .await
        .unwrap();
    wait_until("the slow job succeeds", Duration::from_secs(15), || {
        let store = store.clone();
        let id = e.id.clone();
        async move { state_of(&*store, &id).await == Some(JobState::Succeeded) }
    })
    .await;
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1, "ran exactly once");
    let job = store.get(&e.id).await.unwrap().unwrap();
    assert_eq!(job.attempts, 1);
    assert_eq!(job.progress, Some(json!({"step": 4})));
}

/// Retryable failures back off exponentially, then the job is dead with its
/// error history; permanent errors and timeouts are handled; other jobs keep
/// flowing; dead jobs can be listed, retried and discarded.
pub async fn retry_then_dead_letter(factory: &dyn StoreFactory) {
    let store = factory.open().await;
    let q = queue_name();
    let backoff = Backoff {
        base: Duration::from_millis(200),
        max: Duration::from_secs(5),
        jitter: 0.0,
    };
    let ok_runs = Arc::new(AtomicUsize::new(0));
    let ok = ok_runs.clone();
    let worker = Worker::new(factory.open().await, test_worker_options(&q, 4))
        .register_with(
            "flaky",
            handler_fn(|ctx: JobContext| async move {
                Err(JobError::Retryable(format!("boom {}", ctx.attempt())))
            }),
            KindOptions {
                backoff,
                rate_limit: None,
            },
        )
        .register(
            "broken",
            handler_fn(
                |_ctx: JobContext| async move { Err(JobError::Permanent("bad input".into())) },
            ),
        )
        .register(
            "hangs",
            handler_fn(|_ctx: JobContext| async move {
                tokio::time::sleep(Duration::from_secs(60)).await;
                Ok(())
            }),
        )
        .register(
            "ok",
            handler_fn(move |_ctx: JobContext| {
                let ok = ok.clone();
                async move {
                    ok.fetch_add(1, Ordering::SeqCst);
                    Ok(())
                }
            }),
        );
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));
    let flaky = store
        .enqueue(NewJob::new(&q, "flaky", json!(null)).max_attempts(3))
        .await
        .unwrap();
    let broken = store
        .enqueue(NewJob::new(&q, "broken", json!(null)))
        .await
        .unwrap();
    let hangs = store
        .enqueue(
            NewJob::new(&q, "hangs", json!(null))
                .max_attempts(1)
                .timeout(Duration::from_millis(200)),
        )
        .await
        .unwrap();
    for i in 0..20 {
        store
            .enqueue(NewJob::new(&q, "ok", json!(i)))
            .await
            .unwrap();
    }
    wait_until("the flaky job is dead", Duration::from_secs(15), || {
        let store = store.clone();
        let id = flaky.id.clone();
        async move { state_of(&*store, &id).await == Some(JobState::Dead) }
    })
    .await;
    wait_until("ok jobs finish", Duration::from_secs(10), || {
        let ok = ok_runs.clone();
        async move { ok.load(Ordering::SeqCst) == 20 }
    })
    .await;
    stop.cancel();
    running.await.unwrap();

    let job = store.get(&flaky.id).await.unwrap().unwrap();
    assert_eq!(job.attempts, 3);
    let attempts: Vec<i64> = job.errors.iter().map(|e| e.attempt).collect();
    assert_eq!(attempts, vec![1, 2, 3], "one history entry per attempt");
    assert_eq!(job.errors[2].error, "boom 3");
    assert_eq!(job.last_error.as_deref(), Some("boom 3"));
    let gap1 = job.errors[1].at - job.errors[0].at;
    let gap2 = job.errors[2].at - job.errors[1].at;
    assert!(gap1 >= 200, "first backoff waited (gap {gap1} ms)");
    assert!(gap2 >= 400, "backoff doubled (gap {gap2} ms)");

    let b = store.get(&broken.id).await.unwrap().unwrap();
    assert_eq!(
        (b.state, b.attempts),
        (JobState::Dead, 1),
        "permanent error is dead at once"
    );
    let h = store.get(&hangs.id).await.unwrap().unwrap();
    assert_eq!(h.state, JobState::Dead);
    assert!(
        h.last_error.as_deref().unwrap_or("").contains("timed out"),
        "timeout recorded: {:?}",
        h.last_error
    );

    let dead = store
        .list(&JobFilter {
            queue: Some(q.clone()),
            state: Some(JobState::Dead),
            ..JobFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(dead.len(), 3, "dead letters listed");
    let stats = store.stats().await.unwrap();
    let s = stats.iter().find(|s| s.queue == q).unwrap();
    assert_eq!((s.dead, s.succeeded), (3, 20));

    assert!(store.retry_dead(&flaky.id).await.unwrap(), "retry dead");
    let again = store.get(&flaky.id).await.unwrap().unwrap();
    assert_eq!((again.state, again.attempts), (JobState::Available, 0));
    assert!(
        !store.discard_dead(&flaky.id).await.unwrap(),
        "not dead now"
    );
    assert!(!store.retry_dead(&flaky.id).await.unwrap());
    assert!(
        store.discard_dead(&broken.id).await.unwrap(),
        "discard dead"
    );
    assert!(store.get(&broken.id).await.unwrap().is_none());
}

/// Cancelling a running job stops its handler at the next heartbeat, and
/// the handler's late result does not overwrite `cancelled`.
pub async fn cancel_running_job(factory: &dyn StoreFactory) {
    let store = factory.open().await;
    let q = queue_name();
    let saw_cancel = Arc::new(AtomicUsize::new(0));
    let started = Arc::new(AtomicUsize::new(0));
    let (s1, s2) = (saw_cancel.clone(), started.clone());
    let mut options = test_worker_options(&q, 1);
    options.heartbeat = Some(Duration::from_millis(100));
    let worker = Worker::new(factory.open().await, options).register(
        "long",
        handler_fn(move |ctx: JobContext| {
            let (saw, started) = (s1.clone(), s2.clone());
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                let token = ctx.cancellation_token();
                tokio::select! {
                    _ = token.cancelled() => { saw.fetch_add(1, Ordering::SeqCst); }
                    _ = tokio::time::sleep(Duration::from_secs(20)) => {}
                }
                Ok(())
            }
        }),
    );
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));
    let e = store
        .enqueue(NewJob::new(&q, "long", json!(null)))
        .await
        .unwrap();
    wait_until("the job starts", Duration::from_secs(5), || {
        let started = started.clone();
        async move { started.load(Ordering::SeqCst) == 1 }
    })
    .await;
    assert!(store.cancel(&e.id).await.unwrap());
    wait_until(
        "the handler sees the cancel",
        Duration::from_secs(5),
        || {
            let saw = saw_cancel.clone();
            async move { saw.load(Ordering::SeqCst) == 1 }
        },
    )
    .await;
    stop.cancel();
    let report = running.await.unwrap();
    assert_eq!(report.lost, 1, "attempt abandoned: {report:?}");
    assert_eq!(state_of(&*store, &e.id).await, Some(JobState::Cancelled));
}

/// Jobs enqueued in a rolled-back transaction do not exist; in a committed
/// one they do; a handler can complete its job in its own transaction.
pub async fn sql_transactional_enqueue(store: &SqlJobStore) {
    let q = queue_name();
    let pool = store.database().pool();
    let mut tx = pool.begin().await.unwrap();
    let rolled = store
        .enqueue_in_transaction(&mut tx, NewJob::new(&q, "k", json!(1)))
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(
        store.get(&rolled.id).await.unwrap().is_none(),
        "rolled back: no job"
    );

    let mut tx = pool.begin().await.unwrap();
    let kept = store
        .enqueue_in_transaction(&mut tx, NewJob::new(&q, "k", json!(2)))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(
        state_of(store, &kept.id).await,
        Some(JobState::Available),
        "committed: one job"
    );
    let all = store
        .list(&JobFilter {
            queue: Some(q.clone()),
            ..JobFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(all.len(), 1);

    // Completion inside the caller's transaction.
    let claimed = store
        .claim(&q, 1, Duration::from_secs(30), "w")
        .await
        .unwrap();
    let lease = claimed[0].lease().unwrap();
    let mut tx = pool.begin().await.unwrap();
    assert!(store
        .complete_in_transaction(&mut tx, &lease)
        .await
        .unwrap());
    tx.rollback().await.unwrap();
    assert_eq!(state_of(store, &kept.id).await, Some(JobState::Running));
    let mut tx = pool.begin().await.unwrap();
    assert!(store
        .complete_in_transaction(&mut tx, &lease)
        .await
        .unwrap());
    tx.commit().await.unwrap();
    assert_eq!(state_of(store, &kept.id).await, Some(JobState::Succeeded));
}

/// A cron schedule run by three workers enqueues (and runs) exactly one job
/// per tick.
pub async fn cron_fires_once_per_tick(factory: &dyn StoreFactory) {
    let store = factory.open().await;
    let q = queue_name();
    let runs: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let stop = CancellationToken::new();
    let mut workers = Vec::new();
    for _ in 0..3 {
        let runs = runs.clone();
        let schedule = Schedule::new(
            "every-second",
            "* * * * * *",
            NewJob::new(&q, "tick", json!(null)),
        )
        .unwrap();
        let worker = Worker::new(factory.open().await, test_worker_options(&q, 2))
            .schedule(schedule)
            .register(
                "tick",
                handler_fn(move |ctx: JobContext| {
                    let runs = runs.clone();
                    async move {
                        let key = ctx.job().unique_key.clone().unwrap_or_default();
                        *runs.lock().unwrap().entry(key).or_default() += 1;
                        Ok(())
                    }
                }),
            );
        workers.push(tokio::spawn(worker.run(stop.clone())));
    }
    tokio::time::sleep(Duration::from_millis(3600)).await;
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }
    let runs = runs.lock().unwrap().clone();
    assert!(runs.len() >= 3, "at least 3 ticks in 3.6 s: {runs:?}");
    for (key, n) in &runs {
        assert!(key.starts_with("cron:every-second:"), "key {key}");
        assert_eq!(*n, 1, "tick {key} ran {n} times");
    }
    let jobs = store
        .list(&JobFilter {
            queue: Some(q),
            ..JobFilter::default()
        })
        .await
        .unwrap();
    let mut keys: Vec<_> = jobs.iter().filter_map(|j| j.unique_key.clone()).collect();
    let total = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), total, "one job per tick");
    assert!(total >= runs.len());
}

/// After shutdown, short jobs have finished, long ones were handed back
/// (available, attempt not counted) and no job is left running.
pub async fn graceful_shutdown_leaves_nothing_running(factory: &dyn StoreFactory) {
    let store = factory.open().await;
    let q = queue_name();
    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    let mut options = test_worker_options(&q, 8);
    options.shutdown_timeout = Duration::from_millis(700);
    let worker = Worker::new(factory.open().await, options).register(
        "sleep",
        handler_fn(move |ctx: JobContext| {
            let s = s.clone();
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                let ms: u64 = ctx.payload_as()?;
                tokio::time::sleep(Duration::from_millis(ms)).await;
                Ok(())
            }
        }),
    );
    let mut short = Vec::new();
    let mut long = Vec::new();
    for _ in 0..3 {
        short.push(
            store
                .enqueue(NewJob::new(&q, "sleep", json!(300)))
                .await
                .unwrap()
                .id,
        );
    }
    for _ in 0..2 {
        long.push(
            store
                .enqueue(NewJob::new(&q, "sleep", json!(60_000)))
                .await
                .unwrap()
                .id,
        );
    }
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));
    wait_until("all five start", Duration::from_secs(5), || {
        let started = started.clone();
        async move { started.load(Ordering::SeqCst) == 5 }
    })
    .await;
    let began = Instant::now();
    stop.cancel();
    let report = running.await.unwrap();
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "stopped within the deadline ({:?})",
        began.elapsed()
    );
    assert_eq!(report.released, 2, "{report:?}");
    for id in &short {
        assert_eq!(state_of(&*store, id).await, Some(JobState::Succeeded));
    }
    for id in &long {
        let job = store.get(id).await.unwrap().unwrap();
        assert_eq!(
            (job.state, job.attempts),
            (JobState::Available, 0),
            "handed back, attempt not counted"
        );
    }
    let stats = store.stats().await.unwrap();
    let s = stats.iter().find(|s| s.queue == q).unwrap();
    assert_eq!(s.running, 0, "nothing left running");
}

/// The trace follows the work: a job enqueued under a trace id records it
/// (an explicit one wins), and a job enqueued by a running job's handler
/// records that job's trace, or the job's own id when it had none.
pub async fn trace_follows_enqueue_into_run(factory: &dyn StoreFactory) {
    let store = factory.open().await;
    let q = queue_name();
    let traced =
        shoal_core::trace::scope("req-7", store.enqueue(NewJob::new(&q, "parent", json!({}))))
            .await
            .unwrap();
    let explicit = shoal_core::trace::scope(
        "req-7",
        store.enqueue(NewJob::new(&q, "other", json!({})).trace_id("mine")),
    )
    .await
    .unwrap();
    let untraced = store
        .enqueue(NewJob::new(&q, "parent", json!({})))
        .await
        .unwrap();
    let trace_of = |id: String| {
        let store = store.clone();
        async move { store.get(&id).await.unwrap().unwrap().trace_id }
    };
    assert_eq!(trace_of(traced.id.clone()).await.as_deref(), Some("req-7"));
    assert_eq!(trace_of(explicit.id.clone()).await.as_deref(), Some("mine"));
    assert_eq!(trace_of(untraced.id.clone()).await, None);

    // Each parent enqueues a child from its handler; the child's id is
    // recorded under the parent's.
    let children: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let (c, q2, st) = (children.clone(), q.clone(), factory.open().await);
    let worker = Worker::new(factory.open().await, test_worker_options(&q, 4))
        .register(
            "parent",
            handler_fn(move |ctx: JobContext| {
                let (c, q2, st) = (c.clone(), q2.clone(), st.clone());
                async move {
                    let child = st
                        .enqueue(NewJob::new(&q2, "child", json!({})))
                        .await
                        .map_err(JobError::retryable)?;
                    c.lock().unwrap().insert(ctx.id().to_string(), child.id);
                    Ok(())
                }
            }),
        )
        .register("child", handler_fn(|_ctx: JobContext| async { Ok(()) }))
        .register("other", handler_fn(|_ctx: JobContext| async { Ok(()) }));
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));
    wait_until("both parents ran", Duration::from_secs(10), || {
        let children = children.clone();
        async move { children.lock().unwrap().len() == 2 }
    })
    .await;
    stop.cancel();
    let _ = running.await;
    let children = children.lock().unwrap().clone();
    assert_eq!(
        trace_of(children[&traced.id].clone()).await.as_deref(),
        Some("req-7"),
        "a child carries its parent's trace"
    );
    assert_eq!(
        trace_of(children[&untraced.id].clone()).await.as_deref(),
        Some(untraced.id.as_str()),
        "a child of an untraced job carries the parent's id"
    );
}

/// `gauges` (what workers export): depth counts jobs waiting to be
/// claimed, oldest age how long the first of them has waited.
pub async fn gauges_show_depth_and_oldest_age(factory: &dyn StoreFactory) {
    let store = factory.open().await;
    let q = queue_name();
    for n in 0..3 {
        store.enqueue(NewJob::new(&q, "k", json!(n))).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let claimed = store
        .claim(&q, 1, Duration::from_secs(30), "w")
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let gauges = store.gauges().await.unwrap();
    let g = gauges
        .iter()
        .find(|g| g.queue == q)
        .unwrap_or_else(|| panic!("no gauges for {q}: {gauges:?}"));
    assert_eq!(g.depth, 2, "{g:?}");
    assert!(
        (1000..60_000).contains(&g.oldest_age_ms),
        "oldest waited about 1.1 s: {g:?}"
    );
}

/// `jobs` jobs across `workers` workers: each completes exactly once.
pub async fn many_jobs_complete_exactly_once(
    factory: &dyn StoreFactory,
    jobs: usize,
    workers: usize,
) {
    let store = factory.open().await;
    let q = queue_name();
    let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let stop = CancellationToken::new();
    let mut running = Vec::new();
    for _ in 0..workers {
        let seen = seen.clone();
        let worker = Worker::new(factory.open().await, test_worker_options(&q, 8)).register(
            "count",
            handler_fn(move |ctx: JobContext| {
                let seen = seen.clone();
                async move {
                    *seen
                        .lock()
                        .unwrap()
                        .entry(ctx.id().to_string())
                        .or_default() += 1;
                    Ok(())
                }
            }),
        );
        running.push(tokio::spawn(worker.run(stop.clone())));
    }
    let mut enqueuers = Vec::new();
    for part in 0..4 {
        let store = factory.open().await;
        let q = q.clone();
        let n = jobs / 4 + usize::from(part < jobs % 4);
        enqueuers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in 0..n {
                ids.push(
                    store
                        .enqueue(NewJob::new(&q, "count", json!(i)))
                        .await
                        .unwrap()
                        .id,
                );
            }
            ids
        }));
    }
    let mut ids = Vec::new();
    for e in enqueuers {
        ids.extend(e.await.unwrap());
    }
    assert_eq!(ids.len(), jobs);
    wait_until("every job runs", Duration::from_secs(180), || {
        let seen = seen.clone();
        async move { seen.lock().unwrap().len() == jobs }
    })
    .await;
    // A graceful stop waits for the last completions to be written.
    stop.cancel();
    let mut succeeded = 0;
    for w in running {
        succeeded += w.await.unwrap().succeeded;
    }
    assert_eq!(succeeded as usize, jobs, "each completion recorded once");
    let stats = store.stats().await.unwrap();
    let s = stats.iter().find(|s| s.queue == q).unwrap();
    assert_eq!(
        (s.succeeded as usize, s.running, s.depth),
        (jobs, 0, 0),
        "{s:?}"
    );
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), jobs, "every job ran");
    for id in &ids {
        assert_eq!(seen.get(id), Some(&1), "job {id} ran exactly once");
    }
}

/// For backends that push wake-ups between processes (PostgreSQL NOTIFY,
/// NATS): a worker polling only every 5 s still starts jobs enqueued
/// through another handle within a second.
pub async fn idle_worker_wakes_on_enqueue_elsewhere(factory: &dyn StoreFactory) {
    let producer = factory.open().await;
    let q = queue_name();
    let latencies: Arc<Mutex<Vec<i64>>> = Arc::default();
    let l = latencies.clone();
    let mut options = test_worker_options(&q, 2);
    options.poll_interval = Some(Duration::from_secs(5));
    let worker = Worker::new(factory.open().await, options).register(
        "ping",
        handler_fn(move |ctx: JobContext| {
            let l = l.clone();
            async move {
                let sent: i64 = ctx.payload_as()?;
                l.lock().unwrap().push(shoal_backends::now_millis() - sent);
                Ok(())
            }
        }),
    );
    let stop = CancellationToken::new();
    let running = tokio::spawn(worker.run(stop.clone()));
    // Let the worker go idle first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..5 {
        producer
            .enqueue(NewJob::new(&q, "ping", json!(shoal_backends::now_millis())))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_until("five pings run", Duration::from_secs(15), || {
        let l = latencies.clone();
        async move { l.lock().unwrap().len() == 5 }
    })
    .await;
    stop.cancel();
    running.await.unwrap();
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort();
    assert!(
        lat[2] < 1000,
        "median enqueue-to-start {} ms: the wake-up did not arrive ({lat:?})",
        lat[2]
    );
}

/// A batch enqueue answers for each job in order (a unique key already
/// taken answers with the existing job), every created job can be
/// claimed, and a batch with one invalid job enqueues nothing.
pub async fn enqueue_many_answers_each_job(factory: &dyn StoreFactory) {
    let store = factory.open().await;
    let q = queue_name();
    let key = format!("key-{q}");
    let first = store
        .enqueue(NewJob::new(&q, "noop", json!(0)).unique_key(&key))
        .await
        .expect("enqueue");
    let key2 = format!("key2-{q}");
    let batch: Vec<NewJob> = (1..=5)
        .map(|i| NewJob::new(&q, "noop", json!(i)))
        .chain([
            NewJob::new(&q, "noop", json!(6)).unique_key(&key),
            NewJob::new(&q, "noop", json!(7)).unique_key(&key2),
            NewJob::new(&q, "noop", json!(8)).unique_key(&key2),
            NewJob::new(&q, "noop", json!(9)).delay(Duration::from_secs(600)),
        ])
        .collect();
    let out = store.enqueue_many(batch).await.expect("enqueue_many");
    assert_eq!(out.len(), 9, "one answer per job");
    assert!(out[..5].iter().all(|e| e.created), "{out:?}");
    assert_eq!(
        (out[5].id.as_str(), out[5].created),
        (first.id.as_str(), false),
        "a taken unique key answers with the existing job"
    );
    // A key twice in one batch: one job, created once (which of the two
    // creates it is not defined where the default sends them at once).
    assert_eq!(out[6].id, out[7].id, "{out:?}");
    assert!(out[6].created != out[7].created, "{out:?}");
    assert!(out[8].created);
    assert_eq!(
        state_of(&*store, &out[8].id).await,
        Some(JobState::Scheduled),
        "a delayed job in a batch is scheduled"
    );
    for (i, e) in out[..5].iter().enumerate() {
        let job = store.get(&e.id).await.unwrap().expect("stored");
        assert_eq!(
            job.payload,
            json!(i + 1),
            "answers are in the batch's order"
        );
    }
    let mut claimed = Vec::new();
    let started = Instant::now();
    while claimed.len() < 7 && started.elapsed() < Duration::from_secs(10) {
        let got = store
            .claim(&q, 10, Duration::from_secs(30), "w")
            .await
            .unwrap();
        if got.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        claimed.extend(got);
    }
    assert_eq!(
        claimed.len(),
        7,
        "the first job, five new ones and the keyed one"
    );

    let bad = vec![
        NewJob::new(&q, "noop", json!(7)),
        NewJob::new("not a queue name", "noop", json!(8)),
    ];
    assert!(
        store.enqueue_many(bad).await.is_err(),
        "an invalid job fails the batch"
    );
    let stats = store.stats().await.unwrap();
    let s = stats
        .iter()
        .find(|s| s.queue == q)
        .expect("the queue's stats");
    let total =
        s.scheduled + s.available + s.running + s.retrying + s.succeeded + s.dead + s.cancelled;
    assert_eq!(total, 8, "and nothing of it was enqueued: {s:?}");
}
