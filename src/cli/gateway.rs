//! `clawnode gateway init | token create | nodes | revoke | signer | status`: the gateway's
//! admin commands. They open the configured store directly (sqlite in WAL mode is safe beside
//! the running daemon, whose view picks the change up within ~50 ms; etcd is shared by every
//! gateway, which see it through their watch).

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;

use crate::config;
use crate::gateway::{self, GatewayError, admin};

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
    /// Signing rights for further gateways (needs root.key).
    Signer {
        #[command(subcommand)]
        command: SignerCommand,
    },
    /// The store, its members and the gateways alive (reads the store; the daemon need not run).
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum SignerCommand {
    /// Authorise a new gateway: its signer key, certificate and TLS files go to --out, to be
    /// copied to the new gateway's <state_dir>/gateway/.
    Add {
        /// The new gateway's [node] name.
        name: String,
        /// The URL nodes reach the new gateway at (its [gateway] public_url).
        #[arg(long)]
        url: String,
        /// More addresses its TLS certificate must name (its mesh address, listen address).
        #[arg(long = "address")]
        addresses: Vec<std::net::IpAddr>,
        /// A new directory for its files (made 0700; keys 0600).
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Withdraw a gateway's signing rights: its records are re-signed by this gateway first.
    Revoke { name: String },
    /// The signers the store holds.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
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
        GatewayCommand::Signer { command } => signer(&config, command, now)?,
        GatewayCommand::Status { json } => {
            let doc = admin::status(&config, now).map_err(fail)?;
            if *json {
                println!("{}", serde_json::to_string(&doc).unwrap_or_default());
            } else {
                print_status(&doc);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn signer(config: &config::Config, command: &SignerCommand, now: u64) -> Result<(), CliError> {
    match command {
        SignerCommand::Add {
            name,
            url,
            addresses,
            out,
        } => {
            let added = admin::signer_add(config, name, url, addresses, out, now).map_err(fail)?;
            println!(
                "signer {} ({}) authorised; its files are in {}",
                added.cert.name,
                added.cert.key_id,
                added.dir.display()
            );
            println!("  TLS certificate for {}", added.tls_names.join(", "));
            println!(
                "next: copy {}/* to the new gateway's <state_dir>/gateway/ (keep the modes), give it the same [gateway] store settings and public_url = \"{url}\", and start it",
                added.dir.display()
            );
        }
        SignerCommand::Revoke { name } => {
            let revoked = admin::signer_revoke(config, name, now).map_err(fail)?;
            println!(
                "signer {} ({}) revoked at serial {}; {} of its records re-signed by this gateway",
                revoked.cert.name, revoked.cert.key_id, revoked.cert.serial, revoked.resigned
            );
        }
        SignerCommand::List { json } => {
            let signers = admin::signers(config).map_err(fail)?;
            if *json {
                println!("{}", serde_json::json!({ "signers": signers }));
            } else {
                println!("{:<24} {:<18} {:<7} STATE", "NAME", "KEY", "SERIAL");
                for cert in signers {
                    let state = if cert.not_after <= now {
                        "revoked"
                    } else {
                        "active"
                    };
                    println!(
                        "{:<24} {:<18} {:<7} {}",
                        cert.name,
                        cert.key_id.to_string(),
                        cert.serial,
                        state
                    );
                }
            }
        }
    }
    Ok(())
}

fn print_status(doc: &admin::StatusDoc) {
    match &doc.store {
        admin::StoreDoc::Sqlite { path } => println!("store:    sqlite {}", path.display()),
        admin::StoreDoc::Etcd { endpoints, prefix } => {
            println!("store:    etcd {} under {prefix}", endpoints.join(","));
        }
    }
    println!("store id: {}, revision {}", doc.store_id, doc.rev);
    match &doc.reason {
        None => println!("writable: yes"),
        Some(reason) => println!("writable: no ({reason})"),
    }
    if let Some(members) = doc
        .cluster
        .as_ref()
        .and_then(|c| c.get("members"))
        .and_then(|m| m.as_array())
    {
        println!("members:");
        for member in members {
            let text = |key: &str| {
                member
                    .get(key)
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned))
                    .unwrap_or_default()
            };
            let urls = member
                .get("client_urls")
                .and_then(|u| u.as_array())
                .map(|u| {
                    u.iter()
                        .filter_map(|v| v.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            println!("  {:<16} {:<18} {urls}", text("name"), text("id"));
        }
    }
    println!("nodes:    {}", doc.nodes);
    println!(
        "signers:  {}",
        doc.signers
            .iter()
            .map(|s| format!("{}{}", s.name, if s.revoked { " (revoked)" } else { "" }))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if matches!(doc.store, admin::StoreDoc::Etcd { .. }) {
        println!("gateways alive:");
        if doc.gateways.is_empty() {
            println!("  none");
        }
        for g in &doc.gateways {
            println!("  {:<16} {:<32} started {}", g.name, g.url, g.started_at);
        }
    }
}
