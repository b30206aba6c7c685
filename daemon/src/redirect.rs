//! In-pod capture: entering pod namespaces, the redirection rules, and the sockets the proxy
//! opens inside pods.
//!
//! Owns everything that touches a pod's network namespace or its netfilter rules. Does not
//! decide what traffic means (it hands accepted sockets and original destinations to the
//! proxy) and does not decide which pods are wired (that is `cni`'s registry, which drives it
//! through [`Capture`]).

pub mod netns;
pub mod rules;

use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::sys::socket::{getsockopt, sockopt};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

pub use netns::Netns;
pub use rules::Backend;

use crate::config::{Ports, RedirectChoice};

/// What wiring a pod does inside its network namespace, as the pod registry sees it. All
/// methods block (they enter namespaces and run `nft`): call them off the async workers.
///
/// [`Netfilter`] is the real thing. Tests without root use a stand-in that places a pod's
/// sockets on loopback addresses and keeps its "rules" in memory (`test_util::Loopback`).
pub trait Capture: Send + Sync + 'static {
    /// The backend's name, for logs and the pod list.
    fn name(&self) -> &'static str;
    /// Opens the network namespace at `path` (refusing anything that is not one) and returns
    /// the factory for sockets inside it; `ips` are the pod's addresses there.
    fn open(&self, path: &Path, ips: &[IpAddr]) -> io::Result<Sockets>;
    /// Installs the pod's redirection rules, replacing any earlier copy atomically.
    fn install(&self, sockets: &Sockets, spec: &rules::Spec) -> Result<(), rules::Error>;
    /// Removes the pod's redirection rules.
    fn remove(&self, sockets: &Sockets) -> Result<(), rules::Error>;
    /// Verifies that the rules are in place and the listeners listen.
    fn check(&self, sockets: &Sockets, ports: Ports) -> Result<(), Missing>;
    /// The host's network namespaces other than the daemon's, with their addresses: where
    /// running pods are found by IP when the daemon starts or a pod becomes enrolled.
    fn scan(&self) -> Vec<(PathBuf, Vec<IpAddr>)>;
    /// Whether two paths name one namespace (one may be a bind mount or link of the other).
    fn same_netns(&self, a: &Path, b: &Path) -> bool;
    /// The addresses configured inside the pod's namespace (loopback excluded).
    fn addresses(&self, sockets: &Sockets) -> io::Result<Vec<IpAddr>>;
    /// Makes the node's own TCP to these pod addresses (kubelet probes) arrive from the probe
    /// address, which the pods' rules let through: a STRICT pod still passes its probes.
    /// Replaces the previous set.
    fn probes(&self, pod_ips: &[IpAddr]) -> Result<(), rules::Error>;
    /// Whether the namespace the runtime registered at `path` is still there: the path still
    /// names the namespace these sockets live in. The daemon's own handle pins a namespace,
    /// so this asks about the runtime's, not ours.
    fn alive(&self, sockets: &Sockets, path: &Path) -> bool;
}

/// What [`Capture::check`] found missing.
#[derive(Debug, thiserror::Error)]
pub enum Missing {
    #[error("redirection rules are missing")]
    Rules,
    #[error("nothing listens on port {0}")]
    Listener(u16),
    #[error("inspecting the pod")]
    Inspect(#[source] io::Error),
    #[error("reading the rules")]
    Read(#[source] rules::Error),
}

/// Pods' network namespaces and nftables or iptables rules, for real.
#[derive(Debug)]
pub struct Netfilter {
    backend: Backend,
    /// Whether to install the host's probe SNAT (off where the daemon does not run in the
    /// node's network namespace, as in the kube test lab).
    probe_snat: bool,
    /// The daemon's own namespace, to return to after entering a pod's.
    home: Arc<std::fs::File>,
    /// Where the runtime keeps pod namespaces (searched, with /proc, by [`Capture::scan`]).
    netns_dirs: Vec<PathBuf>,
}

impl Netfilter {
    pub fn new(backend: Backend, netns_dirs: Vec<PathBuf>, probe_snat: bool) -> io::Result<Self> {
        Ok(Self {
            backend,
            probe_snat,
            home: netns::home()?,
            netns_dirs,
        })
    }
}

impl Capture for Netfilter {
    fn name(&self) -> &'static str {
        self.backend.name()
    }

    fn open(&self, path: &Path, _ips: &[IpAddr]) -> io::Result<Sockets> {
        let netns = Netns::open(path, self.home.clone())?;
        Ok(Sockets::new(Arc::new(netns)))
    }

    fn install(&self, sockets: &Sockets, spec: &rules::Spec) -> Result<(), rules::Error> {
        rules::apply(sockets.pod_netns()?, self.backend, spec)
    }

    fn remove(&self, sockets: &Sockets) -> Result<(), rules::Error> {
        rules::remove(sockets.pod_netns()?, self.backend)
    }

    fn check(&self, sockets: &Sockets, ports: Ports) -> Result<(), Missing> {
        let netns = sockets.pod_netns().map_err(Missing::Read)?;
        if !rules::present(netns, self.backend).map_err(Missing::Read)? {
            return Err(Missing::Rules);
        }
        let listening = listening_ports(netns).map_err(Missing::Inspect)?;
        for port in [ports.outbound, ports.inbound_plaintext, ports.hbone] {
            if !listening.contains(&port) {
                return Err(Missing::Listener(port));
            }
        }
        Ok(())
    }

    fn scan(&self) -> Vec<(PathBuf, Vec<IpAddr>)> {
        netns::scan(&self.netns_dirs, &self.home)
    }

    fn same_netns(&self, a: &Path, b: &Path) -> bool {
        netns::same(a, b)
    }

    fn addresses(&self, sockets: &Sockets) -> io::Result<Vec<IpAddr>> {
        let netns = sockets.pod_netns().map_err(io::Error::other)?;
        netns.addresses()
    }

    fn alive(&self, sockets: &Sockets, path: &Path) -> bool {
        sockets.is_in(path)
    }

    fn probes(&self, pod_ips: &[IpAddr]) -> Result<(), rules::Error> {
        if !self.probe_snat {
            return Ok(());
        }
        rules::apply_host(self.backend, pod_ips)
    }
}

impl Backend {
    /// The backend to use: the one asked for, or with `auto` nftables when `nft` runs here.
    pub fn choose(choice: RedirectChoice) -> Self {
        match choice {
            RedirectChoice::Nftables => Self::Nftables,
            RedirectChoice::Iptables => Self::Iptables,
            RedirectChoice::Auto => {
                let nft = std::process::Command::new("nft")
                    .arg("--version")
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status();
                if nft.is_ok_and(|s| s.success()) {
                    Self::Nftables
                } else {
                    Self::Iptables
                }
            }
        }
    }
}

/// Creates sockets inside one pod's namespace, marked so the pod's rules never capture them.
#[derive(Debug, Clone)]
pub struct Sockets {
    place: Place,
}

#[derive(Debug, Clone)]
enum Place {
    /// Inside the pod's own network namespace.
    Pod(Arc<Netns>),
    /// In the daemon's namespace, on the pod's (loopback) addresses: for tests without root,
    /// where `path` stands for the namespace the pod would have.
    Loopback { path: PathBuf, ips: Vec<IpAddr> },
}

/// The three listeners of one pod.
pub struct Listeners {
    pub outbound: TcpListener,
    pub inbound_plaintext: TcpListener,
    pub hbone: TcpListener,
}

impl Sockets {
    pub fn new(netns: Arc<Netns>) -> Self {
        Self {
            place: Place::Pod(netns),
        }
    }

    /// Sockets in the daemon's own namespace bound to `ips`, standing in for the namespace at
    /// `path`: lets tests without root wire pods on loopback addresses.
    pub fn loopback(path: &Path, ips: Vec<IpAddr>) -> Self {
        Self {
            place: Place::Loopback {
                path: path.to_owned(),
                ips,
            },
        }
    }

    /// The addresses of a loopback placement (none for a pod namespace: ask the kernel).
    pub fn loopback_ips(&self) -> &[IpAddr] {
        match &self.place {
            Place::Loopback { ips, .. } => ips,
            Place::Pod(_) => &[],
        }
    }

    /// Whether `path` names the namespace these sockets are made in.
    pub fn is_in(&self, path: &Path) -> bool {
        match &self.place {
            Place::Pod(netns) => netns.same_as(path),
            Place::Loopback { path: own, .. } => own == path,
        }
    }

    /// The pod's namespace; an error for loopback placement, which has no rules to touch.
    fn pod_netns(&self) -> Result<&Netns, rules::Error> {
        match &self.place {
            Place::Pod(netns) => Ok(netns),
            Place::Loopback { .. } => Err(rules::Error::Netns(io::Error::new(
                io::ErrorKind::Unsupported,
                "loopback placement has no network namespace",
            ))),
        }
    }

    /// Runs `f` where this pod's sockets live.
    fn run<R>(&self, f: impl FnOnce() -> R) -> io::Result<R> {
        match &self.place {
            Place::Pod(netns) => netns.run(f),
            Place::Loopback { .. } => Ok(f()),
        }
    }

    /// The address a listener on `port` binds: every address in a pod's namespace, the pod's
    /// own address on loopback.
    fn listen_addr(&self, port: u16) -> SocketAddr {
        match &self.place {
            Place::Loopback { ips, .. } if !ips.is_empty() => SocketAddr::new(ips[0], port),
            _ => SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)),
        }
    }

    /// The pod's own address for dialling `dst`, where the kernel would not pick it by itself.
    fn source_for(&self, dst: SocketAddr) -> Option<IpAddr> {
        match &self.place {
            Place::Pod(_) => None,
            Place::Loopback { ips, .. } => {
                ips.iter().copied().find(|ip| ip.is_ipv4() == dst.is_ipv4())
            }
        }
    }

    /// Binds the pod's listeners on all its addresses. `SO_REUSEPORT` lets a new daemon bind
    /// next to an old one during an upgrade.
    pub fn listen(&self, ports: Ports) -> io::Result<Listeners> {
        let listen = |port| -> io::Result<TcpListener> {
            let addr = self.listen_addr(port);
            let socket = self.run(|| {
                Socket::new(
                    Domain::for_address(addr),
                    Type::STREAM.nonblocking(),
                    Some(Protocol::TCP),
                )
            })??;
            if addr.is_ipv6() {
                socket.set_only_v6(false)?;
            }
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.set_mark(rules::PROXY_MARK)?;
            socket.bind(&addr.into())?;
            socket.listen(1024)?;
            TcpListener::from_std(socket.into())
        };
        Ok(Listeners {
            outbound: listen(ports.outbound)?,
            inbound_plaintext: listen(ports.inbound_plaintext)?,
            hbone: listen(ports.hbone)?,
        })
    }

    /// A marked socket for dialling `dst` from the pod's own address.
    pub fn socket_for(&self, dst: SocketAddr) -> io::Result<TcpSocket> {
        let socket = self.raw(dst)?;
        if let Some(src) = self.source_for(dst) {
            socket.bind(&SocketAddr::new(src, 0).into())?;
        }
        Ok(TcpSocket::from_std_stream(socket.into()))
    }

    /// Dials `dst` inside the pod from `src`, which need not be local (`IP_TRANSPARENT`): the
    /// app then sees the real client address. Falls back to the pod's own address where the
    /// kernel refuses the spoofed bind (no CAP_NET_ADMIN, or address family mismatch).
    pub async fn connect_as(&self, src: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
        if matches!(self.place, Place::Loopback { .. }) {
            // Every loopback address is local: bind the client's own, no privilege needed.
            let socket = self.raw(dst)?;
            socket.bind(&SocketAddr::new(src, 0).into())?;
            return TcpSocket::from_std_stream(socket.into()).connect(dst).await;
        }
        if src.is_ipv4() == dst.is_ipv4() {
            let socket = self.raw(dst)?;
            let transparent = match src {
                IpAddr::V4(_) => socket.set_ip_transparent_v4(true),
                IpAddr::V6(_) => socket.set_ip_transparent_v6(true),
            };
            // Bind the address only; connect() picks the port by the whole 4-tuple. A port
            // chosen at bind time would have to be free of every TIME_WAIT on that address, a
            // search that slows to milliseconds under a high connection rate.
            let _ = nix::sys::socket::setsockopt(&socket, sockopt::IpBindAddressNoPort, &true);
            if transparent
                .and_then(|()| socket.bind(&SocketAddr::new(src, 0).into()))
                .is_ok()
            {
                return TcpSocket::from_std_stream(socket.into()).connect(dst).await;
            }
        }
        self.socket_for(dst)?.connect(dst).await
    }

    fn raw(&self, dst: SocketAddr) -> io::Result<Socket> {
        let domain = Domain::for_address(dst);
        let socket =
            self.run(|| Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP)))??;
        socket.set_mark(rules::PROXY_MARK)?;
        Ok(socket)
    }
}

impl crate::hbone::Dialer for Sockets {
    fn socket(&self, peer: crate::hbone::PeerAddr) -> io::Result<TcpSocket> {
        self.socket_for(peer.0)
    }
}

/// TCP ports in LISTEN state inside the pod's namespace, from the kernel's own table.
pub fn listening_ports(netns: &Netns) -> io::Result<Vec<u16>> {
    let tables = netns.run(|| {
        // thread-self: /proc/self/net would show the namespace of the process's main thread.
        ["tcp", "tcp6"].map(|t| std::fs::read_to_string(format!("/proc/thread-self/net/{t}")))
    })?;
    let mut ports = Vec::new();
    for table in tables {
        for line in table?.lines().skip(1) {
            let mut fields = line.split_whitespace();
            let (Some(local), Some(state)) = (fields.nth(1), fields.nth(1)) else {
                continue;
            };
            // State 0A is LISTEN; the local address ends in :PORT, in hex.
            let port = local
                .rsplit(':')
                .next()
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            if let (Some(port), "0A") = (port, state) {
                ports.push(port);
            }
        }
    }
    Ok(ports)
}

/// The destination a redirected connection was originally sent to.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    original_dst_at(stream, stream.local_addr()?)
}

/// [`original_dst`] for a caller that already has the connection's local address.
pub fn original_dst_at(stream: &TcpStream, local: SocketAddr) -> io::Result<SocketAddr> {
    // Listeners are dual-stack, so IPv4 clients arrive as v4-mapped addresses.
    let v4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    if v4 {
        let raw = getsockopt(stream, sockopt::OriginalDst).map_err(io::Error::from)?;
        let ip = u32::from_be(raw.sin_addr.s_addr);
        Ok(SocketAddrV4::new(ip.into(), u16::from_be(raw.sin_port)).into())
    } else {
        let raw = getsockopt(stream, sockopt::Ip6tOriginalDst).map_err(io::Error::from)?;
        let ip = std::net::Ipv6Addr::from(raw.sin6_addr.s6_addr);
        Ok(SocketAddrV6::new(ip, u16::from_be(raw.sin6_port), 0, 0).into())
    }
}

/// Undoes the v4-mapped form dual-stack listeners report.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}
