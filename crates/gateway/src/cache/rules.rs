//! The cache rules http-cache-semantics does not cover: targeted cache
//! control (RFC 9213: `Shoal-Cache-Control`, then `CDN-Cache-Control`,
//! then `Cache-Control`), RFC 5861 windows, our extra storability limits
//! (Set-Cookie, Vary: *, Range), the header merge of a 304 (RFC 9111
//! 3.2), surrogate keys, the URLs an unsafe request invalidates, and
//! client conditionals answered from a stored response.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use std::time::{Duration, SystemTime};

/// The Shoal-targeted field: read by the gateway, never sent downstream.
pub const SHOAL_CACHE_CONTROL: &str = "shoal-cache-control";
/// RFC 9213's field for every CDN: read by the gateway, passed on.
pub const CDN_CACHE_CONTROL: &str = "cdn-cache-control";
/// RFC 9211.
pub const CACHE_STATUS: &str = "cache-status";

/// The response headers as the gateway's cache must read them: when a
/// targeted field is present it replaces `Cache-Control`, and `Expires`
/// and `Pragma` are ignored (RFC 9213 2.2).
pub fn effective_headers(headers: &HeaderMap) -> HeaderMap {
    let targeted = [SHOAL_CACHE_CONTROL, CDN_CACHE_CONTROL]
        .into_iter()
        .find_map(|name| {
            let values: Vec<&str> = headers
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            (!values.is_empty()).then(|| values.join(", "))
        });
    let mut out = headers.clone();
    if let Some(value) = targeted.and_then(|v| HeaderValue::from_str(&v).ok()) {
        out.insert(header::CACHE_CONTROL, value);
        out.remove(header::EXPIRES);
        out.remove(header::PRAGMA);
    }
    lowercase_directive_names(&mut out);
    if let Some(age) = age_for_freshness(headers) {
        out.insert(header::AGE, HeaderValue::from(age));
    }
    out
}

/// Cache-Control directive names are case-insensitive (RFC 9111 5.2);
/// the policy code matches them in lowercase, so `No-Cache` must become
/// `no-cache` before it looks. Values are left as they are.
fn lowercase_directive_names(headers: &mut HeaderMap) {
    let values = headers.get_all(header::CACHE_CONTROL);
    if !values
        .iter()
        .any(|v| v.as_bytes().iter().any(u8::is_ascii_uppercase))
    {
        return;
    }
    let lowered: Vec<String> = values
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|d| match d.split_once('=') {
            Some((name, value)) => format!("{}={value}", name.trim().to_ascii_lowercase()),
            None => d.trim().to_ascii_lowercase(),
        })
        .filter(|d| !d.is_empty())
        .collect();
    if let Ok(v) = HeaderValue::from_str(&lowered.join(", ")) {
        headers.insert(header::CACHE_CONTROL, v);
    }
}

/// The age to compute freshness with (RFC 9111 5.1): the first member of
/// the `Age` field, which must be a non-negative integer (capped at 2^31);
/// any other value makes the response stale. `None`: no `Age` field.
pub fn age_for_freshness(headers: &HeaderMap) -> Option<u64> {
    const MAX_AGE: u64 = 2_147_483_648;
    let first = headers.get(header::AGE)?;
    let member = first
        .to_str()
        .ok()
        .and_then(|v| v.split(',').next())
        .map(str::trim)
        .unwrap_or("");
    if member.is_empty() || !member.bytes().all(|b| b.is_ascii_digit()) {
        return Some(MAX_AGE);
    }
    Some(member.parse::<u64>().map_or(MAX_AGE, |a| a.min(MAX_AGE)))
}

/// Cache-Control directives as (lowercase name, value) pairs.
pub fn directives(headers: &HeaderMap) -> Vec<(String, Option<String>)> {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|d| {
            let d = d.trim();
            if d.is_empty() {
                return None;
            }
            Some(match d.split_once('=') {
                Some((k, v)) => (
                    k.trim().to_ascii_lowercase(),
                    Some(v.trim().trim_matches('"').to_string()),
                ),
                None => (d.to_ascii_lowercase(), None),
            })
        })
        .collect()
}

fn has(d: &[(String, Option<String>)], name: &str) -> bool {
    d.iter().any(|(k, _)| k == name)
}

fn seconds(d: &[(String, Option<String>)], name: &str) -> Option<Duration> {
    d.iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.as_deref())
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// What the effective Cache-Control says beyond RFC 9111 freshness.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaleRules {
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// `must-revalidate`, `proxy-revalidate` and `no-cache` forbid serving
    /// stale. `s-maxage` implies proxy-revalidate (RFC 9111 5.2.2.10), but
    /// an explicit RFC 5861 directive next to it is taken as the origin's
    /// permission to serve stale (as CDNs do).
    pub may_serve_stale: bool,
}

pub fn stale_rules(effective: &HeaderMap) -> StaleRules {
    let d = directives(effective);
    let swr = seconds(&d, "stale-while-revalidate").unwrap_or_default();
    let sie = seconds(&d, "stale-if-error").unwrap_or_default();
    let forbidden = has(&d, "must-revalidate")
        || has(&d, "proxy-revalidate")
        || has(&d, "no-cache")
        || has(&d, "no-store");
    StaleRules {
        stale_while_revalidate: swr,
        stale_if_error: sie,
        may_serve_stale: !forbidden,
    }
}

/// Our limits on top of `CachePolicy::is_storable`: why a response is not
/// stored, or `None`.
pub fn not_storable_reason(status: StatusCode, effective: &HeaderMap) -> Option<&'static str> {
    if status == StatusCode::PARTIAL_CONTENT || effective.contains_key(header::CONTENT_RANGE) {
        return Some("partial-content");
    }
    if vary_names(effective).is_none() {
        return Some("vary-star");
    }
    let d = directives(effective);
    // Conservative: a response that sets a cookie is stored only when the
    // origin says `public`, and even then without its Set-Cookie.
    if effective.contains_key(header::SET_COOKIE) && !has(&d, "public") {
        return Some("set-cookie");
    }
    None
}

/// The lowercase names in `Vary`, or `None` for `Vary: *`.
pub fn vary_names(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut names = Vec::new();
    for part in headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
    {
        let part = part.trim();
        if part == "*" {
            return None;
        }
        if let Ok(n) = HeaderName::from_bytes(part.to_ascii_lowercase().as_bytes()) {
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    Some(names)
}

/// The headers kept with a stored response: no Set-Cookie (see
/// `not_storable_reason`), no Shoal-Cache-Control, no hop-by-hop fields
/// (already removed by the proxy) and no Age (recomputed on each hit).
pub fn stored_headers(headers: &HeaderMap) -> HeaderMap {
    let mut h = headers.clone();
    h.remove(header::SET_COOKIE);
    h.remove(SHOAL_CACHE_CONTROL);
    h.remove(header::AGE);
    h.remove(CACHE_STATUS);
    h.remove(crate::body::X_REQUEST_ID);
    h
}

/// RFC 9111 3.2: the 304's fields replace the stored ones, except those
/// that describe the stored body and the ones we never store.
pub fn merge_304(stored: &HeaderMap, not_modified: &HeaderMap) -> HeaderMap {
    const KEEP: [&str; 4] = [
        "content-length",
        "content-encoding",
        "content-range",
        "transfer-encoding",
    ];
    let mut merged = stored.clone();
    let mut replaced: Vec<HeaderName> = Vec::new();
    for (name, value) in not_modified {
        if KEEP.contains(&name.as_str())
            || name == header::SET_COOKIE
            || name.as_str() == SHOAL_CACHE_CONTROL
            || name == header::AGE
            || name.as_str() == CACHE_STATUS
            || *name == crate::body::X_REQUEST_ID
        {
            continue;
        }
        if !replaced.contains(name) {
            merged.remove(name);
            replaced.push(name.clone());
        }
        merged.append(name.clone(), value.clone());
    }
    merged
}

/// Surrogate keys: `Surrogate-Key` (space-separated) and `Cache-Tag`
/// (comma-separated); both split on either.
pub fn tags(headers: &HeaderMap) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for name in ["surrogate-key", "cache-tag"] {
        for v in headers.get_all(name).iter().filter_map(|v| v.to_str().ok()) {
            for t in v.split([' ', ',']).map(str::trim).filter(|t| !t.is_empty()) {
                if !out.iter().any(|o| o == t) {
                    out.push(t.to_string());
                }
            }
        }
    }
    out
}

pub fn has_validator(headers: &HeaderMap) -> bool {
    headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED)
}

/// Methods that invalidate the target URL on a 2xx/3xx (RFC 9111 4.4).
pub fn is_unsafe(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// The URL key of `Location` / `Content-Location` when it names the same
/// host (relative references are resolved against the request path).
pub fn same_host_url(value: &str, scheme_host: &str, request_path: &str) -> Option<String> {
    let value = value.trim();
    if let Some(rest) = value
        .strip_prefix("http://")
        .or_else(|| value.strip_prefix("https://"))
    {
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let ours = scheme_host.trim_start_matches("http://");
        return (host.eq_ignore_ascii_case(ours)).then(|| format!("{scheme_host}{path}"));
    }
    if value.starts_with("//") {
        return None;
    }
    if value.starts_with('/') {
        return Some(format!("{scheme_host}{value}"));
    }
    if value.is_empty() {
        return None;
    }
    let dir = match request_path.rfind('/') {
        Some(i) => &request_path[..=i],
        None => "/",
    };
    Some(format!("{scheme_host}{dir}{value}"))
}

/// Request headers that make a request conditional or partial; removed
/// before a cache lookup or fetch (the cache answers them itself).
pub const CONDITIONAL: [&str; 6] = [
    "if-none-match",
    "if-modified-since",
    "if-match",
    "if-unmodified-since",
    "if-range",
    "range",
];

/// Whether a client's `If-None-Match` / `If-Modified-Since` is satisfied
/// by a stored 200 with these headers: the client gets a 304.
pub fn not_modified_for(client: &HeaderMap, stored: &HeaderMap) -> bool {
    if let Some(inm) = client
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
    {
        let Some(etag) = stored.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let weak = |t: &str| t.trim().trim_start_matches("W/").to_string();
        return inm.trim() == "*" || inm.split(',').any(|t| weak(t) == weak(etag));
    }
    if let Some(ims) = client
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok())
    {
        let lm = stored
            .get(header::LAST_MODIFIED)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok());
        return lm.is_some_and(|lm| lm <= ims);
    }
    false
}

/// Headers a 304 to a client carries (RFC 9110 15.4.5).
pub fn not_modified_headers(stored: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in [
        header::CACHE_CONTROL,
        header::CONTENT_LOCATION,
        header::DATE,
        header::ETAG,
        header::EXPIRES,
        header::VARY,
        header::LAST_MODIFIED,
    ] {
        for v in stored.get_all(&name) {
            out.append(name.clone(), v.clone());
        }
    }
    out
}

/// Seconds between two times, negative when `to` is before `from`.
pub fn signed_secs(from: SystemTime, to: SystemTime) -> i64 {
    match to.duration_since(from) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        m
    }

    #[test]
    fn targeted_fields_take_precedence_in_order() {
        let e = effective_headers(&h(&[
            ("cache-control", "no-store"),
            ("cdn-cache-control", "max-age=10"),
            ("shoal-cache-control", "max-age=60, stale-if-error=30"),
            ("expires", "Thu, 01 Jan 1970 00:00:00 GMT"),
        ]));
        assert_eq!(e["cache-control"], "max-age=60, stale-if-error=30");
        assert!(!e.contains_key("expires"));
        let e = effective_headers(&h(&[
            ("cache-control", "no-store"),
            ("cdn-cache-control", "max-age=10"),
        ]));
        assert_eq!(e["cache-control"], "max-age=10");
        let e = effective_headers(&h(&[("cache-control", "no-store")]));
        assert_eq!(e["cache-control"], "no-store");
    }

    #[test]
    fn stale_rules_follow_directives() {
        let r = stale_rules(&h(&[(
            "cache-control",
            "max-age=1, stale-while-revalidate=30, stale-if-error=60",
        )]));
        assert_eq!(r.stale_while_revalidate, Duration::from_secs(30));
        assert_eq!(r.stale_if_error, Duration::from_secs(60));
        assert!(r.may_serve_stale);
        let r = stale_rules(&h(&[(
            "cache-control",
            "max-age=1, must-revalidate, stale-if-error=60",
        )]));
        assert!(!r.may_serve_stale);
    }

    #[test]
    fn merge_replaces_fields_but_keeps_body_framing() {
        let stored = h(&[
            ("etag", "\"a\""),
            ("content-length", "10"),
            ("x-old", "1"),
            ("cache-control", "max-age=1"),
        ]);
        let fresh = h(&[
            ("etag", "\"a\""),
            ("content-length", "0"),
            ("cache-control", "max-age=60"),
            ("x-new", "2"),
        ]);
        let m = merge_304(&stored, &fresh);
        assert_eq!(m["content-length"], "10");
        assert_eq!(m["cache-control"], "max-age=60");
        assert_eq!(m["x-old"], "1");
        assert_eq!(m["x-new"], "2");
    }

    #[test]
    fn tags_split_on_spaces_and_commas() {
        let t = tags(&h(&[
            ("surrogate-key", "product:1 products"),
            ("cache-tag", "product:1,extra"),
        ]));
        assert_eq!(t, vec!["product:1", "products", "extra"]);
    }

    #[test]
    fn invalid_ages_make_a_response_stale() {
        let age = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::AGE, HeaderValue::from_str(v).unwrap());
            }
            age_for_freshness(&h)
        };
        const STALE: Option<u64> = Some(2_147_483_648);
        assert_eq!(age(&[]), None);
        assert_eq!(age(&["30"]), Some(30));
        assert_eq!(age(&["0,7200"]), Some(0), "the first member counts");
        assert_eq!(age(&["7200, 0"]), Some(7200));
        for bad in ["abc", "-7200", "7200.0", "7200;foo=bar", ""] {
            assert_eq!(age(&[bad]), STALE, "{bad:?}");
        }
        assert_eq!(age(&["99999999999999999999"]), STALE);
    }

    #[test]
    fn directive_names_are_matched_in_any_case() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("No-Cache, Max-Age=60, private=\"Set-Cookie\""),
        );
        let e = effective_headers(&h);
        assert_eq!(
            e[header::CACHE_CONTROL],
            "no-cache, max-age=60, private=\"Set-Cookie\""
        );
    }

    #[test]
    fn locations_resolve_on_the_same_host_only() {
        let base = "http://shop";
        assert_eq!(
            same_host_url("/a/b", base, "/x/y").as_deref(),
            Some("http://shop/a/b")
        );
        assert_eq!(
            same_host_url("http://SHOP/a", base, "/").as_deref(),
            Some("http://shop/a")
        );
        assert_eq!(same_host_url("http://other/a", base, "/"), None);
        assert_eq!(
            same_host_url("c", base, "/x/y").as_deref(),
            Some("http://shop/x/c")
        );
    }

    #[test]
    fn vary_star_and_set_cookie_are_not_stored() {
        assert_eq!(
            not_storable_reason(StatusCode::OK, &h(&[("vary", "*")])),
            Some("vary-star")
        );
        assert_eq!(
            not_storable_reason(
                StatusCode::OK,
                &h(&[("set-cookie", "a=1"), ("cache-control", "max-age=60")])
            ),
            Some("set-cookie")
        );
        assert_eq!(
            not_storable_reason(
                StatusCode::OK,
                &h(&[
                    ("set-cookie", "a=1"),
                    ("cache-control", "public, max-age=60")
                ])
            ),
            None
        );
    }
}
