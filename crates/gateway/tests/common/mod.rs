//! Test helpers: in-process upstreams on port 0 that can be killed like a
//! SIGKILLed process (listener and every open connection dropped at once),
//! an upstream that resets connections, a gateway on port 0 and a client.
#![allow(dead_code)]

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use shoal_core::settings::GatewaySettings;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// What an upstream records and how it behaves; shared with its handler.
#[derive(Default)]
pub struct UpstreamState {
    pub name: String,
    /// Requests other than health checks.
    pub hits: AtomicUsize,
    pub health_checks: AtomicUsize,
    /// `/readyz` answers 200 when true, 503 when false.
    pub ready: AtomicBool,
    /// Delay before answering ordinary requests, in ms.
    pub delay_ms: AtomicU64,
    /// Ordinary requests answered 503 `x-shoal-deadline: exceeded`, as a
    /// Shoal instance answers past the deadline the gateway gave it.
    pub deadline_exceeded: AtomicBool,
    /// When set, ordinary requests are answered 503 with this
    /// `x-shoal-overload` value, as a busy Shoal instance answers.
    pub overload: Mutex<Option<&'static str>>,
    /// Headers of the last ordinary request.
    pub last_headers: Mutex<Option<HeaderMap>>,
    /// HTTP version of the last ordinary request.
    pub last_version: Mutex<Option<http::Version>>,
    /// The gateway's addresses (one per upstream connection) that sent
    /// ordinary requests.
    pub peers: Mutex<std::collections::HashSet<SocketAddr>>,
}

/// An HTTP upstream on 127.0.0.1.
pub struct Upstream {
    pub addr: SocketAddr,
    pub state: Arc<UpstreamState>,
    stop: CancellationToken,
    accept: Option<JoinHandle<()>>,
}

impl Upstream {
    pub async fn start(name: &str) -> Upstream {
        Self::start_on("127.0.0.1:0".parse().unwrap(), name).await
    }

    /// Starts on a given address (to restart a killed upstream in place).
    pub async fn start_on(addr: SocketAddr, name: &str) -> Upstream {
        let state = Arc::new(UpstreamState {
            name: name.to_string(),
            ready: AtomicBool::new(true),
            ..Default::default()
        });
        Self::start_with(addr, state).await
    }

    pub async fn start_with(addr: SocketAddr, state: Arc<UpstreamState>) -> Upstream {
        let listener = TcpListener::bind(addr).await.expect("bind upstream");
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let accept = tokio::spawn({
            let stop = stop.clone();
            let state = Arc::clone(&state);
            async move {
                loop {
                    let (stream, peer) = tokio::select! {
                        _ = stop.cancelled() => return,
                        a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                    };
                    let state = Arc::clone(&state);
                    let stop = stop.clone();
                    tokio::spawn(async move {
                        let service =
                            hyper::service::service_fn(move |mut req: Request<Incoming>| {
                                let state = Arc::clone(&state);
                                req.extensions_mut().insert(peer);
                                async move { Ok::<_, Infallible>(answer(state, req).await) }
                            });
                        // HTTP/1.1, or HTTP/2 with prior knowledge (h2c pools).
                        let builder = hyper_util::server::conn::auto::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        );
                        let conn = builder.serve_connection(TokioIo::new(stream), service);
                        tokio::select! {
                            // Dropping the connection closes the socket, as a killed process would.
                            _ = stop.cancelled() => {}
                            _ = conn => {}
                        }
                    });
                }
            }
        });
        Upstream {
            addr,
            state,
            stop,
            accept: Some(accept),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    /// Drops the listener and every open connection at once.
    pub async fn kill(&mut self) {
        self.stop.cancel();
        if let Some(a) = self.accept.take() {
            let _ = a.await;
        }
        // Let the connection tasks observe the cancellation.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn answer(state: Arc<UpstreamState>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if path == "/readyz" {
        state.health_checks.fetch_add(1, Ordering::SeqCst);
        let status = if state.ready.load(Ordering::SeqCst) {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        return Response::builder()
            .status(status)
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    if path == "/missing" {
        // What a server without a health endpoint answers on one.
        state.health_checks.fetch_add(1, Ordering::SeqCst);
        return Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    state.hits.fetch_add(1, Ordering::SeqCst);
    if let Some(peer) = req.extensions().get::<SocketAddr>() {
        state.peers.lock().unwrap().insert(*peer);
    }
    *state.last_headers.lock().unwrap() = Some(req.headers().clone());
    *state.last_version.lock().unwrap() = Some(req.version());
    let delay = if path.ends_with("/slow") {
        3_000
    } else {
        state.delay_ms.load(Ordering::SeqCst)
    };
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if state.deadline_exceeded.load(Ordering::SeqCst) {
        return Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .header("x-upstream", state.name.as_str())
            .header("x-shoal-deadline", "exceeded")
            .body(Full::new(Bytes::from_static(b"timed out")))
            .unwrap();
    }
    if let Some(why) = *state.overload.lock().unwrap() {
        return Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .header("x-upstream", state.name.as_str())
            .header("x-shoal-overload", why)
            .body(Full::new(Bytes::from_static(b"busy")))
            .unwrap();
    }
    let body = if path == "/echo" {
        req.into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default()
    } else {
        Bytes::from(state.name.clone())
    };
    Response::builder()
        .header("x-upstream", state.name.as_str())
        .header("keep-alive", "timeout=60")
        .body(Full::new(body))
        .unwrap()
}

/// An upstream that answers `/readyz` but closes every other connection
/// after reading the request head: the request reached it, no answer came.
pub struct ResettingUpstream {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl ResettingUpstream {
    pub async fn start() -> ResettingUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&requests);
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let Some(head) = read_request_head(&mut stream).await else {
                        return;
                    };
                    if head.starts_with(b"GET /readyz ") {
                        let _ = stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                            .await;
                        return;
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    drop(stream);
                });
            }
        });
        ResettingUpstream {
            addr,
            requests,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for ResettingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The admin token of every test gateway that [`settings`] makes.
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";

/// Gateway settings for tests: one pool `default` of `upstreams`, fast
/// health checks and ejections, [`ADMIN_TOKEN`], with `overrides` (JSON,
/// by setting name) applied on top. JSON lets tests set enum settings by their names.
pub fn settings(upstreams: &[String], overrides: serde_json::Value) -> GatewaySettings {
    let mut value = serde_json::to_value(GatewaySettings::default()).unwrap();
    let base = serde_json::json!({
        "listen": "127.0.0.1:0",
        "pools": [{ "name": "default", "upstreams": upstreams }],
        "health_interval_ms": 100,
        "health_timeout_ms": 200,
        "eject_base_ms": 300,
        "connect_timeout_ms": 300,
        "request_timeout_ms": 2_000,
        "shutdown_timeout_secs": 5,
        "balancer": "round_robin",
        "admin_token": ADMIN_TOKEN,
        // Every test client is 127.0.0.1.
        "max_connections_per_client": 0,
    });
    for source in [base, overrides] {
        for (k, v) in source.as_object().unwrap() {
            value[k] = v.clone();
        }
    }
    serde_json::from_value(value).expect("test settings")
}

/// A gateway running on port 0 until `stop` is cancelled.
pub struct TestGateway {
    pub addr: SocketAddr,
    pub stop: CancellationToken,
    pub task: JoinHandle<Result<(), shoal_gateway::GatewayError>>,
}

impl TestGateway {
    pub async fn start(settings: GatewaySettings) -> TestGateway {
        let gateway = shoal_gateway::Gateway::bind(settings)
            .await
            .expect("bind gateway");
        let addr = gateway.local_addr();
        let stop = CancellationToken::new();
        let task = tokio::spawn(gateway.run(stop.clone()));
        TestGateway { addr, stop, task }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn pools(&self, client: &TestClient) -> serde_json::Value {
        let r = client.get_admin(&self.url("/_gateway/pools")).await;
        serde_json::from_str(&r.body).unwrap()
    }

    /// The `/_gateway/pools` entry of instance `url` in pool `default`.
    pub async fn instance(&self, client: &TestClient, url: &str) -> serde_json::Value {
        let pools = self.pools(client).await;
        pools["pools"][0]["instances"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["url"] == url)
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A reply read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

/// A keep-alive HTTP/1.1 client.
#[derive(Clone)]
pub struct TestClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for TestClient {
    fn default() -> Self {
        TestClient {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }
}

impl TestClient {
    pub async fn get(&self, url: &str) -> Reply {
        self.send(Request::get(url).body(Full::new(Bytes::new())).unwrap())
            .await
    }

    /// GETs with `Authorization: Bearer` [`ADMIN_TOKEN`].
    pub async fn get_admin(&self, url: &str) -> Reply {
        self.send(
            Request::get(url)
                .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
    }

    /// POSTs a small JSON body.
    pub async fn post_json(&self, url: &str) -> Reply {
        let req = Request::post(url)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from_static(b"{}")))
            .unwrap();
        self.send(req).await
    }

    pub async fn send(&self, req: Request<Full<Bytes>>) -> Reply {
        let response = tokio::time::timeout(Duration::from_secs(10), self.client.request(req))
            .await
            .expect("gateway answered within 10 s")
            .expect("request reached the gateway");
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.expect("body").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }
}

/// Polls `check` every 20 ms until it is true or `within` passes.
pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// POSTs JSON to the gateway's admin API with `token`, or with
/// [`ADMIN_TOKEN`] when `None`.
pub async fn admin(
    client: &TestClient,
    gw: &TestGateway,
    action: &str,
    body: serde_json::Value,
    token: Option<&str>,
) -> Reply {
    let mut b = Request::post(gw.url(&format!("/_gateway/admin/{action}")))
        .header("content-type", "application/json");
    let t = token.unwrap_or(ADMIN_TOKEN);
    b = b.header("authorization", format!("Bearer {t}"));
    client
        .send(b.body(Full::new(Bytes::from(body.to_string()))).unwrap())
        .await
}

/// `n` loops sending GETs to `url` until stopped, counting every request
/// and every answer other than 200 (for "zero failed requests" checks).
pub struct GetLoad {
    stop: CancellationToken,
    done: Arc<AtomicUsize>,
    failures: Arc<AtomicUsize>,
    workers: Vec<JoinHandle<()>>,
}

impl GetLoad {
    pub fn start(client: &TestClient, url: String, n: usize) -> GetLoad {
        let stop = CancellationToken::new();
        let done = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(AtomicUsize::new(0));
        let workers = (0..n)
            .map(|_| {
                let (client, url, failures, done, stop) = (
                    client.clone(),
                    url.clone(),
                    failures.clone(),
                    done.clone(),
                    stop.clone(),
                );
                tokio::spawn(async move {
                    while !stop.is_cancelled() {
                        let r = client.get(&url).await;
                        if r.status != StatusCode::OK {
                            eprintln!("failed: {} {}", r.status, r.body);
                            failures.fetch_add(1, Ordering::SeqCst);
                        }
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        GetLoad {
            stop,
            done,
            failures,
            workers,
        }
    }

    /// Stops the loops; returns (requests, failed).
    pub async fn finish(self) -> (usize, usize) {
        self.stop.cancel();
        for w in self.workers {
            w.await.unwrap();
        }
        (
            self.done.load(Ordering::SeqCst),
            self.failures.load(Ordering::SeqCst),
        )
    }
}

/// Reads raw bytes until the peer closes the connection or `within`
/// passes, or (with `until`) as soon as the text read holds it that many
/// times. Returns the text and whether the peer closed (TCP or TLS).
pub async fn read_raw<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    within: Duration,
    until: Option<(&str, usize)>,
) -> (String, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(within, async {
        loop {
            if let Some((text, n)) = until {
                if String::from_utf8_lossy(&got).matches(text).count() >= n {
                    return false;
                }
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .unwrap_or(false);
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

/// Reads a request head (up to its blank line) on a raw test instance;
/// `None` when the connection ends first.
pub async fn read_request_head(stream: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(head)
}

/// An HTTP/2 (prior knowledge) client connection to `addr`, with the given
/// stream window when one is set; the connection runs in the returned task.
pub async fn h2c(
    addr: SocketAddr,
    stream_window: Option<u32>,
) -> (
    hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    JoinHandle<hyper::Result<()>>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    if let Some(window) = stream_window {
        builder.initial_stream_window_size(window);
    }
    let (send, conn) = builder.handshake(TokioIo::new(tcp)).await.unwrap();
    (send, tokio::spawn(conn))
}

/// A GET of `path` on `addr` for a client connection of its own making.
pub fn get_request(addr: SocketAddr, path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// `SHOAL_TEST_REDIS_URL`, or `None` after one `skipped:` line.
pub fn redis_url(test: &str) -> Option<String> {
    match std::env::var("SHOAL_TEST_REDIS_URL") {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            println!("skipped: set SHOAL_TEST_REDIS_URL to run {test}");
            None
        }
    }
}
