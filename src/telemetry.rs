//! Logging: `tracing` to stderr, human-readable by default or JSON lines for clusters; `RUST_LOG` filters.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, coloured on a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global subscriber. `RUST_LOG` wins over `default_filter` when set; a `RUST_LOG` that
/// does not parse is an error rather than silently ignored.
pub fn init(format: LogFormat, default_filter: &str) -> Result<(), TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => {
            EnvFilter::try_new(&spec).map_err(|source| TelemetryError::Filter { spec, source })?
        }
        _ => EnvFilter::new(default_filter),
    };
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_span_events(FmtSpan::NONE);
    let result = match format {
        LogFormat::Text => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
    };
    result.map_err(|e| TelemetryError::Install(e.to_string()))
}

/// Logging could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// `RUST_LOG` is not a valid filter.
    #[error(
        "RUST_LOG={spec:?} is not a valid log filter ({source}); use e.g. RUST_LOG=info or RUST_LOG=atlas_runner=debug"
    )]
    Filter {
        /// The value given.
        spec: String,
        /// Why it failed to parse.
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber was already installed.
    #[error("installing the log subscriber failed: {0}")]
    Install(String),
}

impl TelemetryError {
    /// A short static category (metric label, event reason, log field).
    pub fn category(&self) -> &'static str {
        match self {
            Self::Filter { .. } => "bad_log_filter",
            Self::Install(_) => "log_install",
        }
    }
}
