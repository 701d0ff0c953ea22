//! The data model the rest of clawnode shares: the GPU inventory and readings, the services a
//! node advertises and what the node looks like on the mesh. It depends on nothing but `config`,
//! so the pure core and every shell can use it.

use serde::{Deserialize, Serialize};

use crate::config::{Config, ServiceMode};

/// What the node looks like on the mesh once joined.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshStatus {
    pub provider: String,
    pub interface: Option<String>,
    pub address: Option<String>,
    pub peers: usize,
    /// Things the operator should fix that did not stop the join (a rejected peer file).
    #[serde(default)]
    pub problems: Vec<String>,
    /// Where the peers come from when a gateway coordinates them: "gateway peers live", or
    /// "on cached peer set since <time> (gateway unreachable)".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}

impl MeshStatus {
    /// "wireguard claw0 10.100.0.5/16": the mesh part of the STATUS= line.
    pub fn summary(&self) -> String {
        let mut parts = vec![self.provider.clone()];
        parts.extend(self.interface.clone());
        parts.extend(self.address.clone());
        let mut text = parts.join(" ");
        if let Some(gateway) = &self.gateway {
            text.push_str(", ");
            text.push_str(gateway);
        }
        text
    }
}

/// A service as the mesh advertises it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceAd {
    pub name: String,
    pub port: u16,
    /// "tcp", "http" or "https".
    pub protocol: String,
}

impl ServiceAd {
    pub fn from_config(config: &Config) -> Vec<ServiceAd> {
        config
            .services
            .iter()
            .map(|(name, spec)| ServiceAd {
                name: name.to_string(),
                port: spec.port,
                protocol: match spec.mode {
                    ServiceMode::Tcp => "tcp",
                    ServiceMode::Http { tls: true } => "https",
                    ServiceMode::Http { tls: false } => "http",
                }
                .to_string(),
            })
            .collect()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInventory {
    pub gpus: Vec<GpuInfo>,
    pub driver_version: Option<String>,
    /// e.g. "13.0".
    pub cuda_driver_version: Option<String>,
    /// Why there are no GPUs to report, when there are none.
    pub unavailable: Option<Unavailable>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub brand: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci_bus_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vbios_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_total_bytes: Option<u64>,
    /// "9.0".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_capability: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistence_mode: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_limit_milliwatts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecc_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecc_enabled_pending: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig_enabled_pending: Option<bool>,
    pub mig_devices: Vec<MigDevice>,
    /// The GPU fell off the bus: NVML answers "GPU is lost" for it.
    #[serde(default)]
    pub lost: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigDevice {
    pub index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// "1g.10gb".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_total_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_instance_id: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_instance_id: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unavailable {
    /// Machine-readable: `nvml_unavailable`, `driver_not_loaded`, `no_permission`,
    /// `device_access_denied`, `no_devices`, `nvml_error`, `disabled`.
    pub reason: String,
    pub detail: String,
}

/// One GPU's readings at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuMetrics {
    pub index: u32,
    pub lost: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_utilization_percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_utilization_percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_used_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_free_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_reserved_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature_celsius: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_milliwatts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub energy_millijoules: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sm_clock_mhz: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_clock_mhz: Option<u32>,
    /// NVML's clocks-event (throttle) reason bitmask; 0 means not throttled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle_reasons: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcie_link_gen: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcie_link_width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecc_corrected_volatile: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecc_uncorrected_volatile: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecc_corrected_aggregate: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecc_uncorrected_aggregate: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_pages_single_bit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retired_pages_double_bit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remapped_rows_correctable: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remapped_rows_uncorrectable: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remapped_rows_pending: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remapped_rows_failure: Option<bool>,
}

/// A critical XID error NVML reported for a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XidEvent {
    pub index: u32,
    pub code: u64,
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
    /// What a node advertises to its gateway: (count, model, total memory in MiB) of the GPUs
    /// present, the model of the first; `None` without GPUs. Changes only with the inventory.
    pub fn advert_summary(&self) -> Option<(u32, String, u64)> {
        let present: Vec<&GpuInfo> = self.gpus.iter().filter(|g| !g.lost).collect();
        let first = present.first()?;
        let memory: u64 = present
            .iter()
            .filter_map(|g| g.memory_total_bytes)
            .sum::<u64>()
            / (1024 * 1024);
        Some((
            present.len() as u32,
            first.name.clone().unwrap_or_default(),
            memory,
        ))
    }

    pub fn summary(&self) -> String {
        let n = self.gpus.len();
        let noun = if n == 1 { "GPU" } else { "GPUs" };
        let lost = self.gpus.iter().filter(|g| g.lost).count();
        match &self.unavailable {
            Some(u) if n == 0 => format!("0 GPUs ({})", u.reason),
            _ if lost > 0 => format!("{n} {noun} ({lost} lost)"),
            _ => format!("{n} {noun}"),
        }
    }
}

/// `usable` working GPUs and `lost` ones, for tests; none at all says NVML is missing.
#[cfg(test)]
pub(crate) fn test_inventory(usable: u32, lost: u32) -> GpuInventory {
    let gpu = |index, lost| GpuInfo {
        index,
        uuid: Some(format!("GPU-{index}")),
        lost,
        ..GpuInfo::default()
    };
    GpuInventory {
        gpus: (0..usable)
            .map(|i| gpu(i, false))
            .chain((usable..usable + lost).map(|i| gpu(i, true)))
            .collect(),
        unavailable: (usable + lost == 0).then(|| Unavailable {
            reason: "nvml_unavailable".into(),
            detail: "libnvidia-ml.so.1 missing".into(),
        }),
        ..GpuInventory::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_names_the_reason_when_there_are_no_gpus_and_counts_lost_ones() {
        let none = GpuInventory::unavailable("nvml_unavailable", "libnvidia-ml.so.1 missing");
        assert_eq!(none.summary(), "0 GPUs (nvml_unavailable)");
        let mut inv = GpuInventory {
            gpus: vec![GpuInfo::default()],
            ..GpuInventory::default()
        };
        assert_eq!(inv.summary(), "1 GPU");
        inv.gpus.push(GpuInfo {
            index: 1,
            lost: true,
            ..GpuInfo::default()
        });
        assert_eq!(inv.summary(), "2 GPUs (1 lost)");
    }

    #[test]
    fn fields_nvml_does_not_support_are_absent_not_sentinels() {
        let json = serde_json::to_value(GpuMetrics::default()).unwrap();
        assert!(json.get("temperature_celsius").is_none(), "{json}");
        assert!(json.get("energy_millijoules").is_none());
        let back: GpuMetrics = serde_json::from_value(json).unwrap();
        assert_eq!(back, GpuMetrics::default());
    }
}
