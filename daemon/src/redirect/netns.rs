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
    pub fn open(path: &Path, home: Arc<File>) -> io::Result<Self> {
        let pod = File::open(path)?;
        // Refuse anything that is not a network namespace before ever entering it.
        setns_checked(&pod, &home)?;
        Ok(Self { pod, home })
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
        use std::os::unix::fs::MetadataExt;
        match (self.pod.metadata(), std::fs::metadata(other)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
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
