//! The in-memory view every handler serves from: the current state, a ring of recent changes,
//! and a watch on the head revision. A delta for (from, to) and a snapshot for a revision are
//! encoded once and shared by every session that needs them; per-session state is its cursor.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use super::store::{Change, Compacted, State, Store, StoreError};
use crate::core::coord::{
    Advert, Cursor, KeyId, NodeId, NodeRecord, Revocation, ServiceAnswer, ServiceInstance,
    SignerCert, Update, UpdateKind,
};

/// Changes are gathered this long after the first one, so a burst goes out as one delta.
pub const MERGE_WINDOW: Duration = Duration::from_millis(50);
/// Changes kept for deltas; a cursor older than the ring gets a snapshot.
pub const RING_MAX: usize = 10_000;
/// Bodies smaller than this go uncompressed: gzip would not pay for its header.
pub const GZIP_OVER: usize = 1024;
/// The shared delta encodings kept, in bytes (each counted twice: its JSON and at most as much
/// gzip). A session asking for many old cursors would otherwise grow it without bound.
pub const DELTA_CACHE_MAX: usize = 16 << 20;

/// One encoded answer, shared by every session it is sent to.
#[derive(Debug)]
pub struct Encoded {
    pub kind: UpdateKind,
    pub json: Bytes,
    gzip: OnceLock<Option<Bytes>>,
}

impl Encoded {
    fn new(update: &Update) -> Arc<Self> {
        Arc::new(Self {
            kind: update.kind,
            json: Bytes::from(serde_json::to_vec(update).unwrap_or_default()),
            gzip: OnceLock::new(),
        })
    }

    /// The gzip body, compressed at most once; `None` when the body is too small to bother.
    pub fn gzip(&self) -> Option<&Bytes> {
        self.gzip
            .get_or_init(|| {
                if self.json.len() <= GZIP_OVER {
                    return None;
                }
                let mut enc =
                    flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                enc.write_all(&self.json).ok()?;
                enc.finish().ok().map(Bytes::from)
            })
            .as_ref()
    }
}

/// What the gateway role has done since it started.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoleDoc {
    pub store_id: String,
    /// The newest revision in the view.
    pub rev: u64,
    /// Nodes with a session the view knows of.
    pub sessions: u64,
    pub connections: u64,
    pub snapshots_sent: u64,
    pub deltas_sent: u64,
    /// Long polls that ran out their wait with nothing new.
    pub empty_polls: u64,
    pub bytes_sent: u64,
    /// Answers encoded (each shared by every session waiting on it).
    pub encodings: u64,
    pub joins: u64,
    /// Requests answered 503 because the gateway was at capacity.
    pub refused_busy: u64,
    /// Which store, and whether joins and changes can be written now.
    #[serde(default)]
    pub store: StoreHealth,
}

/// The store as `/v1/status` and `gateway status` show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoreHealth {
    /// "sqlite" or "etcd".
    pub kind: String,
    /// False while the store refuses writes (etcd without quorum): joins and changes get 503.
    pub writable: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Default for StoreHealth {
    fn default() -> Self {
        Self {
            kind: "sqlite".to_owned(),
            writable: true,
            reason: None,
        }
    }
}

/// The gateway's own counters, for `GET /v1/status` and the logs.
#[derive(Debug, Default)]
pub struct Counters {
    pub connections: AtomicU64,
    pub snapshots_sent: AtomicU64,
    pub deltas_sent: AtomicU64,
    pub empty_polls: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub encodings: AtomicU64,
    pub joins: AtomicU64,
    pub refused_busy: AtomicU64,
}

#[derive(Default)]
struct Inner {
    rev: u64,
    /// Deltas can be built from any cursor at or above this.
    floor: u64,
    signers: BTreeMap<KeyId, SignerCert>,
    records: BTreeMap<NodeId, NodeRecord>,
    adverts: BTreeMap<NodeId, Advert>,
    revocations: BTreeMap<NodeId, Revocation>,
    ring: VecDeque<(u64, Change)>,
}

/// A slot per (from, to): the first session to ask encodes it (outside the map's lock), the
/// others asking at the same time wait on that one encoding.
type Slot = Arc<OnceLock<Arc<Encoded>>>;

#[derive(Default)]
struct DeltaCache {
    slots: HashMap<(u64, u64), Slot>,
    /// Encoded slots, oldest first: the first evicted.
    order: VecDeque<(u64, u64)>,
    bytes: usize,
}

fn cost(encoded: &Encoded) -> usize {
    encoded.json.len() * 2
}

impl DeltaCache {
    fn slot(&mut self, key: (u64, u64)) -> Slot {
        Arc::clone(self.slots.entry(key).or_default())
    }

    /// Account for a slot just encoded, and evict the oldest past the cap (it too if alone
    /// it is over: its sessions already have it).
    fn encoded(&mut self, key: (u64, u64), slot: &Slot, encoded: &Encoded) {
        // Dropped (a newer head, or evicted) while it was being encoded: not kept.
        if !self.slots.get(&key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            return;
        }
        self.bytes += cost(encoded);
        self.order.push_back(key);
        while self.bytes > DELTA_CACHE_MAX {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(slot) = self.slots.remove(&old)
                && let Some(done) = slot.get()
            {
                self.bytes -= cost(done);
            }
        }
    }

    /// Keep only deltas to `head` or later.
    fn keep_to(&mut self, head: u64) {
        self.slots.retain(|&(_, to), _| to >= head);
        let slots = &self.slots;
        self.order.retain(|key| slots.contains_key(key));
        self.bytes = self
            .order
            .iter()
            .filter_map(|key| slots.get(key)?.get())
            .map(|encoded| cost(encoded))
            .sum();
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

pub struct View {
    store_id: u64,
    /// The live gateways' URLs, this one first: sent in every update.
    gateways: RwLock<Vec<String>>,
    inner: RwLock<Inner>,
    head: watch::Sender<u64>,
    sessions: RwLock<HashMap<NodeId, [u8; 32]>>,
    snapshot: Mutex<Option<(u64, Arc<Encoded>)>>,
    /// Keyed by (from, to); only deltas to the current head are kept, at most
    /// `DELTA_CACHE_MAX` bytes of them.
    deltas: Mutex<DeltaCache>,
    pub counters: Counters,
    health: RwLock<StoreHealth>,
}

impl View {
    pub fn new(store_id: u64, gateways: Vec<String>) -> Self {
        Self {
            store_id,
            gateways: RwLock::new(gateways),
            inner: RwLock::default(),
            head: watch::Sender::new(0),
            sessions: RwLock::default(),
            snapshot: Mutex::default(),
            deltas: Mutex::default(),
            counters: Counters::default(),
            health: RwLock::default(),
        }
    }

    /// Record whether the store takes writes (from a write's outcome or a probe).
    pub fn set_store_health(&self, health: StoreHealth) {
        let mut current = self.health.write().unwrap_or_else(|p| p.into_inner());
        if *current != health {
            if health.writable {
                tracing::info!(component = "gateway", store = %health.kind, "the store takes writes again");
            } else {
                tracing::warn!(component = "gateway", store = %health.kind, reason = health.reason.as_deref().unwrap_or(""), "the store refuses writes: joins and changes get 503 until it returns");
            }
            *current = health;
        }
    }

    /// A write just failed for a reason retrying may cure (etcd without quorum).
    pub fn store_refused(&self, reason: &str) {
        let mut health = self.store_health();
        health.writable = false;
        health.reason = Some(reason.to_owned());
        self.set_store_health(health);
    }

    /// A write just succeeded.
    pub fn store_wrote(&self) {
        if !self
            .health
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .writable
        {
            let mut health = self.store_health();
            health.writable = true;
            health.reason = None;
            self.set_store_health(health);
        }
    }

    pub fn store_health(&self) -> StoreHealth {
        self.health
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn store_id(&self) -> u64 {
        self.store_id
    }

    /// Replace the gateways list sent with every update (the live gateways, this one first).
    /// Answers encoded with the old list are dropped; sessions get the new one with their
    /// next answer.
    pub fn set_gateways(&self, gateways: Vec<String>) {
        {
            let mut current = self.gateways.write().unwrap_or_else(|p| p.into_inner());
            if *current == gateways {
                return;
            }
            *current = gateways;
        }
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.deltas_lock().clear();
    }

    pub fn gateways(&self) -> Vec<String> {
        self.gateways
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The counters as `GET /v1/status`, the node's status API and `/metrics` show them.
    pub fn role_doc(&self) -> RoleDoc {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        RoleDoc {
            store_id: format!("{:016x}", self.store_id),
            rev: self.head(),
            sessions: self.session_count() as u64,
            connections: load(&c.connections),
            snapshots_sent: load(&c.snapshots_sent),
            deltas_sent: load(&c.deltas_sent),
            empty_polls: load(&c.empty_polls),
            bytes_sent: load(&c.bytes_sent),
            encodings: load(&c.encodings),
            joins: load(&c.joins),
            refused_busy: load(&c.refused_busy),
            store: self.store_health(),
        }
    }

    pub fn head(&self) -> u64 {
        *self.head.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Replace everything with a snapshot at `rev`; older cursors get a snapshot from now on
    /// unless `ring` (the changes up to `rev` still in the store) covers them.
    pub fn reset(&self, rev: u64, state: State, ring: Vec<(u64, Change)>) {
        {
            let mut inner = self.write();
            *inner = Inner {
                rev,
                floor: rev,
                ..Inner::default()
            };
            for cert in state.signers {
                inner.signers.insert(cert.key_id, cert);
            }
            for record in state.records {
                inner.records.insert(record.node_id, record);
            }
            for advert in state.adverts {
                inner.adverts.insert(advert.node_id, advert);
            }
            for revocation in state.revocations {
                inner.revocations.insert(revocation.node_id, revocation);
            }
            let ring: Vec<_> = ring.into_iter().filter(|(r, _)| *r <= rev).collect();
            // Contiguous up to `rev` (the store hands out every revision once): the ring covers
            // cursors from just before its first entry.
            if let Some((first, _)) = ring.first() {
                inner.floor = first - 1;
            }
            inner.ring = ring.into_iter().collect();
            trim(&mut inner);
        }
        self.deltas_lock().clear();
        self.head.send_replace(rev);
    }

    /// Apply changes from the feed (oldest first) and publish the new head once. Returns
    /// whether a record came for a node whose session the view does not know (it joined
    /// through another gateway): then reload the sessions so it can poll here at once.
    pub fn apply(&self, changes: Vec<(u64, Change)>) -> bool {
        let Some(&(last, _)) = changes.last() else {
            return false;
        };
        let mut unknown_session = false;
        {
            let mut inner = self.write();
            for (rev, change) in changes {
                if rev <= inner.rev {
                    continue;
                }
                match &change {
                    Change::Record(record) => {
                        inner.records.insert(record.node_id, record.clone());
                        unknown_session |= !self.has_session(record.node_id);
                    }
                    Change::Advert(advert) => {
                        inner.adverts.insert(advert.node_id, advert.clone());
                    }
                    Change::Revocation(revocation) => {
                        inner.records.remove(&revocation.node_id);
                        inner.adverts.remove(&revocation.node_id);
                        inner
                            .revocations
                            .insert(revocation.node_id, revocation.clone());
                        self.sessions_write().remove(&revocation.node_id);
                    }
                    Change::Signer(cert) => {
                        inner.signers.insert(cert.key_id, cert.clone());
                    }
                }
                inner.ring.push_back((rev, change));
                inner.rev = rev;
            }
            trim(&mut inner);
            if last < inner.rev {
                return unknown_session;
            }
        }
        // Deltas to an older head will not be asked for again.
        self.deltas_lock().keep_to(last);
        self.head.send_replace(last);
        unknown_session
    }

    fn has_session(&self, node: NodeId) -> bool {
        self.sessions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&node)
    }

    fn deltas_lock(&self) -> std::sync::MutexGuard<'_, DeltaCache> {
        self.deltas.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sessions_write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<NodeId, [u8; 32]>> {
        self.sessions.write().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_sessions(&self, sessions: Vec<(NodeId, [u8; 32])>) {
        *self.sessions_write() = sessions.into_iter().collect();
    }

    pub fn add_session(&self, node: NodeId, hash: [u8; 32]) {
        self.sessions_write().insert(node, hash);
    }

    /// Add the sessions of nodes the view does not know yet (joined through another
    /// gateway). Known ones are kept: a join here may be newer than the store's copy read.
    pub fn add_unknown_sessions(&self, sessions: Vec<(NodeId, [u8; 32])>) {
        // Under the state's lock (taken before the sessions', as `apply` does): a revocation
        // applied after the store was read cannot be undone by a stale copy.
        let inner = self.read();
        let mut known = self.sessions_write();
        for (node, hash) in sessions {
            if !inner.revocations.contains_key(&node) {
                known.entry(node).or_insert(hash);
            }
        }
    }

    /// A session just read from the store (a node the view did not know); `false`, and not
    /// kept, when the view has meanwhile applied the node's revocation.
    pub fn add_stored_session(&self, node: NodeId, hash: [u8; 32]) -> bool {
        let inner = self.read();
        if inner.revocations.contains_key(&node) {
            return false;
        }
        self.sessions_write().insert(node, hash);
        true
    }

    /// Whether `hash` is the session hash of a node that is not revoked.
    pub fn session_valid(&self, node: NodeId, hash: &[u8; 32]) -> bool {
        let sessions = self.sessions.read().unwrap_or_else(|p| p.into_inner());
        sessions.get(&node).is_some_and(|known| {
            known
                .iter()
                .zip(hash)
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
        })
    }

    pub fn session_count(&self) -> usize {
        self.sessions
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Whether `key_id`'s signer cert is known here and not expired (a root-signed expired
    /// cert is how a signer is revoked).
    pub fn signer_valid(&self, key_id: KeyId, now: u64) -> bool {
        self.read()
            .signers
            .get(&key_id)
            .is_some_and(|cert| now <= cert.not_after)
    }

    pub fn record(&self, node: NodeId) -> Option<NodeRecord> {
        self.read().records.get(&node).cloned()
    }

    pub fn records(&self) -> Vec<NodeRecord> {
        self.read().records.values().cloned().collect()
    }

    pub fn advert_seq(&self, node: NodeId) -> u64 {
        self.read().adverts.get(&node).map_or(0, |a| a.seq)
    }

    /// What a session with `cursor` is owed now: a snapshot, a delta, or `None` when it is
    /// current or ahead (then wait on `subscribe()` and ask again). A cursor of this store
    /// ahead of the head comes from another gateway a few ms ahead on the same store: it
    /// waits for this view to catch up rather than taking a snapshot.
    pub fn answer(&self, cursor: Option<Cursor>) -> Option<Arc<Encoded>> {
        let (head, floor) = {
            let inner = self.read();
            (inner.rev, inner.floor)
        };
        match cursor {
            Some(c) if c.store_id == self.store_id && c.rev >= head => None,
            Some(c) if c.store_id == self.store_id && c.rev >= floor && c.rev < head => {
                Some(self.delta(c.rev))
            }
            _ => Some(self.snapshot()),
        }
    }

    /// The answer to a poll that waited in vain: the same cursor, nothing in it.
    pub fn empty(&self, rev: u64) -> Arc<Encoded> {
        self.shared((rev, rev), || {
            Encoded::new(&self.update(rev, UpdateKind::Delta, State::default()))
        })
    }

    /// The cached encoding for `key`, made by `make` (outside the cache's lock) when missing.
    fn shared(&self, key: (u64, u64), make: impl FnOnce() -> Arc<Encoded>) -> Arc<Encoded> {
        let slot = self.deltas_lock().slot(key);
        let mut made = false;
        let encoded = Arc::clone(slot.get_or_init(|| {
            made = true;
            make()
        }));
        if made {
            self.deltas_lock().encoded(key, &slot, &encoded);
        }
        encoded
    }

    /// Bytes the delta cache holds (as counted against `DELTA_CACHE_MAX`).
    pub fn delta_cache_bytes(&self) -> usize {
        self.deltas_lock().bytes
    }

    pub fn snapshot(&self) -> Arc<Encoded> {
        let mut cache = self.snapshot.lock().unwrap_or_else(|p| p.into_inner());
        let head = self.read().rev;
        if let Some((rev, encoded)) = cache.as_ref()
            && *rev == head
        {
            return Arc::clone(encoded);
        }
        let (rev, state) = {
            let inner = self.read();
            let state = State {
                signers: inner.signers.values().cloned().collect(),
                records: inner.records.values().cloned().collect(),
                revocations: inner.revocations.values().cloned().collect(),
                adverts: inner.adverts.values().cloned().collect(),
            };
            (inner.rev, state)
        };
        let encoded = Encoded::new(&self.update(rev, UpdateKind::Snapshot, state));
        self.counters.encodings.fetch_add(1, Ordering::Relaxed);
        *cache = Some((rev, Arc::clone(&encoded)));
        encoded
    }

    /// Everything after `from` up to the head, merged: the latest record and advert per node.
    fn delta(&self, from: u64) -> Arc<Encoded> {
        let to = self.read().rev;
        // A crowd at one cursor encodes once, not once each.
        self.shared((from, to), || self.encode_delta(from, to))
    }

    fn encode_delta(&self, from: u64, to: u64) -> Arc<Encoded> {
        let state = {
            let inner = self.read();
            let mut signers = BTreeMap::new();
            let mut records = BTreeMap::new();
            let mut adverts = BTreeMap::new();
            let mut revocations = BTreeMap::new();
            let start = inner.ring.partition_point(|(rev, _)| *rev <= from);
            for (_, change) in inner.ring.range(start..).take_while(|(rev, _)| *rev <= to) {
                match change {
                    Change::Record(r) => {
                        records.insert(r.node_id, r.clone());
                    }
                    Change::Advert(a) => {
                        adverts.insert(a.node_id, a.clone());
                    }
                    Change::Revocation(r) => {
                        records.remove(&r.node_id);
                        adverts.remove(&r.node_id);
                        revocations.insert(r.node_id, r.clone());
                    }
                    Change::Signer(c) => {
                        signers.insert(c.key_id, c.clone());
                    }
                }
            }
            State {
                signers: signers.into_values().collect(),
                records: records.into_values().collect(),
                revocations: revocations.into_values().collect(),
                adverts: adverts.into_values().collect(),
            }
        };
        let encoded = Encoded::new(&self.update(to, UpdateKind::Delta, state));
        self.counters.encodings.fetch_add(1, Ordering::Relaxed);
        encoded
    }

    fn update(&self, rev: u64, kind: UpdateKind, state: State) -> Update {
        Update {
            cursor: Cursor {
                store_id: self.store_id,
                rev,
            },
            kind,
            signers: state.signers,
            records: state.records,
            revocations: state.revocations,
            adverts: state.adverts,
            gateways: self.gateways(),
        }
    }

    /// Every node advertising `name`, at its first mesh address.
    pub fn services(&self, name: &str) -> ServiceAnswer {
        let inner = self.read();
        let mut services = Vec::new();
        for (node, advert) in &inner.adverts {
            let Some(record) = inner.records.get(node) else {
                continue;
            };
            let Some(address) = record.addresses.first() else {
                continue;
            };
            for service in advert.services.iter().filter(|s| s.name == name) {
                services.push(ServiceInstance {
                    name: service.name.clone(),
                    node: record.name.clone(),
                    address: *address,
                    port: service.port,
                });
            }
        }
        ServiceAnswer { services }
    }
}

fn trim(inner: &mut Inner) {
    while inner.ring.len() > RING_MAX {
        if let Some((rev, _)) = inner.ring.pop_front() {
            inner.floor = rev;
        }
    }
}

/// Keep `view` current from `store`'s change feed until the task is dropped: wait for a
/// change, let the merge window fill, then publish everything since in one step.
pub async fn feed<S: Store>(store: Arc<S>, view: Arc<View>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let result = step(&*store, &view).await;
        match result {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(error) => {
                tracing::warn!(component = "gateway", %error, "store feed failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn step<S: Store>(store: &S, view: &View) -> Result<(), StoreError> {
    let rev = view.head();
    store.wait(rev).await?;
    tokio::time::sleep(MERGE_WINDOW).await;
    match store.changes_since(rev).await? {
        Ok(changes) => {
            if view.apply(changes) {
                view.add_unknown_sessions(store.sessions().await?);
            }
        }
        Err(Compacted) => load(store, view).await?,
    }
    Ok(())
}

/// Fill `view` from the store: the state, and as many recent changes as the ring holds, so
/// sessions that were current before a gateway restart get deltas, not snapshots.
pub async fn load<S: Store>(store: &S, view: &View) -> Result<(), StoreError> {
    let (rev, state) = store.snapshot().await?;
    let from = rev.saturating_sub(RING_MAX as u64);
    let ring = store.changes_since(from).await?.unwrap_or_default();
    view.reset(rev, state, ring);
    view.set_sessions(store.sessions().await?);
    Ok(())
}
