//! `[cluster]`: how a node finds its siblings. Static (the default): the `[[sibling]]` lists,
//! right for a handful of servers. Gossip: membership maintains itself (`crate::cluster`);
//! a node joins through any live member, and asks a few members with room for help rather
//! than every one.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// How siblings are known.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The `[[sibling]]` lists.
    #[default]
    Static,
    /// Membership by gossip.
    Gossip,
}

/// A member to join through: its name (its certificate is checked for it) and its control
/// address.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Seed {
    pub name: String,
    pub address: SocketAddr,
}

/// `[cluster]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cluster {
    pub mode: Mode,
    /// The gossip's UDP port, on this node's control address; the same on every member (a
    /// seed's gossip address is its control address and this port).
    pub gossip_port: u16,
    /// Members to join through (any one live member is enough). A node that has never been
    /// a member asks them for the cluster's gossip key over mutual TLS; none: this node starts
    /// the cluster (it makes the key). A restarted member also comes back through the members
    /// it knew (kept in `state_dir`).
    #[serde(rename = "seed")]
    pub seeds: Vec<Seed>,
    /// Members asked for help at once, drawn among those with room (power of `ask` choices).
    pub ask: usize,
    /// Members with room this node keeps linked in advance, so that asking them for help
    /// does not open links (mutual TLS) inside the negotiation; those linked are asked first.
    pub standby: usize,
    /// A link to a member that is not on standby and holds no clients either way closes after
    /// this long unused (0: links stay while the member is live), so that a node of a large
    /// cluster keeps a few links, not one to every member it ever asked.
    pub idle_link_secs: u64,
    /// A member that left or died is forgotten this long after (kept in `state_dir` until
    /// then), once nothing here refers to it any more (clients on it or drained from it, its
    /// clients here, a hand-over with it): servers replaced over time do not pile up in what
    /// every node keeps and lists. 0: as soon as nothing refers to it.
    pub forget_secs: u64,
    /// About how many members the cluster will have: how often news is passed on.
    pub expected_members: u32,
}

impl Default for Cluster {
    fn default() -> Self {
        Self { mode: Mode::Static, gossip_port: 7946, seeds: Vec::new(), ask: 3, standby: 3, idle_link_secs: 60, forget_secs: 3600, expected_members: 100 }
    }
}

impl Cluster {
    /// Whether membership is by gossip.
    #[must_use]
    pub fn gossip(&self) -> bool {
        self.mode == Mode::Gossip
    }

    /// The problems of this section, for a node named `node` with `siblings` configured and
    /// `siblings_only` (`control_siblings_only`).
    pub(super) fn problems(&self, node: &str, siblings: usize, siblings_only: bool) -> Vec<String> {
        let mut p = Vec::new();
        if !self.gossip() {
            if !self.seeds.is_empty() {
                p.push("cluster: seeds are for mode = \"gossip\"; a static cluster lists its [[sibling]]s".into());
            }
            return p;
        }
        if siblings > 0 {
            p.push(format!("cluster: mode = \"gossip\" finds the siblings itself; remove the {siblings} [[sibling]] section(s)"));
        }
        if siblings_only {
            p.push(
                "cluster: control_siblings_only closes the control port to nodes not yet known, so none could join through this one: set it false with mode = \"gossip\"".into(),
            );
        }
        if self.gossip_port == 0 {
            p.push("cluster: gossip_port must be above 0".into());
        }
        if self.ask == 0 {
            p.push("cluster: ask must be at least 1".into());
        }
        if self.expected_members == 0 {
            p.push("cluster: expected_members must be at least 1".into());
        }
        for s in &self.seeds {
            if let Err(e) = super::check_name(&s.name) {
                p.push(format!("cluster: seed {}: {e}", s.name));
            }
            if s.address.ip().is_unspecified() || s.address.port() == 0 {
                p.push(format!("cluster: seed {} at {}: not a control address", s.name, s.address));
            }
        }
        if self.seeds.iter().any(|s| s.name == node) && self.seeds.len() == 1 {
            p.push(format!("cluster: the only seed is this node ({node}): list none to start the cluster, or other members to join"));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gossip(seeds: &[(&str, &str)]) -> Cluster {
        Cluster { mode: Mode::Gossip, seeds: seeds.iter().map(|(n, a)| Seed { name: (*n).into(), address: a.parse().unwrap() }).collect(), ..Cluster::default() }
    }

    #[test]
    fn gossip_mode_excludes_sibling_lists_and_a_closed_control_port() {
        assert!(gossip(&[]).problems("a", 0, false).is_empty(), "a node that starts the cluster");
        assert!(gossip(&[("b", "198.18.0.2:7470")]).problems("a", 0, false).is_empty());
        let p = gossip(&[]).problems("a", 2, true);
        assert!(p.iter().any(|l| l.contains("remove the 2 [[sibling]]")) && p.iter().any(|l| l.contains("control_siblings_only")), "{p:?}");
        assert!(gossip(&[("a", "198.18.0.1:7470")]).problems("a", 0, false).iter().any(|l| l.contains("only seed is this node")));
        assert!(gossip(&[("-x", "0.0.0.0:7470")]).problems("a", 0, false).len() >= 2);
        let bad = Cluster { ask: 0, gossip_port: 0, ..gossip(&[]) };
        assert_eq!(bad.problems("a", 0, false).len(), 2);
        let stray = Cluster { seeds: gossip(&[("b", "198.18.0.2:7470")]).seeds, ..Cluster::default() };
        assert!(stray.problems("a", 3, true).iter().any(|l| l.contains("seeds are for mode")), "a static cluster with seeds");
    }

    #[test]
    fn the_section_reads_from_toml_with_defaults() {
        let c: Cluster = toml::from_str("mode = \"gossip\"\n[[seed]]\nname = \"b\"\naddress = \"198.18.0.2:7470\"\n").unwrap();
        assert_eq!(c, gossip(&[("b", "198.18.0.2:7470")]));
        assert_eq!(toml::from_str::<Cluster>("").unwrap(), Cluster::default());
        assert!(toml::from_str::<Cluster>("mode = \"mesh\"\n").is_err());
        assert!(toml::from_str::<Cluster>("seeds = []\n").is_err(), "unknown keys are refused");
    }
}
