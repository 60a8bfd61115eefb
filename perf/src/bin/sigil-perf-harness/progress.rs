//! Progress lines on stderr; stdout carries the report alone.

pub fn log(msg: impl AsRef<str>) {
    eprintln!("[perf] {}", msg.as_ref());
}
