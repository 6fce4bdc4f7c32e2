//! Blob storage through `object_store`: a local folder (embedded) or an
//! S3-compatible bucket, behind one `BlobStore` type. Keys are checked
//! before any I/O so they can never escape the storage root; uploads
//! stream with a size limit and a SHA-256 computed on the way; reads
//! support byte ranges.

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use object_store::path::Path as StorePath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};
use sha2::{Digest, Sha256};
use std::ops::Range;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("invalid blob key `{key}`: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    #[error("the upload is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("no blob has the key `{0}`")]
    NotFound(String),
    #[error("the range does not fit the blob of {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    #[error("the upload stream failed: {0}")]
    Body(String),
    #[error("blob storage: {0}")]
    Store(#[from] object_store::Error),
    #[error("blob storage I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Settings of an S3-compatible bucket.
#[derive(Debug, Clone)]
pub struct S3Config {
    pub bucket: String,
    /// e.g. `http://127.0.0.1:9090`; `None` for AWS itself.
    pub endpoint: Option<String>,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

/// What a finished upload stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutResult {
    pub size: u64,
    /// Lowercase hex SHA-256 of the content.
    pub sha256: String,
}

/// A blob being read: its full size, the byte range returned, the bytes.
pub struct BlobRead {
    pub size: u64,
    pub range: Range<u64>,
    pub body: futures_util::stream::BoxStream<'static, Result<Bytes, BlobError>>,
}

impl std::fmt::Debug for BlobRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobRead")
            .field("size", &self.size)
            .field("range", &self.range)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct BlobStore {
    store: Arc<dyn ObjectStore>,
    description: String,
}

impl BlobStore {
    /// Blobs as files under `root` (created if missing).
    pub fn local(root: &std::path::Path) -> Result<Self, BlobError> {
        std::fs::create_dir_all(root)?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(root)?
            .with_automatic_cleanup(true);
        Ok(BlobStore {
            store: Arc::new(store),
            description: format!("local:{}", root.display()),
        })
    }

    /// Blobs in an S3-compatible bucket (plain HTTP endpoints allowed, for
    /// MinIO or a test server on a private network).
    pub fn s3(config: &S3Config) -> Result<Self, BlobError> {
        // rustls needs a process-wide crypto provider; a second install is a no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_access_key_id(&config.access_key_id)
            .with_secret_access_key(&config.secret_access_key);
        if let Some(endpoint) = &config.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        Ok(BlobStore {
            store: Arc::new(builder.build()?),
            description: format!("s3:{}", config.bucket),
        })
    }

    pub fn describe(&self) -> &str {
        &self.description
    }

    /// Checks a key: 1–512 bytes of `[A-Za-z0-9._-]` segments joined by
    /// `/`, no `.` or `..` segment, no leading or doubled `/`.
    pub fn check_key(key: &str) -> Result<StorePath, BlobError> {
        let bad = |reason| {
            Err(BlobError::InvalidKey {
                key: key.chars().take(80).collect(),
                reason,
            })
        };
        if key.is_empty() || key.len() > 512 {
            return bad("must be 1 to 512 bytes");
        }
        for segment in key.split('/') {
            if segment.is_empty() {
                return bad("must not start or end with `/` or contain `//`");
            }
            if segment == "." || segment == ".." {
                return bad("must not contain `.` or `..` segments");
            }
            if !segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
            {
                return bad("may only contain letters, digits, `.`, `_`, `-` and `/`");
            }
        }
        StorePath::parse(key).or_else(|_| bad("is not a valid object path"))
    }

    /// Streams `body` to `key`, failing (and storing nothing) past
    /// `max_bytes`. Returns the size and SHA-256.
    ///
    /// Cancel safety: if the future is dropped mid-upload, a multipart
    /// upload may be left for the store to expire; the key is not written.
    pub async fn put_stream<S, E>(
        &self,
        key: &str,
        mut body: S,
        max_bytes: u64,
    ) -> Result<PutResult, BlobError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin + Send,
        E: std::fmt::Display,
    {
        let path = Self::check_key(key)?;
        let mut writer = object_store::buffered::BufWriter::new(self.store.clone(), path);
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let _ = writer.abort().await;
                    return Err(BlobError::Body(e.to_string()));
                }
            };
            size += chunk.len() as u64;
            if size > max_bytes {
                let _ = writer.abort().await;
                return Err(BlobError::TooLarge { limit: max_bytes });
            }
            hasher.update(&chunk);
            if let Err(e) = writer.write_all(&chunk).await {
                let _ = writer.abort().await;
                return Err(e.into());
            }
        }
        writer.shutdown().await?;
        Ok(PutResult {
            size,
            sha256: shoal_core::ids::hex(&hasher.finalize()),
        })
    }

    /// Reads `key`, whole or the given byte range (end exclusive, clamped
    /// to the size).
    pub async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<BlobRead, BlobError> {
        let path = Self::check_key(key)?;
        let meta = match self.store.head(&path).await {
            Ok(m) => m,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(BlobError::NotFound(key.into()))
            }
            Err(e) => return Err(e.into()),
        };
        let size = meta.size;
        let range = match range {
            None => 0..size,
            Some(r) if r.start < size && r.start < r.end => r.start..r.end.min(size),
            Some(_) => return Err(BlobError::RangeNotSatisfiable { size }),
        };
        let options = GetOptions {
            range: Some(GetRange::Bounded(range.clone())),
            ..GetOptions::default()
        };
        let result = if size == 0 {
            self.store.get(&path).await?
        } else {
            self.store.get_opts(&path, options).await?
        };
        let body = result
            .into_stream()
            .map(|r| r.map_err(BlobError::from))
            .boxed();
        Ok(BlobRead { size, range, body })
    }

    /// Reads a whole blob into memory (for small blobs and background jobs).
    pub async fn get_bytes(&self, key: &str) -> Result<Bytes, BlobError> {
        let path = Self::check_key(key)?;
        match self.store.get(&path).await {
            Ok(r) => Ok(r.bytes().await?),
            Err(object_store::Error::NotFound { .. }) => Err(BlobError::NotFound(key.into())),
            Err(e) => Err(e.into()),
        }
    }

    /// Size of a blob, or `NotFound`.
    pub async fn size(&self, key: &str) -> Result<u64, BlobError> {
        let path = Self::check_key(key)?;
        match self.store.head(&path).await {
            Ok(m) => Ok(m.size),
            Err(object_store::Error::NotFound { .. }) => Err(BlobError::NotFound(key.into())),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes a blob; deleting a missing blob is not an error.
    pub async fn delete(&self, key: &str) -> Result<(), BlobError> {
        let path = Self::check_key(key)?;
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
