//! A job-queue benchmark the `shoal` binary (and `bench/`) call: enqueue
//! throughput, drain (claim + run + complete) throughput, and the latency
//! from enqueue to handler start on an idle worker (which is what
//! LISTEN/NOTIFY or polling decide).

use crate::job::JobError;
use crate::job::NewJob;
use crate::store::JobStore;
use crate::worker::{handler_fn, JobContext, JobHandler, Worker, WorkerOptions};
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// What [`bench`] measured.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BenchReport {
    pub backend: String,
    pub jobs: usize,
    pub concurrency: usize,
    /// Jobs stored per second, enqueued in batches of 1,000 (`enqueue_many`).
    pub enqueue_per_sec: f64,
    /// Jobs claimed, run (no-op handler) and completed per second by one
    /// worker with `concurrency` slots draining a backlog of `jobs`.
    pub complete_per_sec: f64,
    /// Enqueue-to-start latency of jobs enqueued one at a time onto an
    /// idle worker, in milliseconds.
    pub latency_samples: usize,
    pub p50_enqueue_to_start_ms: f64,
    pub p99_enqueue_to_start_ms: f64,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "backend={} jobs={} concurrency={} enqueue/s={:.0} complete/s={:.0} \
             enqueue-to-start p50={:.1}ms p99={:.1}ms (n={})",
            self.backend,
            self.jobs,
            self.concurrency,
            self.enqueue_per_sec,
            self.complete_per_sec,
            self.p50_enqueue_to_start_ms,
            self.p99_enqueue_to_start_ms,
            self.latency_samples
        )
    }
}

/// Runs the three phases on a fresh queue of `store` and returns the
/// numbers. Leaves the finished jobs behind (prune removes them).
pub async fn bench(store: Arc<dyn JobStore>, jobs: usize, concurrency: usize) -> BenchReport {
    bench_via(store, jobs, concurrency, None::<NoOp>).await
}

/// The in-process handler of [`bench`] (never called: `bench` passes no
/// queue handler).
struct NoOp;

#[async_trait::async_trait]
impl JobHandler for NoOp {
    async fn run(&self, _ctx: JobContext) -> Result<(), JobError> {
        Ok(())
    }
}

/// As [`bench`], with every job of the queue run by `via` when given
/// (push delivery: each job POSTed to an endpoint) in place of the
/// in-process no-op handlers. The latency is then from enqueue until
/// `via` returns (the endpoint's answer), not until it starts.
pub async fn bench_via<H: JobHandler>(
    store: Arc<dyn JobStore>,
    jobs: usize,
    concurrency: usize,
    via: Option<H>,
) -> BenchReport {
    let concurrency = concurrency.max(1);
    let jobs = jobs.max(1);
    let queue = format!("bench{}", &shoal_core::ids::new_id()[24..]);

    // 1. Enqueue throughput: batches of 1,000, one after another, as the
    // peers in bench/queue.sh add theirs (BullMQ `addBulk`,
    // graphile-worker `add_jobs`).
    let started = Instant::now();
    let mut next = 0usize;
    while next < jobs {
        let end = (next + 1000).min(jobs);
        let batch = (next..end)
            .map(|i| NewJob::new(&queue, "noop", json!(i)))
            .collect();
        if let Err(e) = store.enqueue_many(batch).await {
            tracing::warn!(error = %e, "bench enqueue failed");
        }
        next = end;
    }
    let enqueue_per_sec = jobs as f64 / started.elapsed().as_secs_f64();

    // 2. Drain throughput, then 3. latency on the now idle worker.
    let latencies: Arc<Mutex<Vec<f64>>> = Arc::default();
    let lat = latencies.clone();
    let options = WorkerOptions {
        queues: vec![(queue.clone(), concurrency)],
        retention: None,
        ..WorkerOptions::default()
    };
    let worker = Worker::new(store.clone(), options).register(
        "latency",
        handler_fn(move |ctx: JobContext| {
            let lat = lat.clone();
            async move {
                let sent: i64 = ctx.payload_as()?;
                let ms = (shoal_backends::now_millis() - sent).max(0) as f64;
                lat.lock().unwrap_or_else(|p| p.into_inner()).push(ms);
                Ok(())
            }
        }),
    );
    let mut worker = worker.register("noop", handler_fn(|_ctx: JobContext| async { Ok(()) }));
    if let Some(via) = via {
        let lat = latencies.clone();
        worker = worker.register_queue(
            &queue,
            Timed { inner: via, lat },
            crate::worker::KindOptions::default(),
        );
    }
    // Counted when the store has recorded the completion, not when the
    // handler returns.
    let progress = worker.progress();
    let stop = CancellationToken::new();
    let started = Instant::now();
    let running = tokio::spawn(worker.run(stop.clone()));
    let deadline = started + Duration::from_secs(600);
    while (progress.report().succeeded as usize) < jobs && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let complete_per_sec = if progress.report().succeeded as usize >= jobs {
        jobs as f64 / started.elapsed().as_secs_f64()
    } else {
        0.0
    };

    let samples = (jobs / 10).clamp(20, 200);
    for _ in 0..samples {
        let job = NewJob::new(&queue, "latency", json!(shoal_backends::now_millis()));
        let _ = store.enqueue(job).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while latencies.lock().unwrap_or_else(|p| p.into_inner()).len() < samples
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    let _ = running.await;
    let mut lat = latencies.lock().unwrap_or_else(|p| p.into_inner()).clone();
    lat.sort_by(f64::total_cmp);
    BenchReport {
        backend: store.backend_name().to_string(),
        jobs,
        concurrency,
        enqueue_per_sec,
        complete_per_sec,
        latency_samples: lat.len(),
        p50_enqueue_to_start_ms: percentile(&lat, 0.50),
        p99_enqueue_to_start_ms: percentile(&lat, 0.99),
    }
}

/// Runs `inner`, and for a `latency` job records the milliseconds from
/// its enqueue until `inner` returned.
struct Timed<H> {
    inner: H,
    lat: Arc<Mutex<Vec<f64>>>,
}

#[async_trait::async_trait]
impl<H: JobHandler> JobHandler for Timed<H> {
    async fn run(&self, ctx: JobContext) -> Result<(), JobError> {
        let sent = (ctx.job().kind == "latency")
            .then(|| ctx.payload_as::<i64>().ok())
            .flatten();
        self.inner.run(ctx).await?;
        if let Some(sent) = sent {
            let ms = (shoal_backends::now_millis() - sent).max(0) as f64;
            self.lat.lock().unwrap_or_else(|p| p.into_inner()).push(ms);
        }
        Ok(())
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
