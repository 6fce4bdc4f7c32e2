//! The catalog service: products, search and pages. Read-heavy, so cached
//! at every layer: reads go through the runtime's two-tier `QueryCache`
//! (tags `product:{id}` and `products`), public responses carry CDN
//! headers (`Cache-Control` with `s-maxage` and `stale-while-revalidate`, a
//! strong `ETag` answered with 304, `Surrogate-Key`/`Cache-Tag`), and
//! writes (admins only: user ids in `catalog.admin_user_ids`) invalidate
//! the tags on every instance and call the purge hook. Stock is held for
//! checkouts by reservations (`reserve.rs`).

mod purge;
mod reserve;
mod seed;

pub use purge::{HttpPurger, NoopPurger, PurgeError, Purger};
pub use reserve::{release, Line, Reservation, ReservedLine, RELEASE_KIND, RELEASE_QUEUE};
pub use seed::{seed, set_all_stock};

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use shoal_backends::Migration;
use shoal_core::Problem;
use shoal_runtime::error::ApiResult;
use shoal_runtime::openapi::{Api, Op};
use shoal_runtime::{ApiError, ApiJson, AppContext, Cached, CurrentSession, ServiceModule};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub(crate) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "products",
        sql: "CREATE TABLE IF NOT EXISTS products (
        id TEXT PRIMARY KEY,
        sku TEXT NOT NULL UNIQUE,
        name TEXT NOT NULL,
        description TEXT NOT NULL,
        price_cents BIGINT NOT NULL,
        currency TEXT NOT NULL,
        stock BIGINT NOT NULL,
        image_url TEXT,
        tags TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL);",
    },
    Migration {
        version: 2,
        name: "stock_reservations",
        // `items`: the lines asked for (to tell a replay from a reuse);
        // `result`: the answer given; `status`: held or released.
        sql: "CREATE TABLE IF NOT EXISTS stock_reservations (
        id TEXT PRIMARY KEY,
        items TEXT NOT NULL,
        status TEXT NOT NULL,
        result TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL);",
    },
];

/// The tag of every list page (any write changes some list).
pub const PRODUCTS_TAG: &str = "products";

/// The tag of one product's responses.
pub fn product_tag(id: &str) -> String {
    // Not `format!`: on every product read, where the formatting
    // machinery costs many times the copy (callgrind, bench/README.md,
    // "Product by id and `/me`: two `format!`s").
    ["product:", id].concat()
}

/// The catalog service module. `Catalog::default()` purges through the
/// URLs in `catalog.purge_urls`; `with_purger` sets another hook.
#[derive(Debug, Clone, Default)]
pub struct Catalog {
    purger: Option<Arc<dyn Purger>>,
    db_reads: Arc<AtomicU64>,
}

impl Catalog {
    pub fn with_purger(purger: Arc<dyn Purger>) -> Self {
        Catalog {
            purger: Some(purger),
            ..Catalog::default()
        }
    }

    /// Product reads that reached the database (cache loader calls) on
    /// the instances this module value was mounted on.
    pub fn db_reads(&self) -> Arc<AtomicU64> {
        self.db_reads.clone()
    }
}

#[derive(Debug)]
struct CatalogState {
    purger: Arc<dyn Purger>,
    db_reads: Arc<AtomicU64>,
    /// The public responses' `Cache-Control`, made once from the settings.
    cache_control: HeaderValue,
}

impl ServiceModule for Catalog {
    fn name(&self) -> &'static str {
        "catalog"
    }

    fn migrations(&self) -> &'static [Migration] {
        MIGRATIONS
    }

    fn routes(&self, ctx: &AppContext) -> Api {
        let settings = &ctx.settings.catalog;
        let purger = self.purger.clone().unwrap_or_else(|| {
            if settings.purge_urls.is_empty() {
                Arc::new(NoopPurger)
            } else {
                Arc::new(HttpPurger::new(
                    settings.purge_urls.clone(),
                    settings.purge_token.clone(),
                    Duration::from_millis(settings.purge_timeout_ms),
                ))
            }
        });
        let cache_control = HeaderValue::from_str(&format!(
            "public, max-age={}, s-maxage={}, stale-while-revalidate={}",
            settings.max_age_secs, settings.s_maxage_secs, settings.stale_while_revalidate_secs
        ))
        .expect("digits and ASCII");
        let state = Arc::new(CatalogState {
            purger,
            db_reads: self.db_reads.clone(),
            cache_control,
        });
        use serde_json::json;
        const TAG: &str = "catalog";
        let cached = |op: Op| {
            op.with_header("etag", "a strong validator of the body")
                .with_header(
                    "cache-control",
                    "public, with max-age, s-maxage and stale-while-revalidate",
                )
                .with_header("surrogate-key", "the tags a purge names")
                .empty(304, "Not modified (If-None-Match matched)")
        };
        Api::new()
            .get(
                "/api/catalog/products",
                list_products,
                cached(
                    Op::new(TAG, "List products")
                        .query("page", false, json!({"type": "integer", "minimum": 1, "maximum": 10000}), "page number, from 1")
                        .query("per_page", false, json!({"type": "integer", "minimum": 1, "maximum": 100}), "products per page (default 20)")
                        .query("q", false, json!({"type": "string", "maxLength": 100}), "words in the name or description")
                        .returns::<ProductPage>(200, "A page of products"),
                )
                .problems(&[422]),
            )
            .post(
                "/api/catalog/products",
                create_product,
                Op::new(TAG, "Create a product (admins)")
                    .session()
                    .json_body::<ProductInput>()
                    .returns::<Product>(201, "The product")
                    .with_header("location", "the product's URL")
                    .problems(&[403, 409]),
            )
            .get(
                "/api/catalog/products/{id}",
                get_product,
                cached(Op::new(TAG, "A product").returns::<Product>(200, "The product")).problems(&[404]),
            )
            .put(
                "/api/catalog/products/{id}",
                replace_product,
                Op::new(TAG, "Replace a product (admins)")
                    .session()
                    .json_body::<ProductInput>()
                    .returns::<Product>(200, "The product")
                    .problems(&[403, 404, 409]),
            )
            .delete(
                "/api/catalog/products/{id}",
                delete_product,
                Op::new(TAG, "Delete a product (admins)")
                    .session()
                    .empty(204, "Deleted")
                    .problems(&[403, 404]),
            )
            .post(
                "/api/catalog/reservations",
                reserve::reserve,
                Op::new(TAG, "Hold stock (internal)")
                    .describe("Service to service, with clients.token: holds stock for every line or none. Idempotent by the reservation's id.")
                    .token()
                    .json_body::<reserve::ReserveRequest>()
                    .returns::<reserve::Reservation>(201, "Held")
                    .returns::<reserve::Reservation>(200, "Held before (a replay)")
                    .problems(&[409]),
            )
            .layer(Extension(state))
    }

    fn register_jobs(&self, ctx: &AppContext, worker: shoal_queue::Worker) -> shoal_queue::Worker {
        let ctx = ctx.clone();
        worker.register(
            RELEASE_KIND,
            shoal_queue::handler_fn(move |job: shoal_queue::JobContext| {
                let ctx = ctx.clone();
                async move { reserve::release_job(&ctx, &job).await }
            }),
        )
    }
}

#[derive(Debug, Serialize, Deserialize, Clone, PartialEq, schemars::JsonSchema)]
pub struct Product {
    pub id: String,
    pub sku: String,
    pub name: String,
    pub description: String,
    pub price_cents: i64,
    pub currency: String,
    pub stock: i64,
    pub image_url: Option<String>,
    pub tags: Vec<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

type ProductRow = (
    String,
    String,
    String,
    String,
    i64,
    String,
    i64,
    Option<String>,
    String,
    i64,
    i64,
);

const PRODUCT_COLUMNS: &str = "id, sku, name, description, price_cents, currency, stock, \
                               image_url, tags, created_at, updated_at";

fn from_row(r: ProductRow) -> Product {
    Product {
        id: r.0,
        sku: r.1,
        name: r.2,
        description: r.3,
        price_cents: r.4,
        currency: r.5,
        stock: r.6,
        image_url: r.7,
        tags: serde_json::from_str(&r.8).unwrap_or_default(),
        created_at: r.9,
        updated_at: r.10,
    }
}

/// The body of POST and PUT (PUT replaces every field).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct ProductInput {
    sku: String,
    name: String,
    #[serde(default)]
    description: String,
    price_cents: i64,
    currency: String,
    #[serde(default)]
    stock: i64,
    #[serde(default)]
    image_url: Option<String>,
    #[serde(default)]
    tags: Vec<String>,
}

impl ProductInput {
    /// Trims and checks every field; the problem names each bad one.
    fn validate(mut self) -> Result<Self, Problem> {
        let mut p = Problem::validation("some fields are invalid; see `errors`");
        self.sku = self.sku.trim().to_string();
        if self.sku.is_empty() || self.sku.len() > 64 {
            p = p.with_field("sku", "must be 1 to 64 characters");
        } else if !self
            .sku
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            p = p.with_field("sku", "may hold only letters, digits, `-`, `_` and `.`");
        }
        self.name = self.name.trim().to_string();
        if self.name.is_empty() || self.name.chars().count() > 200 {
            p = p.with_field("name", "must be 1 to 200 characters");
        }
        if self.description.chars().count() > 5000 {
            p = p.with_field("description", "must be at most 5000 characters");
        }
        if !(0..=100_000_000_000).contains(&self.price_cents) {
            p = p.with_field("price_cents", "must be between 0 and 100000000000");
        }
        self.currency = self.currency.trim().to_ascii_uppercase();
        if self.currency.len() != 3 || !self.currency.bytes().all(|b| b.is_ascii_uppercase()) {
            p = p.with_field(
                "currency",
                "must be a three-letter ISO 4217 code such as USD",
            );
        }
        if !(0..=1_000_000_000).contains(&self.stock) {
            p = p.with_field("stock", "must be between 0 and 1000000000");
        }
        if let Some(url) = &self.image_url {
            let url = url.trim();
            if url.is_empty() {
                self.image_url = None;
            } else if url.len() > 2000
                || !(url.starts_with("https://") || url.starts_with("http://"))
                || url.chars().any(char::is_whitespace)
            {
                p = p.with_field(
                    "image_url",
                    "must be an http(s) URL of at most 2000 characters",
                );
            }
        }
        if self.tags.len() > 20 {
            p = p.with_field("tags", "at most 20 tags");
        }
        for (i, t) in self.tags.iter_mut().enumerate() {
            *t = t.trim().to_lowercase();
            if t.is_empty() || t.chars().count() > 40 {
                p = p.with_field(format!("tags[{i}]"), "must be 1 to 40 characters");
            }
        }
        if p.errors.is_empty() {
            Ok(self)
        } else {
            Err(p)
        }
    }
}

// ---------------------------------------------------------------- reads

#[derive(Debug, Serialize, schemars::JsonSchema)]
struct ProductPage {
    items: Vec<Product>,
    page: u32,
    per_page: u32,
    total: i64,
}

#[derive(Debug)]
struct ListQuery {
    page: u32,
    per_page: u32,
    q: String,
}

fn parse_list_query(raw: &HashMap<String, String>) -> Result<ListQuery, Problem> {
    let mut p = Problem::validation("some query parameters are invalid; see `errors`");
    let mut number = |name: &str, default: u32, max: u32| -> u32 {
        match raw.get(name).map(|v| v.trim()) {
            None | Some("") => default,
            Some(v) => match v.parse::<u32>() {
                Ok(n) if (1..=max).contains(&n) => n,
                _ => {
                    p.errors.push(shoal_core::problem::FieldError {
                        field: name.to_string(),
                        message: format!("must be a whole number from 1 to {max}"),
                    });
                    default
                }
            },
        }
    };
    let page = number("page", 1, 10_000);
    let per_page = number("per_page", 20, 100);
    let q = raw
        .get("q")
        .map(|v| v.trim().to_string())
        .unwrap_or_default();
    if q.chars().count() > 100 {
        p = p.with_field("q", "must be at most 100 characters");
    }
    if p.errors.is_empty() {
        Ok(ListQuery { page, per_page, q })
    } else {
        Err(p)
    }
}

/// `LIKE` pattern for a search: lowercase, wildcards escaped.
fn like_pattern(q: &str) -> String {
    let mut out = String::from("%");
    for c in q.to_lowercase().chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('%');
    out
}

async fn list_products(
    State(ctx): State<AppContext>,
    Extension(state): Extension<Arc<CatalogState>>,
    Query(raw): Query<HashMap<String, String>>,
    if_none_match: IfNoneMatch,
) -> ApiResult<Response> {
    let q = parse_list_query(&raw)?;
    let key = format!("catalog:list:{}:{}:{}", q.page, q.per_page, q.q);
    let tags = vec![PRODUCTS_TAG.to_string()];
    let ttl = Duration::from_secs(ctx.settings.catalog.cache_ttl_secs);
    let db = ctx.db.clone();
    let reads = state.db_reads.clone();
    let page = ctx
        .cache
        .get_or_load_cached(&key, &tags, ttl, || async move {
            reads.fetch_add(1, Ordering::Relaxed);
            let offset = i64::from(q.page - 1) * i64::from(q.per_page);
            let (filter, pattern) = if q.q.is_empty() {
                ("", None)
            } else {
                (
                    " WHERE LOWER(name) LIKE $1 ESCAPE '\\' OR LOWER(description) LIKE $1 ESCAPE '\\'",
                    Some(like_pattern(&q.q)),
                )
            };
            let n = if pattern.is_some() { 2 } else { 1 };
            let select = format!(
                "SELECT {PRODUCT_COLUMNS} FROM products{filter} ORDER BY id LIMIT ${n} OFFSET ${}",
                n + 1
            );
            let count = format!("SELECT COUNT(*) FROM products{filter}");
            let mut rows = sqlx::query_as::<_, ProductRow>(&select);
            let mut total = sqlx::query_as::<_, (i64,)>(&count);
            if let Some(p) = &pattern {
                rows = rows.bind(p.clone());
                total = total.bind(p.clone());
            }
            let rows = rows
                .bind(i64::from(q.per_page))
                .bind(offset)
                .fetch_all(db.pool())
                .await?;
            let (total,) = total.fetch_one(db.pool()).await?;
            let page = ProductPage {
                items: rows.into_iter().map(from_row).collect(),
                page: q.page,
                per_page: q.per_page,
                total,
            };
            Ok::<_, sqlx::Error>(Some(Bytes::from(serde_json::to_vec(&page).unwrap_or_default())))
        })
        .await?
        // The loader always finds a page (maybe empty).
        .ok_or_else(|| ApiError::from(Problem::internal("a product page was cached as missing")))?;
    Ok(public_response(&state, &if_none_match, &page, &tags))
}

async fn get_product(
    State(ctx): State<AppContext>,
    Extension(state): Extension<Arc<CatalogState>>,
    Path(id): Path<String>,
    if_none_match: IfNoneMatch,
) -> ApiResult<Response> {
    let tags = [product_tag(&id)];
    let Some(product) = cached_product(&ctx, &state, &id, &tags).await? else {
        return Err(not_found(&id));
    };
    Ok(public_response(&state, &if_none_match, &product, &tags))
}

/// `tags`: `[product_tag(id)]`, made once by the caller.
async fn cached_product(
    ctx: &AppContext,
    state: &CatalogState,
    id: &str,
    tags: &[String],
) -> Result<Option<Cached>, ApiError> {
    if id.is_empty() || id.len() > 64 {
        return Ok(None);
    }
    let key = ["catalog:product:", id].concat();
    let ttl = Duration::from_secs(ctx.settings.catalog.cache_ttl_secs);
    let db = ctx.db.clone();
    Ok(ctx
        .cache
        .get_or_load_cached(&key, tags, ttl, || async move {
            state.db_reads.fetch_add(1, Ordering::Relaxed);
            let row: Option<ProductRow> = sqlx::query_as(&format!(
                "SELECT {PRODUCT_COLUMNS} FROM products WHERE id = $1"
            ))
            .bind(id)
            .fetch_optional(db.pool())
            .await?;
            Ok::<_, sqlx::Error>(
                row.map(|r| Bytes::from(serde_json::to_vec(&from_row(r)).unwrap_or_default())),
            )
        })
        .await?)
}

fn not_found(id: &str) -> ApiError {
    Problem::not_found(format!("there is no product with id `{id}`")).into()
}

/// The request's `If-None-Match` values, and nothing else of its headers
/// (extracting the whole `HeaderMap` clones every field).
struct IfNoneMatch(Vec<HeaderValue>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for IfNoneMatch {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(IfNoneMatch(
            parts
                .headers
                .get_all(header::IF_NONE_MATCH)
                .iter()
                .cloned()
                .collect(),
        ))
    }
}

/// True when `If-None-Match` lists `etag` (or is `*`).
fn none_match(if_none_match: &IfNoneMatch, etag: &HeaderValue) -> bool {
    let etag = etag.as_bytes();
    if_none_match
        .0
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().trim_start_matches("W/"))
        .any(|t| t.as_bytes() == etag || t == "*")
}

static SURROGATE_KEY: HeaderName = HeaderName::from_static("surrogate-key");
static CACHE_TAG: HeaderName = HeaderName::from_static("cache-tag");

/// A cacheable JSON response: Cache-Control for browsers and shared
/// caches, ETag (304 when it matches), and the tags as surrogate keys.
fn public_response(
    state: &CatalogState,
    if_none_match: &IfNoneMatch,
    cached: &Cached,
    tags: &[String],
) -> Response {
    // Kept with the cache entry: hashed once, not per response.
    let etag = cached.etag().clone();
    let body = cached.bytes().clone();
    let mut response = if none_match(if_none_match, &etag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response()
    };
    let h = response.headers_mut();
    // Room for these and the standard middleware's: one allocation, not
    // a map grown twice.
    h.reserve(12);
    let value = |s: String| HeaderValue::try_from(s).unwrap_or(HeaderValue::from_static(""));
    h.insert(header::CACHE_CONTROL, state.cache_control.clone());
    h.insert(header::ETAG, etag);
    // One tag (every read here has one): the same value for both fields.
    let (surrogate, cache_tag) = match tags {
        [one] => {
            let v = HeaderValue::from_str(one).unwrap_or(HeaderValue::from_static(""));
            (v.clone(), v)
        }
        _ => (value(tags.join(" ")), value(tags.join(","))),
    };
    h.insert(SURROGATE_KEY.clone(), surrogate);
    h.insert(CACHE_TAG.clone(), cache_tag);
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    response
}

// ---------------------------------------------------------------- writes

fn require_admin(ctx: &AppContext, session: &CurrentSession) -> Result<(), ApiError> {
    if ctx
        .settings
        .catalog
        .admin_user_ids
        .contains(&session.0.user_id)
    {
        Ok(())
    } else {
        Err(
            Problem::forbidden("only catalog admins (catalog.admin_user_ids) may change products")
                .into(),
        )
    }
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(d) => {
            d.code().as_deref() == Some("23505")
                || d.code().as_deref() == Some("2067")
                || d.message().contains("UNIQUE")
        }
        _ => false,
    }
}

fn sku_taken() -> ApiError {
    Problem::conflict("a product with this sku already exists")
        .with_field("sku", "is already used by another product")
        .into()
}

/// Drops cached copies everywhere: this instance's L1 and L2 now, other
/// instances over the bus, HTTP caches through the purge hook.
async fn after_write(ctx: &AppContext, state: &CatalogState, id: &str) {
    let tags = vec![product_tag(id), PRODUCTS_TAG.to_string()];
    ctx.cache.invalidate_tags(&tags).await;
    if let Err(e) = state.purger.purge(&tags).await {
        tracing::warn!(error = %e, ?tags, "purge failed; HTTP caches serve old copies until s-maxage");
    }
}

fn no_store(status: StatusCode, product: Option<&Product>) -> Response {
    let mut response = match product {
        Some(p) => (status, axum::Json(p)).into_response(),
        None => status.into_response(),
    };
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

async fn create_product(
    State(ctx): State<AppContext>,
    Extension(state): Extension<Arc<CatalogState>>,
    session: CurrentSession,
    ApiJson(input): ApiJson<ProductInput>,
) -> ApiResult<Response> {
    require_admin(&ctx, &session)?;
    let input = input.validate()?;
    let now = shoal_backends::now_millis();
    let product = Product {
        id: shoal_core::ids::new_id(),
        sku: input.sku,
        name: input.name,
        description: input.description,
        price_cents: input.price_cents,
        currency: input.currency,
        stock: input.stock,
        image_url: input.image_url,
        tags: input.tags,
        created_at: now,
        updated_at: now,
    };
    let insert = sqlx::query(&format!(
        "INSERT INTO products ({PRODUCT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
    ))
    .bind(&product.id)
    .bind(&product.sku)
    .bind(&product.name)
    .bind(&product.description)
    .bind(product.price_cents)
    .bind(&product.currency)
    .bind(product.stock)
    .bind(product.image_url.clone())
    .bind(serde_json::to_string(&product.tags).unwrap_or_else(|_| "[]".into()))
    .bind(product.created_at)
    .bind(product.updated_at)
    .execute(ctx.db.pool())
    .await;
    match insert {
        Ok(_) => {}
        Err(e) if is_unique_violation(&e) => return Err(sku_taken()),
        Err(e) => return Err(e.into()),
    }
    after_write(&ctx, &state, &product.id).await;
    metrics::counter!("shoal_catalog_writes_total", "op" => "create").increment(1);
    let mut response = no_store(StatusCode::CREATED, Some(&product));
    if let Ok(location) = HeaderValue::from_str(&format!("/api/catalog/products/{}", product.id)) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

async fn replace_product(
    State(ctx): State<AppContext>,
    Extension(state): Extension<Arc<CatalogState>>,
    Path(id): Path<String>,
    session: CurrentSession,
    ApiJson(input): ApiJson<ProductInput>,
) -> ApiResult<Response> {
    require_admin(&ctx, &session)?;
    let input = input.validate()?;
    let now = shoal_backends::now_millis();
    let tags = serde_json::to_string(&input.tags).unwrap_or_else(|_| "[]".into());
    let returning = format!(" RETURNING {PRODUCT_COLUMNS}");
    let sql = format!(
        "UPDATE products SET sku = $1, name = $2, description = $3, price_cents = $4, \
         currency = $5, stock = $6, image_url = $7, tags = $8, \
         updated_at = CASE WHEN updated_at >= $9 THEN updated_at + 1 ELSE $9 END \
         WHERE id = $10{returning}"
    );
    // Both engines support RETURNING (SQLite since 3.35).
    let row: Result<Option<ProductRow>, sqlx::Error> = sqlx::query_as(&sql)
        .bind(&input.sku)
        .bind(&input.name)
        .bind(&input.description)
        .bind(input.price_cents)
        .bind(&input.currency)
        .bind(input.stock)
        .bind(input.image_url.clone())
        .bind(tags)
        .bind(now)
        .bind(&id)
        .fetch_optional(ctx.db.pool())
        .await;
    let row = match row {
        Ok(Some(row)) => row,
        Ok(None) => return Err(not_found(&id)),
        Err(e) if is_unique_violation(&e) => return Err(sku_taken()),
        Err(e) => return Err(e.into()),
    };
    after_write(&ctx, &state, &id).await;
    metrics::counter!("shoal_catalog_writes_total", "op" => "replace").increment(1);
    Ok(no_store(StatusCode::OK, Some(&from_row(row))))
}

async fn delete_product(
    State(ctx): State<AppContext>,
    Extension(state): Extension<Arc<CatalogState>>,
    Path(id): Path<String>,
    session: CurrentSession,
) -> ApiResult<Response> {
    require_admin(&ctx, &session)?;
    let done = sqlx::query("DELETE FROM products WHERE id = $1")
        .bind(&id)
        .execute(ctx.db.pool())
        .await?;
    if done.rows_affected() == 0 {
        return Err(not_found(&id));
    }
    after_write(&ctx, &state, &id).await;
    metrics::counter!("shoal_catalog_writes_total", "op" => "delete").increment(1);
    Ok(no_store(StatusCode::NO_CONTENT, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_patterns_escape_wildcards() {
        assert_eq!(like_pattern("Mug"), "%mug%");
        assert_eq!(like_pattern("50%_off"), "%50\\%\\_off%");
    }

    #[test]
    fn list_query_is_validated_with_field_names() {
        let q = |pairs: &[(&str, &str)]| {
            let raw: HashMap<String, String> = pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            parse_list_query(&raw)
        };
        let ok = q(&[]).unwrap();
        assert_eq!((ok.page, ok.per_page), (1, 20));
        let p = q(&[("per_page", "101"), ("page", "0")]).unwrap_err();
        let fields: Vec<_> = p.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(fields, vec!["page", "per_page"]);
        assert_eq!(
            q(&[("q", &"x".repeat(101))]).unwrap_err().errors[0].field,
            "q"
        );
    }

    #[test]
    fn etags_match_lists_and_weak_forms() {
        let tag = shoal_runtime::cache::strong_etag(b"body");
        let text = tag.to_str().unwrap();
        assert_eq!(text.len(), 34, "{text}");
        assert!(text.starts_with('"') && text.ends_with('"'));
        // The hex of SHA-256("body")'s first 16 bytes.
        assert_eq!(text, "\"230d8358dc8e8890b4c58deeb62912ee\"");
        let h = IfNoneMatch(vec![
            HeaderValue::from_str(&format!("\"other\", W/{text}")).unwrap()
        ]);
        assert!(none_match(&h, &tag));
        assert!(!none_match(&IfNoneMatch(Vec::new()), &tag));
    }
}
