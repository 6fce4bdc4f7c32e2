//! What the tests of `shoal up` share: a whole stack started by the real
//! binary on free loopback ports with a fresh data directory.
#![allow(dead_code)]

pub mod webdriver;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use shoal_testkit as kit;
use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Stack {
    pub child: Child,
    pub base: String,
    pub dir: kit::TempDir,
}

impl Stack {
    pub fn start(instances: usize, env: &[(&str, &str)]) -> Stack {
        let dir = kit::TempDir::new("up");
        let port = kit::free_port();
        let seeded = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args([
                "seed",
                "--products",
                "20",
                "--stock",
                "1000000",
                "--data-dir",
            ])
            .arg(dir.path().join("data"))
            .env("SHOAL_LOG__LEVEL", "warn")
            // The same database as the stack's.
            .envs(
                env.iter()
                    .filter(|(k, _)| k.starts_with("SHOAL_DATABASE__"))
                    .copied(),
            )
            .output()
            .expect("shoal seed");
        assert!(
            seeded.status.success(),
            "seed: {}",
            String::from_utf8_lossy(&seeded.stderr)
        );
        let log = std::fs::File::create(dir.path().join("up.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shoal"));
        cmd.args([
            "up",
            "--port",
            &port.to_string(),
            "--instances",
            &instances.to_string(),
        ])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("SHOAL_LOG__LEVEL", "warn")
        .env("SHOAL_GATEWAY__HEALTH_INTERVAL_MS", "200")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn shoal up");
        Stack {
            child,
            base: format!("http://127.0.0.1:{port}"),
            dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The admin token `shoal up` made for this stack's data directory.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("data/secrets/admin-token"))
            .expect("shoal up writes data/secrets/admin-token")
            .trim()
            .to_string()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("up.log")).unwrap_or_default()
    }

    /// name -> pid of running children, from the supervisor's state file.
    pub fn children(&self) -> HashMap<String, u32> {
        let path = self.dir.path().join("data/run/stack.json");
        let Ok(text) = std::fs::read_to_string(path) else {
            return HashMap::new();
        };
        let Ok(v) = serde_json::from_str::<Value>(&text) else {
            return HashMap::new();
        };
        v["children"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| Some((c["name"].as_str()?.to_string(), c["pid"].as_u64()? as u32)))
            .collect()
    }

    /// name -> address of children that listen, from the state file.
    pub fn addresses(&self) -> HashMap<String, String> {
        let path = self.dir.path().join("data/run/stack.json");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        v["children"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| {
                Some((
                    c["name"].as_str()?.to_string(),
                    c["address"].as_str()?.to_string(),
                ))
            })
            .collect()
    }

    pub async fn wait_ready(&self, instances: usize) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            assert!(
                Instant::now() < deadline,
                "stack not ready in 60 s; log:\n{}",
                self.log()
            );
            let mut seen = HashSet::new();
            for _ in 0..(instances * 4) {
                if let Ok(r) = http.get(self.url("/readyz")).send().await {
                    if r.status() == 200 {
                        if let Some(i) = r.headers().get("x-shoal-instance") {
                            seen.insert(i.to_str().unwrap().to_string());
                        }
                    }
                }
            }
            if seen.len() == instances {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Signs up `email` and logs `http` in, through the gateway.
    pub async fn sign_up_and_log_in(&self, http: &reqwest::Client, email: &str) {
        let creds = json!({"email": email, "password": "correct horse"});
        let r = http
            .post(self.url("/api/accounts/signup"))
            .json(&creds)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        let r = http
            .post(self.url("/api/accounts/login"))
            .json(&creds)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(r.headers().contains_key("x-request-id"));
    }

    /// The id of a seeded product.
    pub async fn a_product(&self, http: &reqwest::Client) -> String {
        let products: Value = http
            .get(self.url("/api/catalog/products?per_page=1"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        products["items"][0]["id"]
            .as_str()
            .expect("a seeded product")
            .to_string()
    }

    /// Waits until order `id` is paid (failing on `failed` or the deadline).
    pub async fn wait_paid(&self, http: &reqwest::Client, id: &str, deadline: Instant) {
        loop {
            let o: Value = http
                .get(self.url(&format!("/api/orders/{id}")))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if o["status"] == "paid" {
                return;
            }
            assert_ne!(o["status"], "failed", "{o}");
            assert!(
                Instant::now() < deadline,
                "order not paid: {o}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Charges the stack's sandbox made for `order_id`.
    pub async fn charges_for(&self, order_id: &str) -> usize {
        let sandbox = self.addresses()["sandbox"].clone();
        let charges: Value = reqwest::get(format!("http://{sandbox}/_sandbox/charges"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        charges["charges"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["metadata"]["order_id"] == order_id)
            .count()
    }

    /// SIGTERM and wait; returns how long the stop took.
    pub fn stop(&mut self, limit: Duration) -> Duration {
        let started = Instant::now();
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).unwrap();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "shoal up exited with {status}; log:\n{}",
                    self.log()
                );
                return started.elapsed();
            }
            assert!(
                started.elapsed() < limit,
                "shoal up did not stop within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
