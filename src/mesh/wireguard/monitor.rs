//! Watches the interface clawnode owns and asks for a recheck when it drifts: rtnetlink link
//! events (deleted, down, renamed, MTU), the userspace daemon exiting, and a periodic full
//! reconcile as the safety net for changes no event reports (a peer removed with `wg set`).
//! Event-driven: between events it costs nothing but the periodic timer. If the link event
//! stream ends (the netlink socket failed), the monitor subscribes again with backoff and asks
//! for a recheck that reads the device; the timer and the other watches run on meanwhile.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::channel::mpsc::UnboundedReceiver;
use futures::{Stream, StreamExt};
use inotify::{EventStream, Inotify, WatchMask};
use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::MulticastGroup;
use rtnetlink::sys::SocketAddr;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::link::link_state;
use crate::core::backoff::Backoff;
use crate::core::drift::{LinkEvent, OwnedLink, link_drift};
use crate::mesh::Recheck;

pub struct Monitor {
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
        let links = LinkEvents::subscribe()?;
        let peer_files = watch_dir(peers_dir);
        let watching = Watching {
            owned: owned.clone(),
            interval,
            recheck,
            needs_read,
            backoff: Backoff::DEFAULT,
        };
        let task =
            tokio::spawn(watching.run(links, LinkEvents::subscribe, daemon_exit, peer_files));
        Ok(Monitor {
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
        // A monitor whose task ended (it never should) watches nothing: the next join starts one.
        !self.task.is_finished()
            && self.owned == *owned
            && self.daemon_pid == daemon_pid
            && self.peers_dir == peers_dir
            && self.interval == interval
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        // The task owns the netlink subscription, which ends its connection when dropped.
        self.task.abort();
    }
}

/// What the monitor watches for, and whom it tells.
struct Watching {
    owned: OwnedLink,
    interval: Duration,
    recheck: Recheck,
    needs_read: Arc<AtomicBool>,
    /// Between attempts to subscribe to link events again after the stream ended.
    backoff: Backoff,
}

impl Watching {
    /// The event loop. `links` is the link event stream; when it ends (the netlink socket
    /// failed), the periodic reconcile and the other watches go on while `subscribe` is tried
    /// again with backoff, and a recheck reads the device for what was missed meanwhile.
    async fn run<S>(
        self,
        links: S,
        mut subscribe: impl FnMut() -> std::io::Result<S>,
        mut daemon_exit: Option<watch::Receiver<bool>>,
        mut peer_files: Option<EventStream<Vec<u8>>>,
    ) where
        S: Stream<Item = LinkEvent> + Unpin,
    {
        let Watching {
            owned,
            interval,
            recheck,
            needs_read,
            backoff,
        } = self;
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut links = Some(links);
        let mut subscribed_at = tokio::time::Instant::now();
        // While unsubscribed: when to try again, and how many tries this outage has had.
        let mut resubscribe: Option<tokio::time::Instant> = None;
        let mut failures: u32 = 0;
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
                event = next_link_event(&mut links) => {
                    let Some(event) = event else {
                        links = None;
                        // A stream that ran a good while is a new outage, not the same one.
                        if subscribed_at.elapsed() >= backoff.cap() {
                            failures = 0;
                        }
                        failures = failures.saturating_add(1);
                        if failures == 1 {
                            tracing::warn!(component = "mesh", interface = %owned.name, "link event stream ended; subscribing again (the periodic reconcile goes on)");
                        }
                        let delay = backoff.delay(failures, fastrand::u32(..));
                        resubscribe = Some(tokio::time::Instant::now() + delay);
                        continue;
                    };
                    if let Some(reason) = link_drift(&owned, &event) {
                        tracing::warn!(component = "mesh", interface = %owned.name, reason, "interface drifted; repairing");
                        needs_read.store(true, Ordering::Release);
                        recheck.request(reason);
                    }
                }
                _ = sleep_until(resubscribe) => {
                    match subscribe() {
                        Ok(stream) => {
                            links = Some(stream);
                            resubscribe = None;
                            subscribed_at = tokio::time::Instant::now();
                            tracing::info!(component = "mesh", interface = %owned.name, "watching link events again");
                            // Whatever happened to the link meanwhile went unseen.
                            needs_read.store(true, Ordering::Release);
                            recheck.request("link events watched again");
                        }
                        Err(error) => {
                            failures = failures.saturating_add(1);
                            tracing::debug!(component = "mesh", %error, "cannot subscribe to link events yet");
                            let delay = backoff.delay(failures, fastrand::u32(..));
                            resubscribe = Some(tokio::time::Instant::now() + delay);
                        }
                    }
                }
                changed = wait_exit(&mut daemon_exit) => {
                    if changed {
                        tracing::warn!(component = "mesh", interface = %owned.name, "userspace WireGuard daemon exited; restarting");
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
    }
}

/// The kernel's link events, through a netlink multicast subscription of its own.
struct LinkEvents {
    connection: JoinHandle<()>,
    messages: UnboundedReceiver<(NetlinkMessage<RouteNetlinkMessage>, SocketAddr)>,
}

impl LinkEvents {
    fn subscribe() -> std::io::Result<LinkEvents> {
        let (connection, _handle, messages) =
            rtnetlink::new_multicast_connection(&[MulticastGroup::Link])?;
        Ok(LinkEvents {
            connection: tokio::spawn(connection),
            messages,
        })
    }
}

impl Drop for LinkEvents {
    fn drop(&mut self) {
        // The connection goes first, so it never forwards into a dropped receiver.
        self.connection.abort();
    }
}

impl Stream for LinkEvents {
    type Item = LinkEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<LinkEvent>> {
        loop {
            let Some((message, _)) = ready!(self.messages.poll_next_unpin(cx)) else {
                return Poll::Ready(None);
            };
            // A non-exhaustive netlink enum: every other message is not a link event.
            #[allow(clippy::wildcard_enum_match_arm)]
            let event = match message.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                    let state = link_state(&link);
                    LinkEvent::New {
                        index: state.index,
                        name: state.name,
                        up: state.up,
                        mtu: state.mtu,
                    }
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                    LinkEvent::Deleted {
                        index: link.header.index,
                    }
                }
                _ => continue,
            };
            return Poll::Ready(Some(event));
        }
    }
}

/// The next link event; `None` once the stream has ended, pending while there is none.
async fn next_link_event<S>(links: &mut Option<S>) -> Option<LinkEvent>
where
    S: Stream<Item = LinkEvent> + Unpin,
{
    let Some(stream) = links else {
        return std::future::pending().await;
    };
    stream.next().await
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use futures::FutureExt;
    use futures::stream::{self, BoxStream};

    use super::*;

    fn owned() -> OwnedLink {
        OwnedLink {
            index: 7,
            name: "wg0".into(),
            mtu: 1420,
        }
    }

    /// Collects every recheck reason the monitor asks for within `window` of paused time.
    async fn reasons(
        rx: &mut tokio::sync::mpsc::Receiver<String>,
        window: Duration,
    ) -> Vec<String> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + window;
        while let Ok(Some(reason)) = tokio::time::timeout_at(deadline, rx.recv()).await {
            out.push(reason);
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn when_the_link_event_stream_ends_the_monitor_subscribes_again_and_keeps_reconciling() {
        let (recheck, mut rx) = Recheck::channel();
        let needs_read = Arc::new(AtomicBool::new(false));
        let watching = Watching {
            owned: owned(),
            interval: Duration::from_secs(60),
            recheck,
            needs_read: Arc::clone(&needs_read),
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(4)),
        };
        // The first subscription ends at once; the first attempt to subscribe again fails; the
        // second works and reports the interface deleted.
        let attempts = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&attempts);
        let subscribe = move || -> std::io::Result<BoxStream<'static, LinkEvent>> {
            if counted.fetch_add(1, Ordering::SeqCst) == 0 {
                return Err(std::io::Error::from(std::io::ErrorKind::OutOfMemory));
            }
            // Some seconds later, the interface is deleted.
            let deleted = tokio::time::sleep(Duration::from_secs(5))
                .map(|()| LinkEvent::Deleted { index: 7 });
            Ok(stream::once(deleted).chain(stream::pending()).boxed())
        };
        let ended: BoxStream<'static, LinkEvent> = stream::empty().boxed();
        let task = tokio::spawn(watching.run(ended, subscribe, None, None));

        // Backoff 1 s then 2 s at most 1.5 times over: subscribed again well within 10 s.
        let first = reasons(&mut rx, Duration::from_secs(10)).await;
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
        assert!(
            first.contains(&"link events watched again".to_string()),
            "{first:?}"
        );
        assert!(needs_read.load(Ordering::Acquire));
        // The deletion seen on the new subscription is repaired like any other drift.
        let later = reasons(&mut rx, Duration::from_secs(10)).await;
        let all: Vec<String> = first.into_iter().chain(later).collect();
        assert!(
            all.iter().any(|r| r.contains("deleted")),
            "no drift reported: {all:?}"
        );
        // And the periodic reconcile still runs.
        let periodic = reasons(&mut rx, Duration::from_secs(61)).await;
        assert!(
            periodic.contains(&"periodic reconcile".to_string()),
            "{periodic:?}"
        );
        assert!(!task.is_finished());
        task.abort();
    }
}
