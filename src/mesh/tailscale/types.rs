//! The parts of tailscaled's LocalAPI replies that clawnode reads, typed.
//!
//! tailscaled omits empty fields, writes `null` for empty lists and maps, and grows new fields
//! with every release, so every field here is optional or defaults, and a field of an
//! unexpected shape reads as absent instead of failing the whole reply.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, DeserializeOwned, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use crate::core::tailscale_plan::IpnState;
use crate::core::tailscale_relay::PeerFacts;

use super::strings;

/// `GET status?peers=false`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Status {
    #[serde(rename = "Version", default, deserialize_with = "lenient")]
    pub version: Option<String>,
    #[serde(rename = "BackendState", default, deserialize_with = "lenient")]
    pub backend_state: Option<IpnState>,
    #[serde(rename = "HaveNodeKey", default, deserialize_with = "lenient")]
    pub have_node_key: bool,
    #[serde(rename = "TailscaleIPs", default, deserialize_with = "string_list")]
    pub tailscale_ips: Vec<String>,
    /// Absent on daemons without a netmap, and in trimmed captures.
    #[serde(rename = "Self", default, deserialize_with = "lenient")]
    pub self_node: SelfNode,
    /// `null` when there is no netmap.
    #[serde(rename = "CurrentTailnet", default, deserialize_with = "lenient")]
    pub current_tailnet: Option<CurrentTailnet>,
    /// The deprecated top-level copy of `CurrentTailnet.MagicDNSSuffix`.
    #[serde(rename = "MagicDNSSuffix", default, deserialize_with = "lenient")]
    pub magic_dns_suffix: Option<String>,
    /// Keyed by node key; absent with `?peers=false`, `null` without a netmap: both empty.
    /// `None` only when the key is missing, so a reply without peers is told from no peers.
    #[serde(rename = "Peer", default, deserialize_with = "peers")]
    pub peers: Option<BTreeMap<String, PeerStatus>>,
}

/// One peer in `status`, in the fields the path hint reads (`ipnstate.PeerStatus`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PeerStatus {
    #[serde(rename = "HostName", default, deserialize_with = "lenient")]
    pub host_name: Option<String>,
    #[serde(rename = "DNSName", default, deserialize_with = "lenient")]
    pub dns_name: Option<String>,
    #[serde(rename = "TailscaleIPs", default, deserialize_with = "string_list")]
    pub tailscale_ips: Vec<String>,
    /// `ip:port` of the direct path in use, or empty.
    #[serde(rename = "CurAddr", default, deserialize_with = "lenient")]
    pub cur_addr: String,
    /// The peer's home DERP region code, set whatever path traffic takes.
    #[serde(rename = "Relay", default, deserialize_with = "lenient")]
    pub relay: String,
    /// 1.86+: `ip:port:vni:N` of the peer relay in use, or empty.
    #[serde(rename = "PeerRelay", default, deserialize_with = "lenient")]
    pub peer_relay: String,
    #[serde(rename = "Active", default, deserialize_with = "lenient")]
    pub active: bool,
    #[serde(rename = "Online", default, deserialize_with = "lenient")]
    pub online: bool,
    /// Shared to another user: it may only connect in, and `tailscale status` hides it.
    #[serde(rename = "ShareeNode", default, deserialize_with = "lenient")]
    pub sharee_node: bool,
    #[serde(rename = "ExitNode", default, deserialize_with = "lenient")]
    pub exit_node: bool,
    #[serde(rename = "ExitNodeOption", default, deserialize_with = "lenient")]
    pub exit_node_option: bool,
}

impl PeerStatus {
    /// Whether `tailscale status` lists it (and so clawnode counts it).
    pub fn listed(&self) -> bool {
        crate::core::tailscale_relay::listed_in_status(
            self.sharee_node,
            self.exit_node_option,
            self.exit_node,
            self.dns_name.as_deref().unwrap_or(""),
        )
    }

    /// What the path rule reads; the name is the MagicDNS name's first label, else the host
    /// name (tailscaled's `dnsOrQuoteHostname`).
    pub fn facts(&self) -> PeerFacts {
        let label = self
            .dns_name
            .as_deref()
            .and_then(|n| n.split('.').next())
            .filter(|l| !l.is_empty());
        PeerFacts {
            name: label
                .or(self.host_name.as_deref())
                .unwrap_or_default()
                .to_string(),
            ip: self.tailscale_ips.first().cloned(),
            active: self.active,
            online: self.online,
            cur_addr: self.cur_addr.clone(),
            peer_relay: self.peer_relay.clone(),
            derp_region: self.relay.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct SelfNode {
    #[serde(rename = "PublicKey", default, deserialize_with = "lenient")]
    pub public_key: Option<String>,
    #[serde(rename = "HostName", default, deserialize_with = "lenient")]
    pub host_name: Option<String>,
    /// With the trailing dot.
    #[serde(rename = "DNSName", default, deserialize_with = "lenient")]
    pub dns_name: Option<String>,
    #[serde(rename = "Online", default, deserialize_with = "lenient")]
    pub online: bool,
    /// Omitted when the node is untagged.
    #[serde(rename = "Tags", default, deserialize_with = "string_list")]
    pub tags: Vec<String>,
    /// Capability → its values (`null` for a bare capability).
    #[serde(rename = "CapMap", default, deserialize_with = "lenient")]
    pub cap_map: Map<String, Value>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct CurrentTailnet {
    #[serde(rename = "Name", default, deserialize_with = "lenient")]
    pub name: Option<String>,
    /// Without surrounding dots.
    #[serde(rename = "MagicDNSSuffix", default, deserialize_with = "lenient")]
    pub magic_dns_suffix: Option<String>,
}

impl Status {
    pub fn tailnet_name(&self) -> Option<&str> {
        self.current_tailnet.as_ref()?.name.as_deref()
    }

    pub fn tailnet_suffix(&self) -> Option<&str> {
        self.current_tailnet.as_ref()?.magic_dns_suffix.as_deref()
    }

    /// `Self.CapMap["service-host"]`: the services control approved this host for, with their
    /// VIPs. Several objects are merged in order.
    pub fn approved_services(&self) -> BTreeMap<String, Vec<String>> {
        let mut out = BTreeMap::new();
        let Some(Value::Array(entries)) = self.self_node.cap_map.get("service-host") else {
            return out;
        };
        for entry in entries {
            let Value::Object(map) = entry else {
                continue;
            };
            for (name, vips) in map {
                out.insert(name.clone(), strings(vips));
            }
        }
        out
    }
}

/// `GET prefs`: the fields clawnode reads or sets, and every other field as it came, because
/// `start` replaces the prefs wholesale and a field left out would be reset.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Prefs {
    #[serde(
        rename = "ControlURL",
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub control_url: Option<String>,
    #[serde(
        rename = "Hostname",
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub hostname: Option<String>,
    /// `None` when absent or `null`.
    #[serde(
        rename = "AdvertiseTags",
        default,
        deserialize_with = "optional_string_list",
        skip_serializing_if = "Option::is_none"
    )]
    pub advertise_tags: Option<Vec<String>>,
    #[serde(
        rename = "AdvertiseServices",
        default,
        deserialize_with = "optional_string_list",
        skip_serializing_if = "Option::is_none"
    )]
    pub advertise_services: Option<Vec<String>>,
    #[serde(
        rename = "WantRunning",
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub want_running: Option<bool>,
    /// The peer relay server's UDP port (1.84+); absent when it is off.
    #[serde(
        rename = "RelayServerPort",
        default,
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub relay_server_port: Option<u16>,
    /// Everything else, untouched.
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

impl Prefs {
    pub fn tags(&self) -> &[String] {
        self.advertise_tags.as_deref().unwrap_or_default()
    }

    pub fn services(&self) -> &[String] {
        self.advertise_services.as_deref().unwrap_or_default()
    }
}

/// The answer of `POST check-prefs`: 200 with `{"Error"}` when tailscaled would refuse.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CheckPrefs {
    #[serde(rename = "Error", default, deserialize_with = "lenient")]
    pub error: Option<String>,
}

/// The body of `POST start`.
#[derive(Debug, Serialize)]
pub struct StartOptions<'a> {
    #[serde(rename = "AuthKey")]
    pub auth_key: &'a str,
    #[serde(rename = "UpdatePrefs")]
    pub update_prefs: &'a Prefs,
}

/// One IPN bus message; each field is absent when it did not change.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Notify {
    #[serde(rename = "State", default, deserialize_with = "lenient")]
    pub state: Option<IpnState>,
    #[serde(rename = "ErrMessage", default, deserialize_with = "lenient")]
    pub err_message: Option<String>,
    #[serde(rename = "BrowseToURL", default, deserialize_with = "lenient")]
    pub browse_to_url: Option<String>,
    /// Present (and not `null`) when the self node changed; its content is not needed.
    #[serde(rename = "SelfChange", default)]
    self_change: Option<IgnoredAny>,
}

impl Notify {
    pub fn self_changed(&self) -> bool {
        self.self_change.is_some()
    }
}

/// A field of the wrong shape, or `null`, reads as its default.
fn lenient<'de, D: Deserializer<'de>, T: DeserializeOwned + Default>(
    deserializer: D,
) -> Result<T, D::Error> {
    let value = Value::deserialize(deserializer)?;
    Ok(serde_json::from_value(value).unwrap_or_default())
}

/// The peer map: `null` (or any other shape) reads as empty, a peer of the wrong shape as one
/// with no facts. Read one peer at a time, so a big tailnet never sits in memory as a `Value`.
fn peers<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<BTreeMap<String, PeerStatus>>, D::Error> {
    struct Peers;

    impl<'de> Visitor<'de> for Peers {
        type Value = BTreeMap<String, PeerStatus>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("the Peer map")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(key) = map.next_key::<String>()? {
                let peer: Value = map.next_value()?;
                out.insert(key, serde_json::from_value(peer).unwrap_or_default());
            }
            Ok(out)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(BTreeMap::new())
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }

        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }

        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }

        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }

        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }

        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }
    }

    deserializer.deserialize_any(Peers).map(Some)
}

/// A list of strings, with `null` as empty and other entries skipped.
fn string_list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    Ok(strings(&Value::deserialize(deserializer)?))
}

/// Like `string_list`, but keeping whether the list was there at all.
fn optional_string_list<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Vec<String>>, D::Error> {
    let value = Value::deserialize(deserializer)?;
    Ok(value.is_array().then(|| strings(&value)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::tailscale_relay::{PathKind, classify};
    use serde_json::json;

    fn status(json: &str) -> Status {
        serde_json::from_str(json).expect("status parses")
    }

    #[test]
    fn the_real_captures_parse_with_their_unknown_fields_and_nulls() {
        let new = status(include_str!(
            "../../../tests/fixtures/tailscale/status-scrubbed-linux-1.102.2.json"
        ));
        assert_eq!(new.backend_state, Some(IpnState::Running));
        assert!(new.have_node_key);
        assert!(!new.tailscale_ips.is_empty());
        assert!(new.self_node.tags.is_empty(), "absent tags read as none");
        assert!(new.tailnet_name().is_none(), "absent tailnet");
        assert_eq!(new.self_node.host_name.as_deref(), Some("dgx-spark-01"));
        assert!(
            new.self_node.cap_map.contains_key("https"),
            "null caps kept"
        );
        assert!(new.approved_services().is_empty());
        let old = status(include_str!(
            "../../../tests/fixtures/tailscale/status-trimmed-1.76.6.json"
        ));
        assert!(old.self_node.tags.is_empty(), "no Self at all");
        assert_eq!(old.backend_state, Some(IpnState::Running));
        let prefs: Prefs = serde_json::from_str(include_str!(
            "../../../tests/fixtures/tailscale/prefs-partial.json"
        ))
        .expect("prefs parse");
        assert!(prefs.tags().is_empty(), "null tags");
        assert!(prefs.services().is_empty(), "missing key");
        assert_eq!(prefs.hostname.as_deref(), Some(""));
        assert_eq!(prefs.rest["OperatorUser"], "alex", "other fields kept");
    }

    #[test]
    fn nulls_where_lists_are_expected_read_as_empty() {
        let s = status(
            r#"{"TailscaleIPs": null, "Self": {"Tags": ["tag:a", null, 3], "CapMap": null},
                "CurrentTailnet": null, "BackendState": null, "HaveNodeKey": null}"#,
        );
        assert!(s.tailscale_ips.is_empty());
        assert_eq!(s.self_node.tags, vec!["tag:a"]);
        assert!(s.self_node.cap_map.is_empty());
        assert!(s.current_tailnet.is_none());
        assert!(s.backend_state.is_none());
        assert!(!s.have_node_key);
        let s = status(r#"{"Self": null, "TailscaleIPs": "100.64.0.1"}"#);
        assert!(s.self_node.tags.is_empty());
        assert!(s.tailscale_ips.is_empty(), "a string where a list belongs");
    }

    #[test]
    fn prefs_round_trip_every_field_clawnode_does_not_read() {
        let text = include_str!("../../../tests/fixtures/tailscale/prefs-partial.json");
        let prefs: Prefs = serde_json::from_str(text).expect("prefs parse");
        let original: Value = serde_json::from_str(text).expect("json");
        let back = serde_json::to_value(&prefs).expect("serializes");
        let Value::Object(original) = original else {
            panic!("prefs are an object");
        };
        for (key, value) in &original {
            if key == "AdvertiseTags" {
                assert!(back.get(key).is_none(), "null tags are left out");
                continue;
            }
            assert_eq!(back.get(key), Some(value), "{key}");
        }
    }

    fn paths(status: &Status) -> Vec<(String, PathKind, Option<String>)> {
        let mut out: Vec<_> = status
            .peers
            .as_ref()
            .expect("a peers map")
            .values()
            .map(|p| {
                let facts = p.facts();
                let (kind, via) = classify(&facts);
                (facts.name, kind, via)
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn every_real_capture_yields_each_peers_name_address_and_path() {
        let direct = status(include_str!(
            "../../../tests/fixtures/tailscale/status-direct-1.102.4.json"
        ));
        assert_eq!(
            paths(&direct),
            [
                ("ipad".into(), PathKind::Idle, None),
                (
                    "iphone-13".into(),
                    PathKind::Direct,
                    Some("172.16.31.147:41641".into())
                ),
            ],
            "the MagicDNS label, not the HostName \"localhost\""
        );
        let peer = direct.peers.as_ref().unwrap().values().next().unwrap();
        assert_eq!(peer.facts().ip.as_deref(), Some("100.78.141.76"));
        let scrubbed = status(include_str!(
            "../../../tests/fixtures/tailscale/status-scrubbed-linux-1.102.2.json"
        ));
        let kinds: Vec<PathKind> = paths(&scrubbed).into_iter().map(|p| p.1).collect();
        assert_eq!(
            kinds,
            [PathKind::Offline, PathKind::Offline, PathKind::Idle],
            "no Relay or CurAddr at all in this capture"
        );
        let old = status(include_str!(
            "../../../tests/fixtures/tailscale/status-trimmed-1.76.6.json"
        ));
        assert_eq!(
            paths(&old),
            [
                ("testhostname".into(), PathKind::Derp, Some("tok".into())),
                ("testhostname2".into(), PathKind::Idle, None),
            ],
            "before 1.86 there is no PeerRelay: an active peer without CurAddr is on DERP"
        );
        let mixed = status(include_str!(
            "../../../tests/fixtures/tailscale/status-mixed-paths.json"
        ));
        let all = paths(&mixed);
        let count = |k| all.iter().filter(|p| p.1 == k).count();
        assert_eq!(
            PathKind::ALL.map(count),
            [9, 2, 1, 0, 2, 1],
            "direct, peer-relay, DERP, unknown, idle, offline"
        );
        assert!(all.contains(&(
            "buyer-nat-1".into(),
            PathKind::PeerRelay,
            Some("203.0.113.50:40000:vni:7".into())
        )));
        assert!(all.contains(&("buyer-cgnat".into(), PathKind::Derp, Some("fra".into()))));
    }

    #[test]
    fn a_peer_map_that_is_null_or_missing_or_odd_still_parses() {
        assert!(
            status(r#"{"Peer": null}"#).peers.unwrap().is_empty(),
            "no netmap"
        );
        assert!(status("{}").peers.is_none(), "not asked for");
        let odd = status(
            r#"{"Peer": {"a": 3, "b": {"HostName": "h", "Active": "yes", "CurAddr": 7,
                "TailscaleIPs": null}, "c": {"DNSName": ".", "HostName": "c-host"}}}"#,
        );
        let peers = odd.peers.unwrap();
        assert_eq!(peers["a"].facts(), PeerFacts::default());
        let b = peers["b"].facts();
        assert_eq!(
            (b.name.as_str(), b.active, b.cur_addr.as_str()),
            ("h", false, "")
        );
        assert_eq!(peers["c"].facts().name, "c-host", "an empty label");
    }

    #[test]
    fn the_relay_port_round_trips_through_start_and_is_left_out_when_unset() {
        let prefs: Prefs =
            serde_json::from_value(json!({ "RelayServerPort": 40000, "Other": 1 })).unwrap();
        assert_eq!(prefs.relay_server_port, Some(40000));
        let back = serde_json::to_value(&prefs).unwrap();
        assert_eq!(back, json!({ "RelayServerPort": 40000, "Other": 1 }));
        let prefs: Prefs = serde_json::from_value(json!({ "RelayServerPort": null })).unwrap();
        assert_eq!(serde_json::to_value(&prefs).unwrap(), json!({}));
        let prefs: Prefs = serde_json::from_value(json!({ "RelayServerPort": 70000 })).unwrap();
        assert_eq!(prefs.relay_server_port, None, "out of range reads as unset");
    }

    #[test]
    fn bus_messages_carry_state_as_a_number_and_self_change_as_presence() {
        let n: Notify =
            serde_json::from_value(json!({ "Version": "1.102.2", "State": 6 })).expect("parses");
        assert_eq!(n.state, Some(IpnState::Running));
        assert!(!n.self_changed());
        let n: Notify = serde_json::from_value(json!({ "SelfChange": { "ID": 1 }, "State": 99 }))
            .expect("parses");
        assert_eq!(n.state, Some(IpnState::Unknown));
        assert!(n.self_changed());
        let n: Notify = serde_json::from_value(json!({ "SelfChange": null, "ErrMessage": "boom" }))
            .expect("parses");
        assert!(!n.self_changed());
        assert_eq!(n.err_message.as_deref(), Some("boom"));
    }

    #[test]
    fn approval_merges_every_service_host_object() {
        let s: Status = serde_json::from_value(json!({ "Self": { "CapMap": { "service-host": [
            { "svc:a": ["100.100.1.1", "fd7a:115c:a1e0::100"] },
            { "svc:b": ["100.100.1.2"] }
        ] } } }))
        .expect("parses");
        let approved = s.approved_services();
        assert_eq!(approved["svc:a"], ["100.100.1.1", "fd7a:115c:a1e0::100"]);
        assert_eq!(approved["svc:b"], ["100.100.1.2"]);
    }
}
