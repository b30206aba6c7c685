//! Hostile and malformed input on a pod's HBONE port, from a peer that holds a valid mesh
//! certificate (the worst case) and from one that speaks no TLS at all.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use culvert::identity::Id;
use culvert::tls;
use culvert_tests::*;
use rustls::pki_types::ServerName;

#[test]
#[ignore = "needs root: netns"]
fn hostile_input_on_the_hbone_port_gets_the_right_answer_and_harms_no_one() {
    let lab = lab(
        "cvhost",
        spec(vec![
            PodSpec::new("client", 0, true),
            PodSpec::new("prober", 0, false),
            PodSpec::new("server", 1, true),
        ]),
    );
    let server = lab.pod("server");
    server.serve_echo(ECHO).unwrap();
    let echo_addr = SocketAddr::from((server.ip, ECHO));
    let hbone = SocketAddr::from((server.ip, 15008));

    // A healthy connection through the tunnel that must outlive everything below.
    let mut healthy = lab.pod("client").connect(echo_addr).unwrap();
    healthy
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut ping = |n: u32| {
        let msg = format!("ping {n}");
        healthy.write_all(msg.as_bytes()).unwrap();
        let mut back = vec![0u8; msg.len()];
        healthy.read_exact(&mut back).unwrap();
        assert_eq!(back, msg.as_bytes());
    };
    ping(1);

    // Plain bytes: no TLS, so no HTTP answer, and the connection is closed.
    let mut plain = lab.pod("prober").connect(hbone).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    plain
        .write_all(b"CONNECT 10.244.2.2:8080 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = plain.read_to_end(&mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).contains("HTTP/"),
        "plaintext got an HTTP answer: {answer:?}"
    );
    ping(2);

    // A peer with a valid mesh identity sending bad requests on one HTTP/2 connection.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let certs = lab.certs().unwrap();
    let me = Id::new("cluster.local", "demo", "prober").unwrap();
    let server_id = Id::new("cluster.local", "demo", "server").unwrap();
    let client_ip = lab.pod("client").ip;
    let prober_tcp = lab.pod("prober").connect(hbone).unwrap();
    let statuses = runtime.block_on(async {
        certs.ensure(&me).await.unwrap();
        let config = tls::client_config(&certs, &me, &server_id, Default::default()).unwrap();
        prober_tcp.set_nonblocking(true).unwrap();
        let tcp = tokio::net::TcpStream::from_std(prober_tcp).unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::from(hbone.ip()), tcp)
            .await
            .unwrap();
        let (send, connection) = h2::client::handshake(tls).await.unwrap();
        tokio::spawn(connection);
        let cases: Vec<(&str, String, usize)> = vec![
            ("GET", format!("http://{echo_addr}/"), 0),
            ("CONNECT", "not-an-address".into(), 0),
            ("CONNECT", format!("{client_ip}:{ECHO}"), 0),
            ("CONNECT", format!("{}:15008", server.ip), 0),
            ("CONNECT", format!("{}:15001", server.ip), 0),
            ("CONNECT", format!("{}:9", server.ip), 0),
            // Over the 16 KiB limit but decodable: refused on the stream, connection kept.
            ("CONNECT", echo_addr.to_string(), 20 << 10),
            ("CONNECT", echo_addr.to_string(), 0),
        ];
        let mut statuses = Vec::new();
        for (method, uri, junk) in cases {
            let mut request = http::Request::builder().method(method).uri(uri.as_str());
            if junk > 0 {
                request = request.header("x-junk", "j".repeat(junk));
            }
            let mut send = send.clone().ready().await.unwrap();
            let (response, _body) = send.send_request(request.body(()).unwrap(), false).unwrap();
            let status = match tokio::time::timeout(Duration::from_secs(15), response).await {
                Ok(Ok(r)) => r.status().as_u16().to_string(),
                Ok(Err(e)) => format!("reset: {e}"),
                Err(_) => "no answer".to_owned(),
            };
            statuses.push((method, uri, status));
        }
        statuses
    });
    let want = ["400", "400", "400", "400", "400", "503", "431", "200"];
    for ((method, uri, got), want) in statuses.iter().zip(want) {
        assert_eq!(got, want, "{method} {uri}");
    }
    ping(3);

    // A header block far past any sane size: h2 drops the whole connection (GOAWAY
    // ENHANCE_YOUR_CALM) rather than decode it.
    let flood_tcp = lab.pod("prober").connect(hbone).unwrap();
    let flood = runtime.block_on(async {
        let config = tls::client_config(&certs, &me, &server_id, Default::default()).unwrap();
        flood_tcp.set_nonblocking(true).unwrap();
        let tcp = tokio::net::TcpStream::from_std(flood_tcp).unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::from(hbone.ip()), tcp)
            .await
            .unwrap();
        let (send, connection) = h2::client::handshake(tls).await.unwrap();
        let driver = tokio::spawn(connection);
        let request = http::Request::builder()
            .method("CONNECT")
            .uri(echo_addr.to_string())
            .header("x-junk", "j".repeat(1 << 20))
            .body(())
            .unwrap();
        let mut send = send.ready().await.unwrap();
        let (response, _body) = send.send_request(request, false).unwrap();
        let answered = tokio::time::timeout(Duration::from_secs(15), response).await;
        let closed = tokio::time::timeout(Duration::from_secs(15), driver).await;
        (answered.map(|r| r.map(|r| r.status())), closed.is_ok())
    });
    assert!(
        matches!(flood.0, Ok(Err(_))),
        "1 MiB of headers was answered: {:?}",
        flood.0
    );
    assert!(flood.1, "the flooding connection was not closed");
    ping(4);

    // A client certificate from another trust domain fails the handshake.
    let foreign = Id::new("evil.example", "demo", "prober").unwrap();
    let foreign_tcp = lab.pod("prober").connect(hbone).unwrap();
    let handshake = runtime.block_on(async {
        certs.ensure(&foreign).await.unwrap();
        let config = tls::client_config(&certs, &foreign, &server_id, Default::default()).unwrap();
        foreign_tcp.set_nonblocking(true).unwrap();
        let tcp = tokio::net::TcpStream::from_std(foreign_tcp).unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(ServerName::from(hbone.ip()), tcp)
            .await?;
        // TLS 1.3 reports a rejected client certificate on the first read.
        let (_send, connection) = h2::client::handshake(tls)
            .await
            .map_err(std::io::Error::other)?;
        connection.await.map_err(std::io::Error::other)
    });
    assert!(handshake.is_err(), "a foreign trust domain was accepted");
    ping(5);
}

/// Open file descriptors of a process.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
#[ignore = "needs root: netns"]
fn a_connection_to_the_proxys_own_listener_is_refused_and_costs_the_node_nothing() {
    let lab = lab(
        "cvloop",
        spec(vec![
            PodSpec::new("client", 0, true),
            PodSpec::new("neighbour", 0, true),
            PodSpec::new("server", 1, true),
        ]),
    );
    lab.pod("server").serve_echo(ECHO).unwrap();
    let to_server = addr(&lab, "server", ECHO);
    echo_ok(&lab, "neighbour", to_server, b"before");
    let pid = lab.daemon_pid(0).unwrap();
    let before = fds(pid);

    let client = lab.pod("client");
    let own = SocketAddr::from((client.ip, 15001));
    let targets: [SocketAddr; 4] = [
        "127.0.0.1:15001".parse().unwrap(),
        "[::1]:15001".parse().unwrap(),
        own,
        SocketAddr::from((client.ip, 15006)),
    ];
    for round in 0..50 {
        for target in targets {
            // Either the connect is refused or the connection ends at once with nothing read.
            let Ok(mut stream) = client.connect(target) else {
                continue;
            };
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let _ = stream.write_all(b"loop?");
            let mut buf = [0u8; 8];
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => {}
                Ok(n) => panic!("round {round}: {target} answered {:?}", &buf[..n]),
            }
        }
    }
    // The daemon holds what it held before (a little slack for connections still closing).
    let after = eventually(
        "the daemon's descriptors to settle",
        Duration::from_secs(5),
        || {
            let now = fds(pid);
            (now <= before + 4).then_some(now)
        },
    );
    assert!(after <= before + 4, "{before} fds before, {after} after");
    echo_ok(&lab, "neighbour", to_server, b"after");
    echo_ok(&lab, "client", to_server, b"and the client itself");
    // Logged, but not once per connection.
    let logged = lab
        .log(0)
        .matches("connection to the proxy's own listener refused")
        .count();
    assert!((1..=10).contains(&logged), "logged {logged} times");
}
