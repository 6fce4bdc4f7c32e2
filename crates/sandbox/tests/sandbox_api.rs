//! The sandbox's Stripe-compatible contract: idempotency, test cards,
//! faults and signed webhooks.

use axum::routing::post;
use serde_json::Value;
use shoal_backends::Database;
use shoal_core::settings::SandboxSettings;
use shoal_sandbox::{signature, Sandbox};
use shoal_testkit as kit;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

struct Running {
    base: String,
    stop: CancellationToken,
    _dir: kit::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start(webhook_url: Option<String>) -> Running {
    let dir = kit::TempDir::new("sandbox");
    let db = Database::connect(&kit::sqlite_url(dir.path()), 4, Duration::from_secs(5))
        .await
        .unwrap();
    let settings = SandboxSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        webhook_url,
        slow_ms: 300,
        ..SandboxSettings::default()
    };
    let sandbox = Sandbox::bind(settings, db).await.unwrap();
    let base = format!("http://{}", sandbox.handle().addr);
    let stop = CancellationToken::new();
    tokio::spawn(sandbox.run(stop.clone()));
    Running {
        base,
        stop,
        _dir: dir,
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

async fn create(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    amount: &str,
    pm: &str,
) -> reqwest::Result<reqwest::Response> {
    http.post(format!("{base}/v1/payment_intents"))
        .bearer_auth("sk_test_shoal")
        .header("idempotency-key", key)
        .form(&[
            ("amount", amount),
            ("currency", "usd"),
            ("payment_method", pm),
            ("confirm", "true"),
            ("metadata[order_id]", "ord_1"),
        ])
        .send()
        .await
}

async fn charge_count(http: &reqwest::Client, base: &str) -> u64 {
    let v: Value = http
        .get(format!("{base}/_sandbox/charges"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["count"].as_u64().unwrap()
}

#[tokio::test]
async fn idempotency_keys_replay_and_refuse_other_parameters() {
    let sb = start(None).await;
    let http = client();
    let first = create(&http, &sb.base, "k1", "1500", "pm_card_visa")
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["status"], "succeeded");
    assert_eq!(first["metadata"]["order_id"], "ord_1");
    let again = create(&http, &sb.base, "k1", "1500", "pm_card_visa")
        .await
        .unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"], "same key, same intent");
    let other = create(&http, &sb.base, "k1", "9999", "pm_card_visa")
        .await
        .unwrap();
    assert_eq!(other.status(), 400);
    let other: Value = other.json().await.unwrap();
    assert_eq!(other["error"]["type"], "idempotency_error");
    assert_eq!(charge_count(&http, &sb.base).await, 1, "one charge");

    let unauthorized = http
        .post(format!("{}/v1/payment_intents", sb.base))
        .form(&[("amount", "1")])
        .send()
        .await
        .unwrap();
    assert_eq!(unauthorized.status(), 401);
}

#[tokio::test]
async fn test_cards_decline_fail_and_lose_responses() {
    let sb = start(None).await;
    let http = client();
    let declined = create(&http, &sb.base, "d1", "100", "pm_card_chargeDeclined")
        .await
        .unwrap();
    assert_eq!(declined.status(), 402);
    let declined: Value = declined.json().await.unwrap();
    assert_eq!(declined["error"]["code"], "card_declined");

    let failed = create(&http, &sb.base, "e1", "100", "pm_card_error")
        .await
        .unwrap();
    assert_eq!(failed.status(), 500);
    assert_eq!(
        charge_count(&http, &sb.base).await,
        0,
        "no charge before the error"
    );

    // A lost response: the client times out, yet the charge happened; the
    // retry with the same key gets the recorded result, not a second charge.
    let short = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let lost = create(&short, &sb.base, "l1", "700", "pm_card_lost_response").await;
    assert!(lost.unwrap_err().is_timeout());
    let retry = create(&http, &sb.base, "l1", "700", "pm_card_lost_response")
        .await
        .unwrap();
    assert_eq!(retry.status(), 200);
    assert_eq!(charge_count(&http, &sb.base).await, 1, "exactly one charge");

    // Injected fault: the next create fails before charging.
    http.post(format!("{}/_sandbox/faults", sb.base))
        .json(&serde_json::json!({"fail_before_charge": 1}))
        .send()
        .await
        .unwrap();
    let f = create(&http, &sb.base, "f1", "100", "pm_card_visa")
        .await
        .unwrap();
    assert_eq!(f.status(), 500);
    let f = create(&http, &sb.base, "f1", "100", "pm_card_visa")
        .await
        .unwrap();
    assert_eq!(
        f.status(),
        200,
        "the retry after a pre-charge failure charges once"
    );
    assert_eq!(charge_count(&http, &sb.base).await, 2);

    let bad = create(&http, &sb.base, "b1", "-5", "pm_card_visa")
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test]
async fn webhooks_are_signed_and_verify() {
    let received: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/hook",
        post(move |headers: axum::http::HeaderMap, body: String| {
            let sink = sink.clone();
            async move {
                let sig = headers["stripe-signature"].to_str().unwrap().to_string();
                sink.lock().unwrap().push((sig, body));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    let sb = start(Some(hook)).await;
    let http = client();
    create(&http, &sb.base, "w1", "2500", "pm_card_processing")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some((sig, body)) = received.lock().unwrap().first().cloned() {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
            signature::verify("whsec_shoal_development", &sig, body.as_bytes(), now, 300).unwrap();
            let event: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(event["type"], "payment_intent.succeeded");
            assert_eq!(event["data"]["object"]["amount"], 2500);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no webhook arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
