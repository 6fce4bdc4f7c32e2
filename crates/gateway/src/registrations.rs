//! Registrations kept in a file (`registrations_file`) so that a restarted
//! gateway routes to registered instances at once, instead of answering
//! 503 until each renews (up to a third of its TTL later). The health
//! loop writes the file after a round in which registrations changed (a
//! renewal moves an expiry, so while instances renew that is about once a
//! round: a small file, written off the runtime threads);
//! `Gateway::bind` reads it and registers what has not lapsed. The
//! instances renew as usual; a dead one is taken out by the first health
//! round, as any other.

use crate::pool::Pool;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// One registration as written: its pool, URL and when it lapses.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Saved {
    pub pool: String,
    pub url: String,
    pub expires_unix_ms: u64,
}

fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The registrations of `pools` now, in a stable order.
pub fn snapshot(pools: &[Arc<Pool>]) -> Vec<Saved> {
    let (now, wall) = (Instant::now(), SystemTime::now());
    let mut out: Vec<Saved> = pools
        .iter()
        .flat_map(|pool| {
            pool.instances()
                .iter()
                .map(|i| (pool, i.clone()))
                .collect::<Vec<_>>()
        })
        .filter_map(|(pool, i)| {
            let left = i.expires()?.checked_duration_since(now)?;
            Some(Saved {
                pool: pool.name.clone(),
                url: i.url.clone(),
                expires_unix_ms: unix_ms(wall + left),
            })
        })
        .collect();
    out.sort_by(|a, b| (&a.pool, &a.url).cmp(&(&b.pool, &b.url)));
    out
}

/// Writes `saved` to `path` (a new file renamed over the old one, so a
/// crash mid-write leaves the previous file). File work runs on tokio's
/// blocking pool, not on the runtime threads.
pub async fn save(path: &Path, saved: &[Saved]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    let tmp = path.with_extension("json.tmp");
    tokio::fs::write(&tmp, serde_json::to_vec_pretty(saved)?).await?;
    tokio::fs::rename(&tmp, path).await
}

/// Registers the unexpired registrations of `path` in `pools`; returns how
/// many. A missing file is no registrations; an unreadable one is logged
/// and skipped (the instances register again within their TTL).
pub async fn load(path: &Path, pools: &[Arc<Pool>]) -> usize {
    let bytes = match tokio::fs::read(path).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return 0,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read saved registrations");
            return 0;
        }
    };
    let saved: Vec<Saved> = match serde_json::from_slice(&bytes) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "ignoring unreadable saved registrations");
            return 0;
        }
    };
    let now = unix_ms(SystemTime::now());
    let mut restored = 0;
    for s in saved {
        let Some(left) = s.expires_unix_ms.checked_sub(now).filter(|ms| *ms > 0) else {
            continue;
        };
        let Some(pool) = pools.iter().find(|p| p.name == s.pool) else {
            continue;
        };
        match pool.register(&s.url, Duration::from_millis(left)) {
            Ok(_) => restored += 1,
            Err(e) => tracing::warn!(pool = %s.pool, instance = %s.url, error = %e,
                "not restoring a saved registration"),
        }
    }
    if restored > 0 {
        tracing::info!(file = %path.display(), restored, "restored saved registrations");
    }
    restored
}
