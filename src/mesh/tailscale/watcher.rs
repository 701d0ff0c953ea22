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

/// The longest IPN bus line kept; a longer one is dropped up to its newline.
const MAX_LINE: usize = 1024 * 1024;

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
                    // tailscaled may be gone: the join says whether the node still is joined.
                    recheck.request("tailscaled IPN bus closed");
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
/// arrive in several chunks. Lines that are not a message are skipped. Each byte is examined
/// once (the held part of a line never holds a newline), and a line longer than `MAX_LINE` is
/// dropped up to its newline with one warning, so a broken or hostile tailscaled cannot make
/// clawnode buffer without bound.
pub struct Ndjson {
    /// The longest line kept: `MAX_LINE`, smaller in fuzzing so the bound is reached.
    max_line: usize,
    /// The start of a line whose newline has not arrived yet; never holds a newline.
    buf: Vec<u8>,
    /// Inside a line that outgrew `MAX_LINE`: everything up to its newline is dropped.
    discarding: bool,
    /// Bytes examined for a newline so far (the splitting cost).
    #[cfg(test)]
    scanned: usize,
}

impl Default for Ndjson {
    fn default() -> Self {
        Self::with_max_line(MAX_LINE)
    }
}

impl Ndjson {
    /// A splitter that drops lines longer than `max_line` bytes.
    pub fn with_max_line(max_line: usize) -> Self {
        Self {
            max_line,
            buf: Vec::new(),
            discarding: false,
            #[cfg(test)]
            scanned: 0,
        }
    }

    pub fn push(&mut self, mut data: &[u8]) -> Vec<Notify> {
        let mut out = Vec::new();
        loop {
            let newline = data.iter().position(|&b| b == b'\n');
            #[cfg(test)]
            {
                self.scanned += newline.map_or(data.len(), |p| p + 1);
            }
            let Some(pos) = newline else {
                self.hold(data);
                return out;
            };
            let (line, rest) = (&data[..pos], &data[pos + 1..]);
            data = rest;
            if std::mem::take(&mut self.discarding) {
                continue;
            }
            if self.buf.len() + line.len() > self.max_line {
                self.buf = Vec::new();
                warn_too_long(self.max_line);
                continue;
            }
            let parsed = if self.buf.is_empty() {
                serde_json::from_slice(line)
            } else {
                self.buf.extend_from_slice(line);
                let parsed = serde_json::from_slice(&self.buf);
                self.buf.clear();
                parsed
            };
            if let Ok(notify) = parsed {
                out.push(notify);
            }
        }
    }

    /// Keep the start of a line, or start dropping it once it is longer than `max_line`.
    fn hold(&mut self, part: &[u8]) {
        if self.discarding {
            return;
        }
        if self.buf.len() + part.len() > self.max_line {
            // Given back, not just cleared: the capacity would stay as large as the line.
            self.buf = Vec::new();
            self.discarding = true;
            warn_too_long(self.max_line);
            return;
        }
        self.buf.extend_from_slice(part);
    }

    /// Bytes held for a line whose newline has not arrived yet.
    pub fn held(&self) -> usize {
        self.buf.len()
    }
}

fn warn_too_long(limit_bytes: usize) {
    tracing::warn!(
        component = "mesh",
        limit_bytes,
        "tailscaled sent an IPN bus line longer than the limit; dropped it"
    );
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

    #[test]
    fn an_endless_line_is_dropped_within_the_bound_and_the_next_message_still_arrives() {
        let mut lines = Ndjson::default();
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..160 {
            assert!(lines.push(&chunk).is_empty());
            assert!(lines.buf.len() <= MAX_LINE, "buffered {}", lines.buf.len());
        }
        assert!(lines.buf.capacity() <= 2 * MAX_LINE);
        let got = lines.push(b"tail of the long line\n{\"State\":6}\n");
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].state, Some(IpnState::Running));
        let got = lines.push(b"{\"State\":2}\n");
        assert_eq!(got[0].state, Some(IpnState::NeedsLogin));
    }

    #[test]
    fn a_line_arriving_one_byte_at_a_time_is_scanned_once() {
        let mut lines = Ndjson::default();
        let mut message = b"{\"State\":6,\"Pad\":\"".to_vec();
        message.resize(100 * 1024, b'p');
        message.extend_from_slice(b"\"}\n");
        let mut got = Vec::new();
        for byte in &message {
            got.extend(lines.push(std::slice::from_ref(byte)));
        }
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].state, Some(IpnState::Running));
        assert_eq!(lines.scanned, message.len(), "each byte examined once");
    }

    #[test]
    fn a_line_just_within_the_bound_is_kept() {
        let mut lines = Ndjson::default();
        let mut message = b"{\"State\":6,\"Pad\":\"".to_vec();
        message.resize(MAX_LINE - 2, b'p');
        message.extend_from_slice(b"\"}");
        assert_eq!(message.len(), MAX_LINE);
        let (head, tail) = message.split_at(MAX_LINE / 2);
        assert!(lines.push(head).is_empty());
        assert!(lines.push(tail).is_empty());
        let got = lines.push(b"\n");
        assert_eq!(
            got.len(),
            1,
            "a line of exactly MAX_LINE bytes is a message"
        );
    }
}
