//! Distributed traces: W3C trace context (`traceparent`) carried across
//! every hop, and spans exported by OTLP/HTTP with JSON encoding to a
//! collector (Jaeger, the OpenTelemetry Collector, Tempo). Off until
//! [`install`] is called (`telemetry.otlp_endpoint`): then every process
//! sends its finished spans in batches, from a task of its own, and a
//! span costs its fields and a channel send.
//!
//! Why not the `opentelemetry` crates: Shoal opens spans at a handful of
//! places of its own (gateway, serve, service calls, enqueue, job run,
//! calls a job makes), not from `tracing` events, so the SDK's machinery
//! (a tracing bridge, processors, a gRPC stack) would cost more build and
//! run time than this file. The wire format is OTLP's, so any collector
//! reads it.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Spans waiting for the exporter at most; more are dropped and counted.
const QUEUE: usize = 8192;
/// Spans per export request at most.
const BATCH: usize = 512;
/// How often a partial batch goes out.
const FLUSH_EVERY: Duration = Duration::from_millis(500);

/// Where a span sits in its trace: W3C trace context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

fn hex<const N: usize>(bytes: &[u8; N]) -> String {
    crate::ids::hex(bytes)
}

fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// N (at most 16) random bytes, from a version 4 UUID's.
fn random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&uuid::Uuid::new_v4().as_bytes()[16 - N..]);
    out
}

impl SpanContext {
    /// The context of a new trace.
    pub fn root() -> SpanContext {
        SpanContext {
            trace_id: random(),
            span_id: random(),
            sampled: true,
        }
    }

    /// A new span of the same trace.
    pub fn child(&self) -> SpanContext {
        SpanContext {
            trace_id: self.trace_id,
            span_id: random(),
            sampled: self.sampled,
        }
    }

    /// Reads a `traceparent` header (version 00); `None` when malformed
    /// or all zeros, as the W3C recommendation says to ignore those.
    pub fn parse(header: &str) -> Option<SpanContext> {
        let mut parts = header.trim().split('-');
        let version = parts.next()?;
        if version.len() != 2 || version == "ff" {
            return None;
        }
        let trace_id: [u8; 16] = unhex(parts.next()?)?;
        let span_id: [u8; 8] = unhex(parts.next()?)?;
        let flags: [u8; 1] = unhex(parts.next()?)?;
        if version == "00" && parts.next().is_some() {
            return None;
        }
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(SpanContext {
            trace_id,
            span_id,
            sampled: flags[0] & 1 == 1,
        })
    }

    /// The `traceparent` header naming this span as the parent.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            u8::from(self.sampled)
        )
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }
}

tokio::task_local! {
    static CURRENT: SpanContext;
}

/// The span the current task works within, when tracing is on and one is.
pub fn current() -> Option<SpanContext> {
    CURRENT.try_with(|c| *c).ok()
}

/// Runs `f` within span `ctx`: spans it starts are its children, and
/// requests it makes carry `ctx` as their parent. A plain function, not an
/// `async fn`: a wrapper future would hold `f` twice (as its argument and
/// inside the task-local's future), doubling every future it wraps.
pub fn within<F: Future>(ctx: SpanContext, f: F) -> impl Future<Output = F::Output> {
    CURRENT.scope(ctx, f)
}

/// OTLP span kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Internal = 1,
    Server = 2,
    Client = 3,
    Producer = 4,
    Consumer = 5,
}

/// A span being timed; [`Span::end`] sends it to the exporter. Only made
/// while tracing is on ([`start`] returns `None` otherwise).
#[derive(Debug)]
pub struct Span {
    pub ctx: SpanContext,
    parent: Option<[u8; 8]>,
    name: String,
    kind: Kind,
    start: SystemTime,
    attributes: Vec<(&'static str, serde_json::Value)>,
    links: Vec<SpanContext>,
    error: Option<String>,
}

/// Starts a span named `name` as a child of `parent` (or of the current
/// span, or as a new trace); `None` while tracing is off.
pub fn start(name: impl Into<String>, kind: Kind, parent: Option<SpanContext>) -> Option<Span> {
    EXPORTER.get()?;
    let parent = parent.or_else(current);
    Some(Span {
        ctx: parent.map_or_else(SpanContext::root, |p| p.child()),
        parent: parent.map(|p| p.span_id),
        name: name.into(),
        kind,
        start: SystemTime::now(),
        attributes: Vec::new(),
        links: Vec::new(),
        error: None,
    })
}

impl Span {
    /// An attribute (string, number or boolean).
    pub fn attr(&mut self, key: &'static str, value: impl Into<serde_json::Value>) {
        self.attributes.push((key, value.into()));
    }

    /// A link to a span of another (or the same) trace.
    pub fn link(&mut self, to: SpanContext) {
        self.links.push(to);
    }

    /// Marks the span failed, with why.
    pub fn fail(&mut self, message: impl Into<String>) {
        self.error = Some(message.into());
    }

    /// Ends the span now and queues it for export.
    pub fn end(self) {
        let Some(exporter) = EXPORTER.get() else {
            return;
        };
        if exporter.queue.try_send(self.finish()).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn finish(self) -> serde_json::Value {
        let nanos = |t: SystemTime| {
            t.duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                .to_string()
        };
        let value = |v: &serde_json::Value| match v {
            serde_json::Value::Bool(b) => serde_json::json!({ "boolValue": b }),
            serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => {
                serde_json::json!({ "intValue": n.to_string() })
            }
            serde_json::Value::Number(n) => serde_json::json!({ "doubleValue": n }),
            serde_json::Value::String(s) => serde_json::json!({ "stringValue": s }),
            other => serde_json::json!({ "stringValue": other.to_string() }),
        };
        let mut span = serde_json::json!({
            "traceId": self.ctx.trace_id_hex(),
            "spanId": self.ctx.span_id_hex(),
            "name": self.name,
            "kind": self.kind as u8,
            "startTimeUnixNano": nanos(self.start),
            "endTimeUnixNano": nanos(SystemTime::now()),
            "attributes": self.attributes.iter()
                .map(|(k, v)| serde_json::json!({ "key": k, "value": value(v) }))
                .collect::<Vec<_>>(),
            "links": self.links.iter()
                .map(|l| serde_json::json!({ "traceId": l.trace_id_hex(), "spanId": l.span_id_hex() }))
                .collect::<Vec<_>>(),
            "status": match &self.error {
                Some(m) => serde_json::json!({ "code": 2, "message": m }),
                None => serde_json::json!({ "code": 0 }),
            },
        });
        if let Some(parent) = self.parent {
            span["parentSpanId"] = hex(&parent).into();
        }
        span
    }
}

struct Exporter {
    queue: mpsc::Sender<serde_json::Value>,
}

static EXPORTER: OnceLock<Exporter> = OnceLock::new();
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Whether spans are being made and exported.
pub fn enabled() -> bool {
    EXPORTER.get().is_some()
}

/// Turns tracing on for this process: spans go to `endpoint` (an
/// `http://host:port` OTLP/HTTP receiver; `/v1/traces` is added) as
/// service `service`. Needs a tokio runtime; the first call wins.
pub fn install(endpoint: &str, service: &str, instance: &str) -> Result<(), String> {
    let base = endpoint.trim_end_matches('/');
    let rest = base
        .strip_prefix("http://")
        .ok_or_else(|| format!("`{endpoint}`: the OTLP endpoint must be an http:// URL"))?;
    let (authority, path) = match rest.split_once('/') {
        Some((a, p)) => (a.to_string(), format!("/{p}/v1/traces")),
        None => (rest.to_string(), "/v1/traces".to_string()),
    };
    if authority.is_empty() {
        return Err(format!("`{endpoint}` names no host"));
    }
    let (tx, rx) = mpsc::channel(QUEUE);
    if EXPORTER.set(Exporter { queue: tx }).is_err() {
        return Ok(());
    }
    let resource = serde_json::json!({ "attributes": [
        { "key": "service.name", "value": { "stringValue": service } },
        { "key": "service.instance.id", "value": { "stringValue": instance } },
    ]});
    tokio::spawn(export(rx, authority, path, resource));
    Ok(())
}

/// Sends batches until every sender is gone.
async fn export(
    mut rx: mpsc::Receiver<serde_json::Value>,
    authority: String,
    path: String,
    resource: serde_json::Value,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let deadline = tokio::time::sleep(FLUSH_EVERY);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                span = rx.recv() => match span {
                    Some(s) => {
                        batch.push(s);
                        if batch.len() >= BATCH { break; }
                    }
                    None => {
                        send(&authority, &path, &resource, std::mem::take(&mut batch)).await;
                        return;
                    }
                },
                _ = &mut deadline => break,
            }
        }
        if !batch.is_empty() {
            send(&authority, &path, &resource, std::mem::take(&mut batch)).await;
        }
    }
}

/// One OTLP/HTTP JSON export; a failure is logged and the batch dropped
/// (traces are best effort: they never hold up the work they describe).
async fn send(
    authority: &str,
    path: &str,
    resource: &serde_json::Value,
    spans: Vec<serde_json::Value>,
) {
    if spans.is_empty() {
        return;
    }
    let n = spans.len();
    let body = serde_json::to_vec(&serde_json::json!({ "resourceSpans": [{
        "resource": resource,
        "scopeSpans": [{ "scope": { "name": "shoal" }, "spans": spans }],
    }]}))
    .unwrap_or_default();
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(authority).await?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: {authority}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        let mut answer = [0u8; 12];
        stream.read_exact(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    match tokio::time::timeout(Duration::from_secs(5), attempt).await {
        Ok(Ok(answer))
            if answer.starts_with(b"HTTP/1.1 2") || answer.starts_with(b"HTTP/1.0 2") =>
        {
            metrics::counter!("shoal_trace_spans_exported_total").increment(n as u64);
        }
        outcome => {
            metrics::counter!("shoal_trace_export_errors_total").increment(1);
            tracing::warn!(
                spans = n,
                ?outcome,
                "exporting spans failed; they are dropped"
            );
        }
    }
    let dropped = DROPPED.swap(0, Ordering::Relaxed);
    if dropped > 0 {
        metrics::counter!("shoal_trace_spans_dropped_total").increment(dropped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_bad_ones_are_ignored() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ctx = SpanContext::parse(header).unwrap();
        assert_eq!(ctx.traceparent(), header);
        assert!(ctx.sampled);
        let child = ctx.child();
        assert_eq!(child.trace_id, ctx.trace_id);
        assert_ne!(child.span_id, ctx.span_id);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(SpanContext::parse(bad), None, "{bad}");
        }
        assert_ne!(SpanContext::root().trace_id, SpanContext::root().trace_id);
    }

    #[tokio::test]
    async fn spans_are_not_made_while_tracing_is_off() {
        assert!(start("x", Kind::Internal, None).is_none());
        let ctx = SpanContext::root();
        within(ctx, async move { assert_eq!(current(), Some(ctx)) }).await;
        assert_eq!(current(), None);
    }
}
