//! Istio's PeerAuthentication and AuthorizationPolicy from the API, with the shipped CRDs:
//! the schema against Istio's own YAML, and enforcement across two nodes.

use std::time::Duration;

use culvert_tests::kube::{self, Cluster};
use culvert_tests::{ECHO, PodSpec, access_line, addr, echo_ok, echoes, eventually, refused, spec};

const WAIT: Duration = Duration::from_secs(30);

/// Istio's documentation examples, as written (both API versions).
const ISTIO_EXAMPLES: &str = "
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: { name: default, namespace: foo }
spec:
  mtls: { mode: STRICT }
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: { name: finance, namespace: foo }
spec:
  selector: { matchLabels: { app: finance } }
  mtls: { mode: STRICT }
  portLevelMtls:
    8080: { mode: DISABLE }
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: httpbin, namespace: foo }
spec:
  selector: { matchLabels: { app: httpbin, version: v1 } }
  action: ALLOW
  rules:
  - from:
    - source: { principals: [cluster.local/ns/default/sa/sleep] }
    - source: { namespaces: [test] }
    to:
    - operation: { methods: [GET], paths: [/info*] }
    - operation: { methods: [POST], paths: [/data] }
    when:
    - key: request.auth.claims[iss]
      values: [https://accounts.google.com]
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: { name: deny-method-get, namespace: foo }
spec:
  action: DENY
  rules:
  - from: [{ source: { notNamespaces: [foo], ipBlocks: [1.2.3.4, 5.6.7.0/24] } }]
    to: [{ operation: { ports: ['8080'], notPorts: ['9090'] } }]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: allow-nothing, namespace: foo }
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: sa, namespace: foo }
spec:
  rules: [{ from: [{ source: { serviceAccounts: [bar/sleep, httpbin] } }] }]
";

#[test]
#[ignore = "needs the test apiserver"]
fn the_shipped_crds_take_istios_yaml_as_written_and_refuse_what_istio_refuses() {
    let cluster = Cluster::with_shop("policy-crd", true);
    cluster.namespace("foo", false);
    cluster.apply(ISTIO_EXAMPLES);
    let names = cluster.kubectl(&["-n", "foo", "get", "pa,ap", "-o", "name"]);
    assert_eq!(names.lines().count(), 6, "{names}");
    // Read back in the other version too: both are served.
    cluster.kubectl(&[
        "-n",
        "foo",
        "get",
        "authorizationpolicies.v1beta1.security.istio.io",
        "httpbin",
    ]);

    let refused = [
        (
            "portLevelMtls without a selector",
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: { name: p, namespace: foo }\nspec: { portLevelMtls: { 8080: { mode: STRICT } } }\n",
            "portLevelMtls requires selector",
        ),
        (
            "serviceAccounts with namespaces",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: { name: a, namespace: foo }\nspec: { rules: [{ from: [{ source: { serviceAccounts: [sleep], namespaces: [other] } }] }] }\n",
            "cannot set serviceAccounts with namespaces or principals",
        ),
        (
            "selector with targetRefs",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: { name: b, namespace: foo }\nspec: { selector: { matchLabels: { a: b } }, targetRefs: [{ kind: Service, name: s }] }\n",
            "only one of targetRefs, targetRef or selector",
        ),
        (
            "an unknown action",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: { name: c, namespace: foo }\nspec: { action: MAYBE }\n",
            "Unsupported value",
        ),
        (
            "port 0",
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: { name: d, namespace: foo }\nspec: { selector: { matchLabels: { a: b } }, portLevelMtls: { 0: { mode: STRICT } } }\n",
            "port must be between 1-65535",
        ),
    ];
    for (what, yaml, message) in refused {
        let err = cluster
            .kubectl_as(&cluster.kubeconfig, &["apply", "-f", "-"], Some(yaml))
            .unwrap_err();
        assert!(err.contains(message), "{what}: {err}");
    }
}

#[test]
#[ignore = "needs root and the test apiserver"]
fn api_policies_deny_a_principal_across_nodes_close_open_connections_and_outlive_the_apiserver() {
    let cluster = Cluster::with_shop("policy-flow", true);
    let mut pods = spec(vec![
        PodSpec::in_namespace("client", 0, "shop"),
        PodSpec::in_namespace("intruder", 0, "shop"),
        PodSpec::in_namespace("server", 1, "shop"),
        PodSpec {
            enrolled: Some(false),
            ..PodSpec::in_namespace("legacy", 0, "shop")
        },
    ]);
    pods.pods[2].service_account = "api".into();
    let lab = kube::lab("kbpolicy", &cluster, pods);
    cluster.attach_lab_pods(&lab);
    lab.pod("server").serve_echo(ECHO).unwrap();
    lab.pod("server").serve_echo(ECHO + 1).unwrap();
    super::wait_known(&lab, 0, "server");
    let to = addr(&lab, "server", ECHO);
    echo_ok(&lab, "intruder", to, b"before any policy");

    // Port-level STRICT from the API: plaintext is refused on that port only.
    echo_ok(&lab, "legacy", to, b"plaintext before");
    cluster.apply(
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: { name: strict-echo, namespace: shop }
spec:
  selector: { matchLabels: {} }
  portLevelMtls: { 8080: { mode: STRICT } }
",
    );
    eventually("the port-level STRICT to apply", WAIT, || {
        refused(&lab, "legacy", to).then_some(())
    });
    access_line(&lab, 1, |v| {
        v["transport"] == "plaintext" && v["reason"] == "plaintext_to_strict"
    });
    echo_ok(
        &lab,
        "legacy",
        addr(&lab, "server", ECHO + 1),
        b"plaintext, other port",
    );
    echo_ok(&lab, "intruder", to, b"mTLS on the STRICT port");
    let mut open = lab.pod("intruder").connect(to).unwrap();
    assert!(echoes(&mut open));

    cluster.apply(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: no-intruder, namespace: shop }
spec:
  action: DENY
  rules: [{ from: [{ source: { principals: [cluster.local/ns/shop/sa/intruder] } }] }]
",
    );
    // The open connection is closed within a second of the node seeing the policy, and new
    // ones are refused at the server's node, naming the policy; the client still flows.
    eventually(
        "node-b to close the intruder's open connection",
        WAIT,
        || (!echoes(&mut open)).then_some(()),
    );
    assert!(refused(&lab, "intruder", to), "the intruder got through");
    let line = access_line(&lab, 1, |v| {
        v["src.identity"] == "spiffe://cluster.local/ns/shop/sa/intruder"
            && v["reason"] == "policy_denied"
            && v["error"]
                .as_str()
                .is_some_and(|e| e.starts_with("denied by policy"))
    });
    assert_eq!(line["policy"], "shop/no-intruder");
    echo_ok(&lab, "client", to, b"still allowed");

    // A namespace-wide ALLOW for another namespace only: the client is no longer allowed.
    cluster.apply(
        "apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: { name: only-front, namespace: shop }
spec:
  rules: [{ from: [{ source: { namespaces: [front] } }] }]
",
    );
    eventually("the ALLOW to apply", WAIT, || {
        refused(&lab, "client", to).then_some(())
    });
    access_line(&lab, 1, |v| {
        v["src.identity"] == "spiffe://cluster.local/ns/shop/sa/client"
            && v["reason"] == "not_allowed"
    });

    // With the apiserver gone the node keeps enforcing what it last saw.
    cluster.stop_apiserver();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        refused(&lab, "intruder", to),
        "enforcement lapsed with the apiserver down"
    );
    assert!(
        refused(&lab, "client", to),
        "enforcement lapsed with the apiserver down"
    );
    cluster.start_apiserver();
}
