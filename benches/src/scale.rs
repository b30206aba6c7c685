//! `culvert-bench scale`: what a node daemon's view of a large cluster costs.
//!
//! A synthetic cluster (`culvert::test_util::cluster`: API-shaped JSON for Namespaces, pods,
//! Services and EndpointSlices) goes through the watchers' own decode and apply path into a
//! [`Cluster`], and snapshots are built from it as the daemon builds them. Reported: resident
//! memory after the first list and with a snapshot held, the peak during the list and during
//! a full relist, the memory after rollouts renamed a share of the pods (churn), and the time
//! from one watch event to a new snapshot. No root, no network. Where the bytes go, allocation
//! by allocation: the memory test (`tests/memory`), which counts them and can write a dhat heap
//! profile.

use std::time::Instant;

use anyhow::Context as _;
use culvert::discovery::{Cluster, Settings};
use culvert::state::PeerAuthentication;
use culvert::test_util::cluster::Shape;
use serde::Serialize;

#[derive(clap::Args)]
pub(crate) struct ScaleArgs {
    /// Pods in the cluster (15 per Deployment, one Service each, 66 Deployments a namespace).
    #[arg(long, default_value_t = 1_000_000)]
    pods: usize,
    /// Single-pod events, each followed by a new snapshot, for the per-event figure.
    #[arg(long, default_value_t = 200)]
    events: usize,
    /// Share of Deployments rolled out (pods renamed, new template hash) for the churn figure.
    #[arg(long, default_value_t = 0.5)]
    churn: f64,
    /// Where to write the figures, as JSON.
    #[arg(long, default_value = "bench-scale.json")]
    out: std::path::PathBuf,
}

#[derive(Serialize)]
struct Figures {
    pods: usize,
    services: usize,
    namespaces: usize,
    nodes: usize,
    /// Before any object: the process's own baseline.
    baseline_mib: f64,
    /// After the first list, records only.
    listed_mib: f64,
    list_peak_mib: f64,
    list_secs: f64,
    /// Records plus one snapshot: what the daemon holds steady.
    steady_mib: f64,
    steady_bytes_per_pod: f64,
    first_snapshot_ms: f64,
    /// From one pod event to a new snapshot, median and max over `events`.
    event_to_snapshot_ms_median: f64,
    event_to_snapshot_ms_max: f64,
    /// After rolling out `churn` of the Deployments (and a snapshot of the result).
    churned_deployments: usize,
    churned_mib: f64,
    /// A full relist (after a 410) with the old snapshot held until the new one is built.
    relist_peak_mib: f64,
    relisted_mib: f64,
}

/// VmRSS and VmHWM, in MiB.
pub(crate) fn memory() -> anyhow::Result<(f64, f64)> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let field = |name: &str| -> anyhow::Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/self/status"))?;
        let kib: f64 = line
            .split_whitespace()
            .nth(1)
            .context("malformed /proc/self/status")?
            .parse()?;
        Ok(kib / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Starts a new peak: the kernel resets VmHWM to the current RSS.
fn reset_peak() -> anyhow::Result<()> {
    std::fs::write("/proc/self/clear_refs", "5").context("resetting the peak RSS")
}

pub(crate) fn settings() -> Settings {
    Settings {
        trust_domain: "cluster.local".into(),
        peer_authentication: PeerAuthentication::Permissive,
        policy: culvert::policy::Settings::default(),
        file_policies: std::sync::Arc::default(),
    }
}

pub(crate) fn run(args: &ScaleArgs) -> anyhow::Result<()> {
    let shape = Shape::new(args.pods);
    let settings = settings();
    let cluster = Cluster::new("cluster.local");
    let (baseline, _) = memory()?;
    reset_peak()?;

    let started = Instant::now();
    shape.list(&cluster, 0);
    let list_secs = started.elapsed().as_secs_f64();
    let (listed, list_peak) = memory()?;
    eprintln!(
        "listed {:?} in {list_secs:.1}s: {listed:.0} MiB (peak {list_peak:.0})",
        cluster.counts()
    );

    let started = Instant::now();
    let mut snapshot = cluster.snapshot(&settings);
    let first_snapshot_ms = started.elapsed().as_secs_f64() * 1e3;
    let (steady, _) = memory()?;
    anyhow::ensure!(
        snapshot.workload_count() == args.pods,
        "the snapshot lost pods"
    );
    eprintln!("snapshot in {first_snapshot_ms:.0} ms: {steady:.0} MiB");

    // Each event a change to the index: a newer pod takes over an IP (two workloads
    // rewritten), then is deleted and the older one gets it back.
    let mut per_event = Vec::with_capacity(args.events);
    for e in 0..args.events {
        let i = e / 2 * 7919 % args.pods;
        let started = Instant::now();
        if e % 2 == 0 {
            shape.apply_pod(&cluster, i, 9);
        } else {
            shape.delete_pod(&cluster, i, 9);
        }
        snapshot = cluster.snapshot(&settings);
        per_event.push(started.elapsed().as_secs_f64() * 1e3);
        let pods = args.pods + (e % 2 == 0) as usize;
        anyhow::ensure!(snapshot.workload_count() == pods, "the snapshot lost pods");
    }
    per_event.sort_by(f64::total_cmp);

    // Rollouts: a share of the Deployments get new pods (names, hashes), the old ones go.
    let churned = (shape.services() as f64 * args.churn) as usize;
    for s in 0..churned {
        shape.roll_out(&cluster, s, 0, 1);
    }
    snapshot = cluster.snapshot(&settings);
    let (churned_mib, _) = memory()?;
    anyhow::ensure!(snapshot.workload_count() == args.pods, "rollouts lost pods");
    eprintln!("{churned} Deployments rolled out: {churned_mib:.0} MiB");

    // A relist after a 410 Gone, while the daemon serves the last snapshot.
    reset_peak()?;
    shape.list(&cluster, 1);
    let relisted = cluster.snapshot(&settings);
    let (_, relist_peak) = memory()?;
    drop(std::mem::replace(&mut snapshot, relisted));
    let (relisted_mib, _) = memory()?;
    anyhow::ensure!(
        snapshot.workload_count() == args.pods,
        "the snapshot lost pods"
    );

    let median = per_event
        .get(per_event.len() / 2)
        .copied()
        .unwrap_or_default();
    let figures = Figures {
        pods: args.pods,
        services: shape.services(),
        namespaces: shape.namespaces(),
        nodes: shape.nodes,
        baseline_mib: baseline,
        listed_mib: listed,
        list_peak_mib: list_peak,
        list_secs,
        steady_mib: steady,
        steady_bytes_per_pod: (steady - baseline) * 1024.0 * 1024.0 / args.pods as f64,
        first_snapshot_ms,
        event_to_snapshot_ms_median: median,
        event_to_snapshot_ms_max: per_event.last().copied().unwrap_or_default(),
        churned_deployments: churned,
        churned_mib,
        relist_peak_mib: relist_peak,
        relisted_mib,
    };
    let json = serde_json::to_string_pretty(&figures)?;
    println!("{json}");
    std::fs::write(&args.out, json + "\n")
        .with_context(|| format!("writing {}", args.out.display()))?;
    Ok(())
}
