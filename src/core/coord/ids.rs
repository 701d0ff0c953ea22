//! Identifiers and key material, with their text forms.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::{Zeroize, Zeroizing};

use super::b64;

/// A node's number in the cluster, assigned by the gateway; shown as `n<decimal>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

impl FromStr for NodeId {
    type Err = String;

    /// Strict: `n` then a canonical decimal (no sign, no leading zero).
    fn from_str(s: &str) -> Result<Self, String> {
        s.strip_prefix('n')
            .and_then(parse_canonical_u64)
            .map(NodeId)
            .ok_or_else(|| format!("expected a node id like \"n12\", got {s:?}"))
    }
}

/// A u64 in decimal as `Display` writes it: digits only, no leading zero but `0` itself.
pub(crate) fn parse_canonical_u64(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

/// Names a signer: the first 8 bytes of SHA-256 of its raw Ed25519 public key; hex in JSON.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    pub fn of(public_key: &[u8; 32]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, public_key);
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest.as_ref()[..8]);
        Self(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl FromStr for KeyId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        parse_hex8(s)
            .map(KeyId)
            .ok_or_else(|| format!("expected a key id of 16 lowercase hex digits, got {s:?}"))
    }
}

/// The cluster identity: the root's raw Ed25519 public key (base64url in JSON and tokens).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RootKey(pub [u8; 32]);

impl RootKey {
    /// The public half of the root's PKCS#8 private key (`<state_dir>/gateway/root.key`).
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, super::SignError> {
        super::public_key_of_pkcs8(pkcs8).map(Self)
    }

    pub fn key_id(&self) -> KeyId {
        KeyId::of(&self.0)
    }
}

impl fmt::Display for RootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&b64::url_encode(&self.0))
    }
}

impl fmt::Debug for RootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RootKey({self})")
    }
}

impl FromStr for RootKey {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        b64::url_decode_array(s)
            .map(RootKey)
            .ok_or_else(|| format!("expected a root key (base64url of 32 bytes), got {s:?}"))
    }
}

/// What a node does in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Node,
    Gateway,
}

impl Role {
    pub(crate) fn code(self) -> u8 {
        match self {
            Role::Node => 0,
            Role::Gateway => 1,
        }
    }
}

/// Names a join token in the gateway's store; 16 hex digits. Not secret.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokenId(pub [u8; 8]);

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenId({self})")
    }
}

impl FromStr for TokenId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        parse_hex8(s)
            .map(TokenId)
            .ok_or_else(|| format!("expected a token id of 16 lowercase hex digits, got {s:?}"))
    }
}

/// 32 secret bytes (a token secret, a session secret): zeroized on drop, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret32(pub [u8; 32]);

impl Secret32 {
    /// Unpadded base64url, as tokens, join requests and session bearers carry it.
    pub fn to_b64url(&self) -> Zeroizing<String> {
        Zeroizing::new(b64::url_encode(&self.0))
    }

    /// Strict: canonical unpadded base64url of exactly 32 bytes. The error never echoes input.
    pub fn from_b64url(s: &str) -> Option<Self> {
        b64::url_decode_array(s).map(Self)
    }

    /// SHA-256 of the secret: what a store keeps instead of it.
    pub fn hash(&self) -> [u8; 32] {
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.0);
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        out
    }
}

impl Drop for Secret32 {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for Secret32 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret32(<redacted>)")
    }
}

/// A DNS label (RFC 1123): 1–63 of `a-z 0-9 -`, not starting or ending with `-`. Node names
/// and service names are labels, so they are safe in logs, terminals and DNS.
pub fn check_dns_label(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "expected a DNS label (1-63 of a-z, 0-9, '-', not at either end), got {:?}",
            s.chars().take(80).collect::<String>()
        ))
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

fn parse_hex8(s: &str) -> Option<[u8; 8]> {
    if s.len() != 16 {
        return None;
    }
    u64::from_str_radix(s, 16)
        .ok()
        .map(u64::to_be_bytes)
        .filter(|_| {
            s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

/// serde as the `Display`/`FromStr` text.
macro_rules! serde_as_text {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}

serde_as_text!(NodeId, KeyId, RootKey, TokenId);
pub(crate) use serde_as_text;

/// serde as unpadded base64url; a refused value is not echoed.
impl Serialize for Secret32 {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.to_b64url().as_str())
    }
}

impl<'de> Deserialize<'de> for Secret32 {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = Zeroizing::new(String::deserialize(d)?);
        Secret32::from_b64url(&text)
            .ok_or_else(|| serde::de::Error::custom("expected a secret (base64url of 32 bytes)"))
    }
}
