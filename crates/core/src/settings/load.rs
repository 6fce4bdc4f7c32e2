//! Loading the settings tree: defaults, then a TOML file, then `SHOAL_*`
//! environment variables. Nested keys use `__` in variable names:
//! `SHOAL_DATABASE__URL` sets `database.url`, `SHOAL_DATA_DIR` sets
//! `data_dir`. Variables starting `SHOAL_TEST_` are left to the tests,
//! `SHOAL_CONFIG` names the settings file (the CLI reads it), and the
//! service links Kubernetes injects for a Service named `shoal` or
//! `shoal-*` (`SHOAL_SERVICE_HOST`, `SHOAL_PORT_8080_TCP`, ...) are not
//! settings and are skipped.

use super::Settings;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read settings file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("settings file {path} is not valid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("invalid setting `{key}`: {message}")]
    Invalid { key: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
}

/// Builds the settings from defaults, an optional TOML file and the given
/// environment (pass `std::env::vars()`).
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Settings, SettingsError> {
    let mut tree = toml::Value::try_from(Settings::default()).expect("defaults serialize");
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|source| SettingsError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let overlay: toml::Table =
            toml::from_str(&text).map_err(|e: toml::de::Error| SettingsError::Syntax {
                path: path.display().to_string(),
                message: e.message().to_string(),
            })?;
        merge(&mut tree, toml::Value::Table(overlay));
    }
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, v)| {
            k.starts_with("SHOAL_")
                && !k.starts_with("SHOAL_TEST_")
                && k != "SHOAL_CONFIG"
                && !is_kubernetes_service_link(k, v)
        })
        .collect();
    vars.sort();
    for (var, raw) in vars {
        let path: Vec<String> = var["SHOAL_".len()..]
            .split("__")
            .map(|p| p.to_ascii_lowercase())
            .collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(SettingsError::Env {
                var,
                message: "empty key segment; nest keys with `__`, as in SHOAL_DATABASE__URL".into(),
            });
        }
        set_path(&mut tree, &path, &raw).map_err(|message| SettingsError::Env {
            var: var.clone(),
            message,
        })?;
    }
    from_tree(tree)
}

/// A service's own section (`[services.<name>]`), read as `T`: `T`'s
/// defaults, then the file's keys, then `SHOAL_SERVICES__<NAME>__<KEY>`
/// variables typed like the defaults. Unknown keys are refused when `T`
/// says `#[serde(deny_unknown_fields)]`; errors name the key.
pub fn service_section<T>(settings: &Settings, name: &str) -> Result<T, SettingsError>
where
    T: serde::Serialize + serde::de::DeserializeOwned + Default,
{
    let invalid = |key: String, message: String| SettingsError::Invalid { key, message };
    let mut tree = toml::Value::try_from(T::default())
        .map_err(|e| invalid(format!("services.{name}"), e.to_string()))?;
    if let Some(given) = settings.services.get(name) {
        let toml::Value::Table(given) = given else {
            return Err(invalid(
                format!("services.{name}"),
                "must be a table of settings".into(),
            ));
        };
        for (key, value) in given {
            // Variables arrive as strings: type them like the default.
            let value = match (value, tree.get(key)) {
                (toml::Value::String(raw), Some(existing)) if !existing.is_str() => {
                    typed_like(Some(existing), raw)
                        .map_err(|m| invalid(format!("services.{name}.{key}"), m))?
                }
                _ => value.clone(),
            };
            merge(
                &mut tree,
                toml::Value::Table(toml::Table::from_iter([(key.clone(), value)])),
            );
        }
    }
    serde_path_to_error::deserialize(tree).map_err(|e| {
        let path = e.path().to_string();
        let key = if path == "." || path.is_empty() {
            format!("services.{name}")
        } else {
            format!("services.{name}.{path}")
        };
        invalid(key, e.inner().to_string())
    })
}

fn from_tree(tree: toml::Value) -> Result<Settings, SettingsError> {
    serde_path_to_error::deserialize(tree).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        let key = if path == "." || path.is_empty() {
            "(top level)".to_string()
        } else {
            path
        };
        // `unknown field` errors name the parent path, or (at the top
        // level) the field itself; name the field once.
        let key = match message.strip_prefix("unknown field `") {
            Some(rest) => {
                let field = rest.split('`').next().unwrap_or_default();
                if key == "(top level)" || key == field {
                    field.to_string()
                } else if key.ends_with(&format!(".{field}")) {
                    key
                } else {
                    format!("{key}.{field}")
                }
            }
            None => key,
        };
        SettingsError::Invalid { key, message }
    })
}

/// Whether `var` is one of the variables Kubernetes puts in every pod for
/// each Service in its namespace (the docker-links style service
/// links): for a Service `shoal` or `shoal-gateway`, `SHOAL_SERVICE_HOST`,
/// `SHOAL_SERVICE_PORT[_<name>]`, `SHOAL_PORT`, `SHOAL_PORT_<n>_TCP` and
/// its `_PROTO`, `_PORT`, `_ADDR`, or the same after `SHOAL_GATEWAY_`.
/// No setting has these shapes: nested keys are joined by `__`.
/// The value must have the shape Kubernetes gives it too (an address,
/// a port number, a `tcp://` URL, a protocol), so a typo such as
/// `SHOAL_UP_PORT=9000` for `SHOAL_UP__PORT` is still refused.
fn is_kubernetes_service_link(var: &str, value: &str) -> bool {
    let Some(rest) = var.strip_prefix("SHOAL_") else {
        return false;
    };
    if rest.contains("__") {
        return false;
    }
    let url = ["tcp://", "udp://", "sctp://"]
        .iter()
        .any(|s| value.starts_with(s));
    let number = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
    let address = value.parse::<std::net::IpAddr>().is_ok();
    let words: Vec<&str> = rest.split('_').collect();
    (0..words.len()).any(|i| match &words[i..] {
        ["SERVICE", "HOST"] => address,
        ["SERVICE", "PORT", ..] => number,
        ["PORT"] => url,
        ["PORT", n, proto, tail @ ..] => {
            !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_digit())
                && matches!(*proto, "TCP" | "UDP" | "SCTP")
                && match tail {
                    [] => url,
                    ["PROTO"] => matches!(value, "tcp" | "udp" | "sctp"),
                    ["PORT"] => number,
                    ["ADDR"] => address,
                    _ => false,
                }
        }
        _ => false,
    })
}

fn merge(base: &mut toml::Value, overlay: toml::Value) {
    match (base, overlay) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(existing) if existing.is_table() && v.is_table() => merge(existing, v),
                    _ => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
    }
}

/// Sets `path` in the tree to `raw`, typed like the value already there
/// (a default or the file's): integers, floats, booleans, comma-separated
/// lists; strings otherwise.
fn set_path(tree: &mut toml::Value, path: &[String], raw: &str) -> Result<(), String> {
    let mut node = tree;
    for (i, key) in path.iter().enumerate() {
        let table = node
            .as_table_mut()
            .ok_or_else(|| format!("`{}` is not a section", path[..i].join(".")))?;
        if i + 1 == path.len() {
            let typed = typed_like(table.get(key), raw)?;
            table.insert(key.clone(), typed);
            return Ok(());
        }
        node = table
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
    Ok(())
}

fn typed_like(existing: Option<&toml::Value>, raw: &str) -> Result<toml::Value, String> {
    Ok(match existing {
        Some(toml::Value::Integer(_)) => toml::Value::Integer(
            raw.trim()
                .parse()
                .map_err(|_| format!("`{raw}` is not a whole number"))?,
        ),
        Some(toml::Value::Float(_)) => toml::Value::Float(
            raw.trim()
                .parse()
                .map_err(|_| format!("`{raw}` is not a number"))?,
        ),
        Some(toml::Value::Boolean(_)) => match raw.trim() {
            "true" | "1" | "yes" | "on" => toml::Value::Boolean(true),
            "false" | "0" | "no" | "off" => toml::Value::Boolean(false),
            _ => return Err(format!("`{raw}` is not true or false")),
        },
        Some(toml::Value::Array(items)) => {
            if raw.trim_start().starts_with('[') {
                let parsed: toml::Table = toml::from_str(&format!("v = {raw}"))
                    .map_err(|e| format!("`{raw}` is not a TOML array: {}", e.message()))?;
                parsed["v"].clone()
            } else {
                let first = items.first();
                let parts: Result<Vec<_>, _> = raw
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| typed_like(first, s))
                    .collect();
                toml::Value::Array(parts?)
            }
        }
        _ => toml::Value::String(raw.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn file_then_env_override_defaults() {
        let dir = std::env::temp_dir().join(format!("shoal-settings-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.toml");
        let mut f = std::fs::File::create(&path).unwrap();
        writeln!(
            f,
            "[serve]\nlisten = \"127.0.0.1:4000\"\nrequest_timeout_ms = 5\n[up]\ninstances = 5"
        )
        .unwrap();
        let s = load(
            Some(&path),
            env(&[
                ("SHOAL_UP__INSTANCES", "7"),
                ("SHOAL_SERVE__SERVICES", "accounts, catalog"),
                ("SHOAL_TEST_POSTGRES_URL", "ignored"),
                ("SHOAL_CONFIG", "the file itself, read by the CLI"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(s.serve.listen.port(), 4000);
        assert_eq!(s.serve.request_timeout_ms, 5);
        assert_eq!(s.up.instances, 7);
        assert_eq!(s.serve.services, vec!["accounts", "catalog"]);
    }

    #[test]
    fn unknown_key_and_bad_value_name_the_key() {
        let err = load(None, env(&[("SHOAL_SERVE__LISTN", "x")])).unwrap_err();
        assert!(err.to_string().contains("serve.listn"), "{err}");
        let err = load(None, env(&[("SHOAL_DATABASE__BACKEND", "mysql")])).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("database.backend"), "{text}");
        assert!(
            text.contains("sqlite") && text.contains("postgres"),
            "{text}"
        );
        let err = load(None, env(&[("SHOAL_UP__INSTANCES", "many")])).unwrap_err();
        assert!(err.to_string().contains("SHOAL_UP__INSTANCES"), "{err}");
        // An unknown section is named once, not as `nosuch.nosuch`.
        let err = load(None, env(&[("SHOAL_NOSUCH__BACKEND", "x")])).unwrap_err();
        assert!(err.to_string().contains("`nosuch`"), "{err}");
        assert!(!err.to_string().contains("nosuch.nosuch"), "{err}");
    }

    /// Kubernetes gives every pod variables for each Service of its
    /// namespace; a Service named `shoal` or `shoal-gateway` must not stop
    /// any role (they were "unknown keys").
    #[test]
    fn kubernetes_service_links_are_not_settings() {
        let injected = [
            ("SHOAL_SERVICE_HOST", "10.96.0.10"),
            ("SHOAL_SERVICE_PORT", "80"),
            ("SHOAL_SERVICE_PORT_HTTP", "80"),
            ("SHOAL_PORT", "tcp://10.96.0.10:80"),
            ("SHOAL_PORT_80_TCP", "tcp://10.96.0.10:80"),
            ("SHOAL_PORT_80_TCP_PROTO", "tcp"),
            ("SHOAL_PORT_80_TCP_PORT", "80"),
            ("SHOAL_PORT_80_TCP_ADDR", "10.96.0.10"),
            ("SHOAL_GATEWAY_SERVICE_HOST", "10.96.0.11"),
            ("SHOAL_GATEWAY_PORT_8080_TCP_ADDR", "10.96.0.11"),
            ("SHOAL_SERVE_HEADLESS_SERVICE_PORT_HTTP", "3000"),
            ("SHOAL_UP__INSTANCES", "4"),
        ];
        let s = load(None, env(&injected)).unwrap();
        assert_eq!(s.up.instances, 4);
        // Settings and near misses stay what they are.
        for (var, value) in [
            ("SHOAL_DATA_DIR", "/data"),
            ("SHOAL_DEVELOPMENT", "true"),
            ("SHOAL_UP__PORT", "9000"),
            ("SHOAL_PORTS", "1"),
            ("SHOAL_PORT_X_TCP", "tcp://10.0.0.1:80"),
            ("SHOAL_SERVICE", "x"),
            // Typos of real keys stay errors, whatever they end in.
            ("SHOAL_UP_PORT", "9000"),
            ("SHOAL_GATEWAY_SERVICE_HOST", "gateway.local"),
        ] {
            assert!(!is_kubernetes_service_link(var, value), "{var}={value}");
        }
        assert!(load(None, env(&[("SHOAL_PORTS", "1")])).is_err());
        assert!(load(None, env(&[("SHOAL_UP_PORT", "9000")])).is_err());
    }
}
