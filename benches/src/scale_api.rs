//! `culvert-bench scale-api`: the node's view of a cluster that a real apiserver holds.
//!
//! The test apiserver (`scripts/kube-test-env`) is filled with the synthetic cluster's objects
//! (`culvert::test_util::cluster::Shape`: pods with their statuses, Services, EndpointSlices,
//! Namespaces), then a child process runs the daemon's own discovery (`Watches`) against it
//! through a loopback relay that counts the bytes the API sends. Reported: the child's memory
//! per pod once synced, against the same shape fed through the same decode path with no API
//! (a second child, so neither figure carries the other's heap); the time from start to
//! synced; the bytes of the first list and of watch events; and each kind's list size in JSON
//! (what kube-rs asks for) and in protobuf (what kube-proxy asks for), to compare with what
//! kube-proxy watches (Services and EndpointSlices, no pods).

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use culvert::discovery::{Cluster, Watches};
use culvert::test_util::cluster::Shape;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// Requests in flight while filling the apiserver.
const IN_FLIGHT: usize = 64;

#[derive(clap::Args)]
pub(crate) struct ScaleApiArgs {
    /// Pods in the cluster (15 per Deployment, one Service and EndpointSlice each).
    #[arg(long, default_value_t = 100_000)]
    pods: usize,
    /// Pod status updates made while the daemon watches, for the per-event bytes.
    #[arg(long, default_value_t = 2_000)]
    events: usize,
    /// Where to write the figures, as JSON.
    #[arg(long, default_value = "bench-scale-api.json")]
    out: std::path::PathBuf,
}

/// What the child measuring one view reports.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Measured {
    /// Resident memory before any object, and once synced with a snapshot held (MiB).
    baseline_mib: f64,
    synced_mib: f64,
    bytes_per_pod: f64,
    /// From the start of the watches to the snapshot measured (the first, once synced).
    ready_secs: f64,
    workloads: usize,
}

#[derive(Serialize)]
struct ListBytes {
    kind: &'static str,
    objects: usize,
    json: usize,
    protobuf: usize,
}

#[derive(Serialize)]
struct Figures {
    machine: String,
    pods: usize,
    services: usize,
    namespaces: usize,
    fill_secs: f64,
    api: Measured,
    /// The API view again after the status updates.
    api_after_events: Measured,
    synthetic: Measured,
    /// The API view's bytes per pod over the synthetic view's.
    api_over_synthetic: f64,
    /// Bytes the API sent the daemon's watches until they had synced (TLS included).
    sync_bytes: u64,
    events: usize,
    /// Bytes the API sent per pod status update while the daemon watched.
    bytes_per_event: f64,
    lists: Vec<ListBytes>,
}

pub(crate) fn run(args: &ScaleApiArgs) -> anyhow::Result<()> {
    let shape = Shape::new(args.pods);
    let cluster = culvert_tests::kube::Cluster::start("bench-scale-api");
    cluster.install();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let client = runtime.block_on(culvert::discovery::client(Some(&cluster.kubeconfig)))?;

    let started = Instant::now();
    runtime.block_on(fill(&client, &shape))?;
    let fill_secs = started.elapsed().as_secs_f64();
    eprintln!("filled the apiserver in {fill_secs:.0} s");
    let lists = runtime.block_on(list_sizes(&client))?;

    let synthetic = Measuring::spawn(&["synthetic", &args.pods.to_string()])?.finish()?;
    eprintln!("synthetic: {synthetic:?}");

    let (relay, received) = runtime.block_on(relay(&cluster.kubeconfig))?;
    let mut child = Measuring::spawn(&["api", relay.to_str().context("temp path")?])?;
    let api = child.ready()?;
    let sync_bytes = received.load(Ordering::Relaxed);
    eprintln!("api: {api:?}, {sync_bytes} bytes to sync");

    // Status updates as kubelets make them, then one deletion the child waits to see.
    let before = received.load(Ordering::Relaxed);
    runtime.block_on(touch(&client, &shape, args.events))?;
    let last = shape.pod(args.pods - 1, 0);
    runtime.block_on(async {
        let (namespace, name) = (str_at(&last, "namespace")?, str_at(&last, "name")?);
        let api = Api::<Pod>::namespaced(client.clone(), namespace);
        api.delete(name, &DeleteParams::default().grace_period(0))
            .await?;
        anyhow::Ok(())
    })?;
    child.expect(args.pods - 1)?;
    let event_bytes = received.load(Ordering::Relaxed) - before;
    let api_after_events = child.finish()?;

    let figures = Figures {
        machine: crate::report::machine(),
        pods: args.pods,
        services: shape.services(),
        namespaces: shape.namespaces(),
        fill_secs,
        api_over_synthetic: api.bytes_per_pod / synthetic.bytes_per_pod,
        api,
        api_after_events,
        synthetic,
        sync_bytes,
        events: args.events,
        bytes_per_event: event_bytes as f64 / (args.events + 1) as f64,
        lists,
    };
    let json = serde_json::to_string_pretty(&figures)?;
    println!("{json}");
    std::fs::write(&args.out, json + "\n")
        .with_context(|| format!("writing {}", args.out.display()))
}

/// `object`'s metadata field `field`.
fn str_at<'a>(object: &'a Value, field: &str) -> anyhow::Result<&'a str> {
    object["metadata"][field]
        .as_str()
        .with_context(|| format!("synthetic object without metadata.{field}"))
}

/// A synthetic object as a client creates it: without what the apiserver sets itself.
fn creatable<K: DeserializeOwned>(mut object: Value) -> anyhow::Result<K> {
    let meta = object["metadata"]
        .as_object_mut()
        .context("synthetic object without metadata")?;
    for field in [
        "uid",
        "resourceVersion",
        "creationTimestamp",
        "managedFields",
    ] {
        meta.remove(field);
    }
    Ok(serde_json::from_value(object)?)
}

/// Runs `jobs` with at most [`IN_FLIGHT`] at once.
async fn each<I, F>(jobs: I) -> anyhow::Result<()>
where
    I: IntoIterator<Item = F>,
    F: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut running = tokio::task::JoinSet::new();
    for job in jobs {
        if running.len() >= IN_FLIGHT {
            running.join_next().await.context("no task")???;
        }
        running.spawn(job);
    }
    while let Some(done) = running.join_next().await {
        done??;
    }
    Ok(())
}

/// Creates every object of `shape`, and sets each pod's status as its kubelet would.
async fn fill(client: &kube::Client, shape: &Shape) -> anyhow::Result<()> {
    let post = PostParams::default();
    let namespaces = Api::<Namespace>::all(client.clone());
    for n in 0..shape.namespaces() {
        namespaces
            .create(&post, &creatable(shape.namespace(n))?)
            .await?;
    }
    each((0..shape.pods).map(|i| {
        let (client, object) = (client.clone(), shape.pod(i, 0));
        async move {
            let pod: Pod = creatable(object.clone())?;
            let api = Api::<Pod>::namespaced(client, str_at(&object, "namespace")?);
            api.create(&PostParams::default(), &pod).await?;
            let status = json!({ "status": object["status"] });
            let name = str_at(&object, "name")?;
            api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
                .await?;
            Ok(())
        }
    }))
    .await?;
    each((0..shape.services()).map(|s| {
        let (client, service, slice) = (client.clone(), shape.service(s), shape.slice(s, 0));
        async move {
            let namespace = str_at(&service, "namespace")?;
            Api::<Service>::namespaced(client.clone(), namespace)
                .create(&PostParams::default(), &creatable(service.clone())?)
                .await?;
            Api::<EndpointSlice>::namespaced(client, namespace)
                .create(&PostParams::default(), &creatable(slice)?)
                .await?;
            Ok(())
        }
    }))
    .await
}

/// Updates `count` pods' statuses (a new condition time), spread over the cluster.
async fn touch(client: &kube::Client, shape: &Shape, count: usize) -> anyhow::Result<()> {
    each((0..count).map(|e| {
        let (client, object) = (client.clone(), shape.pod(e * 7919 % (shape.pods - 1), 0));
        async move {
            let api = Api::<Pod>::namespaced(client, str_at(&object, "namespace")?);
            let status = json!({ "status": { "conditions": [
                { "type": "Ready", "status": "True", "lastTransitionTime": "2026-12-01T10:00:00Z" },
            ] } });
            api.patch_status(
                str_at(&object, "name")?,
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await?;
            Ok(())
        }
    }))
    .await
}

/// The size of a full list of each watched kind, in JSON and in protobuf.
async fn list_sizes(client: &kube::Client) -> anyhow::Result<Vec<ListBytes>> {
    let kinds = [
        ("pods", "/api/v1/pods"),
        ("services", "/api/v1/services"),
        ("endpointslices", "/apis/discovery.k8s.io/v1/endpointslices"),
        ("namespaces", "/api/v1/namespaces"),
    ];
    let mut sizes = Vec::new();
    for (kind, path) in kinds {
        let get = async |accept: &str| -> anyhow::Result<_> {
            let request = http::Request::get(path)
                .header(http::header::ACCEPT, accept)
                .body(kube::client::Body::empty())?;
            Ok(client
                .send(request)
                .await?
                .into_body()
                .collect_bytes()
                .await?)
        };
        let json = get("application/json").await?;
        let protobuf = get("application/vnd.kubernetes.protobuf").await?;
        let list: Value = serde_json::from_slice(&json)?;
        sizes.push(ListBytes {
            kind,
            objects: list["items"].as_array().map_or(0, Vec::len),
            json: json.len(),
            protobuf: protobuf.len(),
        });
    }
    Ok(sizes)
}

/// A loopback relay to the apiserver that counts the bytes it sends, and a kubeconfig that
/// goes through it (same address, so the apiserver's certificate still matches).
async fn relay(
    kubeconfig: &std::path::Path,
) -> anyhow::Result<(std::path::PathBuf, Arc<AtomicU64>)> {
    let text = std::fs::read_to_string(kubeconfig)?;
    let server = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: https://"))
        .context("no server in the kubeconfig")?
        .to_owned();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let through = format!("127.0.0.1:{}", listener.local_addr()?.port());
    let path = kubeconfig.with_file_name("kubeconfig-relayed");
    std::fs::write(&path, text.replace(&server, &through))?;
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    tokio::spawn(async move {
        while let Ok((downstream, _)) = listener.accept().await {
            let (server, counter) = (server.clone(), counter.clone());
            tokio::spawn(async move {
                let Ok(upstream) = TcpStream::connect(&server).await else {
                    return;
                };
                let (mut from_client, mut to_server) = (downstream, upstream);
                let (mut client_read, mut client_write) = from_client.split();
                let (mut server_read, mut server_write) = to_server.split();
                let up = tokio::io::copy(&mut client_read, &mut server_write);
                let down = async {
                    let mut buf = vec![0; 64 * 1024];
                    loop {
                        let n = server_read.read(&mut buf).await?;
                        if n == 0 {
                            return client_write.shutdown().await;
                        }
                        counter.fetch_add(n as u64, Ordering::Relaxed);
                        client_write.write_all(&buf[..n]).await?;
                    }
                };
                let _ = tokio::try_join!(up, down);
            });
        }
    });
    Ok((path, received))
}

/// A child process measuring one view (`culvert-bench scale-view`), driven over its stdio.
struct Measuring {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl Measuring {
    fn spawn(args: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .arg("scale-view")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the measuring child")?;
        let input = child.stdin.take().context("stdin")?;
        let output = BufReader::new(child.stdout.take().context("stdout")?);
        Ok(Self {
            child,
            input,
            output,
        })
    }

    fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        self.output.read_line(&mut line)?;
        anyhow::ensure!(!line.is_empty(), "the measuring child exited early");
        Ok(line)
    }

    /// What the child measured once synced.
    fn ready(&mut self) -> anyhow::Result<Measured> {
        Ok(serde_json::from_str(&self.line()?)?)
    }

    /// Waits until the child's view holds `workloads`.
    fn expect(&mut self, workloads: usize) -> anyhow::Result<()> {
        writeln!(self.input, "{workloads}")?;
        let line = self.line()?;
        anyhow::ensure!(line.trim() == "seen", "the child answered {line}");
        Ok(())
    }

    /// The child's figures (for a child that measures once), and its exit.
    fn finish(self) -> anyhow::Result<Measured> {
        let Self {
            mut child,
            input,
            mut output,
        } = self;
        // The end of its input is what tells the API child to measure again.
        drop(input);
        let mut line = String::new();
        output.read_line(&mut line)?;
        let measured = serde_json::from_str(&line).context("the measuring child's figures");
        let status = child.wait()?;
        anyhow::ensure!(status.success(), "the measuring child failed: {status}");
        measured
    }
}

/// VmRSS in MiB.
fn rss_mib() -> anyhow::Result<f64> {
    Ok(crate::scale::memory()?.0)
}

/// The child: `api KUBECONFIG` syncs the daemon's watches against the API; `synthetic PODS`
/// feeds the same shape through the watchers' decode path. Prints its [`Measured`] as one
/// JSON line; the API child then answers each workload count read from stdin with `seen`
/// once its view holds that many, and measures again at the end of its input.
pub(crate) fn child(source: &str, arg: &str) -> anyhow::Result<()> {
    let settings = crate::scale::settings();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = |baseline: f64, started: Instant, workloads: usize| -> anyhow::Result<()> {
        let (ready_secs, synced_mib) = (started.elapsed().as_secs_f64(), rss_mib()?);
        let measured = Measured {
            baseline_mib: baseline,
            synced_mib,
            bytes_per_pod: (synced_mib - baseline) * 1024.0 * 1024.0 / workloads as f64,
            ready_secs,
            workloads,
        };
        println!("{}", serde_json::to_string(&measured)?);
        Ok(())
    };
    match source {
        "synthetic" => {
            let shape = Shape::new(arg.parse()?);
            let cluster = Cluster::new("cluster.local");
            let baseline = rss_mib()?;
            let started = Instant::now();
            shape.list(&cluster, 0);
            let snapshot = cluster.snapshot(&settings);
            report(baseline, started, snapshot.workload_count())
        }
        "api" => runtime.block_on(async {
            let client = culvert::discovery::client(Some(arg.as_ref())).await?;
            let stop = tokio_util::sync::CancellationToken::new();
            let baseline = rss_mib()?;
            let started = Instant::now();
            let metrics = culvert::metrics::Metrics::new();
            let watches = Watches::start(
                &client,
                "cluster.local",
                culvert::discovery::MODE_LABEL,
                "node-0",
                &metrics.discovery,
                &stop,
            );
            watches.synced(&client).await;
            let mut snapshot = watches.snapshot(&settings).await;
            report(baseline, started, snapshot.workload_count())?;
            // Stdin on a thread of its own: the runtime keeps the watches going meanwhile.
            let (send, mut wanted) = tokio::sync::mpsc::unbounded_channel();
            std::thread::spawn(move || {
                for line in std::io::stdin().lines().map_while(Result::ok) {
                    if send.send(line).is_err() {
                        break;
                    }
                }
            });
            while let Some(line) = wanted.recv().await {
                let want: usize = line.trim().parse()?;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
                while snapshot.workload_count() != want {
                    tokio::time::timeout_at(deadline, watches.changed())
                        .await
                        .with_context(|| format!("the view never held {want} workloads"))?;
                    snapshot = watches.snapshot(&settings).await;
                }
                println!("seen");
            }
            report(baseline, started, snapshot.workload_count())?;
            stop.cancel();
            anyhow::Ok(())
        }),
        other => anyhow::bail!("unknown view source {other}"),
    }
}
