//! culvert ca against the real apiserver: TokenReview authentication, the node authorizer, CSR
//! checks, node daemons issuing from it, outages and root rotation.

use std::time::{Duration, Instant};

use culvert_tests::kube::{
    self, CaCall, CaEndpoint, CaServer, Cluster, PodObject, ca_call, csr_for,
};
use culvert_tests::{ECHO, Lab, PodSpec, addr, eventually, round_trip, spec};
use tonic::Code;

const WAIT: Duration = Duration::from_secs(30);
const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";

/// A cluster with the manifests, namespace `shop` enrolled, culvert ca running, and node agent
/// pods (with pod-bound CA tokens) on node-a and node-b.
fn cluster_with_ca(tag: &str, extra: &[&str]) -> (Cluster, CaServer, [String; 2]) {
    let cluster = Cluster::with_shop(tag, true);
    let ca = cluster.start_ca(tag, extra);
    let tokens = ["node-a", "node-b"].map(|node| {
        let path = cluster.node_agent(node);
        std::fs::read_to_string(path).unwrap()
    });
    (cluster, ca, tokens)
}

fn shop_pod(cluster: &Cluster, name: &str, node: &str, sa: &str) {
    cluster.pod(&PodObject {
        name,
        namespace: "shop",
        node,
        service_account: sa,
        mode: None,
        host_network: false,
    });
}

fn set_phase(cluster: &Cluster, name: &str, phase: &str) {
    cluster.patch_pod_status("shop", name, &format!(r#"{{"phase":"{phase}"}}"#));
}

fn ask(
    ca: &CaServer,
    bundle: &str,
    token: &str,
    id: Option<&str>,
    csr: &str,
) -> Result<Vec<String>, (Code, String)> {
    ca_call(
        ca.endpoint(),
        bundle,
        &CaCall {
            token,
            impersonate: id,
            csr,
            ttl_seconds: 3600,
        },
    )
}

fn signed_lines(ca: &CaServer) -> usize {
    ca.log().lines().filter(|l| l.contains(" signed")).count()
}

#[test]
#[ignore = "needs the test apiserver"]
fn the_ca_signs_only_identities_with_a_live_pod_on_the_callers_node() {
    let (cluster, ca, [node_a, _]) = cluster_with_ca("ca-authz", &[]);
    let bundle = cluster.bundle();
    shop_pod(&cluster, "cart-b", "node-b", "cart");
    let csr = csr_for(CART, |_| {});

    // The only cart pod is on node-b: node-a may not have its identity.
    let refused = ask(&ca, &bundle, &node_a, Some(CART), &csr).unwrap_err();
    assert_eq!(refused.0, Code::PermissionDenied, "{refused:?}");
    assert!(refused.1.contains("node-a"), "{refused:?}");

    // Pending on node-a (bound, not started) counts: certificates come before the app.
    shop_pod(&cluster, "cart-a", "node-a", "cart");
    let chain = ask(&ca, &bundle, &node_a, Some(CART), &csr).unwrap();
    assert!(chain.len() >= 2, "{chain:?}");
    assert_eq!(
        chain.last().unwrap().trim(),
        bundle.trim(),
        "the root bundle is not last"
    );
    let (_, leaf) = x509_parser::pem::parse_x509_pem(chain[0].as_bytes()).unwrap();
    let leaf = rustls::pki_types::CertificateDer::from(leaf.contents);
    assert_eq!(
        culvert::tls::identity_of(&leaf)
            .map(|i| i.to_string())
            .as_deref(),
        Some(CART)
    );

    // Failed and Succeeded pods do not.
    set_phase(&cluster, "cart-a", "Failed");
    let refused = ask(&ca, &bundle, &node_a, Some(CART), &csr).unwrap_err();
    assert_eq!(refused.0, Code::PermissionDenied, "{refused:?}");

    // The node agent's pod deleted and recreated under the same name: the old token's UID no
    // longer matches.
    shop_pod(&cluster, "cart-a2", "node-a", "cart");
    ask(&ca, &bundle, &node_a, Some(CART), &csr).unwrap();
    cluster.kubectl(&[
        "-n",
        "culvert-system",
        "delete",
        "pod",
        "culvert-node-node-a",
        "--grace-period=0",
        "--force",
    ]);
    let _ = cluster.node_agent("node-a");
    let refused = ask(&ca, &bundle, &node_a, Some(CART), &csr).unwrap_err();
    assert_eq!(refused.0, Code::Unauthenticated, "{refused:?}");

    // Every refusal was logged once, with the caller and the reason.
    let log = ca.log();
    let refusals: Vec<&str> = log.lines().filter(|l| l.contains("refused")).collect();
    assert_eq!(refusals.len(), 3, "{refusals:#?}");
    assert!(
        refusals[0].contains("culvert-system/culvert-node") && refusals[0].contains(CART),
        "{}",
        refusals[0]
    );
}

#[test]
#[ignore = "needs the test apiserver"]
fn tokens_that_do_not_prove_a_node_agents_pod_are_unauthenticated() {
    let (cluster, ca, [node_a, _]) = cluster_with_ca("ca-authn", &[]);
    let bundle = cluster.bundle();
    shop_pod(&cluster, "cart-a", "node-a", "cart");
    let csr = csr_for(CART, |_| {});
    let agent = Some("culvert-node-node-a");
    cluster
        .apply("apiVersion: v1\nkind: ServiceAccount\nmetadata: { name: cart, namespace: shop }\n");

    let cases = [
        ("garbage", "not-a-token".to_owned(), "token refused"),
        (
            "wrong audience",
            cluster.token("culvert-system", "culvert-node", agent, "someone-else"),
            "token refused",
        ),
        (
            "expired",
            cluster.expired_token("culvert-system", "culvert-node", agent, "istio-ca"),
            // The apiserver's own words: the signature held, the lifetime did not.
            "has expired",
        ),
        (
            "not bound to a pod",
            cluster.token("culvert-system", "culvert-node", None, "istio-ca"),
            "not bound to a pod",
        ),
        (
            "an app's account impersonating",
            cluster.token("shop", "cart", Some("cart-a"), "istio-ca"),
            "not a trusted node account",
        ),
    ];
    for (what, token, reason) in &cases {
        let refused = ask(&ca, &bundle, token, Some(CART), &csr).unwrap_err();
        assert_eq!(refused.0, Code::Unauthenticated, "{what}: {refused:?}");
        assert!(refused.1.contains(reason), "{what}: {refused:?}");
    }
    // A workload asking for itself, without impersonation, gets its own identity only.
    let own = cluster.token("shop", "cart", Some("cart-a"), "istio-ca");
    ask(&ca, &bundle, &own, None, &csr).unwrap();
    let other = csr_for("spiffe://cluster.local/ns/shop/sa/admin", |_| {});
    assert_eq!(
        ask(&ca, &bundle, &own, None, &other).unwrap_err().0,
        Code::InvalidArgument
    );
    // The node agent's own token still works: the refusals above were about the tokens.
    ask(&ca, &bundle, &node_a, Some(CART), &csr).unwrap();
    let log = ca.log();
    for (what, _, reason) in &cases {
        assert!(
            log.lines()
                .any(|l| l.contains("refused") && l.contains(reason)),
            "{what} not logged"
        );
    }
}

#[test]
#[ignore = "needs the test apiserver"]
fn csrs_that_ask_for_more_than_the_identity_are_refused_and_nothing_is_signed() {
    let (cluster, ca, [node_a, _]) = cluster_with_ca("ca-csr", &["--max-ttl", "48h"]);
    let bundle = cluster.bundle();
    shop_pod(&cluster, "cart-a", "node-a", "cart");
    let signed_before = signed_lines(&ca);
    let uri = |s: &str| rcgen::SanType::URI(s.try_into().unwrap());
    let cases: Vec<(&str, String, Option<&str>, i64, Code)> = vec![
        (
            "extra SAN",
            csr_for(CART, |p| {
                p.subject_alt_names
                    .push(uri("spiffe://cluster.local/ns/shop/sa/admin"))
            }),
            Some(CART),
            3600,
            Code::InvalidArgument,
        ),
        (
            "SAN is another identity",
            csr_for("spiffe://cluster.local/ns/shop/sa/admin", |_| {}),
            Some(CART),
            3600,
            Code::InvalidArgument,
        ),
        (
            "DNS name",
            csr_for(CART, |p| {
                p.subject_alt_names
                    .push(rcgen::SanType::DnsName("cart.shop.svc".try_into().unwrap()))
            }),
            Some(CART),
            3600,
            Code::InvalidArgument,
        ),
        (
            "common name",
            csr_for(CART, |p| {
                p.distinguished_name.push(rcgen::DnType::CommonName, "cart")
            }),
            Some(CART),
            3600,
            Code::InvalidArgument,
        ),
        (
            "foreign trust domain",
            csr_for("spiffe://evil.example/ns/shop/sa/cart", |_| {}),
            Some("spiffe://evil.example/ns/shop/sa/cart"),
            3600,
            Code::PermissionDenied,
        ),
        (
            "over-long TTL",
            csr_for(CART, |_| {}),
            Some(CART),
            30 * 86_400,
            Code::InvalidArgument,
        ),
        (
            "huge CSR",
            csr_for(CART, |p| {
                for i in 0..200 {
                    p.subject_alt_names
                        .push(uri(&format!("spiffe://cluster.local/ns/shop/sa/x{i}")));
                }
            }),
            Some(CART),
            3600,
            Code::InvalidArgument,
        ),
        (
            "bad signature",
            tamper(&csr_for(CART, |_| {})),
            Some(CART),
            3600,
            Code::InvalidArgument,
        ),
    ];
    for (what, csr, id, ttl, code) in &cases {
        let refused = ca_call(
            ca.endpoint(),
            &bundle,
            &CaCall {
                token: &node_a,
                impersonate: *id,
                csr,
                ttl_seconds: *ttl,
            },
        )
        .unwrap_err();
        assert_eq!(refused.0, *code, "{what}: {refused:?}");
    }
    assert_eq!(
        signed_lines(&ca),
        signed_before,
        "a refused request was signed"
    );
    // The same caller with a clean CSR and no TTL preference gets the 24 h default.
    let chain = ca_call(
        ca.endpoint(),
        &bundle,
        &CaCall {
            token: &node_a,
            impersonate: Some(CART),
            csr: &csr_for(CART, |_| {}),
            ttl_seconds: 0,
        },
    )
    .unwrap();
    let (_, leaf) = x509_parser::pem::parse_x509_pem(chain[0].as_bytes()).unwrap();
    let cert = leaf.parse_x509().unwrap();
    let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert_eq!(
        life,
        24 * 3600 + 60,
        "default lifetime (with the minute of back-dating)"
    );
}

/// `pem` with the last byte of its DER (inside the signature) flipped.
fn tamper(pem: &str) -> String {
    let mut der = pem::parse(pem).unwrap().into_contents();
    let last = der.len() - 1;
    der[last] ^= 1;
    pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der))
}

/// Two lab pods in `shop` on different nodes whose daemons get certificates from `ca`.
fn lab_with_ca(tag: &str, cluster: &Cluster, ca: CaEndpoint, ttl: Option<&str>) -> Lab {
    let mut pods = spec(vec![
        PodSpec::in_namespace("client", 0, "shop"),
        PodSpec::in_namespace("server", 1, "shop"),
    ]);
    pods.pods[1].service_account = "api".into();
    pods.ca = ["node-a", "node-b"]
        .iter()
        .map(|n| ca.node_block(&cluster.dir.join(format!("culvert-node-{n}.token"))))
        .collect();
    pods.cert_ttl = ttl.map(str::to_owned);
    let lab = kube::lab(tag, cluster, pods);
    cluster.attach_lab_pods(&lab);
    lab.pod("server").serve_echo(ECHO).unwrap();
    super::wait_known(&lab, 0, "server");
    lab
}

#[test]
#[ignore = "needs root and the test apiserver"]
fn node_daemons_hold_certificates_from_the_ca_for_their_own_pods_and_talk_over_hbone() {
    let (cluster, ca, _) = cluster_with_ca("ca-flow", &[]);
    let lab = lab_with_ca("kbcaflow", &cluster, ca.endpoint(), None);
    eventually("the client to reach the server", WAIT, || {
        echo_ok_quiet(&lab, "client", "server")
    });
    let (client_id, server_id) = (
        "spiffe://cluster.local/ns/shop/sa/client",
        "spiffe://cluster.local/ns/shop/sa/api",
    );
    super::assert_hbone_lines_name(&lab, client_id, server_id);
    // Each node asked only for its own pod's identity, and got it.
    let log = ca.log();
    let signed: Vec<&str> = log.lines().filter(|l| l.contains(" signed")).collect();
    assert!(
        signed
            .iter()
            .any(|l| l.contains("culvert-node-node-a") && l.contains(client_id)),
        "{signed:#?}"
    );
    assert!(
        signed
            .iter()
            .any(|l| l.contains("culvert-node-node-b") && l.contains(server_id)),
        "{signed:#?}"
    );
    assert!(!log.contains("refused"), "{log}");
    // The daemons were never given a CA key: their node files name only the CA endpoint.
    for i in 0..2 {
        let file = std::fs::read_to_string(&lab.nodes[i].config).unwrap();
        assert!(
            file.contains("istio:") && !file.contains("ca.key"),
            "{file}"
        );
    }
}

/// One new connection from `from` to `to`, echoed; `None` on any failure.
fn echo_ok_quiet(lab: &Lab, from: &str, to: &str) -> Option<()> {
    let payload = b"culvert-ca-check";
    let back = round_trip(lab, from, addr(lab, to, ECHO), payload).ok()?;
    (back == payload).then_some(())
}

#[test]
#[ignore = "needs root and the test apiserver"]
fn certificates_keep_serving_through_a_ca_outage_longer_than_a_renewal_and_renewal_resumes() {
    // One-minute certificates (the shortest allowed): renewal at 30 s; the CA is away from
    // 5 s to 35 s, across the renewal.
    let (cluster, mut ca, _) = cluster_with_ca("ca-outage", &[]);
    let lab = lab_with_ca("kbcaout", &cluster, ca.endpoint(), Some("1m"));
    eventually("first traffic", WAIT, || {
        echo_ok_quiet(&lab, "client", "server")
    });
    let before = signed_lines(&ca);
    std::thread::sleep(Duration::from_secs(5));
    ca.kill();
    let down = Instant::now();
    let mut failures = 0;
    while down.elapsed() < Duration::from_secs(30) {
        if echo_ok_quiet(&lab, "client", "server").is_none() {
            failures += 1;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(failures, 0, "connections failed while the CA was down");
    assert!(
        lab.log(0).contains("certificate renewal failed"),
        "no renewal was attempted during the outage"
    );
    // `culvert check` names the CA and the failed renewal.
    let ca_check = |lab: &Lab| {
        let checks = lab.admin(0, "/check").unwrap();
        checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["check"] == "ca")
            .cloned()
            .unwrap()
    };
    let down = ca_check(&lab);
    assert_eq!(down["ok"], false, "{down}");
    let detail = down["detail"].as_str().unwrap();
    assert!(
        detail.starts_with(&format!("unreachable: the CA at {}", ca.endpoint().addr)),
        "{down}"
    );
    assert!(
        detail.contains("; the last request, for spiffe://"),
        "{down}"
    );
    assert!(down["fix"].is_string(), "{down}");
    ca.start();
    eventually("renewal to resume", WAIT, || {
        (signed_lines(&ca) > before).then_some(())
    });
    eventually("traffic on renewed certificates", WAIT, || {
        echo_ok_quiet(&lab, "client", "server")
    });
    // Until the failed renewal is retried (with backoff), the check still names that failure.
    let up = eventually("the CA check to pass", WAIT, || {
        let check = ca_check(&lab);
        (check["ok"] == true).then_some(check)
    });
    assert!(
        up["detail"].as_str().unwrap().contains(
            "answers TLS with a certificate the mesh's roots accept; it signed spiffe://"
        ),
        "{up}"
    );
}

#[test]
#[ignore = "needs root and the test apiserver"]
fn a_root_rotation_under_traffic_fails_no_connection() {
    let (cluster, ca, _) = cluster_with_ca("ca-rotate", &[]);
    let lab = lab_with_ca("kbcarot", &cluster, ca.endpoint(), None);
    eventually("first traffic", WAIT, || {
        echo_ok_quiet(&lab, "client", "server")
    });

    // New connections all along, on another thread.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let lab = &lab;
        std::thread::scope(|scope| {
            let flag = stop.clone();
            let handle = scope.spawn(move || {
                let (mut ok, mut failed) = (0, 0);
                while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                    match echo_ok_quiet(lab, "client", "server") {
                        Some(()) => ok += 1,
                        None => failed += 1,
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                (ok, failed)
            });
            let reissued = |n: usize| {
                move |lab: &Lab| {
                    (0..2).all(|i| lab.log(i).matches("trust bundle changed").count() >= n)
                }
            };
            let old = cluster.bundle();
            cluster.ca_cli(&["rotate", "begin"]);
            eventually("both nodes to trust both roots", WAIT, || {
                reissued(1)(lab).then_some(())
            });
            assert_eq!(cluster.bundle().matches("BEGIN CERTIFICATE").count(), 2);
            std::thread::sleep(Duration::from_secs(2));
            cluster.ca_cli(&["rotate", "activate"]);
            eventually("both nodes to re-issue under the new root", WAIT, || {
                reissued(2)(lab).then_some(())
            });
            std::thread::sleep(Duration::from_secs(2));
            let roots = cluster.ca_cli(&["roots"]);
            assert!(
                roots.contains("signing") && roots.contains("retiring"),
                "{roots}"
            );
            cluster.ca_cli(&["rotate", "finish"]);
            eventually("both nodes to drop the old root", WAIT, || {
                reissued(3)(lab).then_some(())
            });
            let new = cluster.bundle();
            assert_eq!(new.matches("BEGIN CERTIFICATE").count(), 1);
            assert_ne!(new, old);
            std::thread::sleep(Duration::from_secs(2));
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            handle.join().unwrap()
        })
    };
    let (ok, failed) = traffic;
    assert!(ok > 20, "too little traffic to show anything: {ok}");
    assert_eq!(
        failed,
        0,
        "{failed} of {} connections failed during the rotation",
        ok + failed
    );
    // Pooled HBONE connections may have outlived every step. A restarted node holds only the
    // new root and new leaves and must handshake afresh with a peer whose listener was built
    // before the rotation began.
    lab.stop_node(0, nix::sys::signal::Signal::SIGTERM).unwrap();
    lab.start_node(0).unwrap();
    super::wait_known(&lab, 0, "server");
    eventually("traffic from the restarted node", WAIT, || {
        echo_ok_quiet(&lab, "client", "server")
    });
}

#[test]
#[ignore = "needs root, the test apiserver and istiod"]
fn node_daemons_hold_certificates_from_a_real_istiod_and_talk_over_hbone() {
    let cluster = Cluster::with_shop("ca-istiod", true);
    let istiod = cluster.start_istiod();
    let [node_a, _] = ["node-a", "node-b"].map(|node| {
        let path = cluster.node_agent(node);
        std::fs::read_to_string(path).unwrap()
    });
    let bundle = cluster.istio_bundle().unwrap();

    // istiod's node authorizer holds for Culvert's node account as culvert ca's does (istiod
    // answers Unauthenticated where culvert ca says PermissionDenied).
    shop_pod(&cluster, "cart-b", "node-b", "cart");
    let call = CaCall {
        token: &node_a,
        impersonate: Some(CART),
        csr: &csr_for(CART, |_| {}),
        ttl_seconds: 3600,
    };
    let refused = ca_call(istiod.endpoint(), &bundle, &call).unwrap_err();
    assert_eq!(refused.0, Code::Unauthenticated, "{refused:?}");
    assert!(
        istiod
            .log()
            .contains(r#"no instances of "shop/cart" found on node "node-a""#),
        "istiod refused for another reason: {}",
        istiod.log()
    );
    shop_pod(&cluster, "cart-a", "node-a", "cart");
    let chain = ca_call(istiod.endpoint(), &bundle, &call).unwrap();
    assert!(chain.len() >= 2, "{chain:?}");

    // The daemons trust only istiod's root, from its ConfigMap, and renew from it.
    let lab = lab_with_ca("kbistiod", &cluster, istiod.endpoint(), None);
    eventually("the client to reach the server", WAIT, || {
        echo_ok_quiet(&lab, "client", "server")
    });
    super::assert_hbone_lines_name(
        &lab,
        "spiffe://cluster.local/ns/shop/sa/client",
        "spiffe://cluster.local/ns/shop/sa/api",
    );
    for i in 0..2 {
        let log = lab.log(i);
        assert!(log.contains("certificate issued"), "node {i}: {log}");
        let file = std::fs::read_to_string(&lab.nodes[i].config).unwrap();
        assert!(file.contains("istiod.istio-system.svc"), "{file}");
    }
}

/// What each of `threads` callers got from `to` while `during` ran: `(successes, failure codes)`.
fn hammer(
    to: CaEndpoint,
    bundle: &str,
    token: &str,
    threads: usize,
    during: impl FnOnce(),
) -> (usize, Vec<(Code, String)>) {
    let stop = std::sync::atomic::AtomicBool::new(false);
    let csr = csr_for(CART, |_| {});
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let (mut ok, mut failed) = (0, Vec::new());
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        if !failed.is_empty() {
                            // A dead replica refuses at once: do not spin on it.
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        let call = CaCall {
                            token,
                            impersonate: Some(CART),
                            csr: &csr,
                            ttl_seconds: 3600,
                        };
                        match ca_call(to, bundle, &call) {
                            Ok(_) => ok += 1,
                            Err(e) => failed.push(e),
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        during();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        workers.into_iter().map(|w| w.join().unwrap()).fold(
            (0, Vec::new()),
            |(ok, mut failed), (o, f)| {
                failed.extend(f);
                (ok + o, failed)
            },
        )
    })
}

/// A call the connection failed under, not one the CA answered: Unavailable when there was no
/// one to connect to, Unknown when the connection died mid-call. The node daemon retries both.
fn transport_failure(failure: &(Code, String)) -> bool {
    match failure.0 {
        Code::Unavailable => true,
        Code::Unknown => failure.1.contains("transport error"),
        _ => false,
    }
}

/// Each distinct failure once, with how often it happened.
fn summary(failures: &[(Code, String)]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for (code, message) in failures {
        *counts.entry(format!("{code:?}: {message}")).or_default() += 1;
    }
    counts
}

#[test]
#[ignore = "needs the test apiserver"]
fn two_replicas_serve_one_root_and_one_killed_under_load_fails_only_retryable_calls() {
    let cluster = Cluster::with_shop("ca-replicas", true);
    // Both start at once on an empty namespace: create-if-absent leaves one signing key.
    let (mut first, mut second) = std::thread::scope(|scope| {
        let a = scope.spawn(|| cluster.start_ca("first", &[]));
        let b = scope.spawn(|| cluster.start_ca("second", &[]));
        (a.join().unwrap(), b.join().unwrap())
    });
    let node_a = std::fs::read_to_string(cluster.node_agent("node-a")).unwrap();
    shop_pod(&cluster, "cart-a", "node-a", "cart");
    let bundle = cluster.bundle();
    let roots = |ca: &CaServer| {
        let call = CaCall {
            token: &node_a,
            impersonate: Some(CART),
            csr: &csr_for(CART, |_| {}),
            ttl_seconds: 3600,
        };
        ca_call(ca.endpoint(), &bundle, &call)
            .unwrap()
            .pop()
            .unwrap()
    };
    assert_eq!(
        roots(&first),
        roots(&second),
        "the replicas sign under different roots"
    );
    assert_eq!(roots(&first).trim(), bundle.trim());

    // Callers on the survivor lose nothing; callers on the killed one see only transport
    // failures, which the node daemon retries (with a Service, on the other replica).
    let (survivor, on_survivor) = {
        let (mut survivor_ok, mut survivor_failed) = (0, Vec::new());
        let (killed_ok, killed_failed) = hammer(first.endpoint(), &bundle, &node_a, 4, || {
            let (ok, failed) = hammer(second.endpoint(), &bundle, &node_a, 4, || {
                std::thread::sleep(Duration::from_secs(2));
                first.kill();
                std::thread::sleep(Duration::from_secs(2));
            });
            survivor_ok = ok;
            survivor_failed = failed;
        });
        assert!(
            killed_ok > 0,
            "no call reached the first replica before it was killed"
        );
        assert!(
            !killed_failed.is_empty(),
            "the kill did not interrupt the load"
        );
        assert!(
            killed_failed.iter().all(transport_failure),
            "{:?}",
            summary(&killed_failed)
        );
        (survivor_ok, survivor_failed)
    };
    assert!(survivor > 0);
    assert!(on_survivor.is_empty(), "{:?}", summary(&on_survivor));

    // SIGTERM, as a rolling update sends: calls in flight are answered, later ones find no
    // listener, and the process exits cleanly.
    let mut exit = None;
    let (_, failed) = hammer(second.endpoint(), &bundle, &node_a, 4, || {
        std::thread::sleep(Duration::from_secs(1));
        exit = Some(second.terminate());
    });
    // No call was cut mid-way (that would be Unknown): only refused connections.
    assert!(
        failed.iter().all(|(code, _)| *code == Code::Unavailable),
        "{:?}",
        summary(&failed)
    );
    assert!(exit.unwrap().success(), "{}", second.log());
}
