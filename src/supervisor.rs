//! The supervisor's async shell: runs the components behind their traits, feeds what happens
//! into `core::Supervisor`, and carries out the commands that come back.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::api::{self, ComponentDoc, ErrorDoc, GpuDoc, MeshDoc, ServicesDoc, StatusDoc};
use crate::config::{self, Config};
use crate::core::{Backoff, Command, Component, ComponentView, Supervisor};
use crate::gpu::{GpuInventory, GpuProbe, Monitor, Report};
use crate::logging::LogHandle;
use crate::mesh::{self, Hooks, Joined, MeshProvider, MeshStatus, ServiceAd};
use crate::services::node_info::NodeInfoEndpoint;
use crate::systemd::{self, Notifier};

/// How long a stop may spend withdrawing advertisements; the rest of the 5 s budget is slack.
pub const WITHDRAW_TIMEOUT: Duration = Duration::from_secs(4);

/// The OS-facing parts, each behind its narrow trait so tests can swap them.
pub struct Components {
    pub mesh: Box<dyn MeshProvider>,
    /// The hooks `mesh` was built with (see `mesh::for_config`), and their recheck receiver.
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
    /// The generation of the last GPU probe, so layout changes update the right slot.
    gpu_generation: u64,
    notifier: Box<dyn Notifier>,
    log: Option<LogHandle>,
    tasks: [Option<JoinHandle<()>>; 3],
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
    hooks: Hooks,
    node_info: NodeInfoEndpoint,
    recheck_rx: mpsc::Receiver<String>,
    status_tx: watch::Sender<StatusDoc>,
    mesh_status: Option<MeshStatus>,
    inventory: Option<GpuInventory>,
    advertised: bool,
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
                };
                let _ = reports.blocking_send(event);
            }),
        );
        let clock = Clock::now();
        Self {
            config_path,
            config: Arc::new(config),
            core: Supervisor::new(
                Backoff::DEFAULT,
                components.watchdog_interval,
                clock.instant,
            ),
            mesh: Arc::new(tokio::sync::Mutex::new(components.mesh)),
            gpu,
            gpu_generation: 0,
            notifier: components.notifier,
            log,
            tasks: Default::default(),
            events_tx,
            events_rx,
            hooks,
            node_info,
            recheck_rx,
            status_tx: watch::Sender::new(StatusDoc::default()),
            mesh_status: None,
            inventory: None,
            advertised: false,
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
                        let error = self.withdraw().await;
                        self.core.handle_withdrawn(error, Instant::now());
                    }
                    Command::Exit(code) => {
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
                        Ok(joined) => Event::MeshUp { generation, joined },
                        Err(error) => Event::Failed {
                            component,
                            generation,
                            error: error.to_string(),
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
                tokio::spawn(async move {
                    let ads = ServiceAd::from_config(&config);
                    let result = mesh.lock().await.publish(&ads).await;
                    let event = match result {
                        Ok(()) => Event::Published { generation, ads },
                        Err(error) => Event::Failed {
                            component,
                            generation,
                            error: error.to_string(),
                        },
                    };
                    let _ = tx.send(event).await;
                })
            }
        };
        self.tasks[component as usize] = Some(task);
    }

    fn handle_event(&mut self, event: Event, now: Instant) {
        match event {
            Event::MeshUp { generation, joined } => {
                release_freed_memory();
                let Joined {
                    mut status,
                    node_info,
                } = joined;
                if let Err(error) = self
                    .node_info
                    .place(self.config.node.name.as_ref(), node_info.as_ref())
                {
                    let spot = node_info.as_ref().map(|s| s.listen.to_string());
                    let problem = format!(
                        "node-info endpoint on {}: {error}",
                        spot.unwrap_or_default()
                    );
                    if node_info.as_ref().is_some_and(|s| s.essential) {
                        return self.handle_event(
                            Event::Failed {
                                component: Component::Mesh,
                                generation,
                                error: problem,
                            },
                            now,
                        );
                    }
                    status.problems.push(problem);
                }
                let summary = status.summary();
                tracing::info!(component = "mesh", mesh = %summary, "joined the mesh");
                self.mesh_status = Some(status);
                self.core
                    .handle_component_up(Component::Mesh, generation, summary, now);
            }
            // A layout change goes through the same checks as a probe: with `required`, losing
            // every GPU makes the node unready.
            Event::GpuChanged { inventory } => self.handle_event(
                Event::GpuProbed {
                    generation: self.gpu_generation,
                    inventory,
                },
                now,
            ),
            Event::GpuProbed {
                generation,
                inventory,
            } => {
                self.gpu_generation = generation;
                let summary = inventory.summary();
                let usable = inventory.gpus.iter().any(|g| !g.lost);
                let missing = !usable && self.config.gpu.required;
                let reason = inventory.unavailable.clone();
                self.inventory = Some(inventory);
                if missing {
                    let why = reason
                        .map(|u| format!("{}: {}", u.reason, u.detail))
                        .unwrap_or_else(|| "no GPUs".into());
                    let error = format!(
                        "GPUs are required ([gpu] required = true) but none were found: {why}"
                    );
                    tracing::warn!(component = "gpu", %error, "GPU probe");
                    self.core.handle_component_failed(
                        Component::Gpu,
                        generation,
                        error,
                        now,
                        fastrand::u32(..),
                    );
                    return;
                }
                if let Some(u) = &self.inventory.as_ref().and_then(|i| i.unavailable.clone()) {
                    tracing::warn!(component = "gpu", reason = %u.reason, detail = %u.detail, "no GPUs to report");
                } else {
                    tracing::info!(component = "gpu", gpus = %summary, "GPU probe done");
                }
                self.core
                    .handle_component_up(Component::Gpu, generation, summary, now);
            }
            Event::Published { generation, ads } => {
                self.node_info.set_services(&ads);
                let names: Vec<String> = ads.into_iter().map(|ad| ad.name).collect();
                let summary = if names.is_empty() {
                    "no services to advertise".to_string()
                } else {
                    format!("advertising {}", names.join(", "))
                };
                tracing::info!(component = "services", services = ?names, "services published");
                self.advertised = true;
                self.core
                    .handle_component_up(Component::Services, generation, summary, now);
            }
            Event::Failed {
                component,
                generation,
                error,
            } => {
                tracing::warn!(component = component.as_str(), %error, "component failed; will retry");
                if component == Component::Mesh {
                    self.mesh_status = None;
                    self.advertised = false;
                }
                if component == Component::Services {
                    self.advertised = false;
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
        let old = Arc::clone(&self.config);
        let changed = changed_components(&old, &new);
        if new.log != old.log
            && let Some(log) = &self.log
        {
            log.set_level(new.log.level.as_str());
        }
        if new.api != old.api
            || new.node.state_dir != old.node.state_dir
            || new.node.runtime_dir != old.node.runtime_dir
        {
            tracing::warn!(
                component = "config",
                "[api] socket and metrics_listen and [node] directories change at the next restart"
            );
        }
        if new.network.provider != old.network.provider {
            // The old provider withdraws what it advertised before the new one takes over. Its
            // tasks hold the provider's lock, so they go first; the core restarts them.
            self.abort(&[Component::Mesh, Component::Services]);
            if let Some(error) = self.withdraw().await {
                tracing::warn!(component = "mesh", %error, "old provider did not withdraw cleanly");
            }
            *self.mesh.lock().await = mesh::for_config(&new, self.hooks.clone());
            self.mesh_status = None;
        }
        tracing::info!(changed = ?changed, "configuration reloaded");
        self.config = Arc::new(new);
        self.core.handle_reload_applied(&changed, now);
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
        self.advertised = false;
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
                attempts: v.attempts,
                next_retry_unix_ms: v.retry_in.map(|d| self.clock.unix_ms(now + d)),
            }
        };
        let config = &self.config;
        let inventory = self.inventory.clone().unwrap_or_default();
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
                interface: self.mesh_status.as_ref().and_then(|m| m.interface.clone()),
                address: self.mesh_status.as_ref().and_then(|m| m.address.clone()),
                peers: self.mesh_status.as_ref().map_or(0, |m| m.peers),
                problems: self
                    .mesh_status
                    .as_ref()
                    .map(|m| m.problems.clone())
                    .unwrap_or_default(),
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
                advertised: self.advertised,
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
        }
    }
}

/// Which components a new config touches. Everything else keeps running untouched.
pub fn changed_components(old: &Config, new: &Config) -> Vec<Component> {
    let mut changed = Vec::new();
    if old.network != new.network || old.node.name != new.node.name {
        changed.push(Component::Mesh);
    }
    if old.gpu != new.gpu {
        changed.push(Component::Gpu);
    }
    if old.services != new.services {
        changed.push(Component::Services);
    }
    changed
}

enum Event {
    MeshUp {
        generation: u64,
        joined: Joined,
    },
    /// The set of GPUs or the MIG layout changed between probes.
    GpuChanged {
        inventory: GpuInventory,
    },
    GpuProbed {
        generation: u64,
        inventory: GpuInventory,
    },
    Published {
        generation: u64,
        ads: Vec<ServiceAd>,
    },
    Failed {
        component: Component,
        generation: u64,
        error: String,
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
    use crate::mesh::{BoxFuture, MeshError};
    use crate::systemd::RecordingNotifier;

    /// Fails its first `fail_first` joins, then joins; counts publishes.
    struct FlakyMesh {
        fail_first: u32,
        joins: u32,
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
                    },
                    node_info: None,
                })
            })
        }

        fn publish<'a>(
            &'a mut self,
            _services: &'a [ServiceAd],
        ) -> BoxFuture<'a, Result<(), MeshError>> {
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

    fn config() -> Config {
        let text = r#"
            [node]
            name = "gpu-01"
            [network.wireguard]
            address = "10.100.0.9/16"
            [services.molt-provider]
            port = 8443
            mode = "tcp"
        "#;
        config::parse(std::path::Path::new("test.toml"), text).expect("valid")
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_flaky_mesh_is_retried_until_the_node_is_ready_with_its_gpus_counted() {
        let notifier = RecordingNotifier::default();
        let sent = Arc::clone(&notifier.sent);
        let daemon = Daemon::new(
            "test.toml".into(),
            config(),
            Components {
                mesh: Box::new(FlakyMesh {
                    fail_first: 3,
                    joins: 0,
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

    #[test]
    fn only_the_sections_that_changed_are_reapplied() {
        let old = config();
        let mut new = old.clone();
        assert!(changed_components(&old, &new).is_empty());
        new.gpu.poll_interval = Duration::from_secs(30);
        assert_eq!(changed_components(&old, &new), vec![Component::Gpu]);
        new.services.clear();
        assert_eq!(
            changed_components(&old, &new),
            vec![Component::Gpu, Component::Services]
        );
        let mut renamed = old.clone();
        renamed.network.wireguard.mtu = 1380;
        assert_eq!(changed_components(&old, &renamed), vec![Component::Mesh]);
    }
}
