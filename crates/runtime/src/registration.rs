//! Self-registration with gateways (`serve.register_at`, one or more): the
//! instance adds itself to a pool through each gateway's admin API, on
//! each independently (one gateway down delays no other), renews the
//! registration every third of its TTL (so one lost renewal does not drop
//! it), and deregisters as soon as it starts draining, so the gateway stops
//! sending it new requests before the listener closes. A gateway that
//! restarts learns the instance again at the next renewal.

use crate::context::AppContext;
use serde_json::json;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The URL the gateway should use for an instance listening on `addr`.
pub fn advertised_url(ctx: &AppContext, addr: SocketAddr) -> String {
    if let Some(url) = &ctx.settings.serve.advertise_url {
        return url.trim_end_matches('/').to_string();
    }
    // Settings::validate refuses an unspecified listen address with
    // gateways to register with and no advertise_url.
    format!("http://{addr}")
}

/// Registers with every gateway of `serve.register_at` and renews until
/// `shutdown`, then deregisters from each.
pub async fn run(ctx: AppContext, addr: SocketAddr, shutdown: CancellationToken) {
    let url = advertised_url(&ctx, addr);
    let gateways = ctx.settings.serve.register_at.clone();
    futures_util::future::join_all(
        gateways
            .iter()
            .map(|g| register_with(&ctx, g.trim_end_matches('/'), &url, &shutdown)),
    )
    .await;
}

/// Registers `url` with one gateway and renews until `shutdown`, then
/// deregisters.
async fn register_with(ctx: &AppContext, gateway: &str, url: &str, shutdown: &CancellationToken) {
    let s = &ctx.settings.serve;
    let pool = s.register_pool.clone();
    let ttl = s.register_ttl_secs.max(2);
    let token = ctx.settings.gateway.admin_token.clone();
    let http = match reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the registration client; not registering");
            return;
        }
    };
    let post = |path: &str, body: serde_json::Value| {
        let mut req = http
            .post(format!("{gateway}/_gateway/admin/{path}"))
            .json(&body);
        if let Some(t) = &token {
            req = req.bearer_auth(t);
        }
        req.send()
    };
    let renew_every = Duration::from_millis(ttl * 1000 / 3);
    let mut registered = false;
    let mut failures = 0u32;
    loop {
        let body = json!({"pool": pool, "url": url, "ttl_secs": ttl});
        // A registration still in flight when the drain begins is dropped:
        // the deregistration below follows at once.
        let outcome = tokio::select! {
            outcome = post("register", body) => outcome,
            _ = shutdown.cancelled() => break,
        };
        let wait = match outcome {
            Ok(r) if r.status().is_success() => {
                if !registered {
                    tracing::info!(
                        gateway,
                        pool,
                        url,
                        ttl_secs = ttl,
                        "registered with the gateway"
                    );
                }
                registered = true;
                failures = 0;
                renew_every
            }
            outcome => {
                let why = match outcome {
                    Ok(r) => format!("the gateway answered {}", r.status()),
                    Err(e) => e.to_string(),
                };
                failures += 1;
                // The first failure, then one in ten: a gateway that is
                // restarting should not flood the log.
                if failures == 1 || failures.is_multiple_of(10) {
                    tracing::warn!(gateway, pool, url, failures, error = %why, "registration failed; retrying in 1 s");
                }
                registered = false;
                Duration::from_secs(1)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    match post("deregister", json!({"pool": pool, "url": url})).await {
        Ok(r) if r.status().is_success() => {
            tracing::info!(gateway, pool, url, "deregistered from the gateway")
        }
        Ok(r) => {
            tracing::warn!(gateway, status = %r.status(), "deregistration refused; the registration lapses after its TTL")
        }
        // The gateway stopped first (the whole stack is stopping): nothing
        // left to leave.
        Err(e) if e.is_connect() => {
            tracing::debug!(gateway, "gateway gone; nothing to deregister from")
        }
        Err(e) => {
            tracing::warn!(gateway, error = %e, "deregistration failed; the registration lapses after its TTL")
        }
    }
}
