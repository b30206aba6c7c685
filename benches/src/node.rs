//! `culvert-bench node`: one node with many enrolled pods (root).
//!
//! A lab node (network namespaces, the reference bridge plugin, culvert-cni chained after it,
//! the node daemon with the lab's local CA) gets `--pods` enrolled pods, one CNI ADD at a time
//! as a runtime starts them. Reported: the time of each ADD (bridge, culvert-cni and the
//! daemon wiring the pod: certificate, listeners, rules), the daemon's memory and file
//! descriptors before and after, the rules and listeners each pod holds, and the time from
//! starting a restarted daemon (SIGTERM, then start) to its registration socket, which opens
//! once every recorded pod is rewired and holds its certificate.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, ensure};
use culvert_cni_proto::{Request, Response};
use culvert_lab::{Lab, PodSpec, Spec};
use serde::Serialize;

#[derive(clap::Args)]
pub(crate) struct NodeArgs {
    /// Enrolled pods on the node (at most 250: one /24 of the lab's).
    #[arg(long, default_value_t = 250)]
    pods: usize,
    /// Daemon restarts measured.
    #[arg(long, default_value_t = 3)]
    restarts: usize,
    /// Where to write the figures, as JSON.
    #[arg(long, default_value = "bench-node.json")]
    out: std::path::PathBuf,
}

/// What the daemon holds.
#[derive(Debug, Serialize)]
struct Held {
    rss_mib: f64,
    fds: usize,
}

#[derive(Serialize)]
struct Figures {
    machine: String,
    pods: usize,
    /// Each CNI ADD, in the order made, ms.
    add_ms: Vec<f64>,
    add_ms_median: f64,
    add_ms_p90: f64,
    add_ms_max: f64,
    /// Before the first pod, and with every pod wired.
    idle: Held,
    wired: Held,
    rss_kib_per_pod: f64,
    fds_per_pod: f64,
    /// In each pod's network namespace (fewest, most): netfilter rules, listening sockets.
    rules_per_pod: (usize, usize),
    listeners_per_pod: (usize, usize),
    /// From starting the daemon again to its registration socket, every pod rewired, s.
    restart_secs: Vec<f64>,
    after_restarts: Held,
}

pub(crate) fn run(args: &NodeArgs) -> anyhow::Result<()> {
    ensure!((1..=250).contains(&args.pods), "--pods: 1 to 250 (one /24)");
    let culvert = std::env::current_exe()?.with_file_name("culvert");
    let names: Vec<String> = (0..args.pods).map(|i| format!("app-{i}")).collect();
    let pods = names
        .iter()
        .map(|name| PodSpec {
            attach: false,
            ..PodSpec::new(name, 0, true)
        })
        .collect();
    let spec = Spec {
        pods,
        mesh_mode: "PERMISSIVE",
        enrolled_namespaces: vec![],
        services: vec![],
        node_flags: vec!["--log".into(), "warn".into()],
        kubeconfig: None,
        ca: vec![],
        cert_ttl: None,
        node_file_extra: String::new(),
    };
    eprintln!("culvert-bench node: building a lab of {} pods", args.pods);
    let lab = Lab::start("cvnode", &culvert, spec)?;
    let idle = held(&lab)?;

    let mut add_ms = Vec::with_capacity(names.len());
    for name in &names {
        let started = Instant::now();
        lab.cni_add(name)
            .with_context(|| format!("CNI ADD of {name}"))?;
        add_ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let wired = held(&lab)?;
    ensure!(listed(&lab)? == names.len(), "not every pod is wired");
    let (mut rules, mut listeners) = (Vec::new(), Vec::new());
    for name in &names {
        let netns = &lab.pod(name).netns;
        rules.push(
            in_netns(netns, &["nft", "-j", "list", "ruleset"])?
                .matches("{\"rule\":")
                .count(),
        );
        listeners.push(in_netns(netns, &["ss", "-Htln"])?.lines().count());
    }
    let range = |v: &[usize]| (*v.iter().min().unwrap_or(&0), *v.iter().max().unwrap_or(&0));

    let mut restart_secs = Vec::new();
    for _ in 0..args.restarts {
        lab.stop_node(0, nix::sys::signal::Signal::SIGTERM)?;
        let started = Instant::now();
        lab.start_node(0)?;
        restart_secs.push(started.elapsed().as_secs_f64());
        ensure!(listed(&lab)? == names.len(), "a restart lost pods");
    }
    let after_restarts = held(&lab)?;

    let mut sorted = add_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    let pods = names.len() as f64;
    let figures = Figures {
        machine: crate::report::machine(),
        pods: names.len(),
        add_ms_median: at(0.5),
        add_ms_p90: at(0.9),
        add_ms_max: at(1.0),
        add_ms,
        rss_kib_per_pod: (wired.rss_mib - idle.rss_mib) * 1024.0 / pods,
        fds_per_pod: (wired.fds - idle.fds) as f64 / pods,
        idle,
        wired,
        rules_per_pod: range(&rules),
        listeners_per_pod: range(&listeners),
        restart_secs,
        after_restarts,
    };
    let json = serde_json::to_string_pretty(&figures)?;
    println!("{json}");
    std::fs::write(&args.out, json + "\n")
        .with_context(|| format!("writing {}", args.out.display()))
}

/// The node daemon's resident memory and open file descriptors.
fn held(lab: &Lab) -> anyhow::Result<Held> {
    lab.daemon_pid(0).context("node-a runs no daemon")?;
    let (rss_kib, _) = crate::memory(lab, 0);
    Ok(Held {
        rss_mib: rss_kib as f64 / 1024.0,
        fds: crate::open_fds(lab, 0),
    })
}

/// How many pods node-a's daemon says it has wired.
fn listed(lab: &Lab) -> anyhow::Result<usize> {
    match lab.call(0, &Request::ListPods)? {
        Response::Pods { pods } => Ok(pods.len()),
        other => anyhow::bail!("ListPods answered {other:?}"),
    }
}

fn in_netns(netns: &str, command: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(command)
        .output()?;
    ensure!(
        out.status.success(),
        "{} in {netns} failed",
        command.join(" ")
    );
    Ok(String::from_utf8(out.stdout)?)
}
