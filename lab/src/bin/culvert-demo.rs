//! `culvert-demo`: two simulated nodes with pods in network namespaces, traffic between them
//! over mTLS, a report of what crossed the wire, and a clean teardown. Needs root.
//!
//! Runs the `culvert` and `culvert-cni` binaries that sit next to this one.

// The demo's report is its output.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, bail, ensure};
use clap::Parser;
use culvert_lab::{Lab, PodSpec, Spec, exchange, wire};

#[derive(Debug, Parser)]
#[command(
    name = "culvert-demo",
    version,
    about = "Two simulated nodes talking over mTLS"
)]
struct Args {
    /// Bytes the client sends through the tunnel (and gets echoed back).
    #[arg(long, default_value_t = 1 << 20)]
    bytes: usize,
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("culvert-demo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the demo; tears the lab down on success, failure and Ctrl-C alike.
fn run(args: Args) -> anyhow::Result<()> {
    let culvert = std::env::current_exe()
        .context("locating this binary")?
        .with_file_name("culvert");
    ensure!(
        culvert.exists(),
        "{} is missing: build it (cargo build -p culvert -p culvert-cni)",
        culvert.display()
    );
    let spec = Spec {
        pods: vec![
            PodSpec::new("client", 0, true),
            PodSpec::new("legacy", 0, false),
            PodSpec {
                peer_authentication: Some("STRICT"),
                ..PodSpec::new("server", 1, true)
            },
        ],
        mesh_mode: "PERMISSIVE",
        enrolled_namespaces: vec![],
        services: vec![],
        node_flags: vec![],
        kubeconfig: None,
        ca: vec![],
        cert_ttl: None,
        node_file_extra: String::new(),
    };
    println!(
        "culvert-demo: two nodes, three pods wired by a CNI chain (bridge, host-local, culvert-cni)..."
    );
    let lab = Arc::new(Lab::start("cvdemo", &culvert, spec)?);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let body = {
        let lab = lab.clone();
        runtime.spawn_blocking(move || scenario(&lab, args.bytes))
    };
    let outcome = runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            result = body => result.context("demo thread")?,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
            _ = term.recv() => bail!("terminated"),
        }
    });
    lab.teardown();
    println!("culvert-demo: namespaces and daemons removed");
    outcome
}

fn scenario(lab: &Lab, bytes: usize) -> anyhow::Result<()> {
    let (client, legacy, server) = (lab.pod("client"), lab.pod("legacy"), lab.pod("server"));
    for pod in [client, legacy, server] {
        println!(
            "  {:<7} {:<15} on {}",
            pod.name, pod.ip, lab.nodes[pod.node].name
        );
    }
    server.serve_echo(8080)?;
    let to_server = SocketAddr::from((server.ip, 8080));
    let capture = lab.capture_wire()?;

    let marker = b"culvert-demo-plaintext-marker";
    let mut payload = marker.to_vec();
    payload.extend((0..bytes).map(|i| (i % 251) as u8));
    let started = Instant::now();
    let back = exchange(client.connect(to_server)?, &payload)?;
    let elapsed = started.elapsed();
    ensure!(
        back == payload,
        "echo came back different ({} of {} bytes)",
        back.len(),
        payload.len()
    );
    println!(
        "client -> server:8080  {} bytes sent and echoed back intact in {:.0?}",
        payload.len(),
        elapsed
    );

    let refused = match legacy.connect(to_server) {
        Err(e) => Some(e.to_string()),
        Ok(stream) => exchange(stream, b"hello").err().map(|e| e.to_string()),
    };
    match &refused {
        Some(why) => println!(
            "legacy -> server:8080  refused ({why}): server is STRICT and legacy is not in the mesh"
        ),
        None => bail!("legacy (not enrolled) reached the STRICT server in plaintext"),
    }

    let segments = capture.finish()?;
    let report = wire::Report::of(&segments, 15008);
    let leaked = wire::contains(&segments, marker);
    ensure!(
        !leaked,
        "the plaintext marker was seen on the wire between the nodes"
    );
    ensure!(report.tls13, "no TLS 1.3 handshake was seen on port 15008");
    ensure!(
        report.hbone_bytes >= 2 * payload.len(),
        "the capture is incomplete: {} bytes on 15008, fewer than the {} echoed",
        report.hbone_bytes,
        2 * payload.len()
    );
    println!(
        "wire node-a <-> node-b  {} TCP segments with payload, {} on port 15008 ({} bytes, TLS 1.3), {} on other ports (legacy's refused attempt); plaintext marker seen: no",
        report.segments, report.hbone_segments, report.hbone_bytes, report.other_segments
    );

    let log = lab.log(server.node);
    let seen = log
        .lines()
        .filter(|l| l.contains("\"target\":\"access\"") && l.contains("\"transport\":\"hbone\""))
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .context("no HBONE access-log line on the server's node")?;
    println!(
        "node-b access log      {} -> {} ({} bytes sent, {} received back)",
        seen["src.identity"].as_str().unwrap_or("?"),
        seen["dst.identity"].as_str().unwrap_or("?"),
        seen["bytes_sent"],
        seen["bytes_recv"],
    );
    Ok(())
}
