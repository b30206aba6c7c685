//! The in-process layer's harness: real node daemons built by `app::start_with` inside the test
//! process, no root, everything on loopback.
//!
//! Pods are placed by the loopback capture stand-in (`culvert::test_util::Loopback`): a pod's
//! listeners and sockets live on its own loopback address (127.N.node.host, one N per test) and
//! its rules are a record in memory, since real redirection needs root (the netns layer has
//! it). Nothing else is stood in for: the CA, TLS, HTTP/2, the registration socket, the admin
//! API and the data path are the daemon's own. Access-log lines are captured from tracing.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use culvert::app::{self, Node};
use culvert::config::{CniInstall, NodeArgs, PortFlags, RedirectChoice};
use culvert::test_util::{Ca, Loopback, TempDir, loopback_net};
use culvert_cni_proto::{AddPod, PodRef, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Every test's pods use the default per-pod ports, each pod on its own address.
pub const PORTS: PortFlags = PortFlags {
    outbound: 15001,
    inbound_plaintext: 15006,
    hbone: 15008,
};

/// The port test apps listen on.
pub const APP: u16 = 8080;

/// One workload of the node files: `(name, node index, host part, service account)`; the
/// service account node `i` believes in can be overridden per node with [`Topology::believe`].
#[derive(Debug, Clone)]
pub struct Workload {
    pub name: &'static str,
    pub node: usize,
    pub host: u8,
    pub service_account: String,
    /// What the *other* node thinks the service account is, when it differs.
    pub believed: Option<String>,
}

/// Two nodes' worth of node files, CA and directories; start the nodes with [`Self::start`].
pub struct Topology {
    pub net: u8,
    pub namespace: String,
    pub ca: Ca,
    pub dir: TempDir,
    pub workloads: Vec<Workload>,
    /// Extra node-file lines for both nodes (`peerAuthentication: STRICT`, ...).
    pub extra: String,
    pub drain_timeout: Duration,
    /// `(per node, per peer)` caps on inbound HBONE connections.
    pub hbone_limits: (usize, usize),
    /// `(per node, per peer)` caps on inbound HBONE streams.
    pub stream_limits: (usize, usize),
    /// How often a node puts back pod rules someone removed.
    pub heal_interval: Duration,
}

/// A running in-process node.
pub struct TestNode {
    pub node: Node,
    pub capture: Arc<Loopback>,
    pub config: PathBuf,
    pub socket: PathBuf,
}

impl Topology {
    /// Enrolled workloads `(name, node)`, numbered from host 2 on each node.
    pub fn new(tag: &str, workloads: &[(&'static str, usize)]) -> Self {
        init_logs();
        let net = loopback_net();
        let mut next = [2u8, 2u8];
        let workloads = workloads
            .iter()
            .map(|&(name, node)| {
                let host = next[node];
                next[node] += 1;
                Workload {
                    name,
                    node,
                    host,
                    service_account: name.to_owned(),
                    believed: None,
                }
            })
            .collect();
        Self {
            net,
            namespace: format!("{tag}{net}"),
            ca: Ca::new(tag),
            dir: TempDir::new(tag),
            workloads,
            extra: String::new(),
            drain_timeout: Duration::from_secs(5),
            hbone_limits: (16384, 256),
            stream_limits: (65536, 4096),
            heal_interval: Duration::from_secs(3),
        }
    }

    /// Makes the node other than `name`'s own believe its service account is `sa`.
    pub fn believe(&mut self, name: &str, sa: &str) {
        let w = self.workloads.iter_mut().find(|w| w.name == name).unwrap();
        w.believed = Some(sa.to_owned());
    }

    pub fn ip(&self, name: &str) -> IpAddr {
        let w = self.workloads.iter().find(|w| w.name == name).unwrap();
        self.host_ip(w.node, w.host)
    }

    /// An address in node `node`'s pod range.
    pub fn host_ip(&self, node: usize, host: u8) -> IpAddr {
        Ipv4Addr::new(127, self.net, node as u8 + 1, host).into()
    }

    /// A Service VIP of this topology (nothing listens there).
    pub fn vip(&self) -> IpAddr {
        Ipv4Addr::new(127, self.net, 9, 10).into()
    }

    /// Node `i`'s file.
    pub fn node_file(&self, i: usize) -> String {
        let mut yaml = format!(
            "node: node-{i}\nca: {{ cert: {}, key: {} }}\n{}workloads:\n",
            self.ca.cert().display(),
            self.ca.key().display(),
            self.extra
        );
        for w in &self.workloads {
            let sa = match &w.believed {
                Some(sa) if w.node != i => sa,
                _ => &w.service_account,
            };
            yaml.push_str(&format!(
                "  - {{ name: {}, namespace: {}, serviceAccount: {sa}, node: node-{}, ips: [{}], enrolled: true, labels: {{ version: v1 }} }}\n",
                w.name,
                self.namespace,
                w.node,
                self.host_ip(w.node, w.host)
            ));
        }
        if let Some(server) = self.workloads.iter().find(|w| w.name == "server") {
            yaml.push_str(&format!(
                "services:\n  - {{ name: echo, namespace: {}, vip: {}, ports: [{{ port: 80, targetPort: {APP} }}], endpoints: [{{ ip: {} }}] }}\n",
                self.namespace,
                self.vip(),
                self.host_ip(server.node, server.host)
            ));
        }
        yaml
    }

    /// Writes node `i`'s file and starts its daemon in this process.
    pub async fn start(&self, i: usize) -> TestNode {
        let config = self.dir.path().join(format!("node{i}.yaml"));
        std::fs::write(&config, self.node_file(i)).unwrap();
        let socket = self.dir.path().join(format!("node{i}.sock"));
        let args = NodeArgs {
            config: config.clone(),
            node_name: None,
            kubeconfig: None,
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            readiness_addr: "127.0.0.1:0".parse().unwrap(),
            ready_file: Some(self.dir.path().join(format!("ready{i}"))),
            metrics_addr: "127.0.0.1:0".parse().unwrap(),
            cni_socket: socket.clone(),
            redirect: RedirectChoice::Auto,
            drain_timeout: self.drain_timeout,
            heal_interval: self.heal_interval,
            probe_snat: true,
            state_dir: self.dir.path().join(format!("state{i}")),
            netns_dirs: vec![],
            ports: PORTS,
            hbone_max_connections: self.hbone_limits.0,
            hbone_max_connections_per_peer: self.hbone_limits.1,
            hbone_max_streams: self.stream_limits.0,
            hbone_max_streams_per_peer: self.stream_limits.1,
            cni: CniInstall {
                install: false,
                cni_bin_dir: self.dir.path().join("bin"),
                cni_conf_dir: self.dir.path().join("net.d"),
                cni_plugin: None,
            },
        };
        let capture = Arc::new(Loopback::default());
        let node = app::start_with(args, capture.clone())
            .await
            .unwrap_or_else(|e| panic!("starting node {i}: {e:#}"));
        TestNode {
            node,
            capture,
            config,
            socket,
        }
    }

    /// Starts both nodes and registers `client` on node 0 and `server` on node 1: where most
    /// tests begin.
    pub async fn start_pair(&self) -> (TestNode, TestNode) {
        let (a, b) = (self.start(0).await, self.start(1).await);
        assert_eq!(
            self.register(&a, "client").await,
            Response::Added { enrolled: true }
        );
        assert_eq!(
            self.register(&b, "server").await,
            Response::Added { enrolled: true }
        );
        (a, b)
    }

    /// Registers workload `name` with its node over the registration socket, as culvert-cni
    /// does after the primary CNI plugin.
    pub async fn register(&self, node: &TestNode, name: &str) -> Response {
        let request = Request::AddPod(AddPod {
            container_id: format!("{}-{name}", self.namespace),
            netns: format!("/run/netns/{}-{name}", self.namespace),
            ifname: "eth0".into(),
            pod: PodRef {
                namespace: self.namespace.clone(),
                name: name.to_owned(),
                uid: None,
            },
            ips: vec![self.ip(name)],
        });
        call(&node.socket, request).await
    }
}

impl TestNode {
    /// Hands a new connection of pod `name`'s app, to `dst`, to the pod's outbound path, as the
    /// outbound listener does after redirection. Returns the app's end of the connection.
    pub async fn connect_from(&self, namespace: &str, name: &str, dst: SocketAddr) -> TcpStream {
        let pod = self
            .node
            .registry()
            .pod(namespace, name)
            .unwrap_or_else(|| panic!("{namespace}/{name} is not wired"));
        let src_ip = pod.ips[0];
        // The app's socket, on the pod's address; the daemon gets the other end.
        let listener = tokio::net::TcpListener::bind(SocketAddr::new(src_ip, 0))
            .await
            .unwrap();
        let app = TcpStream::connect(listener.local_addr().unwrap());
        let (app, accepted) = tokio::join!(app, listener.accept());
        let (captured, src) = accepted.unwrap();
        let proxy = self.node.proxy().clone();
        tokio::spawn(async move { proxy.outbound(pod, captured, src, dst).await });
        app.unwrap()
    }
}

/// Sends `request` to the registration socket at `socket`.
pub async fn call(socket: &std::path::Path, request: Request) -> Response {
    let socket = socket.to_owned();
    tokio::task::spawn_blocking(move || {
        culvert_cni_proto::unix::call(&socket, &request, Duration::from_secs(10)).unwrap()
    })
    .await
    .unwrap()
}

/// `GET path` on `addr`: status and body.
pub async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    request(TcpStream::connect(addr).await.unwrap(), path).await
}

/// `GET path` on `addr` from the loopback address `from`.
pub async fn get_from(from: IpAddr, addr: SocketAddr, path: &str) -> (u16, String) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    request(socket.connect(addr).await.unwrap(), path).await
}

async fn request(mut stream: TcpStream, path: &str) -> (u16, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: culvert\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

/// Every JSON log line the process has written so far.
pub fn logs() -> Vec<serde_json::Value> {
    let buf = LOGS.get().expect("init_logs").lock().unwrap();
    String::from_utf8_lossy(&buf)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The access-log lines of pod `namespace/name`.
pub fn access(pod: &str) -> Vec<serde_json::Value> {
    logs()
        .into_iter()
        .filter(|v| v["target"] == "access" && v["pod"] == pod)
        .collect()
}

static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();

/// Captures the process's logs as JSON lines (once per process; tests tell their lines apart by
/// their own namespace).
fn init_logs() {
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = Capture(buf.clone());
        let _ = tracing_subscriber::fmt()
            .with_env_filter("info")
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .try_init();
        buf
    });
}

#[derive(Clone)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
