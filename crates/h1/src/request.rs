//! Request heads (RFC 9112 2–3, 6).

use crate::{Chunk, Framed, Framing, MAX_HEADERS};
use bytes::BytesMut;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version};

/// A request head, parsed.
#[derive(Debug)]
pub struct RequestHead {
    pub parts: http::request::Parts,
    /// `None`: no body.
    pub framing: Option<Framing>,
    /// The connection may carry another request after this one.
    pub keep_alive: bool,
    /// `Expect: 100-continue` (HTTP/1.1 only).
    pub expect_continue: bool,
}

/// Why a request head is refused (the connection is closed after).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// 431: past the head size limit or the header count.
    TooLarge,
    /// 400, with the reason.
    Bad(&'static str),
    /// 405: CONNECT (no tunnels here).
    Connect,
    /// 501: a transfer coding this codec does not decode.
    NotImplemented(&'static str),
}

/// Parses a head from `buf`: `Ok(None)` when it is not whole yet. The
/// head is split off `buf` (a pipelined request after it stays); header
/// values and the target share its memory.
pub fn parse_request(buf: &mut BytesMut, max_head: usize) -> Result<Option<RequestHead>, Refused> {
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > max_head => return Err(Refused::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Refused::TooLarge),
        Err(httparse::Error::Version) => return Err(Refused::Bad("unsupported HTTP version")),
        Err(_) => return Err(Refused::Bad("malformed request head")),
    };
    if len > max_head {
        return Err(Refused::TooLarge);
    }
    let method = Method::from_bytes(req.method.unwrap_or_default().as_bytes())
        .map_err(|_| Refused::Bad("invalid method"))?;
    if method == Method::CONNECT {
        return Err(Refused::Connect);
    }
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let base = buf.as_ptr() as usize;
    let at = |part: &[u8]| part.as_ptr() as usize - base;
    let target = req.path.unwrap_or_default().as_bytes();
    let target_span = (at(target), target.len());
    let mut spans: smallvec::SmallVec<[[usize; 4]; 24]> = smallvec::SmallVec::new();
    let mut framed = Framed::default();
    let mut expect_continue = false;
    let mut hosts = 0usize;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        framed.see(name, h.value).map_err(Refused::Bad)?;
        if name.eq_ignore_ascii_case(b"expect") {
            expect_continue = h.value.trim_ascii().eq_ignore_ascii_case(b"100-continue");
        } else if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
        }
        spans.push([at(name), name.len(), at(h.value), h.value.len()]);
    }
    // RFC 9112 3.2: one Host, and in HTTP/1.1 exactly one.
    if hosts > 1 {
        return Err(Refused::Bad("more than one Host field"));
    }
    if hosts == 0 && version == Version::HTTP_11 {
        return Err(Refused::Bad("an HTTP/1.1 request needs a Host field"));
    }
    if target == b"*" && method != Method::OPTIONS {
        return Err(Refused::Bad("the asterisk-form target is only for OPTIONS"));
    }
    let Framed {
        length,
        encoded,
        chunked,
        other_codings,
        close,
        keep_alive: keep_alive_token,
        ..
    } = framed;
    let framing = if encoded {
        if length.is_some() {
            return Err(Refused::Bad(
                "both Transfer-Encoding and Content-Length (refused against request smuggling)",
            ));
        }
        if chunked && other_codings && version == Version::HTTP_11 {
            // The body is re-framed on its way: a coding not decoded here
            // would be dropped from the message, not applied.
            return Err(Refused::NotImplemented(
                "a request's Transfer-Encoding may only be chunked, once",
            ));
        }
        if !chunked || version == Version::HTTP_10 {
            return Err(Refused::Bad(
                "a request's Transfer-Encoding must end in chunked (HTTP/1.1)",
            ));
        }
        Some(Framing::Chunked(Chunk::Size))
    } else {
        length.filter(|n| *n > 0).map(Framing::Length)
    };
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target_span.0..target_span.0 + target_span.1))
        .map_err(|_| Refused::Bad("invalid request target"))?;
    let mut map = HeaderMap::with_capacity(spans.len());
    for [name_at, name_len, value_at, value_len] in spans {
        let name = HeaderName::from_bytes(&head[name_at..name_at + name_len])
            .map_err(|_| Refused::Bad("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(value_at..value_at + value_len))
            .map_err(|_| Refused::Bad("invalid header value"))?;
        map.append(name, value);
    }
    // An absolute-form target names the authority: the Host field is
    // replaced by it (RFC 9112 3.2.2), so routing and the next hop see
    // one host, never two.
    if let Some(authority) = uri.authority() {
        if authority.as_str().contains('@') {
            return Err(Refused::Bad("a request target must not carry userinfo"));
        }
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(Refused::Bad(
                "an absolute-form target must be http or https",
            ));
        }
        let value = HeaderValue::from_str(authority.as_str())
            .map_err(|_| Refused::Bad("invalid request target"))?;
        map.insert(http::header::HOST, value);
    }
    let (mut parts, ()) = Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = map;
    Ok(Some(RequestHead {
        parts,
        framing,
        keep_alive: if version == Version::HTTP_10 {
            keep_alive_token && !close
        } else {
            !close
        },
        expect_continue: expect_continue && version == Version::HTTP_11,
    }))
}

#[cfg(test)]
#[path = "request_tests.rs"]
mod tests;
