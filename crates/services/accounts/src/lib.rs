//! The accounts service: signup, login, logout ("everywhere" too) and `me`.
//! Passwords are hashed with argon2id on the blocking pool; sessions live in
//! the configured `SessionStore`; login attempts are limited per account and
//! per client address, in the database so every instance shares the count.
//! Signup enqueues the welcome email (`shoal_notifications::enqueue_email_with_key`)
//! in the transaction that inserts the user.

mod limits;
mod password;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shoal_backends::sessions::token_hash;
use shoal_backends::Migration;
use shoal_core::Problem;
use shoal_queue::Worker;
use shoal_runtime::error::ApiResult;
use shoal_runtime::openapi::{Api, Op};
use shoal_runtime::session::cookie_value;
use shoal_runtime::{
    clear_session_cookie, session_cookie, ApiError, ApiJson, AppContext, ClientAddr,
    CurrentSession, ServiceModule,
};

/// The accounts service module.
#[derive(Debug, Clone, Default)]
pub struct Accounts;

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "users and login attempts",
        sql: "CREATE TABLE IF NOT EXISTS users (
        id TEXT PRIMARY KEY,
        email TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        name TEXT NOT NULL,
        created_at BIGINT NOT NULL);
    CREATE TABLE IF NOT EXISTS login_attempts (
        key TEXT PRIMARY KEY,
        window_start BIGINT NOT NULL,
        count BIGINT NOT NULL);",
    },
    Migration {
        version: 2,
        name: "growing login delays and known devices",
        sql: "ALTER TABLE login_attempts ADD COLUMN last_at BIGINT NOT NULL DEFAULT 0;
    CREATE TABLE IF NOT EXISTS login_devices (
        token_hash TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        created_at BIGINT NOT NULL);
    CREATE INDEX IF NOT EXISTS login_devices_user ON login_devices (user_id);",
    },
];

/// The cookie that marks a browser its user has logged in from before.
const DEVICE_COOKIE: &str = "shoal_device";
/// How long a device stays known (the cookie's Max-Age).
const DEVICE_LIFETIME_MS: i64 = 365 * 24 * 3600 * 1000;

impl ServiceModule for Accounts {
    fn name(&self) -> &'static str {
        "accounts"
    }

    fn migrations(&self) -> &'static [Migration] {
        MIGRATIONS
    }

    fn routes(&self, _ctx: &AppContext) -> Api {
        const TAG: &str = "accounts";
        Api::new()
            .post(
                "/api/accounts/signup",
                signup,
                Op::new(TAG, "Sign up")
                    .describe("Creates an account; does not log in. An address already registered gets the same 201 (nothing is stored), so sign-up does not tell who has an account.")
                    .json_body::<SignupRequest>()
                    .returns::<UserView>(201, "The account"),
            )
            .post(
                "/api/accounts/login",
                login,
                Op::new(TAG, "Log in")
                    .json_body::<LoginRequest>()
                    .returns::<UserView>(200, "Logged in; the session is in the `shoal_session` cookie")
                    .with_header("set-cookie", "shoal_session (and shoal_device for a new device)")
                    .problems(&[401, 429]),
            )
            .post(
                "/api/accounts/logout",
                logout,
                Op::new(TAG, "Log out")
                    .empty(204, "This session is ended; the cookie is cleared"),
            )
            .post(
                "/api/accounts/logout-all",
                logout_all,
                Op::new(TAG, "Log out everywhere")
                    .session()
                    .json(
                        200,
                        "Every session of the user is ended",
                        serde_json::json!({"type": "object", "required": ["sessions_ended"],
                            "properties": {"sessions_ended": {"type": "integer", "minimum": 0}}}),
                    ),
            )
            .get(
                "/api/accounts/me",
                me,
                Op::new(TAG, "The logged-in user")
                    .session()
                    .returns::<UserView>(200, "The user"),
            )
            .get(
                "/api/accounts/session",
                session,
                Op::new(TAG, "Whose session this is")
                    .describe("The session's user id and deadlines, from the session store alone (no user row is read). The gateway asks it for routes with `require_session` (docs/gateway.md, \"Identity at the edge\"). Never stored by a cache.")
                    .session()
                    .returns::<SessionView>(200, "The live session"),
            )
    }

    fn register_jobs(&self, ctx: &AppContext, worker: Worker) -> Worker {
        shoal_runtime::jobs::housekeeping(
            worker,
            ctx,
            "accounts-prune",
            "17 * * * *",
            "default",
            PRUNE_KIND,
            |ctx| async move { prune(&ctx).await },
        )
    }
}

/// The housekeeping job, hourly: login counters and known devices that no
/// longer count are deleted.
pub const PRUNE_KIND: &str = "accounts.prune";

/// Deletes login counters whose window has passed (they hold nothing back:
/// the next attempt would start a new window) and devices past their
/// year. Returns how many rows went. Without it the tables grow with every
/// address and device that ever tried to log in.
pub async fn prune(ctx: &AppContext) -> Result<u64, sqlx::Error> {
    let now = shoal_backends::now_millis();
    let window_ms = ctx.settings.accounts.login_window_secs as i64 * 1000;
    let counters = sqlx::query("DELETE FROM login_attempts WHERE window_start <= $1")
        .bind(now - window_ms)
        .execute(ctx.db.pool())
        .await?
        .rows_affected();
    let devices = sqlx::query("DELETE FROM login_devices WHERE created_at <= $1")
        .bind(now - DEVICE_LIFETIME_MS)
        .execute(ctx.db.pool())
        .await?
        .rows_affected();
    if counters + devices > 0 {
        tracing::info!(counters, devices, "pruned login counters and devices");
    }
    Ok(counters + devices)
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct SignupRequest {
    email: String,
    password: String,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    email: String,
    password: String,
}

/// A live session, as `GET /api/accounts/session` shows it.
#[derive(Debug, Serialize, schemars::JsonSchema)]
struct SessionView {
    user_id: String,
    /// Idle deadline (slid by this request), ms since the epoch.
    expires_at: i64,
    /// Absolute deadline, ms since the epoch.
    absolute_expires_at: i64,
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
struct UserView {
    id: String,
    email: String,
    name: String,
    created_at: i64,
}

/// Normalises and checks an email address; the error names the problem.
fn normalize_email(raw: &str) -> Result<String, &'static str> {
    let email = raw.trim().to_lowercase();
    if email.is_empty() {
        return Err("is required");
    }
    if email.len() > 254 {
        return Err("must be at most 254 characters");
    }
    let Some((local, domain)) = email.split_once('@') else {
        return Err("must be an address such as ada@example.com");
    };
    if local.is_empty()
        || domain.len() < 3
        || !domain.contains('.')
        || domain.starts_with('.')
        || domain.ends_with('.')
        || email.chars().any(|c| c.is_whitespace() || c.is_control())
        || domain.contains('@')
    {
        return Err("must be an address such as ada@example.com");
    }
    Ok(email)
}

async fn signup(
    State(ctx): State<AppContext>,
    ApiJson(body): ApiJson<SignupRequest>,
) -> ApiResult<Response> {
    let min = ctx.settings.accounts.min_password_length;
    let mut problem = Problem::validation("some fields are invalid; see `errors`");
    let email = match normalize_email(&body.email) {
        Ok(e) => Some(e),
        Err(msg) => {
            problem = problem.with_field("email", msg);
            None
        }
    };
    let chars = body.password.chars().count();
    if chars < min {
        problem = problem.with_field("password", format!("must be at least {min} characters"));
    } else if body.password.len() > 1024 {
        problem = problem.with_field("password", "must be at most 1024 bytes");
    }
    let name = body.name.unwrap_or_default().trim().to_string();
    if name.chars().count() > 100 {
        problem = problem.with_field("name", "must be at most 100 characters");
    }
    let Some(email) = email.filter(|_| problem.errors.is_empty()) else {
        return Err(problem.into());
    };
    let hash = password::hash(body.password).await?;
    let user = UserView {
        id: shoal_core::ids::new_id(),
        email,
        name,
        created_at: shoal_backends::now_millis(),
    };
    // The user and their welcome email commit together, or neither does.
    let mut writer = ctx.db.write().await?;
    let mut tx = writer.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO users (id, email, password_hash, name, created_at)
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (email) DO NOTHING",
    )
    .bind(&user.id)
    .bind(&user.email)
    .bind(&hash)
    .bind(&user.name)
    .bind(user.created_at)
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        // The address has an account. Answer exactly as for a new one, so
        // signup does not tell anyone who has an account here, and tell
        // the owner instead (at most one such email per address an hour,
        // so signups cannot be used to flood an inbox).
        let hour = shoal_backends::now_millis() / 3_600_000;
        shoal_notifications::enqueue_email_with_key(
            &ctx.jobs,
            &mut tx,
            &user.email,
            shoal_notifications::Template::SignupAttempt,
            serde_json::json!({"email": user.email}),
            &format!("signup-attempt:{}:{hour}", user.email),
        )
        .await
        .map_err(|e| ApiError::internal("enqueueing the signup-attempt email", &e))?;
        tx.commit().await?;
        drop(writer);
        metrics::counter!("shoal_accounts_signup_existing_total").increment(1);
        tracing::info!("signup for an address that has an account; its owner is told");
        return Ok((StatusCode::CREATED, Json(user)).into_response());
    }
    shoal_notifications::enqueue_email_with_key(
        &ctx.jobs,
        &mut tx,
        &user.email,
        shoal_notifications::Template::Welcome,
        serde_json::json!({"email": user.email, "name": user.name}),
        &format!("welcome:{}", user.id),
    )
    .await
    .map_err(|e| ApiError::internal("enqueueing the welcome email", &e))?;
    // The notifications service's address book, so other services can mail
    // this user by id (receipts).
    shoal_notifications::remember_recipient(&ctx.jobs, &mut tx, &user.id, &user.email)
        .await
        .map_err(|e| ApiError::internal("recording the user's address", &e))?;
    tx.commit().await?;
    drop(writer);
    metrics::counter!("shoal_accounts_signups_total").increment(1);
    tracing::info!(user_id = %user.id, "account created");
    Ok((StatusCode::CREATED, Json(user)).into_response())
}

async fn login(
    State(ctx): State<AppContext>,
    ClientAddr(addr): ClientAddr,
    headers: HeaderMap,
    ApiJson(body): ApiJson<LoginRequest>,
) -> ApiResult<Response> {
    let settings = &ctx.settings.accounts;
    let window_ms = settings.login_window_secs as i64 * 1000;
    let addr_key = format!("addr:{addr}");
    let (count, retry) = limits::hit(&ctx.db, &addr_key, window_ms).await?;
    if count > settings.login_attempts_per_address as i64 {
        metrics::counter!("shoal_accounts_login_limited_total", "by" => "address").increment(1);
        return Err(Problem::too_many_requests(
            "too many login attempts from this address; wait and try again",
            retry,
        )
        .into());
    }
    let email = body.email.trim().to_lowercase();
    let row: Option<(String, String, String, String, i64)> = sqlx::query_as(
        "SELECT id, email, name, password_hash, created_at FROM users WHERE email = $1",
    )
    .bind(&email)
    .fetch_optional(ctx.db.pool())
    .await?;
    // Throttled per account *and* client (OWASP): a device this account
    // logged in from before has its own budget; any other client is
    // counted by account and address, and all of them together by
    // account at ten times the limit. Someone guessing at an account slows
    // down exponentially and can hold back only new devices, never the
    // owner on a device they have used.
    let device = cookie_value(&headers, DEVICE_COOKIE).map(|t| token_hash(&t));
    let trusted = match (&row, &device) {
        (Some((user_id, ..)), Some(hash)) => sqlx::query_as::<_, (String,)>(
            "SELECT user_id FROM login_devices WHERE token_hash = $1 AND user_id = $2 AND created_at > $3",
        )
        .bind(hash)
        .bind(user_id)
        // A device is known for the cookie's year, no longer.
        .bind(shoal_backends::now_millis() - DEVICE_LIFETIME_MS)
        .fetch_optional(ctx.db.pool())
        .await?
        .is_some(),
        _ => false,
    };
    let per_client = settings.login_attempts_per_account;
    let client_key = match (&device, trusted) {
        (Some(hash), true) => format!("device:{hash}"),
        _ => format!("pair:{email}|{addr}"),
    };
    let account_key = format!("acct:{email}");
    // Each attempt is counted before the password is checked (and given
    // back when it succeeds): parallel guesses cannot all slip past.
    if let Err(retry) = limits::attempt(&ctx.db, &client_key, window_ms, per_client).await? {
        metrics::counter!("shoal_accounts_login_limited_total", "by" => "account_and_client")
            .increment(1);
        return Err(Problem::too_many_requests(
            format!("too many failed logins for this account from here; wait {retry} s"),
            retry,
        )
        .into());
    }
    if !trusted {
        if let Err(retry) = limits::attempt(
            &ctx.db,
            &account_key,
            window_ms,
            per_client.saturating_mul(10),
        )
        .await?
        {
            limits::release(&ctx.db, &client_key).await?;
            metrics::counter!("shoal_accounts_login_limited_total", "by" => "account").increment(1);
            return Err(Problem::too_many_requests(
                format!(
                    "too many failed logins for this account from new devices; log in from a \
                     device you have used before, or wait {retry} s"
                ),
                retry,
            )
            .into());
        }
    }
    // Verify against a dummy hash when the user is unknown, so the answer
    // takes as long either way and says nothing about which part was wrong.
    let (user, stored_hash) = match row {
        Some((id, email, name, hash, created_at)) => (
            Some(UserView {
                id,
                email,
                name,
                created_at,
            }),
            hash,
        ),
        None => (None, password::dummy_hash().to_string()),
    };
    let ok = password::verify(body.password, stored_hash).await?;
    let Some(user) = user.filter(|_| ok) else {
        metrics::counter!("shoal_accounts_logins_total", "result" => "rejected").increment(1);
        return Err(Problem::unauthorized("the email or password is wrong").into());
    };
    limits::clear(&ctx.db, &client_key).await?;
    if !trusted {
        limits::release(&ctx.db, &account_key).await?;
    }
    // A device that logged in is known from now on.
    let device_cookie = if trusted {
        None
    } else {
        let token = shoal_backends::sessions::new_token();
        sqlx::query(
            "INSERT INTO login_devices (token_hash, user_id, created_at) VALUES ($1, $2, $3)",
        )
        .bind(token_hash(&token))
        .bind(&user.id)
        .bind(shoal_backends::now_millis())
        .execute(ctx.db.pool())
        .await?;
        let mut cookie = format!(
            "{DEVICE_COOKIE}={token}; Path=/api/accounts; HttpOnly; SameSite=Lax; Max-Age=31536000"
        );
        if shoal_runtime::session::secure(&ctx, &headers) {
            cookie.push_str("; Secure");
        }
        Some(header::HeaderValue::from_str(&cookie).expect("cookie is ASCII"))
    };
    // Rotate: a session the caller already had is ended, not reused.
    if let Some(old) = cookie_value(&headers, &ctx.settings.sessions.cookie_name) {
        ctx.sessions.delete(&old).await?;
    }
    let session = ctx
        .sessions
        .create(&user.id, ctx.session_lifetimes())
        .await?;
    metrics::counter!("shoal_accounts_logins_total", "result" => "ok").increment(1);
    tracing::info!(user_id = %user.id, "logged in");
    let cookie = session_cookie(&ctx, &headers, &session);
    let mut response = (
        StatusCode::OK,
        [
            (header::SET_COOKIE, cookie),
            (header::CACHE_CONTROL, "no-store".parse().unwrap()),
        ],
        Json(user),
    )
        .into_response();
    // After the session's: clients that read the first cookie get it.
    if let Some(device) = device_cookie {
        response.headers_mut().append(header::SET_COOKIE, device);
    }
    Ok(response)
}

async fn logout(State(ctx): State<AppContext>, headers: HeaderMap) -> ApiResult<Response> {
    if let Some(token) = cookie_value(&headers, &ctx.settings.sessions.cookie_name) {
        ctx.sessions.delete(&token).await?;
    }
    Ok((
        StatusCode::NO_CONTENT,
        [(header::SET_COOKIE, clear_session_cookie(&ctx, &headers))],
    )
        .into_response())
}

async fn logout_all(
    State(ctx): State<AppContext>,
    CurrentSession(session): CurrentSession,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let ended = ctx.sessions.delete_user(&session.user_id).await?;
    // Everywhere includes the devices trusted to get past the throttle.
    sqlx::query("DELETE FROM login_devices WHERE user_id = $1")
        .bind(&session.user_id)
        .execute(ctx.db.pool())
        .await?;
    tracing::info!(user_id = %session.user_id, ended, "logged out everywhere");
    Ok((
        StatusCode::OK,
        [(header::SET_COOKIE, clear_session_cookie(&ctx, &headers))],
        Json(serde_json::json!({"sessions_ended": ended})),
    )
        .into_response())
}

async fn session(CurrentSession(session): CurrentSession) -> Response {
    let view = SessionView {
        user_id: session.user_id,
        expires_at: session.expires_at,
        absolute_expires_at: session.absolute_expires_at,
    };
    (
        [(header::CACHE_CONTROL, "private, no-store")],
        axum::Json(view),
    )
        .into_response()
}

async fn me(
    State(ctx): State<AppContext>,
    CurrentSession(session): CurrentSession,
) -> ApiResult<Response> {
    // Through the query cache: an account's public fields do not change
    // after signup, so its row is read once per TTL, not on every request
    // (an account deleted by hand is seen within USER_TTL).
    // Not `format!` (on every `/me`): see `catalog::product_tag`.
    let key = ["accounts:user:", &session.user_id].concat();
    let tags = [["user:", &session.user_id].concat()];
    let db = ctx.db.clone();
    let user_id = session.user_id.clone();
    let view = ctx
        .cache
        .get_or_load(&key, &tags, USER_TTL, || async move {
            let row: Option<(String, String, String, i64)> =
                sqlx::query_as("SELECT id, email, name, created_at FROM users WHERE id = $1")
                    .bind(&user_id)
                    .fetch_optional(db.pool())
                    .await?;
            Ok::<_, sqlx::Error>(row.map(|(id, email, name, created_at)| {
                Bytes::from(
                    serde_json::to_vec(&UserView {
                        id,
                        email,
                        name,
                        created_at,
                    })
                    .unwrap_or_default(),
                )
            }))
        })
        .await?;
    let Some(view) = view else {
        // The account is gone; the session should be too.
        ctx.sessions.delete(&session.token).await?;
        return Err(ApiError(Problem::unauthorized(
            "this account no longer exists",
        )));
    };
    Ok((
        [
            // Static values: not copied and checked on every request.
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, no-store"),
            ),
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
        ],
        view,
    )
        .into_response())
}

/// How long `/me` may serve an account's fields from the query cache.
const USER_TTL: std::time::Duration = std::time::Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::normalize_email;

    #[test]
    fn emails_are_normalised_and_checked() {
        assert_eq!(
            normalize_email(" Ada@Example.COM ").unwrap(),
            "ada@example.com"
        );
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@com",
            "a b@example.com",
            "ada@example.com.",
        ] {
            assert!(normalize_email(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
