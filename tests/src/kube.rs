//! The Kubernetes layer's harness: a real kube-apiserver + etcd per test (started by
//! `scripts/kube-test-env`, envtest-style: no kubelet, scheduler or controllers), `kubectl` to
//! drive it, the shipped manifests applied to it, and lab pods mirrored as Pod objects.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{Lab, culvert_bin};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// One apiserver + etcd, stopped on drop.
pub struct Cluster {
    pub dir: PathBuf,
    /// Admin (system:masters) kubeconfig.
    pub kubeconfig: PathBuf,
    kubectl: PathBuf,
    /// pilot-discovery, built by `scripts/kube-test-env build`.
    istiod: PathBuf,
}

impl Cluster {
    /// Starts a fresh control plane; fails loudly when the binaries are not built
    /// (`scripts/kube-test-env build`) or it does not come up.
    pub fn start(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("culvert-kube-{tag}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new(repo().join("scripts/kube-test-env"))
            .arg("start")
            .arg(&dir)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the test apiserver did not start (scripts/kube-test-env): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let env = std::fs::read_to_string(dir.join("env")).unwrap();
        let var = |name: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("{name} missing from {}/env", dir.display()))
                .to_owned()
        };
        Self {
            kubeconfig: var("KUBECONFIG").into(),
            kubectl: var("KUBECTL").into(),
            istiod: var("ISTIOD").into(),
            dir,
        }
    }

    /// A fresh control plane with the shipped manifests applied and a namespace `shop`,
    /// enrolled or not: where most tests start.
    pub fn with_shop(tag: &str, enrolled: bool) -> Self {
        let cluster = Self::start(tag);
        cluster.install();
        cluster.namespace("shop", enrolled);
        cluster
    }

    /// Runs kubectl as admin; `Err` carries its stderr.
    pub fn try_kubectl(&self, args: &[&str]) -> Result<String, String> {
        self.kubectl_as(&self.kubeconfig, args, None)
    }

    /// Runs kubectl as admin and returns stdout; panics with stderr when it fails.
    pub fn kubectl(&self, args: &[&str]) -> String {
        self.try_kubectl(args)
            .unwrap_or_else(|e| panic!("kubectl {}: {e}", args.join(" ")))
    }

    /// Runs kubectl with `kubeconfig`, feeding `stdin` if given.
    pub fn kubectl_as(
        &self,
        kubeconfig: &Path,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, String> {
        let mut child = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        input
            .write_all(stdin.unwrap_or_default().as_bytes())
            .unwrap();
        drop(input);
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// `kubectl apply -f -` as admin.
    pub fn apply(&self, yaml: &str) {
        self.kubectl_as(&self.kubeconfig, &["apply", "-f", "-"], Some(yaml))
            .unwrap_or_else(|e| panic!("applying\n{yaml}\n: {e}"));
    }

    /// Applies the shipped manifests, unchanged, with the policy CRDs (as in a cluster
    /// without Istio) created first.
    pub fn install(&self) {
        let manifests = repo().join("manifests");
        self.kubectl(&["create", "-f", manifests.join("crds").to_str().unwrap()]);
        self.kubectl(&[
            "apply",
            "-f",
            manifests.join("namespace.yaml").to_str().unwrap(),
        ]);
        self.kubectl(&["apply", "-k", manifests.to_str().unwrap()]);
        // A CRD serves its kinds a moment after it is created.
        crate::eventually(
            "the policy kinds to be served",
            std::time::Duration::from_secs(20),
            || {
                self.try_kubectl(&["get", "authorizationpolicies,peerauthentications", "-A"])
                    .ok()
            },
        );
    }

    /// A kubeconfig holding a token minted (TokenRequest) for the node daemon's service
    /// account, as a DaemonSet pod would have. Needs [`Self::install`].
    pub fn node_kubeconfig(&self) -> PathBuf {
        let token = self.kubectl(&[
            "-n",
            "culvert-system",
            "create",
            "token",
            "culvert-node",
            "--duration=2h",
        ]);
        let admin = std::fs::read_to_string(&self.kubeconfig).unwrap();
        let node: String = admin
            .lines()
            .map(|l| match l.trim_start().strip_prefix("token: ") {
                Some(_) => format!("    token: {}", token.trim()),
                None => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let path = self.dir.join("node.kubeconfig");
        std::fs::write(&path, node).unwrap();
        path
    }

    /// A token minted (TokenRequest) for `namespace/service_account`, bound to pod
    /// `bound_pod` when given, for `audience`.
    pub fn token(
        &self,
        namespace: &str,
        service_account: &str,
        bound_pod: Option<&str>,
        audience: &str,
    ) -> String {
        let mut args = vec![
            "-n",
            namespace,
            "create",
            "token",
            service_account,
            "--duration=1h",
            "--audience",
            audience,
        ];
        if let Some(pod) = bound_pod {
            args.extend(["--bound-object-kind", "Pod", "--bound-object-name", pod]);
        }
        self.kubectl(&args).trim().to_owned()
    }

    /// [`Self::token`]'s token with its lifetime moved an hour into the past, re-signed with
    /// this apiserver's service-account key: a genuine token, expired. (TokenRequest will not
    /// mint one shorter than 10 minutes, and a test should not wait that long.)
    pub fn expired_token(
        &self,
        namespace: &str,
        service_account: &str,
        bound_pod: Option<&str>,
        audience: &str,
    ) -> String {
        use base64::Engine as _;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
        let token = self.token(namespace, service_account, bound_pod, audience);
        let [header, claims, _]: [&str; 3] =
            token.split('.').collect::<Vec<_>>().try_into().unwrap();
        let mut claims: serde_json::Value =
            serde_json::from_slice(&B64.decode(claims).unwrap()).unwrap();
        // Issued two hours ago, expired one hour ago.
        let issued = claims["iat"].as_i64().unwrap();
        claims["iat"] = (issued - 7200).into();
        claims["nbf"] = (issued - 7200).into();
        claims["exp"] = (issued - 3600).into();
        let signing_input = format!("{header}.{}", B64.encode(claims.to_string()));
        // The key scripts/kube-test-env made: P-256, so the tokens are ES256.
        let key = std::fs::read_to_string(self.dir.join("sa.key")).unwrap();
        let der = pem::parse(key).unwrap().into_contents();
        let key = aws_lc_rs::signature::EcdsaKeyPair::from_private_key_der(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &der,
        )
        .unwrap();
        let signature = key
            .sign(
                &aws_lc_rs::rand::SystemRandom::new(),
                signing_input.as_bytes(),
            )
            .unwrap();
        format!("{signing_input}.{}", B64.encode(signature.as_ref()))
    }

    /// The admin kubeconfig with its credentials replaced by `token`.
    pub fn kubeconfig_with(&self, name: &str, token: &str) -> PathBuf {
        let admin = std::fs::read_to_string(&self.kubeconfig).unwrap();
        let text: String = admin
            .lines()
            .map(|l| match l.trim_start().strip_prefix("token: ") {
                Some(_) => format!("    token: {token}"),
                None => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n");
        let path = self.dir.join(format!("{name}.kubeconfig"));
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Creates the node agent's Pod object on `node` (the DaemonSet's pod, as the scheduler
    /// leaves it) and writes a token bound to it, for the CA's audience, into the returned file.
    pub fn node_agent(&self, node: &str) -> PathBuf {
        let name = format!("culvert-node-{node}");
        self.pod(&PodObject {
            name: &name,
            namespace: "culvert-system",
            node,
            service_account: "culvert-node",
            mode: None,
            host_network: true,
        });
        let token = self.token("culvert-system", "culvert-node", Some(&name), "istio-ca");
        let path = self.dir.join(format!("{name}.token"));
        std::fs::write(&path, token).unwrap();
        path
    }

    /// Starts `culvert ca serve` against this cluster as the manifests' `culvert-ca` service
    /// account, on a free loopback port. Needs [`Self::install`].
    pub fn start_ca(&self, tag: &str, extra: &[&str]) -> CaServer {
        let token = self.kubectl(&[
            "-n",
            "culvert-system",
            "create",
            "token",
            "culvert-ca",
            "--duration=2h",
        ]);
        let kubeconfig = self.kubeconfig_with(&format!("ca-{tag}"), token.trim());
        let free = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let (addr, readiness) = (free(), free());
        let log = self.dir.join(format!("ca-{tag}.log"));
        let mut ca = CaServer {
            child: None,
            addr,
            readiness,
            log,
            args: vec![
                "serve".into(),
                "--kubeconfig".into(),
                kubeconfig.display().to_string(),
                "--listen".into(),
                addr.to_string(),
                "--readiness".into(),
                readiness.to_string(),
            ],
        };
        ca.args.extend(extra.iter().map(|s| (*s).to_owned()));
        ca.start();
        ca
    }

    /// Starts istiod (`pilot-discovery discovery`, built by `scripts/kube-test-env build`)
    /// against this cluster, as the istiod chart runs it for ambient mode: its CA trusts
    /// Culvert's node account to impersonate (`CA_TRUSTED_NODE_ACCOUNTS`), tokens for the
    /// `istio-ca` audience, cluster id `Kubernetes`. It runs with the admin kubeconfig (its own
    /// RBAC is not under test) and every port on free loopback ports. Returns once it is ready
    /// and has published its root into `culvert-system`.
    pub fn start_istiod(&self) -> Istiod {
        assert!(
            self.istiod.exists(),
            "{} is not built (scripts/kube-test-env build)",
            self.istiod.display()
        );
        self.apply("apiVersion: v1\nkind: Namespace\nmetadata: { name: istio-system }\n");
        let work = self.dir.join("istiod");
        std::fs::create_dir_all(&work).unwrap();
        let mesh = work.join("mesh.yaml");
        std::fs::write(&mesh, "trustDomain: cluster.local\n").unwrap();
        let free = || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let (secure, plain, http, https, monitoring, ctrlz) =
            (free(), free(), free(), free(), free(), free());
        let log = self.dir.join("istiod.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(&self.istiod)
            .current_dir(&work)
            .arg("discovery")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--meshConfig")
            .arg(&mesh)
            .args(["--secureGRPCAddr", &secure.to_string()])
            .args(["--grpcAddr", &plain.to_string()])
            .args(["--httpAddr", &http.to_string()])
            .args(["--httpsAddr", &https.to_string()])
            .args(["--monitoringAddr", &monitoring.to_string()])
            .args(["--ctrlz_port", &ctrlz.port().to_string()])
            .env("POD_NAMESPACE", "istio-system")
            .env("POD_NAME", "istiod-test")
            .env("REVISION", "default")
            .env("CA_TRUSTED_NODE_ACCOUNTS", "culvert-system/culvert-node")
            .env("VALIDATION_WEBHOOK_CONFIG_NAME", "")
            .env("INJECTION_WEBHOOK_CONFIG_NAME", "")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let istiod = Istiod {
            child,
            addr: secure,
            log,
        };
        crate::eventually("istiod ready", std::time::Duration::from_secs(90), || {
            use std::io::{Read as _, Write as _};
            let mut s = std::net::TcpStream::connect(http).ok()?;
            s.write_all(b"GET /ready HTTP/1.0\r\n\r\n").ok()?;
            let mut answer = String::new();
            s.read_to_string(&mut answer).ok()?;
            answer.starts_with("HTTP/1.0 200").then_some(())
        });
        crate::eventually(
            "istiod to publish its root in culvert-system",
            std::time::Duration::from_secs(60),
            || self.istio_bundle().ok(),
        );
        istiod
    }

    /// The root istiod published in `culvert-system` (its `istio-ca-root-cert` ConfigMap).
    pub fn istio_bundle(&self) -> Result<String, String> {
        let out = self.try_kubectl(&[
            "-n",
            "culvert-system",
            "get",
            "configmap",
            "istio-ca-root-cert",
            "-o",
            "jsonpath={.data.root-cert\\.pem}",
        ])?;
        if out.contains("BEGIN CERTIFICATE") {
            Ok(out)
        } else {
            Err(format!("no root in istio-ca-root-cert: {out}"))
        }
    }

    /// The trust bundle culvert ca published.
    pub fn bundle(&self) -> String {
        let out = self.kubectl(&[
            "-n",
            "culvert-system",
            "get",
            "configmap",
            "culvert-ca-root-cert",
            "-o",
            "jsonpath={.data.root-cert\\.pem}",
        ]);
        assert!(out.contains("BEGIN CERTIFICATE"), "no bundle: {out}");
        out
    }

    /// Runs `culvert ca` (the CLI) as admin.
    pub fn ca_cli(&self, args: &[&str]) -> String {
        let out = Command::new(ca_bin())
            .args(args)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "culvert-ca {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn stop_apiserver(&self) {
        self.script("stop-apiserver");
    }

    pub fn start_apiserver(&self) {
        self.script("start-apiserver");
    }

    /// Compacts etcd past every resource version handed out so far: a watch that resumes
    /// from one of them is answered 410 Gone and must relist.
    pub fn compact_etcd(&self) {
        self.script("compact");
    }

    /// Deletes pod `namespace/name` from etcd behind the apiserver's back (while it is down,
    /// say): no watch event will ever tell of it, only a relist.
    pub fn delete_pod_in_etcd(&self, namespace: &str, name: &str) {
        self.script_with(
            "etcd-delete",
            &[&format!("/registry/pods/{namespace}/{name}")],
        );
    }

    fn script(&self, verb: &str) {
        self.script_with(verb, &[]);
    }

    fn script_with(&self, verb: &str, args: &[&str]) {
        let status = Command::new(repo().join("scripts/kube-test-env"))
            .arg(verb)
            .arg(&self.dir)
            .args(args)
            .stdin(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "kube-test-env {verb} failed");
    }

    /// Creates namespace `name`, enrolled or not.
    pub fn namespace(&self, name: &str, enrolled: bool) {
        let labels = if enrolled {
            format!("labels: {{ {MODE}: ambient }}")
        } else {
            String::new()
        };
        self.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{ name: {name}, {labels} }}\n"
        ));
    }

    /// Creates a Pod object as the scheduler would leave it: bound to `node`, no IP yet.
    pub fn pod(&self, pod: &PodObject<'_>) {
        self.apply(&pod.yaml());
    }

    /// Creates many Pod objects in one request.
    pub fn pods(&self, pods: &[PodObject<'_>]) {
        let all: Vec<String> = pods.iter().map(PodObject::yaml).collect();
        self.apply(&all.join("---\n"));
    }

    /// Sets a pod's IP in its status, as the kubelet does once the sandbox runs.
    pub fn set_pod_ip(&self, namespace: &str, name: &str, ip: &str) {
        let status = format!(r#"{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}]}}"#);
        self.patch_pod_status(namespace, name, &status);
    }

    /// Merges `status` (JSON) into a pod's status, as its kubelet would.
    pub fn patch_pod_status(&self, namespace: &str, name: &str, status: &str) {
        let patch = format!(r#"{{"status":{status}}}"#);
        self.kubectl(&[
            "-n",
            namespace,
            "patch",
            "pod",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch,
        ]);
    }

    /// Mirrors every lab pod as a Pod object on its lab node (labelled `none` when the lab
    /// spec opts it out), runs its CNI ADD, and publishes its IP.
    pub fn attach_lab_pods(&self, lab: &Lab) {
        self.attach_lab_pods_publishing(lab, |_| true);
    }

    /// [`Self::attach_lab_pods`], publishing the IPs only of the pods `publish` picks by name.
    pub fn attach_lab_pods_publishing(&self, lab: &Lab, publish: impl Fn(&str) -> bool) {
        for pod in &lab.pods {
            let spec = lab.spec().pods.iter().find(|p| p.name == pod.name).unwrap();
            self.pod(&PodObject {
                name: &pod.name,
                namespace: &pod.namespace,
                node: &lab.nodes[pod.node].name,
                service_account: &spec.service_account,
                mode: spec.enrolled.map(|e| if e { "ambient" } else { "none" }),
                host_network: false,
            });
        }
        for pod in &lab.pods {
            // The daemon may not have seen the Pod object yet; the runtime would retry.
            crate::eventually(
                &format!("CNI ADD of {}", pod.name),
                std::time::Duration::from_secs(10),
                || lab.cni_add(&pod.name).ok(),
            );
            if publish(&pod.name) {
                self.set_pod_ip(&pod.namespace, &pod.name, &pod.ip.to_string());
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/kube-test-env"))
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// The enrollment label.
pub const MODE: &str = culvert::discovery::MODE_LABEL;

/// A Pod object to create.
pub struct PodObject<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub node: &'a str,
    pub service_account: &'a str,
    /// The pod's own `culvert.io/dataplane-mode` label, if any.
    pub mode: Option<&'a str>,
    pub host_network: bool,
}

impl PodObject<'_> {
    fn yaml(&self) -> String {
        let labels = self
            .mode
            .map(|mode| format!("labels: {{ {MODE}: {mode} }}"))
            .unwrap_or_default();
        format!(
            "apiVersion: v1
kind: Pod
metadata: {{ name: {}, namespace: {}, {labels} }}
spec:
  nodeName: {}
  serviceAccountName: {}
  hostNetwork: {}
  containers: [{{ name: app, image: registry.invalid/app }}]
",
            self.name, self.namespace, self.node, self.service_account, self.host_network
        )
    }
}

/// A lab whose daemons discover everything from `cluster`, using the node service account's
/// token. Pods are created unattached: see [`Cluster::attach_lab_pods`].
pub fn lab(tag: &str, cluster: &Cluster, mut spec: crate::Spec) -> Lab {
    for pod in &mut spec.pods {
        pod.attach = false;
    }
    spec.kubeconfig = Some(cluster.node_kubeconfig());
    Lab::start(tag, &culvert_bin(), spec).unwrap_or_else(|e| panic!("starting the lab: {e:#}"))
}

/// Names of the workloads node `i` reports with `enrolled == enrolled`, as `namespace/name`.
pub fn workloads(lab: &Lab, i: usize, enrolled: bool) -> Vec<String> {
    let all = lab.admin(i, "/workloads").unwrap();
    let mut names: Vec<String> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["enrolled"] == enrolled)
        .map(|w| {
            format!(
                "{}/{}",
                w["namespace"].as_str().unwrap(),
                w["name"].as_str().unwrap()
            )
        })
        .collect();
    names.sort();
    names
}

/// The `culvert-ca` binary next to `culvert`.
pub fn ca_bin() -> PathBuf {
    let bin = culvert_bin().with_file_name("culvert-ca");
    assert!(
        bin.exists(),
        "{} is not built (cargo build --bins)",
        bin.display()
    );
    bin
}

/// A running `culvert ca serve`; killed on drop.
pub struct CaServer {
    child: Option<std::process::Child>,
    pub addr: std::net::SocketAddr,
    pub readiness: std::net::SocketAddr,
    pub log: PathBuf,
    args: Vec<String>,
}

impl CaServer {
    /// Starts the process and waits until it is ready.
    pub fn start(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(ca_bin())
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let url = format!("{}", self.readiness);
        crate::eventually(
            &format!("culvert ca ready on {url}"),
            std::time::Duration::from_secs(20),
            || {
                use std::io::{Read as _, Write as _};
                let mut s = std::net::TcpStream::connect(self.readiness).ok()?;
                s.write_all(b"GET /healthz/ready HTTP/1.0\r\n\r\n").ok()?;
                let mut out = String::new();
                s.read_to_string(&mut out).ok()?;
                out.starts_with("HTTP/1.0 200").then_some(())
            },
        );
    }

    /// Sends SIGTERM (as a rolling update does) and waits for the process to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("culvert ca is not running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        child.wait().unwrap()
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(std::process::Child::id)
    }

    /// Kills the process (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn endpoint(&self) -> CaEndpoint {
        CaEndpoint {
            addr: self.addr,
            server_name: "culvert-ca.culvert-system.svc",
            roots: "culvert-system/culvert-ca-root-cert",
        }
    }

    /// The node file's `ca:` block for a daemon whose token is in `token_file`.
    pub fn node_block(&self, token_file: &Path) -> String {
        self.endpoint().node_block(token_file)
    }
}

/// A running istiod; killed on drop.
pub struct Istiod {
    child: std::process::Child,
    pub addr: std::net::SocketAddr,
    pub log: PathBuf,
}

impl Istiod {
    pub fn endpoint(&self) -> CaEndpoint {
        CaEndpoint {
            addr: self.addr,
            server_name: "istiod.istio-system.svc",
            roots: "culvert-system/istio-ca-root-cert",
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Istiod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where an Istio CA API server listens, the name its certificate carries, and the ConfigMap
/// (`namespace/name`, key `root-cert.pem`) holding the roots it chains to.
#[derive(Debug, Clone, Copy)]
pub struct CaEndpoint {
    pub addr: std::net::SocketAddr,
    pub server_name: &'static str,
    pub roots: &'static str,
}

impl CaEndpoint {
    /// The node file's `ca:` block for a daemon whose token is in `token_file`.
    pub fn node_block(&self, token_file: &Path) -> String {
        format!(
            "{{ istio: {{ address: '{}', serverName: {}, tokenFile: '{}', roots: {{ configMap: {} }} }} }}",
            self.addr,
            self.server_name,
            token_file.display(),
            self.roots,
        )
    }
}

impl Drop for CaServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a direct call to the CA API asks.
pub struct CaCall<'a> {
    pub token: &'a str,
    pub impersonate: Option<&'a str>,
    pub csr: &'a str,
    pub ttl_seconds: i64,
}

/// Calls `CreateCertificate` on `to`, verifying the server against `bundle` (PEM); the chain, or
/// the status code and message.
pub fn ca_call(
    to: CaEndpoint,
    bundle: &str,
    call: &CaCall<'_>,
) -> Result<Vec<String>, (tonic::Code, String)> {
    use culvert_ca_proto::istio_certificate_service_client::IstioCertificateServiceClient;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(culvert::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tls = std::sync::Arc::new(tls);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let connector = tower::service_fn(move |_: http::Uri| {
            let tls = tls.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(to.addr).await?;
                let name = rustls::pki_types::ServerName::try_from(to.server_name).unwrap();
                let tls = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        let channel =
            tonic::transport::Endpoint::from_shared(format!("https://{}:15012", to.server_name))
                .unwrap()
                .connect_with_connector(connector)
                .await
                .map_err(|e| (tonic::Code::Unavailable, e.to_string()))?;
        let mut request = tonic::Request::new(culvert_ca_proto::IstioCertificateRequest {
            csr: call.csr.to_owned(),
            validity_duration: call.ttl_seconds,
            metadata: call.impersonate.map(culvert_ca_proto::impersonating),
        });
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", call.token).parse().unwrap(),
        );
        // As node daemons send it; istiod picks its node authorizer by it.
        request.metadata_mut().insert(
            culvert_ca_proto::CLUSTER_ID_HEADER,
            culvert_ca_proto::DEFAULT_CLUSTER_ID.parse().unwrap(),
        );
        IstioCertificateServiceClient::new(channel)
            .create_certificate(request)
            .await
            .map(|r| r.into_inner().cert_chain)
            .map_err(|s| (s.code(), s.message().to_owned()))
    })
}

/// A CSR as node daemons send it for `uri`, edited by `edit`.
pub fn csr_for(uri: &str, edit: impl FnOnce(&mut rcgen::CertificateParams)) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    edit(&mut params);
    params.serialize_request(&key).unwrap().pem().unwrap()
}
