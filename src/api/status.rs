//! The JSON document behind `GET /v1/status` and `clawnode status --json`.
//! Field names are part of the documented interface (README, "Status API").

use serde::{Deserialize, Serialize};

use crate::core::model::{GpuInfo, ServiceAd};
use crate::mesh::LiveStatus;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusDoc {
    pub node: String,
    pub version: String,
    pub pid: u32,
    pub provider: String,
    /// starting | joining | ready | degraded | stopping
    pub phase: String,
    pub ready: bool,
    /// The same one-line summary systemd shows as the unit's status text.
    pub status: String,
    pub config: ConfigDoc,
    pub mesh: MeshDoc,
    pub gpu: GpuDoc,
    pub services: ServicesDoc,
    /// Most recent last; at most 16.
    pub last_errors: Vec<ErrorDoc>,
    /// The gateway role's counters, on a node with `[gateway] enabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_role: Option<crate::gateway::view::RoleDoc>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigDoc {
    pub path: String,
    /// Set when the last reload was rejected and the previous config is still in effect.
    pub reload_note: Option<String>,
}

/// The health of one supervised component.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentDoc {
    /// pending | up | failed
    pub state: String,
    pub summary: Option<String>,
    pub error: Option<String>,
    /// The failure needs the operator (a wrong tailnet, a tag the policy does not permit):
    /// retrying alone cannot fix it, so it is rechecked slowly and at every reload.
    #[serde(default)]
    pub waiting_for_operator: bool,
    /// Consecutive failures so far.
    pub attempts: u32,
    /// When the next retry runs (Unix time in milliseconds), if one is scheduled.
    pub next_retry_unix_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshDoc {
    #[serde(flatten)]
    pub health: ComponentDoc,
    pub interface: Option<String>,
    pub address: Option<String>,
    pub peers: usize,
    /// Problems that did not stop the join, e.g. a rejected peer file with its file:line:col.
    pub problems: Vec<String>,
    /// The provider's live view, read at request time: `wireguard` (the interface and its
    /// peers) or `tailscale` (identity, tailnet, per-service approval).
    #[serde(flatten)]
    pub live: Option<LiveStatus>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuDoc {
    #[serde(flatten)]
    pub health: ComponentDoc,
    pub enabled: bool,
    pub required: bool,
    pub count: usize,
    pub driver_version: Option<String>,
    pub unavailable_reason: Option<String>,
    pub cuda_driver_version: Option<String>,
    pub devices: Vec<GpuInfo>,
    /// Critical XID errors per GPU and code, read at request time.
    pub xid_errors: Vec<XidDoc>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct XidDoc {
    pub gpu: u32,
    pub xid: u64,
    pub count: u64,
    pub last_seen_unix_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicesDoc {
    #[serde(flatten)]
    pub health: ComponentDoc,
    /// What the configuration asks to advertise.
    pub configured: Vec<ServiceAd>,
    /// True while the mesh provider holds the advertisement.
    pub advertised: bool,
    /// Each configured service's health check, in config order.
    #[serde(default)]
    pub checks: Vec<ServiceCheckDoc>,
}

/// One service's health: what its check says and whether it is advertised.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceCheckDoc {
    pub name: String,
    /// unknown | healthy | unhealthy
    pub state: String,
    /// The mesh provider holds its advertisement: the last successful publish carried it and
    /// nothing (mesh failure, stop, provider change) withdrew it since. A healthy service is
    /// not advertised while the mesh is down or its publish failed.
    pub advertised: bool,
    /// Why it is not healthy: the check's detail or the GPU gate.
    pub reason: Option<String>,
    /// The check in words, e.g. "tcp 127.0.0.1:8443".
    pub check: String,
    pub requires_gpus: bool,
    pub last_result: Option<CheckResultDoc>,
    /// When `state` was entered (Unix time in milliseconds).
    pub since_unix_ms: u64,
    pub checks: u64,
    pub failures: u64,
    /// Changes between healthy and unhealthy.
    pub transitions: u64,
    /// For `/metrics` only.
    #[serde(skip)]
    pub durations: DurationHistogram,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResultDoc {
    pub ok: bool,
    /// "connected", "connect refused", "HTTP 500 (expected 200-399)", "timed out after 2s", ...
    pub detail: String,
    pub duration_ms: u64,
    pub at_unix_ms: u64,
}

/// Check durations as a Prometheus histogram: cumulative counts per bucket of
/// `core::health::DURATION_BUCKETS`; the `+Inf` bucket is the check count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DurationHistogram {
    pub buckets: Vec<u64>,
    /// In microseconds, so the document stays `Eq`.
    pub sum_us: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDoc {
    /// mesh | gpu | services | config | withdraw
    pub source: String,
    pub message: String,
    /// When it happened, Unix time in milliseconds.
    pub at_unix_ms: u64,
}

/// The `config` part of the document.
pub fn status_config(path: &std::path::Path, reload_note: Option<String>) -> ConfigDoc {
    ConfigDoc {
        path: path.display().to_string(),
        reload_note,
    }
}
