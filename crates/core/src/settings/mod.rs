//! The one typed settings tree of every Shoal role, and how it is loaded:
//! defaults, then an optional TOML file, then `SHOAL_*` environment
//! variables, then command-line flags (applied by the binary). Unknown keys
//! and bad values are errors that name the key and say what is allowed.

mod cache;
mod gateway;
mod load;
mod media;
mod notifications;
mod payments;

pub use cache::{BusBackend, CacheSettings, CatalogSettings};
pub use gateway::{
    GatewayCacheSettings, GatewayConsoleSettings, GatewayIdentitySettings, GatewaySettings,
    HeaderRules, Http1Server, PoolSettings, RateLimitSettings, RegistrationTokenSettings,
    RouteSettings, SniCertificate, UpstreamProtocol,
};
pub use load::{load, service_section, SettingsError};
pub use media::{BlobBackend, BlobSettings, MediaSettings};
pub use notifications::NotificationsSettings;
pub use payments::{
    PaymentsSettings, SandboxSettings, DEVELOPMENT_API_KEY, DEVELOPMENT_WEBHOOK_SECRET,
};
/// The TOML types the `services` sections are kept in.
pub use toml;

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Every setting of every role. Each section belongs to one role or part.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Where embedded state lives: SQLite files, blobs, emails, run files.
    pub data_dir: PathBuf,
    /// A name for this process in logs and the `x-shoal-instance` header.
    pub instance: String,
    /// A development run: roles start with the known development secrets
    /// (the sandbox's API key and webhook secret), warning about each.
    /// Off, every role but `shoal up` (which makes random ones per data
    /// directory) refuses to start with them. `--development` or
    /// `SHOAL_DEVELOPMENT=true`.
    pub development: bool,
    pub log: LogSettings,
    pub metrics: MetricsSettings,
    pub traces: TraceSettings,
    pub database: DatabaseSettings,
    pub sessions: SessionSettings,
    pub serve: ServeSettings,
    pub gateway: GatewaySettings,
    pub worker: WorkerSettings,
    pub queue: QueueSettings,
    pub up: UpSettings,
    pub accounts: AccountsSettings,
    pub payments: PaymentsSettings,
    pub sandbox: SandboxSettings,
    pub cache: CacheSettings,
    pub catalog: CatalogSettings,
    pub blobs: BlobSettings,
    pub media: MediaSettings,
    pub notifications: NotificationsSettings,
    pub clients: ClientsSettings,
    /// The sections of services built into a binary with
    /// `shoal::Builder` (`[services.<name>]`, `SHOAL_SERVICES__<NAME>__<KEY>`),
    /// kept as given; each service reads its own with
    /// [`service_section`](crate::settings::service_section).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub services: std::collections::BTreeMap<String, toml::Value>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            data_dir: PathBuf::from("shoal-data"),
            instance: String::new(),
            development: false,
            log: LogSettings::default(),
            metrics: MetricsSettings::default(),
            traces: TraceSettings::default(),
            database: DatabaseSettings::default(),
            sessions: SessionSettings::default(),
            serve: ServeSettings::default(),
            gateway: GatewaySettings::default(),
            worker: WorkerSettings::default(),
            queue: QueueSettings::default(),
            up: UpSettings::default(),
            accounts: AccountsSettings::default(),
            payments: PaymentsSettings::default(),
            sandbox: SandboxSettings::default(),
            cache: CacheSettings::default(),
            catalog: CatalogSettings::default(),
            blobs: BlobSettings::default(),
            media: MediaSettings::default(),
            notifications: NotificationsSettings::default(),
            clients: ClientsSettings::default(),
            services: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object a line: for machines and log shippers.
    Json,
    /// Human-readable lines: for a terminal.
    Pretty,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// A tracing filter: `info`, `shoal_gateway=debug,info`, ...
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".into(),
            format: LogFormat::Json,
        }
    }
}

/// Distributed traces (`[traces]`, docs/traces.md).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TraceSettings {
    /// An OTLP/HTTP receiver (`http://127.0.0.1:4318`, a collector or
    /// Jaeger) that every role sends its spans to, JSON-encoded, at
    /// `/v1/traces`. Empty: traces are off.
    pub otlp_endpoint: String,
}

/// Who may read `/metrics` of `serve` and `worker`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// Bearer token (`Authorization: Bearer ...`) that `/metrics` of
    /// `serve` and `worker` require. Unset, `/metrics` answers 403 to
    /// everyone: an instance's routes are reachable through the gateway.
    /// `shoal up` writes a random one to `<data_dir>/secrets/metrics-token`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseBackend {
    /// A SQLite file under the data directory (WAL mode), shared by every
    /// process on this machine.
    Sqlite,
    /// A PostgreSQL server named by `database.url`.
    Postgres,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseSettings {
    pub backend: DatabaseBackend,
    /// Connection URL. For sqlite, defaults to `<data_dir>/shoal.db`.
    /// For postgres it is required: `postgres://user:pass@host/db`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub max_connections: u32,
    /// How long to wait for a pooled connection before failing, ms.
    pub acquire_timeout_ms: u64,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        DatabaseSettings {
            backend: DatabaseBackend::Sqlite,
            url: None,
            max_connections: 16,
            acquire_timeout_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SessionBackend {
    /// Sessions in the main database (SQLite or PostgreSQL).
    #[serde(alias = "sqlite", alias = "postgres")]
    Database,
    /// Sessions in Redis (`sessions.redis_url`).
    Redis,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CookieSecure {
    /// Secure when the request arrived over TLS (`X-Forwarded-Proto: https`).
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SessionSettings {
    pub backend: SessionBackend,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redis_url: Option<String>,
    /// Prefix for every Redis key, so several deployments can share a server.
    pub redis_prefix: String,
    /// Idle lifetime: each use extends the session by this much (sliding).
    pub idle_timeout_secs: u64,
    /// Absolute lifetime from login, whatever the activity.
    pub absolute_timeout_secs: u64,
    pub cookie_name: String,
    pub cookie_secure: CookieSecure,
}

impl Default for SessionSettings {
    fn default() -> Self {
        SessionSettings {
            backend: SessionBackend::Database,
            redis_url: None,
            redis_prefix: "shoal".into(),
            idle_timeout_secs: 7 * 24 * 3600,
            absolute_timeout_secs: 30 * 24 * 3600,
            cookie_name: "shoal_session".into(),
            cookie_secure: CookieSecure::Auto,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServeSettings {
    pub listen: SocketAddr,
    /// Which services this instance runs: `all`, or names such as `accounts`.
    pub services: Vec<String>,
    /// A request that takes longer is answered 503 and its work cancelled.
    pub request_timeout_ms: u64,
    /// Largest request body accepted, in bytes (413 past it).
    pub body_limit_bytes: usize,
    /// Requests handled at once before new ones are shed with 503.
    pub max_concurrent_requests: usize,
    /// After a stop signal, how long `/readyz` says "draining" before the
    /// listener closes, so balancers stop sending first, ms.
    pub drain_delay_ms: u64,
    /// How long in-flight requests may take to finish after a stop signal.
    pub shutdown_timeout_secs: u64,
    /// Serve `/_debug/*` routes (sleep, panic) used by fault tests. Off in
    /// production.
    pub debug_routes: bool,
    /// Origins (`https://app.example.com`) besides a request's own that
    /// may send requests that carry the session cookie and change
    /// something, or open a WebSocket; every other origin is refused (403).
    pub allowed_origins: Vec<String>,
    /// Gateways to register this instance with (base URLs, e.g.
    /// `http://10.0.0.1:8080`; a list, or one string with commas): the
    /// instance adds itself to `register_pool` on each through
    /// `POST /_gateway/admin/register`, renews every third of
    /// `register_ttl_secs`, and deregisters from each when it starts
    /// draining. Several gateways know every instance, so none is a
    /// single point of failure. Sends `gateway.admin_token`, which the
    /// gateways require.
    #[serde(deserialize_with = "one_or_many")]
    pub register_at: Vec<String>,
    pub register_pool: String,
    pub register_ttl_secs: u64,
    /// The URL the gateway should use for this instance; default
    /// `http://<listen address>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advertise_url: Option<String>,
    /// Responses smaller than this many bytes are sent uncompressed
    /// whatever the client accepts (compressing them costs more CPU than
    /// it saves on the wire). 0 compresses every compressible response.
    pub compression_min_bytes: usize,
    /// Memory for compressed representations of responses with a strong
    /// ETag, kept by URL, ETag and encoding so each is compressed once, in
    /// bytes. 0 = compress on every request.
    pub compression_cache_bytes: u64,
}

impl Default for ServeSettings {
    fn default() -> Self {
        ServeSettings {
            listen: "127.0.0.1:3000".parse().unwrap(),
            services: vec!["all".into()],
            request_timeout_ms: 30_000,
            body_limit_bytes: 1024 * 1024,
            max_concurrent_requests: 10_000,
            drain_delay_ms: 0,
            shutdown_timeout_secs: 20,
            debug_routes: false,
            allowed_origins: Vec::new(),
            register_at: Vec::new(),
            register_pool: "default".into(),
            register_ttl_secs: 6,
            advertise_url: None,
            compression_min_bytes: 1024,
            compression_cache_bytes: 16 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerSettings {
    /// Queues this worker takes jobs from.
    pub queues: Vec<String>,
    /// Jobs run at once by this worker.
    pub concurrency: usize,
    /// A running job's lease, ms: the worker renews it every third of it,
    /// and a job whose worker died runs again this long after its last
    /// renewal.
    pub lease_ms: u64,
    /// How often housekeeping (expired sessions, old jobs) runs, seconds.
    pub housekeeping_interval_secs: u64,
    /// How long running jobs may take to finish after a stop signal.
    pub shutdown_timeout_secs: u64,
    /// Address of the worker's `/healthz`, `/readyz` (can it claim jobs?)
    /// and `/metrics`: probes and scrapers need a known port. Port 0 picks
    /// one (what `shoal up` does for each of its workers).
    pub listen: SocketAddr,
    /// Runtime threads of a worker process (and of `shoal jobs`): 1, the
    /// default, is one single-threaded event loop, the fastest per core
    /// (run more worker processes to use more cores); more is a
    /// work-stealing runtime with that many threads; 0 is one per core.
    pub threads: usize,
    /// Queues bound to HTTP endpoints (`[[worker.push]]`): each job is
    /// POSTed there, signed, instead of run by a handler in this binary
    /// (docs/queue.md, "Push delivery").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub push: Vec<PushSettings>,
}

/// `[[worker.push]]`: one queue whose jobs are delivered to an HTTP
/// endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PushSettings {
    /// The queue (taken by this worker besides `worker.queues`).
    pub queue: String,
    /// Where each job is POSTed: `http://` or `https://`.
    pub url: String,
    /// Deliveries in flight at once.
    #[serde(default = "default_push_concurrency")]
    pub concurrency: usize,
    /// Deliveries started per second at most (0: no limit).
    #[serde(default)]
    pub rate_per_sec: f64,
    /// The key that signs each delivery (Standard Webhooks' HMAC-SHA256),
    /// 16 characters at least; the endpoint checks the signature with it.
    /// Redacted by `shoal config`.
    pub secret: String,
}

fn default_push_concurrency() -> usize {
    10
}

impl Default for WorkerSettings {
    fn default() -> Self {
        WorkerSettings {
            queues: vec![
                "default".into(),
                "media".into(),
                "payments".into(),
                "orders".into(),
                "email".into(),
                "notifications".into(),
            ],
            concurrency: 8,
            lease_ms: 30_000,
            housekeeping_interval_secs: 60,
            shutdown_timeout_secs: 20,
            listen: "127.0.0.1:9091".parse().unwrap(),
            threads: 1,
            push: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QueueBackend {
    /// The main database (SQLite or PostgreSQL, `FOR UPDATE SKIP LOCKED`).
    #[serde(alias = "sqlite", alias = "postgres")]
    Database,
    /// NATS JetStream at `queue.nats_url`. Services still enqueue into the
    /// database inside their own transactions (the outbox); workers relay
    /// committed jobs into JetStream and run them from there.
    Nats,
}

/// Where background jobs wait and run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueSettings {
    pub backend: QueueBackend,
    /// Required with `backend = "nats"`, e.g. `nats://127.0.0.1:4222`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_url: Option<String>,
    /// Names the JetStream stream and buckets (`[A-Za-z0-9_-]`), so
    /// several deployments can share a NATS server.
    pub nats_prefix: String,
}

impl Default for QueueSettings {
    fn default() -> Self {
        QueueSettings {
            backend: QueueBackend::Database,
            nats_url: None,
            nats_prefix: "shoal".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct UpSettings {
    /// The gateway's port on 127.0.0.1 (or `up.host`).
    pub port: u16,
    pub host: String,
    /// How many `serve` processes to run.
    pub instances: usize,
    /// How many `worker` processes to run.
    pub workers: usize,
    /// Deadline for the whole stack to stop after Ctrl-C or SIGTERM.
    pub shutdown_timeout_secs: u64,
    /// A child that crashes this many times within `crash_window_secs` is
    /// given up on, and the stack stops with an error.
    pub max_restarts: u32,
    pub crash_window_secs: u64,
    /// Run the payment sandbox and point `payments.provider_url` at it.
    pub sandbox: bool,
    /// How the children's log lines are shown: `pretty` (one readable
    /// line each, prefixed with the process's name), `json` (their JSON
    /// lines with a `process` field), or `auto`: pretty on a terminal,
    /// JSON otherwise.
    pub logs: String,
}

impl Default for UpSettings {
    fn default() -> Self {
        UpSettings {
            port: 8080,
            host: "127.0.0.1".into(),
            instances: 3,
            workers: 1,
            shutdown_timeout_secs: 30,
            max_restarts: 5,
            crash_window_secs: 60,
            sandbox: true,
            logs: "auto".into(),
        }
    }
}

/// How services call each other over HTTP (client-side balanced).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClientsSettings {
    /// Base URLs of catalog instances. Empty: this instance itself.
    pub catalog: Vec<String>,
    /// Deadline of one call, including retries, ms.
    pub timeout_ms: u64,
    /// Extra attempts on other instances for idempotent calls.
    pub retries: u32,
    /// Consecutive failures that open an instance's circuit breaker.
    pub breaker_failures: u32,
    /// How long an open breaker rejects calls before one trial, ms.
    pub breaker_open_ms: u64,
    /// The token Shoal's services present to each other (`Authorization:
    /// Bearer`) on internal endpoints (the catalog's stock reservations).
    /// The same on every `serve`; the development default is refused
    /// outside a development run.
    pub token: String,
    /// Tokens of the team's own services (any language), each limited to
    /// some endpoints (`[[clients.service_tokens]]`; `shoal token new`
    /// makes one). Only each token's SHA-256 is kept here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_tokens: Vec<ServiceTokenSettings>,
}

/// The scopes a service token can have, and the endpoints they open.
pub const SERVICE_TOKEN_SCOPES: &[(&str, &str)] = &[
    ("jobs:enqueue", "POST /api/jobs"),
    ("events:publish", "POST /api/notifications/events"),
];

/// `[[clients.service_tokens]]`: one service's token, stored hashed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceTokenSettings {
    /// Who holds it (shown in logs; unique).
    pub name: String,
    /// The token's SHA-256, 64 hex digits (`shoal token new` prints it).
    pub sha256: String,
    /// What it may call: `jobs:enqueue`, `events:publish`.
    pub scopes: Vec<String>,
}

/// The development default of `clients.token` (known to everyone).
pub const DEVELOPMENT_SERVICE_TOKEN: &str = "shoal-development-service-token";

impl Default for ClientsSettings {
    fn default() -> Self {
        ClientsSettings {
            token: DEVELOPMENT_SERVICE_TOKEN.into(),
            catalog: Vec::new(),
            timeout_ms: 2_000,
            retries: 2,
            breaker_failures: 5,
            breaker_open_ms: 5_000,
            service_tokens: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AccountsSettings {
    pub min_password_length: usize,
    /// Failed logins allowed per account and client (a known device, or
    /// else the address) within `login_window_secs`, before each further
    /// failure doubles the wait (1 s, 2 s, 4 s...); ten times as many from
    /// all new devices together hold back new devices, never known ones.
    pub login_attempts_per_account: u32,
    /// Login attempts allowed per client address within `login_window_secs`.
    pub login_attempts_per_address: u32,
    pub login_window_secs: u64,
}

impl Default for AccountsSettings {
    fn default() -> Self {
        AccountsSettings {
            min_password_length: 8,
            login_attempts_per_account: 10,
            login_attempts_per_address: 100,
            login_window_secs: 900,
        }
    }
}

impl Settings {
    /// The database URL in effect: the configured one, or the SQLite file
    /// under the data directory.
    pub fn database_url(&self) -> Result<String, SettingsError> {
        match (&self.database.backend, &self.database.url) {
            (_, Some(url)) => Ok(url.clone()),
            (DatabaseBackend::Sqlite, None) => Ok(format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("shoal.db").display()
            )),
            (DatabaseBackend::Postgres, None) => Err(SettingsError::Invalid {
                key: "database.url".into(),
                message: "required when database.backend = \"postgres\" \
                          (for example postgres://user@127.0.0.1/shoal)"
                    .into(),
            }),
        }
    }

    /// Checks that go beyond types: combinations and ranges.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |key: &str, message: &str| {
            Err(SettingsError::Invalid {
                key: key.into(),
                message: message.into(),
            })
        };
        self.database_url()?;
        if let Some(url) = &self.database.url {
            let ok = match self.database.backend {
                DatabaseBackend::Sqlite => url.starts_with("sqlite:"),
                DatabaseBackend::Postgres => {
                    url.starts_with("postgres://") || url.starts_with("postgresql://")
                }
            };
            if !ok {
                return invalid(
                    "database.url",
                    "its scheme must match database.backend (sqlite: or postgres://)",
                );
            }
        }
        if self.sessions.backend == SessionBackend::Redis && self.sessions.redis_url.is_none() {
            return invalid(
                "sessions.redis_url",
                "required when sessions.backend = \"redis\" (for example redis://127.0.0.1:6379)",
            );
        }
        if self.queue.backend == QueueBackend::Nats && self.queue.nats_url.is_none() {
            return invalid(
                "queue.nats_url",
                "required when queue.backend = \"nats\" (for example nats://127.0.0.1:4222)",
            );
        }
        if self.queue.nats_prefix.is_empty()
            || !self
                .queue
                .nats_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return invalid("queue.nats_prefix", "must be letters, digits, `_` or `-`");
        }
        if self.database.max_connections == 0 {
            return invalid("database.max_connections", "must be at least 1");
        }
        if !self.traces.otlp_endpoint.is_empty()
            && !self.traces.otlp_endpoint.starts_with("http://")
        {
            return invalid(
                "traces.otlp_endpoint",
                "must be an http:// URL of an OTLP/HTTP receiver (e.g. http://127.0.0.1:4318)",
            );
        }
        if !matches!(self.up.logs.as_str(), "auto" | "pretty" | "json") {
            return invalid("up.logs", "must be auto, pretty or json");
        }
        if self.up.instances == 0 || self.up.instances > 64 {
            return invalid("up.instances", "must be between 1 and 64");
        }
        if !(2..=300).contains(&self.serve.register_ttl_secs) {
            return invalid("serve.register_ttl_secs", "must be between 2 and 300");
        }
        for url in &self.serve.register_at {
            if let Err(why) = check_base_url(url) {
                return Err(SettingsError::Invalid {
                    key: "serve.register_at".into(),
                    message: format!(
                        "`{url}` {why} (list gateways as http://host:port, separated by commas)"
                    ),
                });
            }
        }
        if let Some(url) = &self.serve.advertise_url {
            if let Err(why) = check_base_url(url) {
                return Err(SettingsError::Invalid {
                    key: "serve.advertise_url".into(),
                    message: format!("`{url}` {why}"),
                });
            }
        }
        if !self.serve.register_at.is_empty() && self.gateway.admin_token.is_none() {
            return invalid(
                "gateway.admin_token",
                "required when serve.register_at is set: instances register through the \
                 gateways' admin API, which answers only its token (the same on every gateway)",
            );
        }
        if !self.serve.register_at.is_empty()
            && self.serve.advertise_url.is_none()
            && self.serve.listen.ip().is_unspecified()
        {
            return invalid(
                "serve.advertise_url",
                "required when serve.listen is an unspecified address (0.0.0.0 or [::]) and \
                 serve.register_at is set: the gateways need an address they can reach this \
                 instance at, such as http://10.0.0.5:3000",
            );
        }
        if !(300..=3_600_000).contains(&self.worker.lease_ms) {
            return invalid(
                "worker.lease_ms",
                "must be between 300 and 3600000 (one hour)",
            );
        }
        for (i, t) in self.clients.service_tokens.iter().enumerate() {
            let key = |field: &str| format!("clients.service_tokens[{i}].{field}");
            if t.name.is_empty() || t.name.len() > 64 {
                return invalid(&key("name"), "must be 1-64 characters");
            }
            if self.clients.service_tokens[..i]
                .iter()
                .any(|o| o.name == t.name)
            {
                return invalid(&key("name"), "another service token has this name");
            }
            if !crate::bearer::is_sha256_hex(&t.sha256) {
                return invalid(
                    &key("sha256"),
                    "must be the token's SHA-256 in 64 hex digits (`shoal token new` prints it)",
                );
            }
            if t.scopes.is_empty() {
                return invalid(&key("scopes"), "must name at least one scope");
            }
            if let Some(bad) = t
                .scopes
                .iter()
                .find(|s| !SERVICE_TOKEN_SCOPES.iter().any(|(k, _)| k == s))
            {
                let known: Vec<&str> = SERVICE_TOKEN_SCOPES.iter().map(|(k, _)| *k).collect();
                return invalid(
                    &key("scopes"),
                    &format!(
                        "`{bad}` is not a scope; the scopes are {}",
                        known.join(", ")
                    ),
                );
            }
        }
        for (i, push) in self.worker.push.iter().enumerate() {
            let key = |field: &str| format!("worker.push[{i}].{field}");
            let queue_ok = !push.queue.is_empty()
                && push.queue.len() <= 64
                && push
                    .queue
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
            if !queue_ok {
                return invalid(&key("queue"), "1-64 characters of letters, digits, - _ .");
            }
            if !(push.url.starts_with("http://") || push.url.starts_with("https://")) {
                return invalid(&key("url"), "must be an http:// or https:// URL");
            }
            if !(1..=1000).contains(&push.concurrency) {
                return invalid(&key("concurrency"), "must be between 1 and 1000");
            }
            if !(push.rate_per_sec >= 0.0 && push.rate_per_sec.is_finite()) {
                return invalid(&key("rate_per_sec"), "must be 0 (no limit) or more");
            }
            if push.secret.chars().count() < 16 {
                return invalid(&key("secret"), "must be at least 16 characters");
            }
            if self.worker.push[..i].iter().any(|p| p.queue == push.queue) {
                return invalid(&key("queue"), "another [[worker.push]] has this queue");
            }
        }
        if self.worker.concurrency == 0 {
            return invalid("worker.concurrency", "must be at least 1");
        }
        if self.sessions.idle_timeout_secs == 0 {
            return invalid("sessions.idle_timeout_secs", "must be at least 1");
        }
        if self.serve.body_limit_bytes == 0 {
            return invalid("serve.body_limit_bytes", "must be at least 1");
        }
        if let Some(t) = &self.metrics.token {
            if t.len() < 16 {
                return invalid(
                    "metrics.token",
                    "must be at least 16 characters; leave it out to turn /metrics off",
                );
            }
        }
        if self.clients.token.len() < 16 {
            return invalid(
                "clients.token",
                "must be at least 16 characters (a random one: `openssl rand -hex 32`), the same on every serve and worker",
            );
        }
        self.gateway.validate()?;
        self.cache.validate()?;
        if let Err((key, message)) = self.notifications.validate() {
            return invalid(key, message);
        }
        Ok(())
    }

    /// The keys of the secrets `role` uses that still hold a value known
    /// to everyone (the development defaults), for the role to refuse to
    /// start with or, in a development run, to warn about.
    pub fn development_secrets(&self, role: Role) -> Vec<&'static str> {
        let mut found = Vec::new();
        match role {
            Role::Serve | Role::Worker => {
                if self.payments.api_key == payments::DEVELOPMENT_API_KEY {
                    found.push("payments.api_key");
                }
                if self.payments.webhook_secret == payments::DEVELOPMENT_WEBHOOK_SECRET {
                    found.push("payments.webhook_secret");
                }
                // Only instances call each other (workers reach the
                // catalog through its job, not its endpoint).
                if role == Role::Serve && self.clients.token == DEVELOPMENT_SERVICE_TOKEN {
                    found.push("clients.token");
                }
            }
            Role::Sandbox => {
                if self.sandbox.api_key == payments::DEVELOPMENT_API_KEY {
                    found.push("sandbox.api_key");
                }
                if self.sandbox.webhook_secret == payments::DEVELOPMENT_WEBHOOK_SECRET {
                    found.push("sandbox.webhook_secret");
                }
            }
        }
        found
    }

    /// The settings as TOML with secrets (URL passwords, secrets, tokens)
    /// replaced by `<redacted>`.
    pub fn to_redacted_toml(&self) -> String {
        let mut value = toml::Value::try_from(self).expect("settings serialize");
        redact(&mut value, "");
        toml::to_string_pretty(&value).unwrap_or_default()
    }
}

fn redact(value: &mut toml::Value, key: &str) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                redact(v, k);
            }
        }
        toml::Value::Array(a) => a.iter_mut().for_each(|v| redact(v, key)),
        toml::Value::String(s) => {
            let k = key.to_ascii_lowercase();
            if k.contains("secret")
                || k.contains("password")
                || k.contains("token")
                || k.ends_with("api_key")
            {
                *s = "<redacted>".into();
            } else if k.contains("url") || s.contains("://") {
                *s = redact_url_password(s);
            }
        }
        _ => {}
    }
}

/// Why `url` is not an `http://` or `https://` base URL with a host (and
/// nothing after an optional `/`).
fn check_base_url(url: &str) -> Result<(), &'static str> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or("is not an http:// or https:// URL")?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if !path.is_empty() {
        return Err("must be a base URL, with no path");
    }
    if authority.is_empty()
        || authority.starts_with(':')
        || !authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b))
    {
        return Err("has no valid host[:port]");
    }
    if let Some((_, port)) = authority.rsplit_once(':') {
        if !authority.ends_with(']') && port.parse::<u16>().is_err() {
            return Err("has an invalid port");
        }
    }
    Ok(())
}

/// A list setting that also takes one string, split at commas (TOML files
/// written when the setting was a single URL keep working).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        OneOrMany::Many(v) => v,
    })
}

/// `scheme://user:pass@host` becomes `scheme://user:<redacted>@host`.
pub fn redact_url_password(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        if let Some(at) = authority.rfind('@') {
            let userinfo = &authority[..at];
            if let Some(colon) = userinfo.find(':') {
                return format!(
                    "{}{}:<redacted>{}",
                    &url[..scheme_end + 3],
                    &userinfo[..colon],
                    &rest[at..]
                );
            }
        }
    }
    url.to_string()
}

/// A role that holds secrets, for [`Settings::development_secrets`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Serve,
    Worker,
    Sandbox,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_tokens_are_hashes_with_known_scopes() {
        let good = ServiceTokenSettings {
            name: "greetings".into(),
            sha256: "ab".repeat(32),
            scopes: vec!["jobs:enqueue".into(), "events:publish".into()],
        };
        let mut s = Settings::default();
        s.clients.service_tokens = vec![good.clone()];
        assert!(s.validate().is_ok());
        for (edit, key, says) in [
            (
                (|t: &mut ServiceTokenSettings| t.name = String::new())
                    as fn(&mut ServiceTokenSettings),
                "clients.service_tokens[0].name",
                "1-64",
            ),
            (
                |t| t.sha256 = "not-a-hash".into(),
                "clients.service_tokens[0].sha256",
                "64 hex",
            ),
            (
                |t| t.scopes = vec![],
                "clients.service_tokens[0].scopes",
                "at least one",
            ),
            (
                |t| t.scopes = vec!["catalog:reserve".into()],
                "clients.service_tokens[0].scopes",
                "jobs:enqueue, events:publish",
            ),
        ] {
            let mut bad = good.clone();
            edit(&mut bad);
            s.clients.service_tokens = vec![bad];
            let e = s.validate().expect_err(key).to_string();
            assert!(e.contains(key) && e.contains(says), "{e}");
        }
        s.clients.service_tokens = vec![good.clone(), good];
        let e = s.validate().expect_err("a name twice").to_string();
        assert!(e.contains("clients.service_tokens[1].name"), "{e}");
    }

    #[test]
    fn push_bindings_are_checked_and_their_secret_redacted() {
        let good = PushSettings {
            queue: "greetings".into(),
            url: "http://127.0.0.1:3000/jobs".into(),
            concurrency: 10,
            rate_per_sec: 0.0,
            secret: "a-push-secret-of-16+".into(),
        };
        let mut s = Settings::default();
        s.worker.push = vec![good.clone()];
        assert!(s.validate().is_ok());
        assert!(!s.to_redacted_toml().contains("a-push-secret"));
        for (edit, key) in [
            (
                (|p: &mut PushSettings| p.queue = "bad queue".into()) as fn(&mut PushSettings),
                "worker.push[0].queue",
            ),
            (|p| p.url = "ftp://x".into(), "worker.push[0].url"),
            (|p| p.concurrency = 0, "worker.push[0].concurrency"),
            (|p| p.rate_per_sec = -1.0, "worker.push[0].rate_per_sec"),
            (|p| p.secret = "short".into(), "worker.push[0].secret"),
        ] {
            let mut bad = good.clone();
            edit(&mut bad);
            s.worker.push = vec![bad];
            let e = s.validate().expect_err(key).to_string();
            assert!(e.contains(key), "{e}");
        }
        s.worker.push = vec![good.clone(), good];
        let e = s.validate().expect_err("a queue bound twice").to_string();
        assert!(e.contains("worker.push[1].queue"), "{e}");
    }

    #[test]
    fn development_secrets_are_named_until_replaced() {
        let mut s = Settings::default();
        assert_eq!(
            s.development_secrets(Role::Serve),
            [
                "payments.api_key",
                "payments.webhook_secret",
                "clients.token"
            ]
        );
        assert_eq!(
            s.development_secrets(Role::Worker),
            ["payments.api_key", "payments.webhook_secret"],
            "workers call no service endpoint"
        );
        assert_eq!(
            s.development_secrets(Role::Sandbox),
            ["sandbox.api_key", "sandbox.webhook_secret"]
        );
        s.payments.api_key = "sk_live_something_else".into();
        s.payments.webhook_secret = "whsec_random_for_this_deployment".into();
        s.clients.token = "a-random-service-token-for-this-deployment".into();
        assert!(s.development_secrets(Role::Worker).is_empty());
    }

    #[test]
    fn register_at_is_a_list_of_base_urls() {
        let s = crate::settings::load(
            None,
            [(
                "SHOAL_SERVE__REGISTER_AT".to_string(),
                "http://10.0.0.1:8080, http://gw-b:8080/".to_string(),
            )],
        )
        .unwrap();
        assert_eq!(
            s.serve.register_at,
            ["http://10.0.0.1:8080", "http://gw-b:8080/"]
        );
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("gateway.admin_token"), "{e}");
        let mut s = s;
        s.gateway.admin_token = Some("registration-token-0123".into());
        s.validate().unwrap();
        let from_file: Settings =
            toml::from_str("[serve]\nregister_at = \"http://a:1,http://b:2\"").unwrap();
        assert_eq!(from_file.serve.register_at, ["http://a:1", "http://b:2"]);
        for bad in [
            "http://a,http://b x",
            "gateway:8080",
            "http://:8080",
            "http://a:99999",
            "http://a/x",
        ] {
            let mut s = Settings::default();
            s.serve.register_at = vec![bad.into()];
            let e = s.validate().unwrap_err().to_string();
            assert!(e.contains("serve.register_at"), "{bad}: {e}");
        }
        // On every address, with gateways to register with: which one to
        // advertise must be said.
        let mut s = Settings::default();
        s.gateway.admin_token = Some("registration-token-0123".into());
        s.serve.register_at = vec!["http://gw:8080".into()];
        s.serve.listen = "0.0.0.0:3000".parse().unwrap();
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("serve.advertise_url"), "{e}");
        s.serve.advertise_url = Some("http://10.0.0.5:3000".into());
        s.validate().unwrap();
    }

    #[test]
    fn short_tokens_are_refused_naming_the_key() {
        let mut s = Settings::default();
        s.metrics.token = Some("short".into());
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("metrics.token"), "{e}");
        s.metrics.token = None;
        s.gateway.admin_token = Some("admin".into());
        let e = s.validate().unwrap_err().to_string();
        assert!(e.contains("gateway.admin_token"), "{e}");
    }

    #[test]
    fn url_passwords_are_redacted() {
        assert_eq!(
            redact_url_password("postgres://bob:hunter2@db:5432/x"),
            "postgres://bob:<redacted>@db:5432/x"
        );
        assert_eq!(
            redact_url_password("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        let mut s = Settings::default();
        s.database.backend = DatabaseBackend::Postgres;
        s.database.url = Some("postgres://bob:hunter2@db/x".into());
        let out = s.to_redacted_toml();
        assert!(!out.contains("hunter2"), "{out}");
        assert!(out.contains("<redacted>"));
    }

    #[test]
    fn the_upload_limits_of_the_gateway_and_the_media_service_agree() {
        let s = Settings::default();
        assert_eq!(s.media.max_upload_bytes, s.gateway.max_body_bytes);
    }

    #[test]
    fn defaults_are_valid() {
        Settings::default().validate().unwrap();
    }
}
