//! `culvert`: the node daemon and its helper commands.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use culvert::cli;
use culvert::config::{self, NodeArgs};
use culvert::telemetry;
use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

/// jemalloc: less fragmentation than glibc's malloc under many connections' buffers coming and
/// going on several threads (`docs/benchmarks.md`, tunnels).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts: pages freed for a second go back to the kernel, so
/// the memory of a burst of tunnels returns once they close. The background thread that does it
/// when the daemon is quiet starts in `main`, once signals are held, so that it holds them too.
#[allow(unsafe_code, non_upper_case_globals)]
// SAFETY: jemalloc reads this symbol as a `const char *` to a NUL-terminated string, which a
// reference to a static byte array ending in NUL is.
#[unsafe(export_name = "_rjem_malloc_conf")]
static malloc_conf: &[u8; 37] = b"dirty_decay_ms:1000,muzzy_decay_ms:0\0";

#[derive(Parser)]
#[command(
    name = "culvert",
    version,
    about = "Per-node mTLS tunnel for Kubernetes pods"
)]
struct Cli {
    /// Log line format.
    #[arg(long, global = true, env = "CULVERT_LOG_FORMAT", value_enum, default_value_t = telemetry::Format::Plain)]
    log_format: telemetry::Format,
    /// Log filter, RUST_LOG syntax.
    #[arg(long, global = true, env = "CULVERT_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node daemon.
    Node(Box<NodeArgs>),
    /// Write a self-signed root CA (ca.crt, ca.key) for demos and tests.
    LocalCa {
        /// Directory to write into.
        #[arg(long)]
        out: PathBuf,
    },
    /// The workloads a node knows (`istioctl ztunnel-config workloads`' columns).
    Workloads(cli::ViewArgs),
    /// The Services a node knows, with their VIPs and endpoints.
    Services(cli::ViewArgs),
    /// The AuthorizationPolicies a node enforces.
    Policies(cli::ViewArgs),
    /// The certificates a node holds for its pods: leaf, intermediates, roots.
    #[command(alias = "certificates")]
    Certs(cli::ViewArgs),
    /// The connections a node carries now.
    Connections(cli::ViewArgs),
    /// A node's log filter; `--level` or `--reset` changes it.
    Log(cli::LogArgs),
    /// Is this node's traffic encrypted? Checks the daemon, the CNI chain, every enrolled pod's
    /// wiring and every certificate; exits non-zero on any failure.
    Check(cli::CheckArgs),
    /// Exit 0 when the daemon that owns `--file` (its `--ready-file`) is ready: the DaemonSet's
    /// exec readiness probe.
    Ready {
        #[arg(long)]
        file: PathBuf,
    },
    /// Remove culvert-cni from the host's CNI configuration and plugin directory (undoing
    /// `culvert node --install-cni`).
    CniUninstall {
        #[arg(long, default_value = config::DEFAULT_CNI_BIN_DIR)]
        cni_bin_dir: PathBuf,
        #[arg(long, default_value = config::DEFAULT_CNI_CONF_DIR)]
        cni_conf_dir: PathBuf,
    },
}

// Before logging exists, stderr is the only place to say why we cannot start.
#[allow(clippy::print_stderr)]
fn main() -> ExitCode {
    // Before anything else: a signal that arrives while the daemon starts waits (blocked, so
    // pending) until its handler exists, instead of killing the process with the default
    // action. Threads started from here on inherit the mask; `node` unblocks it on this thread
    // once the handlers are in place. Child processes start with an empty mask.
    let held = hold_signals();
    let cli = Cli::parse();
    let purging = if matches!(cli.command, Command::Node(_)) {
        // Started with the handled signals held, so jemalloc's thread holds them too.
        tikv_jemalloc_ctl::background_thread::write(true).err()
    } else {
        // Only the daemon handles signals; the one-shot commands keep the defaults.
        let _ = sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&handled()), None);
        None
    };
    if let Err(e) = telemetry::init(cli.log_format, &cli.log) {
        eprintln!("culvert: {e:#}");
        return ExitCode::from(64);
    }
    if let Some(e) = purging {
        warn!(error = %e, "jemalloc's background thread did not start: freed memory goes back to the kernel only while the daemon allocates");
    }
    let result = match cli.command {
        Command::Node(args) => runtime().and_then(|rt| rt.block_on(node(*args, held))),
        Command::LocalCa { out } => culvert::identity::write_root(&out, "Culvert local CA"),
        Command::CniUninstall {
            cni_bin_dir,
            cni_conf_dir,
        } => culvert::cni::install::uninstall(&cni_conf_dir, &cni_bin_dir)
            .map(|changed| info!(files = ?changed, "culvert-cni uninstalled"))
            .map_err(Into::into),
        Command::Workloads(args) => print(cli::view(cli::View::Workloads, &args)),
        Command::Services(args) => print(cli::view(cli::View::Services, &args)),
        Command::Policies(args) => print(cli::view(cli::View::Policies, &args)),
        Command::Certs(args) => print(cli::view(cli::View::Certificates, &args)),
        Command::Connections(args) => print(cli::view(cli::View::Connections, &args)),
        Command::Log(args) => print(cli::log(&args)),
        Command::Check(args) => check(&args),
        Command::Ready { file } => match file.try_exists() {
            Ok(true) => Ok(()),
            Ok(false) => Err(anyhow::anyhow!("not ready: {} is absent", file.display())),
            Err(e) => Err(anyhow::Error::new(e).context(format!("reading {}", file.display()))),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a command that reads a node's admin API and prints its answer on stdout.
#[allow(clippy::print_stdout)]
fn print(command: impl Future<Output = anyhow::Result<String>>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    print!("{}", rt.block_on(command)?);
    Ok(())
}

/// Runs `culvert check`: prints the findings, and fails when any check did.
#[allow(clippy::print_stdout)]
fn check(args: &cli::CheckArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (out, passed) = rt.block_on(cli::check(args))?;
    print!("{out}");
    anyhow::ensure!(passed, "some checks failed");
    Ok(())
}

/// The signals `culvert node` handles.
fn handled() -> SigSet {
    let mut set = SigSet::empty();
    for signal in [Signal::SIGHUP, Signal::SIGTERM, Signal::SIGINT] {
        set.add(signal);
    }
    set
}

/// Blocks the handled signals on this thread; `false` if the kernel refused (nothing then
/// protects the start, which is logged once logging exists).
fn hold_signals() -> bool {
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&handled()), None).is_ok()
}

/// Runs `culvert node`: SIGHUP reloads the node file, SIGTERM or SIGINT drains and stops.
async fn node(args: NodeArgs, held: bool) -> anyhow::Result<()> {
    if !held {
        warn!("could not block signals during start; an early SIGHUP may stop the daemon");
    }
    // Handlers first, then let pending signals in: one that arrived while the daemon started
    // is neither fatal (SIGHUP's default action) nor lost.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    sigprocmask(SigmaskHow::SIG_UNBLOCK, Some(&handled()), None)?;
    let node = tokio::select! {
        node = culvert::app::start(args) => node?,
        _ = term.recv() => return Ok(()),
        _ = int.recv() => return Ok(()),
    };
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => if let Err(e) = node.reload().await {
                error!(error = format!("{e:#}"), "reload failed; keeping the previous configuration");
            },
        }
    }
    node.shutdown().await;
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
