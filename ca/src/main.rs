//! `culvert-ca`: the cluster CA (`culvert ca serve`) and the commands that operate it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::info;

use culvert_ca::authority::{self, Material, Signer};
use culvert_ca::store::{self, Store};
use culvert_ca::{auth, server};

#[derive(Parser)]
#[command(name = "culvert ca", version, about = "Culvert's cluster CA")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the CA keeps its state; shared by every command.
#[derive(clap::Args)]
struct Where {
    /// Kubeconfig; in-cluster credentials when absent.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Namespace of the CA's Secret and bundle ConfigMap.
    #[arg(long, env = "POD_NAMESPACE", default_value = "culvert-system")]
    namespace: String,
    /// The Secret holding the signing key.
    #[arg(long, default_value = "culvert-ca")]
    secret: String,
    /// The ConfigMap the trust bundle is published in.
    #[arg(long, default_value = "culvert-ca-root-cert")]
    bundle: String,
    /// Trust domain of the identities signed (and of a generated root's name).
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
}

#[derive(Subcommand)]
enum Command {
    /// Serve Istio's CA API.
    Serve {
        #[command(flatten)]
        at: Where,
        /// Where the CA API listens.
        #[arg(long, default_value = "0.0.0.0:15012")]
        listen: SocketAddr,
        /// Where /healthz/ready answers.
        #[arg(long, default_value = "0.0.0.0:15021")]
        readiness: SocketAddr,
        /// The CA's Service name; its serving certificate names it in every DNS form.
        #[arg(long, default_value = "culvert-ca")]
        service: String,
        /// Audience the callers' tokens must carry.
        #[arg(long, default_value = culvert_ca_proto::DEFAULT_AUDIENCE)]
        audience: String,
        /// The cluster's id; callers claiming another are refused.
        #[arg(long, default_value = culvert_ca_proto::DEFAULT_CLUSTER_ID)]
        cluster_id: String,
        /// Service accounts (namespace/name) that may ask for identities of pods on their node.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "culvert-system/culvert-node"
        )]
        trusted_node_accounts: Vec<String>,
        /// Lifetime of a certificate when the request asks for none.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
        default_ttl: Duration,
        /// Longest lifetime granted; longer requests are refused.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "48h")]
        max_ttl: Duration,
        /// Time given to requests in flight at shutdown.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        drain_timeout: Duration,
    },
    /// Print the trusted roots, which one signs, and any rotation in progress.
    Roots {
        #[command(flatten)]
        at: Where,
    },
    /// Rotate the root: begin (trust a new root too), activate (sign under it), finish (drop
    /// the old).
    Rotate {
        #[command(subcommand)]
        step: Step,
    },
}

#[derive(Subcommand)]
enum Step {
    /// Stage a new signer and trust its root alongside the current one. Without files, a new
    /// self-signed root is generated.
    Begin {
        #[command(flatten)]
        at: Where,
        /// The new signing certificate (an intermediate under your root), PEM.
        #[arg(long, requires_all = ["key", "root"])]
        cert: Option<PathBuf>,
        /// Its private key, PKCS#8 PEM.
        #[arg(long)]
        key: Option<PathBuf>,
        /// Certificates between it and the root, PEM.
        #[arg(long)]
        chain: Option<PathBuf>,
        /// The root it chains to, PEM.
        #[arg(long)]
        root: Option<PathBuf>,
    },
    /// Sign with the staged signer. Node daemons re-issue their certificates; both roots stay
    /// trusted.
    Activate {
        #[command(flatten)]
        at: Where,
    },
    /// Trust only the current signer's root. Run once every node holds re-issued certificates.
    Finish {
        #[command(flatten)]
        at: Where,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
    culvert::telemetry::init(culvert::telemetry::Format::Plain, &filter)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(cli.command))
}

async fn client(at: &Where) -> anyhow::Result<(kube::Client, Store)> {
    let client = culvert::discovery::client(at.kubeconfig.as_deref()).await?;
    let store = Store::new(&client, &at.namespace, &at.secret, &at.bundle);
    Ok((client, store))
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve {
            at,
            listen,
            readiness,
            service,
            audience,
            cluster_id,
            trusted_node_accounts,
            default_ttl,
            max_ttl,
            drain_timeout,
        } => {
            anyhow::ensure!(
                default_ttl <= max_ttl,
                "--default-ttl is longer than --max-ttl"
            );
            let (client, store) = client(&at).await?;
            let ns = &at.namespace;
            let server_names = vec![
                service.clone(),
                format!("{service}.{ns}"),
                format!("{service}.{ns}.svc"),
                format!("{service}.{ns}.svc.cluster.local"),
            ];
            let settings = server::Settings {
                policy: auth::Policy {
                    trust_domain: at.trust_domain.clone(),
                    audience,
                    cluster_id,
                    trusted_node_accounts: trusted_node_accounts.into_iter().collect(),
                },
                server_names,
                default_ttl,
                max_ttl,
            };
            let stop = CancellationToken::new();
            let ca = server::Ca::start(client, &store, settings).await?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let probe = tokio::net::TcpListener::bind(readiness)
                .await
                .with_context(|| format!("binding {readiness}"))?;
            tokio::spawn(serve_readiness(probe, ca.clone()));
            tokio::spawn(ca.clone().follow(store, stop.clone()));
            let serving = tokio::spawn(server::serve(ca.clone(), listener, stop.clone()));
            ca.ready.store(true, Ordering::SeqCst);
            info!(%listen, %readiness, "serving");
            shutdown_signal().await?;
            info!("stopping: not ready, draining requests in flight");
            ca.ready.store(false, Ordering::SeqCst);
            stop.cancel();
            match tokio::time::timeout(drain_timeout, serving).await {
                Ok(result) => result??,
                Err(_) => info!("drain timed out"),
            }
            Ok(())
        }
        Command::Roots { at } => {
            let (_, store) = client(&at).await?;
            let material = store.load().await?.context("no CA Secret")?;
            print_roots(&material)
        }
        Command::Rotate { step } => rotate(step).await,
    }
}

async fn rotate(step: Step) -> anyhow::Result<()> {
    let at = match &step {
        Step::Begin { at, .. } | Step::Activate { at } | Step::Finish { at } => at,
    };
    let (_, store) = client(at).await?;
    let secret = store
        .secrets
        .get(&store.secret)
        .await
        .context("reading the CA Secret")?;
    let version = secret.metadata.resource_version.clone().unwrap_or_default();
    let mut material = store::material_of(&secret)?;
    let said = match &step {
        Step::Begin {
            cert,
            key,
            chain,
            root,
            at,
        } => {
            let next = match (cert, key, root) {
                (Some(cert), Some(key), Some(root)) => {
                    let read = |p: &PathBuf| {
                        std::fs::read_to_string(p)
                            .with_context(|| format!("reading {}", p.display()))
                    };
                    let signer = Signer {
                        cert_pem: read(cert)?,
                        key_pem: read(key)?,
                        chain_pem: chain.as_ref().map(read).transpose()?.unwrap_or_default(),
                        root_pem: read(root)?,
                    };
                    signer.issuer()?;
                    signer
                }
                _ => Signer::generate(&at.trust_domain)?,
            };
            material.begin_rotation(next)?;
            "begun: both roots are trusted; once every node daemon has the new bundle, run `culvert ca rotate activate`"
        }
        Step::Activate { .. } => {
            material.activate_rotation()?;
            "activated: new certificates are signed under the new root; once node daemons have re-issued, run `culvert ca rotate finish`"
        }
        Step::Finish { .. } => {
            material.finish_rotation()?;
            "finished: only the current root is trusted"
        }
    };
    store.save(&material, version).await?;
    print_roots(&material)?;
    print(said);
    Ok(())
}

#[allow(clippy::print_stdout)]
fn print(line: &str) {
    println!("{line}");
}

fn print_roots(material: &Material) -> anyhow::Result<()> {
    let signer = authority::pem_certs(&material.current.root_pem)?;
    let next = match &material.next {
        Some(n) => authority::pem_certs(&n.root_pem)?,
        None => Vec::new(),
    };
    print(
        "ROLE      EXPIRES               SHA-256                                                           SUBJECT",
    );
    for root in material.roots()? {
        let (subject, expires) = authority::describe(&root);
        let role = if signer.contains(&root) {
            "signing"
        } else if next.contains(&root) {
            "next"
        } else {
            "retiring"
        };
        print(&format!(
            "{role:<9} {} {} {subject}",
            humantime::format_rfc3339_seconds(expires),
            authority::fingerprint(&root)
        ));
    }
    let left = authority::not_after(&material.current.cert_pem)?
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    print(&format!(
        "signing certificate expires in {}",
        humantime::format_duration(Duration::from_secs(left.as_secs() / 86_400 * 86_400))
    ));
    Ok(())
}

/// `/healthz/ready`: 200 while serving, 503 before and while draining.
async fn serve_readiness(listener: tokio::net::TcpListener, ca: Arc<server::Ca>) {
    use hyper::service::service_fn;
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let ca = ca.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let ready = ca.ready.load(Ordering::SeqCst);
                async move {
                    let status = match (req.uri().path(), ready) {
                        ("/healthz/ready", true) => 200,
                        ("/healthz/ready", false) => 503,
                        _ => 404,
                    };
                    hyper::Response::builder()
                        .status(status)
                        .body(http_body_util::Empty::<bytes::Bytes>::new())
                }
            });
            let io = hyper_util::rt::TokioIo::new(tcp);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
