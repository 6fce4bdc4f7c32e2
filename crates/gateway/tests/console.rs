//! The console under `/_shoal/`: nothing without a login, the login and
//! its cookie, the live feed (history, then a snapshot a second, with the
//! pools and the traffic), instance actions, the redirect of a browser's
//! `/`, and queue requests passed to a worker with the admin token.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use std::time::Duration;

fn console_request(
    method: &str,
    url: &str,
    cookie: Option<&str>,
    body: Option<Value>,
) -> Request<Full<Bytes>> {
    let mut b = Request::builder().method(method).uri(url);
    if let Some(c) = cookie {
        b = b.header("cookie", c);
    }
    if body.is_some() {
        b = b
            .header("content-type", "application/json")
            .header("x-shoal-console", "1");
    }
    b.body(Full::new(Bytes::from(
        body.map(|b| b.to_string()).unwrap_or_default(),
    )))
    .unwrap()
}

/// Logs in and returns the cookie (`name=value`).
async fn log_in(client: &TestClient, gw: &TestGateway) -> String {
    let r = client
        .send(console_request(
            "POST",
            &gw.url("/_shoal/api/login"),
            None,
            Some(json!({"token": ADMIN_TOKEN})),
        ))
        .await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.body);
    let set = r.headers["set-cookie"].to_str().unwrap().to_string();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/_shoal"] {
        assert!(set.contains(attribute), "cookie without {attribute}: {set}");
    }
    set.split(';').next().unwrap().to_string()
}

/// `POST /_shoal/api/instances` with the console's login: `action` on
/// instance `url` of pool `default`.
async fn instance_action(
    client: &TestClient,
    gw: &TestGateway,
    cookie: &str,
    url: &str,
    action: &str,
) -> Reply {
    client
        .send(console_request(
            "POST",
            &gw.url("/_shoal/api/instances"),
            Some(cookie),
            Some(json!({"pool": "default", "url": url, "action": action})),
        ))
        .await
}

/// Reads server-sent events from `/_shoal/api/live` until `done` says so
/// of an event (name, data) or `within` passes.
async fn watch_live(
    gw: &TestGateway,
    cookie: &str,
    within: Duration,
    mut done: impl FnMut(&str, &Value) -> bool,
) -> bool {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .request(console_request(
            "GET",
            &gw.url("/_shoal/api/live"),
            Some(cookie),
            None,
        ))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let mut buffer = String::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(f))) => f,
            _ => return false,
        };
        if let Ok(data) = frame.into_data() {
            buffer.push_str(&String::from_utf8_lossy(&data));
        }
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let name = event
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or("")
                .to_string();
            let data = event
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .unwrap_or("null");
            let value: Value = serde_json::from_str(data).expect("event data is JSON");
            if done(&name, &value) {
                return true;
            }
        }
    }
}

#[tokio::test]
async fn the_console_shows_nothing_without_a_login() {
    let a = Upstream::start("a").await;
    let gw = TestGateway::start(settings(&[a.url()], json!({}))).await;
    let client = TestClient::default();
    for path in [
        "/_shoal/api/live",
        "/_shoal/api/session",
        "/_shoal/api/jobs?state=dead",
    ] {
        let r = client.get(&gw.url(path)).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{path}: {}", r.body);
    }
    // A forged cookie, and one signed with another token.
    for cookie in ["shoal_console=99999999999.abcd", "shoal_console=garbage"] {
        let r = client
            .send(console_request(
                "GET",
                &gw.url("/_shoal/api/session"),
                Some(cookie),
                None,
            ))
            .await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{cookie}");
    }
    // A wrong token, and a login without the header a cross-site form
    // cannot send.
    let wrong = client
        .send(console_request(
            "POST",
            &gw.url("/_shoal/api/login"),
            None,
            Some(json!({"token": "not-the-token"})),
        ))
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(!wrong.headers.contains_key("set-cookie"));
    let form = client
        .send(
            Request::post(gw.url("/_shoal/api/login"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(
                    json!({"token": ADMIN_TOKEN}).to_string(),
                )))
                .unwrap(),
        )
        .await;
    assert_eq!(form.status, StatusCode::FORBIDDEN);
    // The page itself holds no data, and says where its scripts may come from.
    let page = client.get(&gw.url("/_shoal/")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.headers["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'self'"));
    // An instance action without a login changes nothing.
    let drain = client
        .send(console_request(
            "POST",
            &gw.url("/_shoal/api/instances"),
            None,
            Some(json!({"pool": "default", "url": a.url(), "action": "drain"})),
        ))
        .await;
    assert_eq!(drain.status, StatusCode::UNAUTHORIZED);
    assert_eq!(gw.instance(&client, &a.url()).await["admin_ejected"], false);

    // Without an admin token the console is off, login included.
    let mut s = settings(&[a.url()], json!({}));
    s.admin_token = None;
    let off = TestGateway::start(s).await;
    let r = client
        .send(console_request(
            "POST",
            &off.url("/_shoal/api/login"),
            None,
            Some(json!({"token": ADMIN_TOKEN})),
        ))
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn a_logged_in_console_sees_the_pools_live_and_drains_an_instance() {
    let a = Upstream::start("a").await;
    let b = Upstream::start("b").await;
    let gw = TestGateway::start(settings(
        &[a.url(), b.url()],
        json!({"console": {"redirect_root": true}}),
    ))
    .await;
    let client = TestClient::default();
    let cookie = log_in(&client, &gw).await;
    let session = client
        .send(console_request(
            "GET",
            &gw.url("/_shoal/api/session"),
            Some(&cookie),
            None,
        ))
        .await;
    assert_eq!(session.status, StatusCode::OK, "{}", session.body);

    // A browser's `/` goes to the console; an API client's is routed.
    let browser = client
        .send(
            Request::get(gw.url("/"))
                .header("accept", "text/html,application/xhtml+xml")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await;
    assert_eq!(browser.status, StatusCode::SEE_OTHER);
    assert_eq!(browser.headers["location"], "/_shoal/");
    let api = client.get(&gw.url("/")).await;
    assert_eq!(api.status, StatusCode::OK);

    // Traffic shows in the feed: both instances up, requests counted.
    let load = tokio::spawn({
        let client = client.clone();
        let url = gw.url("/work");
        async move {
            for _ in 0..400 {
                client.get(&url).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let mut saw_history = false;
    let mut seen = Value::Null;
    let counted = watch_live(&gw, &cookie, Duration::from_secs(10), |name, v| {
        if name == "history" {
            saw_history = v["samples"].is_array();
            return false;
        }
        assert_eq!(name, "snapshot");
        seen = v.clone();
        let instances = v["pools"][0]["instances"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        instances.len() == 2
            && instances
                .iter()
                .all(|i| i["state"] == "up" && i["rps"].as_f64() > Some(0.0))
            && v["gateway"]["rps"].as_f64() > Some(0.0)
            && v["gateway"]["p99_ms"].as_f64().is_some()
            // The charts by instance get a line each.
            && v["sample"]["instances"].as_array().is_some_and(|is| {
                is.len() == 2
                    && is.iter().all(|i| {
                        i["rps"].as_f64() > Some(0.0)
                            && i["p99_ms"].as_f64().is_some()
                            && i["id"].as_str().is_some_and(|id| id.starts_with("default http://"))
                    })
            })
    })
    .await;
    assert!(saw_history, "the feed starts with the history");
    assert!(counted, "no snapshot showed the traffic: {seen:#}");
    load.abort();

    // Drain from the console: the gateway sends it nothing new.
    let drain = instance_action(&client, &gw, &cookie, &a.url(), "drain").await;
    assert_eq!(drain.status, StatusCode::OK, "{}", drain.body);
    assert_eq!(gw.instance(&client, &a.url()).await["admin_draining"], true);
    assert_eq!(gw.instance(&client, &a.url()).await["admin_ejected"], false);
    let hits = a.hits();
    for _ in 0..10 {
        assert_eq!(client.get(&gw.url("/x")).await.body, "b");
    }
    assert_eq!(a.hits(), hits);
    let shown = watch_live(&gw, &cookie, Duration::from_secs(5), |name, v| {
        name == "snapshot"
            && v["pools"][0]["instances"].as_array().is_some_and(|is| {
                is.iter()
                    .any(|i| i["url"] == a.url() && i["state"] == "drained")
            })
    })
    .await;
    assert!(
        shown,
        "the drained instance (nothing in flight) is shown drained"
    );
    // A change without the console's header is refused, and changes nothing.
    let csrf = client
        .send(
            Request::post(gw.url("/_shoal/api/instances"))
                .header("cookie", &cookie)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(
                    json!({"pool": "default", "url": a.url(), "action": "readmit"}).to_string(),
                )))
                .unwrap(),
        )
        .await;
    assert_eq!(csrf.status, StatusCode::FORBIDDEN);
    assert_eq!(gw.instance(&client, &a.url()).await["admin_draining"], true);
    let bad = client
        .send(console_request(
            "POST",
            &gw.url("/_shoal/api/instances"),
            Some(&cookie),
            Some(json!({"pool": "default", "url": a.url(), "action": "explode"})),
        ))
        .await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", bad.body);
    let readmit = instance_action(&client, &gw, &cookie, &a.url(), "readmit").await;
    assert_eq!(readmit.status, StatusCode::OK);
    assert_eq!(
        gw.instance(&client, &a.url()).await["admin_draining"],
        false
    );

    // Eject from the console, then re-admit.
    let eject = instance_action(&client, &gw, &cookie, &a.url(), "eject").await;
    assert_eq!(eject.status, StatusCode::OK, "{}", eject.body);
    assert_eq!(gw.instance(&client, &a.url()).await["admin_ejected"], true);
    let shown = watch_live(&gw, &cookie, Duration::from_secs(5), |name, v| {
        name == "snapshot"
            && v["pools"][0]["instances"].as_array().is_some_and(|is| {
                is.iter()
                    .any(|i| i["url"] == a.url() && i["state"] == "ejected")
            })
    })
    .await;
    assert!(shown, "the ejected instance is shown ejected");
    let readmit = instance_action(&client, &gw, &cookie, &a.url(), "readmit").await;
    assert_eq!(readmit.status, StatusCode::OK);
    assert_eq!(gw.instance(&client, &a.url()).await["admin_ejected"], false);

    // Logging out clears the cookie.
    let out = client
        .send(console_request(
            "POST",
            &gw.url("/_shoal/api/logout"),
            Some(&cookie),
            Some(json!({})),
        ))
        .await;
    assert_eq!(out.status, StatusCode::NO_CONTENT);
    assert!(out.headers["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
}

#[tokio::test]
async fn queue_requests_go_to_a_worker_with_the_admin_token() {
    let a = Upstream::start("a").await;
    let worker = Upstream::start("worker").await;
    let gw = TestGateway::start(settings(
        &[a.url()],
        json!({"console": {"workers": [worker.url()]}}),
    ))
    .await;
    let client = TestClient::default();
    let cookie = log_in(&client, &gw).await;
    let r = client
        .send(console_request(
            "GET",
            &gw.url("/_shoal/api/jobs?state=dead"),
            Some(&cookie),
            None,
        ))
        .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, "worker");
    let headers = worker.state.last_headers.lock().unwrap().clone().unwrap();
    assert_eq!(headers["authorization"], format!("Bearer {ADMIN_TOKEN}"));
    // The feed says why it has no queues: this worker does not speak JSON.
    let told = watch_live(&gw, &cookie, Duration::from_secs(6), |name, v| {
        name == "snapshot"
            && v["queues"]["available"] == false
            && v["queues"]["error"]
                .as_str()
                .is_some_and(|e| e.contains(&worker.url()))
    })
    .await;
    assert!(told, "the queues' error names the worker");
    // Nor does it answer `/_shoal/worker` as a worker: its row is down.
    let row = watch_live(&gw, &cookie, Duration::from_secs(6), |name, v| {
        name == "snapshot"
            && v["workers"][0]["url"] == worker.url()
            && v["workers"][0]["state"] == "down"
            && v["workers"][0]["jobs"].is_null()
    })
    .await;
    assert!(row, "a worker that does not answer is shown down");
}

/// The overview lists every gateway of the deployment: this one, then
/// each of `gateway.console.peers` with its own figures (a peer URL that
/// leads back to this gateway is not listed twice), and a peer that stops
/// answering is shown down. A peer's figures need the admin token.
#[tokio::test]
async fn the_overview_shows_each_gateway_of_the_deployment() {
    // Peers ask each other with the read-only token they share: a's admin
    // token is not b's, so b's asks get through only with it.
    const READ_TOKEN: &str = "peer-read-token-0123456789";
    let up = Upstream::start("a").await;
    let a = TestGateway::start(settings(
        &[up.url()],
        json!({"admin_token": "a-different-admin-token-0123", "metrics_token": READ_TOKEN}),
    ))
    .await;
    let b_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let b = TestGateway::start(settings(
        &[up.url()],
        json!({
            "listen": format!("127.0.0.1:{b_port}"),
            "metrics_token": READ_TOKEN,
            "console": {"peers": format!("{}, http://127.0.0.1:{b_port}", a.url(""))},
        }),
    ))
    .await;
    let client = TestClient::default();
    let anonymous = client.get(&a.url("/_shoal/gateway")).await;
    assert_eq!(
        anonymous.status,
        StatusCode::UNAUTHORIZED,
        "{}",
        anonymous.body
    );

    // Traffic through a only.
    let load = tokio::spawn({
        let client = client.clone();
        let url = a.url("/work");
        async move {
            loop {
                client.get(&url).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let cookie = log_in(&client, &b).await;
    let mut seen = Value::Null;
    let listed = watch_live(&b, &cookie, Duration::from_secs(10), |name, v| {
        if name != "snapshot" {
            return false;
        }
        seen = v["gateways"].clone();
        let Some(gws) = v["gateways"].as_array() else {
            return false;
        };
        gws.len() == 2
            && gws[0]["this"] == true
            && gws[0]["figures"]["listen"] == format!("127.0.0.1:{b_port}")
            && gws[1]["url"] == a.url("")
            && gws[1]["state"] == "up"
            && gws[1]["figures"]["rps"].as_f64() > Some(0.0)
            && gws[1]["figures"]["instances"] == 1
    })
    .await;
    assert!(
        listed,
        "b's overview does not show a with its traffic: {seen:#}"
    );
    load.abort();

    a.stop.cancel();
    let down = watch_live(&b, &cookie, Duration::from_secs(10), |name, v| {
        name == "snapshot"
            && v["gateways"][1]["url"] == a.url("")
            && v["gateways"][1]["state"] == "down"
            && v["gateways"][1]["error"].is_string()
    })
    .await;
    assert!(down, "a stopped gateway is not shown down");
}
