//! The peer diff: what to send to a WireGuard device so its peers match the configuration,
//! touching nothing that already matches (the `wg syncconf` rule), so unchanged peers keep
//! their sessions.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use ipnet::IpNet;
use zeroize::Zeroize;

/// A WireGuard public key: 32 bytes. Public, so it may be shown and logged.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerKey(pub [u8; 32]);

impl std::fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Enough to tell peers apart in a log line, as `wg show` does.
        write!(
            f,
            "PeerKey({:02x}{:02x}{:02x}{:02x}…)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

/// A preshared key. Secret: zeroized on drop, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Psk(pub [u8; 32]);

impl Drop for Psk {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Psk(<redacted>)")
    }
}

/// One peer as configured, or as read back from a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub key: PeerKey,
    pub endpoint: Option<SocketAddr>,
    /// Kept sorted and without duplicates, so equal sets compare equal.
    pub allowed_ips: Vec<IpNet>,
    /// Seconds; `None` is off.
    pub keepalive: Option<u16>,
    pub psk: Option<Psk>,
}

impl PeerSpec {
    pub fn new(key: PeerKey, mut allowed_ips: Vec<IpNet>) -> Self {
        allowed_ips.sort();
        allowed_ips.dedup();
        Self {
            key,
            endpoint: None,
            allowed_ips,
            keepalive: None,
            psk: None,
        }
    }
}

pub type PeerMap = BTreeMap<PeerKey, PeerSpec>;

/// A change to one existing peer; only the flagged fields are sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerUpdate {
    pub spec: PeerSpec,
    pub endpoint: bool,
    pub allowed_ips: bool,
    pub keepalive: bool,
    pub psk: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerDiff {
    pub add: Vec<PeerSpec>,
    pub update: Vec<PeerUpdate>,
    pub remove: Vec<PeerKey>,
}

impl PeerDiff {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.update.is_empty() && self.remove.is_empty()
    }

    pub fn len(&self) -> usize {
        self.add.len() + self.update.len() + self.remove.len()
    }
}

/// What to change so that a device holding `current` holds `desired`.
///
/// `applied` is what clawnode itself last sent. It decides endpoints: WireGuard moves a peer's
/// endpoint to wherever its authenticated packets come from (roaming, NAT), so a device
/// endpoint that differs from the configured one is not drift. The configured endpoint is
/// sent again only when the configuration changed it since the last apply, or when the peer is
/// new to the device.
pub fn diff(current: &PeerMap, desired: &PeerMap, applied: &PeerMap) -> PeerDiff {
    let mut out = PeerDiff::default();
    for (key, want) in desired {
        let Some(have) = current.get(key) else {
            out.add.push(want.clone());
            continue;
        };
        let reference = applied.get(key).map_or(have.endpoint, |a| a.endpoint);
        let update = PeerUpdate {
            spec: want.clone(),
            endpoint: want.endpoint.is_some() && want.endpoint != reference,
            allowed_ips: want.allowed_ips != have.allowed_ips,
            keepalive: want.keepalive != have.keepalive,
            psk: want.psk != have.psk,
        };
        if update.endpoint || update.allowed_ips || update.keepalive || update.psk {
            out.update.push(update);
        }
    }
    out.remove = current
        .keys()
        .filter(|key| !desired.contains_key(key))
        .copied()
        .collect();
    out
}

/// The peers a device holds after `diff` was applied to `current`: the model the property
/// tests check `diff` against, and how the fast path tracks the device without reading it.
pub fn apply(current: &PeerMap, diff: &PeerDiff) -> PeerMap {
    let mut next = current.clone();
    for key in &diff.remove {
        next.remove(key);
    }
    for spec in &diff.add {
        next.insert(spec.key, spec.clone());
    }
    for update in &diff.update {
        let Some(peer) = next.get_mut(&update.spec.key) else {
            continue;
        };
        if update.endpoint {
            peer.endpoint = update.spec.endpoint;
        }
        if update.allowed_ips {
            peer.allowed_ips = update.spec.allowed_ips.clone();
        }
        if update.keepalive {
            peer.keepalive = update.spec.keepalive;
        }
        if update.psk {
            peer.psk = update.spec.psk.clone();
        }
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(n: u8) -> PeerKey {
        PeerKey([n; 32])
    }

    fn peer(n: u8) -> PeerSpec {
        let mut p = PeerSpec::new(key(n), vec![format!("10.100.0.{n}/32").parse().unwrap()]);
        p.endpoint = Some(format!("192.0.2.{n}:51820").parse().unwrap());
        p
    }

    fn map(peers: impl IntoIterator<Item = PeerSpec>) -> PeerMap {
        peers.into_iter().map(|p| (p.key, p)).collect()
    }

    #[test]
    fn unchanged_peers_are_not_touched() {
        let peers = map((1..=3).map(peer));
        assert!(diff(&peers, &peers, &peers).is_empty());
    }

    #[test]
    fn adding_removing_and_changing_one_peer_touches_only_that_peer() {
        let current = map((1..=3).map(peer));
        let mut desired = current.clone();
        desired.remove(&key(2));
        desired.insert(key(4), peer(4));
        desired.get_mut(&key(3)).unwrap().keepalive = Some(25);
        let d = diff(&current, &desired, &current);
        assert_eq!(d.add, vec![peer(4)]);
        assert_eq!(d.remove, vec![key(2)]);
        assert_eq!(d.update.len(), 1);
        let u = &d.update[0];
        assert_eq!(u.spec.key, key(3));
        assert!(u.keepalive && !u.endpoint && !u.allowed_ips && !u.psk);
    }

    #[test]
    fn a_roamed_endpoint_is_not_reset_when_the_config_did_not_change() {
        let applied = map([peer(1)]);
        let mut device = applied.clone();
        device.get_mut(&key(1)).unwrap().endpoint = Some("198.51.100.7:40000".parse().unwrap());
        assert!(diff(&device, &applied, &applied).is_empty());
    }

    #[test]
    fn a_configured_endpoint_change_is_sent() {
        let applied = map([peer(1)]);
        let mut desired = applied.clone();
        desired.get_mut(&key(1)).unwrap().endpoint = Some("203.0.113.1:51820".parse().unwrap());
        let d = diff(&applied, &desired, &applied);
        assert!(d.update[0].endpoint);
    }

    #[test]
    fn a_peer_removed_behind_our_back_is_added_back_whole() {
        let desired = map((1..=2).map(peer));
        let device = map([peer(1)]);
        let d = diff(&device, &desired, &desired);
        assert_eq!(d.add, vec![peer(2)]);
        assert!(d.update.is_empty() && d.remove.is_empty());
    }

    #[test]
    fn dropping_a_psk_or_keepalive_from_the_config_clears_it_on_the_device() {
        let mut with = peer(1);
        with.psk = Some(Psk([7; 32]));
        with.keepalive = Some(25);
        let current = map([with]);
        let desired = map([peer(1)]);
        let d = diff(&current, &desired, &current);
        assert!(d.update[0].psk && d.update[0].keepalive);
        assert_eq!(apply(&current, &d), desired);
    }

    #[test]
    fn psk_never_shows_in_debug_output() {
        let mut p = peer(1);
        p.psk = Some(Psk([0xAB; 32]));
        let text = format!("{p:?}");
        assert!(text.contains("<redacted>"));
        assert!(!text.contains("171"));
    }

    fn arb_peer() -> impl Strategy<Value = PeerSpec> {
        (
            0u8..12,
            proptest::option::of(0u8..4),
            proptest::collection::vec(0u8..6, 1..4),
            proptest::option::of(prop_oneof![Just(10u16), Just(25u16)]),
            proptest::option::of(0u8..3),
        )
            .prop_map(|(k, ep, ips, keepalive, psk)| {
                let ips = ips
                    .into_iter()
                    .map(|i| format!("10.{k}.{i}.0/24").parse().unwrap())
                    .collect();
                let mut p = PeerSpec::new(key(k), ips);
                p.endpoint = ep.map(|e| format!("192.0.2.{e}:51820").parse().unwrap());
                p.keepalive = keepalive;
                p.psk = psk.map(|s| Psk([s; 32]));
                p
            })
    }

    fn arb_map() -> impl Strategy<Value = PeerMap> {
        proptest::collection::vec(arb_peer(), 0..10).prop_map(map)
    }

    proptest! {
        #[test]
        fn applying_the_diff_yields_the_desired_peers(current in arb_map(), desired in arb_map()) {
            // First apply after start: nothing applied yet, the device is the reference.
            let d = diff(&current, &desired, &PeerMap::new());
            let next = apply(&current, &d);
            let endpoints_agree = |a: &PeerMap, b: &PeerMap| a.iter().all(|(k, p)| {
                p.endpoint.is_none() || b.get(k).map(|q| q.endpoint) == Some(p.endpoint)
            });
            prop_assert_eq!(next.keys().collect::<Vec<_>>(), desired.keys().collect::<Vec<_>>());
            prop_assert!(endpoints_agree(&desired, &next));
            for (k, want) in &desired {
                let got = &next[k];
                prop_assert_eq!(&got.allowed_ips, &want.allowed_ips);
                prop_assert_eq!(got.keepalive, want.keepalive);
                prop_assert_eq!(&got.psk, &want.psk);
            }
            prop_assert!(diff(&next, &desired, &desired).is_empty(), "a second apply changes nothing");
        }

        #[test]
        fn peers_that_match_are_never_in_the_diff(current in arb_map(), desired in arb_map()) {
            let d = diff(&current, &desired, &current);
            for u in &d.update {
                prop_assert!(current[&u.spec.key] != desired[&u.spec.key]);
            }
            for k in &d.remove {
                prop_assert!(!desired.contains_key(k));
            }
            for p in &d.add {
                prop_assert!(!current.contains_key(&p.key));
            }
        }
    }
}
