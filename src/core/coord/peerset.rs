//! The node's verified view of the cluster, and the last-known-good cache file that holds it.
//!
//! Rules, whatever the source (stream, snapshot, cache):
//! - signer certs verify against the root; records and revocations against a known signer;
//! - revocations are kept forever: a revoked (node, serial) never comes back;
//! - pins: an address once seen for a node stays that node's (a record that gives it to
//!   another node is rejected), and a node's key changes only with a higher serial; pins
//!   persist across snapshots and in the cache;
//! - adverts only for known nodes, with `seq` above the last seen;
//! - a snapshot replaces records and adverts; signers, revocations and pins persist.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use super::b64;
use super::cursor::Cursor;
use super::ids::{KeyId, NodeId, Role, RootKey};
use super::record::{Advert, AdvertService, Invalid, NodeRecord, Revocation, SignerCert};
use super::wire::Update;
use crate::core::peer_diff::PeerKey;

/// How expired records are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grace {
    /// A gateway answered within the last poll: a record is dropped once `now > not_after`
    /// (the gateway re-signs live records well before that).
    Live,
    /// No gateway reachable since `since` (the last good answer, or the cache's `saved_at`):
    /// a record that was still valid at `since` stays while `now <= not_after + grace`, so an
    /// outage does not take the mesh down; one already expired at `since` stays dropped.
    Offline { since: u64, grace: u64 },
}

/// Why one item of an update or cache was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reject {
    /// Bad signature, unknown signer, malformed content.
    Invalid(Invalid),
    /// The signer cert's `not_after` has passed.
    SignerExpired(KeyId),
    /// A revocation covers this record.
    Revoked { node_id: NodeId, serial: u64 },
    /// The address is pinned to another node.
    AddressPinned { address: IpAddr, owner: NodeId },
    /// Another key for the node without a higher serial than the pinned one.
    KeyPinned { node_id: NodeId, serial: u64 },
    /// Another live node already has this WireGuard key.
    KeyInUse { node_id: NodeId, owner: NodeId },
    /// Not newer than the record held (same serial, different content; or lower serial).
    StaleSerial {
        node_id: NodeId,
        serial: u64,
        held: u64,
    },
    /// An advert for a node with no record.
    UnknownNode(NodeId),
    /// An advert whose `seq` is not above the last seen.
    StaleSeq {
        node_id: NodeId,
        seq: u64,
        held: u64,
    },
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reject::Invalid(e) => write!(f, "{e}"),
            Reject::SignerExpired(id) => write!(f, "signer {id} has expired"),
            Reject::Revoked { node_id, serial } => {
                write!(f, "{node_id} serial {serial} is revoked")
            }
            Reject::AddressPinned { address, owner } => {
                write!(f, "address {address} is pinned to {owner}")
            }
            Reject::KeyPinned { node_id, serial } => write!(
                f,
                "{node_id} changes its key without a serial above {serial}"
            ),
            Reject::KeyInUse { node_id, owner } => {
                write!(f, "{node_id} has the WireGuard key of {owner}")
            }
            Reject::StaleSerial {
                node_id,
                serial,
                held,
            } => write!(f, "{node_id} serial {serial} is not newer than {held}"),
            Reject::UnknownNode(id) => write!(f, "advert for {id}, which has no record"),
            Reject::StaleSeq { node_id, seq, held } => {
                write!(f, "advert for {node_id} seq {seq} is not above {held}")
            }
        }
    }
}

impl From<Invalid> for Reject {
    fn from(e: Invalid) -> Self {
        Reject::Invalid(e)
    }
}

/// What an update did. `rejected` names each refused item (e.g. `"record n4"`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    pub added: Vec<NodeId>,
    pub changed: Vec<NodeId>,
    pub removed: Vec<NodeId>,
    pub rejected: Vec<(String, Reject)>,
}

impl Applied {
    /// Whether the peers may differ (a reconcile is due).
    pub fn touched(&self) -> bool {
        !(self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty())
    }
}

/// A peer as the mesh applies it: from a verified record and the node's advert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayPeer {
    pub node_id: NodeId,
    pub name: String,
    pub key: PeerKey,
    pub addresses: Vec<IpAddr>,
    /// The advert's first endpoint (the node lists its preferred one first).
    pub endpoint: Option<SocketAddr>,
    pub services: Vec<AdvertService>,
    pub roles: Vec<Role>,
}

/// What a node has seen of another: its addresses (pinned to it forever) and the key and
/// serial of its newest record. Kept for revoked and expired nodes too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pin {
    pub node_id: NodeId,
    #[serde(with = "b64::wg_key")]
    pub key: PeerKey,
    pub serial: u64,
    pub addresses: Vec<IpAddr>,
}

/// The cache file (`<state_dir>/peerset.json`): the verified set as last applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheFile {
    /// 1.
    pub version: u32,
    pub cursor: Cursor,
    /// When it was written (unix seconds): the `since` of an offline start.
    pub saved_at: u64,
    pub root: RootKey,
    pub signers: Vec<SignerCert>,
    pub records: Vec<NodeRecord>,
    pub revocations: Vec<Revocation>,
    pub adverts: Vec<Advert>,
    /// Not signed: they only ever refuse records, never authorise one.
    #[serde(default)]
    pub pins: Vec<Pin>,
}

pub const CACHE_VERSION: u32 = 1;

/// Why a whole cache file was refused (the node then starts without it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheRefused {
    #[error("the peer cache belongs to another cluster (root key {found}, expected {expected})")]
    OtherRoot { found: RootKey, expected: RootKey },
    #[error("the peer cache has version {0}, this clawnode reads version 1")]
    Version(u32),
}

/// The verified view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSet {
    root: RootKey,
    signers: BTreeMap<KeyId, SignerCert>,
    records: BTreeMap<NodeId, NodeRecord>,
    adverts: BTreeMap<NodeId, Advert>,
    /// The highest revoked serial per node.
    revocations: BTreeMap<NodeId, Revocation>,
    pins: BTreeMap<NodeId, Pin>,
    /// Which node each pinned address belongs to (derived from `pins`).
    addresses: BTreeMap<IpAddr, NodeId>,
}

impl PeerSet {
    pub fn new(root: RootKey) -> Self {
        Self {
            root,
            signers: BTreeMap::new(),
            records: BTreeMap::new(),
            adverts: BTreeMap::new(),
            revocations: BTreeMap::new(),
            pins: BTreeMap::new(),
            addresses: BTreeMap::new(),
        }
    }

    pub fn root(&self) -> &RootKey {
        &self.root
    }

    /// Applies one answer of `GET /v1/peers` received at `now`.
    pub fn apply(&mut self, update: &Update, now: u64) -> Applied {
        let _ = (update, now);
        unimplemented!()
    }

    /// The peers to configure at `now`: verified, unrevoked, within the [`Grace`] rule. The
    /// node's own record is included; the caller skips its own node id.
    pub fn peers(&self, now: u64, grace: Grace) -> Vec<GatewayPeer> {
        let _ = (now, grace);
        unimplemented!()
    }

    /// The record held for a node, if any (expired or not).
    pub fn record(&self, node_id: NodeId) -> Option<&NodeRecord> {
        self.records.get(&node_id)
    }

    pub fn advert(&self, node_id: NodeId) -> Option<&Advert> {
        self.adverts.get(&node_id)
    }

    pub fn is_revoked(&self, node_id: NodeId, serial: u64) -> bool {
        self.revocations
            .get(&node_id)
            .is_some_and(|r| r.covers(node_id, serial))
    }

    /// The set as a cache file, to be written atomically.
    pub fn to_cache(&self, cursor: Cursor, saved_at: u64) -> CacheFile {
        let _ = (cursor, saved_at);
        unimplemented!()
    }

    /// Loads a cache file, re-verifying every signature against `root` (the session's cluster
    /// key, never the file's). Items that fail are left out and listed; a file of another
    /// cluster or version is refused whole.
    pub fn from_cache(
        root: RootKey,
        cache: &CacheFile,
    ) -> Result<(PeerSet, Vec<Reject>), CacheRefused> {
        let _ = (root, cache);
        unimplemented!()
    }
}
