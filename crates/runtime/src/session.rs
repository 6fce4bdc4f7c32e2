//! Sessions at the HTTP edge: the `CurrentSession` extractor (401 when the
//! cookie is absent, unknown or expired) and the cookie builders (HttpOnly,
//! SameSite=Lax, Secure behind TLS, Path=/).

use crate::context::AppContext;
use crate::error::ApiError;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue};
use shoal_backends::Session;
use shoal_core::settings::CookieSecure;
use shoal_core::Problem;

/// The caller's live session; its idle deadline has been slid.
#[derive(Debug, Clone)]
pub struct CurrentSession(pub Session);

impl FromRequestParts<AppContext> for CurrentSession {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, ctx: &AppContext) -> Result<Self, ApiError> {
        let name = &ctx.settings.sessions.cookie_name;
        let Some(token) = cookie_value(&parts.headers, name) else {
            return Err(Problem::unauthorized(format!(
                "this needs a session: log in first (no `{name}` cookie was sent)"
            ))
            .into());
        };
        match ctx.sessions.touch(&token, ctx.session_lifetimes()).await? {
            Some(session) => Ok(CurrentSession(session)),
            None => Err(Problem::unauthorized(
                "the session has expired or was ended: log in again",
            )
            .into()),
        }
    }
}

/// Refuses (403) a call to an internal endpoint that does not carry
/// `clients.token` as its bearer token: such endpoints are for Shoal's own
/// services and the team's services behind the gateway, never browsers.
pub fn require_service_token(ctx: &AppContext, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if shoal_core::bearer::matches(given, &[ctx.settings.clients.token.as_str()]) {
        Ok(())
    } else {
        Err(Problem::forbidden(
            "an internal endpoint: only services with clients.token (as a bearer token) may call it",
        )
        .into())
    }
}

/// The value of cookie `name` in the request, if any.
pub fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"').to_string())
}

/// Whether cookies set on this request's answer get `Secure`
/// (`sessions.cookie_secure`).
pub fn secure(ctx: &AppContext, headers: &HeaderMap) -> bool {
    match ctx.settings.sessions.cookie_secure {
        CookieSecure::Always => true,
        CookieSecure::Never => false,
        CookieSecure::Auto => headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.eq_ignore_ascii_case("https"))
            .unwrap_or(false),
    }
}

/// `Set-Cookie` for a new session.
pub fn session_cookie(ctx: &AppContext, headers: &HeaderMap, session: &Session) -> HeaderValue {
    let max_age = (session.absolute_expires_at - shoal_backends::now_millis()).max(0) / 1000;
    let mut cookie = format!(
        "{}={}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}",
        ctx.settings.sessions.cookie_name, session.token
    );
    if secure(ctx, headers) {
        cookie.push_str("; Secure");
    }
    HeaderValue::from_str(&cookie).expect("cookie is ASCII")
}

/// `Set-Cookie` that removes the session cookie.
pub fn clear_session_cookie(ctx: &AppContext, headers: &HeaderMap) -> HeaderValue {
    let mut cookie = format!(
        "{}=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0",
        ctx.settings.sessions.cookie_name
    );
    if secure(ctx, headers) {
        cookie.push_str("; Secure");
    }
    HeaderValue::from_str(&cookie).expect("cookie is ASCII")
}
