//! Micro-benchmarks of the daemon's hot paths: policy decisions, state lookups, identity
//! parsing, and HBONE's byte path (mTLS + HTTP/2 CONNECT over loopback).

#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::disallowed_types)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use culvert::hbone::{self, Handler, Incoming};
use culvert::identity::Id;
use culvert::policy;
use culvert::state::{PeerAuthentication, Snapshot, Workload};
use culvert::test_util::{Ca, LoopbackDialer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

fn snapshot(n: u32) -> Snapshot {
    let workloads = (0..n)
        .map(|i| Workload {
            name: format!("w{i}").into(),
            namespace: "bench".into(),
            workload_name: format!("deploy{}", i % 50).into(),
            workload_type: culvert::state::WorkloadType::Pod,
            node: format!("n{}", i % 20).into(),
            ips: culvert::state::Ips::One(std::net::Ipv4Addr::from(0x0af4_0000 + i).into()),
            labels: Default::default(),
            enrollment: Some(true),
            peer_authentication: None,
            identity: Id::new("cluster.local", "bench", &format!("sa{}", i % 50)).unwrap(),
        })
        .map(Arc::new)
        .collect();
    Snapshot::build(
        "cluster.local",
        PeerAuthentication::Permissive,
        Default::default(),
        workloads,
        vec![],
    )
    .unwrap()
}

/// `n` ALLOW policies in namespace `bench`: all but the last name a principal no peer has.
fn policies(n: usize) -> policy::Policies {
    use policy::istio::{AuthorizationPolicySpec, From, Object, Rule, Source};
    let objects = (0..n)
        .map(|i| {
            let principal = if i + 1 == n {
                "cluster.local/ns/front/sa/web".to_owned()
            } else {
                format!("cluster.local/ns/other/sa/sa{i}")
            };
            Object {
                namespace: "bench".into(),
                name: format!("p{i}"),
                created: 0,
                order: i,
                spec: AuthorizationPolicySpec {
                    rules: vec![Rule {
                        from: vec![From {
                            source: Source {
                                principals: vec![principal],
                                ..Source::default()
                            },
                        }],
                        ..Rule::default()
                    }],
                    ..AuthorizationPolicySpec::default()
                },
            }
        })
        .collect();
    policy::Policies::build(&policy::Settings::default(), vec![], objects)
}

fn state_and_policy(c: &mut Criterion) {
    let snap = snapshot(10_000);
    let ip: std::net::IpAddr = std::net::Ipv4Addr::from(0x0af4_0000 + 4321).into();
    c.bench_function("state: workload by IP among 10k", |b| {
        b.iter(|| black_box(snap.workload_by_ip(black_box(ip))))
    });
    let w = snap.workload_by_ip(ip).unwrap().clone();
    let conn = policy::Connection {
        peer: None,
        src: "10.0.0.9:40000".parse().unwrap(),
        dst: std::net::SocketAddr::new(ip, 8080),
    };
    c.bench_function("policy: plaintext inbound decision, no policies", |b| {
        b.iter(|| black_box(policy::inbound(&snap, black_box(&w), black_box(&conn))))
    });
    // ALLOW policies selecting the workload whose principal never matches, so every one is
    // evaluated before the verdict (the worst case), and one that allows at the end.
    let peer: Id = "spiffe://cluster.local/ns/front/sa/web".parse().unwrap();
    let hbone = policy::Connection {
        peer: Some(&peer),
        ..conn
    };
    for n in [1, 100, 1000] {
        let snap = snapshot(10_000).with_policies(Arc::new(policies(n)));
        c.bench_function(
            &format!("policy: HBONE decision, {n} ALLOW policies"),
            |b| b.iter(|| black_box(policy::inbound(&snap, black_box(&w), black_box(&hbone)))),
        );
    }
    c.bench_function("policy: compile 10 000 policies", |b| {
        b.iter(|| black_box(policies(10_000)))
    });
    c.bench_function("identity: parse a SPIFFE id", |b| {
        b.iter(|| {
            black_box(
                "spiffe://cluster.local/ns/bench/sa/sa42"
                    .parse::<Id>()
                    .unwrap(),
            )
        })
    });
}

/// Accepts every stream and sinks what arrives.
struct Sink;

impl Handler for Sink {
    async fn handle(&self, incoming: Incoming) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sink = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 256 << 10];
            while s.read(&mut buf).await.unwrap_or(0) > 0 {}
        });
        let upstream = TcpStream::connect(addr).await.unwrap();
        let stream = incoming.accept().unwrap();
        stream.splice(upstream).await;
        let _ = sink.await;
    }
}

fn hbone_bytes(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let certs = Ca::new("bench").certs();
    let (src, dst) = (
        Id::new("cluster.local", "a", "a").unwrap(),
        Id::new("cluster.local", "b", "b").unwrap(),
    );
    let (client, peer) = runtime.block_on(async {
        certs.ensure(&src).await.unwrap();
        certs.ensure(&dst).await.unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = listener.local_addr().unwrap();
        let server = Arc::new(hbone::Server::new(
            culvert::tls::server_config(&certs, &dst, Default::default()).unwrap(),
            Arc::new(Sink),
        ));
        tokio::spawn(async move {
            loop {
                let (tcp, from) = listener.accept().await.unwrap();
                let server = server.clone();
                tokio::spawn(
                    async move { server.serve(tcp, from, CancellationToken::new()).await },
                );
            }
        });
        (Arc::new(hbone::Client::new(certs.clone())), peer)
    });
    const MIB: usize = 1 << 20;
    let mut group = c.benchmark_group("hbone");
    group
        .throughput(Throughput::Bytes(16 * MIB as u64))
        .sample_size(10);
    group.bench_function("16 MiB through one CONNECT stream (loopback, mTLS)", |b| {
        b.iter(|| {
            runtime.block_on(async {
                let request = hbone::Request {
                    src: &src,
                    src_ip: peer.ip(),
                    dst: &dst,
                    peer: hbone::PeerAddr(peer),
                    target: hbone::TargetAddr(peer),
                    dialer: &LoopbackDialer,
                };
                let stream = client.connect(request).await.unwrap();
                let (mut app, proxy_side) = local_pair().await;
                let splice = tokio::spawn(async move { stream.splice(proxy_side).await });
                let chunk = vec![7u8; MIB];
                for _ in 0..16 {
                    app.write_all(&chunk).await.unwrap();
                }
                app.shutdown().await.unwrap();
                let mut rest = Vec::new();
                app.read_to_end(&mut rest).await.unwrap();
                black_box(splice.await.unwrap().sent)
            })
        })
    });
    group.finish();
}

/// A connected pair of loopback sockets.
async fn local_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let connect = TcpStream::connect(listener.local_addr().unwrap());
    let (a, b) = tokio::join!(connect, listener.accept());
    (a.unwrap(), b.unwrap().0)
}

/// One full mTLS handshake (TLS 1.3, ECDSA P-256 certificates both ways) in memory, with the
/// key exchange two Culvert nodes agree on (X25519MLKEM768) and with a peer offering only
/// X25519 (what a post-quantum-less peer gets).
fn handshakes(c: &mut Criterion) {
    use culvert::tls;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let certs = Ca::new("bench-handshake").certs();
    let (src, dst) = (
        Id::new("cluster.local", "a", "a").unwrap(),
        Id::new("cluster.local", "b", "b").unwrap(),
    );
    runtime.block_on(async {
        certs.ensure(&src).await.unwrap();
        certs.ensure(&dst).await.unwrap();
    });
    let server = tokio_rustls::TlsAcceptor::from(
        tls::server_config(&certs, &dst, tls::KeyExchange::PreferPostQuantum).unwrap(),
    );
    let ours = tls::provider_for(tls::KeyExchange::PreferPostQuantum);
    let mut classic = (*ours).clone();
    classic.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    let mut group = c.benchmark_group("tls handshake");
    for (name, provider) in [("X25519MLKEM768", ours), ("X25519", Arc::new(classic))] {
        let client = tokio_rustls::TlsConnector::from(
            tls::client_config_with(&certs, &src, &dst, provider).unwrap(),
        );
        group.bench_function(name, |b| {
            b.iter(|| {
                runtime.block_on(async {
                    let (a, z) = tokio::io::duplex(64 << 10);
                    let name = rustls::pki_types::ServerName::IpAddress(
                        std::net::Ipv4Addr::LOCALHOST.into(),
                    );
                    let (c, s) = tokio::join!(client.connect(name, a), server.accept(z));
                    black_box((c.unwrap(), s.unwrap()));
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, state_and_policy, hbone_bytes, handshakes);
criterion_main!(benches);
