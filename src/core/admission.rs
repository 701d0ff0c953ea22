//! Who gets a connection slot when an endpoint is full.
//!
//! A per-source cap alone does not stop one caller with many addresses (a mesh peer may route
//! a whole prefix) from taking every slot and locking everyone else out. So when all slots are
//! taken, a newcomer from a lighter source displaces a connection that is still waiting for its
//! request head: from the heaviest source, the oldest first. With one connection per address
//! that is simply the oldest waiting one, so a caller that sends its request at once gets
//! served however many addresses a flood comes from. Connections being served are never cut.

use std::net::IpAddr;

/// One open connection, as the accept loop sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenConn {
    pub id: u64,
    /// `None` where the transport has no source address (a Unix socket).
    pub source: Option<IpAddr>,
    /// True until its request head has arrived: it has cost nothing worth keeping yet.
    pub waiting: bool,
}

/// The caps the decision applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub max_connections: usize,
    pub max_per_source: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Admit,
    /// Admit after closing this connection.
    Evict(u64),
    Refuse,
}

/// Decide for a new connection from `source`, given those open now (oldest first).
pub fn admit(caps: Caps, source: Option<IpAddr>, open: &[OpenConn]) -> Admission {
    let from_source = |s: Option<IpAddr>| open.iter().filter(|c| c.source == s).count();
    let Some(ip) = source else {
        return if open.len() < caps.max_connections {
            Admission::Admit
        } else {
            Admission::Refuse
        };
    };
    let mine = from_source(Some(ip));
    if mine >= caps.max_per_source {
        return Admission::Refuse;
    }
    if open.len() < caps.max_connections {
        return Admission::Admit;
    }
    // The heaviest source's oldest waiting connection; ties go to the older connection.
    let mut victim: Option<(usize, u64)> = None;
    for conn in open.iter().filter(|c| c.waiting && c.source.is_some()) {
        let load = from_source(conn.source);
        if victim.is_none_or(|(best, _)| load > best) {
            victim = Some((load, conn.id));
        }
    }
    match victim {
        // Never so that the newcomer's source would end up heavier than the victim's was.
        Some((load, id)) if load > mine => Admission::Evict(id),
        _ => Admission::Refuse,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: Caps = Caps {
        max_connections: 4,
        max_per_source: 3,
    };

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([198, 51, 100, last]))
    }

    fn conn(id: u64, last: u8, waiting: bool) -> OpenConn {
        OpenConn {
            id,
            source: ip(last),
            waiting,
        }
    }

    #[test]
    fn below_both_caps_a_connection_is_admitted() {
        assert_eq!(
            admit(CAPS, ip(1), &[conn(1, 1, true), conn(2, 2, true)]),
            Admission::Admit
        );
    }

    #[test]
    fn a_source_at_its_own_cap_is_refused_even_with_free_slots() {
        let open = [conn(1, 1, true), conn(2, 1, true), conn(3, 1, true)];
        assert_eq!(admit(CAPS, ip(1), &open), Admission::Refuse);
    }

    #[test]
    fn a_new_caller_displaces_the_oldest_waiting_connection_of_the_heaviest_source() {
        let open = [
            conn(1, 1, true),
            conn(2, 2, true),
            conn(3, 2, true),
            conn(4, 2, true),
        ];
        assert_eq!(admit(CAPS, ip(9), &open), Admission::Evict(2));
    }

    #[test]
    fn connections_being_served_are_never_displaced() {
        let open = [
            conn(1, 2, false),
            conn(2, 2, false),
            conn(3, 2, false),
            conn(4, 1, false),
        ];
        assert_eq!(admit(CAPS, ip(9), &open), Admission::Refuse);
        let open = [
            conn(1, 2, false),
            conn(2, 2, false),
            conn(3, 2, false),
            conn(4, 1, true),
        ];
        assert_eq!(admit(CAPS, ip(9), &open), Admission::Evict(4));
    }

    #[test]
    fn with_one_connection_per_address_a_newcomer_displaces_the_oldest_waiting_one() {
        let open = [
            conn(1, 1, false),
            conn(2, 2, true),
            conn(3, 3, true),
            conn(4, 4, true),
        ];
        assert_eq!(admit(CAPS, ip(9), &open), Admission::Evict(2));
    }

    #[test]
    fn a_source_never_takes_a_slot_to_become_heavier_than_its_victim() {
        let open = [
            conn(1, 1, true),
            conn(2, 2, true),
            conn(3, 3, true),
            conn(4, 4, true),
        ];
        assert_eq!(admit(CAPS, ip(1), &open), Admission::Refuse);
        let open = [
            conn(1, 1, true),
            conn(2, 1, true),
            conn(3, 2, true),
            conn(4, 2, true),
        ];
        assert_eq!(admit(CAPS, ip(1), &open), Admission::Refuse);
    }

    #[test]
    fn a_full_socket_without_source_addresses_refuses_and_displaces_nobody() {
        let open: Vec<_> = (0..4)
            .map(|id| OpenConn {
                id,
                source: None,
                waiting: true,
            })
            .collect();
        assert_eq!(admit(CAPS, None, &open), Admission::Refuse);
        assert_eq!(admit(CAPS, None, &open[..3]), Admission::Admit);
    }
}
