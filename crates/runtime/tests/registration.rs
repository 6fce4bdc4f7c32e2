//! `serve.register_at`: an instance registers with the gateway's admin API
//! when it starts, renews before its TTL lapses, and deregisters as soon as
//! it is told to stop (before its listener closes). Against a recording
//! stand-in for the gateway's admin API.

use axum::routing::post;
use axum::{Json, Router};
use serde_json::Value;
use shoal_core::Settings;
use shoal_runtime::{Application, ServiceModule};
use shoal_testkit as kit;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

type Calls = Arc<Mutex<Vec<(String, Value, Option<String>)>>>;

async fn fake_gateway() -> (String, Calls) {
    let calls: Calls = Arc::default();
    let record = |kind: &'static str, calls: Calls| {
        post(
            move |headers: axum::http::HeaderMap, Json(body): Json<Value>| {
                let calls = calls.clone();
                async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    calls.lock().unwrap().push((kind.to_string(), body, auth));
                    Json(serde_json::json!({}))
                }
            },
        )
    };
    let app = Router::new()
        .route(
            "/_gateway/admin/register",
            record("register", calls.clone()),
        )
        .route(
            "/_gateway/admin/deregister",
            record("deregister", calls.clone()),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, calls)
}

async fn until(
    what: &str,
    calls: &Calls,
    check: impl Fn(&[(String, Value, Option<String>)]) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check(&calls.lock().unwrap()) {
        assert!(
            Instant::now() < deadline,
            "{what}: {:?}",
            calls.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_registers_renews_and_deregisters_when_it_drains() {
    let (gateway, calls) = fake_gateway().await;
    // A second gateway, listed too, and a third that is down: every
    // gateway that answers knows the instance, whatever the others do.
    let (second, second_calls) = fake_gateway().await;
    let down = format!("http://127.0.0.1:{}", kit::free_port());
    let dir = kit::TempDir::new("registration");
    let mut settings = Settings {
        data_dir: dir.path().to_path_buf(),
        ..Settings::default()
    };
    settings.serve.listen = "127.0.0.1:0".parse().unwrap();
    settings.serve.register_at = vec![down, gateway, second];
    settings.serve.register_pool = "api".into();
    settings.serve.register_ttl_secs = 2;
    settings.serve.drain_delay_ms = 500;
    settings.gateway.admin_token = Some("registration-token-0123456789".into());
    let modules: Vec<Box<dyn ServiceModule>> = Vec::new();
    let app = Application::build(settings, modules).await.unwrap();
    let me = format!("http://{}", app.local_addr());
    let stop = CancellationToken::new();
    let running = tokio::spawn(app.run(stop.clone()));

    // Registered at start, then renewed every third of the 2 s TTL.
    until("two registrations", &calls, |c| c.len() >= 2).await;
    until(
        "two registrations at the second gateway",
        &second_calls,
        |c| c.len() >= 2,
    )
    .await;
    let both: Vec<_> = calls
        .lock()
        .unwrap()
        .iter()
        .chain(second_calls.lock().unwrap().iter())
        .cloned()
        .collect();
    for (kind, body, auth) in both.iter() {
        assert_eq!(kind, "register");
        assert_eq!(body["pool"], "api");
        assert_eq!(body["url"], me.as_str());
        assert_eq!(body["ttl_secs"], 2);
        assert_eq!(
            auth.as_deref(),
            Some("Bearer registration-token-0123456789")
        );
    }

    // Told to stop: it leaves the pool while it drains, before the
    // listener closes.
    stop.cancel();
    for calls in [&calls, &second_calls] {
        until("a deregistration", calls, |c| {
            c.iter().any(|(kind, _, _)| kind == "deregister")
        })
        .await;
    }
    let (_, body, _) = calls
        .lock()
        .unwrap()
        .iter()
        .find(|(k, _, _)| k == "deregister")
        .cloned()
        .unwrap();
    assert_eq!(body["url"], me.as_str());
    assert_eq!(body["pool"], "api");
    let still_listening = reqwest::get(format!("{me}/healthz")).await;
    assert!(
        still_listening.is_ok(),
        "deregistered before the listener closed"
    );
    running.await.unwrap().unwrap();
}
