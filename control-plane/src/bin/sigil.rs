//! sigil: the operator CLI. See `--help`.
//!
//! What it prints is for a person at a terminal (results on stdout, problems on stderr), not
//! a log; `sigil-control` is the one that logs.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand};
use hyper::{Method, StatusCode};
use sigil_config::policy::Timestamp;
use sigil_config::{Policy, Resource, SpiffeId, TrustDomain};
use sigil_control::client::{Client, ClientError};
use sigil_control::policy_test::{decide, Question};
use sigil_control::{files, identity, revoke};

const AFTER_HELP: &str = "\
Exit codes: 0 valid / allowed / done; 1 denied, or refused or not found by the control
plane; 2 invalid input or arguments.";

/// Operator CLI of the Sigil mesh.
#[derive(Parser)]
#[command(name = "sigil", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    // Details go after the options (`after_help`): a long_about would switch clap's --help
    // to its sparse one-line-per-paragraph layout.
    #[command(
        about = "A whole mesh on loopback, narrated",
        after_help = "A control plane, three workloads and their sidecars; an allowed and a \
                      denied call, a live policy change, a revocation, metrics. Needs \
                      sigil-control, sigil-proxy and sigil-toy-workload next to sigil; cleans \
                      up after itself."
    )]
    Demo,
    #[command(
        about = "Check resource files; every problem as file:line",
        after_help = "Workload, Policy, Revocation and TrustBundle files are checked as the \
                      control plane and the sidecars will check them."
    )]
    Validate(Files),
    /// Policy tools
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Validate, then store resources in the control plane
    Apply(ApplyArgs),
    /// Print stored resources: all, one kind, or one resource
    Get(GetArgs),
    /// Remove a stored resource
    Delete(DeleteArgs),
    #[command(
        about = "The store version and every connected sidecar",
        after_help = "One line per sidecar: its name, identity, address, the version it was \
                      sent and whether it acknowledged it."
    )]
    Status(Connection),
    /// The control plane's own metrics (OpenMetrics text)
    Metrics(Connection),
    #[command(
        about = "The SVIDs issued and refused, as the control plane recorded them",
        after_help = "One line each, oldest first: the time, first/renewal/workload_api or \
                      refused (with the reason), the identity, Workload, serial and expiry, and \
                      who asked from where. Kept 30 days."
    )]
    Issuances(IssuancesArgs),
    /// Sidecars' audit records kept by the control plane
    #[command(subcommand)]
    Audit(AuditCommand),
    #[command(
        about = "Take an identity off the mesh now",
        after_help = "Every sidecar refuses it and cuts its live connections. Stores a \
                      Revocation resource named after the ID (or --name)."
    )]
    Revoke(RevokeArgs),
    /// Delete the Revocations of an identity
    Unrevoke(UnrevokeArgs),
    /// The control plane's certificate authority
    #[command(subcommand)]
    Ca(CaCommand),
    /// One-time join tokens for sidecars' first SVIDs
    #[command(subcommand)]
    Token(TokenCommand),
    /// Print sigil's version
    Version,
}

#[derive(Subcommand)]
enum CaCommand {
    #[command(
        about = "Make a root CA for one trust domain in a directory, or an intermediate signed by an upstream CA",
        after_help = "Writes DIR/ca.key (an ECDSA P-256 key, mode 0600, never printed) and \
                      DIR/ca.crt (the certificate: the trust bundle of the domain). DIR is \
                      created with mode 0700; a CA already there is never overwritten."
    )]
    Init(CaInitArgs),
    #[command(
        about = "Start a CA rotation: make the next CA beside the active one",
        after_help = "Writes DIR/next.key and DIR/next.crt for the active CA's trust domain. \
                      sigil-control --ca-dir DIR (each replica: copy DIR to them) then puts it \
                      in the trust bundle, makes it active once every sidecar acknowledged that \
                      bundle (sidecars move to it at their next renewal), and drops the old CA \
                      from the bundle once every SVID it signed has expired. Refused while a \
                      rotation is under way."
    )]
    Rotate(CaRotateArgs),
}

#[derive(Subcommand)]
enum TokenCommand {
    #[command(
        about = "A one-time join token for a Workload's sidecar",
        after_help = "The sidecar presents it once, with its first CSR, and gets an SVID for \
                      the Workload's identity; then it renews with that SVID. The token is \
                      printed once and stored only as its SHA-256."
    )]
    Create(TokenCreateArgs),
}

#[derive(Args)]
struct TokenCreateArgs {
    /// The Workload (its metadata.name) the token is for
    #[arg(long, value_name = "NAME")]
    workload: String,
    /// How long the token can be used (at most 24h)
    #[arg(long, value_name = "DURATION", default_value = "10m")]
    ttl: String,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Args)]
struct CaInitArgs {
    /// Where the CA's key and certificate go
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The trust domain whose SVIDs it signs, e.g. example.org
    #[arg(long, value_name = "NAME", value_parser = TrustDomain::parse)]
    trust_domain: TrustDomain,
    /// How long the CA certificate is valid (250ms, 5s, 2m, 1h)
    #[arg(long, value_name = "DURATION", default_value = "8760h",
        value_parser = sigil_config::proxy_config::duration::parse)]
    lifetime: std::time::Duration,
    #[command(flatten)]
    upstream: UpstreamArgs,
}

#[derive(Subcommand)]
enum AuditCommand {
    #[command(
        about = "Check every sidecar's stored audit chain end to end",
        after_help = "One line per sidecar (records, last sequence number, ok or the number of \
                      breaks), then each break: an edited, deleted, inserted or reordered record, \
                      a cut tail, a checkpoint that does not match or is not the sidecar's. \
                      Exit code 1 if any break is found."
    )]
    Verify(Connection),
    #[command(
        about = "Stored audit records, filtered, oldest first",
        after_help = "One line each (row, time, sidecar, sequence number, kind, then what the \
                      record says), or JSON lines with --json. --identity matches the sidecar \
                      or the peer."
    )]
    Query(AuditQueryArgs),
    /// Follow new audit records as they are stored (until interrupted)
    Tail(AuditQueryArgs),
    /// Every record that passes the filters, as JSON lines (for a SIEM), page by page
    Export(AuditQueryArgs),
}

#[derive(Args)]
struct AuditQueryArgs {
    /// Records of this sidecar, or with this peer (a SPIFFE ID)
    #[arg(long, value_name = "ID")]
    identity: Option<String>,
    /// allow or deny
    #[arg(long, value_name = "DECISION")]
    decision: Option<String>,
    /// The Policy that decided
    #[arg(long, value_name = "NAME")]
    policy: Option<String>,
    /// normal (done), peer_closed, io_error, idle_timeout, bundle_change, policy_change, revoked, shutdown, ...
    #[arg(long, value_name = "REASON")]
    close_reason: Option<String>,
    /// connection_open, connection_close, connection_refused, request_denied, would_deny,
    /// dropped, ...
    #[arg(long, value_name = "KIND")]
    kind: Option<String>,
    /// From when: a duration back from now (90m, 24h) or an RFC 3339 time
    #[arg(long, value_name = "WHEN")]
    since: Option<String>,
    /// Until when (exclusive), as --since
    #[arg(long, value_name = "WHEN")]
    until: Option<String>,
    /// At most this many records (query)
    #[arg(long, value_name = "N", default_value_t = 1000)]
    limit: usize,
    /// JSON lines instead of one line of text each
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Args)]
struct UpstreamArgs {
    /// An operator's CA to sign the CA (its certificate, then any intermediates up to its
    /// root, PEM): the CA is then an intermediate, and the root is the trust bundle
    #[arg(long, value_name = "FILE", requires = "upstream_key")]
    upstream_cert: Option<PathBuf>,
    /// The upstream CA's private key (read here only; sigil-control never sees it)
    #[arg(long, value_name = "FILE", requires = "upstream_cert")]
    upstream_key: Option<PathBuf>,
}

#[derive(Args)]
struct IssuancesArgs {
    /// From when: a duration back from now (90m, 24h) or an RFC 3339 time
    #[arg(long, value_name = "WHEN", default_value = "24h")]
    since: String,
    /// At most this many lines
    #[arg(long, value_name = "N", default_value_t = 1000)]
    limit: usize,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Args)]
struct CaRotateArgs {
    /// The CA directory (made by sigil ca init)
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// How long the next CA certificate is valid (250ms, 5s, 2m, 1h)
    #[arg(long, value_name = "DURATION", default_value = "8760h",
        value_parser = sigil_config::proxy_config::duration::parse)]
    lifetime: std::time::Duration,
    #[command(flatten)]
    upstream: UpstreamArgs,
}

#[derive(Subcommand)]
enum PolicyCommand {
    #[command(
        about = "The verdict a sidecar of --to would give --from, and the rule",
        after_help = "Computed by the sidecars' own decision code (the same request \
                      normalization and PolicyIndex), over the policies of -f, or without -f \
                      over the control plane's."
    )]
    Test(TestArgs),
}

#[derive(Args)]
struct Files {
    /// A resource file, or a directory of *.yaml files (repeatable)
    #[arg(short = 'f', long = "file", value_name = "PATH", required = true)]
    files: Vec<PathBuf>,
}

// The operator API: mutual TLS with your SVID. Flags, else the environment.
#[derive(Args)]
#[command(next_help_heading = "Connection (the operator API, mutual TLS with your SVID)")]
struct Connection {
    /// The control plane's operator API
    #[arg(
        long,
        hide_env_values = true,
        env = "SIGIL_SERVER",
        value_name = "ADDR",
        default_value = "127.0.0.1:15014"
    )]
    server: SocketAddr,
    /// The control plane's SPIFFE ID, pinned (required)
    #[arg(long, hide_env_values = true,
        env = "SIGIL_CONTROL_ID", value_name = "ID", value_parser = SpiffeId::parse)]
    control_id: Option<SpiffeId>,
    /// Your SVID, leaf first (required)
    #[arg(long, hide_env_values = true, env = "SIGIL_CERT", value_name = "FILE")]
    cert: Option<PathBuf>,
    /// Your SVID's private key (required)
    #[arg(long, hide_env_values = true, env = "SIGIL_KEY", value_name = "FILE")]
    key: Option<PathBuf>,
    /// Trust bundles, one <trust domain>.pem each (required)
    #[arg(
        long,
        hide_env_values = true,
        env = "SIGIL_BUNDLE_DIR",
        value_name = "DIR"
    )]
    bundle_dir: Option<PathBuf>,
}

#[derive(Args)]
struct ApplyArgs {
    #[command(flatten)]
    files: Files,
    /// Show what would be created, updated or left unchanged; write nothing
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Args)]
struct GetArgs {
    /// A resource kind: Workload, Policy, Revocation, TrustBundle
    kind: Option<String>,
    /// A resource name (with KIND)
    name: Option<String>,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Args)]
struct DeleteArgs {
    /// The resource's kind
    kind: String,
    /// The resource's name
    name: String,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Args)]
struct RevokeArgs {
    /// The SPIFFE ID to revoke
    #[arg(value_parser = SpiffeId::parse)]
    id: SpiffeId,
    /// Why (required: every sidecar logs it)
    #[arg(long, value_name = "TEXT", value_parser = reason)]
    reason: String,
    /// Revoke only SVIDs issued before TIME (RFC 3339 UTC, or `now`), so that a rebuilt
    /// workload with a fresh SVID is accepted again
    #[arg(long, value_name = "TIME", value_parser = instant)]
    issued_before: Option<Timestamp>,
    /// The Revocation resource's name [default: derived from the ID]
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Args)]
struct UnrevokeArgs {
    /// The SPIFFE ID whose Revocations are deleted
    #[arg(value_parser = SpiffeId::parse)]
    id: SpiffeId,
    /// Delete only the Revocation of this name
    #[arg(long)]
    name: Option<String>,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Args)]
struct TestArgs {
    /// A resource file, or a directory of *.yaml files (repeatable); without it, the
    /// control plane's policies
    #[arg(short = 'f', long = "file", value_name = "PATH")]
    files: Vec<PathBuf>,
    /// The calling workload's SPIFFE ID
    #[arg(long, value_name = "ID", value_parser = SpiffeId::parse)]
    from: SpiffeId,
    /// The called workload's SPIFFE ID (the policies targeting it apply)
    #[arg(long, value_name = "ID", value_parser = SpiffeId::parse)]
    to: SpiffeId,
    /// The called workload's port
    #[arg(long, value_name = "N")]
    port: u16,
    /// HTTP method, on ports declared http
    #[arg(long, value_name = "M", default_value = "GET")]
    method: String,
    /// Path and query as the client sends them (normalized as a sidecar does)
    #[arg(long, value_name = "P", default_value = "/")]
    path: String,
    /// Host / :authority; routes that list hosts need it [default: none]
    #[arg(long, value_name = "H", default_value = "", hide_default_value = true)]
    host: String,
    /// A request header (repeatable)
    #[arg(long = "header", value_name = "NAME:VALUE", value_parser = header)]
    headers: Vec<(String, String)>,
    /// Judge expiry at this RFC 3339 UTC instant [default: now]
    #[arg(long, value_name = "TIME", value_parser = Timestamp::parse)]
    at: Option<Timestamp>,
    #[command(flatten)]
    connection: Connection,
}

/// A flag value that clap's own parsers cannot judge; clap prints it after the flag's name.
#[derive(Debug)]
enum BadValue {
    /// `--reason` is blank.
    BlankReason,
    /// `--header` has no `:`.
    Header,
    /// `--issued-before` is neither `now` nor an RFC 3339 time (`Timestamp::parse`'s reason).
    Time(String),
}

impl fmt::Display for BadValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BlankReason => write!(f, "a reason is required: every sidecar logs why"),
            Self::Header => write!(f, "expected NAME:VALUE"),
            Self::Time(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for BadValue {}

/// `--reason`: not blank, since every sidecar logs it as the why.
fn reason(text: &str) -> Result<String, BadValue> {
    if text.trim().is_empty() {
        return Err(BadValue::BlankReason);
    }
    Ok(text.to_string())
}

/// `--issued-before`: RFC 3339 UTC, or `now`.
fn instant(text: &str) -> Result<Timestamp, BadValue> {
    if text == "now" {
        return Ok(Timestamp(now()));
    }
    Timestamp::parse(text).map_err(BadValue::Time)
}

/// `--header NAME:VALUE`, the name lowercased as the sidecar compares it.
fn header(text: &str) -> Result<(String, String), BadValue> {
    let (name, value) = text.split_once(':').ok_or(BadValue::Header)?;
    Ok((name.trim().to_ascii_lowercase(), value.trim().to_string()))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => {
            // Bare `sigil` is a question, not a mistake: help, exit 0.
            let _ = Cli::command().print_help();
            ExitCode::SUCCESS
        }
        Some(Command::Version) => {
            println!("sigil {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some(Command::Demo) => {
            match sigil_control::demo::run(&sigil_control::demo::default_bin_dir()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            }
        }
        Some(Command::Validate(a)) => validate(&a),
        Some(Command::Policy(PolicyCommand::Test(a))) => policy_test(&a),
        Some(Command::Apply(a)) => apply(&a),
        Some(Command::Get(a)) => get(&a),
        Some(Command::Delete(a)) => delete(&a),
        Some(Command::Status(c)) => simple_get(&c, &["status"], "/v1/status"),
        Some(Command::Issuances(a)) => issuances(&a),
        Some(Command::Audit(AuditCommand::Verify(c))) => {
            simple_get(&c, &["audit", "verify"], "/v1/audit/verify")
        }
        Some(Command::Audit(AuditCommand::Query(a))) => audit_query(&a, AuditMode::Query),
        Some(Command::Audit(AuditCommand::Tail(a))) => audit_query(&a, AuditMode::Tail),
        Some(Command::Audit(AuditCommand::Export(a))) => audit_query(&a, AuditMode::Export),
        Some(Command::Metrics(c)) => simple_get(&c, &["metrics"], "/metrics"),
        Some(Command::Revoke(a)) => revoke(&a),
        Some(Command::Unrevoke(a)) => unrevoke(&a),
        Some(Command::Ca(CaCommand::Init(a))) => ca_init(&a),
        Some(Command::Ca(CaCommand::Rotate(a))) => ca_rotate(&a),
        Some(Command::Token(TokenCommand::Create(a))) => token_create(&a),
    }
}

fn token_create(a: &TokenCreateArgs) -> ExitCode {
    if let Err(e) = sigil_config::proxy_config::duration::parse(&a.ttl) {
        return usage_error(
            &["token", "create"],
            ErrorKind::ValueValidation,
            &format!("--ttl: {e}"),
        );
    }
    let c = match client(&a.connection, &["token", "create"], "") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let body = format!("workload={} ttl={}", a.workload, a.ttl);
    report(c.send(Method::POST, "/v1/tokens", &[], body))
}

/// The upstream CA of `--upstream-cert` and `--upstream-key` (clap requires both or neither).
fn load_upstream(
    a: &UpstreamArgs,
) -> Result<Option<sigil_control::ca::Upstream>, sigil_control::ca::CaError> {
    match (&a.upstream_cert, &a.upstream_key) {
        (Some(cert), Some(key)) => sigil_control::ca::Upstream::load(cert, key).map(Some),
        _ => Ok(None),
    }
}

fn ca_rotate(a: &CaRotateArgs) -> ExitCode {
    let now = now_unix();
    let upstream = match load_upstream(&a.upstream) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("sigil ca rotate: {e}");
            return ExitCode::FAILURE;
        }
    };
    match sigil_control::ca::rotate(&a.dir, now, a.lifetime, upstream.as_ref()) {
        Ok(files) => {
            println!(
                "next CA made:\n  key (mode 0600): {}\n  certificate: {}\nsigil-control --ca-dir {} puts it in the trust bundle within a second and makes it active once every sidecar has that bundle",
                files.key.display(),
                files.cert.display(),
                a.dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sigil ca rotate: {e}");
            ExitCode::FAILURE
        }
    }
}

fn ca_init(a: &CaInitArgs) -> ExitCode {
    let now = now_unix();
    let upstream = match load_upstream(&a.upstream) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("sigil ca init: {e}");
            return ExitCode::FAILURE;
        }
    };
    match sigil_control::ca::init(&a.dir, &a.trust_domain, now, a.lifetime, upstream.as_ref()) {
        Ok(files) if upstream.is_some() => {
            println!(
                "intermediate CA for {} made, signed by {}:\n  key (keep it here; mode 0600): {}\n  certificate and the upstream chain: {}\nthe trust bundle of {} is the upstream CA's root (the last certificate there)",
                a.trust_domain,
                a.upstream.upstream_cert.as_deref().unwrap_or(Path::new("")).display(),
                files.key.display(),
                files.cert.display(),
                a.trust_domain,
            );
            ExitCode::SUCCESS
        }
        Ok(files) => {
            println!(
                "CA for {} made:\n  key (keep it here; mode 0600): {}\n  certificate (the trust bundle of {}): {}",
                a.trust_domain,
                files.key.display(),
                a.trust_domain,
                files.cert.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sigil ca init: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A usage error found after parsing, in clap's form (one line, the subcommand's usage, the
/// hint to --help); exit code 2. `command`: the subcommand's path, e.g. `["policy", "test"]`.
fn usage_error(command: &[&str], kind: ErrorKind, message: &str) -> ExitCode {
    let mut cmd = Cli::command();
    // Building sets each subcommand's full name (`sigil policy test`) for its usage line.
    cmd.build();
    let mut sub = &mut cmd;
    for name in command {
        sub = sub
            .find_subcommand_mut(name)
            .expect("usage_error names a subcommand");
    }
    let _ = sub.error(kind, message).print();
    ExitCode::from(2)
}

/// The operator API client, or the usage error that says what is missing or unreadable;
/// `hint` follows a missing setting's message.
fn client(c: &Connection, command: &[&str], hint: &str) -> Result<Client, ExitCode> {
    let missing = |flag: &str, env: &str| {
        usage_error(
            command,
            ErrorKind::MissingRequiredArgument,
            &format!("{flag} (or {env}) is required{hint}"),
        )
    };
    let control_id = c
        .control_id
        .clone()
        .ok_or_else(|| missing("--control-id", "SIGIL_CONTROL_ID"))?;
    let cert = c
        .cert
        .as_ref()
        .ok_or_else(|| missing("--cert", "SIGIL_CERT"))?;
    let key = c
        .key
        .as_ref()
        .ok_or_else(|| missing("--key", "SIGIL_KEY"))?;
    let bundles = c
        .bundle_dir
        .as_ref()
        .ok_or_else(|| missing("--bundle-dir", "SIGIL_BUNDLE_DIR"))?;
    let identity = identity::load(cert, key, bundles)
        .map_err(|e| usage_error(command, ErrorKind::Io, &e.to_string()))?;
    Ok(Client {
        server: c.server,
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

fn apply(a: &ApplyArgs) -> ExitCode {
    // Validate everything locally first: nothing is sent unless every file is valid.
    if let Err(code) = load(&a.files.files) {
        return code;
    }
    let c = match client(&a.connection, &["apply"], "") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let path = if a.dry_run {
        "/v1/apply?dryRun=true"
    } else {
        "/v1/apply"
    };
    for file in files::expand_all(&a.files.files) {
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

fn get(a: &GetArgs) -> ExitCode {
    let c = match client(&a.connection, &["get"], "") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let rest: Vec<&str> = [&a.kind, &a.name]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let path = format!("/v1/resources/{}", rest.join("/"));
    report(c.send(Method::GET, &path, &[], String::new()))
}

fn delete(a: &DeleteArgs) -> ExitCode {
    let c = match client(&a.connection, &["delete"], "") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let path = format!("/v1/resources/{}/{}", a.kind, a.name);
    report(c.send(Method::DELETE, &path, &[], String::new()))
}

/// A command that is one GET without arguments.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AuditMode {
    Query,
    Tail,
    Export,
}

/// Unix seconds now.
fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A --since/--until value that is no time.
struct BadTime<'a> {
    flag: &'a str,
    value: &'a str,
    why: String,
}

impl std::fmt::Display for BadTime<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:?}: neither a duration (24h) nor an RFC 3339 time: {}",
            self.flag, self.value, self.why
        )
    }
}

/// Unix seconds of a --since/--until value: a duration back from now, or an RFC 3339 time.
fn when<'a>(flag: &'a str, value: &'a str, now: i64) -> Result<i64, BadTime<'a>> {
    match sigil_config::proxy_config::duration::parse(value) {
        Ok(back) => Ok(now - back.as_secs() as i64),
        Err(_) => sigil_config::policy::Timestamp::parse(value)
            .map(|t| t.0)
            .map_err(|e| BadTime {
                flag,
                value,
                why: e.to_string(),
            }),
    }
}

/// Percent-encodes a query value (everything but unreserved characters).
fn encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn audit_query(a: &AuditQueryArgs, mode: AuditMode) -> ExitCode {
    let now = now_unix();
    let mut query = Vec::new();
    for (k, v) in [
        ("identity", &a.identity),
        ("decision", &a.decision),
        ("policy", &a.policy),
        ("close_reason", &a.close_reason),
        ("kind", &a.kind),
    ] {
        if let Some(v) = v {
            query.push(format!("{k}={}", encode(v)));
        }
    }
    for (flag, k, v) in [
        ("--since", "since", &a.since),
        ("--until", "until", &a.until),
    ] {
        if let Some(v) = v {
            match when(flag, v, now) {
                Ok(secs) => query.push(format!("{k}={}", secs.saturating_mul(1_000_000_000))),
                Err(e) => {
                    eprintln!("sigil audit: {e}");
                    return ExitCode::from(2);
                }
            }
        }
    }
    if a.json || mode == AuditMode::Export {
        query.push("format=json".into());
    }
    let c = match client(&a.connection, &["audit"], "") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let page = match mode {
        AuditMode::Query => a.limit,
        AuditMode::Tail | AuditMode::Export => 10_000,
    };
    let mut after = 0i64;
    loop {
        let path = format!(
            "/v1/audit/records?{}&after={after}&limit={page}",
            query.join("&")
        );
        let body = match c.send(Method::GET, &path, &[], String::new()) {
            Ok((status, body)) if status.is_success() => body,
            other => return report(other),
        };
        print!("{body}");
        let lines = body.lines().count();
        if let Some(last) = body.lines().last() {
            // The row number leads each line of text, and is `row` in JSON.
            let row = match serde_json::from_str::<serde_json::Value>(last) {
                Ok(v) => v["row"].as_i64(),
                Err(_) => last.split(' ').next().and_then(|n| n.parse().ok()),
            };
            after = row.unwrap_or(after);
        }
        match mode {
            AuditMode::Query => return ExitCode::SUCCESS,
            AuditMode::Export if lines < page => return ExitCode::SUCCESS,
            AuditMode::Export => {}
            AuditMode::Tail => {
                if lines < page {
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            }
        }
    }
}

fn issuances(a: &IssuancesArgs) -> ExitCode {
    let since = match when("--since", &a.since, now_unix()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("sigil issuances: {e}");
            return ExitCode::from(2);
        }
    };
    let path = format!("/v1/issuances?since={since}&limit={}", a.limit);
    simple_get(&a.connection, &["issuances"], &path)
}

fn simple_get(connection: &Connection, command: &[&str], path: &str) -> ExitCode {
    let c = match client(connection, command, "") {
        Ok(c) => c,
        Err(code) => return code,
    };
    report(c.send(Method::GET, path, &[], String::new()))
}

fn revoke(a: &RevokeArgs) -> ExitCode {
    let c = match client(&a.connection, &["revoke"], "") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let name = a.name.clone().unwrap_or_else(|| revoke::name_for(&a.id));
    let owner = c.identity.local.id().to_string();
    let yaml = match revoke::document(&name, &a.id, &a.reason, a.issued_before, &owner) {
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
fn unrevoke(a: &UnrevokeArgs) -> ExitCode {
    let c = match client(&a.connection, &["unrevoke"], "") {
        Ok(c) => c,
        Err(code) => return code,
    };
    let stored = match fetch(&c, "/v1/resources/Revocation", "revocations") {
        Ok(r) => r,
        Err(code) => return code,
    };
    let names: Vec<String> = stored
        .iter()
        .filter_map(|r| match r {
            Resource::Revocation(r) if r.spec.spiffe_id == a.id => Some(r.metadata.name.clone()),
            _ => None,
        })
        .filter(|n| a.name.as_ref().is_none_or(|want| want == n))
        .collect();
    if names.is_empty() {
        eprintln!("sigil: no revocation of {} is stored", a.id);
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

/// The stored resources at `path`, parsed; `what` names them in the error.
fn fetch(c: &Client, path: &str, what: &str) -> Result<Vec<Resource>, ExitCode> {
    let body = match c.send(Method::GET, path, &[], String::new()) {
        Ok((status, body)) if status.is_success() => body,
        other => return Err(report(other)),
    };
    Resource::parse_all(Path::new("control-plane"), &body).map_err(|e| {
        eprintln!("sigil: the control plane sent {what} this sigil cannot read: {e}");
        ExitCode::from(1)
    })
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

fn validate(a: &Files) -> ExitCode {
    let resources = match load(&a.files) {
        Ok(r) => r,
        Err(code) => return code,
    };
    for r in &resources {
        println!("{}/{}: valid", r.kind(), r.name());
    }
    println!("{} resource(s) valid", resources.len());
    ExitCode::SUCCESS
}

fn policy_test(a: &TestArgs) -> ExitCode {
    let policies = match test_policies(a) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let q = Question {
        from: a.from.clone(),
        to: a.to.clone(),
        port: a.port,
        method: a.method.clone(),
        path: a.path.clone(),
        host: a.host.clone(),
        headers: a.headers.clone(),
        at: a.at.map_or_else(now, |t| t.0),
    };
    match decide(&policies, &q) {
        Ok(answer) => {
            print!("{}", answer.text);
            if answer.allowed {
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

/// The policies `policy test` judges with: local files if given (offline, e.g. CI of a
/// resource repository), else the live mesh's policies from the control plane.
fn test_policies(a: &TestArgs) -> Result<Vec<Policy>, ExitCode> {
    let resources = if a.files.is_empty() {
        let hint = " (or give -f PATH to test local files)";
        let c = client(&a.connection, &["policy", "test"], hint)?;
        let r = fetch(&c, "/v1/resources/Policy", "policies")?;
        println!(
            "policies from the control plane at {} (a sidecar's own policyDir and inbound.ports also apply)",
            c.server
        );
        r
    } else {
        load(&a.files)?
    };
    Ok(resources
        .into_iter()
        .filter_map(|r| match r {
            Resource::Policy(p) => Some(p),
            _ => None,
        })
        .collect())
}
