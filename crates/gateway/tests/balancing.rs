//! End-to-end tests of the balancers, the ejection cap, the retry budget
//! and HTTP/2 from clients.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

#[tokio::test]
async fn p2c_peak_ewma_sends_most_requests_to_the_faster_instance() {
    let slow = Upstream::start("slow").await;
    let fast = Upstream::start("fast").await;
    slow.state.delay_ms.store(30, Ordering::SeqCst);
    // The default balancer is P2C with peak-EWMA.
    let mut s = settings(&[slow.url(), fast.url()], json!({}));
    s.balancer = shoal_core::settings::GatewaySettings::default().balancer;
    assert_eq!(s.balancer.name(), "p2c_peak_ewma");
    let gw = TestGateway::start(s).await;
    let client = TestClient::default();
    for _ in 0..60 {
        assert_eq!(client.get(&gw.url("/")).await.status, StatusCode::OK);
    }
    assert!(
        fast.hits() >= 54,
        "fast {} slow {}",
        fast.hits(),
        slow.hits()
    );
}

#[tokio::test]
async fn least_requests_avoids_the_busy_instance() {
    let busy = Upstream::start("busy").await;
    let idle = Upstream::start("idle").await;
    busy.state.delay_ms.store(600, Ordering::SeqCst);
    let gw = TestGateway::start(settings(
        &[busy.url(), idle.url()],
        json!({"balancer": "least_requests"}),
    ))
    .await;
    let client = TestClient::default();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (client, url) = (client.clone(), gw.url("/"));
        tasks.push(tokio::spawn(async move { client.get(&url).await.status }));
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert!(
        busy.hits() <= 1,
        "busy {} idle {}",
        busy.hits(),
        idle.hits()
    );
}

#[tokio::test]
async fn weighted_round_robin_follows_weights() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let mut weights = serde_json::Map::new();
    weights.insert(a.url(), json!(3));
    let gw = TestGateway::start(settings(
        &[a.url(), b.url()],
        json!({"balancing": {"default": {"balancer": "weighted_round_robin", "weights": weights}}}),
    ))
    .await;
    let client = TestClient::default();
    for _ in 0..40 {
        client.get(&gw.url("/")).await;
    }
    assert_eq!((a.hits(), b.hits()), (30, 10));
}

#[tokio::test]
async fn consistent_hash_keeps_each_key_on_one_instance() {
    let ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    let urls: Vec<String> = ups.iter().map(Upstream::url).collect();
    let gw = TestGateway::start(settings(
        &urls,
        json!({"balancing": {"default": {"balancer": "consistent_hash", "hash_on": "header:x-user"}}}),
    ))
    .await;
    let client = TestClient::default();
    let mut owner: HashMap<String, String> = HashMap::new();
    for round in 0..3 {
        for user in 0..30 {
            let req = Request::get(gw.url("/cart"))
                .header("x-user", format!("user-{user}"))
                .body(Full::new(Bytes::new()))
                .unwrap();
            let body = client.send(req).await.body;
            if round == 0 {
                owner.insert(format!("user-{user}"), body);
            } else {
                assert_eq!(owner[&format!("user-{user}")], body, "user-{user} moved");
            }
        }
    }
    let used: HashSet<&String> = owner.values().collect();
    assert_eq!(used.len(), 3, "keys did not spread: {owner:?}");
}

#[tokio::test]
async fn passive_ejection_never_exceeds_the_cap() {
    let mut ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    let urls: Vec<String> = ups.iter().map(Upstream::url).collect();
    let gw = TestGateway::start(settings(
        &urls,
        json!({"health_interval_ms": 60_000, "max_ejection_percent": 34}),
    ))
    .await;
    let client = TestClient::default();
    ups[0].kill().await;
    ups[1].kill().await;
    for _ in 0..20 {
        let r = client.get(&gw.url("/")).await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "c"));
    }
    let pools = gw.pools(&client).await;
    let ejected = pools["pools"][0]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["ejected"] == true)
        .count();
    assert_eq!(ejected, 1, "{pools}");
}

#[tokio::test]
async fn spent_retry_budget_stops_retries() {
    let mut dead = Upstream::start("dead").await;
    let good = Upstream::start("good").await;
    let urls = vec![dead.url(), good.url()];
    dead.kill().await;
    let gw = TestGateway::start(settings(
        &urls,
        json!({
            "health_interval_ms": 60_000,
            "max_ejection_percent": 0,
            "retry_budget_percent": 0.0,
            "retry_budget_min_per_sec": 0,
        }),
    ))
    .await;
    let client = TestClient::default();
    let mut failed = 0;
    for _ in 0..10 {
        if client.get(&gw.url("/")).await.status == StatusCode::BAD_GATEWAY {
            failed += 1;
        }
    }
    assert_eq!(
        failed, 5,
        "round robin sends every other request to the dead instance"
    );
}

#[tokio::test]
async fn http2_clients_are_served() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(settings(&[up.url()], json!({}))).await;
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let response = client
        .request(
            Request::get(gw.url("/h2"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"a");
    let seen = up.state.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(seen["x-forwarded-host"], gw.addr.to_string().as_str());
}

/// Passive ejection leaves the last instance that takes requests: with
/// the other drained, connection errors on it do not take it out, so
/// requests reach it the moment it answers again (ejected, they would get
/// 503 for the ejection's period).
#[tokio::test]
async fn passive_ejection_spares_the_last_instance_taking_requests() {
    let a = Upstream::start("a").await;
    let mut b = Upstream::start("b").await;
    let b_addr: std::net::SocketAddr = b.url().trim_start_matches("http://").parse().unwrap();
    let gw = TestGateway::start(settings(
        &[a.url(), b.url()],
        json!({"health_interval_ms": 60_000, "eject_base_ms": 10_000}),
    ))
    .await;
    let client = TestClient::default();
    let r = admin(
        &client,
        &gw,
        "drain",
        json!({"pool": "default", "url": a.url()}),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    b.kill().await;
    for _ in 0..5 {
        let r = client.get(&gw.url("/")).await;
        assert_eq!(r.status, StatusCode::BAD_GATEWAY, "{}", r.body);
    }
    let status = gw.instance(&client, &b.url()).await;
    assert_eq!(status["ejected"], false, "{status}");
    let _b = Upstream::start_on(b_addr, "b").await;
    let r = client.get(&gw.url("/")).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "b"));
}

/// Passive ejection never leaves a pool with nothing to send to: when
/// the instances it left in go away (here an operator drains the last),
/// the one it ejected is tried again, and answers.
#[tokio::test]
async fn a_pool_left_with_only_ejected_instances_tries_them() {
    let mut a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let a_addr: std::net::SocketAddr = a.url().trim_start_matches("http://").parse().unwrap();
    let gw = TestGateway::start(settings(
        &[a.url(), b.url()],
        json!({"health_interval_ms": 60_000, "eject_base_ms": 10_000}),
    ))
    .await;
    let client = TestClient::default();
    a.kill().await;
    for _ in 0..4 {
        let r = client.get(&gw.url("/")).await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "b"));
    }
    assert_eq!(gw.instance(&client, &a.url()).await["ejected"], true);
    let _a = Upstream::start_on(a_addr, "a").await;
    let r = admin(
        &client,
        &gw,
        "drain",
        json!({"pool": "default", "url": b.url()}),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = client.get(&gw.url("/")).await;
    assert_eq!(
        (r.status, r.body.as_str()),
        (StatusCode::OK, "a"),
        "{}",
        r.body
    );
}
