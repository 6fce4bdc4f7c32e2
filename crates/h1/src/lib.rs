//! Shoal's HTTP/1.1 codec (RFC 9112), sans-IO: bytes in, parts out.
//!
//! It knows nothing of sockets, pools or Shoal's own headers; the gateway
//! (`shoal-gateway`'s `h1` client and `h1server`) reads and writes the
//! bytes and calls this for every decision about where a message starts
//! and ends. That decision is the whole of request smuggling, so it lives
//! here alone, small enough to read, with its tests, a differential test
//! against hyper and httparse (`tests/differential.rs`) and fuzz targets
//! (`fuzz/`, [`fuzzing`]) whose corpus the tests replay.
//!
//! Strict where RFC 9112 says MUST, and where two readings could differ:
//!
//! - a request with both `Transfer-Encoding` and `Content-Length` is
//!   refused (as nginx does), as are conflicting or non-digit lengths;
//! - a request's transfer coding may only be `chunked`, once (501 for any
//!   other: the body is re-framed on its way, so another coding would be
//!   dropped, not applied); a response with another coding is invalid
//!   (nginx answers such an upstream with 502 too);
//! - chunk-size lines are 1–16 hex digits, extensions after `;`, CRLF:
//!   no sign, no spaces around the size, no bare LF; trailer lines end in
//!   CRLF;
//! - exactly one `Host` in HTTP/1.1 (at most one in 1.0); `*` only for
//!   OPTIONS; an absolute-form target replaces `Host` and may carry
//!   neither userinfo nor a scheme other than http(s); CONNECT is refused;
//! - obs-fold, bare CR, whitespace before a field's colon: refused (by
//!   httparse's strict defaults).

use bytes::{Buf, Bytes, BytesMut};

mod request;
mod response;

pub mod fuzzing;

pub use request::{parse_request, Refused, RequestHead};
pub use response::{parse_response, Parsed, ResponseHead};

/// The most header fields taken in a head.
pub const MAX_HEADERS: usize = 100;

/// The largest trailer section taken after a chunked body.
pub const MAX_TRAILERS: usize = 64 * 1024;

/// The longest chunk-size line taken (with its extensions).
pub const MAX_CHUNK_LINE: usize = 4096;

/// A message that is not valid HTTP/1.1, with the reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid(pub &'static str);

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for Invalid {}

/// What a head's fields say of its framing and its connection (RFC 9112
/// 6.1, 6.3 and 9.3), for requests and responses alike.
#[derive(Debug, Default)]
pub struct Framed {
    pub length: Option<u64>,
    /// A Transfer-Encoding field was there.
    pub encoded: bool,
    /// Its last coding is chunked (only the last counts).
    pub chunked: bool,
    /// Codings other than chunked were listed, or chunked more than once
    /// or not last (RFC 9112 6.1).
    pub other_codings: bool,
    /// `chunked` codings seen, over every Transfer-Encoding line.
    chunked_seen: u8,
    /// `Connection: close`.
    pub close: bool,
    /// `Connection: keep-alive` (HTTP/1.0).
    pub keep_alive: bool,
}

impl Framed {
    /// Takes one field; an invalid or conflicting Content-Length is an
    /// error, with the reason.
    #[inline]
    pub fn see(&mut self, name: &[u8], value: &[u8]) -> Result<(), &'static str> {
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
#[inline]
pub fn push_decimal(out: &mut BytesMut, mut n: u64) {
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
#[inline]
pub fn parse_length(v: &[u8]) -> Option<u64> {
    let v = v.trim_ascii();
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// How a body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// This many bytes are left.
    Length(u64),
    Chunked(Chunk),
    /// Until the peer closes the connection (responses only).
    Close,
}

/// Where a chunked body's decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunk {
    /// A chunk-size line is next.
    Size,
    /// This many bytes of chunk data are left.
    Data(u64),
    /// The CRLF after a chunk's data is next.
    DataEnd,
    /// Trailer lines (skipped) until an empty line; the bytes of trailer
    /// lines taken so far.
    Trailers(usize),
    Done,
}

/// One step of decoding the buffered bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Data(Bytes),
    /// More bytes must be read first.
    More,
    End,
}

/// Decodes what `buf` holds according to `framing`: body data is split
/// off `buf` (sharing its memory); what follows the body's end stays.
#[inline]
pub fn decode(framing: &mut Framing, buf: &mut BytesMut) -> Result<Step, Invalid> {
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
                        if buf.len() > MAX_CHUNK_LINE {
                            return Err(Invalid("chunk size line too long"));
                        }
                        return Ok(Step::More);
                    };
                    if eol > MAX_CHUNK_LINE {
                        return Err(Invalid("chunk size line too long"));
                    }
                    let size = chunk_size(&buf[..eol])?;
                    buf.advance(eol + 1);
                    *state = if size == 0 {
                        Chunk::Trailers(0)
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
                            return Err(Invalid("chunk data not followed by CRLF"));
                        }
                        return Ok(Step::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Invalid("chunk data not followed by CRLF"));
                    }
                    buf.advance(2);
                    *state = Chunk::Size;
                }
                Chunk::Trailers(taken) => {
                    let Some(eol) = buf.iter().position(|b| *b == b'\n') else {
                        if *taken + buf.len() > MAX_TRAILERS {
                            return Err(Invalid("trailers too large"));
                        }
                        return Ok(Step::More);
                    };
                    if eol == 0 || buf[eol - 1] != b'\r' {
                        return Err(Invalid("a trailer line must end in CRLF"));
                    }
                    if eol > 1 && !trailer_line_is_valid(&buf[..eol - 1]) {
                        return Err(Invalid("malformed trailer field"));
                    }
                    *taken += eol + 1;
                    if *taken > MAX_TRAILERS {
                        return Err(Invalid("trailers too large"));
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

/// A trailer line (without CRLF) is a field: a token, a colon, and a
/// value of visible characters, spaces and tabs (no bare CR, no obs-fold),
/// as a header field would have to be.
fn trailer_line_is_valid(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|b| *b == b':') else {
        return false;
    };
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    !name.is_empty()
        && name.iter().all(|b| is_tchar(*b))
        && value
            .iter()
            .all(|b| *b == b'\t' || *b == b' ' || (*b >= 0x21 && *b != 0x7f))
}

/// RFC 9110 5.6.2's `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The size of a chunk from its line (without the LF), as RFC 9112 7.1
/// has it and nothing looser: 1 to 16 hex digits, optional extensions
/// after `;` (whitespace allowed only before the `;`), then CR. A sign,
/// spaces around the size or a bare LF are refused: a parser that reads
/// them otherwise would see another message boundary (smuggling).
fn chunk_size(line: &[u8]) -> Result<u64, Invalid> {
    let line = line
        .strip_suffix(b"\r")
        .ok_or(Invalid("a chunk size line must end in CRLF"))?;
    let (digits, ext) = match line.iter().position(|b| *b == b';') {
        Some(i) => (line[..i].trim_ascii_end(), &line[i..]),
        None => (line, &b""[..]),
    };
    if digits.is_empty() || digits.len() > 16 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(Invalid("invalid chunk size"));
    }
    // Extensions are skipped, but a CR or a control byte in them would
    // end the line elsewhere for another reader.
    if ext
        .iter()
        .any(|b| *b == b'\r' || (*b < 0x20 && *b != b'\t') || *b == 0x7f)
    {
        return Err(Invalid("invalid chunk extension"));
    }
    Ok(digits.iter().fold(0u64, |n, d| {
        n * 16 + u64::from((*d as char).to_digit(16).unwrap_or(0))
    }))
}

#[cfg(test)]
mod tests;
