//! Counters the console reads once a second: requests, errors (5xx) and a
//! latency histogram, for the whole gateway ([`GATEWAY`]) and for each
//! instance ([`crate::pool::Instance::live`]). Recording is two relaxed
//! atomic adds (three on an error) on a cache line of the counter's own;
//! the sampler (`live.rs`) takes differences between two readings, so
//! nothing is ever reset.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Latency buckets: 0..16 µs one each, then four per power of two up to
/// 2^31 µs (~36 min); longer goes in the last.
pub const BUCKETS: usize = 128;

/// Requests, errors and latencies of one thing the gateway sends to.
#[derive(Debug)]
#[repr(align(64))]
pub struct Live {
    requests: AtomicU64,
    errors: AtomicU64,
    buckets: [AtomicU64; BUCKETS],
}

impl Default for Live {
    fn default() -> Self {
        Live::new()
    }
}

/// The whole gateway's proxied requests (not its own endpoints).
pub static GATEWAY: Live = Live::new();

/// A reading of a [`Live`].
#[derive(Debug, Clone)]
pub struct Reading {
    pub requests: u64,
    pub errors: u64,
    pub buckets: Box<[u64; BUCKETS]>,
}

impl Default for Reading {
    fn default() -> Self {
        Reading {
            requests: 0,
            errors: 0,
            buckets: Box::new([0; BUCKETS]),
        }
    }
}

/// What happened between two readings.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Window {
    pub requests: u64,
    pub errors: u64,
    /// Milliseconds; `None` without requests.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl Live {
    pub const fn new() -> Live {
        Live {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            buckets: [const { AtomicU64::new(0) }; BUCKETS],
        }
    }

    /// Counts one answered request: its status and how long it took.
    pub fn record(&self, status: u16, elapsed: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.buckets[bucket(micros)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn read(&self) -> Reading {
        let mut buckets = Box::new([0u64; BUCKETS]);
        for (slot, b) in buckets.iter_mut().zip(&self.buckets) {
            *slot = b.load(Ordering::Relaxed);
        }
        Reading {
            requests: self.requests.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            buckets,
        }
    }
}

impl Reading {
    /// What happened from `earlier` to this reading.
    pub fn since(&self, earlier: &Reading) -> Window {
        let mut diff = [0u64; BUCKETS];
        for (i, d) in diff.iter_mut().enumerate() {
            *d = self.buckets[i].saturating_sub(earlier.buckets[i]);
        }
        Window {
            requests: self.requests.saturating_sub(earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            p50_ms: percentile(&diff, 0.50),
            p99_ms: percentile(&diff, 0.99),
        }
    }
}

/// The bucket of a latency in microseconds.
pub fn bucket(micros: u64) -> usize {
    if micros < 16 {
        return micros as usize;
    }
    let exp = 63 - micros.leading_zeros() as usize; // >= 4
    let sub = ((micros >> (exp - 2)) & 3) as usize;
    (16 + (exp - 4) * 4 + sub).min(BUCKETS - 1)
}

/// The upper edge of a bucket, microseconds: a percentile is reported as
/// the edge its bucket ends at (at most a quarter above the truth).
pub fn upper_edge(index: usize) -> u64 {
    if index < 16 {
        return index as u64 + 1;
    }
    let exp = (index - 16) / 4 + 4;
    let sub = ((index - 16) % 4) as u64;
    (1u64 << exp) + (sub + 1) * (1u64 << (exp - 2))
}

/// The `q` quantile (0..1) of a bucketed distribution, ms.
pub fn percentile(buckets: &[u64; BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(upper_edge(i) as f64 / 1000.0);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_ordered_and_edges_bound_their_values() {
        let mut last = 0;
        for micros in [
            0u64, 1, 15, 16, 17, 20, 24, 31, 32, 100, 999, 1_000, 65_536, 10_000_000,
        ] {
            let b = bucket(micros);
            assert!(b >= last, "bucket of {micros} went back");
            last = b;
            assert!(
                upper_edge(b) > micros,
                "edge of {micros}'s bucket is {}",
                upper_edge(b)
            );
            if b > 0 {
                assert!(
                    upper_edge(b - 1) <= micros,
                    "{micros} belongs in an earlier bucket"
                );
            }
        }
        assert_eq!(bucket(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn a_window_reports_its_requests_errors_and_percentiles() {
        let live = Live::new();
        let before = live.read();
        for _ in 0..98 {
            live.record(200, Duration::from_micros(1_000));
        }
        live.record(502, Duration::from_millis(40));
        live.record(503, Duration::from_millis(40));
        let w = live.read().since(&before);
        assert_eq!((w.requests, w.errors), (100, 2));
        let p50 = w.p50_ms.unwrap();
        assert!((1.0..=1.25).contains(&p50), "p50 {p50}");
        let p99 = w.p99_ms.unwrap();
        assert!((40.0..=50.0).contains(&p99), "p99 {p99}");
        let quiet = live.read().since(&live.read());
        assert_eq!(quiet, Window::default());
    }
}
