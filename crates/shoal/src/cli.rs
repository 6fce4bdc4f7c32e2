//! Command-line interface: subcommands, their flags and help texts, and how
//! flags override the settings tree.

use clap::{Args, Parser, Subcommand};
use shoal_core::settings::{PoolSettings, SettingsError};
use shoal_core::Settings;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "shoal",
    version,
    about = "Shoal: a horizontally scalable backend in one binary.",
    long_about = "Shoal: a horizontally scalable backend in one binary.\n\n\
        `shoal up` runs the whole stack on this machine (a gateway, several service \
        instances and a worker, as separate processes). The other commands run one \
        role each, for deployments across machines.\n\n\
        Settings come from defaults, then the --config TOML file, then SHOAL_* \
        environment variables (nested keys joined by `__`, e.g. SHOAL_DATABASE__URL), \
        then flags. `shoal config` prints the result.",
    after_help = "Examples:\n  shoal up                       # the whole stack on http://127.0.0.1:8080\n  shoal up --instances 5 --port 9000\n  shoal gateway --listen 127.0.0.1:8090 --to http://127.0.0.1:9001 --to http://127.0.0.1:9002\n  SHOAL_DATABASE__BACKEND=postgres SHOAL_DATABASE__URL=postgres://127.0.0.1/shoal shoal serve\n  shoal config --config shoal.toml"
)]
pub struct Cli {
    /// A TOML settings file (see docs/configuration.md for every key).
    #[arg(short, long, global = true, env = "SHOAL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Where embedded state lives (SQLite database, blobs, emails).
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Log filter, e.g. `info` or `shoal_gateway=debug,info`.
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,

    /// A development run: start with the known development secrets (the
    /// sandbox's API key and webhook secret), warning about each, instead
    /// of refusing to (`development = true`). `shoal up` needs no flag: it
    /// makes random secrets per data directory.
    #[arg(long, global = true)]
    pub development: bool,

    /// The supervisor's pid; a child stops when its supervisor is gone.
    #[arg(long, global = true, hide = true)]
    pub parent_pid: Option<u32>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Run the whole stack on this machine: a gateway on --port, N `serve`
    /// instances on free loopback ports and a worker, as child processes.
    /// Restarts what dies; Ctrl-C or SIGTERM drains and stops everything.
    Up(UpArgs),
    /// Run the edge gateway alone: routing, load balancing, health checks,
    /// retries. Fronts any HTTP servers, Shoal's or not.
    Gateway(GatewayArgs),
    /// Run one service instance (stateless; run as many as you like).
    Serve(ServeArgs),
    /// Run background workers and housekeeping.
    Worker(WorkerArgs),
    /// Apply every service's database migrations, then exit.
    Migrate(MigrateArgs),
    /// Load realistic catalog products into the database (fast, batched).
    Seed(SeedArgs),
    /// Inspect and manage background jobs, or benchmark the queue.
    Jobs(JobsArgs),
    /// Run the bundled payment sandbox (a Stripe-compatible fake provider).
    Sandbox(SandboxArgs),
    /// Print the effective settings as TOML, with secrets redacted.
    Config,
    /// Make a token for one of the team's services (any language): prints
    /// the token, to give that service, and the settings entries that
    /// accept it (its SHA-256 only): `[[clients.service_tokens]]` for
    /// every `serve` with --scope, `[[gateway.registration_tokens]]` for
    /// every gateway with --pool. Nothing is stored: rotate by adding a
    /// new entry, moving the service to its token, then removing the old
    /// one.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Write the start of something new: `shoal new service NAME`.
    New {
        #[command(subcommand)]
        command: NewCommand,
    },
    /// Print a completion script for a shell, e.g.
    /// `shoal completions bash > /etc/bash_completion.d/shoal`, or
    /// `shoal completions zsh > "${fpath[1]}/_shoal"`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum NewCommand {
    /// A Rust service crate (docs/services.md): one route, one migration,
    /// one job and their tests, and a binary that is Shoal plus the
    /// service (`cargo run -- up`). The crate is examples/rust-service
    /// with NAME in place of `greetings`.
    Service {
        /// The service's name: a-z, 0-9 and `_` (its crate, table, routes
        /// under /api/NAME and job kind).
        name: String,
        /// Where to write the crate (default: ./NAME; must not exist).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// The Shoal checkout the crate depends on by path (default: the
        /// one this binary was built from).
        #[arg(long, value_name = "PATH")]
        shoal: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum TokenCommand {
    /// A new token: `shoal token new --name greetings --scope jobs:enqueue
    /// --scope events:publish --pool greetings`.
    New {
        /// Who will hold it (shown in logs and metrics).
        #[arg(long)]
        name: String,
        /// What it may call: `jobs:enqueue` (POST /api/jobs),
        /// `events:publish` (POST /api/notifications/events). Repeat for
        /// several.
        #[arg(long = "scope", required_unless_present = "pools")]
        scopes: Vec<String>,
        /// A gateway pool its holder may register its instances in
        /// (`POST /_gateway/admin/register`, and deregister); nothing
        /// else of the admin API. Repeat for several.
        #[arg(long = "pool")]
        pools: Vec<String>,
    },
}

#[derive(Debug, Clone, Args)]
pub struct UpArgs {
    /// Port of the gateway, the one address to point a browser at.
    #[arg(short, long)]
    pub port: Option<u16>,
    /// How many `serve` instances to run.
    #[arg(short = 'n', long)]
    pub instances: Option<usize>,
    /// Turn on the gateway's HTTP response cache (`gateway.cache.enabled`):
    /// public reads (catalog) are then answered from the gateway.
    #[arg(long)]
    pub cache: bool,
    /// How the processes' logs are shown (`up.logs`): `pretty`, one
    /// readable line each prefixed with the process's name; `json`, their
    /// JSON lines with a `process` field; `auto` (default), pretty on a
    /// terminal and JSON when piped.
    #[arg(long, value_parser = ["auto", "pretty", "json"])]
    pub logs: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// Address to listen on, e.g. 127.0.0.1:8090.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// An upstream base URL; repeat for more. Forms one pool named
    /// `default` that serves every path (in place of the configured pools
    /// and routes, unless --registered).
    #[arg(long = "to", value_name = "URL")]
    pub to: Vec<String>,
    /// Threads serving connections, each with its own event loop and
    /// upstream connection pool (default: one per core).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Turn on the HTTP response cache (`gateway.cache.enabled`).
    #[arg(long)]
    pub cache: bool,
    /// One pool `default` serving every path no configured route takes,
    /// whose instances register themselves (`POST
    /// /_gateway/admin/register`, as `shoal serve` does with
    /// `serve.register_at`); --to adds static ones beside them. Configured
    /// pools and routes stay, so another service can register into a pool
    /// of its own under its prefix. Needs `gateway.admin_token`
    /// (SHOAL_GATEWAY__ADMIN_TOKEN), the same on every instance.
    #[arg(long)]
    pub registered: bool,
    /// Memory of the HTTP cache, e.g. 268435456, 256MiB, 1GiB, 500MB
    /// (`gateway.cache.max_bytes`; implies --cache).
    #[arg(long, value_name = "BYTES", value_parser = parse_byte_size)]
    pub cache_size: Option<u64>,
    /// Path of the active health check (`gateway.health_path`, default
    /// /readyz as Shoal services answer; a 404 there counts as up);
    /// `--health-path ''` checks only that each upstream accepts TCP
    /// connections.
    #[arg(long, value_name = "PATH")]
    pub health_path: Option<String>,
    /// Serve TLS with this PEM certificate chain (`gateway.tls_cert_file`;
    /// needs --tls-key). Clients then get HTTP/2 or HTTP/1.1 by ALPN.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<String>,
    /// The PEM private key of --tls-cert (`gateway.tls_key_file`).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<String>,
}

/// `--registered`: a pool `default` (with `to` as its static instances)
/// serving every path no configured route takes. Configured pools and
/// routes stay: a service of another language registers into its own
/// pool, routed by prefix (`gateway.routes`), beside Shoal's instances.
fn registered_default_pool(gateway: &mut shoal_core::settings::GatewaySettings, to: &[String]) {
    match gateway.pools.iter_mut().find(|p| p.name == "default") {
        Some(pool) => pool.upstreams.extend(to.iter().cloned()),
        None => gateway.pools.push(PoolSettings {
            name: "default".into(),
            upstreams: to.to_vec(),
            protocol: Default::default(),
        }),
    }
    let catch_all = gateway
        .routes
        .iter()
        .any(|r| r.host.is_none() && r.prefix == "/");
    if !catch_all {
        gateway.routes.push(shoal_core::settings::RouteSettings {
            prefix: "/".into(),
            host: None,
            pool: "default".into(),
            request_timeout_ms: None,
            max_body_bytes: None,
            rate_limit: None,
            cache: None,
            require_session: false,
            request_headers: Default::default(),
            response_headers: Default::default(),
        });
    }
}

/// `256MiB`, `1GiB`, `500MB`, `64k`, `1048576` → bytes.
pub fn parse_byte_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size such as 256MiB"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        other => {
            return Err(format!(
                "unknown unit `{other}`; use B, KB, KiB, MB, MiB, GB or GiB"
            ))
        }
    };
    let bytes = number * factor as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("`{text}` is out of range"));
    }
    Ok(bytes as u64)
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on, e.g. 127.0.0.1:3001 (port 0 picks one).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Services to run, comma-separated: `all` or e.g. `accounts`.
    #[arg(long, value_delimiter = ',')]
    pub services: Vec<String>,
    /// This instance's name in logs and the x-shoal-instance header.
    #[arg(long)]
    pub instance: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Queues to take jobs from, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub queues: Vec<String>,
    /// Jobs run at once.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Address of the worker's /healthz, /readyz and /metrics
    /// (`worker.listen`, default 127.0.0.1:9091; 0.0.0.0:9091 for probes
    /// from other hosts; port 0 picks one).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// This worker's name in logs.
    #[arg(long)]
    pub instance: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// Also apply the contracting migrations: those that remove what
    /// instances of an earlier version still use (today: the job table's
    /// whole unique-key index, replaced by one over set keys). Run it once
    /// a rolling upgrade is over and no earlier instance is left. A
    /// database whose tables this version created has them already.
    #[arg(long)]
    pub contract: bool,
}

#[derive(Debug, Clone, Args)]
pub struct SeedArgs {
    /// How many products to create.
    #[arg(long, default_value_t = 1000)]
    pub products: usize,
    /// Then set every product's stock to this (checkouts hold stock, so a
    /// benchmark or test that orders a lot needs plenty). Default: each
    /// new product gets a random stock from 0 to 999.
    #[arg(long, value_parser = clap::value_parser!(i64).range(0..=1_000_000_000))]
    pub stock: Option<i64>,
}

#[derive(Debug, Clone, Args)]
pub struct SandboxArgs {
    /// Address to listen on (default: sandbox.listen, 127.0.0.1:8095).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Where to send signed webhooks.
    #[arg(long)]
    pub webhook_url: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct JobsArgs {
    #[command(subcommand)]
    pub command: JobsCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum JobsCommand {
    /// List jobs, newest first.
    List {
        /// Only jobs of this queue, e.g. `email` or a pushed one.
        #[arg(long)]
        queue: Option<String>,
        /// scheduled, available, running, retrying, succeeded, dead, cancelled
        #[arg(long)]
        state: Option<String>,
        /// Only jobs of this kind, e.g. `notifications.email`.
        #[arg(long)]
        kind: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// One JSON document (`{"jobs": [...]}`) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one job with its error history.
    Show {
        id: String,
        /// The job as JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Put a dead job back in its queue with its attempts reset.
    Retry { id: String },
    /// Delete a dead job.
    Discard { id: String },
    /// Cancel a job that has not finished.
    Cancel { id: String },
    /// Per-queue depth, oldest age and counts by state.
    Stats {
        /// One JSON document (`{"queues": [...]}`) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Enqueue N no-op jobs (in batches of 1,000), run them with one
    /// worker of C slots, and print enqueue and completion rates and
    /// enqueue-to-start latency.
    Bench {
        /// sqlite, postgres (uses database.url) or nats.
        #[arg(long, default_value = "sqlite")]
        backend: String,
        #[arg(long, default_value_t = 10_000)]
        jobs: usize,
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
        /// NATS server for `--backend nats`.
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        nats_url: String,
        /// Deliver every job by push to this endpoint (as `[[worker.push]]`
        /// does: POSTed, signed with --push-secret) instead of running a
        /// no-op in process; the latency is then enqueue to the endpoint's
        /// answer (`bench/push.sh`).
        #[arg(long, value_name = "URL")]
        push: Option<String>,
        /// The signing secret of --push.
        #[arg(long, value_name = "SECRET", default_value = "shoal-bench-push-secret")]
        push_secret: String,
        /// Print one JSON line instead of text.
        #[arg(long)]
        json: bool,
    },
}

impl Cli {
    /// Defaults, file, environment, then this command line's flags.
    pub fn settings(&self) -> Result<Settings, SettingsError> {
        let mut s = shoal_core::settings::load(self.config.as_deref(), std::env::vars())?;
        if let Some(d) = &self.data_dir {
            s.data_dir = d.clone();
        }
        if let Some(l) = &self.log_level {
            s.log.level = l.clone();
        }
        if self.development {
            s.development = true;
        }
        match &self.command {
            Command::Up(a) => {
                if let Some(p) = a.port {
                    s.up.port = p;
                }
                if let Some(n) = a.instances {
                    s.up.instances = n;
                }
                if a.cache {
                    s.gateway.cache.enabled = true;
                }
                if let Some(logs) = &a.logs {
                    s.up.logs = logs.clone();
                }
            }
            Command::Gateway(a) => {
                if let Some(l) = a.listen {
                    s.gateway.listen = l;
                }
                if let Some(w) = a.workers {
                    s.gateway.workers = w;
                }
                if a.cache || a.cache_size.is_some() {
                    s.gateway.cache.enabled = true;
                }
                if let Some(path) = &a.health_path {
                    s.gateway.health_path = path.clone();
                }
                if let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) {
                    s.gateway.tls_cert_file = cert.clone();
                    s.gateway.tls_key_file = key.clone();
                }
                if s.gateway.registrations_file.is_empty() {
                    s.gateway.registrations_file = s
                        .data_dir
                        .join("gateway-registrations.json")
                        .display()
                        .to_string();
                }
                if s.gateway.console.stack_file.is_empty() {
                    s.gateway.console.stack_file =
                        s.data_dir.join("run/stack.json").display().to_string();
                }
                if let Some(size) = a.cache_size {
                    s.gateway.cache.max_bytes = size;
                    s.gateway.cache.max_object_bytes = s.gateway.cache.max_object_bytes.min(size);
                }
                if a.registered {
                    registered_default_pool(&mut s.gateway, &a.to);
                } else if !a.to.is_empty() {
                    s.gateway.pools = vec![PoolSettings {
                        name: "default".into(),
                        upstreams: a.to.clone(),
                        protocol: Default::default(),
                    }];
                    s.gateway.routes.clear();
                }
            }
            Command::Serve(a) => {
                if let Some(l) = a.listen {
                    s.serve.listen = l;
                }
                if !a.services.is_empty() {
                    s.serve.services = a.services.clone();
                }
                if let Some(i) = &a.instance {
                    s.instance = i.clone();
                }
            }
            Command::Worker(a) => {
                if !a.queues.is_empty() {
                    s.worker.queues = a.queues.clone();
                }
                if let Some(c) = a.concurrency {
                    s.worker.concurrency = c;
                }
                if let Some(l) = a.listen {
                    s.worker.listen = l;
                }
                if let Some(i) = &a.instance {
                    s.instance = i.clone();
                }
            }
            Command::Sandbox(a) => {
                if let Some(l) = a.listen {
                    s.sandbox.listen = l;
                }
                if let Some(u) = &a.webhook_url {
                    s.sandbox.webhook_url = Some(u.clone());
                }
            }
            Command::Jobs(JobsArgs {
                command: JobsCommand::Bench { backend, .. },
            }) => match backend.as_str() {
                "sqlite" => {
                    s.database.backend = shoal_core::settings::DatabaseBackend::Sqlite;
                    s.database.url = None;
                }
                "postgres"
                    if s.database.backend != shoal_core::settings::DatabaseBackend::Postgres =>
                {
                    return Err(SettingsError::Invalid {
                        key: "database.url".into(),
                        message: "--backend postgres benchmarks the configured PostgreSQL: set database.backend = \"postgres\" and database.url".into(),
                    });
                }
                "postgres" | "nats" => {}
                other => {
                    return Err(SettingsError::Invalid {
                        key: "--backend".into(),
                        message: format!("`{other}` is not sqlite, postgres or nats"),
                    })
                }
            },
            Command::Migrate(_)
            | Command::Config
            | Command::Completions { .. }
            | Command::Token { .. }
            | Command::New { .. }
            | Command::Seed(_)
            | Command::Jobs(_) => {}
        }
        s.validate()?;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_core::settings::{GatewaySettings, RouteSettings};

    fn route(prefix: &str, pool: &str) -> RouteSettings {
        RouteSettings {
            prefix: prefix.into(),
            host: None,
            pool: pool.into(),
            request_timeout_ms: None,
            max_body_bytes: None,
            rate_limit: None,
            cache: None,
            require_session: true,
            request_headers: Default::default(),
            response_headers: Default::default(),
        }
    }

    #[test]
    fn registered_keeps_configured_routes_and_adds_a_catch_all() {
        let mut g = GatewaySettings {
            pools: vec![PoolSettings {
                name: "greetings".into(),
                upstreams: vec![],
                protocol: Default::default(),
            }],
            routes: vec![route("/api/greetings", "greetings")],
            ..Default::default()
        };
        registered_default_pool(&mut g, &["http://127.0.0.1:9".into()]);
        let names: Vec<&str> = g.pools.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["greetings", "default"]);
        assert_eq!(g.pools[1].upstreams, ["http://127.0.0.1:9"]);
        let routes: Vec<(&str, &str)> = g
            .routes
            .iter()
            .map(|r| (r.prefix.as_str(), r.pool.as_str()))
            .collect();
        assert_eq!(routes, [("/api/greetings", "greetings"), ("/", "default")]);
        assert!(g.routes[0].require_session);
        g.validate().unwrap();
        // A configured catch-all stays the only one.
        let mut g = GatewaySettings {
            routes: vec![route("/", "default")],
            ..Default::default()
        };
        registered_default_pool(&mut g, &[]);
        assert_eq!(g.routes.len(), 1);
        assert_eq!(g.pools.len(), 1);
    }
}
