//! The outbox relay: services enqueue jobs into the SQL store inside their
//! own transactions (so a job exists exactly when the business change
//! commits); the relay moves them to another store, such as NATS JetStream,
//! where the workers run them. It claims outbox jobs like a worker,
//! enqueues each into the target with a unique key derived from the outbox
//! job (its own unique key, else `outbox:<id>`), then completes it. A relay
//! that dies between the two steps re-sends after its lease lapses and the
//! unique key makes the second send return the first job: no duplicates.

use crate::job::{Job, NewJob, QueueError};
use crate::store::JobStore;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Moves jobs of `queues` from `outbox` to `target`, keeping queue names.
#[derive(Debug, Clone)]
pub struct OutboxRelay {
    pub outbox: Arc<dyn JobStore>,
    pub target: Arc<dyn JobStore>,
    pub queues: Vec<String>,
    /// Jobs moved per claim.
    pub batch: usize,
    /// How long a claimed outbox job is the relay's before another relay
    /// may send it again.
    pub lease: Duration,
    pub worker_id: String,
}

impl OutboxRelay {
    pub fn new(outbox: Arc<dyn JobStore>, target: Arc<dyn JobStore>, queues: Vec<String>) -> Self {
        OutboxRelay {
            outbox,
            target,
            queues,
            batch: 100,
            lease: Duration::from_secs(30),
            worker_id: format!("relay-{}", std::process::id()),
        }
    }

    /// The target's copy of an outbox job.
    pub fn target_job(job: &Job) -> NewJob {
        let mut new = NewJob::new(&job.queue, &job.kind, job.payload.clone())
            .priority(job.priority)
            .run_at(job.run_at)
            .max_attempts(job.max_attempts)
            .timeout(Duration::from_millis(job.timeout_ms.max(1) as u64))
            .unique_key(
                job.unique_key
                    .clone()
                    .unwrap_or_else(|| format!("outbox:{}", job.id)),
            );
        new.trace_id = job.trace_id.clone();
        new.traceparent = job.traceparent.clone();
        new
    }

    /// Moves what is ready now; returns how many jobs were sent.
    pub async fn relay_once(&self) -> Result<usize, QueueError> {
        let mut sent = 0;
        for queue in &self.queues {
            loop {
                let jobs = self
                    .outbox
                    .claim(queue, self.batch, self.lease, &self.worker_id)
                    .await?;
                let n = jobs.len();
                for job in jobs {
                    let Some(lease) = job.lease() else { continue };
                    match self.target.enqueue(Self::target_job(&job)).await {
                        Ok(_) => {
                            self.outbox.complete(&lease).await?;
                            sent += 1;
                        }
                        Err(e) => {
                            tracing::warn!(job.id = %job.id, error = %e, "outbox relay cannot send; retrying in 1 s");
                            self.outbox
                                .release(&lease, shoal_backends::now_millis() + 1000)
                                .await?;
                        }
                    }
                }
                if n < self.batch {
                    break;
                }
            }
        }
        Ok(sent)
    }

    /// Relays until `stop` fires, waking on outbox enqueues in this
    /// process and polling otherwise.
    pub async fn run(self, stop: CancellationToken) {
        let wakeups = self.outbox.wakeups();
        let poll = self.outbox.poll_interval();
        loop {
            let notified = wakeups.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Err(e) = self.relay_once().await {
                tracing::warn!(error = %e, "outbox relay failed; retrying");
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(poll) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}
