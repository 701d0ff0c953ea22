//! Which peer networks become routes in the main table, which peers are refused because a route
//! of theirs would capture this host's own traffic, and which routes clawnode itself added (so
//! that it removes those, and only those, when they are no longer wanted).
//!
//! A peer's allowed IPs inside `mesh_cidr` need no route of their own (the mesh route covers
//! them); every other allowed IP becomes a route through the interface. Such a route is refused
//! when it is a default route or nearly one (shorter than /8, or /16 for IPv6: wg-quick's
//! `0.0.0.0/1` + `128.0.0.0/1` split captures as much), covers a configured peer's endpoint (WireGuard's own UDP would
//! loop into the tunnel) or lies inside a network this host is attached to (it would take over
//! part of the LAN), unless `allow_unsafe_routes` is set.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// The shortest prefixes taken as a route without `allow_unsafe_routes`: `10.0.0.0/8` is a
/// site network, `0.0.0.0/1` is half the Internet.
pub const MIN_PREFIX_V4: u8 = 8;
pub const MIN_PREFIX_V6: u8 = 16;

/// What a peer's routes are checked against.
#[derive(Debug, Clone)]
pub struct RoutePolicy {
    pub mesh_cidr: IpNet,
    /// `allow_unsafe_routes`: take every allowed IP as a route, refusing nothing.
    pub allow_unsafe: bool,
    /// Every configured peer's endpoint address (resolved), with the peer's name.
    pub endpoints: Vec<(String, IpAddr)>,
    /// The networks of this host's addresses on other interfaces than the mesh's.
    pub local_networks: Vec<IpNet>,
}

/// Why a peer is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    DefaultRoute(IpNet),
    /// Wider than `MIN_PREFIX_V4` / `MIN_PREFIX_V6`: halves or quarters of the address space.
    TooBroad(IpNet),
    CoversEndpoint {
        net: IpNet,
        peer: String,
        addr: IpAddr,
    },
    InsideLocalNetwork {
        net: IpNet,
        local: IpNet,
    },
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::DefaultRoute(net) => write!(
                f,
                "allowed IP {net} is a default route and would send all of this host's traffic to the peer"
            ),
            Refusal::TooBroad(net) => write!(
                f,
                "allowed IP {net} spans a large part of the address space and would take most of this host's traffic"
            ),
            Refusal::CoversEndpoint { net, peer, addr } => write!(
                f,
                "allowed IP {net} covers peer {peer:?}'s endpoint {addr}, so WireGuard's own packets would loop into the tunnel"
            ),
            Refusal::InsideLocalNetwork { net, local } => write!(
                f,
                "allowed IP {net} lies inside {local}, a network this host is attached to, and would take its traffic"
            ),
        }?;
        f.write_str(" (set allow_unsafe_routes = true in [network.wireguard] to permit it)")
    }
}

impl RoutePolicy {
    /// The routes a peer with these allowed IPs needs (those outside the mesh CIDR), or why
    /// the peer is refused.
    pub fn routes_of(&self, allowed_ips: &[IpNet]) -> Result<Vec<IpNet>, Refusal> {
        let routes: Vec<IpNet> = allowed_ips
            .iter()
            .filter(|net| !self.mesh_cidr.contains(*net))
            .copied()
            .collect();
        if self.allow_unsafe {
            return Ok(routes);
        }
        for net in &routes {
            if net.prefix_len() == 0 {
                return Err(Refusal::DefaultRoute(*net));
            }
            let shortest = match net {
                IpNet::V4(_) => MIN_PREFIX_V4,
                IpNet::V6(_) => MIN_PREFIX_V6,
            };
            if net.prefix_len() < shortest {
                return Err(Refusal::TooBroad(*net));
            }
            if let Some((peer, addr)) = self.endpoints.iter().find(|(_, a)| net.contains(a)) {
                return Err(Refusal::CoversEndpoint {
                    net: *net,
                    peer: peer.clone(),
                    addr: *addr,
                });
            }
            // A wider prefix than the LAN's loses to the LAN's own route (longest match wins);
            // an equal or narrower one would win over it.
            if let Some(local) = self.local_networks.iter().find(|l| l.contains(net)) {
                return Err(Refusal::InsideLocalNetwork {
                    net: *net,
                    local: *local,
                });
            }
        }
        Ok(routes)
    }
}

/// Every route the applied peers need: the mesh CIDR first, then each other network once.
pub fn wanted(mesh_cidr: IpNet, peer_routes: impl IntoIterator<Item = IpNet>) -> Vec<IpNet> {
    let mut routes = vec![mesh_cidr];
    for net in peer_routes {
        if !routes.contains(&net) {
            routes.push(net);
        }
    }
    routes
}

/// The routes clawnode created through its interface. A route that existed already (EEXIST)
/// belongs to someone else: it is never recorded here, so never removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnedRoutes {
    /// The interface index the routes go through.
    index: Option<u32>,
    routes: BTreeSet<IpNet>,
}

impl OwnedRoutes {
    /// Switch to the interface now at `index`. The routes recorded for another index (a link
    /// deleted and made again, or renamed) are returned with that index, to be removed through
    /// it if it still exists.
    pub fn on_link(&mut self, index: u32) -> Option<(u32, Vec<IpNet>)> {
        let old = self.index.replace(index)?;
        if old == index || self.routes.is_empty() {
            return None;
        }
        Some((old, std::mem::take(&mut self.routes).into_iter().collect()))
    }

    pub fn created(&mut self, routes: impl IntoIterator<Item = IpNet>) {
        self.routes.extend(routes);
    }

    /// Routes clawnode added that `wanted` no longer has.
    pub fn stale(&self, wanted: &[IpNet]) -> Vec<IpNet> {
        self.routes
            .iter()
            .filter(|net| !wanted.contains(net))
            .copied()
            .collect()
    }

    pub fn removed(&mut self, net: &IpNet) {
        self.routes.remove(net);
    }

    /// All routes clawnode added, with their interface index, forgetting them.
    pub fn take_all(&mut self) -> Option<(u32, Vec<IpNet>)> {
        let index = self.index.take()?;
        let routes: Vec<IpNet> = std::mem::take(&mut self.routes).into_iter().collect();
        (!routes.is_empty()).then_some((index, routes))
    }

    pub fn contains(&self, net: &IpNet) -> bool {
        self.routes.contains(net)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| net(s)).collect()
    }

    fn policy() -> RoutePolicy {
        RoutePolicy {
            mesh_cidr: net("10.100.0.0/16"),
            allow_unsafe: false,
            endpoints: vec![
                ("gpu-02".into(), "198.51.100.7".parse().unwrap()),
                ("gpu-03".into(), "2001:db8::7".parse().unwrap()),
            ],
            local_networks: nets(&["192.168.1.0/24", "fe80::/64"]),
        }
    }

    #[test]
    fn a_site_network_outside_the_mesh_becomes_a_route_and_mesh_addresses_do_not() {
        let routes = policy()
            .routes_of(&nets(&[
                "10.100.0.6/32",
                "172.16.5.0/24",
                "2001:db8:5::/48",
            ]))
            .unwrap();
        assert_eq!(routes, nets(&["172.16.5.0/24", "2001:db8:5::/48"]));
        assert_eq!(
            policy().routes_of(&nets(&["10.100.0.0/16"])).unwrap(),
            vec![]
        );
    }

    #[test]
    fn a_default_route_split_in_halves_is_refused_but_a_site_network_is_not() {
        for broad in ["0.0.0.0/1", "128.0.0.0/1", "64.0.0.0/3", "::/1", "8000::/1"] {
            assert_eq!(
                policy().routes_of(&nets(&[broad])),
                Err(Refusal::TooBroad(net(broad)))
            );
        }
        assert_eq!(
            policy().routes_of(&nets(&["172.16.0.0/12", "10.0.0.0/8", "2001:db8:100::/48"])),
            Ok(nets(&["172.16.0.0/12", "10.0.0.0/8", "2001:db8:100::/48"]))
        );
    }

    #[test]
    fn a_default_route_is_refused_in_either_family() {
        for default in ["0.0.0.0/0", "::/0"] {
            let refused = policy()
                .routes_of(&nets(&["10.100.0.6/32", default]))
                .unwrap_err();
            assert_eq!(refused, Refusal::DefaultRoute(net(default)));
            assert!(
                refused.to_string().contains("allow_unsafe_routes = true"),
                "{refused}"
            );
        }
    }

    #[test]
    fn a_prefix_covering_any_peers_endpoint_is_refused() {
        let refused = policy()
            .routes_of(&nets(&["10.100.0.6/32", "198.51.100.0/24"]))
            .unwrap_err();
        assert_eq!(
            refused,
            Refusal::CoversEndpoint {
                net: net("198.51.100.0/24"),
                peer: "gpu-02".into(),
                addr: "198.51.100.7".parse().unwrap()
            }
        );
        assert!(matches!(
            policy().routes_of(&nets(&["2001:db8::/32"])),
            Err(Refusal::CoversEndpoint { .. })
        ));
        // The neighbouring network is fine.
        assert!(policy().routes_of(&nets(&["198.51.101.0/24"])).is_ok());
    }

    #[test]
    fn a_prefix_inside_the_hosts_lan_is_refused_but_a_wider_one_is_not() {
        let refused = policy()
            .routes_of(&nets(&["192.168.1.128/25"]))
            .unwrap_err();
        assert_eq!(
            refused,
            Refusal::InsideLocalNetwork {
                net: net("192.168.1.128/25"),
                local: net("192.168.1.0/24")
            }
        );
        assert!(policy().routes_of(&nets(&["192.168.1.0/24"])).is_err());
        // Wider than the LAN: the LAN's own route still wins for the LAN.
        assert_eq!(
            policy().routes_of(&nets(&["192.168.0.0/16"])).unwrap(),
            nets(&["192.168.0.0/16"])
        );
    }

    #[test]
    fn allow_unsafe_routes_takes_every_allowed_ip_as_configured() {
        let mut policy = policy();
        policy.allow_unsafe = true;
        assert_eq!(
            policy
                .routes_of(&nets(&["0.0.0.0/0", "198.51.100.0/24", "192.168.1.0/25"]))
                .unwrap(),
            nets(&["0.0.0.0/0", "198.51.100.0/24", "192.168.1.0/25"])
        );
    }

    #[test]
    fn the_wanted_routes_are_the_mesh_first_then_each_network_once() {
        assert_eq!(
            wanted(
                net("10.100.0.0/16"),
                nets(&["172.16.5.0/24", "172.16.6.0/24", "172.16.5.0/24"])
            ),
            nets(&["10.100.0.0/16", "172.16.5.0/24", "172.16.6.0/24"])
        );
    }

    #[test]
    fn only_routes_clawnode_created_are_ever_stale() {
        let mut owned = OwnedRoutes::default();
        assert_eq!(owned.on_link(7), None);
        // 172.16.6.0/24 existed already (EEXIST), so it was never recorded.
        owned.created(nets(&["10.100.0.0/16", "172.16.5.0/24"]));
        assert_eq!(
            owned.stale(&nets(&["10.100.0.0/16", "172.16.5.0/24", "172.16.6.0/24"])),
            vec![]
        );
        assert_eq!(
            owned.stale(&nets(&["10.100.0.0/16"])),
            nets(&["172.16.5.0/24"])
        );
        owned.removed(&net("172.16.5.0/24"));
        assert!(!owned.contains(&net("172.16.5.0/24")));
        assert_eq!(owned.take_all(), Some((7, nets(&["10.100.0.0/16"]))));
        assert_eq!(owned.take_all(), None);
    }

    #[test]
    fn routes_recorded_for_an_old_link_are_handed_back_when_the_link_changes() {
        let mut owned = OwnedRoutes::default();
        owned.on_link(7);
        owned.created(nets(&["172.16.5.0/24"]));
        assert_eq!(owned.on_link(7), None);
        assert_eq!(owned.on_link(9), Some((7, nets(&["172.16.5.0/24"]))));
        assert_eq!(owned.stale(&[]), vec![]);
        assert_eq!(owned.take_all(), None);
    }
}
