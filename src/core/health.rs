//! Service health: check results in, advertise/withdraw decisions out.
//!
//! Each service has a check (`[services.<name>.check]`) whose results move it between
//! `unknown`, `healthy` and `unhealthy`: the first result decides at once, then `rise`
//! consecutive successes or `fall` consecutive failures are needed to flip, so a flapping
//! backend is damped by counting, not by sleeping. A service with `requires_gpus` is also
//! gated on a usable GPU (present, not lost, not held by a recent XID that needs a reset).
//! The shell runs the probes the `CheckRequest`s describe; nothing here touches a socket.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::{Duration, Instant};

use super::model::{GpuInventory, XidEvent};
use crate::config::{CheckKind, GpuConfig, ServiceName, ServiceSpec};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    /// No result yet: not advertised.
    Unknown,
    Healthy,
    Unhealthy,
}

impl HealthState {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Unknown => "unknown",
            HealthState::Healthy => "healthy",
            HealthState::Unhealthy => "unhealthy",
        }
    }
}

impl fmt::Display for HealthState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub ok: bool,
    /// "connected", "connect refused", "timed out after 2s", "HTTP 500 (expected 200-399)", …
    pub detail: String,
    pub duration: Duration,
}

/// Run this probe, bounded by `timeout`, and report with `handle_result(service, generation, …)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckRequest {
    pub service: ServiceName,
    pub kind: CheckKind,
    pub timeout: Duration,
    pub generation: u64,
}

/// Upper bounds (seconds) of the check-duration histogram.
pub const DURATION_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// One service's health as the status API and metrics show it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceHealthView {
    pub name: String,
    /// Including the GPU gate: a healthy check with no usable GPU shows `unhealthy`.
    pub state: HealthState,
    /// Healthy and the GPU gate (if any) open.
    pub advertised: bool,
    /// Why it is not healthy: the check's detail or the GPU gate's reason.
    pub reason: Option<String>,
    /// "tcp 127.0.0.1:8443", "http GET http://127.0.0.1:8080/healthz expect 200-399", "none".
    pub check: String,
    pub requires_gpus: bool,
    pub last_result: Option<(CheckResult, Instant)>,
    /// When `state` was entered (the start, or the reload that changed the check, for unknown).
    pub since: Instant,
    pub checks: u64,
    pub failures: u64,
    /// Changes between healthy and unhealthy (the first decision out of unknown not counted).
    pub transitions: u64,
    /// Consecutive results opposite to the check's state, toward a flip.
    pub streak: u32,
    /// Cumulative count per `DURATION_BUCKETS` bound, Prometheus style (+Inf is `checks`).
    pub duration_buckets: Vec<u64>,
    pub duration_sum: f64,
}

/// Whether the GPUs let a `requires_gpus` service be advertised.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Gate {
    /// No GPU probe has finished yet.
    Unknown,
    Open,
    Closed(String),
}

#[derive(Debug, Clone)]
struct Entry {
    spec: ServiceSpec,
    generation: u64,
    /// What the check results alone say.
    check_state: HealthState,
    streak: u32,
    /// The detail of the last failure, shown while the check says unhealthy.
    last_failure: Option<String>,
    last_result: Option<(CheckResult, Instant)>,
    /// Next probe; `None` while one runs (or never, for `type = "none"`).
    due: Option<Instant>,
    /// What is shown, gate included, and since when.
    shown: HealthState,
    since: Instant,
    checks: u64,
    failures: u64,
    transitions: u64,
    buckets: [u64; DURATION_BUCKETS.len()],
    duration_sum: f64,
}

impl Entry {
    fn new(spec: &ServiceSpec, generation: u64, now: Instant) -> Self {
        let unchecked = spec.check.kind == CheckKind::None;
        Entry {
            spec: spec.clone(),
            generation,
            // Opting out of checks means trusting the service: healthy from the start.
            check_state: if unchecked {
                HealthState::Healthy
            } else {
                HealthState::Unknown
            },
            streak: 0,
            last_failure: None,
            last_result: None,
            due: (!unchecked).then_some(now),
            shown: HealthState::Unknown,
            since: now,
            checks: 0,
            failures: 0,
            transitions: 0,
            buckets: [0; DURATION_BUCKETS.len()],
            duration_sum: 0.0,
        }
    }

    /// State and reason with the gate applied.
    fn effective(&self, gate: &Gate) -> (HealthState, Option<String>) {
        if self.spec.requires_gpus {
            match gate {
                Gate::Unknown => return (HealthState::Unknown, None),
                Gate::Closed(reason) => return (HealthState::Unhealthy, Some(reason.clone())),
                Gate::Open => {}
            }
        }
        let reason = (self.check_state == HealthState::Unhealthy)
            .then(|| self.last_failure.clone())
            .flatten();
        (self.check_state, reason)
    }
}

/// The health of every configured service, and the GPU facts the gate needs.
#[derive(Debug, Clone)]
pub struct Health {
    entries: BTreeMap<ServiceName, Entry>,
    gpu_enabled: bool,
    unhealthy_xids: BTreeSet<u64>,
    xid_hold: Duration,
    /// `None` until the first inventory.
    inventory: Option<GpuInventory>,
    /// GPU index → (XID code, held until).
    holds: BTreeMap<u32, (u64, Instant)>,
    next_generation: u64,
}

impl Health {
    /// Every check is due at `now`.
    pub fn new(
        services: &BTreeMap<ServiceName, ServiceSpec>,
        gpu: &GpuConfig,
        now: Instant,
    ) -> Self {
        let mut health = Health {
            entries: BTreeMap::new(),
            gpu_enabled: gpu.enabled,
            unhealthy_xids: gpu.unhealthy_xids.clone(),
            xid_hold: gpu.xid_hold,
            inventory: None,
            holds: BTreeMap::new(),
            next_generation: 1,
        };
        for (name, spec) in services {
            let entry = Entry::new(spec, health.generation(), now);
            health.entries.insert(name.clone(), entry);
        }
        health.refresh(now);
        health
    }

    /// A reload: services whose spec is unchanged keep their state; new or changed ones start
    /// over as unknown with a check due now (results for their old check are ignored). XID
    /// holds are cleared: a reload is how the operator says the GPU was reset.
    pub fn reconfigure(
        &mut self,
        services: &BTreeMap<ServiceName, ServiceSpec>,
        gpu: &GpuConfig,
        now: Instant,
    ) {
        self.gpu_enabled = gpu.enabled;
        self.unhealthy_xids = gpu.unhealthy_xids.clone();
        self.xid_hold = gpu.xid_hold;
        self.holds.clear();
        let mut old = std::mem::take(&mut self.entries);
        for (name, spec) in services {
            let entry = match old.remove(name) {
                Some(entry) if entry.spec == *spec => entry,
                _ => Entry::new(spec, self.generation(), now),
            };
            self.entries.insert(name.clone(), entry);
        }
        self.refresh(now);
    }

    /// The checks due at `now` that are not already running; each is marked running until
    /// its result comes back.
    pub fn poll_checks(&mut self, now: Instant) -> Vec<CheckRequest> {
        let mut due = Vec::new();
        for (name, entry) in &mut self.entries {
            if entry.due.is_some_and(|at| at <= now) {
                entry.due = None;
                due.push(CheckRequest {
                    service: name.clone(),
                    kind: entry.spec.check.kind.clone(),
                    timeout: entry.spec.check.timeout,
                    generation: entry.generation,
                });
            }
        }
        due
    }

    /// A probe finished. Returns true when the set of advertised services changed. A result
    /// for a check that has since been reconfigured (or removed) is ignored.
    pub fn handle_result(
        &mut self,
        service: &ServiceName,
        generation: u64,
        result: CheckResult,
        now: Instant,
    ) -> bool {
        let before = self.advertised();
        let Some(entry) = self.entries.get_mut(service) else {
            return false;
        };
        if entry.generation != generation || entry.spec.check.kind == CheckKind::None {
            return false;
        }
        let check = &entry.spec.check;
        entry.due = Some(now + check.interval);
        entry.checks += 1;
        let seconds = result.duration.as_secs_f64();
        entry.duration_sum += seconds;
        for (count, bound) in entry.buckets.iter_mut().zip(DURATION_BUCKETS) {
            if seconds <= bound {
                *count += 1;
            }
        }
        if !result.ok {
            entry.failures += 1;
            entry.last_failure = Some(result.detail.clone());
        }
        let (opposite, needed, flipped) = match (entry.check_state, result.ok) {
            (HealthState::Unknown, true) => (false, 0, HealthState::Healthy),
            (HealthState::Unknown, false) => (false, 0, HealthState::Unhealthy),
            (HealthState::Healthy, ok) => (!ok, check.fall, HealthState::Unhealthy),
            (HealthState::Unhealthy, ok) => (ok, check.rise, HealthState::Healthy),
        };
        if entry.check_state == HealthState::Unknown {
            entry.check_state = flipped;
            entry.streak = 0;
        } else if opposite {
            entry.streak += 1;
            if entry.streak >= needed {
                entry.check_state = flipped;
                entry.streak = 0;
            }
        } else {
            entry.streak = 0;
        }
        entry.last_result = Some((result, now));
        self.refresh(now);
        self.advertised() != before
    }

    /// A GPU probe or a layout change. Returns true when the advertised set changed.
    pub fn handle_inventory(&mut self, inventory: &GpuInventory, now: Instant) -> bool {
        let before = self.advertised();
        self.inventory = Some(inventory.clone());
        self.refresh(now);
        self.advertised() != before
    }

    /// An XID event: one in `unhealthy_xids` holds its GPU unusable for `xid_hold` from now.
    /// Returns true when the advertised set changed.
    pub fn handle_xid(&mut self, event: XidEvent, now: Instant) -> bool {
        if !self.unhealthy_xids.contains(&event.code) {
            return false;
        }
        let before = self.advertised();
        self.holds
            .insert(event.index, (event.code, now + self.xid_hold));
        self.refresh(now);
        self.advertised() != before
    }

    /// Expires XID holds whose time has come. Returns true when the advertised set changed.
    pub fn handle_timeout(&mut self, now: Instant) -> bool {
        let before = self.advertised();
        let expired = self.holds.len();
        self.holds.retain(|_, (_, until)| *until > now);
        if self.holds.len() == expired {
            return false;
        }
        self.refresh(now);
        self.advertised() != before
    }

    /// The earliest check due (not running) or hold expiry.
    pub fn next_deadline(&self) -> Option<Instant> {
        let checks = self.entries.values().filter_map(|e| e.due);
        let holds = self.holds.values().map(|(_, until)| *until);
        checks.chain(holds).min()
    }

    /// The services to advertise: healthy with the gate open, in config order.
    pub fn advertised(&self) -> Vec<ServiceName> {
        self.entries
            .iter()
            .filter(|(_, e)| e.shown == HealthState::Healthy)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Whether any service is configured at all.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn views(&self) -> Vec<ServiceHealthView> {
        let gate = self.gate();
        self.entries
            .iter()
            .map(|(name, e)| {
                let (state, reason) = e.effective(&gate);
                ServiceHealthView {
                    name: name.to_string(),
                    state,
                    advertised: state == HealthState::Healthy,
                    reason,
                    check: e.spec.check.kind.to_string(),
                    requires_gpus: e.spec.requires_gpus,
                    last_result: e.last_result.clone(),
                    since: e.since,
                    checks: e.checks,
                    failures: e.failures,
                    transitions: e.transitions,
                    streak: e.streak,
                    duration_buckets: e.buckets.to_vec(),
                    duration_sum: e.duration_sum,
                }
            })
            .collect()
    }

    /// The services not advertised and why, for STATUS=: "molt-provider unhealthy (connect
    /// refused), web not checked yet"; empty when every service is advertised.
    pub fn status_part(&self) -> String {
        let gate = self.gate();
        let parts: Vec<String> = self
            .entries
            .iter()
            .filter_map(|(name, e)| match e.effective(&gate) {
                (HealthState::Healthy, _) => None,
                (HealthState::Unknown, _) => Some(format!("{name} not checked yet")),
                (HealthState::Unhealthy, Some(reason)) => {
                    Some(format!("{name} unhealthy ({reason})"))
                }
                (HealthState::Unhealthy, None) => Some(format!("{name} unhealthy")),
            })
            .collect();
        parts.join(", ")
    }

    fn generation(&mut self) -> u64 {
        let generation = self.next_generation;
        self.next_generation += 1;
        generation
    }

    fn gate(&self) -> Gate {
        if !self.gpu_enabled {
            return Gate::Closed(
                "no usable GPU: GPU probing is disabled ([gpu] enabled = false)".into(),
            );
        }
        let Some(inventory) = &self.inventory else {
            return Gate::Unknown;
        };
        if inventory.gpus.is_empty() {
            let why = inventory.unavailable.as_ref().map_or_else(
                || "no GPUs found".to_owned(),
                |u| format!("{}: {}", u.reason, u.detail),
            );
            return Gate::Closed(format!("no usable GPU: {why}"));
        }
        let mut why = Vec::new();
        for gpu in &inventory.gpus {
            if gpu.lost {
                why.push(format!("GPU {} lost", gpu.index));
            } else if let Some((code, _)) = self.holds.get(&gpu.index) {
                why.push(format!("GPU {} held after XID {code}", gpu.index));
            } else {
                return Gate::Open;
            }
        }
        Gate::Closed(format!("no usable GPU: {}", why.join(", ")))
    }

    /// Recomputes what each service shows, logging every change.
    fn refresh(&mut self, now: Instant) {
        let gate = self.gate();
        for (name, entry) in &mut self.entries {
            let (state, reason) = entry.effective(&gate);
            if state == entry.shown {
                continue;
            }
            if entry.shown != HealthState::Unknown && state != HealthState::Unknown {
                entry.transitions += 1;
            }
            entry.shown = state;
            entry.since = now;
            match state {
                HealthState::Healthy => {
                    tracing::info!(component = "services", service = %name, "service healthy; advertising");
                }
                HealthState::Unhealthy => {
                    let reason = reason.unwrap_or_default();
                    tracing::warn!(component = "services", service = %name, reason, "service unhealthy; withdrawing");
                }
                HealthState::Unknown => {}
            }
        }
    }
}
