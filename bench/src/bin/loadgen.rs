//! HTTP/1.1 keep-alive load generator. Closed loop (`--rate 0`: each
//! connection sends the next request when the last one is answered: the
//! maximum rate), or open loop at a fixed total rate, where latency is
//! measured from when each request was due whenever the server made it
//! late (the previous response on the connection came after it was due),
//! so a stalled server cannot hide its queueing (no coordinated omission);
//! a send late only because the generator woke late counts from the send.
//! The open loop's send times are kept by a pacing thread (`pace`) with
//! the OS's sub-millisecond sleeps, round robin over the connections:
//! tokio's timers tick in milliseconds, which sent the requests of each
//! millisecond together (24 at once at 24,000/s), a burst every server
//! measured then queued, adding hundreds of microseconds to its latency
//! that were the generator's making.
//! `--idle N` instead opens N connections, sends one request on each, and
//! holds them open for `--duration` (for memory per connection).
//! `--paths FILE` takes each request's path from the file (one per line)
//! instead of the URL's, picked with a Zipf distribution of exponent
//! `--zipf` (0: uniform) over the lines in order, and counts responses
//! whose `Cache-Status` says `hit` (`hits`, `hit_ratio`).
//! Prints one JSON summary line.

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper::Request;
use hyper_util::rt::TokioIo;
use shoal_bench::{Summary, Zipf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "Keep-alive HTTP/1.1 load generator printing a JSON summary")]
struct Args {
    /// Target, e.g. http://127.0.0.1:8080/
    #[arg(long)]
    url: String,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Seconds to run (after a one-second warm-up).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Total requests per second; 0 = as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Hold this many idle connections instead of generating load.
    #[arg(long, default_value_t = 0)]
    idle: usize,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Warm-up seconds, not measured.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// A file of request paths, one per line (rank order for --zipf).
    #[arg(long)]
    paths: Option<std::path::PathBuf>,
    /// Zipf exponent for picking from --paths; 0 picks uniformly.
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?
        .block_on(run(args))
}

struct Target {
    addr: String,
    host: String,
    path: String,
}

fn parse(url: &str) -> anyhow::Result<Target> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("only http:// URLs"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    Ok(Target {
        addr: host.to_string(),
        host: host.to_string(),
        path: path.to_string(),
    })
}

async fn connect(t: &Target) -> anyhow::Result<http1::SendRequest<Empty<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(&t.addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// Sends one request; true when the response says it was a cache hit.
async fn one(
    sender: &mut http1::SendRequest<Empty<Bytes>>,
    t: &Target,
    path: &str,
) -> anyhow::Result<bool> {
    sender.ready().await?;
    let req = Request::get(path)
        .header("host", &t.host)
        .body(Empty::new())?;
    let resp = sender.send_request(req).await?;
    let ok = resp.status().is_success();
    let hit = resp
        .headers()
        .get("cache-status")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').any(|p| p.trim() == "hit"));
    resp.into_body().collect().await?;
    if !ok {
        anyhow::bail!("status");
    }
    Ok(hit)
}

async fn run(args: Args) -> anyhow::Result<()> {
    let target = Arc::new(parse(&args.url)?);
    if args.idle > 0 {
        let mut held = Vec::with_capacity(args.idle);
        for _ in 0..args.idle {
            let mut s = connect(&target).await?;
            one(&mut s, &target, &target.path).await?;
            held.push(s);
        }
        println!("{{\"idle_connections\":{}}}", held.len());
        tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
        return Ok(());
    }
    let paths: Arc<Vec<String>> = Arc::new(match &args.paths {
        Some(file) => std::fs::read_to_string(file)?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
        None => vec![target.path.clone()],
    });
    anyhow::ensure!(!paths.is_empty(), "--paths file has no paths");
    let zipf = Arc::new(Zipf::new(paths.len(), args.zipf.max(0.0)));
    let hits = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let histogram = Arc::new(Mutex::new(hdrhistogram::Histogram::<u64>::new(3)?));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now() + Duration::from_secs_f64(args.warmup);
    let end = start + Duration::from_secs_f64(args.duration);
    // Open loop: one channel per connection, fed each request's due time
    // by the pacing thread.
    let mut pacer_ends = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..args.connections {
        let (target, histogram, errors) = (target.clone(), histogram.clone(), errors.clone());
        let (paths, zipf, hits) = (paths.clone(), zipf.clone(), hits.clone());
        let mut dues = if args.rate > 0.0 {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
            pacer_ends.push(tx);
            Some(rx)
        } else {
            None
        };
        tasks.push(tokio::spawn(async move {
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ ((i as u64 + 1) << 17);
            let mut local = hdrhistogram::Histogram::<u64>::new(3).unwrap();
            let mut sender = connect(&target).await.ok();
            // When the previous response on this connection ended.
            let mut free_at = Instant::now();
            loop {
                // `sent_due` is when this request was due. Latency counts
                // from then when the send was late because the previous
                // response came after it (the server stalled us: no
                // coordinated omission). When the connection was free in
                // time and only the generator woke late, it counts from
                // the send: that delay is the generator's, the same for
                // every server measured.
                let (sent_due, from) = if let Some(rx) = dues.as_mut() {
                    let Some(due) = rx.recv().await else { break };
                    (due, if free_at > due { due } else { Instant::now() })
                } else {
                    let now = Instant::now();
                    (now, now)
                };
                if sent_due >= end {
                    break;
                }
                let path = &paths[zipf.pick(&mut rng)];
                let result = match sender.as_mut() {
                    Some(s) => one(s, &target, path).await,
                    None => Err(anyhow::anyhow!("no connection")),
                };
                let measured = sent_due >= start;
                free_at = Instant::now();
                match result {
                    Ok(hit) => {
                        if measured && hit {
                            hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        if measured {
                            let us = from.elapsed().as_micros() as u64;
                            let _ = local.record(us.max(1));
                        }
                    }
                    Err(_) => {
                        if measured {
                            errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        sender = connect(&target).await.ok();
                    }
                }
            }
            histogram.lock().unwrap().add(&local).unwrap();
        }));
    }
    if args.rate > 0.0 {
        let interval = Duration::from_secs_f64(1.0 / args.rate);
        std::thread::Builder::new()
            .name("pacer".into())
            .spawn(move || pace(pacer_ends, interval, end))?;
    }
    for t in tasks {
        t.await?;
    }
    let h = histogram.lock().unwrap();
    let summary = Summary::from_histogram(
        &h,
        errors.load(std::sync::atomic::Ordering::Relaxed),
        args.duration,
    );
    let mut out = serde_json::to_value(&summary)?;
    let hits = hits.load(std::sync::atomic::Ordering::Relaxed);
    out["hits"] = hits.into();
    out["hit_ratio"] = (hits as f64 / summary.requests.max(1) as f64).into();
    println!("{out}");
    Ok(())
}

/// The open loop's clock: request k is due `k * interval` from now, on
/// connection k mod n. Sleeps with the OS's timer (tens of microseconds
/// late at most, against tokio's millisecond ticks) and hands out every
/// request that has come due on waking; a connection still busy with its
/// last response finds it waiting. Stops at `end` (dropping the senders
/// ends the connections' loops).
fn pace(conns: Vec<tokio::sync::mpsc::UnboundedSender<Instant>>, interval: Duration, end: Instant) {
    let t0 = Instant::now();
    let mut k: u32 = 0;
    loop {
        let now = Instant::now();
        loop {
            let due = t0 + interval * k;
            if due >= end {
                return;
            }
            if due > now {
                std::thread::sleep(due - now);
                break;
            }
            let _ = conns[k as usize % conns.len()].send(due);
            k += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pace_hands_out_every_due_time_once_round_robin_until_the_end() {
        let (senders, mut receivers): (Vec<_>, Vec<_>) = (0..3)
            .map(|_| tokio::sync::mpsc::unbounded_channel::<Instant>())
            .unzip();
        let interval = Duration::from_micros(500);
        let before = Instant::now();
        let end = before + Duration::from_millis(30);
        pace(senders, interval, end);
        let returned = Instant::now();
        let mut all = Vec::new();
        for rx in &mut receivers {
            let mut mine = Vec::new();
            while let Ok(due) = rx.try_recv() {
                // Handed out once it had come due, never ahead of time.
                assert!(due <= returned);
                mine.push(due);
            }
            // Each connection's requests are three intervals apart.
            for pair in mine.windows(2) {
                assert_eq!(pair[1] - pair[0], interval * 3);
            }
            all.extend(mine);
        }
        all.sort();
        // 30 ms at one per 500 µs, none at or after the end; the first
        // due when `pace` started, a moment (on a busy machine, a few
        // milliseconds) after `before`.
        assert!((50..=60).contains(&all.len()), "{} due times", all.len());
        assert!(all.iter().all(|d| *d >= before && *d < end));
        for pair in all.windows(2) {
            assert_eq!(pair[1] - pair[0], interval);
        }
        // It ran until the last one had come due.
        assert!(returned >= *all.last().unwrap());
    }
}
