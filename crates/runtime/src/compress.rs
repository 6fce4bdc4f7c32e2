//! Response compression of every service (one of `standard_layers`).
//!
//! Compression pays only above a size and only once per representation:
//! - A response under `serve.compression_min_bytes` (1 KiB by default) is
//!   sent as it is: a 400-byte product gains a few dozen bytes on the wire
//!   and costs a compressor's setup on every request.
//! - Only bodies whose length is known are compressed (every JSON and
//!   problem response); streams (SSE, blob downloads) pass as they are, and
//!   so do images and anything already encoded.
//! - A response with a strong ETag names its content exactly: its
//!   compressed form is kept (by URL, ETag and encoding, in
//!   `serve.compression_cache_bytes` of memory), so a cached product or
//!   list page is compressed once, not on every request.
//! - Brotli when the client accepts it (smaller, and browsers all do), else
//!   gzip; `q=0` is honoured. A compressed response's ETag becomes weak
//!   (`W/"..."`, as nginx does): it is no longer the same bytes, but still
//!   matches `If-None-Match` for a 304, which compares weakly.
//! - Every response that could have been compressed carries
//!   `Vary: Accept-Encoding`, so shared caches and CDNs keep the variants
//!   apart.

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use http_body::Body as _;
use std::io::Write;

/// Bodies at least this large are compressed on a blocking thread, off
/// the runtime's workers.
const BLOCKING_ABOVE: usize = 64 * 1024;

/// A content coding this layer produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Br,
    Gzip,
}

impl Encoding {
    fn name(self) -> &'static str {
        match self {
            Encoding::Br => "br",
            Encoding::Gzip => "gzip",
        }
    }
}

/// The layer's settings and its store of compressed representations.
pub struct Compression {
    min_bytes: usize,
    /// Keys hashed with foldhash, as the query cache's (crate::cache).
    cache: Option<moka::sync::Cache<String, Bytes, foldhash::fast::RandomState>>,
}

impl Compression {
    pub fn new(min_bytes: usize, cache_bytes: u64) -> Compression {
        let cache = (cache_bytes > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(cache_bytes)
                .weigher(|k: &String, v: &Bytes| {
                    u32::try_from(k.len() + v.len() + 64).unwrap_or(u32::MAX)
                })
                .time_to_idle(std::time::Duration::from_secs(600))
                .build_with_hasher(foldhash::fast::RandomState::default())
        });
        Compression { min_bytes, cache }
    }
}

/// The encoding to use for a request's `Accept-Encoding`: brotli unless
/// the client prefers gzip (a higher q) or refuses brotli, `None` when it
/// accepts neither.
pub fn preferred(headers: &HeaderMap) -> Option<Encoding> {
    preferred_of(headers.get_all(header::ACCEPT_ENCODING))
}

/// A request's `Accept-Encoding`, kept as it came and read only for a
/// response that could be compressed: most answers are under
/// `serve.compression_min_bytes`, and need not pay for parsing a
/// browser's field.
#[derive(Debug)]
pub(crate) enum Accepted {
    /// No field, or more than one (then read at once).
    Read(Option<Encoding>),
    /// One field (the usual case), not read yet.
    One(HeaderValue),
}

impl Accepted {
    pub(crate) fn of(headers: &HeaderMap) -> Accepted {
        let mut fields = headers.get_all(header::ACCEPT_ENCODING).iter();
        match (fields.next(), fields.next()) {
            (None, _) => Accepted::Read(None),
            (Some(one), None) => Accepted::One(one.clone()),
            _ => Accepted::Read(preferred(headers)),
        }
    }

    /// Whether the request named any encoding (it may still refuse all).
    pub(crate) fn named(&self) -> bool {
        !matches!(self, Accepted::Read(None))
    }

    /// The encoding to use, as [`preferred`] chooses it.
    pub(crate) fn encoding(&self) -> Option<Encoding> {
        match self {
            Accepted::Read(e) => *e,
            Accepted::One(v) => preferred_of([v]),
        }
    }
}

fn preferred_of<'a>(values: impl IntoIterator<Item = &'a HeaderValue>) -> Option<Encoding> {
    let (mut br, mut gzip, mut any) = (None::<f32>, None::<f32>, None::<f32>);
    for value in values {
        let Ok(value) = value.to_str() else { continue };
        for item in value.split(',') {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim();
            let mut q = 1.0f32;
            for p in parts {
                let p = p.trim();
                if let Some(v) = p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")) {
                    q = v.trim().parse().unwrap_or(0.0);
                }
            }
            if name.eq_ignore_ascii_case("br") {
                br = Some(q);
            } else if name.eq_ignore_ascii_case("gzip") || name.eq_ignore_ascii_case("x-gzip") {
                gzip = Some(q);
            } else if name == "*" {
                any = Some(q);
            }
        }
    }
    let br = br.or(any).unwrap_or(0.0);
    let gzip = gzip.or(any).unwrap_or(0.0);
    if br > 0.0 && br >= gzip {
        Some(Encoding::Br)
    } else if gzip > 0.0 {
        Some(Encoding::Gzip)
    } else {
        None
    }
}

/// Whether a media type is worth compressing (text and structured text;
/// not images, media, archives or event streams).
fn compressible(content_type: Option<&HeaderValue>) -> bool {
    let Some(ct) = content_type.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    // Compared without case and without a lowercase copy (no allocation
    // on every response).
    let essence = ct.split(';').next().unwrap_or("").trim();
    let is = |name: &str| essence.eq_ignore_ascii_case(name);
    let starts = |prefix: &str| {
        essence
            .get(..prefix.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
    };
    let ends = |suffix: &str| {
        essence
            .len()
            .checked_sub(suffix.len())
            .and_then(|at| essence.get(at..))
            .is_some_and(|s| s.eq_ignore_ascii_case(suffix))
    };
    if is("text/event-stream") {
        return false;
    }
    starts("text/")
        || is("application/json")
        || ends("+json")
        || ends("+xml")
        || is("application/xml")
        || is("application/javascript")
        || is("image/svg+xml")
}

/// Adds `accept-encoding` to `Vary` unless it is there (or `*` is).
fn vary_on_encoding(headers: &mut HeaderMap) {
    let listed = headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|v| v == "*" || v.eq_ignore_ascii_case("accept-encoding"));
    if !listed {
        static ACCEPT_ENCODING: HeaderValue = HeaderValue::from_static("accept-encoding");
        headers.append(header::VARY, ACCEPT_ENCODING.clone());
    }
}

/// Compresses `body`: brotli at quality 5 and a 4 MiB window (a good
/// ratio at a fraction of the cost of the top qualities), gzip at level 6.
pub fn encode(encoding: Encoding, body: &[u8]) -> std::io::Result<Vec<u8>> {
    match encoding {
        Encoding::Br => {
            let mut out = Vec::with_capacity(body.len() / 3 + 64);
            {
                let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                w.write_all(body)?;
                w.flush()?;
            }
            Ok(out)
        }
        Encoding::Gzip => {
            let mut w = flate2::write::GzEncoder::new(
                Vec::with_capacity(body.len() / 3 + 64),
                flate2::Compression::new(6),
            );
            w.write_all(body)?;
            w.finish()
        }
    }
}

impl Compression {
    /// Compresses `response` for the request's preferred encoding (of
    /// `accepted`) when it qualifies; `url` (GET only) keys the kept
    /// compressed form.
    pub(crate) async fn apply(
        &self,
        mut response: Response,
        accepted: &Accepted,
        url: Option<axum::http::Uri>,
    ) -> Response {
        let status = response.status();
        if status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
            || status == StatusCode::PARTIAL_CONTENT
        {
            return response;
        }
        // Streams (unknown length) pass as they are; small bodies too,
        // before their headers are looked at.
        let Some(len) = response.body().size_hint().exact() else {
            return response;
        };
        if (len as usize) < self.min_bytes
            || response.headers().contains_key(header::CONTENT_ENCODING)
            || !compressible(response.headers().get(header::CONTENT_TYPE))
        {
            return response;
        }
        vary_on_encoding(response.headers_mut());
        let Some(encoding) = accepted.encoding() else {
            return response;
        };
        let (mut parts, body) = response.into_parts();
        let bytes = match axum::body::to_bytes(body, usize::MAX).await {
            Ok(bytes) => bytes,
            Err(e) => {
                // It would have failed the client too; say so, not a
                // truncated 200.
                tracing::error!(error = %e, "a response body failed before compression");
                return crate::error::problem_response(&shoal_core::Problem::internal(
                    "the response could not be produced; it has been logged",
                ));
            }
        };
        let etag = parts
            .headers
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .filter(|t| t.starts_with('"'))
            .map(str::to_string);
        let key = match (&self.cache, &url, &etag) {
            (Some(_), Some(url), Some(etag)) => Some(format!("{}\n{etag}\n{url}", encoding.name())),
            _ => None,
        };
        let cached = key
            .as_ref()
            .and_then(|k| self.cache.as_ref().and_then(|c| c.get(k)));
        let compressed = match cached {
            Some(c) => {
                shoal_core::count_per_thread!("shoal_compression_cache_hits_total");
                Some(c)
            }
            None => {
                let encoded = if bytes.len() >= BLOCKING_ABOVE {
                    let input = bytes.clone();
                    tokio::task::spawn_blocking(move || encode(encoding, &input))
                        .await
                        .ok()
                        .and_then(Result::ok)
                } else {
                    encode(encoding, &bytes).ok()
                };
                let encoded = encoded.map(Bytes::from);
                metrics::counter!("shoal_compressions_total", "encoding" => encoding.name())
                    .increment(1);
                if let (Some(k), Some(e), Some(cache)) = (key, &encoded, &self.cache) {
                    cache.insert(k, e.clone());
                }
                encoded
            }
        };
        match compressed {
            Some(c) if c.len() < bytes.len() => {
                let h = &mut parts.headers;
                h.insert(
                    header::CONTENT_ENCODING,
                    HeaderValue::from_static(encoding.name()),
                );
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(c.len()));
                h.remove(header::ACCEPT_RANGES);
                if let Some(etag) = etag {
                    if let Ok(weak) = HeaderValue::from_str(&format!("W/{etag}")) {
                        h.insert(header::ETAG, weak);
                    }
                }
                Response::from_parts(parts, Body::from(c))
            }
            // Did not shrink (or failed): the original bytes.
            _ => Response::from_parts(parts, Body::from(bytes)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).unwrap());
        h
    }

    /// What `preferred` chooses, checked to be what the middleware's
    /// deferred reading (`Accepted`) chooses too.
    fn preferred(headers: &HeaderMap) -> Option<Encoding> {
        let now = super::preferred(headers);
        assert_eq!(Accepted::of(headers).encoding(), now, "{headers:?}");
        now
    }

    #[test]
    fn the_encoding_follows_accept_encoding_and_its_qualities() {
        // Two fields are read as one list.
        let mut two = accept("br;q=0");
        two.append(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
        assert_eq!(preferred(&two), Some(Encoding::Gzip));
        assert!(matches!(
            Accepted::of(&two),
            Accepted::Read(Some(Encoding::Gzip))
        ));
        assert!(matches!(Accepted::of(&accept("gzip")), Accepted::One(_)));
        assert!(!Accepted::of(&HeaderMap::new()).named());
        assert_eq!(preferred(&accept("gzip, deflate, br")), Some(Encoding::Br));
        assert_eq!(preferred(&accept("gzip, deflate")), Some(Encoding::Gzip));
        assert_eq!(preferred(&accept("br;q=0, gzip")), Some(Encoding::Gzip));
        assert_eq!(
            preferred(&accept("br;q=0.5, gzip;q=0.8")),
            Some(Encoding::Gzip)
        );
        assert_eq!(preferred(&accept("*")), Some(Encoding::Br));
        assert_eq!(preferred(&accept("*;q=0, gzip")), Some(Encoding::Gzip));
        assert_eq!(preferred(&accept("identity")), None);
        assert_eq!(preferred(&accept("gzip;q=0, br;q=0")), None);
        assert_eq!(preferred(&HeaderMap::new()), None);
    }

    #[test]
    fn only_text_like_types_are_compressed() {
        let ok = |t: &str| compressible(Some(&HeaderValue::from_str(t).unwrap()));
        assert!(ok("application/json"));
        assert!(ok("application/problem+json"));
        assert!(ok("text/html; charset=utf-8"));
        assert!(!ok("text/event-stream"));
        assert!(!ok("image/png"));
        assert!(!ok("application/octet-stream"));
        assert!(!compressible(None));
    }

    #[test]
    fn both_encodings_round_trip() {
        use std::io::Read;
        let body = br#"{"items":[{"name":"a product","price_cents":1999}]}"#.repeat(50);
        let gz = encode(Encoding::Gzip, &body).unwrap();
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, body);
        let br = encode(Encoding::Br, &body).unwrap();
        let mut out = Vec::new();
        brotli::Decompressor::new(&br[..], 4096)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, body);
        assert!(br.len() < body.len() / 5 && gz.len() < body.len() / 5);
    }
}
