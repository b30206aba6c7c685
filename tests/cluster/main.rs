//! The cluster layer: Culvert's image and shipped manifests on a real control plane and two real
//! kubelet + containerd nodes (`scripts/cluster-test-env`). One cluster serves every test, in
//! order, and is torn down at the end whatever happened; so this binary has its own harness.
//!
//! Like the netns and kube layers it runs only with `--ignored` or `--include-ignored` (it needs
//! root, and a plain `cargo test` must not build a cluster), and then fails, never skips, when
//! it cannot.

#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use culvert_tests::cluster::{Cluster, NODES};
use culvert_tests::{eventually, wire};

type Test = fn(&Cluster);

/// In order: each test may rely on what the ones before it set up.
const TESTS: &[(&str, Test)] = &[
    (
        "the_shipped_manifests_become_ready_and_install_culvert_cni_on_every_node",
        the_shipped_manifests_become_ready_and_install_culvert_cni_on_every_node,
    ),
    (
        "enrolled_pods_are_wired_and_talk_across_nodes_over_tls_only",
        enrolled_pods_are_wired_and_talk_across_nodes_over_tls_only,
    ),
    (
        "strict_pods_pass_kubelet_probes_and_refuse_plaintext_from_other_pods",
        strict_pods_pass_kubelet_probes_and_refuse_plaintext_from_other_pods,
    ),
    (
        "without_the_daemonset_enrolled_pods_wait_and_start_once_it_is_back",
        without_the_daemonset_enrolled_pods_wait_and_start_once_it_is_back,
    ),
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !args
        .iter()
        .any(|a| a == "--ignored" || a == "--include-ignored")
    {
        println!(
            "cluster layer: {} tests ignored (root; run with --include-ignored)",
            TESTS.len()
        );
        println!(
            "test result: ok. 0 passed; 0 failed; {} ignored",
            TESTS.len()
        );
        return ExitCode::SUCCESS;
    }
    let filter = args.iter().find(|a| !a.starts_with('-'));
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("the cluster layer needs root (namespaces, containerd, kubelets)");
        return ExitCode::FAILURE;
    }
    let started = Instant::now();
    let cluster = match Cluster::up() {
        Ok(cluster) => cluster,
        Err(e) => {
            eprintln!("the cluster did not come up: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    println!("cluster up in {:.1} s", started.elapsed().as_secs_f64());
    let (mut passed, mut failed) = (0, Vec::new());
    for (name, test) in TESTS {
        if filter.is_some_and(|f| !name.contains(f.as_str())) {
            continue;
        }
        let started = Instant::now();
        let outcome = catch_unwind(AssertUnwindSafe(|| test(&cluster)));
        let secs = started.elapsed().as_secs_f64();
        if outcome.is_ok() {
            println!("test {name} ... ok ({secs:.1} s)");
            passed += 1;
        } else {
            println!("test {name} ... FAILED ({secs:.1} s)");
            failed.push(*name);
        }
    }
    if let Err(e) = cluster.down() {
        eprintln!("tearing the cluster down: {e:#}");
        failed.push("teardown");
    }
    let result = if failed.is_empty() { "ok" } else { "FAILED" };
    println!(
        "test result: {result}. {passed} passed; {} failed; in {:.1} s (files in {})",
        failed.len(),
        started.elapsed().as_secs_f64(),
        cluster.dir.display()
    );
    for name in &failed {
        println!("    {name}");
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn the_shipped_manifests_become_ready_and_install_culvert_cni_on_every_node(cluster: &Cluster) {
    cluster.install().unwrap();
    let ready = cluster
        .get(
            "culvert-system",
            "daemonset/culvert-node",
            "{.status.numberReady}",
        )
        .unwrap();
    assert_eq!(ready, NODES.len().to_string(), "a ready daemon per node");
    for node in NODES {
        let dir = cluster.dir.join(node).join("cni");
        assert!(
            dir.join("bin/culvert-cni").exists(),
            "culvert-cni in {node}'s CNI bin dir"
        );
        let conflist = std::fs::read_to_string(dir.join("net.d/10-bridge.conflist")).unwrap();
        let conflist: serde_json::Value = serde_json::from_str(&conflist).unwrap();
        let types: Vec<&str> = conflist["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["type"].as_str())
            .collect();
        assert_eq!(
            types.last(),
            Some(&"culvert-cni"),
            "culvert-cni chained last in {node}'s conflist: {types:?}"
        );
    }
}

fn enrolled_pods_are_wired_and_talk_across_nodes_over_tls_only(cluster: &Cluster) {
    cluster.namespace("shop", true).unwrap();
    cluster.namespace("legacy", false).unwrap();
    cluster
        .pod("shop", "echo", "node2", "nc -ll -p 8080 -e cat")
        .unwrap();
    cluster
        .apply(
            "apiVersion: v1\nkind: Service\nmetadata: { name: echo, namespace: shop }\n\
             spec: { selector: { app: echo }, ports: [{ port: 80, targetPort: 8080 }] }\n",
        )
        .unwrap();
    cluster
        .pod("shop", "client", "node1", "exec sleep 3600")
        .unwrap();
    cluster
        .pod("legacy", "old", "node1", "exec sleep 3600")
        .unwrap();
    let wait = Duration::from_secs(60);
    let server = cluster.running("shop", "echo", wait);
    let client = cluster.running("shop", "client", wait);
    let old = cluster.running("legacy", "old", wait);
    let vip = cluster
        .get("shop", "service/echo", "{.spec.clusterIP}")
        .unwrap();

    for ip in [&server, &client] {
        let rules = Cluster::redirect_rules(ip).unwrap();
        assert!(
            rules.contains("15001") && rules.contains("15006"),
            "{ip}'s redirection: {rules}"
        );
    }
    assert!(
        Cluster::redirect_rules(&old).is_err(),
        "an unenrolled pod gets no rules"
    );

    // Pod to pod between the nodes: only what the enrolled pods send, captured on node1's link.
    let file = cluster.dir.join("wire.pcap");
    let capture = wire::Capture::start_filtered(
        &Cluster::node_netns("node1"),
        "eth0",
        &file,
        "tcp and src net 10.244.0.0/16 and dst net 10.244.0.0/16",
    )
    .unwrap();
    let markers = [
        "culvert-cluster-direct-7c1d",
        "culvert-cluster-service-93ab",
    ];
    for (marker, to) in markers
        .iter()
        .zip([format!("{server} 8080"), format!("{vip} 80")])
    {
        let answer = cluster
            .exec("shop", "client", &format!("echo {marker} | nc -w 5 {to}"))
            .unwrap();
        assert_eq!(answer.trim(), *marker, "echoed through {to}");
    }
    let segments = capture.finish().unwrap();
    let report = wire::Report::of(&segments, 15008);
    assert!(
        report.hbone_segments > 0 && report.tls13,
        "HBONE over TLS 1.3 between the nodes: {report:?}"
    );
    assert_eq!(
        report.other_segments, 0,
        "no pod-to-pod TCP outside the tunnel: {report:?}"
    );
    for marker in markers {
        assert!(
            !wire::contains(&segments, marker.as_bytes()),
            "{marker} crossed the wire in plaintext"
        );
    }

    // The server's daemon proved the client's identity.
    let line = eventually("the server's access-log line", wait, || {
        cluster.daemon_logs().into_iter().find(|l| {
            l["target"] == "access"
                && l["direction"] == "inbound"
                && l["dst.workload"] == "echo"
                && l["src.addr"]
                    .as_str()
                    .is_some_and(|a| a.starts_with(&format!("{client}:")))
        })
    });
    assert_eq!(line["transport"], "hbone");
    assert_eq!(
        line["src.identity"],
        "spiffe://cluster.local/ns/shop/sa/default"
    );

    // An unenrolled pod reaches the same (PERMISSIVE) Service through kube-proxy, in plaintext.
    let answer = cluster
        .exec(
            "legacy",
            "old",
            &format!("echo culvert-legacy | nc -w 5 {vip} 80"),
        )
        .unwrap();
    assert_eq!(answer.trim(), "culvert-legacy");
}

fn strict_pods_pass_kubelet_probes_and_refuse_plaintext_from_other_pods(cluster: &Cluster) {
    cluster.namespace("vault", true).unwrap();
    cluster
        .apply(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
             metadata: { name: default, namespace: vault }\nspec: { mtls: { mode: STRICT } }\n",
        )
        .unwrap();
    // Readiness over HTTP, liveness over TCP, both every second: the kubelet's probes come
    // from the node, which a STRICT pod admits only because the daemon marks them as probes.
    let probes = "      readinessProbe:
        httpGet: { path: /index.html, port: 8080 }
        periodSeconds: 1
      livenessProbe:
        tcpSocket: { port: 8080 }
        periodSeconds: 1
        failureThreshold: 2
";
    cluster
        .apply(&culvert_tests::cluster::pod_yaml(
            "vault",
            "safe",
            "node2",
            "mkdir -p /tmp/www && echo vault-ok > /tmp/www/index.html && exec httpd -f -p 8080 -h /tmp/www",
            probes,
        ))
        .unwrap();
    cluster
        .pod("legacy", "neighbour", "node2", "exec sleep 3600")
        .unwrap();
    let wait = Duration::from_secs(60);
    let safe = cluster.running("vault", "safe", wait);
    cluster.running("legacy", "neighbour", wait);
    // Several liveness periods later it is still the first container.
    std::thread::sleep(Duration::from_secs(5));
    let restarts = cluster
        .get(
            "vault",
            "pod/safe",
            "{.status.containerStatuses[0].restartCount}",
        )
        .unwrap();
    assert_eq!(restarts, "0", "the liveness probe never failed");
    let ready = cluster
        .get(
            "vault",
            "pod/safe",
            "{.status.conditions[?(@.type==\"Ready\")].status}",
        )
        .unwrap();
    assert_eq!(ready, "True");

    let get = format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {safe} 8080");
    let answer = cluster.exec("shop", "client", &get).unwrap();
    assert!(
        answer.contains("vault-ok"),
        "an enrolled pod is served: {answer}"
    );
    for (namespace, pod) in [("legacy", "old"), ("legacy", "neighbour")] {
        // nc exits non-zero on a reset; either way no page comes back.
        let answer = cluster.exec(namespace, pod, &get).unwrap_or_default();
        assert!(
            !answer.contains("vault-ok"),
            "{namespace}/{pod} (plaintext) got the STRICT pod's page: {answer}"
        );
    }
}

fn without_the_daemonset_enrolled_pods_wait_and_start_once_it_is_back(cluster: &Cluster) {
    cluster
        .kubectl(&[
            "-n",
            "culvert-system",
            "delete",
            "daemonset/culvert-node",
            "--wait=true",
        ])
        .unwrap();
    eventually("the daemons gone", Duration::from_secs(60), || {
        let pods = cluster
            .kubectl(&[
                "-n",
                "culvert-system",
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/name=culvert-node",
                "-o",
                "name",
            ])
            .ok()?;
        pods.trim().is_empty().then_some(())
    });
    // A known enrolled namespace, and one created and labelled while no daemon could see it.
    cluster.namespace("newshop", true).unwrap();
    let late = [("shop", "late"), ("newshop", "first")];
    for (namespace, name) in late {
        cluster
            .pod(namespace, name, "node1", "exec sleep 3600")
            .unwrap();
    }
    for (namespace, name) in late {
        let refusal = eventually(
            &format!("culvert-cni's refusal in {namespace}/{name}'s events"),
            Duration::from_secs(60),
            || {
                let events = cluster.events(namespace, name).ok()?;
                events
                    .lines()
                    .find(|l| l.contains("culvert node is unreachable"))
                    .map(str::to_owned)
            },
        );
        assert!(refusal.starts_with("FailedCreatePodSandBox"), "{refusal}");
        let phase = cluster
            .get(namespace, &format!("pod/{name}"), "{.status.phase}")
            .unwrap();
        assert_eq!(
            phase, "Pending",
            "{namespace}/{name} does not start unwired"
        );
    }

    let overlay = cluster.dir.join("overlay");
    cluster
        .kubectl(&["apply", "-k", overlay.to_str().unwrap()])
        .unwrap();
    cluster.daemons_ready().unwrap();
    for (namespace, name) in late {
        let ip = cluster.running(namespace, name, Duration::from_secs(120));
        let rules = Cluster::redirect_rules(&ip).unwrap();
        assert!(
            rules.contains("15001"),
            "{namespace}/{name} is wired: {rules}"
        );
    }
}
