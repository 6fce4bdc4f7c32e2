//! Identity at the edge: a route with `require_session` lets through only
//! requests whose session cookie the check endpoint (here a stand-in for
//! the accounts service) knows, passes the user id on in
//! `x-shoal-user-id`, and no client can send that header itself.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// The accounts stand-in: `GET /api/accounts/session` answers 200 with
/// `user-1` for the cookie `shoal_session=good` while `live`, else 401;
/// `/api/accounts/broken` sessions get 500.
struct Accounts {
    url: String,
    live: Arc<AtomicBool>,
    checks: Arc<AtomicUsize>,
    status_when_down: Arc<std::sync::atomic::AtomicU16>,
}

async fn accounts() -> Accounts {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let live = Arc::new(AtomicBool::new(true));
    let checks = Arc::new(AtomicUsize::new(0));
    let status_when_down = Arc::new(std::sync::atomic::AtomicU16::new(0));
    let (l, c, d) = (
        Arc::clone(&live),
        Arc::clone(&checks),
        Arc::clone(&status_when_down),
    );
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (l, c, d) = (Arc::clone(&l), Arc::clone(&c), Arc::clone(&d));
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (l, c, d) = (Arc::clone(&l), Arc::clone(&c), Arc::clone(&d));
                    async move {
                        let reply = |status: StatusCode, body: &str| {
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .header("cache-control", "no-store")
                                    .body(Full::new(Bytes::from(body.to_string())))
                                    .unwrap(),
                            )
                        };
                        if req.uri().path() == "/readyz" {
                            return reply(StatusCode::OK, "{}");
                        }
                        c.fetch_add(1, Ordering::SeqCst);
                        let down = d.load(Ordering::SeqCst);
                        if down != 0 {
                            return reply(StatusCode::from_u16(down).unwrap(), "{}");
                        }
                        let cookie = req
                            .headers()
                            .get("cookie")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("");
                        if cookie == "shoal_session=good" && l.load(Ordering::SeqCst) {
                            reply(StatusCode::OK, r#"{"user_id":"user-1","expires_at":1}"#)
                        } else {
                            reply(StatusCode::UNAUTHORIZED, r#"{"status":401}"#)
                        }
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Accounts {
        url,
        live,
        checks,
        status_when_down,
    }
}

async fn gateway(app: &Upstream, accounts: &Accounts, cache_ms: u64) -> TestGateway {
    let s = settings(&[], json!({}));
    let s = serde_json::from_value({
        let mut v = serde_json::to_value(&s).unwrap();
        v["pools"] = json!([
            {"name": "app", "upstreams": [app.url()]},
            {"name": "accounts", "upstreams": [accounts.url]},
        ]);
        v["routes"] = json!([
            {"prefix": "/", "pool": "app"},
            {"prefix": "/private/", "pool": "app", "require_session": true},
            {"prefix": "/api/accounts/", "pool": "accounts"},
        ]);
        v["identity"] = json!({"cache_ms": cache_ms});
        v
    })
    .unwrap();
    TestGateway::start(s).await
}

fn get(gw: &TestGateway, path: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut b = Request::get(gw.url(path));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

fn user_seen(app: &Upstream) -> Option<String> {
    app.state
        .last_headers
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|h| {
            h.get("x-shoal-user-id")
                .map(|v| v.to_str().unwrap().to_string())
        })
}

#[tokio::test]
async fn a_route_that_requires_a_session_gets_the_verified_user_and_nobody_else() {
    let app = Upstream::start("app").await;
    let accounts = accounts().await;
    let gw = gateway(&app, &accounts, 0).await;
    let client = TestClient::default();

    // No cookie: 401 from the gateway; nothing reached the app or the check.
    let r = client.send(get(&gw, "/private/data", &[])).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    assert!(r.body.contains("shoal_session"), "{}", r.body);
    assert_eq!(app.hits(), 0);
    assert_eq!(accounts.checks.load(Ordering::SeqCst), 0);

    // An unknown session: 401 after one check, and a forged header with it
    // changes nothing.
    let r = client
        .send(get(
            &gw,
            "/private/data",
            &[
                ("cookie", "shoal_session=forged"),
                ("x-shoal-user-id", "admin"),
            ],
        ))
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    assert_eq!(app.hits(), 0);

    // A live session: the app gets its user id, whatever the client sent.
    let r = client
        .send(get(
            &gw,
            "/private/data",
            &[
                ("cookie", "a=b; shoal_session=good"),
                ("x-shoal-user-id", "admin"),
            ],
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(user_seen(&app).as_deref(), Some("user-1"));

    // A public route: the forged header is removed, no check is made.
    let before = accounts.checks.load(Ordering::SeqCst);
    let r = client
        .send(get(&gw, "/public", &[("x-shoal-user-id", "admin")]))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        user_seen(&app),
        None,
        "a client-sent user header reached the app"
    );
    assert_eq!(accounts.checks.load(Ordering::SeqCst), before);

    // The check endpoint failing: 503, not a pass and not a 401.
    accounts.status_when_down.store(500, Ordering::SeqCst);
    let r = client
        .send(get(
            &gw,
            "/private/data",
            &[("cookie", "shoal_session=good")],
        ))
        .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", r.body);
}

#[tokio::test]
async fn an_ended_session_is_refused_within_the_cache_time() {
    let app = Upstream::start("app").await;
    let accounts = accounts().await;
    let gw = gateway(&app, &accounts, 300).await;
    let client = TestClient::default();
    let ask = || get(&gw, "/private/data", &[("cookie", "shoal_session=good")]);

    for _ in 0..5 {
        let r = client.send(ask()).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    }
    // Five requests within the cache time: one check.
    assert_eq!(accounts.checks.load(Ordering::SeqCst), 1);

    // Logged out elsewhere: refused once the cached answer is older than
    // cache_ms (300 ms), and from then on.
    accounts.live.store(false, Ordering::SeqCst);
    let refused = eventually(Duration::from_secs(3), || async {
        client.send(ask()).await.status == StatusCode::UNAUTHORIZED
    })
    .await;
    assert!(refused, "an ended session still passed after 3 s");
    let r = client.send(ask()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn bad_identity_settings_are_refused_with_their_key() {
    for (identity, key) in [
        (
            json!({"check_path": "api/session"}),
            "gateway.identity.check_path",
        ),
        (
            json!({"cookie_name": "a b"}),
            "gateway.identity.cookie_name",
        ),
        (
            json!({"user_header": "x user"}),
            "gateway.identity.user_header",
        ),
        (json!({"cache_ms": 600_000}), "gateway.identity.cache_ms"),
    ] {
        let mut v =
            serde_json::to_value(settings(&["http://127.0.0.1:1".into()], json!({}))).unwrap();
        v["identity"] = identity;
        let s: shoal_core::settings::GatewaySettings = serde_json::from_value(v).unwrap();
        let e = s.validate().expect_err("bad identity settings accepted");
        assert!(e.to_string().contains(key), "{e}");
    }
}
