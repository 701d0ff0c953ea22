//! The gateway's durable state behind one narrow trait, so sqlite today and etcd later serve
//! the same view: a snapshot, a change feed by revision, the join transaction, adverts,
//! revocations and re-signed records.

use std::future::Future;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::core::coord::{Advert, NodeId, NodeRecord, Revocation, SignerCert};

/// Changes kept at least this many (and at least [`KEEP_CHANGES_FOR_S`]); an older cursor
/// gets a snapshot.
pub const KEEP_CHANGES: u64 = 10_000;
pub const KEEP_CHANGES_FOR_S: u64 = 24 * 3600;

/// Everything a node may be sent: what a snapshot carries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    pub signers: Vec<SignerCert>,
    pub records: Vec<NodeRecord>,
    pub revocations: Vec<Revocation>,
    pub adverts: Vec<Advert>,
}

/// One entry of the change feed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "body", rename_all = "snake_case")]
pub enum Change {
    Record(NodeRecord),
    Advert(Advert),
    Revocation(Revocation),
    Signer(SignerCert),
}

/// The cursor is older than the oldest change kept: send a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("changes before this revision were compacted")]
pub struct Compacted;

/// What the store failed at; `transient` says whether retrying may help.
#[derive(Debug, thiserror::Error)]
#[error("gateway store: {message}")]
pub struct StoreError {
    pub message: String,
    pub transient: bool,
}

impl StoreError {
    pub fn new(message: impl Into<String>, transient: bool) -> Self {
        Self {
            message: message.into(),
            transient,
        }
    }
}

/// Signs the record of a node the join transaction has just placed: its id and address are
/// known only inside the transaction. `Fn`: an optimistic store (etcd) signs again when its
/// transaction lost a race and is decided anew.
pub type SignFn = Box<dyn Fn(NodeId, IpAddr, u64) -> Result<NodeRecord, String> + Send + Sync>;

/// One join, checked and applied in a single transaction.
pub struct JoinTxn {
    /// `None`: the gateway registers itself (no token).
    pub token: Option<TokenClaim>,
    pub now: u64,
    pub name: String,
    /// Standard base64, as `wg` shows it.
    pub wg_key: String,
    pub requested_address: Option<IpAddr>,
    /// SHA-256 of the new session secret; the secret itself is never stored.
    pub session_hash: [u8; 32],
    pub pool: IpNet,
    /// Never handed out (the gateways' own addresses).
    pub reserved: Vec<IpAddr>,
    pub sign: SignFn,
}

pub struct TokenClaim {
    pub id: String,
    pub hash: [u8; 32],
}

#[derive(Debug, Clone)]
pub struct Joined {
    pub record: NodeRecord,
    pub rev: u64,
}

/// Why a join was refused; the text is what the joining node shows its operator.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("unknown token")]
    UnknownToken,
    #[error("token already used")]
    TokenUsed,
    #[error("token expired")]
    TokenExpired,
    #[error("no free address left in the gateway's address pool {0}")]
    PoolExhausted(IpNet),
    #[error(
        "the name {0} belongs to another node (another WireGuard key): revoke it first (`clawnode gateway revoke {0}`) or choose another [node] name"
    )]
    NameTaken(String),
    #[error("name {name} is in use by {node}: revoke it first or pick another name")]
    NameInUse { name: String, node: NodeId },
    #[error("the requested address {0} is taken by another node")]
    AddressTaken(IpAddr),
    #[error(
        "the requested address {address} cannot be given out: it is outside the pool {pool}, the pool's network or broadcast address, or a gateway's address"
    )]
    AddressUnusable { address: IpAddr, pool: IpNet },
    #[error(
        "this WireGuard key belonged to revoked node {0}: remove <state_dir>/wireguard.key on the node so it makes a new one, then join again"
    )]
    KeyRevoked(NodeId),
    #[error(
        "this WireGuard key is already node {0}'s: every node needs its own (remove <state_dir>/wireguard.key on the node so it makes a new one)"
    )]
    KeyInUse(NodeId),
    #[error("could not sign the record: {0}")]
    Sign(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl JoinError {
    /// Whether the same request may succeed later (HTTP 503 rather than 403/409).
    pub fn retry(&self) -> bool {
        match self {
            JoinError::Store(e) => e.transient,
            JoinError::UnknownToken
            | JoinError::TokenUsed
            | JoinError::TokenExpired
            | JoinError::PoolExhausted(_)
            | JoinError::NameTaken(_)
            | JoinError::NameInUse { .. }
            | JoinError::AddressTaken(_)
            | JoinError::AddressUnusable { .. }
            | JoinError::KeyRevoked(_)
            | JoinError::KeyInUse(_)
            | JoinError::Sign(_) => false,
        }
    }
}

/// A node as `clawnode gateway nodes` lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeRow {
    pub node_id: NodeId,
    pub name: String,
    pub address: IpAddr,
    pub wg_key: String,
    pub revoked: bool,
    pub serial: u64,
    pub not_after: u64,
    pub joined_at: u64,
    pub endpoints: Vec<std::net::SocketAddr>,
}

/// Why an advert was refused.
#[derive(Debug, thiserror::Error)]
pub enum AdvertError {
    #[error("advert seq {got} is not above the last one ({last})")]
    Stale { got: u64, last: u64 },
    #[error("no such node (revoked or never joined)")]
    UnknownNode,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The store every gateway implementation provides. Async because etcd's will be; sqlite's
/// runs its statements on the blocking pool.
pub trait Store: Send + Sync + 'static {
    /// Random at `gateway init`: a cursor from another store is unknown here.
    fn store_id(&self) -> u64;
    fn snapshot(&self) -> impl Future<Output = Result<(u64, State), StoreError>> + Send;
    /// Every change with a revision above `rev`, oldest first, or `Compacted`.
    fn changes_since(
        &self,
        rev: u64,
    ) -> impl Future<Output = Result<Result<Vec<(u64, Change)>, Compacted>, StoreError>> + Send;
    /// Resolves once the head revision is above `rev` (written by this or another process).
    fn wait(&self, rev: u64) -> impl Future<Output = Result<u64, StoreError>> + Send;
    fn join(&self, txn: JoinTxn) -> impl Future<Output = Result<Joined, JoinError>> + Send;
    fn put_advert(&self, advert: Advert) -> impl Future<Output = Result<u64, AdvertError>> + Send;
    fn revoke(
        &self,
        revocation: Revocation,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Replace a node's record with a re-signed one (same key and addresses, higher serial).
    fn put_record(
        &self,
        record: NodeRecord,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    fn put_signer(&self, cert: SignerCert) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// The session hashes of the nodes not revoked, to authenticate their requests.
    fn sessions(&self) -> impl Future<Output = Result<Vec<(NodeId, [u8; 32])>, StoreError>> + Send;
    /// The store's newest revision now, read from the store itself (not a view of it): a
    /// cursor at or below it exists, so a view behind it is only lagging.
    fn revision_now(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// One node's session hash, `None` when it is revoked or unknown.
    fn session(
        &self,
        node: NodeId,
    ) -> impl Future<Output = Result<Option<[u8; 32]>, StoreError>> + Send;
    /// Drop changes past what must be kept (`KEEP_CHANGES`, `KEEP_CHANGES_FOR_S`).
    fn compact(&self, now: u64) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Admin: record a join token by its hash (the token itself is never stored).
    fn create_token(&self, token: NewToken) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Admin: every node, revoked ones too.
    fn nodes(&self) -> impl Future<Output = Result<Vec<NodeRow>, StoreError>> + Send;
}

/// A join token as stored: its id, the SHA-256 of its secret, expiry and uses.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub id: String,
    pub hash: [u8; 32],
    pub expires_at: u64,
    pub uses: u32,
    pub now: u64,
}
