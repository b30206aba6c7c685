//! `culvert-bench`: Culvert against direct TCP, in one two-node topology, in one run.
//!
//! The lab holds two pod pairs on the same nodes, bridges and wire: `client`→`server`, enrolled
//! (redirected, HBONE over mTLS), and `dclient`→`dserver`, not enrolled (plain TCP, the
//! physical limit of the topology). Every test runs on both pairs, interleaved, in every
//! repetition; the daemons restart before each repetition. Needs root.

#![allow(clippy::print_stdout, clippy::print_stderr, clippy::disallowed_types)]

mod ca;
mod load;
mod node;
mod report;
mod scale;
mod scale_api;
mod tunnels;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::{Parser, Subcommand};
use culvert_lab::{Lab, PodSpec, Spec};
use serde::{Deserialize, Serialize};

#[derive(Parser)]
#[command(
    name = "culvert-bench",
    about = "Culvert against direct TCP, side by side"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the benchmark (root).
    Run(RunArgs),
    /// Compare two result files: each median of NEW as a ratio of OLD's.
    Compare { old: PathBuf, new: PathBuf },
    /// culvert ca's signing rate and a restarted node's wait for its certificates (root; the
    /// test apiserver from scripts/kube-test-env).
    Ca(ca::CaArgs),
    /// What the node's view of a large synthetic cluster costs: memory per pod, relist peak,
    /// event-to-snapshot time (no root).
    Scale(scale::ScaleArgs),
    /// The same view of a cluster held by the real test apiserver: memory per pod against the
    /// synthetic figure, time to ready, list and watch bytes (the test apiserver from
    /// scripts/kube-test-env).
    ScaleApi(scale_api::ScaleApiArgs),
    /// One node with many enrolled pods: time to wire each, memory, fds, rules, listeners,
    /// restart to all rewired (root).
    Node(node::NodeArgs),
    /// Many concurrent tunnels between two nodes: memory and descriptors per tunnel, what is
    /// left once they close (root).
    Tunnels(tunnels::TunnelsArgs),
    /// One side of `tunnels`' load, in a pod's namespace (internal).
    #[command(hide = true)]
    #[command(subcommand)]
    TunnelHold(tunnels::Hold),
    /// One measured view, for `scale-api` (internal).
    #[command(hide = true)]
    ScaleView { source: String, arg: String },
}

#[derive(clap::Args)]
struct RunArgs {
    /// One repetition with short tests, for development.
    #[arg(long)]
    quick: bool,
    /// Repetitions (each restarts the daemons); at least 3 for a report.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Where to write every figure, as JSON.
    #[arg(long, default_value = "bench-results.json")]
    out: PathBuf,
    /// Where to write the Markdown table (default: next to --out, .md).
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Run only the tests whose name contains this text (for profiling one of them).
    #[arg(long)]
    only: Option<String>,
    /// The daemons' log filter (the access log needs `access=info`; the path check reads it).
    #[arg(long, default_value = "warn,access=info")]
    daemon_log: String,
}

/// How the traffic travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Mode {
    Direct,
    Culvert,
}

impl Mode {
    fn pods(self) -> (&'static str, &'static str) {
        match self {
            Self::Direct => ("dclient", "dserver"),
            Self::Culvert => ("client", "server"),
        }
    }
}

/// One test in one mode in one repetition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Sample {
    pub(crate) test: String,
    pub(crate) mode: Mode,
    pub(crate) rep: usize,
    /// Gbit/s for throughput tests; operations per second otherwise.
    pub(crate) rate: f64,
    /// Microseconds: p50, p90, p99, p99.9 (request/response and connection tests).
    pub(crate) latency_us: Option<[f64; 4]>,
    /// Daemon CPU seconds per second, node-a then node-b.
    pub(crate) cpu: [f64; 2],
    /// Daemon CPU per unit of work, node-a then node-b: seconds per GiB for throughput,
    /// microseconds per operation otherwise.
    pub(crate) cpu_per_unit: [f64; 2],
    /// Daemon RSS and VmHWM at the end of the test, KiB, node-a then node-b.
    pub(crate) rss_kib: [u64; 2],
    pub(crate) hwm_kib: [u64; 2],
}

/// A whole run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Results {
    pub(crate) machine: String,
    pub(crate) quick: bool,
    pub(crate) reps: usize,
    /// Daemon RSS right after each restart, KiB, per repetition, node-a then node-b.
    pub(crate) idle_rss_kib: Vec<[u64; 2]>,
    /// The same, split into file-backed pages (code, libraries) and anonymous memory (heap,
    /// stacks), KiB, from `/proc/<pid>/smaps_rollup`.
    #[serde(default)]
    pub(crate) idle_split_kib: Vec<[(u64, u64); 2]>,
    pub(crate) samples: Vec<Sample>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => run(&args),
        Cmd::Compare { old, new } => report::compare(&old, &new),
        Cmd::Ca(args) => ca::run(&args),
        Cmd::Scale(args) => scale::run(&args),
        Cmd::ScaleApi(args) => scale_api::run(&args),
        Cmd::Node(args) => node::run(&args),
        Cmd::Tunnels(args) => tunnels::run(&args),
        Cmd::TunnelHold(args) => tunnels::hold(&args),
        Cmd::ScaleView { source, arg } => scale_api::child(&source, &arg),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("culvert-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 7001;
const CONN_PORT: u16 = 7002;

fn run(args: &RunArgs) -> anyhow::Result<()> {
    let reps = if args.quick { 1 } else { args.reps.max(1) };
    let (iperf_secs, load_secs) = if args.quick { (2, 2) } else { (10, 5) };
    let culvert = std::env::current_exe()?.with_file_name("culvert");
    ensure!(
        culvert.exists(),
        "{} is missing: cargo build --release --workspace --bins",
        culvert.display()
    );
    let spec = Spec {
        pods: vec![
            PodSpec::new("client", 0, true),
            PodSpec::new("server", 1, true),
            PodSpec::new("dclient", 0, false),
            PodSpec::new("dserver", 1, false),
        ],
        mesh_mode: "PERMISSIVE",
        enrolled_namespaces: vec![],
        services: vec![],
        node_flags: vec!["--log".into(), args.daemon_log.clone()],
        kubeconfig: None,
        ca: vec![],
        cert_ttl: None,
        node_file_extra: String::new(),
    };
    eprintln!("culvert-bench: building the lab ({reps} repetition(s))");
    let lab = Lab::start("cvbench", &culvert, spec)?;
    let mut servers = Vec::new();
    // Many short connections: let TIME_WAIT ports be reused, as busy clients configure. The
    // server pods need it too: through Culvert the side that closes first toward the server is
    // the daemon's upstream socket, which lives in the server's pod, so the client's TIME_WAIT
    // moves there (with the same address and port space the client had).
    for pod in ["client", "dclient", "server", "dserver"] {
        sysctl(&lab, pod, "net.ipv4.tcp_tw_reuse", "1")?;
        sysctl(&lab, pod, "net.ipv4.ip_local_port_range", "1024 65000")?;
    }
    for pod in ["server", "dserver"] {
        let p = lab.pod(pod);
        servers.push(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &p.netns,
                    "iperf3",
                    "-s",
                    "-p",
                    &IPERF_PORT.to_string(),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting iperf3 (apt-get install iperf3)")?,
        );
        load::serve_echo(p.listen(ECHO_PORT)?);
        load::serve_one_byte(p.listen(CONN_PORT)?, 16)?;
    }
    std::thread::sleep(Duration::from_millis(300));

    let tests: Vec<(&str, Test)> = vec![
        (
            "throughput, 1 stream, a→b",
            Test::Iperf {
                reverse: false,
                streams: 1,
                secs: iperf_secs,
            },
        ),
        (
            "throughput, 1 stream, b→a",
            Test::Iperf {
                reverse: true,
                streams: 1,
                secs: iperf_secs,
            },
        ),
        (
            "throughput, 8 streams, a→b",
            Test::Iperf {
                reverse: false,
                streams: 8,
                secs: iperf_secs,
            },
        ),
        (
            "request/response, 1 B",
            Test::RequestResponse {
                size: 1,
                secs: load_secs,
            },
        ),
        (
            "request/response, 1 KiB",
            Test::RequestResponse {
                size: 1024,
                secs: load_secs,
            },
        ),
        (
            "connections, 1 worker",
            Test::Connections {
                workers: 1,
                secs: load_secs,
            },
        ),
        (
            "connections, 8 workers",
            Test::Connections {
                workers: 8,
                secs: load_secs,
            },
        ),
    ];
    let tests: Vec<_> = tests
        .into_iter()
        .filter(|(name, _)| args.only.as_ref().is_none_or(|o| name.contains(o.as_str())))
        .collect();
    let mut results = Results {
        machine: report::machine(),
        quick: args.quick,
        reps,
        idle_rss_kib: vec![],
        idle_split_kib: vec![],
        samples: vec![],
    };
    for rep in 0..reps {
        for node in 0..2 {
            lab.stop_node(node, nix::sys::signal::Signal::SIGTERM)?;
            lab.start_node(node)?;
        }
        verify_paths(&lab)?;
        std::thread::sleep(Duration::from_millis(500));
        results.idle_rss_kib.push([0, 1].map(|i| memory(&lab, i).0));
        results
            .idle_split_kib
            .push([0, 1].map(|i| rss_split(&lab, i)));
        for (name, test) in &tests {
            for mode in [Mode::Direct, Mode::Culvert] {
                let sample = measure(&lab, name, *test, mode, rep)?;
                eprintln!("  rep {rep} {mode:?}: {name}: {:.2}", sample.rate);
                results.samples.push(sample);
            }
        }
    }
    for mut server in servers {
        let _ = server.kill();
        let _ = server.wait();
    }
    let markdown = report::markdown(&results);
    std::fs::write(&args.out, serde_json::to_vec_pretty(&results)?)?;
    let md_path = args
        .markdown
        .clone()
        .unwrap_or_else(|| args.out.with_extension("md"));
    std::fs::write(&md_path, &markdown)?;
    println!("{markdown}");
    eprintln!(
        "culvert-bench: wrote {} and {}",
        args.out.display(),
        md_path.display()
    );
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Test {
    Iperf {
        reverse: bool,
        streams: usize,
        secs: u64,
    },
    RequestResponse {
        size: usize,
        secs: u64,
    },
    Connections {
        workers: usize,
        secs: u64,
    },
}

/// Aborts unless the Culvert pair really talks over HBONE (mTLS, with the client's identity
/// proven) and the direct pair really does not.
fn verify_paths(lab: &Lab) -> anyhow::Result<()> {
    for (client, server) in [Mode::Culvert.pods(), Mode::Direct.pods()] {
        let to = std::net::SocketAddr::from((lab.pod(server).ip, ECHO_PORT));
        let back = culvert_lab::exchange(lab.pod(client).connect(to)?, b"probe")?;
        ensure!(back == b"probe", "{client} -> {server}: probe failed");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = lab.log(1);
        let line = log.lines().rev().find(|l| {
            l.contains("\"pod\":\"demo/server\"") && l.contains("\"transport\":\"hbone\"")
        });
        if let Some(line) = line {
            ensure!(
                line.contains("\"src.id\":\"spiffe://cluster.local/ns/demo/sa/client\""),
                "the Culvert path is HBONE but without the client's identity: {line}"
            );
            break;
        }
        if Instant::now() > deadline {
            bail!("no HBONE access-log line for client -> server: the Culvert path is not mTLS");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(
        !lab.log(1).contains("\"pod\":\"demo/dserver\""),
        "the direct path went through Culvert"
    );
    Ok(())
}

fn measure(lab: &Lab, name: &str, test: Test, mode: Mode, rep: usize) -> anyhow::Result<Sample> {
    let (client, server) = mode.pods();
    let server_ip = lab.pod(server).ip;
    let cpu_before = [0, 1].map(|i| cpu_ticks(lab, i));
    let started = Instant::now();
    let (rate, units, latency_us) = match test {
        Test::Iperf {
            reverse,
            streams,
            secs,
        } => {
            let mut cmd = Command::new("ip");
            cmd.args([
                "netns",
                "exec",
                &lab.pod(client).netns,
                "iperf3",
                "-J",
                "-c",
                &server_ip.to_string(),
            ]);
            cmd.args([
                "-p",
                &IPERF_PORT.to_string(),
                "-t",
                &secs.to_string(),
                "-P",
                &streams.to_string(),
            ]);
            if reverse {
                cmd.arg("-R");
            }
            let out = cmd.output().context("running iperf3")?;
            let json: serde_json::Value =
                serde_json::from_slice(&out.stdout).context("iperf3 output")?;
            let sum = &json["end"]["sum_received"];
            let (bps, bytes) = (sum["bits_per_second"].as_f64(), sum["bytes"].as_f64());
            let (Some(bps), Some(bytes)) = (bps, bytes) else {
                bail!("iperf3 failed: {}", json["error"])
            };
            (bps / 1e9, bytes / f64::from(1u32 << 30), None)
        }
        Test::RequestResponse { size, secs } => {
            let to = std::net::SocketAddr::from((server_ip, ECHO_PORT));
            let mut lat =
                load::request_response(lab.pod(client), to, size, Duration::from_secs(secs))?;
            let n = lat.len() as f64;
            (n / secs as f64, n, Some(quantiles(&mut lat)))
        }
        Test::Connections { workers, secs } => {
            let to = std::net::SocketAddr::from((server_ip, CONN_PORT));
            let mut lat =
                load::connections(lab.pod(client), to, workers, Duration::from_secs(secs))?;
            let n = lat.len() as f64;
            (n / secs as f64, n, Some(quantiles(&mut lat)))
        }
    };
    let wall = started.elapsed().as_secs_f64();
    let cpu_s = [0, 1].map(|i| ticks_to_secs(cpu_ticks(lab, i).saturating_sub(cpu_before[i])));
    let per_unit = |s: f64| match test {
        Test::Iperf { .. } => s / units,
        _ => s * 1e6 / units,
    };
    let mem = [0, 1].map(|i| memory(lab, i));
    Ok(Sample {
        test: name.to_owned(),
        mode,
        rep,
        rate,
        latency_us,
        cpu: cpu_s.map(|s| s / wall),
        cpu_per_unit: cpu_s.map(per_unit),
        rss_kib: mem.map(|m| m.0),
        hwm_kib: mem.map(|m| m.1),
    })
}

fn quantiles(lat: &mut load::Latencies) -> [f64; 4] {
    [0.5, 0.9, 0.99, 0.999].map(|q| lat.quantile_us(q))
}

/// utime + stime of node `i`'s daemon, in clock ticks.
fn cpu_ticks(lab: &Lab, i: usize) -> u64 {
    lab.daemon_pid(i).map_or(0, process_ticks)
}

/// utime + stime of process `pid`, in clock ticks (0 once it is gone).
pub(crate) fn process_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces, hence the last ')').
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| {
        fields
            .get(n)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

/// Clock ticks as seconds.
#[allow(clippy::cast_precision_loss)]
pub(crate) fn ticks_to_secs(ticks: u64) -> f64 {
    let per_sec = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100);
    ticks as f64 / per_sec as f64
}

/// (VmRSS, VmHWM) of node `i`'s daemon, KiB.
pub(crate) fn memory(lab: &Lab, i: usize) -> (u64, u64) {
    let [rss, hwm] = proc_kib(lab, i, "status", ["VmRSS:", "VmHWM:"]);
    (rss, hwm)
}

/// Open file descriptors of node `i`'s daemon (0 when it runs none).
pub(crate) fn open_fds(lab: &Lab, i: usize) -> usize {
    lab.daemon_pid(i)
        .and_then(|pid| std::fs::read_dir(format!("/proc/{pid}/fd")).ok())
        .map_or(0, Iterator::count)
}

/// (file-backed, anonymous) resident memory of node `i`'s daemon, KiB.
fn rss_split(lab: &Lab, i: usize) -> (u64, u64) {
    let [rss, anon] = proc_kib(lab, i, "smaps_rollup", ["Rss:", "Anonymous:"]);
    (rss.saturating_sub(anon), anon)
}

/// Values in kB of `keys` in `/proc/<daemon pid>/<file>` (0 when absent).
fn proc_kib<const N: usize>(lab: &Lab, i: usize, file: &str, keys: [&str; N]) -> [u64; N] {
    let text = lab
        .daemon_pid(i)
        .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok())
        .unwrap_or_default();
    keys.map(|key| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or(0)
    })
}

pub(crate) fn sysctl(lab: &Lab, pod: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let status = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.pod(pod).netns,
            "sh",
            "-c",
            &format!("echo '{value}' > {path}"),
        ])
        .status()?;
    ensure!(status.success(), "setting {key} in {pod}");
    Ok(())
}
