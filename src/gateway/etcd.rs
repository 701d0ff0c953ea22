//! The etcd store: several gateways on one etcd cluster serve one mesh.
//!
//! Every key lives under the prefix (default `/clawbernetes/`): `meta/store_id`,
//! `meta/next_node`, `tokens/<id>`, `nodes/<id>` (NodeMeta), `names/<name>`, `wgkeys/<key>`,
//! `ip/<addr>`, the change keys `records/<id>`, `adverts/<id>`, `revocations/<id>`,
//! `signers/<key id>` (their puts are the change feed, the etcd revision is the cursor) and
//! `gateways/<id>` (presence, under a lease).
//!
//! Each store keeps a mirror of the whole prefix fed by one watch; reads (snapshot, recent
//! changes, sessions, join pre-checks) are served from it, so long polls keep working while
//! etcd has no quorum. Writes are transactions that compare the mod revision of every key
//! their decision read: a gateway that lost a race waits for its mirror to see the winner's
//! write and decides again.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, CompactionOptions, Compare, CompareOp, ConnectOptions, EventType,
    GetOptions, Identity, PutOptions, SortOrder, SortTarget, TlsOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::{Instant, sleep, timeout};

use super::store::{
    AdvertError, Change, Compacted, JoinError, JoinTxn, Joined, KEEP_CHANGES, KEEP_CHANGES_FOR_S,
    NewToken, NodeRow, State, Store, StoreError,
};
use crate::core::coord::join::{self, JoinPlan, JoinRequest, JoinView, NodeView, Refusal};
use crate::core::coord::{Advert, NodeId, NodeRecord, Revocation, SignerCert};

/// Seconds a gateway's presence outlives its last keep-alive.
pub const PRESENCE_TTL_S: i64 = 10;
/// How often the presence lease is kept alive.
const PRESENCE_KEEPALIVE: Duration = Duration::from_secs(3);
/// A request without an answer in this time is taken as "no quorum".
const WRITE_TIMEOUT: Duration = Duration::from_secs(3);
/// A write is tried again for this long: losing the leader (one member killed) stalls the
/// requests sent before the election (1 to 2 s) ends.
const WRITE_BUDGET: Duration = Duration::from_secs(4);
/// One try of a write.
const WRITE_TRY: Duration = Duration::from_secs(1);
/// How often an optimistic transaction is decided again after losing a race.
const MAX_TRIES: usize = 50;
/// Recent changes kept in memory for `changes_since`; older cursors are read from etcd.
const RING: usize = 16_384;
/// Compaction samples (time, head) kept at most.
const MAX_SAMPLES: usize = 2048;

/// Where the cluster is and how to reach it (`[gateway] etcd_*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdSettings {
    pub endpoints: Vec<String>,
    /// Every key lives under it; starts and ends with `/` (default `/clawbernetes/`).
    pub prefix: String,
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

/// A live gateway, as registered under its lease at `gateways/<node id>`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct GatewayPresence {
    pub node_id: NodeId,
    pub name: String,
    pub url: String,
    pub started_at: u64,
    pub version: String,
}

/// What `gateway status` shows of the cluster.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ClusterDoc {
    pub endpoints: Vec<String>,
    pub prefix: String,
    pub members: Vec<MemberDoc>,
    pub health: Vec<EndpointHealth>,
    /// Whether a write would succeed now (a leader and a quorum answer).
    pub writable: bool,
    /// Why not, when not writable.
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct MemberDoc {
    pub name: String,
    /// Hex, as `etcdctl member list` shows it.
    pub id: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct EndpointHealth {
    pub endpoint: String,
    pub healthy: bool,
    /// The member id (hex) of the leader this endpoint follows, when it has one.
    pub leader: Option<String>,
    pub raft_term: Option<u64>,
    pub db_size: Option<i64>,
    pub error: Option<String>,
}

/// A node's bookkeeping at `nodes/<id>` (its signed record is at `records/<id>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct NodeMeta {
    name: String,
    address: IpAddr,
    wg_key: String,
    joined_at: u64,
    join_token: Option<String>,
    revoked: bool,
    /// Hex SHA-256 of the session secret; `None` once revoked.
    session_hash: Option<String>,
}

/// A join token at `tokens/<id>`: only the hash of its secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenDoc {
    hash: String,
    expires_at: u64,
    uses_left: i64,
    created_at: u64,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// `wgkeys/` names keys in URL-safe base64 (standard base64 has `/`).
fn wgkey_key(wg_key: &str) -> String {
    format!(
        "wgkeys/{}",
        wg_key
            .replace('+', "-")
            .replace('/', "_")
            .trim_end_matches('=')
    )
}

fn no_quorum(detail: &str) -> StoreError {
    StoreError::new(
        format!(
            "etcd has no quorum ({detail}): joins and changes are refused until it returns; nodes keep their peers"
        ),
        true,
    )
}

/// Whether retrying may help, and in words. A missing leader, a timeout or no reachable
/// member all mean the same to the operator: etcd cannot take writes now.
fn etcd_err(error: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    match error {
        E::GRpcStatus(status) => {
            let mut message = status.message().to_owned();
            let mut source = std::error::Error::source(&status);
            while let Some(cause) = source {
                // Layers repeat one another ("tcp connect error: transport error: tcp
                // connect error"): keep the innermost words once.
                let text = cause.to_string();
                if !message.contains(&text) {
                    message = format!("{message}: {text}");
                }
                source = cause.source();
            }

            // gRPC codes (tonic::Code): 1 cancelled, 3 invalid argument, 4 deadline
            // exceeded, 7 permission denied, 9 failed precondition, 14 unavailable,
            // 16 unauthenticated.
            match status.code() as i32 {
                1 | 4 | 14 => no_quorum(&message),
                _ if message.contains("leader") || message.contains("timed out") => {
                    no_quorum(&message)
                }
                3 | 9 => StoreError::new(format!("etcd refused: {message}"), false),
                7 | 16 => StoreError::new(
                    format!(
                        "etcd refused our credentials: {message}: check etcd_cert_file/etcd_key_file"
                    ),
                    false,
                ),
                _ => StoreError::new(format!("etcd: {message}"), true),
            }
        }
        E::TransportError(e) => no_quorum(&format!("no member reachable: {e}")),
        E::IoError(e) => no_quorum(&format!("no member reachable: {e}")),
        E::InvalidArgs(m) | E::EndpointError(m) => {
            StoreError::new(format!("etcd settings: {m}"), false)
        }
        E::InvalidUri(e) => StoreError::new(format!("etcd endpoint: {e}"), false),
        other @ (E::WatchError(_)
        | E::Utf8Error(_)
        | E::LeaseKeepAliveError(_)
        | E::ElectError(_)
        | E::InvalidMetadataValue(_)
        | E::EndpointsNotManaged
        | E::Internal(_)) => StoreError::new(format!("etcd: {other}"), true),
    }
}

/// Run one etcd request with the write deadline.
async fn bounded<T>(
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match timeout(WRITE_TIMEOUT, request).await {
        Ok(result) => result.map_err(etcd_err),
        Err(_) => Err(no_quorum("no answer within 3 s")),
    }
}

/// A write (or a read that must not fail for one dead member): tried again after transient failures (a leader election, a dead member) until
/// `WRITE_BUDGET` has passed; then the last error, which names the missing quorum. Safe to
/// repeat: every optimistic write compares what it read, so a try that did commit makes the
/// next one fail its compares and be decided again.
async fn write<T, F: Future<Output = Result<T, etcd_client::Error>>>(
    mut request: impl FnMut() -> F,
) -> Result<T, StoreError> {
    let deadline = Instant::now() + WRITE_BUDGET;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let error = match timeout(left.min(WRITE_TRY), request()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => etcd_err(error),
            Err(_) => no_quorum("no answer within 4 s; the write may still apply once it has"),
        };
        if !error.transient || Instant::now() + Duration::from_millis(100) >= deadline {
            return Err(error);
        }
        sleep(Duration::from_millis(100)).await;
    }
}

async fn connect(settings: &EtcdSettings) -> Result<Client, StoreError> {
    let mut options = ConnectOptions::new()
        .with_require_leader(true)
        .with_connect_timeout(WRITE_TIMEOUT)
        // A member that vanished without closing its connection is noticed in seconds, so
        // the watch moves to another member.
        .with_keep_alive(KEEPALIVE_INTERVAL, Duration::from_secs(3))
        .with_keep_alive_while_idle(true);
    if let Some(ca) = &settings.ca_file {
        let read = |path: &PathBuf| {
            std::fs::read(path)
                .map_err(|e| StoreError::new(format!("cannot read {}: {e}", path.display()), false))
        };
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&settings.cert_file, &settings.key_file) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        options = options.with_tls(tls);
    }
    bounded(Client::connect(&settings.endpoints, Some(options))).await
}

/// One key of the mirror.
#[derive(Debug, Clone)]
struct Entry {
    value: Vec<u8>,
    mod_rev: i64,
}

/// Everything under the prefix, as of revision `rev`.
#[derive(Default)]
struct Mirror {
    rev: u64,
    kv: BTreeMap<String, Entry>,
    /// Parsed from the `ip/` keys: every address ever handed out.
    taken: BTreeSet<IpAddr>,
    /// Parsed from the `nodes/` keys: the session hash of every node not revoked (read on
    /// every request of a node the view does not know yet, so kept parsed).
    sessions: BTreeMap<u64, [u8; 32]>,
    /// Every change with a revision above `ring_from`, oldest first.
    ring: VecDeque<(u64, Change)>,
    ring_from: u64,
    /// etcd's compact revision as far as this store knows.
    compacted: u64,
    /// The newest change's revision: what a snapshot is at, so every gateway hands out the
    /// same cursor for the same state (`rev` also moves on tokens, sessions and presence).
    last_change: u64,
}

fn parse_change(rel: &str, value: &[u8]) -> Option<Result<Change, serde_json::Error>> {
    let (kind, _) = rel.split_once('/')?;
    Some(match kind {
        "records" => serde_json::from_slice(value).map(Change::Record),
        "adverts" => serde_json::from_slice(value).map(Change::Advert),
        "revocations" => serde_json::from_slice(value).map(Change::Revocation),
        "signers" => serde_json::from_slice(value).map(Change::Signer),
        _ => return None,
    })
}

impl Mirror {
    fn get(&self, rel: &str) -> Option<&Entry> {
        self.kv.get(rel)
    }

    /// The entries whose key starts with `dir` (e.g. `nodes/`).
    fn dir<'a>(&'a self, dir: &'a str) -> impl Iterator<Item = (&'a str, &'a Entry)> + 'a {
        self.kv
            .range(dir.to_owned()..)
            .take_while(move |(k, _)| k.starts_with(dir))
            .map(|(k, v)| (k.as_str(), v))
    }

    fn json<T: serde::de::DeserializeOwned>(&self, rel: &str) -> Option<T> {
        serde_json::from_slice(&self.get(rel)?.value).ok()
    }

    fn node(&self, id: u64) -> Option<NodeMeta> {
        self.json(&format!("nodes/{id}"))
    }

    /// Apply one event; returns whether it touched presence and the change it carries.
    fn apply(&mut self, rel: &str, put: bool, value: &[u8], mod_rev: u64) -> (bool, bool) {
        let address = rel
            .strip_prefix("ip/")
            .and_then(|a| a.parse::<IpAddr>().ok());
        if let Some(id) = rel
            .strip_prefix("nodes/")
            .and_then(|id| id.parse::<u64>().ok())
        {
            let session = put
                .then(|| serde_json::from_slice::<NodeMeta>(value).ok())
                .flatten()
                .filter(|meta| !meta.revoked)
                .and_then(|meta| meta.session_hash.as_deref().and_then(unhex32));
            match session {
                Some(hash) => self.sessions.insert(id, hash),
                None => self.sessions.remove(&id),
            };
        }
        if put {
            self.kv.insert(
                rel.to_owned(),
                Entry {
                    value: value.to_vec(),
                    mod_rev: mod_rev as i64,
                },
            );
            if let Some(address) = address {
                self.taken.insert(address);
            }
        } else {
            self.kv.remove(rel);
            if let Some(address) = address {
                self.taken.remove(&address);
            }
        }
        let mut changed = false;
        if put {
            let change = parse_change(rel, value);
            if change.is_some() {
                self.last_change = self.last_change.max(mod_rev);
            }
            match change {
                Some(Ok(change)) => {
                    self.ring.push_back((mod_rev, change));
                    changed = true;
                    while self.ring.len() > RING {
                        // Drop a whole revision at once: a cursor never splits one.
                        let Some((dropped, _)) = self.ring.pop_front() else {
                            break;
                        };
                        while self.ring.front().is_some_and(|(r, _)| *r == dropped) {
                            self.ring.pop_front();
                        }
                        self.ring_from = dropped;
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(key = rel, %error, "etcd store: a change does not parse, skipped");
                }
                None => {}
            }
        }
        (rel.starts_with("gateways/"), changed)
    }

    fn node_view(&self, id: u64) -> Option<NodeView> {
        let meta = self.node(id)?;
        let serial = self
            .json::<NodeRecord>(&format!("records/{id}"))
            .map_or(0, |r| r.serial);
        Some(NodeView {
            node_id: NodeId(id),
            wg_key: meta.wg_key,
            address: meta.address,
            serial,
            join_token: meta.join_token,
            joined_at: meta.joined_at,
            revoked: meta.revoked,
        })
    }
}

/// The keys a decision read, with the mod revision it saw (0: absent); the transaction
/// commits only if none changed.
#[derive(Default)]
struct Reads(Vec<(String, i64)>);

impl Reads {
    fn read<'m>(&mut self, mirror: &'m Mirror, rel: &str) -> Option<&'m Entry> {
        let entry = mirror.get(rel);
        if !self.0.iter().any(|(k, _)| k == rel) {
            self.0
                .push((rel.to_owned(), entry.map_or(0, |e| e.mod_rev)));
        }
        entry
    }

    fn json<T: serde::de::DeserializeOwned>(&mut self, mirror: &Mirror, rel: &str) -> Option<T> {
        serde_json::from_slice(&self.read(mirror, rel)?.value).ok()
    }

    fn id_at(&mut self, mirror: &Mirror, rel: &str) -> Option<u64> {
        std::str::from_utf8(&self.read(mirror, rel)?.value)
            .ok()?
            .parse()
            .ok()
    }
}

/// A decided write: what it read, what it writes, and what the caller gets back.
struct Plan<T> {
    reads: Reads,
    ops: Vec<(String, Option<Vec<u8>>)>,
    value: T,
}

struct Shared {
    client: Client,
    settings: EtcdSettings,
    store_id: u64,
    mirror: Mutex<Mirror>,
    /// The newest change's revision: what `wait` follows.
    head: watch::Sender<u64>,
    /// The mirror's revision: the newest event under the prefix. (Never etcd's progress
    /// reports: etcd 3.4 sends them ahead of undelivered events.)
    seen: watch::Sender<u64>,
    presence: watch::Sender<u64>,
    /// One join at a time per gateway: retries are only ever across gateways.
    join_lock: tokio::sync::Mutex<()>,
    conflicts: AtomicU64,
    /// (time, head) samples for compaction.
    samples: Mutex<VecDeque<(u64, u64)>>,
}

struct Tasks(Vec<tokio::task::AbortHandle>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// The etcd store; clones share the mirror and the watch.
#[derive(Clone)]
pub struct EtcdStore {
    shared: Arc<Shared>,
    _tasks: Arc<Tasks>,
}

fn lock(mirror: &Mutex<Mirror>) -> MutexGuard<'_, Mirror> {
    mirror.lock().unwrap_or_else(|p| p.into_inner())
}

fn json_err(error: serde_json::Error) -> StoreError {
    StoreError::new(format!("a stored value does not parse: {error}"), false)
}

/// gRPC pings: etcd closes a connection pinged more often than its
/// `--grpc-keepalive-min-time` (5 s by default) as abusive, watch and lease streams included.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(6);

/// Operations per transaction, under etcd's default `--max-txn-ops` (128).
const TXN_OPS_MAX: usize = 100;

/// Keys read per request when loading the mirror.
const LOAD_PAGE: i64 = 1_000;

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Only 0xff bytes: to the end of the key space.
    vec![0]
}

impl Shared {
    fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.settings.prefix)
    }

    fn mirror(&self) -> MutexGuard<'_, Mirror> {
        lock(&self.mirror)
    }

    /// Load everything under the prefix into a fresh mirror.
    async fn load(&self) -> Result<(), StoreError> {
        let client = self.client.clone();
        let prefix = self.settings.prefix.as_bytes();
        let end = prefix_end(prefix);
        let mut from = prefix.to_vec();
        // Pages at one revision: one answer for the whole prefix would pass gRPC's 4 MiB
        // message limit at a few thousand nodes.
        let mut rev = 0u64;
        let mut fresh = Mirror::default();
        loop {
            let mut options = GetOptions::new()
                .with_range(end.clone())
                .with_limit(LOAD_PAGE);
            if rev > 0 {
                options = options.with_revision(rev as i64);
            }
            // Retried like a write: a dead member refuses the first try.
            let response = write(|| {
                let mut client = client.clone();
                let (from, options) = (from.clone(), options.clone());
                async move { client.get(from, Some(options)).await }
            })
            .await?;
            if rev == 0 {
                rev = response.header().map_or(0, |h| h.revision()) as u64;
            }
            for kv in response.kvs() {
                let Some(rel) = kv.key().strip_prefix(prefix) else {
                    continue;
                };
                let rel = String::from_utf8_lossy(rel);
                // Not a change: what is already there is the state, not news.
                fresh.apply(&rel, true, kv.value(), kv.mod_revision() as u64);
            }
            let Some(last) = response.kvs().last() else {
                break;
            };
            if !response.more() {
                break;
            }
            from = last.key().to_vec();
            from.push(0);
        }
        fresh.rev = rev;
        fresh.ring.clear();
        // No change lies between the newest one and `rev`: the (empty) ring covers from there.
        let last_change = fresh.last_change;
        fresh.ring_from = last_change;
        {
            let mut mirror = self.mirror();
            fresh.compacted = mirror.compacted;
            *mirror = fresh;
        }
        self.bump(&self.head, last_change);
        self.bump(&self.seen, rev);
        self.presence.send_modify(|n| *n += 1);
        Ok(())
    }

    fn bump(&self, sender: &watch::Sender<u64>, rev: u64) {
        sender.send_if_modified(|now| {
            let newer = rev > *now;
            if newer {
                *now = rev;
            }
            newer
        });
    }

    /// Apply one watch response; returns false when the watch must be re-established.
    fn apply_response(&self, response: &etcd_client::WatchResponse) {
        let (mut presence, mut newest_change) = (false, None);
        let rev = {
            let mut mirror = self.mirror();
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let Some(rel) = kv.key().strip_prefix(self.settings.prefix.as_bytes()) else {
                    continue;
                };
                let rel = String::from_utf8_lossy(rel);
                let rev = kv.mod_revision() as u64;
                let put = matches!(event.event_type(), EventType::Put);
                let (p, changed) = mirror.apply(&rel, put, kv.value(), rev);
                presence |= p;
                if changed {
                    newest_change = Some(rev);
                }
                mirror.rev = mirror.rev.max(rev);
            }
            mirror.rev
        };
        if let Some(change) = newest_change {
            self.bump(&self.head, change);
        }
        if presence {
            self.presence.send_modify(|n| *n += 1);
        }
        self.bump(&self.seen, rev);
    }

    /// Until the mirror has seen revision `rev` (bounded: false if it did not in time).
    async fn caught_up(&self, rev: u64) -> bool {
        let mut seen = self.seen.subscribe();
        let deadline = Instant::now() + WRITE_TIMEOUT;
        loop {
            if *seen.borrow_and_update() >= rev {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            let _ = timeout(Duration::from_millis(50), seen.changed()).await;
        }
    }

    /// Bring the mirror up to etcd's current value of `rel` (false: absent, etcd did not
    /// answer or the watch is behind).
    async fn sync_key(&self, rel: &str) -> bool {
        let mut client = self.client.clone();
        match bounded(client.get(self.key(rel), None)).await {
            Ok(response) => match response.kvs().first() {
                Some(kv) => self.caught_up(kv.mod_revision() as u64).await,
                None => false,
            },
            Err(_) => false,
        }
    }

    /// Decide with `decide` on the mirror and commit; decide again (up to MAX_TRIES) when
    /// another writer changed a key the decision read.
    async fn transact<T, E: From<StoreError>>(
        &self,
        mut decide: impl FnMut(&Mirror) -> Result<Plan<T>, E>,
    ) -> Result<(u64, T), E> {
        for _ in 0..MAX_TRIES {
            let plan = decide(&self.mirror())?;
            let compares: Vec<Compare> = plan
                .reads
                .0
                .iter()
                .map(|(k, rev)| Compare::mod_revision(self.key(k), CompareOp::Equal, *rev))
                .collect();
            let ops: Vec<TxnOp> = plan
                .ops
                .iter()
                .map(|(k, value)| match value {
                    Some(value) => TxnOp::put(self.key(k), value.clone(), None),
                    None => TxnOp::delete(self.key(k), None),
                })
                .collect();
            // On failure, the keys as they are now: the mirror waits for those revisions.
            let reread: Vec<TxnOp> = plan
                .reads
                .0
                .iter()
                .map(|(k, _)| TxnOp::get(self.key(k), None))
                .collect();
            let txn = Txn::new().when(compares).and_then(ops).or_else(reread);
            let response = write(|| {
                let mut client = self.client.clone();
                let txn = txn.clone();
                async move { client.txn(txn).await }
            })
            .await?;
            let rev = response.header().map_or(0, |h| h.revision()) as u64;
            if response.succeeded() {
                // Read-your-writes: the caller's next read of the mirror includes this.
                if !self.caught_up(rev).await {
                    tracing::warn!(rev, "etcd store: the watch is behind a write just made");
                }
                return Ok((rev, plan.value));
            }
            self.conflicts.fetch_add(1, Ordering::Relaxed);
            let mut newest = 0;
            let mut vanished = false;
            for (answer, (_, seen)) in response.op_responses().iter().zip(&plan.reads.0) {
                if let TxnOpResponse::Get(get) = answer {
                    match get.kvs().first() {
                        Some(kv) => newest = newest.max(kv.mod_revision() as u64),
                        None => vanished |= *seen != 0,
                    }
                }
            }
            tracing::debug!(rev, newest, "etcd store: lost a race, deciding again");
            if !self.caught_up(newest).await || vanished {
                // A deleted key's revision is not known: give the watch a moment.
                sleep(Duration::from_millis(20)).await;
            }
        }
        Err(StoreError::new(
            format!("lost the race to other gateways {MAX_TRIES} times: try again"),
            true,
        )
        .into())
    }

    async fn join_once(&self, txn: &JoinTxn) -> Result<(u64, (NodeRecord, IpAddr)), JoinError> {
        // After a lost race on an address, spread over the lowest free ones.
        let mut last_address: Option<IpAddr> = None;
        self.transact(|mirror| {
            let spread = last_address
                .is_some_and(|a| mirror.taken.contains(&a))
                .then(|| fastrand::usize(..join::SPREAD));
            let plan = plan_join(mirror, txn, spread)?;
            last_address = Some(plan.value.1);
            Ok::<_, JoinError>(plan)
        })
        .await
    }

    /// Changes in (from, to] read back from etcd with a watch (older than the ring).
    async fn history(
        &self,
        from: u64,
        to: u64,
    ) -> Result<Result<Vec<(u64, Change)>, Compacted>, StoreError> {
        let compacted = |error: &StoreError| error.message.contains("compacted");
        // The newest put under the prefix as of `to`: the watch has delivered everything
        // once it has delivered that (change keys are never deleted).
        let mut client = self.client.clone();
        let newest = bounded(
            client.get(
                self.settings.prefix.as_bytes(),
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_revision(to as i64)
                        .with_sort(SortTarget::Mod, SortOrder::Descend)
                        .with_limit(1)
                        .with_keys_only(),
                ),
            ),
        )
        .await;
        let newest = match newest {
            Ok(response) => response
                .kvs()
                .first()
                .map_or(0, |kv| kv.mod_revision() as u64),
            Err(error) if compacted(&error) => return Ok(Err(Compacted)),
            Err(error) => return Err(error),
        };
        if newest <= from {
            return Ok(Ok(Vec::new()));
        }
        let stream = bounded(
            client.watch(
                self.settings.prefix.as_bytes(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(from as i64 + 1),
                ),
            ),
        )
        .await?;
        let (_requests, mut responses) = stream.split();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let response = match timeout(left, responses.message()).await {
                Ok(response) => response.map_err(etcd_err)?,
                Err(_) => {
                    return Err(StoreError::new(
                        "reading old changes from etcd took too long",
                        true,
                    ));
                }
            };
            let Some(response) = response else {
                return Err(StoreError::new("etcd closed a watch", true));
            };
            if response.compact_revision() > 0 {
                let mut mirror = self.mirror();
                mirror.compacted = mirror.compacted.max(response.compact_revision() as u64);
                return Ok(Err(Compacted));
            }
            if response.canceled() {
                return Err(StoreError::new(
                    format!("etcd cancelled a watch: {}", response.cancel_reason()),
                    true,
                ));
            }
            let mut done = false;
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let rev = kv.mod_revision() as u64;
                done |= rev >= newest;
                if rev > to || !matches!(event.event_type(), EventType::Put) {
                    continue;
                }
                let Some(rel) = kv.key().strip_prefix(self.settings.prefix.as_bytes()) else {
                    continue;
                };
                if let Some(change) = parse_change(&String::from_utf8_lossy(rel), kv.value()) {
                    out.push((rev, change.map_err(json_err)?));
                }
            }
            if done {
                return Ok(Ok(out));
            }
        }
    }
}

/// Keeps the mirror current: one watch from the mirror's revision, re-established from the
/// last revision seen after any error (another member answers), reloaded after compaction.
async fn watch_task(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let from = shared.mirror().rev + 1;
        let mut client = shared.client.clone();
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(from as i64);
        match client
            .watch(shared.settings.prefix.as_bytes(), Some(options))
            .await
        {
            Ok(stream) => {
                let (_requests, mut responses) = stream.split();
                loop {
                    tokio::select! {
                        message = responses.message() => match message {
                            Ok(Some(response)) => {
                                if response.compact_revision() > 0 {
                                    tracing::info!(compacted = response.compact_revision(), "etcd store: the watch fell behind compaction, reloading");
                                    {
                                        let mut mirror = shared.mirror();
                                        mirror.compacted = mirror.compacted.max(response.compact_revision() as u64);
                                    }
                                    if let Err(error) = shared.load().await {
                                        tracing::warn!(%error, "etcd store: reload failed");
                                    }
                                    break;
                                }
                                if response.canceled() {
                                    tracing::debug!(reason = response.cancel_reason(), "etcd store: watch cancelled");
                                    break;
                                }
                                shared.apply_response(&response);
                                backoff = Duration::from_millis(100);
                            }
                            Ok(None) => break,
                            Err(error) => {
                                tracing::debug!(%error, "etcd store: watch stream failed");
                                break;
                            }
                        },
                    }
                }
            }
            Err(error) => tracing::debug!(%error, "etcd store: cannot watch"),
        }
        sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Keeps this gateway's presence alive; dropping it revokes the lease (a clean stop).
pub struct PresenceGuard {
    task: tokio::task::JoinHandle<()>,
    lease: Arc<AtomicI64>,
    client: Client,
    revoke_on_drop: AtomicBool,
}

impl PresenceGuard {
    /// Stop keeping the lease alive without revoking it: the presence expires after
    /// [`PRESENCE_TTL_S`], as after a SIGKILL.
    pub fn abandon(self) {
        self.revoke_on_drop.store(false, Ordering::Relaxed);
    }

    /// Revoke now and wait for it (a clean stop).
    pub async fn release(self) {
        self.revoke_on_drop.store(false, Ordering::Relaxed);
        self.task.abort();
        let mut client = self.client.clone();
        let _ = bounded(client.lease_revoke(self.lease.load(Ordering::Relaxed))).await;
    }
}

impl Drop for PresenceGuard {
    fn drop(&mut self) {
        self.task.abort();
        if self.revoke_on_drop.load(Ordering::Relaxed)
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let mut client = self.client.clone();
            let lease = self.lease.load(Ordering::Relaxed);
            runtime.spawn(async move {
                let _ = bounded(client.lease_revoke(lease)).await;
            });
        }
    }
}

async fn put_presence(shared: &Shared, presence: &GatewayPresence) -> Result<i64, StoreError> {
    let lease = write(|| {
        let mut client = shared.client.clone();
        async move { client.lease_grant(PRESENCE_TTL_S, None).await }
    })
    .await?
    .id();
    let body = serde_json::to_vec(presence).map_err(json_err)?;
    let key = shared.key(&format!("gateways/{}", presence.node_id.0));
    write(|| {
        let mut client = shared.client.clone();
        let (key, body) = (key.clone(), body.clone());
        async move {
            client
                .put(key, body, Some(PutOptions::new().with_lease(lease)))
                .await
        }
    })
    .await?;
    Ok(lease)
}

/// Keep the lease alive; after it expired (etcd without quorum for longer than the TTL),
/// register again under a new one.
async fn presence_task(shared: Arc<Shared>, presence: GatewayPresence, lease: Arc<AtomicI64>) {
    loop {
        let id = lease.load(Ordering::Relaxed);
        let mut client = shared.client.clone();
        let mut expired = false;
        if let Ok((mut keeper, mut answers)) = bounded(client.lease_keep_alive(id)).await {
            loop {
                if bounded(keeper.keep_alive()).await.is_err() {
                    break;
                }
                match timeout(WRITE_TIMEOUT, answers.message()).await {
                    Ok(Ok(Some(answer))) if answer.ttl() > 0 => {}
                    Ok(Ok(Some(_))) => {
                        expired = true;
                        break;
                    }
                    _ => break,
                }
                sleep(PRESENCE_KEEPALIVE).await;
            }
        }
        if expired {
            match put_presence(&shared, &presence).await {
                Ok(new) => lease.store(new, Ordering::Relaxed),
                Err(error) => tracing::debug!(%error, "etcd store: cannot register presence again"),
            }
        }
        sleep(Duration::from_secs(1)).await;
    }
}

fn refusal(refusal: Refusal) -> JoinError {
    match refusal {
        Refusal::UnknownToken => JoinError::UnknownToken,
        Refusal::TokenUsed => JoinError::TokenUsed,
        Refusal::TokenExpired => JoinError::TokenExpired,
        Refusal::PoolExhausted(pool) => JoinError::PoolExhausted(pool),
        Refusal::NameTaken(name) => JoinError::NameTaken(name),
        Refusal::NameInUse { name, node } => JoinError::NameInUse { name, node },
        Refusal::AddressTaken(a) => JoinError::AddressTaken(a),
        Refusal::AddressUnusable { address, pool } => JoinError::AddressUnusable { address, pool },
        Refusal::KeyRevoked(node) => JoinError::KeyRevoked(node),
        Refusal::KeyInUse(node) => JoinError::KeyInUse(node),
    }
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(json_err)
}

/// Decide one join on the mirror (see `core::coord::join`) and sign its record.
fn plan_join(
    mirror: &Mirror,
    txn: &JoinTxn,
    spread: Option<usize>,
) -> Result<Plan<(NodeRecord, IpAddr)>, JoinError> {
    let mut reads = Reads::default();
    let token_id = txn.token.as_ref().map(|c| c.id.clone());
    let token_doc: Option<TokenDoc> = token_id
        .as_ref()
        .and_then(|id| reads.json(mirror, &format!("tokens/{id}")));
    let token = token_doc.as_ref().and_then(|doc| {
        Some(join::TokenView {
            hash: unhex32(&doc.hash)?,
            expires_at: doc.expires_at,
            uses_left: doc.uses_left,
        })
    });
    let name_key = format!("names/{}", txn.name);
    let named = reads.id_at(mirror, &name_key).and_then(|id| {
        reads.read(mirror, &format!("nodes/{id}"));
        reads.read(mirror, &format!("records/{id}"));
        mirror.node_view(id).filter(|n| !n.revoked)
    });
    let key_key = wgkey_key(&txn.wg_key);
    let key_owner = reads.id_at(mirror, &key_key).and_then(|id| {
        reads.read(mirror, &format!("nodes/{id}"));
        reads.read(mirror, &format!("records/{id}"));
        mirror.node_view(id)
    });
    let next_node = reads.id_at(mirror, "meta/next_node").unwrap_or(1);
    let view = JoinView {
        token: token.as_ref(),
        named: named.as_ref(),
        key_owner: key_owner.as_ref(),
        taken: &mirror.taken,
        next_node,
    };
    let request = JoinRequest {
        token: txn.token.as_ref().map(|c| (c.id.as_str(), &c.hash)),
        name: &txn.name,
        wg_key: &txn.wg_key,
        requested_address: txn.requested_address,
        pool: txn.pool,
        reserved: &txn.reserved,
        spread,
    };
    let plan = join::decide(&view, &request, txn.now).map_err(refusal)?;
    let session = Some(hex(&txn.session_hash));
    let mut ops = Vec::new();
    let (node, address, serial) = match plan {
        JoinPlan::Rejoin {
            node,
            address,
            serial,
        } => {
            let mut meta = mirror
                .node(node.0)
                .ok_or_else(|| StoreError::new("a node vanished", true))?;
            meta.session_hash = session;
            ops.push((format!("nodes/{}", node.0), Some(to_json(&meta)?)));
            (node, address, serial)
        }
        JoinPlan::Rename {
            node,
            address,
            serial,
        } => {
            let mut meta = mirror
                .node(node.0)
                .ok_or_else(|| StoreError::new("a node vanished", true))?;
            let old = format!("names/{}", meta.name);
            if reads.id_at(mirror, &old) == Some(node.0) {
                ops.push((old, None));
            }
            meta.name = txn.name.clone();
            meta.session_hash = session;
            ops.push((name_key, Some(node.0.to_string().into_bytes())));
            ops.push((format!("nodes/{}", node.0), Some(to_json(&meta)?)));
            (node, address, serial)
        }
        JoinPlan::New {
            node,
            address,
            spend_token,
        } => {
            let ip_key = format!("ip/{address}");
            reads.read(mirror, &ip_key);
            let meta = NodeMeta {
                name: txn.name.clone(),
                address,
                wg_key: txn.wg_key.clone(),
                joined_at: txn.now,
                join_token: token_id.clone(),
                revoked: false,
                session_hash: session,
            };
            let id = node.0.to_string().into_bytes();
            ops.push((format!("nodes/{}", node.0), Some(to_json(&meta)?)));
            ops.push((name_key, Some(id.clone())));
            ops.push((key_key, Some(id.clone())));
            ops.push((ip_key, Some(id)));
            ops.push((
                "meta/next_node".to_owned(),
                Some((node.0 + 1).to_string().into_bytes()),
            ));
            if spend_token && let (Some(id), Some(mut doc)) = (&token_id, token_doc) {
                doc.uses_left -= 1;
                ops.push((format!("tokens/{id}"), Some(to_json(&doc)?)));
            }
            (node, address, 1)
        }
    };
    let record = (txn.sign)(node, address, serial).map_err(JoinError::Sign)?;
    ops.push((format!("records/{}", node.0), Some(to_json(&record)?)));
    Ok(Plan {
        reads,
        ops,
        value: (record, address),
    })
}

impl EtcdStore {
    /// Connects, reads `meta/store_id` (error if absent: run `clawnode gateway init`), loads
    /// the mirror and starts the watch task.
    pub async fn open(settings: &EtcdSettings) -> Result<Self, StoreError> {
        let client = connect(settings).await?;
        let reader = client.clone();
        let key = format!("{}meta/store_id", settings.prefix);
        let response = write(|| {
            let mut reader = reader.clone();
            let key = key.clone();
            async move { reader.get(key, None).await }
        })
        .await
        .map_err(|mut error| {
            if error.transient && settings.ca_file.is_some() {
                // etcd drops a connection whose client certificate it refuses without a
                // word the client can tell from a member going away.
                error.message.push_str(
                    " (if etcd is up: check etcd_ca_file, etcd_cert_file and etcd_key_file; etcd closes connections whose certificate it refuses)",
                );
            }
            error
        })?;
        let Some(kv) = response.kvs().first() else {
            return Err(StoreError::new(
                format!(
                    "no cluster under {}: run `clawnode gateway init`",
                    settings.prefix
                ),
                false,
            ));
        };
        let store_id = std::str::from_utf8(kv.value())
            .ok()
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| StoreError::new("meta/store_id is not a number", false))?;
        let shared = Arc::new(Shared {
            client,
            settings: settings.clone(),
            store_id,
            mirror: Mutex::default(),
            head: watch::Sender::new(0),
            seen: watch::Sender::new(0),
            presence: watch::Sender::new(0),
            join_lock: tokio::sync::Mutex::new(()),
            conflicts: AtomicU64::new(0),
            samples: Mutex::default(),
        });
        shared.load().await?;
        let task = tokio::spawn(watch_task(Arc::clone(&shared)));
        Ok(Self {
            shared,
            _tasks: Arc::new(Tasks(vec![task.abort_handle()])),
        })
    }

    /// `gateway init`: creates `meta/store_id` if absent (`Ok(false)` if another init got
    /// there first).
    pub async fn create(settings: &EtcdSettings, store_id: u64) -> Result<bool, StoreError> {
        let client = connect(settings).await?;
        let key = format!("{}meta/store_id", settings.prefix);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(key, store_id.to_string(), None),
                TxnOp::put(format!("{}meta/next_node", settings.prefix), "1", None),
            ]);
        let response = write(|| {
            let mut client = client.clone();
            let txn = txn.clone();
            async move { client.txn(txn).await }
        })
        .await?;
        Ok(response.succeeded())
    }

    /// The node a name or `n<id>` names, revoked or not (a live node first for a name).
    pub async fn find_node(&self, name_or_id: &str) -> Result<Option<NodeRow>, StoreError> {
        let id = name_or_id.parse::<NodeId>().ok();
        Ok(self
            .nodes()
            .await?
            .into_iter()
            .rev()
            .find(|row| Some(row.node_id) == id || (row.name == name_or_id && !row.revoked)))
    }

    /// Registers this gateway under a lease and keeps it alive until the guard is dropped.
    pub async fn register_presence(
        &self,
        presence: GatewayPresence,
    ) -> Result<PresenceGuard, StoreError> {
        let lease = Arc::new(AtomicI64::new(put_presence(&self.shared, &presence).await?));
        let task = tokio::spawn(presence_task(
            Arc::clone(&self.shared),
            presence,
            Arc::clone(&lease),
        ));
        Ok(PresenceGuard {
            task,
            lease,
            client: self.shared.client.clone(),
            revoke_on_drop: AtomicBool::new(true),
        })
    }

    /// The live gateways (from the mirror), by node id.
    pub fn gateways_alive(&self) -> Vec<GatewayPresence> {
        let mirror = self.shared.mirror();
        let mut alive: Vec<GatewayPresence> = mirror
            .dir("gateways/")
            .filter_map(|(_, e)| serde_json::from_slice(&e.value).ok())
            .collect();
        alive.sort_by_key(|p: &GatewayPresence| p.node_id);
        alive
    }

    /// Changes (its value counts up) whenever the set of live gateways may have changed.
    pub fn presence_changes(&self) -> watch::Receiver<u64> {
        self.shared.presence.subscribe()
    }

    /// Members, per-endpoint health and whether writes are possible now.
    pub async fn cluster(&self) -> ClusterDoc {
        let settings = &self.shared.settings;
        let mut doc = ClusterDoc {
            endpoints: settings.endpoints.clone(),
            prefix: settings.prefix.clone(),
            ..ClusterDoc::default()
        };
        let mut client = self.shared.client.clone();
        if let Ok(members) = bounded(client.member_list()).await {
            doc.members = members
                .members()
                .iter()
                .map(|m| MemberDoc {
                    name: m.name().to_owned(),
                    id: format!("{:x}", m.id()),
                    peer_urls: m.peer_urls().to_vec(),
                    client_urls: m.client_urls().to_vec(),
                })
                .collect();
        }
        for endpoint in &settings.endpoints {
            let one = EtcdSettings {
                endpoints: vec![endpoint.clone()],
                ..settings.clone()
            };
            let status = match connect(&one).await {
                Ok(mut client) => bounded(client.status()).await,
                Err(error) => Err(error),
            };
            doc.health.push(match status {
                Ok(status) => EndpointHealth {
                    endpoint: endpoint.clone(),
                    healthy: status.leader() != 0,
                    leader: (status.leader() != 0).then(|| format!("{:x}", status.leader())),
                    raft_term: Some(status.raft_term()),
                    db_size: Some(status.db_size()),
                    error: None,
                },
                Err(error) => EndpointHealth {
                    endpoint: endpoint.clone(),
                    error: Some(error.message),
                    ..EndpointHealth::default()
                },
            });
        }
        match self.quorum_read().await {
            Ok(_) => doc.writable = true,
            Err(error) => doc.reason = Some(error.message),
        }
        doc
    }

    /// One linearizable read through the shared client: it needs the leader and a quorum, as
    /// a write does, so it says whether writes can succeed now; returns etcd's revision.
    pub async fn quorum_read(&self) -> Result<u64, StoreError> {
        let mut client = self.shared.client.clone();
        let key = self.shared.key("meta/store_id");
        let response = bounded(client.get(key, Some(GetOptions::new().with_keys_only()))).await?;
        Ok(response.header().map_or(0, |h| h.revision()) as u64)
    }

    /// Every signer cert (from the mirror).
    pub fn signers(&self) -> Vec<SignerCert> {
        let mirror = self.shared.mirror();
        mirror
            .dir("signers/")
            .filter_map(|(_, e)| serde_json::from_slice(&e.value).ok())
            .collect()
    }

    /// One node's session hash (not revoked), from the mirror: cheaper than `sessions()`
    /// for a node that joined through another gateway a moment ago.
    pub fn session(&self, node: NodeId) -> Option<[u8; 32]> {
        self.shared.mirror().sessions.get(&node.0).copied()
    }

    /// Optimistic transactions that had to be decided again (another gateway wrote first).
    pub fn conflicts(&self) -> u64 {
        self.shared.conflicts.load(Ordering::Relaxed)
    }

    /// The revision the mirror reflects.
    pub fn mirror_revision(&self) -> u64 {
        self.shared.mirror().rev
    }

    /// Compact etcd to the newest revision both `keep` revisions behind the head and head at
    /// least `keep_for_s` ago (samples this process took); drop tokens expired that long.
    /// Returns how many revisions were compacted away.
    pub async fn compact_with(
        &self,
        now: u64,
        keep: u64,
        keep_for_s: u64,
    ) -> Result<u64, StoreError> {
        let (head, compacted) = {
            let mirror = self.shared.mirror();
            (mirror.rev, mirror.compacted)
        };
        let target = {
            let mut samples = self
                .shared
                .samples
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let spacing = (keep_for_s / (MAX_SAMPLES as u64 / 2)).max(1);
            if samples
                .back()
                .is_none_or(|(t, _)| now >= t + spacing || keep_for_s == 0)
            {
                samples.push_back((now, head));
            }
            let old_enough = now.saturating_sub(keep_for_s);
            let aged = samples
                .iter()
                .filter(|(t, _)| *t <= old_enough)
                .map(|(_, rev)| *rev)
                .max()
                .unwrap_or(0);
            // Keep the newest aged sample; drop the older ones and any beyond the cap.
            while samples.len() > 1 && samples.get(1).is_some_and(|(t, _)| *t <= old_enough) {
                samples.pop_front();
            }
            while samples.len() > MAX_SAMPLES {
                samples.pop_front();
            }
            aged.min(head.saturating_sub(keep))
        };
        let expired: Vec<String> = {
            let mirror = self.shared.mirror();
            mirror
                .dir("tokens/")
                .filter(|(_, e)| {
                    serde_json::from_slice::<TokenDoc>(&e.value)
                        .is_ok_and(|t| t.expires_at < now.saturating_sub(keep_for_s))
                })
                .map(|(k, _)| k.to_owned())
                .collect()
        };
        // In chunks under etcd's --max-txn-ops (128 by default); a failed clean-up must not
        // stop the compaction below, or history grows until etcd's space alarm.
        for chunk in expired.chunks(TXN_OPS_MAX) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|k| TxnOp::delete(self.shared.key(k), None))
                .collect();
            let txn = Txn::new().and_then(ops);
            let deleted = write(|| {
                let mut client = self.shared.client.clone();
                let txn = txn.clone();
                async move { client.txn(txn).await }
            })
            .await;
            if let Err(error) = deleted {
                tracing::warn!(component = "gateway", %error, "etcd store: expired tokens not deleted; compacting anyway");
                break;
            }
        }
        if target <= compacted {
            return Ok(0);
        }
        match write(|| {
            let mut client = self.shared.client.clone();
            async move {
                client
                    .compact(
                        target as i64,
                        Some(CompactionOptions::new().with_physical()),
                    )
                    .await
            }
        })
        .await
        {
            Ok(_) => {}
            // Another gateway compacted further already.
            Err(error) if error.message.contains("compacted") => {}
            Err(error) => return Err(error),
        }
        let mut mirror = self.shared.mirror();
        mirror.compacted = mirror.compacted.max(target);
        tracing::info!(revision = target, "etcd store: compacted");
        Ok(target - compacted)
    }
}

/// The documents under `dir` that `keep` lets through, parsed, in node-id order (the
/// mirror's key order is textual: "10" before "9").
fn parse_by_id<T: serde::de::DeserializeOwned>(
    mirror: &Mirror,
    dir: &str,
    keep: impl Fn(&str) -> bool,
) -> Result<Vec<T>, StoreError> {
    let by_id = |rel: &str| -> u64 {
        rel.split_once('/')
            .and_then(|(_, id)| id.parse().ok())
            .unwrap_or(0)
    };
    let mut parsed: Vec<(u64, T)> = Vec::new();
    for (rel, e) in mirror.dir(dir).filter(|(k, _)| keep(k)) {
        parsed.push((
            by_id(rel),
            serde_json::from_slice(&e.value).map_err(json_err)?,
        ));
    }
    parsed.sort_by_key(|(id, _)| *id);
    Ok(parsed.into_iter().map(|(_, v)| v).collect())
}

impl Store for EtcdStore {
    fn store_id(&self) -> u64 {
        self.shared.store_id
    }

    async fn snapshot(&self) -> Result<(u64, State), StoreError> {
        let mirror = self.shared.mirror();
        let mut state = State::default();
        let live = |rel: &str| -> bool {
            rel.split_once('/')
                .and_then(|(_, id)| id.parse::<u64>().ok())
                .and_then(|id| mirror.node(id))
                .is_some_and(|n| !n.revoked)
        };
        state.records = parse_by_id(&mirror, "records/", live)?;
        state.adverts = parse_by_id(&mirror, "adverts/", live)?;
        state.revocations = parse_by_id(&mirror, "revocations/", |_| true)?;
        for (_, e) in mirror.dir("signers/") {
            state
                .signers
                .push(serde_json::from_slice(&e.value).map_err(json_err)?);
        }
        Ok((mirror.last_change, state))
    }

    async fn changes_since(
        &self,
        rev: u64,
    ) -> Result<Result<Vec<(u64, Change)>, Compacted>, StoreError> {
        let (recent, ring_from) = {
            let mirror = self.shared.mirror();
            if rev < mirror.compacted {
                return Ok(Err(Compacted));
            }
            let start = mirror.ring.partition_point(|(r, _)| *r <= rev);
            let recent: Vec<(u64, Change)> = mirror.ring.range(start..).cloned().collect();
            (recent, mirror.ring_from)
        };
        if rev >= ring_from {
            return Ok(Ok(recent));
        }
        // Older than this gateway's memory (it started after the cursor): read them back.
        let mut older = match self.shared.history(rev, ring_from).await? {
            Ok(older) => older,
            Err(Compacted) => return Ok(Err(Compacted)),
        };
        older.extend(recent);
        Ok(Ok(older))
    }

    async fn wait(&self, rev: u64) -> Result<u64, StoreError> {
        let mut head = self.shared.head.subscribe();
        loop {
            let now = *head.borrow_and_update();
            if now > rev {
                return Ok(now);
            }
            if head.changed().await.is_err() {
                return Err(StoreError::new("the etcd store was closed", true));
            }
        }
    }

    async fn join(&self, txn: JoinTxn) -> Result<Joined, JoinError> {
        let _one_at_a_time = self.shared.join_lock.lock().await;
        let token_key = txn.token.as_ref().map(|c| format!("tokens/{}", c.id));
        let (rev, (record, _)) = match self.shared.join_once(&txn).await {
            // A token made a moment ago through another gateway or the CLI may not have
            // reached this mirror yet: catch up once before saying it does not exist.
            Err(JoinError::UnknownToken)
                if self
                    .shared
                    .sync_key(token_key.as_deref().unwrap_or_default())
                    .await =>
            {
                self.shared.join_once(&txn).await?
            }
            other => other?,
        };
        Ok(Joined { record, rev })
    }

    async fn put_advert(&self, advert: Advert) -> Result<u64, AdvertError> {
        let body = to_json(&advert)?;
        let id = advert.node_id.0;
        let (rev, ()) = self
            .shared
            .transact(|mirror| {
                let mut reads = Reads::default();
                let meta: Option<NodeMeta> = reads.json(mirror, &format!("nodes/{id}"));
                if meta.is_none_or(|m| m.revoked) {
                    return Err(AdvertError::UnknownNode);
                }
                let last = reads
                    .json::<Advert>(mirror, &format!("adverts/{id}"))
                    .map_or(0, |a| a.seq);
                if advert.seq <= last {
                    return Err(AdvertError::Stale {
                        got: advert.seq,
                        last,
                    });
                }
                Ok(Plan {
                    reads,
                    ops: vec![(format!("adverts/{id}"), Some(body.clone()))],
                    value: (),
                })
            })
            .await?;
        Ok(rev)
    }

    async fn revoke(&self, revocation: Revocation) -> Result<u64, StoreError> {
        let body = to_json(&revocation)?;
        let id = revocation.node_id.0;
        let (rev, ()) = self
            .shared
            .transact(|mirror| {
                let mut reads = Reads::default();
                let mut ops = Vec::new();
                if let Some(mut meta) = reads.json::<NodeMeta>(mirror, &format!("nodes/{id}")) {
                    let name = format!("names/{}", meta.name);
                    if reads.id_at(mirror, &name) == Some(id) {
                        ops.push((name, None));
                    }
                    meta.revoked = true;
                    meta.session_hash = None;
                    ops.push((format!("nodes/{id}"), Some(to_json(&meta)?)));
                }
                ops.push((format!("revocations/{id}"), Some(body.clone())));
                Ok::<_, StoreError>(Plan {
                    reads,
                    ops,
                    value: (),
                })
            })
            .await?;
        Ok(rev)
    }

    async fn put_record(&self, record: NodeRecord) -> Result<u64, StoreError> {
        let body = to_json(&record)?;
        let id = record.node_id.0;
        let (rev, ()) = self
            .shared
            .transact(|mirror| {
                let mut reads = Reads::default();
                let meta: Option<NodeMeta> = reads.json(mirror, &format!("nodes/{id}"));
                if meta.is_none_or(|m| m.revoked) {
                    return Err(StoreError::new("no such node (revoked?)", false));
                }
                Ok(Plan {
                    reads,
                    ops: vec![(format!("records/{id}"), Some(body.clone()))],
                    value: (),
                })
            })
            .await?;
        Ok(rev)
    }

    async fn put_signer(&self, cert: SignerCert) -> Result<u64, StoreError> {
        let body = to_json(&cert)?;
        let (rev, ()) = self
            .shared
            .transact(|_| {
                Ok::<_, StoreError>(Plan {
                    reads: Reads::default(),
                    ops: vec![(format!("signers/{}", cert.key_id), Some(body.clone()))],
                    value: (),
                })
            })
            .await?;
        Ok(rev)
    }

    async fn revision_now(&self) -> Result<u64, StoreError> {
        self.quorum_read().await
    }

    async fn session(&self, node: NodeId) -> Result<Option<[u8; 32]>, StoreError> {
        // Asked only when the view does not know this session: a node that joined (or joined
        // again) through another gateway a moment ago, which the mirror may not show yet. A
        // linearizable read sees it; without quorum the mirror is all there is.
        let mut client = self.shared.client.clone();
        let key = self.shared.key(&format!("nodes/{}", node.0));
        let Ok(response) = bounded(client.get(key, None)).await else {
            return Ok(EtcdStore::session(self, node));
        };
        let Some(kv) = response.kvs().first() else {
            return Ok(None);
        };
        let meta: NodeMeta = serde_json::from_slice(kv.value()).map_err(json_err)?;
        Ok(meta
            .session_hash
            .filter(|_| !meta.revoked)
            .as_deref()
            .and_then(unhex32))
    }

    async fn sessions(&self) -> Result<Vec<(NodeId, [u8; 32])>, StoreError> {
        let mirror = self.shared.mirror();
        Ok(mirror
            .sessions
            .iter()
            .map(|(id, hash)| (NodeId(*id), *hash))
            .collect())
    }

    async fn compact(&self, now: u64) -> Result<u64, StoreError> {
        self.compact_with(now, KEEP_CHANGES, KEEP_CHANGES_FOR_S)
            .await
    }

    async fn create_token(&self, token: NewToken) -> Result<(), StoreError> {
        let doc = TokenDoc {
            hash: hex(&token.hash),
            expires_at: token.expires_at,
            uses_left: i64::from(token.uses),
            created_at: token.now,
        };
        let key = self.shared.key(&format!("tokens/{}", token.id));
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, to_json(&doc)?, None)]);
        let response = write(|| {
            let mut client = self.shared.client.clone();
            let txn = txn.clone();
            async move { client.txn(txn).await }
        })
        .await?;
        if !response.succeeded() {
            return Err(StoreError::new(
                format!("a token with id {} exists already", token.id),
                false,
            ));
        }
        let rev = response.header().map_or(0, |h| h.revision()) as u64;
        self.shared.caught_up(rev).await;
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeRow>, StoreError> {
        let mirror = self.shared.mirror();
        let mut rows = Vec::new();
        for (rel, e) in mirror.dir("nodes/") {
            let Some(id) = rel
                .strip_prefix("nodes/")
                .and_then(|id| id.parse::<u64>().ok())
            else {
                continue;
            };
            let meta: NodeMeta = serde_json::from_slice(&e.value).map_err(json_err)?;
            let record: Option<NodeRecord> = mirror.json(&format!("records/{id}"));
            let advert: Option<Advert> = mirror.json(&format!("adverts/{id}"));
            rows.push(NodeRow {
                node_id: NodeId(id),
                name: meta.name,
                address: meta.address,
                wg_key: meta.wg_key,
                revoked: meta.revoked,
                serial: record.as_ref().map_or(0, |r| r.serial),
                not_after: record.as_ref().map_or(0, |r| r.not_after),
                joined_at: meta.joined_at,
                endpoints: advert.map(|a| a.endpoints).unwrap_or_default(),
            });
        }
        rows.sort_by_key(|r| r.node_id);
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::coord::KeyId;

    fn revocation(id: u64) -> Vec<u8> {
        serde_json::to_vec(&Revocation {
            node_id: NodeId(id),
            serial: 1,
            signer: KeyId([1; 8]),
            sig: [0; 64],
        })
        .unwrap()
    }

    #[test]
    fn only_change_keys_feed_the_ring_and_addresses_are_tracked() {
        let mut mirror = Mirror::default();
        assert_eq!(
            mirror.apply("revocations/3", true, &revocation(3), 7),
            (false, true)
        );
        assert_eq!(mirror.apply("tokens/aa", true, b"{}", 8), (false, false));
        assert_eq!(mirror.apply("gateways/1", true, b"{}", 9), (true, false));
        assert_eq!(mirror.apply("ip/10.1.0.2", true, b"3", 10), (false, false));
        assert!(
            mirror
                .taken
                .contains(&"10.1.0.2".parse::<IpAddr>().unwrap())
        );
        assert_eq!(mirror.ring.len(), 1);
        assert_eq!(mirror.ring[0].0, 7);
        assert_eq!(mirror.dir("revocations/").count(), 1);
        assert_eq!(mirror.dir("ip/").count(), 1);
        assert_eq!(mirror.apply("gateways/1", false, b"", 11), (true, false));
        assert_eq!(mirror.dir("gateways/").count(), 0);
    }

    #[test]
    fn a_full_ring_drops_whole_revisions_so_a_cursor_never_splits_one() {
        let mut mirror = Mirror::default();
        // Two changes in revision 1 (one transaction), then one per revision.
        mirror.apply("revocations/1", true, &revocation(1), 1);
        mirror.apply("revocations/2", true, &revocation(2), 1);
        for rev in 2..RING as u64 {
            mirror.apply("revocations/3", true, &revocation(3), rev);
        }
        assert_eq!(mirror.ring_from, 0);
        assert_eq!(mirror.ring.len(), RING);
        mirror.apply("revocations/3", true, &revocation(3), RING as u64);
        // Revision 1 went as a whole: the ring starts after it.
        assert_eq!(mirror.ring_from, 1);
        assert_eq!(mirror.ring.front().map(|(r, _)| *r), Some(2));
        assert_eq!(mirror.ring.len(), RING - 1);
    }

    #[test]
    fn stored_keys_and_hashes_round_trip() {
        assert_eq!(
            wgkey_key("ab+/cd=="),
            "wgkeys/ab-_cd",
            "keys in etcd paths carry no '/'"
        );
        let hash = [0xa5; 32];
        assert_eq!(unhex32(&hex(&hash)), Some(hash));
        assert_eq!(unhex32("zz"), None);
    }

    #[test]
    fn a_lost_quorum_is_a_transient_error_that_says_so() {
        let error = no_quorum("etcdserver: no leader");
        assert!(error.transient);
        assert!(
            error
                .message
                .starts_with("etcd has no quorum (etcdserver: no leader)")
        );
        assert!(error.message.contains("nodes keep their peers"));
    }
}
