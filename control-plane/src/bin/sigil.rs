//! sigil: the operator CLI. See `--help`.

use std::path::PathBuf;
use std::process::ExitCode;

use sigil_config::policy::Timestamp;
use sigil_config::{Resource, SpiffeId};
use sigil_control::files;
use sigil_control::policy_test::{decide, Question};

const USAGE: &str = "\
sigil — operator CLI of the Sigil mesh

USAGE:
    sigil validate -f PATH...
    sigil policy test -f PATH... --from ID --to ID --port N
                      [--method M] [--path P] [--host H] [--header NAME:VALUE]... [--at TIME]

COMMANDS:
    validate      check Workload, Policy and Revocation files as the control plane and the
                  sidecars will; every problem is reported as file:line
    policy test   the verdict a sidecar of --to would give a caller --from, and the rule that
                  decides it, computed by the sidecars' own decision code

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
    -h, --help    this text
    -V, --version version

EXIT CODES:
    0 valid / allowed; 1 denied; 2 invalid input or arguments";

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
        Some("validate") => validate(&args[1..]),
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
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if o.files.is_empty() {
        return Err("-f PATH is required".into());
    }
    Ok(o)
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
    let o = match parse_opts(args) {
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
    let resources = match load(&o.files) {
        Ok(r) => r,
        Err(code) => return code,
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
