//! The sandbox's HTTP API (Stripe-compatible subset), its storage and its
//! webhook sender.

use crate::signature;
use anyhow::Context as _;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use shoal_backends::{now_millis, Database, Migration};
use shoal_core::settings::SandboxSettings;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "intents and idempotency",
    sql: "CREATE TABLE IF NOT EXISTS sandbox_intents (
        id TEXT PRIMARY KEY,
        amount BIGINT NOT NULL,
        currency TEXT NOT NULL,
        payment_method TEXT NOT NULL,
        status TEXT NOT NULL,
        metadata TEXT NOT NULL,
        idempotency_key TEXT,
        error_code TEXT,
        created_at BIGINT NOT NULL);
    CREATE TABLE IF NOT EXISTS sandbox_idempotency (
        key TEXT PRIMARY KEY,
        request_hash TEXT NOT NULL,
        state TEXT NOT NULL,
        status_code BIGINT NOT NULL,
        body TEXT NOT NULL,
        created_at BIGINT NOT NULL);",
}];

/// Faults applied to the next requests, set through `/_sandbox/faults`.
#[derive(Debug, Default, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
struct Faults {
    /// Answer 500 without charging, this many times.
    fail_before_charge: u32,
    /// Charge, then stall the response for 30 s, this many times.
    lose_response_after_charge: u32,
    /// Added latency on every create, ms.
    delay_ms: u64,
}

#[derive(Debug)]
struct Inner {
    db: Database,
    settings: SandboxSettings,
    faults: Mutex<Faults>,
    webhook_url: Mutex<Option<String>>,
    http: reqwest::Client,
}

type Shared = Arc<Inner>;

/// A bound sandbox, ready to run.
#[derive(Debug)]
pub struct Sandbox {
    listener: TcpListener,
    router: Router,
}

/// What a running sandbox's owner can read.
#[derive(Debug, Clone)]
pub struct SandboxHandle {
    pub addr: SocketAddr,
}

impl Sandbox {
    /// Migrates `db` and binds `settings.listen` (port 0 picks one).
    pub async fn bind(settings: SandboxSettings, db: Database) -> anyhow::Result<Sandbox> {
        db.migrate("sandbox", MIGRATIONS).await?;
        let listener = TcpListener::bind(settings.listen)
            .await
            .with_context(|| format!("binding the sandbox to {}", settings.listen))?;
        let inner = Arc::new(Inner {
            db,
            webhook_url: Mutex::new(settings.webhook_url.clone()),
            settings,
            faults: Mutex::new(Faults::default()),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
        });
        let router = Router::new()
            .route("/v1/payment_intents", post(create_intent))
            .route("/v1/payment_intents/{id}", get(get_intent))
            .route("/_sandbox/charges", get(list_charges))
            .route("/_sandbox/faults", post(set_faults))
            .route("/_sandbox/webhook", post(set_webhook))
            .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
            .with_state(inner);
        Ok(Sandbox { listener, router })
    }

    pub fn handle(&self) -> SandboxHandle {
        SandboxHandle {
            addr: self.listener.local_addr().expect("bound"),
        }
    }

    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        tracing::info!(addr = %self.handle().addr, "payment sandbox listening");
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await?;
        Ok(())
    }
}

fn stripe_error(
    status: StatusCode,
    kind: &str,
    code: Option<&str>,
    message: &str,
    extra: Value,
) -> Response {
    let mut error = json!({"type": kind, "message": message});
    if let Some(c) = code {
        error["code"] = json!(c);
    }
    if let (Some(e), Some(x)) = (error.as_object_mut(), extra.as_object()) {
        for (k, v) in x {
            e.insert(k.clone(), v.clone());
        }
    }
    (status, Json(json!({"error": error}))).into_response()
}

fn authorized(inner: &Inner, headers: &HeaderMap) -> bool {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|k| k == inner.settings.api_key)
        .unwrap_or(false)
}

fn intent_json(row: &IntentRow) -> Value {
    let metadata: Value = serde_json::from_str(&row.metadata).unwrap_or(json!({}));
    let mut v = json!({
        "id": row.id,
        "object": "payment_intent",
        "amount": row.amount,
        "currency": row.currency,
        "payment_method": row.payment_method,
        "status": row.status,
        "metadata": metadata,
        "created": row.created_at / 1000,
        "livemode": false,
    });
    if let Some(code) = &row.error_code {
        v["last_payment_error"] =
            json!({"type": "card_error", "code": code, "message": "Your card was declined."});
    }
    v
}

#[derive(Debug, Clone, sqlx::FromRow)]
struct IntentRow {
    id: String,
    amount: i64,
    currency: String,
    payment_method: String,
    status: String,
    metadata: String,
    error_code: Option<String>,
    created_at: i64,
}

async fn create_intent(
    State(inner): State<Shared>,
    headers: HeaderMap,
    Form(params): Form<Vec<(String, String)>>,
) -> Response {
    // Like a real provider, finish a request whose client hung up (a worker
    // killed mid-charge): on its own task, so a dropped connection cannot
    // stop it halfway and leave its idempotency key in progress for good.
    match tokio::spawn(process_intent(inner, headers, params)).await {
        Ok(response) => response,
        Err(e) => {
            tracing::error!(error = %e, "sandbox request task failed");
            stripe_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                None,
                "internal error",
                json!({}),
            )
        }
    }
}

async fn process_intent(
    inner: Shared,
    headers: HeaderMap,
    params: Vec<(String, String)>,
) -> Response {
    if !authorized(&inner, &headers) {
        return stripe_error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            None,
            "Invalid API Key provided.",
            json!({}),
        );
    }
    let faults = inner.faults.lock().expect("faults").clone();
    if faults.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(faults.delay_ms)).await;
    }
    if faults.fail_before_charge > 0 {
        inner.faults.lock().expect("faults").fail_before_charge -= 1;
        return stripe_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            None,
            "Injected fault: failed before charging.",
            json!({}),
        );
    }
    let map: BTreeMap<String, String> = params.iter().cloned().collect();
    let amount = match map.get("amount").and_then(|a| a.parse::<i64>().ok()) {
        Some(a) if a > 0 => a,
        _ => {
            return stripe_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("parameter_invalid_integer"),
                "amount must be a positive integer (in the smallest currency unit).",
                json!({"param": "amount"}),
            )
        }
    };
    let currency = match map.get("currency") {
        Some(c) if c.len() == 3 && c.chars().all(|ch| ch.is_ascii_alphabetic()) => {
            c.to_ascii_lowercase()
        }
        _ => {
            return stripe_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("parameter_invalid"),
                "currency must be a three-letter ISO code.",
                json!({"param": "currency"}),
            )
        }
    };
    let Some(payment_method) = map.get("payment_method").cloned() else {
        return stripe_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("parameter_missing"),
            "Missing required param: payment_method.",
            json!({"param": "payment_method"}),
        );
    };
    let known = [
        "pm_card_visa",
        "pm_card_chargeDeclined",
        "pm_card_slow",
        "pm_card_processing",
        "pm_card_lost_response",
        "pm_card_error",
    ];
    if !known.contains(&payment_method.as_str()) {
        return stripe_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("resource_missing"),
            &format!("No such PaymentMethod: '{payment_method}'"),
            json!({"param": "payment_method"}),
        );
    }
    let metadata: serde_json::Map<String, Value> = map
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("metadata[")
                .and_then(|r| r.strip_suffix(']'))
                .map(|name| (name.to_string(), json!(v)))
        })
        .collect();
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let request_hash = {
        let mut h = Sha256::new();
        for (k, v) in &map {
            h.update(k.as_bytes());
            h.update([0]);
            h.update(v.as_bytes());
            h.update([0]);
        }
        hex::encode(h.finalize())
    };
    if let Some(key) = &key {
        match claim_key(&inner.db, key, &request_hash).await {
            Ok(KeyClaim::Fresh) => {}
            Ok(KeyClaim::Replay(code, body)) => {
                let status = StatusCode::from_u16(code as u16).unwrap_or(StatusCode::OK);
                let mut r = (status, [("content-type", "application/json")], body).into_response();
                r.headers_mut()
                    .insert("idempotent-replayed", "true".parse().unwrap());
                return r;
            }
            Ok(KeyClaim::OtherParams) => {
                return stripe_error(StatusCode::BAD_REQUEST, "idempotency_error", None, "Keys for idempotent requests can only be used with the same parameters they were first used with.", json!({}));
            }
            Ok(KeyClaim::InProgress) => {
                return stripe_error(
                    StatusCode::CONFLICT,
                    "idempotency_error",
                    None,
                    "There is currently another in-progress request using this Idempotent Key.",
                    json!({}),
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "sandbox storage");
                return stripe_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "api_error",
                    None,
                    "storage error",
                    json!({}),
                );
            }
        }
    }
    if payment_method == "pm_card_error" {
        if let Some(key) = &key {
            let _ = sqlx::query("DELETE FROM sandbox_idempotency WHERE key = $1")
                .bind(key)
                .execute(inner.db.pool())
                .await;
        }
        return stripe_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "api_error",
            None,
            "Simulated provider error before charging; retry.",
            json!({}),
        );
    }
    if payment_method == "pm_card_slow" {
        tokio::time::sleep(Duration::from_millis(inner.settings.slow_ms)).await;
    }
    let (status, error_code) = match payment_method.as_str() {
        "pm_card_chargeDeclined" => ("requires_payment_method", Some("card_declined".to_string())),
        "pm_card_processing" => ("processing", None),
        _ => ("succeeded", None),
    };
    let row = IntentRow {
        id: format!("pi_{}", uuid_simple()),
        amount,
        currency,
        payment_method: payment_method.clone(),
        status: status.into(),
        metadata: Value::Object(metadata).to_string(),
        error_code,
        created_at: now_millis(),
    };
    if let Err(e) = sqlx::query(
        "INSERT INTO sandbox_intents (id, amount, currency, payment_method, status, metadata, idempotency_key, error_code, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&row.id)
    .bind(row.amount)
    .bind(&row.currency)
    .bind(&row.payment_method)
    .bind(&row.status)
    .bind(&row.metadata)
    .bind(&key)
    .bind(&row.error_code)
    .bind(row.created_at)
    .execute(inner.db.pool())
    .await
    {
        tracing::error!(error = %e, "sandbox storage");
        return stripe_error(StatusCode::INTERNAL_SERVER_ERROR, "api_error", None, "storage error", json!({}));
    }
    let intent = intent_json(&row);
    let (code, body) = if row.error_code.is_some() {
        (
            402u16,
            json!({"error": {"type": "card_error", "code": "card_declined", "decline_code": "generic_decline", "message": "Your card was declined.", "payment_intent": intent}}),
        )
    } else {
        (200u16, intent.clone())
    };
    if let Some(key) = &key {
        let _ = sqlx::query("UPDATE sandbox_idempotency SET state = 'done', status_code = $1, body = $2 WHERE key = $3")
            .bind(code as i64)
            .bind(body.to_string())
            .bind(key)
            .execute(inner.db.pool())
            .await;
    }
    tracing::info!(intent = %row.id, status = %row.status, amount = row.amount, "sandbox payment intent");
    match row.status.as_str() {
        "succeeded" => send_webhook(inner.clone(), "payment_intent.succeeded", intent.clone()),
        "requires_payment_method" => send_webhook(
            inner.clone(),
            "payment_intent.payment_failed",
            intent.clone(),
        ),
        _ => {
            let inner2 = inner.clone();
            let id = row.id.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let _ =
                    sqlx::query("UPDATE sandbox_intents SET status = 'succeeded' WHERE id = $1")
                        .bind(&id)
                        .execute(inner2.db.pool())
                        .await;
                if let Ok(Some(r)) = load_intent(&inner2.db, &id).await {
                    send_webhook(inner2.clone(), "payment_intent.succeeded", intent_json(&r));
                }
            });
        }
    }
    let lose = payment_method == "pm_card_lost_response" || {
        let mut f = inner.faults.lock().expect("faults");
        if f.lose_response_after_charge > 0 {
            f.lose_response_after_charge -= 1;
            true
        } else {
            false
        }
    };
    if lose {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    (
        StatusCode::from_u16(code).unwrap_or(StatusCode::OK),
        Json(body),
    )
        .into_response()
}

/// How long an unfinished request holds its idempotency key.
const STALE_IN_PROGRESS_MS: i64 = 60_000;

enum KeyClaim {
    Fresh,
    Replay(i64, String),
    OtherParams,
    InProgress,
}

async fn claim_key(db: &Database, key: &str, hash: &str) -> Result<KeyClaim, sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO sandbox_idempotency (key, request_hash, state, status_code, body, created_at)
         VALUES ($1, $2, 'in_progress', 0, '', $3) ON CONFLICT (key) DO NOTHING",
    )
    .bind(key)
    .bind(hash)
    .bind(now_millis())
    .execute(db.pool())
    .await?;
    if inserted.rows_affected() == 1 {
        return Ok(KeyClaim::Fresh);
    }
    // A request that never finished (the sandbox stopped in the middle)
    // releases its key after a minute, as Stripe's do.
    let now = now_millis();
    let taken = sqlx::query(
        "UPDATE sandbox_idempotency SET created_at = $1
         WHERE key = $2 AND request_hash = $3 AND state = 'in_progress' AND created_at < $4",
    )
    .bind(now)
    .bind(key)
    .bind(hash)
    .bind(now - STALE_IN_PROGRESS_MS)
    .execute(db.pool())
    .await?;
    if taken.rows_affected() == 1 {
        return Ok(KeyClaim::Fresh);
    }
    let (stored_hash, state, code, body): (String, String, i64, String) = sqlx::query_as(
        "SELECT request_hash, state, status_code, body FROM sandbox_idempotency WHERE key = $1",
    )
    .bind(key)
    .fetch_one(db.pool())
    .await?;
    Ok(if stored_hash != hash {
        KeyClaim::OtherParams
    } else if state != "done" {
        KeyClaim::InProgress
    } else {
        KeyClaim::Replay(code, body)
    })
}

async fn load_intent(db: &Database, id: &str) -> Result<Option<IntentRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, amount, currency, payment_method, status, metadata, error_code, created_at
         FROM sandbox_intents WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(db.pool())
    .await
}

async fn get_intent(
    State(inner): State<Shared>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if !authorized(&inner, &headers) {
        return stripe_error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            None,
            "Invalid API Key provided.",
            json!({}),
        );
    }
    match load_intent(&inner.db, &id).await {
        Ok(Some(row)) => Json(intent_json(&row)).into_response(),
        Ok(None) => stripe_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some("resource_missing"),
            &format!("No such payment_intent: '{id}'"),
            json!({"param": "intent"}),
        ),
        Err(e) => {
            tracing::error!(error = %e, "sandbox storage");
            stripe_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                None,
                "storage error",
                json!({}),
            )
        }
    }
}

async fn list_charges(State(inner): State<Shared>) -> Response {
    let rows: Vec<IntentRow> = match sqlx::query_as(
        "SELECT id, amount, currency, payment_method, status, metadata, error_code, created_at
         FROM sandbox_intents WHERE status IN ('succeeded', 'processing') ORDER BY created_at",
    )
    .fetch_all(inner.db.pool())
    .await
    {
        Ok(r) => r,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    };
    let charges: Vec<Value> = rows.iter().map(intent_json).collect();
    Json(json!({"count": charges.len(), "charges": charges})).into_response()
}

async fn set_faults(State(inner): State<Shared>, Json(f): Json<Faults>) -> Json<Faults> {
    *inner.faults.lock().expect("faults") = f.clone();
    Json(f)
}

#[derive(serde::Deserialize)]
struct WebhookTarget {
    url: Option<String>,
}

async fn set_webhook(State(inner): State<Shared>, Json(t): Json<WebhookTarget>) -> StatusCode {
    *inner.webhook_url.lock().expect("webhook") = t.url;
    StatusCode::NO_CONTENT
}

/// Sends a signed event to the webhook URL, retrying with backoff (8 tries
/// over about two minutes). Stripe retries for days; a sandbox need not.
fn send_webhook(inner: Shared, kind: &'static str, object: Value) {
    let Some(url) = inner.webhook_url.lock().expect("webhook").clone() else {
        return;
    };
    tokio::spawn(async move {
        let event = json!({
            "id": format!("evt_{}", uuid_simple()),
            "object": "event",
            "type": kind,
            "created": now_millis() / 1000,
            "data": {"object": object},
        });
        let body = event.to_string();
        let mut delay = Duration::from_millis(250);
        for attempt in 1..=8 {
            let header = signature::sign(
                &inner.settings.webhook_secret,
                now_millis() / 1000,
                body.as_bytes(),
            );
            let result = inner
                .http
                .post(&url)
                .header("content-type", "application/json")
                .header("stripe-signature", header)
                .body(body.clone())
                .send()
                .await;
            match result {
                Ok(r) if r.status().is_success() => {
                    tracing::info!(kind, attempt, "sandbox webhook delivered");
                    return;
                }
                Ok(r) => {
                    tracing::warn!(kind, attempt, status = %r.status(), "sandbox webhook refused")
                }
                Err(e) => tracing::warn!(kind, attempt, error = %e, "sandbox webhook failed"),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(30));
        }
        tracing::error!(kind, "sandbox webhook given up after 8 attempts");
    });
}

fn uuid_simple() -> String {
    shoal_core::ids::new_id().replace('-', "")
}
