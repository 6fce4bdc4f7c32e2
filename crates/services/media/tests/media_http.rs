//! The media service over HTTP with a real worker: upload, background
//! processing to `ready` with a thumbnail, serving with ranges and cache
//! headers, privacy, and bad uploads that store nothing.

use serde_json::Value;
use shoal_runtime::testing::TestApp;
use std::time::Duration;

async fn start() -> TestApp {
    TestApp::builder()
        .module(shoal_accounts::Accounts)
        .module(shoal_media::Media)
        .settings(|s| s.media.max_upload_bytes = 200_000)
        .worker()
        .start()
        .await
}

fn png(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, 90])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn blob_files(dir: &std::path::Path) -> usize {
    fn walk(p: &std::path::Path) -> usize {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.flatten()
                    .map(|e| {
                        if e.path().is_dir() {
                            walk(&e.path())
                        } else {
                            1
                        }
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(&dir.join("blobs"))
}

#[tokio::test]
async fn an_image_upload_is_processed_and_served() {
    let app = start().await;
    let ada = app.signed_in("ada@example.com").await;
    let data = png(640, 480);
    let r = ada
        .post(format!(
            "{}/api/media/uploads?visibility=public",
            app.base()
        ))
        .header("content-type", "image/png")
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let upload: Value = r.json().await.unwrap();
    assert_eq!(upload["status"], "processing");
    let id = upload["id"].as_str().unwrap().to_string();

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let ready = loop {
        let v: Value = ada
            .get(format!("{}/api/media/uploads/{id}", app.base()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["status"] == "ready" {
            break v;
        }
        assert_ne!(v["status"], "failed", "{v}");
        assert!(std::time::Instant::now() < deadline, "not ready: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ready["width"], 640);
    assert_eq!(ready["height"], 480);
    assert_eq!(ready["sha256"].as_str().unwrap().len(), 64);

    // The blob, whole and by range, with immutable caching.
    let anon = reqwest::Client::new();
    let url = format!("{}{}", app.base(), ready["url"].as_str().unwrap());
    let r = anon.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["cache-control"],
        "public, max-age=31536000, immutable"
    );
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(r.bytes().await.unwrap().to_vec(), data);
    let r = anon
        .get(&url)
        .header("range", "bytes=0-7")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(
        r.headers()["content-range"],
        format!("bytes 0-7/{}", data.len())
    );
    assert_eq!(r.bytes().await.unwrap().to_vec(), data[..8].to_vec());
    let r = anon
        .get(&url)
        .header("range", "bytes=999999-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);

    // The thumbnail is a PNG within 256×256.
    let thumb = anon
        .get(format!(
            "{}{}",
            app.base(),
            ready["thumbnail_url"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let t = image::load_from_memory(&thumb).unwrap();
    assert_eq!((t.width(), t.height()), (256, 192));
}

#[tokio::test]
async fn private_uploads_are_only_for_their_owner_and_bad_uploads_store_nothing() {
    let app = start().await;
    let ada = app.signed_in("ada@example.com").await;
    let bob = app.signed_in("bob@example.com").await;
    let r = ada
        .post(format!("{}/api/media/uploads", app.base()))
        .header("content-type", "text/plain")
        .body("my diary")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let upload: Value = r.json().await.unwrap();
    let url = format!("{}{}", app.base(), upload["url"].as_str().unwrap());
    let id = upload["id"].as_str().unwrap();
    assert_eq!(ada.get(&url).send().await.unwrap().status(), 200);
    assert_eq!(
        bob.get(&url).send().await.unwrap().status(),
        404,
        "not someone else's"
    );
    assert_eq!(
        reqwest::get(&url).await.unwrap().status(),
        404,
        "not anonymous"
    );
    assert_eq!(
        bob.get(format!("{}/api/media/uploads/{id}", app.base()))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    let before = blob_files(app.data_dir());

    // declared PNG, content is not: 422
    let r = ada
        .post(format!("{}/api/media/uploads", app.base()))
        .header("content-type", "image/png")
        .body("<html>not a png</html>")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    // an unsupported type: 415
    let r = ada
        .post(format!("{}/api/media/uploads", app.base()))
        .header("content-type", "application/x-msdownload")
        .body("MZ")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    // too large (limit 200,000 bytes in this test): 413
    let r = ada
        .post(format!("{}/api/media/uploads", app.base()))
        .header("content-type", "text/plain")
        .body("a".repeat(300_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // no session: 401
    let r = reqwest::Client::new()
        .post(format!("{}/api/media/uploads", app.base()))
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // keys that try to escape the root
    for bad in ["../../etc/passwd", "uploads/..%2F..%2Fshoal.db", "%2e%2e/x"] {
        let status = ada
            .get(format!("{}/media/{bad}", app.base()))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status, 404, "{bad}");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        blob_files(app.data_dir()),
        before,
        "bad uploads stored nothing"
    );
}

/// CRC-32 (IEEE) of PNG chunks, for the hand-made files below.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// `png` with its header changed to declare `width`×`height` (the pixel
/// data stays what it was), CRC fixed so the header itself is valid.
fn declaring(mut png: Vec<u8>, width: u32, height: u32) -> Vec<u8> {
    // Signature (8), IHDR length (4), "IHDR" (4), then width and height.
    png[16..20].copy_from_slice(&width.to_be_bytes());
    png[20..24].copy_from_slice(&height.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

/// Uploads `data` as `content_type` and waits for processing to end;
/// returns the upload's final view.
async fn processed(
    app: &TestApp,
    http: &reqwest::Client,
    content_type: &str,
    data: Vec<u8>,
) -> Value {
    let r = http
        .post(format!("{}/api/media/uploads", app.base()))
        .header("content-type", content_type)
        .body(data)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let v: Value = http
            .get(format!("{}/api/media/uploads/{id}", app.base()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["status"] != "processing" {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still processing: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The security review's third finding: a 389 KB PNG declaring
/// 20000×20000 was decoded whole in the worker. Now an
/// image is judged by its header first: one declaring more than
/// `media.max_image_pixels` fails without being decoded; a truncated file
/// and a header that lies about the data fail cleanly; an animated GIF is
/// processed from its first frame.
#[tokio::test]
async fn hostile_images_fail_without_being_decoded() {
    let app = start().await;
    let ada = app.signed_in("ada@example.com").await;
    let bomb = declaring(png(16, 16), 20_000, 20_000);
    let started = std::time::Instant::now();
    let v = processed(&app, &ada, "image/png", bomb).await;
    assert_eq!(v["status"], "failed", "{v}");
    let error = v["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("20000×20000") && error.contains("media.max_image_pixels"),
        "{v}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    let mut truncated = png(64, 64);
    truncated.truncate(truncated.len() * 3 / 5);
    let v = processed(&app, &ada, "image/png", truncated).await;
    assert_eq!(v["status"], "failed", "{v}");
    assert!(
        v["error"].as_str().unwrap_or_default().contains("decode"),
        "{v}"
    );

    // Declares 64×6400, carries the pixels of 64×64.
    let lying = declaring(png(64, 64), 64, 6_400);
    let v = processed(&app, &ada, "image/png", lying).await;
    assert_eq!(v["status"], "failed", "{v}");

    let mut gif = Vec::new();
    {
        let mut encoder = image::codecs::gif::GifEncoder::new(&mut gif);
        encoder
            .set_repeat(image::codecs::gif::Repeat::Infinite)
            .unwrap();
        for shade in [0u8, 200] {
            let frame = image::RgbaImage::from_pixel(40, 30, image::Rgba([shade, 10, 10, 255]));
            encoder.encode_frame(image::Frame::new(frame)).unwrap();
        }
    }
    let v = processed(&app, &ada, "image/gif", gif).await;
    assert_eq!(v["status"], "ready", "{v}");
    assert_eq!(
        (v["width"].as_i64(), v["height"].as_i64()),
        (Some(40), Some(30))
    );
}
