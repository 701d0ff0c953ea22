//! Which network interface clawnode may configure or delete: one it created itself, or an
//! existing WireGuard interface the operator told it to adopt. Anything else of the configured
//! name (a wg-quick interface, a bridge, someone's tun) is left untouched and reported.

/// What kind of WireGuard interface a backend runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgKind {
    /// A kernel `wireguard` link.
    Kernel,
    /// A tun device served by a userspace daemon over its UAPI socket.
    Userspace,
}

impl WgKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WgKind::Kernel => "kernel",
            WgKind::Userspace => "userspace",
        }
    }

    pub fn parse(text: &str) -> Option<WgKind> {
        match text {
            "kernel" => Some(WgKind::Kernel),
            "userspace" => Some(WgKind::Userspace),
            _ => None,
        }
    }
}

/// What the kernel says about the link that has the configured name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub index: u32,
    pub kind: FoundKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FoundKind {
    Wireguard(WgKind),
    /// Not WireGuard: the link kind as the kernel names it (`bridge`, `veth`, `tun`, …).
    Other(String),
}

/// An interface clawnode created: enough to tell it from another link of the same name later,
/// in this process or after a restart. Link indexes are per network namespace and are not
/// reused within a boot, so (boot, namespace, index) names one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    pub name: String,
    pub index: u32,
    pub kind: WgKind,
    pub boot_id: String,
    pub netns: u64,
}

/// Where this process runs: the boot and the network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Here {
    pub boot_id: String,
    pub netns: u64,
}

impl Created {
    /// Is `found` this very link?
    pub fn is(&self, name: &str, found: &Found, here: &Here) -> bool {
        self.name == name
            && self.index == found.index
            && self.boot_id == here.boot_id
            && self.netns == here.netns
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing has the name: create the interface.
    Create,
    /// clawnode created this one and it has the wanted kind: configure it.
    Owned,
    /// clawnode created this one, but for another backend: remove it and create anew.
    Replace,
    /// An existing WireGuard interface the operator asked clawnode to take over: configure it,
    /// and leave it in place on stop.
    Adopt,
    /// Not clawnode's: leave it alone and wait for the operator.
    Refuse(Refusal),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The name is taken by something that is not WireGuard.
    NotWireguard { kind: String },
    /// A WireGuard interface clawnode did not create, and adopting is off.
    NotAdopted { kind: WgKind },
    /// A WireGuard interface clawnode did not create, of the other backend's kind.
    OtherBackend { found: WgKind, want: WgKind },
}

/// Decide what to do with the link named `name` before touching it.
/// `created` is clawnode's record of the interface it made (in memory or from the state file);
/// `adopt` is `[network.wireguard] adopt_existing_interface`.
pub fn verdict(
    name: &str,
    found: Option<&Found>,
    created: Option<&Created>,
    want: WgKind,
    adopt: bool,
    here: &Here,
) -> Verdict {
    let Some(found) = found else {
        return Verdict::Create;
    };
    if created.is_some_and(|c| c.is(name, found, here)) {
        return match found.kind {
            FoundKind::Wireguard(kind) if kind == want => Verdict::Owned,
            FoundKind::Wireguard(_) | FoundKind::Other(_) => Verdict::Replace,
        };
    }
    match &found.kind {
        FoundKind::Other(kind) => Verdict::Refuse(Refusal::NotWireguard { kind: kind.clone() }),
        FoundKind::Wireguard(kind) if *kind != want => {
            Verdict::Refuse(Refusal::OtherBackend { found: *kind, want })
        }
        FoundKind::Wireguard(_) if adopt => Verdict::Adopt,
        FoundKind::Wireguard(kind) => Verdict::Refuse(Refusal::NotAdopted { kind: *kind }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn here() -> Here {
        Here {
            boot_id: "b1".into(),
            netns: 4026531840,
        }
    }

    fn created(index: u32, kind: WgKind) -> Created {
        Created {
            name: "claw0".into(),
            index,
            kind,
            boot_id: "b1".into(),
            netns: 4026531840,
        }
    }

    fn wg(index: u32, kind: WgKind) -> Found {
        Found {
            index,
            kind: FoundKind::Wireguard(kind),
        }
    }

    fn other(index: u32, kind: &str) -> Found {
        Found {
            index,
            kind: FoundKind::Other(kind.into()),
        }
    }

    use WgKind::{Kernel, Userspace};

    #[test]
    fn a_free_name_is_created_and_the_interface_clawnode_made_is_configured() {
        assert_eq!(
            verdict("claw0", None, None, Kernel, false, &here()),
            Verdict::Create
        );
        let mine = created(7, Kernel);
        assert_eq!(
            verdict(
                "claw0",
                Some(&wg(7, Kernel)),
                Some(&mine),
                Kernel,
                false,
                &here()
            ),
            Verdict::Owned
        );
    }

    #[test]
    fn a_wg_quick_interface_is_refused_unless_adopting_is_on() {
        let found = wg(9, Kernel);
        assert_eq!(
            verdict("claw0", Some(&found), None, Kernel, false, &here()),
            Verdict::Refuse(Refusal::NotAdopted { kind: Kernel })
        );
        assert_eq!(
            verdict("claw0", Some(&found), None, Kernel, true, &here()),
            Verdict::Adopt
        );
        // A record of another link of the same name does not make this one clawnode's.
        let old = created(7, Kernel);
        assert_eq!(
            verdict("claw0", Some(&found), Some(&old), Kernel, false, &here()),
            Verdict::Refuse(Refusal::NotAdopted { kind: Kernel })
        );
    }

    #[test]
    fn a_bridge_or_a_plain_tun_is_refused_even_when_adopting() {
        for kind in ["bridge", "veth", "tun"] {
            for adopt in [false, true] {
                assert_eq!(
                    verdict(
                        "claw0",
                        Some(&other(3, kind)),
                        None,
                        Userspace,
                        adopt,
                        &here()
                    ),
                    Verdict::Refuse(Refusal::NotWireguard { kind: kind.into() })
                );
            }
        }
    }

    #[test]
    fn the_other_backends_interface_is_refused_unless_clawnode_made_it() {
        assert_eq!(
            verdict(
                "claw0",
                Some(&wg(4, Userspace)),
                None,
                Kernel,
                true,
                &here()
            ),
            Verdict::Refuse(Refusal::OtherBackend {
                found: Userspace,
                want: Kernel
            })
        );
        let mine = created(4, Userspace);
        assert_eq!(
            verdict(
                "claw0",
                Some(&wg(4, Userspace)),
                Some(&mine),
                Kernel,
                false,
                &here()
            ),
            Verdict::Replace
        );
    }

    #[test]
    fn a_record_from_another_boot_or_namespace_does_not_claim_a_link() {
        let found = wg(7, Kernel);
        let mut stale = created(7, Kernel);
        stale.boot_id = "b0".into();
        assert!(matches!(
            verdict("claw0", Some(&found), Some(&stale), Kernel, false, &here()),
            Verdict::Refuse(_)
        ));
        let mut elsewhere = created(7, Kernel);
        elsewhere.netns = 1;
        assert!(matches!(
            verdict(
                "claw0",
                Some(&found),
                Some(&elsewhere),
                Kernel,
                false,
                &here()
            ),
            Verdict::Refuse(_)
        ));
        let mut renamed = created(7, Kernel);
        renamed.name = "claw1".into();
        assert!(matches!(
            verdict(
                "claw0",
                Some(&found),
                Some(&renamed),
                Kernel,
                false,
                &here()
            ),
            Verdict::Refuse(_)
        ));
    }
}
