use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::*;

const FLANNEL: &str = r#"{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
    { "type": "flannel", "delegate": { "hairpinMode": true, "isDefaultGateway": true } },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}"#;

const CALICO: &str = r#"{
  "name": "k8s-pod-network",
  "cniVersion": "0.4.0",
  "plugins": [
    { "type": "calico", "log_level": "info", "datastore_type": "kubernetes", "nodename": "node-a",
      "mtu": 1440, "ipam": { "type": "calico-ipam" }, "policy": { "type": "k8s" },
      "kubernetes": { "kubeconfig": "/etc/cni/net.d/calico-kubeconfig" } },
    { "type": "bandwidth", "capabilities": { "bandwidth": true } },
    { "type": "portmap", "snat": true, "capabilities": { "portMappings": true } }
  ],
  "x-vendor-annotation": { "keep": ["me", 1, true] }
}"#;

const BARE: &str = r#"{
  "cniVersion": "0.3.1",
  "name": "mynet",
  "type": "bridge",
  "bridge": "cni0",
  "isGateway": true,
  "ipam": { "type": "host-local", "subnet": "10.22.0.0/16" }
}"#;

fn dirs(test: &str) -> (PathBuf, PathBuf) {
    let root = std::env::temp_dir().join(format!("culvert-install-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (conf, bin) = (root.join("net.d"), root.join("bin"));
    std::fs::create_dir_all(&conf).unwrap();
    (conf, bin)
}

fn entry() -> Value {
    json!({"type": PLUGIN, "socket": "/var/run/culvert/cni.sock", "stateFile": "/var/lib/culvert/enrollment.json"})
}

fn read(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn conflists_get_one_entry_last_and_keep_everything_else() {
    for (name, original) in [
        ("10-flannel.conflist", FLANNEL),
        ("10-calico.conflist", CALICO),
    ] {
        let (conf, bin) = dirs(name);
        let path = conf.join(name);
        std::fs::write(&path, original).unwrap();
        assert_eq!(
            insert(&conf, &entry()).unwrap(),
            Outcome::Inserted(path.clone())
        );

        let mut want: Value = serde_json::from_str(original).unwrap();
        want["plugins"].as_array_mut().unwrap().push(entry());
        assert_eq!(read(&path), want, "{name}: only our entry may be added");

        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            insert(&conf, &entry()).unwrap(),
            Outcome::AlreadyPresent(path.clone())
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "{name}: a second insert rewrote the file"
        );

        uninstall(&conf, &bin).unwrap();
        let restored = serde_json::to_string(&read(&path)).unwrap();
        let original =
            serde_json::to_string(&serde_json::from_str::<Value>(original).unwrap()).unwrap();
        assert_eq!(
            restored, original,
            "{name}: not restored key for key, in order"
        );
        let leftovers: Vec<_> = std::fs::read_dir(&conf)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "temp files left: {leftovers:?}");
    }
}

#[test]
fn a_bare_conf_is_wrapped_and_unwrapped() {
    let (conf, bin) = dirs("bare");
    std::fs::write(conf.join("10-mynet.conf"), BARE).unwrap();
    let wrapped = conf.join("10-mynet.conflist");
    assert_eq!(
        insert(&conf, &entry()).unwrap(),
        Outcome::Inserted(wrapped.clone())
    );
    assert!(
        !conf.join("10-mynet.conf").exists(),
        "the .conf would shadow the conflist"
    );
    let list = read(&wrapped);
    assert_eq!(
        (list["cniVersion"].as_str(), list["name"].as_str()),
        (Some("0.3.1"), Some("mynet"))
    );
    let plugins = list["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 2);
    assert_eq!(plugins[0]["ipam"]["subnet"], "10.22.0.0/16");
    assert!(plugins[0].get("name").is_none() && plugins[0].get("cniVersion").is_none());
    assert_eq!(plugins[1], entry());
    assert_eq!(
        insert(&conf, &entry()).unwrap(),
        Outcome::AlreadyPresent(wrapped.clone())
    );

    uninstall(&conf, &bin).unwrap();
    assert!(!wrapped.exists());
    assert_eq!(
        read(&conf.join("10-mynet.conf")),
        serde_json::from_str::<Value>(BARE).unwrap()
    );
}

#[test]
fn only_the_first_valid_file_is_the_primary() {
    let (conf, _) = dirs("order");
    std::fs::write(conf.join("00-broken.conflist"), "{ not json").unwrap();
    std::fs::write(conf.join("05-notes.txt"), FLANNEL).unwrap();
    std::fs::write(conf.join("10-flannel.conflist"), FLANNEL).unwrap();
    std::fs::write(conf.join("20-calico.conflist"), CALICO).unwrap();
    assert_eq!(
        insert(&conf, &entry()).unwrap(),
        Outcome::Inserted(conf.join("10-flannel.conflist"))
    );
    assert_eq!(
        std::fs::read_to_string(conf.join("20-calico.conflist")).unwrap(),
        CALICO
    );
    assert_eq!(
        insert(&dirs("empty").0, &entry()).unwrap(),
        Outcome::NoPrimary
    );
}

#[test]
fn an_older_entry_is_updated_in_place_not_duplicated() {
    let (conf, _) = dirs("update");
    let mut old: Value = serde_json::from_str(FLANNEL).unwrap();
    old["plugins"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": PLUGIN, "socket": "/old.sock"}));
    std::fs::write(
        conf.join("10-flannel.conflist"),
        serde_json::to_vec(&old).unwrap(),
    )
    .unwrap();
    insert(&conf, &entry()).unwrap();
    let plugins = read(&conf.join("10-flannel.conflist"))["plugins"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(plugins.iter().filter(|p| is_ours(p)).count(), 1);
    assert_eq!(plugins.last().unwrap(), &entry());
}

#[test]
fn the_binary_is_installed_executable_and_removed_on_uninstall() {
    use std::os::unix::fs::PermissionsExt;
    let (conf, bin) = dirs("binary");
    let src = conf.join("source-binary");
    std::fs::write(&src, b"\x7fELF pretend").unwrap();
    let installed = install_binary(&src, &bin).unwrap();
    assert_eq!(std::fs::read(&installed).unwrap(), b"\x7fELF pretend");
    assert_eq!(
        std::fs::metadata(&installed).unwrap().permissions().mode() & 0o777,
        0o755
    );
    assert_eq!(
        std::fs::read_dir(&bin).unwrap().count(),
        1,
        "temp file left in the bin dir"
    );
    install_binary(&src, &bin).unwrap();
    uninstall(&conf, &bin).unwrap();
    assert!(!installed.exists());
}

#[tokio::test]
async fn the_watcher_reinserts_after_the_primary_rewrites_its_file() {
    let (conf, _) = dirs("watch");
    let path = conf.join("10-flannel.conflist");
    let stop = CancellationToken::new();
    let watcher = tokio::spawn(watch(
        conf.clone(),
        entry(),
        Duration::from_millis(20),
        stop.clone(),
    ));
    let has_entry = |path: &Path| {
        std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|v| {
                v["plugins"]
                    .as_array()
                    .is_some_and(|p| p.iter().filter(|p| is_ours(p)).count() == 1)
            })
    };
    // The primary CNI writes its configuration only after we started, then rewrites it twice.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        std::fs::write(&path, FLANNEL).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !has_entry(&path) {
            assert!(tokio::time::Instant::now() < deadline, "not re-inserted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    stop.cancel();
    watcher.await.unwrap();
}
