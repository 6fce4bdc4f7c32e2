//! Balancers: how a pool picks one of its available instances for a
//! request — P2C with peak-EWMA, round robin, least outstanding requests,
//! smooth weighted round robin and consistent (rendezvous) hashing.

use crate::pool::Instance;
use http::HeaderMap;
use rand::Rng;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// What a consistent-hash pool hashes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    /// A request header (lowercase name).
    Header(String),
    /// A cookie by name.
    Cookie(String),
    /// The client's IP address.
    ClientIp,
}

impl HashOn {
    /// Parses `header:<name>`, `cookie:<name>` or `client_ip`.
    pub fn parse(text: &str) -> Option<HashOn> {
        if text == "client_ip" {
            return Some(HashOn::ClientIp);
        }
        let (kind, name) = text.split_once(':')?;
        if name.is_empty() {
            return None;
        }
        match kind {
            "header" => http::HeaderName::from_bytes(name.as_bytes())
                .ok()
                .map(|h| HashOn::Header(h.as_str().to_string())),
            "cookie" => Some(HashOn::Cookie(name.to_string())),
            _ => None,
        }
    }

    /// The key of this request, if it has one.
    fn key(&self, ctx: &PickContext<'_>) -> Option<String> {
        match self {
            HashOn::ClientIp => Some(ctx.client_ip.to_string()),
            HashOn::Header(name) => ctx
                .headers
                .get(name.as_str())
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            HashOn::Cookie(name) => ctx
                .headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|pair| pair.trim().split_once('='))
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.to_string()),
        }
    }
}

/// What a balancer may look at in a request.
#[derive(Debug)]
pub struct PickContext<'a> {
    pub headers: &'a HeaderMap,
    pub client_ip: IpAddr,
}

/// A pool's balancer.
#[derive(Debug)]
pub enum Balancer {
    P2cPeakEwma,
    RoundRobin(AtomicUsize),
    LeastRequests(AtomicUsize),
    /// The mutex makes one smooth-WRR step atomic across instances.
    WeightedRoundRobin(Mutex<()>),
    ConsistentHash(HashOn),
}

impl Balancer {
    /// Builds a balancer from its settings name (see
    /// `BalancerKind::name`) and, for consistent hashing, its key.
    pub fn from_name(name: &str, hash_on: Option<&str>) -> Result<Balancer, String> {
        Ok(match name {
            "p2c_peak_ewma" => Balancer::P2cPeakEwma,
            "round_robin" => Balancer::RoundRobin(AtomicUsize::new(0)),
            "least_requests" => Balancer::LeastRequests(AtomicUsize::new(0)),
            "weighted_round_robin" => Balancer::WeightedRoundRobin(Mutex::new(())),
            "consistent_hash" => {
                let text = hash_on.ok_or("consistent_hash needs `hash_on`")?;
                Balancer::ConsistentHash(
                    HashOn::parse(text).ok_or_else(|| format!("bad hash_on `{text}`"))?,
                )
            }
            other => return Err(format!("unknown balancer `{other}`")),
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Balancer::P2cPeakEwma => "p2c_peak_ewma",
            Balancer::RoundRobin(_) => "round_robin",
            Balancer::LeastRequests(_) => "least_requests",
            Balancer::WeightedRoundRobin(_) => "weighted_round_robin",
            Balancer::ConsistentHash(_) => "consistent_hash",
        }
    }

    /// Picks one of `candidates` (never empty when called from a pool).
    pub fn pick<'c>(
        &self,
        candidates: &[&'c Arc<Instance>],
        ctx: &PickContext<'_>,
        now: std::time::Instant,
    ) -> Option<&'c Arc<Instance>> {
        match candidates.len() {
            0 => return None,
            1 => return Some(candidates[0]),
            _ => {}
        }
        let n = candidates.len();
        match self {
            Balancer::RoundRobin(next) => {
                Some(candidates[next.fetch_add(1, Ordering::Relaxed) % n])
            }
            Balancer::P2cPeakEwma => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                let mut b = rng.random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (ia, ib) = (candidates[a], candidates[b]);
                Some(if ib.load_cost(now) < ia.load_cost(now) {
                    ib
                } else {
                    ia
                })
            }
            Balancer::LeastRequests(next) => {
                // Start at a rotating offset so ties spread evenly.
                let start = next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|k| candidates[(start + k) % n])
                    .min_by_key(|i| i.in_flight())
            }
            Balancer::WeightedRoundRobin(lock) => {
                // nginx's smooth weighted round robin.
                let _step = lock.lock().unwrap_or_else(|p| p.into_inner());
                let total: i64 = candidates.iter().map(|i| i64::from(i.weight)).sum();
                let mut best: Option<(&'c Arc<Instance>, i64)> = None;
                for i in candidates {
                    let mut current = i.wrr_current.lock().unwrap_or_else(|p| p.into_inner());
                    *current += i64::from(i.weight);
                    if best.is_none_or(|(_, c)| *current > c) {
                        best = Some((i, *current));
                    }
                }
                let (chosen, _) = best?;
                *chosen.wrr_current.lock().unwrap_or_else(|p| p.into_inner()) -= total;
                Some(chosen)
            }
            Balancer::ConsistentHash(on) => match on.key(ctx) {
                // Rendezvous hashing: the highest hash of (key, instance)
                // wins, so losing an instance moves only its own keys.
                Some(key) => candidates
                    .iter()
                    .copied()
                    .max_by_key(|i| fnv1a(&[key.as_bytes(), b"\n", i.url.as_bytes()])),
                None => Some(candidates[rand::rng().random_range(0..n)]),
            },
        }
    }
}

/// 64-bit FNV-1a followed by a finalizer, stable across Rust versions and
/// processes, so every gateway replica maps a key the same way.
pub(crate) fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    // splitmix64 finalizer: spreads FNV's weak low bits.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instances(n: usize) -> Vec<Arc<Instance>> {
        (0..n)
            .map(|k| {
                Arc::new(Instance::new(&format!("http://127.0.0.1:{}", 4000 + k), 1, None).unwrap())
            })
            .collect()
    }

    #[test]
    fn hash_on_parses_the_three_forms_and_rejects_others() {
        assert_eq!(HashOn::parse("client_ip"), Some(HashOn::ClientIp));
        assert_eq!(
            HashOn::parse("header:X-User"),
            Some(HashOn::Header("x-user".into()))
        );
        assert_eq!(
            HashOn::parse("cookie:sid"),
            Some(HashOn::Cookie("sid".into()))
        );
        assert_eq!(HashOn::parse("header:"), None);
        assert_eq!(HashOn::parse("query:x"), None);
    }

    #[test]
    fn rendezvous_hashing_moves_only_the_keys_of_a_lost_instance() {
        let all = instances(5);
        let refs: Vec<&Arc<Instance>> = all.iter().collect();
        let without_last: Vec<&Arc<Instance>> = all.iter().take(4).collect();
        let balancer = Balancer::ConsistentHash(HashOn::Header("x-user".into()));
        let mut moved = 0;
        let mut spread = std::collections::HashMap::new();
        for k in 0..1000 {
            let mut headers = HeaderMap::new();
            headers.insert("x-user", format!("user-{k}").parse().unwrap());
            let ctx = PickContext {
                headers: &headers,
                client_ip: [127, 0, 0, 1].into(),
            };
            let before = balancer
                .pick(&refs, &ctx, std::time::Instant::now())
                .unwrap();
            let after = balancer
                .pick(&without_last, &ctx, std::time::Instant::now())
                .unwrap();
            *spread.entry(before.url.clone()).or_insert(0) += 1;
            if !Arc::ptr_eq(before, &all[4]) {
                assert!(Arc::ptr_eq(before, after), "a key of a kept instance moved");
            } else {
                moved += 1;
            }
        }
        assert!((120..=280).contains(&moved), "moved {moved}");
        assert!(
            spread.values().all(|c| (120..=280).contains(c)),
            "{spread:?}"
        );
    }

    #[test]
    fn smooth_weighted_round_robin_follows_the_weights() {
        let a = Arc::new(Instance::new("http://127.0.0.1:4001", 3, None).unwrap());
        let b = Arc::new(Instance::new("http://127.0.0.1:4002", 1, None).unwrap());
        let refs = vec![&a, &b];
        let balancer = Balancer::WeightedRoundRobin(Mutex::new(()));
        let headers = HeaderMap::new();
        let ctx = PickContext {
            headers: &headers,
            client_ip: [127, 0, 0, 1].into(),
        };
        let picks: Vec<bool> = (0..8)
            .map(|_| {
                Arc::ptr_eq(
                    balancer
                        .pick(&refs, &ctx, std::time::Instant::now())
                        .unwrap(),
                    &a,
                )
            })
            .collect();
        assert_eq!(picks.iter().filter(|x| **x).count(), 6);
        // Smooth: b is never picked twice in a row.
        assert!(picks.windows(2).all(|w| w[0] || w[1]));
    }

    #[test]
    fn p2c_prefers_the_instance_with_lower_peak_ewma() {
        let all = instances(2);
        all[0].observe_latency(std::time::Duration::from_millis(50));
        all[1].observe_latency(std::time::Duration::from_millis(1));
        let refs: Vec<&Arc<Instance>> = all.iter().collect();
        let headers = HeaderMap::new();
        let ctx = PickContext {
            headers: &headers,
            client_ip: [127, 0, 0, 1].into(),
        };
        for _ in 0..50 {
            assert!(Arc::ptr_eq(
                Balancer::P2cPeakEwma
                    .pick(&refs, &ctx, std::time::Instant::now())
                    .unwrap(),
                &all[1]
            ));
        }
    }

    #[test]
    fn the_latency_exponent_decides_between_a_slow_idle_and_a_fast_busy_instance() {
        // 3 ms idle versus 1 ms with 4 outstanding: by latency × (queue + 1)
        // the slow one wins (3 < 5); with latency² it loses (9 > 5).
        let pick_slow = |exponent: f64| {
            let config = crate::pool::PoolConfig {
                ewma_decay: std::time::Duration::from_secs(1000),
                latency_exponent: exponent,
                ..crate::pool::PoolConfig::for_tests()
            };
            let slow = Arc::new(
                Instance::new("http://127.0.0.1:4001", 1, None)
                    .unwrap()
                    .with_ewma(&config),
            );
            let fast = Arc::new(
                Instance::new("http://127.0.0.1:4002", 1, None)
                    .unwrap()
                    .with_ewma(&config),
            );
            slow.observe_latency(std::time::Duration::from_millis(3));
            fast.observe_latency(std::time::Duration::from_millis(1));
            let _busy: Vec<_> = (0..4).map(|_| Arc::clone(&fast).start()).collect();
            let refs = vec![&slow, &fast];
            let headers = HeaderMap::new();
            let ctx = PickContext {
                headers: &headers,
                client_ip: [127, 0, 0, 1].into(),
            };
            Arc::ptr_eq(
                Balancer::P2cPeakEwma
                    .pick(&refs, &ctx, std::time::Instant::now())
                    .unwrap(),
                &slow,
            )
        };
        assert!(pick_slow(1.0));
        assert!(!pick_slow(2.0));
    }

    #[test]
    fn least_requests_avoids_the_busy_instance() {
        let all = instances(3);
        let _busy = [
            Arc::clone(&all[0]).start(),
            Arc::clone(&all[0]).start(),
            Arc::clone(&all[1]).start(),
        ];
        let refs: Vec<&Arc<Instance>> = all.iter().collect();
        let headers = HeaderMap::new();
        let ctx = PickContext {
            headers: &headers,
            client_ip: [127, 0, 0, 1].into(),
        };
        let balancer = Balancer::LeastRequests(AtomicUsize::new(0));
        for _ in 0..10 {
            assert!(Arc::ptr_eq(
                balancer
                    .pick(&refs, &ctx, std::time::Instant::now())
                    .unwrap(),
                &all[2]
            ));
        }
    }
}
