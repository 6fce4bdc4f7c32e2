//! The gateway's HTTP cache against in-process origins that count their
//! requests: coalescing, freshness and Age, Vary, what is never stored,
//! revalidation with 304, invalidation by unsafe methods, stale-while-
//! revalidate, stale-if-error, purge (with fan-out), HEAD, Cache-Status,
//! targeted cache control, the size bound and per-route switches.

mod common;

use bytes::Bytes;
use common::{eventually, settings, TestClient, TestGateway};
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the origin answers: status, headers, body.
type Answer = (u16, Vec<(&'static str, String)>, String);
type Handler = dyn Fn(&http::request::Parts, usize) -> Answer + Send + Sync;

/// An origin whose answers come from a closure; counts requests (not
/// health checks), remembers their heads, can be slowed, failed or killed.
struct Origin {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    delay_ms: Arc<AtomicU64>,
    fail: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<http::request::Parts>>>,
    stop: CancellationToken,
}

impl Origin {
    async fn start(
        handler: impl Fn(&http::request::Parts, usize) -> Answer + Send + Sync + 'static,
    ) -> Origin {
        let handler: Arc<Handler> = Arc::new(handler);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let fail = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (h, d, f, s, st) = (
            hits.clone(),
            delay_ms.clone(),
            fail.clone(),
            seen.clone(),
            stop.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = st.cancelled() => return,
                    a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                };
                let (h, d, f, s, st, handler) = (
                    h.clone(),
                    d.clone(),
                    f.clone(),
                    s.clone(),
                    st.clone(),
                    handler.clone(),
                );
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (h, d, f, s, handler) =
                            (h.clone(), d.clone(), f.clone(), s.clone(), handler.clone());
                        async move {
                            let (parts, _) = req.into_parts();
                            if parts.uri.path() == "/readyz" {
                                return Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())));
                            }
                            let n = h.fetch_add(1, Ordering::SeqCst) + 1;
                            let delay = d.load(Ordering::SeqCst);
                            if delay > 0 {
                                tokio::time::sleep(Duration::from_millis(delay)).await;
                            }
                            let (status, headers, body) = if f.load(Ordering::SeqCst) {
                                (500, vec![], "origin failed".to_string())
                            } else {
                                handler(&parts, n)
                            };
                            s.lock().unwrap().push(parts);
                            let mut r = Response::builder().status(status);
                            for (k, v) in headers {
                                r = r.header(k, v);
                            }
                            Ok(r.body(Full::new(Bytes::from(body))).unwrap())
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::select! { _ = st.cancelled() => {}, _ = conn => {} }
                });
            }
        });
        Origin {
            addr,
            hits,
            delay_ms,
            fail,
            seen,
            stop,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn last(&self) -> http::request::Parts {
        let seen = self.seen.lock().unwrap();
        let p = seen.last().expect("a request");
        let mut c = Request::new(()).into_parts().0;
        c.method = p.method.clone();
        c.uri = p.uri.clone();
        c.headers = p.headers.clone();
        c
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn h(k: &'static str, v: &str) -> (&'static str, String) {
    (k, v.to_string())
}

async fn gateway(origin: &Origin, extra: serde_json::Value) -> TestGateway {
    let mut overrides = serde_json::json!({
        "cache": { "enabled": true },
        "retries": 0,
    });
    for (k, v) in extra.as_object().unwrap() {
        overrides[k] = v.clone();
    }
    TestGateway::start(settings(&[origin.url()], overrides)).await
}

fn status_of(r: &common::Reply) -> String {
    r.headers
        .get("cache-status")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

async fn get_with(client: &TestClient, url: &str, headers: &[(&str, &str)]) -> common::Reply {
    let mut b = Request::get(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    client.send(b.body(Full::new(Bytes::new())).unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_misses_make_one_origin_request() {
    let origin = Origin::start(|_, n| {
        (
            200,
            vec![h("cache-control", "max-age=60")],
            format!("body {n}"),
        )
    })
    .await;
    origin.delay_ms.store(300, Ordering::SeqCst);
    let gw = gateway(&origin, serde_json::json!({})).await;
    let client = TestClient::default();
    let url = gw.url("/hot");
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move { client.get(&url).await })
        })
        .collect();
    let mut coalesced_or_hit = 0;
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.body, "body 1");
        if status_of(&r).contains("; hit") {
            coalesced_or_hit += 1;
        }
    }
    assert_eq!(origin.hits(), 1, "exactly one origin request");
    assert_eq!(coalesced_or_hit, 999);
}

#[tokio::test]
async fn a_fresh_response_is_served_with_age_and_cache_status() {
    let origin = Origin::start(|_, n| {
        (
            200,
            vec![h("cache-control", "max-age=60"), h("age", "10")],
            format!("v{n}"),
        )
    })
    .await;
    let gw = gateway(&origin, serde_json::json!({})).await;
    let client = TestClient::default();
    let first = client.get(&gw.url("/a?x=1")).await;
    assert_eq!(first.body, "v1");
    let s = status_of(&first);
    assert!(s.contains("fwd=uri-miss") && s.contains("stored"), "{s}");
    let second = client.get(&gw.url("/a?x=1")).await;
    assert_eq!(second.body, "v1");
    assert_eq!(origin.hits(), 1);
    let age: u64 = second.headers["age"].to_str().unwrap().parse().unwrap();
    assert!(age >= 10, "age {age}");
    let s = status_of(&second);
    assert!(s.starts_with("shoal; hit; ttl="), "{s}");
    // Another query string is another URL.
    let other = client.get(&gw.url("/a?x=2")).await;
    assert_eq!(other.body, "v2");
    // The metrics count it.
    let m = client.get_admin(&gw.url("/_gateway/metrics")).await;
    assert!(
        m.body.contains("shoal_gateway_cache_requests_total"),
        "{}",
        m.body
    );
    assert!(m.body.contains("shoal_gateway_cache_stored_bytes"));
}

#[tokio::test]
async fn vary_keeps_one_variant_per_header_value() {
    let origin = Origin::start(|p, _| {
        let lang = p
            .headers
            .get("accept-language")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default();
        let vary = if p.uri.path() == "/star" {
            "*"
        } else {
            "Accept-Language"
        };
        (
            200,
            vec![h("cache-control", "max-age=60"), h("vary", vary)],
            format!("lang={lang}"),
        )
    })
    .await;
    let gw = gateway(&origin, serde_json::json!({})).await;
    let c = TestClient::default();
    let url = gw.url("/page");
    assert_eq!(
        get_with(&c, &url, &[("accept-language", "en")]).await.body,
        "lang=en"
    );
    assert_eq!(
        get_with(&c, &url, &[("accept-language", "fr")]).await.body,
        "lang=fr"
    );
    let en = get_with(&c, &url, &[("accept-language", "en")]).await;
    assert_eq!(en.body, "lang=en");
    assert!(status_of(&en).contains("hit"));
    let fr = get_with(&c, &url, &[("accept-language", "fr")]).await;
    assert_eq!(fr.body, "lang=fr");
    assert_eq!(origin.hits(), 2);
    let de = get_with(&c, &url, &[("accept-language", "de")]).await;
    assert!(
        status_of(&de).contains("fwd=vary-miss"),
        "{}",
        status_of(&de)
    );
    assert_eq!(origin.hits(), 3);
    // Vary: * never matches.
    let star = gw.url("/star");
    c.get(&star).await;
    c.get(&star).await;
    assert_eq!(origin.hits(), 5);
}

#[tokio::test]
async fn no_store_private_authorization_and_cookies_are_not_stored() {
    let origin = Origin::start(|p, n| {
        let cc = match p.uri.path() {
            "/no-store" => "no-store",
            "/private" => "private, max-age=60",
            "/auth" => "max-age=60",
            "/auth-public" => "public, max-age=60",
            "/cookie" => "max-age=60",
            "/cookie-public" => "public, max-age=60",
            _ => "max-age=60",
        };
        let mut headers = vec![h("cache-control", cc)];
        if p.uri.path().starts_with("/cookie") {
            headers.push(h("set-cookie", "session=secret"));
        }
        (200, headers, format!("n{n}"))
    })
    .await;
    let gw = gateway(&origin, serde_json::json!({})).await;
    let c = TestClient::default();
    let auth = [("authorization", "Bearer t")];
    for (path, hdrs, stored) in [
        ("/no-store", &[][..], false),
        ("/private", &[][..], false),
        ("/auth", &auth[..], false),
        ("/auth-public", &auth[..], true),
        ("/cookie", &[][..], false),
        ("/cookie-public", &[][..], true),
    ] {
        let before = origin.hits();
        let first = get_with(&c, &gw.url(path), hdrs).await;
        let second = get_with(&c, &gw.url(path), hdrs).await;
        let origin_requests = origin.hits() - before;
        assert_eq!(origin_requests, if stored { 1 } else { 2 }, "{path}");
        assert!(
            !status_of(&first).is_empty(),
            "{path}: Cache-Status on a pass"
        );
        if path == "/cookie-public" {
            assert!(first.headers.contains_key("set-cookie"));
            assert!(
                !second.headers.contains_key("set-cookie"),
                "a stored cookie is never replayed"
            );
        }
    }
}

#[tokio::test]
async fn a_304_revalidates_and_merges_headers() {
    let origin = Origin::start(|p, n| {
        if p.headers.get("if-none-match").map(|v| v.as_bytes()) == Some(b"\"v1\"") {
            return (
                304,
                vec![
                    h("etag", "\"v1\""),
                    h("cache-control", "max-age=60"),
                    h("x-meta", "updated"),
                ],
                String::new(),
            );
        }
        (
            200,
            vec![
                h("etag", "\"v1\""),
                h("cache-control", "no-cache"),
                h("x-meta", "original"),
                h("x-kept", "yes"),
            ],
            format!("body{n}"),
        )
    })
    .await;
    let gw = gateway(&origin, serde_json::json!({})).await;
    let c = TestClient::default();
    let first = c.get(&gw.url("/doc")).await;
    assert_eq!(first.body, "body1");
    // no-cache: stored, but revalidated before reuse.
    let second = c.get(&gw.url("/doc")).await;
    assert_eq!(origin.hits(), 2);
    assert_eq!(origin.last().headers["if-none-match"], "\"v1\"");
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.body, "body1", "the stored body is served");
    assert_eq!(second.headers["x-meta"], "updated");
    assert_eq!(second.headers["x-kept"], "yes");
    assert_eq!(second.headers["cache-control"], "max-age=60");
    let s = status_of(&second);
    assert!(
        s.contains("fwd=stale") && s.contains("fwd-status=304"),
        "{s}"
    );
    // Fresh now (max-age=60 from the 304).
    let third = c.get(&gw.url("/doc")).await;
    assert_eq!(third.body, "body1");
    assert_eq!(origin.hits(), 2);
    assert!(status_of(&third).contains("hit"));
    // A client's own If-None-Match is answered from the cache.
    let cond = get_with(&c, &gw.url("/doc"), &[("if-none-match", "\"v1\"")]).await;
    assert_eq!(cond.status, StatusCode::NOT_MODIFIED);
    assert_eq!(origin.hits(), 2);
}

#[tokio::test]
async fn an_unsafe_request_invalidates_its_url_and_location() {
    let origin = Origin::start(|p, n| {
        if p.method == http::Method::POST {
            return (
                201,
                vec![
                    h("location", "/items/new"),
                    h("content-location", "/items/1"),
                ],
                String::new(),
            );
        }
        (200, vec![h("cache-control", "max-age=60")], format!("n{n}"))
    })
    .await;
    let gw = gateway(&origin, serde_json::json!({})).await;
    let c = TestClient::default();
    for p in ["/items", "/items/new", "/items/1", "/other"] {
        c.get(&gw.url(p)).await;
        c.get(&gw.url(p)).await;
    }
    assert_eq!(origin.hits(), 4);
    let post = c
        .send(
            Request::post(gw.url("/items"))
                .body(Full::new(Bytes::from("x")))
                .unwrap(),
        )
        .await;
    assert_eq!(post.status, StatusCode::CREATED);
    assert_eq!(origin.hits(), 5);
    for p in ["/items", "/items/new", "/items/1"] {
        let r = c.get(&gw.url(p)).await;
        assert!(!status_of(&r).contains("hit"), "{p} was invalidated");
    }
    assert_eq!(origin.hits(), 8);
    assert!(status_of(&c.get(&gw.url("/other")).await).contains("hit"));
    assert_eq!(origin.hits(), 8);
}

/// GETs `read` (the origin takes 300 ms), POSTs `write` while that GET
/// waits (answered at once), then GETs `read` again: the Cache-Status of
/// both GETs.
async fn get_across_a_write(read: &str, write: &str) -> (String, String) {
    let origin = Origin::start(|p, n| {
        if p.method == http::Method::POST {
            return (201, vec![], String::new());
        }
        (200, vec![h("cache-control", "max-age=60")], format!("n{n}"))
    })
    .await;
    let gw = gateway(&origin, serde_json::json!({})).await;
    origin.delay_ms.store(300, Ordering::SeqCst);
    let read = gw.url(read);
    let fetch = tokio::spawn({
        let (c, read) = (TestClient::default(), read.clone());
        async move { c.get(&read).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The GET already waits out its 300 ms; the POST is answered at once.
    origin.delay_ms.store(0, Ordering::SeqCst);
    let c = TestClient::default();
    let post = c
        .send(
            Request::post(gw.url(write))
                .body(Full::new(Bytes::from("x")))
                .unwrap(),
        )
        .await;
    assert_eq!(post.status, StatusCode::CREATED);
    let first = fetch.await.unwrap();
    let again = c.get(&read).await;
    (status_of(&first), status_of(&again))
}

/// A write to one URL must not keep a fetch of another URL, in flight at
/// the same time, from being stored (a global "something was written"
/// check did: on a site with steady writes little was ever stored).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_elsewhere_does_not_stop_an_answer_being_stored() {
    let (first, again) = get_across_a_write("/slow", "/other").await;
    assert!(first.contains("stored"), "{first}");
    assert!(again.contains("hit"), "{again}");
}

/// A write to the URL being fetched still keeps that answer out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_the_url_in_flight_keeps_its_answer_out() {
    let (first, again) = get_across_a_write("/item", "/item").await;
    assert!(!first.contains("stored"), "{first}");
    assert!(!again.contains("hit"), "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_answers_at_once_and_refreshes_once() {
    let origin = Origin::start(|_, n| {
        (
            200,
            vec![h("cache-control", "max-age=1, stale-while-revalidate=30")],
            format!("gen{n}"),
        )
    })
    .await;
    let gw = gateway(&origin, serde_json::json!({})).await;
    let c = TestClient::default();
    assert_eq!(c.get(&gw.url("/swr")).await.body, "gen1");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    origin.delay_ms.store(500, Ordering::SeqCst);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let c = c.clone();
            let url = gw.url("/swr");
            tokio::spawn(async move {
                let started = Instant::now();
                let r = c.get(&url).await;
                (started.elapsed(), r)
            })
        })
        .collect();
    for t in tasks {
        let (took, r) = t.await.unwrap();
        assert_eq!(r.body, "gen1");
        assert!(took < Duration::from_millis(100), "answered in {took:?}");
        assert!(
            status_of(&r).contains("stale-while-revalidate"),
            "{}",
            status_of(&r)
        );
    }
    // The one refresh lands within the origin's 500 ms.
    assert!(
        eventually(Duration::from_secs(3), || async {
            c.get(&gw.url("/swr")).await.body == "gen2"
        })
        .await
    );
    assert_eq!(origin.hits(), 2, "exactly one background refresh");
}

#[tokio::test]
async fn stale_if_error_serves_the_stored_copy_when_the_origin_fails() {
    let origin = Origin::start(|_, n| {
        (
            200,
            vec![h("cache-control", "max-age=1, stale-if-error=60")],
            format!("good{n}"),
        )
    })
    .await;
    let gw = gateway(&origin, serde_json::json!({})).await;
    let c = TestClient::default();
    assert_eq!(c.get(&gw.url("/sie")).await.body, "good1");
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    origin.fail.store(true, Ordering::SeqCst);
    let r = c.get(&gw.url("/sie")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, "good1");
    let s = status_of(&r);
    assert!(
        s.contains("fwd-status=500") && s.contains("stale-if-error"),
        "{s}"
    );
    // The origin is gone entirely.
    origin.stop.cancel();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = c.get(&gw.url("/sie")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, "good1");
    // Without stale-if-error, no stale copy on errors.
    let origin2 =
        Origin::start(|_, _| (200, vec![h("cache-control", "max-age=1")], "x".into())).await;
    let gw2 = gateway(&origin2, serde_json::json!({})).await;
    c.get(&gw2.url("/plain")).await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    origin2.fail.store(true, Ordering::SeqCst);
    assert_eq!(
        c.get(&gw2.url("/plain")).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
}

#[tokio::test]
async fn purge_by_url_and_tag_empties_both_gateways() {
    let origin = Origin::start(|p, n| {
        let tags = match p.uri.path() {
            "/p/1" => ("surrogate-key", "product:1 products"),
            "/p/2" => ("cache-tag", "product:2,products"),
            _ => ("x-none", ""),
        };
        (
            200,
            vec![h("cache-control", "max-age=600"), h(tags.0, tags.1)],
            format!("n{n}"),
        )
    })
    .await;
    let peer = gateway(&origin, serde_json::json!({})).await;
    let gw = gateway(
        &origin,
        serde_json::json!({ "cache": { "enabled": true, "purge_peers": [format!("http://{}", peer.addr)] } }),
    )
    .await;
    let c = TestClient::default();
    let warm = |g: &TestGateway| [g.url("/p/1"), g.url("/p/2"), g.url("/p/3")];
    for u in warm(&gw).iter().chain(warm(&peer).iter()) {
        c.get(u).await;
    }
    assert_eq!(origin.hits(), 6);
    let entries = |g: &TestGateway| {
        let c = c.clone();
        let url = g.url("/_gateway/cache");
        async move {
            let r = c.get_admin(&url).await;
            serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["entries"]
                .as_u64()
                .unwrap()
        }
    };
    assert_eq!(entries(&gw).await, 3);
    assert_eq!(entries(&peer).await, 3);

    let r = common::admin(
        &c,
        &gw,
        "purge",
        serde_json::json!({"tags": ["product:1"]}),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["peers"][0]["ok"], true, "{v}");
    for g in [&gw, &peer] {
        assert!(!status_of(&c.get(&g.url("/p/1")).await).contains("hit"));
        assert!(status_of(&c.get(&g.url("/p/2")).await).contains("hit"));
    }
    assert_eq!(origin.hits(), 8);

    // By URL: a path purges it on every host (here: both gateways); a
    // full URL names one host.
    common::admin(
        &c,
        &gw,
        "purge",
        serde_json::json!({"urls": ["/p/2"]}),
        None,
    )
    .await;
    common::admin(
        &c,
        &gw,
        "purge",
        serde_json::json!({"urls": [gw.url("/p/3")]}),
        None,
    )
    .await;
    assert!(!status_of(&c.get(&gw.url("/p/2")).await).contains("hit"));
    assert!(!status_of(&c.get(&peer.url("/p/2")).await).contains("hit"));
    assert!(!status_of(&c.get(&gw.url("/p/3")).await).contains("hit"));
    assert!(status_of(&c.get(&peer.url("/p/3")).await).contains("hit"));

    // Tags that cover everything empty the cache.
    common::admin(
        &c,
        &gw,
        "purge",
        serde_json::json!({"tags": ["products", "product:1"], "urls": ["/p/3"]}),
        None,
    )
    .await;
    assert_eq!(entries(&gw).await, 0);
    assert_eq!(entries(&peer).await, 0);

    // A relayed purge is not relayed again.
    let relayed = c
        .send(
            Request::post(gw.url("/_gateway/admin/purge"))
                .header("authorization", format!("Bearer {}", common::ADMIN_TOKEN))
                .header("x-shoal-purge-relayed", "1")
                .body(Full::new(Bytes::from(r#"{"tags":["x"]}"#)))
                .unwrap(),
        )
        .await;
    let v: serde_json::Value = serde_json::from_str(&relayed.body).unwrap();
    assert_eq!(v["peers"].as_array().unwrap().len(), 0);
    // Bad bodies are refused.
    let bad = common::admin(
        &c,
        &gw,
        "purge",
        serde_json::json!({"urls": ["nope"]}),
        None,
    )
    .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn purge_needs_the_admin_token_when_one_is_set() {
    let origin = Origin::start(|_, _| (200, vec![], String::new())).await;
    let gw = gateway(
        &origin,
        serde_json::json!({"admin_token": "another-admin-token-42"}),
    )
    .await;
    let c = TestClient::default();
    let r = common::admin(&c, &gw, "purge", serde_json::json!({"tags": ["a"]}), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    let r = common::admin(
        &c,
        &gw,
        "purge",
        serde_json::json!({"tags": ["a"]}),
        Some("another-admin-token-42"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn head_is_served_from_a_stored_get() {
    let origin = Origin::start(|_, n| {
        (
            200,
            vec![h("cache-control", "max-age=60")],
            format!("body-{n}"),
        )
    })
    .await;
    let gw = gateway(&origin, serde_json::json!({})).await;
    let c = TestClient::default();
    let head = |path: &str| {
        Request::head(gw.url(path))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    assert_eq!(c.get(&gw.url("/g")).await.body, "body-1");
    let r = c.send(head("/g")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, "");
    assert_eq!(r.headers["content-length"], "6");
    assert!(status_of(&r).contains("hit"));
    assert_eq!(origin.hits(), 1);
    // A HEAD miss fetches a GET, which a later GET reuses.
    let r = c.send(head("/h")).await;
    assert_eq!(r.body, "");
    assert_eq!(origin.last().method, http::Method::GET);
    assert_eq!(c.get(&gw.url("/h")).await.body, "body-2");
    assert_eq!(origin.hits(), 2);
}

#[tokio::test]
async fn targeted_cache_control_takes_precedence() {
    let origin = Origin::start(|p, n| {
        let headers = match p.uri.path() {
            "/cdn" => vec![
                h("cache-control", "no-store"),
                h("cdn-cache-control", "max-age=60"),
            ],
            "/shoal" => vec![
                h("cache-control", "max-age=60"),
                h("cdn-cache-control", "no-store"),
                h("shoal-cache-control", "max-age=60"),
            ],
            "/shoal-off" => vec![
                h("cache-control", "max-age=60"),
                h("shoal-cache-control", "no-store"),
            ],
            _ => vec![],
        };
        (200, headers, format!("n{n}"))
    })
    .await;
    let gw = gateway(&origin, serde_json::json!({})).await;
    let c = TestClient::default();
    c.get(&gw.url("/cdn")).await;
    let r = c.get(&gw.url("/cdn")).await;
    assert!(status_of(&r).contains("hit"));
    assert_eq!(
        r.headers["cache-control"], "no-store",
        "Cache-Control goes downstream unchanged"
    );
    assert_eq!(r.headers["cdn-cache-control"], "max-age=60");
    assert_eq!(origin.hits(), 1);

    let first = c.get(&gw.url("/shoal")).await;
    assert!(!first.headers.contains_key("shoal-cache-control"));
    let r = c.get(&gw.url("/shoal")).await;
    assert!(status_of(&r).contains("hit"));
    assert!(!r.headers.contains_key("shoal-cache-control"));
    assert_eq!(origin.hits(), 2);

    c.get(&gw.url("/shoal-off")).await;
    let r = c.get(&gw.url("/shoal-off")).await;
    assert!(!status_of(&r).contains("hit"));
    assert_eq!(origin.hits(), 4);
}

#[tokio::test]
async fn the_size_bound_evicts() {
    let origin = Origin::start(|_, _| {
        (
            200,
            vec![h("cache-control", "max-age=600")],
            "x".repeat(8 * 1024),
        )
    })
    .await;
    let gw = gateway(
        &origin,
        serde_json::json!({ "cache": { "enabled": true, "max_bytes": 65536, "max_object_bytes": 16384 } }),
    )
    .await;
    let c = TestClient::default();
    for i in 0..40 {
        for _ in 0..2 {
            c.get(&gw.url(&format!("/big/{i}"))).await;
        }
    }
    let stats: serde_json::Value =
        serde_json::from_str(&c.get_admin(&gw.url("/_gateway/cache")).await.body).unwrap();
    let bytes = stats["stored_bytes"].as_u64().unwrap();
    let entries = stats["entries"].as_u64().unwrap();
    assert!(bytes <= 65536, "{stats}");
    assert!(entries > 0 && entries < 40, "{stats}");
    let m = c.get_admin(&gw.url("/_gateway/metrics")).await;
    assert!(
        m.body.contains("shoal_gateway_cache_evictions_total"),
        "evictions are counted"
    );
    // Objects above max_object_bytes pass through.
    let origin2 = Origin::start(|_, _| {
        (
            200,
            vec![h("cache-control", "max-age=600")],
            "y".repeat(20 * 1024),
        )
    })
    .await;
    let gw2 = gateway(
        &origin2,
        serde_json::json!({ "cache": { "enabled": true, "max_bytes": 65536, "max_object_bytes": 16384 } }),
    )
    .await;
    let r = c.get(&gw2.url("/huge")).await;
    assert_eq!(r.body.len(), 20 * 1024);
    assert!(status_of(&r).contains("too-large"), "{}", status_of(&r));
    c.get(&gw2.url("/huge")).await;
    assert_eq!(origin2.hits(), 2);
}

#[tokio::test]
async fn caching_is_switched_per_route() {
    let origin =
        Origin::start(|_, n| (200, vec![h("cache-control", "max-age=60")], format!("n{n}"))).await;
    let gw = TestGateway::start(settings(
        &[origin.url()],
        serde_json::json!({
            "routes": [
                { "prefix": "/cached", "pool": "default", "cache": true },
                { "prefix": "/", "pool": "default" },
            ],
        }),
    ))
    .await;
    let c = TestClient::default();
    c.get(&gw.url("/cached/a")).await;
    let hit = c.get(&gw.url("/cached/a")).await;
    assert!(status_of(&hit).contains("hit"));
    let plain = c.get(&gw.url("/plain")).await;
    c.get(&gw.url("/plain")).await;
    assert!(!plain.headers.contains_key("cache-status"));
    assert_eq!(origin.hits(), 3);
}

#[tokio::test]
async fn the_cache_is_off_by_default() {
    let origin =
        Origin::start(|_, n| (200, vec![h("cache-control", "max-age=60")], format!("n{n}"))).await;
    let gw = TestGateway::start(settings(&[origin.url()], serde_json::json!({}))).await;
    let c = TestClient::default();
    let r = c.get(&gw.url("/x")).await;
    c.get(&gw.url("/x")).await;
    assert!(!r.headers.contains_key("cache-status"));
    assert_eq!(origin.hits(), 2);
}

#[tokio::test]
async fn bad_cache_settings_are_refused_with_their_key() {
    for (cache, key) in [
        (
            serde_json::json!({"purge_peers": ["10.0.0.2:8080"]}),
            "gateway.cache.purge_peers[0]",
        ),
        (
            serde_json::json!({"max_bytes": 100}),
            "gateway.cache.max_bytes",
        ),
        (
            serde_json::json!({"max_bytes": 4096, "max_object_bytes": 8192}),
            "gateway.cache.max_object_bytes",
        ),
    ] {
        let s = settings(
            &["http://127.0.0.1:1".into()],
            serde_json::json!({ "cache": cache }),
        );
        let err = shoal_gateway::Gateway::bind(s)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{err}");
    }
    let unknown = serde_json::from_value::<shoal_core::settings::GatewaySettings>(
        serde_json::json!({"cache": {"enabled": true, "sizee": 1}}),
    );
    assert!(unknown.is_err(), "unknown keys are refused");
}

/// A fresh stored response is not enough when the client asks for more:
/// `Cache-Control: no-cache`, `max-age=0` or `Pragma: no-cache` go to the
/// origin (the fast path for plain hits must not skip these).
#[tokio::test]
async fn request_directives_still_reach_the_origin_on_a_fresh_entry() {
    let origin =
        Origin::start(|_, n| (200, vec![h("cache-control", "max-age=60")], format!("v{n}"))).await;
    let gw = gateway(&origin, serde_json::json!({})).await;
    let client = TestClient::default();
    assert_eq!(client.get(&gw.url("/d")).await.body, "v1");
    assert_eq!(client.get(&gw.url("/d")).await.body, "v1", "a plain hit");
    assert_eq!(origin.hits(), 1);
    let mut expected_hits = 1;
    for directive in [
        ("cache-control", "no-cache"),
        ("cache-control", "max-age=0"),
        ("pragma", "no-cache"),
    ] {
        let r = get_with(&client, &gw.url("/d"), &[directive]).await;
        expected_hits += 1;
        assert_eq!(
            origin.hits(),
            expected_hits,
            "{directive:?} went to the origin"
        );
        assert_eq!(r.body, format!("v{expected_hits}"), "{directive:?}");
    }
}

#[tokio::test]
async fn a_purge_reaches_every_gateway_sharing_redis_without_a_peer_list() {
    let Some(redis) = common::redis_url("a_purge_reaches_every_gateway_sharing_redis") else {
        return;
    };
    let origin = Origin::start(|_, n| {
        (
            200,
            vec![h("cache-control", "max-age=600")],
            format!("n{n}"),
        )
    })
    .await;
    let prefix = format!("t_purge_{:x}", rand::random::<u64>());
    let shared = serde_json::json!({ "redis_url": redis, "redis_prefix": prefix });
    let a = gateway(&origin, shared.clone()).await;
    let b = gateway(&origin, shared.clone()).await;
    let elsewhere = gateway(
        &origin,
        serde_json::json!({ "redis_url": redis, "redis_prefix": format!("{prefix}_other") }),
    )
    .await;
    let c = TestClient::default();
    // The subscriptions are made in the background: wait until a purge
    // published by `a` is seen by `b` (a warmed entry disappears).
    for g in [&a, &b, &elsewhere] {
        c.get(&g.url("/p")).await;
        assert!(status_of(&c.get(&g.url("/p")).await).contains("hit"));
    }
    let purged_on_b = eventually(Duration::from_secs(5), || async {
        let r = common::admin(&c, &a, "purge", serde_json::json!({"urls": ["/p"]}), None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["published"]["ok"], true, "{v}");
        assert_eq!(v["peers"].as_array().unwrap().len(), 0, "no peer list: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let missed = !status_of(&c.get(&b.url("/p")).await).contains("hit");
        missed
    })
    .await;
    assert!(purged_on_b, "a purge on gateway a empties gateway b");
    // By tag too, and only among gateways of the same prefix.
    let tagged = Origin::start(|_, n| {
        (
            200,
            vec![
                h("cache-control", "max-age=600"),
                h("surrogate-key", "product:7"),
            ],
            format!("t{n}"),
        )
    })
    .await;
    let a2 = gateway(&tagged, shared.clone()).await;
    let b2 = gateway(&tagged, shared).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for g in [&a2, &b2] {
        c.get(&g.url("/t")).await;
        assert!(status_of(&c.get(&g.url("/t")).await).contains("hit"));
    }
    assert!(
        status_of(&c.get(&elsewhere.url("/p")).await).contains("hit"),
        "another prefix is another set of gateways"
    );
    let r = common::admin(
        &c,
        &b2,
        "purge",
        serde_json::json!({"tags": ["product:7"]}),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(
        eventually(Duration::from_secs(2), || async {
            !status_of(&c.get(&a2.url("/t")).await).contains("hit")
        })
        .await,
        "the tag purge on b2 reached a2"
    );
    assert!(status_of(&c.get(&elsewhere.url("/p")).await).contains("hit"));
}

#[tokio::test]
async fn a_purge_peer_named_by_a_host_name_gets_the_purge_at_each_address() {
    let origin = Origin::start(|_, n| {
        (
            200,
            vec![h("cache-control", "max-age=600")],
            format!("n{n}"),
        )
    })
    .await;
    // Dual-stack where the machine has IPv6: `localhost` may resolve to
    // 127.0.0.1 and ::1, both of which reach this peer.
    let peer = match tokio::net::TcpListener::bind("[::]:0").await {
        Ok(l) => {
            drop(l);
            gateway(&origin, serde_json::json!({ "listen": "[::]:0" })).await
        }
        Err(_) => gateway(&origin, serde_json::json!({})).await,
    };
    let gw = gateway(
        &origin,
        serde_json::json!({ "cache": { "enabled": true, "purge_peers": [format!("http://localhost:{}", peer.addr.port())] } }),
    )
    .await;
    let c = TestClient::default();
    let peer_url = format!("http://127.0.0.1:{}/p", peer.addr.port());
    c.get(&peer_url).await;
    assert!(status_of(&c.get(&peer_url).await).contains("hit"));
    let r = common::admin(&c, &gw, "purge", serde_json::json!({"urls": ["/p"]}), None).await;
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let peers = v["peers"].as_array().unwrap();
    assert!(!peers.is_empty(), "{v}");
    for p in peers {
        assert!(
            !p["peer"].as_str().unwrap().contains("localhost"),
            "sent to an address: {v}"
        );
        assert_eq!(p["ok"], true, "{v}");
    }
    assert!(!status_of(&c.get(&peer_url).await).contains("hit"));
}
