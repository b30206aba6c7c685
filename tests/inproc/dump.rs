//! `/config_dump` against the schema `istioctl ztunnel-config` parses, and `/connections`.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use culvert::test_util::echo_server;
use culvert_tests::inproc::{APP, Topology, get};
use culvert_tests::ztunnel_dump::{Cert, ZtunnelDump};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Checks what istioctl does with a certificate entry: the PEM is a certificate whose serial
/// and validity the other fields state, in the encodings istioctl parses.
fn check_cert(cert: &Cert) -> Vec<u8> {
    let der = pem::parse(&cert.pem).unwrap().into_contents();
    let (_, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert_eq!(cert.serial_number, x509.tbs_certificate.serial.to_string());
    assert!(cert.serial_number.chars().all(|c| c.is_ascii_digit()));
    let rfc3339 = |s: &str| humantime::parse_rfc3339(s).unwrap();
    let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    let validity = x509.validity();
    assert_eq!(
        secs(rfc3339(&cert.valid_from)),
        validity.not_before.timestamp() as u64
    );
    assert_eq!(
        secs(rfc3339(&cert.expiration_time)),
        validity.not_after.timestamp() as u64
    );
    let now = SystemTime::now();
    assert!(rfc3339(&cert.valid_from) <= now && now < rfc3339(&cert.expiration_time));
    der
}

/// Runs the `culvert` binary with `args`; its stdout, once it succeeded.
async fn culvert(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(culvert_tests::culvert_bin())
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "culvert failed: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

async fn dump(addr: SocketAddr) -> ZtunnelDump {
    let (status, body) = get(addr, "/config_dump").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("istioctl's schema refuses it: {e}\n{body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_dump_is_what_istioctl_parses_and_lists_the_nodes_state_and_connections() {
    let mut t = Topology::new("dump", &[("client", 0), ("server", 1)]);
    let ns = t.namespace.clone();
    t.extra = format!(
        "nodes: [{{ name: node-1, region: eu-west, zone: eu-west-1b }}]
policies:
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {{ name: from-client, namespace: {ns} }}
    spec:
      selector: {{ matchLabels: {{ version: v1 }} }}
      rules:
        - from: [{{ source: {{ principals: [cluster.local/ns/{ns}/sa/client], namespaces: ['{ns}*'] }} }}]
          to: [{{ operation: {{ ports: ['{APP}'] }} }}]
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {{ name: no-test-net, namespace: {ns} }}
    spec:
      action: DENY
      rules: [{{ from: [{{ source: {{ ipBlocks: [192.0.2.0/24] }} }}] }}]
"
    );
    let (a, b) = t.start_pair().await;
    let server = SocketAddr::new(t.ip("server"), APP);
    echo_server(server).await;
    let mut held = a.connect_from(&ns, "client", server).await;
    held.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    held.read_exact(&mut buf).await.unwrap();
    let app = held.local_addr().unwrap();

    let d = dump(a.node.admin_addr).await;

    // Workloads: what `istioctl zc workloads` prints, per workload.
    assert_eq!(d.workloads.len(), 2);
    let client = d.workloads.iter().find(|w| w.name == "client").unwrap();
    assert_eq!(client.uid, format!("Kubernetes//Pod/{ns}/client"));
    assert_eq!(client.workload_ips, [t.ip("client").to_string()]);
    assert_eq!(client.protocol, "HBONE");
    assert_eq!(client.node, "node-0");
    assert_eq!(client.namespace, ns);
    assert_eq!(client.service_account, "client");
    assert_eq!(
        client.workload_type, "pod",
        "a node file's workload has no owner"
    );
    assert_eq!(client.canonical_name, "client");
    assert_eq!(client.canonical_revision, "v1");
    assert_eq!(client.cluster_id, "Kubernetes");
    assert_eq!(client.trust_domain, "cluster.local");
    assert_eq!(client.status, "Healthy");
    // The server's node has a locality, the client's none.
    assert!(client.locality.is_none());
    let server_workload = d.workloads.iter().find(|w| w.name == "server").unwrap();
    let locality = server_workload.locality.as_ref().unwrap();
    assert_eq!(
        (&*locality.region, &*locality.zone, &*locality.subzone),
        ("eu-west", "eu-west-1b", "")
    );

    // Services: one per Service, its endpoints by workload uid.
    assert_eq!(d.services.len(), 1);
    let echo = &d.services[0];
    assert_eq!(echo.hostname, format!("echo.{ns}.svc.cluster.local"));
    assert_eq!(echo.vips, [format!("/{}", t.vip())]);
    assert_eq!(echo.ports["80"], i64::from(APP));
    assert_eq!(echo.ip_families, "IPv4");
    let endpoint = &echo.endpoints[&format!("Kubernetes//Pod/{ns}/server")];
    assert_eq!(endpoint.port[&80], APP);
    assert_eq!(
        endpoint.service,
        format!("{ns}/echo.{ns}.svc.cluster.local")
    );

    // Policies: the compiled rules, in ztunnel's nesting (rule, clause, match).
    assert_eq!(d.policies.len(), 2, "{:?}", d.policies);
    let allow = d.policies.iter().find(|p| p.name == "from-client").unwrap();
    assert_eq!(
        (&*allow.namespace, &*allow.scope, &*allow.action),
        (&*ns, "WorkloadSelector", "Allow")
    );
    // The one rule's matches, whichever clause holds them.
    let matches: Vec<_> = allow.rules[0].iter().flatten().collect();
    let principals: Vec<_> = matches.iter().flat_map(|m| &m.principals).collect();
    assert_eq!(principals.len(), 1);
    assert_eq!(
        principals[0].exact,
        format!("cluster.local/ns/{ns}/sa/client")
    );
    let namespaces: Vec<_> = matches.iter().flat_map(|m| &m.namespaces).collect();
    assert_eq!(namespaces.len(), 1);
    assert_eq!(namespaces[0].prefix, ns);
    let ports: Vec<_> = matches.iter().flat_map(|m| &m.destination_ports).collect();
    assert_eq!(ports, [&APP]);
    let deny = d.policies.iter().find(|p| p.name == "no-test-net").unwrap();
    assert_eq!((&*deny.scope, &*deny.action), ("Namespace", "Deny"));
    assert_eq!(deny.rules[0][0][0].source_ips, ["192.0.2.0/24"]);

    // Certificates: the client's, with its chain and the trust bundle.
    assert_eq!(d.certificates.len(), 1);
    let certs = &d.certificates[0];
    assert_eq!(
        certs.identity,
        format!("spiffe://cluster.local/ns/{ns}/sa/client")
    );
    assert_eq!(certs.state, "Available");
    let leaf = check_cert(&certs.cert_chain[0]);
    assert_eq!(
        culvert::tls::identity_of(&leaf.into()).unwrap().to_string(),
        certs.identity
    );
    assert_eq!(certs.root_certs.len(), 1);
    let root = check_cert(&certs.root_certs[0]);
    let ca = pem::parse(std::fs::read(t.ca.cert()).unwrap()).unwrap();
    assert_eq!(root, ca.contents());

    // Workload state: the wired pod and its open connection.
    let state = &d.workload_state[&format!("{ns}/client")];
    assert_eq!(state.state, "Wired");
    assert_eq!(state.info.name, "client");
    assert_eq!(state.info.service_account, "client");
    assert!(state.connections.inbound.is_empty());
    let out = &state.connections.outbound[..];
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].src, app.to_string());
    assert_eq!(out[0].original_dst, server.to_string());
    assert_eq!(out[0].actual_dst, format!("{}:15008", t.ip("server")));
    assert_eq!(out[0].protocol, "HBONE");
    let b_dump = dump(b.node.admin_addr).await;
    let inbound = &b_dump.workload_state[&format!("{ns}/server")]
        .connections
        .inbound;
    assert_eq!(inbound.len(), 1, "{inbound:?}");
    assert_eq!(inbound[0].original_dst, server.to_string());
    assert_eq!(inbound[0].protocol, "HBONE");

    // `/connections`: the same connection seen from each end, with the proven peer.
    let listed = |body: String| -> Vec<serde_json::Value> { serde_json::from_str(&body).unwrap() };
    let outbound = listed(get(a.node.admin_addr, "/connections").await.1);
    assert_eq!(outbound.len(), 1, "{outbound:?}");
    let c = &outbound[0];
    assert_eq!(c["workload"], format!("{ns}/client"));
    assert_eq!(c["direction"], "outbound");
    assert_eq!(c["local"], app.to_string());
    assert_eq!(c["remote"], format!("{}:15008", t.ip("server")));
    assert_eq!(c["target"], server.to_string());
    assert_eq!(c["protocol"], "HBONE");
    assert_eq!(c["transport"], "hbone");
    assert_eq!(
        c["identity"],
        format!("spiffe://cluster.local/ns/{ns}/sa/server")
    );
    let inbound = listed(get(b.node.admin_addr, "/connections").await.1);
    assert_eq!(inbound.len(), 1, "{inbound:?}");
    assert_eq!(inbound[0]["direction"], "inbound");
    assert_eq!(inbound[0]["local"], server.to_string());
    assert_eq!(
        inbound[0]["identity"],
        format!("spiffe://cluster.local/ns/{ns}/sa/client")
    );

    // The CLI reads the same, live and from a saved dump.
    let admin = a.node.admin_addr.to_string();
    let workloads = culvert(&["workloads", "--admin", &admin]).await;
    let header = workloads.lines().next().unwrap();
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        [
            "NAMESPACE",
            "POD",
            "NAME",
            "ADDRESS",
            "NODE",
            "WAYPOINT",
            "PROTOCOL"
        ]
    );
    let row = workloads.lines().find(|l| l.contains("client")).unwrap();
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>(),
        [
            &*ns,
            "client",
            &t.ip("client").to_string(),
            "node-0",
            "None",
            "HBONE"
        ]
    );
    let certs = culvert(&["certs", "--admin", &admin]).await;
    let kinds: Vec<(&str, &str, &str)> = certs
        .lines()
        .skip(1)
        .map(|l| {
            let cells: Vec<&str> = l.split_whitespace().collect();
            (cells[1], cells[2], cells[3])
        })
        .collect();
    assert_eq!(
        kinds,
        [("Leaf", "Available", "true"), ("Root", "Available", "true")],
        "{certs}"
    );
    let connections = culvert(&["connections", "--admin", &admin, "-n", &ns]).await;
    let row: Vec<&str> = connections
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        row,
        [
            &*format!("{ns}/client"),
            "outbound",
            &app.to_string(),
            &format!("{}:15008", t.ip("server")),
            &server.to_string(),
            "HBONE",
            &format!("spiffe://cluster.local/ns/{ns}/sa/server"),
        ]
    );
    let saved = t.dir.path().join("dump.json");
    std::fs::write(&saved, get(a.node.admin_addr, "/config_dump").await.1).unwrap();
    let saved = saved.to_str().unwrap();
    let policies = culvert(&["policies", "-f", saved, "-o", "json", "-n", &ns]).await;
    let policies: Vec<serde_json::Value> = serde_json::from_str(&policies).unwrap();
    assert_eq!(policies.len(), 2);
    let elsewhere = culvert(&["workloads", "-f", saved, "--node", "node-9"]).await;
    assert_eq!(elsewhere.lines().count(), 1, "{elsewhere}");

    // Closed connections leave both lists.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    for node in [&a, &b] {
        while !listed(get(node.node.admin_addr, "/connections").await.1).is_empty() {
            assert!(
                Instant::now() < deadline,
                "a closed connection is still listed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The probe and metrics addresses serve neither.
    assert_eq!(get(a.node.readiness_addr, "/config_dump").await.0, 404);
    assert_eq!(get(a.node.metrics_addr, "/connections").await.0, 404);
}
