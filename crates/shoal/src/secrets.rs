//! The secrets `shoal up` makes for its stack: random, one set per data
//! directory, kept in `<data_dir>/secrets/` (a folder only the owner may
//! enter, one file a secret) so a restart keeps sessions' webhooks and
//! admin scripts working. The other roles never make secrets: they are
//! given them, and refuse the known development ones (`roles.rs`).

use anyhow::Context as _;
use shoal_core::settings::{
    DEVELOPMENT_API_KEY, DEVELOPMENT_SERVICE_TOKEN, DEVELOPMENT_WEBHOOK_SECRET,
};
use shoal_core::Settings;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

/// One random secret of each kind a stack needs.
#[derive(Debug, Clone)]
pub struct StackSecrets {
    pub dir: PathBuf,
    /// `gateway.admin_token`: the gateway's admin API, instances'
    /// registration, the catalog's purges.
    pub admin_token: String,
    /// `metrics.token` and `gateway.metrics_token`: read-only status.
    pub metrics_token: String,
    /// `payments.api_key` and `sandbox.api_key`.
    pub payments_api_key: String,
    /// `payments.webhook_secret` and `sandbox.webhook_secret`.
    pub payments_webhook_secret: String,
    /// `clients.token`: services' calls to each other.
    pub service_token: String,
}

impl StackSecrets {
    /// Reads the secrets of `data_dir`, making each that is missing.
    pub fn load_or_create(data_dir: &Path) -> anyhow::Result<StackSecrets> {
        let dir = data_dir.join("secrets");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        // A folder made by hand, or by an older version, is closed too.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("restricting {}", dir.display()))?;
        Ok(StackSecrets {
            admin_token: secret(&dir, "admin-token", "")?,
            metrics_token: secret(&dir, "metrics-token", "")?,
            payments_api_key: secret(&dir, "payments-api-key", "sk_test_")?,
            payments_webhook_secret: secret(&dir, "payments-webhook-secret", "whsec_")?,
            service_token: secret(&dir, "service-token", "")?,
            dir,
        })
    }

    /// Puts each secret into `settings` where the operator has not chosen
    /// one (unset, or the development default), and returns the
    /// `SHOAL_*` variables that give the children the same values.
    pub fn apply(&self, settings: &mut Settings) -> Vec<(String, String)> {
        let s = settings;
        s.gateway
            .admin_token
            .get_or_insert_with(|| self.admin_token.clone());
        s.metrics
            .token
            .get_or_insert_with(|| self.metrics_token.clone());
        if s.gateway.metrics_token.is_none() {
            s.gateway.metrics_token = s.metrics.token.clone();
        }
        if s.catalog.purge_token.is_none() {
            s.catalog.purge_token = s.gateway.admin_token.clone();
        }
        if s.payments.api_key == DEVELOPMENT_API_KEY {
            s.payments.api_key = self.payments_api_key.clone();
        }
        if s.payments.webhook_secret == DEVELOPMENT_WEBHOOK_SECRET {
            s.payments.webhook_secret = self.payments_webhook_secret.clone();
        }
        if s.clients.token == DEVELOPMENT_SERVICE_TOKEN {
            s.clients.token = self.service_token.clone();
        }
        if s.up.sandbox {
            // The bundled provider must accept the key the services send
            // and sign with the secret they verify.
            s.sandbox.api_key = s.payments.api_key.clone();
            s.sandbox.webhook_secret = s.payments.webhook_secret.clone();
        }
        let mut env = vec![
            ("SHOAL_PAYMENTS__API_KEY", s.payments.api_key.clone()),
            (
                "SHOAL_PAYMENTS__WEBHOOK_SECRET",
                s.payments.webhook_secret.clone(),
            ),
            ("SHOAL_SANDBOX__API_KEY", s.sandbox.api_key.clone()),
            ("SHOAL_CLIENTS__TOKEN", s.clients.token.clone()),
            (
                "SHOAL_SANDBOX__WEBHOOK_SECRET",
                s.sandbox.webhook_secret.clone(),
            ),
        ];
        for (key, value) in [
            ("SHOAL_GATEWAY__ADMIN_TOKEN", &s.gateway.admin_token),
            ("SHOAL_GATEWAY__METRICS_TOKEN", &s.gateway.metrics_token),
            ("SHOAL_METRICS__TOKEN", &s.metrics.token),
            ("SHOAL_CATALOG__PURGE_TOKEN", &s.catalog.purge_token),
        ] {
            if let Some(v) = value {
                env.push((key, v.clone()));
            }
        }
        env.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }
}

/// The secret in `dir/name`, or a new random one (32 bytes, base64url,
/// after `prefix`) written there readable by the owner only.
fn secret(dir: &Path, name: &str, prefix: &str) -> anyhow::Result<String> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let value = text.trim().to_string();
            anyhow::ensure!(
                value.len() >= 16,
                "{} holds no usable secret (16 characters at least); delete it to get a new one",
                path.display()
            );
            return Ok(value);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    // Written whole to a private temporary file, then linked into place:
    // the name appears only with its secret in it (a crash or a second
    // `shoal up` never sees an empty file), and never replaces one.
    let value = format!("{prefix}{}", shoal_backends::sessions::new_token());
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(format!("{value}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(value)
        }
        // Another `shoal up` on the same folder made it first: use its.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => secret(dir, name, prefix),
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_random_private_and_kept_across_runs() {
        let dir = std::env::temp_dir().join(format!("shoal-secrets-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let first = StackSecrets::load_or_create(&dir).unwrap();
        let again = StackSecrets::load_or_create(&dir).unwrap();
        assert_eq!(first.admin_token, again.admin_token);
        assert_eq!(first.payments_webhook_secret, again.payments_webhook_secret);
        let other_dir = dir.join("other");
        let other = StackSecrets::load_or_create(&other_dir).unwrap();
        assert_ne!(first.admin_token, other.admin_token);
        assert_ne!(first.admin_token, first.metrics_token);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&first.dir), 0o700);
        assert_eq!(mode(&first.dir.join("admin-token")), 0o600);

        let mut s = Settings::default();
        let env = first.apply(&mut s);
        assert!(s
            .development_secrets(shoal_core::settings::Role::Serve)
            .is_empty());
        assert!(s
            .development_secrets(shoal_core::settings::Role::Sandbox)
            .is_empty());
        assert_eq!(s.sandbox.webhook_secret, s.payments.webhook_secret);
        assert_eq!(
            s.gateway.admin_token.as_deref(),
            Some(first.admin_token.as_str())
        );
        assert!(env
            .iter()
            .any(|(k, v)| k == "SHOAL_GATEWAY__ADMIN_TOKEN" && *v == first.admin_token));
        assert!(env
            .iter()
            .any(|(k, v)| k == "SHOAL_CLIENTS__TOKEN" && *v == first.service_token));
        s.validate().unwrap();
        // A secret the operator chose is kept.
        let mut chosen = Settings::default();
        chosen.payments.webhook_secret = "whsec_chosen_by_the_operator".into();
        first.apply(&mut chosen);
        assert_eq!(
            chosen.payments.webhook_secret,
            "whsec_chosen_by_the_operator"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
