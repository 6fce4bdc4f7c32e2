//! Reloading the settings (admin API and SIGHUP) under load, and DNS
//! membership.

mod common;

use common::*;
use http::StatusCode;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A settings file in a fresh temporary directory.
struct ConfigFile {
    path: PathBuf,
}

impl ConfigFile {
    fn new(name: &str) -> ConfigFile {
        let dir = std::env::temp_dir().join(format!(
            "shoal-gateway-reload-{name}-{}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        ConfigFile {
            path: dir.join("gateway.toml"),
        }
    }

    /// Writes a `[gateway]` section with one pool `default`.
    fn write(&self, upstreams: &[String], extra: &str) {
        let list = upstreams
            .iter()
            .map(|u| format!("\"{u}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let text = format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nhealth_interval_ms = 100\nhealth_timeout_ms = 200\n\
             connect_timeout_ms = 300\nrequest_timeout_ms = 2000\nshutdown_timeout_secs = 5\n\
             balancer = \"round_robin\"\nadmin_token = \"{ADMIN_TOKEN}\"\n{extra}\n\n[[gateway.pools]]\nname = \"default\"\nupstreams = [{list}]\n"
        );
        // Write then rename, so a reload never reads half a file.
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }

    fn write_raw(&self, text: &str) {
        std::fs::write(&self.path, text).unwrap();
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

async fn start_from_file(path: &Path) -> TestGateway {
    let settings = shoal_core::settings::load(Some(path), Vec::<(String, String)>::new())
        .expect("settings file loads")
        .gateway;
    let gateway = shoal_gateway::Gateway::bind(settings)
        .await
        .expect("bind")
        .with_config_path(path.to_path_buf());
    let addr = gateway.local_addr();
    let stop = CancellationToken::new();
    let task = tokio::spawn(gateway.run(stop.clone()));
    TestGateway { addr, stop, task }
}

async fn reload(client: &TestClient, gw: &TestGateway) -> Reply {
    admin(client, gw, "reload", json!({}), None).await
}

async fn instance_urls(client: &TestClient, gw: &TestGateway) -> Vec<String> {
    let pools = gw.pools(client).await;
    let mut urls: Vec<String> = pools["pools"][0]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["url"].as_str().unwrap().to_string())
        .collect();
    urls.sort();
    urls
}

#[tokio::test]
async fn reloads_under_a_stream_of_requests_lose_none_and_keep_instance_state() {
    let ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    for u in &ups {
        u.state.delay_ms.store(2, Ordering::SeqCst);
    }
    let config = ConfigFile::new("stream");
    config.write(&[ups[0].url(), ups[1].url()], "");
    let gw = start_from_file(&config.path).await;
    let client = TestClient::default();

    let load = GetLoad::start(&client, gw.url("/items"), 6);

    tokio::time::sleep(Duration::from_millis(200)).await;
    let b_before = gw.instance(&client, &ups[1].url()).await["requests"]
        .as_u64()
        .unwrap();
    assert!(b_before > 0);
    // Swap a for c, back, and again, under load.
    let sets = [
        vec![ups[1].url(), ups[2].url()],
        vec![ups[0].url(), ups[1].url(), ups[2].url()],
        vec![ups[1].url(), ups[2].url()],
    ];
    for set in &sets {
        config.write(set, "");
        let r = reload(&client, &gw).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let mut want = set.clone();
        want.sort();
        assert_eq!(instance_urls(&client, &gw).await, want);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let (total, failed) = load.finish().await;
    assert!(total > 100, "only {total} requests");
    assert_eq!(failed, 0, "of {total} requests");
    // b stayed configured throughout: its instance (and counters) carried on.
    let b_after = gw.instance(&client, &ups[1].url()).await["requests"]
        .as_u64()
        .unwrap();
    assert!(b_after > b_before, "{b_before} -> {b_after}");
    assert!(ups[2].hits() > 0, "c took traffic after the reload");
    let a_hits = ups[0].hits();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..10 {
        assert_eq!(client.get(&gw.url("/x")).await.status, StatusCode::OK);
    }
    assert_eq!(ups[0].hits(), a_hits, "a is out after the last reload");
}

#[tokio::test]
async fn a_reload_keeps_the_health_state_of_unchanged_instances() {
    let ups = [Upstream::start("a").await, Upstream::start("b").await];
    let config = ConfigFile::new("health");
    config.write(&[ups[0].url(), ups[1].url()], "");
    let gw = start_from_file(&config.path).await;
    let client = TestClient::default();
    ups[1].state.ready.store(false, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(3), || async {
            gw.instance(&client, &ups[1].url()).await["draining"] == true
        })
        .await
    );
    // A reload that changes only a timeout keeps b draining at once
    // (a fresh instance would start available).
    config.write(&[ups[0].url(), ups[1].url()], "retries = 1");
    assert_eq!(reload(&client, &gw).await.status, StatusCode::OK);
    let b = gw.instance(&client, &ups[1].url()).await;
    assert_eq!(b["draining"], true, "{b}");
    assert_eq!(b["available"], false, "{b}");
    for _ in 0..6 {
        assert_eq!(client.get(&gw.url("/x")).await.body, "a");
    }
}

#[tokio::test]
async fn a_bad_settings_file_is_refused_and_the_running_settings_stay() {
    let up = Upstream::start("a").await;
    let config = ConfigFile::new("bad");
    config.write(&[up.url()], "");
    let gw = start_from_file(&config.path).await;
    let client = TestClient::default();
    config.write_raw("[gateway\nnot toml");
    let r = reload(&client, &gw).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert!(r.body.contains("not valid TOML"), "{}", r.body);
    config.write(&["ftp://nope".to_string()], "");
    let r = reload(&client, &gw).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert_eq!(client.get(&gw.url("/x")).await.status, StatusCode::OK);
    let m = client.get_admin(&gw.url("/_gateway/metrics")).await;
    assert!(m.body.contains("shoal_gateway_reloads_total"), "{}", m.body);
}

#[tokio::test]
async fn reload_needs_a_settings_file_and_admin_rights() {
    let up = Upstream::start("a").await;
    let gw = TestGateway::start(settings(
        &[up.url()],
        json!({"admin_token": "another-admin-token-42"}),
    ))
    .await;
    let client = TestClient::default();
    let r = reload(&client, &gw).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{}", r.body);
    let r = admin(
        &client,
        &gw,
        "reload",
        json!({}),
        Some("another-admin-token-42"),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.body);
    assert!(r.body.contains("without a settings file"), "{}", r.body);
}

#[cfg(unix)]
#[tokio::test]
async fn sighup_reloads_the_settings_file() {
    let ups = [Upstream::start("a").await, Upstream::start("b").await];
    let config = ConfigFile::new("sighup");
    config.write(&[ups[0].url()], "");
    let gw = start_from_file(&config.path).await;
    let client = TestClient::default();
    // A handler of the test's own first, so a SIGHUP that arrives before
    // the gateway installed its handler cannot end the test process; then
    // signal until the gateway has reloaded.
    let _own = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).unwrap();
    config.write(&[ups[1].url()], "");
    let mut reloaded = false;
    for _ in 0..15 {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &std::process::id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
        reloaded = eventually(Duration::from_millis(200), || async {
            instance_urls(&client, &gw).await == vec![ups[1].url()]
        })
        .await;
        if reloaded {
            break;
        }
    }
    assert!(reloaded, "SIGHUP reloaded the pool");
    assert_eq!(client.get(&gw.url("/x")).await.body, "b");
}

#[tokio::test]
async fn dns_names_are_resolved_into_one_instance_per_address_and_followed() {
    let up = Upstream::start("a").await;
    let port = up.addr.port();
    let gw = TestGateway::start(settings(
        &[format!("http://localhost:{port}")],
        json!({"dns_refresh_secs": 1, "health_interval_ms": 50}),
    ))
    .await;
    let client = TestClient::default();
    let ip_url = format!("http://127.0.0.1:{port}");
    assert!(
        eventually(Duration::from_secs(3), || async {
            let urls = instance_urls(&client, &gw).await;
            urls.contains(&ip_url) && !urls.iter().any(|u| u.contains("localhost"))
        })
        .await,
        "the name was replaced by its addresses: {:?}",
        instance_urls(&client, &gw).await
    );
    // localhost may also resolve to ::1, where nothing listens: retries and
    // health checks keep requests on 127.0.0.1.
    for _ in 0..10 {
        assert_eq!(client.get(&gw.url("/x")).await.status, StatusCode::OK);
    }
    assert!(up.hits() >= 10);
}

#[tokio::test]
async fn connection_limits_follow_a_reload_for_new_connections() {
    let up = Upstream::start("a").await;
    let config = ConfigFile::new("connlimits");
    config.write(&[up.url()], "");
    let gw = start_from_file(&config.path).await;
    let _held = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    config.write(&[up.url()], "max_connections = 2");
    // Reload over a connection that closes, so only `_held` stays open.
    let mut admin_conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut admin_conn,
        format!(
            "POST /_gateway/admin/reload HTTP/1.1\r\nHost: x\r\nauthorization: Bearer {ADMIN_TOKEN}\r\n\
             content-length: 0\r\nconnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut admin_conn, &mut answer)
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"needs_restart\":[]"), "{answer}");
    drop(admin_conn);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _second = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::io::AsyncReadExt::read(&mut third, &mut buf),
    )
    .await
    .expect("answered")
    .unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(reply.starts_with("HTTP/1.1 503"), "{reply}");
}

/// Sends `n` GETs one after another on one new client connection.
async fn requests_on_one_connection(gw: &TestGateway, n: usize) {
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    for i in 0..n {
        let req = format!("GET /r/{i} HTTP/1.1\r\nHost: x\r\n\r\n");
        tokio::io::AsyncWriteExt::write_all(&mut conn, req.as_bytes())
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(
            Duration::from_secs(3),
            tokio::io::AsyncReadExt::read(&mut conn, &mut buf),
        )
        .await
        .expect("answered")
        .unwrap();
        let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    }
}

#[tokio::test]
async fn upstream_connection_settings_follow_a_reload_on_every_thread() {
    let up = Upstream::start("a").await;
    let config = ConfigFile::new("clientsettings");
    // Two threads: client connections alternate between them, each with
    // its own upstream client.
    config.write(&[up.url()], "workers = 2");
    let gw = start_from_file(&config.path).await;
    let client = TestClient::default();
    for _ in 0..2 {
        requests_on_one_connection(&gw, 3).await;
    }
    let reused = up.state.peers.lock().unwrap().len();
    assert!(
        reused <= 2,
        "keep-alive: one upstream connection per thread, saw {reused}"
    );

    // No idle upstream connections: every request opens its own.
    config.write(&[up.url()], "workers = 2\nupstream_idle_per_instance = 0");
    let r = reload(&client, &gw).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let pools = gw.pools(&client).await;
    assert_eq!(pools["upstream_client"]["idle_per_instance"], 0);
    up.state.peers.lock().unwrap().clear();
    for _ in 0..2 {
        requests_on_one_connection(&gw, 3).await;
    }
    let fresh = up.state.peers.lock().unwrap().len();
    assert_eq!(fresh, 6, "both threads' clients follow the reload");
}
