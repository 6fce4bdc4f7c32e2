//! `shoal up`: the supervisor of a whole stack on one machine. It runs
//! migrations, starts the gateway, N `serve` instances and the workers as
//! child processes of this same binary, restarts a child that dies (with
//! backoff; a crash loop stops the stack loudly), prints where things run,
//! and on Ctrl-C / SIGTERM stops front to back (gateway first, so no new
//! request reaches an instance that is going away) within a deadline,
//! leaving no process behind. `<data_dir>/run/stack.json` lists the
//! children (name, pid, address) for operators and tests.

use anyhow::Context as _;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;
use shoal_core::Settings;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Serialize)]
struct ChildView {
    name: String,
    role: &'static str,
    address: Option<SocketAddr>,
    pid: Option<u32>,
    restarts: u32,
    state: &'static str,
    /// How the last run ended (`signal: 9 (SIGKILL)`), for the console.
    last_exit: Option<String>,
    /// The path that answers 200 when the process is ready.
    ready_path: Option<&'static str>,
}

#[derive(Debug, Clone)]
struct ChildSpec {
    name: String,
    role: &'static str,
    args: Vec<String>,
    address: Option<SocketAddr>,
    /// Path answering 200 when the child is ready.
    ready_path: Option<&'static str>,
    /// Settings the supervisor decides (addresses of the other children).
    env: Vec<(String, String)>,
}

type Table = Arc<Mutex<Vec<ChildView>>>;

pub async fn run(
    config: Option<PathBuf>,
    mut settings: Settings,
    shutdown: CancellationToken,
) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(&settings.data_dir)
        .with_context(|| format!("creating data directory {}", settings.data_dir.display()))?;
    settings.data_dir = std::fs::canonicalize(&settings.data_dir)?;
    let data_dir = settings.data_dir.clone();
    let run_dir = data_dir.join("run");
    std::fs::create_dir_all(&run_dir)?;

    // Random secrets for this data directory, made once and reused: the
    // children refuse the development defaults.
    let secrets = crate::secrets::StackSecrets::load_or_create(&data_dir)?;
    let secret_env = secrets.apply(&mut settings);

    println!("shoal: applying migrations");
    // Contracting ones too: every process of the stack runs this binary.
    crate::roles::migrate_all(&settings, true).await?;

    let host = settings.up.host.clone();
    let gateway_addr: SocketAddr = format!("{host}:{}", settings.up.port)
        .parse()
        .with_context(|| format!("invalid up.host `{host}`"))?;
    if let Err(e) = std::net::TcpListener::bind(gateway_addr) {
        anyhow::bail!(
            "cannot listen on {gateway_addr}: {e}. Is another `shoal up` running? \
             Choose another port with --port."
        );
    }

    let mut specs = child_specs(&settings, config.as_deref(), gateway_addr)?;
    for spec in &mut specs {
        spec.env.extend(secret_env.iter().cloned());
    }
    let table: Table = Arc::new(Mutex::new(
        specs
            .iter()
            .map(|s| ChildView {
                name: s.name.clone(),
                role: s.role,
                address: s.address,
                pid: None,
                restarts: 0,
                state: "starting",
                last_exit: None,
                ready_path: s.ready_path,
            })
            .collect(),
    ));
    let state_file = run_dir.join("stack.json");
    let exe = std::env::current_exe().context("locating the shoal binary")?;
    let (gave_up_tx, mut gave_up_rx) = mpsc::channel::<String>(8);
    let logs = Logs::new(pretty_logs(&settings), &specs);

    let mut front = Vec::new();
    let mut back = Vec::new();
    for (index, spec) in specs.iter().enumerate() {
        let stop = CancellationToken::new();
        let task = tokio::spawn(manage_child(
            exe.clone(),
            spec.clone(),
            index,
            table.clone(),
            state_file.clone(),
            settings.clone(),
            stop.clone(),
            gave_up_tx.clone(),
            logs.clone(),
        ));
        if spec.role == "gateway" {
            front.push((stop, task));
        } else {
            back.push((stop, task));
        }
    }
    drop(gave_up_tx);

    // Wait until every child with a readiness path answers, then show where
    // things run; a crash loop or a stop signal ends the wait early.
    let mut gave_up = None;
    tokio::select! {
        ready = wait_ready(&specs, Duration::from_secs(60), &shutdown) => {
            if ready {
                print_table(&table, gateway_addr, &data_dir, &secrets.dir);
            } else if !shutdown.is_cancelled() {
                eprintln!("shoal: not every process became ready within 60 s; see the logs above");
            }
        }
        Some(name) = gave_up_rx.recv() => gave_up = Some(name),
    }
    if gave_up.is_none() {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            Some(name) = gave_up_rx.recv() => gave_up = Some(name),
        }
    }
    let mut exit = ExitCode::SUCCESS;
    match gave_up {
        Some(name) => {
            eprintln!(
                "shoal: {name} keeps crashing (more than {} restarts within {} s); stopping the stack. See its log lines above.",
                settings.up.max_restarts, settings.up.crash_window_secs
            );
            exit = ExitCode::FAILURE;
        }
        None => println!("shoal: stopping (gateway first, then instances and workers)"),
    }

    let deadline = Instant::now() + Duration::from_secs(settings.up.shutdown_timeout_secs);
    for (stop, _) in &front {
        stop.cancel();
    }
    for (_, task) in front {
        let _ = tokio::time::timeout_at(deadline.into(), task).await;
    }
    for (stop, _) in &back {
        stop.cancel();
    }
    for (_, task) in back {
        let _ = tokio::time::timeout_at(deadline.into(), task).await;
    }
    let _ = std::fs::remove_file(&state_file);
    println!("shoal: stopped");
    Ok(exit)
}

fn child_specs(
    settings: &Settings,
    config: Option<&Path>,
    gateway_addr: SocketAddr,
) -> anyhow::Result<Vec<ChildSpec>> {
    let mut common = vec![
        "--data-dir".to_string(),
        settings.data_dir.display().to_string(),
        "--parent-pid".to_string(),
        std::process::id().to_string(),
    ];
    if let Some(c) = config {
        let c = std::fs::canonicalize(c).unwrap_or_else(|_| c.to_path_buf());
        common.push("--config".into());
        common.push(c.display().to_string());
    }
    let mut specs = Vec::new();
    let mut serve_addrs = Vec::new();
    for i in 1..=settings.up.instances {
        let port = shoal_core::ports::loopback_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        serve_addrs.push(addr);
        let name = format!("serve-{i}");
        let mut args = vec![
            "serve".to_string(),
            "--listen".into(),
            addr.to_string(),
            "--instance".into(),
            name.clone(),
        ];
        args.extend(common.iter().cloned());
        specs.push(ChildSpec {
            name,
            role: "serve",
            args,
            address: Some(addr),
            ready_path: Some("/readyz"),
            // Instances join the gateway's pool through its registration
            // API, and leave it when they drain; and the pools of any
            // other gateway `serve.register_at` names (a second gateway
            // in front of the same instances).
            env: vec![(
                "SHOAL_SERVE__REGISTER_AT".into(),
                std::iter::once(format!("http://{gateway_addr}"))
                    .chain(settings.serve.register_at.iter().cloned())
                    .collect::<Vec<_>>()
                    .join(","),
            )],
        });
    }
    for i in 1..=settings.up.workers {
        let name = format!("worker-{i}");
        let port = shoal_core::ports::loopback_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let mut args = vec![
            "worker".to_string(),
            "--instance".into(),
            name.clone(),
            "--listen".into(),
            addr.to_string(),
        ];
        args.extend(common.iter().cloned());
        specs.push(ChildSpec {
            name,
            role: "worker",
            args,
            address: Some(addr),
            ready_path: Some("/readyz"),
            env: Vec::new(),
        });
    }
    let mut args = vec![
        "gateway".to_string(),
        "--listen".into(),
        gateway_addr.to_string(),
    ];
    args.push("--registered".into());
    if settings.gateway.cache.enabled {
        args.push("--cache".into());
    }
    args.extend(common.iter().cloned());
    specs.insert(
        0,
        ChildSpec {
            name: "gateway".into(),
            role: "gateway",
            args,
            address: Some(gateway_addr),
            ready_path: Some("/_gateway/readyz"),
            // A browser's `/` leads to the console (`/_shoal/`).
            env: vec![(
                "SHOAL_GATEWAY__CONSOLE__REDIRECT_ROOT".into(),
                "true".into(),
            )],
        },
    );
    // What every service process must know about the others.
    let mut env = vec![(
        "SHOAL_CLIENTS__CATALOG".to_string(),
        serve_addrs
            .iter()
            .map(|a| format!("http://{a}"))
            .collect::<Vec<_>>()
            .join(","),
    )];
    env.push((
        "SHOAL_CATALOG__PURGE_URLS".into(),
        format!("http://{gateway_addr}/_gateway/admin/purge"),
    ));
    if settings.up.sandbox {
        let port = shoal_core::ports::loopback_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        env.push((
            "SHOAL_PAYMENTS__PROVIDER_URL".into(),
            format!("http://{addr}"),
        ));
        let mut args = vec![
            "sandbox".to_string(),
            "--listen".into(),
            addr.to_string(),
            "--webhook-url".into(),
            format!("http://{gateway_addr}/api/payments/webhooks"),
        ];
        args.extend(common.iter().cloned());
        specs.push(ChildSpec {
            name: "sandbox".into(),
            role: "sandbox",
            args,
            address: Some(addr),
            ready_path: Some("/healthz"),
            env: Vec::new(),
        });
    }
    for spec in specs
        .iter_mut()
        .filter(|s| s.role == "serve" || s.role == "worker")
    {
        spec.env.extend(env.iter().cloned());
    }
    Ok(specs)
}

/// Runs one child until `stop`: restarts it when it exits, with backoff;
/// reports a crash loop on `gave_up`. On stop: SIGTERM, then SIGKILL if it
/// has not exited within its role's shutdown timeout.
#[allow(clippy::too_many_arguments)]
async fn manage_child(
    exe: PathBuf,
    spec: ChildSpec,
    index: usize,
    table: Table,
    state_file: PathBuf,
    settings: Settings,
    stop: CancellationToken,
    gave_up: mpsc::Sender<String>,
    logs: Logs,
) {
    let window = Duration::from_secs(settings.up.crash_window_secs);
    let grace = Duration::from_secs(match spec.role {
        "gateway" => settings.gateway.shutdown_timeout_secs,
        "worker" => settings.worker.shutdown_timeout_secs,
        _ => settings.serve.shutdown_timeout_secs,
    }) + Duration::from_secs(1);
    let mut crashes: Vec<Instant> = Vec::new();
    loop {
        let mut child = match tokio::process::Command::new(&exe)
            .args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            // JSON lines, which `logs` shows as the operator asked.
            .env("SHOAL_LOG__FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(child = %spec.name, error = %e, "cannot start child process");
                let _ = gave_up.send(spec.name.clone()).await;
                return;
            }
        };
        let pid = child.id();
        if let Some(out) = child.stdout.take() {
            tokio::spawn(logs.clone().relay(spec.name.clone(), out));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(logs.clone().relay(spec.name.clone(), err));
        }
        update(&table, &state_file, index, |v| {
            v.pid = pid;
            v.state = "running";
        });
        tracing::info!(child = %spec.name, pid, "child started");
        tokio::select! {
            status = child.wait() => {
                let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                let now = Instant::now();
                crashes.retain(|t| now.duration_since(*t) < window);
                crashes.push(now);
                update(&table, &state_file, index, |v| {
                    v.pid = None;
                    v.state = "restarting";
                    v.restarts += 1;
                    v.last_exit = Some(status.clone());
                });
                tracing::warn!(child = %spec.name, %status, recent_crashes = crashes.len(), "child exited; restarting");
                if crashes.len() as u32 > settings.up.max_restarts {
                    update(&table, &state_file, index, |v| v.state = "failed");
                    let _ = gave_up.send(spec.name.clone()).await;
                    return;
                }
                let backoff = Duration::from_millis(100u64 << crashes.len().min(6)).min(Duration::from_secs(5));
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return,
                }
            }
            _ = stop.cancelled() => {
                if let Some(pid) = pid {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
                }
                update(&table, &state_file, index, |v| v.state = "stopping");
                match tokio::time::timeout(grace, child.wait()).await {
                    Ok(_) => tracing::info!(child = %spec.name, "child stopped"),
                    Err(_) => {
                        tracing::warn!(child = %spec.name, "child did not stop in time; killing it");
                        let _ = child.kill().await;
                    }
                }
                update(&table, &state_file, index, |v| { v.state = "stopped"; v.pid = None; });
                return;
            }
        }
    }
}

/// Changes child `index` and writes the whole table to `state_file`.
/// The write happens under the table's lock: children are managed by
/// tasks on several threads, and two updates writing outside it could
/// land in the wrong order (the older table last, left there until the
/// next change) or interleave in the shared temporary file. A run of CI
/// saw exactly that: stack.json kept `worker-1` "starting" while it ran.
fn update(table: &Table, state_file: &Path, index: usize, f: impl FnOnce(&mut ChildView)) {
    let mut t = table.lock().expect("table lock");
    f(&mut t[index]);
    if let Ok(json) = serde_json::to_vec_pretty(&serde_json::json!({
        "supervisor_pid": std::process::id(),
        "children": &*t,
    })) {
        let tmp = state_file.with_extension("json.tmp");
        if std::fs::write(&tmp, json).is_ok() {
            let _ = std::fs::rename(&tmp, state_file);
        }
    }
}

async fn wait_ready(specs: &[ChildSpec], limit: Duration, shutdown: &CancellationToken) -> bool {
    let started = Instant::now();
    for spec in specs {
        let (Some(addr), Some(path)) = (spec.address, spec.ready_path) else {
            continue;
        };
        loop {
            if shutdown.is_cancelled() || started.elapsed() > limit {
                return false;
            }
            if http_status(addr, path).await == Some(200) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Ready through the gateway too: an instance has registered.
    if let Some(gateway) = specs.iter().find(|s| s.role == "gateway") {
        if let Some(addr) = gateway.address {
            while http_status(addr, "/readyz").await != Some(200) {
                if shutdown.is_cancelled() || started.elapsed() > limit {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    true
}

/// A minimal HTTP/1.1 GET that returns the status code, for readiness.
async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).await.ok()?;
        let line = std::str::from_utf8(&buf[..n]).ok()?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    tokio::time::timeout(Duration::from_secs(1), attempt)
        .await
        .ok()
        .flatten()
}

fn print_table(table: &Table, gateway: SocketAddr, data_dir: &Path, secrets: &Path) {
    let rows = table.lock().expect("table lock").clone();
    let mut out = String::new();
    out.push_str(&format!(
"\nShoal is up at http://{gateway}/\n  console: http://{gateway}/_shoal/ (log in with the admin token: {}/admin-token)\n\n",
        secrets.display()
    ));
    out.push_str(&format!(
        "  {:<10} {:<22} {:>8}\n",
        "PROCESS", "ADDRESS", "PID"
    ));
    for r in &rows {
        out.push_str(&format!(
            "  {:<10} {:<22} {:>8}\n",
            r.name,
            r.address
                .map(|a| a.to_string())
                .unwrap_or_else(|| "-".into()),
            r.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
        ));
    }
    out.push_str(&format!(
        "\n  data:    {}\n  secrets: {} (admin token, metrics token, payment keys, service token; owner only)\n  try:     curl -X POST http://{gateway}/api/accounts/signup -H 'content-type: application/json' -d '{{\"email\":\"ada@example.com\",\"password\":\"correct horse\"}}'\n  pools:   curl -H \"Authorization: Bearer $(cat {}/admin-token)\" http://{gateway}/_gateway/pools\n  stop:    Ctrl-C\n",
        data_dir.display(),
        secrets.display(),
        secrets.display(),
    ));
    println!("{out}");
}

/// Whether `shoal up` shows its processes' logs as readable lines
/// (`up.logs`: `pretty`, or `auto` on a terminal) rather than JSON.
pub fn pretty_logs(settings: &Settings) -> bool {
    use std::io::IsTerminal;
    match settings.up.logs.as_str() {
        "pretty" => true,
        "json" => false,
        _ => std::io::stdout().is_terminal(),
    }
}

/// The children's log lines, relayed onto this process's stdout one whole
/// line at a time, as PM2 does: readable with the process's name in front,
/// or JSON with a `process` field.
#[derive(Clone)]
struct Logs {
    pretty: bool,
    color: bool,
    /// Width of the widest process name, for aligned prefixes.
    width: usize,
    out: Arc<tokio::sync::Mutex<tokio::io::Stdout>>,
}

const COLORS: [&str; 6] = ["36", "33", "32", "35", "34", "31"];

impl Logs {
    fn new(pretty: bool, specs: &[ChildSpec]) -> Logs {
        use std::io::IsTerminal;
        Logs {
            pretty,
            color: pretty && std::io::stdout().is_terminal(),
            width: specs.iter().map(|s| s.name.len()).max().unwrap_or(8),
            out: Arc::new(tokio::sync::Mutex::new(tokio::io::stdout())),
        }
    }

    /// Reads `from` line by line until it closes, writing each out.
    async fn relay(self, name: String, from: impl tokio::io::AsyncRead + Unpin) {
        let color = COLORS[name.bytes().map(usize::from).sum::<usize>() % COLORS.len()];
        let mut from = tokio::io::BufReader::new(from);
        // Once our stdout is gone (`shoal up | head`), lines are still
        // read and dropped: a child whose pipe filled would stop in its
        // next log write. So are lines that are not UTF-8 (shown lossily)
        // or longer than MAX_LINE (cut there).
        let mut writable = true;
        let mut raw = Vec::new();
        while read_line_capped(&mut from, &mut raw, MAX_LINE).await {
            if !writable {
                continue;
            }
            let line = String::from_utf8_lossy(&raw);
            let mut text = if self.pretty {
                pretty_line(&name, self.width, self.color.then_some(color), &line)
            } else {
                json_line(&name, &line)
            };
            text.push('\n');
            let mut out = self.out.lock().await;
            writable = out.write_all(text.as_bytes()).await.is_ok() && out.flush().await.is_ok();
        }
    }
}

/// The longest line of a child's output relayed; the rest of a longer
/// line is dropped.
const MAX_LINE: usize = 64 * 1024;

/// Reads one line (without its `\n`) into `line`, keeping at most `max`
/// bytes of it and reading past the rest; false at the end of `from` (or
/// on a read error) with nothing read.
async fn read_line_capped(
    from: &mut (impl tokio::io::AsyncBufRead + Unpin),
    line: &mut Vec<u8>,
    max: usize,
) -> bool {
    use tokio::io::AsyncBufReadExt;
    line.clear();
    let mut any = false;
    loop {
        let buf = match from.fill_buf().await {
            Ok(b) if !b.is_empty() => b,
            _ => return any,
        };
        any = true;
        let (part, used, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (&buf[..i], i + 1, true),
            None => (buf, buf.len(), false),
        };
        let room = max.saturating_sub(line.len());
        line.extend_from_slice(&part[..part.len().min(room)]);
        from.consume(used);
        if done {
            return true;
        }
    }
}

/// A child's JSON line with `"process": name` first; a line that is not
/// a JSON object (a panic's message) becomes the `message` of one.
fn json_line(name: &str, line: &str) -> String {
    let process = serde_json::to_string(name).unwrap_or_default();
    match line.strip_prefix('{') {
        Some(rest) if line.ends_with('}') => format!("{{\"process\":{process},{rest}"),
        _ => serde_json::json!({"process": name, "message": line}).to_string(),
    }
}

/// `12:00:01.234 serve-1  INFO message key=value ...` from a JSON line.
fn pretty_line(name: &str, width: usize, color: Option<&str>, line: &str) -> String {
    let paint = |code: &str, text: &str| match color {
        Some(_) => format!("\x1b[{code}m{text}\x1b[0m"),
        None => text.to_string(),
    };
    let prefix = paint(color.unwrap_or(""), &format!("{name:<width$}"));
    let Ok(serde_json::Value::Object(mut fields)) = serde_json::from_str::<serde_json::Value>(line)
    else {
        return format!("{prefix} | {line}");
    };
    let time = fields
        .remove("timestamp")
        .and_then(|t| t.as_str().and_then(|t| t.get(11..23)).map(str::to_string))
        .unwrap_or_default();
    let level = fields
        .remove("level")
        .and_then(|l| l.as_str().map(str::to_string))
        .unwrap_or_default();
    let level = match level.as_str() {
        "ERROR" => paint("31;1", "ERROR"),
        "WARN" => paint("33", " WARN"),
        "INFO" => paint("32", " INFO"),
        other => format!("{other:>5}"),
    };
    let message = fields
        .remove("message")
        .map(|m| m.as_str().map_or_else(|| m.to_string(), str::to_string))
        .unwrap_or_default();
    fields.remove("target");
    let mut out = format!("{time} {prefix} {level} {message}");
    for (k, v) in fields {
        let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
        out.push_str(&format!(" {}", paint("2", &format!("{k}={v}"))));
    }
    out
}

#[cfg(test)]
mod log_tests {
    use super::*;

    #[test]
    fn json_lines_gain_the_process_and_other_lines_are_wrapped() {
        assert_eq!(
            json_line("serve-1", r#"{"level":"INFO","message":"hi"}"#),
            r#"{"process":"serve-1","level":"INFO","message":"hi"}"#
        );
        let wrapped: serde_json::Value =
            serde_json::from_str(&json_line("worker-1", "thread 'main' panicked")).unwrap();
        assert_eq!(wrapped["process"], "worker-1");
        assert_eq!(wrapped["message"], "thread 'main' panicked");
    }

    #[test]
    fn pretty_lines_read_as_a_person_would() {
        let line = r#"{"timestamp":"2026-12-06T23:03:05.992628Z","level":"WARN","message":"child exited","child":"serve-2","target":"shoal::up"}"#;
        assert_eq!(
            pretty_line("gateway", 8, None, line),
            "23:03:05.992 gateway   WARN child exited child=serve-2"
        );
        assert_eq!(
            pretty_line("serve-1", 7, None, "not json"),
            "serve-1 | not json"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::read_line_capped;

    #[test]
    fn instances_register_at_the_stack_gateway_and_any_other_listed() {
        let gateway: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let register_at = |settings: &shoal_core::settings::Settings| -> Vec<String> {
            super::child_specs(settings, None, gateway)
                .unwrap()
                .into_iter()
                .filter(|c| c.role == "serve")
                .map(|c| {
                    c.env
                        .iter()
                        .find(|(k, _)| k == "SHOAL_SERVE__REGISTER_AT")
                        .map(|(_, v)| v.clone())
                        .expect("every instance registers")
                })
                .collect()
        };
        let mut settings = shoal_core::settings::Settings::default();
        settings.up.instances = 2;
        assert_eq!(register_at(&settings), ["http://127.0.0.1:8080"; 2]);
        settings.serve.register_at = vec!["http://127.0.0.1:9090".into()];
        assert_eq!(
            register_at(&settings),
            ["http://127.0.0.1:8080,http://127.0.0.1:9090"; 2]
        );
    }

    #[tokio::test]
    async fn long_and_non_utf8_lines_are_cut_not_the_end_of_the_relay() {
        let mut input = Vec::new();
        input.extend_from_slice(b"short\n");
        input.extend(std::iter::repeat_n(b'x', 100));
        input.extend_from_slice(b"\n\xff\xfe bad\nlast without newline");
        let mut from = tokio::io::BufReader::with_capacity(16, &input[..]);
        let mut line = Vec::new();
        let mut lines = Vec::new();
        while read_line_capped(&mut from, &mut line, 10).await {
            lines.push(line.clone());
        }
        assert_eq!(
            lines,
            [
                b"short".to_vec(),
                b"xxxxxxxxxx".to_vec(),
                b"\xff\xfe bad".to_vec(),
                b"last witho".to_vec()
            ]
        );
    }
}
