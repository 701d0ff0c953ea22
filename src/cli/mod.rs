//! The command line: one file per subcommand. Only this module prints to stdout.

#![allow(clippy::print_stdout, clippy::print_stderr)] // the one room that prints

pub mod check_config;
pub mod docs;
pub mod doctor;
pub mod gateway;
pub mod gpus;
pub mod peers;
pub mod pubkey;
pub mod run;
pub mod services;
pub mod status;
pub mod tailscale;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, ConfigErrors};

/// The Clawbernetes node agent: joins this machine to the mesh, reports its GPUs and
/// advertises its services.
#[derive(Debug, Parser)]
#[command(name = "clawnode", version, propagate_version = true)]
pub struct Cli {
    /// Configuration file.
    #[arg(
        long,
        global = true,
        env = "CLAWBERNETES_CONFIG",
        value_name = "PATH",
        default_value = config::DEFAULT_PATH
    )]
    pub config: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent in the foreground (what the systemd unit starts).
    Run,
    /// Validate the configuration; print a summary, or every error (exit status 78).
    CheckConfig,
    /// Show the running daemon's status.
    Status(status::StatusArgs),
    /// List the WireGuard peers with endpoints, allowed IPs, last handshake and traffic.
    Peers {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The daemon's API socket (default: [api] socket from the config).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Print this node's WireGuard public key (generates the private key on first use).
    Pubkey,
    /// Find the nodes that advertise a service.
    Services {
        #[command(subcommand)]
        command: services::ServicesCommand,
    },
    /// Probe the GPUs through NVML now (no daemon needed): inventory and one sample.
    Gpus {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The NVML library to load (default: [gpu] nvml_library, else libnvidia-ml.so.1).
        #[arg(long, value_name = "PATH")]
        nvml_library: Option<PathBuf>,
    },
    /// Check this host before the first start and print each problem with its fix.
    Doctor {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// The tailnet policy file (HuJSON, as kept in git or downloaded from the admin
        /// console): checks the peer relay grant when relay_server_port is set.
        #[arg(long, value_name = "FILE")]
        tailnet_policy: Option<PathBuf>,
    },
    /// The gateway role: cluster identity, join tokens, nodes.
    Gateway {
        #[command(subcommand)]
        command: gateway::GatewayCommand,
    },
    /// Tailscale helpers.
    Tailscale {
        #[command(subcommand)]
        command: tailscale::TailscaleCommand,
    },
    /// Print the version.
    Version,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout.
    Manpage,
}

/// Why a subcommand failed; each maps to an exit status.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    // Not `#[from]`: that would make the errors a `source` too, and `{:#}` would print them twice.
    #[error("invalid configuration:\n{0}")]
    Config(ConfigErrors),
    #[error(transparent)]
    Runtime(#[from] Box<dyn std::error::Error + Send + Sync>),
    /// Only the operator can fix it (EX_CONFIG: the unit does not restart on it).
    #[error(transparent)]
    NeedsOperator(Box<dyn std::error::Error + Send + Sync>),
}

impl From<ConfigErrors> for CliError {
    fn from(errors: ConfigErrors) -> Self {
        CliError::Config(errors)
    }
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Config(_) | CliError::NeedsOperator(_) => crate::exit::CONFIG,
            CliError::Runtime(_) => crate::exit::FAILURE,
        }
    }

    pub fn runtime(error: impl std::error::Error + Send + Sync + 'static) -> Self {
        CliError::Runtime(Box::new(error))
    }
}

impl Command {
    /// The subcommand's name as typed, for error context.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Run => "run",
            Command::CheckConfig => "check-config",
            Command::Status(_) => "status",
            Command::Pubkey => "pubkey",
            Command::Peers { .. } => "peers",
            Command::Services { .. } => "services",
            Command::Doctor { .. } => "doctor",
            Command::Gpus { .. } => "gpus",
            Command::Gateway { .. } => "gateway",
            Command::Tailscale { .. } => "tailscale",
            Command::Version => "version",
            Command::Completions { .. } => "completions",
            Command::Manpage => "manpage",
        }
    }
}

/// Print a failed command's error with its causes, and map it to the exit status.
pub fn report(command: &str, error: CliError) -> ExitCode {
    let code = error.exit_code();
    let report = anyhow::Error::new(error).context(format!("clawnode {command}"));
    eprintln!("error: {report:#}");
    ExitCode::from(code)
}

pub fn dispatch(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Run => run::run(&cli.config),
        Command::CheckConfig => Ok(check_config::run(&cli.config)),
        Command::Status(args) => status::run(&cli.config, &args),
        Command::Pubkey => pubkey::run(&cli.config),
        Command::Peers { json, socket } => peers::run(&cli.config, json, socket.as_deref()),
        Command::Services { command } => services::run(&cli.config, &command),
        Command::Doctor {
            json,
            tailnet_policy,
        } => doctor::run(&cli.config, json, tailnet_policy.as_deref()),
        Command::Gpus { json, nvml_library } => {
            gpus::run(&cli.config, json, nvml_library.as_deref())
        }
        Command::Gateway { command } => gateway::run(&cli.config, &command),
        Command::Tailscale { command } => tailscale::run(&cli.config, &command),
        Command::Version => {
            println!("clawnode {}", env!("CARGO_PKG_VERSION"));
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { shell } => docs::completions(shell),
        Command::Manpage => docs::manpage(),
    }
}
