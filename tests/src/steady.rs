//! A caller that behaves: steady GETs through a sidecar on a thread of their own while the
//! test does something to the mesh, each call's outcome kept. Bounded in calls and time.

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the caller does; `start` sets it going. Built from `keep_alive` or `fresh`, with
/// other fields set by struct update (`Steady { pause: ..., ..Steady::fresh(port, path) }`).
pub struct Steady {
    pub port: u16,
    pub path: String,
    /// Every call on one keep-alive connection, opened up front (a failed call is not
    /// retried on a new one: the connection must survive); else a new connection a call.
    pub keep_alive: bool,
    /// Time between calls (20 ms unless told).
    pub pause: Duration,
    /// Calls made at the least, however soon the test stops it.
    pub min_calls: usize,
    /// Calls made at the most (20,000 unless told).
    pub max_calls: usize,
    /// How long it calls at the most (60 s unless told).
    pub limit: Duration,
    /// A call succeeds only if its 200's body contains this.
    pub body: &'static str,
}

impl Steady {
    /// Every call on one keep-alive connection to `port`.
    pub fn keep_alive(port: u16, path: &str) -> Self {
        Self::new(port, path, true)
    }

    /// Every call on a new connection to `port`: through a sidecar, a new handshake each.
    pub fn fresh(port: u16, path: &str) -> Self {
        Self::new(port, path, false)
    }

    fn new(port: u16, path: &str, keep_alive: bool) -> Self {
        Self {
            port,
            path: path.into(),
            keep_alive,
            pause: Duration::from_millis(20),
            min_calls: 0,
            max_calls: 20_000,
            limit: Duration::from_secs(60),
            body: "",
        }
    }

    pub fn start(self) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (stop_flag, ok_count, failed_count) = (stop.clone(), ok.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            let mut conn = self.keep_alive.then(|| {
                let s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(10)))
                    .expect("set a read timeout");
                s
            });
            let deadline = Instant::now() + self.limit;
            let mut calls = Vec::new();
            while (!stop_flag.load(Ordering::Relaxed) || calls.len() < self.min_calls)
                && Instant::now() < deadline
                && calls.len() < self.max_calls
            {
                let at = Instant::now();
                let got = match &mut conn {
                    Some(s) => sigil_testkit::http::get(s, &self.path),
                    None => sigil_testkit::http::get_once(self.port, &self.path),
                };
                let ok = matches!(&got, Some((200, body)) if body.contains(self.body));
                let counter = if ok { &ok_count } else { &failed_count };
                counter.fetch_add(1, Ordering::Relaxed);
                calls.push(Call {
                    at,
                    status: got.map(|(status, _)| status),
                    ok,
                });
                if !self.pause.is_zero() {
                    std::thread::sleep(self.pause);
                }
            }
            Calls(calls)
        });
        Load {
            stop,
            ok,
            failed,
            thread: Some(thread),
        }
    }
}

/// A running caller; stopped (after its current call) when dropped.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: Option<JoinHandle<Calls>>,
}

impl Load {
    /// Calls that succeeded so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Calls that failed so far.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Stops it and returns every call it made.
    pub fn stop(mut self) -> Calls {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self.thread.take().expect("stopped once");
        thread.join().expect("the caller's thread")
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One call: when it started, the status it got (None: no answer), whether it succeeded.
#[derive(Clone, Copy, Debug)]
pub struct Call {
    pub at: Instant,
    pub status: Option<u16>,
    pub ok: bool,
}

pub struct Calls(pub Vec<Call>);

impl Calls {
    /// (calls that succeeded, the statuses of those that failed).
    pub fn tally(&self) -> (u32, Vec<Option<u16>>) {
        let ok = self.0.iter().filter(|c| c.ok).count() as u32;
        let failed = self.0.iter().filter(|c| !c.ok).map(|c| c.status).collect();
        (ok, failed)
    }

    /// The calls that started after `t`.
    pub fn after(&self, t: Instant) -> Calls {
        Calls(self.0.iter().copied().filter(|c| c.at > t).collect())
    }
}
