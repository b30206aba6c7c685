//! HBONE server: terminates mTLS, accepts CONNECT streams and hands each to a [`Handler`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::RecvStream;
use h2::server::SendResponse;
use http::StatusCode;
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, debug_span};

use super::{
    CONNECT_TIMEOUT, CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_HEADER_LIST, Refusal,
    SERVER_MAX_STREAMS, STREAM_WINDOW, Stream, TargetAddr,
};
use crate::identity::Id;
use crate::tls;

/// Decides what to do with a well-formed CONNECT request: refuse it with a status, or accept it
/// and carry its bytes.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, incoming: Incoming) -> impl Future<Output = ()> + Send;
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
        if let Err(e) = super::tune(&tcp) {
            debug!(error = &e as &dyn std::error::Error, "socket options");
        }
        let tls = match tokio::time::timeout(CONNECT_TIMEOUT, self.tls.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                debug!(error = &e as &dyn std::error::Error, "TLS handshake failed");
                return;
            }
            Err(_) => {
                debug!("TLS handshake timed out");
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
        self.serve_h2(tls, peer_addr, peer_id, drain).await;
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
        let mut conn = match h2::server::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .max_concurrent_streams(SERVER_MAX_STREAMS)
            .max_header_list_size(MAX_HEADER_LIST)
            .handshake::<_, Bytes>(io)
            .await
        {
            Ok(conn) => conn,
            Err(e) => {
                debug!(
                    error = &e as &dyn std::error::Error,
                    "HTTP/2 handshake failed"
                );
                return;
            }
        };
        let mut draining = false;
        loop {
            let next = tokio::select! {
                next = conn.accept() => next,
                () = drain.cancelled(), if !draining => {
                    draining = true;
                    conn.graceful_shutdown();
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
                    let incoming = parse(request, respond, peer_addr, &peer_id);
                    if let Some(incoming) = incoming {
                        let handler = self.handler.clone();
                        tokio::spawn(
                            async move { handler.handle(incoming).await }.in_current_span(),
                        );
                    }
                }
            }
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
