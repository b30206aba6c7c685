//! The pod-registration protocol between `culvert-cni` (or any registrar) and `culvert node`.
//!
//! Owns the wire types and their framing; does no IO of its own except the small blocking
//! client in [`unix`], which the synchronous CNI plugin and the tests share.
//!
//! # Protocol
//!
//! One request and one response per Unix-socket connection. Every message is a frame: a 4-byte
//! big-endian length followed by that many bytes of JSON, an [`Envelope`] carrying
//! [`PROTOCOL_VERSION`] and the body. A daemon that receives another version answers
//! [`Response::Nack`] naming both versions, so an old plugin talking to a new daemon (or the
//! reverse, during an upgrade) gets a readable error rather than a misparse. Frames longer than
//! [`MAX_FRAME`] are refused before any allocation.
//!
//! - [`Request::AddPod`]: the pod's sandbox exists and has its network. The daemon answers only
//!   once the pod is fully wired (rules and listeners in place) or it has decided the pod is not
//!   enrolled. Repeating an `AddPod` for a wired pod re-applies its rules and is answered the same.
//! - [`Request::DelPod`]: the sandbox is going away. Always answered `Removed`, even for a pod the
//!   daemon never saw: DEL must never fail. It unwires only the sandbox it names (by container
//!   id, or a sandbox the daemon rewired itself in the same namespace), never another sandbox of
//!   the same pod.
//! - [`Request::CheckPod`]: whether a pod the runtime believes wired still has its rules and
//!   listeners; answered `Checked` or `Nack` with what is missing.
//! - [`Request::Gc`]: sandboxes not in `keep` are unwired (CNI GC), except those whose network
//!   namespace is still alive and enrolled; answered `Removed`.
//! - [`Request::ListPods`]: the pods the daemon has wired, for operators, tests and CNI STATUS.
//!
//! A registrar that loses its connection simply retries the whole request: every request is
//! idempotent.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Version of the message schema below; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// Where the node daemon listens on the host.
pub const DEFAULT_SOCKET_PATH: &str = "/var/run/culvert/cni.sock";

/// Where the daemon records which pods are enrolled, for the plugin to consult when the daemon
/// does not answer. Under /var/lib so that it survives a reboot, as the pods' redirection
/// must be restored after one.
pub const DEFAULT_STATE_FILE: &str = "/var/lib/culvert/enrollment.json";

/// Largest frame either side accepts, in bytes (length prefix excluded).
pub const MAX_FRAME: usize = 1 << 20;

/// A versioned message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub version: u32,
    pub body: T,
}

/// What a registrar asks of the node daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    AddPod(AddPod),
    DelPod(DelPod),
    CheckPod(CheckPod),
    Gc(Gc),
    ListPods,
}

/// Is this sandbox wired as it should be?
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckPod {
    pub container_id: String,
    /// `CNI_NETNS`: lets the daemon recognise a sandbox it rewired on its own (after a restart)
    /// and adopt the runtime's id for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    pub pod: PodRef,
}

/// Unwire every sandbox except these (the runtime's valid attachments).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gc {
    pub keep: Vec<String>,
}

/// A pod sandbox that now has its network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddPod {
    /// The runtime's id for the sandbox; the key under which the daemon tracks the pod.
    pub container_id: String,
    /// Path of the pod's network namespace as the runtime gave it (`CNI_NETNS`).
    pub netns: String,
    /// Interface inside the pod that the primary plugin configured (`CNI_IFNAME`).
    pub ifname: String,
    pub pod: PodRef,
    /// Addresses the primary plugin assigned, from its result.
    pub ips: Vec<IpAddr>,
}

/// The Kubernetes names of a pod, as the runtime passes them in `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// Older runtimes do not send the UID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

/// A pod sandbox that is going away.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelPod {
    pub container_id: String,
    /// `CNI_NETNS`, when the runtime still has it. With `pod`, lets the daemon find a sandbox
    /// it rewired on its own (after a restart) under another id: only one in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// The pod is handled: wired when `enrolled`, deliberately left alone otherwise.
    Added {
        enrolled: bool,
    },
    /// The pod is no longer wired (or never was).
    Removed,
    /// The pod is wired and its rules and listeners are in place, or it is not enrolled.
    Checked,
    Pods {
        pods: Vec<PodStatus>,
    },
    /// The request could not be carried out; `reason` says why, for the runtime's error message.
    Nack {
        reason: String,
    },
}

/// One wired pod, as listed by the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodStatus {
    pub container_id: String,
    pub pod: PodRef,
    pub ips: Vec<IpAddr>,
    /// SPIFFE identity the pod's traffic carries.
    pub identity: String,
    /// Redirection backend in use for this pod (`nftables` or `iptables`).
    pub backend: String,
}

/// Which pods are enrolled, as the daemon last knew it: the fail-closed input of the plugin.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    /// Namespaces whose pods are enrolled unless they opt out.
    pub namespaces: Vec<String>,
    /// Namespaces the daemon knows and that are not enrolled. A namespace in neither list is
    /// one the daemon never saw: it may have been enrolled since, so its pods fail closed.
    #[serde(default)]
    pub outside: Vec<String>,
    /// `namespace/name` of pods enrolled although their namespace is not.
    #[serde(default)]
    pub pods_in: Vec<String>,
    /// `namespace/name` of pods that opted out of an enrolled namespace.
    #[serde(default)]
    pub pods_out: Vec<String>,
}

impl Enrollment {
    /// Whether a pod is (or, for a pod not yet known by name, may be) enrolled.
    pub fn covers(&self, namespace: &str, name: &str) -> bool {
        let pod = format!("{namespace}/{name}");
        if self.pods_in.contains(&pod) {
            return true;
        }
        self.namespaces.iter().any(|n| n == namespace) && !self.pods_out.contains(&pod)
    }

    /// Whether a pod may start without redirection while the daemon does not answer: only when
    /// it is known to be outside the mesh (its namespace is recorded as not enrolled, or it
    /// opted out) or its namespace is `exempt`, and never when it is (or may be) enrolled.
    pub fn admits_unwired(&self, namespace: &str, name: &str, exempt: &[String]) -> bool {
        if self.covers(namespace, name) {
            return false;
        }
        let listed = |names: &[String]| names.iter().any(|n| n == namespace);
        listed(&self.outside)
            || listed(exempt)
            || self.pods_out.contains(&format!("{namespace}/{name}"))
    }
}

/// Why a frame could not be read.
#[derive(Debug)]
pub enum DecodeError {
    /// The length prefix announces more than [`MAX_FRAME`] bytes.
    TooLong(usize),
    /// The peer speaks another protocol version.
    Version { got: u32, want: u32 },
    /// The JSON does not match the schema.
    Json(serde_json::Error),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooLong(n) => write!(f, "frame of {n} bytes exceeds the {MAX_FRAME}-byte limit"),
            Self::Version { got, want } => {
                write!(
                    f,
                    "peer speaks protocol version {got}, this side speaks {want}"
                )
            }
            Self::Json(e) => write!(f, "malformed message: {e}"),
        }
    }
}

impl std::error::Error for DecodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Json(e) => Some(e),
            Self::TooLong(_) | Self::Version { .. } => None,
        }
    }
}

/// Frames `body` in the current protocol version: length prefix plus JSON envelope.
pub fn encode<T: Serialize>(body: &T) -> Vec<u8> {
    let envelope = Envelope {
        version: PROTOCOL_VERSION,
        body,
    };
    let json = serde_json::to_vec(&envelope).expect("protocol types always serialize");
    let len = u32::try_from(json.len()).expect("protocol messages are far below 4 GiB");
    let mut out = Vec::with_capacity(4 + json.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&json);
    out
}

/// Reads a length prefix, refusing lengths above [`MAX_FRAME`].
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, DecodeError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(DecodeError::TooLong(len));
    }
    Ok(len)
}

/// Decodes a frame's payload (the bytes after the length prefix).
pub fn decode<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, DecodeError> {
    // Read the version alone first, so a newer peer's unknown fields produce a version error
    // rather than a confusing schema error.
    #[derive(Deserialize)]
    struct VersionOnly {
        version: u32,
    }
    let VersionOnly { version } = serde_json::from_slice(payload).map_err(DecodeError::Json)?;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::Version {
            got: version,
            want: PROTOCOL_VERSION,
        });
    }
    let envelope: Envelope<T> = serde_json::from_slice(payload).map_err(DecodeError::Json)?;
    Ok(envelope.body)
}

/// The blocking client side, for the CNI plugin and tests.
pub mod unix {
    use std::io::{self, Read, Write};
    use std::os::unix::net::UnixStream;
    use std::path::Path;
    use std::time::Duration;

    use super::{DecodeError, Request, Response, decode, encode, frame_len};

    /// Why a call to the daemon failed.
    #[derive(Debug)]
    pub enum CallError {
        /// The socket could not be reached: the daemon is not running (or not yet).
        Connect(io::Error),
        /// The connection broke or timed out mid-call.
        Io(io::Error),
        Decode(DecodeError),
    }

    impl std::fmt::Display for CallError {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            match self {
                Self::Connect(e) => write!(f, "connecting to the node daemon: {e}"),
                Self::Io(e) => write!(f, "talking to the node daemon: {e}"),
                Self::Decode(e) => write!(f, "reading the node daemon's answer: {e}"),
            }
        }
    }

    impl std::error::Error for CallError {}

    /// Sends one request and waits up to `timeout` for each of the write and the read.
    pub fn call(path: &Path, request: &Request, timeout: Duration) -> Result<Response, CallError> {
        let mut stream = UnixStream::connect(path).map_err(CallError::Connect)?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(CallError::Io)?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(CallError::Io)?;
        stream.write_all(&encode(request)).map_err(CallError::Io)?;
        let mut prefix = [0u8; 4];
        stream.read_exact(&mut prefix).map_err(CallError::Io)?;
        let len = frame_len(prefix).map_err(CallError::Decode)?;
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).map_err(CallError::Io)?;
        decode(&payload).map_err(CallError::Decode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn add_pod() -> Request {
        Request::AddPod(AddPod {
            container_id: "c0ffee".into(),
            netns: "/var/run/netns/pod".into(),
            ifname: "eth0".into(),
            pod: PodRef {
                namespace: "demo".into(),
                name: "client".into(),
                uid: None,
            },
            ips: vec!["10.244.1.2".parse().unwrap(), "fd00::2".parse().unwrap()],
        })
    }

    #[test]
    fn requests_round_trip_through_a_frame() {
        for req in [
            add_pod(),
            Request::DelPod(DelPod {
                container_id: "x".into(),
                netns: None,
                pod: None,
            }),
            Request::DelPod(DelPod {
                container_id: "y".into(),
                netns: Some("/var/run/netns/cni-1".into()),
                pod: Some(PodRef {
                    namespace: "a".into(),
                    name: "b".into(),
                    uid: None,
                }),
            }),
            Request::CheckPod(CheckPod {
                container_id: "z".into(),
                netns: Some("/var/run/netns/cni-1".into()),
                pod: PodRef {
                    namespace: "a".into(),
                    name: "b".into(),
                    uid: Some("u".into()),
                },
            }),
            Request::Gc(Gc {
                keep: vec!["x".into()],
            }),
            Request::ListPods,
        ] {
            let frame = encode(&req);
            let len = frame_len(frame[..4].try_into().unwrap()).unwrap();
            assert_eq!(len, frame.len() - 4);
            assert_eq!(decode::<Request>(&frame[4..]).unwrap(), req);
        }
    }

    #[test]
    fn other_protocol_version_is_named_in_the_error() {
        let payload = br#"{"version":7,"body":{"type":"list_pods","new_field":1}}"#;
        let err = decode::<Request>(payload).unwrap_err();
        assert_eq!(
            err.to_string(),
            "peer speaks protocol version 7, this side speaks 1"
        );
    }

    #[test]
    fn oversized_frame_is_refused_from_its_prefix() {
        let err = frame_len((MAX_FRAME as u32 + 1).to_be_bytes()).unwrap_err();
        assert!(matches!(err, DecodeError::TooLong(n) if n == MAX_FRAME + 1));
    }

    #[test]
    fn garbage_is_a_json_error_not_a_panic() {
        for payload in [
            &b""[..],
            b"\xff\xfe",
            b"{\"version\":1}",
            b"{\"version\":1,\"body\":{}}",
        ] {
            assert!(matches!(
                decode::<Request>(payload),
                Err(DecodeError::Json(_))
            ));
        }
    }

    #[test]
    fn enrollment_follows_namespace_then_pod_overrides() {
        let e = Enrollment {
            namespaces: vec!["shop".into()],
            outside: vec![],
            pods_in: vec!["tools/probe".into()],
            pods_out: vec!["shop/legacy".into()],
        };
        assert!(e.covers("shop", "cart"));
        assert!(!e.covers("shop", "legacy"));
        assert!(e.covers("tools", "probe"));
        assert!(!e.covers("tools", "other"));
        assert!(!Enrollment::default().covers("shop", "cart"));
    }

    #[test]
    fn only_pods_known_to_be_outside_the_mesh_start_unwired() {
        let e = Enrollment {
            namespaces: vec!["shop".into()],
            outside: vec!["web".into()],
            pods_in: vec!["web/probe".into()],
            pods_out: vec!["shop/legacy".into()],
        };
        let exempt = ["kube-system".to_owned()];
        let admits = |ns, name| e.admits_unwired(ns, name, &exempt);
        assert!(!admits("shop", "cart"), "an enrolled pod");
        assert!(admits("shop", "legacy"), "an opted-out pod");
        assert!(
            admits("web", "site"),
            "a pod of a namespace known not to be enrolled"
        );
        assert!(!admits("web", "probe"), "a pod enrolled on its own");
        assert!(
            !admits("fresh", "app"),
            "a namespace never seen may have been enrolled since"
        );
        assert!(admits("kube-system", "coredns"), "an exempt namespace");
    }

    #[test]
    fn wire_form_is_stable() {
        let frame = encode(&Response::Added { enrolled: true });
        assert_eq!(
            &frame[4..],
            br#"{"version":1,"body":{"type":"added","enrolled":true}}"#
        );
    }
}
