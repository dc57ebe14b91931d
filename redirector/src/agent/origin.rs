//! The origin side: watching the load, shedding (negotiation, hand-over, rules). One log line
//! per decision says why: what starts a round, which clients it picks and the load it expects
//! after, every offer taken or not needed, the clients no offer fits, why a round moved
//! nothing and how long until the next.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail};
use tracing::{debug, info, warn};

use super::{Agent, MigratedOut, family, host_prefix, pick_clients, policy, unix_now};
use crate::{
    datapath::{Datapath, Load, Prefix},
    peer::{self, MovedClient, Msg, SessionBlob},
};

/// At most this many clients are named in one log line.
const NAMED: usize = 16;

fn names(clients: &[(IpAddr, u64)]) -> String {
    let mut s: Vec<String> = clients.iter().take(NAMED).map(|(a, n)| format!("{a}({n})")).collect();
    if clients.len() > NAMED {
        s.push(format!("and {} more", clients.len() - NAMED));
    }
    s.join(" ")
}

impl Agent {
    /// Waits for the kernel's reports of the load crossing the armed watermark and wakes the
    /// load loop at once: a round starts from the crossing itself, not from the next poll.
    pub(super) async fn load_events(self: Arc<Self>) {
        let events = match self.with_reader(Datapath::take_load_events).await {
            Ok(Ok(e)) => e,
            Ok(Err(e)) => return warn!("no load events from the kernel (the 50 ms poll still sees the load): {e}"),
            Err(e) => return warn!("no load events from the kernel (the 50 ms poll still sees the load): {e:#}"),
        };
        // SAFETY: `LoadEvents` owns its ring buffer's fd for its whole life and always returns
        // that same fd; the AsyncFd owns the `LoadEvents`.
        let mut fd = match unsafe { tokio::io::unix::AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) } {
            Ok(fd) => fd,
            Err(e) => return warn!("watching the load events: {e}"),
        };
        loop {
            let Ok(mut ready) = fd.readable_mut().await else { return };
            let mut last = None;
            while let Some(ev) = ready.get_inner_mut().next_event() {
                last = Some(ev);
            }
            ready.clear_ready();
            if let Some(ev) = last {
                debug!(total = ev.total, "the kernel reports the load over the armed watermark");
                self.state().crossing_ns = Some(ev.at_ns);
                self.load_wake.notify_one();
            }
        }
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
            let load = match self.with_reader(Datapath::load).await {
                Ok(Ok(l)) => l,
                Ok(Err(e)) => {
                    warn!("reading the load: {e}");
                    continue;
                }
                Err(e) => {
                    warn!("reading the load: {e:#}");
                    continue;
                }
            };
            let (decision, arm) = {
                let mut st = self.state();
                let now = Instant::now();
                let here: HashMap<IpAddr, u64> = load.clients.iter().copied().collect();
                for (c, a) in &mut st.adopted {
                    a.connections = here.get(c).copied().unwrap_or(0);
                    if a.connections > 0 {
                        a.arrived = true;
                        a.last_seen = now;
                    }
                }
                // Connections of moved clients still here end where they are: not load to
                // shed. Those of adopted clients are load this node cannot shed.
                let staying: u64 = load.clients.iter().filter(|(a, _)| st.migrated.contains_key(a)).map(|c| c.1).sum();
                let projected = load.total.saturating_sub(staying);
                st.load = load.clone();
                if projected <= self.cfg.low_watermark {
                    st.shed_until = None;
                }
                let over = projected > self.cfg.high_watermark;
                let continuing = projected > self.cfg.low_watermark && st.shed_until.is_some_and(|t| now < t);
                let waiting = st.backoff_until.is_some_and(|t| now < t);
                let start = !st.negotiating && !waiting && (over || continuing);
                // The crossing a round starts from: the kernel's report, or now.
                let crossing = if start {
                    st.negotiating = true;
                    let now_ns = crate::datapath::monotonic_ns();
                    Some(st.crossing_ns.take().filter(|c| now_ns.saturating_sub(*c) < 1_000_000_000).unwrap_or(now_ns))
                } else {
                    None
                };
                // Armed at the total where the load this node can shed passes high.
                let at = self.cfg.high_watermark.saturating_add(staying);
                let arm = (!st.negotiating && armed != Some(at)).then_some(at);
                (crossing.map(|c| (projected, over, c)), arm)
            };
            if let Some(at) = arm {
                match self.with_reader(move |dp| dp.arm_load_event(at)).await {
                    Ok(Ok(())) => armed = Some(at),
                    Ok(Err(e)) => warn!("arming the kernel's load watermark: {e}"),
                    Err(e) => warn!("arming the kernel's load watermark: {e:#}"),
                }
            }
            if let Some((projected, over, crossing)) = decision {
                armed = None;
                let why = if over {
                    "over the high watermark"
                } else {
                    "still above the low watermark after the last round (hysteresis down to low)"
                };
                info!(load = load.total, projected, high = self.cfg.high_watermark, low = self.cfg.low_watermark, "{why}: asking siblings for help");
                tokio::spawn(self.clone().round(load, projected, crossing));
            }
        }
    }

    /// One shedding round, then the pause before the next: short after moves, growing after
    /// rounds that moved nothing (no sibling had room, nothing to move).
    async fn round(self: Arc<Self>, load: Load, projected: u64, crossing_ns: u64) {
        let t0 = Instant::now();
        let moved = match self.clone().shed(&load, projected).await {
            Ok(n) => {
                let ms = t0.elapsed().as_secs_f64() * 1000.0;
                let mut st = self.state();
                // Threshold crossing (the kernel's clock) to the round's rules installed.
                #[expect(clippy::cast_precision_loss, reason = "nanoseconds of a round")]
                let steered_ms = st.rules_installed_ns.map(|r| r.saturating_sub(crossing_ns) as f64 / 1e6);
                info!(moved = n, round_ms = format!("{ms:.1}"), crossing_to_rules_ms = steered_ms.map(|m| format!("{m:.1}")), "shedding done");
                if n > 0 {
                    st.last_shed_ms = steered_ms;
                }
                n
            }
            Err(e) => {
                self.state().last_round = Some(format!("moved nothing: {e:#}"));
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
        let reason = self.state().last_round.clone().unwrap_or_default();
        if let Some(w) = wait {
            info!(next_in_ms = w.as_millis(), "shedding round {reason}; backing off");
        }
        let mut st = self.state();
        st.negotiating = false;
        st.shed_until = Some(Instant::now() + Duration::from_secs(2));
        st.backoff_until = wait.map(|w| Instant::now() + w);
    }

    fn live_siblings(&self) -> Vec<String> {
        let st = self.state();
        let live = Duration::from_millis(self.cfg.liveness_ms);
        self.cfg
            .siblings
            .iter()
            .filter(|s| st.siblings.get(&s.name).is_some_and(|x| x.out.is_some() && x.last_seen.is_some_and(|t| t.elapsed() < live)))
            .map(|s| s.name.clone())
            .collect()
    }

    /// Picks clients to shed (never adopted ones: their traffic comes through a sibling's
    /// tunnel, this node cannot steer them) and moves them. Returns clients moved.
    async fn shed(self: Arc<Self>, load: &Load, projected: u64) -> anyhow::Result<usize> {
        let (candidates, adopted_load) = {
            let st = self.state();
            let candidates: Vec<(IpAddr, u64)> = load.clients.iter().filter(|(a, _)| !st.migrated.contains_key(a) && !st.adopted.contains_key(a)).copied().collect();
            let adopted: u64 = load.clients.iter().filter(|(a, _)| st.adopted.contains_key(a)).map(|c| c.1).sum();
            (candidates, adopted)
        };
        let picked = pick_clients(&candidates, projected, self.cfg.low_watermark);
        if picked.is_empty() {
            bail!("nothing to move: the {adopted_load} connections of clients adopted from siblings cannot be shed from here");
        }
        let connections: u64 = picked.iter().map(|c| c.1).sum();
        info!(
            clients = picked.len(),
            connections,
            projected,
            after = projected.saturating_sub(connections),
            low = self.cfg.low_watermark,
            adopted_here = adopted_load,
            "picked the largest clients to move: {}",
            names(&picked)
        );
        self.move_clients(picked).await
    }

    /// Moves `picked` clients (address, connections) to siblings with room: negotiation,
    /// hand-over, rules. Also the admin socket's `move` request (which may move a moved
    /// client again, but never an adopted one).
    pub async fn move_clients(self: Arc<Self>, picked: Vec<(IpAddr, u64)>) -> anyhow::Result<usize> {
        let picked: Vec<(IpAddr, u64)> = {
            let st = self.state();
            let (adopted, rest): (Vec<_>, Vec<_>) = picked.into_iter().partition(|(a, _)| st.adopted.contains_key(a));
            if !adopted.is_empty() {
                info!(clients = adopted.len(), "not moving clients adopted from siblings (their traffic comes through the sibling's tunnel): {}", names(&adopted));
            }
            rest
        };
        if picked.is_empty() {
            bail!("no client left to move");
        }
        let siblings = self.live_siblings();
        if siblings.is_empty() {
            bail!("no live sibling to ask");
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let timeout = Duration::from_millis(self.cfg.negotiate_timeout_ms);
        // A client moves only between control addresses of its own family, on both sides.
        let families = |name: &str| {
            let s = self.cfg.siblings.iter().find(|s| s.name == name);
            let can = |v4: bool| {
                let probe = if v4 { IpAddr::from([0, 0, 0, 0]) } else { IpAddr::from([0u16; 8]) };
                self.cfg.control_address(probe).is_some() && s.is_some_and(|s| s.control_address(probe).is_some())
            };
            (can(true), can(false))
        };
        let takes = |f: (bool, bool), a: IpAddr| if a.is_ipv4() { f.0 } else { f.1 };
        let stranded: Vec<(IpAddr, u64)> = picked.iter().filter(|(a, _)| !siblings.iter().any(|s| takes(families(s), *a))).copied().collect();
        if !stranded.is_empty() {
            info!(clients = stranded.len(), "skipping clients no live sibling can take: no control address of their family on both sides (dual_stack_address): {}", names(&stranded));
        }
        let asks = siblings.iter().filter_map(|n| {
            let f = families(n);
            let mine: Vec<&(IpAddr, u64)> = picked.iter().filter(|(a, _)| takes(f, *a)).collect();
            if mine.is_empty() {
                return None;
            }
            let need = mine.iter().fold(0u64, |s, c| s.saturating_add(policy::weight(c.1)));
            let req = Msg::HelpRequest { id, connections: need, clients: u32::try_from(mine.len()).unwrap_or(u32::MAX) };
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
                Ok(Msg::Offer { capacity, .. }) if capacity > 0 => offers.push(policy::Offer { sibling: name, capacity: capacity.min(need), families }),
                Ok(Msg::Decline { reason, .. }) => {
                    declined += 1;
                    info!(sibling = %name, "declined: {reason}");
                }
                Ok(other) => {
                    silent += 1;
                    warn!(sibling = %name, "unexpected answer {other:?}");
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
        let plan = policy::plan(&picked, &offers);
        for o in &offers {
            if let Some(c) = plan.moves.get(&o.sibling) {
                let n: u64 = c.iter().map(|m| policy::weight(m.connections)).sum();
                info!(sibling = %o.sibling, offered = o.capacity, clients = c.len(), connections = n, "offer taken");
            } else {
                info!(sibling = %o.sibling, offered = o.capacity, "offer not needed: the other offers took every client that fits");
                let _ = self.send_to(&o.sibling, Msg::Abort { id, reason: "offer not needed".into() }).await;
            }
        }
        if !plan.unplaced.is_empty() {
            info!(clients = plan.unplaced.len(), "no offer fits these clients, they stay: {}", names(&plan.unplaced));
        }
        let transfers = plan.moves.into_iter().map(|(name, clients)| {
            let me = self.clone();
            async move { me.transfer(&name, id, clients, timeout).await }
        });
        let moved: usize = futures::future::join_all(transfers).await.into_iter().sum();
        self.state().last_round = Some(if moved > 0 {
            format!("moved {moved} client(s)")
        } else {
            "moved nothing: every hand-over failed".to_string()
        });
        Ok(moved)
    }

    /// Origin: one volunteer's share, two-phase. Export (sessions frozen in the application)
    /// -> Sessions + Clients + Transfer -> `TransferAck` -> rules installed -> commit; any
    /// failure before the rules are in place aborts everywhere (sessions unfrozen here, dropped
    /// there).
    async fn transfer(self: &Arc<Self>, name: &str, id: u64, clients: Vec<MovedClient>, timeout: Duration) -> usize {
        let handoff = format!("{}-{id}-{name}", self.cfg.node);
        let lim = self.limits();
        let t0 = Instant::now();
        let families: BTreeSet<bool> = clients.iter().map(|c| c.addr.is_ipv4()).collect();
        let services: Vec<SocketAddr> = self.cfg.services.iter().map(|s| s.address).filter(|s| families.contains(&s.is_ipv4())).collect();
        let tunnel_src: Vec<IpAddr> = self.cfg.control_addresses().into_iter().filter(|a| families.contains(&a.is_ipv4())).collect();
        let app_svc = services.iter().copied().find(|s| self.apps.has(*s));
        let mut sessions = Vec::new();
        if let Some(svc) = app_svc {
            let addrs: Vec<IpAddr> = clients.iter().map(|c| c.addr).collect();
            match self.apps.export(svc, &handoff, &addrs, lim).await {
                Ok(s) => sessions = s,
                Err(e) => {
                    warn!(sibling = %name, handoff, "export failed, hand-over aborted, nothing steered: {e:#}");
                    self.apps.finish(svc, &handoff, false, lim).await;
                    self.tell(name, &handoff, Msg::Abort { id, reason: format!("export failed: {e:#}") }).await;
                    return 0;
                }
            }
        }
        let abort = |why: String| {
            let me = self.clone();
            let name = name.to_string();
            let handoff = handoff.clone();
            async move {
                warn!(sibling = %name, handoff, "hand-over aborted, nothing steered: {why}");
                if let Some(svc) = app_svc {
                    me.apps.finish(svc, &handoff, false, lim).await;
                }
                me.tell(&name, &handoff, Msg::Abort { id, reason: why }).await;
            }
        };
        let t_export = t0.elapsed();
        // Session blobs and long client lists first, in frames under the peer limit.
        let n_sessions = sessions.len();
        let mut frames: Vec<Msg> = Vec::new();
        let budget = self.cfg.max_frame.saturating_sub(4096).max(1);
        let (mut chunk, mut size): (Vec<SessionBlob>, usize) = (Vec::new(), 0);
        for s in sessions {
            if size + s.blob.len() + 64 > budget && !chunk.is_empty() {
                frames.push(Msg::Sessions { id, sessions: std::mem::take(&mut chunk) });
                size = 0;
            }
            size += s.blob.len() + 64;
            chunk.push(s);
        }
        if !chunk.is_empty() {
            frames.push(Msg::Sessions { id, sessions: chunk });
        }
        let mut parts = peer::client_chunks(clients.clone(), &services, self.cfg.max_frame);
        let last = parts.pop().unwrap_or_default();
        frames.extend(parts.into_iter().map(|c| Msg::Clients { id, clients: c }));
        for f in frames {
            if let Err(e) = self.send_to(name, f).await {
                abort(format!("sending the transfer failed: {e:#}")).await;
                return 0;
            }
        }
        let msg = Msg::Transfer { id, services, tunnel_src, clients: last };
        match self.ask(name, msg, id, timeout).await {
            Ok(Msg::TransferAck { .. }) => {}
            Ok(Msg::Abort { reason, .. }) => {
                abort(format!("the volunteer refused: {reason}")).await;
                return 0;
            }
            Ok(other) => {
                abort(format!("unexpected answer {other:?}")).await;
                return 0;
            }
            Err(e) => {
                abort(format!("transfer failed: {e:#}")).await;
                return 0;
            }
        }
        let t_ack = t0.elapsed();
        let n = clients.len();
        if let Err(e) = self.steer(name, &clients).await {
            abort(format!("rules not installed: {e:#}")).await;
            return 0;
        }
        let t_steer = t0.elapsed();
        if let Some(svc) = app_svc {
            self.apps.finish(svc, &handoff, true, lim).await;
        }
        self.tell(name, &handoff, Msg::Commit { id }).await;
        info!(
            sibling = %name,
            handoff,
            clients = n,
            sessions = n_sessions,
            export_ms = t_export.as_millis(),
            acked_ms = t_ack.as_millis(),
            steered_ms = t_steer.as_millis(),
            committed_ms = t0.elapsed().as_millis(),
            "hand-over committed"
        );
        n
    }

    /// Installs the rules for clients a volunteer acknowledged: per family, one probe through
    /// the tunnel to the volunteer's control address of that family, then every rule; all or
    /// nothing.
    async fn steer(self: &Arc<Self>, name: &str, clients: &[MovedClient]) -> anyhow::Result<()> {
        let sib = self.cfg.siblings.iter().find(|s| s.name == name).ok_or_else(|| anyhow!("{name} is not a configured sibling"))?;
        let mut groups: Vec<(IpAddr, Vec<Prefix>)> = Vec::new();
        for v4 in [true, false] {
            let prefixes: Vec<Prefix> = clients.iter().filter(|c| c.addr.is_ipv4() == v4).map(|c| host_prefix(c.addr)).collect();
            if let Some(first) = prefixes.first() {
                let target = sib.control_address(first.addr).ok_or_else(|| anyhow!("{name} has no {} control address", family(first.addr)))?;
                groups.push((target, prefixes));
            }
        }
        self.with_dp(move |dp| {
            let mut done: Vec<Prefix> = Vec::new();
            for (target, prefixes) in groups {
                if let Err(e) = dp.migrate_many(&prefixes, target, Some(Duration::from_secs(1)), false) {
                    for p in done {
                        let _ = dp.release(p);
                    }
                    return Err(e);
                }
                done.extend(prefixes);
            }
            Ok(())
        })
        .await??;
        self.state().rules_installed_ns = Some(crate::datapath::monotonic_ns());
        if clients.len() > NAMED {
            info!(to = %name, clients = clients.len(), "clients moved");
        }
        let now = Instant::now();
        let mut before: HashMap<String, Vec<IpAddr>> = HashMap::new();
        {
            let mut st = self.state();
            for c in clients {
                if clients.len() <= NAMED {
                    info!(client = %c.addr, to = %name, connections = c.connections, "client moved");
                }
                let m = MigratedOut { client: c.addr, to: name.to_string(), since_unix: unix_now(), connections: c.connections, recorded: now };
                if let Some(old) = st.migrated.insert(c.addr, m).filter(|old| old.to != name) {
                    before.entry(old.to).or_default().push(c.addr);
                }
            }
        }
        // A client moved again (operator move) no longer needs room where it was.
        for (old, moved) in before {
            self.release(&old, moved).await;
        }
        Ok(())
    }
}
