//! The GPU boundary: one trait, the NVML implementation, the monitor thread that samples and
//! listens for XID events, and the inventory and metric types.
//!
//! Having no GPU, no driver or no NVML is a normal state that is reported, not an error. Every
//! field NVML may not support is an `Option`: absent, never a sentinel number.

pub mod monitor;
mod nvml;

use std::time::Duration;

pub use monitor::{Monitor, Report, Shared, Snapshot};
pub use nvml::NvmlProbe;

/// Probes the local GPUs. Blocking: only the monitor thread calls it.
pub trait GpuProbe: Send {
    /// The static inventory (initialises the library on first use).
    fn probe(&mut self) -> GpuInventory;

    /// The dynamic readings of every GPU the last `probe` found.
    fn sample(&mut self) -> Vec<GpuMetrics> {
        Vec::new()
    }

    /// Wait up to `timeout` for critical XID events; returns at once when one arrives.
    fn wait_xid(&mut self, timeout: Duration) -> Vec<XidEvent> {
        std::thread::sleep(timeout);
        Vec::new()
    }
}

pub use crate::core::model::{GpuInfo, GpuInventory, GpuMetrics, MigDevice, Unavailable, XidEvent};
