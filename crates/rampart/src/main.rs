//! `rampart`: one binary, several jobs. Only the subcommands that work exist.

mod demo;

use clap::{Parser, Subcommand};
use rampart_config::RuntimeModel;
use std::path::PathBuf;
use std::process::ExitCode;

/// jemalloc rather than glibc's malloc, for memory that goes back to the system.
/// After 10,000 keep-alive connections were parked (about 2 KiB live each), glibc
/// still held 16 KiB per connection in RSS (freed buffers fragmented among live
/// ones). jemalloc's background thread returns pages unused for a second (the decay
/// settings below): 2.7 KiB per idle connection. mimalloc was tried first: it
/// returns memory only when the thread that freed it allocates again, so an edge
/// gone idle kept 10 KiB per connection. CPU per request measured the same with
/// all three. See docs/architecture.md, "Memory".
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at start-up: purge unused dirty pages after 1 s from a
/// background thread, and do not keep them as "muzzy" (lazily freed) pages.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

#[derive(Parser)]
#[command(
    name = "rampart",
    version,
    about = "An open edge platform: reverse proxy, load balancer, cache, WAF"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the data plane.
    Edge {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate a config: exit 0 with a summary, or non-zero with every error.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Run an edge, its admin API and a demo origin on loopback.
    Demo {
        /// Port for the edge (0 picks a free one).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Port for the admin API (0 picks a free one).
        #[arg(long, default_value_t = 9901)]
        admin_port: u16,
    },
}

/// Log level from `RUST_LOG`; by default `info`, with rustls at `error`: rustls warns
/// about a client's protocol slips (an IP address sent as SNI, as wrk and some
/// bots do), one line per connection that any client can cause. Failed handshakes
/// are counted in `rampart_tls_handshake_failures_total` and logged at debug.
const DEFAULT_LOG_FILTER: &str = "info,rustls=error";

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Check { config } => check(&config),
        Cmd::Edge { config } => {
            init_logging();
            let validated = match rampart_config::load_file(&config) {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("{e}");
                    eprintln!("{}: configuration rejected ({} error(s))", config.display(), e.0.len());
                    return ExitCode::from(1);
                }
            };
            let s = &validated.config.server;
            let workers = s
                .workers
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let current_thread = match s.runtime {
                RuntimeModel::Auto if workers > 1 => return exit(per_core(workers, validated, config)),
                RuntimeModel::Auto | RuntimeModel::CurrentThread => true,
                RuntimeModel::MultiThread => false,
                RuntimeModel::PerCore => return exit(per_core(workers, validated, config)),
            };
            match runtime(workers, current_thread) {
                Ok(rt) => exit(rt.block_on(run_edge(validated, config, Vec::new()))),
                Err(e) => exit(Err(e)),
            }
        }
        Cmd::Demo { port, admin_port } => {
            init_logging();
            // The runtime `rampart edge` chooses by default (`runtime = "auto"`): one
            // current-thread runtime with one core, per-core runtimes with more. The
            // demo's origins run on this thread's runtime.
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            let workers = if cores > 1 { cores } else { 0 };
            exit(with_workers(workers, |handles| demo::run(port, admin_port, handles)))
        }
    }
}

fn exit(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rampart: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The runtime model is chosen by measurement (docs/architecture.md): with one
/// worker, a current-thread runtime costs about 9 % less CPU per proxied request
/// than a one-worker work-stealing runtime; with more, one current-thread runtime
/// per worker thread ([`per_core`]) about 30 % less than one work-stealing runtime.
fn runtime(workers: usize, current_thread: bool) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = if current_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    Ok(b.enable_all().thread_name("rampart-worker").build()?)
}

fn check(path: &std::path::Path) -> ExitCode {
    let result = rampart_config::load_file(path).and_then(|v| {
        let warnings = v.warnings.clone();
        rampart_edge::check(v).map(|s| (s, warnings))
    });
    match result {
        Ok((summary, warnings)) => {
            for w in warnings {
                eprintln!("warning: {w}");
            }
            println!("{}: {summary}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            eprintln!("{}: configuration rejected ({} error(s))", path.display(), e.0.len());
            ExitCode::from(1)
        }
    }
}

async fn run_edge(
    validated: rampart_config::Validated,
    path: PathBuf,
    workers: Vec<tokio::runtime::Handle>,
) -> anyhow::Result<()> {
    let path = std::fs::canonicalize(&path).unwrap_or(path);
    let signals = Signals::install()?;
    let edge = rampart_edge::Edge::start_on(validated, Some(path), workers).await?;
    signals.serve(edge).await
}

/// The per-core runtime model: `workers` threads, each running a current-thread
/// runtime that accepts on its own `SO_REUSEPORT` sockets and serves what it
/// accepts; this thread runs a current-thread runtime for signals, the admin
/// listener, health checks and the parking lot. When the edge has drained, the
/// worker runtimes are stopped and their threads joined.
fn per_core(workers: usize, validated: rampart_config::Validated, path: PathBuf) -> anyhow::Result<()> {
    with_workers(workers, |handles| run_edge(validated, path, handles))
}

/// Run `f` on this thread's current-thread runtime, given the handles of `workers`
/// per-core worker runtimes (`0`: none, and the edge serves on this runtime too).
/// The worker runtimes are stopped and their threads joined after.
fn with_workers<F, Fut>(workers: usize, f: F) -> anyhow::Result<()>
where
    F: FnOnce(Vec<tokio::runtime::Handle>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let control = runtime(1, true)?;
    let workers = if workers > 0 {
        Some(rampart_edge::workers::Workers::start(workers)?)
    } else {
        None
    };
    let handles = workers.as_ref().map(|w| w.handles()).unwrap_or_default();
    let result = control.block_on(f(handles));
    drop(workers);
    result
}

/// The signals the edge obeys. Installed before the edge starts: a SIGHUP sent as
/// soon as the edge says it is listening must reload it, not end the process
/// (the default action), which a test saw once under load.
pub struct Signals {
    hup: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Reload on SIGHUP; drain and exit on SIGTERM or SIGINT.
    pub async fn serve(mut self, edge: rampart_edge::Edge) -> anyhow::Result<()> {
        loop {
            tokio::select! {
                _ = self.hup.recv() => {
                    tracing::info!("SIGHUP: reloading configuration");
                    let _ = edge.reload().await;
                }
                _ = self.term.recv() => break,
                _ = self.int.recv() => break,
            }
        }
        let grace = edge.shutdown_timeout();
        tracing::info!(grace = ?grace, "shutting down: draining in-flight requests");
        let report = edge.shutdown(grace).await;
        tracing::info!(abandoned = report.abandoned, "stopped");
        Ok(())
    }
}
