//! Test harness shared by the test layers: the lab (re-exported from `culvert-lab`, so the demo and
//! the tests run one topology), apps to run inside pods, and waiting helpers.

#![allow(clippy::unwrap_used, clippy::disallowed_types, clippy::print_stderr)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use culvert_lab::{Lab, PodSpec, Spec, echo, exchange, serve, wire};
use sha2::{Digest, Sha256};

pub mod chart;
pub mod cluster;
pub mod inproc;
pub mod kube;
pub mod scrape;
pub mod ztunnel_dump;

/// The `culvert` binary built from this workspace: `$CULVERT_BIN`, or next to the test binary.
pub fn culvert_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("CULVERT_BIN") {
        return bin.into();
    }
    // A test: target/<profile>/deps/<test> -> target/<profile>/culvert; a binary such as
    // culvert-bench: target/<profile>/culvert-bench -> target/<profile>/culvert.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let bin = if dir.ends_with("deps") {
        dir.parent().unwrap().join("culvert")
    } else {
        dir.join("culvert")
    };
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build --workspace --bins) or set CULVERT_BIN",
        bin.display()
    );
    bin
}

/// Starts a lab named after the test; fails loudly when not root.
pub fn lab(tag: &str, spec: Spec) -> Lab {
    Lab::start(tag, &culvert_bin(), spec).unwrap_or_else(|e| panic!("starting the lab: {e:#}"))
}

/// A spec with default mesh settings and no services.
pub fn spec(pods: Vec<PodSpec>) -> Spec {
    Spec {
        pods,
        mesh_mode: "PERMISSIVE",
        enrolled_namespaces: vec![],
        services: vec![],
        node_flags: vec![],
        kubeconfig: None,
        ca: vec![],
        cert_ttl: None,
        node_file_extra: String::new(),
    }
}

/// The port the test apps listen on.
pub const ECHO: u16 = 8080;

/// Pod `pod`'s address at `port`.
pub fn addr(lab: &Lab, pod: &str, port: u16) -> std::net::SocketAddr {
    std::net::SocketAddr::from((lab.pod(pod).ip, port))
}

/// Sends `payload` from pod `from` to `to`, half-closes, and returns what came back.
pub fn round_trip(
    lab: &Lab,
    from: &str,
    to: std::net::SocketAddr,
    payload: &[u8],
) -> std::io::Result<Vec<u8>> {
    exchange(lab.pod(from).connect(to)?, payload)
}

/// Sends `payload` from pod `from` to `to` and asserts it comes back unchanged.
pub fn echo_ok(lab: &Lab, from: &str, to: std::net::SocketAddr, payload: &[u8]) {
    let back = round_trip(lab, from, to, payload).unwrap();
    assert_eq!(back, payload, "{from} -> {to}: echo differs");
}

/// `namespace/name` of the pods node `node` has wired, sorted (asked over its registration
/// socket).
pub fn wired(lab: &Lab, node: usize) -> Vec<String> {
    let request = culvert_cni_proto::Request::ListPods;
    let culvert_cni_proto::Response::Pods { pods } = lab.call(node, &request).unwrap() else {
        panic!("not a pod list")
    };
    let mut names: Vec<String> = pods
        .into_iter()
        .map(|p| format!("{}/{}", p.pod.namespace, p.pod.name))
        .collect();
    names.sort();
    names
}

/// Runs a command inside a pod's namespace and returns its stdout, or None when it failed.
pub fn in_pod(lab: &Lab, pod: &str, cmd: &[&str]) -> Option<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.pod(pod).netns])
        .args(cmd)
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub fn eventually<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The JSON access-log lines a node has written so far.
pub fn access_log(lab: &Lab, node: usize) -> Vec<serde_json::Value> {
    log_lines(lab, node)
        .into_iter()
        .filter(|v| v["target"] == "access")
        .collect()
}

/// How many HBONE connections to pod `pod` (`namespace/name`) node `node` has logged.
pub fn hbone_streams(lab: &Lab, node: usize, pod: &str) -> usize {
    access_log(lab, node)
        .iter()
        .filter(|v| v["transport"] == "hbone" && v["pod"] == pod)
        .count()
}

/// Node `node`'s JSON log lines.
pub fn log_lines(lab: &Lab, node: usize) -> Vec<serde_json::Value> {
    lab.log(node)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .collect()
}

/// Waits for an access-log line on `node` matching `pred`.
pub fn access_line(
    lab: &Lab,
    node: usize,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    eventually(
        "a matching access-log line",
        Duration::from_secs(10),
        || access_log(lab, node).into_iter().find(|v| pred(v)),
    )
}

/// Deterministic bulk data: byte `i` of the stream is a function of `i` only.
pub fn pattern(offset: u64, buf: &mut [u8]) {
    for (k, b) in buf.iter_mut().enumerate() {
        let i = offset + k as u64;
        *b = (i ^ (i >> 11) ^ (i >> 23)) as u8;
    }
}

const CHUNK: usize = 256 << 10;

/// A bulk-transfer app: `U<len>` uploads `len` bytes and answers their SHA-256; `D<len>` sends
/// `len` bytes of [`pattern`] and closes.
pub fn hash_app(mut stream: TcpStream) {
    let mut header = [0u8; 9];
    if stream.read_exact(&mut header).is_err() {
        return;
    }
    let len = u64::from_be_bytes(header[1..].try_into().unwrap());
    let mut buf = vec![0u8; CHUNK];
    match header[0] {
        b'U' => {
            let mut hasher = Sha256::new();
            let mut left = len;
            while left > 0 {
                let want = buf.len().min(left as usize);
                let Ok(n) = stream.read(&mut buf[..want]) else {
                    return;
                };
                if n == 0 {
                    return;
                }
                hasher.update(&buf[..n]);
                left -= n as u64;
            }
            let _ = stream.write_all(&hasher.finalize());
        }
        b'D' => {
            let mut sent = 0;
            while sent < len {
                let n = buf.len().min((len - sent) as usize);
                pattern(sent, &mut buf[..n]);
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
                sent += n as u64;
            }
        }
        _ => {}
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// Uploads `len` bytes of pattern; returns (our hash, the server's hash).
pub fn upload(mut stream: TcpStream, len: u64) -> ([u8; 32], [u8; 32]) {
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut header = vec![b'U'];
    header.extend_from_slice(&len.to_be_bytes());
    stream.write_all(&header).unwrap();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0;
    while sent < len {
        let n = buf.len().min((len - sent) as usize);
        pattern(sent, &mut buf[..n]);
        hasher.update(&buf[..n]);
        stream.write_all(&buf[..n]).unwrap();
        sent += n as u64;
    }
    let mut theirs = [0u8; 32];
    stream.read_exact(&mut theirs).unwrap();
    (hasher.finalize().into(), theirs)
}

/// Downloads `len` bytes of pattern; returns (hash of what arrived, hash of what was expected,
/// bytes received).
pub fn download(mut stream: TcpStream, len: u64) -> ([u8; 32], [u8; 32], u64) {
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut header = vec![b'D'];
    header.extend_from_slice(&len.to_be_bytes());
    stream.write_all(&header).unwrap();
    let (mut got, mut want) = (Sha256::new(), Sha256::new());
    let mut buf = vec![0u8; CHUNK];
    let mut expected = vec![0u8; CHUNK];
    let mut received = 0u64;
    loop {
        let n = stream.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.update(&buf[..n]);
        pattern(received, &mut expected[..n]);
        want.update(&expected[..n]);
        received += n as u64;
    }
    (got.finalize().into(), want.finalize().into(), received)
}

/// Whether one 4-byte echo on an open connection comes back within a second.
pub fn echoes(stream: &mut TcpStream) -> bool {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut back = [0u8; 4];
    stream.write_all(b"ping").is_ok() && stream.read_exact(&mut back).is_ok() && &back == b"ping"
}

/// Whether a new connection from pod `from` to `to` is refused, reset or closed before its echo.
pub fn refused(lab: &Lab, from: &str, to: std::net::SocketAddr) -> bool {
    match lab.pod(from).connect(to) {
        Err(_) => true,
        Ok(stream) => exchange(stream, b"let me in").map_or(true, |b| b.is_empty()),
    }
}
