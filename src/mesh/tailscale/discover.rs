//! Which Tailscale Services this node can see: `GET services` on tailscaled 1.98 and newer,
//! else the `services/…` entries of the node's own `CapMap`, which carry the same details.

use serde::Serialize;
use serde_json::Value;

use super::localapi::{LocalApi, LocalApiError, Version};
use super::strings;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TsService {
    /// `svc:<label>`.
    pub name: String,
    /// `<label>.<MagicDNS suffix>`.
    pub dns_name: String,
    pub addrs: Vec<String>,
    /// As tailscaled lists them: `tcp:8443`, `tcp:8000-8010`, `*`.
    pub ports: Vec<String>,
}

/// The services named `svc:<label>` visible to this node.
pub async fn find(api: &LocalApi, label: &str) -> Result<Vec<TsService>, LocalApiError> {
    let reply = api.get("/localapi/v0/status?peers=false").await?;
    let status: Value = reply.json("status")?;
    let services: Option<Value> = if reply.version.is_some_and(|v| v >= Version::SERVICES_LIST) {
        Some(api.get("/localapi/v0/services").await?.json("services")?)
    } else {
        None
    };
    Ok(named(&status, services.as_ref(), label))
}

/// The services named `svc:<label>` in tailscaled's answers: `services` is the `GET services`
/// reply where the daemon has it, else the details come from the status's `Self.CapMap`.
pub fn named(status: &Value, services: Option<&Value>, label: &str) -> Vec<TsService> {
    let suffix = status["CurrentTailnet"]["MagicDNSSuffix"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let details: Vec<Value> = match services {
        Some(services) => services
            .as_object()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default(),
        None => status["Self"]["CapMap"]
            .as_object()
            .map(|caps| {
                caps.iter()
                    .filter(|(k, _)| k.starts_with("services/"))
                    .flat_map(|(_, v)| v.as_array().cloned().unwrap_or_default())
                    .collect()
            })
            .unwrap_or_default(),
    };
    let wanted = format!("svc:{label}");
    details
        .iter()
        .filter(|d| d["Name"].as_str() == Some(wanted.as_str()))
        .map(|d| TsService {
            name: wanted.clone(),
            dns_name: format!("{label}.{}", suffix.trim_matches('.')),
            addrs: strings(&d["Addrs"]),
            ports: strings(&d["Ports"]),
        })
        .collect()
}
