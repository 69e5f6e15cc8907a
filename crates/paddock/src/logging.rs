//! Logging set-up: `tracing` to stderr, text or JSON, level from a flag/env var.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `level` is a filter (`info`, `debug`,
/// `paddock_gateway=debug,info`, ...); `RUST_LOG` overrides it when set.
pub(crate) fn init(level: &str, json: bool) {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        let _ = builder.json().flatten_event(true).try_init();
    } else {
        let _ = builder.with_target(false).try_init();
    }
}
