use std::process::ExitCode;

use clap::Parser;
use clawnode::cli::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let name = cli.command.name();
    match cli::dispatch(cli) {
        Ok(code) => code,
        Err(error) => {
            let code = error.exit_code();
            let report = anyhow::Error::new(error).context(format!("clawnode {name}"));
            eprintln!("error: {report:#}");
            ExitCode::from(code)
        }
    }
}
