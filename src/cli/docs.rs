//! Generated documentation: shell completions and the man page, both from the clap model so
//! they never drift from the real flags. Packaging installs their output.

use std::io::Write;
use std::process::ExitCode;

use clap::CommandFactory;

use super::{Cli, CliError};

pub fn completions(shell: clap_complete::Shell) -> Result<ExitCode, CliError> {
    let mut command = Cli::command();
    clap_complete::generate(shell, &mut command, "clawnode", &mut std::io::stdout());
    Ok(ExitCode::SUCCESS)
}

pub fn manpage() -> Result<ExitCode, CliError> {
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut out)
        .map_err(CliError::runtime)?;
    std::io::stdout()
        .write_all(&out)
        .map_err(CliError::runtime)?;
    Ok(ExitCode::SUCCESS)
}
