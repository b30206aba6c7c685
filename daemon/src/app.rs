//! Composition root: builds every subsystem from the configuration, starts the node daemon and
//! hands back a [`Node`]: its bound addresses and the ways to reload and stop it.
//!
//! The only module that knows all the others. Owns no policy of its own and no signals: the
//! caller (`main.rs`, or a test) decides when to reload and when to stop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::admin::{self, Admin, Surface};
use crate::cni::{self, Registry, install};
use crate::config::{CaConfig, Discovery, NodeArgs, NodeFile};
use crate::discovery::{self, Settings, Watches};
use crate::identity::{self, IstioCa, LocalCa};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::redirect::{Backend, Capture, Netfilter};
use crate::state::Store;
use crate::tls;

/// A running node daemon.
pub struct Node {
    /// Where the admin API listens (the real port when the flag asked for port 0).
    pub admin_addr: SocketAddr,
    /// Where the probes listen.
    pub readiness_addr: SocketAddr,
    /// Where the metrics are scraped.
    pub metrics_addr: SocketAddr,
    args: NodeArgs,
    /// The node file as loaded at start; a reload may not change its fixed fields.
    file: NodeFile,
    state: Arc<Store>,
    registry: Arc<Registry>,
    proxy: Arc<Proxy>,
    admin: Arc<Admin>,
    /// With Kubernetes discovery: the node file's settings the API's snapshots are built with.
    settings: Option<watch::Sender<Settings>>,
    socket_file: cni::SocketFile,
    /// Stops the registration socket and the CNI installer's watch first, on shutdown.
    stop_registrations: CancellationToken,
    /// Stops everything else once connections have drained.
    stop: CancellationToken,
}

/// Starts `culvert node` with the real in-pod capture (nftables or iptables, per `--redirect`).
pub async fn start(args: NodeArgs) -> anyhow::Result<Node> {
    let backend = Backend::choose(args.redirect);
    let capture = Netfilter::new(backend, args.netns_dirs.clone(), args.probe_snat)
        .context("opening the daemon's own network namespace")?;
    start_with(args, Arc::new(capture)).await
}

/// Starts the node daemon with `capture` doing the in-pod wiring, and returns once it is ready:
/// discovery synced, running enrolled pods rewired, the registration socket open.
pub async fn start_with(args: NodeArgs, capture: Arc<dyn Capture>) -> anyhow::Result<Node> {
    if let Some(file) = &args.ready_file {
        remove_ready_file(file);
    }
    let mut file = NodeFile::load(&args.config, args.node_name.as_deref())?;
    match raise_fd_limit() {
        Ok(limit) => info!(limit, "file descriptor limit"),
        Err(e) => warn!(
            error = &e as &dyn std::error::Error,
            "raising the file descriptor limit"
        ),
    }
    info!(config = %serde_json::to_string(&args).unwrap_or_default(), node = file.node,
        trust_domain = file.trust_domain, discovery = ?file.discovery, backend = capture.name(),
        "starting");
    let stop = CancellationToken::new();
    // Connect first: a bad kubeconfig should stop the daemon before it touches anything.
    let client = match file.discovery {
        Discovery::Kubernetes => Some(discovery::client(args.kubeconfig.as_deref()).await?),
        Discovery::File => None,
    };

    let certs = match &file.ca {
        CaConfig::Local(ca) => {
            let ca = LocalCa::load(&ca.cert, &ca.key, ca.roots.as_deref(), file.cert_ttl)?;
            identity::Cache::new(Arc::new(ca), tls::provider())
        }
        CaConfig::Istio(ca) => {
            // The bundle comes first: it verifies the CA as well as the mesh's peers.
            info!(source = ?ca.roots, "reading the trust bundle");
            let bundle = identity::load_bundle(&ca.roots, client.as_ref()).await?;
            let roots = identity::Roots::new();
            roots
                .set(&bundle.roots)
                .context("installing the trust bundle")?;
            let source = IstioCa::new(ca, roots.clone(), file.cert_ttl)
                .with_context(|| format!("the CA at {}", ca.address))?;
            info!(
                address = ca.address,
                roots = bundle.roots.len(),
                "certificates from an Istio CA"
            );
            let certs =
                identity::Cache::with_roots(Arc::new(source), tls::provider(), roots.clone());
            tokio::spawn(identity::follow_bundle(
                ca.roots.clone(),
                client.clone(),
                roots,
                certs.clone(),
                bundle,
                stop.clone(),
            ));
            certs
        }
    };
    log_policy_notes(&file.snapshot.policies);
    let state = Arc::new(Store::new(std::mem::take(&mut file.snapshot)));
    let ports = args.ports.into();
    let metrics = Arc::new(Metrics::new());
    certs.count_into(metrics.certificates.clone());
    let proxy = Arc::new(Proxy::new(
        state.clone(),
        certs.clone(),
        ports,
        file.key_exchange,
        crate::proxy::Limits {
            connections: args.hbone_max_connections,
            connections_per_peer: args.hbone_max_connections_per_peer,
            streams: args.hbone_max_streams,
            streams_per_peer: args.hbone_max_streams_per_peer,
        },
        metrics.tcp.clone(),
    ));
    tokio::spawn(proxy.clone().follow_policies(stop.clone()));
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating the state directory {}", args.state_dir.display()))?;
    let registry = Arc::new(Registry::new(cni::Deps {
        node: file.node.clone(),
        state: state.clone(),
        certs,
        proxy: proxy.clone(),
        capture,
        ports,
        state_dir: args.state_dir.clone(),
        metrics: metrics.pods.clone(),
    }));
    let cni_conf_dir = args.cni.install.then(|| args.cni.cni_conf_dir.clone());
    let admin = Arc::new(Admin::new(
        state.clone(),
        registry.clone(),
        metrics.clone(),
        cni_conf_dir,
    ));
    let admin_addr = admin::serve(admin.clone(), args.admin_addr, Surface::Admin, stop.clone())
        .await
        .with_context(|| format!("binding the admin API on {}", args.admin_addr))?;
    let readiness_addr = admin::serve(
        admin.clone(),
        args.readiness_addr,
        Surface::Probes,
        stop.clone(),
    )
    .await
    .with_context(|| format!("binding the probes on {}", args.readiness_addr))?;
    let metrics_addr = admin::serve(
        admin.clone(),
        args.metrics_addr,
        Surface::Metrics,
        stop.clone(),
    )
    .await
    .with_context(|| format!("binding the metrics on {}", args.metrics_addr))?;

    // Cancelled when the daemon starts draining: registrations, healing and wiring stop, so a
    // draining daemon never wires a pod its successor has taken over.
    let stop_registrations = CancellationToken::new();
    let mut settings = None;
    if let Some(client) = client {
        let (tx, rx) = watch::channel(Settings {
            trust_domain: file.trust_domain.clone(),
            peer_authentication: state.snapshot().peer_authentication,
            policy: file.policy.clone(),
            file_policies: file.policy_objects.clone(),
        });
        // Until the first full list, the daemon knows no enrollment: registrations wait (the
        // plugin fails closed from the last recorded state) rather than admit pods unwired.
        let watches = Watches::start(
            &client,
            &file.trust_domain,
            &file.enrollment_label,
            &file.node,
            &metrics.discovery,
            &stop,
        );
        info!("waiting for the Kubernetes API's first lists");
        watches.synced(&client).await;
        let first = rx.borrow().clone();
        state.replace(watches.snapshot(&first).await);
        info!(
            workloads = state.snapshot().workloads().count(),
            "discovery synced"
        );
        tokio::spawn(follow(
            watches,
            rx,
            state.clone(),
            registry.clone(),
            args.state_dir.clone(),
            stop_registrations.clone(),
        ));
        settings = Some(tx);
    }
    record_enrollment(&args.state_dir, &state)?;
    // Pods that run already (daemon restart, node reboot) are rewired before registrations are
    // served: until then the plugin fails closed for them.
    rewire(&registry).await;

    tokio::spawn(
        registry
            .clone()
            .keep_healed(args.heal_interval, stop_registrations.clone()),
    );
    if args.cni.install {
        install_cni(&args, stop_registrations.clone())?;
    }
    let (listener, socket_file) = cni::bind(&args.cni_socket).with_context(|| {
        format!(
            "binding the registration socket {}",
            args.cni_socket.display()
        )
    })?;
    tokio::spawn(cni::serve(
        listener,
        registry.clone(),
        metrics.pods.clone(),
        stop_registrations.clone(),
    ));
    admin.set_ready(true);
    if let Some(file) = &args.ready_file {
        std::fs::write(file, b"ready\n")
            .with_context(|| format!("writing the ready file {}", file.display()))?;
    }
    info!(socket = %args.cni_socket.display(), "ready");
    Ok(Node {
        admin_addr,
        readiness_addr,
        metrics_addr,
        args,
        file,
        state,
        registry,
        proxy,
        admin,
        settings,
        socket_file,
        stop_registrations,
        stop,
    })
}

impl Node {
    /// Re-reads the node file and applies it. A broken file, or one that changes what needs a
    /// restart (node name, trust domain, enrollment label, CA, discovery source), is refused
    /// and the running configuration stays.
    pub async fn reload(&self) -> anyhow::Result<()> {
        let new = NodeFile::load(&self.args.config, self.args.node_name.as_deref())?;
        let current = &self.file;
        let fixed = [
            ("node", new.node != current.node),
            ("trustDomain", new.trust_domain != current.trust_domain),
            (
                "enrollmentLabel",
                new.enrollment_label != current.enrollment_label,
            ),
            ("ca", new.ca != current.ca),
            ("discovery", new.discovery != current.discovery),
            ("keyExchange", new.key_exchange != current.key_exchange),
        ];
        if let Some((field, _)) = fixed.iter().find(|(_, changed)| *changed) {
            bail!("changing {field} needs a restart");
        }
        log_policy_notes(&new.snapshot.policies);
        match &self.settings {
            None => {
                self.state.replace(new.snapshot);
                if let Err(e) = record_enrollment(&self.args.state_dir, &self.state) {
                    error!(
                        error = format!("{e:#}"),
                        "recording enrollment for the CNI plugin"
                    );
                }
                self.registry.reconcile().await;
            }
            Some(settings) => settings.send_modify(|s| {
                s.peer_authentication = new.snapshot.peer_authentication;
                s.policy = new.policy.clone();
                s.file_policies = new.policy_objects.clone();
            }),
        }
        info!("configuration reloaded");
        Ok(())
    }

    /// The wired pods.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The data plane, shared by every wired pod.
    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// The node's current view of the cluster.
    pub fn state(&self) -> &Arc<Store> {
        &self.state
    }

    /// Stops taking registrations and connections, lets open connections finish for up to
    /// `--drain-timeout`, then stops everything. Returns how many connections were still open
    /// at the deadline.
    ///
    /// Rules stay in the pods on purpose: with no daemon, captured traffic is refused, never
    /// sent in plaintext. A restarted daemon (or pod deletion) takes over from there.
    pub async fn shutdown(self) -> usize {
        info!(timeout = ?self.args.drain_timeout, "draining");
        self.admin.set_ready(false);
        if let Some(file) = &self.args.ready_file {
            remove_ready_file(file);
        }
        self.stop_registrations.cancel();
        self.socket_file.remove(&self.args.cni_socket);
        let left = self.proxy.drain(self.args.drain_timeout).await;
        if left > 0 {
            warn!(
                connections = left,
                "drain deadline passed; closing the rest"
            );
        }
        self.stop.cancel();
        info!("stopped");
        left
    }
}

/// Rebuilds the state whenever the API's objects or the node file's settings change, and
/// rewires when this node's set of enrolled pods changes. Once `draining` is cancelled it only
/// rebuilds the state (policy changes still reach the connections it carries): the enrollment
/// file and the pods' wiring belong to the daemon that replaces it.
async fn follow(
    watches: Watches,
    mut settings: watch::Receiver<Settings>,
    state: Arc<Store>,
    registry: Arc<Registry>,
    state_dir: PathBuf,
    draining: CancellationToken,
) {
    let mut last = registry.local_enrollment();
    let mut recorded = state.snapshot().enrollment();
    loop {
        tokio::select! {
            () = watches.changed() => {}
            changed = settings.changed() => if changed.is_err() { return },
        }
        // Events come in bursts (a relist, a rollout): let a burst settle into one rebuild.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let current = settings.borrow_and_update().clone();
        state.replace(watches.snapshot(&current).await);
        if draining.is_cancelled() {
            continue;
        }
        // Most events (IPs, endpoints) leave enrollment as it was: rewrite the file only when
        // it changed.
        let enrollment = state.snapshot().enrollment();
        if enrollment != recorded {
            match cni::write_enrollment(&state_dir, &enrollment) {
                Ok(()) => recorded = enrollment,
                Err(e) => error!(
                    error = &e as &dyn std::error::Error,
                    "recording enrollment for the CNI plugin"
                ),
            }
        }
        let local = registry.local_enrollment();
        if local != last {
            registry.reconcile().await;
            last = local;
        }
    }
}

/// How long a starting daemon retries pods it could not rewire (the CA not up yet, say) before
/// it goes ready anyway. In a surge update the old daemon serves them meanwhile; past this, one
/// pod that cannot be served no longer holds up every new pod of the node. The failed ones are
/// tried again every heal interval.
const REWIRE_WAIT: Duration = Duration::from_secs(60);

/// Rewires the node's running enrolled pods, retrying failures for up to [`REWIRE_WAIT`].
async fn rewire(registry: &Registry) {
    let deadline = tokio::time::Instant::now() + REWIRE_WAIT;
    let mut pause = Duration::from_millis(250);
    loop {
        let failed = registry.reconcile().await;
        if failed == 0 {
            return;
        }
        if tokio::time::Instant::now() + pause > deadline {
            warn!(
                pods = failed,
                "going ready with pods not rewired yet; they are retried and fail closed meanwhile"
            );
            return;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(5));
    }
}

fn record_enrollment(state_dir: &std::path::Path, state: &Store) -> anyhow::Result<()> {
    cni::write_enrollment(state_dir, &state.snapshot().enrollment())
        .with_context(|| format!("writing {}", state_dir.join(cni::ENROLLMENT_FILE).display()))
}

/// Raises the soft limit on open files to the hard limit: every tunnel holds sockets, and the
/// default soft limit (often 1024) would cap a node long before its memory does. Returns the
/// limit now in force.
fn raise_fd_limit() -> nix::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard.max(soft))
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
        "stateFile": args.state_dir.join(cni::ENROLLMENT_FILE),
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

/// One warning per policy, or part of one, that is not enforced as written.
fn log_policy_notes(policies: &crate::policy::Policies) {
    for (policy, note) in policies.notes() {
        warn!(policy, note, "policy not enforced as written");
    }
}

/// Removes the ready file: at start (a restarted container finds its predecessor's in the same
/// pod's volume) and when draining. Failing to is logged, not fatal: the probe then keeps
/// saying ready, as the HTTP one would have.
fn remove_ready_file(file: &std::path::Path) {
    match std::fs::remove_file(file) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => warn!(file = %file.display(), error = %e, "could not remove the ready file"),
    }
}
