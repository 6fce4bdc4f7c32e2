//! `send_timeout_ms` for responses that hyper's server sends (HTTP/2, and
//! HTTP/1.x with `http1_server = "hyper"`).
//!
//! On HTTP/1.1 a client that stops reading leaves a socket write waiting,
//! which `listener::SendTimeout` times. On HTTP/2 it does not: the client
//! simply stops granting flow-control window, hyper stops asking the
//! response body for more, and every socket write still succeeds. The
//! response would hold its upstream connection (and its count of
//! in-flight requests) for as long as the client liked.
//!
//! So each response body with something to send is [`Watched`]: after it
//! hands hyper a data frame, the time until hyper asks again is a stall
//! (hyper asks at once while the stream has window). The connection's
//! loop sweeps its [`Watches`] a few times per `send_timeout`, and a body
//! stalled for longer is dropped: the upstream response is let go (its
//! connection closed, the instance's in-flight count released) and hyper,
//! polling next, gets an error and resets the stream. A body waiting for
//! its upstream (an SSE stream between events) is not stalled: hyper is
//! the one waiting.

use crate::body::{Body, BoxError};
use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// The watched response bodies of one connection.
pub(crate) struct Watches {
    limit: Duration,
    live: Mutex<Vec<Arc<Watch>>>,
}

struct Watch(Mutex<State>);

struct State {
    /// `None` once it ended, was dropped by hyper, or timed out.
    body: Option<Body>,
    /// Since when the body has waited for hyper to ask for more.
    waiting_since: Option<Instant>,
    timed_out: bool,
}

impl Watch {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held leaves plain data behind.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Watches {
    pub(crate) fn new(limit: Duration) -> Arc<Watches> {
        Arc::new(Watches {
            limit,
            live: Mutex::new(Vec::new()),
        })
    }

    /// How often the connection's loop should [`sweep`](Self::sweep).
    pub(crate) fn sweep_every(&self) -> Duration {
        (self.limit / 4).clamp(Duration::from_millis(10), Duration::from_secs(5))
    }

    /// `body`, watched (one with nothing to send is left as it is).
    pub(crate) fn watch(&self, body: Body) -> Body {
        if body.is_end_stream() {
            return body;
        }
        let watch = Arc::new(Watch(Mutex::new(State {
            body: Some(body),
            // Until hyper first asks: a stream opened with no window
            // stalls from the start.
            waiting_since: Some(Instant::now()),
            timed_out: false,
        })));
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        // Ended bodies are forgotten here too, not only by the sweep: a
        // busy connection would otherwise keep thousands between sweeps.
        if live.len() >= 64 && live.len().is_power_of_two() {
            live.retain(|w| w.state().body.is_some());
        }
        live.push(Arc::clone(&watch));
        drop(live);
        http_body_util::BodyExt::boxed_unsync(Watched {
            watch,
            limit: self.limit,
        })
    }

    /// Drops the bodies stalled for `limit` or longer, and forgets the
    /// ended ones; returns how many timed out.
    pub(crate) fn sweep(&self, now: Instant) -> usize {
        let mut timed_out = 0;
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|watch| {
            let mut state = watch.state();
            if state.body.is_none() {
                return false;
            }
            if state
                .waiting_since
                .is_some_and(|since| now.duration_since(since) >= self.limit)
            {
                state.body = None;
                state.timed_out = true;
                timed_out += 1;
                return false;
            }
            true
        });
        drop(live);
        if timed_out > 0 {
            metrics::counter!("shoal_gateway_send_timeouts_total").increment(timed_out as u64);
            tracing::warn!(
                streams = timed_out,
                "dropped HTTP/2 responses: {}",
                crate::listener::send_timed_out(self.limit)
            );
        }
        timed_out
    }
}

/// A service whose response bodies are watched (`None`: left alone). A
/// struct rather than `map_response` with a closure, whose signature
/// rustc cannot make general enough over the boxed error's lifetime.
#[derive(Clone)]
pub(crate) struct WatchResponses<S> {
    pub(crate) inner: S,
    pub(crate) watches: Option<Arc<Watches>>,
}

impl<S, B> tower::Service<http::Request<B>> for WatchResponses<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = WatchFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        WatchFuture {
            inner: self.inner.call(req),
            watches: self.watches.clone(),
        }
    }
}

pin_project_lite::pin_project! {
    pub(crate) struct WatchFuture<F> {
        #[pin]
        inner: F,
        watches: Option<Arc<Watches>>,
    }
}

impl<F, E> std::future::Future for WatchFuture<F>
where
    F: std::future::Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = Result<http::Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = std::task::ready!(this.inner.poll(cx))?;
        Poll::Ready(Ok(match this.watches.take() {
            Some(w) => response.map(|body| w.watch(body)),
            None => response,
        }))
    }
}

/// A response body under a [`Watches`].
struct Watched {
    watch: Arc<Watch>,
    limit: Duration,
}

impl HttpBody for Watched {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut state = self.watch.state();
        state.waiting_since = None;
        let Some(body) = state.body.as_mut() else {
            if state.timed_out {
                let why = crate::listener::send_timed_out(self.limit);
                return Poll::Ready(Some(Err(why.into())));
            }
            return Poll::Ready(None);
        };
        let polled = Pin::new(body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(_))) => state.waiting_since = Some(Instant::now()),
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => state.body = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        let state = self.watch.state();
        !state.timed_out && state.body.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        match &self.watch.state().body {
            Some(body) => body.size_hint(),
            None => SizeHint::default(),
        }
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        // Ended or cancelled: the sweep forgets it.
        self.watch.state().body = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn two_chunks() -> Body {
        let chunks = futures_util::stream::iter(vec![
            Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"one"))),
            Ok(Frame::data(Bytes::from_static(b"two"))),
        ]);
        http_body_util::StreamBody::new(chunks).boxed_unsync()
    }

    #[tokio::test]
    async fn a_body_not_asked_for_more_within_the_limit_is_dropped_and_fails() {
        let watches = Watches::new(Duration::from_millis(100));
        let mut body = watches.watch(two_chunks());
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "one");
        // Within the limit nothing happens.
        assert_eq!(watches.sweep(Instant::now()), 0);
        // Past it, the stalled body goes; the next ask fails.
        assert_eq!(
            watches.sweep(Instant::now() + Duration::from_millis(150)),
            1
        );
        let err = body.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("send_timeout_ms"), "{err}");
        assert_eq!(watches.live.lock().unwrap().len(), 0);
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_or_dropped_is_forgotten_not_timed_out() {
        let watches = Watches::new(Duration::from_millis(100));
        let body = watches.watch(two_chunks());
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(all, "onetwo");
        let dropped = watches.watch(two_chunks());
        drop(dropped);
        let later = Instant::now() + Duration::from_secs(1);
        assert_eq!(watches.sweep(later), 0);
        assert_eq!(watches.live.lock().unwrap().len(), 0);
        // An empty body is not watched at all.
        let _ = watches.watch(crate::body::empty());
        assert_eq!(watches.live.lock().unwrap().len(), 0);
    }

    #[tokio::test]
    async fn ended_bodies_do_not_pile_up_between_sweeps() {
        let watches = Watches::new(Duration::from_secs(60));
        for _ in 0..10_000 {
            drop(watches.watch(two_chunks()));
        }
        let kept = watches.live.lock().unwrap().len();
        assert!(kept <= 64, "{kept} ended bodies kept");
    }

    #[tokio::test]
    async fn a_body_waiting_for_its_upstream_is_not_stalled() {
        let watches = Watches::new(Duration::from_millis(100));
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|frame| (frame, rx))
        });
        let upstream = http_body_util::StreamBody::new(frames).boxed_unsync();
        let mut body = watches.watch(upstream);
        // hyper asks; the upstream has nothing yet (an SSE stream
        // between events).
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut body).poll_frame(&mut cx).is_pending());
        assert_eq!(watches.sweep(Instant::now() + Duration::from_secs(5)), 0);
        tx.send(Ok(Frame::data(Bytes::from_static(b"event"))))
            .await
            .unwrap();
        let got = body.frame().await.unwrap().unwrap();
        assert_eq!(got.into_data().unwrap(), "event");
    }
}
