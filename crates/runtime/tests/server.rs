//! The instance's HTTP server (`server.rs`): HTTP/1.1 by Shoal's own
//! server, HTTP/2 with prior knowledge and upgrade handshakes handed to
//! hyper with what was read of them, and the close of every connection
//! when the instance drains. Over raw sockets, so what is on the wire is
//! what is checked.

use shoal_core::Settings;
use shoal_runtime::{Application, ServiceModule};
use shoal_testkit as kit;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

struct Running {
    addr: std::net::SocketAddr,
    stop: CancellationToken,
    run: tokio::task::JoinHandle<anyhow::Result<()>>,
    _dir: kit::TempDir,
}

async fn start(drain_delay_ms: u64) -> Running {
    let dir = kit::TempDir::new("runtime-server");
    let mut settings = Settings {
        data_dir: dir.path().to_path_buf(),
        ..Settings::default()
    };
    settings.serve.listen = "127.0.0.1:0".parse().unwrap();
    settings.serve.debug_routes = true;
    settings.serve.drain_delay_ms = drain_delay_ms;
    let modules: Vec<Box<dyn ServiceModule>> = Vec::new();
    let app = Application::build(settings, modules).await.unwrap();
    let addr = app.local_addr();
    let stop = CancellationToken::new();
    let run = tokio::spawn(app.run(stop.clone()));
    Running {
        addr,
        stop,
        run,
        _dir: dir,
    }
}

/// Reads one response whose body is framed by Content-Length; returns its
/// head (lower-cased) and body.
async fn response(io: &mut TcpStream) -> (String, String) {
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            while got.len() < end + 4 + length {
                let n = tokio::time::timeout(Duration::from_secs(5), io.read(&mut chunk))
                    .await
                    .expect("the body in time")
                    .unwrap();
                assert!(n > 0, "closed in the middle of a body");
                got.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8_lossy(&got[end + 4..end + 4 + length]).into_owned();
            return (head, body);
        }
        let n = tokio::time::timeout(Duration::from_secs(5), io.read(&mut chunk))
            .await
            .expect("a response in time")
            .unwrap();
        assert!(n > 0, "closed before a response: {got:?}");
        got.extend_from_slice(&chunk[..n]);
    }
}

/// True when the peer closes the connection within `limit`.
async fn closes_within(io: &mut TcpStream, limit: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(limit, io.read(&mut byte)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test]
async fn an_upgrade_request_is_answered_and_the_connection_goes_on() {
    let app = start(0).await;
    let mut io = TcpStream::connect(app.addr).await.unwrap();
    // A handshake to a route that does not upgrade: handed to hyper with
    // its head written out again, answered as a plain request, and the
    // connection serves the next one. (A client waits for the answer to
    // a handshake before it sends more.)
    io.write_all(
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    let (head, body) = response(&mut io).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    io.write_all(b"GET /healthz?second HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = response(&mut io).await;
    assert!(head.starts_with("http/1.1 200"), "second request: {head}");
    app.stop.cancel();
    app.run.await.unwrap().unwrap();
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_served() {
    let app = start(0).await;
    let io = TcpStream::connect(app.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("http://{}/healthz", app.addr))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let res = send.send_request(req).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.version(), http::Version::HTTP_2);
    drop(send);
    app.stop.cancel();
    app.run.await.unwrap().unwrap();
}

#[tokio::test]
async fn draining_closes_idle_connections_and_busy_ones_after_their_response() {
    let app = start(200).await;
    let mut idle = TcpStream::connect(app.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = response(&mut idle).await;
    assert!(!head.contains("connection: close"), "{head}");
    let mut busy = TcpStream::connect(app.addr).await.unwrap();
    busy.write_all(b"GET /_debug/sleep?ms=700 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    app.stop.cancel();
    // Kept open through the drain delay (the gateway is still being told
    // the instance is leaving), then closed at once.
    assert!(!closes_within(&mut idle, Duration::from_millis(100)).await);
    assert!(
        closes_within(&mut idle, Duration::from_secs(2)).await,
        "an idle connection stayed open after the drain delay"
    );
    // The request in flight finishes, says the connection closes, and it
    // does.
    let (head, _) = response(&mut busy).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert!(closes_within(&mut busy, Duration::from_secs(2)).await);
    tokio::time::timeout(Duration::from_secs(5), app.run)
        .await
        .expect("run returns once every connection ended")
        .unwrap()
        .unwrap();
}

/// Answers the length of the body it buffered (axum's `Bytes` extractor,
/// which obeys the body limit).
async fn body_length(body: axum::body::Bytes) -> String {
    body.len().to_string()
}

#[derive(Clone)]
struct Lengths;

impl ServiceModule for Lengths {
    fn name(&self) -> &'static str {
        "lengths"
    }
    fn migrations(&self) -> &'static [shoal_backends::Migration] {
        &[]
    }
    fn routes(&self, _: &shoal_runtime::AppContext) -> shoal_runtime::openapi::Api {
        use shoal_runtime::openapi::{Api, Op};
        Api::new()
            .post("/api/lengths", body_length, Op::new("lengths", "Length"))
            .get("/api/lengths", body_length, Op::new("lengths", "Length"))
    }
}

/// `serve.body_limit_bytes` holds for every buffered body, a GET's too,
/// below axum's own default (2 MB); a request without a body skips the
/// limit's layer and is answered as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_limit_holds_for_every_request_with_a_body() {
    use shoal_runtime::testing::TestApp;
    let app = TestApp::builder()
        .module(Lengths)
        .settings(|s| s.serve.body_limit_bytes = 1000)
        .start()
        .await;
    let http = app.client();
    let url = app.url("/api/lengths");
    for (method, size, want) in [
        (reqwest::Method::POST, 1000, 200),
        (reqwest::Method::POST, 1001, 413),
        (reqwest::Method::POST, 0, 200),
        (reqwest::Method::GET, 1500, 413),
        (reqwest::Method::GET, 700, 200),
    ] {
        let r = http
            .request(method.clone(), &url)
            .body(vec![b'x'; size])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), want, "{method} with {size} bytes");
        if want == 200 {
            assert_eq!(r.text().await.unwrap(), size.to_string());
        } else {
            kit::problem(r, 413).await;
        }
    }
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "0");
}
