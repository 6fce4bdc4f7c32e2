//! SSE fan-out benchmark client. Opens `--connections` Server-Sent Events
//! streams to `--stream-url` (one server instance), reads the resident
//! memory of the server process (`--pid`) before and after, then publishes
//! `--events` events through `--publish-url` (another instance) with the
//! send time in the body (`{"t": <unix µs>}`), and measures, on every
//! stream, how long each event took to arrive, and the CPU time (user,
//! system) the server process and this client spent per delivered event
//! while the events went out. Prints one JSON line.
//!
//! Raw HTTP/1.1 over TCP, so 10,000 streams cost the client little; the
//! client and the servers share the machine's clock.

use clap::Parser;
use serde::Serialize;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser, Debug)]
#[command(about = "Holds N SSE streams on one instance, publishes on another, times the fan-out")]
struct Args {
    /// Where the streams are opened, e.g. http://127.0.0.1:3001/api/notifications/stream
    #[arg(long)]
    stream_url: String,
    /// Where events are published (POST, JSON body `{"t": µs}`).
    #[arg(long)]
    publish_url: String,
    /// A `Cookie` header value sent with every request (a session).
    #[arg(long, default_value = "")]
    cookie: String,
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    #[arg(long, default_value_t = 20)]
    events: usize,
    /// Pause between events, ms.
    #[arg(long, default_value_t = 250)]
    interval_ms: u64,
    /// The process holding the streams, for its resident memory.
    #[arg(long)]
    pid: Option<u32>,
    /// Streams opened at once while connecting.
    #[arg(long, default_value_t = 200)]
    parallel: usize,
    #[arg(long, default_value = "")]
    label: String,
}

#[derive(Serialize)]
struct Report {
    label: String,
    connections: usize,
    opened: usize,
    events: usize,
    delivered: u64,
    expected: u64,
    rss_before_kib: u64,
    rss_after_kib: u64,
    kib_per_connection: f64,
    connect_seconds: f64,
    /// The first arrival of all: the bus's delay before the fan-out.
    min_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// CPU per delivered event while the events went out (from
    /// `/proc/PID/stat`, 10 ms ticks): the server's (`--pid`), user and
    /// system, and this client's.
    server_user_us_per_delivery: f64,
    server_system_us_per_delivery: f64,
    client_us_per_delivery: f64,
}

/// User and system CPU seconds of a process so far.
fn cpu_seconds(pid: &str) -> (f64, f64) {
    let ticks = 100.0; // USER_HZ on Linux
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command's closing parenthesis: state is
            // field 3, utime 14, stime 15.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
        })
        .map(|(u, s): (f64, f64)| (u / ticks, s / ticks))
        .unwrap_or((0.0, 0.0))
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

fn rss_kib(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

struct Url {
    addr: String,
    host: String,
    path: String,
}

fn parse(url: &str) -> anyhow::Result<Url> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("only http:// URLs: {url}"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    Ok(Url {
        addr: host.to_string(),
        host: host.to_string(),
        path: path.to_string(),
    })
}

/// Opens one stream; returns it once the response head says 200.
async fn open(url: &Url, cookie: &str) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    let mut s = TcpStream::connect(&url.addr).await?;
    let mut req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n",
        url.path, url.host
    );
    if !cookie.is_empty() {
        req.push_str(&format!("Cookie: {cookie}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]);
            anyhow::ensure!(
                head.starts_with("HTTP/1.1 200"),
                "stream refused: {}",
                head.lines().next().unwrap_or("")
            );
            let rest = buf[end + 4..].to_vec();
            return Ok((s, rest));
        }
    }
}

/// Reads a stream, recording the delay of every `"t":` it sees.
async fn read(mut s: TcpStream, mut pending: Vec<u8>, lat: Arc<Mutex<Vec<u64>>>) {
    let mut chunk = vec![0u8; 4096];
    loop {
        // Take every complete `"t":<digits>` in what has arrived.
        while let Some(i) = find(&pending, b"\"t\":") {
            let digits: Vec<u8> = pending[i + 4..]
                .iter()
                .copied()
                .take_while(u8::is_ascii_digit)
                .collect();
            if i + 4 + digits.len() >= pending.len() {
                break; // the number may go on in the next chunk
            }
            if let Ok(t) = std::str::from_utf8(&digits).unwrap_or("").parse::<u64>() {
                let now = now_us();
                lat.lock().unwrap().push(now.saturating_sub(t));
            }
            pending.drain(..i + 4 + digits.len());
        }
        if pending.len() > 64 * 1024 {
            pending.clear();
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => pending.extend_from_slice(&chunk[..n]),
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

async fn publish(url: &Url, cookie: &str) -> anyhow::Result<()> {
    let body = format!("{{\"t\":{}}}", now_us());
    let mut s = TcpStream::connect(&url.addr).await?;
    let mut req = format!(
        "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        url.path,
        url.host,
        body.len()
    );
    if !cookie.is_empty() {
        req.push_str(&format!("Cookie: {cookie}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    s.write_all(req.as_bytes()).await?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await?;
    let status = String::from_utf8_lossy(&head[9..12]).to_string();
    anyhow::ensure!(status.starts_with('2'), "publish answered {status}");
    Ok(())
}

fn quantile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] as f64 / 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let stream_url = parse(&args.stream_url)?;
    let publish_url = parse(&args.publish_url)?;
    let rss_before = rss_kib(args.pid);
    let lat: Arc<Mutex<Vec<u64>>> = Arc::default();
    let opened = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let stream_url = Arc::new(stream_url);
    let gate = Arc::new(tokio::sync::Semaphore::new(args.parallel.max(1)));
    let mut tasks = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let (url, cookie, lat, opened, gate) = (
            stream_url.clone(),
            args.cookie.clone(),
            lat.clone(),
            opened.clone(),
            gate.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await;
            let stream = open(&url, &cookie).await;
            drop(permit);
            match stream {
                Ok((s, rest)) => {
                    opened.fetch_add(1, Ordering::Relaxed);
                    read(s, rest, lat).await;
                }
                Err(e) => eprintln!("sse-fanout: {e}"),
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while opened.load(Ordering::Relaxed) < args.connections && Instant::now() < deadline {
        if tasks.iter().all(|t| t.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect_seconds = started.elapsed().as_secs_f64();
    let opened_n = opened.load(Ordering::Relaxed);
    eprintln!("sse-fanout: {opened_n} streams open in {connect_seconds:.1} s");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_kib(args.pid);

    let server = args.pid.map(|p| p.to_string()).unwrap_or_default();
    let server_before = cpu_seconds(&server);
    let client_before = cpu_seconds("self");
    for _ in 0..args.events {
        if let Err(e) = publish(&publish_url, &args.cookie).await {
            eprintln!("sse-fanout: publish failed: {e}");
        }
        tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
    }
    let expected = (opened_n * args.events) as u64;
    let wait = Instant::now() + Duration::from_secs(10);
    while (lat.lock().unwrap().len() as u64) < expected && Instant::now() < wait {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let server_after = cpu_seconds(&server);
    let client_after = cpu_seconds("self");
    let mut all = lat.lock().unwrap().clone();
    all.sort_unstable();
    let per = |seconds: f64| {
        if all.is_empty() {
            0.0
        } else {
            seconds * 1e6 / all.len() as f64
        }
    };
    let report = Report {
        label: args.label,
        connections: args.connections,
        opened: opened_n,
        events: args.events,
        delivered: all.len() as u64,
        expected,
        rss_before_kib: rss_before,
        rss_after_kib: rss_after,
        kib_per_connection: if opened_n > 0 {
            rss_after.saturating_sub(rss_before) as f64 / opened_n as f64
        } else {
            0.0
        },
        connect_seconds,
        min_ms: all.first().map_or(0.0, |&us| us as f64 / 1000.0),
        p50_ms: quantile(&all, 0.50),
        p99_ms: quantile(&all, 0.99),
        max_ms: quantile(&all, 1.0),
        server_user_us_per_delivery: per(server_after.0 - server_before.0),
        server_system_us_per_delivery: per(server_after.1 - server_before.1),
        client_us_per_delivery: per(client_after.0 + client_after.1
            - client_before.0
            - client_before.1),
    };
    println!("{}", serde_json::to_string(&report)?);
    for t in tasks {
        t.abort();
    }
    Ok(())
}
