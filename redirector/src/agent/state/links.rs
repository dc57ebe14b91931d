//! The links' side of the state: each sibling as this node knows it (its outbound link, when it
//! was last heard, the load it says, releases owed to it), the requests waiting for an answer
//! on a link, and which siblings are suspected or unreachable.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot};

use crate::peer::{Answer, NodeName, Request};

/// One sibling as this node knows it.
#[derive(Default)]
pub struct SiblingState {
    /// The outbound link's queue, while it is up.
    pub out: Option<mpsc::Sender<Request>>,
    /// Resolves once the outbound link's connection has ended (its task drops the sender).
    pub ended: Option<oneshot::Receiver<()>>,
    /// Last frame received from it, on either connection; `None` until it is first heard.
    pub last_seen: Option<Instant>,
    /// Its last heartbeat.
    pub last_heartbeat: Option<Instant>,
    /// The load its last heartbeat said.
    pub load: u64,
    /// Clients taken back while the link was down: released when it is up again.
    pub unreleased: Vec<IpAddr>,
    /// When a request last went out on the outbound link (or it came up).
    pub last_used: Option<Instant>,
}

impl SiblingState {
    /// Linked (its outbound connection is up) and heard from within `live`.
    pub fn reachable(&self, live: Duration) -> bool {
        self.out.is_some() && self.last_seen.is_some_and(|t| t.elapsed() < live)
    }

    /// Owes it the release of `clients` (each once), sent when the link allows.
    pub fn owe_release(&mut self, clients: impl IntoIterator<Item = IpAddr>) {
        self.unreleased.extend(clients);
        self.unreleased.sort_unstable();
        self.unreleased.dedup();
    }
}

/// The siblings and the requests on their links.
#[derive(Default)]
pub struct Links {
    /// Every configured sibling (and any heard from), by name.
    pub siblings: HashMap<NodeName, SiblingState>,
    /// Requests sent on a link and waiting for their answer, by (sibling, request id).
    pub pending: HashMap<(NodeName, u64), oneshot::Sender<Answer>>,
    /// Siblings being taken clients home from because they were suspected.
    pub suspected: HashSet<String>,
    /// Siblings whose agent is unreachable while their datapath serves (said once).
    pub unreachable: HashSet<String>,
    /// Links are closing for good (the agent exits): none is opened again.
    pub closing: bool,
    /// Siblings an outbound link is kept to (or tried), by their dialing task.
    pub dialing: HashSet<String>,
    /// Gossip mode: the members with room kept linked in advance.
    pub standby: Vec<String>,
    /// Outbound links closed because nothing needed them: not opened again until needed.
    pub retired: HashSet<String>,
}

impl Links {
    /// Links to `siblings`, none up yet.
    pub fn new(siblings: impl IntoIterator<Item = NodeName>) -> Self {
        Self { siblings: siblings.into_iter().map(|n| (n, SiblingState::default())).collect(), ..Self::default() }
    }

    /// Starts dialing `name`; whether it was not dialed already.
    pub fn dial(&mut self, name: &str) -> bool {
        !self.closing && self.dialing.insert(name.to_string())
    }

    /// `name` is a sibling (a member gossip brought): heard from once linked.
    pub fn know(&mut self, name: &str) {
        self.siblings.entry(NodeName::from(name)).or_default();
    }

    /// A heartbeat from `name` (on either connection) saying `load`.
    pub fn heartbeat(&mut self, name: &str, load: u64, now: Instant) {
        let s = self.siblings.entry(NodeName::from(name)).or_default();
        s.load = load;
        s.last_heartbeat = Some(now);
    }

    /// `name` was heard from (any frame, on either connection); whether its agent had been
    /// unreachable until now.
    pub fn heard(&mut self, name: &str, now: Instant) -> bool {
        if let Some(s) = self.siblings.get_mut(name) {
            s.last_seen = Some(now);
        }
        self.unreachable.remove(name)
    }

    /// The outbound link to `name` is up, queueing on `out`; `ended` resolves when its
    /// connection ends. Returns the releases owed to it meanwhile, to send first.
    pub fn up(&mut self, name: &str, out: mpsc::Sender<Request>, ended: oneshot::Receiver<()>, now: Instant) -> Vec<IpAddr> {
        let s = self.siblings.entry(NodeName::from(name)).or_default();
        s.out = Some(out);
        s.ended = Some(ended);
        s.last_seen = Some(now);
        s.last_used = Some(now);
        std::mem::take(&mut s.unreleased)
    }

    /// The outbound link to `name` is down: the requests waiting for an answer on it will not
    /// get one (they fail now). Whether it is not to be opened again (links are closing for
    /// good, or this one was retired).
    pub fn down(&mut self, name: &str) -> bool {
        if let Some(s) = self.siblings.get_mut(name) {
            s.out = None;
        }
        self.pending.retain(|(n, _), _| n.as_str() != name);
        self.retired.remove(name) || self.closing
    }

    /// A request goes out to `name` now.
    pub fn used(&mut self, name: &str, now: Instant) {
        if let Some(s) = self.siblings.get_mut(name) {
            s.last_used = Some(now);
        }
    }

    /// Outbound links up, not on standby, unused for `idle` at `now`, with no request waiting
    /// on them and nothing owed.
    pub fn idle(&self, idle: Duration, now: Instant) -> Vec<String> {
        self.siblings
            .iter()
            .filter(|(n, s)| {
                s.out.is_some()
                    && s.unreleased.is_empty()
                    && s.last_used.is_some_and(|t| now.duration_since(t) >= idle)
                    && !self.standby.iter().any(|x| x == n.as_str())
                    && !self.pending.keys().any(|(p, _)| p == *n)
            })
            .map(|(n, _)| n.to_string())
            .collect()
    }

    /// Closes the outbound link to `name` (what is queued still leaves); it is opened again
    /// when a request needs it.
    pub fn retire(&mut self, name: &str) {
        if let Some(s) = self.siblings.get_mut(name)
            && s.out.take().is_some()
        {
            self.retired.insert(name.to_string());
        }
    }

    /// Links close for good: every outbound queue is let go (what is queued still leaves);
    /// returns what resolves when each of those connections has ended.
    pub fn close(&mut self) -> Vec<oneshot::Receiver<()>> {
        self.closing = true;
        self.siblings.values_mut().filter_map(|s| s.out.take().and(s.ended.take())).collect()
    }

    /// The queue of the outbound link to `name`, while it is up.
    pub fn sender(&self, name: &str) -> Option<mpsc::Sender<Request>> {
        self.siblings.get(name).and_then(|s| s.out.clone())
    }

    /// Whether the outbound link to `name` is up.
    pub fn linked(&self, name: &str) -> bool {
        self.siblings.get(name).is_some_and(|s| s.out.is_some())
    }

    /// Whether `name` is linked and was heard from within `live`.
    pub fn reachable(&self, name: &str, live: Duration) -> bool {
        self.siblings.get(name).is_some_and(|s| s.reachable(live))
    }

    /// When `name` was last heard from, if ever.
    pub fn last_seen(&self, name: &str) -> Option<Instant> {
        self.siblings.get(name).and_then(|s| s.last_seen)
    }

    /// Owes `name` the release of `clients`, sent when its link allows.
    pub fn owe_release(&mut self, name: &str, clients: impl IntoIterator<Item = IpAddr>) {
        if let Some(s) = self.siblings.get_mut(name) {
            s.owe_release(clients);
        }
    }

    /// The releases owed to siblings reachable within `live`, taken to be sent now.
    pub fn take_owed(&mut self, live: Duration) -> Vec<(NodeName, Vec<IpAddr>)> {
        self.siblings.iter_mut().filter(|(_, s)| !s.unreleased.is_empty() && s.reachable(live)).map(|(n, s)| (n.clone(), std::mem::take(&mut s.unreleased))).collect()
    }

    /// Waits for the answer to request `id` sent to `name`, on `tx`.
    pub fn await_answer(&mut self, name: &str, id: u64, tx: oneshot::Sender<Answer>) {
        self.pending.insert((NodeName::from(name), id), tx);
    }

    /// Where the answer to request `id` sent to `name` goes, if anyone still waits for it (taken: an answer goes to its waiter once, and one that stops waiting takes it too).
    pub fn take_waiter(&mut self, name: &str, id: u64) -> Option<oneshot::Sender<Answer>> {
        self.pending.remove(&(NodeName::from(name), id))
    }

    /// Suspects `name`; whether it was not suspected already.
    pub fn suspect(&mut self, name: &str) -> bool {
        self.suspected.insert(name.to_string())
    }

    /// `name`'s suspicion has been dealt with.
    pub fn unsuspect(&mut self, name: &str) {
        self.suspected.remove(name);
    }

    /// `name`'s agent is unreachable while its datapath serves; whether that is news.
    pub fn agent_unreachable(&mut self, name: &str) -> bool {
        self.unreachable.insert(name.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(i: u8) -> IpAddr {
        IpAddr::from([198, 18, 1, i])
    }

    #[test]
    fn a_link_down_fails_the_requests_waiting_on_it_only() {
        let mut l = Links::new(["b".into(), "c".into()]);
        let (tb, mut rb) = oneshot::channel();
        let (tc, mut rc) = oneshot::channel();
        l.await_answer("b", 1, tb);
        l.await_answer("c", 1, tc);
        let (out, _rx) = mpsc::channel(1);
        let (_end, ended) = oneshot::channel();
        assert!(l.up("b", out, ended, Instant::now()).is_empty());
        assert!(l.linked("b") && l.sender("b").is_some());
        assert!(!l.down("b"), "not closing");
        assert!(!l.linked("b") && l.sender("b").is_none());
        assert!(rb.try_recv().is_err_and(|e| e == oneshot::error::TryRecvError::Closed), "b's waiter is told at once");
        assert!(rc.try_recv().is_err_and(|e| e == oneshot::error::TryRecvError::Empty), "c's still waits");
        assert!(l.take_waiter("c", 1).is_some() && l.take_waiter("c", 1).is_none(), "an answer goes to its waiter once");
    }

    #[test]
    fn releases_owed_leave_once_when_the_sibling_is_reachable() {
        let live = Duration::from_secs(3);
        let mut l = Links::new(["b".into()]);
        l.owe_release("b", [ip(2), ip(1)]);
        l.owe_release("b", [ip(1)]);
        l.owe_release("nobody", [ip(9)]);
        assert!(l.take_owed(live).is_empty(), "not linked: kept");
        let (out, _rx) = mpsc::channel(1);
        let (_end, ended) = oneshot::channel();
        let owed = l.up("b", out, ended, Instant::now());
        assert_eq!(owed, vec![ip(1), ip(2)], "each once, sent first on the new link");
        assert!(l.up("b", mpsc::channel(1).0, oneshot::channel().1, Instant::now()).is_empty());
        l.owe_release("b", [ip(3)]);
        assert_eq!(l.take_owed(live), vec![(NodeName::from("b"), vec![ip(3)])]);
        assert!(l.take_owed(live).is_empty());
    }

    #[test]
    fn reachable_needs_the_link_up_and_a_recent_frame() {
        let live = Duration::from_secs(3);
        let mut l = Links::new(["b".into()]);
        assert!(!l.reachable("b", live) && l.last_seen("b").is_none());
        let long_ago = Instant::now().checked_sub(Duration::from_secs(10)).unwrap();
        let (out, _rx) = mpsc::channel(1);
        l.up("b", out, oneshot::channel().1, long_ago);
        assert!(!l.reachable("b", live), "silent for longer than live");
        l.heard("b", Instant::now());
        assert!(l.reachable("b", live), "heard just now");
        assert!(!l.reachable("stranger", live));
    }

    #[test]
    fn an_unreachable_agent_is_said_once_and_back_once() {
        let mut l = Links::new(["b".into()]);
        assert!(l.agent_unreachable("b") && !l.agent_unreachable("b"));
        assert!(l.heard("b", Instant::now()), "back");
        assert!(!l.heard("b", Instant::now()));
        assert!(l.suspect("b") && !l.suspect("b"));
        l.unsuspect("b");
        assert!(l.suspect("b"));
    }

    #[test]
    fn closing_lets_every_link_go_and_stays() {
        let mut l = Links::new(["b".into(), "c".into()]);
        let (out, _rx) = mpsc::channel(1);
        let (end, ended) = oneshot::channel::<()>();
        l.up("b", out, ended, Instant::now());
        let mut waits = l.close();
        assert_eq!(waits.len(), 1, "only the link that is up");
        assert!(!l.linked("b"));
        drop(end);
        assert!(waits.pop().unwrap().try_recv().is_err_and(|e| e == oneshot::error::TryRecvError::Closed));
        assert!(l.down("b"), "closing: not opened again");
        l.heartbeat("b", 7, Instant::now());
        assert_eq!(l.siblings["b"].load, 7);
    }

    #[test]
    fn only_links_nothing_needs_are_idle_and_a_retired_one_is_not_dialed_again() {
        let t0 = Instant::now();
        let mut l = Links::new(["b".into(), "c".into(), "d".into(), "e".into()]);
        for n in ["b", "c", "d", "e"] {
            let (out, _rx) = mpsc::channel(1);
            let (_end, ended) = oneshot::channel();
            l.up(n, out, ended, t0);
        }
        let idle = Duration::from_mins(1);
        assert!(l.idle(idle, t0 + Duration::from_secs(59)).is_empty(), "used a moment ago");
        l.used("b", t0 + Duration::from_secs(30));
        l.standby = vec!["c".into()];
        let (tx, _rx) = oneshot::channel();
        l.await_answer("d", 1, tx);
        let mut idle_now = l.idle(idle, t0 + Duration::from_secs(61));
        idle_now.sort();
        assert_eq!(idle_now, ["e"], "b used since, c on standby, d waits for an answer");
        l.retire("e");
        assert!(!l.linked("e"));
        assert!(l.down("e"), "its dialer stops");
        assert!(!l.down("b"), "a link that failed is dialed again");
    }
}
