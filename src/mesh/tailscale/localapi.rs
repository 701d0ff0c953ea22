//! A client for tailscaled's LocalAPI over its Unix socket: HTTP/1 through hyperlocal, with the
//! `Host` header tailscaled insists on, per-call timeouts, the three error body formats and
//! status-based error classes, and the daemon version from `Tailscale-Version`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::header::{HOST, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyperlocal::{UnixClientExt, UnixConnector};

use crate::http::source_chain;

/// The only Host tailscaled accepts (besides none); hyperlocal would otherwise send the
/// hex-encoded socket path, which tailscaled answers with 403.
pub const HOST_HEADER: &str = "local-tailscaled.sock";
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer read. `status` with peers is the big one: about 1.1 KiB a peer as
/// tailscaled 1.102 writes it (tab-indented), so this holds tailnets of tens of thousands of
/// nodes while a broken daemon still cannot make clawnode buffer without bound.
pub const MAX_BODY: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LocalApiError {
    #[error("tailscaled is not reachable at {socket}: {reason}")]
    Unreachable { socket: String, reason: String },
    #[error(
        "{call}: tailscaled denied it ({message}); run clawnode as root (the unit's tailscale-root.conf drop-in) or as tailscaled's operator user"
    )]
    Forbidden { call: String, message: String },
    #[error("{call}: this tailscaled does not have it ({message}); a newer tailscaled is needed")]
    NotFound { call: String, message: String },
    #[error("{call}: the serve config changed since it was read (ETag mismatch)")]
    EtagMismatch { call: String },
    #[error("{call}: rate limited by tailscaled ({message})")]
    RateLimited {
        call: String,
        retry_after: Option<Duration>,
        message: String,
    },
    #[error("{call}: tailscaled has no network map yet ({message})")]
    NoNetmap { call: String, message: String },
    #[error("{call}: tailscaled answered {status}: {message}")]
    Status {
        call: String,
        status: u16,
        message: String,
    },
    #[error("{call}: no answer from tailscaled within {seconds} s")]
    Timeout { call: String, seconds: u64 },
    #[error("{call}: unexpected answer: {reason}")]
    Decode { call: String, reason: String },
}

/// A daemon version, from the leading `MAJOR.MINOR.PATCH` of tailscaled's long version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    pub const SERVICES: Version = Version::new(1, 86, 0);
    pub const SERVICES_LIST: Version = Version::new(1, 98, 0);
    /// The first release that supports serving as a peer relay (`RelayServerPort`).
    pub const PEER_RELAY: Version = Version::new(1, 86, 0);

    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }

    /// `1.94.2-t0a29cf18b-g3f044c9f6` → 1.94.2.
    pub fn parse(long: &str) -> Option<Version> {
        let core = long.trim().split(['-', '+', ' ']).next()?;
        let mut parts = core.split('.').map(|p| p.parse::<u32>().ok());
        Some(Version::new(parts.next()??, parts.next()??, parts.next()??))
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// A successful answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub version: Option<Version>,
    pub etag: Option<String>,
    pub body: Bytes,
}

impl Reply {
    pub fn json<T: serde::de::DeserializeOwned>(&self, call: &str) -> Result<T, LocalApiError> {
        serde_json::from_slice(&self.body).map_err(|e| LocalApiError::Decode {
            call: call.to_string(),
            reason: e.to_string(),
        })
    }
}

#[derive(Clone)]
pub struct LocalApi {
    socket: PathBuf,
    client: Client<UnixConnector, Full<Bytes>>,
    timeout: Duration,
}

impl LocalApi {
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
            client: Client::unix(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same client with a longer or shorter per-call deadline.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn get(&self, path: &str) -> Result<Reply, LocalApiError> {
        self.call(Method::GET, path, None, None).await
    }

    /// GET a path and decode its JSON.
    pub async fn read<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<T, LocalApiError> {
        self.get(path).await?.json(path)
    }

    /// POST or PATCH `body` as JSON.
    pub async fn send_json(
        &self,
        method: Method,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<Reply, LocalApiError> {
        let body = serde_json::to_vec(body).map_err(|e| LocalApiError::Decode {
            call: format!("{method} {path}"),
            reason: e.to_string(),
        })?;
        self.call(method, path, Some(body), None).await
    }

    /// A call with an optional JSON body and optional `If-Match`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        if_match: Option<&str>,
    ) -> Result<Reply, LocalApiError> {
        let call = format!("{method} {path}");
        let request = self.request(method, path, body, if_match, &call)?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| self.unreachable(source_chain(&e)))?;
            let status = response.status();
            let headers = response.headers().clone();
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<LengthLimitError>() {
                        LocalApiError::Decode {
                            call: call.clone(),
                            reason: format!(
                                "the answer is larger than {} MiB",
                                MAX_BODY / (1024 * 1024)
                            ),
                        }
                    } else {
                        self.unreachable(e.to_string())
                    }
                })?
                .to_bytes();
            Ok::<_, LocalApiError>((status, headers, body))
        };
        let (status, headers, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| LocalApiError::Timeout {
                call: call.clone(),
                seconds: self.timeout.as_secs(),
            })??;
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        if !status.is_success() {
            return Err(classify(
                &call,
                status,
                &body,
                header("Retry-After").as_deref(),
            ));
        }
        Ok(Reply {
            status: status.as_u16(),
            version: header("Tailscale-Version")
                .as_deref()
                .and_then(Version::parse),
            etag: header("Etag"),
            body,
        })
    }

    /// Open the IPN bus: the response body streams one JSON object per line, without a
    /// timeout (only the connection is timed).
    pub async fn watch_bus(&self, mask: u64) -> Result<hyper::body::Incoming, LocalApiError> {
        let path = format!("/localapi/v0/watch-ipn-bus?mask={mask}");
        let call = format!("GET {path}");
        let request = self.request(Method::GET, &path, None, None, &call)?;
        let response = tokio::time::timeout(self.timeout, self.client.request(request))
            .await
            .map_err(|_| LocalApiError::Timeout {
                call: call.clone(),
                seconds: self.timeout.as_secs(),
            })?
            .map_err(|e| self.unreachable(source_chain(&e)))?;
        let status = response.status();
        if !status.is_success() {
            let body = response
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(classify(&call, status, &body, None));
        }
        Ok(response.into_body())
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        if_match: Option<&str>,
        call: &str,
    ) -> Result<Request<Full<Bytes>>, LocalApiError> {
        let uri: hyper::Uri = hyperlocal::Uri::new(&self.socket, path).into();
        let mut builder = Request::builder().method(method).uri(uri);
        if body.is_some() {
            builder = builder.header("Content-Type", "application/json");
        }
        if let Some(etag) = if_match {
            builder = builder.header("If-Match", etag);
        }
        let mut request = builder
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| LocalApiError::Decode {
                call: call.to_string(),
                reason: e.to_string(),
            })?;
        request
            .headers_mut()
            .insert(HOST, HeaderValue::from_static(HOST_HEADER));
        Ok(request)
    }

    fn unreachable(&self, reason: String) -> LocalApiError {
        LocalApiError::Unreachable {
            socket: self.socket.display().to_string(),
            reason,
        }
    }
}

/// Map an error status to its class, with the message from whichever body format was used.
pub fn classify(
    call: &str,
    status: StatusCode,
    body: &[u8],
    retry_after: Option<&str>,
) -> LocalApiError {
    let message = error_message(body);
    let call = call.to_string();
    match status.as_u16() {
        403 => LocalApiError::Forbidden { call, message },
        404 => LocalApiError::NotFound { call, message },
        412 => LocalApiError::EtagMismatch { call },
        429 => LocalApiError::RateLimited {
            call,
            retry_after: retry_after
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map(Duration::from_secs),
            message,
        },
        503 => LocalApiError::NoNetmap { call, message },
        status => LocalApiError::Status {
            call,
            status,
            message,
        },
    }
}

/// tailscaled's error bodies: `{"error": …}` (WriteErrorJSON), `{"Error": …}` (prefs), or
/// plain text (http.Error). Keys match case-insensitively, as in Go's client.
pub fn error_message(body: &[u8]) -> String {
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(body)
        && let Some(text) = map
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("error"))
            .and_then(|(_, v)| v.as_str())
    {
        return text.to_string();
    }
    String::from_utf8_lossy(body).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_versions_parse_to_their_release() {
        assert_eq!(
            Version::parse("1.94.2-t0a29cf18b-g3f044c9f6"),
            Some(Version::new(1, 94, 2))
        );
        assert_eq!(Version::parse("1.102.2"), Some(Version::new(1, 102, 2)));
        assert_eq!(Version::parse("garbage"), None);
        assert!(Version::new(1, 86, 0) < Version::new(1, 102, 0));
    }

    #[test]
    fn all_three_error_formats_yield_the_message() {
        assert_eq!(
            error_message(b"{\"error\":\"decoding config: eof\"}"),
            "decoding config: eof"
        );
        assert_eq!(
            error_message(b"{\"Error\":\"bad hostname\"}"),
            "bad hostname"
        );
        assert_eq!(error_message(b"etag mismatch\n"), "etag mismatch");
    }

    #[test]
    fn statuses_map_to_their_classes() {
        let c = |s: u16, retry: Option<&str>| {
            classify("GET x", StatusCode::from_u16(s).unwrap(), b"msg\n", retry)
        };
        assert!(matches!(c(403, None), LocalApiError::Forbidden { .. }));
        assert!(matches!(c(404, None), LocalApiError::NotFound { .. }));
        assert!(matches!(c(412, None), LocalApiError::EtagMismatch { .. }));
        assert!(matches!(
            c(429, Some("7")),
            LocalApiError::RateLimited { retry_after: Some(d), .. } if d == Duration::from_secs(7)
        ));
        assert!(matches!(c(503, None), LocalApiError::NoNetmap { .. }));
        assert!(matches!(
            c(500, None),
            LocalApiError::Status { status: 500, .. }
        ));
    }
}
