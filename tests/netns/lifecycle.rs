//! Enrollment lifecycle through the real CNI chain: no enrolled pod ever runs unredirected,
//! across daemon outages, restarts, simulated reboots and enrollment changes.

use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use culvert_cni_proto::{Request, Response};
use culvert_lab::runtime::PluginError;
use culvert_tests::*;

/// (nft tables named culvert, fwmark rules, listeners on the outbound port) in a pod.
fn copies(lab: &Lab, pod: &str) -> (usize, usize, usize) {
    let nft = in_pod(lab, pod, &["nft", "list", "tables"]).unwrap();
    let rules = in_pod(lab, pod, &["ip", "rule"]).unwrap();
    let listeners = in_pod(lab, pod, &["ss", "-Htln", "sport", "= :15001"]).unwrap();
    (
        nft.matches("inet culvert").count(),
        rules.matches("fwmark 0x111/0xfff").count(),
        listeners.lines().count(),
    )
}

fn plugin_error(e: &anyhow::Error) -> &PluginError {
    e.downcast_ref::<PluginError>()
        .unwrap_or_else(|| panic!("not a plugin error: {e:#}"))
}

#[test]
#[ignore = "needs root: netns"]
fn first_connections_after_add_are_already_redirected() {
    let late = |name: &str, node| PodSpec {
        attach: false,
        ..PodSpec::new(name, node, true)
    };
    let lab = lab(
        "cvfirst",
        spec(vec![
            late("client", 0),
            PodSpec::new("outsider", 0, false),
            PodSpec::new("server", 1, true),
            PodSpec {
                peer_authentication: Some("STRICT"),
                ..late("fresh", 1)
            },
        ]),
    );
    lab.pod("server").serve_echo(ECHO).unwrap();
    let capture = lab.capture_wire().unwrap();
    let marker = b"FIRST-CONNECTION-MARKER-91e";

    lab.cni_add("client").unwrap();
    let back = round_trip(&lab, "client", addr(&lab, "server", ECHO), marker)
        .expect("first outbound connection");
    assert_eq!(back, marker);

    lab.cni_add("fresh").unwrap();
    lab.pod("fresh").serve_echo(ECHO).unwrap();
    let knock = round_trip(&lab, "outsider", addr(&lab, "fresh", ECHO), b"knock");
    assert!(
        knock.map(|b| b.is_empty()).unwrap_or(true),
        "first inbound plaintext reached a STRICT pod"
    );
    assert_eq!(
        round_trip(&lab, "client", addr(&lab, "fresh", ECHO), marker).unwrap(),
        marker
    );

    let segments = capture.finish().unwrap();
    assert!(
        !wire::contains(&segments, marker),
        "a first connection left in plaintext"
    );
    assert!(wire::Report::of(&segments, 15008).hbone_bytes >= 4 * marker.len());
    let line = access_line(&lab, 1, |v| {
        v["transport"] == "hbone" && v["pod"] == "demo/server"
    });
    assert_eq!(
        line["src.identity"],
        "spiffe://cluster.local/ns/demo/sa/client"
    );
}

#[test]
#[ignore = "needs root: netns"]
fn add_fails_closed_while_the_daemon_is_down_and_succeeds_once_it_is_back() {
    let mut spec = spec(vec![
        PodSpec {
            attach: false,
            ..PodSpec::in_namespace("cart", 0, "shop")
        },
        PodSpec {
            attach: false,
            ..PodSpec::in_namespace("web", 0, "plain")
        },
        PodSpec::in_namespace("server", 1, "shop"),
        // A namespace the daemons never heard of: labelled while they were away, perhaps.
        PodSpec {
            attach: false,
            listed: false,
            ..PodSpec::in_namespace("newcomer", 0, "fresh")
        },
    ]);
    spec.enrolled_namespaces = vec!["shop".into()];
    let lab = lab("cvclosed", spec);
    lab.stop_node(0, nix::sys::signal::Signal::SIGTERM).unwrap();

    let err = lab
        .cni_add("cart")
        .expect_err("an enrolled pod started with its node's daemon down");
    let err = plugin_error(&err);
    assert_eq!(
        (err.plugin.as_str(), err.code),
        ("culvert-cni", 11),
        "{err}"
    );
    assert!(
        err.msg.contains("unreachable") && err.msg.contains("shop/cart is enrolled"),
        "{err}"
    );
    assert!(
        in_pod(&lab, "cart", &["ip", "-4", "addr", "show", "eth0"]).is_none(),
        "failed ADD left a network"
    );

    lab.cni_add("web")
        .expect("a pod of a namespace known not to be enrolled is never blocked");
    let err = lab
        .cni_add("newcomer")
        .expect_err("a pod of a namespace the daemon never saw started unwired");
    assert_eq!(plugin_error(&err).code, 11, "{err:#}");

    lab.start_node(0).unwrap();
    lab.cni_add("cart")
        .expect("the retried ADD succeeds once the daemon is back");
    lab.cni_add("newcomer")
        .expect("once the daemon answers, it decides: not enrolled, so admitted");
    assert!(wired(&lab, 0).contains(&"shop/cart".to_owned()));
    lab.pod("server").serve_echo(ECHO).unwrap();
    assert_eq!(
        round_trip(&lab, "cart", addr(&lab, "server", ECHO), b"hi").unwrap(),
        b"hi"
    );
    access_line(&lab, 1, |v| {
        v["transport"] == "hbone" && v["src.identity"] == "spiffe://cluster.local/ns/shop/sa/cart"
    });
}

#[test]
#[ignore = "needs root: netns"]
fn restart_after_sigkill_rewires_every_pod_once_and_never_leaks() {
    let lab = lab(
        "cvkill",
        spec(vec![
            PodSpec::new("client", 0, true),
            PodSpec::new("peer", 0, true),
            PodSpec::new("server", 1, true),
        ]),
    );
    lab.pod("server").serve_echo(ECHO).unwrap();
    lab.pod("peer").serve_echo(ECHO).unwrap();
    let to = addr(&lab, "server", ECHO);
    assert_eq!(
        round_trip(&lab, "client", to, b"before").unwrap(),
        b"before"
    );
    let marker = b"DOWNTIME-MARKER-4c1";
    let capture = lab.capture_wire().unwrap();

    let killed = Instant::now();
    lab.stop_node(0, nix::sys::signal::Signal::SIGKILL).unwrap();
    // While the daemon is gone the rules stay: connections are refused, not sent around it.
    for _ in 0..5 {
        let attempt = round_trip(&lab, "client", to, marker);
        assert!(
            attempt.map(|b| b.is_empty()).unwrap_or(true),
            "traffic flowed with the daemon dead"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let restarting = Instant::now();
    lab.start_node(0).unwrap();
    let back = eventually("traffic after the restart", Duration::from_secs(20), || {
        round_trip(&lab, "client", to, marker)
            .ok()
            .filter(|b| b == marker)
    });
    let (unreachable, after_start) = (killed.elapsed(), restarting.elapsed());
    assert_eq!(back, marker);
    eprintln!(
        "SIGKILL restart: client unreachable for {unreachable:.0?} in all, {after_start:.0?} of it from daemon start to the first successful connection"
    );

    for pod in ["client", "peer"] {
        assert_eq!(
            copies(&lab, pod),
            (1, 1, 1),
            "{pod}: (nft tables, ip rules, listeners)"
        );
    }
    assert_eq!(
        round_trip(&lab, "client", addr(&lab, "peer", ECHO), b"same node").unwrap(),
        b"same node"
    );
    let segments = capture.finish().unwrap();
    assert!(
        !wire::contains(&segments, marker),
        "plaintext left the node around the restart"
    );
    // The runtime's ids survived the restart, so a later DEL finds the pod.
    let ids: Vec<String> = match lab.call(0, &Request::ListPods).unwrap() {
        Response::Pods { pods } => pods.into_iter().map(|p| p.container_id).collect(),
        other => panic!("{other:?}"),
    };
    assert!(
        ids.contains(&lab.pod("client").sandbox.container_id),
        "{ids:?}"
    );
}

#[test]
#[ignore = "needs root: netns"]
fn node_reboot_never_lets_an_enrolled_pod_send_plaintext() {
    let lab = lab(
        "cvboot",
        spec(vec![
            PodSpec::new("client", 0, true),
            PodSpec::new("server", 1, true),
        ]),
    );
    lab.pod("server").serve_echo(ECHO).unwrap();
    let to = addr(&lab, "server", ECHO);
    let capture = lab.capture_wire().unwrap();

    // The reboot: daemon gone with its runtime state and every rule; pod namespaces and the
    // enrollment state file survive (in a real reboot the runtime recreates the sandboxes).
    lab.stop_node(0, nix::sys::signal::Signal::SIGKILL).unwrap();
    for cmd in [
        &["nft", "delete", "table", "inet", "culvert"][..],
        &["ip", "rule", "del", "fwmark", "0x111/0xfff"],
    ] {
        in_pod(&lab, "client", cmd).unwrap();
    }
    std::fs::remove_file(lab.nodes[0].state_dir.join("pods.json")).unwrap();
    assert!(lab.nodes[0].state_dir.join("enrollment.json").exists());
    lab.cni_del("client").unwrap();

    // The runtime recreates the sandbox before the daemon is back: refused, so the app never
    // starts without redirection.
    let err = lab
        .cni_add("client")
        .expect_err("sandbox created with the daemon down");
    assert_eq!(plugin_error(&err).code, 11);

    lab.start_node(0).unwrap();
    lab.cni_add("client").expect("ADD after the daemon is back");
    // Only now does the app run; its first connection is already redirected.
    let marker = b"AFTER-REBOOT-MARKER-77";
    assert_eq!(round_trip(&lab, "client", to, marker).unwrap(), marker);
    assert_eq!(copies(&lab, "client"), (1, 1, 1));
    let segments = capture.finish().unwrap();
    assert!(
        !wire::contains(&segments, marker),
        "plaintext after the reboot"
    );
    assert!(wire::Report::of(&segments, 15008).tls13);
}

#[test]
#[ignore = "needs root: netns"]
fn enrollment_flip_wires_unwires_and_rewires_a_running_pod() {
    let mut spec = spec(vec![
        PodSpec::in_namespace("cart", 0, "shop"),
        PodSpec::new("server", 1, true),
    ]);
    spec.enrolled_namespaces = vec!["shop".into()];
    let mut lab = lab("cvflip", spec);
    lab.pod("server").serve_echo(ECHO).unwrap();
    let to = addr(&lab, "server", ECHO);
    let through = |lab: &Lab, marker: &[u8]| {
        let capture = lab.capture_wire().unwrap();
        assert_eq!(round_trip(lab, "cart", to, marker).unwrap(), marker);
        let segments = capture.finish().unwrap();
        wire::contains(&segments, marker)
    };

    assert_eq!(copies(&lab, "cart"), (1, 1, 1));
    assert!(
        !through(&lab, b"ENROLLED-MARKER-1"),
        "enrolled pod sent plaintext"
    );

    lab.set_enrolled_namespaces(&[]).unwrap();
    assert_eq!(
        copies(&lab, "cart"),
        (0, 0, 0),
        "released pod keeps rules or listeners"
    );
    assert!(!wired(&lab, 0).contains(&"shop/cart".to_owned()));
    assert!(
        through(&lab, b"RELEASED-MARKER-2"),
        "a released pod's traffic should be plain TCP"
    );

    lab.set_enrolled_namespaces(&["shop"]).unwrap();
    assert_eq!(copies(&lab, "cart"), (1, 1, 1));
    assert!(
        !through(&lab, b"ENROLLED-AGAIN-MARKER-3"),
        "re-enrolled pod sent plaintext"
    );
}

#[test]
#[ignore = "needs root: netns"]
fn del_never_fails() {
    let lab = lab(
        "cvdel2",
        spec(vec![
            PodSpec::new("twice", 0, true),
            PodSpec::new("gone", 0, true),
            PodSpec::new("nocache", 0, true),
        ]),
    );
    lab.cni_del("twice").unwrap();
    lab.cni_del("twice").expect("a second DEL");

    Command::new("ip")
        .args(["netns", "del", &lab.pod("gone").netns])
        .status()
        .unwrap();
    lab.cni_del("gone").expect("DEL with the namespace gone");

    let nocache = lab.pod("nocache");
    lab.nodes[0].runtime.forget(&nocache.sandbox).unwrap();
    lab.cni_del("nocache").expect("DEL with no prevResult");
    assert_eq!(wired(&lab, 0), Vec::<String>::new());
}

#[test]
#[ignore = "needs root: netns"]
fn check_reports_a_pod_whose_rules_were_removed() {
    let mut spec = spec(vec![
        PodSpec::new("client", 0, true),
        PodSpec::new("legacy", 0, false),
    ]);
    // No healing during this test: CHECK is what must notice.
    spec.node_flags = vec!["--heal-interval".into(), "1h".into()];
    let lab = lab("cvcheck", spec);
    lab.cni_check("client")
        .expect("CHECK of a freshly wired pod");
    lab.cni_check("legacy")
        .expect("CHECK of a pod that is not enrolled");
    in_pod(
        &lab,
        "client",
        &["nft", "delete", "table", "inet", "culvert"],
    )
    .unwrap();
    let err = lab
        .cni_check("client")
        .expect_err("CHECK passed with the rules gone");
    let err = plugin_error(&err);
    assert_eq!(err.code, 100);
    assert!(
        err.details.contains("redirection rules are missing"),
        "{err}"
    );
    assert_eq!(
        lab.register("client").unwrap(),
        Response::Added { enrolled: true }
    );
    lab.cni_check("client")
        .expect("CHECK after the rules were restored");
}

/// The plugin's stdout contract, run as the runtime runs it. Needs no root.
#[test]
fn plugin_answers_bad_input_with_spec_errors_on_stdout() {
    let plugin = culvert_bin().with_file_name("culvert-cni");
    let run = |env: &[(&str, &str)], stdin: &[u8]| {
        use std::io::Write;
        let mut child = Command::new(&plugin)
            .env_clear()
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        let out = child.wait_with_output().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&out.stdout)
            )
        });
        (out.status.success(), json)
    };
    let add = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc"),
        ("CNI_NETNS", "/var/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
    ];
    type Env<'a> = &'a [(&'a str, &'a str)];
    let cases: [(Env<'_>, &[u8], u64, &str); 4] = [
        (&add, b"\x00garbage", 6, "not valid JSON"),
        (
            &add,
            br#"{"cniVersion":"9.9.9","name":"n","type":"culvert-cni"}"#,
            1,
            "9.9.9",
        ),
        (
            &add[..2],
            br#"{"cniVersion":"1.0.0","name":"n","type":"culvert-cni"}"#,
            4,
            "CNI_NETNS",
        ),
        (&[("CNI_COMMAND", "LAUNCH")], b"{}", 4, "LAUNCH"),
    ];
    for (env, stdin, code, says) in cases {
        let (ok, json) = run(env, stdin);
        assert!(!ok, "exit status 0 for an error");
        assert_eq!(json["code"], code, "{json}");
        assert!(json["msg"].as_str().unwrap().contains(says), "{json}");
        assert!(json["cniVersion"].is_string(), "{json}");
    }
    let (ok, json) = run(&[("CNI_COMMAND", "VERSION")], br#"{"cniVersion":"0.3.1"}"#);
    assert!(ok);
    assert_eq!(json["cniVersion"], "0.3.1");
    assert_eq!(json["supportedVersions"].as_array().unwrap().len(), 5);
}

#[test]
#[ignore = "needs root: netns"]
fn installer_keeps_the_plugin_in_the_chain_and_uninstall_restores_the_original() {
    let lab = lab(
        "cvinst",
        spec(vec![
            PodSpec {
                attach: false,
                ..PodSpec::new("client", 0, true)
            },
            PodSpec::new("server", 1, true),
        ]),
    );
    let node = &lab.nodes[0];
    let primary = node.runtime.conf_dir.join(culvert_lab::PRIMARY_CONFIG);
    let plugin_types = || -> Vec<String> {
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&primary).unwrap()).unwrap();
        config["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(plugin_types(), ["bridge", "culvert-cni"]);
    let installed = node.runtime.cni_path[0].join("culvert-cni");
    assert!(installed.exists(), "plugin binary not installed");

    // The primary CNI rewrites its file without us: the daemon puts the entry back.
    let mut original: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&primary).unwrap()).unwrap();
    original["plugins"].as_array_mut().unwrap().pop();
    std::fs::write(&primary, serde_json::to_vec_pretty(&original).unwrap()).unwrap();
    eventually("the entry to come back", Duration::from_secs(5), || {
        (plugin_types() == ["bridge", "culvert-cni"]).then_some(())
    });
    lab.cni_add("client").unwrap();
    assert!(
        wired(&lab, 0).contains(&"demo/client".to_owned()),
        "the re-inserted plugin did not wire the pod"
    );

    // A stopping daemon leaves the entry, so enrolled pods keep failing closed until it returns.
    lab.stop_node(0, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert_eq!(plugin_types(), ["bridge", "culvert-cni"]);

    let out = Command::new(culvert_bin())
        .arg("cni-uninstall")
        .arg("--cni-conf-dir")
        .arg(&node.runtime.conf_dir)
        .arg("--cni-bin-dir")
        .arg(&node.runtime.cni_path[0])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&primary).unwrap()).unwrap();
    assert_eq!(restored, original);
    assert!(!installed.exists(), "plugin binary left behind");
}

/// Runs the installed plugin binary for `command` with `config` on stdin; returns (ok, stdout).
fn plugin(lab: &Lab, command: &str, config: &serde_json::Value) -> (bool, String) {
    use std::io::Write;
    let node = &lab.nodes[0];
    let mut child = Command::new(node.runtime.cni_path[0].join("culvert-cni"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(config).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
#[ignore = "needs root: netns"]
fn status_and_gc_reach_the_daemon_and_a_pod_deleted_while_it_was_down_is_forgotten() {
    let lab = lab(
        "cvgc",
        spec(vec![
            PodSpec::new("keep", 0, true),
            PodSpec::new("stale", 0, true),
            PodSpec::new("gone", 0, true),
            PodSpec::new("unlisted", 0, true),
        ]),
    );
    let socket = lab.nodes[0].socket.display().to_string();
    let config = |extra: serde_json::Value| {
        let mut c = serde_json::json!({"cniVersion": "1.1.0", "name": "lab-n0", "type": "culvert-cni", "socket": socket});
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c
    };
    assert_eq!(
        plugin(&lab, "STATUS", &config(serde_json::json!({}))),
        (true, String::new())
    );

    // GC: the runtime lists only "keep" and "gone" as valid. It disposed of "stale"'s sandbox;
    // "unlisted" runs on (a runtime that lost track of it, or a GC that lies).
    Command::new("ip")
        .args(["netns", "del", &lab.pod("stale").netns])
        .status()
        .unwrap();
    let valid: Vec<serde_json::Value> = ["keep", "gone"]
        .iter()
        .map(|p| serde_json::json!({"containerID": lab.pod(p).sandbox.container_id, "ifname": "eth0"}))
        .collect();
    let (ok, out) = plugin(
        &lab,
        "GC",
        &config(serde_json::json!({"cni.dev/valid-attachments": valid})),
    );
    assert!(ok, "{out}");
    assert_eq!(
        wired(&lab, 0),
        ["demo/gone", "demo/keep", "demo/unlisted"].map(String::from),
        "GC must collect the dead sandbox and never a running, enrolled pod"
    );
    assert_eq!(copies(&lab, "unlisted"), (1, 1, 1), "GC unwired a live pod");

    // "gone" is deleted while the daemon is down; on return the daemon no longer tracks it.
    lab.stop_node(0, nix::sys::signal::Signal::SIGKILL).unwrap();
    let (ok, out) = plugin(&lab, "STATUS", &config(serde_json::json!({})));
    assert!(
        !ok && out.contains("\"code\":50"),
        "STATUS with the daemon down: {out}"
    );
    lab.cni_del("gone").unwrap();
    Command::new("ip")
        .args(["netns", "del", &lab.pod("gone").netns])
        .status()
        .unwrap();
    lab.start_node(0).unwrap();
    assert_eq!(
        wired(&lab, 0),
        ["demo/keep", "demo/unlisted"].map(String::from)
    );
    let recorded = std::fs::read_to_string(lab.nodes[0].state_dir.join("pods.json")).unwrap();
    assert!(
        !recorded.contains(&lab.pod("gone").sandbox.container_id),
        "{recorded}"
    );
}

/// Kills the process on drop.
struct Holder(std::process::Child);

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "needs root: netns"]
fn a_pod_whose_namespace_only_a_non_root_process_holds_is_wired_and_found_again() {
    // As under cri-dockerd: the runtime passes /proc/<pid>/ns/net, and the sandbox's process
    // (pause) runs as 65535. Opening that takes CAP_SYS_PTRACE, which the DaemonSet grants and
    // the lab's daemons hold, with nothing more.
    let mut pods = spec(vec![
        PodSpec::new("client", 0, true),
        PodSpec::new("server", 1, true),
    ]);
    pods.pods[1].attach = false;
    let mut lab = lab("cvproc", pods);
    let pid = lab.daemon_pid(1).unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
        .unwrap();
    // Bit numbers from linux/capability.h.
    let bits = |name: &str| match name {
        "NET_ADMIN" => 12,
        "NET_RAW" => 13,
        "SYS_PTRACE" => 19,
        "SYS_ADMIN" => 21,
        other => panic!("no bit for {other}"),
    };
    let granted = culvert_lab::NODE_CAPABILITIES
        .iter()
        .fold(0u64, |mask, c| mask | 1 << bits(c));
    assert_eq!(effective, granted, "the daemon's effective capabilities");

    let netns = lab.pod("server").netns.clone();
    let holder = Holder(
        Command::new("ip")
            .args(["netns", "exec", &netns, "setpriv", "--reuid=65535"])
            .args(["--regid=65535", "--clear-groups", "--", "sleep", "600"])
            .spawn()
            .unwrap(),
    );
    let held = std::path::PathBuf::from(format!("/proc/{}/ns/net", holder.0.id()));
    eventually(
        "the holder to enter the pod",
        Duration::from_secs(5),
        || culvert::redirect::netns::same(&held, &culvert_lab::netns_path(&netns)).then_some(()),
    );
    // Only /proc leads to the pod now: not the node's netns directory, not the sandbox.
    std::fs::remove_file(lab.dir.join("netns-n1").join(&netns)).unwrap();
    let k = lab.pods.iter().position(|p| p.name == "server").unwrap();
    lab.pods[k].sandbox.netns = held;
    lab.cni_add("server").unwrap();
    assert_eq!(copies(&lab, "server"), (1, 1, 1));
    lab.pod("server").serve_echo(ECHO).unwrap();
    let to = addr(&lab, "server", ECHO);
    assert_eq!(round_trip(&lab, "client", to, b"first").unwrap(), b"first");
    // Its access line is written as the server side closes, a moment after the client has
    // its echo: a SIGKILL before that would lose it.
    eventually(
        "the first connection's access line",
        Duration::from_secs(5),
        || (hbone_streams(&lab, 1, "demo/server") == 1).then_some(()),
    );

    // After a restart the daemon finds it again by scanning /proc.
    lab.stop_node(1, nix::sys::signal::Signal::SIGKILL).unwrap();
    lab.start_node(1).unwrap();
    let back = eventually("traffic after the restart", Duration::from_secs(20), || {
        round_trip(&lab, "client", to, b"again")
            .ok()
            .filter(|b| b == b"again")
    });
    assert_eq!(back, b"again");
    assert_eq!(copies(&lab, "server"), (1, 1, 1));
    assert_eq!(
        hbone_streams(&lab, 1, "demo/server"),
        2,
        "both connections came over HBONE"
    );
}

#[test]
#[ignore = "needs root: netns"]
fn a_rolling_update_with_surge_drops_no_connection() {
    let lab = lab(
        "cvsurge",
        spec(vec![
            PodSpec::new("client", 0, true),
            PodSpec::new("server", 1, true),
        ]),
    );
    lab.pod("server").serve_echo(ECHO).unwrap();
    let to = addr(&lab, "server", ECHO);
    assert_eq!(round_trip(&lab, "client", to, b"warm").unwrap(), b"warm");

    let stop = AtomicBool::new(false);
    let (ok, failed) = (AtomicUsize::new(0), Mutex::new(Vec::new()));
    std::thread::scope(|scope| {
        // New connections back to back, all through the updates.
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                match round_trip(&lab, "client", to, b"load") {
                    Ok(back) if back == b"load" => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        failed.lock().unwrap().push(format!("{other:?}"));
                        0
                    }
                };
            }
        });
        // The server's node first (inbound HBONE), then the client's (outbound capture).
        for node in [1, 0] {
            let mut long = lab.pod("client").connect(to).unwrap();
            echo_on(&mut long, b"before the update");
            let old = lab.surge(node).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            let pid = nix::unistd::Pid::from_raw(old.id() as i32);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            // The old daemon drains: what it carries keeps working until it closes.
            echo_on(&mut long, b"while the old daemon drains");
            drop(long);
            let mut old = old;
            let status = old.wait().unwrap();
            assert!(status.success(), "node {node}'s old daemon: {status}");
            std::thread::sleep(Duration::from_millis(300));
        }
        stop.store(true, Ordering::Relaxed);
    });
    let failed = failed.into_inner().unwrap();
    let ok = ok.into_inner();
    eprintln!("surge: {ok} connections, {} failed", failed.len());
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 20, "only {ok} connections during the updates");
    for node in 0..2 {
        assert!(
            lab.call(node, &Request::ListPods).is_ok(),
            "node {node}'s socket"
        );
    }
    assert_eq!(copies(&lab, "client"), (1, 1, 1));
    assert_eq!(copies(&lab, "server"), (1, 1, 1));
}

/// Sends `payload` on `stream` and reads the echo back.
fn echo_on(stream: &mut std::net::TcpStream, payload: &[u8]) {
    use std::io::{Read as _, Write as _};
    stream.write_all(payload).unwrap();
    let mut back = vec![0; payload.len()];
    stream.read_exact(&mut back).unwrap();
    assert_eq!(back, payload);
}

#[test]
#[ignore = "needs root: netns"]
fn no_stale_or_hostile_cni_call_unwires_a_running_pod() {
    use culvert_cni_proto::{AddPod, DelPod, Gc, PodRef};
    let lab = lab(
        "cvstale",
        spec(vec![
            PodSpec::new("client", 0, true),
            PodSpec::new("other", 0, true),
            PodSpec::new("server", 1, true),
        ]),
    );
    lab.pod("server").serve_echo(ECHO).unwrap();
    // A restart that lost pods.json: the daemon rewires both pods under ids of its own, which
    // the runtime has never heard of.
    lab.stop_node(0, nix::sys::signal::Signal::SIGKILL).unwrap();
    std::fs::remove_file(lab.nodes[0].state_dir.join("pods.json")).unwrap();
    lab.start_node(0).unwrap();
    let both = vec!["demo/client".to_owned(), "demo/other".to_owned()];
    assert_eq!(wired(&lab, 0), both);
    let capture = lab.capture_wire().unwrap();

    let client = lab.pod("client");
    let pod = PodRef {
        namespace: "demo".into(),
        name: "client".into(),
        uid: None,
    };
    let netns_of = |name: &str| culvert_lab::netns_path(&lab.pod(name).netns);
    let call = |request: Request| lab.call(0, &request).unwrap();
    // DEL for another sandbox of the pod: stale, retried or out of order.
    for netns in [Some("/var/run/netns/cni-gone".to_owned()), None] {
        let del = DelPod {
            container_id: "an-older-sandbox".into(),
            netns,
            pod: Some(pod.clone()),
        };
        assert_eq!(call(Request::DelPod(del)), Response::Removed);
    }
    // A correct GC: the runtime lists its own sandbox ids.
    let keep = vec![
        client.sandbox.container_id.clone(),
        lab.pod("other").sandbox.container_id.clone(),
    ];
    assert_eq!(call(Request::Gc(Gc { keep })), Response::Removed);
    // ADDs for a new sandbox of the pod that must be refused before anything changes.
    let daemon_netns = format!("/proc/{}/ns/net", lab.daemon_pid(0).unwrap());
    let add = |netns: String| AddPod {
        container_id: "a-new-sandbox".into(),
        netns,
        ifname: "eth0".into(),
        pod: pod.clone(),
        ips: vec![client.ip.into()],
    };
    for (netns, want) in [
        (
            "/var/run/netns/nope".to_owned(),
            "No such file or directory",
        ),
        (
            netns_of("other").display().to_string(),
            "is wired for pod demo/other",
        ),
        (daemon_netns, "the daemon's own network namespace"),
    ] {
        match call(Request::AddPod(add(netns.clone()))) {
            Response::Nack { reason } => assert!(reason.contains(want), "{netns}: {reason}"),
            other => panic!("ADD in {netns} was answered {other:?}"),
        }
    }
    assert_eq!(wired(&lab, 0), both, "a CNI call unwired a running pod");
    let ruleset = in_pod(&lab, "client", &["nft", "list", "table", "inet", "culvert"]);
    assert!(ruleset.is_some(), "the client's rules are gone");

    let marker = b"STALE-CALL-PLAINTEXT-MARKER-4c1";
    echo_ok(&lab, "client", addr(&lab, "server", ECHO), marker);
    echo_ok(&lab, "other", addr(&lab, "server", ECHO), marker);
    let segments = capture.finish().unwrap();
    assert!(
        !wire::contains(&segments, marker),
        "the marker crossed the wire in plaintext"
    );
    for who in ["client", "other"] {
        access_line(&lab, 1, |v| {
            v["transport"] == "hbone"
                && v["src.identity"] == format!("spiffe://cluster.local/ns/demo/sa/{who}")
        });
    }
    // The node's own namespace got no pod ruleset (its probe table is another one).
    let node_rules = Command::new("ip")
        .args([
            "netns",
            "exec",
            &lab.nodes[0].netns,
            "nft",
            "list",
            "tables",
        ])
        .output()
        .unwrap();
    let node_rules = String::from_utf8_lossy(&node_rules.stdout);
    assert!(
        !node_rules.contains("table inet culvert"),
        "a pod ruleset went into the node: {node_rules}"
    );
}

#[test]
#[ignore = "needs root: netns"]
fn flushed_pod_rules_are_restored_within_seconds() {
    let mut spec = spec(vec![
        PodSpec::new("client", 0, true),
        PodSpec::new("server", 1, true),
    ]);
    spec.node_flags = vec!["--heal-interval".into(), "1s".into()];
    let lab = lab("cvheal", spec);
    lab.pod("server").serve_echo(ECHO).unwrap();
    assert_eq!(copies(&lab, "client"), (1, 1, 1));

    in_pod(&lab, "client", &["nft", "flush", "ruleset"]).unwrap();
    let flushed = Instant::now();
    eventually("the rules to be restored", Duration::from_secs(10), || {
        (copies(&lab, "client").0 == 1).then_some(())
    });
    let took = flushed.elapsed();
    assert!(took < Duration::from_secs(5), "restored after {took:?}");
    eventually(
        "the restoration to be logged",
        Duration::from_secs(5),
        || {
            lab.log(0)
                .contains("redirection rules were missing; restored")
                .then_some(())
        },
    );

    // From then on the pod's traffic is HBONE again.
    let capture = lab.capture_wire().unwrap();
    let marker = b"HEALED-RULES-PLAINTEXT-MARKER-7f";
    echo_ok(&lab, "client", addr(&lab, "server", ECHO), marker);
    let segments = capture.finish().unwrap();
    assert!(
        !wire::contains(&segments, marker),
        "the marker crossed in plaintext after the rules were restored"
    );
    eprintln!("rules restored {took:?} after the flush");
}
