//! `clawnode pubkey`: print this node's WireGuard public key, generating the private key on
//! first use (so it can be handed to the other nodes before the first start).

use std::path::Path;
use std::process::ExitCode;

use crate::config;
use crate::mesh::wireguard::keys;

use super::CliError;

pub fn run(config_path: &Path) -> Result<ExitCode, CliError> {
    let config = config::load(config_path)?;
    let key = keys::load_or_generate(&config.network.wireguard.private_key_file)
        .map_err(CliError::runtime)?;
    println!("{}", keys::to_base64(&key.public()));
    Ok(ExitCode::SUCCESS)
}
