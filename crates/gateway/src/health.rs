//! Active health checks: every `health_interval_ms` each instance of each
//! pool gets `GET health_path` (or, with an empty `health_path`, a TCP
//! connect) with `health_timeout_ms`; thresholds turn
//! results into up/down, a 503 marks an instance draining at once, a
//! timeout does not count against an instance that answered proxied
//! requests meanwhile, and lapsed registrations are dropped.

use crate::body::empty;
use crate::pool::{CheckOutcome, Instance, Pool};
use crate::proxy::UpstreamClient;
use http::{Request, StatusCode, Uri};
use http_body_util::BodyExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Checks one instance once.
pub async fn check(
    client: &UpstreamClient,
    instance: &Instance,
    path: &str,
    timeout: Duration,
) -> CheckOutcome {
    if path.is_empty() {
        // Servers without a health endpoint: up while they accept.
        let port = crate::pool::port_of(&instance.scheme, &instance.authority);
        // `[::1]` → `::1`: the resolver wants the bare address.
        let host = instance
            .authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let connect = tokio::net::TcpStream::connect((host, port));
        return match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(_)) => CheckOutcome::Passed,
            Ok(Err(_)) => CheckOutcome::Failed(None),
            Err(_) => CheckOutcome::TimedOut,
        };
    }
    let uri = match Uri::builder()
        .scheme(instance.scheme.clone())
        .authority(instance.authority.clone())
        .path_and_query(path)
        .build()
    {
        Ok(u) => u,
        Err(_) => return CheckOutcome::Failed(None),
    };
    let mut req = Request::new(empty());
    *req.uri_mut() = uri;
    req.headers_mut().insert(
        http::header::USER_AGENT,
        http::HeaderValue::from_static("shoal-gateway-health"),
    );
    let attempt = async {
        let response = client.request(req).await.ok()?;
        let status = response.status();
        // Read (a bounded amount of) the body so the connection can be reused.
        let _ = http_body_util::Limited::new(response.into_body(), 64 * 1024)
            .collect()
            .await;
        Some(status)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Some(status)) if status.is_success() => CheckOutcome::Passed,
        Ok(Some(StatusCode::SERVICE_UNAVAILABLE)) => CheckOutcome::Draining,
        Ok(Some(StatusCode::NOT_FOUND)) => CheckOutcome::NoHealthPath,
        Ok(Some(status)) => CheckOutcome::Failed(Some(status.as_u16())),
        Ok(None) => CheckOutcome::Failed(None),
        Err(_) => CheckOutcome::TimedOut,
    }
}

/// Runs the checks of every pool of the current settings (they may be
/// reloaded between rounds) until `stop` is cancelled.
/// Cancel safety: each round only reads and updates instance state, so
/// stopping between or within rounds leaves nothing half done.
pub async fn run(shared: Arc<crate::reload::Shared>, stop: CancellationToken) {
    let mut first = true;
    // What the registrations file holds (written when a round changes it).
    let mut saved: Vec<crate::registrations::Saved> = Vec::new();
    loop {
        let interval = Duration::from_millis(shared.load().settings.health_interval_ms);
        if !std::mem::take(&mut first) {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
        let state = shared.load();
        let clients = &state.client;
        let pools: &[Arc<Pool>] = &state.pools;
        let path = state.settings.health_path.clone();
        let timeout = Duration::from_millis(state.settings.health_timeout_ms);
        let round = pools.iter().map(|pool| {
            let path = &path;
            async move {
                let now = Instant::now();
                pool.expire_registrations(now);
                let instances = pool.instances();
                let checks = instances.iter().map(|instance| async move {
                    let began = Instant::now();
                    let outcome = check(clients.for_pool(pool), instance, path, timeout).await;
                    if outcome == CheckOutcome::TimedOut {
                        metrics::counter!("shoal_gateway_health_check_timeouts_total", "pool" => pool.name.clone())
                            .increment(1);
                    }
                    if instance.record_check(outcome, &pool.config, began, Instant::now()) {
                        tracing::info!(
                            pool = %pool.name,
                            instance = %instance.url,
                            ?outcome,
                            available = instance.is_available(Instant::now()),
                            "instance availability changed"
                        );
                    }
                    if outcome == CheckOutcome::NoHealthPath && instance.note_missing_health_path()
                    {
                        tracing::warn!(
                            pool = %pool.name,
                            instance = %instance.url,
                            "the health check path {path} answered 404: the instance counts as up \
                             while it answers; set gateway.health_path to a path it answers 200 \
                             on (503 while draining), or to \"\" (--health-path '') for TCP checks"
                        );
                    }
                });
                futures_util::future::join_all(checks).await;
                let available = instances
                    .iter()
                    .filter(|i| i.is_available(Instant::now()))
                    .count();
                metrics::gauge!("shoal_gateway_available_instances", "pool" => pool.name.clone())
                    .set(available as f64);
            }
        });
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = futures_util::future::join_all(round) => {}
        }
        let file = &state.settings.registrations_file;
        if !file.is_empty() {
            let now = crate::registrations::snapshot(pools);
            if now != saved {
                match crate::registrations::save(std::path::Path::new(file), &now).await {
                    Ok(()) => saved = now,
                    Err(e) => tracing::warn!(file, error = %e, "cannot save registrations"),
                }
            }
        }
    }
}
