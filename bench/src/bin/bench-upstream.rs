//! A minimal HTTP/1.1 upstream for proxy benchmarks: answers every request
//! with a fixed body (1 KiB by default) after an optional delay, and counts
//! the connections it accepted and the requests it served at `/_stats`, so
//! a benchmark can compute connection reuse behind a proxy.

use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(about = "Fixed-response HTTP/1.1 upstream for benchmarks")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: String,
    /// Response body size in bytes.
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Delay before answering, ms (a slow instance).
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Worker threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// A Cache-Control header to send (for cache benchmarks).
    #[arg(long)]
    cache_control: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?
        .block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    let body = Bytes::from(vec![b'x'; args.size]);
    let connections = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let delay = Duration::from_millis(args.delay_ms);
    let cache_control = args
        .cache_control
        .as_deref()
        .map(hyper::header::HeaderValue::from_str)
        .transpose()?;
    println!("bench-upstream listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        connections.fetch_add(1, Ordering::Relaxed);
        let (body, connections, requests, cache_control) = (
            body.clone(),
            connections.clone(),
            requests.clone(),
            cache_control.clone(),
        );
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (body, connections, requests, cache_control) = (
                    body.clone(),
                    connections.clone(),
                    requests.clone(),
                    cache_control.clone(),
                );
                async move {
                    if req.uri().path() == "/_stats" {
                        let stats = format!(
                            "{{\"connections\":{},\"requests\":{}}}",
                            connections.load(Ordering::Relaxed),
                            requests.load(Ordering::Relaxed)
                        );
                        return Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from(stats))));
                    }
                    requests.fetch_add(1, Ordering::Relaxed);
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let mut r = Response::new(Full::new(body));
                    r.headers_mut()
                        .insert("content-type", "application/octet-stream".parse().unwrap());
                    if let Some(cc) = cache_control {
                        r.headers_mut().insert("cache-control", cc);
                    }
                    Ok(r)
                }
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
