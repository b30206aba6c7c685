//! Test fixtures shared by the unit tests, the in-process layer and the benches (feature
//! `test-util`): a throwaway CA, a loopback stand-in for in-pod capture, a loopback dialer and an
//! echo server.
//!
//! Nothing here is on a production path: the `culvert` binary never constructs these.

#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod cluster;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};

use crate::config::Ports;
use crate::hbone::{Dialer, PeerAddr};
use crate::identity::{self, LocalCa};
use crate::redirect::{Capture, Missing, Sockets, rules};

/// A directory of its own under the system temp dir, unique in this process and across
/// processes; removed with everything in it when dropped.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("culvert-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A self-signed root CA in its own directory (`ca.crt`, `ca.key`).
#[derive(Debug)]
pub struct Ca {
    pub dir: TempDir,
}

impl Ca {
    pub fn new(tag: &str) -> Self {
        let dir = TempDir::new(tag);
        identity::write_root(dir.path(), "Culvert test CA").unwrap();
        Self { dir }
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.path().join("ca.key")
    }

    /// The CA itself, issuing certificates that live `ttl`.
    pub fn local(&self, ttl: Duration) -> LocalCa {
        LocalCa::load(&self.cert(), &self.key(), None, ttl).unwrap()
    }

    /// A one-hour leaf for `key` naming `uri`, signed by this CA, as PEM: what a remote CA
    /// would answer.
    pub fn sign_pem(&self, key: &rcgen::KeyPair, uri: &str) -> String {
        let pem = std::fs::read_to_string(self.key()).unwrap();
        let ca_key = rcgen::KeyPair::from_pem(&pem).unwrap();
        let cert = std::fs::read_to_string(self.cert()).unwrap();
        let issuer = rcgen::Issuer::from_ca_cert_pem(&cert, ca_key).unwrap();
        let now = std::time::SystemTime::now();
        let hour = Duration::from_secs(3600);
        let params = identity::leaf_params(uri, now - Duration::from_secs(60), now + hour).unwrap();
        params.signed_by(key, &issuer).unwrap().pem()
    }

    /// A certificate cache backed by this CA (one-hour certificates).
    pub fn certs(&self) -> Arc<identity::Cache> {
        identity::Cache::new(
            Arc::new(self.local(Duration::from_secs(3600))),
            crate::tls::provider(),
        )
    }
}

/// Dials from the process's own namespace: HBONE between in-process peers on loopback.
#[derive(Debug, Clone, Copy)]
pub struct LoopbackDialer;

impl Dialer for LoopbackDialer {
    fn socket(&self, peer: PeerAddr) -> io::Result<TcpSocket> {
        match peer.0 {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
    }
}

/// Hands out loopback subnets, one per fixture, so tests running side by side in one process
/// never bind each other's addresses: the `n`th fixture gets 127.`n`.0.0/16.
pub fn loopback_net() -> u8 {
    static NEXT: AtomicU32 = AtomicU32::new(10);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    assert!(n < 255, "out of loopback subnets");
    n as u8
}

/// In-pod capture without root: a pod's "namespace" is just its path, its sockets live in the
/// test process on the pod's loopback addresses, and its rules are a record in memory. Stands
/// in for [`crate::redirect::Netfilter`], which needs root, in the unit and in-process layers.
#[derive(Debug, Default)]
pub struct Loopback {
    /// Per namespace path: how many times rules were installed, and whether they are in place.
    rules: Mutex<HashMap<PathBuf, RuleRecord>>,
    /// What [`Capture::scan`] finds: running pods' namespace paths and addresses.
    running: Mutex<Vec<(PathBuf, Vec<IpAddr>)>>,
    /// The pod addresses the host's probe rule covers now, and how often it was rewritten.
    probed: Mutex<(Vec<IpAddr>, usize)>,
}

/// What the stand-in knows of one namespace's rules.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RuleRecord {
    pub installs: u32,
    pub removals: u32,
    pub present: bool,
}

impl Loopback {
    /// Makes a pod at `path` with `ips` findable by [`Capture::scan`], as a running sandbox is.
    pub fn run_pod(&self, path: &str, ips: &[IpAddr]) {
        self.running
            .lock()
            .unwrap()
            .push((PathBuf::from(path), ips.to_vec()));
    }

    /// The rules record of the namespace at `path`.
    pub fn rules(&self, path: &str) -> RuleRecord {
        self.rules
            .lock()
            .unwrap()
            .get(Path::new(path))
            .copied()
            .unwrap_or_default()
    }

    /// The pod addresses the host's probe rule covers.
    pub fn probed(&self) -> Vec<IpAddr> {
        self.probed.lock().unwrap().0.clone()
    }

    /// How many times the host's probe rule was rewritten.
    pub fn probe_updates(&self) -> usize {
        self.probed.lock().unwrap().1
    }

    /// Makes the pod at `path` gone, as a deleted sandbox's namespace is.
    pub fn stop_pod(&self, path: &str) {
        self.running
            .lock()
            .unwrap()
            .retain(|(p, _)| p != Path::new(path));
    }

    /// Drops the rules of `path` behind the daemon's back (as `nft flush ruleset` would).
    pub fn flush(&self, path: &str) {
        if let Some(r) = self.rules.lock().unwrap().get_mut(Path::new(path)) {
            r.present = false;
        }
    }

    fn path_of(sockets: &Sockets, rules: &HashMap<PathBuf, RuleRecord>) -> Option<PathBuf> {
        rules.keys().find(|p| sockets.is_in(p)).cloned()
    }
}

impl Capture for Loopback {
    fn name(&self) -> &'static str {
        "loopback"
    }

    fn open(&self, path: &Path, ips: &[IpAddr]) -> io::Result<Sockets> {
        if !path.is_absolute() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a network namespace",
            ));
        }
        self.rules
            .lock()
            .unwrap()
            .entry(path.to_owned())
            .or_default();
        Ok(Sockets::loopback(path, ips.to_vec()))
    }

    fn install(&self, sockets: &Sockets, _spec: &rules::Spec) -> Result<(), rules::Error> {
        let mut rules = self.rules.lock().unwrap();
        let path = Self::path_of(sockets, &rules).expect("installing into an unopened netns");
        let r = rules.get_mut(&path).expect("found above");
        r.installs += 1;
        r.present = true;
        Ok(())
    }

    fn remove(&self, sockets: &Sockets) -> Result<(), rules::Error> {
        let mut rules = self.rules.lock().unwrap();
        if let Some(path) = Self::path_of(sockets, &rules) {
            let r = rules.get_mut(&path).expect("found above");
            r.removals += 1;
            r.present = false;
        }
        Ok(())
    }

    fn check(&self, sockets: &Sockets, _ports: Ports) -> Result<(), Missing> {
        let rules = self.rules.lock().unwrap();
        match Self::path_of(sockets, &rules).and_then(|p| rules.get(&p).copied()) {
            Some(r) if r.present => Ok(()),
            _ => Err(Missing::Rules),
        }
    }

    fn scan(&self) -> Vec<(PathBuf, Vec<IpAddr>)> {
        self.running.lock().unwrap().clone()
    }

    fn same_netns(&self, a: &Path, b: &Path) -> bool {
        a == b
    }

    /// A running pod's addresses are the ones it was started with; any other namespace has
    /// the addresses it was opened with.
    fn addresses(&self, sockets: &Sockets) -> io::Result<Vec<IpAddr>> {
        let running = self.running.lock().unwrap();
        Ok(match running.iter().find(|(p, _)| sockets.is_in(p)) {
            Some((_, ips)) => ips.clone(),
            None => sockets.loopback_ips().to_vec(),
        })
    }

    fn probes(&self, pod_ips: &[IpAddr]) -> Result<(), rules::Error> {
        let mut ips = pod_ips.to_vec();
        ips.sort();
        let mut probed = self.probed.lock().unwrap();
        *probed = (ips, probed.1 + 1);
        Ok(())
    }

    fn alive(&self, _sockets: &Sockets, path: &Path) -> bool {
        self.running.lock().unwrap().iter().any(|(p, _)| p == path)
    }
}

/// Serves echo on `addr` (port 0 for any) until the test ends; returns the bound address.
pub async fn echo_server(addr: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind(addr).await.unwrap();
    let local = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = stream.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
                let _ = wr.shutdown().await;
            });
        }
    });
    local
}

/// Writes `payload` to `stream`, half-closes, and reads everything that comes back.
pub async fn exchange(mut stream: tokio::net::TcpStream, payload: &[u8]) -> io::Result<Vec<u8>> {
    let (mut rd, mut wr) = stream.split();
    let write = async {
        wr.write_all(payload).await?;
        wr.shutdown().await
    };
    let mut back = Vec::new();
    let read = rd.read_to_end(&mut back);
    tokio::try_join!(write, read)?;
    Ok(back)
}
