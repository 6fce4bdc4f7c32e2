//! Checkout end to end in one process: accounts, catalog, orders and
//! payments on one Application, a worker running their jobs, and the
//! payment sandbox with faults. Every order is charged exactly once.

use serde_json::{json, Value};
use shoal_backends::Database;
use shoal_core::settings::SandboxSettings;
use shoal_runtime::testing::TestApp;
use shoal_testkit as kit;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The services (a `TestApp` with its worker), the payment sandbox and
/// where emails go.
struct Stack {
    db: Database,
    /// Where the worker claims jobs (the database, or JetStream).
    jobs: std::sync::Arc<dyn shoal_queue::JobStore>,
    mail: std::path::PathBuf,
    base: String,
    sandbox: String,
    stop: CancellationToken,
    app: TestApp,
    _dir: kit::TempDir,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start() -> Stack {
    start_with(true).await
}

async fn start_with(webhooks: bool) -> Stack {
    start_on(webhooks, Store::Sqlite).await
}

/// Where the services keep their data and jobs.
enum Store {
    /// SQLite in the test's directory, jobs in it.
    Sqlite,
    /// SQLite, jobs on this NATS server (`queue.backend = "nats"`), as the
    /// worker role runs them.
    Nats(String),
    /// This PostgreSQL database, jobs in it.
    Postgres(String),
}

/// Runs a test body on SQLite (`$sqlite`) and on PostgreSQL (`$postgres`,
/// a fresh database, when `SHOAL_TEST_POSTGRES_URL` is set): the order and
/// stock writes take a path of their own on each engine.
macro_rules! on_both {
    ($sqlite:ident, $postgres:ident, $body:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $sqlite() {
            $body(start().await).await
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $postgres() {
            let Some(server) = kit::postgres_url(stringify!($postgres)) else {
                return;
            };
            let url = kit::fresh_postgres_database(&server).await;
            $body(start_on(true, Store::Postgres(url)).await).await
        }
    };
}

/// `webhooks`: whether the sandbox is told where to send its webhooks;
/// `store`: where the data and the jobs are.
async fn start_on(webhooks: bool, store: Store) -> Stack {
    let dir = kit::TempDir::new("checkout");
    let stop = CancellationToken::new();
    let sdb = Database::connect(
        &kit::sqlite_url(&dir.path().join("sandbox")),
        4,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let sandbox = shoal_sandbox::Sandbox::bind(
        SandboxSettings {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..SandboxSettings::default()
        },
        sdb,
    )
    .await
    .unwrap();
    let sandbox_url = format!("http://{}", sandbox.handle().addr);
    let sandbox_url_for_app = sandbox_url.clone();
    tokio::spawn(sandbox.run(stop.clone()));

    let app = TestApp::builder()
        .settings(move |settings| {
            settings.payments.provider_url = sandbox_url_for_app;
            settings.payments.request_timeout_ms = 500;
            match store {
                Store::Sqlite => {}
                Store::Nats(url) => {
                    settings.queue.backend = shoal_core::settings::QueueBackend::Nats;
                    settings.queue.nats_url = Some(url);
                    settings.queue.nats_prefix = format!("checkout{}", &kit::unique_name()[..12]);
                }
                Store::Postgres(url) => {
                    settings.database.backend = shoal_core::settings::DatabaseBackend::Postgres;
                    settings.database.url = Some(url);
                }
            }
        })
        .module(shoal_accounts::Accounts)
        .module(shoal_catalog::Catalog::default())
        .module(shoal_orders::Orders::default())
        .module(shoal_payments::Payments)
        .module(shoal_notifications::Notifications)
        .worker()
        .start()
        .await;
    let ctx = app.ctx().clone();
    let base = app.base().to_string();
    shoal_catalog::seed(&ctx.db, 3, |_| {}).await.unwrap();
    // Checkouts hold stock: plenty, unless a test sets its own.
    sqlx::query("UPDATE products SET stock = 1000000")
        .execute(ctx.db.pool())
        .await
        .unwrap();
    if webhooks {
        reqwest::Client::new()
            .post(format!("{sandbox_url}/_sandbox/webhook"))
            .json(&json!({"url": format!("{base}/api/payments/webhooks")}))
            .send()
            .await
            .unwrap();
    }
    Stack {
        db: ctx.db.clone(),
        jobs: app.job_store().clone(),
        mail: app.data_dir().join("mail"),
        base,
        sandbox: sandbox_url,
        stop,
        app,
        _dir: dir,
    }
}

/// The `.eml` files written to `to` whose subject is `subject`, waiting up
/// to 20 s for at least `want` of them.
async fn emails(mail: &std::path::Path, to: &str, subject: &str, want: usize) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut found = 0;
        if let Ok(dir) = std::fs::read_dir(mail) {
            for entry in dir.flatten() {
                let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
                let head = text.split("\r\n\r\n").next().unwrap_or_default();
                if head.contains(&format!("To: {to}"))
                    && head.contains(&format!("Subject: {subject}"))
                {
                    found += 1;
                }
            }
        }
        if found >= want || std::time::Instant::now() > deadline {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn order(
    http: &reqwest::Client,
    base: &str,
    key: Option<&str>,
    body: &Value,
) -> reqwest::Response {
    let mut r = http.post(format!("{base}/api/orders")).json(body);
    if let Some(k) = key {
        r = r.header("idempotency-key", k);
    }
    r.send().await.unwrap()
}

/// Places an order with `key`; returns its id.
async fn place(http: &reqwest::Client, base: &str, key: &str, body: &Value) -> String {
    let r: Value = order(http, base, Some(key), body)
        .await
        .json()
        .await
        .unwrap();
    r["id"].as_str().expect("an order id").to_string()
}

async fn wait_status(http: &reqwest::Client, base: &str, id: &str, want: &str) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let v: Value = http
            .get(format!("{base}/api/orders/{id}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["status"] == want {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "order {id} never became {want}: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn charges_for(sandbox: &str, order_id: &str) -> usize {
    let v: Value = reqwest::get(format!("{sandbox}/_sandbox/charges"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["charges"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["metadata"]["order_id"] == order_id)
        .count()
}

async fn product(base: &str) -> Value {
    let v: Value = reqwest::get(format!("{base}/api/catalog/products?per_page=1"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let list = v
        .get("products")
        .or_else(|| v.get("items"))
        .cloned()
        .unwrap_or(v.clone());
    list.as_array()
        .and_then(|a| a.first().cloned())
        .unwrap_or_else(|| panic!("no products in {v}"))
}

// The same checkout sent many times at once (a double-clicking user, a
// retrying client): one order, and every request answered with it
// promptly, the ones that lost the race to insert it included.
on_both!(
    the_same_key_at_once_makes_one_order_and_every_request_is_answered,
    postgres_same_key_at_once_makes_one_order,
    same_key_at_once
);

async fn same_key_at_once(s: Stack) {
    let http = s.app.signed_in("ada@example.com").await;
    let p = product(&s.base).await;
    let body = json!({"items": [{"product_id": p["id"], "quantity": 1}]});
    let requests = (0..16).map(|_| {
        let (http, base, body) = (http.clone(), s.base.clone(), body.clone());
        tokio::spawn(async move {
            let r = tokio::time::timeout(
                Duration::from_secs(15),
                order(&http, &base, Some("double-click"), &body),
            )
            .await
            .expect("a request with a key already being ordered was never answered");
            assert_eq!(r.status(), 201);
            let v: Value = r.json().await.unwrap();
            v["id"].as_str().unwrap().to_string()
        })
    });
    let mut ids = Vec::new();
    for r in requests.collect::<Vec<_>>() {
        ids.push(r.await.unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one order for one key: {ids:?}");
}

on_both!(
    checkout_is_idempotent_and_charges_once,
    postgres_checkout_is_idempotent_and_charges_once,
    idempotent_checkout
);

async fn idempotent_checkout(s: Stack) {
    let http = s.app.signed_in("ada@example.com").await;
    let p = product(&s.base).await;
    let body = json!({"items": [{"product_id": p["id"], "quantity": 2}]});

    // no key: 400, and nothing created
    assert_eq!(order(&http, &s.base, None, &body).await.status(), 400);

    let first = http
        .post(format!("{}/api/orders", s.base))
        .header("idempotency-key", "key-1")
        .header("x-request-id", "checkout-trace-1")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["status"], "pending_payment");
    assert_eq!(first["total_cents"], p["price_cents"].as_i64().unwrap() * 2);
    let again = order(&http, &s.base, Some("key-1"), &body).await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"], "same key, same order");
    let other = json!({"items": [{"product_id": p["id"], "quantity": 3}]});
    assert_eq!(
        order(&http, &s.base, Some("key-1"), &other).await.status(),
        422
    );

    let id = first["id"].as_str().unwrap();
    wait_status(&http, &s.base, id, "paid").await;
    // The payment job carries the trace of the request that created it.
    let charges = s
        .jobs
        .list(&shoal_queue::JobFilter {
            kind: Some("payments.charge".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(charges.len(), 1);
    assert_eq!(charges[0].trace_id.as_deref(), Some("checkout-trace-1"));
    assert_eq!(charges_for(&s.sandbox, id).await, 1, "one charge");
    // The receipt goes to the buyer's address, which the orders service
    // never stored: the notifications address book, fed at signup, has it.
    let receipt = format!("Receipt for order {id}");
    assert_eq!(emails(&s.mail, "ada@example.com", &receipt, 1).await, 1);
    let list: Value = http
        .get(format!("{}/api/orders", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["orders"].as_array().unwrap().len(), 1);

    // unknown product: 422 naming the item
    let bad = json!({"items": [{"product_id": "nope", "quantity": 1}]});
    let r = order(&http, &s.base, Some("key-bad"), &bad).await;
    assert_eq!(r.status(), 422);
    let unknown = json!({"items": [{"product_id": shoal_core::ids::new_id(), "quantity": 1}]});
    let r = order(&http, &s.base, Some("key-unknown"), &unknown).await;
    assert_eq!(r.status(), 422);
    assert!(r.text().await.unwrap().contains("does not exist"));
    // The security review's fifth finding: a product id that is a path
    // made the orders service GET any path of the instances and echo the
    // answer. Only ids reach the catalog URL; nothing of another
    // service's answer reaches the client.
    for path in [
        "../../accounts/me",
        "../products?per_page=1",
        "x/../../../metrics",
        "%2e%2e%2faccounts%2fme",
    ] {
        let bad = json!({"items": [{"product_id": path, "quantity": 1}]});
        let r = order(&http, &s.base, Some(&format!("key-{path}")), &bad).await;
        assert_eq!(r.status(), 422, "{path}");
        let text = r.text().await.unwrap();
        assert!(text.contains("must be a product id"), "{path}: {text}");
        assert!(
            !text.contains("ada@example.com") && !text.contains("user_id"),
            "{text}"
        );
    }

    // a declined card fails the order, with no charge
    let declined = json!({"items": [{"product_id": p["id"], "quantity": 1}], "payment_method": "pm_card_chargeDeclined"});
    let r: Value = order(&http, &s.base, Some("key-2"), &declined)
        .await
        .json()
        .await
        .unwrap();
    let failed = wait_status(&http, &s.base, r["id"].as_str().unwrap(), "failed").await;
    assert!(
        failed["failure"].as_str().unwrap().contains("declined"),
        "{failed}"
    );
    assert_eq!(charges_for(&s.sandbox, r["id"].as_str().unwrap()).await, 0);
    let notice = format!("Payment failed for order {}", r["id"].as_str().unwrap());
    assert_eq!(emails(&s.mail, "ada@example.com", &notice, 1).await, 1);
    // Exactly one receipt, however many times settlement ran.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(emails(&s.mail, "ada@example.com", &receipt, 1).await, 1);

    // someone else cannot see the order
    let other_user = s.app.signed_in("bob@example.com").await;
    assert_eq!(
        other_user
            .get(format!("{}/api/orders/{id}", s.base))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_faults_still_give_exactly_one_charge() {
    let s = start().await;
    let http = s.app.signed_in("ada@example.com").await;
    let p = product(&s.base).await;
    let body = json!({"items": [{"product_id": p["id"], "quantity": 1}]});
    let faults = |f: Value| {
        let url = format!("{}/_sandbox/faults", s.sandbox);
        async move {
            reqwest::Client::new()
                .post(url)
                .json(&f)
                .send()
                .await
                .unwrap()
        }
    };

    // The provider charges, then the response is lost (the client times
    // out at 500 ms); the job retries with the same key and is replayed.
    faults(json!({"lose_response_after_charge": 1})).await;
    let id = place(&http, &s.base, "lost", &body).await;
    wait_status(&http, &s.base, &id, "paid").await;
    assert_eq!(
        charges_for(&s.sandbox, &id).await,
        1,
        "lost response: one charge"
    );

    // The provider fails twice before charging; the third try charges.
    faults(json!({"fail_before_charge": 2})).await;
    let id = place(&http, &s.base, "flaky", &body).await;
    wait_status(&http, &s.base, &id, "paid").await;
    assert_eq!(
        charges_for(&s.sandbox, &id).await,
        1,
        "errors then success: one charge"
    );

    // Processing: settled by the signed webhook.
    let processing = json!({"items": [{"product_id": p["id"], "quantity": 1}], "payment_method": "pm_card_processing"});
    let id = place(&http, &s.base, "webhook", &processing).await;
    wait_status(&http, &s.base, &id, "paid").await;
    assert_eq!(charges_for(&s.sandbox, &id).await, 1);

    // A forged webhook is refused.
    let forged = reqwest::Client::new()
        .post(format!("{}/api/payments/webhooks", s.base))
        .header("stripe-signature", "t=1,v1=00")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 400);
}

/// A charge the provider answered `processing` and whose webhook never
/// came stays pending; the reconciliation job asks the provider for its
/// state (a replay of the charge would only repeat `processing`) and
/// settles it: paid, one charge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_settles_a_payment_whose_webhook_never_came() {
    let s = start_with(false).await;
    let http = s.app.signed_in("ada@example.com").await;
    let p = product(&s.base).await;
    let body = json!({"items": [{"product_id": p["id"], "quantity": 1}], "payment_method": "pm_card_processing"});
    let id = place(&http, &s.base, "key-rec", &body).await;
    // The sandbox turns the intent succeeded after 500 ms, but has nowhere
    // to send its webhook.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let o: Value = http
        .get(format!("{}/api/orders/{id}", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(o["status"], "pending_payment", "no webhook, no settlement");
    // Reconciliation takes payments pending for 30 s: age this one.
    sqlx::query("UPDATE payments SET updated_at = updated_at - 60000 WHERE order_id = $1")
        .bind(&id)
        .execute(s.db.pool())
        .await
        .unwrap();
    s.jobs
        .enqueue(shoal_queue::NewJob::new(
            "payments",
            shoal_payments::RECONCILE_KIND,
            json!({}),
        ))
        .await
        .unwrap();
    wait_status(&http, &s.base, &id, "paid").await;
    assert_eq!(charges_for(&s.sandbox, &id).await, 1);
}

/// A webhook signed with the right secret (leaked, or the development
/// one) is only a hint to ask the provider: claiming that a payment whose
/// card keeps failing has succeeded, under a made-up intent or under
/// another order's real one, changes nothing (answered 2xx with
/// `applied: false`); the order stays unpaid and is charged nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_webhook_the_provider_does_not_confirm_changes_nothing() {
    let s = start().await;
    let http = s.app.signed_in("ada@example.com").await;
    let p = product(&s.base).await;
    // One real, paid order whose intent a forger could name.
    let visa = json!({"items": [{"product_id": p["id"], "quantity": 1}], "payment_method": "pm_card_visa"});
    let paid = place(&http, &s.base, "forge-paid", &visa).await;
    wait_status(&http, &s.base, &paid, "paid").await;
    // The victim order: the provider errors on every attempt, so its
    // payment stays pending between retries.
    let failing = json!({"items": [{"product_id": p["id"], "quantity": 2}], "payment_method": "pm_card_error"});
    let victim = place(&http, &s.base, "forge-victim", &failing).await;
    let (_, paid_intent) = payment_of(&s.db, &paid, true).await;
    let (victim_payment, _) = payment_of(&s.db, &victim, false).await;
    let forge = |intent: String| {
        let event = json!({
            "id": "evt_forged",
            "type": "payment_intent.succeeded",
            "data": {"object": {
                "id": intent,
                "object": "payment_intent",
                "status": "succeeded",
                "metadata": {"payment_id": victim_payment, "order_id": victim},
            }},
        })
        .to_string();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let signature = shoal_sandbox::signature::sign(
            shoal_core::settings::DEVELOPMENT_WEBHOOK_SECRET,
            now,
            event.as_bytes(),
        );
        let base = s.base.clone();
        async move {
            reqwest::Client::new()
                .post(format!("{base}/api/payments/webhooks"))
                .header("stripe-signature", signature)
                .header("content-type", "application/json")
                .body(event)
                .send()
                .await
                .unwrap()
        }
    };
    for intent in [
        "pi_madeup0000000000000000".to_string(),
        paid_intent.unwrap(),
    ] {
        // Answered 2xx (a refusal would only make a sender retry), with
        // nothing applied.
        let r = forge(intent.clone()).await;
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 200, "{intent}: {body}");
        assert_eq!(
            body["applied"], false,
            "forged event with {intent} was applied"
        );
    }
    let status: (String,) = sqlx::query_as("SELECT status FROM payments WHERE id = $1")
        .bind(&victim_payment)
        .fetch_one(s.db.pool())
        .await
        .unwrap();
    assert_eq!(
        status.0, "pending",
        "the forged webhook settled the payment"
    );
    let o: Value = http
        .get(format!("{}/api/orders/{victim}", s.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(o["status"], "pending_payment");
    assert_eq!(charges_for(&s.sandbox, &victim).await, 0);
}

/// The payment row of `order` (id, provider id), waiting up to 20 s for
/// it to exist and, with `with_intent`, to have a provider id.
async fn payment_of(db: &Database, order: &str, with_intent: bool) -> (String, Option<String>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r: Option<(String, Option<String>)> =
            sqlx::query_as("SELECT id, provider_id FROM payments WHERE order_id = $1")
                .bind(order)
                .fetch_optional(db.pool())
                .await
                .unwrap();
        match r {
            Some(r) if !with_intent || r.1.is_some() => return r,
            _ if std::time::Instant::now() > deadline => panic!("no payment for {order}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// `queue.backend = "nats"`, wired as the worker role wires it: orders
/// enqueue their payment jobs into the database inside the order's
/// transaction; the relay carries only committed ones into JetStream,
/// where the worker runs them. Each order is charged once, whatever the
/// provider does, and a refused checkout enqueues nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_through_nats_charges_each_order_once() {
    let Some(url) = kit::nats_url("checkout_through_nats_charges_each_order_once") else {
        return;
    };
    let s = start_on(true, Store::Nats(url)).await;
    let nats = s
        .app
        .job_backend()
        .and_then(|b| b.nats())
        .expect("a JetStream store")
        .clone();
    let http = s.app.signed_in("ada@example.com").await;
    let p = product(&s.base).await;
    let card =
        |pm: &str| json!({"items": [{"product_id": p["id"], "quantity": 1}], "payment_method": pm});
    // Refused before anything commits: no job anywhere.
    let bad = json!({"items": [{"product_id": "nope", "quantity": 1}]});
    assert_eq!(
        order(&http, &s.base, Some("nats-bad"), &bad).await.status(),
        422
    );
    let paid = place(&http, &s.base, "nats-visa", &card("pm_card_visa")).await;
    let lost = place(&http, &s.base, "nats-lost", &card("pm_card_lost_response")).await;
    let declined = place(
        &http,
        &s.base,
        "nats-declined",
        &card("pm_card_chargeDeclined"),
    )
    .await;
    wait_status(&http, &s.base, &paid, "paid").await;
    wait_status(&http, &s.base, &lost, "paid").await;
    wait_status(&http, &s.base, &declined, "failed").await;
    for (id, charges) in [(&paid, 1), (&lost, 1), (&declined, 0)] {
        assert_eq!(charges_for(&s.sandbox, id).await, charges, "{id}");
    }
    // The charges ran from JetStream: one job per accepted order, each
    // completed (its completion lands just after the order is settled).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ran = s
            .jobs
            .list(&shoal_queue::JobFilter {
                kind: Some("payments.charge".into()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(ran.len(), 3, "{ran:?}");
        if ran
            .iter()
            .all(|j| j.state == shoal_queue::JobState::Succeeded)
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{ran:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    nats.delete_everything().await.unwrap();
}

async fn stock_of(db: &Database, id: &str) -> i64 {
    let (n,): (i64,) = sqlx::query_as("SELECT stock FROM products WHERE id = $1")
        .bind(id)
        .fetch_one(db.pool())
        .await
        .unwrap();
    n
}

// The security review (finding 9): orders took any quantity whatever the
// stock, one catalog call per line. Now one call holds stock for every
// line or for none, a retried checkout holds once, and a failed payment
// gives the stock back.
on_both!(
    stock_is_held_for_every_line_at_once_and_given_back_when_payment_fails,
    postgres_stock_is_held_and_given_back,
    stock_held_and_given_back
);

async fn stock_held_and_given_back(s: Stack) {
    let http = s.app.signed_in("ada@example.com").await;
    let ids: Vec<(String,)> = sqlx::query_as("SELECT id FROM products ORDER BY id LIMIT 2")
        .fetch_all(s.db.pool())
        .await
        .unwrap();
    let (a, b) = (ids[0].0.clone(), ids[1].0.clone());
    for (id, n) in [(&a, 5), (&b, 3)] {
        sqlx::query("UPDATE products SET stock = $1, currency = 'usd' WHERE id = $2")
            .bind(n)
            .bind(id)
            .execute(s.db.pool())
            .await
            .unwrap();
    }
    let lines = |qa: i64, qb: i64| json!({"items": [{"product_id": a, "quantity": qa}, {"product_id": b, "quantity": qb}]});

    // The second line is short: 409 naming it, and neither line is held.
    let r = order(&http, &s.base, Some("stock-1"), &lines(2, 4)).await;
    assert_eq!(r.status(), 409);
    let problem: Value = r.json().await.unwrap();
    assert_eq!(
        problem["errors"][0]["field"], "items[1].quantity",
        "{problem}"
    );
    assert_eq!(
        problem["errors"][0]["message"], "only 3 in stock",
        "{problem}"
    );
    assert_eq!(
        (stock_of(&s.db, &a).await, stock_of(&s.db, &b).await),
        (5, 3)
    );

    // Both held by one order; its retry holds nothing more.
    let id = place(&http, &s.base, "stock-2", &lines(2, 3)).await;
    assert_eq!(
        (stock_of(&s.db, &a).await, stock_of(&s.db, &b).await),
        (3, 0)
    );
    let again = order(&http, &s.base, Some("stock-2"), &lines(2, 3)).await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(
        (stock_of(&s.db, &a).await, stock_of(&s.db, &b).await),
        (3, 0)
    );
    // Paid: the stock stays sold.
    wait_status(&http, &s.base, &id, "paid").await;
    let r = order(
        &http,
        &s.base,
        Some("stock-3"),
        &json!({"items": [{"product_id": b, "quantity": 1}]}),
    )
    .await;
    assert_eq!(r.status(), 409, "nothing left of b");

    // A declined card: the order fails and its stock comes back.
    let declined = json!({"items": [{"product_id": a, "quantity": 2}], "payment_method": "pm_card_chargeDeclined"});
    let failed = place(&http, &s.base, "stock-4", &declined).await;
    assert_eq!(stock_of(&s.db, &a).await, 1);
    wait_status(&http, &s.base, &failed, "failed").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while stock_of(&s.db, &a).await != 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the stock never came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Given back once, however often settlement runs.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(stock_of(&s.db, &a).await, 3);

    // The reservation endpoint is internal: no token, a wrong one: 403.
    let http_plain = reqwest::Client::new();
    let reserve = json!({"id": "x-1", "items": [{"product_id": a, "quantity": 1}]});
    for auth in [None, Some("Bearer not-the-service-token")] {
        let mut r = http_plain
            .post(format!("{}/api/catalog/reservations", s.base))
            .json(&reserve);
        if let Some(v) = auth {
            r = r.header("authorization", v);
        }
        assert_eq!(r.send().await.unwrap().status(), 403);
    }
    // A logged-in user's cookie opens nothing either.
    let r = http
        .post(format!("{}/api/catalog/reservations", s.base))
        .json(&reserve)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(stock_of(&s.db, &a).await, 3);
}

/// PostgreSQL: an earlier attempt with the same key whose order insert
/// is not committed (its instance cut off mid-transaction, as in the
/// multi-host test) does not make a retry wait as long as it stays open:
/// the retry answers 409 within a second (in progress; retry with the
/// same key), and once that transaction is gone the retry places the
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_a_retry_behind_an_unfinished_attempt_answers_409() {
    let name = "postgres_a_retry_behind_an_unfinished_attempt_answers_409";
    let Some(server) = kit::postgres_url(name) else {
        return;
    };
    let url = kit::fresh_postgres_database(&server).await;
    let s = start_on(true, Store::Postgres(url)).await;
    let http = s.app.signed_in("ada@example.com").await;
    let p = product(&s.base).await;
    let body = json!({"items": [{"product_id": p["id"], "quantity": 1}]});
    let (user,): (String,) = sqlx::query_as("SELECT id FROM users WHERE email = $1")
        .bind("ada@example.com")
        .fetch_one(s.db.pool())
        .await
        .unwrap();
    // The unfinished attempt: its order row inserted, not committed.
    let mut stuck = s.db.pool().begin().await.unwrap();
    sqlx::query(
        "INSERT INTO orders (id, user_id, status, items, total_cents, currency, payment_method,
            idempotency_key, request_hash, response, created_at, updated_at)
         VALUES ($1, $2, 'pending_payment', '[]', 0, 'usd', 'pm_card_visa', $3, 'x', '{}', 0, 0)",
    )
    .bind(shoal_core::ids::new_id())
    .bind(&user)
    .bind("stuck-key")
    .execute(&mut *stuck)
    .await
    .unwrap();
    let started = std::time::Instant::now();
    let r = order(&http, &s.base, Some("stuck-key"), &body).await;
    let took = started.elapsed();
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(status, 409, "{text}");
    assert!(text.contains("in progress"), "{text}");
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
    // Gone (rolled back): the retry places the order.
    stuck.rollback().await.unwrap();
    let r = order(&http, &s.base, Some("stuck-key"), &body).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}
