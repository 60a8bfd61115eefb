//! Connections from the sidecar to its own workload for inbound HTTP. HTTP/1.1 requests use
//! a pool of keep-alive connections per port, kept here rather than in hyper-util's legacy
//! client: that client hashes a (scheme, authority) key and spawns a task per request to
//! wait for the connection to become idle again, work the sidecar measured on every request
//! (perf/HISTORY.md, "Allocator and workload pool"). A connection goes back to the pool when
//! its response body has been read to the end; one whose body is abandoned is closed.
//! gRPC (HTTP/2 to the workload) keeps hyper-util's client, which multiplexes one
//! connection: one client per worker, so that a request never waits on a connection task
//! of another worker's thread.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tracing::debug;

use crate::http::ScrubTrailers;

/// An idle connection older than this is not reused (hyper-util's default too).
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per workload port; more are closed when their response ends.
const MAX_IDLE_PER_PORT: usize = 256;

/// Per port and worker (`workers`: a connection's task runs on the worker that dialled it), idle
/// connections in the order they came back (oldest first).
type Idle = Arc<Mutex<HashMap<(u16, usize), Vec<(Instant, SendRequest<Upload>)>>>>;

/// Why the workload gave no response.
#[derive(Debug)]
pub enum Unanswered {
    /// The workload's port refused or did not take the connection.
    Connect(SocketAddr, std::io::Error),
    /// The HTTP/1.1 handshake or exchange failed.
    Http(hyper::Error),
    /// The gRPC client failed the call.
    Grpc(hyper_util::client::legacy::Error),
    /// The sidecar holds this many connections to its workload, its budget
    /// (`limits.maxConnections`).
    OverBudget(usize),
    /// An upgrade (WebSocket) found no room for its tunnel (`spec.limits`).
    NoRoom(sigil_filters::limits::Refusal),
    /// The normalized target did not make a URI again.
    Target(hyper::http::Error),
    /// No response head within `timeouts.request` of the request's last body byte: the
    /// sidecar answers 504 and lets go of the request rather than hold a connection on both
    /// sidecars until the client gives up.
    TimedOut(Duration),
}

impl std::fmt::Display for Unanswered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(addr, e) => write!(f, "connecting to {addr}: {e}"),
            Self::Http(e) => write!(f, "{e}"),
            Self::Grpc(e) => write!(f, "{e}"),
            Self::OverBudget(max) => write!(
                f,
                "the sidecar holds {max} connections to its workload, its budget (limits.maxConnections)"
            ),
            Self::NoRoom(why) => write!(f, "no room for a tunnel: {why}"),
            Self::Target(e) => write!(f, "rebuilding the target: {e}"),
            Self::TimedOut(after) => write!(f, "no answer within {after:?}"),
        }
    }
}

pub struct Workload {
    /// Connections to the workload open now, and the most there may be.
    open: Arc<AtomicUsize>,
    max_open: usize,
    idle: Idle,
    /// One per worker, then one for the main runtime (`workers::current()` off the workers).
    grpc: Vec<Client<HttpConnector, ScrubTrailers<Incoming>>>,
}

impl Workload {
    pub fn new(workers: usize, max_open: usize) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Self {
            open: Arc::default(),
            max_open,
            idle: Idle::default(),
            grpc: (0..=workers)
                .map(|_| {
                    Client::builder(TokioExecutor::new())
                        .http2_only(true)
                        .build(connector.clone())
                })
                .collect(),
        }
    }

    /// Sends a gRPC request (HTTP/2; the URI names 127.0.0.1:port) on the calling worker's
    /// client.
    pub async fn send_grpc(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<Incoming>, Unanswered> {
        let client = &self.grpc[crate::workers::current().min(self.grpc.len() - 1)];
        client
            .request(req.map(ScrubTrailers))
            .await
            .map_err(Unanswered::Grpc)
    }

    /// Sends an HTTP/1.1 request (origin-form URI, Host set) to 127.0.0.1:port on a pooled
    /// connection, or a new one. A request that a pooled connection did not take (it was
    /// closed by the workload meanwhile) goes out on the next one; nothing else is retried.
    /// No response head within `limit` of the request's last body byte: `TimedOut`, and the
    /// request is let go (its connection closes with it).
    pub async fn send_h1(
        &self,
        port: u16,
        req: Request<Incoming>,
        limit: Duration,
    ) -> Result<Response<Pooled>, Unanswered> {
        let req = req.map(Upload::new);
        let sent = req.body().done.clone();
        let waited = async {
            if let Some(sent) = &sent {
                sent.wait().await;
            }
            tokio::time::sleep(limit).await;
        };
        tokio::select! {
            r = self.send_h1_now(port, req) => r,
            _ = waited => Err(Unanswered::TimedOut(limit)),
        }
    }

    async fn send_h1_now(
        &self,
        port: u16,
        mut req: Request<Upload>,
    ) -> Result<Response<Pooled>, Unanswered> {
        let uploaded = req.body().done.clone();
        loop {
            let (mut sender, reused) = match self.take(port) {
                Some(s) => (s, true),
                None => (self.dial(port).await?, false),
            };
            // A pooled connection may still be finishing its previous exchange.
            if let Err(e) = sender.ready().await {
                if reused {
                    continue;
                }
                return Err(Unanswered::Http(e));
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    // After 101 the connection carries the upgraded protocol: never reused.
                    let back = (resp.status() != StatusCode::SWITCHING_PROTOCOLS)
                        .then(|| (self.idle.clone(), port, sender));
                    return Ok(resp.map(|body| Pooled {
                        body,
                        back,
                        uploaded,
                    }));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if reused => {
                        debug!(
                            port,
                            "pooled workload connection closed; retrying on another"
                        );
                        req = unsent;
                    }
                    _ => return Err(Unanswered::Http(e.into_error())),
                },
            }
        }
    }

    fn take(&self, port: u16) -> Option<SendRequest<Upload>> {
        let mut idle = self.idle.lock().expect("workload pool lock");
        let list = idle.get_mut(&(port, crate::workers::current()))?;
        // Most recently used first: it is the one least likely to have been closed.
        while let Some((since, sender)) = list.pop() {
            if !sender.is_closed() && since.elapsed() < IDLE_TIMEOUT {
                return Some(sender);
            }
        }
        None
    }
}

impl Workload {
    /// A new connection to the workload, within the budget (`max_open`): one admitted HTTP/2
    /// connection can carry many concurrent requests, each needing a connection of its own
    /// to an HTTP/1.1 workload, and the descriptors they take must stay within what the
    /// bound on connections left for them.
    async fn dial(&self, port: u16) -> Result<SendRequest<Upload>, Unanswered> {
        let budget = OpenConn::take(&self.open, self.max_open)
            .ok_or(Unanswered::OverBudget(self.max_open))?;
        dial(port, budget).await
    }
}

/// One connection to the workload, counted against `Workload::max_open` while it lives.
struct OpenConn(Arc<AtomicUsize>);

impl OpenConn {
    fn take(open: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        open.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        })
        .ok()?;
        Some(Self(open.clone()))
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn dial(port: u16, budget: OpenConn) -> Result<SendRequest<Upload>, Unanswered> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| Unanswered::Connect(addr, e))?;
    // Requests and responses are written whole; do not let Nagle hold their tails.
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(Unanswered::Http)?;
    tokio::spawn(async move {
        let _budget = budget;
        // Upgrades (WebSocket) take the connection over; `inbound_http::forward` relays them.
        if let Err(e) = conn.with_upgrades().await {
            debug!(%addr, "workload connection ended: {e}");
        }
    });
    Ok(sender)
}

/// A request body on its way to the workload, noting when it has been sent whole. None: it
/// was empty from the start (most requests), so there is nothing to track.
pub struct Upload {
    body: ScrubTrailers<Incoming>,
    done: Option<Arc<Sent>>,
}

/// Whether a request body has been sent whole, and a wake-up when it has.
#[derive(Default)]
pub struct Sent {
    whole: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Sent {
    fn load(&self) -> bool {
        self.whole.load(Ordering::Acquire)
    }

    /// Resolves once the body has been sent whole.
    async fn wait(&self) {
        loop {
            let woken = self.notify.notified();
            if self.load() {
                return;
            }
            woken.await;
        }
    }
}

impl Upload {
    fn new(body: Incoming) -> Self {
        let done = (!body.is_end_stream()).then(|| Arc::new(Sent::default()));
        Self {
            body: ScrubTrailers(body),
            done,
        }
    }

    fn note_end(&self) {
        if let Some(done) = &self.done {
            if !done.whole.swap(true, Ordering::Release) {
                done.notify.notify_waiters();
            }
        }
    }
}

impl Body for Upload {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.body).poll_frame(cx);
        if matches!(r, Poll::Ready(None)) {
            self.note_end();
        }
        r
    }

    // hyper asks this after each frame and stops polling once it is true.
    fn is_end_stream(&self) -> bool {
        let end = self.body.is_end_stream();
        if end {
            self.note_end();
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A workload response body; once read to the end, its connection returns to the pool.
pub struct Pooled {
    body: Incoming,
    back: Option<(Idle, u16, SendRequest<Upload>)>,
    uploaded: Option<Arc<Sent>>,
}

impl Pooled {
    fn give_back(&mut self) {
        let Some((idle, port, sender)) = self.back.take() else {
            return;
        };
        // A workload may answer before reading the whole request body (an early 413, say);
        // hyper then goes on sending it, and a request handed this connection meanwhile
        // would wait behind that upload. Such a connection is not pooled.
        let uploading = self.uploaded.as_ref().is_some_and(|done| !done.load());
        if sender.is_closed() || uploading {
            return;
        }
        let now = Instant::now();
        let mut idle = idle.lock().expect("workload pool lock");
        let list = idle.entry((port, crate::workers::current())).or_default();
        // Requests take the newest, so the oldest would otherwise stay open for good.
        let expired = list.partition_point(|(since, _)| now - *since >= IDLE_TIMEOUT);
        list.drain(..expired);
        if list.len() < MAX_IDLE_PER_PORT {
            list.push((now, sender));
        }
    }
}

impl Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.body).poll_frame(cx);
        match &r {
            Poll::Ready(None) => self.give_back(),
            // A connection that failed mid-body is not reused.
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        // hyper stops polling a body that says it has ended, so the end may show only here.
        // A body dropped before its end leaves unread bytes: that connection is closed.
        if self.body.is_end_stream() {
            self.give_back();
        }
    }
}
