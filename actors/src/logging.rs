//! Logs: human-readable on a terminal (with a progress bar from the coordinator), one
//! JSON object per line otherwise. `RUST_LOG` filters (default `info`).

use std::io::IsTerminal;

/// Installs the global subscriber; returns whether stderr is a terminal.
pub fn init() -> bool {
    let tty = std::io::stderr().is_terminal();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if tty {
        builder.compact().try_init()
    } else {
        builder.json().flatten_event(true).try_init()
    };
    tty
}
