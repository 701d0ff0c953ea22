//! The supervisor's state machine: phases, readiness, retries, reloads and what systemd hears.
//!
//! Sans-IO in the Firezone style: the shell calls `handle_*(…, now)` with what happened, then
//! drains `poll_command()` and sleeps until `poll_timeout()`. Nothing here reads a clock,
//! touches a socket or draws a random number.

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use super::backoff::Backoff;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreView {
    pub phase: Phase,
    pub ready: bool,
    pub status: String,
    pub components: Vec<ComponentView>,
    pub last_errors: Vec<ErrorRecord>,
    pub reload_note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentView {
    pub component: Component,
    pub state: ComponentState,
    pub summary: Option<String>,
    pub error: Option<String>,
    pub attempts: u32,
    pub retry_in: Option<Duration>,
}

pub struct Supervisor {
    phase: Phase,
    slots: [Slot; 3],
    backoff: Backoff,
    watchdog: Option<Watchdog>,
    ever_ready: bool,
    reload: Reload,
    reload_note: Option<String>,
    last_status: Option<String>,
    errors: VecDeque<ErrorRecord>,
    commands: VecDeque<Command>,
}

/// How many errors the status API keeps; older ones are dropped so memory stays flat.
pub const MAX_ERRORS: usize = 16;
/// Longest error text carried into STATUS=, so one verbose error cannot flood the journal.
const MAX_ERROR_CHARS: usize = 200;

impl Supervisor {
    pub fn new(backoff: Backoff, watchdog_interval: Option<Duration>, now: Instant) -> Self {
        Self {
            phase: Phase::Starting,
            slots: Default::default(),
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
        self.update(now);
    }

    pub fn handle_component_up(
        &mut self,
        component: Component,
        generation: u64,
        summary: String,
        now: Instant,
    ) {
        if self.phase == Phase::Stopping || !self.current(component, generation) {
            return;
        }
        let slot = &mut self.slots[component.index()];
        let was_up = slot.state == ComponentState::Up;
        slot.state = ComponentState::Up;
        slot.summary = Some(one_line(&summary));
        slot.error = None;
        slot.attempts = 0;
        slot.in_flight = false;
        slot.retry_at = None;
        let services_up = self.slots[Component::Services.index()].state == ComponentState::Up;
        if component == Component::Mesh && !(was_up && services_up) {
            self.start(Component::Services);
        }
        self.update(now);
    }

    /// Something outside changed a component that is up (an interface was deleted, a daemon
    /// died) or a periodic check is due: run its bring-up again now. It stays up meanwhile, so
    /// a check that finds nothing wrong changes nothing systemd sees. A component that is not
    /// up already has a retry scheduled or running.
    pub fn handle_recheck(&mut self, component: Component, now: Instant) {
        let slot = &self.slots[component.index()];
        if self.phase == Phase::Stopping || slot.state != ComponentState::Up || slot.in_flight {
            return;
        }
        let slot = &mut self.slots[component.index()];
        slot.generation += 1;
        slot.in_flight = true;
        self.commands.push_back(Command::Start {
            component,
            generation: slot.generation,
        });
        let _ = now;
    }

    /// A component failed. `jitter` is a uniformly random `u32` from the shell.
    pub fn handle_component_failed(
        &mut self,
        component: Component,
        generation: u64,
        error: String,
        now: Instant,
        jitter: u32,
    ) {
        if self.phase == Phase::Stopping || !self.current(component, generation) {
            return;
        }
        let error = one_line(&error);
        let slot = &mut self.slots[component.index()];
        slot.state = ComponentState::Failed;
        slot.attempts = slot.attempts.saturating_add(1);
        slot.in_flight = false;
        slot.retry_at = Some(now + self.backoff.delay(slot.attempts, jitter));
        slot.error = Some(error.clone());
        self.record_error(component.as_str(), error, now);
        if component == Component::Mesh {
            // Nothing is published while the node is off the mesh; republish once it is back.
            self.reset(Component::Services);
        }
        self.update(now);
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
            let slot = &self.slots[component.index()];
            if slot.retry_at.is_some_and(|at| now >= at) {
                self.start(component);
            }
        }
    }

    /// The earliest instant at which `handle_timeout` has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let retries = self.slots.iter().filter_map(|s| s.retry_at);
        let retries = if self.phase == Phase::Stopping {
            None
        } else {
            retries.min()
        };
        let watchdog = self.watchdog.as_ref().map(|w| w.next);
        match (retries, watchdog) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
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

    /// The new configuration was valid and is in effect; `changed` lists the components whose
    /// settings changed and must be re-applied. The others are not touched.
    pub fn handle_reload_applied(&mut self, changed: &[Component], now: Instant) {
        if self.phase == Phase::Stopping {
            return;
        }
        self.reload_note = None;
        let notified = matches!(self.reload, Reload::Loading { notified: true });
        for &component in changed {
            match component {
                Component::Services
                    if self.slots[Component::Mesh.index()].state != ComponentState::Up =>
                {
                    // Publishing waits for the mesh and happens when it comes up.
                }
                _ => self.start(component),
            }
        }
        self.reload = Reload::Settling {
            notified,
            components: changed.to_vec(),
        };
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
        if let Some(error) = error {
            self.record_error("withdraw", one_line(&error), now);
        }
        self.commands.push_back(Command::Exit(0));
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
                .map(|&component| {
                    let slot = &self.slots[component.index()];
                    ComponentView {
                        component,
                        state: slot.state,
                        summary: slot.summary.clone(),
                        error: slot.error.clone(),
                        attempts: slot.attempts,
                        retry_in: slot.retry_at.map(|at| at.saturating_duration_since(now)),
                    }
                })
                .collect(),
            last_errors: self.errors.iter().cloned().collect(),
            reload_note: self.reload_note.clone(),
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
        let mesh_part = match mesh.state {
            ComponentState::Up => mesh.summary.clone().unwrap_or_else(|| "mesh up".into()),
            ComponentState::Pending => "joining mesh".into(),
            ComponentState::Failed => failed_part("mesh", mesh),
        };
        let gpu_part = match gpu.state {
            ComponentState::Up => gpu.summary.clone().unwrap_or_else(|| "GPUs probed".into()),
            ComponentState::Pending => "probing GPUs".into(),
            ComponentState::Failed => failed_part("GPUs", gpu),
        };
        let services_part = match (services.state, mesh.state) {
            (ComponentState::Up, _) => services
                .summary
                .clone()
                .unwrap_or_else(|| "services published".into()),
            (ComponentState::Failed, _) => failed_part("services", services),
            (ComponentState::Pending, ComponentState::Up) => "publishing services".into(),
            (ComponentState::Pending, _) => "services wait for the mesh".into(),
        };
        let mut text = format!("{}: {mesh_part}, {gpu_part}, {services_part}", self.phase);
        if let Some(note) = &self.reload_note {
            text.push_str("; ");
            text.push_str(note);
        }
        text
    }

    fn current(&self, component: Component, generation: u64) -> bool {
        self.slots[component.index()].generation == generation
    }

    fn start(&mut self, component: Component) {
        let slot = &mut self.slots[component.index()];
        slot.generation += 1;
        slot.in_flight = true;
        slot.retry_at = None;
        if slot.state != ComponentState::Failed {
            slot.state = ComponentState::Pending;
        }
        self.commands.push_back(Command::Start {
            component,
            generation: slot.generation,
        });
    }

    /// Back to Pending with no work in flight; a late result of the old generation is ignored.
    fn reset(&mut self, component: Component) {
        let slot = &mut self.slots[component.index()];
        slot.generation += 1;
        slot.state = ComponentState::Pending;
        slot.summary = None;
        slot.error = None;
        slot.attempts = 0;
        slot.in_flight = false;
        slot.retry_at = None;
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
        let states = self.slots.iter().map(|s| s.state);
        if states.clone().all(|s| s == ComponentState::Up) {
            return Phase::Ready;
        }
        if self.ever_ready && states.clone().any(|s| s == ComponentState::Failed) {
            return Phase::Degraded;
        }
        Phase::Joining
    }

    fn reload_settled(&self, components: &[Component]) -> bool {
        let mesh_failed = self.slots[Component::Mesh.index()].state == ComponentState::Failed;
        components.iter().all(|&c| {
            let slot = &self.slots[c.index()];
            match slot.state {
                ComponentState::Pending => c == Component::Services && mesh_failed,
                ComponentState::Up | ComponentState::Failed => !slot.in_flight,
            }
        })
    }

    fn finish_reload(&mut self, now: Instant) {
        let notified = match &self.reload {
            Reload::Loading { notified } | Reload::Settling { notified, .. } => *notified,
            Reload::Idle => false,
        };
        self.reload = Reload::Idle;
        self.phase = self.compute_phase();
        if self.phase == Phase::Ready && !self.ever_ready {
            self.ever_ready = true;
        }
        let status = self.status_text();
        self.last_status = Some(status.clone());
        let msgs = if notified {
            vec![NotifyMsg::Ready, NotifyMsg::Status(status)]
        } else {
            vec![NotifyMsg::Status(status)]
        };
        self.commands.push_back(Command::Notify(msgs));
        let _ = now;
    }

    /// Recompute the phase and tell systemd what changed.
    fn update(&mut self, now: Instant) {
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

#[derive(Debug, Default)]
struct Slot {
    state: ComponentState,
    summary: Option<String>,
    error: Option<String>,
    attempts: u32,
    generation: u64,
    in_flight: bool,
    retry_at: Option<Instant>,
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
    let error = slot.error.as_deref().unwrap_or("failed");
    format!(
        "{what} failed: {error} (attempt {}, retrying)",
        slot.attempts
    )
}

/// STATUS= is line-based, so anything multi-line is folded, and long text is cut.
fn one_line(text: &str) -> String {
    let folded: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let trimmed = folded.trim();
    if trimmed.chars().count() <= MAX_ERROR_CHARS {
        return trimmed.to_string();
    }
    let mut cut: String = trimmed.chars().take(MAX_ERROR_CHARS).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Drives the core like the shell does and remembers what it was told.
    struct Harness {
        sup: Supervisor,
        now: Instant,
        generations: [u64; 3],
        notified: Vec<NotifyMsg>,
        withdraws: usize,
        exit: Option<u8>,
    }

    impl Harness {
        fn new(watchdog: Option<Duration>) -> Self {
            let now = Instant::now();
            Self {
                sup: Supervisor::new(Backoff::DEFAULT, watchdog, now),
                now,
                generations: [0; 3],
                notified: Vec::new(),
                withdraws: 0,
                exit: None,
            }
        }

        fn drain(&mut self) {
            while let Some(cmd) = self.sup.poll_command() {
                match cmd {
                    Command::Notify(msgs) => self.notified.extend(msgs),
                    Command::Start {
                        component,
                        generation,
                    } => self.generations[component.index()] = generation,
                    Command::Withdraw => self.withdraws += 1,
                    Command::Exit(code) => self.exit = Some(code),
                }
            }
        }

        fn start(&mut self) {
            self.sup.handle_started(self.now);
            self.drain();
        }

        fn up(&mut self, c: Component, summary: &str) {
            let g = self.generations[c.index()];
            self.sup.handle_component_up(c, g, summary.into(), self.now);
            self.drain();
        }

        fn fail(&mut self, c: Component, error: &str) {
            let g = self.generations[c.index()];
            self.sup
                .handle_component_failed(c, g, error.into(), self.now, 1 << 31);
            self.drain();
        }

        fn advance(&mut self, d: Duration) {
            self.now += d;
            self.sup.handle_timeout(self.now);
            self.drain();
        }

        fn all_up(&mut self) {
            self.up(Component::Mesh, "wireguard claw0 10.100.0.5/16");
            self.up(Component::Gpu, "2 GPUs");
            self.up(Component::Services, "advertising molt-provider");
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
    fn node_is_not_ready_until_services_are_published() {
        let mut h = Harness::new(None);
        h.start();
        h.up(Component::Mesh, "wireguard claw0 10.100.0.5/16");
        h.up(Component::Gpu, "0 GPUs (nvml_unavailable)");
        assert!(!h.sup.is_ready());
        assert_eq!(h.readies(), 0);
        assert!(h.sup.status_text().contains("publishing services"));
    }

    #[test]
    fn services_are_published_only_after_the_mesh_is_up() {
        let mut h = Harness::new(None);
        h.start();
        assert_eq!(h.generations[Component::Services.index()], 0);
        h.up(Component::Mesh, "mesh");
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
        h.sup
            .handle_component_up(Component::Mesh, old, "stale".into(), h.now);
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
        h.up(Component::Mesh, "wireguard claw0 10.100.0.5/16");
        assert!(!h.sup.is_ready(), "services must be republished first");
        h.up(Component::Services, "advertising molt-provider");
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
        h.sup.handle_reload_applied(&[], h.now);
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
        h.sup.handle_reload_requested(1, h.now);
        h.sup.handle_reload_applied(&[Component::Mesh], h.now);
        h.drain();
        assert_eq!(
            h.generations[Component::Gpu.index()],
            1,
            "GPU probe untouched"
        );
        assert_eq!(h.readies(), 0);
        h.up(Component::Mesh, "wireguard claw1 10.100.0.6/16");
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
    fn reload_before_the_first_ready_does_not_claim_readiness() {
        let mut h = Harness::new(None);
        h.start();
        h.sup.handle_reload_requested(1, h.now);
        h.sup.handle_reload_applied(&[Component::Gpu], h.now);
        h.drain();
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
        h.up(Component::Mesh, "wireguard claw0 10.100.0.5/16");
        assert!(h.take().is_empty());
        assert_eq!(h.generations[Component::Services.index()], services_gen);
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
        assert!(h.notified.iter().all(|m| match m {
            NotifyMsg::Status(s) => !s.contains('\n'),
            _ => true,
        }));
        assert!(h.sup.status_text().contains("line one line two"));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Up(usize),
        Fail(usize),
        Stale(usize),
        Advance(u64),
        ReloadOk(Vec<usize>),
        ReloadBad,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0usize..3).prop_map(Op::Up),
            (0usize..3).prop_map(Op::Fail),
            (0usize..3).prop_map(Op::Stale),
            (0u64..40_000).prop_map(Op::Advance),
            proptest::collection::vec(0usize..3, 0..3).prop_map(Op::ReloadOk),
            Just(Op::ReloadBad),
        ]
    }

    proptest! {
        #[test]
        fn readiness_tracks_components_and_ready_is_sent_once_per_start_or_reload(
            ops in proptest::collection::vec(op(), 1..80)
        ) {
            let mut h = Harness::new(Some(Duration::from_secs(10)));
            h.start();
            let mut reloads = 0usize;
            for op in ops {
                match op {
                    Op::Up(i) => h.up(Component::ALL[i], "up"),
                    Op::Fail(i) => h.fail(Component::ALL[i], "boom"),
                    Op::Stale(i) => {
                        let c = Component::ALL[i];
                        h.sup.handle_component_up(c, h.generations[i].wrapping_sub(1), "stale".into(), h.now);
                        h.drain();
                    }
                    Op::Advance(ms) => h.advance(Duration::from_millis(ms)),
                    Op::ReloadOk(idx) => {
                        let changed: Vec<Component> = idx.into_iter().map(|i| Component::ALL[i]).collect();
                        h.sup.handle_reload_requested(1, h.now);
                        h.sup.handle_reload_applied(&changed, h.now);
                        h.drain();
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
                prop_assert!(view.last_errors.len() <= MAX_ERRORS);
                prop_assert!(!view.status.contains('\n'));
                if let Some(wake) = h.sup.poll_timeout() {
                    prop_assert!(wake <= h.now + Backoff::DEFAULT.cap().max(Duration::from_secs(10)));
                }
                let reloadings = h.notified.iter().filter(|m| matches!(m, NotifyMsg::Reloading { .. })).count();
                prop_assert!(h.readies() <= 1 + reloadings);
                prop_assert!(reloadings <= reloads);
            }
        }
    }
}
