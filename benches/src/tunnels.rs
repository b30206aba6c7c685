//! `culvert-bench tunnels`: many concurrent tunnels through one pair of nodes (root).
//!
//! An enrolled client pod on node-a opens `N` connections to an enrolled server pod on node-b
//! and holds them; each carries one echoed byte first, so every tunnel is known to reach the
//! server. node-a's daemon then holds one accepted socket per tunnel and node-b's one upstream
//! socket per tunnel, with the HBONE connections between them. Reported per round: both
//! daemons' resident memory and file descriptors before, while the tunnels are open and after
//! they close, and from those the memory and descriptors per tunnel. A last round at the
//! largest size repeats one before it: what a closed round leaves behind shows as growth there.
//!
//! The ends of the tunnels live in child processes of this binary (`tunnel-hold`), run in the
//! pods' namespaces, a few thousand sockets each: a process may hold no more descriptors than
//! its hard limit, and on a machine that cannot raise it (no `CAP_SYS_RESOURCE`) that limit
//! also bounds how many tunnels one daemon can hold, which the run reports.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use culvert_lab::{Lab, PodSpec, Spec};
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Tunnels per holder process: well under any usual descriptor limit.
const CHUNK: usize = 5_000;
/// The first of the server holders' ports, one port per holder.
const FIRST_PORT: u16 = 7100;
/// Connections a client holder opens at once.
const IN_FLIGHT: usize = 64;
/// How long the daemons get to close a round's sockets.
const DRAIN: Duration = Duration::from_secs(60);

#[derive(clap::Args)]
pub(crate) struct TunnelsArgs {
    /// Concurrent tunnels in each round; the last repeats to show what closed rounds leave.
    /// Default: as many as this process's descriptor limit lets one daemon hold.
    #[arg(long, value_delimiter = ',')]
    rounds: Vec<usize>,
    /// Where to write the figures, as JSON.
    #[arg(long, default_value = "bench-tunnels.json")]
    out: std::path::PathBuf,
}

/// One side of the load, inside a pod's namespace (internal).
#[derive(clap::Subcommand)]
pub(crate) enum Hold {
    /// Accept on `port`, echo each connection's first byte, hold it.
    Serve { port: u16 },
    /// Open `count` connections to `to`, each echoing one byte, and hold them.
    Connect { to: SocketAddr, count: usize },
}

/// One daemon's holdings.
#[derive(Debug, Clone, Copy, Serialize)]
struct Held {
    rss_kib: u64,
    fds: usize,
}

#[derive(Debug, Serialize)]
struct Round {
    tunnels: usize,
    /// node-a (client side) then node-b (server side).
    before: [Held; 2],
    open: [Held; 2],
    after: [Held; 2],
    /// (open - idle) / tunnels, idle being both daemons before the first round.
    kib_per_tunnel: [f64; 2],
    fds_per_tunnel: [f64; 2],
    /// From the first connection to the last echo, s.
    open_secs: f64,
    /// From closing the client ends to both daemons back at their descriptor count before the
    /// round, plus the HBONE connections a pool keeps, s.
    drain_secs: f64,
}

#[derive(Serialize)]
struct Figures {
    machine: String,
    /// The hard limit on open files every process here inherits.
    nofile_hard: u64,
    rounds: Vec<Round>,
}

pub(crate) fn run(args: &TunnelsArgs) -> anyhow::Result<()> {
    let nofile = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)?.1;
    // The daemon on each side holds one socket per tunnel, one per hundred tunnels for HBONE,
    // and a few hundred of its own; keep that under the limit.
    let most = (nofile.saturating_sub(500) * 100 / 101) as usize / 1_000 * 1_000;
    let rounds = if args.rounds.is_empty() {
        let third = most / 3 / 1_000 * 1_000;
        vec![third, 2 * third, most, most]
    } else {
        args.rounds.clone()
    };
    let largest = rounds.iter().copied().max().unwrap_or(0);
    ensure!(largest > 0, "--rounds: at least one tunnel");
    ensure!(
        largest <= most,
        "{largest} tunnels need more than the {nofile} open files this process and the daemons may hold"
    );
    let culvert = std::env::current_exe()?.with_file_name("culvert");
    let caps: Vec<String> = [
        ("--hbone-max-connections-per-peer", largest),
        ("--hbone-max-streams", largest + 1),
        ("--hbone-max-streams-per-peer", largest + 1),
    ]
    .iter()
    .flat_map(|(flag, n)| [flag.to_string(), n.to_string()])
    .collect();
    let spec = Spec {
        pods: vec![
            PodSpec::new("client", 0, true),
            PodSpec::new("server", 1, true),
        ],
        mesh_mode: "PERMISSIVE",
        enrolled_namespaces: vec![],
        services: vec![],
        node_flags: [vec!["--log".into(), "warn".into()], caps].concat(),
        kubeconfig: None,
        ca: vec![],
        cert_ttl: None,
        node_file_extra: String::new(),
    };
    eprintln!("culvert-bench tunnels: rounds of {rounds:?} tunnels");
    let lab = Lab::start("cvtun", &culvert, spec)?;
    for pod in ["client", "server"] {
        crate::sysctl(&lab, pod, "net.ipv4.ip_local_port_range", "1024 65000")?;
    }
    let holders = largest.div_ceil(CHUNK);
    let mut servers = Holders::default();
    for i in 0..holders {
        let port = FIRST_PORT + i as u16;
        servers.spawn(&lab, "server", &["serve", &port.to_string()])?;
    }
    servers.wait_ready()?;
    let server_ip = lab.pod("server").ip;

    let idle = [0, 1].map(|i| held(&lab, i));
    let mut figures = Figures {
        machine: crate::report::machine(),
        nofile_hard: nofile,
        rounds: Vec::new(),
    };
    for tunnels in rounds {
        let before = [0, 1].map(|i| held(&lab, i));
        let started = Instant::now();
        let mut clients = Holders::default();
        for i in 0..tunnels.div_ceil(CHUNK) {
            let count = CHUNK.min(tunnels - i * CHUNK);
            let to = SocketAddr::from((server_ip, FIRST_PORT + i as u16));
            clients.spawn(
                &lab,
                "client",
                &["connect", &to.to_string(), &count.to_string()],
            )?;
        }
        clients.wait_ready()?;
        let open_secs = started.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_secs(2));
        let open = [0, 1].map(|i| held(&lab, i));
        drop(clients);
        let closed = Instant::now();
        // A pool keeps at most one HBONE connection per hundred streams it carried.
        let slack = tunnels.div_ceil(100) + 4;
        while [0, 1]
            .iter()
            .any(|&i| held(&lab, i).fds > before[i].fds + slack)
        {
            ensure!(
                closed.elapsed() < DRAIN,
                "the daemons still hold {:?} descriptors {DRAIN:?} after {tunnels} tunnels closed",
                [0, 1].map(|i| held(&lab, i).fds)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let drain_secs = closed.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_secs(2));
        let after = [0, 1].map(|i| held(&lab, i));
        let per =
            |f: fn(&Held) -> f64| [0, 1].map(|i| (f(&open[i]) - f(&idle[i])) / tunnels as f64);
        let round = Round {
            tunnels,
            kib_per_tunnel: per(|h| h.rss_kib as f64),
            fds_per_tunnel: per(|h| h.fds as f64),
            before,
            open,
            after,
            open_secs,
            drain_secs,
        };
        eprintln!("{round:?}");
        figures.rounds.push(round);
    }
    drop(servers);
    let json = serde_json::to_string_pretty(&figures)?;
    println!("{json}");
    std::fs::write(&args.out, json + "\n")
        .with_context(|| format!("writing {}", args.out.display()))
}

fn held(lab: &Lab, i: usize) -> Held {
    Held {
        rss_kib: crate::memory(lab, i).0,
        fds: crate::open_fds(lab, i),
    }
}

/// Holder processes; dropping them closes their stdin, which ends them and their sockets.
#[derive(Default)]
struct Holders(Vec<(Child, BufReader<std::process::ChildStdout>)>);

impl Holders {
    /// Starts one in `pod`'s namespace.
    fn spawn(&mut self, lab: &Lab, pod: &str, what: &[&str]) -> anyhow::Result<()> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &lab.pod(pod).netns])
            .arg(std::env::current_exe()?)
            .arg("tunnel-hold")
            .args(what)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a tunnel holder")?;
        let stdout = child.stdout.take().context("holder stdout")?;
        self.0.push((child, BufReader::new(stdout)));
        Ok(())
    }

    /// Waits for every holder's `ready`.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        for (_, out) in &mut self.0 {
            let mut line = String::new();
            out.read_line(&mut line)?;
            ensure!(line.starts_with("ready"), "a tunnel holder said {line:?}");
        }
        Ok(())
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        for (child, _) in &mut self.0 {
            drop(child.stdin.take());
        }
        for (child, _) in &mut self.0 {
            let _ = child.wait();
        }
    }
}

/// `tunnel-hold`: one side of the load. Says `ready` once listening or once every connection
/// has echoed its byte, then holds everything until stdin closes.
pub(crate) fn hold(args: &Hold) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let held = match *args {
            Hold::Serve { port } => {
                let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
                tokio::spawn(async move {
                    while let Ok((stream, _)) = listener.accept().await {
                        tokio::spawn(echo_then_hold(stream));
                    }
                });
                Vec::new()
            }
            Hold::Connect { to, count } => connect_all(to, count).await?,
        };
        println!("ready {}", held.len());
        tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink()))
            .await??;
        drop(held);
        Ok(())
    })
}

async fn echo_then_hold(mut stream: tokio::net::TcpStream) {
    let mut byte = [0u8; 1];
    if stream.read_exact(&mut byte).await.is_ok() && stream.write_all(&byte).await.is_ok() {
        // Held until the client closes.
        while matches!(stream.read(&mut byte).await, Ok(n) if n > 0) {}
    }
}

/// Opens `count` connections to `to`, `IN_FLIGHT` at a time, each echoing one byte.
async fn connect_all(to: SocketAddr, count: usize) -> anyhow::Result<Vec<tokio::net::TcpStream>> {
    let mut open = Vec::with_capacity(count);
    let mut pending = tokio::task::JoinSet::new();
    for i in 0..count {
        if pending.len() == IN_FLIGHT
            && let Some(done) = pending.join_next().await
        {
            open.push(done??);
        }
        pending.spawn(async move {
            let tunnel = async {
                let mut stream = tokio::net::TcpStream::connect(to).await?;
                stream.write_all(&[i as u8]).await?;
                let mut back = [0u8; 1];
                stream.read_exact(&mut back).await?;
                ensure!(back[0] == i as u8, "the echo returned another byte");
                anyhow::Ok(stream)
            };
            tokio::time::timeout(Duration::from_secs(30), tunnel)
                .await
                .map_err(|_| anyhow::anyhow!("connection {i} to {to}: no echo in 30 s"))?
                .with_context(|| format!("connection {i} to {to}"))
        });
    }
    while let Some(stream) = pending.join_next().await {
        open.push(stream??);
    }
    Ok(open)
}
