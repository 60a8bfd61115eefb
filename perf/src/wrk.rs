//! Runs `wrk --latency` with a fixed duration and parses its report.

use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct WrkResult {
    pub requests: u64,
    pub secs: f64,
    pub req_per_sec: f64,
    /// Latency percentiles in milliseconds.
    pub p50_ms: f64,
    pub p75_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    /// Socket errors: connect, read, write, timeout (all zero when wrk prints none).
    pub socket_errors: [u64; 4],
    pub non_2xx: u64,
}

impl WrkResult {
    pub fn errors(&self) -> u64 {
        self.socket_errors.iter().sum::<u64>() + self.non_2xx
    }
}

#[derive(Debug, Clone)]
pub struct WrkArgs {
    pub threads: u32,
    pub connections: u32,
    pub duration: Duration,
    /// Send `Connection: close` on every request: one TCP (and mTLS) connection per request.
    pub close: bool,
}

impl WrkArgs {
    pub fn command_line(&self, url: &str) -> Vec<String> {
        let mut v = vec![
            "-t".to_string(),
            self.threads.to_string(),
            "-c".into(),
            self.connections.to_string(),
            "-d".into(),
            format!("{}s", self.duration.as_secs().max(1)),
            "--timeout".into(),
            "5s".into(),
            "--latency".into(),
        ];
        if self.close {
            v.push("-H".into());
            v.push("Connection: close".into());
        }
        v.push(url.to_string());
        v
    }
}

/// Runs wrk against `url` (loopback) and parses the result. wrk stops by itself after the
/// duration; the child is ended by PID if it is still alive 30 s later.
pub fn run(wrk: &str, args: &WrkArgs, url: &str) -> Result<WrkResult, String> {
    assert!(
        url.starts_with("http://127.0.0.1:"),
        "load only goes to loopback: {url}"
    );
    let mut cmd = Command::new(wrk);
    cmd.args(args.command_line(url));
    let mut p = sigil_e2e::Proc::spawn("wrk", &mut cmd);
    let deadline = Instant::now() + args.duration + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = p.try_wait() {
            break st;
        }
        if Instant::now() >= deadline {
            p.terminate(Duration::from_secs(2));
            return Err(format!("wrk on {url} did not finish in time:\n{}", p.log()));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The reader threads may still be draining the pipe: wait (bounded) for the last line.
    let drained = Instant::now() + Duration::from_secs(2);
    while !p.log().contains("Transfer/sec") && Instant::now() < drained {
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = p.log();
    if !status.success() {
        return Err(format!("wrk failed on {url} ({status}):\n{out}"));
    }
    parse(&out).map_err(|e| format!("{e}; wrk printed:\n{out}"))
}

/// Parses a wrk duration like `250.00us`, `1.20ms`, `2.00s`, `1.00m` into milliseconds.
fn parse_ms(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let scale = match unit {
        "us" => 0.001,
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => return None,
    };
    Some(n * scale)
}

/// Parses wrk's text report (`--latency` required for the percentiles).
pub fn parse(out: &str) -> Result<WrkResult, String> {
    let mut r = WrkResult::default();
    let mut have = (false, false, false);
    for line in out.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("50%") => r.p50_ms = pct(line, &mut have.0)?,
            Some("75%") => r.p75_ms = pct(line, &mut false)?,
            Some("90%") => r.p90_ms = pct(line, &mut false)?,
            Some("99%") => r.p99_ms = pct(line, &mut have.1)?,
            Some("Requests/sec:") => {
                r.req_per_sec = words
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("bad Requests/sec line")?;
                have.2 = true;
            }
            Some("Socket") => {
                // Socket errors: connect 0, read 0, write 0, timeout 0
                let nums: Vec<u64> = line
                    .split(|c: char| !c.is_ascii_digit())
                    .filter_map(|t| t.parse().ok())
                    .collect();
                if nums.len() != 4 {
                    return Err(format!("bad socket errors line {line:?}"));
                }
                r.socket_errors.copy_from_slice(&nums);
            }
            Some("Non-2xx") => {
                r.non_2xx = line
                    .rsplit(' ')
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("bad Non-2xx line")?;
            }
            Some(n) if line.contains(" requests in ") => {
                r.requests = n.parse().map_err(|_| format!("bad count {line:?}"))?;
                let secs = line
                    .split(" requests in ")
                    .nth(1)
                    .and_then(|t| t.split(',').next())
                    .and_then(parse_ms)
                    .ok_or_else(|| format!("bad duration in {line:?}"))?;
                r.secs = secs / 1000.0;
            }
            _ => {}
        }
    }
    if !(have.0 && have.1 && have.2) {
        return Err("wrk report lacks the latency distribution or Requests/sec".into());
    }
    Ok(r)
}

fn pct(line: &str, seen: &mut bool) -> Result<f64, String> {
    *seen = true;
    line.split_whitespace()
        .nth(1)
        .and_then(parse_ms)
        .ok_or_else(|| format!("bad latency line {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
Running 10s test @ http://127.0.0.1:8080/
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   635.91us    0.89ms  12.92ms   93.69%
    Req/Sec    56.20k     8.07k   62.00k    86.54%
  Latency Distribution
     50%  250.00us
     75%  491.00us
     90%  700.00us
     99%    1.01s
  1123423 requests in 10.01s, 177.69MB read
  Socket errors: connect 0, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 12
Requests/sec: 112237.23
Transfer/sec:     17.75MB
";

    #[test]
    fn parses_a_report() {
        let r = parse(SAMPLE).unwrap();
        assert_eq!(r.requests, 1_123_423);
        assert!((r.secs - 10.01).abs() < 1e-9);
        assert!((r.req_per_sec - 112_237.23).abs() < 1e-6);
        assert!((r.p50_ms - 0.25).abs() < 1e-9);
        assert!((r.p90_ms - 0.7).abs() < 1e-9);
        assert!((r.p99_ms - 1010.0).abs() < 1e-9);
        assert_eq!(r.socket_errors, [0, 3, 0, 2]);
        assert_eq!(r.non_2xx, 12);
        assert_eq!(r.errors(), 17);
    }

    #[test]
    fn refuses_a_report_without_latency() {
        let short = SAMPLE.replace("     99%    1.01s\n", "");
        assert!(parse(&short).is_err());
    }

    #[test]
    fn command_line() {
        let a = WrkArgs {
            threads: 2,
            connections: 16,
            duration: Duration::from_secs(10),
            close: true,
        };
        assert_eq!(
            a.command_line("http://127.0.0.1:1/").join(" "),
            "-t 2 -c 16 -d 10s --timeout 5s --latency -H Connection: close http://127.0.0.1:1/"
        );
    }
}
