//! A test harness for services, Shoal's own and a team's crates alike
//! (docs/services.md): [`TestApp`] runs the given modules as a `serve`
//! instance on port 0 with a fresh SQLite database in a temporary
//! directory (or the database the settings name), optionally with a
//! worker in the same process, and gives signed-in HTTP clients and a way
//! to await a job.
//!
//! ```no_run
//! # async fn t() {
//! use shoal_runtime::testing::TestApp;
//! let app = TestApp::builder().module(my_service::Greetings).worker().start().await;
//! let ada = app.signed_in("ada@example.com").await;
//! let r = ada.post(app.url("/api/greetings")).json(&serde_json::json!({"text": "hi"})).send().await.unwrap();
//! # }
//! # mod my_service { #[derive(Clone)] pub struct Greetings; impl shoal_runtime::ServiceModule for Greetings {
//! #   fn name(&self) -> &'static str { "g" } fn migrations(&self) -> &'static [shoal_backends::Migration] { &[] }
//! #   fn routes(&self, _: &shoal_runtime::AppContext) -> shoal_runtime::openapi::Api { shoal_runtime::openapi::Api::new() } } }
//! ```
//!
//! Signing in needs the accounts service's routes
//! (`/api/accounts/signup`, `/api/accounts/login`); add its module, or
//! make sessions with [`TestApp::session_for`].

use crate::app::{Application, ServiceModule};
use crate::context::AppContext;
use shoal_core::Settings;
use shoal_queue::{Job, JobState, JobStore, Worker, WorkerOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub use reqwest;

/// How to start a [`TestApp`].
pub struct TestAppBuilder {
    modules: Vec<crate::app::ModuleFactory>,
    base: Option<Settings>,
    edits: Vec<Box<dyn FnOnce(&mut Settings) + Send>>,
    worker: bool,
}

/// A running instance of some services, stopped when dropped.
pub struct TestApp {
    base: String,
    ctx: AppContext,
    /// Where the worker claims jobs: the context's SQL store, or
    /// JetStream with `queue.backend = "nats"`.
    jobs: Arc<dyn JobStore>,
    /// The worker's store and relay, with `.worker()`.
    backend: Option<crate::jobs::JobBackend>,
    stop: CancellationToken,
    /// The temporary data directory, when the harness made it.
    _dir: Option<TempDir>,
}

/// A user signed in through the accounts service: their id, session
/// cookie, and a client that sends it.
#[derive(Debug, Clone)]
pub struct TestUser {
    pub id: String,
    pub email: String,
    pub cookie: String,
    client: reqwest::Client,
}

impl std::ops::Deref for TestUser {
    type Target = reqwest::Client;
    fn deref(&self) -> &reqwest::Client {
        &self.client
    }
}

impl TestAppBuilder {
    /// Adds a service module (cloned for the worker, which needs its own).
    pub fn module<M: ServiceModule + Clone + 'static>(mut self, module: M) -> Self {
        self.modules.push(crate::app::module_factory(module));
        self
    }

    /// Starts from these settings, their data directory and stores
    /// included (so two apps can share a database), instead of the
    /// defaults in a temporary directory. The listener is still port 0.
    pub fn from_settings(mut self, settings: Settings) -> Self {
        self.base = Some(settings);
        self
    }

    /// Changes the settings before the start (after the harness's data
    /// directory and SQLite; the listener stays on port 0).
    pub fn settings(mut self, edit: impl FnOnce(&mut Settings) + Send + 'static) -> Self {
        self.edits.push(Box::new(edit));
        self
    }

    /// Also runs a worker in the process for the modules' jobs, on every
    /// queue of `worker.queues`, polling every 50 ms, on the store
    /// `queue.backend` names (with the outbox relay for NATS), as the
    /// worker role does.
    pub fn worker(mut self) -> Self {
        self.worker = true;
        self
    }

    /// Builds and starts the instance (and worker); panics on failure, as
    /// a test would.
    pub async fn start(self) -> TestApp {
        let (mut settings, dir) = match self.base {
            Some(s) => (s, None),
            None => {
                let dir = TempDir::new();
                let s = Settings {
                    data_dir: dir.path().to_path_buf(),
                    ..Settings::default()
                };
                (s, Some(dir))
            }
        };
        for edit in self.edits {
            edit(&mut settings);
        }
        settings.serve.listen = ([127, 0, 0, 1], 0).into();
        let modules: Vec<Box<dyn ServiceModule>> = self.modules.iter().map(|m| m()).collect();
        let app = Application::build(settings.clone(), modules)
            .await
            .expect("the test app starts");
        let base = format!("http://{}", app.local_addr());
        let ctx = app.context().clone();
        let stop = CancellationToken::new();
        let mut jobs: Arc<dyn JobStore> = ctx.jobs.clone();
        let mut job_backend = None;
        if self.worker {
            let options = WorkerOptions {
                queues: settings
                    .worker
                    .queues
                    .iter()
                    .map(|q| (q.clone(), settings.worker.concurrency.max(1)))
                    .collect(),
                poll_interval: Some(Duration::from_millis(50)),
                retention: None,
                ..WorkerOptions::default()
            };
            let queues: Vec<String> = options.queues.iter().map(|(q, _)| q.clone()).collect();
            let backend = crate::jobs::JobBackend::connect(&ctx, &queues, options.lease)
                .await
                .expect("the worker's job store opens");
            backend.spawn_relay(stop.clone());
            jobs = backend.store.clone();
            let mut worker = Worker::new(backend.store.clone(), options);
            job_backend = Some(backend);
            for module in self.modules.iter().map(|m| m()) {
                worker = module.register_jobs(&ctx, worker);
            }
            tokio::spawn(worker.run(stop.clone()));
        }
        tokio::spawn(app.run(stop.clone()));
        TestApp {
            base,
            ctx,
            jobs,
            backend: job_backend,
            stop,
            _dir: dir,
        }
    }
}

impl TestApp {
    pub fn builder() -> TestAppBuilder {
        TestAppBuilder {
            modules: Vec::new(),
            base: None,
            edits: Vec::new(),
            worker: false,
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The instance's context: its database, job store, settings.
    pub fn ctx(&self) -> &AppContext {
        &self.ctx
    }

    /// Its data directory (removed when the app is dropped, if the
    /// harness made it).
    pub fn data_dir(&self) -> &Path {
        &self.ctx.settings.data_dir
    }

    /// Starts the graceful stop (`/readyz` 503, then drain) as SIGTERM
    /// would; dropping the app does the same.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// The job store the worker claims from (the context's SQL store,
    /// or JetStream with `queue.backend = "nats"`).
    pub fn job_store(&self) -> &Arc<dyn JobStore> {
        &self.jobs
    }

    /// The worker's job backend (with `.worker()`): its JetStream store
    /// with `queue.backend = "nats"`.
    pub fn job_backend(&self) -> Option<&crate::jobs::JobBackend> {
        self.backend.as_ref()
    }

    /// A client without a session.
    pub fn client(&self) -> reqwest::Client {
        client(None)
    }

    /// Signs up `email` through the accounts service and logs in.
    pub async fn signed_in(&self, email: &str) -> TestUser {
        let http = self.client();
        let creds = serde_json::json!({"email": email, "password": "correct horse battery"});
        let r = http
            .post(self.url("/api/accounts/signup"))
            .json(&creds)
            .send()
            .await
            .expect("signup answers");
        assert!(
            r.status().is_success(),
            "signup of {email}: {} (is the accounts module in the app?)",
            r.status()
        );
        let r = http
            .post(self.url("/api/accounts/login"))
            .json(&creds)
            .send()
            .await
            .expect("login answers");
        assert_eq!(r.status(), 200, "login of {email}");
        let name = &self.ctx.settings.sessions.cookie_name;
        let cookie = r
            .headers()
            .get_all(reqwest::header::SET_COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|c| c.starts_with(&format!("{name}=")))
            .and_then(|c| c.split(';').next())
            .expect("login sets the session cookie")
            .to_string();
        let body: serde_json::Value = r.json().await.expect("login answers JSON");
        let id = body["id"]
            .as_str()
            .expect("login answers the id")
            .to_string();
        TestUser {
            id,
            email: email.to_string(),
            client: client(Some(&cookie)),
            cookie,
        }
    }

    /// A session for `user_id` made directly in the session store (no
    /// accounts service needed): a client that sends its cookie.
    pub async fn session_for(&self, user_id: &str) -> TestUser {
        let session = self
            .ctx
            .sessions
            .create(user_id, self.ctx.session_lifetimes())
            .await
            .expect("the session store makes a session");
        let cookie = format!(
            "{}={}",
            self.ctx.settings.sessions.cookie_name, session.token
        );
        TestUser {
            id: user_id.to_string(),
            email: String::new(),
            client: client(Some(&cookie)),
            cookie,
        }
    }

    /// Waits until job `id` has finished (succeeded, dead or cancelled)
    /// and returns it; panics after 30 s. Needs the worker
    /// ([`TestAppBuilder::worker`]) unless something else runs it.
    pub async fn finished_job(&self, id: &str) -> Job {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let job = self.jobs.get(id).await.expect("the job store answers");
            if let Some(job) = job {
                if matches!(
                    job.state,
                    JobState::Succeeded | JobState::Dead | JobState::Cancelled
                ) {
                    return job;
                }
                assert!(
                    Instant::now() < deadline,
                    "job {id} still {:?} after 30 s (is the worker on?)",
                    job.state
                );
            } else {
                assert!(Instant::now() < deadline, "no job {id}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The jobs of `kind`, newest first.
    pub async fn jobs_of(&self, kind: &str) -> Vec<Job> {
        self.jobs
            .list(&shoal_queue::JobFilter {
                kind: Some(kind.to_string()),
                limit: Some(1000),
                ..Default::default()
            })
            .await
            .expect("the job store answers")
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn client(cookie: Option<&str>) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(c) = cookie {
        headers.insert(
            reqwest::header::COOKIE,
            c.parse().expect("a cookie is a header value"),
        );
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("an HTTP client")
}

/// A directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        let path =
            std::env::temp_dir().join(format!("shoal-testapp-{}", shoal_core::ids::new_id()));
        std::fs::create_dir_all(&path).expect("a temporary directory");
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
