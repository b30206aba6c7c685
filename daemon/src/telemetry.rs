//! Logging: a tracing subscriber writing plain or JSON lines to stderr.
//!
//! Access logs are ordinary events on the `access` target, so one filter controls both.

use tracing_subscriber::EnvFilter;

/// Output format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Plain,
    Json,
}

/// Installs the global subscriber. `filter` uses `RUST_LOG` syntax (`info,culvert=debug`).
pub fn init(format: Format, filter: &str) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match format {
        Format::Plain => builder.with_ansi(false).try_init(),
        Format::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))
}
