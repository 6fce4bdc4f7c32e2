//! Shared pieces of the benchmark tools: a latency histogram summary.

use serde::Serialize;

/// Percentiles of one run, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub requests: u64,
    pub errors: u64,
    pub seconds: f64,
    pub rps: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Summary {
    pub fn from_histogram(h: &hdrhistogram::Histogram<u64>, errors: u64, seconds: f64) -> Self {
        let requests = h.len();
        Summary {
            requests,
            errors,
            seconds,
            rps: requests as f64 / seconds.max(1e-9),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}
