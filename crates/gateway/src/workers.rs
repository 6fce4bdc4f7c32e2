//! Thread per core: the gateway serves its connections on `workers`
//! threads, each with its own single-threaded tokio runtime and its own
//! upstream keep-alive pool, as nginx and HAProxy run one event loop per
//! worker. The thread that runs [`Gateway::run`](crate::Gateway::run)
//! accepts, runs the health checks and the other background tasks, and
//! serves its share of the connections too; the others get theirs handed
//! over, round robin, and serve them to the end.
//!
//! Why not one multi-threaded runtime: a proxied request wakes the client
//! connection's task, the upstream connection's task and the response
//! path in turn; with work stealing those hops cross threads (and the
//! pooled upstream connection may live on another thread than the client
//! connection), which cost 16–22% of the throughput at one thread and made
//! two threads slower than one (bench/README.md, "Gateway").

use crate::listener::Connections;
use crate::pool::Pool;
use crate::proxy::UpstreamClients;
use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

thread_local! {
    /// A worker thread's own upstream client: its connections are made,
    /// pooled and driven on this thread's runtime. Unset on the accepting
    /// thread, which uses the state's client.
    static LOCAL_CLIENT: RefCell<Option<UpstreamClients>> = const { RefCell::new(None) };
}

/// Sends `req` to an instance of `pool` through this thread's clients,
/// else `shared` (the current settings generation's). A worker thread
/// builds its clients again when a reload changed their settings.
pub(crate) fn request(
    shared: &UpstreamClients,
    pool: &Pool,
    req: http::Request<crate::body::Body>,
) -> hyper_util::client::legacy::ResponseFuture {
    LOCAL_CLIENT.with(|local| {
        let mut local = local.borrow_mut();
        match local.as_mut() {
            None => shared.for_pool(pool).request(req),
            Some(own) => {
                if !own.same_as(shared) {
                    *own = crate::upstream_clients(shared.settings, &shared.tls);
                }
                own.for_pool(pool).request(req)
            }
        }
    })
}

/// The threads that serve connections: `workers`, or one per core for 0.
pub(crate) fn count(workers: usize) -> usize {
    match workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

type ServeFn = Box<dyn FnOnce(TcpStream) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// Accepted connections waiting for one worker thread at most; past it
/// the accepting thread serves them itself (the worker is behind), so
/// the queue stays bounded even with `max_connections = 0`.
const HAND_OVER_MAX: usize = 1024;

/// A worker thread, fed accepted connections through a bounded channel.
/// Dropping every handle ends its intake; it then waits for the open
/// connections (at most the shutdown grace period) and stops.
pub(crate) struct Worker {
    tx: mpsc::Sender<(std::net::TcpStream, ServeFn)>,
}

impl Worker {
    /// Moves `stream` to this worker's runtime and serves it there; if the
    /// worker is gone (its runtime could not start) or has
    /// [`HAND_OVER_MAX`] connections waiting, serves it on the calling
    /// thread instead.
    pub(crate) fn hand_over<F>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + 'static,
    {
        // A tokio stream belongs to the runtime that registered it: hand
        // over the bare socket and register it again over there.
        match stream.into_std() {
            Ok(std) => {
                let refused = match self.tx.try_send((std, Box::new(serve))) {
                    Ok(()) => None,
                    Err(mpsc::error::TrySendError::Full(back)) => {
                        tracing::debug!("a gateway worker thread is behind; serving here");
                        Some(back)
                    }
                    Err(mpsc::error::TrySendError::Closed(back)) => {
                        tracing::warn!("a gateway worker thread is gone; serving here");
                        Some(back)
                    }
                };
                if let Some((std, serve)) = refused {
                    match TcpStream::from_std(std) {
                        Ok(stream) => {
                            tokio::spawn(serve(stream));
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot serve a connection"),
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot hand a connection over"),
        }
    }
}

/// Starts `extra` worker threads.
pub(crate) fn start(
    extra: usize,
    clients: &UpstreamClients,
    connections: Arc<Connections>,
    grace: Duration,
) -> Vec<Worker> {
    let mut workers = Vec::with_capacity(extra);
    for i in 1..=extra {
        let (tx, rx) = mpsc::channel(HAND_OVER_MAX);
        let client = crate::upstream_clients(clients.settings, &clients.tls);
        let connections = Arc::clone(&connections);
        let spawned = std::thread::Builder::new()
            .name(format!("shoal-gw-{i}"))
            .spawn(move || run(rx, client, connections, grace));
        match spawned {
            Ok(_) => workers.push(Worker { tx }),
            Err(e) => {
                // Serve on fewer threads rather than not at all.
                tracing::error!(error = %e, "cannot start a gateway worker thread");
                break;
            }
        }
    }
    workers
}

fn run(
    mut rx: mpsc::Receiver<(std::net::TcpStream, ServeFn)>,
    client: UpstreamClients,
    connections: Arc<Connections>,
    grace: Duration,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start a gateway worker runtime");
            return;
        }
    };
    LOCAL_CLIENT.with(|local| {
        *local.borrow_mut() = Some(client);
    });
    runtime.block_on(async move {
        while let Some((std, serve)) = rx.recv().await {
            match TcpStream::from_std(std) {
                Ok(stream) => {
                    tokio::spawn(serve(stream));
                }
                Err(e) => tracing::warn!(error = %e, "cannot serve a handed-over connection"),
            }
        }
        // Intake ended (the gateway is stopping): let open connections
        // finish, as the accepting thread does.
        let _ = tokio::time::timeout(grace, connections.all_closed()).await;
    });
}
