//! Shoal as a library: the `shoal` binary's command line and roles, with
//! a team's own service modules added ([`Builder`], docs/services.md).
//! Parses the command line, builds the settings tree (defaults,
//! `--config` file, `SHOAL_*` env, flags), sets up logging and the
//! runtime, and hands over to the role. Glue only.

#[cfg(not(feature = "system-alloc"))]
pub mod alloc;
mod cli;
mod new_service;
mod roles;
mod secrets;
mod up;

use clap::Parser;
use shoal_runtime::ServiceModule;
use std::process::ExitCode;

use shoal_runtime::app::ModuleFactory;

/// A binary that is Shoal plus a team's modules:
/// `shoal::Builder::new().module(MyService).run()` in `main`. It has every
/// command of `shoal` (`up` starts its children from the same binary, so
/// every `serve` and `worker` has the modules).
pub struct Builder {
    modules: Vec<ModuleFactory>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder::new()
    }
}

impl Builder {
    /// Shoal's own services: accounts, catalog, media, orders, payments,
    /// notifications.
    pub fn new() -> Builder {
        Builder {
            modules: roles::own_modules(),
        }
    }

    /// Adds a service module; it is cloned for each role that runs it.
    pub fn module<M: ServiceModule + Clone + 'static>(mut self, module: M) -> Builder {
        self.modules
            .push(shoal_runtime::app::module_factory(module));
        self
    }

    /// Parses the command line and runs the command, as `shoal` does.
    pub fn run(self) -> ExitCode {
        roles::set_modules(self.modules);
        run()
    }
}

/// The gateway runs one single-threaded runtime per thread of its own
/// (`shoal_gateway::Gateway::run`); this one accepts and serves its share.
/// Workers and `shoal jobs` run one single-threaded event loop unless
/// `worker.threads` says otherwise: on 2 cores `shoal jobs bench` drained
/// SQLite 2.1x and PostgreSQL 1.4x faster than on the work-stealing
/// runtime (ARCHITECTURE.md). Services keep the work-stealing runtime.
fn runtime_for(
    command: &cli::Command,
    settings: &shoal_core::settings::Settings,
) -> tokio::runtime::Builder {
    match command {
        cli::Command::Gateway(_) => tokio::runtime::Builder::new_current_thread(),
        cli::Command::Worker(_) | cli::Command::Jobs(_) => match settings.worker.threads {
            1 => tokio::runtime::Builder::new_current_thread(),
            n => {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                if n > 0 {
                    b.worker_threads(n);
                }
                b
            }
        },
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
}

fn run() -> ExitCode {
    #[cfg(not(feature = "system-alloc"))]
    alloc::no_transparent_huge_pages();
    let cli = cli::Cli::parse();
    if let cli::Command::New {
        command: cli::NewCommand::Service { name, dir, shoal },
    } = &cli.command
    {
        return new_service(name, dir.as_deref(), shoal.as_deref());
    }
    let mut settings = match cli.settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("shoal: {e}");
            return ExitCode::from(2);
        }
    };
    if let cli::Command::Completions { shell } = cli.command {
        use clap::CommandFactory;
        clap_complete::generate(
            shell,
            &mut cli::Cli::command(),
            "shoal",
            &mut std::io::stdout(),
        );
        return ExitCode::SUCCESS;
    }
    if let cli::Command::Token {
        command:
            cli::TokenCommand::New {
                name,
                scopes,
                pools,
            },
    } = &cli.command
    {
        return new_token(&settings, name, scopes, pools);
    }
    if let cli::Command::Config = cli.command {
        print!("{}", settings.to_redacted_toml());
        return ExitCode::SUCCESS;
    }
    // `shoal up` on a terminal: its own lines readable too.
    if matches!(cli.command, cli::Command::Up(_)) && up::pretty_logs(&settings) {
        settings.log.format = shoal_core::settings::LogFormat::Pretty;
    }
    // One-shot commands print their result alone on stdout.
    let stream = match cli.command {
        cli::Command::Migrate(_) | cli::Command::Seed(_) | cli::Command::Jobs(_) => {
            shoal_core::telemetry::LogStream::Stderr
        }
        _ => shoal_core::telemetry::LogStream::Stdout,
    };
    shoal_core::telemetry::init_logging_on(&settings.log, stream);
    let mut builder = runtime_for(&cli.command, &settings);
    builder.enable_all();
    let runtime = match builder.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shoal: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(roles::run(cli, settings));
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "stopped with an error");
            eprintln!("shoal: {e:#}");
            ExitCode::FAILURE
        }
    };
    shoal_core::telemetry::flush_logs();
    code
}

/// `shoal token new`: checks the entry as the settings would, then prints
/// the token (stdout, alone on its line, for scripts) and the settings
/// entry to add (stderr).
fn new_token(
    settings: &shoal_core::settings::Settings,
    name: &str,
    scopes: &[String],
    pools: &[String],
) -> ExitCode {
    let (token, sha256) = shoal_runtime::session::new_service_token();
    let mut check = settings.clone();
    if !scopes.is_empty() {
        check
            .clients
            .service_tokens
            .push(shoal_core::settings::ServiceTokenSettings {
                name: name.to_string(),
                sha256: sha256.clone(),
                scopes: scopes.to_vec(),
            });
    }
    if !pools.is_empty() {
        check
            .gateway
            .registration_tokens
            .push(shoal_core::settings::RegistrationTokenSettings {
                name: name.to_string(),
                sha256: sha256.clone(),
                pools: pools.to_vec(),
            });
    }
    if let Err(e) = check.validate() {
        eprintln!("shoal: {e}");
        return ExitCode::from(2);
    }
    let quoted = |v: &[String]| {
        v.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("{token}");
    eprintln!(
        "Give the token above to `{name}` (sent as `Authorization: Bearer <token>`); it is shown once."
    );
    if !scopes.is_empty() {
        eprintln!(
            "\nAdd this to the settings of every `serve` (then restart them one by one):\n\n\
             [[clients.service_tokens]]\nname = \"{name}\"\nsha256 = \"{sha256}\"\nscopes = [{}]",
            quoted(scopes)
        );
    }
    if !pools.is_empty() {
        eprintln!(
            "\nAdd this to the settings of every gateway (then reload them):\n\n\
             [[gateway.registration_tokens]]\nname = \"{name}\"\nsha256 = \"{sha256}\"\npools = [{}]",
            quoted(pools)
        );
    }
    ExitCode::SUCCESS
}

/// `shoal new service`: writes the crate, says what to do next.
fn new_service(
    name: &str,
    dir: Option<&std::path::Path>,
    shoal: Option<&std::path::Path>,
) -> ExitCode {
    let dir = dir
        .map(Into::into)
        .unwrap_or_else(|| std::path::PathBuf::from(name));
    let built_from = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let shoal = shoal.unwrap_or(&built_from);
    match new_service::write(name, &dir, shoal) {
        Ok(files) => {
            for f in &files {
                eprintln!("  wrote {}", f.display());
            }
            eprintln!(
                "\nNext: cd {} && cargo test && cargo run -- up   (docs/services.md)",
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("shoal: {e:#}");
            ExitCode::from(2)
        }
    }
}
