//! What `clawnode status` and `clawnode peers` show of the WireGuard interface: read live from
//! the device when asked, so handshake ages and byte counters are current without any polling.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::UNIX_EPOCH;

use super::device::WgDevice;
use super::keys;
use crate::core::peer_diff::PeerKey;
pub use crate::mesh::live::WgStatus;
use crate::mesh::{BoxFuture, LiveSource, LiveStatus, TunnelPeer};

/// The interface to read, set by the provider once it is configured.
#[derive(Clone, Default)]
pub struct LiveTarget(Arc<RwLock<Option<Target>>>);

#[derive(Clone)]
pub struct Target {
    pub interface: String,
    pub device: Arc<dyn WgDevice>,
    pub backend_name: &'static str,
    pub addresses: Vec<String>,
    pub names: BTreeMap<PeerKey, String>,
    /// The gateway coordination, when the node follows a gateway.
    pub gateway: Option<Arc<super::gateway::Shared>>,
}

impl LiveTarget {
    pub fn set(&self, target: Option<Target>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = target;
    }

    /// Read the device now (blocking: call from the blocking pool). `None` when no interface
    /// is configured.
    pub fn read(&self) -> Option<std::io::Result<WgStatus>> {
        let target = self.0.read().unwrap_or_else(|p| p.into_inner()).clone()?;
        Some(read(&target))
    }
}

impl LiveSource for LiveTarget {
    fn read(&self) -> BoxFuture<'_, Option<LiveStatus>> {
        let live = self.clone();
        Box::pin(async move {
            match tokio::task::spawn_blocking(move || LiveTarget::read(&live)).await {
                Ok(Some(Ok(status))) => Some(LiveStatus::Wireguard(status)),
                Ok(Some(Err(error))) => {
                    tracing::debug!(component = "mesh", %error, "cannot read the WireGuard device");
                    None
                }
                _ => None,
            }
        })
    }
}

fn read(target: &Target) -> std::io::Result<WgStatus> {
    let state = target.device.read(&target.interface)?;
    let peers = state
        .stats
        .iter()
        .map(|s| {
            let spec = state.peers.get(&s.key);
            TunnelPeer {
                name: target.names.get(&s.key).cloned(),
                public_key: keys::to_base64(&s.key),
                endpoint: s.endpoint.map(|e| e.to_string()),
                allowed_ips: spec
                    .map(|p| p.allowed_ips.iter().map(ToString::to_string).collect())
                    .unwrap_or_default(),
                persistent_keepalive: spec.and_then(|p| p.keepalive),
                last_handshake_unix_ms: s
                    .last_handshake
                    .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                    .filter(|d| !d.is_zero())
                    .map(|d| d.as_millis() as u64),
                rx_bytes: s.rx_bytes,
                tx_bytes: s.tx_bytes,
            }
        })
        .collect();
    Ok(WgStatus {
        backend: target.backend_name.to_string(),
        interface: target.interface.clone(),
        public_key: state.public_key.as_ref().map(keys::to_base64),
        listen_port: state.listen_port,
        fwmark: state.fwmark,
        addresses: target.addresses.clone(),
        peers,
        gateway: target.gateway.as_ref().map(|g| {
            let now = std::time::SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            g.doc(now)
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::peer_diff::PeerSpec;
    use crate::mesh::wireguard::device::MemDevice;

    #[test]
    fn the_live_view_shows_the_peers_the_device_holds_under_their_configured_names() {
        let device = Arc::new(MemDevice::new("wg0"));
        let key = PeerKey([7; 32]);
        device.change_behind_our_back(|state| {
            state.listen_port = Some(51820);
            let mut spec = PeerSpec::new(key, vec!["10.100.0.7/32".parse().unwrap()]);
            spec.keepalive = Some(25);
            state.peers.insert(key, spec);
        });
        let live = LiveTarget::default();
        assert!(live.read().is_none(), "nothing configured yet");
        live.set(Some(Target {
            interface: "wg0".into(),
            device: device.clone(),
            backend_name: "userspace",
            addresses: vec!["10.100.0.1/24".into()],
            names: BTreeMap::from([(key, "node-7".to_string())]),
            gateway: None,
        }));

        let status = live.read().unwrap().unwrap();

        assert_eq!(status.listen_port, Some(51820));
        assert_eq!(status.peers.len(), 1);
        let peer = &status.peers[0];
        assert_eq!(peer.name.as_deref(), Some("node-7"));
        assert_eq!(peer.allowed_ips, vec!["10.100.0.7/32".to_string()]);
        assert_eq!(peer.persistent_keepalive, Some(25));
        assert_eq!(peer.last_handshake_unix_ms, None);
        assert_eq!(device.reads(), 1);
    }
}
