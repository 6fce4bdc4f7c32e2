//! The greetings service with Shoal's accounts service, on a real
//! listener with a fresh database and a worker in the process.

use greetings::{Greetings, SEND_KIND};
use serde_json::{json, Value};
use shoal_runtime::testing::TestApp;

async fn app() -> TestApp {
    TestApp::builder()
        .module(shoal_accounts::Accounts)
        .module(Greetings)
        .worker()
        .start()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_greeting_is_stored_then_sent_by_its_job() {
    let app = app().await;
    let ada = app.signed_in("ada@example.com").await;
    let r = ada
        .post(app.url("/api/greetings"))
        .json(&json!({"text": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let greeting: Value = r.json().await.unwrap();
    assert_eq!(greeting["user_id"], ada.id.as_str());
    assert!(greeting["sent_at"].is_null());

    let jobs = app.jobs_of(SEND_KIND).await;
    assert_eq!(jobs.len(), 1);
    let job = app.finished_job(&jobs[0].id).await;
    assert_eq!(job.state, shoal_queue::JobState::Succeeded, "{job:?}");

    let mine: Vec<Value> = ada
        .get(app.url("/api/greetings"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(mine.len(), 1);
    assert!(mine[0]["sent_at"].as_i64().is_some(), "{mine:?}");
    // Another user sees none of them.
    let grace = app.signed_in("grace@example.com").await;
    let theirs: Vec<Value> = grace
        .get(app.url("/api/greetings"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(theirs.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_and_no_session_change_nothing() {
    let app = app().await;
    let r = app
        .client()
        .post(app.url("/api/greetings"))
        .json(&json!({"text": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let ada = app.signed_in("ada@example.com").await;
    for body in [
        json!({"text": ""}),
        json!({"text": "x".repeat(201)}),
        json!({"txt": "hi"}),
    ] {
        let r = ada
            .post(app.url("/api/greetings"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 422, "{body}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
    }
    assert!(app.jobs_of(SEND_KIND).await.is_empty());
    let mine: Vec<Value> = ada
        .get(app.url("/api/greetings"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(mine.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_routes_are_in_the_api_document() {
    let app = app().await;
    let doc: Value = app
        .client()
        .get(app.url("/api/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ops = &doc["paths"]["/api/greetings"];
    assert!(ops["get"].is_object() && ops["post"].is_object(), "{ops}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn its_own_setting_is_read_and_checked() {
    use shoal_core::settings::toml;
    use shoal_runtime::ServiceModule;
    let section = |text: &str| toml::from_str::<toml::Value>(text).unwrap();
    let app = TestApp::builder()
        .module(shoal_accounts::Accounts)
        .module(Greetings)
        .settings(move |s| {
            s.services
                .insert("greetings".into(), section("max_length = 5"));
        })
        .start()
        .await;
    let ada = app.signed_in("ada@example.com").await;
    let send = |text: &str| {
        ada.post(app.url("/api/greetings"))
            .json(&json!({ "text": text }))
            .send()
    };
    assert_eq!(send("hello").await.unwrap().status(), 201);
    let r = send("hello!").await.unwrap();
    assert_eq!(r.status(), 422);
    let problem: Value = r.json().await.unwrap();
    assert!(
        problem["detail"].as_str().unwrap().contains("1 to 5"),
        "{problem}"
    );

    // A typo, a bad value, or a value from the environment (a string).
    let mut settings = shoal_core::Settings::default();
    for (given, ok) in [
        ("max_lenght = 5", false),
        ("max_length = 0", false),
        ("max_length = \"300\"", true),
        ("max_length = \"many\"", false),
    ] {
        settings.services.insert("greetings".into(), section(given));
        let checked = Greetings.check_settings(&settings);
        assert_eq!(checked.is_ok(), ok, "{given}: {checked:?}");
        if let Err(e) = checked {
            assert!(e.to_string().contains("services.greetings"), "{e}");
        }
    }
}
