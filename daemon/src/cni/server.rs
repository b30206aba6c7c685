//! The registration socket: culvert-cni (or the test harness) tells the daemon about pods here.
//!
//! Framing and decoding only; what a request does is the [`Handler`]'s business.

use std::future::Future;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use culvert_cni_proto::{
    AddPod, CheckPod, DelPod, Gc, Request, Response, decode, encode, frame_len,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::metrics::Pods;

/// How long a registrar may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Registration connections served at once; one more is answered "busy" and closed. A node
/// starting pods registers them one per sandbox, and the registry applies them one at a time
/// anyway, so this bounds memory (each connection holds at most what it has sent) without
/// slowing anyone down.
pub const MAX_CONNECTIONS: usize = 64;

/// What the daemon does with registrations ([`super::Registry`] in the daemon).
pub trait Handler: Send + Sync + 'static {
    /// Wires the pod if it is enrolled; answers only once it is fully wired.
    fn add(&self, req: AddPod) -> impl Future<Output = Response> + Send;
    /// Unwires the pod; never fails.
    fn del(&self, req: DelPod) -> impl Future<Output = Response> + Send;
    /// Verifies an enrolled pod's rules and listeners.
    fn check(&self, req: CheckPod) -> impl Future<Output = Response> + Send;
    /// Unwires every pod not listed.
    fn gc(&self, req: Gc) -> impl Future<Output = Response> + Send;
    /// The wired pods.
    fn list(&self) -> Response;
}

/// The file a bind made at the socket path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketFile {
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn at(path: &Path) -> io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }

    /// Removes the file at `path` if it is still this one: during a rolling update the new
    /// daemon binds the same path before the old one stops, and the old one must not take the
    /// new one's socket away with it.
    pub fn remove(self, path: &Path) {
        if Self::at(path).is_ok_and(|now| now == self) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Binds the socket (replacing one from an earlier daemon, or from an older one that is still
/// draining), readable by root only.
pub fn bind(path: &Path) -> io::Result<(UnixListener, SocketFile)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok((listener, SocketFile::at(path)?))
}

/// Serves registrations until `shutdown` fires. Each connection is handled on its own task, so
/// a slow pod never delays another.
pub async fn serve<R: Handler>(
    listener: UnixListener,
    registry: Arc<R>,
    metrics: Arc<Pods>,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        match stream {
            Ok((mut stream, _)) => match permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    let (registry, metrics) = (registry.clone(), metrics.clone());
                    tokio::spawn(async move {
                        handle(stream, registry, &metrics).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    metrics.request("busy", "refused");
                    let busy = Response::Nack {
                        reason: format!(
                            "the node daemon is serving {MAX_CONNECTIONS} registrations; try again"
                        ),
                    };
                    // Best effort and bounded: a registrar that does not read is dropped.
                    tokio::spawn(async move {
                        let frame = encode(&busy);
                        let write = stream.write_all(&frame);
                        let _ = tokio::time::timeout(Duration::from_millis(100), write).await;
                    });
                }
            },
            Err(e) => {
                warn!(
                    error = &e as &dyn std::error::Error,
                    "accepting a registration"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle<R: Handler>(mut stream: UnixStream, registry: Arc<R>, metrics: &Pods) {
    let (command, response) = match read_request(&mut stream).await {
        Ok(Request::AddPod(add)) => ("add", registry.add(add).await),
        Ok(Request::DelPod(del)) => ("del", registry.del(del).await),
        Ok(Request::CheckPod(check)) => ("check", registry.check(check).await),
        Ok(Request::Gc(gc)) => ("gc", registry.gc(gc).await),
        Ok(Request::ListPods) => ("list", registry.list()),
        Err(reason) => {
            debug!(%reason, "bad registration request");
            ("invalid", Response::Nack { reason })
        }
    };
    let result = match response {
        Response::Nack { .. } => "refused",
        _ => "ok",
    };
    metrics.request(command, result);
    if let Err(e) = stream.write_all(&encode(&response)).await {
        debug!(
            error = &e as &dyn std::error::Error,
            "registrar left before the answer"
        );
    }
}

async fn read_request(stream: &mut UnixStream) -> Result<Request, String> {
    let read = async {
        let mut prefix = [0u8; 4];
        stream
            .read_exact(&mut prefix)
            .await
            .map_err(|e| format!("reading request: {e}"))?;
        let len = frame_len(prefix).map_err(|e| e.to_string())?;
        // Grow with what arrives rather than reserving what the prefix announces: a registrar
        // that promises a megabyte and sends it slowly holds only what it has sent.
        let mut payload = Vec::with_capacity(len.min(4 << 10));
        let read = (&mut *stream)
            .take(len as u64)
            .read_to_end(&mut payload)
            .await
            .map_err(|e| format!("reading request: {e}"))?;
        if read < len {
            return Err(format!(
                "reading request: the frame ended after {read} of {len} bytes"
            ));
        }
        decode(&payload).map_err(|e| e.to_string())
    };
    tokio::time::timeout(READ_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| Err("request not received within 10s".to_owned()))
}

#[cfg(test)]
mod tests {
    use culvert_cni_proto::{PodStatus, Request};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    struct Empty;

    impl Handler for Empty {
        async fn add(&self, _req: AddPod) -> Response {
            Response::Added { enrolled: false }
        }
        async fn del(&self, _req: DelPod) -> Response {
            Response::Removed
        }
        async fn check(&self, _req: CheckPod) -> Response {
            Response::Checked
        }
        async fn gc(&self, _req: Gc) -> Response {
            Response::Removed
        }
        fn list(&self) -> Response {
            Response::Pods {
                pods: Vec::<PodStatus>::new(),
            }
        }
    }

    async fn send_raw(path: &Path, bytes: &[u8]) -> Response {
        let mut stream = UnixStream::connect(path).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut prefix = [0u8; 4];
        stream.read_exact(&mut prefix).await.unwrap();
        let mut payload = vec![0u8; frame_len(prefix).unwrap()];
        stream.read_exact(&mut payload).await.unwrap();
        decode(&payload).unwrap()
    }

    #[tokio::test]
    async fn bad_requests_get_a_reason_and_the_server_keeps_serving() {
        let path =
            std::env::temp_dir().join(format!("culvert-cni-test-{}.sock", std::process::id()));
        let (listener, _) = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "registration socket must be root-only");
        let stop = CancellationToken::new();
        let metrics = crate::metrics::Metrics::new();
        let served = serve(
            listener,
            Arc::new(Empty),
            metrics.pods.clone(),
            stop.clone(),
        );
        tokio::spawn(served);

        let oversized = (culvert_cni_proto::MAX_FRAME as u32 + 1).to_be_bytes();
        let mut garbage = 5u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(b"\xff{}{x");
        let mut other_version = Vec::new();
        let body = br#"{"version":9,"body":{"type":"list_pods"}}"#;
        other_version.extend_from_slice(&(body.len() as u32).to_be_bytes());
        other_version.extend_from_slice(body);
        for (bytes, want) in [
            (&oversized[..], "exceeds the 1048576-byte limit"),
            (&garbage[..], "malformed message"),
            (&other_version[..], "peer speaks protocol version 9"),
            (&[0, 0][..], "reading request"),
        ] {
            match send_raw(&path, bytes).await {
                Response::Nack { reason } => {
                    assert!(reason.contains(want), "{reason:?} lacks {want:?}")
                }
                other => panic!("{want}: answered {other:?}"),
            }
        }
        let listed = send_raw(&path, &encode(&Request::ListPods)).await;
        assert_eq!(listed, Response::Pods { pods: vec![] });
        let scrape = metrics.encode_text();
        for counted in [
            "culvert_cni_requests_total{command=\"invalid\",result=\"refused\"} 4",
            "culvert_cni_requests_total{command=\"list\",result=\"ok\"} 1",
        ] {
            assert!(scrape.contains(counted), "{counted} not in {scrape}");
        }
        stop.cancel();
    }

    fn pods() -> Arc<Pods> {
        crate::metrics::Metrics::new().pods
    }

    #[tokio::test]
    async fn registrations_beyond_the_cap_are_answered_busy_and_the_rest_are_served() {
        let path =
            std::env::temp_dir().join(format!("culvert-cni-cap-{}.sock", std::process::id()));
        let (listener, _) = bind(&path).unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, Arc::new(Empty), pods(), stop.clone()));
        // Each announces a full frame and sends none of it: they hold their places.
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut stream = UnixStream::connect(&path).await.unwrap();
            let len = culvert_cni_proto::MAX_FRAME as u32;
            stream.write_all(&len.to_be_bytes()).await.unwrap();
            held.push(stream);
        }
        // Once the server has accepted them all, the next one is refused.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let listed = loop {
            match send_raw(&path, &encode(&Request::ListPods)).await {
                Response::Nack { reason } => break reason,
                Response::Pods { .. } => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "{MAX_CONNECTIONS} held connections and one more was still served"
                    );
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                other => panic!("{other:?}"),
            }
        };
        assert!(listed.contains("try again"), "{listed}");
        drop(held);
        // Places free up as the held connections close.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if matches!(
                send_raw(&path, &encode(&Request::ListPods)).await,
                Response::Pods { .. }
            ) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never served again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
    }

    #[tokio::test]
    async fn a_draining_daemon_leaves_its_successors_socket_in_place() {
        let path =
            std::env::temp_dir().join(format!("culvert-cni-surge-{}.sock", std::process::id()));
        let (_old, old_file) = bind(&path).unwrap();
        let (new, new_file) = bind(&path).unwrap();
        old_file.remove(&path);
        assert!(path.exists(), "the old daemon removed the new one's socket");
        let stop = CancellationToken::new();
        tokio::spawn(serve(new, Arc::new(Empty), pods(), stop.clone()));
        let listed = send_raw(&path, &encode(&Request::ListPods)).await;
        assert!(matches!(listed, Response::Pods { .. }), "{listed:?}");
        new_file.remove(&path);
        assert!(!path.exists(), "the last daemon's socket outlived it");
        stop.cancel();
    }
}
