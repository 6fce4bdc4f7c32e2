//! Where a worker claims its jobs, chosen by `queue.backend`. Services
//! always enqueue into the SQL job store of the context, inside their own
//! transactions, so a job exists exactly when the change that made it
//! commits. With `database` the workers claim from that store; with
//! `nats` it is an outbox: each worker runs an [`OutboxRelay`] that moves
//! committed jobs of its queues into JetStream (at most once per job, by
//! unique key), and claims from JetStream.

use crate::context::AppContext;
use anyhow::Context as _;
use shoal_core::settings::QueueBackend;
use shoal_queue::{JobStore, NatsJobStore, NatsJobStoreOptions, OutboxRelay};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The store a worker claims from, and the relay that feeds it.
#[derive(Debug, Clone)]
pub struct JobBackend {
    pub store: Arc<dyn JobStore>,
    nats: Option<NatsJobStore>,
    relay: Option<OutboxRelay>,
}

impl JobBackend {
    /// Opens the store `queue.backend` names for a worker of `queues`
    /// whose jobs are leased for `lease`.
    pub async fn connect(
        ctx: &AppContext,
        queues: &[String],
        lease: Duration,
    ) -> anyhow::Result<JobBackend> {
        let q = &ctx.settings.queue;
        match q.backend {
            QueueBackend::Database => Ok(JobBackend {
                store: ctx.jobs.clone(),
                nats: None,
                relay: None,
            }),
            QueueBackend::Nats => {
                let url = q
                    .nats_url
                    .as_deref()
                    .context("queue.nats_url is required for the nats queue backend")?;
                let nats = connect_nats(url, &q.nats_prefix, lease).await?;
                let relay = OutboxRelay {
                    worker_id: format!("relay-{}", ctx.instance),
                    ..OutboxRelay::new(ctx.jobs.clone(), Arc::new(nats.clone()), queues.to_vec())
                };
                Ok(JobBackend {
                    store: Arc::new(nats.clone()),
                    nats: Some(nats),
                    relay: Some(relay),
                })
            }
        }
    }

    /// The JetStream store, with `queue.backend = "nats"`.
    pub fn nats(&self) -> Option<&NatsJobStore> {
        self.nats.as_ref()
    }

    /// Runs the outbox relay, if this backend has one, until `stop`.
    pub fn spawn_relay(&self, stop: CancellationToken) {
        if let Some(relay) = self.relay.clone() {
            tokio::spawn(relay.run(stop));
        }
    }

    /// Whether jobs can be claimed now: the database answers (it holds the
    /// jobs, or the outbox), and JetStream too when it runs them. Each
    /// check is bounded by `limit`.
    pub async fn ready(&self, ctx: &AppContext, limit: Duration) -> Result<(), &'static str> {
        if !tokio::time::timeout(limit, ctx.db.ping())
            .await
            .unwrap_or(false)
        {
            return Err("the database does not answer");
        }
        if let Some(nats) = &self.nats {
            if !tokio::time::timeout(limit, nats.ping())
                .await
                .unwrap_or(false)
            {
                return Err("NATS JetStream does not answer");
            }
        }
        Ok(())
    }
}

/// The JetStream job store of `queue.nats_url` (for workers and `shoal
/// jobs`), its redelivery set to `lease`.
pub async fn connect_nats(
    url: &str,
    prefix: &str,
    lease: Duration,
) -> anyhow::Result<NatsJobStore> {
    NatsJobStore::connect(
        url,
        NatsJobStoreOptions {
            prefix: prefix.to_string(),
            ack_wait: lease,
            ..NatsJobStoreOptions::default()
        },
    )
    .await
    .with_context(|| format!("connecting to NATS JetStream at {url} for the job queue"))
}

/// Registers a housekeeping job on `worker`: `kind` enqueued on `queue` by
/// the cron `schedule` (named `name`), running `run` with the context;
/// an error is retried. A schedule that does not parse is logged and the
/// job left unscheduled (the handler is still registered).
pub fn housekeeping<F, Fut, E>(
    worker: shoal_queue::Worker,
    ctx: &AppContext,
    name: &str,
    schedule: &str,
    queue: &str,
    kind: &'static str,
    run: F,
) -> shoal_queue::Worker
where
    F: Fn(AppContext) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<u64, E>> + Send + 'static,
    E: std::fmt::Display,
{
    let worker = worker.register(kind, {
        let ctx = ctx.clone();
        let run = Arc::new(run);
        shoal_queue::handler_fn(move |_job| {
            let (ctx, run) = (ctx.clone(), Arc::clone(&run));
            async move {
                run(ctx)
                    .await
                    .map(|_| ())
                    .map_err(shoal_queue::JobError::retryable)
            }
        })
    });
    let job = shoal_queue::NewJob::new(queue, kind, serde_json::json!({}));
    match shoal_queue::Schedule::new(name, schedule, job) {
        Ok(schedule) => worker.schedule(schedule),
        Err(e) => {
            tracing::error!(error = %e, schedule = name, "housekeeping schedule is invalid");
            worker
        }
    }
}
