//! Process-wide logging set-up.

use tracing_subscriber::{EnvFilter, fmt};

use crate::config::LogSettings;

/// Installs the global subscriber: `RUST_LOG` wins over the configured filter;
/// `format = "json"` gives one JSON object per line. Safe to call twice.
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_target(true);
    let _ = if settings.format == "json" { builder.json().try_init() } else { builder.try_init() };
}
