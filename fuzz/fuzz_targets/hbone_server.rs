//! Raw HTTP/2 frames from an authenticated peer, straight into the HBONE server's request
//! handling (after the TLS handshake, which rustls owns): headers, CONNECT authorities, floods.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use culvert::hbone::{Handler, Incoming, Refusal, Server};
use culvert::identity::Id;
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

/// Refuses every well-formed request, as a node with no such workload would.
struct Refuse;

impl Handler for Refuse {
    async fn handle(&self, incoming: Incoming) {
        incoming.refuse(Refusal::Unavailable);
    }
}

struct Fixture {
    runtime: tokio::runtime::Runtime,
    server: Arc<Server<Refuse>>,
    peer: Id,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let ca = culvert::test_util::Ca::new("fuzz");
        let certs = ca.certs();
        let me = Id::new("cluster.local", "fuzz", "server").expect("id");
        runtime.block_on(certs.ensure(&me)).expect("certificate");
        let config = culvert::tls::server_config(&certs, &me, Default::default()).expect("tls");
        Fixture {
            runtime,
            server: Arc::new(Server::new(config, Arc::new(Refuse))),
            peer: Id::new("cluster.local", "fuzz", "client").expect("id"),
        }
    })
}

fuzz_target!(|frames: &[u8]| {
    let f = fixture();
    f.runtime.block_on(async {
        let (mut client, server_io) = tokio::io::duplex(1 << 16);
        let server = f.server.clone();
        let peer = f.peer.clone();
        let serve = tokio::spawn(async move {
            let addr = "10.244.1.2:40000".parse().expect("addr");
            server
                .serve_h2(server_io, addr, peer, tokio_util::sync::CancellationToken::new())
                .await;
        });
        let _ = client.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        let _ = client.write_all(frames).await;
        let _ = client.shutdown().await;
        // Whatever the frames, the server ends (or is cut off) and never panics.
        let _ = tokio::time::timeout(Duration::from_millis(200), serve).await;
    });
});
