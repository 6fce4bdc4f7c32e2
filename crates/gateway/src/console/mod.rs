//! The operator's console under `/_shoal/`: a web page (every asset in
//! the binary), its login, a live feed of the stack's state by
//! Server-Sent Events (`live.rs`), and the actions an operator takes from
//! it (drain, eject and re-admit an instance, purge the cache, retry or discard
//! dead jobs).
//!
//! Who may use it: whoever knows `gateway.admin_token`. The login trades
//! the token for a cookie signed with it (HMAC-SHA256 of its expiry), so
//! any gateway sharing the token accepts it, a restart keeps it, and
//! changing the token logs everyone out. Every API answer without a good
//! cookie is 401; the page and its two assets hold no data and are served
//! to anyone. Changes need `x-shoal-console: 1`, which a cross-site form
//! cannot send (and the cookie is `SameSite=Strict`).
//!
//! The queue pages are the workers': the gateway asks the first worker
//! that answers (`gateway.console.workers`, or those `shoal up` lists in
//! its `stack.json`) through the worker's `/_shoal/` endpoints, with the
//! admin token.

pub mod live;
pub mod stats;

use crate::body::{full, json_response, problem_response, Body};
use crate::proxy::GatewayState;
use crate::reload::Shared;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use shoal_core::Problem;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const INDEX_HTML: &str = include_str!("assets/index.html");
const CONSOLE_JS: &str = include_str!("assets/console.js");
const CONSOLE_CSS: &str = include_str!("assets/console.css");

/// The login cookie's name.
const COOKIE_NAME: &str = "shoal_console";
/// The header every change must carry.
const CHANGE_HEADER: &str = "x-shoal-console";
/// Largest body of a console request.
const BODY_LIMIT: usize = 256 * 1024;
/// Longest wait for a worker answering a queue request.
const WORKER_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether the console answers this request (before routing).
pub(crate) fn wants(state: &GatewayState, req: &Request<Body>) -> bool {
    let path = req.uri().path();
    if !state.settings.console.enabled {
        return false;
    }
    path == "/_shoal" || path.starts_with("/_shoal/") || (path == "/" && redirects_root(state, req))
}

/// A browser's `GET /`, when `redirect_root` is on.
fn redirects_root<B>(state: &GatewayState, req: &Request<B>) -> bool {
    state.settings.console.redirect_root
        && (req.method() == Method::GET || req.method() == Method::HEAD)
        && req
            .headers()
            .get(http::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("text/html"))
}

/// Serves one console request.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    state: Arc<GatewayState>,
    req: Request<Body>,
    request_id: &str,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let mut response = match (method.clone(), path.as_str()) {
        (_, "/" | "/_shoal") => redirect("/_shoal/"),
        (Method::GET | Method::HEAD, "/_shoal/") => asset(INDEX_HTML, "text/html; charset=utf-8"),
        (Method::GET | Method::HEAD, "/_shoal/console.js") => {
            asset(CONSOLE_JS, "text/javascript; charset=utf-8")
        }
        (Method::GET | Method::HEAD, "/_shoal/console.css") => {
            asset(CONSOLE_CSS, "text/css; charset=utf-8")
        }
        (Method::GET, "/_shoal/gateway") => gateway_figures(&shared, &state, &req, request_id),
        (Method::POST, "/_shoal/api/login") => login(&state, req, request_id).await,
        (Method::POST, "/_shoal/api/logout") => {
            let mut r = Response::new(crate::body::empty());
            *r.status_mut() = StatusCode::NO_CONTENT;
            r.headers_mut()
                .insert(SET_COOKIE, cookie_header(&state, "", 0));
            r
        }
        (_, api) if api.starts_with("/_shoal/api/") => match authorized(&state, &req, request_id) {
            Err(denied) => denied,
            Ok(expires_at) => api_call(shared, state, req, expires_at, request_id).await,
        },
        _ => problem_response(
            &Problem::not_found(format!(
                "no console page `{path}`; the console is at /_shoal/"
            )),
            request_id,
        ),
    };
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
        ),
    );
    headers.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        http::header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers
        .entry(CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(crate::body::X_REQUEST_ID, v);
    }
    response
}

fn redirect(to: &'static str) -> Response<Body> {
    let mut r = Response::new(full(format!("the console is at {to}\n")));
    *r.status_mut() = StatusCode::SEE_OTHER;
    r.headers_mut()
        .insert(LOCATION, HeaderValue::from_static(to));
    r
}

fn asset(text: &'static str, content_type: &'static str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::from_static(text.as_bytes())));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// `GET /_shoal/gateway`: this gateway's figures of the last second (its
/// id alone before the first sample), for the consoles of the other
/// gateways (`gateway.console.peers`), with the
/// read-only `gateway.metrics_token` (or the admin token) as a bearer
/// token, as `/_gateway/pools` takes.
fn gateway_figures<B>(
    shared: &Shared,
    state: &GatewayState,
    req: &Request<B>,
    request_id: &str,
) -> Response<Body> {
    if let Some(denied) =
        crate::admin::authorize(state, crate::admin::Access::Status, req, request_id)
    {
        return denied;
    }
    // Before the first sample, only the id: enough for a peer to know
    // its own URL when it asks itself.
    json_response(StatusCode::OK, &shared.console.own())
}

// ---- login ------------------------------------------------------------

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `<expiry>.<hex HMAC-SHA256(admin_token, "shoal-console:<expiry>")>`.
fn sign(token: &str, expires: u64) -> String {
    let mut mac =
        Hmac::<sha2::Sha256>::new_from_slice(token.as_bytes()).expect("HMAC takes any key");
    mac.update(format!("shoal-console:{expires}").as_bytes());
    let tag = mac.finalize().into_bytes();
    format!("{expires}.{}", shoal_core::ids::hex(&tag))
}

/// The expiry of a good login cookie, seconds since the epoch.
fn verify(token: &str, value: &str) -> Option<u64> {
    let (expires, _) = value.split_once('.')?;
    let expires: u64 = expires.parse().ok()?;
    let good =
        shoal_core::bearer::constant_time_eq(sign(token, expires).as_bytes(), value.as_bytes());
    (good && expires > now_secs()).then_some(expires)
}

fn cookie_header(state: &GatewayState, value: &str, max_age: u64) -> HeaderValue {
    let secure = if state.settings.tls() { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE_NAME}={value}; Path=/_shoal; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"
    ))
    .unwrap_or(HeaderValue::from_static(
        "shoal_console=; Path=/_shoal; Max-Age=0",
    ))
}

fn login_cookie<B>(req: &Request<B>) -> Option<&str> {
    req.headers()
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value)
}

fn console_off(request_id: &str) -> Response<Body> {
    problem_response(
        &Problem::forbidden(
            "the console is off until gateway.admin_token is set; `shoal up` writes one to \
             <data_dir>/secrets/admin-token",
        ),
        request_id,
    )
}

/// The login's expiry, or the answer for a request without a good one
/// (and for a change without [`CHANGE_HEADER`]).
fn authorized<B>(
    state: &GatewayState,
    req: &Request<B>,
    request_id: &str,
) -> Result<u64, Response<Body>> {
    let Some(token) = state.settings.admin_token.as_deref() else {
        return Err(console_off(request_id));
    };
    let Some(expires) = login_cookie(req).and_then(|v| verify(token, v)) else {
        return Err(problem_response(
            &Problem::unauthorized("log in at /_shoal/ with the gateway's admin token"),
            request_id,
        ));
    };
    if req.method() != Method::GET
        && req.method() != Method::HEAD
        && !req.headers().contains_key(CHANGE_HEADER)
    {
        return Err(problem_response(
            &Problem::forbidden(format!("changes need the `{CHANGE_HEADER}: 1` header")),
            request_id,
        ));
    }
    Ok(expires)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Login {
    token: String,
}

async fn login(state: &GatewayState, req: Request<Body>, request_id: &str) -> Response<Body> {
    let Some(token) = state.settings.admin_token.clone() else {
        return console_off(request_id);
    };
    if !req.headers().contains_key(CHANGE_HEADER) {
        return problem_response(
            &Problem::forbidden(format!("the login needs the `{CHANGE_HEADER}: 1` header")),
            request_id,
        );
    }
    let login: Login = match read_json(req).await {
        Ok(l) => l,
        Err(p) => return problem_response(&p, request_id),
    };
    if !shoal_core::bearer::constant_time_eq(login.token.as_bytes(), token.as_bytes()) {
        tracing::warn!(request_id, "console login refused: wrong admin token");
        return problem_response(
            &Problem::unauthorized("that is not the gateway's admin token"),
            request_id,
        );
    }
    let lifetime = state.settings.console.session_secs;
    let value = sign(&token, now_secs() + lifetime);
    let mut r = Response::new(crate::body::empty());
    *r.status_mut() = StatusCode::NO_CONTENT;
    r.headers_mut()
        .insert(SET_COOKIE, cookie_header(state, &value, lifetime));
    tracing::info!(request_id, "console login");
    r
}

async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Body>) -> Result<T, Problem> {
    let bytes = read_body(req).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Problem::validation(format!("the body is not the JSON expected: {e}")))
}

async fn read_body(req: Request<Body>) -> Result<Bytes, Problem> {
    crate::body::read_request_body(req.into_body(), BODY_LIMIT, "console").await
}

// ---- the API ----------------------------------------------------------

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct InstanceAction {
    pool: String,
    url: String,
    action: String,
}

async fn api_call(
    shared: Arc<Shared>,
    state: Arc<GatewayState>,
    req: Request<Body>,
    expires_at: u64,
    request_id: &str,
) -> Response<Body> {
    let path = req
        .uri()
        .path()
        .trim_start_matches("/_shoal/api")
        .to_string();
    let method = req.method().clone();
    match (method, path.as_str()) {
        (Method::GET, "/session") => json_response(
            StatusCode::OK,
            &serde_json::json!({ "expires_at": expires_at * 1000 }),
        ),
        (Method::GET, "/live") => live::subscribe(&shared),
        (Method::POST, "/instances") => {
            let body: InstanceAction = match read_json(req).await {
                Ok(b) => b,
                Err(p) => return problem_response(&p, request_id),
            };
            let action = match body.action.as_str() {
                // No new requests; those in flight run to their end.
                "drain" => "drain",
                // No new requests, and its streams and tunnels are cut.
                "eject" => "eject",
                "readmit" => "restore",
                other => {
                    return problem_response(
                        &Problem::validation(format!(
                            "no instance action `{other}`; use drain, eject or readmit"
                        ))
                        .with_field("action", "drain, eject or readmit"),
                        request_id,
                    )
                }
            };
            let request = crate::admin::AdminRequest {
                pool: body.pool,
                url: body.url,
                ttl_secs: None,
            };
            match crate::admin::admin_action(&state, action, request) {
                Ok(v) => json_response(StatusCode::OK, &v),
                Err(p) => problem_response(&p, request_id),
            }
        }
        (Method::POST, "/purge") => crate::cache::purge::handle(&state, req, request_id).await,
        (_, jobs) if jobs == "/jobs" || jobs.starts_with("/jobs/") => {
            to_worker(&shared, &state, req, request_id).await
        }
        (m, "/session" | "/live" | "/instances" | "/purge") => problem_response(
            &Problem::new(
                405,
                "method-not-allowed",
                "Method not allowed",
                format!("{m} is not served here"),
            ),
            request_id,
        ),
        (_, other) => problem_response(
            &Problem::not_found(format!("no console API `/_shoal/api{other}`")),
            request_id,
        ),
    }
}

/// A queue request, passed to the first worker that answers: `GET
/// /_shoal/api/jobs?...` to the worker's `GET /_shoal/jobs?...`, and so on.
async fn to_worker(
    shared: &Shared,
    state: &GatewayState,
    req: Request<Body>,
    request_id: &str,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let body = match read_body(Request::new(body)).await {
        Ok(b) => b,
        Err(p) => return problem_response(&p, request_id),
    };
    let tail = parts
        .uri
        .path_and_query()
        .map_or("", |p| p.as_str())
        .trim_start_matches("/_shoal/api");
    let workers = live::worker_urls(shared, state);
    if workers.is_empty() {
        return problem_response(
            &Problem::unavailable(
                "no worker to ask: set gateway.console.workers (or run under `shoal up`)",
                5,
            ),
            request_id,
        );
    }
    let mut last = String::new();
    for base in &workers {
        match internal_request(
            state,
            base,
            &parts.method,
            &format!("/_shoal{tail}"),
            body.clone(),
        )
        .await
        {
            Ok((status, content_type, bytes)) => {
                let mut r = Response::new(full(bytes));
                *r.status_mut() = status;
                if let Some(ct) = content_type {
                    r.headers_mut().insert(CONTENT_TYPE, ct);
                }
                return r;
            }
            Err(e) => last = format!("{base}: {e}"),
        }
    }
    problem_response(
        &Problem::bad_gateway(format!("no worker answered ({last})")),
        request_id,
    )
}

/// One request to a worker's or an instance's `/_shoal/` endpoints,
/// with the admin token.
pub(crate) async fn internal_request(
    state: &GatewayState,
    base: &str,
    method: &Method,
    path_and_query: &str,
    body: Bytes,
) -> Result<(StatusCode, Option<HeaderValue>, Bytes), String> {
    let token = state.settings.admin_token.as_deref();
    request_with_token(state, token, base, method, path_and_query, body).await
}

/// [`internal_request`] with `token` (none: no `Authorization`).
pub(crate) async fn request_with_token(
    state: &GatewayState,
    token: Option<&str>,
    base: &str,
    method: &Method,
    path_and_query: &str,
    body: Bytes,
) -> Result<(StatusCode, Option<HeaderValue>, Bytes), String> {
    let uri: http::Uri = format!("{}{path_and_query}", base.trim_end_matches('/'))
        .parse()
        .map_err(|e| format!("bad URL: {e}"))?;
    let mut req = Request::new(full(body));
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    if let Some(token) = token {
        if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
            req.headers_mut().insert(http::header::AUTHORIZATION, v);
        }
    }
    req.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let attempt = async {
        let response = state
            .client
            .http1
            .request(req)
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let bytes = http_body_util::Limited::new(body, 8 * 1024 * 1024)
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((
            parts.status,
            parts.headers.get(CONTENT_TYPE).cloned(),
            bytes,
        ))
    };
    tokio::time::timeout(WORKER_TIMEOUT, attempt)
        .await
        .map_err(|_| "timed out".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_cookie_is_good_only_with_its_token_and_until_it_expires() {
        let later = now_secs() + 60;
        let value = sign("the-admin-token-0123", later);
        assert_eq!(verify("the-admin-token-0123", &value), Some(later));
        assert_eq!(verify("another-token-012345", &value), None);
        let tampered = value.replacen(&later.to_string(), &(later + 3600).to_string(), 1);
        assert_eq!(verify("the-admin-token-0123", &tampered), None);
        let expired = sign("the-admin-token-0123", now_secs() - 1);
        assert_eq!(verify("the-admin-token-0123", &expired), None);
        assert_eq!(verify("the-admin-token-0123", "garbage"), None);
    }
}
