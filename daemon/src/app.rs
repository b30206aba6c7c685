//! Composition root: builds every subsystem from the configuration and runs the node daemon
//! until SIGTERM.
//!
//! The only module that knows all the others.

mod pods;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{NodeArgs, NodeFile, RedirectChoice};
use crate::identity::{self, LocalCa};
use crate::proxy::Proxy;
use crate::redirect::{Backend, cni, install, netns};
use crate::state::Store;
use crate::tls;

/// Runs `culvert node` until SIGTERM or SIGINT, then drains.
pub async fn run(args: NodeArgs) -> anyhow::Result<()> {
    let file = NodeFile::load(&args.config)?;
    let backend = choose_backend(args.redirect);
    info!(config = %serde_json::to_string(&args).unwrap_or_default(), node = file.node,
        trust_domain = file.trust_domain, backend = backend.name(), "starting");

    let ca = LocalCa::load(
        &file.ca.cert,
        &file.ca.key,
        file.ca.roots.as_deref(),
        file.cert_ttl,
    )?;
    let certs = identity::Cache::new(Arc::new(ca), tls::provider());
    let state = Arc::new(Store::new(file.snapshot));
    let proxy = Arc::new(Proxy::new(state.clone(), certs.clone(), args.ports));
    let home = netns::home().context("opening the daemon's own network namespace")?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating the state directory {}", args.state_dir.display()))?;
    write_enrollment(&args.state_dir, &state)?;
    let pods = Arc::new(pods::Pods::new(pods::Deps {
        node: file.node.clone(),
        state: state.clone(),
        certs,
        proxy: proxy.clone(),
        backend,
        ports: args.ports,
        home,
        state_dir: args.state_dir.clone(),
        netns_dirs: args.netns_dirs.clone(),
    }));
    // Pods that run already (daemon restart, node reboot) are rewired before registrations are
    // served: until then the plugin fails closed for them.
    pods.reconcile().await;

    let stop_installer = CancellationToken::new();
    if args.cni.install {
        install_cni(&args, stop_installer.clone())?;
    }

    let listener = cni::bind(&args.cni_socket).with_context(|| {
        format!(
            "binding the registration socket {}",
            args.cni_socket.display()
        )
    })?;
    let stop_registrations = CancellationToken::new();
    tokio::spawn(cni::serve(
        listener,
        pods.clone(),
        stop_registrations.clone(),
    ));
    info!(socket = %args.cni_socket.display(), "ready");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                if reload(&args, &file.node, &file.trust_domain, &file.ca, &state) {
                    pods.reconcile().await;
                }
            }
        }
    }

    info!(timeout = ?args.drain_timeout, "draining");
    stop_registrations.cancel();
    stop_installer.cancel();
    let _ = std::fs::remove_file(&args.cni_socket);
    let left = proxy.drain(args.drain_timeout).await;
    if left > 0 {
        warn!(
            connections = left,
            "drain deadline passed; closing the rest"
        );
    }
    // Rules stay in the pods on purpose: with no daemon, captured traffic is refused, never
    // sent in plaintext. A restarted daemon (or pod deletion) takes over from here.
    info!("stopped");
    Ok(())
}

/// Re-reads the node file; returns whether the state changed. Workloads, services, enrollment
/// and the mesh-wide mode apply at once; the node name, trust domain and CA need a restart and
/// are refused here.
fn reload(
    args: &NodeArgs,
    node: &str,
    trust_domain: &str,
    ca: &crate::config::CaFiles,
    state: &Store,
) -> bool {
    let file = match NodeFile::load(&args.config) {
        Ok(file) => file,
        Err(e) => {
            error!(
                error = format!("{:#}", anyhow::Error::from(e)),
                "reload failed; keeping the previous configuration"
            );
            return false;
        }
    };
    let fixed = [
        ("node", file.node != node),
        ("trustDomain", file.trust_domain != trust_domain),
        ("ca", &file.ca != ca),
    ];
    if let Some((field, _)) = fixed.iter().find(|(_, changed)| *changed) {
        error!(
            field,
            "reload failed: changing this field needs a restart; keeping the previous configuration"
        );
        return false;
    }
    state.replace(file.snapshot);
    if let Err(e) = write_enrollment(&args.state_dir, state) {
        error!(
            error = format!("{e:#}"),
            "recording enrollment for the CNI plugin"
        );
    }
    info!("configuration reloaded");
    true
}

/// Installs the plugin binary and keeps its entry in the primary CNI configuration.
fn install_cni(args: &NodeArgs, stop: CancellationToken) -> anyhow::Result<()> {
    let source = match &args.cni.cni_plugin {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name(install::PLUGIN),
    };
    let installed = install::install_binary(&source, &args.cni.cni_bin_dir)?;
    info!(binary = %installed.display(), "culvert-cni installed");
    let entry = serde_json::json!({
        "type": install::PLUGIN,
        "socket": args.cni_socket,
        "stateFile": args.state_dir.join("enrollment.json"),
    });
    // Insert once now, so pods created right after start already get the plugin; then keep it.
    match install::insert(&args.cni.cni_conf_dir, &entry)? {
        install::Outcome::NoPrimary => warn!(dir = %args.cni.cni_conf_dir.display(),
            "no CNI configuration yet; culvert-cni goes in once the primary CNI writes one"),
        outcome => info!(?outcome, "culvert-cni is in the CNI configuration"),
    }
    tokio::spawn(install::watch(
        args.cni.cni_conf_dir.clone(),
        entry,
        Duration::from_secs(1),
        stop,
    ));
    Ok(())
}

/// Records which pods are enrolled, for the CNI plugin to fail closed on while the daemon is
/// away (restart, upgrade, crash, reboot).
fn write_enrollment(state_dir: &std::path::Path, state: &Store) -> anyhow::Result<()> {
    let path = state_dir.join("enrollment.json");
    let json =
        serde_json::to_vec_pretty(&state.snapshot().enrollment()).expect("enrollment serializes");
    write_atomically(&path, &json).with_context(|| format!("writing {}", path.display()))
}

/// Replaces `path` with `contents` so that readers see the old or the new file, never a mix.
fn write_atomically(path: &std::path::Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

fn choose_backend(choice: RedirectChoice) -> Backend {
    match choice {
        RedirectChoice::Nftables => Backend::Nftables,
        RedirectChoice::Iptables => Backend::Iptables,
        RedirectChoice::Auto => {
            let nft = std::process::Command::new("nft")
                .arg("--version")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
            if nft.is_ok_and(|s| s.success()) {
                Backend::Nftables
            } else {
                Backend::Iptables
            }
        }
    }
}
