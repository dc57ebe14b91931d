//! Connections coming home with their clients (a hand-back). The volunteer's applications
//! hand them over with their export; the volunteer names their flows right after `Returning`
//! (`Freeze`); the origin, whose classifier sees their packets first, freezes them (keeping
//! copies) and says which (`Frozen`); the volunteer dumps those and sends them after the
//! sessions (`Answer::Connections`, counted in `Sealed`); the origin restores them before it
//! withdraws its rules. Committed (the rules withdrawn), the origin takes them live, gives them
//! the kept packets (to its own stack) and thaws the flows; the volunteer closes its dumped
//! sockets without a word. Aborted, the restored sockets close, the kept packets go on to the
//! volunteer through the tunnel, and its dumped sockets resume.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::{ConnFrame, Flow, Freeze, Leaving, Opened, RestoredConn, arrive::go_live, canonical, deliver_here};
use crate::{
    agent::Agent,
    app::{AppConnection, Exported},
    peer::{self, Answer, NodeName, Request},
};

/// The connections of a hand-back, on the origin: their flows frozen here, then restored.
#[derive(Default)]
pub(in crate::agent) struct Homecoming {
    freeze: Freeze,
    restored: Vec<RestoredConn>,
    /// Kept packets of the restored flows, taken when the other frozen flows were let go.
    kept: Vec<Vec<u8>>,
}

fn wire(f: &Flow) -> peer::Flow {
    peer::Flow { client: f.0, service: f.1 }
}

fn from_wire(f: peer::Flow) -> Flow {
    (canonical(f.client), canonical(f.service))
}

impl Agent {
    /// Volunteer, hand-back `id` of origin `from`: the connections the applications handed over
    /// with `exports` are kept (to end with the hand-back); the origin is asked to freeze
    /// those that may move (`Freeze` on `reply`), and those it froze (`Frozen`) are dumped.
    /// An error: why the hand-back is refused (the connections end with it, given back).
    pub(in crate::agent) async fn leave_home(
        self: &Arc<Self>,
        from: &str,
        id: u64,
        handoff: &str,
        exports: &mut [(SocketAddr, Exported)],
        reply: &mpsc::Sender<Answer>,
    ) -> Result<(), String> {
        let mut leaving = Leaving::take(exports);
        let mut flows = if leaving.is_empty() { Vec::new() } else { leaving.flows(handoff) };
        let most = peer::flows_per_frame(self.cfg.max_frame);
        if flows.len() > most {
            warn!(origin = %from, handoff, connections = flows.len(), most, "more open connections than a frame names: the others stay");
            flows.truncate(most);
        }
        let key = (NodeName::from(from), id);
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pending();
            p.leaving.insert(key.clone(), leaving);
            if !flows.is_empty() {
                p.freezing.insert(key.clone(), tx);
            }
        }
        let sent = reply.send_timeout(Answer::Freeze { id, flows: flows.iter().map(wire).collect() }, self.send_deadline()).await;
        if sent.is_err() {
            self.pending().freezing.remove(&key);
            return Err("the link to the origin is gone or stuck".into());
        }
        if flows.is_empty() {
            return Ok(());
        }
        // The origin may have to open its packet copies first (they wait for the kernel's grace
        // period, which a busy host can stretch to seconds).
        let wait = Duration::from_millis(self.cfg.negotiate_timeout_ms).saturating_add(self.limits().timeout);
        let frozen = tokio::time::timeout(wait, rx).await;
        self.pending().freezing.remove(&key);
        let frozen: Vec<Flow> = match frozen {
            Ok(Ok(f)) => {
                let asked: HashSet<&Flow> = flows.iter().collect();
                f.into_iter().filter(|f| asked.contains(f)).collect()
            }
            Ok(Err(_)) => return Err("the hand-back ended while its connections were to freeze".into()),
            Err(_) => return Err(format!("the origin did not freeze the connections within {} ms", wait.as_millis())),
        };
        // Frozen here too: a packet the origin forwarded just before its freeze may arrive after
        // its `Frozen` did (another CPU's queue), and the dumped socket would acknowledge it.
        let flows_for_dp = frozen.clone();
        super::super::flat(self.with_dp(move |dp| dp.freeze(&flows_for_dp, super::FREEZE_LIMIT)).await).map_err(|e| format!("cannot freeze the connections here too: {e}"))?;
        super::settle(std::time::Instant::now()).await;
        // Aborted meanwhile (None): the connections went back to the applications already.
        let failed = {
            let mut p = self.pending();
            p.leaving.get_mut(&key).map(|l| {
                let t0 = std::time::Instant::now();
                let failed = l.dump(&frozen, handoff);
                l.frozen_here = frozen.iter().copied().filter(|f| !failed.contains(f)).collect();
                info!(origin = %from, handoff, connections = l.frozen_here.len(), dump_us = t0.elapsed().as_micros(), "connections going home dumped");
                failed
            })
        };
        if let Some(failed) = failed {
            self.thaw(failed).await;
            Ok(())
        } else {
            self.thaw(frozen).await;
            Err("the hand-back ended while its connections were to freeze".into())
        }
    }

    /// Volunteer: sends the dumped connections of hand-back (`from`, `id`) to the origin
    /// (`Connections` on `reply`), with the blobs the applications sent after the sessions of
    /// `exports`; adds their counts to `sets`.
    pub(in crate::agent) async fn send_home(
        self: &Arc<Self>,
        from: &str,
        id: u64,
        exports: &mut [(SocketAddr, Exported)],
        reply: &mpsc::Sender<Answer>,
        sets: &mut Vec<peer::SessionSet>,
    ) -> Result<(), String> {
        let key = (NodeName::from(from), id);
        if !self.pending().leaving.contains_key(&key) {
            return Ok(());
        }
        let blobs = super::blobs(exports).await.map_err(|e| format!("{e:#}"))?;
        let (frames, counts, stay) = {
            let mut p = self.pending();
            let Some(l) = p.leaving.get_mut(&key) else { return Err("the hand-back ended while its connections were on their way".into()) };
            // One that cannot go stays, resumed: its flow thaws here now (and on the origin,
            // which sees it missing).
            let (frames, stay) = l.frames(blobs, self.cfg.max_frame);
            l.frozen_here.retain(|f| !stay.contains(f));
            (frames, l.counts(), stay)
        };
        self.thaw(stay).await;
        for f in frames {
            let a = match f {
                ConnFrame::Conns(service, connections) => Answer::Connections { id, service, connections },
                ConnFrame::Bytes(service, bytes) => Answer::ConnectionBytes { id, service, bytes },
            };
            reply.send_timeout(a, self.send_deadline()).await.map_err(|_| "the link to the origin is gone or stuck".to_string())?;
        }
        super::count_into(sets, counts);
        Ok(())
    }

    /// Volunteer: the origin froze `flows` of hand-back (`from`, `id`).
    pub(in crate::agent) fn frozen_for(&self, from: &str, id: u64, flows: Vec<peer::Flow>) {
        let waiter = self.pending().freezing.remove(&(NodeName::from(from), id));
        if let Some(tx) = waiter {
            drop(tx.send(flows.into_iter().map(from_wire).collect()));
        } else {
            info!(origin = %from, id, "the origin froze the connections of a hand-back that is not waiting for it (it ended)");
        }
    }

    /// Volunteer: ends the connections' side of hand-back (`from`, `id`): committed, the dumped
    /// ones close without a word (they live at the origin); aborted, they go on here. Returns
    /// the connections for the applications with the outcome, per local service.
    pub(in crate::agent) fn end_leaving(self: &Arc<Self>, from: &str, id: u64, committed: bool) -> HashMap<SocketAddr, Vec<AppConnection>> {
        let leaving = self.pending().leaving.remove(&(NodeName::from(from), id));
        let Some(mut l) = leaving else { return HashMap::new() };
        let frozen = std::mem::take(&mut l.frozen_here);
        let (back, moved) = l.end(committed);
        let n_moved = moved.len();
        super::discard(moved);
        // Their sockets closed or resumed: their packets may come here again.
        if !frozen.is_empty() {
            let me = self.clone();
            tokio::spawn(async move { me.thaw(frozen).await });
        }
        if n_moved > 0 {
            info!(origin = %from, id, connections = n_moved, "connections went home");
        }
        back
    }

    /// Origin, hand-back `id` from `name`: freezes the `flows` the volunteer named (of its
    /// clients and services that move connections: `of`), their packets kept by the copies
    /// `holds` opens, and tells it which (`Frozen`). An error: why the hand-back aborts.
    pub(in crate::agent) async fn freeze_home(
        self: &Arc<Self>,
        (name, id, handoff): (&str, u64, &str),
        flows: Vec<peer::Flow>,
        of: (&HashSet<IpAddr>, &[SocketAddr]),
        holds: Opened,
    ) -> Result<Homecoming, String> {
        let (clients, live) = of;
        let flows: Vec<Flow> = flows.into_iter().map(from_wire).collect();
        if let Some(f) = flows.iter().find(|f| !clients.contains(&f.0.ip()) || !live.contains(&f.1)) {
            return Err(format!("the volunteer names a connection {} -> {} that is not of these clients and services", f.0, f.1));
        }
        let freeze = self.freeze(flows, holds, handoff).await;
        if !freeze.flows.is_empty() {
            self.pending().frozen_home.insert((NodeName::from(name), id), freeze.flows.clone());
        }
        let frozen: Vec<peer::Flow> = freeze.flows.iter().map(wire).collect();
        let n = frozen.len();
        let home = Homecoming { freeze, ..Homecoming::default() };
        if !frozen.is_empty() {
            if let Err(e) = self.send_to(name, Request::Frozen { id, flows: frozen }).await {
                // Not yet the hand-back's to end: let go of the freeze here, as an abort would.
                self.end_homecoming(name, id, home, false).await;
                return Err(format!("telling the volunteer the connections are frozen: {e:#}"));
            }
            info!(sibling = %name, handoff, connections = n, "connections coming home frozen");
        }
        Ok(home)
    }

    /// Origin: the connections of hand-back `home` arrived and were `restored`: each must be
    /// of a frozen flow. The frozen flows none came for go on at the volunteer: what was kept
    /// of them goes there, and they thaw.
    pub(in crate::agent) async fn arrived_home(self: &Arc<Self>, name: &str, home: &mut Homecoming, restored: Vec<RestoredConn>) -> Result<(), String> {
        let frozen: HashSet<&Flow> = home.freeze.flows.iter().collect();
        if let Some(r) = restored.iter().find(|r| !frozen.contains(&r.flow)) {
            return Err(format!("the volunteer sent a connection {} -> {} that was not frozen", r.flow.0, r.flow.1));
        }
        let here: HashSet<Flow> = restored.iter().map(|r| r.flow).collect();
        home.restored = restored;
        let stay: Vec<Flow> = home.freeze.flows.iter().copied().filter(|f| !here.contains(f)).collect();
        if stay.is_empty() {
            return Ok(());
        }
        let mut there = Vec::new();
        for h in &mut home.freeze.holds {
            match h.take() {
                Ok(packets) => {
                    for p in packets {
                        if crate::repair::flow_of(&p).is_some_and(|f| here.contains(&(canonical(f.0), canonical(f.1)))) {
                            home.kept.push(p);
                        } else {
                            there.push(p);
                        }
                    }
                }
                Err(e) => warn!(sibling = %name, "reading the kept packets of moving connections: {e}"),
            }
            let mine: Vec<Flow> = h.flows().filter(|f| here.contains(f)).collect();
            let _ = h.watch(&mine);
        }
        self.replay_to(name, there);
        home.freeze.flows.retain(|f| here.contains(f));
        info!(sibling = %name, connections = stay.len(), "frozen connections that did not come home go on at the volunteer");
        self.thaw(stay).await;
        Ok(())
    }

    /// Origin: ends the connections' side of hand-back `home` with `name`: committed (the
    /// rules withdrawn), the restored connections go live here and get their kept packets;
    /// aborted, they close without a word and the kept packets go on to the volunteer. Returns
    /// the connections for the applications with the commit, per service. Committed, at
    /// once: the kept packets and the thaw follow on a task of their own (they took 0.65 ms
    /// before the applications got the connections, measured, while their clients waited; a
    /// live socket takes what comes later).
    pub(in crate::agent) async fn end_homecoming(self: &Arc<Self>, name: &str, id: u64, home: Homecoming, committed: bool) -> HashMap<SocketAddr, Vec<AppConnection>> {
        let Homecoming { freeze, restored, kept } = home;
        self.pending().frozen_home.remove(&(NodeName::from(name), id));
        let t0 = std::time::Instant::now();
        let (n, sibling) = (restored.len(), name.to_string());
        let settled = move |sent: usize| {
            if n > 0 {
                info!(sibling, id, connections = n, committed, kept_packets = sent, done_ms = t0.elapsed().as_secs_f64() * 1e3, "connections of a hand-back settled");
            }
        };
        if !committed {
            drop(restored);
            settled(self.replay_to(name, kept) + self.let_go(freeze, |p| self.replay_to(name, p)).await);
            return HashMap::new();
        }
        let mut given: HashMap<SocketAddr, Vec<AppConnection>> = HashMap::new();
        for (local, c) in go_live(restored, name, id) {
            given.entry(local).or_default().push(c);
        }
        let me = self.clone();
        tokio::spawn(async move { settled(deliver_here(&kept) + me.let_go(freeze, |p| deliver_here(&p)).await) });
        given
    }

    /// Origin: lets go of the flows frozen for hand-back `id` with `name`, whose task was
    /// dropped half way (the agent stopping, out of time): what its copies kept is gone with
    /// it, and the clients resend it. Returns how many flows thawed.
    pub(in crate::agent) async fn thaw_cut_short(self: &Arc<Self>, name: &str, id: u64) -> usize {
        let flows = self.pending().frozen_home.remove(&(NodeName::from(name), id)).unwrap_or_default();
        let n = flows.len();
        self.thaw(flows).await;
        n
    }
}
