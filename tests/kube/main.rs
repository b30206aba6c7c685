//! Kubernetes layer: each test runs its own real kube-apiserver + etcd on loopback
//! (scripts/kube-test-env; no kubelet or controllers, so tests bind pods and publish their IPs
//! themselves), applies the shipped manifests, and runs `culvert node` with a token minted for
//! the manifests' service account. Tests that build a lab also need root.

#![allow(clippy::unwrap_used, clippy::disallowed_types)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

mod ca;
mod chart;
mod policy;

use culvert_tests::kube::{self, Cluster, PodObject};
use culvert_tests::{
    ECHO, Lab, PodSpec, access_line, addr, echo_ok, eventually, spec, wire, wired,
};

const WAIT: Duration = Duration::from_secs(20);

/// No request of the daemon's was refused by RBAC: no warning or error in its log mentions
/// a 403.
fn assert_no_403(log: &str) {
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| !l.contains(r#""level":"INFO""#) && !l.contains(r#""level":"DEBUG""#))
        .filter(|l| l.contains("orbidden") || l.contains("code: 403"))
        .collect();
    assert!(
        refused.is_empty(),
        "the API refused the daemon: {refused:#?}"
    );
}

/// Node 0's outbound and node 1's inbound HBONE access-log lines both name `src` and `dst`.
fn assert_hbone_lines_name(lab: &Lab, src: &str, dst: &str) {
    for (node, direction) in [(0, "outbound"), (1, "inbound")] {
        let line = access_line(lab, node, |v| {
            v["direction"] == direction && v["transport"] == "hbone"
        });
        assert_eq!(
            (line["src.identity"].as_str(), line["dst.identity"].as_str()),
            (Some(src), Some(dst)),
            "node {node}, {direction}"
        );
    }
}

/// Waits until node `node` knows pod `pod` enrolled and by its address.
fn wait_known(lab: &Lab, node: usize, pod: &str) {
    let ip = lab.pod(pod).ip.to_string();
    eventually(&format!("node {node} to know {pod} at {ip}"), WAIT, || {
        let all = lab.admin(node, "/workloads").ok()?;
        all.as_array()?
            .iter()
            .any(|w| w["name"] == pod && w["enrolled"] == true && w["ips"][0] == ip)
            .then_some(())
    });
}

/// `culvert node` alone in the test's network namespace (no lab), as node-b; killed when the
/// test ends, passed or not.
struct Daemon {
    child: std::process::Child,
    dir: std::path::PathBuf,
}

impl Daemon {
    fn start(cluster: &Cluster, kubeconfig: &std::path::Path) -> Self {
        let dir = cluster.dir.join("daemon");
        std::fs::create_dir_all(dir.join("netns")).unwrap();
        culvert::identity::write_root(&dir, "test CA").unwrap();
        std::fs::write(
            dir.join("node.yaml"),
            "discovery: kubernetes\nca: { cert: ca.crt, key: ca.key }\n",
        )
        .unwrap();
        let child = Command::new(culvert_tests::culvert_bin())
            .args(["--log-format=json", "node", "--node-name=node-b"])
            .arg("--config")
            .arg(dir.join("node.yaml"))
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--cni-socket")
            .arg(dir.join("cni.sock"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--netns-dir")
            .arg(dir.join("netns"))
            .args(["--admin-addr=127.0.0.1:0", "--readiness-addr=127.0.0.1:0"])
            .arg("--metrics-addr=127.0.0.1:0")
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(dir.join("node.log")).unwrap())
            .spawn()
            .unwrap();
        Self { child, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("node.log")).unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
#[ignore = "needs the test apiserver: scripts/kube-test-env build"]
fn manifests_apply_with_a_server_side_dry_run_and_for_real() {
    let cluster = Cluster::start("manifests");
    let dir = kube::repo().join("manifests");
    let dir = dir.to_str().unwrap();
    // A dry run cannot create the namespace the other objects go into: create it first.
    cluster.kubectl(&["apply", "-f", &format!("{dir}/namespace.yaml")]);
    let dry = cluster.kubectl(&["apply", "-k", dir, "--dry-run=server"]);
    for object in [
        "serviceaccount/culvert-node",
        "clusterrole.rbac.authorization.k8s.io/culvert-node",
        "clusterrolebinding.rbac.authorization.k8s.io/culvert-node",
        "configmap/culvert-node",
        "daemonset.apps/culvert-node",
        "serviceaccount/culvert-ca",
        "role.rbac.authorization.k8s.io/culvert-ca",
        "service/culvert-ca",
        "deployment.apps/culvert-ca",
    ] {
        assert!(
            dry.contains(&format!("{object} created (server dry run)")),
            "{object} missing from the dry run:\n{dry}"
        );
    }
    let err = cluster
        .try_kubectl(&["-n", "culvert-system", "get", "daemonset", "culvert-node"])
        .unwrap_err();
    assert!(
        err.contains("NotFound"),
        "the dry run created something: {err}"
    );

    let real = cluster.kubectl(&["apply", "-k", dir]);
    assert_eq!(real.matches(" created").count(), 14, "{real}");
    let again = cluster.kubectl(&["apply", "-k", dir]);
    assert_eq!(again.matches(" unchanged").count(), 15, "{again}");

    let ds: serde_json::Value = serde_json::from_str(&cluster.kubectl(&[
        "-n",
        "culvert-system",
        "get",
        "daemonset",
        "culvert-node",
        "-o",
        "json",
    ]))
    .unwrap();
    let pod = &ds["spec"]["template"]["spec"];
    // The node daemon mounts no Secret (no CA key); its CA credential is a projected token.
    let volumes = pod["volumes"].as_array().unwrap();
    assert!(
        volumes.iter().all(|v| v.get("secret").is_none()),
        "{volumes:#?}"
    );
    let token = volumes.iter().find(|v| v["name"] == "ca-token").unwrap();
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"]["audience"],
        "istio-ca"
    );
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["serviceAccountName"], "culvert-node");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["tolerations"][0]["operator"], "Exists");
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"], 1);
    let container = &pod["containers"][0];
    // Ready is a file in the pod's own volume: on the shared host network the old daemon of a
    // surge update would answer an HTTP probe on 15021 for the new one.
    assert_eq!(
        container["readinessProbe"]["exec"]["command"],
        serde_json::json!(["culvert", "ready", "--file=/run/culvert-self/ready"])
    );
    let args = container["args"].as_array().unwrap();
    assert!(
        args.iter()
            .any(|a| a == "--ready-file=/run/culvert-self/ready"),
        "{args:?}"
    );
    assert!(
        container.get("ports").is_none(),
        "a host port would keep the surge daemon from scheduling"
    );
    // The lab runs every daemon with exactly these, so the other layers test that they suffice.
    assert_eq!(
        container["securityContext"]["capabilities"],
        serde_json::json!({ "add": culvert_lab::NODE_CAPABILITIES, "drop": ["ALL"] })
    );
    assert!(container["resources"]["requests"]["memory"].is_string());
}

#[test]
#[ignore = "needs the test apiserver: scripts/kube-test-env build"]
fn the_node_service_account_syncs_without_a_403_and_can_neither_read_secrets_nor_write_pods() {
    let cluster = Cluster::with_shop("rbac", true);
    cluster.pod(&PodObject {
        name: "web",
        namespace: "shop",
        node: "node-a",
        service_account: "web",
        mode: None,
        host_network: false,
    });
    cluster.set_pod_ip("shop", "web", "10.244.1.2");
    cluster.apply(
        "apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec: { clusterIP: 10.96.0.80, ports: [{ port: 80, targetPort: 8080 }] }
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: { name: web-1, namespace: shop, labels: { kubernetes.io/service-name: web } }
addressType: IPv4
ports: [{ port: 8080 }]
endpoints: [{ addresses: [10.244.1.2] }]
",
    );
    let node_kubeconfig = cluster.node_kubeconfig();

    let daemon = Daemon::start(&cluster, &node_kubeconfig);
    let log = || daemon.log();
    let web = eventually("the daemon to sync from the API", WAIT, || {
        let services = culvert_lab::admin_get(&log(), "/services").ok()?;
        services
            .as_array()?
            .iter()
            .find(|s| s["vip"] == "10.96.0.80:80")
            .cloned()
    });
    assert_eq!(web["service"]["endpoints"][0], "10.244.1.2:8080");
    let workloads = culvert_lab::admin_get(&log(), "/workloads").unwrap();
    assert_eq!(
        workloads[0]["identity"],
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(workloads[0]["enrolled"], true);
    let log = daemon.log();
    drop(daemon);
    assert_no_403(&log);

    // What the token may do is what the daemon needs, and no more.
    let can_i = |verb: &str, resource: &str| {
        cluster
            .kubectl_as(
                &node_kubeconfig,
                &["auth", "can-i", verb, resource, "-A"],
                None,
            )
            // "no" comes with exit status 1 and nothing on stderr.
            .or_else(|e| {
                if e.trim().is_empty() {
                    Ok("no".into())
                } else {
                    Err(e)
                }
            })
            .unwrap()
            .trim()
            .to_owned()
    };
    for resource in [
        "pods",
        "namespaces",
        "services",
        "nodes",
        "endpointslices.discovery.k8s.io",
        "peerauthentications.security.istio.io",
        "authorizationpolicies.security.istio.io",
    ] {
        for verb in ["list", "watch"] {
            assert_eq!(can_i(verb, resource), "yes", "{verb} {resource}");
        }
    }
    for (verb, resource) in [
        ("get", "secrets"),
        ("list", "secrets"),
        ("create", "pods"),
        ("patch", "pods"),
        ("delete", "pods"),
        ("update", "namespaces"),
        ("get", "configmaps"),
    ] {
        assert_eq!(can_i(verb, resource), "no", "{verb} {resource}");
    }
    let secrets = cluster
        .kubectl_as(&node_kubeconfig, &["get", "secrets", "-A"], None)
        .unwrap_err();
    assert!(secrets.contains("Forbidden"), "{secrets}");
    let write = cluster
        .kubectl_as(
            &node_kubeconfig,
            &["-n", "shop", "label", "pod", "web", "x=y"],
            None,
        )
        .unwrap_err();
    assert!(write.contains("Forbidden"), "{write}");
}

#[test]
#[ignore = "needs the test apiserver: scripts/kube-test-env build"]
fn the_daemon_is_not_ready_and_takes_no_registrations_until_the_api_has_been_listed() {
    let cluster = Cluster::with_shop("ready", true);
    let kubeconfig = cluster.node_kubeconfig();
    cluster.stop_apiserver();
    let daemon = Daemon::start(&cluster, &kubeconfig);
    let socket = daemon.dir.join("cni.sock");
    let status = eventually("the probes to answer", WAIT, || {
        culvert_lab::probe(&daemon.log(), "/healthz/ready").ok()
    });
    assert_eq!(status, 503);
    assert_eq!(
        culvert_lab::probe(&daemon.log(), "/healthz/live").unwrap(),
        200
    );
    // Long enough for several watch retries: still not serving registrations.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        culvert_lab::probe(&daemon.log(), "/healthz/ready").unwrap(),
        503
    );
    assert!(
        !socket.exists(),
        "registrations served before the API was listed"
    );
    // `culvert check` says so, with its fix.
    let ready = |log: &str| {
        let checks = culvert_lab::admin_get(log, "/check").ok()?;
        checks
            .as_array()?
            .iter()
            .find(|c| c["check"] == "ready")
            .cloned()
    };
    let before = eventually("the admin API to answer /check", WAIT, || {
        ready(&daemon.log())
    });
    assert_eq!(before["ok"], false, "{before}");
    assert!(
        before["detail"].as_str().unwrap().contains("not ready"),
        "{before}"
    );
    assert!(before["fix"].is_string(), "{before}");

    cluster.start_apiserver();
    eventually(
        "the daemon to become ready",
        Duration::from_secs(60),
        || {
            let ready = culvert_lab::probe(&daemon.log(), "/healthz/ready").ok()?;
            (ready == 200).then_some(())
        },
    );
    assert!(socket.exists());
    assert_eq!(ready(&daemon.log()).unwrap()["ok"], true);
    let workloads = culvert_lab::admin_get(&daemon.log(), "/workloads").unwrap();
    assert_eq!(workloads, serde_json::json!([]));
    let enrollment = std::fs::read_to_string(daemon.dir.join("state/enrollment.json")).unwrap();
    assert!(enrollment.contains("\"shop\""), "{enrollment}");
}

#[test]
#[ignore = "needs root and the test apiserver"]
fn labelling_a_namespace_enrolls_its_pods_and_removing_the_label_releases_them() {
    let cluster = Cluster::with_shop("label", false);
    let lab = kube::lab(
        "kblabel",
        &cluster,
        spec(vec![
            PodSpec::in_namespace("client", 0, "shop"),
            PodSpec::in_namespace("server", 1, "shop"),
            PodSpec {
                enrolled: Some(false),
                ..PodSpec::in_namespace("legacy", 1, "shop")
            },
        ]),
    );
    cluster.pod(&PodObject {
        name: "agent",
        namespace: "shop",
        node: &lab.nodes[1].name,
        service_account: "agent",
        mode: None,
        host_network: true,
    });
    cluster.attach_lab_pods(&lab);
    lab.pod("server").serve_echo(ECHO).unwrap();
    eventually("every pod known, none enrolled", WAIT, || {
        (kube::workloads(&lab, 1, false).len() == 4).then_some(())
    });
    assert!(wired(&lab, 0).is_empty() && wired(&lab, 1).is_empty());

    cluster.kubectl(&[
        "label",
        "namespace",
        "shop",
        "culvert.io/dataplane-mode=ambient",
    ]);
    for (node, pods) in [(0, vec!["shop/client"]), (1, vec!["shop/server"])] {
        eventually(&format!("node {node} to wire {pods:?}"), WAIT, || {
            (wired(&lab, node) == pods).then_some(())
        });
    }
    assert_eq!(
        kube::workloads(&lab, 1, true),
        ["shop/client", "shop/server"]
    );
    assert_eq!(
        kube::workloads(&lab, 1, false),
        ["shop/agent", "shop/legacy"],
        "the opted-out pod and the host-network pod stay out"
    );
    client_reaches_server_over_hbone(&lab, b"enrolled by label");

    cluster.kubectl(&["label", "namespace", "shop", "culvert.io/dataplane-mode-"]);
    for node in [0, 1] {
        eventually(&format!("node {node} to release its pods"), WAIT, || {
            wired(&lab, node).is_empty().then_some(())
        });
    }
    assert!(kube::workloads(&lab, 0, true).is_empty());
    // Released pods talk as they did before Culvert: directly, in plaintext.
    let capture = lab.capture_wire().unwrap();
    echo_ok(
        &lab,
        "client",
        addr(&lab, "server", ECHO),
        b"RELEASED-MARKER-5e1b",
    );
    let segments = capture.finish().unwrap();
    assert!(wire::contains(&segments, b"RELEASED-MARKER-5e1b"));
    assert_no_403(&lab.log(0));
    assert_no_403(&lab.log(1));
}

/// Node 0's `shop/client` echoes `payload` through node 1's `shop/server`, which logs it as
/// inbound HBONE from the client's identity.
fn client_reaches_server_over_hbone(lab: &Lab, payload: &[u8]) {
    wait_known(lab, 0, "server");
    echo_ok(lab, "client", addr(lab, "server", ECHO), payload);
    let line = access_line(lab, 1, |v| {
        v["direction"] == "inbound" && v["transport"] == "hbone" && v["pod"] == "shop/server"
    });
    assert_eq!(
        line["src.identity"],
        "spiffe://cluster.local/ns/shop/sa/client"
    );
}

/// A draining daemon wires nothing: in an update its successor owns the node's pods, and a pod
/// wired by the old daemon would lose its listeners when that one exits.
#[test]
#[ignore = "needs root and the test apiserver"]
fn a_draining_daemon_wires_no_pod_of_a_namespace_labelled_meanwhile() {
    use std::io::{Read, Write};
    let cluster = Cluster::with_shop("drainwire", false);
    cluster.namespace("held", true);
    let mut spec = spec(vec![
        PodSpec::in_namespace("client", 0, "shop"),
        PodSpec::in_namespace("server", 1, "shop"),
        PodSpec::in_namespace("holder", 0, "held"),
        PodSpec::in_namespace("holdee", 1, "held"),
    ]);
    spec.node_flags = vec!["--drain-timeout".into(), "60s".into()];
    let lab = kube::lab("kbdrainwire", &cluster, spec);
    cluster.attach_lab_pods(&lab);
    lab.pod("server").serve_echo(ECHO).unwrap();
    lab.pod("holdee").serve_echo(ECHO).unwrap();
    for (node, pod) in [(0, "held/holder"), (1, "held/holdee")] {
        eventually(&format!("node {node} to wire {pod}"), WAIT, || {
            (wired(&lab, node) == [pod]).then_some(())
        });
    }
    wait_known(&lab, 0, "holdee");
    // A connection that keeps node 0's daemon draining.
    let mut held = lab
        .pod("holder")
        .connect(addr(&lab, "holdee", ECHO))
        .unwrap();
    held.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let ping = |held: &mut std::net::TcpStream| {
        held.write_all(b"ping").unwrap();
        let mut back = [0u8; 4];
        held.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"ping");
    };
    ping(&mut held);

    lab.signal_node(0, nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    eventually("node 0 to start draining", WAIT, || {
        lab.log(0).contains("\"draining\"").then_some(())
    });
    cluster.kubectl(&[
        "label",
        "namespace",
        "shop",
        "culvert.io/dataplane-mode=ambient",
    ]);
    eventually("node 1 to wire shop/server", WAIT, || {
        (wired(&lab, 1) == ["held/holdee", "shop/server"]).then_some(())
    });
    // Node 0's daemon saw the same event (it still follows the API, for the policies of what
    // it carries); give it time to act on it, then check that it did not.
    std::thread::sleep(Duration::from_secs(2));
    let log = lab.log(0);
    let (_, since) = log.split_once("\"draining\"").unwrap();
    assert!(
        !since.contains("pod wired"),
        "the draining daemon wired a pod:\n{since}"
    );
    ping(&mut held);

    drop(held);
    let status = lab.wait_node(0).unwrap().unwrap();
    assert!(status.success(), "node 0's daemon: {status}");
    // Its successor wires the newly enrolled pod at start, and it talks over HBONE.
    lab.start_node(0).unwrap();
    eventually("the new daemon to wire shop/client", WAIT, || {
        (wired(&lab, 0) == ["held/holder", "shop/client"]).then_some(())
    });
    client_reaches_server_over_hbone(&lab, b"after the drain");
}

#[test]
#[ignore = "needs root and the test apiserver"]
fn a_service_vip_resolves_to_its_ready_endpoint_and_a_removed_endpoint_is_not_used() {
    let cluster = Cluster::with_shop("svc", true);
    let lab = kube::lab(
        "kbsvc",
        &cluster,
        spec(vec![
            PodSpec::in_namespace("client", 0, "shop"),
            PodSpec::in_namespace("blue", 1, "shop"),
            PodSpec::in_namespace("green", 1, "shop"),
        ]),
    );
    cluster.attach_lab_pods(&lab);
    lab.pod("blue").serve_echo(ECHO).unwrap();
    lab.pod("green").serve_echo(ECHO).unwrap();
    let slice = |endpoints: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{ name: echo-1, namespace: shop, labels: {{ kubernetes.io/service-name: echo }} }}
addressType: IPv4
ports: [{{ name: http, port: {ECHO} }}]
endpoints: [{endpoints}]
"
        )
    };
    let (blue, green) = (lab.pod("blue").ip, lab.pod("green").ip);
    cluster.apply(&format!(
        "apiVersion: v1
kind: Service
metadata: {{ name: echo, namespace: shop }}
spec: {{ clusterIP: 10.96.0.50, ports: [{{ name: http, port: 80, targetPort: http }}] }}
---
{}",
        slice(&format!(
            "{{ addresses: [{blue}], conditions: {{ ready: true }} }}, {{ addresses: [{green}], conditions: {{ ready: false }} }}"
        ))
    ));
    let vip: SocketAddr = "10.96.0.50:80".parse().unwrap();
    let endpoints_of = |lab: &Lab| {
        let services = lab.admin(0, "/services").unwrap();
        services
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["vip"] == "10.96.0.50:80")
            .map(|s| s["service"]["endpoints"].clone())
    };
    eventually("the VIP with its ready endpoint", WAIT, || {
        (endpoints_of(&lab)? == serde_json::json!([format!("{blue}:{ECHO}")])).then_some(())
    });
    let hbone_to = |pod: &str| culvert_tests::hbone_streams(&lab, 1, &format!("shop/{pod}"));
    for _ in 0..4 {
        echo_ok(&lab, "client", vip, b"to the VIP");
    }
    eventually("four HBONE streams to blue", WAIT, || {
        (hbone_to("blue") == 4).then_some(())
    });
    let line = access_line(&lab, 1, |v| v["pod"] == "shop/blue");
    assert_eq!(
        line["src.identity"],
        "spiffe://cluster.local/ns/shop/sa/client"
    );
    assert_eq!(line["dst.addr"], format!("{blue}:{ECHO}"));
    assert_eq!(hbone_to("green"), 0, "a not-ready endpoint was used");

    // Blue goes away, green becomes ready.
    cluster.apply(&slice(&format!(
        "{{ addresses: [{green}], conditions: {{ ready: true }} }}"
    )));
    eventually("the VIP to lose blue", WAIT, || {
        (endpoints_of(&lab)? == serde_json::json!([format!("{green}:{ECHO}")])).then_some(())
    });
    for _ in 0..4 {
        echo_ok(&lab, "client", vip, b"to the VIP again");
    }
    eventually("four HBONE streams to green", WAIT, || {
        (hbone_to("green") == 4).then_some(())
    });
    assert_eq!(hbone_to("blue"), 4, "the removed endpoint was used");
}

#[test]
#[ignore = "needs root and the test apiserver"]
fn an_endpoint_whose_pod_has_not_published_its_ip_is_still_reached_over_hbone() {
    let cluster = Cluster::with_shop("early", true);
    let lab = kube::lab(
        "kbearly",
        &cluster,
        spec(vec![
            PodSpec::in_namespace("client", 0, "shop"),
            PodSpec::in_namespace("server", 1, "shop"),
        ]),
    );
    // The server's status never gets its IP: only the EndpointSlice names it.
    cluster.attach_lab_pods_publishing(&lab, |name| name != "server");
    lab.pod("server").serve_echo(ECHO).unwrap();
    let server = lab.pod("server").ip;
    let node = &lab.nodes[1].name;
    cluster.apply(&format!(
        "apiVersion: v1
kind: Service
metadata: {{ name: api, namespace: shop }}
spec: {{ clusterIP: 10.96.0.60, ports: [{{ port: 80, targetPort: {ECHO} }}] }}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{ name: api-1, namespace: shop, labels: {{ kubernetes.io/service-name: api }} }}
addressType: IPv4
ports: [{{ port: {ECHO} }}]
endpoints:
  - {{ addresses: [{server}], nodeName: {node}, targetRef: {{ kind: Pod, name: server, namespace: shop }} }}
"
    ));
    wait_known(&lab, 0, "server");
    let capture = lab.capture_wire().unwrap();
    echo_ok(
        &lab,
        "client",
        "10.96.0.60:80".parse().unwrap(),
        b"EARLY-MARKER-44d0",
    );
    let segments = capture.finish().unwrap();
    assert!(
        !wire::contains(&segments, b"EARLY-MARKER-44d0"),
        "plaintext on the wire"
    );
    let line = access_line(&lab, 1, |v| v["pod"] == "shop/server");
    assert_eq!(line["transport"], "hbone");
    assert_eq!(
        line["src.identity"],
        "spiffe://cluster.local/ns/shop/sa/client"
    );
    // The server's node names the Service by the endpoint its slice puts on that node.
    assert_eq!(line["dst.service"], "api.shop.svc.cluster.local");
    let scrape = lab.metrics(1).unwrap();
    let received = scrape
        .lines()
        .find(|l| {
            l.starts_with("istio_tcp_received_bytes_total{reporter=\"destination\"")
                && l.contains("destination_service=\"api.shop.svc.cluster.local\"")
                && l.contains("destination_service_name=\"api\"")
        })
        .unwrap_or_else(|| panic!("no destination-side series for the Service:\n{scrape}"));
    assert!(received.ends_with(" 17"), "{received}");
}

/// The metrics label a connection with each end's node locality, from the Nodes' topology
/// labels, and the config dump shows it; a relabelled node's new zone labels the connections
/// that follow.
#[test]
#[ignore = "needs root and the test apiserver"]
fn connections_carry_each_ends_node_locality_and_a_relabelled_nodes_new_zone() {
    let cluster = Cluster::with_shop("locality", true);
    let lab = kube::lab(
        "kblocal",
        &cluster,
        spec(vec![
            PodSpec::in_namespace("client", 0, "shop"),
            PodSpec::in_namespace("server", 1, "shop"),
        ]),
    );
    cluster.attach_lab_pods(&lab);
    lab.pod("server").serve_echo(ECHO).unwrap();
    let label_node = |i: usize, zone: &str| {
        cluster.apply(&format!(
            "apiVersion: v1
kind: Node
metadata:
  name: {}
  labels: {{ topology.kubernetes.io/region: eu-west, topology.kubernetes.io/zone: {zone} }}
",
            lab.nodes[i].name
        ));
    };
    let zones_known = |node: usize, client: &str, server: &str| {
        eventually(
            &format!("node {node} to know the zones {client} and {server}"),
            WAIT,
            || {
                let dump = lab.admin(node, "/config_dump").ok()?;
                let zone = |name: &str| {
                    let workloads = dump["workloads"].as_array()?;
                    let w = workloads.iter().find(|w| w["name"] == name)?;
                    w["locality"]["zone"].as_str().map(str::to_owned)
                };
                (zone("client")? == client && zone("server")? == server).then_some(())
            },
        );
    };
    label_node(0, "eu-west-1a");
    label_node(1, "eu-west-1b");
    for node in 0..2 {
        zones_known(node, "eu-west-1a", "eu-west-1b");
    }
    client_reaches_server_over_hbone(&lab, b"ZONE-ONE");
    let opened = |node: usize, reporter: &str, zone: &str| {
        let scrape = lab.metrics(node).unwrap();
        let localities = format!(
            "source_region=\"eu-west\",source_zone=\"eu-west-1a\",\
             destination_region=\"eu-west\",destination_zone=\"{zone}\"}}"
        );
        scrape
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "istio_tcp_connections_opened_total{{reporter=\"{reporter}\""
                )) && l.contains(&localities)
            })
            .map(|l| l.rsplit(' ').next().unwrap().to_owned())
            .unwrap_or_else(|| panic!("no {reporter} series with {localities}:\n{scrape}"))
    };
    assert_eq!(opened(0, "source", "eu-west-1b"), "1");
    assert_eq!(opened(1, "destination", "eu-west-1b"), "1");

    // Node 1 moves zone: the next connection is labelled with the new one, the first keeps
    // its series.
    label_node(1, "eu-west-1c");
    zones_known(0, "eu-west-1a", "eu-west-1c");
    echo_ok(&lab, "client", addr(&lab, "server", ECHO), b"ZONE-TWO");
    assert_eq!(opened(0, "source", "eu-west-1c"), "1");
    assert_eq!(opened(0, "source", "eu-west-1b"), "1");
    assert_no_403(&lab.log(0));
    // Kept with the lab's files: `culvert workloads -f` and istioctl read it.
    let dump = lab.admin(0, "/config_dump").unwrap();
    std::fs::write(lab.dir.join("config_dump.json"), dump.to_string()).unwrap();
}

#[test]
#[ignore = "needs root and the test apiserver"]
fn traffic_keeps_flowing_while_the_apiserver_is_down_and_expired_watches_relist_without_loss() {
    let cluster = Cluster::with_shop("outage", true);
    let lab = kube::lab(
        "kbapi",
        &cluster,
        spec(vec![
            PodSpec::in_namespace("client", 0, "shop"),
            PodSpec::in_namespace("server", 1, "shop"),
            PodSpec::in_namespace("gone", 1, "shop"),
        ]),
    );
    cluster.attach_lab_pods(&lab);
    lab.pod("server").serve_echo(ECHO).unwrap();
    let to_server = addr(&lab, "server", ECHO);
    wait_known(&lab, 0, "server");
    wait_known(&lab, 0, "gone");
    eventually("node 1 to wire both its pods", WAIT, || {
        (wired(&lab, 1) == ["shop/gone", "shop/server"]).then_some(())
    });
    echo_ok(&lab, "client", to_server, b"before");

    cluster.stop_apiserver();
    for i in 0..5 {
        echo_ok(
            &lab,
            "client",
            to_server,
            format!("during outage {i}").as_bytes(),
        );
    }
    assert_eq!(wired(&lab, 0), ["shop/client"], "the outage released a pod");
    eventually(
        "six HBONE streams logged by the server's node",
        WAIT,
        || (culvert_tests::hbone_streams(&lab, 1, "shop/server") == 6).then_some(()),
    );
    // The watches noticed.
    eventually("the daemon to log the lost watch", WAIT, || {
        lab.log(0).contains("watch failed").then_some(())
    });

    // While it is down, pod `gone` is deleted behind its back and etcd's history is compacted
    // away: every watch resumes from a resource version that is gone (410 Gone) and has to
    // relist, and only the relist can tell that `gone` went.
    cluster.delete_pod_in_etcd("shop", "gone");
    cluster.compact_etcd();
    // A restarted apiserver answers 403 until its RBAC cache has loaded (readyz does not wait
    // for it); the daemon retries. Such refusals are the restart's, not the manifests': they
    // are told apart by time, from the restart until every kind has relisted.
    let restarted_at = lab.log(0).len();
    cluster.start_apiserver();
    for node in 0..2 {
        eventually(
            &format!("node {node} to relist all seven kinds"),
            WAIT,
            || {
                let relisted: BTreeSet<String> = culvert_tests::log_lines(&lab, node)
                    .iter()
                    .filter(|v| v["message"] == "relisted")
                    .filter_map(|v| v["kind"].as_str().map(str::to_owned))
                    .collect();
                (relisted.len() == 7).then_some(())
            },
        );
    }
    let relisted_at = lab.log(0).len();
    // The metrics count the outage and the relists, per kind, and the objects received
    // (this cluster has no EndpointSlice and no Node: no controller or kubelet runs).
    let scrape = lab.metrics(0).unwrap();
    let count = |metric: &str, kind: &str| {
        let (metric, kind) = (
            format!("culvert_discovery_{metric}_total"),
            format!("kind=\"{kind}\""),
        );
        culvert_tests::scrape::sample(&scrape, &metric, &[&kind])
    };
    for kind in ["Pod", "Namespace", "Service", "EndpointSlice", "Node"] {
        assert!(count("relists", kind) >= 1.0, "{kind} relists");
        assert!(count("watch_errors", kind) >= 1.0, "{kind} watch errors");
    }
    for kind in ["Pod", "Namespace", "Service"] {
        assert!(count("events", kind) >= 1.0, "{kind} events");
    }
    assert_eq!(count("events", "EndpointSlice"), 0.0);
    assert_eq!(count("events", "Node"), 0.0);
    // The relist dropped what went and nothing else: no store was emptied on the way.
    eventually("node 1 to release the deleted pod", WAIT, || {
        (wired(&lab, 1) == ["shop/server"]).then_some(())
    });
    eventually("node 0 to forget the deleted pod", WAIT, || {
        (!kube::workloads(&lab, 0, true).contains(&"shop/gone".to_owned())).then_some(())
    });
    assert_eq!(wired(&lab, 0), ["shop/client"]);
    for node in 0..2 {
        let released: Vec<String> = culvert_tests::log_lines(&lab, node)
            .iter()
            .filter(|v| v["message"] == "pod released")
            .map(|v| v["pod"].to_string())
            .collect();
        let expected: &[&str] = if node == 1 { &["\"shop/gone\""] } else { &[] };
        assert_eq!(released, expected, "pods released by node {node}");
    }
    echo_ok(&lab, "client", to_server, b"after the relist");
    eventually("the seventh HBONE stream in the server's log", WAIT, || {
        (culvert_tests::hbone_streams(&lab, 1, "shop/server") == 7).then_some(())
    });

    // A change made after the restart reaches the daemons: the server opts out.
    cluster.kubectl(&[
        "-n",
        "shop",
        "label",
        "pod",
        "server",
        "culvert.io/dataplane-mode=none",
    ]);
    eventually(
        "node 1 to release the server",
        Duration::from_secs(60),
        || wired(&lab, 1).is_empty().then_some(()),
    );
    eventually("node 0 to see the server opt out", WAIT, || {
        (kube::workloads(&lab, 0, false) == ["shop/server"]).then_some(())
    });
    let log = lab.log(0);
    assert_no_403(&log[..restarted_at]);
    assert_no_403(&log[relisted_at..]);
}

#[test]
#[ignore = "needs root and the test apiserver"]
fn pods_of_a_labelled_namespace_talk_across_nodes_over_hbone_and_the_log_names_both() {
    let cluster = Cluster::with_shop("flow", true);
    let mut pods = spec(vec![
        PodSpec::in_namespace("client", 0, "shop"),
        PodSpec::in_namespace("server", 1, "shop"),
    ]);
    pods.pods[1].service_account = "api".into();
    let lab = kube::lab("kbflow", &cluster, pods);
    cluster.attach_lab_pods(&lab);
    lab.pod("server").serve_echo(ECHO).unwrap();
    wait_known(&lab, 0, "server");
    let capture = lab.capture_wire().unwrap();
    let marker = b"KUBE-FLOW-MARKER-93ab";
    let payload = marker.repeat(100);
    for _ in 0..3 {
        echo_ok(&lab, "client", addr(&lab, "server", ECHO), &payload);
    }
    let segments = capture.finish().unwrap();
    let report = wire::Report::of(&segments, 15008);
    assert!(report.tls13 && report.hbone_segments > 0, "{report:?}");
    assert_eq!(
        report.other_segments, 0,
        "traffic bypassed the tunnel: {report:?}"
    );
    assert!(
        !wire::contains(&segments, marker),
        "plaintext seen on the wire"
    );

    assert_hbone_lines_name(
        &lab,
        "spiffe://cluster.local/ns/shop/sa/client",
        "spiffe://cluster.local/ns/shop/sa/api",
    );
    assert_no_403(&lab.log(0));
    assert_no_403(&lab.log(1));
}
