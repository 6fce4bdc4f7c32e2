//! The `media.process` job: SHA-256 of the stored blob and, for images,
//! dimensions and a PNG thumbnail (at most 256×256), computed on the
//! blocking pool; then the upload becomes `ready`. Safe to run twice: the
//! thumbnail key is derived from the upload id and the final update only
//! applies to an upload still `processing`.

use serde_json::Value;
use sha2::{Digest, Sha256};
use shoal_backends::now_millis;
use shoal_queue::{handler_fn, JobContext, JobError, Worker};
use shoal_runtime::AppContext;

pub const PROCESS_KIND: &str = "media.process";

pub fn register(ctx: AppContext, worker: Worker) -> Worker {
    worker.register(
        PROCESS_KIND,
        handler_fn(move |job: JobContext| {
            let ctx = ctx.clone();
            async move {
                let id = job
                    .payload()
                    .get("upload_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| JobError::permanent("payload has no upload_id"))?
                    .to_string();
                process_upload(&ctx, &id).await
            }
        }),
    )
}

struct Computed {
    sha256: String,
    dimensions: Option<(u32, u32)>,
    thumbnail: Option<Vec<u8>>,
}

/// Processes one upload; see the module docs.
pub async fn process_upload(ctx: &AppContext, id: &str) -> Result<(), JobError> {
    let row: Option<(String, String, String, String)> = sqlx::query_as(
        "SELECT owner_id, blob_key, content_type, status FROM media_uploads WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(ctx.db.pool())
    .await
    .map_err(JobError::retryable)?;
    let Some((owner, key, content_type, status)) = row else {
        return Err(JobError::permanent(format!("upload {id} does not exist")));
    };
    if status != "processing" {
        return Ok(());
    }
    let data = ctx
        .blobs
        .get_bytes(&key)
        .await
        .map_err(JobError::retryable)?;
    let is_image = content_type.starts_with("image/");
    let computed = tokio::task::spawn_blocking(move || -> Result<Computed, String> {
        let sha256 = Sha256::digest(&data)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if !is_image {
            return Ok(Computed {
                sha256,
                dimensions: None,
                thumbnail: None,
            });
        }
        let image =
            image::load_from_memory(&data).map_err(|e| format!("cannot decode the image: {e}"))?;
        let dimensions = (image.width(), image.height());
        let thumb = image.thumbnail(256, 256);
        let mut png = std::io::Cursor::new(Vec::new());
        thumb
            .write_to(&mut png, image::ImageFormat::Png)
            .map_err(|e| format!("cannot encode the thumbnail: {e}"))?;
        Ok(Computed {
            sha256,
            dimensions: Some(dimensions),
            thumbnail: Some(png.into_inner()),
        })
    })
    .await
    .map_err(JobError::retryable)?;
    let computed = match computed {
        Ok(c) => c,
        Err(message) => {
            sqlx::query("UPDATE media_uploads SET status = 'failed', error = $1, updated_at = $2 WHERE id = $3 AND status = 'processing'")
                .bind(&message)
                .bind(now_millis())
                .bind(id)
                .execute(ctx.db.pool())
                .await
                .map_err(JobError::retryable)?;
            tracing::warn!(upload_id = id, error = %message, "upload failed processing");
            return Ok(());
        }
    };
    let mut thumbnail_key = None;
    if let Some(png) = computed.thumbnail {
        let tkey = format!("thumbs/{owner}/{id}.png");
        let body = futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from(png))]);
        ctx.blobs
            .put_stream(&tkey, body, u64::MAX)
            .await
            .map_err(JobError::retryable)?;
        thumbnail_key = Some(tkey);
    }
    let (width, height) = computed
        .dimensions
        .map(|(w, h)| (Some(w as i64), Some(h as i64)))
        .unwrap_or((None, None));
    sqlx::query(
        "UPDATE media_uploads SET status = 'ready', sha256 = $1, width = $2, height = $3,
         thumbnail_key = $4, updated_at = $5 WHERE id = $6 AND status = 'processing'",
    )
    .bind(&computed.sha256)
    .bind(width)
    .bind(height)
    .bind(&thumbnail_key)
    .bind(now_millis())
    .bind(id)
    .execute(ctx.db.pool())
    .await
    .map_err(JobError::retryable)?;
    metrics::counter!("shoal_media_processed_total").increment(1);
    tracing::info!(upload_id = id, "upload ready");
    Ok(())
}
