//! Workers: `spec.workers` threads (default: one per core), each running a current-thread
//! tokio runtime. Each accepted workload or peer connection is dealt to the least loaded
//! worker (`Workers::serve`), and everything it causes (its HTTP requests, the pooled
//! connection to a peer sidecar that it sends them on, the connection to the workload) runs
//! on that worker's thread. A request then never wakes a task on another thread. On a work-stealing runtime most requests did,
//! at the cost of a futex or eventfd wake and a context switch (perf/README.md, "Workers").
//! This is how Envoy and nginx run. The main runtime keeps the listeners, the admin endpoint,
//! the control-plane stream and the file watchers.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

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
    next: AtomicUsize,
}

/// What a multiplexed connection counts for when dealing (see `Load::multiplexed`).
const MULTIPLEXED: usize = 16;

/// A connection's weight on its worker, counted until the connection's handler drops it
/// (when the handler ends or unwinds).
pub struct Load {
    live: Arc<[AtomicUsize]>,
    worker: usize,
    weight: usize,
}

impl Load {
    /// Marks the connection as multiplexed (HTTP/2: a peer sidecar's pooled connection, or
    /// a workload's h2c connection). It carries the requests of many connections, so it
    /// counts as `MULTIPLEXED` of them: a short connection must not tie with it. When wrk's
    /// probe connection (opened and closed before its load, forwarded by the client sidecar
    /// as opaque TCP) was still open on the server side as the second pooled HTTP/2
    /// connection arrived, counting each as one sent both pooled connections to the same
    /// worker half of the time (perf/README.md, "Dealing connections").
    pub fn multiplexed(&mut self) {
        if self.weight < MULTIPLEXED {
            self.live[self.worker].fetch_add(MULTIPLEXED - self.weight, Ordering::Relaxed);
            self.weight = MULTIPLEXED;
        }
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
/// busy running tasks (tokio-rs/tokio#5207). hyper registers one per HTTP/1 request, the
/// header-read timeout (10 s); with only the pools' 20 s PINGs and 90 s idle timers in the
/// wheel, half of the requests paid that wake (0.54 eventfd writes per request, measured
/// with strace; perf/README.md). A timer always due within a second makes every 10 s
/// timer later than the planned wake, at the cost of one wake per second per worker.
const TICK: std::time::Duration = std::time::Duration::from_secs(1);

async fn tick() {
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
    }
}

impl Workers {
    /// Starts `n` worker threads, each running a current-thread runtime until the process
    /// exits.
    pub fn start(n: usize) -> std::io::Result<Self> {
        let mut handles = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            std::thread::Builder::new()
                .name(format!("sigil-worker-{i}"))
                .spawn(move || {
                    WORKER.with(|w| w.set(i));
                    rt.block_on(tick());
                })?;
        }
        Ok(Self {
            live: (0..n).map(|_| AtomicUsize::new(0)).collect(),
            handles,
            next: AtomicUsize::new(0),
        })
    }

    /// Runs `serve` with `tcp` on the worker with the least load, the first such from a
    /// position that moves on by one each time (so equals are dealt in turn). The socket is
    /// moved to that worker's I/O driver, so that its readiness wakes that thread and no
    /// other. `serve` holds the connection's `Load` for as long as it runs.
    ///
    /// Dealing in turn alone let short connections steer long ones: wrk opens and closes one
    /// connection before its load, the client sidecar forwards it as opaque TCP, and both
    /// pooled HTTP/2 connections that followed landed on the same server-side worker, which
    /// then carried all the requests on one core (perf/README.md, "Dealing connections").
    /// Envoy's exact connection balancer also deals by connections served.
    pub fn serve<F, Fut>(&self, tcp: TcpStream, serve: F)
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
        self.live[i].fetch_add(1, Ordering::Relaxed);
        let load = Load {
            live: self.live.clone(),
            worker: i,
            weight: 1,
        };
        self.handles[i].spawn(async move {
            match TcpStream::from_std(std) {
                Ok(tcp) => serve(tcp, load).await,
                Err(e) => tracing::warn!("cannot register a connection on worker {i}: {e}"),
            }
        });
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
    ) -> TcpStream {
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (served, _) = listener.accept().await.unwrap();
        let events = events.clone();
        workers.serve(served, move |mut tcp, mut load| async move {
            if multiplexed {
                load.multiplexed();
            }
            let me = current();
            events.send(Event::Started(me)).unwrap();
            let mut byte = [0u8; 1];
            let _ = tcp.read(&mut byte).await;
            events.send(Event::Ended(me)).unwrap();
            drop(load);
        });
        client
    }

    #[test]
    fn a_connection_goes_to_the_worker_serving_the_fewest() {
        let workers = Workers::start(2).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let (tx, mut rx) = mpsc::unbounded_channel();
            let _long = deal(&workers, &listener, &tx, false).await;
            let Some(Event::Started(a)) = rx.recv().await else {
                panic!("first connection not served")
            };
            let short = deal(&workers, &listener, &tx, false).await;
            let Some(Event::Started(b)) = rx.recv().await else {
                panic!("second connection not served")
            };
            assert_ne!(a, b, "two connections, two idle workers: one each");
            drop(short);
            assert_eq!(rx.recv().await, Some(Event::Ended(b)));
            // The count drops just after the served future returns.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while workers.live[b].load(Ordering::Relaxed) != 0 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "worker {b} count stuck"
                );
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            // Dealing in turn would now pick `a` again, which still serves the long one.
            let _third = deal(&workers, &listener, &tx, false).await;
            assert_eq!(
                rx.recv().await,
                Some(Event::Started(b)),
                "the third connection goes to the worker that serves none"
            );
        });
    }

    #[test]
    fn a_multiplexed_connection_outweighs_a_plain_one() {
        let workers = Workers::start(2).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let (tx, mut rx) = mpsc::unbounded_channel();
            let _pooled = deal(&workers, &listener, &tx, true).await;
            let Some(Event::Started(a)) = rx.recv().await else {
                panic!("first connection not served")
            };
            let _plain = deal(&workers, &listener, &tx, false).await;
            let Some(Event::Started(b)) = rx.recv().await else {
                panic!("second connection not served")
            };
            assert_ne!(a, b);
            // Counted as one connection each, the workers would tie and dealing in turn
            // would pick `a`, which carries the multiplexed connection.
            let _next = deal(&workers, &listener, &tx, false).await;
            assert_eq!(rx.recv().await, Some(Event::Started(b)));
        });
    }
}
