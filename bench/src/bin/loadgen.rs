//! HTTP/1.1 keep-alive load generator. Closed loop (`--rate 0`: each
//! connection sends the next request when the last one is answered: the
//! maximum rate), or open loop at a fixed total rate, where latency is
//! measured from when each request was due, not when it was sent, so a
//! stalled server cannot hide its queueing (no coordinated omission).
//! `--idle N` instead opens N connections, sends one request on each, and
//! holds them open for `--duration` (for memory per connection).
//! Prints one JSON summary line.

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper::Request;
use hyper_util::rt::TokioIo;
use shoal_bench::Summary;
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

async fn one(sender: &mut http1::SendRequest<Empty<Bytes>>, t: &Target) -> anyhow::Result<()> {
    sender.ready().await?;
    let req = Request::get(&t.path)
        .header("host", &t.host)
        .body(Empty::new())?;
    let resp = sender.send_request(req).await?;
    let ok = resp.status().is_success();
    resp.into_body().collect().await?;
    if !ok {
        anyhow::bail!("status");
    }
    Ok(())
}

async fn run(args: Args) -> anyhow::Result<()> {
    let target = Arc::new(parse(&args.url)?);
    if args.idle > 0 {
        let mut held = Vec::with_capacity(args.idle);
        for _ in 0..args.idle {
            let mut s = connect(&target).await?;
            one(&mut s, &target).await?;
            held.push(s);
        }
        println!("{{\"idle_connections\":{}}}", held.len());
        tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
        return Ok(());
    }
    let histogram = Arc::new(Mutex::new(hdrhistogram::Histogram::<u64>::new(3)?));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let start = Instant::now() + Duration::from_secs_f64(args.warmup);
    let end = start + Duration::from_secs_f64(args.duration);
    let per_conn_interval = if args.rate > 0.0 {
        Some(Duration::from_secs_f64(args.connections as f64 / args.rate))
    } else {
        None
    };
    let mut tasks = Vec::new();
    for i in 0..args.connections {
        let (target, histogram, errors) = (target.clone(), histogram.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut local = hdrhistogram::Histogram::<u64>::new(3).unwrap();
            let mut sender = connect(&target).await.ok();
            // Spread open-loop senders evenly over one interval.
            let mut due = Instant::now()
                + per_conn_interval
                    .map(|iv| iv.mul_f64(i as f64 / args.connections as f64))
                    .unwrap_or_default();
            loop {
                // `sent_due` is when this request was due: latency counts
                // from then, so a late send (the server stalled us) counts.
                let sent_due = if let Some(iv) = per_conn_interval {
                    tokio::time::sleep_until(due.into()).await;
                    let this = due;
                    due += iv;
                    this
                } else {
                    Instant::now()
                };
                if sent_due >= end {
                    break;
                }
                let result = match sender.as_mut() {
                    Some(s) => one(s, &target).await,
                    None => Err(anyhow::anyhow!("no connection")),
                };
                let measured = sent_due >= start;
                match result {
                    Ok(()) => {
                        if measured {
                            let us = sent_due.elapsed().as_micros() as u64;
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
    for t in tasks {
        t.await?;
    }
    let h = histogram.lock().unwrap();
    let summary = Summary::from_histogram(
        &h,
        errors.load(std::sync::atomic::Ordering::Relaxed),
        args.duration,
    );
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}
