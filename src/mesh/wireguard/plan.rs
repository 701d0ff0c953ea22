//! Which peers a reconcile applies, and the routes they need: every configured peer is read,
//! the endpoint names are resolved together, then each peer is prepared (its preshared key
//! read, its routes checked by `core::routes`). A refused peer skips its drop-in file whole
//! (or just itself in the main config) and is reported; the others are applied.

use std::collections::BTreeMap;

use ipnet::IpNet;

use crate::config::{self, PeerConfig, WireguardConfig};
use crate::core::peer_diff::{PeerKey, PeerMap, PeerSpec, Psk};
use crate::core::routes::{self, RoutePolicy};

use super::keys;
use super::resolve::{Answer, Resolver};

/// What one reconcile applies.
pub struct PeerPlan {
    /// The peers applied, by key, with their names for the status view.
    pub peers: PeerMap,
    pub names: Vec<(PeerKey, String)>,
    /// Every route the applied peers need, the mesh CIDR first.
    pub routes: Vec<IpNet>,
    /// Refused peers and files, and endpoints that did not resolve.
    pub problems: Vec<String>,
}

/// Plan the peers of `wg`; `local_networks` are the host's networks outside the mesh link.
pub async fn plan(
    wg: &WireguardConfig,
    resolver: &Resolver,
    local_networks: Vec<IpNet>,
) -> PeerPlan {
    let sources = config::peers::read_peers(wg);
    let answers = resolver
        .resolve(
            sources
                .iter()
                .flat_map(|s| &s.peers)
                .filter_map(|p| p.endpoint.as_ref()),
        )
        .await;
    let endpoint_of =
        |peer: &PeerConfig| -> Option<&Answer> { answers.get(peer.endpoint.as_ref()?) };
    let policy = RoutePolicy {
        mesh_cidr: wg.mesh_cidr,
        allow_unsafe: wg.allow_unsafe_routes,
        endpoints: sources
            .iter()
            .flat_map(|s| &s.peers)
            .filter_map(|p| Some((p.name.clone(), endpoint_of(p)?.addr?.ip())))
            .collect(),
        local_networks,
    };
    let (accepted, mut problems) = config::peers::prepare_peers(sources, |peer| {
        let psk = peer
            .preshared_key_file
            .as_deref()
            .map(keys::read_psk)
            .transpose()
            .map_err(|error| error.to_string())?;
        let routes = policy
            .routes_of(&peer.allowed_ips)
            .map_err(|refusal| refusal.to_string())?;
        Ok((psk, routes))
    });
    let mut peers = BTreeMap::new();
    let mut names = Vec::with_capacity(accepted.len());
    let mut peer_routes = Vec::new();
    for (peer, (psk, routes)) in accepted {
        let spec = spec(&peer, psk, endpoint_of(&peer));
        if let (Some(endpoint), Some(problem)) = (
            &peer.endpoint,
            endpoint_of(&peer).and_then(|a| a.problem.as_ref()),
        ) {
            tracing::warn!(component = "mesh", peer = %peer.name, %endpoint, %problem, "cannot resolve peer endpoint");
            problems.push(format!(
                "peer {:?}: endpoint {endpoint} {problem}",
                peer.name
            ));
        }
        names.push((spec.key, peer.name));
        peers.insert(spec.key, spec);
        peer_routes.extend(routes);
    }
    PeerPlan {
        peers,
        names,
        routes: routes::wanted(wg.mesh_cidr, peer_routes),
        problems,
    }
}

fn spec(peer: &PeerConfig, psk: Option<Psk>, endpoint: Option<&Answer>) -> PeerSpec {
    let mut spec = PeerSpec::new(
        PeerKey(*peer.public_key.as_bytes()),
        peer.allowed_ips.clone(),
    );
    spec.keepalive = peer.persistent_keepalive;
    spec.psk = psk;
    spec.endpoint = endpoint.and_then(|a| a.addr);
    spec
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, SocketAddr};
    use std::path::Path;
    use std::time::Duration;

    use super::*;

    fn key(n: u8) -> String {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode([n; 32])
    }

    fn peer(table: &str, n: u8, endpoint: &str, allowed_ips: &str) -> String {
        format!(
            "[[{table}]]\nname = \"node-{n}\"\npublic_key = \"{}\"\nendpoint = \"{endpoint}\"\nallowed_ips = [{allowed_ips}]\n",
            key(n)
        )
    }

    /// Every name resolves to 203.0.113.9.
    fn resolver() -> Resolver {
        Resolver::with_lookup(Duration::from_secs(1), |_, port| {
            Ok(vec![SocketAddr::new(IpAddr::from([203, 0, 113, 9]), port)])
        })
    }

    #[tokio::test]
    async fn a_route_over_a_resolved_endpoint_skips_its_drop_in_file_and_the_rest_apply() {
        let dir = tempfile::tempdir().unwrap();
        let main = format!(
            "[node]\nname = \"gpu-01\"\n[network.wireguard]\naddress = \"10.100.0.9/16\"\npeers_dir = \"{}\"\n{}",
            dir.path().display(),
            peer(
                "network.wireguard.peers",
                1,
                "gw.example:51820",
                "\"10.100.0.1/32\", \"172.16.1.0/24\""
            ),
        );
        let config = crate::config::parse(Path::new("main.toml"), &main).unwrap();
        // node-3 claims the network node-1's endpoint name resolves into: its file goes whole.
        std::fs::write(
            dir.path().join("a.toml"),
            peer("peers", 2, "198.51.100.2:51820", "\"10.100.0.2/32\"")
                + &peer(
                    "peers",
                    3,
                    "198.51.100.3:51820",
                    "\"10.100.0.3/32\", \"203.0.113.0/24\"",
                ),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("b.toml"),
            peer(
                "peers",
                4,
                "198.51.100.4:51820",
                "\"10.100.0.4/32\", \"172.16.4.0/24\"",
            ),
        )
        .unwrap();

        let plan = plan(
            &config.network.wireguard,
            &resolver(),
            vec!["192.168.1.0/24".parse().unwrap()],
        )
        .await;

        let names: Vec<&str> = plan.names.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["node-1", "node-4"]);
        assert_eq!(plan.peers.len(), 2);
        let node1 = &plan.peers[&plan.names[0].0];
        assert_eq!(node1.endpoint, Some("203.0.113.9:51820".parse().unwrap()));
        let routes: Vec<String> = plan.routes.iter().map(ToString::to_string).collect();
        assert_eq!(routes, ["10.100.0.0/16", "172.16.1.0/24", "172.16.4.0/24"]);
        assert_eq!(plan.problems.len(), 1, "{:#?}", plan.problems);
        assert!(
            plan.problems[0].contains("a.toml: peer \"node-3\": allowed IP 203.0.113.0/24 covers peer \"node-1\"'s endpoint 203.0.113.9"),
            "{}",
            plan.problems[0]
        );
    }
}
