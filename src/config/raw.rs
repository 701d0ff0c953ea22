//! The file as written: loose types, every key optional, unknown keys refused. Values are
//! checked in `validate`, which can report all problems at once, whereas serde stops at the
//! first.

use std::collections::BTreeMap;

use serde::Deserialize;
use zeroize::Zeroize;

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct RawConfig {
    pub node: RawNode,
    pub api: RawApi,
    pub network: RawNetwork,
    pub gpu: RawGpu,
    pub services: BTreeMap<String, RawService>,
    pub log: RawLog,
    pub gateway: RawGateway,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct RawNode {
    pub name: Option<String>,
    pub state_dir: Option<String>,
    pub runtime_dir: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct RawApi {
    pub socket: Option<String>,
    pub socket_group: Option<String>,
    pub metrics_listen: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct RawNetwork {
    pub provider: Option<String>,
    pub wireguard: RawWireguard,
    pub tailscale: RawTailscale,
    #[cfg(feature = "test-fakes")]
    pub fake: RawFake,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct RawWireguard {
    pub interface: Option<String>,
    pub backend: Option<String>,
    pub userspace_implementation: Option<String>,
    pub listen_port: Option<i64>,
    pub fwmark: Option<i64>,
    pub mesh_cidr: Option<String>,
    pub address: Option<String>,
    pub mtu: Option<i64>,
    pub private_key_file: Option<String>,
    pub peers_dir: Option<String>,
    pub node_info_port: Option<i64>,
    pub reconcile_interval: Option<String>,
    pub keep_interface_on_stop: Option<bool>,
    pub adopt_existing_interface: Option<bool>,
    pub allow_unsafe_routes: Option<bool>,
    pub join_token_file: Option<String>,
    pub join_token_env: Option<String>,
    pub gateway_offline_grace: Option<String>,
    pub peers: Vec<RawPeer>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct RawPeer {
    pub name: Option<String>,
    pub public_key: Option<String>,
    pub endpoint: Option<String>,
    pub allowed_ips: Option<Vec<String>>,
    pub persistent_keepalive: Option<i64>,
    pub preshared_key_file: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct RawTailscale {
    pub socket: Option<String>,
    pub auth_key: Option<RawSecret>,
    pub auth_key_file: Option<String>,
    pub auth_key_env: Option<String>,
    pub workload_identity: Option<RawWorkloadIdentity>,
    pub hostname_prefix: Option<String>,
    pub tailnet: Option<String>,
    pub tags: Option<Vec<String>>,
    pub control_url: Option<String>,
    pub node_info_port: Option<i64>,
    pub relay_server_port: Option<i64>,
    pub relay_clear_on_stop: Option<bool>,
    pub services: BTreeMap<String, RawService>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct RawWorkloadIdentity {
    pub client_id: Option<String>,
    pub id_token_file: Option<String>,
    pub audience: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct RawService {
    pub port: Option<i64>,
    pub mode: Option<String>,
    pub tls: Option<bool>,
    pub tls_cert: Option<bool>,
    pub requires_gpus: Option<bool>,
    pub check: Option<RawCheck>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct RawCheck {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub target: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub rise: Option<i64>,
    pub fall: Option<i64>,
    pub path: Option<String>,
    pub expect: Option<String>,
    pub scheme: Option<String>,
    pub tls_skip_verify: Option<bool>,
    pub server_name: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct RawGpu {
    pub enabled: Option<bool>,
    pub required: Option<bool>,
    pub nvml_library: Option<String>,
    pub poll_interval: Option<String>,
    pub unhealthy_xids: Option<Vec<i64>>,
    pub xid_hold: Option<String>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct RawGateway {
    pub enabled: Option<bool>,
    pub listen: Option<String>,
    pub public_url: Option<String>,
    pub store: Option<String>,
    pub etcd_endpoints: Option<Vec<String>>,
    pub etcd_prefix: Option<String>,
    pub etcd_ca_file: Option<String>,
    pub etcd_cert_file: Option<String>,
    pub etcd_key_file: Option<String>,
    pub address_pool: Option<String>,
    pub record_lifetime: Option<String>,
    pub max_sessions: Option<i64>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct RawLog {
    pub level: Option<String>,
}

#[cfg(feature = "test-fakes")]
#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub(super) struct RawFake {
    pub join_delay: Option<String>,
    pub fail_joins: Option<i64>,
    pub always_fail: Option<bool>,
    pub fail_message: Option<String>,
    pub publish_fail: Option<bool>,
    pub address: Option<String>,
}

/// An unchecked secret string, wiped when dropped unless it was taken.
#[derive(Deserialize)]
#[serde(from = "String")]
pub(super) struct RawSecret(String);

impl RawSecret {
    pub fn take(mut self) -> String {
        std::mem::take(&mut self.0)
    }
}

impl From<String> for RawSecret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl Drop for RawSecret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// A drop-in peer file in `peers_dir`: one or more `[[peers]]` tables.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPeersFile {
    #[serde(default)]
    pub peers: Vec<RawPeer>,
}
