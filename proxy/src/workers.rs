//! Workers: `spec.workers` threads (default: one per core), each running a current-thread
//! tokio runtime. Each accepted workload or peer connection is dealt to a worker in turn, and
//! everything it causes (its HTTP requests, the pooled connection to a peer sidecar that it
//! sends them on, the connection to the workload) runs on that worker's thread. A request
//! then never wakes a task on another thread. On a work-stealing runtime most requests did,
//! at the cost of a futex or eventfd wake and a context switch (perf/README.md, "Workers").
//! This is how Envoy and nginx run. The main runtime keeps the listeners, the admin endpoint,
//! the control-plane stream and the file watchers.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};

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
    next: AtomicUsize,
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
                    rt.block_on(std::future::pending::<()>());
                })?;
        }
        Ok(Self {
            handles,
            next: AtomicUsize::new(0),
        })
    }

    /// Runs `serve` with `tcp` on the next worker. The socket is moved to that worker's I/O
    /// driver, so that its readiness wakes that thread and no other.
    pub fn serve<F, Fut>(&self, tcp: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let std = match tcp.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot hand a connection to a worker: {e}");
                return;
            }
        };
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        self.handles[i].spawn(async move {
            match TcpStream::from_std(std) {
                Ok(tcp) => serve(tcp).await,
                Err(e) => tracing::warn!("cannot register a connection on worker {i}: {e}"),
            }
        });
    }
}
