//! `culvert-cni`: a chained CNI plugin that hands each pod to the Culvert node daemon.
//!
//! Owns the CNI side of enrollment: reading the runtime's environment and configuration,
//! asking the daemon over its Unix socket, and answering the runtime in the requested CNI
//! version. Decides nothing about enrollment itself, except when the daemon does not answer:
//! then it fails closed for pods that are (or may be) enrolled, from the daemon's state file.
//! Synchronous and small: no async runtime, TLS or Kubernetes client.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use culvert_cni_proto::unix::{CallError, call};
use culvert_cni_proto::{AddPod, CheckPod, DelPod, Enrollment, Gc, PodRef, Request, Response};
use serde_json::{Value, json};

/// CNI versions this plugin speaks; results are passed through unchanged, so every version
/// whose result the runtime can hand us works.
pub const SUPPORTED_VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// Namespaces never blocked when neither the daemon nor its state file can say anything.
pub const DEFAULT_EXEMPT_NAMESPACES: [&str; 1] = ["kube-system"];

/// What the runtime gave the plugin: `CNI_*` environment variables and the config on stdin.
#[derive(Debug, Default, Clone)]
pub struct Inputs {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
    pub stdin: Vec<u8>,
}

/// A CNI error, printed as the spec's error JSON on stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

/// Spec error codes the plugin uses.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    /// The daemon refused (could not wire, or found a pod's wiring broken).
    pub const DAEMON_REFUSED: u32 = 100;
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error JSON for stdout.
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({"cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

/// The plugin's part of the network configuration; other keys are ignored.
#[derive(Debug)]
struct Config {
    cni_version: String,
    prev_result: Option<Value>,
    socket: PathBuf,
    state_file: PathBuf,
    timeout: Duration,
    exempt_namespaces: Vec<String>,
    /// GC's valid attachments; `None` when missing or malformed.
    gc_keep: Option<Vec<String>>,
}

/// The version to put in an answer: the requested one when we speak it, else our newest.
pub fn answer_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1].to_owned())
}

/// Runs one CNI command. `Ok(Some(json))` is printed on stdout; `Ok(None)` prints nothing.
pub fn run(inputs: &Inputs) -> Result<Option<Value>, CniError> {
    let command = inputs.command.as_deref().unwrap_or_default();
    if command == "VERSION" {
        let version = answer_version(&inputs.stdin);
        return Ok(Some(
            json!({"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS}),
        ));
    }
    if !["ADD", "DEL", "CHECK", "STATUS", "GC"].contains(&command) {
        let msg = format!("CNI_COMMAND={command:?} is not a CNI command this plugin knows");
        return Err(CniError::new(
            code::INVALID_ENV,
            msg,
            "expected ADD, DEL, CHECK, VERSION, STATUS or GC",
        ));
    }
    let config = parse_config(&inputs.stdin)?;
    match command {
        "ADD" => add(inputs, &config),
        "DEL" => {
            del(inputs, &config);
            Ok(None)
        }
        "CHECK" => check(inputs, &config).map(|()| None),
        "STATUS" => status(&config).map(|()| None),
        _ => gc(&config).map(|()| None),
    }
}

fn parse_config(stdin: &[u8]) -> Result<Config, CniError> {
    let value: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE,
            "the network configuration on stdin is not valid JSON",
            e.to_string(),
        )
    })?;
    let Some(object) = value.as_object() else {
        return Err(CniError::new(
            code::DECODE,
            "the network configuration must be a JSON object",
            "",
        ));
    };
    let cni_version = match object.get("cniVersion").and_then(Value::as_str) {
        Some(v) if SUPPORTED_VERSIONS.contains(&v) => v.to_owned(),
        Some(v) => {
            let details = format!("supported: {}", SUPPORTED_VERSIONS.join(", "));
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("cniVersion {v:?} is not supported"),
                details,
            ));
        }
        None => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "cniVersion is missing",
                "",
            ));
        }
    };
    let path = |key: &str, default: &str| -> Result<PathBuf, CniError> {
        match object.get(key) {
            None => Ok(PathBuf::from(default)),
            Some(Value::String(s)) if !s.is_empty() => Ok(PathBuf::from(s)),
            Some(other) => Err(invalid_field(key, other, "expected a path")),
        }
    };
    let timeout = match object.get("timeoutSeconds") {
        None => Duration::from_secs(30),
        Some(v) => match v.as_u64() {
            Some(secs @ 1..=600) => Duration::from_secs(secs),
            _ => {
                return Err(invalid_field(
                    "timeoutSeconds",
                    v,
                    "expected whole seconds from 1 to 600",
                ));
            }
        },
    };
    let exempt_namespaces = match object.get("exemptNamespaces") {
        None => DEFAULT_EXEMPT_NAMESPACES.map(str::to_owned).to_vec(),
        Some(v) => v
            .as_array()
            .and_then(|a| {
                a.iter()
                    .map(|n| n.as_str().map(str::to_owned))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| invalid_field("exemptNamespaces", v, "expected a list of names"))?,
    };
    // GC input: cni.dev/valid-attachments (cni.dev/attachments from older libcni).
    let attachments = object
        .get("cni.dev/valid-attachments")
        .or_else(|| object.get("cni.dev/attachments"));
    // Missing or malformed, GC must not run: an empty list would unwire every pod.
    let gc_keep = attachments.and_then(Value::as_array).and_then(|a| {
        a.iter()
            .map(|x| x.get("containerID")?.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
    });
    Ok(Config {
        cni_version,
        prev_result: object.get("prevResult").cloned(),
        socket: path("socket", culvert_cni_proto::DEFAULT_SOCKET_PATH)?,
        state_file: path("stateFile", culvert_cni_proto::DEFAULT_STATE_FILE)?,
        timeout,
        exempt_namespaces,
        gc_keep,
    })
}

fn invalid_field(key: &str, value: &Value, expected: &str) -> CniError {
    CniError::new(
        code::INVALID_CONFIG,
        format!("{key} = {value} is invalid"),
        expected,
    )
}

fn required(name: &str, value: &Option<String>) -> Result<String, CniError> {
    match value.as_deref() {
        Some(v) if !v.is_empty() => Ok(v.to_owned()),
        _ => Err(CniError::new(
            code::INVALID_ENV,
            format!("{name} is not set"),
            format!("{name} is required for this command"),
        )),
    }
}

/// The container id the spec allows: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`.
fn container_id(inputs: &Inputs) -> Result<String, CniError> {
    let id = required("CNI_CONTAINERID", &inputs.container_id)?;
    let mut chars = id.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !valid {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_CONTAINERID={id:?} is not a valid container id"),
            "",
        ));
    }
    Ok(id)
}

/// What the plugin makes of a configuration on stdin without acting on it: the configuration
/// checks, `prevResult` in the stated version and its addresses. The fuzz target's way in.
pub fn inspect(stdin: &[u8]) -> Result<(Option<Value>, Vec<IpAddr>), CniError> {
    let config = parse_config(stdin)?;
    let ips = config
        .prev_result
        .as_ref()
        .map(result_ips)
        .unwrap_or_default();
    Ok((pass_through(&config), ips))
}

/// The Kubernetes pod named in `CNI_ARGS`, if any. Lenient: unknown keys and malformed pairs are
/// skipped, as runtimes add their own.
pub fn pod_ref(args: Option<&str>) -> Option<PodRef> {
    let (mut namespace, mut name, mut uid) = (None, None, None);
    for pair in args.unwrap_or_default().split(';') {
        let Some((key, value)) = pair.split_once('=') else {
            continue;
        };
        match key.trim() {
            "K8S_POD_NAMESPACE" => namespace = Some(value.to_owned()),
            "K8S_POD_NAME" => name = Some(value.to_owned()),
            "K8S_POD_UID" => uid = Some(value.to_owned()),
            _ => {}
        }
    }
    Some(PodRef {
        namespace: namespace.filter(|s| !s.is_empty())?,
        name: name.filter(|s| !s.is_empty())?,
        uid,
    })
}

/// Addresses in a result's `ips` (`"10.244.1.2/24"`).
fn result_ips(result: &Value) -> Vec<IpAddr> {
    let ips = result.get("ips").and_then(Value::as_array);
    ips.into_iter()
        .flatten()
        .filter_map(|ip| ip.get("address")?.as_str()?.split('/').next()?.parse().ok())
        .collect()
}

/// The previous result, unchanged but for the version it is stated in.
fn pass_through(config: &Config) -> Option<Value> {
    let mut result = config.prev_result.clone()?;
    if let Some(object) = result.as_object_mut() {
        object.insert(
            "cniVersion".into(),
            Value::String(config.cni_version.clone()),
        );
    }
    Some(result)
}

fn add(inputs: &Inputs, config: &Config) -> Result<Option<Value>, CniError> {
    let container_id = container_id(inputs)?;
    let netns = required("CNI_NETNS", &inputs.netns)?;
    let ifname = required("CNI_IFNAME", &inputs.ifname)?;
    let Some(prev) = &config.prev_result else {
        let msg = "no prevResult: culvert-cni must be chained after the plugin that assigns IPs";
        return Err(CniError::new(code::INVALID_CONFIG, msg, ""));
    };
    let Some(pod) = pod_ref(inputs.args.as_deref()) else {
        // Not a Kubernetes pod: nothing names it, so nothing can enroll it.
        return Ok(pass_through(config));
    };
    let request = Request::AddPod(AddPod {
        container_id,
        netns,
        ifname,
        pod: pod.clone(),
        ips: result_ips(prev),
    });
    match call(&config.socket, &request, config.timeout) {
        Ok(Response::Added { .. }) => Ok(pass_through(config)),
        Ok(Response::Nack { reason }) => Err(CniError::new(
            code::DAEMON_REFUSED,
            format!(
                "culvert node did not wire pod {}/{}",
                pod.namespace, pod.name
            ),
            reason,
        )),
        Ok(other) => Err(unexpected(&other)),
        Err(e) => fail_closed(config, &pod, &e).map(|()| pass_through(config)),
    }
}

/// With the daemon unreachable: refuse enrolled pods (the runtime retries), admit the rest.
fn fail_closed(config: &Config, pod: &PodRef, error: &CallError) -> Result<(), CniError> {
    let enrolled = match read_state(&config.state_file) {
        Ok(Some(enrollment)) => {
            !enrollment.admits_unwired(&pod.namespace, &pod.name, &config.exempt_namespaces)
        }
        // Nothing known: only namespaces declared exempt may start unredirected.
        Ok(None) => !config.exempt_namespaces.contains(&pod.namespace),
        Err(e) => {
            let msg = format!(
                "culvert node is unreachable and its state file {} is unreadable",
                config.state_file.display()
            );
            return Err(CniError::new(
                code::TRY_AGAIN_LATER,
                msg,
                format!("{e}; {error}"),
            ));
        }
    };
    if enrolled {
        let msg = format!(
            "culvert node is unreachable and pod {}/{} is enrolled (or may be): not starting it without redirection",
            pod.namespace, pod.name
        );
        return Err(CniError::new(code::TRY_AGAIN_LATER, msg, error.to_string()));
    }
    Ok(())
}

/// The daemon's enrollment state: `Ok(None)` when there is no file.
fn read_state(path: &Path) -> Result<Option<Enrollment>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn del(inputs: &Inputs, config: &Config) {
    // DEL never fails: with no container id or no daemon there is nothing this plugin can undo,
    // and the daemon reconciles pods it finds gone when it returns.
    let Ok(container_id) = container_id(inputs) else {
        return;
    };
    let request = Request::DelPod(DelPod {
        container_id,
        netns: inputs.netns.clone().filter(|n| !n.is_empty()),
        pod: pod_ref(inputs.args.as_deref()),
    });
    let _ = call(
        &config.socket,
        &request,
        config.timeout.min(Duration::from_secs(10)),
    );
}

fn check(inputs: &Inputs, config: &Config) -> Result<(), CniError> {
    let container_id = container_id(inputs)?;
    required("CNI_NETNS", &inputs.netns)?;
    required("CNI_IFNAME", &inputs.ifname)?;
    if config.prev_result.is_none() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "CHECK needs prevResult",
            "",
        ));
    }
    let Some(pod) = pod_ref(inputs.args.as_deref()) else {
        return Ok(());
    };
    match call(
        &config.socket,
        &Request::CheckPod(CheckPod {
            container_id,
            netns: inputs.netns.clone(),
            pod: pod.clone(),
        }),
        config.timeout,
    ) {
        Ok(Response::Checked) => Ok(()),
        Ok(Response::Nack { reason }) => Err(CniError::new(
            code::DAEMON_REFUSED,
            format!(
                "pod {}/{} is not wired as it should be",
                pod.namespace, pod.name
            ),
            reason,
        )),
        Ok(other) => Err(unexpected(&other)),
        Err(e) => fail_closed(config, &pod, &e),
    }
}

fn status(config: &Config) -> Result<(), CniError> {
    match call(
        &config.socket,
        &Request::ListPods,
        config.timeout.min(Duration::from_secs(5)),
    ) {
        Ok(Response::Pods { .. }) => Ok(()),
        Ok(other) => Err(unexpected(&other)),
        Err(e) => Err(CniError::new(
            code::NOT_AVAILABLE,
            "culvert node is not serving",
            e.to_string(),
        )),
    }
}

fn gc(config: &Config) -> Result<(), CniError> {
    let Some(keep) = config.gc_keep.clone() else {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            "GC needs cni.dev/valid-attachments: a list of objects with a containerID",
            "nothing was collected",
        ));
    };
    match call(&config.socket, &Request::Gc(Gc { keep }), config.timeout) {
        Ok(Response::Removed) => Ok(()),
        Ok(other) => Err(unexpected(&other)),
        Err(e) => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            "culvert node is unreachable; GC not done",
            e.to_string(),
        )),
    }
}

fn unexpected(response: &Response) -> CniError {
    CniError::new(
        code::DAEMON_REFUSED,
        "culvert node gave an unexpected answer",
        format!("{response:?}"),
    )
}

#[cfg(test)]
mod tests;
