//! HTTP from a workload's side of a sidecar: one GET, raw bytes on a socket, curl.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use crate::run;

/// Minimal HTTP/1.1 GET (Connection: close) for admin endpoints; (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    sigil_testkit::http::get_close(addr, path)
}

/// One keep-alive HTTP/1.1 GET on `s`; the status, or None if the connection failed.
pub fn get(s: &mut TcpStream, path: &str) -> Option<u16> {
    sigil_testkit::http::get(s, path).map(|(status, _)| status)
}

/// A fresh connection to a loopback port, one request: the status, or None.
pub fn get_once(port: u16, path: &str) -> Option<u16> {
    sigil_testkit::http::get_once(port, path).map(|(status, _)| status)
}

/// `curl` through a local port; returns (success, output).
pub fn curl(port: u16, path: &str) -> (bool, String) {
    run(
        Command::new("curl").args([
            "-sS",
            "--max-time",
            "5",
            &format!("http://127.0.0.1:{port}{path}"),
        ]),
        Duration::from_secs(10),
    )
}

/// Sends raw bytes through a local port and returns what came back: one whole response, or
/// what arrived before the connection closed or 5 s passed.
pub fn raw(port: u16, request: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to a local port");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set a read timeout");
    s.write_all(request).expect("send the request");
    read_response(&mut s)
}

/// Reads one whole response from a keep-alive connection (headers and body may arrive in
/// separate segments).
pub fn read_response(s: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !response_complete(&String::from_utf8_lossy(&out)) {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether `text` holds a whole HTTP/1.1 response: headers, then the body its framing
/// announces.
fn response_complete(text: &str) -> bool {
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let head = head.to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match length {
        Some(n) => body.len() >= n,
        None if head.contains("transfer-encoding: chunked") => body.ends_with("0\r\n\r\n"),
        None => true,
    }
}

/// The status code of a raw response (0 if there is none).
pub fn status(resp: &str) -> u16 {
    resp.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Whether the peer closed `s` (EOF or reset) before its read timeout.
pub fn closed(s: &mut TcpStream) -> bool {
    match s.read(&mut [0u8; 64]) {
        Ok(n) => n == 0,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

/// Writes `line` on a relayed byte stream and reads it back: whether the echo workload behind
/// it answered with exactly those bytes.
pub fn echoes(s: &mut TcpStream, line: &[u8]) -> bool {
    let mut back = vec![0u8; line.len()];
    s.write_all(line).is_ok() && s.read_exact(&mut back).is_ok() && back == line
}

/// A connection to a local port (a sidecar's listener, typically) with a 10 s read timeout.
pub fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to a local port");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set a read timeout");
    s
}

/// `connect` to an echo workload behind `port`, and `line` echoed once through it.
pub fn echo_stream(port: u16, line: &[u8]) -> TcpStream {
    let mut s = connect(port);
    assert!(echoes(&mut s, line), "no echo through port {port}");
    s
}
