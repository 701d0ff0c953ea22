//! `clawnode doctor`: the preflight before a first start. It gathers facts (tailscaled's
//! answers, the WireGuard setup on this host, NVML) and prints each verdict with its fix; the
//! verdicts themselves are `core::doctor`'s.

use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use hyper::Method;
use serde_json::Value;

use crate::config::{self, Config, ProviderKind};
use crate::config::{IdTokenSource, TailscaleAuth};
use crate::core::doctor::{
    self, AuthFact, Check, InterfaceFact, PortHolder, Probe, ProbeOutcome, RelayFacts,
    TailscaleFacts, WireguardFacts,
};
use crate::core::link_owner::{Found, FoundKind};
use crate::core::policy;
use crate::gpu::{GpuProbe, NvmlProbe};
use crate::mesh::tailscale::authkey;
use crate::mesh::tailscale::localapi::{LocalApi, Version};
use crate::mesh::wireguard::{link::KernelSupport, link::Link, owner, userspace};

use super::CliError;

/// `tailnet_policy`: the tailnet policy file (HuJSON), for the peer relay grant check.
pub fn run(
    config_path: &Path,
    json: bool,
    tailnet_policy: Option<&Path>,
) -> Result<ExitCode, CliError> {
    let config = config::load(config_path)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::runtime)?;
    let mut checks = vec![Check::pass(
        "configuration",
        format!("{} is valid", config_path.display()),
    )];
    checks.extend(match config.network.provider {
        ProviderKind::Tailscale => {
            let facts = runtime.block_on(tailscale_facts(&config, tailnet_policy));
            doctor::tailscale_checks(&config, &facts)
        }
        ProviderKind::Wireguard => {
            let facts = runtime.block_on(wireguard_facts(&config));
            doctor::wireguard_checks(&config, &facts)
        }
        #[cfg(feature = "test-fakes")]
        ProviderKind::Fake => Vec::new(),
    });
    let relays = config.network.provider == ProviderKind::Tailscale
        && config.network.tailscale.relay_server_port.is_some();
    if let Some(path) = tailnet_policy.filter(|_| !relays) {
        checks.push(Check::warn(
            "tailnet policy",
            format!(
                "{} not read: doctor reads the tailnet policy only for the peer relay grant, and this node does not relay",
                path.display()
            ),
            "set [network.tailscale] relay_server_port, or leave out --tailnet-policy",
        ));
    }
    let inventory = if config.gpu.enabled {
        NvmlProbe::new(config.gpu.nvml_library.clone()).probe()
    } else {
        crate::gpu::GpuInventory::default()
    };
    checks.push(doctor::gpu_check(&config, &inventory));
    if json {
        let doc = serde_json::json!({ "ok": doctor::all_passed(&checks), "checks": checks });
        println!("{doc:#}");
    } else {
        print!("{}", doctor::render(&checks));
    }
    Ok(if doctor::all_passed(&checks) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

async fn tailscale_facts(config: &Config, tailnet_policy: Option<&Path>) -> TailscaleFacts {
    let ts = &config.network.tailscale;
    let api = LocalApi::new(&ts.socket);
    let reply = api.get("/localapi/v0/status?peers=false").await;
    let (status, version) = match reply {
        Ok(reply) => (
            reply.json::<Value>("status").map_err(|e| e.to_string()),
            reply.version,
        ),
        Err(error) => (Err(error.to_string()), None),
    };
    let prefs = api.get("/localapi/v0/prefs").await;
    // check-prefs with the current prefs changes nothing but needs write permission.
    let write = match &prefs {
        Ok(prefs) => api
            .call(
                Method::POST,
                "/localapi/v0/check-prefs",
                Some(prefs.body.to_vec()),
                None,
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(error) => Err(error.to_string()),
    };
    let relay = match ts.relay_server_port {
        Some(port) => {
            let pref = match &prefs {
                Ok(reply) => reply
                    .json::<Value>("prefs")
                    .map(|prefs| relay_pref(&prefs))
                    .map_err(|e| e.to_string()),
                Err(error) => Err(error.to_string()),
            };
            let own_ips: Vec<IpAddr> = status
                .as_ref()
                .map(|s| {
                    crate::mesh::tailscale::strings(&s["TailscaleIPs"])
                        .iter()
                        .filter_map(|ip| ip.parse().ok())
                        .collect()
                })
                .unwrap_or_default();
            // Nothing is sent before tailscaled relays on the port.
            let probes = if pref == Ok(Some(port)) {
                probe_port(port, &own_ips).await
            } else {
                Vec::new()
            };
            let inodes = udp_inodes(port);
            Some(RelayFacts {
                version: version.map(|v| (v.major, v.minor)),
                pref,
                bound: inodes.as_ref().map(|i| !i.is_empty()),
                holder: holder(&ts.socket, inodes.as_deref().unwrap_or_default()).await,
                wireguard_port: status
                    .as_ref()
                    .is_ok_and(|s| doctor::status_addrs_use_port(s, port)),
                probes,
                policy: tailnet_policy.map(read_policy),
            })
        }
        None => None,
    };
    // Checked without minting: doctor changes nothing, and a minted key would be wasted.
    let auth = ts.auth.as_ref().map(|auth| {
        if let Some(path) = unit_credential(auth) {
            return AuthFact::UnitCredential(path.display().to_string());
        }
        match authkey::check(auth) {
            Ok(()) => AuthFact::Works,
            Err(error) => AuthFact::Fails(error.to_string()),
        }
    });
    TailscaleFacts {
        status,
        version: version.map(|v| v.to_string()),
        services_capable: version.is_some_and(|v| v >= Version::SERVICES),
        write,
        auth,
        relay,
    }
}

/// `RelayServerPort` as tailscaled reports it: absent (omitempty) when off.
fn relay_pref(prefs: &Value) -> Option<u16> {
    prefs["RelayServerPort"]
        .as_u64()
        .and_then(|port| u16::try_from(port).ok())
}

/// The inodes of the UDP sockets bound to `port`; `None` when neither table is readable (no
/// procfs).
fn udp_inodes(port: u16) -> Option<Vec<u64>> {
    let tables: Vec<String> = ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .collect();
    (!tables.is_empty()).then(|| {
        tables
            .iter()
            .flat_map(|t| doctor::udp_port_inodes(t, port))
            .collect()
    })
}

/// Whether one of `inodes` is a socket of tailscaled's, whose pid the LocalAPI socket's peer
/// credentials give: anything else on the port keeps the relay server from binding it.
async fn holder(socket: &Path, inodes: &[u64]) -> PortHolder {
    if inodes.is_empty() {
        return PortHolder::Unknown("not bound".into());
    }
    // Bounded like every LocalAPI call: a wedged tailscaled with a full backlog never accepts.
    let connect = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::UnixStream::connect(socket),
    );
    let pid = match connect.await {
        Ok(Ok(stream)) => stream.peer_cred().ok().and_then(|cred| cred.pid()),
        Ok(Err(error)) => return PortHolder::Unknown(format!("{}: {error}", socket.display())),
        Err(_) => return PortHolder::Unknown(format!("{}: no answer in 2 s", socket.display())),
    };
    let Some(pid) = pid else {
        return PortHolder::Unknown("tailscaled's pid is unknown".into());
    };
    let dir = format!("/proc/{pid}/fd");
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(error) => return PortHolder::Unknown(format!("{dir}: {error}")),
    };
    let held = entries.filter_map(Result::ok).any(|entry| {
        std::fs::read_link(entry.path()).is_ok_and(|target| {
            let target = target.to_string_lossy();
            target
                .strip_prefix("socket:[")
                .and_then(|rest| rest.strip_suffix(']'))
                .and_then(|inode| inode.parse::<u64>().ok())
                .is_some_and(|inode| inodes.contains(&inode))
        })
    });
    if held {
        PortHolder::Tailscaled
    } else {
        PortHolder::Other
    }
}

/// Send one datagram to `port` at 127.0.0.1 and at one of this node's own addresses from a
/// connected socket: a local ICMP port unreachable (nothing bound there) surfaces as
/// ECONNREFUSED on the next receive. The node's Tailscale addresses are left out: peers reach a
/// relay on its underlay addresses.
async fn probe_port(port: u16, tailscale_ips: &[IpAddr]) -> Vec<Probe> {
    let mut targets = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
    targets.extend(own_address(tailscale_ips));
    let mut probes = Vec::new();
    for ip in targets {
        let target = SocketAddr::new(ip, port);
        probes.push(Probe {
            target: target.to_string(),
            outcome: probe(target).await,
        });
    }
    probes
}

async fn probe(target: SocketAddr) -> ProbeOutcome {
    let unspecified: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sent = async {
        let socket = tokio::net::UdpSocket::bind(unspecified).await?;
        socket.connect(target).await?;
        socket
            .send(b"clawnode doctor: peer relay port probe")
            .await?;
        Ok::<_, std::io::Error>(socket)
    }
    .await;
    let socket = match sent {
        Ok(socket) => socket,
        Err(error) => return ProbeOutcome::Failed(error.to_string()),
    };
    let mut buf = [0u8; 64];
    match tokio::time::timeout(
        Duration::from_millis(doctor::PROBE_WAIT_MS),
        socket.recv(&mut buf),
    )
    .await
    {
        Ok(Err(error)) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
            ProbeOutcome::Refused
        }
        // A reply or silence: something took the datagram.
        Ok(Ok(_)) | Err(_) => ProbeOutcome::NotRefused,
        Ok(Err(error)) => ProbeOutcome::Failed(error.to_string()),
    }
}

/// The first non-loopback address of this host that is not one of its Tailscale addresses nor
/// IPv6 link-local (which needs a scope); IPv4 first, as tailscaled's relay server needs its
/// IPv4 socket and may lack the IPv6 one.
fn own_address(tailscale_ips: &[IpAddr]) -> Option<IpAddr> {
    let addresses: Vec<IpAddr> = nix::ifaddrs::getifaddrs()
        .ok()?
        .filter_map(|ifa| {
            let address = ifa.address?;
            if let Some(v4) = address.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .filter(|ip| !skipped(ip) && !tailscale_ips.contains(ip))
        .collect();
    addresses
        .iter()
        .find(|ip| ip.is_ipv4())
        .or_else(|| addresses.first())
        .copied()
}

/// Loopback and IPv6 link-local (needs a scope).
fn skipped(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// The policy file, at most [`policy::MAX_POLICY_BYTES`], parsed; errors name the file and,
/// when known, line and column.
fn read_policy(path: &Path) -> (String, Result<Value, String>) {
    let name = path.display().to_string();
    let read = || -> Result<String, String> {
        let file = std::fs::File::open(path).map_err(|e| format!("{name}: {e}"))?;
        let mut text = String::new();
        file.take(policy::MAX_POLICY_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(|e| format!("{name}: {e}"))?;
        if text.len() as u64 > policy::MAX_POLICY_BYTES {
            return Err(format!(
                "{name}: larger than {} KiB; not a tailnet policy file",
                policy::MAX_POLICY_BYTES / 1024
            ));
        }
        Ok(text)
    };
    let parsed = read().and_then(|text| {
        policy::parse(&text).map_err(|error| match (error.line, error.column) {
            (Some(line), Some(column)) => format!("{name}:{line}:{column}: {}", error.message),
            _ => format!("{name}: {}", error.message),
        })
    });
    (name, parsed)
}

/// A secret file under systemd's credentials directory that is absent here: doctor runs from a
/// shell, outside the unit, where `/run/credentials/clawnode.service/` does not exist.
fn unit_credential(auth: &TailscaleAuth) -> Option<&Path> {
    let path = match auth {
        TailscaleAuth::KeyFile(path) => path,
        TailscaleAuth::WorkloadIdentity {
            id_token: IdTokenSource::File(path),
            ..
        } => path,
        TailscaleAuth::Key(_)
        | TailscaleAuth::KeyEnv(_)
        | TailscaleAuth::WorkloadIdentity {
            id_token: IdTokenSource::Audience(_),
            ..
        } => return None,
    };
    (path.starts_with("/run/credentials") && !path.exists()).then_some(path.as_path())
}

/// The link with the configured name, judged as the daemon would.
fn interface_fact(config: &Config) -> InterfaceFact {
    let name = config.network.wireguard.interface.as_str();
    match owner::find_in_sysfs(name) {
        None => InterfaceFact::Absent,
        Some(found) if owner::recorded(&config.node.state_dir, name, &found) => {
            InterfaceFact::Clawnodes
        }
        Some(Found {
            kind: FoundKind::Wireguard(_),
            ..
        }) => InterfaceFact::ForeignWireguard,
        Some(Found {
            kind: FoundKind::Other(kind),
            ..
        }) => InterfaceFact::Foreign(kind),
    }
}

async fn wireguard_facts(config: &Config) -> WireguardFacts {
    let wg = &config.network.wireguard;
    let cap_net_admin = crate::systemd::has_cap_net_admin();
    let kernel_module = if cap_net_admin {
        match Link::connect() {
            Ok(link) => match link.probe_kernel().await {
                Ok(KernelSupport::Available) => Some(true),
                Ok(KernelSupport::Missing) => Some(false),
                Err(_) => None,
            },
            Err(_) => None,
        }
    } else if Path::new("/sys/module/wireguard").exists() {
        Some(true)
    } else {
        None
    };
    let port = std::net::UdpSocket::bind(("0.0.0.0", wg.listen_port))
        .map(|_| ())
        .map_err(|e| e.to_string());
    let key_file = match std::fs::metadata(&wg.private_key_file) {
        Ok(meta) if meta.permissions().mode() & 0o077 != 0 => Err(format!(
            "{} is readable by others (mode {:o})",
            wg.private_key_file.display(),
            meta.permissions().mode() & 0o777
        )),
        Ok(_) => std::fs::File::open(&wg.private_key_file)
            .map(|_| ())
            .map_err(|e| format!("{}: {e}", wg.private_key_file.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("{}: {e}", wg.private_key_file.display())),
    };
    WireguardFacts {
        kernel_module,
        userspace_found: userspace::find_program(&wg.userspace_implementation)
            .map(|p| p.display().to_string()),
        tun_device: Path::new("/dev/net/tun").exists(),
        cap_net_admin,
        port,
        interface: interface_fact(config),
        key_file,
    }
}
