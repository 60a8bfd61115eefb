//! Log lines that a client can cause one of per connection or request (refusals, denials,
//! failed handshakes) go through `limited!`: each call site writes at most `PER_SECOND`
//! lines a second, and the next line it writes says how many it held back. A flood then
//! costs the log a few lines a second per site, not one per connection (40 s of floods once
//! wrote 61 MB at INFO); the metrics still count every event.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Lines a call site may write per second.
pub const PER_SECOND: u32 = 10;

/// One call site's budget: the current second and the lines asked for in it, packed in one
/// word; and the lines held back that no line has reported yet.
pub struct Limiter {
    window: AtomicU64,
    held_back: AtomicU64,
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new()
    }
}

impl Limiter {
    pub const fn new() -> Self {
        Self {
            window: AtomicU64::new(0),
            held_back: AtomicU64::new(0),
        }
    }

    /// Some(n): write the line, saying that `n` were held back since the last one written.
    /// None: hold it back.
    pub fn allow(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.allow_at(now)
    }

    fn allow_at(&self, now_secs: u64) -> Option<u64> {
        let second = now_secs & 0xffff_ffff;
        let mut current = self.window.load(Ordering::Relaxed);
        loop {
            let (at, count) = (current >> 32, current & 0xffff_ffff);
            let next = if at == second {
                (second << 32) | (count + 1).min(0xffff_ffff)
            } else {
                (second << 32) | 1
            };
            match self.window.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) if next & 0xffff_ffff <= u64::from(PER_SECOND) => {
                    return Some(self.held_back.swap(0, Ordering::Relaxed));
                }
                Ok(_) => {
                    self.held_back.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                Err(seen) => current = seen,
            }
        }
    }
}

/// `tracing`'s `$level!` with a per-call-site budget (`Limiter`); a line written after some
/// were held back carries `suppressed = n`.
macro_rules! limited {
    ($level:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::logs::Limiter = $crate::logs::Limiter::new();
        match LIMIT.allow() {
            Some(0) => tracing::$level!($($arg)+),
            Some(suppressed) => tracing::$level!(suppressed, $($arg)+),
            None => {}
        }
    }};
}
pub(crate) use limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_site_writes_its_budget_each_second_and_then_says_what_it_held_back() {
        let l = Limiter::new();
        let t = 1_800_000_000;
        let first: Vec<Option<u64>> = (0..25).map(|_| l.allow_at(t)).collect();
        assert!(first[..PER_SECOND as usize].iter().all(|a| *a == Some(0)));
        assert!(first[PER_SECOND as usize..].iter().all(|a| a.is_none()));
        // The next second: the first line reports the 15 held back, then counting starts
        // over.
        assert_eq!(l.allow_at(t + 1), Some(15));
        assert_eq!(l.allow_at(t + 1), Some(0));
        // A quiet gap changes nothing.
        assert_eq!(l.allow_at(t + 60), Some(0));
    }
}
