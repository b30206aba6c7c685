//! `culvert`: the node daemon and its helper commands.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use culvert::config::NodeArgs;
use culvert::telemetry;

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
    /// Remove culvert-cni from the host's CNI configuration and plugin directory (undoing
    /// `culvert node --install-cni`).
    CniUninstall {
        #[arg(long, default_value = "/opt/cni/bin")]
        cni_bin_dir: PathBuf,
        #[arg(long, default_value = "/etc/cni/net.d")]
        cni_conf_dir: PathBuf,
    },
    /// Build two simulated nodes with pods in network namespaces, send traffic between them
    /// over mTLS, report what happened, and tear it all down. Needs root.
    Demo(culvert::demo::Args),
}

// Before logging exists, stderr is the only place to say why we cannot start.
#[allow(clippy::print_stderr)]
fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = telemetry::init(cli.log_format, &cli.log) {
        eprintln!("culvert: {e:#}");
        return ExitCode::from(64);
    }
    let result = match cli.command {
        Command::Node(args) => runtime().and_then(|rt| rt.block_on(culvert::app::run(*args))),
        Command::LocalCa { out } => culvert::identity::write_root(&out, "Culvert local CA"),
        Command::CniUninstall {
            cni_bin_dir,
            cni_conf_dir,
        } => culvert::redirect::install::uninstall(&cni_conf_dir, &cni_bin_dir)
            .map(|changed| tracing::info!(files = ?changed, "culvert-cni uninstalled"))
            .map_err(Into::into),
        Command::Demo(args) => culvert::demo::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
