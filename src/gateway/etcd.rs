//! The etcd store: several gateways on one etcd cluster serve one mesh. (First commit: the
//! public API other branches build against; bodies follow.)
#![allow(clippy::unused_async, unused_variables, dead_code)]

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::store::{
    AdvertError, Change, Compacted, JoinError, JoinTxn, Joined, NewToken, NodeRow, State, Store,
    StoreError,
};
use crate::core::coord::{Advert, NodeId, NodeRecord, Revocation, SignerCert};

/// Seconds a gateway's presence outlives its last keep-alive.
pub const PRESENCE_TTL_S: i64 = 10;

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
    pub id: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct EndpointHealth {
    pub endpoint: String,
    pub healthy: bool,
    /// The member id of the leader this endpoint follows (hex), when it has one.
    pub leader: Option<String>,
    pub raft_term: Option<u64>,
    pub db_size: Option<i64>,
    pub error: Option<String>,
}

/// Keeps this gateway's presence alive; dropping it revokes the lease (clean stop).
pub struct PresenceGuard {}

impl PresenceGuard {
    /// Stop keeping the lease alive without revoking it: the presence expires after
    /// [`PRESENCE_TTL_S`], as after a SIGKILL.
    pub fn abandon(self) {}
}

pub struct EtcdStore {}

impl EtcdStore {
    /// Connects, reads `meta/store_id`, loads the mirror and starts the watch task.
    pub async fn open(settings: &EtcdSettings) -> Result<Self, StoreError> {
        todo!()
    }

    /// `gateway init`: creates `meta/store_id` if absent (`Ok(false)` if another init got
    /// there first).
    pub async fn create(settings: &EtcdSettings, store_id: u64) -> Result<bool, StoreError> {
        todo!()
    }

    pub async fn find_node(&self, name_or_id: &str) -> Result<Option<NodeRow>, StoreError> {
        todo!()
    }

    pub async fn register_presence(
        &self,
        presence: GatewayPresence,
    ) -> Result<PresenceGuard, StoreError> {
        todo!()
    }

    pub fn gateways_alive(&self) -> Vec<GatewayPresence> {
        todo!()
    }

    pub fn presence_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        todo!()
    }

    pub async fn cluster(&self) -> ClusterDoc {
        todo!()
    }

    pub fn signers(&self) -> Vec<SignerCert> {
        todo!()
    }

    /// Compaction with explicit limits (tests; `compact` uses KEEP_CHANGES/KEEP_CHANGES_FOR_S).
    pub async fn compact_with(
        &self,
        now: u64,
        keep: u64,
        keep_for_s: u64,
    ) -> Result<u64, StoreError> {
        todo!()
    }

    /// Optimistic transactions that had to be decided again (another gateway wrote first).
    pub fn conflicts(&self) -> u64 {
        todo!()
    }
}

impl Store for EtcdStore {
    fn store_id(&self) -> u64 {
        todo!()
    }
    async fn snapshot(&self) -> Result<(u64, State), StoreError> {
        todo!()
    }
    async fn changes_since(
        &self,
        rev: u64,
    ) -> Result<Result<Vec<(u64, Change)>, Compacted>, StoreError> {
        todo!()
    }
    async fn wait(&self, rev: u64) -> Result<u64, StoreError> {
        todo!()
    }
    async fn join(&self, txn: JoinTxn) -> Result<Joined, JoinError> {
        todo!()
    }
    async fn put_advert(&self, advert: Advert) -> Result<u64, AdvertError> {
        todo!()
    }
    async fn revoke(&self, revocation: Revocation) -> Result<u64, StoreError> {
        todo!()
    }
    async fn put_record(&self, record: NodeRecord) -> Result<u64, StoreError> {
        todo!()
    }
    async fn put_signer(&self, cert: SignerCert) -> Result<u64, StoreError> {
        todo!()
    }
    async fn sessions(&self) -> Result<Vec<(NodeId, [u8; 32])>, StoreError> {
        todo!()
    }
    async fn compact(&self, now: u64) -> Result<u64, StoreError> {
        todo!()
    }
    async fn create_token(&self, token: NewToken) -> Result<(), StoreError> {
        todo!()
    }
    async fn nodes(&self) -> Result<Vec<NodeRow>, StoreError> {
        todo!()
    }
}
