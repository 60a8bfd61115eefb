//! Loopback addresses and a small, bounded HTTP/1.1 client: for sidecars' `/ready` and
//! `/metrics`, and for the sanity checks.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

pub fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One HTTP/1.1 request with `Connection: close`, bounded by 5 s; returns the raw response.
pub fn http_get(a: SocketAddr, path: &str) -> Result<String, String> {
    http_get_with(a, path, "")
}

/// As [`http_get`], with extra header lines (each ending in `\r\n`).
pub fn http_get_with(a: SocketAddr, path: &str, extra: &str) -> Result<String, String> {
    let mut c = TcpStream::connect_timeout(&a, Duration::from_secs(2))
        .map_err(|e| format!("connect {a}: {e}"))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))
        .and_then(|_| c.set_write_timeout(Some(Duration::from_secs(5))))
        .map_err(|e| e.to_string())?;
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: perf.local\r\nConnection: close\r\n{extra}\r\n"
    )
    .map_err(|e| format!("write {a}: {e}"))?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && out.len() < 1 << 20 {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if out.is_empty() => return Err(format!("read {a}: {e}")),
            Err(_) => break,
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

pub fn is_ok_200(resp: &str) -> bool {
    resp.starts_with("HTTP/1.1 200") || resp.starts_with("HTTP/1.0 200")
}

/// The body of a raw HTTP/1.1 response (after the blank line).
pub fn body(resp: &str) -> &str {
    resp.split_once("\r\n\r\n").map_or("", |(_, b)| b)
}
