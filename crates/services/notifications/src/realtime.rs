//! Realtime events to logged-in users: `publish_user_event` stores the
//! event (for replay) and publishes it on the broadcast bus channel
//! `notifications.user`; every instance's `Hub` receives every event and
//! hands it to that user's open connections on this instance
//! (`GET /api/notifications/stream` as SSE, `GET /api/notifications/ws` as
//! a WebSocket). Reconnecting clients replay what they missed from the
//! table (`Last-Event-ID`, or `?last_event_id=` on the WebSocket).
//!
//! Every connection has a bounded buffer: a consumer that falls
//! `notifications.stream_buffer` events behind is disconnected (counted in
//! `shoal_notifications_stream_dropped_total`) rather than buffered without
//! bound; it reconnects and replays. When the bus says messages may have
//! been missed, every connection re-reads the table after its last event.
//!
//! An event from the bus is rendered once for all the connections it goes
//! to ([`Outgoing`]): its JSON, and its SSE frame on first use; each
//! stream then writes shared bytes.

use crate::NotifyError;
use axum::body::Bytes;
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use shoal_backends::{now_millis, Database, RecvError};
use shoal_core::Problem;
use shoal_runtime::error::ApiResult;
use shoal_runtime::{ApiError, ApiJson, AppContext, CurrentSession};
use std::collections::{HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

/// The bus channel that carries every user event to every instance.
pub const USER_EVENTS_CHANNEL: &str = "notifications.user";

/// Largest `data` of one event, as JSON bytes.
const MAX_EVENT_BYTES: usize = 64 * 1024;

/// One event for one user, as published and sent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UserEvent {
    pub id: String,
    #[serde(skip_serializing, default)]
    pub user_id: String,
    pub kind: String,
    pub data: Value,
    pub created_at: i64,
}

#[derive(Debug, sqlx::FromRow)]
struct EventRow {
    id: String,
    user_id: String,
    kind: String,
    data: String,
    created_at: i64,
}

impl From<EventRow> for UserEvent {
    fn from(r: EventRow) -> Self {
        UserEvent {
            id: r.id,
            user_id: r.user_id,
            kind: r.kind,
            data: serde_json::from_str(&r.data).unwrap_or(Value::Null),
            created_at: r.created_at,
        }
    }
}

/// What travels on the bus: the event plus its user.
#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    user_id: String,
    event: UserEvent,
}

fn valid_kind(kind: &str) -> bool {
    !kind.is_empty()
        && kind.len() <= 64
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

/// Sends an event to every open connection of `user_id` on every instance,
/// and keeps it for replay (`notifications.replay_max_events` per user,
/// `notifications.replay_retention_secs`). Callable from a serve instance
/// or a worker. Returns the event id.
///
/// The event is stored before it is published: if the bus fails, the
/// error is logged and connected clients get it on their next replay.
pub async fn publish_user_event(
    ctx: &AppContext,
    user_id: &str,
    kind: &str,
    data: Value,
) -> Result<String, NotifyError> {
    if !valid_kind(kind) {
        return Err(NotifyError::Invalid(format!(
            "event kind `{kind}` must be 1-64 characters of a-z, 0-9, `.`, `_`, `-`"
        )));
    }
    let text = serde_json::to_string(&data).map_err(|e| NotifyError::Invalid(e.to_string()))?;
    if text.len() > MAX_EVENT_BYTES {
        return Err(NotifyError::Invalid(format!(
            "event data is {} bytes; the limit is {MAX_EVENT_BYTES}",
            text.len()
        )));
    }
    let event = UserEvent {
        id: shoal_core::ids::new_id(),
        user_id: user_id.to_string(),
        kind: kind.to_string(),
        data,
        created_at: now_millis(),
    };
    sqlx::query(
        "INSERT INTO notification_events (id, user_id, kind, data, created_at) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&event.id)
    .bind(user_id)
    .bind(kind)
    .bind(&text)
    .bind(event.created_at)
    .execute(ctx.db.pool())
    .await?;
    // Keep the newest `replay_max_events` of this user.
    sqlx::query(
        "DELETE FROM notification_events WHERE user_id = $1 AND id < (
            SELECT id FROM notification_events WHERE user_id = $1 ORDER BY id DESC LIMIT 1 OFFSET $2)",
    )
    .bind(user_id)
    .bind(ctx.settings.notifications.replay_max_events as i64 - 1)
    .execute(ctx.db.pool())
    .await?;
    let id = event.id.clone();
    let envelope = Envelope {
        user_id: user_id.to_string(),
        event,
    };
    let bytes = serde_json::to_vec(&envelope).map_err(|e| NotifyError::Invalid(e.to_string()))?;
    if let Err(e) = ctx.bus.publish(USER_EVENTS_CHANNEL, &bytes).await {
        metrics::counter!("shoal_notifications_publish_errors_total").increment(1);
        tracing::warn!(error = %e, event_id = %id, "user event stored but not broadcast; clients get it on replay");
    }
    metrics::counter!("shoal_notifications_events_published_total").increment(1);
    Ok(id)
}

/// An event as the streams send it, rendered once and shared by every
/// stream it goes to.
#[derive(Debug)]
struct Outgoing {
    /// Empty for the stream's own notices (reconnect, reset).
    id: String,
    kind: String,
    /// `{"id", "kind", "data", "created_at"}`: a WebSocket's text message
    /// and the SSE `data:` line.
    json: axum::extract::ws::Utf8Bytes,
    /// The whole SSE frame, made by the first stream that sends it.
    sse: OnceLock<Bytes>,
}

impl Outgoing {
    fn new(e: &UserEvent) -> Outgoing {
        Outgoing {
            id: e.id.clone(),
            kind: e.kind.clone(),
            json: serde_json::to_string(e)
                .unwrap_or_else(|_| "{}".into())
                .into(),
            sse: OnceLock::new(),
        }
    }

    /// `id: <id>` (when it has one), then `data: <json>` (serde_json
    /// writes no newline), then the blank line: the frame every stream
    /// of this event writes.
    fn sse_frame(&self) -> Bytes {
        self.sse
            .get_or_init(|| Bytes::from(sse_frame(&self.id, None, self.json.as_str())))
            .clone()
    }
}

/// One SSE event's bytes.
fn sse_frame(id: &str, retry: Option<Duration>, json: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len() + id.len() + 32);
    if let Some(retry) = retry {
        out.extend_from_slice(format!("retry: {}\n", retry.as_millis()).as_bytes());
    }
    if !id.is_empty() {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(id.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(b"data: ");
    out.extend_from_slice(json.as_bytes());
    out.extend_from_slice(b"\n\n");
    out
}

#[derive(Debug, Clone)]
enum Item {
    Event(Arc<Outgoing>),
    /// Events may have been missed: re-read the table.
    Resync,
    /// Nothing was sent for `heartbeat_secs`: an SSE comment, a
    /// WebSocket ping. From the hub's one timer, not a timer per stream.
    Heartbeat,
    /// The instance drains: tell the client to reconnect elsewhere, after
    /// what is queued.
    Leave,
}

struct Conn {
    id: u64,
    inbox: Arc<Inbox>,
}

impl Drop for Conn {
    /// Out of the hub (dropped as too slow, or gone): its stream ends
    /// once it has taken what is queued.
    fn drop(&mut self) {
        self.inbox.close();
    }
}

/// One stream's queue of items from the hub: bounded, and a push never
/// waits (a full inbox is a consumer too slow, dropped). Small on
/// purpose: tokio's bounded channel, used before, cost every stream
/// several times more (its cache-padded state and a first block of 32
/// slots; DHAT figures in bench/README.md, "Memory per connection"), and
/// this holds no buffer while empty.
struct Inbox {
    queue: Mutex<Queued>,
    waker: futures_util::task::AtomicWaker,
}

struct Queued {
    items: VecDeque<Item>,
    closed: bool,
}

/// Why a push was refused.
enum Refused {
    Full,
    Closed,
}

impl Inbox {
    fn new() -> Inbox {
        Inbox {
            queue: Mutex::new(Queued {
                items: VecDeque::new(),
                closed: false,
            }),
            waker: futures_util::task::AtomicWaker::new(),
        }
    }

    fn push(&self, item: Item, capacity: usize) -> Result<(), Refused> {
        {
            let mut q = self.queue.lock().unwrap();
            if q.closed {
                return Err(Refused::Closed);
            }
            if q.items.len() >= capacity {
                return Err(Refused::Full);
            }
            q.items.push_back(item);
        }
        self.waker.wake();
        Ok(())
    }

    /// Queues `item` whatever the bound (the drain's `Leave`), or only
    /// when nothing waits (a heartbeat: a stream with items queued is not
    /// idle).
    fn push_control(&self, item: Item) {
        {
            let mut q = self.queue.lock().unwrap();
            let idle_only = matches!(item, Item::Heartbeat);
            if q.closed || (idle_only && !q.items.is_empty()) {
                return;
            }
            q.items.push_back(item);
        }
        self.waker.wake();
    }

    fn close(&self) {
        self.queue.lock().unwrap().closed = true;
        self.waker.wake();
    }

    /// The next item; `None` once closed and emptied.
    fn poll_next(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Item>> {
        let mut q = self.queue.lock().unwrap();
        if let Some(item) = q.items.pop_front() {
            if q.items.is_empty() {
                // Idle again: no buffer held until the next event.
                q.items = VecDeque::new();
            }
            return std::task::Poll::Ready(Some(item));
        }
        if q.closed {
            return std::task::Poll::Ready(None);
        }
        // Registered under the lock: a push after the check above wakes
        // this registration.
        self.waker.register(cx.waker());
        std::task::Poll::Pending
    }

    async fn next(&self) -> Option<Item> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }
}

/// This instance's open connections by user.
pub(crate) struct Hub {
    conns: Mutex<HashMap<String, Vec<Conn>>>,
    next_id: AtomicU64,
    open: AtomicUsize,
    buffer: usize,
    max_connections: usize,
    max_per_user: usize,
    /// The streams are told to reconnect spread over this window after
    /// the instance starts draining (or its bus closes), in a random
    /// order.
    drain_window: Duration,
    /// Set when that began: a stream that opens later is told at once.
    leaving: AtomicBool,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("open", &self.open.load(Ordering::Relaxed))
            .finish()
    }
}

/// A connection's place in the hub; leaving on drop.
struct Registration {
    hub: Arc<Hub>,
    /// Shared with the stream's `Feed` (one copy per stream).
    user_id: Arc<str>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.remove(&self.user_id, self.id);
    }
}

impl Hub {
    /// Creates the hub and its bus listener. The listener stops when the
    /// hub (held by the router) is dropped or the bus closes.
    pub(crate) fn start(ctx: &AppContext) -> Arc<Hub> {
        let s = &ctx.settings.notifications;
        let hub = Arc::new(Hub {
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            open: AtomicUsize::new(0),
            buffer: s.stream_buffer.max(1),
            max_connections: s.max_connections,
            max_per_user: s.max_connections_per_user,
            drain_window: Duration::from_millis(s.drain_window_ms),
            leaving: AtomicBool::new(false),
        });
        tokio::spawn(listen(ctx.clone(), Arc::downgrade(&hub)));
        hub
    }

    fn register(self: &Arc<Self>, user_id: &str) -> Result<(Registration, Arc<Inbox>), ApiError> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.max_connections {
            self.open.fetch_sub(1, Ordering::Relaxed);
            metrics::counter!("shoal_notifications_stream_refused_total", "reason" => "instance")
                .increment(1);
            return Err(Problem::unavailable(
                "this instance holds its maximum of realtime connections; retry shortly",
                2,
            )
            .overloaded(shoal_core::problem::Overload::Unprocessed)
            .into());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let inbox = Arc::new(Inbox::new());
        {
            let mut conns = self.conns.lock().unwrap();
            let list = conns.entry(user_id.to_string()).or_default();
            if list.len() >= self.max_per_user {
                drop(conns);
                self.open.fetch_sub(1, Ordering::Relaxed);
                metrics::counter!("shoal_notifications_stream_refused_total", "reason" => "user")
                    .increment(1);
                return Err(Problem::too_many_requests(
                    format!(
                        "you hold {} realtime connections on this instance, the most allowed; close one (each browser tab needs only one)",
                        self.max_per_user
                    ),
                    5,
                )
                .into());
            }
            list.push(Conn {
                id,
                inbox: Arc::clone(&inbox),
            });
        }
        metrics::gauge!("shoal_notifications_connections").increment(1.0);
        shoal_runtime::app::OPEN_STREAMS.fetch_add(1, Ordering::Relaxed);
        if self.leaving.load(Ordering::Relaxed) {
            inbox.push_control(Item::Leave);
        }
        Ok((
            Registration {
                hub: self.clone(),
                user_id: Arc::from(user_id),
                id,
            },
            inbox,
        ))
    }

    fn remove(&self, user_id: &str, id: u64) {
        let mut map = self.conns.lock().unwrap();
        if let Some(list) = map.get_mut(user_id) {
            let before = list.len();
            list.retain(|c| c.id != id);
            if list.len() < before {
                self.open.fetch_sub(1, Ordering::Relaxed);
                metrics::gauge!("shoal_notifications_connections").decrement(1.0);
                shoal_runtime::app::OPEN_STREAMS.fetch_sub(1, Ordering::Relaxed);
            }
            if list.is_empty() {
                map.remove(user_id);
            }
        }
    }

    /// Hands `item` to each of the user's connections without waiting; a
    /// connection whose buffer is full is dropped.
    fn deliver(&self, user_id: &str, item: Item) {
        let mut map = self.conns.lock().unwrap();
        let Some(list) = map.get_mut(user_id) else {
            return;
        };
        let before = list.len();
        let capacity = self.buffer;
        list.retain(|c| match c.inbox.push(item.clone(), capacity) {
            Ok(()) => true,
            Err(Refused::Full) => {
                metrics::counter!("shoal_notifications_stream_dropped_total").increment(1);
                tracing::info!(user_id, "realtime consumer too slow; disconnected");
                false
            }
            Err(Refused::Closed) => false,
        });
        let gone = before - list.len();
        if gone > 0 {
            self.open.fetch_sub(gone, Ordering::Relaxed);
            metrics::gauge!("shoal_notifications_connections").decrement(gone as f64);
            shoal_runtime::app::OPEN_STREAMS.fetch_sub(gone, Ordering::Relaxed);
        }
        if list.is_empty() {
            map.remove(user_id);
        }
    }

    /// A heartbeat to every stream with nothing queued.
    fn heartbeat(&self) {
        let conns = self.conns.lock().unwrap();
        for c in conns.values().flatten() {
            c.inbox.push_control(Item::Heartbeat);
        }
    }

    /// Begins moving every stream away (once): each is told to reconnect,
    /// after what it has queued, at its own moment, the streams in a
    /// random order spread evenly over `drain_window`, so their clients
    /// do not all come back at once. One task for all, no timer per
    /// stream.
    fn start_leaving(self: &Arc<Self>) {
        if self.leaving.swap(true, Ordering::Relaxed) {
            return;
        }
        let mut inboxes: Vec<Arc<Inbox>> = {
            let conns = self.conns.lock().unwrap();
            conns
                .values()
                .flatten()
                .map(|c| Arc::clone(&c.inbox))
                .collect()
        };
        // Fisher-Yates: a random order.
        for i in (1..inboxes.len()).rev() {
            inboxes.swap(i, rand::random_range(0..=i));
        }
        let window = self.drain_window;
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let n = inboxes.len().max(1) as f64;
            for (i, inbox) in inboxes.into_iter().enumerate() {
                tokio::time::sleep_until(start + window.mul_f64(i as f64 / n)).await;
                inbox.push_control(Item::Leave);
            }
        });
    }

    fn resync_all(&self) {
        let users: Vec<String> = self.conns.lock().unwrap().keys().cloned().collect();
        for user in users {
            self.deliver(&user, Item::Resync);
        }
    }
}

async fn listen(ctx: AppContext, hub: Weak<Hub>) {
    let mut sub = loop {
        match ctx.bus.subscribe(USER_EVENTS_CHANNEL).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(error = %e, "notifications: cannot subscribe to the bus; retrying");
                if hub.strong_count() == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let heartbeat = Duration::from_secs(ctx.settings.notifications.heartbeat_secs);
    let mut last_heartbeat = tokio::time::Instant::now();
    loop {
        tokio::select! {
            msg = sub.recv() => {
                let Some(hub) = hub.upgrade() else { return };
                match msg {
                    Ok(bytes) => match serde_json::from_slice::<Envelope>(&bytes) {
                        Ok(env) => {
                            // Rendered here, once for every stream.
                            let event = Outgoing::new(&env.event);
                            hub.deliver(&env.user_id, Item::Event(Arc::new(event)));
                        }
                        Err(e) => tracing::warn!(error = %e, "notifications: undecodable bus message"),
                    },
                    Err(RecvError::Missed) => hub.resync_all(),
                    Err(RecvError::Closed) => {
                        hub.start_leaving();
                        return;
                    }
                }
            }
            _ = tick.tick() => {
                let Some(hub) = hub.upgrade() else { return };
                if ctx.is_draining() && !hub.leaving.load(Ordering::Relaxed) {
                    tracing::info!("draining: moving realtime connections to other instances");
                    hub.start_leaving();
                }
                if last_heartbeat.elapsed() >= heartbeat {
                    last_heartbeat = tokio::time::Instant::now();
                    hub.heartbeat();
                }
            }
        }
    }
}

const SELECT: &str = "SELECT id, user_id, kind, data, created_at FROM notification_events";

/// Where a read of a user's events starts.
#[derive(Clone, Copy)]
enum Start<'a> {
    /// After this event id.
    After(&'a str),
    /// At this event id (included when it is still kept).
    At(&'a str),
    /// Created at or after this time (ms).
    Since(i64),
}

/// Events of `user_id` from `start`, oldest first.
async fn load_events(
    db: &Database,
    user_id: &str,
    start: Start<'_>,
    limit: i64,
) -> Result<Vec<UserEvent>, sqlx::Error> {
    let rows: Vec<EventRow> = match start {
        Start::After(id) | Start::At(id) => {
            let op = if matches!(start, Start::At(_)) {
                ">="
            } else {
                ">"
            };
            sqlx::query_as(&format!(
                "{SELECT} WHERE user_id = $1 AND id {op} $2 ORDER BY id LIMIT $3"
            ))
            .bind(user_id)
            .bind(id)
            .bind(limit)
            .fetch_all(db.pool())
            .await?
        }
        Start::Since(since_ms) => {
            sqlx::query_as(&format!(
                "{SELECT} WHERE user_id = $1 AND created_at >= $2 ORDER BY id LIMIT $3"
            ))
            .bind(user_id)
            .bind(since_ms)
            .bind(limit)
            .fetch_all(db.pool())
            .await?
        }
    };
    Ok(rows.into_iter().map(UserEvent::from).collect())
}

/// What one connection sends, in order: a `stream.reset` event when the
/// replay cannot be complete, the replay, then live events (skipping the
/// ones the replay already sent).
struct Feed {
    ctx: AppContext,
    inbox: Arc<Inbox>,
    /// Its place in the hub, and the user's id.
    registration: Registration,
    /// Events owed before live ones (the replay, a reset or reconnect
    /// notice); `None` once they are sent, so an idle stream does not
    /// carry the empty queue and set (bench/README.md, "Memory per
    /// connection").
    owed: Option<Box<Owed>>,
    /// The client's `Last-Event-ID` at connect: it has every event up to
    /// this one (ids are time-ordered).
    resumed_from: Option<String>,
    last_id: Option<String>,
    connected_at: i64,
    /// Set while a re-read of the table is owed (kept if `next` is
    /// cancelled mid-read, so it is redone).
    needs_resync: bool,
    /// The reconnect event has been handed out: the stream ends.
    told_to_leave: bool,
}

/// The events a stream owes before its live ones.
#[derive(Default)]
struct Owed {
    pending: VecDeque<UserEvent>,
    /// Replayed events that the bus may deliver again: skipped then.
    sent_in_replay: HashSet<String>,
}

/// What a stream sends next.
enum Sent {
    Event(Arc<Outgoing>),
    Heartbeat,
}

impl Feed {
    async fn open(
        ctx: &AppContext,
        hub: &Arc<Hub>,
        user_id: &str,
        last_event_id: Option<String>,
    ) -> ApiResult<Feed> {
        let connected_at = now_millis();
        // Register first, so nothing published during the replay query is lost.
        let (registration, inbox) = hub.register(user_id)?;
        let mut feed = Feed {
            ctx: ctx.clone(),
            inbox,
            registration,
            owed: None,
            resumed_from: None,
            last_id: None,
            connected_at,
            needs_resync: false,
            told_to_leave: false,
        };
        if hub.leaving.load(Ordering::Relaxed) {
            // The instance drains: this stream is told to go at once, with
            // nothing before (the client keeps its own last event id). Its
            // replay would be read for nothing, and thousands of streams
            // coming back at once would hold every database connection.
            feed.owed().pending.push_back(reconnect_event(user_id));
            return Ok(feed);
        }
        if let Some(last) = last_event_id {
            // One read: from the client's last event, which tells whether
            // it is still kept (if not, the client is told to reset), then
            // what came after it.
            let limit = ctx.settings.notifications.replay_max_events as i64;
            let mut events = load_events(&ctx.db, user_id, Start::At(&last), limit + 1).await?;
            if events.first().is_some_and(|e| e.id == last) {
                events.remove(0);
            } else {
                feed.owed().pending.push_back(reset_event(user_id));
                events.truncate(limit as usize);
            }
            if !events.is_empty() {
                let owed = feed.owed();
                for e in events {
                    owed.sent_in_replay.insert(e.id.clone());
                    owed.pending.push_back(e);
                }
            }
            feed.resumed_from = Some(last.clone());
            feed.last_id = Some(last);
        }
        Ok(feed)
    }

    fn owed(&mut self) -> &mut Owed {
        self.owed.get_or_insert_with(Box::default)
    }

    /// Whether the replay already sent event `id` (then forgotten: the
    /// bus hands an event over once).
    fn sent_before(&mut self, id: &str) -> bool {
        let Some(owed) = self.owed.as_mut() else {
            return false;
        };
        let sent = owed.sent_in_replay.remove(id);
        if owed.pending.is_empty() && owed.sent_in_replay.is_empty() {
            self.owed = None;
        }
        sent
    }

    /// The next owed event, letting the box go once nothing is owed.
    fn take_owed(&mut self) -> Option<UserEvent> {
        let owed = self.owed.as_mut()?;
        let e = owed.pending.pop_front();
        if owed.pending.is_empty() && owed.sent_in_replay.is_empty() {
            self.owed = None;
        }
        e
    }

    async fn replay(&mut self) -> Result<(), sqlx::Error> {
        let limit = self.ctx.settings.notifications.replay_max_events as i64;
        let start = match self.last_id.as_deref() {
            Some(id) => Start::After(id),
            None => Start::Since(self.connected_at),
        };
        let events = load_events(&self.ctx.db, &self.registration.user_id, start, limit).await?;
        if !events.is_empty() {
            let owed = self.owed();
            for e in events {
                if owed.sent_in_replay.insert(e.id.clone()) {
                    owed.pending.push_back(e);
                }
            }
        }
        Ok(())
    }

    /// The next event to send; `None` when the connection must end
    /// (dropped as too slow, bus closed, and after the reconnect event
    /// when the instance drains). Cancel safe: an event is taken from the
    /// buffers only when it is returned.
    async fn next(&mut self) -> Option<Sent> {
        loop {
            if self.told_to_leave {
                return None;
            }
            if self.needs_resync {
                // Boxed: the read's state would otherwise size every
                // stream's future, idle ones included.
                if let Err(e) = Box::pin(self.replay()).await {
                    tracing::warn!(error = %e, "notifications: resync read failed; closing the stream");
                    return None;
                }
                self.needs_resync = false;
            }
            if let Some(e) = self.take_owed() {
                if e.kind == RECONNECT_KIND {
                    // Opened on an instance already draining.
                    self.told_to_leave = true;
                    metrics::counter!("shoal_notifications_streams_moved_total").increment(1);
                } else if e.kind != RESET_KIND {
                    self.last_id = Some(e.id.clone());
                }
                return Some(Sent::Event(Arc::new(Outgoing::new(&e))));
            }
            match self.inbox.next().await? {
                Item::Event(e) => {
                    if self.sent_before(&e.id) {
                        continue;
                    }
                    // A bus that polls (the SQL one) can hand over, after
                    // registration, an event published before it, which
                    // the client already had.
                    if self
                        .resumed_from
                        .as_deref()
                        .is_some_and(|cursor| e.id.as_str() <= cursor)
                    {
                        continue;
                    }
                    self.last_id = Some(e.id.clone());
                    return Some(Sent::Event(e));
                }
                Item::Resync => self.needs_resync = true,
                Item::Heartbeat => return Some(Sent::Heartbeat),
                Item::Leave => {
                    self.told_to_leave = true;
                    metrics::counter!("shoal_notifications_streams_moved_total").increment(1);
                    let e = reconnect_event(&self.registration.user_id);
                    return Some(Sent::Event(Arc::new(Outgoing::new(&e))));
                }
            }
        }
    }
}

const RESET_KIND: &str = "stream.reset";
const RECONNECT_KIND: &str = "stream.reconnect";

/// The last event of a stream whose instance drains: reconnect (through
/// the gateway, to another instance) and resume from the last event id.
fn reconnect_event(user_id: &str) -> UserEvent {
    notice(
        user_id,
        RECONNECT_KIND,
        "this server is restarting; reconnect and resume from your last event id",
    )
}

/// An event from the stream itself, not published: it has no id, so
/// `EventSource` keeps the last real one as its `Last-Event-ID`.
fn notice(user_id: &str, kind: &str, reason: &str) -> UserEvent {
    UserEvent {
        id: String::new(),
        user_id: user_id.to_string(),
        kind: kind.into(),
        data: serde_json::json!({ "reason": reason }),
        created_at: now_millis(),
    }
}

/// Sent when a client's `Last-Event-ID` is no longer kept: it missed
/// events it cannot replay and should reload its state.
fn reset_event(user_id: &str) -> UserEvent {
    notice(
        user_id,
        RESET_KIND,
        "the last event id is unknown or past retention; reload your state",
    )
}

fn check_event_id(raw: &str) -> Result<String, ApiError> {
    let raw = raw.trim();
    if raw.is_empty() || raw.len() > 64 || !raw.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
    {
        return Err(Problem::validation(format!(
            "`{}` is not an event id (send the `id` of the last event received)",
            raw.chars().take(80).collect::<String>()
        ))
        .with_field("last_event_id", "must be an event id")
        .into());
    }
    Ok(raw.to_ascii_lowercase())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StreamQuery {
    #[serde(default)]
    last_event_id: Option<String>,
}

fn wanted_replay(headers: &HeaderMap, q: &StreamQuery) -> Result<Option<String>, ApiError> {
    let header = headers
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("?").to_string());
    match header.or_else(|| q.last_event_id.clone()) {
        None => Ok(None),
        Some(raw) if raw.trim().is_empty() => Ok(None),
        Some(raw) => check_event_id(&raw).map(Some),
    }
}

fn to_sse(e: &Outgoing) -> Bytes {
    if e.kind == RECONNECT_KIND {
        // EventSource waits this long before reconnecting (its default
        // is up to the browser, often 3 s): a second at most, spread.
        let retry = Duration::from_millis(rand::random_range(100..1000));
        return Bytes::from(sse_frame(&e.id, Some(retry), e.json.as_str()));
    }
    e.sse_frame()
}

/// An SSE comment: keeps proxies from closing an idle stream.
const HEARTBEAT: &[u8] = b": heartbeat\n\n";

/// `GET /api/notifications/stream`: the caller's events as Server-Sent
/// Events. Each `data:` line is `{"id", "kind", "data", "created_at"}`;
/// the SSE `id:` is the event id, so `EventSource` resumes by itself.
pub(crate) async fn sse(
    State(ctx): State<AppContext>,
    Extension(hub): Extension<Arc<Hub>>,
    CurrentSession(session): CurrentSession,
    Query(q): Query<StreamQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let last = wanted_replay(&headers, &q)?;
    let feed = Feed::open(&ctx, &hub, &session.user_id, last).await?;
    metrics::counter!("shoal_notifications_streams_opened_total", "transport" => "sse")
        .increment(1);
    Ok((
        [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-store"),
            // Tells nginx-style proxies not to buffer the stream.
            ("x-accel-buffering", "no"),
        ],
        // No keep-alive timer here: heartbeats come from the hub's one
        // timer (`Item::Heartbeat`).
        axum::body::Body::from_stream(sse_frames(feed)),
    )
        .into_response())
}

/// A stream's SSE frames: what its response body holds while it idles.
fn sse_frames(feed: Feed) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> {
    futures_util::stream::unfold(feed, |mut feed| async move {
        let frame = match feed.next().await? {
            Sent::Event(e) => to_sse(&e),
            Sent::Heartbeat => Bytes::from_static(HEARTBEAT),
        };
        Some((Ok(frame), feed))
    })
}

/// `POST /api/notifications/test`: publishes a `test` event whose data is
/// the request's JSON body (at most 64 KiB) to the caller's own streams on
/// every instance, so a client can check its stream end to end (and
/// `bench/sse.sh` can time the fan-out). 202 with the event id.
pub(crate) async fn test_event(
    State(ctx): State<AppContext>,
    CurrentSession(session): CurrentSession,
    ApiJson(data): ApiJson<Value>,
) -> ApiResult<Response> {
    let id = publish_user_event(&ctx, &session.user_id, "test", data)
        .await
        .map_err(|e| match e {
            NotifyError::Invalid(msg) => ApiError(Problem::validation(msg)),
            other => ApiError::internal("publishing the test event", &other),
        })?;
    Ok((StatusCode::ACCEPTED, Json(json!({"id": id}))).into_response())
}

/// `POST /api/notifications/events`'s body.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PublishRequest {
    /// The user whose open streams (on every instance) and webhooks get
    /// the event: 1-100 characters.
    user_id: String,
    /// The event's kind: 1-64 characters of a-z, 0-9, `.`, `_`, `-`.
    kind: String,
    /// The event's data: any JSON, at most 64 KiB written out.
    #[serde(default)]
    data: Value,
}

/// What `POST /api/notifications/events` published.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub(crate) struct Published {
    /// The event's id on the user's streams (SSE `id:`, replayed after a
    /// `Last-Event-ID`).
    event_id: String,
    /// The `webhook-id` every subscribed endpoint of the user gets; null
    /// when none is subscribed to this kind.
    webhook_message_id: Option<String>,
}

/// `POST /api/notifications/events`: an event from another service (any
/// language, with a service token with the scope `events:publish`, or
/// `clients.token`) to a user: to the
/// user's open SSE and WebSocket streams on every instance, kept for
/// replay, and to the user's webhooks subscribed to its kind. Everything
/// is checked before anything is written; a retry after a failure may
/// deliver an event twice (each carries its id).
pub(crate) async fn publish(
    State(ctx): State<AppContext>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<PublishRequest>,
) -> ApiResult<Response> {
    let caller = shoal_runtime::session::require_scope(&ctx, &headers, "events:publish")?;
    let mut problem = Problem::validation("the event is invalid; see `errors`");
    if req.user_id.is_empty() || req.user_id.chars().count() > 100 {
        problem = problem.with_field("user_id", "must be 1-100 characters");
    }
    if !valid_kind(&req.kind) {
        problem = problem.with_field("kind", "must be 1-64 characters of a-z, 0-9, `.`, `_`, `-`");
    }
    let size = serde_json::to_string(&req.data).map_or(0, |t| t.len());
    if size > MAX_EVENT_BYTES {
        problem = problem.with_field(
            "data",
            format!("is {size} bytes written out; the limit is {MAX_EVENT_BYTES}"),
        );
    }
    if !problem.errors.is_empty() {
        return Err(problem.into());
    }
    let failed = |what: &'static str| {
        move |e: NotifyError| match e {
            NotifyError::Invalid(msg) => ApiError(Problem::validation(msg)),
            other => ApiError::internal(what, &other),
        }
    };
    let event_id = publish_user_event(&ctx, &req.user_id, &req.kind, req.data.clone())
        .await
        .map_err(failed("publishing an event"))?;
    let mut tx = ctx
        .db
        .pool()
        .begin()
        .await
        .map_err(|e| ApiError::internal("starting the webhooks' transaction", &e))?;
    let webhook_message_id =
        crate::webhooks::emit_event(&ctx, &mut tx, &req.user_id, &req.kind, req.data)
            .await
            .map_err(failed("enqueueing the event's webhooks"))?;
    tx.commit()
        .await
        .map_err(|e| ApiError::internal("committing the event's webhooks", &e))?;
    metrics::counter!("shoal_notifications_events_over_http_total", "caller" => caller)
        .increment(1);
    Ok((
        StatusCode::ACCEPTED,
        Json(Published {
            event_id,
            webhook_message_id,
        }),
    )
        .into_response())
}

/// `GET /api/notifications/ws`: the same events over a WebSocket, one JSON
/// text message each; `?last_event_id=` replays. The server pings every
/// `heartbeat_secs`; client messages other than close are ignored.
pub(crate) async fn websocket(
    State(ctx): State<AppContext>,
    Extension(hub): Extension<Arc<Hub>>,
    CurrentSession(session): CurrentSession,
    Query(q): Query<StreamQuery>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> ApiResult<Response> {
    let last = wanted_replay(&headers, &q)?;
    let feed = Feed::open(&ctx, &hub, &session.user_id, last).await?;
    metrics::counter!("shoal_notifications_streams_opened_total", "transport" => "ws").increment(1);
    Ok(upgrade
        .max_message_size(64 * 1024)
        // tungstenite allocates its read buffer, whole, when a socket
        // opens and keeps it: 128 KiB by default, most of an idle
        // WebSocket's memory (bench/ws.sh, bench/README.md). Clients only
        // send close frames and pongs (at most 131 bytes each); the
        // buffer grows for a larger frame (up to max_message_size).
        .read_buffer_size(512)
        .on_upgrade(move |socket| run_socket(socket, feed)))
}

/// A socket's loop. A function returning an `async` block, not an `async fn`:
/// an `async fn` keeps its arguments (the socket, the feed) twice, once as
/// captured and once moved into its body, and this future is most of an
/// idle WebSocket's memory (`an_idle_stream_s_state_stays_small`).
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn run_socket(mut socket: WebSocket, mut feed: Feed) -> impl std::future::Future<Output = ()> {
    async move {
        loop {
            tokio::select! {
                sent = feed.next() => {
                    let (message, last) = match sent {
                        None => (WsMessage::Close(None), true),
                        // From the hub's one timer, not a timer per socket.
                        Some(Sent::Heartbeat) => (WsMessage::Ping(Default::default()), false),
                        Some(Sent::Event(e)) if e.kind == RECONNECT_KIND => {
                            // 1012 Service Restart: reconnect (to another instance).
                            let close = axum::extract::ws::CloseFrame {
                                code: 1012,
                                reason: "server restarting; reconnect with last_event_id".into(),
                            };
                            (WsMessage::Close(Some(close)), true)
                        }
                        Some(Sent::Event(e)) => (WsMessage::Text(e.json.clone()), false),
                    };
                    if !send_within(&mut socket, message).await || last {
                        return;
                    }
                }
                msg = socket.recv() => match msg {
                    None | Some(Err(_)) | Some(Ok(WsMessage::Close(_))) => return,
                    Some(Ok(_)) => {}
                },
            }
        }
    }
}

/// Sends `message` on `socket` within 10 s; false when it could not.
/// Boxed: the send and its timer (~240 bytes) would otherwise size every
/// socket's future, idle ones included.
fn send_within(
    socket: &mut WebSocket,
    message: WsMessage,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + '_>> {
    Box::pin(async move {
        matches!(
            tokio::time::timeout(Duration::from_secs(10), socket.send(message)).await,
            Ok(Ok(()))
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_rendered_once_as_json_and_as_one_sse_frame() {
        let e = UserEvent {
            id: "0190a3b4-0000-7000-8000-000000000000".into(),
            user_id: "u1".into(),
            kind: "order.paid".into(),
            data: json!({"text": "two\nlines"}),
            created_at: 7,
        };
        let out = Outgoing::new(&e);
        let json = r#"{"id":"0190a3b4-0000-7000-8000-000000000000","kind":"order.paid","data":{"text":"two\nlines"},"created_at":7}"#;
        assert_eq!(out.json.as_str(), json, "the user id is not sent");
        let frame = out.sse_frame();
        assert_eq!(
            frame,
            format!("id: {}\ndata: {json}\n\n", e.id).as_bytes(),
            "one data line: the newline in the data is escaped"
        );
        assert_eq!(
            out.sse_frame().as_ptr(),
            frame.as_ptr(),
            "every stream shares the one frame"
        );
        let leave = Outgoing::new(&reconnect_event("u1"));
        let text = String::from_utf8(to_sse(&leave).to_vec()).unwrap();
        assert!(text.starts_with("retry: "), "{text}");
        assert!(!text.contains("id:"), "a notice has no id: {text}");
        assert!(
            text.ends_with("\n\n") && text.contains("\ndata: {"),
            "{text}"
        );
    }

    fn returned_size<A, R>(_: fn(A) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    fn future_size<A, B, F>(_: fn(A, B) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// An idle stream holds its feed and what waits on it, per stream:
    /// these sizes are most of what an idle SSE stream or WebSocket costs
    /// beyond the connection (bench/README.md, "Memory per connection").
    #[test]
    fn an_idle_stream_s_state_stays_small() {
        let feed = std::mem::size_of::<Feed>();
        let sse = returned_size(sse_frames);
        let ws = future_size(run_socket);
        eprintln!("feed {feed} bytes, SSE body stream {sse}, WebSocket future {ws}");
        assert!(feed <= 128, "Feed is {feed} bytes");
        // mimalloc's size classes here: 192 and 640 bytes.
        assert!(sse <= 192, "the SSE frames' stream is {sse} bytes");
        assert!(ws <= 640, "the WebSocket's future is {ws} bytes");
    }

    #[test]
    fn kinds_and_event_ids_are_checked() {
        assert!(valid_kind("order.paid"));
        assert!(!valid_kind("Order Paid"));
        assert!(!valid_kind(""));
        assert!(check_event_id("0190a3b4-0000-7000-8000-000000000000").is_ok());
        assert!(check_event_id("x; DROP").is_err());
    }
}
