//! Signed records and their fixed binary encoding.
//!
//! Each signature covers: a domain tag (so a signature over one kind never verifies as
//! another), then every field in declaration order; integers big-endian; a string or list is
//! a u16 big-endian length then its bytes or items; an IP address is a family byte (4 or 6)
//! then its 4 or 16 bytes; a role is one byte (node 0, gateway 1); keys, key ids and a
//! signature's signer are their raw bytes. The signature itself is not covered.
//!
//! A record's optional `gateway_url` is appended after the signer (a u16 length then its bytes)
//! only when present, so a record without it encodes as before and every signature made
//! before the field existed still verifies.

use std::net::{IpAddr, SocketAddr};

use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::b64;
use super::ids::{KeyId, NodeId, Role, RootKey, check_dns_label};
use super::token::check_gateway_url;
use crate::core::peer_diff::PeerKey;

pub const SIGNER_TAG: &[u8] = b"clawnode-signer-v1\0";
pub const RECORD_TAG: &[u8] = b"clawnode-node-record-v1\0";
pub const REVOCATION_TAG: &[u8] = b"clawnode-revocation-v1\0";

/// Most addresses one record may carry.
pub const MAX_ADDRESSES: usize = 16;
/// Most endpoints one advert may carry.
pub const MAX_ENDPOINTS: usize = 16;
/// Most services one advert may carry.
pub const MAX_SERVICES: usize = 64;
/// Longest GPU model name in an advert, in bytes.
pub const MAX_MODEL_LEN: usize = 128;

/// Why a record, cert, revocation or advert is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("signature does not verify")]
    BadSignature,
    #[error("signed by {0}, which is not a known signer")]
    UnknownSigner(KeyId),
    #[error("key id {0} does not match the signer's key")]
    KeyIdMismatch(KeyId),
    #[error("{0}")]
    Malformed(String),
}

/// Why signing failed: the key is not usable, or the content cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("not an Ed25519 PKCS#8 private key")]
    BadKey,
    #[error("cannot sign: {0}")]
    Malformed(String),
}

impl From<Invalid> for SignError {
    fn from(e: Invalid) -> Self {
        SignError::Malformed(e.to_string())
    }
}

/// Authorises a gateway's signing key; signed by the root key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignerCert {
    #[serde(with = "b64::key")]
    pub key: [u8; 32],
    pub key_id: KeyId,
    /// The gateway's name (a DNS label), for operators.
    pub name: String,
    pub serial: u64,
    pub not_after: u64,
    #[serde(with = "b64::sig")]
    pub sig: [u8; 64],
}

/// The only thing that authorises a WireGuard peer; signed by a [`SignerCert`]'s key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeRecord {
    pub node_id: NodeId,
    /// A DNS label.
    pub name: String,
    #[serde(with = "b64::wg_key")]
    pub wg_key: PeerKey,
    /// Mesh addresses (host addresses; allowed IPs become /32 or /128 of each).
    pub addresses: Vec<IpAddr>,
    pub roles: Vec<Role>,
    pub serial: u64,
    pub not_after: u64,
    pub signer: KeyId,
    #[serde(with = "b64::sig")]
    pub sig: [u8; 64],
    /// Where nodes reach this gateway (`https://<host>[:<port>]`); only on records with role
    /// gateway. Signed, so nodes learn gateways from the peer set itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_url: Option<String>,
}

/// A [`NodeRecord`]'s content before signing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordFields {
    pub node_id: NodeId,
    pub name: String,
    pub wg_key: PeerKey,
    pub addresses: Vec<IpAddr>,
    pub roles: Vec<Role>,
    pub serial: u64,
    pub not_after: u64,
    pub gateway_url: Option<String>,
}

/// Withdraws a node: every record of `node_id` with a serial `<= serial`. Kept forever.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Revocation {
    pub node_id: NodeId,
    pub serial: u64,
    pub signer: KeyId,
    #[serde(with = "b64::sig")]
    pub sig: [u8; 64],
}

/// What a node says about itself; unsigned, accepted only on its own session, `seq` strictly
/// increasing per node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Advert {
    pub node_id: NodeId,
    pub seq: u64,
    pub endpoints: Vec<SocketAddr>,
    pub services: Vec<AdvertService>,
    pub gpus: Option<GpuSummary>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdvertService {
    pub name: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuSummary {
    pub count: u32,
    pub model: String,
    pub memory_mib: u64,
}

/// The canonical encoder.
struct Enc(Vec<u8>);

impl Enc {
    fn new(tag: &[u8]) -> Self {
        let mut v = Vec::with_capacity(256);
        v.extend_from_slice(tag);
        Self(v)
    }

    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_be_bytes());
    }

    fn raw(&mut self, v: &[u8]) {
        self.0.extend_from_slice(v);
    }

    fn len(&mut self, n: usize, what: &str) -> Result<(), Invalid> {
        let n = u16::try_from(n).map_err(|_| Invalid::Malformed(format!("{what} too long")))?;
        self.0.extend_from_slice(&n.to_be_bytes());
        Ok(())
    }

    fn str(&mut self, s: &str, what: &str) -> Result<(), Invalid> {
        self.len(s.len(), what)?;
        self.raw(s.as_bytes());
        Ok(())
    }

    fn ip(&mut self, ip: &IpAddr) {
        match ip {
            IpAddr::V4(v4) => {
                self.0.push(4);
                self.raw(&v4.octets());
            }
            IpAddr::V6(v6) => {
                self.0.push(6);
                self.raw(&v6.octets());
            }
        }
    }
}

fn malformed(what: impl Into<String>) -> Invalid {
    Invalid::Malformed(what.into())
}

fn check_fields(f: &RecordFields) -> Result<(), Invalid> {
    check_dns_label(&f.name).map_err(|e| malformed(format!("record name: {e}")))?;
    if f.addresses.is_empty() || f.addresses.len() > MAX_ADDRESSES {
        return Err(malformed(format!(
            "a record carries 1 to {MAX_ADDRESSES} addresses, this one {}",
            f.addresses.len()
        )));
    }
    for (i, a) in f.addresses.iter().enumerate() {
        if a.is_unspecified() || a.is_multicast() || f.addresses[..i].contains(a) {
            return Err(malformed(format!(
                "record address {a} is unusable or repeated"
            )));
        }
    }
    if f.roles.is_empty() {
        return Err(malformed("a record has at least one role"));
    }
    for (i, r) in f.roles.iter().enumerate() {
        if f.roles[..i].contains(r) {
            return Err(malformed("a record repeats a role"));
        }
    }
    if let Some(url) = &f.gateway_url {
        if !f.roles.contains(&Role::Gateway) {
            return Err(malformed(
                "only a record with role gateway carries a gateway URL",
            ));
        }
        check_gateway_url(url).map_err(|e| malformed(format!("record gateway URL: {}", e.0)))?;
    }
    Ok(())
}

fn encode_fields(f: &RecordFields, signer: &KeyId) -> Result<Vec<u8>, Invalid> {
    check_fields(f)?;
    let mut e = Enc::new(RECORD_TAG);
    e.u64(f.node_id.0);
    e.str(&f.name, "name")?;
    e.raw(&f.wg_key.0);
    e.len(f.addresses.len(), "addresses")?;
    for a in &f.addresses {
        e.ip(a);
    }
    e.len(f.roles.len(), "roles")?;
    for r in &f.roles {
        e.0.push(r.code());
    }
    e.u64(f.serial);
    e.u64(f.not_after);
    e.raw(&signer.0);
    if let Some(url) = &f.gateway_url {
        e.str(url, "gateway URL")?;
    }
    Ok(e.0)
}

fn encode_signer(
    key: &[u8; 32],
    key_id: &KeyId,
    name: &str,
    serial: u64,
    not_after: u64,
) -> Result<Vec<u8>, Invalid> {
    check_dns_label(name).map_err(|e| malformed(format!("signer name: {e}")))?;
    let mut e = Enc::new(SIGNER_TAG);
    e.raw(key);
    e.raw(&key_id.0);
    e.str(name, "name")?;
    e.u64(serial);
    e.u64(not_after);
    Ok(e.0)
}

fn encode_revocation(node_id: NodeId, serial: u64, signer: &KeyId) -> Vec<u8> {
    let mut e = Enc::new(REVOCATION_TAG);
    e.u64(node_id.0);
    e.u64(serial);
    e.raw(&signer.0);
    e.0
}

fn verify_sig(key: &[u8; 32], message: &[u8], sig: &[u8; 64]) -> Result<(), Invalid> {
    UnparsedPublicKey::new(&ED25519, key)
        .verify(message, sig)
        .map_err(|_| Invalid::BadSignature)
}

fn key_pair(pkcs8: &[u8]) -> Result<Ed25519KeyPair, SignError> {
    // v1 (openssl genpkey) or v2 (ring, rcgen): both carry the seed.
    Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8).map_err(|_| SignError::BadKey)
}

fn public_of(pair: &Ed25519KeyPair) -> [u8; 32] {
    let mut key = [0u8; 32];
    key.copy_from_slice(pair.public_key().as_ref());
    key
}

fn sign_bytes(pair: &Ed25519KeyPair, message: &[u8]) -> [u8; 64] {
    let mut sig = [0u8; 64];
    sig.copy_from_slice(pair.sign(message).as_ref());
    sig
}

/// The raw Ed25519 public key of a PKCS#8 private key.
pub fn public_key_of_pkcs8(pkcs8: &[u8]) -> Result<[u8; 32], SignError> {
    key_pair(pkcs8).map(|p| public_of(&p))
}

/// A PKCS#8 v1 document for the Ed25519 private key with this seed (RFC 8410). Key
/// generation is the shell's (randomness); this wraps a seed it drew, and makes test keys.
pub fn ed25519_pkcs8_from_seed(seed: &[u8; 32]) -> Zeroizing<Vec<u8>> {
    const PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let mut der = Zeroizing::new(Vec::with_capacity(48));
    der.extend_from_slice(&PREFIX);
    der.extend_from_slice(seed);
    der
}

/// Signs a node record with a gateway signer's PKCS#8 key; `signer` is that key's [`KeyId`].
pub fn sign_record(fields: RecordFields, signer_pkcs8: &[u8]) -> Result<NodeRecord, SignError> {
    let pair = key_pair(signer_pkcs8)?;
    let signer = KeyId::of(&public_of(&pair));
    let sig = sign_bytes(&pair, &encode_fields(&fields, &signer)?);
    let RecordFields {
        node_id,
        name,
        wg_key,
        addresses,
        roles,
        serial,
        not_after,
        gateway_url,
    } = fields;
    Ok(NodeRecord {
        node_id,
        name,
        wg_key,
        addresses,
        roles,
        serial,
        not_after,
        signer,
        sig,
        gateway_url,
    })
}

/// Authorises the signing key `key` (raw Ed25519 public key) under the root's PKCS#8 key.
pub fn sign_signer(
    key: [u8; 32],
    name: &str,
    serial: u64,
    not_after: u64,
    root_pkcs8: &[u8],
) -> Result<SignerCert, SignError> {
    let pair = key_pair(root_pkcs8)?;
    let key_id = KeyId::of(&key);
    let sig = sign_bytes(
        &pair,
        &encode_signer(&key, &key_id, name, serial, not_after)?,
    );
    Ok(SignerCert {
        key,
        key_id,
        name: name.to_owned(),
        serial,
        not_after,
        sig,
    })
}

/// Revokes every record of `node_id` with a serial `<= serial`, signed by a gateway signer.
pub fn sign_revocation(
    node_id: NodeId,
    serial: u64,
    signer_pkcs8: &[u8],
) -> Result<Revocation, SignError> {
    let pair = key_pair(signer_pkcs8)?;
    let signer = KeyId::of(&public_of(&pair));
    let sig = sign_bytes(&pair, &encode_revocation(node_id, serial, &signer));
    Ok(Revocation {
        node_id,
        serial,
        signer,
        sig,
    })
}

impl SignerCert {
    /// The bytes the root signs.
    pub fn signed_bytes(&self) -> Result<Vec<u8>, Invalid> {
        encode_signer(
            &self.key,
            &self.key_id,
            &self.name,
            self.serial,
            self.not_after,
        )
    }

    /// Signed by `root`, and its key id is its key's. Expiry is the caller's rule.
    pub fn verify(&self, root: &RootKey) -> Result<(), Invalid> {
        if KeyId::of(&self.key) != self.key_id {
            return Err(Invalid::KeyIdMismatch(self.key_id));
        }
        verify_sig(&root.0, &self.signed_bytes()?, &self.sig)
    }
}

impl NodeRecord {
    /// The content without the signature, e.g. to re-sign with a new serial and expiry.
    pub fn fields(&self) -> RecordFields {
        RecordFields {
            node_id: self.node_id,
            name: self.name.clone(),
            wg_key: self.wg_key,
            addresses: self.addresses.clone(),
            roles: self.roles.clone(),
            serial: self.serial,
            not_after: self.not_after,
            gateway_url: self.gateway_url.clone(),
        }
    }

    /// The bytes the signer signs.
    pub fn signed_bytes(&self) -> Result<Vec<u8>, Invalid> {
        encode_fields(&self.fields(), &self.signer)
    }

    /// Well formed and signed by `signer`, the cert its `signer` field names. The cert itself
    /// is verified against the root separately ([`SignerCert::verify`]).
    pub fn verify(&self, signer: &SignerCert) -> Result<(), Invalid> {
        if signer.key_id != self.signer {
            return Err(Invalid::UnknownSigner(self.signer));
        }
        verify_sig(&signer.key, &self.signed_bytes()?, &self.sig)
    }

    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }
}

impl Revocation {
    pub fn signed_bytes(&self) -> Vec<u8> {
        encode_revocation(self.node_id, self.serial, &self.signer)
    }

    pub fn verify(&self, signer: &SignerCert) -> Result<(), Invalid> {
        if signer.key_id != self.signer {
            return Err(Invalid::UnknownSigner(self.signer));
        }
        verify_sig(&signer.key, &self.signed_bytes(), &self.sig)
    }

    /// Whether this withdraws a record of `node_id` with `serial`.
    pub fn covers(&self, node_id: NodeId, serial: u64) -> bool {
        self.node_id == node_id && serial <= self.serial
    }
}

impl Advert {
    /// Within the limits, and every name a DNS label: what a gateway accepts on `PUT /v1/self`
    /// and a node accepts from the stream.
    pub fn check(&self) -> Result<(), Invalid> {
        if self.endpoints.len() > MAX_ENDPOINTS {
            return Err(malformed(format!(
                "an advert carries at most {MAX_ENDPOINTS} endpoints"
            )));
        }
        for ep in &self.endpoints {
            if ep.port() == 0 || ep.ip().is_unspecified() || ep.ip().is_multicast() {
                return Err(malformed(format!("advert endpoint {ep} is unusable")));
            }
        }
        if self.services.len() > MAX_SERVICES {
            return Err(malformed(format!(
                "an advert carries at most {MAX_SERVICES} services"
            )));
        }
        for s in &self.services {
            check_dns_label(&s.name).map_err(|e| malformed(format!("service name: {e}")))?;
            if s.port == 0 {
                return Err(malformed(format!("service {} has port 0", s.name)));
            }
        }
        if let Some(g) = &self.gpus
            && (g.model.len() > MAX_MODEL_LEN || g.model.chars().any(char::is_control))
        {
            return Err(malformed(
                "GPU model: at most 128 bytes without control characters",
            ));
        }
        Ok(())
    }
}

/// A key file that is not a usable key stays unusable until someone replaces it.
impl From<SignError> for crate::core::Failure {
    fn from(e: SignError) -> Self {
        crate::core::Failure::needs_operator(e.to_string())
    }
}
