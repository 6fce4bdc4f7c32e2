//! The standard middleware of every service, assembled in one place
//! (`standard_layers`), outermost first:
//! request context (request id, tracing span, access log, metrics,
//! `x-shoal-instance`) → problem+json for bare error responses → panic
//! becomes 500 → cross-origin refusal (CSRF) → load shedding → deadline →
//! compression (`compress.rs`) → body limit.
//! The body limit is axum's `DefaultBodyLimit`: every buffering extractor
//! (JSON, form, bytes) obeys it; a route that streams its body (uploads)
//! sets its own limit and enforces it while streaming.

use crate::context::AppContext;
use crate::error::problem_response;
use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures_util::future::Either;
use futures_util::FutureExt;
use shoal_core::problem::PROBLEM_JSON;
use shoal_core::Problem;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tracing::Instrument;

/// Header the gateway uses to pass the time left for a request, in ms.
pub const DEADLINE_HEADER: &str = "x-shoal-deadline-ms";

/// Wraps `router` in the standard layers: one service doing all of them in
/// the order of the module's doc, axum's body limit innermost. One layer,
/// not one per concern, and a service of its own rather than axum's
/// `from_fn`: that one cloned the route (a boxed service) into every
/// request's future and boxed it again as `Next` (bench/README.md,
/// "Profile of the service path"); and each `Router::layer` boxes every
/// route once more, which a request then clones and calls through.
pub fn standard_layers(router: Router, ctx: &AppContext) -> Router {
    let standard = Arc::new(Standard {
        instance: HeaderValue::from_str(&ctx.instance).ok(),
        limits: Limits {
            permits: Arc::new(Semaphore::new(ctx.settings.serve.max_concurrent_requests)),
            timeout: Duration::from_millis(ctx.settings.serve.request_timeout_ms),
        },
        origins: AllowedOrigins::from_settings(ctx),
        compression: crate::compress::Compression::new(
            ctx.settings.serve.compression_min_bytes,
            ctx.settings.serve.compression_cache_bytes,
        ),
        body_limit: axum::extract::DefaultBodyLimit::max(ctx.settings.serve.body_limit_bytes),
    });
    router.layer(StandardLayer(standard))
}

/// What the standard middleware needs, built once per application.
struct Standard {
    /// `x-shoal-instance`'s value, made once.
    instance: Option<HeaderValue>,
    limits: Limits,
    origins: AllowedOrigins,
    compression: crate::compress::Compression,
    /// `serve.body_limit_bytes`, for the extractors that buffer a body.
    body_limit: axum::extract::DefaultBodyLimit,
}

/// Puts [`WithStandard`] around each route (and the fallback).
#[derive(Clone)]
struct StandardLayer(Arc<Standard>);

impl<S: Clone> tower::Layer<S> for StandardLayer {
    type Service = WithStandard<S>;

    fn layer(&self, inner: S) -> WithStandard<S> {
        WithStandard {
            standard: Arc::clone(&self.0),
            limited: self.0.body_limit.layer(inner.clone()),
            inner,
        }
    }
}

/// A route with the standard middleware around it, and axum's body limit
/// (an extension the buffering extractors read) between the two for a
/// request that has a body. A request without one (most: every GET) skips
/// it: there is nothing to limit, and each extension is an allocation and
/// a map insert.
#[derive(Clone)]
struct WithStandard<S> {
    standard: Arc<Standard>,
    inner: S,
    limited: <axum::extract::DefaultBodyLimit as tower::Layer<S>>::Service,
}

impl<S> tower::Service<Request> for WithStandard<S>
where
    S: tower::Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = futures_util::future::BoxFuture<'static, Result<Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), Infallible>> {
        std::task::ready!(self.inner.poll_ready(cx))?;
        self.limited.poll_ready(cx)
    }

    /// What only reads the request (its id, the cross-origin check, the
    /// concurrency permit, the deadline, the encoding asked for) is done
    /// here, and the route is called here: it only makes its future, which
    /// runs the handler when polled, within the request's context. So the
    /// route is not cloned into the request's future.
    fn call(&mut self, mut req: Request) -> Self::Future {
        let standard = Arc::clone(&self.standard);
        let context = RequestContext::begin(&mut req);
        let step = match admit(&standard, &req) {
            Err(refused) => Step::Answered(refused),
            Ok(admitted) => {
                let route = if without_body(req.body()) {
                    Either::Left(self.inner.call(req))
                } else {
                    Either::Right(self.limited.call(req))
                };
                Step::Handle(admitted, route)
            }
        };
        let handled = handle(Arc::clone(&standard), step);
        Box::pin(context.around(standard, handled).map(Ok))
    }
}

/// Whether a request's body is known to be empty: no `Content-Length` or
/// `Transfer-Encoding` in HTTP/1.1 (`Content-Length: 0` too), or the
/// headers' frame ended the stream in HTTP/2.
fn without_body(body: &Body) -> bool {
    use http_body::Body as _;
    body.is_end_stream() || body.size_hint().exact() == Some(0)
}

/// A request refused before its route, or admitted with its route's
/// future.
enum Step<F> {
    Answered(Response),
    Handle(Admitted, F),
}

/// What an admitted request holds while its handler runs.
struct Admitted {
    /// Its share of `serve.max_concurrent_requests`, given back when the
    /// response is made.
    _permit: tokio::sync::OwnedSemaphorePermit,
    timeout: Duration,
    accepted: crate::compress::Accepted,
    /// Kept only where a compressed form may be stored (formatted only if
    /// one is).
    url: Option<axum::http::Uri>,
}

/// Cross-origin refusal, then load shedding and the deadline; the
/// encoding the response may be compressed with.
fn admit(standard: &Standard, req: &Request) -> Result<Admitted, Response> {
    if let Some(refused) = refuse_cross_origin(&standard.origins, req) {
        return Err(refused);
    }
    let Ok(permit) = Arc::clone(&standard.limits.permits).try_acquire_owned() else {
        metrics::counter!("shoal_http_shed_total").increment(1);
        return Err(problem_response(
            &Problem::unavailable(
                "this instance is at its concurrency limit; retry shortly",
                1,
            )
            .overloaded(shoal_core::problem::Overload::Unprocessed),
        ));
    };
    let mut timeout = standard.limits.timeout;
    if let Some(ms) = req
        .headers()
        .get(DEADLINE_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        timeout = timeout.min(Duration::from_millis(ms));
    }
    let accepted = crate::compress::Accepted::of(req.headers());
    let url =
        (accepted.named() && req.method() == axum::http::Method::GET).then(|| req.uri().clone());
    Ok(Admitted {
        _permit: permit,
        timeout,
        accepted,
        url,
    })
}

/// Inside the request's context: the handler bounded by the deadline
/// (503 past it; its future is dropped) and its response compressed, a
/// panic in either made a 500; then bare error responses given a
/// problem+json body.
async fn handle<F>(standard: Arc<Standard>, step: Step<F>) -> Response
where
    F: std::future::Future<Output = Result<Response, Infallible>>,
{
    let response = match step {
        Step::Answered(response) => response,
        Step::Handle(admitted, route) => std::panic::AssertUnwindSafe(async move {
            let response = match tokio::time::timeout(admitted.timeout, route).await {
                Ok(Ok(response)) => response,
                Ok(Err(never)) => match never {},
                Err(_) => {
                    metrics::counter!("shoal_http_timeouts_total").increment(1);
                    let mut r = problem_response(&Problem::new(
                        503,
                        "timeout",
                        "Request timed out",
                        format!(
                            "the request took longer than {} ms and was cancelled",
                            admitted.timeout.as_millis()
                        ),
                    ));
                    // Tells a gateway this was the deadline, so it may try
                    // the request elsewhere as it would with no answer.
                    r.headers_mut().insert(
                        axum::http::HeaderName::from_static("x-shoal-deadline"),
                        axum::http::HeaderValue::from_static("exceeded"),
                    );
                    return r;
                }
            };
            standard
                .compression
                .apply(response, &admitted.accepted, admitted.url)
                .await
        })
        .catch_unwind()
        .await
        .unwrap_or_else(panic_to_problem),
    };
    bare_errors_to_problems(response).await
}

/// The origins besides a request's own that may send it cookie-carrying
/// unsafe requests and WebSocket upgrades (`serve.allowed_origins`).
struct AllowedOrigins {
    cookie: String,
    origins: Vec<String>,
}

impl AllowedOrigins {
    fn from_settings(ctx: &AppContext) -> AllowedOrigins {
        AllowedOrigins {
            cookie: format!("{}=", ctx.settings.sessions.cookie_name),
            origins: ctx
                .settings
                .serve
                .allowed_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
        }
    }
}

/// CSRF defence in depth beside `SameSite=Lax`: a request that carries the
/// session cookie and changes something (any method but GET, HEAD,
/// OPTIONS), or opens a WebSocket, must come from this site. Browsers say
/// where a request comes from: `Sec-Fetch-Site` (refused unless
/// `same-origin` or `none`, a typed URL), else `Origin` (refused unless its
/// host and port are the request's `Host`, or it is one of
/// `serve.allowed_origins`; `null` is refused). The scheme is not compared:
/// behind a proxy that ends TLS the instance cannot know it, and a page of
/// the same host is not another site. A request with
/// neither comes from no browser (curl, another service) and passes: a
/// forged cross-site request always carries one.
fn refuse_cross_origin(allowed: &AllowedOrigins, req: &Request) -> Option<Response> {
    let headers = req.headers();
    let unsafe_method = !matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    );
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    // Reads and other safe requests (most of them) pass without a look at
    // their cookies.
    if !(unsafe_method || upgrade) {
        return None;
    }
    let with_cookie = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(';')
                .any(|c| c.trim_start().starts_with(&allowed.cookie))
        });
    if !with_cookie {
        return None;
    }
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let verdict = match (text("sec-fetch-site"), text("origin")) {
        (Some("same-origin" | "none"), _) => Ok(()),
        (Some(_), Some(origin))
            if allowed
                .origins
                .contains(&origin.trim_end_matches('/').to_ascii_lowercase()) =>
        {
            Ok(())
        }
        (Some(site), _) => Err(format!("Sec-Fetch-Site: {site}")),
        (None, Some(origin)) => {
            let origin = origin.trim_end_matches('/').to_ascii_lowercase();
            let authority = origin.split_once("://").map(|(_, a)| a);
            let own = text("host").map(str::to_ascii_lowercase);
            if (authority.is_some() && authority == own.as_deref())
                || allowed.origins.contains(&origin)
            {
                Ok(())
            } else {
                Err(format!("Origin: {origin}"))
            }
        }
        (None, None) => Ok(()),
    };
    match verdict {
        Ok(()) => None,
        Err(seen) => {
            metrics::counter!("shoal_http_cross_origin_refused_total").increment(1);
            Some(problem_response(&Problem::forbidden(format!(
                "a request with this site's session cookie must come from this site ({seen}); \
                 allow other origins with serve.allowed_origins"
            ))))
        }
    }
}

/// The server span of a request, named by its route template.
fn server_span(
    req: &Request,
    method: &axum::http::Method,
    route: Option<&MatchedPath>,
    path: &str,
    request_id: &str,
) -> Option<shoal_core::spans::Span> {
    use shoal_core::spans::{start, Kind, SpanContext};
    let parent = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(SpanContext::parse);
    let template = route.map_or(path, |r| r.as_str());
    let mut span = start(format!("{method} {template}"), Kind::Server, parent)?;
    span.attr("http.request.method", method.as_str());
    span.attr("http.route", template);
    span.attr("url.path", path);
    span.attr("shoal.request_id", request_id);
    Some(span)
}

/// A request's id, span, start and route, taken before its route is
/// called; [`RequestContext::around`] runs the rest within them and adds
/// the access log, the metrics and the response's own fields.
struct RequestContext {
    started: Instant,
    request_id: Arc<str>,
    /// The client's own `x-request-id`, echoed as it came when it was
    /// taken (a clone shares its bytes).
    echoed: Option<HeaderValue>,
    method: axum::http::Method,
    /// A clone of the URI shares its bytes: no copy of the path.
    uri: axum::http::Uri,
    route: Option<MatchedPath>,
    span: tracing::Span,
    /// With traces on: this request's span, a child of the caller's
    /// `traceparent` (the gateway's span), within which the handler runs.
    server_span: Option<shoal_core::spans::Span>,
}

impl RequestContext {
    fn begin(req: &mut Request) -> RequestContext {
        let started = Instant::now();
        let incoming = req.headers().get(&X_REQUEST_ID);
        // A handler reads it with `shoal_core::trace::current()`: the
        // request runs within it (no extension, which costs a box and a map
        // insert per request).
        let request_id =
            shoal_core::ids::request_id_or_new_shared(incoming.and_then(|v| v.to_str().ok()));
        let echoed = incoming
            .filter(|v| v.as_bytes() == request_id.as_bytes())
            .cloned();
        let method = req.method().clone();
        let uri = req.uri().clone();
        let route = req.extensions().get::<MatchedPath>().cloned();
        let span = tracing::info_span!("request", request_id = %request_id, method = %method, path = %uri.path());
        let server_span = shoal_core::spans::enabled()
            .then(|| server_span(req, &method, route.as_ref(), uri.path(), &request_id))
            .flatten();
        RequestContext {
            started,
            request_id,
            echoed,
            method,
            uri,
            route,
            span,
            server_span,
        }
    }

    /// Runs `handled` with this request's trace id, within its log span
    /// (and its trace span when traces are on); then [`Self::finish`].
    /// Futures wrapped by value, not awaited inside an `async` block: a
    /// future held and then moved into the one awaited takes room twice,
    /// and every request's future is copied whole into its box (what that
    /// cost before: bench/README.md, "Standard middleware on `/healthz`").
    fn around<F>(
        self,
        standard: Arc<Standard>,
        handled: F,
    ) -> impl std::future::Future<Output = Response> + Send
    where
        F: std::future::Future<Output = Response> + Send,
    {
        let scoped = shoal_core::trace::scope(
            self.request_id.clone(),
            handled.instrument(self.span.clone()),
        );
        let run = match &self.server_span {
            Some(s) => Either::Left(shoal_core::spans::within(s.ctx, scoped)),
            None => Either::Right(scoped),
        };
        run.map(move |response| self.finish(&standard, response))
    }

    /// Logs the request, counts it, and adds the request id, the instance
    /// and the security fields to its response.
    fn finish(self, standard: &Standard, mut response: Response) -> Response {
        let status = response.status().as_u16();
        if let Some(mut s) = self.server_span {
            s.attr("http.response.status_code", status);
            if status >= 500 {
                s.fail(format!("status {status}"));
            }
            s.end();
        }
        let elapsed = self.started.elapsed();
        let path = self.uri.path();
        self.span.in_scope(|| {
            let duration_ms = elapsed.as_secs_f64() * 1000.0;
            // Probes come every second from each gateway: log them only
            // when they fail, or at debug.
            if matches!(path, "/healthz" | "/readyz") && status < 400 {
                tracing::debug!(status, duration_ms, "request");
            } else {
                tracing::info!(status, duration_ms, "request");
            }
        });
        let route = self.route.as_ref().map_or("unmatched", |m| m.as_str());
        record_request(&self.method, route, status, elapsed);
        let headers = response.headers_mut();
        // Room for the fields below at once, not a map grown twice.
        headers.reserve(6);
        if let Some(v) = self
            .echoed
            .or_else(|| HeaderValue::from_str(&self.request_id).ok())
        {
            headers.insert(X_REQUEST_ID.clone(), v);
        }
        if let Some(v) = &standard.instance {
            headers.insert(X_SHOAL_INSTANCE.clone(), v.clone());
        }
        security_headers(headers);
        response
    }
}

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_SHOAL_INSTANCE: HeaderName = HeaderName::from_static("x-shoal-instance");

/// Counts a request in `shoal_http_requests_total` and times it in
/// `shoal_http_request_duration_seconds`. The handles are kept per thread
/// by route, method and status: looking them up by label in the global
/// registry (three label strings built and hashed per request) was a
/// measurable share of a cached read; the route is hashed with foldhash
/// (the standard SipHash was ~300 instructions of a `/healthz`). Methods outside the standard ones
/// are counted as `OTHER`, so a client cannot mint label values.
fn record_request(method: &axum::http::Method, route: &str, status: u16, elapsed: Duration) {
    use axum::http::Method;
    use std::cell::RefCell;
    type ByRoute = foldhash::HashMap<
        String,
        Vec<(
            &'static str,
            metrics::Histogram,
            Vec<(u16, metrics::Counter)>,
        )>,
    >;
    thread_local! {
        static HANDLES: RefCell<ByRoute> = RefCell::new(ByRoute::default());
    }
    let method: &'static str = match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "OTHER",
    };
    HANDLES.with(|handles| {
        let mut handles = handles.borrow_mut();
        if !handles.contains_key(route) {
            handles.insert(route.to_string(), Vec::new());
        }
        let Some(methods) = handles.get_mut(route) else {
            return;
        };
        let at = match methods.iter().position(|(m, ..)| *m == method) {
            Some(i) => i,
            None => {
                let histogram = metrics::histogram!(
                    "shoal_http_request_duration_seconds",
                    "method" => method,
                    "route" => route.to_string()
                );
                methods.push((method, histogram, Vec::new()));
                methods.len() - 1
            }
        };
        let (_, histogram, counters) = &mut methods[at];
        histogram.record(elapsed.as_secs_f64());
        match counters.iter().find(|(s, _)| *s == status) {
            Some((_, counter)) => counter.increment(1),
            None => {
                let counter = metrics::counter!(
                    "shoal_http_requests_total",
                    "method" => method,
                    "route" => route.to_string(),
                    "status" => status.to_string()
                );
                counter.increment(1);
                counters.push((status, counter));
            }
        }
    });
}

/// Headers that keep a browser from misusing an answer, unless a route set
/// its own: no type sniffing, no framing, no referrer to other sites; and
/// on JSON (an API answer, never a page) a policy that lets it load or run
/// nothing.
fn security_headers(headers: &mut axum::http::HeaderMap) {
    // Names as `HeaderName`s, not `&str`s (a `&str` is parsed, and checked
    // against the standard names, on every lookup), and values made at
    // compile time (`from_static` checks every byte when called).
    static FIELDS: [(HeaderName, HeaderValue); 3] = [
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::REFERRER_POLICY,
            HeaderValue::from_static("strict-origin-when-cross-origin"),
        ),
    ];
    static NO_CONTENT_POLICY: HeaderValue =
        HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'");
    for (name, value) in &FIELDS {
        if let axum::http::header::Entry::Vacant(e) = headers.entry(name) {
            e.insert(value.clone());
        }
    }
    let json = headers.get(header::CONTENT_TYPE).is_some_and(|t| {
        let t = t.as_bytes();
        t.starts_with(b"application/json") || t.starts_with(PROBLEM_JSON.as_bytes())
    });
    if json {
        if let axum::http::header::Entry::Vacant(e) = headers.entry(header::CONTENT_SECURITY_POLICY)
        {
            e.insert(NO_CONTENT_POLICY.clone());
        }
    }
}

/// Error responses made by layers or axum itself (404, 405, 413 ...) come
/// without a body we chose; give them a problem+json body.
async fn bare_errors_to_problems(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.as_bytes().starts_with(PROBLEM_JSON.as_bytes()))
        .unwrap_or(false);
    if is_problem {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let detail = match status.as_u16() {
        404 => "no route matches this path".to_string(),
        405 => "this path does not accept this method".to_string(),
        413 => "the request body is larger than this endpoint accepts".to_string(),
        _ if !text.is_empty() => text,
        _ => status.canonical_reason().unwrap_or("error").to_string(),
    };
    let slug = status
        .canonical_reason()
        .unwrap_or("error")
        .to_ascii_lowercase()
        .replace(' ', "-");
    let problem = Problem::new(
        status.as_u16(),
        &slug,
        status.canonical_reason().unwrap_or("Error"),
        detail,
    );
    let mut out = problem_response(&problem);
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}

fn panic_to_problem(err: Box<dyn std::any::Any + Send + 'static>) -> Response<Body> {
    let message = err
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into());
    tracing::error!(panic = %message, "handler panicked; answered 500");
    metrics::counter!("shoal_http_panics_total").increment(1);
    problem_response(&Problem::internal(
        "the server failed to handle this request; it has been logged",
    ))
    .into_response()
}

#[derive(Debug)]
struct Limits {
    permits: Arc<Semaphore>,
    timeout: Duration,
}
