//! HTTP/1.x from clients over raw sockets: what the gateway's own server
//! codec (`shoal-h1server`) must get right, checked against hyper's server
//! (`http1_server = "hyper"`) too where both should behave alike.

mod common;

use common::*;
use serde_json::json;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const SERVERS: [&str; 2] = ["shoal", "hyper"];

async fn gateway(server: &str, up: &Upstream) -> TestGateway {
    TestGateway::start(settings(&[up.url()], json!({"http1_server": server}))).await
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    for server in SERVERS {
        let up = Upstream::start("a").await;
        let gw = gateway(server, &up).await;
        let mut c = TcpStream::connect(gw.addr).await.unwrap();
        c.write_all(
            b"GET /1 HTTP/1.1\r\nHost: x\r\nx-request-id: one\r\n\r\n\
              POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nx-request-id: two\r\n\r\nhello\
              GET /3 HTTP/1.1\r\nHost: x\r\nx-request-id: three\r\n\r\n",
        )
        .await
        .unwrap();
        let (text, closed) =
            read_raw(&mut c, Duration::from_secs(5), Some(("HTTP/1.1 200", 3))).await;
        assert!(!closed, "{server}: kept open: {text}");
        let one = text.find("x-request-id: one").expect("first");
        let two = text.find("x-request-id: two").expect("second");
        let three = text.find("x-request-id: three").expect("third");
        assert!(one < two && two < three, "{server}: in order: {text}");
        assert!(text.contains("\r\n\r\nhello"), "{server}: the echo: {text}");
        assert_eq!(up.hits(), 3);
    }
}

#[tokio::test]
async fn http10_clients_get_a_close_unless_they_ask_for_keep_alive() {
    for server in SERVERS {
        let up = Upstream::start("a").await;
        let gw = gateway(server, &up).await;
        let mut c = TcpStream::connect(gw.addr).await.unwrap();
        c.write_all(b"GET /x HTTP/1.0\r\n\r\n").await.unwrap();
        let (text, closed) = read_raw(&mut c, Duration::from_secs(5), None).await;
        assert!(
            text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200"),
            "{text}"
        );
        assert!(
            text.ends_with("\r\n\r\na"),
            "{server}: body whole: {text:?}"
        );
        assert!(closed, "{server}: HTTP/1.0 closes");

        let mut c = TcpStream::connect(gw.addr).await.unwrap();
        for _ in 0..2 {
            c.write_all(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .await
                .unwrap();
            let (text, closed) =
                read_raw(&mut c, Duration::from_secs(5), Some(("\r\n\r\na", 1))).await;
            assert!(!closed, "{server}: kept alive: {text}");
            assert!(
                text.to_ascii_lowercase().contains("connection: keep-alive"),
                "{server}: {text}"
            );
        }
    }
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body_is_sent() {
    for server in SERVERS {
        let up = Upstream::start("a").await;
        let gw = gateway(server, &up).await;
        let mut c = TcpStream::connect(gw.addr).await.unwrap();
        c.write_all(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
        let (text, _) = read_raw(
            &mut c,
            Duration::from_secs(5),
            Some(("100 Continue\r\n\r\n", 1)),
        )
        .await;
        assert!(
            text.starts_with("HTTP/1.1 100 Continue\r\n\r\n"),
            "{server}: {text:?}"
        );
        c.write_all(b"ping").await.unwrap();
        let (text, _) = read_raw(&mut c, Duration::from_secs(5), Some(("\r\n\r\nping", 1))).await;
        assert!(text.starts_with("HTTP/1.1 200"), "{server}: {text}");
    }
}

#[tokio::test]
async fn a_request_refused_before_its_body_gets_no_100_continue_and_is_not_uploaded() {
    for server in SERVERS {
        let up = Upstream::start("a").await;
        let gw = TestGateway::start(settings(
            &[up.url()],
            json!({"http1_server": server, "max_body_bytes": 1000}),
        ))
        .await;
        let mut c = TcpStream::connect(gw.addr).await.unwrap();
        c.write_all(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
        let (text, _) = read_raw(&mut c, Duration::from_secs(5), Some(("\r\n\r\n", 1))).await;
        assert!(
            text.starts_with("HTTP/1.1 413"),
            "{server}: no 100 first: {text}"
        );
        assert_eq!(up.hits(), 0);
    }
}

#[tokio::test]
async fn ambiguous_or_malformed_heads_get_400_and_reach_no_instance() {
    let up = Upstream::start("a").await;
    let gw = gateway("shoal", &up).await;
    let cases: [&[u8]; 4] = [
        // Both framings: a request-smuggling vector; refused as nginx does.
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GET /x HTTP/1.1\r\nHost x\r\n\r\n",
    ];
    for case in cases {
        let mut c = TcpStream::connect(gw.addr).await.unwrap();
        c.write_all(case).await.unwrap();
        let (text, closed) = read_raw(&mut c, Duration::from_secs(5), None).await;
        assert!(
            text.starts_with("HTTP/1.1 400"),
            "{:?}: {text}",
            String::from_utf8_lossy(case)
        );
        assert!(text.contains("application/problem+json"), "{text}");
        assert!(closed);
    }
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn a_head_response_has_no_body_and_the_connection_goes_on() {
    for server in SERVERS {
        let up = Upstream::start("abc").await;
        let gw = gateway(server, &up).await;
        let mut c = TcpStream::connect(gw.addr).await.unwrap();
        c.write_all(b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\nGET /y HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (text, closed) =
            read_raw(&mut c, Duration::from_secs(5), Some(("\r\n\r\nabc", 1))).await;
        assert!(!closed, "{server}: {text}");
        let (head, get) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{server}: {head}");
        assert!(
            head.to_ascii_lowercase().contains("content-length: 3"),
            "{server}: {head}"
        );
        assert!(
            get.starts_with("HTTP/1.1 200"),
            "{server}: the GET follows at once: {get:?}"
        );
    }
}

#[tokio::test]
async fn a_client_that_leaves_mid_request_cancels_it_upstream() {
    for server in SERVERS {
        let up = Upstream::start("a").await;
        let gw = gateway(server, &up).await;
        let mut c = TcpStream::connect(gw.addr).await.unwrap();
        // `/slow` takes three seconds at the instance.
        c.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let admin = TestClient::default();
        assert!(
            eventually(Duration::from_secs(2), || async {
                gw.instance(&admin, &up.url()).await["in_flight"] == 1
            })
            .await,
            "{server}: in flight"
        );
        let left = Instant::now();
        drop(c);
        assert!(
            eventually(Duration::from_secs(2), || async {
                gw.instance(&admin, &up.url()).await["in_flight"] == 0
            })
            .await,
            "{server}: the request was cancelled when the client left"
        );
        assert!(left.elapsed() < Duration::from_secs(2));
    }
}

#[tokio::test]
async fn a_large_response_streams_to_an_http10_client_until_close() {
    let up = Upstream::start("a").await;
    let gw = gateway("shoal", &up).await;
    let size = 300_000;
    let mut c = TcpStream::connect(gw.addr).await.unwrap();
    c.write_all(format!("POST /echo HTTP/1.0\r\nContent-Length: {size}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    c.write_all(&vec![b'z'; size]).await.unwrap();
    let (text, closed) = read_raw(&mut c, Duration::from_secs(10), None).await;
    assert!(closed);
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    assert_eq!(body.len(), size);
    assert!(body.bytes().all(|b| b == b'z'));
}

#[tokio::test]
async fn a_small_body_nobody_read_is_discarded_and_a_large_one_closes_the_connection() {
    let up = Upstream::start("a").await;
    let gw = gateway("shoal", &up).await;
    // The gateway's own endpoints answer without reading a body.
    let mut c = TcpStream::connect(gw.addr).await.unwrap();
    c.write_all(b"POST /_gateway/healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.write_all(b"0123456789GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (text, closed) = read_raw(&mut c, Duration::from_secs(5), Some(("\r\n\r\na", 1))).await;
    assert!(!closed, "{text}");
    // 405 (the endpoint takes GET), then the GET on the same connection.
    assert!(text.starts_with("HTTP/1.1 405"), "{text}");
    assert_eq!(text.matches("HTTP/1.1 200").count(), 1, "{text}");
    assert!(!text.contains("connection: close"), "{text}");

    let mut c = TcpStream::connect(gw.addr).await.unwrap();
    c.write_all(b"POST /_gateway/healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        .await
        .unwrap();
    let (text, _) = read_raw(&mut c, Duration::from_secs(5), Some(("\r\n\r\n", 1))).await;
    assert!(text.starts_with("HTTP/1.1 405"), "{text}");
    assert!(
        text.contains("connection: close"),
        "the client is told: {text}"
    );
    let _ = c.write_all(&vec![b'x'; 200_000]).await;
    let (_, closed) = read_raw(&mut c, Duration::from_secs(5), None).await;
    assert!(closed);
}

#[tokio::test]
async fn a_request_sent_a_byte_at_a_time_arrives_whole() {
    // Every read boundary: in the head, in chunk sizes, in chunk data,
    // in the final chunk, and the next pipelined request's head.
    let up = Upstream::start("a").await;
    let gw = gateway("shoal", &up).await;
    let mut c = TcpStream::connect(gw.addr).await.unwrap();
    c.set_nodelay(true).unwrap();
    let request = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n\
                    5\r\nhello\r\n1;ext=1\r\n \r\n6\r\nworld!\r\n0\r\n\r\n\
                    GET /x HTTP/1.1\r\nHost: x\r\n\r\n";
    for byte in request {
        c.write_all(&[*byte]).await.unwrap();
        tokio::task::yield_now().await;
    }
    let (text, closed) = read_raw(&mut c, Duration::from_secs(5), Some(("\r\n\r\na", 1))).await;
    assert!(!closed, "{text}");
    assert!(text.contains("\r\n\r\nhello world!HTTP/1.1 200"), "{text}");
}
