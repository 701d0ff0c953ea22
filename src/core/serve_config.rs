//! Tailscale Services advertisement as pure edits of tailscaled's state: the serve config
//! (`ServeConfig.Services`) and the `AdvertiseServices` pref. clawnode edits only the `svc:`
//! entries it owns and leaves every other byte alone (node-level TCP/Web, other tools'
//! services, Foreground sessions).

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

/// A service clawnode wants advertised, as `tailscale serve --service=svc:NAME` would set it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedService {
    /// The DNS label; the Tailscale name is `svc:<label>`.
    pub label: String,
    pub port: u16,
    pub mode: Mode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// TCPForward to 127.0.0.1:port.
    Tcp,
    /// tailscaled terminates HTTP (`tls = false`) or HTTPS (`tls = true`) and proxies to
    /// http://127.0.0.1:port.
    Http { tls: bool },
}

impl WantedService {
    pub fn name(&self) -> String {
        format!("svc:{}", self.label)
    }

    /// The `ServiceConfig` JSON for this service. HTTP modes need the MagicDNS suffix for the
    /// `Web` host key (`<label>.<suffix>:<port>`).
    pub fn entry(&self, suffix: &str) -> Value {
        let port = self.port.to_string();
        match self.mode {
            Mode::Tcp => {
                json!({ "TCP": { port: { "TCPForward": format!("127.0.0.1:{}", self.port) } } })
            }
            Mode::Http { tls } => {
                let kind = if tls { "HTTPS" } else { "HTTP" };
                let host = format!("{}.{}:{}", self.label, suffix.trim_matches('.'), self.port);
                json!({
                    "TCP": { port: { kind: true } },
                    "Web": { host: { "Handlers": { "/": { "Proxy": format!("http://127.0.0.1:{}", self.port) } } } }
                })
            }
        }
    }
}

/// The serve config with clawnode's services set to `wanted`: entries it owns but no longer
/// wants are removed, wanted ones are written, nothing else changes. Returns the new config
/// and the new set of owned names.
pub fn reconcile(
    current: &Value,
    owned: &BTreeSet<String>,
    wanted: &[WantedService],
    suffix: &str,
) -> (Value, BTreeSet<String>) {
    let mut config = match current {
        Value::Object(map) => map.clone(),
        Value::Null | Value::Bool(_) | Value::Number(_) | Value::String(_) | Value::Array(_) => {
            Map::new()
        }
    };
    let wanted_names: BTreeSet<String> = wanted.iter().map(WantedService::name).collect();
    let mut services = match config.get("Services") {
        Some(Value::Object(map)) => map.clone(),
        _ => Map::new(),
    };
    for name in owned.difference(&wanted_names) {
        services.shift_remove(name);
    }
    for service in wanted {
        let entry = service.entry(suffix);
        let name = service.name();
        if services.get(&name) != Some(&entry) {
            services.insert(name, entry);
        }
    }
    // Written back in place, so the keys around it keep their order and bytes.
    match (services.is_empty(), config.get_mut("Services")) {
        (true, _) => {
            config.shift_remove("Services");
        }
        (false, Some(slot)) => *slot = Value::Object(services),
        (false, None) => {
            config.insert("Services".into(), Value::Object(services));
        }
    }
    (Value::Object(config), wanted_names)
}

/// The serve config without the services clawnode owns.
pub fn withdraw(current: &Value, owned: &BTreeSet<String>) -> Value {
    reconcile(current, owned, &[], "").0
}

/// `AdvertiseServices` with clawnode's services set to `wanted`; others keep their order.
pub fn advertise(
    current: &[String],
    owned: &BTreeSet<String>,
    wanted: &[WantedService],
) -> Vec<String> {
    let wanted_names: Vec<String> = wanted.iter().map(WantedService::name).collect();
    let mut out: Vec<String> = current
        .iter()
        .filter(|name| !owned.contains(*name) || wanted_names.contains(name))
        .cloned()
        .collect();
    for name in wanted_names {
        if !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// `AdvertiseServices` drained of clawnode's services (the first step of a withdrawal).
pub fn drain(current: &[String], owned: &BTreeSet<String>) -> Vec<String> {
    advertise(current, owned, &[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn molt() -> WantedService {
        WantedService {
            label: "molt-provider".into(),
            port: 8443,
            mode: Mode::Tcp,
        }
    }

    fn others() -> Value {
        json!({
            "TCP": { "9050": { "TCPForward": "tor:9050" } },
            "Services": { "svc:someone-else": { "TCP": { "80": { "HTTP": true } } } },
            "Foreground": { "abc": { "TCP": { "22": { "TCPForward": "127.0.0.1:22" } } } }
        })
    }

    #[test]
    fn advertising_adds_only_our_entry_and_keeps_everything_else() {
        let (next, owned) = reconcile(&others(), &BTreeSet::new(), &[molt()], "tail1.ts.net");
        assert_eq!(
            next["Services"]["svc:molt-provider"],
            json!({ "TCP": { "8443": { "TCPForward": "127.0.0.1:8443" } } })
        );
        assert_eq!(next["TCP"], others()["TCP"]);
        assert_eq!(next["Foreground"], others()["Foreground"]);
        assert_eq!(
            next["Services"]["svc:someone-else"],
            others()["Services"]["svc:someone-else"]
        );
        assert!(owned.contains("svc:molt-provider"));
    }

    #[test]
    fn an_https_service_gets_a_web_handler_on_its_magicdns_name() {
        let svc = WantedService {
            label: "gateway".into(),
            port: 443,
            mode: Mode::Http { tls: true },
        };
        let (next, _) = reconcile(&Value::Null, &BTreeSet::new(), &[svc], "tail1.ts.net.");
        let entry = &next["Services"]["svc:gateway"];
        assert_eq!(entry["TCP"]["443"], json!({ "HTTPS": true }));
        assert_eq!(
            entry["Web"]["gateway.tail1.ts.net:443"]["Handlers"]["/"]["Proxy"],
            "http://127.0.0.1:443"
        );
    }

    #[test]
    fn a_service_no_longer_configured_is_removed_but_only_if_we_own_it() {
        let (with_ours, owned) = reconcile(&others(), &BTreeSet::new(), &[molt()], "t");
        let (next, owned) = reconcile(&with_ours, &owned, &[], "t");
        assert_eq!(
            serde_json::to_string(&next).unwrap(),
            serde_json::to_string(&others()).unwrap()
        );
        assert!(owned.is_empty());
    }

    #[test]
    fn an_empty_config_stays_free_of_an_empty_services_map() {
        let (next, _) = reconcile(&Value::Null, &BTreeSet::new(), &[], "t");
        assert_eq!(next, json!({}));
    }

    #[test]
    fn advertise_services_keeps_foreign_names_and_drain_removes_only_ours() {
        let current = vec!["svc:other".to_string()];
        let with = advertise(&current, &BTreeSet::new(), &[molt()]);
        assert_eq!(with, vec!["svc:other", "svc:molt-provider"]);
        let owned: BTreeSet<String> = ["svc:molt-provider".to_string()].into();
        assert_eq!(drain(&with, &owned), vec!["svc:other"]);
    }

    fn arb_foreign() -> impl Strategy<Value = Value> {
        proptest::collection::btree_map("[a-z]{1,6}", 1u16..9000, 1..4).prop_map(|m| {
            let services: Map<String, Value> = m
                .into_iter()
                .map(|(k, p)| (format!("svc:x-{k}"), json!({ "TCP": { p.to_string(): { "TCPForward": format!("127.0.0.1:{p}") } } })))
                .collect();
            json!({ "TCP": { "22": { "TCPForward": "127.0.0.1:22" } }, "Services": services })
        })
    }

    fn arb_wanted() -> impl Strategy<Value = Vec<WantedService>> {
        proptest::collection::btree_map("[a-z]{1,6}", (1u16..9000, 0u8..3), 0..4).prop_map(|m| {
            m.into_iter()
                .map(|(label, (port, mode))| WantedService {
                    label,
                    port,
                    mode: match mode {
                        0 => Mode::Tcp,
                        1 => Mode::Http { tls: false },
                        _ => Mode::Http { tls: true },
                    },
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn foreign_entries_are_byte_identical_through_advertise_and_withdraw(
            foreign in arb_foreign(), first in arb_wanted(), second in arb_wanted()
        ) {
            let (a, owned) = reconcile(&foreign, &BTreeSet::new(), &first, "tail1.ts.net");
            let (b, owned) = reconcile(&a, &owned, &second, "tail1.ts.net");
            let (again, same) = reconcile(&b, &owned, &second, "tail1.ts.net");
            prop_assert_eq!(&again, &b, "reconcile is idempotent");
            prop_assert_eq!(&same, &owned);
            let gone = withdraw(&b, &owned);
            prop_assert_eq!(
                serde_json::to_string(&gone).unwrap(),
                serde_json::to_string(&foreign).unwrap()
            );
        }
    }
}
