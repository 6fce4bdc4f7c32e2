//! Push delivery (`[[worker.push]]`, docs/queue.md): a queue bound to an
//! HTTP endpoint. Each job of the queue, whatever its kind, is POSTed to
//! the endpoint as JSON, signed as Standard Webhooks sign (`webhook-id`
//! is the job's id, the same on every attempt, so the endpoint can drop a
//! repeat; `webhook-timestamp`; `webhook-signature: v1,<base64
//! HMAC-SHA256>`). The request's deadline is the job's timeout, which the
//! worker's lease covers. A 2xx completes the job; a 4xx answered with
//! `x-shoal-job: dead` sends it to the dead letters at once; anything else
//! (another status, no answer in time, a refused connection) is a failed
//! attempt, retried with the queue's backoff until its attempts run out.
//! Dead letters, retry, cron, the console and `shoal jobs` apply as to any
//! job.

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use shoal_queue::{JobContext, JobError, JobHandler};
use std::time::Duration;

/// The header with which an endpoint sends a job to the dead letters.
pub const OUTCOME_HEADER: &str = "x-shoal-job";

/// How much of a failed answer's body is kept in the job's error.
const ERROR_BODY_BYTES: usize = 300;

/// `v1,<base64 HMAC-SHA256 of "<msg_id>.<timestamp>.<body>">` keyed by
/// `key`: the Standard Webhooks signature.
pub fn standard_webhooks_signature(
    key: &[u8],
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    use base64::Engine as _;
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

/// The key a push secret stands for: the bytes after `whsec_` decoded
/// from base64 when it has that form (Standard Webhooks' own), else the
/// secret's bytes.
pub fn push_key(secret: &str) -> Vec<u8> {
    use base64::Engine as _;
    secret
        .strip_prefix("whsec_")
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec())
}

/// Delivers the jobs of one queue to `url`.
pub struct PushHandler {
    url: reqwest::Url,
    key: Vec<u8>,
    client: reqwest::Client,
}

impl PushHandler {
    pub fn new(url: &str, secret: &str) -> Result<PushHandler, String> {
        let url = reqwest::Url::parse(url).map_err(|e| format!("`{url}`: {e}"))?;
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(PushHandler {
            url,
            key: push_key(secret),
            client,
        })
    }
}

#[async_trait]
impl JobHandler for PushHandler {
    async fn run(&self, ctx: JobContext) -> Result<(), JobError> {
        let job = ctx.job();
        let body = serde_json::to_vec(&serde_json::json!({
            "id": job.id,
            "queue": job.queue,
            "kind": job.kind,
            "payload": job.payload,
            "attempt": ctx.attempt(),
            "max_attempts": job.max_attempts,
            "created_at": job.created_at,
        }))
        .map_err(JobError::permanent)?;
        let timestamp = shoal_backends::now_millis() / 1000;
        let signature = standard_webhooks_signature(&self.key, &job.id, timestamp, &body);
        let timeout = Duration::from_millis(job.timeout_ms.max(1) as u64);
        let sent = self
            .client
            .post(self.url.clone())
            .timeout(timeout)
            .header("content-type", "application/json")
            .header("webhook-id", &job.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .header("x-shoal-deadline-ms", timeout.as_millis().to_string())
            .header("x-shoal-job-attempt", ctx.attempt().to_string())
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Err(JobError::retryable(format!(
                    "{} gave no answer within {} ms",
                    self.url,
                    timeout.as_millis()
                )))
            }
            Err(e) => return Err(JobError::retryable(format!("{}: {e}", self.url))),
        };
        let status = response.status();
        if status.is_success() {
            metrics::counter!("shoal_jobs_pushed_total", "outcome" => "done").increment(1);
            return Ok(());
        }
        let dead = status.is_client_error()
            && response
                .headers()
                .get(OUTCOME_HEADER)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("dead"));
        let error = format!(
            "{} answered {status}: {}",
            self.url,
            start_of_body(response).await
        );
        if dead {
            metrics::counter!("shoal_jobs_pushed_total", "outcome" => "dead").increment(1);
            Err(JobError::permanent(error))
        } else {
            metrics::counter!("shoal_jobs_pushed_total", "outcome" => "failed").increment(1);
            Err(JobError::retryable(error))
        }
    }
}

/// The first `ERROR_BODY_BYTES` of an answer's body, as text: read no
/// further, however long the body is.
async fn start_of_body(mut response: reqwest::Response) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < ERROR_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            _ => break,
        }
    }
    bytes.truncate(ERROR_BODY_BYTES);
    String::from_utf8_lossy(&bytes).into_owned()
}
