//! The base64 forms used on the wire, strict both ways: unpadded base64url for binary fields
//! (signatures, Ed25519 keys, secrets) and standard padded base64 for WireGuard keys (as `wg`
//! shows them). Decoding accepts only the canonical encoding, so each value has one text.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Deserializer, Serializer};

use crate::core::peer_diff::PeerKey;

pub fn url_encode(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

pub fn url_decode(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s).ok()
}

pub fn url_decode_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    // Checked before decoding so a huge input costs nothing.
    if s.len() != (N * 4).div_ceil(3) {
        return None;
    }
    url_decode(s)?.try_into().ok()
}

/// A WireGuard public key as `wg` prints it: 44 characters of standard base64.
pub fn wg_key_to_string(key: &PeerKey) -> String {
    STANDARD.encode(key.0)
}

/// Strict: exactly 44 characters of canonical standard base64 of 32 bytes.
pub fn wg_key_from_str(s: &str) -> Option<PeerKey> {
    if s.len() != 44 {
        return None;
    }
    let bytes: [u8; 32] = STANDARD.decode(s).ok()?.try_into().ok()?;
    Some(PeerKey(bytes))
}

/// serde for `[u8; 64]` signatures as base64url.
pub mod sig {
    use super::*;

    pub fn serialize<S: Serializer>(v: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&url_encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let text = String::deserialize(d)?;
        url_decode_array(&text)
            .ok_or_else(|| serde::de::Error::custom("expected a signature (base64url of 64 bytes)"))
    }
}

/// serde for raw `[u8; 32]` Ed25519 public keys as base64url.
pub mod key {
    use super::*;

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&url_encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        url_decode_array(&text)
            .ok_or_else(|| serde::de::Error::custom("expected a key (base64url of 32 bytes)"))
    }
}

/// serde for a WireGuard [`PeerKey`] as standard base64.
pub mod wg_key {
    use super::*;

    pub fn serialize<S: Serializer>(v: &PeerKey, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&wg_key_to_string(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PeerKey, D::Error> {
        let text = String::deserialize(d)?;
        wg_key_from_str(&text).ok_or_else(|| {
            serde::de::Error::custom("expected a WireGuard key (44 characters of base64)")
        })
    }
}
