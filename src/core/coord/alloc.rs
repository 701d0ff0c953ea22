//! Mesh address allocation.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

/// The lowest host address of `pool` that is neither `taken` nor `reserved` (the gateways'
/// own addresses), skipping the network address and, for IPv4, the broadcast address (except
/// in /31 and /32, which have none). `None` when the pool is full.
///
/// Revoked nodes' addresses must stay in `taken`: caches pin them to the revoked node, so a
/// new node given one would be refused by every node that saw the old one.
pub fn allocate(pool: IpNet, taken: &BTreeSet<IpAddr>, reserved: &[IpAddr]) -> Option<IpAddr> {
    let (first, last) = match pool {
        IpNet::V4(net) => {
            let (n, b) = (u32::from(net.network()), u32::from(net.broadcast()));
            if net.prefix_len() >= 31 {
                (u128::from(n), u128::from(b))
            } else {
                (u128::from(n) + 1, u128::from(b) - 1)
            }
        }
        IpNet::V6(net) => {
            let (n, b) = (u128::from(net.network()), u128::from(net.broadcast()));
            // The network address is the subnet-router anycast address.
            if net.prefix_len() >= 127 {
                (n, b)
            } else {
                (n + 1, b)
            }
        }
    };
    let make = |v: u128| -> IpAddr {
        match pool {
            IpNet::V4(_) => IpAddr::V4((v as u32).into()),
            IpNet::V6(_) => IpAddr::V6(v.into()),
        }
    };
    let used = |a: &IpAddr| taken.contains(a) || reserved.contains(a);
    // Walk the taken addresses in order from the pool's start: the first gap is the answer,
    // so the cost is the number of addresses in use, not the pool's size.
    let mut candidate = first;
    let mut in_pool = taken
        .range(make(first)..=make(last))
        .chain(reserved.iter().filter(|a| pool.contains(*a)))
        .copied()
        .collect::<Vec<_>>();
    in_pool.sort();
    in_pool.dedup();
    for a in in_pool {
        let v = match a {
            IpAddr::V4(v4) => u128::from(u32::from(v4)),
            IpAddr::V6(v6) => u128::from(v6),
        };
        if v < candidate {
            continue;
        }
        if v > candidate {
            break;
        }
        if candidate == last {
            return None;
        }
        candidate += 1;
    }
    let found = make(candidate);
    debug_assert!(!used(&found));
    (candidate <= last).then_some(found)
}
