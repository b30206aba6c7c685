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

use crate::admin::Admin;
use crate::config::{Discovery, NodeArgs, NodeFile, RedirectChoice};
use crate::discovery::{self, Settings};
use crate::identity::{self, LocalCa};
use crate::proxy::Proxy;
use crate::redirect::{Backend, cni, install, netns};
use crate::state::Store;
use crate::tls;

/// Runs `culvert node` until SIGTERM or SIGINT, then drains.
pub async fn run(args: NodeArgs) -> anyhow::Result<()> {
    let mut file = NodeFile::load(&args.config, args.node_name.as_deref())?;
    let backend = choose_backend(args.redirect);
    info!(config = %serde_json::to_string(&args).unwrap_or_default(), node = file.node,
        trust_domain = file.trust_domain, discovery = ?file.discovery, backend = backend.name(),
        "starting");
    let stop = CancellationToken::new();
    // Connect first: a bad kubeconfig should stop the daemon before it touches anything.
    let client = match file.discovery {
        Discovery::Kubernetes => Some(kube_client(&args).await?),
        Discovery::File => None,
    };

    let ca = LocalCa::load(
        &file.ca.cert,
        &file.ca.key,
        file.ca.roots.as_deref(),
        file.cert_ttl,
    )?;
    let certs = identity::Cache::new(Arc::new(ca), tls::provider());
    let state = Arc::new(Store::new(std::mem::take(&mut file.snapshot)));
    let proxy = Arc::new(Proxy::new(state.clone(), certs.clone(), args.ports));
    let home = netns::home().context("opening the daemon's own network namespace")?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating the state directory {}", args.state_dir.display()))?;
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
    let admin = Arc::new(Admin {
        state: state.clone(),
        pods: Box::new({
            let pods = pods.clone();
            move || match cni::Registry::list(&*pods) {
                culvert_cni_proto::Response::Pods { pods } => serde_json::json!(pods),
                _ => serde_json::Value::Null,
            }
        }),
        ready: false.into(),
    });
    crate::admin::serve(admin.clone(), args.admin_addr, false, stop.clone())
        .await
        .with_context(|| format!("binding the admin API on {}", args.admin_addr))?;
    crate::admin::serve(admin.clone(), args.readiness_addr, true, stop.clone())
        .await
        .with_context(|| format!("binding the probes on {}", args.readiness_addr))?;

    let settings = Settings {
        trust_domain: file.trust_domain.clone(),
        peer_authentication: state.snapshot().peer_authentication,
    };
    let (settings_tx, settings_rx) = tokio::sync::watch::channel(settings);
    if let Some(client) = client {
        // Until the first full list, the daemon knows no enrollment: registrations wait (the
        // plugin fails closed from the last recorded state) rather than admit pods unwired.
        let watches = discovery::Discovery::start(&client, &stop);
        info!("waiting for the Kubernetes API's first lists");
        watches.synced().await;
        let settings = settings_rx.borrow().clone();
        match watches.snapshot(&settings) {
            Ok(snapshot) => state.replace(snapshot),
            Err(e) => warn!(error = %e, "first snapshot from the API refused; starting empty"),
        }
        info!(
            workloads = state.snapshot().workloads().count(),
            "discovery synced"
        );
        tokio::spawn(follow(
            watches,
            settings_rx,
            state.clone(),
            pods.clone(),
            args.state_dir.clone(),
        ));
    }
    write_enrollment(&args.state_dir, &state.snapshot().enrollment())?;
    // Pods that run already (daemon restart, node reboot) are rewired before registrations are
    // served: until then the plugin fails closed for them.
    pods.reconcile().await;

    let stop_installer = CancellationToken::new();
    if args.cni.install {
        install_cni(&args, stop_installer.clone())?;
    }

    let (listener, socket_file) = cni::bind(&args.cni_socket).with_context(|| {
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
    admin.set_ready(true);
    info!(socket = %args.cni_socket.display(), "ready");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                let Some(new) = reload(&args, &file) else { continue };
                match file.discovery {
                    Discovery::File => {
                        state.replace(new.snapshot);
                        if let Err(e) = write_enrollment(&args.state_dir, &state.snapshot().enrollment()) {
                            error!(error = format!("{e:#}"), "recording enrollment for the CNI plugin");
                        }
                        pods.reconcile().await;
                    }
                    Discovery::Kubernetes => settings_tx.send_modify(|s| {
                        s.peer_authentication = new.snapshot.peer_authentication;
                    }),
                }
                info!("configuration reloaded");
            }
        }
    }

    info!(timeout = ?args.drain_timeout, "draining");
    admin.set_ready(false);
    stop_registrations.cancel();
    stop_installer.cancel();
    socket_file.remove(&args.cni_socket);
    let left = proxy.drain(args.drain_timeout).await;
    if left > 0 {
        warn!(
            connections = left,
            "drain deadline passed; closing the rest"
        );
    }
    // Rules stay in the pods on purpose: with no daemon, captured traffic is refused, never
    // sent in plaintext. A restarted daemon (or pod deletion) takes over from here.
    stop.cancel();
    info!("stopped");
    Ok(())
}

async fn kube_client(args: &NodeArgs) -> anyhow::Result<kube::Client> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("finding the Kubernetes API (in-cluster, $KUBECONFIG or ~/.kube/config)")?,
    };
    info!(api = %config.cluster_url, "Kubernetes API");
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// Rebuilds the state whenever the API's objects or the node file's settings change, and
/// rewires when this node's set of enrolled pods changes.
async fn follow(
    watches: discovery::Discovery,
    mut settings: tokio::sync::watch::Receiver<Settings>,
    state: Arc<Store>,
    pods: Arc<pods::Pods>,
    state_dir: std::path::PathBuf,
) {
    let mut last = pods.local_enrollment();
    let mut recorded = state.snapshot().enrollment();
    loop {
        tokio::select! {
            () = watches.changed() => {}
            changed = settings.changed() => if changed.is_err() { return },
        }
        // Events come in bursts (a relist, a rollout): let a burst settle into one rebuild.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let current = settings.borrow_and_update().clone();
        match watches.snapshot(&current) {
            Ok(snapshot) => state.replace(snapshot),
            Err(e) => {
                warn!(error = %e, "state from the API refused; keeping the previous state");
                continue;
            }
        }
        // Most events (IPs, endpoints) leave enrollment as it was: rewrite the file only when
        // it changed.
        let enrollment = state.snapshot().enrollment();
        if enrollment != recorded {
            match write_enrollment(&state_dir, &enrollment) {
                Ok(()) => recorded = enrollment,
                Err(e) => error!(
                    error = format!("{e:#}"),
                    "recording enrollment for the CNI plugin"
                ),
            }
        }
        let local = pods.local_enrollment();
        if local != last {
            pods.reconcile().await;
            last = local;
        }
    }
}

/// Re-reads the node file; `None` (logged) when it is broken or changes what needs a restart:
/// the node name, trust domain, CA or discovery source.
fn reload(args: &NodeArgs, current: &NodeFile) -> Option<NodeFile> {
    let file = match NodeFile::load(&args.config, args.node_name.as_deref()) {
        Ok(file) => file,
        Err(e) => {
            error!(
                error = format!("{:#}", anyhow::Error::from(e)),
                "reload failed; keeping the previous configuration"
            );
            return None;
        }
    };
    let fixed = [
        ("node", file.node != current.node),
        ("trustDomain", file.trust_domain != current.trust_domain),
        ("ca", file.ca != current.ca),
        ("discovery", file.discovery != current.discovery),
    ];
    if let Some((field, _)) = fixed.iter().find(|(_, changed)| *changed) {
        error!(
            field,
            "reload failed: changing this field needs a restart; keeping the previous configuration"
        );
        return None;
    }
    Some(file)
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
fn write_enrollment(
    state_dir: &std::path::Path,
    enrollment: &culvert_cni_proto::Enrollment,
) -> anyhow::Result<()> {
    let path = state_dir.join("enrollment.json");
    let json = serde_json::to_vec_pretty(enrollment).expect("enrollment serializes");
    write_atomically(&path, &json).with_context(|| format!("writing {}", path.display()))
}

/// Replaces `path` with `contents` so that readers see the old or the new file, never a mix.
/// The temporary file is this process's own: during a surge two daemons write the same files.
fn write_atomically(path: &std::path::Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
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
