//! End-to-end tests of routing by host and prefix with per-route limits,
//! the admin API (eject, restore, register with TTL) and settings errors.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::Full;
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn routes_by_host_and_longest_prefix_with_route_limits() {
    let web = Upstream::start("web").await;
    let api = Upstream::start("api").await;
    let shop = Upstream::start("shop").await;
    let mut s = settings(&[], json!({}));
    s = serde_json::from_value({
        let mut v = serde_json::to_value(&s).unwrap();
        v["pools"] = json!([
            {"name": "web", "upstreams": [web.url()]},
            {"name": "api", "upstreams": [api.url()]},
            {"name": "shop", "upstreams": [shop.url()]},
        ]);
        v["routes"] = json!([
            {"prefix": "/", "pool": "web"},
            {"prefix": "/api/", "pool": "api", "request_timeout_ms": 200, "max_body_bytes": 10},
            {"prefix": "/", "host": "Shop.Example", "pool": "shop"},
        ]);
        v
    })
    .unwrap();
    let gw = TestGateway::start(s).await;
    let client = TestClient::default();
    let get = |path: &str, host: Option<&str>| {
        let mut b = Request::get(gw.url(path));
        if let Some(h) = host {
            b = b.header("host", h);
        }
        client.send(b.body(Full::new(Bytes::new())).unwrap())
    };
    assert_eq!(get("/", None).await.body, "web");
    assert_eq!(get("/api/items", None).await.body, "api");
    assert_eq!(get("/api", None).await.body, "api");
    assert_eq!(get("/apiary", None).await.body, "web");
    assert_eq!(
        get("/api/items", Some("shop.example:8080")).await.body,
        "shop"
    );
    // The /api/ route's own timeout and body limit.
    assert_eq!(
        get("/api/slow", None).await.status,
        StatusCode::GATEWAY_TIMEOUT
    );
    let big = client
        .send(
            Request::post(gw.url("/api/echo"))
                .body(Full::new(Bytes::from_static(b"more than ten bytes")))
                .unwrap(),
        )
        .await;
    assert_eq!(big.status, StatusCode::PAYLOAD_TOO_LARGE);
    let small_elsewhere = client
        .send(
            Request::post(gw.url("/echo"))
                .body(Full::new(Bytes::from_static(b"more than ten bytes")))
                .unwrap(),
        )
        .await;
    assert_eq!(small_elsewhere.status, StatusCode::OK);
}

#[tokio::test]
async fn admin_ejects_and_restores_an_instance() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let gw = TestGateway::start(settings(&[a.url(), b.url()], json!({}))).await;
    let client = TestClient::default();
    let r = admin(
        &client,
        &gw,
        "eject",
        json!({"pool": "default", "url": a.url()}),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    for _ in 0..10 {
        assert_eq!(client.get(&gw.url("/")).await.body, "b");
    }
    assert_eq!(gw.instance(&client, &a.url()).await["admin_ejected"], true);
    let r = admin(
        &client,
        &gw,
        "restore",
        json!({"pool": "default", "url": a.url()}),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let bodies: Vec<String> = futures_util::future::join_all(
        (0..4).map(|_| async { client.get(&gw.url("/")).await.body }),
    )
    .await;
    assert!(bodies.iter().any(|b| b == "a"), "{bodies:?}");
    // Unknown pool and instance are clear 404 problems.
    let r = admin(
        &client,
        &gw,
        "eject",
        json!({"pool": "nope", "url": a.url()}),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = admin(
        &client,
        &gw,
        "eject",
        json!({"pool": "default", "url": "http://127.0.0.1:1"}),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = admin(&client, &gw, "eject", json!({"pool": "default"}), None).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
}

/// With `registrations_file`, a restarted gateway routes to the instances
/// registered with its predecessor at once, before any of them renews.
#[tokio::test]
async fn registrations_survive_a_gateway_restart() {
    let a = Upstream::start("a").await;
    let dir = std::env::temp_dir().join(format!(
        "shoal-gw-registrations-{}-{}",
        std::process::id(),
        a.addr.port()
    ));
    let file = dir.join("registrations.json");
    let config = || {
        settings(
            &[],
            json!({"registrations_file": file.display().to_string(), "health_interval_ms": 100}),
        )
    };
    let client = TestClient::default();
    let gw = TestGateway::start(config()).await;
    let r = admin(
        &client,
        &gw,
        "register",
        json!({"pool": "default", "url": a.url(), "ttl_secs": 60}),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let written = eventually(Duration::from_secs(3), || async {
        std::fs::read_to_string(&file).is_ok_and(|t| t.contains(&a.url()))
    })
    .await;
    assert!(written, "the registration was not saved");
    drop(gw);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let again = TestGateway::start(config()).await;
    let reply = client.get(&again.url("/")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.body);
    assert_eq!(reply.body, "a");
    assert_eq!(again.instance(&client, &a.url()).await["registered"], true);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn registered_instance_gets_traffic_until_its_ttl_lapses() {
    let a = Upstream::start("a").await;
    let extra = Upstream::start("extra").await;
    let gw = TestGateway::start(settings(&[a.url()], json!({}))).await;
    let client = TestClient::default();
    let r = admin(
        &client,
        &gw,
        "register",
        json!({"pool": "default", "url": extra.url(), "ttl_secs": 1}),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    for _ in 0..10 {
        client.get(&gw.url("/")).await;
    }
    assert_eq!(extra.hits(), 5);
    let gone = eventually(Duration::from_secs(3), || async {
        gw.instance(&client, &extra.url()).await.is_null()
    })
    .await;
    assert!(gone, "registration did not lapse");
    for _ in 0..4 {
        assert_eq!(client.get(&gw.url("/")).await.body, "a");
    }
    // A TTL past the maximum is refused; configured instances cannot be deregistered.
    let r = admin(
        &client,
        &gw,
        "register",
        json!({"pool": "default", "url": extra.url(), "ttl_secs": 100_000}),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = admin(
        &client,
        &gw,
        "deregister",
        json!({"pool": "default", "url": a.url()}),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn admin_token_is_required_when_set() {
    let a = Upstream::start("a").await;
    let gw = TestGateway::start(settings(
        &[a.url()],
        json!({"admin_token": "another-admin-token-42"}),
    ))
    .await;
    let client = TestClient::default();
    let body = json!({"pool": "default", "url": a.url()});
    let r = admin(&client, &gw, "eject", body.clone(), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = admin(&client, &gw, "eject", body.clone(), Some("wrong")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = admin(&client, &gw, "eject", body, Some("another-admin-token-42")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        client.get(&gw.url("/")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn bad_settings_are_refused_with_the_key_to_fix() {
    let bind = |overrides: serde_json::Value| async move {
        shoal_gateway::Gateway::bind(settings(&["http://127.0.0.1:9".into()], overrides))
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    let e = bind(json!({"balancing": {"default": {"balancer": "consistent_hash"}}})).await;
    assert!(e.contains("gateway.balancing.default.hash_on"), "{e}");
    let e = bind(json!({"balancing": {"default": {"weights": {"http://127.0.0.1:8": 2}}}})).await;
    assert!(e.contains("gateway.balancing.default.weights"), "{e}");
    let e = bind(json!({"pools": [
        {"name": "a", "upstreams": ["http://127.0.0.1:9"]},
        {"name": "b", "upstreams": ["http://127.0.0.1:8"]},
    ]}))
    .await;
    assert!(e.contains("gateway.routes"), "{e}");
    let e = bind(json!({"pools": [{"name": "a", "upstreams": ["http://127.0.0.1:9/path"]}]})).await;
    assert!(e.contains("gateway.pools[0].upstreams[0]"), "{e}");
}

/// The security review's first finding: a process on the same host (here
/// the test, on loopback) registered its own instance and read the pools
/// and metrics without any token. Now only `healthz` and `readyz` answer
/// without a token; `metrics_token` opens the read-only status but not
/// the admin API; and with no token configured those endpoints are off
/// for every client, loopback included.
#[tokio::test]
async fn only_a_token_opens_the_admin_api_and_status_never_the_client_address() {
    let a = Upstream::start("a").await;
    const METRICS_TOKEN: &str = "metrics-token-0123456789";
    let gw = TestGateway::start(settings(
        &[a.url()],
        json!({"metrics_token": METRICS_TOKEN}),
    ))
    .await;
    let client = TestClient::default();
    let get = |path: &str, token: Option<&str>| {
        let mut b = Request::get(gw.url(path));
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        client.send(b.body(Full::new(Bytes::new())).unwrap())
    };
    for path in ["/_gateway/healthz", "/_gateway/readyz"] {
        assert_eq!(get(path, None).await.status, StatusCode::OK, "{path}");
    }
    for path in ["/_gateway/pools", "/_gateway/metrics", "/_gateway/cache"] {
        let r = get(path, None).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}: {}", r.body);
        assert_eq!(r.headers["www-authenticate"], "Bearer");
        let r = get(path, Some("test-admin-token-012345678")).await;
        assert_eq!(
            r.status,
            StatusCode::UNAUTHORIZED,
            "{path}: a token one short"
        );
        assert_eq!(get(path, Some(METRICS_TOKEN)).await.status, StatusCode::OK);
        assert_eq!(get(path, Some(ADMIN_TOKEN)).await.status, StatusCode::OK);
    }
    // Registering an instance of one's own: refused without the admin
    // token, with the metrics token too; the pool is unchanged.
    let rogue = json!({"pool": "default", "url": "http://127.0.0.1:9", "ttl_secs": 60});
    let bare = client
        .send(
            Request::post(gw.url("/_gateway/admin/register"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(rogue.to_string())))
                .unwrap(),
        )
        .await;
    assert_eq!(bare.status, StatusCode::UNAUTHORIZED, "{}", bare.body);
    let r = admin(&client, &gw, "register", rogue.clone(), Some(METRICS_TOKEN)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    for action in ["eject", "purge", "reload"] {
        let r = admin(&client, &gw, action, rogue.clone(), Some(METRICS_TOKEN)).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{action}");
    }
    let pools = gw.pools(&client).await;
    assert_eq!(
        pools["pools"][0]["instances"].as_array().unwrap().len(),
        1,
        "{pools}"
    );

    // No token configured: the endpoints are off, for loopback too.
    let closed = TestGateway::start(settings(&[a.url()], json!({"admin_token": null}))).await;
    for path in ["/_gateway/pools", "/_gateway/metrics", "/_gateway/cache"] {
        let r = client.get(&closed.url(path)).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}: {}", r.body);
        assert!(r.body.contains("gateway.admin_token"), "{}", r.body);
    }
    let r = client
        .send(
            Request::post(closed.url("/_gateway/admin/register"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(rogue.to_string())))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    for _ in 0..20 {
        assert_eq!(client.get(&closed.url("/")).await.body, "a");
    }
    assert_eq!(
        client.get(&closed.url("/_gateway/readyz")).await.status,
        StatusCode::OK
    );
}

/// A registration token (`gateway.registration_tokens`) registers and
/// deregisters instances in its own pools, and opens nothing else: not
/// another pool, not eject, purge, reload or the status endpoints. The
/// settings keep only its SHA-256.
#[tokio::test]
async fn a_registration_token_registers_in_its_pools_only() {
    const TOKEN: &str = "sst_registration-token-for-greetings";
    let a = Upstream::start("a").await;
    let greeter = Upstream::start("greeter").await;
    let gw = TestGateway::start(settings(
        &[a.url()],
        json!({
            "pools": [
                {"name": "default", "upstreams": [a.url()]},
                {"name": "greetings", "upstreams": []},
            ],
            "routes": [
                {"prefix": "/", "pool": "default"},
                {"prefix": "/api/greetings", "pool": "greetings"},
            ],
            "registration_tokens": [{
                "name": "greetings",
                "sha256": shoal_core::bearer::sha256_hex(TOKEN),
                "pools": ["greetings"],
            }],
        }),
    ))
    .await;
    let client = TestClient::default();
    let mine = json!({"pool": "greetings", "url": greeter.url(), "ttl_secs": 30});
    let r = admin(&client, &gw, "register", mine.clone(), Some(TOKEN)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        client.get(&gw.url("/api/greetings/hi")).await.body,
        "greeter"
    );
    assert_eq!(client.get(&gw.url("/")).await.body, "a");

    // Another pool: 403, and nothing changes there.
    let theirs = json!({"pool": "default", "url": greeter.url(), "ttl_secs": 30});
    let r = admin(&client, &gw, "register", theirs.clone(), Some(TOKEN)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.body);
    assert!(r.body.contains("greetings"), "{}", r.body);
    for _ in 0..4 {
        assert_eq!(client.get(&gw.url("/")).await.body, "a");
    }
    // Every other admin action and the status: as without a token.
    for action in ["eject", "restore", "purge", "reload"] {
        let r = admin(&client, &gw, action, mine.clone(), Some(TOKEN)).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{action}: {}", r.body);
    }
    let r = client
        .send(
            Request::get(gw.url("/_gateway/pools"))
                .header("authorization", format!("Bearer {TOKEN}"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // A wrong token is no registration token.
    let r = admin(&client, &gw, "register", mine.clone(), Some("sst_wrong")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    let r = admin(&client, &gw, "deregister", mine, Some(TOKEN)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        client.get(&gw.url("/api/greetings/hi")).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}
