//! Following tailscaled's IPN bus: a task that asks for a recheck whenever the state or the
//! self node changes or tailscaled comes back, and the line splitter the login wait shares.

use std::time::Duration;

use http_body_util::BodyExt;

use super::localapi::LocalApi;
use super::types::{IpnState, Notify};
use crate::core::backoff::Backoff;
use crate::mesh::Recheck;

/// `NotifyInitialState`: the first message carries the current state.
pub const BUS_MASK: u64 = 2;

/// A task that follows the IPN bus and asks for a recheck whenever the state changes or the bus
/// comes back after tailscaled went away; it reconnects with capped, jittered backoff and never
/// gives up.
pub fn spawn(api: LocalApi, recheck: Recheck) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        let mut failures = 0u32;
        let mut last_state: Option<IpnState> = None;
        loop {
            match api.watch_bus(BUS_MASK).await {
                Ok(mut body) => {
                    if failures > 0 {
                        recheck.request("tailscaled is back");
                    }
                    let mut lines = Ndjson::default();
                    while let Some(Ok(frame)) = body.frame().await {
                        let Some(data) = frame.data_ref() else {
                            continue;
                        };
                        for notify in lines.push(data) {
                            if let Some(state) = notify.state
                                && last_state.replace(state).is_some_and(|old| old != state)
                            {
                                recheck.request(format!("tailscaled state {state}"));
                            }
                            // Approval, tags and addresses change with the self node.
                            if notify.self_changed() {
                                recheck.request("self node changed");
                            }
                        }
                    }
                    tracing::warn!(
                        component = "mesh",
                        "tailscaled IPN bus closed; reconnecting"
                    );
                    failures = 1;
                }
                Err(error) => {
                    failures = failures.saturating_add(1);
                    tracing::debug!(component = "mesh", %error, "IPN bus unavailable");
                }
            }
            tokio::time::sleep(backoff.delay(failures, fastrand::u32(..))).await;
        }
    })
}

/// Splits the IPN bus's byte stream into its messages, one JSON object per line; a line may
/// arrive in several chunks. Lines that are not a message are skipped.
#[derive(Default)]
pub struct Ndjson(Vec<u8>);

impl Ndjson {
    pub fn push(&mut self, data: &[u8]) -> Vec<Notify> {
        self.0.extend_from_slice(data);
        let mut out = Vec::new();
        while let Some(pos) = self.0.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.0.drain(..=pos).collect();
            if let Ok(notify) = serde_json::from_slice(&line) {
                out.push(notify);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_lines_split_across_chunks_are_joined_and_states_are_integers() {
        let mut lines = Ndjson::default();
        assert!(lines.push(b"{\"Version\":\"1.102.2\",\"Sta").is_empty());
        let got = lines.push(b"te\":6}\n{\"State\":3}\n{\"Eng");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].state, Some(IpnState::Running));
        assert_eq!(got[1].state, Some(IpnState::NeedsMachineAuth));
    }

    #[test]
    fn a_line_that_is_not_a_message_is_skipped() {
        let mut lines = Ndjson::default();
        let got = lines.push(b"not json\n\"text\"\n{\"State\":2}\n");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].state, Some(IpnState::NeedsLogin));
    }
}
