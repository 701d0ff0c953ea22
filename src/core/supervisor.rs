//! The supervisor's state machine: phases, readiness, retries, reloads and what systemd hears.
//!
//! Sans-IO in the Firezone style: the shell calls `handle_*(…, now)` with what happened, then
//! drains `poll_command()` and sleeps until `poll_timeout()`. Nothing here reads a clock,
//! touches a socket or draws a random number.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use super::backoff::Backoff;
use super::health::{CheckRequest, CheckResult, Health, ServiceHealthView};
use super::model::{GpuInventory, MeshStatus, ServiceAd, XidEvent};
use crate::config::{Config, GpuConfig, ServiceMode, ServiceName, ServiceSpec};

/// The parts of the node whose health decides readiness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    /// Joined to the mesh (WireGuard interface configured, or tailscaled Running).
    Mesh,
    /// The first GPU probe has finished (zero GPUs counts, unless GPUs are required).
    Gpu,
    /// The configured services are published through the mesh provider.
    Services,
}

impl Component {
    pub const ALL: [Component; 3] = [Component::Mesh, Component::Gpu, Component::Services];

    pub fn as_str(self) -> &'static str {
        match self {
            Component::Mesh => "mesh",
            Component::Gpu => "gpu",
            Component::Services => "services",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether trying again can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Soon, with backoff: a daemon restarting, a busy device, a network hiccup.
    Transient,
    /// Not until someone changes something; rechecked slowly, and at every reload.
    NeedsOperator,
}

/// Why something failed, and whether trying again can help. The mesh boundary calls it
/// `MeshError`; the pure Tailscale plan refuses with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    retry: Retry,
    message: String,
}

impl Failure {
    /// Worth retrying soon: a daemon restarting, a busy device, a network hiccup.
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            retry: Retry::Transient,
            message: message.into(),
        }
    }

    /// Retrying the same thing fails the same way until someone changes something: a wrong
    /// tailnet, a tag the policy does not permit, a file clawnode must not overwrite.
    pub fn needs_operator(message: impl Into<String>) -> Self {
        Self {
            retry: Retry::NeedsOperator,
            message: message.into(),
        }
    }

    pub fn retry(&self) -> Retry {
        self.retry
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

/// An I/O error says nothing about its cause's permanence; callers that know better classify
/// it themselves before it gets here.
impl From<std::io::Error> for Failure {
    fn from(error: std::io::Error) -> Self {
        Failure::transient(error.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Starting,
    Joining,
    Ready,
    Degraded,
    Stopping,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Joining => "joining",
            Phase::Ready => "ready",
            Phase::Degraded => "degraded",
            Phase::Stopping => "stopping",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ComponentState {
    #[default]
    Pending,
    Up,
    Failed,
}

impl ComponentState {
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentState::Pending => "pending",
            ComponentState::Up => "up",
            ComponentState::Failed => "failed",
        }
    }
}

/// How often a failure that needs the operator is looked at again: slowly, because trying
/// the same thing sooner fails the same way and only adds load on the daemon or control plane.
pub const OPERATOR_RECHECK: Backoff = Backoff::OPERATOR;

/// One sd_notify assignment. The shell turns each into a `KEY=value` line of a single datagram.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyMsg {
    Ready,
    Reloading { monotonic_usec: u64 },
    Stopping,
    Status(String),
    Watchdog,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Send these assignments to systemd in one datagram.
    Notify(Vec<NotifyMsg>),
    /// (Re)run a component's bring-up. Results carry the generation so stale ones are ignored.
    Start {
        component: Component,
        generation: u64,
    },
    /// Withdraw everything the node advertised, then report with `handle_withdrawn`.
    Withdraw,
    /// Probe a service's health and report with `handle_check_result`.
    Check(CheckRequest),
    /// A service's effective health (check and GPU gate) changed, the first verdict included.
    /// Only for the log: publishing follows on its own.
    HealthChanged {
        service: ServiceName,
        healthy: bool,
        /// Why it is unhealthy, when known.
        reason: Option<String>,
    },
    /// Exit the process with this status.
    Exit(u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorRecord {
    pub source: &'static str,
    pub message: String,
    pub at: Instant,
}

/// A read-only picture of the core for the status API.
#[derive(Debug, Clone, PartialEq)]
pub struct CoreView {
    pub phase: Phase,
    pub ready: bool,
    pub status: String,
    pub components: Vec<ComponentView>,
    pub last_errors: Vec<ErrorRecord>,
    pub reload_note: Option<String>,
    /// How the node looks on the mesh, while the mesh is up.
    pub mesh: Option<MeshStatus>,
    /// The last GPU inventory a probe or a layout change reported.
    pub inventory: Option<GpuInventory>,
    /// True while the mesh provider holds the advertisement.
    pub advertised: bool,
    /// Every configured service's health, in config order.
    pub health: Vec<ServiceHealthView>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentView {
    pub component: Component,
    pub state: ComponentState,
    pub summary: Option<String>,
    pub error: Option<String>,
    /// Set on a failure that retrying cannot fix until someone changes something.
    pub waiting_for_operator: bool,
    pub attempts: u32,
    pub retry_in: Option<Duration>,
}

/// What a reload changes, decided from the old and the new configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReloadPlan {
    /// Components whose settings changed and must be re-applied; the others are not touched.
    pub changed: Vec<Component>,
    /// `[network] provider` changed: the old provider withdraws and leaves before the new one
    /// takes over.
    pub replace_provider: bool,
    /// The new log level, when it changed.
    pub log_level: Option<String>,
    /// Settings that only take effect at the next restart changed (`[api]`, `[node]`
    /// directories).
    pub needs_restart: bool,
    /// `[gpu] required` in the new configuration.
    pub gpu_required: bool,
    /// The new services (their checks are reconfigured).
    pub services: BTreeMap<ServiceName, ServiceSpec>,
    /// The new `[gpu]` table (the XID list and hold).
    pub gpu: GpuConfig,
}

impl ReloadPlan {
    pub fn new(old: &Config, new: &Config) -> Self {
        let mut changed = Vec::new();
        if old.network != new.network || old.node.name != new.node.name {
            changed.push(Component::Mesh);
        }
        if old.gpu != new.gpu {
            changed.push(Component::Gpu);
        }
        // Only what the provider publishes; checks and `requires_gpus` act through health.
        if published_part(&old.services) != published_part(&new.services) {
            changed.push(Component::Services);
        }
        ReloadPlan {
            changed,
            replace_provider: old.network.provider != new.network.provider,
            log_level: (new.log != old.log).then(|| new.log.level.as_str().to_string()),
            needs_restart: new.api != old.api
                || new.node.state_dir != old.node.state_dir
                || new.node.runtime_dir != old.node.runtime_dir,
            gpu_required: new.gpu.required,
            services: new.services.clone(),
            gpu: new.gpu.clone(),
        }
    }
}

/// What publishing depends on: the names, ports, modes and certificates, not the checks.
fn published_part(
    services: &BTreeMap<ServiceName, ServiceSpec>,
) -> Vec<(&ServiceName, u16, ServiceMode, bool)> {
    services
        .iter()
        .map(|(name, spec)| (name, spec.port, spec.mode, spec.tls_cert))
        .collect()
}

pub struct Supervisor {
    phase: Phase,
    slots: [Slot; 3],
    generations: [u64; 3],
    /// A recheck asked for while an attempt was running: that attempt may have looked before
    /// the change, so one more runs when it comes back up.
    recheck_pending: [bool; 3],
    backoff: Backoff,
    watchdog: Option<Watchdog>,
    ever_ready: bool,
    reload: Reload,
    reload_note: Option<String>,
    last_status: Option<String>,
    errors: VecDeque<ErrorRecord>,
    commands: VecDeque<Command>,
    gpu_required: bool,
    mesh: Option<MeshStatus>,
    inventory: Option<GpuInventory>,
    advertised: bool,
    /// The services the provider accepted in the last successful publish; empty whenever
    /// `advertised` is false.
    published: BTreeSet<String>,
    health: Health,
    /// The first publish waits for every service's first verdict until then, so a restart
    /// does not advertise nothing and then the real list a moment later.
    first_decision_by: Instant,
    /// The mesh is up and the first publish waits for verdicts.
    publish_held: bool,
}

/// How long the first publish may wait for the first check results and GPU probe.
pub const FIRST_DECISION_WAIT: Duration = Duration::from_secs(10);

/// How many errors the status API keeps; older ones are dropped so memory stays flat.
pub const MAX_ERRORS: usize = 16;
/// Longest error text carried into STATUS=, so one verbose error cannot flood the journal.
const MAX_ERROR_CHARS: usize = 200;

impl Supervisor {
    /// `gpu_required` is `[gpu] required`: without a usable GPU the node is not ready.
    /// `health` holds the configured services' checks.
    pub fn new(
        backoff: Backoff,
        watchdog_interval: Option<Duration>,
        gpu_required: bool,
        health: Health,
        now: Instant,
    ) -> Self {
        Self {
            phase: Phase::Starting,
            slots: Default::default(),
            generations: [0; 3],
            recheck_pending: [false; 3],
            backoff,
            watchdog: watchdog_interval.map(|interval| Watchdog {
                interval,
                next: now + interval,
            }),
            ever_ready: false,
            reload: Reload::Idle,
            reload_note: None,
            last_status: None,
            errors: VecDeque::new(),
            commands: VecDeque::new(),
            gpu_required,
            mesh: None,
            inventory: None,
            advertised: false,
            published: BTreeSet::new(),
            health,
            first_decision_by: now + FIRST_DECISION_WAIT,
            publish_held: false,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn is_ready(&self) -> bool {
        self.phase == Phase::Ready
    }

    /// The configuration is valid: start the mesh and the GPU probe. Services follow the mesh.
    pub fn handle_started(&mut self, now: Instant) {
        if self.phase != Phase::Starting {
            return;
        }
        self.phase = Phase::Joining;
        self.start(Component::Mesh);
        self.start(Component::Gpu);
        // Checks run before the mesh is up, so the first publish already knows what is healthy.
        self.issue_checks(now);
        self.update(now);
    }

    /// The mesh provider joined (or confirmed the join).
    pub fn handle_mesh_up(&mut self, generation: u64, status: MeshStatus, now: Instant) {
        if !self.accepts(Component::Mesh, generation) {
            return;
        }
        let summary = status.summary();
        self.mesh = Some(status);
        self.component_up(Component::Mesh, summary, now);
    }

    /// A GPU probe finished. With `[gpu] required`, no usable GPU is a failure; otherwise zero
    /// GPUs is a normal state. `jitter` is a uniformly random `u32` from the shell.
    pub fn handle_gpu_probed(
        &mut self,
        generation: u64,
        inventory: GpuInventory,
        now: Instant,
        jitter: u32,
    ) {
        if !self.accepts(Component::Gpu, generation) {
            return;
        }
        self.judge_gpus(inventory, now, jitter);
    }

    /// The set of GPUs or the MIG layout changed between probes. It goes through the same
    /// rules as a probe, unless a probe is running, whose result decides instead.
    pub fn handle_gpus_changed(&mut self, inventory: GpuInventory, now: Instant, jitter: u32) {
        if self.phase == Phase::Stopping {
            return;
        }
        if self.slots[Component::Gpu.index()].awaiting_result() {
            // The gate follows the GPUs at once; readiness waits for the probe.
            if self.health.handle_inventory(&inventory, now) {
                self.republish();
            }
            self.inventory = Some(inventory);
            self.update(now);
            return;
        }
        self.judge_gpus(inventory, now, jitter);
    }

    /// A probe of a service's health finished. A result for a check since reconfigured is
    /// ignored. When the set of healthy services changes, it is published again.
    pub fn handle_check_result(
        &mut self,
        service: &ServiceName,
        generation: u64,
        result: CheckResult,
        now: Instant,
    ) {
        if self.phase == Phase::Stopping {
            return;
        }
        if self.health.handle_result(service, generation, result, now) {
            self.republish();
        }
        self.update(now);
    }

    /// NVML reported an XID; one that needs a reset holds its GPU unusable for a while.
    pub fn handle_xid(&mut self, event: XidEvent, now: Instant) {
        if self.phase == Phase::Stopping {
            return;
        }
        if self.health.handle_xid(event, now) {
            self.republish();
        }
        self.update(now);
    }

    /// What the next publish carries: the configured services that are healthy (and have a
    /// usable GPU where they need one), in config order.
    pub fn advertisement(&self) -> Vec<ServiceName> {
        self.health.advertised()
    }

    /// The provider now advertises exactly `services`.
    pub fn handle_published(&mut self, generation: u64, services: &[ServiceAd], now: Instant) {
        if !self.accepts(Component::Services, generation) {
            return;
        }
        let summary = if services.is_empty() && self.health.configured() == 0 {
            "no services to advertise".to_string()
        } else if services.is_empty() {
            "advertising nothing".to_string()
        } else {
            let names: Vec<&str> = services.iter().map(|ad| ad.name.as_str()).collect();
            format!("advertising {}", names.join(", "))
        };
        self.advertised = true;
        self.published = services.iter().map(|ad| ad.name.clone()).collect();
        self.component_up(Component::Services, summary, now);
    }

    /// Something outside changed a component (an interface was deleted, a daemon died or came
    /// back, the tailnet approved the node) or a periodic check is due: run its bring-up again
    /// now. A component that is up stays up meanwhile, so a check that finds nothing wrong
    /// changes nothing systemd sees. A component waiting for the operator is looked at again,
    /// since an outside change is what it waits for; one failing transiently already has a
    /// retry scheduled.
    pub fn handle_recheck(&mut self, component: Component, now: Instant) {
        if self.phase == Phase::Stopping {
            return;
        }
        let index = component.index();
        let slot = &self.slots[index];
        if slot.awaiting_result() {
            self.recheck_pending[index] = true;
            return;
        }
        match slot {
            Slot::Up { .. } => self.recheck(component),
            Slot::Failed {
                retry: Retry::NeedsOperator,
                ..
            } => self.start(component),
            Slot::Failed {
                retry: Retry::Transient,
                ..
            }
            | Slot::Pending { .. } => {}
        }
        let _ = now;
    }

    /// A component failed. `jitter` is a uniformly random `u32` from the shell.
    pub fn handle_component_failed(
        &mut self,
        component: Component,
        generation: u64,
        failure: Failure,
        now: Instant,
        jitter: u32,
    ) {
        if !self.accepts(component, generation) {
            return;
        }
        let Failure { retry, message } = failure;
        self.fail(component, message, retry, now, jitter);
    }

    /// Fire due retries and the watchdog.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(wd) = &mut self.watchdog
            && now >= wd.next
        {
            wd.next = now + wd.interval;
            self.commands
                .push_back(Command::Notify(vec![NotifyMsg::Watchdog]));
        }
        if self.phase == Phase::Stopping {
            return;
        }
        for component in Component::ALL {
            if self.slots[component.index()]
                .retry_at()
                .is_some_and(|at| now >= at)
            {
                self.start(component);
            }
        }
        if self.phase == Phase::Starting {
            return;
        }
        let expiry = self.health.handle_timeout(now);
        if expiry.advertised_changed {
            self.republish();
        }
        if expiry.expired {
            // Even with the same advertised set, the reasons in STATUS= changed.
            self.update(now);
        }
        if self.publish_held && now >= self.first_decision_by {
            self.update(now);
        }
        self.issue_checks(now);
    }

    /// The earliest instant at which `handle_timeout` has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let retries = self.slots.iter().filter_map(Slot::retry_at);
        let retries = if self.phase == Phase::Stopping {
            None
        } else {
            retries.min()
        };
        let watchdog = self.watchdog.as_ref().map(|w| w.next);
        let health = match self.phase {
            Phase::Starting | Phase::Stopping => None,
            Phase::Joining | Phase::Ready | Phase::Degraded => self.health.next_deadline(),
        };
        let held = self.publish_held.then_some(self.first_decision_by);
        [retries, watchdog, health, held]
            .into_iter()
            .flatten()
            .min()
    }

    /// SIGHUP arrived. `monotonic_usec` is CLOCK_MONOTONIC now, as systemd wants it.
    pub fn handle_reload_requested(&mut self, monotonic_usec: u64, now: Instant) {
        if self.phase == Phase::Stopping {
            return;
        }
        // systemd only expects RELOADING=1 … READY=1 from a service it already saw ready.
        let notified = self.ever_ready;
        self.reload = Reload::Loading { notified };
        if notified {
            let status = "reloading configuration".to_string();
            self.last_status = Some(status.clone());
            self.commands.push_back(Command::Notify(vec![
                NotifyMsg::Reloading { monotonic_usec },
                NotifyMsg::Status(status),
            ]));
        }
        let _ = now;
    }

    /// The new configuration was invalid; the old one keeps running untouched.
    pub fn handle_reload_rejected(&mut self, error: String, now: Instant) {
        if self.phase == Phase::Stopping {
            return;
        }
        let error = one_line(&error);
        self.record_error("config", error.clone(), now);
        self.reload_note = Some(format!("reload rejected, previous config kept: {error}"));
        self.finish_reload(now);
    }

    /// The new configuration is valid and in effect (the shell has carried out what `plan`
    /// says about the provider and the log level). The components in `plan.changed` are
    /// re-applied, and so is every component waiting for the operator: a reload is how the
    /// operator says "try again". The others are not touched.
    pub fn handle_reload_applied(&mut self, plan: &ReloadPlan, now: Instant) {
        if self.phase == Phase::Stopping {
            return;
        }
        self.reload_note = None;
        self.gpu_required = plan.gpu_required;
        let advertised_before = self.health.advertised();
        self.health.reconfigure(&plan.services, &plan.gpu, now);
        let republish = self.health.advertised() != advertised_before;
        if plan.replace_provider {
            self.mesh = None;
            self.unadvertise();
        }
        let notified = matches!(self.reload, Reload::Loading { notified: true });
        let mut restart = plan.changed.clone();
        for component in Component::ALL {
            if self.slots[component.index()].waiting_for_operator() && !restart.contains(&component)
            {
                restart.push(component);
            }
        }
        restart.sort();
        for &component in &restart {
            let up = self.slots[component.index()].is_up();
            match component {
                // The old provider has left: the new one starts from nothing.
                Component::Mesh if plan.replace_provider => self.start(component),
                Component::Services if !self.slots[Component::Mesh.index()].is_up() => {
                    // Publishing waits for the mesh and happens when it comes up.
                }
                Component::Services if self.publish_held => {
                    // The first publish is held for verdicts; its release publishes the new
                    // configuration.
                }
                // Re-applied while it stays up, so the node stays ready unless that fails.
                Component::Mesh | Component::Gpu | Component::Services if up => {
                    self.recheck(component)
                }
                Component::Mesh | Component::Gpu | Component::Services => self.start(component),
            }
        }
        if republish && !restart.contains(&Component::Services) {
            // Cleared XID holds (or a new XID list) changed what is healthy.
            self.republish();
        }
        self.reload = Reload::Settling {
            notified,
            components: restart,
        };
        self.issue_checks(now);
        self.update(now);
    }

    /// SIGTERM or SIGINT: tell systemd, withdraw what was advertised, then exit.
    pub fn handle_stop_requested(&mut self, now: Instant) {
        if self.phase == Phase::Stopping {
            return;
        }
        self.phase = Phase::Stopping;
        let status = "stopping: withdrawing advertised services".to_string();
        self.last_status = Some(status.clone());
        self.commands.push_back(Command::Notify(vec![
            NotifyMsg::Stopping,
            NotifyMsg::Status(status),
        ]));
        self.commands.push_back(Command::Withdraw);
        let _ = now;
    }

    /// Withdrawal finished (or gave up); the process exits 0 either way, because a stop
    /// requested by the operator is not a failure.
    pub fn handle_withdrawn(&mut self, error: Option<String>, now: Instant) {
        self.unadvertise();
        if let Some(error) = error {
            self.record_error("withdraw", one_line(&error), now);
        }
        self.commands.push_back(Command::Exit(0));
    }

    /// The error a failed component shows, if it is failed.
    pub fn error(&self, component: Component) -> Option<&str> {
        match &self.slots[component.index()] {
            Slot::Failed { error, .. } => Some(error),
            Slot::Pending { .. } | Slot::Up { .. } => None,
        }
    }

    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    pub fn view(&self, now: Instant) -> CoreView {
        CoreView {
            phase: self.phase,
            ready: self.is_ready(),
            status: self.status_text(),
            components: Component::ALL
                .iter()
                .map(|&component| self.slots[component.index()].view(component, now))
                .collect(),
            last_errors: self.errors.iter().cloned().collect(),
            reload_note: self.reload_note.clone(),
            mesh: self.mesh.clone(),
            inventory: self.inventory.clone(),
            advertised: self.advertised,
            health: self.health.views(&self.published),
        }
    }

    /// The one-line summary that goes to STATUS= and the status API.
    pub fn status_text(&self) -> String {
        if self.phase == Phase::Stopping {
            return "stopping: withdrawing advertised services".into();
        }
        let mesh = &self.slots[Component::Mesh.index()];
        let gpu = &self.slots[Component::Gpu.index()];
        let services = &self.slots[Component::Services.index()];
        let mesh_part = match mesh {
            Slot::Up { summary, .. } => summary.clone(),
            Slot::Pending { .. } => "joining mesh".into(),
            Slot::Failed { .. } => failed_part("mesh", mesh),
        };
        let gpu_part = match gpu {
            Slot::Up { summary, .. } => summary.clone(),
            Slot::Pending { .. } => "probing GPUs".into(),
            Slot::Failed { .. } => failed_part("GPUs", gpu),
        };
        let services_part = match services {
            Slot::Up { summary, .. } => self.services_summary(summary),
            Slot::Failed { .. } => failed_part("services", services),
            Slot::Pending { .. } if self.publish_held => {
                "services wait for their first health checks".into()
            }
            Slot::Pending { .. } if mesh.is_up() => "publishing services".into(),
            Slot::Pending { .. } => "services wait for the mesh".into(),
        };
        let mut text = format!("{}: {mesh_part}, {gpu_part}, {services_part}", self.phase);
        if let Some(note) = &self.reload_note {
            text.push_str("; ");
            text.push_str(note);
        }
        text
    }

    /// The services part of STATUS= once published: what is advertised, then what is not
    /// and why ("advertising gateway; molt-provider unhealthy (connect refused)").
    fn services_summary(&self, published: &str) -> String {
        let unhealthy = self.health.status_part();
        if unhealthy.is_empty() {
            return published.to_owned();
        }
        let advertised = self.health.advertised();
        let mut text = if advertised.is_empty() {
            "advertising nothing".to_owned()
        } else {
            let names: Vec<&str> = advertised.iter().map(ServiceName::as_str).collect();
            format!("advertising {}", names.join(", "))
        };
        text.push_str("; ");
        text.push_str(&unhealthy);
        text
    }

    /// Publish again because the set of healthy services changed: a recheck while published,
    /// a new attempt if publishing failed, nothing while the mesh is down (the publish after
    /// it comes up carries the healthy set then).
    fn republish(&mut self) {
        if self.phase == Phase::Stopping
            || !self.slots[Component::Mesh.index()].is_up()
            || self.publish_held
        {
            // Off the mesh, or the first publish is held: it carries the healthy set when it runs.
            return;
        }
        let index = Component::Services.index();
        let slot = &self.slots[index];
        if slot.awaiting_result() {
            // The attempt running may carry the old set; one more follows it.
            self.recheck_pending[index] = true;
            return;
        }
        match slot {
            Slot::Up { .. } => self.recheck(Component::Services),
            Slot::Failed { .. } | Slot::Pending { .. } => self.start(Component::Services),
        }
    }

    /// Sends the health checks that are due.
    fn issue_checks(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Starting | Phase::Stopping) {
            return;
        }
        for request in self.health.poll_checks(now) {
            self.commands.push_back(Command::Check(request));
        }
    }

    /// Is this result for the attempt now running, and does anyone still want it?
    fn accepts(&self, component: Component, generation: u64) -> bool {
        self.phase != Phase::Stopping && self.generations[component.index()] == generation
    }

    fn judge_gpus(&mut self, inventory: GpuInventory, now: Instant, jitter: u32) {
        let usable = inventory.gpus.iter().any(|g| !g.lost);
        let summary = inventory.summary();
        let why = inventory
            .unavailable
            .as_ref()
            .map(|u| format!("{}: {}", u.reason, u.detail));
        if self.health.handle_inventory(&inventory, now) {
            self.republish();
        }
        self.inventory = Some(inventory);
        if !usable && self.gpu_required {
            let why = why.unwrap_or_else(|| "no GPUs".into());
            let error =
                format!("GPUs are required ([gpu] required = true) but none were found: {why}");
            self.fail(Component::Gpu, error, Retry::Transient, now, jitter);
            return;
        }
        self.component_up(Component::Gpu, summary, now);
    }

    fn component_up(&mut self, component: Component, summary: String, now: Instant) {
        let index = component.index();
        let was_up = self.slots[index].is_up();
        self.slots[index] = Slot::Up {
            summary: one_line(&summary),
            rechecking: false,
        };
        if std::mem::take(&mut self.recheck_pending[index]) {
            self.recheck(component);
        }
        let services_up = self.slots[Component::Services.index()].is_up();
        if component == Component::Mesh && !(was_up && services_up) {
            if self.health.undecided() && now < self.first_decision_by {
                self.publish_held = true;
                self.reset(Component::Services);
            } else {
                self.start(Component::Services);
            }
        }
        self.update(now);
    }

    fn fail(
        &mut self,
        component: Component,
        error: String,
        retry: Retry,
        now: Instant,
        jitter: u32,
    ) {
        let error = one_line(&error);
        let index = component.index();
        let attempts = match &self.slots[index] {
            Slot::Failed { attempts, .. } => attempts.saturating_add(1),
            Slot::Pending { .. } | Slot::Up { .. } => 1,
        };
        // A failure has its own schedule; an outside change seen meanwhile does not hurry it.
        self.recheck_pending[index] = false;
        let delay = match retry {
            Retry::Transient => self.backoff.delay(attempts, jitter),
            Retry::NeedsOperator => OPERATOR_RECHECK.delay(attempts, jitter),
        };
        self.slots[index] = Slot::Failed {
            error: error.clone(),
            retry,
            attempts,
            next: Next::At(now + delay),
        };
        self.record_error(component.as_str(), error, now);
        match component {
            Component::Mesh => {
                // Nothing is published while the node is off the mesh; republish once it is back.
                self.mesh = None;
                self.unadvertise();
                self.reset(Component::Services);
            }
            Component::Services => self.unadvertise(),
            Component::Gpu => {}
        }
        self.update(now);
    }

    /// The provider no longer holds (or may no longer hold) what was published.
    fn unadvertise(&mut self) {
        self.advertised = false;
        self.published.clear();
    }

    /// Run the bring-up again while the component stays up.
    fn recheck(&mut self, component: Component) {
        let index = component.index();
        self.recheck_pending[index] = false;
        self.generations[index] += 1;
        if let Slot::Up { rechecking, .. } = &mut self.slots[index] {
            *rechecking = true;
        }
        self.commands.push_back(Command::Start {
            component,
            generation: self.generations[index],
        });
    }

    fn start(&mut self, component: Component) {
        let index = component.index();
        self.recheck_pending[index] = false;
        self.generations[index] += 1;
        let slot = &mut self.slots[index];
        match slot {
            // A retry keeps the failure on show until it succeeds.
            Slot::Failed { next, .. } => *next = Next::Running,
            Slot::Pending { .. } | Slot::Up { .. } => *slot = Slot::Pending { started: true },
        }
        self.commands.push_back(Command::Start {
            component,
            generation: self.generations[index],
        });
    }

    /// Back to Pending with no work in flight; a late result of the old generation is ignored.
    fn reset(&mut self, component: Component) {
        let index = component.index();
        self.recheck_pending[index] = false;
        self.generations[index] += 1;
        self.slots[index] = Slot::Pending { started: false };
    }

    fn record_error(&mut self, source: &'static str, message: String, now: Instant) {
        if self.errors.len() == MAX_ERRORS {
            self.errors.pop_front();
        }
        self.errors.push_back(ErrorRecord {
            source,
            message,
            at: now,
        });
    }

    fn compute_phase(&self) -> Phase {
        if self.phase == Phase::Stopping {
            return Phase::Stopping;
        }
        if self.phase == Phase::Starting {
            return Phase::Starting;
        }
        if self.slots.iter().all(Slot::is_up) {
            return Phase::Ready;
        }
        if self.ever_ready && self.slots.iter().any(Slot::is_failed) {
            return Phase::Degraded;
        }
        Phase::Joining
    }

    fn reload_settled(&self, components: &[Component]) -> bool {
        let mesh_failed = self.slots[Component::Mesh.index()].is_failed();
        components.iter().all(|&c| match &self.slots[c.index()] {
            Slot::Pending { .. } => c == Component::Services && mesh_failed,
            Slot::Up { rechecking, .. } => !rechecking,
            Slot::Failed { next, .. } => *next != Next::Running,
        })
    }

    fn finish_reload(&mut self, now: Instant) {
        let notified = match &self.reload {
            Reload::Loading { notified } | Reload::Settling { notified, .. } => *notified,
            Reload::Idle => false,
        };
        self.reload = Reload::Idle;
        self.phase = self.compute_phase();
        let first_ready = self.phase == Phase::Ready && !self.ever_ready;
        if first_ready {
            self.ever_ready = true;
        }
        let status = self.status_text();
        self.last_status = Some(status.clone());
        // A reload before the first READY=1 may settle with everything up: that READY=1 is
        // the first one, and systemd is still waiting for it.
        let msgs = if notified || first_ready {
            vec![NotifyMsg::Ready, NotifyMsg::Status(status)]
        } else {
            vec![NotifyMsg::Status(status)]
        };
        self.commands.push_back(Command::Notify(msgs));
        let _ = now;
    }

    /// Recompute the phase and tell systemd what changed.
    fn update(&mut self, now: Instant) {
        for change in self.health.take_changes() {
            self.commands.push_back(Command::HealthChanged {
                service: change.service,
                healthy: change.healthy,
                reason: change.reason,
            });
        }
        if self.publish_held && (!self.health.undecided() || now >= self.first_decision_by) {
            self.publish_held = false;
            let mesh_up = self.slots[Component::Mesh.index()].is_up();
            let services = &self.slots[Component::Services.index()];
            if self.phase != Phase::Stopping
                && mesh_up
                && matches!(services, Slot::Pending { started: false })
            {
                self.start(Component::Services);
            }
        }
        if let Reload::Settling { components, .. } = &self.reload
            && self.reload_settled(components)
        {
            self.finish_reload(now);
            return;
        }
        if matches!(self.reload, Reload::Loading { .. }) {
            // The reply to RELOADING=1 comes when the new config is accepted or rejected.
            return;
        }
        let phase = self.compute_phase();
        let first_ready = phase == Phase::Ready && !self.ever_ready;
        self.phase = phase;
        if first_ready {
            self.ever_ready = true;
        }
        let status = self.status_text();
        if matches!(self.reload, Reload::Settling { .. }) && !first_ready {
            // Keep systemd's view steady until the reload has settled.
            return;
        }
        if !first_ready && self.last_status.as_deref() == Some(status.as_str()) {
            return;
        }
        self.last_status = Some(status.clone());
        let mut msgs = Vec::with_capacity(2);
        if first_ready {
            msgs.push(NotifyMsg::Ready);
        }
        msgs.push(NotifyMsg::Status(status));
        self.commands.push_back(Command::Notify(msgs));
    }
}

/// One component's health. Each state carries only what makes sense in it, so "up with a
/// retry scheduled" cannot be represented.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Slot {
    /// Not up yet, never failed since it was last reset; `started` while a bring-up runs.
    Pending { started: bool },
    /// Up; `rechecking` while a recheck runs (it stays up meanwhile).
    Up { summary: String, rechecking: bool },
    /// Failed `attempts` times in a row; the failure stays on show while a retry runs.
    Failed {
        error: String,
        retry: Retry,
        attempts: u32,
        next: Next,
    },
}

/// What happens next to a failed component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// A retry is scheduled for then.
    At(Instant),
    /// A retry is running.
    Running,
}

impl Default for Slot {
    fn default() -> Self {
        Slot::Pending { started: false }
    }
}

impl Slot {
    fn is_up(&self) -> bool {
        matches!(self, Slot::Up { .. })
    }

    fn is_failed(&self) -> bool {
        matches!(self, Slot::Failed { .. })
    }

    fn waiting_for_operator(&self) -> bool {
        matches!(
            self,
            Slot::Failed {
                retry: Retry::NeedsOperator,
                ..
            }
        )
    }

    /// A bring-up runs whose result has not come back.
    fn awaiting_result(&self) -> bool {
        match self {
            Slot::Pending { started } => *started,
            Slot::Up { rechecking, .. } => *rechecking,
            Slot::Failed { next, .. } => *next == Next::Running,
        }
    }

    fn retry_at(&self) -> Option<Instant> {
        match self {
            Slot::Failed {
                next: Next::At(at), ..
            } => Some(*at),
            Slot::Failed { .. } | Slot::Pending { .. } | Slot::Up { .. } => None,
        }
    }

    fn view(&self, component: Component, now: Instant) -> ComponentView {
        let (state, summary, error, attempts) = match self {
            Slot::Pending { .. } => (ComponentState::Pending, None, None, 0),
            Slot::Up { summary, .. } => (ComponentState::Up, Some(summary.clone()), None, 0),
            Slot::Failed {
                error, attempts, ..
            } => (ComponentState::Failed, None, Some(error.clone()), *attempts),
        };
        ComponentView {
            component,
            state,
            summary,
            error,
            waiting_for_operator: self.waiting_for_operator(),
            attempts,
            retry_in: self.retry_at().map(|at| at.saturating_duration_since(now)),
        }
    }
}

#[derive(Debug)]
struct Watchdog {
    interval: Duration,
    next: Instant,
}

#[derive(Debug)]
enum Reload {
    Idle,
    /// SIGHUP seen; waiting for the shell to read and validate the file.
    Loading {
        notified: bool,
    },
    /// New config accepted; waiting for changed components to settle before READY=1.
    Settling {
        notified: bool,
        components: Vec<Component>,
    },
}

fn failed_part(what: &str, slot: &Slot) -> String {
    let Slot::Failed {
        error,
        retry,
        attempts,
        ..
    } = slot
    else {
        return format!("{what} failed");
    };
    match retry {
        Retry::Transient => format!("{what} failed: {error} (attempt {attempts}, retrying)"),
        Retry::NeedsOperator => format!("{what} waiting for operator: {error}"),
    }
}

/// STATUS= is line-based, so anything multi-line is folded, and long text is cut.
fn one_line(text: &str) -> String {
    fold_and_cut(text, MAX_ERROR_CHARS)
}

/// `text` on one line (control characters become spaces), trimmed, and cut at `max`
/// characters with an ellipsis.
pub(crate) fn fold_and_cut(text: &str, max: usize) -> String {
    let folded: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let trimmed = folded.trim();
    if trimmed.chars().count() <= max {
        return trimmed.to_string();
    }
    let mut cut: String = trimmed.chars().take(max).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CheckKind;
    use crate::core::health::HealthState;
    use proptest::prelude::*;

    /// Drives the core like the shell does and remembers what it was told.
    struct Harness {
        sup: Supervisor,
        now: Instant,
        generations: [u64; 3],
        notified: Vec<NotifyMsg>,
        withdraws: usize,
        exit: Option<u8>,
        checks: Vec<CheckRequest>,
        /// `Command::HealthChanged` as (service, healthy, reason).
        health_changes: Vec<(String, bool, Option<String>)>,
        started: Vec<Component>,
        config: Option<Config>,
    }

    /// "wireguard claw0 10.100.0.5/16" back into the mesh status it summarises.
    fn mesh_status(summary: &str) -> MeshStatus {
        let mut words = summary.split(' ').map(str::to_string);
        MeshStatus {
            provider: words.next().unwrap_or_default(),
            interface: words.next(),
            address: words.next(),
            peers: 0,
            problems: Vec::new(),
            gateway: None,
        }
    }

    use crate::core::model::test_inventory as inventory;

    fn ads(names: &[&str]) -> Vec<ServiceAd> {
        names
            .iter()
            .map(|name| ServiceAd {
                name: (*name).into(),
                port: 8443,
                protocol: "tcp".into(),
            })
            .collect()
    }

    impl Harness {
        fn new(watchdog: Option<Duration>) -> Self {
            Self::with_gpus_required(watchdog, false)
        }

        fn with_gpus_required(watchdog: Option<Duration>, required: bool) -> Self {
            // Any instant will do as the start; the core itself never reads the clock.
            #[allow(clippy::disallowed_methods)]
            let now = Instant::now();
            Self {
                sup: Supervisor::new(
                    Backoff::DEFAULT,
                    watchdog,
                    required,
                    Health::new(&BTreeMap::new(), &GpuConfig::default(), now),
                    now,
                ),
                now,
                generations: [0; 3],
                notified: Vec::new(),
                withdraws: 0,
                exit: None,
                checks: Vec::new(),
                health_changes: Vec::new(),
                started: Vec::new(),
                config: None,
            }
        }

        fn drain(&mut self) {
            while let Some(cmd) = self.sup.poll_command() {
                match cmd {
                    Command::Notify(msgs) => self.notified.extend(msgs),
                    Command::Start {
                        component,
                        generation,
                    } => {
                        self.generations[component.index()] = generation;
                        self.started.push(component);
                    }
                    Command::Withdraw => self.withdraws += 1,
                    Command::Check(request) => self.checks.push(request),
                    Command::HealthChanged {
                        service,
                        healthy,
                        reason,
                    } => self
                        .health_changes
                        .push((service.to_string(), healthy, reason)),
                    Command::Exit(code) => self.exit = Some(code),
                }
            }
        }

        fn start(&mut self) {
            self.sup.handle_started(self.now);
            self.drain();
        }

        fn mesh_up(&mut self, summary: &str) {
            let g = self.generations[Component::Mesh.index()];
            self.sup.handle_mesh_up(g, mesh_status(summary), self.now);
            self.drain();
        }

        fn gpus_probed(&mut self, inventory: GpuInventory) {
            let g = self.generations[Component::Gpu.index()];
            self.sup.handle_gpu_probed(g, inventory, self.now, 1 << 31);
            self.drain();
        }

        fn published(&mut self, names: &[&str]) {
            let g = self.generations[Component::Services.index()];
            self.sup.handle_published(g, &ads(names), self.now);
            self.drain();
        }

        /// Any component up, with a stand-in result.
        fn up(&mut self, c: Component) {
            match c {
                Component::Mesh => self.mesh_up("wireguard claw0 10.100.0.5/16"),
                Component::Gpu => self.gpus_probed(inventory(2, 0)),
                Component::Services => self.published(&["molt-provider"]),
            }
        }

        fn fail(&mut self, c: Component, error: &str) {
            self.fail_with(c, error, Retry::Transient);
        }

        fn fail_with(&mut self, c: Component, error: &str, retry: Retry) {
            let g = self.generations[c.index()];
            let failure = match retry {
                Retry::Transient => Failure::transient(error),
                Retry::NeedsOperator => Failure::needs_operator(error),
            };
            self.sup
                .handle_component_failed(c, g, failure, self.now, 1 << 31);
            self.drain();
        }

        fn advance(&mut self, d: Duration) {
            self.now += d;
            self.sup.handle_timeout(self.now);
            self.drain();
        }

        fn all_up(&mut self) {
            self.mesh_up("wireguard claw0 10.100.0.5/16");
            self.gpus_probed(inventory(2, 0));
            self.published(&["molt-provider"]);
        }

        fn reload(&mut self, plan: &ReloadPlan) {
            self.sup.handle_reload_requested(1, self.now);
            self.sup.handle_reload_applied(plan, self.now);
            self.drain();
        }

        fn take(&mut self) -> Vec<NotifyMsg> {
            std::mem::take(&mut self.notified)
        }

        fn readies(&self) -> usize {
            self.notified
                .iter()
                .filter(|m| **m == NotifyMsg::Ready)
                .count()
        }
    }

    fn status(text: &str) -> NotifyMsg {
        NotifyMsg::Status(text.into())
    }

    #[test]
    fn normal_start_reports_ready_once_with_a_one_line_summary() {
        let mut h = Harness::new(None);
        h.start();
        assert_eq!(h.sup.phase(), Phase::Joining);
        h.all_up();
        assert!(h.sup.is_ready());
        assert_eq!(h.readies(), 1);
        let last = h.notified.iter().rev().take(2).cloned().collect::<Vec<_>>();
        assert_eq!(
            last,
            vec![
                status("ready: wireguard claw0 10.100.0.5/16, 2 GPUs, advertising molt-provider"),
                NotifyMsg::Ready,
            ]
        );
    }

    #[test]
    fn a_node_on_its_cached_gateway_peer_set_stays_ready_and_says_so_in_status() {
        let mut h = Harness::new(None);
        h.start();
        h.all_up();
        h.take();
        h.sup.handle_recheck(Component::Mesh, h.now);
        h.drain();
        let g = h.generations[Component::Mesh.index()];
        let mut mesh = mesh_status("wireguard claw0 10.100.0.3/16");
        mesh.gateway =
            Some("on cached peer set since 2026-11-30T14:00:00Z (gateway unreachable)".into());
        h.sup.handle_mesh_up(g, mesh, h.now);
        h.drain();
        assert!(h.sup.is_ready());
        assert_eq!(h.readies(), 0);
        assert!(
            h.notified.contains(&status(
                "ready: wireguard claw0 10.100.0.3/16, on cached peer set since 2026-11-30T14:00:00Z (gateway unreachable), 2 GPUs, advertising molt-provider"
            )),
            "{:?}",
            h.notified
        );
    }

    #[test]
    fn node_is_not_ready_until_services_are_published() {
        let mut h = Harness::new(None);
        h.start();
        h.mesh_up("wireguard claw0 10.100.0.5/16");
        h.gpus_probed(inventory(0, 0));
        assert!(!h.sup.is_ready());
        assert_eq!(h.readies(), 0);
        assert!(h.sup.status_text().contains("publishing services"));
    }

    #[test]
    fn services_are_published_only_after_the_mesh_is_up() {
        let mut h = Harness::new(None);
        h.start();
        assert_eq!(h.generations[Component::Services.index()], 0);
        h.mesh_up("mesh");
        assert_eq!(h.generations[Component::Services.index()], 1);
    }

    #[test]
    fn failing_mesh_keeps_retrying_within_the_cap_and_errors_stay_bounded() {
        let mut h = Harness::new(None);
        h.start();
        for i in 0..1000 {
            h.fail(Component::Mesh, &format!("netlink said no #{i}"));
            let wake = h.sup.poll_timeout().expect("a retry is scheduled");
            assert!(wake - h.now <= Backoff::DEFAULT.cap());
            h.now = wake;
            h.sup.handle_timeout(h.now);
            h.drain();
        }
        assert_eq!(h.generations[Component::Mesh.index()], 1001);
        let view = h.sup.view(h.now);
        assert_eq!(view.last_errors.len(), MAX_ERRORS);
        assert_eq!(view.components[0].attempts, 1000);
        assert!(h.sup.status_text().contains("netlink said no #999"));
        assert_eq!(h.readies(), 0);
    }

    #[test]
    fn a_late_result_from_a_superseded_attempt_is_ignored() {
        let mut h = Harness::new(None);
        h.start();
        let old = h.generations[Component::Mesh.index()];
        h.fail(Component::Mesh, "timeout");
        h.advance(Duration::from_secs(60));
        assert_ne!(old, h.generations[Component::Mesh.index()]);
        h.sup.handle_mesh_up(old, mesh_status("stale"), h.now);
        h.drain();
        assert_eq!(
            h.sup.view(h.now).components[0].state,
            ComponentState::Failed
        );
    }

    #[test]
    fn losing_the_mesh_after_ready_degrades_and_republishes_without_a_second_ready() {
        let mut h = Harness::new(None);
        h.start();
        h.all_up();
        h.take();
        h.fail(Component::Mesh, "interface deleted");
        assert_eq!(h.sup.phase(), Phase::Degraded);
        let msgs = h.take();
        assert!(
            matches!(&msgs[..], [NotifyMsg::Status(s)] if s.starts_with("degraded: mesh failed: interface deleted"))
        );
        h.advance(Duration::from_secs(60));
        h.mesh_up("wireguard claw0 10.100.0.5/16");
        assert!(!h.sup.is_ready(), "services must be republished first");
        h.published(&["molt-provider"]);
        assert!(h.sup.is_ready());
        assert_eq!(h.readies(), 0);
    }

    #[test]
    fn good_reload_sends_reloading_then_ready_and_restarts_only_what_changed() {
        let mut h = Harness::new(None);
        h.start();
        h.all_up();
        h.take();
        let gens = h.generations;
        h.sup.handle_reload_requested(123_456, h.now);
        h.drain();
        h.sup.handle_reload_applied(&ReloadPlan::default(), h.now);
        h.drain();
        assert_eq!(h.generations, gens, "nothing changed, nothing restarts");
        assert_eq!(
            h.take(),
            vec![
                NotifyMsg::Reloading {
                    monotonic_usec: 123_456
                },
                status("reloading configuration"),
                NotifyMsg::Ready,
                status("ready: wireguard claw0 10.100.0.5/16, 2 GPUs, advertising molt-provider"),
            ]
        );
    }

    #[test]
    fn reload_that_changes_the_mesh_answers_ready_after_the_rejoin() {
        let mut h = Harness::new(None);
        h.start();
        h.all_up();
        h.take();
        h.reload(&ReloadPlan {
            changed: vec![Component::Mesh],
            ..ReloadPlan::default()
        });
        assert_eq!(
            h.generations[Component::Gpu.index()],
            1,
            "GPU probe untouched"
        );
        assert_eq!(h.readies(), 0);
        h.mesh_up("wireguard claw1 10.100.0.6/16");
        assert_eq!(h.readies(), 1);
        assert!(h.sup.status_text().contains("claw1"));
    }

    #[test]
    fn bad_reload_keeps_the_old_config_and_says_why() {
        let mut h = Harness::new(None);
        h.start();
        h.all_up();
        h.take();
        let gens = h.generations;
        h.sup.handle_reload_requested(7, h.now);
        h.sup.handle_reload_rejected(
            "clawbernetes.toml:3:7: network.wireguard.mtu: expected 1280..=9000".into(),
            h.now,
        );
        h.drain();
        assert_eq!(h.generations, gens);
        assert!(h.sup.is_ready());
        let msgs = h.take();
        assert_eq!(msgs[0], NotifyMsg::Reloading { monotonic_usec: 7 });
        assert_eq!(msgs[2], NotifyMsg::Ready);
        let NotifyMsg::Status(text) = &msgs[3] else {
            panic!("expected STATUS, got {msgs:?}")
        };
        assert!(text.starts_with("ready: "));
        assert!(text.contains("reload rejected, previous config kept"));
        assert!(text.contains("network.wireguard.mtu"));
        assert_eq!(h.sup.view(h.now).last_errors[0].source, "config");
    }

    #[test]
    fn a_reload_before_the_first_ready_that_settles_with_everything_up_sends_ready() {
        let mut h = Harness::new(None);
        h.start();
        h.mesh_up("wireguard claw0 10.100.0.5/16");
        h.gpus_probed(inventory(2, 0));
        h.reload(&ReloadPlan {
            changed: vec![Component::Services],
            ..ReloadPlan::default()
        });
        h.published(&["molt-provider"]);
        assert!(h.sup.is_ready());
        assert_eq!(h.readies(), 1);
    }

    #[test]
    fn reload_before_the_first_ready_does_not_claim_readiness() {
        let mut h = Harness::new(None);
        h.start();
        h.reload(&ReloadPlan {
            changed: vec![Component::Gpu],
            ..ReloadPlan::default()
        });
        assert_eq!(h.readies(), 0);
        assert!(
            !h.notified
                .iter()
                .any(|m| matches!(m, NotifyMsg::Reloading { .. }))
        );
    }

    #[test]
    fn stop_withdraws_then_exits_zero_and_ignores_late_events() {
        let mut h = Harness::new(None);
        h.start();
        h.all_up();
        h.take();
        h.sup.handle_stop_requested(h.now);
        h.drain();
        assert_eq!(h.withdraws, 1);
        assert_eq!(h.take()[0], NotifyMsg::Stopping);
        h.fail(Component::Mesh, "late");
        h.sup.handle_stop_requested(h.now);
        h.drain();
        assert_eq!(h.withdraws, 1);
        assert!(h.take().is_empty());
        h.sup.handle_withdrawn(None, h.now);
        h.drain();
        assert_eq!(h.exit, Some(0));
    }

    #[test]
    fn watchdog_pings_at_its_interval_and_nothing_wakes_an_idle_node_otherwise() {
        let mut h = Harness::new(Some(Duration::from_secs(5)));
        h.start();
        h.all_up();
        h.take();
        assert_eq!(h.sup.poll_timeout(), Some(h.now + Duration::from_secs(5)));
        h.advance(Duration::from_secs(5));
        assert_eq!(h.take(), vec![NotifyMsg::Watchdog]);
        h.advance(Duration::from_secs(1));
        assert!(h.take().is_empty());

        let mut idle = Harness::new(None);
        idle.start();
        idle.all_up();
        assert_eq!(idle.sup.poll_timeout(), None);
    }

    #[test]
    fn a_recheck_that_finds_nothing_wrong_changes_nothing_systemd_sees() {
        let mut h = Harness::new(None);
        h.start();
        h.all_up();
        h.take();
        let services_gen = h.generations[Component::Services.index()];
        h.sup.handle_recheck(Component::Mesh, h.now);
        h.drain();
        assert_eq!(h.generations[Component::Mesh.index()], 2);
        assert!(h.sup.is_ready(), "stays ready while the check runs");
        h.sup.handle_recheck(Component::Mesh, h.now);
        h.drain();
        assert_eq!(
            h.generations[Component::Mesh.index()],
            2,
            "one check at a time"
        );
        h.mesh_up("wireguard claw0 10.100.0.5/16");
        assert!(h.take().is_empty());
        assert_eq!(h.generations[Component::Services.index()], services_gen);
    }

    #[test]
    fn a_change_seen_while_a_join_runs_is_looked_at_again_when_the_join_is_done() {
        let mut h = Harness::new(None);
        h.start();
        h.all_up();
        h.sup.handle_recheck(Component::Mesh, h.now);
        h.drain();
        let running = h.generations[Component::Mesh.index()];
        // A peers.d edit lands while that reconcile runs: it may have read the old file.
        h.sup.handle_recheck(Component::Mesh, h.now);
        h.drain();
        assert_eq!(h.generations[Component::Mesh.index()], running);
        h.mesh_up("wireguard claw0 10.100.0.5/16");
        assert_eq!(
            h.generations[Component::Mesh.index()],
            running + 1,
            "the pending recheck runs as soon as the reconcile is done"
        );
        assert!(h.sup.is_ready());
        h.mesh_up("wireguard claw0 10.100.0.5/16");
        assert_eq!(
            h.generations[Component::Mesh.index()],
            running + 1,
            "and once"
        );
    }

    #[test]
    fn a_change_seen_during_a_failing_join_does_not_hurry_its_backoff() {
        let mut h = Harness::new(None);
        h.start();
        h.sup.handle_recheck(Component::Mesh, h.now);
        h.drain();
        h.fail(Component::Mesh, "EBUSY");
        let wake = h.sup.poll_timeout().expect("a retry is scheduled");
        assert!(wake > h.now, "retried on its schedule, not at once");
        h.advance(wake - h.now);
        h.mesh_up("wireguard claw0 10.100.0.5/16");
        assert_eq!(
            h.generations[Component::Mesh.index()],
            2,
            "no extra recheck"
        );
    }

    #[test]
    fn a_reload_that_touches_the_network_keeps_the_node_ready_while_it_rejoins() {
        let mut h = Harness::new(None);
        h.start();
        h.all_up();
        h.take();
        h.reload(&ReloadPlan {
            changed: vec![Component::Mesh, Component::Services],
            ..ReloadPlan::default()
        });
        assert!(h.sup.is_ready(), "{}", h.sup.status_text());
        assert_eq!(
            h.readies(),
            0,
            "READY=1 answers the reload once it has settled"
        );
        h.mesh_up("wireguard claw1 10.100.0.5/16");
        h.published(&["molt-provider"]);
        assert!(h.sup.is_ready());
        assert_eq!(h.readies(), 1);
        assert!(h.sup.status_text().contains("claw1"));
    }

    #[test]
    fn a_reload_that_switches_provider_rejoins_from_scratch_and_republishes() {
        let mut h = Harness::new(None);
        h.start();
        h.all_up();
        let services = h.generations[Component::Services.index()];
        h.reload(&ReloadPlan {
            changed: vec![Component::Mesh],
            replace_provider: true,
            ..ReloadPlan::default()
        });
        assert!(!h.sup.is_ready(), "the old provider has left the mesh");
        assert!(h.sup.view(h.now).mesh.is_none());
        h.mesh_up("tailscale tailscale0 100.64.0.7");
        assert_eq!(h.generations[Component::Services.index()], services + 1);
        h.published(&["molt-provider"]);
        assert!(h.sup.is_ready());
    }

    #[test]
    fn a_recheck_that_fails_degrades_and_retries_with_backoff() {
        let mut h = Harness::new(None);
        h.start();
        h.all_up();
        h.sup.handle_recheck(Component::Mesh, h.now);
        h.drain();
        h.fail(Component::Mesh, "interface claw0 deleted");
        assert_eq!(h.sup.phase(), Phase::Degraded);
        assert!(h.sup.poll_timeout().is_some());
    }

    #[test]
    fn multi_line_errors_are_folded_into_one_status_line() {
        let mut h = Harness::new(None);
        h.start();
        h.fail(Component::Gpu, "line one\nline two");
        assert!(
            h.notified
                .iter()
                .all(|m| !matches!(m, NotifyMsg::Status(s) if s.contains('\n')))
        );
        assert!(h.sup.status_text().contains("line one line two"));
    }

    #[test]
    fn a_failure_that_needs_the_operator_says_so_and_is_rechecked_slowly() {
        let mut h = Harness::new(None);
        h.start();
        h.fail_with(
            Component::Mesh,
            "this device is in tailnet \"other.example\", but the config expects \"corp.example\"",
            Retry::NeedsOperator,
        );
        let text = h.sup.status_text();
        assert!(
            text.contains("mesh waiting for operator: this device is in tailnet"),
            "{text}"
        );
        assert!(!text.contains("attempt"), "{text}");
        let view = h.sup.view(h.now);
        assert!(view.components[0].waiting_for_operator);
        for _ in 0..20 {
            let wake = h.sup.poll_timeout().expect("a recheck is scheduled");
            assert!(wake - h.now >= Backoff::OPERATOR.base_delay(1) / 2);
            assert!(wake - h.now <= Backoff::OPERATOR.cap());
            h.now = wake;
            h.sup.handle_timeout(h.now);
            h.drain();
            h.fail_with(
                Component::Mesh,
                "still the wrong tailnet",
                Retry::NeedsOperator,
            );
        }
        assert_eq!(h.generations[Component::Mesh.index()], 21);
    }

    #[test]
    fn a_transient_failure_is_retried_on_its_own_schedule_not_on_outside_events() {
        let mut h = Harness::new(None);
        h.start();
        h.fail(Component::Mesh, "EBUSY");
        let generation = h.generations[Component::Mesh.index()];
        h.sup.handle_recheck(Component::Mesh, h.now);
        h.drain();
        assert_eq!(h.generations[Component::Mesh.index()], generation);
    }

    #[test]
    fn an_outside_change_or_a_reload_rechecks_what_waits_for_the_operator_at_once() {
        let mut h = Harness::new(None);
        h.start();
        h.fail_with(Component::Mesh, "tag not permitted", Retry::NeedsOperator);
        let generation = h.generations[Component::Mesh.index()];
        h.sup.handle_recheck(Component::Mesh, h.now);
        h.drain();
        assert_eq!(h.generations[Component::Mesh.index()], generation + 1);
        h.sup.handle_recheck(Component::Mesh, h.now);
        h.drain();
        assert_eq!(
            h.generations[Component::Mesh.index()],
            generation + 1,
            "one check at a time"
        );
        h.fail_with(Component::Mesh, "tag not permitted", Retry::NeedsOperator);
        h.reload(&ReloadPlan::default());
        assert_eq!(h.generations[Component::Mesh.index()], generation + 2);
        h.mesh_up("tailscale tailscale0 100.64.0.7");
        assert!(!h.sup.view(h.now).components[0].waiting_for_operator);
    }

    #[test]
    fn without_a_usable_gpu_a_node_that_requires_gpus_is_not_ready_until_one_is_back() {
        let mut h = Harness::with_gpus_required(None, true);
        h.start();
        h.mesh_up("wireguard claw0 10.100.0.5/16");
        h.published(&["molt-provider"]);
        h.gpus_probed(inventory(0, 0));
        assert!(!h.sup.is_ready());
        assert!(
            h.sup.status_text().contains(
                "GPUs are required ([gpu] required = true) but none were found: nvml_unavailable"
            ),
            "{}",
            h.sup.status_text()
        );
        h.sup.handle_gpus_changed(inventory(1, 0), h.now, 0);
        h.drain();
        assert!(h.sup.is_ready());
        h.sup.handle_gpus_changed(inventory(0, 1), h.now, 0);
        h.drain();
        assert_eq!(h.sup.phase(), Phase::Degraded);
        assert!(
            h.sup.status_text().contains("1 GPU (1 lost)")
                || h.sup.status_text().contains("no GPUs")
        );
        assert_eq!(h.sup.view(h.now).inventory, Some(inventory(0, 1)));
    }

    #[test]
    fn zero_gpus_is_a_normal_state_unless_gpus_are_required() {
        let mut h = Harness::new(None);
        h.start();
        h.all_up();
        h.sup.handle_gpus_changed(inventory(0, 2), h.now, 0);
        h.drain();
        assert!(h.sup.is_ready());
        assert!(h.sup.status_text().contains("2 GPUs (2 lost)"));
    }

    #[test]
    fn a_layout_change_while_a_probe_runs_waits_for_the_probe() {
        let mut h = Harness::with_gpus_required(None, true);
        h.start();
        h.sup.handle_gpus_changed(inventory(0, 0), h.now, 0);
        h.drain();
        assert_eq!(
            h.sup.view(h.now).components[1].state,
            ComponentState::Pending,
            "the running probe decides"
        );
        h.gpus_probed(inventory(1, 0));
        assert_eq!(h.sup.view(h.now).components[1].state, ComponentState::Up);
    }

    #[test]
    fn the_core_keeps_the_mesh_status_until_the_mesh_fails_and_advertised_until_withdrawn() {
        let mut h = Harness::new(None);
        h.start();
        h.all_up();
        let view = h.sup.view(h.now);
        assert_eq!(
            view.mesh.map(|m| m.summary()).as_deref(),
            Some("wireguard claw0 10.100.0.5/16")
        );
        assert!(view.advertised);
        h.fail(Component::Mesh, "interface deleted");
        let view = h.sup.view(h.now);
        assert!(view.mesh.is_none());
        assert!(!view.advertised);
        h.advance(Duration::from_secs(60));
        h.all_up();
        h.sup.handle_stop_requested(h.now);
        h.sup.handle_withdrawn(None, h.now);
        assert!(!h.sup.view(h.now).advertised);
    }

    fn config() -> Config {
        crate::config::example()
    }

    #[test]
    fn only_the_sections_that_changed_are_reapplied() {
        let old = config();
        let mut new = old.clone();
        assert_eq!(ReloadPlan::new(&old, &new).changed, vec![]);
        new.gpu.poll_interval = Duration::from_secs(30);
        assert_eq!(ReloadPlan::new(&old, &new).changed, vec![Component::Gpu]);
        new.services.clear();
        assert_eq!(
            ReloadPlan::new(&old, &new).changed,
            vec![Component::Gpu, Component::Services]
        );
        let mut renamed = old.clone();
        renamed.network.wireguard.mtu = 1380;
        let plan = ReloadPlan::new(&old, &renamed);
        assert_eq!(plan.changed, vec![Component::Mesh]);
        assert!(!plan.replace_provider && !plan.needs_restart && plan.log_level.is_none());
    }

    // ---- service health (issue 14) ----

    /// A node with `molt-provider` (needs GPUs, rise 2, fall 2) and `gateway` (rise 1, fall 1).
    fn with_services() -> Harness {
        let mut h = Harness::new(None);
        let text = r#"
            [node]
            name = "gpu-01"
            [network.wireguard]
            address = "10.100.0.9/16"
            [gpu]
            xid_hold = "1h"
            [services.molt-provider]
            port = 8443
            mode = "tcp"
            check = { rise = 2, fall = 2 }
            [services.gateway]
            port = 443
            mode = "tcp"
            check = { rise = 1, fall = 1 }
        "#;
        let config = crate::config::parse(std::path::Path::new("t.toml"), text).unwrap();
        h.sup = Supervisor::new(
            Backoff::DEFAULT,
            None,
            false,
            Health::new(&config.services, &config.gpu, h.now),
            h.now,
        );
        h.config = Some(config);
        h
    }

    fn svc(name: &str) -> ServiceName {
        name.parse().unwrap()
    }

    impl Harness {
        /// Answers the last check issued for `service`.
        fn checked(&mut self, service: &str, ok: bool, detail: &str) {
            let request = self
                .checks
                .iter()
                .rev()
                .find(|r| r.service.as_str() == service)
                .expect("a check was issued")
                .clone();
            let result = CheckResult {
                ok,
                detail: detail.into(),
                duration: Duration::from_millis(1),
            };
            self.sup
                .handle_check_result(&request.service, request.generation, result, self.now);
            self.drain();
        }

        /// Publishes what the core says to advertise.
        fn publish_advertisement(&mut self) {
            let names: Vec<String> = self
                .sup
                .advertisement()
                .iter()
                .map(|n| n.to_string())
                .collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            self.published(&names);
        }

        fn service_starts(&self) -> usize {
            self.started
                .iter()
                .filter(|c| **c == Component::Services)
                .count()
        }
    }

    #[test]
    fn checks_start_with_the_node_before_the_mesh_is_up() {
        let mut h = with_services();
        h.drain();
        assert!(h.checks.is_empty(), "nothing before the start");
        assert!(h.sup.poll_timeout().is_none());
        h.start();
        let names: Vec<&str> = h.checks.iter().map(|c| c.service.as_str()).collect();
        assert_eq!(names, ["gateway", "molt-provider"]);
        assert_eq!(h.sup.poll_timeout(), None, "both are running");
        h.checked("gateway", true, "connected");
        assert_eq!(h.sup.poll_timeout(), Some(h.now + Duration::from_secs(5)));
        h.advance(Duration::from_secs(5));
        assert_eq!(h.checks.len(), 3);
        assert_eq!(h.checks[2].service.as_str(), "gateway");
    }

    #[test]
    fn the_node_stays_ready_while_a_service_is_unhealthy_and_status_says_why() {
        let mut h = with_services();
        h.start();
        h.checked("gateway", true, "connected");
        h.checked("molt-provider", false, "connect refused");
        h.mesh_up("wireguard claw0 10.100.0.9/16");
        h.gpus_probed(inventory(2, 0));
        assert_eq!(h.sup.advertisement(), [svc("gateway")]);
        h.publish_advertisement();
        assert!(h.sup.is_ready());
        assert_eq!(
            h.sup.status_text(),
            "ready: wireguard claw0 10.100.0.9/16, 2 GPUs, advertising gateway; molt-provider unhealthy (connect refused)"
        );
        let view = h.sup.view(h.now);
        let states: Vec<(&str, HealthState)> = view
            .health
            .iter()
            .map(|v| (v.name.as_str(), v.state))
            .collect();
        assert_eq!(
            states,
            [
                ("gateway", HealthState::Healthy),
                ("molt-provider", HealthState::Unhealthy)
            ]
        );
        // Both down: still ready, advertising nothing.
        h.advance(Duration::from_secs(5));
        h.checked("gateway", false, "timed out after 2s");
        h.publish_advertisement();
        assert!(h.sup.is_ready());
        assert_eq!(
            h.sup.status_text(),
            "ready: wireguard claw0 10.100.0.9/16, 2 GPUs, advertising nothing; gateway unhealthy (timed out after 2s), molt-provider unhealthy (connect refused)"
        );
        assert_eq!(h.readies(), 1);
    }

    #[test]
    fn a_health_change_republishes_without_a_second_ready() {
        let mut h = with_services();
        h.start();
        h.checked("gateway", true, "connected");
        h.checked("molt-provider", true, "connected");
        h.all_up();
        h.publish_advertisement();
        assert_eq!(h.readies(), 1);
        let starts = h.service_starts();
        h.take();
        // One failure is not enough with fall = 2: nothing is republished.
        h.advance(Duration::from_secs(5));
        h.checked("molt-provider", false, "connect refused");
        assert_eq!(h.service_starts(), starts);
        h.advance(Duration::from_secs(5));
        h.checked("molt-provider", false, "connect refused");
        assert_eq!(h.service_starts(), starts + 1, "withdrawn by a republish");
        assert!(h.sup.is_ready(), "stays ready while it republishes");
        assert_eq!(h.sup.advertisement(), [svc("gateway")]);
        h.publish_advertisement();
        assert!(h.sup.is_ready());
        assert_eq!(h.readies(), 0);
        assert!(
            h.notified.contains(&status(
                "ready: wireguard claw0 10.100.0.5/16, 2 GPUs, advertising gateway; molt-provider unhealthy (connect refused)"
            )),
            "{:?}",
            h.notified
        );
    }

    #[test]
    fn a_health_change_during_a_publish_is_published_after_it() {
        let mut h = with_services();
        h.start();
        h.checked("gateway", true, "connected");
        h.checked("molt-provider", false, "connect refused");
        h.gpus_probed(inventory(1, 0));
        h.mesh_up("wireguard claw0 10.100.0.5/16");
        let starts = h.service_starts();
        assert_eq!(h.sup.advertisement(), [svc("gateway")]);
        // The publish of [gateway] is in flight when molt-provider turns healthy (rise 2).
        h.checked("molt-provider", true, "connected");
        h.checked("molt-provider", true, "connected");
        assert_eq!(h.service_starts(), starts);
        h.published(&["gateway"]);
        assert_eq!(h.service_starts(), starts + 1, "one more publish");
        assert_eq!(
            h.sup.advertisement(),
            [svc("gateway"), svc("molt-provider")]
        );
    }

    #[test]
    fn the_first_publish_waits_for_every_services_first_verdict() {
        let mut h = with_services();
        h.start();
        h.mesh_up("wireguard claw0 10.100.0.5/16");
        h.checked("gateway", true, "connected");
        assert_eq!(h.service_starts(), 0, "molt-provider has no verdict yet");
        assert!(
            h.sup
                .status_text()
                .contains("services wait for their first health checks"),
            "{}",
            h.sup.status_text()
        );
        h.checked("molt-provider", true, "connected");
        assert_eq!(h.service_starts(), 0, "and needs the first GPU probe");
        h.gpus_probed(inventory(1, 0));
        assert_eq!(h.service_starts(), 1);
        assert_eq!(
            h.sup.advertisement(),
            [svc("gateway"), svc("molt-provider")],
            "the first publish carries both, so nothing is withdrawn and re-added"
        );
    }

    #[test]
    fn the_first_publish_waits_no_longer_than_the_first_decision_wait() {
        let mut h = with_services();
        h.start();
        h.mesh_up("wireguard claw0 10.100.0.5/16");
        h.checked("gateway", true, "connected");
        h.advance(FIRST_DECISION_WAIT - Duration::from_millis(1));
        assert_eq!(h.service_starts(), 0);
        assert!(h.sup.poll_timeout() <= Some(h.sup.first_decision_by));
        h.advance(Duration::from_millis(1));
        assert_eq!(h.service_starts(), 1);
        assert_eq!(h.sup.advertisement(), [svc("gateway")]);
        h.publish_advertisement();
        let text = h.sup.status_text();
        assert!(
            text.contains("advertising gateway; molt-provider not checked yet"),
            "{text}"
        );
    }

    #[test]
    fn nothing_is_published_while_the_mesh_is_down() {
        let mut h = with_services();
        h.start();
        h.gpus_probed(inventory(1, 0));
        h.checked("gateway", true, "connected");
        h.checked("molt-provider", true, "connected");
        assert_eq!(h.service_starts(), 0);
        h.mesh_up("wireguard claw0 10.100.0.5/16");
        assert_eq!(h.service_starts(), 1);
        h.publish_advertisement();
        h.fail(Component::Mesh, "interface vanished");
        let starts = h.service_starts();
        h.advance(Duration::from_millis(1));
        h.checked("gateway", false, "connect refused");
        assert_eq!(h.service_starts(), starts, "no publish while off the mesh");
        // The publish after the rejoin carries the healthy set then.
        h.advance(Duration::from_secs(60));
        h.mesh_up("wireguard claw0 10.100.0.5/16");
        assert_eq!(h.service_starts(), starts + 1);
        assert_eq!(h.sup.advertisement(), [svc("molt-provider")]);
    }

    #[test]
    fn a_failed_publish_is_retried_at_once_when_health_changes() {
        let mut h = with_services();
        h.start();
        h.checked("gateway", true, "connected");
        h.all_up();
        h.fail(Component::Services, "tailscaled restarting");
        let starts = h.service_starts();
        h.gpus_probed(inventory(1, 0));
        h.checked("molt-provider", true, "connected");
        assert_eq!(h.service_starts(), starts + 1);
    }

    #[test]
    fn stale_check_results_are_ignored_after_a_reload_changes_the_check() {
        let mut h = with_services();
        h.start();
        let old = h.checks.clone();
        let mut config = h.config.clone().unwrap();
        config.services.get_mut(&svc("gateway")).unwrap().check.kind = CheckKind::Tcp {
            target: ([127, 0, 0, 1], 444).into(),
        };
        let plan = ReloadPlan::new(h.config.as_ref().unwrap(), &config);
        assert_eq!(plan.changed, vec![], "a check is not published");
        h.reload(&plan);
        assert_eq!(h.checks.len(), 3, "the changed check runs again at once");
        assert_eq!(h.checks[2].service.as_str(), "gateway");
        let old_gateway = &old[0];
        let result = CheckResult {
            ok: true,
            detail: "connected".into(),
            duration: Duration::ZERO,
        };
        h.sup
            .handle_check_result(&old_gateway.service, old_gateway.generation, result, h.now);
        h.drain();
        assert!(h.sup.advertisement().is_empty());
        h.checked("gateway", true, "connected");
        assert_eq!(h.sup.advertisement(), [svc("gateway")]);
    }

    #[test]
    fn an_xid_withdraws_services_that_need_gpus_and_a_reload_clears_the_hold() {
        let mut h = with_services();
        h.start();
        h.checked("gateway", true, "connected");
        h.checked("molt-provider", true, "connected");
        h.all_up();
        h.publish_advertisement();
        let starts = h.service_starts();
        // inventory(2, 0) from all_up: both GPUs must be held.
        h.sup.handle_xid(XidEvent { index: 0, code: 79 }, h.now);
        h.drain();
        assert_eq!(h.service_starts(), starts);
        h.sup.handle_xid(XidEvent { index: 1, code: 79 }, h.now);
        h.drain();
        assert_eq!(h.service_starts(), starts + 1);
        assert_eq!(h.sup.advertisement(), [svc("gateway")]);
        h.publish_advertisement();
        assert!(h.sup.status_text().ends_with(
            "advertising gateway; molt-provider unhealthy (no usable GPU: GPU 0 held after XID 79, GPU 1 held after XID 79)"
        ), "{}", h.sup.status_text());
        // The operator reset the GPU and reloads with an unchanged file.
        let config = h.config.clone().unwrap();
        h.reload(&ReloadPlan::new(&config, &config));
        assert_eq!(h.service_starts(), starts + 2);
        assert_eq!(
            h.sup.advertisement(),
            [svc("gateway"), svc("molt-provider")]
        );
        h.publish_advertisement();
        assert!(h.sup.is_ready());
    }

    #[test]
    fn an_xid_hold_ends_on_its_own_after_xid_hold() {
        let mut h = with_services();
        h.start();
        h.checked("molt-provider", true, "connected");
        h.gpus_probed(inventory(1, 0));
        h.sup.handle_xid(XidEvent { index: 0, code: 48 }, h.now);
        h.drain();
        assert!(h.sup.advertisement().is_empty());
        h.advance(Duration::from_secs(3599));
        assert!(h.sup.advertisement().is_empty());
        h.advance(Duration::from_secs(1));
        assert_eq!(h.sup.advertisement(), [svc("molt-provider")]);
    }

    #[test]
    fn a_stopping_node_issues_no_checks_and_ignores_results() {
        let mut h = with_services();
        h.start();
        h.checked("gateway", true, "connected");
        h.sup.handle_stop_requested(h.now);
        h.drain();
        let issued = h.checks.len();
        assert_eq!(h.sup.poll_timeout(), None);
        h.advance(Duration::from_secs(60));
        h.checked("molt-provider", true, "connected");
        assert_eq!(h.checks.len(), issued);
        assert_eq!(h.sup.advertisement(), [svc("gateway")]);
    }

    fn advertised_in_view(h: &Harness) -> Vec<(String, bool)> {
        h.sup
            .view(h.now)
            .health
            .iter()
            .map(|v| (v.name.clone(), v.advertised))
            .collect()
    }

    fn pairs(list: &[(&str, bool)]) -> Vec<(String, bool)> {
        list.iter().map(|(n, a)| (n.to_string(), *a)).collect()
    }

    #[test]
    fn each_change_of_a_services_health_is_reported_once_for_the_log() {
        let mut h = with_services();
        h.start();
        h.checked("gateway", true, "connected");
        h.checked("molt-provider", true, "connected");
        // molt-provider waits for the first GPU probe: no verdict yet.
        assert_eq!(h.health_changes, [("gateway".to_string(), true, None)]);
        h.gpus_probed(inventory(1, 0));
        h.advance(Duration::from_secs(5));
        h.checked("molt-provider", false, "connect refused");
        h.advance(Duration::from_secs(5));
        h.checked("molt-provider", false, "connect refused");
        h.advance(Duration::from_secs(5));
        h.checked("molt-provider", false, "connect refused");
        assert_eq!(
            h.health_changes,
            [
                ("gateway".to_string(), true, None),
                ("molt-provider".to_string(), true, None),
                (
                    "molt-provider".to_string(),
                    false,
                    Some("connect refused".to_string())
                ),
            ],
            "the first verdict, then one line per flip (fall = 2), not per failed check"
        );
        h.gpus_probed(inventory(0, 1));
        assert_eq!(h.health_changes.len(), 3, "already unhealthy");
    }

    #[test]
    fn the_health_view_says_advertised_only_for_what_the_provider_accepted() {
        let mut h = with_services();
        h.start();
        h.checked("gateway", true, "connected");
        h.checked("molt-provider", true, "connected");
        h.gpus_probed(inventory(1, 0));
        let none = pairs(&[("gateway", false), ("molt-provider", false)]);
        assert_eq!(advertised_in_view(&h), none, "healthy but the mesh is down");
        h.mesh_up("wireguard claw0 10.100.0.5/16");
        assert_eq!(advertised_in_view(&h), none, "publish in flight");
        h.published(&["gateway"]);
        assert_eq!(
            advertised_in_view(&h),
            pairs(&[("gateway", true), ("molt-provider", false)])
        );
        h.publish_advertisement();
        let both = pairs(&[("gateway", true), ("molt-provider", true)]);
        assert_eq!(advertised_in_view(&h), both);
        h.sup.handle_recheck(Component::Services, h.now);
        h.drain();
        h.fail(Component::Services, "tailscaled restarting");
        assert_eq!(advertised_in_view(&h), none, "publish failed");
        h.advance(Duration::from_secs(60));
        h.publish_advertisement();
        assert_eq!(advertised_in_view(&h), both);
        h.fail(Component::Mesh, "interface vanished");
        assert_eq!(advertised_in_view(&h), none, "off the mesh");
        h.advance(Duration::from_secs(60));
        h.mesh_up("wireguard claw0 10.100.0.5/16");
        h.publish_advertisement();
        assert_eq!(advertised_in_view(&h), both);
        h.sup.handle_stop_requested(h.now);
        h.sup.handle_withdrawn(None, h.now);
        h.drain();
        assert_eq!(advertised_in_view(&h), none, "withdrawn");
    }

    fn reload_with(h: &mut Harness, change: impl FnOnce(&mut Config)) {
        let old = h.config.clone().unwrap();
        let mut new = old.clone();
        change(&mut new);
        h.reload(&ReloadPlan::new(&old, &new));
        h.config = Some(new);
    }

    #[test]
    fn a_reload_that_changes_a_check_does_not_withdraw_a_healthy_service() {
        let mut h = with_services();
        h.start();
        h.checked("gateway", true, "connected");
        h.checked("molt-provider", true, "connected");
        h.all_up();
        h.publish_advertisement();
        let starts = h.service_starts();
        let both = [svc("gateway"), svc("molt-provider")];
        // Only the timing changes: nothing is republished and the state is kept.
        reload_with(&mut h, |c| {
            let check = &mut c.services.get_mut(&svc("molt-provider")).unwrap().check;
            check.interval = Duration::from_secs(10);
            check.timeout = Duration::from_secs(1);
        });
        assert_eq!(h.service_starts(), starts);
        assert_eq!(h.sup.advertisement(), both);
        let mp = h.sup.view(h.now).health[1].clone();
        assert_eq!(
            (mp.state, mp.checks, mp.advertised),
            (HealthState::Healthy, 1, true)
        );
        assert_eq!(h.readies(), 2, "the reload answers READY=1");
        // The check itself changes: still advertised until the new check's first result,
        // which decides at once (fall = 2 otherwise).
        let issued = h.checks.len();
        reload_with(&mut h, |c| {
            c.services
                .get_mut(&svc("molt-provider"))
                .unwrap()
                .check
                .kind = CheckKind::Tcp {
                target: ([127, 0, 0, 1], 9443).into(),
            };
        });
        assert_eq!(h.service_starts(), starts);
        assert_eq!(h.sup.advertisement(), both);
        assert_eq!(h.checks.len(), issued + 1, "the new check runs at once");
        h.checked("molt-provider", false, "connect refused");
        assert_eq!(h.service_starts(), starts + 1);
        assert_eq!(h.sup.advertisement(), [svc("gateway")]);
    }

    #[test]
    fn a_reload_while_the_first_publish_is_held_leaves_publishing_to_the_release() {
        let mut h = with_services();
        h.start();
        h.mesh_up("wireguard claw0 10.100.0.5/16");
        h.checked("gateway", true, "connected");
        reload_with(&mut h, |c| {
            c.services.get_mut(&svc("gateway")).unwrap().port = 4443;
        });
        assert_eq!(
            h.service_starts(),
            0,
            "still held for molt-provider's verdict"
        );
        h.checked("molt-provider", true, "connected");
        h.gpus_probed(inventory(1, 0));
        assert_eq!(h.service_starts(), 1, "the release publishes");
        assert_eq!(
            h.sup.advertisement(),
            [svc("gateway"), svc("molt-provider")]
        );
        h.publish_advertisement();
        assert!(h.sup.is_ready());
        assert_eq!(h.readies(), 1);
    }

    #[test]
    fn a_gpu_change_while_published_republishes() {
        let mut h = with_services();
        h.start();
        h.checked("gateway", true, "connected");
        h.checked("molt-provider", true, "connected");
        h.all_up();
        h.publish_advertisement();
        let starts = h.service_starts();
        h.sup.handle_gpus_changed(inventory(0, 2), h.now, 7);
        h.drain();
        assert_eq!(h.service_starts(), starts + 1);
        assert_eq!(h.sup.advertisement(), [svc("gateway")]);
        h.publish_advertisement();
        // Also while a GPU probe runs (the gate follows at once).
        h.sup.handle_recheck(Component::Gpu, h.now);
        h.sup.handle_gpus_changed(inventory(1, 1), h.now, 7);
        h.drain();
        assert_eq!(h.service_starts(), starts + 2);
        assert_eq!(
            h.sup.advertisement(),
            [svc("gateway"), svc("molt-provider")]
        );
    }

    #[test]
    fn status_follows_an_xid_hold_ending_even_when_nothing_is_republished() {
        let mut h = with_services();
        h.start();
        h.checked("gateway", true, "connected");
        h.checked("molt-provider", true, "connected");
        h.mesh_up("wireguard claw0 10.100.0.5/16");
        h.gpus_probed(inventory(1, 0));
        h.publish_advertisement();
        h.sup.handle_xid(XidEvent { index: 0, code: 79 }, h.now);
        h.drain();
        h.publish_advertisement();
        // The service also fails its own check meanwhile (fall = 2).
        for _ in 0..2 {
            h.advance(Duration::from_secs(5));
            h.checked("molt-provider", false, "connect refused");
        }
        assert!(
            h.sup
                .status_text()
                .ends_with("(no usable GPU: GPU 0 held after XID 79)"),
            "{}",
            h.sup.status_text()
        );
        let starts = h.service_starts();
        h.take();
        h.now += Duration::from_secs(3600);
        h.sup.handle_timeout(h.now);
        h.drain();
        assert_eq!(h.service_starts(), starts, "still not advertised");
        let expected = "ready: wireguard claw0 10.100.0.5/16, 1 GPU, advertising gateway; molt-provider unhealthy (connect refused)";
        assert!(h.notified.contains(&status(expected)), "{:?}", h.notified);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Up(usize),
        Fail(usize, bool),
        Stale(usize),
        Advance(u64),
        Gpus(u32, u32),
        GpusChanged(u32, u32),
        Recheck(usize),
        ReloadOk(Vec<usize>, bool),
        ReloadBad,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0usize..3).prop_map(Op::Up),
            (0usize..3, any::<bool>()).prop_map(|(i, op)| Op::Fail(i, op)),
            (0usize..3).prop_map(Op::Stale),
            (0u64..40_000).prop_map(Op::Advance),
            (0u32..3, 0u32..2).prop_map(|(u, l)| Op::Gpus(u, l)),
            (0u32..3, 0u32..2).prop_map(|(u, l)| Op::GpusChanged(u, l)),
            (0usize..3).prop_map(Op::Recheck),
            (proptest::collection::vec(0usize..3, 0..3), any::<bool>())
                .prop_map(|(c, r)| Op::ReloadOk(c, r)),
            Just(Op::ReloadBad),
        ]
    }

    proptest! {
        #[test]
        fn readiness_tracks_components_and_ready_is_sent_once_per_start_or_reload(
            required in any::<bool>(),
            ops in proptest::collection::vec(op(), 1..80)
        ) {
            let mut h = Harness::with_gpus_required(Some(Duration::from_secs(10)), required);
            h.start();
            let mut required = required;
            let mut reloads = 0usize;
            for op in ops {
                match op {
                    Op::Up(i) => h.up(Component::ALL[i]),
                    Op::Fail(i, operator) => {
                        let retry = if operator { Retry::NeedsOperator } else { Retry::Transient };
                        h.fail_with(Component::ALL[i], "boom", retry);
                    }
                    Op::Stale(i) => {
                        let g = h.generations[i].wrapping_sub(1);
                        match Component::ALL[i] {
                            Component::Mesh => h.sup.handle_mesh_up(g, mesh_status("stale"), h.now),
                            Component::Gpu => h.sup.handle_gpu_probed(g, inventory(1, 0), h.now, 0),
                            Component::Services => h.sup.handle_published(g, &ads(&["stale"]), h.now),
                        }
                        h.drain();
                    }
                    Op::Advance(ms) => h.advance(Duration::from_millis(ms)),
                    Op::Gpus(usable, lost) => h.gpus_probed(inventory(usable, lost)),
                    Op::GpusChanged(usable, lost) => {
                        h.sup.handle_gpus_changed(inventory(usable, lost), h.now, 7);
                        h.drain();
                    }
                    Op::Recheck(i) => {
                        h.sup.handle_recheck(Component::ALL[i], h.now);
                        h.drain();
                    }
                    Op::ReloadOk(idx, now_required) => {
                        let mut changed: Vec<Component> = idx.into_iter().map(|i| Component::ALL[i]).collect();
                        // `[gpu] required` is part of `[gpu]`, so changing it re-probes.
                        if now_required != required && !changed.contains(&Component::Gpu) {
                            changed.push(Component::Gpu);
                        }
                        required = now_required;
                        h.reload(&ReloadPlan { changed, gpu_required: required, ..ReloadPlan::default() });
                        reloads += 1;
                    }
                    Op::ReloadBad => {
                        h.sup.handle_reload_requested(1, h.now);
                        h.sup.handle_reload_rejected("bad".into(), h.now);
                        h.drain();
                        reloads += 1;
                    }
                }
                let view = h.sup.view(h.now);
                let all_up = view.components.iter().all(|c| c.state == ComponentState::Up);
                if matches!(h.sup.reload, Reload::Idle) {
                    prop_assert_eq!(h.sup.is_ready(), all_up);
                }
                // The GPUs-required rule: a node that requires GPUs has its GPU part up only
                // on an inventory with a usable GPU, once that inventory has been judged.
                let gpu_slot = &h.sup.slots[Component::Gpu.index()];
                if required && gpu_slot.is_up() && !gpu_slot.awaiting_result() {
                    let usable = view.inventory.as_ref().is_some_and(|i| i.gpus.iter().any(|g| !g.lost));
                    prop_assert!(usable, "GPU up without a usable GPU: {:?}", view.inventory);
                }
                prop_assert!(view.last_errors.len() <= MAX_ERRORS);
                prop_assert!(!view.status.contains('\n'));
                for c in &view.components {
                    if c.waiting_for_operator {
                        prop_assert!(view.status.contains("waiting for operator"));
                    }
                }
                if let Some(wake) = h.sup.poll_timeout() {
                    prop_assert!(wake <= h.now + Backoff::OPERATOR.cap().max(Duration::from_secs(10)));
                }
                let reloadings = h.notified.iter().filter(|m| matches!(m, NotifyMsg::Reloading { .. })).count();
                prop_assert!(h.readies() <= 1 + reloadings);
                prop_assert!(reloadings <= reloads);
            }
        }

        #[test]
        fn a_required_gpu_rule_holds_whatever_the_order_of_probes_and_changes(
            events in proptest::collection::vec((any::<bool>(), 0u32..3, 0u32..2), 1..40)
        ) {
            let mut h = Harness::with_gpus_required(None, true);
            h.start();
            h.mesh_up("wireguard claw0 10.100.0.5/16");
            h.published(&["molt-provider"]);
            for (probe, usable, lost) in events {
                if probe {
                    h.sup.handle_gpu_probed(h.generations[Component::Gpu.index()], inventory(usable, lost), h.now, 0);
                } else {
                    h.sup.handle_gpus_changed(inventory(usable, lost), h.now, 0);
                }
                h.drain();
                let awaiting = h.sup.slots[Component::Gpu.index()].awaiting_result();
                if !awaiting {
                    prop_assert_eq!(h.sup.is_ready(), usable > 0, "usable {} lost {}", usable, lost);
                }
                h.advance(Duration::from_secs(31));
            }
        }

        #[test]
        fn a_reload_restarts_exactly_what_changed_and_what_waits_for_the_operator(
            mesh_changes in any::<bool>(),
            gpu_changes in any::<bool>(),
            services_change in any::<bool>(),
            provider_changes in any::<bool>(),
            operator_blocked in any::<bool>(),
        ) {
            let old = config();
            let mut new = old.clone();
            if mesh_changes { new.network.wireguard.mtu = 1380; }
            if gpu_changes { new.gpu.poll_interval = Duration::from_secs(31); }
            if services_change { new.services.clear(); }
            if provider_changes { new.network.provider = crate::config::ProviderKind::Tailscale; }
            let plan = ReloadPlan::new(&old, &new);
            prop_assert_eq!(plan.replace_provider, provider_changes);
            prop_assert_eq!(plan.changed.contains(&Component::Mesh), mesh_changes || provider_changes);
            prop_assert_eq!(plan.changed.contains(&Component::Gpu), gpu_changes);
            prop_assert_eq!(plan.changed.contains(&Component::Services), services_change);

            let mut h = Harness::new(None);
            // The core checks the services of the configuration it runs.
            h.sup = Supervisor::new(Backoff::DEFAULT, None, false, Health::new(&old.services, &old.gpu, h.now), h.now);
            h.start();
            h.all_up();
            if operator_blocked {
                h.sup.handle_recheck(Component::Gpu, h.now);
                h.drain();
                h.fail_with(Component::Gpu, "needs a driver reload", Retry::NeedsOperator);
            }
            let before = h.generations;
            h.reload(&plan);
            for c in Component::ALL {
                let restarted = h.generations[c.index()] != before[c.index()];
                let mut expected = plan.changed.contains(&c) || (c == Component::Gpu && operator_blocked);
                if c == Component::Services && plan.replace_provider {
                    // Services republish when the new provider's mesh comes up, not before.
                    expected = false;
                }
                prop_assert_eq!(restarted, expected, "{:?}", c);
            }
        }
    }
}
