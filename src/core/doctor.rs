//! `clawnode doctor`'s verdicts: each check turns facts the shell gathered into pass, warn or
//! fail with the fix an operator needs. Nothing here touches the system.

use serde::Serialize;
use serde_json::Value;

use crate::config::{Config, ServiceMode};

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
}

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
    checks
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
}
