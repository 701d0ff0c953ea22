//! `clawnode services discover <name> [--json]`: which nodes on the mesh offer a service.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;

use crate::config::Config;
use crate::config::{self, ProviderKind};
use crate::mesh::tailscale::discover as ts_discover;
use crate::mesh::tailscale::localapi::LocalApi;
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
    let targets = crate::config::peers::peer_mesh_addresses(wg);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CliError::runtime)?;
    let found = runtime.block_on(discover::discover(targets, wg.node_info_port, service));
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
        println!("{:<24} {:<40} {}/{}", p.node, p.address, p.port, p.protocol);
    }
    for u in &found.unreachable {
        eprintln!("unreachable: {} ({})", u.address, u.error);
    }
    Ok(ExitCode::SUCCESS)
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
