//! The integration tests, in one test binary: the support code is compiled and the crate
//! linked once instead of once per file. Each module is named after what it tests; run one
//! with `cargo test --features test-fakes --test it <module>::`.
//!
//! The benchmarks (`footprint`, `bench_peers`, `bench_gpu`) stay binaries of their own: they
//! are run alone, in release builds, and the VM test carries `bench_peers` into the guest.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::print_stdout, clippy::print_stderr)]

#[path = "../support/mod.rs"]
mod support;

mod architecture;
mod check_config;
mod daemon;
mod doctor;
#[cfg(feature = "store-etcd")]
mod etcd_store;
#[cfg(feature = "store-etcd")]
mod gateway_etcd;
#[cfg(feature = "store-etcd")]
mod gateway_ha;
mod gateway_mesh;
mod gpu;
mod journald;
mod service_health;
mod tailscale_localapi;
mod tailscale_mesh;
mod tailscale_relay;
mod unit_file;
mod wireguard_backend;
mod wireguard_mesh;
mod wireguard_ownership;
mod wireguard_routes;
