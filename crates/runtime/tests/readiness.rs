//! `/readyz` of a service instance tells the truth about the stores a
//! request needs: with Redis for sessions and the bus, stopping Redis turns
//! it 503 (naming what is down) and starting Redis again turns it 200 by
//! itself, so the gateways take the instance out and back without anyone.
//! Runs a private `redis-server` on a free port (it must be killed).

use shoal_core::settings::{BusBackend, SessionBackend};
use shoal_core::Settings;
use shoal_runtime::{Application, ServiceModule};
use shoal_testkit as kit;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

struct Redis(Child);

impl Redis {
    fn start(port: u16) -> Option<Redis> {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Redis(child))
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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
    let Some(redis) = Redis::start(port) else {
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

    drop(redis);
    let body = ready_becomes(&readyz, 503, Duration::from_secs(10)).await;
    assert!(
        body.contains("session store") && body.contains("bus"),
        "{body}"
    );
    assert!(!body.contains("database"), "{body}");

    let _redis = Redis::start(port).expect("redis-server starts again");
    ready_becomes(&readyz, 200, Duration::from_secs(30)).await;
    stop.cancel();
}
