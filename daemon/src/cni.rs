//! Pod registration: the socket culvert-cni talks to, the registry of wired pods, and the
//! installer that puts culvert-cni into the host's CNI configuration.
//!
//! Owns which sandboxes are wired and the files that outlive the daemon (`enrollment.json` for
//! the plugin, `pods.json` for restarts). Calls down into `redirect` (inside a pod's namespace),
//! `proxy` (serving a wired pod), `identity` (its certificate) and `state` (enrollment); never
//! up into `app`.

pub mod install;
mod registry;
mod server;

use std::path::Path;

use culvert_cni_proto::Enrollment;

pub use registry::{Deps, Error, Registry};
pub use server::{Handler, MAX_CONNECTIONS, SocketFile, bind, serve};

/// The enrollment record's file name in the state directory.
pub const ENROLLMENT_FILE: &str = "enrollment.json";

/// Records which pods are enrolled, for the CNI plugin to fail closed on while the daemon is
/// away (restart, upgrade, crash, reboot).
pub fn write_enrollment(state_dir: &Path, enrollment: &Enrollment) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(enrollment).expect("enrollment serializes");
    write_atomically(&state_dir.join(ENROLLMENT_FILE), &json)
}

/// Replaces `path` with `contents` so that readers see the old or the new file, never a mix.
/// The temporary file is this process's own: during a surge two daemons write the same files.
fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

/// An error and its causes on one line, `outer: inner: root`: what a registrar shows its user.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
