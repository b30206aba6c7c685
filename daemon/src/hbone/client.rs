//! HBONE client: a pool of mTLS HTTP/2 connections and CONNECT streams over them.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use rustls::pki_types::ServerName;
use tokio::net::TcpSocket;
use tracing::{Instrument, debug, debug_span};

use super::{
    CLIENT_MAX_STREAMS, CONNECT_TIMEOUT, CONNECTION_WINDOW, Error, MAX_FRAME_SIZE, PING_INTERVAL,
    PING_TIMEOUT, POOL_IDLE_TIMEOUT, PeerAddr, STREAM_WINDOW, Stream, TargetAddr,
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
    pool: Arc<Pool>,
    /// A connection that carried no stream for this long is closed.
    idle_timeout: Duration,
    key_exchange: tls::KeyExchange,
}

type Pool = Mutex<HashMap<Key, Arc<Slot>>>;

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
    load: Arc<Load>,
}

/// A connection's load, shared by the pool, its streams and its driver task.
#[derive(Default)]
struct Load {
    /// Open streams, or at least [`CLOSED`] once the connection takes no more.
    streams: AtomicUsize,
    /// Set when a stream is reserved; the driver clears it to tell an idle connection.
    used: AtomicBool,
}

/// Stream count of a connection that takes no more streams.
const CLOSED: usize = usize::MAX / 2;

impl Load {
    fn closed(&self) -> bool {
        self.streams.load(Ordering::Acquire) >= CLOSED
    }

    /// Refuses new streams from now on (idempotent).
    fn close(&self) {
        let _ = self
            .streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < CLOSED).then_some(n + CLOSED)
            });
    }
}

/// Counts one stream against its connection until dropped.
pub(crate) struct StreamSlot(Arc<Load>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Conn {
    /// Reserves a stream if the connection is alive and below the per-connection limit.
    fn reserve(&self) -> Option<StreamSlot> {
        self.load
            .streams
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < CLIENT_MAX_STREAMS).then_some(n + 1)
            })
            .ok()?;
        self.load.used.store(true, Ordering::Release);
        Some(StreamSlot(self.load.clone()))
    }
}

impl Slot {
    fn reserve(&self) -> Option<(Conn, StreamSlot)> {
        let mut conns = self.conns.lock().expect("pool lock poisoned");
        conns.retain(|c| !c.load.closed());
        conns
            .iter()
            .find_map(|c| c.reserve().map(|slot| (c.clone(), slot)))
    }
}

impl Client {
    pub fn new(certs: Arc<identity::Cache>) -> Self {
        Self::with_idle_timeout(certs, POOL_IDLE_TIMEOUT)
    }

    pub fn with_idle_timeout(certs: Arc<identity::Cache>, idle_timeout: Duration) -> Self {
        Self {
            certs,
            pool: Arc::default(),
            idle_timeout,
            key_exchange: tls::KeyExchange::default(),
        }
    }

    /// Offers the key exchanges of `kx` in new handshakes.
    pub fn key_exchange(mut self, kx: tls::KeyExchange) -> Self {
        self.key_exchange = kx;
        self
    }

    /// The pool's open connections and the streams they carry now.
    pub fn load(&self) -> (usize, usize) {
        let slots: Vec<Arc<Slot>> = {
            let pool = self.pool.lock().expect("pool lock poisoned");
            pool.values().cloned().collect()
        };
        let mut load = (0, 0);
        for slot in slots {
            let conns = slot.conns.lock().expect("pool lock poisoned");
            for conn in conns.iter().filter(|c| !c.load.closed()) {
                load.0 += 1;
                load.1 += conn.load.streams.load(Ordering::Acquire);
            }
        }
        load
    }

    /// Pool keys with connections (for tests and status).
    pub fn pooled_keys(&self) -> usize {
        self.pool.lock().expect("pool lock poisoned").len()
    }

    /// Opens a CONNECT stream to `req.target` through `req.peer`. Answers only once the peer
    /// has replied 200, i.e. its policy allowed the connection and its upstream connect worked.
    ///
    /// A peer that drains (a daemon being replaced) sends GOAWAY: its connection leaves the
    /// pool, and a stream it refused unprocessed is opened again, once, on a new connection,
    /// which reaches the daemon that replaces it.
    pub async fn connect(&self, req: Request<'_>) -> Result<Stream, Error> {
        match self.try_connect(&req).await {
            Err(Error::Http2 { source, .. }) if source.is_go_away() && source.is_remote() => {
                debug!(peer = %req.peer, "peer is going away; opening a new connection");
                self.try_connect(&req).await
            }
            result => result,
        }
    }

    async fn try_connect(&self, req: &Request<'_>) -> Result<Stream, Error> {
        let (conn, slot) = self.checkout(req).await?;
        let peer = req.peer;
        let http2 = |source: h2::Error| {
            if source.is_go_away() {
                conn.load.close();
            }
            Error::Http2 { peer, source }
        };
        let mut send = conn.send.clone().ready().await.map_err(http2)?;
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
        let slot = self
            .pool
            .lock()
            .expect("pool lock poisoned")
            .entry(key(req))
            .or_default()
            .clone();
        if let Some(found) = slot.reserve() {
            return Ok(found);
        }
        let opening = slot.opening.lock().await;
        if let Some(found) = slot.reserve() {
            return Ok(found);
        }
        let conn = match self.open(req).await {
            Ok(conn) => conn,
            Err(e) => {
                // Keep no entry for a peer that cannot be reached.
                drop(opening);
                drop(slot);
                forget_if_empty(&Arc::downgrade(&self.pool), &key(req));
                return Err(e);
            }
        };
        let reserved = conn.reserve().expect("a new connection has room");
        slot.conns
            .lock()
            .expect("pool lock poisoned")
            .push(conn.clone());
        Ok((conn, reserved))
    }

    async fn open(&self, req: &Request<'_>) -> Result<Conn, Error> {
        let peer = req.peer;
        let config = tls::client_config(&self.certs, req.src, req.dst, self.key_exchange)
            .map_err(Error::Tls)?;
        if self.certs.get(req.src).is_none() {
            return Err(Error::NoCertificate {
                id: req.src.clone(),
            });
        }
        let connect = |source| Error::Connect { peer, source };
        let socket = req.dialer.socket(peer).map_err(connect)?;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(peer.0))
            .await
            .map_err(|_| connect(io::ErrorKind::TimedOut.into()))?
            .map_err(connect)?;
        super::tune(&tcp).map_err(connect)?;

        let handshake =
            tokio_rustls::TlsConnector::from(config).connect(ServerName::from(peer.0.ip()), tcp);
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
        let load = Arc::new(Load::default());
        let ping = connection
            .ping_pong()
            .expect("ping_pong is taken once, here");
        let span = debug_span!("hbone connection", peer.addr = %peer, dst.identity = %req.dst);
        let (driver_load, idle_timeout) = (load.clone(), self.idle_timeout);
        let (pool, key) = (Arc::downgrade(&self.pool), key(req));
        tokio::spawn(
            async move {
                tokio::select! {
                    result = connection => debug!(?result, "connection ended"),
                    why = keepalive(ping, &driver_load, idle_timeout) => debug!(why, "connection dropped"),
                }
                // Refuse new streams from now on; live ones finish with errors of their own.
                driver_load.close();
                forget_if_empty(&pool, &key);
            }
            .instrument(span),
        );
        Ok(Conn { send, load })
    }
}

/// Pings every [`PING_INTERVAL`]; returns once a pong is [`PING_TIMEOUT`] late, or once the
/// connection carried no stream for `idle_timeout` (then it takes no more, atomically with the
/// check, so a stream can never be handed an idle connection that is going away).
async fn keepalive(mut ping: h2::PingPong, load: &Load, idle_timeout: Duration) -> &'static str {
    let tick = PING_INTERVAL.min(idle_timeout);
    let (mut idle, mut since_ping) = (Duration::ZERO, Duration::ZERO);
    loop {
        tokio::time::sleep(tick).await;
        let used = load.used.swap(false, Ordering::AcqRel);
        idle = if used || load.streams.load(Ordering::Acquire) > 0 {
            Duration::ZERO
        } else {
            idle + tick
        };
        if idle >= idle_timeout
            && load
                .streams
                .compare_exchange(0, CLOSED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return "idle";
        }
        since_ping += tick;
        if since_ping >= PING_INTERVAL {
            since_ping = Duration::ZERO;
            match tokio::time::timeout(PING_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return "ping failed",
                Err(_) => return "no pong within the ping timeout",
            }
        }
    }
}

/// Drops a pool key whose connections are all gone, unless a checkout is using it.
fn forget_if_empty(pool: &std::sync::Weak<Pool>, key: &Key) {
    let Some(pool) = pool.upgrade() else { return };
    let mut pool = pool.lock().expect("pool lock poisoned");
    let Some(slot) = pool.get(key) else { return };
    let empty = {
        let mut conns = slot.conns.lock().expect("pool lock poisoned");
        conns.retain(|c| !c.load.closed());
        conns.is_empty()
    };
    // The map holds one reference; any other is a checkout about to use the slot.
    if empty && Arc::strong_count(slot) == 1 {
        pool.remove(key);
    }
}

fn key(req: &Request<'_>) -> Key {
    Key {
        src: req.src.clone(),
        src_ip: req.src_ip,
        dst: req.dst.clone(),
        peer: req.peer,
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
