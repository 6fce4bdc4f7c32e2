//! HTTP/1.1 to an instance, driven by the request's own task: the
//! request is written and the response head read by the proxy's future,
//! and the response body is read from the socket by whoever polls it
//! (hyper's server connection, writing to the client). No task of its
//! own per upstream connection, no channel between tasks.
//!
//! Why not hyper's connection-level client, which the gateway used
//! before: it drives each connection in a task of its own, so a proxied
//! request went request task → (channel) → connection task → (oneshot)
//! → request task, and every body chunk through another channel; those
//! hops and their allocations were 15% of the gateway's instructions per
//! request (callgrind, ARCHITECTURE.md). nginx, HAProxy and Pingora all
//! read the upstream's response in the code that serves the client.
//!
//! The codec is RFC 9112's: requests in origin form with `Content-Length`
//! or chunked framing; responses framed by `Transfer-Encoding: chunked`,
//! `Content-Length` or the end of the connection (section 6.3), 1xx
//! interim responses skipped, no body for HEAD, 204 and 304. A
//! connection is kept for reuse only when its response ended cleanly,
//! nothing followed it, and neither side asked to close.
//!
//! The request body is written before the response is read. An instance
//! that answers early (a 413 before the whole upload) and closes makes a
//! write fail; the response is then read from what the connection holds
//! and passed on (`upstream::send`). Known limit: one that answers early
//! and neither reads on nor closes holds the upload until the request
//! timeout (504).

use crate::body::{BoxError, X_SHOAL_DEADLINE_MS};
use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::uri::Authority;
use http::Method;
use http_body::{Body as HttpBody, Frame, SizeHint};
pub(crate) use shoal_h1::{decode, push_decimal, Framing, Step};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest response head read (status line and headers).
const MAX_HEAD: usize = 64 * 1024;
/// Read buffer size.
const READ_CHUNK: usize = 8 * 1024;
/// Request bodies up to this size go in the same write as the head.
const INLINE_BODY: usize = 16 * 1024;

/// Why an exchange failed, in the terms that decide a retry.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    /// The first write failed: not a byte of the request left.
    #[error("the connection failed before the request was written")]
    NotWritten(#[source] io::Error),
    /// The instance closed the connection before a whole response head
    /// (the request may have reached it).
    #[error("the connection closed before a response arrived")]
    Closed,
    /// The connection broke after the request was (partly) written.
    #[error("the connection broke")]
    Io(#[source] io::Error),
    /// The request body (the client's) failed or broke its own length.
    #[error("the request body failed")]
    Body(#[source] BoxError),
    /// Not a valid HTTP/1.1 response.
    #[error("invalid response from the instance: {0}")]
    Invalid(&'static str),
}

/// The body of a request to send.
pub enum ReqBody {
    /// Known in full (buffered for replay, or empty).
    Bytes(Bytes),
    /// Streamed through once.
    Stream(crate::body::Body),
}

/// The transport of a connection to an instance: TCP, or TLS over it for
/// an `https://` instance (tokio-util's `Either` reads and writes
/// whichever it holds).
pub(crate) type Stream =
    tokio_util::either::Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// The TCP socket under a [`Stream`].
fn tcp(stream: &Stream) -> &TcpStream {
    match stream {
        tokio_util::either::Either::Left(s) => s,
        tokio_util::either::Either::Right(s) => s.get_ref().0,
    }
}

/// An open connection to one instance.
pub(crate) struct Conn {
    io: Stream,
    /// Read and not yet used; empty between exchanges.
    buf: BytesMut,
    /// The instance's address (moved along with the connection, never
    /// cloned per request).
    pub(crate) authority: Authority,
    /// When it was made or last taken from the pool.
    pub(crate) taken_at: std::time::Instant,
}

/// A request's header lines (`name: value\r\n`), written once and sent
/// with every attempt. Framing headers are the codec's own, never here.
pub(crate) struct Fields {
    lines: BytesMut,
    has_host: bool,
}

impl Fields {
    pub(crate) fn with_capacity(n: usize) -> Fields {
        Fields {
            lines: BytesMut::with_capacity(n),
            has_host: false,
        }
    }

    /// Adds a line; the value's bytes were checked by `HeaderValue`.
    pub(crate) fn push(&mut self, name: &HeaderName, value: &[u8]) {
        debug_assert!(*name != CONTENT_LENGTH && *name != TRANSFER_ENCODING);
        self.has_host |= *name == http::header::HOST;
        self.lines.extend_from_slice(name.as_str().as_bytes());
        self.lines.extend_from_slice(b": ");
        self.lines.extend_from_slice(value);
        self.lines.extend_from_slice(b"\r\n");
    }
}

/// The head of a request to send.
pub(crate) struct ReqHead<'a> {
    pub method: &'a Method,
    /// The origin form: path and query.
    pub target: &'a str,
    pub fields: &'a Fields,
    /// What is left of the request's deadline (`x-shoal-deadline-ms`).
    pub deadline_ms: u64,
    /// The client's `Content-Length`, if it sent one.
    pub declared_length: Option<u64>,
}

impl Conn {
    pub(crate) fn new(io: Stream, authority: Authority, now: std::time::Instant) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            authority,
            taken_at: now,
        }
    }

    /// Whether an idle connection can take a request: the instance has not
    /// closed it and sent nothing unasked. Costs no system call unless the
    /// socket became readable while idle.
    pub(crate) fn is_usable(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let tcp = tcp(&self.io);
        match tcp.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Readable: an end of stream or stray bytes (on TLS, most
            // likely a close_notify) make it unusable; WouldBlock means
            // the readiness was stale (and clears it). Peeked, not read,
            // so a TLS stream is left whole.
            Poll::Ready(Ok(())) => {
                let mut byte = [0u8; 1];
                let mut buf = tokio::io::ReadBuf::new(&mut byte);
                matches!(tcp.poll_peek(&mut cx, &mut buf), Poll::Pending)
            }
        }
    }

    /// Writes the request. A `NotWritten` error hands the body back: the
    /// request never left and can go on another connection.
    pub(crate) async fn write_request(
        &mut self,
        head: &ReqHead<'_>,
        body: ReqBody,
    ) -> Result<(), (H1Error, Option<ReqBody>)> {
        let mut out = BytesMut::with_capacity(
            512 + match &body {
                ReqBody::Bytes(b) if b.len() <= INLINE_BODY => b.len(),
                _ => 0,
            },
        );
        out.extend_from_slice(head.method.as_str().as_bytes());
        out.extend_from_slice(b" ");
        out.extend_from_slice(head.target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        out.extend_from_slice(&head.fields.lines);
        if !head.fields.has_host {
            out.extend_from_slice(b"host: ");
            out.extend_from_slice(self.authority.as_str().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(X_SHOAL_DEADLINE_MS.as_str().as_bytes());
        out.extend_from_slice(b": ");
        push_decimal(&mut out, head.deadline_ms);
        out.extend_from_slice(b"\r\n");
        let declared = head.declared_length;
        // What follows the head: the framing, and a small body inline.
        let framing = match &body {
            ReqBody::Bytes(bytes) => {
                if !bytes.is_empty() || declared.is_some() || method_has_body(head.method) {
                    Some(bytes.len() as u64)
                } else {
                    None
                }
            }
            ReqBody::Stream(b) => declared.or_else(|| b.size_hint().exact()),
        };
        let chunked = matches!(body, ReqBody::Stream(_)) && framing.is_none();
        match framing {
            Some(n) => {
                out.extend_from_slice(b"content-length: ");
                push_decimal(&mut out, n);
                out.extend_from_slice(b"\r\n\r\n");
            }
            None if chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n"),
            None => out.extend_from_slice(b"\r\n"),
        }
        let (rest, inline) = match body {
            ReqBody::Bytes(bytes) if bytes.len() <= INLINE_BODY => {
                out.extend_from_slice(&bytes);
                (None, Some(bytes))
            }
            other => (Some(other), None),
        };
        // The first write decides whether anything left; if nothing did,
        // the body goes back to the caller whole.
        let written = match self.io.write(&out).await {
            Ok(n) if n > 0 => n,
            Ok(_) => {
                let e = io::Error::new(io::ErrorKind::WriteZero, "the connection took no bytes");
                return Err((H1Error::NotWritten(e), rest.or(inline.map(ReqBody::Bytes))));
            }
            Err(e) => return Err((H1Error::NotWritten(e), rest.or(inline.map(ReqBody::Bytes)))),
        };
        let io_err = |e| (H1Error::Io(e), None);
        self.io.write_all(&out[written..]).await.map_err(io_err)?;
        match rest {
            None => {}
            Some(ReqBody::Bytes(bytes)) => self.io.write_all(&bytes).await.map_err(io_err)?,
            Some(ReqBody::Stream(body)) => self
                .stream_body(body, framing, chunked)
                .await
                .map_err(|e| (e, None))?,
        }
        // TLS may hold written bytes back until flushed (on TCP a flush
        // does nothing): the response is read only after this.
        self.io.flush().await.map_err(io_err)
    }

    async fn stream_body(
        &mut self,
        mut body: crate::body::Body,
        length: Option<u64>,
        chunked: bool,
    ) -> Result<(), H1Error> {
        use http_body_util::BodyExt;
        let mut sent: u64 = 0;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(H1Error::Body)?;
            let Ok(data) = frame.into_data() else {
                // Trailers: HTTP/1.1 carries them only after chunks; the
                // instance gets none (as hyper's client did).
                continue;
            };
            if data.is_empty() {
                continue;
            }
            sent += data.len() as u64;
            if length.is_some_and(|n| sent > n) {
                return Err(H1Error::Body(
                    "the request body is longer than its Content-Length".into(),
                ));
            }
            if chunked {
                let mut line = format!("{:x}\r\n", data.len()).into_bytes();
                line.extend_from_slice(&data);
                line.extend_from_slice(b"\r\n");
                self.io.write_all(&line).await.map_err(H1Error::Io)?;
            } else {
                self.io.write_all(&data).await.map_err(H1Error::Io)?;
            }
        }
        if length.is_some_and(|n| sent < n) {
            return Err(H1Error::Body(
                "the request body ended before its Content-Length".into(),
            ));
        }
        if chunked {
            self.io.write_all(b"0\r\n\r\n").await.map_err(H1Error::Io)?;
        }
        Ok(())
    }

    /// Reads until a final response head; interim (1xx) ones are skipped.
    pub(crate) async fn read_head(
        &mut self,
        method: &Method,
    ) -> Result<(http::response::Parts, Framing, bool), H1Error> {
        loop {
            if !self.buf.is_empty() {
                if let Some(parsed) = self.parse_head(method)? {
                    match parsed {
                        Some(head) => return Ok(head),
                        None => continue, // a 1xx, skipped
                    }
                }
                if self.buf.len() > MAX_HEAD {
                    return Err(H1Error::Invalid("response head too large"));
                }
            }
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(READ_CHUNK);
            }
            match std::future::poll_fn(|cx| {
                tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
            })
            .await
            {
                Ok(0) if self.buf.is_empty() => return Err(H1Error::Closed),
                Ok(0) => {
                    return Err(H1Error::Invalid(
                        "the connection closed within the response head",
                    ))
                }
                Ok(_) => {}
                Err(e) => return Err(H1Error::Io(e)),
            }
        }
    }

    /// Parses a head from the buffer: `Ok(None)` when it is not whole yet,
    /// `Ok(Some(None))` for a skipped 1xx.
    #[allow(clippy::type_complexity)]
    fn parse_head(
        &mut self,
        method: &Method,
    ) -> Result<Option<Option<(http::response::Parts, Framing, bool)>>, H1Error> {
        match shoal_h1::parse_response(&mut self.buf, method) {
            Ok(None) => Ok(None),
            Ok(Some(shoal_h1::Parsed::Interim(_))) => Ok(Some(None)),
            Ok(Some(shoal_h1::Parsed::Final(h))) => {
                Ok(Some(Some((h.parts, h.framing, h.keep_alive))))
            }
            Err(e) => Err(H1Error::Invalid(e.0)),
        }
    }
}

/// Methods whose requests carry a body by definition: an empty one is
/// sent as `Content-Length: 0`, as clients do.
fn method_has_body(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH)
}

/// Where a finished connection goes: the thread's pool (`upstream.rs`),
/// under these settings and this instance id.
pub(crate) type PutBack = (crate::ClientSettings, usize);

/// A response body read from the connection by whoever polls it; the
/// connection goes to `put_back` when the body ended cleanly.
pub(crate) struct H1Body {
    /// Data decoded and not yet handed out.
    ready: Option<Bytes>,
    /// The connection, while the body has more to read.
    reading: Option<Reading>,
}

struct Reading {
    conn: Conn,
    framing: Framing,
    keep_alive: bool,
    put_back: PutBack,
}

impl H1Body {
    /// The body of a response whose head was just read from `conn`. What
    /// the buffer already holds is decoded at once; a body that ends
    /// within it frees the connection before the response is returned.
    pub(crate) fn new(
        mut conn: Conn,
        mut framing: Framing,
        keep_alive: bool,
        put_back: PutBack,
    ) -> H1Body {
        let mut ready = None;
        if let Framing::Length(n) = framing {
            if n as usize <= conn.buf.len() {
                if n > 0 {
                    ready = Some(conn.buf.split_to(n as usize).freeze());
                }
                framing = Framing::Length(0);
            }
        }
        let mut body = H1Body {
            ready,
            reading: Some(Reading {
                conn,
                framing,
                keep_alive,
                put_back,
            }),
        };
        if framing == Framing::Length(0) {
            body.finish();
        }
        body
    }

    /// The body ended cleanly: the connection goes back when it may.
    fn finish(&mut self) {
        if let Some(r) = self.reading.take() {
            if r.keep_alive && r.conn.buf.is_empty() {
                crate::upstream::put_back(r.put_back.0, r.put_back.1, r.conn);
            }
        }
    }
}

impl HttpBody for H1Body {
    type Data = Bytes;
    type Error = H1Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, H1Error>>> {
        let this = &mut *self;
        if let Some(data) = this.ready.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        loop {
            let Some(r) = this.reading.as_mut() else {
                return Poll::Ready(None);
            };
            let step = match decode(&mut r.framing, &mut r.conn.buf) {
                Ok(step) => step,
                Err(e) => {
                    this.reading = None;
                    return Poll::Ready(Some(Err(H1Error::Invalid(e.0))));
                }
            };
            match step {
                Step::Data(data) => {
                    // The end may already be buffered (a chunked body's
                    // last chunk): finish now, so `is_end_stream` says so
                    // and the connection goes back at once.
                    let ended = match r.framing {
                        Framing::Length(n) => n == 0,
                        Framing::Chunked(_) => match decode(&mut r.framing, &mut r.conn.buf) {
                            Ok(Step::End) => true,
                            // More data already here: handed out next.
                            Ok(Step::Data(next)) => {
                                this.ready = Some(next);
                                false
                            }
                            // Reported by the next poll.
                            Ok(Step::More) | Err(_) => false,
                        },
                        Framing::Close => false,
                    };
                    if ended {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Step::End => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Step::More => {
                    let read = if r.conn.buf.is_empty() {
                        // Nothing buffered: read through the stack and
                        // keep only what came, so a body that waits (an
                        // event stream passing through) holds no read
                        // buffer while it waits (the largest block per
                        // stream in DHAT; bench/README.md, "Memory per
                        // connection"). The old allocation, shared with
                        // the data handed out, is let go with it.
                        r.conn.buf = BytesMut::new();
                        let mut stack = [0u8; READ_CHUNK];
                        let mut rb = tokio::io::ReadBuf::new(&mut stack);
                        match Pin::new(&mut r.conn.io).poll_read(cx, &mut rb) {
                            Poll::Ready(Ok(())) => {
                                r.conn.buf.extend_from_slice(rb.filled());
                                Poll::Ready(Ok(rb.filled().len()))
                            }
                            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                            Poll::Pending => Poll::Pending,
                        }
                    } else {
                        if r.conn.buf.capacity() - r.conn.buf.len() < 1024 {
                            r.conn.buf.reserve(READ_CHUNK);
                        }
                        tokio_util::io::poll_read_buf(Pin::new(&mut r.conn.io), cx, &mut r.conn.buf)
                    };
                    match read {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(0)) => {
                            if r.framing == Framing::Close {
                                // The body's end; the connection's too.
                                this.reading = None;
                                return Poll::Ready(None);
                            }
                            this.reading = None;
                            return Poll::Ready(Some(Err(H1Error::Invalid(
                                "the connection closed before the response body ended",
                            ))));
                        }
                        Poll::Ready(Ok(_)) => {}
                        Poll::Ready(Err(e)) => {
                            this.reading = None;
                            return Poll::Ready(Some(Err(H1Error::Io(e))));
                        }
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ready.is_none() && self.reading.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        let ready = self.ready.as_ref().map_or(0, |b| b.len() as u64);
        match &self.reading {
            None => SizeHint::with_exact(ready),
            Some(Reading {
                framing: Framing::Length(n),
                ..
            }) => SizeHint::with_exact(ready + n),
            Some(_) => {
                let mut hint = SizeHint::new();
                hint.set_lower(ready);
                hint
            }
        }
    }
}
