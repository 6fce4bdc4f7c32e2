//! The configuration reference cannot drift from the settings tree: every
//! key of `Settings` (defaults, with each optional key given a value so it
//! shows) must be documented, as the full dotted key in
//! docs/configuration.md or, for `gateway.*`, in docs/gateway.md or
//! docs/gateway-cache.md. A new optional field must be added here, or the
//! source scan at the end fails.

use shoal_core::Settings;
use std::path::Path;

/// Every optional top-level-reachable field, given a value so it is
/// serialized (unset options are left out of the TOML).
fn with_every_option() -> Settings {
    let mut s = Settings::default();
    let some = || Some("x".to_string());
    s.metrics.token = some();
    s.database.url = some();
    s.sessions.redis_url = some();
    s.serve.advertise_url = some();
    s.queue.nats_url = some();
    s.cache.l2_redis_url = some();
    s.cache.bus_redis_url = some();
    s.catalog.purge_token = some();
    s.notifications.smtp_url = some();
    s.sandbox.webhook_url = some();
    s.gateway.admin_token = some();
    s.gateway.metrics_token = some();
    s.gateway.rate_limit = Some(shoal_core::settings::RateLimitSettings {
        requests_per_sec: 1.0,
        burst: 1,
        key: "client_ip".into(),
    });
    s
}

/// Optional fields of items in lists and maps (routes, pools, per-pool
/// balancing), which docs/gateway.md documents in their own tables.
const PER_ITEM_OPTIONS: [&str; 7] = [
    "balancer",
    "hash_on",
    "host",
    "request_timeout_ms",
    "max_body_bytes",
    "rate_limit",
    "cache",
];

fn keys(value: &toml::Value, prefix: &str, out: &mut Vec<String>) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                keys(v, &key, out);
            }
        }
        // A list of tables (pools, routes) or a scalar: the key itself.
        _ => out.push(prefix.to_string()),
    }
}

fn read(root: &Path, file: &str) -> String {
    std::fs::read_to_string(root.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"))
}

#[test]
fn every_setting_is_documented() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let configuration = read(&root, "docs/configuration.md");
    let gateway = read(&root, "docs/gateway.md") + &read(&root, "docs/gateway-cache.md");
    let tree = toml::Value::try_from(with_every_option()).unwrap();
    let mut all = Vec::new();
    keys(&tree, "", &mut all);
    assert!(all.len() > 150, "{all:?}");
    let missing: Vec<&String> = all
        .iter()
        .filter(|key| {
            let full = format!("`{key}`");
            if configuration.contains(&full) {
                return false;
            }
            match key.strip_prefix("gateway.") {
                Some(short) => {
                    !(gateway.contains(&format!("`{short}`")) || gateway.contains(&full))
                }
                None => true,
            }
        })
        .collect();
    assert!(
        missing.is_empty(),
        "{} settings are not in docs/configuration.md (or docs/gateway.md for gateway.*): {missing:#?}",
        missing.len()
    );
}

#[test]
fn every_optional_setting_is_given_a_value_above() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/settings");
    let tree = toml::Value::try_from(with_every_option()).unwrap();
    let mut all = Vec::new();
    keys(&tree, "", &mut all);
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for line in text.lines() {
            let line = line.trim();
            let Some(rest) = line.strip_prefix("pub ") else {
                continue;
            };
            let Some((name, ty)) = rest.split_once(':') else {
                continue;
            };
            if !ty.trim_start().starts_with("Option<") || PER_ITEM_OPTIONS.contains(&name) {
                continue;
            }
            assert!(
                all.iter()
                    .any(|k| k == name || k.ends_with(&format!(".{name}"))
                        || k.contains(&format!(".{name}."))),
                "{}: optional setting `{name}` is not set in with_every_option(), so its documentation is not checked",
                path.display()
            );
        }
    }
}
