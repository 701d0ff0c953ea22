//! Configuration errors: what went wrong, and where in the file.

use std::fmt;
use std::path::PathBuf;

/// Every problem found in one configuration file, in file order.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// One problem, pinned to a 1-based line and column (counted in characters) and the dotted
/// key path it concerns. The key is empty when the problem is not about a key (e.g. the file
/// cannot be read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.col)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl ConfigErrors {
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(key: &str) -> ConfigError {
        ConfigError {
            file: PathBuf::from("/etc/claw.toml"),
            line: 3,
            col: 7,
            key: key.to_owned(),
            message: "expected a thing".to_owned(),
        }
    }

    #[test]
    fn error_display_names_file_line_column_key_and_reason() {
        assert_eq!(
            error("network.wireguard.mtu").to_string(),
            "/etc/claw.toml:3:7: network.wireguard.mtu: expected a thing"
        );
    }

    #[test]
    fn error_display_omits_an_empty_key() {
        assert_eq!(
            error("").to_string(),
            "/etc/claw.toml:3:7: expected a thing"
        );
    }

    #[test]
    fn error_list_display_puts_one_error_per_line() {
        let errors = ConfigErrors(vec![error("a"), error("b")]);
        assert_eq!(
            errors.to_string(),
            "/etc/claw.toml:3:7: a: expected a thing\n/etc/claw.toml:3:7: b: expected a thing"
        );
    }
}
