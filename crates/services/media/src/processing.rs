//! The `media.process` job: SHA-256 of the stored blob and, for images,
//! dimensions and a PNG thumbnail (at most 256×256), computed on the
//! blocking pool; then the upload becomes `ready`. Safe to run twice: the
//! thumbnail key is derived from the upload id and the final update only
//! applies to an upload still `processing`.
//!
//! Hostile images: the header is read first, and an image declaring more
//! than `media.max_image_pixels` fails without being decoded; a decode
//! then waits for its memory estimate in a process-wide budget
//! (`media.decode_memory_bytes`, [`DecodeBudget`]) and runs under the
//! decoder's own limits (dimensions and allocations), so a header that
//! lies cannot make it allocate more.

use serde_json::Value;
use sha2::{Digest, Sha256};
use shoal_backends::now_millis;
use shoal_queue::{handler_fn, JobContext, JobError, Worker};
use shoal_runtime::AppContext;
use std::sync::{Arc, OnceLock};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub const PROCESS_KIND: &str = "media.process";

/// Bytes per pixel a decode is assumed to take: RGBA with 16-bit
/// channels, the widest format the decoders produce.
const BYTES_PER_PIXEL: u64 = 8;

/// The memory concurrent image decodes of this process may hold, in MiB
/// permits: each decode takes its estimate before it starts and gives it
/// back when it ends.
#[derive(Debug, Clone)]
pub struct DecodeBudget {
    mib: Arc<Semaphore>,
    total_mib: u32,
}

impl DecodeBudget {
    pub fn new(bytes: u64) -> DecodeBudget {
        let total_mib = (bytes / (1024 * 1024)).clamp(1, u32::MAX as u64 >> 4) as u32;
        DecodeBudget {
            mib: Arc::new(Semaphore::new(total_mib as usize)),
            total_mib,
        }
    }

    /// Waits until `bytes` fit; `Err` when they never can (more than the
    /// whole budget).
    pub async fn acquire(&self, bytes: u64) -> Result<OwnedSemaphorePermit, String> {
        let need = bytes.div_ceil(1024 * 1024).max(1);
        if need > self.total_mib as u64 {
            return Err(format!(
                "decoding would take about {need} MiB, more than media.decode_memory_bytes ({} MiB)",
                self.total_mib
            ));
        }
        Arc::clone(&self.mib)
            .acquire_many_owned(need as u32)
            .await
            .map_err(|e| e.to_string())
    }

    /// MiB not taken now.
    #[cfg(test)]
    fn available_mib(&self) -> usize {
        self.mib.available_permits()
    }
}

/// This process's budget, made from the settings of its first use.
fn budget(ctx: &AppContext) -> &'static DecodeBudget {
    static BUDGET: OnceLock<DecodeBudget> = OnceLock::new();
    BUDGET.get_or_init(|| DecodeBudget::new(ctx.settings.media.decode_memory_bytes))
}

/// The dimensions an image declares, from its header alone.
fn declared_dimensions(data: &[u8]) -> Result<(u32, u32), String> {
    image::ImageReader::new(std::io::Cursor::new(data))
        .with_guessed_format()
        .map_err(|e| format!("cannot read the image: {e}"))?
        .into_dimensions()
        .map_err(|e| format!("cannot read the image's header: {e}"))
}

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
    // An image's size is checked from its header, and its decode memory
    // reserved, before any pixel is decoded.
    let mut permit = None;
    let mut refused = None;
    if is_image {
        let max_pixels = ctx.settings.media.max_image_pixels;
        match declared_dimensions(&data) {
            Ok((w, h)) if w as u64 * h as u64 > max_pixels => {
                metrics::counter!("shoal_media_images_refused_total").increment(1);
                refused = Some(format!(
                    "the image declares {w}×{h} pixels, more than media.max_image_pixels ({max_pixels})"
                ));
            }
            Ok((w, h)) => match budget(ctx)
                .acquire(w as u64 * h as u64 * BYTES_PER_PIXEL)
                .await
            {
                Ok(p) => permit = Some(p),
                Err(e) => refused = Some(e),
            },
            Err(e) => refused = Some(e),
        }
    }
    let limits = {
        let media = &ctx.settings.media;
        let mut l = image::Limits::default();
        let side = media.max_image_pixels.min(u32::MAX as u64) as u32;
        l.max_image_width = Some(side);
        l.max_image_height = Some(side);
        l.max_alloc = Some(
            media
                .max_image_pixels
                .saturating_mul(BYTES_PER_PIXEL)
                .saturating_mul(2),
        );
        l
    };
    let computed = tokio::task::spawn_blocking(move || -> Result<Computed, String> {
        let _permit = permit;
        if let Some(why) = refused {
            return Err(why);
        }
        let sha256 = shoal_core::ids::hex(&Sha256::digest(&data));
        if !is_image {
            return Ok(Computed {
                sha256,
                dimensions: None,
                thumbnail: None,
            });
        }
        let mut reader = image::ImageReader::new(std::io::Cursor::new(&data[..]))
            .with_guessed_format()
            .map_err(|e| format!("cannot read the image: {e}"))?;
        reader.limits(limits);
        let image = reader
            .decode()
            .map_err(|e| format!("cannot decode the image: {e}"))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn decodes_wait_for_memory_and_never_exceed_the_budget() {
        let budget = DecodeBudget::new(100 * 1024 * 1024);
        let first = budget.acquire(60 * 1024 * 1024).await.unwrap();
        assert_eq!(budget.available_mib(), 40);
        // A second decode of 60 MiB waits for the first to end.
        let waiting = {
            let b = budget.clone();
            tokio::spawn(async move { b.acquire(60 * 1024 * 1024).await.map(|_| ()) })
        };
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "two 60 MiB decodes held 120 MiB of 100"
        );
        drop(first);
        waiting.await.unwrap().unwrap();
        // More than the whole budget: refused, not waited for.
        let e = budget.acquire(101 * 1024 * 1024).await.unwrap_err();
        assert!(e.contains("media.decode_memory_bytes"), "{e}");
    }
}
