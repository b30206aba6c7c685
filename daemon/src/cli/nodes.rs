//! `culvert check --all-nodes`: every node's findings. Each daemon's admin API is reached through
//! the Kubernetes API with a port-forward to the daemon's pod, as `kubectl port-forward` does,
//! so the admin API stays on each node's loopback and the caller needs only API credentials.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::{StreamExt as _, stream};
use http::Method;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams};
use kube::config::{Config, KubeConfigOptions, Kubeconfig};
use serde::Serialize;
use serde_json::{Value, json};

use super::CheckArgs;

/// The daemon pods' label, in the manifests and in the chart.
const DAEMON_SELECTOR: &str = "app.kubernetes.io/name=culvert-node";
/// The admin API's port on each node's loopback.
const ADMIN_PORT: u16 = 15000;
/// How long one node may take to answer: a node that does not is a finding, not a hang.
const NODE_TIMEOUT: Duration = Duration::from_secs(20);
/// Nodes asked at once.
const CONCURRENT: usize = 16;

/// One node's findings.
#[derive(Debug, Serialize)]
pub(super) struct NodeFindings {
    node: String,
    /// The daemon pod asked; absent when the node has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pod: Option<String>,
    checks: Vec<Value>,
}

impl NodeFindings {
    pub(super) fn passed(&self) -> bool {
        super::all_passed(&self.checks)
    }
}

/// Asks every node's daemon for its findings, in node-name order.
pub(super) async fn check(args: &CheckArgs) -> anyhow::Result<Vec<NodeFindings>> {
    let config = match &args.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?
        }
        None => Config::infer()
            .await
            .context("no kubeconfig ($KUBECONFIG, ~/.kube/config) and not in a pod")?,
    };
    let client = kube::Client::try_from(config)?;
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
        .context("listing the cluster's nodes")?;
    let pods: Api<Pod> = Api::namespaced(client, &args.culvert_namespace);
    let daemons = pods
        .list(&ListParams::default().labels(DAEMON_SELECTOR))
        .await
        .with_context(|| format!("listing Culvert's pods in {}", args.culvert_namespace))?;
    let mut on_node: BTreeMap<String, Option<String>> = nodes
        .items
        .iter()
        .filter_map(|n| n.metadata.name.clone())
        .map(|n| (n, None))
        .collect();
    for (node, pod) in chosen(&daemons.items) {
        if let Some(slot) = on_node.get_mut(&node) {
            *slot = Some(pod);
        }
    }
    let namespace = &args.culvert_namespace;
    let asks = on_node.into_iter().map(|(node, pod)| {
        let pods = pods.clone();
        async move {
            let checks = match &pod {
                None => vec![finding(
                    format!("no Culvert pod on this node in {namespace}"),
                    "an enrolled pod cannot start here: read the DaemonSet's events \
                     (kubectl -n culvert-system describe daemonset culvert-node)",
                )],
                Some(pod) => match tokio::time::timeout(NODE_TIMEOUT, ask(&pods, pod)).await {
                    Ok(Ok(checks)) => checks,
                    Ok(Err(e)) => vec![finding(
                        format!("could not read {pod}'s findings: {e:#}"),
                        "the pod must be running; the caller needs create on pods/portforward \
                         in Culvert's namespace",
                    )],
                    Err(_) => vec![finding(
                        format!("{pod} did not answer in {} s", NODE_TIMEOUT.as_secs()),
                        "read the pod's log; the node may be overloaded or partitioned",
                    )],
                },
            };
            NodeFindings { node, pod, checks }
        }
    });
    Ok(stream::iter(asks).buffered(CONCURRENT).collect().await)
}

/// The pod to ask on each node: during a rollout a node runs the new daemon next to the
/// draining old one, so a ready pod wins, then the newest.
fn chosen(pods: &[Pod]) -> BTreeMap<String, String> {
    let mut best: BTreeMap<String, (bool, Option<_>, String)> = BTreeMap::new();
    for pod in pods {
        let (Some(node), Some(name)) = (
            pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            pod.metadata.name.clone(),
        ) else {
            continue;
        };
        let ready = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let rank = (ready, pod.metadata.creation_timestamp.clone(), name);
        match best.get(&node) {
            Some(held) if *held >= rank => {}
            _ => {
                best.insert(node, rank);
            }
        }
    }
    best.into_iter()
        .map(|(node, (_, _, name))| (node, name))
        .collect()
}

async fn ask(pods: &Api<Pod>, pod: &str) -> anyhow::Result<Vec<Value>> {
    let mut forward = pods
        .portforward(pod, &[ADMIN_PORT])
        .await
        .context("port-forward")?;
    let stream = forward
        .take_stream(ADMIN_PORT)
        .context("the port-forward has no stream")?;
    let answer = super::request(stream, "127.0.0.1:15000", Method::GET, "/check").await;
    forward.abort();
    let checks: Value = serde_json::from_slice(&answer?).context("parsing /check")?;
    Ok(checks.as_array().cloned().unwrap_or_default())
}

/// The finding of a node whose daemon could not be asked.
fn finding(detail: String, fix: &str) -> Value {
    json!({ "check": "daemon", "ok": false, "detail": detail, "fix": fix })
}

/// Each node's findings under its name, then the count of nodes that failed.
pub(super) fn render(nodes: &[NodeFindings]) -> String {
    let mut out = String::new();
    for node in nodes {
        let pod = node.pod.as_deref().unwrap_or("no pod");
        out.push_str(&format!("node {} ({pod})\n", node.node));
        out.push_str(&super::render_checks(&node.checks));
        out.push('\n');
    }
    let failed = nodes.iter().filter(|n| !n.passed()).count();
    out.push_str(&match (failed, nodes.len()) {
        (_, 0) => "the cluster has no nodes\n".to_owned(),
        (0, n) => format!("every check passed on all {n} nodes\n"),
        (f, n) => format!("{f} of {n} nodes failed a check\n"),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, node: &str, ready: bool, created_minute: u32) -> Pod {
        serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "creationTimestamp": format!("2026-12-07T10:{created_minute:02}:00Z"),
            },
            "spec": { "nodeName": node, "containers": [] },
            "status": { "conditions": [
                { "type": "Ready", "status": if ready { "True" } else { "False" } }
            ] },
        }))
        .unwrap()
    }

    #[test]
    fn a_ready_daemon_is_asked_before_a_newer_one_still_starting_and_the_newest_breaks_ties() {
        let pods = [
            pod("old", "n1", true, 10),
            pod("surge", "n1", false, 20),
            pod("a", "n2", true, 10),
            pod("b", "n2", true, 20),
            pod("starting", "n3", false, 30),
        ];
        let chosen = chosen(&pods);
        assert_eq!(chosen["n1"], "old");
        assert_eq!(chosen["n2"], "b");
        assert_eq!(chosen["n3"], "starting");
        assert_eq!(chosen.len(), 3);
    }

    #[test]
    fn the_summary_counts_nodes_that_failed_and_names_a_node_without_a_daemon() {
        let pass = json!({ "check": "ready", "ok": true, "detail": "the daemon serves" });
        let nodes = [
            NodeFindings {
                node: "n1".into(),
                pod: Some("culvert-node-a".into()),
                checks: vec![pass],
            },
            NodeFindings {
                node: "n2".into(),
                pod: None,
                checks: vec![finding("no Culvert pod".into(), "read the events")],
            },
        ];
        let out = render(&nodes);
        assert!(
            out.contains("node n1 (culvert-node-a)\nok   ready"),
            "{out}"
        );
        assert!(out.contains("node n2 (no pod)\nFAIL daemon"), "{out}");
        assert!(out.ends_with("1 of 2 nodes failed a check\n"), "{out}");
        assert!(nodes[0].passed() && !nodes[1].passed());
    }
}
