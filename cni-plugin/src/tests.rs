use std::path::PathBuf;

use serde_json::{Value, json};

use super::*;

/// A socket path where no daemon listens, and a state file path in a fresh directory.
fn paths(test: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("culvert-cni-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    (dir.join("absent.sock"), dir.join("enrollment.json"))
}

fn prev_result() -> Value {
    json!({"cniVersion": "0.4.0", "interfaces": [{"name": "eth0"}],
           "ips": [{"version": "4", "address": "10.244.1.5/24", "gateway": "10.244.1.1"}],
           "dns": {}})
}

fn config(version: &str, socket: &Path, state: &Path) -> Value {
    json!({"cniVersion": version, "name": "k8s-pod-network", "type": "culvert-cni",
           "socket": socket, "stateFile": state, "timeoutSeconds": 2, "prevResult": prev_result()})
}

fn inputs(command: &str, stdin: &Value, args: &str) -> Inputs {
    Inputs {
        command: Some(command.into()),
        container_id: Some("c0ffee12".into()),
        netns: Some("/var/run/netns/cni-1234".into()),
        ifname: Some("eth0".into()),
        args: Some(args.into()),
        stdin: serde_json::to_vec(stdin).unwrap(),
    }
}

const K8S_ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-7d9;K8S_POD_INFRA_CONTAINER_ID=c0ffee12;K8S_POD_UID=1234-5678";

#[test]
fn version_lists_every_supported_version() {
    let out = run(&Inputs {
        command: Some("VERSION".into()),
        stdin: br#"{"cniVersion":"0.4.0"}"#.to_vec(),
        ..Inputs::default()
    })
    .unwrap()
    .unwrap();
    assert_eq!(
        out,
        json!({"cniVersion": "0.4.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );
    let bare = run(&Inputs {
        command: Some("VERSION".into()),
        ..Inputs::default()
    })
    .unwrap()
    .unwrap();
    assert_eq!(bare["cniVersion"], "1.1.0");
}

#[test]
fn bad_input_gets_the_spec_code_and_says_what_was_wrong() {
    let (socket, state) = paths("bad");
    let good = config("1.0.0", &socket, &state);
    let mut no_prev = good.clone();
    no_prev.as_object_mut().unwrap().remove("prevResult");
    let mut bad_timeout = good.clone();
    bad_timeout["timeoutSeconds"] = json!("soon");
    let cases: Vec<(Inputs, u32, &str)> = vec![
        (
            Inputs {
                command: Some("ADD".into()),
                stdin: b"{not json".to_vec(),
                ..Inputs::default()
            },
            6,
            "not valid JSON",
        ),
        (
            Inputs {
                command: Some("ADD".into()),
                stdin: b"[1,2]".to_vec(),
                ..Inputs::default()
            },
            6,
            "must be a JSON object",
        ),
        (
            inputs("ADD", &config("2.0.0", &socket, &state), K8S_ARGS),
            1,
            "cniVersion \"2.0.0\" is not supported",
        ),
        (
            inputs("ADD", &json!({"name": "x"}), K8S_ARGS),
            7,
            "cniVersion is missing",
        ),
        (
            Inputs {
                container_id: None,
                ..inputs("ADD", &good, K8S_ARGS)
            },
            4,
            "CNI_CONTAINERID is not set",
        ),
        (
            Inputs {
                netns: None,
                ..inputs("ADD", &good, K8S_ARGS)
            },
            4,
            "CNI_NETNS is not set",
        ),
        (
            Inputs {
                ifname: Some(String::new()),
                ..inputs("ADD", &good, K8S_ARGS)
            },
            4,
            "CNI_IFNAME is not set",
        ),
        (
            Inputs {
                container_id: Some("-bad id".into()),
                ..inputs("ADD", &good, K8S_ARGS)
            },
            4,
            "not a valid container id",
        ),
        (
            inputs("ADD", &no_prev, K8S_ARGS),
            7,
            "must be chained after",
        ),
        (
            inputs("ADD", &bad_timeout, K8S_ARGS),
            7,
            "timeoutSeconds = \"soon\" is invalid",
        ),
        (
            inputs("CHECK", &no_prev, K8S_ARGS),
            7,
            "CHECK needs prevResult",
        ),
        (inputs("BOGUS", &good, K8S_ARGS), 4, "CNI_COMMAND=\"BOGUS\""),
        (
            Inputs {
                command: None,
                ..inputs("ADD", &good, K8S_ARGS)
            },
            4,
            "not a CNI command",
        ),
    ];
    for (input, want_code, want_msg) in cases {
        let err = run(&input).expect_err(want_msg);
        assert_eq!(err.code, want_code, "{err:?}");
        assert!(
            err.msg.contains(want_msg),
            "{:?} does not say {want_msg:?}",
            err.msg
        );
    }
}

#[test]
fn cni_args_are_parsed_leniently() {
    let pod = pod_ref(Some(K8S_ARGS)).unwrap();
    assert_eq!(
        (
            pod.namespace.as_str(),
            pod.name.as_str(),
            pod.uid.as_deref()
        ),
        ("shop", "cart-7d9", Some("1234-5678"))
    );
    let old_runtime = pod_ref(Some("K8S_POD_NAME=a;junk;=;K8S_POD_NAMESPACE=b;X=y=z")).unwrap();
    assert_eq!(
        (old_runtime.namespace.as_str(), old_runtime.uid),
        ("b", None)
    );
    assert!(pod_ref(Some("IgnoreUnknown=1")).is_none());
    assert!(pod_ref(None).is_none());
}

#[test]
fn add_for_a_pod_outside_kubernetes_passes_prev_result_through_in_the_requested_version() {
    let (socket, state) = paths("plain");
    for version in SUPPORTED_VERSIONS {
        let out = run(&inputs(
            "ADD",
            &config(version, &socket, &state),
            "IgnoreUnknown=1",
        ))
        .unwrap()
        .unwrap();
        let mut want = prev_result();
        want["cniVersion"] = json!(version);
        assert_eq!(out, want);
    }
}

#[test]
fn unreachable_daemon_fails_closed_for_enrolled_pods_only() {
    let (socket, state) = paths("closed");
    let cfg = config("1.0.0", &socket, &state);
    let add = |args: &str| run(&inputs("ADD", &cfg, args));
    let args = |ns: &str, name: &str| format!("K8S_POD_NAMESPACE={ns};K8S_POD_NAME={name}");

    // No state file: only exempt namespaces start.
    assert_eq!(
        add(&args("shop", "cart")).unwrap_err().code,
        code::TRY_AGAIN_LATER
    );
    assert!(add(&args("kube-system", "coredns")).is_ok());

    let enrollment = Enrollment {
        namespaces: vec!["shop".into()],
        outside: vec!["other".into()],
        pods_in: vec![],
        pods_out: vec!["shop/legacy".into()],
    };
    std::fs::write(&state, serde_json::to_vec(&enrollment).unwrap()).unwrap();
    let err = add(&args("shop", "cart")).unwrap_err();
    assert_eq!(err.code, code::TRY_AGAIN_LATER);
    assert!(err.msg.contains("pod shop/cart is enrolled"), "{}", err.msg);
    assert!(
        err.details.contains("connecting to the node daemon"),
        "{}",
        err.details
    );
    assert!(
        add(&args("shop", "legacy")).unwrap().is_some(),
        "opted-out pod was blocked"
    );
    assert!(
        add(&args("other", "web")).unwrap().is_some(),
        "pod of an unenrolled namespace was blocked"
    );
    // Labelled while the daemon was away: a namespace the record does not know fails closed.
    assert_eq!(
        add(&args("fresh", "web")).unwrap_err().code,
        code::TRY_AGAIN_LATER
    );
    assert!(add(&args("kube-system", "coredns")).is_ok());

    std::fs::write(&state, b"{garbage").unwrap();
    assert_eq!(
        add(&args("other", "web")).unwrap_err().code,
        code::TRY_AGAIN_LATER
    );
}

#[test]
fn del_never_fails_and_status_reports_an_absent_daemon() {
    let (socket, state) = paths("del");
    let cfg = config("1.1.0", &socket, &state);
    assert_eq!(run(&inputs("DEL", &cfg, K8S_ARGS)), Ok(None));
    let mut no_prev = cfg.clone();
    no_prev.as_object_mut().unwrap().remove("prevResult");
    let bare = Inputs {
        container_id: None,
        netns: None,
        ..inputs("DEL", &no_prev, "")
    };
    assert_eq!(run(&bare), Ok(None));
    assert_eq!(
        run(&inputs("STATUS", &cfg, "")).unwrap_err().code,
        code::NOT_AVAILABLE
    );
}

#[test]
fn gc_without_a_valid_attachment_list_is_a_config_error_and_collects_nothing() {
    // A daemon that would answer; the plugin must not even ask it.
    let (socket, state) = paths("gc");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut cfg = config("1.1.0", &socket, &state);
    for attachments in [
        None,
        Some(json!("c0ffee12")),
        Some(json!([{"containerID": "c0ffee12"}, {"ifname": "eth0"}])),
        Some(json!([{"containerID": 7}])),
    ] {
        let object = cfg.as_object_mut().unwrap();
        match &attachments {
            Some(a) => object.insert("cni.dev/valid-attachments".into(), a.clone()),
            None => object.remove("cni.dev/valid-attachments"),
        };
        let err = run(&inputs("GC", &cfg, "")).unwrap_err();
        assert_eq!(err.code, code::INVALID_CONFIG, "{attachments:?}: {err:?}");
        assert!(
            listener.accept().is_err(),
            "{attachments:?}: the daemon was asked to collect"
        );
    }
}
