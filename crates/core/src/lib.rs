//! Shared foundations of every Shoal role: typed settings, ids, RFC 9457
//! problem details, telemetry setup and the shutdown signal. This crate does
//! no network or database I/O of its own, but for exporting spans
//! (`spans.rs`) when traces are on.

pub mod bearer;
pub mod cookies;
pub mod ids;
pub mod ports;
pub mod problem;
pub mod settings;
pub mod shutdown;
pub mod spans;
pub mod telemetry;
pub mod trace;

pub use problem::Problem;
pub use settings::Settings;
