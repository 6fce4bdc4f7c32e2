//! Cron schedules: each schedule enqueues its job once per tick of a cron
//! expression (`croner`, optional seconds field, UTC). Every worker may run
//! the same schedules; the unique key `cron:<name>:<tick millis>` makes the
//! store keep exactly one job per tick however many workers race for it.
//! Ticks missed while no worker ran are not replayed (at most the ticks of
//! the last minute are caught up).

use crate::job::{NewJob, QueueError};
use crate::store::JobStore;
use chrono::{DateTime, TimeZone, Utc};
use croner::parser::{CronParser, Seconds};
use croner::Cron;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A named cron expression and the job it enqueues on each tick.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub name: String,
    pub expression: String,
    cron: Cron,
    /// The job to enqueue; its `run_at` and `unique_key` are set per tick.
    pub job: NewJob,
}

impl Schedule {
    /// `expression` has 5 fields (minute precision) or 6 (seconds first).
    pub fn new(name: &str, expression: &str, job: NewJob) -> Result<Self, QueueError> {
        if !crate::job::valid_name(name) {
            return Err(QueueError::InvalidJob(format!(
                "schedule name `{name}` must be 1-64 characters of a-z, A-Z, 0-9, `-`, `_`, `.`"
            )));
        }
        job.validate()?;
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(expression)
            .map_err(|e| QueueError::InvalidJob(format!("cron expression `{expression}`: {e}")))?;
        Ok(Schedule {
            name: name.to_string(),
            expression: expression.to_string(),
            cron,
            job,
        })
    }

    /// The first tick strictly after `after_ms`, in ms since the epoch.
    pub fn next_tick_after(&self, after_ms: i64) -> Option<i64> {
        let after: DateTime<Utc> = Utc.timestamp_millis_opt(after_ms).single()?;
        self.cron
            .find_next_occurrence(&after, false)
            .ok()
            .map(|t| t.timestamp_millis())
    }

    /// The job for the tick at `tick_ms`.
    pub fn job_for_tick(&self, tick_ms: i64) -> NewJob {
        self.job
            .clone()
            .run_at(tick_ms)
            .unique_key(format!("cron:{}:{tick_ms}", self.name))
    }
}

/// Enqueues each schedule's job on each tick until `stop` fires.
pub async fn run_schedules(
    store: Arc<dyn JobStore>,
    schedules: Vec<Schedule>,
    stop: CancellationToken,
) {
    let start = shoal_backends::now_millis();
    let mut next: Vec<Option<i64>> = schedules.iter().map(|s| s.next_tick_after(start)).collect();
    loop {
        let Some(soonest) = next.iter().flatten().min().copied() else {
            return;
        };
        let wait = (soonest - shoal_backends::now_millis()).max(0) as u64;
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
            _ = stop.cancelled() => return,
        }
        let now = shoal_backends::now_millis();
        for (schedule, slot) in schedules.iter().zip(next.iter_mut()) {
            while let Some(tick) = *slot {
                if tick > now {
                    break;
                }
                if tick >= now - 60_000 {
                    match store.enqueue(schedule.job_for_tick(tick)).await {
                        Ok(e) if e.created => {
                            tracing::debug!(schedule = %schedule.name, tick, job.id = %e.id, "cron job enqueued")
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(schedule = %schedule.name, tick, error = %e, "cron enqueue failed")
                        }
                    }
                }
                *slot = schedule.next_tick_after(tick.max(now - 60_000));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_and_unique_keys() {
        let s = Schedule::new(
            "every-5s",
            "*/5 * * * * *",
            NewJob::new("default", "k", serde_json::Value::Null),
        )
        .unwrap();
        assert_eq!(s.next_tick_after(1_000), Some(5_000));
        assert_eq!(s.next_tick_after(5_000), Some(10_000));
        let job = s.job_for_tick(5_000);
        assert_eq!(job.unique_key.as_deref(), Some("cron:every-5s:5000"));
        assert_eq!(job.run_at, Some(5_000));
        let minute = Schedule::new(
            "m",
            "0 * * * *",
            NewJob::new("q", "k", serde_json::Value::Null),
        )
        .unwrap();
        assert_eq!(minute.next_tick_after(1_000), Some(3_600_000));
        assert!(Schedule::new(
            "bad",
            "not cron",
            NewJob::new("q", "k", serde_json::Value::Null)
        )
        .is_err());
    }
}
