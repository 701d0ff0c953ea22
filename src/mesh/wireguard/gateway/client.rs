//! `GatewayClient`: one node's calls to its gateways over HTTPS pinned to the cluster's root
//! key. Small on purpose (an HTTP connection pool and a bearer; no thread, no task of its
//! own beyond hyper's connection tasks), so a benchmark can run thousands in one process.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use zeroize::Zeroizing;

use crate::core::coord::{Advert, Cursor, ErrorBody, JoinRequest, JoinResponse, ServiceAnswer};
use crate::core::{Failure, Retry};

/// The pinned HTTPS client.
pub type Https = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An HTTPS-only client that trusts what `tls` trusts (see `tls::client_config`).
pub fn https(tls: Arc<rustls::ClientConfig>) -> Https {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*tls).clone())
        .https_only()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1)
        .build(connector)
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A request that is not a long poll.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// What a long poll may take beyond the wait the gateway was asked for.
const POLL_SLACK: Duration = Duration::from_secs(10);
/// Largest answer read: a snapshot of tens of thousands of peers, and no more.
pub const MAX_ANSWER: usize = 64 * 1024 * 1024;

/// Why a call failed, and whether trying again (elsewhere, later) can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CallError {
    pub retry: Retry,
    pub message: String,
    /// HTTP status, when the gateway answered.
    pub status: Option<u16>,
    /// The gateway's `Retry-After`, when it was overloaded.
    pub retry_after: Option<Duration>,
    /// The advert seq the gateway holds, when it refused an advert as stale.
    pub last_seq: Option<u64>,
}

impl CallError {
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            retry: Retry::Transient,
            message: message.into(),
            status: None,
            retry_after: None,
            last_seq: None,
        }
    }
}

impl From<CallError> for Failure {
    fn from(error: CallError) -> Self {
        match error.retry {
            Retry::Transient => Failure::transient(error.message),
            Retry::NeedsOperator => Failure::needs_operator(error.message),
        }
    }
}

/// One answer: the decoded body and how many bytes came over the wire for it.
#[derive(Debug)]
pub struct Answer<T> {
    pub body: T,
    pub wire_bytes: usize,
}

/// An answer's body as it came over the wire, for the caller to `decode` where that suits it
/// (a large snapshot is inflated and parsed off the runtime's thread).
#[derive(Debug)]
pub struct Raw {
    pub bytes: Bytes,
    pub gzip: bool,
}

/// Inflate (when gzipped) and parse an answer from `url`.
pub fn decode<T: DeserializeOwned>(url: &str, raw: &Raw) -> Result<T, CallError> {
    let inflated;
    let bytes: &[u8] = if raw.gzip {
        inflated = gunzip(&raw.bytes)
            .map_err(|e| CallError::transient(format!("gateway {url}: bad gzip answer: {e}")))?;
        &inflated
    } else {
        &raw.bytes
    };
    let bytes = if bytes.is_empty() { b"null" } else { bytes };
    serde_json::from_slice(bytes)
        .map_err(|e| CallError::transient(format!("gateway {url}: unreadable answer: {e}")))
}

/// A node's client for the gateways of one cluster.
pub struct GatewayClient {
    http: Https,
    session: Option<Zeroizing<String>>,
}

impl GatewayClient {
    /// A client trusting only gateways anchored in `root`.
    pub fn new(root: [u8; 32]) -> Self {
        Self::with_tls(super::tls::client_config(root))
    }

    /// A client sharing `tls` with others (many simulated nodes of one cluster).
    pub fn with_tls(tls: Arc<rustls::ClientConfig>) -> Self {
        Self {
            http: https(tls),
            session: None,
        }
    }

    /// Use this session's bearer from now on.
    pub fn set_session(&mut self, session: &str) {
        self.session = Some(Zeroizing::new(session.to_string()));
    }

    pub fn has_session(&self) -> bool {
        self.session.is_some()
    }

    /// `POST /v1/join` at `url`: the token's secret goes only to a gateway that passed the
    /// pinned check. On success the session is kept for the other calls.
    pub async fn join(
        &mut self,
        url: &str,
        request: &JoinRequest,
    ) -> Result<Answer<JoinResponse>, CallError> {
        let body = serde_json::to_vec(request)
            .map_err(|e| CallError::transient(format!("encode join request: {e}")))?;
        let answer: Answer<JoinResponse> = self
            .call(
                Method::POST,
                &format!("{url}/v1/join"),
                Some(body),
                CALL_TIMEOUT,
                false,
            )
            .await?;
        self.set_session(answer.body.session.bearer().as_str());
        Ok(answer)
    }

    /// `GET /v1/peers`: what changed since `cursor` (a snapshot without one), waiting up to
    /// `wait` for a change. The `Update` is left to `decode`: it can be tens of MiB.
    pub async fn poll(
        &self,
        url: &str,
        cursor: Option<&Cursor>,
        wait: Duration,
    ) -> Result<Answer<Raw>, CallError> {
        let mut target = format!("{url}/v1/peers?wait={}", wait.as_secs());
        if let Some(cursor) = cursor {
            target.push_str("&cursor=");
            target.push_str(&cursor.to_string());
        }
        self.fetch(Method::GET, &target, None, wait + POLL_SLACK, true)
            .await
    }

    /// `PUT /v1/self`: this node's endpoints, services and GPU summary.
    pub async fn put_self(&self, url: &str, advert: &Advert) -> Result<(), CallError> {
        let body = serde_json::to_vec(advert)
            .map_err(|e| CallError::transient(format!("encode advert: {e}")))?;
        self.call::<Option<serde_json::Value>>(
            Method::PUT,
            &format!("{url}/v1/self"),
            Some(body),
            CALL_TIMEOUT,
            true,
        )
        .await
        .map(|_| ())
    }

    /// `GET /v1/services/<name>`: every instance of a service, in one request.
    pub async fn services(
        &self,
        url: &str,
        name: &str,
    ) -> Result<Answer<ServiceAnswer>, CallError> {
        let encoded: String = form_urlencoded::byte_serialize(name.as_bytes()).collect();
        self.call(
            Method::GET,
            &format!("{url}/v1/services/{encoded}"),
            None,
            CALL_TIMEOUT,
            true,
        )
        .await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        url: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
        bearer: bool,
    ) -> Result<Answer<T>, CallError> {
        let answer = self.fetch(method, url, body, timeout, bearer).await?;
        Ok(Answer {
            body: decode(url, &answer.body)?,
            wire_bytes: answer.wire_bytes,
        })
    }

    async fn fetch(
        &self,
        method: Method,
        url: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
        bearer: bool,
    ) -> Result<Answer<Raw>, CallError> {
        let mut request = Request::builder().method(method).uri(url);
        if bearer {
            let Some(session) = &self.session else {
                return Err(CallError {
                    retry: Retry::NeedsOperator,
                    message: "no gateway session (the node has not joined)".into(),
                    status: None,
                    retry_after: None,
                    last_seq: None,
                });
            };
            request = request.header(
                hyper::header::AUTHORIZATION,
                format!("Bearer {}", session.as_str()),
            );
        }
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        // Snapshots compress about fourfold; the gateway compresses only larger answers.
        request = request.header(hyper::header::ACCEPT_ENCODING, "gzip");
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| CallError {
                retry: Retry::NeedsOperator,
                message: format!("bad gateway URL {url}: {e}"),
                status: None,
                retry_after: None,
                last_seq: None,
            })?;
        let exchange = async {
            let response = self.http.request(request).await.map_err(|e| {
                CallError::transient(format!("gateway {url}: {}", crate::http::source_chain(&e)))
            })?;
            let status = response.status();
            let gzip = response
                .headers()
                .get(hyper::header::CONTENT_ENCODING)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
            let retry_after = response
                .headers()
                .get(hyper::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let bytes = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| {
                    CallError::transient(format!("gateway {url}: reading the answer: {e}"))
                })?
                .to_bytes();
            Ok::<_, CallError>((status, retry_after, gzip, bytes))
        };
        let (status, retry_after, gzip, bytes) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| {
            CallError::transient(format!("gateway {url}: no answer within {timeout:?}"))
        })??;
        if !status.is_success() {
            return Err(refusal(url, status, retry_after, &bytes));
        }
        Ok(Answer {
            wire_bytes: bytes.len(),
            body: Raw { bytes, gzip },
        })
    }
}

/// A gateway's non-2xx answer: its `{error, retry}` body says whether retrying helps.
fn refusal(url: &str, status: StatusCode, retry_after: Option<Duration>, body: &[u8]) -> CallError {
    let parsed: Option<ErrorBody> = serde_json::from_slice(body).ok();
    let (message, retry, last_seq) = match parsed {
        Some(e) => (e.error, e.retry, e.last_seq),
        None => (
            status.canonical_reason().unwrap_or("error").to_string(),
            // Not the gateway's own answer (a proxy's, say): only a timeout or overload
            // there is worth another try.
            status.is_server_error()
                || status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::REQUEST_TIMEOUT,
            None,
        ),
    };
    CallError {
        retry: if retry {
            Retry::Transient
        } else {
            Retry::NeedsOperator
        },
        message: format!("gateway {url} refused ({}): {message}", status.as_u16()),
        status: Some(status.as_u16()),
        retry_after,
        last_seq,
    }
}

/// Inflate a gzip answer, refusing one that grows past `MAX_ANSWER` (a gzip bomb).
fn gunzip(bytes: &[u8]) -> std::io::Result<Bytes> {
    use std::io::Read as _;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(MAX_ANSWER as u64 + 1)
        .read_to_end(&mut out)?;
    if out.len() > MAX_ANSWER {
        return Err(std::io::Error::other("answer too large"));
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn a_join_timed_out_by_a_proxy_is_retried_and_a_refused_token_needs_the_operator() {
        let url = "https://203.0.113.1:443";
        let timed_out = refusal(url, StatusCode::REQUEST_TIMEOUT, None, b"<html>408</html>");
        assert_eq!(timed_out.retry, Retry::Transient, "{timed_out}");
        let overloaded = refusal(url, StatusCode::BAD_GATEWAY, None, b"");
        assert_eq!(overloaded.retry, Retry::Transient, "{overloaded}");

        let used = refusal(
            url,
            StatusCode::FORBIDDEN,
            None,
            br#"{"error":"token already used","retry":false}"#,
        );
        assert_eq!(used.retry, Retry::NeedsOperator);
        assert!(used.message.contains("token already used"), "{used}");
        let name = refusal(
            url,
            StatusCode::CONFLICT,
            None,
            br#"{"error":"name gpu-03 is in use by n4: revoke it first or pick another name","retry":false}"#,
        );
        assert_eq!(name.retry, Retry::NeedsOperator);
        assert!(name.message.contains("revoke it first"), "{name}");
    }

    #[test]
    fn a_gzip_answer_that_inflates_past_the_cap_is_refused() {
        let mut small = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        small.write_all(b"{\"services\":[]}").unwrap();
        assert_eq!(
            &gunzip(&small.finish().unwrap()).unwrap()[..],
            b"{\"services\":[]}"
        );
        let mut bomb = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![0u8; 1024 * 1024];
        for _ in 0..(MAX_ANSWER / zeros.len() + 1) {
            bomb.write_all(&zeros).unwrap();
        }
        let bomb = bomb.finish().unwrap();
        assert!(bomb.len() < 1024 * 1024);
        assert!(gunzip(&bomb).is_err());
    }
}
