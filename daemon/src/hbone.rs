//! HBONE: mutual-TLS HTTP/2 CONNECT tunnels between nodes.
//!
//! Owns the client connection pool, the server's CONNECT handling and the byte pump between a
//! TCP socket and a CONNECT stream. Knows nothing of pods, Kubernetes or redirection: callers
//! pass a resolved target, the identities involved and a way to create sockets.

mod client;
mod server;

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

pub use client::{Client, Dialer, Request};
pub use server::{Handler, Incoming, Server, connect_target};

use crate::identity::Id;

/// HTTP/2 settings of the wire contract (`docs/protocol-hbone.md`), shared by both sides.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;
pub const MAX_FRAME_SIZE: u32 = 1 << 20;
/// Streams a server accepts on one connection.
pub const SERVER_MAX_STREAMS: u32 = 200;
/// Streams a client puts on one connection before opening another.
pub const CLIENT_MAX_STREAMS: usize = 100;
/// Largest request header block a server decodes; bigger ones are answered 431.
pub const MAX_HEADER_LIST: u32 = 16 << 10;
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
pub const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// A pooled connection that carried no stream for this long is closed.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A server connection without a stream for this long gets GOAWAY: longer than the client's
/// idle timeout, so a healthy client closes first and never races a GOAWAY.
pub const SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(360);
/// Budget for a TCP connect plus TLS handshake, and for dialling the upstream app.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes read from a TCP socket per turn before they are offered to the stream: a connection
/// starts small and doubles while its reads fill the buffer, so chatty connections hold little
/// memory and bulk transfers make few syscalls. An idle one holds no buffer at all.
const MIN_READ: usize = 16 << 10;
const MAX_READ: usize = 256 << 10;

/// The peer's HBONE endpoint (`podIP:15008`): where the tunnel's TCP connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerAddr(pub SocketAddr);

/// What the tunnel asks the peer to connect to (`:authority`): the app's address. Kept apart
/// from [`PeerAddr`] by type, since mixing the two up is the classic tunnel bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TargetAddr(pub SocketAddr);

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::fmt::Display for TargetAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting to {peer}")]
    Connect {
        peer: PeerAddr,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with {peer}")]
    Handshake {
        peer: PeerAddr,
        #[source]
        source: io::Error,
    },
    #[error("{peer} presented {got}, expected {want}")]
    IdentityMismatch {
        peer: PeerAddr,
        got: String,
        want: Id,
    },
    #[error("HTTP/2 with {peer}")]
    Http2 {
        peer: PeerAddr,
        #[source]
        source: h2::Error,
    },
    #[error("{peer} did not negotiate ALPN h2")]
    Alpn { peer: PeerAddr },
    #[error("CONNECT {target} answered {status}")]
    Refused {
        target: TargetAddr,
        status: http::StatusCode,
    },
    #[error("no certificate for {id}")]
    NoCertificate { id: Id },
    #[error("building TLS config")]
    Tls(#[source] rustls::Error),
}

/// Why a server will not carry a CONNECT, as the wire contract answers it. Both directions of
/// the mapping live here: the server turns a refusal into a status, the client a status back
/// into a [`Reason`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 400: bad method or authority, or a target that is not the pod's own.
    BadRequest,
    /// 401: denied by policy.
    Denied,
    /// 503: the workload is unknown here, or its app could not be reached.
    Unavailable,
}

impl Refusal {
    pub fn status(self) -> http::StatusCode {
        match self {
            Self::BadRequest => http::StatusCode::BAD_REQUEST,
            Self::Denied => http::StatusCode::UNAUTHORIZED,
            Self::Unavailable => http::StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The refusal a status stands for; `None` for statuses the contract does not use.
    pub fn of(status: http::StatusCode) -> Option<Self> {
        [Self::BadRequest, Self::Denied, Self::Unavailable]
            .into_iter()
            .find(|r| r.status() == status)
    }
}

/// Low-cardinality cause of a failed tunnel, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    PeerUnreachable,
    PeerIdentity,
    PeerProtocol,
    UpstreamRefused,
    PolicyDenied,
    Internal,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PeerUnreachable => "peer_unreachable",
            Self::PeerIdentity => "peer_identity",
            Self::PeerProtocol => "peer_protocol",
            Self::UpstreamRefused => "upstream_refused",
            Self::PolicyDenied => "policy_denied",
            Self::Internal => "internal",
        }
    }
}

impl Error {
    /// Why the TLS handshake failed, for an error that is one.
    pub fn handshake_failure(&self) -> Option<crate::tls::HandshakeFailure> {
        match self {
            Self::Handshake { source, .. } => Some(crate::tls::HandshakeFailure::of(source)),
            Self::IdentityMismatch { .. } => Some(crate::tls::HandshakeFailure::IdentityMismatch),
            _ => None,
        }
    }

    pub fn reason(&self) -> Reason {
        match self {
            Self::Connect { .. } => Reason::PeerUnreachable,
            Self::Handshake { .. } | Self::IdentityMismatch { .. } => Reason::PeerIdentity,
            Self::Http2 { .. } | Self::Alpn { .. } => Reason::PeerProtocol,
            Self::Refused { status, .. } => match Refusal::of(*status) {
                Some(Refusal::Denied) => Reason::PolicyDenied,
                Some(Refusal::BadRequest | Refusal::Unavailable) | None => Reason::UpstreamRefused,
            },
            Self::NoCertificate { .. } | Self::Tls(_) => Reason::Internal,
        }
    }
}

/// An open CONNECT stream, either side.
pub struct Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Held while the stream lives so the pool knows the connection's load.
    _slot: Option<client::StreamSlot>,
}

/// What a finished splice moved, and how it ended.
#[derive(Debug, Default)]
pub struct Transfer {
    /// Bytes read from the local socket and sent to the other side.
    pub sent: u64,
    /// Bytes received from the other side and written to the local socket.
    pub received: u64,
    pub error: Option<io::Error>,
}

impl Stream {
    /// Copies bytes both ways between `tcp` and the stream until both directions have ended.
    ///
    /// A local half-close becomes END_STREAM and the peer's END_STREAM becomes a TCP FIN, so
    /// half-closed protocols work. Memory is bounded by the HTTP/2 windows: received data is
    /// released to the peer only once written to the socket, and data is offered to the stream
    /// only as fast as the peer grants capacity.
    pub async fn splice(mut self, tcp: TcpStream) -> Transfer {
        let (rd, mut wr) = tcp.into_split();
        let (mut sent, mut received) = (0u64, 0u64);
        let send = &mut self.send;
        let recv = &mut self.recv;
        // Set once the peer's half has ended and been written out.
        let downstream_done = tokio::sync::Notify::new();
        let upstream = async {
            let (mut buf, mut want) = (BytesMut::new(), MIN_READ);
            loop {
                // Waiting on the app, watch the stream too: a peer that resets it or whose
                // connection is lost must end the splice, even if the app neither reads nor
                // writes (the other direction may be stuck writing to it).
                tokio::select! {
                    ready = rd.readable() => ready?,
                    reset = poll_fn(|cx| send.poll_reset(cx)) => return Err(gone(reset)),
                }
                buf.reserve(want);
                let n = match rd.try_read_buf(&mut (&mut buf).limit(want)) {
                    Ok(n) => n,
                    // Nothing to read after all: wait holding no buffer, so an idle tunnel
                    // costs no read buffer (everything read so far has been sent).
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        buf = BytesMut::new();
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if n == want {
                    want = (want * 2).min(MAX_READ);
                }
                if n == 0 {
                    send.send_data(Bytes::new(), true)
                        .map_err(io::Error::other)?;
                    // Our half is done; keep watching until the peer's is.
                    return tokio::select! {
                        biased;
                        () = downstream_done.notified() => Ok::<_, io::Error>(()),
                        reset = poll_fn(|cx| send.poll_reset(cx)) => Err(gone(reset)),
                    };
                }
                while !buf.is_empty() {
                    send.reserve_capacity(buf.len());
                    let granted = poll_fn(|cx| send.poll_capacity(cx))
                        .await
                        .ok_or_else(|| io::Error::from(io::ErrorKind::BrokenPipe))?
                        .map_err(io::Error::other)?;
                    let chunk = buf.split_to(granted.min(buf.len()));
                    sent += chunk.len() as u64;
                    send.send_data(chunk.freeze(), false)
                        .map_err(io::Error::other)?;
                }
            }
        };
        let downstream = async {
            while let Some(chunk) = recv.data().await {
                let chunk = chunk.map_err(io::Error::other)?;
                wr.write_all(&chunk).await?;
                received += chunk.len() as u64;
                recv.flow_control()
                    .release_capacity(chunk.len())
                    .map_err(io::Error::other)?;
            }
            let shut = wr.shutdown().await;
            downstream_done.notify_one();
            shut
        };
        let result = tokio::try_join!(upstream, downstream);
        let error = result.err();
        if error.is_some() {
            self.send.send_reset(h2::Reason::CANCEL);
        }
        Transfer {
            sent,
            received,
            error,
        }
    }
}

/// The error a splice ends with when the peer reset the stream or its connection is gone.
fn gone(reset: Result<h2::Reason, h2::Error>) -> io::Error {
    let why = match reset {
        Ok(reason) => format!("the peer reset the stream ({reason})"),
        Err(e) => format!("the HBONE connection is gone ({e})"),
    };
    io::Error::new(io::ErrorKind::ConnectionReset, why)
}

/// Copies bytes both ways between two TCP sockets, with half-close, counting as [`Transfer`]
/// does (`sent` is `local` → `remote`).
pub async fn splice_tcp(local: TcpStream, remote: TcpStream) -> Transfer {
    let (mut local_rd, mut local_wr) = local.into_split();
    let (mut remote_rd, mut remote_wr) = remote.into_split();
    let (mut sent, mut received) = (0u64, 0u64);
    let up = async {
        sent = tokio::io::copy(&mut local_rd, &mut remote_wr).await?;
        remote_wr.shutdown().await
    };
    let down = async {
        received = tokio::io::copy(&mut remote_rd, &mut local_wr).await?;
        local_wr.shutdown().await
    };
    let error = tokio::try_join!(up, down).err();
    Transfer {
        sent,
        received,
        error,
    }
}

/// Applies the wire contract's socket options (`docs/protocol-hbone.md`) to a socket that
/// crosses the network
/// (the HBONE connection). Sockets to apps in the same pod only get TCP_NODELAY: keepalive could
/// never fire there, and each option is a syscall on every connection.
pub fn tune(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(180))
        .with_interval(Duration::from_secs(180))
        .with_retries(9);
    socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::net::TcpListener;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::test_util::LoopbackDialer;

    /// Accepts every stream and holds it open for a while.
    struct Hold;

    impl Handler for Hold {
        async fn handle(&self, incoming: Incoming) {
            let stream = incoming.accept();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(stream);
        }
    }

    /// A loopback HBONE server presenting `b`, counting the TCP connections it accepts.
    struct Fixture {
        certs: Arc<crate::identity::Cache>,
        src: Id,
        dst: Id,
        peer: SocketAddr,
        accepted: Arc<AtomicUsize>,
        /// One drain token per accepted connection, as if each had its own daemon.
        drains: Arc<std::sync::Mutex<Vec<CancellationToken>>>,
    }

    impl Fixture {
        async fn start(test: &str) -> Self {
            let certs = crate::test_util::Ca::new(test).certs();
            let (src, dst) = (
                Id::new("cluster.local", "a", "a").unwrap(),
                Id::new("cluster.local", "b", "b").unwrap(),
            );
            certs.ensure(&src).await.unwrap();
            certs.ensure(&dst).await.unwrap();
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let peer = listener.local_addr().unwrap();
            let server = Arc::new(Server::new(
                crate::tls::server_config(&certs, &dst, Default::default()).unwrap(),
                Arc::new(Hold),
            ));
            let accepted = Arc::new(AtomicUsize::new(0));
            let drains = Arc::new(std::sync::Mutex::new(Vec::new()));
            let (counter, tokens) = (accepted.clone(), drains.clone());
            tokio::spawn(async move {
                loop {
                    let (tcp, from) = listener.accept().await.unwrap();
                    counter.fetch_add(1, Ordering::SeqCst);
                    let (server, drain) = (server.clone(), CancellationToken::new());
                    tokens.lock().unwrap().push(drain.clone());
                    tokio::spawn(async move { server.serve(tcp, from, drain).await });
                }
            });
            Self {
                certs,
                src,
                dst,
                peer,
                accepted,
                drains,
            }
        }

        /// Drains the connections accepted so far (their daemon is being replaced).
        fn drain_existing(&self) {
            self.drains
                .lock()
                .unwrap()
                .iter()
                .for_each(CancellationToken::cancel);
        }

        fn request(&self, peer: SocketAddr) -> Request<'_> {
            Request {
                src: &self.src,
                src_ip: peer.ip(),
                dst: &self.dst,
                peer: PeerAddr(peer),
                target: TargetAddr(peer),
                dialer: &LoopbackDialer,
            }
        }

        fn accepted(&self) -> usize {
            self.accepted.load(Ordering::SeqCst)
        }
    }

    #[tokio::test]
    async fn an_idle_connection_closes_and_leaves_no_pool_entry() {
        let f = Fixture::start("pool-idle").await;
        let client = Client::with_idle_timeout(f.certs.clone(), Duration::from_millis(200));
        let first = client.connect(f.request(f.peer)).await.unwrap();
        // A live stream keeps the connection however long it lasts.
        tokio::time::sleep(Duration::from_millis(600)).await;
        let second = client.connect(f.request(f.peer)).await.unwrap();
        assert_eq!((f.accepted(), client.pooled_keys()), (1, 1));
        drop((first, second));

        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while client.pooled_keys() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "idle connection still pooled"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _third = client.connect(f.request(f.peer)).await.unwrap();
        assert_eq!(
            f.accepted(),
            2,
            "the idle connection was reused after it closed"
        );

        // A peer that cannot be reached leaves no entry behind.
        let nobody = SocketAddr::from(([127, 0, 0, 1], 1));
        assert!(matches!(
            client.connect(f.request(nobody)).await,
            Err(Error::Connect { .. })
        ));
        assert_eq!(client.pooled_keys(), 1);
    }

    #[tokio::test]
    async fn a_draining_peer_keeps_its_streams_and_new_ones_go_to_a_new_connection() {
        let f = Fixture::start("pool-goaway").await;
        let client = Client::new(f.certs.clone());
        let held = client.connect(f.request(f.peer)).await.unwrap();
        f.drain_existing();
        // Whether the GOAWAY arrives before or after this stream is sent, it succeeds.
        let mut streams = Vec::new();
        for _ in 0..3 {
            streams.push(client.connect(f.request(f.peer)).await.unwrap());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(f.accepted(), 2, "one new connection after the GOAWAY");
        assert_eq!(client.pooled_keys(), 1);
        drop((held, streams));
    }

    #[tokio::test]
    async fn concurrent_streams_share_one_connection_until_it_holds_100() {
        let f = Fixture::start("pool").await;
        let (certs, src, dst, peer, accepted) = (
            f.certs.clone(),
            f.src.clone(),
            f.dst.clone(),
            f.peer,
            f.accepted.clone(),
        );
        let client = Arc::new(Client::new(certs.clone()));
        let tasks: Vec<_> = (0..150)
            .map(|_| {
                let (client, src, dst) = (client.clone(), src.clone(), dst.clone());
                tokio::spawn(async move {
                    let request = Request {
                        src: &src,
                        src_ip: peer.ip(),
                        dst: &dst,
                        peer: PeerAddr(peer),
                        target: TargetAddr(peer),
                        dialer: &LoopbackDialer,
                    };
                    client.connect(request).await
                })
            })
            .collect();
        let mut streams = Vec::new();
        for task in tasks {
            streams.push(task.await.unwrap().unwrap());
        }
        assert_eq!(streams.len(), 150);
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "150 streams need exactly two connections"
        );
    }
}
