//! Logging: a tracing subscriber writing plain or JSON lines to stderr, with a filter that can
//! be read and changed while the daemon runs (the admin API's `/logging`).
//!
//! Access logs are ordinary events on the `access` target, so one filter controls both.

use std::sync::{Mutex, OnceLock};

use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _, Registry, reload};

/// Output format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Plain,
    Json,
}

/// The installed subscriber's filter, for changing it at runtime.
pub struct Filter {
    handle: reload::Handle<EnvFilter, Registry>,
    /// What the filter was started with, and what it is now (`RUST_LOG` syntax).
    initial: String,
    current: Mutex<String>,
}

/// Set once, by [`init`]: the subscriber it belongs to is process-wide too.
static FILTER: OnceLock<Filter> = OnceLock::new();

impl Filter {
    /// The installed subscriber's filter, once [`init`] has run.
    pub fn installed() -> Option<&'static Self> {
        FILTER.get()
    }

    /// The filter in force.
    pub fn current(&self) -> String {
        self.current.lock().expect("log filter poisoned").clone()
    }

    /// Replaces the filter with `directives` (`RUST_LOG` syntax); a malformed one changes
    /// nothing.
    pub fn set(&self, directives: &str) -> anyhow::Result<()> {
        let filter = EnvFilter::try_new(directives)?;
        let mut current = self.current.lock().expect("log filter poisoned");
        self.handle.reload(filter)?;
        *current = directives.to_owned();
        Ok(())
    }

    /// Puts back the filter the daemon started with.
    pub fn reset(&self) -> anyhow::Result<()> {
        self.set(&self.initial)
    }
}

/// Installs the global subscriber. `filter` uses `RUST_LOG` syntax (`info,culvert=debug`).
pub fn init(format: Format, filter: &str) -> anyhow::Result<()> {
    let (layer, handle) = reload::Layer::new(EnvFilter::try_new(filter)?);
    let output = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let output = match format {
        Format::Plain => output.with_ansi(false).boxed(),
        Format::Json => output.json().flatten_event(true).boxed(),
    };
    tracing_subscriber::registry()
        .with(layer)
        .with(output)
        .try_init()
        .map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))?;
    let installed = Filter {
        handle,
        initial: filter.to_owned(),
        current: Mutex::new(filter.to_owned()),
    };
    // `try_init` above succeeds once per process, so this is the first.
    let _ = FILTER.set(installed);
    Ok(())
}
