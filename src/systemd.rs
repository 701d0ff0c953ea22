//! The systemd notification boundary: one trait, the sd_notify implementation, and a recorder.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sd_notify::NotifyState;

use crate::core::NotifyMsg;

/// Where supervisor notifications go. Implementations must not block for long: they run on
/// the supervisor loop, which is what the watchdog vouches for.
pub trait Notifier: Send {
    fn notify(&mut self, msgs: &[NotifyMsg]);
}

/// Sends datagrams to `$NOTIFY_SOCKET`. Silent when the variable is unset (not under systemd).
///
/// The send never blocks: `sd_notify::notify` does, when the receiver has stopped reading and
/// its queue is full, and that froze the whole daemon (API, watchdog, everything) on the
/// single-threaded runtime. A datagram that does not fit is dropped with a warning, except
/// READY, RELOADING and STOPPING, which go again with the next notification.
#[derive(Debug, Default)]
pub struct SdNotifier {
    /// Essential messages not yet delivered.
    owed: Vec<NotifyMsg>,
    dropped: u64,
}

impl SdNotifier {
    /// Half of `WATCHDOG_USEC` when systemd asked for watchdog pings (and `WATCHDOG_PID`, if
    /// set, is us), as sd_watchdog_enabled(3) recommends.
    pub fn watchdog_interval() -> Option<Duration> {
        sd_notify::watchdog_enabled().map(|timeout| timeout / 2)
    }
}

impl Notifier for SdNotifier {
    fn notify(&mut self, msgs: &[NotifyMsg]) {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return;
        };
        self.notify_to(&path, msgs);
    }
}

impl SdNotifier {
    fn notify_to(&mut self, path: &std::ffi::OsStr, msgs: &[NotifyMsg]) {
        let mut batch = std::mem::take(&mut self.owed);
        batch.extend_from_slice(msgs);
        let text = datagram(&batch);
        match send_nonblocking(path, text.as_bytes()) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                self.owed = batch
                    .into_iter()
                    .filter(|m| {
                        matches!(
                            m,
                            NotifyMsg::Ready | NotifyMsg::Reloading { .. } | NotifyMsg::Stopping
                        )
                    })
                    .collect();
                self.dropped += 1;
                if self.dropped.is_power_of_two() {
                    tracing::warn!(
                        component = "systemd",
                        dropped = self.dropped,
                        "the service manager is not reading notifications; dropped one rather than wait"
                    );
                }
            }
            Err(error) => tracing::warn!(component = "systemd", %error, "sd_notify failed"),
        }
    }
}

/// The datagram for `msgs`, in sd_notify's `KEY=VALUE` lines.
fn datagram(msgs: &[NotifyMsg]) -> String {
    let mut states: Vec<NotifyState<'_>> = msgs
        .iter()
        .map(|msg| match msg {
            NotifyMsg::Ready => NotifyState::Ready,
            NotifyMsg::Reloading { .. } => NotifyState::Reloading,
            NotifyMsg::Stopping => NotifyState::Stopping,
            NotifyMsg::Status(text) => NotifyState::Status(text),
            NotifyMsg::Watchdog => NotifyState::Watchdog,
        })
        .collect();
    // systemd matches RELOADING=1 with the MONOTONIC_USEC sent in the same datagram.
    for msg in msgs {
        if let NotifyMsg::Reloading { monotonic_usec } = msg {
            states.push(NotifyState::MonotonicUsec(i128::from(*monotonic_usec)));
        }
    }
    states.iter().map(|s| format!("{s}\n")).collect()
}

/// One datagram to the notification socket (a path, or `@name` in the abstract namespace),
/// `WouldBlock` instead of waiting when the receiver's queue is full.
fn send_nonblocking(path: &std::ffi::OsStr, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    match path.as_bytes().strip_prefix(b"@") {
        Some(name) => sock.connect_addr(&SocketAddr::from_abstract_name(name)?)?,
        None => sock.connect(path)?,
    }
    let sent = sock.send(bytes)?;
    if sent != bytes.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::WriteZero,
            "incomplete notification",
        ));
    }
    Ok(())
}

/// Keeps every notification in memory; for tests of the shell.
#[derive(Debug, Clone, Default)]
pub struct RecordingNotifier {
    pub sent: Arc<Mutex<Vec<NotifyMsg>>>,
}

impl Notifier for RecordingNotifier {
    fn notify(&mut self, msgs: &[NotifyMsg]) {
        self.sent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .extend_from_slice(msgs);
    }
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd uses for MONOTONIC_USEC.
pub fn monotonic_usec() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => (ts.tv_sec() as u64) * 1_000_000 + (ts.tv_nsec() as u64) / 1_000,
        Err(_) => 0,
    }
}

/// Does this process hold CAP_NET_ADMIN (bit 12 of the effective set)?
pub fn has_cap_net_admin() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 12) != 0)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;

    use super::*;

    #[test]
    fn a_ready_that_finds_the_queue_full_is_sent_with_the_next_notification() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).unwrap();
        let filler = UnixDatagram::unbound().unwrap();
        filler.set_nonblocking(true).unwrap();
        filler.connect(&path).unwrap();
        while filler.send(b"X=1\n").is_ok() {}
        let mut notifier = SdNotifier::default();
        notifier.notify_to(path.as_os_str(), &[NotifyMsg::Ready]);
        assert_eq!(
            notifier.owed,
            vec![NotifyMsg::Ready],
            "kept, not waited for"
        );
        receiver.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 256];
        while receiver.recv(&mut buf).is_ok() {}
        notifier.notify_to(path.as_os_str(), &[NotifyMsg::Status("ready: x".into())]);
        let n = receiver.recv(&mut buf).unwrap();
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "READY=1\nSTATUS=ready: x\n"
        );
        assert!(notifier.owed.is_empty());
    }
}
