//! The Helm chart against the shipped manifests and a real apiserver: it renders what
//! kustomize renders, installs with a server-side dry run and for real, and upgrades in place.

use culvert_tests::chart;
use culvert_tests::kube::{self, Cluster};

const NAMESPACE: &str = "culvert-system";

/// The values file's settings down to `section.value`: what the chart's README must name.
fn value_names(values: &serde_yaml::Value) -> Vec<String> {
    let mut names = Vec::new();
    for (key, value) in values.as_mapping().unwrap() {
        let key = key.as_str().unwrap();
        match value.as_mapping() {
            Some(section) if !section.is_empty() => names.extend(
                section
                    .keys()
                    .map(|sub| format!("{key}.{}", sub.as_str().unwrap())),
            ),
            _ => names.push(key.to_owned()),
        }
    }
    names
}

/// The DaemonSet's CNI bin, CNI conf and netns host paths.
fn host_paths(objects: &std::collections::BTreeMap<String, serde_json::Value>) -> Vec<String> {
    let volumes =
        objects["DaemonSet/culvert-system/culvert-node"]["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .unwrap();
    ["cni-bin", "cni-conf", "netns"]
        .iter()
        .map(|name| {
            let volume = volumes.iter().find(|v| v["name"] == *name).unwrap();
            volume["hostPath"]["path"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[test]
#[ignore = "needs helm and kubectl: scripts/kube-test-env build"]
fn the_chart_renders_what_kustomize_applies_and_documents_every_value() {
    let cluster = Cluster::start("chart-render");
    let manifests = kube::repo().join("manifests");
    let kustomize =
        chart::objects(&cluster.kubectl(&["kustomize", manifests.to_str().unwrap()])).unwrap();
    let helm =
        chart::objects(&chart::template(NAMESPACE, &["createNamespace=true"]).unwrap()).unwrap();
    assert_eq!(
        helm.keys().collect::<Vec<_>>(),
        kustomize.keys().collect::<Vec<_>>(),
        "the same objects"
    );
    for (key, object) in &kustomize {
        assert!(
            helm[key] == *object,
            "{key} differs:\nkustomize {}\nhelm {}",
            serde_json::to_string_pretty(object).unwrap(),
            serde_json::to_string_pretty(&helm[key]).unwrap()
        );
    }

    // Another namespace moves every namespaced object and the CA's address with it.
    let elsewhere = chart::objects(&chart::template("mesh", &[]).unwrap()).unwrap();
    assert!(
        elsewhere.keys().all(|k| !k.contains(NAMESPACE)),
        "{elsewhere:#?}"
    );
    assert_eq!(
        elsewhere["ConfigMap/mesh/culvert-node"]["data"]["node.yaml"]["ca"]["istio"]["address"],
        "culvert-ca.mesh.svc:15012"
    );
    assert!(
        !elsewhere.contains_key("Namespace//mesh"),
        "createNamespace is off by default"
    );

    // istiod as the CA: no culvert ca, and the node file names istiod and its roots.
    let istiod = chart::objects(
        &chart::template(
            NAMESPACE,
            &[
                "ca.enabled=false",
                "mesh.caAddress=istiod.istio-system.svc:15012",
                "mesh.caRoots=istio-system/istio-ca-root-cert",
            ],
        )
        .unwrap(),
    )
    .unwrap();
    assert!(
        istiod.keys().all(|k| !k.contains("culvert-ca")),
        "{:#?}",
        istiod.keys()
    );
    let ca = &istiod["ConfigMap/culvert-system/culvert-node"]["data"]["node.yaml"]["ca"]["istio"];
    assert_eq!(ca["address"], "istiod.istio-system.svc:15012");
    assert_eq!(ca["roots"]["configMap"], "istio-system/istio-ca-root-cert");

    // Each platform's paths, and a path set by hand over the platform's.
    for (platform, bin, conf, netns) in [
        (
            "k3s",
            "/var/lib/rancher/k3s/data/cni",
            "/var/lib/rancher/k3s/agent/etc/cni/net.d",
            "/run/netns",
        ),
        (
            "microk8s",
            "/var/snap/microk8s/current/opt/cni/bin",
            "/var/snap/microk8s/current/args/cni-network",
            "/run/netns",
        ),
        (
            "minikube",
            "/opt/cni/bin",
            "/etc/cni/net.d",
            "/var/run/docker/netns",
        ),
        (
            "openshift",
            "/var/lib/cni/bin",
            "/etc/cni/multus/net.d",
            "/run/netns",
        ),
        (
            "gke",
            "/home/kubernetes/bin",
            "/etc/cni/net.d",
            "/run/netns",
        ),
    ] {
        let objects = chart::objects(
            &chart::template(NAMESPACE, &[&format!("platform={platform}")]).unwrap(),
        )
        .unwrap();
        let paths = host_paths(&objects);
        assert_eq!(
            (paths[0].as_str(), paths[1].as_str(), paths[2].as_str()),
            (bin, conf, netns),
            "{platform}"
        );
        assert_eq!(
            objects.contains_key("ResourceQuota/culvert-system/culvert-node"),
            platform == "gke",
            "{platform}: the quota only where the platform needs it"
        );
    }
    let mixed = chart::objects(
        &chart::template(
            NAMESPACE,
            &["platform=k3s", "node.cniBinDir=/usr/libexec/cni"],
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        host_paths(&mixed)[..2],
        [
            "/usr/libexec/cni",
            "/var/lib/rancher/k3s/agent/etc/cni/net.d"
        ]
    );
    let err = chart::template(NAMESPACE, &["platform=k8s"]).unwrap_err();
    assert!(format!("{err:#}").contains("is not one of"), "{err:#}");

    let values: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart::dir().join("values.yaml")).unwrap())
            .unwrap();
    let readme = std::fs::read_to_string(chart::dir().join("README.md")).unwrap();
    let undocumented: Vec<String> = value_names(&values)
        .into_iter()
        .filter(|name| !readme.contains(&format!("`{name}`")))
        .collect();
    assert!(
        undocumented.is_empty(),
        "values missing from the chart's README: {undocumented:?}"
    );
}

#[test]
#[ignore = "needs the test apiserver and helm: scripts/kube-test-env build"]
fn the_chart_installs_with_a_dry_run_and_for_real_and_upgrades_keeping_the_surge() {
    let cluster = Cluster::start("chart");
    let kubeconfig = Some(cluster.kubeconfig.as_path());
    cluster.kubectl(&["create", "namespace", NAMESPACE]);
    cluster.kubectl(&[
        "label",
        "namespace",
        NAMESPACE,
        "pod-security.kubernetes.io/enforce=privileged",
    ]);
    let chart_dir = chart::dir();
    let chart_dir = chart_dir.to_str().unwrap();
    let install = ["install", "culvert", chart_dir, "--namespace", NAMESPACE];

    let dry = chart::helm(kubeconfig, &[&install[..], &["--dry-run=server"]].concat()).unwrap();
    assert!(dry.contains("kind: DaemonSet"), "{dry}");
    let err = cluster
        .try_kubectl(&["-n", NAMESPACE, "get", "daemonset", "culvert-node"])
        .unwrap_err();
    assert!(
        err.contains("NotFound"),
        "the dry run created something: {err}"
    );

    // Every platform's objects pass the apiserver's validation.
    for platform in ["k3s", "microk8s", "minikube", "openshift", "gke"] {
        let rendered = chart::template(NAMESPACE, &[&format!("platform={platform}")]).unwrap();
        cluster
            .kubectl_as(
                &cluster.kubeconfig,
                &["apply", "--dry-run=server", "-f", "-"],
                Some(&rendered),
            )
            .unwrap_or_else(|e| panic!("{platform}: {e}"));
    }

    chart::helm(kubeconfig, &install).unwrap();
    for crd in [
        "peerauthentications.security.istio.io",
        "authorizationpolicies.security.istio.io",
    ] {
        cluster.kubectl(&["get", "crd", crd]);
    }
    let daemonset = |path: &str| {
        cluster.kubectl(&[
            "-n",
            NAMESPACE,
            "get",
            "daemonset",
            "culvert-node",
            "-o",
            &format!("jsonpath={path}"),
        ])
    };
    assert!(daemonset("{.spec.template.spec.containers[0].args}").contains("--drain-timeout=10m"));
    assert_eq!(daemonset("{.metadata.generation}"), "1");

    let upgrade = |sets: &[&str]| {
        let mut args = vec![
            "upgrade",
            "culvert",
            chart_dir,
            "--namespace",
            NAMESPACE,
            "--reuse-values",
        ];
        args.extend(sets.iter().flat_map(|set| ["--set", set]));
        chart::helm(kubeconfig, &args).unwrap();
    };
    upgrade(&[
        "node.drainTimeout=60s",
        "node.terminationGracePeriodSeconds=65",
    ]);
    assert_eq!(daemonset("{.metadata.generation}"), "2", "updated in place");
    assert!(daemonset("{.spec.template.spec.containers[0].args}").contains("--drain-timeout=60s"));
    assert_eq!(
        daemonset("{.spec.template.spec.terminationGracePeriodSeconds}"),
        "65"
    );
    assert_eq!(
        daemonset("{.spec.updateStrategy.rollingUpdate.maxSurge}"),
        "1",
        "an upgrade keeps the surge"
    );
    assert_eq!(
        daemonset("{.spec.updateStrategy.rollingUpdate.maxUnavailable}"),
        "0"
    );

    // Switching to istiod as the CA removes culvert ca's objects.
    upgrade(&[
        "ca.enabled=false",
        "mesh.caAddress=istiod.istio-system.svc:15012",
    ]);
    let err = cluster
        .try_kubectl(&["-n", NAMESPACE, "get", "deployment", "culvert-ca"])
        .unwrap_err();
    assert!(err.contains("NotFound"), "{err}");
    let config = cluster.kubectl(&[
        "-n",
        NAMESPACE,
        "get",
        "configmap",
        "culvert-node",
        "-o",
        "jsonpath={.data.node\\.yaml}",
    ]);
    assert!(
        config.contains("address: istiod.istio-system.svc:15012"),
        "{config}"
    );

    chart::helm(
        kubeconfig,
        &["uninstall", "culvert", "--namespace", NAMESPACE],
    )
    .unwrap();
    let err = cluster
        .try_kubectl(&["-n", NAMESPACE, "get", "daemonset", "culvert-node"])
        .unwrap_err();
    assert!(err.contains("NotFound"), "{err}");
    // Helm never deletes the CRDs it installed: policies survive an uninstall.
    cluster.kubectl(&["get", "crd", "peerauthentications.security.istio.io"]);
}
