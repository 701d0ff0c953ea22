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
