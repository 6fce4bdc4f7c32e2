//! Email: the templates (plain text + HTML, rendered in Rust), the public
//! `enqueue_email` helper that other services call inside their
//! transactions, the rate-limited `notifications.email` job that sends
//! through SMTP (lettre, tokio) or writes `.eml` files under
//! `<data_dir>/mail/`, and `GET /api/notifications/emails`.

use crate::NotifyError;
use axum::extract::{Query, State};
use axum::Json;
use lettre::message::{Mailbox, MultiPart};
use lettre::{AsyncFileTransport, AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use shoal_core::Problem;
use shoal_queue::{
    handler_fn, Backoff, Enqueued, JobContext, JobError, KindOptions, NewJob, RateLimit,
    SqlJobStore, Worker,
};
use shoal_runtime::error::ApiResult;
use shoal_runtime::{ApiError, AppContext, CurrentSession};
use sqlx::AnyConnection;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The queue emails go through.
pub const EMAIL_QUEUE: &str = "email";
/// The job kind that sends one email.
pub const EMAIL_KIND: &str = "notifications.email";

/// The emails Shoal sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Template {
    /// After signup. Data: `{"email", "name"?}`.
    Welcome,
    /// To an account's owner when someone signs up with its address
    /// (signup answers as if it were new, so it does not tell who has an
    /// account). Data: `{"email"}`.
    SignupAttempt,
    /// After a successful charge. Data: `{"order_id", "amount_cents",
    /// "currency", "payment_id"?}`.
    PaymentReceipt,
    /// After a declined or failed charge. Data: `{"order_id",
    /// "amount_cents", "currency", "reason"?}`.
    PaymentFailed,
}

/// The payload of a `notifications.email` job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EmailJob {
    /// The address; empty when `to_user` names the recipient instead.
    #[serde(default)]
    pub to: String,
    /// A user whose address is looked up in the notifications service's
    /// address book when the message is sent (see [`remember_recipient`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_user: Option<String>,
    pub template: Template,
    pub data: Value,
}

/// Job kind that records a user's address in the address book.
pub const RECIPIENT_KIND: &str = "notifications.recipient";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecipientJob {
    user_id: String,
    email: String,
}

/// A rendered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenderedEmail {
    pub subject: String,
    pub text: String,
    pub html: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WelcomeData {
    email: String,
    #[serde(default)]
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AttemptData {
    email: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiptData {
    order_id: String,
    amount_cents: i64,
    currency: String,
    #[serde(default)]
    payment_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FailedData {
    order_id: String,
    amount_cents: i64,
    currency: String,
    #[serde(default)]
    reason: Option<String>,
}

fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn money(cents: i64, currency: &str) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let c = cents.unsigned_abs();
    format!(
        "{sign}{}.{:02} {}",
        c / 100,
        c % 100,
        currency.to_uppercase()
    )
}

fn html_page(title: &str, paragraphs: &[String]) -> String {
    let body: String = paragraphs.iter().map(|p| format!("<p>{p}</p>\n")).collect();
    format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{}</title></head>\n\
         <body style=\"font-family: sans-serif; max-width: 36em\">\n<h1>{}</h1>\n{body}</body></html>\n",
        escape(title),
        escape(title)
    )
}

/// Renders `template` with `data` (the error names what is missing or
/// wrong). `public_url` is put in links.
pub fn render(
    template: Template,
    data: &Value,
    public_url: &str,
) -> Result<RenderedEmail, NotifyError> {
    let bad =
        |e: serde_json::Error| NotifyError::Invalid(format!("data of the {template:?} email: {e}"));
    let base = public_url.trim_end_matches('/');
    Ok(match template {
        Template::Welcome => {
            let d: WelcomeData = serde_json::from_value(data.clone()).map_err(bad)?;
            let who = if d.name.trim().is_empty() {
                d.email.clone()
            } else {
                d.name.trim().to_string()
            };
            let subject = "Welcome to Shoal".to_string();
            let text = format!(
                "Hello {who},\n\nyour Shoal account for {} is ready.\n\
                 Sign in at {base}/ to get started.\n\n-- Shoal\n",
                d.email
            );
            let html = html_page(
                &subject,
                &[
                    format!("Hello {},", escape(&who)),
                    format!(
                        "your Shoal account for <b>{}</b> is ready.",
                        escape(&d.email)
                    ),
                    format!("<a href=\"{}/\">Sign in</a> to get started.", escape(base)),
                ],
            );
            RenderedEmail {
                subject,
                text,
                html,
            }
        }
        Template::SignupAttempt => {
            let d: AttemptData = serde_json::from_value(data.clone()).map_err(bad)?;
            let subject = "Someone tried to sign up with your address".to_string();
            let text = format!(
                "Hello,\n\nsomeone (perhaps you) tried to create a Shoal account for {}, \
                 which already has one. Nothing was changed.\n\
                 If it was you, sign in at {base}/ instead. If not, you can ignore this message.\n\n-- Shoal\n",
                d.email
            );
            let html = html_page(
                &subject,
                &[
                    "Hello,".to_string(),
                    format!(
                        "someone (perhaps you) tried to create a Shoal account for <b>{}</b>, \
                         which already has one. Nothing was changed.",
                        escape(&d.email)
                    ),
                    format!(
                        "If it was you, <a href=\"{}/\">sign in</a> instead. If not, you can ignore this message.",
                        escape(base)
                    ),
                ],
            );
            RenderedEmail {
                subject,
                text,
                html,
            }
        }
        Template::PaymentReceipt => {
            let d: ReceiptData = serde_json::from_value(data.clone()).map_err(bad)?;
            let amount = money(d.amount_cents, &d.currency);
            let subject = format!("Receipt for order {}", d.order_id);
            let reference = d
                .payment_id
                .as_deref()
                .map(|p| format!("Payment reference: {p}\n"))
                .unwrap_or_default();
            let text = format!(
                "Thank you for your order.\n\nOrder: {}\nAmount paid: {amount}\n{reference}\n\
                 Your order: {base}/orders/{}\n\n-- Shoal\n",
                d.order_id, d.order_id
            );
            let mut paragraphs = vec![
                "Thank you for your order.".to_string(),
                format!(
                    "Order <b>{}</b><br>Amount paid: <b>{}</b>",
                    escape(&d.order_id),
                    escape(&amount)
                ),
            ];
            if let Some(p) = &d.payment_id {
                paragraphs.push(format!("Payment reference: {}", escape(p)));
            }
            paragraphs.push(format!(
                "<a href=\"{}/orders/{}\">See your order</a>",
                escape(base),
                escape(&d.order_id)
            ));
            let html = html_page(&subject, &paragraphs);
            RenderedEmail {
                subject,
                text,
                html,
            }
        }
        Template::PaymentFailed => {
            let d: FailedData = serde_json::from_value(data.clone()).map_err(bad)?;
            let amount = money(d.amount_cents, &d.currency);
            let subject = format!("Payment failed for order {}", d.order_id);
            let reason = d
                .reason
                .clone()
                .unwrap_or_else(|| "the payment was declined".into());
            let text = format!(
                "We could not charge {amount} for order {}: {reason}.\n\n\
                 Try another card at {base}/orders/{}\n\n-- Shoal\n",
                d.order_id, d.order_id
            );
            let html = html_page(
                &subject,
                &[
                    format!(
                        "We could not charge <b>{}</b> for order <b>{}</b>: {}.",
                        escape(&amount),
                        escape(&d.order_id),
                        escape(&reason)
                    ),
                    format!(
                        "<a href=\"{}/orders/{}\">Try another card</a>",
                        escape(base),
                        escape(&d.order_id)
                    ),
                ],
            );
            RenderedEmail {
                subject,
                text,
                html,
            }
        }
    })
}

fn check_address(to: &str) -> Result<Mailbox, NotifyError> {
    to.parse::<Mailbox>()
        .map_err(|e| NotifyError::Invalid(format!("recipient `{to}` is not an address: {e}")))
}

/// Enqueues one email on the caller's connection (typically inside the
/// transaction that makes it necessary: it is sent if and only if that
/// commits). The recipient and the template's data are checked now, so a
/// bad call fails the caller's request, not a job later.
pub async fn enqueue_email(
    jobs: &SqlJobStore,
    conn: &mut AnyConnection,
    to: &str,
    template: Template,
    data: Value,
) -> Result<Enqueued, NotifyError> {
    enqueue(jobs, conn, Recipient::Address(to), template, data, None).await
}

/// [`enqueue_email`] at most once per `unique_key` (for example
/// `receipt:<payment id>`), however often the caller retries.
pub async fn enqueue_email_with_key(
    jobs: &SqlJobStore,
    conn: &mut AnyConnection,
    to: &str,
    template: Template,
    data: Value,
    unique_key: &str,
) -> Result<Enqueued, NotifyError> {
    enqueue(
        jobs,
        conn,
        Recipient::Address(to),
        template,
        data,
        Some(unique_key),
    )
    .await
}

/// [`enqueue_email_with_key`] to a user, whose address the notifications
/// service knows from [`remember_recipient`] (services other than accounts
/// hold user ids, not addresses). The address is looked up when the
/// message is sent; until the address book has it, the job retries.
pub async fn enqueue_user_email(
    jobs: &SqlJobStore,
    conn: &mut AnyConnection,
    user_id: &str,
    template: Template,
    data: Value,
    unique_key: &str,
) -> Result<Enqueued, NotifyError> {
    enqueue(
        jobs,
        conn,
        Recipient::User(user_id),
        template,
        data,
        Some(unique_key),
    )
    .await
}

/// Records (on the caller's connection, typically the transaction that
/// creates the account) that `user_id` reads mail at `email`. The address
/// book belongs to the notifications service: this enqueues the change,
/// and its worker writes it, so the caller never touches its tables.
pub async fn remember_recipient(
    jobs: &SqlJobStore,
    conn: &mut AnyConnection,
    user_id: &str,
    email: &str,
) -> Result<Enqueued, NotifyError> {
    check_address(email)?;
    if user_id.is_empty() {
        return Err(NotifyError::Invalid("a recipient needs a user id".into()));
    }
    let job = NewJob::typed(
        EMAIL_QUEUE,
        RECIPIENT_KIND,
        &RecipientJob {
            user_id: user_id.to_string(),
            email: email.to_string(),
        },
    )
    .map_err(|e| NotifyError::Invalid(e.to_string()))?
    .max_attempts(25)
    .unique_key(format!("recipient:{user_id}:{email}"));
    Ok(jobs.enqueue_in_transaction(conn, job).await?)
}

enum Recipient<'a> {
    Address(&'a str),
    User(&'a str),
}

async fn enqueue(
    jobs: &SqlJobStore,
    conn: &mut AnyConnection,
    to: Recipient<'_>,
    template: Template,
    data: Value,
    unique_key: Option<&str>,
) -> Result<Enqueued, NotifyError> {
    let (to, to_user) = match to {
        Recipient::Address(a) => {
            check_address(a)?;
            (a.to_string(), None)
        }
        Recipient::User("") => {
            return Err(NotifyError::Invalid("a recipient needs a user id".into()))
        }
        Recipient::User(u) => (String::new(), Some(u.to_string())),
    };
    render(template, &data, "http://check")?;
    let payload = EmailJob {
        to,
        to_user,
        template,
        data,
    };
    let mut job = NewJob::typed(EMAIL_QUEUE, EMAIL_KIND, &payload)
        .map_err(|e| NotifyError::Invalid(e.to_string()))?
        .max_attempts(25);
    if let Some(key) = unique_key {
        job = job.unique_key(format!("email:{key}"));
    }
    Ok(jobs.enqueue_in_transaction(conn, job).await?)
}

/// Where mail goes.
enum Transport {
    Smtp(AsyncSmtpTransport<Tokio1Executor>),
    Files(PathBuf),
    Broken(String),
}

struct Mailer {
    db: shoal_backends::Database,
    transport: Transport,
    from: Result<Mailbox, String>,
    public_url: String,
}

/// The directory of `.eml` files in embedded mode.
pub fn mail_dir(ctx: &AppContext) -> PathBuf {
    ctx.settings.data_dir.join("mail")
}

pub(crate) fn register(ctx: AppContext, worker: Worker) -> Worker {
    let s = &ctx.settings.notifications;
    let transport = match &s.smtp_url {
        None => Transport::Files(mail_dir(&ctx)),
        Some(url) => match AsyncSmtpTransport::<Tokio1Executor>::from_url(url) {
            Ok(b) => Transport::Smtp(b.timeout(Some(Duration::from_secs(15))).build()),
            Err(e) => {
                tracing::error!(error = %e, "notifications.smtp_url is unusable; emails will wait");
                Transport::Broken(format!("notifications.smtp_url is unusable: {e}"))
            }
        },
    };
    let mailer = Arc::new(Mailer {
        db: ctx.db.clone(),
        transport,
        from: s
            .email_from
            .parse::<Mailbox>()
            .map_err(|e| format!("notifications.email_from is not an address: {e}")),
        public_url: s.public_url.clone(),
    });
    let options = KindOptions {
        backoff: Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(s.email_retry_max_secs.max(1)),
            jitter: 0.3,
        },
        rate_limit: Some(RateLimit {
            per_second: s.email_rate_per_second,
            burst: s.email_rate_per_second.ceil().max(1.0) as u32,
        }),
    };
    let db = ctx.db.clone();
    let worker = worker.register(
        RECIPIENT_KIND,
        handler_fn(move |job: JobContext| {
            let db = db.clone();
            async move {
                let r: RecipientJob = job.payload_as()?;
                sqlx::query(
                    "INSERT INTO notification_recipients (user_id, email, updated_at)
                     VALUES ($1, $2, $3)
                     ON CONFLICT (user_id) DO UPDATE SET email = excluded.email,
                        updated_at = excluded.updated_at",
                )
                .bind(&r.user_id)
                .bind(&r.email)
                .bind(shoal_backends::now_millis())
                .execute(db.pool())
                .await
                .map_err(JobError::retryable)?;
                Ok(())
            }
        }),
    );
    worker.register_with(
        EMAIL_KIND,
        handler_fn(move |job: JobContext| {
            let mailer = mailer.clone();
            async move { send(&mailer, &job).await }
        }),
        options,
    )
}

async fn send(mailer: &Mailer, job: &JobContext) -> Result<(), JobError> {
    let payload: EmailJob = job.payload_as()?;
    let rendered =
        render(payload.template, &payload.data, &mailer.public_url).map_err(JobError::permanent)?;
    let address = match &payload.to_user {
        Some(user_id) if payload.to.is_empty() => {
            let found: Option<(String,)> =
                sqlx::query_as("SELECT email FROM notification_recipients WHERE user_id = $1")
                    .bind(user_id)
                    .fetch_optional(mailer.db.pool())
                    .await
                    .map_err(JobError::retryable)?;
            match found {
                Some((email,)) => email,
                // The account's address may still be on its way (its
                // `notifications.recipient` job runs on the same queue).
                None => {
                    return Err(JobError::Retryable(format!(
                        "no address known yet for user {user_id}"
                    )))
                }
            }
        }
        _ => payload.to.clone(),
    };
    let to = check_address(&address).map_err(JobError::permanent)?;
    let from = mailer.from.clone().map_err(JobError::Retryable)?;
    // The same Message-ID on every attempt, so a receiver can drop a
    // duplicate left by an attempt whose result was lost.
    let message = Message::builder()
        .from(from)
        .to(to)
        .subject(rendered.subject)
        .message_id(Some(format!("<{}@shoal>", job.id())))
        .multipart(MultiPart::alternative_plain_html(
            rendered.text,
            rendered.html,
        ))
        .map_err(JobError::permanent)?;
    let template = format!("{:?}", payload.template);
    let mut span = shoal_core::spans::start(
        format!("send email {template}"),
        shoal_core::spans::Kind::Client,
        None,
    );
    let result = match &mailer.transport {
        Transport::Broken(msg) => Err(JobError::Retryable(msg.clone())),
        Transport::Files(dir) => {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(JobError::retryable)?;
            AsyncFileTransport::<Tokio1Executor>::new(dir)
                .send(message)
                .await
                .map(|_| ())
                .map_err(|e| JobError::Retryable(format!("writing the .eml file: {e}")))
        }
        Transport::Smtp(smtp) => match smtp.send(message).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() => Err(JobError::Permanent(format!(
                "the SMTP server refused the message: {e}"
            ))),
            Err(e) => Err(JobError::Retryable(format!("SMTP: {}", error_chain(&e)))),
        },
    };
    if let Some(mut span) = span.take() {
        span.attr(
            "shoal.email.transport",
            match &mailer.transport {
                Transport::Smtp(_) => "smtp",
                Transport::Files(_) => "files",
                Transport::Broken(_) => "broken",
            },
        );
        if let Err(e) = &result {
            span.fail(e.to_string());
        }
        span.end();
    }
    match &result {
        Ok(()) => {
            metrics::counter!("shoal_notifications_emails_sent_total", "template" => template)
                .increment(1);
            tracing::info!(job_id = job.id(), "email sent");
        }
        Err(e) => {
            metrics::counter!("shoal_notifications_email_failures_total", "template" => template)
                .increment(1);
            tracing::warn!(job_id = job.id(), attempt = job.attempt(), error = %e, "email not sent");
        }
    }
    result
}

pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        let next = c.to_string();
        if !s.contains(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        src = c.source();
    }
    s
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EmailListQuery {
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    /// Include each message's full source.
    #[serde(default)]
    raw: bool,
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
pub(crate) struct EmailView {
    file: String,
    to: String,
    from: String,
    subject: String,
    message_id: String,
    size: u64,
    written_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    raw: Option<String>,
}

fn header(source: &str, name: &str) -> String {
    let mut lines = source.lines();
    let mut value: Option<String> = None;
    for line in lines.by_ref() {
        if line.is_empty() {
            break;
        }
        if let Some(v) = value.as_mut() {
            if line.starts_with(' ') || line.starts_with('\t') {
                v.push(' ');
                v.push_str(line.trim());
                continue;
            }
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case(name) {
                value = Some(v.trim().to_string());
            }
        }
    }
    value.unwrap_or_default()
}

/// `GET /api/notifications/emails`: the `.eml` files written in embedded
/// mode, newest first. Admins (`notifications.admin_user_ids`) only, or
/// anyone logged in when `serve.debug_routes` is on (development).
pub(crate) async fn list_emails(
    State(ctx): State<AppContext>,
    CurrentSession(session): CurrentSession,
    Query(q): Query<EmailListQuery>,
) -> ApiResult<Json<Value>> {
    let s = &ctx.settings;
    if !s.serve.debug_routes && !s.notifications.admin_user_ids.contains(&session.user_id) {
        return Err(Problem::forbidden(
            "only notifications admins (notifications.admin_user_ids) may list emails, \
             or anyone in development (serve.debug_routes = true)",
        )
        .into());
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let dir = mail_dir(&ctx);
    let mut files = Vec::new();
    match tokio::fs::read_dir(&dir).await {
        Ok(mut rd) => {
            while let Some(entry) = rd
                .next_entry()
                .await
                .map_err(|e| ApiError::internal("listing the mail directory", &e))?
            {
                let name = entry.file_name().to_string_lossy().to_string();
                if !name.ends_with(".eml") {
                    continue;
                }
                let Ok(meta) = entry.metadata().await else {
                    continue;
                };
                let written = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0);
                files.push((written, name, meta.len()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ApiError::internal("listing the mail directory", &e)),
    }
    files.sort_by(|a, b| b.cmp(a));
    let mut out = Vec::new();
    for (written_at, file, size) in files {
        if out.len() >= limit {
            break;
        }
        let Ok(source) = tokio::fs::read_to_string(dir.join(&file)).await else {
            continue;
        };
        let to = header(&source, "To");
        if let Some(want) = &q.to {
            if !to.to_lowercase().contains(&want.to_lowercase()) {
                continue;
            }
        }
        out.push(EmailView {
            file,
            from: header(&source, "From"),
            subject: header(&source, "Subject"),
            message_id: header(&source, "Message-ID"),
            to,
            size,
            written_at,
            raw: q.raw.then_some(source),
        });
    }
    Ok(Json(serde_json::json!({ "emails": out })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn templates_render_text_and_escaped_html() {
        let r = render(
            Template::Welcome,
            &json!({"email": "ada@example.com", "name": "<Ada>"}),
            "https://shop.example/",
        )
        .unwrap();
        assert_eq!(r.subject, "Welcome to Shoal");
        assert!(r.text.contains("Hello <Ada>,"));
        let attempt = render(
            Template::SignupAttempt,
            &json!({"email": "<ada>@example.com"}),
            "https://shop.example/",
        )
        .unwrap();
        assert!(attempt
            .text
            .contains("<ada>@example.com, which already has one"));
        assert!(attempt.html.contains("&lt;ada&gt;@example.com"));
        assert!(attempt.html.contains("href=\"https://shop.example/\""));
        assert!(r.html.contains("Hello &lt;Ada&gt;,"));
        assert!(r.html.contains("href=\"https://shop.example/\""));
        let r = render(
            Template::PaymentReceipt,
            &json!({"order_id": "o1", "amount_cents": 123456, "currency": "eur"}),
            "http://x",
        )
        .unwrap();
        assert!(r.text.contains("1234.56 EUR"), "{}", r.text);
        let r = render(
            Template::PaymentFailed,
            &json!({"order_id": "o1", "amount_cents": 5, "currency": "usd", "reason": "card declined"}),
            "http://x",
        )
        .unwrap();
        assert!(r.text.contains("0.05 USD for order o1: card declined"));
    }

    #[test]
    fn bad_data_names_the_field() {
        let e = render(
            Template::PaymentReceipt,
            &json!({"order_id": "o1"}),
            "http://x",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("amount_cents"), "{e}");
        let e = render(
            Template::Welcome,
            &json!({"email": "a@b.c", "nmae": "x"}),
            "http://x",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("nmae"), "{e}");
    }

    #[test]
    fn headers_are_read_with_folding() {
        let src = "From: a@b.c\r\nSubject: Hello\r\n there\r\nTo: x@y.z\r\n\r\nSubject: body";
        assert_eq!(header(src, "subject"), "Hello there");
        assert_eq!(header(src, "To"), "x@y.z");
        assert_eq!(header(src, "Cc"), "");
    }
}
