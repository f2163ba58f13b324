//! The proxy's own logs: JSON lines (or text lines, `--log-format text`) on stderr through
//! `tracing`, with the filter changeable at run time (`PUT /log-level` on the admin port)
//! through a reload handle installed once.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// The log filter could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    /// Logging was not set up through [`init`] (the proxy runs inside another program).
    #[error("the log level is not adjustable in this process")]
    NotInstalled,
    /// The filter does not parse.
    #[error("invalid log filter: {0}")]
    Invalid(String),
}

/// How the proxy's own log lines are written (`--log-format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line: `timestamp`, `level`, `target`, `message` and the fields.
    #[default]
    Json,
    /// `timestamp LEVEL target: message field=value ...`, for people.
    Text,
}

/// Installs the subscriber on stderr in `format` with `filter` (`info` when it does not
/// parse).
pub fn init(filter: &str, format: LogFormat) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_writer(std::io::stderr)
    });
    let text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(std::io::stderr)
    });
    if tracing_subscriber::registry()
        .with(filter)
        .with(json)
        .with(text)
        .try_init()
        .is_ok()
    {
        let _ = FILTER.set(handle);
    }
}

/// Replaces the log filter (`debug`, `outrider_proxy=debug,info`, ...); returns it as parsed.
pub fn set_filter(filter: &str) -> Result<String, LogLevelError> {
    let handle = FILTER.get().ok_or(LogLevelError::NotInstalled)?;
    let parsed =
        EnvFilter::try_new(filter.trim()).map_err(|e| LogLevelError::Invalid(e.to_string()))?;
    let shown = parsed.to_string();
    handle
        .reload(parsed)
        .map_err(|e| LogLevelError::Invalid(e.to_string()))?;
    Ok(shown)
}

/// The filter in force, if logging was set up through [`init`].
pub fn current_filter() -> Option<String> {
    FILTER.get()?.with_current(ToString::to_string).ok()
}
