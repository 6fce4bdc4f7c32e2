//! Rate limits (429), load shedding (503), the connection cap, head size
//! and slow-client limits.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::json;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn assert_problem(r: &Reply, status: StatusCode) {
    assert_eq!(r.status, status, "{}", r.body);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1, "retry-after {retry}");
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["status"], status.as_u16());
}

#[tokio::test]
async fn a_global_rate_limit_per_client_address_answers_429_with_retry_after() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(settings(
        &[up.url()],
        json!({"rate_limit": {"requests_per_sec": 0.5, "burst": 3}}),
    ))
    .await;
    let client = TestClient::default();
    for i in 0..3 {
        let r = client.get(&gw.url("/x")).await;
        assert_eq!(r.status, StatusCode::OK, "request {i} is within the burst");
    }
    let r = client.get(&gw.url("/x")).await;
    assert_problem(&r, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        (1..=2).contains(&retry),
        "one request every 2 s: retry after {retry}"
    );
    assert_eq!(up.hits(), 3, "a limited request never reaches the upstream");
    // The gateway's own endpoints are not limited.
    let m = client.get_admin(&gw.url("/_gateway/metrics")).await;
    assert_eq!(m.status, StatusCode::OK);
    assert!(
        m.body.contains("shoal_gateway_rate_limited_total"),
        "{}",
        m.body
    );
}

#[tokio::test]
async fn a_rejected_request_is_counted_under_its_pool_by_the_access_log_layer() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(settings(
        &[up.url()],
        json!({
            "pools": [{ "name": "rejections-counted", "upstreams": [up.url()] }],
            "rate_limit": {"requests_per_sec": 0.5, "burst": 1},
        }),
    ))
    .await;
    let client = TestClient::default();
    assert_eq!(client.get(&gw.url("/x")).await.status, StatusCode::OK);
    let r = client.get(&gw.url("/x")).await;
    assert_problem(&r, StatusCode::TOO_MANY_REQUESTS);
    let m = client.get_admin(&gw.url("/_gateway/metrics")).await;
    let counted = |status: &str| {
        m.body.lines().any(|l| {
            l.starts_with("shoal_gateway_requests_total{")
                && l.contains(r#"pool="rejections-counted""#)
                && l.contains(&format!(r#"status="{status}""#))
                && l.ends_with(" 1")
        })
    };
    assert!(counted("200"), "{}", m.body);
    assert!(counted("429"), "{}", m.body);
}

#[tokio::test]
async fn a_route_rate_limit_keyed_by_api_key_header_limits_each_key_apart() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(settings(
        &[up.url()],
        json!({"routes": [
            {"prefix": "/api/", "pool": "default",
             "rate_limit": {"requests_per_sec": 0.1, "burst": 2, "key": "header:x-api-key"}},
            {"prefix": "/", "pool": "default"}
        ]}),
    ))
    .await;
    let client = TestClient::default();
    let get = |key: &'static str| {
        let client = client.clone();
        let url = gw.url("/api/items");
        async move {
            client
                .send(
                    Request::get(url)
                        .header("x-api-key", key)
                        .body(Full::new(Bytes::new()))
                        .unwrap(),
                )
                .await
        }
    };
    assert_eq!(get("alpha").await.status, StatusCode::OK);
    assert_eq!(get("alpha").await.status, StatusCode::OK);
    assert_problem(&get("alpha").await, StatusCode::TOO_MANY_REQUESTS);
    // Another key has its own budget, from the same address.
    assert_eq!(get("beta").await.status, StatusCode::OK);
    assert_eq!(get("beta").await.status, StatusCode::OK);
    assert_problem(&get("beta").await, StatusCode::TOO_MANY_REQUESTS);
    // Routes without a limit (and no global one) are not limited.
    for _ in 0..10 {
        assert_eq!(client.get(&gw.url("/page")).await.status, StatusCode::OK);
    }
}

/// Starts `n` slow requests and waits until the upstream holds them.
async fn hold_slow_requests(
    client: &TestClient,
    gw: &TestGateway,
    up: &Upstream,
    n: usize,
) -> Vec<tokio::task::JoinHandle<Reply>> {
    let before = up.hits();
    let held: Vec<_> = (0..n)
        .map(|_| {
            let (client, url) = (client.clone(), gw.url("/held"));
            tokio::spawn(async move { client.get(&url).await })
        })
        .collect();
    assert!(
        eventually(Duration::from_secs(3), || async { up.hits() >= before + n }).await,
        "slow requests reached the upstream"
    );
    held
}

#[tokio::test]
async fn past_the_gateway_concurrency_cap_requests_are_shed_with_503() {
    let up = Upstream::start("a").await;
    up.state.delay_ms.store(600, Ordering::SeqCst);
    let gw = TestGateway::start(settings(&[up.url()], json!({"max_concurrent_requests": 2}))).await;
    let client = TestClient::default();
    let held = hold_slow_requests(&client, &gw, &up, 2).await;
    let r = client.get(&gw.url("/more")).await;
    assert_problem(&r, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.body.contains("limit of 2"), "{}", r.body);
    for h in held {
        assert_eq!(h.await.unwrap().status, StatusCode::OK);
    }
    // Capacity is back once the held responses ended.
    up.state.delay_ms.store(0, Ordering::SeqCst);
    assert_eq!(client.get(&gw.url("/again")).await.status, StatusCode::OK);
    let m = client.get_admin(&gw.url("/_gateway/metrics")).await;
    assert!(m.body.contains("shoal_gateway_shed_total"), "{}", m.body);
}

#[tokio::test]
async fn past_a_pools_concurrency_cap_requests_to_it_are_shed() {
    let up = Upstream::start("a").await;
    let other = Upstream::start("b").await;
    up.state.delay_ms.store(600, Ordering::SeqCst);
    let gw = TestGateway::start(settings(
        &[up.url()],
        json!({
            "pools": [{"name": "default", "upstreams": [up.url()]},
                      {"name": "other", "upstreams": [other.url()]}],
            "routes": [{"prefix": "/other/", "pool": "other"}, {"prefix": "/", "pool": "default"}],
            "pool_max_concurrent_requests": {"default": 1},
        }),
    ))
    .await;
    let client = TestClient::default();
    let held = hold_slow_requests(&client, &gw, &up, 1).await;
    assert_problem(
        &client.get(&gw.url("/more")).await,
        StatusCode::SERVICE_UNAVAILABLE,
    );
    assert_eq!(client.get(&gw.url("/other/x")).await.status, StatusCode::OK);
    assert_eq!(
        held.into_iter().next().unwrap().await.unwrap().status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn past_max_connections_a_new_connection_gets_503_and_is_closed() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(settings(&[up.url()], json!({"max_connections": 2}))).await;
    let first = TcpStream::connect(gw.addr).await.unwrap();
    let second = TcpStream::connect(gw.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(gw.addr).await.unwrap();
    let (reply, closed) = read_raw(&mut third, Duration::from_secs(3), None).await;
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    assert!(
        reply.to_ascii_lowercase().contains("retry-after: 1"),
        "{reply}"
    );
    assert!(closed, "refused connection is closed");
    drop((first, second));
    let client = TestClient::default();
    assert!(
        eventually(Duration::from_secs(3), || async {
            client.get(&gw.url("/x")).await.status == StatusCode::OK
        })
        .await,
        "connections are accepted again below the cap"
    );
}

#[tokio::test]
async fn a_client_too_slow_to_send_its_headers_is_disconnected() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(settings(
        &[up.url()],
        json!({"header_read_timeout_ms": 300}),
    ))
    .await;
    let mut slow = TcpStream::connect(gw.addr).await.unwrap();
    slow.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let (_reply, closed) = read_raw(&mut slow, Duration::from_secs(3), None).await;
    assert!(closed, "slowloris connection closed");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "closed after {took:?}"
    );
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn a_client_that_stops_reading_its_response_is_disconnected_after_send_timeout() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(settings(
        &[up.url()],
        json!({"send_timeout_ms": 300, "max_body_bytes": 64 << 20}),
    ))
    .await;
    // 32 MiB echoed back: more than the socket buffers between the
    // gateway and a client that reads none of it.
    let size = 32usize << 20;
    let mut client = TcpStream::connect(gw.addr).await.unwrap();
    client
        .write_all(
            format!("POST /echo HTTP/1.1\r\nHost: x\r\ncontent-length: {size}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    client.write_all(&vec![b'x'; size]).await.unwrap();
    let admin = TestClient::default();
    // The response is cut off: the instance no longer counts it.
    assert!(
        eventually(Duration::from_secs(5), || async {
            gw.instance(&admin, &up.url()).await["in_flight"] == 0 && up.hits() == 1
        })
        .await,
        "the stalled response was dropped"
    );
    let (got, closed) = read_raw(&mut client, Duration::from_secs(10), None).await;
    assert!(closed, "the connection was closed");
    assert!(
        got.len() < size,
        "only what was in the buffers arrived: {} bytes",
        got.len()
    );
}

#[tokio::test]
async fn an_http2_client_that_stops_reading_has_its_response_dropped_after_send_timeout() {
    use http_body_util::BodyExt;
    let up = Upstream::start("a").await;
    // The sweep (every 300 ms here) runs beside the idle check (every
    // 250 ms): a shorter timer of the same loop must not keep it from
    // ever running.
    let gw = TestGateway::start(settings(
        &[up.url()],
        json!({"send_timeout_ms": 1200, "idle_timeout_secs": 1, "max_body_bytes": 64 << 20}),
    ))
    .await;
    // HTTP/2 (prior knowledge) with a 16 KiB stream window that the
    // client never opens again: every socket write of the gateway's still
    // succeeds, the stream just stops.
    let (mut send, _conn) = h2c(gw.addr, Some(16 * 1024)).await;
    let size = 1usize << 20;
    let req = Request::post(format!("http://{}/echo", gw.addr))
        .body(Full::new(Bytes::from(vec![b'x'; size])))
        .unwrap();
    let response = send.send_request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let admin = TestClient::default();
    // The stalled response is let go: the instance no longer counts it.
    assert!(
        eventually(Duration::from_secs(5), || async {
            gw.instance(&admin, &up.url()).await["in_flight"] == 0 && up.hits() == 1
        })
        .await,
        "the stalled HTTP/2 response was dropped"
    );
    // What the client reads then is cut short by a reset stream.
    let read = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .expect("the stream ended");
    assert!(read.is_err(), "the body ended in an error, not whole");
    // The connection itself still serves.
    let again = send.send_request(get_request(gw.addr, "/x")).await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
}

#[tokio::test]
async fn request_heads_larger_than_max_header_bytes_are_refused() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(settings(&[up.url()], json!({"max_header_bytes": 8192}))).await;
    let mut c = TcpStream::connect(gw.addr).await.unwrap();
    let big = "a".repeat(20_000);
    let req = format!("GET /x HTTP/1.1\r\nHost: x\r\nx-big: {big}\r\n\r\n");
    let _ = c.write_all(req.as_bytes()).await;
    let (reply, closed) = read_raw(&mut c, Duration::from_secs(3), None).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply:?}");
    assert!(closed);
    assert_eq!(up.hits(), 0);
    // A normal request still passes.
    let client = TestClient::default();
    assert_eq!(client.get(&gw.url("/x")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_idle_timeout_secs() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(settings(
        &[up.url()],
        json!({"idle_timeout_secs": 1, "header_read_timeout_ms": 30000}),
    ))
    .await;
    let mut c = TcpStream::connect(gw.addr).await.unwrap();
    c.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = c.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    let (_rest, closed) = read_raw(&mut c, Duration::from_secs(4), None).await;
    assert!(closed, "idle connection closed");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "closed after {took:?}"
    );
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_after_idle_timeout_secs_whatever_the_send_timeout() {
    use http_body_util::BodyExt;
    let up = Upstream::start("a").await;
    // The send-timeout sweep (every 25 ms here) beside the idle check
    // (every 250 ms): the shorter timer must not keep the other from
    // running.
    let gw = TestGateway::start(settings(
        &[up.url()],
        json!({"idle_timeout_secs": 1, "send_timeout_ms": 100}),
    ))
    .await;
    let (mut send, conn) = h2c(gw.addr, None).await;
    let response = send.send_request(get_request(gw.addr, "/x")).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.unwrap();
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(4), conn)
        .await
        .expect("the idle HTTP/2 connection was closed")
        .unwrap()
        .ok();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(2500),
        "closed after {took:?}"
    );
}

#[tokio::test]
async fn a_kept_alive_connection_waits_the_idle_timeout_and_its_next_head_the_head_timeout() {
    // nginx's keepalive_timeout and client_header_timeout: the head
    // timer starts with the next request's first bytes, not while idle.
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(settings(
        &[up.url()],
        json!({"idle_timeout_secs": 60, "header_read_timeout_ms": 300}),
    ))
    .await;
    let mut c = TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = [0u8; 4096];
    for _ in 0..2 {
        c.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let n = c.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        // Idle for three head timeouts: still open.
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
    // Half a head, then nothing: dropped after the head timeout.
    c.write_all(b"GET /x HTTP/1.1\r\n").await.unwrap();
    let started = Instant::now();
    let (rest, closed) = read_raw(&mut c, Duration::from_secs(3), None).await;
    assert!(closed && rest.is_empty(), "{rest:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(up.hits(), 2);
}

#[tokio::test]
async fn invalid_limit_settings_are_refused_with_their_key() {
    let up = Upstream::start("a").await;
    let cases = [
        (
            json!({"rate_limit": {"requests_per_sec": 0.0}}),
            "gateway.rate_limit.requests_per_sec",
        ),
        (
            json!({"rate_limit": {"requests_per_sec": 5.0, "burst": 0}}),
            "gateway.rate_limit.burst",
        ),
        (
            json!({"rate_limit": {"requests_per_sec": 5.0, "key": "cookie:x"}}),
            "gateway.rate_limit.key",
        ),
        (
            json!({"routes": [{"prefix": "/", "pool": "default", "rate_limit": {"requests_per_sec": -1.0}}]}),
            "gateway.routes[0].rate_limit.requests_per_sec",
        ),
        (
            json!({"pool_max_concurrent_requests": {"nope": 3}}),
            "gateway.pool_max_concurrent_requests.nope",
        ),
        (
            json!({"max_header_bytes": 1024}),
            "gateway.max_header_bytes",
        ),
        (
            json!({"header_read_timeout_ms": 0}),
            "gateway.header_read_timeout_ms",
        ),
        (json!({"redis_url": "127.0.0.1:6379"}), "gateway.redis_url"),
        (
            json!({"redis_url": "redis://127.0.0.1:6379", "redis_timeout_ms": 0}),
            "gateway.redis_timeout_ms",
        ),
    ];
    for (overrides, key) in cases {
        let err = shoal_gateway::Gateway::bind(settings(&[up.url()], overrides.clone()))
            .await
            .expect_err("invalid settings refused");
        assert!(err.to_string().contains(key), "{overrides}: {err}");
    }
}

/// A connection from `ip` (a loopback address) to `gw`.
async fn connect_from(ip: [u8; 4], gw: &TestGateway) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::from((ip, 0))).unwrap();
    socket.connect(gw.addr).await.unwrap()
}

/// One keep-alive GET on `stream`; its answer's status line.
async fn get_on(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (reply, _) = read_raw(stream, Duration::from_secs(3), Some(("\r\n\r\na", 1))).await;
    reply.lines().next().unwrap_or_default().to_string()
}

/// The security review's seventh finding: only the gateway-wide cap
/// bounded connections, so one address could hold all of them. Past
/// `max_connections_per_client` an address's new connections get a 503
/// and are closed, while other addresses are served.
#[tokio::test]
async fn one_client_address_cannot_hold_more_than_its_share_of_connections() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(settings(
        &[up.url()],
        json!({"max_connections_per_client": 3}),
    ))
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(connect_from([127, 0, 0, 1], &gw).await);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut fourth = connect_from([127, 0, 0, 1], &gw).await;
    let (reply, closed) = read_raw(&mut fourth, Duration::from_secs(3), None).await;
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
    assert!(closed, "the refused connection is closed");
    // Another address is served.
    let mut other = connect_from([127, 0, 0, 2], &gw).await;
    assert_eq!(get_on(&mut other).await, "HTTP/1.1 200 OK");
    // The held connections still work, and once one closes, its address
    // may open another.
    assert_eq!(get_on(&mut held[0]).await, "HTTP/1.1 200 OK");
    held.pop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut again = connect_from([127, 0, 0, 1], &gw).await;
    assert_eq!(get_on(&mut again).await, "HTTP/1.1 200 OK");
}

/// Under pressure (three quarters of `max_connections` open) idle
/// keep-alive connections are let go after
/// `idle_timeout_under_pressure_secs`, not `idle_timeout_secs`; below it
/// they keep the usual timeout.
#[tokio::test]
async fn idle_connections_are_let_go_sooner_under_pressure() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(settings(
        &[up.url()],
        json!({"max_connections": 4, "idle_timeout_secs": 60, "idle_timeout_under_pressure_secs": 1}),
    ))
    .await;
    let mut alone = connect_from([127, 0, 0, 1], &gw).await;
    assert_eq!(get_on(&mut alone).await, "HTTP/1.1 200 OK");
    let (_, closed) = read_raw(&mut alone, Duration::from_millis(1_600), None).await;
    assert!(!closed, "one connection of four: the usual idle timeout");
    drop(alone);
    let mut more = Vec::new();
    for ip in [2, 3] {
        let mut s = connect_from([127, 0, 0, ip], &gw).await;
        assert_eq!(get_on(&mut s).await, "HTTP/1.1 200 OK");
        more.push(s);
    }
    // Three of four open: the next idle period ends after 1 s.
    let mut third = connect_from([127, 0, 0, 4], &gw).await;
    assert_eq!(get_on(&mut third).await, "HTTP/1.1 200 OK");
    let started = Instant::now();
    let (_, closed) = read_raw(&mut third, Duration::from_secs(5), None).await;
    assert!(closed, "closed under pressure");
    assert!(
        started.elapsed() < Duration::from_millis(2_500),
        "{:?}",
        started.elapsed()
    );
}

/// A connection already idle when the pressure starts is told: its wait
/// shortens to `idle_timeout_under_pressure_secs` from when it went idle
/// (before, it kept the 60 s it had).
#[tokio::test]
async fn connections_already_idle_are_let_go_when_pressure_starts() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(settings(
        &[up.url()],
        json!({"max_connections": 4, "idle_timeout_secs": 60, "idle_timeout_under_pressure_secs": 2}),
    ))
    .await;
    let mut early = connect_from([127, 0, 0, 1], &gw).await;
    assert_eq!(get_on(&mut early).await, "HTTP/1.1 200 OK");
    // Idle, with 60 s ahead of it; then the pressure starts.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut more = Vec::new();
    for ip in [2, 3] {
        more.push(connect_from([127, 0, 0, ip], &gw).await);
    }
    let started = Instant::now();
    let (_, closed) = read_raw(&mut early, Duration::from_secs(5), None).await;
    assert!(closed, "an idle connection is let go once pressure starts");
    // 2 s from going idle, of which 0.5 s had passed.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1_000) && waited < Duration::from_millis(2_500),
        "{waited:?}"
    );
    drop(more);
}

#[tokio::test]
async fn gateways_sharing_redis_hold_one_rate_budget_per_key() {
    let Some(redis) = common::redis_url("gateways_sharing_redis_hold_one_rate_budget_per_key")
    else {
        return;
    };
    let up = Upstream::start("a").await;
    let prefix = format!("t_rl_{:x}", rand::random::<u64>());
    let limited = |extra: serde_json::Value| {
        let mut o = json!({
            "rate_limit": {"requests_per_sec": 0.2, "burst": 4, "key": "header:x-api-key"},
            "redis_url": redis,
            "redis_prefix": prefix,
        });
        for (k, v) in extra.as_object().unwrap() {
            o[k] = v.clone();
        }
        settings(&[up.url()], o)
    };
    let a = TestGateway::start(limited(json!({}))).await;
    let b = TestGateway::start(limited(json!({}))).await;
    let client = TestClient::default();
    let get = |gw: &TestGateway, key: &str| {
        let req = Request::get(gw.url("/x"))
            .header("x-api-key", key)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let client = client.clone();
        async move { client.send(req).await }
    };
    // One budget of 4 across both gateways, whichever gets the requests.
    let mut statuses = Vec::new();
    for i in 0..8 {
        let gw = if i % 2 == 0 { &a } else { &b };
        statuses.push(get(gw, "key-1").await.status);
    }
    let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert_eq!(ok, 4, "4 of 8 admitted across two gateways: {statuses:?}");
    let limited_reply = get(&b, "key-1").await;
    assert_problem(&limited_reply, StatusCode::TOO_MANY_REQUESTS);
    // Another key has its own budget.
    assert_eq!(get(&a, "key-2").await.status, StatusCode::OK);
    // (Had Redis failed, each gateway would have admitted 4 on its own.)
    assert_eq!(up.hits(), 5);
}

#[tokio::test]
async fn a_gateway_that_cannot_reach_redis_keeps_its_own_rate_limit() {
    let up = Upstream::start("a").await;
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let gw = TestGateway::start(settings(
        &[up.url()],
        json!({
            "rate_limit": {"requests_per_sec": 0.2, "burst": 3},
            "redis_url": format!("redis://127.0.0.1:{port}"),
        }),
    ))
    .await;
    let client = TestClient::default();
    let started = Instant::now();
    let mut ok = 0;
    for _ in 0..6 {
        if client.get(&gw.url("/x")).await.status == StatusCode::OK {
            ok += 1;
        }
    }
    assert_eq!(ok, 3, "the gateway's own limiter decides");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "Redis being down costs one timeout, not one per request: {:?}",
        started.elapsed()
    );
    let m = client.get_admin(&gw.url("/_gateway/metrics")).await;
    assert!(
        m.body.contains("shoal_gateway_redis_errors_total"),
        "{}",
        m.body
    );
}
