//! The data plane: each wired pod's three listeners and what happens to their connections.
//!
//! Owns connection handling from accept to close: resolving destinations against the state
//! snapshot, asking policy, carrying bytes over HBONE or plain TCP, and the access log. Never
//! waits on the control plane and never touches netfilter: sockets come from
//! [`crate::redirect::Sockets`].

pub mod carried;
mod conn;
mod inbound;
mod open;
mod outbound;
pub mod tally;

pub use conn::{Direction, Outcome, Transport};

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Ports;
use crate::identity::{self, Id};
use crate::metrics::{self, Side};
use crate::redirect::{Listeners, Sockets};
use crate::state::Store;
use crate::tls::HandshakeFailure;
use crate::{hbone, tls};

/// A wired pod, as the data path needs it.
#[derive(Debug)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub identity: Id,
    pub ips: Vec<IpAddr>,
    pub sockets: Sockets,
    /// `namespace/name`, made once: every connection logs it.
    label: Arc<str>,
}

impl Pod {
    pub fn new(
        namespace: String,
        name: String,
        identity: Id,
        ips: Vec<IpAddr>,
        sockets: Sockets,
    ) -> Self {
        let label = format!("{namespace}/{name}").into();
        Self {
            namespace,
            name,
            identity,
            ips,
            sockets,
            label,
        }
    }

    /// `namespace/name`, for logs.
    pub fn label(&self) -> &str {
        &self.label
    }

    fn owns(&self, ip: IpAddr) -> bool {
        self.ips.contains(&ip)
    }
}

/// Shared by every pod's listeners.
pub struct Proxy {
    state: Arc<Store>,
    certs: Arc<identity::Cache>,
    hbone: hbone::Client,
    ports: Ports,
    /// Key exchanges offered and accepted on HBONE, both ways.
    key_exchange: tls::KeyExchange,
    /// Fires on daemon shutdown: listeners stop and HBONE peers get GOAWAY.
    drain: CancellationToken,
    /// Every connection task, so shutdown can wait for them.
    tasks: TaskTracker,
    /// Round-robin position for picking Service endpoints.
    endpoint_turn: std::sync::atomic::AtomicUsize,
    /// Connections refused before any routing, counted and logged at a bounded rate.
    refusals: Refusals,
    /// Inbound HBONE connections held, against [`Limits`].
    peers: Arc<Peers>,
    /// Inbound HBONE streams held, against [`Limits`].
    streams: Arc<Peers>,
    /// Inbound connections carried now, for policy changes to decide again.
    open: Arc<open::Open>,
    /// Every connection carried now, for the admin API.
    carried: Arc<carried::Carried>,
    /// How inbound connections arrived over the last minutes, for `culvert check`.
    arrivals: Arc<tally::Tally>,
    /// Istio's TCP metrics, which every connection counts in.
    tcp: Arc<metrics::Tcp>,
    /// When a handshake failure of each side and cause was last logged.
    handshakes_logged: std::sync::Mutex<HashMap<(Side, HandshakeFailure), tokio::time::Instant>>,
}

/// Why a connection was refused before anything else was done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It would have come back to one of the proxy's own listeners.
    Loop,
    /// The kernel knew no original destination for it (it was not redirected).
    NoOriginalDst,
    /// An HBONE connection beyond the node's or its peer's cap.
    HboneCapacity,
}

/// Caps on inbound HBONE: a flood from one peer, or from everywhere, meets a clean refusal
/// (a reset at accept for a connection, 503 for a stream) instead of exhausting descriptors
/// and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Inbound HBONE connections on this node, all pods together.
    pub connections: usize,
    /// Inbound HBONE connections from one peer address (one client pod).
    pub connections_per_peer: usize,
    /// Inbound HBONE streams (tunnels) on this node; each holds an upstream socket.
    pub streams: usize,
    /// Inbound HBONE streams from one peer address.
    pub streams_per_peer: usize,
}

/// What is held against one pair of caps, in all and per peer address.
#[derive(Debug)]
pub(crate) struct Peers {
    total: usize,
    per_peer: usize,
    held: std::sync::Mutex<(usize, HashMap<IpAddr, usize>)>,
}

impl Peers {
    /// Caps of `total` in all and `per_peer` from any one address.
    pub(crate) fn new(total: usize, per_peer: usize) -> Arc<Self> {
        Arc::new(Self {
            total,
            per_peer,
            held: Default::default(),
        })
    }

    /// A place for one more connection from `ip`, if the caps allow it.
    pub(crate) fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<OwnedPeerSlot> {
        let mut held = self.held.lock().expect("peers lock poisoned");
        let (total, per_peer) = &mut *held;
        let from_ip = per_peer.entry(ip).or_default();
        if *total >= self.total || *from_ip >= self.per_peer {
            if *from_ip == 0 {
                per_peer.remove(&ip);
            }
            return None;
        }
        *from_ip += 1;
        *total += 1;
        Some(OwnedPeerSlot {
            peers: self.clone(),
            ip,
        })
    }

    fn release(&self, ip: IpAddr) {
        let mut held = self.held.lock().expect("peers lock poisoned");
        let (total, per_peer) = &mut *held;
        *total -= 1;
        if let Some(n) = per_peer.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per_peer.remove(&ip);
            }
        }
    }
}

/// One admitted connection; gives its place back when dropped.
pub(crate) struct OwnedPeerSlot {
    peers: Arc<Peers>,
    ip: IpAddr,
}

impl Drop for OwnedPeerSlot {
    fn drop(&mut self) {
        self.peers.release(self.ip);
    }
}

/// Counts early refusals and logs them at most once a second each: a hostile app can cause
/// any number of them, and the log must not become the next resource it exhausts.
#[derive(Debug, Default)]
struct Refusals {
    loops: AtomicU64,
    no_original_dst: AtomicU64,
    hbone_capacity: AtomicU64,
    /// When each kind was last logged.
    logged: std::sync::Mutex<[Option<tokio::time::Instant>; 3]>,
}

impl Refusals {
    fn note(&self, refusal: Refusal, log: impl FnOnce()) {
        let (counter, slot) = match refusal {
            Refusal::Loop => (&self.loops, 0),
            Refusal::NoOriginalDst => (&self.no_original_dst, 1),
            Refusal::HboneCapacity => (&self.hbone_capacity, 2),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let now = tokio::time::Instant::now();
        let mut logged = self.logged.lock().expect("refusals lock poisoned");
        if logged[slot].is_none_or(|at| now.duration_since(at) >= Duration::from_secs(1)) {
            logged[slot] = Some(now);
            drop(logged);
            log();
        }
    }
}

impl Proxy {
    pub fn new(
        state: Arc<Store>,
        certs: Arc<identity::Cache>,
        ports: Ports,
        key_exchange: tls::KeyExchange,
        limits: Limits,
        tcp: Arc<metrics::Tcp>,
    ) -> Self {
        Self {
            state,
            hbone: hbone::Client::new(certs.clone()).key_exchange(key_exchange),
            key_exchange,
            certs,
            ports,
            drain: CancellationToken::new(),
            tasks: TaskTracker::new(),
            endpoint_turn: Default::default(),
            refusals: Refusals::default(),
            peers: Peers::new(limits.connections, limits.connections_per_peer),
            streams: Peers::new(limits.streams, limits.streams_per_peer),
            open: Arc::default(),
            carried: Arc::default(),
            arrivals: Arc::default(),
            tcp,
            handshakes_logged: Default::default(),
        }
    }

    /// Counts a failed TLS handshake with an HBONE peer and logs it, at most once a second for
    /// each side and cause: a hostile peer can fail any number of handshakes.
    fn handshake_failed(&self, side: Side, failure: HandshakeFailure, log: impl FnOnce()) {
        self.tcp.handshake_failed(side, failure);
        let now = tokio::time::Instant::now();
        let mut logged = self.handshakes_logged.lock().expect("log times poisoned");
        let last = logged
            .entry((side, failure))
            .or_insert(now - Duration::from_secs(1));
        if now.duration_since(*last) >= Duration::from_secs(1) {
            *last = now;
            drop(logged);
            log();
        }
    }

    /// The workloads at both ends of an inbound connection to `pod` from `src` for `dst`: the
    /// source is the workload the cluster view has at that address, provided it is the
    /// identity the source proved (when it proved one); the Service is one that `dst` is an
    /// endpoint of, as Istio's node proxy guesses it.
    fn inbound_ends(
        &self,
        pod: &Pod,
        src: SocketAddr,
        dst: SocketAddr,
        peer: Option<&Id>,
    ) -> conn::Ends {
        let snapshot = self.state.snapshot();
        let source = snapshot
            .workload_by_ip(src.ip())
            .filter(|w| peer.is_none_or(|id| w.identity == *id));
        conn::Ends::new(
            &snapshot,
            source,
            snapshot.workload(&pod.namespace, &pod.name),
            snapshot.endpoint_service(dst),
        )
    }

    /// Until `stop`: whenever the snapshot's policies change, decides every open inbound
    /// connection again and closes the ones now denied (each HBONE stream on its own).
    pub async fn follow_policies(self: Arc<Self>, stop: CancellationToken) {
        let mut changes = self.state.subscribe();
        let mut policies = changes.borrow_and_update().policies.clone();
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                changed = changes.changed() => if changed.is_err() { return },
            }
            let snapshot = changes.borrow_and_update().clone();
            if Arc::ptr_eq(&snapshot.policies, &policies) {
                continue;
            }
            policies = snapshot.policies.clone();
            let open = self.open.len();
            let revoked = self.open.recheck(&snapshot);
            info!(
                open,
                revoked, "policies changed: open connections decided again"
            );
        }
    }

    /// How inbound connections arrived over the last minutes.
    pub fn arrivals(&self) -> tally::Summary {
        self.arrivals.summary()
    }

    /// Every connection carried now, oldest first.
    pub fn connections(&self) -> Vec<carried::Connection> {
        self.carried.list()
    }

    /// HBONE connections and streams held now: `(outbound, inbound)` pairs of
    /// `(connections, streams)`.
    pub fn hbone_load(&self) -> [(usize, usize); 2] {
        let held = |peers: &Peers| peers.held.lock().expect("peers lock poisoned").0;
        [self.hbone.load(), (held(&self.peers), held(&self.streams))]
    }

    /// How many captured connections were refused for `refusal` since start.
    pub fn refused(&self, refusal: Refusal) -> u64 {
        match refusal {
            Refusal::Loop => self.refusals.loops.load(Ordering::Relaxed),
            Refusal::NoOriginalDst => self.refusals.no_original_dst.load(Ordering::Relaxed),
            Refusal::HboneCapacity => self.refusals.hbone_capacity.load(Ordering::Relaxed),
        }
    }

    /// Starts serving a pod's listeners until `stop` (pod removed) or daemon drain.
    pub fn serve_pod(
        self: &Arc<Self>,
        pod: Arc<Pod>,
        listeners: Listeners,
        stop: &CancellationToken,
    ) -> Result<(), rustls::Error> {
        let server_config = tls::server_config(&self.certs, &pod.identity, self.key_exchange)?;
        let handler = Arc::new(inbound::Hbone {
            proxy: self.clone(),
            pod: pod.clone(),
        });
        let hbone_server = Arc::new(hbone::Server::new(server_config, handler));

        let (proxy, p) = (self.clone(), pod.clone());
        self.accept_loop(listeners.outbound, stop, move |stream, peer| {
            outbound::accepted(proxy.clone(), p.clone(), stream, peer)
        });
        let (proxy, p) = (self.clone(), pod);
        self.accept_loop(listeners.inbound_plaintext, stop, move |stream, peer| {
            inbound::plaintext(proxy.clone(), p.clone(), stream, peer)
        });
        // The pod's HBONE connections get GOAWAY when the daemon drains, and also when the pod
        // stops being served this way (released, or now under another identity).
        let drain = self.drain.child_token();
        let pod_stopped = drain.clone();
        let stopped = stop.clone();
        tokio::spawn(async move {
            stopped.cancelled().await;
            pod_stopped.cancel();
        });
        let proxy = self.clone();
        self.accept_loop(listeners.hbone, stop, move |stream, peer| {
            let (server, drain) = (hbone_server.clone(), drain.clone());
            let admitted = proxy.peers.admit(peer.ip());
            let proxy = proxy.clone();
            async move {
                let Some(_slot) = admitted else {
                    proxy.refusals.note(Refusal::HboneCapacity, || {
                        tracing::warn!(peer.addr = %peer,
                            "HBONE connection refused: the node or this peer holds its maximum")
                    });
                    let _ = reset(stream);
                    return;
                };
                server.serve(stream, peer, drain).await;
            }
        });
        Ok(())
    }

    /// Carries one outbound connection of `pod`'s app, from `src` to its original destination
    /// `dst`: what the pod's outbound listener does with every connection it accepts. Public
    /// so that tests without redirection (no root) can hand connections in directly.
    pub async fn outbound(
        self: &Arc<Self>,
        pod: Arc<Pod>,
        app: TcpStream,
        src: SocketAddr,
        dst: SocketAddr,
    ) {
        let tracked = self
            .tasks
            .track_future(outbound::handle(self.clone(), pod, app, src, dst));
        tracked.await;
    }

    /// Stops accepting on every pod, sends GOAWAY to HBONE peers, and waits up to `timeout`
    /// for open connections to finish. Returns how many were still open.
    pub async fn drain(&self, timeout: Duration) -> usize {
        self.drain.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(timeout, self.tasks.wait()).await;
        self.tasks.len()
    }

    fn accept_loop<F, Fut>(&self, listener: TcpListener, stop: &CancellationToken, handle: F)
    where
        F: Fn(TcpStream, SocketAddr) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (stop, drain, tasks) = (stop.clone(), self.drain.clone(), self.tasks.clone());
        self.tasks.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = stop.cancelled() => return,
                    () = drain.cancelled() => {
                        for (stream, peer) in backlog(listener) {
                            tasks.spawn(handle(stream, crate::redirect::canonical(peer)));
                        }
                        return;
                    }
                };
                match accepted {
                    Ok((stream, peer)) => {
                        tasks.spawn(handle(stream, crate::redirect::canonical(peer)));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        warn!(error = &e as &dyn std::error::Error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
}

/// The connections the kernel has queued on a listener about to close. Closing would reset
/// them: during a rolling update the new daemon listens on the same ports (`SO_REUSEPORT`),
/// but the kernel does not move a closing listener's queue to it (`tcp_migrate_req` cannot be
/// set inside pods). Taking them first leaves only the instant between the last accept and
/// the close.
fn backlog(listener: TcpListener) -> Vec<(TcpStream, SocketAddr)> {
    // Non-blocking, as tokio left it.
    let Ok(listener) = listener.into_std() else {
        return Vec::new();
    };
    let mut queued = Vec::new();
    while let Ok((stream, peer)) = listener.accept() {
        let stream = stream
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(stream));
        if let Ok(stream) = stream {
            queued.push((stream, peer));
        }
    }
    queued
}

/// Copies between `client` and a dialled `upstream` and logs the outcome; when there is no
/// upstream, resets `client` and logs why.
async fn carry_plain<E>(
    record: conn::Record,
    client: TcpStream,
    upstream: Result<TcpStream, (Outcome, E)>,
) where
    E: std::error::Error + 'static,
{
    match upstream {
        Ok(upstream) => {
            let transfer = hbone::splice_tcp(client, upstream).await;
            record.carried(&transfer);
        }
        Err((outcome, e)) => {
            let _ = reset(client);
            record.failed(outcome, &e);
        }
    }
}

/// Refuses a plaintext connection with a TCP reset, so the client sees a clear refusal rather
/// than an orderly close it could mistake for an empty answer.
fn reset(stream: TcpStream) -> io::Result<()> {
    stream.set_zero_linger()?;
    drop(stream);
    Ok(())
}
