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

use axum::routing::{get, post};
use axum::{Extension, Router};
use shoal_backends::Migration;
use shoal_queue::Worker;
use shoal_runtime::{AppContext, ServiceModule};

/// The queue of webhook deliveries and housekeeping (`email` carries mail).
pub const NOTIFICATIONS_QUEUE: &str = "notifications";
/// The housekeeping job: old events and delivery attempts are deleted.
pub const PRUNE_KIND: &str = "notifications.prune";

/// The notifications service module.
#[derive(Debug, Default)]
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

    fn routes(&self, ctx: &AppContext) -> Router<AppContext> {
        let hub = realtime::Hub::start(ctx);
        Router::new()
            .route("/api/notifications/emails", get(email::list_emails))
            .route("/api/notifications/stream", get(realtime::sse))
            .route("/api/notifications/ws", get(realtime::websocket))
            .route("/api/notifications/test", post(realtime::test_event))
            .route(
                "/api/notifications/webhooks",
                post(webhooks::create).get(webhooks::list),
            )
            .route(
                "/api/notifications/webhooks/{id}",
                get(webhooks::show).delete(webhooks::remove),
            )
            .route(
                "/api/notifications/webhooks/{id}/attempts",
                get(webhooks::attempts),
            )
            .route(
                "/api/notifications/webhooks/{id}/enable",
                post(webhooks::enable),
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
