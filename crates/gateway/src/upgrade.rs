//! HTTP/1.1 `Upgrade` pass-through (WebSocket and the like): the upgrade
//! request goes to an instance with its `Upgrade` and `Connection: upgrade`
//! headers; when the instance answers 101, the client gets the 101 and the
//! gateway then copies bytes both ways between the two upgraded
//! connections until either side closes, the tunnel has been idle for
//! `tunnel_idle_timeout_ms`, an operator ejects the instance, or the
//! gateway shuts down (a WebSocket is then first told to reconnect, with a
//! close frame 1012 between two of the instance's frames, within
//! `stream_drain_window_ms`). Any other answer is passed on as an
//! ordinary response.

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
                let now = Instant::now();
                instance.observe_latency_at(now.saturating_duration_since(sent), now);
                instance.record_success(now);
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
    let accepted_protocol = accepted.clone();
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
    // A WebSocket is told to reconnect when the gateway drains; other
    // protocols, whose framing the gateway does not know, are closed.
    let drain_window = crate::listener::stream_drain_window(&state.settings).filter(|_| {
        accepted_protocol
            .as_ref()
            .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"websocket"))
    });
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
        let relay = async {
            match drain_window {
                Some(window) => {
                    if relay_websocket(client, upstream, &closing, window).await {
                        metrics::counter!("shoal_gateway_websocket_drain_closes_total")
                            .increment(1);
                        tracing::debug!(upstream = %url, "told a WebSocket client to reconnect (close 1012) at shutdown");
                    }
                }
                None => tokio::select! {
                    copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match copied {
                        Ok((up, down)) => {
                            tracing::debug!(upstream = %url, bytes_up = up, bytes_down = down, "upgraded connection closed")
                        }
                        Err(e) => tracing::debug!(upstream = %url, error = %e, "upgraded connection ended"),
                    },
                    _ = closing.cancelled() => {
                        tracing::debug!(upstream = %url, "closing an upgraded connection at shutdown");
                    }
                },
            }
        };
        // However a WebSocket's relay is held up (a client that does not
        // read its close frame), it ends within the window and two graces
        // of the drain.
        let hard_stop = async {
            match drain_window {
                Some(window) => {
                    closing.cancelled().await;
                    tokio::time::sleep(window + CLOSE_GRACE * 2).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = relay => {}
            () = hard_stop => {
                tracing::debug!(upstream = %url, "closing a WebSocket that did not close within the drain window");
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

/// A WebSocket close frame with status 1012, "service restart" (RFC 6455
/// section 7.4, IANA registry): the client should connect again. Sent
/// unmasked, as a server's frames are.
const CLOSE_SERVICE_RESTART: [u8; 4] = [0x88, 0x02, 0x03, 0xF4];

/// How long a drained WebSocket tunnel waits for a frame in the middle of
/// being sent to end (before the close frame), and then for the client to
/// answer the close, before the tunnel is cut.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Relays a WebSocket tunnel both ways until either side closes; once
/// `closing` is cancelled (the gateway drains), at a random moment within
/// `window` and at the end of the frame the instance may be sending, the
/// client gets a close frame with status 1012 and nothing more from the
/// instance. The client's closing answer still goes to the instance, so it
/// learns of the close. Once the instance's side ends (it closed, or the
/// client was told), the tunnel ends as soon as the client's close frame
/// has passed or the client closes, at most [`CLOSE_GRACE`] later.
/// Whether the close frame was sent.
async fn relay_websocket<C, U>(
    client: C,
    upstream: U,
    closing: &tokio_util::sync::CancellationToken,
    window: Duration,
) -> bool
where
    C: AsyncRead + AsyncWrite,
    U: AsyncRead + AsyncWrite,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    // Set once the instance's side has ended (closed, cut, or the client
    // told to reconnect).
    let told = tokio::sync::Notify::new();
    let up = async {
        let mut frames = Frames::default();
        let mut buf = vec![0u8; 8 * 1024];
        let notified = told.notified();
        tokio::pin!(notified);
        let mut grace: Option<Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            tokio::select! {
                () = &mut notified, if grace.is_none() => {
                    // The client already answered with its close frame:
                    // nothing more from it matters.
                    if frames.closed {
                        break;
                    }
                    grace = Some(Box::pin(tokio::time::sleep(CLOSE_GRACE)));
                }
                () = async { grace.as_mut().expect("set").await }, if grace.is_some() => break,
                read = client_read.read(&mut buf) => {
                    let n = match read {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    frames.follow(&buf[..n]);
                    if upstream_write.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                    if grace.is_some() && frames.closed {
                        break;
                    }
                }
            }
        }
        let _ = upstream_write.shutdown().await;
    };
    let down = async {
        let mut frames = Frames::default();
        // As large as each of `copy_bidirectional`'s two buffers.
        let mut buf = vec![0u8; 8 * 1024];
        // When to tell the client, once the gateway drains; then the
        // latest moment for the frame being sent to end.
        let mut leave: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let mut give_up: Option<Pin<Box<tokio::time::Sleep>>> = None;
        // Made once: a fresh `cancelled()` per read would take the
        // process-wide token's lock each time.
        let drained = closing.cancelled();
        tokio::pin!(drained);
        loop {
            tokio::select! {
                () = &mut drained, if leave.is_none() => {
                    leave = Some(Box::pin(tokio::time::sleep(window.mul_f64(rand::random::<f64>()))));
                }
                () = async { leave.as_mut().expect("set").await }, if leave.is_some() && give_up.is_none() => {
                    if frames.at_boundary() {
                        let _ = client_write.write_all(&CLOSE_SERVICE_RESTART).await;
                        let _ = client_write.flush().await;
                        return true;
                    }
                    give_up = Some(Box::pin(tokio::time::sleep(CLOSE_GRACE)));
                }
                () = async { give_up.as_mut().expect("set").await }, if give_up.is_some() => {
                    // The instance never finished its frame: cut.
                    return false;
                }
                read = upstream_read.read(&mut buf) => {
                    let n = match read {
                        Ok(0) | Err(_) => {
                            let _ = client_write.shutdown().await;
                            return false;
                        }
                        Ok(n) => n,
                    };
                    let end = frames.follow(&buf[..n]);
                    match end {
                        Some(end) if give_up.is_some() => {
                            let _ = client_write.write_all(&buf[..end]).await;
                            let _ = client_write.write_all(&CLOSE_SERVICE_RESTART).await;
                            let _ = client_write.flush().await;
                            return true;
                        }
                        _ => {
                            if client_write.write_all(&buf[..n]).await.is_err() {
                                return false;
                            }
                        }
                    }
                }
            }
        }
    };
    // However the instance's side ends (closed, cut, or the client told
    // to reconnect), the client has CLOSE_GRACE to close its side.
    let down = async {
        let sent = down.await;
        told.notify_one();
        sent
    };
    let ((), sent) = tokio::join!(up, down);
    sent
}

/// Where the WebSocket frames of one direction end, from their headers
/// (RFC 6455 section 5.2): the payloads are skipped, not looked at.
#[derive(Default)]
struct Frames {
    /// The header being read, and how much of it has arrived.
    head: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: u64,
    /// The current frame is a close frame (opcode 8).
    closing: bool,
    /// A close frame has ended.
    closed: bool,
}

impl Frames {
    /// Between two frames.
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.left == 0
    }

    /// Follows `data`; the offset just past the first frame that ends in
    /// it, if one does.
    fn follow(&mut self, data: &[u8]) -> Option<usize> {
        let mut first = None;
        let mut i = 0;
        while i < data.len() {
            if self.left > 0 {
                let take = self.left.min((data.len() - i) as u64);
                self.left -= take;
                i += take as usize;
            } else {
                self.head[self.have] = data[i];
                self.have += 1;
                i += 1;
                if self.have < 2 || self.have < self.header_len() {
                    continue;
                }
                self.left = self.payload_len();
                self.closing = self.head[0] & 0x0f == 0x8;
                self.have = 0;
            }
            if self.at_boundary() {
                self.closed |= self.closing;
                if first.is_none() {
                    first = Some(i);
                }
            }
        }
        first
    }

    /// The whole header's length, once its second byte is in.
    fn header_len(&self) -> usize {
        let b1 = self.head[1];
        let extended = match b1 & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        2 + extended + if b1 & 0x80 != 0 { 4 } else { 0 }
    }

    fn payload_len(&self) -> u64 {
        match self.head[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
            127 => u64::from_be_bytes([
                self.head[2],
                self.head[3],
                self.head[4],
                self.head[5],
                self.head[6],
                self.head[7],
                self.head[8],
                self.head[9],
            ]),
            n => u64::from(n),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::Frames;

    #[test]
    fn frame_ends_are_found_across_reads_and_header_sizes() {
        let mut f = Frames::default();
        assert!(f.at_boundary());
        // "hello" as a text frame, split in the header and in the payload.
        assert_eq!(f.follow(&[0x81]), None);
        assert_eq!(f.follow(&[0x05, b'h', b'e']), None);
        assert!(!f.at_boundary());
        assert_eq!(f.follow(b"llo"), Some(3));
        assert!(f.at_boundary());
        // A 300-byte frame (16-bit length) then a ping with no payload:
        // the first end is after the long one.
        let mut data = vec![0x82, 126, 0x01, 0x2c];
        data.extend(std::iter::repeat_n(0u8, 300));
        data.extend([0x89, 0x00]);
        assert_eq!(f.follow(&data), Some(304));
        assert!(f.at_boundary());
        // A masked frame (a client's) with a 64-bit length, in pieces.
        let mut head = vec![0x82, 0x80 | 127];
        head.extend(70_000u64.to_be_bytes());
        head.extend([1, 2, 3, 4]);
        assert_eq!(f.follow(&head), None);
        assert_eq!(f.follow(&vec![0u8; 69_999]), None);
        assert!(!f.closed, "no close frame yet");
        assert_eq!(f.follow(&[0, 0x88, 0x00]), Some(1));
        assert!(f.at_boundary(), "the empty close frame ended too");
        assert!(f.closed, "and was seen as a close frame");
    }
}
