//! sigil-proxy: the Sigil sidecar. See `--help`. Wiring only: arguments, logging, the
//! runtime, exit codes; the sidecar itself is the library (`sigil_proxy::start`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sigil_config::ProxyConfig;
use sigil_proxy::start;
use tracing::error;

/// Sigil sidecar: SPIFFE mTLS between workloads, per-port identity authorization.
#[derive(Parser)]
#[command(
    name = "sigil-proxy",
    version,
    after_help = "\
ENVIRONMENT:
    SIGIL_LOG       log level: error, warn, info (default), debug, trace

EXIT CODES:
    0 clean shutdown (SIGTERM/SIGINT, after draining); 1 runtime failure (bad identity
    files at start, address in use); 2 invalid config or arguments"
)]
struct Args {
    /// ProxyConfig YAML (apiVersion: sigil.dev/v1, kind: ProxyConfig)
    #[arg(short, long, value_name = "FILE")]
    config: PathBuf,
    /// Validate the config and the identity files, then exit
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    // clap exits 2 on usage errors, 0 for --help and --version.
    let args = Args::parse();
    init_logging();
    let cfg = match ProxyConfig::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sigil-proxy: invalid config: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        return match start::check(&cfg) {
            Ok(said) => {
                println!("{said}");
                ExitCode::SUCCESS
            }
            Err(e) => failed(e),
        };
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(start::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => failed(e),
    }
}

fn failed(e: start::StartError) -> ExitCode {
    error!("{e}");
    eprintln!("sigil-proxy: {e}");
    ExitCode::from(1)
}

fn init_logging() {
    let level = match std::env::var("SIGIL_LOG").as_deref() {
        Ok("error") => tracing::Level::ERROR,
        Ok("warn") => tracing::Level::WARN,
        Ok("debug") => tracing::Level::DEBUG,
        Ok("trace") => tracing::Level::TRACE,
        _ => tracing::Level::INFO,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}
