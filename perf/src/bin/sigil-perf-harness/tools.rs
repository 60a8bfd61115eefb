//! The programs the harness runs besides the sidecars under test: they must be there before
//! anything starts, and the report names their versions.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::opts::Opts;

/// The first line `cmd args` prints (stdout, then stderr), or `unavailable (…)`.
pub fn tool_version(cmd: &str, args: &[&str]) -> String {
    match Command::new(cmd).args(args).output() {
        Ok(o) => {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_string()
        }
        Err(e) => format!("unavailable ({e})"),
    }
}

/// Refuses to start when a program is missing, with the command that provides it. Returns
/// the path of `sigil-toy-workload` (the echo backend).
pub fn check(o: &Opts) -> Result<PathBuf, String> {
    let toy = o.bin_dir.join("sigil-toy-workload");
    if !toy.exists() {
        return Err(format!(
            "{} not built: cargo build --release -p sigil-proxy -p sigil-e2e -p sigil-perf",
            toy.display()
        ));
    }
    if !o.skip_nginx {
        if tool_version(&o.nginx, &["-v"]).starts_with("unavailable") {
            return Err(format!(
                "{} not found (apt-get install nginx libnginx-mod-stream)",
                o.nginx
            ));
        }
        if o.stream_module != "builtin" && !Path::new(&o.stream_module).exists() {
            return Err(format!(
                "{} missing (apt-get install libnginx-mod-stream, or --stream-module builtin)",
                o.stream_module
            ));
        }
    }
    if tool_version(&o.wrk, &["-v"]).starts_with("unavailable") {
        return Err(format!("{} not found (apt-get install wrk)", o.wrk));
    }
    if tool_version(&o.h2load, &["--version"]).starts_with("unavailable") {
        return Err(format!(
            "{} not found (apt-get install nghttp2-client)",
            o.h2load
        ));
    }
    Ok(toy)
}
