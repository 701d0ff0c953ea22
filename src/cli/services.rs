//! `clawnode services discover <name> [--json]`: which nodes on the mesh offer a service.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;

use crate::config::{self, ProviderKind};
use crate::mesh::wireguard;
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
    if config.network.provider != ProviderKind::Wireguard {
        return Err(CliError::runtime(std::io::Error::other(format!(
            "discovery over the {} provider is not built yet; it works with provider = \"wireguard\"",
            config.network.provider
        ))));
    }
    let wg = &config.network.wireguard;
    let targets = wireguard::peer_mesh_addresses(wg);
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
