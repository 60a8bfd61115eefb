//! sigil: the operator CLI. See `--help`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use hyper::{Method, StatusCode};
use sigil_config::policy::Timestamp;
use sigil_config::{Resource, SpiffeId};
use sigil_control::client::{Client, ClientError};
use sigil_control::policy_test::{decide, Question};
use sigil_control::{files, identity, revoke};

const USAGE: &str = "\
sigil — operator CLI of the Sigil mesh

USAGE:
    sigil demo
    sigil validate -f PATH...
    sigil policy test [-f PATH...] --from ID --to ID --port N
                      [--method M] [--path P] [--host H] [--header NAME:VALUE]... [--at TIME]
    sigil apply -f PATH... [--dry-run]      CONNECTION
    sigil get [KIND [NAME]]                 CONNECTION
    sigil delete KIND NAME                  CONNECTION
    sigil status                            CONNECTION
    sigil metrics                           CONNECTION
    sigil revoke ID --reason TEXT [--issued-before TIME] [--name NAME]   CONNECTION
    sigil unrevoke ID [--name NAME]         CONNECTION

COMMANDS:
    demo          a whole mesh on loopback, narrated: control plane, three workloads and
                  their sidecars; an allowed and a denied call, a live policy change, a
                  revocation, metrics. Needs sigil-control, sigil-proxy and
                  sigil-toy-workload next to sigil; cleans up after itself
    validate      check Workload, Policy, Revocation and TrustBundle files as the control
                  plane and the sidecars will; every problem is reported as file:line
    policy test   the verdict a sidecar of --to would give a caller --from, and the rule that
                  decides it, computed by the sidecars' own decision code; over the files of
                  -f, or without -f over the control plane's policies (CONNECTION)
    apply         validate, then store the resources in the control plane (--dry-run: show
                  what would be created, updated or left unchanged, write nothing)
    get, delete   read or remove stored resources
    status        the store version and every connected sidecar: its name, identity,
                  address, the version it was sent and whether it acknowledged it
    metrics       the control plane's own metrics (OpenMetrics text)
    revoke        take an identity off the mesh now: every sidecar refuses it and cuts its
                  live connections (a Revocation resource named after the ID, or --name);
                  --issued-before TIME (RFC 3339, or `now`) revokes only SVIDs issued
                  before TIME, so a rebuilt workload with a fresh SVID is accepted again
    unrevoke      delete that Revocation

CONNECTION (the operator API: mutual TLS with your SVID; flags or environment):
    --server ADDR       SIGIL_SERVER      control plane operator API   [127.0.0.1:15014]
    --control-id ID     SIGIL_CONTROL_ID  the control plane's SPIFFE ID (pinned)
    --cert, --key FILE  SIGIL_CERT, SIGIL_KEY   your SVID and key
    --bundle-dir DIR    SIGIL_BUNDLE_DIR  trust bundles, one <trust domain>.pem each

OPTIONS:
    -f PATH       a resource file, or a directory of *.yaml files (repeatable)
    --from ID     the calling workload's SPIFFE ID
    --to ID       the called workload's SPIFFE ID (the policies targeting it apply)
    --port N      the called workload's port
    --method M    HTTP method, on ports declared http [GET]
    --path P      path and query as the client sends them (normalized as a sidecar does) [/]
    --host H      Host / :authority; routes that list hosts need it [none]
    --header N:V  a request header (repeatable)
    --at TIME     judge expiry at this RFC 3339 UTC instant [now]
    --reason TEXT why an identity is revoked (logged by every sidecar)
    -h, --help    this text
    -V, --version version

EXIT CODES:
    0 valid / allowed / done; 1 denied, or refused or not found by the control plane;
    2 invalid input or arguments";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("-h" | "--help") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Some("-V" | "--version") => {
            println!("sigil {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some("demo") if args.len() == 1 => {
            match sigil_control::demo::run(&sigil_control::demo::default_bin_dir()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            }
        }
        Some("validate") => validate(&args[1..]),
        Some("apply") => apply(&args[1..]),
        Some("get") => get(&args[1..]),
        Some("delete") => delete(&args[1..]),
        Some("status") => simple_get(&args[1..], "status", "/v1/status"),
        Some("metrics") => simple_get(&args[1..], "metrics", "/metrics"),
        Some("revoke") => revoke(&args[1..]),
        Some("unrevoke") => unrevoke(&args[1..]),
        Some("policy") if args.get(1).map(String::as_str) == Some("test") => {
            policy_test(&args[2..])
        }
        Some(other) => usage_error(&format!("unknown command {other:?}")),
    }
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("sigil: {msg}\n\n{USAGE}");
    ExitCode::from(2)
}

/// Options of both commands; each command checks what it needs.
#[derive(Default)]
struct Opts {
    files: Vec<PathBuf>,
    from: Option<String>,
    to: Option<String>,
    port: Option<String>,
    method: Option<String>,
    path: Option<String>,
    host: Option<String>,
    headers: Vec<String>,
    at: Option<String>,
    dry_run: bool,
    reason: Option<String>,
    issued_before: Option<String>,
    name: Option<String>,
    server: Option<String>,
    control_id: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    bundle_dir: Option<String>,
    positional: Vec<String>,
}

fn parse_opts(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "-f" | "--file" => o.files.push(PathBuf::from(value()?)),
            "--from" => o.from = Some(value()?),
            "--to" => o.to = Some(value()?),
            "--port" => o.port = Some(value()?),
            "--method" => o.method = Some(value()?),
            "--path" => o.path = Some(value()?),
            "--host" => o.host = Some(value()?),
            "--header" => o.headers.push(value()?),
            "--at" => o.at = Some(value()?),
            "--dry-run" => o.dry_run = true,
            "--reason" => o.reason = Some(value()?),
            "--issued-before" => o.issued_before = Some(value()?),
            "--name" => o.name = Some(value()?),
            "--server" => o.server = Some(value()?),
            "--control-id" => o.control_id = Some(value()?),
            "--cert" => o.cert = Some(value()?),
            "--key" => o.key = Some(value()?),
            "--bundle-dir" => o.bundle_dir = Some(value()?),
            other if !other.starts_with('-') => o.positional.push(other.to_string()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(o)
}

fn parse_with_files(args: &[String]) -> Result<Opts, String> {
    let o = parse_opts(args)?;
    if o.files.is_empty() {
        return Err("-f PATH is required".into());
    }
    Ok(o)
}

/// The operator API client from flags, else the environment.
fn client(o: &Opts) -> Result<Client, String> {
    let pick = |flag: &Option<String>, env: &str, name: &str| {
        flag.clone()
            .or_else(|| std::env::var(env).ok())
            .ok_or(format!("{name} (or {env}) is required"))
    };
    let server =
        pick(&o.server, "SIGIL_SERVER", "--server").unwrap_or_else(|_| "127.0.0.1:15014".into());
    let server = server
        .parse()
        .map_err(|_| format!("--server {server:?}: expected ip:port"))?;
    let control_id = pick(&o.control_id, "SIGIL_CONTROL_ID", "--control-id")?;
    let control_id =
        SpiffeId::parse(&control_id).map_err(|e| format!("--control-id {control_id:?}: {e}"))?;
    let cert = pick(&o.cert, "SIGIL_CERT", "--cert")?;
    let key = pick(&o.key, "SIGIL_KEY", "--key")?;
    let bundles = pick(&o.bundle_dir, "SIGIL_BUNDLE_DIR", "--bundle-dir")?;
    let identity = identity::load(Path::new(&cert), Path::new(&key), Path::new(&bundles))
        .map_err(|e| e.to_string())?;
    Ok(Client {
        server,
        control_id,
        identity,
    })
}

/// Prints the control plane's answer; the exit code follows its status.
fn report(result: Result<(StatusCode, String), ClientError>) -> ExitCode {
    match result {
        Ok((status, body)) if status.is_success() => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprint!("sigil: the control plane answered {status}: {body}");
            ExitCode::from(if status == StatusCode::BAD_REQUEST {
                2
            } else {
                1
            })
        }
        Err(e) => {
            eprintln!("sigil: {e}");
            ExitCode::from(1)
        }
    }
}

fn apply(args: &[String]) -> ExitCode {
    let o = match parse_with_files(args) {
        Ok(o) => o,
        Err(e) => return usage_error(&e),
    };
    // Validate everything locally first: nothing is sent unless every file is valid.
    if let Err(code) = load(&o.files) {
        return code;
    }
    let c = match client(&o) {
        Ok(c) => c,
        Err(e) => return usage_error(&e),
    };
    let path = if o.dry_run {
        "/v1/apply?dryRun=true"
    } else {
        "/v1/apply"
    };
    for file in files::expand_all(&o.files) {
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("sigil: {}: {e}", file.display());
                return ExitCode::from(2);
            }
        };
        let name = file.display().to_string();
        let code = report(c.send(Method::POST, path, &[("x-sigil-file", &name)], text));
        if code != ExitCode::SUCCESS {
            return code;
        }
    }
    ExitCode::SUCCESS
}

fn get(args: &[String]) -> ExitCode {
    let o = match parse_opts(args) {
        Ok(o) if o.positional.len() <= 2 => o,
        Ok(_) => return usage_error("get takes at most KIND and NAME"),
        Err(e) => return usage_error(&e),
    };
    let c = match client(&o) {
        Ok(c) => c,
        Err(e) => return usage_error(&e),
    };
    let path = format!("/v1/resources/{}", o.positional.join("/"));
    report(c.send(Method::GET, &path, &[], String::new()))
}

fn delete(args: &[String]) -> ExitCode {
    let o = match parse_opts(args) {
        Ok(o) if o.positional.len() == 2 => o,
        Ok(_) => return usage_error("delete takes KIND and NAME"),
        Err(e) => return usage_error(&e),
    };
    let c = match client(&o) {
        Ok(c) => c,
        Err(e) => return usage_error(&e),
    };
    let path = format!("/v1/resources/{}/{}", o.positional[0], o.positional[1]);
    report(c.send(Method::DELETE, &path, &[], String::new()))
}

/// A command that is one GET without arguments.
fn simple_get(args: &[String], command: &str, path: &str) -> ExitCode {
    let o = match parse_opts(args) {
        Ok(o) if o.positional.is_empty() => o,
        Ok(_) => return usage_error(&format!("{command} takes no arguments")),
        Err(e) => return usage_error(&e),
    };
    let c = match client(&o) {
        Ok(c) => c,
        Err(e) => return usage_error(&e),
    };
    report(c.send(Method::GET, path, &[], String::new()))
}

/// The Revocation resource name: `--name`, else the one `sigil revoke` derives from the ID.
fn revocation_name(o: &Opts, id: &SpiffeId) -> String {
    o.name.clone().unwrap_or_else(|| revoke::name_for(id))
}

fn one_id(o: &Opts, what: &str) -> Result<SpiffeId, String> {
    match o.positional.as_slice() {
        [id] => SpiffeId::parse(id).map_err(|e| format!("{id:?}: {e}")),
        _ => Err(format!("{what} takes one SPIFFE ID")),
    }
}

fn revoke(args: &[String]) -> ExitCode {
    let o = match parse_opts(args) {
        Ok(o) => o,
        Err(e) => return usage_error(&e),
    };
    let id = match one_id(&o, "revoke") {
        Ok(id) => id,
        Err(e) => return usage_error(&e),
    };
    let Some(reason) = o.reason.clone().filter(|r| !r.trim().is_empty()) else {
        return usage_error("--reason TEXT is required: every sidecar logs why");
    };
    let issued_before = match o.issued_before.as_deref() {
        None => None,
        Some("now") => Some(Timestamp(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        )),
        Some(t) => match Timestamp::parse(t) {
            Ok(t) => Some(t),
            Err(e) => return usage_error(&format!("--issued-before: {e}")),
        },
    };
    let c = match client(&o) {
        Ok(c) => c,
        Err(e) => return usage_error(&e),
    };
    let name = revocation_name(&o, &id);
    let owner = c.identity.local.id().to_string();
    let yaml = match revoke::document(&name, &id, &reason, issued_before, &owner) {
        Ok(y) => y,
        Err(e) => {
            eprintln!("sigil: {e}");
            return ExitCode::from(2);
        }
    };
    report(c.send(
        Method::POST,
        "/v1/apply",
        &[("x-sigil-file", "sigil revoke")],
        yaml,
    ))
}

/// Deletes every Revocation of the ID (or the one named by `--name`), whatever its name: the
/// stored documents are read, not guessed from the ID.
fn unrevoke(args: &[String]) -> ExitCode {
    let o = match parse_opts(args) {
        Ok(o) => o,
        Err(e) => return usage_error(&e),
    };
    let id = match one_id(&o, "unrevoke") {
        Ok(id) => id,
        Err(e) => return usage_error(&e),
    };
    let c = match client(&o) {
        Ok(c) => c,
        Err(e) => return usage_error(&e),
    };
    let body = match c.send(Method::GET, "/v1/resources/Revocation", &[], String::new()) {
        Ok((status, body)) if status.is_success() => body,
        other => return report(other),
    };
    let stored = match Resource::parse_all(Path::new("control-plane"), &body) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sigil: the control plane sent revocations this sigil cannot read: {e}");
            return ExitCode::from(1);
        }
    };
    let names: Vec<String> = stored
        .iter()
        .filter_map(|r| match r {
            Resource::Revocation(r) if r.spec.spiffe_id == id => Some(r.metadata.name.clone()),
            _ => None,
        })
        .filter(|n| o.name.as_ref().is_none_or(|want| want == n))
        .collect();
    if names.is_empty() {
        eprintln!("sigil: no revocation of {id} is stored");
        return ExitCode::from(1);
    }
    for name in names {
        let code = report(c.send(
            Method::DELETE,
            &format!("/v1/resources/Revocation/{name}"),
            &[],
            String::new(),
        ));
        if code != ExitCode::SUCCESS {
            return code;
        }
    }
    ExitCode::SUCCESS
}

fn load(files: &[PathBuf]) -> Result<Vec<Resource>, ExitCode> {
    files::load(files).map_err(|problems| {
        for p in &problems {
            eprintln!("{p}");
        }
        eprintln!("sigil: {} problem(s); nothing accepted", problems.len());
        ExitCode::from(2)
    })
}

fn validate(args: &[String]) -> ExitCode {
    let o = match parse_with_files(args) {
        Ok(o) => o,
        Err(e) => return usage_error(&e),
    };
    let resources = match load(&o.files) {
        Ok(r) => r,
        Err(code) => return code,
    };
    for r in &resources {
        println!("{}/{}: valid", r.kind(), r.name());
    }
    println!("{} resource(s) valid", resources.len());
    ExitCode::SUCCESS
}

fn policy_test(args: &[String]) -> ExitCode {
    let o = match parse_opts(args) {
        Ok(o) => o,
        Err(e) => return usage_error(&e),
    };
    let q = match question(&o) {
        Ok(q) => q,
        Err(e) => return usage_error(&e),
    };
    // Local files if given (offline, e.g. CI of a resource repository), else the live mesh's
    // policies from the control plane.
    let resources = if o.files.is_empty() {
        let c = match client(&o) {
            Ok(c) => c,
            Err(e) => return usage_error(&format!("{e} (or give -f PATH to test local files)")),
        };
        let body = match c.send(Method::GET, "/v1/resources/Policy", &[], String::new()) {
            Ok((status, body)) if status.is_success() => body,
            other => return report(other),
        };
        match Resource::parse_all(Path::new("control-plane"), &body) {
            Ok(r) => {
                println!(
                    "policies from the control plane at {} (a sidecar's own policyDir and inbound.ports also apply)",
                    c.server
                );
                r
            }
            Err(e) => {
                eprintln!("sigil: the control plane sent policies this sigil cannot read: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        match load(&o.files) {
            Ok(r) => r,
            Err(code) => return code,
        }
    };
    let policies: Vec<_> = resources
        .into_iter()
        .filter_map(|r| match r {
            Resource::Policy(p) => Some(p),
            _ => None,
        })
        .collect();
    match decide(&policies, &q) {
        Ok(a) => {
            print!("{}", a.text);
            if a.allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("sigil: {e}");
            ExitCode::from(2)
        }
    }
}

fn question(o: &Opts) -> Result<Question, String> {
    let id = |name: &str, v: &Option<String>| -> Result<SpiffeId, String> {
        let v = v.as_deref().ok_or(format!("--{name} ID is required"))?;
        SpiffeId::parse(v).map_err(|e| format!("--{name} {v:?}: {e}"))
    };
    let port = o.port.as_deref().ok_or("--port N is required")?;
    let port = port
        .parse()
        .map_err(|_| format!("--port {port:?}: not a port number"))?;
    let headers = o
        .headers
        .iter()
        .map(|h| {
            h.split_once(':')
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                .ok_or(format!("--header {h:?}: expected NAME:VALUE"))
        })
        .collect::<Result<_, _>>()?;
    let at = match &o.at {
        Some(t) => Timestamp::parse(t).map_err(|e| format!("--at: {e}"))?.0,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_secs() as i64,
    };
    Ok(Question {
        from: id("from", &o.from)?,
        to: id("to", &o.to)?,
        port,
        method: o.method.clone().unwrap_or_else(|| "GET".into()),
        path: o.path.clone().unwrap_or_else(|| "/".into()),
        host: o.host.clone().unwrap_or_default(),
        headers,
        at,
    })
}
