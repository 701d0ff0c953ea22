//! `clawnode gateway init | token create | nodes | revoke`: the gateway's admin commands. They
//! open the store directly (sqlite in WAL mode is safe beside the running daemon, whose view
//! picks the change up within ~50 ms).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;

use crate::config;
use crate::gateway::{self, GatewayError};

use super::CliError;

#[derive(Debug, Subcommand)]
pub enum GatewayCommand {
    /// Create the cluster's signing identity, this gateway's signer and its store (once).
    Init,
    /// Join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// List the nodes that joined.
    Nodes {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Withdraw a node (by name or node id such as n12): every node drops it within a second.
    Revoke { node: String },
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a new join token (the store keeps only its hash: it cannot be shown again).
    Create {
        /// How long the token is valid, e.g. "1h", "30m", "7d".
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// How many nodes may join with it.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        uses: u32,
        /// Print JSON: {token, id, expires_at, uses}.
        #[arg(long)]
        json: bool,
    },
}

fn fail(error: GatewayError) -> CliError {
    if error.transient {
        CliError::runtime(error)
    } else {
        CliError::NeedsOperator(Box::new(error))
    }
}

pub fn run(config_path: &Path, command: &GatewayCommand) -> Result<ExitCode, CliError> {
    let config = config::load(config_path)?;
    let now = gateway::unix_now();
    match command {
        GatewayCommand::Init => {
            let done = gateway::init(&config, now).map_err(fail)?;
            println!("gateway initialised in {}", done.dir.display());
            println!(
                "  cluster root key {} (root.key: keep it safe; it is needed only to authorise signers and issue this gateway's TLS certificate, and may be moved offline after the first start)",
                done.root
            );
            println!(
                "  signer {} (signer.key), store {:016x}",
                done.signer, done.store_id
            );
            println!(
                "next: set [gateway] enabled = true, start clawnode, then `clawnode gateway token create`"
            );
        }
        GatewayCommand::Token {
            command: TokenCommand::Create { ttl, uses, json },
        } => {
            let (token, expires_at) =
                gateway::create_token(&config, *ttl, *uses, now).map_err(fail)?;
            if config.gateway.public_url.is_none() {
                eprintln!(
                    "note: the token names this gateway by its mesh address ({}), which a new node reaches only if it is routed there; set [gateway] public_url to an address new nodes can reach",
                    token.urls.join(", ")
                );
            }
            let text = zeroize::Zeroizing::new(token.to_string());
            if *json {
                let doc = serde_json::json!({
                    "token": text.as_str(),
                    "id": token.id.to_string(),
                    "expires_at": expires_at,
                    "uses": uses,
                });
                println!("{doc}");
            } else {
                println!("{}", text.as_str());
            }
        }
        GatewayCommand::Nodes { json } => {
            let nodes = gateway::nodes(&config).map_err(fail)?;
            if *json {
                let doc = serde_json::json!({ "nodes": nodes });
                println!("{doc}");
            } else if nodes.is_empty() {
                println!("no nodes yet");
            } else {
                println!(
                    "{:<6} {:<24} {:<18} {:<9} {:<8} ENDPOINTS",
                    "ID", "NAME", "ADDRESS", "STATE", "SERIAL"
                );
                for node in nodes {
                    let state = if node.revoked { "revoked" } else { "active" };
                    let endpoints: Vec<String> =
                        node.endpoints.iter().map(ToString::to_string).collect();
                    println!(
                        "{:<6} {:<24} {:<18} {:<9} {:<8} {}",
                        node.node_id.to_string(),
                        node.name,
                        node.address.to_string(),
                        state,
                        node.serial,
                        if endpoints.is_empty() {
                            "-".to_owned()
                        } else {
                            endpoints.join(",")
                        }
                    );
                }
            }
        }
        GatewayCommand::Revoke { node } => {
            let row = gateway::revoke(&config, node).map_err(fail)?;
            println!("revoked {} ({}, {})", row.name, row.node_id, row.address);
        }
    }
    Ok(ExitCode::SUCCESS)
}
