//! The GPU boundary: one trait, the NVML implementation, and the inventory types.
//!
//! Having no GPU, no driver or no NVML is a normal state that is reported, not an error.

mod nvml;

use serde::{Deserialize, Serialize};

pub use nvml::NvmlProbe;

/// Probes the local GPUs. Blocking: the supervisor runs it on the blocking pool.
pub trait GpuProbe: Send {
    fn probe(&mut self) -> GpuInventory;
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInventory {
    pub gpus: Vec<GpuInfo>,
    pub driver_version: Option<String>,
    /// Why there are no GPUs to report, when there are none.
    pub unavailable: Option<Unavailable>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub uuid: Option<String>,
    pub name: Option<String>,
    pub memory_total_bytes: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unavailable {
    /// Machine-readable: `nvml_unavailable`, `driver_not_loaded`, `no_permission`, `no_devices`,
    /// `nvml_error`.
    pub reason: String,
    pub detail: String,
}

impl GpuInventory {
    pub fn unavailable(reason: &str, detail: impl Into<String>) -> Self {
        Self {
            unavailable: Some(Unavailable {
                reason: reason.into(),
                detail: detail.into(),
            }),
            ..Self::default()
        }
    }

    /// "2 GPUs", "1 GPU", "0 GPUs (nvml_unavailable)": the GPU part of the STATUS= line.
    pub fn summary(&self) -> String {
        let n = self.gpus.len();
        let noun = if n == 1 { "GPU" } else { "GPUs" };
        match &self.unavailable {
            Some(u) if n == 0 => format!("0 GPUs ({})", u.reason),
            _ => format!("{n} {noun}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_names_the_reason_when_there_are_no_gpus() {
        let none = GpuInventory::unavailable("nvml_unavailable", "libnvidia-ml.so.1 missing");
        assert_eq!(none.summary(), "0 GPUs (nvml_unavailable)");
        let one = GpuInventory {
            gpus: vec![GpuInfo {
                index: 0,
                uuid: None,
                name: None,
                memory_total_bytes: None,
            }],
            ..GpuInventory::default()
        };
        assert_eq!(one.summary(), "1 GPU");
    }
}
