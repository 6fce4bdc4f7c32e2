//! The notifications service: templated email (welcome, payment receipt,
//! payment failed) sent by the `notifications.email` job through SMTP or
//! written as `.eml` files; realtime events to a user's SSE and WebSocket
//! connections on every instance, carried by the broadcast bus and
//! replayable from a per-user table; and signed webhooks (Standard
//! Webhooks) to endpoints users register, delivered by retried jobs with
//! every attempt logged. See `docs/notifications.md`.
//!
//! Other services call [`enqueue_email`] and [`emit_event`] inside their own
//! transactions, and [`publish_user_event`] from anywhere (serve or worker).

mod email;
mod net;
mod realtime;
mod webhooks;

pub use email::{
    enqueue_email, enqueue_email_with_key, enqueue_user_email, remember_recipient, render,
    EmailJob, RenderedEmail, Template, EMAIL_KIND, EMAIL_QUEUE, RECIPIENT_KIND,
};
pub use net::is_forbidden_address;
pub use realtime::{publish_user_event, UserEvent, USER_EVENTS_CHANNEL};
pub use webhooks::{emit_event, sign_webhook, WEBHOOK_KIND};

use axum::Extension;
use shoal_backends::Migration;
use shoal_queue::Worker;
use shoal_runtime::openapi::{Api, Op};
use shoal_runtime::{AppContext, ServiceModule};

/// The queue of webhook deliveries and housekeeping (`email` carries mail).
pub const NOTIFICATIONS_QUEUE: &str = "notifications";
/// The housekeeping job: old events and delivery attempts are deleted.
pub const PRUNE_KIND: &str = "notifications.prune";

/// The notifications service module.
#[derive(Debug, Clone, Default)]
pub struct Notifications;

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "events, webhooks, delivery attempts",
        sql: "CREATE TABLE IF NOT EXISTS notification_events (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        data TEXT NOT NULL,
        created_at BIGINT NOT NULL);
    CREATE INDEX IF NOT EXISTS notification_events_user ON notification_events (user_id, id);
    CREATE INDEX IF NOT EXISTS notification_events_created ON notification_events (created_at);
    CREATE TABLE IF NOT EXISTS notification_webhooks (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        url TEXT NOT NULL,
        event_types TEXT NOT NULL,
        description TEXT NOT NULL,
        secret TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        failing_since BIGINT,
        disabled_at BIGINT,
        disabled_reason TEXT);
    CREATE INDEX IF NOT EXISTS notification_webhooks_user ON notification_webhooks (user_id);
    CREATE TABLE IF NOT EXISTS notification_webhook_attempts (
        id TEXT PRIMARY KEY,
        webhook_id TEXT NOT NULL,
        message_id TEXT NOT NULL,
        event_type TEXT NOT NULL,
        attempt BIGINT NOT NULL,
        status_code BIGINT,
        error TEXT,
        duration_ms BIGINT NOT NULL,
        created_at BIGINT NOT NULL);
    CREATE INDEX IF NOT EXISTS notification_webhook_attempts_hook
        ON notification_webhook_attempts (webhook_id, created_at);
    CREATE INDEX IF NOT EXISTS notification_webhook_attempts_created
        ON notification_webhook_attempts (created_at);",
    },
    Migration {
        version: 2,
        name: "address book",
        sql: "CREATE TABLE IF NOT EXISTS notification_recipients (
        user_id TEXT PRIMARY KEY,
        email TEXT NOT NULL,
        updated_at BIGINT NOT NULL);",
    },
];

impl ServiceModule for Notifications {
    fn name(&self) -> &'static str {
        "notifications"
    }

    fn migrations(&self) -> &'static [Migration] {
        MIGRATIONS
    }

    fn routes(&self, ctx: &AppContext) -> Api {
        use serde_json::json;
        const TAG: &str = "notifications";
        let hub = realtime::Hub::start(ctx);
        let event_id = json!({"type": "string", "maxLength": 64});
        let list = |key: &str, items: serde_json::Value| json!({"type": "object", "required": [key], "properties": {key: {"type": "array", "items": items}}});
        Api::new()
            .get(
                "/api/notifications/emails",
                email::list_emails,
                Op::new(TAG, "Emails sent (admins)")
                    .describe("The emails the embedded transport wrote, newest first: for notifications.admin_user_ids, or any user with serve.debug_routes.")
                    .session()
                    .query("to", false, json!({"type": "string"}), "part of the recipient's address")
                    .query("limit", false, json!({"type": "integer", "minimum": 0}), "at most this many (1-1000, default 100)")
                    .query("raw", false, json!({"type": "boolean"}), "include each message's raw text")
                    .json(200, "The emails", list("emails", shoal_runtime::openapi::response_schema::<email::EmailView>()))
                    .problems(&[403]),
            )
            .get(
                "/api/notifications/stream",
                realtime::sse,
                Op::new(TAG, "The user's events (SSE)")
                    .describe("Server-Sent Events: each event's data is {id, kind, data, created_at}; heartbeats are comments. Send Last-Event-ID (or ?last_event_id=) to replay what was missed.")
                    .session()
                    .query("last_event_id", false, event_id.clone(), "replay the events after this one")
                    .header("last-event-id", false, "replay the events after this one (wins over the query)")
                    .answer(200, "An event stream", "text/event-stream", json!({"type": "string"}))
                    .problems(&[422]),
            )
            .get(
                "/api/notifications/ws",
                realtime::websocket,
                Op::new(TAG, "The user's events (WebSocket)")
                    .describe("The same events as text messages over a WebSocket (an HTTP/1.1 upgrade).")
                    .session()
                    .query("last_event_id", false, event_id, "replay the events after this one")
                    .empty(101, "Switching to the WebSocket protocol")
                    .problems(&[422, 426]),
            )
            .post(
                "/api/notifications/events",
                realtime::publish,
                Op::new(TAG, "Publish an event to a user (services)")
                    .describe("Service to service, with a service token scoped events:publish (or clients.token): the event goes to the user's open streams on every instance (kept for replay) and to the user's webhooks subscribed to its kind. Nothing is written when the body is refused. At least once: a retry after a failure may deliver it twice.")
                    .token()
                    .json_body::<realtime::PublishRequest>()
                    .returns::<realtime::Published>(202, "Published"),
            )
            .post(
                "/api/notifications/test",
                realtime::test_event,
                Op::new(TAG, "Send a test event to oneself")
                    .session()
                    .body("application/json", json!({}))
                    .json(202, "Published", json!({"type": "object", "required": ["id"], "properties": {"id": {"type": ["string", "null"]}}})),
            )
            .post(
                "/api/notifications/webhooks",
                webhooks::create,
                Op::new(TAG, "Add a webhook endpoint")
                    .session()
                    .json_body::<webhooks::CreateWebhook>()
                    .returns::<webhooks::WebhookView>(201, "The endpoint, with its signing secret (shown once)")
                    .with_header("location", "the endpoint's URL")
                    .problems(&[409]),
            )
            .get(
                "/api/notifications/webhooks",
                webhooks::list,
                Op::new(TAG, "The user's webhook endpoints")
                    .session()
                    .json(200, "The endpoints", list("webhooks", shoal_runtime::openapi::response_schema::<webhooks::WebhookView>())),
            )
            .get(
                "/api/notifications/webhooks/{id}",
                webhooks::show,
                Op::new(TAG, "A webhook endpoint")
                    .session()
                    .returns::<webhooks::WebhookView>(200, "The endpoint")
                    .problems(&[404]),
            )
            .delete(
                "/api/notifications/webhooks/{id}",
                webhooks::remove,
                Op::new(TAG, "Delete a webhook endpoint")
                    .session()
                    .empty(204, "Deleted")
                    .problems(&[404]),
            )
            .get(
                "/api/notifications/webhooks/{id}/attempts",
                webhooks::attempts,
                Op::new(TAG, "A webhook endpoint's delivery attempts")
                    .session()
                    .query("limit", false, json!({"type": "integer"}), "at most this many (1-1000, default 100)")
                    .json(200, "The attempts, newest first", list("attempts", shoal_runtime::openapi::response_schema::<webhooks::AttemptRow>()))
                    .problems(&[404]),
            )
            .post(
                "/api/notifications/webhooks/{id}/enable",
                webhooks::enable,
                Op::new(TAG, "Enable a disabled webhook endpoint")
                    .session()
                    .returns::<webhooks::WebhookView>(200, "The endpoint")
                    .problems(&[404]),
            )
            .layer(Extension(hub))
    }

    fn register_jobs(&self, ctx: &AppContext, worker: Worker) -> Worker {
        let worker = email::register(ctx.clone(), worker);
        let worker = webhooks::register(ctx.clone(), worker);
        shoal_runtime::jobs::housekeeping(
            worker,
            ctx,
            "notifications-prune",
            "* * * * *",
            NOTIFICATIONS_QUEUE,
            PRUNE_KIND,
            |ctx| async move { prune(&ctx).await },
        )
    }
}

/// Deletes realtime events past their retention and delivery attempts
/// past theirs. Returns how many rows went.
pub async fn prune(ctx: &AppContext) -> Result<u64, sqlx::Error> {
    let s = &ctx.settings.notifications;
    let now = shoal_backends::now_millis();
    let events = sqlx::query("DELETE FROM notification_events WHERE created_at < $1")
        .bind(now - (s.replay_retention_secs as i64) * 1000)
        .execute(ctx.db.pool())
        .await?
        .rows_affected();
    let attempts = sqlx::query("DELETE FROM notification_webhook_attempts WHERE created_at < $1")
        .bind(now - (s.webhook_attempt_retention_days as i64) * 86_400_000)
        .execute(ctx.db.pool())
        .await?
        .rows_affected();
    Ok(events + attempts)
}

/// Errors of the public helpers.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The caller passed something unusable; the message says what.
    #[error("invalid notification: {0}")]
    Invalid(String),
    #[error("notifications (SQL): {0}")]
    Sql(#[from] sqlx::Error),
    #[error("notifications (queue): {0}")]
    Queue(#[from] shoal_queue::QueueError),
}
