//! Which WireGuard failures are worth retrying soon and which wait for an operator: the one
//! place that maps this module's errors onto `MeshError`'s retry classes. Messages pass through
//! unchanged.

use std::io;

use super::keys::KeyError;
use super::link::LinkError;
use super::userspace::DaemonError;
use crate::core::link_owner::Refusal;
use crate::mesh::{MeshError, Retry};
use crate::state::StateError;

/// Failures of the provider itself, beside those of its parts (link, keys, daemon).
#[derive(Debug, thiserror::Error)]
pub enum WgError {
    #[error("[network.wireguard] address is not set")]
    NoAddress,
    #[error(
        "no WireGuard available: the kernel has no wireguard module (load it: modprobe wireguard) and no userspace implementation {program:?} was found (install wireguard-go, or set [network.wireguard] userspace_implementation)"
    )]
    NoWireguard { program: String },
    #[error("interface {0} vanished while being configured")]
    Vanished(String),
    #[error("WireGuard apply task failed: {0}")]
    ApplyTask(String),
    #[error("configure WireGuard device {interface}: {source}")]
    Device {
        interface: String,
        source: io::Error,
    },
    #[error("{}", not_ours(interface, refusal))]
    NotOurs { interface: String, refusal: Refusal },
    #[error(
        "a userspace WireGuard daemon that clawnode did not start already answers on {socket} (interface {interface}, perhaps in another network namespace); clawnode leaves it alone: stop it or choose another [network.wireguard] interface"
    )]
    SocketInUse { interface: String, socket: String },
    #[error("cannot record the interface clawnode created: {0}")]
    Record(#[from] StateError),
}

/// Why clawnode will not touch the link, and what the operator can do.
fn not_ours(interface: &str, refusal: &Refusal) -> String {
    match refusal {
        Refusal::NotWireguard { kind } => format!(
            "interface {interface} already exists and is not WireGuard (a {kind} link); clawnode did not create it and leaves it alone: remove it or set another [network.wireguard] interface"
        ),
        Refusal::NotAdopted { kind } => format!(
            "interface {interface} is an existing {} WireGuard interface that clawnode did not create (wg-quick?); clawnode leaves it alone: set [network.wireguard] adopt_existing_interface = true to let clawnode take it over (its key, addresses and peers are replaced), or set another interface",
            kind.as_str()
        ),
        Refusal::OtherBackend { found, want } => format!(
            "interface {interface} is an existing {} WireGuard interface that clawnode did not create, but the {} backend is in use; clawnode leaves it alone: remove it, set another interface, or set backend = \"{}\" (with adopt_existing_interface = true to take it over)",
            found.as_str(),
            want.as_str(),
            found.as_str()
        ),
    }
}

impl WgError {
    pub fn retry(&self) -> Retry {
        match self {
            WgError::NoAddress | WgError::NoWireguard { .. } => Retry::NeedsOperator,
            WgError::Vanished(_) | WgError::ApplyTask(_) => Retry::Transient,
            WgError::Device { source, .. } => io_retry(source),
            WgError::NotOurs { .. } | WgError::SocketInUse { .. } => Retry::NeedsOperator,
            WgError::Record(StateError::Io { source, .. }) => io_retry(source),
        }
    }
}

/// Missing privileges and read-only state stay that way until someone changes them; anything
/// else (EBUSY, EAGAIN, ENOBUFS, a refused UAPI socket, a vanished device) may pass by itself.
pub fn io_retry(error: &io::Error) -> Retry {
    if matches!(
        error.kind(),
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem
    ) {
        Retry::NeedsOperator
    } else {
        Retry::Transient
    }
}

/// Netlink reports a negative errno (EPERM without CAP_NET_ADMIN).
fn netlink_retry(error: &rtnetlink::Error) -> Retry {
    let rtnetlink::Error::NetlinkError(message) = error else {
        return Retry::Transient;
    };
    io_retry(&message.to_io())
}

impl LinkError {
    pub fn retry(&self) -> Retry {
        match self {
            LinkError::Netlink { source, .. } => netlink_retry(source),
            LinkError::Socket(source) => io_retry(source),
            LinkError::Appeared(_) => Retry::Transient,
            LinkError::NoKernelModule(_) => Retry::NeedsOperator,
        }
    }
}

impl KeyError {
    pub fn retry(&self) -> Retry {
        match self {
            // The file exists but does not hold a key: rereading it gives the same bytes.
            KeyError::Malformed { .. } => Retry::NeedsOperator,
            KeyError::Read { source, .. } => io_retry(source),
            KeyError::Write(StateError::Io { source, .. }) => io_retry(source),
        }
    }
}

impl DaemonError {
    pub fn retry(&self) -> Retry {
        match self {
            // A program that is not there or may not run: the same as having no userspace
            // implementation at all.
            DaemonError::Spawn { source, .. }
                if matches!(
                    source.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied
                ) =>
            {
                Retry::NeedsOperator
            }
            DaemonError::Spawn { .. }
            | DaemonError::Exited { .. }
            | DaemonError::NoSocket { .. } => Retry::Transient,
        }
    }
}

fn classified(retry: Retry, message: String) -> MeshError {
    match retry {
        Retry::Transient => MeshError::transient(message),
        Retry::NeedsOperator => MeshError::needs_operator(message),
    }
}

impl From<WgError> for MeshError {
    fn from(error: WgError) -> Self {
        classified(error.retry(), error.to_string())
    }
}

impl From<LinkError> for MeshError {
    fn from(error: LinkError) -> Self {
        classified(error.retry(), error.to_string())
    }
}

impl From<KeyError> for MeshError {
    fn from(error: KeyError) -> Self {
        classified(error.retry(), error.to_string())
    }
}

impl From<DaemonError> for MeshError {
    fn from(error: DaemonError) -> Self {
        classified(error.retry(), error.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroI32;
    use std::path::PathBuf;

    use libc::{EACCES, EAGAIN, EBUSY, ECONNREFUSED, ENOBUFS, ENODEV, EPERM, EROFS};

    use super::*;

    fn os(errno: i32) -> io::Error {
        io::Error::from_raw_os_error(errno)
    }

    fn netlink(errno: i32) -> LinkError {
        let mut message = netlink_packet_core::ErrorMessage::default();
        message.code = NonZeroI32::new(-errno);
        LinkError::Netlink {
            action: "create",
            interface: "wg0".into(),
            source: rtnetlink::Error::NetlinkError(message),
        }
    }

    #[test]
    fn missing_privileges_wait_for_an_operator() {
        for errno in [EPERM, EACCES, EROFS] {
            assert_eq!(io_retry(&os(errno)), Retry::NeedsOperator, "errno {errno}");
        }
        let error = MeshError::from(netlink(EPERM));
        assert_eq!(error.retry(), Retry::NeedsOperator);
        assert!(error.message().starts_with("netlink: create wg0: "));
    }

    #[test]
    fn a_busy_device_full_buffers_a_dead_daemon_or_a_vanished_interface_are_retried() {
        for errno in [EBUSY, EAGAIN, ENOBUFS, ECONNREFUSED, ENODEV] {
            assert_eq!(io_retry(&os(errno)), Retry::Transient, "errno {errno}");
            assert_eq!(netlink(errno).retry(), Retry::Transient, "errno {errno}");
        }
        assert_eq!(
            io_retry(&io::Error::from(io::ErrorKind::ConnectionRefused)),
            Retry::Transient
        );
        let error = MeshError::from(WgError::Vanished("wg0".into()));
        assert_eq!(error.retry(), Retry::Transient);
        assert_eq!(
            error.message(),
            "interface wg0 vanished while being configured"
        );
    }

    #[test]
    fn no_wireguard_at_all_waits_for_an_operator_and_names_both_fixes() {
        let error = MeshError::from(WgError::NoWireguard {
            program: "/nonexistent/wireguard-go".into(),
        });
        assert_eq!(error.retry(), Retry::NeedsOperator);
        assert!(error.message().contains("modprobe wireguard"));
        assert!(error.message().contains("\"/nonexistent/wireguard-go\""));
        let kernel = MeshError::from(LinkError::NoKernelModule("wg0".into()));
        assert_eq!(kernel.retry(), Retry::NeedsOperator);
    }

    #[test]
    fn a_key_file_that_exists_but_is_unusable_waits_for_an_operator() {
        let path = PathBuf::from("/etc/clawnode/wg.key");
        let malformed = MeshError::from(KeyError::Malformed { path: path.clone() });
        assert_eq!(malformed.retry(), Retry::NeedsOperator);
        let unreadable = KeyError::Read {
            path: path.clone(),
            source: os(EACCES),
        };
        assert_eq!(unreadable.retry(), Retry::NeedsOperator);
        let flaky = KeyError::Read {
            path,
            source: os(EAGAIN),
        };
        assert_eq!(flaky.retry(), Retry::Transient);
    }

    #[test]
    fn a_missing_userspace_program_waits_for_an_operator_but_a_daemon_that_died_is_retried() {
        let missing = DaemonError::Spawn {
            program: "wireguard-go".into(),
            source: io::Error::from(io::ErrorKind::NotFound),
        };
        assert_eq!(missing.retry(), Retry::NeedsOperator);
        let slow = DaemonError::NoSocket {
            program: "wireguard-go".into(),
            socket: PathBuf::from("/run/wireguard/wg0.sock"),
            seconds: 5,
        };
        assert_eq!(MeshError::from(slow).retry(), Retry::Transient);
        let device = WgError::Device {
            interface: "wg0".into(),
            source: os(EPERM),
        };
        assert_eq!(device.retry(), Retry::NeedsOperator);
        assert!(
            device
                .to_string()
                .starts_with("configure WireGuard device wg0: ")
        );
    }

    #[test]
    fn an_interface_clawnode_did_not_create_waits_for_an_operator_and_says_what_to_change() {
        use crate::core::link_owner::WgKind;
        let bridge = MeshError::from(WgError::NotOurs {
            interface: "br0".into(),
            refusal: Refusal::NotWireguard {
                kind: "bridge".into(),
            },
        });
        assert_eq!(bridge.retry(), Retry::NeedsOperator);
        assert!(bridge.message().contains("not WireGuard (a bridge link)"));
        let wg_quick = MeshError::from(WgError::NotOurs {
            interface: "wg0".into(),
            refusal: Refusal::NotAdopted {
                kind: WgKind::Kernel,
            },
        });
        assert_eq!(wg_quick.retry(), Retry::NeedsOperator);
        assert!(
            wg_quick
                .message()
                .contains("adopt_existing_interface = true")
        );
        let other = MeshError::from(WgError::NotOurs {
            interface: "wg0".into(),
            refusal: Refusal::OtherBackend {
                found: WgKind::Userspace,
                want: WgKind::Kernel,
            },
        });
        assert!(
            other.message().contains("backend = \"userspace\""),
            "{}",
            other.message()
        );
        assert_eq!(
            MeshError::from(LinkError::Appeared("wg0".into())).retry(),
            Retry::Transient
        );
    }
}
