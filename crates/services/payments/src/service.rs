//! The payments service module: the `payments.charge` job (one payment
//! row per order; the payment's id is the provider's idempotency key, so
//! retries after timeouts or crashes are one charge), signed provider
//! webhooks at `POST /api/payments/webhooks`, and a reconciliation job
//! every minute that settles payments left pending. A settled payment
//! enqueues `orders.settle` in the same transaction.

use crate::{ChargeOutcome, ChargeRequest, PaymentProvider, ProviderError, StripeProvider};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use serde_json::{json, Value};
use shoal_backends::{now_millis, Migration};
use shoal_core::Problem;
use shoal_queue::{
    handler_fn, JobContext, JobError, JobStore, KindOptions, NewJob, Schedule, Worker,
};
use shoal_runtime::error::ApiResult;
use shoal_runtime::openapi::{Api, Op};
use shoal_runtime::{ApiError, AppContext, ServiceModule};
use std::sync::Arc;
use std::time::Duration;

pub const CHARGE_KIND: &str = "payments.charge";
pub const RECONCILE_KIND: &str = "payments.reconcile";
const SETTLE_KIND: &str = "orders.settle";

#[derive(Debug, Clone, Default)]
pub struct Payments;

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "payments",
        sql: "CREATE TABLE IF NOT EXISTS payments (
        id TEXT PRIMARY KEY,
        order_id TEXT NOT NULL UNIQUE,
        user_id TEXT NOT NULL,
        amount BIGINT NOT NULL,
        currency TEXT NOT NULL,
        payment_method TEXT NOT NULL,
        status TEXT NOT NULL,
        provider_id TEXT,
        failure TEXT,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL);
    CREATE INDEX IF NOT EXISTS payments_pending ON payments (status, updated_at);",
    },
    Migration {
        version: 2,
        name: "payments_traceparent",
        // The trace of the checkout that made the payment, so that a provider
        // webhook settling it later continues that trace.
        sql: "ALTER TABLE payments ADD COLUMN traceparent TEXT",
    },
];

fn provider(ctx: &AppContext) -> Arc<dyn PaymentProvider> {
    let p = &ctx.settings.payments;
    Arc::new(StripeProvider::new(
        &p.provider_url,
        &p.api_key,
        Duration::from_millis(p.request_timeout_ms),
    ))
}

impl ServiceModule for Payments {
    fn name(&self) -> &'static str {
        "payments"
    }

    fn migrations(&self) -> &'static [Migration] {
        MIGRATIONS
    }

    fn routes(&self, _ctx: &AppContext) -> Api {
        use serde_json::json;
        Api::new().post(
            "/api/payments/webhooks",
            webhook,
            Op::new("payments", "Payment provider events")
                .describe("For the payment provider (Stripe-style events, signed with payments.webhook_secret in Stripe-Signature). An event changes nothing until the provider confirms it.")
                .header("stripe-signature", true, "t=<unix seconds>,v1=<hex HMAC-SHA256>")
                .body("application/json", json!({"type": "object"}))
                .json(
                    200,
                    "Received",
                    json!({"type": "object", "required": ["received", "applied"], "properties": {
                        "received": {"type": "boolean"}, "applied": {"type": "boolean"}}}),
                ),
        )
    }

    fn register_jobs(&self, ctx: &AppContext, worker: Worker) -> Worker {
        let provider = provider(ctx);
        let (c1, p1) = (ctx.clone(), provider.clone());
        let (c2, p2) = (ctx.clone(), provider);
        let worker = worker
            .register_with(
                CHARGE_KIND,
                handler_fn(move |job: JobContext| {
                    let (ctx, provider) = (c1.clone(), p1.clone());
                    async move { charge(&ctx, provider.as_ref(), &job).await }
                }),
                KindOptions {
                    backoff: shoal_queue::Backoff {
                        base: Duration::from_millis(500),
                        max: Duration::from_secs(60),
                        jitter: 0.5,
                    },
                    rate_limit: None,
                },
            )
            .register(
                RECONCILE_KIND,
                handler_fn(move |_job: JobContext| {
                    let (ctx, provider) = (c2.clone(), p2.clone());
                    async move { reconcile(&ctx, provider.as_ref()).await }
                }),
            );
        match Schedule::new(
            "payments-reconcile",
            "0 * * * * *",
            NewJob::new("payments", RECONCILE_KIND, json!({})),
        ) {
            Ok(s) => worker.schedule(s),
            Err(e) => {
                tracing::error!(error = %e, "reconciliation schedule refused");
                worker
            }
        }
    }
}

type PaymentRow = (String, String, String, i64, String, String, String);

async fn load_payment(ctx: &AppContext, order_id: &str) -> Result<Option<PaymentRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, order_id, user_id, amount, currency, payment_method, status FROM payments WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(ctx.db.pool())
    .await
}

/// `payments.charge`: `{order_id, user_id, amount, currency, payment_method}`.
async fn charge(
    ctx: &AppContext,
    provider: &dyn PaymentProvider,
    job: &JobContext,
) -> Result<(), JobError> {
    let p = job.payload();
    let text = |k: &str| {
        p[k].as_str()
            .map(str::to_string)
            .ok_or_else(|| JobError::permanent(format!("payload has no {k}")))
    };
    let order_id = text("order_id")?;
    let amount = p["amount"]
        .as_i64()
        .ok_or_else(|| JobError::permanent("payload has no amount"))?;
    let now = now_millis();
    sqlx::query(
        "INSERT INTO payments (id, order_id, user_id, amount, currency, payment_method, status, created_at, updated_at, traceparent)
         VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $7, $8) ON CONFLICT (order_id) DO NOTHING",
    )
    .bind(format!("pay_{}", shoal_core::ids::new_id().replace('-', "")))
    .bind(&order_id)
    .bind(text("user_id")?)
    .bind(amount)
    .bind(text("currency")?)
    .bind(text("payment_method")?)
    .bind(now)
    .bind(job.job().traceparent.clone())
    .execute(ctx.db.pool())
    .await
    .map_err(JobError::retryable)?;
    let Some(payment) = load_payment(ctx, &order_id)
        .await
        .map_err(JobError::retryable)?
    else {
        return Err(JobError::retryable("payment row vanished"));
    };
    if payment.6 != "pending" {
        // Settled already (a webhook, or an earlier attempt): make sure the
        // order hears of it, once.
        return enqueue_settle(ctx, &payment, payment.6 == "succeeded", None).await;
    }
    charge_and_settle(ctx, provider, &payment).await
}

async fn charge_and_settle(
    ctx: &AppContext,
    provider: &dyn PaymentProvider,
    payment: &PaymentRow,
) -> Result<(), JobError> {
    let (id, order_id, _user, amount, currency, method, _status) = payment;
    let request = ChargeRequest {
        amount: *amount,
        currency: currency.clone(),
        payment_method: method.clone(),
        idempotency_key: id.clone(),
        metadata: vec![
            ("payment_id".into(), id.clone()),
            ("order_id".into(), order_id.clone()),
        ],
    };
    let outcome = provider.charge(&request).await;
    apply_outcome(ctx, id, outcome).await
}

/// Settles (or keeps pending) payment `id` after the provider answered.
async fn apply_outcome(
    ctx: &AppContext,
    id: &str,
    outcome: Result<ChargeOutcome, ProviderError>,
) -> Result<(), JobError> {
    match outcome {
        Ok(ChargeOutcome::Succeeded { provider_id }) => {
            settle(ctx, id, true, Some(&provider_id), None).await
        }
        Ok(ChargeOutcome::Declined {
            provider_id,
            message,
            ..
        }) => settle(ctx, id, false, provider_id.as_deref(), Some(&message)).await,
        Ok(ChargeOutcome::Processing { provider_id }) => {
            sqlx::query("UPDATE payments SET provider_id = $1, updated_at = $2 WHERE id = $3")
                .bind(&provider_id)
                .bind(now_millis())
                .bind(id)
                .execute(ctx.db.pool())
                .await
                .map_err(JobError::retryable)?;
            tracing::info!(payment_id = %id, "payment processing; a webhook or reconciliation settles it");
            Ok(())
        }
        Err(ProviderError::Retryable(e)) => {
            metrics::counter!("shoal_payments_provider_errors_total").increment(1);
            Err(JobError::retryable(e))
        }
        Err(ProviderError::Permanent(e)) => settle(ctx, id, false, None, Some(&e)).await,
    }
}

/// Marks a pending payment settled and enqueues `orders.settle`, in one
/// transaction. A payment already settled is left as it is.
async fn settle(
    ctx: &AppContext,
    payment_id: &str,
    succeeded: bool,
    provider_id: Option<&str>,
    failure: Option<&str>,
) -> Result<(), JobError> {
    let mut writer = ctx.db.write().await.map_err(JobError::retryable)?;
    let mut tx = writer.begin().await.map_err(JobError::retryable)?;
    let changed = sqlx::query(
        "UPDATE payments SET status = $1, provider_id = COALESCE($2, provider_id), failure = $3, updated_at = $4
         WHERE id = $5 AND status = 'pending'",
    )
    .bind(if succeeded { "succeeded" } else { "failed" })
    .bind(provider_id)
    .bind(failure)
    .bind(now_millis())
    .bind(payment_id)
    .execute(&mut *tx)
    .await
    .map_err(JobError::retryable)?;
    if changed.rows_affected() == 1 {
        let order_id: (String,) = sqlx::query_as("SELECT order_id FROM payments WHERE id = $1")
            .bind(payment_id)
            .fetch_one(&mut *tx)
            .await
            .map_err(JobError::retryable)?;
        let job = settle_job(&order_id.0, succeeded, failure);
        ctx.jobs
            .enqueue_in_transaction(&mut tx, job)
            .await
            .map_err(JobError::retryable)?;
        metrics::counter!("shoal_payments_settled_total", "status" => if succeeded { "succeeded" } else { "failed" })
            .increment(1);
        tracing::info!(payment_id, succeeded, "payment settled");
    }
    tx.commit().await.map_err(JobError::retryable)?;
    drop(writer);
    Ok(())
}

fn settle_job(order_id: &str, paid: bool, reason: Option<&str>) -> NewJob {
    NewJob::new(
        "orders",
        SETTLE_KIND,
        json!({"order_id": order_id, "status": if paid { "paid" } else { "failed" }, "reason": reason}),
    )
    .unique_key(format!("settle:{order_id}"))
}

async fn enqueue_settle(
    ctx: &AppContext,
    payment: &PaymentRow,
    paid: bool,
    reason: Option<&str>,
) -> Result<(), JobError> {
    ctx.jobs
        .enqueue(settle_job(&payment.1, paid, reason))
        .await
        .map(|_| ())
        .map_err(JobError::retryable)
}

/// Settles payments pending for more than 30 s by asking the provider
/// again with the same idempotency key (a lost response is replayed).
async fn reconcile(ctx: &AppContext, provider: &dyn PaymentProvider) -> Result<(), JobError> {
    let stale: Vec<(String, String, String, i64, String, String, String, Option<String>)> =
        sqlx::query_as(
            "SELECT id, order_id, user_id, amount, currency, payment_method, status, provider_id
             FROM payments WHERE status = 'pending' AND updated_at < $1 ORDER BY updated_at LIMIT 100",
        )
        .bind(now_millis() - 30_000)
        .fetch_all(ctx.db.pool())
        .await
        .map_err(JobError::retryable)?;
    let count = stale.len();
    for (id, order, user, amount, currency, method, status, provider_id) in stale {
        // A charge the provider took (it answered `processing`): ask for
        // its state now; a replay of the charge would only repeat the first
        // answer. Without a provider id the charge may never have arrived,
        // or its answer was lost: charge again with the same key.
        let result = match provider_id {
            Some(pid) => {
                let outcome = provider.retrieve(&pid).await.map(|r| r.outcome);
                apply_outcome(ctx, &id, outcome).await
            }
            None => {
                let payment = (id.clone(), order, user, amount, currency, method, status);
                charge_and_settle(ctx, provider, &payment).await
            }
        };
        if let Err(e) = result {
            tracing::warn!(payment_id = %id, error = %e, "reconciliation of a payment failed; next run retries");
        }
    }
    if count > 0 {
        tracing::info!(count, "reconciled pending payments");
    }
    Ok(())
}

/// A signature proves only that the sender knows the webhook secret: an
/// event is a hint to ask the provider, whose record is the truth. The
/// payment is settled by that record when it is final and belongs to this
/// payment (same intent metadata, amount and currency), whatever the event
/// claimed; `Ok(None)` (answered 2xx, nothing applied, logged and counted)
/// when the payment is not ours, the record is not final, or it does not
/// match: an answer other than 2xx would only make the sender retry. A
/// provider that does not answer is 503, so the sender tries again later.
async fn confirm_with_provider(
    ctx: &AppContext,
    payment_id: &str,
    intent_id: &str,
) -> Result<Option<crate::ChargeRecord>, ApiError> {
    let payment: Option<(i64, String)> =
        sqlx::query_as("SELECT amount, currency FROM payments WHERE id = $1")
            .bind(payment_id)
            .fetch_optional(ctx.db.pool())
            .await
            .map_err(|e| {
                tracing::warn!(payment_id, error = %e, "cannot read the payment of a webhook");
                ApiError(Problem::unavailable(
                    "could not read the payment; send the event again later",
                    1,
                ))
            })?;
    let Some((amount, currency)) = payment else {
        return Ok(None);
    };
    let ignore = |why: String| {
        metrics::counter!("shoal_payments_webhooks_rejected_total").increment(1);
        tracing::warn!(payment_id, intent_id, %why, "webhook not applied: the provider's record does not confirm it");
        Ok(None)
    };
    let record = match provider(ctx).retrieve(intent_id).await {
        Ok(r) => r,
        Err(ProviderError::Retryable(e)) => {
            tracing::warn!(payment_id, intent_id, error = %e, "the provider could not confirm a webhook");
            return Err(ApiError(Problem::unavailable(
                "the provider could not confirm the event; send it again later",
                5,
            )));
        }
        Err(ProviderError::Permanent(e)) => return ignore(e),
    };
    if record.payment_id.as_deref() != Some(payment_id) {
        return ignore(format!("intent {intent_id} belongs to another payment"));
    }
    if record.amount != amount || !record.currency.eq_ignore_ascii_case(&currency) {
        return ignore(format!("intent {intent_id} is for another amount"));
    }
    if matches!(record.outcome, ChargeOutcome::Processing { .. }) {
        return ignore(format!("intent {intent_id} is still processing"));
    }
    Ok(Some(record))
}

async fn webhook(
    State(ctx): State<AppContext>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<Value>> {
    let settings = &ctx.settings.payments;
    let Some(signature) = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok())
    else {
        return Err(Problem::bad_request("missing Stripe-Signature header").into());
    };
    let now = now_millis() / 1000;
    if let Err(e) = crate::verify_webhook_signature(
        &settings.webhook_secret,
        signature,
        &body,
        now,
        settings.webhook_tolerance_secs as i64,
    ) {
        metrics::counter!("shoal_payments_webhooks_rejected_total").increment(1);
        return Err(Problem::bad_request(format!("webhook signature refused: {e}")).into());
    }
    let event: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError(Problem::bad_request(format!(
            "webhook body is not JSON: {e}"
        )))
    })?;
    let object = &event["data"]["object"];
    let payment_id = object["metadata"]["payment_id"]
        .as_str()
        .map(str::to_string);
    let outcome = match event["type"].as_str() {
        Some("payment_intent.succeeded") => Some(true),
        Some("payment_intent.payment_failed") => Some(false),
        _ => None,
    };
    // The event's claim (succeeded or failed) only says to look: the
    // provider's record decides.
    if let (Some(payment_id), Some(_claimed)) = (payment_id, outcome) {
        let Some(intent_id) = object["id"].as_str() else {
            return Err(Problem::bad_request("the event's object has no id").into());
        };
        let Some(record) = confirm_with_provider(&ctx, &payment_id, intent_id).await? else {
            return Ok(Json(json!({"received": true, "applied": false})));
        };
        let (paid, failure) = match &record.outcome {
            ChargeOutcome::Succeeded { .. } => (true, None),
            ChargeOutcome::Declined { message, .. } => (false, Some(message.as_str())),
            ChargeOutcome::Processing { .. } => {
                unreachable!("confirm_with_provider keeps final records only")
            }
        };
        // Settled in the checkout's trace (the payment's), linked to this
        // request's own.
        let parent: Option<(Option<String>,)> =
            sqlx::query_as("SELECT traceparent FROM payments WHERE id = $1")
                .bind(&payment_id)
                .fetch_optional(ctx.db.pool())
                .await?;
        let parent = parent
            .and_then(|(tp,)| tp)
            .as_deref()
            .and_then(shoal_core::spans::SpanContext::parse);
        let mut span = parent.and_then(|p| {
            shoal_core::spans::start(
                format!("payment webhook {}", event["type"].as_str().unwrap_or("")),
                shoal_core::spans::Kind::Consumer,
                Some(p),
            )
        });
        if let (Some(span), Some(here)) = (span.as_mut(), shoal_core::spans::current()) {
            span.link(here);
        }
        let settling = settle(&ctx, &payment_id, paid, Some(intent_id), failure);
        let settled = match &span {
            Some(span) => shoal_core::spans::within(span.ctx, settling).await,
            None => settling.await,
        };
        if let Some(mut span) = span {
            if let Err(e) = &settled {
                span.fail(e.to_string());
            }
            span.end();
        }
        settled.map_err(|e| {
            tracing::warn!(payment_id, error = %e, "cannot settle a confirmed webhook");
            ApiError(Problem::unavailable(
                "could not settle; send the event again later",
                1,
            ))
        })?;
        return Ok(Json(json!({"received": true, "applied": true})));
    }
    Ok(Json(json!({"received": true, "applied": false})))
}
