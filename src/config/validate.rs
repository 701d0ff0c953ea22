//! Turns the raw file into a [`Config`], collecting every problem instead of stopping at the
//! first. Each check that fails records an error and yields a placeholder, so later checks
//! still run; the placeholders never escape because any error fails the whole load.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use super::error::ConfigError;
use super::locate::{KeyPath, Locator};
use super::raw::{
    RawApi, RawCheck, RawConfig, RawGateway, RawGpu, RawNetwork, RawNode, RawPeer, RawService,
    RawTailscale, RawWireguard, RawWorkloadIdentity,
};
use super::schema::{
    ApiConfig, CheckKind, CheckSpec, Config, DEFAULT_UNHEALTHY_XIDS, EtcdConfig, GatewayConfig,
    GatewayStore, GpuConfig, HttpCheck, HttpsCheck, IdTokenSource, JoinTokenSource, LogConfig,
    NetworkConfig, NodeConfig, PeerConfig, ServiceMode, ServiceSpec, TailscaleAuth,
    TailscaleConfig, WireguardConfig,
};
use super::types::{
    DnsLabel, InterfaceName, LogLevel, NodeName, ProviderKind, PublicKey, Secret, ServiceName, Tag,
    ValueError, WgBackend,
};

/// Collects errors with their positions in one file.
pub(super) struct Checker<'a> {
    file: &'a Path,
    locator: &'a Locator<'a>,
    errors: Vec<ConfigError>,
    /// Errors past `MAX_ERRORS`, counted but not placed, and where the first of them is.
    hidden: usize,
    first_hidden: Option<(usize, usize)>,
}

impl<'a> Checker<'a> {
    pub(super) fn new(file: &'a Path, locator: &'a Locator<'a>) -> Self {
        Self {
            file,
            locator,
            errors: Vec::new(),
            hidden: 0,
            first_hidden: None,
        }
    }

    /// Validates everything; `Err` holds every problem found, in file order.
    pub(super) fn run(mut self, mut raw: RawConfig) -> Result<Config, Vec<ConfigError>> {
        let root = KeyPath::root();
        // Both service tables are checked together so conflicts between them can be found.
        let ts_services = std::mem::take(&mut raw.network.tailscale.services);
        let node = self.node(&root.key("node"), raw.node);
        let api = self.api(&root.key("api"), raw.api, &node);
        let network = self.network(&root.key("network"), raw.network, &node);
        let gpu = self.gpu(&root.key("gpu"), raw.gpu);
        let services = self.services(raw.services, ts_services, network.provider, &gpu);
        let level = self.keyword::<LogLevel>(&root.key("log").key("level"), raw.log.level);
        let gateway = self.gateway(&root.key("gateway"), raw.gateway, &network, &services);
        let mut services = services;
        if gateway.enabled
            && let Ok(name) = ServiceName::try_from("gateway".to_owned())
        {
            // A gateway advertises the `gateway` service, declared or not.
            // Checked where it listens; an unspecified address is reachable on loopback.
            let mut target = gateway.listen;
            if target.ip().is_unspecified() {
                target.set_ip(if target.is_ipv4() {
                    IpAddr::from([127, 0, 0, 1])
                } else {
                    IpAddr::from(std::net::Ipv6Addr::LOCALHOST)
                });
            }
            services.entry(name).or_insert(ServiceSpec {
                port: gateway.listen.port(),
                mode: ServiceMode::Tcp,
                tls_cert: false,
                requires_gpus: false,
                check: CheckSpec {
                    kind: CheckKind::Tcp { target },
                    ..default_check(CheckKind::None)
                },
            });
        }
        let config = Config {
            node,
            api,
            network,
            gpu,
            services,
            log: LogConfig {
                level: level.unwrap_or_default(),
            },
            gateway,
        };
        if self.errors.is_empty() {
            return Ok(config);
        }
        Err(self.into_errors())
    }

    /// Validates a drop-in peer file (`[[peers]]` tables).
    pub(super) fn run_peers(
        mut self,
        raw: Vec<RawPeer>,
    ) -> Result<Vec<PeerConfig>, Vec<ConfigError>> {
        let peers = self.peers(&KeyPath::root().key("peers"), raw);
        if self.errors.is_empty() {
            return Ok(peers);
        }
        Err(self.into_errors())
    }

    /// The errors in file order, and how many more there were past `MAX_ERRORS`.
    fn into_errors(self) -> Vec<ConfigError> {
        let mut errors = self.errors;
        errors.sort_by_key(|e| (e.line, e.col));
        if let Some((line, col)) = self.first_hidden {
            errors.push(ConfigError {
                file: self.file.to_path_buf(),
                line,
                col,
                key: String::new(),
                message: super::more_errors(self.hidden),
            });
        }
        errors
    }

    fn node(&mut self, path: &KeyPath, raw: RawNode) -> NodeConfig {
        let name_path = path.key("name");
        let name = match raw.name {
            Some(name) => self.value::<NodeName>(&name_path, name),
            None => self.hostname_default(&name_path),
        };
        let state_dir = self.abs_path(&path.key("state_dir"), raw.state_dir);
        let runtime_dir = self.abs_path(&path.key("runtime_dir"), raw.runtime_dir);
        NodeConfig {
            name: name.unwrap_or_else(placeholder_name),
            state_dir: state_dir.unwrap_or_else(|| PathBuf::from("/var/lib/clawbernetes")),
            runtime_dir: runtime_dir.unwrap_or_else(|| PathBuf::from("/run/clawbernetes")),
        }
    }

    fn hostname_default(&mut self, path: &KeyPath) -> Option<NodeName> {
        let hostname = match nix::unistd::gethostname() {
            Ok(hostname) => hostname.to_string_lossy().into_owned(),
            Err(errno) => {
                self.error(
                    path,
                    format!("cannot read the machine hostname ({errno}) to default node.name; expected node.name to be set"),
                );
                return None;
            }
        };
        let label = hostname.split('.').next().unwrap_or("").to_lowercase();
        match NodeName::try_from(label) {
            Ok(name) => Some(name),
            Err(_) => {
                self.error(
                    path,
                    format!(
                        "the machine hostname {hostname:?} is not a DNS label and node.name is not set; expected node.name = a DNS label (1-63 characters of a-z, 0-9 and '-')"
                    ),
                );
                None
            }
        }
    }

    fn api(&mut self, path: &KeyPath, raw: RawApi, node: &NodeConfig) -> ApiConfig {
        let socket = self
            .abs_path(&path.key("socket"), raw.socket)
            .unwrap_or_else(|| node.runtime_dir.join("clawnode.sock"));
        let socket_group = raw.socket_group.and_then(|group| {
            let valid = !group.is_empty()
                && group.len() <= 32
                && !group.starts_with('-')
                && group
                    .trim_end_matches('$')
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
            self.check(
                &path.key("socket_group"),
                valid.then_some(group.clone()),
                || {
                    ValueError::new(
                        "a group name (1-32 letters, digits, '.', '_' or '-')",
                        &group,
                    )
                },
            )
        });
        let metrics_listen = raw.metrics_listen.and_then(|text| {
            let addr = text
                .parse::<SocketAddr>()
                .ok()
                .filter(|addr| addr.port() != 0);
            self.check(&path.key("metrics_listen"), addr, || {
                ValueError::new(
                    "an address and port such as \"127.0.0.1:9100\" or \"[::1]:9100\" (port 1-65535)",
                    &text,
                )
            })
        });
        ApiConfig {
            socket,
            socket_group,
            metrics_listen,
        }
    }

    fn network(&mut self, path: &KeyPath, raw: RawNetwork, node: &NodeConfig) -> NetworkConfig {
        let provider_path = path.key("provider");
        // `None` when the value is invalid, so provider-specific requirements are skipped.
        let provider = match raw.provider {
            Some(text) => self.keyword::<ProviderKind>(&provider_path, Some(text)),
            None => Some(ProviderKind::default()),
        };
        let wireguard = self.wireguard(&path.key("wireguard"), raw.wireguard, node, provider);
        let tailscale = self.tailscale(&path.key("tailscale"), raw.tailscale);
        let hostname_len = tailscale.hostname_prefix.as_str().len() + 1 + node.name.as_str().len();
        if provider == Some(ProviderKind::Tailscale) && hostname_len > 63 {
            self.error(
                &path.key("tailscale").key("hostname_prefix"),
                format!(
                    "expected a shorter prefix: the Tailscale hostname \"{}-{}\" would be {hostname_len} characters, and a DNS label has at most 63",
                    tailscale.hostname_prefix.as_str(),
                    node.name.as_str()
                ),
            );
        }
        NetworkConfig {
            provider: provider.unwrap_or_default(),
            wireguard,
            tailscale,
            #[cfg(feature = "test-fakes")]
            fake: self.fake(&path.key("fake"), raw.fake),
        }
    }

    fn wireguard(
        &mut self,
        path: &KeyPath,
        raw: RawWireguard,
        node: &NodeConfig,
        provider: Option<ProviderKind>,
    ) -> WireguardConfig {
        let interface =
            self.value_or::<InterfaceName>(&path.key("interface"), raw.interface, "claw0");
        let backend = self.keyword::<WgBackend>(&path.key("backend"), raw.backend);
        let userspace_implementation = self
            .program_path(
                &path.key("userspace_implementation"),
                raw.userspace_implementation,
            )
            .unwrap_or_else(|| PathBuf::from("wireguard-go"));
        let listen_port = self.port(&path.key("listen_port"), raw.listen_port, 51820);
        let fwmark = self.int_in::<u32>(
            &path.key("fwmark"),
            raw.fwmark,
            0,
            0..=i64::from(u32::MAX),
            "a firewall mark 0-4294967295 (0 = none)",
        );
        let mesh_cidr = self.mesh_cidr(&path.key("mesh_cidr"), raw.mesh_cidr);
        let join_token = self.join_token(path, raw.join_token_file, raw.join_token_env);
        let address_path = path.key("address");
        let address = match raw.address {
            Some(text) => self.address(&address_path, &text, mesh_cidr),
            None => {
                // With a join token the gateway assigns the address.
                if provider == Some(ProviderKind::Wireguard) && join_token.is_none() {
                    // Point at [network.wireguard], else at the provider line that demands it.
                    let at = self.first_span(&[path, &path.parent().key("provider")]);
                    let cidr = mesh_cidr.unwrap_or_else(default_mesh_cidr);
                    self.error_at(
                        &address_path,
                        at,
                        format!(
                            "missing: expected this node's address inside mesh_cidr {cidr} (e.g. address = \"{}\"), required when network.provider = \"wireguard\" without join_token_file or join_token_env",
                            example_address(cidr)
                        ),
                    );
                }
                None
            }
        };
        let mtu = self.int_in::<u16>(
            &path.key("mtu"),
            raw.mtu,
            1420,
            1280..=9000,
            "an MTU 1280-9000",
        );
        let private_key_file = self
            .abs_path(&path.key("private_key_file"), raw.private_key_file)
            .unwrap_or_else(|| node.state_dir.join(crate::state::WIREGUARD_KEY));
        let peers_dir = self
            .abs_path(&path.key("peers_dir"), raw.peers_dir)
            .unwrap_or_else(|| PathBuf::from("/etc/clawbernetes/peers.d"));
        let node_info_port = self.port(&path.key("node_info_port"), raw.node_info_port, 51821);
        let reconcile_interval = self.duration(
            &path.key("reconcile_interval"),
            raw.reconcile_interval,
            Duration::from_secs(30),
            Duration::from_secs(1)..=MAX_INTERVAL,
        );
        let gateway_offline_grace = self.duration(
            &path.key("gateway_offline_grace"),
            raw.gateway_offline_grace,
            Duration::from_secs(7 * 24 * 60 * 60),
            Duration::ZERO..=Duration::from_secs(365 * 24 * 60 * 60),
        );
        let peers = self.peers(&path.key("peers"), raw.peers);
        WireguardConfig {
            interface,
            backend: backend.unwrap_or_default(),
            userspace_implementation,
            listen_port,
            fwmark: (fwmark != 0).then_some(fwmark),
            mesh_cidr: mesh_cidr.unwrap_or_else(default_mesh_cidr),
            address,
            mtu,
            private_key_file,
            peers_dir,
            node_info_port,
            reconcile_interval,
            keep_interface_on_stop: raw.keep_interface_on_stop.unwrap_or(false),
            adopt_existing_interface: raw.adopt_existing_interface.unwrap_or(false),
            allow_unsafe_routes: raw.allow_unsafe_routes.unwrap_or(false),
            join_token,
            gateway_offline_grace,
            peers,
        }
    }

    /// `join_token_file` or `join_token_env`, at most one.
    fn join_token(
        &mut self,
        path: &KeyPath,
        file: Option<String>,
        env: Option<String>,
    ) -> Option<JoinTokenSource> {
        let file_path = path.key("join_token_file");
        let env_path = path.key("join_token_env");
        if file.is_some() && env.is_some() {
            let at = self.first_span(&[&env_path, &file_path]);
            self.error_at(
                &env_path,
                at,
                "expected at most one of join_token_file and join_token_env, found both",
            );
            return None;
        }
        if let Some(file) = file {
            return self
                .abs_path(&file_path, Some(file))
                .map(JoinTokenSource::File);
        }
        let var = env?;
        self.env_var_name(&env_path, var).map(JoinTokenSource::Env)
    }

    fn mesh_cidr(&mut self, path: &KeyPath, raw: Option<String>) -> Option<IpNet> {
        let Some(text) = raw else {
            return Some(default_mesh_cidr());
        };
        let Ok(net) = text.parse::<IpNet>() else {
            self.error(
                path,
                ValueError::new(
                    "a network in CIDR notation such as \"10.100.0.0/16\"",
                    &text,
                ),
            );
            return None;
        };
        if net.trunc() != net {
            self.error(
                path,
                ValueError::new(
                    format_args!(
                        "a network address with no host bits set (did you mean \"{}\"?)",
                        net.trunc()
                    ),
                    &text,
                ),
            );
            return None;
        }
        Some(net)
    }

    fn address(&mut self, path: &KeyPath, text: &str, mesh: Option<IpNet>) -> Option<IpNet> {
        let parsed = text.parse::<IpNet>().ok().or_else(|| {
            let addr = text.parse::<IpAddr>().ok()?;
            // A bare address takes the mesh's prefix, like wg-quick users expect.
            let prefix = mesh
                .filter(|m| m.addr().is_ipv4() == addr.is_ipv4())
                .map_or(if addr.is_ipv4() { 32 } else { 128 }, |m| m.prefix_len());
            IpNet::new(addr, prefix).ok()
        });
        let Some(address) = parsed else {
            self.error(
                path,
                ValueError::new(
                    "an address such as \"10.100.0.5/16\" or \"10.100.0.5\"",
                    text,
                ),
            );
            return None;
        };
        // An invalid mesh_cidr was reported already; there is nothing to compare against.
        let Some(mesh) = mesh else {
            return Some(address);
        };
        let message = if !mesh.contains(&address.addr()) {
            format!("expected an address inside mesh_cidr {mesh}, got {address}")
        } else if address.prefix_len() < mesh.prefix_len() {
            format!(
                "expected a prefix of /{} or longer so the address stays inside mesh_cidr {mesh}, got {address}",
                mesh.prefix_len()
            )
        } else if address.addr() == mesh.network() || is_own_network_address(address) {
            format!(
                "expected a host address inside mesh_cidr {mesh}, got the network address {address}"
            )
        } else {
            return Some(address);
        };
        self.error(path, message);
        None
    }

    fn peers(&mut self, path: &KeyPath, raw: Vec<RawPeer>) -> Vec<PeerConfig> {
        let mut peers = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut keys: HashMap<[u8; 32], usize> = HashMap::new();
        for (index, raw) in raw.into_iter().enumerate() {
            let peer_path = path.index(index);
            let name = self.peer_name(&peer_path, raw.name);
            if let Some(name) = &name
                && let Some(first) = names.insert(name.clone(), index)
            {
                self.error(
                    &peer_path.key("name"),
                    format!("expected a unique peer name, got {name:?} which peers[{first}] already uses"),
                );
            }
            let key_path = peer_path.key("public_key");
            let public_key = match raw.public_key {
                Some(text) => self.value::<PublicKey>(&key_path, text),
                None => {
                    self.error(
                        &key_path,
                        "missing: expected the peer's WireGuard public key (base64, as printed by `wg pubkey`)",
                    );
                    None
                }
            };
            if let Some(key) = &public_key
                && let Some(first) = keys.insert(*key.as_bytes(), index)
            {
                self.error(
                    &key_path,
                    format!(
                        "expected a unique public key, got {key} which peers[{first}] already uses"
                    ),
                );
            }
            let endpoint = raw
                .endpoint
                .and_then(|text| self.value(&peer_path.key("endpoint"), text));
            let allowed_ips = self.allowed_ips(&peer_path.key("allowed_ips"), raw.allowed_ips);
            let keepalive = self.int_in::<u16>(
                &peer_path.key("persistent_keepalive"),
                raw.persistent_keepalive,
                0,
                0..=65535,
                "seconds 1-65535, or 0 for off",
            );
            let preshared_key_file =
                self.abs_path(&peer_path.key("preshared_key_file"), raw.preshared_key_file);
            let (Some(name), Some(public_key)) = (name, public_key) else {
                continue;
            };
            peers.push(PeerConfig {
                name,
                public_key,
                endpoint,
                allowed_ips,
                persistent_keepalive: (keepalive != 0).then_some(keepalive),
                preshared_key_file,
            });
        }
        peers
    }

    fn peer_name(&mut self, peer_path: &KeyPath, raw: Option<String>) -> Option<String> {
        let path = peer_path.key("name");
        let Some(name) = raw else {
            self.error(
                &path,
                "missing: expected a name for this peer, e.g. name = \"gpu-02\"",
            );
            return None;
        };
        let valid = (1..=63).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        self.check(&path, valid.then_some(name.clone()), || {
            ValueError::new(
                "a peer name of 1-63 letters, digits, '.', '_' or '-' starting with a letter or digit",
                &name,
            )
        })
    }

    fn allowed_ips(&mut self, path: &KeyPath, raw: Option<Vec<String>>) -> Vec<IpNet> {
        let raw = raw.unwrap_or_default();
        if raw.is_empty() {
            self.error(
                path,
                "expected at least one network this peer routes, e.g. allowed_ips = [\"10.100.0.7/32\"]",
            );
            return Vec::new();
        }
        let mut nets = Vec::new();
        for (index, text) in raw.iter().enumerate() {
            let parsed = text
                .parse::<IpNet>()
                .ok()
                .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from));
            let Some(net) = parsed else {
                self.error(
                    &path.index(index),
                    ValueError::new("a network such as \"10.100.0.7/32\"", text),
                );
                continue;
            };
            if net.trunc() != net {
                self.error(
                    &path.index(index),
                    ValueError::new(
                        format_args!(
                            "a network with no host bits set (did you mean \"{}\"?)",
                            net.trunc()
                        ),
                        text,
                    ),
                );
                continue;
            }
            nets.push(net);
        }
        nets
    }

    fn tailscale(&mut self, path: &KeyPath, raw: RawTailscale) -> TailscaleConfig {
        let socket = self
            .abs_path(&path.key("socket"), raw.socket)
            .unwrap_or_else(|| PathBuf::from("/var/run/tailscale/tailscaled.sock"));

        let mut methods: Vec<(KeyPath, Option<TailscaleAuth>)> = Vec::new();
        if let Some(secret) = raw.auth_key {
            let key_path = path.key("auth_key");
            let auth = self.value::<Secret>(&key_path, secret.take());
            methods.push((key_path, auth.map(TailscaleAuth::Key)));
        }
        if let Some(file) = raw.auth_key_file {
            let key_path = path.key("auth_key_file");
            let auth = self.abs_path(&key_path, Some(file));
            methods.push((key_path, auth.map(TailscaleAuth::KeyFile)));
        }
        if let Some(var) = raw.auth_key_env {
            let key_path = path.key("auth_key_env");
            let auth = self.env_var_name(&key_path, var);
            methods.push((key_path, auth.map(TailscaleAuth::KeyEnv)));
        }
        let tags_path = path.key("tags");
        let tags_given = raw.tags.as_ref().is_some_and(|tags| !tags.is_empty());
        if let Some(identity) = raw.workload_identity {
            let key_path = path.key("workload_identity");
            if !tags_given {
                let at = self.first_span(&[&tags_path, &key_path]);
                self.error_at(
                    &tags_path,
                    at,
                    "expected at least one tag when workload_identity is used (the node must own its tags), e.g. tags = [\"tag:clawbernetes\"]",
                );
            }
            let auth = self.workload_identity(&key_path, identity);
            methods.push((key_path, auth));
        }
        if methods.len() > 1 {
            self.too_many_auth_methods(&methods);
        }
        let auth = match methods.len() {
            1 => methods.pop().and_then(|(_, auth)| auth),
            _ => None,
        };

        let hostname_prefix = self.value_or::<DnsLabel>(
            &path.key("hostname_prefix"),
            raw.hostname_prefix,
            "clawnode",
        );
        let tailnet = raw.tailnet.and_then(|tailnet| {
            let valid = !tailnet.is_empty()
                && !tailnet.chars().any(|c| c.is_whitespace() || c.is_control());
            self.check(
                &path.key("tailnet"),
                valid.then_some(tailnet.clone()),
                || {
                    ValueError::new(
                        "a tailnet name such as \"your-org.tailscale.net\"",
                        &tailnet,
                    )
                },
            )
        });
        let tags = raw
            .tags
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .filter_map(|(index, tag)| self.value::<Tag>(&tags_path.index(index), tag))
            .collect();
        let control_url = raw.control_url.and_then(|url| {
            let rest = url
                .strip_prefix("https://")
                .or_else(|| url.strip_prefix("http://"));
            let valid = rest.is_some_and(|rest| {
                !rest.is_empty() && !rest.chars().any(|c| c.is_whitespace() || c.is_control())
            });
            self.check(&path.key("control_url"), valid.then_some(url.clone()), || {
                ValueError::new(
                    "a URL starting with https:// or http:// (e.g. \"https://controlplane.tailscale.com\")",
                    &url,
                )
            })
        });
        let node_info_port = self.port(&path.key("node_info_port"), raw.node_info_port, 51821);
        // Port 0 would let tailscaled pick one, which no firewall rule can be written for.
        let relay_server_port = raw.relay_server_port.map(|port| {
            self.int_in::<u16>(
                &path.key("relay_server_port"),
                Some(port),
                0,
                1..=65535,
                "a UDP port 1-65535 (a random port, 0, is not offered: firewalls need a known one)",
            )
        });
        let relay_server_port = relay_server_port.filter(|port| *port != 0);
        TailscaleConfig {
            socket,
            auth,
            hostname_prefix,
            tailnet,
            tags,
            control_url,
            node_info_port,
            relay_server_port,
            relay_clear_on_stop: raw.relay_clear_on_stop.unwrap_or(false),
        }
    }

    fn too_many_auth_methods(&mut self, methods: &[(KeyPath, Option<TailscaleAuth>)]) {
        let mut placed: Vec<(Range<usize>, &KeyPath)> = methods
            .iter()
            .map(|(path, _)| (self.locator.nearest(path), path))
            .collect();
        placed.sort_by_key(|(span, _)| span.start);
        let listed: Vec<String> = placed
            .iter()
            .map(|(span, path)| {
                let (line, col) = self.locator.line_col(span.start);
                format!("{path} (line {line}, column {col})")
            })
            .collect();
        let (span, second) = placed[1].clone();
        self.error_at(
            second,
            span,
            format!(
                "expected at most one Tailscale auth method (auth_key, auth_key_file, auth_key_env or workload_identity), found {}: {}",
                placed.len(),
                listed.join(", ")
            ),
        );
    }

    fn workload_identity(
        &mut self,
        path: &KeyPath,
        raw: RawWorkloadIdentity,
    ) -> Option<TailscaleAuth> {
        let client_id = match raw.client_id {
            Some(id) if !id.trim().is_empty() => Some(id),
            Some(id) => {
                self.error(
                    &path.key("client_id"),
                    ValueError::new("a non-empty OAuth client ID", &id),
                );
                None
            }
            None => {
                self.error(
                    &path.key("client_id"),
                    "missing: expected the OAuth client ID, e.g. client_id = \"k123abc\"",
                );
                None
            }
        };
        let file_path = path.key("id_token_file");
        let audience_path = path.key("audience");
        let id_token = match (raw.id_token_file, raw.audience) {
            (Some(_), Some(_)) => {
                let at = self.first_span(&[&audience_path]);
                self.error_at(
                    &audience_path,
                    at,
                    "expected exactly one of id_token_file or audience, found both",
                );
                None
            }
            (None, None) => {
                self.error(
                    path,
                    "expected exactly one of id_token_file (a file holding the OIDC token) or audience (to request one), found neither",
                );
                None
            }
            (Some(file), None) => self
                .abs_path(&file_path, Some(file))
                .map(IdTokenSource::File),
            (None, Some(audience)) => {
                let valid = !audience.trim().is_empty();
                self.check(&audience_path, valid.then_some(audience.clone()), || {
                    ValueError::new("a non-empty token audience", &audience)
                })
                .map(IdTokenSource::Audience)
            }
        };
        Some(TailscaleAuth::WorkloadIdentity {
            client_id: client_id?,
            id_token: id_token?,
        })
    }

    fn env_var_name(&mut self, path: &KeyPath, name: String) -> Option<String> {
        let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        self.check(path, valid.then_some(name.clone()), || {
            ValueError::new(
                "an environment variable name ([A-Za-z_][A-Za-z0-9_]*, e.g. \"TS_AUTHKEY\")",
                &name,
            )
        })
    }

    fn gpu(&mut self, path: &KeyPath, raw: RawGpu) -> GpuConfig {
        let enabled = raw.enabled.unwrap_or(true);
        let required = raw.required.unwrap_or(false);
        if required && !enabled {
            self.error(
                &path.key("required"),
                "expected required = false when enabled = false (a disabled GPU probe cannot be required)",
            );
        }
        let nvml_library = self.program_path(&path.key("nvml_library"), raw.nvml_library);
        let poll_interval = self.duration(
            &path.key("poll_interval"),
            raw.poll_interval,
            Duration::from_secs(10),
            Duration::from_secs(1)..=MAX_INTERVAL,
        );
        let unhealthy_xids = match raw.unhealthy_xids {
            None => DEFAULT_UNHEALTHY_XIDS.into_iter().collect(),
            Some(codes) => {
                let list_path = path.key("unhealthy_xids");
                codes
                    .into_iter()
                    .enumerate()
                    .filter_map(|(index, code)| {
                        let valid = u64::try_from(code)
                            .ok()
                            .filter(|c| (1..=MAX_XID).contains(c));
                        if valid.is_none() {
                            self.error(
                                &list_path.index(index),
                                format!("expected an XID code 1-{MAX_XID}, got {code}"),
                            );
                        }
                        valid
                    })
                    .collect::<BTreeSet<u64>>()
            }
        };
        let xid_hold = self.duration(
            &path.key("xid_hold"),
            raw.xid_hold,
            Duration::from_secs(60 * 60),
            Duration::from_secs(1)..=Duration::from_secs(30 * 24 * 60 * 60),
        );
        GpuConfig {
            enabled,
            required,
            nvml_library,
            poll_interval,
            unhealthy_xids,
            xid_hold,
        }
    }

    fn gateway(
        &mut self,
        path: &KeyPath,
        mut raw: RawGateway,
        network: &NetworkConfig,
        services: &BTreeMap<ServiceName, ServiceSpec>,
    ) -> GatewayConfig {
        let store = self.gateway_store(path, &mut raw);
        // The port nodes expect: the advertised `gateway` service's, else 443.
        let port = ServiceName::try_from("gateway".to_owned())
            .ok()
            .and_then(|name| services.get(&name))
            .map_or(443, |spec| spec.port);
        let listen_path = path.key("listen");
        let listen = match raw.listen {
            None => SocketAddr::from(([0, 0, 0, 0], port)),
            Some(text) => {
                let parsed = text.parse::<SocketAddr>().ok();
                self.check(&listen_path, parsed, || {
                    ValueError::new("an address and port such as \"0.0.0.0:443\"", &text)
                })
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], port)))
            }
        };
        let url_path = path.key("public_url");
        let public_url = raw.public_url.and_then(|text| {
            let valid = text
                .strip_prefix("https://")
                .is_some_and(|rest| !rest.is_empty() && !rest.contains(['/', ',', ' ', '?', '#']));
            self.check(&url_path, valid.then(|| text.clone()), || {
                ValueError::new(
                    "an https URL with host and port and no path, such as \"https://203.0.113.1:443\"",
                    &text,
                )
            })
        });
        let address_pool = match raw.address_pool {
            None => network.wireguard.mesh_cidr,
            Some(text) => self
                .mesh_cidr(&path.key("address_pool"), Some(text))
                .unwrap_or(network.wireguard.mesh_cidr),
        };
        let mesh = network.wireguard.mesh_cidr;
        if !mesh.contains(&address_pool) {
            self.error(
                &path.key("address_pool"),
                format!("expected a network inside [network.wireguard] mesh_cidr {mesh}, got {address_pool}"),
            );
        }
        let record_lifetime = self.duration(
            &path.key("record_lifetime"),
            raw.record_lifetime,
            Duration::from_secs(30 * 24 * 60 * 60),
            Duration::from_secs(60 * 60)..=Duration::from_secs(365 * 24 * 60 * 60),
        );
        let max_sessions = self.int_in(
            &path.key("max_sessions"),
            raw.max_sessions,
            16_384usize,
            1..=1_000_000,
            "a number of connections 1-1000000",
        );
        let enabled = raw.enabled.unwrap_or(false);
        if enabled && network.provider != ProviderKind::Wireguard {
            self.error(
                &path.key("enabled"),
                "expected enabled = false unless network.provider = \"wireguard\" (the gateway coordinates the self-hosted WireGuard mesh)",
            );
        }
        GatewayConfig {
            enabled,
            listen,
            public_url,
            store,
            address_pool,
            record_lifetime,
            max_sessions,
        }
    }

    /// `store` and the `etcd_*` keys, which belong to `store = "etcd"` only.
    fn gateway_store(&mut self, path: &KeyPath, raw: &mut RawGateway) -> GatewayStore {
        let store_path = path.key("store");
        let etcd_given = raw.etcd_endpoints.is_some()
            || raw.etcd_prefix.is_some()
            || raw.etcd_ca_file.is_some()
            || raw.etcd_cert_file.is_some()
            || raw.etcd_key_file.is_some();
        match raw.store.as_deref() {
            None | Some("sqlite") => {
                if etcd_given {
                    self.error(
                        &store_path,
                        "the etcd_* keys are set but store is \"sqlite\": set store = \"etcd\" or remove them",
                    );
                }
                return GatewayStore::Sqlite;
            }
            Some("etcd") => {}
            Some(other) => {
                self.error(
                    &store_path,
                    ValueError::new("\"sqlite\" or \"etcd\"", other),
                );
                return GatewayStore::Sqlite;
            }
        }
        if !cfg!(feature = "store-etcd") {
            self.error(
                &store_path,
                "this clawnode was built without the etcd store (cargo feature store-etcd): use a package build or store = \"sqlite\"",
            );
        }
        let endpoints_path = path.key("etcd_endpoints");
        let endpoints = raw.etcd_endpoints.take().unwrap_or_default();
        if endpoints.is_empty() {
            self.error(
                &endpoints_path,
                "store = \"etcd\" needs etcd_endpoints, e.g. [\"https://10.0.0.1:2379\", \"https://10.0.0.2:2379\"]",
            );
        }
        let mut https = false;
        for url in &endpoints {
            let rest = url
                .strip_prefix("https://")
                .inspect(|_| https = true)
                .or_else(|| url.strip_prefix("http://"));
            let valid = rest.is_some_and(|rest| {
                let rest = rest.strip_suffix('/').unwrap_or(rest);
                !rest.is_empty() && !rest.contains(['/', ',', ' ', '?', '#', '@'])
            });
            if !valid {
                self.error(
                    &endpoints_path,
                    ValueError::new(
                        "http:// or https:// URLs with a host and port, such as \"https://10.0.0.1:2379\"",
                        url,
                    ),
                );
            }
        }
        let prefix_path = path.key("etcd_prefix");
        let prefix = match raw.etcd_prefix.take() {
            None => super::schema::DEFAULT_ETCD_PREFIX.to_owned(),
            Some(text) => {
                let valid = text.len() >= 2 && text.starts_with('/') && text.ends_with('/');
                self.check(&prefix_path, valid.then(|| text.clone()), || {
                    ValueError::new(
                        "a key prefix starting and ending with '/', such as \"/clawbernetes/\"",
                        &text,
                    )
                })
                .unwrap_or_else(|| super::schema::DEFAULT_ETCD_PREFIX.to_owned())
            }
        };
        let ca_path = path.key("etcd_ca_file");
        let ca_file = self.abs_path(&ca_path, raw.etcd_ca_file.take());
        let cert_path = path.key("etcd_cert_file");
        let cert_file = self.abs_path(&cert_path, raw.etcd_cert_file.take());
        let key_file = self.abs_path(&path.key("etcd_key_file"), raw.etcd_key_file.take());
        if https && ca_file.is_none() {
            self.error(
                &ca_path,
                "https etcd_endpoints need etcd_ca_file (the CA that signed the etcd servers' certificates)",
            );
        }
        if cert_file.is_some() != key_file.is_some() {
            self.error(
                &cert_path,
                "etcd_cert_file and etcd_key_file go together (the client certificate and its key)",
            );
        }
        GatewayStore::Etcd(EtcdConfig {
            endpoints,
            prefix,
            ca_file,
            cert_file,
            key_file,
        })
    }

    /// Merges `[services.*]` and `[network.tailscale.services.*]`; the same name may appear in
    /// both only with identical settings.
    fn services(
        &mut self,
        plain: BTreeMap<String, RawService>,
        tailscale: BTreeMap<String, RawService>,
        provider: ProviderKind,
        gpu: &GpuConfig,
    ) -> BTreeMap<ServiceName, ServiceSpec> {
        let plain_path = KeyPath::root().key("services");
        let ts_path = KeyPath::root()
            .key("network")
            .key("tailscale")
            .key("services");
        let mut merged: BTreeMap<ServiceName, (ServiceSpec, KeyPath)> = BTreeMap::new();
        let all = plain
            .into_iter()
            .map(|(name, raw)| (plain_path.key(&name), name, raw))
            .chain(
                tailscale
                    .into_iter()
                    .map(|(name, raw)| (ts_path.key(&name), name, raw)),
            );
        for (path, raw_name, raw) in all {
            let spec = self.service(&path, &raw_name, raw, provider, gpu);
            let name = raw_name;
            let name = self.check(&path, ServiceName::try_from(name.clone()).ok(), || {
                ValueError::new(
                    format_args!(
                        "a service name that is {}",
                        super::types::DNS_LABEL_EXPECTED
                    ),
                    &name,
                )
            });
            let (Some(name), Some(spec)) = (name, spec) else {
                continue;
            };
            let Some((existing, existing_path)) = merged.get(&name) else {
                merged.insert(name, (spec, path));
                continue;
            };
            if *existing == spec {
                continue;
            }
            // Report at whichever declaration comes second in the file.
            let (first, second) =
                if self.locator.nearest(existing_path).start <= self.locator.nearest(&path).start {
                    (existing_path.clone(), path)
                } else {
                    (path, existing_path.clone())
                };
            let (line, _) = self.locator.line_col(self.locator.nearest(&first).start);
            self.error(
                &second,
                format!(
                    "expected the same settings (port, mode, tls, tls_cert, requires_gpus, check) as {first} (line {line}) or a different service name: {name} is declared twice with different settings"
                ),
            );
        }
        merged
            .into_iter()
            .map(|(name, (spec, _))| (name, spec))
            .collect()
    }

    fn service(
        &mut self,
        path: &KeyPath,
        name: &str,
        raw: RawService,
        provider: ProviderKind,
        gpu: &GpuConfig,
    ) -> Option<ServiceSpec> {
        if raw.tls_cert == Some(true) && provider != ProviderKind::Tailscale {
            self.error(
                &path.key("tls_cert"),
                "expected no tls_cert unless network.provider = \"tailscale\" (certificates come from tailscaled)",
            );
        }
        let port = match raw.port {
            Some(_) => Some(self.port(&path.key("port"), raw.port, 0)).filter(|&p| p != 0),
            None => {
                self.error(
                    &path.key("port"),
                    "missing: expected the service's port 1-65535, e.g. port = 443",
                );
                None
            }
        };
        let mode_path = path.key("mode");
        let mode = match raw.mode.as_deref() {
            Some("tcp") => {
                if raw.tls.is_some() {
                    self.error(
                        &path.key("tls"),
                        "expected no tls key with mode = \"tcp\" (tls applies only to mode = \"http\")",
                    );
                }
                Some(ServiceMode::Tcp)
            }
            Some("http") => Some(ServiceMode::Http {
                tls: raw.tls.unwrap_or(true),
            }),
            Some(other) => {
                self.error(
                    &mode_path,
                    ValueError::new("a mode \"tcp\" or \"http\"", other),
                );
                None
            }
            None => {
                self.error(
                    &mode_path,
                    "missing: expected mode = \"tcp\" or mode = \"http\"",
                );
                None
            }
        };
        if raw.requires_gpus == Some(true) && !gpu.enabled {
            self.error(
                &path.key("requires_gpus"),
                "expected requires_gpus = false when [gpu] enabled = false (no GPU would ever be usable, so the service would never be advertised)",
            );
        }
        // molt-provider sells GPU time: without a usable GPU it has nothing to sell.
        let requires_gpus = raw
            .requires_gpus
            .unwrap_or(name == "molt-provider" && gpu.enabled);
        let port = port?;
        let mode = mode?;
        let check = self.check_spec(
            &path.key("check"),
            raw.check.unwrap_or_default(),
            port,
            mode,
            provider,
        )?;
        Some(ServiceSpec {
            port,
            mode,
            tls_cert: raw.tls_cert.unwrap_or(false),
            requires_gpus,
            check,
        })
    }

    /// `[services.<name>.check]`; `None` after an error.
    fn check_spec(
        &mut self,
        path: &KeyPath,
        raw: RawCheck,
        port: u16,
        mode: ServiceMode,
        provider: ProviderKind,
    ) -> Option<CheckSpec> {
        let errors = self.errors.len() + self.hidden;
        let kind = raw.kind.as_deref().unwrap_or("tcp");
        let is_http = kind == "http";
        let is_none = kind == "none";
        if !matches!(kind, "tcp" | "http" | "none") {
            self.error(
                &path.key("type"),
                ValueError::new("a check type \"tcp\", \"http\" or \"none\"", kind),
            );
        }
        let refuse = |checker: &mut Self, key: &str, present: bool, why: &str| {
            if present {
                checker.error(&path.key(key), format!("expected no {key} {why}"));
            }
        };
        let unchecked = "with type = \"none\" (nothing is checked)";
        for (key, present) in [
            ("target", raw.target.is_some()),
            ("interval", raw.interval.is_some()),
            ("timeout", raw.timeout.is_some()),
            ("rise", raw.rise.is_some()),
            ("fall", raw.fall.is_some()),
        ] {
            refuse(self, key, is_none && present, unchecked);
        }
        let http_only = "unless type = \"http\" (it applies only to HTTP checks)";
        for (key, present) in [
            ("path", raw.path.is_some()),
            ("expect", raw.expect.is_some()),
            ("scheme", raw.scheme.is_some()),
            ("tls_skip_verify", raw.tls_skip_verify.is_some()),
            ("server_name", raw.server_name.is_some()),
        ] {
            refuse(self, key, !is_http && present, http_only);
        }
        let http = is_http.then(|| self.http_check(path, &raw_http(&raw), port, mode, provider));
        let target = match raw.target {
            None => SocketAddr::from(([127, 0, 0, 1], port)),
            Some(text) => {
                let parsed = text.parse::<SocketAddr>().ok().filter(|a| a.port() != 0);
                self.check(&path.key("target"), parsed, || {
                    ValueError::new(
                        "an address and port such as \"127.0.0.1:8443\" or \"[::1]:8443\" (port 1-65535)",
                        &text,
                    )
                })
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], port)))
            }
        };
        let defaults = default_check(CheckKind::None);
        let interval = self.duration(
            &path.key("interval"),
            raw.interval,
            defaults.interval,
            Duration::from_secs(1)..=Duration::from_secs(60 * 60),
        );
        // A short interval alone shortens the default timeout with it.
        let timeout = self.duration(
            &path.key("timeout"),
            raw.timeout,
            defaults.timeout.min(interval),
            Duration::from_millis(100)..=Duration::from_secs(60),
        );
        if timeout > interval {
            self.error(
                &path.key("timeout"),
                format!(
                    "expected a timeout no longer than the interval ({}), got {}",
                    humantime::format_duration(interval),
                    humantime::format_duration(timeout)
                ),
            );
        }
        let rise = self.int_in::<u32>(
            &path.key("rise"),
            raw.rise,
            defaults.rise,
            1..=100,
            "a count of consecutive successes 1-100",
        );
        let fall = self.int_in::<u32>(
            &path.key("fall"),
            raw.fall,
            defaults.fall,
            1..=100,
            "a count of consecutive failures 1-100",
        );
        let kind = match (kind, http) {
            ("none", _) => CheckKind::None,
            (_, Some(http)) => CheckKind::Http(HttpCheck { target, ..http }),
            (_, None) => CheckKind::Tcp { target },
        };
        if self.errors.len() + self.hidden != errors {
            return None;
        }
        Some(CheckSpec {
            kind,
            interval,
            timeout,
            rise,
            fall,
        })
    }

    fn http_check(
        &mut self,
        path: &KeyPath,
        raw: &RawHttp<'_>,
        port: u16,
        mode: ServiceMode,
        provider: ProviderKind,
    ) -> HttpCheck {
        let url_path = match raw.path {
            None => "/".to_owned(),
            Some(text) => {
                let valid = text.starts_with('/')
                    && text.len() <= 1024
                    && text.bytes().all(is_url_path_byte);
                self.check(&path.key("path"), valid.then(|| text.to_owned()), || {
                    ValueError::new(
                        "a path starting with '/', at most 1024 bytes, of letters, digits and - . _ ~ ! $ & ' ( ) * + , ; = : @ / ? % only (percent-encode others), such as \"/healthz\"",
                        text,
                    )
                })
                .unwrap_or_else(|| "/".to_owned())
            }
        };
        let expect = match raw.expect {
            None => (200, 399),
            Some(text) => {
                let parsed = parse_status_range(text);
                self.check(&path.key("expect"), parsed, || {
                    ValueError::new(
                        "an HTTP status 100-599 or a range such as \"200-399\"",
                        text,
                    )
                })
                .unwrap_or((200, 399))
            }
        };
        let https = match raw.scheme {
            // tailscaled terminates TLS and proxies to the port in plain HTTP.
            None => {
                matches!(mode, ServiceMode::Http { tls: true })
                    && provider != ProviderKind::Tailscale
            }
            Some("https") => true,
            Some("http") => false,
            Some(other) => {
                self.error(
                    &path.key("scheme"),
                    ValueError::new("a scheme \"http\" or \"https\"", other),
                );
                false
            }
        };
        if !https {
            for (key, present) in [
                ("tls_skip_verify", raw.tls_skip_verify.is_some()),
                ("server_name", raw.server_name.is_some()),
            ] {
                if present {
                    let hint = if raw.scheme.is_none() && provider == ProviderKind::Tailscale {
                        "; with provider = \"tailscale\" checks default to plain http, since tailscaled terminates TLS"
                    } else {
                        ""
                    };
                    self.error(
                        &path.key(key),
                        format!(
                            "expected no {key} unless scheme = \"https\" (it applies only to TLS){hint}"
                        ),
                    );
                }
            }
        }
        let server_name = match raw.server_name.filter(|_| https) {
            None => "localhost".to_owned(),
            Some(text) => {
                let valid = super::types::is_hostname(text) || text.parse::<IpAddr>().is_ok();
                self.check(
                    &path.key("server_name"),
                    valid.then(|| text.to_owned()),
                    || ValueError::new("a host name or IP address such as \"localhost\"", text),
                )
                .unwrap_or_else(|| "localhost".to_owned())
            }
        };
        HttpCheck {
            target: SocketAddr::from(([127, 0, 0, 1], port)),
            path: url_path,
            expect,
            tls: https.then(|| HttpsCheck {
                skip_verify: raw.tls_skip_verify.unwrap_or(false),
                server_name,
            }),
        }
    }

    #[cfg(feature = "test-fakes")]
    fn fake(&mut self, path: &KeyPath, raw: super::raw::RawFake) -> super::schema::FakeMeshConfig {
        let join_delay = self.duration(
            &path.key("join_delay"),
            raw.join_delay,
            Duration::ZERO,
            Duration::ZERO..=Duration::from_secs(3600),
        );
        let fail_joins = self.int_in::<u32>(
            &path.key("fail_joins"),
            raw.fail_joins,
            0,
            0..=i64::from(u32::MAX),
            "a count 0-4294967295",
        );
        let address = raw.address.unwrap_or_else(|| "10.100.0.5/16".to_owned());
        if address.parse::<IpNet>().is_err() {
            self.error(
                &path.key("address"),
                ValueError::new("an address such as \"10.100.0.5/16\"", &address),
            );
        }
        super::schema::FakeMeshConfig {
            join_delay,
            fail_joins,
            always_fail: raw.always_fail.unwrap_or(false),
            fail_message: raw
                .fail_message
                .unwrap_or_else(|| "fake mesh join failed".to_owned()),
            publish_fail: raw.publish_fail.unwrap_or(false),
            address,
        }
    }

    // ---- generic checks ----

    /// Records an error positioned at `path` (or its nearest ancestor in the file).
    fn error(&mut self, path: &KeyPath, message: impl Display) {
        let at = self.locator.nearest(path);
        self.error_at(path, at, message);
    }

    fn error_at(&mut self, path: &KeyPath, at: Range<usize>, message: impl Display) {
        let (line, col) = self.locator.line_col(at.start);
        if self.errors.len() >= super::MAX_ERRORS {
            self.hidden += 1;
            self.first_hidden.get_or_insert((line, col));
            return;
        }
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line,
            col,
            key: path.to_string(),
            message: message.to_string(),
        });
    }

    /// The span of the first of `paths` present in the file, else the nearest ancestor of the
    /// first.
    fn first_span(&self, paths: &[&KeyPath]) -> Range<usize> {
        paths
            .iter()
            .find_map(|path| self.locator.find(path))
            .or_else(|| paths.first().map(|path| self.locator.nearest(path)))
            .unwrap_or(0..0)
    }

    /// Passes `value` through, or records the error `why` builds.
    fn check<T>(
        &mut self,
        path: &KeyPath,
        value: Option<T>,
        why: impl FnOnce() -> ValueError,
    ) -> Option<T> {
        if value.is_none() {
            self.error(path, why());
        }
        value
    }

    fn value<T: TryFrom<String, Error = ValueError>>(
        &mut self,
        path: &KeyPath,
        text: String,
    ) -> Option<T> {
        T::try_from(text).map_err(|err| self.error(path, err)).ok()
    }

    fn value_or<T: TryFrom<String, Error = ValueError>>(
        &mut self,
        path: &KeyPath,
        text: Option<String>,
        default: &str,
    ) -> T {
        let default = || T::try_from(default.to_owned()).expect("built-in defaults are valid");
        match text {
            Some(text) => self.value(path, text).unwrap_or_else(default),
            None => default(),
        }
    }

    /// A keyword enum; `None` (with an error) when the text is not one of its names.
    fn keyword<T: std::str::FromStr<Err = ValueError> + Default>(
        &mut self,
        path: &KeyPath,
        text: Option<String>,
    ) -> Option<T> {
        let Some(text) = text else {
            return Some(T::default());
        };
        text.parse().map_err(|err| self.error(path, err)).ok()
    }

    fn port(&mut self, path: &KeyPath, raw: Option<i64>, default: u16) -> u16 {
        self.int_in(path, raw, default, 1..=65535, "a port number 1-65535")
    }

    fn int_in<T: TryFrom<i64> + Copy>(
        &mut self,
        path: &KeyPath,
        raw: Option<i64>,
        default: T,
        range: RangeInclusive<i64>,
        expected: &str,
    ) -> T {
        let Some(value) = raw else {
            return default;
        };
        match T::try_from(value) {
            Ok(converted) if range.contains(&value) => converted,
            _ => {
                self.error(path, format!("expected {expected}, got {value}"));
                default
            }
        }
    }

    fn duration(
        &mut self,
        path: &KeyPath,
        raw: Option<String>,
        default: Duration,
        range: RangeInclusive<Duration>,
    ) -> Duration {
        let Some(text) = raw else {
            return default;
        };
        let expected = format!(
            "a duration such as \"10s\" or \"1m30s\" between {} and {}",
            humantime::format_duration(*range.start()),
            humantime::format_duration(*range.end())
        );
        match humantime::parse_duration(&text) {
            Ok(duration) if range.contains(&duration) => duration,
            _ => {
                self.error(path, ValueError::new(expected, &text));
                default
            }
        }
    }

    /// An absolute path; `None` when absent or invalid.
    fn abs_path(&mut self, path: &KeyPath, raw: Option<String>) -> Option<PathBuf> {
        let text = raw?;
        let valid = text.starts_with('/') && !text.contains('\0');
        self.check(path, valid.then(|| PathBuf::from(&text)), || {
            ValueError::new("an absolute path (starting with '/')", &text)
        })
    }

    /// A program or library: an absolute path or a bare name looked up by the OS.
    fn program_path(&mut self, path: &KeyPath, raw: Option<String>) -> Option<PathBuf> {
        let text = raw?;
        let valid = !text.is_empty()
            && !text.contains('\0')
            && (text.starts_with('/') || !text.contains('/'));
        self.check(path, valid.then(|| PathBuf::from(&text)), || {
            ValueError::new("an absolute path or a bare file name", &text)
        })
    }
}

/// The HTTP-only keys of a check, borrowed.
struct RawHttp<'a> {
    path: Option<&'a str>,
    expect: Option<&'a str>,
    scheme: Option<&'a str>,
    tls_skip_verify: Option<bool>,
    server_name: Option<&'a str>,
}

fn raw_http(raw: &RawCheck) -> RawHttp<'_> {
    RawHttp {
        path: raw.path.as_deref(),
        expect: raw.expect.as_deref(),
        scheme: raw.scheme.as_deref(),
        tls_skip_verify: raw.tls_skip_verify,
        server_name: raw.server_name.as_deref(),
    }
}

/// The defaults of `[services.<name>.check]` around `kind`.
fn default_check(kind: CheckKind) -> CheckSpec {
    CheckSpec {
        kind,
        interval: Duration::from_secs(5),
        timeout: Duration::from_secs(2),
        rise: 2,
        fall: 3,
    }
}

/// RFC 3986 path and query characters (pchar, '/', '?') and '%' of percent-encoding: no
/// fragment, space, quote, angle bracket or anything else a request line must not carry.
fn is_url_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

/// "200" or "200-399", statuses 100-599, low <= high.
fn parse_status_range(text: &str) -> Option<(u16, u16)> {
    let status = |t: &str| {
        t.bytes().all(|b| b.is_ascii_digit()).then_some(())?;
        t.parse::<u16>().ok().filter(|s| (100..=599).contains(s))
    };
    let (lo, hi) = match text.split_once('-') {
        Some((lo, hi)) => (status(lo)?, status(hi)?),
        None => (status(text)?, status(text)?),
    };
    (lo <= hi).then_some((lo, hi))
}

/// Highest XID code accepted in `unhealthy_xids`; NVIDIA's catalog is in the low hundreds.
const MAX_XID: u64 = 65535;

/// Longest accepted poll/reconcile interval; keeps timer arithmetic far from overflow.
const MAX_INTERVAL: Duration = Duration::from_secs(24 * 60 * 60);

fn default_mesh_cidr() -> IpNet {
    IpNet::V4(ipnet::Ipv4Net::new_assert(
        std::net::Ipv4Addr::new(10, 100, 0, 0),
        16,
    ))
}

/// Stands in for a name that failed validation; never returned to callers.
fn placeholder_name() -> NodeName {
    NodeName::try_from("invalid".to_owned()).expect("a valid DNS label")
}

/// An example host address inside `cidr` for messages: the fifth host.
fn example_address(cidr: IpNet) -> String {
    let host = cidr.hosts().nth(4).unwrap_or_else(|| cidr.addr());
    format!("{host}/{}", cidr.prefix_len())
}

/// Whether `address` is its own subnet's network address, on prefixes where that address is
/// reserved (not /31, /32, /127, /128).
fn is_own_network_address(address: IpNet) -> bool {
    let host_bits = address.max_prefix_len() - address.prefix_len();
    host_bits > 1 && address.addr() == address.network()
}
