//! The pod registry: turns registrations into wired pods (certificate, listeners, rules), keeps
//! them in step with enrollment, and remembers them across restarts.
//!
//! Everything it does inside a pod's namespace goes through [`Capture`], so its decisions are
//! unit-tested without root (`tests` below, on the loopback stand-in).

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use culvert_cni_proto::{AddPod, CheckPod, DelPod, Gc, PodRef, PodStatus, Response};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::server::Handler;
use crate::config::Ports;
use crate::identity::{self, Id};
use crate::proxy::{Pod, Proxy};
use crate::redirect::{Capture, Missing, Sockets, rules};
use crate::state::Store;

/// File in the state directory listing wired sandboxes, so a restarted daemon keeps the
/// runtime's container ids.
const PODS_FILE: &str = "pods.json";

/// What the registry is built from.
pub struct Deps {
    /// The node this daemon serves: pods scheduled elsewhere are refused.
    pub node: String,
    pub state: Arc<Store>,
    pub certs: Arc<identity::Cache>,
    pub proxy: Arc<Proxy>,
    pub capture: Arc<dyn Capture>,
    pub ports: Ports,
    /// Where `pods.json` is kept.
    pub state_dir: PathBuf,
    pub metrics: Arc<crate::metrics::Pods>,
}

/// Why a pod could not be wired or checked; the registrar receives the whole chain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("pod {pod} is in an enrolled namespace but unknown to this node")]
    Unknown { pod: String },
    #[error("pod {pod} is on node {on:?}, this daemon serves {this:?}")]
    OtherNode {
        pod: String,
        on: String,
        this: String,
    },
    #[error("getting a certificate for {id}")]
    Certificate {
        id: Id,
        #[source]
        source: identity::Error,
    },
    #[error("opening network namespace {path}")]
    Netns {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("reading the addresses in network namespace {path}")]
    Addresses {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{ip} is not an address in network namespace {path}")]
    NotInNetns { ip: IpAddr, path: String },
    #[error("{ip} belongs to pod {owner}")]
    Claimed { ip: IpAddr, owner: String },
    #[error("network namespace {path} is wired for pod {other}")]
    NetnsInUse { path: String, other: String },
    #[error("binding the pod's listeners")]
    Listen(#[source] io::Error),
    #[error("installing redirection rules")]
    Rules(#[source] rules::Error),
    #[error("building the pod's TLS config")]
    Tls(#[source] rustls::Error),
    #[error("pod {pod} is enrolled but not wired")]
    NotWired { pod: String },
    #[error("pod {pod}")]
    Check {
        pod: String,
        #[source]
        source: Missing,
    },
    #[error("the wiring task for pod {pod} died")]
    Task {
        pod: String,
        #[source]
        source: tokio::task::JoinError,
    },
}

impl Error {
    /// A closed name for the error, for a metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unknown { .. } => "unknown_pod",
            Self::OtherNode { .. } => "other_node",
            Self::Certificate { .. } => "certificate",
            Self::Netns { .. } => "netns",
            Self::Addresses { .. } => "addresses",
            Self::NotInNetns { .. } => "not_in_netns",
            Self::Claimed { .. } => "address_claimed",
            Self::NetnsInUse { .. } => "netns_in_use",
            Self::Listen(_) => "listen",
            Self::Rules(_) => "rules",
            Self::Tls(_) => "tls",
            Self::NotWired { .. } => "not_wired",
            Self::Check { .. } => "check",
            Self::Task { .. } => "task",
        }
    }
}

/// The wired pods of this node.
pub struct Registry {
    deps: Deps,
    /// Wired pods by container id.
    wired: Mutex<HashMap<String, Wired>>,
    /// Changes are applied one at a time: wiring is quick, and ordering an ADD and a DEL of the
    /// same sandbox matters more than parallelism.
    serial: tokio::sync::Mutex<()>,
    /// Rule sets found missing in a wired pod and put back, since start.
    restored: std::sync::atomic::AtomicU64,
    /// Enrolled pods running here that the last [`Self::reconcile`] failed to wire (no
    /// certificate yet, say): [`Self::keep_healed`] tries them again.
    unwired: std::sync::atomic::AtomicUsize,
    /// The addresses the host's probe rule was last given (`None` before the first time, so
    /// a start clears whatever a previous daemon left).
    probed: Mutex<Option<Vec<IpAddr>>>,
}

/// A wired sandbox as persisted in [`PODS_FILE`].
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Sandbox {
    container_id: String,
    netns: String,
    pod: PodRef,
    ips: Vec<IpAddr>,
}

struct Wired {
    pod: Arc<Pod>,
    sandbox: Sandbox,
    stop: CancellationToken,
}

impl Registry {
    pub fn new(deps: Deps) -> Self {
        Self {
            deps,
            wired: Mutex::default(),
            serial: tokio::sync::Mutex::default(),
            restored: Default::default(),
            unwired: Default::default(),
            probed: Mutex::default(),
        }
    }

    /// Brings the wired pods in line with enrollment: releases pods no longer enrolled, and wires
    /// enrolled pods of this node that run but are not wired (found by IP among the host's
    /// network namespaces). Run at start, before registrations are served, after every change
    /// of state, and again while a pod could not be wired. Returns how many enrolled pods run
    /// here unwired because wiring them failed.
    pub async fn reconcile(&self) -> usize {
        let _serial = self.serial.lock().await;
        let snapshot = self.deps.state.snapshot();
        let released: Vec<Wired> = {
            let mut wired = self.wired.lock().expect("pods lock poisoned");
            let gone: Vec<String> = wired
                .iter()
                .filter(|(_, w)| {
                    !snapshot
                        .workload(&w.pod.namespace, &w.pod.name)
                        .is_some_and(|wl| snapshot.enrolled(wl))
                })
                .map(|(id, _)| id.clone())
                .collect();
            gone.iter().filter_map(|id| wired.remove(id)).collect()
        };
        for w in released {
            self.unwire(w).await;
        }
        // A pod whose identity changed (its service account, in a reload) is served under the
        // new one, without a moment unredirected.
        let renamed: Vec<(String, Id)> = {
            let wired = self.wired.lock().expect("pods lock poisoned");
            wired
                .iter()
                .filter_map(|(id, w)| {
                    let now = snapshot.workload(&w.pod.namespace, &w.pod.name)?;
                    (now.identity != w.pod.identity).then(|| (id.clone(), now.identity.clone()))
                })
                .collect()
        };
        for (id, identity) in renamed {
            if let Err(e) = self.reidentify(&id, identity).await {
                warn!(
                    container_id = id,
                    error = &e as &dyn std::error::Error,
                    "serving a pod under its new identity failed; it keeps the old one"
                );
            }
        }

        let wanted: Vec<_> = snapshot
            .workloads()
            .filter(|w| {
                snapshot.enrolled(w)
                    && *w.node == *self.deps.node
                    && !self.is_wired(&w.namespace, &w.name)
            })
            .cloned()
            .collect();
        let mut failed = 0;
        if !wanted.is_empty() {
            let capture = self.deps.capture.clone();
            let found = tokio::task::spawn_blocking(move || capture.scan())
                .await
                .unwrap_or_default();
            let known = self.read_sandboxes();
            for w in wanted {
                let Some((path, ips)) = found
                    .iter()
                    .find(|(_, ips)| ips.iter().any(|ip| w.ips.contains(ip)))
                else {
                    info!(pod = %format!("{}/{}", w.namespace, w.name), "enrolled pod not running here yet");
                    continue;
                };
                let netns = path.display().to_string();
                let pod = PodRef {
                    namespace: w.namespace.to_string(),
                    name: w.name.to_string(),
                    uid: None,
                };
                // Keep the runtime's container id when this sandbox was wired before.
                let container_id = known
                    .iter()
                    .find(|s| {
                        s.pod.namespace == pod.namespace
                            && s.pod.name == pod.name
                            && self.deps.capture.same_netns(Path::new(&s.netns), path)
                    })
                    .map_or_else(
                        || format!("reconciled.{}.{}", pod.namespace, pod.name),
                        |s| s.container_id.clone(),
                    );
                let add = AddPod {
                    container_id,
                    netns,
                    ifname: "eth0".into(),
                    pod,
                    ips: ips.clone(),
                };
                if let Err(e) = self.add_locked(add).await {
                    failed += 1;
                    warn!(pod = %format!("{}/{}", w.namespace, w.name), error = &e as &dyn std::error::Error, "rewiring failed");
                }
            }
        }
        self.persist().await;
        self.unwired
            .store(failed, std::sync::atomic::Ordering::Relaxed);
        failed
    }

    /// Puts back the redirection rules of every wired pod whose rules have gone (someone ran
    /// `nft flush ruleset` in the pod, or another agent rewrote its tables): until then the
    /// pod's traffic would leave unredirected. Returns how many were restored.
    pub async fn heal(&self) -> usize {
        // Checks run without the registration lock, so a pass over many pods never holds up an
        // ADD; a pod found bare is restored under the lock, and only if it is still wired.
        let pods: Vec<Arc<Pod>> = {
            let wired = self.wired.lock().expect("pods lock poisoned");
            wired.values().map(|w| w.pod.clone()).collect()
        };
        let (capture, ports) = (self.deps.capture.clone(), self.deps.ports);
        let bare = tokio::task::spawn_blocking(move || {
            pods.into_iter()
                .filter(|pod| match capture.check(&pod.sockets, ports) {
                    Ok(()) => false,
                    Err(Missing::Rules) => true,
                    Err(e) => {
                        warn!(
                            pod = pod.label(),
                            error = &e as &dyn std::error::Error,
                            "checking a wired pod"
                        );
                        false
                    }
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let mut restored = 0;
        for pod in bare {
            let _serial = self.serial.lock().await;
            let still_wired = self
                .wired
                .lock()
                .expect("pods lock poisoned")
                .values()
                .any(|w| Arc::ptr_eq(&w.pod, &pod));
            if !still_wired {
                continue;
            }
            let spec = rules::Spec {
                ports: self.deps.ports,
                pod_ips: pod.ips.clone(),
            };
            let pod_ref = PodRef {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                uid: None,
            };
            match self.apply_rules(pod.sockets.clone(), spec, &pod_ref).await {
                Ok(()) => {
                    restored += 1;
                    warn!(
                        pod = pod.label(),
                        "redirection rules were missing; restored"
                    );
                }
                Err(e) => warn!(
                    pod = pod.label(),
                    error = &e as &dyn std::error::Error,
                    "redirection rules are missing and could not be restored"
                ),
            }
        }
        self.restored
            .fetch_add(restored as u64, std::sync::atomic::Ordering::Relaxed);
        self.deps.metrics.restored(restored as u64);
        restored
    }

    /// Runs [`Self::heal`] every `interval` until `stop`.
    pub async fn keep_healed(self: Arc<Self>, interval: Duration, stop: CancellationToken) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    self.heal().await;
                    // Until then such a pod fails closed: its rules lead nowhere.
                    if self.unwired.load(std::sync::atomic::Ordering::Relaxed) > 0 {
                        self.reconcile().await;
                    }
                }
                () = stop.cancelled() => return,
            }
        }
    }

    /// Rule sets restored by [`Self::heal`] since start.
    pub fn rules_restored(&self) -> u64 {
        self.restored.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Serves the pod wired under `id` as `identity` from now on: a certificate for it, new
    /// listeners next to the old ones (`SO_REUSEPORT`), then the old listeners close and the
    /// old identity's HBONE connections get GOAWAY. The rules never leave the pod.
    async fn reidentify(&self, id: &str, identity: Id) -> Result<(), Error> {
        let Some((old, sandbox)) = self.with_wired(id, |w| (w.pod.clone(), w.sandbox.clone()))
        else {
            return Ok(());
        };
        self.deps
            .certs
            .ensure(&identity)
            .await
            .map_err(|source| Error::Certificate {
                id: identity.clone(),
                source,
            })?;
        let listeners = old.sockets.listen(self.deps.ports).map_err(Error::Listen)?;
        let pod = Arc::new(Pod::new(
            old.namespace.clone(),
            old.name.clone(),
            identity,
            old.ips.clone(),
            old.sockets.clone(),
        ));
        let stop = CancellationToken::new();
        self.deps
            .proxy
            .serve_pod(pod.clone(), listeners, &stop)
            .map_err(Error::Tls)?;
        info!(pod = pod.label(), from = %old.identity, to = %pod.identity, "pod identity changed");
        let replaced = self
            .wired
            .lock()
            .expect("pods lock poisoned")
            .insert(id.to_owned(), Wired { pod, sandbox, stop });
        if let Some(replaced) = replaced {
            replaced.stop.cancel();
            self.release_if_unused(&replaced.pod.identity);
        }
        Ok(())
    }

    /// Gives up `identity`'s certificate when no wired pod uses it any more.
    fn release_if_unused(&self, identity: &Id) {
        let still_used = self
            .wired
            .lock()
            .expect("pods lock poisoned")
            .values()
            .any(|w| &w.pod.identity == identity);
        if !still_used {
            self.deps.certs.release(identity);
        }
    }

    /// This node's enrolled pods and their addresses: when it changes, [`Self::reconcile`] has
    /// work to do.
    pub fn local_enrollment(&self) -> Vec<(String, String, Vec<IpAddr>)> {
        let snapshot = self.deps.state.snapshot();
        let mut local: Vec<_> = snapshot
            .workloads()
            .filter(|w| snapshot.enrolled(w) && *w.node == *self.deps.node)
            .map(|w| (w.namespace.to_string(), w.name.to_string(), w.ips.to_vec()))
            .collect();
        local.sort();
        local
    }

    /// Wires the pod if it is enrolled (`Ok(true)`); `Ok(false)` leaves it alone. Answers only
    /// once listeners and rules are in place.
    pub async fn add(&self, req: AddPod) -> Result<bool, Error> {
        let _serial = self.serial.lock().await;
        let enrolled = self.add_locked(req).await?;
        self.persist().await;
        Ok(enrolled)
    }

    async fn add_locked(&self, req: AddPod) -> Result<bool, Error> {
        let snapshot = self.deps.state.snapshot();
        // By name only: an identity is never taken from whoever holds the request's IPs.
        let workload = snapshot.workload(&req.pod.namespace, &req.pod.name);
        let workload = match workload {
            Some(w) if snapshot.enrolled(w) => w.clone(),
            None if snapshot
                .enrolled_namespaces
                .contains(req.pod.namespace.as_str()) =>
            {
                // Enrolled namespace, but no identity known for the pod: refusing keeps it from
                // starting unredirected; the runtime retries once the node knows it.
                return Err(Error::Unknown {
                    pod: label(&req.pod),
                });
            }
            _ => {
                info!(pod = %label(&req.pod), "pod not enrolled; left alone");
                return Ok(false);
            }
        };
        if *workload.node != *self.deps.node {
            return Err(Error::OtherNode {
                pod: label(&req.pod),
                on: workload.node.to_string(),
                this: self.deps.node.clone(),
            });
        }
        let ips = if req.ips.is_empty() {
            workload.ips.to_vec()
        } else {
            req.ips.clone()
        };
        let spec = rules::Spec {
            ports: self.deps.ports,
            pod_ips: ips.clone(),
        };

        let netns = Path::new(&req.netns);
        if let Some(id) = self.same_sandbox(&req.container_id, &req.pod, netns) {
            // A repeated ADD, or the runtime's id for a pod rewired at start: keep the
            // listeners, make sure the rules are (still) there, track it under this id.
            let sockets = self
                .with_wired(&id, |w| w.pod.sockets.clone())
                .expect("found above");
            self.apply_rules(sockets, spec, &req.pod).await?;
            self.rename(&id, &req.container_id);
            return Ok(true);
        }

        // A new sandbox. Everything is checked and in place before any older sandbox of the
        // pod is let go: a refused request leaves the running pod wired as it was.
        if let Some(ip) = req.ips.iter().find_map(|ip| {
            let owner = snapshot.workload_by_ip(*ip)?;
            let other = *owner.namespace != *req.pod.namespace || *owner.name != *req.pod.name;
            other.then(|| (*ip, format!("{}/{}", owner.namespace, owner.name)))
        }) {
            return Err(Error::Claimed {
                ip: ip.0,
                owner: ip.1,
            });
        }
        if let Some(other) = self.wired_in(netns) {
            return Err(Error::NetnsInUse {
                path: req.netns.clone(),
                other,
            });
        }
        let sockets = self
            .deps
            .capture
            .open(netns, &ips)
            .map_err(|source| Error::Netns {
                path: req.netns.clone(),
                source,
            })?;
        let present = self
            .deps
            .capture
            .addresses(&sockets)
            .map_err(|source| Error::Addresses {
                path: req.netns.clone(),
                source,
            })?;
        if let Some(ip) = ips.iter().find(|ip| !present.contains(ip)) {
            return Err(Error::NotInNetns {
                ip: *ip,
                path: req.netns.clone(),
            });
        }
        self.deps
            .certs
            .ensure(&workload.identity)
            .await
            .map_err(|source| Error::Certificate {
                id: workload.identity.clone(),
                source,
            })?;
        // Listeners before rules: once a rule redirects a connection, something must be there.
        let listeners = sockets.listen(self.deps.ports).map_err(Error::Listen)?;
        self.apply_rules(sockets.clone(), spec, &req.pod).await?;

        let pod = Arc::new(Pod::new(
            req.pod.namespace.clone(),
            req.pod.name.clone(),
            workload.identity.clone(),
            ips.clone(),
            sockets,
        ));
        let stop = CancellationToken::new();
        self.deps
            .proxy
            .serve_pod(pod.clone(), listeners, &stop)
            .map_err(Error::Tls)?;
        info!(pod = pod.label(), id = %pod.identity, ips = ?pod.ips, backend = self.deps.capture.name(),
            "pod wired");
        let sandbox = Sandbox {
            container_id: req.container_id.clone(),
            netns: req.netns,
            pod: req.pod,
            ips,
        };
        let replaced: Vec<Wired> = {
            let mut wired = self.wired.lock().expect("pods lock poisoned");
            let older: Vec<String> = wired
                .iter()
                .filter(|(_, w)| w.pod.namespace == pod.namespace && w.pod.name == pod.name)
                .map(|(id, _)| id.clone())
                .collect();
            wired.insert(req.container_id, Wired { pod, sandbox, stop });
            older.iter().filter_map(|id| wired.remove(id)).collect()
        };
        // The pod's older sandboxes are gone or going: the runtime made a new one.
        for old in replaced {
            self.unwire(old).await;
        }
        Ok(true)
    }

    async fn apply_rules(
        &self,
        sockets: Sockets,
        spec: rules::Spec,
        pod: &PodRef,
    ) -> Result<(), Error> {
        let capture = self.deps.capture.clone();
        tokio::task::spawn_blocking(move || capture.install(&sockets, &spec))
            .await
            .map_err(|source| Error::Task {
                pod: label(pod),
                source,
            })?
            .map_err(Error::Rules)
    }

    /// Verifies that an enrolled pod is wired: known here, rules present, listeners listening.
    pub async fn check(&self, req: CheckPod) -> Result<(), Error> {
        let snapshot = self.deps.state.snapshot();
        let enrolled = snapshot
            .workload(&req.pod.namespace, &req.pod.name)
            .is_some_and(|w| snapshot.enrolled(w));
        let not_wired = || Error::NotWired {
            pod: label(&req.pod),
        };
        let found = match &req.netns {
            Some(netns) => self.named_sandbox(&req.container_id, &req.pod, Path::new(netns)),
            None => self.with_wired(&req.container_id, |_| req.container_id.clone()),
        };
        let Some(id) = found else {
            return if enrolled { Err(not_wired()) } else { Ok(()) };
        };
        // The runtime named a sandbox the daemon rewired on its own: adopt its id.
        self.rename(&id, &req.container_id);
        let id = req.container_id.clone();
        // Unwired between the lookup and here: as if it had never been found.
        let sockets = self
            .with_wired(&id, |w| w.pod.sockets.clone())
            .ok_or_else(not_wired)?;
        let (capture, ports) = (self.deps.capture.clone(), self.deps.ports);
        tokio::task::spawn_blocking(move || capture.check(&sockets, ports))
            .await
            .map_err(|source| Error::Task {
                pod: label(&req.pod),
                source,
            })?
            .map_err(|source| Error::Check {
                pod: label(&req.pod),
                source,
            })
    }

    /// Unwires the sandbox the request names, and nothing else; never fails. The sandbox is
    /// the one wired under `container_id`, or one the daemon rewired itself in the same
    /// namespace. A DEL for another (stale, retried, out-of-order) sandbox of the same pod
    /// changes nothing.
    pub async fn del(&self, req: DelPod) {
        let _serial = self.serial.lock().await;
        let id = match (&req.pod, &req.netns) {
            (Some(pod), Some(netns)) => {
                self.named_sandbox(&req.container_id, pod, Path::new(netns))
            }
            _ => self.with_wired(&req.container_id, |_| req.container_id.clone()),
        };
        let removed = id.and_then(|id| self.wired.lock().expect("pods lock poisoned").remove(&id));
        if let Some(wired) = removed {
            self.unwire(wired).await;
        }
        self.persist().await;
    }

    /// Unwires the sandboxes the runtime no longer lists, except any whose namespace is still
    /// there and whose pod is enrolled: such a pod is running, and unwiring it would let its
    /// traffic out in plaintext (a sandbox the daemon rewired itself is tracked under an id
    /// the runtime has never heard of).
    pub async fn gc(&self, keep: &[String]) {
        let _serial = self.serial.lock().await;
        let snapshot = self.deps.state.snapshot();
        let stale: Vec<Wired> = {
            let mut wired = self.wired.lock().expect("pods lock poisoned");
            let ids: Vec<String> = wired
                .iter()
                .filter(|(id, w)| {
                    let enrolled = snapshot
                        .workload(&w.pod.namespace, &w.pod.name)
                        .is_some_and(|wl| snapshot.enrolled(wl));
                    let alive = self
                        .deps
                        .capture
                        .alive(&w.pod.sockets, Path::new(&w.sandbox.netns));
                    let running = enrolled && alive;
                    !(keep.contains(id) || running)
                })
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| wired.remove(id)).collect()
        };
        for wired in stale {
            self.unwire(wired).await;
        }
        self.persist().await;
    }

    async fn unwire(&self, wired: Wired) {
        wired.stop.cancel();
        let (capture, sockets) = (self.deps.capture.clone(), wired.pod.sockets.clone());
        let removed = tokio::task::spawn_blocking(move || capture.remove(&sockets)).await;
        if !matches!(removed, Ok(Ok(()))) {
            warn!(
                pod = wired.pod.label(),
                netns = wired.sandbox.netns,
                "rules not removed; namespace gone?"
            );
        }
        self.release_if_unused(&wired.pod.identity);
        self.deps.metrics.unwired();
        info!(pod = wired.pod.label(), "pod released");
    }

    /// The id the sandbox named by a DEL or CHECK is wired under: `container_id` itself, or the
    /// id of the same pod's entry in `netns` (a sandbox the daemon rewired on its own, under a
    /// synthetic id). The runtime's id is honoured even when the namespace path is gone.
    fn named_sandbox(&self, container_id: &str, pod: &PodRef, netns: &Path) -> Option<String> {
        if self.with_wired(container_id, |_| ()).is_some() {
            return Some(container_id.to_owned());
        }
        self.same_sandbox(container_id, pod, netns)
    }

    /// The id the sandbox in `netns` is wired under: `container_id` itself if it is wired in
    /// that namespace, or the id of the same pod's entry there (a sandbox the daemon rewired on
    /// its own, under a synthetic id).
    fn same_sandbox(&self, container_id: &str, pod: &PodRef, netns: &Path) -> Option<String> {
        let wired = self.wired.lock().expect("pods lock poisoned");
        if let Some(w) = wired.get(container_id) {
            return w.pod.sockets.is_in(netns).then(|| container_id.to_owned());
        }
        wired
            .iter()
            .find(|(_, w)| {
                w.pod.namespace == pod.namespace
                    && w.pod.name == pod.name
                    && w.pod.sockets.is_in(netns)
            })
            .map(|(id, _)| id.clone())
    }

    /// The pod wired in `netns`, if any.
    fn wired_in(&self, netns: &Path) -> Option<String> {
        let wired = self.wired.lock().expect("pods lock poisoned");
        wired
            .values()
            .find(|w| w.pod.sockets.is_in(netns))
            .map(|w| w.pod.label().to_owned())
    }

    /// Tracks the sandbox wired under `from` under `to` (the runtime's id) from now on.
    fn rename(&self, from: &str, to: &str) {
        if from == to {
            return;
        }
        let mut wired = self.wired.lock().expect("pods lock poisoned");
        if let Some(mut w) = wired.remove(from) {
            w.sandbox.container_id = to.to_owned();
            wired.insert(to.to_owned(), w);
        }
    }

    fn is_wired(&self, namespace: &str, name: &str) -> bool {
        let wired = self.wired.lock().expect("pods lock poisoned");
        wired
            .values()
            .any(|w| w.pod.namespace == namespace && w.pod.name == name)
    }

    fn with_wired<R>(&self, id: &str, f: impl FnOnce(&Wired) -> R) -> Option<R> {
        self.wired
            .lock()
            .expect("pods lock poisoned")
            .get(id)
            .map(f)
    }

    fn read_sandboxes(&self) -> Vec<Sandbox> {
        let path = self.deps.state_dir.join(PODS_FILE);
        std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Records the wired sandboxes (a failure is logged, as it only costs container-id
    /// continuity after a restart) and points the host's probe rule at their addresses. Runs
    /// after every change, under the registration lock.
    async fn persist(&self) {
        let (sandboxes, mut ips): (Vec<Sandbox>, Vec<IpAddr>) = {
            let wired = self.wired.lock().expect("pods lock poisoned");
            let sandboxes = wired.values().map(|w| w.sandbox.clone()).collect();
            let ips = wired.values().flat_map(|w| w.pod.ips.clone()).collect();
            (sandboxes, ips)
        };
        let json = serde_json::to_vec_pretty(&sandboxes).expect("sandboxes serialize");
        if let Err(e) = super::write_atomically(&self.deps.state_dir.join(PODS_FILE), &json) {
            warn!(error = &e as &dyn std::error::Error, "recording wired pods");
        }
        ips.sort();
        ips.dedup();
        // Most registrations (a repeated ADD, a DEL of nothing) leave the set as it was.
        if self.probed.lock().expect("probed lock poisoned").as_ref() == Some(&ips) {
            return;
        }
        let capture = self.deps.capture.clone();
        let applying = ips.clone();
        match tokio::task::spawn_blocking(move || capture.probes(&applying)).await {
            Ok(Ok(())) => *self.probed.lock().expect("probed lock poisoned") = Some(ips),
            // Not recorded as applied: the next change tries again.
            Ok(Err(e)) => warn!(
                error = &e as &dyn std::error::Error,
                "updating the host's probe rule"
            ),
            Err(e) => warn!(error = &e as &dyn std::error::Error, "probe rule task"),
        }
    }
}

fn label(pod: &PodRef) -> String {
    format!("{}/{}", pod.namespace, pod.name)
}

impl Registry {
    /// Each enrolled pod of this node, `namespace/name`, with what is wrong with its wiring
    /// (`None`: wired, rules present, listeners listening), sorted: what `culvert check` reports.
    pub async fn audit(&self) -> Vec<(String, Option<String>)> {
        let pods: Vec<Arc<Pod>> = {
            let wired = self.wired.lock().expect("pods lock poisoned");
            wired.values().map(|w| w.pod.clone()).collect()
        };
        let mut found: Vec<(String, Option<String>)> = self
            .local_enrollment()
            .into_iter()
            .map(|(namespace, name, _)| format!("{namespace}/{name}"))
            .filter(|label| !pods.iter().any(|p| p.label() == label))
            .map(|label| (label, Some("enrolled but not wired".to_owned())))
            .collect();
        let (capture, ports) = (self.deps.capture.clone(), self.deps.ports);
        let checked = tokio::task::spawn_blocking(move || {
            pods.iter()
                .map(|pod| {
                    let problem = capture
                        .check(&pod.sockets, ports)
                        .err()
                        .map(|e| format!("{:#}", anyhow::Error::new(e)));
                    (pod.label().to_owned(), problem)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        found.extend(checked);
        found.sort();
        found
    }

    /// How many pods are wired.
    pub fn wired_count(&self) -> usize {
        self.wired.lock().expect("pods lock poisoned").len()
    }

    /// The wired pods, by container id.
    pub fn list(&self) -> Vec<PodStatus> {
        let wired = self.wired.lock().expect("pods lock poisoned");
        let mut pods: Vec<_> = wired
            .iter()
            .map(|(container_id, w)| PodStatus {
                container_id: container_id.clone(),
                pod: w.sandbox.pod.clone(),
                ips: w.pod.ips.clone(),
                identity: w.pod.identity.to_string(),
                backend: self.deps.capture.name().to_owned(),
            })
            .collect();
        pods.sort_by(|a, b| a.container_id.cmp(&b.container_id));
        pods
    }

    /// The data path the wired pods are served by.
    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.deps.proxy
    }

    /// The certificates the wired pods are served with.
    pub fn certificates(&self) -> &Arc<identity::Cache> {
        &self.deps.certs
    }

    /// The wired pod `namespace/name`, as the data path serves it.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<Arc<Pod>> {
        let wired = self.wired.lock().expect("pods lock poisoned");
        wired
            .values()
            .find(|w| w.pod.namespace == namespace && w.pod.name == name)
            .map(|w| w.pod.clone())
    }
}

impl Handler for Registry {
    async fn add(&self, req: AddPod) -> Response {
        let pod = label(&req.pod);
        match Self::add(self, req).await {
            Ok(enrolled) => Response::Added { enrolled },
            Err(e) => {
                warn!(pod, error = &e as &dyn std::error::Error, "pod not wired");
                self.deps.metrics.failed(e.reason());
                Response::Nack {
                    reason: format!("wiring pod {pod}: {}", super::chain(&e)),
                }
            }
        }
    }

    async fn del(&self, req: DelPod) -> Response {
        Self::del(self, req).await;
        Response::Removed
    }

    async fn check(&self, req: CheckPod) -> Response {
        match Self::check(self, req).await {
            Ok(()) => Response::Checked,
            Err(e) => {
                self.deps.metrics.failed(e.reason());
                Response::Nack {
                    reason: super::chain(&e),
                }
            }
        }
    }

    async fn gc(&self, req: Gc) -> Response {
        Self::gc(self, &req.keep).await;
        Response::Removed
    }

    fn list(&self) -> Response {
        Response::Pods {
            pods: Self::list(self),
        }
    }
}

#[cfg(test)]
mod tests;
