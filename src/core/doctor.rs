//! `clawnode doctor`'s verdicts: each check turns facts the shell gathered into pass, warn or
//! fail with the fix an operator needs. Nothing here touches the system.

use serde::Serialize;
use serde_json::Value;

use crate::config::{Config, ServiceMode};
use crate::core::policy;
use crate::core::tailscale_relay::{RELAY_MIN_VERSION, relay_too_old};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Pass,
    /// Worth knowing; does not stop the node from starting.
    Warn,
    Fail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: String,
    pub outcome: Outcome,
    pub detail: String,
    pub fix: Option<String>,
}

impl Check {
    pub fn pass(name: &str, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            outcome: Outcome::Pass,
            detail: detail.into(),
            fix: None,
        }
    }

    pub fn warn(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            outcome: Outcome::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    pub fn fail(name: &str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            outcome: Outcome::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Exit 0 only when nothing failed.
pub fn all_passed(checks: &[Check]) -> bool {
    checks.iter().all(|c| c.outcome != Outcome::Fail)
}

/// What the shell learned from tailscaled.
#[derive(Debug, Clone)]
pub struct TailscaleFacts {
    /// `Err` holds why the LocalAPI could not be read.
    pub status: Result<Value, String>,
    pub version: Option<String>,
    /// Whether the version is at least 1.86 (Tailscale Services).
    pub services_capable: bool,
    /// The outcome of a harmless write (`check-prefs` with the current prefs).
    pub write: Result<(), String>,
    /// Whether the configured auth method yields a key, without showing it.
    pub auth: Option<AuthFact>,
    /// Gathered only when `relay_server_port` is configured.
    pub relay: Option<RelayFacts>,
}

/// What the shell learned about this node as a peer relay.
#[derive(Debug, Clone)]
pub struct RelayFacts {
    /// tailscaled's major and minor version, when it said.
    pub version: Option<(u32, u32)>,
    /// `RelayServerPort` in tailscaled's prefs; `Err` holds why they could not be read.
    pub pref: Result<Option<u16>, String>,
    /// Whether a socket is bound to the configured UDP port (`/proc/net/udp`, `udp6`); `None`
    /// when neither could be read.
    pub bound: Option<bool>,
    /// Datagrams sent to the configured port at this node's own addresses.
    pub probes: Vec<Probe>,
    /// The `--tailnet-policy` file: its name, and the parsed policy or why it is unusable
    /// (`file:line:col: …` where the parser knows the place).
    pub policy: Option<(String, Result<Value, String>)>,
}

/// One datagram from a connected UDP socket, and what the following receive said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// `address:port`.
    pub target: String,
    pub outcome: ProbeOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// ECONNREFUSED: an ICMP port unreachable came back, so nothing receives there.
    Refused,
    /// No refusal within the wait: something receives (or a firewall drops silently).
    NotRefused,
    /// The datagram could not be sent.
    Failed(String),
}

/// How long a probe waits for a refusal; a local ICMP answer takes microseconds.
pub const PROBE_WAIT_MS: u64 = 300;

/// tailscaled before this opens the relay port only when a peer first asks for an endpoint.
const RELAY_EAGER_BIND: (u32, u32) = (1, 90);

/// What doctor learnt about the configured auth method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFact {
    Works,
    Fails(String),
    /// A systemd credential (`/run/credentials/<unit>/…`): only the running unit can read it.
    UnitCredential(String),
}

pub fn tailscale_checks(config: &Config, facts: &TailscaleFacts) -> Vec<Check> {
    let ts = &config.network.tailscale;
    let socket = ts.socket.display();
    let mut checks = Vec::new();
    let status = match &facts.status {
        Ok(status) => status,
        Err(error) => {
            checks.push(Check::fail(
                "tailscaled reachable",
                format!("{socket}: {error}"),
                "install and start tailscaled (systemctl enable --now tailscaled), or set [network.tailscale] socket",
            ));
            // The auth method does not depend on tailscaled: report it now, not after the fix.
            if let Some(auth) = &facts.auth {
                checks.push(auth_method_check(auth));
            }
            return checks;
        }
    };
    let version = facts.version.clone().unwrap_or_else(|| "unknown".into());
    checks.push(if config.services.is_empty() || facts.services_capable {
        Check::pass(
            "tailscaled reachable",
            format!("version {version} at {socket}"),
        )
    } else {
        Check::fail(
            "tailscaled reachable",
            format!("version {version} at {socket} is too old for Tailscale Services"),
            "upgrade tailscaled to 1.86 or newer",
        )
    });
    checks.push(match &facts.write {
        Ok(()) => Check::pass("LocalAPI write access", "clawnode may change prefs and serve config"),
        Err(error) => Check::fail(
            "LocalAPI write access",
            error.clone(),
            "run clawnode as root (the packaged unit does), or make its user tailscaled's operator: tailscale set --operator=<user>",
        ),
    });
    let state = status["BackendState"].as_str().unwrap_or("");
    checks.push(match (state, &facts.auth) {
        ("Running", _) => Check::pass("logged in", "tailscaled is Running"),
        ("NeedsMachineAuth", _) => Check::fail(
            "logged in",
            "the device waits for admin approval",
            "approve it in the Tailscale admin console (Machines), or use a pre-authorized key",
        ),
        (_, Some(AuthFact::Works)) => Check::pass(
            "logged in",
            format!("tailscaled is {state}; clawnode will log in with the configured auth method"),
        ),
        (_, Some(AuthFact::Fails(error))) => Check::fail(
            "logged in",
            format!("tailscaled is {state} and the auth method fails: {error}"),
            "fix auth_key_file / auth_key_env / workload_identity under [network.tailscale]",
        ),
        (_, Some(AuthFact::UnitCredential(path))) => Check::warn(
            "logged in",
            format!("tailscaled is {state}; the key is the systemd credential {path}, which only the running unit can read"),
            CREDENTIAL_FIX,
        ),
        (_, None) => Check::fail(
            "logged in",
            format!("tailscaled is {state} and no auth method is configured"),
            "set auth_key_file, auth_key_env or workload_identity under [network.tailscale], or run `tailscale up` once",
        ),
    });
    if let Some(want) = &ts.tailnet {
        let name = status["CurrentTailnet"]["Name"].as_str().unwrap_or("");
        let suffix = status["CurrentTailnet"]["MagicDNSSuffix"]
            .as_str()
            .unwrap_or("");
        checks.push(if state != "Running" {
            Check::warn(
                "tailnet",
                format!("cannot tell before login (config expects {want})"),
                "run doctor again once the node is logged in",
            )
        } else if name == want || suffix == want {
            Check::pass("tailnet", format!("{name} ({suffix}) as configured"))
        } else {
            Check::fail(
                "tailnet",
                format!("this device is in {name:?} ({suffix}), the config expects {want:?}"),
                "log the device out (tailscale logout) and use a key for the right tailnet, or correct [network.tailscale] tailnet",
            )
        });
    }
    let tags: Vec<String> = status["Self"]["Tags"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let wanted: Vec<String> = ts.tags.iter().map(ToString::to_string).collect();
    if !config.services.is_empty() {
        checks.push(if wanted.is_empty() {
            Check::fail(
                "node tagged",
                "no tags configured, and Tailscale Services need a tagged host",
                "set [network.tailscale] tags, e.g. [\"tag:clawbernetes\"], and see `clawnode tailscale policy`",
            )
        } else if state == "Running" && !same_set(&tags, &wanted) {
            Check::warn(
                "node tagged",
                format!(
                    "the device has tags [{}]; clawnode will request [{}] at start",
                    tags.join(", "),
                    wanted.join(", ")
                ),
                "make sure tagOwners lets this node own the tags (see `clawnode tailscale policy`)",
            )
        } else {
            Check::pass("node tagged", wanted.join(", "))
        });
    }
    let wants_tls = config
        .services
        .values()
        .any(|s| s.tls_cert || s.mode == ServiceMode::Http { tls: true });
    if wants_tls {
        let enabled = !status["CertDomains"].is_null()
            || status["Self"]["CapMap"]
                .as_object()
                .is_some_and(|caps| caps.contains_key("https"));
        checks.push(if enabled {
            Check::pass("HTTPS certificates", "enabled in the tailnet")
        } else if state != "Running" {
            Check::warn(
                "HTTPS certificates",
                "cannot tell before login",
                "run doctor again once the node is logged in",
            )
        } else {
            Check::fail(
                "HTTPS certificates",
                "a service wants TLS but the tailnet has HTTPS certificates off",
                "enable them in the admin console: DNS > HTTPS Certificates",
            )
        });
    }
    if let Some(relay) = &facts.relay {
        checks.extend(relay_checks(config, &version, relay));
    }
    checks
}

/// Whether `/proc/net/udp` (or `udp6`) text lists a socket bound to local `port`.
pub fn udp_port_bound(proc_net_udp: &str, port: u16) -> bool {
    let wanted = format!("{port:04X}");
    proc_net_udp.lines().skip(1).any(|line| {
        line.split_whitespace()
            .nth(1)
            .and_then(|local| local.rsplit_once(':'))
            .is_some_and(|(_, p)| p.eq_ignore_ascii_case(&wanted))
    })
}

/// The peer relay checks. A relay problem never stops the node, so none of them fails.
pub fn relay_checks(config: &Config, version: &str, facts: &RelayFacts) -> Vec<Check> {
    let ts = &config.network.tailscale;
    let Some(port) = ts.relay_server_port else {
        return Vec::new();
    };
    let mut checks = Vec::new();
    let (major, minor) = RELAY_MIN_VERSION;
    let capable = facts.version.map(|v| v >= RELAY_MIN_VERSION);
    checks.push(match capable {
        Some(true) => Check::pass(
            "peer relay: tailscaled version",
            format!("{version} can serve as a peer relay ({major}.{minor} or newer)"),
        ),
        Some(false) => Check::warn(
            "peer relay: tailscaled version",
            format!(
                "{}; the port and its reachability are not checked",
                relay_too_old(version)
            ),
            format!(
                "upgrade tailscaled to {major}.{minor} or newer; the node runs meanwhile, without relaying"
            ),
        ),
        None => Check::warn(
            "peer relay: tailscaled version",
            format!(
                "tailscaled did not say its version; peer relays need {major}.{minor} or newer"
            ),
            format!("upgrade tailscaled to {major}.{minor} or newer"),
        ),
    });
    if capable != Some(false) {
        checks.push(relay_port_check(port, &facts.pref));
        checks.push(relay_reachable_check(port, version, facts));
    }
    if let Some((path, parsed)) = &facts.policy {
        let tags: Vec<String> = ts.tags.iter().map(ToString::to_string).collect();
        checks.push(relay_grant_check(path, parsed, &tags));
    }
    checks
}

fn relay_port_check(port: u16, pref: &Result<Option<u16>, String>) -> Check {
    const NAME: &str = "peer relay: port";
    match pref {
        Ok(Some(now)) if *now == port => {
            Check::pass(NAME, format!("RelayServerPort is {port}, as configured"))
        }
        Ok(Some(now)) => Check::warn(
            NAME,
            format!(
                "RelayServerPort is {now} (not set by this config); clawnode sets it to {port} at start"
            ),
            format!(
                "start clawnode, or set relay_server_port = {now} to keep it; allow UDP {port} in the firewall"
            ),
        ),
        Ok(None) => Check::warn(
            NAME,
            format!("RelayServerPort is not set; clawnode sets it to {port} at start"),
            format!("start clawnode (systemctl start clawnode); allow UDP {port} in the firewall"),
        ),
        Err(error) => Check::warn(
            NAME,
            format!("cannot read tailscaled's prefs: {error}"),
            "run doctor as root or as tailscaled's operator",
        ),
    }
}

fn relay_reachable_check(port: u16, version: &str, facts: &RelayFacts) -> Check {
    const NAME: &str = "peer relay: reachable";
    if facts.pref != Ok(Some(port)) {
        return Check::pass(
            NAME,
            format!("not checked: tailscaled does not relay on UDP {port} yet"),
        );
    }
    let lazy = facts.version.is_some_and(|v| v < RELAY_EAGER_BIND);
    if facts.bound == Some(false) && lazy {
        let (major, minor) = RELAY_EAGER_BIND;
        return Check::pass(
            NAME,
            format!(
                "not checked: nothing is bound to UDP {port} yet, and tailscaled {version} opens it when a peer first asks for a relay endpoint ({major}.{minor} and newer open it at once)"
            ),
        );
    }
    let mut tried = vec![match facts.bound {
        Some(true) => format!("UDP {port} is bound (/proc/net/udp, udp6)"),
        Some(false) => format!("nothing is bound to UDP {port} (/proc/net/udp, udp6)"),
        None => "/proc/net/udp and udp6 could not be read".to_string(),
    }];
    let list = |outcome: &ProbeOutcome| {
        facts
            .probes
            .iter()
            .filter(|p| &p.outcome == outcome)
            .map(|p| p.target.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let refused = list(&ProbeOutcome::Refused);
    let answered = list(&ProbeOutcome::NotRefused);
    if !answered.is_empty() {
        tried.push(format!(
            "a datagram to {answered} drew no ICMP port unreachable within {PROBE_WAIT_MS} ms"
        ));
    }
    if !refused.is_empty() {
        tried.push(format!(
            "a datagram to {refused} was refused (ICMP port unreachable)"
        ));
    }
    for probe in &facts.probes {
        if let ProbeOutcome::Failed(error) = &probe.outcome {
            tried.push(format!(
                "a datagram to {} could not be sent: {error}",
                probe.target
            ));
        }
    }
    let detail = tried.join("; ");
    if facts.bound == Some(false) || !refused.is_empty() || answered.is_empty() {
        Check::warn(
            NAME,
            detail,
            format!(
                "check tailscaled's log for the relay server (journalctl -u tailscaled); a REJECT rule in the host firewall refuses too: allow UDP {port}"
            ),
        )
    } else {
        Check::pass(
            NAME,
            format!("{detail} (seen from this node only: a firewall or NAT in front of it is not)"),
        )
    }
}

fn relay_grant_check(path: &str, parsed: &Result<Value, String>, tags: &[String]) -> Check {
    const NAME: &str = "peer relay: grant";
    let policy = match parsed {
        Ok(policy) => policy,
        Err(error) => {
            return Check::warn(
                NAME,
                error.clone(),
                "pass the tailnet policy file as kept in git, or as downloaded from the admin console (Access controls, JSON editor)",
            );
        }
    };
    if let Some(grant) = policy::find_relay_grant(policy, tags) {
        return Check::pass(
            NAME,
            format!(
                "{path} grants {} to src {} on dst {}",
                policy::RELAY_CAP,
                grant["src"],
                grant["dst"]
            ),
        );
    }
    if tags.is_empty() {
        return Check::warn(
            NAME,
            format!(
                "{path} has no grant of {} for every node (dst \"*\"), and no tags are configured for a grant to name",
                policy::RELAY_CAP
            ),
            "set [network.tailscale] tags, then add the grant `clawnode tailscale policy` prints",
        );
    }
    let wanted = policy::relay_grant(tags, policy::DEFAULT_BUYERS);
    Check::warn(
        NAME,
        format!(
            "{path} has no grant of {} whose dst names {}: no peer may use this node as a relay",
            policy::RELAY_CAP,
            tags.join(" or ")
        ),
        format!(
            "add to \"grants\": {wanted} (`clawnode tailscale policy` prints it for your buyers)"
        ),
    )
}

/// What the shell learned about WireGuard on this host.
#[derive(Debug, Clone)]
pub struct WireguardFacts {
    /// `None`: could not probe (no CAP_NET_ADMIN).
    pub kernel_module: Option<bool>,
    pub userspace_found: Option<String>,
    pub tun_device: bool,
    pub cap_net_admin: bool,
    /// `Err` holds why binding the listen port failed.
    pub port: Result<(), String>,
    pub interface: InterfaceFact,
    pub key_file: Result<(), String>,
}

/// The link that has the configured interface name, as the daemon would judge it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterfaceFact {
    Absent,
    /// The one clawnode created (its record in state_dir names this very link).
    Clawnodes,
    /// A WireGuard interface clawnode did not create.
    ForeignWireguard,
    /// Something else: the link kind.
    Foreign(String),
}

/// Tag order does not matter to tailscaled.
fn same_set(a: &[String], b: &[String]) -> bool {
    let (mut a, mut b) = (a.to_vec(), b.to_vec());
    a.sort();
    b.sort();
    a == b
}

const CREDENTIAL_FIX: &str =
    "check the file that LoadCredential= names in the unit (systemctl cat clawnode)";

fn auth_method_check(auth: &AuthFact) -> Check {
    match auth {
        AuthFact::Works => Check::pass("auth method", "the configured auth method yields a key"),
        AuthFact::Fails(error) => Check::fail(
            "auth method",
            error.clone(),
            "fix auth_key_file / auth_key_env / workload_identity under [network.tailscale]",
        ),
        AuthFact::UnitCredential(path) => Check::warn(
            "auth method",
            format!("{path} is a systemd credential: only the running unit can read it"),
            CREDENTIAL_FIX,
        ),
    }
}

pub fn wireguard_checks(config: &Config, facts: &WireguardFacts) -> Vec<Check> {
    let wg = &config.network.wireguard;
    let mut checks = Vec::new();
    let userspace = facts.userspace_found.as_ref().filter(|_| facts.tun_device);
    checks.push(match (facts.kernel_module, userspace) {
        (Some(true), _) => Check::pass("WireGuard", "kernel module available"),
        (_, Some(path)) => Check::pass(
            "WireGuard",
            format!(
                "userspace implementation {path}{}",
                if facts.kernel_module == Some(false) { " (no kernel module)" } else { "" }
            ),
        ),
        (None, None) => Check::warn(
            "WireGuard",
            "cannot probe the kernel module without CAP_NET_ADMIN, and no userspace implementation was found",
            "run doctor as root; or install wireguard-go",
        ),
        (Some(false), None) => Check::fail(
            "WireGuard",
            if facts.userspace_found.is_some() {
                "no kernel module, and /dev/net/tun is missing for the userspace implementation".to_string()
            } else {
                format!(
                    "no kernel module and no userspace implementation {}",
                    wg.userspace_implementation.display()
                )
            },
            "load the module (modprobe wireguard) or install wireguard-go",
        ),
    });
    checks.push(if facts.cap_net_admin {
        Check::pass("CAP_NET_ADMIN", "held")
    } else {
        Check::fail(
            "CAP_NET_ADMIN",
            "not held: clawnode cannot create or configure the interface",
            "run it through its systemd unit or as root",
        )
    });
    let iface = &wg.interface;
    checks.push(match &facts.interface {
        InterfaceFact::Absent => Check::pass("interface", format!("{iface} is created at start")),
        InterfaceFact::Clawnodes => {
            Check::pass("interface", format!("{iface} exists and clawnode created it"))
        }
        InterfaceFact::ForeignWireguard if wg.adopt_existing_interface => Check::warn(
            "interface",
            format!("{iface} is a WireGuard interface clawnode did not create; adopt_existing_interface = true: clawnode takes it over, replacing its key, addresses and peers"),
            "set adopt_existing_interface = false to leave it alone",
        ),
        InterfaceFact::ForeignWireguard => Check::fail(
            "interface",
            format!("{iface} is a WireGuard interface clawnode did not create: clawnode leaves it alone and the mesh does not start"),
            "remove it (wg-quick down), set another [network.wireguard] interface, or set adopt_existing_interface = true",
        ),
        InterfaceFact::Foreign(kind) => Check::fail(
            "interface",
            format!("{iface} exists and is not WireGuard (a {kind} link): clawnode leaves it alone and the mesh does not start"),
            "remove it or set another [network.wireguard] interface",
        ),
    });
    // Held by the interface clawnode will use: its own, or the one it adopts.
    let held_by_ours = facts.interface == InterfaceFact::Clawnodes
        || (facts.interface == InterfaceFact::ForeignWireguard && wg.adopt_existing_interface);
    checks.push(match (&facts.port, held_by_ours) {
        (Ok(()), _) => Check::pass("listen port", format!("UDP {} is free", wg.listen_port)),
        (Err(_), true) => Check::pass(
            "listen port",
            format!(
                "UDP {} is held by {} (clawnode's interface)",
                wg.listen_port, wg.interface
            ),
        ),
        (Err(error), false) => Check::fail(
            "listen port",
            format!("UDP {}: {error}", wg.listen_port),
            "stop what holds it (ss -ulpn) or set [network.wireguard] listen_port",
        ),
    });
    checks.push(match &facts.key_file {
        Ok(()) => Check::pass("private key", wg.private_key_file.display().to_string()),
        Err(error) => Check::fail(
            "private key",
            error.clone(),
            "make the file readable by clawnode only (chmod 600), or remove it to have a new one generated",
        ),
    });
    checks
}

/// The lines `clawnode doctor` prints.
pub fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for check in checks {
        let mark = match check.outcome {
            Outcome::Pass => " ok ",
            Outcome::Warn => "warn",
            Outcome::Fail => "FAIL",
        };
        out.push_str(&format!("[{mark}] {}: {}\n", check.name, check.detail));
        if let Some(fix) = check
            .fix
            .as_ref()
            .filter(|_| check.outcome != Outcome::Pass)
        {
            out.push_str(&format!("       fix: {fix}\n"));
        }
    }
    out
}

/// The GPU check: NVML missing is fine unless the config requires a GPU.
pub fn gpu_check(config: &Config, inventory: &super::model::GpuInventory) -> Check {
    if !config.gpu.enabled {
        return Check::pass("GPUs", "probing disabled ([gpu] enabled = false)");
    }
    let count = inventory.gpus.len();
    if count > 0 {
        let driver = inventory.driver_version.as_deref().unwrap_or("unknown");
        return Check::pass(
            "GPUs",
            format!("{count} found through NVML, driver {driver}"),
        );
    }
    let why = inventory
        .unavailable
        .as_ref()
        .map_or("none found".to_string(), |u| {
            format!("{}: {}", u.reason, u.detail)
        });
    let fix = "install the NVIDIA driver (it ships libnvidia-ml.so.1), or set [gpu] nvml_library";
    if config.gpu.required {
        Check::fail("GPUs", why, fix)
    } else {
        Check::warn(
            "GPUs",
            format!("{why}; the node will advertise no GPUs"),
            fix,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(interface: InterfaceFact, port: Result<(), String>) -> WireguardFacts {
        WireguardFacts {
            kernel_module: Some(true),
            userspace_found: None,
            tun_device: true,
            cap_net_admin: true,
            port,
            interface,
            key_file: Ok(()),
        }
    }

    fn check<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks.iter().find(|c| c.name == name).unwrap()
    }

    #[test]
    fn an_interface_clawnode_did_not_create_fails_unless_it_is_to_be_adopted() {
        let mut config = crate::config::example();
        let held = || Err("Address in use".to_string());
        let bridge = wireguard_checks(
            &config,
            &facts(InterfaceFact::Foreign("bridge".into()), held()),
        );
        assert_eq!(check(&bridge, "interface").outcome, Outcome::Fail);
        assert!(check(&bridge, "interface").detail.contains("a bridge link"));
        assert_eq!(check(&bridge, "listen port").outcome, Outcome::Fail);

        let wg_quick = wireguard_checks(&config, &facts(InterfaceFact::ForeignWireguard, held()));
        assert_eq!(check(&wg_quick, "interface").outcome, Outcome::Fail);
        assert!(
            check(&wg_quick, "interface")
                .fix
                .as_deref()
                .unwrap_or_default()
                .contains("adopt_existing_interface = true")
        );
        assert_eq!(check(&wg_quick, "listen port").outcome, Outcome::Fail);

        config.network.wireguard.adopt_existing_interface = true;
        let adopted = wireguard_checks(&config, &facts(InterfaceFact::ForeignWireguard, held()));
        assert_eq!(check(&adopted, "interface").outcome, Outcome::Warn);
        assert_eq!(check(&adopted, "listen port").outcome, Outcome::Pass);

        let own = wireguard_checks(&config, &facts(InterfaceFact::Clawnodes, held()));
        assert_eq!(check(&own, "interface").outcome, Outcome::Pass);
        assert_eq!(check(&own, "listen port").outcome, Outcome::Pass);
    }

    fn relay_config(tags: &str) -> Config {
        let text = format!(
            "[node]\nname = \"gpu-01\"\n[network]\nprovider = \"tailscale\"\n[network.tailscale]\ntags = [{tags}]\nrelay_server_port = 40000\n"
        );
        crate::config::parse(std::path::Path::new("t.toml"), &text).unwrap()
    }

    fn relay_facts(version: (u32, u32), pref: Option<u16>) -> RelayFacts {
        RelayFacts {
            version: Some(version),
            pref: Ok(pref),
            bound: Some(pref.is_some()),
            probes: vec![
                Probe {
                    target: "127.0.0.1:40000".into(),
                    outcome: ProbeOutcome::NotRefused,
                },
                Probe {
                    target: "192.0.2.10:40000".into(),
                    outcome: ProbeOutcome::NotRefused,
                },
            ],
            policy: None,
        }
    }

    const TAG: &str = "\"tag:gpu-provider\"";

    #[test]
    fn a_relay_serving_on_the_configured_port_passes_every_relay_check() {
        let checks = relay_checks(
            &relay_config(TAG),
            "1.102.2",
            &relay_facts((1, 102), Some(40000)),
        );
        let names: Vec<&str> = checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "peer relay: tailscaled version",
                "peer relay: port",
                "peer relay: reachable"
            ],
            "no grant check without a policy file"
        );
        assert!(
            checks.iter().all(|c| c.outcome == Outcome::Pass),
            "{checks:#?}"
        );
        let reachable = check(&checks, "peer relay: reachable");
        assert!(
            reachable.detail.starts_with("UDP 40000 is bound (/proc/net/udp, udp6); a datagram to 127.0.0.1:40000, 192.0.2.10:40000 drew no ICMP port unreachable within 300 ms"),
            "{reachable:?}"
        );
        // Nothing is gathered, and nothing checked, without the key.
        let plain = crate::config::parse(
            std::path::Path::new("t.toml"),
            "[node]\nname = \"gpu-01\"\n[network]\nprovider = \"tailscale\"\n",
        )
        .unwrap();
        assert!(relay_checks(&plain, "1.102.2", &relay_facts((1, 102), None)).is_empty());
    }

    #[test]
    fn relay_problems_warn_and_never_fail_the_run() {
        let config = relay_config(TAG);
        let old = relay_checks(&config, "1.80.3", &relay_facts((1, 80), None));
        assert_eq!(
            old.len(),
            1,
            "too old: port and reachability are not checked: {old:#?}"
        );
        assert_eq!(old[0].outcome, Outcome::Warn);
        assert!(
            old[0].detail.starts_with(&relay_too_old("1.80.3")),
            "{old:?}"
        );
        assert!(all_passed(&old));

        let unset = relay_checks(&config, "1.102.2", &relay_facts((1, 102), None));
        let port = check(&unset, "peer relay: port");
        assert_eq!(port.outcome, Outcome::Warn);
        assert_eq!(
            port.detail,
            "RelayServerPort is not set; clawnode sets it to 40000 at start"
        );
        let reachable = check(&unset, "peer relay: reachable");
        assert_eq!(reachable.outcome, Outcome::Pass);
        assert!(reachable.detail.starts_with("not checked"), "{reachable:?}");

        let mut by_hand = relay_facts((1, 102), Some(41000));
        by_hand.bound = Some(true);
        let other = relay_checks(&config, "1.102.2", &by_hand);
        assert!(
            check(&other, "peer relay: port")
                .detail
                .starts_with("RelayServerPort is 41000")
        );

        let mut refused = relay_facts((1, 102), Some(40000));
        refused.bound = Some(false);
        for probe in &mut refused.probes {
            probe.outcome = ProbeOutcome::Refused;
        }
        refused.probes.push(Probe {
            target: "[2001:db8::1]:40000".into(),
            outcome: ProbeOutcome::Failed("Network is unreachable".into()),
        });
        let checks = relay_checks(&config, "1.102.2", &refused);
        let reachable = check(&checks, "peer relay: reachable");
        assert_eq!(reachable.outcome, Outcome::Warn);
        assert_eq!(
            reachable.detail,
            "nothing is bound to UDP 40000 (/proc/net/udp, udp6); a datagram to 127.0.0.1:40000, 192.0.2.10:40000 was refused (ICMP port unreachable); a datagram to [2001:db8::1]:40000 could not be sent: Network is unreachable"
        );
        assert!(all_passed(&checks));

        // A REJECT rule refuses although tailscaled holds the port.
        let mut rejected = relay_facts((1, 102), Some(40000));
        rejected.probes[1].outcome = ProbeOutcome::Refused;
        let checks = relay_checks(&config, "1.102.2", &rejected);
        assert_eq!(
            check(&checks, "peer relay: reachable").outcome,
            Outcome::Warn
        );

        let mut unknown = relay_facts((1, 102), Some(40000));
        unknown.version = None;
        let checks = relay_checks(&config, "unknown", &unknown);
        assert_eq!(
            check(&checks, "peer relay: tailscaled version").outcome,
            Outcome::Warn
        );
        assert!(all_passed(&checks));
    }

    #[test]
    fn a_relay_port_that_1_86_opens_on_first_use_is_not_reported_unbound() {
        let mut lazy = relay_facts((1, 88), Some(40000));
        lazy.bound = Some(false);
        for probe in &mut lazy.probes {
            probe.outcome = ProbeOutcome::Refused;
        }
        let checks = relay_checks(&relay_config(TAG), "1.88.1", &lazy);
        let reachable = check(&checks, "peer relay: reachable");
        assert_eq!(reachable.outcome, Outcome::Pass);
        assert!(
            reachable.detail.contains("opens it when a peer first asks"),
            "{reachable:?}"
        );
    }

    #[test]
    fn the_grant_check_names_the_grant_to_add() {
        let config = relay_config("\"tag:clawbernetes\", \"tag:gpu-provider\"");
        let mut facts = relay_facts((1, 102), Some(40000));
        let policy = r#"{"grants": [{"src": ["*"], "dst": ["*"], "ip": ["*"]}]}"#;
        facts.policy = Some(("policy.hujson".into(), Ok(policy::parse(policy).unwrap())));
        let checks = relay_checks(&config, "1.102.2", &facts);
        let grant = check(&checks, "peer relay: grant");
        assert_eq!(grant.outcome, Outcome::Warn);
        assert_eq!(
            grant.detail,
            "policy.hujson has no grant of tailscale.com/cap/relay whose dst names tag:clawbernetes or tag:gpu-provider: no peer may use this node as a relay"
        );
        assert_eq!(
            grant.fix.as_deref(),
            Some(
                r#"add to "grants": {"src":["tag:molt-buyer","tag:clawbernetes","tag:gpu-provider"],"dst":["tag:clawbernetes","tag:gpu-provider"],"app":{"tailscale.com/cap/relay":[]}} (`clawnode tailscale policy` prints it for your buyers)"#
            )
        );
        let good = r#"{"grants": [{"src": ["tag:molt-buyer"], "dst": ["tag:gpu-provider"], "app": {"tailscale.com/cap/relay": []}}]}"#;
        facts.policy = Some(("policy.hujson".into(), Ok(policy::parse(good).unwrap())));
        let checks = relay_checks(&config, "1.102.2", &facts);
        let grant = check(&checks, "peer relay: grant");
        assert_eq!(grant.outcome, Outcome::Pass, "{grant:?}");
        assert_eq!(
            grant.detail,
            r#"policy.hujson grants tailscale.com/cap/relay to src ["tag:molt-buyer"] on dst ["tag:gpu-provider"]"#
        );
        facts.policy = Some((
            "policy.hujson".into(),
            Err("policy.hujson:3:5: Expected comma".into()),
        ));
        let checks = relay_checks(&config, "1.102.2", &facts);
        let grant = check(&checks, "peer relay: grant");
        assert_eq!(
            (grant.outcome, grant.detail.as_str()),
            (Outcome::Warn, "policy.hujson:3:5: Expected comma")
        );
        // Old daemons: the grant can be prepared before the upgrade.
        let mut old = facts.clone();
        old.version = Some((1, 80));
        let checks = relay_checks(&config, "1.80.3", &old);
        assert!(checks.iter().any(|c| c.name == "peer relay: grant"));
    }

    #[test]
    fn proc_net_udp_shows_which_ports_are_bound() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  123: 00000000:9C40 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4242 2 0000000000000000 0\n\
  124: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 4243 2 0000000000000000 0\n";
        assert!(udp_port_bound(v4, 40000));
        assert!(udp_port_bound(v4, 53));
        assert!(!udp_port_bound(v4, 41641));
        let v6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  50: 00000000000000000000000000000000:A241 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 99 2 0000000000000000 0\n";
        assert!(udp_port_bound(v6, 41537));
        // A remote port is no binding, and the header never matches.
        let connected = "sl local rem\n 1: 0100007F:D431 0100007F:9C40 01 0:0 0:0 0 0 0 1 2 0 0\n";
        assert!(!udp_port_bound(connected, 40000));
        assert!(!udp_port_bound("", 40000));
    }
}
