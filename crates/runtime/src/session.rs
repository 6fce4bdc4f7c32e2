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
/// services, never browsers.
pub fn require_service_token(ctx: &AppContext, headers: &HeaderMap) -> Result<(), ApiError> {
    if shoal_core::bearer::matches(bearer(headers), &[ctx.settings.clients.token.as_str()]) {
        Ok(())
    } else {
        Err(Problem::forbidden(
            "an internal endpoint: only Shoal's services (with clients.token) may call it",
        )
        .into())
    }
}

/// Refuses (403) a call that carries neither `clients.token` nor a service
/// token with `scope` (`[[clients.service_tokens]]`, kept as SHA-256
/// hashes, compared in constant time). Returns who called: `shoal` or the
/// token's name.
pub fn require_scope(
    ctx: &AppContext,
    headers: &HeaderMap,
    scope: &str,
) -> Result<String, ApiError> {
    let given = bearer(headers);
    if shoal_core::bearer::matches(given, &[ctx.settings.clients.token.as_str()]) {
        return Ok("shoal".into());
    }
    let holder =
        shoal_core::bearer::find_hashed(given, &ctx.settings.clients.service_tokens, |t| {
            t.sha256.as_str()
        });
    if let Some(t) = holder {
        if t.scopes.iter().any(|s| s == scope) {
            return Ok(t.name.clone());
        }
        return Err(Problem::forbidden(format!(
            "the service token `{}` does not have the scope `{scope}`",
            t.name
        ))
        .into());
    }
    Err(Problem::forbidden(format!(
        "this endpoint needs a service token with the scope `{scope}` (or clients.token) as a bearer token"
    ))
    .into())
}

/// A new service token and its SHA-256 in hex (what
/// `[[clients.service_tokens]]` keeps): `sst_` and 32 random bytes in
/// URL-safe base64.
pub fn new_service_token() -> (String, String) {
    use base64::Engine as _;
    use rand::RngCore as _;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let token = format!(
        "sst_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let hash = shoal_core::bearer::sha256_hex(&token);
    (token, hash)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// The value of cookie `name` in the request, if any.
pub fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    let fields = headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok());
    shoal_core::cookies::value(fields, name).map(str::to_string)
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
