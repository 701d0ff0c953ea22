//! `clawnode doctor`: the preflight before a first start. It gathers facts (tailscaled's
//! answers, the WireGuard setup on this host, NVML) and prints each verdict with its fix; the
//! verdicts themselves are `core::doctor`'s.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::ExitCode;

use hyper::Method;
use serde_json::Value;

use crate::config::{self, Config, ProviderKind};
use crate::config::{IdTokenSource, TailscaleAuth};
use crate::core::doctor::{self, AuthFact, Check, InterfaceFact, TailscaleFacts, WireguardFacts};
use crate::core::link_owner::{Found, FoundKind};
use crate::gpu::{GpuProbe, NvmlProbe};
use crate::mesh::tailscale::authkey;
use crate::mesh::tailscale::localapi::{LocalApi, Version};
use crate::mesh::wireguard::{link::KernelSupport, link::Link, owner, userspace};

use super::CliError;

pub fn run(config_path: &Path, json: bool) -> Result<ExitCode, CliError> {
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
            let facts = runtime.block_on(tailscale_facts(&config));
            doctor::tailscale_checks(&config, &facts)
        }
        ProviderKind::Wireguard => {
            let facts = runtime.block_on(wireguard_facts(&config));
            doctor::wireguard_checks(&config, &facts)
        }
        #[cfg(feature = "test-fakes")]
        ProviderKind::Fake => Vec::new(),
    });
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

async fn tailscale_facts(config: &Config) -> TailscaleFacts {
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
    // check-prefs with the current prefs changes nothing but needs write permission.
    let write = match api.get("/localapi/v0/prefs").await {
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
    }
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
