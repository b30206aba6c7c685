//! A two-node cluster in network namespaces on one machine.
//!
//! Each node is a namespace running a real `culvert node` process; nodes are joined by a veth
//! "wire". Each pod is a namespace that gets its network the way a Kubernetes pod does: the
//! node's runtime runs a CNI chain (the reference `bridge` and `host-local` plugins, then
//! `culvert-cni`) for it. Everything is torn down on drop. The addresses used exist only inside
//! these namespaces.

use std::fmt::Write as _;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use culvert_cni_proto::{AddPod, DelPod, PodRef, Request, Response};
use serde_json::json;

use culvert::redirect::Netns;

use crate::runtime::{Runtime, Sandbox};

/// Where Debian's containernetworking-plugins put the reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";
/// The primary CNI's configuration file in each node's conf dir.
pub const PRIMARY_CONFIG: &str = "10-bridge.conflist";

/// The capabilities every lab daemon runs with: exactly those the DaemonSet grants
/// (manifests/daemonset.yaml; the kube layer checks the two agree), so every test that runs a
/// daemon shows they suffice. NET_ADMIN: netfilter rules, SO_MARK, IP_TRANSPARENT. NET_RAW:
/// transparent sockets. SYS_ADMIN: setns into pods. SYS_PTRACE: opening a pod's namespace
/// through /proc when its processes run as another user.
pub const NODE_CAPABILITIES: [&str; 4] = ["NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE"];

/// What to build.
#[derive(Debug, Clone)]
pub struct Spec {
    pub pods: Vec<PodSpec>,
    /// Mesh-wide PeerAuthentication (`PERMISSIVE` or `STRICT`).
    pub mesh_mode: &'static str,
    /// Namespaces whose pods are enrolled unless they say otherwise.
    pub enrolled_namespaces: Vec<String>,
    /// `(name, vip, port, target port, endpoint pod names)`, in namespace `demo`.
    pub services: Vec<(String, Ipv4Addr, u16, u16, Vec<String>)>,
    /// Extra flags for every `culvert node`.
    pub node_flags: Vec<String>,
    /// Discover workloads, services and enrollment from this Kubernetes API instead of the
    /// node files (which then name only the node and CA). The daemons run in the host's
    /// network namespace, where the test apiserver listens on loopback, with their admin API
    /// and probes on free loopback ports.
    pub kubeconfig: Option<PathBuf>,
    /// Node `i`'s `ca:` block (YAML flow text), replacing the lab's local CA; empty: the
    /// local CA on every node.
    pub ca: Vec<String>,
    /// `certTtl` of every node file, if not the default.
    pub cert_ttl: Option<String>,
    /// YAML appended to every node file as written (`policies:`, say).
    pub node_file_extra: String,
}

/// One pod of the lab.
#[derive(Debug, Clone)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    /// 0 or 1.
    pub node: usize,
    /// The pod's own enrollment setting; `None` follows its namespace.
    pub enrolled: Option<bool>,
    pub service_account: String,
    pub peer_authentication: Option<&'static str>,
    /// The pod's labels, for policy selectors.
    pub labels: Vec<(&'static str, &'static str)>,
    /// What the *other* node believes this pod's service account is. Lets a test make a client
    /// expect an identity the server does not hold.
    pub remote_service_account: Option<String>,
    /// Run the CNI ADD at start; otherwise the pod's namespace exists, unconnected, until
    /// [`Lab::cni_add`].
    pub attach: bool,
    /// Whether the node files name the pod; an unlisted pod (and its namespace, if no other
    /// pod names it) is one the daemons never heard of.
    pub listed: bool,
}

impl PodSpec {
    /// A pod of namespace `demo` with its own enrollment setting.
    pub fn new(name: &str, node: usize, enrolled: bool) -> Self {
        Self {
            name: name.to_owned(),
            namespace: "demo".to_owned(),
            node,
            enrolled: Some(enrolled),
            service_account: name.to_owned(),
            peer_authentication: None,
            labels: Vec::new(),
            remote_service_account: None,
            attach: true,
            listed: true,
        }
    }

    /// A pod that follows its namespace's enrollment.
    pub fn in_namespace(name: &str, node: usize, namespace: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            enrolled: None,
            ..Self::new(name, node, false)
        }
    }
}

/// A running node.
pub struct Node {
    pub name: String,
    pub netns: String,
    /// Address on the inter-node wire.
    pub wire_ip: Ipv4Addr,
    pub socket: PathBuf,
    pub config: PathBuf,
    pub log: PathBuf,
    pub state_dir: PathBuf,
    pub runtime: Runtime,
    child: Mutex<Option<Child>>,
}

/// A pod in the lab.
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub node: usize,
    pub netns: String,
    /// The address the node files give it; host-local must assign the same (checked on ADD).
    pub ip: Ipv4Addr,
    pub sandbox: Sandbox,
    netns_handle: Netns,
}

/// The second octet of this lab's pod subnets (`10.<net>.1.0/24` on node 0, `10.<net>.2.0/24`
/// on node 1). Labs started side by side in one process (the tests) each get their own, so no
/// two running labs share a pod address: a daemon finds running pods by address among every
/// process's network namespace, and those of another lab's pods are visible to it too. The
/// first lab gets 244 (10.244.x.x, the familiar pod range).
fn next_net() -> u8 {
    static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(244);
    NEXT.fetch_sub(1, std::sync::atomic::Ordering::Relaxed)
}

/// The whole lab; dropping it tears everything down.
pub struct Lab {
    pub tag: String,
    /// Second octet of the pod subnets (`10.<net>.1.0/24`, `10.<net>.2.0/24`): every lab in a
    /// process gets its own, so labs side by side never share a pod address.
    pub net: u8,
    pub dir: PathBuf,
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    culvert: PathBuf,
    spec: Spec,
    /// Processes a test started inside the lab (servers in pods), killed at teardown.
    helpers: Mutex<Vec<Child>>,
}

impl Lab {
    /// Builds the namespaces, writes the CA and node files, starts one daemon per node, and
    /// runs the CNI ADD for every pod marked `attach`. `tag` (≤ 8 chars) prefixes every name
    /// created. `culvert-cni` must sit next to `culvert`.
    pub fn start(tag: &str, culvert: &Path, spec: Spec) -> anyhow::Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            bail!("the lab needs root: it creates network namespaces and netfilter rules");
        }
        let plugin = culvert.with_file_name("culvert-cni");
        ensure!(
            plugin.exists(),
            "{} is missing: build it (cargo build -p culvert-cni)",
            plugin.display()
        );
        let bridge = Path::new(REFERENCE_PLUGINS).join("bridge");
        ensure!(
            bridge.exists(),
            "{} is missing: install containernetworking-plugins",
            bridge.display()
        );
        let dir = std::env::temp_dir().join(format!("culvert-lab-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut lab = Self {
            tag: tag.to_owned(),
            net: next_net(),
            dir,
            nodes: Vec::new(),
            pods: Vec::new(),
            culvert: culvert.to_owned(),
            spec,
            helpers: Mutex::default(),
        };
        lab.build_nodes()?;
        lab.build_pods()?;
        culvert::identity::write_root(&lab.dir, "Culvert lab CA")?;
        for i in 0..lab.nodes.len() {
            lab.write_node_file(i)?;
            lab.start_node(i)?;
        }
        let attach: Vec<String> = lab
            .spec
            .pods
            .iter()
            .filter(|p| p.attach)
            .map(|p| p.name.clone())
            .collect();
        for name in attach {
            lab.cni_add(&name)
                .with_context(|| format!("CNI ADD for {name}"))?;
        }
        Ok(lab)
    }

    fn build_nodes(&mut self) -> anyhow::Result<()> {
        let tag = &self.tag;
        for i in 0..2 {
            let netns = format!("{tag}-n{i}");
            ip(&["netns", "add", &netns])?;
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
            enable_forwarding(&netns)?;
            // The primary CNI's configuration; the node's daemon inserts culvert-cni itself.
            let conf_dir = self.dir.join(format!("net.d-n{i}"));
            std::fs::create_dir_all(&conf_dir)?;
            let primary = json!({
                "cniVersion": "1.0.0",
                "name": format!("lab-n{i}"),
                "plugins": [{
                    "type": "bridge",
                    "bridge": "cv0",
                    "isGateway": true,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": format!("10.{}.{}.0/24", self.net, i + 1)}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": self.dir.join(format!("ipam-n{i}")),
                    },
                }],
            });
            std::fs::write(
                conf_dir.join(PRIMARY_CONFIG),
                serde_json::to_vec_pretty(&primary)?,
            )?;
            let bin_dir = self.dir.join(format!("bin-n{i}"));
            self.nodes.push(Node {
                name: format!("node-{}", ["a", "b"][i]),
                wire_ip: Ipv4Addr::new(192, 0, 2, 1 + i as u8),
                socket: self.dir.join(format!("node{i}.sock")),
                config: self.dir.join(format!("node{i}.yaml")),
                log: self.dir.join(format!("node{i}.log")),
                state_dir: self.dir.join(format!("state-n{i}")),
                runtime: Runtime {
                    conf_dir,
                    cni_path: vec![bin_dir, PathBuf::from(REFERENCE_PLUGINS)],
                    cache_dir: self.dir.join(format!("cni-cache-n{i}")),
                    host_netns: netns.clone(),
                },
                netns,
                child: Mutex::default(),
            });
        }
        // The wire between the nodes, and routes to each other's pod range across it.
        let (a, b) = (format!("{tag}a"), format!("{tag}b"));
        ip(&["link", "add", &a, "type", "veth", "peer", "name", &b])?;
        for (i, end) in [a, b].iter().enumerate() {
            let node = &self.nodes[i];
            ip(&["link", "set", end, "netns", &node.netns])?;
            ip(&["-n", &node.netns, "link", "set", end, "name", "wire"])?;
            ip(&[
                "-n",
                &node.netns,
                "addr",
                "add",
                &format!("{}/24", node.wire_ip),
                "dev",
                "wire",
            ])?;
            ip(&["-n", &node.netns, "link", "set", "wire", "up"])?;
        }
        for i in 0..2 {
            let other = self.nodes[1 - i].wire_ip.to_string();
            let cidr = format!("10.{}.{}.0/24", self.net, 2 - i);
            ip(&[
                "-n",
                &self.nodes[i].netns,
                "route",
                "add",
                &cidr,
                "via",
                &other,
            ])?;
        }
        Ok(())
    }

    fn build_pods(&mut self) -> anyhow::Result<()> {
        let home = culvert::redirect::netns::home()?;
        // Pods ask host-local for the addresses the node files give them; every ADD checks it.
        let mut next_host = [2u8, 2u8];
        for (k, spec) in self.spec.pods.iter().enumerate() {
            let netns = format!("{}-p{k}", self.tag);
            let ipaddr = Ipv4Addr::new(10, self.net, spec.node as u8 + 1, next_host[spec.node]);
            next_host[spec.node] += 1;
            ip(&["netns", "add", &netns])?;
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
            // Each node sees only its own pods' namespaces: labs running side by side reuse the
            // same pod addresses, and a daemon finds running pods by address.
            let node_dir = self.dir.join(format!("netns-n{}", spec.node));
            std::fs::create_dir_all(&node_dir)?;
            std::os::unix::fs::symlink(netns_path(&netns), node_dir.join(&netns))?;
            let container_id = format!("{}{k}c0ffee", self.tag);
            let sandbox = Sandbox::kubernetes(
                &container_id,
                &netns_path(&netns),
                &spec.namespace,
                &spec.name,
                ipaddr,
            );
            self.pods.push(Pod {
                name: spec.name.clone(),
                namespace: spec.namespace.clone(),
                node: spec.node,
                netns_handle: Netns::open(&netns_path(&netns), home.clone())?,
                netns,
                ip: ipaddr,
                sandbox,
            });
        }
        Ok(())
    }

    fn write_node_file(&self, i: usize) -> anyhow::Result<()> {
        let ca = self
            .spec
            .ca
            .get(i)
            .map_or("{ cert: ca.crt, key: ca.key }", String::as_str);
        let ttl = self
            .spec
            .cert_ttl
            .as_ref()
            .map(|t| format!("certTtl: {t}\n"))
            .unwrap_or_default();
        if self.spec.kubeconfig.is_some() {
            let yaml = format!(
                "node: {}\ndiscovery: kubernetes\nca: {ca}\n{ttl}peerAuthentication: {}\n",
                self.nodes[i].name, self.spec.mesh_mode
            );
            std::fs::write(&self.nodes[i].config, yaml)?;
            return Ok(());
        }
        let mut yaml = format!(
            "node: {}\nca: {ca}\n{ttl}peerAuthentication: {}\nenrolledNamespaces: [{}]\nworkloads:\n",
            self.nodes[i].name,
            self.spec.mesh_mode,
            self.spec.enrolled_namespaces.join(", ")
        );
        for (pod, spec) in self.pods.iter().zip(&self.spec.pods) {
            if !spec.listed {
                continue;
            }
            let sa = match &spec.remote_service_account {
                Some(sa) if spec.node != i => sa,
                _ => &spec.service_account,
            };
            let _ = write!(
                yaml,
                "  - {{ name: {}, namespace: {}, serviceAccount: {sa}, node: {}, ips: [{}]",
                pod.name, pod.namespace, self.nodes[spec.node].name, pod.ip
            );
            if let Some(enrolled) = spec.enrolled {
                let _ = write!(yaml, ", enrolled: {enrolled}");
            }
            if let Some(mode) = spec.peer_authentication {
                let _ = write!(yaml, ", peerAuthentication: {mode}");
            }
            if !spec.labels.is_empty() {
                let labels: Vec<String> = spec
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect();
                let _ = write!(yaml, ", labels: {{ {} }}", labels.join(", "));
            }
            yaml.push_str(" }\n");
        }
        if !self.spec.services.is_empty() {
            yaml.push_str("services:\n");
        }
        for (name, vip, port, target, endpoints) in &self.spec.services {
            let ips: Vec<String> = endpoints
                .iter()
                .map(|e| format!("{{ ip: {} }}", self.pod(e).ip))
                .collect();
            let _ = writeln!(
                yaml,
                "  - {{ name: {name}, namespace: demo, vip: {vip}, ports: [{{ port: {port}, targetPort: {target} }}], endpoints: [{}] }}",
                ips.join(", ")
            );
        }
        yaml.push_str(&self.spec.node_file_extra);
        std::fs::write(&self.nodes[i].config, yaml)?;
        Ok(())
    }

    /// Starts (or restarts) node `i`'s daemon and waits for its registration socket.
    pub fn start_node(&self, i: usize) -> anyhow::Result<()> {
        let node = &self.nodes[i];
        let _ = std::fs::remove_file(&node.socket);
        let log = File::options().create(true).append(true).open(&node.log)?;
        // setpriv: root, but with only the DaemonSet's capabilities (permitted = bounding set).
        let bounding: Vec<String> = NODE_CAPABILITIES
            .iter()
            .map(|c| format!("+{}", c.to_lowercase()))
            .collect();
        let setpriv = [
            "setpriv".to_owned(),
            "--inh-caps=-all".to_owned(),
            format!("--bounding-set=-all,{}", bounding.join(",")),
            "--".to_owned(),
        ];
        let mut command = match &self.spec.kubeconfig {
            Some(kubeconfig) => {
                let mut command = Command::new(&setpriv[0]);
                command
                    .args(&setpriv[1..])
                    .arg(&self.culvert)
                    .arg("--log-format=json")
                    .arg("node")
                    .arg("--kubeconfig")
                    .arg(kubeconfig);
                // In the host's namespace here, not a node's: no probe rule there.
                command.args([
                    "--admin-addr",
                    "127.0.0.1:0",
                    "--readiness-addr",
                    "127.0.0.1:0",
                    "--metrics-addr",
                    "127.0.0.1:0",
                    "--probe-snat",
                    "false",
                ]);
                command
            }
            None => {
                let mut command = Command::new("ip");
                command
                    .args(["netns", "exec", &node.netns])
                    .args(setpriv)
                    .arg(&self.culvert);
                command.args(["--log-format=json", "node"]);
                command
            }
        };
        let child = command
            .arg("--config")
            .arg(&node.config)
            .arg("--cni-socket")
            .arg(&node.socket)
            .arg("--state-dir")
            .arg(&node.state_dir)
            .arg("--netns-dir")
            .arg(self.dir.join(format!("netns-n{i}")))
            .arg("--install-cni")
            .arg("--cni-conf-dir")
            .arg(&node.runtime.conf_dir)
            .arg("--cni-bin-dir")
            .arg(&node.runtime.cni_path[0])
            .arg("--cni-plugin")
            .arg(self.culvert.with_file_name("culvert-cni"))
            .args(&self.spec.node_flags)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.culvert.display()))?;
        let mut slot = node.child.lock().expect("lab lock poisoned");
        *slot = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        // The socket's file appears at bind, a moment before it listens: wait for a connect.
        while std::os::unix::net::UnixStream::connect(&node.socket).is_err() {
            if let Some(status) = slot.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!(
                    "{} exited with {status}; log: {}",
                    node.name,
                    node.log.display()
                );
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "{} did not open its socket within 20s",
                node.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Starts a second daemon for node `i` next to the running one, as a DaemonSet rolling
    /// update with `maxSurge` does, and waits until it serves registrations. Returns the old
    /// daemon, which the caller stops.
    pub fn surge(&self, i: usize) -> anyhow::Result<Child> {
        let old = self.nodes[i]
            .child
            .lock()
            .expect("lab lock poisoned")
            .take()
            .with_context(|| format!("{} runs no daemon", self.nodes[i].name))?;
        self.start_node(i)?;
        Ok(old)
    }

    /// Stops node `i`'s daemon with `signal` and waits for it to exit.
    pub fn stop_node(&self, i: usize, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        self.signal_node(i, signal)?;
        self.wait_node(i).map(drop)
    }

    /// Sends `signal` to node `i`'s daemon.
    pub fn signal_node(&self, i: usize, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let child = self.nodes[i].child.lock().expect("lab lock poisoned");
        if let Some(child) = child.as_ref() {
            // `ip netns exec` and setpriv exec the daemon, so the child pid is the daemon's.
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            nix::sys::signal::kill(pid, signal)?;
        }
        Ok(())
    }

    /// The process id of node `i`'s daemon, while it runs.
    pub fn daemon_pid(&self, i: usize) -> Option<u32> {
        self.nodes[i]
            .child
            .lock()
            .expect("lab lock poisoned")
            .as_ref()
            .map(Child::id)
    }

    /// Waits for node `i`'s daemon to exit and returns its status.
    pub fn wait_node(&self, i: usize) -> anyhow::Result<Option<std::process::ExitStatus>> {
        let child = self.nodes[i]
            .child
            .lock()
            .expect("lab lock poisoned")
            .take();
        Ok(match child {
            Some(mut child) => Some(child.wait()?),
            None => None,
        })
    }

    /// Sets which namespaces are enrolled: rewrites both node files, sends SIGHUP, and waits
    /// until both daemons have applied it.
    pub fn set_enrolled_namespaces(&mut self, namespaces: &[&str]) -> anyhow::Result<()> {
        self.spec.enrolled_namespaces = namespaces.iter().map(|n| (*n).to_owned()).collect();
        let reloads = |i: usize| self.log(i).matches("configuration reloaded").count();
        for i in 0..self.nodes.len() {
            let before = reloads(i);
            self.write_node_file(i)?;
            self.signal_node(i, nix::sys::signal::Signal::SIGHUP)?;
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while reloads(i) == before {
                ensure!(
                    std::time::Instant::now() < deadline,
                    "{} did not reload",
                    self.nodes[i].name
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Runs the CNI ADD for pod `name` through its node's chain, and checks that host-local
    /// gave it the address the node files say.
    pub fn cni_add(&self, name: &str) -> anyhow::Result<serde_json::Value> {
        let pod = self.pod(name);
        let result = self.nodes[pod.node].runtime.add(&pod.sandbox)?;
        let assigned = result["ips"][0]["address"].as_str().unwrap_or_default();
        ensure!(
            assigned == format!("{}/24", pod.ip),
            "host-local assigned {assigned} to {name}; the node files say {}",
            pod.ip
        );
        Ok(result)
    }

    /// Runs the CNI DEL for pod `name` through its node's chain.
    pub fn cni_del(&self, name: &str) -> anyhow::Result<()> {
        let pod = self.pod(name);
        self.nodes[pod.node].runtime.del(&pod.sandbox)
    }

    /// Runs the CNI CHECK for pod `name` through its node's chain.
    pub fn cni_check(&self, name: &str) -> anyhow::Result<()> {
        let pod = self.pod(name);
        self.nodes[pod.node].runtime.check(&pod.sandbox)
    }

    /// Sends an `AddPod` for pod `name` straight to its node's socket, as a plugin retry would.
    pub fn register(&self, name: &str) -> anyhow::Result<Response> {
        let pod = self.pod(name);
        let request = Request::AddPod(AddPod {
            container_id: pod.sandbox.container_id.clone(),
            netns: netns_path(&pod.netns).display().to_string(),
            ifname: "eth0".into(),
            pod: PodRef {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                uid: None,
            },
            ips: vec![pod.ip.into()],
        });
        self.call(pod.node, &request)
    }

    /// Sends a `DelPod` for pod `name` straight to its node's socket, as the plugin does: the
    /// daemon unwires the pod and leaves its network alone.
    pub fn unregister(&self, name: &str) -> anyhow::Result<Response> {
        let pod = self.pod(name);
        let request = Request::DelPod(DelPod {
            container_id: pod.sandbox.container_id.clone(),
            netns: Some(netns_path(&pod.netns).display().to_string()),
            pod: Some(PodRef {
                namespace: pod.namespace.clone(),
                name: pod.name.clone(),
                uid: None,
            }),
        });
        self.call(pod.node, &request)
    }

    pub fn call(&self, node: usize, request: &Request) -> anyhow::Result<Response> {
        let socket = &self.nodes[node].socket;
        culvert_cni_proto::unix::call(socket, request, Duration::from_secs(30))
            .with_context(|| format!("calling {}", socket.display()))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in the lab"))
    }

    /// The node's log so far.
    pub fn log(&self, node: usize) -> String {
        std::fs::read_to_string(&self.nodes[node].log).unwrap_or_default()
    }

    /// What the lab was built from.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// `GET path` on node `i`'s admin API, as JSON.
    pub fn admin(&self, i: usize, path: &str) -> anyhow::Result<serde_json::Value> {
        self.on_node(i, || admin_get(&self.log(i), path))
            .with_context(|| format!("{}'s admin API", self.nodes[i].name))
    }

    /// Node `i`'s metrics, as Prometheus scrapes them.
    pub fn metrics(&self, i: usize) -> anyhow::Result<String> {
        let scrape = || {
            let (status, body) = http_get(&self.log(i), "metrics", "/metrics")?;
            ensure!(status == 200, "GET /metrics: {status} {body}");
            Ok(body)
        };
        self.on_node(i, scrape)
            .with_context(|| format!("{}'s metrics", self.nodes[i].name))
    }

    /// Runs `f` where node `i`'s daemon listens: in its node's namespace (on that loopback),
    /// or here when the daemons run in the host's.
    fn on_node<T>(&self, i: usize, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
        if self.spec.kubeconfig.is_some() {
            return f();
        }
        let home = culvert::redirect::netns::home()?;
        Netns::open(&netns_path(&self.nodes[i].netns), home)?.run(f)?
    }

    /// A certificate cache issuing from the lab's CA (one-hour certificates): lets a test
    /// speak HBONE to the lab's daemons as a mesh peer.
    pub fn certs(&self) -> anyhow::Result<std::sync::Arc<culvert::identity::Cache>> {
        let ca = culvert::identity::LocalCa::load(
            &self.dir.join("ca.crt"),
            &self.dir.join("ca.key"),
            None,
            Duration::from_secs(3600),
        )?;
        Ok(culvert::identity::Cache::new(
            std::sync::Arc::new(ca),
            culvert::tls::provider(),
        ))
    }

    /// Starts capturing TCP on node 0's side of the inter-node wire.
    pub fn capture_wire(&self) -> anyhow::Result<crate::wire::Capture> {
        crate::wire::Capture::start(&self.nodes[0].netns, "wire", &self.dir.join("wire.pcap"))
    }

    /// Keeps `child` (a server started in a pod, say) until teardown, which kills it.
    pub fn own(&self, child: Child) {
        self.helpers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(child);
    }

    /// Kills the daemons and the owned processes and deletes every namespace; safe to call
    /// more than once.
    pub fn teardown(&self) {
        for mut child in self
            .helpers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        for i in 0..self.nodes.len() {
            let _ = self.stop_node(i, nix::sys::signal::Signal::SIGKILL);
        }
        for pod in &self.pods {
            let _ = ip(&["netns", "del", &pod.netns]);
        }
        for node in &self.nodes {
            let _ = ip(&["netns", "del", &node.netns]);
        }
    }
}

impl Pod {
    /// Runs `f` with this pod's network namespace as the calling thread's.
    pub fn enter<R>(&self, f: impl FnOnce() -> R) -> std::io::Result<R> {
        self.netns_handle.run(f)
    }

    /// Connects from inside the pod, as the pod's app would.
    pub fn connect(&self, to: SocketAddr) -> std::io::Result<TcpStream> {
        let socket = self.enter(|| {
            socket2::Socket::new(
                socket2::Domain::for_address(to),
                socket2::Type::STREAM,
                None,
            )
        })??;
        socket.connect_timeout(&to.into(), Duration::from_secs(15))?;
        Ok(socket.into())
    }

    /// Binds a listener inside the pod, as the pod's app would.
    pub fn listen(&self, port: u16) -> std::io::Result<TcpListener> {
        self.enter(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))?
    }

    /// Serves echo on `port` from a background thread for as long as the process lives.
    pub fn serve_echo(&self, port: u16) -> std::io::Result<()> {
        crate::serve(self.listen(port)?, crate::echo);
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// `GET path` on the admin API of the daemon that wrote `log`, as JSON.
pub fn admin_get(log: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    let (status, body) = http_get(log, "admin", path)?;
    ensure!(status == 200, "GET {path}: {status} {body}");
    Ok(serde_json::from_str(&body)?)
}

/// The status code of `GET path` on the probes of the daemon that wrote `log`.
pub fn probe(log: &str, path: &str) -> anyhow::Result<u16> {
    Ok(http_get(log, "probes", path)?.0)
}

/// `GET path` on the endpoint (`admin`, `probes`, `metrics`) of the daemon that wrote `log` (JSON
/// lines; the address is the last one it logged, so restarts are followed): status and body.
fn http_get(log: &str, what: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let addr = log
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "listening" && v["what"] == what)
        .find_map(|v| v["addr"].as_str()?.parse::<SocketAddr>().ok())
        .with_context(|| format!("no {what} address logged yet"))?;
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: culvert\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("malformed HTTP status line")?;
    Ok((status, body.to_owned()))
}

pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/var/run/netns").join(name)
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running ip")?;
    if !output.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Turns on IPv4 forwarding in a node namespace (through /proc: `sysctl` is not always installed).
fn enable_forwarding(netns: &str) -> anyhow::Result<()> {
    let status = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "sh",
            "-c",
            "echo 1 > /proc/sys/net/ipv4/ip_forward",
        ])
        .status()
        .context("running sh")?;
    if !status.success() {
        bail!("enabling IPv4 forwarding in {netns} failed");
    }
    Ok(())
}
