//! The request path as tower layers, assembled in one place: [`stack`]
//! lists, top to bottom, what every request of a client connection goes
//! through. Each layer is a `tower::Service` over `http::Request<Body>`;
//! what the request knows of itself (the settings generation it runs
//! under, its id, client and start) travels in its extensions as a
//! [`Ctx`], and what the proxy learned (pool, instance, attempts, cause)
//! comes back in the response's extensions as an [`Outcome`] for the
//! access log.
//!
//! The layers in the common case (a proxied GET) box no future of their
//! own: pass-through layers return their inner future, layers that may
//! answer early return `Either` of it, and only the handlers that do real
//! async work (admin, upgrade, cache, proxy) are boxed.

use crate::body::Holding;
use crate::body::{problem_response, Body, BoxError, X_REQUEST_ID};
use crate::listener::{Activity, ConnInfo};
use crate::proxy::{GatewayState, Outcome};
use crate::reload::Shared;
use futures_util::future::{BoxFuture, Either, Ready};
use http::{Method, Request, Response, Uri};
use http_body_util::BodyExt;
use shoal_core::Problem;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceBuilder};

/// The request path of one client connection, outermost layer first.
pub(crate) fn stack(
    shared: Arc<Shared>,
    client_addr: SocketAddr,
    activity: Arc<Activity>,
    conn: ConnInfo,
) -> impl crate::listener::Stack {
    ServiceBuilder::new()
        // The connection: a request is in flight until its response body
        // ends (for the idle timeout of connections hyper serves); an
        // upgrade keeps the connection counted (`listener.rs`).
        .layer(ConnectionLayer { activity, conn })
        // The request: the current settings generation (`reload.rs`), its
        // id (the client's `x-request-id` or a new one) and start.
        .layer(ContextLayer {
            shared: Arc::clone(&shared),
            client_addr,
        })
        // `/_gateway/*`: health, metrics, pools, admin API (`admin.rs`);
        // `/_shoal/*`: the console (`console/`). Answered here; not
        // traffic, so not in the access log.
        .layer(EndpointsLayer { shared })
        // One access-log line and the request metrics for all below.
        .layer(AccessLogLayer)
        // Rate limits (429) and load shedding (503) (`limits.rs`).
        .layer(AdmissionLayer)
        // The user header a client sent removed; a route that requires a
        // session checked, its user id passed on (`identity.rs`).
        .layer(IdentityLayer)
        // WebSocket and other upgrades, tunnelled (`upgrade.rs`).
        .layer(UpgradeLayer)
        // The RFC 9111 cache, where configured (`cache/`).
        .layer(CacheLayer)
        // Route, balance, retry where safe, time out (`proxy.rs`).
        .service(Proxy)
}

/// What a request knows of itself, in its extensions.
#[derive(Clone, Debug)]
pub(crate) struct Ctx {
    pub(crate) state: Arc<GatewayState>,
    pub(crate) client_addr: SocketAddr,
    pub(crate) request_id: String,
    pub(crate) started: Instant,
}

/// The answer when a layer finds no [`Ctx`]: the stack was assembled
/// without [`ContextLayer`] (a bug, never the client's fault).
pub(crate) fn no_context() -> Response<Body> {
    tracing::error!("a request reached the gateway's handlers without its context");
    problem_response(&Problem::internal("the request lost its context"), "-")
}

type Answer = Result<Response<Body>, Infallible>;

fn answered(r: Answer) -> Response<Body> {
    match r {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

/// A layer and its service: the `Layer` (cloning the layer's fields into
/// each service it makes) and the service struct (the inner service plus
/// those fields), whose `call` the layer's section writes.
macro_rules! plain_layer {
    ($(#[$doc:meta])* $layer:ident => $service:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy)]
        pub(crate) struct $layer;

        impl<S> Layer<S> for $layer {
            type Service = $service<S>;
            fn layer(&self, inner: S) -> $service<S> {
                $service { inner }
            }
        }

        #[derive(Clone)]
        pub(crate) struct $service<S> {
            inner: S,
        }
    };
    ($(#[$doc:meta])* $layer:ident { $($field:ident: $ty:ty),* $(,)? } => $service:ident) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub(crate) struct $layer {
            $($field: $ty),*
        }

        impl<S> Layer<S> for $layer {
            type Service = $service<S>;
            fn layer(&self, inner: S) -> $service<S> {
                $service {
                    inner,
                    $($field: self.$field.clone()),*
                }
            }
        }

        #[derive(Clone)]
        pub(crate) struct $service<S> {
            inner: S,
            $($field: $ty),*
        }
    };
}

/// A layer whose service also keeps the rest of the stack below as a
/// boxed [`Next`], to send requests of its own through it (the cache's
/// revalidations and refreshes, the identity layer's session check).
macro_rules! next_layer {
    ($(#[$doc:meta])* $layer:ident => $service:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy)]
        pub(crate) struct $layer;

        impl<S> Layer<S> for $layer
        where
            S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
                + Clone
                + Send
                + Sync
                + 'static,
            S::Future: Send + 'static,
        {
            type Service = $service<S>;
            fn layer(&self, inner: S) -> $service<S> {
                $service {
                    next: BoxCloneSyncService::new(inner.clone()),
                    inner,
                }
            }
        }

        #[derive(Clone)]
        pub(crate) struct $service<S> {
            inner: S,
            /// The stack below, boxed.
            next: Next,
        }
    };
}

/// `poll_ready` of a layer: ready when the inner service is.
macro_rules! ready_when_inner_is {
    () => {
        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            self.inner.poll_ready(cx)
        }
    };
}

pin_project_lite::pin_project! {
    /// The inner future, whose response body then holds `held` until it
    /// ends or is dropped.
    pub(crate) struct HoldBody<F, G> {
        #[pin]
        inner: F,
        held: Option<G>,
    }
}

impl<F, G> Future for HoldBody<F, G>
where
    F: Future<Output = Answer>,
    G: Send + 'static,
{
    type Output = Answer;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answer> {
        let this = self.project();
        let response = answered(std::task::ready!(this.inner.poll(cx)));
        Poll::Ready(Ok(match this.held.take() {
            None => response,
            Some(held) => {
                let (parts, body) = response.into_parts();
                Response::from_parts(parts, Holding::new(body, held).boxed_unsync())
            }
        }))
    }
}

// ---- connection --------------------------------------------------------

plain_layer!(ConnectionLayer { activity: Arc<Activity>, conn: ConnInfo } => Connection);

impl<S, B> Service<Request<B>> for Connection<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = HoldBody<S::Future, crate::listener::ActivityGuard>;

    ready_when_inner_is!();

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if crate::upgrade::is_upgrade(&req) {
            // Only a tunnel needs the connection's handle (cloning it
            // takes a lock shared by every connection).
            req.extensions_mut().insert(self.conn.clone());
        }
        // Counted for hyper's connections' idle timeout only (the own
        // HTTP/1.1 codec keeps its own): no wrapper on the response body
        // otherwise.
        let busy = self.activity.kept().then(|| self.activity.begin());
        // Whichever server read the request, the layers below see one
        // body type; an empty body is boxed without an allocation.
        let req = req.map(|b| {
            if b.is_end_stream() {
                crate::body::empty()
            } else {
                b.map_err(Into::into).boxed_unsync()
            }
        });
        HoldBody {
            inner: self.inner.call(req),
            held: busy,
        }
    }
}

// ---- request context ---------------------------------------------------

plain_layer!(ContextLayer { shared: Arc<Shared>, client_addr: SocketAddr } => WithContext);

impl<S> Service<Request<Body>> for WithContext<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = S::Future;

    ready_when_inner_is!();

    fn call(&mut self, mut req: Request<Body>) -> S::Future {
        let started = Instant::now();
        let request_id = shoal_core::ids::request_id_or_new(
            req.headers()
                .get(X_REQUEST_ID)
                .and_then(|v| v.to_str().ok()),
        );
        req.extensions_mut().insert(Ctx {
            state: self.shared.load(),
            client_addr: self.client_addr,
            request_id,
            started,
        });
        self.inner.call(req)
    }
}

// ---- the gateway's own endpoints --------------------------------------

plain_layer!(EndpointsLayer { shared: Arc<Shared> } => Endpoints);

impl<S> Service<Request<Body>> for Endpoints<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, BoxFuture<'static, Answer>>;

    ready_when_inner_is!();

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let path = req.uri().path();
        let console = (path == "/" || path.starts_with("/_shoal"))
            && req
                .extensions()
                .get::<Ctx>()
                .is_some_and(|ctx| crate::console::wants(&ctx.state, &req));
        if !console && !path.starts_with("/_gateway/") {
            return Either::Left(self.inner.call(req));
        }
        let shared = Arc::clone(&self.shared);
        Either::Right(Box::pin(async move {
            let Some(ctx) = req.extensions().get::<Ctx>().cloned() else {
                return Ok(no_context());
            };
            if console {
                return Ok(crate::console::handle(shared, ctx.state, req, &ctx.request_id).await);
            }
            if req.uri().path() == "/_gateway/admin/reload" {
                // The head only: a body is not `Sync`, to be held across
                // the reload.
                let head = Request::from_parts(req.into_parts().0, ());
                return Ok(
                    match crate::admin::authorize(
                        &ctx.state,
                        crate::admin::Access::Admin,
                        &head,
                        &ctx.request_id,
                    ) {
                        Some(denied) => denied,
                        None => crate::reload::admin(&shared, &head, &ctx.request_id).await,
                    },
                );
            }
            Ok(crate::admin::handle(ctx.state, req, &ctx.request_id).await)
        }))
    }
}

// ---- access log and metrics -------------------------------------------

plain_layer!(AccessLogLayer => AccessLog);

/// What the metrics and the log line need of the request, kept while it
/// is served.
struct Seen {
    started: Instant,
    /// For the log line; not gathered when it is not written.
    line: Option<LineParts>,
}

struct LineParts {
    method: Method,
    uri: Uri,
    client_addr: SocketAddr,
    request_id: String,
}

pin_project_lite::pin_project! {
    pub(crate) struct Logged<F> {
        #[pin]
        inner: F,
        seen: Option<Seen>,
        hsts: Option<http::HeaderValue>,
    }
}

impl<F: Future<Output = Answer>> Future for Logged<F> {
    type Output = Answer;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answer> {
        let this = self.project();
        let mut response = answered(std::task::ready!(this.inner.poll(cx)));
        if let Some(hsts) = this.hsts.take() {
            if !response
                .headers()
                .contains_key(http::header::STRICT_TRANSPORT_SECURITY)
            {
                response
                    .headers_mut()
                    .insert(http::header::STRICT_TRANSPORT_SECURITY, hsts);
            }
        }
        if let Some(seen) = this.seen.take() {
            let outcome = response
                .extensions_mut()
                .remove::<Outcome>()
                .unwrap_or_default();
            log(&seen, &outcome, response.status().as_u16());
        }
        Poll::Ready(Ok(response))
    }
}

/// Whether access-log lines are written (the `shoal_gateway::access`
/// target at info): what only the line needs is not gathered otherwise.
pub(crate) fn access_log_on() -> bool {
    tracing::enabled!(target: "shoal_gateway::access", tracing::Level::INFO)
}

/// Counts the request in the metrics and writes its access-log line.
fn log(seen: &Seen, outcome: &Outcome, status: u16) {
    let elapsed = seen.started.elapsed();
    let pool_name = outcome.pool.as_ref().map_or("-", |p| p.name.as_str());
    crate::console::stats::GATEWAY.record(status, elapsed);
    match &outcome.pool {
        Some(pool) => pool.metrics.record(&pool.name, status, elapsed),
        None => {
            crate::pool::requests_counter(pool_name, status).increment(1);
            metrics::histogram!("shoal_gateway_request_duration_seconds", "pool" => pool_name.to_string())
                .record(elapsed.as_secs_f64());
        }
    }
    let Some(line) = &seen.line else {
        return;
    };
    tracing::info!(
        target: "shoal_gateway::access",
        method = %line.method,
        path = line.uri.path(),
        status,
        pool = pool_name,
        upstream = outcome.upstream.as_ref().map_or("-", |i| i.url.as_str()),
        duration_ms = elapsed.as_secs_f64() * 1000.0,
        request_id = %line.request_id,
        attempts = outcome.attempts,
        client = %line.client_addr.ip(),
        upgrade = outcome.upgrade,
        cause = outcome.cause.as_deref(),
        "request"
    );
}

impl<S> Service<Request<Body>> for AccessLog<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Logged<S::Future>;

    ready_when_inner_is!();

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let seen = req.extensions().get::<Ctx>().map(|ctx| Seen {
            started: ctx.started,
            line: access_log_on().then(|| LineParts {
                method: req.method().clone(),
                uri: req.uri().clone(),
                client_addr: ctx.client_addr,
                request_id: ctx.request_id.clone(),
            }),
        });
        let hsts = req
            .extensions()
            .get::<Ctx>()
            .and_then(|ctx| ctx.state.hsts.clone());
        Logged {
            inner: self.inner.call(req),
            seen,
            hsts,
        }
    }
}

// ---- admission: rate limits and load shedding ------------------------

plain_layer!(AdmissionLayer => Admission);

impl<S> Service<Request<Body>> for Admission<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<Admitted<S::Future>, AskShared<S>>;

    ready_when_inner_is!();

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        use crate::limits::{admit, Admit};
        let Some(ctx) = req.extensions().get::<Ctx>() else {
            return Either::Left(Either::Left(futures_util::future::ready(Ok(no_context()))));
        };
        match admit(&ctx.state, ctx.client_addr, &req, &ctx.request_id, None) {
            Admit::Decided(admitted) => Either::Left(self.admitted(admitted, req)),
            Admit::AskShared(limiter, key) => {
                let state = Arc::clone(&ctx.state);
                let asked = Arc::clone(&state);
                let verdict: BoxFuture<'static, Result<(), std::time::Duration>> =
                    Box::pin(async move {
                        match &asked.coord {
                            Some(coord) => {
                                crate::limits::shared_verdict(coord, &limiter, &key).await
                            }
                            None => Ok(()),
                        }
                    });
                // The readied service goes into the future; this one
                // keeps a clone, readied again before its next call.
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                Either::Right(AskShared {
                    verdict,
                    rest: Some((Admission { inner }, req, state)),
                    running: None,
                })
            }
        }
    }
}

/// An admission decided at once: the rejection, or the inner future.
type Admitted<F> = Either<Ready<Answer>, HoldBody<F, crate::limits::Admission>>;

pin_project_lite::pin_project! {
    /// Waits for the gateways' shared rate-limit verdict, then admits (or
    /// rejects) the request as [`Admission`] does.
    pub(crate) struct AskShared<S: Service<Request<Body>>> {
        verdict: BoxFuture<'static, Result<(), std::time::Duration>>,
        rest: Option<(Admission<S>, Request<Body>, Arc<GatewayState>)>,
        #[pin]
        running: Option<Admitted<S::Future>>,
    }
}

impl<S> Future for AskShared<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Output = Answer;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answer> {
        let mut this = self.project();
        if this.running.is_none() {
            let verdict = std::task::ready!(this.verdict.as_mut().poll(cx));
            let Some((mut service, req, state)) = this.rest.take() else {
                return Poll::Ready(Ok(no_context()));
            };
            let Some((addr, id)) = req
                .extensions()
                .get::<Ctx>()
                .map(|c| (c.client_addr, c.request_id.clone()))
            else {
                return Poll::Ready(Ok(no_context()));
            };
            let running = match crate::limits::admit(&state, addr, &req, &id, Some(verdict)) {
                crate::limits::Admit::Decided(admitted) => service.admitted(admitted, req),
                // Never asked again once a verdict is given.
                crate::limits::Admit::AskShared(..) => {
                    Either::Left(futures_util::future::ready(Ok(no_context())))
                }
            };
            this.running.set(Some(running));
        }
        match this.running.as_pin_mut() {
            Some(running) => running.poll(cx),
            None => Poll::Ready(Ok(no_context())),
        }
    }
}

impl<S> Admission<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    fn admitted(
        &mut self,
        admitted: Result<crate::limits::Admission, Response<Body>>,
        req: Request<Body>,
    ) -> Admitted<S::Future> {
        match admitted {
            Err(rejected) => Either::Left(futures_util::future::ready(Ok(rejected))),
            Ok(admission) => Either::Right(HoldBody {
                inner: self.inner.call(req),
                held: admission.holds_anything().then_some(admission),
            }),
        }
    }
}

// ---- identity at the edge ----------------------------------------------

next_layer!(
    /// Removes the user header a client sent; on a route that requires a
    /// session, checks it through the stack below (`identity.rs`).
    IdentityLayer => Identified
);

impl<S> Service<Request<Body>> for Identified<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, BoxFuture<'static, Answer>>;

    ready_when_inner_is!();

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let Some(state) = req.extensions().get::<Ctx>().map(|c| Arc::clone(&c.state)) else {
            return Either::Left(self.inner.call(req));
        };
        state.identity.strip(req.headers_mut());
        if !(state.identity.any_route && crate::identity::required(&state, &req)) {
            return Either::Left(self.inner.call(req));
        }
        Either::Right(Box::pin(crate::identity::check(self.next.clone(), req)))
    }
}

// ---- upgrades ----------------------------------------------------------

plain_layer!(UpgradeLayer => Upgrade);

impl<S> Service<Request<Body>> for Upgrade<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, BoxFuture<'static, Answer>>;

    ready_when_inner_is!();

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        if !crate::upgrade::is_upgrade(&req) {
            return Either::Left(self.inner.call(req));
        }
        Either::Right(Box::pin(
            async move { Ok(crate::upgrade::proxy(req).await) },
        ))
    }
}

// ---- cache -------------------------------------------------------------

/// The rest of the stack below the cache, type-erased so the cache can
/// call it several times and from background refreshes.
pub(crate) type Next = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// Sends `req` through `next` (readiness first, as tower asks). A plain
/// boxed future, so that async code holding it need not prove `Send`
/// through the service's generic bounds (which rustc cannot do for the
/// boxed error type's elided lifetimes).
pub(crate) fn call(next: &Next, req: Request<Body>) -> BoxFuture<'static, Answer> {
    let mut svc = next.clone();
    Box::pin(async move {
        std::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
        svc.call(req).await
    })
}

next_layer!(
    /// The RFC 9111 cache (`cache/`), which revalidates and refreshes
    /// through the stack below.
    CacheLayer => Cache
);

impl<S> Service<Request<Body>> for Cache<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, BoxFuture<'static, Answer>>;

    ready_when_inner_is!();

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let cached = req
            .extensions()
            .get::<Ctx>()
            .is_some_and(|ctx| ctx.state.cache.is_some());
        if !cached {
            return Either::Left(self.inner.call(req));
        }
        let next = self.next.clone();
        Either::Right(Box::pin(
            async move { Ok(crate::cache::serve(next, req).await) },
        ))
    }
}

// ---- the proxy ---------------------------------------------------------

/// The gateway's span of a proxied request (while traces are on): a child
/// of the client's `traceparent` when it sent a good one, else a new
/// trace; the request then carries this span as the parent upstream.
fn gateway_span(req: &mut Request<Body>, request_id: &str) -> Option<shoal_core::spans::Span> {
    use shoal_core::spans::{start, Kind, SpanContext};
    let traceparent = http::HeaderName::from_static("traceparent");
    let parent = req
        .headers()
        .get(&traceparent)
        .and_then(|v| v.to_str().ok())
        .and_then(SpanContext::parse);
    let mut span = start(format!("gateway {}", req.method()), Kind::Server, parent)?;
    span.attr("http.request.method", req.method().as_str());
    span.attr("url.path", req.uri().path());
    span.attr("shoal.request_id", request_id);
    if let Ok(v) = http::HeaderValue::from_str(&span.ctx.traceparent()) {
        req.headers_mut().insert(traceparent, v);
    }
    Some(span)
}

/// The innermost service: forwards to an instance of the routed pool.
#[derive(Clone, Copy)]
pub(crate) struct Proxy;

impl Service<Request<Body>> for Proxy {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Answer>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        Box::pin(async move {
            // The request's extensions, emptied, carry the outcome back:
            // their map (allocated for the context) is reused.
            let mut extensions = std::mem::take(req.extensions_mut());
            let Some(ctx) = extensions.remove::<Ctx>() else {
                return Ok(no_context());
            };
            extensions.clear();
            let span = shoal_core::spans::enabled()
                .then(|| gateway_span(&mut req, &ctx.request_id))
                .flatten()
                .map(Box::new);
            let mut outcome = Outcome::default();
            let mut response = crate::proxy::forward(
                &ctx.state,
                ctx.client_addr,
                req,
                &ctx.request_id,
                ctx.started,
                &mut outcome,
            )
            .await;
            if let Some(mut span) = span {
                let status = response.status().as_u16();
                span.attr("http.response.status_code", status);
                span.attr("shoal.attempts", outcome.attempts);
                if let Some(pool) = &outcome.pool {
                    span.attr("shoal.pool", pool.name.as_str());
                }
                if status >= 500 {
                    span.fail(
                        outcome
                            .cause
                            .clone()
                            .unwrap_or_else(|| format!("status {status}")),
                    );
                }
                span.end();
            }
            if response.extensions().is_empty() {
                *response.extensions_mut() = extensions;
            }
            response.extensions_mut().insert(outcome);
            Ok(response)
        })
    }
}
