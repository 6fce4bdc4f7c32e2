//! The `[notifications]` settings section: how email leaves (SMTP or `.eml`
//! files under the data directory), the realtime stream's limits, event
//! retention, and webhook delivery rules.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationsSettings {
    /// SMTP server for outgoing mail: `smtp://host:port` (plain, or
    /// STARTTLS with `?tls=required`), `smtps://host:465`, with
    /// `user:password@` when it needs a login. Unset: every message is
    /// written as an `.eml` file under `<data_dir>/mail/`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smtp_url: Option<String>,
    /// The `From:` of every message.
    pub email_from: String,
    /// Emails started per second per worker process (burst of the same
    /// size), so a backlog never floods the SMTP server.
    pub email_rate_per_second: f64,
    /// Longest wait between two attempts of an email, seconds.
    pub email_retry_max_secs: u64,
    /// Base URL put in links inside emails.
    pub public_url: String,
    /// User ids allowed to list sent emails (`GET /api/notifications/emails`).
    /// With `serve.debug_routes = true` any logged-in user may.
    pub admin_user_ids: Vec<String>,
    /// Events kept per user for `Last-Event-ID` replay: the newest this many...
    pub replay_max_events: u32,
    /// ...and none older than this, seconds.
    pub replay_retention_secs: u64,
    /// Events buffered per open SSE/WebSocket connection; a consumer that
    /// falls this far behind is disconnected (it reconnects and replays).
    pub stream_buffer: usize,
    /// Comment lines (SSE) or pings (WebSocket) sent this often, seconds.
    pub heartbeat_secs: u64,
    /// Open realtime connections one instance accepts (503 past it, with
    /// `Retry-After`: another instance may have room).
    pub max_connections: usize,
    /// Open realtime connections one user may hold on one instance (429
    /// past it): a browser tab that leaks streams, or a script opening
    /// them in a loop, cannot take the instance's room from everyone else.
    pub max_connections_per_user: usize,
    /// When the instance drains, each stream is told to reconnect (an SSE
    /// `stream.reconnect` event with a `retry:` field, a WebSocket close
    /// 1012) at a random moment within this window, ms, so clients do not
    /// all come back to the other instances at once. Events keep flowing
    /// on a stream until its moment; the client resumes with
    /// `Last-Event-ID` and misses none. Keep it below
    /// `serve.shutdown_timeout_secs`.
    pub drain_window_ms: u64,
    /// Webhook endpoints one user may register.
    pub max_webhooks_per_user: u32,
    /// First wait before retrying a failed webhook delivery, ms; doubles
    /// per attempt up to `webhook_retry_max_secs`.
    pub webhook_retry_base_ms: u64,
    pub webhook_retry_max_secs: u64,
    /// Attempts per delivery before it is dead.
    pub webhook_max_attempts: u32,
    /// Time limit of one delivery request, ms.
    pub webhook_timeout_ms: u64,
    /// An endpoint whose deliveries have failed without a single success
    /// for this long is disabled, seconds.
    pub webhook_disable_after_secs: u64,
    /// Deliver webhooks to loopback, private, link-local and other
    /// non-public addresses. Off in production (SSRF); tests turn it on.
    pub allow_private_webhook_targets: bool,
    /// Delivery attempts kept in the log, days.
    pub webhook_attempt_retention_days: u64,
}

impl Default for NotificationsSettings {
    fn default() -> Self {
        NotificationsSettings {
            smtp_url: None,
            email_from: "Shoal <no-reply@shoal.localhost>".into(),
            email_rate_per_second: 10.0,
            email_retry_max_secs: 600,
            public_url: "http://127.0.0.1:8080".into(),
            admin_user_ids: Vec::new(),
            replay_max_events: 100,
            replay_retention_secs: 3600,
            stream_buffer: 64,
            heartbeat_secs: 15,
            max_connections: 50_000,
            max_connections_per_user: 16,
            drain_window_ms: 5_000,
            max_webhooks_per_user: 20,
            webhook_retry_base_ms: 5_000,
            webhook_retry_max_secs: 3600,
            webhook_max_attempts: 12,
            webhook_timeout_ms: 10_000,
            webhook_disable_after_secs: 5 * 24 * 3600,
            allow_private_webhook_targets: false,
            webhook_attempt_retention_days: 30,
        }
    }
}

impl NotificationsSettings {
    /// Range and format checks; errors name the key.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        if let Some(url) = &self.smtp_url {
            if !(url.starts_with("smtp://") || url.starts_with("smtps://")) {
                return Err((
                    "notifications.smtp_url",
                    "must start with smtp:// or smtps:// (for example smtp://127.0.0.1:2525)",
                ));
            }
        }
        if !self.email_from.contains('@') {
            return Err((
                "notifications.email_from",
                "must be an address such as `Shoal <no-reply@example.com>`",
            ));
        }
        if self.email_rate_per_second.is_nan() || self.email_rate_per_second <= 0.0 {
            return Err(("notifications.email_rate_per_second", "must be above 0"));
        }
        if self.stream_buffer == 0 {
            return Err(("notifications.stream_buffer", "must be at least 1"));
        }
        if self.heartbeat_secs == 0 {
            return Err(("notifications.heartbeat_secs", "must be at least 1"));
        }
        if self.max_connections_per_user == 0 {
            return Err((
                "notifications.max_connections_per_user",
                "must be at least 1",
            ));
        }
        if self.drain_window_ms > 600_000 {
            return Err((
                "notifications.drain_window_ms",
                "must be at most 600000 (10 minutes); keep it below serve.shutdown_timeout_secs",
            ));
        }
        if self.replay_max_events == 0 {
            return Err(("notifications.replay_max_events", "must be at least 1"));
        }
        if self.webhook_max_attempts == 0 {
            return Err(("notifications.webhook_max_attempts", "must be at least 1"));
        }
        if self.webhook_timeout_ms == 0 {
            return Err(("notifications.webhook_timeout_ms", "must be at least 1"));
        }
        Ok(())
    }
}
