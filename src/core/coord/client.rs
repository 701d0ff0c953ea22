//! The node client's decisions (`mesh::wireguard::gateway` runs them), kept free of I/O, clocks and randomness (time and seeds come in) so
//! each is unit-tested: which gateway to try next, when an advert is due, and how gateway peers
//! join the hand-written ones.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;

use crate::core::Backoff;
use crate::core::peer_diff::{PeerKey, PeerMap, PeerSpec};

/// The long poll's `wait`: the full one while the last poll was answered; none while the node
/// is not live (just started, or its gateway failed), so the next gateway answers at once with
/// whatever is new since the cursor and the node is live again without sitting out a wait.
pub fn poll_wait(live: bool, long: Duration) -> Duration {
    if live { long } else { Duration::ZERO }
}

/// How long to wait before polling again after failure `attempt` (1-based): full jitter up to
/// 30 s. A gateway's `Retry-After` can stretch the wait only up to the same cap, so a gateway
/// that asks for hours (by mistake or malice) cannot park the node.
pub fn retry_delay(attempt: u32, jitter: u32, retry_after: Option<Duration>) -> Duration {
    let backoff = Backoff::GATEWAY;
    let asked = retry_after.unwrap_or_default().min(backoff.cap());
    backoff.full_jitter(attempt, jitter).max(asked)
}

/// Most gateways a node keeps in its rotation: the list comes from the gateways, so it is capped.
pub const MAX_GATEWAYS: usize = 16;

/// Which gateway to try: the last one that answered first, then the others in a shuffled
/// order, so a fleet does not stampede the first gateway of the list together.
#[derive(Debug, Clone, Default)]
pub struct Rotation {
    urls: Vec<String>,
    last_good: Option<String>,
    /// What is left to try this round, the current one first.
    queue: Vec<String>,
}

impl Rotation {
    pub fn new(urls: Vec<String>, last_good: Option<String>, seed: u64) -> Self {
        let mut rotation = Self::default();
        rotation.set_urls(urls, seed);
        rotation.last_good = last_good.filter(|url| rotation.urls.contains(url));
        rotation.refill(seed);
        rotation
    }

    /// Replace the known gateways (see [`known_gateways`]), keeping the one that answered. The
    /// current gateway stays current when still listed: it is the one whose answer brought the
    /// list, and [`Rotation::succeeded`] follows.
    pub fn set_urls(&mut self, mut urls: Vec<String>, seed: u64) {
        let mut seen = std::collections::BTreeSet::new();
        urls.retain(|u| seen.insert(u.clone()));
        urls.truncate(MAX_GATEWAYS);
        if urls.is_empty() || urls == self.urls {
            return;
        }
        let current = self.current().map(str::to_owned);
        self.urls = urls;
        if self
            .last_good
            .as_ref()
            .is_some_and(|u| !self.urls.contains(u))
        {
            self.last_good = None;
        }
        self.refill(seed);
        if let Some(current) = current.filter(|c| self.urls.contains(c)) {
            self.queue.retain(|u| *u != current);
            self.queue.insert(0, current);
        }
    }

    pub fn urls(&self) -> &[String] {
        &self.urls
    }

    pub fn current(&self) -> Option<&str> {
        self.queue.first().map(String::as_str)
    }

    /// The current gateway answered: it is tried first from now on, and a failure starts a
    /// fresh round over the others.
    pub fn succeeded(&mut self, seed: u64) {
        let current = self.queue.first().cloned();
        if current.is_some() && (current != self.last_good || self.queue.len() != self.urls.len()) {
            self.last_good = current;
            self.refill(seed);
        }
    }

    /// The current gateway failed: move on; after a full round start again, last-good first.
    pub fn failed(&mut self, seed: u64) {
        if !self.queue.is_empty() {
            self.queue.remove(0);
        }
        if self.queue.is_empty() {
            self.refill(seed);
        }
    }

    fn refill(&mut self, seed: u64) {
        let mut others: Vec<String> = self
            .urls
            .iter()
            .filter(|u| Some(*u) != self.last_good.as_ref())
            .cloned()
            .collect();
        fastrand::Rng::with_seed(seed).shuffle(&mut others);
        self.queue = self.last_good.iter().cloned().chain(others).collect();
    }
}

/// The gateways a node knows, from its sources in order: e.g. the gateway that just answered
/// (evidently alive), the answer's list (the gateways alive now), the signed peer set's
/// gateway records, then the bootstrap URLs (config or token). Each usable URL once, at most
/// [`MAX_GATEWAYS`], earlier sources first, so a long list from one source cannot push out
/// the gateway that answered.
pub fn known_gateways<'a>(sources: impl IntoIterator<Item = &'a [String]>) -> Vec<String> {
    let mut known: Vec<String> = Vec::new();
    for url in sources.into_iter().flatten() {
        if known.len() == MAX_GATEWAYS {
            break;
        }
        if !known.contains(url) && super::check_gateway_url(url).is_ok() {
            known.push(url.clone());
        }
    }
    known
}

/// What a node knows after an answer: the gateway that answered, then the signed gateway
/// records, then the answer's (unsigned) list, then the bootstrap URLs; a flooded list from
/// one gateway cannot push a signed gateway out of the cap.
pub fn gateways_after_answer(
    answered: &str,
    signed: &[String],
    listed: &[String],
    bootstrap: &[String],
) -> Vec<String> {
    known_gateways([&[answered.to_owned()][..], signed, listed, bootstrap])
}

/// What a node tells the gateways about itself beside its signed record: sent only when it
/// changes, never per reading.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdvertContent {
    /// The preferred one first (peers use the first).
    pub endpoints: Vec<SocketAddr>,
    /// Sorted (name, port).
    pub services: Vec<(String, u16)>,
    /// (count, model, memory MiB); `None` without GPUs.
    pub gpus: Option<(u32, String, u64)>,
}

impl AdvertContent {
    pub fn new(
        mut endpoints: Vec<SocketAddr>,
        mut services: Vec<(String, u16)>,
        gpus: Option<(u32, String, u64)>,
    ) -> Self {
        let mut seen = std::collections::BTreeSet::new();
        endpoints.retain(|e| seen.insert(*e));
        services.sort();
        services.dedup();
        Self {
            endpoints,
            services,
            gpus,
        }
    }
}

/// The adverts sent on this session.
#[derive(Debug, Clone, Default)]
pub struct Adverts {
    sent: Option<AdvertContent>,
    seq: u64,
}

impl Adverts {
    /// The sequence number for `content` if it differs from what the gateway has, else `None`.
    /// Sequence numbers start at the wall clock in milliseconds so they keep increasing across
    /// restarts, which the gateway requires.
    pub fn due(&self, content: &AdvertContent, now_ms: u64) -> Option<u64> {
        (self.sent.as_ref() != Some(content)).then(|| now_ms.max(self.seq.saturating_add(1)))
    }

    /// The gateway accepted `content` with `seq`.
    pub fn sent(&mut self, content: AdvertContent, seq: u64) {
        self.sent = Some(content);
        self.seq = self.seq.max(seq);
    }

    /// A new session or gateway restarted: send again.
    pub fn forget(&mut self) {
        self.sent = None;
    }

    /// The gateway refused an advert because it holds one with `last` (this node restarted
    /// with a wall clock behind its earlier adverts): the next one continues from `last + 1`.
    pub fn stale(&mut self, last: u64) {
        self.seq = self.seq.max(last);
    }
}

/// A peer the gateway authorised, reduced to what the device needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GwPeer {
    pub name: String,
    pub key: PeerKey,
    pub addresses: Vec<IpAddr>,
    pub endpoint: Option<SocketAddr>,
}

/// Keepalive for gateway peers: most sit behind NAT the node cannot know about.
pub const GATEWAY_KEEPALIVE: u16 = 25;

/// Add the gateway's peers to the hand-written ones (`peers`, `names`), which win: a gateway
/// peer with a key or mesh address a hand-written peer already has is skipped and reported.
/// Only mesh addresses (inside `mesh_cidr`) become allowed IPs, each a single host, so a record
/// can never route the host's other traffic into the tunnel. This node's own record is skipped.
/// Returns how many were added.
pub fn add_gateway_peers(
    peers: &mut PeerMap,
    names: &mut Vec<(PeerKey, String)>,
    problems: &mut Vec<String>,
    own_key: PeerKey,
    mesh_cidr: IpNet,
    gateway: Vec<GwPeer>,
) -> usize {
    let hand_written: Vec<IpNet> = peers
        .values()
        .flat_map(|p| p.allowed_ips.iter().copied())
        .collect();
    let mut added = 0;
    for peer in gateway {
        if peer.key == own_key {
            continue;
        }
        if peers.contains_key(&peer.key) {
            problems.push(format!(
                "gateway peer {:?} skipped: its public key is configured by hand",
                peer.name
            ));
            continue;
        }
        let allowed: Vec<IpNet> = peer
            .addresses
            .iter()
            .filter(|a| mesh_cidr.contains(*a))
            .map(|a| IpNet::from(*a))
            .collect();
        if allowed.is_empty() {
            problems.push(format!(
                "gateway peer {:?} skipped: no address inside mesh_cidr {mesh_cidr}",
                peer.name
            ));
            continue;
        }
        if let Some(clash) = allowed
            .iter()
            .find(|a| hand_written.iter().any(|h| h.contains(&a.addr())))
        {
            problems.push(format!(
                "gateway peer {:?} skipped: its address {} belongs to a peer configured by hand",
                peer.name,
                clash.addr()
            ));
            continue;
        }
        let mut spec = PeerSpec::new(peer.key, allowed);
        spec.endpoint = peer.endpoint;
        spec.keepalive = Some(GATEWAY_KEEPALIVE);
        names.push((peer.key, peer.name));
        peers.insert(peer.key, spec);
        added += 1;
    }
    added
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> PeerKey {
        PeerKey([n; 32])
    }

    fn hand(n: u8, net: &str) -> (PeerKey, PeerSpec) {
        (key(n), PeerSpec::new(key(n), vec![net.parse().unwrap()]))
    }

    fn gw(n: u8, addr: &str) -> GwPeer {
        GwPeer {
            name: format!("gw-node-{n}"),
            key: key(n),
            addresses: vec![addr.parse().unwrap()],
            endpoint: Some(format!("192.0.2.{n}:51820").parse().unwrap()),
        }
    }

    #[test]
    fn hand_written_peers_win_and_colliding_gateway_peers_are_listed_in_problems() {
        let mut peers: PeerMap = [hand(1, "10.100.0.1/32"), hand(2, "10.100.7.0/24")]
            .into_iter()
            .collect();
        let mut names = vec![(key(1), "one".into()), (key(2), "lab".into())];
        let mut problems = Vec::new();

        let added = add_gateway_peers(
            &mut peers,
            &mut names,
            &mut problems,
            key(9),
            "10.100.0.0/16".parse().unwrap(),
            vec![
                gw(1, "10.100.0.50"),  // same key as a hand-written peer
                gw(3, "10.100.7.9"),   // address inside a hand-written peer's allowed IPs
                gw(4, "10.100.0.4"),   // fine
                gw(9, "10.100.0.9"),   // this node itself
                gw(5, "198.51.100.5"), // no mesh address
            ],
        );

        assert_eq!(added, 1);
        assert_eq!(peers.len(), 3);
        assert_eq!(
            peers[&key(1)].allowed_ips,
            vec!["10.100.0.1/32".parse::<IpNet>().unwrap()]
        );
        let four = &peers[&key(4)];
        assert_eq!(
            four.allowed_ips,
            vec!["10.100.0.4/32".parse::<IpNet>().unwrap()]
        );
        assert_eq!(four.keepalive, Some(25));
        assert_eq!(four.endpoint, Some("192.0.2.4:51820".parse().unwrap()));
        assert_eq!(names.last().unwrap().1, "gw-node-4");
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert!(
            problems[0].contains("\"gw-node-1\" skipped: its public key is configured by hand")
        );
        assert!(problems[1].contains(
            "\"gw-node-3\" skipped: its address 10.100.7.9 belongs to a peer configured by hand"
        ));
        assert!(problems[2].contains("\"gw-node-5\" skipped: no address inside mesh_cidr"));
    }

    #[test]
    fn an_advert_is_due_only_when_endpoints_services_or_gpus_change() {
        let mut adverts = Adverts::default();
        let first = AdvertContent::new(
            vec!["192.0.2.1:51820".parse().unwrap()],
            vec![("molt-provider".into(), 8080)],
            Some((2, "H100".into(), 81920)),
        );
        let seq = adverts.due(&first, 1_000).unwrap();
        assert_eq!(seq, 1_000);
        adverts.sent(first.clone(), seq);

        // The same content with an endpoint repeated is no change.
        let same = AdvertContent::new(
            vec![
                "192.0.2.1:51820".parse().unwrap(),
                "192.0.2.1:51820".parse().unwrap(),
            ],
            vec![("molt-provider".into(), 8080)],
            Some((2, "H100".into(), 81920)),
        );
        assert_eq!(adverts.due(&same, 2_000), None);

        let mut lost_gpu = first.clone();
        lost_gpu.gpus = Some((1, "H100".into(), 81920));
        // A clock that went backwards still gives a higher sequence number.
        assert_eq!(adverts.due(&lost_gpu, 500), Some(1_001));

        // Another preferred endpoint (peers use the first) is a change.
        let mut adverts2 = Adverts::default();
        let two = AdvertContent::new(
            vec![
                "192.0.2.1:51820".parse().unwrap(),
                "198.51.100.1:51820".parse().unwrap(),
            ],
            Vec::new(),
            None,
        );
        adverts2.sent(two.clone(), 1);
        let swapped = AdvertContent::new(
            two.endpoints.iter().rev().copied().collect(),
            Vec::new(),
            None,
        );
        assert_eq!(swapped.endpoints[0], "198.51.100.1:51820".parse().unwrap());
        assert!(adverts2.due(&swapped, 2).is_some());

        adverts.forget();
        assert_eq!(adverts.due(&first, 3_000), Some(3_000));
    }

    #[test]
    fn after_a_restart_with_the_clock_stepped_back_adverts_continue_above_the_gateways_last() {
        // The gateway holds seq 5_000 from before the restart; the clock now reads 1_000.
        let mut adverts = Adverts::default();
        let content =
            AdvertContent::new(vec!["192.0.2.1:51820".parse().unwrap()], Vec::new(), None);
        assert_eq!(adverts.due(&content, 1_000), Some(1_000));
        adverts.stale(5_000);
        assert_eq!(adverts.due(&content, 1_001), Some(5_001));
        // A later clock wins again.
        assert_eq!(adverts.due(&content, 9_000), Some(9_000));
    }

    #[test]
    fn the_gateway_that_answered_last_is_tried_first_and_the_others_rotate() {
        let urls: Vec<String> = (1..=4)
            .map(|n| format!("https://203.0.113.{n}:443"))
            .collect();
        let mut rotation = Rotation::new(urls.clone(), Some(urls[2].clone()), 7);
        assert_eq!(rotation.current(), Some(urls[2].as_str()));

        // One full round visits every gateway once.
        let mut seen = Vec::new();
        for seed in 0..4 {
            seen.push(rotation.current().unwrap().to_string());
            rotation.failed(seed);
        }
        seen.sort();
        assert_eq!(seen, urls);
        // The next round starts again from the last good one.
        assert_eq!(rotation.current(), Some(urls[2].as_str()));

        rotation.failed(1);
        let answered = rotation.current().unwrap().to_string();
        rotation.succeeded(5);
        for seed in 0..4 {
            rotation.failed(seed);
        }
        assert_eq!(rotation.current(), Some(answered.as_str()));
    }

    #[test]
    fn a_fleet_spreads_its_first_retry_over_the_other_gateways() {
        let urls: Vec<String> = (1..=4)
            .map(|n| format!("https://203.0.113.{n}:443"))
            .collect();
        let firsts: std::collections::BTreeSet<String> = (0..64)
            .map(|seed| {
                let mut r = Rotation::new(urls.clone(), Some(urls[0].clone()), seed);
                r.failed(seed);
                r.current().unwrap().to_string()
            })
            .collect();
        assert_eq!(firsts.len(), 3, "{firsts:?}");
    }

    #[test]
    fn a_gateway_asking_to_retry_after_ages_is_tried_again_within_30_s() {
        let cap = Duration::from_secs(30);
        for jitter in [0, u32::MAX / 2, u32::MAX] {
            let delay = retry_delay(1, jitter, Some(Duration::from_secs(1_000_000_000)));
            assert_eq!(delay, cap);
        }
        // A sensible Retry-After is honoured over a shorter jittered delay.
        assert_eq!(
            retry_delay(1, 0, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert!(retry_delay(1, u32::MAX, None) < Duration::from_millis(250));
    }

    fn gw_urls(ns: &[u8]) -> Vec<String> {
        ns.iter()
            .map(|n| format!("https://203.0.113.{n}:443"))
            .collect()
    }

    #[test]
    fn the_gateway_that_answered_during_a_failover_is_tried_first_after_its_list_arrives() {
        // Gateway 1 died; the node moved on to another, whose answer lists the live ones.
        for seed in 0..32 {
            let mut rotation =
                Rotation::new(gw_urls(&[1, 2, 3]), Some(gw_urls(&[1])[0].clone()), seed);
            rotation.failed(seed);
            let answered = rotation.current().unwrap().to_string();
            // Each call draws a fresh seed, as the poll task does.
            rotation.set_urls(gw_urls(&[2, 3]), seed + 1_000);
            assert_eq!(rotation.current(), Some(answered.as_str()), "seed {seed}");
            rotation.succeeded(seed);
            // A later failure round starts again from the one that answered.
            rotation.failed(seed);
            rotation.failed(seed);
            assert_eq!(rotation.current(), Some(answered.as_str()), "seed {seed}");
        }
    }

    #[test]
    fn a_gateway_flooding_its_list_cannot_push_out_the_signed_gateways() {
        let signed = gw_urls(&[1, 2, 3]);
        let flood: Vec<String> = (10..100)
            .map(|n| format!("https://gw{n}.example"))
            .collect();
        let known = gateways_after_answer("https://gw10.example", &signed, &flood, &[]);
        assert_eq!(known.len(), MAX_GATEWAYS);
        for url in &signed {
            assert!(known.contains(url), "{url} pushed out");
        }
    }

    #[test]
    fn known_gateways_come_from_every_source_once_valid_and_capped() {
        let answered = gw_urls(&[2]);
        let listed = [gw_urls(&[1, 2]), vec!["http://203.0.113.9".into()]].concat();
        let signed = gw_urls(&[3, 1]);
        let bootstrap = [gw_urls(&[4]), vec!["https://gw.example/path".into()]].concat();
        assert_eq!(
            known_gateways([&answered[..], &listed, &signed, &bootstrap]),
            gw_urls(&[2, 1, 3, 4])
        );

        // A flood from one source keeps the ones before it.
        let flood: Vec<String> = (10..100)
            .map(|n| format!("https://gw{n}.example"))
            .collect();
        let known = known_gateways([&answered[..], &flood, &bootstrap]);
        assert_eq!(known.len(), MAX_GATEWAYS);
        assert_eq!(known[0], answered[0]);
        assert!(known_gateways([&[][..]]).is_empty());
    }

    #[test]
    fn a_node_that_lost_its_gateway_asks_the_next_one_without_a_long_wait() {
        let long = Duration::from_secs(25);
        assert_eq!(poll_wait(false, long), Duration::ZERO);
        assert_eq!(poll_wait(true, long), long);
    }

    #[test]
    fn the_gateway_list_is_capped() {
        let urls: Vec<String> = (0..100).map(|n| format!("https://gw{n}:443")).collect();
        let rotation = Rotation::new(urls, None, 1);
        assert_eq!(rotation.urls().len(), MAX_GATEWAYS);
    }
}
