//! Turning the configured auth method into the `tskey-auth-…` string that `start` takes.
//!
//! tailscaled knows nothing of OAuth clients or workload identity: the CLI mints an ordinary
//! auth key first, over HTTPS to the control plane, and so does clawnode. Every secret here
//! (ID token, access token, client secret, minted key) stays in `Zeroizing` buffers and never
//! reaches an error message.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request};
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::config::{IdTokenSource, TailscaleAuth};

pub const DEFAULT_CONTROL_URL: &str = "https://controlplane.tailscale.com";
pub const DEFAULT_API_URL: &str = "https://api.tailscale.com";

#[derive(Debug, thiserror::Error)]
pub enum AuthKeyError {
    #[error("{0}")]
    Config(String),
    #[error("cannot read {what} {path}: {reason}")]
    Read {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("{step} at {url} failed: {reason}")]
    Exchange {
        step: &'static str,
        url: String,
        /// The control plane's HTTP status, when it answered.
        status: Option<u16>,
        reason: String,
    },
}

pub type Secret = Zeroizing<String>;

/// The auth key to hand to `start`, or `None` when no auth method is configured.
pub async fn resolve(
    auth: Option<&TailscaleAuth>,
    control_url: Option<&str>,
    tags: &[String],
) -> Result<Option<Secret>, AuthKeyError> {
    let Some(auth) = auth else {
        return Ok(None);
    };
    let key = match auth {
        TailscaleAuth::Key(_) | TailscaleAuth::KeyFile(_) | TailscaleAuth::KeyEnv(_) => {
            plain_key(auth)?
        }
        TailscaleAuth::WorkloadIdentity {
            client_id,
            id_token,
        } => {
            let token = match id_token {
                IdTokenSource::File(path) => read_secret("id_token_file", path)?,
                IdTokenSource::Audience(audience) => ambient_id_token(audience).await?,
            };
            let control = control_url.unwrap_or(DEFAULT_CONTROL_URL);
            return workload_identity(control, client_id, &token, tags)
                .await
                .map(Some);
        }
    };
    if key.starts_with("tskey-client-") {
        return oauth_client_secret(&key, tags).await.map(Some);
    }
    Ok(Some(key))
}

/// Whether the configured method can produce a key, without minting one: files readable,
/// variables set, attributes valid. For `doctor`, which must change nothing.
pub fn check(auth: &TailscaleAuth) -> Result<(), AuthKeyError> {
    let key = match auth {
        TailscaleAuth::Key(_) | TailscaleAuth::KeyFile(_) | TailscaleAuth::KeyEnv(_) => {
            plain_key(auth)?
        }
        TailscaleAuth::WorkloadIdentity {
            client_id,
            id_token,
        } => {
            split_attrs(client_id, &[])?;
            if let IdTokenSource::File(path) = id_token {
                read_secret("id_token_file", path)?;
            }
            return Ok(());
        }
    };
    if key.starts_with("tskey-client-") {
        split_attrs(&key, &["baseURL"])?;
    }
    Ok(())
}

/// What a minted key may do, from `?ephemeral=…&preauthorized=…` on a client id or secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyAttrs {
    pub ephemeral: bool,
    pub preauthorized: bool,
}

/// A client id or secret with its `?attrs` taken apart.
#[derive(Debug)]
pub struct Attributed<'a> {
    pub value: &'a str,
    pub attrs: KeyAttrs,
    /// The allowed attributes beyond the two key ones, as given.
    pub extra: Vec<(String, String)>,
}

/// Split `value?attrs` into the value and its attributes. `extra` names the attributes beyond
/// the two key ones that this form allows (the client secret's `baseURL`).
pub fn split_attrs<'a>(value: &'a str, extra: &[&str]) -> Result<Attributed<'a>, AuthKeyError> {
    let (base, query) = value.split_once('?').unwrap_or((value, ""));
    let mut attrs = KeyAttrs {
        ephemeral: true,
        preauthorized: false,
    };
    let mut rest = Vec::new();
    for (name, raw) in form_urlencoded::parse(query.as_bytes()) {
        let flag = || {
            raw.parse::<bool>().map_err(|_| {
                AuthKeyError::Config(format!("attribute {name}={raw} is not true or false"))
            })
        };
        match name.as_ref() {
            "ephemeral" => attrs.ephemeral = flag()?,
            "preauthorized" => attrs.preauthorized = flag()?,
            other if extra.contains(&other) => rest.push((name.to_string(), raw.to_string())),
            other => {
                return Err(AuthKeyError::Config(format!(
                    "unknown attribute {other:?} (allowed: ephemeral, preauthorized{})",
                    extra.iter().map(|e| format!(", {e}")).collect::<String>()
                )));
            }
        }
    }
    Ok(Attributed {
        value: base,
        attrs,
        extra: rest,
    })
}

/// The key-creation body both flows send: a single-use key with the node's tags.
pub fn key_request(attrs: KeyAttrs, tags: &[String]) -> Value {
    json!({ "capabilities": { "devices": { "create": {
        "reusable": false,
        "ephemeral": attrs.ephemeral,
        "preauthorized": attrs.preauthorized,
        "tags": tags,
    } } } })
}

/// Workload identity: exchange the ID token at `<control>/api/v2/oauth/token-exchange`, then
/// mint a key at `<control>/api/v2/tailnet/-/keys` with the access token as Basic user.
async fn workload_identity(
    control: &str,
    client_id: &str,
    id_token: &str,
    tags: &[String],
) -> Result<Secret, AuthKeyError> {
    if tags.is_empty() {
        return Err(AuthKeyError::Config(
            "workload identity needs [network.tailscale] tags".into(),
        ));
    }
    let Attributed {
        value: client_id,
        attrs,
        ..
    } = split_attrs(client_id, &[])?;
    let control = control.trim_end_matches('/');
    let url = format!("{control}/api/v2/oauth/token-exchange");
    let form = Zeroizing::new(
        form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "authorization_code")
            .append_pair("code", "")
            .append_pair("client_id", client_id)
            .append_pair("jwt", id_token)
            .finish(),
    );
    let access = access_token("token exchange", &url, &form).await?;
    let basic = Zeroizing::new(
        base64::engine::general_purpose::STANDARD.encode(format!("{}:", access.as_str())),
    );
    let auth = Zeroizing::new(format!("Basic {}", basic.as_str()));
    mint_key(control, &auth, attrs, tags).await
}

/// An OAuth client secret (`tskey-client-…[?attrs]`): client credentials at
/// `<baseURL>/api/v2/oauth/token`, then a key from `<baseURL>/api/v2/tailnet/-/keys`.
async fn oauth_client_secret(secret: &str, tags: &[String]) -> Result<Secret, AuthKeyError> {
    if tags.is_empty() {
        return Err(AuthKeyError::Config(
            "an OAuth client secret needs [network.tailscale] tags".into(),
        ));
    }
    let Attributed {
        value: secret,
        attrs,
        extra: rest,
    } = split_attrs(secret, &["baseURL"])?;
    let base = rest
        .iter()
        .find(|(k, _)| k == "baseURL")
        .map_or(DEFAULT_API_URL, |(_, v)| v.as_str())
        .trim_end_matches('/')
        .to_string();
    let url = format!("{base}/api/v2/oauth/token");
    let form = Zeroizing::new(
        form_urlencoded::Serializer::new(String::new())
            .append_pair("grant_type", "client_credentials")
            // The API ignores the id for client-secret grants; the CLI sends a placeholder too.
            .append_pair("client_id", "some-client-id")
            .append_pair("client_secret", secret)
            .finish(),
    );
    let access = access_token("OAuth client credentials", &url, &form).await?;
    let auth = Zeroizing::new(format!("Bearer {}", access.as_str()));
    mint_key(&base, &auth, attrs, tags).await
}

async fn access_token(step: &'static str, url: &str, form: &str) -> Result<Secret, AuthKeyError> {
    let reply = post(
        step,
        url,
        "application/x-www-form-urlencoded",
        form.as_bytes(),
        None,
    )
    .await?;
    let token = reply["access_token"].as_str().unwrap_or("");
    if token.is_empty() {
        return Err(exchange(step, url, "the answer has no access_token"));
    }
    Ok(Zeroizing::new(token.to_string()))
}

async fn mint_key(
    base: &str,
    authorization: &str,
    attrs: KeyAttrs,
    tags: &[String],
) -> Result<Secret, AuthKeyError> {
    let url = format!("{base}/api/v2/tailnet/-/keys");
    let body = key_request(attrs, tags).to_string();
    let reply = post(
        "auth key request",
        &url,
        "application/json",
        body.as_bytes(),
        Some(authorization),
    )
    .await?;
    let key = reply["key"].as_str().unwrap_or("");
    if key.is_empty() {
        return Err(exchange("auth key request", &url, "the answer has no key"));
    }
    tracing::info!(
        component = "mesh",
        ephemeral = attrs.ephemeral,
        preauthorized = attrs.preauthorized,
        "minted a single-use Tailscale auth key"
    );
    Ok(Zeroizing::new(key.to_string()))
}

/// An ID token from the environment, as the CLI's `--audience` does it: GitHub Actions, then
/// the GCP metadata server. AWS needs a signed STS call, which clawnode does not make.
async fn ambient_id_token(audience: &str) -> Result<Secret, AuthKeyError> {
    if let (Ok(url), Ok(bearer)) = (
        std::env::var("ACTIONS_ID_TOKEN_REQUEST_URL"),
        std::env::var("ACTIONS_ID_TOKEN_REQUEST_TOKEN"),
    ) {
        let bearer = Zeroizing::new(bearer);
        let sep = if url.contains('?') { '&' } else { '?' };
        let audience: String = form_urlencoded::byte_serialize(audience.as_bytes()).collect();
        let url = format!("{url}{sep}audience={audience}");
        let auth = Zeroizing::new(format!("Bearer {}", bearer.as_str()));
        let reply = send(
            "GitHub Actions ID token",
            Method::GET,
            &url,
            None,
            &[(AUTHORIZATION.as_str(), auth.as_str())],
        )
        .await?;
        let value: Value = serde_json::from_slice(&reply)
            .map_err(|e| exchange("GitHub Actions ID token", &url, &format!("bad JSON: {e}")))?;
        let token = value["value"].as_str().unwrap_or("");
        if token.is_empty() {
            return Err(exchange("GitHub Actions ID token", &url, "no value"));
        }
        return Ok(Zeroizing::new(token.to_string()));
    }
    let audience: String = form_urlencoded::byte_serialize(audience.as_bytes()).collect();
    let url = format!(
        "http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/identity?audience={audience}&format=full"
    );
    match send(
        "GCP metadata ID token",
        Method::GET,
        &url,
        None,
        &[("Metadata-Flavor", "Google")],
    )
    .await
    {
        Ok(body) => {
            let token = Zeroizing::new(String::from_utf8_lossy(&body).trim().to_string());
            if token.is_empty() {
                return Err(exchange("GCP metadata ID token", &url, "empty token"));
            }
            Ok(token)
        }
        Err(error) => Err(AuthKeyError::Config(format!(
            "workload_identity audience: no ID token source found (GitHub Actions variables unset; GCP metadata: {error}); on AWS or elsewhere write the token to a file and set id_token_file"
        ))),
    }
}

/// The key from `auth_key`, `auth_key_file` or `auth_key_env`, trimmed and never empty.
/// Workload identity has no plain key (an error; callers dispatch on it first).
fn plain_key(auth: &TailscaleAuth) -> Result<Secret, AuthKeyError> {
    let key = match auth {
        TailscaleAuth::Key(secret) => Zeroizing::new(secret.expose().trim().to_string()),
        TailscaleAuth::KeyFile(path) => read_secret("auth_key_file", path)?,
        TailscaleAuth::KeyEnv(name) => Zeroizing::new(
            std::env::var(name)
                .map_err(|_| AuthKeyError::Config(format!("auth_key_env: ${name} is not set")))?
                .trim()
                .to_string(),
        ),
        TailscaleAuth::WorkloadIdentity { .. } => Zeroizing::new(String::new()),
    };
    if key.is_empty() {
        return Err(AuthKeyError::Config(
            "the configured Tailscale auth key is empty".into(),
        ));
    }
    Ok(key)
}

fn read_secret(what: &'static str, path: &Path) -> Result<Secret, AuthKeyError> {
    let text = Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| AuthKeyError::Read {
            what,
            path: path.display().to_string(),
            reason: e.to_string(),
        })?,
    );
    let text = Zeroizing::new(text.trim().to_string());
    if text.is_empty() {
        return Err(AuthKeyError::Config(format!(
            "{what} {} is empty",
            path.display()
        )));
    }
    Ok(text)
}

async fn post(
    step: &'static str,
    url: &str,
    content_type: &str,
    body: &[u8],
    authorization: Option<&str>,
) -> Result<Value, AuthKeyError> {
    let mut headers = vec![(CONTENT_TYPE.as_str(), content_type)];
    if let Some(auth) = authorization {
        headers.push((AUTHORIZATION.as_str(), auth));
    }
    let reply = send(step, Method::POST, url, Some(body), &headers).await?;
    serde_json::from_slice(&reply).map_err(|e| exchange(step, url, &format!("bad JSON: {e}")))
}

/// One HTTPS (or plain HTTP, for a self-hosted control server) request with a deadline.
async fn send(
    step: &'static str,
    method: Method,
    url: &str,
    body: Option<&[u8]>,
    headers: &[(&str, &str)],
) -> Result<Bytes, AuthKeyError> {
    const TIMEOUT: Duration = Duration::from_secs(30);
    if !secure_enough(url) {
        return Err(exchange(
            step,
            url,
            "refusing to send credentials over plain HTTP to a non-loopback host (use https://)",
        ));
    }
    let client = crate::http::https_client().map_err(|e| exchange(step, url, &e.to_string()))?;
    let mut request = Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(Bytes::copy_from_slice(body.unwrap_or_default())))
        .map_err(|e| exchange(step, url, &e.to_string()))?;
    for (name, value) in headers {
        let mut value =
            HeaderValue::from_str(value).map_err(|_| exchange(step, url, "bad header"))?;
        value.set_sensitive(true);
        request.headers_mut().insert(
            hyper::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| exchange(step, url, "bad header"))?,
            value,
        );
    }
    let exchange_call = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| exchange(step, url, &crate::http::source_chain(&e)))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| exchange(step, url, &e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            let reason = describe_error(status, &body);
            return Err(refused(step, url, Some(status.as_u16()), &reason));
        }
        Ok(body)
    };
    tokio::time::timeout(TIMEOUT, exchange_call)
        .await
        .map_err(|_| exchange(step, url, "no answer within 30 s"))?
}

/// Plain HTTP only to loopback (a self-hosted control server under test) and to the GCP
/// metadata server, which speaks nothing else; secrets go nowhere else unencrypted. The URL is
/// parsed as the HTTP client will parse it: the scheme compared without regard to case, and a
/// URL with user info (`http://127.0.0.1@elsewhere/`) refused outright, whatever its scheme.
fn secure_enough(url: &str) -> bool {
    let Ok(uri) = url.parse::<hyper::Uri>() else {
        return false;
    };
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return false;
    };
    if authority.as_str().contains('@') {
        return false;
    }
    if scheme.eq_ignore_ascii_case("https") {
        return true;
    }
    if !scheme.eq_ignore_ascii_case("http") {
        return false;
    }
    let host = authority.host().to_ascii_lowercase();
    matches!(
        host.as_str(),
        "127.0.0.1" | "localhost" | "[::1]" | "::1" | "metadata.google.internal"
    )
}

/// The status and the API's own message, never the raw body (it could echo a secret).
fn describe_error(status: hyper::StatusCode, body: &[u8]) -> String {
    let message = serde_json::from_slice::<Value>(body).ok().and_then(|v| {
        ["message", "error_description", "error"]
            .iter()
            .find_map(|k| v[*k].as_str().map(str::to_string))
    });
    match message {
        Some(m) => format!("HTTP {status}: {}", m.chars().take(200).collect::<String>()),
        None => format!("HTTP {status}"),
    }
}

fn exchange(step: &'static str, url: &str, reason: &str) -> AuthKeyError {
    refused(step, url, None, reason)
}

fn refused(step: &'static str, url: &str, status: Option<u16>, reason: &str) -> AuthKeyError {
    // Query strings can carry secrets; the URL is shown without one.
    let url = url.split('?').next().unwrap_or(url).to_string();
    AuthKeyError::Exchange {
        step,
        url,
        status,
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_id_attributes_default_to_an_ephemeral_key_that_needs_approval() {
        let split = split_attrs("kCLIENT123", &[]).unwrap();
        assert_eq!(split.value, "kCLIENT123");
        assert_eq!(
            split.attrs,
            KeyAttrs {
                ephemeral: true,
                preauthorized: false
            }
        );
        let split = split_attrs("kCLIENT123?ephemeral=false&preauthorized=true", &[]).unwrap();
        assert_eq!(split.value, "kCLIENT123");
        assert!(!split.attrs.ephemeral && split.attrs.preauthorized);
    }

    #[test]
    fn unknown_or_malformed_attributes_are_refused() {
        let error = split_attrs("kC?reusable=true", &[])
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown attribute \"reusable\""), "{error}");
        let error = split_attrs("kC?ephemeral=yes", &[])
            .unwrap_err()
            .to_string();
        assert!(error.contains("not true or false"), "{error}");
        let split = split_attrs("tskey-client-x?baseURL=http://h", &["baseURL"]).unwrap();
        assert_eq!(
            split.extra,
            [("baseURL".to_string(), "http://h".to_string())]
        );
    }

    #[test]
    fn a_minted_key_is_single_use_and_carries_the_node_tags() {
        let body = key_request(
            KeyAttrs {
                ephemeral: false,
                preauthorized: true,
            },
            &["tag:gpu".into()],
        );
        let create = &body["capabilities"]["devices"]["create"];
        assert_eq!(create["reusable"], false);
        assert_eq!(create["ephemeral"], false);
        assert_eq!(create["preauthorized"], true);
        assert_eq!(create["tags"], json!(["tag:gpu"]));
    }

    #[test]
    fn credentials_go_over_plain_http_only_to_loopback_and_the_metadata_server() {
        assert!(secure_enough("https://controlplane.tailscale.com/api"));
        assert!(secure_enough("http://127.0.0.1:8080/api/v2/oauth/token"));
        assert!(secure_enough(
            "http://metadata.google.internal/computeMetadata/v1/x?a=b"
        ));
        assert!(!secure_enough(
            "http://headscale.example.net/api/v2/oauth/token"
        ));
        assert!(!secure_enough("http://10.0.0.1:80/x"));
    }

    #[test]
    fn a_loopback_user_info_does_not_let_credentials_reach_another_host_over_plain_http() {
        assert!(!secure_enough(
            "http://127.0.0.1:1@evil.example/api/v2/oauth/token"
        ));
        assert!(!secure_enough("http://localhost@evil.example/x"));
        assert!(!secure_enough(
            "http://metadata.google.internal@evil.example/x"
        ));
    }

    #[test]
    fn credentials_never_go_to_a_url_with_user_info_even_over_https() {
        assert!(!secure_enough(
            "https://user:pass@controlplane.tailscale.com/api"
        ));
    }

    #[test]
    fn an_upper_case_http_scheme_is_still_plain_http() {
        assert!(!secure_enough("HTTP://evil.example/api/v2/oauth/token"));
        assert!(!secure_enough("Http://evil.example/x"));
        assert!(secure_enough("HTTP://127.0.0.1:8080/x"));
        assert!(secure_enough("HTTPS://controlplane.tailscale.com/x"));
    }

    #[test]
    fn only_http_and_https_urls_carry_credentials() {
        assert!(!secure_enough("ftp://controlplane.tailscale.com/x"));
        assert!(!secure_enough("controlplane.tailscale.com/x"));
        assert!(!secure_enough("not a url"));
        assert!(secure_enough("http://[::1]:8080/x"));
        assert!(secure_enough("http://LOCALHOST:8080/x"));
    }

    #[test]
    fn control_errors_show_the_message_but_not_the_body() {
        let text = describe_error(
            hyper::StatusCode::UNAUTHORIZED,
            br#"{"message":"invalid client","echo":"tskey-secret"}"#,
        );
        assert_eq!(text, "HTTP 401 Unauthorized: invalid client");
        assert_eq!(
            describe_error(hyper::StatusCode::BAD_GATEWAY, b"tskey-secret"),
            "HTTP 502 Bad Gateway"
        );
    }
}
