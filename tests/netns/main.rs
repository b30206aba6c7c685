//! Netns end-to-end tests: two simulated nodes, pods in network namespaces, a real `culvert node`
//! process per node, real nftables/iptables redirection, and the wire between nodes captured.
//!
//! Needs root; run with `cargo test -p culvert-tests --test netns -- --include-ignored`. Without root
//! every test fails with a message saying so.

#![allow(clippy::unwrap_used, clippy::disallowed_types, clippy::print_stderr)]

mod hostile;
mod lifecycle;
mod policy;
mod prometheus;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use culvert_cni_proto::Response;
use culvert_tests::scrape::sample;
use culvert_tests::*;

#[test]
#[ignore = "needs root: netns"]
fn pods_talk_across_nodes_and_on_one_node() {
    let lab = lab(
        "cvecho",
        spec(vec![
            PodSpec::new("client", 0, true),
            PodSpec::new("near", 0, true),
            PodSpec::new("far", 1, true),
        ]),
    );
    lab.pod("far").serve_echo(ECHO).unwrap();
    lab.pod("near").serve_echo(ECHO).unwrap();
    echo_ok(
        &lab,
        "client",
        addr(&lab, "far", ECHO),
        b"hello across nodes",
    );
    echo_ok(
        &lab,
        "client",
        addr(&lab, "near", ECHO),
        b"hello on one node",
    );
    // Both went through the tunnel: the destination's node logged an HBONE stream each.
    let client_id = "spiffe://cluster.local/ns/demo/sa/client";
    for (node, dst) in [(1, "far"), (0, "near")] {
        let line = access_line(&lab, node, |v| {
            v["direction"] == "inbound"
                && v["transport"] == "hbone"
                && v["pod"] == format!("demo/{dst}")
        });
        assert_eq!(line["src.identity"], client_id);
    }
}

#[test]
#[ignore = "needs root: netns"]
fn transfers_256_mib_each_way_with_matching_hashes() {
    let lab = lab(
        "cvbulk",
        spec(vec![
            PodSpec::new("client", 0, true),
            PodSpec::new("server", 1, true),
        ]),
    );
    let server = lab.pod("server");
    serve(server.listen(9000).unwrap(), hash_app);
    let to = addr(&lab, "server", 9000);
    let len = 256u64 << 20;

    let started = Instant::now();
    let (ours, theirs) = upload(lab.pod("client").connect(to).unwrap(), len);
    let up = started.elapsed();
    assert_eq!(ours, theirs, "upload: server hashed different bytes");

    let started = Instant::now();
    let (got, want, received) = download(lab.pod("client").connect(to).unwrap(), len);
    let down = started.elapsed();
    assert_eq!(received, len);
    assert_eq!(got, want, "download: client received different bytes");

    let mib = (len >> 20) as f64;
    eprintln!(
        "256 MiB over HBONE: upload {up:.2?} ({:.0} MiB/s), download {down:.2?} ({:.0} MiB/s)",
        mib / up.as_secs_f64(),
        mib / down.as_secs_f64()
    );
    // The transfers really used the tunnel.
    let line = access_line(&lab, 1, |v| {
        v["transport"] == "hbone" && v["bytes_recv"].as_u64() >= Some(len)
    });
    assert_eq!(
        line["src.identity"],
        "spiffe://cluster.local/ns/demo/sa/client"
    );
}

#[test]
#[ignore = "needs root: netns"]
fn wire_between_nodes_carries_only_tls13_to_the_hbone_port() {
    let lab = lab(
        "cvwire",
        spec(vec![
            PodSpec::new("client", 0, true),
            PodSpec::new("server", 1, true),
        ]),
    );
    lab.pod("server").serve_echo(ECHO).unwrap();
    let capture = lab.capture_wire().unwrap();
    let marker = b"PLAINTEXT-MARKER-7f3a9c";
    let mut payload = Vec::new();
    for _ in 0..200 {
        payload.extend_from_slice(marker);
    }
    for _ in 0..5 {
        echo_ok(&lab, "client", addr(&lab, "server", ECHO), &payload);
    }
    let segments = capture.finish().unwrap();
    let report = wire::Report::of(&segments, 15008);
    assert!(
        report.hbone_segments > 0,
        "nothing crossed on 15008: {report:?}"
    );
    assert!(report.tls13, "no TLS 1.3 ServerHello seen: {report:?}");
    assert_eq!(
        report.other_segments, 0,
        "traffic bypassed the tunnel: {report:?}"
    );
    // TLS only adds bytes: fewer than the app moved means the capture missed packets.
    assert!(
        report.hbone_bytes >= 2 * 5 * payload.len(),
        "capture incomplete: {report:?}"
    );
    assert!(
        !wire::contains(&segments, marker),
        "plaintext seen on the wire"
    );
}

#[test]
#[ignore = "needs root: netns"]
fn client_refuses_a_server_with_another_identity() {
    // Node a believes "server" runs as service account "expected"; node b gives it "actual".
    let server = PodSpec {
        service_account: "actual".into(),
        remote_service_account: Some("expected".into()),
        ..PodSpec::new("server", 1, true)
    };
    let lab = lab(
        "cvident",
        spec(vec![PodSpec::new("client", 0, true), server]),
    );
    let (accepted_tx, accepted_rx) = std::sync::mpsc::channel();
    let listener = lab.pod("server").listen(ECHO).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let _ = accepted_tx.send(stream.is_ok());
        }
    });

    let result = exchange(
        lab.pod("client")
            .connect(addr(&lab, "server", ECHO))
            .unwrap(),
        b"secret",
    );
    assert!(
        result.map(|back| back.is_empty()).unwrap_or(true),
        "data flowed to the wrong identity"
    );
    let line = access_line(&lab, 0, |v| {
        v["direction"] == "outbound" && v.get("error").is_some()
    });
    assert_eq!(line["reason"], "peer_identity", "{line}");
    let error = line["error"].as_str().unwrap();
    assert!(
        error.contains("presented spiffe://cluster.local/ns/demo/sa/actual, expected spiffe://cluster.local/ns/demo/sa/expected"),
        "{error}"
    );
    assert!(
        accepted_rx
            .recv_timeout(Duration::from_millis(500))
            .is_err(),
        "the server app was reached"
    );
}

#[test]
#[ignore = "needs root: netns"]
fn plaintext_is_refused_by_strict_and_allowed_by_permissive() {
    let lab = lab(
        "cvpeer",
        spec(vec![
            PodSpec::new("legacy", 0, false),
            PodSpec {
                peer_authentication: Some("STRICT"),
                ..PodSpec::new("strict", 1, true)
            },
            PodSpec::new("open", 1, true),
        ]),
    );
    lab.pod("strict").serve_echo(ECHO).unwrap();
    lab.pod("open").serve_echo(ECHO).unwrap();

    echo_ok(
        &lab,
        "legacy",
        addr(&lab, "open", ECHO),
        b"plaintext welcome",
    );
    let line = access_line(&lab, 1, |v| {
        v["transport"] == "plaintext" && v["pod"] == "demo/open"
    });
    let src = line["src.addr"].as_str().unwrap();
    assert!(
        src.starts_with(&format!("{}:", lab.pod("legacy").ip)),
        "logged source {src}"
    );

    let refused = match lab.pod("legacy").connect(addr(&lab, "strict", ECHO)) {
        Err(_) => true,
        Ok(stream) => exchange(stream, b"let me in")
            .map(|b| b.is_empty())
            .unwrap_or(true),
    };
    assert!(refused, "plaintext reached a STRICT pod");
    let line = access_line(&lab, 1, |v| {
        v["pod"] == "demo/strict" && v.get("error").is_some()
    });
    assert_eq!(line["error"], "denied by policy: plaintext_to_strict");

    // The destination's metrics tell plaintext from mutual TLS, and name the refusal.
    let scrape = lab.metrics(1).unwrap();
    let plaintext = [
        "reporter=\"destination\"",
        "source_workload=\"legacy\"",
        "source_principal=\"unknown\"",
        "destination_workload=\"open\"",
        "connection_security_policy=\"unknown\"",
        "response_flags=\"-\"",
    ];
    let welcome = b"plaintext welcome".len() as f64;
    for metric in [
        "istio_tcp_received_bytes_total",
        "istio_tcp_sent_bytes_total",
    ] {
        assert_eq!(sample(&scrape, metric, &plaintext), welcome, "{metric}");
    }
    let denied = ["destination_workload=\"strict\"", "response_flags=\"DENY\""];
    assert_eq!(
        sample(&scrape, "istio_tcp_connections_failed_total", &denied),
        1.0
    );
    let reason = ["reason=\"plaintext_to_strict\""];
    assert_eq!(
        sample(&scrape, "culvert_policy_denials_total", &reason),
        1.0
    );
    assert!(
        !scrape.contains("connection_security_policy=\"mutual_tls\""),
        "no HBONE was carried here:\n{scrape}"
    );

    // `culvert check` on the destination's node names the plaintext source and fails.
    let checks = lab.admin(1, "/check").unwrap();
    let traffic = checks
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == "traffic")
        .unwrap();
    assert_eq!(traffic["ok"], false, "{traffic}");
    assert_eq!(
        traffic["detail"],
        "1 of 1 inbound connections in the last 10 minutes were plaintext (0.0 % over mTLS), \
         from demo/legacy to demo/open (1); 1 plaintext connections refused by policy",
    );
    assert!(traffic["fix"].as_str().unwrap().contains("STRICT"));
    let inbound = &traffic["inbound"];
    assert_eq!(
        (&inbound["mtls"], &inbound["plaintext"], &inbound["refused"]),
        (&0.into(), &1.into(), &1.into())
    );
    assert_eq!(
        inbound["plaintext_sources"],
        serde_json::json!([{"from": "demo/legacy", "to": "demo/open", "connections": 1}])
    );
}

#[test]
#[ignore = "needs root: netns"]
fn app_sees_the_client_pod_address() {
    let lab = lab(
        "cvsrc",
        spec(vec![
            PodSpec::new("client", 0, true),
            PodSpec::new("server", 1, true),
        ]),
    );
    let listener = lab.pod("server").listen(ECHO).unwrap();
    let client = lab
        .pod("client")
        .connect(addr(&lab, "server", ECHO))
        .unwrap();
    let (_conn, peer) = listener.accept().unwrap();
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::from(lab.pod("client").ip),
        "source address not preserved"
    );
    drop(client);
}

#[test]
#[ignore = "needs root: netns"]
fn traffic_to_a_non_mesh_destination_passes_through() {
    let lab = lab(
        "cvpass",
        spec(vec![
            PodSpec::new("client", 0, true),
            PodSpec::new("outside", 1, false),
        ]),
    );
    lab.pod("outside").serve_echo(ECHO).unwrap();
    let capture = lab.capture_wire().unwrap();
    echo_ok(
        &lab,
        "client",
        addr(&lab, "outside", ECHO),
        b"PASSTHROUGH-MARKER-1c2d",
    );
    let segments = capture.finish().unwrap();
    assert!(
        wire::contains(&segments, b"PASSTHROUGH-MARKER-1c2d"),
        "passthrough should be plain TCP"
    );
    assert_eq!(wire::Report::of(&segments, 15008).hbone_segments, 0);
    let line = access_line(&lab, 0, |v| v["transport"] == "passthrough");
    assert_eq!(line["dst.addr"], addr(&lab, "outside", ECHO).to_string());
    assert!(line.get("error").is_none(), "{line}");
}

#[test]
#[ignore = "needs root: netns"]
fn service_vip_resolves_to_a_ready_endpoint_over_hbone() {
    let vip = Ipv4Addr::new(10, 96, 0, 10);
    let mut spec = spec(vec![
        PodSpec::new("client", 0, true),
        PodSpec::new("server", 1, true),
    ]);
    spec.services = vec![("echo".into(), vip, 80, ECHO, vec!["server".into()])];
    let lab = lab("cvvip", spec);
    lab.pod("server").serve_echo(ECHO).unwrap();
    echo_ok(&lab, "client", SocketAddr::from((vip, 80)), b"via the VIP");
    let line = access_line(&lab, 1, |v| v["transport"] == "hbone");
    assert_eq!(line["dst.addr"], addr(&lab, "server", ECHO).to_string());
}

#[test]
#[ignore = "needs root: netns"]
fn removing_a_pod_removes_its_rules_and_listeners() {
    let lab = lab(
        "cvdel",
        spec(vec![
            PodSpec::new("client", 0, true),
            PodSpec::new("server", 1, true),
        ]),
    );
    lab.pod("server").serve_echo(ECHO).unwrap();
    assert!(in_pod(&lab, "client", &["nft", "list", "table", "inet", "culvert"]).is_some());
    let listening = |pod| in_pod(&lab, pod, &["ss", "-Htln"]).unwrap();
    assert!(listening("client").contains(":15001"));

    assert_eq!(lab.unregister("client").unwrap(), Response::Removed);
    assert!(
        in_pod(&lab, "client", &["nft", "list", "table", "inet", "culvert"]).is_none(),
        "nft table left"
    );
    let rules = in_pod(&lab, "client", &["ip", "rule"]).unwrap();
    assert!(!rules.contains("0x111"), "ip rule left: {rules}");
    let ss = listening("client");
    for port in [":15001", ":15006", ":15008"] {
        assert!(!ss.contains(port), "{port} still listening: {ss}");
    }
    // The pod's traffic now leaves as plain TCP, straight to the server.
    echo_ok(&lab, "client", addr(&lab, "server", ECHO), b"direct now");
    let line = access_line(&lab, 1, |v| v["pod"] == "demo/server");
    assert_eq!(
        line["transport"], "plaintext",
        "should arrive as plaintext once unwired"
    );
    // DEL is idempotent.
    assert_eq!(lab.unregister("client").unwrap(), Response::Removed);
}

#[test]
#[ignore = "needs root: netns"]
fn re_adding_a_pod_leaves_one_copy_of_each_rule() {
    let lab = lab(
        "cvidem",
        spec(vec![
            PodSpec::new("client", 0, true),
            PodSpec::new("server", 1, true),
        ]),
    );
    let snapshot = |lab: &Lab| {
        let nft = in_pod(lab, "client", &["nft", "list", "ruleset"]).unwrap();
        let rules = in_pod(lab, "client", &["ip", "rule"]).unwrap();
        (nft, rules)
    };
    let before = snapshot(&lab);
    assert_eq!(before.0.matches("table inet culvert").count(), 1);
    assert_eq!(before.1.matches("fwmark 0x111/0xfff lookup 100").count(), 1);
    for _ in 0..3 {
        assert_eq!(
            lab.register("client").unwrap(),
            Response::Added { enrolled: true }
        );
    }
    assert_eq!(snapshot(&lab), before);
    lab.pod("server").serve_echo(ECHO).unwrap();
    echo_ok(&lab, "client", addr(&lab, "server", ECHO), b"still fine");
}

#[test]
#[ignore = "needs root: netns"]
fn iptables_backend_carries_traffic_too() {
    let mut spec = spec(vec![
        PodSpec::new("client", 0, true),
        PodSpec::new("legacy", 0, false),
        PodSpec {
            peer_authentication: Some("STRICT"),
            ..PodSpec::new("server", 1, true)
        },
    ]);
    spec.node_flags = vec!["--redirect".into(), "iptables".into()];
    let lab = lab("cvipt", spec);
    lab.pod("server").serve_echo(ECHO).unwrap();
    let chains = in_pod(&lab, "client", &["iptables-save", "-t", "nat"]).unwrap();
    assert_eq!(
        chains.matches("-A OUTPUT -j CULVERT_OUTPUT").count(),
        1,
        "{chains}"
    );
    assert!(in_pod(&lab, "client", &["nft", "list", "table", "inet", "culvert"]).is_none());
    let capture = lab.capture_wire().unwrap();
    echo_ok(
        &lab,
        "client",
        addr(&lab, "server", ECHO),
        b"IPTABLES-MARKER-55aa",
    );
    let refused = match lab.pod("legacy").connect(addr(&lab, "server", ECHO)) {
        Err(_) => true,
        Ok(stream) => exchange(stream, b"x").map(|b| b.is_empty()).unwrap_or(true),
    };
    assert!(refused, "plaintext reached a STRICT pod");
    let segments = capture.finish().unwrap();
    assert!(!wire::contains(&segments, b"IPTABLES-MARKER-55aa"));
    assert!(wire::Report::of(&segments, 15008).tls13);
    assert_eq!(
        lab.register("client").unwrap(),
        Response::Added { enrolled: true }
    );
    let again = in_pod(&lab, "client", &["iptables-save", "-t", "nat"]).unwrap();
    assert_eq!(
        again.matches("-A OUTPUT -j CULVERT_OUTPUT").count(),
        1,
        "jump duplicated: {again}"
    );
    assert_eq!(lab.unregister("client").unwrap(), Response::Removed);
    let after = in_pod(&lab, "client", &["iptables-save", "-t", "nat"]).unwrap();
    assert!(!after.contains("CULVERT"), "iptables rules left: {after}");
}

#[test]
#[ignore = "needs root: netns"]
fn sigterm_drains_open_connections_until_the_deadline() {
    let mut spec = spec(vec![
        PodSpec::new("client", 0, true),
        PodSpec::new("server", 1, true),
    ]);
    spec.node_flags = vec!["--drain-timeout".into(), "3s".into()];
    let lab = lab("cvdrain", spec);
    lab.pod("server").serve_echo(ECHO).unwrap();
    let mut open = lab
        .pod("client")
        .connect(addr(&lab, "server", ECHO))
        .unwrap();
    open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let ping = |open: &mut std::net::TcpStream| -> std::io::Result<()> {
        use std::io::{Read, Write};
        open.write_all(b"ping")?;
        let mut back = [0u8; 4];
        open.read_exact(&mut back)?;
        assert_eq!(&back, b"ping");
        Ok(())
    };
    ping(&mut open).unwrap();

    let started = Instant::now();
    lab.signal_node(1, nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    eventually(
        "the server's node to start draining",
        Duration::from_secs(5),
        || lab.log(1).contains("\"draining\"").then_some(()),
    );
    ping(&mut open).expect("an open connection keeps working while the node drains");
    // New connections to the draining node's pods are refused, never sent in plaintext.
    let fresh = lab.pod("client").connect(addr(&lab, "server", ECHO));
    let refused = fresh
        .map(|s| exchange(s, b"new").map(|b| b.is_empty()).unwrap_or(true))
        .unwrap_or(true);
    assert!(
        refused,
        "a new connection reached a pod whose node is draining"
    );

    let status = lab.wait_node(1).unwrap().unwrap();
    let took = started.elapsed();
    assert!(status.success(), "daemon exited with {status}");
    assert!(
        took >= Duration::from_secs(3),
        "exited after {took:?}, before the drain deadline"
    );
    assert!(
        took < Duration::from_secs(10),
        "exited after {took:?}, long past the 3s deadline"
    );
    assert!(
        lab.log(1).contains("drain deadline passed"),
        "the leftover connection was not reported"
    );
}

#[test]
#[ignore = "needs root: netns"]
fn a_reader_that_stops_reading_holds_back_the_writer() {
    let lab = lab(
        "cvslow",
        spec(vec![
            PodSpec::new("client", 0, true),
            PodSpec::new("server", 1, true),
        ]),
    );
    // The server app accepts and never reads.
    let listener = lab.pod("server").listen(ECHO).unwrap();
    std::thread::spawn(move || {
        let held: Vec<_> = listener.incoming().take(1).collect();
        std::thread::sleep(Duration::from_secs(60));
        drop(held);
    });
    let mut stream = lab
        .pod("client")
        .connect(addr(&lab, "server", ECHO))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let chunk = vec![0u8; 64 << 10];
    let mut written = 0usize;
    let limit = 512usize << 20;
    while written < limit {
        use std::io::Write;
        match stream.write(&chunk) {
            Ok(n) => written += n,
            Err(_) => break, // timed out: the tunnel stopped taking data
        }
    }
    eprintln!("writer stalled after {} MiB", written >> 20);
    // Socket buffers on both ends plus the 4 MiB stream window: far below what was offered.
    assert!(
        written < 64 << 20,
        "{written} bytes accepted for a reader that reads nothing"
    );
}

#[test]
#[ignore = "needs root: netns"]
fn sighup_applies_a_new_mode_and_keeps_the_old_config_when_the_new_one_is_broken() {
    let lab = lab(
        "cvhup",
        spec(vec![
            PodSpec::new("legacy", 0, false),
            PodSpec::new("server", 1, true),
        ]),
    );
    lab.pod("server").serve_echo(ECHO).unwrap();
    let plaintext_allowed = || {
        lab.pod("legacy")
            .connect(addr(&lab, "server", ECHO))
            .and_then(|s| exchange(s, b"hello"))
            .is_ok_and(|back| back == b"hello")
    };
    assert!(plaintext_allowed(), "PERMISSIVE by default");

    let config = &lab.nodes[1].config;
    let original = std::fs::read_to_string(config).unwrap();
    std::fs::write(
        config,
        original.replace(
            "peerAuthentication: PERMISSIVE",
            "peerAuthentication: STRICT",
        ),
    )
    .unwrap();
    lab.signal_node(1, nix::sys::signal::Signal::SIGHUP)
        .unwrap();
    eventually("the reload", Duration::from_secs(5), || {
        lab.log(1).contains("configuration reloaded").then_some(())
    });
    assert!(
        !plaintext_allowed(),
        "the mesh-wide STRICT mode did not apply"
    );

    std::fs::write(
        config,
        original.replace(
            &format!("ips: [{}]", lab.pod("server").ip),
            "ips: [10.0.0.x]",
        ),
    )
    .unwrap();
    lab.signal_node(1, nix::sys::signal::Signal::SIGHUP)
        .unwrap();
    let error = eventually("the failed reload", Duration::from_secs(5), || {
        lab.log(1)
            .lines()
            .find(|l| l.contains("reload failed"))
            .map(str::to_owned)
    });
    assert!(
        error.contains("workloads[1].ips[0]"),
        "the error does not name the field: {error}"
    );
    assert!(
        !plaintext_allowed(),
        "a broken file replaced the working configuration"
    );
}

#[test]
#[ignore = "needs root: netns"]
fn a_strict_pod_passes_its_nodes_probes_and_still_refuses_plaintext_from_anywhere_else() {
    use std::io::{Read, Write};
    let server = PodSpec {
        peer_authentication: Some("STRICT"),
        ..PodSpec::new("server", 1, true)
    };
    let lab = lab(
        "cvprobe",
        spec(vec![
            PodSpec::new("legacy", 0, false),
            server,
            PodSpec::new("neighbour", 1, false),
        ]),
    );
    lab.pod("server").serve_echo(ECHO).unwrap();
    let to_server = addr(&lab, "server", ECHO);

    // A probe: the node itself connects, as the kubelet does.
    let node = culvert::redirect::Netns::open(
        &culvert_lab::netns_path(&lab.nodes[1].netns),
        culvert::redirect::netns::home().unwrap(),
    )
    .unwrap();
    let probe = || -> std::io::Result<Vec<u8>> {
        let mut stream =
            node.run(|| std::net::TcpStream::connect_timeout(&to_server, Duration::from_secs(5)))??;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(b"probe")?;
        let mut back = [0u8; 5];
        stream.read_exact(&mut back)?;
        Ok(back.to_vec())
    };
    assert_eq!(probe().unwrap(), b"probe", "the node's probe was refused");
    // Through the proxy, and logged as what it is.
    let line = access_line(&lab, 1, |v| {
        v["pod"] == "demo/server" && v["transport"] == "probe"
    });
    assert_eq!(
        line["src.addr"].as_str().unwrap().split(':').next(),
        Some("169.254.7.127")
    );
    let host_table = || {
        let out = Command::new("ip")
            .args(["netns", "exec", &lab.nodes[1].netns])
            .args(["nft", "list", "table", "ip", "culvert_host"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let table = host_table();
    assert!(table.contains(&lab.pod("server").ip.to_string()), "{table}");

    // Plaintext from another node's pod and from a pod on the same node is still refused.
    for from in ["legacy", "neighbour"] {
        let back = round_trip(&lab, from, to_server, b"plain");
        assert!(
            back.map(|b| b.is_empty()).unwrap_or(true),
            "{from} reached a STRICT pod in plaintext"
        );
    }
    // Once the pod is released, the node's probes no longer get the probe address.
    assert_eq!(lab.unregister("server").unwrap(), Response::Removed);
    let table = host_table();
    assert!(
        !table.contains(&lab.pod("server").ip.to_string()),
        "{table}"
    );
}
