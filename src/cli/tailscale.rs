//! `clawnode tailscale policy`: print the tailnet policy fragment this config needs.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;

use crate::config;
use crate::core::policy;

use super::CliError;

#[derive(Debug, Subcommand)]
pub enum TailscaleCommand {
    /// Print the policy fragment (tagOwners, autoApprovers.services, grants; with
    /// relay_server_port also the peer relay grant) to paste into the tailnet policy file.
    Policy {
        /// Who may apply the node's tags.
        #[arg(long, default_value = "autogroup:admin")]
        owner: String,
        /// The tag (or group) of the machines that buy capacity and may reach the services (and
        /// use this node as a peer relay).
        #[arg(long, default_value = policy::DEFAULT_BUYERS)]
        buyers: String,
    },
}

pub fn run(config_path: &Path, command: &TailscaleCommand) -> Result<ExitCode, CliError> {
    let TailscaleCommand::Policy { owner, buyers } = command;
    let config = config::load(config_path)?;
    match policy::fragment(&config, owner, buyers) {
        Ok(fragment) => {
            println!("{fragment:#}");
            Ok(ExitCode::SUCCESS)
        }
        Err(reason) => {
            eprintln!("clawnode tailscale policy: {reason}");
            Ok(ExitCode::FAILURE)
        }
    }
}
