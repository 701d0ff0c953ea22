//! The managed mesh: clawnode drives tailscaled over its LocalAPI socket, never the CLI.
//!
//! Built so far: the LocalAPI client (`localapi`) and the pure serve-config edits
//! (`core::serve_config`). Bring-up, service advertisement, the bus watcher and discovery
//! through tailscaled are not built yet (issue 4); selecting the provider still reports that.

pub mod localapi;
