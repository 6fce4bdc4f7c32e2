//! Logging and metrics setup: tracing to stdout (JSON or pretty) and a
//! Prometheus recorder whose text each role serves at `/metrics`.

use crate::settings::{LogFormat, LogSettings};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::{Mutex, OnceLock};
use tracing_subscriber::EnvFilter;

static PROMETHEUS: OnceLock<PrometheusHandle> = OnceLock::new();

/// The log writer thread's guard: dropping it writes what is left.
static LOG_WRITER: Mutex<Option<tracing_appender::non_blocking::WorkerGuard>> = Mutex::new(None);

/// Installs the global tracing subscriber. Safe to call more than once (the
/// first call wins), so tests may call it freely.
///
/// Lines are formatted on the thread that logs and written to stdout by a
/// writer thread, which writes whatever has queued up in one system call
/// (at most 64 KiB) and flushes whenever the queue is empty: under load an
/// access log line costs no write of its own, and when idle a line is out
/// at once. Nothing is dropped: a full queue (128k lines) makes loggers
/// wait. Call [`flush_logs`] before the process exits.
pub fn init_logging(settings: &LogSettings) {
    init_logging_on(settings, LogStream::Stdout)
}

/// Where log lines go: servers log to stdout (what containers collect);
/// one-shot commands to stderr, so that their stdout is their result
/// alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStream {
    Stdout,
    Stderr,
}

/// [`init_logging`] onto `stream`.
pub fn init_logging_on(settings: &LogSettings, stream: LogStream) {
    let filter = EnvFilter::try_new(&settings.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let out: Box<dyn std::io::Write + Send> = match stream {
        LogStream::Stdout => Box::new(std::io::stdout()),
        LogStream::Stderr => Box::new(std::io::stderr()),
    };
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("shoal-log")
        .finish(std::io::BufWriter::with_capacity(64 * 1024, out));
    let terminal = {
        use std::io::IsTerminal;
        match stream {
            LogStream::Stdout => std::io::stdout().is_terminal(),
            LogStream::Stderr => std::io::stderr().is_terminal(),
        }
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal)
        .with_writer(writer);
    let installed = match settings.format {
        // The request span's fields once (`span`), not again in a list
        // of every open span.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.compact().try_init(),
    };
    if installed.is_ok() {
        *LOG_WRITER.lock().unwrap_or_else(|p| p.into_inner()) = Some(guard);
    }
}

/// Writes out every log line still queued and stops the writer thread;
/// lines logged afterwards are lost. Call once, just before exiting.
pub fn flush_logs() {
    drop(LOG_WRITER.lock().unwrap_or_else(|p| p.into_inner()).take());
}

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn prometheus() -> PrometheusHandle {
    PROMETHEUS
        .get_or_init(|| {
            let buckets = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets(&buckets)
                .expect("buckets")
                .build_recorder();
            let handle = recorder.handle();
            // In tests several apps share a process; only the first installs.
            let _ = metrics::set_global_recorder(recorder);
            // Histogram samples wait in per-histogram buckets until a
            // scrape or an upkeep folds them into the bucket counts: with
            // nobody scraping, memory would grow with every request.
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("shoal-metrics".into())
                .spawn(move || loop {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                    upkeep.run_upkeep();
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the metrics upkeep thread; histograms grow until scraped");
            }
            handle
        })
        .clone()
}

/// Adds one to a counter whose name and labels are constants, with the
/// handle found in the recorder once per thread at each call site rather
/// than looked up by label on every call (hot paths). A thread that
/// counts before `prometheus()` installed the recorder keeps a no-op
/// handle, so install it before serving, as every role does.
#[macro_export]
macro_rules! count_per_thread {
    ($name:literal $(, $k:literal => $v:literal)* $(,)?) => {{
        ::std::thread_local! {
            static HANDLE: $crate::telemetry::metrics::Counter =
                $crate::telemetry::metrics::counter!($name $(, $k => $v)*);
        }
        HANDLE.with(|c| c.increment(1));
    }};
}

#[doc(hidden)]
pub use metrics;
