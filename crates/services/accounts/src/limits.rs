//! Fixed-window counters in the database for login rate limits, shared by
//! every instance (one upsert per hit, on SQLite and PostgreSQL alike).

use shoal_backends::{now_millis, Database};

/// Counts one hit on `key`; returns the count in the current window and the
/// seconds until that window ends.
pub async fn hit(db: &Database, key: &str, window_ms: i64) -> Result<(i64, u64), sqlx::Error> {
    let now = now_millis();
    let (count, start): (i64, i64) = sqlx::query_as(
        "INSERT INTO login_attempts (key, window_start, count) VALUES ($1, $2, 1)
         ON CONFLICT (key) DO UPDATE SET
           count = CASE WHEN login_attempts.window_start <= $3 THEN 1 ELSE login_attempts.count + 1 END,
           window_start = CASE WHEN login_attempts.window_start <= $3 THEN $2 ELSE login_attempts.window_start END
         RETURNING count, window_start",
    )
    .bind(key)
    .bind(now)
    .bind(now - window_ms)
    .fetch_one(db.pool())
    .await?;
    Ok((count, retry_after(start, window_ms, now)))
}

/// The count in the current window without adding to it.
pub async fn peek(db: &Database, key: &str, window_ms: i64) -> Result<(i64, u64), sqlx::Error> {
    let now = now_millis();
    let row: Option<(i64, i64)> = sqlx::query_as(
        "SELECT count, window_start FROM login_attempts WHERE key = $1 AND window_start > $2",
    )
    .bind(key)
    .bind(now - window_ms)
    .fetch_optional(db.pool())
    .await?;
    Ok(row
        .map(|(count, start)| (count, retry_after(start, window_ms, now)))
        .unwrap_or((0, 0)))
}

pub async fn clear(db: &Database, key: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM login_attempts WHERE key = $1")
        .bind(key)
        .execute(db.pool())
        .await?;
    Ok(())
}

fn retry_after(start: i64, window_ms: i64, now: i64) -> u64 {
    (((start + window_ms - now).max(0) + 999) / 1000) as u64
}
