//! A container runtime's CNI side, as libcni does it: executes a conflist's plugins with the
//! `CNI_*` environment and the per-plugin config on stdin, ADD in order passing each result on,
//! DEL in reverse with the cached result, CHECK with the cached result.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};

/// A CNI error a plugin returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginError {
    pub plugin: String,
    pub code: u64,
    pub msg: String,
    pub details: String,
}

impl std::fmt::Display for PluginError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} failed with code {}: {} ({})",
            self.plugin, self.code, self.msg, self.details
        )
    }
}

impl std::error::Error for PluginError {}

/// One node's runtime: its CNI configuration directory, where plugins live, where results are
/// cached, and the namespace plugins run in (the node's "host" namespace).
pub struct Runtime {
    /// Read before every operation, as libcni does: the first valid file is the network.
    pub conf_dir: PathBuf,
    pub cni_path: Vec<PathBuf>,
    pub cache_dir: PathBuf,
    pub host_netns: String,
}

/// One pod sandbox as the runtime describes it to plugins.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub container_id: String,
    pub netns: PathBuf,
    pub ifname: String,
    /// `CNI_ARGS`, as containerd sends them for a Kubernetes pod.
    pub args: String,
}

impl Sandbox {
    /// A Kubernetes pod's sandbox. `ip` is passed as host-local's `IP` argument so that a
    /// retried ADD gets the same address (containerd would not send it; the lab needs stable
    /// addresses because its node files list them).
    pub fn kubernetes(
        container_id: &str,
        netns: &Path,
        namespace: &str,
        name: &str,
        ip: std::net::Ipv4Addr,
    ) -> Self {
        Self {
            container_id: container_id.to_owned(),
            netns: netns.to_owned(),
            ifname: "eth0".to_owned(),
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID=uid-{name};IP={ip}"
            ),
        }
    }
}

impl Runtime {
    /// ADD through every plugin; caches and returns the final result. On failure the runtime
    /// tears down what the earlier plugins set up (a DEL, as containerd does) and caches nothing;
    /// the kubelet retries later.
    pub fn add(&self, sandbox: &Sandbox) -> anyhow::Result<Value> {
        let network = self.network()?;
        let mut prev: Option<Value> = None;
        for plugin in plugins(&network)? {
            let result = self
                .exec(&network, "ADD", plugin, sandbox, prev.as_ref())
                .and_then(|r| r.context("ADD returned no result"));
            match result {
                Ok(result) => prev = Some(result),
                Err(e) => {
                    for plugin in plugins(&network)?.iter().rev() {
                        let _ = self.exec(&network, "DEL", plugin, sandbox, None);
                    }
                    return Err(e);
                }
            }
        }
        let result = prev.context("empty conflist")?;
        std::fs::create_dir_all(&self.cache_dir)?;
        std::fs::write(
            self.cache_file(&network, sandbox),
            serde_json::to_vec(&result)?,
        )?;
        Ok(result)
    }

    /// DEL through every plugin in reverse, with the cached result when there is one.
    pub fn del(&self, sandbox: &Sandbox) -> anyhow::Result<()> {
        let network = self.network()?;
        let cached = self.cached(&network, sandbox);
        for plugin in plugins(&network)?.iter().rev() {
            self.exec(&network, "DEL", plugin, sandbox, cached.as_ref())?;
        }
        let _ = std::fs::remove_file(self.cache_file(&network, sandbox));
        Ok(())
    }

    /// CHECK through every plugin with the cached result.
    pub fn check(&self, sandbox: &Sandbox) -> anyhow::Result<()> {
        let network = self.network()?;
        let cached = self
            .cached(&network, sandbox)
            .context("no cached result to CHECK against")?;
        for plugin in plugins(&network)? {
            self.exec(&network, "CHECK", plugin, sandbox, Some(&cached))?;
        }
        Ok(())
    }

    /// Forgets the cached result, as after a runtime lost its cache.
    pub fn forget(&self, sandbox: &Sandbox) -> anyhow::Result<()> {
        let network = self.network()?;
        let _ = std::fs::remove_file(self.cache_file(&network, sandbox));
        Ok(())
    }

    /// The network configuration in force: the primary file, a single-plugin `.conf` read as a
    /// list of one.
    pub fn network(&self) -> anyhow::Result<Value> {
        let (path, mut config) = culvert::cni::install::primary(&self.conf_dir)?
            .with_context(|| format!("no CNI configuration in {}", self.conf_dir.display()))?;
        if config.get("plugins").is_none() {
            let (version, name) = (config["cniVersion"].clone(), config["name"].clone());
            config = json!({"cniVersion": version, "name": name, "plugins": [config]});
        }
        ensure!(
            config["name"].is_string(),
            "{} has no network name",
            path.display()
        );
        Ok(config)
    }

    fn cached(&self, network: &Value, sandbox: &Sandbox) -> Option<Value> {
        std::fs::read(self.cache_file(network, sandbox))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    fn cache_file(&self, network: &Value, sandbox: &Sandbox) -> PathBuf {
        let name = network["name"].as_str().unwrap_or("net");
        self.cache_dir.join(format!(
            "{name}-{}-{}",
            sandbox.container_id, sandbox.ifname
        ))
    }

    /// Runs one plugin inside the node's namespace; `Ok(None)` for commands with no output.
    fn exec(
        &self,
        network: &Value,
        command: &str,
        plugin: &Value,
        sandbox: &Sandbox,
        prev: Option<&Value>,
    ) -> anyhow::Result<Option<Value>> {
        let kind = plugin["type"].as_str().context("plugin without a type")?;
        let binary = self
            .cni_path
            .iter()
            .map(|dir| dir.join(kind))
            .find(|p| p.exists())
            .with_context(|| format!("plugin {kind} not found in CNI_PATH"))?;
        let mut config = plugin.clone();
        config["name"] = network["name"].clone();
        config["cniVersion"] = network["cniVersion"].clone();
        if let Some(prev) = prev {
            config["prevResult"] = prev.clone();
        }
        let cni_path = std::env::join_paths(&self.cni_path)?;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.host_netns])
            .arg(&binary)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &sandbox.container_id)
            .env("CNI_NETNS", &sandbox.netns)
            .env("CNI_IFNAME", &sandbox.ifname)
            .env("CNI_ARGS", &sandbox.args)
            .env("CNI_PATH", cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", binary.display()))?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(&serde_json::to_vec(&config)?)?;
        let output = child.wait_with_output()?;
        let stdout: Option<Value> = serde_json::from_slice(&output.stdout).ok();
        if !output.status.success() {
            let error = stdout.unwrap_or_else(|| json!({}));
            bail!(PluginError {
                plugin: kind.to_owned(),
                code: error["code"].as_u64().unwrap_or(999),
                msg: error["msg"].as_str().unwrap_or("no error JSON").to_owned(),
                details: error["details"].as_str().map_or_else(
                    || String::from_utf8_lossy(&output.stderr).into_owned(),
                    str::to_owned
                ),
            });
        }
        Ok(stdout)
    }
}

fn plugins(network: &Value) -> anyhow::Result<&Vec<Value>> {
    network["plugins"]
        .as_array()
        .context("conflist without plugins")
}
