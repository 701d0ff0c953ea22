//! The supervisor's async shell: runs the components behind their traits, feeds what happens
//! into `core::Supervisor`, and carries out the commands that come back.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::api::{
    self, CheckResultDoc, ComponentDoc, DurationHistogram, ErrorDoc, GpuDoc, MeshDoc,
    ServiceCheckDoc, ServicesDoc, StatusDoc,
};
use crate::config::{self, Config, ProviderKind, ServiceName};
use crate::core::health::{CheckRequest, CheckResult, Health};
use crate::core::{Backoff, Command, Component, ComponentView, ReloadPlan, Retry, Supervisor};
use crate::gpu::{GpuInventory, GpuProbe, Monitor, Report, XidEvent};
use crate::logging::LogHandle;
use crate::mesh::{self, Hooks, Joined, MeshError, MeshProvider, ServiceAd};
use crate::services::node_info::NodeInfoEndpoint;
use crate::systemd::{self, Notifier};

/// The provider that `[network] provider` selects. The shell picks it, so the mesh boundary
/// itself never names the providers that implement it.
pub fn mesh_provider(config: &Config, hooks: Hooks) -> Box<dyn MeshProvider> {
    match config.network.provider {
        ProviderKind::Wireguard => Box::new(mesh::wireguard::WireguardMesh::new(hooks)),
        ProviderKind::Tailscale => Box::new(mesh::tailscale::TailscaleMesh::new(hooks)),
        #[cfg(feature = "test-fakes")]
        ProviderKind::Fake => Box::new(mesh::fake::FakeMesh::default()),
    }
}

/// How long a stop may spend withdrawing advertisements; the rest of the 5 s budget is slack.
pub const WITHDRAW_TIMEOUT: Duration = Duration::from_secs(4);

/// The OS-facing parts, each behind its narrow trait so tests can swap them.
pub struct Components {
    pub mesh: Box<dyn MeshProvider>,
    /// The hooks `mesh` was built with (see `mesh_provider`), and their recheck receiver.
    pub hooks: (Hooks, mpsc::Receiver<String>),
    pub gpu: Box<dyn GpuProbe>,
    pub notifier: Box<dyn Notifier>,
    pub watchdog_interval: Option<Duration>,
}

pub struct Daemon {
    config_path: PathBuf,
    config: Arc<Config>,
    core: Supervisor,
    mesh: Arc<tokio::sync::Mutex<Box<dyn MeshProvider>>>,
    gpu: Monitor,
    notifier: Box<dyn Notifier>,
    log: Option<LogHandle>,
    tasks: [Option<JoinHandle<()>>; 3],
    /// The health check running or last run per service: at most one handle each.
    checks: BTreeMap<ServiceName, JoinHandle<()>>,
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
    hooks: Hooks,
    node_info: NodeInfoEndpoint,
    recheck_rx: mpsc::Receiver<String>,
    status_tx: watch::Sender<StatusDoc>,
    clock: Clock,
}

impl Daemon {
    pub fn new(
        config_path: PathBuf,
        config: Config,
        components: Components,
        log: Option<LogHandle>,
    ) -> Self {
        let (events_tx, events_rx) = mpsc::channel(16);
        let (hooks, recheck_rx) = components.hooks;
        let reports = events_tx.clone();
        let gpus = crate::gpu::Shared::default();
        let node_info = NodeInfoEndpoint::new(gpus.clone());
        let gpu = Monitor::spawn(
            components.gpu,
            gpus,
            Box::new(move |report| {
                let event = match report {
                    Report::Probed {
                        generation,
                        inventory,
                    } => Event::GpuProbed {
                        generation,
                        inventory,
                    },
                    Report::Changed { inventory } => Event::GpuChanged { inventory },
                    Report::Xid { event } => Event::Xid { event },
                };
                let _ = reports.blocking_send(event);
            }),
        );
        let clock = Clock::now();
        let gpu_required = config.gpu.required;
        let health = Health::new(&config.services, &config.gpu, clock.instant);
        Self {
            config_path,
            config: Arc::new(config),
            core: Supervisor::new(
                Backoff::DEFAULT,
                components.watchdog_interval,
                gpu_required,
                health,
                clock.instant,
            ),
            mesh: Arc::new(tokio::sync::Mutex::new(components.mesh)),
            gpu,
            notifier: components.notifier,
            log,
            tasks: Default::default(),
            checks: BTreeMap::new(),
            events_tx,
            events_rx,
            hooks,
            node_info,
            recheck_rx,
            status_tx: watch::Sender::new(StatusDoc::default()),
            clock,
        }
    }

    /// The GPU monitor's latest snapshot, read by the status API at request time.
    pub fn gpus(&self) -> crate::gpu::Shared {
        self.gpu.shared()
    }

    /// What the status API serves; updated after every event.
    pub fn status(&self) -> watch::Receiver<StatusDoc> {
        self.status_tx.subscribe()
    }

    /// Run until stopped; returns the process exit status.
    pub async fn run(mut self) -> Result<u8, std::io::Error> {
        let mut hup = signal(SignalKind::hangup())?;
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        self.core.handle_started(Instant::now());
        loop {
            while let Some(command) = self.core.poll_command() {
                match command {
                    Command::Notify(msgs) => self.notifier.notify(&msgs),
                    Command::Start {
                        component,
                        generation,
                    } => self.start(component, generation),
                    Command::Withdraw => {
                        self.abort(&Component::ALL);
                        self.abort_checks();
                        let error = self.withdraw().await;
                        self.core.handle_withdrawn(error, Instant::now());
                    }
                    Command::Check(request) => self.check(request),
                    Command::HealthChanged {
                        service,
                        healthy: true,
                        ..
                    } => {
                        tracing::info!(component = "services", service = %service, "service healthy")
                    }
                    Command::HealthChanged {
                        service, reason, ..
                    } => {
                        let reason = reason.unwrap_or_default();
                        tracing::warn!(component = "services", service = %service, reason, "service unhealthy")
                    }
                    Command::Exit(code) => {
                        self.abort_checks();
                        self.publish_status();
                        tracing::info!(code, "clawnode stopped");
                        return Ok(code);
                    }
                }
            }
            self.publish_status();
            let deadline = self.core.poll_timeout();
            let wake = tokio::select! {
                event = self.events_rx.recv() => Wake::Event(event),
                Some(reason) = self.recheck_rx.recv() => Wake::Recheck(reason),
                _ = hup.recv() => Wake::Reload,
                _ = term.recv() => Wake::Stop("SIGTERM"),
                _ = int.recv() => Wake::Stop("SIGINT"),
                _ = sleep_until(deadline) => Wake::Timer,
            };
            let now = Instant::now();
            match wake {
                Wake::Event(Some(event)) => self.handle_event(event, now),
                // We hold a sender ourselves, so the channel never closes.
                Wake::Event(None) => {}
                Wake::Reload => self.reload(now).await,
                Wake::Stop(signal) => {
                    tracing::info!(signal, "stopping");
                    self.core.handle_stop_requested(now);
                }
                Wake::Timer => self.core.handle_timeout(now),
                Wake::Recheck(reason) => {
                    tracing::debug!(component = "mesh", %reason, "recheck");
                    self.core.handle_recheck(Component::Mesh, now);
                }
            }
        }
    }

    fn start(&mut self, component: Component, generation: u64) {
        self.abort(&[component]);
        let tx = self.events_tx.clone();
        let config = Arc::clone(&self.config);
        let task = match component {
            Component::Mesh => {
                let mesh = Arc::clone(&self.mesh);
                tokio::spawn(async move {
                    let result = mesh.lock().await.join(&config).await;
                    let event = match result {
                        Ok(joined) => Event::MeshUp {
                            generation,
                            joined: Box::new(joined),
                        },
                        Err(error) => Event::Failed {
                            component,
                            generation,
                            error,
                        },
                    };
                    let _ = tx.send(event).await;
                })
            }
            Component::Gpu => {
                // The monitor thread answers with a GpuProbed event; no task to hold.
                self.gpu.probe(generation, config.gpu.clone());
                return;
            }
            Component::Services => {
                let mesh = Arc::clone(&self.mesh);
                // Only the healthy services, as the core sees them now.
                let healthy = self.core.advertisement();
                let mut ads = ServiceAd::from_config(&config);
                ads.retain(|ad| healthy.iter().any(|name| name.as_str() == ad.name));
                tokio::spawn(async move {
                    let result = mesh.lock().await.publish(&ads).await;
                    let event = match result {
                        Ok(()) => Event::Published { generation, ads },
                        Err(error) => Event::Failed {
                            component,
                            generation,
                            error,
                        },
                    };
                    let _ = tx.send(event).await;
                })
            }
        };
        self.tasks[component as usize] = Some(task);
    }

    /// Run one health check in its own task; it ends within the check's timeout and reports
    /// with `Event::Checked`. A check still running for the same service (its config changed
    /// in a reload, so its result would be ignored) is aborted.
    fn check(&mut self, request: CheckRequest) {
        let tx = self.events_tx.clone();
        let CheckRequest {
            service,
            kind,
            timeout,
            generation,
        } = request;
        let name = service.clone();
        let task = tokio::spawn(async move {
            let result = crate::services::health::run_check(&kind, timeout).await;
            tracing::debug!(component = "services", service = %name, ok = result.ok, detail = %result.detail, "health check");
            let _ = tx
                .send(Event::Checked {
                    service: name,
                    generation,
                    result,
                })
                .await;
        });
        // Services removed by a reload leave finished handles behind; drop them here.
        self.checks.retain(|_, task| !task.is_finished());
        if let Some(previous) = self.checks.insert(service, task) {
            previous.abort();
        }
    }

    fn abort_checks(&mut self) {
        for (_, task) in std::mem::take(&mut self.checks) {
            task.abort();
        }
    }

    fn handle_event(&mut self, event: Event, now: Instant) {
        match event {
            Event::MeshUp { generation, joined } => {
                release_freed_memory();
                let Joined {
                    mut status,
                    node_info,
                } = *joined;
                let name = self.config.node.name.to_string();
                if let Err(error) = self.node_info.place(&name, node_info.as_ref()) {
                    let listen = node_info.as_ref().map(|s| s.listen.to_string());
                    let problem = format!(
                        "node-info endpoint on {}: {error}",
                        listen.unwrap_or_default()
                    );
                    if node_info.as_ref().is_some_and(|s| s.essential) {
                        return self.handle_event(
                            Event::Failed {
                                component: Component::Mesh,
                                generation,
                                error: MeshError::transient(problem),
                            },
                            now,
                        );
                    }
                    status.problems.push(problem);
                }
                tracing::info!(component = "mesh", mesh = %status.summary(), "joined the mesh");
                self.core.handle_mesh_up(generation, status, now);
            }
            Event::GpuChanged { inventory } => {
                log_inventory(&inventory);
                self.hooks.gpus.set(inventory.advert_summary());
                self.core
                    .handle_gpus_changed(inventory, now, fastrand::u32(..));
                self.log_gpu_verdict();
            }
            Event::GpuProbed {
                generation,
                inventory,
            } => {
                log_inventory(&inventory);
                self.hooks.gpus.set(inventory.advert_summary());
                self.core
                    .handle_gpu_probed(generation, inventory, now, fastrand::u32(..));
                self.log_gpu_verdict();
            }
            Event::Checked {
                service,
                generation,
                result,
            } => self
                .core
                .handle_check_result(&service, generation, result, now),
            Event::Xid { event } => self.core.handle_xid(event, now),
            Event::Published { generation, ads } => {
                self.node_info.set_services(&ads);
                let names: Vec<&str> = ads.iter().map(|ad| ad.name.as_str()).collect();
                tracing::info!(component = "services", services = ?names, "services published");
                self.core.handle_published(generation, &ads, now);
            }
            Event::Failed {
                component,
                generation,
                error,
            } => {
                match error.retry() {
                    Retry::Transient => {
                        tracing::warn!(component = component.as_str(), %error, "component failed; will retry")
                    }
                    Retry::NeedsOperator => {
                        tracing::error!(component = component.as_str(), %error, "component failed; waiting for the operator")
                    }
                }
                self.core.handle_component_failed(
                    component,
                    generation,
                    error,
                    now,
                    fastrand::u32(..),
                );
            }
        }
    }

    /// The core's verdict on the GPUs, for the journal.
    fn log_gpu_verdict(&self) {
        if let Some(error) = self.core.error(Component::Gpu) {
            tracing::warn!(component = "gpu", %error, "GPU probe");
        }
    }

    /// SIGHUP: re-read and validate the file; apply only what changed, or keep the old config.
    async fn reload(&mut self, now: Instant) {
        tracing::info!(config = %self.config_path.display(), "reloading configuration");
        self.core
            .handle_reload_requested(systemd::monotonic_usec(), now);
        let new = match config::load(&self.config_path) {
            Ok(new) => new,
            Err(errors) => {
                for error in &errors.0 {
                    tracing::error!(component = "config", %error, "reload rejected");
                }
                let mut reason = errors
                    .0
                    .first()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                if errors.0.len() > 1 {
                    reason.push_str(&format!(" (and {} more)", errors.0.len() - 1));
                }
                self.core.handle_reload_rejected(reason, now);
                return;
            }
        };
        let plan = ReloadPlan::new(&self.config, &new);
        if let (Some(level), Some(log)) = (&plan.log_level, &self.log) {
            log.set_level(level);
        }
        if plan.needs_restart {
            tracing::warn!(
                component = "config",
                "[api] socket and metrics_listen and [node] directories change at the next restart"
            );
        }
        if plan.replace_provider {
            // The old provider withdraws what it advertised before the new one takes over. Its
            // tasks hold the provider's lock, so they go first; the core restarts them.
            self.abort(&[Component::Mesh, Component::Services]);
            if let Some(error) = self.withdraw().await {
                tracing::warn!(component = "mesh", %error, "old provider did not withdraw cleanly");
            }
            *self.mesh.lock().await = mesh_provider(&new, self.hooks.clone());
        }
        tracing::info!(changed = ?plan.changed, "configuration reloaded");
        self.config = Arc::new(new);
        self.core.handle_reload_applied(&plan, now);
    }

    fn abort(&mut self, components: &[Component]) {
        for &component in components {
            if let Some(task) = self.tasks[component as usize].take() {
                task.abort();
            }
        }
    }

    async fn withdraw(&mut self) -> Option<String> {
        let mesh = Arc::clone(&self.mesh);
        let result = tokio::time::timeout(WITHDRAW_TIMEOUT, async move {
            let mut mesh = mesh.lock().await;
            let withdrawn = mesh.withdraw().await;
            let left = mesh.leave().await;
            withdrawn.and(left)
        })
        .await;
        self.node_info.stop();
        match result {
            Ok(Ok(())) => {
                tracing::info!(
                    component = "services",
                    "withdrew advertisements and left the mesh"
                );
                None
            }
            Ok(Err(error)) => Some(error.to_string()),
            Err(_) => Some(format!(
                "withdrawing took longer than {} s; gave up",
                WITHDRAW_TIMEOUT.as_secs()
            )),
        }
    }

    fn publish_status(&self) {
        let doc = self.status_doc(Instant::now());
        self.status_tx.send_if_modified(|current| {
            if *current == doc {
                return false;
            }
            *current = doc;
            true
        });
    }

    fn status_doc(&self, now: Instant) -> StatusDoc {
        let view = self.core.view(now);
        let component = |c: Component| -> ComponentDoc {
            let v: &ComponentView = &view.components[c as usize];
            ComponentDoc {
                state: v.state.as_str().into(),
                summary: v.summary.clone(),
                error: v.error.clone(),
                waiting_for_operator: v.waiting_for_operator,
                attempts: v.attempts,
                next_retry_unix_ms: v.retry_in.map(|d| self.clock.unix_ms(now + d)),
            }
        };
        let config = &self.config;
        let inventory = view.inventory.clone().unwrap_or_default();
        let mesh = view.mesh.clone().unwrap_or_default();
        StatusDoc {
            node: config.node.name.to_string(),
            version: env!("CARGO_PKG_VERSION").into(),
            pid: std::process::id(),
            provider: config.network.provider.to_string(),
            phase: view.phase.as_str().into(),
            ready: view.ready,
            status: view.status.clone(),
            config: api::status_config(&self.config_path, view.reload_note.clone()),
            mesh: MeshDoc {
                health: component(Component::Mesh),
                interface: mesh.interface,
                address: mesh.address,
                peers: mesh.peers,
                problems: mesh.problems,
                live: None,
            },
            gpu: GpuDoc {
                health: component(Component::Gpu),
                enabled: config.gpu.enabled,
                required: config.gpu.required,
                count: inventory.gpus.len(),
                driver_version: inventory.driver_version.clone(),
                unavailable_reason: inventory.unavailable.as_ref().map(|u| u.reason.clone()),
                cuda_driver_version: inventory.cuda_driver_version.clone(),
                devices: inventory.gpus,
                xid_errors: Vec::new(),
            },
            services: ServicesDoc {
                health: component(Component::Services),
                configured: ServiceAd::from_config(config),
                advertised: view.advertised,
                checks: view
                    .health
                    .iter()
                    .map(|h| ServiceCheckDoc {
                        name: h.name.clone(),
                        state: h.state.as_str().into(),
                        advertised: h.advertised,
                        reason: h.reason.clone(),
                        check: h.check.clone(),
                        requires_gpus: h.requires_gpus,
                        last_result: h.last_result.as_ref().map(|(result, at)| CheckResultDoc {
                            ok: result.ok,
                            detail: result.detail.clone(),
                            duration_ms: result.duration.as_millis() as u64,
                            at_unix_ms: self.clock.unix_ms(*at),
                        }),
                        since_unix_ms: self.clock.unix_ms(h.since),
                        checks: h.checks,
                        failures: h.failures,
                        transitions: h.transitions,
                        durations: DurationHistogram {
                            buckets: h.duration_buckets.clone(),
                            sum_us: (h.duration_sum * 1e6).round() as u64,
                        },
                    })
                    .collect(),
            },
            last_errors: view
                .last_errors
                .iter()
                .map(|e| ErrorDoc {
                    source: e.source.into(),
                    message: e.message.clone(),
                    at_unix_ms: self.clock.unix_ms(e.at),
                })
                .collect(),
            gateway_role: None,
        }
    }
}

enum Event {
    MeshUp {
        generation: u64,
        /// Boxed: the largest event by far, and rare.
        joined: Box<Joined>,
    },
    /// The set of GPUs or the MIG layout changed between probes.
    GpuChanged { inventory: GpuInventory },
    GpuProbed {
        generation: u64,
        inventory: GpuInventory,
    },
    Published {
        generation: u64,
        ads: Vec<ServiceAd>,
    },
    /// A health check finished.
    Checked {
        service: ServiceName,
        generation: u64,
        result: CheckResult,
    },
    /// NVML reported an XID.
    Xid { event: XidEvent },
    Failed {
        component: Component,
        generation: u64,
        error: MeshError,
    },
}

enum Wake {
    Event(Option<Event>),
    Recheck(String),
    Reload,
    Stop(&'static str),
    Timer,
}

/// Maps the monotonic instants the core works in to wall-clock time for the status API.
struct Clock {
    instant: Instant,
    system: SystemTime,
}

impl Clock {
    fn now() -> Self {
        Self {
            instant: Instant::now(),
            system: SystemTime::now(),
        }
    }

    fn unix_ms(&self, at: Instant) -> u64 {
        let wall = if at >= self.instant {
            self.system + (at - self.instant)
        } else {
            self.system - (self.instant - at)
        };
        wall.duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

fn log_inventory(inventory: &GpuInventory) {
    match &inventory.unavailable {
        Some(u) => {
            tracing::warn!(component = "gpu", reason = %u.reason, detail = %u.detail, "no GPUs to report")
        }
        None => tracing::info!(component = "gpu", gpus = %inventory.summary(), "GPU probe done"),
    }
}

/// A join parses peer files and reads the device back; with thousands of peers that is tens
/// of megabytes, freed again at once. glibc keeps freed memory in its arenas, so without this
/// the idle RSS would stay at the peak of the last join.
fn release_freed_memory() {
    // SAFETY: malloc_trim only walks and shrinks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::NotifyMsg;
    use crate::gpu::GpuInfo;
    use crate::mesh::{BoxFuture, MeshError, MeshStatus};
    use crate::systemd::RecordingNotifier;

    /// Fails its first `fail_first` joins, then joins; records what each publish carried.
    #[derive(Default)]
    struct FlakyMesh {
        fail_first: u32,
        joins: u32,
        published: Arc<std::sync::Mutex<Vec<Vec<String>>>>,
    }

    impl MeshProvider for FlakyMesh {
        fn join<'a>(&'a mut self, _config: &'a Config) -> BoxFuture<'a, Result<Joined, MeshError>> {
            Box::pin(async move {
                self.joins += 1;
                if self.joins <= self.fail_first {
                    return Err(MeshError::transient(format!(
                        "no route (join {})",
                        self.joins
                    )));
                }
                Ok(Joined {
                    status: MeshStatus {
                        provider: "flaky".into(),
                        interface: Some("claw0".into()),
                        address: Some("10.100.0.9/16".into()),
                        peers: 2,
                        problems: Vec::new(),
                        gateway: None,
                    },
                    node_info: None,
                })
            })
        }

        fn publish<'a>(
            &'a mut self,
            services: &'a [ServiceAd],
        ) -> BoxFuture<'a, Result<(), MeshError>> {
            let names = services.iter().map(|ad| ad.name.clone()).collect();
            self.published.lock().unwrap().push(names);
            Box::pin(async { Ok(()) })
        }

        fn withdraw(&mut self) -> BoxFuture<'_, Result<(), MeshError>> {
            Box::pin(async { Ok(()) })
        }

        fn leave(&mut self) -> BoxFuture<'_, Result<(), MeshError>> {
            Box::pin(async { Ok(()) })
        }
    }

    struct TwoGpus;

    impl GpuProbe for TwoGpus {
        fn probe(&mut self) -> GpuInventory {
            let gpu = |index| GpuInfo {
                index,
                uuid: Some(format!("GPU-{index}")),
                name: Some("NVIDIA H100 80GB HBM3".into()),
                memory_total_bytes: Some(85_520_809_984),
                ..GpuInfo::default()
            };
            GpuInventory {
                gpus: vec![gpu(0), gpu(1)],
                driver_version: Some("580.95.05".into()),
                ..GpuInventory::default()
            }
        }
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_flaky_mesh_is_retried_until_the_node_is_ready_with_its_gpus_counted() {
        let notifier = RecordingNotifier::default();
        let sent = Arc::clone(&notifier.sent);
        // example() opts its service out of probing (time is paused here); the test below
        // runs real checks.
        let daemon = Daemon::new(
            "test.toml".into(),
            config::example(),
            Components {
                mesh: Box::new(FlakyMesh {
                    fail_first: 3,
                    ..FlakyMesh::default()
                }),
                gpu: Box::new(TwoGpus),
                hooks: Hooks::new(),
                notifier: Box::new(notifier),
                watchdog_interval: None,
            },
            None,
        );
        let status = daemon.status();
        let task = tokio::spawn(daemon.run());
        for _ in 0..1000 {
            if sent.lock().unwrap().contains(&NotifyMsg::Ready) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        task.abort();
        let sent = sent.lock().unwrap().clone();
        let ready_at = sent.iter().position(|m| *m == NotifyMsg::Ready);
        let ready_at = ready_at.unwrap_or_else(|| panic!("never ready: {sent:?}"));
        assert_eq!(
            sent[ready_at + 1],
            NotifyMsg::Status(
                "ready: flaky claw0 10.100.0.9/16, 2 GPUs, advertising molt-provider".into()
            )
        );
        assert!(sent[..ready_at].iter().any(
            |m| matches!(m, NotifyMsg::Status(s) if s.contains("no route (join 3) (attempt 3, retrying)"))
        ));
        let doc = status.borrow().clone();
        assert!(doc.ready);
        assert_eq!(doc.mesh.peers, 2);
        assert_eq!(doc.gpu.count, 2);
        assert_eq!(doc.gpu.driver_version.as_deref(), Some("580.95.05"));
        assert_eq!(doc.last_errors.len(), 3);
    }

    /// Two GPUs; both report XID 79 once `xid` is set.
    struct XidOnDemand {
        xid: Arc<std::sync::atomic::AtomicBool>,
    }

    impl GpuProbe for XidOnDemand {
        fn probe(&mut self) -> GpuInventory {
            TwoGpus.probe()
        }

        fn wait_xid(&mut self, timeout: Duration) -> Vec<XidEvent> {
            std::thread::sleep(timeout.min(Duration::from_millis(20)));
            if !self.xid.swap(false, std::sync::atomic::Ordering::SeqCst) {
                return Vec::new();
            }
            (0..2).map(|index| XidEvent { index, code: 79 }).collect()
        }
    }

    /// Waits (real time, 5 s at most) for a status document that satisfies `done`, and
    /// returns that document: the one the assertions read is the one that matched.
    async fn status_until(
        status: &mut watch::Receiver<StatusDoc>,
        what: &str,
        done: impl FnMut(&StatusDoc) -> bool,
    ) -> StatusDoc {
        let found = tokio::time::timeout(Duration::from_secs(5), status.wait_for(done))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|doc| doc.clone());
        found.unwrap_or_else(|| panic!("never {what}: {:?}", status.borrow().services))
    }

    /// The services the status document says are advertised, in config order.
    fn advertised(doc: &StatusDoc) -> Vec<&str> {
        let checks = doc.services.checks.iter();
        checks
            .filter(|c| c.advertised)
            .map(|c| c.name.as_str())
            .collect()
    }

    #[tokio::test]
    async fn only_healthy_services_are_published_and_an_xid_withdraws_the_gpu_service_for_its_hold()
    {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let text = format!(
            r#"
            [node]
            name = "gpu-01"
            [network.wireguard]
            address = "10.100.0.9/16"
            [gpu]
            xid_hold = "1s"
            [services.molt-provider]
            port = 8443
            mode = "tcp"
            [services.molt-provider.check]
            type = "none"
            [services.web]
            port = {port}
            mode = "tcp"
            [services.web.check]
            interval = "1s"
            timeout = "500ms"
            rise = 1
            fall = 1
            "#
        );
        let config = config::parse(std::path::Path::new("test.toml"), &text).unwrap();
        let mesh = FlakyMesh::default();
        let published = Arc::clone(&mesh.published);
        let xid = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let daemon = Daemon::new(
            "test.toml".into(),
            config,
            Components {
                mesh: Box::new(mesh),
                gpu: Box::new(XidOnDemand {
                    xid: Arc::clone(&xid),
                }),
                hooks: Hooks::new(),
                notifier: Box::new(RecordingNotifier::default()),
                watchdog_interval: None,
            },
            None,
        );
        let mut status = daemon.status();
        let task = tokio::spawn(daemon.run());

        // Nothing listens on the web port: only the unchecked GPU service is offered.
        let doc = status_until(&mut status, "molt-provider alone, web checked", |doc| {
            advertised(doc) == ["molt-provider"] && doc.services.checks[1].last_result.is_some()
        })
        .await;
        let web = &doc.services.checks[1];
        assert_eq!(
            (web.name.as_str(), web.state.as_str(), web.advertised),
            ("web", "unhealthy", false)
        );
        assert_eq!(web.reason.as_deref(), Some("connect refused"));
        assert_eq!(web.check, format!("tcp 127.0.0.1:{port}"));
        assert!(web.last_result.as_ref().is_some_and(|r| !r.ok));
        assert!(
            doc.status.contains("web unhealthy (connect refused)"),
            "{}",
            doc.status
        );

        // It starts listening: published at its next check.
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        status_until(&mut status, "both advertised", |doc| {
            advertised(doc) == ["molt-provider", "web"]
        })
        .await;

        // An XID that needs a reset on every GPU takes the GPU service off until the hold ends.
        xid.store(true, std::sync::atomic::Ordering::SeqCst);
        let doc = status_until(&mut status, "web alone", |doc| advertised(doc) == ["web"]).await;
        let molt = &doc.services.checks[0];
        assert_eq!(molt.state, "unhealthy");
        assert!(
            molt.reason.as_deref().is_some_and(|r| r.contains("XID 79")),
            "{molt:?}"
        );
        status_until(&mut status, "both advertised after the hold", |doc| {
            advertised(doc) == ["molt-provider", "web"]
        })
        .await;
        task.abort();
        drop(listener);
        let mut history = published.lock().unwrap().clone();
        // The mesh may come up before the first check and GPU probe: nothing is known to be
        // healthy then, so the first publish can be empty.
        if history[0].is_empty() {
            history.remove(0);
        }
        assert_eq!(
            history,
            [
                vec!["molt-provider"],
                vec!["molt-provider", "web"],
                vec!["web"],
                vec!["molt-provider", "web"]
            ],
            "one publish per change"
        );
    }
}
