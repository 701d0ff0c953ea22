//! Gateway coordination, the pure part: what a node accepts as a peer and why.
//!
//! A WireGuard peer is authorised only by a [`NodeRecord`] signed by a gateway signer whose
//! [`SignerCert`] is signed by the cluster's [`RootKey`]. Whatever the store, a gateway's disk
//! or the node's own cache says, [`PeerSet`] re-verifies it. Signatures cover a fixed binary
//! encoding (see [`record`]), never JSON, so field order and formatting cannot matter.
//!
//! ring's Ed25519 signing from PKCS#8 and verification are deterministic, so they live here;
//! key generation (randomness) belongs to the shells.

pub mod alloc;
pub mod b64;
pub mod client;
pub mod cursor;
pub mod ids;
pub mod join;
pub mod peerset;
pub mod record;
pub mod token;
pub mod wire;

pub use alloc::allocate;
pub use cursor::Cursor;
pub use ids::{KeyId, NodeId, Role, RootKey, Secret32, TokenId, check_dns_label};
pub use peerset::{Applied, CacheFile, CacheRefused, GatewayPeer, Grace, PeerSet, Pin, Reject};
pub use record::{
    Advert, AdvertService, GpuSummary, Invalid, NodeRecord, RecordFields, Revocation, SignError,
    SignerCert, ed25519_pkcs8_from_seed, public_key_of_pkcs8, sign_record, sign_revocation,
    sign_signer,
};
pub use token::{JoinToken, Session, TokenError, check_gateway_url, split_gateway_url, token_hash};
pub use wire::{
    ErrorBody, JoinRequest, JoinResponse, ServiceAnswer, ServiceInstance, Update, UpdateKind,
};

/// Gateways sign records for this long (30 days) ...
pub const RECORD_LIFETIME_S: u64 = 30 * 24 * 3600;
/// ... and re-sign a record when less than this (15 days) remains.
pub const RESIGN_BEFORE_S: u64 = 15 * 24 * 3600;
/// The default `gateway_offline_grace` (7 days): see [`Grace`].
pub const DEFAULT_OFFLINE_GRACE_S: u64 = 7 * 24 * 3600;

/// Whether a record expiring at `not_after` is due for re-signing at `now`.
pub fn needs_resign(not_after: u64, now: u64) -> bool {
    not_after.saturating_sub(now) < RESIGN_BEFORE_S
}

#[cfg(test)]
mod tests;
