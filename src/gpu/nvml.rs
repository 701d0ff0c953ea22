//! GPU probing through NVML. The library is dlopened, so the same binary runs on GPU-less hosts.
//!
//! NVML is initialised once and kept for the life of the process (re-initialising on every poll
//! skews utilisation readings and costs power); dropping the probe frees the event set and then
//! shuts NVML down. Every reading NVML may refuse is an `Option`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use nvml_wrapper::Nvml;
use nvml_wrapper::device::Device;
use nvml_wrapper::enum_wrappers::device::{
    Brand, Clock, EccCounter, MemoryError, RetirementCause, TemperatureSensor,
};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper_sys::bindings::{
    nvmlEventData_t, nvmlEventSet_t, nvmlEventTypeXidCriticalError,
    nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST, nvmlReturn_enum_NVML_ERROR_TIMEOUT,
    nvmlReturn_enum_NVML_SUCCESS,
};

use super::{GpuInfo, GpuInventory, GpuMetrics, GpuProbe, MigDevice, XidEvent};

pub struct NvmlProbe {
    library: Option<PathBuf>,
    // Field order matters: the event set must be freed before NVML shuts down.
    events: Option<Events>,
    nvml: Option<Nvml>,
    count: u32,
}

/// NVML's XID event set, held raw: the wrapper's `EventSet` borrows `Nvml`, which would make
/// this struct self-referential.
struct Events {
    set: nvmlEventSet_t,
    /// Device handle (as an address) → GPU index, to name the GPU an event came from.
    handles: Vec<(usize, u32)>,
    free: unsafe extern "C" fn(nvmlEventSet_t) -> u32,
}

// SAFETY: the set is an opaque NVML handle; NVML's API is thread-safe, and only the monitor
// thread, which owns the probe, uses it.
unsafe impl Send for Events {}

impl Drop for Events {
    fn drop(&mut self) {
        // SAFETY: `set` came from nvmlEventSetCreate and is freed once, before nvmlShutdown.
        unsafe { (self.free)(self.set) };
    }
}

impl NvmlProbe {
    pub fn new(library: Option<PathBuf>) -> Self {
        Self {
            library,
            events: None,
            nvml: None,
            count: 0,
        }
    }

    fn init(&self) -> Result<Nvml, NvmlError> {
        let Some(path) = &self.library else {
            return Nvml::init();
        };
        let path: OsString = path.clone().into_os_string();
        Nvml::builder().lib_path(&path).init()
    }

    /// Init is retried on every probe the supervisor asks for (start, and a reload that
    /// changes `[gpu]`); the monitor does not poll without GPUs.
    fn ensure_init(&mut self) -> Result<&Nvml, GpuInventory> {
        if self.nvml.is_none() {
            match self.init() {
                Ok(nvml) => self.nvml = Some(nvml),
                Err(error) => return Err(unavailable(&error)),
            }
        }
        self.nvml
            .as_ref()
            .ok_or_else(|| GpuInventory::unavailable("nvml_error", "NVML is not initialised"))
    }

    /// Register every GPU for critical XID events, once. GPUs that cannot deliver events
    /// (NotSupported, lost) are skipped; the others still report.
    fn ensure_events(&mut self) {
        if self.events.is_some() {
            return;
        }
        let Some(nvml) = &self.nvml else { return };
        let lib = nvml.lib();
        let (Ok(create), Ok(register), Ok(free)) = (
            lib.nvmlEventSetCreate.as_ref(),
            lib.nvmlDeviceRegisterEvents.as_ref(),
            lib.nvmlEventSetFree.as_ref(),
        ) else {
            return;
        };
        let mut set: nvmlEventSet_t = std::ptr::null_mut();
        // SAFETY: a valid out pointer; NVML fills in an opaque handle.
        if unsafe { create(&mut set) } != nvmlReturn_enum_NVML_SUCCESS {
            return;
        }
        let mut handles = Vec::new();
        for index in 0..self.count {
            let Ok(device) = nvml.device_by_index(index) else {
                continue;
            };
            // SAFETY: the handle belongs to `nvml`, which outlives the set (field order).
            let handle = unsafe { device.handle() };
            let supported = device
                .supported_event_types()
                .is_ok_and(|t| t.bits() & u64::from(nvmlEventTypeXidCriticalError) != 0);
            if !supported {
                continue;
            }
            // SAFETY: valid device handle and event set.
            let rc = unsafe { register(handle, u64::from(nvmlEventTypeXidCriticalError), set) };
            if rc == nvmlReturn_enum_NVML_SUCCESS {
                handles.push((handle as usize, index));
            }
        }
        if handles.is_empty() {
            tracing::warn!(
                component = "gpu",
                gpus = self.count,
                "no GPU delivers XID events; XID errors will not be counted"
            );
        } else {
            tracing::info!(
                component = "gpu",
                gpus = handles.len(),
                of = self.count,
                "watching for XID errors"
            );
        }
        self.events = Some(Events {
            set,
            handles,
            free: *free,
        });
    }
}

impl GpuProbe for NvmlProbe {
    fn probe(&mut self) -> GpuInventory {
        let nvml = match self.ensure_init() {
            Ok(nvml) => nvml,
            Err(inventory) => return inventory,
        };
        let count = match nvml.device_count() {
            Ok(count) => count,
            Err(error) => return unavailable(&error),
        };
        let driver_version = nvml.sys_driver_version().ok();
        let cuda_driver_version = nvml
            .sys_cuda_driver_version()
            .ok()
            .map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10));
        if count == 0 {
            let mut inv = GpuInventory::unavailable("no_devices", "NVML reports no GPUs");
            inv.driver_version = driver_version;
            inv.cuda_driver_version = cuda_driver_version;
            return inv;
        }
        let gpus = (0..count)
            .map(|index| match nvml.device_by_index(index) {
                Ok(device) => info(index, &device),
                Err(_) => GpuInfo {
                    index,
                    lost: true,
                    ..GpuInfo::default()
                },
            })
            .collect();
        self.count = count;
        self.ensure_events();
        GpuInventory {
            gpus,
            driver_version,
            cuda_driver_version,
            unavailable: None,
        }
    }

    fn sample(&mut self) -> Vec<GpuMetrics> {
        let Some(nvml) = &self.nvml else {
            return Vec::new();
        };
        (0..self.count)
            .map(|index| match nvml.device_by_index(index) {
                Ok(device) => metrics(nvml, index, &device),
                Err(_) => GpuMetrics {
                    index,
                    lost: true,
                    ..GpuMetrics::default()
                },
            })
            .collect()
    }

    fn wait_xid(&mut self, timeout: Duration) -> Vec<XidEvent> {
        let wait = self
            .nvml
            .as_ref()
            .and_then(|n| n.lib().nvmlEventSetWait_v2.as_ref().ok());
        let (Some(events), Some(wait)) = (&self.events, wait) else {
            std::thread::sleep(timeout);
            return Vec::new();
        };
        if events.handles.is_empty() {
            std::thread::sleep(timeout);
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        loop {
            // SAFETY: zeroed plain C struct that NVML fills in.
            let mut data: nvmlEventData_t = unsafe { std::mem::zeroed() };
            // SAFETY: a live event set and a valid out pointer.
            let rc = unsafe { wait(events.set, &mut data, timeout_ms) };
            if rc == nvmlReturn_enum_NVML_ERROR_TIMEOUT {
                break;
            }
            if rc != nvmlReturn_enum_NVML_SUCCESS {
                if rc != nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST {
                    tracing::debug!(component = "gpu", rc, "NVML event wait failed");
                }
                std::thread::sleep(Duration::from_millis(u64::from(timeout_ms)));
                break;
            }
            if data.eventType & u64::from(nvmlEventTypeXidCriticalError) != 0 {
                let index = events
                    .handles
                    .iter()
                    .find(|(h, _)| *h == data.device as usize)
                    .map(|(_, i)| *i);
                if let Some(index) = index {
                    out.push(XidEvent {
                        index,
                        code: data.eventData,
                    });
                }
            }
            // Drain whatever else is queued without waiting again.
            timeout_ms = 0;
        }
        out
    }
}

fn info(index: u32, device: &Device<'_>) -> GpuInfo {
    let uuid = device.uuid();
    if matches!(uuid, Err(NvmlError::GpuLost)) {
        return GpuInfo {
            index,
            lost: true,
            ..GpuInfo::default()
        };
    }
    let ecc = device.is_ecc_enabled().ok();
    let mig = device.mig_mode().ok();
    let mig_enabled = mig.as_ref().map(|m| m.current == 1);
    let mig_devices = if mig_enabled == Some(true) {
        mig_devices(device)
    } else {
        Vec::new()
    };
    GpuInfo {
        index,
        uuid: uuid.ok(),
        name: device.name().ok(),
        brand: device.brand().ok().map(brand_name),
        pci_bus_id: device.pci_info().ok().map(|p| p.bus_id),
        serial: device.serial().ok(),
        vbios_version: device.vbios_version().ok(),
        memory_total_bytes: device.memory_info().ok().map(|m| m.total),
        compute_capability: device
            .cuda_compute_capability()
            .ok()
            .map(|c| format!("{}.{}", c.major, c.minor)),
        persistence_mode: device.is_in_persistent_mode().ok(),
        power_limit_milliwatts: device.power_management_limit().ok(),
        ecc_enabled: ecc.as_ref().map(|e| e.currently_enabled),
        ecc_enabled_pending: ecc.as_ref().map(|e| e.pending_enabled),
        mig_enabled,
        mig_enabled_pending: mig.as_ref().map(|m| m.pending == 1),
        mig_devices,
        lost: false,
    }
}

fn mig_devices(device: &Device<'_>) -> Vec<MigDevice> {
    let max = device.mig_device_count().unwrap_or(0);
    (0..max)
        // Slots can be empty (NOT_FOUND) after an instance is destroyed; later ones still count.
        .filter_map(|k| device.mig_device_by_index(k).ok().map(|mig| (k, mig)))
        .map(|(k, mig)| {
            let name = mig.name().ok();
            MigDevice {
                index: k,
                uuid: mig.uuid().ok(),
                profile: name
                    .as_deref()
                    .and_then(|n| n.rsplit_once(" MIG "))
                    .map(|(_, p)| p.to_string()),
                memory_total_bytes: mig.memory_info().ok().map(|m| m.total),
                gpu_instance_id: raw_u32(&mig, |lib| lib.nvmlDeviceGetGpuInstanceId.as_ref().ok()),
                compute_instance_id: raw_u32(&mig, |lib| {
                    lib.nvmlDeviceGetComputeInstanceId.as_ref().ok()
                }),
            }
        })
        .collect()
}

type RawU32 = unsafe extern "C" fn(nvml_wrapper_sys::bindings::nvmlDevice_t, *mut u32) -> u32;

/// A `u32` getter that nvml-wrapper does not wrap.
fn raw_u32(
    device: &Device<'_>,
    symbol: impl Fn(&nvml_wrapper_sys::bindings::NvmlLib) -> Option<&RawU32>,
) -> Option<u32> {
    let f = symbol(device.nvml().lib())?;
    let mut value = 0u32;
    // SAFETY: a live device handle and a valid out pointer.
    let rc = unsafe { f(device.handle(), &mut value) };
    (rc == nvmlReturn_enum_NVML_SUCCESS).then_some(value)
}

fn metrics(nvml: &Nvml, index: u32, device: &Device<'_>) -> GpuMetrics {
    let utilization = device.utilization_rates();
    if matches!(utilization, Err(NvmlError::GpuLost)) {
        return GpuMetrics {
            index,
            lost: true,
            ..GpuMetrics::default()
        };
    }
    let utilization = utilization.ok();
    let memory = device.memory_info().ok();
    let ecc = |kind, counter| device.total_ecc_errors(kind, counter).ok();
    let retired = |cause| device.retired_pages(cause).ok().map(|p| p.len() as u64);
    let remapped = remapped_rows(nvml, device);
    GpuMetrics {
        index,
        lost: false,
        gpu_utilization_percent: utilization.as_ref().map(|u| u.gpu),
        memory_utilization_percent: utilization.as_ref().map(|u| u.memory),
        memory_used_bytes: memory.as_ref().map(|m| m.used),
        memory_free_bytes: memory.as_ref().map(|m| m.free),
        memory_reserved_bytes: memory.as_ref().map(|m| m.reserved),
        temperature_celsius: device.temperature(TemperatureSensor::Gpu).ok(),
        power_milliwatts: device.power_usage().ok(),
        energy_millijoules: device.total_energy_consumption().ok(),
        sm_clock_mhz: device.clock_info(Clock::SM).ok(),
        memory_clock_mhz: device.clock_info(Clock::Memory).ok(),
        throttle_reasons: device.current_throttle_reasons().ok().map(|r| r.bits()),
        pcie_link_gen: device.current_pcie_link_gen().ok(),
        pcie_link_width: device.current_pcie_link_width().ok(),
        ecc_corrected_volatile: ecc(MemoryError::Corrected, EccCounter::Volatile),
        ecc_uncorrected_volatile: ecc(MemoryError::Uncorrected, EccCounter::Volatile),
        ecc_corrected_aggregate: ecc(MemoryError::Corrected, EccCounter::Aggregate),
        ecc_uncorrected_aggregate: ecc(MemoryError::Uncorrected, EccCounter::Aggregate),
        retired_pages_single_bit: retired(RetirementCause::MultipleSingleBitEccErrors),
        retired_pages_double_bit: retired(RetirementCause::DoubleBitEccError),
        remapped_rows_correctable: remapped.map(|r| r.0),
        remapped_rows_uncorrectable: remapped.map(|r| r.1),
        remapped_rows_pending: remapped.map(|r| r.2),
        remapped_rows_failure: remapped.map(|r| r.3),
    }
}

/// nvmlDeviceGetRemappedRows, which nvml-wrapper 0.13 does not wrap.
fn remapped_rows(nvml: &Nvml, device: &Device<'_>) -> Option<(u32, u32, bool, bool)> {
    let f = nvml.lib().nvmlDeviceGetRemappedRows.as_ref().ok()?;
    let (mut corr, mut unc, mut pending, mut failure) = (0u32, 0u32, 0u32, 0u32);
    // SAFETY: a live device handle and four valid out pointers.
    let rc = unsafe {
        f(
            device.handle(),
            &mut corr,
            &mut unc,
            &mut pending,
            &mut failure,
        )
    };
    (rc == nvmlReturn_enum_NVML_SUCCESS).then_some((corr, unc, pending != 0, failure != 0))
}

fn brand_name(brand: Brand) -> String {
    format!("{brand:?}")
}

// NVML has some thirty other errors; for a node without GPUs they all mean "nvml_error".
#[allow(clippy::wildcard_enum_match_arm)]
fn unavailable(error: &NvmlError) -> GpuInventory {
    let reason = match error {
        NvmlError::LibloadingError(_) | NvmlError::FailedToLoadSymbol(_) => "nvml_unavailable",
        NvmlError::DriverNotLoaded => "driver_not_loaded",
        NvmlError::NoPermission => "no_permission",
        NvmlError::LibraryNotFound => "nvml_unavailable",
        _ => "nvml_error",
    };
    // Only NVML's opaque errors are worth a second look; its own named causes stand.
    if reason != "nvml_error" {
        return GpuInventory::unavailable(reason, error.to_string());
    }
    let control = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(CONTROL_NODE)
        .err();
    match device_denied(control.as_ref()) {
        Some(detail) => GpuInventory::unavailable("device_access_denied", detail),
        None => GpuInventory::unavailable(reason, error.to_string()),
    }
}

const CONTROL_NODE: &str = "/dev/nvidiactl";

/// NVML reports a device cgroup denial as an opaque "internal driver error" (seen on an H100
/// under `DevicePolicy=closed`); opening the control node ourselves names the cause. The device
/// cgroup answers EPERM; EACCES is plain file permissions.
fn device_denied(open_error: Option<&std::io::Error>) -> Option<String> {
    match open_error?.raw_os_error()? {
        libc::EPERM => Some(format!(
            "cannot open {CONTROL_NODE} (operation not permitted): a device policy keeps the \
             NVIDIA devices out; restart the unit if the driver was loaded after it started \
             (DeviceAllow= classes are resolved at start), else it needs \
             DeviceAllow=char-nvidiactl rw and DeviceAllow=char-nvidia rw \
             (char-nvidia-frontend on older drivers); a container needs the devices passed in"
        )),
        libc::EACCES => Some(format!(
            "cannot open {CONTROL_NODE} (permission denied): run clawnode as root or as a \
             member of the group that owns the NVIDIA device nodes"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_denied_control_node_names_the_device_policy() {
        let denied = std::io::Error::from_raw_os_error(libc::EPERM);
        let detail = device_denied(Some(&denied)).expect("a diagnosis");
        assert!(detail.contains("/dev/nvidiactl"), "{detail}");
        assert!(detail.contains("DeviceAllow=char-nvidiactl"), "{detail}");
    }

    #[test]
    fn only_a_policy_denial_blames_the_device_policy() {
        let missing = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(device_denied(Some(&missing)), None);
        let unix_permissions = std::io::Error::from_raw_os_error(libc::EACCES);
        let detail = device_denied(Some(&unix_permissions)).expect("a diagnosis");
        assert!(!detail.contains("DeviceAllow"), "{detail}");
        assert_eq!(device_denied(None), None);
    }

    #[test]
    fn a_host_without_nvml_reports_zero_gpus_with_a_reason() {
        let mut probe = NvmlProbe::new(Some("/nonexistent/libnvidia-ml.so.1".into()));
        let inv = probe.probe();
        assert!(inv.gpus.is_empty());
        let reason = inv.unavailable.expect("a reason").reason;
        assert_eq!(reason, "nvml_unavailable");
        assert!(probe.sample().is_empty());
    }
}
