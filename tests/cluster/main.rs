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

use culvert_tests::chart;
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
        "culvert_check_reads_every_node_through_the_api_and_names_accepted_plaintext",
        culvert_check_reads_every_node_through_the_api_and_names_accepted_plaintext,
    ),
    (
        "strict_pods_pass_kubelet_probes_and_refuse_plaintext_from_other_pods",
        strict_pods_pass_kubelet_probes_and_refuse_plaintext_from_other_pods,
    ),
    (
        "a_rollout_restart_under_traffic_fails_no_connection_and_keeps_a_long_one",
        a_rollout_restart_under_traffic_fails_no_connection_and_keeps_a_long_one,
    ),
    (
        "without_the_daemonset_enrolled_pods_wait_and_start_once_it_is_back",
        without_the_daemonset_enrolled_pods_wait_and_start_once_it_is_back,
    ),
    (
        "an_authorization_policy_admits_only_the_namespace_it_names",
        an_authorization_policy_admits_only_the_namespace_it_names,
    ),
    (
        "a_node_reboot_recreates_its_pods_and_none_ever_sends_plaintext",
        a_node_reboot_recreates_its_pods_and_none_ever_sends_plaintext,
    ),
    (
        "the_chart_replaces_the_kustomize_install_and_carries_the_traffic_over_tls",
        the_chart_replaces_the_kustomize_install_and_carries_the_traffic_over_tls,
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
    // A filter runs the tests up to the last one it names: each needs what the earlier did.
    let last = filter.and_then(|f| {
        TESTS
            .iter()
            .rposition(|(name, _)| name.contains(f.as_str()))
    });
    for (index, (name, test)) in TESTS.iter().enumerate() {
        if last.is_some_and(|last| index > last) {
            break;
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
    if std::env::var_os("CULVERT_CLUSTER_KEEP").is_some() {
        println!(
            "CULVERT_CLUSTER_KEEP: the cluster stays up (scripts/cluster-test-env down {})",
            cluster.dir.display()
        );
    } else if let Err(e) = cluster.down() {
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
    let vip = cluster.echo_service("shop", "echo", "node2").unwrap();
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
    let capture = pod_to_pod_capture(cluster, "wire");
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
    assert_tls_only(capture, &markers);

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

/// After the test before: node1 took no inbound connection, node2's PERMISSIVE echo server
/// accepted one in plaintext from the unenrolled pod.
fn culvert_check_reads_every_node_through_the_api_and_names_accepted_plaintext(cluster: &Cluster) {
    let (passed, out) = check_all_nodes(cluster, "short");
    println!("{out}");
    assert!(!passed, "plaintext was accepted on node2:\n{out}");
    assert!(out.ends_with("1 of 2 nodes failed a check\n"), "{out}");
    let (node1, node2) = out.split_once("node node2 ").unwrap();
    assert!(node1.starts_with("node node1 (culvert-node-"), "{out}");
    assert!(node1.contains("all checks passed"), "{out}");
    assert!(node2.contains("FAIL traffic"), "{out}");
    assert!(
        !node2.contains("FAIL ready") && !node2.contains("FAIL pods"),
        "{out}"
    );

    let (_, json) = check_all_nodes(cluster, "json");
    let nodes: serde_json::Value = serde_json::from_str(&json).unwrap();
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    assert_eq!(names, NODES, "every node, in order");
    let traffic = nodes[1]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "traffic")
        .unwrap();
    assert_eq!(traffic["ok"], false);
    let sources = traffic["inbound"]["plaintext_sources"].as_array().unwrap();
    assert!(
        sources.iter().any(|s| s["to"] == "shop/echo"),
        "the plaintext named its destination: {traffic}"
    );
}

/// `culvert check --kubeconfig` from outside the cluster: whether it passed, and its output.
fn check_all_nodes(cluster: &Cluster, output: &str) -> (bool, String) {
    let out = std::process::Command::new(culvert_tests::culvert_bin())
        .arg("check")
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .args(["-o", output])
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("some checks failed"), "{stderr}");
    }
    (out.status.success(), stdout)
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

fn a_rollout_restart_under_traffic_fails_no_connection_and_keeps_a_long_one(cluster: &Cluster) {
    let vip = cluster
        .get("shop", "service/echo", "{.spec.clusterIP}")
        .unwrap();
    cluster
        .pod("shop", "long-echo", "node2", "nc -ll -p 8080 -e cat")
        .unwrap();
    let wait = Duration::from_secs(60);
    let long_echo = cluster.running("shop", "long-echo", wait);
    // New connections one after another through the Service, each checked; the count goes to
    // the log when /tmp/stop appears.
    let loop_ = format!(
        "i=0; f=0; while [ ! -f /tmp/stop ]; do \
           if [ \"$(echo c$i | nc -w 5 {vip} 80)\" = c$i ]; then i=$((i+1)); \
           else f=$((f+1)); echo failed c$i; fi; done; echo done $i $f; exec sleep 3600"
    );
    cluster.pod("shop", "opener", "node1", &loop_).unwrap();
    // One connection for the whole rollout, a line every 0.2 s, every line echoed back.
    let long = format!(
        "(i=0; while [ ! -f /tmp/stop ]; do echo tick$i; i=$((i+1)); sleep 0.2; done; \
           echo $i > /tmp/sent; exec sleep 3600) | nc {long_echo} 8080 > /tmp/echoed; \
         echo $? > /tmp/nc-exited; exec sleep 3600"
    );
    cluster.pod("shop", "long", "node1", &long).unwrap();
    cluster.running("shop", "opener", wait);
    cluster.running("shop", "long", wait);
    std::thread::sleep(Duration::from_secs(2));

    let before: Vec<String> = daemon_pods(cluster).into_iter().map(|p| p.name).collect();
    let started = Instant::now();
    cluster
        .kubectl(&[
            "-n",
            "culvert-system",
            "rollout",
            "restart",
            "daemonset/culvert-node",
        ])
        .unwrap();
    // Not `rollout status`: the DaemonSet's status counts a node's oldest pod, so it reports
    // the rollout done only once the old daemons have drained, which the long connection
    // holds off.
    eventually(
        "a new ready daemon on every node",
        Duration::from_secs(120),
        || {
            let ready: Vec<DaemonPod> = daemon_pods(cluster)
                .into_iter()
                .filter(|p| p.ready && !p.deleting && !before.contains(&p.name))
                .collect();
            (ready.len() == NODES.len()).then_some(())
        },
    );
    let rolled = started.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    for pod in ["opener", "long"] {
        cluster.exec("shop", pod, "touch /tmp/stop").unwrap();
    }
    let done = eventually("the opener's count", wait, || {
        let logs = cluster.kubectl(&["-n", "shop", "logs", "opener"]).ok()?;
        logs.lines()
            .find_map(|l| l.strip_prefix("done ").map(str::to_owned))
            .map(|d| (d, logs))
    });
    let (counts, logs) = done;
    let (opened, failed) = counts.split_once(' ').unwrap();
    println!(
        "    rollout of both nodes in {:.1} s: {opened} connections opened, {failed} failed",
        rolled.as_secs_f64()
    );
    assert_eq!(
        failed, "0",
        "no connection failed during the rollout: {logs}"
    );
    assert!(
        opened.parse::<u64>().unwrap() > 10,
        "connections kept opening: {opened}"
    );

    // The old daemons still carry the long connection: it echoed every line it sent.
    let sent = eventually("the long connection's count", wait, || {
        cluster.exec("shop", "long", "cat /tmp/sent").ok()
    });
    let echoed = eventually("every line echoed", Duration::from_secs(10), || {
        let echoed = cluster.exec("shop", "long", "wc -l < /tmp/echoed").ok()?;
        (echoed.trim() == sent.trim()).then_some(echoed)
    });
    let exited = cluster
        .exec(
            "shop",
            "long",
            "cat /tmp/nc-exited 2>/dev/null || echo open",
        )
        .unwrap();
    let draining = old_daemons(cluster);
    println!(
        "    the long connection: {} lines sent, {} echoed, {}; {} old daemons draining",
        sent.trim(),
        echoed.trim(),
        exited.trim(),
        draining.len()
    );
    assert_eq!(
        exited.trim(),
        "open",
        "the long connection outlived the rollout"
    );
    assert!(!draining.is_empty(), "an old daemon still carries it");

    // Once it ends, the old daemons have nothing left to carry and leave, and the rollout is
    // complete.
    for pod in ["long", "opener", "long-echo"] {
        cluster
            .kubectl(&["-n", "shop", "delete", "pod", pod, "--wait=false"])
            .unwrap();
    }
    eventually("the old daemons gone", Duration::from_secs(60), || {
        old_daemons(cluster).is_empty().then_some(())
    });
    cluster.daemons_ready().unwrap();
}

/// One of the DaemonSet's pods.
struct DaemonPod {
    name: String,
    ready: bool,
    /// Being deleted: an old daemon, draining.
    deleting: bool,
}

fn daemon_pods(cluster: &Cluster) -> Vec<DaemonPod> {
    let Ok(list) = cluster.kubectl(&[
        "-n",
        "culvert-system",
        "get",
        "pods",
        "-l",
        "app.kubernetes.io/name=culvert-node",
        "-o",
        "json",
    ]) else {
        return Vec::new();
    };
    let list: serde_json::Value = serde_json::from_str(&list).unwrap_or_default();
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|pod| DaemonPod {
            name: pod["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            ready: pod["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True"),
            deleting: pod["metadata"]["deletionTimestamp"].is_string(),
        })
        .collect()
}

/// The daemons being deleted (draining).
fn old_daemons(cluster: &Cluster) -> Vec<String> {
    daemon_pods(cluster)
        .into_iter()
        .filter(|p| p.deleting)
        .map(|p| p.name)
        .collect()
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
    let (passed, out) = check_all_nodes(cluster, "short");
    assert!(!passed, "{out}");
    for node in NODES {
        assert!(
            out.contains(&format!(
                "node {node} (no pod)\nFAIL daemon       no Culvert pod on this node"
            )),
            "{out}"
        );
    }
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

fn an_authorization_policy_admits_only_the_namespace_it_names(cluster: &Cluster) {
    // `shop/client` and `newshop/first` (both enrolled, on node1) reach `shop/echo` on node2;
    // an ALLOW policy on echo then names only shop.
    let echo = cluster.get("shop", "pod/echo", "{.status.podIP}").unwrap();
    let to_echo = |namespace: &str, pod: &str, marker: &str| {
        cluster
            .kubectl(&[
                "-n",
                namespace,
                "exec",
                pod,
                "--",
                "sh",
                "-c",
                &format!("echo {marker} | nc -w 3 {echo} 8080"),
            ])
            .unwrap_or_default()
    };
    assert_eq!(to_echo("newshop", "first", "before").trim(), "before");
    cluster
        .apply(
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: echo-from-shop, namespace: shop }
spec:
  selector: { matchLabels: { app: echo } }
  action: ALLOW
  rules: [{ from: [{ source: { namespaces: [shop] } }] }]
",
        )
        .unwrap();
    eventually("newshop refused", Duration::from_secs(30), || {
        to_echo("newshop", "first", "denied")
            .trim()
            .is_empty()
            .then_some(())
    });
    assert_eq!(to_echo("shop", "client", "allowed").trim(), "allowed");
    let line = eventually(
        "the denial in echo's access log",
        Duration::from_secs(30),
        || {
            cluster.daemon_logs().into_iter().find(|l| {
                l["target"] == "access"
                    && l["dst.workload"] == "echo"
                    && l["direction"] == "inbound"
                    && l["reason"] == "not_allowed"
            })
        },
    );
    assert_eq!(
        line["src.identity"], "spiffe://cluster.local/ns/newshop/sa/default",
        "decided on the proven identity: {line}"
    );
    cluster
        .kubectl(&[
            "-n",
            "shop",
            "delete",
            "authorizationpolicy",
            "echo-from-shop",
        ])
        .unwrap();
}

/// A capture of pod-to-pod TCP on node1's link (what crosses between the nodes), into
/// `<name>.pcap` in the cluster's directory.
fn pod_to_pod_capture(cluster: &Cluster, name: &str) -> wire::Capture {
    wire::Capture::start_filtered(
        &Cluster::node_netns("node1"),
        "eth0",
        &cluster.dir.join(format!("{name}.pcap")),
        "tcp and src net 10.244.0.0/16 and dst net 10.244.0.0/16",
    )
    .unwrap()
}

/// The capture holds HBONE over TLS 1.3, no other pod-to-pod TCP and none of `markers`.
fn assert_tls_only(capture: wire::Capture, markers: &[&str]) {
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
}

/// A pod that sends `marker-<n>` lines to `to`, one connection each, 5 a second, and logs
/// `ok <n>` for each one echoed back.
fn chatter(marker: &str, to: &str) -> String {
    format!(
        "i=0; while true; do m={marker}-$i; \
           if [ \"$(echo $m | nc -w 2 {to})\" = $m ]; then echo ok $i; fi; \
           i=$((i+1)); sleep 0.2; done"
    )
}

/// How many `ok` lines a chatter pod's current container has logged.
fn echoed(cluster: &Cluster, pod: &str) -> usize {
    cluster
        .kubectl(&["-n", "shop", "logs", pod])
        .map(|logs| logs.lines().filter(|l| l.starts_with("ok ")).count())
        .unwrap_or(0)
}

fn a_node_reboot_recreates_its_pods_and_none_ever_sends_plaintext(cluster: &Cluster) {
    let wait = Duration::from_secs(120);
    let marker = "culvert-reboot-5e21";
    // Both directions across node1's reboot: out of it to a pod on node2, and into it through a
    // Service (the server's address may change with its sandbox).
    let inside = cluster.echo_service("shop", "inside", "node1").unwrap();
    let echo = cluster.get("shop", "pod/echo", "{.status.podIP}").unwrap();
    cluster
        .pod(
            "shop",
            "out",
            "node1",
            &chatter(marker, &format!("{echo} 8080")),
        )
        .unwrap();
    cluster
        .pod(
            "shop",
            "in",
            "node2",
            &chatter(marker, &format!("{inside} 80")),
        )
        .unwrap();
    for pod in ["inside", "out", "in"] {
        cluster.running("shop", pod, wait);
    }
    let started_at = |pod: &str| {
        cluster
            .get(
                "shop",
                &format!("pod/{pod}"),
                "{.status.containerStatuses[0].state.running.startedAt}",
            )
            .unwrap_or_default()
    };
    let before: Vec<String> = ["inside", "out"].map(started_at).into();

    let capture = pod_to_pod_capture(cluster, "reboot");
    for pod in ["out", "in"] {
        eventually(&format!("{pod} echoing"), wait, || {
            (echoed(cluster, pod) > 0).then_some(())
        });
    }

    cluster.node_stop(1).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let in_before = echoed(cluster, "in");
    cluster.node_start(1).unwrap();
    let started = Instant::now();
    cluster.daemons_ready().unwrap();
    for (pod, before) in ["inside", "out"].iter().zip(&before) {
        eventually(&format!("{pod} recreated"), wait, || {
            let now = started_at(pod);
            (!now.is_empty() && now != *before).then_some(())
        });
        let ip = cluster.running("shop", pod, wait);
        let rules = Cluster::redirect_rules(&ip).unwrap();
        assert!(rules.contains("15001"), "{pod} is wired again: {rules}");
    }
    eventually("out echoing again", wait, || {
        (echoed(cluster, "out") > 0).then_some(())
    });
    eventually("in reaching inside again", wait, || {
        (echoed(cluster, "in") > in_before).then_some(())
    });
    println!(
        "    node1 back and both directions echoing {:.1} s after its start",
        started.elapsed().as_secs_f64()
    );

    assert_tls_only(capture, &[marker]);
    for pod in ["inside", "out", "in"] {
        cluster
            .kubectl(&["-n", "shop", "delete", "pod", pod, "--wait=false"])
            .unwrap();
    }
}

fn the_chart_replaces_the_kustomize_install_and_carries_the_traffic_over_tls(cluster: &Cluster) {
    // Everything kustomize applied but the namespace (which keeps the CA's Secret).
    let overlay = cluster.dir.join("overlay");
    let applied = cluster
        .kubectl(&["kustomize", overlay.to_str().unwrap()])
        .unwrap();
    for key in chart::objects(&applied).unwrap().keys() {
        let mut parts = key.split('/');
        let (kind, namespace, name) = (
            parts.next().unwrap(),
            parts.next().unwrap(),
            parts.next().unwrap(),
        );
        if kind == "Namespace" {
            continue;
        }
        let mut args = vec!["delete", kind, name, "--wait=true"];
        if !namespace.is_empty() {
            args.extend(["-n", namespace]);
        }
        cluster.kubectl(&args).unwrap();
    }
    let values = cluster.dir.join("values.json");
    std::fs::write(&values, cluster.chart_values().to_string()).unwrap();
    let chart_dir = chart::dir();
    cluster
        .helm(&[
            "install",
            "culvert",
            chart_dir.to_str().unwrap(),
            "--namespace",
            "culvert-system",
            "--values",
            values.to_str().unwrap(),
        ])
        .unwrap();
    cluster.daemons_ready().unwrap();
    cluster.ca_ready().unwrap();
    let managed = cluster
        .get(
            "culvert-system",
            "daemonset/culvert-node",
            "{.metadata.annotations.meta\\.helm\\.sh/release-name}",
        )
        .unwrap();
    assert_eq!(managed, "culvert", "the DaemonSet is the chart's release's");

    // The pods wired before are rewired by the chart's daemons and talk over TLS only.
    let vip = cluster
        .get("shop", "service/echo", "{.spec.clusterIP}")
        .unwrap();
    let capture = pod_to_pod_capture(cluster, "chart");
    let marker = "culvert-chart-0b7d";
    let answer = eventually(
        "an echo through the chart's daemons",
        Duration::from_secs(60),
        || {
            cluster
                .exec(
                    "shop",
                    "client",
                    &format!("echo {marker} | nc -w 5 {vip} 80"),
                )
                .ok()
                .filter(|a| a.trim() == marker)
        },
    );
    assert_eq!(answer.trim(), marker);
    assert_tls_only(capture, &[marker]);
}
