//! Fixed-window counters in the database for login rate limits, shared by
//! every instance (one upsert per hit, on SQLite and PostgreSQL alike),
//! with the time of the last hit for growing delays ([`locked`]).

use shoal_backends::{now_millis, Database};

/// Counts one hit on `key`; returns the count in the current window and the
/// seconds until that window ends.
pub async fn hit(db: &Database, key: &str, window_ms: i64) -> Result<(i64, u64), sqlx::Error> {
    let now = now_millis();
    let (count, start): (i64, i64) = sqlx::query_as(
        "INSERT INTO login_attempts (key, window_start, count, last_at) VALUES ($1, $2, 1, $2)
         ON CONFLICT (key) DO UPDATE SET
           count = CASE WHEN login_attempts.window_start <= $3 THEN 1 ELSE login_attempts.count + 1 END,
           window_start = CASE WHEN login_attempts.window_start <= $3 THEN $2 ELSE login_attempts.window_start END,
           last_at = $2
         RETURNING count, window_start",
    )
    .bind(key)
    .bind(now)
    .bind(now - window_ms)
    .fetch_one(db.pool())
    .await?;
    Ok((count, retry_after(start, window_ms, now)))
}

/// Reserves one attempt on `key` unless it is held back ([`locked`]'s
/// rule), in one conditional upsert: concurrent attempts cannot all pass a
/// check made before any of them is counted. `Ok(Err(seconds))` when held
/// back (nothing counted).
pub async fn attempt(
    db: &Database,
    key: &str,
    window_ms: i64,
    limit: u32,
) -> Result<Result<(), u64>, sqlx::Error> {
    let now = now_millis();
    let limit = limit.max(1) as i64;
    let reserved: Option<(i64,)> = sqlx::query_as(
        "INSERT INTO login_attempts (key, window_start, count, last_at) VALUES ($1, $2, 1, $2)
         ON CONFLICT (key) DO UPDATE SET
           count = CASE WHEN login_attempts.window_start <= $3 THEN 1 ELSE login_attempts.count + 1 END,
           window_start = CASE WHEN login_attempts.window_start <= $3 THEN $2 ELSE login_attempts.window_start END,
           last_at = $2
         WHERE login_attempts.window_start <= $3
            OR login_attempts.count < $4
            OR login_attempts.last_at + (CAST(1000 AS BIGINT) << CAST(
                 CASE WHEN login_attempts.count - $4 > 30 THEN 30 ELSE login_attempts.count - $4 END
                 AS INTEGER)) <= $2
         RETURNING count",
    )
    .bind(key)
    .bind(now)
    .bind(now - window_ms)
    .bind(limit)
    .fetch_optional(db.pool())
    .await?;
    if reserved.is_some() {
        return Ok(Ok(()));
    }
    let wait = locked(db, key, window_ms, limit as u32).await?;
    Ok(Err(wait.unwrap_or(1)))
}

/// Gives back an attempt [`attempt`] reserved (a login that succeeded is
/// no failure).
pub async fn release(db: &Database, key: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE login_attempts SET count = count - 1 WHERE key = $1 AND count > 0")
        .bind(key)
        .execute(db.pool())
        .await?;
    Ok(())
}

/// `Some(seconds to wait)` while `key` is held back: once its hits in the
/// window reach `limit`, each hit makes the next wait twice as long as the
/// one before (1 s, 2 s, 4 s, ...; never past the window's end), counted
/// from that hit. An attacker's guesses slow down exponentially; a person
/// who mistyped waits seconds.
pub async fn locked(
    db: &Database,
    key: &str,
    window_ms: i64,
    limit: u32,
) -> Result<Option<u64>, sqlx::Error> {
    let now = now_millis();
    let row: Option<(i64, i64, i64)> = sqlx::query_as(
        "SELECT count, window_start, last_at FROM login_attempts WHERE key = $1 AND window_start > $2",
    )
    .bind(key)
    .bind(now - window_ms)
    .fetch_optional(db.pool())
    .await?;
    Ok(row.and_then(|(count, start, last)| wait(count, start, last, window_ms, limit, now)))
}

/// The seconds left to wait, for [`locked`].
fn wait(count: i64, start: i64, last: i64, window_ms: i64, limit: u32, now: i64) -> Option<u64> {
    if count < limit.max(1) as i64 {
        return None;
    }
    let doublings = (count - limit.max(1) as i64).min(30) as u32;
    let until = (last + (1000i64 << doublings)).min(start + window_ms);
    (now < until).then(|| ((until - now + 999) / 1000) as u64)
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

#[cfg(test)]
mod tests {
    use super::wait;

    #[test]
    fn the_wait_doubles_with_each_failure_past_the_limit_within_the_window() {
        let window = 900_000;
        // Under the limit: no wait.
        assert_eq!(wait(2, 0, 10_000, window, 3, 10_000), None);
        // At the limit: 1 s from the last failure, then 2, 4, 8 s.
        assert_eq!(wait(3, 0, 10_000, window, 3, 10_000), Some(1));
        assert_eq!(wait(3, 0, 10_000, window, 3, 11_000), None);
        assert_eq!(wait(4, 0, 10_000, window, 3, 10_000), Some(2));
        assert_eq!(wait(6, 0, 10_000, window, 3, 10_500), Some(8));
        // Never past the window's end.
        assert_eq!(wait(40, 0, 10_000, window, 3, 10_000), Some(890));
    }
}
