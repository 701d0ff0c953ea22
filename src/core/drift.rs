//! Drift detection for an interface clawnode owns: which link events mean someone changed it.

/// A link event, reduced to what the decision needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    New {
        index: u32,
        name: String,
        up: bool,
        mtu: Option<u32>,
    },
    Deleted {
        index: u32,
    },
}

/// The interface as clawnode configured it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedLink {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
}

/// Why `event` needs a repair, or `None` if it leaves the interface as configured (including
/// events about other links, and the echo of clawnode's own changes).
pub fn link_drift(owned: &OwnedLink, event: &LinkEvent) -> Option<&'static str> {
    match event {
        LinkEvent::Deleted { index } if *index == owned.index => Some("interface deleted"),
        LinkEvent::Deleted { .. } => None,
        LinkEvent::New {
            index,
            name,
            up,
            mtu,
        } => {
            if *index != owned.index {
                // A link of our name with another index: ours was replaced by someone else's.
                return (*name == owned.name).then_some("interface replaced");
            }
            if !name.is_empty() && *name != owned.name {
                return Some("interface renamed");
            }
            if !up {
                return Some("interface set down");
            }
            if mtu.is_some_and(|m| m != owned.mtu) {
                return Some("interface MTU changed");
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned() -> OwnedLink {
        OwnedLink {
            index: 7,
            name: "claw0".into(),
            mtu: 1420,
        }
    }

    fn new(index: u32, name: &str, up: bool, mtu: u32) -> LinkEvent {
        LinkEvent::New {
            index,
            name: name.into(),
            up,
            mtu: Some(mtu),
        }
    }

    #[test]
    fn deleting_setting_down_renaming_or_changing_mtu_is_drift() {
        assert_eq!(
            link_drift(&owned(), &LinkEvent::Deleted { index: 7 }),
            Some("interface deleted")
        );
        assert_eq!(
            link_drift(&owned(), &new(7, "claw0", false, 1420)),
            Some("interface set down")
        );
        assert_eq!(
            link_drift(&owned(), &new(7, "other0", true, 1420)),
            Some("interface renamed")
        );
        assert_eq!(
            link_drift(&owned(), &new(7, "claw0", true, 1500)),
            Some("interface MTU changed")
        );
    }

    #[test]
    fn our_own_changes_and_other_links_are_not_drift() {
        assert_eq!(link_drift(&owned(), &new(7, "claw0", true, 1420)), None);
        assert_eq!(link_drift(&owned(), &new(3, "eth0", false, 1500)), None);
        assert_eq!(link_drift(&owned(), &LinkEvent::Deleted { index: 3 }), None);
    }
}
