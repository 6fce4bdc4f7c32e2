//! Client connections: the cap on open connections (past it a new
//! connection gets a short 503 and is closed), TLS, which server speaks
//! to the client (the gateway's own HTTP/1.x codec, `shoal-h1server`, or
//! hyper's for HTTP/2) and hyper's limits for its connections (head size,
//! head read timeout, idle keep-alive timeout), the send timeout for
//! clients that stop reading, and the graceful close of every connection
//! at shutdown.

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use shoal_core::settings::GatewaySettings;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// Connection-level settings, fixed at start.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub max_per_client: usize,
    pub idle_timeout: Option<Duration>,
    /// The idle timeout while three quarters of `max_connections` are open.
    pub idle_under_pressure: Option<Duration>,
    pub send_timeout: Option<Duration>,
    /// Time for a TLS handshake, and for a request head.
    pub handshake_timeout: Duration,
    /// The largest request head.
    pub max_head: usize,
    /// HTTP/1.x by the gateway's own codec (`shoal-h1server`), not hyper's.
    pub own_http1: bool,
    /// On shutdown, event streams end at random moments within this.
    pub stream_drain_window: Option<Duration>,
}

/// Within what the streams passing through are ended (event streams) or
/// told to reconnect (WebSockets) at shutdown, each at a random moment:
/// `stream_drain_window_ms`, at most half the shutdown's grace, so every
/// stream ends well before the deadline would cut it; `None` when 0.
pub(crate) fn stream_drain_window(s: &GatewaySettings) -> Option<Duration> {
    (s.stream_drain_window_ms > 0).then(|| {
        Duration::from_millis(
            s.stream_drain_window_ms
                .min(s.shutdown_timeout_secs.saturating_mul(500)),
        )
    })
}

impl ConnLimits {
    pub fn new(s: &GatewaySettings) -> ConnLimits {
        ConnLimits {
            max_connections: s.max_connections,
            max_per_client: s.max_connections_per_client,
            idle_timeout: (s.idle_timeout_secs > 0)
                .then(|| Duration::from_secs(s.idle_timeout_secs)),
            idle_under_pressure: (s.idle_timeout_under_pressure_secs > 0 && s.max_connections > 0)
                .then(|| Duration::from_secs(s.idle_timeout_under_pressure_secs)),
            send_timeout: (s.send_timeout_ms > 0).then(|| Duration::from_millis(s.send_timeout_ms)),
            handshake_timeout: Duration::from_millis(s.header_read_timeout_ms),
            max_head: s.max_header_bytes,
            own_http1: s.http1_server == shoal_core::settings::Http1Server::Shoal,
            stream_drain_window: stream_drain_window(s),
        }
    }
}

pin_project_lite::pin_project! {
    /// A client connection whose writes fail with `TimedOut` once the
    /// client has left one waiting for `limit` (nginx's `send_timeout`):
    /// a client that stops reading cannot hold the connection, and the
    /// response it stopped reading, forever. hyper then closes the
    /// connection.
    pub struct SendTimeout<T> {
        #[pin]
        io: T,
        limit: Option<Duration>,
        stall: crate::body::Stall,
    }
}

impl<T> SendTimeout<T> {
    pub fn new(io: T, limit: Option<Duration>) -> Self {
        SendTimeout {
            io,
            limit,
            stall: Default::default(),
        }
    }
}

/// A write's result, with the stall timer run while it waits. Progress
/// is bytes taken by a write; a flush that ends does not count (on TCP it
/// moves nothing), so a stalled client cannot be mistaken for a reading
/// one.
fn timed<R>(
    stall: &mut crate::body::Stall,
    limit: Option<Duration>,
    cx: &mut Context<'_>,
    polled: Poll<io::Result<R>>,
    wrote: impl FnOnce(&R) -> bool,
) -> Poll<io::Result<R>> {
    let Some(limit) = limit else { return polled };
    if let Poll::Ready(result) = &polled {
        if result.as_ref().is_ok_and(wrote) {
            stall.progress();
        }
        return polled;
    }
    if !stall.expired(limit, cx) {
        return Poll::Pending;
    }
    metrics::counter!("shoal_gateway_send_timeouts_total").increment(1);
    Poll::Ready(Err(io::Error::new(
        io::ErrorKind::TimedOut,
        send_timed_out(limit),
    )))
}

/// Why a response to a client was cut off by `send_timeout_ms` (the
/// socket's writes here, an HTTP/2 stream's window in `h2stall.rs`).
pub(crate) fn send_timed_out(limit: Duration) -> String {
    format!(
        "the client read nothing for {} ms (send_timeout_ms)",
        limit.as_millis()
    )
}

impl<T: AsyncRead> AsyncRead for SendTimeout<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for SendTimeout<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.io.poll_write(cx, buf);
        timed(this.stall, *this.limit, cx, polled, |n| *n > 0)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let polled = this.io.poll_write_vectored(cx, bufs);
        timed(this.stall, *this.limit, cx, polled, |n| *n > 0)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let polled = this.io.poll_flush(cx);
        timed(this.stall, *this.limit, cx, polled, |_| false)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let polled = this.io.poll_shutdown(cx);
        timed(this.stall, *this.limit, cx, polled, |_| false)
    }
}

/// The connection settings of one generation of the settings, with the
/// hyper builder made from them.
pub struct ListenConfig {
    generation: usize,
    pub limits: ConnLimits,
    pub builder: Arc<Builder<TokioExecutor>>,
    pub tls: Option<TlsAcceptor>,
}

impl ListenConfig {
    pub fn new(state: &Arc<crate::proxy::GatewayState>) -> ListenConfig {
        ListenConfig {
            generation: Arc::as_ptr(state) as usize,
            limits: ConnLimits::new(&state.settings),
            builder: Arc::new(builder(&state.settings)),
            tls: state.tls.clone(),
        }
    }

    /// Rebuilds after a reload (cheap when nothing was reloaded).
    pub fn refresh(&mut self, state: &Arc<crate::proxy::GatewayState>) {
        if Arc::as_ptr(state) as usize != self.generation {
            *self = ListenConfig::new(state);
        }
    }
}

/// What a request knows of its client connection (in its extensions): an
/// upgraded tunnel holds it so the connection stays counted, and ends when
/// `closing` is cancelled at shutdown.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub guard: Arc<ConnGuard>,
    pub closing: CancellationToken,
    /// Set with `closing` (read per response, where the token's lock
    /// would be shared by every connection).
    pub draining: Arc<std::sync::atomic::AtomicBool>,
}

/// The TLS acceptor of `s` when it names a certificate: the chain and key
/// read from their PEM files, and those of `tls_sni` for the names they
/// list, HTTP/2 and HTTP/1.1 offered by ALPN, TLS 1.2 and 1.3 (rustls
/// with *ring*). An unreadable file, an empty chain or a key that does
/// not fit is an error naming the setting, so a bad file stops the start
/// or is refused by a reload.
pub(crate) fn tls_acceptor(
    s: &GatewaySettings,
) -> Result<Option<TlsAcceptor>, crate::GatewayError> {
    use tokio_rustls::rustls;
    if !s.tls() {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let default = certified_key(
        (&s.tls_cert_file, "gateway.tls_cert_file"),
        (&s.tls_key_file, "gateway.tls_key_file"),
        &provider,
    )?;
    let mut by_name = std::collections::HashMap::new();
    for (i, sni) in s.tls_sni.iter().enumerate() {
        let key = certified_key(
            (&sni.cert_file, &format!("gateway.tls_sni[{i}].cert_file")),
            (&sni.key_file, &format!("gateway.tls_sni[{i}].key_file")),
            &provider,
        )?;
        for name in &sni.names {
            by_name.insert(name.trim().to_ascii_lowercase(), Arc::clone(&key));
        }
    }
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| crate::GatewayError::Invalid {
            key: "gateway.tls_cert_file".into(),
            message: e.to_string(),
        })?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver { default, by_name }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}

/// A certificate chain and its key from PEM files, each given with the
/// setting that names it (for the errors).
fn certified_key(
    (cert_file, cert_key): (&str, &str),
    (key_file, key_key): (&str, &str),
    provider: &tokio_rustls::rustls::crypto::CryptoProvider,
) -> Result<Arc<tokio_rustls::rustls::sign::CertifiedKey>, crate::GatewayError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let invalid = |key: &str, message: String| crate::GatewayError::Invalid {
        key: key.to_string(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            invalid(
                cert_key,
                format!("cannot read certificates from `{cert_file}`: {e}"),
            )
        })?;
    if certs.is_empty() {
        return Err(invalid(
            cert_key,
            format!("`{cert_file}` holds no PEM certificate"),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
        invalid(
            key_key,
            format!("cannot read a private key from `{key_file}`: {e}"),
        )
    })?;
    let certified = tokio_rustls::rustls::sign::CertifiedKey::from_der(certs, key, provider)
        .map_err(|e| {
            invalid(
                key_key,
                format!("the key does not go with the certificate: {e}"),
            )
        })?;
    Ok(Arc::new(certified))
}

/// Chooses the certificate for the name a client asks for: an exact
/// name, then `*.` and the name's parent, then the default.
#[derive(Debug)]
struct SniResolver {
    default: Arc<tokio_rustls::rustls::sign::CertifiedKey>,
    by_name: std::collections::HashMap<String, Arc<tokio_rustls::rustls::sign::CertifiedKey>>,
}

impl tokio_rustls::rustls::server::ResolvesServerCert for SniResolver {
    fn resolve(
        &self,
        hello: tokio_rustls::rustls::server::ClientHello<'_>,
    ) -> Option<Arc<tokio_rustls::rustls::sign::CertifiedKey>> {
        let chosen = hello.server_name().and_then(|name| {
            let name = name.to_ascii_lowercase();
            self.by_name.get(&name).or_else(|| {
                let (_, parent) = name.split_once('.')?;
                self.by_name.get(&format!("*.{parent}"))
            })
        });
        Some(Arc::clone(chosen.unwrap_or(&self.default)))
    }
}

/// hyper's server builder with the head limits and timers.
pub fn builder(s: &GatewaySettings) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(s.header_read_timeout_ms))
        .max_buf_size(s.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(s.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// Open client connections (in all, and per client address), and a way
/// to wait until none is left.
#[derive(Debug, Default)]
pub struct Connections {
    open: AtomicUsize,
    /// Open connections per client address, while a per-client cap is
    /// set; only addresses with one open are kept.
    per_client: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    closed: Notify,
    /// Told when the open count reaches three quarters of
    /// `max_connections` from below: idle connections shorten their wait.
    pub(crate) pressure: Arc<Notify>,
    /// When it was last told (ms since the process's first crossing, plus
    /// one; 0: never). At most once a second: a count hovering at the
    /// threshold would otherwise wake every idle connection per accept,
    /// and connections that go idle later ask under pressure anyway.
    pressure_told_ms: AtomicU64,
}

/// What a per-client count is kept by: an IPv4 address (an IPv4-mapped
/// IPv6 one as IPv4), or an IPv6 address's /64, the block one host is
/// usually given (counting each /128 would let one host open as many
/// connections as it has addresses).
fn client_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => std::net::IpAddr::V4(v4),
            None => std::net::IpAddr::V6(std::net::Ipv6Addr::from(
                u128::from(v6) & !((1u128 << 64) - 1),
            )),
        },
        v4 => v4,
    }
}

/// Why a new connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `max_connections` are open.
    Full,
    /// Its address has `max_connections_per_client` open.
    ClientFull,
}

/// One open connection; dropping it closes the count.
#[derive(Debug)]
pub struct ConnGuard {
    connections: Arc<Connections>,
    /// Counted per client address.
    client: Option<std::net::IpAddr>,
}

impl ConnGuard {
    /// The idle timeout this connection has now: the shorter one while
    /// three quarters of `max_connections` or more are open.
    pub fn idle_timeout(&self, limits: &ConnLimits) -> Option<Duration> {
        match limits.idle_under_pressure {
            Some(short) if self.connections.open() * 4 >= limits.max_connections * 3 => {
                Some(limits.idle_timeout.map_or(short, |idle| idle.min(short)))
            }
            _ => limits.idle_timeout,
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if let Some(ip) = self.client {
            let mut per = self
                .connections
                .per_client
                .lock()
                .expect("per-client counts");
            if let Some(n) = per.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    per.remove(&ip);
                }
            }
        }
        let left = self.connections.open.fetch_sub(1, Ordering::AcqRel) - 1;
        metrics::gauge!("shoal_gateway_open_connections").set(left as f64);
        if left == 0 {
            self.connections.closed.notify_waiters();
        }
    }
}

impl Connections {
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Counts a new connection from `client` unless `limits.max_connections`
    /// are open, or `limits.max_per_client` from its address (0 = no cap).
    pub fn try_open(
        self: &Arc<Self>,
        limits: &ConnLimits,
        client: std::net::IpAddr,
    ) -> Result<ConnGuard, Refused> {
        let prev = self.open.fetch_add(1, Ordering::AcqRel);
        if limits.max_connections > 0 && prev >= limits.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Full);
        }
        let mut counted = None;
        if limits.max_per_client > 0 {
            let client = client_key(client);
            let mut per = self.per_client.lock().expect("per-client counts");
            let n = per.entry(client).or_insert(0);
            if *n >= limits.max_per_client {
                drop(per);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return Err(Refused::ClientFull);
            }
            *n += 1;
            counted = Some(client);
        }
        metrics::gauge!("shoal_gateway_open_connections").set((prev + 1) as f64);
        let threshold = limits.max_connections * 3;
        if limits.idle_under_pressure.is_some()
            && prev * 4 < threshold
            && (prev + 1) * 4 >= threshold
        {
            static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
            let now = EPOCH
                .get_or_init(std::time::Instant::now)
                .elapsed()
                .as_millis() as u64
                + 1;
            let told = self.pressure_told_ms.load(Ordering::Relaxed);
            if told == 0 || now.saturating_sub(told) >= 1_000 {
                self.pressure_told_ms.store(now, Ordering::Relaxed);
                self.pressure.notify_waiters();
            }
        }
        Ok(ConnGuard {
            connections: Arc::clone(self),
            client: counted,
        })
    }

    /// Waits until every connection closed.
    pub async fn all_closed(&self) {
        loop {
            let notified = self.closed.notified();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Answers a connection past the cap with a 503 and closes it, in its own
/// task so a slow client cannot hold up the accept loop. On a TLS
/// listener it is closed at once: no HTTP can be spoken before a
/// handshake, and a handshake is the work the cap is there to refuse.
pub fn refuse(mut stream: TcpStream, client: SocketAddr, tls: bool, why: Refused) {
    metrics::counter!(
        "shoal_gateway_connections_refused_total",
        "cause" => match why {
            Refused::Full => "max_connections",
            Refused::ClientFull => "max_connections_per_client",
        }
    )
    .increment(1);
    // One warning a second at most, with the count since the last: a
    // flood of connections must not become a flood of log lines.
    static REFUSED: AtomicU64 = AtomicU64::new(0);
    static WARNED_AT: AtomicU64 = AtomicU64::new(0);
    let refused = REFUSED.fetch_add(1, Ordering::Relaxed) + 1;
    let second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if WARNED_AT.swap(second, Ordering::Relaxed) != second {
        REFUSED.fetch_sub(refused, Ordering::Relaxed);
        tracing::warn!(
            client = %client,
            refused,
            "connections refused: the gateway is at max_connections"
        );
    }
    if tls {
        return;
    }
    tokio::spawn(async move {
        let body = r#"{"type":"https://shoal.dev/problems/unavailable","title":"Service unavailable","status":503,"detail":"the gateway is at its connection limit","retry_after":1}"#;
        let head = format!(
            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(body.as_bytes()).await?;
            stream.shutdown().await
        })
        .await;
    });
}

/// What a connection is doing, for the idle timeout of connections
/// hyper serves: how many requests are in flight, and a count of request
/// starts and ends. No clock is read per request; the connection's idle
/// check (every quarter of the timeout) sees whether the count moved
/// since its last look. The gateway's own HTTP/1.1 codec knows when it
/// is idle and does not need it (`kept` is false meanwhile).
#[derive(Debug)]
pub struct Activity {
    in_flight: AtomicUsize,
    events: AtomicU64,
    kept: std::sync::atomic::AtomicBool,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            events: AtomicU64::new(0),
            kept: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// Whether requests are to be counted (hyper serves the connection).
    pub fn kept(&self) -> bool {
        self.kept.load(Ordering::Relaxed)
    }

    fn keep(&self, kept: bool) {
        self.kept.store(kept, Ordering::Relaxed);
    }

    /// A request started; the returned guard ends it (hold it in the
    /// response body).
    pub fn begin(self: &Arc<Self>) -> ActivityGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.events.fetch_add(1, Ordering::Relaxed);
        ActivityGuard(Arc::clone(self))
    }

    /// The count of starts and ends while nothing is in flight, else
    /// `None` (busy).
    fn quiet(&self) -> Option<u64> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        Some(self.events.load(Ordering::Relaxed))
    }
}

#[derive(Debug)]
pub struct ActivityGuard(Arc<Activity>);

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        self.0.events.fetch_add(1, Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How often an idle limit is checked: a quarter of it, within 10 ms
/// and 1 s (a limit is noticed at most a quarter late).
pub(crate) fn check_every(limit: Duration) -> Duration {
    (limit / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Tracks how long a connection has been idle from looks at its
/// [`Activity`].
struct IdleWatch {
    seen: Option<u64>,
    since: Instant,
}

impl IdleWatch {
    /// How long the connection has been idle at `now`: since the first
    /// look that found it quiet with the same count.
    fn idle_for(&mut self, activity: &Activity, now: Instant) -> Duration {
        let quiet = activity.quiet();
        if quiet.is_none() || quiet != self.seen {
            self.seen = quiet;
            self.since = now;
        }
        match quiet {
            None => Duration::ZERO,
            Some(_) => now.saturating_duration_since(self.since),
        }
    }
}

/// A tower service taking requests with bodies of type `B`, as the
/// request path does.
pub trait Serves<B>:
    tower::Service<
    http::Request<B>,
    Response = http::Response<crate::body::Body>,
    Error = std::convert::Infallible,
    Future: Send + 'static,
>
{
}

impl<B, S> Serves<B> for S where
    S: tower::Service<
        http::Request<B>,
        Response = http::Response<crate::body::Body>,
        Error = std::convert::Infallible,
        Future: Send + 'static,
    >
{
}

/// The request path of a connection, as a tower service over requests
/// from either HTTP server (the gateway's own HTTP/1.x codec, hyper's).
pub trait Stack:
    Serves<shoal_h1server::RequestBody> + Serves<hyper::body::Incoming> + Clone + Send + 'static
{
}

impl<S> Stack for S where
    S: Serves<shoal_h1server::RequestBody> + Serves<hyper::body::Incoming> + Clone + Send + 'static
{
}

/// Serves one connection until it ends: HTTP/1.x by the gateway's own
/// codec (`shoal-h1server`), HTTP/2 (chosen by ALPN, or by its preface on a
/// plain connection) and, with `http1_server = "hyper"`, HTTP/1.x too by
/// hyper's server. Closes it when it has been idle for `idle_timeout`,
/// gracefully when `shutdown` is cancelled, and at once when the client
/// leaves a write waiting for `send_timeout`. With `tls`, the handshake
/// comes first, within `handshake_timeout`. Returns the function to call
/// with the stream, on the runtime that is to serve it (`workers.rs`).
pub fn serve<S: Stack>(
    config: &ListenConfig,
    client: SocketAddr,
    service: S,
    activity: Arc<Activity>,
    info: ConnInfo,
) -> impl FnOnce(TcpStream) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
       + Send
       + 'static {
    let builder = Arc::clone(&config.builder);
    let limits = config.limits.clone();
    let tls = config.tls.clone();
    // Two futures, boxed apart: a plain connection's allocation is not
    // sized for a TLS session it does not have.
    let conn = Conn {
        builder,
        client,
        service,
        activity,
        info,
    };
    move |stream| match tls {
        None => Box::pin(async move {
            let io = SendTimeout::new(stream, limits.send_timeout);
            serve_io(conn, &limits, io, false).await
        }),
        Some(acceptor) => Box::pin(async move {
            // The send timeout sits under TLS, on the socket: what counts
            // as progress is bytes the client's socket took, during a
            // flush of TLS records as much as during a write (above TLS, a
            // write only fills rustls's buffer and a long flush to a slow
            // but reading client would count as none).
            let stream = SendTimeout::new(stream, limits.send_timeout);
            let handshake = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream));
            let failed = match handshake.await {
                Ok(Ok(io)) => {
                    let h2 = io.get_ref().1.alpn_protocol() == Some(b"h2");
                    return serve_io(conn, &limits, io, h2).await;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => "timed out (header_read_timeout_ms)".to_string(),
            };
            metrics::counter!("shoal_gateway_tls_handshake_failures_total").increment(1);
            tracing::debug!(client = %client, error = %failed, "TLS handshake failed");
        }),
    }
}

/// What serving one connection needs besides its stream and limits.
struct Conn<S> {
    builder: Arc<Builder<TokioExecutor>>,
    client: SocketAddr,
    service: S,
    activity: Arc<Activity>,
    info: ConnInfo,
}

/// Serves one (plain or TLS) connection: see [`serve`]. `h2`: ALPN chose
/// HTTP/2.
async fn serve_io<S, I>(conn: Conn<S>, limits: &ConnLimits, io: I, h2: bool)
where
    S: Stack,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if limits.own_http1 && !h2 {
        conn.activity.keep(false);
        let guard = Arc::clone(&conn.info.guard);
        let conn_limits = limits.clone();
        let server_limits = shoal_h1server::ServerLimits {
            header_read: limits.handshake_timeout,
            pressure: Some(Arc::clone(&conn.info.guard.connections.pressure)),
            idle: Arc::new(move || guard.idle_timeout(&conn_limits)),
            max_head: limits.max_head,
            hand_off_upgrades: false,
            stream_drain_window: limits.stream_drain_window,
        };
        let ended = shoal_h1server::serve(
            io,
            conn.service.clone(),
            server_limits,
            &conn.info.closing,
            &*conn.info.draining,
        )
        .await;
        // Upgrades are not handed off here: the gateway takes them itself.
        if let shoal_h1server::Ended::Http2(io, _) | shoal_h1server::Ended::Upgrade(io, _) = ended {
            conn.activity.keep(true);
            // Boxed: hyper's connection state is larger than the own
            // codec's, and every connection's future would otherwise be
            // sized for it.
            Box::pin(serve_hyper(conn, limits, io)).await;
        }
        return;
    }
    Box::pin(serve_hyper(conn, limits, io)).await;
}

/// Serves a connection with hyper's server (HTTP/2, or HTTP/1.x with
/// `http1_server = "hyper"`).
async fn serve_hyper<S, I>(conn: Conn<S>, limits: &ConnLimits, io: I)
where
    S: Stack,
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Conn {
        builder,
        client,
        service,
        activity,
        info,
    } = conn;
    // `send_timeout` for what hyper sends: on HTTP/2 a client that stops
    // reading stops granting window, not socket writes (`h2stall.rs`).
    let watches = limits.send_timeout.map(crate::h2stall::Watches::new);
    // Intervals, not sleeps made anew on each turn of the loop: whichever
    // timer is shorter would restart the other before it ever ended.
    let mut sweep = tokio::time::interval(
        watches
            .as_ref()
            .map_or(Duration::from_secs(3600), |w| w.sweep_every()),
    );
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let service = crate::h2stall::WatchResponses {
        inner: service,
        watches: watches.clone(),
    };
    let service = hyper_util::service::TowerToHyperService::new(service);
    let idle_timeout = limits.idle_timeout;
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut closing = false;
    let mut watch = IdleWatch {
        seen: activity.quiet(),
        since: Instant::now(),
    };
    let mut idle_check = tokio::time::interval(
        idle_timeout
            .map(check_every)
            .unwrap_or(Duration::from_secs(3600)),
    );
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(client = %client, error = %e, "client connection ended with an error");
                }
                return;
            }
            _ = info.closing.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = sweep.tick(), if watches.is_some() => {
                if let Some(w) = &watches {
                    w.sweep(Instant::now());
                }
            }
            _ = idle_check.tick(), if !closing && idle_timeout.is_some() => {
                let limit = info.guard.idle_timeout(limits).or(idle_timeout).unwrap_or_default();
                if watch.idle_for(&activity, Instant::now()) >= limit {
                    tracing::debug!(client = %client, "closing an idle client connection");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_counted_by_ipv4_address_or_ipv6_slash_64() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        assert_eq!(client_key(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(client_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(
            client_key(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            client_key(ip("2001:db8:1:2::1"))
        );
        assert_ne!(
            client_key(ip("2001:db8:1:2::1")),
            client_key(ip("2001:db8:1:3::1"))
        );
    }

    #[tokio::test]
    async fn a_write_left_waiting_past_the_send_timeout_fails_whatever_flushes_do() {
        use tokio::io::AsyncWriteExt;
        let (pipe, _reader_that_reads_nothing) = tokio::io::duplex(64);
        let mut io = SendTimeout::new(pipe, Some(Duration::from_millis(300)));
        io.write_all(&[0u8; 64]).await.unwrap();
        let started = Instant::now();
        let err = loop {
            // A flush ends at once on a pipe (as on TCP): not progress.
            io.flush().await.unwrap();
            match tokio::time::timeout(Duration::from_millis(50), io.write(&[1u8; 8])).await {
                Ok(Ok(_)) => panic!("the pipe is full"),
                Ok(Err(e)) => break e,
                Err(_) if started.elapsed() > Duration::from_secs(5) => panic!("never timed out"),
                Err(_) => continue,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
    }

    #[test]
    fn idle_time_counts_from_the_first_quiet_look_and_restarts_on_any_request() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let activity = Activity::new();
        let mut watch = IdleWatch {
            seen: activity.quiet(),
            since: t0,
        };
        assert_eq!(watch.idle_for(&activity, t0 + s), s);
        // A request in flight: busy, however long it takes.
        let busy = activity.begin();
        assert_eq!(watch.idle_for(&activity, t0 + 5 * s), Duration::ZERO);
        drop(busy);
        // Quiet again: counted from this look, not from the start.
        assert_eq!(watch.idle_for(&activity, t0 + 6 * s), Duration::ZERO);
        assert_eq!(watch.idle_for(&activity, t0 + 8 * s), 2 * s);
        // A whole request between two looks also restarts the count.
        drop(activity.begin());
        assert_eq!(watch.idle_for(&activity, t0 + 9 * s), Duration::ZERO);
        assert_eq!(watch.idle_for(&activity, t0 + 10 * s), s);
    }
}
