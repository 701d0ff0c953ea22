//! The join decision, pure: given what the store holds about a join's token, name, key and
//! addresses, what the join does or why it is refused. The etcd store decides with it and
//! commits the plan in one transaction that compares every key it read; the rules are those of
//! the sqlite store's `join_in` (same order, same refusals).

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

use super::NodeId;

/// How long after a token join a retry of it (same token, name and key: its answer was lost)
/// gets the node back. Bounded, so that holders of a shared multi-use token cannot take over
/// one another's nodes later with the public name and key.
pub const JOIN_RETRY_WINDOW_S: u64 = 600;

/// How many of the lowest free addresses a join picks among after losing a race on one.
pub const SPREAD: usize = 8;

/// A stored join token.
#[derive(Debug, Clone)]
pub struct TokenView {
    pub hash: [u8; 32],
    pub expires_at: u64,
    pub uses_left: i64,
}

/// A stored node, as far as the decision needs it.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub node_id: NodeId,
    pub wg_key: String,
    pub address: IpAddr,
    /// Of its current record.
    pub serial: u64,
    pub join_token: Option<String>,
    pub joined_at: u64,
    pub revoked: bool,
}

/// What the store holds that the join depends on.
#[derive(Debug, Clone, Copy)]
pub struct JoinView<'a> {
    /// The token the request names, if stored.
    pub token: Option<&'a TokenView>,
    /// The live (not revoked) node of the requested name.
    pub named: Option<&'a NodeView>,
    /// The newest node ever given the requested key (revoked or not).
    pub key_owner: Option<&'a NodeView>,
    /// Every address ever handed out (revoked nodes' too).
    pub taken: &'a BTreeSet<IpAddr>,
    /// The id a new node gets: ids are never reused.
    pub next_node: u64,
}

/// The request, without its secrets.
#[derive(Debug, Clone)]
pub struct JoinRequest<'a> {
    /// Token id and the SHA-256 of its secret; `None`: the gateway registers itself.
    pub token: Option<(&'a str, &'a [u8; 32])>,
    pub name: &'a str,
    pub wg_key: &'a str,
    pub requested_address: Option<IpAddr>,
    pub pool: IpNet,
    pub reserved: &'a [IpAddr],
    /// After a lost race on an address: pick the `n % SPREAD`-th lowest free one instead of
    /// the lowest, so racing gateways stop colliding.
    pub spread: Option<usize>,
}

/// What the join does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JoinPlan {
    /// The node of that name and key again (the gateway's own restart, or a retry of the
    /// token join whose answer was lost): re-signed with `serial`, a fresh session, no token
    /// use.
    Rejoin {
        node: NodeId,
        address: IpAddr,
        serial: u64,
    },
    /// The gateway's own node under a new `[node] name`: same id, key and address.
    Rename {
        node: NodeId,
        address: IpAddr,
        serial: u64,
    },
    /// A new node; `spend_token`: one use of the token is taken.
    New {
        node: NodeId,
        address: IpAddr,
        spend_token: bool,
    },
}

/// Why the join is refused (the store's `JoinError` without its I/O cases).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    UnknownToken,
    TokenUsed,
    TokenExpired,
    PoolExhausted(IpNet),
    NameTaken(String),
    NameInUse { name: String, node: NodeId },
    AddressTaken(IpAddr),
    AddressUnusable { address: IpAddr, pool: IpNet },
    KeyRevoked(NodeId),
    KeyInUse(NodeId),
}

/// Constant-time: a token's hash must not be guessable byte by byte from response times.
fn same_hash(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `address` is one `allocate` could hand out from `pool`: inside it, and not its
/// network or (IPv4) broadcast address unless the pool is a point-to-point /31 or /127.
pub fn assignable(pool: IpNet, address: IpAddr) -> bool {
    if !pool.contains(&address) {
        return false;
    }
    match pool {
        IpNet::V4(net) => {
            net.prefix_len() >= 31
                || (address != IpAddr::V4(net.network()) && address != IpAddr::V4(net.broadcast()))
        }
        IpNet::V6(net) => net.prefix_len() >= 127 || address != IpAddr::V6(net.network()),
    }
}

fn is_retry_of(node: &NodeView, token_id: &str, now: u64) -> bool {
    node.join_token.as_deref() == Some(token_id)
        && node.joined_at >= now.saturating_sub(JOIN_RETRY_WINDOW_S)
}

/// The lowest free address, or after a lost race one of the [`SPREAD`] lowest.
fn pick_address(view: &JoinView<'_>, request: &JoinRequest<'_>) -> Option<IpAddr> {
    let first = super::allocate(request.pool, view.taken, request.reserved)?;
    let Some(n) = request.spread else {
        return Some(first);
    };
    let mut candidates = vec![first];
    let mut reserved = request.reserved.to_vec();
    while candidates.len() < SPREAD {
        reserved.push(candidates[candidates.len() - 1]);
        match super::allocate(request.pool, view.taken, &reserved) {
            Some(next) => candidates.push(next),
            None => break,
        }
    }
    Some(candidates[n % candidates.len()])
}

/// Decide a join. Same order of checks as the sqlite store: token (unknown, expired, spent
/// unless this is a retry), the live node of that name, the token's uses, the key's owner,
/// then the address.
pub fn decide(
    view: &JoinView<'_>,
    request: &JoinRequest<'_>,
    now: u64,
) -> Result<JoinPlan, Refusal> {
    let uses_left = match request.token {
        None => 0,
        Some((id, hash)) => {
            let token = view.token.ok_or(Refusal::UnknownToken)?;
            if !same_hash(&token.hash, hash) {
                return Err(Refusal::UnknownToken);
            }
            if now > token.expires_at {
                return Err(Refusal::TokenExpired);
            }
            let retry = view
                .named
                .is_some_and(|node| node.wg_key == request.wg_key && is_retry_of(node, id, now));
            if token.uses_left <= 0 && !retry {
                return Err(Refusal::TokenUsed);
            }
            token.uses_left
        }
    };
    // A live node of that name. Only the gateway's own start-up (no token) and a retry of the
    // token join that made it get it back; any other token join would take over the node's
    // session with nothing but its public name and key.
    if let Some(node) = view.named {
        let retry = match request.token {
            None => true,
            Some((id, _)) => is_retry_of(node, id, now),
        };
        if !retry || node.wg_key != request.wg_key {
            return Err(match request.token {
                Some(_) => Refusal::NameInUse {
                    name: request.name.to_owned(),
                    node: node.node_id,
                },
                None => Refusal::NameTaken(request.name.to_owned()),
            });
        }
        if request.requested_address.is_some_and(|a| a != node.address) {
            return Err(Refusal::AddressTaken(node.address));
        }
        return Ok(JoinPlan::Rejoin {
            node: node.node_id,
            address: node.address,
            serial: node.serial + 1,
        });
    }
    if request.token.is_some() && uses_left <= 0 {
        return Err(Refusal::TokenUsed);
    }
    // One key, one node, for ever: a revoked node must not come back with a new token, and
    // two nodes with one key would steal each other's WireGuard traffic.
    if let Some(owner) = view.key_owner {
        if !owner.revoked && request.token.is_none() {
            // The gateway's own node after its `[node] name` changed: same key, same node.
            if request
                .requested_address
                .is_some_and(|a| a != owner.address)
            {
                return Err(Refusal::KeyInUse(owner.node_id));
            }
            return Ok(JoinPlan::Rename {
                node: owner.node_id,
                address: owner.address,
                serial: owner.serial + 1,
            });
        }
        return Err(if owner.revoked {
            Refusal::KeyRevoked(owner.node_id)
        } else {
            Refusal::KeyInUse(owner.node_id)
        });
    }
    let address = match request.requested_address {
        Some(wanted) => {
            if !assignable(request.pool, wanted) || request.reserved.contains(&wanted) {
                return Err(Refusal::AddressUnusable {
                    address: wanted,
                    pool: request.pool,
                });
            }
            if view.taken.contains(&wanted) {
                return Err(Refusal::AddressTaken(wanted));
            }
            wanted
        }
        None => pick_address(view, request).ok_or(Refusal::PoolExhausted(request.pool))?,
    };
    Ok(JoinPlan::New {
        node: NodeId(view.next_node),
        address,
        spend_token: request.token.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;
    const HASH: [u8; 32] = [7; 32];

    fn pool() -> IpNet {
        "100.64.0.0/29".parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn token(uses_left: i64) -> TokenView {
        TokenView {
            hash: HASH,
            expires_at: NOW + 60,
            uses_left,
        }
    }

    fn node(id: u64, key: &str, address: &str, joined_at: u64) -> NodeView {
        NodeView {
            node_id: NodeId(id),
            wg_key: key.to_owned(),
            address: ip(address),
            serial: 3,
            join_token: Some("t1".to_owned()),
            joined_at,
            revoked: false,
        }
    }

    fn request<'a>(token: Option<&'a [u8; 32]>, name: &'a str, key: &'a str) -> JoinRequest<'a> {
        JoinRequest {
            token: token.map(|hash| ("t1", hash)),
            name,
            wg_key: key,
            requested_address: None,
            pool: pool(),
            reserved: &[],
            spread: None,
        }
    }

    fn view<'a>(taken: &'a BTreeSet<IpAddr>) -> JoinView<'a> {
        JoinView {
            token: None,
            named: None,
            key_owner: None,
            taken,
            next_node: 5,
        }
    }

    #[test]
    fn a_new_node_gets_the_next_id_and_the_lowest_free_address_and_spends_a_use() {
        let taken = BTreeSet::from([ip("100.64.0.1"), ip("100.64.0.3")]);
        let t = token(1);
        let v = JoinView {
            token: Some(&t),
            ..view(&taken)
        };
        assert_eq!(
            decide(&v, &request(Some(&HASH), "a", "k"), NOW),
            Ok(JoinPlan::New {
                node: NodeId(5),
                address: ip("100.64.0.2"),
                spend_token: true
            })
        );
    }

    #[test]
    fn a_token_must_exist_match_its_secret_be_unexpired_and_have_uses_left() {
        let taken = BTreeSet::new();
        let wrong = [8; 32];
        assert_eq!(
            decide(&view(&taken), &request(Some(&HASH), "a", "k"), NOW),
            Err(Refusal::UnknownToken)
        );
        let t = token(1);
        let v = JoinView {
            token: Some(&t),
            ..view(&taken)
        };
        assert_eq!(
            decide(&v, &request(Some(&wrong), "a", "k"), NOW),
            Err(Refusal::UnknownToken)
        );
        assert_eq!(
            decide(&v, &request(Some(&HASH), "a", "k"), NOW + 61),
            Err(Refusal::TokenExpired)
        );
        let spent = token(0);
        let v = JoinView {
            token: Some(&spent),
            ..view(&taken)
        };
        assert_eq!(
            decide(&v, &request(Some(&HASH), "a", "k"), NOW),
            Err(Refusal::TokenUsed)
        );
    }

    #[test]
    fn a_retry_within_the_window_gets_its_node_back_even_with_the_token_spent() {
        let taken = BTreeSet::from([ip("100.64.0.1")]);
        let spent = token(0);
        let mine = node(2, "k", "100.64.0.1", NOW - 10);
        let v = JoinView {
            token: Some(&spent),
            named: Some(&mine),
            key_owner: Some(&mine),
            ..view(&taken)
        };
        assert_eq!(
            decide(&v, &request(Some(&HASH), "a", "k"), NOW),
            Ok(JoinPlan::Rejoin {
                node: NodeId(2),
                address: ip("100.64.0.1"),
                serial: 4
            })
        );
        // Another key under that name: the spent token is what the joiner is told first.
        assert_eq!(
            decide(&v, &request(Some(&HASH), "a", "other"), NOW),
            Err(Refusal::TokenUsed)
        );
        // Past the window: not a retry.
        let fresh = TokenView {
            expires_at: NOW + 3600,
            ..token(1)
        };
        let v = JoinView {
            token: Some(&fresh),
            ..v
        };
        assert_eq!(
            decide(
                &v,
                &request(Some(&HASH), "a", "k"),
                NOW + JOIN_RETRY_WINDOW_S + 20
            ),
            Err(Refusal::NameInUse {
                name: "a".into(),
                node: NodeId(2)
            })
        );
    }

    #[test]
    fn the_gateway_rejoins_by_name_and_is_renamed_by_key_but_never_takes_another_key() {
        let taken = BTreeSet::from([ip("100.64.0.1")]);
        let mine = node(1, "k", "100.64.0.1", 0);
        let v = JoinView {
            named: Some(&mine),
            key_owner: Some(&mine),
            ..view(&taken)
        };
        assert_eq!(
            decide(&v, &request(None, "gw", "k"), NOW),
            Ok(JoinPlan::Rejoin {
                node: NodeId(1),
                address: ip("100.64.0.1"),
                serial: 4
            })
        );
        assert_eq!(
            decide(&v, &request(None, "gw", "other"), NOW),
            Err(Refusal::NameTaken("gw".into()))
        );
        let renamed = JoinView { named: None, ..v };
        assert_eq!(
            decide(&renamed, &request(None, "gw2", "k"), NOW),
            Ok(JoinPlan::Rename {
                node: NodeId(1),
                address: ip("100.64.0.1"),
                serial: 4
            })
        );
        let mut moved = request(None, "gw2", "k");
        moved.requested_address = Some(ip("100.64.0.2"));
        assert_eq!(
            decide(&renamed, &moved, NOW),
            Err(Refusal::KeyInUse(NodeId(1)))
        );
    }

    #[test]
    fn a_revoked_or_live_key_cannot_join_under_a_new_name_with_a_token() {
        let taken = BTreeSet::from([ip("100.64.0.1")]);
        let t = token(1);
        let owner = node(1, "k", "100.64.0.1", 0);
        let v = JoinView {
            token: Some(&t),
            key_owner: Some(&owner),
            ..view(&taken)
        };
        assert_eq!(
            decide(&v, &request(Some(&HASH), "b", "k"), NOW),
            Err(Refusal::KeyInUse(NodeId(1)))
        );
        let revoked = NodeView {
            revoked: true,
            ..owner.clone()
        };
        let v = JoinView {
            key_owner: Some(&revoked),
            ..v
        };
        assert_eq!(
            decide(&v, &request(Some(&HASH), "b", "k"), NOW),
            Err(Refusal::KeyRevoked(NodeId(1)))
        );
    }

    #[test]
    fn a_requested_address_must_be_assignable_unreserved_and_free() {
        let taken = BTreeSet::from([ip("100.64.0.1")]);
        let t = token(1);
        let v = JoinView {
            token: Some(&t),
            ..view(&taken)
        };
        let reserved = [ip("100.64.0.6")];
        for (wanted, refusal) in [
            ("100.64.0.0", "unusable"),
            ("100.64.0.7", "unusable"),
            ("100.64.1.1", "unusable"),
            ("100.64.0.6", "unusable"),
            ("100.64.0.1", "taken"),
        ] {
            let mut r = request(Some(&HASH), "b", "k");
            r.reserved = &reserved;
            r.requested_address = Some(ip(wanted));
            let got = decide(&v, &r, NOW);
            match refusal {
                "taken" => assert_eq!(got, Err(Refusal::AddressTaken(ip(wanted)))),
                _ => assert!(
                    matches!(got, Err(Refusal::AddressUnusable { .. })),
                    "{wanted}: {got:?}"
                ),
            }
        }
        let mut r = request(Some(&HASH), "b", "k");
        r.requested_address = Some(ip("100.64.0.4"));
        assert!(matches!(
            decide(&v, &r, NOW),
            Ok(JoinPlan::New { address, .. }) if address == ip("100.64.0.4")
        ));
    }

    #[test]
    fn a_full_pool_is_refused_and_a_lost_race_spreads_over_the_lowest_free_addresses() {
        let t = token(1);
        let full: BTreeSet<IpAddr> = (1..=6).map(|i| ip(&format!("100.64.0.{i}"))).collect();
        let v = JoinView {
            token: Some(&t),
            ..view(&full)
        };
        assert_eq!(
            decide(&v, &request(Some(&HASH), "b", "k"), NOW),
            Err(Refusal::PoolExhausted(pool()))
        );
        let taken = BTreeSet::from([ip("100.64.0.1")]);
        let v = JoinView {
            token: Some(&t),
            ..view(&taken)
        };
        let picked: BTreeSet<IpAddr> = (0..SPREAD)
            .filter_map(|n| {
                let mut r = request(Some(&HASH), "b", "k");
                r.spread = Some(n);
                match decide(&v, &r, NOW) {
                    Ok(JoinPlan::New { address, .. }) => Some(address),
                    _ => None,
                }
            })
            .collect();
        // 100.64.0.2 ..= .6: the five free addresses, each reachable.
        assert_eq!(picked.len(), 5);
        assert!(!picked.contains(&ip("100.64.0.1")));
    }
}
