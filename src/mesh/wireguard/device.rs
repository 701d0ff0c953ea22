//! The WireGuard device boundary: read a device's state and apply changes to it. The real
//! implementation is wireguard-control (generic netlink for the kernel, UAPI for userspace);
//! both are blocking, so callers run them on the blocking pool.

use std::io;
use std::net::SocketAddr;
use std::time::SystemTime;

use ipnet::IpNet;
use wireguard_control::{Backend, Device, DeviceUpdate, InterfaceName, Key, PeerConfigBuilder};

use crate::core::peer_diff::{PeerDiff, PeerKey, PeerMap, PeerSpec, Psk};

use super::keys::PrivateKey;

/// What a device holds, as read back from it.
#[derive(Debug, Clone, Default)]
pub struct DeviceState {
    pub public_key: Option<PeerKey>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub peers: PeerMap,
    pub stats: Vec<PeerStats>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStats {
    pub key: PeerKey,
    pub endpoint: Option<SocketAddr>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// One change to send: interface settings that differ, and the peer diff.
pub struct DeviceChange<'a> {
    pub private_key: Option<&'a PrivateKey>,
    pub listen_port: Option<u16>,
    /// `Some(0)` clears the mark.
    pub fwmark: Option<u32>,
    pub peers: &'a PeerDiff,
}

impl DeviceChange<'_> {
    pub fn is_empty(&self) -> bool {
        self.private_key.is_none()
            && self.listen_port.is_none()
            && self.fwmark.is_none()
            && self.peers.is_empty()
    }
}

pub trait WgDevice: Send + Sync {
    fn read(&self, iface: &str) -> io::Result<DeviceState>;
    fn apply(&self, iface: &str, change: &DeviceChange<'_>) -> io::Result<()>;
}

/// wireguard-control with a fixed backend.
pub struct WgControl {
    pub backend: Backend,
}

impl WgDevice for WgControl {
    fn read(&self, iface: &str) -> io::Result<DeviceState> {
        let device = Device::get(&name(iface)?, self.backend)?;
        let mut state = DeviceState {
            public_key: device.public_key.map(|k| PeerKey(k.0)),
            listen_port: device.listen_port,
            fwmark: device.fwmark.filter(|&m| m != 0),
            ..DeviceState::default()
        };
        // `Device` carries the private key and its Debug prints it: it is dropped here, unlogged.
        for info in device.peers {
            let config = info.config;
            let key = PeerKey(config.public_key.0);
            let allowed_ips = config
                .allowed_ips
                .iter()
                .filter_map(|ip| IpNet::new(ip.address, ip.cidr).ok())
                .map(|net| net.trunc())
                .collect();
            let mut spec = PeerSpec::new(key, allowed_ips);
            spec.endpoint = config.endpoint;
            spec.keepalive = config.persistent_keepalive_interval.filter(|&k| k != 0);
            spec.psk = config
                .preshared_key
                .map(|k| k.0)
                .filter(|k| k.iter().any(|&b| b != 0))
                .map(Psk);
            state.stats.push(PeerStats {
                key,
                endpoint: config.endpoint,
                last_handshake: info.stats.last_handshake_time,
                rx_bytes: info.stats.rx_bytes,
                tx_bytes: info.stats.tx_bytes,
            });
            state.peers.insert(key, spec);
        }
        Ok(state)
    }

    fn apply(&self, iface: &str, change: &DeviceChange<'_>) -> io::Result<()> {
        if change.is_empty() {
            return Ok(());
        }
        let mut update = DeviceUpdate::new();
        if let Some(private) = change.private_key {
            update = update.set_private_key(Key(*private.bytes()));
        }
        if let Some(port) = change.listen_port {
            update = update.set_listen_port(port);
        }
        match change.fwmark {
            Some(0) => update = update.unset_fwmark(),
            Some(mark) => update = update.set_fwmark(mark),
            None => {}
        }
        for key in &change.peers.remove {
            update = update.remove_peer_by_key(&Key(key.0));
        }
        for spec in &change.peers.add {
            let mut peer = PeerConfigBuilder::new(&Key(spec.key.0)).replace_allowed_ips();
            if let Some(endpoint) = spec.endpoint {
                peer = peer.set_endpoint(endpoint);
            }
            for net in &spec.allowed_ips {
                peer = peer.add_allowed_ip(net.addr(), net.prefix_len());
            }
            if let Some(keepalive) = spec.keepalive {
                peer = peer.set_persistent_keepalive_interval(keepalive);
            }
            if let Some(psk) = &spec.psk {
                peer = peer.set_preshared_key(Key(psk.0));
            }
            update = update.add_peer(peer);
        }
        for u in &change.peers.update {
            let spec = &u.spec;
            let mut peer = PeerConfigBuilder::new(&Key(spec.key.0));
            if u.endpoint
                && let Some(endpoint) = spec.endpoint
            {
                peer = peer.set_endpoint(endpoint);
            }
            if u.allowed_ips {
                peer = peer.replace_allowed_ips();
                for net in &spec.allowed_ips {
                    peer = peer.add_allowed_ip(net.addr(), net.prefix_len());
                }
            }
            if u.keepalive {
                peer = peer.set_persistent_keepalive_interval(spec.keepalive.unwrap_or(0));
            }
            if u.psk {
                peer = match &spec.psk {
                    Some(psk) => peer.set_preshared_key(Key(psk.0)),
                    None => peer.unset_preshared_key(),
                };
            }
            update = update.add_peer(peer);
        }
        update.apply(&name(iface)?, self.backend)
    }
}

fn name(iface: &str) -> io::Result<InterfaceName> {
    iface
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{iface}: {e}")))
}
