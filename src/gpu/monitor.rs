//! The GPU monitor: one thread that owns the probe. It probes when the supervisor asks, then,
//! while there are GPUs, waits on NVML's XID event set in short slices and samples the dynamic
//! readings every `poll_interval`. Readers (status, `/metrics`, node-info) take the latest
//! snapshot; the supervisor hears only about probes it asked for and layout changes.
//!
//! A host without GPUs costs nothing: the thread blocks on its request channel.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{GpuInventory, GpuMetrics, GpuProbe, XidEvent};
use crate::config::GpuConfig;
use crate::core::gpu::{XidLedger, layout_hash};

/// What readers see.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub inventory: GpuInventory,
    pub metrics: Vec<GpuMetrics>,
    pub xids: XidLedger,
    /// Samples or probes that failed for a whole GPU (lost GPUs included).
    pub probe_errors: u64,
    pub sampled_unix_ms: Option<u64>,
}

pub type Shared = Arc<RwLock<Snapshot>>;

/// What the monitor tells the supervisor.
#[derive(Debug)]
pub enum Report {
    /// The answer to `Monitor::probe`.
    Probed {
        generation: u64,
        inventory: GpuInventory,
    },
    /// The set of GPUs or the MIG layout changed since the last report.
    Changed { inventory: GpuInventory },
    /// NVML reported an XID listed in `[gpu] unhealthy_xids` (all are counted in the ledger).
    Xid { event: XidEvent },
}

pub struct Monitor {
    requests: mpsc::Sender<Request>,
    shared: Shared,
}

enum Request {
    Probe { generation: u64, config: GpuConfig },
}

/// How long one XID wait may block before the thread looks at its requests again.
const EVENT_SLICE: Duration = Duration::from_millis(500);

impl Monitor {
    /// Start the thread; it publishes into `shared`.
    pub fn spawn(
        probe: Box<dyn GpuProbe>,
        shared: Shared,
        report: Box<dyn Fn(Report) + Send>,
    ) -> Monitor {
        let (requests, rx) = mpsc::channel();
        let state = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("gpu-monitor".into())
            .spawn(move || run(probe, rx, state, report))
            .expect("spawn the GPU monitor thread");
        Monitor { requests, shared }
    }

    /// Probe now (with `config`) and answer with `Report::Probed { generation }`.
    pub fn probe(&self, generation: u64, config: GpuConfig) {
        let _ = self.requests.send(Request::Probe { generation, config });
    }

    pub fn shared(&self) -> Shared {
        Arc::clone(&self.shared)
    }
}

fn run(
    mut probe: Box<dyn GpuProbe>,
    requests: mpsc::Receiver<Request>,
    shared: Shared,
    report: Box<dyn Fn(Report) + Send>,
) {
    let mut config: Option<GpuConfig> = None;
    let mut layout = 0u64;
    let mut next_sample = Instant::now();
    loop {
        let active = config.as_ref().is_some_and(|c| c.enabled)
            && !shared
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .inventory
                .gpus
                .is_empty();
        let request = if active {
            match requests.try_recv() {
                Ok(request) => Some(request),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
        } else {
            match requests.recv_timeout(Duration::from_secs(3600)) {
                Ok(request) => Some(request),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        };
        if let Some(Request::Probe {
            generation,
            config: wanted,
        }) = request
        {
            let inventory = if wanted.enabled {
                probe.probe()
            } else {
                GpuInventory::unavailable("disabled", "[gpu] enabled = false")
            };
            layout = layout_hash(&inventory);
            store_inventory(&shared, &inventory);
            config = Some(wanted);
            next_sample = Instant::now();
            report(Report::Probed {
                generation,
                inventory,
            });
            continue;
        }
        let Some(poll) = config.as_ref().map(|c| c.poll_interval) else {
            continue;
        };
        let now = Instant::now();
        if now >= next_sample {
            let metrics = probe.sample();
            let inventory = probe.probe();
            let changed = layout_hash(&inventory);
            {
                let mut snap = shared.write().unwrap_or_else(|p| p.into_inner());
                snap.probe_errors += metrics.iter().filter(|m| m.lost).count() as u64;
                snap.metrics = metrics;
                snap.sampled_unix_ms = Some(unix_ms());
            }
            store_inventory(&shared, &inventory);
            if changed != layout {
                layout = changed;
                tracing::info!(component = "gpu", gpus = %inventory.summary(), "GPU layout changed");
                report(Report::Changed { inventory });
            }
            next_sample = now + poll;
        }
        let wait = next_sample
            .saturating_duration_since(Instant::now())
            .min(EVENT_SLICE);
        for event in probe.wait_xid(wait) {
            tracing::warn!(
                component = "gpu",
                gpu = event.index,
                xid = event.code,
                "XID error"
            );
            shared
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .xids
                .handle_xid(event, unix_ms());
            // Only XIDs that hold a GPU reach the supervisor: a flood of others is counted
            // above and must not keep waking it.
            if config
                .as_ref()
                .is_some_and(|c| c.unhealthy_xids.contains(&event.code))
            {
                report(Report::Xid { event });
            }
        }
    }
}

fn store_inventory(shared: &Shared, inventory: &GpuInventory) {
    let mut snap = shared.write().unwrap_or_else(|p| p.into_inner());
    snap.inventory = inventory.clone();
    if inventory.gpus.is_empty() {
        snap.metrics.clear();
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::GpuInfo;
    use std::sync::Mutex;

    /// Two GPUs; XID 13 on GPU 0 and XID 79 on GPU 1 on the first wait; counts its samples.
    struct Scripted {
        xid_sent: bool,
        samples: Arc<Mutex<u32>>,
    }

    impl GpuProbe for Scripted {
        fn probe(&mut self) -> GpuInventory {
            GpuInventory {
                gpus: (0..2)
                    .map(|index| GpuInfo {
                        index,
                        uuid: Some(format!("GPU-{index}")),
                        ..GpuInfo::default()
                    })
                    .collect(),
                ..GpuInventory::default()
            }
        }

        fn sample(&mut self) -> Vec<GpuMetrics> {
            *self.samples.lock().unwrap() += 1;
            vec![GpuMetrics {
                index: 0,
                temperature_celsius: Some(40),
                ..GpuMetrics::default()
            }]
        }

        fn wait_xid(&mut self, timeout: Duration) -> Vec<XidEvent> {
            if !self.xid_sent {
                self.xid_sent = true;
                return vec![
                    XidEvent { index: 0, code: 13 },
                    XidEvent { index: 1, code: 79 },
                ];
            }
            std::thread::sleep(timeout);
            Vec::new()
        }
    }

    fn config() -> GpuConfig {
        GpuConfig {
            enabled: true,
            required: false,
            nvml_library: None,
            poll_interval: Duration::from_millis(50),
            ..GpuConfig::default()
        }
    }

    #[test]
    fn the_monitor_answers_probes_samples_on_its_interval_counts_every_xid_and_reports_only_those_that_hold_a_gpu()
     {
        let samples = Arc::new(Mutex::new(0));
        let (tx, rx) = mpsc::channel();
        let monitor = Monitor::spawn(
            Box::new(Scripted {
                xid_sent: false,
                samples: Arc::clone(&samples),
            }),
            Shared::default(),
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        monitor.probe(7, config());
        let Ok(Report::Probed {
            generation,
            inventory,
        }) = rx.recv_timeout(Duration::from_secs(5))
        else {
            panic!("no probe report");
        };
        assert_eq!((generation, inventory.gpus.len()), (7, 2));
        std::thread::sleep(Duration::from_millis(400));
        let snap = monitor.shared().read().unwrap().clone();
        assert_eq!(snap.metrics[0].temperature_celsius, Some(40));
        assert_eq!(snap.xids.counts[&(0, 13)].count, 1);
        assert_eq!(snap.xids.counts[&(1, 79)].count, 1);
        assert!(*samples.lock().unwrap() >= 3, "sampled every 50 ms");
        // XID 13 is not in [gpu] unhealthy_xids: counted, not reported.
        let Ok(Report::Xid { event }) = rx.try_recv() else {
            panic!("the XID is reported");
        };
        assert_eq!(event, XidEvent { index: 1, code: 79 });
        assert!(
            rx.try_recv().is_err(),
            "an unchanged layout is not reported, and the XID once"
        );
    }

    #[test]
    fn a_disabled_probe_reports_disabled_and_the_thread_then_sleeps() {
        let samples = Arc::new(Mutex::new(0));
        let (tx, rx) = mpsc::channel();
        let monitor = Monitor::spawn(
            Box::new(Scripted {
                xid_sent: true,
                samples: Arc::clone(&samples),
            }),
            Shared::default(),
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        let mut off = config();
        off.enabled = false;
        monitor.probe(1, off);
        let Ok(Report::Probed { inventory, .. }) = rx.recv_timeout(Duration::from_secs(5)) else {
            panic!("no probe report");
        };
        assert_eq!(inventory.unavailable.unwrap().reason, "disabled");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            *samples.lock().unwrap(),
            0,
            "nothing sampled while disabled"
        );
    }
}
