//! `/readyz` of a service instance tells the truth about the stores a
//! request needs: with Redis for sessions and the bus, stopping Redis turns
//! it 503 (naming what is down) and starting Redis again turns it 200 by
//! itself, so the gateways take the instance out and back without anyone.
//! Runs a private `redis-server` on a free port (it must be killed).

use shoal_core::settings::{BusBackend, SessionBackend};
use shoal_core::Settings;
use shoal_runtime::{Application, ServiceModule};
use shoal_testkit as kit;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A private redis-server on `port`, or `None` when not installed.
fn redis(port: u16) -> Option<kit::Daemon> {
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"]);
    kit::Daemon::start(cmd, port)
}

/// Polls `/readyz` until its status is `want` (within `limit`); returns
/// the last body.
async fn ready_becomes(url: &str, want: u16, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let r = reqwest::get(url).await.unwrap();
        let status = r.status().as_u16();
        let body = r.text().await.unwrap();
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "readyz stayed {status}, not {want}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_session_store_and_bus_down_and_back() {
    let port = kit::free_port();
    let Some(server) = redis(port) else {
        println!("skipped: redis-server is not installed");
        return;
    };
    let dir = kit::TempDir::new("readiness");
    let mut s = Settings {
        data_dir: dir.path().to_path_buf(),
        ..Settings::default()
    };
    let url = format!("redis://127.0.0.1:{port}");
    s.serve.listen = "127.0.0.1:0".parse().unwrap();
    s.sessions.backend = SessionBackend::Redis;
    s.sessions.redis_url = Some(url.clone());
    s.cache.bus = BusBackend::Redis;
    s.cache.bus_redis_url = Some(url);
    let modules: Vec<Box<dyn ServiceModule>> = Vec::new();
    let app = Application::build(s, modules).await.unwrap();
    let readyz = format!("http://{}/readyz", app.local_addr());
    let stop = CancellationToken::new();
    tokio::spawn(app.run(stop.clone()));
    ready_becomes(&readyz, 200, Duration::from_secs(5)).await;

    drop(server);
    let body = ready_becomes(&readyz, 503, Duration::from_secs(10)).await;
    assert!(
        body.contains("session store") && body.contains("bus"),
        "{body}"
    );
    assert!(!body.contains("database"), "{body}");

    let _server = redis(port).expect("redis-server starts again");
    ready_becomes(&readyz, 200, Duration::from_secs(30)).await;
    stop.cancel();
}
