//! Response heads (RFC 9112 4, 6.3).

use crate::{Chunk, Framed, Framing, Invalid, MAX_HEADERS};
use bytes::{Buf, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

/// A final response head, parsed.
#[derive(Debug)]
pub struct ResponseHead {
    /// Version is always HTTP/1.1 here (the next hop's own).
    pub parts: http::response::Parts,
    pub framing: Framing,
    /// The connection may carry another exchange after this one.
    pub keep_alive: bool,
}

/// What [`parse_response`] found at the front of the buffer.
#[derive(Debug)]
pub enum Parsed {
    /// A 1xx other than 101, taken off the buffer: read on.
    Interim(StatusCode),
    Final(ResponseHead),
}

/// Parses a response head from `buf` for a request with `method`:
/// `Ok(None)` when it is not whole yet. A head, interim or final, is
/// split off `buf`; header values share its memory.
///
/// Framing by RFC 9112 6.3: none for HEAD, 204 and 304; chunked when
/// `Transfer-Encoding` ends in it (with a `Content-Length` beside it the
/// connection is not trusted again); else `Content-Length`; else until
/// the connection closes. A transfer coding other than `chunked` is
/// invalid: it could not be passed on re-framed, and a coding dropped
/// silently would hand the client bytes it cannot read.
/// `101 Switching Protocols` is invalid here: upgrades are the caller's.
pub fn parse_response(buf: &mut BytesMut, method: &Method) -> Result<Option<Parsed>, Invalid> {
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut res,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Invalid("too many response headers")),
        Err(_) => return Err(Invalid("malformed response head")),
    };
    let code = res.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| Invalid("invalid status code"))?;
    if status.is_informational() {
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Invalid("unexpected 101 Switching Protocols"));
        }
        buf.advance(len);
        return Ok(Some(Parsed::Interim(status)));
    }
    let http10 = res.version == Some(0);
    let base = buf.as_ptr() as usize;
    // Where each name and value lies in the head, to be cut from it once
    // it is split off the buffer (values share its memory).
    let mut spans: smallvec::SmallVec<[[u32; 4]; 24]> = smallvec::SmallVec::new();
    let mut framed = Framed::default();
    for h in res.headers.iter() {
        let name = h.name.as_bytes();
        framed.see(name, h.value).map_err(Invalid)?;
        // A head is bounded by the caller's buffer limit, far below 4 GiB.
        let at = |part: &[u8]| (part.as_ptr() as usize - base) as u32;
        spans.push([
            at(name),
            name.len() as u32,
            at(h.value),
            h.value.len() as u32,
        ]);
    }
    let no_body = *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    if framed.encoded && framed.other_codings && !no_body {
        return Err(Invalid(
            "a response's Transfer-Encoding may only be chunked",
        ));
    }
    let head = buf.split_to(len).freeze();
    // Room for one more field the caller adds (a request id): a map
    // filled to its capacity grows (and rehashes) on the next insert.
    let mut map = HeaderMap::with_capacity(spans.len() + 1);
    for span in spans {
        let [name_at, name_len, value_at, value_len] = span.map(|n| n as usize);
        let name = HeaderName::from_bytes(&head[name_at..name_at + name_len])
            .map_err(|_| Invalid("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(value_at..value_at + value_len))
            .map_err(|_| Invalid("invalid header value"))?;
        map.append(name, value);
    }
    let Framed {
        length,
        encoded,
        chunked,
        ..
    } = framed;
    let mut close = framed.close || (http10 && !framed.keep_alive);
    let framing = if no_body {
        Framing::Length(0)
    } else if encoded {
        // Both headers: Transfer-Encoding wins, and the connection is not
        // trusted again (RFC 9112 6.3).
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
    Ok(Some(Parsed::Final(ResponseHead {
        parts,
        framing,
        keep_alive: !close,
    })))
}

#[cfg(test)]
#[path = "response_tests.rs"]
mod tests;
