//! The origin's clients on other nodes: the clients it moved out (and steers), when clients last
//! moved either way, the hand-backs it asked for, what came home, and the kernel's rules it
//! leaves alone.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use tracing::info;

use super::Streamed;
use crate::{
    admin::api::OrphanRule,
    agent::{
        MOVE_DWELL,
        records::{Dir, Record},
    },
    datapath::{Prefix, unix_now},
    peer::{ListedSession, NodeName, Verdict},
};

/// Clients by the node they are with.
pub type ByNode = HashMap<String, Vec<IpAddr>>;

/// What an origin moved to a volunteer.
#[derive(Clone, Debug)]
pub struct MigratedOut {
    /// The client.
    pub client: IpAddr,
    /// The volunteer its new connections go to.
    pub to: String,
    /// When it moved (wall clock, for the status).
    pub since_unix: u64,
    /// Connections the client had here when it moved.
    pub connections: u64,
    /// When this agent recorded it: reconciliation with the kernel only forgets entries older
    /// than the rule listing it compares with.
    pub recorded: Instant,
}

/// A hand-back in progress, as the origin receives it: the sessions listed before its
/// `Returning`, where the sessions that follow it go, and when the volunteer was last heard.
pub struct Returned {
    /// The sessions listed, by the service they belong to.
    pub listed: HashMap<SocketAddr, Vec<ListedSession>>,
    /// Where its sessions go (the task that imports them).
    pub stream: tokio::sync::mpsc::Sender<Streamed>,
    /// When the volunteer was last heard on it: a long export keeps the wait alive.
    pub last: Option<Instant>,
}

/// The origin's clients on other nodes, and their hand-backs.
#[derive(Default)]
pub struct Moved {
    /// The clients this node moved out, by address.
    pub clients: HashMap<IpAddr, MigratedOut>,
    /// When clients last moved (a hand-over either way committed), for [`MOVE_DWELL`].
    pub last_move: HashMap<IpAddr, Instant>,
    /// Sessions arriving for hand-backs this node asked for, by (volunteer, id).
    pub returning: HashMap<(NodeName, u64), Returned>,
    /// Clients that came home with their sessions (hand-backs committed).
    pub handed_back: u64,
    /// Sessions lost: clients that came home without them because their volunteer stayed
    /// unreachable (counting those re-adopted from a previous run, whose sessions this agent
    /// cannot know of).
    pub sessions_lost: u64,
    /// Time of the last hand-back, asked to committed.
    pub last_home_ms: Option<f64>,
    /// Rules in the kernel this agent does not manage (last reconciliation).
    pub orphans: Vec<OrphanRule>,
    /// Rules draining in the kernel (last reconciliation).
    pub draining: usize,
    /// Clients home whose rule still drains to the volunteer they came from (their open
    /// connections finish there; none if the target is no known sibling), with when that was
    /// learnt: the kernel refuses to send them to another volunteer until the drain ends (the
    /// flows living on the first would break), so planning one for another fails its whole
    /// hand-over.
    pub drain_home: HashMap<IpAddr, (Option<String>, Instant)>,
}

impl Moved {
    /// Watches `client`, steered to `to` since `since_unix` (wall clock) by a rule this agent
    /// did not make now (a previous run's, or one made outside it), as listed at `listed_at`.
    pub fn watch(&mut self, client: IpAddr, to: &str, since_unix: u64, listed_at: Instant) {
        self.clients.insert(client, MigratedOut { client, to: to.to_string(), since_unix, connections: 0, recorded: listed_at });
    }

    /// `client` (with `connections` here) is steered to `to` now; returns the volunteer it was
    /// steered to before, if another (it no longer needs room there).
    pub fn steered(&mut self, client: IpAddr, to: &str, connections: u64, now: Instant) -> Option<String> {
        let m = MigratedOut { client, to: to.to_string(), since_unix: unix_now(), connections, recorded: now };
        self.clients.insert(client, m).filter(|old| old.to != to).map(|old| old.to)
    }

    /// Hand-over `rec` was decided `verdict` (from the rules, or at its commit point): the
    /// clients it steers now, and those that came home (counted).
    pub fn decided(&mut self, rec: &Record, verdict: Verdict, now: Instant) {
        match (rec.dir, verdict) {
            (Dir::Out, Verdict::Committed) => {
                for c in &rec.clients {
                    self.clients.entry(*c).or_insert_with(|| MigratedOut { client: *c, to: rec.volunteer.clone(), since_unix: unix_now(), connections: 0, recorded: now });
                }
            }
            (Dir::Back, Verdict::Committed) => {
                for c in &rec.clients {
                    if self.clients.get(c).is_some_and(|m| m.to == rec.volunteer) {
                        self.clients.remove(c);
                    }
                    self.drain_home.insert(*c, (Some(rec.volunteer.clone()), now));
                }
                self.handed_back += u64::try_from(rec.clients.len()).unwrap_or(u64::MAX);
            }
            _ => {}
        }
    }

    /// `clients` moved (a hand-over either way committed) at `now`.
    pub fn just_moved(&mut self, clients: &[IpAddr], now: Instant) {
        for c in clients {
            self.last_move.insert(*c, now);
        }
    }

    /// Whether `client` moved less than [`MOVE_DWELL`] before `now`.
    pub fn dwelling(&self, client: &IpAddr, now: Instant) -> bool {
        self.last_move.get(client).is_some_and(|t| now.duration_since(*t) < MOVE_DWELL)
    }

    /// How long until none of `clients` moved less than [`MOVE_DWELL`] ago.
    pub fn dwell_left(&self, clients: &[IpAddr], now: Instant) -> Duration {
        clients.iter().filter_map(|c| self.last_move.get(c)).map(|t| MOVE_DWELL.saturating_sub(now.duration_since(*t))).max().unwrap_or_default()
    }

    /// Forgets the moves older than [`MOVE_DWELL`].
    pub fn forget_dwelled(&mut self, now: Instant) {
        self.last_move.retain(|_, t| now.duration_since(*t) < MOVE_DWELL);
    }

    /// The clients steered to `name`.
    pub fn on(&self, name: &str) -> Vec<IpAddr> {
        self.clients.values().filter(|m| m.to == name).map(|m| m.client).collect()
    }

    /// Every client moved out, by the volunteer it is with.
    pub fn by_volunteer(&self) -> ByNode {
        let mut by = ByNode::new();
        for m in self.clients.values() {
            by.entry(m.to.clone()).or_default().push(m.client);
        }
        by
    }

    /// Those of `clients` moved out, by the volunteer they are with.
    pub fn by_volunteer_of(&self, clients: impl IntoIterator<Item = IpAddr>) -> ByNode {
        let mut by = ByNode::new();
        for c in clients {
            if let Some(m) = self.clients.get(&c) {
                by.entry(m.to.clone()).or_default().push(c);
            }
        }
        by
    }

    /// `clients`' rules were drained at `now` because their volunteer stayed unreachable: they
    /// are home without their sessions. Returns how many of them were moved out (their
    /// sessions lost). Coming home is a move: a reconciliation whose listing is older (it
    /// still shows their rules active) must not watch them again, or the next silence of that
    /// volunteer counts their sessions lost twice.
    pub fn lost(&mut self, name: &str, clients: &[IpAddr], now: Instant) -> u64 {
        let lost = clients.iter().filter(|c| self.clients.remove(c).is_some()).count();
        self.just_moved(clients, now);
        self.drain_home.extend(clients.iter().map(|c| (*c, (Some(name.to_string()), now))));
        let lost = u64::try_from(lost).unwrap_or(u64::MAX);
        self.sessions_lost += lost;
        lost
    }

    /// Compares the clients moved out with the kernel's `active` rules (client to (sibling,
    /// since), listed at `listed_at`): a client whose rule was removed, drained or retargeted
    /// outside the agent is forgotten (returned by volunteer, to release there); an active rule
    /// to a sibling not known of is watched from now on. Clients in a hand-over (`busy`), those
    /// recorded after the listing and those that moved after it (either way: a hand-back that
    /// committed meanwhile withdrew the rule the listing shows) are left to it.
    pub fn reconcile(&mut self, active: &HashMap<IpAddr, (String, u64)>, listed_at: Instant, busy: &HashSet<IpAddr>) -> ByNode {
        let mut released = ByNode::new();
        self.clients.retain(|c, m| {
            // Recorded after the listing: the listing cannot know of it yet. In a hand-over:
            // its rules are changing, it decides.
            if m.recorded >= listed_at || busy.contains(c) || active.get(c).is_some_and(|(to, _)| *to == m.to) {
                return true;
            }
            info!(client = %c, to = %m.to, "client no longer steered: its rule was removed, drained or retargeted outside the agent");
            released.entry(m.to.clone()).or_default().push(*c);
            false
        });
        for (c, (to, since_unix)) in active {
            // A client in a hand-over: its rules are going in now, the hand-over records it.
            // One that moved since the listing: the listing is older than its rules.
            let moved_since = self.last_move.get(c).is_some_and(|t| *t >= listed_at);
            if !self.clients.contains_key(c) && !busy.contains(c) && !moved_since {
                info!(client = %c, to = %to, "watching a rule made outside the agent: it is drained if its sibling goes silent");
                self.watch(*c, to, *since_unix, listed_at);
            }
        }
        released
    }

    /// Whether `client`'s rule still drains to the volunteer it came home from.
    pub fn drains(&self, client: &IpAddr) -> bool {
        self.drain_home.contains_key(client)
    }

    /// Whether a rule drains to sibling `name` (clients that came home from it).
    pub fn drains_from(&self, name: &str) -> bool {
        self.drain_home.values().any(|(to, _)| to.as_deref() == Some(name))
    }

    /// The sibling `client`'s rule drains to, if it drains to a known sibling.
    pub fn drains_to(&self, client: &IpAddr) -> Option<&str> {
        self.drain_home.get(client).and_then(|(to, _)| to.as_deref())
    }

    /// The kernel's rules this agent leaves alone and those that drain (with the sibling
    /// they drain to), as listed at `listed_at`; returns the orphans not reported before.
    /// Clients learnt to drain after the listing are kept: it is older than their drain.
    pub fn rules_left(&mut self, orphans: Vec<OrphanRule>, draining: &[(Prefix, Option<String>)], listed_at: Instant) -> Vec<OrphanRule> {
        self.draining = draining.len();
        self.drain_home.retain(|_, (_, t)| *t > listed_at);
        for (p, to) in draining.iter().filter(|(p, _)| p.is_host()) {
            self.drain_home.entry(p.addr).or_insert_with(|| (to.clone(), listed_at));
        }
        if self.orphans == orphans {
            return Vec::new();
        }
        let new = orphans.iter().filter(|o| !self.orphans.contains(o)).cloned().collect();
        self.orphans = orphans;
        new
    }

    /// Hand-back `id` of `name` was asked for at `t0`: its sessions may arrive (listed, then
    /// into `stream`).
    pub fn await_back(&mut self, name: &str, id: u64, t0: Instant, stream: tokio::sync::mpsc::Sender<Streamed>) {
        self.returning.insert((NodeName::from(name), id), Returned { listed: HashMap::new(), stream, last: Some(t0) });
    }

    /// A `Listed` frame of hand-back `id` of `name` (or an empty `Sessions` frame, `listed`
    /// empty: the volunteer still exports); false when no such hand-back is awaited.
    pub fn back_listed(&mut self, name: &str, id: u64, service: SocketAddr, listed: Vec<ListedSession>, now: Instant) -> bool {
        let Some(r) = self.returning.get_mut(&(NodeName::from(name), id)) else { return false };
        r.last = Some(now);
        if !listed.is_empty() {
            r.listed.entry(service).or_default().extend(listed);
        }
        true
    }

    /// Where what follows the `Returning` of hand-back `id` of `name` goes (heard now).
    pub fn back_stream(&mut self, name: &str, id: u64, now: Instant) -> Option<tokio::sync::mpsc::Sender<Streamed>> {
        let r = self.returning.get_mut(&(NodeName::from(name), id))?;
        r.last = Some(now);
        Some(r.stream.clone())
    }

    /// When the volunteer of hand-back `id` of `name` was last heard on it.
    pub fn back_heard(&self, name: &str, id: u64) -> Option<Instant> {
        self.returning.get(&(NodeName::from(name), id)).and_then(|r| r.last)
    }

    /// The sessions listed for hand-back `id` of `name` (its `Returning` came; its sessions
    /// still go to its stream).
    pub fn take_listed(&mut self, name: &str, id: u64) -> HashMap<SocketAddr, Vec<ListedSession>> {
        self.returning.get_mut(&(NodeName::from(name), id)).map(|r| std::mem::take(&mut r.listed)).unwrap_or_default()
    }

    /// Hand-back `id` of `name` is no longer awaited.
    pub fn end_back(&mut self, name: &str, id: u64) {
        self.returning.remove(&(NodeName::from(name), id));
    }

    /// The link to `name` went down: what its hand-backs still wait for will not come.
    pub fn link_down(&mut self, name: &str) {
        self.returning.retain(|(n, _), _| n.as_str() != name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(i: u8) -> IpAddr {
        IpAddr::from([198, 18, 1, i])
    }

    fn rec(dir: Dir, to: &str, clients: &[IpAddr]) -> Record {
        Record { id: 1, dir, volunteer: to.into(), targets: Vec::new(), clients: clients.to_vec(), apps: Vec::new() }
    }

    #[test]
    fn a_client_steered_elsewhere_is_released_where_it_was() {
        let (mut m, now) = (Moved::default(), Instant::now());
        assert_eq!(m.steered(ip(1), "b", 3, now), None);
        assert_eq!(m.steered(ip(1), "b", 3, now), None, "the same volunteer");
        assert_eq!(m.steered(ip(1), "c", 3, now).as_deref(), Some("b"));
        assert_eq!(m.on("c"), vec![ip(1)]);
        assert_eq!(m.clients[&ip(1)].connections, 3);
    }

    #[test]
    fn decided_hand_overs_change_what_is_moved_out() {
        let (mut m, now) = (Moved::default(), Instant::now());
        m.steered(ip(1), "b", 5, now);
        m.decided(&rec(Dir::Out, "c", &[ip(1), ip(2)]), Verdict::Committed, now);
        assert_eq!(m.clients[&ip(1)].to, "b", "a client already known stays as it is");
        assert_eq!(m.clients[&ip(2)].to, "c");
        m.decided(&rec(Dir::Out, "c", &[ip(3)]), Verdict::Aborted, now);
        assert!(!m.clients.contains_key(&ip(3)));
        m.decided(&rec(Dir::Back, "c", &[ip(1), ip(2)]), Verdict::Committed, now);
        assert_eq!(m.by_volunteer(), ByNode::from([("b".to_string(), vec![ip(1)])]), "only those with that volunteer come home");
        assert_eq!(m.handed_back, 2);
        m.decided(&rec(Dir::Back, "b", &[ip(1)]), Verdict::Aborted, now);
        assert_eq!(m.handed_back, 2);
    }

    #[test]
    fn clients_that_just_moved_dwell() {
        let (mut m, now) = (Moved::default(), Instant::now());
        m.just_moved(&[ip(1)], now);
        assert!(m.dwelling(&ip(1), now) && !m.dwelling(&ip(2), now));
        assert_eq!(m.dwell_left(&[ip(2), ip(1)], now + Duration::from_millis(500)), MOVE_DWELL.saturating_sub(Duration::from_millis(500)));
        assert_eq!(m.dwell_left(&[ip(1)], now + MOVE_DWELL * 2), Duration::ZERO);
        m.forget_dwelled(now + MOVE_DWELL);
        assert!(m.last_move.is_empty());
    }

    #[test]
    fn clients_of_an_unreachable_volunteer_count_as_lost_once() {
        let (mut m, now) = (Moved::default(), Instant::now());
        m.steered(ip(1), "b", 1, now);
        m.steered(ip(2), "b", 1, now);
        assert_eq!(m.lost("b", &[ip(1), ip(2), ip(3)], Instant::now()), 2);
        assert_eq!(m.lost("b", &[ip(1)], Instant::now()), 0);
        assert_eq!(m.sessions_lost, 2);
        assert!(m.clients.is_empty());
    }

    #[test]
    fn reconciling_forgets_rules_gone_and_watches_rules_made_outside() {
        let now = Instant::now();
        let listed = now + Duration::from_secs(1);
        let mut m = Moved::default();
        for c in 1..=4 {
            m.steered(ip(c), "b", 1, now);
        }
        m.steered(ip(5), "b", 1, listed + Duration::from_secs(1));
        let active = HashMap::from([(ip(1), ("b".to_string(), 7)), (ip(3), ("c".to_string(), 7)), (ip(6), ("c".to_string(), 8)), (ip(7), ("c".to_string(), 9))]);
        let busy = HashSet::from([ip(4), ip(7)]);
        let mut released = m.reconcile(&active, listed, &busy);
        for v in released.values_mut() {
            v.sort_unstable();
        }
        assert_eq!(released, ByNode::from([("b".to_string(), vec![ip(2), ip(3)])]), "removed, and retargeted");
        let mut kept: Vec<IpAddr> = m.clients.keys().copied().collect();
        kept.sort_unstable();
        assert_eq!(kept, vec![ip(1), ip(3), ip(4), ip(5), ip(6)], "steered, retargeted, in a hand-over, recorded after the listing, made outside");
        assert_eq!((m.clients[&ip(3)].to.as_str(), m.clients[&ip(3)].since_unix), ("c", 7), "watched where its rule sends it now");
        assert_eq!((m.clients[&ip(6)].to.as_str(), m.clients[&ip(6)].since_unix), ("c", 8));
    }

    /// A hand-back committed between the listing and its reconciliation: the listing still
    /// shows the rule it withdrew, and the client (home, out of the hand-back) must not be
    /// watched as steered by a rule made outside the agent (the status said it was steered
    /// for a reconciliation period, and a test that read it then failed in CI).
    #[test]
    fn a_client_that_came_home_after_the_listing_is_not_taken_for_steered() {
        let t0 = Instant::now();
        let listed = t0 + Duration::from_millis(10);
        let mut m = Moved::default();
        m.steered(ip(1), "b", 1, t0);
        // The hand-back commits after the listing: the client leaves the moved ones.
        m.clients.remove(&ip(1));
        m.just_moved(&[ip(1)], listed + Duration::from_millis(5));
        let active = HashMap::from([(ip(1), ("b".to_string(), 7))]);
        let released = m.reconcile(&active, listed, &HashSet::new());
        assert!(released.is_empty());
        assert!(m.clients.is_empty(), "home, not steered: {:?}", m.clients.keys().collect::<Vec<_>>());
        // A later listing that still shows a rule for it is right: it is watched.
        let later = listed + Duration::from_millis(10);
        m.reconcile(&active, later, &HashSet::new());
        assert!(m.clients.contains_key(&ip(1)));
    }

    /// A volunteer's clients drained (it stayed unreachable) between a listing and its
    /// reconciliation: the listing still shows their rules active. Watched again, the same
    /// clients were drained and counted lost a second time a second later (the 12-server
    /// gossip test counted 102 sessions lost for 77 clients).
    #[test]
    fn clients_drained_after_the_listing_are_not_watched_again() {
        let t0 = Instant::now();
        let listed = t0 + Duration::from_millis(10);
        let mut m = Moved::default();
        m.steered(ip(1), "b", 1, t0);
        m.steered(ip(2), "b", 1, t0);
        assert_eq!(m.lost("b", &[ip(1), ip(2)], listed + Duration::from_millis(5)), 2);
        let active = HashMap::from([(ip(1), ("b".to_string(), 7)), (ip(2), ("b".to_string(), 7))]);
        m.reconcile(&active, listed, &HashSet::new());
        assert!(m.clients.is_empty(), "home, not steered: {:?}", m.clients.keys().collect::<Vec<_>>());
        assert_eq!(m.lost("b", &[ip(1), ip(2)], listed + Duration::from_millis(20)), 0, "nothing more to lose");
        assert_eq!(m.sessions_lost, 2);
    }

    #[test]
    fn new_orphans_are_reported_once() {
        let mut m = Moved::default();
        let o = |p: &str| OrphanRule { prefix: p.into(), target: ip(9), why: String::new() };
        let now = Instant::now();
        let d = |n: u8| vec![(Prefix { addr: ip(9), len: 32 }, Some("b".to_string())); usize::from(n)];
        assert_eq!(m.rules_left(vec![o("a")], &d(2), now), vec![o("a")]);
        assert_eq!(m.rules_left(vec![o("a")], &d(1), now), vec![]);
        assert_eq!(m.rules_left(vec![o("a"), o("b")], &d(1), now), vec![o("b")]);
        assert_eq!(m.rules_left(vec![], &d(0), now), vec![]);
        assert!(m.orphans.is_empty() && m.draining == 0);
    }

    #[test]
    fn hand_back_listings_gather_until_taken_and_its_stream_lasts_until_it_ends() {
        let (mut m, now) = (Moved::default(), Instant::now());
        let svc: SocketAddr = "198.18.0.10:80".parse().unwrap();
        let l = ListedSession { client: ip(1), len: 1 };
        assert!(!m.back_listed("b", 1, svc, vec![l], now), "not awaited");
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        m.await_back("b", 1, now, tx);
        let later = now + Duration::from_secs(1);
        assert!(m.back_listed("b", 1, svc, Vec::new(), later));
        assert_eq!(m.back_heard("b", 1), Some(later), "an empty frame keeps the wait alive");
        assert!(m.back_listed("b", 1, svc, vec![l], later));
        assert_eq!(m.take_listed("b", 1), HashMap::from([(svc, vec![l])]));
        let latest = later + Duration::from_secs(1);
        assert!(m.back_stream("b", 1, latest).is_some(), "its sessions still go to its stream");
        assert_eq!(m.back_heard("b", 1), Some(latest));
        m.link_down("c");
        assert!(m.back_stream("b", 1, latest).is_some(), "another sibling's link");
        m.link_down("b");
        assert!(m.back_stream("b", 1, latest).is_none() && m.back_heard("b", 1).is_none());
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        m.await_back("b", 2, now, tx);
        m.end_back("b", 2);
        assert!(m.take_listed("b", 2).is_empty() && m.back_stream("b", 2, now).is_none());
    }
}
