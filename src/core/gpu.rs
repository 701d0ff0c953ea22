//! Pure GPU decisions: when the inventory changed enough to re-advertise, how XID events are
//! counted, and the summary buyers see.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};

use super::model::{GpuInventory, GpuMetrics, XidEvent};

/// Changes only when the set of GPU UUIDs or the MIG layout changes: utilisation, clocks and
/// even a driver update leave it alone, so buyers are not told about noise.
pub fn layout_hash(inventory: &GpuInventory) -> u64 {
    /// A MIG instance as the layout sees it: (UUID, profile).
    type Mig<'a> = (Option<&'a str>, Option<&'a str>);
    let mut layout: Vec<(Option<&str>, Vec<Mig>)> = inventory
        .gpus
        .iter()
        .map(|g| {
            let mut mig: Vec<_> = g
                .mig_devices
                .iter()
                .map(|m| (m.uuid.as_deref(), m.profile.as_deref()))
                .collect();
            mig.sort();
            (g.uuid.as_deref(), mig)
        })
        .collect();
    layout.sort();
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    layout.hash(&mut hasher);
    hasher.finish()
}

/// XID errors as events: a count per GPU and code, and when each was last seen. A last-value
/// gauge hides repeats; this does not.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct XidLedger {
    /// Keyed by (GPU index, XID code).
    pub counts: BTreeMap<(u32, u64), XidCount>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct XidCount {
    pub count: u64,
    pub last_seen_unix_ms: u64,
    /// The order in which codes were last seen on this GPU, for "the last XID".
    pub sequence: u64,
}

impl XidLedger {
    pub fn handle_xid(&mut self, event: XidEvent, now_unix_ms: u64) {
        let sequence = self.counts.values().map(|c| c.sequence).max().unwrap_or(0) + 1;
        let entry = self.counts.entry((event.index, event.code)).or_default();
        entry.count += 1;
        entry.last_seen_unix_ms = now_unix_ms;
        entry.sequence = sequence;
    }

    /// The most recent XID code on GPU `index`, if any.
    pub fn last(&self, index: u32) -> Option<u64> {
        self.counts
            .iter()
            .filter(|((gpu, _), _)| *gpu == index)
            .max_by_key(|(_, c)| c.sequence)
            .map(|((_, code), _)| *code)
    }
}

/// What the node-info endpoint tells buyers: one entry per GPU model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuSummary {
    pub model: String,
    pub count: usize,
    pub memory_total_bytes: Option<u64>,
    /// Free framebuffer summed over the model's GPUs at the last sample.
    pub memory_free_bytes: Option<u64>,
    pub driver_version: Option<String>,
    pub cuda_driver_version: Option<String>,
    /// MIG profiles present, e.g. {"1g.10gb": 2, "3g.40gb": 1}.
    pub mig: BTreeMap<String, usize>,
    /// GPUs of this model that fell off the bus.
    pub lost: usize,
}

pub fn summarize(inventory: &GpuInventory, metrics: &[GpuMetrics]) -> Vec<GpuSummary> {
    let mut by_model: BTreeMap<String, GpuSummary> = BTreeMap::new();
    for gpu in &inventory.gpus {
        let model = gpu.name.clone().unwrap_or_else(|| "unknown".into());
        let entry = by_model.entry(model.clone()).or_insert_with(|| GpuSummary {
            model,
            count: 0,
            memory_total_bytes: gpu.memory_total_bytes,
            memory_free_bytes: None,
            driver_version: inventory.driver_version.clone(),
            cuda_driver_version: inventory.cuda_driver_version.clone(),
            mig: BTreeMap::new(),
            lost: 0,
        });
        entry.count += 1;
        if gpu.lost {
            entry.lost += 1;
        }
        let free = metrics
            .iter()
            .find(|m| m.index == gpu.index && !m.lost)
            .and_then(|m| m.memory_free_bytes);
        if let Some(free) = free {
            entry.memory_free_bytes = Some(entry.memory_free_bytes.unwrap_or(0) + free);
        }
        for mig in &gpu.mig_devices {
            let profile = mig.profile.clone().unwrap_or_else(|| "unknown".into());
            *entry.mig.entry(profile).or_default() += 1;
        }
    }
    by_model.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::{GpuInfo, MigDevice};

    fn gpu(index: u32, uuid: &str) -> GpuInfo {
        GpuInfo {
            index,
            uuid: Some(uuid.into()),
            name: Some("NVIDIA H100 80GB HBM3".into()),
            memory_total_bytes: Some(80),
            ..GpuInfo::default()
        }
    }

    #[test]
    fn the_layout_hash_moves_only_with_uuids_or_mig_layout() {
        let mut inv = GpuInventory {
            gpus: vec![gpu(0, "GPU-a"), gpu(1, "GPU-b")],
            driver_version: Some("580.1".into()),
            ..GpuInventory::default()
        };
        let base = layout_hash(&inv);
        inv.driver_version = Some("580.2".into());
        inv.gpus[0].power_limit_milliwatts = Some(1);
        assert_eq!(layout_hash(&inv), base, "static noise does not count");
        inv.gpus.reverse();
        assert_eq!(layout_hash(&inv), base, "order does not count");
        inv.gpus[0].mig_devices.push(MigDevice {
            uuid: Some("MIG-1".into()),
            profile: Some("1g.10gb".into()),
            ..MigDevice::default()
        });
        assert_ne!(layout_hash(&inv), base, "a MIG instance does");
        inv.gpus[0].mig_devices.clear();
        inv.gpus[1].uuid = Some("GPU-c".into());
        assert_ne!(layout_hash(&inv), base, "a swapped GPU does");
    }

    #[test]
    fn each_xid_event_counts_once_and_the_last_code_is_kept_per_gpu() {
        let mut ledger = XidLedger::default();
        ledger.handle_xid(XidEvent { index: 0, code: 79 }, 1000);
        ledger.handle_xid(XidEvent { index: 0, code: 79 }, 2000);
        ledger.handle_xid(XidEvent { index: 0, code: 48 }, 3000);
        ledger.handle_xid(XidEvent { index: 1, code: 13 }, 4000);
        assert_eq!(ledger.counts[&(0, 79)].count, 2, "repeats are visible");
        assert_eq!(ledger.counts[&(0, 79)].last_seen_unix_ms, 2000);
        assert_eq!(ledger.counts[&(0, 48)].count, 1);
        assert_eq!(ledger.last(0), Some(48));
        assert_eq!(ledger.last(1), Some(13));
        assert_eq!(ledger.last(2), None);
    }

    #[test]
    fn buyers_see_models_counts_mig_profiles_and_free_memory() {
        let mut a = gpu(0, "GPU-a");
        a.mig_devices = vec![
            MigDevice {
                profile: Some("1g.10gb".into()),
                ..MigDevice::default()
            },
            MigDevice {
                profile: Some("1g.10gb".into()),
                ..MigDevice::default()
            },
        ];
        let mut b = gpu(1, "GPU-b");
        b.lost = true;
        let inv = GpuInventory {
            gpus: vec![a, b],
            driver_version: Some("580.95.05".into()),
            cuda_driver_version: Some("13.0".into()),
            ..GpuInventory::default()
        };
        let metrics = vec![GpuMetrics {
            index: 0,
            memory_free_bytes: Some(70),
            ..GpuMetrics::default()
        }];
        let summary = summarize(&inv, &metrics);
        assert_eq!(summary.len(), 1);
        let s = &summary[0];
        assert_eq!((s.count, s.lost), (2, 1));
        assert_eq!(s.memory_free_bytes, Some(70));
        assert_eq!(s.mig["1g.10gb"], 2);
        assert_eq!(s.cuda_driver_version.as_deref(), Some("13.0"));
    }
}
