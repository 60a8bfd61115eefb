//! A minimal HTTP/1.1 client for tests and the demo: one GET on a keep-alive connection,
//! reading exactly one response (headers and body may arrive in separate segments).

use std::io::{Read, Write};
use std::net::TcpStream;

/// One keep-alive GET on `s`: (status, body), or None if the connection failed or closed.
pub fn get(s: &mut TcpStream, path: &str) -> Option<(u16, String)> {
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: b\r\n\r\n").as_bytes())
        .ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let l = l.to_ascii_lowercase();
                    l.strip_prefix("content-length:")
                        .and_then(|v| v.trim().parse().ok())
                })
                .unwrap_or(0);
            if body.len() >= len {
                let status = head.split_whitespace().nth(1)?.parse().ok()?;
                return Some((status, body[..len].trim_end().to_string()));
            }
        }
    }
}
