//! Identity at the edge (`[gateway.identity]`, docs/gateway.md): a route
//! with `require_session = true` passes only requests whose session cookie
//! names a live session, and the instance behind it gets the session's
//! user id in a header (`x-shoal-user-id` by default) instead of parsing
//! cookies itself. The gateway asks who a session belongs to by sending
//! `GET check_path` with the cookie through the rest of its own stack
//! (routed, balanced and retried like any request; Shoal's accounts
//! service answers it), and reuses the answer for `cache_ms`. That header
//! is removed from every request a client sends, on every route, so no
//! client can name a user itself.

use crate::body::{problem_response, Body};
use crate::stack::{Ctx, Next};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use sha2::{Digest, Sha256};
use shoal_core::settings::GatewayIdentitySettings;
use shoal_core::Problem;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

/// The largest answer of the check endpoint read.
const MAX_CHECK_BODY: usize = 4096;

/// The checked settings and the sessions seen lately.
#[derive(Debug)]
pub(crate) struct Identity {
    check_path: http::uri::PathAndQuery,
    cookie: String,
    header: HeaderName,
    /// Whether any route requires a session (else no request is looked at
    /// beyond removing the header).
    pub(crate) any_route: bool,
    /// SHA-256 of a session token → its user id, for `cache_ms`; `None`
    /// when every request is checked.
    known: Option<moka::sync::Cache<[u8; 32], Arc<str>>>,
}

impl Identity {
    /// `settings` were validated with the rest (`GatewaySettings::validate`);
    /// the error names the key when a value still does not parse.
    pub(crate) fn new(
        settings: &GatewayIdentitySettings,
        any_route: bool,
    ) -> Result<Identity, (String, String)> {
        let check_path = http::uri::PathAndQuery::try_from(settings.check_path.as_str())
            .map_err(|e| ("gateway.identity.check_path".to_string(), e.to_string()))?;
        let header = HeaderName::from_bytes(settings.user_header.as_bytes())
            .map_err(|e| ("gateway.identity.user_header".to_string(), e.to_string()))?;
        let known = (settings.cache_ms > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_millis(settings.cache_ms))
                .build()
        });
        Ok(Identity {
            check_path,
            cookie: settings.cookie_name.clone(),
            header,
            any_route,
            known,
        })
    }

    /// Removes the user header a client sent.
    pub(crate) fn strip(&self, headers: &mut HeaderMap) {
        headers.remove(&self.header);
    }
}

/// Whether the route of `req` requires a session.
pub(crate) fn required(state: &crate::proxy::GatewayState, req: &Request<Body>) -> bool {
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    state
        .router
        .find(host, req.uri().path())
        .is_some_and(|r| r.require_session)
}

/// What the check endpoint said of a session.
enum Verdict {
    User(Arc<str>),
    NoSession,
    Failed(String),
}

/// Passes `req` (its route requires a session) on through `next` with the
/// session's user id, or answers 401 (no session, or an ended one) or 503
/// (the check could not be made).
pub(crate) async fn check(
    next: Next,
    mut req: Request<Body>,
) -> Result<Response<Body>, Infallible> {
    let Some(ctx) = req.extensions().get::<Ctx>().cloned() else {
        return Ok(crate::stack::no_context());
    };
    let identity = &ctx.state.identity;
    let outcome = |what: &'static str| {
        metrics::counter!("shoal_gateway_identity_checks_total", "outcome" => what).increment(1);
    };
    let Some(token) = cookie_value(req.headers(), &identity.cookie) else {
        outcome("no_cookie");
        return Ok(problem_response(
            &Problem::unauthorized(format!(
                "this path needs a session: log in first (no `{}` cookie was sent)",
                identity.cookie
            )),
            &ctx.request_id,
        ));
    };
    let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let cached = identity.known.as_ref().and_then(|k| k.get(&key));
    let user = match cached {
        Some(user) => {
            outcome("cached");
            user
        }
        None => match ask(
            &next,
            &ctx,
            req.headers().get(http::header::HOST).cloned(),
            &token,
        )
        .await
        {
            Verdict::User(user) => {
                outcome("live");
                if let Some(known) = &identity.known {
                    known.insert(key, Arc::clone(&user));
                }
                user
            }
            Verdict::NoSession => {
                outcome("ended");
                return Ok(problem_response(
                    &Problem::unauthorized("the session has expired or was ended: log in again"),
                    &ctx.request_id,
                ));
            }
            Verdict::Failed(why) => {
                outcome("failed");
                tracing::warn!(request_id = %ctx.request_id, why = %why, "a session could not be checked");
                return Ok(problem_response(
                    &Problem::unavailable(
                        format!("the session could not be checked ({why}); retry shortly"),
                        1,
                    ),
                    &ctx.request_id,
                ));
            }
        },
    };
    match HeaderValue::from_str(&user) {
        Ok(v) => {
            req.headers_mut().insert(identity.header.clone(), v);
        }
        Err(_) => {
            return Ok(problem_response(
                &Problem::unavailable("the session check named no usable user id", 1),
                &ctx.request_id,
            ))
        }
    }
    crate::stack::call(&next, req).await
}

/// Asks `check_path` who the session `token` belongs to.
async fn ask(next: &Next, ctx: &Ctx, host: Option<HeaderValue>, token: &str) -> Verdict {
    let identity = &ctx.state.identity;
    let mut sub = Request::new(crate::body::empty());
    *sub.uri_mut() = http::Uri::from(identity.check_path.clone());
    let headers = sub.headers_mut();
    // The client's Host, so host-matched routes send the check where the
    // client's requests go.
    if let Some(host) = host {
        headers.insert(http::header::HOST, host);
    }
    let cookie = format!("{}={token}", identity.cookie);
    match HeaderValue::from_str(&cookie) {
        Ok(v) => headers.insert(http::header::COOKIE, v),
        Err(_) => return Verdict::NoSession,
    };
    headers.insert(
        http::header::ACCEPT,
        HeaderValue::from_static("application/json"),
    );
    if let Ok(v) = HeaderValue::from_str(&ctx.request_id) {
        headers.insert(crate::body::X_REQUEST_ID, v);
    }
    sub.extensions_mut().insert(ctx.clone());
    let Ok(response) = crate::stack::call(next, sub).await;
    let status = response.status();
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Verdict::NoSession;
    }
    if status != StatusCode::OK {
        return Verdict::Failed(format!("{} answered {status}", identity.check_path));
    }
    let body = match crate::body::read_to_limit(response.into_body(), MAX_CHECK_BODY).await {
        Ok(b) => b,
        Err(crate::body::ReadError::TooLarge) => {
            return Verdict::Failed(format!("its answer is over {MAX_CHECK_BODY} bytes"))
        }
        Err(crate::body::ReadError::Failed(e)) => {
            return Verdict::Failed(format!("reading its answer: {e}"))
        }
    };
    let user = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            v.get("user_id")
                .and_then(|u| u.as_str())
                .map(str::to_string)
        })
        .filter(|u| !u.is_empty());
    match user {
        Some(u) => Verdict::User(u.into()),
        None => Verdict::Failed(format!(
            "{} answered 200 without a user_id",
            identity.check_path
        )),
    }
}

/// The value of cookie `name` in `headers`, if any.
fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    let fields = headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok());
    shoal_core::cookies::value(fields, name)
        .filter(|v| !v.is_empty())
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.append("cookie", HeaderValue::from_static("a=1; shoal_session=abc"));
        assert_eq!(cookie_value(&h, "shoal_session").as_deref(), Some("abc"));
        assert_eq!(cookie_value(&h, "shoal"), None);
        let mut empty = HeaderMap::new();
        empty.append("cookie", HeaderValue::from_static("shoal_session="));
        assert_eq!(cookie_value(&empty, "shoal_session"), None);
    }
}
