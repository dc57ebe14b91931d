//! Who this node's siblings are. Static: the configuration's `[[sibling]]` sections. Gossip:
//! every member gossip brought news of, kept after it leaves or dies (clients may still be
//! steered to it, and a rule names it by its control address), and kept in `state_dir` so
//! that a restarted agent knows the rules its predecessor left. Which of them are live is
//! gossip's to say ([`crate::cluster::Gossip::live`]); links and heartbeats say which can be
//! reached.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use tracing::warn;

use super::Agent;
use crate::{cluster::Member, config::Sibling};

/// The file in `state_dir` that keeps the members known (gossip mode).
const FILE: &str = "members.json";

/// Members known by gossip, by name.
#[derive(Default)]
pub(super) struct Known {
    members: BTreeMap<String, Sibling>,
    /// Changed since last kept.
    dirty: bool,
}

impl Known {
    /// Reads the members a previous run kept in `dir` (none if it kept none, or the file is
    /// unreadable: gossip brings them again).
    pub fn read(dir: &Path) -> Self {
        let path = dir.join(FILE);
        let members = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice::<Vec<Sibling>>(&b).unwrap_or_else(|e| {
                warn!(path = %path.display(), "the members a previous run knew are unreadable ({e}): gossip brings them again");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        Self { members: members.into_iter().map(|s| (s.name.clone(), s)).collect(), dirty: false }
    }

    /// Every member known.
    pub fn list(&self) -> Vec<Sibling> {
        self.members.values().cloned().collect()
    }

    /// Member `m` as gossip says it is now (a restarted member may have moved).
    pub fn learn(&mut self, m: &Member) {
        let s = Sibling { name: m.name.clone(), address: m.control, dual_stack_address: m.dual_stack, services: m.services.clone() };
        let old = self.members.insert(m.name.clone(), s.clone());
        self.dirty |= old.is_none_or(|o| o.address != s.address || o.dual_stack_address != s.dual_stack_address || o.services != s.services);
    }

    /// Keeps the members in `dir` if they changed since.
    pub fn keep(&mut self, dir: &Path) {
        if !self.dirty {
            return;
        }
        let list: Vec<&Sibling> = self.members.values().collect();
        match super::records::write_atomic(&dir.join(FILE), |w| Ok(serde_json::to_writer(w, &list)?)) {
            Ok(()) => self.dirty = false,
            Err(e) => warn!("keeping the members known: {e:#}"),
        }
    }
}

impl Agent {
    /// Every sibling this node knows.
    pub(super) fn siblings(&self) -> Vec<Sibling> {
        if self.cfg.cluster.gossip() { self.known().list() } else { self.cfg.siblings.clone() }
    }

    /// Sibling `name`, if known.
    pub(super) fn sibling(&self, name: &str) -> Option<Sibling> {
        if self.cfg.cluster.gossip() { self.known().members.get(name).cloned() } else { self.cfg.sibling(name).cloned() }
    }

    /// The sibling whose control address is `ip`.
    pub(super) fn sibling_at(&self, ip: IpAddr) -> Option<Sibling> {
        if self.cfg.cluster.gossip() { crate::config::sibling_at(self.known().members.values(), ip).cloned() } else { self.cfg.sibling_at(ip).cloned() }
    }

    /// Whether this node may serve `svc` for sibling `origin` ([`crate::config::Config::check_adoptable`]).
    pub(super) fn check_adoptable(&self, origin: &Sibling, svc: std::net::SocketAddr) -> Result<(), String> {
        self.cfg.check_adoptable_among(&self.siblings(), origin, svc)
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().expect("members lock")
    }

    /// Member `m` as gossip says it is now.
    pub(super) fn learn(&self, m: &Member) {
        self.known().learn(m);
    }

    /// Keeps the members known in `state_dir`, if they changed.
    pub(super) fn keep_known(&self) {
        self.known().keep(&self.cfg.state_dir());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_known_outlive_the_agent_and_a_move_is_news() {
        let dir = std::env::temp_dir().join(format!("rd-known-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let m = Member {
            name: "b".into(),
            gossip: "198.18.0.2:7946".parse().unwrap(),
            control: "198.18.0.2:7470".parse().unwrap(),
            dual_stack: None,
            services: vec!["198.18.0.20:80".parse().unwrap()],
            boot: 1,
        };
        let mut k = Known::read(&dir);
        assert!(k.members.is_empty());
        k.learn(&m);
        k.keep(&dir);
        assert!(!k.dirty);
        k.learn(&Member { boot: 2, ..m.clone() });
        assert!(!k.dirty, "a restart at the same place is no news");
        k.learn(&Member { services: Vec::new(), ..m.clone() });
        assert!(k.dirty, "what it serves changed");
        k.keep(&dir);
        let again = Known::read(&dir);
        assert_eq!(again.members["b"].address, m.control);
        assert!(again.members["b"].services.is_empty(), "as last kept");
        std::fs::write(dir.join(FILE), b"{").unwrap();
        assert!(Known::read(&dir).members.is_empty(), "an unreadable file is ignored");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
