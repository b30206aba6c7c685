//! The pod registry: turns registrations into wired pods (certificate, listeners, rules).

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, bail};
use culvert_cni_proto::{AddPod, CheckPod, DelPod, Gc, PodRef, PodStatus, Response};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::Ports;
use crate::identity;
use crate::proxy::{Pod, Proxy};
use crate::redirect::{Backend, Netns, Sockets, cni, rules};
use crate::state::Store;

pub(super) struct Pods {
    node: String,
    state: Arc<Store>,
    certs: Arc<identity::Cache>,
    proxy: Arc<Proxy>,
    backend: Backend,
    ports: Ports,
    home: Arc<File>,
    /// Wired pods by container id.
    wired: Mutex<HashMap<String, Wired>>,
    /// Registrations are applied one at a time: wiring is quick, and ordering an ADD and a DEL
    /// of the same sandbox matters more than parallelism.
    serial: tokio::sync::Mutex<()>,
}

struct Wired {
    pod: Arc<Pod>,
    uid: Option<String>,
    netns_path: String,
    stop: CancellationToken,
}

impl Pods {
    pub(super) fn new(
        node: String,
        state: Arc<Store>,
        certs: Arc<identity::Cache>,
        proxy: Arc<Proxy>,
        backend: Backend,
        ports: Ports,
        home: Arc<File>,
    ) -> Self {
        Self {
            node,
            state,
            certs,
            proxy,
            backend,
            ports,
            home,
            wired: Mutex::default(),
            serial: tokio::sync::Mutex::default(),
        }
    }

    async fn add_pod(&self, req: AddPod) -> anyhow::Result<bool> {
        let _serial = self.serial.lock().await;
        let snapshot = self.state.snapshot();
        let workload = snapshot
            .workload(&req.pod.namespace, &req.pod.name)
            .or_else(|| req.ips.iter().find_map(|ip| snapshot.workload_by_ip(*ip)));
        let Some(workload) = workload.filter(|w| w.enrolled).cloned() else {
            info!(pod = %label(&req.pod), "pod not enrolled; left alone");
            return Ok(false);
        };
        if workload.node != self.node {
            bail!(
                "pod {} is on node {:?}, this daemon serves {:?}",
                label(&req.pod),
                workload.node,
                self.node
            );
        }
        let ips = if req.ips.is_empty() {
            workload.ips.clone()
        } else {
            req.ips.clone()
        };
        let spec = rules::Spec {
            ports: self.ports,
            pod_ips: ips.clone(),
        };

        let existing = self.lookup(&req.container_id);
        if let Some(pod) = existing {
            if pod.sockets.netns().same_as(Path::new(&req.netns)) {
                // A repeated ADD: make sure the rules are (still) there, keep the listeners.
                self.apply_rules(pod.sockets.netns().clone(), spec).await?;
                return Ok(true);
            }
            bail!(
                "container {} is already wired to another network namespace",
                req.container_id
            );
        }

        self.certs
            .ensure(&workload.identity)
            .await
            .with_context(|| format!("getting a certificate for {}", workload.identity))?;
        let netns = Netns::open(Path::new(&req.netns), self.home.clone())
            .with_context(|| format!("opening network namespace {}", req.netns))?;
        let sockets = Sockets::new(Arc::new(netns));
        // Listeners before rules: once a rule redirects a connection, something must be there.
        let listeners = sockets
            .listen(self.ports)
            .context("binding the pod's listeners")?;
        self.apply_rules(sockets.netns().clone(), spec).await?;

        let pod = Arc::new(Pod {
            namespace: req.pod.namespace.clone(),
            name: req.pod.name.clone(),
            identity: workload.identity.clone(),
            ips,
            sockets,
        });
        let stop = CancellationToken::new();
        self.proxy
            .serve_pod(pod.clone(), listeners, &stop)
            .context("building the pod's TLS config")?;
        info!(pod = pod.label(), id = %pod.identity, ips = ?pod.ips, backend = self.backend.name(),
            "pod wired");
        let wired = Wired {
            pod,
            uid: req.pod.uid,
            netns_path: req.netns,
            stop,
        };
        self.wired
            .lock()
            .expect("pods lock poisoned")
            .insert(req.container_id, wired);
        Ok(true)
    }

    async fn apply_rules(&self, netns: Arc<Netns>, spec: rules::Spec) -> anyhow::Result<()> {
        let backend = self.backend;
        tokio::task::spawn_blocking(move || rules::apply(&netns, backend, &spec))
            .await
            .context("rule installer task")?
            .context("installing redirection rules")
    }

    /// Verifies that an enrolled pod is wired: known here, rules present, listeners listening.
    async fn check_pod(&self, req: CheckPod) -> anyhow::Result<()> {
        let snapshot = self.state.snapshot();
        let enrolled = snapshot
            .workload(&req.pod.namespace, &req.pod.name)
            .is_some_and(|w| w.enrolled);
        let Some(pod) = self.lookup(&req.container_id) else {
            if enrolled {
                bail!("pod {} is enrolled but not wired", label(&req.pod));
            }
            return Ok(());
        };
        let netns = pod.sockets.netns().clone();
        let (backend, ports) = (self.backend, self.ports);
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
        let removed = self
            .wired
            .lock()
            .expect("pods lock poisoned")
            .remove(&req.container_id);
        if let Some(wired) = removed {
            self.unwire(wired).await;
        }
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
    }

    async fn unwire(&self, wired: Wired) {
        wired.stop.cancel();
        let netns = wired.pod.sockets.netns().clone();
        let backend = self.backend;
        let removed = tokio::task::spawn_blocking(move || rules::remove(&netns, backend)).await;
        if !matches!(removed, Ok(Ok(()))) {
            warn!(
                pod = wired.pod.label(),
                netns = wired.netns_path,
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
            self.certs.release(&wired.pod.identity);
        }
        info!(pod = wired.pod.label(), "pod released");
    }

    fn lookup(&self, container_id: &str) -> Option<Arc<Pod>> {
        self.wired
            .lock()
            .expect("pods lock poisoned")
            .get(container_id)
            .map(|w| w.pod.clone())
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
                pod: PodRef {
                    namespace: w.pod.namespace.clone(),
                    name: w.pod.name.clone(),
                    uid: w.uid.clone(),
                },
                ips: w.pod.ips.clone(),
                identity: w.pod.identity.to_string(),
                backend: self.backend.name().to_owned(),
            })
            .collect();
        pods.sort_by(|a, b| a.container_id.cmp(&b.container_id));
        Response::Pods { pods }
    }
}
