//! A realistic mix against a Shoal stack through its gateway, closed loop
//! (each connection sends its next request when the last is answered):
//! product reads by id, picked by a Zipf law over the catalog, `/me` with
//! a session (Redis or database), and a checkout (`POST /api/orders`
//! with an idempotency key, which enqueues a payment job) every
//! `--checkout-every` requests. Sign-ups and logins happen before the
//! measured time. Prints one JSON line: the `Summary` of every request,
//! and counts and p99 per kind.

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::Request;
use hyper_util::rt::TokioIo;
use shoal_bench::{uniform, Summary, Zipf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "Closed-loop mix of product reads, /me and checkouts, printing a JSON summary")]
struct Args {
    /// The gateway, e.g. 127.0.0.1:8080.
    #[arg(long)]
    addr: String,
    /// Concurrent keep-alive connections, each with a user of its own.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Seconds measured, after the warm-up.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Seconds of load not measured.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,
    /// One request in this many is a checkout.
    #[arg(long, default_value_t = 50)]
    checkout_every: u64,
    /// Share of the other requests that read a product (the rest are /me).
    #[arg(long, default_value_t = 0.8)]
    product_share: f64,
    /// Zipf exponent over the products (by the catalog's order).
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Products to read from (the first N of the catalog).
    #[arg(long, default_value_t = 500)]
    products: usize,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

const KINDS: [&str; 3] = ["product", "me", "checkout"];

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?
        .block_on(run(args))
}

type Sender = http1::SendRequest<Full<Bytes>>;

async fn connect(addr: &str) -> anyhow::Result<Sender> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// One request; the status, the `Set-Cookie` value's first part, the body.
async fn send(
    sender: &mut Sender,
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> anyhow::Result<(u16, Option<String>, Bytes)> {
    sender.ready().await?;
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let cookie = resp
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::to_string);
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, cookie, body))
}

async fn product_ids(addr: &str, want: usize) -> anyhow::Result<Vec<String>> {
    let mut s = connect(addr).await?;
    let mut ids = Vec::new();
    let mut page = 1;
    while ids.len() < want {
        let path = format!("/api/catalog/products?per_page=100&page={page}");
        let (status, _, body) = send(&mut s, addr, "GET", &path, &[], None).await?;
        anyhow::ensure!(status == 200, "{path}: {status}");
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        let list = v
            .get("products")
            .or_else(|| v.get("items"))
            .and_then(|l| l.as_array())
            .cloned()
            .unwrap_or_default();
        if list.is_empty() {
            break;
        }
        ids.extend(
            list.iter()
                .filter_map(|p| p["id"].as_str().map(str::to_string)),
        );
        page += 1;
    }
    ids.truncate(want);
    anyhow::ensure!(
        !ids.is_empty(),
        "the catalog is empty: run `shoal seed` first"
    );
    Ok(ids)
}

/// Signs a new user up and logs in; returns the session cookie.
async fn user(addr: &str, n: usize) -> anyhow::Result<String> {
    let mut s = connect(addr).await?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos();
    let creds = format!(r#"{{"email":"mix{n}-{stamp}@example.com","password":"correct horse"}}"#);
    let (status, _, body) = send(
        &mut s,
        addr,
        "POST",
        "/api/accounts/signup",
        &[],
        Some(creds.clone()),
    )
    .await?;
    anyhow::ensure!(
        status == 201,
        "signup: {status} {}",
        String::from_utf8_lossy(&body)
    );
    let (status, cookie, _) = send(
        &mut s,
        addr,
        "POST",
        "/api/accounts/login",
        &[],
        Some(creds),
    )
    .await?;
    anyhow::ensure!(status == 200, "login: {status}");
    cookie.ok_or_else(|| anyhow::anyhow!("login set no cookie"))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let addr: Arc<str> = args.addr.clone().into();
    let ids = Arc::new(product_ids(&addr, args.products).await?);
    let zipf = Arc::new(Zipf::new(ids.len(), args.zipf.max(0.0)));
    let mut cookies = Vec::new();
    for n in 0..args.connections {
        cookies.push(user(&addr, n).await?);
    }
    let histograms: Arc<Mutex<Vec<hdrhistogram::Histogram<u64>>>> = Arc::new(Mutex::new(
        (0..=KINDS.len())
            .map(|_| hdrhistogram::Histogram::new(3).unwrap())
            .collect(),
    ));
    let errors = Arc::new(AtomicU64::new(0));
    let start = Instant::now() + Duration::from_secs_f64(args.warmup);
    let end = start + Duration::from_secs_f64(args.duration);
    let mut tasks = Vec::new();
    for (i, cookie) in cookies.into_iter().enumerate() {
        let (addr, ids, zipf) = (addr.clone(), ids.clone(), zipf.clone());
        let (histograms, errors) = (histograms.clone(), errors.clone());
        let (every, share) = (args.checkout_every.max(1), args.product_share);
        tasks.push(tokio::spawn(async move {
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ ((i as u64 + 1) << 17);
            let mut local: Vec<_> = (0..=KINDS.len())
                .map(|_| hdrhistogram::Histogram::<u64>::new(3).unwrap())
                .collect();
            let mut sender = connect(&addr).await.ok();
            // Connections start at different points of the cycle.
            let mut k: u64 = i as u64 * 7;
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                k += 1;
                let product = &ids[zipf.pick(&mut rng)];
                let (kind, method, path, body, want) = if k.is_multiple_of(every) {
                    let body = format!(
                        r#"{{"items":[{{"product_id":"{product}","quantity":1}}],"payment_method":"pm_card_visa"}}"#
                    );
                    (2, "POST", "/api/orders".to_string(), Some(body), 201)
                } else if uniform(&mut rng) < share {
                    (0, "GET", format!("/api/catalog/products/{product}"), None, 200)
                } else {
                    (1, "GET", "/api/accounts/me".to_string(), None, 200)
                };
                let key = format!("mix-{i}-{k}-{}", now.elapsed().as_nanos());
                let mut headers = vec![("cookie", cookie.as_str())];
                if kind == 2 {
                    headers.push(("idempotency-key", key.as_str()));
                }
                let result = match sender.as_mut() {
                    Some(s) => send(s, &addr, method, &path, &headers, body).await,
                    None => Err(anyhow::anyhow!("no connection")),
                };
                let measured = now >= start;
                match result {
                    Ok((status, _, _)) if status == want => {
                        if measured {
                            let us = (now.elapsed().as_micros() as u64).max(1);
                            let _ = local[kind].record(us);
                            let _ = local[KINDS.len()].record(us);
                        }
                    }
                    Ok(_) => {
                        if measured {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(_) => {
                        if measured {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                        sender = connect(&addr).await.ok();
                    }
                }
            }
            let mut all = histograms.lock().unwrap();
            for (a, l) in all.iter_mut().zip(&local) {
                a.add(l).unwrap();
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let h = histograms.lock().unwrap();
    let summary = Summary::from_histogram(
        &h[KINDS.len()],
        errors.load(Ordering::Relaxed),
        args.duration,
    );
    let mut out = serde_json::to_value(&summary)?;
    for (i, kind) in KINDS.iter().enumerate() {
        out[format!("{kind}_requests")] = h[i].len().into();
        out[format!("{kind}_p99_us")] = h[i].value_at_quantile(0.99).into();
    }
    println!("{out}");
    Ok(())
}
