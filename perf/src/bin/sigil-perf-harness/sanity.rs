//! Checks before measuring: every path reaches the backend, the server sides refuse
//! plaintext, and the sigil L7 pair really decides every request at L7. A failed check ends
//! the run, except nginx's h2c listener, whose absence is noted in the report.

use std::path::Path;
use std::time::Duration;

use sigil_perf::bulk;
use sigil_perf::h2load;
use sigil_perf::policies::{BENCH_PATH, BENCH_ROUTE, DENIED_PATH, WHOAMI_PATH};

use crate::bench::L7_ALLOWED;
use crate::identity::CLIENT_ID;
use crate::net::{addr, body, http_get, http_get_with, is_ok_200};
use crate::opts::Opts;
use crate::paths::{PathPorts, Ports, Via};
use crate::progress::log;
use crate::stand::{Setup, Stand};

/// What the HTTP backend answers on every path (nginx/backend.conf.in).
const BACKEND_BODY: &str = "hello, sigil\n";

/// All the checks, in order; findings worth reporting go to `stand.setup.sanity`, and a path
/// whose HTTP/2 does not work loses its h2 port.
pub fn check(o: &Opts, dir: &Path, stand: &mut Stand) -> Result<(), String> {
    log("sanity checks");
    for p in &mut stand.paths {
        reaches_backend(o, dir, p, &mut stand.setup)?;
    }
    refuse_plaintext(o, &stand.ports)?;
    if !o.skip_sigil {
        stand
            .setup
            .sanity
            .extend(l7_sanity(o, dir, &stand.ports).map_err(|e| format!("sigil L7 pair: {e}"))?);
    }
    Ok(())
}

/// HTTP/1.1, the echo (where the path has one) and HTTP/2 (where it has it) through `p`.
fn reaches_backend(
    o: &Opts,
    dir: &Path,
    p: &mut PathPorts,
    setup: &mut Setup,
) -> Result<(), String> {
    let r = http_get(addr(p.http), BENCH_PATH)?;
    if !is_ok_200(&r) || !r.contains(BACKEND_BODY.trim_end()) {
        return Err(format!(
            "{}: GET {BENCH_PATH} did not reach the backend:\n{r}",
            p.via.label()
        ));
    }
    if let Some(e) = p.echo {
        let r = bulk::echo(addr(e), 256 * 1024, Duration::from_secs(10));
        if !r.complete {
            return Err(format!("{}: echo failed: {:?}", p.via.label(), r.error));
        }
    }
    if let Some(h2) = p.h2 {
        match h2_sanity(o, dir, h2, false, 200) {
            Ok(()) => {}
            // nginx's h2c listener is the one part here that depends on the nginx build;
            // without it, HTTP/2 is compared with the direct path only.
            Err(e) if p.via == Via::NginxL7 => {
                log(format!("nginx L7 client side cannot serve h2c: {e}"));
                setup.sanity.push(format!(
                    "nginx's L7 client side did not serve HTTP/2 with prior knowledge \
                     ({e}); HTTP/2 is compared with the direct path only"
                ));
                p.h2 = None;
            }
            Err(e) => return Err(format!("{}: HTTP/2: {e}", p.via.label())),
        }
    }
    Ok(())
}

/// The server-side listeners must refuse plaintext (mTLS is really on).
fn refuse_plaintext(o: &Opts, ports: &Ports) -> Result<(), String> {
    let mut server_side = Vec::new();
    if !o.skip_sigil {
        server_side.push(("sigil server-side", ports.sigil_server_http));
        server_side.push(("sigil-l7 server-side", ports.sigil_l7_server_http));
    }
    if !o.skip_nginx {
        server_side.push(("nginx-l4 server-side", ports.l4_server_http));
        server_side.push(("nginx-l7 server-side", ports.l7_server_http));
    }
    for (name, port) in server_side {
        if let Ok(r) = http_get(addr(port), BENCH_PATH) {
            if is_ok_200(&r) {
                return Err(format!(
                    "{name} answered plaintext HTTP: mTLS is not enforced"
                ));
            }
        }
    }
    Ok(())
}

/// A count-based h2load run for the sanity checks; all requests must succeed with 2xx.
fn h2_sanity(o: &Opts, dir: &Path, port: u16, h1: bool, n: u64) -> Result<(), String> {
    let args = h2load::H2Args {
        threads: 1,
        connections: 4,
        streams: if h1 { 1 } else { 4 },
        duration: Duration::from_secs(10),
        requests: Some(n),
        rps: None,
        stagger_ms: None,
        h1,
        log_file: dir.join("h2load-sanity.log"),
    };
    let r = h2load::run(
        &o.h2load,
        &args,
        &format!("http://127.0.0.1:{port}{BENCH_PATH}"),
    )?;
    if r.ok != n || r.errors != 0 {
        return Err(format!(
            "{}: {} of {n} requests got 2xx, {} errors",
            args.display(),
            r.ok,
            r.errors
        ));
    }
    Ok(())
}

/// Proves that the sigil L7 pair really decides and forwards every request at L7:
/// - the server side counts exactly the requests sent (HTTP/1.1 and HTTP/2) as allowed by the
///   benchmark route;
/// - a path no route allows gets 403 from the sidecar (the backend itself would answer 200);
/// - the backend receives the verified client ID in `x-sigil-peer-id`, even when the client
///   sent a forged one.
fn l7_sanity(o: &Opts, dir: &Path, ports: &Ports) -> Result<Vec<String>, String> {
    let entry = addr(ports.sigil_l7_client_http);
    let route = format!("route=\"{BENCH_ROUTE}\"");
    let labels = [L7_ALLOWED[0], L7_ALLOWED[1], route.as_str()];
    let count = || -> Result<f64, String> {
        let page = http_get(addr(ports.sigil_l7_admin_server), "/metrics")?;
        Ok(sigil_e2e::metric(&page, "sigil_requests_total", &labels).unwrap_or(0.0))
    };
    let mut out = Vec::new();

    let (n1, n2) = (500, 500);
    let before = count()?;
    h2_sanity(o, dir, ports.sigil_l7_client_http, true, n1)?;
    h2_sanity(o, dir, ports.sigil_l7_client_http, false, n2)?;
    let grown = count()? - before;
    if grown != (n1 + n2) as f64 {
        return Err(format!(
            "sigil_requests_total{{decision=\"allow\",{route}}} grew by {grown}, but {} requests were sent",
            n1 + n2
        ));
    }
    out.push(format!(
        "sigil L7 pair: {n1} HTTP/1.1 + {n2} HTTP/2 requests sent; the server side's \
         `sigil_requests_total{{direction=\"inbound\",decision=\"allow\",{route}}}` grew by \
         {grown:.0}: every request went through the route decision"
    ));

    let denied = http_get(entry, DENIED_PATH)?;
    let direct = http_get(addr(ports.http_backend), DENIED_PATH)?;
    if !denied.starts_with("HTTP/1.1 403") || !is_ok_200(&direct) {
        return Err(format!(
            "GET {DENIED_PATH}: expected 403 from the sidecar (and 200 direct), got:\n{denied}"
        ));
    }
    out.push(format!(
        "GET {DENIED_PATH} (no route allows it): 403 `{}` through the sigil L7 pair, 200 direct",
        body(&denied).trim()
    ));

    let forged = "x-sigil-peer-id: spiffe://example.org/ns/evil/sa/forged\r\n";
    let whoami = http_get_with(entry, WHOAMI_PATH, forged)?;
    if !is_ok_200(&whoami) || body(&whoami).trim() != CLIENT_ID {
        return Err(format!(
            "GET {WHOAMI_PATH}: the backend should see x-sigil-peer-id {CLIENT_ID}, got:\n{whoami}"
        ));
    }
    out.push(format!(
        "the backend received `x-sigil-peer-id: {CLIENT_ID}` (the client sent a forged value; \
         the sidecar replaced it)"
    ));
    Ok(out)
}
