//! Culvert's Helm chart (`charts/culvert`) as the tests drive it: helm itself (built from its Go
//! module by `scripts/kube-test-env build`), and rendered objects keyed for comparison with
//! what kustomize renders from `manifests/`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::kube::repo;

/// The chart's directory.
pub fn dir() -> PathBuf {
    repo().join("charts/culvert")
}

/// Runs helm with `args`; its stdout, or its stderr as the error.
pub fn helm(kubeconfig: Option<&Path>, args: &[&str]) -> anyhow::Result<String> {
    let found = Command::new(repo().join("scripts/kube-test-env"))
        .arg("helm")
        .output()
        .context("running scripts/kube-test-env helm")?;
    if !found.status.success() {
        bail!(
            "no helm (scripts/kube-test-env build): {}",
            String::from_utf8_lossy(&found.stderr).trim()
        );
    }
    let bin = String::from_utf8(found.stdout)?;
    let mut command = Command::new(bin.trim());
    if let Some(kubeconfig) = kubeconfig {
        command.arg("--kubeconfig").arg(kubeconfig);
    }
    let out = command
        .args(args)
        .output()
        .with_context(|| format!("running helm {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "helm {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `helm template culvert charts/culvert` into `namespace` with `--set` values.
pub fn template(namespace: &str, set: &[&str]) -> anyhow::Result<String> {
    let chart = dir();
    let mut args = vec![
        "template",
        "culvert",
        chart.to_str().unwrap(),
        "--namespace",
        namespace,
    ];
    for value in set {
        args.extend(["--set", value]);
    }
    helm(None, &args)
}

/// Kubernetes objects by `kind/namespace/name`. Each node file in a ConfigMap (a `*.yaml` data
/// key) is parsed too, so comments and layout in it do not count, its content does.
pub fn objects(yaml: &str) -> anyhow::Result<BTreeMap<String, serde_json::Value>> {
    let mut objects = BTreeMap::new();
    for document in serde_yaml::Deserializer::from_str(yaml) {
        let mut object = serde_json::Value::deserialize(document)?;
        if object.is_null() {
            continue;
        }
        if object["kind"] == "ConfigMap"
            && let Some(data) = object["data"].as_object_mut()
        {
            for (key, value) in data.iter_mut() {
                if key.ends_with(".yaml") {
                    *value = serde_yaml::from_str(value.as_str().unwrap_or_default())
                        .with_context(|| format!("ConfigMap key {key}"))?;
                }
            }
        }
        let metadata = &object["metadata"];
        let key = format!(
            "{}/{}/{}",
            object["kind"].as_str().unwrap_or_default(),
            metadata["namespace"].as_str().unwrap_or_default(),
            metadata["name"].as_str().unwrap_or_default()
        );
        if objects.insert(key.clone(), object).is_some() {
            bail!("{key} rendered twice");
        }
    }
    Ok(objects)
}
