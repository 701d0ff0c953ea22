//! The managed mesh: clawnode drives tailscaled over its LocalAPI socket, never the CLI.
//!
//! Built: the LocalAPI client, bring-up (start only when needed, login-interactive, wait for
//! Running), the tailnet check, Tailscale Services advertisement and drain-then-clear
//! withdrawal with ETag retries, a bus watcher that triggers rechecks, and discovery. Not built yet
//! (issue 4): workload identity, approval state in status,
//! node-info on the Tailscale address, certificates, `doctor` and `tailscale policy`.

pub mod authkey;
pub mod certs;
pub mod discover;
pub mod localapi;
mod provider;
pub mod status;

pub use provider::TailscaleMesh;

use serde_json::Value;

/// A JSON array of strings, with `null` as empty.
pub(crate) fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}
