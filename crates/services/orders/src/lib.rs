//! The orders service. `POST /api/orders` needs an `Idempotency-Key`: the
//! same key with the same body returns the first response; with another
//! body it is a 422. Stock is held, and products and prices read, by one
//! call to the catalog service for all lines (a stock reservation, over
//! HTTP: `ServiceClient`, client-side balanced, deadline, retries, circuit
//! breaker) — never from its tables. The reservation's id comes from the
//! user and the key, so a retried checkout holds its stock once. A line
//! short of stock is a 409 naming it, and nothing is held. The order (pending payment),
//! the stored idempotent response and the `payments.charge` job commit in
//! one transaction, so a committed order always has its payment job and a
//! rolled-back one never does. The `orders.settle` job (sent by payments)
//! marks the order paid or failed, queues the receipt or payment-failed
//! email, the user's signed webhook deliveries and (when failed) the
//! catalog's `catalog.release_stock` job in the same transaction,
//! and publishes an event to the user's realtime streams (through the
//! notifications service's library).

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use shoal_backends::{now_millis, rusqlite, DatabaseKind, Finish, Migration};
use shoal_core::Problem;
use shoal_queue::{handler_fn, JobContext, JobError, JobStore as _, NewJob, Worker};
use shoal_runtime::error::ApiResult;
use shoal_runtime::openapi::{Api, Op};
use shoal_runtime::{
    ApiError, ApiJson, AppContext, ClientOptions, CurrentSession, ServiceClient, ServiceModule,
};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Job kind the payments service handles to charge an order.
pub const CHARGE_KIND: &str = "payments.charge";
/// Job kind this service handles when a payment settles.
pub const SETTLE_KIND: &str = "orders.settle";

/// The orders service module.
#[derive(Debug, Clone, Default)]
pub struct Orders {
    catalog: OnceLock<Arc<ServiceClient>>,
}

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "orders",
        sql: "CREATE TABLE IF NOT EXISTS orders (
        id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL,
        status TEXT NOT NULL,
        items TEXT NOT NULL,
        total_cents BIGINT NOT NULL,
        currency TEXT NOT NULL,
        payment_method TEXT NOT NULL,
        idempotency_key TEXT NOT NULL,
        request_hash TEXT NOT NULL,
        response TEXT NOT NULL,
        failure TEXT,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL,
        UNIQUE (user_id, idempotency_key));
    CREATE INDEX IF NOT EXISTS orders_user ON orders (user_id, created_at);",
    },
    Migration {
        version: 2,
        name: "orders_reservation",
        // The catalog's stock reservation, released when payment fails (NULL
        // for orders placed before reservations).
        sql: "ALTER TABLE orders ADD COLUMN reservation_id TEXT;",
    },
];

impl ServiceModule for Orders {
    fn name(&self) -> &'static str {
        "orders"
    }

    fn migrations(&self) -> &'static [Migration] {
        MIGRATIONS
    }

    fn routes(&self, ctx: &AppContext) -> Api {
        let c = &ctx.settings.clients;
        let client = self
            .catalog
            .get_or_init(|| {
                Arc::new(ServiceClient::new(
                    "catalog",
                    &c.catalog,
                    ClientOptions {
                        timeout: Duration::from_millis(c.timeout_ms),
                        retries: c.retries,
                        breaker_failures: c.breaker_failures,
                        breaker_open: Duration::from_millis(c.breaker_open_ms),
                        token: Some(c.token.clone()),
                    },
                ))
            })
            .clone();
        const TAG: &str = "orders";
        Api::new()
            .get(
                "/api/orders",
                list,
                Op::new(TAG, "The user's orders").session().json(
                    200,
                    "Newest first, at most 100",
                    serde_json::json!({"type": "object", "required": ["orders"], "properties": {
                        "orders": {"type": "array", "items": shoal_runtime::openapi::response_schema::<OrderView>()}}}),
                ),
            )
            .post(
                "/api/orders",
                create,
                Op::new(TAG, "Check out")
                    .describe("Holds the stock and creates the order (pending_payment); the payment runs in the background. The same Idempotency-Key with the same body answers the first order again (idempotent-replayed: true).")
                    .session()
                    .header("idempotency-key", true, "1-255 characters, e.g. a UUID: a retried checkout cannot order twice")
                    .json_body::<CreateOrder>()
                    .returns::<OrderView>(201, "The order")
                    .with_header("location", "the order's URL (not on a replay)")
                    .with_header("idempotent-replayed", "true when this answers an earlier request")
                    .problems(&[409]),
            )
            .get(
                "/api/orders/{id}",
                show,
                Op::new(TAG, "An order")
                    .session()
                    .returns::<OrderView>(200, "The order")
                    .problems(&[404]),
            )
            .layer(axum::Extension(client))
    }

    fn register_jobs(&self, ctx: &AppContext, worker: Worker) -> Worker {
        let ctx = ctx.clone();
        worker.register(
            SETTLE_KIND,
            handler_fn(move |job: JobContext| {
                let ctx = ctx.clone();
                async move { settle(&ctx, &job).await }
            }),
        )
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ItemRequest {
    product_id: String,
    quantity: i64,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct CreateOrder {
    items: Vec<ItemRequest>,
    #[serde(default)]
    payment_method: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
struct OrderItem {
    product_id: String,
    name: String,
    quantity: i64,
    unit_price_cents: i64,
}

#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
struct OrderView {
    id: String,
    status: String,
    items: Vec<OrderItem>,
    total_cents: i64,
    currency: String,
    failure: Option<String>,
    created_at: i64,
    updated_at: i64,
}

type OrderRow = (
    String,
    String,
    String,
    i64,
    String,
    Option<String>,
    i64,
    i64,
);

fn view(row: OrderRow) -> OrderView {
    let (id, status, items, total_cents, currency, failure, created_at, updated_at) = row;
    OrderView {
        id,
        status,
        items: serde_json::from_str(&items).unwrap_or_default(),
        total_cents,
        currency,
        failure,
        created_at,
        updated_at,
    }
}

const SELECT: &str =
    "SELECT id, status, items, total_cents, currency, failure, created_at, updated_at FROM orders";

fn replay(stored: &str) -> Response {
    let body: Value = serde_json::from_str(stored).unwrap_or(Value::Null);
    let mut r = (StatusCode::CREATED, Json(body)).into_response();
    r.headers_mut()
        .insert("idempotent-replayed", "true".parse().unwrap());
    r
}

async fn create(
    State(ctx): State<AppContext>,
    axum::Extension(catalog): axum::Extension<Arc<ServiceClient>>,
    CurrentSession(session): CurrentSession,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateOrder>,
) -> ApiResult<Response> {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .unwrap_or_default()
        .to_string();
    if key.is_empty() || key.len() > 255 {
        return Err(Problem::bad_request(
            "send an `Idempotency-Key` header (1–255 characters, e.g. a UUID) so a retried checkout cannot order twice",
        )
        .with_field("Idempotency-Key", "is required")
        .into());
    }
    let mut problem = Problem::validation("the order is invalid; see `errors`");
    if body.items.is_empty() || body.items.len() > 100 {
        problem = problem.with_field("items", "must hold 1 to 100 items");
    }
    for (i, item) in body.items.iter().enumerate() {
        if item.quantity < 1 || item.quantity > 1000 {
            problem =
                problem.with_field(format!("items[{i}].quantity"), "must be between 1 and 1000");
        }
        if shoal_core::ids::parse_id(&item.product_id).is_none() {
            // Only an id goes into the catalog URL below: never a path.
            problem = problem.with_field(
                format!("items[{i}].product_id"),
                "must be a product id (a UUID, as the catalog lists them)",
            );
        }
    }
    let payment_method = body
        .payment_method
        .clone()
        .unwrap_or_else(|| "pm_card_visa".into());
    if !payment_method.starts_with("pm_") || payment_method.len() > 100 {
        problem = problem.with_field(
            "payment_method",
            "must be a payment method id such as pm_card_visa",
        );
    }
    if !problem.errors.is_empty() {
        return Err(problem.into());
    }
    let request_hash = {
        let canonical = json!({"items": body.items, "payment_method": payment_method});
        shoal_core::ids::hex(&Sha256::digest(canonical.to_string().as_bytes()))
    };
    // A retry of a request we already answered: replay or refuse.
    if let Some((hash, response)) = find_by_key(&ctx, &session.user_id, &key).await? {
        return if hash == request_hash {
            Ok(replay(&response))
        } else {
            Err(key_reused())
        };
    }
    // Stock held and prices read in one catalog call for every line.
    let reservation_id = reservation_id(&session.user_id, &key);
    let reservation = reserve(&catalog, &reservation_id, &body.items).await?;
    let mut items = Vec::with_capacity(reservation.items.len());
    let mut currency: Option<String> = None;
    let mut total: i64 = 0;
    for (i, line) in reservation.items.into_iter().enumerate() {
        if currency.get_or_insert_with(|| line.currency.clone()) != &line.currency {
            // Nothing will be ordered: the hold goes back.
            release_later(&ctx, &reservation_id).await?;
            return Err(
                Problem::validation("all items must be priced in one currency")
                    .with_field(
                        format!("items[{i}].product_id"),
                        "is priced in another currency",
                    )
                    .into(),
            );
        }
        total = total.saturating_add(line.price_cents.saturating_mul(line.quantity));
        items.push(OrderItem {
            product_id: line.product_id,
            name: line.name,
            quantity: line.quantity,
            unit_price_cents: line.price_cents,
        });
    }
    let currency = currency.unwrap_or_else(|| "usd".into());
    let now = now_millis();
    let order = OrderView {
        id: shoal_core::ids::new_id(),
        status: "pending_payment".into(),
        items,
        total_cents: total,
        currency,
        failure: None,
        created_at: now,
        updated_at: now,
    };
    let response = serde_json::to_string(&order).expect("order serializes");
    let job = NewJob::new(
        "payments",
        CHARGE_KIND,
        json!({
            "order_id": order.id,
            "user_id": session.user_id,
            "amount": order.total_cents,
            "currency": order.currency,
            "payment_method": payment_method,
        }),
    )
    .unique_key(format!("charge:{}", order.id))
    .max_attempts(10);
    let row = NewOrderRow {
        id: order.id.clone(),
        user_id: session.user_id.clone(),
        status: order.status.clone(),
        items: serde_json::to_string(&order.items).expect("items serialize"),
        total_cents: order.total_cents,
        currency: order.currency.clone(),
        payment_method,
        key,
        request_hash,
        response,
        now,
        reservation_id,
    };
    let request_hash = row.request_hash.clone();
    let placed = match ctx.db.kind() {
        DatabaseKind::Sqlite => {
            let jobs = Arc::clone(&ctx.jobs);
            let job = jobs
                .prepare(job)
                .map_err(|e| ApiError::internal("enqueueing the payment job", &e))?;
            ctx.db
                .sqlite_write(move |c| place_sqlite(c, &row, &jobs, job))
                .await?
        }
        DatabaseKind::Postgres => place_sqlx(&ctx, &row, job).await?,
    };
    if let Placed::Existing(existing) = placed {
        // A concurrent request with the same key won the race (and holds
        // the same reservation: its id comes from the key).
        return match existing {
            Some((hash, stored)) if hash == request_hash => Ok(replay(&stored)),
            _ => Err(key_reused()),
        };
    }
    metrics::counter!("shoal_orders_created_total").increment(1);
    tracing::info!(order_id = %order.id, total = order.total_cents, "order created; payment queued");
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/api/orders/{}", order.id))],
        Json(order),
    )
        .into_response())
}

/// The stock reservation of a checkout: one per user and idempotency
/// key, so a retried request finds the hold it made.
fn reservation_id(user: &str, key: &str) -> String {
    let digest = Sha256::digest(format!("{user}\n{key}").as_bytes());
    format!("order:{}", shoal_core::ids::hex(&digest[..16]))
}

/// Holds stock for every line in one catalog call. The catalog's refusal
/// (a line short of stock, a product that does not exist, the key reused
/// for other items) comes back as the client's problem, field by field
/// (the lines keep their order); anything else is a 503 to retry.
async fn reserve(
    catalog: &ServiceClient,
    id: &str,
    items: &[ItemRequest],
) -> Result<shoal_catalog::Reservation, ApiError> {
    let body = json!({"id": id, "items": items});
    let unavailable = || {
        ApiError(Problem::unavailable(
            "the catalog service is unavailable; retry with the same Idempotency-Key",
            1,
        ))
    };
    match catalog
        .post_json::<shoal_catalog::Reservation>("/api/catalog/reservations", &body)
        .await
    {
        Ok(Some(r)) if r.items.len() == items.len() => Ok(r),
        Ok(_) => {
            tracing::warn!("the catalog's reservation answer does not match the request");
            Err(unavailable())
        }
        Err(shoal_runtime::ClientError::Status {
            status: status @ (409 | 422),
            body,
            ..
        }) => {
            let theirs: Problem = serde_json::from_str(&body).map_err(|e| {
                tracing::warn!(error = %e, "unreadable refusal from the catalog");
                unavailable()
            })?;
            if theirs.errors.iter().any(|e| e.field == "id") {
                return Err(key_reused());
            }
            let mut p = if status == 409 {
                Problem::conflict("not enough stock for every item; nothing was ordered")
            } else {
                Problem::validation("an item's product does not exist; nothing was ordered")
            };
            for e in theirs.errors {
                p = p.with_field(e.field, e.message);
            }
            Err(p.into())
        }
        Err(e) => {
            // The cause (it may hold the other service's answer) goes to
            // the log, never to the client.
            tracing::warn!(error = %e, "catalog reservation failed");
            Err(unavailable())
        }
    }
}

/// Queues the release of a reservation no order will use.
async fn release_later(ctx: &AppContext, reservation_id: &str) -> Result<(), ApiError> {
    // Nothing else to commit with it: the store's own enqueue.
    ctx.jobs
        .enqueue(release_job(reservation_id))
        .await
        .map_err(|e| ApiError::internal("queueing a stock release", &e))?;
    Ok(())
}

fn release_job(reservation_id: &str) -> NewJob {
    NewJob::new(
        shoal_catalog::RELEASE_QUEUE,
        shoal_catalog::RELEASE_KIND,
        json!({"reservation_id": reservation_id}),
    )
    .unique_key(format!("release:{reservation_id}"))
    .max_attempts(25)
}

fn key_reused() -> ApiError {
    ApiError(
        Problem::validation(
            "this Idempotency-Key was used with a different request; use a new key for a new order",
        )
        .with_field("Idempotency-Key", "was used with another body"),
    )
}

const BY_KEY: &str =
    "SELECT request_hash, response FROM orders WHERE user_id = $1 AND idempotency_key = $2";

async fn find_by_key(
    ctx: &AppContext,
    user: &str,
    key: &str,
) -> Result<Option<(String, String)>, ApiError> {
    if ctx.db.kind() == DatabaseKind::Sqlite {
        // On the writing connection, with no hand-off (sqlx's pooled
        // connections cost two: pings on lending and return).
        return ctx.db.sqlite_read(|c| by_key_sqlite(c, user, key)).await;
    }
    Ok(sqlx::query_as(BY_KEY)
        .bind(user)
        .bind(key)
        .fetch_optional(ctx.db.pool())
        .await?)
}

fn by_key_sqlite(
    c: &rusqlite::Connection,
    user: &str,
    key: &str,
) -> Result<Option<(String, String)>, ApiError> {
    use rusqlite::OptionalExtension;
    Ok(c.prepare_cached(BY_KEY)?
        .query_row([user, key], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?)
}

/// An order to insert, with its stored answer.
struct NewOrderRow {
    id: String,
    user_id: String,
    status: String,
    items: String,
    total_cents: i64,
    currency: String,
    payment_method: String,
    key: String,
    request_hash: String,
    response: String,
    now: i64,
    reservation_id: String,
}

/// What inserting an order came to.
enum Placed {
    /// Inserted, with its payment job.
    Created,
    /// The key already holds an order: its request hash and answer.
    Existing(Option<(String, String)>),
}

const INSERT_ORDER: &str = "INSERT INTO orders (id, user_id, status, items, total_cents,
        currency, payment_method, idempotency_key, request_hash, response, created_at,
        updated_at, reservation_id)
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11, $12)
     ON CONFLICT (user_id, idempotency_key) DO NOTHING";

/// The order and its payment job in one synchronous SQLite transaction
/// (`Database::sqlite_write`: one hand-off where sqlx makes one per
/// statement).
fn place_sqlite(
    c: &rusqlite::Connection,
    o: &NewOrderRow,
    jobs: &shoal_queue::SqlJobStore,
    job: shoal_queue::PreparedJob,
) -> Result<Finish<Placed>, ApiError> {
    let inserted = c.prepare_cached(INSERT_ORDER)?.execute(rusqlite::params![
        o.id,
        o.user_id,
        o.status,
        o.items,
        o.total_cents,
        o.currency,
        o.payment_method,
        o.key,
        o.request_hash,
        o.response,
        o.now,
        o.reservation_id,
    ])?;
    if inserted == 0 {
        let existing = by_key_sqlite(c, &o.user_id, &o.key)?;
        return Ok(Finish::Rollback(Placed::Existing(existing)));
    }
    jobs.enqueue_on_sqlite(c, job)
        .map_err(|e| ApiError::internal("enqueueing the payment job", &e))?;
    Ok(Finish::Commit(Placed::Created))
}

/// PostgreSQL's SQLSTATE for a lock wait past `lock_timeout`.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// The same on PostgreSQL, through sqlx.
async fn place_sqlx(ctx: &AppContext, o: &NewOrderRow, job: NewJob) -> Result<Placed, ApiError> {
    let mut writer = ctx.db.write().await?;
    let mut tx = writer.begin().await?;
    // An earlier attempt with this key whose insert is not committed yet
    // (its instance cut off mid-transaction, say) holds the key's index
    // entry: wait for it briefly, then answer 409 (in progress, retry)
    // instead of waiting as long as that instance is gone.
    sqlx::query("SET LOCAL lock_timeout = '500ms'")
        .execute(&mut *tx)
        .await?;
    let inserted = sqlx::query(INSERT_ORDER)
        .bind(&o.id)
        .bind(&o.user_id)
        .bind(&o.status)
        .bind(&o.items)
        .bind(o.total_cents)
        .bind(&o.currency)
        .bind(&o.payment_method)
        .bind(&o.key)
        .bind(&o.request_hash)
        .bind(&o.response)
        .bind(o.now)
        .bind(&o.reservation_id)
        .execute(&mut *tx)
        .await;
    let inserted = match inserted {
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(LOCK_NOT_AVAILABLE) => {
            tx.rollback().await?;
            return Err(Problem::conflict(
                "another request with this Idempotency-Key is still in progress; retry it with the same key in a moment",
            )
            .with_field("Idempotency-Key", "is in use by a request in progress")
            .into());
        }
        other => other?,
    };
    if inserted.rows_affected() == 0 {
        tx.rollback().await?;
        drop(writer);
        let existing = find_by_key(ctx, &o.user_id, &o.key).await?;
        return Ok(Placed::Existing(existing));
    }
    ctx.jobs
        .enqueue_in_transaction(&mut tx, job)
        .await
        .map_err(|e| ApiError::internal("enqueueing the payment job", &e))?;
    tx.commit().await?;
    Ok(Placed::Created)
}

async fn list(
    State(ctx): State<AppContext>,
    CurrentSession(session): CurrentSession,
) -> ApiResult<Response> {
    let rows: Vec<OrderRow> = sqlx::query_as(&format!(
        "{SELECT} WHERE user_id = $1 ORDER BY created_at DESC LIMIT 100"
    ))
    .bind(&session.user_id)
    .fetch_all(ctx.db.pool())
    .await?;
    let orders: Vec<OrderView> = rows.into_iter().map(view).collect();
    Ok((
        [(header::CACHE_CONTROL, "private, no-store")],
        Json(json!({"orders": orders})),
    )
        .into_response())
}

async fn show(
    State(ctx): State<AppContext>,
    CurrentSession(session): CurrentSession,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let row: Option<OrderRow> = sqlx::query_as(&format!("{SELECT} WHERE id = $1 AND user_id = $2"))
        .bind(&id)
        .bind(&session.user_id)
        .fetch_optional(ctx.db.pool())
        .await?;
    match row {
        Some(r) => Ok((
            [(header::CACHE_CONTROL, "private, no-store")],
            Json(view(r)),
        )
            .into_response()),
        None => Err(Problem::not_found(format!("no order `{id}`")).into()),
    }
}

/// `orders.settle`: `{order_id, status: "paid"|"failed", reason?}`. Only a
/// pending order changes, so running twice is harmless; the event is
/// published on the bus channel `user.<id>`.
async fn settle(ctx: &AppContext, job: &JobContext) -> Result<(), JobError> {
    let p = job.payload();
    let order_id = p["order_id"]
        .as_str()
        .ok_or_else(|| JobError::permanent("no order_id"))?;
    let status = match p["status"].as_str() {
        Some(s @ ("paid" | "failed")) => s,
        _ => return Err(JobError::permanent("status must be paid or failed")),
    };
    let reason = p["reason"].as_str();
    // The status change and its email commit together: a settled order
    // always has its receipt (or failure notice) queued, exactly once.
    let mut writer = ctx.db.write().await.map_err(JobError::retryable)?;
    let mut tx = writer.begin().await.map_err(JobError::retryable)?;
    let changed = sqlx::query(
        "UPDATE orders SET status = $1, failure = $2, updated_at = $3 WHERE id = $4 AND status = 'pending_payment'",
    )
    .bind(status)
    .bind(reason)
    .bind(now_millis())
    .bind(order_id)
    .execute(&mut *tx)
    .await
    .map_err(JobError::retryable)?;
    if changed.rows_affected() == 1 {
        let user: Option<(String, i64, String, Option<String>)> = sqlx::query_as(
            "SELECT user_id, total_cents, currency, reservation_id FROM orders WHERE id = $1",
        )
        .bind(order_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(JobError::retryable)?;
        let Some((user_id, total, currency, reservation)) = user else {
            return Err(JobError::retryable("the order vanished while settling"));
        };
        if let (Some(r), "failed") = (&reservation, status) {
            // The stock goes back with the change that says it was not
            // bought (the catalog applies it, once).
            ctx.jobs
                .enqueue_in_transaction(&mut tx, release_job(r))
                .await
                .map_err(JobError::retryable)?;
        }
        let (template, key) = if status == "paid" {
            (
                shoal_notifications::Template::PaymentReceipt,
                format!("receipt:{order_id}"),
            )
        } else {
            (
                shoal_notifications::Template::PaymentFailed,
                format!("payment-failed:{order_id}"),
            )
        };
        let mut email = json!({"order_id": order_id, "amount_cents": total, "currency": currency});
        if let (Some(r), false) = (reason, status == "paid") {
            email["reason"] = json!(r);
        }
        shoal_notifications::enqueue_user_email(
            &ctx.jobs, &mut tx, &user_id, template, email, &key,
        )
        .await
        .map_err(JobError::retryable)?;
        // Signed deliveries to the user's webhook endpoints, queued with
        // the change that makes the event true.
        let event = json!({"order_id": order_id, "total_cents": total, "currency": currency});
        shoal_notifications::emit_event(ctx, &mut tx, &user_id, &format!("order.{status}"), event)
            .await
            .map_err(JobError::retryable)?;
        tx.commit().await.map_err(JobError::retryable)?;
        drop(writer);
        // Realtime: reaches the user's SSE/WebSocket connections on
        // every instance, and is kept for Last-Event-ID replay.
        let data = json!({"order_id": order_id, "total_cents": total, "currency": currency});
        if let Err(e) =
            shoal_notifications::publish_user_event(ctx, &user_id, &format!("order.{status}"), data)
                .await
        {
            tracing::warn!(error = %e, "order event not published");
        }
        metrics::counter!("shoal_orders_settled_total", "status" => status.to_string())
            .increment(1);
        tracing::info!(order_id, status, "order settled");
    }
    Ok(())
}
