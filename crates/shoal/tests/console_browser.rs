//! The console in a real browser (headless Chromium through chromedriver),
//! against a whole `shoal up` stack: log in, see the three instances, see a
//! SIGKILLed one go down and come back, retry dead jobs from the queue page
//! and see them succeed; without the login nothing is served. Screenshots
//! of each page go to `target/console-screenshots/` (docs/console/ holds
//! copies).

mod common;

use common::webdriver::Browser;
use common::Stack;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use shoal_testkit as kit;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A webhook receiver that answers 500 until `ok` is set, then 200.
async fn flaky_receiver(ok: Arc<AtomicBool>, delivered: Arc<AtomicUsize>) -> String {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move || {
            let (ok, delivered) = (ok.clone(), delivered.clone());
            async move {
                if ok.load(Ordering::SeqCst) {
                    delivered.fetch_add(1, Ordering::SeqCst);
                    (axum::http::StatusCode::OK, "ok")
                } else {
                    (
                        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                        "down for the test",
                    )
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

fn screenshots_dir() -> std::path::PathBuf {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn screenshot(browser: &Browser, name: &str) {
    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG"), "a PNG");
    std::fs::write(screenshots_dir().join(format!("{name}.png")), png).unwrap();
}

/// Runs the job search with these filters and returns the rows' job ids
/// and states.
async fn search(browser: &Browser, state: &str, kind: &str) -> Vec<(String, String)> {
    browser
        .run(
            "document.getElementById('jobs-state').value = arguments[0];
             const k = document.getElementById('jobs-kind'); k.value = arguments[1];",
            json!([state, kind]),
        )
        .await;
    browser.click("#jobs-search").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let rows = browser
        .run(
            "return [...document.querySelectorAll('#jobs-table tr[data-job]')].map(r =>
                [r.dataset.job, (r.querySelector('[data-field=state]') || {}).textContent || '']);",
            json!([]),
        )
        .await;
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap().to_string(),
                r[1].as_str().unwrap().trim().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_console_in_a_browser_follows_a_kill_and_retries_dead_jobs() {
    let Some(driver) =
        kit::chromedriver("the_console_in_a_browser_follows_a_kill_and_retries_dead_jobs")
    else {
        return;
    };
    let ok = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(AtomicUsize::new(0));
    let hook = flaky_receiver(ok.clone(), delivered.clone()).await;
    let stack = Stack::start(
        3,
        &[
            ("SHOAL_NOTIFICATIONS__ALLOW_PRIVATE_WEBHOOK_TARGETS", "true"),
            // One attempt: a failed delivery goes straight to the dead letters.
            ("SHOAL_NOTIFICATIONS__WEBHOOK_MAX_ATTEMPTS", "1"),
        ],
    );
    stack.wait_ready(3).await;

    // Without the login: nothing.
    let anonymous = reqwest::Client::new();
    for path in [
        "/_shoal/api/live",
        "/_shoal/api/jobs?state=dead",
        "/_shoal/api/session",
    ] {
        let r = anonymous.get(stack.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }

    let browser = Browser::start(&driver).await;
    // `/` leads a browser to the console, which asks for the token.
    browser.goto(&stack.url("/")).await;
    let (_, login_shown) = browser
        .wait_text("#login-submit", Duration::from_secs(10), |_| true)
        .await;
    assert!(
        login_shown && browser.visible("#login-token").await,
        "the login form is shown"
    );
    assert!(
        !browser.visible("#app").await,
        "nothing but the login before it"
    );
    browser.type_into("#login-token", "not the token").await;
    browser.click("#login-submit").await;
    let (error, refused) = browser
        .wait_text("#login-error", Duration::from_secs(5), |t| !t.is_empty())
        .await;
    assert!(refused, "a wrong token is refused on the page: {error:?}");
    screenshot(&browser, "login").await;
    browser
        .run(
            "document.getElementById('login-token').value = '';",
            json!([]),
        )
        .await;
    browser
        .type_into("#login-token", &stack.admin_token())
        .await;
    browser.click("#login-submit").await;

    // Three instances, each up.
    for name in ["serve-1", "serve-2", "serve-3"] {
        let css = format!("tr[data-process=\"{name}\"] [data-field=\"state\"]");
        let (text, up) = browser
            .wait_text(&css, Duration::from_secs(15), |t| t == "up")
            .await;
        assert!(up, "{name} is shown {text:?}; log:\n{}", stack.log());
    }
    let instances = browser
        .run(
            "return document.querySelectorAll('#instances-table tr[data-instance]').length;",
            json!([]),
        )
        .await;
    assert_eq!(instances, 3, "three instances in the gateway's pool");
    // Some traffic for the charts, still flowing for the screenshots.
    let traffic = tokio::spawn({
        let (client, url) = (
            anonymous.clone(),
            stack.url("/api/catalog/products?per_page=1"),
        );
        async move {
            let until = Instant::now() + Duration::from_secs(6);
            while Instant::now() < until {
                let _ = client.get(&url).send().await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The charts by instance: a line and a legend entry for each.
    let lines = browser
        .run(
            "return document.querySelectorAll('#chart-instance-rps path.line').length;",
            json!([]),
        )
        .await;
    assert_eq!(lines, 3, "a line per instance in the req/s chart");
    let legend = browser
        .text("#chart-instance-p99-legend")
        .await
        .unwrap_or_default();
    for name in ["serve-1", "serve-2", "serve-3"] {
        assert!(
            legend.contains(name),
            "{name} not in the p99 legend: {legend:?}"
        );
    }
    screenshot(&browser, "overview").await;
    // The gateways of the deployment: under `shoal up`, this one.
    let gateways = browser
        .run(
            "return [...document.querySelectorAll('#gateways-table tr[data-gateway]')]
                 .map(r => r.dataset.gateway);",
            json!([]),
        )
        .await;
    assert_eq!(gateways, json!(["this"]), "one gateway, this one");
    browser
        .run(
            "document.getElementById('gateways-table').scrollIntoView({block: 'center'});",
            json!([]),
        )
        .await;
    screenshot(&browser, "overview-gateways").await;
    traffic.await.unwrap();

    // SIGKILL serve-2: shown down within 2 s, then back after the
    // supervisor restarts it.
    let pid = stack.children()["serve-2"];
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    let css = "tr[data-process=\"serve-2\"] [data-field=\"state\"]";
    let (text, down) = browser
        .wait_text(css, Duration::from_secs(2), |t| t == "down")
        .await;
    assert!(
        down,
        "serve-2 not shown down within 2 s of its kill (shown {text:?})"
    );
    println!("serve-2 shown down {:?} after its kill", killed.elapsed());
    let (text, back) = browser
        .wait_text(css, Duration::from_secs(30), |t| t == "up")
        .await;
    assert!(
        back,
        "serve-2 not shown up again (shown {text:?}); log:\n{}",
        stack.log()
    );
    assert_ne!(stack.children()["serve-2"], pid, "a new process");
    let event = browser.text("#events li").await.unwrap_or_default();
    assert!(!event.is_empty(), "the events list tells of it");

    // The gateway page: pools with their actions, the cache.
    browser.goto(&stack.url("/_shoal/#gateway")).await;
    let (_, drains) = browser
        .wait_text(
            "#page-gateway button[data-action=\"drain\"]",
            Duration::from_secs(5),
            |_| true,
        )
        .await;
    assert!(drains, "the gateway page offers to drain an instance");
    assert!(
        browser
            .visible("#page-gateway button[data-action=\"eject\"]")
            .await,
        "and to eject one"
    );
    screenshot(&browser, "gateway").await;

    // Dead letters: a user's webhook whose deliveries fail once (one attempt).
    let http = kit::http_client();
    let email = format!("console-{}@example.com", kit::unique_name());
    stack.sign_up_and_log_in(&http, &email).await;
    let r = http
        .post(stack.url("/api/notifications/webhooks"))
        .json(&json!({"url": hook, "event_types": ["*"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let product = stack.a_product(&http).await;
    let r = http
        .post(stack.url("/api/orders"))
        .header("idempotency-key", "console-order-1")
        .json(&json!({"items": [{"product_id": product, "quantity": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());

    browser.goto(&stack.url("/_shoal/#queues")).await;
    let kind = "notifications.webhook";
    let deadline = Instant::now() + Duration::from_secs(30);
    let dead = loop {
        let rows = search(&browser, "dead", kind).await;
        if !rows.is_empty() {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "no dead webhook job shown; log:\n{}",
            stack.log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(dead.iter().all(|(_, state)| state == "dead"), "{dead:?}");
    // The queue's counts show them (the feed asks the worker every 2 s).
    let (row, counted) = browser
        .wait_text(
            "#queues-table tr[data-queue=\"notifications\"]",
            Duration::from_secs(6),
            |t| !t.is_empty(),
        )
        .await;
    assert!(counted, "the notifications queue is listed: {row:?}");
    screenshot(&browser, "queues").await;

    // The receiver is back: retry the first from its row, the rest (if
    // any) with the bulk button.
    ok.store(true, Ordering::SeqCst);
    browser.run("window.confirm = () => true;", json!([])).await;
    let first = dead[0].0.clone();
    browser
        .click(&format!(
            "tr[data-job=\"{first}\"] button[data-action=\"retry\"]"
        ))
        .await;
    if dead.len() > 1 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rest = search(&browser, "dead", kind).await;
        for (id, _) in &rest {
            browser
                .click(&format!("tr[data-job=\"{id}\"] input.job-select"))
                .await;
        }
        if !rest.is_empty() {
            browser.click("#jobs-retry-selected").await;
        }
    }
    let (flash, told) = browser
        .wait_text("#flash", Duration::from_secs(5), |t| t.contains("retried"))
        .await;
    assert!(told, "the page says what was retried: {flash:?}");

    // Each succeeds: found among the succeeded, none left dead.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let succeeded = search(&browser, "succeeded", kind).await;
        let still_dead = search(&browser, "dead", kind).await;
        let all_done = dead
            .iter()
            .all(|(id, _)| succeeded.iter().any(|(s, st)| s == id && st == "succeeded"));
        if all_done && still_dead.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "retried jobs did not succeed: succeeded {succeeded:?}, dead {still_dead:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        delivered.load(Ordering::SeqCst) >= dead.len(),
        "each retried delivery reached the receiver"
    );

    // The worker's own row on the overview counts what it ran: the
    // failed deliveries and the retried ones that succeeded (its own
    // figures, from its `/_shoal/worker`, asked every 2 s).
    browser.goto(&stack.url("/_shoal/#overview")).await;
    let want = dead.len() as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let row = browser
            .run(
                "const r = document.querySelector('#workers-table tr[data-worker]');
                 if (!r) return null;
                 const f = (n) => ((r.querySelector(`[data-field=${n}]`) || {}).textContent || '')
                     .replace(/,/g, '');
                 return [r.dataset.worker, f('succeeded'), f('failed'), f('running'), f('rate')];",
                json!([]),
            )
            .await;
        let count = |i: usize| row[i].as_str().and_then(|t| t.parse::<u64>().ok());
        if let (Some(succeeded), Some(failed), Some(_running)) = (count(1), count(2), count(3)) {
            if succeeded >= want && failed >= want {
                println!("worker row: {row}");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the worker's row does not count its {want} failures and successes: {row}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    browser
        .run(
            "document.getElementById('workers-table').scrollIntoView({block: 'center'});",
            json!([]),
        )
        .await;
    screenshot(&browser, "overview-workers").await;
    browser.goto(&stack.url("/_shoal/#queues")).await;

    // The job's details: its one failed attempt, then its success.
    search(&browser, "succeeded", kind).await;
    browser
        .click(&format!("tr[data-job=\"{first}\"] .job-id"))
        .await;
    let (detail, shown) = browser
        .wait_text("#job-detail", Duration::from_secs(5), |t| {
            t.contains(&first)
        })
        .await;
    assert!(shown, "the job's details are shown: {detail:?}");
    assert!(
        detail.unwrap_or_default().contains("500"),
        "the details show the failed attempt's error"
    );
    screenshot(&browser, "job").await;
    // Two open event streams of the user, counted on the realtime page.
    let mut streams = Vec::new();
    for _ in 0..2 {
        let r = http
            .get(stack.url("/api/notifications/stream"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        streams.push(r);
    }
    browser.goto(&stack.url("/_shoal/#realtime")).await;
    let (total, counted) = browser
        .wait_text("#realtime-total", Duration::from_secs(6), |t| t == "2")
        .await;
    assert!(
        counted,
        "the realtime page counts the two streams: {total:?}"
    );
    screenshot(&browser, "realtime").await;
    drop(streams);

    // The API reference, from /api/openapi.json.
    browser.goto(&stack.url("/_shoal/#api")).await;
    let (_, listed) = browser
        .wait_text(
            "[data-op=\"POST /api/orders\"]",
            Duration::from_secs(10),
            |t| t.contains("/api/orders"),
        )
        .await;
    assert!(listed, "the API page lists the checkout");
    browser
        .click("[data-op=\"POST /api/orders\"] summary")
        .await;
    browser
        .run(
            "document.querySelector('[data-op=\"POST /api/orders\"]').scrollIntoView();",
            json!([]),
        )
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    screenshot(&browser, "api").await;

    // Logging out closes the page to this browser.
    browser.click("#logout").await;
    let (_, out) = browser
        .wait_text("#login-submit", Duration::from_secs(5), |_| true)
        .await;
    assert!(
        out && browser.visible("#login-token").await,
        "back to the login"
    );
    let session: Value = browser
        .run(
            "return fetch('/_shoal/api/session').then(r => r.status);",
            json!([]),
        )
        .await;
    assert_eq!(session, 401, "no session after logging out");
}
