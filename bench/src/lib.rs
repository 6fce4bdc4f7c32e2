//! Shared pieces of the benchmark tools: a latency histogram summary, and
//! picking by a Zipf law from a seeded generator.

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

/// Picks indexes 0..n with P(k) ∝ 1/(k+1)^s, from a precomputed CDF.
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut total = 0.0;
        for k in 0..n {
            total += 1.0 / ((k + 1) as f64).powf(s);
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        Zipf { cdf }
    }

    /// An index, drawn with [`uniform`] from `rng`.
    pub fn pick(&self, rng: &mut u64) -> usize {
        let u = uniform(rng);
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

/// xorshift64*: a uniform float in [0, 1) from `rng` (any non-zero seed).
pub fn uniform(rng: &mut u64) -> f64 {
    *rng ^= *rng >> 12;
    *rng ^= *rng << 25;
    *rng ^= *rng >> 27;
    (rng.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
}
