//! HTTP/1.x from clients: the gateway's own server codec, one task per
//! connection, no buffer held while the connection is idle.
//!
//! Why not hyper's server, which served every connection before: a
//! quarter of the gateway's user-space instructions per proxied request
//! went to it (callgrind, bench/README.md), and it holds two 8 KiB
//! buffers per connection from the moment it opens, so an idle keep-alive
//! connection cost ~29 KiB where nginx's costs 1–2 KiB. Here a head is
//! read into a buffer on the stack and copied out only when bytes arrive;
//! between requests a connection owns no heap buffer at all. The service
//! (the tower stack) is called directly, not cloned per request.
//!
//! What it speaks (RFC 9112): requests in origin or absolute form, bodies
//! framed by `Content-Length` or chunked (both at once is refused, as
//! nginx does, against request smuggling), `Expect: 100-continue`
//! (answered when the service first asks for the body, so a request
//! refused without it is not uploaded; the connection then closes),
//! pipelined requests (answered in order), HTTP/1.0 with `Connection: keep-alive`, `Upgrade` (the
//! connection is handed to the tunnel after the 101, see
//! [`ClientUpgrade`]). Responses are framed by their `Content-Length`, by
//! the body's exact size, else chunked (close-delimited for HTTP/1.0);
//! none for HEAD, 1xx, 204 and 304; a `Date` is added when missing.
//! A client that opens with HTTP/2's preface is handed back to the caller
//! ([`Ended::Http2`]) for hyper's HTTP/2 server.
//!
//! Limits: the first head must arrive whole within
//! `header_read_timeout_ms` of the connection's start, and fit
//! `max_header_bytes` (431 past it); a kept-alive connection waits for its
//! next request up to `idle_timeout_secs`, and a head that arrives in
//! parts has `header_read_timeout_ms` from its first bytes (nginx's
//! `keepalive_timeout` and `client_header_timeout`; hyper's server runs
//! the head timer while idle too, so it closed kept-alive connections
//! after the shorter of the two). CONNECT is refused (405). A client
//! that closes while its request is in flight cancels the request. A
//! request body the service did not read to its end (an early 413, say)
//! is read and thrown away, up to 64 KiB, so the connection can go on;
//! when more is declared, the response says `Connection: close`.
//!
//! `gateway.http1_server = "hyper"` serves HTTP/1.x with hyper's server
//! instead (for comparison, and as a way back).
//!
//! Who uses it: the gateway, for its clients (`shoal-gateway`'s
//! `listener.rs`), and every `serve` instance (`shoal-runtime`'s
//! `app.rs`), whose long-lived responses (event streams) held hyper's two
//! 8 KiB buffers each. An instance takes WebSocket handshakes to hyper
//! ([`ServerLimits::hand_off_upgrades`], [`Ended::Upgrade`]): axum's
//! WebSocket extractor needs hyper's upgrade handle.
//!
//! Drain: `closing` closes idle connections at once and busy ones after
//! their response; an event stream, which never ends by itself, is ended
//! whole at a random moment within [`ServerLimits::stream_drain_window`]
//! when one is set (the gateway's `stream_drain_window_ms`).

use bytes::{Bytes, BytesMut};
use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, DATE, TRANSFER_ENCODING,
};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use shoal_core::Problem;
use shoal_h1::{decode, push_decimal, Framing, Step};
use shoal_h1::{parse_length, parse_request, Refused, RequestHead as Head};
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, PollSender};
use tower::Service;

/// Errors carried by bodies: boxed so any source fits.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A head is first read into a stack buffer this large.
const STACK_READ: usize = 4096;
/// Body reads take at most this much at once.
const BODY_READ: usize = 64 * 1024;
/// Response data frames up to this size are copied into the write buffer
/// (one write for head and body); larger ones are written from their own
/// memory.
const INLINE: usize = 16 * 1024;
/// The write buffer is written out once it holds this much.
const FLUSH_AT: usize = 64 * 1024;
/// What the idle wait returns when pressure began (not a read size: a
/// read into the stack buffer is at most [`STACK_READ`]).
const PRESSURE: usize = usize::MAX;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The limits of one client connection.
#[derive(Clone)]
pub struct ServerLimits {
    pub header_read: Duration,
    /// The idle timeout of a kept-alive connection, asked each time it
    /// goes idle (it can shorten while the server is under pressure);
    /// `None`: no limit.
    pub idle: Arc<dyn Fn() -> Option<Duration> + Send + Sync>,
    /// Told when the server comes under pressure: connections idle at
    /// that moment ask `idle` again, so the shorter timeout reaches them
    /// too, counted from when they went idle.
    pub pressure: Option<Arc<tokio::sync::Notify>>,
    pub max_head: usize,
    /// Upgrade requests (WebSocket handshakes) are not served here but
    /// handed back with the connection ([`Ended::Upgrade`]), for a server
    /// whose services need its own upgrade handle (hyper's, for axum).
    pub hand_off_upgrades: bool,
    /// Once `closing` is cancelled, an event stream being written
    /// (`text/event-stream`, which never ends by itself) is ended
    /// cleanly at a random moment within this window, so its client
    /// reconnects elsewhere and resumes (`Last-Event-ID`); `None`: it
    /// runs until the response ends.
    pub stream_drain_window: Option<Duration>,
}

/// How a connection ended.
///
/// The service comes back with a connection handed over, for the server
/// that takes it: the caller then keeps no copy of its own beside the
/// connection's future for the connection's whole life.
pub enum Ended<I, S> {
    Closed,
    /// The client opened with HTTP/2's preface: the connection, with the
    /// bytes read from it so far, for an HTTP/2 server.
    Http2(Rewind<I>, S),
    /// An upgrade request arrived and [`ServerLimits::hand_off_upgrades`]
    /// is set: the connection, its head written out again in front of
    /// what followed it, for another HTTP/1.1 server to answer.
    Upgrade(Rewind<I>, S),
}

/// Serves HTTP/1.x requests on `io` until the connection ends. `closing`
/// (cancelled at shutdown) closes an idle connection at once and a busy
/// one after its response; `draining` (set then too) makes that response
/// say `Connection: close`. Each, and `limits`, is taken by reference or
/// owned (`Borrow`, an `Arc` too): owned, the future borrows nothing and
/// can be made before it is spawned.
///
/// A function returning an `async move` block rather than an `async fn`
/// (here and for the exchange's phases): an `async fn` keeps each
/// argument twice in its future (as captured, and moved into the body),
/// and this future lives as long as the connection.
pub fn serve<'a, S, B, I, L, C, D>(
    io: I,
    service: S,
    limits: L,
    closing: C,
    draining: D,
) -> impl Future<Output = Ended<I, S>> + 'a
where
    S: Service<Request<RequestBody>, Response = Response<B>, Error = Infallible> + 'a,
    B: HttpBody<Data = Bytes> + Unpin + 'a,
    B::Error: std::fmt::Display,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    // Borrowed: an `Arc` shared by a listener's connections keeps 8
    // bytes in each connection's future instead of the whole limits.
    L: std::borrow::Borrow<ServerLimits> + 'a,
    C: std::borrow::Borrow<CancellationToken> + 'a,
    D: std::borrow::Borrow<AtomicBool> + 'a,
{
    let mut io = io;
    let mut service = service;
    async move {
        let limits: &ServerLimits = limits.borrow();
        let draining: &AtomicBool = draining.borrow();
        let mut buf = BytesMut::new();
        let mut cancelled = pin!(closing.borrow().cancelled());
        // One timer for the connection's life, moved only when it fires
        // before the current deadline (no timer-wheel work per request).
        let mut timer = pin!(tokio::time::sleep_until(
            Instant::now() + limits.header_read
        ));
        let mut first = true;
        loop {
            // ---- the head ----------------------------------------------------
            // The first request's head must be whole within the head timeout
            // of the connection's start (one that connects and sends nothing
            // is dropped like a slow one). A kept-alive connection waits for
            // its next request's first bytes up to the idle timeout (without
            // one, for ever); a head that then arrives in parts has the head
            // timeout for the rest (nginx's keepalive_timeout and
            // client_header_timeout).
            let idle_since = Instant::now();
            let mut deadline = match (first, (limits.idle)()) {
                // The timer is still set to the connection's start plus
                // the head timeout (no `started` kept in the future).
                (true, _) => Some(timer.deadline()),
                (false, Some(idle)) => Some(idle_since + idle),
                (false, None) => None,
            };
            let mut head_timed = first;
            // The head lives in this block only: borrowed here, it would
            // otherwise keep its place in the future across the exchange.
            let answering = {
                let head = loop {
                    // While idle, pressure may shorten the wait (created before
                    // anything is read, so a signal from now on is not missed).
                    let pressure = (!head_timed && buf.is_empty())
                        .then(|| {
                            limits
                                .pressure
                                .as_deref()
                                .map(tokio::sync::Notify::notified)
                        })
                        .flatten();
                    let mut pressure = pin!(pressure);
                    if !buf.is_empty() {
                        if first && H2_PREFACE.starts_with(&buf[..buf.len().min(H2_PREFACE.len())])
                        {
                            if buf.len() >= H2_PREFACE.len() {
                                return Ended::Http2(Rewind::new(buf.freeze(), io), service);
                            }
                        } else {
                            let refused = match parse_request(&mut buf, limits.max_head) {
                                Ok(Some(head)) => break head,
                                Ok(None) => None,
                                Err(refused) => Some(refused),
                            };
                            // Awaited outside the match: its scrutinee (a whole
                            // parsed head) would otherwise keep a place in this
                            // future across the await.
                            if let Some(refused) = refused {
                                // Boxed, as below: a rare path's state kept out
                                // of every connection's future.
                                Box::pin(refuse(&mut io, refused)).await;
                                return Ended::Closed;
                            }
                        }
                        if !head_timed {
                            head_timed = true;
                            deadline = Some(Instant::now() + limits.header_read);
                        }
                    }
                    if let Some(at) = deadline.filter(|at| timer.deadline() > *at) {
                        timer.as_mut().reset(at);
                    }
                    let waited = poll_fn(|cx| {
                        if let Poll::Ready(read) = poll_read_stack(&mut io, &mut buf, cx) {
                            return Poll::Ready(Some(read));
                        }
                        if buf.is_empty() && cancelled.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(None);
                        }
                        if let Some(at) = deadline {
                            while timer.as_mut().poll(cx).is_ready() {
                                if Instant::now() >= at {
                                    return Poll::Ready(None);
                                }
                                timer.as_mut().reset(at);
                            }
                        }
                        if let Some(p) = pressure.as_mut().as_pin_mut() {
                            if p.poll(cx).is_ready() {
                                return Poll::Ready(Some(Ok(PRESSURE)));
                            }
                        }
                        Poll::Pending
                    })
                    .await;
                    match waited {
                        Some(Ok(PRESSURE)) => {
                            if let Some(idle) = (limits.idle)() {
                                let at = idle_since + idle;
                                deadline = Some(deadline.map_or(at, |d| d.min(at)));
                            }
                        }
                        Some(Ok(n)) if n > 0 => {}
                        // Closed, broken, timed out or shutting down.
                        _ => {
                            let _ = io.shutdown().await;
                            return Ended::Closed;
                        }
                    }
                };
                first = false;
                if limits.hand_off_upgrades
                    && upgrade_asked(head.parts.version, &head.parts.headers)
                {
                    let mut again = BytesMut::with_capacity(256 + buf.len());
                    encode_request_head(&mut again, &head.parts);
                    again.extend_from_slice(&buf);
                    return Ended::Upgrade(Rewind::new(again.freeze(), io), service);
                }
                // One request and its response, each phase boxed apart: their
                // state (the request, the stack's response future, the
                // response's framing and buffers) was most of this future, and
                // pinned here it sized every connection for it, idle ones
                // included; and a long response (an event stream) would keep the
                // first phase's space, the larger, while only the second runs
                // (DHAT; see bench/README.md, "Memory per connection"). Boxed,
                // each is allocated while it runs only. Neither the head nor the
                // answer is bound across an await, so neither keeps a place here.
                Box::pin(answer(
                    head,
                    &mut service,
                    &mut io,
                    &mut buf,
                    limits,
                    draining,
                ))
            };
            let after = {
                let writing = answering.await.map(|answer| {
                    Box::pin(write_response(
                        answer,
                        &mut io,
                        &mut buf,
                        limits,
                        cancelled.as_mut(),
                    ))
                });
                match writing {
                    Some(writing) => writing.await,
                    None => After::Close,
                }
            };
            match after {
                After::KeepAlive => {}
                After::Close => return Ended::Closed,
                After::Upgrade(tx) => {
                    let _ = tx.send(Box::new(Rewind::new(buf.split().freeze(), io)));
                    return Ended::Closed;
                }
            }
            if buf.is_empty() {
                // Idle: no buffer held until the next request arrives.
                buf = BytesMut::new();
            }
        }
    }
}

/// What a connection does after one exchange.
enum After {
    KeepAlive,
    Close,
    /// The 101 went out: hand the connection to this upgrade.
    Upgrade(oneshot::Sender<Upgraded>),
}

/// A request's answer, between the two phases of an exchange: the
/// response's head already encoded, and what writing the rest needs
/// (kept small: it lives as long as the response).
struct Answer<B> {
    body: B,
    /// The encoded head, then what is buffered to send.
    out: BytesMut,
    framing: Out,
    keep_alive: bool,
    /// A 101: the head goes out and the connection to the upgrade.
    switching: bool,
    /// `text/event-stream`: ended early, cleanly, when the server drains
    /// ([`ServerLimits::stream_drain_window`]).
    event_stream: bool,
    /// Feeds the request body (or discards what the service left).
    feeder: Option<Feeder>,
    /// Set when the request asked for an upgrade.
    upgrade: Option<oneshot::Sender<Upgraded>>,
}

/// The first phase of an exchange: the request, whose head was read, is
/// handed to the service and its body fed to it until the response
/// comes, whose head is then encoded. `None`: the connection closes (the
/// client left first, the service failed, or answered 101 to a request
/// that asked for no upgrade).
async fn answer<S, B, I>(
    head: Head,
    service: &mut S,
    io: &mut I,
    buf: &mut BytesMut,
    limits: &ServerLimits,
    draining: &AtomicBool,
) -> Option<Answer<B>>
where
    S: Service<Request<RequestBody>, Response = Response<B>, Error = Infallible>,
    B: HttpBody<Data = Bytes>,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // ---- the request -------------------------------------------------
    let Head {
        parts,
        framing,
        keep_alive: client_keep_alive,
        expect_continue,
    } = head;
    let head_request = parts.method == Method::HEAD;
    let http10 = parts.version == Version::HTTP_10;
    let mut feeder = None;
    let body = match framing {
        None => RequestBody {
            rx: None,
            length: Some(0),
            ended: true,
            wants: None,
        },
        Some(framing) => {
            let (tx, rx) = mpsc::channel(2);
            // `Expect: 100-continue`: the 100 goes out when the
            // service first asks for the body; one that answers
            // without it (413, 429) spares the client the upload.
            let wants = expect_continue.then(|| Arc::new(Wanted::default()));
            feeder = Some(Feeder::new(framing, tx, wants.clone()));
            let length = match framing {
                Framing::Length(n) => Some(n),
                _ => None,
            };
            RequestBody {
                rx: Some(rx),
                length,
                ended: false,
                wants,
            }
        }
    };
    let mut req = Request::from_parts(parts, body);
    let upgrade = if is_upgrade(&req) {
        let (tx, rx) = oneshot::channel();
        req.extensions_mut()
            .insert(ClientUpgrade(Arc::new(Mutex::new(Some(rx)))));
        Some(tx)
    } else {
        None
    };
    if poll_fn(|cx| service.poll_ready(cx)).await.is_err() {
        return None;
    }
    // Until the response: feed the request body to the service, or
    // watch for the client leaving (which cancels the request). The
    // finished call is dropped with this block: kept to the end of the
    // function, what it holds (the proxy's boxed state) stayed allocated
    // while the body streamed.
    let response = {
        let mut call = pin!(service.call(req));
        poll_fn(|cx| {
            if let Poll::Ready(response) = call.as_mut().poll(cx) {
                return Poll::Ready(Some(response));
            }
            loop {
                match &mut feeder {
                    Some(f) if f.active() => match f.poll_feed(io, buf, cx) {
                        Poll::Ready(()) => continue,
                        Poll::Pending => return Poll::Pending,
                    },
                    Some(f) if f.state == Feed::Stopped => return Poll::Pending,
                    _ => {
                        return match poll_watch(io, buf, limits.max_head, cx) {
                            Poll::Ready(()) => Poll::Ready(None),
                            Poll::Pending => Poll::Pending,
                        }
                    }
                }
            }
        })
        .await
    };
    let Some(Ok(response)) = response else {
        tracing::debug!("the client closed its connection before the response");
        return None;
    };

    // ---- the response's head -------------------------------------------
    let (parts, body) = response.into_parts();
    let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
    let event_stream = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if switching && upgrade.is_none() {
        tracing::warn!("a 101 answer to a request that asked for no upgrade; closing");
        return None;
    }
    // A request body not read to its end (one the service did not
    // want, say) is discarded before the next request is read, as
    // nginx does; when more is declared than that takes, the response
    // says the connection closes, so the client sends nothing more on
    // it.
    if let Some(f) = feeder.as_mut().filter(|f| f.active()) {
        poll_fn(|cx| {
            let _ = f.poll_feed(io, buf, cx);
            Poll::Ready(())
        })
        .await;
    }
    let unreadable = feeder.as_ref().is_some_and(Feeder::beyond_discarding);
    let mut keep_alive =
        client_keep_alive && !unreadable && !switching && !draining.load(Ordering::Relaxed);
    let hint = body.size_hint();
    let inline = hint.exact().filter(|n| *n as usize <= INLINE).unwrap_or(0);
    // Room for the head and a small body at once: a service behind the
    // standard middleware answers with ~20 fields, a head past 512
    // bytes, and the buffer was grown (a realloc and a copy) on every
    // such response (callgrind, bench/README.md).
    let mut out = BytesMut::with_capacity(1024 + inline as usize);
    let framing = encode_head(
        &mut out,
        &parts,
        hint,
        head_request,
        http10,
        &mut keep_alive,
    );
    Some(Answer {
        body,
        out,
        framing,
        keep_alive,
        switching,
        event_stream,
        feeder,
        upgrade,
    })
}

/// The second phase of an exchange: the response written (what is left
/// of the request body read meanwhile); what the connection does next.
fn write_response<'a, 'c: 'a, B, I>(
    answer: Answer<B>,
    io: &'a mut I,
    buf: &'a mut BytesMut,
    limits: &'a ServerLimits,
    closing: Pin<&'a mut tokio_util::sync::WaitForCancellationFuture<'c>>,
) -> impl Future<Output = After> + use<'a, 'c, B, I>
where
    B: HttpBody<Data = Bytes> + Unpin + 'a,
    B::Error: std::fmt::Display,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Not an `async fn`, and the answer's fields used where they are, not
    // moved out: this future lives as long as the response (an event
    // stream's, for hours), and either would keep the answer twice.
    let mut answer = answer;
    let mut closing = closing;
    async move {
        // Set when the server drains and this is an event stream: the
        // moment it ends (boxed: rare, and kept out of every stream).
        let mut leave: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let drain_window = limits.stream_drain_window.filter(|_| answer.event_stream);
        if answer.switching {
            if !send(io, &[&answer.out], true).await {
                return After::Close;
            }
            return match answer.upgrade.take() {
                Some(tx) => After::Upgrade(tx),
                None => After::Close,
            };
        }
        drop(answer.upgrade.take());
        if buf.is_empty() {
            // What the request's head was read into: not held while the
            // response is written (an event stream's, for hours).
            *buf = BytesMut::new();
        }
        // ---- the response's body -------------------------------------------
        // Boxed: rare, and a field map is large beside the rest.
        let mut trailers: Option<Box<HeaderMap>> = None;
        let written = loop {
            // What the body gave, taken apart in this statement, before
            // any await, so that neither the `Next` nor the `Put` (96 and
            // 56 bytes) is kept in this future's state, which an event
            // stream holds for hours.
            let data = match poll_fn(|cx| {
                if let Some(window) = drain_window {
                    if leave.is_none() && closing.as_mut().poll(cx).is_ready() {
                        let at = window.mul_f64(rand::random::<f64>());
                        leave = Some(Box::pin(tokio::time::sleep(at)));
                    }
                    if leave
                        .as_mut()
                        .is_some_and(|l| l.as_mut().poll(cx).is_ready())
                    {
                        return Poll::Ready(Next::Leave);
                    }
                }
                match answer.feeder.as_mut() {
                    Some(f) if f.active() => {
                        // Ended or waiting: either way, on to the response.
                        let _ = f.poll_feed(io, buf, cx);
                    }
                    Some(f) if f.state == Feed::Stopped => {}
                    // A client that leaves in the middle of a long
                    // response (a stream of events) is noticed now, not
                    // at the next event.
                    _ => {
                        if poll_watch(io, buf, limits.max_head, cx).is_ready() {
                            return Poll::Ready(Next::Gone);
                        }
                    }
                }
                match Pin::new(&mut answer.body).poll_frame(cx) {
                    Poll::Ready(frame) => Poll::Ready(Next::Frame(frame)),
                    Poll::Pending if !answer.out.is_empty() => Poll::Ready(Next::Flush),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await
            {
                Next::Gone => {
                    tracing::debug!("the client closed its connection during the response");
                    return After::Close;
                }
                // Draining: the event stream ends here, whole (its
                // client reconnects and resumes elsewhere), and so does
                // the connection.
                Next::Leave => {
                    answer.keep_alive = false;
                    break true;
                }
                // Nothing ready yet: send what is buffered meanwhile.
                Next::Flush => None,
                Next::Frame(None) => break true,
                Next::Frame(Some(Err(e))) => {
                    tracing::debug!(error = %e, "the response body failed; closing the client connection");
                    break false;
                }
                Next::Frame(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => Some(data),
                    Err(frame) => {
                        trailers = frame.into_trailers().ok().map(Box::new);
                        continue;
                    }
                },
            };
            let large = match data.map(|data| answer.framing.put(&mut answer.out, data)) {
                None => {
                    // Boxed, as the large write below: an event stream's
                    // future holds the largest of its awaits for hours,
                    // and these two are taken only by a streamed or a
                    // large body.
                    if !Box::pin(send(io, &[&answer.out], true)).await {
                        return After::Close;
                    }
                    // The body waits (an event stream): hold no buffer
                    // until its next frame.
                    answer.out = BytesMut::new();
                    continue;
                }
                Some(Put::Copied) => None,
                Some(Put::TooLong) => {
                    tracing::debug!("the response body broke its Content-Length; closing");
                    break false;
                }
                // Large: written from its own memory after what is buffered.
                Some(Put::After(data, suffix)) => Some((data, suffix)),
            };
            if let Some((data, suffix)) = large {
                if !Box::pin(send(io, &[&answer.out, &data], false)).await {
                    return After::Close;
                }
                answer.out.clear();
                answer.out.extend_from_slice(suffix);
            }
            if answer.out.len() >= FLUSH_AT {
                if !send(io, &[&answer.out], false).await {
                    return After::Close;
                }
                answer.out.clear();
            }
        };
        let complete = written && answer.framing.finish(&mut answer.out, trailers.as_deref());
        if !send(io, &[&answer.out], true).await {
            return After::Close;
        }
        drop(answer.out);
        drop(answer.body);
        if complete && answer.keep_alive {
            if let Some(f) = answer.feeder.as_mut().filter(|f| f.active()) {
                // What is left of a body nobody read, within the head
                // timeout.
                let discard = poll_fn(|cx| f.poll_feed(io, buf, cx));
                let _ = Box::pin(tokio::time::timeout(limits.header_read, discard)).await;
            }
        }
        let request_read = answer.feeder.as_ref().is_none_or(|f| f.state == Feed::Done);
        if !(complete && answer.keep_alive && request_read) {
            let _ = io.shutdown().await;
            return After::Close;
        }
        After::KeepAlive
    }
}

/// Writes `parts` in turn (and flushes); false when the connection broke,
/// which ends it (the cause logged at debug). Not an `async fn`, and no
/// iterator held across the writes: this future is part of every
/// response's, an event stream's included (`a_streaming_responses_future_stays_small`).
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn send<'a, I: AsyncWrite + Unpin>(
    io: &'a mut I,
    parts: &'a [&'a [u8]],
    flush: bool,
) -> impl Future<Output = bool> + use<'a, I> {
    async move {
        let mut sent = Ok(());
        let mut i = 0;
        while i < parts.len() {
            sent = io.write_all(parts[i]).await;
            if sent.is_err() {
                break;
            }
            i += 1;
        }
        if flush && sent.is_ok() {
            sent = io.flush().await;
        }
        if let Err(e) = &sent {
            tracing::debug!(error = %e, "the client connection broke while the gateway wrote to it");
        }
        sent.is_ok()
    }
}

// ---- reading -------------------------------------------------------------

/// Reads into a buffer on the stack and appends what came to `buf`, so
/// a connection waiting for its next request holds no heap buffer.
fn poll_read_stack<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    // Not zeroed: a read fills what it reports, and only that is copied.
    let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); STACK_READ];
    let mut read = ReadBuf::uninit(&mut stack);
    match Pin::new(io).poll_read(cx, &mut read) {
        Poll::Ready(Ok(())) => {
            buf.extend_from_slice(read.filled());
            Poll::Ready(Ok(read.filled().len()))
        }
        Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
        Poll::Pending => Poll::Pending,
    }
}

/// While a request without a body (or whose body has arrived) is served:
/// reads ahead (a pipelined request) up to `max_head` bytes, and is ready
/// when the client closed or broke the connection.
fn poll_watch<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    max_head: usize,
    cx: &mut Context<'_>,
) -> Poll<()> {
    loop {
        if buf.len() > max_head {
            // Enough read ahead; the rest waits for its turn.
            return Poll::Pending;
        }
        match poll_read_stack(io, buf, cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(n)) if n > 0 => continue,
            Poll::Ready(_) => return Poll::Ready(()),
        }
    }
}

/// An HTTP/1.1 request asking to switch protocols (`Connection: upgrade`
/// and an `Upgrade` header).
pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    upgrade_asked(req.version(), req.headers())
}

fn upgrade_asked(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && headers.contains_key(http::header::UPGRADE)
        && headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// A request head written out again, as it arrived but for its fields'
/// order (grouped by name) and case.
fn encode_request_head(out: &mut BytesMut, parts: &http::request::Parts) {
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    match parts.uri.path_and_query() {
        Some(target) if parts.uri.scheme().is_none() => {
            out.extend_from_slice(target.as_str().as_bytes());
        }
        _ => out.extend_from_slice(parts.uri.to_string().as_bytes()),
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        put_field(out, name, value);
    }
    out.extend_from_slice(b"\r\n");
}

/// The head of a problem+json answer to a refused request head.
fn problem_head(problem: &Problem) -> http::response::Parts {
    let (mut parts, ()) = Response::new(()).into_parts();
    parts.status =
        StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    parts.headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(shoal_core::problem::PROBLEM_JSON),
    );
    parts
}

/// Answers a refused head (400 or 431, problem+json) and closes.
async fn refuse<I: AsyncWrite + Unpin>(io: &mut I, refused: Refused) {
    let problem = match refused {
        Refused::TooLarge => Problem::new(
            431,
            "header-fields-too-large",
            "Request header fields too large",
            "the request head is larger than this server takes",
        ),
        Refused::Bad(why) => Problem::bad_request(why),
        Refused::Connect => Problem::new(
            405,
            "method-not-allowed",
            "Method not allowed",
            "this server does not tunnel CONNECT requests",
        ),
        Refused::NotImplemented(why) => {
            Problem::new(501, "not-implemented", "Not implemented", why)
        }
    };
    tracing::debug!(status = problem.status, detail = ?problem.detail, "request head refused");
    let parts = problem_head(&problem);
    let body = problem.to_json();
    let mut keep_alive = false;
    let mut out = BytesMut::with_capacity(512 + body.len());
    let mut framing = encode_head(
        &mut out,
        &parts,
        SizeHint::with_exact(body.len() as u64),
        false,
        false,
        &mut keep_alive,
    );
    framing.put(&mut out, Bytes::from(body));
    let _ = io.write_all(&out).await;
    let _ = io.shutdown().await;
}

// ---- the request body ----------------------------------------------------

/// What the connection sends the request body: data, then its end or
/// why it broke. A channel that closes without `End` is a broken body.
enum Piece {
    Data(Bytes),
    End,
    Failed(BoxError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feed {
    /// Passed on as the service takes it.
    Reading,
    /// The service dropped the body before its end: the rest is read and
    /// discarded (up to [`DISCARD_MAX`]), so the connection can go on.
    Discarding,
    /// Read to its end.
    Done,
    /// Broken, or too much left to discard: the connection cannot be read
    /// on.
    Stopped,
}

/// The most request body bytes read and thrown away after the service
/// dropped the body (nginx discards a body too, to keep the connection).
const DISCARD_MAX: usize = 64 * 1024;

/// Reads a request body from the connection into the channel its
/// [`RequestBody`] reads, as fast as the service takes it.
struct Feeder {
    framing: Framing,
    tx: Option<PollSender<Piece>>,
    state: Feed,
    discarded: usize,
    /// `Expect: 100-continue` not answered yet: when the service asks,
    /// the bytes of the 100 already written.
    expect: Option<(Arc<Wanted>, usize)>,
}

/// Set by a request body when it is first asked for data (for
/// `Expect: 100-continue`), waking the connection.
#[derive(Default)]
struct Wanted {
    asked: AtomicBool,
    waker: futures_util::task::AtomicWaker,
}

impl Wanted {
    fn ask(&self) {
        if !self.asked.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    fn poll_asked(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.asked.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.asked.load(Ordering::Acquire) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

impl Feeder {
    fn new(framing: Framing, tx: mpsc::Sender<Piece>, expect: Option<Arc<Wanted>>) -> Feeder {
        Feeder {
            framing,
            tx: Some(PollSender::new(tx)),
            state: Feed::Reading,
            discarded: 0,
            expect: expect.map(|wanted| (wanted, 0)),
        }
    }

    /// Writes the 100 once the service asked for the body; ready when it
    /// is written (or was not expected).
    fn poll_continue<I: AsyncWrite + Unpin>(
        &mut self,
        io: &mut I,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        let Some((wanted, written)) = self.expect.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        std::task::ready!(wanted.poll_asked(cx));
        while *written < CONTINUE.len() {
            match std::task::ready!(Pin::new(&mut *io).poll_write(cx, &CONTINUE[*written..])) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => *written += n,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        std::task::ready!(Pin::new(&mut *io).poll_flush(cx))?;
        self.expect = None;
        Poll::Ready(Ok(()))
    }

    /// Whether it still reads from the connection.
    fn active(&self) -> bool {
        matches!(self.state, Feed::Reading | Feed::Discarding)
    }

    /// Whether the connection cannot be read on after this request: the
    /// body broke, or more of it is declared than discarding takes.
    fn beyond_discarding(&self) -> bool {
        match (self.state, self.framing) {
            (Feed::Stopped, _) => true,
            // The 100 never went out: whether the client sends the body
            // anyway cannot be known.
            _ if self.expect.is_some() => true,
            (Feed::Discarding, Framing::Length(left)) => {
                self.discarded as u64 + left > DISCARD_MAX as u64
            }
            _ => false,
        }
    }

    /// Ready when the body ended (read, discarded or broken); pending
    /// while it waits for the client or for the service to take more.
    fn poll_feed<I: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut I,
        buf: &mut BytesMut,
        cx: &mut Context<'_>,
    ) -> Poll<()> {
        while self.active() {
            if let Some(tx) = self.tx.as_mut() {
                if std::task::ready!(tx.poll_reserve(cx)).is_err() {
                    // The service dropped the body.
                    self.tx = None;
                    self.state = Feed::Discarding;
                }
            }
            if self.expect.is_some() {
                if self.tx.is_none() {
                    // Dropped before it asked: no 100, and no telling
                    // what the client sends next.
                    return self.stop(Feed::Stopped, None);
                }
                if let Err(e) = std::task::ready!(self.poll_continue(io, cx)) {
                    return self.stop(Feed::Stopped, Some(Piece::Failed(e.into())));
                }
            }
            match decode(&mut self.framing, buf) {
                Ok(Step::Data(data)) => match self.tx.as_mut() {
                    Some(tx) => {
                        let _ = tx.send_item(Piece::Data(data));
                    }
                    None => {
                        self.discarded += data.len();
                        if self.discarded > DISCARD_MAX {
                            return self.stop(Feed::Stopped, None);
                        }
                    }
                },
                Ok(Step::End) => return self.stop(Feed::Done, Some(Piece::End)),
                Err(e) => return self.stop(Feed::Stopped, Some(Piece::Failed(e.into()))),
                Ok(Step::More) => {
                    let want = match self.framing {
                        Framing::Length(left) => (left as usize).clamp(1, BODY_READ),
                        _ => 8 * 1024,
                    };
                    buf.reserve(want);
                    match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf) {
                        // A reserved permit is kept: no other sender exists.
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(n)) if n > 0 => {}
                        Poll::Ready(Ok(_)) => {
                            let e =
                                "the client closed the connection before the request body ended";
                            return self.stop(Feed::Stopped, Some(Piece::Failed(e.into())));
                        }
                        Poll::Ready(Err(e)) => {
                            return self.stop(Feed::Stopped, Some(Piece::Failed(e.into())))
                        }
                    }
                }
            }
        }
        Poll::Ready(())
    }

    fn stop(&mut self, state: Feed, last: Option<Piece>) -> Poll<()> {
        if let (Some(tx), Some(piece)) = (self.tx.as_mut(), last) {
            let _ = tx.send_item(piece);
        }
        self.tx = None;
        self.state = state;
        Poll::Ready(())
    }
}

/// A request body arriving through the connection's [`Feeder`] (none
/// without a receiver). A type of its own, not the boxed [`Body`], so the
/// service's future type names no trait object (which would trip the
/// compiler's `Send` check of the connection's future).
pub struct RequestBody {
    rx: Option<mpsc::Receiver<Piece>>,
    /// Told when the body is first asked for (`Expect: 100-continue`).
    wants: Option<Arc<Wanted>>,
    /// The declared length, for `size_hint`.
    length: Option<u64>,
    ended: bool,
}

impl HttpBody for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if let Some(wants) = self.wants.take() {
            wants.ask();
        }
        let Some(rx) = self.rx.as_mut() else {
            return Poll::Ready(None);
        };
        let piece = std::task::ready!(rx.poll_recv(cx));
        Poll::Ready(match piece {
            Some(Piece::Data(data)) => Some(Ok(Frame::data(data))),
            Some(Piece::End) => {
                self.ended = true;
                None
            }
            Some(Piece::Failed(e)) => {
                self.ended = true;
                Some(Err(e))
            }
            None => {
                self.ended = true;
                Some(Err(
                    "the client connection ended before the request body".into()
                ))
            }
        })
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        match self.length {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

// ---- writing -------------------------------------------------------------

/// How the response body is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    /// No body is written (HEAD, 1xx, 204, 304).
    None,
    /// `Content-Length`: this many bytes left.
    Length(u64),
    Chunked,
    /// Until the connection closes (HTTP/1.0 without a length).
    Close,
}

impl Out {
    /// Adds body data in this framing: copied into `out`, or (when large)
    /// its framing prefix copied and the data handed back to be written
    /// after `out`, followed by the suffix.
    fn put(&mut self, out: &mut BytesMut, data: Bytes) -> Put {
        if data.is_empty() {
            return Put::Copied;
        }
        let large = data.len() > INLINE;
        match self {
            Out::None => return Put::Copied,
            Out::Length(left) => {
                if data.len() as u64 > *left {
                    return Put::TooLong;
                }
                *left -= data.len() as u64;
            }
            Out::Chunked => {
                let mut size = [0u8; 16];
                out.extend_from_slice(hex(data.len(), &mut size));
                out.extend_from_slice(b"\r\n");
                if large {
                    return Put::After(data, b"\r\n");
                }
                out.extend_from_slice(&data);
                out.extend_from_slice(b"\r\n");
                return Put::Copied;
            }
            Out::Close => {}
        }
        if large {
            return Put::After(data, b"");
        }
        out.extend_from_slice(&data);
        Put::Copied
    }

    /// Ends the body: false when it fell short of its length.
    fn finish(&self, out: &mut BytesMut, trailers: Option<&HeaderMap>) -> bool {
        match self {
            Out::Length(left) => *left == 0,
            Out::Chunked => {
                out.extend_from_slice(b"0\r\n");
                for (name, value) in trailers.into_iter().flatten() {
                    put_field(out, name, value);
                }
                out.extend_from_slice(b"\r\n");
                true
            }
            Out::None | Out::Close => true,
        }
    }
}

/// What [`Out::put`] did with the data.
enum Put {
    Copied,
    /// Write this after the buffer, then the suffix.
    After(Bytes, &'static [u8]),
    /// More than the declared length.
    TooLong,
}

/// What the response writer waits for.
enum Next<E> {
    Frame(Option<Result<Frame<Bytes>, E>>),
    /// The body has nothing yet: write out what is buffered.
    Flush,
    /// The client closed the connection.
    Gone,
    /// The server drains: end this event stream now.
    Leave,
}

fn hex(mut n: usize, into: &mut [u8; 16]) -> &[u8] {
    let mut i = into.len();
    loop {
        i -= 1;
        into[i] = b"0123456789abcdef"[n & 15];
        n >>= 4;
        if n == 0 {
            return &into[i..];
        }
    }
}

/// Writes the status line and header fields, choosing the body's framing
/// (see the module's doc) and the `Connection` field; `keep_alive` turns
/// false when the response or its framing ends the connection.
fn encode_head(
    out: &mut BytesMut,
    parts: &http::response::Parts,
    hint: SizeHint,
    head_request: bool,
    http10: bool,
    keep_alive: &mut bool,
) -> Out {
    let status = parts.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");

    let bodiless_status = status.is_informational() || status == StatusCode::NO_CONTENT;
    let upgrading = status == StatusCode::SWITCHING_PROTOCOLS;
    // One pass over the fields (a lookup by name costs about as much as
    // writing one): the framing fields are the codec's and written after
    // the rest; the first Content-Length decides (one that is not a
    // number is dropped), a Transfer-Encoding passed along is replaced by
    // the framing chosen here.
    let mut length: Option<Option<u64>> = None;
    let mut has_date = false;
    for (name, value) in parts.headers.iter() {
        if *name == CONTENT_LENGTH {
            if length.is_none() {
                length = Some(parse_length(value.as_bytes()));
            }
        } else if *name == TRANSFER_ENCODING {
            // Replaced by the framing chosen below.
        } else if *name == CONNECTION && !upgrading {
            let close = value
                .as_bytes()
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
            if close {
                *keep_alive = false;
            }
        } else {
            has_date |= *name == DATE;
            put_field(out, name, value);
        }
    }
    let length = if bodiless_status {
        None
    } else {
        length.flatten()
    };
    let framing = if bodiless_status {
        Out::None
    } else if status == StatusCode::NOT_MODIFIED {
        // The length a 200 would have had, when the instance said so.
        if let Some(n) = length {
            put_length(out, n);
        }
        Out::None
    } else if head_request {
        if let Some(n) = length.or(hint.exact().filter(|n| *n > 0)) {
            put_length(out, n);
        }
        Out::None
    } else if let Some(n) = length.or(hint.exact()) {
        put_length(out, n);
        Out::Length(n)
    } else if !http10 {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        Out::Chunked
    } else {
        *keep_alive = false;
        Out::Close
    };
    if !upgrading {
        if !*keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        } else if http10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    if !has_date {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(&date::now());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    framing
}

fn put_length(out: &mut BytesMut, n: u64) {
    out.extend_from_slice(b"content-length: ");
    push_decimal(out, n);
    out.extend_from_slice(b"\r\n");
}

/// Appends one `name: value` line.
fn put_field(out: &mut BytesMut, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The `Date` field, formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }

    pub(super) fn now() -> [u8; 29] {
        let now = SystemTime::now();
        let second = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with(|cached| {
            let mut cached = cached.borrow_mut();
            if cached.0 != second {
                let text = httpdate::fmt_http_date(now);
                if text.len() == 29 {
                    cached.1.copy_from_slice(text.as_bytes());
                }
                cached.0 = second;
            }
            cached.1
        })
    }
}

// ---- upgrades and hand-overs ---------------------------------------------

/// The client side of an upgrade, in the request's extensions: resolves
/// to the connection once the 101 has been written to it.
#[derive(Clone)]
pub struct ClientUpgrade(Arc<Mutex<Option<oneshot::Receiver<Upgraded>>>>);

impl ClientUpgrade {
    /// The connection after the 101; an error when the request ended
    /// otherwise.
    pub async fn connection(self) -> Result<Upgraded, &'static str> {
        let rx = self.0.lock().ok().and_then(|mut rx| rx.take());
        match rx {
            Some(rx) => rx
                .await
                .map_err(|_| "the client connection was not upgraded"),
            None => Err("the upgrade was already taken"),
        }
    }
}

/// What an upgraded connection is: any byte stream.
pub trait UpgradedIo: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> UpgradedIo for T {}

/// A client connection after a 101, with any bytes the client sent after
/// its upgrade request in front.
pub type Upgraded = Box<dyn UpgradedIo>;

/// A connection with bytes already read from it put back in front.
pub struct Rewind<I> {
    prefix: Bytes,
    io: I,
}

impl<I> Rewind<I> {
    pub fn new(prefix: Bytes, io: I) -> Rewind<I> {
        Rewind { prefix, io }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            let taken = self.prefix.split_to(n);
            buf.put_slice(&taken);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_of(
        status: u16,
        headers: &[(&str, &str)],
        hint: SizeHint,
        head: bool,
        http10: bool,
    ) -> (String, Out, bool) {
        let mut response = Response::new(());
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        for (k, v) in headers {
            response.headers_mut().append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let (parts, ()) = response.into_parts();
        let mut out = BytesMut::new();
        let mut keep_alive = true;
        let framing = encode_head(&mut out, &parts, hint, head, http10, &mut keep_alive);
        (
            String::from_utf8(out.to_vec()).unwrap(),
            framing,
            keep_alive,
        )
    }

    #[test]
    fn responses_are_framed_by_length_size_chunks_or_close() {
        let exact = SizeHint::with_exact(3);
        let unknown = SizeHint::default();
        let (text, framing, keep) = head_of(200, &[("content-length", "7")], unknown, false, false);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("content-length: 7\r\n") && text.contains("\r\ndate: "));
        assert_eq!((framing, keep), (Out::Length(7), true));

        let (text, framing, _) = head_of(200, &[], exact, false, false);
        assert!(text.contains("content-length: 3\r\n"));
        assert_eq!(framing, Out::Length(3));

        let (text, framing, _) = head_of(
            200,
            &[("transfer-encoding", "chunked")],
            unknown,
            false,
            false,
        );
        assert_eq!(text.matches("transfer-encoding").count(), 1, "{text}");
        assert_eq!(framing, Out::Chunked);

        let (text, framing, keep) = head_of(200, &[], unknown, false, true);
        assert!(!text.contains("transfer-encoding") && text.contains("connection: close\r\n"));
        assert_eq!((framing, keep), (Out::Close, false));

        let (text, framing, _) = head_of(204, &[("content-length", "0")], unknown, false, false);
        assert!(!text.contains("content-length"), "{text}");
        assert_eq!(framing, Out::None);

        let (text, framing, _) = head_of(200, &[("content-length", "10")], exact, true, false);
        assert!(text.contains("content-length: 10\r\n"));
        assert_eq!(framing, Out::None, "no body for HEAD");

        let (text, _, keep) = head_of(200, &[("connection", "close")], exact, false, false);
        assert_eq!(text.matches("connection").count(), 1);
        assert!(!keep);

        // HTTP/1.0 that asked for keep-alive is told it is kept; the
        // response's own Date stays.
        let (text, _, keep) = head_of(200, &[("date", "x")], exact, false, true);
        assert!(text.contains("date: x\r\n") && text.contains("connection: keep-alive\r\n"));
        assert!(keep);
    }

    #[test]
    fn chunks_are_written_in_hex_and_lengths_are_kept() {
        let mut out = BytesMut::new();
        let mut chunked = Out::Chunked;
        assert!(matches!(
            chunked.put(&mut out, Bytes::from(vec![b'a'; 26])),
            Put::Copied
        ));
        assert!(chunked.finish(&mut out, None));
        assert_eq!(
            &out[..],
            &b"1a\r\naaaaaaaaaaaaaaaaaaaaaaaaaa\r\n0\r\n\r\n"[..]
        );

        let mut out = BytesMut::new();
        let big = Bytes::from(vec![b'b'; INLINE + 1]);
        match chunked.put(&mut out, big.clone()) {
            Put::After(data, suffix) => assert_eq!((data, suffix), (big, &b"\r\n"[..])),
            _ => panic!("a large chunk is written from its own memory"),
        }
        assert_eq!(&out[..], format!("{:x}\r\n", INLINE + 1).as_bytes());

        let mut out = BytesMut::new();
        let mut length = Out::Length(4);
        assert!(matches!(
            length.put(&mut out, Bytes::from_static(b"abc")),
            Put::Copied
        ));
        assert!(!length.finish(&mut out, None), "one byte short");
        assert!(matches!(
            length.put(&mut out, Bytes::from_static(b"de")),
            Put::TooLong
        ));
    }

    /// Limits for a test connection; `hand_off` sets `hand_off_upgrades`.
    fn test_limits(hand_off: bool) -> ServerLimits {
        ServerLimits {
            header_read: Duration::from_secs(5),
            idle: Arc::new(|| None),
            pressure: None,
            max_head: 8192,
            hand_off_upgrades: hand_off,
            stream_drain_window: None,
        }
    }

    /// A service answering every request with an empty 200.
    fn empty_service() -> impl Service<
        Request<RequestBody>,
        Response = Response<http_body_util::Empty<Bytes>>,
        Error = Infallible,
    > {
        tower::service_fn(|_: Request<RequestBody>| async {
            Ok::<_, Infallible>(Response::new(http_body_util::Empty::<Bytes>::new()))
        })
    }

    #[test]
    fn a_connections_future_stays_small() {
        // What an idle connection costs beside its socket: this future
        // (boxed per connection) and the task around it. Rare paths are
        // boxed so they do not size it.
        let closing = CancellationToken::new();
        let draining = AtomicBool::new(false);
        let (io, _peer) = tokio::io::duplex(64);
        let service = empty_service();
        let limits = test_limits(false);
        let future = serve(io, service, limits, &closing, &draining);
        let size = std::mem::size_of_val(&future);
        // Measured sizes and their history: bench/README.md, "Memory per
        // connection".
        assert!(size <= 640, "{size} bytes");
    }

    #[test]
    fn a_streaming_responses_future_stays_small() {
        // What a long response (an event stream) holds while it waits
        // for its next bytes, beside the connection's own future.
        let (mut io, _peer) = tokio::io::duplex(64);
        let mut buf = BytesMut::new();
        let limits = test_limits(false);
        // Boxed, as axum's body is.
        let body = http_body_util::BodyExt::boxed_unsync(http_body_util::Empty::<Bytes>::new());
        let answer = Answer {
            body,
            out: BytesMut::new(),
            framing: Out::Chunked,
            keep_alive: true,
            switching: false,
            event_stream: true,
            feeder: None,
            upgrade: None,
        };
        let token = CancellationToken::new();
        let mut closing = pin!(token.cancelled());
        let future = write_response(answer, &mut io, &mut buf, &limits, closing.as_mut());
        let size = std::mem::size_of_val(&future);
        // 384 is one of mimalloc's size classes (the history of this
        // size: bench/README.md, "Idle streams and WebSockets after
        // trimming their futures").
        assert!(size <= 384, "{size} bytes");
    }

    #[tokio::test]
    async fn an_upgrade_request_is_handed_off_with_its_head_and_what_followed() {
        use tokio::io::AsyncReadExt;
        let closing = CancellationToken::new();
        let draining = AtomicBool::new(false);
        let (io, mut peer) = tokio::io::duplex(4096);
        let service = empty_service();
        let limits = test_limits(true);
        peer.write_all(
            b"GET /ws?x=1 HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\n\
              Upgrade: websocket\r\nX-Two: 1\r\nX-Two: 2\r\n\r\nNEXT",
        )
        .await
        .unwrap();
        let Ended::Upgrade(mut io, _) = serve(io, service, limits, &closing, &draining).await
        else {
            panic!("not handed off");
        };
        drop(peer);
        let mut text = String::new();
        io.read_to_string(&mut text).await.unwrap();
        assert_eq!(
            text,
            "GET /ws?x=1 HTTP/1.1\r\nhost: a\r\nconnection: keep-alive, Upgrade\r\n\
             upgrade: websocket\r\nx-two: 1\r\nx-two: 2\r\n\r\nNEXT"
        );
    }

    #[tokio::test]
    async fn a_rewound_connection_reads_its_prefix_first() {
        use tokio::io::AsyncReadExt;
        let (a, mut b) = tokio::io::duplex(64);
        b.write_all(b" world").await.unwrap();
        drop(b);
        let mut io = Rewind::new(Bytes::from_static(b"hello"), a);
        let mut text = String::new();
        io.read_to_string(&mut text).await.unwrap();
        assert_eq!(text, "hello world");
    }
}
