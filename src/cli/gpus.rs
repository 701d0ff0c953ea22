//! `clawnode gpus [--json]`: probe the GPUs directly through NVML (no daemon needed) and print
//! the inventory with one sample of the readings.

use std::path::Path;
use std::process::ExitCode;

use serde_json::json;

use crate::config;
use crate::gpu::{GpuInventory, GpuMetrics, GpuProbe, NvmlProbe};

use super::CliError;

pub fn run(config_path: &Path, json: bool, library: Option<&Path>) -> Result<ExitCode, CliError> {
    // Without a config file the defaults apply: `clawnode gpus` must work on a fresh host.
    let configured = match config::load(config_path) {
        Ok(config) => config.gpu.nvml_library,
        Err(errors) if !config_path.exists() => {
            drop(errors);
            None
        }
        Err(errors) => return Err(errors.into()),
    };
    let mut probe = NvmlProbe::new(library.map(Path::to_path_buf).or(configured));
    let inventory = probe.probe();
    let metrics = probe.sample();
    if json {
        let doc = json!({ "inventory": inventory, "metrics": metrics });
        println!("{doc:#}");
    } else {
        print!("{}", table(&inventory, &metrics));
    }
    Ok(ExitCode::SUCCESS)
}

fn table(inventory: &GpuInventory, metrics: &[GpuMetrics]) -> String {
    let dash = || "-".to_string();
    if let Some(u) = inventory
        .unavailable
        .as_ref()
        .filter(|_| inventory.gpus.is_empty())
    {
        return format!("no GPUs: {} ({})\n", u.reason, u.detail);
    }
    let mut out = format!(
        "driver {}, CUDA {}\n",
        inventory.driver_version.clone().unwrap_or_else(dash),
        inventory.cuda_driver_version.clone().unwrap_or_else(dash)
    );
    out.push_str(&format!(
        "{:<4}{:<28}{:<14}{:>10}{:>10}{:>6}{:>6}{:>8}  {}\n",
        "GPU", "NAME", "PCI", "MEM MiB", "FREE MiB", "UTIL", "TEMP", "POWER W", "UUID / MIG"
    ));
    for gpu in &inventory.gpus {
        let m = metrics.iter().find(|m| m.index == gpu.index);
        let mib = |b: Option<u64>| b.map_or_else(dash, |b| (b / (1024 * 1024)).to_string());
        let num = |v: Option<u32>| v.map_or_else(dash, |v| v.to_string());
        if gpu.lost {
            out.push_str(&format!(
                "{:<4}lost: the GPU has fallen off the bus\n",
                gpu.index
            ));
            continue;
        }
        let pci = gpu.pci_bus_id.clone().unwrap_or_else(dash);
        let pci = pci.strip_prefix("00000000:").unwrap_or(&pci).to_string();
        out.push_str(&format!(
            "{:<4}{:<28}{:<14}{:>10}{:>10}{:>6}{:>6}{:>8}  {}\n",
            gpu.index,
            gpu.name.clone().unwrap_or_else(dash),
            pci,
            mib(gpu.memory_total_bytes),
            mib(m.and_then(|m| m.memory_free_bytes)),
            num(m.and_then(|m| m.gpu_utilization_percent)),
            num(m.and_then(|m| m.temperature_celsius)),
            m.and_then(|m| m.power_milliwatts)
                .map_or_else(dash, |p| format!("{:.0}", f64::from(p) / 1000.0)),
            gpu.uuid.clone().unwrap_or_else(dash),
        ));
        for mig in &gpu.mig_devices {
            out.push_str(&format!(
                "{:<4}  MIG {} {} {} MiB\n",
                "",
                mig.profile.clone().unwrap_or_else(dash),
                mig.uuid.clone().unwrap_or_else(dash),
                mib(mig.memory_total_bytes)
            ));
        }
    }
    out
}
