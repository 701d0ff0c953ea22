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
#[derive(Debug, Clone, Default, PartialEq, Eq)]
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
        update
            .apply(&name(iface)?, self.backend)
            .map_err(|error| apply_error(iface, error))
    }
}

/// wireguard-control words some failed applies with its Debug of the peer or update, which
/// holds the preshared or private key; that text would reach the journal and the status API.
/// Keep the kind (for the retry class), the interface and the OS error, and drop the rest.
fn apply_error(iface: &str, error: io::Error) -> io::Error {
    let cause = match error.raw_os_error() {
        Some(errno) => io::Error::from_raw_os_error(errno).to_string(),
        None => error.kind().to_string(),
    };
    io::Error::new(
        error.kind(),
        format!("applying settings to {iface} failed: {cause}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// wireguard-control's kernel backend words an oversized peer this way, its Debug and all.
    fn peer_too_large(psk: &Key) -> io::Error {
        let peer = PeerConfigBuilder::new(&Key([7; 32]))
            .set_preshared_key(psk.clone())
            .add_allowed_ip("198.51.100.7".parse().unwrap(), 32);
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("encoded peer (70000 bytes) is too large: {peer:?}"),
        )
    }

    #[test]
    fn a_failed_apply_names_the_interface_and_the_os_error_but_never_a_key() {
        let psk = Key([0x5a; 32]);
        let error = apply_error("wg0", peer_too_large(&psk));
        let text = error.to_string();
        assert!(!text.contains(&psk.to_base64()), "{text}");
        assert!(!text.contains("Key("), "{text}");
        assert!(text.contains("wg0"), "{text}");
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        // Through the provider's error, as the supervisor logs it and the status API shows it.
        let mesh = crate::mesh::MeshError::from(super::super::errors::WgError::Device {
            interface: "wg0".into(),
            source: apply_error("wg0", peer_too_large(&psk)),
        });
        assert!(
            !mesh.message().contains(&psk.to_base64()),
            "{}",
            mesh.message()
        );

        let denied = apply_error("wg0", io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(denied.kind(), io::ErrorKind::PermissionDenied);
        assert!(denied.to_string().contains("os error 1"), "{denied}");
    }
}

fn name(iface: &str) -> io::Result<InterfaceName> {
    iface
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{iface}: {e}")))
}

#[cfg(any(test, feature = "test-fakes"))]
pub use mem::{MemDevice, SentChange};

/// An in-memory device for tests that need no root: it applies changes the way the kernel
/// does with what `WgControl` sends, and counts reads and applies.
#[cfg(any(test, feature = "test-fakes"))]
mod mem {
    use std::io;
    use std::sync::{Mutex, MutexGuard, PoisonError};

    use ipnet::IpNet;

    use super::{DeviceChange, DeviceState, PeerStats, WgDevice};
    use crate::core::peer_diff::{PeerDiff, PeerKey, PeerMap, PeerSpec, Psk};

    /// A change as the device received it; the private key only as sent or not.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct SentChange {
        pub private_key: bool,
        pub listen_port: Option<u16>,
        pub fwmark: Option<u32>,
        pub peers: PeerDiff,
    }

    pub struct MemDevice {
        interface: String,
        inner: Mutex<Inner>,
    }

    #[derive(Default)]
    struct Inner {
        /// `stats` stays empty here; reads make them up from the peers.
        state: DeviceState,
        reads: usize,
        applies: usize,
        last: Option<SentChange>,
        fail_next_apply: Option<i32>,
    }

    impl MemDevice {
        /// An empty device named `interface`, as a fresh link or daemon has.
        pub fn new(interface: &str) -> Self {
            Self {
                interface: interface.to_string(),
                inner: Mutex::default(),
            }
        }

        pub fn reads(&self) -> usize {
            self.lock().reads
        }

        /// Calls to `apply`, failed ones included.
        pub fn applies(&self) -> usize {
            self.lock().applies
        }

        /// What the device holds now; not counted as a read.
        pub fn state(&self) -> DeviceState {
            snapshot(&self.lock().state)
        }

        /// The last change `apply` accepted.
        pub fn last_change(&self) -> Option<SentChange> {
            self.lock().last.clone()
        }

        /// Change the device as `wg set` or a restarted daemon would, unseen by clawnode.
        pub fn change_behind_our_back(&self, edit: impl FnOnce(&mut DeviceState)) {
            edit(&mut self.lock().state);
        }

        /// Make the next `apply` fail with this errno and change nothing.
        pub fn fail_next_apply(&self, errno: i32) {
            self.lock().fail_next_apply = Some(errno);
        }

        fn lock(&self) -> MutexGuard<'_, Inner> {
            self.inner.lock().unwrap_or_else(PoisonError::into_inner)
        }

        fn check(&self, iface: &str) -> io::Result<()> {
            if iface == self.interface {
                return Ok(());
            }
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{iface}: no such WireGuard device"),
            ))
        }
    }

    impl WgDevice for MemDevice {
        fn read(&self, iface: &str) -> io::Result<DeviceState> {
            self.check(iface)?;
            let mut inner = self.lock();
            inner.reads += 1;
            Ok(snapshot(&inner.state))
        }

        fn apply(&self, iface: &str, change: &DeviceChange<'_>) -> io::Result<()> {
            self.check(iface)?;
            let mut inner = self.lock();
            inner.applies += 1;
            if let Some(errno) = inner.fail_next_apply.take() {
                return Err(io::Error::from_raw_os_error(errno));
            }
            apply_to(&mut inner.state, change);
            inner.last = Some(SentChange {
                private_key: change.private_key.is_some(),
                listen_port: change.listen_port,
                fwmark: change.fwmark,
                peers: change.peers.clone(),
            });
            Ok(())
        }
    }

    fn snapshot(state: &DeviceState) -> DeviceState {
        let stats = state
            .peers
            .values()
            .map(|p| PeerStats {
                key: p.key,
                endpoint: p.endpoint,
                last_handshake: None,
                rx_bytes: 0,
                tx_bytes: 0,
            })
            .collect();
        DeviceState {
            stats,
            ..state.clone()
        }
    }

    /// In the order `WgControl` sends them: settings, removals, new peers, updates.
    fn apply_to(state: &mut DeviceState, change: &DeviceChange<'_>) {
        if let Some(private) = change.private_key {
            state.public_key = Some(private.public());
        }
        if let Some(port) = change.listen_port {
            state.listen_port = Some(port);
        }
        if let Some(mark) = change.fwmark {
            state.fwmark = (mark != 0).then_some(mark);
        }
        for key in &change.peers.remove {
            state.peers.remove(key);
        }
        // A new peer is sent with replace-allowed-ips and only the fields it has; for a peer the
        // device already holds (added behind our back), that is an update.
        for spec in &change.peers.add {
            let peer = peer_entry(&mut state.peers, spec.key);
            if spec.endpoint.is_some() {
                peer.endpoint = spec.endpoint;
            }
            if let Some(keepalive) = spec.keepalive {
                peer.keepalive = (keepalive != 0).then_some(keepalive);
            }
            if let Some(psk) = &spec.psk {
                peer.psk = nonzero(psk);
            }
            replace_allowed_ips(&mut state.peers, spec.key, &spec.allowed_ips);
        }
        for update in &change.peers.update {
            let spec = &update.spec;
            let peer = peer_entry(&mut state.peers, spec.key);
            if update.endpoint && spec.endpoint.is_some() {
                peer.endpoint = spec.endpoint;
            }
            if update.keepalive {
                peer.keepalive = spec.keepalive.filter(|&k| k != 0);
            }
            if update.psk {
                peer.psk = spec.psk.as_ref().and_then(nonzero);
            }
            if update.allowed_ips {
                replace_allowed_ips(&mut state.peers, spec.key, &spec.allowed_ips);
            }
        }
    }

    /// Setting a peer the device does not hold creates it, as WireGuard does.
    fn peer_entry(peers: &mut PeerMap, key: PeerKey) -> &mut PeerSpec {
        peers
            .entry(key)
            .or_insert_with(|| PeerSpec::new(key, Vec::new()))
    }

    /// An all-zero preshared key is how WireGuard says "none".
    fn nonzero(psk: &Psk) -> Option<Psk> {
        (psk.0 != [0; 32]).then(|| psk.clone())
    }

    /// A network routes to one peer per device: giving it to this peer takes it from any other.
    fn replace_allowed_ips(peers: &mut PeerMap, key: PeerKey, nets: &[IpNet]) {
        let nets: Vec<IpNet> = nets.iter().map(IpNet::trunc).collect();
        for (other, spec) in peers.iter_mut() {
            if *other != key {
                spec.allowed_ips.retain(|net| !nets.contains(net));
            }
        }
        if let Some(peer) = peers.get_mut(&key) {
            peer.allowed_ips = nets;
            peer.allowed_ips.sort();
            peer.allowed_ips.dedup();
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::core::peer_diff::PeerUpdate;

        fn key(n: u8) -> PeerKey {
            PeerKey([n; 32])
        }

        fn net(text: &str) -> IpNet {
            text.parse().unwrap()
        }

        fn apply(device: &MemDevice, diff: PeerDiff) {
            let change = DeviceChange {
                private_key: None,
                listen_port: None,
                fwmark: None,
                peers: &diff,
            };
            device.apply("wg0", &change).unwrap();
        }

        #[test]
        fn a_network_given_to_one_peer_is_taken_from_the_other() {
            let device = MemDevice::new("wg0");
            let a = PeerSpec::new(key(1), vec![net("10.0.0.0/24"), net("10.1.0.0/24")]);
            apply(
                &device,
                PeerDiff {
                    add: vec![a],
                    ..PeerDiff::default()
                },
            );
            let b = PeerSpec::new(key(2), vec![net("10.1.0.0/24")]);
            apply(
                &device,
                PeerDiff {
                    add: vec![b],
                    ..PeerDiff::default()
                },
            );
            let peers = device.state().peers;
            assert_eq!(peers[&key(1)].allowed_ips, vec![net("10.0.0.0/24")]);
            assert_eq!(peers[&key(2)].allowed_ips, vec![net("10.1.0.0/24")]);
        }

        #[test]
        fn an_update_sends_only_its_flagged_fields_and_a_zero_keepalive_turns_it_off() {
            let device = MemDevice::new("wg0");
            let mut a = PeerSpec::new(key(1), vec![net("10.0.0.0/24")]);
            a.endpoint = Some("192.0.2.1:51820".parse().unwrap());
            a.keepalive = Some(25);
            apply(
                &device,
                PeerDiff {
                    add: vec![a.clone()],
                    ..PeerDiff::default()
                },
            );
            let mut changed = a.clone();
            changed.endpoint = Some("192.0.2.9:51820".parse().unwrap());
            changed.keepalive = None;
            apply(
                &device,
                PeerDiff {
                    update: vec![PeerUpdate {
                        spec: changed,
                        endpoint: false,
                        allowed_ips: false,
                        keepalive: true,
                        psk: false,
                    }],
                    ..PeerDiff::default()
                },
            );
            let peer = &device.state().peers[&key(1)];
            assert_eq!(peer.endpoint, a.endpoint);
            assert_eq!(peer.keepalive, None);
        }

        #[test]
        fn another_interface_name_is_not_this_device() {
            let device = MemDevice::new("wg0");
            let error = device.read("wg1").unwrap_err();
            assert_eq!(error.kind(), io::ErrorKind::NotFound);
            assert_eq!(device.reads(), 0);
        }
    }
}
