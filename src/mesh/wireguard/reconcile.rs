//! The device step of a reconcile: bring a WireGuard device to the wanted key, port, mark and
//! peers, and remember what was applied.
//!
//! Reading a device with thousands of peers back costs more than the change itself, so when
//! nothing can have touched the device since clawnode last applied to it, the change is diffed
//! against that instead. A read is forced when the monitor saw drift, the interface differs, or
//! the userspace daemon is a new one (a restarted daemon is an empty device). Blocking, like the
//! device calls; it needs no netlink and no privileges of its own.

use std::io;

use crate::core::peer_diff::{self, PeerKey, PeerMap};

use super::device::{DeviceChange, WgDevice};
use super::keys::PrivateKey;

/// What the device should hold.
pub struct Wanted {
    pub interface: String,
    pub key: PrivateKey,
    pub listen_port: u16,
    /// 0: no mark.
    pub fwmark: u32,
    pub peers: PeerMap,
    /// The userspace daemon serving the interface, if any.
    pub daemon_pid: Option<u32>,
}

/// What one `sync` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Synced {
    /// Peers added, updated or removed.
    pub peer_changes: usize,
    /// Key, listen port or fwmark changed.
    pub settings_changed: bool,
    /// The device was read back rather than trusted.
    pub read: bool,
}

/// The device as clawnode last left it.
struct Trusted {
    interface: String,
    daemon_pid: Option<u32>,
    public_key: PeerKey,
    listen_port: u16,
    fwmark: u32,
}

/// What clawnode applied to the device, kept between reconciles.
#[derive(Default)]
pub struct DeviceSync {
    /// The peers clawnode last applied, to tell configured endpoint changes from roaming.
    applied: PeerMap,
    /// Set after a successful apply; `None` means the device must be read first.
    trusted: Option<Trusted>,
}

impl DeviceSync {
    /// The peers last applied (the wanted ones, after a successful `sync`).
    pub fn applied(&self) -> &PeerMap {
        &self.applied
    }

    /// Make the device hold `want`. `must_read`: something may have changed the device behind
    /// clawnode's back, so it is read even if trusted. On error nothing is trusted any more.
    pub fn sync(
        &mut self,
        device: &dyn WgDevice,
        want: Wanted,
        must_read: bool,
    ) -> io::Result<Synced> {
        let trusted = self
            .trusted
            .take()
            .filter(|t| !must_read && t.interface == want.interface)
            .filter(|t| t.daemon_pid == want.daemon_pid);
        let read_back;
        let (current, public_key, listen_port, fwmark) = match &trusted {
            Some(t) => (
                &self.applied,
                Some(t.public_key),
                Some(t.listen_port),
                t.fwmark,
            ),
            None => {
                read_back = device.read(&want.interface)?;
                (
                    &read_back.peers,
                    read_back.public_key,
                    read_back.listen_port,
                    read_back.fwmark.unwrap_or(0),
                )
            }
        };
        let public = want.key.public();
        let diff = peer_diff::diff(current, &want.peers, &self.applied);
        let change = DeviceChange {
            private_key: (public_key != Some(public)).then_some(&want.key),
            listen_port: (listen_port != Some(want.listen_port)).then_some(want.listen_port),
            fwmark: (fwmark != want.fwmark).then_some(want.fwmark),
            peers: &diff,
        };
        let synced = Synced {
            peer_changes: diff.len(),
            settings_changed: change.private_key.is_some()
                || change.listen_port.is_some()
                || change.fwmark.is_some(),
            read: trusted.is_none(),
        };
        if !change.is_empty() {
            device.apply(&want.interface, &change)?;
        }
        self.trusted = Some(Trusted {
            interface: want.interface,
            daemon_pid: want.daemon_pid,
            public_key: public,
            listen_port: want.listen_port,
            fwmark: want.fwmark,
        });
        self.applied = want.peers;
        Ok(synced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::peer_diff::PeerSpec;
    use crate::mesh::wireguard::device::MemDevice;

    const IFACE: &str = "wgtest0";

    fn key(n: u8) -> PeerKey {
        PeerKey([n; 32])
    }

    fn peer(n: u8) -> PeerSpec {
        let mut p = PeerSpec::new(key(n), vec![format!("10.100.0.{n}/32").parse().unwrap()]);
        p.endpoint = Some(format!("192.0.2.{n}:51820").parse().unwrap());
        p
    }

    fn peers(ns: impl IntoIterator<Item = u8>) -> PeerMap {
        ns.into_iter().map(|n| (key(n), peer(n))).collect()
    }

    /// A fixed node key, so that every `Wanted` asks for the same one.
    fn node_key() -> PrivateKey {
        PrivateKey::from_bytes([0x40; 32])
    }

    fn want(peers: PeerMap, daemon_pid: Option<u32>) -> Wanted {
        Wanted {
            interface: IFACE.into(),
            key: node_key(),
            listen_port: 51820,
            fwmark: 0,
            peers,
            daemon_pid,
        }
    }

    /// A device configured once, from empty, by a first sync.
    fn configured(ns: impl IntoIterator<Item = u8> + Clone) -> (MemDevice, DeviceSync) {
        let device = MemDevice::new(IFACE);
        let mut sync = DeviceSync::default();
        let first = sync
            .sync(&device, want(peers(ns.clone()), None), true)
            .unwrap();
        assert!(first.read && first.settings_changed);
        assert_eq!(device.state().peers, peers(ns));
        (device, sync)
    }

    #[test]
    fn reconciling_again_with_nothing_changed_neither_reads_nor_writes_the_device() {
        let (device, mut sync) = configured(1..=3);
        let (reads, applies) = (device.reads(), device.applies());

        let again = sync.sync(&device, want(peers(1..=3), None), false).unwrap();

        assert_eq!(
            again,
            Synced {
                peer_changes: 0,
                settings_changed: false,
                read: false
            }
        );
        assert_eq!(device.reads(), reads, "the device was read");
        assert_eq!(device.applies(), applies, "something was applied");
    }

    #[test]
    fn a_config_change_with_nothing_touched_behind_our_back_is_applied_without_reading_the_device()
    {
        let (device, mut sync) = configured(1..=3);
        let (reads, applies) = (device.reads(), device.applies());

        let added = sync.sync(&device, want(peers(1..=4), None), false).unwrap();

        assert!(!added.read);
        assert_eq!(added.peer_changes, 1);
        assert_eq!(device.reads(), reads);
        assert_eq!(device.applies(), applies + 1);
        assert_eq!(device.state().peers, peers(1..=4));
    }

    #[test]
    fn a_peer_removed_behind_our_back_comes_back_once_the_monitor_flags_drift() {
        let (device, mut sync) = configured(1..=3);
        device.change_behind_our_back(|state| {
            state.peers.remove(&key(2));
        });
        let reads = device.reads();

        // Unflagged, clawnode trusts what it applied and cannot see the drift.
        let trusting = sync.sync(&device, want(peers(1..=3), None), false).unwrap();
        assert_eq!(trusting.peer_changes, 0);
        assert_eq!(device.reads(), reads);

        let repaired = sync.sync(&device, want(peers(1..=3), None), true).unwrap();

        assert!(repaired.read);
        assert_eq!(repaired.peer_changes, 1);
        assert_eq!(device.reads(), reads + 1);
        assert_eq!(device.last_change().unwrap().peers.add, vec![peer(2)]);
        assert_eq!(device.state().peers, peers(1..=3));
    }

    #[test]
    fn a_restarted_userspace_daemon_is_read_and_configured_again_from_scratch() {
        let device = MemDevice::new(IFACE);
        let mut sync = DeviceSync::default();
        sync.sync(&device, want(peers(1..=2), Some(100)), true)
            .unwrap();
        // The new daemon comes up empty; no drift event says so, only its pid.
        device.change_behind_our_back(|state| *state = Default::default());
        let reads = device.reads();

        let after = sync
            .sync(&device, want(peers(1..=2), Some(200)), false)
            .unwrap();

        assert!(after.read && after.settings_changed);
        assert_eq!(device.reads(), reads + 1);
        assert_eq!(after.peer_changes, 2);
        let state = device.state();
        assert_eq!(state.peers, peers(1..=2));
        assert_eq!(state.listen_port, Some(51820));
        assert_eq!(state.public_key, Some(node_key().public()));
    }

    #[test]
    fn a_changed_peer_set_sends_only_the_changed_peers_and_keeps_the_others() {
        let (device, mut sync) = configured(1..=4);
        let reads = device.reads();
        let mut next = peers([1, 2, 4, 5]);
        next.get_mut(&key(4)).unwrap().keepalive = Some(25);

        let synced = sync.sync(&device, want(next.clone(), None), false).unwrap();

        assert!(!synced.read && !synced.settings_changed);
        assert_eq!(device.reads(), reads);
        let sent = device.last_change().unwrap();
        assert_eq!(sent.peers.add, vec![peer(5)]);
        assert_eq!(sent.peers.remove, vec![key(3)]);
        assert_eq!(sent.peers.update.len(), 1);
        assert_eq!(sent.peers.update[0].spec.key, key(4));
        assert!(!sent.private_key && sent.listen_port.is_none() && sent.fwmark.is_none());
        assert_eq!(device.state().peers, next);
        assert_eq!(sync.applied(), &next);
    }

    #[test]
    fn a_failed_apply_makes_the_next_reconcile_read_the_device() {
        let (device, mut sync) = configured(1..=2);
        device.fail_next_apply(libc::EBUSY);

        let error = sync
            .sync(&device, want(peers(1..=3), None), false)
            .unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EBUSY));
        let reads = device.reads();

        let retried = sync.sync(&device, want(peers(1..=3), None), false).unwrap();

        assert!(retried.read);
        assert_eq!(device.reads(), reads + 1);
        assert_eq!(device.state().peers, peers(1..=3));
    }

    #[test]
    fn a_changed_listen_port_or_fwmark_is_sent_without_touching_peers() {
        let (device, mut sync) = configured(1..=2);
        let mut moved = want(peers(1..=2), None);
        moved.listen_port = 51999;
        moved.fwmark = 0x51;

        let synced = sync.sync(&device, moved, false).unwrap();

        assert!(synced.settings_changed && !synced.read);
        assert_eq!(synced.peer_changes, 0);
        let state = device.state();
        assert_eq!((state.listen_port, state.fwmark), (Some(51999), Some(0x51)));
        let mut unmarked = want(peers(1..=2), None);
        unmarked.listen_port = 51999;
        sync.sync(&device, unmarked, false).unwrap();
        assert_eq!(device.state().fwmark, None);
        assert_eq!(device.last_change().unwrap().fwmark, Some(0));
    }
}
