//! The node's verified view of the cluster, and the last-known-good cache file that holds it.
//!
//! Rules, whatever the source (stream, snapshot, cache):
//! - signer certs verify against the root; records and revocations against a known signer;
//! - revocations are kept forever: a revoked (node, serial) never comes back;
//! - pins: an address once seen for a node stays that node's (a record that gives it to
//!   another node is rejected), and a node's key changes only with a higher serial; pins
//!   persist across snapshots and in the cache;
//! - adverts only for known nodes, with `seq` above the last seen;
//! - a snapshot replaces records and adverts; signers, revocations and pins persist;
//! - a signer is revoked by a root-signed cert with a higher serial that has already expired:
//!   taken even though expired, and when it comes from a gateway the records it signed are
//!   dropped at once, not kept for the offline grace.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::b64;
use super::cursor::Cursor;
use super::ids::{KeyId, NodeId, Role, RootKey};
use super::record::{Advert, AdvertService, Invalid, NodeRecord, Revocation, SignerCert};
use super::wire::{Update, UpdateKind};
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

impl GatewayPeer {
    /// WireGuard allowed IPs: each address as a host route (/32, /128).
    pub fn allowed_ips(&self) -> Vec<IpNet> {
        self.addresses.iter().map(|a| IpNet::from(*a)).collect()
    }
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
    /// The gateways this node knows, so a restart with its gateway down can try the others.
    /// Not signed: a gateway must still prove the cluster's CA before the node talks to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// The gateway that answered last: tried first after a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
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
    /// Which node holds each key among `records` (derived).
    keys: BTreeMap<PeerKey, NodeId>,
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
            keys: BTreeMap::new(),
        }
    }

    pub fn root(&self) -> &RootKey {
        &self.root
    }

    /// Applies one answer of `GET /v1/peers` received at `now`.
    pub fn apply(&mut self, update: &Update, now: u64) -> Applied {
        let mut applied = Applied::default();
        let mut before = Before::default();
        for cert in &update.signers {
            if let Err(reject) = self.admit_signer(cert) {
                applied
                    .rejected
                    .push((format!("signer {}", cert.key_id), reject));
            }
        }
        // A gateway sending an expired cert means the signer is revoked (or its keys are
        // gone): what it signed goes now, not after the offline grace.
        let revoked: Vec<KeyId> = self
            .signers
            .values()
            .filter(|held| now > held.not_after)
            .filter(|held| update.signers.iter().any(|c| c.key_id == held.key_id))
            .map(|held| held.key_id)
            .collect();
        for key_id in revoked {
            let signed: Vec<NodeId> = self
                .records
                .values()
                .filter(|r| r.signer == key_id)
                .map(|r| r.node_id)
                .collect();
            for id in signed {
                before.note(id, &self.records, &self.adverts);
                self.remove(id);
            }
        }
        for revocation in &update.revocations {
            if let Err(reject) = self.admit_revocation(revocation, &mut before) {
                applied
                    .rejected
                    .push((format!("revocation of {}", revocation.node_id), reject));
            }
        }
        // A snapshot replaces records and adverts: what it leaves out is removed. The old
        // ones stay the reference for serial and seq, so a snapshot cannot roll them back.
        let (old_records, old_adverts) = if update.kind == UpdateKind::Snapshot {
            for id in self.records.keys().chain(self.adverts.keys()) {
                before.note(*id, &self.records, &self.adverts);
            }
            self.keys.clear();
            (
                std::mem::take(&mut self.records),
                std::mem::take(&mut self.adverts),
            )
        } else {
            (BTreeMap::new(), BTreeMap::new())
        };
        for record in &update.records {
            before.note(record.node_id, &self.records, &self.adverts);
            let held = old_records.get(&record.node_id);
            if let Err(reject) = self.admit_record(record, Some(now), held) {
                applied.rejected.push((
                    format!("record {} ({})", record.node_id, record.name),
                    reject,
                ));
                // A snapshot's refused successor leaves the verified one held in place.
                if let Some(held) = held
                    && !self.records.contains_key(&held.node_id)
                    && self
                        .keys
                        .get(&held.wg_key)
                        .is_none_or(|o| *o == held.node_id)
                {
                    self.keys.insert(held.wg_key, held.node_id);
                    self.records.insert(held.node_id, held.clone());
                    if let Some(advert) = old_adverts.get(&held.node_id) {
                        self.adverts.insert(held.node_id, advert.clone());
                    }
                }
            }
        }
        for advert in &update.adverts {
            before.note(advert.node_id, &self.records, &self.adverts);
            let held = old_adverts.get(&advert.node_id);
            if let Err(reject) = self.admit_advert(advert, held) {
                applied
                    .rejected
                    .push((format!("advert of {}", advert.node_id), reject));
                // As for records: a snapshot cannot roll an advert back.
                if let Some(held) = held
                    && self.records.contains_key(&held.node_id)
                    && !self.adverts.contains_key(&held.node_id)
                {
                    self.adverts.insert(held.node_id, held.clone());
                }
            }
        }
        before.compare(&self.records, &self.adverts, &mut applied);
        applied
    }

    /// A signer cert: signed by the root; the highest serial per key wins. An expired one is
    /// taken too: that is how a signer is revoked, and holding it keeps an older, still
    /// valid cert of the same key (a stale gateway's) from authorising that key again. Records
    /// are checked against the held cert's expiry.
    fn admit_signer(&mut self, cert: &SignerCert) -> Result<(), Reject> {
        cert.verify(&self.root)?;
        match self.signers.get(&cert.key_id) {
            Some(held) if held.serial >= cert.serial => {}
            _ => {
                self.signers.insert(cert.key_id, cert.clone());
            }
        }
        Ok(())
    }

    /// A revocation from a known signer: kept (the highest serial per node), and the records
    /// it covers removed.
    fn admit_revocation(&mut self, rev: &Revocation, before: &mut Before) -> Result<(), Reject> {
        let signer = self
            .signers
            .get(&rev.signer)
            .ok_or(Invalid::UnknownSigner(rev.signer))?;
        rev.verify(signer)?;
        if self.is_revoked(rev.node_id, rev.serial) {
            return Ok(());
        }
        self.revocations.insert(rev.node_id, rev.clone());
        if let Some(record) = self.records.get(&rev.node_id)
            && rev.covers(record.node_id, record.serial)
        {
            before.note(rev.node_id, &self.records, &self.adverts);
            self.remove(rev.node_id);
        }
        Ok(())
    }

    fn remove(&mut self, node_id: NodeId) {
        if let Some(record) = self.records.remove(&node_id)
            && self.keys.get(&record.wg_key) == Some(&node_id)
        {
            self.keys.remove(&record.wg_key);
        }
        self.adverts.remove(&node_id);
    }

    /// A record: signed by a known signer, not revoked, newer than the one held (`held`
    /// overrides what `records` holds, for a snapshot), and within the pins.
    fn admit_record(
        &mut self,
        record: &NodeRecord,
        now: Option<u64>,
        held: Option<&NodeRecord>,
    ) -> Result<(), Reject> {
        let id = record.node_id;
        let signer = self
            .signers
            .get(&record.signer)
            .ok_or(Invalid::UnknownSigner(record.signer))?;
        record.verify(signer)?;
        if now.is_some_and(|now| now > signer.not_after) {
            return Err(Reject::SignerExpired(signer.key_id));
        }
        if self.is_revoked(id, record.serial) {
            return Err(Reject::Revoked {
                node_id: id,
                serial: record.serial,
            });
        }
        let current = self.records.get(&id);
        if let Some(held) = current.or(held) {
            if held == record {
                if current.is_none() {
                    self.insert_record(record);
                }
                return Ok(());
            }
            if record.serial <= held.serial {
                return Err(Reject::StaleSerial {
                    node_id: id,
                    serial: record.serial,
                    held: held.serial,
                });
            }
        }
        if let Some(pin) = self.pins.get(&id)
            && pin.key != record.wg_key
            && record.serial <= pin.serial
        {
            return Err(Reject::KeyPinned {
                node_id: id,
                serial: pin.serial,
            });
        }
        for address in &record.addresses {
            if let Some(owner) = self.addresses.get(address)
                && *owner != id
            {
                return Err(Reject::AddressPinned {
                    address: *address,
                    owner: *owner,
                });
            }
        }
        if let Some(owner) = self.keys.get(&record.wg_key)
            && *owner != id
        {
            return Err(Reject::KeyInUse {
                node_id: id,
                owner: *owner,
            });
        }
        self.insert_record(record);
        Ok(())
    }

    /// Takes an admitted record, replacing the node's previous one, and pins it.
    fn insert_record(&mut self, record: &NodeRecord) {
        let id = record.node_id;
        if let Some(old) = self.records.insert(id, record.clone())
            && old.wg_key != record.wg_key
            && self.keys.get(&old.wg_key) == Some(&id)
        {
            self.keys.remove(&old.wg_key);
        }
        self.keys.insert(record.wg_key, id);
        let pin = self.pins.entry(id).or_insert_with(|| Pin {
            node_id: id,
            key: record.wg_key,
            serial: record.serial,
            addresses: Vec::new(),
        });
        if record.serial >= pin.serial {
            pin.key = record.wg_key;
            pin.serial = record.serial;
        }
        for address in &record.addresses {
            if !pin.addresses.contains(address) {
                pin.addresses.push(*address);
            }
            self.addresses.insert(*address, id);
        }
    }

    /// An advert: well formed, for a node with a record, `seq` above the last seen (`held`
    /// overrides what `adverts` holds, for a snapshot). The same advert again is no change.
    fn admit_advert(&mut self, advert: &Advert, held: Option<&Advert>) -> Result<(), Reject> {
        let id = advert.node_id;
        advert.check()?;
        if !self.records.contains_key(&id) {
            return Err(Reject::UnknownNode(id));
        }
        if let Some(held) = self.adverts.get(&id).or(held)
            && held != advert
            && advert.seq <= held.seq
        {
            return Err(Reject::StaleSeq {
                node_id: id,
                seq: advert.seq,
                held: held.seq,
            });
        }
        self.adverts.insert(id, advert.clone());
        Ok(())
    }

    /// The peers to configure at `now`: verified, unrevoked, within the [`Grace`] rule. The
    /// node's own record is included; the caller skips its own node id.
    pub fn peers(&self, now: u64, grace: Grace) -> Vec<GatewayPeer> {
        self.records
            .values()
            .filter(|r| grace.keeps(r.not_after, now))
            .map(|r| {
                let advert = self.adverts.get(&r.node_id);
                GatewayPeer {
                    node_id: r.node_id,
                    name: r.name.clone(),
                    key: r.wg_key,
                    addresses: r.addresses.clone(),
                    endpoint: advert.and_then(|a| a.endpoints.first().copied()),
                    services: advert.map(|a| a.services.clone()).unwrap_or_default(),
                    roles: r.roles.clone(),
                }
            })
            .collect()
    }

    /// The `gateway_url` of every gateway record applied at `now` (verified, unrevoked, within
    /// the [`Grace`] rule), in node id order.
    pub fn gateway_urls(&self, now: u64, grace: Grace) -> Vec<String> {
        self.records
            .values()
            .filter(|r| r.has_role(Role::Gateway) && grace.keeps(r.not_after, now))
            .filter_map(|r| r.gateway_url.clone())
            .collect()
    }

    /// Every record held, expired or not, in node id order.
    pub fn records(&self) -> impl Iterator<Item = &NodeRecord> {
        self.records.values()
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
        CacheFile {
            version: CACHE_VERSION,
            cursor,
            saved_at,
            root: self.root,
            signers: self.signers.values().cloned().collect(),
            records: self.records.values().cloned().collect(),
            revocations: self.revocations.values().cloned().collect(),
            adverts: self.adverts.values().cloned().collect(),
            pins: self.pins.values().cloned().collect(),
            gateways: Vec::new(),
            gateway: None,
        }
    }

    /// Loads a cache file, re-verifying every signature against `root` (the session's cluster
    /// key, never the file's). Items that fail are left out and listed; a file of another
    /// cluster or version is refused whole.
    pub fn from_cache(
        root: RootKey,
        cache: &CacheFile,
    ) -> Result<(PeerSet, Vec<Reject>), CacheRefused> {
        if cache.version != CACHE_VERSION {
            return Err(CacheRefused::Version(cache.version));
        }
        if cache.root != root {
            return Err(CacheRefused::OtherRoot {
                found: cache.root,
                expected: root,
            });
        }
        let mut set = PeerSet::new(root);
        let mut rejected = Vec::new();
        for cert in &cache.signers {
            if let Err(reject) = set.admit_signer(cert) {
                rejected.push(reject);
            }
        }
        let mut before = Before::default();
        for rev in &cache.revocations {
            if let Err(reject) = set.admit_revocation(rev, &mut before) {
                rejected.push(reject);
            }
        }
        // Pins first, so the cache's records are held to them like any other.
        for pin in &cache.pins {
            let taken = pin.addresses.iter().find_map(|a| {
                set.addresses
                    .get(a)
                    .filter(|owner| **owner != pin.node_id)
                    .map(|owner| (*a, *owner))
            });
            if let Some((address, owner)) = taken {
                rejected.push(Reject::AddressPinned { address, owner });
                continue;
            }
            if set.pins.contains_key(&pin.node_id) {
                continue;
            }
            for address in &pin.addresses {
                set.addresses.insert(*address, pin.node_id);
            }
            set.pins.insert(pin.node_id, pin.clone());
        }
        for record in &cache.records {
            if let Err(reject) = set.admit_record(record, None, None) {
                rejected.push(reject);
            }
        }
        for advert in &cache.adverts {
            if let Err(reject) = set.admit_advert(advert, None) {
                rejected.push(reject);
            }
        }
        Ok((set, rejected))
    }
}

impl Grace {
    /// Whether a record expiring at `not_after` is still applied at `now`.
    pub fn keeps(self, not_after: u64, now: u64) -> bool {
        match self {
            Grace::Live => now <= not_after,
            Grace::Offline { since, grace } => {
                not_after >= since && now <= not_after.saturating_add(grace)
            }
        }
    }
}

/// The state of the nodes an update touches, as it was before: compared after, to report
/// what was added, changed and removed without copying the whole set.
#[derive(Default)]
struct Before(BTreeMap<NodeId, (Option<NodeRecord>, Option<Advert>)>);

impl Before {
    fn note(
        &mut self,
        id: NodeId,
        records: &BTreeMap<NodeId, NodeRecord>,
        adverts: &BTreeMap<NodeId, Advert>,
    ) {
        self.0
            .entry(id)
            .or_insert_with(|| (records.get(&id).cloned(), adverts.get(&id).cloned()));
    }

    fn compare(
        self,
        records: &BTreeMap<NodeId, NodeRecord>,
        adverts: &BTreeMap<NodeId, Advert>,
        applied: &mut Applied,
    ) {
        for (id, (record, advert)) in self.0 {
            match (record, records.get(&id)) {
                (None, Some(_)) => applied.added.push(id),
                (Some(_), None) => applied.removed.push(id),
                (Some(old), Some(new)) => {
                    if old != *new || advert.as_ref() != adverts.get(&id) {
                        applied.changed.push(id);
                    }
                }
                (None, None) => {}
            }
        }
    }
}
