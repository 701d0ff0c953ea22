//! The mesh's live view as the status API shows it, one document shape per provider. The
//! providers fill these in at request time; the API and the CLI only read them, so neither
//! needs to know the provider modules.

use serde::{Deserialize, Serialize};

use crate::core::tailscale_relay::{PathCounts, PathKind};

/// The mesh as it is right now, read at request time from whichever provider runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LiveStatus {
    /// The WireGuard interface and its peers, read from the device.
    Wireguard(WgStatus),
    /// Identity, tailnet and per-service approval, read from tailscaled.
    Tailscale(TsStatus),
}

impl LiveStatus {
    /// The tunnel peers clawnode manages itself (none on a tailnet).
    pub fn tunnel_peers(&self) -> &[TunnelPeer] {
        match self {
            LiveStatus::Wireguard(wg) => &wg.peers,
            LiveStatus::Tailscale(_) => &[],
        }
    }

    /// Which path each tailnet peer's traffic takes, when the provider knows.
    pub fn tailscale_paths(&self) -> Option<&PathsDoc> {
        match self {
            LiveStatus::Tailscale(ts) => ts.paths.as_ref(),
            LiveStatus::Wireguard(_) => None,
        }
    }

    /// The gateway connection, for a self-hosted node that follows one.
    pub fn gateway(&self) -> Option<&GatewayDoc> {
        match self {
            LiveStatus::Wireguard(wg) => wg.gateway.as_ref(),
            LiveStatus::Tailscale(_) => None,
        }
    }
}

/// One tunnel peer as the device reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelPeer {
    pub name: Option<String>,
    pub public_key: String,
    pub endpoint: Option<String>,
    pub allowed_ips: Vec<String>,
    pub persistent_keepalive: Option<u16>,
    pub last_handshake_unix_ms: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WgStatus {
    pub backend: String,
    pub interface: String,
    pub public_key: Option<String>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub addresses: Vec<String>,
    pub peers: Vec<TunnelPeer>,
    /// The node's gateway connection, when it follows a gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayDoc>,
}

/// A node's view of its gateways, for `status --json` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayDoc {
    /// The gateway that answered last.
    pub url: Option<String>,
    /// live | cached | joining
    pub state: String,
    pub cursor: Option<String>,
    /// Seconds since a gateway last answered.
    pub cursor_age_s: Option<u64>,
    /// Unix seconds: live since, or (cached) the last good answer the peers come from.
    pub since: u64,
    /// Gateway peers known (this node excluded).
    pub peers: usize,
    /// Answers applied since start, by kind.
    pub snapshots: u64,
    pub deltas: u64,
    /// Every gateway this node knows (answers, signed gateway records, bootstrap URLs).
    #[serde(default)]
    pub gateways: Vec<String>,
    /// The gateway polled now, or tried next while none answers.
    #[serde(default)]
    pub current: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TsStatus {
    pub backend_state: String,
    pub daemon_version: Option<String>,
    /// Connected to the control plane.
    pub online: bool,
    pub hostname: Option<String>,
    /// MagicDNS name without the trailing dot.
    pub dns_name: Option<String>,
    pub ips: Vec<String>,
    pub tailnet: Option<String>,
    pub magic_dns_suffix: Option<String>,
    pub tags: Vec<String>,
    /// Who owns this device: its own profile for a tagged node.
    pub owner: Option<Owner>,
    pub services: Vec<TsServiceState>,
    /// The peer relay this node serves; `None` when `relay_server_port` is not configured and
    /// the pref is unset.
    #[serde(default)]
    pub relay: Option<RelayDoc>,
    /// Per-peer paths; `None` when the peer list could not be read (`paths_error` says why).
    #[serde(default)]
    pub paths: Option<PathsDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paths_error: Option<String>,
    /// Set when the live read failed; the other fields are then empty.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayDoc {
    /// `relay_server_port` from the config.
    pub wanted: Option<u16>,
    /// `RelayServerPort` in tailscaled's prefs now.
    pub port: Option<u16>,
    /// serving | off | unsupported | pending
    pub state: String,
    pub problem: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathsDoc {
    /// `12 peers: 9 direct, 2 peer-relay, 1 DERP fra`.
    pub summary: String,
    pub counts: PathCounts,
    /// This node serves as a peer relay, or some peer is reached through one.
    pub relay_available: bool,
    pub peers: Vec<PeerPathDoc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerPathDoc {
    pub name: String,
    pub ip: Option<String>,
    pub path: PathKind,
    /// The direct endpoint, the peer relay (`ip:port:vni:N`) or the DERP region.
    pub via: Option<String>,
    /// For a peer on DERP while a relay is available: why it may not use the relay.
    pub hint: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub login_name: String,
    pub display_name: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TsServiceState {
    /// `svc:<label>`.
    pub name: String,
    pub port: u16,
    /// approved | awaiting approval | not advertised | failed
    pub state: String,
    /// In `AdvertiseServices` and in the serve config.
    pub advertised: bool,
    pub approved: bool,
    /// The service's VIPs, once approved.
    pub vips: Vec<String>,
    pub reason: Option<String>,
    pub cert: Option<CertDoc>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertDoc {
    pub domain: String,
    /// waiting for the domain | issued | failed
    pub state: String,
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
    pub fetched_unix_ms: Option<u64>,
    pub error: Option<String>,
}
