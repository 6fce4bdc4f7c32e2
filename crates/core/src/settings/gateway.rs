//! The `[gateway]` settings section: listeners, pools of upstream instances,
//! routes to them, health checks, retries and timeouts.

use super::SettingsError;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySettings {
    pub listen: SocketAddr,
    /// PEM certificate chain (leaf first): when set with `tls_key_file`,
    /// the listener speaks TLS only (HTTP/2 or HTTP/1.1 by ALPN). Read at
    /// start and on every reload, so a renewed certificate is taken up by
    /// a reload.
    pub tls_cert_file: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `tls_cert_file`.
    pub tls_key_file: String,
    /// With TLS on the listener, `Strict-Transport-Security: max-age=<this>`
    /// on every proxied response that has none, so browsers come back over
    /// HTTPS only (RFC 6797); a browser takes it only from a certificate it
    /// trusts. 0 = not sent. Without TLS it is never sent.
    pub hsts_max_age_secs: u64,
    /// More certificates, chosen by the name a client asks for (SNI);
    /// `tls_cert_file` serves every other name.
    pub tls_sni: Vec<SniCertificate>,
    /// PEM certificates trusted for `https://` upstreams besides the
    /// Mozilla roots (a private CA, or an instance's own self-signed
    /// certificate). Empty: the Mozilla roots only.
    pub upstream_ca_file: String,
    /// Threads serving connections, each with its own single-threaded
    /// runtime and upstream pool; 0 means one per core.
    pub workers: usize,
    /// Named pools of upstream instances.
    pub pools: Vec<PoolSettings>,
    /// Routes, matched by host (when given) and longest path prefix.
    pub routes: Vec<RouteSettings>,
    /// Path every instance answers 200 on while it wants traffic (503
    /// while it drains). Empty: a TCP connect check, for servers that have
    /// no such path.
    pub health_path: String,
    /// Where registrations are kept so a restarted gateway routes to the
    /// registered instances at once (they would otherwise be missing until
    /// each renews, up to a third of its TTL). Empty: not kept. The
    /// `gateway` role sets `<data_dir>/gateway-registrations.json` when
    /// empty.
    pub registrations_file: String,
    pub health_interval_ms: u64,
    pub health_timeout_ms: u64,
    /// Failed checks in a row before an instance is marked down.
    pub unhealthy_threshold: u32,
    /// Passed checks in a row before a down instance is marked up.
    pub healthy_threshold: u32,
    /// Connection errors in a row that eject an instance at once (passive).
    pub eject_after_errors: u32,
    /// First ejection period; later ones double up to 30 s.
    pub eject_base_ms: u64,
    /// Peak-EWMA decay time (p2c_peak_ewma): how fast a latency peak, or
    /// an idle instance's estimate, fades (by ~63%).
    pub ewma_decay_ms: u64,
    /// Power of the latency in p2c_peak_ewma's cost, latency^k ×
    /// (outstanding + 1): 1 is Finagle's and linkerd's cost; 2 (default)
    /// sends a consistently slower instance less traffic than its queue
    /// length alone would.
    pub ewma_latency_exponent: f64,
    pub connect_timeout_ms: u64,
    /// Idle keep-alive connections kept per upstream instance (more are
    /// closed when they fall idle; like nginx's `keepalive`).
    pub upstream_idle_per_instance: usize,
    /// Deadline for a whole upstream request (to the end of headers).
    pub request_timeout_ms: u64,
    /// Longest wait for the next bytes of a response body from an
    /// instance (nginx's `proxy_read_timeout`); past it the response is
    /// cut off and its client connection closed. 0 = no limit.
    pub upstream_read_timeout_ms: u64,
    /// Extra attempts on other instances for a request that is safe to retry.
    pub retries: u32,
    /// How long one attempt of a request that is safe to retry (idempotent,
    /// body buffered) may wait for its response head before it is
    /// abandoned and tried on another instance, as Envoy's per-try
    /// timeout: a host that vanished without a reset (a cut link, a frozen
    /// VM) costs this much, not the whole `request_timeout_ms`. Counts as
    /// a connection error for passive ejection. 0 = off (the default:
    /// set it above your slowest idempotent endpoint).
    pub try_timeout_ms: u64,
    /// Request bodies up to this size are buffered so they can be retried;
    /// larger ones stream through and are never retried.
    pub retry_buffer_bytes: usize,
    /// Largest request body accepted, in bytes (413 past it).
    pub max_body_bytes: u64,
    pub shutdown_timeout_secs: u64,
    /// When the gateway drains, each event stream passing through it
    /// (`text/event-stream`) is ended cleanly at a random moment within
    /// this window, ms, so its client reconnects (to another gateway) and
    /// resumes with `Last-Event-ID`, and the clients do not all come back
    /// at once; each WebSocket passing through gets a close frame with
    /// status 1012 (service restart) between two frames, in the same
    /// window. 0: event streams are left to end by themselves until
    /// `shutdown_timeout_secs`, and tunnels are closed at once. At most
    /// half of `shutdown_timeout_secs` is used, so the last stream ends
    /// well before the deadline.
    pub stream_drain_window_ms: u64,
    /// Balancer of every pool without an entry in `balancing`.
    pub balancer: BalancerKind,
    /// Per-pool balancing, keyed by pool name (kept apart from
    /// `[[gateway.pools]]` so the pool entries stay two fields).
    pub balancing: BTreeMap<String, BalancingSettings>,
    /// Retries allowed on top of the requests seen in the last 10 s, in
    /// percent of those requests (the retry budget).
    pub retry_budget_percent: f32,
    /// Retries per second always allowed, whatever the request rate.
    pub retry_budget_min_per_sec: u32,
    /// Passive ejection never takes out more than this share of a pool's
    /// instances, in percent (at least one instance may always be ejected
    /// in a pool of two or more). Active health checks are not capped.
    pub max_ejection_percent: u32,
    /// Bearer token (`Authorization: Bearer ...`) that every `/_gateway/`
    /// endpoint but `healthz` and `readyz` requires: the admin API, pools,
    /// cache and metrics. When unset, those endpoints are off (403) for
    /// every client, loopback included. `shoal up` writes a random one to
    /// `<data_dir>/secrets/admin-token`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    /// A second bearer token that opens only the read-only status
    /// endpoints (`/_gateway/metrics`, `pools`, `cache`), for a Prometheus
    /// scraper that must not be able to change anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_token: Option<String>,
    /// Tokens that may only register and deregister instances, each in
    /// its own pools (`[[gateway.registration_tokens]]`; `shoal token new
    /// --pool`): what a service of another language holds instead of the
    /// admin token. Only each token's SHA-256 is kept here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub registration_tokens: Vec<RegistrationTokenSettings>,
    /// Longest TTL an instance may register itself with, in seconds.
    pub registration_max_ttl_secs: u64,
    /// Open client connections at most; past it new connections get a 503
    /// and are closed. 0 = no cap.
    pub max_connections: usize,
    /// Open connections from one client address at most (nginx's
    /// `limit_conn`); past it that address's new connections get a 503 and
    /// are closed, so one client cannot take the whole `max_connections`.
    /// Mind clients behind one NAT or proxy. 0 = no cap.
    pub max_connections_per_client: usize,
    /// Idle timeout while the gateway holds three quarters of
    /// `max_connections` or more: idle keep-alive connections are let go
    /// sooner, making room before new clients are refused. 0 = the usual
    /// `idle_timeout_secs` whatever the load.
    pub idle_timeout_under_pressure_secs: u64,
    /// Largest request head (request line + headers) a client may send, in
    /// bytes (431 past it). HTTP/1.1 needs at least 8192.
    pub max_header_bytes: usize,
    /// Time a client has to send a whole request head (HTTP/1.1; slowloris
    /// defence). The connection is closed past it.
    pub header_read_timeout_ms: u64,
    /// A client connection with no request in flight for this long is
    /// closed. 0 = never.
    pub idle_timeout_secs: u64,
    /// Longest a client may leave the gateway's writes to it waiting
    /// (nginx's `send_timeout`): a client that stops reading a response
    /// is disconnected past it, so it cannot hold the connection and the
    /// upstream's response forever; on HTTP/2, where such a client stops
    /// granting window instead, its stalled response is dropped and the
    /// stream reset. 0 = no limit.
    pub send_timeout_ms: u64,
    /// What serves HTTP/1.x from clients: `shoal`, the gateway's own
    /// codec (no buffer held by an idle connection, less work per
    /// request), or `hyper`, hyper's server (for comparison). HTTP/2 from
    /// clients is always hyper's.
    pub http1_server: Http1Server,
    /// An upgraded connection (WebSocket tunnel) that carries no byte
    /// either way for this long is closed (HAProxy's `timeout tunnel`).
    /// 0 = never.
    pub tunnel_idle_timeout_ms: u64,
    /// Proxied requests in flight through the whole gateway at most; past
    /// it, 503 + Retry-After (load shedding). 0 = no cap.
    pub max_concurrent_requests: usize,
    /// The same cap per pool, keyed by pool name.
    pub pool_max_concurrent_requests: BTreeMap<String, usize>,
    /// Rate limit of every route without its own `rate_limit`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSettings>,
    /// With a value above 0, upstreams named by host name (not an IP) are
    /// re-resolved every this many seconds and the pool gets one instance
    /// per A/AAAA record. 0 = a name is one instance, resolved on connect.
    pub dns_refresh_secs: u64,
    /// Redis shared by every gateway (`redis://host:6379/0`): with it, rate
    /// limits are one budget per key across all gateways (a GCRA script in
    /// Redis; a gateway that cannot reach Redis falls back to its own
    /// limiter until it can), and every cache purge is published to the
    /// other gateways, so no `cache.purge_peers` list is needed. Empty:
    /// each gateway keeps its own limits. Read at start only.
    pub redis_url: String,
    /// Prefix of the keys and channel the gateways share in Redis.
    pub redis_prefix: String,
    /// Longest wait for Redis on a request's rate-limit check, ms; past
    /// it (or on an error) the gateway uses its own limiter and leaves
    /// Redis alone for a second.
    pub redis_timeout_ms: u64,
    /// The HTTP response cache (`[gateway.cache]`, docs/gateway-cache.md).
    pub cache: GatewayCacheSettings,
    /// The operator's console under `/_shoal/` (`[gateway.console]`,
    /// docs/console.md).
    pub console: GatewayConsoleSettings,
    /// Sessions checked at the edge for routes with `require_session`
    /// (`[gateway.identity]`, docs/gateway.md "Identity at the edge").
    pub identity: GatewayIdentitySettings,
}

/// `[gateway.identity]`: how the gateway checks the session of a request
/// to a route with `require_session = true`, and what it tells the
/// instance behind.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayIdentitySettings {
    /// The path the gateway asks, with the request's session cookie, who
    /// the session belongs to (`GET`; routed like any request, so the
    /// pool that serves it is the route's). Shoal's accounts service
    /// answers it: 200 `{"user_id": ...}`, or 401.
    pub check_path: String,
    /// The session cookie's name (`sessions.cookie_name` of the services).
    pub cookie_name: String,
    /// The header that carries the verified user id to the instance. It
    /// is removed from every request a client sends, on every route, so
    /// an instance behind the gateway can trust it.
    pub user_header: String,
    /// How long a checked session's user id is reused without asking
    /// again, ms: a session ended elsewhere is refused within this time.
    /// 0 asks on every request.
    pub cache_ms: u64,
}

impl Default for GatewayIdentitySettings {
    fn default() -> Self {
        GatewayIdentitySettings {
            check_path: "/api/accounts/session".into(),
            cookie_name: "shoal_session".into(),
            user_header: "x-shoal-user-id".into(),
            cache_ms: 1000,
        }
    }
}

/// `[gateway.console]`: the web console the gateway serves under
/// `/_shoal/`, behind a login with `gateway.admin_token`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConsoleSettings {
    /// Serve the console (it still needs `gateway.admin_token` to log in).
    pub enabled: bool,
    /// Send a browser's `GET /` (one that accepts `text/html`) to the
    /// console; `shoal up` turns this on. Off, `/` is routed as any path.
    pub redirect_root: bool,
    /// The process table `shoal up` keeps (`<data_dir>/run/stack.json`),
    /// shown on the overview; the `gateway` role sets it when empty. A
    /// missing file shows no processes.
    pub stack_file: String,
    /// Base URLs of the workers whose `/_shoal/queues` endpoints the
    /// queue pages read and act through (`http://10.0.0.7:9090`); the
    /// first that answers is used. Empty: the workers listed in
    /// `stack_file`.
    pub workers: Vec<String>,
    /// The other gateways of the deployment, shown on the overview beside
    /// this one (base URLs, e.g. `http://10.0.0.2:8080`; a list, or one
    /// string with commas). A host name stands for every address it
    /// resolves to (a Kubernetes headless Service: one per gateway pod).
    /// This gateway is recognised among them and shown once. They are
    /// asked with `gateway.admin_token`, which they must share.
    #[serde(deserialize_with = "super::one_or_many")]
    pub peers: Vec<String>,
    /// How long a console login lasts, seconds.
    pub session_secs: u64,
}

impl Default for GatewayConsoleSettings {
    fn default() -> Self {
        GatewayConsoleSettings {
            enabled: true,
            redirect_root: false,
            stack_file: String::new(),
            workers: Vec::new(),
            peers: Vec::new(),
            session_secs: 12 * 3600,
        }
    }
}

/// `[gateway.cache]`: an RFC 9111 shared cache in the request path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayCacheSettings {
    /// Caching on every route without its own `cache = true|false`.
    pub enabled: bool,
    /// Memory for stored responses (bodies + headers + keys), bytes.
    pub max_bytes: u64,
    /// Larger responses are passed through and not stored, bytes.
    pub max_object_bytes: u64,
    /// How long a request waits for a concurrent identical miss before it
    /// goes to the origin itself, ms.
    pub coalesce_timeout_ms: u64,
    /// After a response turned out not storable, requests for that URL skip
    /// coalescing for this long, seconds (0 = never skip).
    pub hit_for_pass_secs: u64,
    /// How long a stale response with a validator (ETag or Last-Modified)
    /// is kept for conditional revalidation after it went stale, seconds.
    pub keep_stale_secs: u64,
    /// Heuristic freshness for responses with Last-Modified and no explicit
    /// lifetime, in percent of their age (RFC 9111 4.2.2); 0 = none.
    pub heuristic_percent: u32,
    /// Admin base URLs of the other gateway instances
    /// (`http://10.0.0.2:8080`); a purge is repeated on each of them. A
    /// host name is resolved on every purge and each of its addresses gets
    /// the purge (a headless Kubernetes Service names every gateway pod).
    /// Not needed with `gateway.redis_url`, which publishes purges to all
    /// gateways.
    pub purge_peers: Vec<String>,
    /// Deadline of one purge sent to a peer, ms.
    pub purge_peer_timeout_ms: u64,
}

impl Default for GatewayCacheSettings {
    fn default() -> Self {
        GatewayCacheSettings {
            enabled: false,
            max_bytes: 256 * 1024 * 1024,
            max_object_bytes: 8 * 1024 * 1024,
            coalesce_timeout_ms: 5_000,
            hit_for_pass_secs: 10,
            keep_stale_secs: 3_600,
            heuristic_percent: 10,
            purge_peers: Vec::new(),
            purge_peer_timeout_ms: 2_000,
        }
    }
}

/// A GCRA rate limit: `requests_per_sec` sustained with bursts of `burst`,
/// per key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    pub requests_per_sec: f64,
    /// Requests allowed at once above the sustained rate (at least 1).
    #[serde(default = "default_burst")]
    pub burst: u32,
    /// `client_ip` (default) or `header:<name>` (e.g. `header:x-api-key`;
    /// requests without the header are keyed by client IP).
    #[serde(default = "default_rate_key")]
    pub key: String,
}

fn default_burst() -> u32 {
    1
}

fn default_rate_key() -> String {
    "client_ip".into()
}

/// How a pool picks an instance for each request.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum BalancerKind {
    /// Power of two random choices, scored by peak-EWMA latency times
    /// (outstanding requests + 1).
    #[default]
    P2cPeakEwma,
    /// Each healthy instance in turn.
    RoundRobin,
    /// The healthy instance with the fewest outstanding requests.
    LeastRequests,
    /// Smooth weighted round robin with `weights` (default weight 1).
    WeightedRoundRobin,
    /// A hash ring keyed by `hash_on`: the same key goes to the same
    /// instance while it is healthy.
    ConsistentHash,
}

/// Balancing of one pool.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct BalancingSettings {
    pub balancer: Option<BalancerKind>,
    /// For `consistent_hash`: `header:<name>`, `cookie:<name>` or
    /// `client_ip`. A request without the key goes to a random instance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<String>,
    /// For `weighted_round_robin`: upstream URL to weight (1..=1000).
    pub weights: BTreeMap<String, u32>,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            listen: "127.0.0.1:8080".parse().unwrap(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            tls_sni: Vec::new(),
            upstream_ca_file: String::new(),
            workers: 0,
            pools: Vec::new(),
            routes: Vec::new(),
            health_path: "/readyz".into(),
            registrations_file: String::new(),
            health_interval_ms: 1_000,
            health_timeout_ms: 500,
            unhealthy_threshold: 2,
            healthy_threshold: 1,
            eject_after_errors: 1,
            eject_base_ms: 2_000,
            ewma_decay_ms: 1_000,
            ewma_latency_exponent: 2.0,
            connect_timeout_ms: 1_000,
            upstream_idle_per_instance: 256,
            request_timeout_ms: 30_000,
            upstream_read_timeout_ms: 60_000,
            retries: 2,
            try_timeout_ms: 0,
            retry_buffer_bytes: 64 * 1024,
            max_body_bytes: 16 * 1024 * 1024,
            shutdown_timeout_secs: 20,
            stream_drain_window_ms: 5_000,
            balancer: BalancerKind::default(),
            balancing: BTreeMap::new(),
            retry_budget_percent: 20.0,
            retry_budget_min_per_sec: 10,
            max_ejection_percent: 50,
            admin_token: None,
            metrics_token: None,
            registration_tokens: Vec::new(),
            registration_max_ttl_secs: 300,
            max_connections: 10_000,
            max_connections_per_client: 1_000,
            idle_timeout_under_pressure_secs: 5,
            max_header_bytes: 64 * 1024,
            header_read_timeout_ms: 10_000,
            idle_timeout_secs: 60,
            send_timeout_ms: 60_000,
            http1_server: Http1Server::Shoal,
            tunnel_idle_timeout_ms: 3_600_000,
            max_concurrent_requests: 0,
            pool_max_concurrent_requests: BTreeMap::new(),
            rate_limit: None,
            dns_refresh_secs: 0,
            hsts_max_age_secs: 31_536_000,
            redis_url: String::new(),
            redis_prefix: "shoal:gateway".into(),
            redis_timeout_ms: 50,
            cache: GatewayCacheSettings::default(),
            console: GatewayConsoleSettings::default(),
            identity: GatewayIdentitySettings::default(),
        }
    }
}

/// `[[gateway.registration_tokens]]`: a token that registers instances
/// in some pools and does nothing else, stored hashed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegistrationTokenSettings {
    /// Who holds it (shown in logs; unique).
    pub name: String,
    /// The token's SHA-256, 64 hex digits (`shoal token new` prints it).
    pub sha256: String,
    /// The pools its holder may register instances in.
    pub pools: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolSettings {
    pub name: String,
    /// Upstream base URLs such as `http://127.0.0.1:3001`.
    pub upstreams: Vec<String>,
    /// How to talk to the instances: HTTP/1.1 (default) or HTTP/2 over
    /// cleartext with prior knowledge (`h2c`), one multiplexed connection
    /// per instance and thread.
    #[serde(default, skip_serializing_if = "UpstreamProtocol::is_default")]
    pub protocol: UpstreamProtocol,
}

/// What serves HTTP/1.x from clients (`gateway.http1_server`).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Http1Server {
    #[default]
    Shoal,
    Hyper,
}

/// The protocol a pool's instances are spoken to in.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    H2c,
}

impl UpstreamProtocol {
    pub fn is_default(&self) -> bool {
        *self == UpstreamProtocol::Http1
    }
}

/// A certificate for some host names (`[[gateway.tls_sni]]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SniCertificate {
    /// Host names it serves: exact (`api.example.com`) or one wildcard
    /// label (`*.example.com`).
    pub names: Vec<String>,
    pub cert_file: String,
    pub key_file: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    /// Path prefix such as `/api/catalog/`; `/` matches everything.
    pub prefix: String,
    /// Only requests for this Host match, when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub pool: String,
    /// Overrides `gateway.request_timeout_ms` for this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_timeout_ms: Option<u64>,
    /// Overrides `gateway.max_body_bytes` for this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
    /// Overrides `gateway.rate_limit` for this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSettings>,
    /// Overrides `gateway.cache.enabled` for this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<bool>,
    /// Only requests with a live session pass (401 otherwise); the
    /// instance gets the session's user id in `gateway.identity`'s
    /// `user_header`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_session: bool,
    /// Headers to remove from, then set on, requests sent upstream.
    #[serde(default, skip_serializing_if = "HeaderRules::is_empty")]
    pub request_headers: HeaderRules,
    /// Headers to remove from, then set on, responses to clients.
    #[serde(default, skip_serializing_if = "HeaderRules::is_empty")]
    pub response_headers: HeaderRules,
}

/// Header rules of a route: `remove` goes first, then `set` replaces or
/// adds. Names and values are checked when the gateway builds its routes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderRules {
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl HeaderRules {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }
}

impl GatewaySettings {
    /// Whether the listener speaks TLS.
    pub fn tls(&self) -> bool {
        !self.tls_cert_file.is_empty()
    }

    pub fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |key: String, message: String| Err(SettingsError::Invalid { key, message });
        if self.console.session_secs == 0 || self.console.session_secs > 30 * 24 * 3600 {
            return invalid(
                "gateway.console.session_secs".into(),
                "must be between 1 and 2592000 (30 days)".into(),
            );
        }
        let identity = &self.identity;
        if !identity.check_path.starts_with('/') {
            return invalid(
                "gateway.identity.check_path".into(),
                format!("`{}` is not a path (it starts with /)", identity.check_path),
            );
        }
        if identity.cookie_name.is_empty()
            || !identity
                .cookie_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return invalid(
                "gateway.identity.cookie_name".into(),
                "must be a cookie name: letters, digits, - _ and .".into(),
            );
        }
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if identity.user_header.is_empty() || !identity.user_header.bytes().all(token) {
            return invalid(
                "gateway.identity.user_header".into(),
                format!("`{}` is not a valid header name", identity.user_header),
            );
        }
        if identity.cache_ms > 60_000 {
            return invalid(
                "gateway.identity.cache_ms".into(),
                "must be at most 60000: an ended session would pass for longer".into(),
            );
        }
        for (what, urls) in [
            ("workers", &self.console.workers),
            ("peers", &self.console.peers),
        ] {
            for (i, url) in urls.iter().enumerate() {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    return invalid(
                        format!("gateway.console.{what}[{i}]"),
                        format!("`{url}` is not an http:// or https:// URL"),
                    );
                }
            }
        }
        for (i, pool) in self.pools.iter().enumerate() {
            if pool.name.is_empty() {
                return invalid(
                    format!("gateway.pools[{i}].name"),
                    "must not be empty".into(),
                );
            }
            for (j, up) in pool.upstreams.iter().enumerate() {
                if !(up.starts_with("http://") || up.starts_with("https://")) {
                    return invalid(
                        format!("gateway.pools[{i}].upstreams[{j}]"),
                        format!(
                            "`{up}` must be an http:// or https:// URL such as http://127.0.0.1:3001"
                        ),
                    );
                }
            }
        }
        if !(self.redis_url.is_empty()
            || self.redis_url.starts_with("redis://")
            || self.redis_url.starts_with("redis+unix://"))
        {
            return invalid(
                "gateway.redis_url".into(),
                format!(
                    "`{}` must be a redis:// URL such as redis://10.0.0.5:6379/0, or empty",
                    self.redis_url
                ),
            );
        }
        if !self.redis_url.is_empty()
            && (self.redis_timeout_ms == 0 || self.redis_prefix.is_empty())
        {
            return invalid(
                "gateway.redis_timeout_ms".into(),
                "with gateway.redis_url set, redis_timeout_ms must be at least 1 and redis_prefix not empty".into(),
            );
        }
        if !(self.health_path.is_empty() || self.health_path.starts_with('/')) {
            return invalid(
                "gateway.health_path".into(),
                format!(
                    "`{}` must be a path such as /readyz, or empty for a TCP connect check",
                    self.health_path
                ),
            );
        }
        for (i, route) in self.routes.iter().enumerate() {
            if !route.prefix.starts_with('/') {
                return invalid(
                    format!("gateway.routes[{i}].prefix"),
                    "must start with `/`".into(),
                );
            }
            if !self.pools.iter().any(|p| p.name == route.pool) {
                return invalid(
                    format!("gateway.routes[{i}].pool"),
                    format!("no pool is named `{}`", route.pool),
                );
            }
        }
        for (name, b) in &self.balancing {
            let key = |field: &str| format!("gateway.balancing.{name}.{field}");
            if !self.pools.iter().any(|p| &p.name == name) {
                return invalid(
                    format!("gateway.balancing.{name}"),
                    format!("no pool is named `{name}`"),
                );
            }
            let kind = b.balancer.unwrap_or(self.balancer);
            match (&b.hash_on, kind) {
                (Some(h), _) if !valid_hash_on(h) => {
                    return invalid(
                        key("hash_on"),
                        format!("`{h}` must be `header:<name>`, `cookie:<name>` or `client_ip`"),
                    );
                }
                (None, BalancerKind::ConsistentHash) => {
                    return invalid(
                        key("hash_on"),
                        "consistent_hash needs `hash_on` (`header:<name>`, `cookie:<name>` or `client_ip`)".into(),
                    );
                }
                _ => {}
            }
            for (url, w) in &b.weights {
                if !(1..=1000).contains(w) {
                    return invalid(
                        key("weights"),
                        format!("weight of `{url}` must be 1..=1000"),
                    );
                }
            }
        }
        if self.balancer == BalancerKind::ConsistentHash {
            return invalid(
                "gateway.balancer".into(),
                "consistent_hash needs a key: set it per pool in `gateway.balancing.<pool>` with `hash_on`".into(),
            );
        }
        if !(self.retry_budget_percent >= 0.0 && self.retry_budget_percent <= 1000.0) {
            return invalid(
                "gateway.retry_budget_percent".into(),
                "must be between 0 and 1000".into(),
            );
        }
        if !(self.ewma_latency_exponent >= 0.0 && self.ewma_latency_exponent <= 8.0) {
            return invalid(
                "gateway.ewma_latency_exponent".into(),
                "must be between 0 and 8".into(),
            );
        }
        if self.ewma_decay_ms == 0 {
            return invalid("gateway.ewma_decay_ms".into(), "must be at least 1".into());
        }
        if self.max_ejection_percent > 100 {
            return invalid(
                "gateway.max_ejection_percent".into(),
                "must be between 0 and 100".into(),
            );
        }
        for (key, token) in [
            ("gateway.admin_token", &self.admin_token),
            ("gateway.metrics_token", &self.metrics_token),
        ] {
            if let Some(t) = token {
                if t.len() < 16 {
                    return invalid(
                        key.into(),
                        "must be at least 16 characters (a random one: \
                         `head -c 32 /dev/urandom | base64`); leave it out to turn these endpoints off"
                            .into(),
                    );
                }
            }
        }
        for (i, t) in self.registration_tokens.iter().enumerate() {
            let key = |field: &str| format!("gateway.registration_tokens[{i}].{field}");
            if t.name.is_empty() || t.name.len() > 64 {
                return invalid(key("name"), "must be 1-64 characters".into());
            }
            if self.registration_tokens[..i]
                .iter()
                .any(|o| o.name == t.name)
            {
                return invalid(
                    key("name"),
                    "another registration token has this name".into(),
                );
            }
            if !crate::bearer::is_sha256_hex(&t.sha256) {
                return invalid(
                    key("sha256"),
                    "must be the token's SHA-256 in 64 hex digits (`shoal token new` prints it)"
                        .into(),
                );
            }
            if t.pools.is_empty() || t.pools.iter().any(|p| p.is_empty()) {
                return invalid(key("pools"), "must name at least one pool".into());
            }
        }
        for name in self.pool_max_concurrent_requests.keys() {
            if !self.pools.iter().any(|p| &p.name == name) {
                return invalid(
                    format!("gateway.pool_max_concurrent_requests.{name}"),
                    format!("no pool is named `{name}`"),
                );
            }
        }
        if let Some(r) = &self.rate_limit {
            r.validate("gateway.rate_limit")?;
        }
        for (i, route) in self.routes.iter().enumerate() {
            if let Some(r) = &route.rate_limit {
                r.validate(&format!("gateway.routes[{i}].rate_limit"))?;
            }
        }
        if self.max_header_bytes < 8192 {
            return invalid(
                "gateway.max_header_bytes".into(),
                "must be at least 8192".into(),
            );
        }
        if self.header_read_timeout_ms == 0 {
            return invalid(
                "gateway.header_read_timeout_ms".into(),
                "must be at least 1".into(),
            );
        }
        if self.tls_cert_file.is_empty() != self.tls_key_file.is_empty() {
            let missing = if self.tls_cert_file.is_empty() {
                "gateway.tls_cert_file"
            } else {
                "gateway.tls_key_file"
            };
            return invalid(
                missing.into(),
                "TLS needs both tls_cert_file and tls_key_file".into(),
            );
        }
        if !self.tls_sni.is_empty() && !self.tls() {
            return invalid(
                "gateway.tls_sni".into(),
                "needs tls_cert_file and tls_key_file (the certificate for every other name)"
                    .into(),
            );
        }
        for (i, sni) in self.tls_sni.iter().enumerate() {
            if sni.names.is_empty() || sni.names.iter().any(|n| n.trim().is_empty()) {
                return invalid(
                    format!("gateway.tls_sni[{i}].names"),
                    "name at least one host, none empty".into(),
                );
            }
        }
        self.cache.validate()?;
        if self.health_interval_ms == 0 || self.health_timeout_ms == 0 {
            return invalid(
                "gateway.health_interval_ms".into(),
                "health interval and timeout must be at least 1 ms".into(),
            );
        }
        Ok(())
    }
}

impl BalancerKind {
    /// The name used in settings (`p2c_peak_ewma`, `round_robin`, ...).
    /// Lets crates match on the kind while this module is not re-exported.
    pub fn name(self) -> &'static str {
        match self {
            BalancerKind::P2cPeakEwma => "p2c_peak_ewma",
            BalancerKind::RoundRobin => "round_robin",
            BalancerKind::LeastRequests => "least_requests",
            BalancerKind::WeightedRoundRobin => "weighted_round_robin",
            BalancerKind::ConsistentHash => "consistent_hash",
        }
    }
}

impl GatewayCacheSettings {
    fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |field: &str, message: String| {
            Err(SettingsError::Invalid {
                key: format!("gateway.cache.{field}"),
                message,
            })
        };
        if self.max_bytes < 1024 {
            return invalid("max_bytes", "must be at least 1024".into());
        }
        if self.max_object_bytes == 0 || self.max_object_bytes > self.max_bytes {
            return invalid(
                "max_object_bytes",
                "must be at least 1 and at most gateway.cache.max_bytes".into(),
            );
        }
        if self.max_object_bytes > u32::MAX as u64 {
            return invalid("max_object_bytes", "must be below 4 GiB".into());
        }
        if self.heuristic_percent > 100 {
            return invalid("heuristic_percent", "must be 0..=100".into());
        }
        if self.coalesce_timeout_ms == 0 || self.purge_peer_timeout_ms == 0 {
            return invalid(
                "coalesce_timeout_ms",
                "coalesce_timeout_ms and purge_peer_timeout_ms must be at least 1".into(),
            );
        }
        for (i, peer) in self.purge_peers.iter().enumerate() {
            let ok = peer
                .strip_prefix("http://")
                .is_some_and(|rest| !rest.is_empty() && !rest.contains(['?', '#']));
            if !ok {
                return invalid(
                    &format!("purge_peers[{i}]"),
                    format!("`{peer}` must be an http:// base URL such as http://10.0.0.2:8080"),
                );
            }
        }
        Ok(())
    }
}

impl RateLimitSettings {
    fn validate(&self, key: &str) -> Result<(), SettingsError> {
        let invalid = |field: &str, message: &str| {
            Err(SettingsError::Invalid {
                key: format!("{key}.{field}"),
                message: message.into(),
            })
        };
        if !(self.requests_per_sec > 0.0 && self.requests_per_sec <= 1e9) {
            return invalid("requests_per_sec", "must be above 0");
        }
        if self.burst == 0 {
            return invalid("burst", "must be at least 1");
        }
        let ok = self.key == "client_ip"
            || self
                .key
                .strip_prefix("header:")
                .is_some_and(|h| valid_hash_on(&format!("header:{h}")));
        if !ok {
            return invalid("key", "must be `client_ip` or `header:<name>`");
        }
        Ok(())
    }
}

/// Accepts `header:<name>`, `cookie:<name>` or `client_ip`.
fn valid_hash_on(text: &str) -> bool {
    if text == "client_ip" {
        return true;
    }
    let Some((kind, name)) = text.split_once(':') else {
        return false;
    };
    !name.is_empty()
        && match kind {
            "header" => name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)),
            "cookie" => !name.contains([';', '=', ' ']),
            _ => false,
        }
}
