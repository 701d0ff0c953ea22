//! The managed mesh: clawnode drives tailscaled over its LocalAPI socket, never the CLI.
//!
//! `localapi` is the client and `types` the replies it decodes; `provider` joins, using
//! `login` to bring the node up (as `core::tailscale_plan` decides), `advertise` for services,
//! `relay` for the peer relay port and `watcher` to follow the IPN bus; `errors` says which
//! failures need an operator.
//! `authkey` mints keys from OAuth clients and workload identity; `status` reads identity and
//! approval live for the status API; `certs` keeps `tls_cert` certificates; `discover` finds
//! services for `clawnode services discover`; `access` checks, before a start as another user
//! than root, that tailscaled takes clawnode's writes.

pub mod access;
mod advertise;
pub mod authkey;
pub mod certs;
pub mod discover;
mod errors;
pub mod localapi;
mod login;
mod provider;
mod relay;
pub mod status;
pub mod types;
mod watcher;

pub use provider::TailscaleMesh;
pub use watcher::Ndjson;

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
