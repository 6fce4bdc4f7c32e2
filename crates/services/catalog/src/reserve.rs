//! Stock reservations: the orders service holds stock for every line of a
//! checkout in one call, before the order is written, and the hold is
//! given back when the payment fails.
//!
//! - `POST /api/catalog/reservations` `{id, items: [{product_id,
//!   quantity}]}`: in one transaction, each line's stock goes down by its
//!   quantity where that much is left (`UPDATE … WHERE stock >= q`), or
//!   nothing changes and the answer names each line that could not be
//!   held (409, or 422 for a product that does not exist). Idempotent by
//!   `id`: the same id with the same items answers the stored result, with
//!   other items 409. Internal: needs `clients.token` as a bearer token.
//! - The `catalog.release_stock` job `{reservation_id}` gives a held
//!   reservation's stock back, once (the orders service queues it in the
//!   transaction that marks an order failed).
//!
//! A product's cached views keep showing the stock they were cached with
//! until they expire: the hold itself reads and writes the table, never
//! a cache, so no line is sold twice, but purging every product on every
//! checkout would empty the caches the catalog exists to fill.

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use shoal_backends::{now_millis, rusqlite, DatabaseKind, Finish};
use shoal_core::Problem;
use shoal_queue::{JobContext, JobError};
use shoal_runtime::error::ApiResult;
use shoal_runtime::{ApiError, ApiJson, AppContext};
use std::sync::Arc;

/// The job that gives a reservation's stock back.
pub const RELEASE_KIND: &str = "catalog.release_stock";
/// The queue it runs on (with the checkout's other jobs).
pub const RELEASE_QUEUE: &str = "orders";

/// One line to hold.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Line {
    pub product_id: String,
    pub quantity: i64,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReserveRequest {
    id: String,
    items: Vec<Line>,
}

/// A held line, with the product's name and price at the time.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct ReservedLine {
    pub product_id: String,
    pub name: String,
    pub price_cents: i64,
    pub currency: String,
    pub quantity: i64,
}

/// The answer to a reservation: every line held.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
pub struct Reservation {
    pub id: String,
    pub items: Vec<ReservedLine>,
}

fn validate(req: &ReserveRequest) -> Result<(), ApiError> {
    let mut p = Problem::validation("the reservation is invalid; see `errors`");
    let id_ok = !req.id.is_empty()
        && req.id.len() <= 100
        && req
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_:.".contains(&b));
    if !id_ok {
        p = p.with_field("id", "1–100 characters of letters, digits and - _ : .");
    }
    if req.items.is_empty() || req.items.len() > 100 {
        p = p.with_field("items", "must hold 1 to 100 items");
    }
    for (i, line) in req.items.iter().enumerate() {
        if shoal_core::ids::parse_id(&line.product_id).is_none() {
            p = p.with_field(format!("items[{i}].product_id"), "must be a product id");
        }
        if !(1..=1000).contains(&line.quantity) {
            p = p.with_field(format!("items[{i}].quantity"), "must be between 1 and 1000");
        }
    }
    if p.errors.is_empty() {
        Ok(())
    } else {
        Err(p.into())
    }
}

/// The answer a stored reservation gives: its result when it holds the
/// same items, or a 409 when it held other items.
fn stored_answer(same_items: bool, result: &str) -> Response {
    if same_items {
        let body: serde_json::Value = serde_json::from_str(result).unwrap_or_default();
        (StatusCode::OK, Json(body)).into_response()
    } else {
        ApiError(
            Problem::conflict("this reservation id was used for other items")
                .with_field("id", "already holds other items"),
        )
        .into_response()
    }
}

const STORED: &str = "SELECT items, result FROM stock_reservations WHERE id = $1";
const TAKE: &str = "UPDATE products SET stock = stock - $1, updated_at = $2 \
     WHERE id = $3 AND stock >= $1 RETURNING name, price_cents, currency";
const LEFT: &str = "SELECT stock FROM products WHERE id = $1";
const INSERT: &str =
    "INSERT INTO stock_reservations (id, items, status, result, created_at, updated_at) \
     VALUES ($1, $2, 'held', $3, $4, $4) ON CONFLICT (id) DO NOTHING";

/// What one hold came to, on either engine.
enum Hold {
    /// The id was held before: whether for the same items, and the
    /// stored result.
    Stored(bool, String),
    /// Not every line could be held; nothing was.
    Refused(Problem),
    /// Every line held: the reservation and its stored answer.
    Held(Reservation),
}

/// The lines as they are held, and the refusals of those that cannot be.
struct Tally {
    held: Vec<ReservedLine>,
    /// `(field, message)` of each line short of stock.
    short: Vec<(String, String)>,
    /// `(field, message)` of each line whose product does not exist.
    missing: Vec<(String, String)>,
}

impl Tally {
    fn new(lines: usize) -> Self {
        Tally {
            held: Vec::with_capacity(lines),
            short: Vec::new(),
            missing: Vec::new(),
        }
    }

    fn held(&mut self, line: &Line, (name, price_cents, currency): (String, i64, String)) {
        self.held.push(ReservedLine {
            product_id: line.product_id.clone(),
            name,
            price_cents,
            currency,
            quantity: line.quantity,
        });
    }

    /// Line `i` was not held: `left` is the product's stock, None when
    /// there is no such product.
    fn short(&mut self, i: usize, left: Option<i64>) {
        match left {
            Some(n) => self.short.push((
                format!("items[{i}].quantity"),
                format!("only {} in stock", n.max(0)),
            )),
            None => self
                .missing
                .push((format!("items[{i}].product_id"), "no such product".into())),
        }
    }

    /// The refusal (an unknown product before short stock), or the
    /// reservation of every line.
    fn end(self, id: &str) -> Result<Reservation, Problem> {
        let refuse = |p: Problem, fields: Vec<(String, String)>| {
            fields.into_iter().fold(p, |p, (f, m)| p.with_field(f, m))
        };
        if !self.missing.is_empty() {
            Err(refuse(
                Problem::validation("an item's product does not exist; nothing was held"),
                self.missing,
            ))
        } else if !self.short.is_empty() {
            Err(refuse(
                Problem::conflict("not enough stock for every item; nothing was held"),
                self.short,
            ))
        } else {
            Ok(Reservation {
                id: id.to_string(),
                items: self.held,
            })
        }
    }
}

/// The hold as one synchronous SQLite transaction (`Database::sqlite_write`:
/// one hand-off where sqlx makes one per statement).
fn hold_sqlite(
    c: &rusqlite::Connection,
    req: &ReserveRequest,
    items_json: &str,
    now: i64,
) -> Result<Finish<Hold>, ApiError> {
    use rusqlite::OptionalExtension;
    let stored = |c: &rusqlite::Connection| {
        c.prepare_cached(STORED)?
            .query_row([&req.id], |r| {
                Ok(Hold::Stored(
                    r.get::<_, String>(0)? == items_json,
                    r.get(1)?,
                ))
            })
            .optional()
    };
    if let Some(answer) = stored(c)? {
        return Ok(Finish::Rollback(answer));
    }
    let mut tally = Tally::new(req.items.len());
    for (i, line) in req.items.iter().enumerate() {
        let row = c
            .prepare_cached(TAKE)?
            .query_row(
                rusqlite::params![line.quantity, now, line.product_id],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        match row {
            Some(row) => tally.held(line, row),
            None => {
                let left = c
                    .prepare_cached(LEFT)?
                    .query_row([&line.product_id], |r| r.get(0))
                    .optional()?;
                tally.short(i, left);
            }
        }
    }
    let reservation = match tally.end(&req.id) {
        Ok(r) => r,
        Err(refused) => return Ok(Finish::Rollback(Hold::Refused(refused))),
    };
    let result = serde_json::to_string(&reservation).expect("reservation serializes");
    let inserted = c
        .prepare_cached(INSERT)?
        .execute(rusqlite::params![req.id, items_json, result, now])?;
    if inserted == 0 {
        // Not while this process holds the writer and SQLite's write lock;
        // answered as on PostgreSQL all the same.
        return match stored(c)? {
            Some(answer) => Ok(Finish::Rollback(answer)),
            None => Err(vanished()),
        };
    }
    Ok(Finish::Commit(Hold::Held(reservation)))
}

/// The hold on PostgreSQL: the same statements through sqlx, with row
/// locks instead of one writer.
async fn hold_sqlx(
    ctx: &AppContext,
    req: &ReserveRequest,
    items_json: &str,
    now: i64,
) -> Result<Hold, ApiError> {
    let mut writer = ctx.db.write().await?;
    if let Some((items, result)) = stored_sqlx(&mut *writer, &req.id).await? {
        return Ok(Hold::Stored(items == items_json, result));
    }
    let mut tx = writer.begin().await?;
    let mut tally = Tally::new(req.items.len());
    for (i, line) in req.items.iter().enumerate() {
        let row: Option<(String, i64, String)> = sqlx::query_as(TAKE)
            .bind(line.quantity)
            .bind(now)
            .bind(&line.product_id)
            .fetch_optional(&mut *tx)
            .await?;
        match row {
            Some(row) => tally.held(line, row),
            None => {
                let left: Option<(i64,)> = sqlx::query_as(LEFT)
                    .bind(&line.product_id)
                    .fetch_optional(&mut *tx)
                    .await?;
                tally.short(i, left.map(|(n,)| n));
            }
        }
    }
    let reservation = match tally.end(&req.id) {
        Ok(r) => r,
        Err(refused) => {
            tx.rollback().await?;
            return Ok(Hold::Refused(refused));
        }
    };
    let result = serde_json::to_string(&reservation).expect("reservation serializes");
    let inserted = sqlx::query(INSERT)
        .bind(&req.id)
        .bind(items_json)
        .bind(&result)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    if inserted.rows_affected() == 0 {
        // The same id held at the same moment elsewhere: that one stands,
        // this one's decrements go back.
        tx.rollback().await?;
        drop(writer);
        return match stored_sqlx(ctx.db.pool(), &req.id).await? {
            Some((items, result)) => Ok(Hold::Stored(items == items_json, result)),
            None => Err(vanished()),
        };
    }
    tx.commit().await?;
    Ok(Hold::Held(reservation))
}

async fn stored_sqlx(
    executor: impl sqlx::Executor<'_, Database = sqlx::Any>,
    id: &str,
) -> Result<Option<(String, String)>, sqlx::Error> {
    sqlx::query_as(STORED)
        .bind(id)
        .fetch_optional(executor)
        .await
}

fn vanished() -> ApiError {
    ApiError::internal(
        "holding stock",
        &std::io::Error::other("a reservation that conflicted has vanished"),
    )
}

pub(crate) async fn reserve(
    axum::extract::State(ctx): axum::extract::State<AppContext>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<ReserveRequest>,
) -> ApiResult<Response> {
    shoal_runtime::session::require_service_token(&ctx, &headers)?;
    validate(&req)?;
    let items_json = serde_json::to_string(&req.items).expect("lines serialize");
    let now = now_millis();
    let held = match ctx.db.kind() {
        DatabaseKind::Sqlite => {
            let req = Arc::new(req);
            ctx.db
                .sqlite_write(move |c| hold_sqlite(c, &req, &items_json, now))
                .await?
        }
        DatabaseKind::Postgres => hold_sqlx(&ctx, &req, &items_json, now).await?,
    };
    match held {
        Hold::Stored(same_items, result) => Ok(stored_answer(same_items, &result)),
        Hold::Refused(refused) => {
            metrics::counter!("shoal_catalog_reservations_refused_total").increment(1);
            Err(refused.into())
        }
        Hold::Held(reservation) => {
            metrics::counter!("shoal_catalog_reservations_total").increment(1);
            Ok((StatusCode::CREATED, Json(reservation)).into_response())
        }
    }
}

/// Gives a held reservation's stock back; `false` when there was none to
/// give (unknown, or already released).
pub async fn release(ctx: &AppContext, id: &str) -> Result<bool, sqlx::Error> {
    let mut writer = ctx.db.write().await?;
    let mut tx = writer.begin().await?;
    let changed = sqlx::query(
        "UPDATE stock_reservations SET status = 'released', updated_at = $1 \
         WHERE id = $2 AND status = 'held'",
    )
    .bind(now_millis())
    .bind(id)
    .execute(&mut *tx)
    .await?;
    if changed.rows_affected() == 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    let (items,): (String,) = sqlx::query_as("SELECT items FROM stock_reservations WHERE id = $1")
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
    let lines: Vec<Line> = serde_json::from_str(&items).unwrap_or_default();
    for line in &lines {
        // A product deleted since has nothing to give back to.
        sqlx::query("UPDATE products SET stock = stock + $1, updated_at = $2 WHERE id = $3")
            .bind(line.quantity)
            .bind(now_millis())
            .bind(&line.product_id)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    drop(writer);
    metrics::counter!("shoal_catalog_reservations_released_total").increment(1);
    Ok(true)
}

/// The `catalog.release_stock` job.
pub(crate) async fn release_job(ctx: &AppContext, job: &JobContext) -> Result<(), JobError> {
    let id = job.payload()["reservation_id"]
        .as_str()
        .ok_or_else(|| JobError::permanent("no reservation_id"))?;
    let released = release(ctx, id).await.map_err(JobError::retryable)?;
    tracing::info!(reservation_id = id, released, "stock reservation released");
    Ok(())
}
