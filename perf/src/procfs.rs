//! Memory and CPU of the processes under test, from `/proc` (Linux only).
//!
//! A [`Group`] is one logical proxy: a single process (sigil-proxy), or an nginx master and
//! its worker processes (its direct children). RSS is the sum of `VmRSS` over the group's
//! processes (for nginx this counts pages shared between master and workers more than once;
//! `RssAnon`, also collected, does not); CPU is the sum of `utime + stime`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A field of `/proc/PID/status` in KiB (`VmRSS`, `RssAnon`, `VmHWM` …).
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The fields of `/proc/PID/stat` after the `(comm)` field, so that index 0 is `state`.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &text[text.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// `utime + stime` of one process, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let f = stat_fields(pid)?;
    // stat(5): utime is field 14, stime 15; after `comm` (field 2), state is field 3 = index 0.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU seconds the whole machine spent in user, nice and system mode (first line of
/// `/proc/stat`; idle, iowait, irq, softirq and steal are left out).
pub fn machine_busy_secs() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = text.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = cpu
        .split_whitespace()
        .filter_map(|t| t.parse().ok())
        .collect();
    Some((v.first()? + v.get(1)? + v.get(2)?) as f64 / clk_tck())
}

/// CPU seconds the hypervisor gave to others while this machine wanted to run (`steal`,
/// eighth value of the first line of `/proc/stat`), summed over all CPUs.
pub fn machine_steal_secs() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = text.lines().next()?.strip_prefix("cpu ")?;
    let steal: u64 = cpu.split_whitespace().nth(7)?.parse().ok()?;
    Some(steal as f64 / clk_tck())
}

/// CPU seconds of this process plus its waited-for children (wrk runs as a child).
pub fn self_and_children_secs() -> Option<f64> {
    let f = stat_fields(std::process::id())?;
    let t: u64 = (11..=14)
        .map(|i| f.get(i)?.parse::<i64>().ok())
        .sum::<Option<i64>>()?
        .max(0) as u64;
    Some(t as f64 / clk_tck())
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Direct children of `pid` (nginx workers of a master), found by scanning `/proc/*/stat`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| {
            stat_fields(p)
                .and_then(|f| f.get(1)?.parse::<u32>().ok())
                .is_some_and(|ppid| ppid == pid)
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct Group {
    pub name: String,
    pub root: u32,
    /// The root and, if asked, its direct children as they were at `new` (nginx workers do
    /// not change while the harness runs; caching them keeps sampling cheap).
    pids: Vec<u32>,
}

impl Group {
    pub fn new(name: &str, root: u32, with_children: bool) -> Self {
        let mut pids = vec![root];
        if with_children {
            pids.extend(children(root));
        }
        Self {
            name: name.to_string(),
            root,
            pids,
        }
    }

    pub fn pids(&self) -> &[u32] {
        &self.pids
    }

    /// All cached processes still exist (an nginx worker that died would be missed).
    pub fn intact(&self) -> bool {
        self.pids
            .iter()
            .all(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
    }

    /// Sum of `VmRSS` in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.pids()
            .iter()
            .filter_map(|&p| status_kib(p, "VmRSS"))
            .sum()
    }

    /// Sum of `RssAnon` (private, anonymous memory) in KiB.
    pub fn anon_kib(&self) -> u64 {
        self.pids()
            .iter()
            .filter_map(|&p| status_kib(p, "RssAnon"))
            .sum()
    }

    /// CPU seconds (user + system) used so far by the group's live processes.
    pub fn cpu_secs(&self) -> f64 {
        let ticks: u64 = self.pids().iter().filter_map(|&p| cpu_ticks(p)).sum();
        ticks as f64 / clk_tck()
    }
}

/// Samples the RSS of every group every `interval` on a thread and keeps the peak since the
/// last [`Sampler::reset`]. The thread stops when the sampler is dropped.
pub struct Sampler {
    groups: Vec<Group>,
    peaks: Arc<Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    pub fn start(groups: Vec<Group>, interval: Duration) -> Self {
        let peaks = Arc::new(Mutex::new(vec![0u64; groups.len()]));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (groups, peaks, stop) = (groups.clone(), peaks.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let now: Vec<u64> = groups.iter().map(Group::rss_kib).collect();
                    let mut p = peaks.lock().expect("peaks lock");
                    for (peak, v) in p.iter_mut().zip(now) {
                        *peak = (*peak).max(v);
                    }
                    drop(p);
                    std::thread::sleep(interval);
                }
            })
        };
        Self {
            groups,
            peaks,
            stop,
            thread: Some(thread),
        }
    }

    pub fn groups(&self) -> &[Group] {
        &self.groups
    }

    pub fn reset(&self) {
        self.peaks
            .lock()
            .expect("peaks lock")
            .iter_mut()
            .for_each(|p| *p = 0);
    }

    /// Peak RSS (KiB) per group since the last reset, in the order of `groups()`.
    pub fn peaks(&self) -> Vec<u64> {
        self.peaks.lock().expect("peaks lock").clone()
    }

    /// CPU seconds per group, in the order of `groups()`.
    pub fn cpu(&self) -> Vec<f64> {
        self.groups.iter().map(Group::cpu_secs).collect()
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(status_kib(me, "VmRSS").unwrap() > 0);
        // Burn a little CPU so the counter is not trivially zero on a fast machine.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        std::hint::black_box(x);
        assert!(cpu_ticks(me).is_some());
        assert!(machine_busy_secs().unwrap() > 0.0);
        assert!(machine_steal_secs().is_some());
        assert!(self_and_children_secs().is_some());
        let g = Group::new("me", me, false);
        assert!(g.intact());
        assert_eq!(g.pids(), &[me]);
        assert!(g.rss_kib() > 0);
    }
}
