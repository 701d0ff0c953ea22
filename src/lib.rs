//! clawnode: the Clawbernetes node agent.
//!
//! `core` holds every decision as pure code; the other modules are thin shells around the OS.

pub mod api;
pub mod cli;
pub mod config;
pub mod core;
pub mod exit;
/// The fuzz targets' bodies: in test builds (corpus replay) and cargo-fuzz builds only.
#[cfg(any(test, fuzzing))]
pub mod fuzzing;
pub mod gateway;
pub mod gpu;
pub mod http;
pub mod logging;
pub mod mesh;
pub mod services;
pub mod state;
pub mod supervisor;
pub mod systemd;
