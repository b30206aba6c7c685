//! Istio's AuthorizationPolicy and PeerAuthentication from the node file's `policies:`,
//! enforced on the wire between two nodes and applied by a reload.

use std::net::TcpStream;
use std::time::Duration;

use culvert_tests::*;

/// What the server node is given on reload: a DENY of one principal, and STRICT on one port
/// only (the pod's other port keeps the mesh-wide PERMISSIVE).
const POLICIES: &str = "
policies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: { name: no-intruder, namespace: demo }
    spec:
      action: DENY
      rules:
        - from: [{ source: { principals: [cluster.local/ns/demo/sa/intruder] } }]
  - apiVersion: security.istio.io/v1beta1
    kind: PeerAuthentication
    metadata: { name: strict-echo, namespace: demo }
    spec:
      selector: { matchLabels: {} }
      portLevelMtls: { '8080': { mode: STRICT } }
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: { name: http-only, namespace: ops }
    spec:
      action: DENY
      rules: [{ to: [{ operation: { methods: [DELETE] } }] }]
";

#[test]
#[ignore = "needs root: netns"]
fn node_file_policies_deny_one_principal_and_plaintext_on_one_port_and_close_open_connections_they_deny()
 {
    let lab = lab(
        "cvauthz",
        spec(vec![
            PodSpec::new("client", 0, true),
            PodSpec::new("intruder", 0, true),
            PodSpec::new("legacy", 0, false),
            PodSpec::new("server", 1, true),
        ]),
    );
    let server = lab.pod("server");
    server.serve_echo(ECHO).unwrap();
    server.serve_echo(ECHO + 1).unwrap();
    for from in ["client", "intruder", "legacy"] {
        echo_ok(&lab, from, addr(&lab, "server", ECHO), b"before any policy");
    }
    // Connections open across the change: the reload must close the ones it denies and
    // leave the others be.
    let mut open: Vec<(&str, TcpStream)> = ["client", "intruder", "legacy"]
        .into_iter()
        .map(|from| {
            let mut stream = lab.pod(from).connect(addr(&lab, "server", ECHO)).unwrap();
            assert!(echoes(&mut stream), "{from} before the change");
            (from, stream)
        })
        .collect();

    let config = &lab.nodes[1].config;
    let mut file = std::fs::read_to_string(config).unwrap();
    file.push_str(POLICIES);
    std::fs::write(config, file).unwrap();
    lab.signal_node(1, nix::sys::signal::Signal::SIGHUP)
        .unwrap();
    eventually("the reload", Duration::from_secs(5), || {
        lab.log(1).contains("configuration reloaded").then_some(())
    });
    // Within a second the denied ones are closed; the allowed one still echoes.
    std::thread::sleep(Duration::from_secs(1));
    for (from, stream) in &mut open {
        let alive = echoes(stream);
        assert_eq!(
            alive,
            *from == "client",
            "{from}'s open connection after the change"
        );
    }
    let closed = |src: &str| {
        access_line(&lab, 1, |v| {
            v["src.addr"]
                .as_str()
                .is_some_and(|a| a.starts_with(&format!("{src}:")))
                && v["error"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("closed: a policy change"))
        })
    };
    let intruder = closed(&lab.pod("intruder").ip.to_string());
    assert_eq!(intruder["policy"], "demo/no-intruder");
    assert_eq!(intruder["transport"], "hbone");
    let legacy = closed(&lab.pod("legacy").ip.to_string());
    assert_eq!(legacy["reason"], "plaintext_to_strict");

    // What the node loaded, what each policy selects, and what it cannot enforce as written.
    let loaded = lab.admin(1, "/policies").unwrap();
    let authz = loaded["authorizationPolicies"].as_array().unwrap();
    assert_eq!(authz[0]["name"], "demo/no-intruder");
    assert_eq!(authz[0]["selects"], serde_json::json!(["demo/server"]));
    assert_eq!(authz[1]["name"], "ops/http-only");
    assert!(
        authz[1]["notes"][0]
            .as_str()
            .unwrap()
            .contains("operation.methods is HTTP-level"),
        "{loaded}"
    );
    assert!(lab.log(1).contains("policy not enforced as written"));

    // The denied principal is refused at the server's node and the log names the policy.
    assert!(
        refused(&lab, "intruder", addr(&lab, "server", ECHO)),
        "the intruder got through"
    );
    let line = access_line(&lab, 1, |v| {
        v["src.id"] == "spiffe://cluster.local/ns/demo/sa/intruder" && v.get("policy").is_some()
    });
    assert_eq!(line["transport"], "hbone");
    assert_eq!(line["reason"], "policy_denied");
    assert_eq!(line["policy"], "demo/no-intruder");
    // Every other principal still flows, on both ports.
    echo_ok(&lab, "client", addr(&lab, "server", ECHO), b"still allowed");
    echo_ok(
        &lab,
        "client",
        addr(&lab, "server", ECHO + 1),
        b"other port",
    );
    // Plaintext: refused on the STRICT port only.
    assert!(
        refused(&lab, "legacy", addr(&lab, "server", ECHO)),
        "plaintext reached a STRICT port"
    );
    let line = access_line(&lab, 1, |v| {
        v["transport"] == "plaintext" && v["reason"] == "plaintext_to_strict"
    });
    assert_eq!(line["dst.addr"], addr(&lab, "server", ECHO).to_string());
    echo_ok(
        &lab,
        "legacy",
        addr(&lab, "server", ECHO + 1),
        b"plaintext, PERMISSIVE port",
    );
}
