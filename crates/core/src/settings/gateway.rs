//! The `[gateway]` settings section: listeners, pools of upstream instances,
//! routes to them, health checks, retries and timeouts.

use super::SettingsError;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySettings {
    pub listen: SocketAddr,
    /// Runtime worker threads; 0 means one per core.
    pub workers: usize,
    /// Named pools of upstream instances.
    pub pools: Vec<PoolSettings>,
    /// Routes, matched by host (when given) and longest path prefix.
    pub routes: Vec<RouteSettings>,
    /// Path every instance answers 200 on while it wants traffic.
    pub health_path: String,
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
    pub connect_timeout_ms: u64,
    /// Deadline for a whole upstream request (to the end of headers).
    pub request_timeout_ms: u64,
    /// Extra attempts on other instances for a request that is safe to retry.
    pub retries: u32,
    /// Request bodies up to this size are buffered so they can be retried;
    /// larger ones stream through and are never retried.
    pub retry_buffer_bytes: usize,
    /// Largest request body accepted, in bytes (413 past it).
    pub max_body_bytes: u64,
    pub shutdown_timeout_secs: u64,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            listen: "127.0.0.1:8080".parse().unwrap(),
            workers: 0,
            pools: Vec::new(),
            routes: Vec::new(),
            health_path: "/readyz".into(),
            health_interval_ms: 1_000,
            health_timeout_ms: 500,
            unhealthy_threshold: 2,
            healthy_threshold: 1,
            eject_after_errors: 1,
            eject_base_ms: 2_000,
            connect_timeout_ms: 1_000,
            request_timeout_ms: 30_000,
            retries: 2,
            retry_buffer_bytes: 64 * 1024,
            max_body_bytes: 16 * 1024 * 1024,
            shutdown_timeout_secs: 20,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolSettings {
    pub name: String,
    /// Upstream base URLs such as `http://127.0.0.1:3001`.
    pub upstreams: Vec<String>,
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
}

impl GatewaySettings {
    pub fn validate(&self) -> Result<(), SettingsError> {
        let invalid = |key: String, message: String| Err(SettingsError::Invalid { key, message });
        for (i, pool) in self.pools.iter().enumerate() {
            if pool.name.is_empty() {
                return invalid(format!("gateway.pools[{i}].name"), "must not be empty".into());
            }
            for (j, up) in pool.upstreams.iter().enumerate() {
                if !up.starts_with("http://") {
                    return invalid(
                        format!("gateway.pools[{i}].upstreams[{j}]"),
                        format!("`{up}` must be an http:// URL such as http://127.0.0.1:3001"),
                    );
                }
            }
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
        if self.health_interval_ms == 0 || self.health_timeout_ms == 0 {
            return invalid(
                "gateway.health_interval_ms".into(),
                "health interval and timeout must be at least 1 ms".into(),
            );
        }
        Ok(())
    }
}
