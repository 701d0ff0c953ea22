//! The validated configuration: every default filled in, every value checked.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use super::types::{
    DnsLabel, Endpoint, InterfaceName, LogLevel, NodeName, ProviderKind, PublicKey, Secret,
    ServiceName, Tag, WgBackend,
};

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub node: NodeConfig,
    pub api: ApiConfig,
    pub network: NetworkConfig,
    pub gpu: GpuConfig,
    /// Merged from `[services.*]` and `[network.tailscale.services]`.
    pub services: BTreeMap<ServiceName, ServiceSpec>,
    pub log: LogConfig,
    pub gateway: GatewayConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    pub name: NodeName,
    pub state_dir: PathBuf,
    pub runtime_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ApiConfig {
    pub socket: PathBuf,
    /// When set the socket is mode 0660 owned by this group, otherwise 0600.
    pub socket_group: Option<String>,
    pub metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfig {
    pub provider: ProviderKind,
    pub wireguard: WireguardConfig,
    pub tailscale: TailscaleConfig,
    #[cfg(feature = "test-fakes")]
    pub fake: FakeMeshConfig,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WireguardConfig {
    pub interface: InterfaceName,
    pub backend: WgBackend,
    pub userspace_implementation: PathBuf,
    pub listen_port: u16,
    /// `None` when unset or 0.
    pub fwmark: Option<u32>,
    pub mesh_cidr: IpNet,
    /// Always `Some` when the provider is WireGuard, unless a join token is set (a gateway
    /// assigns the address then).
    pub address: Option<IpNet>,
    pub mtu: u16,
    pub private_key_file: PathBuf,
    pub peers_dir: PathBuf,
    pub node_info_port: u16,
    pub reconcile_interval: Duration,
    /// Leave the interface (and the userspace daemon) in place when clawnode stops.
    pub keep_interface_on_stop: bool,
    /// Take over an existing WireGuard interface of this name that clawnode did not create.
    pub adopt_existing_interface: bool,
    /// Route every allowed IP as configured, even a default route, one covering a peer's
    /// endpoint or one inside a network this host is attached to (refused otherwise).
    pub allow_unsafe_routes: bool,
    /// Where the gateway join token comes from; `None`: no gateway (unless already joined).
    pub join_token: Option<JoinTokenSource>,
    /// How long past expiry gateway peer records stay while no gateway is reachable.
    pub gateway_offline_grace: Duration,
    pub peers: Vec<PeerConfig>,
}

/// Where a node reads its gateway join token (read once, at the first join).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinTokenSource {
    File(PathBuf),
    Env(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct PeerConfig {
    pub name: String,
    pub public_key: PublicKey,
    pub endpoint: Option<Endpoint>,
    pub allowed_ips: Vec<IpNet>,
    /// Seconds; `None` when off.
    pub persistent_keepalive: Option<u16>,
    pub preshared_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TailscaleConfig {
    pub socket: PathBuf,
    /// `None`: the node is expected to be logged in already.
    pub auth: Option<TailscaleAuth>,
    pub hostname_prefix: DnsLabel,
    pub tailnet: Option<String>,
    pub tags: Vec<Tag>,
    pub control_url: Option<String>,
    /// Where `GET /v1/node` listens on the node's Tailscale IPv4.
    pub node_info_port: u16,
    /// The UDP port tailscaled serves as a peer relay on; `None` leaves the pref alone.
    pub relay_server_port: Option<u16>,
    /// Turn relaying off at stop, if clawnode turned it on and nobody changed it since.
    pub relay_clear_on_stop: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TailscaleAuth {
    Key(Secret),
    KeyFile(PathBuf),
    /// The name of the environment variable holding the key.
    KeyEnv(String),
    WorkloadIdentity {
        client_id: String,
        id_token: IdTokenSource,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum IdTokenSource {
    File(PathBuf),
    Audience(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuConfig {
    pub enabled: bool,
    /// The node is not ready while no GPU can be probed.
    pub required: bool,
    pub nvml_library: Option<PathBuf>,
    pub poll_interval: Duration,
    /// XID codes after which a GPU counts as unusable until `xid_hold` has passed since the
    /// last one (or a reload).
    pub unhealthy_xids: BTreeSet<u64>,
    pub xid_hold: Duration,
}

/// The defaults of an empty `[gpu]` table.
impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            enabled: true,
            required: false,
            nvml_library: None,
            poll_interval: Duration::from_secs(10),
            unhealthy_xids: DEFAULT_UNHEALTHY_XIDS.into_iter().collect(),
            xid_hold: Duration::from_secs(60 * 60),
        }
    }
}

/// The XIDs NVIDIA's catalog (docs.nvidia.com/deploy/xid-errors) says need a GPU reset or a
/// reboot: 48 double-bit ECC, 63/64 row remapping pending or failed, 74 NVLink, 79 fell off
/// the bus, 94/95 contained/uncontained ECC, 119/120 GSP.
pub const DEFAULT_UNHEALTHY_XIDS: [u64; 9] = [48, 63, 64, 74, 79, 94, 95, 119, 120];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub port: u16,
    pub mode: ServiceMode,
    /// Fetch a TLS certificate for the service's MagicDNS name (tailscale provider only).
    pub tls_cert: bool,
    /// Unhealthy while no GPU is usable, whatever its check says.
    pub requires_gpus: bool,
    pub check: CheckSpec,
}

/// `[services.<name>.check]`: how the service's health is probed and how results count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSpec {
    pub kind: CheckKind,
    pub interval: Duration,
    /// A probe never runs longer; at most `interval`.
    pub timeout: Duration,
    /// Consecutive successes that turn an unhealthy service healthy.
    pub rise: u32,
    /// Consecutive failures that turn a healthy service unhealthy.
    pub fall: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// Not checked: always healthy (still subject to the GPU gate).
    None,
    Tcp {
        target: SocketAddr,
    },
    Http(HttpCheck),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCheck {
    pub target: SocketAddr,
    pub path: String,
    /// Inclusive range of statuses that count as healthy.
    pub expect: (u16, u16),
    /// `None`: plain http.
    pub tls: Option<HttpsCheck>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsCheck {
    pub skip_verify: bool,
    /// SNI and the name verified against the system roots.
    pub server_name: String,
}

/// "tcp 127.0.0.1:8443", "http GET http://127.0.0.1:8080/healthz expect 200-399", "none".
impl fmt::Display for CheckKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckKind::None => f.write_str("none"),
            CheckKind::Tcp { target } => write!(f, "tcp {target}"),
            CheckKind::Http(http) => {
                let scheme = if http.tls.is_some() { "https" } else { "http" };
                write!(f, "http GET {scheme}://{}{}", http.target, http.path)?;
                let (lo, hi) = http.expect;
                if lo == hi {
                    write!(f, " expect {lo}")?;
                } else {
                    write!(f, " expect {lo}-{hi}")?;
                }
                match &http.tls {
                    Some(tls) if tls.skip_verify => f.write_str(" (certificate not verified)"),
                    Some(tls) if tls.server_name != "localhost" => {
                        write!(f, " (verified as {})", tls.server_name)
                    }
                    Some(_) | None => Ok(()),
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceMode {
    Tcp,
    Http { tls: bool },
}

/// `[gateway]`: this node also serves coordination (joins, the peer stream) over HTTPS.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewayConfig {
    pub enabled: bool,
    pub listen: SocketAddr,
    /// What nodes are told; `None`: `https://<mesh address>:<listen port>`.
    pub public_url: Option<String>,
    pub store: GatewayStore,
    /// Where joining nodes' mesh addresses come from.
    pub address_pool: IpNet,
    /// How long a signed node record is valid (re-signed when half is left).
    pub record_lifetime: Duration,
    /// Connections served at once; the next ones get 503 with a Retry-After.
    pub max_sessions: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayStore {
    /// `<state_dir>/gateway/store.sqlite`: one gateway.
    Sqlite,
    /// An etcd cluster shared by every gateway of the mesh.
    Etcd(EtcdConfig),
}

/// `[gateway] store = "etcd"`: where the cluster is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `http://` or `https://` client URLs.
    pub endpoints: Vec<String>,
    /// Every key lives under it; starts and ends with `/`.
    pub prefix: String,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// The key prefix when `etcd_prefix` is not set.
pub const DEFAULT_ETCD_PREFIX: &str = "/clawbernetes/";

#[derive(Debug, Clone, PartialEq)]
pub struct LogConfig {
    pub level: LogLevel,
}

/// Knobs for the fake mesh provider used by tests.
#[cfg(feature = "test-fakes")]
#[derive(Debug, Clone, PartialEq)]
pub struct FakeMeshConfig {
    pub join_delay: Duration,
    /// The first N join attempts fail.
    pub fail_joins: u32,
    pub always_fail: bool,
    pub fail_message: String,
    pub publish_fail: bool,
    /// Shown in summaries as the node's mesh address.
    pub address: String,
}

impl Config {
    /// A short human summary for `check-config`. Names the auth method, never a secret.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        self.write_summary(&mut out)
            .expect("writing to a String cannot fail");
        out
    }

    fn write_summary(&self, out: &mut String) -> std::fmt::Result {
        let node = &self.node;
        writeln!(out, "node: {}", node.name)?;
        writeln!(
            out,
            "  state_dir {}, runtime_dir {}",
            node.state_dir.display(),
            node.runtime_dir.display()
        )?;

        let api = &self.api;
        let access = match &api.socket_group {
            Some(group) => format!("mode 0660, group {group}"),
            None => "mode 0600".to_owned(),
        };
        let metrics = api
            .metrics_listen
            .map_or_else(|| "off".to_owned(), |addr| addr.to_string());
        writeln!(
            out,
            "api: socket {} ({access}), metrics {metrics}",
            api.socket.display()
        )?;

        writeln!(out, "network: {}", self.network.provider)?;
        match self.network.provider {
            ProviderKind::Wireguard => self.write_wireguard(out)?,
            ProviderKind::Tailscale => self.write_tailscale(out)?,
            #[cfg(feature = "test-fakes")]
            ProviderKind::Fake => {
                let fake = &self.network.fake;
                writeln!(
                    out,
                    "  address {}, join delay {}, failing joins {}{}",
                    fake.address,
                    humantime::format_duration(fake.join_delay),
                    fake.fail_joins,
                    if fake.always_fail {
                        ", always fails"
                    } else {
                        ""
                    }
                )?;
            }
        }

        if self.services.is_empty() {
            writeln!(out, "services: none")?;
        } else {
            writeln!(out, "services:")?;
            for (name, spec) in &self.services {
                let mode = match spec.mode {
                    ServiceMode::Tcp => "tcp",
                    ServiceMode::Http { tls: true } => "http+tls",
                    ServiceMode::Http { tls: false } => "http",
                };
                write!(
                    out,
                    "  {name} {}/{mode}, check {}",
                    spec.port, spec.check.kind
                )?;
                if spec.check.kind != CheckKind::None {
                    let check = &spec.check;
                    write!(
                        out,
                        " every {} (timeout {}, rise {}, fall {})",
                        humantime::format_duration(check.interval),
                        humantime::format_duration(check.timeout),
                        check.rise,
                        check.fall
                    )?;
                }
                if spec.requires_gpus {
                    write!(out, ", requires GPUs")?;
                }
                writeln!(out)?;
            }
        }

        let gpu = &self.gpu;
        if gpu.enabled {
            writeln!(
                out,
                "gpu: enabled ({}), poll every {}{}",
                if gpu.required { "required" } else { "optional" },
                humantime::format_duration(gpu.poll_interval),
                gpu.nvml_library
                    .as_ref()
                    .map(|lib| format!(", nvml {}", lib.display()))
                    .unwrap_or_default()
            )?;
            let xids: Vec<String> = gpu.unhealthy_xids.iter().map(u64::to_string).collect();
            writeln!(
                out,
                "  unusable for {} after XID {}",
                humantime::format_duration(gpu.xid_hold),
                if xids.is_empty() {
                    "(none)".to_owned()
                } else {
                    xids.join(", ")
                }
            )?;
        } else {
            writeln!(out, "gpu: disabled")?;
        }
        let gw = &self.gateway;
        if gw.enabled {
            writeln!(
                out,
                "gateway: listen {}, url {}, addresses from {}, records valid {}, at most {} sessions",
                gw.listen,
                gw.public_url.as_deref().unwrap_or("(mesh address)"),
                gw.address_pool,
                humantime::format_duration(gw.record_lifetime),
                gw.max_sessions
            )?;
            match &gw.store {
                GatewayStore::Sqlite => writeln!(out, "  store sqlite")?,
                GatewayStore::Etcd(etcd) => writeln!(
                    out,
                    "  store etcd {} under {}{}",
                    etcd.endpoints.join(","),
                    etcd.prefix,
                    if etcd.cert_file.is_some() {
                        ", client certificate"
                    } else {
                        ""
                    }
                )?,
            }
        }
        write!(out, "log: {}", self.log.level)
    }

    fn write_wireguard(&self, out: &mut String) -> std::fmt::Result {
        let wg = &self.network.wireguard;
        let address = wg
            .address
            .map_or_else(|| "none".to_owned(), |a| a.to_string());
        writeln!(
            out,
            "  interface {} (backend {}), address {address} in mesh {}",
            wg.interface, wg.backend, wg.mesh_cidr
        )?;
        writeln!(
            out,
            "  listen port {}, mtu {}, node info port {}, reconcile every {}",
            wg.listen_port,
            wg.mtu,
            wg.node_info_port,
            humantime::format_duration(wg.reconcile_interval)
        )?;
        writeln!(
            out,
            "  private key {}, peers from {} and {} static peer(s)",
            wg.private_key_file.display(),
            wg.peers_dir.display(),
            wg.peers.len()
        )
    }

    fn write_tailscale(&self, out: &mut String) -> std::fmt::Result {
        let ts = &self.network.tailscale;
        writeln!(
            out,
            "  tailscaled {}, hostname prefix {}",
            ts.socket.display(),
            ts.hostname_prefix
        )?;
        let tags: Vec<&str> = ts.tags.iter().map(Tag::as_str).collect();
        writeln!(
            out,
            "  tailnet {}, tags {}",
            ts.tailnet.as_deref().unwrap_or("(default)"),
            if tags.is_empty() {
                "none".to_owned()
            } else {
                tags.join(", ")
            }
        )?;
        if let Some(url) = &ts.control_url {
            writeln!(out, "  control server {url}")?;
        }
        if let Some(port) = ts.relay_server_port {
            let stop = if ts.relay_clear_on_stop {
                "cleared at stop"
            } else {
                "kept at stop"
            };
            writeln!(out, "  peer relay on UDP {port} ({stop})")?;
        }
        let auth = match &ts.auth {
            None => "none (tailscaled must already be logged in)".to_owned(),
            Some(TailscaleAuth::Key(_)) => "auth key (inline)".to_owned(),
            Some(TailscaleAuth::KeyFile(path)) => format!("auth key file {}", path.display()),
            Some(TailscaleAuth::KeyEnv(var)) => format!("auth key from ${var}"),
            Some(TailscaleAuth::WorkloadIdentity {
                client_id,
                id_token,
            }) => match id_token {
                IdTokenSource::File(path) => format!(
                    "workload identity (client {client_id}, id token file {})",
                    path.display()
                ),
                IdTokenSource::Audience(audience) => {
                    format!("workload identity (client {client_id}, audience {audience})")
                }
            },
        };
        writeln!(out, "  auth: {auth}")
    }
}
