//! Bounded waits: every loop in the tests polls until a deadline, then fails saying what it
//! waited for.

use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Polls `f` every `every` until it returns `Ok`; after `timeout` panics with the message of
/// its last `Err` (built by `f`, so it can carry the logs and pages of that moment).
pub fn poll<T>(timeout: Duration, every: Duration, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(why) => assert!(Instant::now() < deadline, "{why}"),
        }
        std::thread::sleep(every);
    }
}

/// Polls `f` every 50 ms until it holds; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    poll(timeout, Duration::from_millis(50), || {
        f().then_some(())
            .ok_or_else(|| format!("timed out waiting for {what}"))
    })
}

pub fn wait_for_port(addr: SocketAddr, timeout: Duration) {
    poll(timeout, Duration::from_millis(25), || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200))
            .map(drop)
            .map_err(|_| format!("nothing listening on {addr} after {timeout:?}"))
    })
}
