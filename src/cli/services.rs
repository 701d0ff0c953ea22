//! `clawnode services discover <name> [--json]`: which nodes on the mesh offer a service.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;

use crate::config::Config;
use crate::config::{self, ProviderKind};
use crate::mesh::tailscale::discover as ts_discover;
use crate::mesh::tailscale::localapi::LocalApi;
use crate::mesh::wireguard::gateway as wg_gateway;
use crate::services::discover;

use super::CliError;

#[derive(Debug, Subcommand)]
pub enum ServicesCommand {
    /// Ask every peer's node-info endpoint over the mesh and list the providers of SERVICE.
    Discover {
        service: String,
        /// Print JSON: {"providers": [...], "unreachable": [...]}.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(config_path: &Path, command: &ServicesCommand) -> Result<ExitCode, CliError> {
    let ServicesCommand::Discover { service, json } = command;
    let config = config::load(config_path)?;
    if config.network.provider == ProviderKind::Tailscale {
        return tailscale(&config, service, *json);
    }
    let wg = &config.network.wireguard;
    let mut targets = crate::config::peers::peer_mesh_addresses(wg);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::runtime)?;
    // A node that joined a gateway asks it once; without an answer it asks every peer,
    // the gateway's cached ones included.
    let session = wg_gateway::load_session(&config.node.state_dir)
        .ok()
        .flatten();
    let mut found = None;
    if let Some(session) = &session {
        let gateways = wg_gateway::known_gateway_urls(&config.node.state_dir, session);
        match runtime.block_on(wg_gateway::discover(session, &gateways, service)) {
            Ok(instances) => found = Some(from_gateway(instances)),
            Err(error) => {
                eprintln!("gateway: {}; asking every peer instead", error.message);
                targets.extend(wg_gateway::cached_peer_addresses(
                    &config.node.state_dir,
                    session,
                    wg.gateway_offline_grace,
                ));
                targets.sort();
                targets.dedup();
            }
        }
    }
    let found = match found {
        Some(found) => found,
        None => runtime.block_on(discover::discover(targets, wg.node_info_port, service)),
    };
    if *json {
        println!(
            "{}",
            serde_json::to_string_pretty(&found).map_err(CliError::runtime)?
        );
        return Ok(ExitCode::SUCCESS);
    }
    if found.providers.is_empty() {
        println!("no node advertises {service}");
    }
    for p in &found.providers {
        if p.protocol.is_empty() {
            println!("{:<24} {:<40} {}", p.node, p.address, p.port);
        } else {
            println!("{:<24} {:<40} {}/{}", p.node, p.address, p.port, p.protocol);
        }
    }
    for u in &found.unreachable {
        eprintln!("unreachable: {} ({})", u.address, u.error);
    }
    Ok(ExitCode::SUCCESS)
}

/// The gateway's answer as a discovery; adverts carry no protocol, so it is left empty.
fn from_gateway(instances: Vec<crate::core::coord::ServiceInstance>) -> discover::Discovery {
    let mut providers: Vec<discover::Provider> = instances
        .into_iter()
        .map(|s| discover::Provider {
            node: s.node,
            address: s.address,
            port: s.port,
            protocol: String::new(),
        })
        .collect();
    providers.sort_by(|a, b| (&a.node, a.port).cmp(&(&b.node, b.port)));
    discover::Discovery {
        providers,
        unreachable: Vec::new(),
    }
}

/// Tailscale mode: the services tailscaled lists, with their MagicDNS names, VIPs and ports.
fn tailscale(config: &Config, service: &str, json: bool) -> Result<ExitCode, CliError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::runtime)?;
    let api = LocalApi::new(&config.network.tailscale.socket);
    let found = runtime
        .block_on(ts_discover::find(&api, service))
        .map_err(CliError::runtime)?;
    if json {
        let doc = serde_json::json!({ "services": found });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).map_err(CliError::runtime)?
        );
        return Ok(ExitCode::SUCCESS);
    }
    if found.is_empty() {
        println!("no Tailscale Service svc:{service} is visible to this node");
    }
    for s in &found {
        println!(
            "{:<24} {:<40} {:<32} {}",
            s.name,
            s.dns_name,
            s.addrs.join(","),
            s.ports.join(",")
        );
    }
    Ok(ExitCode::SUCCESS)
}
