//! Peer relays as pure decisions: whether to set, clear or leave tailscaled's `RelayServerPort`
//! pref, and which path each peer's traffic takes right now (direct, a peer relay, DERP), read
//! the way `tailscale status` reads it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Peer relays were first supported in this release (1.84 had the pref behind a hidden flag).
pub const RELAY_MIN_VERSION: (u32, u32) = (1, 86);

/// What clawnode recorded in its state directory that it set, so that it only ever undoes its
/// own change: the port it set, and one it is setting until tailscaled confirms it (a failed
/// write leaves both, since the pref may hold either).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RelayOwned {
    pub ports: Vec<u16>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayStep {
    Nothing,
    /// Add the port to the record, PATCH it, and once tailscaled confirms it keep only it.
    Set(u16),
    /// PATCH the pref away, then forget ownership.
    Clear,
    /// Forget ownership without writing: someone else changed the pref since.
    Forget,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayDecision {
    pub step: RelayStep,
    /// A problem to report; it never fails the node.
    pub problem: Option<String>,
}

/// What to do about the pref at a join. `version` names the daemon in the problem text.
pub fn plan_relay(
    wanted: Option<u16>,
    current: Option<u16>,
    owned: &[u16],
    capable: Option<bool>,
    version: &str,
) -> RelayDecision {
    let decide = |step| RelayDecision {
        step,
        problem: None,
    };
    let Some(port) = wanted else {
        // The key was removed: undo clawnode's own change only.
        return match current {
            Some(now) if owned.contains(&now) => decide(RelayStep::Clear),
            _ if !owned.is_empty() => decide(RelayStep::Forget),
            _ => decide(RelayStep::Nothing),
        };
    };
    if capable == Some(false) {
        return RelayDecision {
            step: RelayStep::Nothing,
            problem: Some(relay_too_old(version)),
        };
    }
    if current == Some(port) {
        return decide(RelayStep::Nothing);
    }
    decide(RelayStep::Set(port))
}

/// At stop: clear only when asked to, and only what clawnode set and nobody changed since.
pub fn plan_relay_stop(clear_on_stop: bool, owned: &[u16], current: Option<u16>) -> RelayStep {
    match current {
        Some(now) if clear_on_stop && owned.contains(&now) => RelayStep::Clear,
        _ => RelayStep::Nothing,
    }
}

/// After a write: tailscaled answers with its new prefs, and a daemon that does not know the
/// field ignores it without an error (Go's JSON decoder drops unknown fields).
pub fn check_relay_applied(wanted: u16, returned: Option<u16>) -> Result<(), String> {
    match returned {
        Some(port) if port == wanted => Ok(()),
        Some(port) => Err(format!(
            "tailscaled kept RelayServerPort {port} after clawnode set {wanted}"
        )),
        None => Err(format!(
            "tailscaled ignored RelayServerPort {wanted} (a daemon without the peer relay server); this node does not relay"
        )),
    }
}

pub fn relay_too_old(version: &str) -> String {
    let (major, minor) = RELAY_MIN_VERSION;
    format!(
        "tailscaled {version} cannot serve as a peer relay ({major}.{minor} or newer is needed); relay_server_port is not applied"
    )
}

/// One peer as tailscaled's status reports it, in the fields the path depends on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerFacts {
    /// The MagicDNS name without the tailnet suffix, else the host name.
    pub name: String,
    pub ip: Option<String>,
    /// A packet went to it in the last two minutes or so.
    pub active: bool,
    /// Connected to the control plane.
    pub online: bool,
    /// `CurAddr`: the direct UDP endpoint in use, or empty.
    pub cur_addr: String,
    /// `PeerRelay`: `ip:port:vni:N` of the peer relay in use, or empty.
    pub peer_relay: String,
    /// `Relay`: the peer's home DERP region, set whatever path traffic takes.
    pub derp_region: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathKind {
    Direct,
    PeerRelay,
    Derp,
    /// Active, but tailscaled has no path yet.
    Unknown,
    /// Online, no traffic lately: no path is kept.
    Idle,
    Offline,
}

impl PathKind {
    pub const ALL: [PathKind; 6] = [
        PathKind::Direct,
        PathKind::PeerRelay,
        PathKind::Derp,
        PathKind::Unknown,
        PathKind::Idle,
        PathKind::Offline,
    ];

    /// The label value in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::PeerRelay => "peer_relay",
            PathKind::Derp => "derp",
            PathKind::Unknown => "unknown",
            PathKind::Idle => "idle",
            PathKind::Offline => "offline",
        }
    }
}

/// Whether `tailscale status` lists the peer: not a node shared *to* another user (it may only
/// connect in), nor a Mullvad exit node on offer, of which a tailnet can see hundreds.
pub fn listed_in_status(
    sharee_node: bool,
    exit_node_option: bool,
    exit_node: bool,
    dns_name: &str,
) -> bool {
    let mullvad_offer = exit_node_option && !exit_node && dns_name.ends_with(".mullvad.ts.net.");
    !sharee_node && !mullvad_offer
}

/// The path a peer's traffic takes, and through what (the endpoint, the relay, or the DERP
/// region), in `tailscale status`'s order: only an active peer has a path.
pub fn classify(peer: &PeerFacts) -> (PathKind, Option<String>) {
    let some = |s: &str| Some(s.to_string());
    if !peer.active {
        return if peer.online {
            (PathKind::Idle, None)
        } else {
            (PathKind::Offline, None)
        };
    }
    if !peer.cur_addr.is_empty() {
        return (PathKind::Direct, some(&peer.cur_addr));
    }
    if !peer.peer_relay.is_empty() {
        return (PathKind::PeerRelay, some(&peer.peer_relay));
    }
    if !peer.derp_region.is_empty() {
        return (PathKind::Derp, some(&peer.derp_region));
    }
    (PathKind::Unknown, None)
}

/// How many peers take each path; DERP by region.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathCounts {
    pub total: usize,
    pub direct: usize,
    pub peer_relay: usize,
    /// Region code → peers through it.
    pub derp: BTreeMap<String, usize>,
    pub unknown: usize,
    pub idle: usize,
    pub offline: usize,
}

impl PathCounts {
    pub fn count(&self, kind: PathKind) -> usize {
        match kind {
            PathKind::Direct => self.direct,
            PathKind::PeerRelay => self.peer_relay,
            PathKind::Derp => self.derp.values().sum(),
            PathKind::Unknown => self.unknown,
            PathKind::Idle => self.idle,
            PathKind::Offline => self.offline,
        }
    }
}

/// Counts from classified peers (`via` is the region for DERP).
pub fn summarize<'a>(paths: impl IntoIterator<Item = (PathKind, Option<&'a str>)>) -> PathCounts {
    let mut counts = PathCounts::default();
    for (kind, via) in paths {
        counts.total += 1;
        match kind {
            PathKind::Direct => counts.direct += 1,
            PathKind::PeerRelay => counts.peer_relay += 1,
            PathKind::Derp => {
                *counts
                    .derp
                    .entry(via.unwrap_or("").to_string())
                    .or_default() += 1
            }
            PathKind::Unknown => counts.unknown += 1,
            PathKind::Idle => counts.idle += 1,
            PathKind::Offline => counts.offline += 1,
        }
    }
    counts
}

/// `12 peers: 9 direct, 2 peer-relay, 1 DERP fra`, then idle and offline peers; zeros left out.
pub fn summary_line(counts: &PathCounts) -> String {
    if counts.total == 0 {
        return "no peers".into();
    }
    let mut parts = Vec::new();
    if counts.direct > 0 {
        parts.push(format!("{} direct", counts.direct));
    }
    if counts.peer_relay > 0 {
        parts.push(format!("{} peer-relay", counts.peer_relay));
    }
    // Busiest region first.
    let mut regions: Vec<(&String, &usize)> = counts.derp.iter().collect();
    regions.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    for (region, n) in regions {
        parts.push(format!("{n} DERP {region}"));
    }
    for (n, what) in [
        (counts.unknown, "no path yet"),
        (counts.idle, "idle"),
        (counts.offline, "offline"),
    ] {
        if n > 0 {
            parts.push(format!("{n} {what}"));
        }
    }
    let noun = if counts.total == 1 { "peer" } else { "peers" };
    format!("{} {noun}: {}", counts.total, parts.join(", "))
}

/// Whether a peer relay is known to exist for this node's traffic: this node serves as one, or
/// some peer is reached through one right now. A grant tailscaled does not report cannot be
/// seen from here, so this errs towards "none".
pub fn relay_available(self_serves: bool, paths: &[PathKind]) -> bool {
    self_serves || paths.contains(&PathKind::PeerRelay)
}

/// What to tell an operator about a peer on DERP while a relay is available.
pub fn derp_hint(region: &str) -> String {
    format!(
        "through DERP {region} although a peer relay is available: the relay grant may not cover this peer (see `clawnode tailscale policy`), or the relay's UDP port is not reachable from it"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(active: bool, online: bool, cur: &str, relay: &str, derp: &str) -> PeerFacts {
        PeerFacts {
            name: "p".into(),
            ip: None,
            active,
            online,
            cur_addr: cur.into(),
            peer_relay: relay.into(),
            derp_region: derp.into(),
        }
    }

    #[test]
    fn a_relay_port_is_set_only_when_tailscaled_has_another_value() {
        let set = plan_relay(Some(40000), None, &[], Some(true), "1.102.2");
        assert_eq!(set.step, RelayStep::Set(40000));
        assert_eq!(set.problem, None);
        let again = plan_relay(Some(40000), Some(40000), &[40000], Some(true), "1.102.2");
        assert_eq!(again.step, RelayStep::Nothing, "no write when already set");
        let by_hand = plan_relay(Some(40000), Some(41000), &[], Some(true), "1.102.2");
        assert_eq!(by_hand.step, RelayStep::Set(40000), "the config wins");
        let unknown = plan_relay(Some(40000), None, &[], None, "?");
        assert_eq!(unknown.step, RelayStep::Set(40000), "the answer is checked");
    }

    #[test]
    fn an_old_tailscaled_gets_a_problem_and_no_write() {
        let old = plan_relay(Some(40000), None, &[], Some(false), "1.80.3");
        assert_eq!(old.step, RelayStep::Nothing);
        assert_eq!(
            old.problem.as_deref(),
            Some(
                "tailscaled 1.80.3 cannot serve as a peer relay (1.86 or newer is needed); relay_server_port is not applied"
            )
        );
    }

    #[test]
    fn removing_the_key_undoes_only_clawnodes_own_change() {
        let mine = plan_relay(None, Some(40000), &[40000], Some(true), "1.102.2");
        assert_eq!(mine.step, RelayStep::Clear);
        let changed = plan_relay(None, Some(41000), &[40000], Some(true), "1.102.2");
        assert_eq!(changed.step, RelayStep::Forget, "someone changed it since");
        let theirs = plan_relay(None, Some(41000), &[], Some(true), "1.102.2");
        assert_eq!(theirs.step, RelayStep::Nothing, "set by hand: left alone");
        // A change of port whose write failed: the pref still holds the older one of ours.
        let failed = plan_relay(None, Some(40000), &[40000, 40001], Some(true), "1.102.2");
        assert_eq!(failed.step, RelayStep::Clear);
    }

    #[test]
    fn a_stop_clears_only_when_configured_and_still_clawnodes_value() {
        assert_eq!(
            plan_relay_stop(true, &[40000], Some(40000)),
            RelayStep::Clear
        );
        assert_eq!(
            plan_relay_stop(false, &[40000], Some(40000)),
            RelayStep::Nothing
        );
        assert_eq!(
            plan_relay_stop(true, &[40000], Some(41000)),
            RelayStep::Nothing
        );
        assert_eq!(plan_relay_stop(true, &[], Some(40000)), RelayStep::Nothing);
    }

    #[test]
    fn a_port_tailscaled_did_not_keep_is_a_problem() {
        assert_eq!(check_relay_applied(40000, Some(40000)), Ok(()));
        let ignored = check_relay_applied(40000, None).unwrap_err();
        assert!(ignored.starts_with("tailscaled ignored RelayServerPort 40000"));
        assert!(check_relay_applied(40000, Some(1)).is_err());
    }

    #[test]
    fn paths_follow_tailscale_status() {
        let direct = peer(true, true, "198.51.100.7:41641", "", "fra");
        assert_eq!(
            classify(&direct),
            (PathKind::Direct, Some("198.51.100.7:41641".into())),
            "the home region is set on direct peers too"
        );
        let relayed = peer(true, true, "", "203.0.113.9:40000:vni:7", "fra");
        assert_eq!(classify(&relayed).0, PathKind::PeerRelay);
        let derp = peer(true, false, "", "", "fra");
        assert_eq!(
            classify(&derp),
            (PathKind::Derp, Some("fra".into())),
            "active traffic counts even when the peer lost control"
        );
        assert_eq!(classify(&peer(true, true, "", "", "")).0, PathKind::Unknown);
        assert_eq!(
            classify(&peer(false, true, "198.51.100.7:1", "", "fra")).0,
            PathKind::Idle
        );
        assert_eq!(
            classify(&peer(false, false, "", "", "fra")).0,
            PathKind::Offline
        );
    }

    #[test]
    fn shared_in_nodes_and_mullvad_offers_are_not_counted_as_peers() {
        assert!(listed_in_status(
            false,
            false,
            false,
            "gpu-02.tail1234.ts.net."
        ));
        assert!(!listed_in_status(
            true,
            false,
            false,
            "guest.tail1234.ts.net."
        ));
        let mullvad = "de-fra-wg-001.mullvad.ts.net.";
        assert!(!listed_in_status(false, true, false, mullvad));
        assert!(
            listed_in_status(false, true, true, mullvad),
            "the exit node in use is listed"
        );
        assert!(listed_in_status(
            false,
            true,
            false,
            "exit.tail1234.ts.net."
        ));
    }

    #[test]
    fn the_summary_reads_like_the_issue_asks() {
        let mut paths = vec![(PathKind::Direct, None); 9];
        paths.extend([(PathKind::PeerRelay, None); 2]);
        paths.push((PathKind::Derp, Some("fra")));
        let counts = summarize(paths.clone());
        assert_eq!(
            summary_line(&counts),
            "12 peers: 9 direct, 2 peer-relay, 1 DERP fra"
        );
        paths.extend([
            (PathKind::Derp, Some("nyc")),
            (PathKind::Derp, Some("nyc")),
            (PathKind::Idle, None),
            (PathKind::Offline, None),
        ]);
        let counts = summarize(paths);
        assert_eq!(
            summary_line(&counts),
            "16 peers: 9 direct, 2 peer-relay, 2 DERP nyc, 1 DERP fra, 1 idle, 1 offline"
        );
        assert_eq!(counts.count(PathKind::Derp), 3);
        assert_eq!(summary_line(&PathCounts::default()), "no peers");
        let one = summarize([(PathKind::Idle, None)]);
        assert_eq!(summary_line(&one), "1 peer: 1 idle");
    }

    #[test]
    fn a_relay_is_available_when_this_node_serves_or_a_peer_uses_one() {
        assert!(relay_available(true, &[]));
        assert!(relay_available(
            false,
            &[PathKind::Derp, PathKind::PeerRelay]
        ));
        assert!(!relay_available(false, &[PathKind::Derp, PathKind::Direct]));
    }
}
