//! L4 byte relay between the peer side (mTLS) and the local side, with live byte counters,
//! a close signal from the connection registry, and an idle timeout (`timeouts.idle`): a
//! connection on which no byte moves either way for that long is closed (`idle_timeout`), so
//! that silent connections (a request head cut off halfway, say) do not hold descriptors and
//! buffers for good.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

use crate::conns::ConnBytes;
use crate::reasons::CloseReason;

/// One TLS record's worth of plaintext per read keeps TLS framing and syscalls balanced.
const BUF: usize = 16 * 1024;

/// Where a connection's bytes are counted: the metrics of its labels, and its own totals.
#[derive(Clone, Default)]
pub struct Counters {
    pub from_peer: Counter,
    pub to_peer: Counter,
    pub conn: Arc<ConnBytes>,
}

/// Which way bytes went.
#[derive(Clone, Copy)]
enum Way {
    FromPeer,
    ToPeer,
}

impl Counters {
    fn add(&self, way: Way, n: u64) {
        match way {
            Way::FromPeer => {
                self.from_peer.inc_by(n);
                self.conn.from_peer.fetch_add(n, Ordering::Relaxed);
            }
            Way::ToPeer => {
                self.to_peer.inc_by(n);
                self.conn.to_peer.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

/// Copies both ways until both sides finish, an error, a close request, or `idle` without a
/// byte either way. Returns why it ended.
pub async fn relay<P, L>(
    peer: P,
    local: L,
    counters: &Counters,
    close_rx: &mut watch::Receiver<Option<CloseReason>>,
    idle: Duration,
) -> CloseReason
where
    P: AsyncRead + AsyncWrite + Unpin,
    L: AsyncRead + AsyncWrite + Unpin,
{
    let (mut peer_r, mut peer_w) = tokio::io::split(peer);
    let (mut local_r, mut local_w) = tokio::io::split(local);
    let activity = Activity::new();
    let both = async {
        let up = pump(
            &mut peer_r,
            &mut local_w,
            counters,
            Way::FromPeer,
            &activity,
        );
        let down = pump(&mut local_r, &mut peer_w, counters, Way::ToPeer, &activity);
        tokio::pin!(up, down);
        // A clean EOF one way is a half-close: keep the other way running. An error either
        // way ends the connection, so both sockets close and neither end waits in vain.
        let (first, rest) = tokio::select! {
            r = &mut up => (r, Either::Down),
            r = &mut down => (r, Either::Up),
        };
        if first.is_err() {
            return classify(first);
        }
        classify(match rest {
            Either::Up => up.await,
            Either::Down => down.await,
        })
    };
    tokio::select! {
        reason = both => reason,
        reason = closed(close_rx) => reason,
        reason = activity.idle_for(idle) => reason,
    }
}

/// When bytes last moved, in milliseconds since the relay began. One timer per connection,
/// re-armed once per `idle` period rather than per read.
struct Activity {
    start: tokio::time::Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: tokio::time::Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves with `idle_timeout` once nothing moved for `idle`.
    async fn idle_for(&self, idle: Duration) -> CloseReason {
        loop {
            let last = self.last_ms.load(Ordering::Relaxed);
            tokio::time::sleep_until(self.start + Duration::from_millis(last) + idle).await;
            if self.last_ms.load(Ordering::Relaxed) == last {
                return CloseReason::IdleTimeout;
            }
        }
    }
}

enum Either {
    Up,
    Down,
}

async fn pump<R, W>(
    r: &mut R,
    w: &mut W,
    counters: &Counters,
    way: Way,
    activity: &Activity,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF];
    loop {
        let n = r.read(&mut buf).await?;
        activity.touch();
        if n == 0 {
            // Half-close: pass the EOF on, keep the other direction running.
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
        w.flush().await?;
        counters.add(way, n as u64);
    }
}

fn classify(r: io::Result<()>) -> CloseReason {
    match r {
        Ok(()) => CloseReason::Done,
        // TCP closed without TLS close_notify: a truncation, worth telling apart.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => CloseReason::PeerClosed,
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => CloseReason::Reset,
        Err(_) => CloseReason::IoError,
    }
}

/// Resolves with the reason once the registry asks this connection to close.
pub async fn closed(rx: &mut watch::Receiver<Option<CloseReason>>) -> CloseReason {
    close_request(rx, true).await
}

/// Resolves with the reason once the registry asks this connection to close at once (not
/// gracefully, see `CloseReason::is_graceful`).
pub async fn cut(rx: &mut watch::Receiver<Option<CloseReason>>) -> CloseReason {
    close_request(rx, false).await
}

/// Resolves with the first close reason the registry asks for; a graceful one only if
/// `graceful_too`.
pub async fn close_request(
    rx: &mut watch::Receiver<Option<CloseReason>>,
    graceful_too: bool,
) -> CloseReason {
    loop {
        if let Some(reason) = *rx.borrow_and_update() {
            if graceful_too || !reason.is_graceful() {
                return reason;
            }
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// A stream whose first bytes were already read (protocol detection): they are replayed
/// before the rest.
pub struct Rewind<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = (self.prefix.len() - self.pos).min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Reads the client's first bytes until they tell HTTP/1, HTTP/2 or opaque TCP apart, the
/// stream ends, or `timeout` passes (server-first protocols send nothing: opaque).
pub async fn sniff<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: std::time::Duration,
) -> (sigil_filters::detect::Detected, Vec<u8>) {
    use sigil_filters::detect::{classify, Detected};
    let mut prefix = Vec::with_capacity(64);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut chunk = [0u8; 64];
        let read = tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await;
        match read {
            Ok(Ok(n)) if n > 0 => prefix.extend_from_slice(&chunk[..n]),
            _ => return (Detected::Opaque, prefix),
        }
        match classify(&prefix) {
            Detected::NeedMore => continue,
            d => return (d, prefix),
        }
    }
}

/// Counts bytes read from and written to the peer side of a connection served at L7.
pub struct Counted<S> {
    inner: S,
    counters: Counters,
}

impl<S> Counted<S> {
    pub fn new(inner: S, counters: Counters) -> Self {
        Self { inner, counters }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let n = (buf.filled().len() - before) as u64;
            self.counters.add(Way::FromPeer, n);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.counters.add(Way::ToPeer, n as u64);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
