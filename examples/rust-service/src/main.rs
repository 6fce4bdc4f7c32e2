//! Shoal with the greetings service: every role (`up`, `serve`, `worker`,
//! `migrate`, `jobs`, ...) of the `shoal` binary, with one more module.
//!   cargo run -- up

use std::process::ExitCode;

fn main() -> ExitCode {
    shoal::Builder::new().module(greetings::Greetings).run()
}
