//! The registration socket: culvert-cni (or the test harness) tells the daemon about pods here.

use std::future::Future;
use std::io;
use std::os::unix::fs::PermissionsExt;
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

/// How long a registrar may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What the daemon does with registrations.
pub trait Registry: Send + Sync + 'static {
    /// Wires the pod if it is enrolled; answers only once it is fully wired.
    fn add(&self, req: AddPod) -> impl Future<Output = Response> + Send;
    /// Unwires the pod; never fails.
    fn del(&self, req: DelPod) -> impl Future<Output = Response> + Send;
    /// Verifies an enrolled pod's rules and listeners.
    fn check(&self, req: CheckPod) -> impl Future<Output = Response> + Send;
    /// Unwires every pod not listed.
    fn gc(&self, req: Gc) -> impl Future<Output = Response> + Send;
    fn list(&self) -> Response;
}

/// Binds the socket (replacing a stale one from an earlier run), readable by root only.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves registrations until `shutdown` fires. Each connection is handled on its own task, so
/// a slow pod never delays another.
pub async fn serve<R: Registry>(
    listener: UnixListener,
    registry: Arc<R>,
    shutdown: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => return,
        };
        match stream {
            Ok((stream, _)) => {
                tokio::spawn(handle(stream, registry.clone()));
            }
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

async fn handle<R: Registry>(mut stream: UnixStream, registry: Arc<R>) {
    let response = match read_request(&mut stream).await {
        Ok(Request::AddPod(add)) => registry.add(add).await,
        Ok(Request::DelPod(del)) => registry.del(del).await,
        Ok(Request::CheckPod(check)) => registry.check(check).await,
        Ok(Request::Gc(gc)) => registry.gc(gc).await,
        Ok(Request::ListPods) => registry.list(),
        Err(reason) => {
            debug!(%reason, "bad registration request");
            Response::Nack { reason }
        }
    };
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
        let mut payload = vec![0u8; len];
        stream
            .read_exact(&mut payload)
            .await
            .map_err(|e| format!("reading request: {e}"))?;
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

    impl Registry for Empty {
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
        let listener = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "registration socket must be root-only");
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, Arc::new(Empty), stop.clone()));

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
        stop.cancel();
    }
}
