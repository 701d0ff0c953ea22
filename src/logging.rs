//! Logging set-up: journald with structured fields under systemd, readable stderr otherwise.
//!
//! The level comes from `[log] level` and can be changed by a reload; `RUST_LOG`, when set,
//! wins over both.

use std::io::IsTerminal;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// Changes the log level of the running process.
pub struct LogHandle {
    filter: reload::Handle<EnvFilter, Registry>,
    env_override: bool,
}

impl LogHandle {
    /// Apply `[log] level` from a reloaded config, unless `RUST_LOG` pinned the filter.
    pub fn set_level(&self, level: &str) {
        if self.env_override {
            return;
        }
        let Ok(filter) = EnvFilter::try_new(level) else {
            return;
        };
        if let Err(error) = self.filter.reload(filter) {
            tracing::warn!(component = "logging", %error, "could not change the log level");
        }
    }
}

/// Install the global subscriber. Call once, before anything logs.
pub fn init(level: &str) -> LogHandle {
    let env = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    let env_override = env.is_some();
    let filter = env
        .and_then(|v| EnvFilter::try_new(v).ok())
        .unwrap_or_else(|| EnvFilter::new(level));
    let (filter, handle) = reload::Layer::new(filter);

    let journald = if under_systemd() {
        tracing_journald::layer().ok().map(|layer| {
            // Plain field names, so `journalctl COMPONENT=mesh` works.
            layer
                .with_syslog_identifier("clawnode".into())
                .with_field_prefix(None)
        })
    } else {
        None
    };
    let stderr = journald.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
    });
    // A second init (tests calling twice) is harmless; keep the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(journald)
        .with(stderr)
        .try_init();
    LogHandle {
        filter: handle,
        env_override,
    }
}

/// systemd sets `JOURNAL_STREAM` when stderr goes to the journal and `INVOCATION_ID` for every
/// service; the journald socket must also exist for the native protocol to work.
fn under_systemd() -> bool {
    let marked =
        std::env::var_os("JOURNAL_STREAM").is_some() || std::env::var_os("INVOCATION_ID").is_some();
    marked && std::path::Path::new("/run/systemd/journal/socket").exists()
}
