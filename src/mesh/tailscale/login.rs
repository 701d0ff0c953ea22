//! Bringing the node up when the plan says so: complete prefs through `check-prefs` and
//! `start`, an auth key only when one is needed, `login-interactive` for a node without a key,
//! then a wait on the IPN bus for Running.

use std::time::Duration;

use http_body_util::BodyExt;
use hyper::Method;
use zeroize::Zeroizing;

use super::authkey::{self, Secret};
use super::localapi::LocalApi;
use super::types::{CheckPrefs, IpnState, Prefs, StartOptions};
use super::watcher::{BUS_MASK, Ndjson};
use crate::config::TailscaleConfig;
use crate::core::Retry;
use crate::core::tailscale_plan::bus_error_retry;
use crate::mesh::MeshError;

/// How long a bring-up waits on the bus for Running.
const LOGIN_WAIT: Duration = Duration::from_secs(60);

/// What a bring-up sets and how it logs in.
pub struct Login<'a> {
    pub hostname: &'a str,
    pub tags: &'a [String],
    /// A key must go with `start`.
    pub needs_auth: bool,
    /// `login-interactive` after `start` (a node without a key).
    pub login_interactive: bool,
}

/// `start` with complete prefs (keeping AdvertiseServices), `login-interactive` when asked,
/// then wait on the bus for Running. `pending_key` keeps a resolved key across attempts until
/// a login with it completes.
pub async fn bring_up(
    api: &LocalApi,
    ts: &TailscaleConfig,
    mut prefs: Prefs,
    login: Login<'_>,
    pending_key: &mut Option<Secret>,
) -> Result<(), MeshError> {
    let (control, trusted) = control_urls(ts.control_url.as_deref(), prefs.control_url.as_deref());
    let sends_key = login.needs_auth && (pending_key.is_some() || ts.auth.is_some());
    if sends_key {
        key_may_go_to(&control, &trusted)?;
    }
    prefs.control_url = Some(control);
    prefs.want_running = Some(true);
    prefs.hostname = Some(login.hostname.to_string());
    prefs.advertise_tags = Some(login.tags.to_vec());
    // Config is ignored on input; AdvertiseServices stays as it is (start replaces prefs
    // wholesale, and leaving it out would un-advertise every service).
    prefs.rest.remove("Config");
    check_prefs(api, &prefs).await?;
    // Only now a key: a refusal above must not cost a minted key per retry.
    // A key minted for an attempt that failed later (start refused, no Running in time) is
    // kept for the next attempt: it was not used, and minting costs a key each time.
    let auth_key = match (login.needs_auth, pending_key.take()) {
        (false, _) => None,
        (true, Some(kept)) => Some(kept),
        (true, None) => authkey::resolve(ts.auth.as_ref(), Some(&trusted), login.tags).await?,
    };
    pending_key.clone_from(&auth_key);
    // Open before `start`, so that no state change is missed.
    let bus = api.watch_bus(BUS_MASK).await?;
    let options = StartOptions {
        auth_key: auth_key.as_deref().map_or("", |k| k.as_str()),
        update_prefs: &prefs,
    };
    let body = Zeroizing::new(
        serde_json::to_vec(&options)
            .map_err(|e| MeshError::transient(format!("cannot encode the start options: {e}")))?,
    );
    api.call(
        Method::POST,
        "/localapi/v0/start",
        Some(body.to_vec()),
        None,
    )
    .await?;
    if login.login_interactive {
        api.call(Method::POST, "/localapi/v0/login-interactive", None, None)
            .await?;
    }
    tracing::info!(
        component = "mesh",
        hostname = login.hostname,
        "asked tailscaled to log in; waiting for Running"
    );
    tokio::time::timeout(LOGIN_WAIT, wait_for_running(bus))
        .await
        .map_err(|_| {
            MeshError::transient(format!(
                "tailscaled did not reach Running within {} s",
                LOGIN_WAIT.as_secs()
            ))
        })??;
    *pending_key = None;
    Ok(())
}

/// Where tailscaled logs in, and where clawnode may send secrets.
///
/// tailscaled logs in where the config says, else where its own `ControlURL` pref points (as
/// `tailscale up` keeps it), else at the default. Secrets (workload identity ID tokens, OAuth
/// access tokens, minted keys) go only to the configured URL or the built-in default: the pref
/// is read from tailscaled, whose operator need not be root and may point it anywhere.
fn control_urls(configured: Option<&str>, pref: Option<&str>) -> (String, String) {
    let trusted = configured
        .unwrap_or(authkey::DEFAULT_CONTROL_URL)
        .to_string();
    let login = configured
        .or(pref.filter(|p| !p.is_empty()))
        .unwrap_or(authkey::DEFAULT_CONTROL_URL)
        .to_string();
    (login, trusted)
}

/// `start` hands the key to tailscaled, which presents it to the server it logs into: a key
/// (minted or configured) goes along only when that server is the trusted one.
fn key_may_go_to(login: &str, trusted: &str) -> Result<(), MeshError> {
    let same = |a: &str, b: &str| {
        a.trim_end_matches('/')
            .eq_ignore_ascii_case(b.trim_end_matches('/'))
    };
    if same(login, trusted) {
        return Ok(());
    }
    let shown: String = login
        .split(['?', '#'])
        .next()
        .unwrap_or("")
        .chars()
        .take(200)
        .collect();
    Err(MeshError::needs_operator(format!(
        "tailscaled's ControlURL pref points at {shown:?}, not {trusted}: clawnode sends auth keys only to [network.tailscale] control_url or the default; set control_url to that server if you trust it, or point tailscaled back at {trusted}"
    )))
}

/// tailscaled answers 200 with `{"Error"}` when it would refuse these prefs; the same prefs
/// are refused again until the config or the tailnet policy changes.
async fn check_prefs(api: &LocalApi, prefs: &Prefs) -> Result<(), MeshError> {
    let verdict: CheckPrefs = api
        .send_json(Method::POST, "/localapi/v0/check-prefs", prefs)
        .await?
        .json("check-prefs")?;
    let Some(error) = verdict.error.filter(|e| !e.is_empty()) else {
        return Ok(());
    };
    Err(MeshError::needs_operator(format!(
        "tailscaled refuses the prefs clawnode would set: {error}"
    )))
}

/// Running or NeedsMachineAuth ends the wait (the status check that follows reports the
/// latter); an error, a login URL or a closed bus ends it with a failure.
async fn wait_for_running(mut bus: hyper::body::Incoming) -> Result<(), MeshError> {
    let mut lines = Ndjson::default();
    while let Some(frame) = bus.frame().await {
        let Ok(frame) = frame else { break };
        let Some(data) = frame.data_ref() else {
            continue;
        };
        for notify in lines.push(data) {
            if let Some(message) = notify.err_message {
                let text = format!("tailscaled: {message}");
                return Err(match bus_error_retry(&message) {
                    Retry::Transient => MeshError::transient(text),
                    Retry::NeedsOperator => MeshError::needs_operator(text),
                });
            }
            if notify.browse_to_url.is_some_and(|u| !u.is_empty()) {
                // The URL itself stays out: whoever opens it can claim the node.
                return Err(MeshError::needs_operator(
                    "tailscaled wants an interactive login: the auth key was missing or rejected (`tailscale status` shows the login URL to root)",
                ));
            }
            let Some(state) = notify.state else {
                continue;
            };
            match state {
                IpnState::Running | IpnState::NeedsMachineAuth => return Ok(()),
                IpnState::NoState
                | IpnState::InUseOtherUser
                | IpnState::NeedsLogin
                | IpnState::Stopped
                | IpnState::Starting
                | IpnState::Unknown => {}
            }
        }
    }
    Err(MeshError::transient(
        "tailscaled closed the IPN bus during login",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::Retry;

    const ROGUE: &str = "https://rogue.example";

    #[test]
    fn secrets_go_to_the_configured_control_server_whatever_tailscaled_prefers() {
        let (login, trusted) = control_urls(Some("https://hs.example.net"), Some(ROGUE));
        assert_eq!(login, "https://hs.example.net");
        assert_eq!(trusted, "https://hs.example.net");
    }

    #[test]
    fn without_a_configured_server_secrets_go_to_the_default_not_to_tailscaleds_pref() {
        let (login, trusted) = control_urls(None, Some(ROGUE));
        assert_eq!(
            login, ROGUE,
            "tailscaled itself still logs in where its pref says"
        );
        assert_eq!(trusted, authkey::DEFAULT_CONTROL_URL);
        let (login, trusted) = control_urls(None, Some(""));
        assert_eq!(login, authkey::DEFAULT_CONTROL_URL);
        assert_eq!(trusted, authkey::DEFAULT_CONTROL_URL);
    }

    #[test]
    fn a_key_is_not_handed_to_a_tailscaled_that_would_log_in_elsewhere() {
        let error = key_may_go_to(ROGUE, authkey::DEFAULT_CONTROL_URL).unwrap_err();
        assert_eq!(error.retry(), Retry::NeedsOperator);
        assert!(error.to_string().contains("ControlURL"), "{error}");
        assert!(
            key_may_go_to(
                "https://controlplane.tailscale.com/",
                authkey::DEFAULT_CONTROL_URL
            )
            .is_ok()
        );
        assert!(
            key_may_go_to(
                "HTTPS://ControlPlane.Tailscale.com",
                authkey::DEFAULT_CONTROL_URL
            )
            .is_ok()
        );
    }
}
