//! HBONE client: a pool of mTLS HTTP/2 connections and CONNECT streams over them.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use h2::client::SendRequest;
use rustls::pki_types::ServerName;
use tokio::net::TcpSocket;
use tracing::{Instrument, debug, debug_span};

use super::{
    CLIENT_MAX_STREAMS, CONNECT_TIMEOUT, CONNECTION_WINDOW, Error, MAX_FRAME_SIZE, PING_INTERVAL,
    PING_TIMEOUT, PeerAddr, STREAM_WINDOW, Stream, TargetAddr,
};
use crate::identity::{self, Id};
use crate::tls;

/// Creates the TCP socket a tunnel connection leaves from.
///
/// In-pod mode creates it inside the source pod's network namespace, so the connection carries
/// the pod's own address; HBONE itself does not care where sockets live.
pub trait Dialer: Send + Sync {
    fn socket(&self, peer: PeerAddr) -> io::Result<TcpSocket>;
}

/// One tunnel to open.
pub struct Request<'a> {
    /// Identity presented to the peer.
    pub src: &'a Id,
    /// Address the connection leaves from; part of the pool key, since sockets made in one pod's
    /// namespace must never carry another pod's traffic.
    pub src_ip: IpAddr,
    /// Identity the peer must prove.
    pub dst: &'a Id,
    pub peer: PeerAddr,
    pub target: TargetAddr,
    pub dialer: &'a dyn Dialer,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    src: Id,
    src_ip: IpAddr,
    dst: Id,
    peer: PeerAddr,
}

/// Opens CONNECT streams, reusing pooled connections.
pub struct Client {
    certs: Arc<identity::Cache>,
    pool: Mutex<HashMap<Key, Arc<Slot>>>,
}

/// The connections of one pool key. `opening` serialises connection set-up so that concurrent
/// callers wait for one new connection instead of each opening their own.
#[derive(Default)]
struct Slot {
    opening: tokio::sync::Mutex<()>,
    conns: Mutex<Vec<Conn>>,
}

#[derive(Clone)]
struct Conn {
    send: SendRequest<Bytes>,
    /// Open streams, or [`CLOSED`] once the connection is gone.
    streams: Arc<AtomicUsize>,
}

/// Stream count of a connection that takes no more streams.
const CLOSED: usize = usize::MAX / 2;

/// Counts one stream against its connection until dropped.
pub(crate) struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Conn {
    /// Reserves a stream if the connection is alive and below the per-connection limit.
    fn reserve(&self) -> Option<StreamSlot> {
        self.streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < CLIENT_MAX_STREAMS).then_some(n + 1)
            })
            .ok()
            .map(|_| StreamSlot(self.streams.clone()))
    }
}

impl Slot {
    fn reserve(&self) -> Option<(Conn, StreamSlot)> {
        let mut conns = self.conns.lock().expect("pool lock poisoned");
        conns.retain(|c| c.streams.load(Ordering::Acquire) < CLOSED);
        conns
            .iter()
            .find_map(|c| c.reserve().map(|slot| (c.clone(), slot)))
    }
}

impl Client {
    pub fn new(certs: Arc<identity::Cache>) -> Self {
        Self {
            certs,
            pool: Mutex::default(),
        }
    }

    /// Opens a CONNECT stream to `req.target` through `req.peer`. Answers only once the peer
    /// has replied 200, i.e. its policy allowed the connection and its upstream connect worked.
    pub async fn connect(&self, req: Request<'_>) -> Result<Stream, Error> {
        let (conn, slot) = self.checkout(&req).await?;
        let peer = req.peer;
        let http2 = |source| Error::Http2 { peer, source };
        let mut send = conn.send.ready().await.map_err(http2)?;
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(req.target.to_string())
            .body(())
            .expect("a socket address is a valid authority");
        let (response, send_stream) = send.send_request(request, false).map_err(http2)?;
        let response = response.await.map_err(http2)?;
        if response.status() != http::StatusCode::OK {
            return Err(Error::Refused {
                target: req.target,
                status: response.status(),
            });
        }
        Ok(Stream {
            send: send_stream,
            recv: response.into_body(),
            _slot: Some(slot),
        })
    }

    async fn checkout(&self, req: &Request<'_>) -> Result<(Conn, StreamSlot), Error> {
        let key = Key {
            src: req.src.clone(),
            src_ip: req.src_ip,
            dst: req.dst.clone(),
            peer: req.peer,
        };
        let slot = self
            .pool
            .lock()
            .expect("pool lock poisoned")
            .entry(key)
            .or_default()
            .clone();
        if let Some(found) = slot.reserve() {
            return Ok(found);
        }
        let _opening = slot.opening.lock().await;
        if let Some(found) = slot.reserve() {
            return Ok(found);
        }
        let conn = self.open(req).await?;
        let reserved = conn.reserve().expect("a new connection has room");
        slot.conns
            .lock()
            .expect("pool lock poisoned")
            .push(conn.clone());
        Ok((conn, reserved))
    }

    async fn open(&self, req: &Request<'_>) -> Result<Conn, Error> {
        let peer = req.peer;
        let config = tls::client_config(&self.certs, req.src, req.dst).map_err(Error::Tls)?;
        if self.certs.get(req.src).is_none() {
            return Err(Error::NoCertificate {
                id: req.src.clone(),
            });
        }
        let connect = |source| Error::Connect { peer, source };
        let socket = req.dialer.socket(peer).map_err(connect)?;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(peer))
            .await
            .map_err(|_| connect(io::ErrorKind::TimedOut.into()))?
            .map_err(connect)?;
        super::tune(&tcp).map_err(connect)?;

        let handshake =
            tokio_rustls::TlsConnector::from(config).connect(ServerName::from(peer.ip()), tcp);
        let tls = match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
            Err(_) => {
                return Err(Error::Handshake {
                    peer,
                    source: io::ErrorKind::TimedOut.into(),
                });
            }
            Ok(Err(e)) => return Err(handshake_error(peer, e)),
            Ok(Ok(tls)) => tls,
        };
        if tls.get_ref().1.alpn_protocol() != Some(tls::ALPN_H2) {
            return Err(Error::Alpn { peer });
        }

        let (send, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME_SIZE)
            .enable_push(false)
            .handshake(tls)
            .await
            .map_err(|source| Error::Http2 { peer, source })?;
        let streams = Arc::new(AtomicUsize::new(0));
        let ping = connection
            .ping_pong()
            .expect("ping_pong is taken once, here");
        let span = debug_span!("hbone connection", peer.addr = %peer, dst.id = %req.dst);
        let driver_streams = streams.clone();
        tokio::spawn(
            async move {
                tokio::select! {
                    result = connection => debug!(?result, "connection ended"),
                    why = keepalive(ping) => debug!(why, "connection dropped"),
                }
                // Refuse new streams from now on; live ones finish with errors of their own.
                driver_streams.fetch_add(CLOSED, Ordering::AcqRel);
            }
            .instrument(span),
        );
        Ok(Conn { send, streams })
    }
}

/// Pings every [`PING_INTERVAL`] and returns once a pong is [`PING_TIMEOUT`] late.
async fn keepalive(mut ping: h2::PingPong) -> &'static str {
    loop {
        tokio::time::sleep(PING_INTERVAL).await;
        match tokio::time::timeout(PING_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return "ping failed",
            Err(_) => return "no pong within the ping timeout",
        }
    }
}

/// Tells an identity mismatch (our verifier's verdict) apart from other handshake failures.
fn handshake_error(peer: PeerAddr, e: io::Error) -> Error {
    let mismatch = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|tls| match tls {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
                other.0.downcast_ref::<tls::IdentityMismatch>()
            }
            _ => None,
        });
    match mismatch {
        Some(m) => Error::IdentityMismatch {
            peer,
            got: m.got.clone(),
            want: m.want.clone(),
        },
        None => Error::Handshake { peer, source: e },
    }
}
