//! The routing table: a request goes to the route whose host matches (a
//! route with a host beats one without) and whose path prefix is longest.

use crate::pool::Pool;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use shoal_core::settings::HeaderRules;
use std::sync::Arc;
use std::time::Duration;

/// One route: where matching requests go and their limits.
#[derive(Debug)]
pub struct Route {
    pub prefix: String,
    /// Lowercase host without port; `None` matches every host.
    pub host: Option<String>,
    pub pool: Arc<Pool>,
    pub request_timeout: Duration,
    pub max_body_bytes: u64,
    /// Header rules for requests sent upstream.
    pub request_headers: HeaderEdits,
    /// Header rules for responses to clients.
    pub response_headers: HeaderEdits,
    /// Only requests with a live session pass (`identity.rs`).
    pub require_session: bool,
}

/// A route's header rules, checked and ready to apply.
#[derive(Debug, Default)]
pub struct HeaderEdits {
    remove: Vec<HeaderName>,
    set: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderEdits {
    /// Checks `rules`; the error names the bad entry under `key`.
    pub fn new(rules: &HeaderRules, key: &str) -> Result<HeaderEdits, (String, String)> {
        let name = |n: &str, key: String| {
            HeaderName::from_bytes(n.as_bytes())
                .map_err(|_| (key, format!("`{n}` is not a valid header name")))
        };
        let mut edits = HeaderEdits::default();
        for (i, n) in rules.remove.iter().enumerate() {
            edits.remove.push(name(n, format!("{key}.remove[{i}]"))?);
        }
        for (n, v) in &rules.set {
            let entry = format!("{key}.set.{n}");
            let header = name(n, entry.clone())?;
            let value = HeaderValue::from_str(v)
                .map_err(|_| (entry, format!("`{v}` is not a valid header value")))?;
            edits.set.push((header, value));
        }
        Ok(edits)
    }

    /// Whether a rule removes or sets `name`.
    pub fn touches(&self, name: &HeaderName) -> bool {
        self.remove.contains(name) || self.set.iter().any(|(n, _)| n == name)
    }

    /// The headers the rules set.
    pub fn sets(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        self.set.iter().map(|(n, v)| (n, v))
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
    }
}

impl Route {
    fn matches(&self, host: Option<&str>, path: &str) -> bool {
        if let Some(want) = &self.host {
            if host != Some(want.as_str()) {
                return false;
            }
        }
        prefix_matches(&self.prefix, path)
    }
}

/// `/api/catalog` and `/api/catalog/` both match `/api/catalog/items` and
/// `/api/catalog`, but not `/api/catalogue`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    let bare = prefix.trim_end_matches('/');
    match path.strip_prefix(bare) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Routes sorted so the first match is the best one.
#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<Route>,
    /// Some route names a host (else the request's host is not looked at).
    any_host: bool,
}

impl Router {
    pub fn new(mut routes: Vec<Route>) -> Router {
        routes.sort_by(|a, b| {
            b.host.is_some().cmp(&a.host.is_some()).then(
                b.prefix
                    .trim_end_matches('/')
                    .len()
                    .cmp(&a.prefix.trim_end_matches('/').len()),
            )
        });
        let any_host = routes.iter().any(|r| r.host.is_some());
        Router { routes, any_host }
    }

    /// The route for a request's host (any case, port ignored) and path.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&Route> {
        let host = host.filter(|_| self.any_host).map(normalize_host);
        self.routes
            .iter()
            .find(|r| r.matches(host.as_deref(), path))
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

/// Lowercases and drops the port: `Shop.Example:8080` → `shop.example`.
pub fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let without_port = if host.starts_with('[') {
        // [v6]:port
        host.split_once(']')
            .map(|(h, _)| &host[..=h.len()])
            .unwrap_or(host)
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
    };
    without_port.to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/api/catalog/", "/api/catalog/items"));
        assert!(prefix_matches("/api/catalog/", "/api/catalog"));
        assert!(prefix_matches("/api/catalog", "/api/catalog/x"));
        assert!(!prefix_matches("/api/catalog", "/api/catalogue"));
    }

    #[test]
    fn hosts_are_normalized() {
        assert_eq!(normalize_host("Shop.Example:8080"), "shop.example");
        assert_eq!(normalize_host("[::1]:80"), "[::1]");
        assert_eq!(normalize_host("example"), "example");
    }
}
