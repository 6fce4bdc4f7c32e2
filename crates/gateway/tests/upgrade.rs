//! WebSocket (HTTP/1.1 Upgrade) pass-through and unbuffered SSE streaming.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// An upstream that switches `/ws` to an echo protocol after a 101 (bytes
/// written are sent back upper-cased, after a greeting), and `/wsf` to
/// WebSocket frames (half of a text frame "abcdef", the rest once
/// `release` is notified, then it keeps what the client sends in
/// `received`), answers `/events` with an SSE stream fed by the test, and
/// `/readyz` with 200.
struct SpecialUpstream {
    addr: SocketAddr,
    /// Headers of the last `/ws` request.
    ws_headers: Arc<Mutex<Option<http::HeaderMap>>>,
    /// Senders of the SSE stream of each `/events` request.
    events: Arc<Mutex<Vec<mpsc::Sender<Bytes>>>>,
    /// `/wsf`: lets the instance finish its frame.
    release: Arc<tokio::sync::Notify>,
    /// `/wsf`: what the client sent after the upgrade.
    received: Arc<Mutex<Vec<u8>>>,
}

async fn special_upstream() -> SpecialUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let ws_headers = Arc::new(Mutex::new(None));
    let events = Arc::new(Mutex::new(Vec::new()));
    let release = Arc::new(tokio::sync::Notify::new());
    let received = Arc::new(Mutex::new(Vec::new()));
    let (h, e) = (ws_headers.clone(), events.clone());
    let (rel, rec) = (release.clone(), received.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (h, e) = (h.clone(), e.clone());
            let (rel, rec) = (rel.clone(), rec.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                    let (h, e) = (h.clone(), e.clone());
                    let (rel, rec) = (rel.clone(), rec.clone());
                    async move {
                        let path = req.uri().path().to_string();
                        let resp: Response<BoxBody> = match path.as_str() {
                            "/wsbye" => {
                                // Says goodbye (a close frame) and hangs up.
                                let on = hyper::upgrade::on(&mut req);
                                tokio::spawn(async move {
                                    let upgraded = on.await.expect("upstream upgrade");
                                    let mut io = TokioIo::new(upgraded);
                                    io.write_all(&[0x88, 0x02, 0x03, 0xE8]).await.unwrap();
                                    let _ = io.shutdown().await;
                                });
                                Response::builder()
                                    .status(StatusCode::SWITCHING_PROTOCOLS)
                                    .header("upgrade", "websocket")
                                    .header("connection", "upgrade")
                                    .body(Full::new(Bytes::new()).boxed())
                                    .unwrap()
                            }
                            "/wsf" => {
                                let on = hyper::upgrade::on(&mut req);
                                tokio::spawn(async move {
                                    let upgraded = on.await.expect("upstream upgrade");
                                    let mut io = TokioIo::new(upgraded);
                                    io.write_all(&[0x81, 0x06, b'a', b'b', b'c']).await.unwrap();
                                    rel.notified().await;
                                    io.write_all(b"def").await.unwrap();
                                    let mut buf = [0u8; 256];
                                    loop {
                                        match io.read(&mut buf).await {
                                            Ok(0) | Err(_) => return,
                                            Ok(n) => {
                                                rec.lock().unwrap().extend_from_slice(&buf[..n])
                                            }
                                        }
                                    }
                                });
                                Response::builder()
                                    .status(StatusCode::SWITCHING_PROTOCOLS)
                                    .header("upgrade", "websocket")
                                    .header("connection", "upgrade")
                                    .body(Full::new(Bytes::new()).boxed())
                                    .unwrap()
                            }
                            "/ws" => {
                                *h.lock().unwrap() = Some(req.headers().clone());
                                if req.headers().get("upgrade").is_none() {
                                    Response::new(
                                        Full::new(Bytes::from("no upgrade header")).boxed(),
                                    )
                                } else {
                                    let on = hyper::upgrade::on(&mut req);
                                    tokio::spawn(async move {
                                        let upgraded = on.await.expect("upstream upgrade");
                                        let mut io = TokioIo::new(upgraded);
                                        io.write_all(b"hello from upstream\n").await.unwrap();
                                        let mut buf = [0u8; 1024];
                                        loop {
                                            match io.read(&mut buf).await {
                                                Ok(0) | Err(_) => return,
                                                Ok(n) => {
                                                    let up = buf[..n].to_ascii_uppercase();
                                                    if io.write_all(&up).await.is_err() {
                                                        return;
                                                    }
                                                }
                                            }
                                        }
                                    });
                                    Response::builder()
                                        .status(StatusCode::SWITCHING_PROTOCOLS)
                                        .header("upgrade", "websocket")
                                        .header("connection", "upgrade")
                                        .header(
                                            "sec-websocket-accept",
                                            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
                                        )
                                        .body(Full::new(Bytes::new()).boxed())
                                        .unwrap()
                                }
                            }
                            "/events" => {
                                let (tx, rx) = mpsc::channel::<Bytes>(8);
                                e.lock().unwrap().push(tx);
                                let stream =
                                    futures_util::stream::unfold(rx, |mut rx| async move {
                                        rx.recv()
                                            .await
                                            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
                                    });
                                Response::builder()
                                    .header("content-type", "text/event-stream")
                                    .header("cache-control", "no-cache")
                                    .body(StreamBody::new(stream).boxed())
                                    .unwrap()
                            }
                            _ => Response::new(Full::new(Bytes::from("ok")).boxed()),
                        };
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    SpecialUpstream {
        addr,
        ws_headers,
        events,
        release,
        received,
    }
}

/// Reads until `needle` has arrived (in what this call or an earlier one
/// left unconsumed); returns everything up to and including it.
async fn read_until(stream: &mut TcpStream, pending: &mut Vec<u8>, needle: &[u8]) -> Vec<u8> {
    let mut buf = [0u8; 1024];
    let read = async {
        loop {
            if let Some(at) = pending.windows(needle.len()).position(|w| w == needle) {
                return pending.drain(..at + needle.len()).collect::<Vec<u8>>();
            }
            let n = stream.read(&mut buf).await.expect("read");
            assert!(
                n > 0,
                "closed early; got {:?}",
                String::from_utf8_lossy(pending)
            );
            pending.extend_from_slice(&buf[..n]);
        }
    };
    match tokio::time::timeout(Duration::from_secs(5), read).await {
        Ok(got) => got,
        Err(_) => panic!(
            "timed out waiting for {:?}",
            String::from_utf8_lossy(needle)
        ),
    }
}

#[tokio::test]
async fn websocket_upgrade_is_proxied_and_bytes_flow_both_ways() {
    let up = special_upstream().await;
    let gw = TestGateway::start(settings(&[format!("http://{}", up.addr)], json!({}))).await;

    let mut client = TcpStream::connect(gw.addr).await.unwrap();
    client
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: chat.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    let mut pending = Vec::new();
    let head = read_until(&mut client, &mut pending, b"\r\n\r\n").await;
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(head.contains("connection: upgrade"), "{head}");
    assert!(head.contains("sec-websocket-accept"), "{head}");
    assert!(head.contains("x-request-id"), "{head}");

    let seen = up
        .ws_headers
        .lock()
        .unwrap()
        .clone()
        .expect("upstream saw /ws");
    assert_eq!(seen["upgrade"], "websocket");
    assert_eq!(seen["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");

    // Upstream to client, unprompted.
    read_until(&mut client, &mut pending, b"hello from upstream\n").await;
    // Client to upstream and back, twice on the same tunnel.
    client.write_all(b"ping one").await.unwrap();
    read_until(&mut client, &mut pending, b"PING ONE").await;
    client.write_all(b"ping two").await.unwrap();
    read_until(&mut client, &mut pending, b"PING TWO").await;
}

#[tokio::test]
async fn an_upgrade_refused_by_the_upstream_is_passed_on_as_a_response() {
    let plain = Upstream::start("plain").await;
    let gw = TestGateway::start(settings(&[plain.url()], json!({}))).await;
    let mut client = TcpStream::connect(gw.addr).await.unwrap();
    client
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
    let mut pending = Vec::new();
    let head = read_until(&mut client, &mut pending, b"plain").await;
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[tokio::test]
async fn sse_events_reach_the_client_before_the_upstream_response_ends() {
    let up = special_upstream().await;
    // A stream quiet for longer than the head and idle timeouts stays open.
    let gw = TestGateway::start(settings(
        &[format!("http://{}", up.addr)],
        json!({"header_read_timeout_ms": 300, "idle_timeout_secs": 1}),
    ))
    .await;

    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let (done_tx, done_rx) = oneshot::channel::<()>();
    let events = up.events.clone();
    // Feed the stream: one event now, the rest only once the client has
    // the first (or after 5 s, which fails the test below).
    tokio::spawn(async move {
        let tx = loop {
            if let Some(tx) = events.lock().unwrap().first().cloned() {
                break tx;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        tx.send(Bytes::from("event: tick\ndata: one\n\n"))
            .await
            .unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(5), done_rx).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tx.send(Bytes::from("data: two\n\n")).await.unwrap();
    });

    let response = client
        .request(
            Request::get(gw.url("/events"))
                .header("accept", "text/event-stream")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let first = tokio::time::timeout(Duration::from_secs(2), body.frame())
        .await
        .expect("the first event arrived while the upstream response was still open")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(&first[..], b"event: tick\ndata: one\n\n");
    done_tx.send(()).unwrap();
    let second = tokio::time::timeout(Duration::from_secs(4), body.frame())
        .await
        .expect("second event")
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert_eq!(&second[..], b"data: two\n\n");
}

/// Upgrades `path` through the gateway to a WebSocket and reads the 101;
/// the connection, and what arrived after the head.
async fn upgrade(gw: &TestGateway, path: &str) -> (TcpStream, Vec<u8>) {
    let mut client = TcpStream::connect(gw.addr).await.unwrap();
    client
        .write_all(
            format!(
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut pending = Vec::new();
    let head = read_until(&mut client, &mut pending, b"\r\n\r\n").await;
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    (client, pending)
}

/// Opens a tunnel through the gateway to `/ws` and reads the greeting.
async fn open_tunnel(gw: &TestGateway) -> (TcpStream, Vec<u8>) {
    let (mut client, mut pending) = upgrade(gw, "/ws").await;
    read_until(&mut client, &mut pending, b"hello from upstream\n").await;
    (client, pending)
}

#[tokio::test]
async fn an_open_tunnel_counts_as_a_connection_and_closes_at_shutdown() {
    let up = special_upstream().await;
    let mut gw = TestGateway::start(settings(
        &[format!("http://{}", up.addr)],
        // No drain window: tunnels are closed at once (with one, a
        // WebSocket is first told to reconnect: the test below).
        json!({"max_connections": 1, "stream_drain_window_ms": 0}),
    ))
    .await;
    let (mut tunnel, mut pending) = open_tunnel(&gw).await;
    // The tunnel holds the only connection slot.
    let mut other = TcpStream::connect(gw.addr).await.unwrap();
    let refused = read_until(&mut other, &mut Vec::new(), b"\r\n\r\n").await;
    assert!(
        refused.starts_with(b"HTTP/1.1 503"),
        "{}",
        String::from_utf8_lossy(&refused)
    );
    tunnel.write_all(b"still here").await.unwrap();
    read_until(&mut tunnel, &mut pending, b"STILL HERE").await;

    // Shutdown closes the tunnel and the gateway stops promptly.
    gw.stop.cancel();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(3), tunnel.read(&mut buf))
        .await
        .expect("tunnel closed at shutdown")
        .unwrap_or(0);
    assert_eq!(n, 0);
    tokio::time::timeout(Duration::from_secs(3), &mut gw.task)
        .await
        .expect("gateway stopped")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_tunnel_that_carries_nothing_for_tunnel_idle_timeout_ms_is_closed() {
    let up = special_upstream().await;
    let gw = TestGateway::start(settings(
        &[format!("http://{}", up.addr)],
        json!({"tunnel_idle_timeout_ms": 400}),
    ))
    .await;
    let (mut tunnel, mut pending) = open_tunnel(&gw).await;
    // Traffic every 150 ms keeps it open well past the limit.
    for i in 0..6 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        tunnel
            .write_all(format!("ping{i}").as_bytes())
            .await
            .unwrap();
        read_until(&mut tunnel, &mut pending, format!("PING{i}").as_bytes()).await;
    }
    // Then silence: closed after about the limit.
    let quiet = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), tunnel.read(&mut buf))
        .await
        .expect("the idle tunnel was closed")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let took = quiet.elapsed();
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(3),
        "closed after {took:?}"
    );
}

/// A draining gateway ends the event streams passing through it cleanly
/// (the chunked body's last chunk, then the connection closes), each at
/// its own moment within `stream_drain_window_ms`, so their clients
/// reconnect elsewhere and not all at once; the gateway then stops long
/// before `shutdown_timeout_secs`.
#[tokio::test]
async fn a_draining_gateway_ends_event_streams_spread_over_its_window() {
    let up = special_upstream().await;
    let gw = TestGateway::start(settings(
        &[format!("http://{}", up.addr)],
        json!({"stream_drain_window_ms": 1500, "shutdown_timeout_secs": 10}),
    ))
    .await;
    const STREAMS: usize = 12;
    let mut clients = Vec::new();
    for _ in 0..STREAMS {
        let mut c = TcpStream::connect(gw.addr).await.unwrap();
        c.write_all(b"GET /events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
            .await
            .unwrap();
        clients.push(c);
    }
    let opened = eventually(Duration::from_secs(5), || {
        let n = up.events.lock().unwrap().len();
        async move { n == STREAMS }
    })
    .await;
    assert!(opened, "the streams did not all reach the upstream");
    let senders = up.events.lock().unwrap().clone();
    for tx in &senders {
        tx.send(Bytes::from("data: one\n\n")).await.unwrap();
    }
    let mut pendings = Vec::new();
    for c in clients.iter_mut() {
        let mut pending = Vec::new();
        let head = read_until(c, &mut pending, b"data: one\n\n").await;
        assert!(
            head.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        pendings.push(pending);
    }

    let drain_started = std::time::Instant::now();
    gw.stop.cancel();
    // Every stream read at once (collected: a lazy map would start each
    // read only after the one before it ended).
    let ends: Vec<_> = clients
        .into_iter()
        .zip(pendings)
        .map(|(mut c, mut rest)| {
            tokio::spawn(async move {
                let read =
                    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest)).await;
                assert!(read.is_ok(), "the stream was not ended within 5 s");
                (std::time::Instant::now(), rest)
            })
        })
        .collect();
    let mut at = Vec::new();
    for end in ends {
        let (when, rest) = end.await.unwrap();
        assert!(
            rest.ends_with(b"0\r\n\r\n"),
            "not ended with the chunked body's last chunk: {:?}",
            String::from_utf8_lossy(&rest)
        );
        at.push(when.duration_since(drain_started));
    }
    at.sort();
    let (first, last) = (at[0], at[STREAMS - 1]);
    assert!(
        last < Duration::from_millis(2500),
        "the last stream ended after {last:?}"
    );
    assert!(
        last - first >= Duration::from_millis(300),
        "the streams ended together ({first:?} .. {last:?}), not spread over the window"
    );
    // Stopped once its streams ended, long before shutdown_timeout_secs.
    let stopped = eventually(Duration::from_secs(5), || {
        let done = gw.task.is_finished();
        async move { done }
    })
    .await;
    assert!(stopped, "the gateway did not stop after its streams ended");
    assert!(drain_started.elapsed() < Duration::from_secs(5));
}

/// An operator's `drain` and `eject` differ in what is in flight: a
/// drained instance gets no new request but its event stream and tunnel
/// go on (and `in_flight` counts them); ejecting it then cuts both at
/// once; `restore` brings it back.
#[tokio::test]
async fn an_operators_drain_lets_streams_run_and_eject_cuts_them() {
    let up = special_upstream().await;
    let url = format!("http://{}", up.addr);
    let gw = TestGateway::start(settings(std::slice::from_ref(&url), json!({}))).await;
    let client = TestClient::default();
    let target = json!({"pool": "default", "url": url});

    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    stream
        .write_all(b"GET /events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .unwrap();
    let opened = eventually(Duration::from_secs(5), || {
        let n = up.events.lock().unwrap().len();
        async move { n == 1 }
    })
    .await;
    assert!(opened, "the stream did not reach the upstream");
    let events = up.events.lock().unwrap()[0].clone();
    let mut pending = Vec::new();
    events.send(Bytes::from("data: one\n\n")).await.unwrap();
    read_until(&mut stream, &mut pending, b"data: one\n\n").await;
    let (mut tunnel, mut tunnel_pending) = open_tunnel(&gw).await;

    // Drain: nothing new, what is open goes on.
    let r = admin(&client, &gw, "drain", target.clone(), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let status = gw.instance(&client, &url).await;
    assert_eq!(status["admin_draining"], true, "{status}");
    assert_eq!(status["admin_ejected"], false, "{status}");
    assert_eq!(
        status["in_flight"], 2,
        "the stream and the tunnel: {status}"
    );
    assert_eq!(
        client.get(&gw.url("/x")).await.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "a drained instance got a new request"
    );
    events.send(Bytes::from("data: two\n\n")).await.unwrap();
    read_until(&mut stream, &mut pending, b"data: two\n\n").await;
    tunnel.write_all(b"drained").await.unwrap();
    read_until(&mut tunnel, &mut tunnel_pending, b"DRAINED").await;

    // Eject: both are cut now, not at their end.
    let r = admin(&client, &gw, "eject", target.clone(), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    for (what, conn) in [("stream", &mut stream), ("tunnel", &mut tunnel)] {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(3), conn.read_to_end(&mut rest)).await;
        assert!(
            read.is_ok(),
            "the {what} was not cut within 3 s of the eject"
        );
        assert!(
            !rest.ends_with(b"0\r\n\r\n"),
            "the {what} was ended as if complete: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
    let cut = eventually(Duration::from_secs(3), || async {
        gw.instance(&client, &url).await["in_flight"] == 0
    })
    .await;
    assert!(cut, "the cut stream and tunnel are still counted in flight");

    let r = admin(&client, &gw, "restore", target, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let status = gw.instance(&client, &url).await;
    assert_eq!(status["admin_draining"], false, "{status}");
    assert_eq!(status["admin_ejected"], false, "{status}");
    assert_eq!(client.get(&gw.url("/x")).await.status, StatusCode::OK);
}

/// A draining gateway tells a WebSocket client to reconnect: a close frame
/// with status 1012 (service restart), after the frame the instance was in
/// the middle of sending, never inside it; the client's closing answer
/// goes on to the instance; then the tunnel closes, and the gateway stops
/// long before its shutdown timeout.
#[tokio::test]
async fn a_draining_gateway_tells_websocket_clients_to_reconnect_between_frames() {
    let up = special_upstream().await;
    let mut gw = TestGateway::start(settings(
        &[format!("http://{}", up.addr)],
        json!({"stream_drain_window_ms": 1, "shutdown_timeout_secs": 10}),
    ))
    .await;
    let (mut client, mut pending) = upgrade(&gw, "/wsf").await;
    read_until(&mut client, &mut pending, &[0x81, 0x06, b'a', b'b', b'c']).await;

    // Draining while the instance is inside its frame: nothing yet.
    let drain_started = std::time::Instant::now();
    gw.stop.cancel();
    let mut buf = [0u8; 64];
    let early = tokio::time::timeout(Duration::from_millis(200), client.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "the client got {:?} in the middle of a frame",
        early.map(|r| r.map(|n| buf[..n].to_vec()))
    );
    // The frame ends, then the close comes.
    up.release.notify_one();
    let rest = read_until(&mut client, &mut pending, &[0x88, 0x02, 0x03, 0xF4]).await;
    assert_eq!(
        rest, b"def\x88\x02\x03\xF4",
        "the frame's end, then close 1012 alone"
    );
    // The client answers the close (masked, status 1000); the instance
    // gets it, and the tunnel closes.
    let mask = [1u8, 2, 3, 4];
    let status = [0x03u8, 0xE8];
    client
        .write_all(&[
            0x88,
            0x82,
            mask[0],
            mask[1],
            mask[2],
            mask[3],
            status[0] ^ mask[0],
            status[1] ^ mask[1],
        ])
        .await
        .unwrap();
    let answered = std::time::Instant::now();
    let mut tail = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), client.read_to_end(&mut tail)).await;
    assert!(
        closed.is_ok(),
        "the tunnel was not closed after the close handshake"
    );
    // Closed once the client's close frame has passed, not after a grace.
    assert!(
        answered.elapsed() < Duration::from_millis(700),
        "closed {:?} after the client's close frame",
        answered.elapsed()
    );
    assert!(tail.is_empty(), "nothing after the close frame: {tail:?}");
    let passed = eventually(Duration::from_secs(3), || {
        let got = up.received.lock().unwrap().clone();
        async move { got.starts_with(&[0x88, 0x82]) && got.len() == 8 }
    })
    .await;
    assert!(
        passed,
        "the instance did not get the client's close: {:?}",
        up.received.lock().unwrap()
    );
    tokio::time::timeout(Duration::from_secs(5), &mut gw.task)
        .await
        .expect("gateway stopped")
        .unwrap()
        .unwrap();
    assert!(drain_started.elapsed() < Duration::from_secs(5));
}

/// When the instance hangs up a WebSocket, the client gets what it sent
/// and the end of the stream, and the tunnel does not wait on the client
/// to close its side for longer than a second.
#[tokio::test]
async fn a_websocket_the_instance_hangs_up_is_closed_soon_whatever_the_client_does() {
    let up = special_upstream().await;
    let gw = TestGateway::start(settings(&[format!("http://{}", up.addr)], json!({}))).await;
    let (mut client, mut pending) = upgrade(&gw, "/wsbye").await;
    // The client never writes nor closes; the gateway still lets go.
    let started = std::time::Instant::now();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest)).await;
    assert!(
        read.is_ok(),
        "the tunnel stayed open after the instance hung up"
    );
    pending.extend(rest);
    assert_eq!(
        pending,
        [0x88, 0x02, 0x03, 0xE8],
        "the instance's close frame, then the end"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    let gone = eventually(Duration::from_secs(3), || async {
        gw.instance(&TestClient::default(), &format!("http://{}", up.addr))
            .await["in_flight"]
            == 0
    })
    .await;
    assert!(gone, "the tunnel is still counted in flight");
}
