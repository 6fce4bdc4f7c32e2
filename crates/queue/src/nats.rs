//! `NatsJobStore`: jobs on NATS JetStream. Each job's record lives in a
//! key-value bucket (`<prefix>_jobs`, updated with compare-and-set on the
//! revision, so concurrent workers never both win a state change); a
//! work-queue stream (`<prefix>_JOBS`, subjects `<prefix>.jobs.<queue>`)
//! carries job ids to one durable pull consumer per queue with explicit
//! acks. A message also carries its job's record as the enqueue wrote it,
//! with that write's revision (when the record is small), and a claimed
//! attempt remembers the record and revision it last wrote: the usual
//! claim and completion are then one compare-and-set each, with no read
//! first; a record that changed since fails the compare-and-set and is
//! read again. JetStream redelivers a message whose ack wait lapses (a dead
//! worker); running workers send in-progress acks with each heartbeat;
//! retries are NAKs with a delay; dead letters are terminated messages
//! whose records stay in the bucket. Unique keys are `create`s in a second
//! bucket (`<prefix>_job_keys`), so they hold as long as the job exists.
//!
//! Differences from the SQL store: no priorities (stream order), no
//! transactions (use the outbox relay), listing and stats read every record.

use crate::job::{
    AttemptError, Enqueued, Job, JobFilter, JobState, Lease, NewJob, QueueError, QueueGauges,
    QueueStats,
};
use crate::store::JobStore;
use async_nats::jetstream::{self, consumer::pull, kv, AckKind};
use async_trait::async_trait;
use futures_util::StreamExt;
use serde_json::Value;
use sha2::{Digest, Sha256};
use shoal_backends::now_millis;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// How a [`NatsJobStore`] names and configures its JetStream objects.
#[derive(Debug, Clone)]
pub struct NatsJobStoreOptions {
    /// Names the stream, buckets and subjects (`[A-Za-z0-9_-]`).
    pub prefix: String,
    /// JetStream redelivers a message this long after its last (progress)
    /// ack: set it to the workers' lease.
    pub ack_wait: Duration,
    /// Safety bound on deliveries of one message; attempts themselves are
    /// counted in the job record.
    pub max_deliver: i64,
    pub poll_interval: Duration,
    /// JetStream drops a second message with the same id within this
    /// window; an enqueue that failed midway is settled within it.
    pub duplicate_window: Duration,
}

impl Default for NatsJobStoreOptions {
    fn default() -> Self {
        NatsJobStoreOptions {
            prefix: "shoal".into(),
            ack_wait: Duration::from_secs(30),
            max_deliver: 10_000,
            poll_interval: Duration::from_millis(100),
            duplicate_window: Duration::from_secs(120),
        }
    }
}

/// Jobs on NATS JetStream. Cheap to clone.
#[derive(Clone)]
pub struct NatsJobStore {
    js: jetstream::Context,
    stream: jetstream::stream::Stream,
    jobs: kv::Store,
    keys: kv::Store,
    options: NatsJobStoreOptions,
    consumers:
        Arc<tokio::sync::Mutex<HashMap<String, jetstream::consumer::Consumer<pull::Config>>>>,
    /// Attempts claimed through this handle, by lease token.
    inflight: Arc<Mutex<HashMap<String, InFlight>>>,
    wakeups: Arc<Notify>,
    /// Enqueues that failed midway, waiting to be settled by one background
    /// task (see [`NatsJobStore::after_failed_enqueue`]).
    unsettled: Arc<Mutex<Unsettled>>,
}

/// A claimed attempt: its message (to ack), and its record as this handle
/// last wrote it, with that write's revision.
struct InFlight {
    msg: jetstream::Message,
    known: (Job, u64),
}

/// A record and its revision as last seen, not yet checked against the
/// bucket: a compare-and-set from it fails if the record changed since.
type Known = Option<(Job, u64)>;

/// A message carries its job's record (with the revision of the write that
/// stored it) when the record is at most this big; bigger records are
/// read at claim time.
const CARRY_MAX: usize = 8 * 1024;

/// What a job message carries beside the id-only form: the record as
/// enqueued and that write's revision.
#[derive(serde::Deserialize)]
struct Carried {
    rev: u64,
    job: Job,
}

/// A job message's payload: the id alone, or `{"rev":R,"job":RECORD}`.
fn message_payload(id: &str, record: Option<(&[u8], u64)>) -> Vec<u8> {
    match record {
        Some((bytes, rev)) if bytes.len() <= CARRY_MAX => {
            let mut out = Vec::with_capacity(bytes.len() + 32);
            out.extend_from_slice(format!("{{\"rev\":{rev},\"job\":").as_bytes());
            out.extend_from_slice(bytes);
            out.push(b'}');
            out
        }
        _ => id.as_bytes().to_vec(),
    }
}

/// Reads a job message's payload: the job id, and the record it carries.
fn read_payload(payload: &[u8]) -> Result<(String, Known), QueueError> {
    if payload.first() == Some(&b'{') {
        let carried: Carried = serde_json::from_slice(payload)?;
        return Ok((carried.job.id.clone(), Some((carried.job, carried.rev))));
    }
    Ok((String::from_utf8_lossy(payload).into_owned(), None))
}

/// Failed enqueues to settle, each with its deadline, and whether the task
/// that settles them is running.
#[derive(Default)]
struct Unsettled {
    records: std::collections::VecDeque<(Job, tokio::time::Instant)>,
    settling: bool,
}

impl std::fmt::Debug for NatsJobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsJobStore")
            .field("options", &self.options)
            .finish()
    }
}

fn nats(e: impl std::fmt::Display) -> QueueError {
    QueueError::Nats(e.to_string())
}

fn key_hash(key: &str) -> String {
    shoal_core::ids::hex(&Sha256::digest(key.as_bytes()))
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

fn until(at: i64, now: i64) -> Duration {
    Duration::from_millis((at - now).max(0) as u64)
}

/// How long a claim waits for the next message (or the end) of its pull
/// request before giving up on it.
const FETCH_REPLY_WAIT: Duration = Duration::from_secs(3);

/// What a claim decided for one delivered message.
enum Delivery {
    Claimed,
    Drop,
    Later(Duration),
    Dead,
}

impl NatsJobStore {
    /// Connects to `url` and creates (or opens) the stream and buckets.
    pub async fn connect(url: &str, options: NatsJobStoreOptions) -> Result<Self, QueueError> {
        if options.prefix.is_empty()
            || !options
                .prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(QueueError::InvalidJob(
                "NATS prefix must be [A-Za-z0-9_-]+".into(),
            ));
        }
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .map_err(nats)?;
        let js = jetstream::new(client);
        let p = &options.prefix;
        let stream = js
            .get_or_create_stream(jetstream::stream::Config {
                name: format!("{p}_JOBS"),
                subjects: vec![format!("{p}.jobs.>")],
                retention: jetstream::stream::RetentionPolicy::WorkQueue,
                storage: jetstream::stream::StorageType::File,
                duplicate_window: options.duplicate_window,
                ..Default::default()
            })
            .await
            .map_err(|e| nats(format!("stream {p}_JOBS: {e}")))?;
        let jobs = open_bucket(&js, &format!("{p}_jobs")).await?;
        let keys = open_bucket(&js, &format!("{p}_job_keys")).await?;
        Ok(NatsJobStore {
            js,
            stream,
            jobs,
            keys,
            options,
            consumers: Arc::default(),
            inflight: Arc::default(),
            wakeups: Arc::new(Notify::new()),
            unsettled: Arc::default(),
        })
    }

    /// Whether the NATS server answers now: connected, and a PING gets
    /// its PONG (for readiness; bound it with a timeout).
    pub async fn ping(&self) -> bool {
        let client = self.js.client();
        client.connection_state() == async_nats::connection::State::Connected
            && client.flush().await.is_ok()
    }

    /// Deletes this prefix's stream and buckets, with every job in them
    /// (tests use it to clean up).
    pub async fn delete_everything(&self) -> Result<(), QueueError> {
        let p = &self.options.prefix;
        self.js
            .delete_stream(format!("{p}_JOBS"))
            .await
            .map_err(nats)?;
        for bucket in [format!("{p}_jobs"), format!("{p}_job_keys")] {
            self.js
                .delete_stream(format!("KV_{bucket}"))
                .await
                .map_err(nats)?;
        }
        Ok(())
    }

    fn subject(&self, queue: &str) -> String {
        format!("{}.jobs.{queue}", self.options.prefix)
    }

    async fn consumer(
        &self,
        queue: &str,
    ) -> Result<jetstream::consumer::Consumer<pull::Config>, QueueError> {
        let mut consumers = self.consumers.lock().await;
        if let Some(c) = consumers.get(queue) {
            return Ok(c.clone());
        }
        let name = format!("{}_{}", self.options.prefix, queue.replace('.', "_2e_"));
        let consumer = self
            .stream
            .get_or_create_consumer(
                &name,
                pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: self.subject(queue),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: self.options.ack_wait,
                    max_deliver: self.options.max_deliver,
                    max_ack_pending: 100_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(nats)?;
        consumers.insert(queue.to_string(), consumer.clone());
        Ok(consumer)
    }

    /// Sends the message that carries job `id`. `message_id` names this
    /// send for JetStream's duplicate window (`duplicate_window`): a
    /// second send under the same name within it is dropped by the server,
    /// so an enqueue whose answer was lost can be sent again safely.
    /// `record` is the job's record as stored and its revision, to carry
    /// along (see [`CARRY_MAX`]).
    async fn publish(
        &self,
        queue: &str,
        id: &str,
        message_id: &str,
        record: Option<(&[u8], u64)>,
    ) -> Result<(), QueueError> {
        self.js
            .send_publish(
                self.subject(queue),
                jetstream::message::PublishMessage::build()
                    .payload(message_payload(id, record).into())
                    .message_id(message_id),
            )
            .await
            .map_err(nats)?
            .await
            .map_err(nats)?;
        Ok(())
    }

    async fn read(&self, id: &str) -> Result<Option<(Job, u64)>, QueueError> {
        let Some(entry) = self.jobs.entry(id).await.map_err(nats)? else {
            return Ok(None);
        };
        if entry.operation != kv::Operation::Put {
            return Ok(None);
        }
        Ok(Some((
            serde_json::from_slice(&entry.value)?,
            entry.revision,
        )))
    }

    /// Applies `change` to the job record with compare-and-set, re-reading
    /// on conflicts. `change` returns false to leave the record alone.
    /// Returns the new record, or `None` when unknown or left alone.
    async fn modify<F>(&self, id: &str, change: F) -> Result<Option<Job>, QueueError>
    where
        F: FnMut(&mut Job) -> bool,
    {
        Ok(self
            .modify_from(id, None, change)
            .await?
            .map(|(job, _)| job))
    }

    /// [`NatsJobStore::modify`] starting from `known`, a record and revision
    /// seen earlier, instead of a read: one compare-and-set when the record
    /// has not changed since. Anything `known` leads to (a failed
    /// compare-and-set, or `change` declining a record that may be stale) is
    /// decided again on a fresh read. Returns the new record and revision.
    async fn modify_from<F>(
        &self,
        id: &str,
        mut known: Known,
        mut change: F,
    ) -> Result<Option<(Job, u64)>, QueueError>
    where
        F: FnMut(&mut Job) -> bool,
    {
        for _ in 0..20 {
            let unchecked = known.is_some();
            let (mut job, revision) = match known.take() {
                Some(k) => k,
                None => match self.read(id).await? {
                    Some(found) => found,
                    None => return Ok(None),
                },
            };
            if !change(&mut job) {
                if unchecked {
                    continue;
                }
                return Ok(None);
            }
            let bytes = serde_json::to_vec(&job)?;
            match self.jobs.update(id, bytes.into(), revision).await {
                Ok(revision) => return Ok(Some((job, revision))),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(nats(e)),
            }
        }
        Err(QueueError::Nats(format!(
            "job {id}: too many concurrent updates"
        )))
    }

    /// Claims the job of one delivered message, or settles the message
    /// (drop, later, dead) when its job cannot run now.
    async fn claim_message(
        &self,
        msg: jetstream::Message,
        queue: &str,
        lease: Duration,
        worker_id: &str,
    ) -> Result<Option<Job>, QueueError> {
        let (id, carried) = match read_payload(&msg.payload) {
            Ok(read) => read,
            Err(e) => {
                tracing::error!(queue, error = %e, "dropping a job message that cannot be read");
                let _ = msg.ack_with(AckKind::Term).await;
                return Ok(None);
            }
        };
        let now = now_millis();
        let token = shoal_core::ids::new_id();
        let mut decision = Delivery::Drop;
        let changed = self
            .modify_from(&id, carried, |job| {
                decision = match job.state {
                    s if s.is_finished() => Delivery::Drop,
                    JobState::Running if job.lease_until.unwrap_or(0) >= now => {
                        Delivery::Later(until(job.lease_until.unwrap_or(now), now))
                    }
                    _ if job.run_at > now => Delivery::Later(until(job.run_at, now)),
                    JobState::Running if job.attempts >= job.max_attempts => Delivery::Dead,
                    _ => Delivery::Claimed,
                };
                let was_running = job.state == JobState::Running;
                if was_running && !matches!(decision, Delivery::Drop | Delivery::Later(_)) {
                    let at = job.lease_until.unwrap_or(now);
                    let who = job.worker_id.clone().unwrap_or_else(|| "?".into());
                    let attempt = job.attempts;
                    push_error(
                        job,
                        attempt,
                        at,
                        format!("lease expired: worker {who} stopped renewing it"),
                    );
                }
                match decision {
                    Delivery::Claimed => {
                        job.state = JobState::Running;
                        job.attempts += 1;
                        job.lease_token = Some(token.clone());
                        job.lease_until = Some(now + ms(lease));
                        job.worker_id = Some(worker_id.to_string());
                        job.started_at = Some(now);
                        true
                    }
                    Delivery::Dead => {
                        job.state = JobState::Dead;
                        job.finished_at = Some(now);
                        job.lease_token = None;
                        job.lease_until = None;
                        true
                    }
                    Delivery::Drop | Delivery::Later(_) => false,
                }
            })
            .await?;
        match (decision, changed) {
            (Delivery::Claimed, Some((job, revision))) => {
                let claimed = visible(job.clone(), now);
                self.inflight
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(
                        token,
                        InFlight {
                            msg,
                            known: (job, revision),
                        },
                    );
                return Ok(Some(claimed));
            }
            (Delivery::Dead, Some(_)) => {
                metrics::counter!("shoal_jobs_dead_total", "queue" => queue.to_string())
                    .increment(1);
                let _ = msg.ack_with(AckKind::Term).await;
            }
            (Delivery::Later(wait), _) => {
                let _ = msg.ack_with(AckKind::Nak(Some(wait))).await;
            }
            _ => {
                let _ = msg.ack_with(AckKind::Term).await;
            }
        }
        Ok(None)
    }

    fn take_message(&self, token: &str) -> Option<jetstream::Message> {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(token)
            .map(|f| f.msg)
    }

    /// The record and revision this handle last wrote for an attempt.
    fn known(&self, token: &str) -> Known {
        self.inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .map(|f| f.known.clone())
    }

    /// Applies `change` to the record of the attempt `lease` (starting from
    /// what this handle last wrote for it) and remembers the result.
    async fn modify_attempt<F>(&self, lease: &Lease, change: F) -> Result<Option<Job>, QueueError>
    where
        F: FnMut(&mut Job) -> bool,
    {
        let known = self.known(&lease.token);
        let Some((job, revision)) = self.modify_from(&lease.job_id, known, change).await? else {
            return Ok(None);
        };
        if let Some(f) = self
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&lease.token)
        {
            f.known = (job.clone(), revision);
        }
        Ok(Some(job))
    }

    async fn ack(&self, token: &str, kind: AckKind) {
        if let Some(msg) = self.take_message(token) {
            if let Err(e) = msg.ack_with(kind).await {
                tracing::debug!(error = %e, "job message ack failed; JetStream redelivers it");
            }
        }
    }

    async fn all_jobs(&self) -> Result<Vec<Job>, QueueError> {
        // The keys as the server holds them now: the subjects of the
        // bucket's stream, from its info. Not `Store::keys`, a consumer
        // of each key's last record, which missed a job whose record was
        // replaced while it ran (the bucket keeps one record per key, so
        // the one it had yet to deliver was gone; seen in CI:
        // `checkout_through_nats_...` listed two charge jobs of three,
        // the one being retried missing) and listed twice a job whose
        // record was written meanwhile.
        let prefix = &self.jobs.prefix;
        let mut subjects = self
            .jobs
            .stream
            .info_with_subjects(format!("{prefix}>"))
            .await
            .map_err(nats)?;
        let mut names = Vec::new();
        while let Some(item) = subjects.next().await {
            let (subject, _) = item.map_err(nats)?;
            if let Some(key) = subject.strip_prefix(prefix.as_str()) {
                names.push(key.to_string());
            }
        }
        // A stream's subjects are distinct: sorted only, for a stable order.
        names.sort_unstable();
        let mut jobs = Vec::with_capacity(names.len());
        for name in names {
            if let Some((job, _)) = self.read(&name).await? {
                jobs.push(job);
            }
        }
        Ok(jobs)
    }

    /// Writes a new job's record, then sends its message. Every send of a
    /// job's first message comes after its record is written, so a claim
    /// never meets a message whose record is still to come.
    /// True when this call wrote the record: of several enqueues racing on
    /// one unique key, only that one reports the job as created.
    async fn store_and_send(&self, record: &Job) -> Result<bool, QueueError> {
        // Shared, not copied, between the record and the message.
        let bytes = bytes::Bytes::from(serde_json::to_vec(record)?);
        let revision = match self.jobs.create(&record.id, bytes.clone()).await {
            Ok(revision) => Some(revision),
            // Only a unique key leads two writers to one id: a retry of a
            // failed enqueue, or the background settling of one. Which
            // revision is stored is not known here: send the id alone.
            Err(e)
                if e.kind() == kv::CreateErrorKind::AlreadyExists
                    && record.unique_key.is_some() =>
            {
                None
            }
            Err(e) => return Err(nats(e)),
        };
        let carried = revision.map(|r| (&bytes[..], r));
        self.publish(&record.queue, &record.id, &record.id, carried)
            .await?;
        Ok(revision.is_some())
    }

    /// Settles an enqueue that wrote its record but could not confirm its
    /// message (the server went away in between, or the answer was lost),
    /// in the background, for as long as JetStream's duplicate window lasts.
    ///
    /// With a unique key the job is kept and its message sent again until
    /// the server takes it: the caller's retry with the same key finds the
    /// same job, so either way it runs once. Without one, nobody else knows
    /// the id and the caller was told it failed (and will likely enqueue
    /// again), so the record is taken back; a message that did arrive finds
    /// no record and is dropped.
    ///
    /// One task per store settles them in order, so an outage that fails
    /// many enqueues leaves one task (not one per enqueue) retrying, and
    /// the server is not hit by all of them at once when it comes back.
    fn after_failed_enqueue(&self, record: Job) {
        let deadline = tokio::time::Instant::now() + self.options.duplicate_window.mul_f32(0.9);
        {
            let mut unsettled = self.unsettled.lock().unwrap_or_else(|p| p.into_inner());
            unsettled.records.push_back((record, deadline));
            if unsettled.settling {
                return;
            }
            unsettled.settling = true;
        }
        let store = self.clone();
        tokio::spawn(async move { store.settle_failed_enqueues().await });
    }

    async fn settle_failed_enqueues(&self) {
        loop {
            let next = {
                let mut unsettled = self.unsettled.lock().unwrap_or_else(|p| p.into_inner());
                let next = unsettled.records.pop_front();
                if next.is_none() {
                    unsettled.settling = false;
                }
                next
            };
            let Some((record, deadline)) = next else {
                return;
            };
            if tokio::time::Instant::now() >= deadline {
                tracing::error!(job_id = %record.id,
                    "could not settle a job whose enqueue failed midway; it may never run");
                continue;
            }
            let settled = if record.unique_key.is_some() {
                self.store_and_send(&record).await.is_ok()
            } else {
                self.jobs.purge(&record.id).await.is_ok()
            };
            if settled {
                tracing::info!(job_id = %record.id, kept = record.unique_key.is_some(),
                    "settled a job whose enqueue failed midway");
            } else {
                // The server is still away: try again later, in order.
                self.unsettled
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .records
                    .push_front((record, deadline));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    async fn forget_unique_key(&self, job: &Job) {
        if let Some(key) = &job.unique_key {
            let _ = self.keys.purge(key_hash(key)).await;
        }
    }
}

async fn open_bucket(js: &jetstream::Context, bucket: &str) -> Result<kv::Store, QueueError> {
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    // The key-value stream, created by hand with the KV conventions:
    // `create_key_value` of this client cannot parse a 2.9 server's answer.
    js.get_or_create_stream(jetstream::stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        discard: jetstream::stream::DiscardPolicy::New,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| nats(format!("bucket {bucket}: {e}")))?;
    js.get_key_value(bucket)
        .await
        .map_err(|e| nats(format!("bucket {bucket}: {e}")))
}

fn visible(mut job: Job, now: i64) -> Job {
    if job.state == JobState::Scheduled && job.run_at <= now {
        job.state = JobState::Available;
    }
    job
}

fn push_error(job: &mut Job, attempt: i64, at: i64, error: String) {
    job.last_error = Some(error.clone());
    job.errors.push(AttemptError { attempt, at, error });
}

#[async_trait]
impl JobStore for NatsJobStore {
    async fn enqueue(&self, mut job: NewJob) -> Result<Enqueued, QueueError> {
        job.validate()?;
        let span = crate::job::enqueue_span(&mut job);
        let now = now_millis();
        let mut id = shoal_core::ids::new_id();
        if let Some(key) = &job.unique_key {
            match self.keys.create(key_hash(key), id.clone().into()).await {
                Ok(_) => {}
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    let existing = self.keys.get(key_hash(key)).await.map_err(nats)?;
                    let existing = existing
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .ok_or_else(|| QueueError::Nats("unique key vanished".into()))?;
                    match self.read(&existing).await? {
                        Some((found, _)) => {
                            // An earlier enqueue of this key may have failed
                            // after it wrote the record and before its
                            // message reached the stream (the server went
                            // away). Send the message again: JetStream drops
                            // it as a duplicate if the first one arrived,
                            // and a claim ignores a message for a job that
                            // is already claimed or finished.
                            // (Past the duplicate window a second message
                            // does reach the stream; the claim that meets
                            // it finds the job taken and drops it.)
                            if found.attempts == 0
                                && matches!(found.state, JobState::Available | JobState::Scheduled)
                            {
                                self.publish(&found.queue, &existing, &existing, None)
                                    .await?;
                            }
                            return Ok(Enqueued {
                                id: existing,
                                created: false,
                            });
                        }
                        // The key outlived an enqueue that failed before its
                        // record was written, or a concurrent enqueue of the
                        // same key is writing it now: finish that enqueue
                        // under the same id (both writers agree on it; the
                        // one whose record write lands reports it created).
                        None => id = existing,
                    }
                }
                Err(e) => return Err(nats(e)),
            }
        }
        let run_at = job.run_at.unwrap_or(now);
        let record = Job {
            id: id.clone(),
            queue: job.queue.clone(),
            kind: job.kind,
            payload: job.payload,
            priority: job.priority,
            state: if run_at > now {
                JobState::Scheduled
            } else {
                JobState::Available
            },
            run_at,
            attempts: 0,
            max_attempts: job.max_attempts,
            unique_key: job.unique_key,
            timeout_ms: ms(job.timeout),
            trace_id: job.trace_id.or_else(shoal_core::trace::current),
            traceparent: job.traceparent,
            progress: None,
            last_error: None,
            errors: Vec::new(),
            lease_token: None,
            lease_until: None,
            worker_id: None,
            created_at: now,
            started_at: None,
            finished_at: None,
        };
        let created = match self.store_and_send(&record).await {
            Ok(created) => created,
            Err(e) => {
                self.after_failed_enqueue(record);
                return Err(e);
            }
        };
        if let Some(span) = span {
            span.end();
        }
        if created {
            metrics::counter!("shoal_jobs_enqueued_total", "queue" => job.queue).increment(1);
        }
        self.wakeups.notify_waiters();
        Ok(Enqueued { id, created })
    }

    async fn claim(
        &self,
        queue: &str,
        max: usize,
        lease: Duration,
        worker_id: &str,
    ) -> Result<Vec<Job>, QueueError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let consumer = self.consumer(queue).await?;
        let mut batch = consumer
            .fetch()
            .max_messages(max)
            .messages()
            .await
            .map_err(nats)?;
        let mut messages = Vec::new();
        loop {
            // A pull request lost with its connection (the server restarted
            // while it was pending) is never answered, and this client's
            // `fetch` has no expiry: without a bound the claim, and the
            // worker's queue loop with it, would wait forever. Messages
            // delivered after we stop listening are redelivered after
            // `ack_wait`.
            let msg = match tokio::time::timeout(FETCH_REPLY_WAIT, batch.next()).await {
                Ok(Some(msg)) => msg,
                Ok(None) => break,
                Err(_elapsed) if messages.is_empty() => {
                    return Err(QueueError::Nats(format!(
                        "no reply to the pull request for queue {queue} within {FETCH_REPLY_WAIT:?}"
                    )))
                }
                Err(_elapsed) => break,
            };
            messages.push(msg.map_err(nats)?);
        }
        // Each message needs a read and a compare-and-set of its job
        // record: do them side by side, not one after another.
        let attempts = messages
            .into_iter()
            .map(|msg| self.claim_message(msg, queue, lease, worker_id));
        let mut claimed = Vec::new();
        let mut failed = None;
        for job in futures_util::future::join_all(attempts).await {
            match job {
                Ok(Some(job)) => claimed.push(job),
                Ok(None) => {}
                // Its message is redelivered after `ack_wait`.
                Err(e) => failed = Some(e),
            }
        }
        match failed {
            Some(e) if claimed.is_empty() => Err(e),
            Some(e) => {
                tracing::warn!(queue, error = %e, "claiming one job failed; it is delivered again later");
                Ok(claimed)
            }
            None => Ok(claimed),
        }
    }

    async fn heartbeat(
        &self,
        lease: &Lease,
        extend: Duration,
        progress: Option<&Value>,
    ) -> Result<bool, QueueError> {
        let now = now_millis();
        let renewed = self
            .modify_attempt(lease, |job| {
                if job.state != JobState::Running
                    || job.lease_token.as_deref() != Some(&lease.token)
                {
                    return false;
                }
                job.lease_until = Some(now + ms(extend));
                if let Some(p) = progress {
                    job.progress = Some(p.clone());
                }
                true
            })
            .await?;
        if renewed.is_none() {
            self.take_message(&lease.token);
            return Ok(false);
        }
        let msg = self
            .inflight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&lease.token)
            .map(|f| f.msg.clone());
        if let Some(msg) = msg {
            let _ = msg.ack_with(AckKind::Progress).await;
        }
        Ok(true)
    }

    async fn complete(&self, lease: &Lease) -> Result<bool, QueueError> {
        let now = now_millis();
        let done = self
            .modify_attempt(lease, |job| {
                if job.state != JobState::Running
                    || job.lease_token.as_deref() != Some(&lease.token)
                {
                    return false;
                }
                job.state = JobState::Succeeded;
                job.finished_at = Some(now);
                job.lease_token = None;
                job.lease_until = None;
                true
            })
            .await?;
        self.ack(&lease.token, AckKind::Ack).await;
        Ok(done.is_some())
    }

    async fn fail(
        &self,
        lease: &Lease,
        error: &str,
        retry_at: Option<i64>,
    ) -> Result<bool, QueueError> {
        let now = now_millis();
        let done = self
            .modify_attempt(lease, |job| {
                if job.state != JobState::Running
                    || job.lease_token.as_deref() != Some(&lease.token)
                {
                    return false;
                }
                push_error(job, lease.attempt, now, error.chars().take(4000).collect());
                match retry_at {
                    Some(at) => {
                        job.state = JobState::Retrying;
                        job.run_at = at;
                    }
                    None => {
                        job.state = JobState::Dead;
                        job.finished_at = Some(now);
                    }
                }
                job.lease_token = None;
                job.lease_until = None;
                true
            })
            .await?;
        if done.is_some() {
            let kind = match retry_at {
                Some(at) => AckKind::Nak(Some(until(at, now))),
                None => AckKind::Term,
            };
            self.ack(&lease.token, kind).await;
        }
        Ok(done.is_some())
    }

    async fn release(&self, lease: &Lease, run_at: i64) -> Result<bool, QueueError> {
        let now = now_millis();
        let done = self
            .modify_attempt(lease, |job| {
                if job.state != JobState::Running
                    || job.lease_token.as_deref() != Some(&lease.token)
                {
                    return false;
                }
                job.state = if run_at > now {
                    JobState::Scheduled
                } else {
                    JobState::Available
                };
                job.run_at = run_at;
                job.attempts -= 1;
                job.lease_token = None;
                job.lease_until = None;
                true
            })
            .await?;
        if done.is_some() {
            self.ack(&lease.token, AckKind::Nak(Some(until(run_at, now))))
                .await;
            self.wakeups.notify_waiters();
        }
        Ok(done.is_some())
    }

    async fn cancel(&self, id: &str) -> Result<bool, QueueError> {
        let now = now_millis();
        let done = self
            .modify(id, |job| {
                if job.state.is_finished() {
                    return false;
                }
                job.state = JobState::Cancelled;
                job.finished_at = Some(now);
                job.lease_token = None;
                job.lease_until = None;
                true
            })
            .await?;
        Ok(done.is_some())
    }

    async fn get(&self, id: &str) -> Result<Option<Job>, QueueError> {
        let now = now_millis();
        Ok(self.read(id).await?.map(|(job, _)| visible(job, now)))
    }

    async fn list(&self, filter: &JobFilter) -> Result<Vec<Job>, QueueError> {
        let now = now_millis();
        let limit = filter.limit.unwrap_or(100).clamp(1, 1000);
        let mut jobs: Vec<Job> = self
            .all_jobs()
            .await?
            .into_iter()
            .map(|j| visible(j, now))
            .filter(|j| filter.queue.as_ref().is_none_or(|q| &j.queue == q))
            .filter(|j| filter.kind.as_ref().is_none_or(|k| &j.kind == k))
            .filter(|j| filter.state.is_none_or(|s| j.state == s))
            .collect();
        jobs.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        jobs.truncate(limit);
        Ok(jobs)
    }

    async fn retry_dead(&self, id: &str) -> Result<bool, QueueError> {
        let now = now_millis();
        let done = self
            .modify(id, |job| {
                if job.state != JobState::Dead {
                    return false;
                }
                job.state = JobState::Available;
                job.attempts = 0;
                job.run_at = now;
                job.finished_at = None;
                true
            })
            .await?;
        match done {
            Some(job) => {
                // A new name for this send: the first one may still be in
                // the duplicate window.
                let message_id = format!("{id}.retry.{now}");
                self.publish(&job.queue, id, &message_id, None).await?;
                self.wakeups.notify_waiters();
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn discard_dead(&self, id: &str) -> Result<bool, QueueError> {
        let Some((job, revision)) = self.read(id).await? else {
            return Ok(false);
        };
        if job.state != JobState::Dead {
            return Ok(false);
        }
        match self.jobs.delete_expect_revision(id, Some(revision)).await {
            Ok(()) => {
                self.forget_unique_key(&job).await;
                Ok(true)
            }
            Err(_) => Ok(false),
        }
    }

    async fn stats(&self) -> Result<Vec<QueueStats>, QueueError> {
        let now = now_millis();
        let mut by_queue: BTreeMap<String, QueueStats> = BTreeMap::new();
        for job in self.all_jobs().await? {
            let job = visible(job, now);
            let s = by_queue
                .entry(job.queue.clone())
                .or_insert_with(|| QueueStats {
                    queue: job.queue.clone(),
                    ..QueueStats::default()
                });
            s.add(job.state, 1);
            let ready =
                matches!(job.state, JobState::Available | JobState::Retrying) && job.run_at <= now;
            if ready {
                s.depth += 1;
                s.oldest_age_ms = s.oldest_age_ms.max(now - job.run_at);
            }
        }
        Ok(by_queue.into_values().collect())
    }

    /// From each queue's consumer, not the job records: depth is the
    /// messages not yet delivered, the oldest age that of the first of
    /// them; dead jobs are not counted (that needs the full scan `stats`
    /// does).
    async fn gauges(&self) -> Result<Vec<QueueGauges>, QueueError> {
        let prefix = format!("{}.jobs.", self.options.prefix);
        let mut names = Vec::new();
        let mut listed = self.stream.consumer_names();
        while let Some(name) = listed.next().await {
            names.push(name.map_err(nats)?);
        }
        let now = now_millis();
        let mut out = Vec::new();
        for name in names {
            let info = self.stream.consumer_info(&name).await.map_err(nats)?;
            let Some(queue) = info.config.filter_subject.strip_prefix(&prefix) else {
                continue;
            };
            let depth = info.num_pending as i64;
            let mut oldest_age_ms = 0;
            if depth > 0 {
                let next = self
                    .stream
                    .get_first_raw_message_by_subject(
                        &info.config.filter_subject,
                        info.delivered.stream_sequence + 1,
                    )
                    .await;
                if let Ok(msg) = next {
                    let sent = (msg.time.unix_timestamp_nanos() / 1_000_000) as i64;
                    oldest_age_ms = (now - sent).max(0);
                }
            }
            out.push(QueueGauges {
                queue: queue.to_string(),
                depth,
                oldest_age_ms,
                dead: None,
            });
        }
        out.sort_by(|a, b| a.queue.cmp(&b.queue));
        Ok(out)
    }

    async fn prune(
        &self,
        finished_older_than: Duration,
        dead_older_than: Duration,
    ) -> Result<u64, QueueError> {
        let now = now_millis();
        let mut pruned = 0;
        for job in self.all_jobs().await? {
            let limit = match job.state {
                JobState::Succeeded | JobState::Cancelled => finished_older_than,
                JobState::Dead => dead_older_than,
                _ => continue,
            };
            if job.finished_at.unwrap_or(now) < now - ms(limit) {
                self.jobs.purge(&job.id).await.map_err(nats)?;
                self.forget_unique_key(&job).await;
                pruned += 1;
            }
        }
        Ok(pruned)
    }

    fn wakeups(&self) -> Arc<Notify> {
        self.wakeups.clone()
    }

    fn poll_interval(&self) -> Duration {
        self.options.poll_interval
    }

    fn orders_by_priority(&self) -> bool {
        false
    }

    fn backend_name(&self) -> &'static str {
        "nats"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(payload: Value) -> Job {
        Job {
            id: "job1".into(),
            queue: "q".into(),
            kind: "k".into(),
            payload,
            priority: 0,
            state: JobState::Available,
            run_at: 1,
            attempts: 0,
            max_attempts: 3,
            unique_key: None,
            timeout_ms: 1000,
            trace_id: None,
            traceparent: None,
            progress: None,
            last_error: None,
            errors: Vec::new(),
            lease_token: None,
            lease_until: None,
            worker_id: None,
            created_at: 1,
            started_at: None,
            finished_at: None,
        }
    }

    #[test]
    fn a_small_record_travels_with_its_revision() {
        let job = record(serde_json::json!({"to": "a@example.com"}));
        let bytes = serde_json::to_vec(&job).unwrap();
        let payload = message_payload(&job.id, Some((&bytes, 42)));
        let (id, known) = read_payload(&payload).unwrap();
        assert_eq!(id, "job1");
        assert_eq!(known, Some((job, 42)));
    }

    #[test]
    fn a_big_record_or_an_unknown_revision_sends_the_id_alone() {
        let job = record(Value::String("x".repeat(CARRY_MAX)));
        let bytes = serde_json::to_vec(&job).unwrap();
        assert_eq!(message_payload(&job.id, Some((&bytes, 1))), b"job1");
        assert_eq!(message_payload(&job.id, None), b"job1");
        // Messages written before records were carried hold the id alone.
        assert_eq!(read_payload(b"job1").unwrap(), ("job1".to_string(), None));
        assert!(read_payload(b"{not json").is_err());
    }
}
