//! The gateway's own endpoints under `/_gateway/`: liveness, readiness,
//! Prometheus metrics, pool status, and the admin API (eject or restore an
//! instance, register or deregister instances with a TTL). Everything but
//! `healthz` and `readyz` needs a bearer token ([`authorize`]); a client's
//! address grants nothing.

use crate::body::{full, json_response, problem_response, Body};
use crate::proxy::GatewayState;
use http::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use shoal_core::Problem;
use std::sync::Arc;
use std::time::Duration;

/// Largest admin request body.
const ADMIN_BODY_LIMIT: usize = 16 * 1024;

/// Serves one request under `/_gateway/`.
pub async fn handle(
    state: Arc<GatewayState>,
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
        status @ ("/metrics" | "/cache" | "/pools") => {
            match authorize(&state, Access::Status, &req, request_id) {
                Some(denied) => denied,
                None => get_only(&|| status_endpoint(&state, status)),
            }
        }
        admin if admin.starts_with("/admin/") => {
            let action = admin.trim_start_matches("/admin/").to_string();
            // A registration token opens register and deregister, in its
            // own pools (checked once the body names the pool).
            let registrant = match action.as_str() {
                "register" | "deregister" => registration_token(&state, &req),
                _ => None,
            };
            let denied = match registrant {
                Some(_) => None,
                None => authorize(&state, Access::Admin, &req, request_id),
            };
            if let Some(denied) = denied {
                denied
            } else if method != Method::POST {
                method_not_allowed("POST", request_id)
            } else if admin == "/admin/purge" {
                crate::cache::purge::handle(&state, req, request_id).await
            } else {
                match read_json::<AdminRequest>(req).await {
                    Err(problem) => problem_response(&problem, request_id),
                    Ok(body) => match registrant {
                        Some(t) if !t.pools.contains(&body.pool) => problem_response(
                            &Problem::forbidden(format!(
                                "the registration token `{}` may register only in the pools {:?}",
                                t.name, t.pools
                            )),
                            request_id,
                        ),
                        _ => match admin_action(&state, &action, body) {
                            Ok(value) => json_response(StatusCode::OK, &value),
                            Err(problem) => problem_response(&problem, request_id),
                        },
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

/// What a request under `/_gateway/` asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Read-only status (metrics, pools, cache): `admin_token` or
    /// `metrics_token`.
    Status,
    /// Changes (eject, register, purge, reload): `admin_token` only.
    Admin,
}

/// `None` when the request carries a token that grants `access`; else the
/// answer: 403 while no token is configured (the endpoints are off), 401
/// for a missing or wrong one. The client's address never counts: a local
/// process, or a reverse proxy on the same host, is not trusted for being
/// on loopback.
pub(crate) fn authorize<B>(
    state: &GatewayState,
    access: Access,
    req: &Request<B>,
    request_id: &str,
) -> Option<Response<Body>> {
    let settings = &state.settings;
    let mut tokens = vec![settings.admin_token.as_deref()];
    if access == Access::Status {
        tokens.push(settings.metrics_token.as_deref());
    }
    let tokens: Vec<&str> = tokens.into_iter().flatten().collect();
    if tokens.is_empty() {
        return Some(problem_response(
            &Problem::forbidden(
                "the gateway's admin API is off: set gateway.admin_token (or gateway.metrics_token \
                 for metrics, pools and cache) and send it as `Authorization: Bearer <token>`; \
                 `shoal up` writes one to <data_dir>/secrets/admin-token",
            ),
            request_id,
        ));
    }
    let header = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let matched = shoal_core::bearer::matches(header, &tokens);
    if matched {
        None
    } else {
        let wanted = match access {
            Access::Status => "gateway.admin_token or gateway.metrics_token",
            Access::Admin => "gateway.admin_token",
        };
        let mut r = problem_response(
            &Problem::unauthorized(format!("send `Authorization: Bearer <{wanted}>`")),
            request_id,
        );
        r.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
        Some(r)
    }
}

/// The registration token (`gateway.registration_tokens`) the request
/// carries as its bearer token, if any.
fn registration_token<'a, B>(
    state: &'a GatewayState,
    req: &Request<B>,
) -> Option<&'a shoal_core::settings::RegistrationTokenSettings> {
    let header = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    shoal_core::bearer::find_hashed(header, &state.settings.registration_tokens, |t| {
        t.sha256.as_str()
    })
}

/// `/_gateway/metrics`, `/_gateway/cache` and `/_gateway/pools`, once
/// authorized.
fn status_endpoint(state: &GatewayState, path: &str) -> Response<Body> {
    match path {
        "/metrics" => {
            let mut r = Response::new(full(shoal_core::telemetry::prometheus().render()));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        "/cache" => crate::cache::stats_json(state),
        _ => json_response(
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
        ),
    }
}

/// The body of every admin action.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminRequest {
    pub(crate) pool: String,
    pub(crate) url: String,
    /// For `register`: how long the registration lasts without renewal.
    #[serde(default)]
    pub(crate) ttl_secs: Option<u64>,
}

async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Body>) -> Result<T, Problem> {
    let bytes = crate::body::read_request_body(req.into_body(), ADMIN_BODY_LIMIT, "admin").await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        Problem::validation(format!(
            "body must be JSON like {{\"pool\":\"default\",\"url\":\"http://127.0.0.1:3001\",\"ttl_secs\":30}}: {e}"
        ))
    })
}

pub(crate) fn admin_action(
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
            find()?.eject_by_operator();
            tracing::warn!(pool = %pool.name, instance = %body.url, "instance ejected by an operator: no new requests, its streams and tunnels cut");
        }
        "drain" => {
            let instance = find()?;
            instance.drain_by_operator();
            tracing::info!(pool = %pool.name, instance = %body.url, in_flight = instance.in_flight(), "instance drained by an operator: no new requests, those in flight finish");
        }
        "restore" => {
            find()?.restore_by_operator();
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
                "no admin action `{other}`; use drain, eject, restore, register or deregister"
            )))
        }
    }
    Ok(pool.status_json())
}
