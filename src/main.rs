use std::process::ExitCode;

use clap::Parser;
use clawnode::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let name = cli.command.name();
    if !matches!(cli.command, cli::Command::Run) {
        // `clawnode status | head` should end quietly, like any Unix tool, not panic on EPIPE.
        // The daemon keeps Rust's ignored SIGPIPE: a client hanging up must not kill it.
        // SAFETY: single-threaded at this point, and SIG_DFL installs no handler code.
        let _ = unsafe {
            nix::sys::signal::signal(
                nix::sys::signal::Signal::SIGPIPE,
                nix::sys::signal::SigHandler::SigDfl,
            )
        };
    }
    match cli::dispatch(cli) {
        Ok(code) => code,
        Err(error) => cli::report(name, error),
    }
}
