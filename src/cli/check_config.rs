//! `clawnode check-config`: validate a configuration file and summarise it.

use std::path::Path;
use std::process::ExitCode;

use crate::config;

/// Prints `config OK: <path>` and a summary to stdout (exit 0), or every error, one per line,
/// to stderr (exit 78, EX_CONFIG).
pub fn run(config_path: &Path) -> ExitCode {
    match config::load(config_path) {
        Ok(config) => {
            println!("config OK: {}", config_path.display());
            println!("{}", config.summary());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for error in errors.iter() {
                eprintln!("{error}");
            }
            ExitCode::from(crate::exit::CONFIG)
        }
    }
}
