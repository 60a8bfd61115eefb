//! Runs `h2load` (nghttp2) for HTTP/2 (h2c, prior knowledge) and fixed-rate HTTP/1.1 or
//! HTTP/2 loads, and parses its summary and its per-request log.
//!
//! h2load prints latency only as min / max / mean / sd, so every run writes `--log-file`
//! (one line per request: start time µs, status, µs until the end of the response) and the
//! percentiles are computed here from all requests of the run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct H2Args {
    pub threads: u32,
    pub connections: u32,
    /// Concurrent streams per connection (`-m`); with `--h1`, pipelined requests.
    pub streams: u32,
    /// Timing-based run (`-D`). With `requests` set, how long the run is expected to take.
    pub duration: Duration,
    /// Count-based run (`-n`): sanity checks, and staggered fixed-rate runs.
    pub requests: Option<u64>,
    /// Requests per second *per connection* (`--rps`); None: as fast as possible.
    pub rps: Option<u32>,
    /// Open the connections this many whole milliseconds apart (`-r 1 --rate-period`), so
    /// that their `--rps` timers are spread out instead of firing together. h2load allows
    /// this only with `requests` (`-r` excludes `-D`).
    pub stagger_ms: Option<u32>,
    /// HTTP/1.1 (`--h1`) instead of HTTP/2 prior knowledge.
    pub h1: bool,
    pub log_file: PathBuf,
}

impl H2Args {
    pub fn command_line(&self, url: &str) -> Vec<String> {
        let mut v = vec![
            "-t".to_string(),
            self.threads.to_string(),
            "-c".into(),
            self.connections.to_string(),
            "-m".into(),
            self.streams.to_string(),
        ];
        match self.requests {
            Some(n) => {
                v.push("-n".into());
                v.push(n.to_string());
            }
            None => {
                v.push("-D".into());
                v.push(self.duration.as_secs().max(1).to_string());
            }
        }
        if let Some(r) = self.rps {
            v.push(format!("--rps={r}"));
        }
        if let Some(ms) = self.stagger_ms {
            v.push("-r".into());
            v.push("1".into());
            v.push(format!("--rate-period={ms}ms"));
        }
        if self.h1 {
            v.push("--h1".into());
        }
        v.push(format!("--log-file={}", self.log_file.display()));
        v.push(url.to_string());
        v
    }

    /// The command as a reader would type it (without the log file).
    pub fn display(&self) -> String {
        let mut s = format!(
            "h2load -t{} -c{} -m{}",
            self.threads, self.connections, self.streams
        );
        match self.requests {
            Some(n) => s += &format!(" -n{n}"),
            None => s += &format!(" -D{}", self.duration.as_secs().max(1)),
        }
        if let Some(r) = self.rps {
            s += &format!(" --rps {r}");
        }
        if let Some(ms) = self.stagger_ms {
            s += &format!(" -r1 --rate-period {ms}ms");
        }
        if self.h1 {
            s += " --h1";
        }
        s
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub secs: f64,
    pub req_per_sec: f64,
    pub total: u64,
    pub started: u64,
    pub done: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
    pub timeout: u64,
    /// 2xx, 3xx, 4xx, 5xx.
    pub status: [u64; 4],
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct H2Result {
    pub summary: Summary,
    /// Requests in the log with a 2xx status.
    pub ok: u64,
    /// Requests in the log that failed or had a non-2xx status, plus timeouts.
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Runs h2load against `url` (loopback), bounded by its own `-D`/`-n` and killed by PID if it
/// is still alive 30 s after the duration. Reads and then deletes the log file.
pub fn run(h2load: &str, args: &H2Args, url: &str) -> Result<H2Result, String> {
    assert!(
        url.starts_with("http://127.0.0.1:"),
        "load only goes to loopback: {url}"
    );
    let _ = std::fs::remove_file(&args.log_file);
    let mut cmd = Command::new(h2load);
    cmd.args(args.command_line(url));
    let mut p = sigil_e2e::Proc::spawn("h2load", &mut cmd);
    let deadline = Instant::now() + args.duration + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = p.try_wait() {
            break st;
        }
        if Instant::now() >= deadline {
            p.terminate(Duration::from_secs(2));
            return Err(format!(
                "h2load on {url} did not finish in time:\n{}",
                p.log()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let drained = Instant::now() + Duration::from_secs(2);
    while !p.log().contains("status codes:") && Instant::now() < drained {
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = p.log();
    if !status.success() {
        return Err(format!("h2load failed on {url} ({status}):\n{out}"));
    }
    let summary = parse(&out).map_err(|e| format!("{e}; h2load printed:\n{out}"))?;
    let log = read_log(&args.log_file)?;
    let _ = std::fs::remove_file(&args.log_file);
    Ok(result(summary, &log))
}

fn read_log(path: &Path) -> Result<Vec<(i32, u64)>, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("h2load log {}: {e}", path.display()))?;
    parse_log(&text)
}

/// Combines the summary with the per-request log: percentiles over the 2xx requests.
pub fn result(summary: Summary, log: &[(i32, u64)]) -> H2Result {
    let mut ok: Vec<u64> = log
        .iter()
        .filter(|(s, _)| (200..300).contains(s))
        .map(|&(_, us)| us)
        .collect();
    ok.sort_unstable();
    let errors = (log.len() - ok.len()) as u64 + summary.timeout;
    let ms = |v: Option<u64>| v.map_or(f64::NAN, |us| us as f64 / 1000.0);
    H2Result {
        ok: ok.len() as u64,
        errors,
        p50_ms: ms(percentile(&ok, 50.0)),
        p99_ms: ms(percentile(&ok, 99.0)),
        max_ms: ms(ok.last().copied()),
        summary,
    }
}

/// Nearest-rank percentile of sorted values: the smallest value such that at least `p`% of
/// the values are less than or equal to it.
pub fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// `--log-file` lines: start µs since the epoch, status (-1: failed), µs to end of response.
pub fn parse_log(text: &str) -> Result<Vec<(i32, u64)>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut f = l.split('\t');
            let _start = f.next();
            let status = f.next().and_then(|s| s.trim().parse::<i32>().ok());
            let us = f.next().and_then(|s| s.trim().parse::<u64>().ok());
            status
                .zip(us)
                .ok_or_else(|| format!("bad h2load log line {l:?}"))
        })
        .collect()
}

/// `10.00s`, `523.12ms`, `950us` into seconds.
fn parse_secs(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n / 1e6,
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        _ => return None,
    })
}

/// `requests: 2000 total, 2000 started, …` into (word, number) pairs.
fn counts(rest: &str) -> Vec<(&str, u64)> {
    rest.split(',')
        .filter_map(|part| {
            let mut w = part.split_whitespace();
            let n = w.next()?.parse().ok()?;
            Some((w.next()?, n))
        })
        .collect()
}

/// Parses h2load's text summary.
pub fn parse(out: &str) -> Result<Summary, String> {
    let mut s = Summary::default();
    let mut have = (false, false, false);
    for line in out.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            let mut parts = rest.split(',').map(str::trim);
            s.secs = parts
                .next()
                .and_then(parse_secs)
                .ok_or_else(|| format!("bad finished line {line:?}"))?;
            s.req_per_sec = parts
                .next()
                .and_then(|p| p.strip_suffix(" req/s"))
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| format!("bad finished line {line:?}"))?;
            have.0 = true;
        } else if let Some(rest) = line.strip_prefix("requests:") {
            for (word, n) in counts(rest) {
                match word {
                    "total" => s.total = n,
                    "started" => s.started = n,
                    "done" => s.done = n,
                    "succeeded" => s.succeeded = n,
                    "failed" => s.failed = n,
                    "errored" => s.errored = n,
                    "timeout" => s.timeout = n,
                    _ => {}
                }
            }
            have.1 = true;
        } else if let Some(rest) = line.strip_prefix("status codes:") {
            for (word, n) in counts(rest) {
                match word {
                    "2xx" => s.status[0] = n,
                    "3xx" => s.status[1] = n,
                    "4xx" => s.status[2] = n,
                    "5xx" => s.status[3] = n,
                    _ => {}
                }
            }
            have.2 = true;
        }
    }
    if !(have.0 && have.1 && have.2) {
        return Err("h2load summary lacks the finished / requests / status codes lines".into());
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
starting benchmark...
spawning thread #0: 16 total client(s). Timing-based test with 0s of warm-up time and 10s of main duration for measurements.
Application protocol: h2c
Main benchmark duration is over for thread #0. Stopping all clients.

finished in 10.00s, 63833.50 req/s, 4.87MB/s
requests: 127667 total, 127707 started, 127667 done, 127660 succeeded, 7 failed, 2 errored, 1 timeout
status codes: 127668 2xx, 0 3xx, 5 4xx, 0 5xx
traffic: 9.74MB (10213614) total, 5.97MB (6255732) headers (space savings 50.51%), 1.58MB (1659671) data
                     min         max         mean         sd        +/- sd
time for request:       56us      3.07ms       539us       241us    64.96%
";

    #[test]
    fn parses_a_summary() {
        let s = parse(SAMPLE).unwrap();
        assert!((s.secs - 10.0).abs() < 1e-9);
        assert!((s.req_per_sec - 63_833.5).abs() < 1e-6);
        assert_eq!(
            (s.total, s.started, s.done, s.succeeded),
            (127_667, 127_707, 127_667, 127_660)
        );
        assert_eq!((s.failed, s.errored, s.timeout), (7, 2, 1));
        assert_eq!(s.status, [127_668, 0, 5, 0]);
        let ms = parse(&SAMPLE.replace("finished in 10.00s", "finished in 250.5ms")).unwrap();
        assert!((ms.secs - 0.2505).abs() < 1e-9);
    }

    #[test]
    fn refuses_a_summary_without_counts() {
        let short: String = SAMPLE
            .lines()
            .filter(|l| !l.starts_with("requests:"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(parse(&short).is_err());
    }

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7], 99.0), Some(7));
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), Some(50));
        assert_eq!(percentile(&v, 99.0), Some(99));
        assert_eq!(percentile(&v, 100.0), Some(100));
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 99.0), Some(990));
    }

    #[test]
    fn log_lines_and_result() {
        let text = "1795358061695436\t200\t243\n1795358061695438\t200\t296\n\
                    1795358061695439\t-1\t3000\n1795358061695440\t403\t100\n";
        let log = parse_log(text).unwrap();
        assert_eq!(log.len(), 4);
        assert_eq!(log[2], (-1, 3000));
        let r = result(
            Summary {
                timeout: 1,
                ..Summary::default()
            },
            &log,
        );
        assert_eq!(r.ok, 2);
        assert_eq!(r.errors, 3, "failed + 403 + timeout");
        assert!((r.p50_ms - 0.243).abs() < 1e-9);
        assert!((r.p99_ms - 0.296).abs() < 1e-9);
        assert!(parse_log("1\tx\t2\n").is_err());
    }

    #[test]
    fn command_line() {
        let a = H2Args {
            threads: 1,
            connections: 10,
            streams: 1,
            duration: Duration::from_secs(10),
            requests: None,
            rps: Some(100),
            stagger_ms: None,
            h1: true,
            log_file: PathBuf::from("/tmp/l.tsv"),
        };
        assert_eq!(
            a.command_line("http://127.0.0.1:1/x").join(" "),
            "-t 1 -c 10 -m 1 -D 10 --rps=100 --h1 --log-file=/tmp/l.tsv http://127.0.0.1:1/x"
        );
        assert_eq!(a.display(), "h2load -t1 -c10 -m1 -D10 --rps 100 --h1");
        let a = H2Args {
            requests: Some(5000),
            stagger_ms: Some(1),
            h1: false,
            ..a
        };
        assert_eq!(
            a.command_line("http://127.0.0.1:1/x").join(" "),
            "-t 1 -c 10 -m 1 -n 5000 --rps=100 -r 1 --rate-period=1ms --log-file=/tmp/l.tsv \
             http://127.0.0.1:1/x"
        );
        assert_eq!(
            a.display(),
            "h2load -t1 -c10 -m1 -n5000 --rps 100 -r1 --rate-period 1ms"
        );
    }
}
