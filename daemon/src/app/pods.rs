//! The pod registry: turns registrations into wired pods (certificate, listeners, rules), keeps
//! them in step with enrollment, and remembers them across restarts.

use std::collections::HashMap;
use std::fs::File;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use culvert_cni_proto::{AddPod, CheckPod, DelPod, Gc, PodRef, PodStatus, Response};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Ports;
use crate::identity;
use crate::proxy::{Pod, Proxy};
use crate::redirect::{Backend, Netns, Sockets, cni, netns, rules};
use crate::state::Store;

/// File in the state directory listing wired sandboxes, so a restarted daemon keeps the
/// runtime's container ids.
const PODS_FILE: &str = "pods.json";

/// What the registry is built from.
pub(super) struct Deps {
    pub node: String,
    pub state: Arc<Store>,
    pub certs: Arc<identity::Cache>,
    pub proxy: Arc<Proxy>,
    pub backend: Backend,
    pub ports: Ports,
    pub home: Arc<File>,
    pub state_dir: PathBuf,
    pub netns_dirs: Vec<PathBuf>,
}

pub(super) struct Pods {
    deps: Deps,
    /// Wired pods by container id.
    wired: Mutex<HashMap<String, Wired>>,
    /// Changes are applied one at a time: wiring is quick, and ordering an ADD and a DEL of the
    /// same sandbox matters more than parallelism.
    serial: tokio::sync::Mutex<()>,
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

impl Pods {
    pub(super) fn new(deps: Deps) -> Self {
        Self {
            deps,
            wired: Mutex::default(),
            serial: tokio::sync::Mutex::default(),
        }
    }

    /// Brings the wired pods in line with enrollment: releases pods no longer enrolled, and wires
    /// enrolled pods of this node that run but are not wired (found by IP among the host's
    /// network namespaces). Run at start, before registrations are served, and after every
    /// change of state.
    pub(super) async fn reconcile(&self) {
        let _serial = self.serial.lock().await;
        let snapshot = self.deps.state.snapshot();
        let released: Vec<Wired> = {
            let mut wired = self.wired.lock().expect("pods lock poisoned");
            let gone: Vec<String> = wired
                .iter()
                .filter(|(_, w)| {
                    !snapshot
                        .workload(&w.pod.namespace, &w.pod.name)
                        .is_some_and(|wl| wl.enrolled)
                })
                .map(|(id, _)| id.clone())
                .collect();
            gone.iter().filter_map(|id| wired.remove(id)).collect()
        };
        for w in released {
            self.unwire(w).await;
        }

        let wanted: Vec<_> = snapshot
            .workloads()
            .filter(|w| {
                w.enrolled && w.node == self.deps.node && !self.is_wired(&w.namespace, &w.name)
            })
            .cloned()
            .collect();
        if !wanted.is_empty() {
            let (dirs, home) = (self.deps.netns_dirs.clone(), self.deps.home.clone());
            let found = tokio::task::spawn_blocking(move || netns::scan(&dirs, &home))
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
                    namespace: w.namespace.clone(),
                    name: w.name.clone(),
                    uid: None,
                };
                // Keep the runtime's container id when this sandbox was wired before.
                let container_id = known
                    .iter()
                    .find(|s| {
                        s.pod.namespace == pod.namespace
                            && s.pod.name == pod.name
                            && netns::same(Path::new(&s.netns), path)
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
                    warn!(pod = %format!("{}/{}", w.namespace, w.name), error = format!("{e:#}"), "rewiring failed");
                }
            }
        }
        self.persist();
    }

    /// This node's enrolled pods and their addresses: when it changes, [`Self::reconcile`] has
    /// work to do.
    pub(super) fn local_enrollment(&self) -> Vec<(String, String, Vec<IpAddr>)> {
        let snapshot = self.deps.state.snapshot();
        let mut local: Vec<_> = snapshot
            .workloads()
            .filter(|w| w.enrolled && w.node == self.deps.node)
            .map(|w| (w.namespace.clone(), w.name.clone(), w.ips.clone()))
            .collect();
        local.sort();
        local
    }

    async fn add_pod(&self, req: AddPod) -> anyhow::Result<bool> {
        let _serial = self.serial.lock().await;
        let enrolled = self.add_locked(req).await?;
        self.persist();
        Ok(enrolled)
    }

    async fn add_locked(&self, req: AddPod) -> anyhow::Result<bool> {
        let snapshot = self.deps.state.snapshot();
        let workload = snapshot
            .workload(&req.pod.namespace, &req.pod.name)
            .or_else(|| req.ips.iter().find_map(|ip| snapshot.workload_by_ip(*ip)));
        let workload = match workload {
            Some(w) if w.enrolled => w.clone(),
            None if snapshot.enrolled_namespaces.contains(&req.pod.namespace) => {
                // Enrolled namespace, but no identity known for the pod: refusing keeps it from
                // starting unredirected; the runtime retries once the node knows it.
                bail!(
                    "pod {} is in an enrolled namespace but unknown to this node",
                    label(&req.pod)
                );
            }
            _ => {
                info!(pod = %label(&req.pod), "pod not enrolled; left alone");
                return Ok(false);
            }
        };
        if workload.node != self.deps.node {
            bail!(
                "pod {} is on node {:?}, this daemon serves {:?}",
                label(&req.pod),
                workload.node,
                self.deps.node
            );
        }
        let ips = if req.ips.is_empty() {
            workload.ips.clone()
        } else {
            req.ips.clone()
        };
        let spec = rules::Spec {
            ports: self.deps.ports,
            pod_ips: ips.clone(),
        };

        if let Some(old_id) = self.find(&req.container_id, &req.pod) {
            let same = self.with_wired(&old_id, |w| {
                w.pod.sockets.netns().same_as(Path::new(&req.netns))
            });
            if same == Some(true) {
                // A repeated ADD, or the runtime's id for a pod rewired at start: keep the
                // listeners, make sure the rules are (still) there, track it under this id.
                let netns = self
                    .with_wired(&old_id, |w| w.pod.sockets.netns().clone())
                    .expect("found above");
                self.apply_rules(netns, spec).await?;
                let mut wired = self.wired.lock().expect("pods lock poisoned");
                if let Some(mut w) = wired.remove(&old_id) {
                    w.sandbox.container_id = req.container_id.clone();
                    wired.insert(req.container_id, w);
                }
                return Ok(true);
            }
            // A new sandbox for the pod: the old one is gone or going.
            let old = self
                .wired
                .lock()
                .expect("pods lock poisoned")
                .remove(&old_id);
            if let Some(old) = old {
                self.unwire(old).await;
            }
        }

        self.deps
            .certs
            .ensure(&workload.identity)
            .await
            .with_context(|| format!("getting a certificate for {}", workload.identity))?;
        let netns = Netns::open(Path::new(&req.netns), self.deps.home.clone())
            .with_context(|| format!("opening network namespace {}", req.netns))?;
        let sockets = Sockets::new(Arc::new(netns));
        // Listeners before rules: once a rule redirects a connection, something must be there.
        let listeners = sockets
            .listen(self.deps.ports)
            .context("binding the pod's listeners")?;
        self.apply_rules(sockets.netns().clone(), spec).await?;

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
            .context("building the pod's TLS config")?;
        info!(pod = pod.label(), id = %pod.identity, ips = ?pod.ips, backend = self.deps.backend.name(),
            "pod wired");
        let sandbox = Sandbox {
            container_id: req.container_id.clone(),
            netns: req.netns,
            pod: req.pod,
            ips,
        };
        self.wired
            .lock()
            .expect("pods lock poisoned")
            .insert(req.container_id, Wired { pod, sandbox, stop });
        Ok(true)
    }

    async fn apply_rules(&self, netns: Arc<Netns>, spec: rules::Spec) -> anyhow::Result<()> {
        let backend = self.deps.backend;
        tokio::task::spawn_blocking(move || rules::apply(&netns, backend, &spec))
            .await
            .context("rule installer task")?
            .context("installing redirection rules")
    }

    /// Verifies that an enrolled pod is wired: known here, rules present, listeners listening.
    async fn check_pod(&self, req: CheckPod) -> anyhow::Result<()> {
        let snapshot = self.deps.state.snapshot();
        let enrolled = snapshot
            .workload(&req.pod.namespace, &req.pod.name)
            .is_some_and(|w| w.enrolled);
        let Some(id) = self.find(&req.container_id, &req.pod) else {
            if enrolled {
                bail!("pod {} is enrolled but not wired", label(&req.pod));
            }
            return Ok(());
        };
        let netns = self
            .with_wired(&id, |w| w.pod.sockets.netns().clone())
            .context("pod went away")?;
        let (backend, ports) = (self.deps.backend, self.deps.ports);
        tokio::task::spawn_blocking(move || {
            if !rules::present(&netns, backend)? {
                bail!("redirection rules are missing");
            }
            let listening = crate::redirect::listening_ports(&netns)?;
            for port in [ports.outbound, ports.inbound_plaintext, ports.hbone] {
                if !listening.contains(&port) {
                    bail!("nothing listens on port {port}");
                }
            }
            Ok(())
        })
        .await
        .context("check task")?
        .with_context(|| format!("pod {}", label(&req.pod)))
    }

    async fn del_pod(&self, req: DelPod) {
        let _serial = self.serial.lock().await;
        let id = match &req.pod {
            Some(pod) => self.find(&req.container_id, pod),
            None => Some(req.container_id.clone()),
        };
        let removed = id.and_then(|id| self.wired.lock().expect("pods lock poisoned").remove(&id));
        if let Some(wired) = removed {
            self.unwire(wired).await;
        }
        self.persist();
    }

    /// Unwires every pod whose sandbox the runtime no longer lists.
    async fn gc_pods(&self, keep: &[String]) {
        let _serial = self.serial.lock().await;
        let stale: Vec<Wired> = {
            let mut wired = self.wired.lock().expect("pods lock poisoned");
            let ids: Vec<String> = wired
                .keys()
                .filter(|id| !keep.contains(id))
                .cloned()
                .collect();
            ids.iter().filter_map(|id| wired.remove(id)).collect()
        };
        for wired in stale {
            self.unwire(wired).await;
        }
        self.persist();
    }

    async fn unwire(&self, wired: Wired) {
        wired.stop.cancel();
        let netns = wired.pod.sockets.netns().clone();
        let backend = self.deps.backend;
        let removed = tokio::task::spawn_blocking(move || rules::remove(&netns, backend)).await;
        if !matches!(removed, Ok(Ok(()))) {
            warn!(
                pod = wired.pod.label(),
                netns = wired.sandbox.netns,
                "rules not removed; namespace gone?"
            );
        }
        let still_used = self
            .wired
            .lock()
            .expect("pods lock poisoned")
            .values()
            .any(|w| w.pod.identity == wired.pod.identity);
        if !still_used {
            self.deps.certs.release(&wired.pod.identity);
        }
        info!(pod = wired.pod.label(), "pod released");
    }

    /// The id a pod is wired under: `container_id` itself, or whatever id its name is wired under.
    fn find(&self, container_id: &str, pod: &PodRef) -> Option<String> {
        let wired = self.wired.lock().expect("pods lock poisoned");
        if wired.contains_key(container_id) {
            return Some(container_id.to_owned());
        }
        wired
            .iter()
            .find(|(_, w)| w.pod.namespace == pod.namespace && w.pod.name == pod.name)
            .map(|(id, _)| id.clone())
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

    /// Records the wired sandboxes; a failure is logged, as it only costs container-id
    /// continuity after a restart.
    fn persist(&self) {
        let sandboxes: Vec<Sandbox> = {
            let wired = self.wired.lock().expect("pods lock poisoned");
            wired.values().map(|w| w.sandbox.clone()).collect()
        };
        let json = serde_json::to_vec_pretty(&sandboxes).expect("sandboxes serialize");
        if let Err(e) = super::write_atomically(&self.deps.state_dir.join(PODS_FILE), &json) {
            warn!(error = &e as &dyn std::error::Error, "recording wired pods");
        }
    }
}

fn label(pod: &PodRef) -> String {
    format!("{}/{}", pod.namespace, pod.name)
}

impl cni::Registry for Pods {
    async fn add(&self, req: AddPod) -> Response {
        let pod = label(&req.pod);
        match self.add_pod(req).await {
            Ok(enrolled) => Response::Added { enrolled },
            Err(e) => {
                warn!(pod, error = format!("{e:#}"), "pod not wired");
                Response::Nack {
                    reason: format!("wiring pod {pod}: {e:#}"),
                }
            }
        }
    }

    async fn del(&self, req: DelPod) -> Response {
        self.del_pod(req).await;
        Response::Removed
    }

    async fn check(&self, req: CheckPod) -> Response {
        match self.check_pod(req).await {
            Ok(()) => Response::Checked,
            Err(e) => Response::Nack {
                reason: format!("{e:#}"),
            },
        }
    }

    async fn gc(&self, req: Gc) -> Response {
        self.gc_pods(&req.keep).await;
        Response::Removed
    }

    fn list(&self) -> Response {
        let wired = self.wired.lock().expect("pods lock poisoned");
        let mut pods: Vec<_> = wired
            .iter()
            .map(|(container_id, w)| PodStatus {
                container_id: container_id.clone(),
                pod: w.sandbox.pod.clone(),
                ips: w.pod.ips.clone(),
                identity: w.pod.identity.to_string(),
                backend: self.deps.backend.name().to_owned(),
            })
            .collect();
        pods.sort_by(|a, b| a.container_id.cmp(&b.container_id));
        Response::Pods { pods }
    }
}
