//! The tailnet policy fragment a configuration needs, for `clawnode tailscale policy`: who may
//! own the node's tags, auto-approval of its services for those tags, a grant that lets
//! buyers reach each service on its port, and with `relay_server_port` the grant that lets
//! peers use the node as a peer relay. Also reading a policy file (HuJSON) for `doctor`.

use serde_json::{Map, Value, json};

use crate::config::Config;

/// Who buys capacity, unless `--buyers` says otherwise.
pub const DEFAULT_BUYERS: &str = "tag:molt-buyer";

/// The peer capability that lets `src` allocate relay endpoints on `dst` (tailscaled's
/// `tailcfg/peercap.Relay`).
pub const RELAY_CAP: &str = "tailscale.com/cap/relay";

/// A policy file larger than this is not read: real ones are a few KiB.
pub const MAX_POLICY_BYTES: u64 = 1024 * 1024;

/// The grant that lets the buyers and the other GPU nodes (the same tags) use a node with
/// `tags` as a peer relay. Shape as in Tailscale's peer relay docs
/// (https://tailscale.com/docs/kubernetes-operator/peer-relay, "Configure a grant policy"):
/// `src` who may use the relay, `dst` the relay's tags, `app` the relay capability with no
/// parameters.
pub fn relay_grant(tags: &[String], buyers: &str) -> Value {
    let mut src = vec![buyers.to_string()];
    src.extend(tags.iter().filter(|t| t.as_str() != buyers).cloned());
    json!({ "src": src, "dst": tags, "app": { RELAY_CAP: [] } })
}

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
    let mut grants: Vec<Value> = config
        .services
        .iter()
        .map(|(name, spec)| {
            json!({ "src": [buyers], "dst": [format!("svc:{name}")], "ip": [format!("tcp:{}", spec.port)] })
        })
        .collect();
    if config.network.tailscale.relay_server_port.is_some() {
        grants.push(relay_grant(&tags, buyers));
    }
    Ok(json!({
        "tagOwners": tag_owners,
        "autoApprovers": { "services": services },
        "grants": grants,
    }))
}

/// Where and why a policy file does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    /// 1-based, when the parser knows the place.
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

/// Parse a tailnet policy file. HuJSON is JSON plus comments and trailing commas; the other
/// JSON5 liberties the parser knows are turned off, so what tailscale rejects is rejected here.
/// The parser limits nesting (512), so hostile input cannot exhaust the stack.
pub fn parse(text: &str) -> Result<Value, PolicyError> {
    let options = jsonc_parser::ParseOptions {
        allow_comments: true,
        allow_trailing_commas: true,
        allow_loose_object_property_names: false,
        allow_missing_commas: false,
        allow_single_quoted_strings: false,
        allow_hexadecimal_numbers: false,
        allow_unary_plus_numbers: false,
        allow_bare_decimal_point_numbers: false,
        allow_non_finite_numbers: false,
        allow_extended_string_escapes: false,
    };
    let value: Value = jsonc_parser::parse_to_serde_value(text, &options).map_err(|error| {
        // The error's Display appends "on line L column C"; keep the kind, place apart.
        let range = error.range();
        let positioned = range.start != 0
            || range.end != 0
            || !matches!(
                error.kind(),
                jsonc_parser::errors::ParseErrorKind::Custom(_)
            );
        PolicyError {
            line: positioned.then(|| error.line_display()),
            column: positioned.then(|| error.column_display()),
            message: error.kind().to_string(),
        }
    })?;
    if !value.is_object() {
        return Err(PolicyError {
            line: None,
            column: None,
            message: "the policy is not a JSON object".into(),
        });
    }
    Ok(value)
}

/// The first grant that gives the relay capability on this node: `app` has
/// `tailscale.com/cap/relay` and `dst` names one of `tags` or `*`. Anything of the wrong
/// shape is skipped, never trusted.
pub fn find_relay_grant<'a>(policy: &'a Value, tags: &[String]) -> Option<&'a Value> {
    policy.get("grants")?.as_array()?.iter().find(|grant| {
        let has_cap = grant
            .get("app")
            .and_then(Value::as_object)
            .is_some_and(|app| app.contains_key(RELAY_CAP));
        let names_node = grant
            .get("dst")
            .and_then(Value::as_array)
            .is_some_and(|dst| {
                dst.iter()
                    .filter_map(Value::as_str)
                    .any(|d| d == "*" || tags.iter().any(|t| t == d))
            });
        has_cap && names_node
    })
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

    #[test]
    fn a_relay_node_gets_the_grant_that_lets_buyers_and_the_other_gpu_nodes_relay_through_it() {
        let without = fragment(&config(BASE), "autogroup:admin", "tag:molt-buyer").unwrap();
        assert!(
            !without.to_string().contains(RELAY_CAP),
            "no relay grant without relay_server_port"
        );
        let text = BASE.replace(
            "[network.tailscale]\n",
            "[network.tailscale]\nrelay_server_port = 40000\n",
        );
        let policy = fragment(&config(&text), "autogroup:admin", "tag:molt-buyer").unwrap();
        let grants = policy["grants"].as_array().unwrap();
        let relay = json!({
            "src": ["tag:molt-buyer", "tag:clawbernetes", "tag:gpu-provider"],
            "dst": ["tag:clawbernetes", "tag:gpu-provider"],
            "app": { "tailscale.com/cap/relay": [] }
        });
        assert!(grants.contains(&relay), "{policy:#}");
        assert_eq!(grants.len(), 3, "the service grants stay: {policy:#}");
        let tags = [
            "tag:clawbernetes".to_string(),
            "tag:gpu-provider".to_string(),
        ];
        assert_eq!(find_relay_grant(&policy, &tags), Some(&relay));
        // Buyers that are one of the node's tags are not named twice.
        assert_eq!(
            relay_grant(&tags, "tag:gpu-provider")["src"],
            json!(["tag:gpu-provider", "tag:clawbernetes"])
        );
    }

    #[test]
    fn a_hujson_policy_with_comments_and_trailing_commas_is_read_and_its_relay_grant_found() {
        let text = r#"
// Example/default ACLs for unrestricted connections.
{
    /* tags */
    "tagOwners": { "tag:clawbernetes": ["autogroup:admin"], },
    "grants": [
        { "src": ["*"], "dst": ["*"], "ip": ["*"] },
        {
            "src": ["tag:molt-buyer"],
            "dst": ["tag:gpu-provider"], // the relays
            "app": { "tailscale.com/cap/relay": [], },
        },
    ],
}
"#;
        let policy = parse(text).unwrap();
        let tags = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let found = find_relay_grant(&policy, &tags(&["tag:clawbernetes", "tag:gpu-provider"]));
        assert_eq!(found.unwrap()["src"], json!(["tag:molt-buyer"]));
        assert_eq!(
            find_relay_grant(&policy, &tags(&["tag:clawbernetes"])),
            None
        );
        let star = parse(
            r#"{"grants": [{"src": ["*"], "dst": ["*"], "app": {"tailscale.com/cap/relay": []}}]}"#,
        )
        .unwrap();
        assert!(
            find_relay_grant(&star, &tags(&["tag:x"])).is_some(),
            "* names every node"
        );
        let other_cap = parse(r#"{"grants": [{"src": ["*"], "dst": ["*"], "app": {"tailscale.com/cap/relay-target": []}}]}"#).unwrap();
        assert_eq!(find_relay_grant(&other_cap, &tags(&["tag:x"])), None);
    }

    #[test]
    fn a_broken_policy_names_line_and_column() {
        let error =
            parse("{\n  \"grants\": [\n    {\"src\": [\"*\"] \"dst\": []}\n  ]\n}\n").unwrap_err();
        assert_eq!(error.line, Some(3), "{error:?}");
        assert!(error.column.is_some(), "{error:?}");
        // JSON5 liberties that tailscale's HuJSON parser rejects are rejected here too.
        assert!(parse("{'grants': []}").is_err());
        assert!(parse("{grants: []}").is_err());
        assert!(parse("{\"a\": 0x10}").is_err());
        let not_object = parse("[1, 2]").unwrap_err();
        assert_eq!(not_object.message, "the policy is not a JSON object");
        assert!(parse("").is_err(), "an empty file is no policy");
    }

    #[test]
    fn odd_policies_never_panic_and_never_match() {
        let tags = vec!["tag:clawbernetes".to_string()];
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(parse(&deep).is_err(), "nesting is limited");
        let deep_objects = format!("{}1{}", "{\"a\":".repeat(50_000), "}".repeat(50_000));
        assert!(parse(&deep_objects).is_err());
        for odd in [
            r#"{"grants": null}"#,
            r#"{"grants": {"src": ["*"]}}"#,
            r#"{"grants": [null, 1, "x", [], {}]}"#,
            r#"{"grants": [{"app": null, "dst": null}]}"#,
            r#"{"grants": [{"app": ["tailscale.com/cap/relay"], "dst": ["*"]}]}"#,
            r#"{"grants": [{"app": {"tailscale.com/cap/relay": null}, "dst": "tag:clawbernetes"}]}"#,
            r#"{"grants": [{"app": {"tailscale.com/cap/relay": []}, "dst": [null, 7, {"tag:clawbernetes": 1}]}]}"#,
            "{\"grants\": [\"\\u0000\", \"\\ud800\"]}",
            "{\"grants\": [1e999999, -0, 123456789012345678901234567890]}",
            "{\"grants\": [/* unterminated",
            "\u{feff}{}",
            "{} {}",
            "\"grants\"",
        ] {
            if let Ok(policy) = parse(odd) {
                assert_eq!(find_relay_grant(&policy, &tags), None, "{odd}");
            }
        }
    }
}
