//! Composition root: builds every subsystem from the configuration and runs the node daemon
//! until SIGTERM.
//!
//! The only module that knows all the others.

mod pods;

use std::sync::Arc;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{NodeArgs, NodeFile, RedirectChoice};
use crate::identity::{self, LocalCa};
use crate::proxy::Proxy;
use crate::redirect::{Backend, cni, netns};
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
    let pods = Arc::new(pods::Pods::new(
        file.node.clone(),
        state.clone(),
        certs,
        proxy.clone(),
        backend,
        args.ports,
        home,
    ));

    let listener = cni::bind(&args.cni_socket).with_context(|| {
        format!(
            "binding the registration socket {}",
            args.cni_socket.display()
        )
    })?;
    let stop_registrations = CancellationToken::new();
    tokio::spawn(cni::serve(listener, pods, stop_registrations.clone()));
    info!(socket = %args.cni_socket.display(), "ready");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(&args, &file.node, &file.trust_domain, &file.ca, &state),
        }
    }

    info!(timeout = ?args.drain_timeout, "draining");
    stop_registrations.cancel();
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

/// Re-reads the node file. Workloads, services and the mesh-wide mode apply at once; the node
/// name, trust domain and CA need a restart and are refused here.
fn reload(
    args: &NodeArgs,
    node: &str,
    trust_domain: &str,
    ca: &crate::config::CaFiles,
    state: &Store,
) {
    let file = match NodeFile::load(&args.config) {
        Ok(file) => file,
        Err(e) => {
            error!(
                error = format!("{:#}", anyhow::Error::from(e)),
                "reload failed; keeping the previous configuration"
            );
            return;
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
        return;
    }
    state.replace(file.snapshot);
    info!("configuration reloaded");
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
