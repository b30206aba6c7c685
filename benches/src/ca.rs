//! `culvert-bench ca`: how fast culvert ca signs, and how long a node that restarts with many
//! pods waits until it holds a certificate for each of them.
//!
//! Everything is real and on this machine: the test apiserver (TokenReview and the node
//! authorizer's pod lookups for every request, as in a cluster), `culvert-ca serve`, and the node
//! daemon's own CA client and certificate cache (`culvert::identity`), which make a P-256 key
//! and CSR per certificate. They share this machine's cores, so the figures are what one small
//! box does end to end, not the CA's signing alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use culvert::identity::{BundleSource, Cache, Endpoint, Id, IstioCa, Roots, Source};
use culvert_tests::kube::{CaServer, Cluster, PodObject};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use serde::Serialize;

/// What the node daemon asks for by default.
const TTL: Duration = Duration::from_secs(24 * 3600);

#[derive(clap::Args)]
pub(crate) struct CaArgs {
    /// Pods on the restarted node, each with its own service account (so its own identity).
    #[arg(long, default_value_t = 250)]
    pods: usize,
    /// Restarts measured.
    #[arg(long, default_value_t = 5)]
    restarts: usize,
    /// Seconds of sustained signing for each number of nodes asking at once.
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Where to write the figures, as JSON.
    #[arg(long, default_value = "bench-ca.json")]
    out: std::path::PathBuf,
}

#[derive(Serialize)]
struct Sustained {
    /// Node clients asking at once, each with at most 8 requests in flight (the daemon's cap).
    nodes: usize,
    certs_per_sec: f64,
    /// culvert ca's own CPU per certificate (TokenReview and pod lookups are the apiserver's).
    ca_cpu_ms_per_cert: f64,
}

#[derive(Serialize)]
struct Results {
    machine: String,
    pods: usize,
    /// Seconds from a fresh client and cache to a certificate held for every pod, per restart.
    restart_secs: Vec<f64>,
    sustained: Vec<Sustained>,
}

pub(crate) fn run(args: &CaArgs) -> anyhow::Result<()> {
    let cluster = Cluster::with_shop("bench-ca", true);
    let ca = cluster.start_ca("bench", &[]);
    let token = cluster.node_agent("node-a");
    let names: Vec<(String, String)> = (0..args.pods)
        .map(|i| (format!("app-{i}"), format!("sa-{i}")))
        .collect();
    let pods: Vec<PodObject<'_>> = names
        .iter()
        .map(|(name, sa)| PodObject {
            name,
            namespace: "shop",
            node: "node-a",
            service_account: sa,
            mode: None,
            host_network: false,
        })
        .collect();
    cluster.pods(&pods);
    let ids: Vec<Id> = names
        .iter()
        .map(|(_, sa)| format!("spiffe://cluster.local/ns/shop/sa/{sa}").parse())
        .collect::<Result<_, _>>()?;
    let roots = Roots::new();
    let bundle: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cluster.bundle().as_bytes()).collect::<Result<_, _>>()?;
    roots.set(&bundle)?;
    let endpoint = Endpoint {
        address: ca.addr.to_string(),
        server_name: "culvert-ca.culvert-system.svc".into(),
        roots: BundleSource::File(cluster.dir.join("unused")),
        token_file: token,
        cluster_id: culvert_ca_proto::DEFAULT_CLUSTER_ID.into(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;

    let mut results = Results {
        machine: crate::report::machine(),
        pods: args.pods,
        restart_secs: Vec::new(),
        sustained: Vec::new(),
    };
    for restart in 0..args.restarts {
        // A restarted daemon: a new client (new connection) and an empty cache, and every pod
        // re-wired at once.
        let secs = runtime.block_on(async {
            let source = Arc::new(IstioCa::new(&endpoint, roots.clone(), TTL)?);
            let cache = Cache::with_roots(source, culvert::tls::provider(), roots.clone());
            let started = Instant::now();
            let tasks: Vec<_> = ids
                .iter()
                .map(|id| {
                    let (cache, id) = (cache.clone(), id.clone());
                    tokio::spawn(async move { cache.ensure(&id).await })
                })
                .collect();
            for task in tasks {
                task.await??;
            }
            anyhow::Ok(started.elapsed().as_secs_f64())
        })?;
        eprintln!(
            "culvert-bench ca: restart {}: {} certificates held after {secs:.2} s",
            restart + 1,
            args.pods
        );
        results.restart_secs.push(secs);
    }
    for nodes in [1, 4] {
        let sustained =
            runtime.block_on(sustain(&endpoint, &roots, &ids, &ca, nodes, args.secs))?;
        eprintln!(
            "culvert-bench ca: {nodes} node(s) asking: {:.0} certificates/s, {:.2} CA CPU-ms each",
            sustained.certs_per_sec, sustained.ca_cpu_ms_per_cert
        );
        results.sustained.push(sustained);
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&results)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let mut restart = results.restart_secs.clone();
    restart.sort_by(f64::total_cmp);
    println!(
        "{} pods: certificates held {:.2} s after a restart (median of {}; {:.2}..{:.2})",
        args.pods,
        restart[restart.len() / 2],
        restart.len(),
        restart[0],
        restart[restart.len() - 1]
    );
    for s in &results.sustained {
        println!(
            "{} node(s) asking: {:.0} certificates/s, {:.2} CA CPU-ms per certificate",
            s.nodes, s.certs_per_sec, s.ca_cpu_ms_per_cert
        );
    }
    Ok(())
}

/// `nodes` clients, each keeping its 8 requests in flight, for `secs`.
async fn sustain(
    endpoint: &Endpoint,
    roots: &Arc<Roots>,
    ids: &[Id],
    ca: &CaServer,
    nodes: usize,
    secs: u64,
) -> anyhow::Result<Sustained> {
    let pid = ca.pid().context("culvert ca is not running")?;
    let deadline = Instant::now() + Duration::from_secs(secs);
    let cpu_before = crate::process_ticks(pid);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..nodes {
        let client = Arc::new(IstioCa::new(endpoint, roots.clone(), TTL)?);
        // More callers than the client lets through, so its cap is what limits it.
        for worker in 0..16 {
            let (client, ids) = (client.clone(), ids.to_vec());
            tasks.push(tokio::spawn(async move {
                let mut issued = 0_u64;
                let mut next = worker;
                while Instant::now() < deadline {
                    client.issue(&ids[next % ids.len()]).await?;
                    issued += 1;
                    next += 16;
                }
                anyhow::Ok(issued)
            }));
        }
    }
    let mut issued = 0;
    for task in tasks {
        issued += task.await??;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_secs = crate::ticks_to_secs(crate::process_ticks(pid) - cpu_before);
    #[allow(clippy::cast_precision_loss)]
    let issued = issued as f64;
    Ok(Sustained {
        nodes,
        certs_per_sec: issued / elapsed,
        ca_cpu_ms_per_cert: cpu_secs * 1000.0 / issued,
    })
}
