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
use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::uri::Authority;
use http::{Method, StatusCode, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The largest response head read (status line and headers).
const MAX_HEAD: usize = 64 * 1024;
/// The most response headers taken.
const MAX_HEADERS: usize = 100;
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
        let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut res,
            &self.buf,
            &mut headers,
        ) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(H1Error::Invalid("too many response headers"))
            }
            Err(_) => return Err(H1Error::Invalid("malformed response head")),
        };
        let code = res.code.unwrap_or(0);
        let status =
            StatusCode::from_u16(code).map_err(|_| H1Error::Invalid("invalid status code"))?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(H1Error::Invalid("unexpected 101 Switching Protocols"));
            }
            self.buf.advance(len);
            return Ok(Some(None));
        }
        let http10 = res.version == Some(0);
        let base = self.buf.as_ptr() as usize;
        // Where each name and value lies in the head, to be cut from it
        // once it is split off the buffer (values share its memory).
        let mut spans: smallvec::SmallVec<[[u32; 4]; 24]> = smallvec::SmallVec::new();
        let mut framed = Framed::default();
        for h in res.headers.iter() {
            let name = h.name.as_bytes();
            framed.see(name, h.value).map_err(H1Error::Invalid)?;
            // Within MAX_HEAD, so the offsets fit.
            let at = |part: &[u8]| (part.as_ptr() as usize - base) as u32;
            spans.push([
                at(name),
                name.len() as u32,
                at(h.value),
                h.value.len() as u32,
            ]);
        }
        let head = self.buf.split_to(len).freeze();
        // Room for the `x-request-id` the proxy adds: a map filled to its
        // capacity grows (and rehashes) on the next insert.
        let mut map = HeaderMap::with_capacity(spans.len() + 1);
        for span in spans {
            let [name_at, name_len, value_at, value_len] = span.map(|n| n as usize);
            let name = HeaderName::from_bytes(&head[name_at..name_at + name_len])
                .map_err(|_| H1Error::Invalid("invalid header name"))?;
            let value = HeaderValue::from_maybe_shared(head.slice(value_at..value_at + value_len))
                .map_err(|_| H1Error::Invalid("invalid header value"))?;
            map.append(name, value);
        }
        let Framed {
            length,
            encoded,
            chunked,
            ..
        } = framed;
        let mut close = framed.close || (http10 && !framed.keep_alive);
        let framing = if *method == Method::HEAD
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            Framing::Length(0)
        } else if encoded {
            // Both headers: Transfer-Encoding wins, and the connection
            // is not trusted again (RFC 9112 6.3).
            if length.is_some() {
                close = true;
            }
            if chunked {
                Framing::Chunked(Chunk::Size)
            } else {
                Framing::Close
            }
        } else {
            match length {
                Some(n) => Framing::Length(n),
                None => Framing::Close,
            }
        };
        if matches!(framing, Framing::Close) {
            close = true;
        }
        let (mut parts, ()) = http::Response::new(()).into_parts();
        parts.status = status;
        parts.version = Version::HTTP_11;
        parts.headers = map;
        Ok(Some(Some((parts, framing, !close))))
    }
}

/// What a head's fields say of its framing and its connection (RFC 9112
/// 6.1, 6.3 and 9.3), for both codecs.
#[derive(Debug, Default)]
pub(crate) struct Framed {
    pub(crate) length: Option<u64>,
    /// A Transfer-Encoding field was there.
    pub(crate) encoded: bool,
    /// Its last coding is chunked (only the last counts).
    pub(crate) chunked: bool,
    /// Codings other than chunked were listed, or chunked more than once
    /// or not last: a request so framed is refused (RFC 9112 6.1).
    pub(crate) other_codings: bool,
    /// `chunked` codings seen, over every Transfer-Encoding line.
    chunked_seen: u8,
    /// `Connection: close`.
    pub(crate) close: bool,
    /// `Connection: keep-alive` (HTTP/1.0).
    pub(crate) keep_alive: bool,
}

impl Framed {
    /// Takes one field; an invalid or conflicting Content-Length is an
    /// error, with the reason.
    pub(crate) fn see(&mut self, name: &[u8], value: &[u8]) -> Result<(), &'static str> {
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_length(value).ok_or("invalid Content-Length")?;
            if self.length.is_some_and(|m| m != n) {
                return Err("conflicting Content-Length values");
            }
            self.length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.encoded = true;
            for coding in value.split(|b| *b == b',') {
                let coding = coding.trim_ascii();
                if coding.is_empty() {
                    continue;
                }
                if coding.eq_ignore_ascii_case(b"chunked") {
                    self.chunked_seen = self.chunked_seen.saturating_add(1);
                } else {
                    self.other_codings = true;
                }
            }
            self.other_codings |= self.chunked_seen > 1;
            self.chunked = value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                self.close |= token.eq_ignore_ascii_case(b"close");
                self.keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
            }
        }
        Ok(())
    }
}

/// Appends `n` in decimal (without the formatting machinery).
pub(crate) fn push_decimal(out: &mut BytesMut, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// Parses a `Content-Length` value: ASCII digits only (RFC 9110 8.6).
pub(crate) fn parse_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// Methods whose requests carry a body by definition: an empty one is
/// sent as `Content-Length: 0`, as clients do.
fn method_has_body(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH)
}

/// How the response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunk),
    /// Until the instance closes the connection.
    Close,
}

/// Where a chunked body's decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// A chunk-size line is next.
    Size,
    /// This many bytes of chunk data are left.
    Data(u64),
    /// The CRLF after a chunk's data is next.
    DataEnd,
    /// Trailer lines (skipped) until an empty line.
    Trailers,
    Done,
}

/// One step of decoding the buffered bytes.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Data(Bytes),
    /// More bytes must be read first.
    More,
    End,
}

/// Decodes what `buf` holds according to `framing`.
pub(crate) fn decode(framing: &mut Framing, buf: &mut BytesMut) -> Result<Step, H1Error> {
    match framing {
        Framing::Length(0) => Ok(Step::End),
        Framing::Length(left) => {
            if buf.is_empty() {
                return Ok(Step::More);
            }
            let n = (*left).min(buf.len() as u64) as usize;
            *left -= n as u64;
            Ok(Step::Data(buf.split_to(n).freeze()))
        }
        Framing::Close => {
            if buf.is_empty() {
                return Ok(Step::More);
            }
            Ok(Step::Data(buf.split().freeze()))
        }
        Framing::Chunked(state) => loop {
            match state {
                Chunk::Done => return Ok(Step::End),
                Chunk::Size => {
                    let Some(eol) = buf.iter().position(|b| *b == b'\n') else {
                        if buf.len() > 4096 {
                            return Err(H1Error::Invalid("chunk size line too long"));
                        }
                        return Ok(Step::More);
                    };
                    let size = chunk_size(&buf[..eol])?;
                    buf.advance(eol + 1);
                    *state = if size == 0 {
                        Chunk::Trailers
                    } else {
                        Chunk::Data(size)
                    };
                }
                Chunk::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Step::More);
                    }
                    let n = (*left).min(buf.len() as u64) as usize;
                    *left -= n as u64;
                    let data = buf.split_to(n).freeze();
                    if *left == 0 {
                        *state = Chunk::DataEnd;
                    }
                    return Ok(Step::Data(data));
                }
                Chunk::DataEnd => {
                    if buf.len() < 2 {
                        if buf.first().is_some_and(|b| *b != b'\r') {
                            return Err(H1Error::Invalid("chunk data not followed by CRLF"));
                        }
                        return Ok(Step::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(H1Error::Invalid("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    *state = Chunk::Size;
                }
                Chunk::Trailers => {
                    let Some(eol) = buf.iter().position(|b| *b == b'\n') else {
                        if buf.len() > MAX_HEAD {
                            return Err(H1Error::Invalid("trailers too large"));
                        }
                        return Ok(Step::More);
                    };
                    if eol == 0 || buf[eol - 1] != b'\r' {
                        return Err(H1Error::Invalid("a trailer line must end in CRLF"));
                    }
                    let empty = eol == 1;
                    buf.advance(eol + 1);
                    if empty {
                        *state = Chunk::Done;
                    }
                }
            }
        },
    }
}

/// The size of a chunk from its line (without the LF), as RFC 9112 7.1
/// has it and nothing looser: 1 to 16 hex digits, optional extensions
/// after `;` (whitespace allowed only before the `;`), then CR. A sign,
/// spaces around the size or a bare LF are refused: a parser that reads
/// them otherwise would see another message boundary (smuggling).
fn chunk_size(line: &[u8]) -> Result<u64, H1Error> {
    let line = line
        .strip_suffix(b"\r")
        .ok_or(H1Error::Invalid("a chunk size line must end in CRLF"))?;
    let digits = match line.iter().position(|b| *b == b';') {
        Some(i) => line[..i].trim_ascii_end(),
        None => line,
    };
    if digits.is_empty() || digits.len() > 16 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(H1Error::Invalid("invalid chunk size"));
    }
    Ok(digits.iter().fold(0u64, |n, d| {
        n * 16 + u64::from((*d as char).to_digit(16).unwrap_or(0))
    }))
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
                    return Poll::Ready(Some(Err(e)));
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
                    if r.conn.buf.capacity() - r.conn.buf.len() < 1024 {
                        r.conn.buf.reserve(READ_CHUNK);
                    }
                    match tokio_util::io::poll_read_buf(
                        Pin::new(&mut r.conn.io),
                        cx,
                        &mut r.conn.buf,
                    ) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(
        framing: Framing,
        wire: &[u8],
        split: usize,
    ) -> Result<(Vec<u8>, usize), H1Error> {
        // Feeds the bytes in pieces of `split`, as reads would.
        let mut framing = framing;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match decode(&mut framing, &mut buf)? {
                Step::Data(d) => out.extend_from_slice(&d),
                Step::End => return Ok((out, buf.len())),
                Step::More => {
                    if fed == wire.len() {
                        return Err(H1Error::Closed);
                    }
                    let end = (fed + split).min(wire.len());
                    buf.extend_from_slice(&wire[fed..end]);
                    fed = end;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_boundaries() {
        let wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\n";
        for split in [1, 2, 3, 7, 64] {
            let (body, left) = decode_all(Framing::Chunked(Chunk::Size), wire, split).unwrap();
            assert_eq!(body, b"hello, world", "split {split}");
            assert_eq!(left, 0);
        }
    }

    #[test]
    fn bytes_after_a_body_are_left_in_the_buffer() {
        let (body, left) = decode_all(Framing::Length(3), b"abcdef", 64).unwrap();
        assert_eq!(body, b"abc");
        assert_eq!(left, 3);
        let (body, left) = decode_all(
            Framing::Chunked(Chunk::Size),
            b"1\r\na\r\n0\r\n\r\nHTTP",
            64,
        )
        .unwrap();
        assert_eq!(body, b"a");
        assert_eq!(left, 4);
    }

    /// The security review's sixth finding on chunked bodies: chunk sizes
    /// `+5` and ` 5 ` and bare-LF lines were taken; a parser that reads
    /// them otherwise ends the body elsewhere (smuggling). Each form, at
    /// every read boundary, and the strict forms that must stay accepted.
    #[test]
    fn chunked_framing_is_as_strict_as_rfc_9112() {
        let refused: [&[u8]; 10] = [
            b"+5\r\nhello\r\n0\r\n\r\n",
            b" 5 \r\nhello\r\n0\r\n\r\n",
            b"5 \r\nhello\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"5\r\nhello\r\n0\n\r\n",
            b"5\r\nhello\r\n0\r\n\n",
            b"11111111111111111\r\n",
        ];
        for wire in refused {
            for split in [1, 3, 64] {
                assert!(
                    matches!(
                        decode_all(Framing::Chunked(Chunk::Size), wire, split),
                        Err(H1Error::Invalid(_))
                    ),
                    "{:?} split {split}",
                    String::from_utf8_lossy(wire)
                );
            }
        }
        let accepted: [&[u8]; 4] = [
            b"5\r\nhello\r\n0\r\n\r\n",
            b"5 ;ext=1\r\nhello\r\n0\r\n\r\n",
            b"5;a=b;c\r\nhello\r\n0\r\nx-t: 1\r\n\r\n",
            b"00005\r\nhello\r\n000\r\n\r\n",
        ];
        for wire in accepted {
            for split in [1, 3, 64] {
                let (body, _) = decode_all(Framing::Chunked(Chunk::Size), wire, split)
                    .unwrap_or_else(|e| panic!("{:?}: {e:?}", String::from_utf8_lossy(wire)));
                assert_eq!(body, b"hello");
            }
        }
    }

    #[test]
    fn bad_chunk_framing_is_an_error() {
        for wire in [
            &b"zz\r\nab\r\n0\r\n\r\n"[..],
            b"2\r\nabX\r\n0\r\n\r\n",
            b"\r\n",
        ] {
            assert!(matches!(
                decode_all(Framing::Chunked(Chunk::Size), wire, 64),
                Err(H1Error::Invalid(_))
            ));
        }
    }

    fn head(
        wire: &str,
        method: Method,
    ) -> Result<Option<(http::response::Parts, Framing, bool)>, H1Error> {
        // Needs a socket for `Conn`; the parser only touches the buffer.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let io = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let mut conn = Conn::new(
                tokio_util::either::Either::Left(io),
                Authority::from_static("127.0.0.1"),
                std::time::Instant::now(),
            );
            conn.buf.extend_from_slice(wire.as_bytes());
            loop {
                match conn.parse_head(&method)? {
                    None => return Ok(None),
                    Some(None) => continue,
                    Some(Some(h)) => return Ok(Some(h)),
                }
            }
        })
    }

    #[test]
    fn response_framing_follows_rfc_9112() {
        let (p, f, keep) = head(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-a: b\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .expect("a whole head");
        assert_eq!(p.status, 200);
        assert_eq!(p.headers["x-a"], "b");
        assert_eq!((f, keep), (Framing::Length(5), true));
        // (head, request method) → (framing, connection kept)
        let cases = [
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 5\r\n\r\n",
                Method::GET,
                Framing::Chunked(Chunk::Size),
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\n\r\n",
                Method::GET,
                Framing::Close,
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                Method::HEAD,
                Framing::Length(0),
                true,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n",
                Method::GET,
                Framing::Length(0),
                true,
            ),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n",
                Method::GET,
                Framing::Length(1),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\n",
                Method::GET,
                Framing::Length(1),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n",
                Method::GET,
                Framing::Length(1),
                false,
            ),
        ];
        for (wire, method, framing, kept) in cases {
            let (_, f, keep) = head(wire, method).unwrap().expect("a whole head");
            assert_eq!((f, keep), (framing, kept), "{wire:?}");
        }
        assert!(head("HTTP/1.1 200 OK\r\ncontent-le", Method::GET)
            .unwrap()
            .is_none());
        for bad in [
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "SMTP hello\r\n\r\n",
        ] {
            assert!(
                matches!(head(bad, Method::GET), Err(H1Error::Invalid(_))),
                "{bad:?}"
            );
        }
    }
}
