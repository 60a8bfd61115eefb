//! A TCP relay standing for a network path the test controls.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A TCP relay on loopback standing for a network path the test controls: where it leads
/// can change, it can hold every byte back (a partition that keeps connections open), and
/// it can cut every connection it carries. Ended on drop.
pub struct Relay {
    pub port: u16,
    state: Arc<RelayState>,
}

struct RelayState {
    target: Mutex<u16>,
    paused: std::sync::atomic::AtomicBool,
    stopping: std::sync::atomic::AtomicBool,
    /// Both ends of every connection carried, for `cut`.
    conns: Mutex<Vec<TcpStream>>,
}

impl Relay {
    pub fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let port = listener.local_addr().expect("relay addr").port();
        let state = Arc::new(RelayState {
            target: Mutex::new(target),
            paused: Default::default(),
            stopping: Default::default(),
            conns: Mutex::new(Vec::new()),
        });
        let s = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stopping.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(down) = conn else { continue };
                let target = *s.target.lock().expect("relay lock");
                let Ok(up) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let _ = (down.set_nodelay(true), up.set_nodelay(true));
                let pair = (
                    down.try_clone(),
                    up.try_clone(),
                    down.try_clone(),
                    up.try_clone(),
                );
                let (Ok(d2), Ok(u2), Ok(d3), Ok(u3)) = pair else {
                    continue;
                };
                s.conns.lock().expect("relay lock").extend([d3, u3]);
                let (s1, s2) = (s.clone(), s.clone());
                std::thread::spawn(move || pipe(down, u2, &s1));
                std::thread::spawn(move || pipe(up, d2, &s2));
            }
        });
        Self { port, state }
    }

    /// New connections go to `target` from now on.
    pub fn set_target(&self, target: u16) {
        *self.state.target.lock().expect("relay lock") = target;
    }

    /// Holds back (true) or lets through (false) the bytes of every connection.
    pub fn pause(&self, paused: bool) {
        self.state.paused.store(paused, Ordering::Relaxed);
    }

    /// Closes every connection carried so far.
    pub fn cut(&self) {
        for c in self.state.conns.lock().expect("relay lock").drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, state: &RelayState) {
    use std::io::Write;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while state.paused.load(Ordering::Relaxed) && !state.stopping.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.state.stopping.store(true, Ordering::Relaxed);
        self.cut();
        // Wakes the accept loop so that it sees `stopping`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}
