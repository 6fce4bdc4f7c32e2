//! End-to-end tests of the proxy path against in-process upstreams on
//! port 0: balancing, ejection and retry, health checks, headers, errors
//! and the gateway's own endpoints.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[tokio::test]
async fn round_robin_spreads_requests_evenly() {
    let ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    let urls: Vec<String> = ups.iter().map(Upstream::url).collect();
    let gw = TestGateway::start(settings(&urls, json!({}))).await;
    let client = TestClient::default();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..30 {
        let r = client.get(&gw.url("/hello")).await;
        assert_eq!(r.status, StatusCode::OK);
        *seen.entry(r.body).or_default() += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.values().all(|n| *n == 10), "{seen:?}");
    for u in &ups {
        assert_eq!(u.hits(), 10);
    }
}

/// The key scenario: a stream of GETs over keep-alive connections while one
/// of three instances dies at once; stale pooled connections to it must be
/// retried too, so not one GET fails.
async fn killed_upstream_loses_no_get(balancer: &str) {
    let mut ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    let urls: Vec<String> = ups.iter().map(Upstream::url).collect();
    // A few ms per request, so some are mid-flight on the instance that dies.
    for u in &ups {
        u.state.delay_ms.store(3, Ordering::SeqCst);
    }
    // Slow health checks: ejection and retries alone must carry this.
    let gw = TestGateway::start(settings(
        &urls,
        json!({"balancer": balancer, "health_interval_ms": 60_000}),
    ))
    .await;
    let client = TestClient::default();
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut workers = Vec::new();
    for _ in 0..6 {
        let (client, url, failures, done, stop) = (
            client.clone(),
            gw.url("/items"),
            failures.clone(),
            done.clone(),
            stop.clone(),
        );
        workers.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let r = client.get(&url).await;
                if r.status != StatusCode::OK {
                    eprintln!("failed: {} {}", r.status, r.body);
                    failures.fetch_add(1, Ordering::SeqCst);
                }
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before_kill = done.load(Ordering::SeqCst);
    ups[1].kill().await;
    let killed_hits = ups[1].hits();
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }
    let total = done.load(Ordering::SeqCst);
    assert!(
        before_kill > 20 && total > before_kill + 20,
        "too few requests: {before_kill} then {total}"
    );
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "GETs failed out of {total}"
    );
    assert_eq!(ups[1].hits(), killed_hits, "a dead instance cannot answer");
    let instance = gw.instance(&client, &urls[1]).await;
    assert_eq!(instance["ejected"], true, "{instance}");
    assert_eq!(instance["available"], false, "{instance}");
    // The survivors took the load.
    assert!(ups[0].hits() > 0 && ups[2].hits() > 0);
}

#[tokio::test]
async fn killed_upstream_is_ejected_and_no_get_fails_round_robin() {
    killed_upstream_loses_no_get("round_robin").await;
}

#[tokio::test]
async fn killed_upstream_is_ejected_and_no_get_fails_p2c() {
    killed_upstream_loses_no_get("p2c_peak_ewma").await;
}

#[tokio::test]
async fn health_check_brings_a_restarted_instance_back() {
    let mut ups = [Upstream::start("a").await, Upstream::start("b").await];
    let urls: Vec<String> = ups.iter().map(Upstream::url).collect();
    let gw = TestGateway::start(settings(&urls, json!({}))).await;
    let client = TestClient::default();
    let addr = ups[1].addr;
    ups[1].kill().await;
    for _ in 0..10 {
        assert_eq!(client.get(&gw.url("/")).await.status, StatusCode::OK);
    }
    let down = eventually(Duration::from_secs(3), || async {
        gw.instance(&client, &urls[1]).await["available"] == false
    })
    .await;
    assert!(down, "the killed instance was not taken out");

    ups[1] = Upstream::start_on(addr, "b-again").await;
    let back = eventually(Duration::from_secs(5), || async {
        gw.instance(&client, &urls[1]).await["available"] == true
    })
    .await;
    assert!(back, "{}", gw.instance(&client, &urls[1]).await);
    for _ in 0..10 {
        client.get(&gw.url("/")).await;
    }
    assert!(
        ups[1].hits() >= 4,
        "restarted instance got {} requests",
        ups[1].hits()
    );
}

/// `health_path = ""`: the check is a TCP connect (for servers without a
/// health endpoint), so an HTTP answer on /readyz means nothing and a
/// closed port takes the instance out.
#[tokio::test]
async fn an_empty_health_path_checks_tcp_connects() {
    let mut ups = [Upstream::start("a").await, Upstream::start("b").await];
    let urls: Vec<String> = ups.iter().map(Upstream::url).collect();
    let gw = TestGateway::start(settings(
        &urls,
        json!({"health_path": "", "health_interval_ms": 100}),
    ))
    .await;
    let client = TestClient::default();
    ups[0].state.ready.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gw.instance(&client, &urls[0]).await["available"], true);
    assert_eq!(ups[0].state.health_checks.load(Ordering::SeqCst), 0);
    ups[1].kill().await;
    let down = eventually(Duration::from_secs(3), || async {
        gw.instance(&client, &urls[1]).await["available"] == false
    })
    .await;
    assert!(down, "{}", gw.instance(&client, &urls[1]).await);
}

/// A server without the health path (404 on it) counts as up while it
/// answers, so `--to` fronts any server with the default settings.
#[tokio::test]
async fn a_404_on_the_health_path_keeps_the_instance_up() {
    let ups = [Upstream::start("a").await];
    let urls: Vec<String> = ups.iter().map(Upstream::url).collect();
    let gw = TestGateway::start(settings(
        &urls,
        json!({"health_path": "/missing", "health_interval_ms": 100}),
    ))
    .await;
    let client = TestClient::default();
    let checked = eventually(Duration::from_secs(3), || async {
        ups[0].state.health_checks.load(Ordering::SeqCst) >= 3
    })
    .await;
    assert!(checked, "no health checks were made");
    assert_eq!(gw.instance(&client, &urls[0]).await["available"], true);
    assert_eq!(client.get(&gw.url("/")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn draining_instance_gets_no_new_requests() {
    let ups = [Upstream::start("a").await, Upstream::start("b").await];
    let urls: Vec<String> = ups.iter().map(Upstream::url).collect();
    let gw = TestGateway::start(settings(&urls, json!({}))).await;
    let client = TestClient::default();
    ups[0].state.ready.store(false, Ordering::SeqCst);
    let drained = eventually(Duration::from_secs(3), || async {
        gw.instance(&client, &urls[0]).await["draining"] == true
    })
    .await;
    assert!(drained);
    let before = ups[0].hits();
    for _ in 0..20 {
        assert_eq!(client.get(&gw.url("/")).await.body, "b");
    }
    assert_eq!(ups[0].hits(), before);
    ups[0].state.ready.store(true, Ordering::SeqCst);
    let back = eventually(Duration::from_secs(3), || async {
        gw.instance(&client, &urls[0]).await["available"] == true
    })
    .await;
    assert!(back);
}

fn post(url: &str, key: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::post(url).header("content-type", "application/json");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Full::new(Bytes::from_static(b"{\"n\":1}"))).unwrap()
}

#[tokio::test]
async fn post_is_not_retried_after_reaching_an_upstream_that_reset() {
    let reset = ResettingUpstream::start().await;
    let good = Upstream::start("good").await;
    let urls = vec![reset.url(), good.url()];
    let gw = TestGateway::start(settings(&urls, json!({"health_interval_ms": 60_000}))).await;
    let client = TestClient::default();
    // Round robin starts at the resetting instance.
    let r = client.send(post(&gw.url("/orders"), None)).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.body);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert_eq!(reset.requests.load(Ordering::SeqCst), 1);
    assert_eq!(
        good.hits(),
        0,
        "a POST that reached an instance was replayed on another"
    );
}

#[tokio::test]
async fn get_and_keyed_post_are_retried_after_a_reset() {
    let reset = ResettingUpstream::start().await;
    let good = Upstream::start("good").await;
    let urls = vec![reset.url(), good.url()];
    // No passive ejection, so every request first meets the reset.
    let gw = TestGateway::start(settings(
        &urls,
        json!({"health_interval_ms": 60_000, "balancer": "round_robin", "max_ejection_percent": 0}),
    ))
    .await;
    let client = TestClient::default();
    for k in 0..4 {
        let r = client.get(&gw.url("/items")).await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "good"));
        let r = client
            .send(post(&gw.url("/orders"), Some(&format!("key-{k}"))))
            .await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "good"));
    }
    // Some of them met the reset first and were replayed on `good`.
    assert!(reset.requests.load(Ordering::SeqCst) >= 2);
    assert_eq!(good.hits(), 8);
}

#[tokio::test]
async fn post_is_retried_when_the_connection_never_opened() {
    let mut dead = Upstream::start("dead").await;
    let good = Upstream::start("good").await;
    let urls = vec![dead.url(), good.url()];
    dead.kill().await;
    let gw = TestGateway::start(settings(&urls, json!({"health_interval_ms": 60_000}))).await;
    let client = TestClient::default();
    let r = client.send(post(&gw.url("/echo"), None)).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "{\"n\":1}"));
    // The replay carries the same forwarding headers as a first attempt.
    let seen = good.state.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-request-id"], r.headers["x-request-id"]);
    assert!(seen.contains_key("x-shoal-deadline-ms"));
}

#[tokio::test]
async fn forwarded_headers_and_request_id() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(settings(&[up.url()], json!({}))).await;
    let client = TestClient::default();
    let req = Request::get(gw.url("/x?y=1"))
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-request-id", "req-abc.1")
        .header("connection", "x-private")
        .header("x-private", "secret")
        .header("host", "shop.example")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = client.send(req).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["x-request-id"], "req-abc.1");
    assert!(
        r.headers.get("keep-alive").is_none(),
        "hop-by-hop response header leaked"
    );
    let seen = up.state.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(seen["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "shop.example");
    assert_eq!(seen["host"], "shop.example");
    assert_eq!(seen["x-request-id"], "req-abc.1");
    assert!(
        seen.get("x-private").is_none(),
        "header named in Connection was forwarded"
    );

    // A bad id is replaced by a fresh one, sent upstream and returned.
    let req = Request::get(gw.url("/x"))
        .header("x-request-id", "bad id!")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = client.send(req).await;
    let id = r.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 36);
    let seen = up.state.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(seen["x-request-id"], id.as_str());
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
}

#[tokio::test]
async fn all_instances_down_gives_503_problem_with_retry_after() {
    let mut ups = vec![Upstream::start("a").await, Upstream::start("b").await];
    let urls: Vec<String> = ups.iter().map(Upstream::url).collect();
    let gw = TestGateway::start(settings(&urls, json!({}))).await;
    let client = TestClient::default();
    for u in &mut ups {
        u.kill().await;
    }
    let unavailable = eventually(Duration::from_secs(3), || async {
        client.get(&gw.url("/")).await.status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    assert!(unavailable);
    let r = client.get(&gw.url("/")).await;
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert_eq!(r.headers["retry-after"], "1");
    let problem: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(problem["status"], 503);
    assert!(problem["detail"].as_str().unwrap().contains("default"));
}

#[tokio::test]
async fn failure_after_retries_is_502_problem() {
    let mut ups = vec![Upstream::start("a").await, Upstream::start("b").await];
    let urls: Vec<String> = ups.iter().map(Upstream::url).collect();
    // No ejection, no health checks: every attempt meets a refused connection.
    let gw = TestGateway::start(settings(
        &urls,
        json!({"health_interval_ms": 60_000, "max_ejection_percent": 0, "retries": 2}),
    ))
    .await;
    for u in &mut ups {
        u.kill().await;
    }
    let r = TestClient::default().get(&gw.url("/")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    let problem: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert!(
        problem["detail"].as_str().unwrap().contains("3 attempt(s)"),
        "{problem}"
    );
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(settings(
        &[up.url()],
        json!({"max_body_bytes": 1000, "retry_buffer_bytes": 100}),
    ))
    .await;
    let client = TestClient::default();
    // Declared too large: refused before any upstream is contacted.
    let r = client
        .send(
            Request::post(gw.url("/echo"))
                .body(Full::new(Bytes::from(vec![b'x'; 1001])))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert_eq!(up.hits(), 0);
    // Within the limit but past the retry buffer: streams through intact.
    let r = client
        .send(
            Request::post(gw.url("/echo"))
                .body(Full::new(Bytes::from(vec![b'y'; 900])))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, "y".repeat(900));
}

#[tokio::test]
async fn chunked_body_over_the_limit_gets_413() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(settings(
        &[up.url()],
        json!({"max_body_bytes": 1000, "retry_buffer_bytes": 100}),
    ))
    .await;
    // A raw chunked request, so no Content-Length announces the size.
    let out = chunked_echo(gw.addr, &"z".repeat(600)).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
}

/// POSTs `chunk` twice to `/echo` as a raw chunked request (no length
/// announced) on a connection of its own; the whole answer, as text.
async fn chunked_echo(gateway: std::net::SocketAddr, chunk: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gateway).await.unwrap();
    let size = format!("{:x}", chunk.len());
    let req = format!(
        "POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{size}\r\n{chunk}\r\n{size}\r\n{chunk}\r\n0\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
    out
}

#[tokio::test]
async fn slow_upstream_gets_504_problem() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(settings(&[up.url()], json!({"request_timeout_ms": 300}))).await;
    let started = std::time::Instant::now();
    let r = TestClient::default().get(&gw.url("/slow")).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.headers["content-type"], "application/problem+json");
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(up.hits(), 1, "a timed-out request is not retried");
}

#[tokio::test]
async fn gateway_endpoints_answer() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(settings(&[up.url()], json!({}))).await;
    let client = TestClient::default();
    client.get(&gw.url("/warm")).await;
    assert_eq!(
        client.get(&gw.url("/_gateway/healthz")).await.status,
        StatusCode::OK
    );
    assert_eq!(
        client.get(&gw.url("/_gateway/readyz")).await.status,
        StatusCode::OK
    );
    let metrics = client.get_admin(&gw.url("/_gateway/metrics")).await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(
        metrics.body.contains("shoal_gateway_requests_total"),
        "{}",
        metrics.body
    );
    let pools = gw.pools(&client).await;
    assert_eq!(pools["pools"][0]["name"], "default");
    assert_eq!(pools["pools"][0]["instances"][0]["url"], up.url());
    assert_eq!(pools["pools"][0]["instances"][0]["healthy"], true);
    assert!(pools["pools"][0]["instances"][0]["ewma_ms"].is_number());
    assert_eq!(pools["routes"][0]["prefix"], "/");
    let missing = client.get(&gw.url("/_gateway/nope")).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish() {
    let up = Upstream::start("a").await;
    up.state.delay_ms.store(400, Ordering::SeqCst);
    let gw = TestGateway::start(settings(&[up.url()], json!({}))).await;
    let client = TestClient::default();
    let url = gw.url("/work");
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { client.get(&url).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    gw.stop.cancel();
    let r = in_flight.await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "a"));
    let mut gw = gw;
    let stopped = tokio::time::timeout(Duration::from_secs(3), &mut gw.task).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "{stopped:?}");
    assert!(
        tokio::net::TcpStream::connect(gw.addr).await.is_err(),
        "still accepting after shutdown"
    );
}

#[tokio::test]
async fn connections_on_every_worker_thread_are_served_and_drained() {
    // Three threads: connections go round them, so of six concurrent
    // requests (six connections) four are served by the two worker
    // threads' own runtimes and upstream clients.
    let up = Upstream::start("a").await;
    up.state.delay_ms.store(300, Ordering::SeqCst);
    let gw = TestGateway::start(settings(&[up.url()], json!({"workers": 3}))).await;
    let client = TestClient::default();
    let in_flight: Vec<_> = (0..6)
        .map(|i| {
            let client = client.clone();
            let url = gw.url(&format!("/work/{i}"));
            tokio::spawn(async move { client.get(&url).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    gw.stop.cancel();
    for r in in_flight {
        let r = r.await.unwrap();
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "a"));
    }
    let mut gw = gw;
    let stopped = tokio::time::timeout(Duration::from_secs(3), &mut gw.task).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "{stopped:?}");
    assert_eq!(up.state.hits.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn the_remaining_deadline_goes_upstream_and_a_callers_shorter_one_counts() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(settings(&[up.url()], json!({"request_timeout_ms": 5000}))).await;
    let client = TestClient::default();
    let r = client.get(&gw.url("/fast")).await;
    assert_eq!(r.status, StatusCode::OK);
    let seen = up.state.last_headers.lock().unwrap().clone().unwrap();
    let left: u64 = seen["x-shoal-deadline-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=5000).contains(&left), "deadline sent upstream: {left}");
    assert!(
        left > 4000,
        "little of the 5 s was spent before sending: {left}"
    );

    // A caller's own deadline of 250 ms is shorter than the route's 5 s:
    // the upstream is told so, and the gateway gives up at it.
    let req = Request::get(gw.url("/slow"))
        .header("x-shoal-deadline-ms", "250")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let started = std::time::Instant::now();
    let r = client.send(req).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        started.elapsed() < Duration::from_millis(2000),
        "{:?}",
        started.elapsed()
    );
    let seen = up.state.last_headers.lock().unwrap().clone().unwrap();
    let left: u64 = seen["x-shoal-deadline-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=250).contains(&left),
        "caller's deadline sent upstream: {left}"
    );
}

#[tokio::test]
async fn route_header_rules_edit_requests_and_responses() {
    let up = Upstream::start("a").await;
    let rules = json!({"routes": [
        {"prefix": "/api/", "pool": "default",
         "request_headers": {"set": {"x-env": "prod"}, "remove": ["x-debug"]},
         "response_headers": {"set": {"strict-transport-security": "max-age=63072000"},
                              "remove": ["x-upstream"]}},
        {"prefix": "/", "pool": "default"}
    ]});
    let gw = TestGateway::start(settings(&[up.url()], rules)).await;
    let client = TestClient::default();
    let send = |path: &str| {
        Request::get(gw.url(path))
            .header("x-debug", "1")
            .header("x-env", "dev")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };

    let r = client.send(send("/api/items")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["strict-transport-security"], "max-age=63072000");
    assert!(
        r.headers.get("x-upstream").is_none(),
        "removed from the response"
    );
    let seen = up.state.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(seen["x-env"], "prod", "set replaces the client's value");
    assert!(seen.get("x-debug").is_none(), "removed from the request");

    // Another route: untouched.
    let r = client.send(send("/other")).await;
    assert_eq!(r.headers["x-upstream"], "a");
    assert!(r.headers.get("strict-transport-security").is_none());
    let seen = up.state.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(
        (
            seen["x-env"].to_str().unwrap(),
            seen["x-debug"].to_str().unwrap()
        ),
        ("dev", "1")
    );
}

#[tokio::test]
async fn a_bad_header_rule_is_refused_with_its_key() {
    let bad = json!({"routes": [
        {"prefix": "/", "pool": "default",
         "response_headers": {"set": {"bad header": "x"}}}
    ]});
    let err = shoal_gateway::Gateway::bind(settings(&["http://127.0.0.1:9".into()], bad))
        .await
        .expect_err("a header name with a space is refused");
    let text = err.to_string();
    assert!(
        text.contains("gateway.routes[0].response_headers.set.bad header"),
        "{text}"
    );
}

#[tokio::test]
async fn an_h2c_pool_is_spoken_to_in_http2() {
    let up = Upstream::start("a").await;
    let pools = json!({"pools": [{"name": "default", "upstreams": [up.url()], "protocol": "h2c"}]});
    let gw = TestGateway::start(settings(&[], pools)).await;
    let client = TestClient::default();
    let replies = futures_util::future::join_all((0..8).map(|i| {
        let client = client.clone();
        let url = gw.url(&format!("/h2/{i}"));
        async move { client.get(&url).await }
    }))
    .await;
    for r in replies {
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "a"));
        assert_eq!(r.headers["x-upstream"], "a");
    }
    assert_eq!(
        *up.state.last_version.lock().unwrap(),
        Some(http::Version::HTTP_2)
    );
    // And an HTTP/1.1 pool stays HTTP/1.1.
    let up1 = Upstream::start("b").await;
    let gw1 = TestGateway::start(settings(&[up1.url()], json!({}))).await;
    assert_eq!(client.get(&gw1.url("/h1")).await.status, StatusCode::OK);
    assert_eq!(
        *up1.state.last_version.lock().unwrap(),
        Some(http::Version::HTTP_11)
    );
}

/// An h2c instance that resets every stream with `reason`, counting them.
async fn resetting_h2c_instance(reason: h2::Reason) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let streams = Arc::new(AtomicUsize::new(0));
    let counted = streams.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                // TCP health checks connect and leave without a preface.
                let Ok(mut conn) = h2::server::handshake(socket).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    counted.fetch_add(1, Ordering::SeqCst);
                    respond.send_reset(reason);
                }
            });
        }
    });
    (url, streams)
}

fn h2c_pool(upstreams: &[String]) -> serde_json::Value {
    json!({
        "pools": [{"name": "default", "upstreams": upstreams, "protocol": "h2c"}],
        // A TCP connect: the resetting instance stays healthy, so every
        // round-robin turn reaches it.
        "health_path": "",
        "eject_after_errors": 100,
    })
}

#[tokio::test]
async fn an_h2c_stream_refused_by_an_instance_is_retried_elsewhere_whatever_its_method() {
    let (refusing, refused) = resetting_h2c_instance(h2::Reason::REFUSED_STREAM).await;
    let good = Upstream::start("good").await;
    let gw = TestGateway::start(settings(&[], h2c_pool(&[refusing, good.url()]))).await;
    let client = TestClient::default();
    for i in 0..6 {
        let r = client.post_json(&gw.url(&format!("/orders/{i}"))).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (StatusCode::OK, "good"),
            "POST {i}"
        );
    }
    assert!(
        refused.load(Ordering::SeqCst) >= 3,
        "round robin sent half the first attempts to the refusing instance"
    );
}

#[tokio::test]
async fn an_h2c_stream_reset_after_it_was_sent_is_retried_only_when_idempotent() {
    let (resetting, resets) = resetting_h2c_instance(h2::Reason::INTERNAL_ERROR).await;
    let good = Upstream::start("good").await;
    let gw = TestGateway::start(settings(&[], h2c_pool(&[resetting, good.url()]))).await;
    let client = TestClient::default();
    let mut bad_gateway = 0;
    for i in 0..4 {
        let r = client.post_json(&gw.url(&format!("/orders/{i}"))).await;
        match r.status {
            StatusCode::OK => assert_eq!(r.body, "good"),
            StatusCode::BAD_GATEWAY => bad_gateway += 1,
            other => panic!("POST {i}: {other} {}", r.body),
        }
    }
    assert_eq!(
        bad_gateway, 2,
        "a POST reset by the instance is not replayed"
    );
    assert_eq!(resets.load(Ordering::SeqCst), 2);
    for i in 0..4 {
        let r = client.get(&gw.url(&format!("/items/{i}"))).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (StatusCode::OK, "good"),
            "GET {i}"
        );
    }
    assert_eq!(
        resets.load(Ordering::SeqCst),
        4,
        "half the GETs were reset, then retried"
    );
}

#[tokio::test]
async fn upstream_connections_are_reused_and_counted_per_pool() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(settings(
        &[],
        json!({"pools": [{"name": "reuse-counted", "upstreams": [up.url()]}]}),
    ))
    .await;
    let client = TestClient::default();
    for i in 0..20 {
        let r = client.get(&gw.url(&format!("/r/{i}"))).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let opened = up.state.peers.lock().unwrap().len();
    assert!(
        opened <= 2,
        "20 requests, one after another: {opened} connections"
    );
    let m = client.get_admin(&gw.url("/_gateway/metrics")).await;
    let count = |reused: &str| -> u64 {
        m.body
            .lines()
            .find(|l| {
                l.starts_with("shoal_gateway_upstream_connections_total{")
                    && l.contains(r#"pool="reuse-counted""#)
                    && l.contains(&format!(r#"reused="{reused}""#))
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    assert_eq!(count("false") + count("true"), 20, "{}", m.body);
    assert!(count("true") >= 18, "{}", m.body);
}

/// An upstream that answers one request per connection with keep-alive
/// promised, then closes the connection after `linger`: a keep-alive
/// connection that dies while idle in the gateway's pool.
async fn closes_idle_connections(linger: Duration) -> (String, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let served = Arc::new(AtomicUsize::new(0));
    let counted = served.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                // The head, then the body its Content-Length announces.
                loop {
                    let Ok(n) = socket.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if got.len() >= end + 4 + length {
                            break;
                        }
                    }
                }
                counted.fetch_add(1, Ordering::SeqCst);
                let _ = socket
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nkeep-alive: timeout=60\r\n\r\nok",
                    )
                    .await;
                tokio::time::sleep(linger).await;
            });
        }
    });
    (url, served)
}

#[tokio::test]
async fn a_post_on_a_pooled_connection_the_instance_closed_is_sent_on_a_new_one() {
    let (url, served) = closes_idle_connections(Duration::from_millis(30)).await;
    let gw = TestGateway::start(settings(&[url], json!({"health_path": ""}))).await;
    let client = TestClient::default();
    for i in 0..5 {
        let r = client.post_json(&gw.url(&format!("/orders/{i}"))).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (StatusCode::OK, "ok"),
            "POST {i}"
        );
        // Long enough for the instance to close the connection.
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    assert_eq!(
        served.load(Ordering::SeqCst),
        5,
        "each POST reached it once"
    );
}

/// A raw HTTP/1.1 instance: answers each request on a connection with the
/// next of `answers` (written in pieces, with pauses between them, as a
/// slow instance would), and counts the connections that carried a
/// request (TCP health checks connect and leave).
async fn scripted_instance(answers: Vec<Vec<&'static [u8]>>) -> (String, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    let answers = Arc::new(answers);
    let next = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let (answers, next, counted) = (answers.clone(), next.clone(), counted.clone());
            tokio::spawn(async move {
                let mut first = true;
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    // One request head (the tests send no bodies).
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end);
                    if std::mem::take(&mut first) {
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                    if head.starts_with("GET /health") {
                        let _ = socket
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                            .await;
                        continue;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(pieces) = answers.get(i) else { return };
                    for piece in pieces {
                        if socket.write_all(piece).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    if pieces.last().is_some_and(|p| p.is_empty()) {
                        // An empty last piece: the answer ends with the connection.
                        return;
                    }
                }
            });
        }
    });
    (url, accepted)
}

#[tokio::test]
async fn responses_framed_by_chunks_length_or_close_arrive_whole_and_only_clean_ends_reuse_the_connection(
) {
    let (url, accepted) = scripted_instance(vec![
        // Chunked, split inside the size line, the data and the trailers,
        // after an interim 100.
        vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            b"5\r\nhel",
            b"lo\r\n1",
            b"0;ext=1\r\n, chunked world!\r\n0\r\nx-tr",
            b"ailer: 1\r\n\r\n",
        ],
        // Content-Length, the body in two writes.
        vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\nhello",
            b" world",
        ],
        // No length: the body ends with the connection.
        vec![b"HTTP/1.1 200 OK\r\n\r\nuntil the end", b""],
        // A fresh connection after that.
        vec![b"HTTP/1.1 204 No Content\r\n\r\n"],
    ])
    .await;
    // One thread, so every request uses the same upstream pool whichever
    // client connection it comes on.
    let gw = TestGateway::start(settings(&[url], json!({"health_path": "", "workers": 1}))).await;
    let client = TestClient::default();
    let r = client.get(&gw.url("/a")).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (StatusCode::OK, "hello, chunked world!")
    );
    let r = client.get(&gw.url("/b")).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "hello world"));
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "a chunked body read to its end leaves the connection for reuse"
    );
    let r = client.get(&gw.url("/c")).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (StatusCode::OK, "until the end")
    );
    let r = client.get(&gw.url("/d")).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "a body delimited by the connection's end is not followed by reuse"
    );
}

#[tokio::test]
async fn a_malformed_response_is_a_502_with_the_reason() {
    let (url, _) =
        scripted_instance(vec![vec![b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n"]]).await;
    let gw = TestGateway::start(settings(&[url], json!({"health_path": ""}))).await;
    let r = TestClient::default().get(&gw.url("/a")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert!(r.body.contains("invalid Content-Length"), "{}", r.body);
}

/// The security review: `Transfer-Encoding: gzip, chunked` from an
/// instance was decoded as chunked and the gzip coding dropped, so the
/// client got compressed bytes labelled as nothing. A coding the gateway
/// does not decode is a 502 (as nginx answers it).
#[tokio::test]
async fn a_response_coding_other_than_chunked_is_a_502() {
    let (url, _) = scripted_instance(vec![vec![
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    ]])
    .await;
    let gw = TestGateway::start(settings(&[url], json!({"health_path": "", "retries": 0}))).await;
    let r = TestClient::default().get(&gw.url("/a")).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert!(r.body.contains("Transfer-Encoding"), "{}", r.body);
}

#[tokio::test]
async fn an_instance_that_answers_in_the_middle_of_an_upload_and_closes_is_heard() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An instance that refuses uploads after reading the head: 413, then
    // it closes with the body unread (so its kernel resets).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_request_head(&mut socket).await.is_none() {
                    return;
                }
                let _ = socket
                    .write_all(b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 9\r\nconnection: close\r\n\r\ntoo large")
                    .await;
            });
        }
    });
    let gw = TestGateway::start(settings(&[url], json!({"health_path": ""}))).await;
    let size = 8usize << 20;
    let socket = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut rd, mut wr) = socket.into_split();
    let upload = tokio::spawn(async move {
        let head = format!("POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {size}\r\n\r\n");
        wr.write_all(head.as_bytes()).await?;
        let piece = vec![b'x'; 64 << 10];
        for _ in 0..size / piece.len() {
            wr.write_all(&piece).await?;
        }
        Ok::<_, std::io::Error>(wr)
    });
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while !String::from_utf8_lossy(&got).contains("too large") {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    upload.abort();
    let got = String::from_utf8_lossy(&got);
    assert!(
        got.starts_with("HTTP/1.1 413"),
        "the instance's answer, not a 502: {got}"
    );
    assert!(got.ends_with("too large"), "{got}");
}

#[tokio::test]
async fn an_instance_that_stalls_mid_body_is_cut_off_after_the_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Ten bytes of a hundred, then silence with the connection open.
    let (url, _) = scripted_instance(vec![vec![
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nfirst ten!",
    ]])
    .await;
    let gw = TestGateway::start(settings(
        std::slice::from_ref(&url),
        json!({"health_path": "", "upstream_read_timeout_ms": 300}),
    ))
    .await;
    let mut socket = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    socket
        .write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut got)).await;
    let got = String::from_utf8_lossy(&got);
    assert!(read.is_ok(), "the client connection stays open: {got}");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(
        got.ends_with("first ten!"),
        "the bytes sent are passed on: {got}"
    );
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(5),
        "cut off after the read timeout, not before: {took:?}"
    );
    let client = TestClient::default();
    assert_eq!(
        gw.instance(&client, &url).await["in_flight"],
        0,
        "the cut-off request no longer counts as outstanding"
    );
}

#[tokio::test]
async fn large_and_chunked_bodies_stream_through_both_ways_intact() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(settings(
        &[up.url()],
        json!({"max_body_bytes": 8 << 20, "retry_buffer_bytes": 1024}),
    ))
    .await;
    // 3 MiB up (past the retry buffer: streamed with its Content-Length)
    // and the same 3 MiB back (read from the socket in many pieces).
    let big: Vec<u8> = (0..3 << 20).map(|i: u32| b'a' + (i % 26) as u8).collect();
    let r = TestClient::default()
        .send(
            Request::post(gw.url("/echo"))
                .body(Full::new(Bytes::from(big.clone())))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), big.len());
    assert!(
        r.body.as_bytes() == big.as_slice(),
        "the body came back changed"
    );
    // A chunked upload without a length goes upstream chunked.
    let out = chunked_echo(gw.addr, &"q".repeat(1500)).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.ends_with(&"q".repeat(3000)),
        "{}",
        &out[..out.len().min(300)]
    );
    assert!(
        up.state
            .last_headers
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|h| h.get("transfer-encoding").is_some_and(|v| v == "chunked")),
        "the instance got the upload chunked"
    );
}

/// An instance that stops answering without closing anything (a cut link,
/// a frozen host) holds a request for `try_timeout_ms`, not for the whole
/// request timeout: a GET is then tried on another instance and answered;
/// a POST without an idempotency key is never tried twice.
#[tokio::test]
async fn a_silent_instance_costs_one_try_timeout_for_retryable_requests() {
    let frozen = Upstream::start("frozen").await;
    frozen.state.delay_ms.store(5_000, Ordering::SeqCst);
    let b = Upstream::start("b").await;
    let gw = TestGateway::start(settings(
        &[frozen.url(), b.url()],
        json!({"try_timeout_ms": 300, "request_timeout_ms": 4_000, "retry_budget_min_per_sec": 100}),
    ))
    .await;
    let client = TestClient::default();
    for _ in 0..6 {
        let started = Instant::now();
        let r = client.get(&gw.url("/x")).await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "b"));
        assert!(
            started.elapsed() < Duration::from_millis(1_500),
            "{:?}",
            started.elapsed()
        );
    }
    assert!(frozen.hits() >= 1, "the frozen instance was tried");

    // Only the frozen instance: a GET is tried up to 1 + `retries` times,
    // one try timeout each, and answered 504 naming the try timeout; a
    // POST waits for the whole request timeout and is sent once.
    let alone = TestGateway::start(settings(
        &[frozen.url()],
        json!({"try_timeout_ms": 200, "request_timeout_ms": 1_500, "retry_budget_min_per_sec": 100}),
    ))
    .await;
    let started = Instant::now();
    let r = client.get(&alone.url("/y")).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.body);
    assert!(r.body.contains("try_timeout_ms"), "{}", r.body);
    assert!(started.elapsed() < Duration::from_millis(1_200));
    let before = frozen.hits();
    let started = Instant::now();
    let r = client.post_json(&alone.url("/z")).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT, "{}", r.body);
    assert!(started.elapsed() >= Duration::from_millis(1_400));
    assert_eq!(frozen.hits(), before + 1, "a POST is sent once");
}

/// A Shoal instance that is overloaded answers 503 `x-shoal-overload`:
/// `unprocessed` (refused before any work: any request whose body the
/// gateway kept goes to another instance) or `busy` (the handler gave up
/// part way: only an idempotent request does). An overloaded instance is
/// not tried again for the same request; with no other, its 503 is the
/// answer.
#[tokio::test]
async fn an_overloaded_instance_s_refusals_go_elsewhere_when_that_is_safe() {
    let busy = Upstream::start("busy").await;
    let b = Upstream::start("b").await;
    let gw = TestGateway::start(settings(
        &[busy.url(), b.url()],
        json!({"retries": 2, "retry_budget_min_per_sec": 100}),
    ))
    .await;
    let client = TestClient::default();
    for why in ["busy", "unprocessed"] {
        *busy.state.overload.lock().unwrap() = Some(why);
        let before = busy.hits();
        for _ in 0..6 {
            let r = client.get(&gw.url("/x")).await;
            assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "b"), "{why}");
        }
        assert!(busy.hits() > before, "the busy instance was tried ({why})");
    }
    // A POST without an idempotency key: resent only when nothing of it
    // was done.
    *busy.state.overload.lock().unwrap() = Some("unprocessed");
    for _ in 0..6 {
        let r = client.post_json(&gw.url("/z")).await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "b"));
    }
    // Alone: tried once, its 503 passed on.
    let alone = TestGateway::start(settings(
        &[busy.url()],
        json!({"retries": 2, "retry_budget_min_per_sec": 100}),
    ))
    .await;
    for why in ["busy", "unprocessed"] {
        *busy.state.overload.lock().unwrap() = Some(why);
        let before = busy.hits();
        let r = client.get(&alone.url("/y")).await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
        assert_eq!(r.headers["x-shoal-overload"], why);
        assert_eq!(
            busy.hits(),
            before + 1,
            "not sent to the busy instance again"
        );
    }

    // A POST without a key that the instance began (`busy`) is not sent
    // again, even with another instance there: its 503 is the answer.
    *busy.state.overload.lock().unwrap() = Some("busy");
    let before = (busy.hits(), b.hits());
    let mut refused = 0;
    for _ in 0..6 {
        let r = client.post_json(&gw.url("/z")).await;
        refused += usize::from(r.status == StatusCode::SERVICE_UNAVAILABLE);
    }
    let sent = (busy.hits() - before.0) + (b.hits() - before.1);
    assert_eq!(sent, 6, "each POST without a key is sent once");
    assert_eq!(
        refused,
        busy.hits() - before.0,
        "every one the busy instance began is its 503"
    );
}

/// A Shoal instance answers 503 `x-shoal-deadline: exceeded` when the
/// attempt's time it was given (`x-shoal-deadline-ms`) passes, racing the
/// gateway's own try timer. A retryable request is then tried on another
/// instance, as with no answer at all; a POST without an idempotency key
/// is not, and gets the 503; with no other instance left, the last 503
/// is the answer.
#[tokio::test]
async fn an_instance_past_its_deadline_is_retried_like_a_silent_one() {
    let late = Upstream::start("late").await;
    late.state.deadline_exceeded.store(true, Ordering::SeqCst);
    let b = Upstream::start("b").await;
    let gw = TestGateway::start(settings(
        &[late.url(), b.url()],
        json!({"try_timeout_ms": 300, "request_timeout_ms": 4_000, "retry_budget_min_per_sec": 100}),
    ))
    .await;
    let client = TestClient::default();
    for _ in 0..6 {
        let r = client.get(&gw.url("/x")).await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "b"));
    }
    assert!(late.hits() >= 1, "the late instance was tried");

    let alone = TestGateway::start(settings(
        &[late.url()],
        json!({"try_timeout_ms": 300, "request_timeout_ms": 4_000, "retries": 2, "retry_budget_min_per_sec": 100}),
    ))
    .await;
    let before = late.hits();
    let r = client.get(&alone.url("/y")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(late.hits(), before + 3, "a GET is tried 1 + retries times");
    let before = late.hits();
    let r = client.post_json(&alone.url("/z")).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
    assert_eq!(late.hits(), before + 1, "a POST without a key is sent once");
}
