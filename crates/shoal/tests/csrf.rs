//! The security review's eighth finding: CSRF rested on `SameSite=Lax`
//! alone (a `text/plain` upload and `logout-all` with a foreign `Origin`
//! were accepted; the WebSocket endpoint took any `Origin`). Every unsafe
//! route of every service, with the session cookie and a foreign origin
//! (by `Origin` or by `Sec-Fetch-Site`), is now refused with 403 and
//! changes nothing; the same requests from the site itself, or from a
//! client that is no browser (no `Origin`), pass the check.

use serde_json::{json, Value};
use shoal_core::Settings;
use shoal_runtime::{Application, ServiceModule};
use shoal_testkit as kit;
use tokio_util::sync::CancellationToken;

fn modules() -> Vec<Box<dyn ServiceModule>> {
    vec![
        Box::new(shoal_accounts::Accounts),
        Box::new(shoal_catalog::Catalog::default()),
        Box::new(shoal_media::Media),
        Box::new(shoal_orders::Orders::default()),
        Box::new(shoal_payments::Payments),
        Box::new(shoal_notifications::Notifications),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_carrying_requests_from_another_site_are_refused() {
    let dir = kit::TempDir::new("csrf");
    let mut settings = Settings {
        data_dir: dir.path().to_path_buf(),
        ..Settings::default()
    };
    settings.serve.listen = "127.0.0.1:0".parse().unwrap();
    settings.serve.allowed_origins = vec!["https://app.example.com".into()];
    let app = Application::build(settings, modules()).await.unwrap();
    let addr = app.local_addr();
    let base = format!("http://{addr}");
    let stop = CancellationToken::new();
    tokio::spawn(app.run(stop.clone()));
    let (cookie, _) = kit::sign_up_and_log_in(&base, "ada@example.com").await;
    let http = reqwest::Client::new();
    let id = shoal_core::ids::new_id();
    // (method, path, content type, body): every route that changes
    // something for a logged-in user.
    let routes: Vec<(&str, String, &str, String)> = vec![
        (
            "POST",
            "/api/accounts/logout".into(),
            "application/json",
            "{}".into(),
        ),
        (
            "POST",
            "/api/accounts/logout-all".into(),
            "application/json",
            "{}".into(),
        ),
        (
            "POST",
            "/api/media/uploads".into(),
            "text/plain",
            "not an attack".into(),
        ),
        (
            "POST",
            "/api/orders".into(),
            "application/json",
            json!({"items": [{"product_id": id, "quantity": 1}]}).to_string(),
        ),
        (
            "POST",
            "/api/notifications/test".into(),
            "application/json",
            "{}".into(),
        ),
        (
            "POST",
            "/api/notifications/webhooks".into(),
            "application/json",
            json!({"url": "https://hooks.example.com/x", "events": ["order.paid"]}).to_string(),
        ),
        (
            "DELETE",
            format!("/api/notifications/webhooks/{id}"),
            "application/json",
            String::new(),
        ),
        (
            "POST",
            format!("/api/notifications/webhooks/{id}/enable"),
            "application/json",
            "{}".into(),
        ),
        (
            "POST",
            "/api/catalog/products".into(),
            "application/json",
            json!({"sku": "x", "name": "x", "price_cents": 1}).to_string(),
        ),
        (
            "PUT",
            format!("/api/catalog/products/{id}"),
            "application/json",
            "{}".into(),
        ),
        (
            "DELETE",
            format!("/api/catalog/products/{id}"),
            "application/json",
            String::new(),
        ),
    ];
    let send = |method: &str, path: &str, ctype: &str, body: &str, from: &[(&str, &str)]| {
        let mut r = http
            .request(method.parse().unwrap(), format!("{base}{path}"))
            .header("cookie", &cookie)
            .header("content-type", ctype)
            .header("idempotency-key", "csrf-test")
            .body(body.to_string());
        for (k, v) in from {
            r = r.header(*k, *v);
        }
        r.send()
    };
    let foreign: [&[(&str, &str)]; 4] = [
        &[("origin", "https://evil.example")],
        &[("origin", "null")],
        &[
            ("sec-fetch-site", "cross-site"),
            ("origin", "https://evil.example"),
        ],
        &[("sec-fetch-site", "same-site")],
    ];
    for (method, path, ctype, body) in &routes {
        for from in foreign {
            let r = send(method, path, ctype, body, from).await.unwrap();
            assert_eq!(r.status(), 403, "{method} {path} from {from:?}");
            let p: Value = r.json().await.unwrap();
            assert!(p["detail"].as_str().unwrap().contains("this site"), "{p}");
        }
        // From the site itself, an allowed origin, or no browser at all:
        // not refused by the check (the route then answers as it will).
        let own = format!("http://{addr}");
        // Behind a proxy that ends TLS the page's origin is https while
        // the instance sees plain HTTP: the host decides, not the scheme.
        let own_tls = format!("https://{addr}");
        for from in [
            &[("origin", own.as_str())][..],
            &[("origin", own_tls.as_str())],
            &[("sec-fetch-site", "same-origin"), ("origin", own.as_str())],
            &[("origin", "https://app.example.com")],
        ] {
            let r = send(method, path, ctype, body, from).await.unwrap();
            let status = r.status();
            let text = r.text().await.unwrap();
            assert!(
                !(status == 403 && text.contains("this site")),
                "{method} {path} from {from:?} was refused: {text}"
            );
        }
        if *path == "/api/accounts/logout" || *path == "/api/accounts/logout-all" {
            continue;
        }
        let r = send(method, path, ctype, body, &[]).await.unwrap();
        assert!(
            !(r.status() == 403 && r.text().await.unwrap().contains("this site")),
            "{method} {path} without Origin was refused"
        );
    }

    // What the refused requests asked for did not happen: forged logouts
    // from a foreign site end no session.
    let (cookie, _) = kit::sign_up_and_log_in(&base, "grace@example.com").await;
    let evil = |path: &'static str| {
        http.post(format!("{base}{path}"))
            .header("cookie", &cookie)
            .header("origin", "https://evil.example")
            .header("content-type", "application/json")
            .body("{}")
            .send()
    };
    assert_eq!(
        evil("/api/accounts/logout-all").await.unwrap().status(),
        403
    );
    assert_eq!(evil("/api/accounts/logout").await.unwrap().status(), 403);
    let me = http
        .get(format!("{base}/api/accounts/me"))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200, "the session survived the forged logouts");

    // A WebSocket opened from another site with the cookie: refused before
    // the upgrade.
    let ws = |origin: &str| {
        http.get(format!("{base}/api/notifications/ws"))
            .header("cookie", &cookie)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("origin", origin.to_string())
            .send()
    };
    assert_eq!(ws("https://evil.example").await.unwrap().status(), 403);
    assert_ne!(ws(&format!("http://{addr}")).await.unwrap().status(), 403);
    stop.cancel();
}
