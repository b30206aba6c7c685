//! `culvert check` against a node: every check passes on a healthy one, and each failure it
//! can meet here is named with its fix and fails the command.

use std::time::Duration;

use culvert::test_util::{echo_server, exchange};
use culvert_tests::inproc::{APP, Topology, get};

/// Runs `culvert check` with `args`: whether it succeeded, and its stdout.
async fn check(args: &[&str]) -> (bool, String) {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(culvert_tests::culvert_bin())
            .arg("check")
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap())
}

/// The line of check `name` in the human output.
fn line<'a>(out: &'a str, name: &str) -> &'a str {
    out.lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .unwrap_or_else(|| panic!("no {name} line in:\n{out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_passes_on_a_healthy_node_and_names_each_unwired_pod_with_its_fix() {
    let mut t = Topology::new("check", &[("client", 0), ("late", 0), ("server", 1)]);
    // No self-healing during the test: a flushed pod stays bare until checked.
    t.heal_interval = Duration::from_secs(3600);
    let (a, b) = t.start_pair().await;
    let ns = t.namespace.clone();
    let admin = a.node.admin_addr.to_string();

    // `late` is enrolled on node 0 but not registered yet.
    let (ok, out) = check(&["--admin", &admin]).await;
    assert!(!ok, "{out}");
    assert!(line(&out, "ready").starts_with("ok"), "{out}");
    assert!(line(&out, "cni").starts_with("ok"), "{out}");
    assert!(line(&out, "certificates").starts_with("ok"), "{out}");
    let pods = line(&out, "pods");
    assert!(pods.starts_with("FAIL"), "{out}");
    assert!(
        pods.contains(&format!("{ns}/late: enrolled but not wired")),
        "{out}"
    );
    assert!(!pods.contains("client"), "{out}");
    assert!(out.contains("fix: a pod still starting"), "{out}");
    assert!(out.ends_with("1 of 6 checks failed\n"), "{out}");

    // Wired, every check passes.
    t.register(&a, "late").await;
    let (ok, out) = check(&["--admin", &admin]).await;
    assert!(ok, "{out}");
    assert!(
        line(&out, "pods").contains("2 enrolled pods wired"),
        "{out}"
    );
    assert!(
        line(&out, "certificates").contains("2 identities hold valid certificates"),
        "{out}"
    );
    assert!(out.ends_with("all checks passed\n"), "{out}");
    assert!(
        line(&out, "traffic")
            .contains("no inbound connections to enrolled pods in the last 10 minutes"),
        "{out}"
    );

    // The server's node saw one tunnel: all its inbound traffic is mTLS.
    let server = std::net::SocketAddr::new(t.ip("server"), APP);
    echo_server(server).await;
    let app = a.connect_from(&ns, "client", server).await;
    assert_eq!(exchange(app, b"sealed").await.unwrap(), b"sealed");
    let (ok, out) = check(&["--admin", &b.node.admin_addr.to_string(), "-o", "json"]).await;
    assert!(ok, "{out}");
    let checks: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let traffic = checks.iter().find(|c| c["check"] == "traffic").unwrap();
    assert_eq!(
        traffic["detail"], "1 inbound connections in the last 10 minutes, all over mTLS",
        "{out}"
    );
    assert_eq!(traffic["inbound"]["mtls"], 1, "{out}");
    assert_eq!(traffic["inbound"]["plaintext"], 0, "{out}");

    // A pod whose rules someone removed is named, with why.
    a.capture.flush(&format!("/run/netns/{ns}-client"));
    let (ok, out) = check(&["--admin", &admin, "-o", "json"]).await;
    assert!(!ok, "{out}");
    let checks: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let pods = checks.iter().find(|c| c["check"] == "pods").unwrap();
    assert_eq!(pods["ok"], false);
    assert_eq!(
        pods["detail"],
        format!("{ns}/client: redirection rules are missing"),
        "{out}"
    );
    assert!(pods["fix"].is_string());

    // Only on the admin address.
    assert_eq!(get(a.node.readiness_addr, "/check").await.0, 404);
    // A node that does not answer fails the command too.
    drop(a);
    let (ok, _) = check(&["--admin", "127.0.0.1:1"]).await;
    assert!(!ok);
}
