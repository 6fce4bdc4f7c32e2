//! The accounts service over HTTP, on a real listener (port 0) with a fresh
//! database: the same suite runs on SQLite, on PostgreSQL with SQL sessions
//! and on PostgreSQL with Redis sessions.

use serde_json::{json, Value};
use shoal_core::settings::{DatabaseBackend, SessionBackend};
use shoal_core::Settings;
use shoal_runtime::testing::TestApp;
use shoal_testkit as kit;
use std::time::Duration;

/// Accounts on a fresh database; `settings` as given, in the harness's
/// temporary directory, with the debug routes and a low login limit.
async fn start(settings: Settings) -> TestApp {
    TestApp::builder()
        .settings(move |s| {
            let dir = s.data_dir.clone();
            *s = settings;
            s.data_dir = dir;
            s.serve.debug_routes = true;
            s.accounts.login_attempts_per_account = 3;
        })
        .module(shoal_accounts::Accounts)
        .start()
        .await
}

async fn user_count(db: &shoal_backends::Database) -> i64 {
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM users")
        .fetch_one(db.pool())
        .await
        .unwrap();
    n
}

/// The whole accounts contract; panics on the first broken rule.
async fn accounts_suite(app: &TestApp) {
    let http = kit::http_client();
    let url = |p: &str| format!("{}{p}", app.base());

    // signup
    let resp = http
        .post(url("/api/accounts/signup"))
        .json(&json!({"email": "Ada@Example.com", "password": "correct horse", "name": "Ada"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let user: Value = resp.json().await.unwrap();
    assert_eq!(user["email"], "ada@example.com");
    assert!(user.get("password_hash").is_none());

    // A taken email, whatever its case, gets the answer a new one gets
    // (signup does not tell who has an account); nothing changes, and the
    // owner is emailed once an hour however often it happens.
    let users_before = user_count(&app.ctx().db).await;
    for attempt in 0..3 {
        let resp = http
            .post(url("/api/accounts/signup"))
            .json(&json!({"email": "ADA@example.com", "password": "another one", "name": "Ada"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "attempt {attempt}");
        let again: Value = resp.json().await.unwrap();
        let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(&again), keys(&user), "the same shape");
        assert_eq!(again["email"], "ada@example.com");
        assert_ne!(again["id"], user["id"], "never the owner's id");
    }
    assert_eq!(user_count(&app.ctx().db).await, users_before);
    let (told,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM shoal_jobs WHERE unique_key LIKE 'email:signup-attempt:ada@example.com:%'",
    )
    .fetch_one(app.ctx().db.pool())
    .await
    .unwrap();
    assert_eq!(told, 1, "one email to the owner");

    // me without a session is 401
    let p = kit::problem(http.get(url("/api/accounts/me")).send().await.unwrap(), 401).await;
    assert!(p["detail"].as_str().unwrap().contains("log in"));

    // wrong password and unknown email give the same 401
    let wrong = http
        .post(url("/api/accounts/login"))
        .json(&json!({"email": "ada@example.com", "password": "wrong password"}))
        .send()
        .await
        .unwrap();
    let wrong = kit::problem(wrong, 401).await;
    let unknown = http
        .post(url("/api/accounts/login"))
        .json(&json!({"email": "nobody@example.com", "password": "wrong password"}))
        .send()
        .await
        .unwrap();
    let unknown = kit::problem(unknown, 401).await;
    assert_eq!(wrong["detail"], unknown["detail"]);

    // login sets an HttpOnly, SameSite=Lax cookie; me works
    let resp = http
        .post(url("/api/accounts/login"))
        .json(&json!({"email": "ada@example.com", "password": "correct horse"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.starts_with("shoal_session="), "{cookie}");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Lax"),
        "{cookie}"
    );
    assert!(
        !cookie.contains("Secure"),
        "no Secure over plain http: {cookie}"
    );
    let first_token = cookie.split(';').next().unwrap().to_string();
    let me: Value = http
        .get(url("/api/accounts/me"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["email"], "ada@example.com");
    // The account's row is read once, then served from the query cache.
    let loads = app.ctx().cache.loads();
    for _ in 0..10 {
        let resp = http.get(url("/api/accounts/me")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/json");
        assert_eq!(resp.headers()["cache-control"], "private, no-store");
        assert_eq!(resp.json::<Value>().await.unwrap(), me);
    }
    assert_eq!(app.ctx().cache.loads(), loads, "no load after the first");

    // whose session this is (what the gateway asks for routes that
    // require a session): the user id, never stored by a cache
    let resp = http.get(url("/api/accounts/session")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["cache-control"], "private, no-store");
    let session: Value = resp.json().await.unwrap();
    assert_eq!(session["user_id"], me["id"]);
    let idle = session["expires_at"].as_i64().unwrap();
    assert!(idle > 0 && session["absolute_expires_at"].as_i64().unwrap() >= idle);
    let p = kit::problem(
        reqwest::Client::new()
            .get(url("/api/accounts/session"))
            .send()
            .await
            .unwrap(),
        401,
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("log in"));

    // behind TLS (as the gateway reports it) the cookie is Secure
    let resp = http
        .post(url("/api/accounts/login"))
        .header("x-forwarded-proto", "https")
        .json(&json!({"email": "ada@example.com", "password": "correct horse"}))
        .send()
        .await
        .unwrap();
    assert!(resp.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Secure"));

    // the session rotated on that login: the first token no longer works
    let plain = reqwest::Client::new();
    let resp = plain
        .get(url("/api/accounts/me"))
        .header("cookie", &first_token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "old session ended on login");

    // logout ends the session and clears the cookie
    let resp = http.post(url("/api/accounts/logout")).send().await.unwrap();
    assert_eq!(resp.status(), 204);
    assert!(resp.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    assert_eq!(
        http.get(url("/api/accounts/me"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        http.get(url("/api/accounts/session"))
            .send()
            .await
            .unwrap()
            .status(),
        401,
        "an ended session is no one's"
    );

    // log out everywhere ends every session of the user
    let a = kit::http_client();
    let b = kit::http_client();
    for c in [&a, &b] {
        let r = c
            .post(url("/api/accounts/login"))
            .json(&json!({"email": "ada@example.com", "password": "correct horse"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r: Value = a
        .post(url("/api/accounts/logout-all"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["sessions_ended"], 2);
    assert_eq!(
        b.get(url("/api/accounts/me"))
            .send()
            .await
            .unwrap()
            .status(),
        401
    );

    // an unknown session cookie is 401 with a clear message
    let resp = plain
        .get(url("/api/accounts/me"))
        .header(
            "cookie",
            "shoal_session=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        )
        .send()
        .await
        .unwrap();
    let p = kit::problem(resp, 401).await;
    assert!(p["detail"]
        .as_str()
        .unwrap()
        .contains("expired or was ended"));
}

/// Bad input: each gets the right status and a clear message, and no row
/// is written.
async fn bad_input_suite(app: &TestApp) {
    let http = kit::http_client();
    let url = format!("{}/api/accounts/signup", app.base());
    let before = user_count(&app.ctx().db).await;

    let p = kit::problem(
        http.post(&url)
            .header("content-type", "application/json")
            .body("{\"email\": \"x@example.com\", \"password\": ")
            .send()
            .await
            .unwrap(),
        400,
    )
    .await;
    assert!(
        p["detail"].as_str().unwrap().contains("not valid JSON"),
        "{p}"
    );

    let p = kit::problem(
        http.post(&url)
            .json(&json!({"email": "x@example.com"}))
            .send()
            .await
            .unwrap(),
        422,
    )
    .await;
    assert_eq!(p["errors"][0]["field"], "password", "{p}");

    let p = kit::problem(
        http.post(&url)
            .json(&json!({"email": "not-an-email", "password": "short"}))
            .send()
            .await
            .unwrap(),
        422,
    )
    .await;
    let fields: Vec<_> = p["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["field"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(fields, vec!["email", "password"], "{p}");

    let p = kit::problem(
        http.post(&url)
            .header("content-type", "text/plain")
            .body("email=x@example.com")
            .send()
            .await
            .unwrap(),
        415,
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("application/json"));

    let big = format!(
        "{{\"email\": \"big@example.com\", \"password\": \"{}\"}}",
        "a".repeat(10 * 1024 * 1024)
    );
    let resp = http
        .post(&url)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await;
    // The server may answer 413 before reading the whole body, or close.
    if let Ok(resp) = resp {
        kit::problem(resp, 413).await;
    }

    let p = kit::problem(
        http.post(&url)
            .json(&json!({"email": "y@example.com", "password": "long enough", "admin": true}))
            .send()
            .await
            .unwrap(),
        422,
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("admin"), "{p}");

    assert_eq!(
        user_count(&app.ctx().db).await,
        before,
        "bad input wrote nothing"
    );

    // unknown routes are problem+json too
    kit::problem(
        http.get(format!("{}/nope", app.base()))
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
}

async fn rate_limit_suite(app: &TestApp) {
    let http = kit::http_client();
    let url = |p: &str| format!("{}{p}", app.base());
    http.post(url("/api/accounts/signup"))
        .json(&json!({"email": "grace@example.com", "password": "correct horse"}))
        .send()
        .await
        .unwrap();
    for _ in 0..3 {
        let r = http
            .post(url("/api/accounts/login"))
            .json(&json!({"email": "grace@example.com", "password": "guess guess"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let r = http
        .post(url("/api/accounts/login"))
        .json(&json!({"email": "grace@example.com", "password": "correct horse"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429, "account locked after 3 failures");
    assert!(r.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn accounts_on_sqlite() {
    let app = start(Settings::default()).await;
    accounts_suite(&app).await;
    bad_input_suite(&app).await;
    rate_limit_suite(&app).await;
}

#[tokio::test]
async fn accounts_on_postgres_with_sql_sessions() {
    let Some(server) = kit::postgres_url("accounts_on_postgres_with_sql_sessions") else {
        return;
    };
    let mut s = Settings::default();
    s.database.backend = DatabaseBackend::Postgres;
    s.database.url = Some(kit::fresh_postgres_database(&server).await);
    let app = start(s).await;
    accounts_suite(&app).await;
    bad_input_suite(&app).await;
    rate_limit_suite(&app).await;
}

#[tokio::test]
async fn accounts_on_postgres_with_redis_sessions() {
    let Some(server) = kit::postgres_url("accounts_on_postgres_with_redis_sessions") else {
        return;
    };
    let Some(redis) = kit::redis_url("accounts_on_postgres_with_redis_sessions") else {
        return;
    };
    let mut s = Settings::default();
    s.database.backend = DatabaseBackend::Postgres;
    s.database.url = Some(kit::fresh_postgres_database(&server).await);
    s.sessions.backend = SessionBackend::Redis;
    s.sessions.redis_url = Some(redis);
    s.sessions.redis_prefix = kit::unique_name();
    let app = start(s).await;
    accounts_suite(&app).await;
}

#[tokio::test]
async fn login_attempts_are_limited_per_client_address() {
    let mut s = Settings::default();
    s.accounts.login_attempts_per_address = 3;
    let app = start(s).await;
    let http = kit::http_client();
    for i in 0..3 {
        let r = http
            .post(format!("{}/api/accounts/login", app.base()))
            .json(&json!({"email": format!("user{i}@example.com"), "password": "whatever!"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    // A fourth account from the same address is refused before checking.
    let r = http
        .post(format!("{}/api/accounts/login", app.base()))
        .json(&json!({"email": "user9@example.com", "password": "whatever!"}))
        .send()
        .await
        .unwrap();
    let p = kit::problem(r, 429).await;
    assert!(p["detail"].as_str().unwrap().contains("address"), "{p}");
    // Behind the gateway, the client address comes from X-Forwarded-For.
    let r = http
        .post(format!("{}/api/accounts/login", app.base()))
        .header("x-forwarded-for", "203.0.113.7")
        .json(&json!({"email": "user9@example.com", "password": "whatever!"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "another client address has its own budget");
}

#[tokio::test]
async fn a_panic_is_a_500_problem_and_the_server_lives_on() {
    let app = start(Settings::default()).await;
    let http = kit::http_client();
    let p = kit::problem(
        http.get(format!("{}/_debug/panic", app.base()))
            .send()
            .await
            .unwrap(),
        500,
    )
    .await;
    assert_eq!(p["status"], 500);
    let r = http
        .get(format!("{}/healthz", app.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-request-id"));
    assert!(r.headers().contains_key("x-shoal-instance"));
}

#[tokio::test]
async fn request_timeout_and_gateway_deadline_are_enforced() {
    let mut s = Settings::default();
    s.serve.request_timeout_ms = 300;
    let app = start(s).await;
    let http = kit::http_client();
    let p = kit::problem(
        http.get(format!("{}/_debug/sleep?ms=2000", app.base()))
            .send()
            .await
            .unwrap(),
        503,
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("300 ms"));
    let p = kit::problem(
        http.get(format!("{}/_debug/sleep?ms=250", app.base()))
            .header("x-shoal-deadline-ms", "50")
            .send()
            .await
            .unwrap(),
        503,
    )
    .await;
    assert!(p["detail"].as_str().unwrap().contains("50 ms"));
}

#[tokio::test]
async fn readyz_turns_503_while_draining_and_in_flight_requests_finish() {
    let mut s = Settings::default();
    s.serve.drain_delay_ms = 400;
    let app = start(s).await;
    let http = kit::http_client();
    let slow = tokio::spawn({
        let http = http.clone();
        let url = format!("{}/_debug/sleep?ms=800", app.base());
        async move { http.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    app.stop();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let r = http
        .get(format!("{}/readyz", app.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "draining instance is not ready");
    assert_eq!(
        slow.await.unwrap().unwrap(),
        200,
        "in-flight request finished"
    );
}

/// The security review's fourth finding: ten wrong passwords locked the
/// account for 15 minutes against the right password too, so anyone could
/// lock anyone out. Now the attacker's view: guesses at one account from
/// one client are held back for 1 s, then 2 s, 4 s... after each further
/// failure; guesses spread over many addresses hold back only devices the
/// account never logged in from. The owner's view: logging in from another
/// address works while the attacker is held back, and from a device used
/// before it works even when new devices are held back.
#[tokio::test]
async fn an_attacker_slows_down_but_cannot_lock_the_owner_out() {
    let mut s = Settings::default();
    s.accounts.login_attempts_per_account = 3;
    let app = start(s).await;
    let url = format!("{}/api/accounts/login", app.base());
    let right = json!({"email": "owner@example.com", "password": "correct horse"});
    let wrong = json!({"email": "owner@example.com", "password": "wrong guess!"});
    let http = kit::http_client();
    let r = http
        .post(format!("{}/api/accounts/signup", app.base()))
        .json(&right)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // The owner's browser logs in once: it is a known device from now on.
    let plain = reqwest::Client::new();
    let r = plain
        .post(&url)
        .header("x-forwarded-for", "198.51.100.50")
        .json(&right)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let device = r
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|c| c.starts_with("shoal_device="))
        .expect("a device cookie")
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let login = |from: &str, body: &Value, cookie: Option<String>| {
        let mut r = plain.post(&url).header("x-forwarded-for", from).json(body);
        if let Some(c) = cookie {
            r = r.header("cookie", c);
        }
        r.send()
    };

    // One attacker address: three failures, then held back 1 s, then 2 s.
    for _ in 0..3 {
        assert_eq!(
            login("203.0.113.1", &wrong, None).await.unwrap().status(),
            401
        );
    }
    let r = login("203.0.113.1", &right, None).await.unwrap();
    assert_eq!(r.status(), 429, "held back, even with the right password");
    assert_eq!(r.headers()["retry-after"], "1");
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(
        login("203.0.113.1", &wrong, None).await.unwrap().status(),
        401
    );
    let r = login("203.0.113.1", &wrong, None).await.unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "2", "the wait doubles");
    // Meanwhile the owner, from another address, logs in.
    assert_eq!(
        login("198.51.100.60", &right, None).await.unwrap().status(),
        200
    );

    // Many attacker addresses: ten times the limit in failures holds back
    // every new device...
    let mut failures = 4; // three and one from 203.0.113.1
    for a in 2..=20 {
        let from = format!("203.0.113.{a}");
        for _ in 0..3 {
            if failures >= 30 {
                break;
            }
            let status = login(&from, &wrong, None).await.unwrap().status();
            assert_eq!(status, 401, "{from}");
            failures += 1;
        }
    }
    let r = login("192.0.2.77", &right, None).await.unwrap();
    assert_eq!(r.status(), 429, "a new device is held back");
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("device you have used before"));
    // ...but not the owner's known device, from wherever it is.
    let r = login("192.0.2.78", &right, Some(device.clone()))
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    // A known device's own guesses are held back too (a stolen cookie is
    // no way around the limit).
    for _ in 0..3 {
        let status = login("192.0.2.78", &wrong, Some(device.clone()))
            .await
            .unwrap()
            .status();
        assert_eq!(status, 401);
    }
    assert_eq!(
        login("192.0.2.78", &right, Some(device))
            .await
            .unwrap()
            .status(),
        429
    );
}

/// Guesses sent at once are each counted before any password is checked
/// (the check and the count are one statement): twenty parallel wrong
/// logins from one client at a limit of 3 get at most three 401s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_guesses_cannot_slip_past_the_limit() {
    let mut s = Settings::default();
    s.accounts.login_attempts_per_account = 3;
    let app = start(s).await;
    let http = reqwest::Client::new();
    let url = format!("{}/api/accounts/login", app.base());
    let wrong = json!({"email": "racer@example.com", "password": "wrong guess!"});
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let request = http
                .post(&url)
                .header("x-forwarded-for", "203.0.113.99")
                .json(&wrong);
            tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    let checked = statuses.iter().filter(|s| **s == 401).count();
    let held = statuses.iter().filter(|s| **s == 429).count();
    assert!(checked <= 3, "{checked} passwords checked: {statuses:?}");
    assert_eq!(checked + held, 20, "{statuses:?}");
}

/// "Log out everywhere" also forgets the devices the account trusted: a
/// stolen device cookie no longer gets past the throttle of new devices.
#[tokio::test]
async fn logout_all_forgets_the_known_devices() {
    let app = start(Settings::default()).await;
    let (cookie, user_id) = kit::sign_up_and_log_in(app.base(), "devices@example.com").await;
    let devices = || async {
        let n: (i64,) = sqlx::query_as("SELECT COUNT(*) FROM login_devices WHERE user_id = $1")
            .bind(&user_id)
            .fetch_one(app.ctx().db.pool())
            .await
            .unwrap();
        n.0
    };
    assert_eq!(
        devices().await,
        1,
        "the login made its browser a known device"
    );
    let r = reqwest::Client::new()
        .post(format!("{}/api/accounts/logout-all", app.base()))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(devices().await, 0);
}

/// Every answer says: no type sniffing, no framing, a referrer policy; a
/// JSON answer also carries a policy that loads and runs nothing.
#[tokio::test]
async fn answers_carry_security_headers() {
    let app = start(Settings::default()).await;
    for path in ["/healthz", "/api/accounts/me", "/no/such/route"] {
        let r = reqwest::get(format!("{}{path}", app.base())).await.unwrap();
        let h = r.headers();
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        assert!(h.contains_key("referrer-policy"), "{path}");
        assert_eq!(
            h["content-security-policy"], "default-src 'none'; frame-ancestors 'none'",
            "{path}"
        );
    }
}

#[tokio::test]
async fn prune_deletes_only_counters_and_devices_that_no_longer_count() {
    let app = start(Settings::default()).await;
    let now = shoal_backends::now_millis();
    let window = app.ctx().settings.accounts.login_window_secs as i64 * 1000;
    let year = 365 * 24 * 3600 * 1000_i64;
    for (key, start) in [("old", now - window - 1), ("fresh", now - window + 60_000)] {
        sqlx::query(
            "INSERT INTO login_attempts (key, window_start, count, last_at) VALUES ($1, $2, 5, $2)",
        )
        .bind(key)
        .bind(start)
        .execute(app.ctx().db.pool())
        .await
        .unwrap();
    }
    for (hash, at) in [("old-device", now - year - 1), ("new-device", now - 1000)] {
        sqlx::query(
            "INSERT INTO login_devices (token_hash, user_id, created_at) VALUES ($1, 'u1', $2)",
        )
        .bind(hash)
        .bind(at)
        .execute(app.ctx().db.pool())
        .await
        .unwrap();
    }
    assert_eq!(shoal_accounts::prune(app.ctx()).await.unwrap(), 2);
    let keys: Vec<(String,)> = sqlx::query_as("SELECT key FROM login_attempts ORDER BY key")
        .fetch_all(app.ctx().db.pool())
        .await
        .unwrap();
    assert_eq!(keys, vec![("fresh".to_string(),)]);
    let devices: Vec<(String,)> = sqlx::query_as("SELECT token_hash FROM login_devices")
        .fetch_all(app.ctx().db.pool())
        .await
        .unwrap();
    assert_eq!(devices, vec![("new-device".to_string(),)]);
    assert_eq!(shoal_accounts::prune(app.ctx()).await.unwrap(), 0);
}
