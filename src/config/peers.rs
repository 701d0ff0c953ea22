//! The peers a WireGuard node is configured with: `[[network.wireguard.peers]]` plus the
//! drop-in files in `peers_dir`.

use std::net::IpAddr;
use std::path::PathBuf;

use super::{PeerConfig, WireguardConfig};

/// Every configured peer: `[[network.wireguard.peers]]`, then the drop-in files in
/// `peers_dir` (`*.toml`, in name order). A file that does not validate is skipped whole and
/// reported; the other peers stay. A public key seen twice keeps its first definition.
pub fn configured_peers(wg: &WireguardConfig) -> (Vec<PeerConfig>, Vec<String>) {
    let mut peers = wg.peers.clone();
    let mut problems = Vec::new();
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&wg.peers_dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect(),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(error) => {
            problems.push(format!(
                "cannot read peers_dir {}: {error}",
                wg.peers_dir.display()
            ));
            Vec::new()
        }
    };
    files.sort();
    for file in files {
        match super::load_peers_file(&file) {
            Ok(more) => {
                for peer in more {
                    if peers.iter().any(|p| p.public_key == peer.public_key) {
                        problems.push(format!(
                            "{}: peer {:?} repeats a public key already configured; ignored",
                            file.display(),
                            peer.name
                        ));
                        continue;
                    }
                    peers.push(peer);
                }
            }
            Err(errors) => {
                for error in &errors.0 {
                    tracing::error!(component = "mesh", %error, "peer file rejected; its peers are not applied");
                }
                problems.extend(errors.0.iter().map(|e| format!("peer file rejected: {e}")));
            }
        }
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
