//! A small WebDriver client (W3C protocol, JSON over HTTP) for driving
//! headless Chromium through chromedriver: open a page, type, click, read
//! the page by script, take screenshots.

use serde_json::{json, Value};
use shoal_testkit as kit;
use std::time::{Duration, Instant};

pub struct Browser {
    http: reqwest::Client,
    base: String,
    _driver: kit::Daemon,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    /// Starts `chromedriver` on a free port and a headless Chromium session
    /// at 1280x800.
    pub async fn start(chromedriver: &str) -> Browser {
        let port = kit::free_port();
        let mut cmd = std::process::Command::new(chromedriver);
        cmd.arg(format!("--port={port}"));
        // A group of its own, so the browsers it starts go with it.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let driver = kit::Daemon::start(cmd, port).expect("chromedriver starts");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let mut options = json!({
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,800",
                     "--force-device-scale-factor=1"],
        });
        // Debian's Chromium, where chromedriver does not look by itself.
        if std::path::Path::new("/usr/bin/chromium").exists() {
            options["binary"] = "/usr/bin/chromium".into();
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": options,
        }}});
        let r: Value = http
            .post(format!("http://127.0.0.1:{port}/session"))
            .json(&caps)
            .send()
            .await
            .expect("chromedriver answers")
            .json()
            .await
            .unwrap();
        let id = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no browser session: {r}"))
            .to_string();
        Browser {
            http,
            base: format!("http://127.0.0.1:{port}/session/{id}"),
            _driver: driver,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r: Value = req.send().await.unwrap().json().await.unwrap();
        if let Some(error) = r["value"]["error"].as_str() {
            panic!("webdriver {path}: {error}: {}", r["value"]["message"]);
        }
        r["value"].clone()
    }

    pub async fn goto(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the
    /// page and returns what it returns.
    pub async fn run(&self, script: &str, args: Value) -> Value {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    async fn element(&self, css: &str) -> String {
        let v = self
            .call(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT].as_str().unwrap().to_string()
    }

    /// Types `text` into the element `css` as a person would.
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    /// Clicks the element `css` as a person would.
    pub async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// The text of the first element matching `css`, or `None`.
    pub async fn text(&self, css: &str) -> Option<String> {
        self.run(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent.trim() : null;",
            json!([css]),
        )
        .await
        .as_str()
        .map(str::to_string)
    }

    /// Whether an element matching `css` is shown.
    pub async fn visible(&self, css: &str) -> bool {
        self.run(
            "const e = document.querySelector(arguments[0]); return !!(e && e.offsetParent !== null);",
            json!([css]),
        )
        .await
            == Value::Bool(true)
    }

    /// Waits up to `within` for `check` on the page's text of `css`;
    /// returns the last text seen and whether the check passed.
    pub async fn wait_text(
        &self,
        css: &str,
        within: Duration,
        check: impl Fn(&str) -> bool,
    ) -> (Option<String>, bool) {
        let deadline = Instant::now() + within;
        loop {
            let text = self.text(css).await;
            if text.as_deref().is_some_and(&check) {
                return (text, true);
            }
            if Instant::now() >= deadline {
                return (text, false);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A PNG of the window.
    pub async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine as _;
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await;
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap())
            .unwrap()
    }
}

impl Drop for Browser {
    /// Kills chromedriver's whole process group: Chromium and its helper
    /// processes too, which killing chromedriver alone leaves running
    /// (also when a test panics before it could end the session).
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self._driver.id() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
    }
}
