//! The managed mesh: clawnode drives tailscaled over its LocalAPI socket, never the CLI.
//!
//! Built: the LocalAPI client, bring-up (start only when needed, login-interactive, wait for
//! Running), the tailnet check, Tailscale Services advertisement and drain-then-clear
//! withdrawal with ETag retries, a bus watcher that triggers rechecks, and discovery. Not built yet
//! (issue 4): workload identity, approval state in status,
//! node-info on the Tailscale address, certificates, `doctor` and `tailscale policy`.

pub mod discover;
pub mod localapi;
mod provider;

pub use provider::TailscaleMesh;
