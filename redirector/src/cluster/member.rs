//! Who a member of the cluster is, as gossip names it: the node's name (its certificate's),
//! where it gossips (UDP) and where its agent takes hand-overs (mutual TLS), what it serves,
//! and when it booted, so that a restarted node wins over its former self. All of it travels
//! in every message that names the member, so a member is never known without it.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

/// A member's identity in the gossip (foca's `Identity`): unique by its gossip address.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Member {
    /// The node's name: the name in its certificate, checked when a hand-over link opens.
    pub name: String,
    /// Where it gossips (UDP).
    pub gossip: SocketAddr,
    /// Where its agent listens for siblings (mutual TLS).
    pub control: SocketAddr,
    /// Its control address of the other IP family, if it has dual-stack services.
    pub dual_stack: Option<IpAddr>,
    /// Its service addresses: what a volunteer may adopt from it.
    pub services: Vec<SocketAddr>,
    /// When it booted (ns since the epoch), bumped on each rejoin: of two identities at one
    /// address, the later one is the member.
    pub boot: u64,
}

impl Member {
    /// A stand-in for a member known only by its address (a seed to join through): it loses to
    /// any real identity at that address, and the seed answers as itself.
    #[must_use]
    pub fn seed(gossip: SocketAddr) -> Self {
        Self { name: String::new(), gossip, control: gossip, dual_stack: None, services: Vec::new(), boot: 0 }
    }
}

impl foca::Identity for Member {
    type Addr = SocketAddr;

    /// A member declared down while alive (a suspicion it could not refute in time) comes back
    /// at once as a newer identity rather than staying out of the cluster.
    fn renew(&self) -> Option<Self> {
        Some(Self { boot: self.boot.wrapping_add(1), ..self.clone() })
    }

    fn addr(&self) -> SocketAddr {
        self.gossip
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.boot > adversary.boot
    }
}

#[cfg(test)]
mod tests {
    use foca::Identity as _;

    use super::*;

    #[test]
    fn a_renewed_or_restarted_member_wins_and_a_seed_always_loses() {
        let m =
            Member { name: "a".into(), gossip: "198.18.0.1:7946".parse().unwrap(), control: "198.18.0.1:7800".parse().unwrap(), dual_stack: None, services: Vec::new(), boot: 10 };
        let renewed = m.renew().unwrap();
        assert!(renewed.win_addr_conflict(&m) && !m.win_addr_conflict(&renewed));
        assert_eq!(renewed.addr(), m.addr());
        let seed = Member::seed(m.gossip);
        assert!(m.win_addr_conflict(&seed) && !seed.win_addr_conflict(&m));
    }
}
