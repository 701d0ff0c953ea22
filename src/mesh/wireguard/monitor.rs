//! Watches the interface clawnode owns and asks for a recheck when it drifts: rtnetlink link
//! events (deleted, down, renamed, MTU), the userspace daemon exiting, and a periodic full
//! reconcile as the safety net for changes no event reports (a peer removed with `wg set`).
//! Event-driven: between events it costs nothing but the periodic timer.

use std::time::Duration;

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
    owned: OwnedLink,
    daemon_pid: Option<u32>,
    interval: Duration,
    task: JoinHandle<()>,
}

impl Monitor {
    pub fn start(
        owned: OwnedLink,
        daemon_pid: Option<u32>,
        daemon_exit: Option<watch::Receiver<bool>>,
        interval: Duration,
        recheck: Recheck,
    ) -> std::io::Result<Monitor> {
        let (connection, _handle, mut messages) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link])?;
        let watched = owned.clone();
        let task = tokio::spawn(async move {
            let connection = tokio::spawn(connection);
            let mut tick =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut daemon_exit = daemon_exit;
            loop {
                tokio::select! {
                    message = messages.next() => {
                        let Some((message, _)) = message else { break };
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
                            recheck.request(reason);
                        }
                    }
                    changed = wait_exit(&mut daemon_exit) => {
                        if changed {
                            tracing::warn!(component = "mesh", interface = %watched.name, "userspace WireGuard daemon exited; restarting");
                            recheck.request("userspace WireGuard daemon exited");
                        }
                        daemon_exit = None;
                    }
                    _ = tick.tick() => recheck.request("periodic reconcile"),
                }
            }
            connection.abort();
        });
        Ok(Monitor {
            owned,
            daemon_pid,
            interval,
            task,
        })
    }

    /// Does this monitor already watch exactly this link, daemon and interval?
    pub fn watches(&self, owned: &OwnedLink, daemon_pid: Option<u32>, interval: Duration) -> bool {
        self.owned == *owned && self.daemon_pid == daemon_pid && self.interval == interval
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Resolves with true once the daemon has exited; pending forever without a daemon.
async fn wait_exit(exit: &mut Option<watch::Receiver<bool>>) -> bool {
    let Some(rx) = exit else {
        return std::future::pending().await;
    };
    rx.wait_for(|exited| *exited).await.is_ok()
}
