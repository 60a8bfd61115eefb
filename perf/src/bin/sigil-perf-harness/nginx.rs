//! nginx instances (the backend and the peer pairs): configs rendered from the templates in
//! `perf/nginx/`, checked with `nginx -t`, started in the foreground.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sigil_e2e::{wait_for_port, Proc};
use sigil_perf::procfs;
use sigil_perf::render::render;

use crate::identity::SERVER_DNS;
use crate::net::addr;
use crate::opts::Opts;

const T_COMMON: &str = include_str!("../../../nginx/common.conf.in");
pub const T_L4_CLIENT: &str = include_str!("../../../nginx/l4-client.conf.in");
pub const T_L4_SERVER: &str = include_str!("../../../nginx/l4-server.conf.in");
pub const T_L7_CLIENT: &str = include_str!("../../../nginx/l7-client.conf.in");
pub const T_L7_SERVER: &str = include_str!("../../../nginx/l7-server.conf.in");
pub const T_BACKEND: &str = include_str!("../../../nginx/backend.conf.in");

fn nginx_config(
    o: &Opts,
    dir: &Path,
    name: &str,
    template: &str,
    workers: usize,
    vars: &[(&str, String)],
) -> Result<String, String> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut all: Vec<(&str, String)> = vec![
        ("DIR", dir.display().to_string()),
        ("NAME", name.to_string()),
        ("WORKERS", workers.to_string()),
        ("SERVER_DNS", SERVER_DNS.to_string()),
        // As root, nginx would switch its workers to `nobody`; keep them as the same user
        // as sigil-proxy (both read the same key files).
        ("USER", if root { "user root;" } else { "" }.to_string()),
        (
            "LOAD_STREAM",
            if o.stream_module == "builtin" || !template.contains("stream {") {
                String::new()
            } else {
                format!("load_module {};", o.stream_module)
            },
        ),
    ];
    all.extend(vars.iter().cloned());
    render(&format!("{T_COMMON}\n{template}"), &all)
}

/// Renders, checks (`nginx -t`) and starts one nginx instance in the foreground; waits for
/// its listeners and its workers.
pub fn start(
    o: &Opts,
    dir: &Path,
    name: &str,
    template: &str,
    workers: usize,
    vars: &[(&str, String)],
    listens: &[u16],
) -> Result<Proc, String> {
    let conf_text = nginx_config(o, dir, name, template, workers, vars)?;
    let conf = dir.join(format!("{name}.conf"));
    std::fs::write(&conf, conf_text).map_err(|e| e.to_string())?;
    let tmp = dir.join(format!("{name}-tmp"));
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    let err_log = dir.join(format!("{name}.error.log"));
    let base = |cmd: &mut Command| {
        cmd.arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(&err_log)
            .arg("-c")
            .arg(&conf);
    };
    let mut test = Command::new(&o.nginx);
    test.arg("-t").arg("-q");
    base(&mut test);
    let out = test
        .output()
        .map_err(|e| format!("run {} -t: {e}", o.nginx))?;
    if !out.status.success() {
        return Err(format!(
            "nginx -t refused {}:\n{}",
            conf.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let mut cmd = Command::new(&o.nginx);
    base(&mut cmd);
    let mut p = Proc::spawn(name, &mut cmd);
    for &port in listens {
        wait_for_port(addr(port), Duration::from_secs(10));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while procfs::children(p.pid()).len() < workers {
        if let Some(st) = p.try_wait() {
            let errors = std::fs::read_to_string(&err_log).unwrap_or_default();
            return Err(format!("{name} exited ({st}):\n{}{errors}", p.log()));
        }
        if Instant::now() >= deadline {
            return Err(format!("{name}: fewer than {workers} workers after 10 s"));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Ok(p)
}
