//! The `[blobs]` and `[media]` settings sections: where blobs are stored
//! (a folder under the data directory, or an S3-compatible bucket) and the
//! media service's upload limits.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum BlobBackend {
    /// Files under `<data_dir>/blobs`.
    Local,
    /// An S3-compatible bucket (`blobs.s3_*`).
    S3,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BlobSettings {
    pub backend: BlobBackend,
    pub s3_bucket: String,
    /// Endpoint of an S3-compatible server (MinIO, moto); empty for AWS.
    pub s3_endpoint: String,
    pub s3_region: String,
    pub s3_access_key_id: String,
    pub s3_secret_access_key: String,
}

impl Default for BlobSettings {
    fn default() -> Self {
        BlobSettings {
            backend: BlobBackend::Local,
            s3_bucket: "shoal".into(),
            s3_endpoint: String::new(),
            s3_region: "us-east-1".into(),
            s3_access_key_id: String::new(),
            s3_secret_access_key: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MediaSettings {
    /// Largest upload accepted, bytes (413 past it).
    pub max_upload_bytes: u64,
    /// Images that declare more pixels than this (width × height, read
    /// from the header before anything is decoded) fail processing: a
    /// small file can declare a huge image (a decompression bomb).
    pub max_image_pixels: u64,
    /// Memory that the image decodes of one process may hold at once,
    /// bytes: a decode waits until its estimate (pixels × bytes per pixel)
    /// fits, so concurrent jobs cannot add up past it.
    pub decode_memory_bytes: u64,
}

impl Default for MediaSettings {
    fn default() -> Self {
        MediaSettings {
            // The gateway's default `max_body_bytes`: an upload the
            // service would take must get through the gateway too.
            max_upload_bytes: 16 * 1024 * 1024,
            max_image_pixels: 40_000_000,
            decode_memory_bytes: 512 * 1024 * 1024,
        }
    }
}
