//! Pooled connections to peer sidecars for outbound HTTP: one multiplexed HTTP/2 connection
//! (ALPN `sigil/h2`) per destination and expected ID, shared by every workload connection
//! that calls it, as linkerd2-proxy does. hyper-util's pool is not used because its
//! connections cannot be registered: each of ours is in the connection registry like any
//! other, so a bundle change or a revocation cuts it, and the next request dials (and
//! verifies) afresh.
//!
//! Requests go out through the `h2` crate directly rather than hyper's HTTP/2 client. hyper
//! hands each request over a channel to the connection's task and spawns a task per request
//! to await its response; here the workload connection's own task opens the stream and
//! awaits the response, and the connection's task only reads and writes the socket. What
//! hyper did besides is done here: connection-specific headers are stripped, request
//! bodies are piped under flow control, received data is released, and PINGs find a dead
//! peer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Ping, PingPong, RecvStream, SendStream};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::header::{HeaderName, CONNECTION, CONTENT_LENGTH, TE, TRANSFER_ENCODING, UPGRADE};
use hyper::{HeaderMap, Request, Response};
use sigil_config::SpiffeId;
use sigil_filters::tls::Carries;
use tracing::debug;

use crate::conns::{Direction, Kind, GRACE};
use crate::dial::Dialer;
use crate::http::{BoxError, ResponseBody};
use crate::ledger::{Admitted, Ledger};
use crate::logs::limited;
use crate::reasons::CloseReason;
use crate::relay::{closed, cut, Counted};

/// A dead peer (no PING answer) is noticed within interval + timeout.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Receive windows: hyper's HTTP/2 defaults (hyper's adaptive window, which needs the
/// connection's PINGs, is not used; the PINGs keep it alive instead).
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONN_WINDOW: u32 = 5 * 1024 * 1024;

/// A destination as seen from one worker thread (`workers`).
type WorkerDest = (SocketAddr, usize);

pub struct Pool {
    /// Per destination and worker: a worker's requests go out on its own connections,
    /// whose tasks run on that worker too.
    slots: Mutex<HashMap<WorkerDest, Vec<Arc<Slot>>>>,
    /// Numbers pooled connections, so that one retiring removes itself and no successor.
    next: AtomicU64,
    dialer: Arc<Dialer>,
    ledger: Arc<Ledger>,
    /// `timeouts.request`: how long a request without a body waits for its response head,
    /// with `RESPONSE_MARGIN`.
    request_timeout: Duration,
    /// `timeouts.poolIdle`: a connection unused this long is let go.
    idle_after: Duration,
}

pub struct Slot {
    dest: SocketAddr,
    worker: usize,
    expected: SpiffeId,
    /// The connection's number and sender. Never held across an await, so that retiring a
    /// connection never waits for a dial.
    sender: Mutex<Option<(u64, SendRequest<Bytes>)>>,
    /// Held while dialling, so that concurrent first requests wait for one dial instead of
    /// racing.
    dialing: tokio::sync::Mutex<()>,
    /// Requests sent, which tells the connection's task whether it is still used.
    sent: AtomicU64,
    /// Set once the destination left the registry (`Pool::prune`): no new connection is
    /// dialled for it, and the pooled one closes once its requests are done.
    removed: std::sync::atomic::AtomicBool,
    /// Wakes the pooled connection's task when `removed` is set.
    left: tokio::sync::Notify,
}

impl Slot {
    /// Takes connection `id` out of use: the next request dials afresh.
    fn retire(&self, id: u64) {
        let mut sender = self.sender.lock().expect("slot lock");
        if sender.as_ref().is_some_and(|(current, _)| *current == id) {
            *sender = None;
        }
    }

    fn current(&self) -> Option<(u64, SendRequest<Bytes>)> {
        self.sender.lock().expect("slot lock").clone()
    }
}

/// Why a request could not be sent to the peer sidecar.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made (`dial` logged and counted why).
    Unreachable,
    /// The destination left the registry since the workload connected.
    Gone,
    /// The connection or the peer sidecar failed the request.
    Failed(h2::Error),
    /// No response head within this long (`timeouts.request` and a margin, so that the
    /// destination's own 504, which names the cause, normally comes first).
    TimedOut(Duration),
}

/// How much longer than `timeouts.request` the outbound side waits for a response head.
const RESPONSE_MARGIN: Duration = Duration::from_secs(5);

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unreachable => {
                f.write_str("cannot reach the destination's sidecar (see the sidecar log)")
            }
            Self::Gone => f.write_str("the destination left the mesh registry"),
            Self::Failed(e) => write!(f, "peer sidecar: {e}"),
            Self::TimedOut(after) => write!(
                f,
                "the destination's sidecar did not answer within {after:?}"
            ),
        }
    }
}

impl Pool {
    pub fn new(
        dialer: Arc<Dialer>,
        ledger: Arc<Ledger>,
        request_timeout: Duration,
        idle_after: Duration,
    ) -> Self {
        Self {
            slots: Mutex::default(),
            next: AtomicU64::new(0),
            dialer,
            ledger,
            request_timeout,
            idle_after,
        }
    }

    /// The slot of `dest` and `expected`, which a workload connection looks up once.
    pub fn slot(&self, dest: SocketAddr, expected: &SpiffeId) -> Arc<Slot> {
        let mut slots = self.slots.lock().expect("pool lock");
        let worker = crate::workers::current();
        let list = slots.entry((dest, worker)).or_default();
        if let Some(s) = list.iter().find(|s| s.expected == *expected) {
            return s.clone();
        }
        let s = Arc::new(Slot {
            dest,
            worker,
            expected: expected.clone(),
            sender: Mutex::new(None),
            dialing: tokio::sync::Mutex::new(()),
            sent: AtomicU64::new(0),
            removed: Default::default(),
            left: tokio::sync::Notify::new(),
        });
        list.push(s.clone());
        s
    }

    /// Drops `slot` from the pool once it has no connection and nothing holds it but the
    /// pool and the caller (a retiring connection's task, or a workload connection that
    /// ends), so that destinations called once do not accumulate.
    pub fn forget(&self, slot: &Arc<Slot>) {
        let mut slots = self.slots.lock().expect("pool lock");
        // `slot()` clones under this lock, so the count cannot grow meanwhile; a task that
        // holds the slot and may dial is counted.
        if Arc::strong_count(slot) > 2 || slot.current().is_some() {
            return;
        }
        let key = (slot.dest, slot.worker);
        if let Some(list) = slots.get_mut(&key) {
            list.retain(|s| !Arc::ptr_eq(s, slot));
            if list.is_empty() {
                slots.remove(&key);
            }
        }
    }

    /// Takes out of the pool every slot whose destination `keep` no longer maps to its
    /// expected ID (the registry changed): its pooled connection is let go, closing once
    /// the requests on it are done, and no new one is dialled. Returns how many went.
    pub fn prune(&self, keep: impl Fn(SocketAddr, &SpiffeId) -> bool) -> usize {
        let mut slots = self.slots.lock().expect("pool lock");
        let mut pruned = 0;
        for list in slots.values_mut() {
            list.retain(|s| {
                if keep(s.dest, &s.expected) {
                    return true;
                }
                s.removed.store(true, Ordering::Relaxed);
                // Every connection task of the slot (a retiring one too) lets go.
                s.left.notify_waiters();
                *s.sender.lock().expect("slot lock") = None;
                pruned += 1;
                false
            });
        }
        slots.retain(|_, list| !list.is_empty());
        pruned
    }

    /// Destinations with a slot in the pool, for tests and the config dump.
    pub fn destinations(&self) -> usize {
        self.slots
            .lock()
            .expect("pool lock")
            .values()
            .map(Vec::len)
            .sum()
    }

    /// The pooled connection of `slot`, dialled if there is none. None: the dial failed,
    /// or the destination left the registry.
    async fn sender(self: &Arc<Self>, slot: &Arc<Slot>) -> Option<(u64, SendRequest<Bytes>)> {
        if slot.removed.load(Ordering::Relaxed) {
            return None;
        }
        if let Some(s) = slot.current() {
            return Some(s);
        }
        let _dialing = slot.dialing.lock().await;
        // Another request may have dialled while this one waited.
        if let Some(s) = slot.current() {
            return Some(s);
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        // Boxed: the dial and handshakes are rare and would otherwise make every request's
        // future (which holds this one) several KiB larger to create and move.
        let s = Box::pin(self.connect(slot.clone(), id)).await?;
        *slot.sender.lock().expect("slot lock") = Some((id, s.clone()));
        Some((id, s))
    }

    /// Sends `req` (absolute URI, no Host header) as HTTP/2 on the pooled connection of
    /// `slot`. A connection found closed before the request went out (a GOAWAY, a cut) is
    /// replaced and the request sent once more; nothing else is retried. `grpc`: a gRPC
    /// call, which no response timeout applies to here.
    pub async fn send(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        req: Request<Incoming>,
        grpc: bool,
    ) -> Result<Response<ResponseBody>, SendError> {
        if slot.removed.load(Ordering::Relaxed) {
            return Err(SendError::Gone);
        }
        let (mut parts, body) = req.into_parts();
        strip_connection_headers(&mut parts.headers);
        // The destination's sidecar removes them too; neither hop trusts the other to.
        crate::http::strip_identity(&mut parts.headers);
        let mut retried = false;
        let mut sender = loop {
            let Some((id, sender)) = self.sender(slot).await else {
                return Err(SendError::Unreachable);
            };
            match sender.ready().await {
                Ok(s) => break s,
                Err(e) if !retried => {
                    debug!(dest = %slot.dest, "pooled connection closed before the request went out ({e}); retrying");
                    slot.retire(id);
                    retried = true;
                }
                Err(e) => return Err(SendError::Failed(e)),
            }
        };
        slot.sent.fetch_add(1, Ordering::Relaxed);
        let eos = body.is_end_stream();
        let (response, stream) = sender
            .send_request(Request::from_parts(parts, ()), eos)
            .map_err(SendError::Failed)?;
        drop(sender);
        if !eos {
            // The body streams on while the response may already come back (gRPC).
            tokio::spawn(Upload { body, stream }.run());
        }
        // A request with a body (an upload, a gRPC stream) is timed by the destination's
        // sidecar from its last byte; one without, here too, as a backstop.
        let resp = if eos && !grpc {
            let limit = self.request_timeout + RESPONSE_MARGIN;
            tokio::time::timeout(limit, response)
                .await
                .map_err(|_| SendError::TimedOut(limit))?
        } else {
            response.await
        }
        .map_err(SendError::Failed)?;
        // No body at all (HEAD, 204, 304): nothing remains, whatever Content-Length says.
        let remaining = if resp.body().is_end_stream() {
            Some(0)
        } else {
            content_length(resp.headers())
        };
        Ok(resp.map(|recv| Received { recv, remaining }.boxed()))
    }
}

/// Removes the headers HTTP/2 forbids (RFC 9113 §8.2.2), which the h2 crate would refuse
/// the whole request for: `Connection` and every header it names, the other hop-by-hop
/// ones, and `TE` unless it is exactly `trailers` (gRPC sends that).
fn strip_connection_headers(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [CONNECTION, TRANSFER_ENCODING, UPGRADE] {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection"] {
        headers.remove(name);
    }
    if headers.get_all(TE).iter().any(|v| v != "trailers") {
        headers.remove(TE);
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// A request body on its way to the peer sidecar, sent as the stream's flow control
/// allows. Ends early if the peer resets the stream or the connection goes.
struct Upload {
    body: Incoming,
    stream: SendStream<Bytes>,
}

impl Upload {
    async fn run(mut self) {
        if let Err(e) = std::future::poll_fn(|cx| self.poll_pipe(cx)).await {
            debug!("request body not sent whole: {e}");
        }
    }

    fn poll_pipe(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            // Wait for window before reading more of the body, so that a slow peer holds
            // the body back instead of the sidecar buffering it.
            self.stream.reserve_capacity(1);
            if self.stream.capacity() == 0 {
                loop {
                    match ready!(self.stream.poll_capacity(cx)) {
                        Some(Ok(0)) => {}
                        Some(Ok(_)) => break,
                        Some(Err(e)) => return Poll::Ready(Err(e.into())),
                        None => return Poll::Ready(Err("stream closed".into())),
                    }
                }
            } else if let Poll::Ready(r) = self.stream.poll_reset(cx) {
                return Poll::Ready(Err(match r {
                    Ok(reason) => format!("peer reset the stream: {reason}").into(),
                    Err(e) => e.into(),
                }));
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let eos = self.body.is_end_stream();
                        self.stream.send_data(data, eos)?;
                        if eos {
                            return Poll::Ready(Ok(()));
                        }
                    }
                    Err(frame) => {
                        if let Ok(mut trailers) = frame.into_trailers() {
                            crate::http::strip_identity(&mut trailers);
                            self.stream.reserve_capacity(0);
                            self.stream.send_trailers(trailers)?;
                            return Poll::Ready(Ok(()));
                        }
                    }
                },
                Some(Err(e)) => {
                    self.stream.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(Err(e.into()));
                }
                None => {
                    self.stream.reserve_capacity(0);
                    self.stream.send_data(Bytes::new(), true)?;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

/// A response body from the peer sidecar. Data read is given back to the flow-control
/// window at once: the reader (hyper, writing to the workload) sets the pace.
struct Received {
    recv: RecvStream,
    /// What Content-Length promised and has not arrived yet, so that the workload gets a
    /// response framed by length rather than chunked.
    remaining: Option<u64>,
}

impl hyper::body::Body for Received {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match ready!(self.recv.poll_data(cx)) {
            Some(Ok(data)) => {
                let _ = self.recv.flow_control().release_capacity(data.len());
                if let Some(left) = &mut self.remaining {
                    *left = left.saturating_sub(data.len() as u64);
                }
                Poll::Ready(Some(Ok(Frame::data(data))))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(e.into()))),
            None => match ready!(self.recv.poll_trailers(cx)) {
                Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
                Ok(None) => Poll::Ready(None),
                Err(e) => Poll::Ready(Some(Err(e.into()))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Pool {
    /// Dials `slot`'s destination and opens the pooled HTTP/2 connection; its task runs
    /// until the connection ends, is closed by the registry, or is let go.
    async fn connect(self: &Arc<Self>, slot: Arc<Slot>, id: u64) -> Option<SendRequest<Bytes>> {
        let (dest, expected) = (slot.dest, &slot.expected);
        let (stream, session) = self.dialer.dial(dest, expected, Carries::Http2).await?;
        let a = Admitted {
            direction: Direction::Outbound,
            kind: Kind::Pooled,
            local: self.dialer.tls.get().local_label.clone(),
            peer_label: self.ledger.metrics.peer_label(expected.as_str()),
            peer: expected.clone(),
            session,
            port: dest.port(),
            protocol: "http2",
            rule: None,
            would_deny: None,
            policy_version: None,
        };
        let (labels, counters, guard) = self.ledger.admit(a);
        let io = Counted::new(stream, counters);
        let handshake = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONN_WINDOW)
            .max_header_list_size(64 * 1024)
            // Until the peer's SETTINGS arrive; h2's default is unlimited, and a burst queued
            // behind the dial would meet the peer's limit as refused streams (hyper used 100).
            .initial_max_send_streams(100)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await;
        let (sender, conn) = match handshake {
            Ok(c) => c,
            Err(e) => {
                limited!(info, %dest, peer = %expected, "pooled connection failed at the HTTP/2 handshake: {e}");
                self.ledger
                    .closed(&labels, Some(&guard), CloseReason::IoError);
                return None;
            }
        };
        debug!(%dest, peer = %expected, "pooled connection open");
        let pool = self.clone();
        let probe = sender.clone();
        tokio::spawn(async move {
            let mut guard = guard;
            let reason = pool.hold(conn, probe, &slot, id, &mut guard).await;
            if reason != CloseReason::Done {
                limited!(info, %dest, peer = %labels.peer_id, reason = reason.label(), "pooled connection closed");
            }
            pool.ledger.closed(&labels, Some(&guard), reason);
            pool.forget(&slot);
        });
        Some(sender)
    }

    /// Runs a pooled connection until it ends: the peer's GOAWAY and its streams done, a
    /// failure, a dead peer (PINGs), the registry closing it, or, once let go (unused for
    /// `idle_after`, or its destination left the registry), its last stream done.
    async fn hold<T>(
        &self,
        conn: h2::client::Connection<T, Bytes>,
        probe: SendRequest<Bytes>,
        slot: &Arc<Slot>,
        id: u64,
        guard: &mut crate::conns::ConnGuard,
    ) -> CloseReason
    where
        T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let dest = slot.dest;
        let mut conn = conn;
        let pings = conn.ping_pong();
        let mut conn = Watched {
            conn,
            probe: Some(probe),
            went_away: false,
        };
        let idle_after = self.idle_after;
        let keep_alive = keep_alive(pings);
        let unused = unused(slot, idle_after);
        tokio::pin!(keep_alive, unused);
        let mut let_go = false;
        let mut reason = loop {
            // Checked as well as awaited: a prune between two rounds of this loop finds no
            // waiter to wake.
            let left = slot.left.notified();
            if slot.removed.load(Ordering::Relaxed) && !let_go {
                debug!(%dest, "destination left the registry; letting go of its pooled connection");
                slot.retire(id);
                conn.probe = None;
                let_go = true;
            }
            tokio::select! {
                // The peer sent GOAWAY and its streams are done, or the socket failed, or
                // (let go) the last stream ended. h2 ends a connection only once its streams
                // are done.
                r = &mut conn => break match r {
                    Ok(()) => CloseReason::Done,
                    // A peer that shuts down sends GOAWAY, finishes its streams and closes;
                    // the socket may then end in a reset, which is no failure.
                    Err(e) if conn.went_away => {
                        debug!(%dest, "pooled connection ended after the peer's GOAWAY: {e}");
                        CloseReason::Done
                    }
                    Err(e) => {
                        limited!(info, %dest, "pooled connection failed: {e}");
                        CloseReason::IoError
                    }
                },
                reason = closed(&mut guard.close_rx) => break reason,
                reason = &mut keep_alive => break reason,
                _ = left, if !let_go => continue,
                _ = &mut unused, if !let_go => {
                    // With the pool's sender dropped, h2 closes the connection once the
                    // streams still on it end; until then it stays registered.
                    debug!(%dest, "pooled connection unused for {idle_after:?}; letting go");
                    slot.retire(id);
                    conn.probe = None;
                    self.forget(slot);
                    let_go = true;
                }
            }
        };
        slot.retire(id);
        conn.probe = None;
        if reason.is_graceful() {
            // Requests already on this connection may finish; once the slot let go of its
            // sender and they are done, h2 closes the connection itself.
            let grace = tokio::time::sleep(GRACE);
            tokio::select! {
                _ = &mut conn => {}
                _ = grace => {}
                r = cut(&mut guard.close_rx) => reason = r,
            }
        }
        // Dropping the connection fails whatever streams are left on it.
        drop(conn);
        reason
    }
}

/// A pooled connection, watched for the peer's GOAWAY: a peer that shuts down sends one,
/// finishes its streams and closes, and the socket may then end in a reset, which is no
/// failure. h2 keeps the GOAWAY as the connection's error only until an I/O error replaces
/// it, so it is looked for after every poll, through a sender of our own. That sender is
/// dropped once the pool lets the connection go: h2 keeps a connection open while any
/// sender exists.
struct Watched<T> {
    conn: h2::client::Connection<T, Bytes>,
    probe: Option<SendRequest<Bytes>>,
    went_away: bool,
}

impl<T> std::future::Future for Watched<T>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    type Output = Result<(), h2::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let r = Pin::new(&mut self.conn).poll(cx);
        if let Some(probe) = &mut self.probe {
            // Never pending: the probe opens no streams. An error is the connection's.
            if let Poll::Ready(Err(e)) = probe.poll_ready(cx) {
                self.went_away =
                    e.is_go_away() && e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR);
                self.probe = None;
            }
        }
        r
    }
}

/// Resolves once a whole `period` passed in which no request was sent through `slot`.
async fn unused(slot: &Slot, period: Duration) {
    let mut before = slot.sent.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(period).await;
        let now = slot.sent.load(Ordering::Relaxed);
        if now == before {
            return;
        }
        before = now;
    }
}

/// PINGs the peer every interval; resolves with the close reason if an answer does not
/// come in time (a dead peer is an I/O failure).
async fn keep_alive(pings: Option<PingPong>) -> CloseReason {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(KEEP_ALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEP_ALIVE_TIMEOUT, pings.ping(Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                debug!("keep-alive PING failed: {e}");
                return CloseReason::IoError;
            }
            Err(_) => {
                limited!(
                    info,
                    "peer sidecar did not answer a keep-alive PING in {KEEP_ALIVE_TIMEOUT:?}"
                );
                return CloseReason::IoError;
            }
        }
    }
}
