//! `POST /_gateway/admin/purge` (already authorized by the admin API):
//! `{"urls": [...], "tags": [...], "all": false}` removes stored responses
//! by URL (`http://host/path?query`, or `/path?query` on every host), by
//! surrogate key (`Surrogate-Key` / `Cache-Tag`) or all of them, then
//! repeats the purge on every `gateway.cache.purge_peers` entry (each
//! address of a host name) with `x-shoal-purge-relayed: 1`, which stops
//! the peers from fanning out again, and publishes it to every gateway
//! sharing `gateway.redis_url` (`coord.rs`).

use super::HttpCache;
use crate::body::{full, json_response, problem_response, Body};
use crate::proxy::GatewayState;
use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use shoal_core::Problem;
use std::sync::Arc;
use std::time::Duration;

/// Set on purges relayed to peers; a relayed purge is not relayed again.
pub const RELAYED: &str = "x-shoal-purge-relayed";

const BODY_LIMIT: usize = 1024 * 1024;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    #[serde(default)]
    pub urls: Vec<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub all: bool,
}

pub async fn handle(
    state: &Arc<GatewayState>,
    req: Request<Body>,
    request_id: &str,
) -> Response<Body> {
    let relayed = req.headers().contains_key(RELAYED);
    let bytes = match crate::body::read_request_body(req.into_body(), BODY_LIMIT, "purge").await {
        Ok(bytes) => bytes,
        Err(problem) => return problem_response(&problem, request_id),
    };
    let body: PurgeRequest = match serde_json::from_slice(&bytes) {
        Ok(b) => b,
        Err(e) => {
            return problem_response(
                &Problem::validation(format!(
                    "body must be JSON like {{\"urls\":[\"http://host/path\"],\"tags\":[\"product:1\"]}}: {e}"
                )),
                request_id,
            )
        }
    };
    for (i, u) in body.urls.iter().enumerate() {
        if parse_url(u).is_none() {
            return problem_response(
                &Problem::validation(format!("`{u}` must be http://host/path or /path"))
                    .with_field(format!("urls[{i}]"), "not a URL or path"),
                request_id,
            );
        }
    }
    let local = match &state.cache {
        Some(cache) => apply(cache, &body).is_ok(),
        None => false,
    };
    metrics::counter!("shoal_gateway_cache_purges_total").increment(1);
    tracing::info!(
        urls = body.urls.len(),
        tags = body.tags.len(),
        all = body.all,
        relayed,
        "cache purge"
    );

    let peers = match (&state.cache, relayed) {
        (Some(cache), false) => fan_out(state, cache, &bytes).await,
        _ => Vec::new(),
    };
    let published = match (&state.coord, relayed) {
        (Some(coord), false) => Some(match coord.publish_purge(body.clone()).await {
            Ok(()) => serde_json::json!({ "ok": true }),
            Err(e) => serde_json::json!({ "ok": false, "error": e }),
        }),
        _ => None,
    };
    json_response(
        StatusCode::OK,
        &serde_json::json!({
            "purged": { "urls": body.urls.len(), "tags": body.tags.len(), "all": body.all },
            "cache_enabled": local,
            "peers": peers,
            "published": published,
        }),
    )
}

/// Applies a purge to this gateway's cache; `Err` names a URL that is not
/// one (nothing is purged then).
pub(crate) fn apply(cache: &HttpCache, purge: &PurgeRequest) -> Result<(), String> {
    let urls = purge
        .urls
        .iter()
        .map(|u| parse_url(u).ok_or_else(|| format!("`{u}` is not a URL or path")))
        .collect::<Result<Vec<_>, _>>()?;
    purge_local(cache, &urls, &purge.tags, purge.all);
    Ok(())
}

/// Empties the whole cache.
pub(crate) fn purge_everything(cache: &HttpCache) {
    purge_local(cache, &[], &[], true);
}

/// A purge target.
enum Target {
    /// A URL key.
    Url(String),
    /// `/path?query` on every host.
    Path(String),
}

fn parse_url(u: &str) -> Option<Target> {
    let u = u.trim();
    if u.starts_with('/') {
        return Some(Target::Path(u.to_string()));
    }
    let rest = u
        .strip_prefix("http://")
        .or_else(|| u.strip_prefix("https://"))?;
    let (host, pq) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if host.is_empty() {
        return None;
    }
    Some(Target::Url(format!("{}{pq}", super::scheme_host(host))))
}

fn purge_local(cache: &HttpCache, urls: &[Target], tags: &[String], all: bool) {
    cache.bump_epoch();
    if all {
        cache.core.store.purge_all();
        cache.core.pass_marks.invalidate_all();
        return;
    }
    for t in urls {
        match t {
            Target::Url(u) => cache.invalidate_url(u),
            Target::Path(p) => cache.core.store.purge_path(p),
        }
    }
    if !tags.is_empty() {
        cache.core.store.purge_tags(tags.to_vec());
    }
}

/// Each peer's base URLs: one per address when the peer is named by a
/// host name (every pod of a headless Service), else the peer itself (and
/// itself too when the lookup fails, so the failure is reported).
async fn peer_urls(peers: &[String]) -> Vec<String> {
    let mut urls = Vec::new();
    for peer in peers {
        let Some((host, port)) = peer.parse::<http::Uri>().ok().and_then(|u| {
            let a = u.authority()?;
            Some((a.host().to_string(), a.port_u16().unwrap_or(80)))
        }) else {
            urls.push(peer.trim_end_matches('/').to_string());
            continue;
        };
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if bare.parse::<std::net::IpAddr>().is_ok() {
            urls.push(peer.trim_end_matches('/').to_string());
            continue;
        }
        let lookup = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::lookup_host((bare, port)),
        )
        .await;
        match lookup {
            Ok(Ok(addrs)) => {
                let mut found: Vec<String> = addrs.map(|a| format!("http://{a}")).collect();
                found.sort();
                found.dedup();
                if found.is_empty() {
                    urls.push(peer.trim_end_matches('/').to_string());
                }
                urls.extend(found);
            }
            _ => urls.push(peer.trim_end_matches('/').to_string()),
        }
    }
    urls
}

/// Sends the same purge to every peer at once; one result per peer.
async fn fan_out(state: &GatewayState, cache: &HttpCache, body: &Bytes) -> Vec<serde_json::Value> {
    let peers = peer_urls(&cache.settings.purge_peers).await;
    let sends = peers.iter().map(|peer| {
        let url = format!("{peer}/_gateway/admin/purge");
        let mut req = Request::new(full(body.clone()));
        *req.method_mut() = Method::POST;
        let uri = url.parse::<http::Uri>();
        let client = state.client.http1.clone();
        let token = cache.settings.admin_token.clone();
        let timeout = cache.settings.purge_peer_timeout;
        async move {
            let uri = match uri {
                Ok(u) => u,
                Err(e) => return serde_json::json!({ "peer": peer, "ok": false, "error": e.to_string() }),
            };
            *req.uri_mut() = uri;
            let h = req.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            h.insert(RELAYED, HeaderValue::from_static("1"));
            if let Some(t) = token.and_then(|t| HeaderValue::from_str(&format!("Bearer {t}")).ok()) {
                h.insert(AUTHORIZATION, t);
            }
            match tokio::time::timeout(timeout, client.request(req)).await {
                Ok(Ok(r)) if r.status().is_success() => {
                    serde_json::json!({ "peer": peer, "ok": true, "status": r.status().as_u16() })
                }
                Ok(Ok(r)) => {
                    metrics::counter!("shoal_gateway_cache_purge_peer_errors_total").increment(1);
                    tracing::warn!(peer = %peer, status = r.status().as_u16(), "purge relay refused");
                    serde_json::json!({ "peer": peer, "ok": false, "status": r.status().as_u16() })
                }
                Ok(Err(e)) => {
                    metrics::counter!("shoal_gateway_cache_purge_peer_errors_total").increment(1);
                    tracing::warn!(peer = %peer, error = %e, "purge relay failed");
                    serde_json::json!({ "peer": peer, "ok": false, "error": e.to_string() })
                }
                Err(_) => {
                    metrics::counter!("shoal_gateway_cache_purge_peer_errors_total").increment(1);
                    tracing::warn!(peer = %peer, "purge relay timed out");
                    serde_json::json!({ "peer": peer, "ok": false, "error": "timed out" })
                }
            }
        }
    });
    futures_util::future::join_all(sends).await
}
