//! Entering a pod's network namespace for the length of one synchronous call.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;

use nix::sched::{CloneFlags, setns};

/// A pod's network namespace, held open (which also pins it while the pod is wired), together
/// with the daemon's own namespace to return to.
#[derive(Debug)]
pub struct Netns {
    pod: File,
    home: Arc<File>,
}

/// The namespace the daemon runs in; every [`Netns::run`] returns the thread here.
pub fn home() -> io::Result<Arc<File>> {
    File::open("/proc/thread-self/ns/net").map(Arc::new)
}

impl Netns {
    /// Opens the pod namespace at `path`. Refuses anything that is not a network namespace,
    /// and the daemon's own or the host's (PID 1's): rules installed there would capture the
    /// node's traffic, not a pod's.
    pub fn open(path: &Path, home: Arc<File>) -> io::Result<Self> {
        let pod = File::open(path)?;
        let refuse = |what: &str| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("{what}, not a pod's"))
        };
        let meta = pod.metadata()?;
        if same_file(&meta, &home.metadata()?) {
            return Err(refuse("this is the daemon's own network namespace"));
        }
        if std::fs::metadata("/proc/1/ns/net").is_ok_and(|host| same_file(&meta, &host)) {
            return Err(refuse("this is the host's network namespace"));
        }
        // Refuse anything that is not a network namespace before ever entering it.
        setns_checked(&pod, &home)?;
        Ok(Self { pod, home })
    }

    /// The addresses inside the namespace, loopback excluded.
    pub fn addresses(&self) -> io::Result<Vec<std::net::IpAddr>> {
        let addrs = self
            .run(nix::ifaddrs::getifaddrs)?
            .map_err(io::Error::from)?;
        Ok(addrs
            .filter_map(|a| {
                let addr = a.address?;
                let ip = match (addr.as_sockaddr_in(), addr.as_sockaddr_in6()) {
                    (Some(v4), _) => std::net::IpAddr::V4(v4.ip()),
                    (_, Some(v6)) => std::net::IpAddr::V6(v6.ip()),
                    _ => return None,
                };
                (!ip.is_loopback()).then_some(ip)
            })
            .collect())
    }

    /// Runs `f` on the current thread inside the pod's namespace, then switches back.
    ///
    /// `f` must not await or block for long: the thread belongs to the runtime. Sockets created
    /// inside stay in the pod's namespace for their whole life.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> io::Result<R> {
        setns(self.pod.as_fd(), CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let _back = Return(&self.home);
        Ok(f())
    }

    /// Whether `other` names the same namespace as this one.
    pub fn same_as(&self, other: &Path) -> bool {
        self.pod
            .metadata()
            .ok()
            .zip(std::fs::metadata(other).ok())
            .is_some_and(|(a, b)| same_file(&a, &b))
    }
}

/// Finds the network namespaces on this host and the addresses in each: the entries of `dirs`
/// (the runtime's netns directory) and every process's namespace under /proc. Used to find
/// running pods by IP when the daemon starts or a workload becomes enrolled. Blocking.
pub fn scan(
    dirs: &[std::path::PathBuf],
    home: &Arc<File>,
) -> Vec<(std::path::PathBuf, Vec<std::net::IpAddr>)> {
    use std::os::unix::fs::MetadataExt;
    let mut candidates: Vec<std::path::PathBuf> = Vec::new();
    for dir in dirs {
        if let Ok(entries) = std::fs::read_dir(dir) {
            candidates.extend(entries.flatten().map(|e| e.path()));
        }
    }
    if let Ok(procs) = std::fs::read_dir("/proc") {
        let pids = procs.flatten().filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        });
        candidates.extend(pids.map(|e| e.path().join("ns/net")));
    }
    let own = home.metadata().map(|m| (m.dev(), m.ino())).ok();
    let mut seen = std::collections::HashSet::new();
    let mut found = Vec::new();
    for path in candidates {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let id = (meta.dev(), meta.ino());
        if Some(id) == own || !seen.insert(id) {
            continue;
        }
        let Ok(netns) = Netns::open(&path, home.clone()) else {
            continue;
        };
        let Ok(ips) = netns.addresses() else {
            continue;
        };
        if !ips.is_empty() {
            found.push((path, ips));
        }
    }
    found
}

/// Whether two paths name one namespace (one can be a bind mount or a symlink of the other).
pub fn same(a: &Path, b: &Path) -> bool {
    std::fs::metadata(a)
        .ok()
        .zip(std::fs::metadata(b).ok())
        .is_some_and(|(a, b)| same_file(&a, &b))
}

fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// Switches the thread back to the daemon's namespace when dropped, even on unwind.
struct Return<'a>(&'a File);

impl Drop for Return<'_> {
    fn drop(&mut self) {
        // A thread left in a pod's namespace would put the next connection of some other pod
        // in the wrong place; nothing sensible can continue after that.
        setns(self.0.as_fd(), CloneFlags::CLONE_NEWNET)
            .expect("returning to the daemon's network namespace");
    }
}

fn setns_checked(pod: &File, home: &File) -> io::Result<()> {
    setns(pod.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a network namespace: {e}"),
        )
    })?;
    let _back = Return(home);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemons_own_namespace_is_never_taken_for_a_pods() {
        let err = Netns::open(Path::new("/proc/self/ns/net"), home().unwrap()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(
            err.to_string(),
            "this is the daemon's own network namespace, not a pod's"
        );
        // Through another path to the same namespace, too.
        let pid = std::process::id();
        let err = Netns::open(Path::new(&format!("/proc/{pid}/ns/net")), home().unwrap());
        assert!(err.is_err());
    }
}
