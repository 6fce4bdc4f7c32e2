//! The console's live feed. Once a second a sampler reads the gateway's
//! counters (`stats.rs`), its pools, the process table `shoal up` keeps
//! (with a readiness probe of each process) and the cache; another task
//! asks a worker for the queues (every 2 s while a console watches, every
//! 10 s otherwise) and, while one watches, each instance for its open
//! streams. Each sample is
//! kept for 15 minutes (the charts' history) and the whole state is sent
//! as one `snapshot` event to every open console, by Server-Sent Events;
//! transitions (an instance or process going down or up, a restart) are
//! kept as events. The feed itself costs the same whether anyone
//! watches: one JSON text a second, shared by all subscribers.

use super::stats::{Reading, Window};
use crate::body::{Body, BoxError};
use crate::proxy::GatewayState;
use crate::reload::Shared;
use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{Method, Response, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Samples kept: one a second for 15 minutes.
const HISTORY: usize = 900;
/// Events kept.
const EVENTS: usize = 50;
/// Instances kept in each sample for the charts by instance (which draw
/// eight): the history stays a few MiB however large the pools.
const CHART_INSTANCES: usize = 16;
/// How long a readiness probe of a process may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// One second of the gateway, as the charts draw it.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub at: u64,
    pub rps: f64,
    pub errors_per_sec: f64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub in_flight: usize,
    pub connections: usize,
    pub queue_depth: Option<i64>,
    pub jobs_per_sec: Option<f64>,
    /// Each instance's second, for the charts by instance.
    pub instances: Vec<InstanceSample>,
}

/// One second of one instance, as the charts by instance draw it.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceSample {
    /// `<pool> <url>`: the same in every sample.
    pub id: String,
    /// The process that `shoal up` runs there, else the URL.
    pub label: String,
    pub rps: f64,
    pub errors_per_sec: f64,
    pub p99_ms: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
struct Event {
    at: u64,
    level: &'static str,
    text: String,
}

/// The console's state, shared by every settings generation.
pub struct Console {
    started: Instant,
    /// Tells this gateway apart when a peer URL leads back to it.
    id: String,
    /// The host it runs on (a Kubernetes pod's name), for the gateways
    /// table.
    host: String,
    listen: OnceLock<SocketAddr>,
    connections: OnceLock<Arc<crate::listener::Connections>>,
    inner: Mutex<Inner>,
    /// The latest `snapshot` event, ready to send.
    feed: watch::Sender<Bytes>,
}

#[derive(Default)]
struct Inner {
    history: VecDeque<Sample>,
    events: VecDeque<Event>,
    /// The last answer about the queues, with rates filled in.
    queues: Value,
    /// Workers listed by the process table, for the queue requests.
    stack_workers: Vec<String>,
    /// Open realtime streams by instance URL, from each instance's
    /// `/_shoal/stats` (absent: not a Shoal instance, or no answer).
    streams: HashMap<String, u64>,
    /// Each worker's own figures by its URL (`/_shoal/worker`, with
    /// rates from the change since the last answer), while a console
    /// watches.
    workers: HashMap<String, Value>,
    /// The other gateways (`gateway.console.peers`, names resolved), each
    /// its `/_shoal/gateway` answer or why there is none, while a console
    /// watches.
    peers: Vec<Value>,
    /// This gateway's figures of the last sample, for its peers.
    own: Value,
}

impl Default for Console {
    fn default() -> Self {
        let id = shoal_core::ids::new_id();
        Console {
            started: Instant::now(),
            id: id.clone(),
            host: std::env::var("HOSTNAME")
                .ok()
                .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "gateway".into()),
            listen: OnceLock::new(),
            connections: OnceLock::new(),
            inner: Mutex::new(Inner {
                queues: json!({"available": false, "error": "not asked yet", "queues": [], "cron": []}),
                // The id from the start, figures from the first sample on:
                // a peer URL that leads back here before that is still
                // recognised as this gateway, not shown as a down peer.
                own: json!({ "id": id }),
                ..Inner::default()
            }),
            feed: watch::channel(Bytes::new()).0,
        }
    }
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

impl Console {
    /// What the sampler reads that only `Gateway::run` knows.
    pub(crate) fn attach(
        &self,
        listen: SocketAddr,
        connections: Arc<crate::listener::Connections>,
    ) {
        let _ = self.listen.set(listen);
        let _ = self.connections.set(connections);
    }

    /// `GET /_shoal/gateway`: this gateway's figures of the last second,
    /// for the consoles of its peers.
    pub(crate) fn own(&self) -> Value {
        self.inner.lock().expect("console lock").own.clone()
    }

    fn event(&self, level: &'static str, text: String) {
        match level {
            "info" => tracing::info!(target: "shoal_gateway::console", "{text}"),
            _ => tracing::warn!(target: "shoal_gateway::console", "{text}"),
        }
        let mut inner = self.inner.lock().expect("console lock");
        inner.events.push_front(Event {
            at: now_ms(),
            level,
            text,
        });
        inner.events.truncate(EVENTS);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `GET /_shoal/api/live`: the history, then a snapshot a second.
pub(crate) fn subscribe(shared: &Shared) -> Response<Body> {
    let console = &shared.console;
    let history = {
        let inner = console.inner.lock().expect("console lock");
        let samples: Vec<&Sample> = inner.history.iter().collect();
        sse(
            "history",
            &serde_json::to_vec(&json!({ "samples": samples })).unwrap_or_default(),
        )
    };
    let mut rx = console.feed.subscribe();
    let first = rx.borrow_and_update().clone();
    let start = futures_util::stream::iter(
        [history, first]
            .into_iter()
            .filter(|b| !b.is_empty())
            .map(|b| Ok::<_, BoxError>(Frame::data(b))),
    );
    let rest = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.changed().await.ok()?;
        let frame = rx.borrow_and_update().clone();
        Some((Ok::<_, BoxError>(Frame::data(frame)), rx))
    });
    use futures_util::StreamExt;
    let body = http_body_util::StreamBody::new(start.chain(rest)).boxed_unsync();
    let mut r = Response::new(body);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn sse(event: &str, data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + 32);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    out.extend_from_slice(data);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// The workers to ask about the queues: configured, or from the process
/// table.
pub(crate) fn worker_urls(shared: &Shared, state: &GatewayState) -> Vec<String> {
    if !state.settings.console.workers.is_empty() {
        return state.settings.console.workers.clone();
    }
    shared
        .console
        .inner
        .lock()
        .expect("console lock")
        .stack_workers
        .clone()
}

// ---- the sampler ------------------------------------------------------

/// A process as `shoal up` lists it in `stack.json`.
#[derive(Debug, Clone, serde::Deserialize)]
struct Child {
    name: String,
    role: String,
    address: Option<SocketAddr>,
    pid: Option<u32>,
    #[serde(default)]
    restarts: u32,
    state: String,
    #[serde(default)]
    last_exit: Option<String>,
    /// Where it answers 200 when ready; none: running counts as ready.
    #[serde(default)]
    ready_path: Option<String>,
}

#[derive(serde::Deserialize)]
struct StackFile {
    children: Vec<Child>,
}

/// What the sampler remembers between two samples.
#[derive(Default)]
struct Previous {
    at: Option<Instant>,
    gateway: Reading,
    instances: HashMap<(String, String), Reading>,
    instance_states: HashMap<(String, String), &'static str>,
    processes: HashMap<String, (String, u32)>,
}

/// Samples once a second until `stop`.
pub async fn run(shared: Arc<Shared>, stop: CancellationToken) {
    tokio::spawn(queues_loop(Arc::clone(&shared), stop.clone()));
    let mut previous = Previous::default();
    let mut tick = ticks(Duration::from_secs(1));
    while let Some(state) = next_tick(&mut tick, &shared, &stop).await {
        let snapshot = sample(&shared, &state, &mut previous).await;
        shared.console.feed.send_replace(sse(
            "snapshot",
            &serde_json::to_vec(&snapshot).unwrap_or_default(),
        ));
    }
}

/// A timer that, late, waits a whole period again rather than catching up.
fn ticks(period: Duration) -> tokio::time::Interval {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// The settings at the next tick while the console is on; `None` once
/// `stop` is cancelled.
async fn next_tick(
    tick: &mut tokio::time::Interval,
    shared: &Shared,
    stop: &CancellationToken,
) -> Option<Arc<GatewayState>> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tick.tick() => {}
        }
        let state = shared.load();
        if state.settings.console.enabled {
            return Some(state);
        }
    }
}

fn per_sec(n: u64, secs: f64) -> f64 {
    ((n as f64 / secs) * 10.0).round() / 10.0
}

fn window_json(w: &Window, secs: f64) -> Value {
    json!({
        "rps": per_sec(w.requests, secs),
        "errors_per_sec": per_sec(w.errors, secs),
        "p50_ms": w.p50_ms,
        "p99_ms": w.p99_ms,
    })
}

async fn sample(shared: &Shared, state: &GatewayState, prev: &mut Previous) -> Value {
    let console = &shared.console;
    let now = Instant::now();
    let secs = prev
        .at
        .map_or(1.0, |t| now.duration_since(t).as_secs_f64())
        .max(0.001);
    prev.at = Some(now);

    let processes = read_processes(state, console).await;
    let process_by_addr: HashMap<String, String> = processes
        .iter()
        .filter_map(|(c, _)| Some((format!("http://{}", c.address?), c.name.clone())))
        .collect();

    let reading = super::stats::GATEWAY.read();
    let gateway = reading.since(&prev.gateway);
    prev.gateway = reading;

    let mut in_flight = 0;
    let mut pools = Vec::new();
    let mut instance_samples = Vec::new();
    let mut seen = HashMap::new();
    for pool in &state.pools {
        let mut instances = Vec::new();
        for instance in pool.instances().iter() {
            let key = (pool.name.clone(), instance.url.clone());
            let reading = instance.live.read();
            let window = prev
                .instances
                .get(&key)
                .map_or_else(Window::default, |p| reading.since(p));
            let mut v = instance.status_json(now);
            let state_name = instance_state(&v);
            in_flight += instance.in_flight();
            let process = process_by_addr
                .get(instance.url.trim_end_matches('/'))
                .cloned();
            if let Some(old) = prev.instance_states.get(&key) {
                if *old != state_name {
                    let who = process.as_deref().unwrap_or(&instance.url);
                    console.event(
                        if state_name == "up" { "info" } else { "warn" },
                        format!(
                            "instance {who} ({}) is {state_name} (was {old})",
                            instance.url
                        ),
                    );
                }
            }
            let streams = console
                .inner
                .lock()
                .expect("console lock")
                .streams
                .get(&instance.url)
                .copied();
            if let Value::Object(map) = &mut v {
                map.insert("state".into(), state_name.into());
                map.insert("streams".into(), json!(streams));
                map.insert("process".into(), json!(process));
                if let Value::Object(w) = window_json(&window, secs) {
                    map.extend(w);
                }
            }
            if instance_samples.len() < CHART_INSTANCES {
                instance_samples.push(InstanceSample {
                    id: format!("{} {}", pool.name, instance.url),
                    label: process.clone().unwrap_or_else(|| instance.url.clone()),
                    rps: per_sec(window.requests, secs),
                    errors_per_sec: per_sec(window.errors, secs),
                    p99_ms: window.p99_ms,
                });
            }
            seen.insert(key.clone(), state_name);
            prev.instances.insert(key, reading);
            instances.push(v);
        }
        pools.push(json!({
            "name": pool.name,
            "balancer": pool.balancer.name(),
            "available": instances.iter().filter(|i| i["state"] == "up").count(),
            "instances": instances,
        }));
    }
    prev.instances.retain(|k, _| seen.contains_key(k));
    prev.instance_states = seen;

    let worker_figures = console.inner.lock().expect("console lock").workers.clone();
    let mut process_views = Vec::new();
    // Each worker: those of the process table, then any other that
    // answered (`gateway.console.workers`), by URL.
    let mut worker_views = Vec::new();
    let mut current = HashMap::new();
    for (child, ready) in &processes {
        let mut shown = process_state(child, *ready);
        if let Some((old_state, old_restarts)) = prev.processes.get(&child.name) {
            if child.restarts > *old_restarts {
                // It was down within this second, however soon it came
                // back: say so once.
                shown = "down";
                console.event(
                    "warn",
                    format!(
                        "{} went down ({}); the supervisor restarted it",
                        child.name,
                        child.last_exit.as_deref().unwrap_or("exited")
                    ),
                );
            } else if old_state != shown {
                console.event(
                    if shown == "up" { "info" } else { "warn" },
                    format!("{} is {shown} (was {old_state})", child.name),
                );
            }
        }
        current.insert(
            child.name.clone(),
            (process_state(child, *ready).to_string(), child.restarts),
        );
        if let ("worker", Some(addr)) = (child.role.as_str(), child.address) {
            let url = format!("http://{addr}");
            let jobs = (shown == "up")
                .then(|| worker_figures.get(&url).cloned())
                .flatten();
            worker_views
                .push(json!({"name": child.name, "url": url, "state": shown, "jobs": jobs}));
        }
        process_views.push(json!({
            "name": child.name,
            "role": child.role,
            "pid": child.pid,
            "state": shown,
            "restarts": child.restarts,
            "address": child.address,
            "last_exit": child.last_exit,
        }));
    }
    prev.processes = current;
    let mut others: Vec<(&String, &Value)> = worker_figures
        .iter()
        .filter(|(url, _)| !process_by_addr.contains_key(*url))
        .collect();
    others.sort_by(|a, b| a.0.cmp(b.0));
    for (url, jobs) in others {
        // Up when it answered its last ask, down when it did not.
        let state = if jobs.is_object() { "up" } else { "down" };
        worker_views.push(json!({"name": url, "url": url, "state": state, "jobs": jobs}));
    }

    let cache = match &state.cache {
        None => json!({"enabled": false}),
        Some(c) => {
            let mut v = c.stats();
            let hits = crate::cache::HITS.load(std::sync::atomic::Ordering::Relaxed);
            let misses = crate::cache::MISSES.load(std::sync::atomic::Ordering::Relaxed);
            v["hits"] = hits.into();
            v["misses"] = misses.into();
            v["hit_ratio"] = if hits + misses == 0 {
                Value::Null
            } else {
                json!(((hits as f64 / (hits + misses) as f64) * 1000.0).round() / 1000.0)
            };
            v
        }
    };

    let connections = console.connections.get().map_or(0, |c| c.open());
    let mut inner = console.inner.lock().expect("console lock");
    let queues = inner.queues.clone();
    let queue_depth = queues["queues"]
        .as_array()
        .filter(|_| queues["available"] == true)
        .map(|qs| qs.iter().filter_map(|q| q["depth"].as_i64()).sum());
    let jobs_per_sec = queues["queues"]
        .as_array()
        .filter(|_| queues["available"] == true)
        .map(|qs| {
            qs.iter()
                .filter_map(|q| q["completed_per_sec"].as_f64())
                .sum()
        });
    let sample = Sample {
        at: now_ms(),
        rps: per_sec(gateway.requests, secs),
        errors_per_sec: per_sec(gateway.errors, secs),
        p50_ms: gateway.p50_ms,
        p99_ms: gateway.p99_ms,
        in_flight,
        connections,
        queue_depth,
        jobs_per_sec,
        instances: instance_samples,
    };
    inner.history.push_back(sample.clone());
    while inner.history.len() > HISTORY {
        inner.history.pop_front();
    }
    let own = json!({
        "id": console.id,
        "host": console.host,
        "listen": console.listen.get(),
        "draining": state.draining.load(std::sync::atomic::Ordering::Relaxed),
        "connections": connections,
        "rps": sample.rps,
        "errors_per_sec": sample.errors_per_sec,
        "p50_ms": sample.p50_ms,
        "p99_ms": sample.p99_ms,
        "in_flight": in_flight,
        "uptime_secs": console.started.elapsed().as_secs(),
        "instances_available": pools.iter().filter_map(|p| p["available"].as_u64()).sum::<u64>(),
        "instances": pools.iter().filter_map(|p| p["instances"].as_array().map(Vec::len)).sum::<usize>(),
    });
    inner.own = own.clone();
    // This gateway first, then each peer (not this one again when a
    // peer's name leads back here).
    let own_state = if own["draining"] == true {
        "draining"
    } else {
        "up"
    };
    let mut gateways = vec![json!({"url": null, "this": true, "state": own_state, "figures": own})];
    gateways.extend(
        inner
            .peers
            .iter()
            .filter(|p| p["figures"]["id"] != console.id.as_str())
            .cloned(),
    );
    json!({
        "at": sample.at,
        "sample": sample,
        "gateway": own,
        "gateways": gateways,
        "pools": pools,
        "processes": process_views,
        "workers": worker_views,
        "cache": cache,
        "queues": queues,
        "events": inner.events,
    })
}

fn instance_state(status: &Value) -> &'static str {
    if status["admin_ejected"] == true || status["ejected"] == true {
        "ejected"
    } else if status["admin_draining"] == true && status["in_flight"] == 0 {
        // Drained by an operator, and nothing is left in flight: safe to
        // stop.
        "drained"
    } else if status["admin_draining"] == true || status["draining"] == true {
        "draining"
    } else if status["available"] == true {
        "up"
    } else {
        "down"
    }
}

fn process_state(child: &Child, ready: bool) -> &'static str {
    match child.state.as_str() {
        "running" if ready => "up",
        "running" => "down",
        "starting" => "starting",
        "stopping" => "stopping",
        "failed" => "failed",
        _ => "down",
    }
}

/// The process table, each with whether it answers its readiness path
/// now (the gateway itself: yes).
async fn read_processes(state: &GatewayState, console: &Console) -> Vec<(Child, bool)> {
    let path = &state.settings.console.stack_file;
    if path.is_empty() {
        return Vec::new();
    }
    let children = match tokio::fs::read(path).await {
        Ok(bytes) => match serde_json::from_slice::<StackFile>(&bytes) {
            Ok(f) => f.children,
            Err(e) => {
                tracing::debug!(error = %e, path, "stack file unreadable");
                return Vec::new();
            }
        },
        Err(_) => return Vec::new(),
    };
    console.inner.lock().expect("console lock").stack_workers = children
        .iter()
        .filter(|c| c.role == "worker" && c.state == "running")
        .filter_map(|c| Some(format!("http://{}", c.address?)))
        .collect();
    let listen = console.listen.get().copied();
    let probes = children.into_iter().map(|child| async move {
        let ready = match (child.address, child.ready_path.as_deref()) {
            _ if child.state != "running" => false,
            (Some(addr), _) if Some(addr) == listen => true,
            (Some(addr), Some(path)) => probe(state, addr, path).await,
            _ => true,
        };
        (child, ready)
    });
    futures_util::future::join_all(probes).await
}

async fn probe(state: &GatewayState, addr: SocketAddr, path: &str) -> bool {
    let Ok(uri) = format!("http://{addr}{path}").parse::<http::Uri>() else {
        return false;
    };
    let mut req = http::Request::new(crate::body::empty());
    *req.uri_mut() = uri;
    let attempt = async {
        let r = state.client.http1.request(req).await.ok()?;
        let ok = r.status().is_success();
        let _ = http_body_util::Limited::new(r.into_body(), 64 * 1024)
            .collect()
            .await;
        Some(ok)
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, attempt).await,
        Ok(Some(true))
    )
}

/// Each instance's open streams (while a console watches), and the
/// queues from the first worker that answers, with per-queue rates from
/// the change since the last answer.
async fn queues_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut last: Option<(Instant, HashMap<String, Value>)> = None;
    let mut last_workers: HashMap<String, (Instant, Value)> = HashMap::new();
    let mut tick = ticks(Duration::from_secs(2));
    let mut quiet_ticks = 0u32;
    while let Some(state) = next_tick(&mut tick, &shared, &stop).await {
        // Every 2 s while a console watches; every 10 s otherwise, for
        // the history of the queue-depth chart (a worker's `stats()` is a
        // grouped query on SQL, a scan on NATS).
        let watched = shared.console.feed.receiver_count() > 0;
        quiet_ticks = if watched { 0 } else { quiet_ticks + 1 };
        if !watched && quiet_ticks % 5 != 1 {
            continue;
        }
        // Instances are asked only while a console watches: a gateway in
        // front of servers that are not Shoal's sends them nothing of its
        // own otherwise.
        let streams = if watched {
            instance_streams(&state).await
        } else {
            HashMap::new()
        };
        shared.console.inner.lock().expect("console lock").streams = streams;
        let workers = worker_urls(&shared, &state);
        let figures = if watched {
            worker_figures(&state, &workers, &mut last_workers).await
        } else {
            last_workers.clear();
            HashMap::new()
        };
        shared.console.inner.lock().expect("console lock").workers = figures;
        let peers = if watched {
            peer_figures(&state).await
        } else {
            Vec::new()
        };
        shared.console.inner.lock().expect("console lock").peers = peers;
        let mut answer = Err(
            "no worker to ask: set gateway.console.workers (or run under `shoal up`)".to_string(),
        );
        for base in &workers {
            match super::internal_request(
                &state,
                base,
                &Method::GET,
                "/_shoal/queues",
                Bytes::new(),
            )
            .await
            {
                Ok((StatusCode::OK, _, body)) => match serde_json::from_slice::<Value>(&body) {
                    Ok(v) => {
                        answer = Ok(v);
                        break;
                    }
                    Err(e) => answer = Err(format!("{base}: not JSON: {e}")),
                },
                Ok((status, _, body)) => {
                    answer = Err(format!(
                        "{base}: {status}: {}",
                        String::from_utf8_lossy(&body)
                    ))
                }
                Err(e) => answer = Err(format!("{base}: {e}")),
            }
        }
        let now = Instant::now();
        let view = match answer {
            Err(error) => {
                last = None;
                json!({"available": false, "error": error, "queues": [], "cron": []})
            }
            Ok(mut v) => {
                let mut by_name = HashMap::new();
                if let Some(queues) = v["queues"].as_array_mut() {
                    for q in queues.iter_mut() {
                        let name = q["queue"].as_str().unwrap_or_default().to_string();
                        let rates = last.as_ref().and_then(|(at, old)| {
                            let old = old.get(&name)?;
                            let secs = now.duration_since(*at).as_secs_f64().max(0.001);
                            let delta = |field: &str| {
                                (q[field].as_i64().unwrap_or(0) - old[field].as_i64().unwrap_or(0))
                                    .max(0) as u64
                            };
                            Some((
                                per_sec(delta("succeeded"), secs),
                                per_sec(delta("dead") + delta("retrying"), secs),
                            ))
                        });
                        q["completed_per_sec"] = json!(rates.map(|r| r.0));
                        q["failed_per_sec"] = json!(rates.map(|r| r.1));
                        by_name.insert(name, q.clone());
                    }
                }
                last = Some((now, by_name));
                v["available"] = true.into();
                v["error"] = Value::Null;
                v
            }
        };
        shared.console.inner.lock().expect("console lock").queues = view;
    }
}

/// Each worker's `/_shoal/worker` (asked at once), with `succeeded_per_sec`
/// and `failed_per_sec` from the change since its answer in `last`
/// (null on the first); null for a worker that did not answer.
async fn worker_figures(
    state: &GatewayState,
    workers: &[String],
    last: &mut HashMap<String, (Instant, Value)>,
) -> HashMap<String, Value> {
    let workers = resolve_all(workers).await;
    let asks = workers.iter().map(|base| async move {
        let answer = tokio::time::timeout(
            PROBE_TIMEOUT,
            super::internal_request(state, base, &Method::GET, "/_shoal/worker", Bytes::new()),
        )
        .await;
        let figures = match answer {
            Ok(Ok((StatusCode::OK, _, body))) => serde_json::from_slice::<Value>(&body)
                .ok()
                .filter(Value::is_object),
            _ => None,
        };
        (base.clone(), figures)
    });
    let now = Instant::now();
    let mut figures = HashMap::new();
    for (base, answer) in futures_util::future::join_all(asks).await {
        let Some(mut v) = answer else {
            figures.insert(base, Value::Null);
            continue;
        };
        let rates = last.get(&base).map(|(at, old)| {
            let secs = now.duration_since(*at).as_secs_f64().max(0.001);
            let delta = |field: &str| {
                (v[field].as_u64().unwrap_or(0)).saturating_sub(old[field].as_u64().unwrap_or(0))
            };
            (
                per_sec(delta("succeeded"), secs),
                per_sec(delta("failed"), secs),
            )
        });
        v["succeeded_per_sec"] = json!(rates.map(|r| r.0));
        v["failed_per_sec"] = json!(rates.map(|r| r.1));
        last.insert(base.clone(), (now, v.clone()));
        figures.insert(base, v);
    }
    last.retain(|base, _| figures.get(base).is_some_and(Value::is_object));
    figures
}

/// Every address behind each URL: a `http://` URL with a host name
/// stands for each address the name resolves to (one per pod behind a
/// Kubernetes headless Service); an IP, `https://` (whose certificate
/// names the host) or a name that does not resolve stays as it is.
async fn resolve_all(urls: &[String]) -> Vec<String> {
    // Looked up at once, each for at most PROBE_TIMEOUT.
    let lookups = urls.iter().map(|url| async move {
        let resolved = match crate::pool::parse_upstream(url) {
            Ok((scheme, authority))
                if scheme == http::uri::Scheme::HTTP
                    && authority.host().parse::<std::net::IpAddr>().is_err()
                    && !authority.host().starts_with('[') =>
            {
                let port = crate::pool::port_of(&scheme, &authority);
                let lookup = tokio::time::timeout(
                    PROBE_TIMEOUT,
                    tokio::net::lookup_host((authority.host(), port)),
                )
                .await;
                match lookup {
                    Ok(Ok(addrs)) => {
                        let mut all: Vec<String> = addrs.map(|a| format!("http://{a}")).collect();
                        all.sort();
                        all.dedup();
                        all
                    }
                    _ => Vec::new(),
                }
            }
            _ => Vec::new(),
        };
        if resolved.is_empty() {
            vec![url.trim_end_matches('/').to_string()]
        } else {
            resolved
        }
    });
    let mut out: Vec<String> = futures_util::future::join_all(lookups)
        .await
        .into_iter()
        .flatten()
        .collect();
    let mut seen = std::collections::HashSet::new();
    out.retain(|url| seen.insert(url.clone()));
    out
}

/// Each peer gateway's `/_shoal/gateway` (asked at once), or why it did
/// not answer.
async fn peer_figures(state: &GatewayState) -> Vec<Value> {
    let peers = resolve_all(&state.settings.console.peers).await;
    // The read-only token when there is one: peers need no more.
    let token = state
        .settings
        .metrics_token
        .as_deref()
        .or(state.settings.admin_token.as_deref());
    let asks = peers.iter().map(|base| async move {
        let answer = tokio::time::timeout(
            PROBE_TIMEOUT,
            super::request_with_token(
                state,
                token,
                base,
                &Method::GET,
                "/_shoal/gateway",
                Bytes::new(),
            ),
        )
        .await;
        let (state, figures, error) = match answer {
            Ok(Ok((StatusCode::OK, _, body))) => match serde_json::from_slice::<Value>(&body) {
                Ok(v) if v["draining"] == true => ("draining", v, None),
                Ok(v) if v.is_object() => ("up", v, None),
                _ => (
                    "down",
                    Value::Null,
                    Some("not a Shoal gateway's answer".to_string()),
                ),
            },
            Ok(Ok((status, _, _))) => ("down", Value::Null, Some(format!("answered {status}"))),
            Ok(Err(e)) => ("down", Value::Null, Some(e)),
            Err(_) => (
                "down",
                Value::Null,
                Some("no answer within 500 ms".to_string()),
            ),
        };
        json!({"url": base, "this": false, "state": state, "figures": figures, "error": error})
    });
    futures_util::future::join_all(asks).await
}

/// Open realtime streams of each instance of each pool, asked at once.
async fn instance_streams(state: &GatewayState) -> HashMap<String, u64> {
    let urls: Vec<String> = state
        .pools
        .iter()
        .flat_map(|p| {
            p.instances()
                .iter()
                .map(|i| i.url.clone())
                .collect::<Vec<_>>()
        })
        .collect();
    let asks = urls.into_iter().map(|url| async move {
        let answer = tokio::time::timeout(
            PROBE_TIMEOUT,
            super::internal_request(state, &url, &Method::GET, "/_shoal/stats", Bytes::new()),
        )
        .await;
        let streams = match answer {
            Ok(Ok((StatusCode::OK, _, body))) => serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["streams"].as_u64()),
            _ => None,
        };
        streams.map(|n| (url, n))
    });
    futures_util::future::join_all(asks)
        .await
        .into_iter()
        .flatten()
        .collect()
}
