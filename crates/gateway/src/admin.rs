//! The gateway's own endpoints under `/_gateway/`: liveness, readiness,
//! Prometheus metrics, pool status, and the admin API (eject or restore an
//! instance, register or deregister instances with a TTL).

use crate::body::{full, json_response, problem_response, Body};
use crate::proxy::GatewayState;
use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use shoal_core::Problem;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Largest admin request body.
const ADMIN_BODY_LIMIT: usize = 16 * 1024;

/// Serves one request under `/_gateway/`.
pub async fn handle(
    state: Arc<GatewayState>,
    client_addr: SocketAddr,
    req: Request<Body>,
    request_id: &str,
) -> Response<Body> {
    let path = req.uri().path().trim_start_matches("/_gateway").to_string();
    let method = req.method().clone();
    let get_only = |f: &dyn Fn() -> Response<Body>| {
        if method == Method::GET || method == Method::HEAD {
            f()
        } else {
            method_not_allowed("GET", request_id)
        }
    };
    let mut response = match path.as_str() {
        "/healthz" => get_only(&|| json_response(StatusCode::OK, &serde_json::json!({"status": "ok"}))),
        "/readyz" => get_only(&|| {
            if state.draining.load(std::sync::atomic::Ordering::Relaxed) {
                problem_response(&Problem::unavailable("the gateway is draining", 1), request_id)
            } else {
                json_response(StatusCode::OK, &serde_json::json!({"status": "ready"}))
            }
        }),
        "/metrics" => get_only(&|| {
            let mut r = Response::new(full(shoal_core::telemetry::prometheus().render()));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }),
        "/cache" => get_only(&|| crate::cache::stats_json(&state)),
        "/pools" => get_only(&|| {
            json_response(
                StatusCode::OK,
                &serde_json::json!({
                    "draining": state.draining.load(std::sync::atomic::Ordering::Relaxed),
                    "upstream_client": {
                        "connect_timeout_ms": state.client.settings.connect_timeout_ms,
                        "idle_per_instance": state.client.settings.idle_per_instance,
                    },
                    "pools": state.pools.iter().map(|p| p.status_json()).collect::<Vec<_>>(),
                    "routes": state.router.routes().iter().map(|r| serde_json::json!({
                        "prefix": r.prefix,
                        "host": r.host,
                        "pool": r.pool.name,
                        "request_timeout_ms": r.request_timeout.as_millis() as u64,
                        "max_body_bytes": r.max_body_bytes,
                    })).collect::<Vec<_>>(),
                }),
            )
        }),
        admin if admin.starts_with("/admin/") => {
            if let Some(denied) = authorize(&state, client_addr, &req, request_id) {
                denied
            } else if method != Method::POST {
                method_not_allowed("POST", request_id)
            } else if admin == "/admin/purge" {
                crate::cache::purge::handle(&state, req, request_id).await
            } else {
                let action = admin.trim_start_matches("/admin/").to_string();
                match read_json::<AdminRequest>(req).await {
                    Err(problem) => problem_response(&problem, request_id),
                    Ok(body) => match admin_action(&state, &action, body) {
                        Ok(value) => json_response(StatusCode::OK, &value),
                        Err(problem) => problem_response(&problem, request_id),
                    },
                }
            }
        }
        other => problem_response(
            &Problem::not_found(format!(
                "no gateway endpoint `/_gateway{other}`; try healthz, readyz, metrics, pools or admin/..."
            )),
            request_id,
        ),
    };
    if let Ok(v) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert(crate::body::X_REQUEST_ID, v);
    }
    response
}

fn method_not_allowed(allow: &'static str, request_id: &str) -> Response<Body> {
    let mut r = problem_response(
        &Problem::new(
            405,
            "method-not-allowed",
            "Method not allowed",
            format!("use {allow}"),
        ),
        request_id,
    );
    r.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    r
}

/// With `admin_token` set, a matching bearer token is required; without
/// it, only loopback clients may use the admin API.
pub(crate) fn authorize<B>(
    state: &GatewayState,
    client_addr: SocketAddr,
    req: &Request<B>,
    request_id: &str,
) -> Option<Response<Body>> {
    match &state.settings.admin_token {
        Some(token) => {
            let given = req
                .headers()
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or("");
            if constant_time_eq(given.as_bytes(), token.as_bytes()) {
                None
            } else {
                Some(problem_response(
                    &Problem::unauthorized("send `Authorization: Bearer <gateway.admin_token>`"),
                    request_id,
                ))
            }
        }
        None if client_addr.ip().is_loopback() => None,
        None => Some(problem_response(
            &Problem::forbidden(
                "the admin API answers loopback clients only; set gateway.admin_token to allow others",
            ),
            request_id,
        )),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The body of every admin action.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminRequest {
    pool: String,
    url: String,
    /// For `register`: how long the registration lasts without renewal.
    #[serde(default)]
    ttl_secs: Option<u64>,
}

async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Body>) -> Result<T, Problem> {
    let collected = tokio::time::timeout(
        Duration::from_secs(10),
        crate::body::read_to_limit(req.into_body(), ADMIN_BODY_LIMIT),
    )
    .await
    .map_err(|_| Problem::bad_request("the request body did not arrive in time"))?
    .map_err(|e| match e {
        crate::body::ReadError::TooLarge => {
            Problem::payload_too_large(format!("admin bodies are at most {ADMIN_BODY_LIMIT} bytes"))
        }
        crate::body::ReadError::Failed(e) => {
            Problem::bad_request(format!("the request body could not be read: {e}"))
        }
    })?;
    let bytes: Bytes = collected;
    serde_json::from_slice(&bytes).map_err(|e| {
        Problem::validation(format!(
            "body must be JSON like {{\"pool\":\"default\",\"url\":\"http://127.0.0.1:3001\",\"ttl_secs\":30}}: {e}"
        ))
    })
}

fn admin_action(
    state: &GatewayState,
    action: &str,
    body: AdminRequest,
) -> Result<serde_json::Value, Problem> {
    let pool = state.pool(&body.pool).ok_or_else(|| {
        Problem::not_found(format!("no pool is named `{}`", body.pool))
            .with_field("pool", "unknown pool")
    })?;
    let find = || {
        pool.find(&body.url).ok_or_else(|| {
            Problem::not_found(format!(
                "pool `{}` has no instance `{}`",
                pool.name, body.url
            ))
            .with_field("url", "unknown instance")
        })
    };
    match action {
        "eject" => {
            find()?.set_admin_ejected(true);
            tracing::warn!(pool = %pool.name, instance = %body.url, "instance ejected by an operator");
        }
        "restore" => {
            find()?.set_admin_ejected(false);
            tracing::info!(pool = %pool.name, instance = %body.url, "instance restored by an operator");
        }
        "register" => {
            let max = state.settings.registration_max_ttl_secs;
            let ttl = body.ttl_secs.unwrap_or(30);
            if ttl == 0 || ttl > max {
                return Err(Problem::validation(format!("ttl_secs must be 1..={max}"))
                    .with_field("ttl_secs", format!("must be 1..={max}")));
            }
            let new = pool
                .register(&body.url, Duration::from_secs(ttl))
                .map_err(|m| Problem::validation(m.clone()).with_field("url", m))?;
            if new {
                tracing::info!(pool = %pool.name, instance = %body.url, ttl, "instance registered");
            }
        }
        "deregister" => {
            let removed = pool
                .deregister(&body.url)
                .map_err(|m| Problem::conflict(m.clone()).with_field("url", m))?;
            if !removed {
                return Err(Problem::not_found(format!(
                    "pool `{}` has no instance `{}`",
                    pool.name, body.url
                )));
            }
            tracing::info!(pool = %pool.name, instance = %body.url, "instance deregistered");
        }
        other => {
            return Err(Problem::not_found(format!(
                "no admin action `{other}`; use eject, restore, register or deregister"
            )))
        }
    }
    Ok(pool.status_json())
}
