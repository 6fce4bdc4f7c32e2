//! HTTP/1.1 keep-alive connections to instances, one pool per thread,
//! on hyper's connection-level client (`hyper::client::conn::http1`).
//!
//! Why not hyper-util's pooled client, which the gateway used before (and
//! still uses for h2c pools, upgrades and health checks): per request it
//! builds a connect future it seldom needs, races it against the pool
//! checkout, hashes the pool key under a lock and spawns a task to put the
//! connection back once the response body ends. Here a thread takes an
//! idle connection from its own pool without a lock, and the response
//! body puts the connection back when it ends.
//!
//! A connection goes back only after its response body was read to the
//! end; a body dropped half-read closes it (hyper does). Idle connections
//! past `upstream_idle_per_instance` are closed, as are those idle for
//! [`IDLE_TIMEOUT`] (checked when the pool is used).

use crate::body::Body;
use crate::pool::Instance;
use crate::ClientSettings;
use http::header::{HeaderValue, HOST};
use http::uri::Authority;
use http::{Request, Response, Uri};
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use std::cell::RefCell;
use std::collections::HashMap;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

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
    /// From the connection (hyper's error says whether it was sent).
    #[error(transparent)]
    Http(#[from] hyper::Error),
    /// From hyper-util's pooled client (h2c pools).
    #[error(transparent)]
    Pooled(#[from] hyper_util::client::legacy::Error),
}

/// A connection to one instance, with the instance's address (moved
/// along with it, never cloned per request: an `Authority` is a shared
/// buffer whose count every thread would bump).
struct Conn {
    sender: http1::SendRequest<Body>,
    authority: Authority,
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
fn take(settings: ClientSettings, instance: &Instance) -> Option<Conn> {
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
        let now = Instant::now();
        while let Some(idle) = list.pop() {
            if !idle.conn.sender.is_closed()
                && now.duration_since(idle.since) < IDLE_TIMEOUT
                && idle.conn.authority == instance.authority
            {
                return Some(idle.conn);
            }
        }
        None
    })
}

/// Puts a connection to instance `id` whose response ended back for reuse.
fn put_back(settings: ClientSettings, id: usize, conn: Conn) {
    if conn.sender.is_closed() || settings.idle_per_instance == 0 {
        return;
    }
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let Some(pool) = pool.as_mut().filter(|p| p.settings == settings) else {
            return;
        };
        let now = Instant::now();
        let list = pool.idle.entry(id).or_default();
        // The oldest first: expired ones go, then any over the cap.
        let expired = list
            .iter()
            .take_while(|i| now.duration_since(i.since) >= IDLE_TIMEOUT)
            .count();
        list.drain(..expired);
        if list.len() >= settings.idle_per_instance {
            list.remove(0);
        }
        list.push(Idle { conn, since: now });
    });
}

async fn connect(settings: ClientSettings, authority: &Authority) -> Result<Conn, UpstreamError> {
    let failed = |source| UpstreamError::Connect {
        authority: authority.to_string(),
        source,
    };
    let port = authority.port_u16().unwrap_or(80);
    // `[::1]` → `::1`: the resolver wants the bare address.
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let timeout = Duration::from_millis(settings.connect_timeout_ms);
    let stream =
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host, port))).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(failed(e)),
            Err(_) => {
                return Err(failed(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no connection within {} ms", settings.connect_timeout_ms),
                )))
            }
        };
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
    Ok(Conn {
        sender,
        authority: authority.clone(),
    })
}

/// Sends `req` (absolute URI) to `instance` of `pool`: HTTP/1.1 over this
/// thread's connections ([`send`]), h2c through hyper-util's client.
pub(crate) async fn request(
    clients: &crate::proxy::UpstreamClients,
    pool: &crate::pool::Pool,
    instance: &Instance,
    req: Request<Body>,
) -> Result<Response<ResponseBody>, UpstreamError> {
    if pool.h2c {
        let response = crate::workers::request(clients, pool, req).await?;
        return Ok(response.map(|inner| ResponseBody { inner, back: None }));
    }
    send(clients.settings, pool, instance, req).await
}

/// Sends `req` to `instance` over a pooled connection of this thread, or a
/// new one. A request that a pooled connection could
/// not take (it closed before the request was written) goes on the next
/// one, then on a new connection: it never left.
pub(crate) async fn send(
    settings: ClientSettings,
    pool: &crate::pool::Pool,
    instance: &Instance,
    mut req: Request<Body>,
) -> Result<Response<ResponseBody>, UpstreamError> {
    // HTTP/1.1 to an origin: the path and query, with a Host header.
    if req.uri().authority().is_some() {
        let origin_form = req
            .uri()
            .path_and_query()
            .map(|pq| Uri::from(pq.clone()))
            .unwrap_or_else(|| Uri::from_static("/"));
        *req.uri_mut() = origin_form;
    }
    if !req.headers().contains_key(HOST) {
        if let Ok(v) = HeaderValue::from_str(instance.authority.as_str()) {
            req.headers_mut().insert(HOST, v);
        }
    }
    loop {
        let (mut conn, reused) = match take(settings, instance) {
            Some(conn) => (conn, true),
            None => (connect(settings, &instance.authority).await?, false),
        };
        if reused {
            // Its last response ended; the connection may not have
            // noticed yet. An error means it closed meanwhile.
            if conn.sender.ready().await.is_err() {
                continue;
            }
        }
        pool.metrics.connection(&pool.name, reused);
        match conn.sender.try_send_request(req).await {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                let body = ResponseBody {
                    inner: body,
                    back: Some((settings, instance.id(), conn)),
                };
                return Ok(Response::from_parts(parts, body.returned_if_done()));
            }
            Err(mut e) => match e.take_message() {
                // Not written: safe on another connection.
                Some(back) if reused => req = back,
                _ => return Err(UpstreamError::Http(e.into_error())),
            },
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body that puts its connection back in the thread's pool
    /// when it ends.
    pub(crate) struct ResponseBody {
        #[pin]
        inner: Incoming,
        back: Option<(ClientSettings, usize, Conn)>,
    }
}

impl ResponseBody {
    /// A response without a body (204, 304, `Content-Length: 0`) frees its
    /// connection at once.
    fn returned_if_done(mut self) -> Self {
        if self.inner.is_end_stream() {
            if let Some((settings, id, conn)) = self.back.take() {
                put_back(settings, id, conn);
            }
        }
        self
    }
}

impl HttpBody for ResponseBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<bytes::Bytes>, hyper::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) => true,
            // hyper stops polling a body that says it ended after its
            // last frame, so the connection goes back then.
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            Poll::Ready(Some(Err(_))) => {
                this.back.take();
                false
            }
            Poll::Pending => false,
        };
        if ended {
            if let Some((settings, id, conn)) = this.back.take() {
                put_back(settings, id, conn);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
