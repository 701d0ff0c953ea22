//! Tailscale bring-up as pure decisions: what to ask of tailscaled given what it reports, and
//! whether the outcome is good enough to advertise from. The provider reads tailscaled, calls
//! these, and runs what they decide.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use super::{Failure, Retry};

/// tailscaled's `ipn.State`: a name in `status`'s `BackendState`, a number in the bus's `State`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpnState {
    NoState,
    InUseOtherUser,
    NeedsLogin,
    NeedsMachineAuth,
    Stopped,
    Starting,
    Running,
    /// A state this clawnode does not know (a newer tailscaled); never a parse failure.
    Unknown,
}

impl IpnState {
    pub fn from_name(name: &str) -> Self {
        match name {
            "NoState" => IpnState::NoState,
            "InUseOtherUser" => IpnState::InUseOtherUser,
            "NeedsLogin" => IpnState::NeedsLogin,
            "NeedsMachineAuth" => IpnState::NeedsMachineAuth,
            "Stopped" => IpnState::Stopped,
            "Starting" => IpnState::Starting,
            "Running" => IpnState::Running,
            _ => IpnState::Unknown,
        }
    }

    pub fn from_number(number: u64) -> Self {
        match number {
            0 => IpnState::NoState,
            1 => IpnState::InUseOtherUser,
            2 => IpnState::NeedsLogin,
            3 => IpnState::NeedsMachineAuth,
            4 => IpnState::Stopped,
            5 => IpnState::Starting,
            6 => IpnState::Running,
            _ => IpnState::Unknown,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            IpnState::NoState => "NoState",
            IpnState::InUseOtherUser => "InUseOtherUser",
            IpnState::NeedsLogin => "NeedsLogin",
            IpnState::NeedsMachineAuth => "NeedsMachineAuth",
            IpnState::Stopped => "Stopped",
            IpnState::Starting => "Starting",
            IpnState::Running => "Running",
            IpnState::Unknown => "Unknown",
        }
    }
}

impl fmt::Display for IpnState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for IpnState {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for IpnState {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StateVisitor;

        impl Visitor<'_> for StateVisitor {
            type Value = IpnState;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an ipn.State name or number")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<IpnState, E> {
                Ok(IpnState::from_name(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IpnState, E> {
                Ok(IpnState::from_number(v))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IpnState, E> {
                Ok(u64::try_from(v).map_or(IpnState::Unknown, IpnState::from_number))
            }

            fn visit_f64<E: de::Error>(self, _: f64) -> Result<IpnState, E> {
                Ok(IpnState::Unknown)
            }

            fn visit_bool<E: de::Error>(self, _: bool) -> Result<IpnState, E> {
                Ok(IpnState::Unknown)
            }
        }

        deserializer.deserialize_any(StateVisitor)
    }
}

/// What tailscaled reports before bring-up.
#[derive(Debug, Clone, Copy)]
pub struct Current<'a> {
    pub state: Option<IpnState>,
    pub have_node_key: bool,
    /// The `Hostname` pref (`None` when absent).
    pub hostname: Option<&'a str>,
    pub tags: &'a [String],
}

/// What the config asks for.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    pub hostname: &'a str,
    pub tags: &'a [String],
    /// An auth method is configured (key, key file, env, workload identity).
    pub has_auth: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Running with the wanted name and tags.
    Nothing,
    /// Running with the wanted tags under another name: a prefs PATCH, because `start` would
    /// tear down the control connection.
    Rename,
    /// `start` with complete prefs, then wait for Running.
    BringUp {
        /// A key must go with `start`: the node has none, or the one it has expired.
        needs_auth: bool,
        /// A node without a key needs `login-interactive` after `start`, even with an auth key.
        login_interactive: bool,
    },
    /// Nothing clawnode can do until someone changes something.
    Refuse(Failure),
}

/// What to ask of tailscaled.
pub fn plan(current: &Current<'_>, wanted: &Wanted<'_>) -> Plan {
    let running = current.state == Some(IpnState::Running);
    if running && current.tags == wanted.tags {
        if current.hostname == Some(wanted.hostname) {
            return Plan::Nothing;
        }
        return Plan::Rename;
    }
    if !wanted.has_auth && !current.have_node_key {
        return Plan::Refuse(Failure::needs_operator(
            "tailscaled is not logged in and no auth method is configured (set auth_key_file, auth_key_env, auth_key or workload_identity under [network.tailscale])",
        ));
    }
    // A node that holds a valid key restarts without a new one: minting or reusing a key
    // there would re-register it. NeedsLogin with a key means that key expired.
    Plan::BringUp {
        needs_auth: !current.have_node_key || current.state == Some(IpnState::NeedsLogin),
        login_interactive: !current.have_node_key,
    }
}

/// The tailnet the node is in, as `status` reports it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tailnet<'a> {
    pub name: Option<&'a str>,
    pub magic_dns_suffix: Option<&'a str>,
}

/// Whether the node, after bring-up, may advertise: Running, and in the configured tailnet.
pub fn check_joined(
    state: Option<IpnState>,
    tailnet: Tailnet<'_>,
    wanted_tailnet: Option<&str>,
) -> Result<(), Failure> {
    let Some(state) = state else {
        return Err(Failure::transient("tailscaled status has no BackendState"));
    };
    match state {
        IpnState::Running => {}
        IpnState::NeedsMachineAuth => {
            return Err(Failure::needs_operator(
                "waiting for admin approval of this device in the Tailscale admin console",
            ));
        }
        IpnState::NoState
        | IpnState::InUseOtherUser
        | IpnState::NeedsLogin
        | IpnState::Stopped
        | IpnState::Starting
        | IpnState::Unknown => {
            return Err(Failure::transient(format!(
                "tailscaled is {state}, not Running"
            )));
        }
    }
    let Some(want) = wanted_tailnet else {
        return Ok(());
    };
    let name = tailnet.name.unwrap_or("");
    let suffix = tailnet.magic_dns_suffix.unwrap_or("");
    if name != want && suffix != want {
        return Err(Failure::needs_operator(format!(
            "this device is in tailnet {name:?} ({suffix}), but the config expects {want:?}; advertising nothing"
        )));
    }
    Ok(())
}

/// An `ErrMessage` on the bus during login: a refusal of the tags by the tailnet policy repeats
/// until the policy or the config changes; anything else (a watcher that fell behind, a
/// control hiccup) may pass.
pub fn bus_error_retry(message: &str) -> Retry {
    let lower = message.to_ascii_lowercase();
    if lower.contains("tag") || lower.contains("acl") || lower.contains("not permitted") {
        return Retry::NeedsOperator;
    }
    Retry::Transient
}

/// Whether tailscaled takes writes (login, prefs, serve config) from a process running as
/// `uid`, whose user name is `user`: root always, anyone else only when the `OperatorUser` pref
/// names it. Reads are open to every local user.
pub fn tailscaled_lets_write(uid: u32, user: Option<&str>, operator: &str) -> bool {
    uid == 0 || (!operator.is_empty() && user == Some(operator))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(list: &[&str]) -> Vec<String> {
        list.iter().map(|t| t.to_string()).collect()
    }

    fn current<'a>(
        state: IpnState,
        key: bool,
        hostname: &'a str,
        tags: &'a [String],
    ) -> Current<'a> {
        Current {
            state: Some(state),
            have_node_key: key,
            hostname: Some(hostname),
            tags,
        }
    }

    #[test]
    fn a_running_node_with_matching_prefs_is_left_alone() {
        let t = tags(&["tag:gpu"]);
        let want = Wanted {
            hostname: "clawnode-a",
            tags: &t,
            has_auth: true,
        };
        let now = current(IpnState::Running, true, "clawnode-a", &t);
        assert_eq!(plan(&now, &want), Plan::Nothing);
    }

    #[test]
    fn a_running_node_under_another_name_is_renamed_without_start() {
        let t = tags(&["tag:gpu"]);
        let want = Wanted {
            hostname: "clawnode-b",
            tags: &t,
            has_auth: false,
        };
        let now = current(IpnState::Running, true, "clawnode-a", &t);
        assert_eq!(plan(&now, &want), Plan::Rename);
        let absent = Current {
            hostname: None,
            ..now
        };
        assert_eq!(
            plan(&absent, &want),
            Plan::Rename,
            "no Hostname pref at all"
        );
    }

    #[test]
    fn changed_tags_bring_the_node_up_again_without_a_new_key() {
        let old = tags(&["tag:old"]);
        let new = tags(&["tag:gpu"]);
        let want = Wanted {
            hostname: "clawnode-a",
            tags: &new,
            has_auth: true,
        };
        let now = current(IpnState::Running, true, "clawnode-a", &old);
        assert_eq!(
            plan(&now, &want),
            Plan::BringUp {
                needs_auth: false,
                login_interactive: false
            }
        );
    }

    #[test]
    fn a_fresh_node_needs_a_key_and_an_interactive_login() {
        let t = tags(&["tag:gpu"]);
        let want = Wanted {
            hostname: "clawnode-a",
            tags: &t,
            has_auth: true,
        };
        let now = current(IpnState::NeedsLogin, false, "", &[]);
        assert_eq!(
            plan(&now, &want),
            Plan::BringUp {
                needs_auth: true,
                login_interactive: true
            }
        );
    }

    #[test]
    fn an_expired_key_needs_a_new_one_but_no_interactive_login() {
        let t = tags(&["tag:gpu"]);
        let want = Wanted {
            hostname: "clawnode-a",
            tags: &t,
            has_auth: true,
        };
        let now = current(IpnState::NeedsLogin, true, "clawnode-a", &t);
        assert_eq!(
            plan(&now, &want),
            Plan::BringUp {
                needs_auth: true,
                login_interactive: false
            }
        );
    }

    #[test]
    fn a_node_without_a_key_or_an_auth_method_needs_the_operator() {
        let want = Wanted {
            hostname: "clawnode-a",
            tags: &[],
            has_auth: false,
        };
        let now = current(IpnState::NeedsLogin, false, "", &[]);
        let Plan::Refuse(refusal) = plan(&now, &want) else {
            panic!("expected a refusal");
        };
        assert_eq!(refusal.retry(), Retry::NeedsOperator);
        assert!(refusal.message().contains("no auth method is configured"));
    }

    #[test]
    fn a_stopped_node_with_a_key_restarts_without_an_auth_method() {
        let want = Wanted {
            hostname: "clawnode-a",
            tags: &[],
            has_auth: false,
        };
        let now = current(IpnState::Stopped, true, "clawnode-a", &[]);
        assert_eq!(
            plan(&now, &want),
            Plan::BringUp {
                needs_auth: false,
                login_interactive: false
            }
        );
    }

    #[test]
    fn only_running_in_the_configured_tailnet_is_joined() {
        let tailnet = Tailnet {
            name: Some("example.com"),
            magic_dns_suffix: Some("tail1234.ts.net"),
        };
        let running = Some(IpnState::Running);
        assert_eq!(check_joined(running, tailnet, None), Ok(()));
        assert_eq!(check_joined(running, tailnet, Some("example.com")), Ok(()));
        assert_eq!(
            check_joined(running, tailnet, Some("tail1234.ts.net")),
            Ok(())
        );
        let wrong = check_joined(running, tailnet, Some("other.org")).unwrap_err();
        assert_eq!(wrong.retry(), Retry::NeedsOperator);
        assert_eq!(
            wrong.message(),
            "this device is in tailnet \"example.com\" (tail1234.ts.net), but the config expects \"other.org\"; advertising nothing"
        );
        let none = check_joined(running, Tailnet::default(), Some("other.org")).unwrap_err();
        assert_eq!(none.retry(), Retry::NeedsOperator, "no netmap, no tailnet");
    }

    #[test]
    fn a_device_awaiting_approval_needs_the_operator_and_other_states_pass() {
        let approval =
            check_joined(Some(IpnState::NeedsMachineAuth), Tailnet::default(), None).unwrap_err();
        assert_eq!(approval.retry(), Retry::NeedsOperator);
        assert_eq!(
            approval.message(),
            "waiting for admin approval of this device in the Tailscale admin console"
        );
        let starting =
            check_joined(Some(IpnState::Starting), Tailnet::default(), None).unwrap_err();
        assert_eq!(starting.retry(), Retry::Transient);
        assert_eq!(starting.message(), "tailscaled is Starting, not Running");
        let absent = check_joined(None, Tailnet::default(), None).unwrap_err();
        assert_eq!(absent.retry(), Retry::Transient);
        assert_eq!(absent.message(), "tailscaled status has no BackendState");
    }

    #[test]
    fn states_read_from_names_and_numbers_and_unknown_ones_do_not_fail() {
        let parse = |json: &str| serde_json::from_str::<IpnState>(json).unwrap();
        assert_eq!(parse("\"Running\""), IpnState::Running);
        assert_eq!(parse("6"), IpnState::Running);
        assert_eq!(parse("3"), IpnState::NeedsMachineAuth);
        assert_eq!(parse("\"NeedsMachineAuth\""), IpnState::NeedsMachineAuth);
        assert_eq!(parse("\"Hibernating\""), IpnState::Unknown);
        assert_eq!(parse("42"), IpnState::Unknown);
        assert_eq!(parse("-1"), IpnState::Unknown);
        for n in 0..=6 {
            let state = IpnState::from_number(n);
            assert_eq!(IpnState::from_name(state.name()), state);
        }
    }

    #[test]
    fn a_tag_refusal_on_the_bus_needs_the_operator_and_a_slow_watcher_does_not() {
        assert_eq!(
            bus_error_retry("requested tags [tag:gpu] are invalid or not permitted"),
            Retry::NeedsOperator
        );
        assert_eq!(
            bus_error_retry("IPN bus consumer fell behind; closing watch"),
            Retry::Transient
        );
    }

    #[test]
    fn tailscaled_takes_writes_from_root_and_its_operator_only() {
        assert!(tailscaled_lets_write(0, Some("root"), ""));
        assert!(tailscaled_lets_write(
            998,
            Some("clawbernetes"),
            "clawbernetes"
        ));
        assert!(!tailscaled_lets_write(998, Some("clawbernetes"), ""));
        assert!(!tailscaled_lets_write(998, Some("clawbernetes"), "alex"));
        assert!(!tailscaled_lets_write(998, None, ""));
    }
}
