//! The notifications service over HTTP with real workers: the welcome
//! email (as an `.eml` file, and through the SMTP sink of
//! `scripts/smtp-sink`, also after the SMTP server was down), realtime
//! events across instances over SSE and WebSocket with replay and
//! slow-consumer dropping, and signed, retried, logged webhooks with
//! refused private targets.

use base64::Engine as _;
use futures_util::StreamExt;
use hmac::Mac;
use serde_json::{json, Value};
use shoal_core::Settings;
use shoal_queue::{JobFilter, JobStore};
use shoal_runtime::testing::TestApp;
use shoal_testkit as kit;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn settings(dir: &std::path::Path) -> Settings {
    let mut s = Settings {
        data_dir: dir.to_path_buf(),
        ..Settings::default()
    };
    s.serve.listen = "127.0.0.1:0".parse().unwrap();
    s.accounts.min_password_length = 8;
    s.notifications.allow_private_webhook_targets = true;
    s.notifications.webhook_retry_base_ms = 100;
    s
}

/// A logged-in WebSocket on `base`'s `/api/notifications/ws` + `query`.
async fn connect_ws(
    base: &str,
    query: &str,
    cookie: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = format!(
        "{}/api/notifications/ws{query}",
        base.replace("http://", "ws://")
    );
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("cookie", cookie.parse().unwrap());
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

/// An instance of accounts and notifications on `settings` (and, with
/// `worker`, a worker in the same process).
async fn start_with(settings: Settings, worker: bool) -> TestApp {
    let app = TestApp::builder()
        .from_settings(settings)
        .module(shoal_accounts::Accounts)
        .module(shoal_notifications::Notifications);
    if worker { app.worker() } else { app }.start().await
}

/// One instance with a worker, in a directory of its own, `edit`ed.
async fn start(edit: impl FnOnce(&mut Settings) + Send + 'static) -> TestApp {
    TestApp::builder()
        .settings(move |s| {
            *s = settings(&s.data_dir.clone());
            edit(s);
        })
        .module(shoal_accounts::Accounts)
        .module(shoal_notifications::Notifications)
        .worker()
        .start()
        .await
}

async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn unique_email(label: &str) -> String {
    format!("{label}-{}@example.com", kit::unique_name())
}

// ---------------------------------------------------------------- email

#[tokio::test]
async fn the_welcome_email_is_written_as_eml_and_listed_for_admins() {
    let app = start(|s| s.serve.debug_routes = true).await;
    let email = unique_email("ada");
    let (cookie, _) = kit::sign_up_and_log_in(app.base(), &email).await;
    let http = reqwest::Client::new();
    let listed: Value = eventually("the welcome .eml", Duration::from_secs(20), || async {
        let v: Value = http
            .get(format!("{}/api/notifications/emails?raw=true", app.base()))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (v["emails"].as_array().map(|a| !a.is_empty()) == Some(true)).then_some(v)
    })
    .await;
    let mail = &listed["emails"][0];
    assert!(mail["to"].as_str().unwrap().contains(&email), "{mail}");
    assert_eq!(mail["subject"], "Welcome to Shoal");
    let raw = mail["raw"].as_str().unwrap();
    assert!(
        raw.contains("text/plain") && raw.contains("text/html"),
        "{raw}"
    );
    assert!(mail["message_id"].as_str().unwrap().ends_with("@shoal>"));
    // Exactly one, and files really are under <data_dir>/mail.
    let files = std::fs::read_dir(app.ctx().settings.data_dir.join("mail"))
        .unwrap()
        .count();
    assert_eq!(files, 1);

    // Without debug routes and not an admin: forbidden.
    let dir2 = kit::TempDir::new("notifications");
    let plain = start_with(settings(dir2.path()), false).await;
    let (cookie, _) = kit::sign_up_and_log_in(plain.base(), &unique_email("bob")).await;
    let r = http
        .get(format!("{}/api/notifications/emails", plain.base()))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test]
async fn a_duplicate_signup_tells_the_owner_and_sends_no_second_welcome() {
    let app = start(|_| {}).await;
    let email = unique_email("dup");
    kit::sign_up_and_log_in(app.base(), &email).await;
    let r = reqwest::Client::new()
        .post(format!("{}/api/accounts/signup", app.base()))
        .json(&json!({"email": email, "password": "correct horse"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "answered as a new account would be");
    let jobs = app
        .ctx()
        .jobs
        .list(&JobFilter {
            kind: Some(shoal_notifications::EMAIL_KIND.into()),
            ..JobFilter::default()
        })
        .await
        .unwrap();
    let templates: Vec<String> = jobs
        .iter()
        .map(|j| {
            j.payload["template"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    assert!(templates.contains(&"welcome".to_string()), "{templates:?}");
    assert!(
        templates.contains(&"signup_attempt".to_string()),
        "{templates:?}"
    );
}

/// Files of the sink mentioning `needle`.
fn sink_files_with(dir: &std::path::Path, needle: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".eml"))
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .filter(|s| s.contains(needle))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn the_welcome_email_arrives_at_the_smtp_sink() {
    let Some((url, sink_dir)) = kit::smtp_url("the_welcome_email_arrives_at_the_smtp_sink") else {
        return;
    };
    let app = start(|s| s.notifications.smtp_url = Some(url)).await;
    let email = unique_email("smtp");
    kit::sign_up_and_log_in(app.base(), &email).await;
    let mail = eventually("the email at the sink", Duration::from_secs(20), || async {
        sink_files_with(&sink_dir, &email).pop()
    })
    .await;
    assert!(mail.contains("Subject: Welcome to Shoal"), "{mail}");
    assert!(mail.contains(&format!("X-Sink-Rcpt-To: {email}")), "{mail}");
}

/// A TCP forwarder to `target` that starts listening on `port` only when
/// told: before that, connections to the port are refused (SMTP "down").
async fn forward_later(port: u16, target: String, go: tokio::sync::oneshot::Receiver<()>) {
    let _ = go.await;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            return;
        };
        let target = target.clone();
        tokio::spawn(async move {
            if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }
        });
    }
}

#[tokio::test]
async fn with_smtp_down_the_email_waits_and_arrives_when_it_returns() {
    let Some((url, sink_dir)) =
        kit::smtp_url("with_smtp_down_the_email_waits_and_arrives_when_it_returns")
    else {
        return;
    };
    let target = url
        .trim_start_matches("smtp://")
        .trim_end_matches('/')
        .to_string();
    let port = kit::free_port();
    let (go, wait) = tokio::sync::oneshot::channel();
    tokio::spawn(forward_later(port, target, wait));
    let app =
        start(move |s| s.notifications.smtp_url = Some(format!("smtp://127.0.0.1:{port}"))).await;
    let email = unique_email("down");
    kit::sign_up_and_log_in(app.base(), &email).await;

    // The job fails and waits to retry; nothing arrives.
    let filter = JobFilter {
        kind: Some(shoal_notifications::EMAIL_KIND.into()),
        ..JobFilter::default()
    };
    let job = eventually("a failed attempt", Duration::from_secs(20), || async {
        let jobs = app.ctx().jobs.list(&filter).await.unwrap();
        jobs.into_iter()
            .find(|j| j.attempts >= 1 && j.last_error.is_some())
    })
    .await;
    assert!(
        job.last_error.as_deref().unwrap().contains("SMTP"),
        "{job:?}"
    );
    assert!(sink_files_with(&sink_dir, &email).is_empty());

    // SMTP comes back: the next attempt delivers it.
    go.send(()).unwrap();
    let mail = eventually(
        "the email after SMTP returned",
        Duration::from_secs(30),
        || async { sink_files_with(&sink_dir, &email).pop() },
    )
    .await;
    assert!(mail.contains("Welcome to Shoal"));
    let jobs = app.ctx().jobs.list(&filter).await.unwrap();
    assert!(jobs[0].attempts >= 2, "{:?}", jobs[0]);
}

// ---------------------------------------------------------------- realtime

use kit::SseReader;

#[tokio::test]
async fn an_event_from_a_worker_reaches_sse_on_another_instance() {
    let dir = kit::TempDir::new("notifications");
    let s = settings(dir.path());
    let a = start_with(s.clone(), false).await;
    let b = start_with(s.clone(), false).await;
    // The worker's own context, as `shoal worker` builds it.
    let modules: Vec<Box<dyn shoal_runtime::ServiceModule>> = vec![
        Box::new(shoal_accounts::Accounts),
        Box::new(shoal_notifications::Notifications),
    ];
    let worker_ctx = shoal_runtime::app::build_context(s, "worker-test".into(), &modules)
        .await
        .unwrap();
    let (cookie, user_id) = kit::sign_up_and_log_in(a.base(), &unique_email("rt")).await;
    let mut sse = SseReader::open(
        &format!("{}/api/notifications/stream", b.base()),
        &cookie,
        None,
    )
    .await;
    let id = shoal_notifications::publish_user_event(
        &worker_ctx,
        &user_id,
        "order.paid",
        json!({"order_id": "o-1"}),
    )
    .await
    .unwrap();
    let (sse_id, event) = sse.next(Duration::from_secs(10)).await;
    assert_eq!(sse_id.as_deref(), Some(id.as_str()));
    assert_eq!(event["kind"], "order.paid");
    assert_eq!(event["data"]["order_id"], "o-1");
    assert_eq!(event["id"], id.as_str());

    // Another user's events do not reach this stream.
    let (_, other) = kit::sign_up_and_log_in(a.base(), &unique_email("other")).await;
    shoal_notifications::publish_user_event(&worker_ctx, &other, "order.paid", json!({}))
        .await
        .unwrap();
    let mine =
        shoal_notifications::publish_user_event(&worker_ctx, &user_id, "order.shipped", json!({}))
            .await
            .unwrap();
    let (_, event) = sse.next(Duration::from_secs(10)).await;
    assert_eq!(event["id"], mine.as_str());
    drop(a);
}

/// `POST /api/notifications/test` publishes to the caller's own streams,
/// on another instance too; bad bodies are refused and publish nothing.
#[tokio::test]
async fn a_test_event_reaches_the_callers_stream_on_another_instance() {
    let dir = kit::TempDir::new("notifications");
    let s = settings(dir.path());
    let a = start_with(s.clone(), false).await;
    let b = start_with(s.clone(), false).await;
    let (cookie, _) = kit::sign_up_and_log_in(a.base(), &unique_email("ping")).await;
    let mut sse = SseReader::open(
        &format!("{}/api/notifications/stream", b.base()),
        &cookie,
        None,
    )
    .await;
    let http = reqwest::Client::new();
    let url = format!("{}/api/notifications/test", a.base());
    let bad = http
        .post(&url)
        .header("cookie", &cookie)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let anonymous = http.post(&url).json(&json!({"t": 1})).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let r = http
        .post(&url)
        .header("cookie", &cookie)
        .json(&json!({"t": 42}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (sse_id, event) = sse.next(Duration::from_secs(10)).await;
    assert_eq!(sse_id.as_deref(), Some(id.as_str()), "only the good one");
    assert_eq!(event["kind"], "test");
    assert_eq!(event["data"]["t"], 42);
    drop(a);
}

#[tokio::test]
async fn last_event_id_replays_what_was_missed_over_sse_and_websocket() {
    let app = start(|_| {}).await;
    let (cookie, user) = kit::sign_up_and_log_in(app.base(), &unique_email("replay")).await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(
            shoal_notifications::publish_user_event(app.ctx(), &user, "tick", json!({"n": n}))
                .await
                .unwrap(),
        );
    }
    let url = format!("{}/api/notifications/stream", app.base());
    let mut sse = SseReader::open(&url, &cookie, Some(&ids[0])).await;
    for (n, id) in ids.iter().enumerate().skip(1) {
        let (sse_id, e) = sse.next(Duration::from_secs(10)).await;
        assert_eq!(sse_id.as_deref(), Some(id.as_str()));
        assert_eq!(e["data"]["n"], n);
    }
    // Live events follow the replay without duplicates.
    let live = shoal_notifications::publish_user_event(app.ctx(), &user, "tick", json!({"n": 3}))
        .await
        .unwrap();
    assert_eq!(
        sse.next(Duration::from_secs(10)).await.0.as_deref(),
        Some(live.as_str())
    );

    // An id that is not kept: told to reset, then everything kept.
    let mut sse =
        SseReader::open(&url, &cookie, Some("00000000-0000-7000-8000-000000000000")).await;
    assert_eq!(
        sse.next(Duration::from_secs(10)).await.1["kind"],
        "stream.reset"
    );
    // A malformed id is a 422.
    let r = reqwest::Client::new()
        .get(&url)
        .header("cookie", &cookie)
        .header("last-event-id", "nope; drop")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    // Without a session: 401.
    let r = reqwest::get(&url).await.unwrap();
    assert_eq!(r.status(), 401);

    // The WebSocket replays from ?last_event_id= too.
    let mut ws = connect_ws(app.base(), &format!("?last_event_id={}", ids[1]), &cookie).await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no websocket message")
            .unwrap()
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
            let v: Value = serde_json::from_str(&t).unwrap();
            got.push(v["id"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(got, vec![ids[2].clone(), live]);
}

/// Heartbeats come from the hub's one timer: an idle SSE stream gets a
/// comment line and an idle WebSocket a ping every `heartbeat_secs`, and
/// no stream gets one while events are queued.
#[tokio::test]
async fn idle_streams_get_heartbeats_from_the_hub() {
    let app = start(|s| s.notifications.heartbeat_secs = 1).await;
    let (cookie, _user) = kit::sign_up_and_log_in(app.base(), &unique_email("beat")).await;
    let addr: std::net::SocketAddr = app.base().trim_start_matches("http://").parse().unwrap();
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(
        format!(
            "GET /api/notifications/stream HTTP/1.1\r\nHost: x\r\nCookie: {cookie}\r\nAccept: text/event-stream\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(4);
    while String::from_utf8_lossy(&got).matches("heartbeat").count() < 2 {
        let mut chunk = [0u8; 1024];
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, conn.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("two heartbeats in 4 s: {}", String::from_utf8_lossy(&got)))
            .unwrap();
        assert!(n > 0, "the stream ended");
        got.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        !text.contains("data:"),
        "a heartbeat is a comment, not an event: {text}"
    );

    let mut ws = connect_ws(app.base(), "", &cookie).await;
    let ping = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match ws.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Ping(_))) => return,
                Some(Ok(_)) => {}
                other => panic!("the socket ended before a ping: {other:?}"),
            }
        }
    })
    .await;
    assert!(ping.is_ok(), "no ping within 3 s with heartbeat_secs = 1");
}

#[tokio::test]
async fn a_slow_consumer_is_disconnected_not_buffered() {
    let app = start(|s| s.notifications.stream_buffer = 4).await;
    let (cookie, user) = kit::sign_up_and_log_in(app.base(), &unique_email("slow")).await;
    let addr: std::net::SocketAddr = app.base().trim_start_matches("http://").parse().unwrap();
    // A client with a tiny receive window that does not read.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut conn = socket.connect(addr).await.unwrap();
    conn.write_all(
        format!(
            "GET /api/notifications/stream HTTP/1.1\r\nHost: x\r\nConnection: close\r\nCookie: {cookie}\r\nAccept: text/event-stream\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let big = "x".repeat(60_000);
    let total = 300;
    for n in 0..total {
        shoal_notifications::publish_user_event(
            app.ctx(),
            &user,
            "bulk",
            json!({"n": n, "pad": big}),
        )
        .await
        .unwrap();
    }
    // Now read: the server must have ended the stream (EOF) well before
    // delivering everything; a stream that was kept would never end.
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut received)).await;
    assert!(read.is_ok(), "the slow consumer's stream was not closed");
    let text = String::from_utf8_lossy(&received);
    let events = text.matches("\ndata:").count() + text.matches("\r\ndata:").count();
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        &text[..text.len().min(200)]
    );
    assert!(events < total, "all {events} events were buffered");
    // A fresh connection works and can replay from the last one seen.
    let mut sse = SseReader::open(
        &format!("{}/api/notifications/stream", app.base()),
        &cookie,
        None,
    )
    .await;
    shoal_notifications::publish_user_event(app.ctx(), &user, "after", json!({}))
        .await
        .unwrap();
    assert_eq!(sse.next(Duration::from_secs(10)).await.1["kind"], "after");
}

/// One user may hold `max_connections_per_user` streams on an instance;
/// the next is a 429 with `Retry-After` (and opens nothing), and room
/// comes back when one closes.
#[tokio::test]
async fn streams_per_user_are_limited_with_429() {
    let app = start(|s| s.notifications.max_connections_per_user = 2).await;
    let (cookie, _) = kit::sign_up_and_log_in(app.base(), &unique_email("limit")).await;
    let (other, _) = kit::sign_up_and_log_in(app.base(), &unique_email("limit2")).await;
    let url = format!("{}/api/notifications/stream", app.base());
    let first = SseReader::open(&url, &cookie, None).await;
    let _second = SseReader::open(&url, &cookie, None).await;
    let refused = reqwest::Client::new()
        .get(&url)
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    // Another user is not affected.
    let _theirs = SseReader::open(&url, &other, None).await;
    // A closed stream gives its place back.
    drop(first);
    eventually(
        "a place after a stream closed",
        Duration::from_secs(10),
        || {
            let (url, cookie) = (url.clone(), cookie.clone());
            async move {
                let r = reqwest::Client::new()
                    .get(&url)
                    .header("cookie", &cookie)
                    .send()
                    .await
                    .unwrap();
                (r.status() == 200).then_some(())
            }
        },
    )
    .await;
}

/// A draining instance tells each stream to reconnect at its own moment
/// within `drain_window_ms` (SSE: a `stream.reconnect` event with
/// `retry:`; WebSocket: close 1012) while events keep being published;
/// every client resumes on another instance from its `Last-Event-ID` and
/// has every event once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_instance_moves_its_streams_without_losing_an_event() {
    const STREAMS: usize = 24;
    let dir = kit::TempDir::new("notifications");
    let mut s = settings(dir.path());
    s.notifications.drain_window_ms = 1_500;
    s.notifications.max_connections_per_user = 64;
    let a = start_with(s.clone(), false).await;
    let b = start_with(s.clone(), false).await;
    let (cookie, user) = kit::sign_up_and_log_in(b.base(), &unique_email("move")).await;
    let mut readers = Vec::new();
    for _ in 0..STREAMS {
        readers.push(
            SseReader::open(
                &format!("{}/api/notifications/stream", a.base()),
                &cookie,
                None,
            )
            .await,
        );
    }
    let mut ws = connect_ws(a.base(), "", &cookie).await;

    // Events published on the other instance all along: before, during
    // and after the drain.
    let publisher = {
        let ctx = b.ctx().clone();
        let user = user.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for n in 0..120 {
                ids.push(
                    shoal_notifications::publish_user_event(&ctx, &user, "tick", json!({"n": n}))
                        .await
                        .unwrap(),
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            ids
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let drain_started = Instant::now();
    a.stop();

    let followers = readers.into_iter().map(|mut sse| {
        let (cookie, b_base) = (cookie.clone(), b.base().to_string());
        tokio::spawn(async move {
            let mut got: Vec<String> = Vec::new();
            // On the draining instance until told to move.
            let told_at = loop {
                let (id, e) = sse.next(Duration::from_secs(10)).await;
                if e["kind"] == "stream.reconnect" {
                    assert!(id.is_none(), "the reconnect event has no id");
                    let retry = sse.retry.expect("the reconnect event carries retry:");
                    assert!((100..1000).contains(&retry), "retry {retry}");
                    break Instant::now();
                }
                got.push(id.unwrap());
            };
            assert!(
                sse.ends(Duration::from_secs(5)).await,
                "the stream ends after the reconnect event"
            );
            // Resume on the other instance from the last id seen.
            let mut sse = SseReader::open(
                &format!("{b_base}/api/notifications/stream"),
                &cookie,
                got.last().map(String::as_str),
            )
            .await;
            (told_at, got, sse_reader_rest(&mut sse).await)
        })
    });
    let followers: Vec<_> = followers.collect();

    // The WebSocket is closed with 1012.
    let code = loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("the websocket is told to move")
            .unwrap()
            .unwrap();
        if let tokio_tungstenite::tungstenite::Message::Close(frame) = msg {
            break frame.map(|f| u16::from(f.code));
        }
    };
    assert_eq!(code, Some(1012));

    let published = publisher.await.unwrap();
    let mut moments = Vec::new();
    for f in followers {
        let (told_at, mut got, rest) = f.await.unwrap();
        moments.push(told_at.duration_since(drain_started));
        // Everything after the last event seen before the move, up to
        // the last one published.
        got.extend(rest);
        let last = published.last().unwrap();
        let end = got
            .iter()
            .position(|id| id == last)
            .expect("the last event arrived");
        got.truncate(end + 1);
        let first = published.iter().position(|id| *id == got[0]).unwrap();
        assert_eq!(
            got,
            published[first..],
            "events missed or repeated across the move"
        );
    }
    moments.sort();
    let (earliest, latest) = (moments[0], moments[moments.len() - 1]);
    assert!(
        latest < Duration::from_millis(1_500 + 1_000),
        "the last stream moved after {latest:?}"
    );
    assert!(
        latest - earliest > Duration::from_millis(300),
        "{STREAMS} streams all moved within {:?}: not spread over the window",
        latest - earliest
    );
}

/// A stream opened on an instance that drains already is told to move at
/// once: the reconnect event first, nothing before it (not even the
/// `stream.reset` an unknown `Last-Event-ID` gets elsewhere: its replay
/// is not read, since the client resumes elsewhere from its own last id),
/// and the stream ends.
#[tokio::test]
async fn a_stream_opened_while_the_instance_drains_is_told_to_move_at_once() {
    let dir = kit::TempDir::new("notifications");
    let a = start_with(settings(dir.path()), false).await;
    let (cookie, _) = kit::sign_up_and_log_in(a.base(), &unique_email("late")).await;
    let url = format!("{}/api/notifications/stream", a.base());
    let unknown = "0000000000000000-00000000";
    // Before the drain, an unknown id is reset.
    let mut sse = SseReader::open(&url, &cookie, Some(unknown)).await;
    assert_eq!(
        sse.next(Duration::from_secs(5)).await.1["kind"],
        "stream.reset"
    );
    // Draining, with the server still answering: the open stream is told
    // to move (within the drain window).
    a.ctx().start_draining();
    loop {
        let (_, e) = sse.next(Duration::from_secs(10)).await;
        if e["kind"] == "stream.reconnect" {
            break;
        }
    }
    let mut late = SseReader::open(&url, &cookie, Some(unknown)).await;
    let (id, e) = late.next(Duration::from_secs(5)).await;
    assert_eq!(e["kind"], "stream.reconnect", "{e}");
    assert!(id.is_none(), "the reconnect event has no id");
    assert!(late.retry.is_some(), "the reconnect event carries retry:");
    assert!(
        late.ends(Duration::from_secs(5)).await,
        "the stream ends after the reconnect event"
    );
}

/// Reads a resumed stream until the publisher's last event (`n` 119).
async fn sse_reader_rest(sse: &mut SseReader) -> Vec<String> {
    let mut ids = Vec::new();
    loop {
        let (id, e) = sse.next(Duration::from_secs(15)).await;
        assert_ne!(
            e["kind"], "stream.reset",
            "the resumed stream lost its place"
        );
        ids.push(id.unwrap());
        if e["data"]["n"] == 119 {
            return ids;
        }
    }
}

// ---------------------------------------------------------------- webhooks

#[derive(Clone, Default)]
struct Receiver {
    hits: Arc<Mutex<Vec<(axum::http::HeaderMap, String)>>>,
    /// Status for each request in turn; the last repeats.
    plan: Arc<Vec<u16>>,
}

/// `POST /api/notifications/webhooks` with `body` as the user of `cookie`.
/// `POST /api/notifications/events`: another service, in any language,
/// with `clients.token`, publishes to a user's streams on every instance
/// and to the user's webhooks; without the token, or with a bad body,
/// nothing is published.
#[tokio::test]
async fn a_service_publishes_an_event_to_a_users_streams_and_webhooks() {
    let dir = kit::TempDir::new("notifications");
    let s = settings(dir.path());
    let token = s.clients.token.clone();
    let a = start_with(s.clone(), true).await;
    let b = start_with(s.clone(), false).await;
    let (cookie, user) = kit::sign_up_and_log_in(a.base(), &unique_email("events")).await;
    let (hook_url, rx) = receiver(vec![204]).await;
    let r = register_webhook(
        a.base(),
        &cookie,
        &json!({"url": hook_url, "event_types": ["greeting.sent"]}),
    )
    .await;
    assert_eq!(r.status(), 201);
    let mut sse = SseReader::open(
        &format!("{}/api/notifications/stream", b.base()),
        &cookie,
        None,
    )
    .await;
    let http = reqwest::Client::new();
    let url = format!("{}/api/notifications/events", a.base());
    let event = json!({"user_id": user, "kind": "greeting.sent", "data": {"text": "hello"}});

    // No token, a wrong one, a browser's session: 403.
    for auth in [None, Some("Bearer not-the-token".to_string())] {
        let mut req = http.post(&url).header("cookie", &cookie).json(&event);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let p = kit::problem(req.send().await.unwrap(), 403).await;
        assert!(
            p["detail"].as_str().unwrap().contains("clients.token"),
            "{p}"
        );
    }
    // A bad body: 422 naming each field, nothing written.
    let bad = http
        .post(&url)
        .bearer_auth(&token)
        .json(&json!({"user_id": "", "kind": "Greeting Sent", "data": {}}))
        .send()
        .await
        .unwrap();
    let p = kit::problem(bad, 422).await;
    let fields: Vec<&str> = p["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["user_id", "kind"], "{p}");

    let r = http
        .post(&url)
        .bearer_auth(&token)
        .json(&event)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let published: Value = r.json().await.unwrap();
    let event_id = published["event_id"].as_str().unwrap().to_string();
    let message_id = published["webhook_message_id"]
        .as_str()
        .unwrap()
        .to_string();

    // On the user's stream on the other instance: this event, and only it.
    let (sse_id, got) = sse.next(Duration::from_secs(10)).await;
    assert_eq!(sse_id.as_deref(), Some(event_id.as_str()));
    assert_eq!(got["kind"], "greeting.sent");
    assert_eq!(got["data"]["text"], "hello");
    // And at the user's webhook, signed with the message id it was given.
    let hits = eventually("the webhook delivery", Duration::from_secs(20), || async {
        let h = rx.hits.lock().unwrap().clone();
        (!h.is_empty()).then_some(h)
    })
    .await;
    assert_eq!(hits[0].0["webhook-id"], message_id.as_str());
    let body: Value = serde_json::from_str(&hits[0].1).unwrap();
    assert_eq!(body["type"], "greeting.sent");
    assert_eq!(body["data"]["text"], "hello");
    drop(a);
}

async fn register_webhook(base: &str, cookie: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/api/notifications/webhooks"))
        .header("cookie", cookie)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn receiver(plan: Vec<u16>) -> (String, Receiver) {
    let r = Receiver {
        hits: Arc::default(),
        plan: Arc::new(plan),
    };
    let state = r.clone();
    let router = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                |axum::extract::State(s): axum::extract::State<Receiver>,
                 headers: axum::http::HeaderMap,
                 body: String| async move {
                    let mut hits = s.hits.lock().unwrap();
                    let status = *s.plan.get(hits.len()).or(s.plan.last()).unwrap();
                    hits.push((headers, body));
                    axum::http::StatusCode::from_u16(status).unwrap()
                },
            ),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, r)
}

async fn emit(app: &TestApp, user: &str, kind: &str, data: Value) -> Option<String> {
    let mut tx = app.ctx().db.pool().begin().await.unwrap();
    let id = shoal_notifications::emit_event(app.ctx(), &mut tx, user, kind, data)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    id
}

#[tokio::test]
async fn a_webhook_is_signed_retried_after_a_500_and_logged() {
    let app = start(|_| {}).await;
    let (cookie, user) = kit::sign_up_and_log_in(app.base(), &unique_email("hook")).await;
    let (url, rx) = receiver(vec![500, 204]).await;
    let http = reqwest::Client::new();
    let r = register_webhook(
        app.base(),
        &cookie,
        &json!({"url": url, "event_types": ["order.paid"], "description": "shop"}),
    )
    .await;
    assert_eq!(r.status(), 201);
    let hook: Value = r.json().await.unwrap();
    let secret = hook["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("whsec_"));
    let hook_id = hook["id"].as_str().unwrap().to_string();
    // The secret is shown once.
    let listed: Value = http
        .get(format!("{}/api/notifications/webhooks", app.base()))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["webhooks"].as_array().unwrap().len(), 1);
    assert!(listed["webhooks"][0].get("secret").is_none());

    assert_eq!(emit(&app, &user, "order.refunded", json!({})).await, None);
    let msg_id = emit(&app, &user, "order.paid", json!({"order_id": "o-9"}))
        .await
        .unwrap();
    let hits = eventually("two delivery attempts", Duration::from_secs(20), || async {
        let h = rx.hits.lock().unwrap().clone();
        (h.len() >= 2).then_some(h)
    })
    .await;
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .unwrap();
    for (headers, body) in &hits {
        assert_eq!(headers["webhook-id"], msg_id.as_str());
        let ts = headers["webhook-timestamp"].to_str().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!((now - ts.parse::<i64>().unwrap()).abs() < 60);
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
        mac.update(format!("{msg_id}.{ts}.{body}").as_bytes());
        let expected = format!(
            "v1,{}",
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        );
        assert_eq!(headers["webhook-signature"], expected.as_str());
        let v: Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["type"], "order.paid");
        assert_eq!(v["data"]["order_id"], "o-9");
    }
    assert_eq!(hits[0].1, hits[1].1, "every attempt sends the same body");
    // Both attempts are in the log, newest first; the endpoint is healthy.
    let log: Value = eventually("two logged attempts", Duration::from_secs(10), || async {
        let v: Value = http
            .get(format!(
                "{}/api/notifications/webhooks/{hook_id}/attempts",
                app.base()
            ))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (v["attempts"].as_array().unwrap().len() == 2).then_some(v)
    })
    .await;
    assert_eq!(log["attempts"][0]["status_code"], 204);
    assert_eq!(log["attempts"][1]["status_code"], 500);
    assert_eq!(log["attempts"][1]["attempt"], 1);
    let shown: Value = http
        .get(format!(
            "{}/api/notifications/webhooks/{hook_id}",
            app.base()
        ))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(shown["status"], "enabled");
    // Someone else cannot see it.
    let (other, _) = kit::sign_up_and_log_in(app.base(), &unique_email("nosy")).await;
    let r = http
        .get(format!(
            "{}/api/notifications/webhooks/{hook_id}/attempts",
            app.base()
        ))
        .header("cookie", &other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn an_endpoint_failing_continuously_is_disabled() {
    let app = start(|s| s.notifications.webhook_disable_after_secs = 1).await;
    let (cookie, user) = kit::sign_up_and_log_in(app.base(), &unique_email("fail")).await;
    let (url, rx) = receiver(vec![503]).await;
    let http = reqwest::Client::new();
    let hook: Value = register_webhook(
        app.base(),
        &cookie,
        &json!({"url": url, "event_types": ["*"]}),
    )
    .await
    .json()
    .await
    .unwrap();
    let hook_id = hook["id"].as_str().unwrap().to_string();
    emit(&app, &user, "order.paid", json!({})).await.unwrap();
    let shown: Value = eventually("the endpoint disabled", Duration::from_secs(20), || async {
        let v: Value = http
            .get(format!(
                "{}/api/notifications/webhooks/{hook_id}",
                app.base()
            ))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (v["status"] == "disabled").then_some(v)
    })
    .await;
    assert!(shown["disabled_reason"].as_str().unwrap().contains("503"));
    let attempts = rx.hits.lock().unwrap().len();
    assert!(attempts >= 2, "{attempts}");
    // A disabled endpoint gets no new deliveries.
    assert_eq!(emit(&app, &user, "order.paid", json!({})).await, None);
}

#[tokio::test]
async fn loopback_and_private_webhook_targets_are_refused_without_the_setting() {
    let app = start(|s| s.notifications.allow_private_webhook_targets = false).await;
    let (cookie, _) = kit::sign_up_and_log_in(app.base(), &unique_email("ssrf")).await;
    let http = reqwest::Client::new();
    for url in [
        "http://127.0.0.1:9/hook",
        "http://localhost:9/hook",
        "http://[::1]/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.1/",
    ] {
        let r = register_webhook(
            app.base(),
            &cookie,
            &json!({"url": url, "event_types": ["order.paid"]}),
        )
        .await;
        assert_eq!(r.status(), 422, "{url}");
        let p: Value = r.json().await.unwrap();
        assert_eq!(p["errors"][0]["field"], "url", "{p}");
    }
    for (body, field) in [
        (
            json!({"url": "ftp://example.com/", "event_types": ["a"]}),
            "url",
        ),
        (
            json!({"url": "https://example.com/", "event_types": []}),
            "event_types",
        ),
        (
            json!({"url": "https://example.com/", "event_types": ["Bad Type"]}),
            "event_types",
        ),
    ] {
        let r = register_webhook(app.base(), &cookie, &body).await;
        assert_eq!(r.status(), 422, "{body}");
        let p: Value = r.json().await.unwrap();
        assert_eq!(p["errors"][0]["field"], field, "{p}");
    }
    let listed: Value = http
        .get(format!("{}/api/notifications/webhooks", app.base()))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(listed["webhooks"].as_array().unwrap().is_empty());
}

// ---------------------------------------------------------------- distributed

#[tokio::test]
async fn on_postgres_and_redis_events_cross_instances_and_webhooks_deliver() {
    let test = "on_postgres_and_redis_events_cross_instances_and_webhooks_deliver";
    let (Some(pg), Some(redis)) = (kit::postgres_url(test), kit::redis_url(test)) else {
        return;
    };
    let dir = kit::TempDir::new("notifications");
    let mut s = settings(dir.path());
    s.database.backend = shoal_core::settings::DatabaseBackend::Postgres;
    s.database.url = Some(kit::fresh_postgres_database(&pg).await);
    s.cache.bus = shoal_core::settings::BusBackend::Redis;
    s.cache.bus_redis_url = Some(redis);
    s.cache.redis_prefix = kit::unique_name();
    let a = start_with(s.clone(), true).await;
    let b = start_with(s.clone(), false).await;
    let (cookie, user) = kit::sign_up_and_log_in(a.base(), &unique_email("pg")).await;

    // Realtime: published on A (after two events, to replay one of them), read on B.
    let first = shoal_notifications::publish_user_event(a.ctx(), &user, "tick", json!({"n": 1}))
        .await
        .unwrap();
    let second = shoal_notifications::publish_user_event(a.ctx(), &user, "tick", json!({"n": 2}))
        .await
        .unwrap();
    let mut sse = SseReader::open(
        &format!("{}/api/notifications/stream", b.base()),
        &cookie,
        Some(&first),
    )
    .await;
    assert_eq!(
        sse.next(Duration::from_secs(10)).await.0.as_deref(),
        Some(second.as_str())
    );
    let live = shoal_notifications::publish_user_event(a.ctx(), &user, "tick", json!({"n": 3}))
        .await
        .unwrap();
    assert_eq!(
        sse.next(Duration::from_secs(10)).await.0.as_deref(),
        Some(live.as_str())
    );

    // Webhook: 500 then 200, logged.
    let (url, rx) = receiver(vec![500, 200]).await;
    let http = reqwest::Client::new();
    let hook: Value = register_webhook(
        b.base(),
        &cookie,
        &json!({"url": url, "event_types": ["*"]}),
    )
    .await
    .json()
    .await
    .unwrap();
    let hook_id = hook["id"].as_str().unwrap().to_string();
    emit(&a, &user, "order.paid", json!({"n": 1}))
        .await
        .unwrap();
    eventually("two attempts", Duration::from_secs(20), || async {
        (rx.hits.lock().unwrap().len() >= 2).then_some(())
    })
    .await;
    let log: Value = eventually("the log", Duration::from_secs(10), || async {
        let v: Value = http
            .get(format!(
                "{}/api/notifications/webhooks/{hook_id}/attempts",
                b.base()
            ))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (v["attempts"].as_array().unwrap().len() == 2).then_some(v)
    })
    .await;
    assert_eq!(log["attempts"][0]["status_code"], 200);
    // The welcome email went through the worker on PostgreSQL too.
    eventually("the welcome .eml", Duration::from_secs(20), || async {
        std::fs::read_dir(a.ctx().settings.data_dir.join("mail"))
            .ok()
            .and_then(|mut rd| rd.next())
            .map(|_| ())
    })
    .await;
    assert!(shoal_notifications::prune(a.ctx()).await.is_ok());
}
