//! The instance's HTTP server: the accept loop, one task per connection,
//! and the close of every connection when the instance drains.
//!
//! HTTP/1.x is served by Shoal's own server (`shoal-h1server`, the
//! gateway's too), which holds no buffer while a connection idles or while
//! a response waits for its next bytes: an open event stream costs its
//! task, its socket and the stream's own state, where hyper's server kept
//! two 8 KiB buffers for it (bench/README.md, "Memory per connection").
//! Two kinds of connection go to hyper instead, handed over with the
//! bytes read so far: those that open with HTTP/2's preface (h2c, as
//! `axum::serve` took before) and WebSocket handshakes, because axum's
//! `WebSocketUpgrade` needs hyper's upgrade handle. Every request carries
//! `ConnectInfo<SocketAddr>` (the peer), as `axum::serve` gave it.

use axum::extract::ConnectInfo;
use axum::Router;
use futures_util::FutureExt as _;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use shoal_h1server::{Ended, ServerLimits};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A request head must arrive whole within this time of its first byte
/// (of the connection's start, for the first one).
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest request head taken (431 past it): twice the gateway's
/// default, so whatever a gateway passes on, with its own fields added,
/// fits.
const MAX_HEAD: usize = 128 * 1024;

/// Serves `router` on `listener` until `stop` is cancelled; then stops
/// accepting, closes idle connections at once and busy ones after their
/// response (which says `Connection: close`), and returns when every
/// connection has ended. The caller bounds that wait.
pub(crate) async fn serve(listener: TcpListener, router: Router, stop: CancellationToken) {
    let connections = TaskTracker::new();
    // Shared by every connection: no allocation per connection for them,
    // and 8 bytes in each connection's future.
    let limits = Arc::new(ServerLimits {
        header_read: HEAD_TIMEOUT,
        idle: Arc::new(|| None),
        pressure: None,
        max_head: MAX_HEAD,
        hand_off_upgrades: true,
        // An instance moves its own streams when it drains (the
        // notifications hub tells each to reconnect).
        stream_drain_window: None,
    });
    let closing = CancellationToken::new();
    let draining = Arc::new(AtomicBool::new(false));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of descriptors, mostly: new connections wait in the
                // backlog until some close.
                tracing::warn!(error = %e, "accepting a connection failed; retrying shortly");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let service = WithPeer {
            router: router.clone(),
            peer,
        };
        connections.spawn(connection(
            stream,
            service,
            Arc::clone(&limits),
            closing.clone(),
            Arc::clone(&draining),
        ));
    }
    drop(listener);
    draining.store(true, Ordering::Relaxed);
    closing.cancel();
    connections.close();
    connections.wait().await;
}

/// Serves one connection until it ends. The own server's future is
/// made here and chained, not awaited inside an `async` block: a block
/// would keep the socket, the service and the limits twice (once as
/// captured, once inside the server's future) for the connection's whole
/// life (bench/README.md, "Memory per connection"). The service comes
/// back from the own server with a connection it hands over.
fn connection(
    stream: TcpStream,
    service: WithPeer,
    limits: Arc<ServerLimits>,
    closing: CancellationToken,
    draining: Arc<AtomicBool>,
) -> impl std::future::Future<Output = ()> + Send {
    let hand_over = closing.clone();
    shoal_h1server::serve(stream, service, limits, closing, draining).then(move |ended| {
        let closing = hand_over;
        async move {
            match ended {
                Ended::Closed => {}
                // Boxed: hyper's connection state is larger than the own
                // server's.
                Ended::Http2(io, service) => {
                    Box::pin(hyper_connection(io, service, &closing, true)).await;
                }
                Ended::Upgrade(io, service) => {
                    Box::pin(hyper_connection(io, service, &closing, false)).await;
                }
            }
        }
    })
}

/// Serves a connection handed over to hyper: HTTP/2, or HTTP/1.1 from a
/// WebSocket handshake on (with upgrades).
async fn hyper_connection<I>(io: I, service: WithPeer, closing: &CancellationToken, h2: bool)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let service = TowerToHyperService::new(service);
    if h2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, service);
        tokio::pin!(conn);
        tokio::select! {
            result = conn.as_mut() => return log_end(result),
            () = closing.cancelled() => conn.as_mut().graceful_shutdown(),
        }
        log_end(conn.await);
    } else {
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            result = conn.as_mut() => return log_end(result),
            () = closing.cancelled() => conn.as_mut().graceful_shutdown(),
        }
        log_end(conn.await);
    }
}

fn log_end(result: Result<(), hyper::Error>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "a connection served by hyper ended with an error");
    }
}

/// The router, with the connection's peer put on each request.
#[derive(Clone)]
struct WithPeer {
    router: Router,
    peer: SocketAddr,
}

impl<B> tower::Service<http::Request<B>> for WithPeer
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = <Router as tower::Service<http::Request<B>>>::Future;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // A router is always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        req.extensions_mut().insert(ConnectInfo(self.peer));
        tower::Service::call(&mut self.router, req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn future_size<A, B, C, D, E, F>(_: fn(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A connection's future is most of its task, which every open
    /// connection holds (an idle event stream's included): tokio aligns a
    /// task to 128 bytes, so each 128 counts (bench/README.md, "Memory
    /// per connection").
    #[test]
    fn a_connection_s_future_stays_small() {
        let size = future_size(connection);
        // tokio's task adds 96 bytes (its header, scheduler, id and
        // trailer): 544 + 96 = 640, five times 128 (history:
        // bench/README.md, "Idle streams and WebSockets after trimming
        // their futures").
        assert!(size <= 544, "{size} bytes");
    }
}
