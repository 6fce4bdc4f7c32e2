//! The service runtime: `Application::build` turns settings and a list of
//! service modules into a listening HTTP server with the standard
//! middleware, health and metrics endpoints, sessions and graceful
//! shutdown. Services see only `AppContext` and the extractors here.

pub mod app;
pub mod cache;
pub mod client;
pub mod compress;
pub mod context;
pub mod enqueue;
pub mod error;
pub mod extract;
pub mod jobs;
pub mod jobs_console;
pub mod middleware;
pub mod openapi;
pub mod push;
pub mod registration;
mod server;
pub mod session;
pub mod session_cache;
pub mod testing;

pub use app::{Application, ServiceModule};
pub use cache::{CacheError, Cached, QueryCache, QueryCacheOptions};
pub use client::{ClientError, ClientOptions, ServiceClient};
pub use context::AppContext;
pub use error::ApiError;
pub use extract::{ApiJson, ClientAddr};
pub use session::{clear_session_cookie, session_cookie, CurrentSession};
