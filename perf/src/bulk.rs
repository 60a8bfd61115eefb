//! A bounded bulk-transfer client: pushes N bytes through an echo server (directly or via a
//! proxy pair) on one connection, reading the echo back concurrently, and times it.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHUNK: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct BulkResult {
    /// Bytes that came back from the echo server.
    pub bytes: u64,
    pub secs: f64,
    /// All `bytes` requested came back, intact (sampled check), before the deadline.
    pub complete: bool,
    pub error: Option<String>,
}

impl BulkResult {
    /// Echoed payload per second, MiB/s (each byte also travelled the other way).
    pub fn mib_per_sec(&self) -> f64 {
        self.bytes as f64 / (1024.0 * 1024.0) / self.secs
    }
}

/// The byte at stream offset `i`: a pattern with period 251 (prime, so it never lines up with
/// the chunk size), checked on the echo to catch corruption or reordering.
fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

/// Sends `total` bytes to the echo server at `addr` (must be loopback) and reads them back,
/// bounded by `limit` in time. The clock runs from the first write to the last byte read.
pub fn echo(addr: SocketAddr, total: u64, limit: Duration) -> BulkResult {
    assert!(
        addr.ip().is_loopback(),
        "load only goes to loopback: {addr}"
    );
    let fail = |e: String| BulkResult {
        bytes: 0,
        secs: f64::NAN,
        complete: false,
        error: Some(e),
    };
    let conn = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(c) => c,
        Err(e) => return fail(format!("connect {addr}: {e}")),
    };
    let step = Duration::from_millis(500);
    let setup = conn
        .set_read_timeout(Some(step))
        .and_then(|_| conn.set_write_timeout(Some(step)))
        .and_then(|_| conn.try_clone());
    let mut writer = match setup {
        Ok(w) => w,
        Err(e) => return fail(format!("socket setup: {e}")),
    };
    let mut reader = conn;
    let start = Instant::now();
    let deadline = start + limit;
    let stop = Arc::new(AtomicBool::new(false));

    let stop_w = stop.clone();
    let write_side = std::thread::spawn(move || -> Result<(), String> {
        // One buffer holding two periods of the pattern, sliced at the right phase.
        let buf: Vec<u8> = (0..(CHUNK as u64 + 251)).map(pattern).collect();
        let mut sent = 0u64;
        while sent < total {
            if stop_w.load(Ordering::Relaxed) || Instant::now() >= deadline {
                return Err(format!("writer stopped after {sent} bytes"));
            }
            let phase = (sent % 251) as usize;
            let n = (total - sent).min(CHUNK as u64) as usize;
            match writer.write(&buf[phase..phase + n]) {
                Ok(0) => return Err("connection closed while writing".into()),
                Ok(w) => sent += w as u64,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("write after {sent} bytes: {e}")),
            }
        }
        // No half-close here: the reader knows how many bytes to expect, and the figure should
        // not depend on how a proxy treats a FIN in one direction.
        Ok(())
    });

    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    let mut error = None;
    let mut end = Instant::now();
    while got < total {
        if Instant::now() >= deadline {
            error = Some(format!("time limit {limit:?} reached after {got} bytes"));
            break;
        }
        match reader.read(&mut buf) {
            Ok(0) => {
                error = Some(format!("connection closed after {got} of {total} bytes"));
                break;
            }
            Ok(n) => {
                if buf[0] != pattern(got) || buf[n - 1] != pattern(got + n as u64 - 1) {
                    error = Some(format!("echoed bytes differ near offset {got}"));
                    break;
                }
                got += n as u64;
                end = Instant::now();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                error = Some(format!("read after {got} bytes: {e}"));
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = reader.shutdown(Shutdown::Both);
    if let Ok(Err(e)) = write_side.join() {
        error.get_or_insert(e);
    }
    BulkResult {
        bytes: got,
        secs: (end - start).as_secs_f64(),
        complete: got == total && error.is_none(),
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn echoes_through_a_local_echo_server() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            let mut buf = vec![0u8; 8192];
            loop {
                let n = c.read(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                c.write_all(&buf[..n]).unwrap();
            }
        });
        let r = echo(addr, 3 * 1024 * 1024 + 17, Duration::from_secs(20));
        assert!(r.complete, "{r:?}");
        assert_eq!(r.bytes, 3 * 1024 * 1024 + 17);
        assert!(r.mib_per_sec() > 0.0);
        server.join().unwrap();
    }
}
