//! One checkout's trace, end to end, through `shoal up` with traces sent
//! to an OTLP/HTTP receiver inside the test: the client's `traceparent`
//! → the gateway → the orders instance → its call to the catalog → the
//! enqueue of the payment → the payment job's run (a child of the enqueue,
//! and linked to it) → its call to the payment provider; and the calls
//! the settlement's jobs make: the receipt email sent, and the user's
//! webhook called (with the trace's `traceparent`). On SQLite, and on
//! PostgreSQL.

mod common;

use common::Stack;
use serde_json::{json, Value};
use shoal_testkit as kit;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

type Spans = Arc<Mutex<Vec<Value>>>;

/// An OTLP/HTTP (JSON) receiver on a free port: keeps every span, with
/// its service's name as `service`.
async fn otlp_receiver() -> (String, Spans) {
    let spans: Spans = Arc::default();
    let kept = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let kept = kept.clone();
            async move {
                let v: Value = serde_json::from_slice(&body).expect("OTLP JSON");
                for rs in v["resourceSpans"].as_array().unwrap() {
                    let service = rs["resource"]["attributes"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|a| a["key"] == "service.name")
                        .map(|a| a["value"]["stringValue"].clone())
                        .unwrap_or(Value::Null);
                    for ss in rs["scopeSpans"].as_array().unwrap() {
                        for s in ss["spans"].as_array().unwrap() {
                            let mut s = s.clone();
                            s["service"] = service.clone();
                            kept.lock().unwrap().push(s);
                        }
                    }
                }
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}

/// A webhook endpoint on a free port: answers 204 and keeps each
/// delivery's `traceparent`.
async fn webhook_receiver() -> (String, Arc<Mutex<Vec<String>>>) {
    let got: Arc<Mutex<Vec<String>>> = Arc::default();
    let kept = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let kept = kept.clone();
            async move {
                let tp = headers
                    .get("traceparent")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                kept.lock().unwrap().push(tp);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

fn find<'a>(spans: &'a [Value], service: &str, name_starts: &str) -> Option<&'a Value> {
    spans.iter().find(|s| {
        s["service"] == service
            && s["name"]
                .as_str()
                .is_some_and(|n| n.starts_with(name_starts))
    })
}

fn describe(spans: &[Value]) -> String {
    spans
        .iter()
        .map(|s| {
            format!(
                "{} {} span={} parent={}",
                s["service"], s["name"], s["spanId"], s["parentSpanId"]
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn a_checkout_is_one_trace(env: Vec<(&str, String)>) {
    let (endpoint, spans) = otlp_receiver().await;
    let mut all_env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    all_env.push(("SHOAL_TRACES__OTLP_ENDPOINT", endpoint.as_str()));
    // The webhook endpoint is on loopback.
    all_env.push(("SHOAL_NOTIFICATIONS__ALLOW_PRIVATE_WEBHOOK_TARGETS", "true"));
    let stack = Stack::start(2, &all_env);
    stack.wait_ready(2).await;
    let http = kit::http_client();
    let email = format!("trace-{}@example.com", kit::unique_name());
    stack.sign_up_and_log_in(&http, &email).await;
    let product = stack.a_product(&http).await;
    let (hook_url, hooks) = webhook_receiver().await;
    let r = http
        .post(stack.url("/api/notifications/webhooks"))
        .json(&json!({"url": hook_url, "event_types": ["order.paid"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());

    // The client starts the trace.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let r = http
        .post(stack.url("/api/orders"))
        .header("idempotency-key", kit::unique_name())
        .header("traceparent", format!("00-{trace_id}-{client_span}-01"))
        .json(&json!({"items": [{"product_id": product, "quantity": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let order: Value = r.json().await.unwrap();
    let id = order["id"].as_str().unwrap().to_string();
    stack
        .wait_paid(&http, &id, Instant::now() + Duration::from_secs(30))
        .await;

    // Every hop's span arrives (each process sends within half a second).
    let deadline = Instant::now() + Duration::from_secs(20);
    let trace = loop {
        let trace: Vec<Value> = spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s["traceId"] == trace_id)
            .cloned()
            .collect();
        // Spans arrive as they end, from each process in its own batches:
        // the run's after the calls it made.
        let complete = find(&trace, "shoal-gateway", "gateway POST").is_some()
            && find(&trace, "shoal-serve", "POST /api/orders").is_some()
            && find(&trace, "shoal-serve", "call catalog").is_some()
            && find(&trace, "shoal-serve", "POST /api/catalog/reservations").is_some()
            && find(&trace, "shoal-serve", "enqueue payments").is_some()
            && find(&trace, "shoal-worker", "run payments").is_some()
            && find(&trace, "shoal-worker", "payment provider: create intent").is_some()
            && find(&trace, "shoal-worker", "send email PaymentReceipt").is_some()
            && find(&trace, "shoal-worker", "run email notifications.email").is_some()
            && find(&trace, "shoal-worker", "webhook order.paid").is_some()
            && find(
                &trace,
                "shoal-worker",
                "run notifications notifications.webhook",
            )
            .is_some();
        if complete {
            break trace;
        }
        assert!(
            Instant::now() < deadline,
            "the trace is incomplete:\n{}\nlog:\n{}",
            describe(&trace),
            stack.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let all = describe(&trace);
    println!("{all}");
    let span_id = |s: &Value| s["spanId"].as_str().unwrap().to_string();
    let parent = |s: &Value| s["parentSpanId"].as_str().unwrap_or("").to_string();

    let gateway = find(&trace, "shoal-gateway", "gateway POST").unwrap();
    assert_eq!(
        parent(gateway),
        client_span,
        "the gateway continues the client's trace\n{all}"
    );
    assert_eq!(gateway["kind"], 2, "a server span");

    let serve = find(&trace, "shoal-serve", "POST /api/orders").unwrap();
    assert_eq!(
        parent(serve),
        span_id(gateway),
        "the instance is the gateway's child\n{all}"
    );

    let catalog = find(&trace, "shoal-serve", "call catalog").expect("the call to the catalog");
    assert_eq!(
        parent(catalog),
        span_id(serve),
        "the catalog call is the order's child\n{all}"
    );
    let reserved = trace
        .iter()
        .find(|s| s["service"] == "shoal-serve" && parent(s) == span_id(catalog))
        .expect("the catalog's own server span");
    assert_eq!(reserved["kind"], 2);

    let enqueue = find(&trace, "shoal-serve", "enqueue payments").expect("the payment's enqueue");
    assert_eq!(
        parent(enqueue),
        span_id(serve),
        "enqueued within the order's request\n{all}"
    );
    assert_eq!(enqueue["kind"], 4, "a producer span");

    let run = trace
        .iter()
        .find(|s| s["service"] == "shoal-worker" && parent(s) == span_id(enqueue))
        .unwrap_or_else(|| panic!("the payment job's run under its enqueue\n{all}"));
    assert_eq!(run["kind"], 5, "a consumer span");
    assert_eq!(
        run["links"][0]["spanId"], enqueue["spanId"],
        "linked to its enqueue"
    );

    let provider = find(&trace, "shoal-worker", "payment provider: create intent").unwrap();
    assert_eq!(
        parent(provider),
        span_id(run),
        "the provider call is the run's child\n{all}"
    );
    assert_eq!(provider["kind"], 3, "a client span");
    assert!(
        provider["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["key"] == "http.response.status_code"),
        "the provider's answer is recorded"
    );

    // The settlement's jobs, and the calls they make, are in the trace:
    // each call is the child of its job's run (a consumer span), which is
    // the child of its enqueue (a producer span).
    let by_id = |id: String| trace.iter().find(|s| span_id(s) == id);
    for call in ["send email PaymentReceipt", "webhook order.paid"] {
        let span = find(&trace, "shoal-worker", call).unwrap();
        assert_eq!(span["kind"], 3, "{call}: a client span\n{all}");
        let run = by_id(parent(span))
            .unwrap_or_else(|| panic!("{call}: its job's run is in the trace\n{all}"));
        assert_eq!(run["kind"], 5, "{call}: under a consumer span\n{all}");
        let enqueue = by_id(parent(run))
            .unwrap_or_else(|| panic!("{call}: its job's enqueue is in the trace\n{all}"));
        assert_eq!(enqueue["kind"], 4, "{call}: enqueued in the trace\n{all}");
    }
    // The webhook's receiver got the trace's context.
    let webhook = find(&trace, "shoal-worker", "webhook order.paid").unwrap();
    let got = hooks.lock().unwrap().clone();
    assert!(
        got.iter()
            .any(|tp| tp.starts_with(&format!("00-{trace_id}-{}-", span_id(webhook)))),
        "the delivery carries traceparent of the webhook span: {got:?}\n{all}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkout_is_one_trace_on_sqlite() {
    a_checkout_is_one_trace(Vec::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkout_is_one_trace_on_postgres() {
    let Some(pg) = kit::postgres_url("a_checkout_is_one_trace_on_postgres") else {
        return;
    };
    let db = kit::fresh_postgres_database(&pg).await;
    a_checkout_is_one_trace(vec![
        ("SHOAL_DATABASE__BACKEND", "postgres".into()),
        ("SHOAL_DATABASE__URL", db),
    ])
    .await;
}
