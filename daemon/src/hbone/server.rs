//! HBONE server: terminates mTLS, accepts CONNECT streams and hands each to a [`Handler`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::StatusCode;
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span};

use super::{
    CONNECT_TIMEOUT, CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_HEADER_LIST, PING_INTERVAL,
    PING_TIMEOUT, Refusal, SERVER_IDLE_TIMEOUT, SERVER_MAX_STREAMS, STREAM_WINDOW, Stream,
    TargetAddr,
};
use crate::identity::Id;
use crate::tls;

/// Decides what to do with a well-formed CONNECT request: refuse it with a status, or accept it
/// and carry its bytes.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, incoming: Incoming) -> impl Future<Output = ()> + Send;

    /// A peer's TLS handshake failed (`error` is `None` when it timed out).
    fn handshake_failed(
        &self,
        _peer: SocketAddr,
        _failure: tls::HandshakeFailure,
        _error: Option<&std::io::Error>,
    ) {
    }
}

/// A CONNECT request whose method and authority parsed, from an authenticated peer.
pub struct Incoming {
    /// The TCP source of the tunnel connection: the client pod's address.
    pub peer_addr: SocketAddr,
    /// The identity the peer proved in the handshake.
    pub peer_id: Id,
    /// The `:authority` the peer asked for.
    pub target: TargetAddr,
    respond: SendResponse<Bytes>,
    recv: RecvStream,
}

impl Incoming {
    /// Answers with the refusal's status, which ends the stream.
    pub fn refuse(mut self, refusal: Refusal) {
        let response = http::Response::builder()
            .status(refusal.status())
            .body(())
            .expect("static response");
        // The peer may have gone already; nothing else to do then.
        let _ = self.respond.send_response(response, true);
    }

    /// Answers 200 and returns the stream to carry bytes on.
    pub fn accept(mut self) -> Result<Stream, h2::Error> {
        let response = http::Response::builder()
            .status(StatusCode::OK)
            .body(())
            .expect("static response");
        let send = self.respond.send_response(response, false)?;
        Ok(Stream {
            send,
            recv: self.recv,
            _slot: None,
        })
    }
}

/// Serves HBONE connections for one local identity.
pub struct Server<H> {
    tls: tokio_rustls::TlsAcceptor,
    handler: Arc<H>,
}

impl<H: Handler> Server<H> {
    pub fn new(config: Arc<ServerConfig>, handler: Arc<H>) -> Self {
        Self {
            tls: config.into(),
            handler,
        }
    }

    /// Serves one accepted TCP connection until the peer leaves or `drain` fires, after which
    /// the peer gets GOAWAY and open streams may finish.
    pub async fn serve(&self, tcp: TcpStream, peer_addr: SocketAddr, drain: CancellationToken) {
        let span = debug_span!("hbone inbound", peer.addr = %peer_addr);
        self.serve_inner(tcp, peer_addr, drain)
            .instrument(span)
            .await;
    }

    async fn serve_inner(&self, tcp: TcpStream, peer_addr: SocketAddr, drain: CancellationToken) {
        // TLS, the HTTP/2 preface and the first request all within this from the accept: a
        // peer that connects and then says nothing holds a socket for no longer.
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        if let Err(e) = super::tune(&tcp) {
            debug!(error = &e as &dyn std::error::Error, "socket options");
        }
        let tls = match tokio::time::timeout_at(deadline, self.tls.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let failure = tls::HandshakeFailure::of(&e);
                self.handler.handshake_failed(peer_addr, failure, Some(&e));
                return;
            }
            Err(_) => {
                let failure = tls::HandshakeFailure::Timeout;
                self.handler.handshake_failed(peer_addr, failure, None);
                return;
            }
        };
        let session = tls.get_ref().1;
        let peer_id = session
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(tls::identity_of);
        // The verifier already insisted on an identity; this guards against a config slip.
        let Some(peer_id) = peer_id else { return };
        if session.alpn_protocol() != Some(tls::ALPN_H2) {
            debug!("peer did not negotiate h2");
            return;
        }
        self.serve_h2_until(tls, peer_addr, peer_id, drain, deadline)
            .await;
    }

    /// Serves HTTP/2 CONNECT requests on `io`, a connection whose peer has already proved
    /// `peer_id` (after TLS, or in a fuzz target that feeds raw frames).
    pub async fn serve_h2<IO>(
        &self,
        io: IO,
        peer_addr: SocketAddr,
        peer_id: Id,
        drain: CancellationToken,
    ) where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        self.serve_h2_until(io, peer_addr, peer_id, drain, deadline)
            .await;
    }

    /// [`Self::serve_h2`] with the preface and the first request due by `deadline`. Then the
    /// peer is kept honest: PINGs every [`PING_INTERVAL`] must be answered within
    /// [`PING_TIMEOUT`], and a connection without a stream for [`SERVER_IDLE_TIMEOUT`] is sent
    /// GOAWAY.
    async fn serve_h2_until<IO>(
        &self,
        io: IO,
        peer_addr: SocketAddr,
        peer_id: Id,
        drain: CancellationToken,
        deadline: Instant,
    ) where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let handshake = h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_concurrent_streams(SERVER_MAX_STREAMS)
            .max_header_list_size(MAX_HEADER_LIST)
            .handshake::<_, Bytes>(io);
        let mut conn = match tokio::time::timeout_at(deadline, handshake).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                debug!(
                    error = &e as &dyn std::error::Error,
                    "HTTP/2 handshake failed"
                );
                return;
            }
            Err(_) => {
                debug!("no HTTP/2 preface before the deadline");
                return;
            }
        };
        let keepalive = keepalive(conn.ping_pong());
        tokio::pin!(keepalive);
        let active = Arc::new(AtomicUsize::new(0));
        let (mut seen, mut busy_at) = (false, Instant::now());
        let mut ticks = tokio::time::interval(Duration::from_secs(1));
        let mut draining = false;
        loop {
            let next = tokio::select! {
                next = conn.accept() => next,
                () = drain.cancelled(), if !draining => {
                    draining = true;
                    conn.graceful_shutdown();
                    continue;
                }
                () = &mut keepalive => {
                    debug!("peer stopped answering PINGs");
                    break;
                }
                _ = ticks.tick() => {
                    let now = Instant::now();
                    if active.load(Ordering::Relaxed) > 0 {
                        busy_at = now;
                    } else if !seen && now >= deadline {
                        debug!("no request before the deadline");
                        break;
                    } else if seen && !draining && now - busy_at >= SERVER_IDLE_TIMEOUT {
                        debug!("idle; closing");
                        draining = true;
                        conn.graceful_shutdown();
                    }
                    continue;
                }
            };
            match next {
                None => break,
                Some(Err(e)) => {
                    debug!(error = &e as &dyn std::error::Error, "connection error");
                    break;
                }
                Some(Ok((request, respond))) => {
                    seen = true;
                    let incoming = parse(request, respond, peer_addr, &peer_id);
                    if let Some(incoming) = incoming {
                        let handler = self.handler.clone();
                        let open = Open::count(&active);
                        tokio::spawn(
                            async move {
                                handler.handle(incoming).await;
                                drop(open);
                            }
                            .in_current_span(),
                        );
                    }
                }
            }
        }
    }
}

/// One stream being handled, counted in the connection's `active` while it lives.
struct Open(Arc<AtomicUsize>);

impl Open {
    fn count(active: &Arc<AtomicUsize>) -> Self {
        active.fetch_add(1, Ordering::Relaxed);
        Self(active.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves once the peer fails to answer a PING within [`PING_TIMEOUT`] (or the connection
/// is gone); pends forever when PINGs cannot be sent.
async fn keepalive(ping: Option<h2::PingPong>) {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(PING_INTERVAL).await;
        match tokio::time::timeout(PING_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

/// The target of a well-formed HBONE request: `CONNECT` with an `ip:port` authority. Anything
/// else is answered 400.
pub fn connect_target(method: &http::Method, uri: &http::Uri) -> Option<TargetAddr> {
    if method != http::Method::CONNECT {
        return None;
    }
    let authority = uri.authority()?.as_str().parse::<SocketAddr>().ok()?;
    Some(TargetAddr(authority))
}

/// Checks what HBONE requires of every request and answers 400 otherwise.
fn parse(
    request: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer_addr: SocketAddr,
    peer_id: &Id,
) -> Option<Incoming> {
    let Some(target) = connect_target(request.method(), request.uri()) else {
        debug!(method = %request.method(), uri = %request.uri(), "bad CONNECT request");
        let response = http::Response::builder()
            .status(Refusal::BadRequest.status())
            .body(())
            .expect("static response");
        let _ = respond.send_response(response, true);
        return None;
    };
    Some(Incoming {
        peer_addr,
        peer_id: peer_id.clone(),
        target,
        respond,
        recv: request.into_body(),
    })
}
