//! Peer relays: tailscaled's `RelayServerPort` pref, set, kept and cleared as
//! `core::tailscale_relay` plans it. Which port clawnode set is recorded in the state
//! directory before the write, so only clawnode's own change is ever undone. Nothing here fails
//! a join: a relay that cannot be set is a problem on a node that stays ready.

use std::path::Path;

use hyper::Method;
use serde_json::json;

use super::localapi::{LocalApi, Version};
use super::provider::TailscaleMesh;
use super::types::Prefs;
use crate::core::tailscale_relay::{
    RelayOwned, RelayStep, check_relay_applied, plan_relay, plan_relay_stop,
};
use crate::mesh::MeshError;
use crate::state;

const OWNED_FILE: &str = state::TAILSCALE_RELAY;
const PREFS: &str = "/localapi/v0/prefs";

impl TailscaleMesh {
    /// Bring the pref to `wanted` (or undo clawnode's own port when the key went away), and
    /// say what kept it from being applied. `status_version` stands in for a missing
    /// `Tailscale-Version` header.
    pub(super) async fn apply_relay(
        &mut self,
        api: &LocalApi,
        wanted: Option<u16>,
        status_version: Option<&str>,
    ) -> Option<String> {
        let problem = match self.relay_step(api, wanted, status_version).await {
            Ok(problem) => problem,
            Err(error) => Some(format!("peer relay: {error}")),
        };
        if let Some(problem) = &problem {
            tracing::warn!(
                component = "mesh",
                relay_server_port = ?wanted,
                %problem,
                "peer relay not applied; the node stays ready"
            );
        }
        let recorded = problem.clone();
        self.live.update(|t| {
            t.relay_wanted = wanted;
            t.relay_problem = recorded;
        });
        problem
    }

    async fn relay_step(
        &mut self,
        api: &LocalApi,
        wanted: Option<u16>,
        status_version: Option<&str>,
    ) -> Result<Option<String>, MeshError> {
        let owned = load_owned(&self.state_dir).unwrap_or_default();
        if wanted.is_none() && owned.ports.is_empty() {
            // Not configured and nothing of clawnode's to undo: no read at all.
            return Ok(None);
        }
        let reply = api.get(PREFS).await?;
        let prefs: Prefs = reply.json("prefs")?;
        let version = reply
            .version
            .or_else(|| status_version.and_then(Version::parse));
        let decision = plan_relay(
            wanted,
            prefs.relay_server_port,
            &owned.ports,
            version.map(|v| v >= Version::PEER_RELAY),
            &version.map_or_else(|| "(version unknown)".to_string(), |v| v.to_string()),
        );
        match decision.step {
            RelayStep::Nothing => {}
            RelayStep::Set(port) => {
                // Recorded first, beside a port of ours the pref may still hold: a crash or a
                // failed write leaves whichever it holds known as ours.
                let mut claimed = owned.ports.clone();
                if !claimed.contains(&port) {
                    claimed.push(port);
                }
                save_owned(&self.state_dir, Some(RelayOwned { ports: claimed }))?;
                let returned = patch(api, Some(port))
                    .await
                    .map_err(|e| locked_problem(e, port))?;
                if let Err(problem) = check_relay_applied(port, returned) {
                    return Ok(Some(problem));
                }
                save_owned(&self.state_dir, Some(RelayOwned { ports: vec![port] }))?;
                tracing::info!(
                    component = "mesh",
                    relay_server_port = port,
                    "peer relay server port set in tailscaled's prefs"
                );
            }
            RelayStep::Clear => self.clear_relay(api).await?,
            RelayStep::Forget => save_owned(&self.state_dir, None)?,
        }
        Ok(decision.problem)
    }

    /// At stop: clear the port only when configured to, and only if it is still the one
    /// clawnode set. A failure is logged; the stop goes on.
    pub(super) async fn relay_stop(&mut self) {
        let Some(api) = self.api.clone() else {
            return;
        };
        let Some(owned) = load_owned(&self.state_dir).filter(|o| !o.ports.is_empty()) else {
            return;
        };
        let result = async {
            if !self.relay_clear_on_stop {
                // Kept: no read needed.
                return Ok(());
            }
            let prefs: Prefs = api.read(PREFS).await?;
            let clear_on_stop = self.relay_clear_on_stop;
            match plan_relay_stop(clear_on_stop, &owned.ports, prefs.relay_server_port) {
                RelayStep::Clear => self.clear_relay(&api).await,
                RelayStep::Nothing | RelayStep::Set(_) | RelayStep::Forget => Ok(()),
            }
        }
        .await;
        if let Err(error) = result {
            tracing::warn!(
                component = "mesh",
                relay_server_ports = ?owned.ports,
                %error,
                "could not clear the peer relay port at stop"
            );
        }
    }

    async fn clear_relay(&mut self, api: &LocalApi) -> Result<(), MeshError> {
        patch(api, None).await?;
        save_owned(&self.state_dir, None)?;
        tracing::info!(
            component = "mesh",
            "peer relay server port clawnode set is cleared"
        );
        Ok(())
    }
}

/// tailscaled started with `--config` refuses every prefs write, and its config file has no
/// field for the relay port: say so rather than only relay the refusal.
fn locked_problem(error: MeshError, port: u16) -> MeshError {
    if !error.to_string().contains("config file is locked") {
        return error;
    }
    MeshError::needs_operator(format!(
        "tailscaled runs with --config, which locks its prefs and cannot set a relay port: UDP {port} is not served while it does ({error})"
    ))
}

/// PATCH the pref (`None` clears it, as `tailscale set --relay-server-port=` does) and return
/// the port in tailscaled's answer.
async fn patch(api: &LocalApi, port: Option<u16>) -> Result<Option<u16>, MeshError> {
    let body = json!({ "RelayServerPort": port, "RelayServerPortSet": true });
    let reply = api.send_json(Method::PATCH, PREFS, &body).await?;
    let prefs: Prefs = reply.json("prefs")?;
    Ok(prefs.relay_server_port)
}

/// The port clawnode set, as recorded in the state directory.
pub(super) fn load_owned(state_dir: &Path) -> Option<RelayOwned> {
    std::fs::read(state_dir.join(OWNED_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

fn save_owned(state_dir: &Path, owned: Option<RelayOwned>) -> Result<(), MeshError> {
    let path = state_dir.join(OWNED_FILE);
    let Some(owned) = owned else {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(MeshError::transient(
                format!("cannot remove {}: {e}", path.display()),
            )),
            _ => Ok(()),
        };
    };
    let body = serde_json::to_vec(&owned)
        .map_err(|e| MeshError::transient(format!("cannot encode {OWNED_FILE}: {e}")))?;
    state::ensure_private_dir(state_dir)
        .and_then(|()| state::write_atomic(&path, &body, 0o600))
        .map_err(|e| MeshError::transient(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recorded_port_survives_a_restart_and_forgetting_removes_it() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load_owned(dir.path()), None);
        let owned = RelayOwned {
            ports: vec![40000, 40001],
        };
        save_owned(dir.path(), Some(owned.clone())).unwrap();
        assert_eq!(load_owned(dir.path()), Some(owned));
        save_owned(dir.path(), None).unwrap();
        assert_eq!(load_owned(dir.path()), None);
        save_owned(dir.path(), None).expect("forgetting twice is fine");
    }
}
