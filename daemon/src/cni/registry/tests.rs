//! The registry's decisions, on the loopback capture stand-in: no root, no namespaces, real
//! listeners on loopback addresses and rules recorded in memory.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};

use super::*;
use crate::identity::Id;
use crate::state::{PeerAuthentication, Snapshot, Workload};
use crate::test_util::{Ca, Loopback, TempDir, loopback_net};

const NODE: &str = "node-a";

struct Fixture {
    registry: Registry,
    capture: Arc<Loopback>,
    state: Arc<Store>,
    net: u8,
    state_dir: TempDir,
    _ca: Ca,
}

/// What a workload is, for the snapshot: `(name, node, host part of its IP, enrolled)`.
type Spec<'a> = (&'a str, &'a str, u8, Option<bool>);

impl Fixture {
    fn new(workloads: &[Spec<'_>], enrolled_namespaces: &[&str]) -> Self {
        let ca = Ca::new("registry");
        let net = loopback_net();
        let state = Arc::new(Store::new(snapshot(net, workloads, enrolled_namespaces)));
        let capture = Arc::new(Loopback::default());
        let state_dir = TempDir::new("registry-state");
        let registry = registry(&ca, &state, &capture, state_dir.path());
        Self {
            registry,
            capture,
            state,
            net,
            state_dir,
            _ca: ca,
        }
    }

    /// Two enrolled pods wired: `cart` as sandbox `c1`, `shelf` as `c2`.
    async fn two_wired() -> Self {
        let f = Self::new(
            &[
                ("cart", NODE, 2, Some(true)),
                ("shelf", NODE, 3, Some(true)),
            ],
            &[],
        );
        f.add("c1", "cart", 2).await.unwrap();
        f.add("c2", "shelf", 3).await.unwrap();
        f
    }

    /// The same node's registry after a restart: same state directory and capture.
    fn restarted(&self) -> Registry {
        registry(&self._ca, &self.state, &self.capture, self.state_dir.path())
    }

    fn ip(&self, host: u8) -> IpAddr {
        Ipv4Addr::new(127, self.net, 0, host).into()
    }

    /// The namespace path of the sandbox `id`.
    fn netns(&self, id: &str) -> String {
        format!("/run/netns/{}-{id}", self.net)
    }

    fn add_request(&self, id: &str, name: &str, host: u8) -> AddPod {
        AddPod {
            container_id: id.to_owned(),
            netns: self.netns(id),
            ifname: "eth0".into(),
            pod: pod_ref(name),
            ips: vec![self.ip(host)],
        }
    }

    async fn add(&self, id: &str, name: &str, host: u8) -> Result<bool, Error> {
        self.registry.add(self.add_request(id, name, host)).await
    }

    async fn del(&self, id: &str) {
        self.registry
            .del(DelPod {
                container_id: id.to_owned(),
                netns: None,
                pod: None,
            })
            .await;
    }

    /// A DEL as the plugin sends it: container id, netns and pod.
    async fn del_in(&self, id: &str, name: &str, netns: &str) {
        self.registry
            .del(DelPod {
                container_id: id.to_owned(),
                netns: Some(netns.to_owned()),
                pod: Some(pod_ref(name)),
            })
            .await;
    }

    /// The wired sandboxes' container ids.
    fn wired(&self) -> Vec<String> {
        self.registry
            .list()
            .into_iter()
            .map(|p| p.container_id)
            .collect()
    }

    fn set(&self, workloads: &[Spec<'_>]) {
        self.state.replace(snapshot(self.net, workloads, &[]));
    }
}

fn registry(ca: &Ca, state: &Arc<Store>, capture: &Arc<Loopback>, dir: &Path) -> Registry {
    let certs = ca.certs();
    let ports = Ports {
        outbound: 15001,
        inbound_plaintext: 15006,
        hbone: 15008,
    };
    Registry::new(Deps {
        node: NODE.to_owned(),
        state: state.clone(),
        proxy: Arc::new(Proxy::new(
            state.clone(),
            certs.clone(),
            ports,
            Default::default(),
            crate::proxy::Limits {
                connections: 64,
                connections_per_peer: 8,
                streams: 64,
                streams_per_peer: 8,
            },
            crate::metrics::Metrics::new().tcp,
        )),
        certs,
        capture: capture.clone(),
        ports,
        state_dir: dir.to_owned(),
        metrics: crate::metrics::Metrics::new().pods,
    })
}

fn pod_ref(name: &str) -> PodRef {
    PodRef {
        namespace: "shop".into(),
        name: name.into(),
        uid: None,
    }
}

fn snapshot(net: u8, workloads: &[Spec<'_>], enrolled_namespaces: &[&str]) -> Snapshot {
    let workloads = workloads
        .iter()
        .map(|&(name, node, host, enrollment)| Workload {
            name: name.into(),
            namespace: "shop".into(),
            workload_name: name.into(),
            workload_type: crate::state::WorkloadType::Pod,
            node: node.into(),
            ips: crate::state::Ips::One(Ipv4Addr::new(127, net, 0, host).into()),
            labels: Default::default(),
            enrollment,
            peer_authentication: None,
            identity: Id::new("cluster.local", "shop", name).unwrap(),
        })
        .map(Arc::new)
        .collect();
    let namespaces: BTreeSet<String> = enrolled_namespaces.iter().map(|n| (*n).into()).collect();
    Snapshot::build(
        "cluster.local",
        PeerAuthentication::Permissive,
        namespaces,
        workloads,
        vec![],
    )
    .unwrap()
}

#[tokio::test]
async fn an_enrolled_pod_is_wired_and_one_outside_the_mesh_is_left_alone() {
    let f = Fixture::new(
        &[
            ("cart", NODE, 2, Some(true)),
            ("legacy", NODE, 3, Some(false)),
        ],
        &[],
    );
    assert!(f.add("c1", "cart", 2).await.unwrap());
    assert!(!f.add("c2", "legacy", 3).await.unwrap());

    assert_eq!(f.wired(), ["c1"]);
    let rules = f.capture.rules(&f.netns("c1"));
    assert_eq!((rules.installs, rules.present), (1, true));
    assert_eq!(f.capture.rules(&f.netns("c2")).installs, 0);
    let pod = f.registry.pod("shop", "cart").unwrap();
    assert_eq!(
        pod.identity.as_str(),
        "spiffe://cluster.local/ns/shop/sa/cart"
    );
    // The listeners are bound where the pod's traffic will be redirected.
    let hbone = SocketAddr::new(f.ip(2), 15008);
    tokio::net::TcpStream::connect(hbone).await.unwrap();
}

#[tokio::test]
async fn a_pod_the_node_cannot_place_is_refused_so_it_never_starts_unwired() {
    let f = Fixture::new(&[("remote", "node-b", 2, Some(true))], &["shop"]);
    let unknown = f.add("c1", "stranger", 9).await.unwrap_err();
    assert!(matches!(unknown, Error::Unknown { .. }), "{unknown}");
    assert_eq!(
        unknown.to_string(),
        "pod shop/stranger is in an enrolled namespace but unknown to this node"
    );
    let elsewhere = f.add("c2", "remote", 2).await.unwrap_err();
    assert_eq!(
        elsewhere.to_string(),
        r#"pod shop/remote is on node "node-b", this daemon serves "node-a""#
    );
    assert!(f.wired().is_empty());
}

#[tokio::test]
async fn a_bad_namespace_path_is_refused_with_the_path_named() {
    let f = Fixture::new(&[("cart", NODE, 2, Some(true))], &[]);
    let mut req = f.add_request("c1", "cart", 2);
    req.netns = "relative/path".into();
    let err = f.registry.add(req).await.unwrap_err();
    assert_eq!(
        super::super::chain(&err),
        "opening network namespace relative/path: not a network namespace"
    );
    assert!(f.wired().is_empty());
}

#[tokio::test]
async fn a_repeated_add_keeps_the_listeners_and_reapplies_the_rules() {
    let f = Fixture::new(&[("cart", NODE, 2, Some(true))], &[]);
    assert!(f.add("c1", "cart", 2).await.unwrap());
    let first = f.registry.pod("shop", "cart").unwrap();
    f.capture.flush(&f.netns("c1"));
    assert!(f.add("c1", "cart", 2).await.unwrap());

    assert_eq!(f.wired(), ["c1"]);
    assert!(Arc::ptr_eq(
        &first,
        &f.registry.pod("shop", "cart").unwrap()
    ));
    let rules = f.capture.rules(&f.netns("c1"));
    assert_eq!(
        (rules.installs, rules.removals, rules.present),
        (2, 0, true)
    );
}

#[tokio::test]
async fn del_unwires_its_sandbox_and_an_unknown_or_repeated_del_changes_nothing() {
    let f = Fixture::two_wired().await;

    f.del("never-seen").await;
    assert_eq!(f.wired(), ["c1", "c2"]);
    f.del("c1").await;
    f.del("c1").await;
    assert_eq!(f.wired(), ["c2"]);
    let rules = f.capture.rules(&f.netns("c1"));
    assert_eq!((rules.removals, rules.present), (1, false));
    assert!(f.capture.rules(&f.netns("c2")).present);
    assert!(f.registry.pod("shop", "cart").is_none());
}

#[tokio::test]
async fn gc_unwires_the_sandboxes_the_runtime_no_longer_lists() {
    let f = Fixture::two_wired().await;
    f.registry.gc(&["c2".to_owned()]).await;
    assert_eq!(f.wired(), ["c2"]);
    assert!(!f.capture.rules(&f.netns("c1")).present);
}

#[tokio::test]
async fn check_passes_for_a_wired_pod_and_names_what_is_missing() {
    let f = Fixture::new(
        &[
            ("cart", NODE, 2, Some(true)),
            ("legacy", NODE, 3, Some(false)),
        ],
        &[],
    );
    let check = |id: &str, name: &str| CheckPod {
        container_id: id.into(),
        netns: Some(f.netns(id)),
        pod: pod_ref(name),
    };
    let err = f.registry.check(check("c1", "cart")).await.unwrap_err();
    assert_eq!(err.to_string(), "pod shop/cart is enrolled but not wired");
    f.registry.check(check("c2", "legacy")).await.unwrap();

    f.add("c1", "cart", 2).await.unwrap();
    f.registry.check(check("c1", "cart")).await.unwrap();
    f.capture.flush(&f.netns("c1"));
    let err = f.registry.check(check("c1", "cart")).await.unwrap_err();
    assert_eq!(
        super::super::chain(&err),
        "pod shop/cart: redirection rules are missing"
    );
}

#[tokio::test]
async fn reconcile_wires_running_pods_and_their_runtime_id_is_adopted_on_add() {
    let f = Fixture::new(&[("cart", NODE, 2, Some(true))], &[]);
    f.capture.run_pod(&f.netns("c1"), &[f.ip(2)]);
    f.registry.reconcile().await;
    assert_eq!(f.wired(), ["reconciled.shop.cart"]);
    let rewired = f.registry.pod("shop", "cart").unwrap();

    // The runtime names the sandbox (a retried ADD, or CHECK's partner): same namespace, so
    // the pod keeps its listeners and is tracked under the runtime's id from now on.
    assert!(f.add("c1", "cart", 2).await.unwrap());
    assert_eq!(f.wired(), ["c1"]);
    assert!(Arc::ptr_eq(
        &rewired,
        &f.registry.pod("shop", "cart").unwrap()
    ));
    assert_eq!(f.capture.rules(&f.netns("c1")).removals, 0);
}

#[tokio::test]
async fn enrollment_flips_release_and_rewire_a_running_pod() {
    let f = Fixture::new(&[("cart", NODE, 2, Some(true))], &[]);
    f.capture.run_pod(&f.netns("c1"), &[f.ip(2)]);
    f.add("c1", "cart", 2).await.unwrap();

    f.set(&[("cart", NODE, 2, Some(false))]);
    f.registry.reconcile().await;
    assert!(f.wired().is_empty());
    assert!(!f.capture.rules(&f.netns("c1")).present);

    f.set(&[("cart", NODE, 2, Some(true))]);
    f.registry.reconcile().await;
    // Released pods leave pods.json: the rewired one is tracked under a synthetic id until the
    // runtime names it again.
    assert_eq!(f.wired(), ["reconciled.shop.cart"]);
    let rules = f.capture.rules(&f.netns("c1"));
    assert_eq!(
        (rules.installs, rules.removals, rules.present),
        (2, 1, true)
    );
}

#[tokio::test]
async fn a_restarted_registry_rewires_under_the_recorded_container_id() {
    let f = Fixture::new(&[("cart", NODE, 2, Some(true))], &[]);
    f.capture.run_pod(&f.netns("c1"), &[f.ip(2)]);
    f.add("c1", "cart", 2).await.unwrap();
    let restarted = f.restarted();
    restarted.reconcile().await;
    let ids: Vec<_> = restarted
        .list()
        .into_iter()
        .map(|p| p.container_id)
        .collect();
    assert_eq!(ids, ["c1"]);
}

#[tokio::test]
async fn a_del_for_another_sandbox_of_the_pod_leaves_the_running_one_wired() {
    let f = Fixture::two_wired().await;
    // Stale, retried or out of order: another sandbox id, with or without its namespace.
    f.del_in("old-cart", "cart", &f.netns("old-cart")).await;
    f.del_in("old-cart", "cart", &f.netns("c2")).await;
    f.del("old-cart").await;
    assert_eq!(f.wired(), ["c1", "c2"]);
    assert!(f.capture.rules(&f.netns("c1")).present);
    f.del_in("c1", "cart", &f.netns("c1")).await;
    assert_eq!(f.wired(), ["c2"]);
    // The runtime's own id is honoured even once the namespace path is gone.
    f.del_in("c2", "shelf", "/run/netns/already-deleted").await;
    assert!(f.wired().is_empty());
}

#[tokio::test]
async fn the_runtimes_del_and_check_reach_a_sandbox_the_daemon_rewired_itself() {
    let f = Fixture::new(
        &[
            ("cart", NODE, 2, Some(true)),
            ("shelf", NODE, 3, Some(true)),
        ],
        &[],
    );
    for (id, host) in [("c1", 2), ("c2", 3)] {
        f.capture.run_pod(&f.netns(id), &[f.ip(host)]);
    }
    f.registry.reconcile().await;
    assert_eq!(f.wired(), ["reconciled.shop.cart", "reconciled.shop.shelf"]);

    // CHECK names the sandbox: its id is adopted.
    let check = CheckPod {
        container_id: "c2".into(),
        netns: Some(f.netns("c2")),
        pod: pod_ref("shelf"),
    };
    f.registry.check(check).await.unwrap();
    assert_eq!(f.wired(), ["c2", "reconciled.shop.cart"]);
    // DEL names the other by its runtime id and namespace: that one, and only it, goes.
    f.del_in("c1", "cart", &f.netns("c1")).await;
    assert_eq!(f.wired(), ["c2"]);
}

#[tokio::test]
async fn gc_never_unwires_a_pod_whose_namespace_is_alive_and_enrolled() {
    let f = Fixture::new(
        &[
            ("cart", NODE, 2, Some(true)),
            ("shelf", NODE, 3, Some(true)),
            ("crate", NODE, 4, Some(true)),
        ],
        &[],
    );
    for (id, host) in [("c1", 2), ("c2", 3), ("c3", 4)] {
        f.capture.run_pod(&f.netns(id), &[f.ip(host)]);
    }
    // Rewired after a restart without pods.json: the daemon knows cart only as a synthetic id.
    f.registry.reconcile().await;
    f.add("c2", "shelf", 3).await.unwrap();
    f.add("c3", "crate", 4).await.unwrap();
    assert_eq!(f.wired().len(), 3);

    // A correct GC lists the runtime's ids: cart's synthetic id is not among them.
    f.registry.gc(&["c2".to_owned()]).await;
    assert_eq!(f.wired().len(), 3, "a running, enrolled pod was unwired");
    // Once a sandbox's namespace is gone, GC collects it.
    f.capture.stop_pod(&f.netns("c3"));
    f.registry.gc(&["c2".to_owned()]).await;
    assert_eq!(f.wired(), ["c2", "reconciled.shop.cart"]);
}

#[tokio::test]
async fn a_refused_add_for_a_new_sandbox_leaves_the_running_one_wired() {
    let f = Fixture::two_wired().await;
    let other = |mut req: AddPod, netns: &str, ips: Vec<IpAddr>| {
        req.netns = netns.to_owned();
        req.ips = ips;
        req
    };
    let base = f.add_request("c9", "cart", 2);
    let cases = [
        (
            other(base.clone(), "relative", vec![f.ip(2)]),
            "opening network namespace relative: not a network namespace".to_owned(),
        ),
        (
            other(base.clone(), &f.netns("c2"), vec![f.ip(2)]),
            format!(
                "network namespace {} is wired for pod shop/shelf",
                f.netns("c2")
            ),
        ),
        (
            other(base.clone(), &f.netns("c9"), vec![f.ip(3)]),
            format!("{} belongs to pod shop/shelf", f.ip(3)),
        ),
    ];
    for (req, want) in cases {
        let err = f.registry.add(req).await.unwrap_err();
        assert_eq!(super::super::chain(&err), want);
        assert_eq!(f.wired(), ["c1", "c2"]);
        assert!(f.capture.rules(&f.netns("c1")).present);
    }
    // A namespace that does not hold the address asked for.
    f.capture.run_pod(&f.netns("c9"), &[f.ip(7)]);
    let err = f.registry.add(base).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{} is not an address in network namespace {}",
            f.ip(2),
            f.netns("c9")
        )
    );
    assert_eq!(f.wired(), ["c1", "c2"]);
}

#[tokio::test]
async fn an_add_for_a_new_sandbox_of_a_wired_pod_switches_once_the_new_one_is_wired() {
    let f = Fixture::two_wired().await;
    assert!(f.add("c9", "cart", 2).await.unwrap());
    assert_eq!(f.wired(), ["c2", "c9"]);
    let (old, new) = (
        f.capture.rules(&f.netns("c1")),
        f.capture.rules(&f.netns("c9")),
    );
    assert_eq!((old.present, new.present), (false, true));
}

#[tokio::test]
async fn heal_puts_back_rules_that_were_flushed_and_leaves_intact_ones_alone() {
    let f = Fixture::two_wired().await;
    assert_eq!(f.registry.heal().await, 0);
    f.capture.flush(&f.netns("c2"));
    assert_eq!(f.registry.heal().await, 1);
    let rules = f.capture.rules(&f.netns("c2"));
    assert_eq!((rules.installs, rules.present), (2, true));
    assert_eq!(f.capture.rules(&f.netns("c1")).installs, 1);
    assert_eq!(f.registry.rules_restored(), 1);
}

#[tokio::test]
async fn a_pod_whose_service_account_changes_is_served_under_the_new_identity_without_a_gap() {
    let f = Fixture::new(&[("cart", NODE, 2, Some(true))], &[]);
    f.add("c1", "cart", 2).await.unwrap();
    let before = f.registry.pod("shop", "cart").unwrap();

    // The reload: same pod, another service account.
    let mut renamed = snapshot(f.net, &[("cart", NODE, 2, Some(true))], &[]);
    let cart = Workload {
        identity: Id::new("cluster.local", "shop", "checkout").unwrap(),
        ..(**renamed.workload("shop", "cart").unwrap()).clone()
    };
    renamed = Snapshot::build(
        "cluster.local",
        PeerAuthentication::Permissive,
        BTreeSet::new(),
        vec![Arc::new(cart)],
        vec![],
    )
    .unwrap();
    f.state.replace(renamed);
    f.registry.reconcile().await;

    let after = f.registry.pod("shop", "cart").unwrap();
    assert_eq!(
        after.identity.as_str(),
        "spiffe://cluster.local/ns/shop/sa/checkout"
    );
    assert!(!Arc::ptr_eq(&before, &after));
    assert_eq!(f.wired(), ["c1"]);
    let rules = f.capture.rules(&f.netns("c1"));
    assert_eq!(
        (rules.removals, rules.present),
        (0, true),
        "the rules left the pod"
    );
    // The pod still answers on its HBONE port (the new listeners).
    tokio::time::sleep(Duration::from_millis(50)).await;
    tokio::net::TcpStream::connect(SocketAddr::new(f.ip(2), 15008))
        .await
        .unwrap();
}

#[tokio::test]
async fn the_host_probe_rule_follows_the_wired_pods() {
    let f = Fixture::two_wired().await;
    assert_eq!(f.capture.probed(), [f.ip(2), f.ip(3)]);
    // Requests that change nothing rewrite nothing on the host.
    let updates = f.capture.probe_updates();
    f.del("never-seen").await;
    f.add("c1", "cart", 2).await.unwrap();
    assert_eq!(f.capture.probe_updates(), updates);
    f.del("c1").await;
    assert_eq!(f.capture.probed(), [f.ip(3)]);
    f.registry.gc(&[]).await;
    assert!(f.capture.probed().is_empty());
}

#[tokio::test]
async fn a_pod_that_could_not_be_rewired_is_tried_again_until_it_is() {
    let f = Fixture::new(&[("cart", NODE, 2, Some(true))], &[]);
    f.capture.run_pod(&f.netns("c1"), &[f.ip(2)]);
    // Something else holds the pod's outbound port: the listener cannot be bound.
    let squatter = std::net::TcpListener::bind(SocketAddr::new(f.ip(2), 15001)).unwrap();
    assert_eq!(f.registry.reconcile().await, 1, "counted as unwired");
    assert!(f.wired().is_empty());

    let registry = Arc::new(f.registry);
    let stop = CancellationToken::new();
    tokio::spawn(
        registry
            .clone()
            .keep_healed(Duration::from_millis(20), stop.clone()),
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(registry.list().is_empty(), "still failing");
    drop(squatter);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while registry.list().is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "never rewired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(registry.list()[0].container_id, "reconciled.shop.cart");
    assert_eq!(registry.reconcile().await, 0);
    stop.cancel();
}
