//! Shared by `faults_sigkill.rs` and `faults_restart.rs`: the backends under
//! test, the `queue-fault-worker` processes, enqueueing and the final
//! check of what the workers recorded.

#![allow(dead_code)]

use futures_util::StreamExt;
use shoal_backends::{now_millis, Database};
use shoal_queue::{JobState, JobStore, NatsJobStore, NatsJobStoreOptions, NewJob, SqlJobStore};
use shoal_testkit as kit;
use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

pub const QUEUE: &str = "faults";
pub const KIND: &str = "fault.noop";

const RECORD_TABLES: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS fault_completions (job_id TEXT NOT NULL, attempt BIGINT NOT NULL,
        pid BIGINT NOT NULL, started_ms BIGINT NOT NULL, recorded_ms BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS fault_successes (job_id TEXT NOT NULL, attempt BIGINT NOT NULL,
        pid BIGINT NOT NULL, at_ms BIGINT NOT NULL)",
];

/// One backend under test: the job store (as the test process sees it) and
/// the SQL database where the workers record their runs.
pub struct Backend {
    pub name: &'static str,
    pub url: String,
    pub nats_prefix: Option<String>,
    pub lease: Duration,
    pub store: Arc<dyn JobStore>,
    pub sql: Option<SqlJobStore>,
    pub nats: Option<NatsJobStore>,
    pub record_url: String,
    pub record: Database,
    pub dir: kit::TempDir,
}

pub async fn connect_db(url: &str) -> Database {
    Database::connect(url, 4, Duration::from_secs(10))
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

async fn record_db(url: &str) -> Database {
    let db = connect_db(url).await;
    for sql in RECORD_TABLES {
        sqlx::query(sql)
            .execute(db.pool())
            .await
            .expect("record table");
    }
    db
}

impl Backend {
    /// A SQL backend (`sqlite://` or `postgres://`); the workers record in
    /// the same database, or in `record_url` when given.
    pub async fn sql(name: &'static str, url: String, lease: Duration, dir: kit::TempDir) -> Self {
        let db = connect_db(&url).await;
        let store = SqlJobStore::open(db, &url).await.expect("SQL job store");
        let record_url = url.clone();
        let record = record_db(&record_url).await;
        Backend {
            name,
            url,
            nats_prefix: None,
            lease,
            store: Arc::new(store.clone()),
            sql: Some(store),
            nats: None,
            record_url,
            record,
            dir,
        }
    }

    /// A NATS backend with a unique prefix; the workers record in a SQLite
    /// file of `dir`.
    pub async fn nats(url: String, lease: Duration, dir: kit::TempDir) -> Self {
        let prefix = kit::unique_name();
        let options = NatsJobStoreOptions {
            prefix: prefix.clone(),
            ack_wait: lease,
            ..NatsJobStoreOptions::default()
        };
        let store = NatsJobStore::connect(&url, options)
            .await
            .expect("connect to NATS");
        let record_url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("record.db").display()
        );
        let record = record_db(&record_url).await;
        Backend {
            name: "nats",
            url,
            nats_prefix: Some(prefix),
            lease,
            store: Arc::new(store.clone()),
            sql: None,
            nats: Some(store),
            record_url,
            record,
            dir,
        }
    }

    /// Records in a SQLite file of the temp dir instead of the backend's
    /// database (for server restarts: the record must stay up).
    pub async fn record_in_sqlite(mut self) -> Self {
        self.record_url = format!(
            "sqlite://{}?mode=rwc",
            self.dir.path().join("record.db").display()
        );
        self.record = record_db(&self.record_url).await;
        self
    }

    pub fn job(n: usize) -> NewJob {
        NewJob::new(QUEUE, KIND, serde_json::json!({ "n": n })).unique_key(format!("fault:{n}"))
    }

    /// Enqueues `n` jobs (SQL: in one transaction) and returns their ids.
    pub async fn enqueue_many(&self, n: usize) -> Vec<String> {
        if let Some(sql) = &self.sql {
            let mut tx = sql.database().pool().begin().await.expect("begin");
            let mut ids = Vec::with_capacity(n);
            for i in 0..n {
                let e = sql
                    .enqueue_in_transaction(&mut tx, Self::job(i))
                    .await
                    .expect("enqueue");
                ids.push(e.id);
            }
            tx.commit().await.expect("commit");
            ids
        } else {
            let store = self.store.clone();
            futures_util::stream::iter(0..n)
                .map(|i| {
                    let store = store.clone();
                    async move { store.enqueue(Self::job(i)).await.expect("enqueue").id }
                })
                .buffered(64)
                .collect()
                .await
        }
    }

    /// True when nothing is left to run: SQL counts unfinished rows; NATS
    /// looks at the work-queue stream (empty once every message is acked
    /// or terminated).
    pub async fn unfinished(&self) -> Result<u64, String> {
        if let Some(sql) = &self.sql {
            let (n,): (i64,) = sqlx::query_as(
                "SELECT COUNT(*) FROM shoal_jobs WHERE state NOT IN ('succeeded', 'dead', 'cancelled')",
            )
            .fetch_one(sql.database().pool())
            .await
            .map_err(|e| e.to_string())?;
            Ok(n as u64)
        } else {
            let client = async_nats::connect(&self.url)
                .await
                .map_err(|e| e.to_string())?;
            let js = async_nats::jetstream::new(client);
            let prefix = self.nats_prefix.as_deref().unwrap_or_default();
            let mut stream = js
                .get_stream(format!("{prefix}_JOBS"))
                .await
                .map_err(|e| e.to_string())?;
            let info = stream.info().await.map_err(|e| e.to_string())?;
            Ok(info.state.messages)
        }
    }

    /// Id, state, attempts and `finished_at` of each job of `ids`.
    pub async fn final_jobs(&self, ids: &[String]) -> HashMap<String, (JobState, i64, i64)> {
        if let Some(sql) = &self.sql {
            let rows: Vec<(String, String, i64, Option<i64>)> =
                sqlx::query_as("SELECT id, state, attempts, finished_at FROM shoal_jobs")
                    .fetch_all(sql.database().pool())
                    .await
                    .expect("read jobs");
            rows.into_iter()
                .map(|(id, state, attempts, finished)| {
                    let state = JobState::parse(&state).expect("state");
                    (id, (state, attempts, finished.unwrap_or(i64::MAX)))
                })
                .collect()
        } else {
            let store = self.store.clone();
            futures_util::stream::iter(ids.to_vec())
                .map(|id| {
                    let store = store.clone();
                    async move {
                        let job = store.get(&id).await.expect("get job");
                        (id, job)
                    }
                })
                .buffer_unordered(32)
                .filter_map(|(id, job)| async move {
                    job.map(|j| (id, (j.state, j.attempts, j.finished_at.unwrap_or(i64::MAX))))
                })
                .collect()
                .await
        }
    }

    /// NATS: the stream's and the queue consumer's state, for failure
    /// reports.
    pub async fn nats_state(&self) -> String {
        let Some(prefix) = &self.nats_prefix else {
            return String::new();
        };
        let state = async {
            let client = async_nats::connect(&self.url).await?;
            let js = async_nats::jetstream::new(client);
            let mut stream = js.get_stream(format!("{prefix}_JOBS")).await?;
            let info = stream.info().await?.state.clone();
            let mut consumer: async_nats::jetstream::consumer::PullConsumer =
                stream.get_consumer(&format!("{prefix}_{QUEUE}")).await?;
            let c = consumer.info().await?.clone();
            Ok::<_, async_nats::Error>(format!(
                "stream messages={} first_seq={} last_seq={}; consumer pending={} ack_pending={} \
                 redelivered={} waiting={} delivered={:?} ack_floor={:?}",
                info.messages,
                info.first_sequence,
                info.last_sequence,
                c.num_pending,
                c.num_ack_pending,
                c.num_redelivered,
                c.num_waiting,
                c.delivered,
                c.ack_floor
            ))
        }
        .await;
        state.unwrap_or_else(|e| format!("cannot read the NATS state: {e}"))
    }

    pub async fn cleanup(&self) {
        if let Some(nats) = &self.nats {
            let _ = nats.delete_everything().await;
        }
    }
}

/// The `queue-fault-worker` processes of a test; killed when dropped.
pub struct Workers {
    env: Vec<(String, String)>,
    logs: PathBuf,
    pub children: Vec<Child>,
    pub started: usize,
}

impl Workers {
    pub fn new(backend: &Backend, concurrency: usize, sleep_max_ms: u64) -> Self {
        let mut env = vec![
            ("FAULT_BACKEND_URL".to_string(), backend.url.clone()),
            ("FAULT_RECORD_URL".to_string(), backend.record_url.clone()),
            ("FAULT_QUEUE".to_string(), QUEUE.to_string()),
            ("FAULT_CONCURRENCY".to_string(), concurrency.to_string()),
            (
                "FAULT_LEASE_MS".to_string(),
                backend.lease.as_millis().to_string(),
            ),
            ("FAULT_SLEEP_MAX_MS".to_string(), sleep_max_ms.to_string()),
            ("FAULT_MAX_SECONDS".to_string(), "150".to_string()),
        ];
        if let Some(p) = &backend.nats_prefix {
            env.push(("FAULT_NATS_PREFIX".to_string(), p.clone()));
        }
        Workers {
            env,
            logs: backend.dir.path().join("workers.log"),
            children: Vec::new(),
            started: 0,
        }
    }

    fn spawn_one(&mut self) -> Child {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.logs)
            .expect("worker log");
        self.started += 1;
        Command::new(env!("CARGO_BIN_EXE_queue-fault-worker"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start queue-fault-worker")
    }

    pub fn start(&mut self, n: usize) {
        for _ in 0..n {
            let child = self.spawn_one();
            self.children.push(child);
        }
    }

    /// SIGKILLs worker `i` and starts a new one in its place.
    pub fn kill_and_restart(&mut self, i: usize) {
        let child = &mut self.children[i];
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        self.children[i] = self.spawn_one();
    }

    /// Pids of workers that exited by themselves (crashed).
    pub fn exited(&mut self) -> Vec<(u32, String)> {
        self.children
            .iter_mut()
            .filter_map(|c| match c.try_wait() {
                Ok(Some(status)) => Some((c.id(), status.to_string())),
                _ => None,
            })
            .collect()
    }

    pub fn pids(&self) -> Vec<i64> {
        self.children.iter().map(|c| c.id() as i64).collect()
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.logs).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn kill_all(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// What the fault run left behind.
#[derive(Debug, Default)]
pub struct Counts {
    pub jobs: usize,
    pub succeeded: usize,
    /// Handler runs that reached their end and recorded a completion.
    pub completions: usize,
    /// Completions beyond one per job.
    pub duplicate_completions: usize,
    /// Claims beyond one per job: sum of (attempts - 1).
    pub duplicate_starts: i64,
    /// Jobs whose accepted completion was recorded by the store wrapper
    /// (a worker killed between `complete` and that record leaves none).
    pub recorded_successes: usize,
    /// Violations (each must be zero).
    pub not_succeeded: usize,
    pub missing: usize,
    pub without_completion: usize,
    pub double_success: usize,
    pub run_after_success: usize,
    pub completion_after_success: usize,
    pub same_attempt_twice: usize,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "jobs={} succeeded={} completions={} duplicate_completions={} duplicate_starts={} \
             recorded_successes={} | violations: not_succeeded={} missing={} without_completion={} \
             double_success={} run_after_success={} completion_after_success={} same_attempt_twice={}",
            self.jobs,
            self.succeeded,
            self.completions,
            self.duplicate_completions,
            self.duplicate_starts,
            self.recorded_successes,
            self.not_succeeded,
            self.missing,
            self.without_completion,
            self.double_success,
            self.run_after_success,
            self.completion_after_success,
            self.same_attempt_twice
        )
    }
}

impl Counts {
    pub fn violations(&self) -> usize {
        self.not_succeeded
            + self.missing
            + self.without_completion
            + self.double_success
            + self.run_after_success
            + self.completion_after_success
            + self.same_attempt_twice
    }
}

/// Compares the jobs' final records with what the workers recorded.
pub async fn check(backend: &Backend, ids: &[String]) -> Counts {
    let jobs = backend.final_jobs(ids).await;
    let completions: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT job_id, attempt, pid, started_ms, recorded_ms FROM fault_completions",
    )
    .fetch_all(backend.record.pool())
    .await
    .expect("read completions");
    let successes: Vec<(String, i64, i64, i64)> =
        sqlx::query_as("SELECT job_id, attempt, pid, at_ms FROM fault_successes")
            .fetch_all(backend.record.pool())
            .await
            .expect("read successes");

    let mut c = Counts {
        jobs: ids.len(),
        completions: completions.len(),
        ..Counts::default()
    };
    let mut runs: HashMap<&str, Vec<(i64, i64, i64)>> = HashMap::new();
    for (id, attempt, _pid, started, recorded) in &completions {
        runs.entry(id.as_str())
            .or_default()
            .push((*attempt, *started, *recorded));
    }
    let mut succ: HashMap<&str, Vec<i64>> = HashMap::new();
    for (id, attempt, _pid, _at) in &successes {
        succ.entry(id.as_str()).or_default().push(*attempt);
    }
    c.recorded_successes = succ.len();
    for id in ids {
        let Some(&(state, attempts, finished_at)) = jobs.get(id) else {
            c.missing += 1;
            continue;
        };
        if state == JobState::Succeeded {
            c.succeeded += 1;
        } else {
            c.not_succeeded += 1;
            if c.not_succeeded <= 10 {
                eprintln!("job {id} ended {state} after {attempts} attempts");
            }
        }
        c.duplicate_starts += (attempts - 1).max(0);
        let job_runs = runs.get(id.as_str()).map(Vec::as_slice).unwrap_or(&[]);
        if job_runs.is_empty() {
            c.without_completion += 1;
        }
        c.duplicate_completions += job_runs.len().saturating_sub(1);
        let mut seen = std::collections::HashSet::new();
        let successful = succ.get(id.as_str());
        if successful.is_some_and(|s| s.len() > 1) {
            c.double_success += 1;
            eprintln!("job {id} completed more than once: attempts {successful:?}");
        }
        let success_attempt = successful.and_then(|s| s.iter().min().copied());
        for &(attempt, started, recorded) in job_runs {
            if !seen.insert(attempt) {
                c.same_attempt_twice += 1;
            }
            let after = started > finished_at
                || attempt > attempts
                || success_attempt.is_some_and(|s| attempt > s);
            if after {
                c.run_after_success += 1;
                eprintln!(
                    "job {id}: attempt {attempt} started at {started}, after its success at {finished_at} (attempt {success_attempt:?})"
                );
            } else if recorded > finished_at {
                c.completion_after_success += 1;
                eprintln!(
                    "job {id}: attempt {attempt} recorded at {recorded}, after its success at {finished_at}"
                );
            }
        }
    }
    c
}

/// Polls until nothing is unfinished or `deadline` (ms since the epoch)
/// passes; returns whether everything finished.
pub async fn wait_finished(backend: &Backend, deadline: i64) -> bool {
    while now_millis() < deadline {
        if let Ok(0) = backend.unfinished().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}
