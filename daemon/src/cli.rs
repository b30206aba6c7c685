//! The operator's commands that read a node's admin API: `culvert workloads`, `services`,
//! `policies`, `certs`, `connections` and `log`. Tables have `istioctl ztunnel-config`'s
//! columns; `-o json` and `-o yaml` print the selected entries of the dump as they are. And
//! `culvert check`, for one node or, through the Kubernetes API, every node.

mod nodes;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};

/// What a view command prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Workloads,
    Services,
    Policies,
    Certificates,
    Connections,
}

/// How it prints it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// A table with istioctl's columns.
    #[default]
    Short,
    Json,
    Yaml,
}

/// The flags every view command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ViewArgs {
    /// The node's admin API. From outside the node: `kubectl -n culvert-system port-forward
    /// pod/<the node's culvert pod> 15000`, then the default.
    #[arg(long, env = "CULVERT_ADMIN", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Read a saved `/config_dump` (`-` for stdin) instead of asking a node.
    #[arg(short, long)]
    pub file: Option<PathBuf>,
    /// Only entries of this namespace.
    #[arg(short, long)]
    pub namespace: Option<String>,
    /// Only workloads on this node (workloads view).
    #[arg(long)]
    pub node: Option<String>,
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

/// `culvert log`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    #[arg(long, env = "CULVERT_ADMIN", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Set the node's log filter (RUST_LOG syntax, e.g. `info,access=warn`).
    #[arg(long, conflicts_with = "reset")]
    pub level: Option<String>,
    /// Put back the filter the node started with.
    #[arg(long)]
    pub reset: bool,
}

/// Runs a view command; returns what to print.
pub async fn view(view: View, args: &ViewArgs) -> anyhow::Result<String> {
    let dump: Value = match &args.file {
        Some(path) => {
            let bytes = if path.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())?.into_bytes()
            } else {
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?
            };
            serde_json::from_slice(&bytes).context("parsing the config dump")?
        }
        None => get_json(args.admin, "/config_dump").await?,
    };
    // A live node lists its connections with the identities proven; a saved dump has them
    // without.
    let connections = match (view, &args.file) {
        (View::Connections, None) => Some(get_json(args.admin, "/connections").await?),
        _ => None,
    };
    render(view, &dump, connections.as_ref(), args)
}

/// `culvert check`'s flags.
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    #[arg(long, env = "CULVERT_ADMIN", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Every node's daemon instead, reached through the Kubernetes API (a port-forward to each
    /// daemon pod's admin port) with the kubeconfig of `$KUBECONFIG` or `~/.kube/config`.
    #[arg(long, conflicts_with = "admin")]
    pub all_nodes: bool,
    /// `--all-nodes` with this kubeconfig.
    #[arg(long, conflicts_with = "admin")]
    pub kubeconfig: Option<PathBuf>,
    /// The namespace Culvert is installed in (`--all-nodes`).
    #[arg(long, default_value = "culvert-system")]
    pub culvert_namespace: String,
    /// `short` names each failure and its fix; `json` prints the node's findings as they are
    /// (with `--all-nodes`, a list of `{node, pod, checks}`).
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Output,
}

/// Runs `culvert check` against one node, or every node: what to print, and whether every check
/// passed.
pub async fn check(args: &CheckArgs) -> anyhow::Result<(String, bool)> {
    if args.all_nodes || args.kubeconfig.is_some() {
        let nodes = nodes::check(args).await?;
        let passed = !nodes.is_empty() && nodes.iter().all(nodes::NodeFindings::passed);
        let out = match args.output {
            Output::Json => format!("{}\n", serde_json::to_string_pretty(&nodes)?),
            Output::Yaml => serde_yaml::to_string(&nodes)?,
            Output::Short => nodes::render(&nodes),
        };
        return Ok((out, passed));
    }
    let checks = get_json(args.admin, "/check").await?;
    let checks = checks.as_array().cloned().unwrap_or_default();
    let out = match args.output {
        Output::Json => format!("{}\n", serde_json::to_string_pretty(&checks)?),
        Output::Yaml => serde_yaml::to_string(&checks)?,
        Output::Short => render_checks(&checks),
    };
    Ok((out, all_passed(&checks)))
}

/// Whether a node's findings are all passes (none at all is not).
fn all_passed(checks: &[Value]) -> bool {
    !checks.is_empty() && checks.iter().all(|c| c["ok"] == true)
}

fn render_checks(checks: &[Value]) -> String {
    let mut out = String::new();
    for c in checks {
        let mark = if c["ok"] == true { "ok  " } else { "FAIL" };
        out.push_str(&format!(
            "{mark} {:<13}{}\n",
            str_of(c, "check"),
            str_of(c, "detail")
        ));
        if let Some(fix) = c.get("fix").and_then(Value::as_str) {
            out.push_str(&format!("     {:<13}fix: {fix}\n", ""));
        }
    }
    let failed = checks.iter().filter(|c| c["ok"] != true).count();
    out.push_str(&match failed {
        0 => "all checks passed\n".to_owned(),
        n => format!("{n} of {} checks failed\n", checks.len()),
    });
    out
}

/// Runs `culvert log`: the node's log filter, after changing it if asked.
pub async fn log(args: &LogArgs) -> anyhow::Result<String> {
    let (method, path) = match (&args.level, args.reset) {
        (Some(level), _) => {
            let query: String = form_urlencoded::Serializer::new(String::new())
                .append_pair("level", level)
                .finish();
            (Method::POST, format!("/logging?{query}"))
        }
        (None, true) => (Method::POST, "/logging?reset".to_owned()),
        (None, false) => (Method::GET, "/logging".to_owned()),
    };
    let body = call(args.admin, method, &path).await?;
    let answer: Value = serde_json::from_slice(&body).context("parsing the node's answer")?;
    Ok(format!(
        "{}\n",
        answer["filter"].as_str().unwrap_or_default()
    ))
}

async fn get_json(admin: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let body = call(admin, Method::GET, path).await?;
    serde_json::from_slice(&body).with_context(|| format!("parsing {path} from {admin}"))
}

/// One HTTP/1 request to the admin API; the body of a 2xx answer.
async fn call(admin: SocketAddr, method: Method, path: &str) -> anyhow::Result<Bytes> {
    let stream = tokio::net::TcpStream::connect(admin)
        .await
        .with_context(|| {
            format!(
                "connecting to the node's admin API at {admin} (is the daemon running? --admin)"
            )
        })?;
    request(stream, &admin.to_string(), method, path).await
}

/// One HTTP/1 request over `stream` (a connection, or a port-forward); the body of a 2xx answer.
async fn request(
    stream: impl AsyncRead + AsyncWrite + Send + Unpin + 'static,
    host: &str,
    method: Method,
    path: &str,
) -> anyhow::Result<Bytes> {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, host)
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    if status != StatusCode::OK {
        bail!(
            "{path}: {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    Ok(body)
}

fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

fn array<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    v.get(key).and_then(Value::as_array).into_iter().flatten()
}

/// Renders `view` of `dump` (and, for a live node, its `connections`).
pub fn render(
    view: View,
    dump: &Value,
    connections: Option<&Value>,
    args: &ViewArgs,
) -> anyhow::Result<String> {
    let in_namespace = |ns: &str| args.namespace.as_deref().is_none_or(|wanted| wanted == ns);
    let selected: Vec<Value> = match view {
        View::Workloads => array(dump, "workloads")
            .filter(|w| in_namespace(str_of(w, "namespace")))
            .filter(|w| args.node.as_deref().is_none_or(|n| n == str_of(w, "node")))
            .cloned()
            .collect(),
        View::Services => array(dump, "services")
            .filter(|s| in_namespace(str_of(s, "namespace")))
            .cloned()
            .collect(),
        View::Policies => array(dump, "policies")
            .filter(|p| in_namespace(str_of(p, "namespace")))
            .cloned()
            .collect(),
        View::Certificates => array(dump, "certificates").cloned().collect(),
        View::Connections => connection_rows(dump, connections)
            .into_iter()
            .filter(|c| in_namespace(c.workload.split('/').next().unwrap_or_default()))
            .map(|c| c.json)
            .collect(),
    };
    Ok(match args.output {
        Output::Json => format!("{}\n", serde_json::to_string_pretty(&selected)?),
        Output::Yaml => serde_yaml::to_string(&selected)?,
        Output::Short => table(view, &selected),
    })
}

/// One connection, from `/connections` or a dump's `workloadState`.
struct ConnectionRow {
    workload: String,
    json: Value,
}

fn connection_rows(dump: &Value, live: Option<&Value>) -> Vec<ConnectionRow> {
    if let Some(live) = live {
        return live
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| ConnectionRow {
                workload: str_of(c, "workload").to_owned(),
                json: c.clone(),
            })
            .collect();
    }
    let mut rows = Vec::new();
    let states = dump.get("workloadState").and_then(Value::as_object);
    for (workload, state) in states.into_iter().flatten() {
        let connections = state.get("connections").unwrap_or(&Value::Null);
        for (direction, list) in [("inbound", "inbound"), ("outbound", "outbound")] {
            for c in array(connections, list) {
                let (local, remote) = match direction {
                    "inbound" => (str_of(c, "originalDst"), str_of(c, "src")),
                    _ => (str_of(c, "src"), str_of(c, "actualDst")),
                };
                rows.push(ConnectionRow {
                    workload: workload.clone(),
                    json: serde_json::json!({
                        "workload": workload, "direction": direction, "local": local,
                        "remote": remote, "target": str_of(c, "originalDst"),
                        "protocol": str_of(c, "protocol"),
                    }),
                });
            }
        }
    }
    rows
}

fn table(view: View, selected: &[Value]) -> String {
    let (header, rows): (&[&str], Vec<Vec<String>>) = match view {
        View::Workloads => (
            &[
                "NAMESPACE",
                "POD NAME",
                "ADDRESS",
                "NODE",
                "WAYPOINT",
                "PROTOCOL",
            ],
            selected
                .iter()
                .map(|w| {
                    let ip = array(w, "workloadIps").next().and_then(Value::as_str);
                    vec![
                        str_of(w, "namespace").into(),
                        str_of(w, "name").into(),
                        ip.unwrap_or_default().into(),
                        str_of(w, "node").into(),
                        "None".into(),
                        str_of(w, "protocol").into(),
                    ]
                })
                .collect(),
        ),
        View::Services => (
            &[
                "NAMESPACE",
                "SERVICE NAME",
                "SERVICE VIP",
                "WAYPOINT",
                "ENDPOINTS",
            ],
            selected
                .iter()
                .map(|s| {
                    let vips: Vec<&str> = array(s, "vips")
                        .filter_map(Value::as_str)
                        .map(|v| v.split_once('/').map_or(v, |(_, ip)| ip))
                        .collect();
                    let endpoints = s
                        .get("endpoints")
                        .and_then(Value::as_object)
                        .map_or(0, serde_json::Map::len);
                    vec![
                        str_of(s, "namespace").into(),
                        str_of(s, "name").into(),
                        vips.join(","),
                        "None".into(),
                        endpoints.to_string(),
                    ]
                })
                .collect(),
        ),
        View::Policies => (
            &["NAMESPACE", "POLICY NAME", "ACTION", "SCOPE"],
            selected
                .iter()
                .map(|p| {
                    ["namespace", "name", "action", "scope"]
                        .iter()
                        .map(|k| str_of(p, k).to_owned())
                        .collect()
                })
                .collect(),
        ),
        View::Certificates => (
            &[
                "CERTIFICATE NAME",
                "TYPE",
                "STATUS",
                "VALID CERT",
                "SERIAL NUMBER",
                "NOT AFTER",
                "NOT BEFORE",
            ],
            selected.iter().flat_map(certificate_rows).collect(),
        ),
        View::Connections => (
            &[
                "WORKLOAD",
                "DIRECTION",
                "LOCAL",
                "REMOTE",
                "REMOTE TARGET",
                "PROTOCOL",
                "IDENTITY",
            ],
            selected
                .iter()
                .map(|c| {
                    let mut row: Vec<String> = [
                        "workload",
                        "direction",
                        "local",
                        "remote",
                        "target",
                        "protocol",
                    ]
                    .iter()
                    .map(|k| str_of(c, k).to_owned())
                    .collect();
                    let identity = str_of(c, "identity");
                    row.push(if identity.is_empty() { "-" } else { identity }.to_owned());
                    row
                })
                .collect(),
        ),
    };
    columns(header, &rows)
}

/// One line per certificate of an identity: the leaf, its intermediates, the roots.
fn certificate_rows(entry: &Value) -> Vec<Vec<String>> {
    let identity = str_of(entry, "identity");
    let state = str_of(entry, "state");
    let state = if state.contains("Unavailable") {
        "Unavailable"
    } else {
        state
    };
    let chain = array(entry, "certChain").enumerate().map(|(i, c)| {
        let kind = if i == 0 { "Leaf" } else { "Intermediate" };
        (kind, c)
    });
    let roots = array(entry, "rootCerts").map(|c| ("Root", c));
    chain
        .chain(roots)
        .map(|(kind, c)| {
            let valid = validity(c).is_some_and(|(from, to)| {
                let now = std::time::SystemTime::now();
                from <= now && now < to
            });
            vec![
                identity.to_owned(),
                kind.to_owned(),
                state.to_owned(),
                valid.to_string(),
                serial_hex(c).unwrap_or_else(|| "NA".into()),
                non_empty(str_of(c, "expirationTime")),
                non_empty(str_of(c, "validFrom")),
            ]
        })
        .collect()
}

fn non_empty(s: &str) -> String {
    if s.is_empty() { "NA" } else { s }.to_owned()
}

fn validity(cert: &Value) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
    let parse = |key| humantime::parse_rfc3339(str_of(cert, key)).ok();
    Some((parse("validFrom")?, parse("expirationTime")?))
}

/// The serial as istioctl prints it: hexadecimal, read from the certificate itself.
fn serial_hex(cert: &Value) -> Option<String> {
    let pem = pem::parse(str_of(cert, "pem")).ok()?;
    let (_, x509) = x509_parser::parse_x509_certificate(pem.contents()).ok()?;
    Some(x509.tbs_certificate.serial.to_str_radix(16))
}

/// Left-aligned columns, each as wide as its widest cell plus one space.
fn columns(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$} ", w = *w));
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(namespace: Option<&str>, node: Option<&str>, output: Output) -> ViewArgs {
        ViewArgs {
            admin: "127.0.0.1:15000".parse().unwrap(),
            file: None,
            namespace: namespace.map(Into::into),
            node: node.map(Into::into),
            output,
        }
    }

    fn dump() -> Value {
        serde_json::json!({
            "workloads": [
                { "name": "cart-1", "namespace": "shop", "node": "n1", "protocol": "HBONE",
                  "workloadIps": ["10.0.0.5"] },
                { "name": "db-0", "namespace": "data", "node": "n2", "protocol": "TCP",
                  "workloadIps": ["10.0.1.9"] },
            ],
            "services": [
                { "name": "cart", "namespace": "shop", "vips": ["/10.96.0.7"],
                  "endpoints": { "Kubernetes//Pod/shop/cart-1": {} } },
            ],
            "policies": [
                { "name": "deny-ops", "namespace": "shop", "action": "Deny", "scope": "Namespace" },
            ],
            "certificates": [],
            "workloadState": {
                "shop/cart-1": { "connections": {
                    "inbound": [],
                    "outbound": [{ "src": "10.0.0.5:40000", "originalDst": "10.0.1.9:5432",
                                   "actualDst": "10.0.1.9:15008", "protocol": "HBONE" }],
                } },
            },
        })
    }

    #[test]
    fn tables_have_istioctls_columns_and_the_filters_select_rows() {
        let short = |view, namespace, node| {
            render(view, &dump(), None, &args(namespace, node, Output::Short)).unwrap()
        };
        assert_eq!(
            short(View::Workloads, None, None),
            "NAMESPACE POD NAME ADDRESS  NODE WAYPOINT PROTOCOL\n\
             shop      cart-1   10.0.0.5 n1   None     HBONE\n\
             data      db-0     10.0.1.9 n2   None     TCP\n"
        );
        let on_n2 = short(View::Workloads, None, Some("n2"));
        assert!(
            on_n2.contains("db-0") && !on_n2.contains("cart-1"),
            "{on_n2}"
        );
        let in_data = short(View::Workloads, Some("data"), None);
        assert!(
            in_data.contains("db-0") && !in_data.contains("cart-1"),
            "{in_data}"
        );
        assert_eq!(
            short(View::Services, None, None),
            "NAMESPACE SERVICE NAME SERVICE VIP WAYPOINT ENDPOINTS\n\
             shop      cart         10.96.0.7   None     1\n"
        );
        assert_eq!(
            short(View::Policies, Some("data"), None),
            "NAMESPACE POLICY NAME ACTION SCOPE\n"
        );
        let conns = short(View::Connections, None, None);
        let row = conns.lines().nth(1).unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "shop/cart-1",
                "outbound",
                "10.0.0.5:40000",
                "10.0.1.9:15008",
                "10.0.1.9:5432",
                "HBONE",
                "-"
            ]
        );
    }

    #[test]
    fn json_and_yaml_print_the_selected_entries_whole() {
        let json = render(
            View::Workloads,
            &dump(),
            None,
            &args(Some("shop"), None, Output::Json),
        )
        .unwrap();
        let parsed: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(parsed, serde_json::json!([dump()["workloads"][0]]));
        let yaml = render(
            View::Policies,
            &dump(),
            None,
            &args(None, None, Output::Yaml),
        )
        .unwrap();
        let parsed: Value = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(parsed, dump()["policies"]);
    }
}
