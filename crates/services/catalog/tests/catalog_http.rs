//! The catalog service over HTTP, on real listeners (port 0) with fresh
//! databases: the contract on SQLite and on PostgreSQL with Redis (L2,
//! sessions, bus); single flight under 1,000 concurrent requests; a write
//! on one instance seen on another within 100 ms; a dead Redis; ETag/304;
//! logout seen by another instance's session cache within 100 ms; the
//! HTTP purge hook; seeding.

use async_trait::async_trait;
use serde_json::{json, Value};
use shoal_catalog::{Catalog, HttpPurger, PurgeError, Purger};
use shoal_core::settings::{BusBackend, DatabaseBackend, SessionBackend};
use shoal_core::Settings;
use shoal_runtime::testing::TestApp;
use shoal_testkit as kit;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ADMIN: &str = "admin-user-1";

fn settings(dir: &kit::TempDir) -> Settings {
    let mut s = Settings {
        data_dir: dir.path().to_path_buf(),
        ..Settings::default()
    };
    s.serve.listen = "127.0.0.1:0".parse().unwrap();
    s.catalog.admin_user_ids = vec![ADMIN.into()];
    s.cache.early_refresh_beta = 0.0;
    s.metrics.token = Some(METRICS_TOKEN.into());
    s
}

const METRICS_TOKEN: &str = "catalog-metrics-token-0123";

async fn start(settings: Settings, catalog: Catalog) -> TestApp {
    TestApp::builder()
        .from_settings(settings)
        .module(catalog)
        .start()
        .await
}

/// A session cookie for `user_id`, made in the store directly.
async fn cookie(app: &TestApp, user_id: &str) -> String {
    app.session_for(user_id).await.cookie
}

#[derive(Debug, Default)]
struct RecordingPurger(Mutex<Vec<Vec<String>>>);

#[async_trait]
impl Purger for RecordingPurger {
    async fn purge(&self, tags: &[String]) -> Result<(), PurgeError> {
        self.0.lock().unwrap().push(tags.to_vec());
        Ok(())
    }
}

fn widget(sku: &str) -> Value {
    json!({
        "sku": sku, "name": "Blue Widget", "description": "A widget, blue, 50% off",
        "price_cents": 1999, "currency": "usd", "stock": 7,
        "image_url": "https://img.example.com/w.jpg", "tags": ["Sale", "new"]
    })
}

fn fields(p: &Value) -> Vec<String> {
    p["errors"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| e["field"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// The whole catalog contract; panics on the first broken rule.
async fn catalog_suite(app: &TestApp, purges: &RecordingPurger) {
    let http = kit::http_client();
    let admin = cookie(app, ADMIN).await;
    let user = cookie(app, "someone-else").await;
    let products = app.url("/api/catalog/products");

    // writes need a session, and an admin's
    kit::problem(
        http.post(&products)
            .json(&widget("W-1"))
            .send()
            .await
            .unwrap(),
        401,
    )
    .await;
    let resp = http
        .post(&products)
        .header("cookie", &user)
        .json(&widget("W-1"))
        .send()
        .await
        .unwrap();
    kit::problem(resp, 403).await;

    // bad input: 422 naming every bad field, nothing stored
    let resp = http
        .post(&products)
        .header("cookie", &admin)
        .json(
            &json!({"sku": "bad sku!", "name": "", "price_cents": -1, "currency": "dollars",
                      "stock": -3, "image_url": "ftp://x", "tags": [""]}),
        )
        .send()
        .await
        .unwrap();
    let p = kit::problem(resp, 422).await;
    assert_eq!(
        fields(&p),
        vec![
            "sku",
            "name",
            "price_cents",
            "currency",
            "stock",
            "image_url",
            "tags[0]"
        ]
    );
    let resp = http
        .post(&products)
        .header("cookie", &admin)
        .json(&json!({"sku": "W-2", "name": "x", "currency": "USD"}))
        .send()
        .await
        .unwrap();
    assert_eq!(fields(&kit::problem(resp, 422).await), vec!["price_cents"]);

    // create
    let resp = http
        .post(&products)
        .header("cookie", &admin)
        .json(&widget("W-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let created: Value = resp.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["currency"], "USD");
    assert_eq!(created["tags"], json!(["sale", "new"]));
    let tags = vec![format!("product:{id}"), "products".to_string()];
    assert_eq!(
        purges.0.lock().unwrap().last(),
        Some(&tags),
        "purge hook called"
    );

    // a taken sku is 409
    let resp = http
        .post(&products)
        .header("cookie", &admin)
        .json(&widget("W-1"))
        .send()
        .await
        .unwrap();
    assert_eq!(fields(&kit::problem(resp, 409).await), vec!["sku"]);

    // read: CDN headers, ETag, 304
    let one = app.url(&format!("/api/catalog/products/{id}"));
    let resp = http.get(&one).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    let cc = h["cache-control"].to_str().unwrap();
    assert!(
        cc.starts_with("public, max-age=")
            && cc.contains("s-maxage=")
            && cc.contains("stale-while-revalidate="),
        "{cc}"
    );
    assert_eq!(
        h["surrogate-key"].to_str().unwrap(),
        format!("product:{id}")
    );
    assert_eq!(h["cache-tag"].to_str().unwrap(), format!("product:{id}"));
    let etag = h["etag"].to_str().unwrap().to_string();
    assert!(
        etag.starts_with('"') && !etag.starts_with("W/"),
        "strong: {etag}"
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body, created);
    let resp = http
        .get(&one)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 304);
    assert_eq!(resp.headers()["etag"].to_str().unwrap(), etag);
    assert!(resp.bytes().await.unwrap().is_empty());
    let resp = http
        .get(&one)
        .header("if-none-match", "\"something-else\"")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    // unknown id is 404, twice (the second from the negative cache)
    for _ in 0..2 {
        let p = kit::problem(
            http.get(app.url("/api/catalog/products/nope"))
                .send()
                .await
                .unwrap(),
            404,
        )
        .await;
        assert!(p["detail"].as_str().unwrap().contains("nope"));
    }

    // list and search; bad paging is 422 naming the parameter
    for i in 2..=4 {
        let mut w = widget(&format!("W-{i}"));
        w["name"] = json!(format!("Red Lamp {i}"));
        w["description"] = json!("A lamp");
        let resp = http
            .post(&products)
            .header("cookie", &admin)
            .json(&w)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
    }
    let page: Value = http
        .get(format!("{products}?page=1&per_page=2"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["total"], 4);
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    let resp = http.get(format!("{products}?q=LAMP")).send().await.unwrap();
    assert_eq!(resp.headers()["surrogate-key"], "products");
    let found: Value = resp.json().await.unwrap();
    assert_eq!(found["total"], 3, "search is case-insensitive");
    let found: Value = http
        .get(format!("{products}?q=50%25"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(found["total"], 1, "% is matched literally");
    let p = kit::problem(
        http.get(format!("{products}?per_page=101&page=x"))
            .send()
            .await
            .unwrap(),
        422,
    )
    .await;
    assert_eq!(fields(&p), vec!["page", "per_page"]);

    // replace: the next read (same instance) has the new data and ETag,
    // and lists are fresh too
    let mut changed = widget("W-1");
    changed["name"] = json!("Green Widget");
    let resp = http
        .put(&one)
        .header("cookie", &admin)
        .json(&changed)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["cache-control"], "no-store");
    let resp = http.get(&one).send().await.unwrap();
    assert_ne!(resp.headers()["etag"].to_str().unwrap(), etag);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["name"], "Green Widget");
    let found: Value = http
        .get(format!("{products}?q=green"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(found["total"], 1);
    let resp = http
        .put(app.url("/api/catalog/products/nope"))
        .header("cookie", &admin)
        .json(&widget("W-9"))
        .send()
        .await
        .unwrap();
    kit::problem(resp, 404).await;

    // delete
    let resp = http
        .delete(&one)
        .header("cookie", &admin)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    kit::problem(http.get(&one).send().await.unwrap(), 404).await;
    let resp = http
        .delete(&one)
        .header("cookie", &admin)
        .send()
        .await
        .unwrap();
    kit::problem(resp, 404).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_catalog_http_contract() {
    let dir = kit::TempDir::new("catalog");
    let purges = Arc::new(RecordingPurger::default());
    let app = start(settings(&dir), Catalog::with_purger(purges.clone())).await;
    catalog_suite(&app, &purges).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_redis_catalog_http_contract() {
    let Some(server) = kit::postgres_url("postgres_redis_catalog_http_contract") else {
        return;
    };
    let Some(redis) = kit::redis_url("postgres_redis_catalog_http_contract") else {
        return;
    };
    let dir = kit::TempDir::new("catalog-pg");
    let mut s = settings(&dir);
    s.database.backend = DatabaseBackend::Postgres;
    s.database.url = Some(kit::fresh_postgres_database(&server).await);
    s.sessions.backend = SessionBackend::Redis;
    s.sessions.redis_url = Some(redis.clone());
    s.sessions.redis_prefix = kit::unique_name();
    s.cache.l2_redis_url = Some(redis.clone());
    s.cache.bus = BusBackend::Redis;
    s.cache.bus_redis_url = Some(redis);
    s.cache.redis_prefix = kit::unique_name();
    let purges = Arc::new(RecordingPurger::default());
    let app = start(s, Catalog::with_purger(purges.clone())).await;
    catalog_suite(&app, &purges).await;
}

async fn create(app: &TestApp, sku: &str) -> String {
    let resp = kit::http_client()
        .post(app.url("/api/catalog/products"))
        .header("cookie", cookie(app, ADMIN).await)
        .json(&widget(sku))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let v: Value = resp.json().await.unwrap();
    v["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_requests_for_one_product_query_the_database_once() {
    let dir = kit::TempDir::new("catalog-flight");
    let catalog = Catalog::default();
    let reads = catalog.db_reads();
    let app = start(settings(&dir), catalog).await;
    let id = create(&app, "HOT-1").await;
    assert_eq!(reads.load(Ordering::SeqCst), 0);
    let http = kit::http_client();
    let url = app.url(&format!("/api/catalog/products/{id}"));
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let http = http.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            http.get(&url).send().await.unwrap().status().as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(reads.load(Ordering::SeqCst), 1, "exactly one database read");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_instance_a_is_served_by_instance_b_within_100ms() {
    let dir = kit::TempDir::new("catalog-ab");
    let a = start(settings(&dir), Catalog::default()).await;
    let b = start(settings(&dir), Catalog::default()).await;
    let http = kit::http_client();
    let id = create(&a, "AB-1").await;
    let on_b = b.url(&format!("/api/catalog/products/{id}"));
    let list_b = b.url("/api/catalog/products?q=widget");
    let v: Value = http.get(&on_b).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["name"], "Blue Widget");
    let l: Value = http
        .get(&list_b)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(l["items"][0]["name"], "Blue Widget");
    let mut changed = widget("AB-1");
    changed["name"] = json!("Renamed Widget");
    let resp = http
        .put(a.url(&format!("/api/catalog/products/{id}")))
        .header("cookie", cookie(&a, ADMIN).await)
        .json(&changed)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let written = Instant::now();
    loop {
        let v: Value = http.get(&on_b).send().await.unwrap().json().await.unwrap();
        let l: Value = http
            .get(&list_b)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["name"] == "Renamed Widget" && l["items"][0]["name"] == "Renamed Widget" {
            break;
        }
        assert!(
            written.elapsed() < Duration::from_millis(100),
            "B still serves old data after {:?}",
            written.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("B served the new data after {:?}", written.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_survive_an_unreachable_redis() {
    // Install the metrics recorder before anything counts.
    shoal_core::telemetry::prometheus();
    let dir = kit::TempDir::new("catalog-noredis");
    let mut s = settings(&dir);
    s.cache.l2_redis_url = Some("redis://127.0.0.1:1".into());
    let catalog = Catalog::default();
    let reads = catalog.db_reads();
    let app = start(s, catalog).await;
    let id = create(&app, "NR-1").await;
    let http = kit::http_client();
    let started = Instant::now();
    for _ in 0..5 {
        let resp = http
            .get(app.url(&format!("/api/catalog/products/{id}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let resp = http
            .get(app.url("/api/catalog/products"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(reads.load(Ordering::SeqCst), 2, "L1 still works");
    let metrics = http
        .get(app.url("/metrics"))
        .bearer_auth(METRICS_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("shoal_cache_errors_total") && l.contains("l2")),
        "L2 errors are counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logout_on_instance_a_is_refused_on_instance_b_within_100ms() {
    let dir = kit::TempDir::new("catalog-logout");
    let mut s = settings(&dir);
    s.cache.session_ttl_ms = 30_000;
    let start = |s: Settings| {
        TestApp::builder()
            .from_settings(s)
            .module(shoal_accounts::Accounts)
            .module(Catalog::default())
            .start()
    };
    let a = start(s.clone()).await;
    let b = start(s).await;
    // No cookie jar: the old cookie is replayed by hand after logout.
    let http = reqwest::Client::new();
    let resp = http
        .post(a.url("/api/accounts/signup"))
        .json(&json!({"email": "ada@example.com", "password": "correct horse"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    for path in ["/api/accounts/logout", "/api/accounts/logout-all"] {
        let resp = http
            .post(a.url("/api/accounts/login"))
            .json(&json!({"email": "ada@example.com", "password": "correct horse"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let cookie = kit::session_cookie(&resp);
        let me_on_b = || {
            http.get(b.url("/api/accounts/me"))
                .header("cookie", &cookie)
                .send()
        };
        // B reads the session once, then serves it from its cache
        for _ in 0..2 {
            assert_eq!(me_on_b().await.unwrap().status(), 200);
        }
        let resp = http
            .post(a.url(path))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "{path}: {}", resp.status());
        let ended = Instant::now();
        loop {
            let status = me_on_b().await.unwrap().status();
            if status == 401 {
                break;
            }
            assert_eq!(status, 200);
            assert!(
                ended.elapsed() < Duration::from_millis(100),
                "{path}: B still accepts the session after {:?}",
                ended.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        println!("{path}: B refused the session after {:?}", ended.elapsed());
    }
}

#[tokio::test]
async fn http_purger_posts_the_tags_to_every_url() {
    use axum::routing::post;
    let seen = Arc::new(Mutex::new(Vec::<(Option<String>, Value)>::new()));
    let record = seen.clone();
    let router = axum::Router::new().route(
        "/_gateway/admin/purge",
        post(
            move |headers: axum::http::HeaderMap, body: axum::Json<Value>| {
                let record = record.clone();
                async move {
                    let auth = headers
                        .get("authorization")
                        .map(|v| v.to_str().unwrap().to_string());
                    record.lock().unwrap().push((auth, body.0));
                    "ok"
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let url = format!("http://{addr}/_gateway/admin/purge");
    let purger = HttpPurger::new(
        vec![url.clone(), url],
        Some("secret".into()),
        Duration::from_secs(2),
    );
    purger
        .purge(&["product:1".into(), "products".into()])
        .await
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].0.as_deref(), Some("Bearer secret"));
    assert_eq!(seen[0].1, json!({"tags": ["product:1", "products"]}));
    let dead = HttpPurger::new(
        vec!["http://127.0.0.1:1/purge".into()],
        None,
        Duration::from_millis(500),
    );
    assert!(dead.purge(&["x".into()]).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_loads_many_products_quickly_on_sqlite() {
    let dir = kit::TempDir::new("catalog-seed");
    let db =
        shoal_backends::Database::connect(&kit::sqlite_url(dir.path()), 4, Duration::from_secs(5))
            .await
            .unwrap();
    let calls = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    shoal_catalog::seed(&db, 100_000, |n| {
        calls.fetch_add(1, Ordering::SeqCst);
        assert!(n <= 100_000);
    })
    .await
    .unwrap();
    let took = started.elapsed();
    println!("seeded 100000 products in {took:?}");
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM products")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(n, 100_000);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        10,
        "progress after each transaction"
    );
    let (skus,): (i64,) = sqlx::query_as("SELECT COUNT(DISTINCT sku) FROM products")
        .fetch_one(db.pool())
        .await
        .unwrap();
    assert_eq!(skus, 100_000);
    // a second run adds more without clashing
    shoal_catalog::seed(&db, 10, |_| {}).await.unwrap();
    assert!(took < Duration::from_secs(60), "took {took:?}");
}

/// An instance's routes are reachable through the gateway, so its
/// `/metrics` answers only a request that carries `metrics.token`: 401
/// without it or with another, 403 for everyone while none is set.
#[tokio::test]
async fn an_instance_serves_metrics_only_with_the_token() {
    let dir = kit::TempDir::new("catalog-metrics");
    let app = start(settings(&dir), Catalog::default()).await;
    let http = kit::http_client();
    let get = |token: Option<&str>| {
        let mut r = http.get(app.url("/metrics"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    let r = get(None).await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert_eq!(
        get(Some("catalog-metrics-token-012"))
            .await
            .unwrap()
            .status(),
        401
    );
    // A method of the client's own invention is counted as OTHER: clients
    // cannot mint label values.
    let brew = reqwest::Method::from_bytes(b"BREWCOFFEE").unwrap();
    let r = http
        .request(brew, app.url("/api/catalog/products"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    let r = get(Some(METRICS_TOKEN)).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = r.text().await.unwrap();
    assert!(!text.contains("BREWCOFFEE"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("shoal_http_requests_total{")
                && l.contains(r#"method="OTHER""#)
                && l.contains(r#"status="405""#)),
        "{text}"
    );

    let dir = kit::TempDir::new("catalog-metrics-off");
    let mut off = settings(&dir);
    off.metrics.token = None;
    let app = start(off, Catalog::default()).await;
    let r = http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("metrics.token"));
}

/// The value of a counter in an instance's `/metrics` (0 when absent).
async fn counter(app: &TestApp, line_start: &str) -> u64 {
    let text = kit::http_client()
        .get(app.url("/metrics"))
        .bearer_auth(METRICS_TOKEN)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

#[tokio::test]
async fn small_responses_go_uncompressed_and_large_ones_are_compressed_once() {
    use std::io::Read;
    let dir = kit::TempDir::new("catalog-compression");
    let app = start(settings(&dir), Catalog::default()).await;
    let http = kit::http_client();
    let browser = "gzip, deflate, br, zstd";
    let id = create(&app, "C-0").await;
    for i in 1..12 {
        create(&app, &format!("C-{i}")).await;
    }

    // A product (~400 bytes): under the 1 KiB threshold, as it is.
    let r = http
        .get(app.url(&format!("/api/catalog/products/{id}")))
        .header("accept-encoding", browser)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().get("content-encoding").is_none(),
        "{:?}",
        r.headers()
    );
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    assert!(etag.starts_with('"'), "a strong ETag: {etag}");
    let small: Value = r.json().await.unwrap();
    assert_eq!(small["id"], id);

    // A list page (over 1 KiB): brotli, a weak ETag, and the same JSON.
    let page = app.url("/api/catalog/products?per_page=12");
    let plain = http.get(&page).send().await.unwrap();
    assert!(plain.headers().get("content-encoding").is_none());
    assert!(plain.headers()["vary"]
        .to_str()
        .unwrap()
        .contains("accept-encoding"));
    let plain_etag = plain.headers()["etag"].to_str().unwrap().to_string();
    let plain_body = plain.bytes().await.unwrap();
    assert!(plain_body.len() > 1024, "{} bytes", plain_body.len());

    let compressions = r#"shoal_compressions_total{encoding="br"}"#;
    let hits = "shoal_compression_cache_hits_total";
    let (c0, h0) = (counter(&app, compressions).await, counter(&app, hits).await);
    for round in 0..5 {
        let r = http
            .get(&page)
            .header("accept-encoding", browser)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-encoding"], "br");
        assert_eq!(
            r.headers()["etag"].to_str().unwrap(),
            format!("W/{plain_etag}")
        );
        let length: usize = r.headers()["content-length"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let body = r.bytes().await.unwrap();
        assert_eq!(body.len(), length);
        assert!(
            body.len() < plain_body.len() / 2,
            "round {round}: {} bytes",
            body.len()
        );
        let mut decoded = Vec::new();
        brotli::Decompressor::new(&body[..], 4096)
            .read_to_end(&mut decoded)
            .unwrap();
        assert_eq!(decoded, plain_body, "round {round}");
    }
    assert_eq!(counter(&app, compressions).await, c0 + 1, "compressed once");
    assert_eq!(counter(&app, hits).await, h0 + 4, "then served from memory");

    // gzip for a client without brotli; a 304 for the weak ETag.
    let r = http
        .get(&page)
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-encoding"], "gzip");
    let gz = r.bytes().await.unwrap();
    let mut decoded = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut decoded)
        .unwrap();
    assert_eq!(decoded, plain_body);
    let r = http
        .get(&page)
        .header("accept-encoding", browser)
        .header("if-none-match", format!("W/{plain_etag}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);

    // A write changes the page: its new ETag gets a fresh compression.
    create(&app, "C-12").await;
    let r = http
        .get(app.url("/api/catalog/products?per_page=13"))
        .header("accept-encoding", browser)
        .send()
        .await
        .unwrap();
    let body = r.bytes().await.unwrap();
    let mut decoded = Vec::new();
    brotli::Decompressor::new(&body[..], 4096)
        .read_to_end(&mut decoded)
        .unwrap();
    let listed: Value = serde_json::from_slice(&decoded).unwrap();
    assert_eq!(listed["items"].as_array().unwrap().len(), 13);
}
