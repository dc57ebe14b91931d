//! The origin side: watching the load, shedding (negotiation, hand-over, rules). One log line
//! per decision says why: what starts a round, which clients it picks and the load it expects
//! after, every offer taken or not needed, the clients no offer fits, why a round moved
//! nothing and how long until the next.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::bail;
use tracing::{debug, info, warn};

use super::{
    Agent, flat,
    handoff::{Busy, names},
    pick_clients, policy,
    state::{Picked, Seen},
};
use crate::{
    datapath::Load,
    peer::{Answer, Request, Said},
};

/// The clients of a round that may move ([`Agent::movable`]).
struct Movable {
    /// Address and connections.
    clients: Vec<(IpAddr, u64)>,
    /// Those that may only go to one sibling: the one their rule drains to.
    bound: HashMap<IpAddr, String>,
    /// Holds them busy until the round ends.
    busy: Busy,
}

impl Agent {
    /// Waits for the kernel's reports of the load crossing the armed watermark and wakes the
    /// load loop at once: a round starts from the crossing itself, not from the next poll.
    pub(super) async fn load_events(self: Arc<Self>) {
        let events = match flat(self.with_reader(|d| d.take_load_events()).await) {
            Ok(e) => e,
            Err(e) => return warn!("no load events from the kernel (the 50 ms poll still sees the load): {e}"),
        };
        super::ring::each_time_readable("the load events", events, |events| {
            let mut last = None;
            while let Some(ev) = events.next_event() {
                last = Some(ev);
            }
            if let Some(ev) = last {
                debug!(total = ev.total, "the kernel reports the load over the armed watermark");
                self.state().rounds.crossed(ev.at_ns);
                self.load_wake.notify_one();
            }
        })
        .await;
    }

    pub(super) async fn load_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The kernel watermark last armed (it disarms itself when it reports).
        let mut armed: Option<u64> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.load_wake.notified() => armed = None,
            }
            let load = match flat(self.with_reader(|d| d.load()).await) {
                Ok(l) => l,
                Err(e) => {
                    warn!("reading the load: {e}");
                    continue;
                }
            };
            let (decision, arm) = {
                let mut st = self.state();
                let now = Instant::now();
                let here: HashMap<IpAddr, u64> = load.clients.iter().copied().collect();
                st.volunteer.observe(&here, now);
                // Connections of moved clients still here end where they are, as do those of
                // clients given back to their origin: not load to shed. Those of adopted
                // clients are load this node cannot shed.
                let staying = st.staying(&load);
                let projected = load.total.saturating_sub(staying);
                st.load = load.clone();
                let leaving = st.leaving;
                // A drained node sheds everything it can and takes nothing home: both its
                // watermarks are zero.
                let drained = st.drained.is_some();
                let (low, high) = if drained { (0, 0) } else { (self.cfg.low_watermark, self.cfg.high_watermark) };
                // Members looking for room see this node's: none while it drains or leaves.
                self.publish_load(load.total, if leaving { 0 } else { high });
                let Seen { start, over } = st.rounds.see(projected, low, high, leaving, now);
                // Under low for long enough: clients come home, as many as keep it under low.
                let home_after = Duration::from_secs(self.cfg.home_after_secs);
                if !start && !leaving && !drained && !st.moved.clients.is_empty() && st.rounds.home_due(home_after, now) {
                    let moved: Vec<(IpAddr, u64)> = st.moved.clients.values().filter(|m| !st.busy.contains(&m.client)).map(|m| (m.client, m.connections)).collect();
                    let home = policy::pick_home(&moved, projected, self.cfg.low_watermark);
                    if !home.is_empty() {
                        let by = st.moved.by_volunteer_of(home);
                        info!(
                            load = load.total,
                            projected,
                            low = self.cfg.low_watermark,
                            after_secs = home_after.as_secs(),
                            "under the low watermark for long enough: taking clients home"
                        );
                        for (to, clients) in by {
                            let me = self.clone();
                            tokio::spawn(async move { me.take_home(&to, clients, "this node has room again", false).await });
                        }
                    }
                }
                // The crossing a round starts from: the kernel's report, or now.
                let crossing = start.then(|| st.rounds.begin(crate::datapath::monotonic_ns()));
                // Armed at the total where the load this node can shed passes high.
                let at = self.cfg.high_watermark.saturating_add(staying);
                let arm = (!st.rounds.negotiating && armed != Some(at)).then_some(at);
                (crossing.map(|c| (projected, over, c, low, drained)), arm)
            };
            if let Some(at) = arm {
                match flat(self.with_reader(move |dp| dp.arm_load_event(at)).await) {
                    Ok(()) => armed = Some(at),
                    Err(e) => warn!("arming the kernel's load watermark: {e}"),
                }
            }
            if let Some((projected, over, crossing, low, drained)) = decision {
                armed = None;
                let why = match (drained, over) {
                    (true, _) => "drained (`redirector drain`), clients still here",
                    (false, true) => "over the high watermark",
                    (false, false) => "still above the low watermark after the last round (hysteresis down to low)",
                };
                info!(load = load.total, projected, high = self.cfg.high_watermark, low = self.cfg.low_watermark, "{why}: asking siblings for help");
                tokio::spawn(self.clone().round(load, projected, low, crossing));
            }
        }
    }

    /// One shedding round down to `low`, then the pause before the next: short after moves,
    /// growing after rounds that moved nothing (no sibling had room, nothing to move).
    async fn round(self: Arc<Self>, load: Load, projected: u64, low: u64, crossing_ns: u64) {
        let t0 = Instant::now();
        let moved = match self.clone().shed(&load, projected, low).await {
            Ok(n) => {
                let ms = t0.elapsed().as_secs_f64() * 1000.0;
                // Threshold crossing (the kernel's clock) to the round's rules installed.
                let steered_ms = self.state().rounds.shed(n, crossing_ns);
                info!(moved = n, round_ms = format!("{ms:.1}"), crossing_to_rules_ms = steered_ms.map(|m| format!("{m:.1}")), "shedding done");
                n
            }
            Err(e) => {
                self.state().rounds.last_round = Some(format!("moved nothing: {e:#}"));
                0
            }
        };
        // Let the moved clients' connections drain before deciding again; until 2 s later, a
        // load still above the low watermark keeps shedding.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let wait = {
            let mut b = self.round_backoff.lock().expect("backoff lock");
            if moved > 0 {
                b.reset();
                None
            } else {
                Some(b.next_wait())
            }
        };
        let reason = self.state().rounds.last_round.clone().unwrap_or_default();
        if let Some(w) = wait {
            info!(next_in_ms = w.as_millis(), "shedding round {reason}; backing off");
        }
        self.state().rounds.end(wait, Instant::now());
    }

    /// The siblings to ask for room for `picked`, linked (`to`: that one only). Static: every
    /// reachable sibling; gossip: a sample of the members with room.
    async fn whom_to_ask(self: &Arc<Self>, picked: &[(IpAddr, u64)], to: Option<&str>) -> anyhow::Result<Vec<String>> {
        if let Some(to) = to
            && self.sibling(to).is_none()
        {
            let known: Vec<String> = self.siblings().into_iter().map(|s| s.name).collect();
            bail!("{to} is not a sibling of this node (its siblings: {})", known.join(", "));
        }
        let mut siblings = if self.cfg.cluster.gossip() {
            let need = picked.iter().fold(0u64, |s, c| s.saturating_add(policy::weight(c.1)));
            self.ask_whom(need, to).await
        } else {
            self.live_siblings()
        };
        if let Some(to) = to {
            siblings.retain(|s| s == to);
            if siblings.is_empty() {
                bail!("sibling {to} is not reachable now (no link, or no heartbeat for liveness_ms)");
            }
        }
        if siblings.is_empty() {
            bail!("no live sibling to ask");
        }
        Ok(siblings)
    }

    fn live_siblings(&self) -> Vec<String> {
        let st = self.state();
        let live = Duration::from_millis(self.cfg.liveness_ms);
        self.cfg.siblings.iter().filter(|s| st.links.reachable(&s.name, live)).map(|s| s.name.clone()).collect()
    }

    /// Sheds load down to `low`: clients adopted from siblings are given back to their
    /// origins first (this node cannot steer them itself: their traffic comes through the
    /// origin's tunnel), then its own clients move to siblings with room. Returns the clients
    /// given back and moved.
    async fn shed(self: Arc<Self>, load: &Load, projected: u64, low: u64) -> anyhow::Result<usize> {
        let (candidates, held, adopted, origin_of) = {
            let st = self.state();
            // Only clients that may move now are picked: one that may not (it just moved, is
            // in a hand-over, or its rule drains to a volunteer) would take the place of one
            // that may, and a round of them moves nothing.
            let Picked { rest: candidates, recent, in_handoff, draining, .. } = st.sort_picked(load.clients.clone(), Instant::now());
            let held = recent.len() + in_handoff.len() + draining.len();
            let adopted: Vec<(IpAddr, u64)> = load.clients.iter().filter(|(a, _)| st.volunteer.adopted.contains_key(a) && !st.busy.contains(a)).copied().collect();
            let origin_of: HashMap<IpAddr, String> = adopted.iter().filter_map(|(a, _)| Some((*a, st.volunteer.adopted.get(a)?.from.clone()))).collect();
            (candidates, held, adopted, origin_of)
        };
        let give = pick_clients(&adopted, projected, low);
        let mut given = 0;
        let mut projected = projected;
        if !give.is_empty() {
            let connections: u64 = give.iter().map(|c| c.1).sum();
            info!(
                clients = give.len(),
                connections,
                projected,
                low,
                "shedding with clients adopted from siblings: giving the largest back to their origins first: {}",
                names(&give)
            );
            let mut by: HashMap<String, Vec<IpAddr>> = HashMap::new();
            for (c, _) in &give {
                if let Some(o) = origin_of.get(c) {
                    by.entry(o.clone()).or_default().push(*c);
                }
            }
            let asks = by.into_iter().map(|(origin, clients)| {
                let me = self.clone();
                async move {
                    if let Err(e) = me.give_back(&origin, clients).await {
                        warn!(origin, "cannot give clients back: {e:#}");
                    }
                }
            });
            futures::future::join_all(asks).await;
            let still: HashSet<IpAddr> = self.state().volunteer.adopted.keys().copied().collect();
            for (c, n) in &give {
                if !still.contains(c) {
                    given += 1;
                    projected = projected.saturating_sub(*n);
                }
            }
            info!(given, asked = give.len(), "adopted clients given back");
            if projected <= low {
                return Ok(given);
            }
        }
        let picked = pick_clients(&candidates, projected, low);
        if picked.is_empty() {
            if given > 0 {
                return Ok(given);
            }
            let adopted_load: u64 = adopted.iter().map(|c| c.1).sum();
            bail!(
                "nothing to move: {held} clients may not move yet (they just moved, are in a hand-over, or their rule drains to a volunteer), and the {adopted_load} connections of clients adopted from siblings could not be given back"
            );
        }
        let connections: u64 = picked.iter().map(|c| c.1).sum();
        info!(clients = picked.len(), connections, projected, after = projected.saturating_sub(connections), low, "picked the largest clients to move: {}", names(&picked));
        Ok(given + self.move_clients(picked, None).await?)
    }

    /// Of `picked`, the clients that may move now, marked busy (freed when the guard drops),
    /// and those of them bound to one sibling: never adopted clients, never clients whose
    /// last hand-over has not ended, and never clients of a family whose service keeps
    /// sessions while no application is registered for it (they would lose their sessions).
    /// A client whose rule still drains to the volunteer it came home from may only go back
    /// to that one (the kernel refuses another target until the drain ends).
    fn movable(self: &Arc<Self>, picked: Vec<(IpAddr, u64)>) -> anyhow::Result<Movable> {
        let blocked: Vec<SocketAddr> = self.cfg.services.iter().filter(|s| s.sessions && !self.apps.has(s.address)).map(|s| s.address).collect();
        let mut st = self.state();
        let Picked { adopted, recent, moved, in_handoff, draining, rest } = st.sort_picked(picked, Instant::now());
        if !adopted.is_empty() {
            info!(
                clients = adopted.len(),
                "not moving clients adopted from siblings (their traffic comes through the sibling's tunnel; they can be given back): {}",
                names(&adopted)
            );
        }
        if !recent.is_empty() {
            info!(
                clients = recent.len(),
                "not moving clients that moved less than {} s ago (their waiting requests are answered first): {}",
                super::MOVE_DWELL.as_secs(),
                names(&recent)
            );
        }
        if !moved.is_empty() {
            info!(clients = moved.len(), "not moving clients already moved out (give them back first): {}", names(&moved));
        }
        if !in_handoff.is_empty() {
            info!(clients = in_handoff.len(), "not moving clients whose previous hand-over has not ended (an application has not confirmed it yet): {}", names(&in_handoff));
        }
        let mut bound = HashMap::new();
        let mut rest = rest;
        if !draining.is_empty() {
            info!(
                clients = draining.len(),
                drain_secs = self.cfg.drain_secs,
                "clients that came home while their rule drains (their open connections end on the volunteer first) may only go back to that volunteer: {}",
                names(&draining)
            );
            for (a, n) in draining {
                if let Some(to) = st.moved.drains_to(&a) {
                    bound.insert(a, to.to_string());
                    rest.push((a, n));
                }
            }
        }
        let (waiting, rest): (Vec<_>, Vec<_>) = rest.into_iter().partition(|(a, _)| blocked.iter().any(|s| s.is_ipv4() == a.is_ipv4()));
        if !waiting.is_empty() {
            let services: Vec<String> = blocked.iter().map(ToString::to_string).collect();
            warn!(
                clients = waiting.len(),
                "not moving clients of {}: it keeps sessions (sessions = true) and no application is registered for it on the hook ({}); they would lose their sessions",
                services.join(", "),
                self.cfg.app_socket().display()
            );
            if rest.is_empty() {
                bail!("nothing can move: {} keeps sessions and no application is registered for it", services.join(", "));
            }
        }
        st.hold(rest.iter().map(|c| c.0));
        let busy = Busy::new(self.clone(), rest.iter().map(|c| c.0).collect());
        Ok(Movable { clients: rest, bound, busy })
    }

    /// Moves `picked` clients (address, connections) to siblings with room (`to`: to that
    /// one only): negotiation, hand-over, rules. Also the admin socket's `move` request (never
    /// an adopted client, nor one already moved out).
    pub async fn move_clients(self: Arc<Self>, picked: Vec<(IpAddr, u64)>, to: Option<&str>) -> anyhow::Result<usize> {
        let siblings = self.whom_to_ask(&picked, to).await?;
        let Movable { clients: picked, bound, mut busy } = self.movable(picked)?;
        if picked.is_empty() {
            bail!("no client left to move");
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let timeout = Duration::from_millis(self.cfg.negotiate_timeout_ms);
        // A client moves only between control addresses of its own family, on both sides.
        let known: HashMap<String, crate::config::Sibling> = siblings.iter().filter_map(|n| Some((n.clone(), self.sibling(n)?))).collect();
        let families = |name: &str| {
            let s = known.get(name);
            let can = |v4: bool| {
                let probe = if v4 { IpAddr::from([0, 0, 0, 0]) } else { IpAddr::from([0u16; 8]) };
                self.cfg.control_address(probe).is_some() && s.is_some_and(|s| s.control_address(probe).is_some())
            };
            (can(true), can(false))
        };
        let takes = |f: (bool, bool), a: IpAddr| if a.is_ipv4() { f.0 } else { f.1 };
        let may_go = |s: &str, a: &IpAddr| bound.get(a).is_none_or(|b| b == s);
        let stranded: Vec<(IpAddr, u64)> = picked.iter().filter(|(a, _)| !siblings.iter().any(|s| takes(families(s), *a) && may_go(s, a))).copied().collect();
        if !stranded.is_empty() {
            info!(
                clients = stranded.len(),
                "skipping clients no sibling asked can take: no control address of their family on both sides (dual_stack_address), or their rule drains to another: {}",
                names(&stranded)
            );
        }
        let asks = siblings.iter().filter_map(|n| {
            let f = families(n);
            let mine: Vec<&(IpAddr, u64)> = picked.iter().filter(|(a, _)| takes(f, *a) && may_go(n, a)).collect();
            if mine.is_empty() {
                return None;
            }
            let need = mine.iter().fold(0u64, |s, c| s.saturating_add(policy::weight(c.1)));
            let req = Request::HelpRequest { id, connections: need, clients: u32::try_from(mine.len()).unwrap_or(u32::MAX) };
            let me = self.clone();
            let n = n.clone();
            Some(async move { (n.clone(), need, f, me.ask(&n, req, id, timeout).await) })
        });
        let answers = futures::future::join_all(asks).await;
        let mut offers: Vec<policy::Offer> = Vec::new();
        let (mut declined, mut silent) = (0, 0);
        for (name, need, families, a) in answers {
            match a {
                // Never plan with more than was asked, whatever a peer says.
                Ok(Answer::Offer { capacity, .. }) if capacity > 0 => offers.push(policy::Offer { sibling: name, capacity: capacity.min(need), families }),
                Ok(Answer::Decline { reason, .. }) => {
                    declined += 1;
                    info!(sibling = %name, "declined: {}", Said(&reason));
                }
                Ok(other) => {
                    silent += 1;
                    warn!(sibling = %name, "unexpected answer: {}", other.what());
                }
                Err(e) => {
                    silent += 1;
                    warn!(sibling = %name, "no offer: {e:#}");
                }
            }
        }
        if offers.is_empty() {
            bail!("no sibling offered room ({declined} declined, {silent} did not answer)");
        }
        let plan = policy::plan(&picked, &offers, &bound);
        for o in &offers {
            if let Some(c) = plan.moves.get(&o.sibling) {
                let n: u64 = c.iter().map(|m| policy::weight(m.connections)).sum();
                info!(sibling = %o.sibling, offered = o.capacity, clients = c.len(), connections = n, "offer taken");
            } else {
                info!(sibling = %o.sibling, offered = o.capacity, "offer not needed: the other offers took every client that fits");
                let _ = self.send_to(&o.sibling, Request::Abort { id, reason: "offer not needed".into() }).await;
            }
        }
        if !plan.unplaced.is_empty() {
            info!(clients = plan.unplaced.len(), "no offer fits these clients, they stay: {}", names(&plan.unplaced));
        }
        // Each transfer frees its own clients when it ends; the others are free now.
        let planned: HashSet<IpAddr> = plan.moves.values().flatten().map(|m| m.addr).collect();
        busy.keep_only(&planned);
        let _ = busy.take();
        let transfers = plan.moves.into_iter().map(|(name, clients)| {
            let me = self.clone();
            async move { me.transfer(&name, id, clients, timeout).await }
        });
        let moved: usize = futures::future::join_all(transfers).await.into_iter().sum();
        self.state().rounds.last_round = Some(if moved > 0 { format!("moved {moved} client(s)") } else { "moved nothing: every hand-over failed".to_string() });
        Ok(moved)
    }
}
