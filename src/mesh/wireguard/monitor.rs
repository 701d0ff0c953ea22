//! Watches the interface clawnode owns and asks for a recheck when it drifts: rtnetlink link
//! events (deleted, down, renamed, MTU), the userspace daemon exiting, and a periodic full
//! reconcile as the safety net for changes no event reports (a peer removed with `wg set`).
//! Event-driven: between events it costs nothing but the periodic timer.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use inotify::{EventStream, Inotify, WatchMask};

use futures::StreamExt;
use netlink_packet_core::NetlinkPayload;
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::MulticastGroup;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::link::link_state;
use crate::core::drift::{LinkEvent, OwnedLink, link_drift};
use crate::mesh::Recheck;

pub struct Monitor {
    /// The netlink connection goes first on drop, so it never forwards into a dropped receiver.
    connection: JoinHandle<()>,
    owned: OwnedLink,
    daemon_pid: Option<u32>,
    peers_dir: PathBuf,
    interval: Duration,
    task: JoinHandle<()>,
}

impl Monitor {
    pub fn start(
        owned: OwnedLink,
        daemon_pid: Option<u32>,
        daemon_exit: Option<watch::Receiver<bool>>,
        peers_dir: &Path,
        interval: Duration,
        recheck: Recheck,
        needs_read: Arc<AtomicBool>,
    ) -> std::io::Result<Monitor> {
        let (connection, _handle, mut messages) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link])?;
        let mut peer_files = watch_dir(peers_dir);
        let watched = owned.clone();
        let connection = tokio::spawn(connection);
        let task = tokio::spawn(async move {
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut daemon_exit = daemon_exit;
            // Editors and config managers write a file in several steps; apply once they settle.
            let mut settle: Option<tokio::time::Instant> = None;
            loop {
                tokio::select! {
                    event = next_file_event(&mut peer_files) => {
                        match event {
                            Some(()) => settle = Some(tokio::time::Instant::now() + PEER_FILE_SETTLE),
                            None => peer_files = None,
                        }
                    }
                    _ = sleep_until(settle) => {
                        settle = None;
                        tracing::info!(component = "mesh", "peer files changed; reloading peers");
                        recheck.request("peers_dir changed");
                    }
                    message = messages.next() => {
                        let Some((message, _)) = message else { break };
                        // A non-exhaustive netlink enum: every other message is not a link event.
                        #[allow(clippy::wildcard_enum_match_arm)]
                        let event = match message.payload {
                            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                                let state = link_state(&link);
                                LinkEvent::New { index: state.index, name: state.name, up: state.up, mtu: state.mtu }
                            }
                            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                                LinkEvent::Deleted { index: link.header.index }
                            }
                            _ => continue,
                        };
                        if let Some(reason) = link_drift(&watched, &event) {
                            tracing::warn!(component = "mesh", interface = %watched.name, reason, "interface drifted; repairing");
                            needs_read.store(true, Ordering::Release);
                            recheck.request(reason);
                        }
                    }
                    changed = wait_exit(&mut daemon_exit) => {
                        if changed {
                            tracing::warn!(component = "mesh", interface = %watched.name, "userspace WireGuard daemon exited; restarting");
                            needs_read.store(true, Ordering::Release);
                            recheck.request("userspace WireGuard daemon exited");
                        }
                        daemon_exit = None;
                    }
                    _ = tick.tick() => {
                        // The safety net reads the device: `wg set … remove` sends no event.
                        needs_read.store(true, Ordering::Release);
                        recheck.request("periodic reconcile");
                    }
                }
            }
        });
        Ok(Monitor {
            connection,
            owned,
            daemon_pid,
            peers_dir: peers_dir.to_path_buf(),
            interval,
            task,
        })
    }

    /// Does this monitor already watch exactly this link, daemon, directory and interval?
    pub fn watches(
        &self,
        owned: &OwnedLink,
        daemon_pid: Option<u32>,
        peers_dir: &Path,
        interval: Duration,
    ) -> bool {
        self.owned == *owned
            && self.daemon_pid == daemon_pid
            && self.peers_dir == peers_dir
            && self.interval == interval
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.connection.abort();
        self.task.abort();
    }
}

/// How long the peer directory must be quiet before a change is applied.
const PEER_FILE_SETTLE: Duration = Duration::from_millis(200);

fn watch_dir(dir: &Path) -> Option<EventStream<Vec<u8>>> {
    let inotify = Inotify::init().ok()?;
    let mask = WatchMask::CREATE
        | WatchMask::CLOSE_WRITE
        | WatchMask::DELETE
        | WatchMask::MOVED_TO
        | WatchMask::MOVED_FROM;
    if let Err(error) = inotify.watches().add(dir, mask) {
        // Without the directory there is nothing to watch; the periodic reconcile still runs.
        tracing::debug!(component = "mesh", dir = %dir.display(), %error, "not watching peers_dir");
        return None;
    }
    inotify.into_event_stream(vec![0u8; 4096]).ok()
}

/// The next change in the peer directory; `None` when the watch is gone.
async fn next_file_event(stream: &mut Option<EventStream<Vec<u8>>>) -> Option<()> {
    let Some(stream) = stream else {
        return std::future::pending().await;
    };
    match stream.next().await {
        Some(Ok(_)) => Some(()),
        _ => None,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Resolves with true once the daemon has exited; pending forever without a daemon.
async fn wait_exit(exit: &mut Option<watch::Receiver<bool>>) -> bool {
    let Some(rx) = exit else {
        return std::future::pending().await;
    };
    rx.wait_for(|exited| *exited).await.is_ok()
}
