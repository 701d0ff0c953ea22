//! Before the daemon starts in Tailscale mode as a user other than root: will tailscaled take
//! its writes? It would otherwise wait for an operator forever without ever becoming ready,
//! and under `Type=notify` that is a start timeout and a restart, over and over.

use std::path::Path;

use serde_json::Value;

use super::localapi::LocalApi;
use crate::core::tailscale_plan::tailscaled_lets_write;

#[derive(Debug, thiserror::Error)]
#[error(
    "the tailscale provider needs to change tailscaled's settings, which tailscaled allows only root and its operator user ({operator}), and clawnode runs as {user} (uid {uid}): run `tailscale set --operator={user}`, or run clawnode as root with the unit's drop-in (ln -s /usr/share/clawnode/tailscale-root.conf /etc/systemd/system/clawnode.service.d/ && systemctl daemon-reload); retrying cannot help"
)]
pub struct NotOperator {
    pub user: String,
    pub uid: u32,
    pub operator: String,
}

/// `Err` when tailscaled answers and will not take this process's writes; `Ok` when it will,
/// or when it cannot be asked now (not running yet: the provider's own retries cover that).
pub async fn check_write_access(socket: &Path) -> Result<(), NotOperator> {
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return Ok(());
    }
    let prefs: Value = match LocalApi::new(socket).read("/localapi/v0/prefs").await {
        Ok(prefs) => prefs,
        Err(error) => {
            tracing::debug!(component = "mesh", %error, "could not read tailscaled's operator before start");
            return Ok(());
        }
    };
    let operator = prefs["OperatorUser"].as_str().unwrap_or("");
    let user = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map(|u| u.name);
    if tailscaled_lets_write(uid.as_raw(), user.as_deref(), operator) {
        return Ok(());
    }
    Err(NotOperator {
        user: user.unwrap_or_else(|| uid.to_string()),
        uid: uid.as_raw(),
        operator: if operator.is_empty() {
            "none is set".to_string()
        } else {
            format!("now {operator:?}")
        },
    })
}
