//! The `shoal` binary: parses the command line, builds the settings tree
//! (defaults, `--config` file, `SHOAL_*` env, flags), sets up logging and
//! the runtime, and hands over to the role. Glue only.

mod cli;
mod roles;
mod up;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let settings = match cli.settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("shoal: {e}");
            return ExitCode::from(2);
        }
    };
    if let cli::Command::Config = cli.command {
        print!("{}", settings.to_redacted_toml());
        return ExitCode::SUCCESS;
    }
    shoal_core::telemetry::init_logging(&settings.log);
    let workers = match &cli.command {
        cli::Command::Gateway(_) if settings.gateway.workers > 0 => Some(settings.gateway.workers),
        _ => None,
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    let runtime = match builder.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shoal: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(roles::run(cli, settings));
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "stopped with an error");
            eprintln!("shoal: {e:#}");
            ExitCode::FAILURE
        }
    }
}
