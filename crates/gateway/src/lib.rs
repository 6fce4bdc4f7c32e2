//! The edge gateway: accepts HTTP/1.1 and HTTP/2 on one listener, routes
//! by host and path prefix to pools of upstream instances, balances,
//! health-checks, ejects, retries where safe, and serves its own
//! `/_gateway/` endpoints. See `docs/gateway.md`.
//!
//! The request path, in order: [`Gateway::run`] accepts a connection and
//! serves it with hyper-util's auto builder; each request goes to
//! `admin::handle` (under `/_gateway/`) or `proxy::proxy`, which routes
//! (`routes`), picks an instance (`pool`, `balance`), forwards it through
//! the shared upstream client and retries on another instance when that is
//! safe. `health` runs beside it.

mod admin;
mod balance;
mod body;
mod health;
mod pool;
mod proxy;
mod routes;

use body::Body;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use pool::{Instance, Pool, PoolConfig};
use proxy::GatewayState;
use routes::{Route, Router};
use shoal_core::settings::GatewaySettings;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Why the gateway could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("invalid gateway settings: {0}")]
    Settings(#[from] shoal_core::settings::SettingsError),
    #[error("invalid gateway setting `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read the listener's address: {0}")]
    LocalAddr(std::io::Error),
}

/// A bound gateway, ready to [`run`](Gateway::run).
#[derive(Debug)]
pub struct Gateway {
    listener: TcpListener,
    local_addr: SocketAddr,
    state: Arc<GatewayState>,
}

impl Gateway {
    /// Binds the listener (port 0 allowed) and builds pools from settings;
    /// starts nothing yet.
    pub async fn bind(settings: GatewaySettings) -> Result<Gateway, GatewayError> {
        settings.validate()?;
        // Install the recorder before the first metric is recorded.
        let _ = shoal_core::telemetry::prometheus();
        let state = build_state(settings)?;
        let addr = state.settings.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| GatewayError::Bind { addr, source })?;
        let local_addr = listener.local_addr().map_err(GatewayError::LocalAddr)?;
        Ok(Gateway {
            listener,
            local_addr,
            state: Arc::new(state),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until `shutdown` is cancelled, then stops accepting and lets
    /// in-flight requests finish within `settings.shutdown_timeout_secs`.
    ///
    /// Cancel safety: cancel `shutdown` for a graceful stop. Dropping the
    /// future instead stops accepting and the health checks at once, but
    /// connections already accepted run on in their own tasks until their
    /// clients close them.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), GatewayError> {
        let Gateway {
            listener,
            local_addr,
            state,
        } = self;
        let settings = &state.settings;
        let health_stop = CancellationToken::new();
        let health = tokio::spawn(health::run(
            state.client.clone(),
            state.pools.clone(),
            settings.health_path.clone(),
            Duration::from_millis(settings.health_interval_ms),
            Duration::from_millis(settings.health_timeout_ms),
            health_stop.clone(),
        ));
        // Stops the health checks however this future ends.
        let _health_guard = health_stop.clone().drop_guard();

        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new());
        builder.http2().timer(TokioTimer::new());
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        tracing::info!(addr = %local_addr, pools = state.pools.len(), "gateway serving");

        loop {
            let (stream, client_addr) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off
                        // rather than spin.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let state = Arc::clone(&state);
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(handle(state, client_addr, req).await) }
            });
            let connection = builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned();
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::debug!(client = %client_addr, error = %e, "client connection ended with an error");
                }
            });
        }

        state.draining.store(true, Ordering::Relaxed);
        drop(listener);
        let open = graceful.count();
        tracing::info!(connections = open, "gateway draining");
        let grace = Duration::from_secs(settings.shutdown_timeout_secs);
        if tokio::time::timeout(grace, graceful.shutdown())
            .await
            .is_err()
        {
            tracing::warn!(
                seconds = settings.shutdown_timeout_secs,
                "in-flight requests did not finish in time; closing them"
            );
        }
        health_stop.cancel();
        let _ = health.await;
        tracing::info!("gateway stopped");
        Ok(())
    }
}

/// Every request: the gateway's own endpoints or the proxy.
async fn handle(
    state: Arc<GatewayState>,
    client_addr: SocketAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let request_id = shoal_core::ids::request_id_or_new(
        req.headers()
            .get(body::X_REQUEST_ID)
            .and_then(|v| v.to_str().ok()),
    );
    if req.uri().path().starts_with("/_gateway/") {
        return admin::handle(state, client_addr, req, &request_id).await;
    }
    proxy::proxy(state, client_addr, req, request_id, started).await
}

/// Builds the client, pools and routes from validated settings.
fn build_state(settings: GatewaySettings) -> Result<GatewayState, GatewayError> {
    let invalid = |key: String, message: String| GatewayError::Invalid { key, message };
    let config = PoolConfig {
        eject_base: Duration::from_millis(settings.eject_base_ms),
        eject_after_errors: settings.eject_after_errors,
        max_ejection_percent: settings.max_ejection_percent,
        unhealthy_threshold: settings.unhealthy_threshold,
        healthy_threshold: settings.healthy_threshold,
        retry_budget_percent: settings.retry_budget_percent,
        retry_budget_min_per_sec: settings.retry_budget_min_per_sec,
    };
    let mut pools = Vec::new();
    for (i, p) in settings.pools.iter().enumerate() {
        if pools.iter().any(|q: &Arc<Pool>| q.name == p.name) {
            return Err(invalid(
                format!("gateway.pools[{i}].name"),
                format!("two pools are named `{}`", p.name),
            ));
        }
        let balancing = settings.balancing.get(&p.name);
        let kind = balancing
            .and_then(|b| b.balancer)
            .unwrap_or(settings.balancer);
        let hash_on = balancing.and_then(|b| b.hash_on.as_deref());
        let balancer = balance::Balancer::from_name(kind.name(), hash_on)
            .map_err(|m| invalid(format!("gateway.balancing.{}", p.name), m))?;
        let mut instances = Vec::new();
        for (j, url) in p.upstreams.iter().enumerate() {
            let weight = balancing
                .and_then(|b| {
                    b.weights
                        .get(url)
                        .or_else(|| b.weights.get(url.trim_end_matches('/')))
                })
                .copied()
                .unwrap_or(1);
            let instance = Instance::new(url, weight, None)
                .map_err(|m| invalid(format!("gateway.pools[{i}].upstreams[{j}]"), m))?;
            if instances
                .iter()
                .any(|o: &Arc<Instance>| o.url == instance.url)
            {
                return Err(invalid(
                    format!("gateway.pools[{i}].upstreams[{j}]"),
                    format!("`{url}` is listed twice"),
                ));
            }
            instances.push(Arc::new(instance));
        }
        if let Some(b) = balancing {
            for url in b.weights.keys() {
                let known = instances.iter().any(|o| o.url == url.trim_end_matches('/'));
                if !known {
                    return Err(invalid(
                        format!("gateway.balancing.{}.weights", p.name),
                        format!("`{url}` is not an upstream of pool `{}`", p.name),
                    ));
                }
            }
        }
        pools.push(Arc::new(Pool::new(
            p.name.clone(),
            balancer,
            config.clone(),
            instances,
        )));
    }

    let default_timeout = Duration::from_millis(settings.request_timeout_ms);
    let mut routes = Vec::new();
    if settings.routes.is_empty() {
        match pools.as_slice() {
            [] => tracing::warn!("the gateway has no pools: every request will get 404"),
            [only] => routes.push(Route {
                prefix: "/".into(),
                host: None,
                pool: Arc::clone(only),
                request_timeout: default_timeout,
                max_body_bytes: settings.max_body_bytes,
            }),
            _ => {
                return Err(invalid(
                    "gateway.routes".into(),
                    "there are several pools but no routes; add [[gateway.routes]] entries (prefix, pool)".into(),
                ))
            }
        }
    }
    for (i, r) in settings.routes.iter().enumerate() {
        let pool = pools.iter().find(|p| p.name == r.pool).ok_or_else(|| {
            invalid(
                format!("gateway.routes[{i}].pool"),
                format!("no pool is named `{}`", r.pool),
            )
        })?;
        if r.request_timeout_ms == Some(0) {
            return Err(invalid(
                format!("gateway.routes[{i}].request_timeout_ms"),
                "must be at least 1".into(),
            ));
        }
        routes.push(Route {
            prefix: r.prefix.clone(),
            host: r.host.as_deref().map(routes::normalize_host),
            pool: Arc::clone(pool),
            request_timeout: r
                .request_timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(default_timeout),
            max_body_bytes: r.max_body_bytes.unwrap_or(settings.max_body_bytes),
        });
    }
    if settings.request_timeout_ms == 0 {
        return Err(invalid(
            "gateway.request_timeout_ms".into(),
            "must be at least 1".into(),
        ));
    }

    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_millis(
        settings.connect_timeout_ms.max(1),
    )));
    let client: Client<HttpConnector, Body> = Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(256)
        .build(connector);

    Ok(GatewayState {
        settings,
        client,
        router: Router::new(routes),
        pools,
        draining: std::sync::atomic::AtomicBool::new(false),
    })
}
