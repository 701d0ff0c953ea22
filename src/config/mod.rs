//! The node agent's configuration file: loading, validation and error reporting.
//!
//! The file is parsed three times over, each layer narrowing what can be wrong:
//! `toml::de::DeTable` (syntax, with spans), a loose serde layer in `raw` (unknown keys and
//! types), and `validate` (values and cross-field rules, reporting every problem at once).
//! Every error carries file, line, column and the dotted key path.

mod error;
mod locate;
pub mod peers;
mod raw;
mod schema;
mod types;
mod validate;

use std::path::Path;

use serde::Deserialize;
use toml::de::DeTable;
use zeroize::Zeroize;

pub use error::{ConfigError, ConfigErrors};
#[cfg(feature = "test-fakes")]
pub use schema::FakeMeshConfig;
pub use schema::{
    ApiConfig, CheckKind, CheckSpec, Config, DEFAULT_UNHEALTHY_XIDS, EtcdConfig, GatewayConfig,
    GatewayStore, GpuConfig, HttpCheck, HttpsCheck, IdTokenSource, JoinTokenSource, LogConfig,
    NetworkConfig, NodeConfig, PeerConfig, ServiceMode, ServiceSpec, TailscaleAuth,
    TailscaleConfig, WireguardConfig,
};
pub use types::{
    DnsLabel, Endpoint, InterfaceName, LogLevel, NodeName, ProviderKind, PublicKey, Secret,
    ServiceName, Tag, ValueError, WgBackend,
};

/// Where the daemon looks when neither `--config` nor `CLAWBERNETES_CONFIG` is given.
pub const DEFAULT_PATH: &str = "/etc/clawbernetes/clawbernetes.toml";

/// Reads and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    match std::fs::read(path) {
        Ok(bytes) => parse_bytes(path, bytes),
        Err(err) => Err(single_error(
            path,
            1,
            1,
            format!("cannot read the configuration file: {err}"),
        )),
    }
}

/// Validates the configuration file's `bytes`, which must be UTF-8; `path` is only used in
/// error messages. The bytes are wiped before returning: the file may hold an auth key.
pub fn parse_bytes(path: &Path, bytes: Vec<u8>) -> Result<Config, ConfigErrors> {
    let mut text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(err) => {
            let valid = &err.as_bytes()[..err.utf8_error().valid_up_to()];
            let line = valid.iter().filter(|&&b| b == b'\n').count() + 1;
            let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            // The prefix is valid UTF-8 by construction.
            let col = String::from_utf8_lossy(&valid[line_start..])
                .chars()
                .count()
                + 1;
            let mut bytes = err.into_bytes();
            bytes.zeroize();
            return Err(single_error(
                path,
                line,
                col,
                "expected UTF-8 text, found an invalid byte sequence".to_owned(),
            ));
        }
    };
    let result = parse(path, &text);
    // Do not leave a copy of a secret in freed memory.
    text.zeroize();
    result
}

/// Validates configuration `text`; `path` is only used in error messages.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigErrors> {
    let (root, syntax_errors) = DeTable::parse_recoverable(text);
    let locator = locate::Locator::new(text, Some(&root));
    if !syntax_errors.is_empty() {
        return Err(syntax(path, &locator, &syntax_errors));
    }
    let raw = match raw::RawConfig::deserialize(toml::de::Deserializer::from(root.clone())) {
        Ok(raw) => raw,
        Err(err) => return Err(ConfigErrors(vec![toml_error(path, &locator, &err)])),
    };
    validate::Checker::new(path, &locator)
        .run(raw)
        .map_err(ConfigErrors)
}

/// Reads and validates a drop-in peer file from `peers_dir`: `[[peers]]` tables with the keys
/// of `[[network.wireguard.peers]]`. Errors carry file:line:col like the main file's.
pub fn load_peers_file(path: &Path) -> Result<Vec<PeerConfig>, ConfigErrors> {
    let text = std::fs::read_to_string(path)
        .map_err(|err| single_error(path, 1, 1, format!("cannot read the peer file: {err}")))?;
    parse_peers(path, &text)
}

/// Validates the `text` of a drop-in peer file; `path` is only used in error messages.
pub fn parse_peers(path: &Path, text: &str) -> Result<Vec<PeerConfig>, ConfigErrors> {
    let (root, syntax_errors) = DeTable::parse_recoverable(text);
    let locator = locate::Locator::new(text, Some(&root));
    if !syntax_errors.is_empty() {
        return Err(syntax(path, &locator, &syntax_errors));
    }
    let raw = raw::RawPeersFile::deserialize(toml::de::Deserializer::from(root.clone()))
        .map_err(|err| ConfigErrors(vec![toml_error(path, &locator, &err)]))?;
    validate::Checker::new(path, &locator)
        .run_peers(raw.peers)
        .map_err(ConfigErrors)
}

/// At most this many errors are reported per file, then how many more there were: nobody
/// reads further, and placing each one costs a walk of the document, which a file of
/// thousands of broken lines (a drop-in half-written by a provisioning tool) would make
/// quadratic.
const MAX_ERRORS: usize = 100;

/// The message that stands for the errors past `MAX_ERRORS`.
fn more_errors(hidden: usize) -> String {
    format!(
        "{hidden} more errors not shown (at most {MAX_ERRORS} are listed); fix those above first"
    )
}

/// The first `MAX_ERRORS` syntax errors of a document, in file order.
fn syntax(path: &Path, locator: &locate::Locator<'_>, errors: &[toml::de::Error]) -> ConfigErrors {
    let mut sorted: Vec<&toml::de::Error> = errors.iter().collect();
    sorted.sort_by_key(|e| e.span().map_or(0, |s| s.start));
    let shown = sorted.len().min(MAX_ERRORS);
    let mut out: Vec<ConfigError> = sorted[..shown]
        .iter()
        .map(|err| toml_error(path, locator, err))
        .collect();
    out.sort_by_key(|e| (e.line, e.col));
    out.dedup();
    if let Some(first_hidden) = sorted.get(shown) {
        let (line, col) = locator.line_col(first_hidden.span().map_or(0, |s| s.start));
        out.push(ConfigError {
            file: path.to_path_buf(),
            line,
            col,
            key: String::new(),
            message: more_errors(sorted.len() - shown),
        });
    }
    ConfigErrors(out)
}

fn single_error(path: &Path, line: usize, col: usize, message: String) -> ConfigErrors {
    ConfigErrors(vec![ConfigError {
        file: path.to_path_buf(),
        line,
        col,
        key: String::new(),
        message,
    }])
}

/// Converts a syntax or serde error, naming the key its span falls in.
fn toml_error(path: &Path, locator: &locate::Locator<'_>, err: &toml::de::Error) -> ConfigError {
    let span = err.span().unwrap_or(0..0);
    let (line, col) = locator.line_col(span.start);
    let is_duplicate = err.message() == "duplicate key";
    let key = locator.key_at(&span).unwrap_or_else(|| {
        let table = locator.table_at(span.start);
        // The tree keeps only the first definition, so name the repeated key from the text.
        match locator
            .text_of(&span)
            .map(|t| t.trim().trim_matches(['"', '\'']))
        {
            Some(repeated) if is_duplicate && !repeated.is_empty() => table.key(repeated),
            _ => table,
        }
    });
    let message = if is_duplicate {
        "duplicate key, expected each key and [table] to be defined only once".to_owned()
    } else {
        friendly_serde_message(err.message())
    };
    ConfigError {
        file: path.to_path_buf(),
        line,
        col,
        key: key.to_string(),
        message,
    }
}

/// serde speaks Rust (`i64`, "sequence", "map"); users write TOML.
fn friendly_serde_message(message: &str) -> String {
    let message = message.trim_end();
    if let Some(rest) = message.strip_prefix("invalid type: integer `")
        && let Some((number, _)) = rest.split_once("` as i128")
    {
        return format!("integer {number} is out of range, expected a value that fits in 64 bits");
    }
    [
        ("expected i64", "expected an integer"),
        ("expected a sequence", "expected an array"),
        ("expected a map", "expected a table"),
        ("invalid type: sequence", "invalid type: array"),
        ("invalid type: map", "invalid type: table"),
        ("unknown field", "unknown key"),
        ("missing field", "missing key"),
    ]
    .iter()
    .fold(message.to_owned(), |acc, (from, to)| acc.replace(from, to))
}

#[cfg(test)]
mod tests;

/// A small valid WireGuard config with one service, for unit tests elsewhere in the crate.
/// Its service is not probed (`type = "none"`): nothing listens on 8443 in a unit test.
#[cfg(test)]
pub(crate) fn example() -> Config {
    let text = r#"
        [node]
        name = "gpu-01"
        [network.wireguard]
        address = "10.100.0.9/16"
        [services.molt-provider]
        port = 8443
        mode = "tcp"
        check = { type = "none" }
    "#;
    parse(Path::new("test.toml"), text).expect("valid")
}
