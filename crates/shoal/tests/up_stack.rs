//! End to end through `shoal up`: the real binary, its child processes and
//! the gateway, on free loopback ports with a fresh data directory.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use shoal_testkit as kit;

mod common;
use common::Stack;
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Files in `dir` that mention `address` and have the subject `subject`
/// (SMTP sink messages or the embedded `.eml` files).
fn mails(dir: &std::path::Path, address: &str, subject: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".eml"))
        .filter(|e| {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            text.contains(address) && text.contains(&format!("Subject: {subject}"))
        })
        .count()
}

async fn wait_mail(dir: &std::path::Path, address: &str, subject: &str, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while mails(dir, address, subject) == 0 {
        assert!(
            Instant::now() < deadline,
            "no `{subject}` mail to {address} in {}; log:\n{}",
            dir.display(),
            log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        mails(dir, address, subject),
        1,
        "exactly one `{subject}` mail"
    );
}

type Hits = Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, String)>>>;

/// A webhook receiver on a free loopback port: records every delivery.
async fn webhook_receiver() -> (String, Hits) {
    let hits: Hits = Arc::default();
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
            let h = h.clone();
            async move {
                h.lock().unwrap().push((headers, body));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, hits)
}

fn png(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 90])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn alive(pid: u32) -> bool {
    kill(Pid::from_raw(pid as i32), None).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn up_balances_survives_an_instance_kill_and_stops_cleanly() {
    // Mail goes to the SMTP sink of scripts/smtp-sink when the test has
    // one, else to the embedded .eml folder.
    let smtp = kit::smtp_url("up_balances_survives_an_instance_kill_and_stops_cleanly");
    let mut env = vec![(
        "SHOAL_NOTIFICATIONS__ALLOW_PRIVATE_WEBHOOK_TARGETS",
        "true".to_string(),
    )];
    if let Some((url, _)) = &smtp {
        env.push(("SHOAL_NOTIFICATIONS__SMTP_URL", url.clone()));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut stack = Stack::start(3, &env);
    let mail_dir = match &smtp {
        Some((_, dir)) => dir.clone(),
        None => stack.dir.path().join("data/mail"),
    };
    stack.wait_ready(3).await;
    let http = kit::http_client();
    // Nothing of the admin surface answers without the stack's token:
    // not the gateway's pools or metrics, not an instance's metrics
    // through the gateway, not the registration API (the review's first
    // finding, from a client on loopback).
    for path in ["/_gateway/pools", "/_gateway/metrics", "/metrics"] {
        let r = http.get(stack.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} answered without a token");
    }
    let rogue = http
        .post(stack.url("/_gateway/admin/register"))
        .json(&json!({"pool": "default", "url": "http://127.0.0.1:9", "ttl_secs": 60}))
        .send()
        .await
        .unwrap();
    assert_eq!(rogue.status(), 401);
    // The development webhook secret signs nothing here: `shoal up` made
    // a random one for this data directory.
    let body = json!({"type": "payment_intent.succeeded", "data": {"object": {"id": "pi_x", "metadata": {"payment_id": "pay_x"}}}}).to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let forged = http
        .post(stack.url("/api/payments/webhooks"))
        .header(
            "stripe-signature",
            shoal_sandbox::signature::sign(
                shoal_core::settings::DEVELOPMENT_WEBHOOK_SECRET,
                now,
                body.as_bytes(),
            ),
        )
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 400);
    assert!(forged.text().await.unwrap().contains("signature refused"));
    // The instances joined the gateway's pool through its registration API.
    let pools: Value = http
        .get(stack.url("/_gateway/pools"))
        .bearer_auth(stack.admin_token())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let members = pools["pools"][0]["instances"].as_array().unwrap();
    assert_eq!(members.len(), 3, "{pools}");
    assert!(members.iter().all(|i| i["registered"] == true), "{pools}");
    // An address of this run only: the SMTP sink is shared.
    let email = format!("ada-{}@example.com", kit::unique_name());

    // sign up and log in through the gateway
    stack.sign_up_and_log_in(&http, &email).await;
    wait_mail(&mail_dir, &email, "Welcome to Shoal", || stack.log()).await;

    // A webhook endpoint for order.paid, at a receiver of this test.
    let (hook_url, hits) = webhook_receiver().await;
    let r = http
        .post(stack.url("/api/notifications/webhooks"))
        .json(&json!({"url": hook_url, "event_types": ["order.paid"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let hook: Value = r.json().await.unwrap();
    let secret = hook["secret"].as_str().unwrap().to_string();

    // An image upload is processed in the background: thumbnail ready.
    let r = http
        .post(stack.url("/api/media/uploads?visibility=public"))
        .header("content-type", "image/png")
        .body(png(320, 200))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let upload: Value = r.json().await.unwrap();
    let upload_id = upload["id"].as_str().unwrap().to_string();

    // Checkout through the gateway: the same key twice is one order, one
    // charge at the sandbox, and the order gets paid in the background.
    let product = stack.a_product(&http).await;
    let body = json!({"items": [{"product_id": product, "quantity": 1}]});
    // An SSE stream straight on serve-3; the payment is settled by the
    // worker, and its event must arrive here through the bus.
    let serve3 = stack.addresses()["serve-3"].clone();
    let mut sse = http
        .get(format!("http://{serve3}/api/notifications/stream"))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let mut ids = Vec::new();
    for _ in 0..2 {
        let r = http
            .post(stack.url("/api/orders"))
            .header("idempotency-key", "e2e-order-1")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let order: Value = r.json().await.unwrap();
        ids.push(order["id"].as_str().unwrap().to_string());
    }
    assert_eq!(ids[0], ids[1], "one order for one key");
    stack
        .wait_paid(&http, &ids[0], Instant::now() + Duration::from_secs(30))
        .await;

    // One charge at the sandbox for the order placed twice.
    assert_eq!(
        stack.charges_for(&ids[0]).await,
        1,
        "one charge for one key"
    );

    // The receipt reaches the buyer's inbox; the signed webhook arrives.
    let receipt = format!("Receipt for order {}", ids[0]);
    wait_mail(&mail_dir, &email, &receipt, || stack.log()).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let (headers, body) = loop {
        if let Some(hit) = hits.lock().unwrap().first().cloned() {
            break hit;
        }
        assert!(
            Instant::now() < deadline,
            "no webhook delivery; log:\n{}",
            stack.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let msg_id = headers["webhook-id"].to_str().unwrap();
    let ts: i64 = headers["webhook-timestamp"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let expected = shoal_notifications::sign_webhook(&secret, msg_id, ts, body.as_bytes()).unwrap();
    assert_eq!(headers["webhook-signature"].to_str().unwrap(), expected);
    let event: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(event["type"], "order.paid");
    assert_eq!(event["data"]["order_id"], ids[0].as_str());

    // The upload is ready by now, with its thumbnail served.
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = loop {
        let v: Value = http
            .get(stack.url(&format!("/api/media/uploads/{upload_id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["status"] == "ready" {
            break v;
        }
        assert_ne!(v["status"], "failed", "{v}");
        assert!(Instant::now() < deadline, "upload not ready: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(ready["width"], 320);
    let thumb = http
        .get(stack.url(ready["thumbnail_url"].as_str().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(thumb.status(), 200);
    let thumb = image::load_from_memory(&thumb.bytes().await.unwrap()).unwrap();
    assert!(thumb.width() <= 256 && thumb.height() <= 256);

    let mut seen = String::new();
    let got = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(chunk)) = sse.chunk().await {
            seen.push_str(&String::from_utf8_lossy(&chunk));
            if seen.contains("order.paid") {
                return true;
            }
        }
        false
    })
    .await;
    assert!(
        matches!(got, Ok(true)),
        "order.paid event on serve-3's SSE stream; got: {seen}"
    );
    drop(sse);

    // 1,000 requests reach every instance
    let mut by_instance: HashMap<String, usize> = HashMap::new();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let http = http.clone();
        let url = stack.url("/api/accounts/me");
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..50 {
                let r = http.get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200);
                seen.push(
                    r.headers()["x-shoal-instance"]
                        .to_str()
                        .unwrap()
                        .to_string(),
                );
            }
            seen
        }));
    }
    for t in tasks {
        for i in t.await.unwrap() {
            *by_instance.entry(i).or_default() += 1;
        }
    }
    assert_eq!(by_instance.values().sum::<usize>(), 1000);
    assert_eq!(
        by_instance.len(),
        3,
        "every instance served: {by_instance:?}"
    );

    // SIGKILL one instance while a stream of GETs with the session runs
    let children = stack.children();
    let victim = children["serve-2"];
    let running = Arc::new(AtomicBool::new(true));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (http, url) = (http.clone(), stack.url("/api/accounts/me"));
        let (running, ok, failed) = (running.clone(), ok.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            while running.load(Ordering::Relaxed) {
                match http.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!(
                            "failed GET: {} {}",
                            r.status(),
                            r.text().await.unwrap_or_default()
                        );
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("failed GET: {e}");
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    running.store(false, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert!(ok > 100, "the stream ran: {ok} ok");
    assert_eq!(
        failed, 0,
        "zero failed GETs while an instance died ({ok} ok)"
    );

    // the supervisor brings the instance back, and it serves again
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let pid = stack.children().get("serve-2").copied();
        if matches!(pid, Some(p) if p != victim) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "serve-2 was not restarted; log:\n{}",
            stack.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = http
            .get(stack.url("/api/accounts/me"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "session still valid");
        if r.headers()["x-shoal-instance"] == "serve-2" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "restarted serve-2 never got traffic again"
        );
    }

    // SIGTERM stops everything; no child remains
    let pids: Vec<u32> = stack.children().values().copied().collect();
    assert_eq!(
        pids.len(),
        6,
        "gateway, 3 instances, 1 worker, sandbox: {pids:?}"
    );
    let took = stack.stop(Duration::from_secs(30));
    eprintln!("stack stopped in {took:?}");
    for pid in pids {
        assert!(!alive(pid), "child {pid} outlived the supervisor");
    }
}

/// Issue 5's payment fault: the worker is SIGKILLed again and again while
/// it charges slow cards; every order still ends paid with exactly one
/// charge at the sandbox (the payment id is the provider's idempotency
/// key, and the order settles once).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_during_payments_charges_each_order_once() {
    const ORDERS: usize = 6;
    let mut stack = Stack::start(
        2,
        &[
            ("SHOAL_WORKER__LEASE_MS", "1500"),
            ("SHOAL_SANDBOX__SLOW_MS", "700"),
            ("SHOAL_PAYMENTS__REQUEST_TIMEOUT_MS", "3000"),
        ],
    );
    stack.wait_ready(2).await;
    let http = kit::http_client();
    stack.sign_up_and_log_in(&http, "kill@example.com").await;
    let product = stack.a_product(&http).await;
    let body = json!({"items": [{"product_id": product, "quantity": 1}], "payment_method": "pm_card_slow"});
    let mut orders = Vec::new();
    for n in 0..ORDERS {
        let r = http
            .post(stack.url("/api/orders"))
            .header("idempotency-key", format!("kill-{n}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let o: Value = r.json().await.unwrap();
        orders.push(o["id"].as_str().unwrap().to_string());
    }

    // Kill the worker while charges are in flight (each takes 700 ms at
    // the sandbox), three times, letting the supervisor restart it.
    let mut kills = 0;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        // The running worker (one being restarted has no pid yet).
        let deadline = Instant::now() + Duration::from_secs(20);
        let pid = loop {
            if let Some(pid) = stack.children().get("worker-1").copied() {
                break pid;
            }
            assert!(
                Instant::now() < deadline,
                "worker-1 not running; stack.json: {:?}; log:\n{}",
                std::fs::read_to_string(stack.dir.path().join("data/run/stack.json")),
                stack.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
        kills += 1;
        let deadline = Instant::now() + Duration::from_secs(20);
        while stack.children().get("worker-1").copied() == Some(pid) {
            assert!(Instant::now() < deadline, "worker not restarted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(kills, 3);
    // The new pid can show before the supervisor's log line is written.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stack.log().matches("child exited; restarting").count() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        stack.log().matches("child exited; restarting").count(),
        3,
        "three worker deaths seen by the supervisor"
    );

    let deadline = Instant::now() + Duration::from_secs(60);
    for id in &orders {
        stack.wait_paid(&http, id, deadline).await;
    }
    for id in &orders {
        let n = stack.charges_for(id).await;
        assert_eq!(n, 1, "order {id} charged {n} times");
    }
    stack.stop(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_load_finishes_in_flight_requests() {
    let mut stack = Stack::start(2, &[("SHOAL_SERVE__DEBUG_ROUTES", "true")]);
    stack.wait_ready(2).await;
    // A fresh connection per request, so a refused connect (the listener
    // closed) is told apart from a request cut off mid-flight.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let running = Arc::new(AtomicBool::new(true));
    let completed = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let broken = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (http, url) = (http.clone(), stack.url("/_debug/sleep?ms=400"));
        let (running, completed, refused, broken) = (
            running.clone(),
            completed.clone(),
            refused.clone(),
            broken.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while running.load(Ordering::Relaxed) {
                match http.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        completed.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        broken.fetch_add(1, Ordering::Relaxed);
                        eprintln!("in-flight request got {}", r.status());
                    }
                    Err(e) if e.is_connect() => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err(e) => {
                        broken.fetch_add(1, Ordering::Relaxed);
                        eprintln!("in-flight request broke: {e:?}");
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let pids: Vec<u32> = stack.children().values().copied().collect();
    let before = completed.load(Ordering::Relaxed);
    let took = tokio::task::block_in_place(|| stack.stop(Duration::from_secs(30)));
    running.store(false, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let after = completed.load(Ordering::Relaxed);
    eprintln!(
        "stopped in {took:?}; completed {before} before SIGTERM, {after} in all; refused {}",
        refused.load(Ordering::Relaxed)
    );
    assert!(after > before, "requests in flight at SIGTERM completed");
    assert_eq!(
        broken.load(Ordering::Relaxed),
        0,
        "no accepted request was cut off"
    );
    for pid in pids {
        assert!(!alive(pid), "child {pid} outlived the supervisor");
    }
}

#[test]
fn config_prints_effective_settings_and_bad_values_name_the_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["config"])
        .env("SHOAL_DATABASE__BACKEND", "postgres")
        .env("SHOAL_DATABASE__URL", "postgres://bob:hunter2@db/x")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("backend = \"postgres\""), "{text}");
    assert!(!text.contains("hunter2"), "secrets are redacted: {text}");

    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["config"])
        .env("SHOAL_SESSIONS__BACKEND", "memcached")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("sessions.backend") && err.contains("redis"),
        "{err}"
    );

    let dir = kit::TempDir::new("cfg");
    let file = dir.path().join("shoal.toml");
    std::fs::write(&file, "[up]\ninstances = 4\nport = \"eighty\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["config", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("up.port"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["up", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(
        help.contains("--instances") && help.contains("--port"),
        "{help}"
    );
}

#[test]
fn one_shot_commands_print_their_result_alone_on_stdout() {
    let dir = kit::TempDir::new("oneshot");
    let shoal = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .env("SHOAL_LOG__LEVEL", "info")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            String::from_utf8(out.stdout).unwrap(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    // The migrations' log lines go to stderr; stdout is the one result line.
    let (out, err) = shoal(&["migrate"]);
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.starts_with("migrations applied"), "{out}");
    assert!(
        err.contains("migration applied"),
        "the log is on stderr: {err}"
    );
    let (out, _) = shoal(&["jobs", "list", "--json"]);
    let list: Value = serde_json::from_str(&out).expect("jobs list --json is JSON alone");
    assert_eq!(list["jobs"], json!([]));
    let (out, _) = shoal(&["jobs", "stats", "--json"]);
    let stats: Value = serde_json::from_str(&out).expect("jobs stats --json is JSON alone");
    assert!(stats["queues"].is_array(), "{stats}");
    let (out, _) = shoal(&["completions", "bash"]);
    assert!(
        out.contains("_shoal()") && out.contains("completions"),
        "a bash completion script"
    );
}

#[test]
fn a_crash_looping_child_stops_the_stack_loudly() {
    let dir = kit::TempDir::new("crashloop");
    let started = Instant::now();
    // An unknown service makes every `serve` child exit at start.
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args([
            "up",
            "--port",
            &kit::free_port().to_string(),
            "--instances",
            "1",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env("SHOAL_SERVE__SERVICES", "no-such-service")
        .env("SHOAL_UP__MAX_RESTARTS", "2")
        .env("SHOAL_UP__SANDBOX", "false")
        .env("SHOAL_LOG__LEVEL", "error")
        .output()
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "gave up in time"
    );
    assert_eq!(out.status.code(), Some(1), "exit status says it failed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("serve-1 keeps crashing"), "{stderr}");
}

/// Every role but `shoal up` refuses the development secrets, naming each
/// key, unless the run says it is a development one; a gateway whose
/// instances register refuses to start without an admin token.
#[test]
fn roles_refuse_development_secrets_outside_a_development_run() {
    let dir = kit::TempDir::new("devsecrets");
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shoal"));
        cmd.args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .env("SHOAL_LOG__LEVEL", "error")
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };
    for (role, keys) in [
        (
            "serve",
            &[
                "payments.api_key",
                "payments.webhook_secret",
                "clients.token",
            ][..],
        ),
        ("worker", &["payments.api_key", "payments.webhook_secret"]),
        ("sandbox", &["sandbox.api_key", "sandbox.webhook_secret"]),
    ] {
        let args: &[&str] = match role {
            "worker" => &["worker"],
            _ => &[role, "--listen", "127.0.0.1:0"],
        };
        let out = run(args, &[]);
        assert_eq!(out.status.code(), Some(1), "{role} started");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("development secrets") && keys.iter().all(|k| err.contains(k)),
            "{role}: {err}"
        );
    }
    // One secret replaced, the other still known: the message names it.
    let out = run(
        &["serve", "--listen", "127.0.0.1:0"],
        &[("SHOAL_PAYMENTS__API_KEY", "sk_live_0123456789abcdef")],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("payments.webhook_secret") && !err.contains("payments.api_key"),
        "{err}"
    );
    let out = run(&["gateway", "--registered", "--listen", "127.0.0.1:0"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("gateway.admin_token"), "{err}");

    // A development run starts, warning about each secret.
    let port = kit::free_port();
    let log = std::fs::File::create(dir.path().join("sandbox.log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["sandbox", "--development", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(dir.path())
        .env("SHOAL_LOG__LEVEL", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut up = false;
    while Instant::now() < deadline && !up {
        up = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    let text = std::fs::read_to_string(dir.path().join("sandbox.log")).unwrap();
    assert!(up, "the sandbox did not start in a development run: {text}");
    assert!(
        text.contains("development secret") && text.contains("sandbox.webhook_secret"),
        "{text}"
    );
}

/// `shoal jobs` on `queue.backend = "nats"`: the benchmark runs on
/// JetStream, and the operator commands read the JetStream store the
/// workers claim from (the key was refused as `queue.queue` before).
#[test]
fn jobs_bench_and_stats_run_on_nats() {
    let Some(url) = kit::nats_url("jobs_bench_and_stats_run_on_nats") else {
        return;
    };
    let dir = kit::TempDir::new("jobs-nats");
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["jobs", "bench", "--backend", "nats", "--nats-url", &url])
        .args(["--jobs", "300", "--concurrency", "4", "--json"])
        .arg("--data-dir")
        .arg(dir.path())
        .env("SHOAL_LOG__LEVEL", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["peer"], "shoal/nats");
    assert_eq!(report["jobs"], 300);
    assert!(report["complete_per_sec"].as_f64().unwrap() > 0.0);

    let prefix = format!("jobsnats{}", &kit::unique_name()[..10]);
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["jobs", "stats"])
        .arg("--data-dir")
        .arg(dir.path())
        .env("SHOAL_QUEUE__BACKEND", "nats")
        .env("SHOAL_QUEUE__NATS_URL", &url)
        .env("SHOAL_QUEUE__NATS_PREFIX", &prefix)
        .env("SHOAL_LOG__LEVEL", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("QUEUE"));
    // Without its URL the backend is refused, naming the key.
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["config"])
        .env("SHOAL_QUEUE__BACKEND", "nats")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("queue.nats_url"));
}

/// A private `nats-server -js` on `port`, or `None` when the binary is
/// not installed.
fn nats(port: u16, store: &std::path::Path) -> Option<kit::Daemon> {
    let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let mut cmd = Command::new(bin);
    cmd.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store);
    kit::Daemon::start(cmd, port)
}

/// The worker's `/readyz`, on the address it was given, says whether it
/// can claim jobs: 503 naming JetStream while NATS is down, 200 again by
/// itself once NATS is back; `/healthz` stays 200 throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_readyz_follows_its_job_store_down_and_back() {
    let dir = kit::TempDir::new("worker-ready");
    let nats_port = kit::free_port();
    let Some(server) = nats(nats_port, &dir.path().join("js")) else {
        println!("skipped: nats-server is not installed");
        return;
    };
    let port = kit::free_port();
    let log = std::fs::File::create(dir.path().join("worker.log")).unwrap();
    let mut worker = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["worker", "--development", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("SHOAL_QUEUE__BACKEND", "nats")
        .env(
            "SHOAL_QUEUE__NATS_URL",
            format!("nats://127.0.0.1:{nats_port}"),
        )
        .env("SHOAL_LOG__LEVEL", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let status = |path: &'static str| {
        let http = http.clone();
        async move {
            match http
                .get(format!("http://127.0.0.1:{port}{path}"))
                .timeout(Duration::from_secs(3))
                .send()
                .await
            {
                Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                Err(_) => (0, String::new()),
            }
        }
    };
    let log = || std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default();
    let becomes = |want: u16, limit: Duration| {
        let status = &status;
        let log = &log;
        async move {
            let deadline = Instant::now() + limit;
            loop {
                let (s, body) = status("/readyz").await;
                if s == want {
                    return body;
                }
                assert!(
                    Instant::now() < deadline,
                    "readyz {s}, not {want}: {body}; log:\n{}",
                    log()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    becomes(200, Duration::from_secs(30)).await;
    drop(server);
    let body = becomes(503, Duration::from_secs(15)).await;
    assert!(body.contains("NATS"), "{body}");
    assert_eq!(status("/healthz").await.0, 200);
    let _server = nats(nats_port, &dir.path().join("js")).expect("nats-server again");
    becomes(200, Duration::from_secs(30)).await;
    let _ = kill(Pid::from_raw(worker.id() as i32), Signal::SIGTERM);
    let _ = worker.wait();
}

/// A service outside Shoal, end to end through `shoal up`: it enqueues a
/// job over HTTP through the gateway with its own scoped service token,
/// and the stack's worker pushes the job back to its endpoint, signed,
/// with the job's id as `webhook-id` (docs/queue.md, "Push delivery").
#[tokio::test]
async fn a_job_from_an_outside_service_is_pushed_back_to_it() {
    type Got = Arc<std::sync::Mutex<Vec<(axum::http::HeaderMap, String)>>>;
    let got: Got = Arc::default();
    let router = axum::Router::new()
        .route(
            "/jobs",
            axum::routing::post(
                |axum::extract::State(got): axum::extract::State<Got>,
                 headers: axum::http::HeaderMap,
                 body: String| async move {
                    got.lock().unwrap().push((headers, body));
                    axum::http::StatusCode::NO_CONTENT
                },
            ),
        )
        .with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}/jobs", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });

    const SECRET: &str = "push-secret-0123456789";
    let (token, hash) = shoal_runtime::session::new_service_token();
    let dir = kit::TempDir::new("push-up");
    let config = dir.path().join("shoal.toml");
    std::fs::write(
        &config,
        format!(
            "[[clients.service_tokens]]\nname = \"greetings\"\nsha256 = \"{hash}\"\n\
             scopes = [\"jobs:enqueue\"]\n\n[[worker.push]]\nqueue = \"greetings\"\n\
             url = \"{endpoint}\"\nsecret = \"{SECRET}\"\n"
        ),
    )
    .unwrap();
    let mut stack = Stack::start(2, &[("SHOAL_CONFIG", config.to_str().unwrap())]);
    stack.wait_ready(2).await;

    let http = reqwest::Client::new();
    let r = http
        .post(stack.url("/api/jobs"))
        .bearer_auth(&token)
        .json(&json!({"queue": "greetings", "kind": "greeting.send", "payload": {"to": "ada"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", stack.log());
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while got.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the job was not pushed within 30 s: {}",
            stack.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (headers, body) = got.lock().unwrap()[0].clone();
    assert_eq!(headers["webhook-id"], id.as_str());
    let ts: i64 = headers["webhook-timestamp"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        headers["webhook-signature"],
        shoal_runtime::push::standard_webhooks_signature(
            SECRET.as_bytes(),
            &id,
            ts,
            body.as_bytes()
        )
        .as_str()
    );
    let job: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(job["payload"]["to"], "ada");
    stack.stop(Duration::from_secs(30));
}
