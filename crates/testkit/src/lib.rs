//! Test helpers shared by every crate's tests: temporary directories, fresh
//! databases per test (a new SQLite file, or a new PostgreSQL database on
//! the server named by `SHOAL_TEST_POSTGRES_URL`), a Redis URL with a unique
//! key prefix, free ports and an HTTP client with a cookie jar.

use sqlx::Connection;
use std::path::{Path, PathBuf};

/// A directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(label: &str) -> Self {
        let path =
            std::env::temp_dir().join(format!("shoal-{label}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("SHOAL_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A short unique name for keys, streams, schemas: `t_<16 hex>`.
pub fn unique_name() -> String {
    format!("t_{}", &uuid::Uuid::new_v4().simple().to_string()[..16])
}

/// `SHOAL_TEST_POSTGRES_URL`, or `None` after printing one `skipped:` line.
pub fn postgres_url(test: &str) -> Option<String> {
    env_or_skip("SHOAL_TEST_POSTGRES_URL", test)
}

/// `SHOAL_TEST_REDIS_URL`, or `None` after printing one `skipped:` line.
pub fn redis_url(test: &str) -> Option<String> {
    env_or_skip("SHOAL_TEST_REDIS_URL", test)
}

/// `SHOAL_TEST_S3_URL` (an S3-compatible endpoint such as
/// `http://127.0.0.1:9090`), or `None` after printing one `skipped:` line.
pub fn s3_url(test: &str) -> Option<String> {
    env_or_skip("SHOAL_TEST_S3_URL", test)
}

/// `SHOAL_TEST_CHROMEDRIVER` (the path of chromedriver, with Chromium
/// beside it), or `None` after printing one `skipped:` line.
pub fn chromedriver(test: &str) -> Option<String> {
    env_or_skip("SHOAL_TEST_CHROMEDRIVER", test)
}

/// `SHOAL_TEST_NATS_URL`, or `None` after printing one `skipped:` line.
pub fn nats_url(test: &str) -> Option<String> {
    env_or_skip("SHOAL_TEST_NATS_URL", test)
}

/// `SHOAL_TEST_SMTP_URL` (the SMTP sink of `scripts/smtp-sink`, such as
/// `smtp://127.0.0.1:2525`) and `SHOAL_TEST_SMTP_DIR` (where the sink
/// writes each message it receives as a file), or `None` after printing
/// one `skipped:` line when either is unset.
pub fn smtp_url(test: &str) -> Option<(String, PathBuf)> {
    let url = env_or_skip("SHOAL_TEST_SMTP_URL", test)?;
    let dir = env_or_skip("SHOAL_TEST_SMTP_DIR", test)?;
    Some((url, PathBuf::from(dir)))
}

fn env_or_skip(var: &str, test: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            println!("skipped: set {var} to run {test}");
            None
        }
    }
}

/// Creates a new, empty PostgreSQL database on the server of `server_url`
/// and returns a URL to it, so each test owns its data.
pub async fn fresh_postgres_database(server_url: &str) -> String {
    let name = unique_name();
    let mut conn = sqlx::postgres::PgConnection::connect(server_url)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to SHOAL_TEST_POSTGRES_URL: {e}"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let _ = conn.close().await;
    replace_database_in_url(server_url, &name)
}

fn replace_database_in_url(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let path_start = base[scheme_end..].find('/').map(|i| i + scheme_end);
    let host_part = match path_start {
        Some(i) => &base[..i],
        None => base,
    };
    match query {
        Some(q) => format!("{host_part}/{db}?{q}"),
        None => format!("{host_part}/{db}"),
    }
}

/// A fresh SQLite database URL in `dir`.
pub fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}?mode=rwc", dir.join("test.db").display())
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    shoal_core::ports::loopback_port().expect("free port")
}

/// A server process of a test (a private `redis-server` or `nats-server`)
/// listening on a 127.0.0.1 port; killed when dropped.
#[derive(Debug)]
pub struct Daemon(std::process::Child);

impl Daemon {
    /// Runs `command` (output discarded) and waits up to 10 s for `port`
    /// to accept connections; `None` when the program cannot be started
    /// (not installed: the caller prints its `skipped:` line).
    pub fn start(mut command: std::process::Command, port: u16) -> Option<Daemon> {
        let child = command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .ok()?;
        let daemon = Daemon(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "{:?} did not listen on {port}",
                command.get_program()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Some(daemon)
    }
}

impl Daemon {
    /// The process id (with `process_group(0)`, its process group's too).
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An HTTP client with a cookie jar and sane timeouts.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .timeout(std::time::Duration::from_secs(30))
        .pool_max_idle_per_host(64)
        .build()
        .expect("http client")
}

/// The password test accounts are made with.
pub const PASSWORD: &str = "correct horse";

/// The `name=value` part of a response's first `Set-Cookie`.
pub fn session_cookie(resp: &reqwest::Response) -> String {
    resp.headers()["set-cookie"]
        .to_str()
        .expect("set-cookie is text")
        .split(';')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Signs `email` up at `base` (a Shoal HTTP base URL) with [`PASSWORD`],
/// logs in, and returns the session cookie (`name=value`) and the user id.
pub async fn sign_up_and_log_in(base: &str, email: &str) -> (String, String) {
    let http = http_client();
    let creds = serde_json::json!({"email": email, "password": PASSWORD});
    let r = http
        .post(format!("{base}/api/accounts/signup"))
        .json(&creds)
        .send()
        .await
        .expect("signup");
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());
    let r = http
        .post(format!("{base}/api/accounts/login"))
        .json(&creds)
        .send()
        .await
        .expect("login");
    assert_eq!(r.status(), 200);
    let cookie = session_cookie(&r);
    let user: serde_json::Value = r.json().await.expect("login answer");
    let id = user["id"].as_str().expect("user id").to_string();
    (cookie, id)
}

/// Asserts that `resp` is an `application/problem+json` answer with
/// `status`, and returns its body.
pub async fn problem(resp: reqwest::Response, status: u16) -> serde_json::Value {
    assert_eq!(resp.status().as_u16(), status, "status");
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/problem+json"
    );
    resp.json().await.expect("problem body")
}

/// Reads Server-Sent Events from a streaming response, comments skipped.
pub struct SseReader {
    resp: reqwest::Response,
    buf: String,
    /// The `retry:` of the last event returned, if it had one.
    pub retry: Option<u64>,
}

impl SseReader {
    /// Opens `url` with the session `cookie` (and `Last-Event-ID`);
    /// asserts a 200 `text/event-stream`.
    pub async fn open(url: &str, cookie: &str, last_event_id: Option<&str>) -> SseReader {
        Self::open_with(&reqwest::Client::new(), url, cookie, last_event_id).await
    }

    /// [`SseReader::open`] on `client`'s connections (one client for
    /// thousands of streams).
    pub async fn open_with(
        client: &reqwest::Client,
        url: &str,
        cookie: &str,
        last_event_id: Option<&str>,
    ) -> SseReader {
        let mut req = client
            .get(url)
            .header("cookie", cookie)
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let r = req.send().await.expect("SSE request");
        if r.status() != 200 {
            let status = r.status();
            let instance = r.headers().get("x-shoal-instance").cloned();
            let body = r.text().await.unwrap_or_default();
            panic!("opening {url}: {status} (instance {instance:?}): {body}");
        }
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        SseReader {
            resp: r,
            buf: String::new(),
            retry: None,
        }
    }

    /// The next event's (id, parsed data); panics when none comes within
    /// `timeout` or the stream ends.
    pub async fn next(
        &mut self,
        timeout: std::time::Duration,
    ) -> (Option<String>, serde_json::Value) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            while let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut id = None;
                let mut data = String::new();
                let mut retry = None;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    } else if let Some(v) = line.strip_prefix("retry:") {
                        retry = Some(v.trim().parse().expect("retry: is a number"));
                    }
                }
                if !data.is_empty() {
                    self.retry = retry;
                    return (id, serde_json::from_str(&data).expect("event data is JSON"));
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk())
                .await
                .expect("no SSE event in time")
                .expect("the SSE stream broke")
                .expect("the SSE stream ended");
            self.buf.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// What was read and not yet returned as an event.
    pub fn unread(&self) -> &str {
        &self.buf
    }

    /// True when the stream ends (or breaks) within `timeout` with no
    /// other event.
    pub async fn ends(&mut self, timeout: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.buf.contains("data:") {
                return false;
            }
            match tokio::time::timeout_at(deadline, self.resp.chunk()).await {
                Err(_) => return false,
                Ok(Ok(None)) | Ok(Err(_)) => return true,
                Ok(Ok(Some(chunk))) => self.buf.push_str(&String::from_utf8_lossy(&chunk)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_name_is_replaced() {
        assert_eq!(
            replace_database_in_url("postgres://root@127.0.0.1:5432/test", "x"),
            "postgres://root@127.0.0.1:5432/x"
        );
        assert_eq!(
            replace_database_in_url("postgres://root@127.0.0.1/test?sslmode=disable", "x"),
            "postgres://root@127.0.0.1/x?sslmode=disable"
        );
        assert_eq!(
            replace_database_in_url("postgres://root@127.0.0.1:5432", "x"),
            "postgres://root@127.0.0.1:5432/x"
        );
    }
}
