//! The lab: two simulated Kubernetes nodes and their pods in network namespaces on one machine,
//! each node running a real `culvert node` and each pod wired by a real CNI chain.
//!
//! Scaffolding around the product, never part of it: the `culvert` binary links none of this.
//! The demo (`culvert-demo`), the netns and kube test layers and the benchmark harness all build
//! the same topology from here. [`Lab`] builds and tears down nodes and pods, [`runtime`] runs a
//! CNI configuration's plugins as a container runtime does, [`wire`] captures what crosses
//! between the nodes, and [`serve`], [`echo`] and [`exchange`] are the apps that run in pods.

// The lab is synchronous code that times real processes; tokio's paused clock is irrelevant.
#![allow(clippy::disallowed_types)]

mod lab;
pub mod runtime;
pub mod wire;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

pub use lab::{
    Lab, NODE_CAPABILITIES, Node, PRIMARY_CONFIG, Pod, PodSpec, REFERENCE_PLUGINS, Spec, admin_get,
    netns_path, probe,
};

/// Accepts on `listener` from a background thread, serving each connection on its own thread.
pub fn serve(listener: TcpListener, app: fn(TcpStream)) {
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || app(stream));
        }
    });
}

/// Echoes until the client half-closes, then half-closes too.
pub fn echo(mut stream: TcpStream) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// Sends `payload`, half-closes, and returns everything the peer sent back.
pub fn exchange(mut stream: TcpStream, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = stream.try_clone()?;
    let reading = std::thread::spawn(move || {
        let mut back = Vec::new();
        reader.read_to_end(&mut back).map(|_| back)
    });
    stream.write_all(payload)?;
    stream.shutdown(std::net::Shutdown::Write)?;
    reading
        .join()
        .map_err(|_| std::io::Error::other("reader thread panicked"))?
}
