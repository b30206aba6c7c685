//! Istio's AuthorizationPolicy and PeerAuthentication from the node file's `policies:`,
//! enforced on the wire between two nodes and applied by a reload.

use std::io::{BufRead, BufReader, Read, Write};
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
        v["src.identity"] == "spiffe://cluster.local/ns/demo/sa/intruder"
            && v.get("policy").is_some()
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

/// North-south: the ingress takes TLS from outside the mesh on a port-level PERMISSIVE port
/// (the mesh is STRICT), and only its principal may reach the backend.
const INGRESS_POLICIES: &str = "
policies:
  - apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: { name: ingress-tls, namespace: demo }
    spec:
      selector: { matchLabels: { app: ingress } }
      portLevelMtls: { '8443': { mode: PERMISSIVE } }
  - apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: { name: backend-from-ingress, namespace: demo }
    spec:
      selector: { matchLabels: { app: backend } }
      action: ALLOW
      rules:
        - from: [{ source: { principals: [cluster.local/ns/demo/sa/ingress] } }]
          to: [{ operation: { ports: ['8080'] } }]
";

const HTTPS: u16 = 8443;

#[test]
#[ignore = "needs root: netns"]
fn an_ingress_takes_tls_from_outside_the_mesh_and_is_the_only_principal_the_strict_backend_allows()
{
    let lab = lab(
        "cvingress",
        Spec {
            mesh_mode: "STRICT",
            node_file_extra: INGRESS_POLICIES.to_owned(),
            ..spec(vec![
                PodSpec {
                    labels: vec![("app", "ingress")],
                    ..PodSpec::new("ingress", 0, true)
                },
                PodSpec::new("client", 0, true),
                PodSpec {
                    labels: vec![("app", "backend")],
                    ..PodSpec::new("backend", 1, true)
                },
                PodSpec::new("outside", 1, false),
            ])
        },
    );
    let backend = lab.pod("backend");
    serve(backend.listen(ECHO).unwrap(), http_backend);
    let ingress = lab.pod("ingress");
    ingress.serve_echo(ECHO).unwrap();
    let roots = ingress_tls(&lab, addr(&lab, "backend", ECHO));

    // Outside → ingress is TLS to nginx; nginx → backend is plaintext HTTP inside the pod,
    // carried between the nodes over HBONE. Neither the request nor the answer shows on the wire.
    let capture = lab.capture_wire().unwrap();
    let secret = "/orders/SECRET-ORDER-7f3e";
    let answer = eventually("nginx answers", Duration::from_secs(10), || {
        https_get(&lab, "outside", &roots, secret).ok()
    });
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with(&format!("backend saw GET {secret}\n")),
        "{answer}"
    );
    let segments = capture.finish().unwrap();
    assert!(!wire::contains(&segments, secret.as_bytes()));
    assert!(!wire::contains(&segments, b"backend saw"));
    let report = wire::Report::of(&segments, 15008);
    assert!(report.hbone_segments > 0 && report.tls13, "{report:?}");

    // The backend saw the ingress's verified identity; the ingress took plaintext TCP (TLS
    // that is not the mesh's) on its PERMISSIVE port.
    let line = access_line(&lab, 1, |v| {
        v["direction"] == "inbound" && v["pod"] == "demo/backend" && v.get("error").is_none()
    });
    assert_eq!(line["transport"], "hbone");
    assert_eq!(
        line["src.identity"],
        "spiffe://cluster.local/ns/demo/sa/ingress"
    );
    let line = access_line(&lab, 0, |v| {
        v["direction"] == "inbound" && v["pod"] == "demo/ingress"
    });
    assert_eq!(line["transport"], "plaintext");
    assert_eq!(line["dst.addr"], addr(&lab, "ingress", HTTPS).to_string());

    // Plaintext from outside reaches nothing else: not the ingress's other ports, not the
    // backend. Inside the mesh, a principal the ALLOW does not name is refused too.
    for (from, to) in [
        ("outside", addr(&lab, "ingress", ECHO)),
        ("outside", addr(&lab, "backend", ECHO)),
        ("client", addr(&lab, "backend", ECHO)),
    ] {
        assert!(refused(&lab, from, to), "{from} reached {to}");
    }
    let line = access_line(&lab, 1, |v| {
        v["src.identity"] == "spiffe://cluster.local/ns/demo/sa/client"
    });
    assert_eq!(line["reason"], "not_allowed");
    let line = access_line(&lab, 1, |v| {
        v["transport"] == "plaintext" && v["pod"] == "demo/backend"
    });
    assert_eq!(line["reason"], "plaintext_to_strict");
    echo_ok(
        &lab,
        "client",
        addr(&lab, "ingress", ECHO),
        b"mesh to ingress",
    );
}

/// A tiny HTTP/1.1 server: answers every request with the request line it saw.
fn http_backend(stream: TcpStream) {
    let mut reader = BufReader::new(stream);
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
        line.clear();
    }
    let mut words = request.split_whitespace();
    let body = format!(
        "backend saw {} {}\n",
        words.next().unwrap_or(""),
        words.next().unwrap_or("")
    );
    let _ = write!(
        reader.get_mut(),
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// Starts nginx in the ingress pod: TLS on [`HTTPS`] with a certificate from a throwaway CA,
/// proxying to `backend`. Returns the roots a client outside trusts; nginx stops with the lab.
fn ingress_tls(lab: &Lab, backend: std::net::SocketAddr) -> rustls::RootCertStore {
    let dir = lab.dir.join("nginx");
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["shop.example.test".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).unwrap();
    let d = dir.display();
    let conf = format!(
        "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{}}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  \
         proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  \
         scgi_temp_path {d}/scgi;\n  server {{\n    listen {HTTPS} ssl;\n    \
         ssl_certificate {d}/tls.crt;\n    ssl_certificate_key {d}/tls.key;\n    \
         location / {{ proxy_pass http://{backend}; }}\n  }}\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    let child = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.pod("ingress").netns, "nginx", "-e"])
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .spawn()
        .expect("starting nginx (is it installed? scripts/deps installs it)");
    lab.own(child);
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_cert.der().clone()).unwrap();
    roots
}

/// One HTTPS GET to the ingress from pod `from`, as a client outside the mesh would make it.
fn https_get(
    lab: &Lab,
    from: &str,
    roots: &rustls::RootCertStore,
    path: &str,
) -> std::io::Result<String> {
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots.clone())
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("shop.example.test").unwrap();
    let tls = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let tcp = lab.pod(from).connect(addr(lab, "ingress", HTTPS))?;
    tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut stream = rustls::StreamOwned::new(tls, tcp);
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: shop.example.test\r\nconnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}
