//! Validated value types used by [`Config`](super::Config).
//!
//! Each type checks its input in exactly one constructor (`TryFrom<String>`); `FromStr`,
//! serde and the config validator all go through it, so the rules live in one place.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Why a value was rejected. The message says what was expected and, except for secrets,
/// what was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValueError(String);

impl ValueError {
    /// "expected {expected}, got {got:?}".
    pub fn new(expected: impl fmt::Display, got: &str) -> Self {
        Self(format!("expected {expected}, got {got:?}"))
    }

    /// For secrets: says what was expected without echoing the value.
    pub fn redacted(expected: impl fmt::Display) -> Self {
        Self(format!("expected {expected} (value not shown)"))
    }

    pub fn message(&self) -> &str {
        &self.0
    }
}

/// Generates a validated string newtype with the usual conversions.
macro_rules! string_newtype {
    ($(#[$meta:meta])* $name:ident, $check:path) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValueError;

            fn try_from(value: String) -> Result<Self, ValueError> {
                $check(&value)?;
                Ok(Self(value))
            }
        }

        impl FromStr for $name {
            type Err = ValueError;

            fn from_str(value: &str) -> Result<Self, ValueError> {
                Self::try_from(value.to_owned())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }
    };
}

string_newtype!(
    /// This node's name in the mesh: a DNS label.
    NodeName,
    check_dns_label
);
string_newtype!(
    /// A single DNS label: 1–63 characters of `a-z`, `0-9` and `-`, not starting or ending with `-`.
    DnsLabel,
    check_dns_label
);
string_newtype!(
    /// The name of an advertised service: a DNS label.
    ServiceName,
    check_dns_label
);
string_newtype!(
    /// A Linux network interface name (what `ip link` accepts).
    InterfaceName,
    check_interface_name
);
string_newtype!(
    /// A Tailscale ACL tag, `tag:<name>`.
    Tag,
    check_tag
);

/// A WireGuard public key: base64 of 32 bytes, as printed by `wg pubkey`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PublicKey {
    text: String,
    bytes: [u8; 32],
}

impl PublicKey {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.bytes
    }
}

impl TryFrom<String> for PublicKey {
    type Error = ValueError;

    fn try_from(text: String) -> Result<Self, ValueError> {
        let Some(bytes) = decode_key_base64(&text) else {
            return Err(ValueError::new(
                "a WireGuard public key (44 characters of base64 encoding 32 bytes, as printed by `wg pubkey`)",
                &text,
            ));
        };
        Ok(Self { text, bytes })
    }
}

impl FromStr for PublicKey {
    type Err = ValueError;

    fn from_str(value: &str) -> Result<Self, ValueError> {
        Self::try_from(value.to_owned())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl From<PublicKey> for String {
    fn from(value: PublicKey) -> String {
        value.text
    }
}

/// A peer endpoint: `host:port`, `[v6addr]:port` or `1.2.3.4:port`. The host stays a string
/// because names are resolved at bring-up, not at load time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Endpoint {
    text: String,
    host: String,
    port: u16,
}

impl Endpoint {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The host without brackets: a DNS name, an IPv4 or an IPv6 address.
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl TryFrom<String> for Endpoint {
    type Error = ValueError;

    fn try_from(text: String) -> Result<Self, ValueError> {
        let Some((host, port)) = split_endpoint(&text) else {
            return Err(ValueError::new(ENDPOINT_EXPECTED, &text));
        };
        let host = host.to_owned();
        Ok(Self { text, host, port })
    }
}

impl FromStr for Endpoint {
    type Err = ValueError;

    fn from_str(value: &str) -> Result<Self, ValueError> {
        Self::try_from(value.to_owned())
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl From<Endpoint> for String {
    fn from(value: Endpoint) -> String {
        value.text
    }
}

/// A secret such as a Tailscale auth key. Wiped from memory on drop, never printed:
/// no `Display`, no `Serialize`, and `Debug` shows `Secret(<redacted>)`.
#[derive(Clone, PartialEq, Eq, Zeroize, ZeroizeOnDrop, Deserialize)]
#[serde(try_from = "String")]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl TryFrom<String> for Secret {
    type Error = ValueError;

    fn try_from(mut value: String) -> Result<Self, ValueError> {
        if value.is_empty() || value.chars().any(|c| c.is_whitespace() || c.is_control()) {
            value.zeroize();
            return Err(ValueError::redacted(
                "a non-empty secret without whitespace or control characters",
            ));
        }
        Ok(Self(value))
    }
}

impl FromStr for Secret {
    type Err = ValueError;

    fn from_str(value: &str) -> Result<Self, ValueError> {
        Self::try_from(value.to_owned())
    }
}

/// `Display` and `FromStr` for a keyword enum that has `ALL` and `as_str`.
macro_rules! keyword_impls {
    ($name:ident, $what:literal) => {
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = ValueError;

            fn from_str(value: &str) -> Result<Self, ValueError> {
                Self::ALL
                    .iter()
                    .find(|kind| kind.as_str() == value)
                    .copied()
                    .ok_or_else(|| {
                        let names: Vec<&str> = Self::ALL.iter().map(|k| k.as_str()).collect();
                        ValueError::new(format_args!("{} ({})", $what, one_of(&names)), value)
                    })
            }
        }
    };
}

/// Which mesh the node joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    #[default]
    Wireguard,
    Tailscale,
    #[cfg(feature = "test-fakes")]
    Fake,
}

impl ProviderKind {
    pub const ALL: &'static [Self] = &[
        Self::Wireguard,
        Self::Tailscale,
        #[cfg(feature = "test-fakes")]
        Self::Fake,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Wireguard => "wireguard",
            Self::Tailscale => "tailscale",
            #[cfg(feature = "test-fakes")]
            Self::Fake => "fake",
        }
    }
}

keyword_impls!(ProviderKind, "a mesh provider");

/// How the WireGuard interface is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WgBackend {
    /// The kernel module when it is available, else the userspace implementation.
    #[default]
    Auto,
    Kernel,
    Userspace,
}

impl WgBackend {
    pub const ALL: &'static [Self] = &[Self::Auto, Self::Kernel, Self::Userspace];

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Kernel => "kernel",
            Self::Userspace => "userspace",
        }
    }
}

keyword_impls!(WgBackend, "a WireGuard backend");

/// Log verbosity, most to least severe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub const ALL: &'static [Self] = &[
        Self::Error,
        Self::Warn,
        Self::Info,
        Self::Debug,
        Self::Trace,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Warn => "warn",
            Self::Info => "info",
            Self::Debug => "debug",
            Self::Trace => "trace",
        }
    }
}

keyword_impls!(LogLevel, "a log level");

pub(crate) const DNS_LABEL_EXPECTED: &str =
    "a DNS label (1-63 characters of a-z, 0-9 and '-', not starting or ending with '-')";

fn check_dns_label(value: &str) -> Result<(), ValueError> {
    let ok = (1..=63).contains(&value.len())
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ValueError::new(DNS_LABEL_EXPECTED, value))
    }
}

/// Linux limit: IFNAMSIZ (16) including the terminating NUL.
const MAX_INTERFACE_NAME_BYTES: usize = 15;

fn check_interface_name(value: &str) -> Result<(), ValueError> {
    // Mirrors the kernel's dev_valid_name().
    let ok = !value.is_empty()
        && value.len() <= MAX_INTERFACE_NAME_BYTES
        && value != "."
        && value != ".."
        && !value
            .chars()
            .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(ValueError::new(
            "an interface name of 1-15 bytes without '/', ':', whitespace or NUL, not \".\" or \"..\" (e.g. \"claw0\")",
            value,
        ))
    }
}

fn check_tag(value: &str) -> Result<(), ValueError> {
    let ok = value.strip_prefix("tag:").is_some_and(|name| {
        !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    });
    if ok {
        Ok(())
    } else {
        Err(ValueError::new(
            "a tag of the form \"tag:<name>\" with <name> made of a-z, 0-9 and '-' (e.g. \"tag:clawbernetes\")",
            value,
        ))
    }
}

/// Decodes canonical standard base64 of exactly 32 bytes (44 characters, one `=`).
fn decode_key_base64(text: &str) -> Option<[u8; 32]> {
    let digits = text.strip_suffix('=')?.as_bytes();
    if digits.len() != 43 {
        return None;
    }
    let mut bits: u32 = 0;
    let mut nbits = 0;
    let mut out = [0u8; 32];
    let mut written = 0;
    for &c in digits {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(v);
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            *out.get_mut(written)? = (bits >> nbits) as u8;
            written += 1;
            bits &= (1 << nbits) - 1;
        }
    }
    // 43 digits carry 258 bits: the 2 left over must be zero or the text is not canonical,
    // and two spellings of one key would slip past duplicate detection.
    (written == 32 && bits == 0).then_some(out)
}

const ENDPOINT_EXPECTED: &str =
    "an endpoint \"host:port\", \"1.2.3.4:port\" or \"[ipv6]:port\" with port 1-65535";

fn split_endpoint(text: &str) -> Option<(&str, u16)> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, port) = rest.split_once("]:")?;
        host.parse::<Ipv6Addr>().ok()?;
        (host, port)
    } else {
        let (host, port) = text.rsplit_once(':')?;
        // A bare IPv6 address would be ambiguous with its port.
        if host.parse::<Ipv4Addr>().is_err() && !is_hostname(host) {
            return None;
        }
        (host, port)
    };
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    (port != 0).then_some((host, port))
}

/// RFC 1123 host name; an all-numeric last label is refused so that a mistyped IPv4 address
/// such as 1.2.3.999 is not taken for a name.
pub(super) fn is_hostname(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.len() > 253 {
        return false;
    }
    let labels_ok = host.split('.').all(|label| {
        (1..=63).contains(&label.len())
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    });
    let last_numeric = host
        .rsplit('.')
        .next()
        .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()));
    labels_ok && !last_numeric
}

/// `"a", "b" or "c"`.
pub(crate) fn one_of(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    match quoted.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_labels_accept_lowercase_digits_and_inner_dashes() {
        for ok in ["a", "gpu-01", "molt-provider", &"a".repeat(63)] {
            assert!(ok.parse::<DnsLabel>().is_ok(), "{ok}");
            assert!(ok.parse::<ServiceName>().is_ok(), "{ok}");
            assert!(ok.parse::<NodeName>().is_ok(), "{ok}");
        }
    }

    #[test]
    fn dns_labels_reject_uppercase_underscores_edges_and_length() {
        for bad in [
            "",
            "Bad_Name",
            "UPPER",
            "-a",
            "a-",
            "a.b",
            "a b",
            &"a".repeat(64),
        ] {
            let err = bad.parse::<ServiceName>().unwrap_err();
            assert!(err.message().contains("DNS label"), "{bad}: {err}");
        }
    }

    #[test]
    fn interface_names_follow_the_kernel_rules() {
        for ok in ["claw0", "wg-mesh", &"x".repeat(15)] {
            assert!(ok.parse::<InterfaceName>().is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "a:0", "a\0", &"x".repeat(16)] {
            assert!(bad.parse::<InterfaceName>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tags_need_the_tag_prefix_and_a_plain_name() {
        assert_eq!(
            "tag:gpu-provider".parse::<Tag>().unwrap().as_str(),
            "tag:gpu-provider"
        );
        for bad in ["gpu", "tag:", "tag:GPU", "tag:a_b", "Tag:x"] {
            let err = bad.parse::<Tag>().unwrap_err();
            assert!(err.message().contains("tag:<name>"), "{bad}: {err}");
        }
    }

    #[test]
    fn public_keys_decode_canonical_base64_of_32_bytes() {
        let key: PublicKey = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
            .parse()
            .unwrap();
        assert_eq!(key.as_bytes(), &[0u8; 32]);
        let key: PublicKey = "//////////////////////////////////////////8="
            .parse()
            .unwrap();
        assert_eq!(key.as_bytes(), &[0xffu8; 32]);
        assert_eq!(
            key.to_string(),
            "//////////////////////////////////////////8="
        );
    }

    #[test]
    fn public_keys_reject_wrong_length_alphabet_and_trailing_bits() {
        for bad in [
            "",
            "AAAA",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA-=",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAB=",
            "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAé=",
        ] {
            assert!(bad.parse::<PublicKey>().is_err(), "{bad}");
        }
    }

    #[test]
    fn endpoints_keep_the_host_and_split_the_port() {
        let cases = [
            ("peer.example.com:51820", "peer.example.com", 51820),
            ("1.2.3.4:1", "1.2.3.4", 1),
            ("[fd00::1]:65535", "fd00::1", 65535),
            ("gpu-02:51820", "gpu-02", 51820),
        ];
        for (text, host, port) in cases {
            let ep: Endpoint = text.parse().unwrap();
            assert_eq!((ep.host(), ep.port(), ep.as_str()), (host, port, text));
        }
    }

    #[test]
    fn endpoints_reject_missing_or_out_of_range_ports_and_bare_ipv6() {
        for bad in [
            "host",
            "host:",
            "host:0",
            "host:65536",
            "host:+5",
            ":51820",
            "fd00::1:51820",
            "[fd00::1]51820",
            "[nothost]:1",
            "1.2.3.999:51820",
            "bad_host:1",
            "-a:1",
        ] {
            let err = bad.parse::<Endpoint>().unwrap_err();
            assert!(err.message().contains("host:port"), "{bad}: {err}");
        }
    }

    #[test]
    fn secrets_never_show_their_value() {
        let secret: Secret = "tskey-auth-SECRET".parse().unwrap();
        assert_eq!(secret.expose(), "tskey-auth-SECRET");
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
        let err = "tskey auth SECRET".parse::<Secret>().unwrap_err();
        assert!(!err.to_string().contains("SECRET"), "{err}");
    }

    #[test]
    fn keyword_enums_parse_their_lowercase_names_and_list_them_on_error() {
        assert_eq!(
            "tailscale".parse::<ProviderKind>().unwrap(),
            ProviderKind::Tailscale
        );
        assert_eq!(ProviderKind::default(), ProviderKind::Wireguard);
        assert_eq!(LogLevel::default().as_str(), "info");
        assert_eq!(
            "userspace".parse::<WgBackend>().unwrap().to_string(),
            "userspace"
        );
        let err = "loud".parse::<LogLevel>().unwrap_err();
        assert_eq!(
            err.message(),
            "expected a log level (\"error\", \"warn\", \"info\", \"debug\" or \"trace\"), got \"loud\""
        );
    }

    #[cfg(not(feature = "test-fakes"))]
    #[test]
    fn fake_provider_is_unknown_outside_test_builds() {
        assert!("fake".parse::<ProviderKind>().is_err());
    }
}
