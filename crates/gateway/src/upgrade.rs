//! HTTP/1.1 `Upgrade` pass-through (WebSocket and the like): the upgrade
//! request goes to an instance with its `Upgrade` and `Connection: upgrade`
//! headers; when the instance answers 101, the client gets the 101 and the
//! gateway then copies bytes both ways between the two upgraded
//! connections until either side closes, the tunnel has been idle for
//! `tunnel_idle_timeout_ms`, or the gateway shuts down. Any other answer
//! is passed on as an ordinary response.

use crate::balance::PickContext;
use crate::body::{empty, from_upstream, problem_response, Body, X_REQUEST_ID};
use crate::proxy::{strip_hop_by_hop, upstream_headers, Outcome};
use crate::stack::Ctx;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use shoal_core::Problem;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub use shoal_h1server::is_upgrade;

/// Proxies an upgrade request. Only a failed connect is retried (on
/// another instance); the handshake is not replayed once sent.
pub async fn proxy(req: Request<Body>) -> Response<Body> {
    let mut outcome = Outcome {
        upgrade: true,
        ..Outcome::default()
    };
    let mut response = tunnel(req, &mut outcome).await;
    response.extensions_mut().insert(outcome);
    response
}

async fn tunnel(mut req: Request<Body>, outcome: &mut Outcome) -> Response<Body> {
    let Some(Ctx {
        state,
        client_addr,
        request_id,
        ..
    }) = req.extensions_mut().remove::<Ctx>()
    else {
        return crate::stack::no_context();
    };
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string);
    let Some(route) = state.router.find(host.as_deref(), req.uri().path()) else {
        return problem_response(
            &Problem::not_found(format!(
                "no route matches host `{}` and path `{}`",
                host.as_deref().unwrap_or(""),
                req.uri().path()
            )),
            &request_id,
        );
    };
    let pool = Arc::clone(&route.pool);
    outcome.pool = Some(Arc::clone(&pool));
    let client_upgrade = client_side(&mut req);
    let conn = req.extensions_mut().remove::<crate::listener::ConnInfo>();
    let (parts, _body) = req.into_parts();
    let protocol = parts.headers.get(header::UPGRADE).cloned();
    let mut headers = upstream_headers(
        &parts.headers,
        host.as_deref(),
        client_addr,
        state.settings.tls(),
        &request_id,
    );
    route.request_headers.apply(&mut headers);
    if let Some(p) = protocol {
        headers.insert(header::UPGRADE, p);
    }
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| "/".into());

    let ctx = PickContext {
        headers: &parts.headers,
        client_ip: client_addr.ip(),
    };
    let mut tried: Vec<usize> = Vec::new();
    let attempts = state.settings.retries.saturating_add(1);
    let mut last_error = None;
    let (instance, guard, mut response) = loop {
        let Some(instance) = pool.pick(&ctx, &tried) else {
            let detail = match &last_error {
                None => format!("no healthy instance in pool `{}`", pool.name),
                Some(e) => format!("pool `{}` failed; last error: {e}", pool.name),
            };
            return problem_response(&Problem::unavailable(detail, 1), &request_id);
        };
        tried.push(instance.id());
        outcome.attempts += 1;
        outcome.upstream = Some(Arc::clone(&instance));
        let uri = Uri::builder()
            .scheme(instance.scheme.clone())
            .authority(instance.authority.clone())
            .path_and_query(path_and_query.as_str())
            .build();
        let Ok(uri) = uri else {
            return problem_response(&Problem::bad_request("bad request target"), &request_id);
        };
        let mut upstream_req = Request::new(empty());
        *upstream_req.method_mut() = parts.method.clone();
        *upstream_req.uri_mut() = uri;
        *upstream_req.headers_mut() = headers.clone();
        let guard = Arc::clone(&instance).start();
        let sent = Instant::now();
        match tokio::time::timeout(
            route.request_timeout,
            crate::workers::request(&state.client, &pool, upstream_req),
        )
        .await
        {
            Err(_) => {
                return problem_response(
                    &Problem::gateway_timeout(format!(
                        "the upstream did not answer the upgrade within {} ms",
                        route.request_timeout.as_millis()
                    )),
                    &request_id,
                )
            }
            Ok(Ok(r)) => {
                instance.observe_latency(sent.elapsed());
                instance.record_success();
                break (instance, guard, r);
            }
            Ok(Err(e)) => {
                drop(guard);
                if e.is_connect() {
                    pool.on_connection_error(&instance);
                }
                last_error = Some(format!("{}: {e}", instance.url));
                outcome.cause = last_error.clone();
                if e.is_connect() && tried.len() < attempts as usize {
                    continue;
                }
                return problem_response(
                    &Problem::bad_gateway(format!(
                        "pool `{}`: the upgrade failed: {}",
                        pool.name,
                        last_error.unwrap_or_default()
                    )),
                    &request_id,
                );
            }
        }
    };

    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (mut rparts, rbody) = response.into_parts();
        strip_hop_by_hop(&mut rparts.headers);
        route.response_headers.apply(&mut rparts.headers);
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            rparts.headers.insert(X_REQUEST_ID, v);
        }
        let body = from_upstream(rbody, guard, state.settings.upstream_read_timeout_ms);
        return Response::from_parts(rparts, body);
    }

    let upstream_upgrade = hyper::upgrade::on(&mut response);
    let mut client_response = Response::new(empty());
    *client_response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let mut out = response.headers().clone();
    let accepted = out.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut out);
    route.response_headers.apply(&mut out);
    if let Some(p) = accepted {
        out.insert(header::UPGRADE, p);
    }
    out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        out.insert(X_REQUEST_ID, v);
    }
    *client_response.headers_mut() = out;

    let url = instance.url.clone();
    let idle_limit = match state.settings.tunnel_idle_timeout_ms {
        0 => None,
        ms => Some(Duration::from_millis(ms)),
    };
    tokio::spawn(async move {
        // The instance counts the tunnel as outstanding while it is open,
        // and the listener counts it as an open connection.
        let cut = guard.cut();
        let _guard = guard;
        let closing = conn.as_ref().map(|c| c.closing.clone()).unwrap_or_default();
        let _conn = conn;
        let (client, upstream) = match tokio::join!(client_upgrade, upstream_upgrade) {
            (Ok(c), Ok(u)) => (c, u),
            (c, u) => {
                tracing::debug!(upstream = %url, client_ok = c.is_ok(), upstream_ok = u.is_ok(), "upgrade did not complete");
                return;
            }
        };
        let moved = Arc::new(AtomicU64::new(0));
        let mut client = Counted::new(client, &moved);
        let mut upstream = Counted::new(TokioIo::new(upstream), &moved);
        tokio::select! {
            copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match copied {
                Ok((up, down)) => {
                    tracing::debug!(upstream = %url, bytes_up = up, bytes_down = down, "upgraded connection closed")
                }
                Err(e) => tracing::debug!(upstream = %url, error = %e, "upgraded connection ended"),
            },
            _ = closing.cancelled() => {
                tracing::debug!(upstream = %url, "closing an upgraded connection at shutdown");
            }
            () = cut => {
                tracing::info!(upstream = %url, "closing an upgraded connection: an operator ejected its instance");
            }
            _ = idle(&moved, idle_limit) => {
                metrics::counter!("shoal_gateway_tunnel_idle_closes_total").increment(1);
                tracing::debug!(upstream = %url, "closing an idle upgraded connection (tunnel_idle_timeout_ms)");
            }
        }
    });
    client_response
}

/// The client's connection once the 101 is written: from the gateway's
/// own HTTP/1.1 server (`shoal-h1server`) or from hyper's.
fn client_side(
    req: &mut Request<Body>,
) -> impl std::future::Future<Output = Result<shoal_h1server::Upgraded, String>> {
    use futures_util::future::Either;
    match req
        .extensions_mut()
        .remove::<shoal_h1server::ClientUpgrade>()
    {
        Some(own) => Either::Left(async move { own.connection().await.map_err(str::to_string) }),
        None => {
            let on = hyper::upgrade::on(req);
            Either::Right(async move {
                let upgraded = on.await.map_err(|e| e.to_string())?;
                Ok(Box::new(TokioIo::new(upgraded)) as shoal_h1server::Upgraded)
            })
        }
    }
}

/// Ends once a tunnel has moved no byte for `limit` (never without one),
/// noticed within a quarter of it: the count of bytes read on either side
/// is looked at, no clock is read per read.
async fn idle(moved: &AtomicU64, limit: Option<Duration>) {
    let Some(limit) = limit else {
        return std::future::pending().await;
    };
    let every = crate::listener::check_every(limit);
    let mut seen = moved.load(Ordering::Relaxed);
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(every).await;
        let now = moved.load(Ordering::Relaxed);
        if now != seen {
            seen = now;
            since = Instant::now();
        } else if since.elapsed() >= limit {
            return;
        }
    }
}

pin_project_lite::pin_project! {
    /// One side of a tunnel, counting the bytes read from it into a
    /// count shared by both sides (every byte written was read from the
    /// other side first).
    struct Counted<T> {
        #[pin]
        io: T,
        moved: Arc<AtomicU64>,
    }
}

impl<T> Counted<T> {
    fn new(io: T, moved: &Arc<AtomicU64>) -> Self {
        Counted {
            io,
            moved: Arc::clone(moved),
        }
    }
}

impl<T: AsyncRead> AsyncRead for Counted<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.io.poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            this.moved.fetch_add(read as u64, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite> AsyncWrite for Counted<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}
