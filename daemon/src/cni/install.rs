//! Installing `culvert-cni` on the host: the binary into the CNI bin dir, and an entry into the
//! primary CNI's configuration, kept there while the primary rewrites its file.
//!
//! The primary configuration is what the runtime uses: the lexicographically first file in the
//! conf dir with a `.conf`, `.conflist` or `.json` name that parses. A single-plugin `.conf` is
//! wrapped into a `.conflist` of the same stem (marked, so uninstall can unwrap it). Every other
//! key, and the file's `cniVersion`, are kept. All writes are temp file + rename: a runtime never
//! reads half a file, and never executes half a binary ("text file busy" is retried by libcni).

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The plugin's `type`, and its binary's name.
pub const PLUGIN: &str = "culvert-cni";
/// Top-level key on a conflist we made from a `.conf`; names the file it came from.
const WRAPPED: &str = "culvert.io/wrapped-from";

/// What [`insert`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Inserted(PathBuf),
    AlreadyPresent(PathBuf),
    /// No CNI configuration yet: the primary CNI has not written one.
    NoPrimary,
}

/// Why a configuration could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Copies the plugin binary into `bin_dir` under its plugin name, atomically.
pub fn install_binary(src: &Path, bin_dir: &Path) -> Result<PathBuf, Error> {
    use std::os::unix::fs::PermissionsExt;
    let dst = bin_dir.join(PLUGIN);
    // This process's own temporary file: during a surge two daemons may install at once.
    let tmp = bin_dir.join(format!(".{PLUGIN}.tmp.{}", std::process::id()));
    let write = |source| Error::Write {
        path: dst.clone(),
        source,
    };
    std::fs::create_dir_all(bin_dir).map_err(write)?;
    std::fs::copy(src, &tmp).map_err(|source| Error::Read {
        path: src.to_owned(),
        source,
    })?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).map_err(write)?;
    std::fs::rename(&tmp, &dst).map_err(write)?;
    Ok(dst)
}

/// The runtime's configuration file: the first that parses, in name order.
pub fn primary(conf_dir: &Path) -> Result<Option<(PathBuf, Value)>, Error> {
    let read_dir = |source| Error::Read {
        path: conf_dir.to_owned(),
        source,
    };
    let mut files: Vec<PathBuf> = match std::fs::read_dir(conf_dir) {
        Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_dir(e)),
    };
    files.retain(|p| {
        matches!(
            p.extension().and_then(|e| e.to_str()),
            Some("conf" | "conflist" | "json")
        )
    });
    files.sort();
    for path in files {
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        let Ok(value) = serde_json::from_slice::<Value>(&bytes) else {
            continue;
        };
        if value.get("plugins").is_some_and(Value::is_array)
            || value.get("type").is_some_and(Value::is_string)
        {
            return Ok(Some((path, value)));
        }
    }
    Ok(None)
}

/// Puts `entry` (our plugin's configuration) last in the primary configuration, or updates it
/// in place when an older entry of ours is there. Never inserts twice.
pub fn insert(conf_dir: &Path, entry: &Value) -> Result<Outcome, Error> {
    let Some((path, mut config)) = primary(conf_dir)? else {
        return Ok(Outcome::NoPrimary);
    };
    let Some(object) = config.as_object_mut() else {
        return Ok(Outcome::NoPrimary);
    };
    if let Some(plugins) = object.get_mut("plugins").and_then(Value::as_array_mut) {
        let ours: Vec<usize> = plugins
            .iter()
            .enumerate()
            .filter(|(_, p)| is_ours(p))
            .map(|(i, _)| i)
            .collect();
        if ours.len() == 1 && plugins[ours[0]] == *entry && ours[0] == plugins.len() - 1 {
            return Ok(Outcome::AlreadyPresent(path));
        }
        plugins.retain(|p| !is_ours(p));
        plugins.push(entry.clone());
        write_json(&path, &config)?;
        return Ok(Outcome::Inserted(path));
    }
    // A single-plugin .conf: wrap it into a conflist that keeps its name and version.
    let mut plugin = object.clone();
    let mut list = Map::new();
    for key in ["cniVersion", "name"] {
        if let Some(value) = plugin.remove(key) {
            list.insert(key.to_owned(), value);
        }
    }
    let from = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    list.insert(WRAPPED.to_owned(), Value::String(from));
    list.insert(
        "plugins".to_owned(),
        Value::Array(vec![Value::Object(plugin), entry.clone()]),
    );
    let wrapped = path.with_extension("conflist");
    write_json(&wrapped, &Value::Object(list))?;
    std::fs::remove_file(&path).map_err(|source| Error::Write {
        path: path.clone(),
        source,
    })?;
    Ok(Outcome::Inserted(wrapped))
}

/// Removes every entry of ours from the configuration files (unwrapping what we wrapped) and
/// the binary from `bin_dir`. Returns the files changed.
pub fn uninstall(conf_dir: &Path, bin_dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut changed = Vec::new();
    let entries = match std::fs::read_dir(conf_dir) {
        Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(Error::Read {
                path: conf_dir.to_owned(),
                source,
            });
        }
    };
    for path in entries {
        let Ok(Value::Object(mut config)) =
            std::fs::read(&path).map(|b| serde_json::from_slice(&b).unwrap_or(Value::Null))
        else {
            continue;
        };
        let Some(Value::Array(mut plugins)) = config.get("plugins").cloned() else {
            continue;
        };
        if !plugins.iter().any(is_ours) {
            continue;
        }
        plugins.retain(|p| !is_ours(p));
        let write_err = |path: &Path, source| Error::Write {
            path: path.to_owned(),
            source,
        };
        match (config.shift_remove(WRAPPED), plugins.as_slice()) {
            (Some(Value::String(original)), [Value::Object(plugin)]) => {
                // We wrapped a .conf: write it back as it was, and drop our conflist.
                let mut conf = Map::new();
                for key in ["cniVersion", "name"] {
                    if let Some(value) = config.get(key) {
                        conf.insert(key.to_owned(), value.clone());
                    }
                }
                conf.extend(plugin.clone());
                let restored = path.with_file_name(original);
                write_json(&restored, &Value::Object(conf))?;
                std::fs::remove_file(&path).map_err(|e| write_err(&path, e))?;
                changed.push(restored);
            }
            _ => {
                config["plugins"] = Value::Array(plugins);
                write_json(&path, &Value::Object(config))?;
                changed.push(path);
            }
        }
    }
    match std::fs::remove_file(bin_dir.join(PLUGIN)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(Error::Write {
                path: bin_dir.join(PLUGIN),
                source: e,
            });
        }
        _ => {}
    }
    Ok(changed)
}

/// Keeps `entry` in the primary configuration until `stop`: checks every `interval` and
/// re-inserts when the primary CNI has rewritten its file (or first writes one).
pub async fn watch(conf_dir: PathBuf, entry: Value, interval: Duration, stop: CancellationToken) {
    let mut reverts = 0u32;
    loop {
        match insert(&conf_dir, &entry) {
            Ok(Outcome::Inserted(path)) => {
                reverts += 1;
                if reverts > 1 && reverts.is_power_of_two() {
                    warn!(file = %path.display(), times = reverts, "the CNI configuration keeps losing culvert-cni; something rewrites it");
                } else {
                    info!(file = %path.display(), "culvert-cni inserted into the CNI configuration");
                }
            }
            Ok(Outcome::NoPrimary) => {}
            Ok(Outcome::AlreadyPresent(_)) => {}
            Err(e) => warn!(
                error = &e as &dyn std::error::Error,
                "keeping culvert-cni in the CNI configuration"
            ),
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = stop.cancelled() => return,
        }
    }
}

fn is_ours(plugin: &Value) -> bool {
    plugin.get("type").and_then(Value::as_str) == Some(PLUGIN)
}

fn write_json(path: &Path, value: &Value) -> Result<(), Error> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("JSON values serialize");
    bytes.push(b'\n');
    // A name libcni ignores (no .conf/.conflist/.json extension) until the rename.
    let tmp = path.with_file_name(format!(
        ".{}.culvert-tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    let write = |source| Error::Write {
        path: path.to_owned(),
        source,
    };
    std::fs::write(&tmp, bytes).map_err(write)?;
    std::fs::rename(&tmp, path).map_err(write)
}

#[cfg(test)]
mod tests;
