//! Reloading the settings without dropping a connection: on SIGHUP or
//! `POST /_gateway/admin/reload` the settings are read again (the
//! `--config` file, or whatever loader the binary gave), a new generation
//! of routes, pools and limits is built beside the running one and swapped
//! in atomically. Requests already routed finish on the generation they
//! started on; instances whose URL (and weight) did not change are carried
//! over with their health and load state, as are registrations.
//!
//! Connection settings (`max_connections`, head limits, timeouts) apply to
//! connections accepted after the reload. Only `listen` and `workers` are
//! read once at start (a reload that changes them logs a warning).

use crate::body::{json_response, problem_response, Body};
use crate::proxy::GatewayState;
use arc_swap::ArcSwap;
use http::{Method, Request, Response, StatusCode};
use shoal_core::settings::GatewaySettings;
use shoal_core::Problem;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Produces fresh settings on each reload (may block: it runs on a
/// blocking thread).
pub type SettingsLoader = Arc<dyn Fn() -> Result<GatewaySettings, String> + Send + Sync>;

/// The gateway's current generation, swapped whole on reload.
pub struct Shared {
    pub current: ArcSwap<GatewayState>,
    pub loader: Option<SettingsLoader>,
    /// One reload at a time.
    lock: tokio::sync::Mutex<()>,
    /// Woken after a reload so DNS membership follows at once.
    pub reloaded: Notify,
    /// The console's history and live feed (`console/`).
    pub console: crate::console::live::Console,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("reloadable", &self.loader.is_some())
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub fn new(state: GatewayState) -> Shared {
        Shared {
            current: ArcSwap::from_pointee(state),
            loader: None,
            lock: tokio::sync::Mutex::new(()),
            reloaded: Notify::new(),
            console: Default::default(),
        }
    }

    pub fn load(&self) -> Arc<GatewayState> {
        self.current.load_full()
    }
}

/// A loader that reads `[gateway]` from a settings file, with `SHOAL_*`
/// environment overrides, as `shoal gateway --config <path>` does. The
/// listen address of the running gateway is kept.
pub fn file_loader(path: PathBuf) -> SettingsLoader {
    Arc::new(move || {
        shoal_core::settings::load(Some(&path), std::env::vars())
            .map(|s| s.gateway)
            .map_err(|e| e.to_string())
    })
}

/// What a reload changed, for the admin answer and the log.
#[derive(Debug, serde::Serialize)]
pub struct ReloadSummary {
    pub pools: usize,
    pub routes: usize,
    /// Instances carried over with their state.
    pub kept_instances: usize,
    pub new_instances: usize,
    /// Settings that changed but only take effect on restart.
    pub needs_restart: Vec<&'static str>,
}

/// Reads the settings again and swaps them in. On any error the running
/// settings stay.
///
/// Cancel safety: the swap is the last step and is atomic; cancelling
/// before it leaves the running generation untouched.
pub async fn reload(shared: &Shared) -> Result<ReloadSummary, String> {
    let _one = shared.lock.lock().await;
    let loader = shared
        .loader
        .clone()
        .ok_or("this gateway was started without a settings file to reload")?;
    let mut settings = tokio::task::spawn_blocking(move || {
        let load = &*loader;
        load()
    })
    .await
    .map_err(|e| format!("the settings loader panicked: {e}"))??;
    let old = shared.load();
    // The listener is bound once; keep its address whatever the file says.
    let mut needs_restart = Vec::new();
    {
        let (a, b) = (&old.settings, &settings);
        let checks: [(&'static str, bool); 5] = [
            ("listen", a.listen != b.listen && b.listen.port() != 0),
            ("workers", a.workers != b.workers),
            ("redis_url", a.redis_url != b.redis_url),
            ("redis_prefix", a.redis_prefix != b.redis_prefix),
            ("redis_timeout_ms", a.redis_timeout_ms != b.redis_timeout_ms),
        ];
        needs_restart.extend(checks.iter().filter(|(_, c)| *c).map(|(k, _)| *k));
    }
    settings.listen = old.settings.listen;
    settings.validate().map_err(|e| e.to_string())?;
    // Off the runtime thread: certificate and CA files are read here.
    let mut next = tokio::task::spawn_blocking(move || crate::build_state(settings))
        .await
        .map_err(|e| format!("building the new settings panicked: {e}"))?
        .map_err(|e| e.to_string())?;
    // Carry over what must outlive a generation. (Anything else built by
    // `build_state` that holds state, such as a cache, belongs here too.)
    // The upstream clients hold the pooled connections: kept unless
    // their own settings changed (then connections already open finish
    // their requests on the old clients and close with them).
    if next.client.same_as(&old.client) {
        next.client = old.client.clone();
    } else {
        tracing::info!(
            old = ?old.client.settings,
            new = ?next.client.settings,
            "upstream client settings changed: new upstream connections use them"
        );
    }
    next.draining = Arc::clone(&old.draining);
    next.coord = old.coord.clone();
    next.limits.carry_from(&old.limits);
    if let (Some(new), Some(old)) = (next.cache.as_mut(), old.cache.as_ref()) {
        new.carry_from(old);
    }
    let (mut kept, mut fresh) = (0, 0);
    for pool in &next.pools {
        if let Some(o) = old.pool(&pool.name) {
            pool.carry_from(o);
        }
        let olds = old.pool(&pool.name).map(|o| o.instances());
        for i in pool.instances().iter() {
            if olds
                .as_ref()
                .is_some_and(|o| o.iter().any(|x| Arc::ptr_eq(x, i)))
            {
                kept += 1;
            } else {
                fresh += 1;
            }
        }
    }
    let summary = ReloadSummary {
        pools: next.pools.len(),
        routes: next.router.routes().len(),
        kept_instances: kept,
        new_instances: fresh,
        needs_restart,
    };
    shared.current.store(Arc::new(next));
    shared.reloaded.notify_waiters();
    if !summary.needs_restart.is_empty() {
        tracing::warn!(settings = ?summary.needs_restart, "these settings changed but take effect only on restart");
    }
    tracing::info!(?summary, "gateway settings reloaded");
    Ok(summary)
}

/// Reloads and records the outcome in metrics and the log.
pub async fn reload_logged(shared: &Shared, why: &str) -> Result<ReloadSummary, String> {
    let result = reload(shared).await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    metrics::counter!("shoal_gateway_reloads_total", "result" => outcome).increment(1);
    if let Err(e) = &result {
        tracing::error!(trigger = why, error = %e, "reload failed; the running settings stay");
    }
    result
}

/// Reloads on every SIGHUP until `stop` is cancelled (Unix only).
pub async fn on_sighup(shared: Arc<Shared>, stop: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload through the admin API");
                return;
            }
        };
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                got = hup.recv() => if got.is_none() { return },
            }
            tracing::info!("SIGHUP: reloading the settings");
            let _ = reload_logged(&shared, "sighup").await;
        }
    }
    #[cfg(not(unix))]
    {
        let _ = shared;
        stop.cancelled().await;
    }
}

/// `POST /_gateway/admin/reload` (already authorized).
pub async fn admin<B>(shared: &Shared, req: &Request<B>, request_id: &str) -> Response<Body> {
    if req.method() != Method::POST {
        let mut r = problem_response(
            &Problem::new(405, "method-not-allowed", "Method not allowed", "use POST"),
            request_id,
        );
        r.headers_mut()
            .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
        return r;
    }
    match reload_logged(shared, "admin").await {
        Ok(summary) => json_response(
            StatusCode::OK,
            &serde_json::json!({ "reloaded": true, "summary": summary }),
        ),
        Err(e) => problem_response(
            &Problem::validation(format!("reload failed; the running settings stay: {e}")),
            request_id,
        ),
    }
}
