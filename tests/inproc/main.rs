//! In-process tests: two node daemons started by the composition root inside the test process,
//! on loopback, without root. What needs a kernel (redirection rules, network namespaces,
//! `SO_ORIGINAL_DST`) is the netns layer's; here connections are handed to a pod's outbound
//! path directly, and everything from there on is the daemon's real code.

#![allow(clippy::unwrap_used, clippy::disallowed_types)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use culvert::state::PeerAuthentication;
use culvert::test_util::{echo_server, exchange};
use culvert_cni_proto::Response;
use culvert_tests::inproc::{APP, Topology, access, get, get_from, logs};
use culvert_tests::scrape::{sample, samples};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod check;
mod dump;

/// Waits until `check` holds, for up to five seconds.
async fn eventually<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_node_is_ready_and_its_admin_api_shows_what_it_knows() {
    let t = Topology::new("admin", &[("client", 0), ("server", 1)]);
    let a = t.start(0).await;
    assert_eq!(get(a.node.readiness_addr, "/healthz/ready").await.0, 200);
    // Every tunnel holds sockets: the daemon raised its descriptor limit as far as it may.
    let (soft, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap();
    assert_eq!(
        soft, hard,
        "the open-files soft limit was left below the hard one"
    );
    assert_eq!(get(a.node.readiness_addr, "/healthz/live").await.0, 200);
    // The probe address serves nothing else.
    assert_eq!(get(a.node.readiness_addr, "/workloads").await.0, 404);

    let (status, body) = get(a.node.admin_addr, "/workloads").await;
    assert_eq!(status, 200);
    let workloads: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(workloads.as_array().unwrap().len(), 2, "{body}");

    assert_eq!(
        t.register(&a, "client").await,
        Response::Added { enrolled: true }
    );
    let (_, body) = get(a.node.admin_addr, "/pods").await;
    let pods: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(pods[0]["pod"]["name"], "client", "{body}");
    assert_eq!(pods[0]["backend"], "loopback");
    let rules = a
        .capture
        .rules(&format!("/run/netns/{}-client", t.namespace));
    assert!(rules.present, "registration installed no rules");

    // The other node's pod is refused here: this daemon does not serve node-1.
    match t.register(&a, "server").await {
        Response::Nack { reason } => assert!(reason.contains("is on node \"node-1\""), "{reason}"),
        other => panic!("a pod of another node was answered {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_on_two_nodes_talk_over_hbone_and_the_server_sees_the_client_address() {
    let t = Topology::new("hbone", &[("client", 0), ("server", 1)]);
    let (a, _b) = t.start_pair().await; // _b: node 1 must keep running
    let server = SocketAddr::new(t.ip("server"), APP);
    echo_server(server).await;

    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let app = a.connect_from(&t.namespace, "client", server).await;
    assert_eq!(exchange(app, &payload).await.unwrap(), payload);

    let ns = &t.namespace;
    let line = eventually("the server's access-log line", || {
        access(&format!("{ns}/server")).into_iter().next()
    })
    .await;
    assert_eq!(line["transport"], "hbone");
    assert_eq!(line["direction"], "inbound");
    assert_eq!(
        line["src.identity"],
        format!("spiffe://cluster.local/ns/{ns}/sa/client")
    );
    assert_eq!(line["bytes_recv"], payload.len());
    let src: SocketAddr = line["src.addr"].as_str().unwrap().parse().unwrap();
    assert_eq!(src.ip(), t.ip("client"), "the app saw another source");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_presenting_another_identity_is_refused_before_the_app_is_reached() {
    let mut t = Topology::new("mismatch", &[("client", 0), ("server", 1)]);
    // Node 0 expects the server to be `expected`; node 1 issues it `server`.
    t.believe("server", "expected");
    let (a, _b) = t.start_pair().await; // _b: node 1 must keep running
    let reached = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(t.ip("server"), APP))
        .await
        .unwrap();
    let counter = reached.clone();
    tokio::spawn(async move {
        while listener.accept().await.is_ok() {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });

    let mut app = a
        .connect_from(&t.namespace, "client", SocketAddr::new(t.ip("server"), APP))
        .await;
    let _ = app.write_all(b"secret").await;
    let mut buf = [0u8; 16];
    let read = app.read(&mut buf).await;
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the client got an answer: {read:?}"
    );
    let ns = &t.namespace;
    let line = eventually("the client's failed access-log line", || {
        access(&format!("{ns}/client")).into_iter().next()
    })
    .await;
    assert_eq!(line["reason"], "peer_identity", "{line}");
    let error = line["error"].as_str().unwrap();
    assert!(
        error.contains(&format!(
            "presented spiffe://cluster.local/ns/{ns}/sa/server, expected spiffe://cluster.local/ns/{ns}/sa/expected"
        )),
        "{error}"
    );
    assert_eq!(reached.load(Ordering::SeqCst), 0, "the app was reached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_connections_go_to_a_vip_endpoint_over_hbone_and_elsewhere_in_plain_tcp() {
    let t = Topology::new("route", &[("client", 0), ("server", 1)]);
    let (a, _b) = t.start_pair().await; // _b: node 1 must keep running
    echo_server(SocketAddr::new(t.ip("server"), APP)).await;
    // Outside the mesh: an address no node file names.
    let outside = echo_server(SocketAddr::new(t.host_ip(1, 200), 0)).await;

    // The VIP has no listener: only resolving it to the server's endpoint reaches anything.
    let vip = SocketAddr::new(t.vip(), 80);
    let app = a.connect_from(&t.namespace, "client", vip).await;
    assert_eq!(exchange(app, b"via the vip").await.unwrap(), b"via the vip");
    let app = a.connect_from(&t.namespace, "client", outside).await;
    assert_eq!(exchange(app, b"outside").await.unwrap(), b"outside");

    let ns = &t.namespace;
    let lines = eventually("both outbound access-log lines", || {
        let lines = access(&format!("{ns}/client"));
        (lines.len() == 2).then_some(lines)
    })
    .await;
    let transport = |dst: SocketAddr| {
        lines
            .iter()
            .find(|l| l["dst.addr"] == dst.to_string())
            .map(|l| l["transport"].as_str().unwrap().to_owned())
    };
    assert_eq!(transport(vip).as_deref(), Some("hbone"));
    assert_eq!(transport(outside).as_deref(), Some("passthrough"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_a_good_file_and_keeps_the_running_config_for_a_bad_one() {
    let mut t = Topology::new("reload", &[("client", 0)]);
    let a = t.start(0).await;
    let mode = || a.node.state().snapshot().peer_authentication;
    assert_eq!(mode(), PeerAuthentication::Permissive);

    t.extra = "peerAuthentication: STRICT\n".into();
    std::fs::write(&a.config, t.node_file(0)).unwrap();
    a.node.reload().await.unwrap();
    assert_eq!(mode(), PeerAuthentication::Strict);

    let good = t.node_file(0);
    let broken = good.replace(&t.ip("client").to_string(), "127.0.0.x");
    std::fs::write(&a.config, broken).unwrap();
    let err = format!("{:#}", a.node.reload().await.unwrap_err());
    assert!(err.contains("workloads[0].ips[0]"), "{err}");
    assert_eq!(
        mode(),
        PeerAuthentication::Strict,
        "a broken file was applied"
    );

    std::fs::write(&a.config, good.replace("node: node-0", "node: node-9")).unwrap();
    let err = format!("{:#}", a.node.reload().await.unwrap_err());
    assert_eq!(err, "changing node needs a restart");
    assert_eq!(mode(), PeerAuthentication::Strict);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_open_tunnels_until_the_drain_deadline() {
    let mut t = Topology::new("drain", &[("client", 0), ("server", 1)]);
    t.drain_timeout = Duration::from_millis(500);
    let (a, b) = t.start_pair().await;
    echo_server(SocketAddr::new(t.ip("server"), APP)).await;

    let mut held = a
        .connect_from(&t.namespace, "client", SocketAddr::new(t.ip("server"), APP))
        .await;
    held.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    held.read_exact(&mut buf).await.unwrap();

    // The exec probe's file: there while ready, gone as soon as draining starts.
    let ready = t.dir.path().join("ready1");
    assert!(ready.exists(), "a ready node has written its ready file");
    let started = Instant::now();
    let (left, ()) = tokio::join!(b.node.shutdown(), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!ready.exists(), "a draining node still has its ready file");
    });
    assert_eq!(left, 1, "the open tunnel was not waited for");
    assert!(started.elapsed() >= Duration::from_millis(500));
    // With nothing open, a node stops at once.
    let (left, took) = {
        drop(held);
        let started = Instant::now();
        (a.node.shutdown().await, started.elapsed())
    };
    assert_eq!(left, 0);
    assert!(took < Duration::from_millis(500), "took {took:?}");
}

#[test]
fn a_sighup_while_the_daemon_starts_neither_kills_it_nor_stops_it_becoming_ready() {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let t = Topology::new("hup", &[]);
    let config = t.dir.path().join("node.yaml");
    std::fs::write(&config, t.node_file(0)).unwrap();
    // Counted from the moment the daemon protects itself from SIGHUP, not from exec: before
    // that, while the loader and the allocator start, no process can; that takes a few
    // milliseconds for this debug build under load. It is protected once its main thread holds
    // the signal (its first act in `main`) or, later, once its handler is in place and the
    // signal is let in again. That hold can be too short to observe on a loaded machine, so
    // both count. Threads started before `main` (the allocator's) must not take the signal
    // either, which a SIGHUP just after this moment would show.
    let protected_from_sighup = |pid: u32| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let has_sighup = |field: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
                .is_some_and(|mask| mask & (1 << (Signal::SIGHUP as u32 - 1)) != 0)
        };
        has_sighup("SigBlk:") || has_sighup("SigCgt:")
    };
    for delay_ms in 0..=10u64 {
        let socket = t.dir.path().join(format!("hup{delay_ms}.sock"));
        let mut daemon = std::process::Command::new(culvert_tests::culvert_bin())
            .args(["node", "--config"])
            .arg(&config)
            .arg("--cni-socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(t.dir.path().join(format!("state{delay_ms}")))
            .args([
                "--admin-addr",
                "127.0.0.1:0",
                "--readiness-addr",
                "127.0.0.1:0",
                "--metrics-addr",
                "127.0.0.1:0",
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(daemon.id() as i32);
        let started = Instant::now();
        while !protected_from_sighup(daemon.id()) {
            assert!(
                daemon.try_wait().unwrap().is_none(),
                "exited before it started"
            );
            assert!(
                // A bound on a hang, not a timing: a loaded 2-core machine starts it slowly.
                started.elapsed() < Duration::from_secs(30),
                "never blocked or caught SIGHUP"
            );
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        kill(pid, Signal::SIGHUP).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            if let Some(status) = daemon.try_wait().unwrap() {
                panic!("SIGHUP {delay_ms} ms into the start: the daemon exited with {status}");
            }
            assert!(
                Instant::now() < deadline,
                "{delay_ms} ms: never became ready"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        kill(pid, Signal::SIGHUP).unwrap();
        kill(pid, Signal::SIGTERM).unwrap();
        let status = daemon.wait().unwrap();
        assert!(status.success(), "{delay_ms} ms: stopped with {status}");
    }
}

/// Opens a TCP connection to `to` from `from` that sends nothing; `Err` when the server reset
/// it before the connect completed on this side.
async fn silent(from: std::net::IpAddr, to: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// Whether the server ends the connection (reset or close) within `wait`.
async fn ended_within(stream: &mut std::io::Result<tokio::net::TcpStream>, wait: Duration) -> bool {
    let Ok(stream) = stream else { return true };
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(wait, stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hbone_flood_meets_the_caps_and_the_deadline_while_real_tunnels_go_through() {
    let mut t = Topology::new("flood", &[("client", 0), ("server", 1)]);
    t.hbone_limits = (6, 4); // per node, per peer
    let (a, b) = t.start_pair().await;
    let server = SocketAddr::new(t.ip("server"), APP);
    echo_server(server).await;
    let hbone = SocketAddr::new(t.ip("server"), 15008);

    // One peer takes its four places and says nothing.
    let flooder = t.host_ip(0, 99);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(Ok(silent(flooder, hbone).await.unwrap()));
    }
    let started = Instant::now();
    let mut fifth = silent(flooder, hbone).await;
    assert!(
        ended_within(&mut fifth, Duration::from_secs(2)).await,
        "a fifth connection from one peer was kept"
    );
    // Another pod's tunnel is not held up by it.
    let app = a.connect_from(&t.namespace, "client", server).await;
    let back = exchange(app, b"through").await;
    let ns = &t.namespace;
    assert_eq!(
        back.ok().as_deref(),
        Some(&b"through"[..]),
        "{:?}",
        access(&format!("{ns}/client"))
    );

    // A mesh peer that completes TLS and then sends no HTTP/2 preface is cut off as well.
    let certs = t.ca.certs();
    let (me, them) = (
        culvert::identity::Id::new("cluster.local", &t.namespace, "client").unwrap(),
        culvert::identity::Id::new("cluster.local", &t.namespace, "server").unwrap(),
    );
    certs.ensure(&me).await.unwrap();
    let config = culvert::tls::client_config(&certs, &me, &them, Default::default()).unwrap();
    let tcp = silent(t.host_ip(0, 95), hbone);
    let name = rustls::pki_types::ServerName::IpAddress(t.ip("server").into());
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp.await.unwrap())
        .await
        .expect("a mesh peer completes TLS");
    let tls_done = Instant::now();

    // The node's own cap: the flood's four, the client's pooled connection and the silent TLS
    // peer fill it; the next peer, whoever it is, is refused.
    let mut over = silent(t.host_ip(0, 96), hbone).await;
    let refused = ended_within(&mut over, Duration::from_secs(2)).await;
    assert!(refused, "the node held more than its cap");
    assert!(
        b.node
            .proxy()
            .refused(culvert::proxy::Refusal::HboneCapacity)
            >= 2,
        "refusals were not counted"
    );

    // Saying nothing costs a peer its connections at the deadline (10 s from accept).
    for mut stream in held {
        assert!(
            ended_within(&mut stream, Duration::from_secs(12)).await,
            "a silent connection outlived the deadline"
        );
    }
    assert!(started.elapsed() < Duration::from_secs(13));
    // The server's own SETTINGS come first; then, with no preface from the peer, the end.
    let mut sink = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(12), tls.read_to_end(&mut sink)).await;
    // Any end (EOF or reset) within the deadline will do; only still being open fails.
    assert!(
        read.is_ok(),
        "a TLS peer without a preface was kept past the deadline"
    );
    assert!(tls_done.elapsed() < Duration::from_secs(11));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reload_that_changes_a_service_account_tunnels_prove_the_new_identity() {
    let mut t = Topology::new("rename", &[("client", 0), ("server", 1)]);
    let (a, b) = t.start_pair().await;
    let server = SocketAddr::new(t.ip("server"), APP);
    echo_server(server).await;
    let app = a.connect_from(&t.namespace, "client", server).await;
    assert_eq!(exchange(app, b"before").await.unwrap(), b"before");

    let w = t.workloads.iter_mut().find(|w| w.name == "server").unwrap();
    w.service_account = "renamed".into();
    for node in [&a, &b] {
        let i = if std::ptr::eq(node, &a) { 0 } else { 1 };
        std::fs::write(&node.config, t.node_file(i)).unwrap();
        node.node.reload().await.unwrap();
    }
    let ns = t.namespace.clone();
    let want = format!("spiffe://cluster.local/ns/{ns}/sa/renamed");
    let pod = b.node.registry().pod(&ns, "server").unwrap();
    assert_eq!(pod.identity.as_str(), want);

    let app = a.connect_from(&ns, "client", server).await;
    assert_eq!(exchange(app, b"after").await.unwrap(), b"after");
    // The second connection's line, told apart by its bytes: the first connection's may be
    // logged after it (each is logged once both its directions are closed).
    let line = eventually("the client's second access-log line", || {
        let lines = access(&format!("{ns}/client"));
        assert!(lines.len() <= 2, "{lines:?}");
        lines
            .into_iter()
            .find(|l| l["bytes_sent"] == b"after".len())
    })
    .await;
    assert_eq!(line["transport"], "hbone");
    assert_eq!(line["dst.identity"], want, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_hbone_peer_vanishes_the_upstream_socket_is_closed_even_if_the_app_is_idle() {
    let t = Topology::new("vanish", &[("client", 0), ("server", 1)]);
    let b = t.start(1).await;
    t.register(&b, "server").await;
    let app = tokio::net::TcpListener::bind(SocketAddr::new(t.ip("server"), APP))
        .await
        .unwrap();

    // A mesh peer opens a tunnel to the app by hand, then disappears.
    let certs = t.ca.certs();
    let id = |sa: &str| culvert::identity::Id::new("cluster.local", &t.namespace, sa).unwrap();
    certs.ensure(&id("client")).await.unwrap();
    let config =
        culvert::tls::client_config(&certs, &id("client"), &id("server"), Default::default())
            .unwrap();
    let tcp = silent(t.ip("client"), SocketAddr::new(t.ip("server"), 15008))
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(t.ip("server").into());
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    let (mut requests, connection) = h2::client::handshake(tls).await.unwrap();
    let driver = tokio::spawn(connection);
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(SocketAddr::new(t.ip("server"), APP).to_string())
        .body(())
        .unwrap();
    let (response, mut stream) = requests.send_request(request, false).unwrap();
    let (_upstream, _) = app.accept().await.unwrap();
    assert_eq!(response.await.unwrap().status(), 200);
    // More than the app's socket buffers hold: the daemon ends up waiting to write to an app
    // that does not read.
    for _ in 0..16 {
        stream
            .send_data(bytes::Bytes::from(vec![7u8; 1 << 20]), false)
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The peer's node dies: its connection is gone.
    driver.abort();
    drop((requests, stream));
    // The server's side of the tunnel ends (its access-log line is written then), which
    // closes the app's connection, although the app never reads.
    let ns = &t.namespace;
    let line = eventually("the tunnel to end on the server", || {
        access(&format!("{ns}/server")).into_iter().next()
    })
    .await;
    assert_eq!(line["transport"], "hbone", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_past_a_peers_stream_cap_are_refused_until_one_closes() {
    let mut t = Topology::new("streams", &[("client", 0), ("server", 1)]);
    t.stream_limits = (8, 3); // per node, per peer
    let (a, _b) = t.start_pair().await; // _b: node 1 must keep running
    let server = SocketAddr::new(t.ip("server"), APP);
    echo_server(server).await;
    let ns = t.namespace.clone();

    let mut open = Vec::new();
    for i in 0..3u8 {
        let mut app = a.connect_from(&ns, "client", server).await;
        app.write_all(&[i]).await.unwrap();
        let mut back = [0u8];
        app.read_exact(&mut back).await.unwrap();
        open.push(app);
    }
    // A fourth tunnel from the same client pod is refused by the server.
    let mut fourth = a.connect_from(&ns, "client", server).await;
    let _ = fourth.write_all(b"x").await;
    let mut buf = [0u8; 4];
    assert!(
        matches!(fourth.read(&mut buf).await, Ok(0) | Err(_)),
        "a fourth tunnel was carried"
    );
    let refused = eventually("the server to log the refusal", || {
        access(&format!("{ns}/server"))
            .into_iter()
            .find(|l| l["reason"] == "capacity")
    })
    .await;
    assert_eq!(refused["transport"], "hbone");

    // One tunnel closes; its place is free again.
    drop(open.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let app = a.connect_from(&ns, "client", server).await;
    assert_eq!(exchange(app, b"again").await.unwrap(), b"again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_nodes_count_a_known_transfer_under_istio_metric_names() {
    let t = Topology::new("metrics", &[("client", 0), ("server", 1)]);
    let (a, b) = t.start_pair().await;
    // A server that answers a request of any size with 1,234 bytes: the two directions differ.
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(t.ip("server"), APP))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut sink = Vec::new();
                let _ = conn.read_to_end(&mut sink).await;
                let _ = conn.write_all(&[7u8; 1234]).await;
            });
        }
    });
    let request = vec![1u8; 300_000];
    // Through the Service VIP, so the source side names the Service.
    let vip = SocketAddr::new(t.vip(), 80);
    let mut app = a.connect_from(&t.namespace, "client", vip).await;
    app.write_all(&request).await.unwrap();
    app.shutdown().await.unwrap();
    let mut response = Vec::new();
    app.read_to_end(&mut response).await.unwrap();
    assert_eq!(response.len(), 1234);

    let ns = &t.namespace;
    eventually("both access-log lines", || {
        let done = |pod: &str| !access(&format!("{ns}/{pod}")).is_empty();
        (done("client") && done("server")).then_some(())
    })
    .await;
    let client_id = format!("source_principal=\"spiffe://cluster.local/ns/{ns}/sa/client\"");
    let server_id = format!("destination_principal=\"spiffe://cluster.local/ns/{ns}/sa/server\"");
    let pair = [
        "source_workload=\"client\"",
        "source_canonical_service=\"client\"",
        "source_canonical_revision=\"v1\"",
        "source_version=\"v1\"",
        "destination_workload=\"server\"",
        "destination_canonical_service=\"server\"",
        "connection_security_policy=\"mutual_tls\"",
        "request_protocol=\"tcp\"",
        "response_flags=\"-\"",
        &client_id,
        &server_id,
    ];
    for (node, reporter) in [(&a, "source"), (&b, "destination")] {
        let (status, scrape) = get(node.node.metrics_addr, "/metrics").await;
        assert_eq!(status, 200);
        let reporter = format!("reporter=\"{reporter}\"");
        let mut labels = pair.to_vec();
        labels.push(&reporter);
        let received = sample(&scrape, "istio_tcp_received_bytes_total", &labels);
        let sent = sample(&scrape, "istio_tcp_sent_bytes_total", &labels);
        assert_eq!((received, sent), (300_000.0, 1234.0), "{reporter}");
        assert_eq!(
            sample(&scrape, "istio_tcp_connections_opened_total", &labels),
            1.0
        );
        assert_eq!(
            sample(&scrape, "istio_tcp_connections_closed_total", &labels),
            1.0
        );
        assert!(samples(&scrape, "istio_tcp_connections_failed_total", &[]).is_empty());
        assert_eq!(
            sample(&scrape, "istio_tcp_sockets_open", &[&reporter]),
            0.0,
            "{scrape}"
        );
        assert!(scrape.contains("istio_build{component=\"ztunnel\""));
    }
    // Each node holds its pod's certificate, and got it at the first ask.
    for (node, pod) in [(&a, "client"), (&b, "server")] {
        let (_, scrape) = get(node.node.metrics_addr, "/metrics").await;
        let identity = format!("identity=\"spiffe://cluster.local/ns/{ns}/sa/{pod}\"");
        let left = sample(&scrape, "culvert_certificate_expiry_seconds", &[&identity]);
        assert!(left > 60.0, "{pod}'s certificate expires in {left} s");
        let issued = ["kind=\"issue\"", "result=\"ok\""];
        assert_eq!(
            sample(&scrape, "culvert_certificate_requests_total", &issued),
            1.0
        );
        assert_eq!(sample(&scrape, "culvert_pods_wired", &[]), 1.0);
        // The tunnel is closed; its connection stays pooled on the client's node.
        let streams = sample(
            &scrape,
            "culvert_hbone_streams",
            &["direction=\"outbound\""],
        );
        assert_eq!(streams, 0.0);
    }
    let (_, scrape) = get(a.node.metrics_addr, "/metrics").await;
    let outbound = ["direction=\"outbound\""];
    assert_eq!(sample(&scrape, "culvert_hbone_connections", &outbound), 1.0);
    let (_, scrape) = get(b.node.metrics_addr, "/metrics").await;
    let inbound = ["direction=\"inbound\""];
    assert_eq!(sample(&scrape, "culvert_hbone_connections", &inbound), 1.0);
    // The source knows the Service by the VIP the app dialled; the destination by the
    // endpoint it serves.
    let service = format!("destination_service=\"echo.{ns}.svc.cluster.local\"");
    let name = "destination_service_name=\"echo\"";
    for (node, reporter) in [
        (&a, "reporter=\"source\""),
        (&b, "reporter=\"destination\""),
    ] {
        let (_, scrape) = get(node.node.metrics_addr, "/stats/prometheus").await;
        assert_eq!(
            sample(
                &scrape,
                "istio_tcp_received_bytes_total",
                &[reporter, &service, name]
            ),
            300_000.0,
            "{reporter}"
        );
    }
    // The admin and probe addresses serve no metrics, and the scrape address nothing else.
    assert_eq!(get(a.node.admin_addr, "/metrics").await.0, 404);
    assert_eq!(get(a.node.readiness_addr, "/metrics").await.0, 404);
    assert_eq!(get(a.node.metrics_addr, "/workloads").await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_tunnel_is_counted_with_its_flag() {
    let mut t = Topology::new("metricsfail", &[("client", 0), ("server", 1)]);
    // Node 0 expects the server to be `expected`; node 1 issues it `server`.
    t.believe("server", "expected");
    let (a, b) = t.start_pair().await;
    let mut app = a
        .connect_from(&t.namespace, "client", SocketAddr::new(t.ip("server"), APP))
        .await;
    let mut buf = [0u8; 1];
    let _ = app.read(&mut buf).await;
    let ns = &t.namespace;
    eventually("the client's access-log line", || {
        access(&format!("{ns}/client")).into_iter().next()
    })
    .await;
    let (_, scrape) = get(a.node.metrics_addr, "/metrics").await;
    let labels = [
        "reporter=\"source\"",
        "response_flags=\"TLS_FAILURE\"",
        "source_workload=\"client\"",
    ];
    assert_eq!(
        sample(&scrape, "istio_tcp_connections_failed_total", &labels),
        1.0
    );
    assert_eq!(
        sample(&scrape, "istio_tcp_connections_closed_total", &labels),
        1.0
    );
    assert!(samples(&scrape, "istio_tcp_sent_bytes_total", &[]).is_empty());
    // Both sides count the handshake with its cause, and log it once.
    let failures = "culvert_hbone_handshake_failures_total";
    let client = ["side=\"client\"", "reason=\"identity_mismatch\""];
    assert_eq!(sample(&scrape, failures, &client), 1.0);
    let deadline = Instant::now() + Duration::from_secs(5);
    let server = loop {
        let (_, scrape) = get(b.node.metrics_addr, "/metrics").await;
        if let Some((labels, count)) = samples(&scrape, failures, &["side=\"server\""]).first() {
            break (labels.to_string(), *count);
        }
        assert!(Instant::now() < deadline, "no server-side count:\n{scrape}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(server.1, 1.0);
    assert!(
        server.0.contains("reason=\"bad_certificate\""),
        "{}",
        server.0
    );
    let logged = |message: &str| {
        logs()
            .into_iter()
            .filter(|l| l["message"] == message && l["cause"].is_string())
            .filter(|l| {
                l["pod"]
                    .as_str()
                    .is_some_and(|p| p.starts_with(ns.as_str()))
            })
            .count()
    };
    // Each side logs its failure once; a missing line names what the process did log.
    for message in [
        "TLS handshake with an HBONE peer failed",
        "TLS handshake from an HBONE peer failed",
    ] {
        let deadline = Instant::now() + Duration::from_secs(5);
        while logged(message) == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seen: Vec<_> = logs()
            .into_iter()
            .filter(|l| l["message"] == message)
            .collect();
        assert_eq!(logged(message), 1, "{message}: lines with it: {seen:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_connections_from_distinct_ports_add_no_series() {
    let t = Topology::new("cardinality", &[("client", 0), ("server", 1)]);
    let (a, b) = t.start_pair().await;
    let server = SocketAddr::new(t.ip("server"), APP);
    echo_server(server).await;
    let ns = &t.namespace;
    let series = |scrape: &str| scrape.lines().filter(|l| !l.starts_with('#')).count();
    let one = |node: &culvert_tests::inproc::TestNode| {
        let node = node.node.metrics_addr;
        async move { get(node, "/metrics").await.1 }
    };
    let app = a.connect_from(ns, "client", server).await;
    assert_eq!(exchange(app, b"first").await.unwrap(), b"first");
    eventually("the first connection's close", || {
        (access(&format!("{ns}/server")).len() == 1).then_some(())
    })
    .await;
    let (before_a, before_b) = (series(&one(&a).await), series(&one(&b).await));

    let total = 10_000;
    let ports = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let a = Arc::new(a);
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..50 {
        let (a, ns, ports) = (a.clone(), ns.clone(), ports.clone());
        workers.spawn(async move {
            for _ in (worker..total).step_by(50) {
                let app = a.connect_from(&ns, "client", server).await;
                ports
                    .lock()
                    .unwrap()
                    .insert(app.local_addr().unwrap().port());
                assert_eq!(exchange(app, b"x").await.unwrap(), b"x");
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.unwrap();
    }
    assert!(
        ports.lock().unwrap().len() > 1000,
        "the clients reused their ports"
    );
    eventually("every close counted", || {
        (access(&format!("{ns}/server")).len() > total).then_some(())
    })
    .await;
    let (after_a, after_b) = (one(&a).await, one(&b).await);
    assert_eq!(series(&after_a), before_a, "{after_a}");
    assert_eq!(series(&after_b), before_b, "{after_b}");
    let labels = ["reporter=\"destination\"", "source_workload=\"client\""];
    assert_eq!(
        sample(&after_b, "istio_tcp_connections_closed_total", &labels),
        (total + 1) as f64
    );
}

/// `method path` on `addr`, HTTP/1.1: status and body.
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: culvert\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (
        head.split(' ').nth(1).unwrap().parse().unwrap(),
        body.to_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_filter_is_read_and_changed_through_the_admin_api() {
    use std::io::BufRead as _;
    let t = Topology::new("logging", &[]);
    let config = t.dir.path().join("node.yaml");
    std::fs::write(&config, t.node_file(0)).unwrap();
    let mut daemon = std::process::Command::new(culvert_tests::culvert_bin())
        .args(["--log-format=json", "node", "--config"])
        .arg(&config)
        .arg("--cni-socket")
        .arg(t.dir.path().join("node.sock"))
        .arg("--state-dir")
        .arg(t.dir.path().join("state"))
        .args([
            "--admin-addr",
            "127.0.0.1:0",
            "--readiness-addr",
            "127.0.0.1:0",
        ])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .env("CULVERT_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The daemon's log lines, as they come.
    let (lines, mut log) = tokio::sync::mpsc::unbounded_channel::<serde_json::Value>();
    let stderr = daemon.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(value) = serde_json::from_str(&line) {
                let _ = lines.send(value);
            }
        }
    });
    let mut next = async |what: &str, matches: &dyn Fn(&serde_json::Value) -> bool| loop {
        let line = tokio::time::timeout(Duration::from_secs(10), log.recv())
            .await
            .unwrap_or_else(|_| panic!("no {what} logged"))
            .unwrap_or_else(|| panic!("the daemon exited before logging {what}"));
        if matches(&line) {
            return line;
        }
    };
    let listening = next("the admin address", &|l| {
        l["message"] == "listening" && l["what"] == "admin"
    })
    .await;
    let admin: SocketAddr = listening["addr"].as_str().unwrap().parse().unwrap();
    next("ready", &|l| l["message"] == "ready").await;

    let filter =
        |body: &str| serde_json::from_str::<serde_json::Value>(body).unwrap()["filter"].clone();
    let (status, body) = http(admin, "GET", "/logging").await;
    assert_eq!((status, filter(&body)), (200, "info".into()));
    // Raised to warn, the change's own INFO line is filtered out ...
    let (status, body) = http(
        admin,
        "POST",
        "/logging?level=warn%2Cculvert%3A%3Aproxy%3Dwarn",
    )
    .await;
    assert_eq!(
        (status, filter(&body)),
        (200, "warn,culvert::proxy=warn".into())
    );
    // ... a malformed filter is refused and changes nothing ...
    let (status, body) = http(admin, "POST", "/logging?level=culvert%3Dloud").await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        filter(&http(admin, "GET", "/logging").await.1),
        "warn,culvert::proxy=warn"
    );
    assert_eq!(http(admin, "PUT", "/logging").await.0, 400);
    // ... and once reset, the next change is logged again: the first line since the change
    // to warn, so nothing between was let through.
    let (status, body) = http(admin, "POST", "/logging?reset").await;
    assert_eq!((status, filter(&body)), (200, "info".into()));
    let changed = next("a line after the reset", &|_| true).await;
    assert_eq!(changed["message"], "log filter changed", "{changed}");
    assert_eq!(changed["filter"], "info");
    // `culvert log` does the same from the command line.
    let admin = admin.to_string();
    let log = |args: &[&str]| {
        std::process::Command::new(culvert_tests::culvert_bin())
            .args(["log", "--admin", &admin])
            .args(args)
            .output()
            .unwrap()
    };
    let stdout = |out: std::process::Output| {
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(stdout(log(&[])), "info\n");
    assert_eq!(
        stdout(log(&["--level", "warn,access=info"])),
        "warn,access=info\n"
    );
    let refused = log(&["--level", "culvert=loud"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("400"),
        "{refused:?}"
    );
    assert_eq!(stdout(log(&["--reset"])), "info\n");
    daemon.kill().unwrap();
    daemon.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_the_probe_listener_and_idle_connections_are_closed() {
    let t = Topology::new("caps", &[("client", 0)]);
    let node = t.start(0).await;
    let probes = node.node.readiness_addr;
    let flooder: std::net::IpAddr = t.host_ip(0, 200);
    let connect = || async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(flooder, 0)).unwrap();
        socket.connect(probes).await.unwrap()
    };
    // Eight idle connections from one address take its places; the ninth is closed at once.
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(connect().await);
    }
    let mut ninth = connect().await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(2), ninth.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the ninth connection was not closed: {read:?}"
    );
    // The kubelet, from another address, still gets its answer.
    let other = t.host_ip(0, 201);
    assert_eq!(get_from(other, probes, "/healthz/ready").await.0, 200);
    // Idle connections that never send a request are closed after the header timeout, and
    // the address has its places back.
    for mut conn in idle {
        let read = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "an idle connection outlived the header timeout: {read:?}"
        );
    }
    assert_eq!(get_from(flooder, probes, "/healthz/ready").await.0, 200);
}
