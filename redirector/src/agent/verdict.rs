//! How a hand-over ends, decided in one place for every path: the hand-over itself when its
//! rules could not all change, an agent that restarted in the middle of one, an application
//! reporting one it did not see end, a volunteer asking.
//!
//! The origin's kernel rules are the commit point in both directions. A hand-over out is
//! committed if and only if the rules actively send (some of) its clients to the volunteer; a
//! hand-back is committed if and only if (some of) its clients are no longer actively sent
//! there. A draining rule does not send new connections anywhere but home, so it never counts
//! as steered. Once decided, the rules are made to say it for every client of the hand-over
//! (the rest steered, or the rest withdrawn), the decision is recorded, and everyone is told.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::anyhow;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::{
    Acked, Agent, flat,
    handoff::{Busy, Handover, names},
    host_prefix,
    records::{Dir, Record},
    tally::{End, Stage},
};
use crate::{
    app::{PendingHandoff, Registration, Role},
    datapath::{Prefix, RuleInfo, RuleState},
    peer::{HandoffId, NodeName, Verdict},
};

/// How long a leaving agent spends deciding the hand-overs it ran out of time for, all of
/// them ([`Agent::end_cut_short`]).
const LAST_DECISIONS: Duration = Duration::from_secs(3);

/// What the rules say of a hand-over: its verdict, and the clients whose rules must still
/// change for the rules to say it for all of them.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Judgement {
    pub verdict: Verdict,
    pub to_fix: Vec<IpAddr>,
}

/// Judges hand-over `dir` of `clients` with a volunteer whose control addresses are `targets`
/// from the kernel's `rules`.
pub(super) fn judge(dir: Dir, rules: &[RuleInfo], targets: &[IpAddr], clients: &[IpAddr]) -> Judgement {
    let active: HashSet<IpAddr> =
        rules.iter().filter(|r| r.state == RuleState::Active && r.prefix == host_prefix(r.prefix.addr) && targets.contains(&r.target)).map(|r| r.prefix.addr).collect();
    let (steered, home): (Vec<IpAddr>, Vec<IpAddr>) = clients.iter().partition(|c| active.contains(c));
    match dir {
        Dir::Out if !steered.is_empty() => Judgement { verdict: Verdict::Committed, to_fix: home },
        Dir::Back if !home.is_empty() => Judgement { verdict: Verdict::Committed, to_fix: steered },
        _ => Judgement { verdict: Verdict::Aborted, to_fix: Vec::new() },
    }
}

impl Agent {
    /// Decides hand-over `rec` from the kernel's rules and makes them say it for all its
    /// clients (the rest of a committed hand-over out steered, without a probe: the volunteer
    /// acknowledged; the rest of a committed hand-back withdrawn). An error: nothing could be
    /// decided now (the rules could not be read or changed).
    pub(super) async fn decide_from_rules(self: &Arc<Self>, rec: &Record) -> anyhow::Result<Verdict> {
        let rules = self.with_reader(|d| d.list_rules()).await??;
        let j = judge(rec.dir, &rules, &rec.targets, &rec.clients);
        if !j.to_fix.is_empty() {
            warn!(
                sibling = %rec.volunteer,
                id = rec.id,
                clients = j.to_fix.len(),
                "the hand-over's rules are only partly changed (the agent stopped or failed half way); completing them: {}",
                names(&j.to_fix)
            );
            let (dir, targets, period) = (rec.dir, rec.targets.clone(), Duration::from_secs(self.cfg.drain_secs));
            let prefixes: Vec<Prefix> = j.to_fix.iter().map(|c| host_prefix(*c)).collect();
            flat(
                self.with_dp(move |dp| match dir {
                    Dir::Out => {
                        for v4 in [true, false] {
                            let family: Vec<Prefix> = prefixes.iter().filter(|p| p.addr.is_ipv4() == v4).copied().collect();
                            if let Some(first) = family.first() {
                                let target = targets
                                    .iter()
                                    .find(|t| t.is_ipv4() == first.addr.is_ipv4())
                                    .copied()
                                    .ok_or_else(|| crate::datapath::Error::Invalid { what: format!("no {} target for {}", crate::datapath::family_name(v4), first.addr) })?;
                                dp.migrate_many(&family, target, None, false)?;
                            }
                        }
                        Ok(())
                    }
                    Dir::Back => dp.drain_many(&prefixes, period).map(|_| ()),
                })
                .await,
            )
            .map_err(|e| anyhow!("completing the rules: {e}"))?;
        }
        Ok(j.verdict)
    }

    /// [`Agent::decide_from_rules`] until it decides (every second meanwhile): for the owner of
    /// a hand-over that must end.
    pub(super) async fn decide_until_done(self: &Arc<Self>, rec: &Record) -> Verdict {
        let mut failures = 0u32;
        loop {
            match self.decide_from_rules(rec).await {
                Ok(v) => return v,
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(30) {
                        error!(sibling = %rec.volunteer, id = rec.id, "cannot decide the hand-over from the rules yet (its clients stay frozen): {e:#}");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Hand-over `h` (either way) at its commit point, once its rules were to change, and
    /// what follows: committed when `changed` says they all did, otherwise whatever the rules
    /// say now; the agent's own view follows, and everyone is told (`conclude`, which also frees
    /// its clients). Returns when the rules had changed (since it started), or `None`: it
    /// aborted.
    pub(super) async fn at_commit_point(self: &Arc<Self>, h: Handover, changed: Result<(), String>) -> Option<Duration> {
        let rec = &h.rec.clone();
        let verdict = match changed {
            Ok(()) => Verdict::Committed,
            Err(e) => {
                let v = self.decide_until_done(rec).await;
                warn!(sibling = %rec.volunteer, id = rec.id, dir = ?rec.dir, verdict = ?v, "changing the hand-over's rules failed ({e}); the rules say how it ended");
                v
            }
        };
        self.after_rules(rec, verdict);
        if verdict == Verdict::Aborted {
            let why = match rec.dir {
                Dir::Out => "rules not installed",
                Dir::Back => "rules not withdrawn",
            };
            self.conclude(h, End::Aborted(Stage::Rules, why.into())).await;
            return None;
        }
        let t_rules = h.t0.elapsed();
        self.faults.pause("pause-before-commit", &h.name(self.cfg.node.as_str())).await;
        self.conclude(h, End::Committed).await;
        Some(t_rules)
    }

    /// How hand-over `id` with `volunteer` stands: its record, or else (no record: it is older
    /// than the records, or they were lost) the rules for `clients`, recorded from then on.
    /// `Pending`: not decided yet (it is in progress, or the rules cannot be read): ask again.
    /// Without a record nothing says which clients the hand-over moved, and `clients` comes from
    /// whoever asks (an application, a sibling): no rule changes, and only the clients whose
    /// rules say the verdict are recorded as its own. (Completing the rules for all of
    /// `clients` would steer any client an asker lists along with one that is steered.)
    pub(super) async fn verdict_of(self: &Arc<Self>, volunteer: &str, id: u64, dir: Dir, clients: &[IpAddr]) -> Verdict {
        if let Some(v) = self.recorded(volunteer, id) {
            return v;
        }
        let _one = self.deciding.lock().await;
        if let Some(v) = self.recorded(volunteer, id) {
            return v;
        }
        let Some(targets) = self.sibling(volunteer).map(|s| s.control_addresses()) else {
            warn!(sibling = volunteer, id, "a hand-over with a node that is no longer a sibling, of which no record is left: it cannot be decided here");
            return Verdict::Pending;
        };
        let rules = match flat(self.with_reader(|d| d.list_rules()).await) {
            Ok(r) => r,
            Err(e) => {
                warn!(sibling = volunteer, id, "cannot tell how a hand-over ended: {e}");
                return Verdict::Pending;
            }
        };
        let j = judge(dir, &rules, &targets, clients);
        let (counted, left) = counted(clients, &j);
        if !left.is_empty() {
            warn!(
                sibling = volunteer,
                id,
                ?dir,
                "a hand-over this agent keeps no record of: {} of the clients named for it have rules that do not say so; left as they are: {}",
                left.len(),
                names(&left)
            );
        }
        let rec = Arc::new(Record { id, dir, volunteer: volunteer.to_string(), targets, clients: counted, apps: Vec::new() });
        info!(sibling = volunteer, id, ?dir, clients = rec.clients.len(), verdict = ?j.verdict, "a hand-over this agent keeps no record of: the kernel's rules say");
        self.after_rules(&rec, j.verdict);
        self.records().decide(&rec, j.verdict);
        j.verdict
    }

    /// Of the `clients` an application reports for hand-over `id` with `volunteer`, those its
    /// record holds (none without a record).
    fn recorded_clients(&self, volunteer: &str, id: u64, clients: &[IpAddr]) -> Vec<IpAddr> {
        let records = self.records();
        let Some(e) = records.get(id).filter(|e| e.rec.volunteer == volunteer) else { return Vec::new() };
        let ours: HashSet<&IpAddr> = e.rec.clients.iter().collect();
        clients.iter().filter(|c| ours.contains(c)).copied().collect()
    }

    /// The recorded verdict of hand-over `id`, if this agent recorded it with `volunteer`: a
    /// record of the same id with another volunteer means nothing was ever handed to this one.
    fn recorded(&self, volunteer: &str, id: u64) -> Option<Verdict> {
        self.records().get(id).map(|e| if e.rec.volunteer == volunteer { e.verdict } else { Verdict::Aborted })
    }

    /// The agent's own view after hand-over `rec` was decided from the rules: the clients it
    /// steers now, and those that came home.
    pub(super) fn after_rules(&self, rec: &Record, verdict: Verdict) {
        self.state().moved.decided(rec, verdict, Instant::now());
    }

    /// At start: the hand-overs a previous run left undecided are decided from the rules (for
    /// all their clients, from their records), then ended like any other.
    pub(super) async fn finish_unfinished(self: Arc<Self>) {
        let unfinished = self.records().unfinished();
        for rec in unfinished {
            info!(sibling = %rec.volunteer, id = rec.id, dir = ?rec.dir, clients = rec.clients.len(), "a hand-over the previous run left undecided: the kernel's rules decide it");
            self.end_from_rules(rec, Stage::Restart, "decided after a restart, from the rules").await;
        }
    }

    /// Leaving, out of time: of the hand-overs `ids` the leaving started, those still undecided
    /// (their futures were just dropped half way) are decided from the rules and ended like any
    /// other, so that no volunteer keeps their sessions frozen with no origin left to ask. What
    /// cannot be decided within [`LAST_DECISIONS`] stays recorded for the next agent.
    pub(super) async fn end_cut_short(self: &Arc<Self>, ids: &[u64]) {
        let cut: Vec<Arc<Record>> = self.records().unfinished().into_iter().filter(|r| ids.contains(&r.id)).collect();
        let deadline = tokio::time::Instant::now() + LAST_DECISIONS;
        for rec in cut {
            warn!(sibling = %rec.volunteer, id = rec.id, dir = ?rec.dir, clients = rec.clients.len(), "this agent is out of time to finish a hand-over: the kernel's rules decide it");
            let (id, volunteer) = (rec.id, rec.volunteer.clone());
            let ended = self.end_from_rules(rec, Stage::Exit, "the agent ran out of time to finish it as it stopped");
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                error!(id, "cannot decide the hand-over before exiting: the next agent decides it from its record");
                return;
            }
            // Connections coming home, frozen here: they go on where the verdict left them.
            let thawed = self.thaw_cut_short(&volunteer, id).await;
            if thawed > 0 {
                info!(sibling = %volunteer, id, connections = thawed, "thawed the connections of the hand-over cut short");
            }
        }
    }

    /// Decides hand-over `rec` from the rules, then ends it (`conclude`: everyone is told),
    /// aborted at `stage` for `why` if the rules say so.
    async fn end_from_rules(self: &Arc<Self>, rec: Arc<Record>, stage: Stage, why: &str) {
        self.state().hold(rec.clients.iter().copied());
        let h = Handover::new(rec.clone(), Busy::new(self.clone(), rec.clients.clone()), Instant::now());
        let verdict = self.decide_until_done(&h.rec).await;
        self.after_rules(&h.rec, verdict);
        let end = if verdict == Verdict::Committed { End::Committed } else { End::Aborted(stage, why.into()) };
        self.conclude(h, end).await;
    }

    /// Applications registering: their unfinished hand-overs are decided before they get any
    /// request.
    pub(super) async fn registrations(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Registration>) {
        while let Some(r) = rx.recv().await {
            for p in r.pending {
                self.resolve_pending(r.service, p).await;
            }
            let _ = r.done.send(());
        }
    }

    /// The application of `service` reports hand-over `p` unfinished. This node is its origin
    /// (an export out, an import back): the record or the rules say how it ended. Or its
    /// volunteer (an import out, an export back): the origin is asked until it knows.
    async fn resolve_pending(self: &Arc<Self>, service: SocketAddr, p: PendingHandoff) {
        let Ok(HandoffId { origin, id, volunteer }) = p.handoff.parse::<HandoffId>() else {
            warn!(%service, handoff = p.handoff, "the application reports an unfinished hand-over this agent cannot have asked for (not ORIGIN/ID/VOLUNTEER): left unfinished");
            return;
        };
        if self.apps.owes(service, &p.handoff).is_some() {
            return;
        }
        let node = self.cfg.node.as_str();
        if origin == node {
            let dir = if p.role == Role::Export { Dir::Out } else { Dir::Back };
            let entry = self.records().get(id).map(|e| (e.verdict, e.rec.volunteer == volunteer.as_str()));
            if entry == Some((Verdict::Pending, true)) {
                info!(%service, handoff = p.handoff, "the application reports a hand-over still in progress: it is told when it ends");
                self.settle_when_decided(service, p, id, volunteer);
            } else {
                let verdict = self.verdict_of(&volunteer, id, dir, &p.clients).await;
                if verdict == Verdict::Pending {
                    error!(%service, handoff = p.handoff, "cannot decide an unfinished hand-over now: its clients stay frozen until the application registers again");
                    return;
                }
                info!(%service, handoff = p.handoff, ?verdict, "the application reports a hand-over it did not see end: telling it");
                let clients = self.recorded_clients(&volunteer, id, &p.clients);
                self.settle_app(service, p.handoff, clients, verdict == Verdict::Committed);
            }
        } else if volunteer == node {
            self.ask_origin_later(service, &origin, id, p);
        } else {
            warn!(%service, handoff = p.handoff, "the application reports a hand-over between two other nodes ({origin}, {volunteer}): left unfinished");
        }
    }

    /// Tells the application of `service` how hand-over `id` ended once it is decided.
    fn settle_when_decided(self: &Arc<Self>, service: SocketAddr, p: PendingHandoff, id: u64, volunteer: NodeName) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let v = me.records().get(id).map_or(Verdict::Aborted, |e| e.verdict);
                if v != Verdict::Pending {
                    let clients = me.recorded_clients(volunteer.as_str(), id, &p.clients);
                    me.settle_app(service, p.handoff, clients, v == Verdict::Committed);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }

    /// Volunteer: the application of `service` took part in hand-over (`origin`, `id`) and never
    /// heard how it ended: the origin is asked (again and again until it knows).
    fn ask_origin_later(self: &Arc<Self>, service: SocketAddr, origin: &str, id: u64, p: PendingHandoff) {
        if self.sibling(origin).is_none() {
            warn!(%service, handoff = p.handoff, "the application reports an unfinished hand-over with {origin}, not a sibling: cannot ask it, left unfinished");
            return;
        }
        let mut st = self.state();
        if st.volunteer.knows(origin, id, service) {
            return;
        }
        info!(%service, handoff = p.handoff, clients = p.clients.len(), "the application reports an unfinished hand-over: asking {origin} how it ended");
        // Its clients stay in this hand-over until it ends: an export's are frozen here, and an
        // import's tentative sessions must not be replaced by another transfer of them.
        st.hold(p.clients.iter().copied());
        let acked = Acked { holds: p.role == Role::Import, ..Acked::new(vec![service], p.handoff, p.role, p.clients, Instant::now()) };
        st.volunteer.acked.insert((NodeName::from(origin), id), acked);
    }
}

/// Of `clients`, those a judgement counts as the hand-over's (their rules say its verdict), and
/// those it does not (their rules would have to change).
fn counted(clients: &[IpAddr], j: &Judgement) -> (Vec<IpAddr>, Vec<IpAddr>) {
    clients.iter().partition(|c| !j.to_fix.contains(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(c: &str, to: &str, state: RuleState) -> RuleInfo {
        RuleInfo { prefix: host_prefix(c.parse().unwrap()), target: to.parse().unwrap(), state, drain_left_ms: 0, since_unix: 0 }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_active_rules_to_the_volunteer_say_a_hand_over_out_committed() {
        let b = [ip("198.18.0.2"), ip("2001:db8::2")];
        let c: Vec<IpAddr> = ["198.18.1.1", "198.18.1.2", "2001:db8:1::1"].iter().map(|s| ip(s)).collect();
        // The IPv4 rules went in, the agent died before the IPv6 one: committed, complete it.
        let half = [rule("198.18.1.1", "198.18.0.2", RuleState::Active), rule("198.18.1.2", "198.18.0.2", RuleState::Active)];
        assert_eq!(judge(Dir::Out, &half, &b, &c), Judgement { verdict: Verdict::Committed, to_fix: vec![c[2]] });
        // A draining rule to the volunteer (a client that came home before) keeps new
        // connections home: not steered, so not committed.
        let draining = [rule("198.18.1.1", "198.18.0.2", RuleState::Draining)];
        assert_eq!(judge(Dir::Out, &draining, &b, &c).verdict, Verdict::Aborted);
        // Rules to another node, prefix rules and drained rules say nothing of this one.
        let other = [rule("198.18.1.1", "198.18.0.3", RuleState::Active), rule("198.18.1.4", "198.18.0.2", RuleState::Drained)];
        assert_eq!(judge(Dir::Out, &other, &b, &c), Judgement { verdict: Verdict::Aborted, to_fix: vec![] });
        let wide = RuleInfo { prefix: "198.18.1.0/24".parse().unwrap(), ..rule("198.18.1.1", "198.18.0.2", RuleState::Active) };
        assert_eq!(judge(Dir::Out, &[wide], &b, &c).verdict, Verdict::Aborted);
        assert_eq!(judge(Dir::Out, &half, &b, &[]).verdict, Verdict::Aborted, "a hand-over of nobody never committed");
    }

    #[test]
    fn a_hand_back_is_committed_once_any_of_its_rules_was_withdrawn() {
        let b = [ip("198.18.0.2"), ip("2001:db8::2")];
        let c: Vec<IpAddr> = ["198.18.1.1", "198.18.1.2", "2001:db8:1::1"].iter().map(|s| ip(s)).collect();
        let all =
            [rule("198.18.1.1", "198.18.0.2", RuleState::Active), rule("198.18.1.2", "198.18.0.2", RuleState::Active), rule("2001:db8:1::1", "2001:db8::2", RuleState::Active)];
        assert_eq!(judge(Dir::Back, &all, &b, &c), Judgement { verdict: Verdict::Aborted, to_fix: vec![] }, "nothing withdrawn: the clients stay");
        // The first rule drains (withdrawn), the agent died: committed, withdraw the rest.
        let half = [rule("198.18.1.1", "198.18.0.2", RuleState::Draining), all[1].clone(), all[2].clone()];
        assert_eq!(judge(Dir::Back, &half, &b, &c), Judgement { verdict: Verdict::Committed, to_fix: vec![c[1], c[2]] });
        assert_eq!(judge(Dir::Back, &[], &b, &c), Judgement { verdict: Verdict::Committed, to_fix: vec![] }, "rules gone: they are home");
    }
}
