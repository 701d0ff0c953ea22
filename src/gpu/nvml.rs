//! GPU probing through NVML. The library is dlopened, so the same binary runs on GPU-less hosts.

use std::ffi::OsString;
use std::path::PathBuf;

use nvml_wrapper::Nvml;
use nvml_wrapper::error::NvmlError;

use super::{GpuInfo, GpuInventory, GpuProbe};

/// Initialises NVML once and keeps it for the life of the process: re-initialising on every
/// poll skews utilisation readings and costs power.
pub struct NvmlProbe {
    library: Option<PathBuf>,
    nvml: Option<Nvml>,
}

impl NvmlProbe {
    pub fn new(library: Option<PathBuf>) -> Self {
        Self {
            library,
            nvml: None,
        }
    }

    fn init(&self) -> Result<Nvml, NvmlError> {
        let Some(path) = &self.library else {
            return Nvml::init();
        };
        let path: OsString = path.clone().into_os_string();
        Nvml::builder().lib_path(&path).init()
    }
}

impl GpuProbe for NvmlProbe {
    fn probe(&mut self) -> GpuInventory {
        if self.nvml.is_none() {
            match self.init() {
                Ok(nvml) => self.nvml = Some(nvml),
                Err(error) => return unavailable(&error),
            }
        }
        let Some(nvml) = &self.nvml else {
            return GpuInventory::unavailable("nvml_error", "NVML is not initialised");
        };
        let count = match nvml.device_count() {
            Ok(count) => count,
            Err(error) => return unavailable(&error),
        };
        let driver_version = nvml.sys_driver_version().ok();
        if count == 0 {
            let mut inv = GpuInventory::unavailable("no_devices", "NVML reports no GPUs");
            inv.driver_version = driver_version;
            return inv;
        }
        let gpus = (0..count)
            .map(|index| {
                let device = nvml.device_by_index(index).ok();
                GpuInfo {
                    index,
                    uuid: device.as_ref().and_then(|d| d.uuid().ok()),
                    name: device.as_ref().and_then(|d| d.name().ok()),
                    memory_total_bytes: device
                        .as_ref()
                        .and_then(|d| d.memory_info().ok())
                        .map(|m| m.total),
                }
            })
            .collect();
        GpuInventory {
            gpus,
            driver_version,
            unavailable: None,
        }
    }
}

fn unavailable(error: &NvmlError) -> GpuInventory {
    let reason = match error {
        NvmlError::LibloadingError(_) | NvmlError::FailedToLoadSymbol(_) => "nvml_unavailable",
        NvmlError::DriverNotLoaded => "driver_not_loaded",
        NvmlError::NoPermission => "no_permission",
        NvmlError::LibraryNotFound => "nvml_unavailable",
        _ => "nvml_error",
    };
    GpuInventory::unavailable(reason, error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_without_nvml_reports_zero_gpus_with_a_reason() {
        let mut probe = NvmlProbe::new(Some("/nonexistent/libnvidia-ml.so.1".into()));
        let inv = probe.probe();
        assert!(inv.gpus.is_empty());
        let reason = inv.unavailable.expect("a reason").reason;
        assert_eq!(reason, "nvml_unavailable");
    }
}
