//! Body types of the gateway: one boxed body for both directions, helpers
//! for JSON and problem+json responses, and a body wrapper that ends an
//! instance's in-flight count when the response body finishes.

use crate::pool::InFlightGuard;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use shoal_core::problem::PROBLEM_JSON;
use shoal_core::Problem;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Errors carried by bodies: boxed so any source fits.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request and response the gateway builds.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// The request-id header, set on every upstream request and response.
/// (Header names are constants, so no request parses them.)
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Milliseconds left of the request's deadline, sent upstream (and read
/// from callers); Shoal's runtime honours it (`shoal_runtime::middleware`).
pub const X_SHOAL_DEADLINE_MS: HeaderName = HeaderName::from_static("x-shoal-deadline-ms");
/// On a Shoal instance's 503: `exceeded`, the deadline it was given
/// (`x-shoal-deadline-ms`) passed before it could answer.
pub const X_SHOAL_DEADLINE: HeaderName = HeaderName::from_static("x-shoal-deadline");
/// On a Shoal instance's 503: it was overloaded, and how far it got
/// (`shoal_core::problem::OVERLOAD_HEADER`).
pub const X_SHOAL_OVERLOAD: HeaderName =
    HeaderName::from_static(shoal_core::problem::OVERLOAD_HEADER);
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A problem+json response, with Retry-After when the problem has one and
/// the request id so the client can quote it.
pub fn problem_response(problem: &Problem, request_id: &str) -> Response<Body> {
    Response::from_parts(problem_head(problem, request_id), full(problem.to_json()))
}

/// The head of [`problem_response`]: its status and fields, for a writer
/// that puts the body (`problem.to_json()`) out itself.
pub(crate) fn problem_head(problem: &Problem, request_id: &str) -> http::response::Parts {
    let (mut parts, ()) = Response::new(()).into_parts();
    parts.status =
        StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    parts
        .headers
        .insert(CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    if let Some(seconds) = problem.retry_after {
        parts
            .headers
            .insert(RETRY_AFTER, HeaderValue::from(seconds));
    }
    if let Ok(v) = HeaderValue::from_str(request_id) {
        parts.headers.insert(X_REQUEST_ID, v);
    }
    parts
}

/// A JSON response with the given status.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(full(serde_json::to_vec(value).unwrap_or_default()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A response body whose instance counts it as outstanding until it ends,
/// fails or is dropped (so "outstanding requests" counts streaming
/// responses too).
pub type GuardedBody<B> = Holding<B, InFlightGuard>;

pin_project_lite::pin_project! {
    /// A body that holds a value (permits, guards) until it ends, fails or
    /// is dropped.
    pub struct Holding<B, G> {
        #[pin]
        inner: B,
        held: Option<G>,
    }
}

impl<B, G> Holding<B, G> {
    pub fn new(inner: B, held: G) -> Self {
        Holding {
            inner,
            held: Some(held),
        }
    }
}

impl<B: HttpBody, G> HttpBody for Holding<B, G> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.held.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why [`read_to_limit`] gave up.
#[derive(Debug)]
pub enum ReadError {
    /// Longer than the limit.
    TooLarge,
    /// The body broke.
    Failed(BoxError),
}

/// Reads a whole body of at most `limit` bytes. (Written out rather than
/// `Limited::collect`, whose error conversion rustc cannot prove `Send`
/// inside the boxed futures of `stack.rs`.)
pub async fn read_to_limit(mut body: Body, limit: usize) -> Result<Bytes, ReadError> {
    use http_body_util::BodyExt;
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(ReadError::Failed)?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(ReadError::TooLarge);
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// A request body of the gateway's own endpoints (admin, purge, console):
/// at most `limit` bytes within 10 s, or the problem to answer (`what`
/// names the endpoint in it).
pub async fn read_request_body(body: Body, limit: usize, what: &str) -> Result<Bytes, Problem> {
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        read_to_limit(body, limit),
    )
    .await
    .map_err(|_| Problem::bad_request("the request body did not arrive in time"))?
    .map_err(|e| match e {
        ReadError::TooLarge => {
            Problem::payload_too_large(format!("{what} bodies are at most {limit} bytes"))
        }
        ReadError::Failed(e) => {
            Problem::bad_request(format!("the request body could not be read: {e}"))
        }
    })
}

/// The deadline of a stream that must keep moving (a response body being
/// read, a client being written to): made the first time the stream
/// waits, and pushed back only when it waits again after progress, so a
/// stream that never waits never reads the clock for it.
#[derive(Default)]
pub struct Stall {
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    progressed: bool,
}

impl Stall {
    /// The stream moved.
    pub fn progress(&mut self) {
        self.progressed = true;
    }

    /// The stream waits: whether it has now waited `limit` since it last
    /// moved (else the timer wakes `cx` when it has).
    pub fn expired(&mut self, limit: std::time::Duration, cx: &mut Context<'_>) -> bool {
        let deadline = move || tokio::time::Instant::now() + limit;
        match self.timer.as_mut() {
            Some(timer) if std::mem::take(&mut self.progressed) => timer.as_mut().reset(deadline()),
            Some(_) => {}
            None => self.progressed = false,
        }
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline())));
        std::future::Future::poll(timer.as_mut(), cx).is_ready()
    }
}

pin_project_lite::pin_project! {
    /// A response body from an instance, which fails when the instance
    /// sends nothing for `limit` while the body has more to come (nginx's
    /// `proxy_read_timeout`), so a stalled instance cannot hold a client
    /// connection forever, and when an operator ejects the instance (its
    /// long-lived answers are cut so their clients reconnect elsewhere).
    pub struct FromUpstream<B> {
        #[pin]
        inner: GuardedBody<B>,
        limit: Option<std::time::Duration>,
        stall: Stall,
        // Made the first time the body waits: resolves when the instance
        // is ejected by an operator.
        cut: Option<Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
    }
}

impl<B> FromUpstream<B> {
    pub fn new(inner: GuardedBody<B>, limit: Option<std::time::Duration>) -> Self {
        FromUpstream {
            inner,
            limit,
            stall: Stall::default(),
            cut: None,
        }
    }
}

/// The error of a [`FromUpstream`] body that sent nothing for too long.
#[derive(Debug, thiserror::Error)]
#[error("the instance sent nothing for {0} ms in the middle of the response body")]
pub struct ReadTimedOut(pub u128);

/// The error of a [`FromUpstream`] body cut by an operator's eject.
#[derive(Debug, thiserror::Error)]
#[error("the instance was ejected by an operator in the middle of the response body")]
pub struct CutByOperator;

impl<B> HttpBody for FromUpstream<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if let Poll::Ready(frame) = this.inner.as_mut().poll_frame(cx) {
            this.stall.progress();
            // A stream that always has a frame ready is cut here.
            let cut = matches!(frame, Some(Ok(_)))
                && this
                    .inner
                    .as_ref()
                    .get_ref()
                    .held
                    .as_ref()
                    .is_some_and(InFlightGuard::is_cut);
            if !cut {
                return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
            }
        }
        let Some(guard) = this.inner.as_ref().get_ref().held.as_ref() else {
            return Poll::Pending;
        };
        let cut = this.cut.get_or_insert_with(|| Box::pin(guard.cut()));
        if guard.is_cut() || cut.as_mut().poll(cx).is_ready() {
            tracing::info!(
                instance = guard.instance().url.as_str(),
                "response cut off: an operator ejected its instance"
            );
            // Ends the instance's in-flight count with the body.
            this.inner.project().held.take();
            return Poll::Ready(Some(Err(CutByOperator.into())));
        }
        let Some(limit) = *this.limit else {
            return Poll::Pending;
        };
        if !this.stall.expired(limit, cx) {
            return Poll::Pending;
        }
        tracing::warn!(
            instance = guard.instance().url.as_str(),
            timeout_ms = limit.as_millis() as u64,
            "response cut off: the instance sent nothing in the middle of its body for upstream_read_timeout_ms"
        );
        metrics::counter!("shoal_gateway_upstream_read_timeouts_total").increment(1);
        // Ends the instance's in-flight count with the body.
        this.inner.project().held.take();
        Poll::Ready(Some(Err(ReadTimedOut(limit.as_millis()).into())))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body from an instance, counted as outstanding on it until
/// it ends, cut off when the instance sends nothing for `read_timeout_ms`
/// (`gateway.upstream_read_timeout_ms`; 0 = never) and when an operator
/// ejects the instance.
pub fn from_upstream<B>(body: B, guard: InFlightGuard, read_timeout_ms: u64) -> Body
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let limit = (read_timeout_ms > 0).then(|| std::time::Duration::from_millis(read_timeout_ms));
    FromUpstream::new(GuardedBody::new(body, guard), limit).boxed_unsync()
}
