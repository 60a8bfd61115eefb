//! Workers: `spec.workers` threads (default: one per core), each running a current-thread
//! tokio runtime. Each accepted workload or peer connection is dealt to the least loaded
//! worker (`Workers::serve`), and everything it causes (its HTTP requests, the pooled
//! connection to a peer sidecar that it sends them on, the connection to the workload) runs
//! on that worker's thread. A request then never wakes a task on another thread. On a work-stealing runtime most requests did,
//! at the cost of a futex or eventfd wake and a context switch (perf/HISTORY.md, "Workers").
//! This is how Envoy and nginx run. The main runtime keeps the listeners, the admin endpoint,
//! the control-plane stream and the file watchers.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use sigil_filters::tls::Carries;
use tokio::net::TcpStream;
use tokio::runtime::Handle;

thread_local! {
    /// The worker this thread is, or `usize::MAX` off the workers (the main runtime).
    static WORKER: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// The worker of the calling thread: the per-worker pools key their connections by it.
pub fn current() -> usize {
    WORKER.with(|w| w.get())
}

pub struct Workers {
    handles: Vec<Handle>,
    /// The load of each worker: the connections it serves, multiplexed ones counting more
    /// (`Load`).
    live: Arc<[AtomicUsize]>,
    /// The highest load of each worker since its last tick (`tick`).
    high: Arc<[AtomicUsize]>,
    next: AtomicUsize,
}

/// What a multiplexed connection counts for when dealing (see `Load::multiplexed`).
const MULTIPLEXED: usize = 16;

/// A connection's weight on its worker, counted until the connection's handler drops it
/// (when the handler ends or unwinds). Work a connection hands to a task of its own (an
/// upgraded connection's tunnel) holds a `Load` of its own (`Workers::hold`).
pub struct Load {
    live: Arc<[AtomicUsize]>,
    worker: usize,
    weight: usize,
}

impl Load {
    /// Whether the connection is multiplexed (HTTP/2: a peer sidecar's pooled connection, or
    /// a workload's h2c connection). One that is carries the requests of many connections,
    /// so it counts as `MULTIPLEXED` of them: a short connection must not tie with it. When
    /// wrk's probe connection (opened and closed before its load, forwarded by the client
    /// sidecar as opaque TCP) was still open on the server side as the second pooled HTTP/2
    /// connection arrived, counting each as one sent both pooled connections to the same
    /// worker in 2 of 7 runs (perf/HISTORY.md, "Dealing connections").
    pub fn multiplexed(&mut self, yes: bool) {
        let weight = if yes { MULTIPLEXED } else { 1 };
        if weight > self.weight {
            self.live[self.worker].fetch_add(weight - self.weight, Ordering::Relaxed);
        } else {
            self.live[self.worker].fetch_sub(self.weight - weight, Ordering::Relaxed);
        }
        self.weight = weight;
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.live[self.worker].fetch_sub(self.weight, Ordering::Relaxed);
    }
}

/// Keeps a timer due within `TICK` in the worker's timer wheel, forever. tokio wakes its I/O
/// driver (an eventfd write, then a spurious epoll return) whenever a timer is registered
/// due sooner than the driver's next planned wake, even on a current-thread runtime that is
/// busy running tasks (tokio-rs/tokio#5207, tokio 1.54; recheck when tokio is upgraded).
/// hyper registers one per HTTP/1 request, the header-read timeout; with only the pools'
/// 20 s PINGs and 90 s idle timers in the wheel, half of the requests paid that wake (0.54
/// eventfd writes per request, measured with strace; perf/HISTORY.md, "Dealing
/// connections"). A timer always due within half the header-read timeout makes every such
/// timer later than the planned wake, at the cost of one wake per `TICK` per worker, idle or
/// not.
const TICK: std::time::Duration = crate::http::HEADER_READ_TIMEOUT.checked_div(2).unwrap();

async fn tick(live: Arc<[AtomicUsize]>, high: Arc<[AtomicUsize]>, worker: usize) {
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let load = live[worker].load(Ordering::Relaxed);
        // The highest load since the last tick, counted as connections came: a flood that
        // comes and goes between two ticks is seen too (sampled at the ticks, it was not,
        // and its memory stayed).
        let peak = high[worker].swap(load, Ordering::Relaxed).max(load);
        // Once the connections a flood brought are gone, give their memory back: mimalloc
        // keeps freed pages for reuse, and 2,000 idle relayed connections left 65 MiB
        // resident after they closed; with this, 5 MiB (tests/tests/abuse.rs).
        if peak >= load + RELEASE_AFTER {
            crate::alloc::release_free_memory();
        }
    }
}

/// How far a worker's load must fall before its free memory is returned (`tick`).
const RELEASE_AFTER: usize = 64;

/// How long dealing an inbound connection waits for its ClientHello (`offers_multiplexed`).
/// The handshake timeout, on the worker, starts after.
const HELLO_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Whether the ClientHello arriving on an inbound (mTLS) connection offers to carry a peer's
/// pooled HTTP/2, so that the connection is dealt with the weight it will have. Peeked: the
/// handshake on the worker reads it whole. False when no whole ClientHello came within
/// `HELLO_WAIT`; the handler corrects the weight after the handshake either way.
pub async fn offers_multiplexed(tcp: &TcpStream) -> bool {
    let mut first = vec![0u8; 4096];
    match tokio::time::timeout(HELLO_WAIT, tcp.peek(&mut first)).await {
        Ok(Ok(n)) => sigil_filters::tls::offered(&first[..n]) == Some(Carries::Http2),
        _ => false,
    }
}

impl Workers {
    /// Starts `n` worker threads, each running a current-thread runtime until the process
    /// exits.
    pub fn start(n: usize) -> std::io::Result<Self> {
        let mut handles = Vec::with_capacity(n);
        let all: Arc<[AtomicUsize]> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        let high: Arc<[AtomicUsize]> = (0..n).map(|_| AtomicUsize::new(0)).collect();
        for i in 0..n {
            let (live, high) = (all.clone(), high.clone());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            std::thread::Builder::new()
                .name(format!("sigil-worker-{i}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(i));
                    rt.block_on(tick(live, high, i));
                })?;
        }
        Ok(Self {
            live: all,
            high,
            handles,
            next: AtomicUsize::new(0),
        })
    }

    /// Runs `serve` with `tcp` on the worker with the least load, the first such from a
    /// position that moves on by one each time (so equals are dealt in turn). The socket is
    /// moved to that worker's I/O driver, so that its readiness wakes that thread and no
    /// other. `serve` holds the connection's `Load` for as long as it runs; it starts
    /// counted as `multiplexed` says (for inbound connections, `offers_multiplexed`).
    ///
    /// Dealing in turn alone let short connections steer long ones: wrk opens and closes one
    /// connection before its load, the client sidecar forwards it as opaque TCP, and both
    /// pooled HTTP/2 connections that followed landed on the same server-side worker, which
    /// then carried all the requests on one core (perf/HISTORY.md, "Dealing connections").
    /// Envoy's exact connection balancer also deals by connections served.
    pub fn serve<F, Fut>(&self, tcp: TcpStream, multiplexed: bool, serve: F)
    where
        F: FnOnce(TcpStream, Load) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let std = match tcp.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot hand a connection to a worker: {e}");
                return;
            }
        };
        let i = self.least_loaded();
        let weight = if multiplexed { MULTIPLEXED } else { 1 };
        let now = self.live[i].fetch_add(weight, Ordering::Relaxed) + weight;
        self.high[i].fetch_max(now, Ordering::Relaxed);
        let load = Load {
            live: self.live.clone(),
            worker: i,
            weight,
        };
        self.handles[i].spawn(async move {
            match TcpStream::from_std(std) {
                Ok(tcp) => serve(tcp, load).await,
                Err(e) => tracing::warn!("cannot register a connection on worker {i}: {e}"),
            }
        });
    }

    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// A `Load` of one connection on the calling worker, for work a connection hands to a
    /// task of its own that outlives it (a WebSocket tunnel). None off the workers.
    pub fn hold(&self) -> Option<Load> {
        let worker = current();
        let live = self.live.get(worker)?;
        let now = live.fetch_add(1, Ordering::Relaxed) + 1;
        self.high[worker].fetch_max(now, Ordering::Relaxed);
        Some(Load {
            live: self.live.clone(),
            worker,
            weight: 1,
        })
    }

    /// Connections are dealt from the listeners' tasks, one at a time per listener; two
    /// listeners racing may both pick the same worker, which the next connections even out.
    fn least_loaded(&self) -> usize {
        let n = self.handles.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut best = start;
        let mut fewest = usize::MAX;
        for k in 0..n {
            let i = (start + k) % n;
            let live = self.live[i].load(Ordering::Relaxed);
            if live < fewest {
                best = i;
                fewest = live;
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    /// What a served connection reports: the worker it ran on, then that it ended.
    #[derive(Debug, PartialEq)]
    enum Event {
        Started(usize),
        Ended(usize),
    }

    /// Accepts one connection from a fresh client and deals it; the served side lives until
    /// the client closes.
    async fn deal(
        workers: &Workers,
        listener: &TcpListener,
        events: &mpsc::UnboundedSender<Event>,
        multiplexed: bool,
        found: Option<bool>,
    ) -> TcpStream {
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (served, _) = listener.accept().await.unwrap();
        let events = events.clone();
        workers.serve(served, multiplexed, move |mut tcp, mut load| async move {
            if let Some(yes) = found {
                load.multiplexed(yes);
            }
            let me = current();
            events.send(Event::Started(me)).unwrap();
            let mut byte = [0u8; 1];
            let _ = tcp.read(&mut byte).await;
            // The test may be over and its receiver gone.
            let _ = events.send(Event::Ended(me));
            drop(load);
        });
        client
    }

    /// The worker that the next dealt connection started on.
    async fn started(rx: &mut mpsc::UnboundedReceiver<Event>) -> usize {
        match rx.recv().await {
            Some(Event::Started(w)) => w,
            other => panic!("expected a connection to start, got {other:?}"),
        }
    }

    /// Waits (at most 5 s) until `worker`'s load is `want`: counts change just after the
    /// served futures do.
    async fn load_becomes(workers: &Workers, worker: usize, want: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while workers.live[worker].load(Ordering::Relaxed) != want {
            assert!(
                std::time::Instant::now() < deadline,
                "worker {worker} carries {} instead of {want}",
                workers.live[worker].load(Ordering::Relaxed)
            );
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn a_connection_goes_to_the_worker_serving_the_fewest() {
        let workers = Workers::start(2).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _long = deal(&workers, &listener, &tx, false, None).await;
        let a = started(&mut rx).await;
        let short = deal(&workers, &listener, &tx, false, None).await;
        let b = started(&mut rx).await;
        assert_ne!(a, b, "two connections, two idle workers: one each");
        drop(short);
        assert_eq!(rx.recv().await, Some(Event::Ended(b)));
        load_becomes(&workers, b, 0).await;
        // Dealing in turn would now pick `a` again, which still serves the long one.
        let _third = deal(&workers, &listener, &tx, false, None).await;
        assert_eq!(
            rx.recv().await,
            Some(Event::Started(b)),
            "the third connection goes to the worker that serves none"
        );
    }

    #[tokio::test]
    async fn a_multiplexed_connection_outweighs_a_plain_one() {
        let workers = Workers::start(2).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _pooled = deal(&workers, &listener, &tx, false, Some(true)).await;
        let a = started(&mut rx).await;
        let _plain = deal(&workers, &listener, &tx, false, None).await;
        let b = started(&mut rx).await;
        assert_ne!(a, b);
        // Counted as one connection each, the workers would tie and dealing in turn
        // would pick `a`, which carries the multiplexed connection.
        let _next = deal(&workers, &listener, &tx, false, None).await;
        assert_eq!(rx.recv().await, Some(Event::Started(b)));
    }

    #[tokio::test]
    async fn a_connection_guessed_multiplexed_counts_as_such_until_found_otherwise() {
        let workers = Workers::start(2).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        // Guessed multiplexed, never told otherwise (a handshake still under way).
        let _guessed = deal(&workers, &listener, &tx, true, None).await;
        let a = started(&mut rx).await;
        let _plain = deal(&workers, &listener, &tx, false, None).await;
        let b = started(&mut rx).await;
        assert_ne!(a, b);
        let _next = deal(&workers, &listener, &tx, false, None).await;
        assert_eq!(rx.recv().await, Some(Event::Started(b)));
        // Guessed multiplexed, then found plain: one connection, like the others. The
        // loads are now a 16, b 2; c: 1, plain.
        let _found_plain = deal(&workers, &listener, &tx, true, Some(false)).await;
        let c = started(&mut rx).await;
        assert_eq!(c, b, "b carried 2 against a's 16");
        load_becomes(&workers, b, 3).await;
    }

    #[test]
    fn hold_counts_on_the_calling_worker_until_dropped() {
        let workers = Arc::new(Workers::start(2).unwrap());
        assert!(workers.hold().is_none(), "this thread is no worker");
        let (tx, rx) = std::sync::mpsc::channel();
        let w = workers.clone();
        workers.handles[1].spawn(async move {
            let held = w.hold().expect("on a worker");
            tx.send((held.worker, w.live[1].load(Ordering::Relaxed)))
                .unwrap();
            drop(held);
            tx.send((1, w.live[1].load(Ordering::Relaxed))).unwrap();
        });
        let wait = std::time::Duration::from_secs(5);
        assert_eq!(rx.recv_timeout(wait).unwrap(), (1, 1));
        assert_eq!(rx.recv_timeout(wait).unwrap(), (1, 0));
    }

    /// A ClientHello offering `alpn`, as a TLS client sends it first.
    fn client_hello(alpn: &[u8]) -> Vec<u8> {
        let mut config =
            rustls::ClientConfig::builder_with_provider(sigil_filters::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth();
        config.alpn_protocols = vec![alpn.to_vec()];
        let name = rustls::pki_types::ServerName::try_from("example.org").unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    #[tokio::test]
    async fn an_inbound_connection_is_weighed_by_its_client_hello_which_stays_unread() {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        for (carries, want) in [(Carries::Http2, true), (Carries::Tcp, false)] {
            let hello = client_hello(carries.alpn());
            let mut client = TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let (mut served, _) = listener.accept().await.unwrap();
            client.write_all(&hello).await.unwrap();
            assert_eq!(offers_multiplexed(&served).await, want, "{carries:?}");
            // The handshake still finds the whole ClientHello.
            let mut read = vec![0u8; hello.len()];
            served.read_exact(&mut read).await.unwrap();
            assert_eq!(read, hello);
        }
        // A client that sends nothing is dealt as one connection once the wait is over.
        let _silent = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (served, _) = listener.accept().await.unwrap();
        assert!(!offers_multiplexed(&served).await);
    }
}
