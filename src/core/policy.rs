//! The tailnet policy fragment a configuration needs, for `clawnode tailscale policy`: who may
//! own the node's tags, auto-approval of its services for those tags, and a grant that lets
//! buyers reach each service on its port.

use serde_json::{Map, Value, json};

use crate::config::Config;

/// `Err` when the config has no tags: services need a tagged host, so no policy can work.
pub fn fragment(config: &Config, owner: &str, buyers: &str) -> Result<Value, String> {
    let tags: Vec<String> = config
        .network
        .tailscale
        .tags
        .iter()
        .map(ToString::to_string)
        .collect();
    if tags.is_empty() {
        return Err(
            "[network.tailscale] tags is empty: Tailscale Services need a tagged host, so set tags first"
                .into(),
        );
    }
    let tag_owners: Map<String, Value> = tags
        .iter()
        .map(|tag| (tag.clone(), json!([owner])))
        .collect();
    let services: Map<String, Value> = config
        .services
        .keys()
        .map(|name| (format!("svc:{name}"), json!(tags)))
        .collect();
    let grants: Vec<Value> = config
        .services
        .iter()
        .map(|(name, spec)| {
            json!({ "src": [buyers], "dst": [format!("svc:{name}")], "ip": [format!("tcp:{}", spec.port)] })
        })
        .collect();
    Ok(json!({
        "tagOwners": tag_owners,
        "autoApprovers": { "services": services },
        "grants": grants,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        crate::config::parse(std::path::Path::new("t.toml"), text).unwrap()
    }

    const BASE: &str = r#"
[node]
name = "gpu-01"
[network]
provider = "tailscale"
[network.tailscale]
tags = ["tag:clawbernetes", "tag:gpu-provider"]
[services.molt-provider]
port = 8443
mode = "tcp"
[services.gateway]
port = 443
mode = "tcp"
"#;

    #[test]
    fn the_policy_lets_the_tags_host_every_service_and_buyers_reach_molt_provider() {
        let policy = fragment(&config(BASE), "autogroup:admin", "tag:molt-buyer").unwrap();
        assert_eq!(
            policy["tagOwners"],
            json!({ "tag:clawbernetes": ["autogroup:admin"], "tag:gpu-provider": ["autogroup:admin"] })
        );
        assert_eq!(
            policy["autoApprovers"]["services"]["svc:molt-provider"],
            json!(["tag:clawbernetes", "tag:gpu-provider"])
        );
        let grants = policy["grants"].as_array().unwrap();
        assert!(grants.contains(&json!({
            "src": ["tag:molt-buyer"], "dst": ["svc:molt-provider"], "ip": ["tcp:8443"]
        })));
        assert!(grants.contains(&json!({
            "src": ["tag:molt-buyer"], "dst": ["svc:gateway"], "ip": ["tcp:443"]
        })));
    }

    #[test]
    fn an_untagged_config_gets_no_policy_but_a_reason() {
        let text = BASE.replace(r#"tags = ["tag:clawbernetes", "tag:gpu-provider"]"#, "");
        let error = fragment(&config(&text), "autogroup:admin", "tag:b").unwrap_err();
        assert!(error.contains("tags is empty"), "{error}");
    }
}
