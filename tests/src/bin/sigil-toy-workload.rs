//! A toy workload for tests, benchmarks and the quickstart.
//!
//! `sigil-toy-workload --listen ADDR --name NAME [--echo]`: answers every HTTP/1.1 request
//! with `hello from NAME` (keep-alive), or with `--echo` copies every byte back (L4 tests).
//! A request for `/slow/MS` is answered after MS milliseconds, so tests can keep one in flight.
//! A request for `/bytes/N` is answered with N bytes of the pattern `i % 251`; every reply
//! otherwise names the request body's length and FNV-1a hash, so tests can check bodies, and
//! the values of every field it could read as `x-sigil-peer-id` (any case, `_` for `-`,
//! trailers too), so tests can check that only the sidecar's got through.
//! Shows what a workload sees: the peer address the sidecar connected from.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};

fn main() {
    let mut listen = None;
    let mut name = String::from("workload");
    let mut echo = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next(),
            "--name" => name = args.next().unwrap_or(name),
            "--echo" => echo = true,
            "--help" | "-h" => {
                println!("usage: sigil-toy-workload --listen ADDR --name NAME [--echo]");
                return;
            }
            other => {
                eprintln!("unknown argument {other:?}; see --help");
                std::process::exit(2);
            }
        }
    }
    let Some(listen) = listen else {
        eprintln!("--listen ADDR is required");
        std::process::exit(2);
    };
    let listener = TcpListener::bind(&listen).unwrap_or_else(|e| {
        eprintln!("bind {listen}: {e}");
        std::process::exit(1);
    });
    println!(
        "{name} listening on {}",
        listener.local_addr().expect("addr")
    );
    for conn in listener.incoming().flatten() {
        let name = name.clone();
        std::thread::spawn(move || {
            let _ = if echo {
                echo_conn(conn)
            } else {
                http_conn(conn, &name)
            };
        });
    }
}

fn echo_conn(mut conn: TcpStream) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        conn.write_all(&buf[..n])?;
    }
}

fn http_conn(conn: TcpStream, name: &str) -> std::io::Result<()> {
    let peer = conn.peer_addr()?;
    conn.set_nodelay(true)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut content_length = 0usize;
        let mut close = false;
        let mut peer_ids = Vec::new();
        let mut te = false;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let lower = h.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                content_length = v.trim().parse().unwrap_or(0);
            }
            if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
            if lower.starts_with("transfer-encoding:") {
                te = true;
            }
            if let Some(value) = identity_field(h) {
                peer_ids.push(value);
            }
        }
        let body = if te {
            read_chunked(&mut reader, &mut peer_ids)?
        } else {
            let mut body = vec![0u8; content_length];
            reader.read_exact(&mut body)?;
            body
        };
        // Shows what the sidecar told the workload about the caller (tests check it).
        let target = request_line.split_whitespace().take(2).collect::<Vec<_>>();
        if let Some(ms) = target
            .get(1)
            .and_then(|t| t.strip_prefix("/slow/"))
            .and_then(|ms| ms.parse().ok())
        {
            std::thread::sleep(std::time::Duration::from_millis(ms));
        }
        if let Some(n) = target
            .get(1)
            .and_then(|t| t.strip_prefix("/bytes/"))
            .and_then(|n| n.parse::<usize>().ok())
        {
            let body: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: {n}\r\n\r\n"
            );
            out.write_all(head.as_bytes())?;
            out.write_all(&body)?;
            if close {
                return Ok(());
            }
            continue;
        }
        let text = format!(
            "hello from {name} ({} from {peer}) peer-id={} framing={} body={}:{:016x}\n",
            target.join(" "),
            peer_ids.join(","),
            match (content_length > 0, te) {
                (true, true) => "both",
                (true, false) => "length",
                (false, true) => "chunked",
                (false, false) => "none",
            },
            body.len(),
            fnv1a(&body)
        );
        // One write per response: several small writes stall on Nagle + delayed ACK.
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{text}",
            text.len()
        );
        out.write_all(response.as_bytes())?;
        if close {
            return Ok(());
        }
    }
}

/// The value of a field line a CGI, WSGI, Rack or PHP backend would read as the sidecar's
/// `x-sigil-peer-id` (any letter case, `_` for `-`), so that tests see every spelling that
/// got through.
fn identity_field(line: &str) -> Option<String> {
    let (name, value) = line.split_once(':')?;
    let folded = name.to_ascii_lowercase().replace('_', "-");
    (folded == "x-sigil-peer-id").then(|| value.trim().to_string())
}

/// A chunked body (RFC 9112 §7.1), whole; identity fields among its trailers are added to
/// `peer_ids` as `trailer:<value>`.
fn read_chunked(reader: &mut impl BufRead, peer_ids: &mut Vec<String>) -> std::io::Result<Vec<u8>> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        reader.read_line(&mut size)?;
        let hex = size.split(';').next().unwrap_or("").trim();
        let n = usize::from_str_radix(hex, 16).map_err(|_| bad("bad chunk size"))?;
        if n == 0 {
            break;
        }
        let start = body.len();
        body.resize(start + n, 0);
        reader.read_exact(&mut body[start..])?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf)?;
    }
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(bad("body ended inside the trailers"));
        }
        let line = line.trim_end();
        if line.is_empty() {
            return Ok(body);
        }
        if let Some(value) = identity_field(line) {
            peer_ids.push(format!("trailer:{value}"));
        }
    }
}

/// FNV-1a, 64 bits: enough to tell a body that arrived whole from one that did not.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
