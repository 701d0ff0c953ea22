//! The peers a WireGuard node is configured with: `[[network.wireguard.peers]]` plus the
//! drop-in files in `peers_dir`.

use std::net::IpAddr;
use std::path::PathBuf;

use super::{PeerConfig, PublicKey, WireguardConfig};

/// Every configured peer: `[[network.wireguard.peers]]`, then the drop-in files in
/// `peers_dir` (`*.toml`, in name order). A file that does not validate is skipped whole and
/// reported; the other peers stay. A public key seen twice keeps its first definition.
pub fn configured_peers(wg: &WireguardConfig) -> (Vec<PeerConfig>, Vec<String>) {
    let (peers, problems) = configured_peers_with(wg, |_| Ok(()));
    (peers.into_iter().map(|(peer, ())| peer).collect(), problems)
}

/// Like `configured_peers`, with `prepare` run on each peer that would be applied (reading its
/// preshared key, say) and its result kept beside the peer. A peer `prepare` refuses counts
/// like a file that does not validate: a drop-in file with such a peer is skipped whole, a
/// peer in `[[network.wireguard.peers]]` skips just itself; each is reported, the rest stay.
pub fn configured_peers_with<T>(
    wg: &WireguardConfig,
    prepare: impl FnMut(&PeerConfig) -> Result<T, String>,
) -> (Vec<(PeerConfig, T)>, Vec<String>) {
    prepare_peers(read_peers(wg), prepare)
}

/// Where peers came from: one `[[network.wireguard.peers]]` entry, or one drop-in file.
#[derive(Debug, Clone)]
pub struct PeerSource {
    /// `None` for an entry of the main config.
    pub file: Option<PathBuf>,
    pub peers: Vec<PeerConfig>,
    /// What reading it found (a file that does not validate, a repeated key), in order.
    pub problems: Vec<String>,
}

/// Every peer definition, by source in the order `configured_peers` applies them, before any
/// preparation: for a caller that must see all peers (their endpoints, say) before it decides
/// on any. A public key seen twice keeps its first definition.
pub fn read_peers(wg: &WireguardConfig) -> Vec<PeerSource> {
    let mut sources = Vec::new();
    // Every definition read so far, applied or not: a peer skipped for a bad preshared key is
    // not applied through a later copy of it either.
    let mut seen: Vec<PublicKey> = Vec::new();
    for peer in &wg.peers {
        if seen.contains(&peer.public_key) {
            // Validation refuses this already; kept so the first definition always wins.
            continue;
        }
        seen.push(peer.public_key.clone());
        sources.push(PeerSource {
            file: None,
            peers: vec![peer.clone()],
            problems: Vec::new(),
        });
    }
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&wg.peers_dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(error) => {
            sources.push(PeerSource {
                file: None,
                peers: Vec::new(),
                problems: vec![format!(
                    "cannot read peers_dir {}: {error}",
                    wg.peers_dir.display()
                )],
            });
            Vec::new()
        }
    };
    files.sort();
    for file in files {
        let mut source = PeerSource {
            file: Some(file.clone()),
            peers: Vec::new(),
            problems: Vec::new(),
        };
        match super::load_peers_file(&file) {
            Ok(more) => {
                for peer in more {
                    if seen.contains(&peer.public_key) {
                        source.problems.push(format!(
                            "{}: peer {:?} repeats a public key already configured; ignored",
                            file.display(),
                            peer.name
                        ));
                        continue;
                    }
                    seen.push(peer.public_key.clone());
                    source.peers.push(peer);
                }
            }
            Err(errors) => {
                for error in &errors.0 {
                    tracing::error!(component = "mesh", %error, "peer file rejected; its peers are not applied");
                }
                source
                    .problems
                    .extend(errors.0.iter().map(|e| format!("peer file rejected: {e}")));
            }
        }
        sources.push(source);
    }
    sources
}

/// The peers of `sources` that `prepare` accepts, each with its result, and the problems in
/// source order. A drop-in file with a refused peer is skipped whole; a main-config entry
/// skips just itself.
pub fn prepare_peers<T>(
    sources: Vec<PeerSource>,
    mut prepare: impl FnMut(&PeerConfig) -> Result<T, String>,
) -> (Vec<(PeerConfig, T)>, Vec<String>) {
    let mut peers: Vec<(PeerConfig, T)> = Vec::new();
    let mut problems = Vec::new();
    for source in sources {
        problems.extend(source.problems);
        let Some(file) = source.file else {
            for peer in source.peers {
                match prepare(&peer) {
                    Ok(prepared) => peers.push((peer, prepared)),
                    Err(error) => {
                        tracing::error!(component = "mesh", peer = %peer.name, %error, "peer skipped; it is not applied");
                        problems.push(format!(
                            "[[network.wireguard.peers]] peer {:?} skipped: {error}",
                            peer.name
                        ));
                    }
                }
            }
            continue;
        };
        let mut kept: Vec<(PeerConfig, T)> = Vec::new();
        let mut refused = Vec::new();
        for peer in source.peers {
            match prepare(&peer) {
                Ok(prepared) => kept.push((peer, prepared)),
                Err(error) => {
                    refused.push(format!("{}: peer {:?}: {error}", file.display(), peer.name))
                }
            }
        }
        if refused.is_empty() {
            peers.extend(kept);
            continue;
        }
        for error in &refused {
            tracing::error!(component = "mesh", %error, "peer file rejected; its peers are not applied");
        }
        problems.extend(refused.iter().map(|e| format!("peer file rejected: {e}")));
    }
    (peers, problems)
}

/// The mesh address of each peer: its first single-host allowed IP inside the mesh CIDR.
pub fn peer_mesh_addresses(wg: &WireguardConfig) -> Vec<IpAddr> {
    configured_peers(wg)
        .0
        .iter()
        .filter_map(|p| {
            p.allowed_ips
                .iter()
                .find(|net| net.prefix_len() == net.max_prefix_len() && wg.mesh_cidr.contains(*net))
                .map(|net| net.addr())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn key(n: u8) -> &'static str {
        [
            "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=",
            "AgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgI=",
            "AwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=",
            "BAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQ=",
            "BQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFBQU=",
            "BgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgYGBgY=",
        ][usize::from(n) - 1]
    }

    /// A `[[table]]` for peer `n`; `psk` names its preshared key file.
    fn peer(table: &str, n: u8, psk: &str) -> String {
        format!(
            "[[{table}]]\nname = \"node-{n}\"\npublic_key = \"{}\"\nallowed_ips = [\"10.100.0.{n}/32\"]\npreshared_key_file = \"/keys/{psk}\"\n",
            key(n)
        )
    }

    /// Stands in for reading the preshared key: a file named `missing` is not there.
    fn read_psk(peer: &PeerConfig) -> Result<String, String> {
        let path = peer.preshared_key_file.clone().unwrap_or_default();
        if path.ends_with("missing") {
            return Err(format!("cannot read key file {}", path.display()));
        }
        Ok(path.display().to_string())
    }

    #[test]
    fn a_bad_peer_skips_its_drop_in_file_whole_or_only_itself_in_the_main_config() {
        let dir = tempfile::tempdir().unwrap();
        let peers_dir = dir.path().join("peers.d");
        std::fs::create_dir(&peers_dir).unwrap();
        let main = format!(
            "[node]\nname = \"gpu-01\"\n[network.wireguard]\naddress = \"10.100.0.9/16\"\npeers_dir = \"{}\"\n{}{}",
            peers_dir.display(),
            peer("network.wireguard.peers", 1, "one"),
            peer("network.wireguard.peers", 2, "missing"),
        );
        let config = crate::config::parse(Path::new("main.toml"), &main).unwrap();
        std::fs::write(peers_dir.join("a-good.toml"), peer("peers", 3, "three")).unwrap();
        std::fs::write(
            peers_dir.join("b-lost.toml"),
            peer("peers", 4, "four") + &peer("peers", 5, "missing"),
        )
        .unwrap();
        // A later copy of a skipped peer is not applied in its place.
        std::fs::write(peers_dir.join("c-copy.toml"), peer("peers", 2, "two")).unwrap();

        let (peers, problems) = configured_peers_with(&config.network.wireguard, read_psk);

        let applied: Vec<(&str, &str)> = peers
            .iter()
            .map(|(p, psk)| (p.name.as_str(), psk.as_str()))
            .collect();
        assert_eq!(
            applied,
            vec![("node-1", "/keys/one"), ("node-3", "/keys/three")]
        );
        assert_eq!(problems.len(), 3, "{problems:#?}");
        assert_eq!(
            problems[0],
            "[[network.wireguard.peers]] peer \"node-2\" skipped: cannot read key file /keys/missing"
        );
        let lost = peers_dir.join("b-lost.toml");
        assert_eq!(
            problems[1],
            format!(
                "peer file rejected: {}: peer \"node-5\": cannot read key file /keys/missing",
                lost.display()
            )
        );
        assert!(
            problems[2].contains("c-copy.toml: peer \"node-2\" repeats a public key"),
            "{problems:#?}"
        );
    }

    #[test]
    fn without_a_preparation_every_valid_peer_is_configured() {
        let dir = tempfile::tempdir().unwrap();
        let main = format!(
            "[node]\nname = \"gpu-01\"\n[network.wireguard]\naddress = \"10.100.0.9/16\"\npeers_dir = \"{}\"\n{}",
            dir.path().display(),
            peer("network.wireguard.peers", 1, "missing"),
        );
        let config = crate::config::parse(Path::new("main.toml"), &main).unwrap();
        std::fs::write(dir.path().join("x.toml"), peer("peers", 2, "missing")).unwrap();
        let (peers, problems) = configured_peers(&config.network.wireguard);
        let names: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, vec!["node-1", "node-2"]);
        assert!(problems.is_empty(), "{problems:?}");
    }
}
