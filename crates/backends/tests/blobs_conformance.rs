//! Runs the blob-store conformance suite on a local folder and on an
//! S3-compatible server (`SHOAL_TEST_S3_URL`, e.g. the moto server that
//! `scripts/services ensure` starts).

use shoal_backends::{conformance, BlobStore, S3Config};
use shoal_testkit as kit;

#[tokio::test]
async fn local_blob_store_conforms() {
    let dir = kit::TempDir::new("blobs");
    let store = BlobStore::local(&dir.path().join("blobs")).unwrap();
    conformance::blob_store(&store).await;
    // Nothing was written outside the root.
    let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(entries.len(), 1);
}

#[tokio::test]
async fn s3_blob_store_conforms() {
    let Some(endpoint) = kit::s3_url("s3_blob_store_conforms") else {
        return;
    };
    let bucket = kit::unique_name().replace('_', "-");
    // An S3 CreateBucket; the test server accepts any credentials.
    let created = reqwest::Client::new()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await
        .expect("S3 server answers");
    assert!(
        created.status().is_success(),
        "create bucket: {}",
        created.status()
    );
    let store = BlobStore::s3(&S3Config {
        bucket,
        endpoint: Some(endpoint),
        region: "us-east-1".into(),
        access_key_id: "test".into(),
        secret_access_key: "test".into(),
    })
    .unwrap();
    conformance::blob_store(&store).await;
}
