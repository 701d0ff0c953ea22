//! The JSON bodies between gateway and node (`/v1/join`, `/v1/peers`, `/v1/self`,
//! `/v1/services/<name>`, errors). Everything parsed refuses unknown fields.

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::b64;
use super::cursor::Cursor;
use super::ids::{NodeId, Secret32, TokenId};
use super::record::{Advert, NodeRecord, Revocation, SignerCert};
use super::token::Session;
use crate::core::peer_diff::PeerKey;

/// `POST /v1/join`. `Debug` hides the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub token_id: TokenId,
    /// base64url, as in the token.
    pub token_secret: Secret32,
    /// The node's name, a DNS label.
    pub name: String,
    /// Standard base64, as `wg` shows it.
    #[serde(with = "b64::wg_key")]
    pub wg_key: PeerKey,
    /// Configured endpoints, if any; the gateway adds the source address it sees otherwise.
    pub endpoints: Vec<SocketAddr>,
    /// The node's configured `address`, if it has one; else the gateway allocates.
    pub requested_address: Option<IpAddr>,
}

/// The answer to a join: who the node is, its session bearer and its signed record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinResponse {
    pub node_id: NodeId,
    /// `"<node id>.<secret base64url>"`, sent as `Authorization: Bearer`.
    pub session: Session,
    pub record: NodeRecord,
    pub mesh_cidr: IpNet,
    pub gateways: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateKind {
    /// The whole state: replaces records and adverts (revocations and pins persist).
    Snapshot,
    /// What changed since the request's cursor; empty with the same cursor when nothing did.
    Delta,
}

/// `GET /v1/peers?cursor=<c>&wait=<s>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Update {
    pub cursor: Cursor,
    pub kind: UpdateKind,
    pub signers: Vec<SignerCert>,
    pub records: Vec<NodeRecord>,
    pub revocations: Vec<Revocation>,
    pub adverts: Vec<Advert>,
    /// The gateways' public URLs, so a node learns of new ones.
    pub gateways: Vec<String>,
}

impl Update {
    /// Nothing changed before the wait ran out.
    pub fn empty_delta(cursor: Cursor, gateways: Vec<String>) -> Self {
        Self {
            cursor,
            kind: UpdateKind::Delta,
            signers: Vec::new(),
            records: Vec::new(),
            revocations: Vec::new(),
            adverts: Vec::new(),
            gateways,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.signers.is_empty()
            && self.records.is_empty()
            && self.revocations.is_empty()
            && self.adverts.is_empty()
    }
}

/// `GET /v1/services/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAnswer {
    pub services: Vec<ServiceInstance>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceInstance {
    /// The service's name.
    pub name: String,
    /// The node's name.
    pub node: String,
    /// The node's mesh address.
    pub address: IpAddr,
    pub port: u16,
}

/// Every error answer. `retry`: whether trying the same request again later can help.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: String,
    pub retry: bool,
    /// On a 409 to `PUT /v1/self`: the advert seq the gateway holds, so a node whose clock
    /// stepped back continues above it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<u64>,
}
