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
    /// The provider accepted it in the last successful publish (false while the mesh is down,
    /// publishing failed or is held, or after a withdrawal), not merely eligible.
    pub advertised: bool,
    /// Why it is not healthy: the check's detail or the GPU gate's reason.
    pub reason: Option<String>,
    /// "tcp 127.0.0.1:8443", "http GET http://127.0.0.1:8080/healthz expect 200-399", "none".
    pub check: String,
    pub requires_gpus: bool,
    pub last_result: Option<(CheckResult, Instant)>,
    /// When `state` was entered (the start, for unknown).
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
    /// When the last probe was issued: the next is due `interval` after it (start to start),
    /// so a probe that times out does not stretch the cycle by its timeout.
    issued_at: Option<Instant>,
    /// The check changed on a reload: its next result decides at once, like a first result,
    /// while the verdict of the old check stands until then.
    decide_next: bool,
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
            issued_at: None,
            decide_next: false,
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
    /// Effective state changes not yet taken by `take_changes`.
    changes: Vec<HealthChange>,
}

/// What `Health::handle_timeout` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Expiry {
    /// Some XID hold ended: the reasons shown (STATUS=) may have changed even when the
    /// advertised set did not.
    pub expired: bool,
    pub advertised_changed: bool,
}

/// A service turned healthy or unhealthy (check and GPU gate together).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthChange {
    pub service: ServiceName,
    pub healthy: bool,
    pub reason: Option<String>,
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
            changes: Vec::new(),
        };
        for (name, spec) in services {
            let entry = Entry::new(spec, health.generation(), now);
            health.entries.insert(name.clone(), entry);
        }
        health.refresh(now);
        health
    }

    /// A reload. A service whose check (type, target, path, expect, TLS) and `requires_gpus`
    /// are unchanged keeps its state, streak and counters; only the timing (interval, timeout,
    /// rise, fall) is updated. One whose check changed keeps its verdict until the first result
    /// of the new check, which decides at once; that check is due now and results of the old
    /// one are ignored. A new service starts unknown. XID holds are cleared: a reload is how
    /// the operator says the GPU was reset.
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
                Some(mut entry)
                    if entry.spec.check.kind == spec.check.kind
                        && entry.spec.requires_gpus == spec.requires_gpus =>
                {
                    if let (Some(_), Some(issued)) = (entry.due, entry.issued_at) {
                        entry.due = Some(issued + spec.check.interval);
                    }
                    entry.spec = spec.clone();
                    entry
                }
                Some(mut entry) => {
                    entry.generation = self.generation();
                    entry.streak = 0;
                    entry.issued_at = None;
                    if spec.check.kind == CheckKind::None {
                        // Opting out of checks means trusting the service.
                        entry.check_state = HealthState::Healthy;
                        entry.due = None;
                        entry.decide_next = false;
                    } else {
                        entry.due = Some(now);
                        entry.decide_next = true;
                    }
                    entry.spec = spec.clone();
                    entry
                }
                None => Entry::new(spec, self.generation(), now),
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
                entry.issued_at = Some(now);
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
        let issued = entry.issued_at.unwrap_or(now);
        entry.due = Some((issued + check.interval).max(now));
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
        if entry.check_state == HealthState::Unknown || entry.decide_next {
            entry.check_state = if result.ok {
                HealthState::Healthy
            } else {
                HealthState::Unhealthy
            };
            entry.streak = 0;
            entry.decide_next = false;
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

    /// Expires XID holds whose time has come.
    pub fn handle_timeout(&mut self, now: Instant) -> Expiry {
        let before = self.advertised();
        let held = self.holds.len();
        self.holds.retain(|_, (_, until)| *until > now);
        if self.holds.len() == held {
            return Expiry::default();
        }
        self.refresh(now);
        Expiry {
            expired: true,
            advertised_changed: self.advertised() != before,
        }
    }

    /// The earliest check due (not running) or hold expiry.
    pub fn next_deadline(&self) -> Option<Instant> {
        let checks = self.entries.values().filter_map(|e| e.due);
        let holds = self.holds.values().map(|(_, until)| *until);
        checks.chain(holds).min()
    }

    /// True while some service has no verdict yet: no check result, or it needs GPUs and the
    /// first GPU probe has not answered.
    pub fn undecided(&self) -> bool {
        let gate = self.gate();
        self.entries
            .values()
            .any(|e| e.effective(&gate).0 == HealthState::Unknown)
    }

    /// How many services are configured.
    pub fn configured(&self) -> usize {
        self.entries.len()
    }

    /// The services to advertise: healthy with the gate open, in config order.
    pub fn advertised(&self) -> Vec<ServiceName> {
        self.entries
            .iter()
            .filter(|(_, e)| e.shown == HealthState::Healthy)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// `published`: the names the provider accepted in the last successful publish.
    pub fn views(&self, published: &BTreeSet<String>) -> Vec<ServiceHealthView> {
        let gate = self.gate();
        self.entries
            .iter()
            .map(|(name, e)| {
                let (state, reason) = e.effective(&gate);
                ServiceHealthView {
                    name: name.to_string(),
                    state,
                    advertised: published.contains(name.as_str()),
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
                    Some(format!("{name} unhealthy ({})", short(&reason)))
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

    /// Recomputes what each service shows, recording every change.
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
            if state != HealthState::Unknown {
                self.changes.push(HealthChange {
                    service: name.clone(),
                    healthy: state == HealthState::Healthy,
                    reason,
                });
            }
        }
    }

    /// The changes of effective state (check and gate) since the last call, in order; the
    /// shell logs them.
    pub fn take_changes(&mut self) -> Vec<HealthChange> {
        std::mem::take(&mut self.changes)
    }
}

/// Longest reason carried into STATUS= per service: a probe's detail can be a long TLS error.
const MAX_REASON_CHARS: usize = 120;

/// One line, at most `MAX_REASON_CHARS`.
fn short(text: &str) -> String {
    super::supervisor::fold_and_cut(text, MAX_REASON_CHARS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{CheckSpec, ServiceMode};
    use proptest::prelude::*;

    fn name(text: &str) -> ServiceName {
        text.parse().unwrap()
    }

    fn spec(port: u16, rise: u32, fall: u32, requires_gpus: bool) -> ServiceSpec {
        ServiceSpec {
            port,
            mode: ServiceMode::Tcp,
            tls_cert: false,
            requires_gpus,
            check: CheckSpec {
                kind: CheckKind::Tcp {
                    target: ([127, 0, 0, 1], port).into(),
                },
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(2),
                rise,
                fall,
            },
        }
    }

    fn services(list: &[(&str, ServiceSpec)]) -> BTreeMap<ServiceName, ServiceSpec> {
        list.iter().map(|(n, s)| (name(n), s.clone())).collect()
    }

    fn gpu_config(hold: Duration) -> GpuConfig {
        GpuConfig {
            xid_hold: hold,
            ..GpuConfig::default()
        }
    }

    fn ok(detail: &str) -> CheckResult {
        CheckResult {
            ok: true,
            detail: detail.into(),
            duration: Duration::from_millis(3),
        }
    }

    fn fail(detail: &str) -> CheckResult {
        CheckResult {
            ok: false,
            detail: detail.into(),
            duration: Duration::from_millis(700),
        }
    }

    use crate::core::model::test_inventory as gpus;

    /// Runs every due check with `result`; returns whether the advertised set changed.
    fn answer_all(health: &mut Health, result: &CheckResult, now: Instant) -> bool {
        let mut changed = false;
        for req in health.poll_checks(now) {
            changed |= health.handle_result(&req.service, req.generation, result.clone(), now);
        }
        changed
    }

    fn start() -> Instant {
        // Any instant will do; the engine itself never reads the clock.
        #[allow(clippy::disallowed_methods)]
        Instant::now()
    }

    fn view(health: &Health, service: &str) -> ServiceHealthView {
        health
            .views(&BTreeSet::new())
            .into_iter()
            .find(|v| v.name == service)
            .unwrap()
    }

    #[test]
    fn every_check_is_due_at_start_and_runs_once_at_a_time() {
        let t0 = start();
        let mut h = Health::new(
            &services(&[("a", spec(1, 2, 3, false)), ("b", spec(2, 2, 3, false))]),
            &GpuConfig::default(),
            t0,
        );
        assert_eq!(h.next_deadline(), Some(t0));
        let reqs = h.poll_checks(t0);
        let names: Vec<&str> = reqs.iter().map(|r| r.service.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(reqs[0].timeout, Duration::from_secs(2));
        assert_eq!(
            reqs[0].kind,
            CheckKind::Tcp {
                target: ([127, 0, 0, 1], 1).into()
            }
        );
        // Running: not issued again, and no deadline for it.
        assert!(h.poll_checks(t0 + Duration::from_secs(60)).is_empty());
        assert_eq!(h.next_deadline(), None);
        let t1 = t0 + Duration::from_millis(300);
        h.handle_result(&reqs[0].service, reqs[0].generation, ok("connected"), t1);
        assert_eq!(h.next_deadline(), Some(t0 + Duration::from_secs(5)));
        assert!(h.poll_checks(t0 + Duration::from_millis(4999)).is_empty());
        assert_eq!(h.poll_checks(t0 + Duration::from_secs(5)).len(), 1);
    }

    #[test]
    fn the_first_result_decides_at_once() {
        let t0 = start();
        let cfg = services(&[("up", spec(1, 5, 5, false)), ("down", spec(2, 5, 5, false))]);
        let mut h = Health::new(&cfg, &GpuConfig::default(), t0);
        assert!(h.advertised().is_empty());
        assert_eq!(view(&h, "up").state, HealthState::Unknown);
        assert_eq!(h.status_part(), "down not checked yet, up not checked yet");
        let reqs = h.poll_checks(t0);
        assert!(!h.handle_result(
            &name("down"),
            reqs[0].generation,
            fail("connect refused"),
            t0
        ));
        assert!(h.handle_result(&name("up"), reqs[1].generation, ok("connected"), t0));
        assert_eq!(h.advertised(), [name("up")]);
        assert_eq!(view(&h, "down").state, HealthState::Unhealthy);
        assert_eq!(h.status_part(), "down unhealthy (connect refused)");
        let up = view(&h, "up");
        assert_eq!(
            (up.state, up.transitions, up.checks),
            (HealthState::Healthy, 0, 1)
        );
    }

    #[test]
    fn a_healthy_service_turns_unhealthy_only_after_fall_failures_in_a_row() {
        let t0 = start();
        let mut h = Health::new(
            &services(&[("a", spec(1, 2, 3, false))]),
            &GpuConfig::default(),
            t0,
        );
        let mut t = t0;
        answer_all(&mut h, &ok("connected"), t);
        for result in [fail("x"), fail("x"), ok("connected"), fail("x"), fail("x")] {
            t += Duration::from_secs(5);
            assert!(!answer_all(&mut h, &result, t), "no flip yet");
        }
        assert_eq!(view(&h, "a").streak, 2);
        assert_eq!(view(&h, "a").reason, None);
        t += Duration::from_secs(5);
        assert!(answer_all(&mut h, &fail("connect refused"), t));
        let a = view(&h, "a");
        assert_eq!(a.state, HealthState::Unhealthy);
        assert_eq!(a.reason.as_deref(), Some("connect refused"));
        assert_eq!((a.since, a.transitions, a.streak), (t, 1, 0));
        assert_eq!((a.checks, a.failures), (7, 5));
    }

    #[test]
    fn an_unhealthy_service_turns_healthy_only_after_rise_successes_in_a_row() {
        let t0 = start();
        let mut h = Health::new(
            &services(&[("a", spec(1, 2, 3, false))]),
            &GpuConfig::default(),
            t0,
        );
        let mut t = t0;
        answer_all(&mut h, &fail("HTTP 500"), t);
        for result in [ok("HTTP 200"), fail("HTTP 503"), ok("HTTP 200")] {
            t += Duration::from_secs(5);
            assert!(!answer_all(&mut h, &result, t));
        }
        // The latest failure is the reason shown.
        assert_eq!(view(&h, "a").reason.as_deref(), Some("HTTP 503"));
        t += Duration::from_secs(5);
        assert!(answer_all(&mut h, &ok("HTTP 200"), t));
        assert_eq!(h.advertised(), [name("a")]);
        assert_eq!(h.status_part(), "");
    }

    #[test]
    fn a_long_or_multi_line_reason_is_folded_and_cut_in_status() {
        let t0 = start();
        let mut h = Health::new(
            &services(&[("a", spec(1, 2, 3, false))]),
            &GpuConfig::default(),
            t0,
        );
        let detail = format!("TLS: invalid peer certificate:\n{}", "x".repeat(200));
        answer_all(&mut h, &fail(&detail), t0);
        let part = h.status_part();
        assert!(
            part.starts_with("a unhealthy (TLS: invalid peer certificate: xxx"),
            "{part}"
        );
        assert!(part.ends_with("x…)"), "{part}");
        assert_eq!(
            part.chars().count(),
            "a unhealthy ()".len() + MAX_REASON_CHARS + 1
        );
        // The status API keeps the whole detail.
        assert_eq!(view(&h, "a").reason, Some(detail));
    }

    #[test]
    fn type_none_is_healthy_at_once_and_never_checked() {
        let t0 = start();
        let mut unchecked = spec(1, 2, 3, false);
        unchecked.check.kind = CheckKind::None;
        let mut h = Health::new(&services(&[("a", unchecked)]), &GpuConfig::default(), t0);
        assert_eq!(h.advertised(), [name("a")]);
        assert!(h.poll_checks(t0).is_empty());
        assert_eq!(h.next_deadline(), None);
        assert_eq!(view(&h, "a").check, "none");
    }

    #[test]
    fn check_durations_fill_cumulative_buckets() {
        let t0 = start();
        let mut h = Health::new(
            &services(&[("a", spec(1, 2, 3, false))]),
            &GpuConfig::default(),
            t0,
        );
        answer_all(&mut h, &ok("connected"), t0); // 3 ms
        answer_all(
            &mut h,
            &fail("timed out after 2s"),
            t0 + Duration::from_secs(5),
        ); // 700 ms
        let a = view(&h, "a");
        let le = |bound: f64| {
            let i = DURATION_BUCKETS.iter().position(|b| *b == bound).unwrap();
            a.duration_buckets[i]
        };
        assert_eq!(
            (le(0.0025), le(0.005), le(0.5), le(1.0), le(10.0)),
            (0, 1, 1, 2, 2)
        );
        assert!((a.duration_sum - 0.703).abs() < 1e-9);
        let (last, at) = a.last_result.unwrap();
        assert_eq!(
            (last.detail.as_str(), at),
            ("timed out after 2s", t0 + Duration::from_secs(5))
        );
    }

    #[test]
    fn a_check_is_due_an_interval_after_it_started_so_a_timeout_does_not_stretch_the_cycle() {
        let t0 = start();
        let mut h = Health::new(
            &services(&[("a", spec(1, 2, 3, false))]),
            &GpuConfig::default(),
            t0,
        );
        let req = h.poll_checks(t0).remove(0);
        // Timed out after 2s: due again 5s after it started, not 5s after it ended.
        let t1 = t0 + Duration::from_secs(2);
        h.handle_result(&req.service, req.generation, fail("timed out after 2s"), t1);
        assert_eq!(h.next_deadline(), Some(t0 + Duration::from_secs(5)));
        // A result later than the interval makes the next check due at once.
        let t5 = t0 + Duration::from_secs(5);
        let req = h.poll_checks(t5).remove(0);
        let late = t5 + Duration::from_secs(7);
        h.handle_result(
            &req.service,
            req.generation,
            fail("timed out after 2s"),
            late,
        );
        assert_eq!(h.next_deadline(), Some(late));
    }

    #[test]
    fn a_reload_that_changes_only_timing_keeps_the_state_and_a_changed_check_keeps_its_verdict_until_its_first_result()
     {
        let t0 = start();
        let cfg = services(&[("a", spec(1, 2, 3, false)), ("b", spec(2, 2, 3, false))]);
        let mut h = Health::new(&cfg, &GpuConfig::default(), t0);
        answer_all(&mut h, &ok("connected"), t0);
        let t1 = t0 + Duration::from_secs(5);
        let stale = h.poll_checks(t1);
        let (stale_a, stale_b) = (&stale[0], &stale[1]);
        // a: only the timing changes. b: the check itself (its target) changes.
        let mut a = spec(1, 1, 1, false);
        a.check.interval = Duration::from_secs(10);
        let mut b = spec(2, 2, 3, false);
        b.check.kind = CheckKind::Tcp {
            target: ([127, 0, 0, 1], 9).into(),
        };
        let new = services(&[("a", a.clone()), ("b", b.clone())]);
        h.reconfigure(&new, &GpuConfig::default(), t1);
        assert_eq!(h.advertised(), [name("a"), name("b")], "nothing withdrawn");
        assert!(h.take_changes().len() == 2, "only the first verdicts");
        let view_a = view(&h, "a");
        assert_eq!((view_a.since, view_a.checks), (t0, 1));
        // a's running check still counts, under the new fall = 1.
        assert!(h.handle_result(&stale_a.service, stale_a.generation, fail("x"), t1));
        assert_eq!(h.advertised(), [name("b")]);
        // b's new check is due now; a's next is 10s after its last start.
        let reqs = h.poll_checks(t1);
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].service.as_str(), "b");
        assert_eq!(reqs[0].kind, b.check.kind);
        assert_eq!(h.next_deadline(), Some(t1 + Duration::from_secs(10)));
        // The result of b's old check does not count.
        assert!(!h.handle_result(&stale_b.service, stale_b.generation, fail("x"), t1));
        assert_eq!(view(&h, "b").checks, 1);
        // The first result of the new check decides at once, not after fall = 3.
        assert!(h.handle_result(&reqs[0].service, reqs[0].generation, fail("refused"), t1));
        assert!(h.advertised().is_empty());
        assert_eq!(view(&h, "b").transitions, 1);
        // Then fall and rise apply again.
        let t2 = t1 + Duration::from_secs(5);
        let req = h.poll_checks(t2).remove(0);
        assert!(!h.handle_result(&req.service, req.generation, ok("connected"), t2));
        // A new service starts unknown; a removed service's late result is ignored.
        let new = services(&[("a", a), ("c", spec(3, 2, 3, false))]);
        h.reconfigure(&new, &GpuConfig::default(), t2);
        assert_eq!(view(&h, "c").state, HealthState::Unknown);
        assert!(!h.handle_result(&name("b"), req.generation, ok("connected"), t2));
    }

    #[test]
    fn a_service_that_requires_gpus_waits_for_the_first_probe_and_needs_a_usable_gpu() {
        let t0 = start();
        let cfg = services(&[
            ("molt-provider", spec(1, 2, 3, true)),
            ("web", spec(2, 2, 3, false)),
        ]);
        let mut h = Health::new(&cfg, &GpuConfig::default(), t0);
        answer_all(&mut h, &ok("connected"), t0);
        assert_eq!(h.advertised(), [name("web")]);
        assert_eq!(view(&h, "molt-provider").state, HealthState::Unknown);
        assert_eq!(h.status_part(), "molt-provider not checked yet");

        assert!(!h.handle_inventory(&gpus(0, 0), t0));
        let mp = view(&h, "molt-provider");
        assert_eq!(mp.state, HealthState::Unhealthy);
        assert_eq!(
            mp.reason.as_deref(),
            Some("no usable GPU: nvml_unavailable: libnvidia-ml.so.1 missing")
        );
        assert!(h.handle_inventory(&gpus(1, 1), t0));
        assert_eq!(h.advertised(), [name("molt-provider"), name("web")]);
        assert!(h.handle_inventory(&gpus(0, 2), t0));
        assert_eq!(h.advertised(), [name("web")]);
        assert_eq!(
            h.status_part(),
            "molt-provider unhealthy (no usable GPU: GPU 0 lost, GPU 1 lost)"
        );
        assert_eq!(view(&h, "molt-provider").transitions, 2);
        // Gate changes apply at once, with no rise.
        assert!(h.handle_inventory(&gpus(2, 0), t0));
        assert_eq!(view(&h, "molt-provider").state, HealthState::Healthy);
    }

    #[test]
    fn an_xid_that_needs_a_reset_holds_its_gpu_until_the_hold_expires() {
        let t0 = start();
        let hold = Duration::from_secs(3);
        let cfg = services(&[("molt-provider", spec(1, 2, 3, true))]);
        let mut h = Health::new(&cfg, &gpu_config(hold), t0);
        answer_all(&mut h, &ok("connected"), t0);
        h.handle_inventory(&gpus(1, 0), t0);
        assert_eq!(h.advertised(), [name("molt-provider")]);

        // XID 13 (a graphics engine exception in an application) is not in the list.
        assert!(!h.handle_xid(XidEvent { index: 0, code: 13 }, t0));
        assert!(h.handle_xid(XidEvent { index: 0, code: 79 }, t0));
        assert_eq!(
            h.status_part(),
            "molt-provider unhealthy (no usable GPU: GPU 0 held after XID 79)"
        );
        let t1 = t0 + Duration::from_secs(2);
        assert!(
            !h.handle_xid(XidEvent { index: 0, code: 79 }, t1),
            "renews the hold"
        );
        assert!(h.next_deadline().unwrap() <= t1 + hold);
        assert_eq!(h.handle_timeout(t0 + hold), Expiry::default());
        assert!(h.advertised().is_empty());
        assert_eq!(
            h.handle_timeout(t1 + hold),
            Expiry {
                expired: true,
                advertised_changed: true
            }
        );
        assert_eq!(h.advertised(), [name("molt-provider")]);
    }

    #[test]
    fn a_held_gpu_leaves_the_others_usable_and_a_reload_clears_every_hold() {
        let t0 = start();
        let cfg = services(&[("molt-provider", spec(1, 2, 3, true))]);
        let gpu = gpu_config(Duration::from_secs(3600));
        let mut h = Health::new(&cfg, &gpu, t0);
        answer_all(&mut h, &ok("connected"), t0);
        h.handle_inventory(&gpus(2, 0), t0);
        assert!(!h.handle_xid(XidEvent { index: 0, code: 48 }, t0));
        assert_eq!(h.advertised(), [name("molt-provider")]);
        assert!(h.handle_xid(
            XidEvent {
                index: 1,
                code: 119
            },
            t0
        ));
        assert!(h.advertised().is_empty());
        h.reconfigure(&cfg, &gpu, t0);
        assert_eq!(h.advertised(), [name("molt-provider")]);
        assert_eq!(h.next_deadline(), Some(t0 + Duration::from_secs(5)));
    }

    #[test]
    fn a_service_without_requires_gpus_ignores_the_gpus() {
        let t0 = start();
        let mut h = Health::new(
            &services(&[("web", spec(2, 2, 3, false))]),
            &GpuConfig {
                enabled: false,
                ..GpuConfig::default()
            },
            t0,
        );
        answer_all(&mut h, &ok("connected"), t0);
        assert!(!h.handle_inventory(&gpus(0, 4), t0));
        assert!(!h.handle_xid(XidEvent { index: 0, code: 79 }, t0));
        assert_eq!(h.advertised(), [name("web")]);
    }

    proptest! {
        /// Whatever the results, the first decides at once, and every later change of what
        /// is advertised follows `rise` oks or `fall` failures in a row.
        #[test]
        fn the_advertised_state_never_flips_faster_than_rise_and_fall_allow(
            rise in 1u32..5,
            fall in 1u32..5,
            results in proptest::collection::vec(any::<bool>(), 1..60),
        ) {
            let t0 = start();
            let cfg = services(&[("a", spec(1, rise, fall, false))]);
            let mut h = Health::new(&cfg, &GpuConfig::default(), t0);
            let mut t = t0;
            let mut advertised = false;
            let mut flips = 0;
            for (i, &result_ok) in results.iter().enumerate() {
                let result = if result_ok { ok("connected") } else { fail("connect refused") };
                let reqs = h.poll_checks(t);
                prop_assert_eq!(reqs.len(), 1);
                let changed = h.handle_result(&reqs[0].service, reqs[0].generation, result, t);
                let now_advertised = !h.advertised().is_empty();
                prop_assert_eq!(changed, now_advertised != advertised);
                if i == 0 {
                    prop_assert_eq!(now_advertised, result_ok, "the first result decides");
                    prop_assert_ne!(view(&h, "a").state, HealthState::Unknown);
                } else if now_advertised != advertised {
                    flips += 1;
                    let needed = if now_advertised { rise } else { fall } as usize;
                    prop_assert!(i + 1 >= needed);
                    let window = &results[i + 1 - needed..=i];
                    prop_assert!(
                        window.iter().all(|&r| r == now_advertised),
                        "flip at {} without {} results in a row: {:?}", i, needed, window
                    );
                }
                advertised = now_advertised;
                t = h.next_deadline().unwrap();
            }
            prop_assert_eq!(view(&h, "a").transitions, flips);
            prop_assert_eq!(view(&h, "a").checks, results.len() as u64);
        }
    }
}
