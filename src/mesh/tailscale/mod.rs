//! The managed mesh: clawnode drives tailscaled over its LocalAPI socket, never the CLI.
//!
//! `localapi` is the client; `provider` brings the node up and advertises its services;
//! `authkey` mints keys from OAuth clients and workload identity; `status` reads identity and
//! approval live for the status API; `certs` keeps `tls_cert` certificates; `discover` finds
//! services for `clawnode services discover`.

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
