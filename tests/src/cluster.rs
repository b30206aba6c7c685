//! The cluster layer's harness: a real control plane and two real kubelet + containerd nodes
//! (`scripts/cluster-test-env`), Culvert's image (`scripts/image`) imported into each node, and
//! the shipped manifests applied with kustomize through an overlay that changes only the
//! per-host values the nodes need on a shared machine.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::eventually;

/// Where the cluster keeps its files; kept after a run for inspection.
pub const DIR: &str = "/tmp/culvert-cluster";
/// The nodes, as the kubelets register them.
pub const NODES: [&str; 2] = ["node1", "node2"];
/// The CA Service's address, pinned: the test cluster runs no cluster DNS, so the daemons find
/// `culvert-ca.culvert-system.svc` through a host alias.
pub const CA_SERVICE_IP: &str = "10.96.0.15";
/// The enrollment label, as the manifests' node file sets it.
pub const ENROLL: &str = "culvert.io/dataplane-mode=ambient";
/// A busybox image built by the cluster script, imported into every node.
pub const BUSYBOX: &str = "culvert.test/busybox:1";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn run(command: &mut Command) -> anyhow::Result<String> {
    let Output {
        status,
        stdout,
        stderr,
    } = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!(
            "{command:?} failed ({status}): {}",
            String::from_utf8_lossy(&stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&stdout).into_owned())
}

/// A running cluster; [`Cluster::down`] stops it.
pub struct Cluster {
    pub dir: PathBuf,
    /// The cluster admin's kubeconfig.
    pub kubeconfig: PathBuf,
    kubectl: String,
}

impl Cluster {
    /// Builds Culvert's image from the binaries next to the tests and brings the cluster up,
    /// after tearing down whatever an earlier run left.
    pub fn up() -> anyhow::Result<Self> {
        let dir = PathBuf::from(DIR);
        let script = repo().join("scripts/cluster-test-env");
        let _ = run(Command::new(&script).arg("down").arg(&dir));
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {DIR}"))?;
        }
        std::fs::create_dir_all(dir.join("images"))?;
        // The binaries next to the tests, wherever the target directory is.
        let bins = crate::culvert_bin();
        run(Command::new(repo().join("scripts/image"))
            .arg("--from")
            .arg(
                bins.parent()
                    .context("the culvert binary has no directory")?,
            )
            .arg("--out")
            .arg(dir.join("images/culvert.tar")))?;
        run(Command::new(&script).arg("up").arg(&dir))?;
        let env = std::fs::read_to_string(dir.join("env"))?;
        let kubectl = env
            .lines()
            .find_map(|l| l.strip_prefix("KUBECTL="))
            .context("no KUBECTL in the cluster's env")?
            .to_owned();
        Ok(Self {
            kubeconfig: dir.join("kubeconfig"),
            dir,
            kubectl,
        })
    }

    /// Stops every process of the cluster and restores the host.
    pub fn down(&self) -> anyhow::Result<()> {
        run(Command::new(repo().join("scripts/cluster-test-env"))
            .arg("down")
            .arg(&self.dir))
        .map(drop)
    }

    /// Stops node `n`'s kubelet, containerd and every container of it, as a power cut would.
    pub fn node_stop(&self, n: usize) -> anyhow::Result<()> {
        run(Command::new(repo().join("scripts/cluster-test-env"))
            .arg("node-stop")
            .arg(&self.dir)
            .arg(n.to_string()))
        .map(drop)
    }

    /// Starts node `n` again: its kubelet recreates every pod's sandbox.
    pub fn node_start(&self, n: usize) -> anyhow::Result<()> {
        run(Command::new(repo().join("scripts/cluster-test-env"))
            .arg("node-start")
            .arg(&self.dir)
            .arg(n.to_string()))
        .map(drop)
    }

    /// Runs helm against the cluster as its admin.
    pub fn helm(&self, args: &[&str]) -> anyhow::Result<String> {
        crate::chart::helm(Some(&self.kubeconfig), args)
    }

    /// Runs kubectl against the cluster as its admin.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        run(Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args))
    }

    /// `kubectl apply` of a YAML document.
    pub fn apply(&self, yaml: &str) -> anyhow::Result<()> {
        let file = self.dir.join("apply.yaml");
        std::fs::write(&file, yaml)?;
        self.kubectl(&["apply", "-f", file.to_str().unwrap()])
            .map(drop)
    }

    /// The overlay over `manifests/` that the test nodes need, and nothing else: each node's CNI
    /// directories, registration socket and state directory under its own directory (the nodes
    /// share one filesystem, so the host paths carry the node's name), and a host alias for the
    /// CA's Service, whose address is pinned (no cluster DNS here).
    pub fn write_overlay(&self) -> anyhow::Result<PathBuf> {
        let overlay = self.dir.join("overlay");
        std::fs::create_dir_all(&overlay)?;
        let manifests = repo().join("manifests");
        // kustomize takes bases by relative path only.
        let up = overlay.components().count() - 1;
        let base = format!(
            "{}{}",
            "../".repeat(up),
            manifests.strip_prefix("/").unwrap().display()
        );
        let dir = self.dir.display();
        std::fs::write(
            overlay.join("kustomization.yaml"),
            format!(
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
                 resources: [{base}]\npatches: [{{path: daemonset.yaml}}, {{path: ca-service.yaml}}]\n"
            ),
        )?;
        let args: String = self
            .daemon_args()
            .iter()
            .map(|a| format!("            - {a}\n"))
            .collect();
        std::fs::write(
            overlay.join("daemonset.yaml"),
            format!(
                "apiVersion: apps/v1
kind: DaemonSet
metadata: {{ name: culvert-node, namespace: culvert-system }}
spec:
  template:
    spec:
      hostAliases:
        - {{ ip: {CA_SERVICE_IP}, hostnames: [culvert-ca.culvert-system.svc] }}
      containers:
        - name: culvert
          args:
{args}          volumeMounts:
            - {{ name: cluster, mountPath: {dir} }}
      volumes:
        - {{ name: cluster, hostPath: {{ path: {dir} }} }}
"
            ),
        )?;
        std::fs::write(
            overlay.join("ca-service.yaml"),
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{ name: culvert-ca, namespace: culvert-system }}\n\
                 spec: {{ clusterIP: {CA_SERVICE_IP} }}\n"
            ),
        )?;
        Ok(overlay)
    }

    /// The daemon's arguments on these nodes: the shipped ones, with each node's host paths
    /// under its own directory (the nodes share one filesystem).
    pub fn daemon_args(&self) -> Vec<String> {
        let node = format!("{}/$(CULVERT_NODE_NAME)", self.dir.display());
        [
            "node".to_owned(),
            "--config=/etc/culvert/config/node.yaml".to_owned(),
            "--install-cni".to_owned(),
            format!("--cni-bin-dir={node}/cni/bin"),
            format!("--cni-conf-dir={node}/cni/net.d"),
            format!("--cni-socket={node}/culvert/run/cni.sock"),
            format!("--state-dir={node}/culvert/state"),
            "--log-format=json".to_owned(),
            "--ready-file=/run/culvert-self/ready".to_owned(),
            "--drain-timeout=10m".to_owned(),
        ]
        .into()
    }

    /// The chart's values for these nodes: what the overlay changes, as values.
    pub fn chart_values(&self) -> serde_json::Value {
        let dir = self.dir.display().to_string();
        serde_json::json!({
            "node": {
                "args": self.daemon_args(),
                "hostAliases": [{ "ip": CA_SERVICE_IP, "hostnames": ["culvert-ca.culvert-system.svc"] }],
                "volumes": [{ "name": "cluster", "hostPath": { "path": dir } }],
                "volumeMounts": [{ "name": "cluster", "mountPath": dir }],
            },
            "ca": { "clusterIP": CA_SERVICE_IP },
        })
    }

    /// Applies Culvert as a user would (the CRDs, then `kubectl apply -k` of the overlay) and
    /// waits for the CA and every node's daemon to be ready.
    pub fn install(&self) -> anyhow::Result<()> {
        let overlay = self.write_overlay()?;
        let crds = repo().join("manifests/crds");
        self.kubectl(&["apply", "-f", crds.to_str().unwrap()])?;
        self.kubectl(&["apply", "-k", overlay.to_str().unwrap()])?;
        self.daemons_ready()?;
        self.ca_ready()
    }

    /// Waits until the CA's Deployment has rolled out.
    pub fn ca_ready(&self) -> anyhow::Result<()> {
        self.kubectl(&[
            "-n",
            "culvert-system",
            "rollout",
            "status",
            "deployment/culvert-ca",
            "--timeout=120s",
        ])
        .map(drop)
    }

    /// Waits until the DaemonSet has a ready daemon on every node.
    pub fn daemons_ready(&self) -> anyhow::Result<()> {
        self.kubectl(&[
            "-n",
            "culvert-system",
            "rollout",
            "status",
            "daemonset/culvert-node",
            "--timeout=120s",
        ])
        .map(drop)
    }

    /// A JSONPath of one object.
    pub fn get(&self, namespace: &str, object: &str, path: &str) -> anyhow::Result<String> {
        self.kubectl(&[
            "-n",
            namespace,
            "get",
            object,
            "-o",
            &format!("jsonpath={path}"),
        ])
    }

    /// Creates a namespace, enrolled or not.
    pub fn namespace(&self, name: &str, enrolled: bool) -> anyhow::Result<()> {
        let labels = if enrolled {
            let (key, value) = ENROLL.split_once('=').unwrap();
            format!("labels: {{ {key}: {value} }}")
        } else {
            String::new()
        };
        self.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{ name: {name}, {labels} }}\n"
        ))
    }

    /// Creates a busybox pod on `node` running `command` under `sh -c`, labelled `app=<name>`.
    pub fn pod(
        &self,
        namespace: &str,
        name: &str,
        node: &str,
        command: &str,
    ) -> anyhow::Result<()> {
        self.apply(&pod_yaml(namespace, name, node, command, ""))
    }

    /// An echo server `name` on `node` (port 8080) and a Service of the same name for it on
    /// port 80; returns the Service's cluster IP.
    pub fn echo_service(&self, namespace: &str, name: &str, node: &str) -> anyhow::Result<String> {
        self.pod(namespace, name, node, "nc -ll -p 8080 -e cat")?;
        self.apply(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{ name: {name}, namespace: {namespace} }}\n\
             spec: {{ selector: {{ app: {name} }}, ports: [{{ port: 80, targetPort: 8080 }}] }}\n"
        ))?;
        self.get(namespace, &format!("service/{name}"), "{.spec.clusterIP}")
    }

    /// Waits for a pod to run and be ready; returns its IP.
    pub fn running(&self, namespace: &str, name: &str, timeout: Duration) -> String {
        eventually(&format!("{namespace}/{name} ready"), timeout, || {
            let ready = self
                .get(
                    namespace,
                    &format!("pod/{name}"),
                    "{.status.conditions[?(@.type==\"Ready\")].status}",
                )
                .ok()?;
            (ready == "True").then_some(())
        });
        self.get(namespace, &format!("pod/{name}"), "{.status.podIP}")
            .unwrap()
    }

    /// Runs `command` under `sh -c` in a pod's container.
    pub fn exec(&self, namespace: &str, pod: &str, command: &str) -> anyhow::Result<String> {
        self.kubectl(&["-n", namespace, "exec", pod, "--", "sh", "-c", command])
    }

    /// The events of one object, oldest first, as "reason: message" lines.
    pub fn events(&self, namespace: &str, name: &str) -> anyhow::Result<String> {
        self.kubectl(&[
            "-n",
            namespace,
            "get",
            "events",
            "--field-selector",
            &format!("involvedObject.name={name}"),
            "-o",
            "jsonpath={range .items[*]}{.reason}: {.message}{\"\\n\"}{end}",
        ])
    }

    /// The logs of every daemon, as JSON lines.
    pub fn daemon_logs(&self) -> Vec<serde_json::Value> {
        self.kubectl(&[
            "-n",
            "culvert-system",
            "logs",
            "-l",
            "app.kubernetes.io/name=culvert-node",
            "--tail=-1",
            "--prefix=false",
        ])
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
    }

    /// A node's network namespace (under /run/netns).
    pub fn node_netns(node: &str) -> String {
        format!("cvk-{node}")
    }

    /// The runtime's network namespace holding `ip`.
    pub fn pod_netns(ip: &str) -> anyhow::Result<PathBuf> {
        for entry in std::fs::read_dir("/run/netns")? {
            let path = entry?.path();
            if !path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("cni-"))
            {
                continue;
            }
            let addrs = run(Command::new("nsenter")
                .arg(format!("--net={}", path.display()))
                .args(["ip", "-4", "-o", "addr"]));
            if addrs.is_ok_and(|a| a.contains(&format!("inet {ip}/"))) {
                return Ok(path);
            }
        }
        bail!("no pod namespace holds {ip}")
    }

    /// Culvert's redirection table inside the pod with `ip`, if it is there.
    pub fn redirect_rules(ip: &str) -> anyhow::Result<String> {
        let netns = Self::pod_netns(ip)?;
        run(Command::new("nsenter")
            .arg(format!("--net={}", netns.display()))
            .args(["nft", "list", "table", "inet", "culvert"]))
    }
}

/// A busybox pod's YAML; `extra` is appended to the container (probes, say).
pub fn pod_yaml(namespace: &str, name: &str, node: &str, command: &str, extra: &str) -> String {
    let command = serde_json::to_string(command).unwrap();
    format!(
        "apiVersion: v1
kind: Pod
metadata: {{ name: {name}, namespace: {namespace}, labels: {{ app: {name} }} }}
spec:
  nodeName: {node}
  terminationGracePeriodSeconds: 1
  containers:
    - name: main
      image: {BUSYBOX}
      imagePullPolicy: Never
      command: [sh, -c, {command}]
{extra}"
    )
}
