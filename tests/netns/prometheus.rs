//! A real Prometheus (built from its Go module by `scripts/kube-test-env build`) scrapes both
//! nodes of a lab, and the queries of Istio's workload and service dashboards and of Culvert's
//! own dashboard (`dashboards/culvert-nodes.json`) answer with the numbers of a known transfer.
//!
//! Istio's dashboards plot `irate(...)`: the change between the last two samples over the time
//! between them. So the test runs a round of known connections between two scrapes of each node
//! and evaluates every query at the first scrape after it: each rate is then exactly one
//! round's bytes (or connections) over that node's scrape interval.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use culvert_tests::*;

const SCRAPE_INTERVAL: f64 = 2.0;
const PROMETHEUS: &str = "127.0.0.1:9090";
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const PORT: u16 = 9000;

/// One round: the client's request through the Service VIP over HBONE, the unenrolled pod's
/// in plaintext, each answered with a quarter of its size; the unenrolled pod's plaintext to
/// the STRICT pod, refused.
const MESH_REQUEST: usize = 3000;
const PLAIN_REQUEST: usize = 1200;

#[test]
#[ignore = "needs root: netns"]
fn prometheus_answers_the_dashboards_queries_after_a_known_transfer() {
    let mut spec = spec(vec![
        PodSpec::new("client", 0, true),
        PodSpec::new("legacy", 0, false),
        PodSpec::new("server", 1, true),
        PodSpec {
            peer_authentication: Some("STRICT"),
            ..PodSpec::new("strict", 1, true)
        },
    ]);
    spec.services = vec![("server".into(), VIP, 80, PORT, vec!["server".into()])];
    let lab = lab("cvprom", spec);
    for pod in ["server", "strict"] {
        serve(lab.pod(pod).listen(PORT).unwrap(), answer_a_quarter);
    }
    let prometheus = Prometheus::start(&lab);
    let nodes: Vec<String> = lab
        .nodes
        .iter()
        .map(|n| format!("{}:15020", n.wire_ip))
        .collect();

    // The first round creates every series (counters appear when a connection closes); a rate
    // needs a sample before the change, so the measured round is a later one.
    round(&lab);
    std::thread::sleep(Duration::from_millis(100));
    prometheus.scraped_after(&nodes, now());
    let mut rounds = 1;
    let at = loop {
        assert!(rounds < 8, "no round fell between two scrapes of each node");
        let start = prometheus.quiet_moment(&nodes);
        round(&lab);
        rounds += 1;
        std::thread::sleep(Duration::from_millis(100));
        if let Some(at) = prometheus.scrapes_around(&nodes, start, now()) {
            break at;
        }
    };
    let t = at.iter().map(|s| s.after).fold(0.0, f64::max);
    let per_second = |node: usize, count: f64| count / (at[node].after - at[node].before);
    let (mesh, plain) = (MESH_REQUEST as f64, PLAIN_REQUEST as f64);
    let service = "server.demo.svc.cluster.local";

    // Istio's workload dashboard for demo/server, reporter destination: inbound bytes by
    // source, split by mutual TLS; and the service dashboard for the Service, reporter source.
    let workload = |metric: &str, mtls: &str| {
        format!(
            "round(sum(irate({metric}{{reporter=~\"destination\", connection_security_policy{mtls}\"mutual_tls\", \
             destination_workload_namespace=~\"demo\", destination_workload=~\"server\", \
             source_workload=~\".*\", source_workload_namespace=~\".*\"}}[1m])) \
             by (source_workload, source_workload_namespace), 0.001)"
        )
    };
    let from = |source| {
        labels(&[
            ("source_workload", source),
            ("source_workload_namespace", "demo"),
        ])
    };
    let for_service = |metric: &str| {
        format!(
            "sum(irate({metric}{{reporter=~\"source\", destination_service=~\"{service}\"}}[1m]))"
        )
    };
    let received = "istio_tcp_received_bytes_total";
    let sent = "istio_tcp_sent_bytes_total";
    let istio = [
        (workload(received, "="), from("client"), per_second(1, mesh)),
        (
            workload(received, "!="),
            from("legacy"),
            per_second(1, plain),
        ),
        (
            workload(sent, "="),
            from("client"),
            per_second(1, mesh / 4.0),
        ),
        (
            workload(sent, "!="),
            from("legacy"),
            per_second(1, plain / 4.0),
        ),
        (for_service(received), labels(&[]), per_second(0, mesh)),
        (
            format!("{} + {}", for_service(sent), for_service(received)),
            labels(&[]),
            per_second(0, mesh * 1.25),
        ),
    ];
    for (query, series, rate) in istio {
        let got = prometheus.query(&query, t);
        // Istio rounds to a thousandth.
        check("Istio", &query, &got, &[(series, Want::Near(rate, 0.001))]);
    }

    // The totals: every round's bytes, per reporter and security policy.
    let n = rounds as f64;
    let totals = "sum by (reporter, source_workload, destination_workload, connection_security_policy) \
                  (istio_tcp_received_bytes_total)";
    let total = |reporter, source, policy, bytes: f64| {
        (
            labels(&[
                ("reporter", reporter),
                ("source_workload", source),
                ("destination_workload", "server"),
                ("connection_security_policy", policy),
            ]),
            Want::Is(bytes),
        )
    };
    let want = [
        total("source", "client", "mutual_tls", n * mesh),
        total("destination", "client", "mutual_tls", n * mesh),
        total("destination", "legacy", "unknown", n * plain),
    ];
    check("totals", totals, &prometheus.query(totals, t), &want);

    // Culvert's dashboard: every panel's query, with the answer it must give.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/culvert-nodes.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let (n0, n1) = (nodes[0].as_str(), nodes[1].as_str());
    let pair = |source, destination| {
        labels(&[
            ("source_workload", source),
            ("source_workload_namespace", "demo"),
            ("destination_workload", destination),
            ("destination_workload_namespace", "demo"),
        ])
    };
    let mut panels = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        let want: Vec<(Labels, Want)> = match title {
            "Inbound bytes received over mTLS, by source and destination" => {
                vec![(pair("client", "server"), Want::Is(per_second(1, mesh)))]
            }
            "Inbound bytes received in plaintext, by source and destination" => {
                vec![(pair("legacy", "server"), Want::Is(per_second(1, plain)))]
            }
            "Inbound bytes sent, by destination and security policy" => {
                let sent = |policy, bytes| {
                    (
                        labels(&[
                            ("destination_workload", "server"),
                            ("destination_workload_namespace", "demo"),
                            ("connection_security_policy", policy),
                        ]),
                        Want::Is(per_second(1, bytes / 4.0)),
                    )
                };
                vec![sent("mutual_tls", mesh), sent("unknown", plain)]
            }
            "Outbound request bytes, by source and destination service" => vec![(
                labels(&[
                    ("source_workload", "client"),
                    ("source_workload_namespace", "demo"),
                    ("destination_service", service),
                ]),
                Want::Is(per_second(0, mesh)),
            )],
            // Per round: the tunnel, the plaintext welcome and the plaintext refusal.
            "Share of inbound connections over mTLS" => vec![(labels(&[]), Want::Is(1.0 / 3.0))],
            "Failed connections, by destination and response flag" => vec![(
                labels(&[
                    ("reporter", "destination"),
                    ("destination_workload", "strict"),
                    ("destination_workload_namespace", "demo"),
                    ("response_flags", "DENY"),
                ]),
                Want::Is(per_second(1, 1.0)),
            )],
            "Policy denials, by node and reason" => vec![(
                labels(&[("instance", n1), ("reason", "plaintext_to_strict")]),
                Want::Is(per_second(1, 1.0)),
            )],
            "HBONE handshake failures, by node, side and reason" => vec![],
            "Pods wired, by node" => vec![
                (labels(&[("instance", n0)]), Want::Is(1.0)),
                (labels(&[("instance", n1)]), Want::Is(2.0)),
            ],
            "Open TCP connections, by node and reporter" => vec![
                (
                    labels(&[("instance", n0), ("reporter", "source")]),
                    Want::Is(0.0),
                ),
                (
                    labels(&[("instance", n1), ("reporter", "destination")]),
                    Want::Is(0.0),
                ),
            ],
            "Soonest certificate expiry, by node" => vec![
                (labels(&[("instance", n0)]), Want::Within(0.0, 86_400.0)),
                (labels(&[("instance", n1)]), Want::Within(0.0, 86_400.0)),
            ],
            "Culvert version, by node" => {
                let tag = env!("CARGO_PKG_VERSION");
                vec![
                    (labels(&[("instance", n0), ("tag", tag)]), Want::Is(1.0)),
                    (labels(&[("instance", n1), ("tag", tag)]), Want::Is(1.0)),
                ]
            }
            other => panic!("panel {other:?} has no expected answer in this test"),
        };
        for target in panel["targets"].as_array().unwrap() {
            let query = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "1m")
                .replace("$instance", ".*");
            let got = prometheus.query(&query, t);
            check(title, &query, &got, &want);
        }
        panels += 1;
    }
    assert_eq!(panels, 12, "the dashboard's panels");
}

/// Reads the request to its end, then answers with a quarter as many bytes.
fn answer_a_quarter(mut stream: TcpStream) {
    let mut request = Vec::new();
    if stream.read_to_end(&mut request).is_ok() {
        let _ = stream.write_all(&vec![b'a'; request.len() / 4]);
    }
}

fn round(lab: &Lab) {
    let back = round_trip(
        lab,
        "client",
        SocketAddr::from((VIP, 80)),
        &[b'm'; MESH_REQUEST],
    )
    .unwrap();
    assert_eq!(back.len(), MESH_REQUEST / 4, "over HBONE through the VIP");
    let back = round_trip(
        lab,
        "legacy",
        addr(lab, "server", PORT),
        &[b'p'; PLAIN_REQUEST],
    )
    .unwrap();
    assert_eq!(back.len(), PLAIN_REQUEST / 4, "plaintext to PERMISSIVE");
    assert!(
        refused(lab, "legacy", addr(lab, "strict", PORT)),
        "plaintext reached a STRICT pod"
    );
}

type Labels = BTreeMap<String, String>;
/// A series of a query's answer: its labels (the metric's name left out) and value.
type Series = (Labels, f64);

/// The answer a query must give for one label set.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// This value, but for the last digits of a float.
    Is(f64),
    /// This value, give or take.
    Near(f64, f64),
    /// Over the first, at most the second.
    Within(f64, f64),
}

fn check(title: &str, query: &str, got: &[Series], want: &[(Labels, Want)]) {
    let mut want = want.to_vec();
    want.sort_by(|a, b| a.0.cmp(&b.0));
    let series: Vec<_> = got.iter().map(|(l, _)| l).collect();
    let wanted: Vec<_> = want.iter().map(|(l, _)| l).collect();
    assert_eq!(series, wanted, "{title}: the series of {query}");
    for ((labels, value), (_, want)) in got.iter().zip(&want) {
        let ok = match *want {
            Want::Is(w) => (value - w).abs() <= 1e-6 * w.abs().max(1.0),
            Want::Near(w, by) => (value - w).abs() <= by,
            Want::Within(lo, hi) => lo < *value && *value <= hi,
        };
        assert!(
            ok,
            "{title}: {query} gave {value} for {labels:?}, want {want:?}"
        );
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The scrape of a node just before a round and the first just after it.
#[derive(Debug, Clone, Copy)]
struct Around {
    before: f64,
    after: f64,
}

/// A Prometheus server in node 0's namespace, scraping both nodes' metrics ports over the wire
/// every two seconds; killed with the lab.
struct Prometheus {
    netns: String,
}

impl Prometheus {
    fn start(lab: &Lab) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kube-test-env");
        let out = Command::new(&script).arg("prometheus").output().unwrap();
        assert!(
            out.status.success(),
            "no Prometheus: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let binary = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        let dir = lab.dir.join("prometheus");
        std::fs::create_dir_all(&dir).unwrap();
        let targets: Vec<String> = lab
            .nodes
            .iter()
            .map(|n| format!("\"{}:15020\"", n.wire_ip))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: {SCRAPE_INTERVAL}s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: culvert\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let netns = lab.nodes[0].netns.clone();
        let child = Command::new("ip")
            .args(["netns", "exec", &netns, &binary])
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={PROMETHEUS}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        lab.own(child);
        let prometheus = Self { netns };
        eventually(
            "Prometheus to scrape both nodes",
            Duration::from_secs(60),
            || {
                let up = prometheus
                    .try_query("up{job=\"culvert\"} == 1", now())
                    .ok()?;
                (up.len() == lab.nodes.len()).then_some(())
            },
        );
        prometheus
    }

    /// An instant query evaluated at `time`: each series' labels (the metric name left out) and
    /// value, sorted by labels.
    fn query(&self, query: &str, time: f64) -> Vec<Series> {
        self.try_query(query, time)
            .unwrap_or_else(|e| panic!("{query}: {e}"))
    }

    fn try_query(&self, query: &str, time: f64) -> Result<Vec<Series>, String> {
        let body = self.api(query, time)?;
        let result = body["data"]["result"]
            .as_array()
            .ok_or_else(|| format!("not a vector: {body}"))?;
        let mut series: Vec<_> = result
            .iter()
            .map(|s| {
                let mut labels: Labels = serde_json::from_value(s["metric"].clone()).unwrap();
                labels.remove("__name__");
                let value = s["value"][1].as_str().unwrap().parse::<f64>().unwrap();
                (labels, value)
            })
            .collect();
        series.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(series)
    }

    /// `GET /api/v1/query`, from inside node 0's namespace.
    fn api(&self, query: &str, time: f64) -> Result<serde_json::Value, String> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.netns,
                "curl",
                "-sS",
                "--max-time",
                "10",
                "-G",
            ])
            .arg(format!("http://{PROMETHEUS}/api/v1/query"))
            .args(["--data-urlencode", &format!("query={query}")])
            .args(["--data-urlencode", &format!("time={time:.3}")])
            .output()
            .map_err(|e| e.to_string())?;
        let body: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&out.stderr)))?;
        if body["status"] != "success" {
            return Err(body.to_string());
        }
        Ok(body)
    }

    /// The times of `node`'s scrapes over the last minute.
    fn scrapes(&self, node: &str) -> Vec<f64> {
        let body = self
            .api(&format!("up{{instance=\"{node}\"}}[1m]"), now())
            .unwrap();
        body["data"]["result"][0]["values"]
            .as_array()
            .map(|v| v.iter().filter_map(|s| s[0].as_f64()).collect())
            .unwrap_or_default()
    }

    /// Waits until every node was last scraped a moment ago and is not due again for most of
    /// a second, and returns the time.
    fn quiet_moment(&self, nodes: &[String]) -> f64 {
        let last: Vec<f64> = nodes
            .iter()
            .map(|n| self.scrapes(n).last().copied().unwrap_or(0.0))
            .collect();
        loop {
            let t = now();
            // Two windows of 1.2 s in an interval of 2 s always overlap, whatever the offset
            // between the nodes' scrapes.
            let (first, last) = last.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), l| {
                let mut next = l + SCRAPE_INTERVAL;
                while next < t {
                    next += SCRAPE_INTERVAL;
                }
                (lo.min(next - t), hi.max(next - t))
            });
            if first >= 0.7 && last <= SCRAPE_INTERVAL - 0.1 {
                return t;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until every node has been scraped after `end`; returns each node's scrape times.
    fn scraped_after(&self, nodes: &[String], end: f64) -> Vec<Vec<f64>> {
        eventually(
            "a scrape of every node after the round",
            Duration::from_secs(30),
            || {
                let all: Vec<Vec<f64>> = nodes.iter().map(|n| self.scrapes(n)).collect();
                all.iter()
                    .all(|s| s.last().is_some_and(|t| *t > end))
                    .then_some(all)
            },
        )
    }

    /// Each node's last scrape before `start` and first after `end`, once every node has had
    /// one after; `None` when a node was scraped between the two (the round is split).
    fn scrapes_around(&self, nodes: &[String], start: f64, end: f64) -> Option<Vec<Around>> {
        self.scraped_after(nodes, end)
            .iter()
            .map(|s| {
                let before = s.iter().rev().find(|t| **t < start - 0.1)?;
                let after = s.iter().find(|t| **t > end)?;
                // No scrape in between.
                s.iter()
                    .all(|t| t <= before || t >= after)
                    .then_some(Around {
                        before: *before,
                        after: *after,
                    })
            })
            .collect()
    }
}
