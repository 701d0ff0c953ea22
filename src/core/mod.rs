//! Pure decisions: no I/O, no clock reads, no randomness. Time and jitter are inputs.
//! `clippy::disallowed_methods` (clippy.toml) is denied here, so those rules are checked.
//!
//! The async shells (`supervisor`, `api`, `mesh`, `gpu`) feed events in and execute the
//! commands that come out, so every rule here is unit-tested without root or a runtime.

#![deny(clippy::disallowed_methods)]

pub mod admission;
pub mod backoff;
pub mod coord;
pub mod doctor;
pub mod drift;
pub mod gpu;
pub mod health;
pub mod link_owner;
pub mod model;
pub mod peer_diff;
pub mod policy;
pub mod routes;
pub mod serve_config;
pub mod supervisor;
pub mod tailscale_plan;
pub mod tailscale_relay;

pub use backoff::Backoff;
pub use supervisor::{
    Command, Component, ComponentState, ComponentView, CoreView, ErrorRecord, Failure, NotifyMsg,
    Phase, ReloadPlan, Retry, Supervisor,
};
