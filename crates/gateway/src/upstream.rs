//! Upstream connections: HTTP/1.1 keep-alive connections to instances,
//! one pool per thread, spoken by the gateway's own codec (`h1.rs`) in
//! the request's task; h2c pools go through hyper-util's client.
//!
//! Why not hyper-util's pooled client for HTTP/1.1, which the gateway
//! used first (and still uses for h2c pools, upgrades and health checks):
//! per request it builds a connect future it seldom needs, races it
//! against the pool checkout, hashes the pool key under a lock and spawns
//! a task to put the connection back once the response body ends. Here a
//! thread takes an idle connection from its own pool without a lock, and
//! the response body puts the connection back when it ends.
//!
//! A connection goes back only after its response body was read to the
//! end; a body dropped half-read closes it. Idle connections past
//! `upstream_idle_per_instance` are closed, as are those idle for
//! [`IDLE_TIMEOUT`] (checked when the pool is used) and those the
//! instance closed meanwhile (seen when they are taken).

use crate::h1::{Conn, H1Body, H1Error, ReqBody, ReqHead, Stream};
use crate::pool::Instance;
use crate::ClientSettings;
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use std::cell::RefCell;
use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio_util::either::Either;

/// How long an idle connection is kept for reuse.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a request got no response from the instance.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection: refused, unreachable, or not within the connect
    /// timeout. The request never left.
    #[error("connect to {authority} failed: {source}")]
    Connect {
        authority: String,
        #[source]
        source: std::io::Error,
    },
    /// From an HTTP/1.1 connection (the error says whether it was sent).
    #[error(transparent)]
    H1(#[from] H1Error),
    /// From hyper-util's pooled client (h2c pools).
    #[error(transparent)]
    Pooled(#[from] hyper_util::client::legacy::Error),
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// A hasher for instance ids (addresses): no need for SipHash.
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_usize(&mut self, n: usize) {
        self.0 = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// One thread's idle connections, by [`Instance::id`]. An id can be
/// taken by a later instance once the first is gone, so a connection is
/// used only when its address is the instance's.
struct Connections {
    settings: ClientSettings,
    idle: HashMap<usize, Vec<Idle>, std::hash::BuildHasherDefault<IdHasher>>,
}

thread_local! {
    static POOL: RefCell<Option<Connections>> = const { RefCell::new(None) };
}

/// Takes an idle connection to `instance` that is not known to be closed,
/// dropping stale ones.
fn take(settings: ClientSettings, instance: &Instance, now: Instant) -> Option<Conn> {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let pool = match pool.as_mut() {
            Some(p) if p.settings == settings => p,
            // First use on this thread, or a reload changed the settings:
            // connections made under the old ones are dropped.
            _ => pool.insert(Connections {
                settings,
                idle: HashMap::default(),
            }),
        };
        let list = pool.idle.get_mut(&instance.id())?;
        while let Some(idle) = list.pop() {
            if now.saturating_duration_since(idle.since) < IDLE_TIMEOUT
                // Byte for byte (the connection's is a clone of an
                // instance's): `Authority`'s own `==` ignores case, a
                // byte at a time.
                && idle.conn.authority.as_str() == instance.authority.as_str()
                && idle.conn.is_usable()
            {
                let mut conn = idle.conn;
                conn.taken_at = now;
                return Some(conn);
            }
        }
        None
    })
}

/// Puts a connection to instance `id` whose response ended back for reuse.
pub(crate) fn put_back(settings: ClientSettings, id: usize, conn: Conn) {
    if settings.idle_per_instance == 0 {
        return;
    }
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let Some(pool) = pool.as_mut().filter(|p| p.settings == settings) else {
            return;
        };
        // When the connection was taken, not now: one clock reading less
        // per request, and an idle time at most one response too long.
        let now = conn.taken_at;
        let list = pool.idle.entry(id).or_default();
        // Roughly the oldest first (stamps are when each was taken, and
        // a long response comes back late): expired ones at the front go,
        // then the first over the cap. `take` checks each one's age too.
        let expired = list
            .iter()
            .take_while(|i| now.saturating_duration_since(i.since) >= IDLE_TIMEOUT)
            .count();
        list.drain(..expired);
        if list.len() >= settings.idle_per_instance {
            list.remove(0);
        }
        list.push(Idle { conn, since: now });
    });
}

/// A new connection to `instance`: TCP, then TLS for an `https://` one
/// (its host name checked against its certificate), both within the
/// connect timeout.
async fn connect(
    clients: &crate::proxy::UpstreamClients,
    instance: &Instance,
    now: Instant,
) -> Result<Conn, UpstreamError> {
    let authority = &instance.authority;
    let failed = |source| UpstreamError::Connect {
        authority: authority.to_string(),
        source,
    };
    let port = crate::pool::port_of(&instance.scheme, authority);
    // `[::1]` → `::1`: the resolver wants the bare address.
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let timeout_ms = clients.settings.connect_timeout_ms;
    let tls = instance.scheme == http::uri::Scheme::HTTPS;
    let open = async {
        let tcp = tokio::net::TcpStream::connect((host, port)).await?;
        let _ = tcp.set_nodelay(true);
        if !tls {
            return Ok(Either::Left(tcp));
        }
        let name = rustls_pki_types::ServerName::try_from(host.to_string())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let stream = clients.tls.h1.connect(name, tcp).await?;
        Ok::<Stream, std::io::Error>(Either::Right(Box::new(stream)))
    };
    match tokio::time::timeout(Duration::from_millis(timeout_ms), open).await {
        Ok(Ok(stream)) => Ok(Conn::new(stream, authority.clone(), now)),
        Ok(Err(e)) => Err(failed(e)),
        Err(_) => Err(failed(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no connection within {timeout_ms} ms"),
        ))),
    }
}

/// Sends `req` (absolute-form target) to an instance of an h2c pool
/// through hyper-util's client.
pub(crate) async fn h2c(
    clients: &crate::proxy::UpstreamClients,
    pool: &crate::pool::Pool,
    req: Request<crate::body::Body>,
) -> Result<Response<ResponseBody>, UpstreamError> {
    let response = crate::workers::request(clients, pool, req).await?;
    Ok(response.map(ResponseBody::Pooled))
}

/// Sends a request to `instance` over a pooled HTTP/1.1 connection of
/// this thread, or a new one. A request that a pooled connection could
/// not take (the first write failed) goes on the next one, then on a new
/// connection: it never left.
pub(crate) async fn send(
    clients: &crate::proxy::UpstreamClients,
    pool: &crate::pool::Pool,
    instance: &Instance,
    head: &ReqHead<'_>,
    mut body: ReqBody,
    now: Instant,
) -> Result<Response<ResponseBody>, UpstreamError> {
    let settings = clients.settings;
    loop {
        let (mut conn, reused) = match take(settings, instance, now) {
            Some(conn) => (conn, true),
            // Boxed: a new connection is the rare case, and its future
            // (TCP and TLS handshakes) would size every request's.
            None => (Box::pin(connect(clients, instance, now)).await?, false),
        };
        pool.metrics.connection(&pool.name, reused);
        let (rparts, framing, keep_alive) = match conn.write_request(head, body).await {
            Ok(()) => conn.read_head(head.method).await?,
            // Not written: safe on another connection.
            Err((H1Error::NotWritten(_), Some(back))) if reused => {
                body = back;
                continue;
            }
            // The instance stopped taking the request: it may have
            // answered first (a 413 in the middle of an upload, then
            // close), and that answer is the client's. The connection
            // is not reused: the request was cut short.
            Err((H1Error::Io(e), _)) => match conn.read_head(head.method).await {
                Ok((rparts, framing, _)) => (rparts, framing, false),
                Err(_) => return Err(H1Error::Io(e).into()),
            },
            Err((e, _)) => return Err(e.into()),
        };
        let rbody = H1Body::new(conn, framing, keep_alive, (settings, instance.id()));
        return Ok(Response::from_parts(rparts, ResponseBody::H1(rbody)));
    }
}

/// A response body: from this thread's HTTP/1.1 connection (which it puts
/// back in the pool when it ends), or from hyper-util's client.
pub(crate) enum ResponseBody {
    H1(H1Body),
    Pooled(Incoming),
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        // Both are `Unpin`.
        match self.get_mut() {
            ResponseBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            ResponseBody::Pooled(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::H1(b) => b.is_end_stream(),
            ResponseBody::Pooled(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::H1(b) => b.size_hint(),
            ResponseBody::Pooled(b) => b.size_hint(),
        }
    }
}
