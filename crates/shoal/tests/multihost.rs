//! Many machines on one: network namespaces joined by a bridge stand for
//! hosts, each running one Shoal role as its own process: two gateways,
//! three `serve`, two workers; PostgreSQL and Redis (this machine's, reached
//! over the bridge through forwarders on the bridge's address) and the
//! payment sandbox stand for the engines. A client that knows both gateway
//! addresses, as with two DNS records, signs up, logs in, reads products
//! and `/me` and checks out while the test
//!
//! (a) cuts one serve host's link (no reset: its packets vanish),
//! (b) SIGKILLs one gateway,
//! (c) cuts a worker off from everything in the middle of a payment job,
//!
//! and then gives the links back. Must hold: no idempotent request fails
//! (the client moves to the other gateway only when a connection fails,
//! never on an HTTP answer); every order is paid with exactly one charge
//! at the sandbox; the cut worker's attempt is refused once its link is
//! back (another worker took over its lease); the cut serve host rejoins
//! the surviving gateway's pool.
//!
//! Needs root (namespaces, veth, bridge) and `ip`; prints a `skipped:`
//! line otherwise, as it does without SHOAL_TEST_POSTGRES_URL and
//! SHOAL_TEST_REDIS_URL. Addresses are in 198.51.100.0/24 (TEST-NET-2),
//! which exist only on this test's bridge; all traffic stays on it.

use serde_json::{json, Value};
use shoal_testkit as kit;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NET: &str = "198.51.100";
const BRIDGE_IP: &str = "198.51.100.1";

fn run(args: &[&str]) -> bool {
    Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn must(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether this process runs as root (effective uid 0).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// The bridge and the namespaces; removed on drop.
struct Net {
    id: u32,
    bridge: String,
    hosts: Vec<String>,
}

impl Net {
    fn create() -> Option<Net> {
        if !is_root() || !run(&["-V"]) {
            println!("skipped: the multi-host test needs root and iproute2 (network namespaces)");
            return None;
        }
        let id = std::process::id() % 100_000;
        let bridge = format!("shb{id}");
        // A bridge left by a run that was killed is removed first.
        run(&["link", "del", &bridge]);
        must(&["link", "add", &bridge, "type", "bridge"]);
        must(&["addr", "add", &format!("{BRIDGE_IP}/24"), "dev", &bridge]);
        must(&["link", "set", &bridge, "up"]);
        Some(Net {
            id,
            bridge,
            hosts: Vec::new(),
        })
    }

    fn ns(&self, tag: &str) -> String {
        format!("shoal{}{tag}", self.id)
    }

    fn veth(&self, tag: &str) -> String {
        format!("sh{}{tag}", self.id % 10_000)
    }

    /// A host `tag` at `198.51.100.<octet>`.
    fn add_host(&mut self, tag: &str, octet: u8) -> String {
        let ns = self.ns(tag);
        let outside = self.veth(tag);
        let inside = format!("{outside}i");
        run(&["netns", "del", &ns]);
        must(&["netns", "add", &ns]);
        self.hosts.push(tag.to_string());
        must(&[
            "link", "add", &outside, "type", "veth", "peer", "name", &inside,
        ]);
        must(&["link", "set", &inside, "netns", &ns]);
        must(&["link", "set", &outside, "master", &self.bridge]);
        must(&["link", "set", &outside, "up"]);
        let exec = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns, "ip"];
            all.extend_from_slice(args);
            must(&all);
        };
        exec(&["link", "set", "lo", "up"]);
        exec(&["addr", "add", &format!("{NET}.{octet}/24"), "dev", &inside]);
        exec(&["link", "set", &inside, "up"]);
        ns
    }

    /// Takes the host's link down (or up again): its packets vanish, no
    /// connection is reset.
    fn link(&self, tag: &str, up: bool) {
        must(&[
            "link",
            "set",
            &self.veth(tag),
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for tag in &self.hosts {
            run(&["netns", "del", &self.ns(tag)]);
        }
        run(&["link", "del", &self.bridge]);
    }
}

/// Forwards `BRIDGE_IP:port` to `127.0.0.1:port`, so hosts on the bridge
/// reach this machine's engines.
async fn forward(port: u16) {
    let listener = tokio::net::TcpListener::bind((BRIDGE_IP, port))
        .await
        .unwrap_or_else(|e| panic!("forwarder on {BRIDGE_IP}:{port}: {e}"));
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
}

/// The Shoal processes of the test, by name; killed on drop.
struct Processes {
    children: HashMap<String, Child>,
    logs: PathBuf,
}

impl Processes {
    fn start(&mut self, name: &str, ns: Option<&str>, args: &[String], env: &[(String, String)]) {
        let log = std::fs::File::create(self.logs.join(format!("{name}.log"))).unwrap();
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_shoal")]);
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_shoal")),
        };
        cmd.args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("SHOAL_INSTANCE", name)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.children
            .insert(name.to_string(), cmd.spawn().expect("spawn shoal"));
    }

    fn kill(&mut self, name: &str) {
        if let Some(mut c) = self.children.remove(name) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.logs.join(format!("{name}.log"))).unwrap_or_default()
    }

    /// Every log line of the processes at warn or error level (the
    /// last 100), for a failure's message.
    fn problems(&self) -> String {
        let mut names: Vec<_> = std::fs::read_dir(&self.logs)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_else(|_| Vec::new());
        names.sort();
        let mut lines = Vec::new();
        for path in names {
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for line in text.lines() {
                let l = line.to_ascii_lowercase();
                if l.contains("warn") || l.contains("error") {
                    lines.push(format!("{name}: {line}"));
                }
            }
        }
        lines[lines.len().saturating_sub(100)..].join("\n")
    }

    fn tails(&self) -> String {
        let mut out = String::new();
        let mut names: Vec<_> = std::fs::read_dir(&self.logs)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_else(|_| Vec::new());
        names.sort();
        for path in names {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(15)..].join("\n");
            out.push_str(&format!("==> {}\n{tail}\n", path.display()));
        }
        out
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, mut c) in self.children.drain() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Seconds since the test began, for the failures and the phases it
/// prints (to place a failure among the faults).
fn at() -> String {
    static T0: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    format!(
        "t={:.2}s",
        T0.get_or_init(Instant::now).elapsed().as_secs_f64()
    )
}

/// What the client saw.
#[derive(Default)]
struct Tally {
    idempotent: AtomicUsize,
    idempotent_failed: AtomicUsize,
    other: AtomicUsize,
    other_failed: AtomicUsize,
    failovers: AtomicUsize,
    failures: Mutex<Vec<String>>,
}

/// A client that knows every gateway address, as with several DNS
/// records: it sends to one and moves to the next only when the
/// connection fails (refused, reset, timed out), never on an HTTP answer.
#[derive(Clone)]
struct Client {
    gateways: Vec<String>,
    http: reqwest::Client,
    next: Arc<AtomicUsize>,
    tally: Arc<Tally>,
}

impl Client {
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        cookie: Option<&str>,
        key: Option<&str>,
        body: Option<&Value>,
    ) -> Option<(u16, reqwest::header::HeaderMap, String)> {
        let idempotent = method == reqwest::Method::GET || key.is_some();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut last = String::new();
        for i in 0..self.gateways.len() * 3 {
            let base = &self.gateways[(start + i) % self.gateways.len()];
            let mut req = self.http.request(method.clone(), format!("{base}{path}"));
            if let Some(c) = cookie {
                req = req.header("cookie", c);
            }
            if let Some(k) = key {
                req = req.header("idempotency-key", k);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            match req.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let headers = r.headers().clone();
                    let text = r.text().await.unwrap_or_default();
                    let counted = if idempotent {
                        (&self.tally.idempotent, &self.tally.idempotent_failed)
                    } else {
                        (&self.tally.other, &self.tally.other_failed)
                    };
                    counted.0.fetch_add(1, Ordering::Relaxed);
                    if status >= 500 {
                        counted.1.fetch_add(1, Ordering::Relaxed);
                        self.tally.failures.lock().unwrap().push(format!(
                            "{} {method} {path} via {base}: {status} {text}",
                            at()
                        ));
                    }
                    return Some((status, headers, text));
                }
                Err(e) => {
                    last = format!("{e:?}");
                    self.tally.failovers.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        let counted = if idempotent {
            &self.tally.idempotent_failed
        } else {
            &self.tally.other_failed
        };
        counted.fetch_add(1, Ordering::Relaxed);
        self.tally
            .failures
            .lock()
            .unwrap()
            .push(format!("{method} {path}: no gateway answered: {last}"));
        None
    }
}

/// One user: signs up, logs in, reads, and every `checkout_every`-th round
/// checks out (an idempotency key, retried with the same key). Returns the
/// ids of the orders placed.
async fn journeys(
    client: Client,
    user: usize,
    product: String,
    stop: Arc<AtomicBool>,
) -> Vec<String> {
    let email = format!("u{user}-{}@example.com", kit::unique_name());
    let creds = json!({"email": email, "password": "correct horse"});
    let post = reqwest::Method::POST;
    let get = reqwest::Method::GET;
    // Sign-up and login are not idempotent by HTTP's rules: a failure here
    // is counted, and the user tries again.
    let cookie = loop {
        if stop.load(Ordering::Relaxed) {
            return Vec::new();
        }
        client
            .send(
                post.clone(),
                "/api/accounts/signup",
                None,
                None,
                Some(&creds),
            )
            .await;
        if let Some((200, headers, _)) = client
            .send(
                post.clone(),
                "/api/accounts/login",
                None,
                None,
                Some(&creds),
            )
            .await
        {
            if let Some(c) = headers.get("set-cookie") {
                break c.to_str().unwrap().split(';').next().unwrap().to_string();
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut orders = Vec::new();
    let mut round = 0usize;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        client
            .send(get.clone(), "/api/accounts/me", Some(&cookie), None, None)
            .await;
        client
            .send(
                get.clone(),
                &format!("/api/catalog/products/{product}"),
                None,
                None,
                None,
            )
            .await;
        client
            .send(
                get.clone(),
                "/api/catalog/products?per_page=5",
                None,
                None,
                None,
            )
            .await;
        if round.is_multiple_of(4) {
            let key = format!("{email}-{round}");
            let body = json!({"items": [{"product_id": product, "quantity": 1}], "payment_method": "pm_card_visa"});
            if let Some((201, _, text)) = client
                .send(
                    post.clone(),
                    "/api/orders",
                    Some(&cookie),
                    Some(&key),
                    Some(&body),
                )
                .await
            {
                let v: Value = serde_json::from_str(&text).unwrap();
                orders.push(v["id"].as_str().unwrap().to_string());
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    orders
}

async fn wait_until<F, Fut>(what: &str, limit: Duration, procs: &Processes, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "{what} within {limit:?}; logs:\n{}",
            procs.tails()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Instances available in the `default` pool of the gateway at `base`.
async fn available(http: &reqwest::Client, base: &str, token: &str) -> Vec<String> {
    let Ok(r) = http
        .get(format!("{base}/_gateway/pools"))
        .bearer_auth(token)
        .send()
        .await
    else {
        return Vec::new();
    };
    let v: Value = r.json().await.unwrap_or(Value::Null);
    v["pools"][0]["instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|i| i["available"] == true)
                .filter_map(|i| i["url"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Whether order `id` is paid, read from the orders table.
async fn is_paid(db: shoal_backends::Database, id: String) -> bool {
    let row: Option<(String,)> = sqlx::query_as("SELECT status FROM orders WHERE id = $1")
        .bind(&id)
        .fetch_optional(db.pool())
        .await
        .unwrap();
    matches!(row, Some((s,)) if s == "paid")
}

async fn charges_for(sandbox: &str, order: &str) -> usize {
    let v: Value = reqwest::get(format!("{sandbox}/_sandbox/charges"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["charges"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|c| c["metadata"]["order_id"] == order)
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shoal_survives_losing_a_host_of_each_role() {
    let (Some(pg), Some(_redis)) = (
        kit::postgres_url("shoal_survives_losing_a_host_of_each_role"),
        kit::redis_url("shoal_survives_losing_a_host_of_each_role"),
    ) else {
        return;
    };
    let Some(mut net) = Net::create() else {
        return;
    };
    println!("{}: setting up", at());
    let dir = kit::TempDir::new("multihost");
    let mut procs = Processes {
        logs: dir.path().join("logs"),
        children: HashMap::new(),
    };
    std::fs::create_dir_all(&procs.logs).unwrap();
    let gw_ips = ["11", "12"];
    let serve_ips = ["21", "22", "23"];
    let worker_ips = ["31", "32"];
    let mut ns = HashMap::new();
    for (tag, ip) in gw_ips
        .iter()
        .map(|i| (format!("g{}", &i[1..]), i))
        .chain(serve_ips.iter().map(|i| (format!("s{}", &i[1..]), i)))
        .chain(worker_ips.iter().map(|i| (format!("w{}", &i[1..]), i)))
    {
        let name = net.add_host(&tag, ip.parse().unwrap());
        ns.insert(tag, name);
    }
    forward(5432).await;
    forward(6379).await;

    // The engines and this run's secrets.
    let local_db = kit::fresh_postgres_database(&pg).await;
    let bridged_db = local_db.replace("127.0.0.1", BRIDGE_IP);
    let redis = format!("redis://{BRIDGE_IP}:6379");
    let prefix = format!("mh{}", &kit::unique_name()[..10]);
    let admin_token = format!("admin-{}", kit::unique_name());
    let sandbox_port = kit::free_port();
    let sandbox = format!("http://{BRIDGE_IP}:{sandbox_port}");
    let secret = |k: &str, v: String| (k.to_string(), v);
    let api_key = format!("sk_test_{}", kit::unique_name());
    let webhook_secret = format!("whsec_{}", kit::unique_name());
    let mut env = vec![
        secret("SHOAL_LOG__LEVEL", "info".into()),
        secret("SHOAL_DATABASE__BACKEND", "postgres".into()),
        secret("SHOAL_DATABASE__URL", bridged_db.clone()),
        secret("SHOAL_SESSIONS__BACKEND", "redis".into()),
        secret("SHOAL_SESSIONS__REDIS_URL", redis.clone()),
        secret("SHOAL_SESSIONS__REDIS_PREFIX", prefix.clone()),
        secret("SHOAL_CACHE__BUS", "redis".into()),
        secret("SHOAL_CACHE__BUS_REDIS_URL", redis.clone()),
        secret("SHOAL_CACHE__REDIS_PREFIX", prefix.clone()),
        secret("SHOAL_PAYMENTS__PROVIDER_URL", sandbox.clone()),
        secret("SHOAL_PAYMENTS__API_KEY", api_key.clone()),
        secret("SHOAL_PAYMENTS__WEBHOOK_SECRET", webhook_secret.clone()),
        secret(
            "SHOAL_CLIENTS__TOKEN",
            format!("svc-{}", kit::unique_name()),
        ),
        secret("SHOAL_PAYMENTS__REQUEST_TIMEOUT_MS", "6000".into()),
        secret("SHOAL_GATEWAY__ADMIN_TOKEN", admin_token.clone()),
        secret(
            "SHOAL_METRICS__TOKEN",
            format!("metrics-{}", kit::unique_name()),
        ),
    ];
    let gateways: Vec<String> = gw_ips
        .iter()
        .map(|i| format!("http://{NET}.{i}:8080"))
        .collect();
    env.push(secret("SHOAL_SERVE__REGISTER_AT", gateways.join(",")));

    // Migrations and products, from this machine.
    for args in [
        vec!["migrate"],
        vec!["seed", "--products", "20", "--stock", "1000000"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(&args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("SHOAL_DATABASE__URL", &local_db)
            .env("SHOAL_DATA_DIR", dir.path().join("seed"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The payment sandbox, on this machine, slow cards taking 3 s.
    procs.start(
        "sandbox",
        None,
        &[
            "sandbox".into(),
            "--listen".into(),
            format!("{BRIDGE_IP}:{sandbox_port}"),
            "--data-dir".into(),
            dir.path().join("sandbox").display().to_string(),
        ],
        &[
            secret("SHOAL_SANDBOX__API_KEY", api_key),
            secret("SHOAL_SANDBOX__WEBHOOK_SECRET", webhook_secret),
            secret("SHOAL_SANDBOX__SLOW_MS", "3000".into()),
            secret("SHOAL_LOG__LEVEL", "warn".into()),
        ],
    );
    // One role on one host: `<role>-<n>` in namespace `<r><n>`, with the
    // common settings, `extra` on top, and a data folder of its own.
    let mut start = |role: &str, n: usize, args: Vec<String>, extra: Vec<(String, String)>| {
        let name = format!("{role}-{n}");
        let mut all = vec![role.to_string()];
        all.extend(args);
        all.push("--data-dir".into());
        all.push(dir.path().join(&name).display().to_string());
        let mut e = env.clone();
        e.extend(extra);
        procs.start(&name, Some(&ns[&format!("{}{n}", &role[..1])]), &all, &e);
    };
    for (i, ip) in gw_ips.iter().enumerate() {
        let args = vec![
            "--registered".into(),
            "--listen".into(),
            format!("{NET}.{ip}:8080"),
        ];
        let extra = vec![
            secret("SHOAL_GATEWAY__HEALTH_INTERVAL_MS", "200".into()),
            secret("SHOAL_GATEWAY__HEALTH_TIMEOUT_MS", "300".into()),
            secret("SHOAL_GATEWAY__CONNECT_TIMEOUT_MS", "300".into()),
            secret("SHOAL_GATEWAY__TRY_TIMEOUT_MS", "1000".into()),
            secret("SHOAL_GATEWAY__REQUEST_TIMEOUT_MS", "8000".into()),
            secret("SHOAL_GATEWAY__RETRY_BUDGET_MIN_PER_SEC", "50".into()),
        ];
        start("gateway", i + 1, args, extra);
    }
    for (i, ip) in serve_ips.iter().enumerate() {
        let args = vec!["--listen".into(), "0.0.0.0:3000".into()];
        let extra = vec![secret(
            "SHOAL_SERVE__ADVERTISE_URL",
            format!("http://{NET}.{ip}:3000"),
        )];
        start("serve", i + 1, args, extra);
    }
    for i in 0..worker_ips.len() {
        let args = vec!["--listen".into(), "0.0.0.0:9091".into()];
        let extra = vec![
            secret("SHOAL_WORKER__LEASE_MS", "2000".into()),
            secret("SHOAL_LOG__LEVEL", "info,shoal_queue=debug".into()),
        ];
        start("worker", i + 1, args, extra);
    }

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for g in &gateways {
        wait_until(
            "every instance registered at both gateways",
            Duration::from_secs(60),
            &procs,
            || {
                let (http, g, t) = (http.clone(), g.clone(), admin_token.clone());
                async move { available(&http, &g, &t).await.len() == 3 }
            },
        )
        .await;
    }
    for ip in worker_ips {
        wait_until("workers ready", Duration::from_secs(30), &procs, || {
            let http = http.clone();
            async move {
                matches!(http.get(format!("http://{NET}.{ip}:9091/readyz")).send().await,
                    Ok(r) if r.status() == 200)
            }
        })
        .await;
    }

    let client = Client {
        gateways: gateways.clone(),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(12))
            .connect_timeout(Duration::from_millis(500))
            .build()
            .unwrap(),
        next: Arc::default(),
        tally: Arc::default(),
    };
    let products: Value = http
        .get(format!("{}/api/catalog/products?per_page=1", gateways[0]))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let list = products.get("products").or_else(|| products.get("items"));
    let product = list
        .and_then(|l| l[0]["id"].as_str())
        .unwrap_or_else(|| panic!("no product in {products}; logs:\n{}", procs.tails()));
    let product = product.to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let users: Vec<_> = (0..4)
        .map(|u| tokio::spawn(journeys(client.clone(), u, product.clone(), stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // (a) One serve host's link is cut: its packets vanish.
    println!("{}: cutting s1's link", at());
    net.link("s1", false);
    let s1 = format!("http://{NET}.21:3000");
    wait_until(
        "the cut host taken out by the gateways",
        Duration::from_secs(15),
        &procs,
        || {
            let (http, g, t, s1) = (
                http.clone(),
                gateways[1].clone(),
                admin_token.clone(),
                s1.clone(),
            );
            async move { !available(&http, &g, &t).await.contains(&s1) }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // (b) One gateway is SIGKILLed.
    println!("{}: SIGKILL gateway-1", at());
    procs.kill("gateway-1");
    tokio::time::sleep(Duration::from_secs(3)).await;

    // (c) A payment whose provider call takes 3 s: the worker running it
    // is cut off once the job runs, so its lease lapses and the other
    // worker takes the job over.
    let login = client
        .send(
            reqwest::Method::POST,
            "/api/accounts/signup",
            None,
            None,
            Some(&json!({"email": "slow@example.com", "password": "correct horse"})),
        )
        .await;
    assert!(matches!(login, Some((201, _, _))), "{login:?}");
    let Some((200, headers, _)) = client
        .send(
            reqwest::Method::POST,
            "/api/accounts/login",
            None,
            None,
            Some(&json!({"email": "slow@example.com", "password": "correct horse"})),
        )
        .await
    else {
        panic!("login failed; logs:\n{}", procs.tails());
    };
    let cookie = headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let body = json!({"items": [{"product_id": product, "quantity": 1}], "payment_method": "pm_card_slow"});
    let answer = client
        .send(
            reqwest::Method::POST,
            "/api/orders",
            Some(&cookie),
            Some("slow-1"),
            Some(&body),
        )
        .await;
    let Some((201, _, text)) = answer else {
        panic!(
            "the slow checkout failed: {answer:?}; logs:\n{}",
            procs.tails()
        );
    };
    let slow_order = serde_json::from_str::<Value>(&text).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let db = shoal_backends::Database::connect(&local_db, 2, Duration::from_secs(5))
        .await
        .unwrap();
    let holder = Arc::new(Mutex::new(String::new()));
    wait_until("the slow payment job running", Duration::from_secs(15), &procs, || {
        let (db, order, holder) = (db.clone(), slow_order.clone(), holder.clone());
        async move {
            let row: Option<(String, Option<String>)> = sqlx::query_as(
                "SELECT state, worker_id FROM shoal_jobs WHERE kind = 'payments.charge' AND payload LIKE $1",
            )
            .bind(format!("%{order}%"))
            .fetch_optional(db.pool())
            .await
            .unwrap();
            match row {
                Some((state, Some(worker))) if state == "running" => {
                    *holder.lock().unwrap() = worker;
                    true
                }
                _ => false,
            }
        }
    })
    .await;
    let holder = holder.lock().unwrap().clone();
    let cut_worker = if holder.starts_with("worker-1") {
        "w1"
    } else {
        "w2"
    };
    let cut_name = if cut_worker == "w1" {
        "worker-1"
    } else {
        "worker-2"
    };
    println!("{}: cutting {cut_worker}'s link", at());
    net.link(cut_worker, false);
    // The other worker takes the job over after the 2 s lease.
    wait_until(
        "the slow order paid by the other worker",
        Duration::from_secs(30),
        &procs,
        || is_paid(db.clone(), slow_order.clone()),
    )
    .await;

    // The links come back: the serve host rejoins the surviving gateway,
    // the cut worker's attempt is refused.
    println!("{}: links back", at());
    net.link("s1", true);
    net.link(cut_worker, true);
    wait_until(
        "the cut host back in the pool",
        Duration::from_secs(30),
        &procs,
        || {
            let (http, g, t, s1) = (
                http.clone(),
                gateways[1].clone(),
                admin_token.clone(),
                s1.clone(),
            );
            async move { available(&http, &g, &t).await.contains(&s1) }
        },
    )
    .await;
    wait_until(
        "the cut worker told its lease is gone",
        Duration::from_secs(30),
        &procs,
        || {
            let text = procs.log(cut_name);
            async move {
                text.contains("lease already gone") || text.contains("job cancelled or lease lost")
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut orders = vec![slow_order.clone()];
    for u in users {
        orders.extend(u.await.unwrap());
    }

    // Every order paid, each charged exactly once.
    for order in &orders {
        wait_until("every order paid", Duration::from_secs(30), &procs, || {
            is_paid(db.clone(), order.clone())
        })
        .await;
        assert_eq!(
            charges_for(&format!("http://{BRIDGE_IP}:{sandbox_port}"), order).await,
            1,
            "order {order}"
        );
    }
    let attempts: (i64, String) = sqlx::query_as(
        "SELECT attempts, worker_id FROM shoal_jobs WHERE kind = 'payments.charge' AND payload LIKE $1",
    )
    .bind(format!("%{slow_order}%"))
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert!(attempts.0 >= 2, "taken over: {attempts:?}");
    assert!(
        !attempts.1.starts_with(&holder),
        "finished by the other worker: {attempts:?} (cut: {holder})"
    );

    let t = &client.tally;
    let failures = t.failures.lock().unwrap().clone();
    println!(
        "multihost: {} idempotent requests, {} failed; {} other, {} failed; {} connection failovers; {} orders",
        t.idempotent.load(Ordering::Relaxed),
        t.idempotent_failed.load(Ordering::Relaxed),
        t.other.load(Ordering::Relaxed),
        t.other_failed.load(Ordering::Relaxed),
        t.failovers.load(Ordering::Relaxed),
        orders.len()
    );
    assert_eq!(
        t.idempotent_failed.load(Ordering::Relaxed),
        0,
        "failed requests: {failures:#?}\nwarnings and errors of the processes:\n{}",
        procs.problems()
    );
    assert!(orders.len() >= 4, "the load placed orders: {orders:?}");
}
