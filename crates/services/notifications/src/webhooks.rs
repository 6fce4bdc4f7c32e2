//! Webhooks: users register endpoints (URL, event types; a `whsec_` secret
//! shown once); `emit_event` enqueues one `notifications.webhook` job per
//! matching endpoint inside the caller's transaction; the job POSTs the
//! event signed per the Standard Webhooks spec (`webhook-id`,
//! `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of
//! "id.timestamp.body">`), retried with exponential backoff. Every attempt
//! is logged; an endpoint failing without a success for
//! `webhook_disable_after_secs` is disabled. Targets must resolve to public
//! addresses only (see `net`).

use crate::net::{resolve_checked, GuardedResolver, TargetError};
use crate::NotifyError;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shoal_backends::now_millis;
use shoal_core::Problem;
use shoal_queue::{handler_fn, Backoff, JobContext, JobError, KindOptions, NewJob, Worker};
use shoal_runtime::error::ApiResult;
use shoal_runtime::{ApiError, ApiJson, AppContext, CurrentSession};
use sqlx::AnyConnection;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The job kind of one delivery.
pub const WEBHOOK_KIND: &str = "notifications.webhook";

const MAX_EVENT_TYPES: usize = 50;

/// `v1,<signature>` for a Standard Webhooks delivery: base64 HMAC-SHA256,
/// keyed by the base64-decoded part of `whsec_<base64>`, of
/// `<msg_id>.<timestamp>.<body>`.
pub fn sign_webhook(
    secret: &str,
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> Result<String, NotifyError> {
    let raw = secret.strip_prefix("whsec_").unwrap_or(secret);
    let key = B64
        .decode(raw)
        .map_err(|e| NotifyError::Invalid(format!("webhook secret is not base64: {e}")))?;
    Ok(shoal_runtime::push::standard_webhooks_signature(
        &key, msg_id, timestamp, body,
    ))
}

fn new_secret() -> String {
    let mut key = [0u8; 24];
    rand::rng().fill_bytes(&mut key);
    format!("whsec_{}", B64.encode(key))
}

fn valid_event_type(t: &str) -> bool {
    t == "*"
        || (!t.is_empty()
            && t.len() <= 64
            && t.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)))
}

/// The payload of a delivery job. The body is fixed at enqueue time, so
/// every attempt sends the same bytes under the same `webhook-id`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Delivery {
    webhook_id: String,
    message_id: String,
    event_type: String,
    body: String,
}

/// Enqueues a signed delivery of `kind` with `data` to every enabled
/// endpoint of `user_id` subscribed to `kind` (or `*`), on the caller's
/// connection, typically inside the transaction that makes the event
/// true. Returns the message id (the `webhook-id` every endpoint gets),
/// or `None` when no endpoint wants the event.
pub async fn emit_event(
    ctx: &AppContext,
    conn: &mut AnyConnection,
    user_id: &str,
    kind: &str,
    data: Value,
) -> Result<Option<String>, NotifyError> {
    if !valid_event_type(kind) || kind == "*" {
        return Err(NotifyError::Invalid(format!(
            "event type `{kind}` must be 1-64 characters of a-z, 0-9, `.`, `_`, `-`"
        )));
    }
    let hooks: Vec<(String, String)> = sqlx::query_as(
        "SELECT id, event_types FROM notification_webhooks WHERE user_id = $1 AND disabled_at IS NULL",
    )
    .bind(user_id)
    .fetch_all(&mut *conn)
    .await?;
    let matching: Vec<String> = hooks
        .into_iter()
        .filter(|(_, types)| {
            serde_json::from_str::<Vec<String>>(types)
                .map(|ts| ts.iter().any(|t| t == "*" || t == kind))
                .unwrap_or(false)
        })
        .map(|(id, _)| id)
        .collect();
    if matching.is_empty() {
        return Ok(None);
    }
    let message_id = format!("msg_{}", uuid_simple());
    let timestamp = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let body = serde_json::to_string(&json!({
        "type": kind,
        "timestamp": timestamp,
        "data": data,
    }))
    .map_err(|e| NotifyError::Invalid(e.to_string()))?;
    let s = &ctx.settings.notifications;
    for webhook_id in matching {
        let job = NewJob::typed(
            crate::NOTIFICATIONS_QUEUE,
            WEBHOOK_KIND,
            &Delivery {
                webhook_id: webhook_id.clone(),
                message_id: message_id.clone(),
                event_type: kind.to_string(),
                body: body.clone(),
            },
        )
        .map_err(|e| NotifyError::Invalid(e.to_string()))?
        .unique_key(format!("webhook:{webhook_id}:{message_id}"))
        .max_attempts(s.webhook_max_attempts as i64)
        .timeout(Duration::from_millis(s.webhook_timeout_ms) + Duration::from_secs(10));
        ctx.jobs.enqueue_in_transaction(conn, job).await?;
    }
    Ok(Some(message_id))
}

fn uuid_simple() -> String {
    shoal_core::ids::new_id().replace('-', "")
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
struct WebhookRow {
    id: String,
    user_id: String,
    url: String,
    event_types: String,
    description: String,
    created_at: i64,
    failing_since: Option<i64>,
    disabled_at: Option<i64>,
    disabled_reason: Option<String>,
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub(crate) struct WebhookView {
    id: String,
    url: String,
    event_types: Vec<String>,
    description: String,
    status: &'static str,
    created_at: i64,
    failing_since: Option<i64>,
    disabled_at: Option<i64>,
    disabled_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret: Option<String>,
}

impl From<WebhookRow> for WebhookView {
    fn from(r: WebhookRow) -> Self {
        WebhookView {
            status: if r.disabled_at.is_some() {
                "disabled"
            } else if r.failing_since.is_some() {
                "failing"
            } else {
                "enabled"
            },
            event_types: serde_json::from_str(&r.event_types).unwrap_or_default(),
            id: r.id,
            url: r.url,
            description: r.description,
            created_at: r.created_at,
            failing_since: r.failing_since,
            disabled_at: r.disabled_at,
            disabled_reason: r.disabled_reason,
            secret: None,
        }
    }
}

const SELECT: &str = "SELECT id, user_id, url, event_types, description, created_at, failing_since,
    disabled_at, disabled_reason FROM notification_webhooks";

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateWebhook {
    url: String,
    event_types: Vec<String>,
    #[serde(default)]
    description: Option<String>,
}

/// Checks a target URL's form, then that its host resolves to allowed
/// addresses.
async fn check_url(raw: &str, allow_private: bool) -> Result<reqwest::Url, Problem> {
    let field = |msg: String| {
        Problem::validation(format!("the webhook url is not usable: {msg}")).with_field("url", msg)
    };
    if raw.len() > 2048 {
        return Err(field("must be at most 2048 characters".into()));
    }
    let url = reqwest::Url::parse(raw.trim())
        .map_err(|e| field(format!("is not a URL ({e}); send https://host/path")))?;
    if url.scheme() != "https" && url.scheme() != "http" {
        return Err(field("must start with https:// (or http://)".into()));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(field("must not contain a user name or password".into()));
    }
    if url.fragment().is_some() {
        return Err(field("must not contain a #fragment".into()));
    }
    let Some(host) = url.host_str() else {
        return Err(field("has no host".into()));
    };
    let port = url.port_or_known_default().unwrap_or(443);
    resolve_checked(host, port, allow_private)
        .await
        .map_err(|e| field(e.to_string()))?;
    Ok(url)
}

/// `POST /api/notifications/webhooks`: registers an endpoint; the answer
/// (201) is the only one that shows its secret.
pub(crate) async fn create(
    State(ctx): State<AppContext>,
    CurrentSession(session): CurrentSession,
    ApiJson(body): ApiJson<CreateWebhook>,
) -> ApiResult<Response> {
    let s = &ctx.settings.notifications;
    let mut types: Vec<String> = body
        .event_types
        .iter()
        .map(|t| t.trim().to_string())
        .collect();
    types.sort();
    types.dedup();
    if types.is_empty() || types.len() > MAX_EVENT_TYPES {
        return Err(
            Problem::validation("event_types must list 1 to 50 event types")
                .with_field(
                    "event_types",
                    "list the event types to receive, or [\"*\"] for all",
                )
                .into(),
        );
    }
    if let Some(bad) = types.iter().find(|t| !valid_event_type(t)) {
        return Err(
            Problem::validation(format!("event type `{bad}` is not valid"))
                .with_field(
                    "event_types",
                    "each must be `*` or 1-64 characters of a-z, 0-9, `.`, `_`, `-`",
                )
                .into(),
        );
    }
    let description = body.description.unwrap_or_default().trim().to_string();
    if description.chars().count() > 200 {
        return Err(Problem::validation("description is too long")
            .with_field("description", "must be at most 200 characters")
            .into());
    }
    let url = check_url(&body.url, s.allow_private_webhook_targets).await?;
    let (count,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM notification_webhooks WHERE user_id = $1")
            .bind(&session.user_id)
            .fetch_one(ctx.db.pool())
            .await?;
    if count >= s.max_webhooks_per_user as i64 {
        return Err(Problem::conflict(format!(
            "you have {count} webhook endpoints, the maximum; delete one first"
        ))
        .into());
    }
    let row = WebhookRow {
        id: shoal_core::ids::new_id(),
        user_id: session.user_id.clone(),
        url: url.to_string(),
        event_types: serde_json::to_string(&types).unwrap_or_else(|_| "[]".into()),
        description,
        created_at: now_millis(),
        failing_since: None,
        disabled_at: None,
        disabled_reason: None,
    };
    let secret = new_secret();
    sqlx::query(
        "INSERT INTO notification_webhooks (id, user_id, url, event_types, description, secret, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(&row.id)
    .bind(&row.user_id)
    .bind(&row.url)
    .bind(&row.event_types)
    .bind(&row.description)
    .bind(&secret)
    .bind(row.created_at)
    .execute(ctx.db.pool())
    .await?;
    tracing::info!(webhook_id = %row.id, "webhook endpoint registered");
    let location = format!("/api/notifications/webhooks/{}", row.id);
    let mut view = WebhookView::from(row);
    view.secret = Some(secret);
    Ok((
        StatusCode::CREATED,
        [("location", location), ("cache-control", "no-store".into())],
        Json(view),
    )
        .into_response())
}

pub(crate) async fn list(
    State(ctx): State<AppContext>,
    CurrentSession(session): CurrentSession,
) -> ApiResult<Json<Value>> {
    let rows: Vec<WebhookRow> =
        sqlx::query_as(&format!("{SELECT} WHERE user_id = $1 ORDER BY created_at"))
            .bind(&session.user_id)
            .fetch_all(ctx.db.pool())
            .await?;
    let views: Vec<WebhookView> = rows.into_iter().map(WebhookView::from).collect();
    Ok(Json(json!({ "webhooks": views })))
}

async fn own(ctx: &AppContext, user_id: &str, id: &str) -> Result<WebhookRow, ApiError> {
    let row: Option<WebhookRow> = sqlx::query_as(&format!("{SELECT} WHERE id = $1"))
        .bind(id)
        .fetch_optional(ctx.db.pool())
        .await?;
    match row {
        Some(r) if r.user_id == user_id => Ok(r),
        _ => Err(Problem::not_found(format!("no webhook endpoint `{id}`")).into()),
    }
}

pub(crate) async fn show(
    State(ctx): State<AppContext>,
    CurrentSession(session): CurrentSession,
    Path(id): Path<String>,
) -> ApiResult<Json<WebhookView>> {
    Ok(Json(own(&ctx, &session.user_id, &id).await?.into()))
}

/// `DELETE`: the endpoint goes; deliveries already queued find it gone
/// and stop. Its attempt log is deleted with it.
pub(crate) async fn remove(
    State(ctx): State<AppContext>,
    CurrentSession(session): CurrentSession,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    own(&ctx, &session.user_id, &id).await?;
    let mut writer = ctx.db.write().await?;
    let mut tx = writer.begin().await?;
    sqlx::query("DELETE FROM notification_webhooks WHERE id = $1")
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM notification_webhook_attempts WHERE webhook_id = $1")
        .bind(&id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    drop(writer);
    Ok(StatusCode::NO_CONTENT)
}

/// `POST .../{id}/enable`: turns a disabled endpoint back on (future
/// events only; deliveries that died are not resent).
pub(crate) async fn enable(
    State(ctx): State<AppContext>,
    CurrentSession(session): CurrentSession,
    Path(id): Path<String>,
) -> ApiResult<Json<WebhookView>> {
    own(&ctx, &session.user_id, &id).await?;
    sqlx::query(
        "UPDATE notification_webhooks SET disabled_at = NULL, disabled_reason = NULL, failing_since = NULL WHERE id = $1",
    )
    .bind(&id)
    .execute(ctx.db.pool())
    .await?;
    Ok(Json(own(&ctx, &session.user_id, &id).await?.into()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AttemptsQuery {
    #[serde(default)]
    limit: Option<i64>,
}

#[derive(Debug, Serialize, sqlx::FromRow, schemars::JsonSchema)]
pub(crate) struct AttemptRow {
    id: String,
    message_id: String,
    event_type: String,
    attempt: i64,
    status_code: Option<i64>,
    error: Option<String>,
    duration_ms: i64,
    created_at: i64,
}

/// `GET .../{id}/attempts`: the delivery log, newest first.
pub(crate) async fn attempts(
    State(ctx): State<AppContext>,
    CurrentSession(session): CurrentSession,
    Path(id): Path<String>,
    Query(q): Query<AttemptsQuery>,
) -> ApiResult<Json<Value>> {
    own(&ctx, &session.user_id, &id).await?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let rows: Vec<AttemptRow> = sqlx::query_as(
        "SELECT id, message_id, event_type, attempt, status_code, error, duration_ms, created_at
         FROM notification_webhook_attempts WHERE webhook_id = $1
         ORDER BY created_at DESC, id DESC LIMIT $2",
    )
    .bind(&id)
    .bind(limit)
    .fetch_all(ctx.db.pool())
    .await?;
    Ok(Json(json!({ "attempts": rows })))
}

// ---------------------------------------------------------------- delivery

struct Deliverer {
    ctx: AppContext,
    client: reqwest::Client,
}

pub(crate) fn register(ctx: AppContext, worker: Worker) -> Worker {
    let s = ctx.settings.notifications.clone();
    let client = reqwest::Client::builder()
        .dns_resolver(Arc::new(GuardedResolver {
            allow_private: s.allow_private_webhook_targets,
        }))
        // A redirect could lead anywhere; a 3xx is a failed delivery.
        .redirect(reqwest::redirect::Policy::none())
        // A proxy would resolve the host itself, past our address checks.
        .no_proxy()
        .timeout(Duration::from_millis(s.webhook_timeout_ms))
        .connect_timeout(Duration::from_millis(s.webhook_timeout_ms.min(5_000)))
        .user_agent("Shoal-Webhooks/1")
        .pool_idle_timeout(Duration::from_secs(30))
        .build();
    let client = match client {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook HTTP client; deliveries will not be handled");
            return worker;
        }
    };
    let deliverer = Arc::new(Deliverer { ctx, client });
    worker.register_with(
        WEBHOOK_KIND,
        handler_fn(move |job: JobContext| {
            let d = deliverer.clone();
            async move { d.deliver(&job).await }
        }),
        KindOptions {
            backoff: Backoff {
                base: Duration::from_millis(s.webhook_retry_base_ms.max(1)),
                max: Duration::from_secs(s.webhook_retry_max_secs.max(1)),
                jitter: 0.2,
            },
            rate_limit: None,
        },
    )
}

enum Outcome {
    Delivered(u16),
    Failed {
        status: Option<u16>,
        error: String,
        permanent: bool,
    },
}

impl Deliverer {
    async fn deliver(&self, job: &JobContext) -> Result<(), JobError> {
        let d: Delivery = job.payload_as()?;
        let ctx = &self.ctx;
        let hook: Option<(String, String, Option<i64>)> = sqlx::query_as(
            "SELECT url, secret, disabled_at FROM notification_webhooks WHERE id = $1",
        )
        .bind(&d.webhook_id)
        .fetch_optional(ctx.db.pool())
        .await
        .map_err(JobError::retryable)?;
        let Some((url, secret, disabled_at)) = hook else {
            tracing::info!(webhook_id = %d.webhook_id, "webhook endpoint deleted; delivery dropped");
            return Ok(());
        };
        if disabled_at.is_some() {
            return Err(JobError::Permanent("the endpoint is disabled".into()));
        }
        let started = Instant::now();
        let outcome = self.attempt(&url, &secret, &d).await;
        let duration_ms = started.elapsed().as_millis() as i64;
        let now = now_millis();
        let (status, error) = match &outcome {
            Outcome::Delivered(s) => (Some(*s), None),
            Outcome::Failed { status, error, .. } => (*status, Some(error.clone())),
        };
        sqlx::query(
            "INSERT INTO notification_webhook_attempts
             (id, webhook_id, message_id, event_type, attempt, status_code, error, duration_ms, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(shoal_core::ids::new_id())
        .bind(&d.webhook_id)
        .bind(&d.message_id)
        .bind(&d.event_type)
        .bind(job.attempt())
        .bind(status.map(i64::from))
        .bind(error.as_deref())
        .bind(duration_ms)
        .bind(now)
        .execute(ctx.db.pool())
        .await
        .map_err(JobError::retryable)?;
        match outcome {
            Outcome::Delivered(code) => {
                metrics::counter!("shoal_notifications_webhook_deliveries_total", "result" => "ok")
                    .increment(1);
                sqlx::query("UPDATE notification_webhooks SET failing_since = NULL WHERE id = $1")
                    .bind(&d.webhook_id)
                    .execute(ctx.db.pool())
                    .await
                    .map_err(JobError::retryable)?;
                tracing::info!(webhook_id = %d.webhook_id, message_id = %d.message_id, status = code, "webhook delivered");
                Ok(())
            }
            Outcome::Failed {
                error, permanent, ..
            } => {
                metrics::counter!("shoal_notifications_webhook_deliveries_total", "result" => "failed")
                    .increment(1);
                sqlx::query(
                    "UPDATE notification_webhooks SET failing_since = COALESCE(failing_since, $1) WHERE id = $2",
                )
                .bind(now)
                .bind(&d.webhook_id)
                .execute(ctx.db.pool())
                .await
                .map_err(JobError::retryable)?;
                let limit_ms =
                    (ctx.settings.notifications.webhook_disable_after_secs as i64) * 1000;
                let disabled = sqlx::query(
                    "UPDATE notification_webhooks SET disabled_at = $1, disabled_reason = $2
                     WHERE id = $3 AND disabled_at IS NULL AND failing_since IS NOT NULL AND failing_since <= $4",
                )
                .bind(now)
                .bind(format!(
                    "every delivery failed for {} s; last error: {}",
                    limit_ms / 1000,
                    error.chars().take(300).collect::<String>()
                ))
                .bind(&d.webhook_id)
                .bind(now - limit_ms)
                .execute(ctx.db.pool())
                .await
                .map_err(JobError::retryable)?
                .rows_affected()
                    > 0;
                if disabled {
                    metrics::counter!("shoal_notifications_webhooks_disabled_total").increment(1);
                    tracing::warn!(webhook_id = %d.webhook_id, "webhook endpoint disabled after failing continuously");
                    return Err(JobError::Permanent(format!(
                        "endpoint disabled after failing continuously: {error}"
                    )));
                }
                if permanent {
                    Err(JobError::Permanent(error))
                } else {
                    Err(JobError::Retryable(error))
                }
            }
        }
    }

    async fn attempt(&self, url: &str, secret: &str, d: &Delivery) -> Outcome {
        let allow = self
            .ctx
            .settings
            .notifications
            .allow_private_webhook_targets;
        let parsed = match reqwest::Url::parse(url) {
            Ok(u) => u,
            Err(e) => {
                return Outcome::Failed {
                    status: None,
                    error: format!("stored url is invalid: {e}"),
                    permanent: true,
                }
            }
        };
        // IP literals never reach the client's resolver: check them here.
        if let Some(host) = parsed.host_str() {
            if host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok()
            {
                if let Err(e) = resolve_checked(host, 0, allow).await {
                    return Outcome::Failed {
                        status: None,
                        error: e.to_string(),
                        permanent: true,
                    };
                }
            }
        }
        let timestamp = now_millis() / 1000;
        let signature = match sign_webhook(secret, &d.message_id, timestamp, d.body.as_bytes()) {
            Ok(s) => s,
            Err(e) => {
                return Outcome::Failed {
                    status: None,
                    error: e.to_string(),
                    permanent: true,
                }
            }
        };
        let url = parsed.to_string();
        let (request, span) = shoal_runtime::client::trace_request(
            self.client
                .post(parsed)
                .header("content-type", "application/json")
                .header("webhook-id", &d.message_id)
                .header("webhook-timestamp", timestamp.to_string())
                .header("webhook-signature", signature)
                .body(d.body.clone()),
            format!("webhook {}", d.event_type),
            &reqwest::Method::POST,
            &url,
        );
        let sent = request.send().await;
        shoal_runtime::client::end_request_span(span, sent.as_ref().map(|r| r.status().as_u16()));
        match sent {
            Ok(resp) if resp.status().is_success() => Outcome::Delivered(resp.status().as_u16()),
            Ok(resp) => {
                let status = resp.status().as_u16();
                let text = tokio::time::timeout(Duration::from_secs(2), resp.text())
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default();
                Outcome::Failed {
                    status: Some(status),
                    error: format!(
                        "the endpoint answered {status}: {}",
                        text.chars().take(200).collect::<String>()
                    ),
                    permanent: false,
                }
            }
            Err(e) => {
                let refused = {
                    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
                    let mut found = false;
                    while let Some(s) = src {
                        if let Some(TargetError::Forbidden { .. }) = s.downcast_ref::<TargetError>()
                        {
                            found = true;
                        }
                        src = s.source();
                    }
                    found
                };
                Outcome::Failed {
                    status: None,
                    error: crate::email::error_chain(&e),
                    permanent: refused,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // The example of the Standard Webhooks reference libraries.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let sig = sign_webhook(
            secret,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        )
        .unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn secrets_are_whsec_base64_of_24_bytes() {
        let s = new_secret();
        let raw = s.strip_prefix("whsec_").unwrap();
        assert_eq!(B64.decode(raw).unwrap().len(), 24);
        assert_ne!(new_secret(), s);
    }
}
