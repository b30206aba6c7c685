//! In-pod capture: the registration socket, entering pod namespaces, the redirection rules, and
//! the sockets the proxy opens inside pods.
//!
//! Owns everything that touches a pod's network namespace or its netfilter rules. Does not
//! decide what traffic means: it hands accepted sockets and original destinations to the proxy.

pub mod cni;
pub mod install;
pub mod netns;
pub mod rules;

use std::io;
use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::sync::Arc;

use nix::sys::socket::{getsockopt, sockopt};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

pub use netns::Netns;
pub use rules::Backend;

use crate::config::Ports;

/// Creates sockets inside one pod's namespace, marked so the pod's rules never capture them.
#[derive(Debug, Clone)]
pub struct Sockets {
    netns: Arc<Netns>,
}

/// The three listeners of one pod.
pub struct Listeners {
    pub outbound: TcpListener,
    pub inbound_plaintext: TcpListener,
    pub hbone: TcpListener,
}

impl Sockets {
    pub fn new(netns: Arc<Netns>) -> Self {
        Self { netns }
    }

    pub fn netns(&self) -> &Arc<Netns> {
        &self.netns
    }

    /// Binds the pod's listeners on all its addresses. `SO_REUSEPORT` lets a new daemon bind
    /// next to an old one during an upgrade.
    pub fn listen(&self, ports: Ports) -> io::Result<Listeners> {
        let listen = |port| -> io::Result<TcpListener> {
            let socket = self.netns.run(|| {
                Socket::new(
                    Domain::IPV6,
                    Type::STREAM.nonblocking(),
                    Some(Protocol::TCP),
                )
            })??;
            socket.set_only_v6(false)?;
            socket.set_reuse_address(true)?;
            socket.set_reuse_port(true)?;
            socket.set_mark(rules::PROXY_MARK)?;
            socket.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)).into())?;
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
        Ok(TcpSocket::from_std_stream(socket.into()))
    }

    /// Dials `dst` inside the pod from `src`, which need not be local (`IP_TRANSPARENT`): the
    /// app then sees the real client address. Falls back to the pod's own address where the
    /// kernel refuses the spoofed bind (no CAP_NET_ADMIN, or address family mismatch).
    pub async fn connect_as(&self, src: IpAddr, dst: SocketAddr) -> io::Result<TcpStream> {
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
        let socket = self
            .netns
            .run(|| Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP)))??;
        socket.set_mark(rules::PROXY_MARK)?;
        Ok(socket)
    }
}

impl crate::hbone::Dialer for Sockets {
    fn socket(&self, peer: SocketAddr) -> io::Result<TcpSocket> {
        self.socket_for(peer)
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
    // Listeners are dual-stack, so IPv4 clients arrive as v4-mapped addresses.
    let local = stream.local_addr()?;
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
