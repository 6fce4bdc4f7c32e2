//! `Application::build`: settings + service modules → a bound listener and
//! a router with the standard middleware, `/healthz`, `/readyz`, `/metrics`
//! (and `/_debug/*` when enabled); `Application::run` serves until the
//! shutdown token fires, then drains.

use crate::cache::{QueryCache, QueryCacheOptions};
use crate::context::AppContext;
use crate::error::problem_response;
use crate::middleware::standard_layers;
use crate::session_cache::CachedSessionStore;
use anyhow::Context as _;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use shoal_backends::{
    BlobStore, Broadcast, Database, Migration, RedisBroadcast, RedisSessionStore, S3Config,
    SessionStore, SqlBroadcast, SqlBroadcastOptions, SqlSessionStore,
};
use shoal_core::settings::{BlobBackend, BusBackend, SessionBackend, SettingsError};
use shoal_core::{Problem, Settings};
use shoal_queue::{SqlJobStore, Worker};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A service: its name, its migrations and its routes (full paths, such
/// as `/api/accounts/login`).
pub trait ServiceModule: Send + Sync {
    fn name(&self) -> &'static str;
    fn migrations(&self) -> &'static [Migration];
    /// The service's routes, each with its OpenAPI description
    /// (`openapi::Api`): a route is not served without one.
    fn routes(&self, ctx: &AppContext) -> crate::openapi::Api;
    /// Registers this service's job handlers (and schedules) on a worker.
    fn register_jobs(&self, _ctx: &AppContext, worker: Worker) -> Worker {
        worker
    }
    /// Checks this service's own settings (`[services.<name>]`, read with
    /// `shoal_core::settings::service_section`) before anything starts; an
    /// error stops the role with it. The default takes none: a section
    /// given for it is refused.
    fn check_settings(&self, settings: &Settings) -> Result<(), SettingsError> {
        match settings.services.get(self.name()) {
            None => Ok(()),
            Some(_) => Err(SettingsError::Invalid {
                key: format!("services.{}", self.name()),
                message: "this service takes no settings".into(),
            }),
        }
    }
}

/// Makes a fresh instance of one service module: each role (and a test's
/// worker beside its instance) builds its own.
pub type ModuleFactory = Arc<dyn Fn() -> Box<dyn ServiceModule> + Send + Sync>;

/// The factory of `module`: clones it.
pub fn module_factory<M: ServiceModule + Clone + 'static>(module: M) -> ModuleFactory {
    Arc::new(move || Box::new(module.clone()) as Box<dyn ServiceModule>)
}

/// Refuses settings sections of services this binary does not have, and
/// those its services refuse.
fn check_service_settings(
    settings: &Settings,
    modules: &[Box<dyn ServiceModule>],
) -> Result<(), SettingsError> {
    for name in settings.services.keys() {
        if !modules.iter().any(|m| m.name() == name) {
            let known: Vec<&str> = modules.iter().map(|m| m.name()).collect();
            return Err(SettingsError::Invalid {
                key: format!("services.{name}"),
                message: format!(
                    "no service `{name}` in this binary (it has {})",
                    known.join(", ")
                ),
            });
        }
    }
    modules.iter().try_for_each(|m| m.check_settings(settings))
}

/// Opens the blob store the settings name.
pub fn open_blobs(settings: &Settings) -> anyhow::Result<BlobStore> {
    let b = &settings.blobs;
    Ok(match b.backend {
        BlobBackend::Local => BlobStore::local(&settings.data_dir.join("blobs"))?,
        BlobBackend::S3 => BlobStore::s3(&S3Config {
            bucket: b.s3_bucket.clone(),
            endpoint: (!b.s3_endpoint.is_empty()).then(|| b.s3_endpoint.clone()),
            region: b.s3_region.clone(),
            access_key_id: b.s3_access_key_id.clone(),
            secret_access_key: b.s3_secret_access_key.clone(),
        })?,
    })
}

/// Everything a role needs to run services' code: connects the database,
/// session store, bus, caches, job store and blob store the settings name,
/// and runs the modules' migrations. `Application::build` and the worker
/// role both start here.
pub async fn build_context(
    settings: Settings,
    instance: Arc<str>,
    modules: &[Box<dyn ServiceModule>],
) -> anyhow::Result<AppContext> {
    check_service_settings(&settings, modules)?;
    let (db, sessions) = connect_backends(&settings).await?;
    migrate(&db, modules).await?;
    let bus = connect_bus(&settings, &db).await?;
    let sessions: Arc<dyn SessionStore> = if settings.cache.session_ttl_ms > 0 {
        Arc::new(
            CachedSessionStore::new(
                sessions,
                bus.clone(),
                Duration::from_millis(settings.cache.session_ttl_ms),
            )
            .await
            .context("starting the session cache")?,
        )
    } else {
        sessions
    };
    let cache = QueryCache::new(
        QueryCacheOptions::from_settings(&settings.cache),
        Some(bus.clone()),
    )
    .await;
    let jobs = Arc::new(
        SqlJobStore::open(db.clone(), &settings.database_url()?)
            .await
            .context("opening the job queue")?,
    );
    let blobs = open_blobs(&settings).context("opening blob storage")?;
    Ok(AppContext::new(
        Arc::new(settings),
        db,
        sessions,
        bus,
        cache,
        jobs,
        blobs,
        instance,
    ))
}

/// Connects the database and session store the settings name.
pub async fn connect_backends(
    settings: &Settings,
) -> anyhow::Result<(Database, Arc<dyn SessionStore>)> {
    let url = settings.database_url()?;
    let db = Database::connect(
        &url,
        settings.database.max_connections,
        Duration::from_millis(settings.database.acquire_timeout_ms),
    )
    .await
    .context("connecting to the database")?;
    let sessions: Arc<dyn SessionStore> = match settings.sessions.backend {
        SessionBackend::Database => Arc::new(SqlSessionStore::new(db.clone()).await?),
        SessionBackend::Redis => {
            let url = settings
                .sessions
                .redis_url
                .as_deref()
                .context("sessions.redis_url is required for the redis session backend")?;
            Arc::new(
                RedisSessionStore::connect(url, &settings.sessions.redis_prefix)
                    .await
                    .context("connecting to Redis for sessions")?,
            )
        }
    };
    Ok((db, sessions))
}

/// Connects the broadcast bus `cache.bus` names.
pub async fn connect_bus(settings: &Settings, db: &Database) -> anyhow::Result<Arc<dyn Broadcast>> {
    let cache = &settings.cache;
    Ok(match cache.bus {
        BusBackend::Database => Arc::new(
            SqlBroadcast::new(
                db.clone(),
                SqlBroadcastOptions {
                    poll_interval: Duration::from_millis(cache.bus_poll_interval_ms),
                    retention: Duration::from_secs(cache.bus_retention_secs),
                },
            )
            .await
            .context("creating the database broadcast bus")?,
        ),
        BusBackend::Redis => {
            let url = cache
                .bus_redis_url
                .as_deref()
                .context("cache.bus_redis_url is required for the redis bus")?;
            Arc::new(
                RedisBroadcast::connect(url, &cache.redis_prefix)
                    .await
                    .context("connecting to Redis for the broadcast bus")?,
            )
        }
    })
}

/// Runs every module's migrations (and the session table's).
pub async fn migrate(db: &Database, modules: &[Box<dyn ServiceModule>]) -> anyhow::Result<()> {
    for module in modules {
        db.migrate(module.name(), module.migrations())
            .await
            .with_context(|| format!("migrating service {}", module.name()))?;
    }
    Ok(())
}

/// A built, bound service instance.
pub struct Application {
    listener: TcpListener,
    router: Router,
    ctx: AppContext,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("addr", &self.listener.local_addr().ok())
            .finish()
    }
}

impl Application {
    /// Connects backends, runs migrations, binds `serve.listen` (port 0
    /// picks a free port) and assembles the router. Only modules named in
    /// `serve.services` (or all, with `all`) are mounted.
    pub async fn build(
        settings: Settings,
        modules: Vec<Box<dyn ServiceModule>>,
    ) -> anyhow::Result<Self> {
        settings.validate()?;
        // The recorder before the first request: the middleware keeps
        // metric handles, which would stay no-ops if made before it.
        let _ = shoal_core::telemetry::prometheus();
        let wanted = &settings.serve.services;
        let all = wanted.iter().any(|s| s == "all");
        for name in wanted.iter().filter(|s| *s != "all") {
            if !modules.iter().any(|m| m.name() == name) {
                let known: Vec<_> = modules.iter().map(|m| m.name()).collect();
                anyhow::bail!(
                    "invalid setting `serve.services`: unknown service `{name}` (known: all, {})",
                    known.join(", ")
                );
            }
        }
        let modules: Vec<_> = modules
            .into_iter()
            .filter(|m| all || wanted.iter().any(|w| w == m.name()))
            .collect();
        let listener = shoal_core::ports::bind_listener(settings.serve.listen)
            .with_context(|| format!("binding {}", settings.serve.listen))?;
        let addr = listener.local_addr()?;
        let instance: Arc<str> = if settings.instance.is_empty() {
            format!("serve@{addr}").into()
        } else {
            settings.instance.clone().into()
        };
        let mut settings = settings;
        if settings.clients.catalog.is_empty() {
            // Alone, an instance calls the catalog it runs itself.
            settings.clients.catalog = vec![format!("http://{addr}")];
        }
        let ctx = build_context(settings, instance, &modules).await?;
        let mut api = runtime_api(&ctx);
        for module in &modules {
            api = api.merge(module.routes(&ctx));
        }
        let (mut router, operations) = api.into_parts();
        let document =
            bytes::Bytes::from(serde_json::to_vec(&crate::openapi::document(&operations))?);
        router = router.route(
            "/api/openapi.json",
            get(move || {
                let document = document.clone();
                async move {
                    (
                        [
                            (axum::http::header::CONTENT_TYPE, "application/json"),
                            (axum::http::header::CACHE_CONTROL, "public, max-age=60"),
                        ],
                        document,
                    )
                }
            }),
        );
        let router = standard_layers(router.with_state(ctx.clone()), &ctx);
        Ok(Application {
            listener,
            router,
            ctx,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("bound listener")
    }

    pub fn context(&self) -> &AppContext {
        &self.ctx
    }

    /// Serves until `shutdown` is cancelled; then `/readyz` turns 503,
    /// after `serve.drain_delay_ms` the listener closes, and in-flight
    /// requests get `serve.shutdown_timeout_secs` to finish.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Application {
            listener,
            router,
            ctx,
        } = self;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, instance = %ctx.instance, "serving");
        let drain_delay = Duration::from_millis(ctx.settings.serve.drain_delay_ms);
        let deadline = Duration::from_secs(ctx.settings.serve.shutdown_timeout_secs);
        let stop_accepting = CancellationToken::new();
        let drainer = {
            let ctx = ctx.clone();
            let stop = stop_accepting.clone();
            let shutdown = shutdown.clone();
            async move {
                shutdown.cancelled().await;
                ctx.start_draining();
                tracing::info!(delay_ms = drain_delay.as_millis() as u64, "draining");
                tokio::time::sleep(drain_delay).await;
                stop.cancel();
            }
        };
        tokio::spawn(drainer);
        // Deregisters on the same signal that starts the drain.
        let registration = tokio::spawn(crate::registration::run(
            ctx.clone(),
            addr,
            shutdown.clone(),
        ));
        let server = tokio::spawn(crate::server::serve(
            listener,
            router,
            stop_accepting.clone(),
        ));
        // Once draining begins, in-flight requests get `deadline`.
        let mut server = server;
        tokio::select! {
            res = &mut server => { res?; }
            _ = async { stop_accepting.cancelled().await; tokio::time::sleep(deadline).await } => {
                tracing::warn!(deadline_secs = deadline.as_secs(), "in-flight requests did not finish before the deadline; closing");
                server.abort();
            }
        }
        // The deregistration was sent when the drain began; wait for its
        // answer (bounded by the client's timeout) before the process ends.
        if tokio::time::timeout(Duration::from_secs(3), registration)
            .await
            .is_err()
        {
            tracing::warn!("deregistration did not finish; the registration lapses after its TTL");
        }
        ctx.db.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}

/// `/healthz`'s answer: the same for the instance's life, so serialised
/// once and shared by every probe (no JSON built per probe).
fn healthz(ctx: &AppContext) -> axum::routing::MethodRouter<AppContext> {
    let body = bytes::Bytes::from(
        serde_json::json!({
            "status": "ok",
            "instance": &*ctx.instance,
            "pid": std::process::id(),
        })
        .to_string(),
    );
    get(move || {
        let body = body.clone();
        async move {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    axum::http::HeaderValue::from_static("application/json"),
                )],
                body,
            )
        }
    })
}

/// The routes every instance has, described: probes, metrics, the
/// console's stats, the debug routes when on, and the API document.
fn runtime_api(ctx: &AppContext) -> crate::openapi::Api {
    use crate::openapi::{Api, Op};
    use serde_json::json;
    let text = json!({"type": "string"});
    let mut api = Api::new()
        .route(
            "get",
            "/healthz",
            healthz(ctx),
            Op::new("runtime", "Liveness").json(
                200,
                "The process runs",
                json!({"type": "object", "required": ["status"], "properties": {
                    "status": {"const": "ok"}, "instance": {"type": "string"}, "pid": {"type": "integer"}}}),
            ),
        )
        .get(
            "/readyz",
            readyz,
            Op::new("runtime", "Readiness")
                .describe("503 while draining, or while a store it needs does not answer.")
                .json(
                    200,
                    "Ready for requests",
                    json!({"type": "object", "required": ["status"], "properties": {
                        "status": {"const": "ready"}, "instance": {"type": "string"}}}),
                ),
        )
        .get(
            "/metrics",
            metrics_text,
            Op::new("runtime", "Prometheus metrics")
                .internal()
                .token()
                .answer(200, "Prometheus text exposition", "text/plain", text.clone()),
        )
        .get(
            "/_shoal/stats",
            console_stats,
            Op::new("runtime", "Console stats")
                .internal()
                .token()
                .json(
                    200,
                    "What the gateway's console shows of this instance",
                    json!({"type": "object", "required": ["streams"], "properties": {
                        "streams": {"type": "integer", "minimum": 0}}}),
                ),
        )
        .post(
            "/api/jobs",
            crate::enqueue::enqueue,
            Op::new("runtime", "Enqueue a job (services)")
                .describe("Service to service, with a service token scoped jobs:enqueue (or clients.token): the semantics of the Rust API (queue, kind, payload, unique key, run-at, attempts, timeout, priority). A queue bound to an endpoint ([[worker.push]]) delivers it there. Nothing is enqueued when the body is refused.")
                .token()
                .json_body::<crate::enqueue::EnqueueRequest>()
                .returns::<crate::enqueue::EnqueueAnswer>(201, "Enqueued")
                .returns::<crate::enqueue::EnqueueAnswer>(200, "Enqueued before, under this unique key"),
        )
        .routed_later(
            "get",
            "/api/openapi.json",
            Op::new("runtime", "This document").json(200, "The OpenAPI 3.1 document", json!({"type": "object"})),
        );
    if ctx.settings.serve.debug_routes {
        api = api
            .get(
                "/_debug/sleep",
                debug_sleep,
                Op::new("runtime", "Debug: sleep")
                    .internal()
                    .query(
                        "ms",
                        true,
                        json!({"type": "integer", "minimum": 0}),
                        "how long",
                    )
                    .json(200, "Slept", json!({"type": "object"})),
            )
            .get(
                "/_debug/panic",
                debug_panic,
                Op::new("runtime", "Debug: panic")
                    .internal()
                    .problems(&[500]),
            );
    }
    api
}

/// Open realtime streams (SSE and WebSocket) on this instance, counted by
/// the services that hold them, for the console.
pub static OPEN_STREAMS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// `GET /_shoal/stats` (admin token): what the gateway's console shows of
/// this instance beyond what the gateway sees itself.
async fn console_stats(State(ctx): State<AppContext>, headers: axum::http::HeaderMap) -> Response {
    if let Err(denied) =
        crate::jobs_console::check_admin(ctx.settings.gateway.admin_token.as_deref(), &headers)
    {
        return denied;
    }
    axum::Json(serde_json::json!({
        "streams": OPEN_STREAMS.load(std::sync::atomic::Ordering::Relaxed),
    }))
    .into_response()
}

async fn readyz(State(ctx): State<AppContext>) -> Response {
    if ctx.is_draining() {
        return problem_response(&Problem::unavailable("this instance is draining", 1));
    }
    // Every store a request may need, checked at once, each within 1 s:
    // an instance that cannot reach one would answer 500s, so it leaves
    // the gateways' pools until the store is back (and rejoins by itself:
    // the clients reconnect).
    let limit = Duration::from_secs(1);
    let (db, sessions, bus) = tokio::join!(
        tokio::time::timeout(limit, ctx.db.ping()),
        tokio::time::timeout(limit, ctx.sessions.ping()),
        tokio::time::timeout(limit, ctx.bus.ping()),
    );
    let (db, sessions, bus) = (
        db.unwrap_or(false),
        sessions.unwrap_or(false),
        bus.unwrap_or(false),
    );
    let down: Vec<&str> = [(db, "database"), (sessions, "session store"), (bus, "bus")]
        .into_iter()
        .filter_map(|(ok, name)| (!ok).then_some(name))
        .collect();
    if !down.is_empty() {
        return problem_response(&Problem::unavailable(
            format!("not ready: the {} does not answer", down.join(", the ")),
            1,
        ));
    }
    (
        StatusCode::OK,
        Json(serde_json::json!({"status": "ready", "instance": &*ctx.instance})),
    )
        .into_response()
}

async fn metrics_text(
    State(ctx): State<AppContext>,
    headers: axum::http::HeaderMap,
) -> axum::response::Response {
    metrics_response(ctx.settings.metrics.token.as_deref(), &headers)
}

/// `GET /metrics` of `serve` and `worker`: the Prometheus text for a
/// request that carries `metrics.token` as a bearer token; 403 while no
/// token is configured, 401 without the right one. An instance's routes
/// are reachable through the gateway, so its address proves nothing.
pub fn metrics_response(
    token: Option<&str>,
    headers: &axum::http::HeaderMap,
) -> axum::response::Response {
    let Some(token) = token else {
        return crate::error::problem_response(&Problem::forbidden(
            "/metrics is off: set metrics.token and send it as `Authorization: Bearer <token>` \
             (`shoal up` writes one to <data_dir>/secrets/metrics-token)",
        ));
    };
    let header = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if !shoal_core::bearer::matches(header, &[token]) {
        let mut r = crate::error::problem_response(&Problem::unauthorized(
            "send `Authorization: Bearer <metrics.token>`",
        ));
        r.headers_mut().insert(
            axum::http::header::WWW_AUTHENTICATE,
            axum::http::HeaderValue::from_static("Bearer"),
        );
        return r;
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        shoal_core::telemetry::prometheus().render(),
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct SleepQuery {
    ms: u64,
}

async fn debug_sleep(Query(q): Query<SleepQuery>) -> Json<serde_json::Value> {
    tokio::time::sleep(Duration::from_millis(q.ms.min(60_000))).await;
    Json(serde_json::json!({"slept_ms": q.ms}))
}

async fn debug_panic() -> &'static str {
    panic!("deliberate panic from /_debug/panic")
}
