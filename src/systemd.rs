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
#[derive(Debug, Default)]
pub struct SdNotifier;

impl SdNotifier {
    /// Half of `WATCHDOG_USEC` when systemd asked for watchdog pings (and `WATCHDOG_PID`, if
    /// set, is us), as sd_watchdog_enabled(3) recommends.
    pub fn watchdog_interval() -> Option<Duration> {
        sd_notify::watchdog_enabled().map(|timeout| timeout / 2)
    }
}

impl Notifier for SdNotifier {
    fn notify(&mut self, msgs: &[NotifyMsg]) {
        let states: Vec<NotifyState<'_>> = msgs
            .iter()
            .map(|msg| match msg {
                NotifyMsg::Ready => NotifyState::Ready,
                NotifyMsg::Reloading { .. } => NotifyState::Reloading,
                NotifyMsg::Stopping => NotifyState::Stopping,
                NotifyMsg::Status(text) => NotifyState::Status(text),
                NotifyMsg::Watchdog => NotifyState::Watchdog,
            })
            .collect();
        let mut states = states;
        // systemd matches RELOADING=1 with the MONOTONIC_USEC sent in the same datagram.
        for msg in msgs {
            if let NotifyMsg::Reloading { monotonic_usec } = msg {
                states.push(NotifyState::MonotonicUsec(i128::from(*monotonic_usec)));
            }
        }
        if let Err(error) = sd_notify::notify(&states) {
            tracing::warn!(component = "systemd", %error, "sd_notify failed");
        }
    }
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
