//! `ServiceClient`: how one service calls another over HTTP. Client-side
//! balanced (round robin over instances whose circuit breaker is closed),
//! with one deadline for the whole call (sent upstream as
//! `x-shoal-deadline-ms`, which the runtime honours), retries on another
//! instance for idempotent calls after connect errors, timeouts and 5xx,
//! and a circuit breaker per instance (open after N consecutive failures,
//! one trial call after a pause).

use serde::de::DeserializeOwned;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{service}: every instance's circuit breaker is open")]
    AllOpen { service: String },
    #[error("{service}: no answer within the deadline of {ms} ms")]
    Deadline { service: String, ms: u64 },
    #[error("{service}: {message}")]
    Failed { service: String, message: String },
    #[error("{service} answered {status}: {body}")]
    Status {
        service: String,
        status: u16,
        body: String,
    },
}

#[derive(Debug)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

#[derive(Debug)]
struct Endpoint {
    base: String,
    breaker: Mutex<Breaker>,
}

/// Options of a [`ServiceClient`].
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub timeout: Duration,
    pub retries: u32,
    pub breaker_failures: u32,
    pub breaker_open: Duration,
    /// Sent as `Authorization: Bearer` on every call (`clients.token`):
    /// what opens the callee's internal endpoints.
    pub token: Option<String>,
}

#[derive(Debug)]
pub struct ServiceClient {
    service: String,
    endpoints: Vec<Endpoint>,
    next: AtomicUsize,
    http: reqwest::Client,
    options: ClientOptions,
}

impl ServiceClient {
    pub fn new(service: &str, bases: &[String], options: ClientOptions) -> Self {
        ServiceClient {
            service: service.to_string(),
            endpoints: bases
                .iter()
                .map(|b| Endpoint {
                    base: b.trim_end_matches('/').to_string(),
                    breaker: Mutex::new(Breaker {
                        failures: 0,
                        open_until: None,
                    }),
                })
                .collect(),
            next: AtomicUsize::new(0),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_millis(500))
                // As many kept as a busy instance has calls in flight:
                // fewer, and the ones over the limit are closed after each
                // call and opened again for the next (bench/README.md, "The
                // SQLite write path, in one hand-off").
                .pool_max_idle_per_host(256)
                .build()
                .expect("http client"),
            options,
        }
    }

    /// Picks the next instance whose breaker admits a call, skipping
    /// `tried` when another is available.
    fn pick(&self, tried: &[usize]) -> Option<usize> {
        let n = self.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let admits = |i: usize| {
            let b = self.endpoints[i].breaker.lock().expect("breaker");
            b.open_until.is_none_or(|t| now >= t)
        };
        (0..n)
            .map(|k| (start + k) % n)
            .find(|i| !tried.contains(i) && admits(*i))
            .or_else(|| (0..n).map(|k| (start + k) % n).find(|i| admits(*i)))
    }

    fn record(&self, i: usize, ok: bool) {
        let mut b = self.endpoints[i].breaker.lock().expect("breaker");
        if ok {
            b.failures = 0;
            b.open_until = None;
        } else {
            b.failures += 1;
            if b.failures >= self.options.breaker_failures.max(1) {
                if b.open_until.is_none() {
                    tracing::warn!(service = %self.service, instance = %self.endpoints[i].base, "circuit breaker opened");
                    metrics::counter!("shoal_client_breaker_opened_total", "service" => self.service.clone()).increment(1);
                }
                b.open_until = Some(Instant::now() + self.options.breaker_open);
            }
        }
    }

    /// GETs `path` as JSON. `Ok(None)` on 404. Retried on other instances
    /// within the deadline (GET is idempotent).
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<Option<T>, ClientError> {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// POSTs `body` to `path` and reads the answer as JSON; `Ok(None)` on
    /// 404. Retried like a GET, so only for calls the callee makes
    /// idempotent (by an id in the body, as stock reservations are).
    pub async fn post_json<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<Option<T>, ClientError> {
        self.call(reqwest::Method::POST, path, Some(body)).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Option<T>, ClientError> {
        let deadline = Instant::now() + self.options.timeout;
        let mut tried = Vec::new();
        let mut last = None;
        for _ in 0..=self.options.retries {
            let Some(i) = self.pick(&tried) else {
                return Err(ClientError::AllOpen {
                    service: self.service.clone(),
                });
            };
            tried.push(i);
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let url = format!("{}{path}", self.endpoints[i].base);
            let mut request = self
                .http
                .request(method.clone(), &url)
                .timeout(left)
                .header("x-shoal-deadline-ms", left.as_millis().to_string());
            if let Some(token) = &self.options.token {
                request = request.bearer_auth(token);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            // The caller's trace, so the callee's logs carry it.
            if let Some(trace) = shoal_core::trace::current() {
                request = request.header("x-request-id", trace);
            }
            let (request, span) = trace_request(
                request,
                format!("call {} {method} {path}", self.service),
                &method,
                &url,
            );
            let result = request.send().await;
            end_request_span(span, result.as_ref().map(|r| r.status().as_u16()));
            match result {
                Ok(r) if r.status().as_u16() == 404 => {
                    self.record(i, true);
                    return Ok(None);
                }
                Ok(r) if r.status().is_success() => {
                    self.record(i, true);
                    return r
                        .json::<T>()
                        .await
                        .map(Some)
                        .map_err(|e| ClientError::Failed {
                            service: self.service.clone(),
                            message: format!("unreadable answer: {e}"),
                        });
                }
                Ok(r) if r.status().is_server_error() => {
                    self.record(i, false);
                    last = Some(ClientError::Status {
                        service: self.service.clone(),
                        status: r.status().as_u16(),
                        body: r
                            .text()
                            .await
                            .unwrap_or_default()
                            .chars()
                            .take(300)
                            .collect(),
                    });
                }
                Ok(r) => {
                    // 4xx: our request is wrong; another instance will
                    // agree. Its problem details are the caller's to read
                    // (bounded: one per line of up to 100 lines).
                    self.record(i, true);
                    return Err(ClientError::Status {
                        service: self.service.clone(),
                        status: r.status().as_u16(),
                        body: r
                            .text()
                            .await
                            .unwrap_or_default()
                            .chars()
                            .take(16 * 1024)
                            .collect(),
                    });
                }
                Err(e) => {
                    self.record(i, false);
                    last = Some(if e.is_timeout() {
                        ClientError::Deadline {
                            service: self.service.clone(),
                            ms: self.options.timeout.as_millis() as u64,
                        }
                    } else {
                        ClientError::Failed {
                            service: self.service.clone(),
                            message: e.to_string(),
                        }
                    });
                }
            }
            metrics::counter!("shoal_client_retries_total", "service" => self.service.clone())
                .increment(1);
        }
        Err(last.unwrap_or(ClientError::Deadline {
            service: self.service.clone(),
            ms: self.options.timeout.as_millis() as u64,
        }))
    }
}

/// While traces are on: a client span for an outgoing request (a child
/// of the current span), and the request carrying it as `traceparent`.
pub fn trace_request(
    request: reqwest::RequestBuilder,
    name: impl Into<String>,
    method: &reqwest::Method,
    url: &str,
) -> (reqwest::RequestBuilder, Option<shoal_core::spans::Span>) {
    use shoal_core::spans::{start, Kind};
    let Some(mut span) = start(name, Kind::Client, None) else {
        return (request, None);
    };
    span.attr("http.request.method", method.as_str());
    span.attr("url.full", url);
    let request = request.header("traceparent", span.ctx.traceparent());
    (request, Some(span))
}

/// Ends a span of [`trace_request`] with the answer's status, or the error.
pub fn end_request_span<E: std::fmt::Display>(
    span: Option<shoal_core::spans::Span>,
    result: Result<u16, E>,
) {
    let Some(mut span) = span else {
        return;
    };
    match result {
        Ok(status) => {
            span.attr("http.response.status_code", status);
            if status >= 500 {
                span.fail(format!("status {status}"));
            }
        }
        Err(e) => span.fail(e.to_string()),
    }
    span.end();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(bases: &[&str]) -> ServiceClient {
        ServiceClient::new(
            "t",
            &bases.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            ClientOptions {
                timeout: Duration::from_millis(300),
                retries: 2,
                breaker_failures: 2,
                breaker_open: Duration::from_secs(60),
                token: None,
            },
        )
    }

    #[tokio::test]
    async fn breaker_opens_after_failures_and_calls_fail_fast() {
        // Nothing listens on port 1: connect refused.
        let c = client(&["http://127.0.0.1:1"]);
        // Two refused attempts open the breaker; the third is not made.
        assert!(matches!(
            c.get_json::<serde_json::Value>("/x").await,
            Err(ClientError::AllOpen { .. })
        ));
        let started = Instant::now();
        assert!(matches!(
            c.get_json::<serde_json::Value>("/x").await,
            Err(ClientError::AllOpen { .. })
        ));
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "fails fast when open"
        );
    }

    #[tokio::test]
    async fn a_dead_instance_is_skipped_for_a_live_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/x",
            axum::routing::get(|| async { axum::Json(serde_json::json!({"ok": true})) }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let c = client(&["http://127.0.0.1:1", &format!("http://{addr}")]);
        for _ in 0..10 {
            let v: serde_json::Value = c.get_json("/x").await.unwrap().unwrap();
            assert_eq!(v["ok"], true);
        }
        assert_eq!(
            c.get_json::<serde_json::Value>("/missing").await.unwrap(),
            None
        );
    }
}
