//! DNS membership: with `gateway.dns_refresh_secs` above 0, every upstream
//! named by a host name (`http://catalog.internal:3000`, not an IP) is
//! resolved at start, again every period and right after a reload; the
//! pool then has one instance per A/AAAA record (`http://10.0.0.7:3000`),
//! so instances follow the records as they come and go. A failed or empty
//! lookup keeps the instances of the last good one. `https://` upstreams
//! are left as they are (their certificates name the host).

use crate::pool::{parse_upstream, Pool};
use crate::reload::Shared;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Longest wait for one lookup.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Refreshes until `stop` is cancelled.
///
/// Cancel safety: a pool's instances are replaced in one step after its
/// lookup finished; cancelling between lookups leaves each pool as the
/// last finished one left it.
pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let state = shared.load();
        let period = state.settings.dns_refresh_secs;
        let reloaded = shared.reloaded.notified();
        tokio::pin!(reloaded);
        // Register before working so a reload during the round is not missed.
        reloaded.as_mut().enable();
        if period > 0 {
            for ps in &state.settings.pools {
                if let Some(pool) = state.pool(&ps.name) {
                    for upstream in &ps.upstreams {
                        if stop.is_cancelled() {
                            return;
                        }
                        refresh(pool, upstream).await;
                    }
                }
            }
        }
        drop(state);
        let wait = Duration::from_secs(if period > 0 { period } else { 3600 });
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = reloaded => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Resolves one configured upstream and updates its pool; IP upstreams are
/// left alone.
async fn refresh(pool: &Arc<Pool>, upstream: &str) {
    let Ok((scheme, authority)) = parse_upstream(upstream) else {
        return;
    };
    if scheme == http::uri::Scheme::HTTPS {
        // Its certificate names the host, not its addresses: it stays one
        // instance, resolved on each new connection.
        return;
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.parse::<IpAddr>().is_ok() {
        return;
    }
    let port = crate::pool::port_of(&scheme, &authority);
    let name_url = format!("{scheme}://{authority}");
    let lookup = tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((host, port))).await;
    let addrs: Vec<std::net::SocketAddr> = match lookup {
        Ok(Ok(addrs)) => addrs.collect(),
        Ok(Err(e)) => {
            tracing::warn!(pool = %pool.name, upstream = %name_url, error = %e, "DNS lookup failed; keeping the instances of the last lookup");
            return;
        }
        Err(_) => {
            tracing::warn!(pool = %pool.name, upstream = %name_url, "DNS lookup timed out; keeping the instances of the last lookup");
            return;
        }
    };
    let mut resolved: Vec<String> = addrs.iter().map(|a| format!("{scheme}://{a}")).collect();
    resolved.sort();
    resolved.dedup();
    if resolved.is_empty() {
        tracing::warn!(pool = %pool.name, upstream = %name_url, "DNS lookup found no address; keeping the instances of the last lookup");
        return;
    }
    let (added, removed) = pool.follow_dns(&name_url, resolved.clone());
    if added + removed > 0 {
        metrics::counter!("shoal_gateway_dns_changes_total", "pool" => pool.name.clone())
            .increment((added + removed) as u64);
        tracing::info!(pool = %pool.name, upstream = %name_url, ?resolved, added, removed, "DNS membership changed");
    }
}
