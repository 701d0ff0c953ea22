//! Join tokens and session bearers.
//!
//! A token is `cbn1.<token id: 16 hex>.<secret: base64url>.<root key: base64url>.<urls>` where
//! `<urls>` is base64url of the comma-joined gateway URLs. It pins the cluster identity, so a
//! joining node verifies the gateway before it sends the secret. Parsing is strict: only
//! what `Display` writes is accepted, and errors never echo the secret.

use std::fmt;
use std::str::FromStr;

use zeroize::Zeroizing;

use super::b64;
use super::ids::{NodeId, RootKey, Secret32, TokenId};

/// The token format's prefix and version.
pub const TOKEN_PREFIX: &str = "cbn1";
/// Longest token text accepted (several URLs fit; a pasted file does not).
pub const MAX_TOKEN_LEN: usize = 4096;
/// Most gateway URLs one token carries.
pub const MAX_URLS: usize = 16;
/// Longest gateway URL.
pub const MAX_URL_LEN: usize = 256;

/// Why a token (or a session bearer) was refused. Never contains the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid join token: {0}")]
pub struct TokenError(pub String);

fn bad(what: impl Into<String>) -> TokenError {
    TokenError(what.into())
}

/// A parsed join token. `Debug` hides the secret; `Display` writes the token (secret included)
/// for `gateway token create` to print, so never log it.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: TokenId,
    pub secret: Secret32,
    pub root: RootKey,
    /// `https://<host>[:<port>]`, see [`check_gateway_url`].
    pub urls: Vec<String>,
}

impl JoinToken {
    /// A token with checked URLs (at least one), so what is printed always parses.
    pub fn new(
        id: TokenId,
        secret: Secret32,
        root: RootKey,
        urls: Vec<String>,
    ) -> Result<Self, TokenError> {
        if urls.is_empty() || urls.len() > MAX_URLS {
            return Err(bad(format!("a token carries 1 to {MAX_URLS} gateway URLs")));
        }
        for url in &urls {
            check_gateway_url(url)?;
        }
        Ok(Self {
            id,
            secret,
            root,
            urls,
        })
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("secret", &self.secret)
            .field("root", &self.root)
            .field("urls", &self.urls)
            .finish()
    }
}

impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls = Zeroizing::new(b64::url_encode(self.urls.join(",").as_bytes()));
        write!(
            f,
            "{TOKEN_PREFIX}.{}.{}.{}.{}",
            self.id,
            self.secret.to_b64url().as_str(),
            self.root,
            urls.as_str()
        )
    }
}

impl FromStr for JoinToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, TokenError> {
        if s.len() > MAX_TOKEN_LEN {
            return Err(bad(format!("longer than {MAX_TOKEN_LEN} characters")));
        }
        let parts: Vec<&str> = s.split('.').collect();
        let [prefix, id, secret, root, urls] = parts[..] else {
            return Err(bad(
                "expected five dot-separated parts: cbn1.<id>.<secret>.<root key>.<urls>",
            ));
        };
        if prefix != TOKEN_PREFIX {
            return Err(bad(format!(
                "expected it to start with \"{TOKEN_PREFIX}.\" (a token from `clawnode gateway token create`)"
            )));
        }
        let id: TokenId = id
            .parse()
            .map_err(|_| bad("the token id is not 16 hex digits"))?;
        let secret = Secret32::from_b64url(secret)
            .ok_or_else(|| bad("the secret is not base64url of 32 bytes"))?;
        let root: RootKey = root
            .parse()
            .map_err(|_| bad("the cluster key is not base64url of 32 bytes"))?;
        let joined = b64::url_decode(urls).ok_or_else(|| bad("the URL list is not base64url"))?;
        let joined =
            String::from_utf8(joined).map_err(|_| bad("the URL list is not UTF-8 text"))?;
        let urls: Vec<String> = joined.split(',').map(str::to_owned).collect();
        if urls.len() > MAX_URLS {
            return Err(bad(format!("more than {MAX_URLS} gateway URLs")));
        }
        for url in &urls {
            check_gateway_url(url)?;
        }
        let token = JoinToken {
            id,
            secret,
            root,
            urls,
        };
        // Only the canonical text is a token: one token, one spelling.
        if *Zeroizing::new(token.to_string()) != s {
            return Err(bad("not in canonical form"));
        }
        Ok(token)
    }
}

/// SHA-256 of a token secret: what the gateway's store keeps instead of it.
pub fn token_hash(secret: &Secret32) -> [u8; 32] {
    secret.hash()
}

/// A gateway URL is `https://<host>[:<port>]`: host a DNS name, an IPv4 address or a bracketed
/// IPv6 address; no user, path, query or fragment.
pub fn check_gateway_url(url: &str) -> Result<(), TokenError> {
    split_gateway_url(url).map(|_| ())
}

/// The host (brackets removed from IPv6) and port (443 when not given) of a gateway URL.
pub fn split_gateway_url(url: &str) -> Result<(String, u16), TokenError> {
    let shown = || {
        url.chars()
            .take(80)
            .collect::<String>()
            .escape_debug()
            .to_string()
    };
    if url.len() > MAX_URL_LEN {
        return Err(bad(format!(
            "a gateway URL is longer than {MAX_URL_LEN} characters"
        )));
    }
    let rest = url.strip_prefix("https://").ok_or_else(|| {
        bad(format!(
            "a gateway URL must be https://<host>[:<port>], got \"{}\"",
            shown()
        ))
    })?;
    let not_url = || {
        bad(format!(
            "a gateway URL must be https://<host>[:<port>] with nothing after, got \"{}\"",
            shown()
        ))
    };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (addr, after) = v6.split_once(']').ok_or_else(not_url)?;
        let _: std::net::Ipv6Addr = addr.parse().map_err(|_| not_url())?;
        (addr, after)
    } else {
        let (host, port) = match rest.find(':') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if !is_host_name(host) {
            return Err(not_url());
        }
        (host, port)
    };
    let port = match port {
        "" => 443,
        p => {
            let digits = p.strip_prefix(':').ok_or_else(not_url)?;
            super::ids::parse_canonical_u64(digits)
                .and_then(|v| u16::try_from(v).ok())
                .filter(|v| *v != 0)
                .ok_or_else(not_url)?
        }
    };
    Ok((host.to_owned(), port))
}

/// A DNS name (labels of a-z, A-Z, 0-9, '-') or an IPv4 address.
fn is_host_name(host: &str) -> bool {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    !host.is_empty() && host.len() <= 253 && host.split('.').all(label_ok)
}

/// A node's session with the gateways: `"<node id>.<secret base64url>"`, sent as a bearer.
/// The gateway stores only the secret's hash.
#[derive(Clone, PartialEq, Eq)]
pub struct Session {
    pub node_id: NodeId,
    pub secret: Secret32,
}

impl Session {
    /// The bearer text. Secret: never log it.
    pub fn bearer(&self) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "{}.{}",
            self.node_id,
            self.secret.to_b64url().as_str()
        ))
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("node_id", &self.node_id)
            .field("secret", &self.secret)
            .finish()
    }
}

impl FromStr for Session {
    type Err = TokenError;

    /// Strict, like tokens.
    fn from_str(s: &str) -> Result<Self, TokenError> {
        let (node, secret) = s
            .split_once('.')
            .ok_or_else(|| bad("a session is <node id>.<secret>"))?;
        let node_id: NodeId = node
            .parse()
            .map_err(|_| bad("a session starts with a node id like n12"))?;
        let secret = Secret32::from_b64url(secret)
            .ok_or_else(|| bad("a session's secret is base64url of 32 bytes"))?;
        Ok(Session { node_id, secret })
    }
}

/// serde as the bearer text; a refused value is not echoed.
impl serde::Serialize for Session {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.bearer().as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Session {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Zeroizing::new(String::deserialize(d)?);
        text.parse()
            .map_err(|_| serde::de::Error::custom("expected a session (<node id>.<secret>)"))
    }
}

/// Retrying with the same token fails the same way: someone has to fix or replace it.
impl From<TokenError> for crate::core::Failure {
    fn from(e: TokenError) -> Self {
        crate::core::Failure::needs_operator(e.to_string())
    }
}
