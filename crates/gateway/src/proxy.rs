//! The proxy path of one request: route, limits, forwarding headers, body
//! buffering for replay, instance choice, retries on another instance when
//! that is safe, timeouts, and the access log and metrics.

use crate::balance::PickContext;
use crate::body::{
    from_upstream, problem_response, Body, BoxError, IDEMPOTENCY_KEY, X_FORWARDED_FOR,
    X_FORWARDED_HOST, X_FORWARDED_PROTO, X_REQUEST_ID, X_SHOAL_DEADLINE_MS,
};
use crate::h1::{H1Error, ReqBody, ReqHead};
use crate::pool::{Instance, Pool};
use crate::routes::{Route, Router};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use http_body::Frame;
use http_body_util::{BodyExt, BodyStream, Limited, StreamBody};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use shoal_core::settings::GatewaySettings;
use shoal_core::Problem;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An upstream HTTP client: a keep-alive pool shared by every pool.
pub type UpstreamClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>;

/// The upstream clients of one thread (`workers.rs`) or of the state.
#[derive(Clone)]
pub struct UpstreamClients {
    /// What they were built from.
    pub(crate) settings: crate::ClientSettings,
    pub(crate) tls: crate::UpstreamTls,
    pub http1: UpstreamClient,
    /// HTTP/2 with prior knowledge, for `protocol = "h2c"` pools.
    pub h2c: UpstreamClient,
}

impl UpstreamClients {
    /// Built from the same settings and trusted certificates: a reload
    /// keeps these (and their pooled connections).
    pub(crate) fn same_as(&self, other: &UpstreamClients) -> bool {
        self.settings == other.settings && self.tls.id == other.tls.id
    }

    pub fn for_pool(&self, pool: &Pool) -> &UpstreamClient {
        if pool.h2c {
            &self.h2c
        } else {
            &self.http1
        }
    }
}

/// Everything a request needs, shared by every connection.
pub struct GatewayState {
    pub settings: GatewaySettings,
    pub client: UpstreamClients,
    pub router: Router,
    /// Sessions checked at the edge (`identity.rs`).
    pub(crate) identity: crate::identity::Identity,
    pub pools: Vec<Arc<Pool>>,
    /// Set when shutdown began: `/_gateway/readyz` answers 503. Shared by
    /// every generation of the settings (`reload.rs`).
    pub draining: Arc<AtomicBool>,
    /// Rate limits and concurrency caps (`limits.rs`).
    pub limits: crate::limits::Limits,
    /// The HTTP cache (`cache/`); `None` when caching is off everywhere.
    pub cache: Option<crate::cache::HttpCache>,
    /// The listener's TLS, when `tls_cert_file` is set (`listener.rs`).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// `Strict-Transport-Security` for proxied responses, when the listener
    /// serves TLS and `hsts_max_age_secs` is above 0.
    pub hsts: Option<http::HeaderValue>,
    /// What the gateways share through Redis (`coord.rs`), when
    /// `redis_url` is set. Shared by every generation of the settings.
    pub coord: Option<Arc<crate::coord::Coord>>,
}

impl std::fmt::Debug for GatewayState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayState")
            .field("pools", &self.pools)
            .finish_non_exhaustive()
    }
}

impl GatewayState {
    pub fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.iter().find(|p| p.name == name)
    }
}

/// The hop-by-hop names, written once: [`HOP_BY_HOP`] to remove them
/// from a map, and [`is_hop_by_hop`] to test a name with one match (by
/// length, then bytes) instead of nine comparisons.
macro_rules! hop_by_hop {
    ($($name:literal),+ $(,)?) => {
        /// Headers that describe one connection, never forwarded (RFC 9110
        /// 7.6.1).
        const HOP_BY_HOP: &[&str] = &[$($name),+];

        /// Whether `name` is one of [`HOP_BY_HOP`].
        fn is_hop_by_hop(name: &str) -> bool {
            matches!(name, $($name)|+)
        }
    };
}

hop_by_hop![
    "connection",
    "proxy-connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
];

/// The headers a message's `Connection` header names (hop-by-hop too).
fn named_in_connection(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect()
}

/// Removes hop-by-hop headers, including those named in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names instead of a
    // hashed removal of each of the nine.
    let any = headers.keys().any(|k| is_hop_by_hop(k.as_str()));
    if !any {
        return;
    }
    for name in named_in_connection(headers) {
        headers.remove(name);
    }
    for &name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Methods whose repetition has the effect of one request (RFC 9110 9.2.2).
fn is_idempotent(method: &Method, headers: &HeaderMap) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    ) || headers.contains_key(IDEMPOTENCY_KEY)
}

/// A request body ready to send, once or several times.
enum OutgoingBody {
    /// Fully read: can be replayed on another instance.
    Buffered(Bytes),
    /// Too large to keep: streams through once, never retried.
    Streaming(Option<Body>),
}

/// Why the body could not be prepared.
enum BodyError {
    TooLarge,
    Read(BoxError),
    Timeout,
}

/// Reads up to `buffer_limit` bytes; a body that ends within it is kept
/// whole, a longer one streams on (what was read goes first).
async fn prepare_body(
    body: Body,
    content_length: Option<u64>,
    buffer_limit: usize,
    max_body: u64,
    deadline: Duration,
) -> Result<OutgoingBody, BodyError> {
    let limited: Body =
        Limited::new(body, usize::try_from(max_body).unwrap_or(usize::MAX)).boxed_unsync();
    if content_length == Some(0) {
        return Ok(OutgoingBody::Buffered(Bytes::new()));
    }
    if content_length.is_some_and(|n| n > buffer_limit as u64) {
        return Ok(OutgoingBody::Streaming(Some(limited)));
    }
    let mut limited = limited;
    let mut buf = BytesMut::new();
    let read = async {
        loop {
            match limited.frame().await {
                None => return Ok(true),
                Some(Err(e)) => return Err(e),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        buf.extend_from_slice(&data);
                    }
                    if buf.len() > buffer_limit {
                        return Ok(false);
                    }
                }
            }
        }
    };
    match tokio::time::timeout(deadline, read).await {
        Err(_) => Err(BodyError::Timeout),
        Ok(Err(e)) if is_length_limit(&*e) => Err(BodyError::TooLarge),
        Ok(Err(e)) => Err(BodyError::Read(e)),
        Ok(Ok(true)) => Ok(OutgoingBody::Buffered(buf.freeze())),
        Ok(Ok(false)) => {
            let head = futures_util::stream::iter([Ok::<_, BoxError>(Frame::data(buf.freeze()))]);
            let rest = BodyStream::new(limited);
            Ok(OutgoingBody::Streaming(Some(
                StreamBody::new(head.chain(rest)).boxed_unsync(),
            )))
        }
    }
}

fn is_length_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// How an upstream attempt failed, and what that allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// The request never left: connect refused or timed out, a pooled
    /// connection closed before the request was written, or an HTTP/2
    /// instance refused the stream. Safe to retry.
    NotSent,
    /// The connection broke after the request may have reached the
    /// instance, before any response. Retry only idempotent requests.
    ConnectionLost,
    /// The client's body broke or exceeded the limit.
    ClientBody,
    /// Anything else (a malformed response, ...): not retried.
    Other,
}

fn classify(e: &crate::upstream::UpstreamError) -> Failure {
    use crate::upstream::UpstreamError;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = match e {
        UpstreamError::Connect { .. } => return Failure::NotSent,
        UpstreamError::Pooled(e) if e.is_connect() => return Failure::NotSent,
        UpstreamError::Pooled(e) => std::error::Error::source(e),
        UpstreamError::H1(e) => {
            return match e {
                H1Error::NotWritten(_) => Failure::NotSent,
                H1Error::Closed | H1Error::Io(_) => Failure::ConnectionLost,
                H1Error::Body(_) => Failure::ClientBody,
                H1Error::Invalid(_) => Failure::Other,
            }
        }
    };
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return Failure::ClientBody;
        }
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            // HTTP/2 (h2c pools). REFUSED_STREAM promises that the
            // instance did not process the stream (RFC 9113 8.7); any
            // other reset, a GOAWAY or a broken connection before the
            // response is a reset like HTTP/1.1's.
            if h2.is_reset() && h2.is_remote() && h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return Failure::NotSent;
            }
            if h2.is_reset() || h2.is_go_away() || h2.is_io() {
                return Failure::ConnectionLost;
            }
        }
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_canceled() {
                return Failure::NotSent;
            }
            if h.is_user() {
                return Failure::ClientBody;
            }
            if h.is_incomplete_message() || h.is_closed() {
                return Failure::ConnectionLost;
            }
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | NotConnected
            ) {
                return Failure::ConnectionLost;
            }
        }
        cur = err.source();
    }
    Failure::Other
}

/// The cause chain of an error on one line, for logs and problem details.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        out.push_str(": ");
        out.push_str(&err.to_string());
        cur = err.source();
    }
    out
}

/// What the proxy learned about one request, handed back in the
/// response's extensions for the access log and the metrics
/// (`stack::AccessLog`).
#[derive(Debug, Clone, Default)]
pub(crate) struct Outcome {
    /// The routed pool; `None` before routing or when no route matched.
    pub(crate) pool: Option<Arc<Pool>>,
    /// The instance of the last attempt.
    pub(crate) upstream: Option<Arc<Instance>>,
    pub(crate) attempts: u32,
    /// Switched protocols (a WebSocket tunnel).
    pub(crate) upgrade: bool,
    pub(crate) cause: Option<String>,
}

/// The request's host: its `Host` header, else the authority of its target
/// (HTTP/2's `:authority`).
pub(crate) fn request_host(parts: &http::request::Parts) -> Option<&str> {
    parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| parts.uri.authority().map(|a| a.as_str()))
}

/// Forwards one request to an instance of the pool its route names:
/// body buffering for replay, instance choice, retries on another instance
/// when that is safe, the deadline. Records what happened in `outcome`.
pub(crate) async fn forward(
    state: &GatewayState,
    client_addr: SocketAddr,
    req: Request<Body>,
    request_id: &str,
    started: Instant,
    outcome: &mut Outcome,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let host = request_host(&parts);
    let Some(route) = state.router.find(host, parts.uri.path()) else {
        return problem_response(
            &Problem::not_found(format!(
                "no route matches host `{}` and path `{}`",
                host.unwrap_or(""),
                parts.uri.path()
            )),
            request_id,
        );
    };
    let pool = &route.pool;
    outcome.pool = Some(Arc::clone(pool));

    let facts = field_facts(&parts.headers);
    let content_length = facts.content_length;
    if content_length.is_some_and(|n| n > route.max_body_bytes) {
        return too_large(route, request_id);
    }

    let idempotent = is_idempotent(&parts.method, &parts.headers);
    // The whole request's time: the route's timeout, or less when the
    // caller sent a shorter deadline of its own. What is left of it goes
    // upstream with every attempt (`x-shoal-deadline-ms`, which Shoal's
    // runtime honours).
    let budget = facts
        .deadline
        .map_or(route.request_timeout, |d| d.min(route.request_timeout));
    let deadline = started + budget;
    let https = state.settings.tls();
    let headers_for_upstream = || {
        let mut h = upstream_headers(&parts.headers, host, client_addr, https, request_id);
        route.request_headers.apply(&mut h);
        h
    };
    // HTTP/1.1 instances get the header lines written once, straight from
    // the client's headers; h2c ones a header map per attempt.
    let fields = (!pool.h2c).then(|| {
        upstream_fields(
            &parts.headers,
            facts.forwarded_for,
            host,
            client_addr,
            https,
            request_id,
            &route.request_headers,
        )
    });
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));

    let no_body = content_length == Some(0) || http_body::Body::is_end_stream(&body);
    let mut outgoing = if no_body {
        drop(body);
        OutgoingBody::Buffered(Bytes::new())
    } else {
        // Boxed: most requests have no body, and this future would size
        // every request's.
        match Box::pin(prepare_body(
            body,
            content_length,
            state.settings.retry_buffer_bytes,
            route.max_body_bytes,
            budget,
        ))
        .await
        {
            Ok(b) => b,
            Err(BodyError::TooLarge) => return too_large(route, request_id),
            Err(BodyError::Timeout) => {
                return problem_response(
                    &Problem::new(
                        408,
                        "request-timeout",
                        "Request timeout",
                        "the request body did not arrive in time",
                    ),
                    request_id,
                )
            }
            Err(BodyError::Read(e)) => {
                outcome.cause = Some(chain(&*e));
                return problem_response(
                    &Problem::bad_request("the request body could not be read"),
                    request_id,
                );
            }
        }
    };

    pool.deposit(started);
    let ctx = PickContext {
        headers: &parts.headers,
        client_ip: client_addr.ip(),
    };
    let mut tried: smallvec::SmallVec<[usize; 4]> = smallvec::SmallVec::new();
    let max_attempts = state.settings.retries.saturating_add(1);
    let mut last_error: Option<String> = None;
    loop {
        // One clock reading for the attempt: the choice, the time left,
        // the latency's start and the idle connection's age.
        let now = Instant::now();
        let Some(instance) = pool.pick_at(&ctx, &tried, now) else {
            return match last_error {
                None => problem_response(
                    &Problem::unavailable(
                        format!("no healthy instance in pool `{}`", pool.name),
                        1,
                    ),
                    request_id,
                ),
                Some(cause) => bad_gateway(pool, cause, outcome, request_id),
            };
        };
        outcome.attempts += 1;
        if crate::stack::access_log_on() {
            // For the log line only: each clone bumps a count that every
            // thread shares.
            outcome.upstream = Some(Arc::clone(&instance));
        }
        tried.push(instance.id());

        let body = match &mut outgoing {
            OutgoingBody::Buffered(bytes) => ReqBody::Bytes(bytes.clone()),
            OutgoingBody::Streaming(body) => match body.take() {
                Some(body) => ReqBody::Stream(body),
                None => ReqBody::Bytes(Bytes::new()),
            },
        };
        let left = deadline.saturating_duration_since(now);
        if left.is_zero() {
            return deadline_passed(instance.url.as_str(), budget, outcome, request_id);
        }
        // A retryable attempt may be cut short to try another instance.
        let replayable = matches!(outgoing, OutgoingBody::Buffered(_));
        let try_timeout = state.settings.try_timeout_ms;
        let this_try = if idempotent && replayable && try_timeout > 0 {
            left.min(Duration::from_millis(try_timeout))
        } else {
            left
        };
        // The instance is told this attempt's time, not the request's: an
        // attempt cut short by try_timeout_ms is not worked on after it.
        let deadline_ms = this_try.as_millis().max(1) as u64;

        // The guard keeps the instance (and its in-flight count) until the
        // response body ends, or this attempt ends.
        let guard = instance.start();
        let instance = guard.instance();
        let sent = now;
        let attempt = match &fields {
            Some(fields) => Attempt::H1(fields, body),
            None => match h2c_request(
                &parts.method,
                instance,
                &path_and_query,
                headers_for_upstream(),
                deadline_ms,
                body,
            ) {
                Ok(req) => Attempt::H2c(req),
                Err(e) => {
                    return problem_response(
                        &Problem::bad_request(format!("bad request target: {e}")),
                        request_id,
                    )
                }
            },
        };
        // The exchange is built inside the call, not bound to a name first:
        // a named future moved into `timeout` keeps its own slot in this
        // future's state beside the copy inside the `Timeout` (rustc keeps
        // both), which doubled the size of every request's future.
        let result = tokio::time::timeout(this_try, async {
            match attempt {
                Attempt::H1(fields, body) => {
                    let head = ReqHead {
                        method: &parts.method,
                        target: path_and_query.as_str(),
                        fields,
                        deadline_ms,
                        declared_length: content_length,
                    };
                    crate::upstream::send(&state.client, pool, instance, &head, body, now).await
                }
                Attempt::H2c(req) => Box::pin(crate::upstream::h2c(&state.client, pool, req)).await,
            }
        })
        .await;
        match result {
            Ok(Ok(response)) => {
                let done = Instant::now();
                let latency = done.saturating_duration_since(sent);
                instance.observe_latency_at(latency, done);
                instance.record_success(done);
                // Per attempt: an instance's errors include the attempts
                // retried elsewhere.
                instance.live.record(response.status().as_u16(), latency);
                // The instance ran out of this attempt's time and said so
                // (a Shoal instance's 503 `x-shoal-deadline: exceeded`),
                // racing this attempt's own timer: the same as no answer
                // within try_timeout_ms, so a request that would then be
                // tried elsewhere is.
                if this_try < left
                    && response.status() == http::StatusCode::SERVICE_UNAVAILABLE
                    && response
                        .headers()
                        .get(crate::body::X_SHOAL_DEADLINE)
                        .is_some_and(|v| v == "exceeded")
                    && outcome.attempts < max_attempts
                {
                    if pool.withdraw_retry() {
                        metrics::counter!("shoal_gateway_retries_total", "pool" => pool.name.clone())
                            .increment(1);
                        last_error = Some(format!(
                            "{}: its deadline ({try_timeout} ms) passed",
                            instance.url
                        ));
                        continue;
                    }
                    tracing::warn!(pool = %pool.name, "retry budget spent; not retrying");
                }
                // The instance was overloaded and said how far it got (a
                // Shoal instance's 503 `x-shoal-overload`): a request
                // that may be sent again goes to an instance not tried
                // yet, if there is one. (Not the same one again: it is
                // busy.)
                let overload = (response.status() == http::StatusCode::SERVICE_UNAVAILABLE)
                    .then(|| response.headers().get(crate::body::X_SHOAL_OVERLOAD))
                    .flatten()
                    .and_then(|v| shoal_core::problem::Overload::parse(v.as_bytes()));
                let may_resend = match overload {
                    Some(shoal_core::problem::Overload::Unprocessed) => replayable,
                    Some(shoal_core::problem::Overload::Busy) => replayable && idempotent,
                    None => false,
                };
                if may_resend
                    && outcome.attempts < max_attempts
                    && pool.has_untried(&tried, Instant::now())
                {
                    if pool.withdraw_retry() {
                        metrics::counter!("shoal_gateway_retries_total", "pool" => pool.name.clone())
                            .increment(1);
                        last_error = Some(format!("{}: overloaded (503)", instance.url));
                        continue;
                    }
                    tracing::warn!(pool = %pool.name, "retry budget spent; not retrying");
                }
                let (mut rparts, rbody) = response.into_parts();
                strip_hop_by_hop(&mut rparts.headers);
                route.response_headers.apply(&mut rparts.headers);
                if let Ok(v) = HeaderValue::from_str(request_id) {
                    rparts.headers.insert(X_REQUEST_ID, v);
                }
                let body = from_upstream(rbody, guard, state.settings.upstream_read_timeout_ms);
                return Response::from_parts(rparts, body);
            }
            Err(_elapsed) => {
                let done = Instant::now();
                let latency = done.saturating_duration_since(sent);
                instance.observe_latency_at(latency, done);
                instance.live.record(504, latency);
                if this_try == left {
                    return deadline_passed(instance.url.as_str(), budget, outcome, request_id);
                }
                // No response head within try_timeout_ms: the instance may
                // be gone without a word (a cut link). The attempt is
                // dropped, its connection with it.
                pool.on_connection_error(instance);
                let cause = format!(
                    "{}: no response head within try_timeout_ms ({try_timeout} ms)",
                    instance.url
                );
                if outcome.attempts < max_attempts {
                    if pool.withdraw_retry() {
                        metrics::counter!("shoal_gateway_retries_total", "pool" => pool.name.clone())
                            .increment(1);
                        last_error = Some(cause);
                        continue;
                    }
                    tracing::warn!(pool = %pool.name, "retry budget spent; not retrying");
                }
                outcome.cause = Some(cause);
                return problem_response(
                    &Problem::gateway_timeout(format!(
                        "no response within try_timeout_ms ({try_timeout} ms) after {} attempts",
                        outcome.attempts
                    )),
                    request_id,
                );
            }
            Ok(Err(e)) => {
                instance.live.record(502, sent.elapsed());
                let failure = classify(&e);
                let cause = format!("{}: {}", instance.url, chain(&e));
                tracing::debug!(pool = %pool.name, instance = %instance.url, ?failure, cause = %cause, "upstream attempt failed");
                if failure == Failure::ClientBody {
                    if is_length_limit(&e) {
                        return too_large(route, request_id);
                    }
                    outcome.cause = Some(cause);
                    return problem_response(
                        &Problem::bad_request("the request body could not be read"),
                        request_id,
                    );
                }
                if matches!(failure, Failure::NotSent | Failure::ConnectionLost) {
                    pool.on_connection_error(instance);
                }
                let safe = match failure {
                    Failure::NotSent => true,
                    Failure::ConnectionLost => idempotent,
                    _ => false,
                };
                if replayable && safe && outcome.attempts < max_attempts {
                    if pool.withdraw_retry() {
                        metrics::counter!("shoal_gateway_retries_total", "pool" => pool.name.clone())
                            .increment(1);
                        last_error = Some(cause);
                        continue;
                    }
                    tracing::warn!(pool = %pool.name, "retry budget spent; not retrying");
                }
                return bad_gateway(pool, cause, outcome, request_id);
            }
        }
    }
}

/// One attempt's request: for an HTTP/1.1 pool the header lines written
/// once and the body; for an h2c pool a whole request.
enum Attempt<'a> {
    H1(&'a crate::h1::Fields, ReqBody),
    H2c(Request<Body>),
}

/// A request to an h2c instance: the absolute form of the target, as
/// hyper-util's client wants it.
fn h2c_request(
    method: &Method,
    instance: &Instance,
    path_and_query: &http::uri::PathAndQuery,
    mut headers: HeaderMap,
    deadline_ms: u64,
    body: ReqBody,
) -> Result<Request<Body>, http::uri::InvalidUriParts> {
    let mut target = http::uri::Parts::default();
    target.scheme = Some(instance.scheme.clone());
    target.authority = Some(instance.authority.clone());
    target.path_and_query = Some(path_and_query.clone());
    let uri = Uri::from_parts(target)?;
    headers.insert(X_SHOAL_DEADLINE_MS, HeaderValue::from(deadline_ms));
    let body = match body {
        ReqBody::Bytes(b) if b.is_empty() => crate::body::empty(),
        ReqBody::Bytes(b) => crate::body::full(b),
        ReqBody::Stream(s) => s,
    };
    let mut req = Request::new(body);
    *req.method_mut() = method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Ok(req)
}

/// What [`forward`] needs of the request's header fields, found in one
/// pass over them: a lookup by name (which hashes the name) costs about
/// as much as the whole pass, and this would take three.
#[derive(Debug, Default, PartialEq)]
struct FieldFacts {
    /// The first `Content-Length`, when it is a number.
    content_length: Option<u64>,
    /// The caller's own deadline: the first `x-shoal-deadline-ms`, when it
    /// is a number of milliseconds.
    deadline: Option<Duration>,
    /// Whether the client sent `X-Forwarded-For` (to be extended).
    forwarded_for: bool,
}

fn field_facts(headers: &HeaderMap) -> FieldFacts {
    let mut facts = FieldFacts::default();
    let (mut length_seen, mut deadline_seen) = (false, false);
    for (name, value) in headers {
        if *name == header::CONTENT_LENGTH {
            if !std::mem::replace(&mut length_seen, true) {
                facts.content_length = value.to_str().ok().and_then(|v| v.parse().ok());
            }
        } else if *name == X_SHOAL_DEADLINE_MS {
            if !std::mem::replace(&mut deadline_seen, true) {
                facts.deadline = value
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_millis);
            }
        } else if *name == X_FORWARDED_FOR {
            facts.forwarded_for = true;
        }
    }
    facts
}

/// 504: no response headers before the request's deadline.
fn deadline_passed(
    upstream: &str,
    budget: Duration,
    outcome: &mut Outcome,
    request_id: &str,
) -> Response<Body> {
    outcome.cause = Some(format!(
        "no response headers from {upstream} within {} ms",
        budget.as_millis()
    ));
    problem_response(
        &Problem::gateway_timeout(format!(
            "the upstream did not answer within {} ms",
            budget.as_millis()
        )),
        request_id,
    )
}

fn too_large(route: &Route, request_id: &str) -> Response<Body> {
    problem_response(
        &Problem::payload_too_large(format!(
            "the request body is larger than {} bytes",
            route.max_body_bytes
        )),
        request_id,
    )
}

fn bad_gateway(
    pool: &Pool,
    cause: String,
    outcome: &mut Outcome,
    request_id: &str,
) -> Response<Body> {
    let detail = format!(
        "pool `{}` failed after {} attempt(s); last error: {cause}",
        pool.name, outcome.attempts
    );
    outcome.cause = Some(cause);
    problem_response(&Problem::bad_gateway(detail), request_id)
}

/// Whether a client's header is left out of the request upstream: the
/// body's framing (the codec writes its own), hop-by-hop headers
/// ([`HOP_BY_HOP`]) and those the gateway writes itself (a client's
/// `x-forwarded-for` is extended instead). One match on the name (by
/// length, then bytes), not fifteen comparisons per header.
fn not_passed_upstream(name: &HeaderName) -> bool {
    let name = name.as_str();
    is_hop_by_hop(name)
        || matches!(
            name,
            "content-length"
                | "x-forwarded-for"
                | "x-forwarded-proto"
                | "x-forwarded-host"
                | "x-request-id"
                | "x-shoal-deadline-ms"
        )
}

/// The header lines of a request to an HTTP/1.1 instance, written once
/// from the client's headers, with the same result as [`upstream_headers`]
/// followed by the route's rules, without building a second header map:
/// hop-by-hop headers (and those `Connection` names), the body's framing
/// (the codec writes its own) and the gateway's own headers are left out,
/// then X-Forwarded-For (extended), -Proto, -Host, X-Request-Id and the
/// route's `set` headers are written. `Host` is kept; an HTTP/2 client's
/// `:authority` stands in for it. (`h1.rs` adds the deadline and, when
/// no line here is `host`, the instance's address.)
pub(crate) fn upstream_fields(
    incoming: &HeaderMap,
    client_forwarded_for: bool,
    host: Option<&str>,
    client_addr: SocketAddr,
    https: bool,
    request_id: &str,
    edits: &crate::routes::HeaderEdits,
) -> crate::h1::Fields {
    let named_in_connection = named_in_connection(incoming);
    let mut fields = crate::h1::Fields::with_capacity(512);
    let mut has_host = false;
    for (name, value) in incoming {
        if not_passed_upstream(name) || named_in_connection.contains(name) || edits.touches(name) {
            continue;
        }
        has_host |= *name == header::HOST;
        fields.push(name, value.as_bytes());
    }
    let forwarded_for = forwarded_for(incoming, client_forwarded_for, client_addr.ip());
    let mut ours = |name: &HeaderName, value: &[u8]| {
        if !edits.touches(name) {
            fields.push(name, value);
        }
    };
    ours(&X_FORWARDED_FOR, forwarded_for.as_bytes());
    ours(&X_FORWARDED_PROTO, if https { b"https" } else { b"http" });
    if let Some(h) = host.filter(|h| HeaderValue::from_str(h).is_ok()) {
        ours(&X_FORWARDED_HOST, h.as_bytes());
        if !has_host {
            ours(&header::HOST, h.as_bytes());
        }
    }
    if HeaderValue::from_str(request_id).is_ok() {
        ours(&X_REQUEST_ID, request_id.as_bytes());
    }
    for (name, value) in edits.sets() {
        fields.push(name, value.as_bytes());
    }
    fields
}

/// X-Forwarded-For for the next hop: the client's values (all of its
/// X-Forwarded-For lines, in order), then the client's address.
fn forwarded_for(incoming: &HeaderMap, any: bool, client_ip: std::net::IpAddr) -> String {
    let mut out = String::with_capacity(48);
    if !any {
        push_ip(&mut out, client_ip);
        return out;
    }
    for prior in incoming
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
    {
        out.push_str(prior);
        out.push_str(", ");
    }
    push_ip(&mut out, client_ip);
    out
}

/// Appends `ip` in its usual text form; IPv4 (by far the most common)
/// without the formatting machinery, which costs more than the rest of
/// the forwarding headers together.
fn push_ip(out: &mut String, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
        }
        std::net::IpAddr::V6(_) => {
            use std::fmt::Write;
            let _ = write!(out, "{ip}");
        }
    }
}

/// The headers sent upstream: the client's minus hop-by-hop ones, plus
/// X-Forwarded-For (appended), -Proto, -Host and X-Request-Id.
pub(crate) fn upstream_headers(
    incoming: &HeaderMap,
    host: Option<&str>,
    client_addr: SocketAddr,
    https: bool,
    request_id: &str,
) -> HeaderMap {
    let mut headers = incoming.clone();
    strip_hop_by_hop(&mut headers);
    // One string, handed to the header without a copy.
    let forwarded_for = forwarded_for(incoming, true, client_addr.ip());
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(forwarded_for)) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    static HTTPS: HeaderValue = HeaderValue::from_static("https");
    static HTTP: HeaderValue = HeaderValue::from_static("http");
    headers.insert(
        X_FORWARDED_PROTO,
        if https { &HTTPS } else { &HTTP }.clone(),
    );
    if let Some(v) = host.and_then(|h| HeaderValue::from_str(h).ok()) {
        headers.insert(X_FORWARDED_HOST, v.clone());
        // HTTP/2 clients send :authority instead of Host.
        headers.entry(header::HOST).or_insert(v);
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(X_REQUEST_ID, v);
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_request_future_boxed_per_request_stays_small() {
        // `stack::Proxy` boxes this future for every request: its whole
        // size is copied and its memory touched each time. A future bound
        // to a name and then moved into another (`timeout`) kept both
        // copies in the state and made it 7,424 bytes; rare paths are
        // boxed so they do not size it either.
        let state = crate::build_state(GatewaySettings::default()).unwrap();
        let mut outcome = Outcome::default();
        let request = Request::new(crate::body::empty());
        let future = forward(
            &state,
            "127.0.0.1:9".parse().unwrap(),
            request,
            "id",
            Instant::now(),
            &mut outcome,
        );
        let size = std::mem::size_of_val(&future);
        assert!(size <= 3072, "{size} bytes");
    }

    #[test]
    fn field_facts_take_the_first_length_and_deadline_and_see_forwarded_for() {
        let mut h = HeaderMap::new();
        assert_eq!(field_facts(&h), FieldFacts::default());
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
        h.append(X_SHOAL_DEADLINE_MS, HeaderValue::from_static(" 250 "));
        h.append(X_SHOAL_DEADLINE_MS, HeaderValue::from_static("5"));
        h.append(X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        h.append(header::ACCEPT, HeaderValue::from_static("*/*"));
        assert_eq!(
            field_facts(&h),
            FieldFacts {
                content_length: Some(12),
                deadline: Some(Duration::from_millis(250)),
                forwarded_for: true,
            }
        );
        let mut bad = HeaderMap::new();
        bad.append(header::CONTENT_LENGTH, HeaderValue::from_static("x"));
        bad.append(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        bad.append(X_SHOAL_DEADLINE_MS, HeaderValue::from_static("soon"));
        let facts = field_facts(&bad);
        assert_eq!(
            (facts.content_length, facts.deadline),
            (None, None),
            "the first decides"
        );
        assert_eq!(
            forwarded_for(&h, true, "192.168.1.2".parse().unwrap()),
            "10.0.0.1, 192.168.1.2"
        );
        assert_eq!(forwarded_for(&bad, false, "::1".parse().unwrap()), "::1");
    }

    #[test]
    fn framing_hop_by_hop_and_the_gateways_own_headers_stay_behind() {
        let gateway_set = [
            X_FORWARDED_FOR,
            X_FORWARDED_PROTO,
            X_FORWARDED_HOST,
            X_REQUEST_ID,
            X_SHOAL_DEADLINE_MS,
        ];
        for &name in HOP_BY_HOP {
            assert!(
                not_passed_upstream(&HeaderName::from_static(name)),
                "{name}"
            );
        }
        for name in gateway_set.iter().chain([&header::CONTENT_LENGTH]) {
            assert!(not_passed_upstream(name), "{name}");
        }
        for name in ["host", "accept", "cookie", "x-forwarded", "x-custom", "tee"] {
            assert!(
                !not_passed_upstream(&HeaderName::from_static(name)),
                "{name}"
            );
        }
    }

    #[test]
    fn hop_by_hop_headers_and_those_named_in_connection_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.30.40",
            "255.255.255.255",
            "192.168.1.100",
            "::1",
            "2001:db8::8a2e:370:7334",
        ] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let mut out = String::new();
            push_ip(&mut out, ip);
            assert_eq!(out, ip.to_string());
        }
    }

    #[test]
    fn idempotency_follows_method_or_key() {
        let none = HeaderMap::new();
        assert!(is_idempotent(&Method::GET, &none));
        assert!(is_idempotent(&Method::PUT, &none));
        assert!(!is_idempotent(&Method::POST, &none));
        let mut keyed = HeaderMap::new();
        keyed.insert("idempotency-key", "k1".parse().unwrap());
        assert!(is_idempotent(&Method::POST, &keyed));
    }
}
