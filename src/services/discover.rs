//! `clawnode services discover <name>`: ask every peer's node-info endpoint over the mesh, a
//! bounded number at a time, each with its own timeout, and list the nodes offering `name`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Empty, LengthLimitError, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use super::node_info::NodeInfo;
use crate::config::{NodeName, ServiceName};
use crate::http::source_chain;

/// The most a peer's node-info answer may hold; a longer one is not read further.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// At most this many peers are asked at once, so a 1,000-node mesh is not hit all together.
pub const CONCURRENCY: usize = 32;
pub const PER_PEER_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Serialize)]
pub struct Provider {
    pub node: String,
    pub address: IpAddr,
    pub port: u16,
    pub protocol: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Unreachable {
    pub address: IpAddr,
    pub error: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Discovery {
    pub providers: Vec<Provider>,
    pub unreachable: Vec<Unreachable>,
}

/// Query `targets` (mesh address of each peer) on `port` for nodes advertising `service`.
pub async fn discover(targets: Vec<IpAddr>, port: u16, service: &str) -> Discovery {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let results: Vec<(IpAddr, Result<NodeInfo, String>)> = futures::stream::iter(targets)
        .map(|ip| {
            let client = client.clone();
            async move {
                let uri = format!("http://{}/v1/node", SocketAddr::new(ip, port));
                let call = async {
                    let uri: hyper::Uri = uri.parse().map_err(|e| format!("{e}"))?;
                    let resp = client.get(uri).await.map_err(|e| source_chain(&e))?;
                    answer_of(resp).await
                };
                let result = tokio::time::timeout(PER_PEER_TIMEOUT, call)
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {PER_PEER_TIMEOUT:?}")));
                (ip, result.map_err(|e| printable(&e)))
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect()
        .await;
    let mut out = Discovery::default();
    for (address, result) in results {
        match result {
            Ok(info) => {
                out.providers
                    .extend(
                        info.services
                            .into_iter()
                            .filter(|s| s.name == service)
                            .map(|s| Provider {
                                node: info.name.clone(),
                                address,
                                port: s.port,
                                protocol: s.protocol,
                            }),
                    )
            }
            Err(error) => out.unreachable.push(Unreachable { address, error }),
        }
    }
    out.providers.sort_by(|a, b| a.node.cmp(&b.node));
    out.unreachable.sort_by_key(|u| u.address);
    out
}

/// What a peer's HTTP response says: its node info, or why it was refused (unescaped: the
/// caller escapes it for display with `printable`).
pub async fn answer_of<B>(resp: hyper::Response<B>) -> Result<NodeInfo, String>
where
    B: hyper::body::Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status()));
    }
    read_node_info(resp.into_body()).await
}

/// Read a peer's node-info answer: at most [`MAX_ANSWER_BYTES`], and only names that are DNS
/// labels, since they are printed to a terminal. The error says why the answer was refused.
async fn read_node_info<B>(body: B) -> Result<NodeInfo, String>
where
    B: hyper::body::Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let body = Limited::new(body, MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                format!(
                    "answer larger than {} KiB, not read further",
                    MAX_ANSWER_BYTES / 1024
                )
            } else {
                e.to_string()
            }
        })?
        .to_bytes();
    let info = serde_json::from_slice::<NodeInfo>(&body).map_err(|e| format!("bad answer: {e}"))?;
    check_names(&info)?;
    Ok(info)
}

/// Every name a peer gives must be a DNS label, as its own configuration requires; a peer that
/// says otherwise is not a clawnode, or not a well one.
fn check_names(info: &NodeInfo) -> Result<(), String> {
    if info.name.parse::<NodeName>().is_err() {
        return Err(format!(
            "bad answer: node name {} is not a DNS label",
            quoted(&info.name)
        ));
    }
    for s in &info.services {
        if s.name.parse::<ServiceName>().is_err() {
            return Err(format!(
                "bad answer: service name {} is not a DNS label",
                quoted(&s.name)
            ));
        }
        if s.protocol.parse::<ServiceName>().is_err() {
            return Err(format!(
                "bad answer: protocol {} of service {} is not a DNS label",
                quoted(&s.protocol),
                s.name
            ));
        }
    }
    Ok(())
}

/// A peer-supplied string for a message: at most 64 characters, escaped, in quotes.
fn quoted(text: &str) -> String {
    const SHOWN: usize = 64;
    let mut out: String = text.chars().take(SHOWN).collect();
    if text.chars().nth(SHOWN).is_some() {
        out.push_str("...");
    }
    format!("\"{}\"", printable(&out))
}

/// `text` with every control character (C0, DEL, C1) and bidirectional-text control escaped as
/// `\u{..}`, so nothing a peer sent can move the cursor or recolour a terminal.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
        if c.is_control() || bidi {
            out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};
    use hyper::body::Frame;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn answer(name: &str, service: &str, protocol: &str) -> String {
        serde_json::json!({
            "name": name,
            "public_key": "k",
            "address": "100.64.0.2",
            "services": [{"name": service, "port": 8443, "protocol": protocol}],
            "gpus": [],
        })
        .to_string()
    }

    /// A peer on loopback that answers every request with `head` and then `body` chunks.
    async fn peer(head: &'static str, chunks: Vec<Bytes>, forever: bool) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let chunks = chunks.clone();
                tokio::spawn(async move {
                    let mut request = [0u8; 1024];
                    let _ = stream.read(&mut request).await;
                    if stream.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    loop {
                        for chunk in &chunks {
                            if stream.write_all(chunk).await.is_err() {
                                return;
                            }
                        }
                        if !forever {
                            return;
                        }
                    }
                });
            }
        });
        port
    }

    fn chunked(data: &[u8]) -> Bytes {
        let mut out = format!("{:x}\r\n", data.len()).into_bytes();
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
        Bytes::from(out)
    }

    #[tokio::test]
    async fn a_peer_answering_more_than_64_kib_is_listed_unreachable_with_the_reason() {
        // A well-formed answer offering the service, padded past the limit with whitespace.
        let mut body = answer("node-1", "molt-provider", "https");
        body.push_str(&" ".repeat(MAX_ANSWER_BYTES));
        let head: &'static str = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            )
            .into_boxed_str(),
        );
        let port = peer(head, vec![Bytes::from(body)], false).await;
        let found = discover(vec![IpAddr::from([127, 0, 0, 1])], port, "molt-provider").await;
        assert!(found.providers.is_empty(), "{found:?}");
        assert_eq!(found.unreachable.len(), 1, "{found:?}");
        assert!(
            found.unreachable[0].error.contains("larger than 64 KiB"),
            "{found:?}"
        );
    }

    #[tokio::test]
    async fn a_peer_streaming_an_endless_answer_is_cut_off_at_the_limit_not_at_the_timeout() {
        let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        let port = peer(head, vec![chunked(&[b' '; 8192])], true).await;
        let started = std::time::Instant::now();
        let found = discover(vec![IpAddr::from([127, 0, 0, 1])], port, "molt-provider").await;
        assert_eq!(found.unreachable.len(), 1, "{found:?}");
        assert!(
            found.unreachable[0].error.contains("larger than 64 KiB"),
            "{found:?}"
        );
        assert!(started.elapsed() < PER_PEER_TIMEOUT, "{found:?}");
    }

    #[tokio::test]
    async fn an_answer_of_exactly_the_limit_is_read() {
        let mut body = answer("node-1", "molt-provider", "https");
        body.push_str(&" ".repeat(MAX_ANSWER_BYTES - body.len()));
        let info = read_node_info(Full::new(Bytes::from(body))).await.unwrap();
        assert_eq!(info.name, "node-1");
    }

    #[tokio::test]
    async fn an_answer_streamed_past_the_limit_in_small_frames_is_refused() {
        let frames = futures::stream::iter(
            (0..100).map(|_| Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![b' '; 1024])))),
        );
        let err = read_node_info(StreamBody::new(frames)).await.unwrap_err();
        assert!(err.contains("larger than 64 KiB"), "{err}");
    }

    #[tokio::test]
    async fn a_peer_whose_node_name_carries_terminal_escapes_is_a_bad_answer_shown_escaped() {
        let body = answer("evil\u{1b}[2J\u{1b}]0;owned\u{7}", "molt-provider", "https");
        let head: &'static str = Box::leak(
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_boxed_str(),
        );
        let port = peer(head, vec![Bytes::from(body)], false).await;
        let found = discover(vec![IpAddr::from([127, 0, 0, 1])], port, "molt-provider").await;
        assert!(found.providers.is_empty(), "{found:?}");
        let error = &found.unreachable[0].error;
        assert!(error.starts_with("bad answer: node name"), "{error}");
        assert!(error.contains("\\u{1b}[2J"), "{error}");
        let json = serde_json::to_string(&found).unwrap();
        assert!(!error.chars().any(char::is_control), "{error}");
        assert!(!json.chars().any(char::is_control), "{json}");
    }

    #[tokio::test]
    async fn service_names_and_protocols_that_are_not_dns_labels_make_a_bad_answer() {
        for (service, protocol, what) in [
            ("molt\u{9b}31m", "https", "service name"),
            ("Molt Provider", "https", "service name"),
            ("molt-provider", "https\u{1b}[1m", "protocol"),
        ] {
            let body = answer("node-1", service, protocol);
            let err = read_node_info(Full::new(Bytes::from(body)))
                .await
                .unwrap_err();
            assert!(err.starts_with(&format!("bad answer: {what}")), "{err}");
            assert!(!err.chars().any(char::is_control), "{err}");
        }
        let fine = answer("node-1", "molt-provider", "https");
        assert!(read_node_info(Full::new(Bytes::from(fine))).await.is_ok());
    }

    #[test]
    fn control_and_bidi_characters_are_escaped_for_display() {
        assert_eq!(
            printable("a\u{1b}b\u{7f}\u{9b}\u{202e}c"),
            "a\\u{1b}b\\u{7f}\\u{9b}\\u{202e}c"
        );
        assert_eq!(
            quoted(&"x".repeat(100)),
            format!("\"{}...\"", "x".repeat(64))
        );
    }
}
