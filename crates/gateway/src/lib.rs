//! The edge gateway: accepts HTTP/1.1 and HTTP/2 on one listener, routes
//! by host and path prefix to pools of upstream instances, balances,
//! health-checks, ejects, retries where safe, and serves its own
//! `/_gateway/` endpoints. See `docs/gateway.md`.
//!
//! The request path: [`Gateway::run`] accepts a connection, hands it to a
//! worker thread (`workers`) and serves it with hyper-util's auto builder
//! (`listener`: connection cap, head limits, idle timeout). Each request
//! then goes through the tower layers that `stack` assembles in one place:
//! connection bookkeeping, request context, the `/_gateway/` endpoints
//! (`admin`), the access log, rate limits and load shedding (`limits`),
//! WebSocket tunnels (`upgrade`), the HTTP cache (`cache`) and the proxy
//! (`proxy`), which routes (`routes`), picks an instance (`pool`,
//! `balance`), forwards it and retries on another instance when that is
//! safe.
//!
//! Beside it: `health` (active checks), `reload` (the current generation
//! of routes and pools behind an `ArcSwap`, swapped on SIGHUP or
//! `POST /_gateway/admin/reload`) and `dns` (pools following A/AAAA
//! records).

mod admin;
mod balance;
mod body;
mod cache;
mod console;
mod coord;
mod dns;
mod h1;
mod h2stall;
mod health;
mod identity;
mod limits;
mod listener;
mod pool;
mod proxy;
mod registrations;
mod reload;
mod routes;
mod stack;
mod upgrade;
mod upstream;
mod workers;

pub use reload::SettingsLoader;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use pool::{Instance, Pool, PoolConfig};
use proxy::GatewayState;
use routes::{Route, Router};
use shoal_core::settings::GatewaySettings;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
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
    shared: Arc<reload::Shared>,
}

impl Gateway {
    /// Binds the listener (port 0 allowed) and builds pools from settings;
    /// starts nothing yet.
    pub async fn bind(settings: GatewaySettings) -> Result<Gateway, GatewayError> {
        settings.validate()?;
        // Install the recorder before the first metric is recorded.
        let _ = shoal_core::telemetry::prometheus();
        let state = build_state(settings)?;
        if !state.settings.registrations_file.is_empty() {
            registrations::load(
                std::path::Path::new(&state.settings.registrations_file),
                &state.pools,
            )
            .await;
        }
        let addr = state.settings.listen;
        let listener = shoal_core::ports::bind_listener(addr)
            .map_err(|source| GatewayError::Bind { addr, source })?;
        let local_addr = listener.local_addr().map_err(GatewayError::LocalAddr)?;
        Ok(Gateway {
            listener,
            local_addr,
            shared: Arc::new(reload::Shared::new(state)),
        })
    }

    /// Makes the settings reloadable (SIGHUP, `POST /_gateway/admin/reload`)
    /// from this settings file: `[gateway]` is read again with `SHOAL_*`
    /// environment overrides. Call before [`run`](Gateway::run).
    pub fn with_config_path(self, path: std::path::PathBuf) -> Gateway {
        self.with_settings_loader(reload::file_loader(path))
    }

    /// Makes the settings reloadable with any loader (for instance one
    /// that also re-applies command-line flags). It runs on a blocking
    /// thread; an `Err` leaves the running settings in place.
    pub fn with_settings_loader(mut self, loader: SettingsLoader) -> Gateway {
        match Arc::get_mut(&mut self.shared) {
            Some(shared) => shared.loader = Some(loader),
            None => unreachable!("the gateway is not running yet"),
        }
        self
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
            shared,
        } = self;
        let state = shared.load();
        let settings = state.settings.clone();
        let background = CancellationToken::new();
        // Stops the health checks, DNS refresh and SIGHUP listener however
        // this future ends.
        let _background_guard = background.clone().drop_guard();
        let health = tokio::spawn(health::run(Arc::clone(&shared), background.clone()));
        tokio::spawn(dns::run(Arc::clone(&shared), background.clone()));
        if let Some(coord) = &state.coord {
            tokio::spawn(Arc::clone(coord).follow_purges(Arc::clone(&shared), background.clone()));
        }
        if shared.loader.is_some() {
            tokio::spawn(reload::on_sighup(Arc::clone(&shared), background.clone()));
        }

        // Connection settings follow reloads: rebuilt when the generation changes.
        let mut listen_config = listener::ListenConfig::new(&state);
        let connections = Arc::new(listener::Connections::default());
        shared.console.attach(local_addr, Arc::clone(&connections));
        tokio::spawn(console::live::run(Arc::clone(&shared), background.clone()));
        let close_all = CancellationToken::new();
        // Carried across reloads: every generation shares it.
        let draining = Arc::clone(&state.draining);
        let grace = Duration::from_secs(settings.shutdown_timeout_secs);
        let threads = workers::count(settings.workers);
        let workers = workers::start(threads - 1, &state.client, Arc::clone(&connections), grace);
        let mut next_worker = 0usize;
        tracing::info!(addr = %local_addr, pools = state.pools.len(), threads, "gateway serving");
        drop(state);

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
            listen_config.refresh(&shared.load());
            let conn_guard = match connections.try_open(&listen_config.limits, client_addr.ip()) {
                Ok(guard) => guard,
                Err(why) => {
                    listener::refuse(stream, client_addr, listen_config.tls.is_some(), why);
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let activity = listener::Activity::new();
            let conn = listener::ConnInfo {
                guard: Arc::new(conn_guard),
                closing: close_all.clone(),
                draining: Arc::clone(&draining),
            };
            // The request path: `stack.rs`, as tower layers.
            let service = stack::stack(
                Arc::clone(&shared),
                client_addr,
                Arc::clone(&activity),
                conn.clone(),
            );
            let serve = listener::serve(&listen_config, client_addr, service, activity, conn);
            // Connections go round the threads: this one, then each
            // worker thread, which serves it on its own runtime.
            next_worker = (next_worker + 1) % threads;
            match next_worker.checked_sub(1).and_then(|i| workers.get(i)) {
                None => {
                    tokio::spawn(serve(stream));
                }
                Some(worker) => worker.hand_over(stream, serve),
            }
        }
        drop(workers);

        shared.load().draining.store(true, Ordering::Relaxed);
        drop(listener);
        tracing::info!(connections = connections.open(), "gateway draining");
        close_all.cancel();
        if tokio::time::timeout(grace, connections.all_closed())
            .await
            .is_err()
        {
            tracing::warn!(
                seconds = settings.shutdown_timeout_secs,
                "in-flight requests did not finish in time; closing them"
            );
        }
        background.cancel();
        let _ = health.await;
        tracing::info!("gateway stopped");
        Ok(())
    }
}

/// The settings the upstream clients are built from: a reload that
/// changes them builds new clients (`reload.rs`, and each worker thread's
/// own in `workers.rs`); one that does not keeps the pooled connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClientSettings {
    pub(crate) connect_timeout_ms: u64,
    pub(crate) idle_per_instance: usize,
}

impl ClientSettings {
    pub(crate) fn of(settings: &GatewaySettings) -> ClientSettings {
        ClientSettings {
            connect_timeout_ms: settings.connect_timeout_ms.max(1),
            idle_per_instance: settings.upstream_idle_per_instance,
        }
    }
}

/// TLS to `https://` upstreams: the Mozilla roots and the certificates of
/// `upstream_ca_file`, and an id of that file's content, so a reload that
/// changes it builds new clients and one that does not keeps them.
#[derive(Clone)]
pub(crate) struct UpstreamTls {
    pub(crate) config: Arc<tokio_rustls::rustls::ClientConfig>,
    /// For the gateway's own HTTP/1.1 codec (ALPN `http/1.1`).
    pub(crate) h1: tokio_rustls::TlsConnector,
    pub(crate) id: u64,
}

pub(crate) fn upstream_tls(settings: &GatewaySettings) -> Result<UpstreamTls, GatewayError> {
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let mut id = 0u64;
    if !settings.upstream_ca_file.is_empty() {
        let invalid = |message: String| GatewayError::Invalid {
            key: "gateway.upstream_ca_file".into(),
            message,
        };
        let file = &settings.upstream_ca_file;
        let pem = std::fs::read(file).map_err(|e| invalid(format!("cannot read `{file}`: {e}")))?;
        let mut added = 0;
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| invalid(format!("`{file}`: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| invalid(format!("`{file}`: {e}")))?;
            added += 1;
        }
        if added == 0 {
            return Err(invalid(format!("`{file}` holds no PEM certificate")));
        }
        // A hash of the content: changes with it.
        id = crate::balance::fnv1a(&[&pem]);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| GatewayError::Invalid {
            key: "gateway.upstream_ca_file".into(),
            message: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut h1 = config.clone();
    h1.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(UpstreamTls {
        config: Arc::new(config),
        h1: tokio_rustls::TlsConnector::from(Arc::new(h1)),
        id,
    })
}

/// The upstream clients (keep-alive pools) with the settings' connect
/// timeout and idle connections per instance: HTTP/1.1, and HTTP/2 with
/// prior knowledge for `protocol = "h2c"` pools; `https://` instances
/// over TLS with `tls`.
pub(crate) fn upstream_clients(
    settings: ClientSettings,
    tls: &UpstreamTls,
) -> proxy::UpstreamClients {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_millis(settings.connect_timeout_ms)));
    connector.enforce_http(false);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*tls.config).clone())
        .https_or_http()
        // HTTP/1.1 only by ALPN: this client carries upgrades and health
        // checks, which an `https://` instance choosing h2 would break.
        // (h2c pools speak HTTP/2 in the clear, where ALPN plays no part.)
        .enable_http1()
        .wrap_connector(connector);
    let client = |h2c: bool| {
        Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(settings.idle_per_instance)
            .http2_only(h2c)
            .timer(TokioTimer::new())
            .build(connector.clone())
    };
    proxy::UpstreamClients {
        settings,
        tls: tls.clone(),
        http1: client(false),
        h2c: client(true),
    }
}

/// Builds the client, pools and routes from validated settings.
pub(crate) fn build_state(settings: GatewaySettings) -> Result<GatewayState, GatewayError> {
    let invalid = |key: String, message: String| GatewayError::Invalid { key, message };
    let config = PoolConfig {
        eject_base: Duration::from_millis(settings.eject_base_ms),
        eject_after_errors: settings.eject_after_errors,
        max_ejection_percent: settings.max_ejection_percent,
        unhealthy_threshold: settings.unhealthy_threshold,
        healthy_threshold: settings.healthy_threshold,
        retry_budget_percent: settings.retry_budget_percent,
        retry_budget_min_per_sec: settings.retry_budget_min_per_sec,
        ewma_decay: Duration::from_millis(settings.ewma_decay_ms.max(1)),
        latency_exponent: settings.ewma_latency_exponent,
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
                .map_err(|m| invalid(format!("gateway.pools[{i}].upstreams[{j}]"), m))?
                .with_ewma(&config);
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
        let mut pool = Pool::new(p.name.clone(), balancer, config.clone(), instances);
        pool.h2c = p.protocol == shoal_core::settings::UpstreamProtocol::H2c;
        if pool.h2c {
            if let Some(j) = p.upstreams.iter().position(|u| u.starts_with("https://")) {
                return Err(invalid(
                    format!("gateway.pools[{i}].upstreams[{j}]"),
                    "h2c is HTTP/2 in the clear: an h2c pool's upstreams are http://".into(),
                ));
            }
        }
        pools.push(Arc::new(pool));
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
                request_headers: routes::HeaderEdits::default(),
                response_headers: routes::HeaderEdits::default(),
                require_session: false,
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
        let edits = |rules, field: &str| {
            routes::HeaderEdits::new(rules, &format!("gateway.routes[{i}].{field}"))
                .map_err(|(key, message)| invalid(key, message))
        };
        let request_headers = edits(&r.request_headers, "request_headers")?;
        let response_headers = edits(&r.response_headers, "response_headers")?;
        routes.push(Route {
            request_headers,
            response_headers,
            prefix: r.prefix.clone(),
            host: r.host.as_deref().map(routes::normalize_host),
            pool: Arc::clone(pool),
            request_timeout: r
                .request_timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(default_timeout),
            max_body_bytes: r.max_body_bytes.unwrap_or(settings.max_body_bytes),
            require_session: r.require_session,
        });
    }
    let identity =
        identity::Identity::new(&settings.identity, routes.iter().any(|r| r.require_session))
            .map_err(|(key, message)| invalid(key, message))?;
    if settings.request_timeout_ms == 0 {
        return Err(invalid(
            "gateway.request_timeout_ms".into(),
            "must be at least 1".into(),
        ));
    }

    let client = upstream_clients(ClientSettings::of(&settings), &upstream_tls(&settings)?);
    let coord = coord::Coord::new(&settings).map_err(|m| invalid("gateway.redis_url".into(), m))?;
    let hsts = (settings.tls() && settings.hsts_max_age_secs > 0)
        .then(|| format!("max-age={}", settings.hsts_max_age_secs))
        .and_then(|v| http::HeaderValue::from_str(&v).ok());
    Ok(GatewayState {
        hsts,
        tls: listener::tls_acceptor(&settings)?,
        cache: cache::HttpCache::from_settings(&settings),
        limits: limits::Limits::new(&settings),
        settings,
        client,
        router: Router::new(routes),
        identity,
        pools,
        draining: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        coord,
    })
}
