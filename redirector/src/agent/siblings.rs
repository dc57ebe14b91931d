//! Who this node's siblings are. Static: the configuration's `[[sibling]]` sections. Gossip:
//! every member gossip brought news of, kept after it leaves or dies (clients may still be
//! steered to it, and a rule names it by its control address) until `forget_secs` after,
//! once nothing here refers to it, and kept in `state_dir` so that a restarted agent knows
//! the rules its predecessor left. Which of them are live is gossip's to say
//! ([`crate::cluster::Gossip::live`]); links and heartbeats say which can be reached.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    path::Path,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::Agent;
use crate::{cluster::Member, config::Sibling};

/// The file in `state_dir` that keeps the members known (gossip mode).
const FILE: &str = "members.json";

/// Members learned are kept at most this often (a member forgotten or moved, or one that rules
/// are about to name, at once): the file lists every member, and with a thousand joining each
/// node rewrote it every second (a sixth of the CPU of a thousand agents sharing two cores).
const KEEP_EVERY: Duration = Duration::from_secs(10);

/// Members known by gossip, by name.
#[derive(Default)]
pub(super) struct Known {
    members: BTreeMap<String, Sibling>,
    /// Since when each member not live is gone, as far as this agent knows: declared dead or
    /// gone by gossip, or, for one a previous run kept, not live since this run began.
    gone: HashMap<String, Instant>,
    /// Members learned since last kept.
    fresh: HashSet<String>,
    /// A member forgotten or moved since last kept.
    changed: bool,
    /// When last kept.
    kept_at: Option<Instant>,
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
        let now = Instant::now();
        let gone = members.iter().map(|s| (s.name.clone(), now)).collect();
        Self { members: members.into_iter().map(|s| (s.name.clone(), s)).collect(), gone, ..Self::default() }
    }

    /// Every member known.
    pub fn list(&self) -> Vec<Sibling> {
        self.members.values().cloned().collect()
    }

    /// Member `m` as gossip says it is now (a restarted member may have moved).
    pub fn learn(&mut self, m: &Member) {
        let s = Sibling { name: m.name.clone(), address: m.control, dual_stack_address: m.dual_stack, services: m.services.clone() };
        self.gone.remove(&m.name);
        match self.members.insert(m.name.clone(), s.clone()) {
            None => drop(self.fresh.insert(m.name.clone())),
            Some(o) => self.changed |= o.address != s.address || o.dual_stack_address != s.dual_stack_address || o.services != s.services,
        }
    }

    /// Member `name` left or was declared dead at `now` (the earliest word counts).
    pub fn lost(&mut self, name: &str, now: Instant) {
        if self.members.contains_key(name) {
            self.gone.entry(name.to_string()).or_insert(now);
        }
    }

    /// The members gone for `after` or longer at `now`.
    pub fn gone_for(&self, after: Duration, now: Instant) -> Vec<String> {
        self.gone.iter().filter(|(_, t)| now.saturating_duration_since(**t) >= after).map(|(n, _)| n.clone()).collect()
    }

    /// Forgets member `name` if it is still gone; whether it was.
    pub fn forget(&mut self, name: &str) -> bool {
        if self.gone.remove(name).is_none() {
            return false;
        }
        self.changed |= self.members.remove(name).is_some();
        self.fresh.remove(name);
        true
    }

    /// Keeps the members in `dir` at `now` if a member was forgotten or moved since, or
    /// members were learned and [`KEEP_EVERY`] passed.
    pub fn keep(&mut self, dir: &Path, now: Instant) {
        let due = self.kept_at.is_none_or(|t| now.saturating_duration_since(t) >= KEEP_EVERY);
        if self.changed || (due && !self.fresh.is_empty()) {
            self.write(dir, now);
        }
    }

    /// Keeps the members in `dir` now if member `name` is not kept yet (rules are about to
    /// name it: a restarted agent must know whom they steer to).
    pub fn keep_with(&mut self, dir: &Path, name: &str) {
        if self.fresh.contains(name) {
            self.write(dir, Instant::now());
        }
    }

    /// Keeps whatever is not kept yet (the agent stops).
    pub fn keep_all(&mut self, dir: &Path) {
        if self.changed || !self.fresh.is_empty() {
            self.write(dir, Instant::now());
        }
    }

    fn write(&mut self, dir: &Path, now: Instant) {
        let list: Vec<&Sibling> = self.members.values().collect();
        match super::records::write_atomic(&dir.join(FILE), |w| Ok(serde_json::to_writer(w, &list)?)) {
            Ok(()) => {
                self.changed = false;
                self.fresh.clear();
                self.kept_at = Some(now);
            }
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

    /// Member `name` left or was declared dead.
    pub(super) fn lost(&self, name: &str) {
        self.known().lost(name, Instant::now());
    }

    /// Forgets the members gone for `forget_secs` that nothing here refers to any more:
    /// clients moved to them or draining from them, clients of theirs here, a hand-over with
    /// them in progress.
    pub(super) fn forget_gone(&self) {
        let after = Duration::from_secs(self.cfg.cluster.forget_secs);
        let candidates = self.known().gone_for(after, Instant::now());
        if candidates.is_empty() {
            return;
        }
        // One lock at a time: the state's, then the members'.
        let unused: Vec<String> = {
            let st = self.state();
            candidates.into_iter().filter(|n| !st.shares_clients_with(n) && !st.moved.drains_from(n)).collect()
        };
        for name in unused {
            // Unless gossip brought it back meanwhile.
            if self.known().forget(&name) {
                info!(member = %name, after_secs = after.as_secs(), "forgot a member gone this long that nothing here refers to any more");
            }
        }
    }

    /// Keeps the members known in `state_dir`, if they changed ([`Known::keep`]).
    pub(super) fn keep_known(&self) {
        self.known().keep(&self.cfg.state_dir(), Instant::now());
    }

    /// Keeps the members known in `state_dir` now if `name` is not kept yet: rules are about
    /// to name it.
    pub(super) fn keep_member(&self, name: &str) {
        if self.cfg.cluster.gossip() {
            self.known().keep_with(&self.cfg.state_dir(), name);
        }
    }

    /// Keeps whatever members are not kept yet: the agent stops.
    pub(super) fn keep_all_known(&self) {
        if self.cfg.cluster.gossip() {
            self.known().keep_all(&self.cfg.state_dir());
        }
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
        let t0 = Instant::now();
        k.learn(&m);
        k.keep(&dir, t0);
        assert!(dir.join(FILE).exists(), "the first member learned is kept at once");
        let c = Member { name: "c".into(), control: "198.18.0.3:7470".parse().unwrap(), ..m.clone() };
        k.learn(&c);
        k.keep(&dir, t0 + KEEP_EVERY / 2);
        assert!(!Known::read(&dir).members.contains_key("c"), "members learned wait for the next keeping");
        k.keep_with(&dir, "b");
        assert!(!Known::read(&dir).members.contains_key("c"), "b is kept already");
        k.keep_with(&dir, "c");
        assert!(Known::read(&dir).members.contains_key("c"), "rules are about to name c: kept at once");
        k.learn(&Member { boot: 2, ..m.clone() });
        assert!(!k.changed && k.fresh.is_empty(), "a restart at the same place is no news");
        k.learn(&Member { services: Vec::new(), ..m.clone() });
        assert!(k.changed, "what it serves changed");
        k.keep(&dir, t0 + KEEP_EVERY / 2);
        let again = Known::read(&dir);
        assert_eq!(again.members["b"].address, m.control);
        assert!(again.members["b"].services.is_empty(), "as last kept");
        std::fs::write(dir.join(FILE), b"{").unwrap();
        assert!(Known::read(&dir).members.is_empty(), "an unreadable file is ignored");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_member_gone_long_enough_is_forgotten_unless_it_came_back() {
        let dir = std::env::temp_dir().join(format!("rd-gone-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let member = |name: &str, last: u8| Member {
            name: name.into(),
            gossip: format!("198.18.0.{last}:7946").parse().unwrap(),
            control: format!("198.18.0.{last}:7470").parse().unwrap(),
            dual_stack: None,
            services: Vec::new(),
            boot: 1,
        };
        let mut k = Known::default();
        for (n, i) in [("b", 2), ("c", 3), ("d", 4)] {
            k.learn(&member(n, i));
        }
        let t0 = Instant::now();
        let hour = Duration::from_hours(1);
        assert!(k.gone_for(Duration::ZERO, t0).is_empty(), "members live are never gone");
        k.lost("b", t0);
        k.lost("c", t0);
        k.lost("b", t0 + hour);
        k.lost("x", t0);
        assert!(k.gone_for(hour, t0 + hour / 2).is_empty(), "not gone long enough");
        let mut gone = k.gone_for(hour, t0 + hour);
        gone.sort();
        assert_eq!(gone, ["b", "c"], "counted from the first word that it went; an unknown name is no member");
        // C came back before it was forgotten.
        k.learn(&member("c", 3));
        assert!(k.forget("b") && !k.forget("c") && !k.forget("d"), "only a member still gone is forgotten");
        assert_eq!(k.list().iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["c", "d"]);
        k.keep(&dir, t0);
        // What a previous run kept and gossip has not brought back yet is gone since this run.
        let again = Known::read(&dir);
        let t1 = Instant::now();
        let mut gone = again.gone_for(Duration::ZERO, t1);
        gone.sort();
        assert_eq!(gone, ["c", "d"]);
        assert!(again.gone_for(hour, t1).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
