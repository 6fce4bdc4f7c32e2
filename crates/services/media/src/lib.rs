//! The media service. `POST /api/media/uploads` streams a file (raw body
//! with its `Content-Type`) to blob storage under a size limit, after
//! checking that the first bytes match the declared type; the upload is
//! `processing` until the `media.process` job has computed its SHA-256 and,
//! for images, its dimensions and a thumbnail (decoding runs on the
//! blocking pool), then `ready`. `GET /media/{key}` serves blobs with
//! range requests and immutable cache headers; private uploads only to
//! their owner. Keys are generated here and checked by the blob store, so
//! they never escape the storage root.

mod processing;
mod sniff;

pub use processing::{process_upload, PROCESS_KIND};

use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use shoal_backends::{now_millis, BlobError, Migration};
use shoal_core::Problem;
use shoal_queue::NewJob;
use shoal_runtime::error::ApiResult;
use shoal_runtime::openapi::{Api, Op};
use shoal_runtime::session::cookie_value;
use shoal_runtime::{ApiError, AppContext, CurrentSession, ServiceModule};

/// The media service module.
#[derive(Debug, Clone, Default)]
pub struct Media;

const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "uploads",
    sql: "CREATE TABLE IF NOT EXISTS media_uploads (
        id TEXT PRIMARY KEY,
        owner_id TEXT NOT NULL,
        blob_key TEXT NOT NULL UNIQUE,
        content_type TEXT NOT NULL,
        size BIGINT NOT NULL,
        visibility TEXT NOT NULL,
        status TEXT NOT NULL,
        sha256 TEXT,
        width BIGINT,
        height BIGINT,
        thumbnail_key TEXT,
        error TEXT,
        created_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL);
    CREATE INDEX IF NOT EXISTS media_uploads_owner ON media_uploads (owner_id);
    CREATE INDEX IF NOT EXISTS media_uploads_thumb ON media_uploads (thumbnail_key);",
}];

/// Content types accepted for upload.
pub const ALLOWED_TYPES: &[&str] = &[
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "application/pdf",
    "text/plain",
];

impl ServiceModule for Media {
    fn name(&self) -> &'static str {
        "media"
    }

    fn migrations(&self) -> &'static [Migration] {
        MIGRATIONS
    }

    fn routes(&self, ctx: &AppContext) -> Api {
        use serde_json::json;
        const TAG: &str = "media";
        let binary = json!({"type": "string", "contentMediaType": "application/octet-stream"});
        let mut upload_op = Op::new(TAG, "Upload a file")
            .describe("The raw file is the body, with its own Content-Type (one of the types listed). Processed in the background: poll the upload until `status` is `ready` or `failed`.")
            .session()
            .query("visibility", false, json!({"enum": ["private", "public"]}), "who may read it (default private)");
        for t in ALLOWED_TYPES {
            upload_op = upload_op.body(t, binary.clone());
        }
        Api::new()
            .route(
                "post",
                "/api/media/uploads",
                axum::routing::post(upload).layer(axum::extract::DefaultBodyLimit::max(
                    ctx.settings.media.max_upload_bytes as usize,
                )),
                upload_op
                    .returns::<UploadView>(202, "Accepted; processing")
                    .with_header("location", "the upload's URL"),
            )
            .get(
                "/api/media/uploads/{id}",
                show,
                Op::new(TAG, "An upload")
                    .describe("Public uploads to anyone; private ones to their owner (with the session cookie).")
                    .returns::<UploadView>(200, "The upload")
                    .problems(&[404]),
            )
            .get(
                "/media/{*key}",
                serve_blob,
                Op::new(TAG, "A stored file")
                    .describe("Public files to anyone, private ones to their owner. Single byte ranges and If-None-Match are honoured.")
                    .header("range", false, "bytes=start-end")
                    .answer(200, "The file, with its own Content-Type", "application/octet-stream", binary.clone())
                    .answer(206, "A range of the file", "application/octet-stream", binary)
                    .empty(304, "Not modified")
                    .problems(&[404, 416]),
            )
    }

    fn register_jobs(&self, ctx: &AppContext, worker: shoal_queue::Worker) -> shoal_queue::Worker {
        processing::register(ctx.clone(), worker)
    }
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow, schemars::JsonSchema)]
pub struct Upload {
    pub id: String,
    pub owner_id: String,
    pub blob_key: String,
    pub content_type: String,
    pub size: i64,
    pub visibility: String,
    pub status: String,
    pub sha256: Option<String>,
    pub width: Option<i64>,
    pub height: Option<i64>,
    pub thumbnail_key: Option<String>,
    pub error: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Serialize, schemars::JsonSchema)]
struct UploadView {
    #[serde(flatten)]
    upload: Upload,
    url: String,
    thumbnail_url: Option<String>,
}

impl From<Upload> for UploadView {
    fn from(upload: Upload) -> Self {
        UploadView {
            url: format!("/media/{}", upload.blob_key),
            thumbnail_url: upload.thumbnail_key.as_ref().map(|k| format!("/media/{k}")),
            upload,
        }
    }
}

const SELECT: &str =
    "SELECT id, owner_id, blob_key, content_type, size, visibility, status, sha256,
    width, height, thumbnail_key, error, created_at, updated_at FROM media_uploads";

#[derive(Debug, Deserialize)]
struct UploadQuery {
    #[serde(default)]
    visibility: Option<String>,
}

async fn upload(
    State(ctx): State<AppContext>,
    CurrentSession(session): CurrentSession,
    Query(query): Query<UploadQuery>,
    request: Request,
) -> ApiResult<Response> {
    let visibility = match query.visibility.as_deref() {
        None | Some("private") => "private",
        Some("public") => "public",
        Some(other) => {
            return Err(Problem::validation(format!(
                "visibility `{other}` is not `private` or `public`"
            ))
            .with_field("visibility", "must be `private` or `public`")
            .into())
        }
    };
    let declared = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    if !ALLOWED_TYPES.contains(&declared.as_str()) {
        return Err(Problem::unsupported_media_type(format!(
            "send the file as the raw body with its Content-Type, one of: {}",
            ALLOWED_TYPES.join(", ")
        ))
        .into());
    }
    let limit = ctx.settings.media.max_upload_bytes;
    if let Some(len) = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit {
            return Err(Problem::payload_too_large(format!(
                "the file is {len} bytes; the limit is {limit}"
            ))
            .into());
        }
    }
    let mut stream = request.into_body().into_data_stream();
    // Read enough of the start to check the type before storing anything.
    let mut head = bytes::BytesMut::new();
    while head.len() < sniff::NEEDED {
        match stream.next().await {
            Some(Ok(chunk)) => head.extend_from_slice(&chunk),
            Some(Err(e)) => {
                return Err(Problem::bad_request(format!("the upload broke off: {e}")).into())
            }
            None => break,
        }
    }
    if head.is_empty() {
        return Err(Problem::validation("the file is empty").into());
    }
    if !sniff::matches(&declared, &head) {
        return Err(Problem::validation(format!(
            "the content does not look like {declared}; declare the type the file really has"
        ))
        .with_field("content-type", "does not match the content")
        .into());
    }
    let id = shoal_core::ids::new_id();
    let key = format!("uploads/{}/{}", session.user_id, id);
    let head = head.freeze();
    let body = futures_util::stream::once(async move { Ok::<_, axum::Error>(head) }).chain(stream);
    let stored = match ctx.blobs.put_stream(&key, Box::pin(body), limit).await {
        Ok(s) => s,
        Err(BlobError::TooLarge { limit }) => {
            return Err(Problem::payload_too_large(format!(
                "the file is larger than the limit of {limit} bytes"
            ))
            .into())
        }
        Err(BlobError::Body(e)) => {
            return Err(Problem::bad_request(format!("the upload broke off: {e}")).into())
        }
        Err(e) => return Err(ApiError::internal("storing an upload", &e)),
    };
    let now = now_millis();
    let upload = Upload {
        id: id.clone(),
        owner_id: session.user_id.clone(),
        blob_key: key.clone(),
        content_type: declared,
        size: stored.size as i64,
        visibility: visibility.into(),
        status: "processing".into(),
        sha256: None,
        width: None,
        height: None,
        thumbnail_key: None,
        error: None,
        created_at: now,
        updated_at: now,
    };
    // The row and its processing job commit together, or neither does.
    let saved: Result<(), ApiError> = async {
        let mut writer = ctx.db.write().await?;
        let mut tx = writer.begin().await?;
        sqlx::query(
            "INSERT INTO media_uploads (id, owner_id, blob_key, content_type, size, visibility, status, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&upload.id)
        .bind(&upload.owner_id)
        .bind(&upload.blob_key)
        .bind(&upload.content_type)
        .bind(upload.size)
        .bind(&upload.visibility)
        .bind(&upload.status)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let job = NewJob::new("media", PROCESS_KIND, serde_json::json!({"upload_id": upload.id}))
            .unique_key(format!("media-process:{}", upload.id))
            .max_attempts(5);
        ctx.jobs
            .enqueue_in_transaction(&mut tx, job)
            .await
            .map_err(|e| ApiError::internal("enqueueing media processing", &e))?;
        tx.commit().await?;
        drop(writer);
        Ok(())
    }
    .await;
    if let Err(e) = saved {
        let _ = ctx.blobs.delete(&key).await;
        return Err(e);
    }
    metrics::counter!("shoal_media_uploads_total").increment(1);
    tracing::info!(upload_id = %id, size = stored.size, "upload stored; processing queued");
    let location = format!("/api/media/uploads/{id}");
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, location)],
        Json(UploadView::from(upload)),
    )
        .into_response())
}

async fn load(ctx: &AppContext, id: &str) -> Result<Option<Upload>, ApiError> {
    Ok(sqlx::query_as(&format!("{SELECT} WHERE id = $1"))
        .bind(id)
        .fetch_optional(ctx.db.pool())
        .await?)
}

/// The caller's user id if a live session cookie came with the request.
async fn viewer(ctx: &AppContext, headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(token) = cookie_value(headers, &ctx.settings.sessions.cookie_name) else {
        return Ok(None);
    };
    Ok(ctx
        .sessions
        .touch(&token, ctx.session_lifetimes())
        .await?
        .map(|s| s.user_id))
}

async fn show(
    State(ctx): State<AppContext>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let upload = load(&ctx, &id).await?;
    let me = viewer(&ctx, &headers).await?;
    match upload {
        Some(u) if u.visibility == "public" || me.as_deref() == Some(u.owner_id.as_str()) => {
            let cache = if u.visibility == "public" && u.status == "ready" {
                "public, max-age=60"
            } else {
                "private, no-store"
            };
            Ok(([(header::CACHE_CONTROL, cache)], Json(UploadView::from(u))).into_response())
        }
        // Someone else's private upload is as absent as a missing one.
        _ => Err(Problem::not_found(format!("no upload `{id}`")).into()),
    }
}

async fn serve_blob(
    State(ctx): State<AppContext>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> ApiResult<Response> {
    if shoal_backends::BlobStore::check_key(&key).is_err() {
        return Err(Problem::not_found("no such file").into());
    }
    let upload: Option<Upload> = sqlx::query_as(&format!(
        "{SELECT} WHERE blob_key = $1 OR thumbnail_key = $1"
    ))
    .bind(&key)
    .fetch_optional(ctx.db.pool())
    .await?;
    let Some(upload) = upload else {
        return Err(Problem::not_found("no such file").into());
    };
    let public = upload.visibility == "public";
    if !public && viewer(&ctx, &headers).await?.as_deref() != Some(upload.owner_id.as_str()) {
        return Err(Problem::not_found("no such file").into());
    }
    let is_thumb = upload.thumbnail_key.as_deref() == Some(key.as_str());
    let content_type = if is_thumb {
        "image/png".to_string()
    } else {
        upload.content_type.clone()
    };
    let etag = format!("\"{}{}\"", upload.id, if is_thumb { "-t" } else { "" });
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
        .unwrap_or(false)
    {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    let size = match ctx.blobs.size(&key).await {
        Ok(s) => s,
        Err(BlobError::NotFound(_)) => return Err(Problem::not_found("no such file").into()),
        Err(e) => return Err(ApiError::internal("reading a blob", &e)),
    };
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        None => None,
        Some(spec) => match parse_range(spec, size) {
            Some(r) => Some(r),
            None => {
                return Ok((
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [(header::CONTENT_RANGE, format!("bytes */{size}"))],
                )
                    .into_response())
            }
        },
    };
    let read = match ctx.blobs.get(&key, range.clone()).await {
        Ok(r) => r,
        Err(BlobError::NotFound(_)) => return Err(Problem::not_found("no such file").into()),
        Err(BlobError::RangeNotSatisfiable { size }) => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{size}"))],
            )
                .into_response())
        }
        Err(e) => return Err(ApiError::internal("reading a blob", &e)),
    };
    let status = if range.is_some() {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let length = read.range.end - read.range.start;
    let mut response = Response::new(Body::from_stream(read.body));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&etag).expect("ascii etag"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if public {
            "public, max-age=31536000, immutable"
        } else {
            "private, max-age=31536000, immutable"
        }),
    );
    if !content_type.starts_with("image/") {
        h.insert(
            header::CONTENT_DISPOSITION,
            HeaderValue::from_static("attachment"),
        );
    }
    if range.is_some() {
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&format!(
                "bytes {}-{}/{}",
                read.range.start,
                read.range.end - 1,
                read.size
            ))
            .expect("ascii"),
        );
    }
    Ok(response)
}

/// Parses one `bytes=` range (`a-b`, `a-`, `-n`) into an end-exclusive
/// range within `size`; `None` when it cannot be satisfied.
pub fn parse_range(spec: &str, size: u64) -> Option<std::ops::Range<u64>> {
    let spec = spec.trim().strip_prefix("bytes=")?;
    if spec.contains(',') || size == 0 {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        if n == 0 {
            return None;
        }
        return Some(size.saturating_sub(n)..size);
    }
    let start: u64 = a.parse().ok()?;
    let end = if b.is_empty() {
        size - 1
    } else {
        b.parse::<u64>().ok()?.min(size - 1)
    };
    if start > end || start >= size {
        return None;
    }
    Some(start..end + 1)
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges_parse_like_rfc_9110() {
        assert_eq!(parse_range("bytes=0-9", 100), Some(0..10));
        assert_eq!(parse_range("bytes=90-", 100), Some(90..100));
        assert_eq!(parse_range("bytes=-10", 100), Some(90..100));
        assert_eq!(parse_range("bytes=95-200", 100), Some(95..100));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=5-1", 100), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
    }
}
