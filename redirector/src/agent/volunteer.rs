//! The volunteer side: offers, transfers (checks, import, then adoption in the datapath),
//! commits, aborts and releases. A volunteer keeps room for the clients it adopted until they
//! arrive, and believes nothing a sibling says about addresses that its own configuration does
//! not confirm.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::anyhow;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{
    Acked, Agent, Incoming, Received, Streamed,
    handoff::{Arriving, FRAMES_AHEAD, check_listed, take_sessions},
    link::LinkLimits,
    live::Restoring,
    policy,
    records::Dir,
    unix_now,
};
use crate::{
    app::{AppConnection, Role},
    config::Sibling,
    datapath::{Listener, family_name},
    peer::{Answer, HandoffId, ListedSession, MovedClient, NodeName, Request, Said, Verdict},
};

/// A volunteer asks the origin how a hand-over it took part in ended when neither `Commit`
/// nor `Abort` came this long after its acknowledgement (or its `Returning`); then again and
/// again, backing off (up to 10 s, `state::volunteer`), until the origin knows.
pub(super) const QUERY_AFTER: Duration = Duration::from_secs(2);

/// Adopts the origin's services of `plan` not adopted yet, each with the origin's tunnel
/// accepted: the services adopted anew. On an error, those go back.
fn adopt_all(dp: &mut dyn crate::plane::Plane, plan: &[Adoption]) -> anyhow::Result<Vec<SocketAddr>> {
    let mut done: Vec<SocketAddr> = Vec::new();
    let r = (|| {
        for a in plan {
            dp.add_sibling(a.src, &a.dev)?;
            if !dp.list_adopted()?.iter().any(|(ip, port, _)| *ip == a.svc.ip() && *port == a.svc.port()) {
                dp.adopt((a.svc.ip(), a.svc.port()), &a.dev, Some(a.listener), None)?;
                done.push(a.svc);
            }
        }
        Ok(())
    })();
    if r.is_err() {
        unadopt_all(dp, &done);
    }
    r.map(|()| done)
}

/// Gives back `services`, adopted for a transfer that did not happen (best effort: the
/// transfer's own error is the one that counts).
fn unadopt_all(dp: &mut dyn crate::plane::Plane, services: &[SocketAddr]) {
    for svc in services {
        let _ = dp.unadopt((svc.ip(), svc.port()));
    }
}

/// One of the origin's services as this volunteer serves it, checked against its own
/// configuration.
struct Adoption {
    /// The origin's service address.
    svc: SocketAddr,
    /// The local service of the same port and family, whose application imports.
    local: SocketAddr,
    dev: String,
    /// The local service's listening socket, and the application likely to hold it.
    listener: Listener,
    /// The origin's tunnel source of that family (from this node's configuration).
    src: IpAddr,
}

/// A transfer as it reached this volunteer: its origin and id, what its `Transfer` frame says
/// (the services handed over, the origin's tunnel sources), what arrived of it before that
/// frame (its clients, its sessions listed), and what comes after it (the sessions, then
/// their count and digest per service).
struct TransferIn {
    from: NodeName,
    id: u64,
    services: Vec<SocketAddr>,
    tunnel_src: Vec<IpAddr>,
    incoming: Incoming,
    frames: mpsc::Receiver<Streamed>,
}

/// Offers of room one sibling may hold at once. An origin asks each sibling once per round, and
/// an offer it did not take lives out its lease (rounds can follow each other faster); more
/// would let one sibling keep all the room reserved by asking again and again.
const RESERVATIONS_PER_SIBLING: usize = 4;

impl Agent {
    /// Handles one request from sibling `from`. Quick ones are answered at once; transfers,
    /// commits and aborts (which wait on the application) run on their own tasks, so this
    /// connection keeps reading heartbeats. An error closes the connection.
    pub(super) async fn handle_request(self: Arc<Self>, from: &str, msg: Request, reply: &mpsc::Sender<Answer>, limits: &LinkLimits) -> anyhow::Result<()> {
        let transfers = &limits.transfers;
        let answer = |m: Answer| {
            let reply = reply.clone();
            let deadline = self.send_deadline();
            async move { reply.send_timeout(m, deadline).await.map_err(|_| anyhow!("the answers to this sibling are stuck")) }
        };
        let busy = "too many requests from this sibling: ask again in a moment";
        match msg {
            Request::HelpRequest { id, .. } if !limits.may_serve() => answer(Answer::Decline { id, reason: busy.into() }).await?,
            Request::Outcome { id, .. } if !limits.may_serve() => answer(Answer::OutcomeIs { id, verdict: Verdict::Pending }).await?,
            Request::HandBack { id, .. } if !limits.may_serve() => answer(Answer::Abort { id, reason: busy.into() }).await?,
            Request::GiveBack { id, .. } if !limits.may_serve() => answer(Answer::Decline { id, reason: busy.into() }).await?,
            Request::Probe { id, .. } if !limits.may_serve() => answer(Answer::Probed { id, error: Some(busy.into()) }).await?,
            Request::Probe { id, service, port, token } => {
                let (me, from, reply) = (self.clone(), from.to_string(), reply.clone());
                tokio::spawn(async move {
                    let error = me.probe_for(&from, service, port, token).await;
                    if reply.send_timeout(Answer::Probed { id, error }, me.send_deadline()).await.is_err() {
                        warn!(origin = %from, "could not answer a probe: the link is gone or stuck");
                    }
                });
            }
            Request::HelpRequest { id, connections, clients } => answer(self.offer(from, id, connections, clients)).await?,
            Request::Sessions { id, service, sessions } => self.stream(from, id, Streamed::Sessions(service, sessions)).await,
            Request::Sealed { id, sessions } => self.stream(from, id, Streamed::Sealed(sessions)).await,
            Request::Connections { id, service, connections } => self.stream(from, id, Streamed::Connections(service, connections)).await,
            Request::ConnectionBytes { id, service, bytes } => self.stream(from, id, Streamed::ConnectionBytes(service, bytes)).await,
            Request::Live { id, handoff } => answer(Answer::Live { id, live: self.live(from, handoff) }).await?,
            Request::Frozen { id, flows } => self.frozen_for(from, id, flows),
            Request::Listed { id, service, sessions } => self.receive(from, id, Some(service), sessions, Vec::new()),
            Request::Clients { id, clients } => self.receive(from, id, None, Vec::new(), clients),
            Request::Transfer { id, services, tunnel_src, clients } => {
                self.receive(from, id, None, Vec::new(), clients);
                let incoming = self.state().volunteer.take_incoming(from, id);
                let Ok(permit) = transfers.clone().try_acquire_owned() else {
                    return answer(Answer::Abort { id, reason: "too many transfers in progress from this sibling; ask again".into() }).await;
                };
                let (me, from, reply) = (self.clone(), NodeName::from(from), reply.clone());
                let (tx, frames) = mpsc::channel(FRAMES_AHEAD);
                {
                    let mut st = me.state();
                    st.volunteer.importing.insert((from.clone(), id));
                    st.volunteer.streams.insert((from.clone(), id), tx);
                }
                tokio::spawn(async move {
                    let t = TransferIn { from: from.clone(), id, services, tunnel_src, incoming, frames };
                    let a = me.clone().accept_transfer(t).await;
                    {
                        let mut st = me.state();
                        st.volunteer.importing.remove(&(from.clone(), id));
                        st.volunteer.streams.remove(&(from.clone(), id));
                    }
                    drop(permit);
                    if reply.send_timeout(a, me.send_deadline()).await.is_err() {
                        warn!(origin = %from, id, "could not answer the transfer: the link is gone or stuck");
                    }
                });
            }
            Request::Commit { id } => {
                info!(origin = %from, id, "origin committed the hand-over");
                self.commit_acked(from, id);
            }
            Request::Abort { id, reason } => {
                info!(origin = %from, id, "origin aborted: {}", Said(&reason));
                self.forget_transfer(from, id);
            }
            Request::Outcome { id, handoff, back, clients } => {
                // Answered from the rules if need be: a blocking read, on its own task; a few
                // at once per link (the sibling asks again when told it is not known yet).
                let Ok(permit) = limits.outcomes.clone().try_acquire_owned() else {
                    return answer(Answer::OutcomeIs { id, verdict: Verdict::Pending }).await;
                };
                let (me, from, reply) = (self.clone(), from.to_string(), reply.clone());
                // A volunteer names a sample; more would only make the rules' reading and the
                // record it may leave bigger.
                let clients = super::handoff::sample(&clients);
                tokio::spawn(async move {
                    let _permit = permit;
                    let verdict = me.verdict_of(&from, handoff, if back { Dir::Back } else { Dir::Out }, &clients).await;
                    if reply.send_timeout(Answer::OutcomeIs { id, verdict }, me.send_deadline()).await.is_err() {
                        warn!(sibling = %from, handoff, "could not answer how the hand-over ended: the link is gone or stuck");
                    }
                });
            }
            Request::HandBack { id, services, clients, live } => {
                let Ok(permit) = transfers.clone().try_acquire_owned() else {
                    return answer(Answer::Abort { id, reason: "too many hand-overs in progress from this sibling; ask again".into() }).await;
                };
                let (me, from, reply) = (self.clone(), from.to_string(), reply.clone());
                tokio::spawn(async move {
                    me.hand_back_out(&from, id, services, clients, live, reply).await;
                    drop(permit);
                });
            }
            Request::GiveBack { id, clients } => self.given_back(from, id, clients, reply),
            Request::Join { id } => answer(self.joined(id)).await?,
            Request::Release { clients } => {
                let n = self.state().volunteer.released(from, clients);
                info!(origin = %from, clients = n, "origin took clients back: their room is free again");
            }
        }
        Ok(())
    }

    /// Hand-over (`from`, `id`) aborted. A transfer here: forgets its reservation, what
    /// arrived of it, its adopted clients, and the applications drop what they imported. A
    /// hand-back: the applications unfreeze what they exported; the clients stay here.
    fn forget_transfer(self: &Arc<Self>, from: &str, id: u64) {
        let acked = self.state().volunteer.aborted(from, id);
        match acked {
            // Nothing was steered: the imported sessions must not live here too.
            Some(a) if a.role == Role::Import => {
                let held = a.held();
                // Connections restored for it close without a word: they go on at the origin.
                drop(self.take_restored(from, id, false));
                self.settle_imports(a.apps, a.handoff, false, held);
            }
            // The rules still send the clients here: their sessions (and connections) go on here.
            Some(a) => {
                let given = self.end_leaving(from, id, false);
                self.settle_apps_back(a.apps, a.handoff, a.clients, false, given);
            }
            None => {}
        }
    }

    /// Hand-over (`from`, `id`) committed. A transfer here: the imported sessions are final.
    /// A hand-back: the clients live at their origin now; the applications drop their
    /// sessions (and close their connections) and their room here is free.
    fn commit_acked(self: &Arc<Self>, from: &str, id: u64) {
        let acked = self.state().volunteer.committed(from, id);
        match acked {
            Some((a, _)) if a.role == Role::Import => {
                let held = a.held();
                let given = self.take_restored(from, id, true);
                self.settle_imports_with(a.apps, a.handoff, true, held, given);
            }
            Some((a, n)) => {
                info!(origin = %from, clients = n, "clients given back: their room is free again");
                let given = self.end_leaving(from, id, true);
                self.settle_apps_back(a.apps, a.handoff, a.clients, true, given);
            }
            None => {}
        }
    }

    /// The origin of transfer (`from`, `id`) committed and asks for its connections live
    /// (`Live`): they go live, and the applications get them with the sessions' `commit` at
    /// once, not a round trip later with the origin's `Commit` (which then finds the transfer
    /// settled) while their clients wait. Returns how many are live.
    fn live(self: &Arc<Self>, from: &str, id: u64) -> u64 {
        let n = self.go_live(from, id);
        self.commit_acked(from, id);
        n
    }

    /// Tells the applications of `apps` how import `handoff` ended, until they confirm; then
    /// `held` clients are free.
    fn settle_imports(self: &Arc<Self>, apps: Vec<SocketAddr>, handoff: String, commit: bool, held: Vec<IpAddr>) {
        self.settle_imports_with(apps, handoff, commit, held, HashMap::new());
    }

    /// [`Agent::settle_imports`], giving each application the connections in `given` for it.
    fn settle_imports_with(self: &Arc<Self>, apps: Vec<SocketAddr>, handoff: String, commit: bool, held: Vec<IpAddr>, mut given: HashMap<SocketAddr, Vec<AppConnection>>) {
        if apps.is_empty() && held.is_empty() && given.is_empty() {
            return;
        }
        let mut apps = apps;
        for s in given.keys() {
            if !apps.contains(s) {
                apps.push(*s);
            }
        }
        let me = self.clone();
        tokio::spawn(async move {
            futures::future::join_all(apps.iter().map(|s| me.apps.settle_with(*s, &handoff, commit, given.remove(s).unwrap_or_default()))).await;
            me.unbusy(&held);
        });
    }

    /// Asks the origin of acknowledged transfer (`origin`, `id`) how it ended; acts on a
    /// definite answer, or asks again later.
    async fn ask_outcome(self: Arc<Self>, origin: NodeName, id: u64) {
        let Some((sample, handoff, back)) = self.state().volunteer.acked.get(&(origin.clone(), id)).map(|a| (a.sample.clone(), a.handoff.clone(), a.role == Role::Export)) else {
            return;
        };
        let req = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let timeout = Duration::from_millis(self.cfg.negotiate_timeout_ms.max(1000));
        let verdict = match self.ask(&origin, Request::Outcome { id: req, handoff: id, back, clients: sample }, req, timeout).await {
            Ok(Answer::OutcomeIs { verdict, .. }) => Ok(verdict),
            Ok(other) => Err(format!("unexpected answer: {}", other.what())),
            Err(e) => Err(format!("{e:#}")),
        };
        match verdict {
            Ok(Verdict::Committed) => {
                warn!(origin = %origin, id, handoff, "no Commit or Abort came; the origin says it committed: settled as committed");
                self.commit_acked(&origin, id);
            }
            Ok(Verdict::Aborted) => {
                if back {
                    warn!(origin = %origin, id, handoff, "no Commit or Abort came; the origin says the hand-back aborted: settled as aborted, the clients stay here with their sessions");
                } else {
                    warn!(origin = %origin, id, handoff, "no Commit or Abort came; the origin says it aborted (nothing steered): settled as aborted, the imported sessions are dropped");
                }
                self.forget_transfer(&origin, id);
            }
            other => {
                let Some(backoff) = self.state().volunteer.ask_again(&origin, id, Instant::now()) else { return };
                match other {
                    Ok(_) => debug!(origin = %origin, id, handoff, "the origin has not decided the hand-over yet; asking again in {} ms", backoff.as_millis()),
                    Err(e) => {
                        info!(origin = %origin, id, handoff, "cannot ask the origin how the hand-over ended ({e}); the imported sessions stay tentative, asking again in {} ms", backoff.as_millis());
                    }
                }
            }
        }
    }

    /// What follows the `Transfer` of (`from`, `id`): on to the task importing it, waiting
    /// while it is behind. Before the `Transfer`, only empty `Sessions` frames come (they keep
    /// the reservation alive); after the transfer ended (refused, aborted), frames are dropped.
    async fn stream(&self, from: &str, id: u64, frame: Streamed) {
        let to = self.state().volunteer.streams.get(&(NodeName::from(from), id)).cloned();
        match (to, frame) {
            (Some(to), frame) => {
                // An error: the transfer just ended; what it was sent does not matter any more.
                let _ = to.send(frame).await;
            }
            (None, Streamed::Sessions(_, s)) if s.is_empty() => self.receive(from, id, None, Vec::new(), Vec::new()),
            (None, _) => debug!(origin = %from, id, "dropping sessions of a transfer that is not in progress here (refused or aborted)"),
        }
    }

    /// Clients and listed sessions of a transfer, arriving ahead of (or in) its `Transfer`:
    /// kept within the reservation (which they keep alive: big hand-overs outlast a lease).
    fn receive(&self, from: &str, id: u64, service: Option<SocketAddr>, sessions: Vec<ListedSession>, clients: Vec<MovedClient>) {
        let lease = Duration::from_millis(self.cfg.lease_ms);
        let received = self.state().volunteer.receive(from, id, service, sessions, clients, Instant::now(), lease, self.cfg.max_session_bytes);
        match received {
            Received::Kept => {}
            Received::Ignored => warn!(origin = %from, id, "ignoring sessions or clients of a transfer with no reservation (lease expired?)"),
            Received::Refused(why) => warn!(origin = %from, id, "refusing the transfer: {why}"),
        }
    }

    /// Checks a transfer against this node's own configuration: the tunnel sources must be
    /// the origin's configured control addresses, every service one the origin may hand over
    /// and this node serves, no client one this node moved out itself.
    fn check_transfer(&self, origin: &Sibling, services: &[SocketAddr], tunnel_src: &[IpAddr], clients: &[MovedClient]) -> Result<Vec<Adoption>, String> {
        let configured = origin.control_addresses();
        if let Some(t) = tunnel_src.iter().find(|t| !configured.contains(t)) {
            return Err(format!(
                "tunnel source {t} is not {}'s control address here (configured: {configured:?}); tunnels are accepted from configured addresses only",
                origin.name
            ));
        }
        let families: BTreeSet<bool> = clients.iter().map(|c| c.addr.is_ipv4()).collect();
        {
            let st = self.state();
            let ours: Vec<String> = clients.iter().filter(|c| st.moved.clients.contains_key(&c.addr)).map(|c| c.addr.to_string()).collect();
            if !ours.is_empty() {
                return Err(format!("this node moved some of these clients out itself ({}): a client is never both", ours.join(", ")));
            }
            // Importing a client this node holds for another origin, or one in a hand-over
            // here, would replace the session it has here.
            if let Some((c, other)) = clients.iter().find_map(|c| st.volunteer.adopted.get(&c.addr).filter(|a| a.from != origin.name).map(|a| (c.addr, a.from.clone()))) {
                return Err(format!("{c} is a client this node adopted from {other}: a client has one origin"));
            }
            if let Some(c) = clients.iter().find(|c| st.busy.contains(&c.addr)) {
                return Err(format!("{} is in another hand-over here; ask again", c.addr));
            }
        }
        let mut plan = Vec::new();
        for svc in services.iter().filter(|s| families.contains(&s.is_ipv4())) {
            self.check_adoptable(origin, *svc)?;
            let src =
                origin.control_address(svc.ip()).ok_or_else(|| format!("{} has no {} control address here to accept tunnels from", origin.name, family_name(svc.is_ipv4())))?;
            let own = self.cfg.serving(*svc).ok_or_else(|| format!("no local {} service on port {} to serve {svc}", family_name(svc.is_ipv4()), svc.port()))?;
            let listener = Listener::new(own.listener(), self.apps.holder(own.address));
            plan.push(Adoption { svc: *svc, local: own.address, dev: own.dev.clone(), listener, src });
        }
        for f in &families {
            if !plan.iter().any(|a| a.svc.is_ipv4() == *f) {
                return Err(format!("no {} service of {} to serve its {} clients", family_name(*f), origin.name, family_name(*f)));
            }
        }
        Ok(plan)
    }

    /// Volunteer: checks the transfer and its sessions (exactly those it counts), imports them
    /// into the local applications (tentatively), then prepares delivery; only then
    /// acknowledges. Any failure undoes the imports and answers `Abort`.
    async fn accept_transfer(self: Arc<Self>, t: TransferIn) -> Answer {
        let TransferIn { from, id, services, tunnel_src, incoming, mut frames } = t;
        let from = from.as_str();
        let abort = |reason: String| {
            warn!(origin = %from, id, "transfer refused: {reason}");
            // The room it reserved is free again.
            self.state().volunteer.take_reservation(from, id);
            Answer::Abort { id, reason }
        };
        let Some(origin) = self.sibling(from) else {
            return abort("not a configured sibling".into());
        };
        if let Some(why) = incoming.refused {
            return abort(why);
        }
        let Incoming { sessions, clients, .. } = incoming;
        let handoff = HandoffId::new(from, id, self.cfg.node.as_str()).to_string();
        // The transfer owns its reservation now: it must not expire during a long import.
        let capacity = {
            let allowance: Duration = sessions.values().map(|s| self.limits().import_allowance(s.iter().map(|s| usize::try_from(s.len).unwrap_or(usize::MAX)))).sum();
            let now = Instant::now();
            let hold = now + allowance + Duration::from_mins(1);
            // The state's lock is let go before `abort`, which takes it again.
            self.state().volunteer.hold_reservation(from, id, now, hold)
        };
        let Some(capacity) = capacity else {
            return abort(format!("no reservation for request {id} (lease expired?)"));
        };
        let Some(want) = policy::transfer_weight(&clients) else {
            return abort("the connection counts overflow".into());
        };
        if want > capacity {
            return abort(format!("transfer of {want} connections exceeds the {capacity} offered"));
        }
        let plan = match self.check_transfer(&origin, &services, &tunnel_src, &clients) {
            Ok(p) => p,
            Err(why) => return abort(why),
        };
        // The sessions listed go to the applications as they arrive (tentatively: any failure
        // from here on aborts what they imported).
        let listed = match self.check_transfer_listed(&plan, &clients, sessions) {
            Ok(l) => l,
            Err(why) => return abort(why),
        };
        // Connections of any service handed over are restored (the origin decides which move).
        let mut restoring = Restoring::to(plan.iter().map(|a| (a.svc, a.local)).collect());
        let services_adopted: Vec<SocketAddr> = plan.iter().map(|a| a.svc).collect();
        // The services are adopted while the sessions and connections arrive: adopting one
        // anew took 0.6 ms here, all of it inside the freeze of the connections that move.
        let adopting = self.with_dp(move |dp| adopt_all(dp, &plan));
        let ((imported_into, imported), adopted) = tokio::join!(self.import_arriving(from, id, &handoff, listed, &mut frames, &mut restoring), adopting);
        let adopted = adopted.and_then(|r| r);
        if let Err(why) = imported {
            // They may have taken some: they drop them (told until they confirm); the
            // services adopted for them go back.
            self.settle_imports(imported_into, handoff.clone(), false, Vec::new());
            if let Some(new) = adopted.ok().filter(|new| !new.is_empty()) {
                let _ = self.with_dp(move |dp| unadopt_all(dp, &new)).await;
            }
            return abort(why);
        }
        // Recorded before the acknowledgement leaves, so that Commit and Abort find it. An
        // Abort that came during the import took the reservation: then nothing is recorded.
        let recorded = adopted.as_ref().is_ok_and(|_| {
            let now = Instant::now();
            let addrs: Vec<IpAddr> = clients.iter().map(|c| c.addr).collect();
            let acked = Acked::new(imported_into.clone(), handoff.clone(), Role::Import, addrs, now + QUERY_AFTER);
            let mut st = self.state();
            let recorded = st.volunteer.adopt(from, id, &clients, acked, unix_now(), now);
            for svc in &services_adopted {
                st.volunteer.service_needed(*svc, from, now);
            }
            recorded
        });
        let n_conns = restoring.out.len();
        if recorded {
            // Kept until the origin's rules are in (`Live`) or the hand-over ends.
            self.keep_restored(from, id, std::mem::take(&mut restoring.out));
        }
        if recorded {
            info!(origin = %from, id, clients = clients.len(), connections = want, open_connections = n_conns, "adopted clients (ready: sibling, route, listener); room kept for them until they arrive");
            if let Some(d) = self.faults.delay_ack {
                warn!(origin = %from, id, "TEST FAULT delay-ack: acknowledging in {} ms", d.as_millis());
                tokio::time::sleep(d).await;
            }
            return Answer::TransferAck { id };
        }
        self.settle_imports(imported_into, handoff, false, Vec::new());
        match adopted {
            Err(e) => abort(format!("{e:#}")),
            Ok(_) => abort("the origin aborted during the import".into()),
        }
    }

    /// Imports the sessions `listed` (origin's service, local service, sessions) into the
    /// local applications as they arrive in `frames`, until they are sealed and the
    /// applications confirm. Returns the local services whose applications were asked to
    /// import, and whether all went well (if not, those must drop what they took; an import cut
    /// short is padded out first, so the hook stays framed).
    async fn import_arriving(
        &self,
        from: &str,
        id: u64,
        handoff: &str,
        listed: Vec<(SocketAddr, SocketAddr, Vec<ListedSession>)>,
        frames: &mut mpsc::Receiver<Streamed>,
        restoring: &mut Restoring,
    ) -> (Vec<SocketAddr>, Result<(), String>) {
        let t_stream = Instant::now();
        let mut imported_into: Vec<SocketAddr> = Vec::new();
        let mut arriving: HashMap<SocketAddr, Arriving> = HashMap::new();
        for (svc, local, list) in listed {
            imported_into.push(local);
            let lens = list.iter().map(|l| (l.client, usize::try_from(l.len).unwrap_or(usize::MAX))).collect();
            match self.apps.import_stream(local, handoff, lens) {
                Ok(import) => {
                    let n = u64::try_from(list.len()).unwrap_or(u64::MAX);
                    arriving.insert(svc, Arriving { local, expected: list.into(), listed: n, digest: 0, import: Some(import) });
                }
                Err(e) => return (imported_into, Err(format!("import failed: {e:#}"))),
            }
        }
        // The origin sends as its applications export: it may pause as long as an application
        // may stall, and a send on the link may take its deadline.
        let stall = self.limits().allowance(u64::try_from(self.cfg.max_frame).unwrap_or(u64::MAX)).saturating_mul(2).saturating_add(self.send_deadline());
        if let Err(why) = take_sessions(frames, &mut arriving, restoring, stall).await {
            return (imported_into, Err(why));
        }
        let stream_ms = t_stream.elapsed().as_millis();
        let t_import = Instant::now();
        for (_, a) in arriving.drain() {
            let (local, n) = (a.local, a.listed);
            if let Some(Err(e)) = a.finish().await {
                return (imported_into, Err(format!("import failed: {e:#}")));
            }
            info!(origin = %from, id, service = %local, sessions = n, stream_ms, import_ms = t_import.elapsed().as_millis(), "sessions imported into the application (tentative until the origin commits)");
        }
        (imported_into, Ok(()))
    }

    /// The sessions a transfer lists, checked: of its clients only, each once per service,
    /// of services it hands over, whose local services (of the same port and family) have a
    /// registered application to import them. Returns (origin's service, local service,
    /// sessions) to import.
    fn check_transfer_listed(
        &self,
        plan: &[Adoption],
        clients: &[MovedClient],
        listed: HashMap<SocketAddr, Vec<ListedSession>>,
    ) -> Result<Vec<(SocketAddr, SocketAddr, Vec<ListedSession>)>, String> {
        let ours: HashSet<IpAddr> = clients.iter().map(|c| c.addr).collect();
        let mut out = Vec::new();
        for (svc, list) in listed.into_iter().filter(|(_, l)| !l.is_empty()) {
            let local = plan.iter().find(|a| a.svc == svc).map(|a| a.local).ok_or_else(|| format!("sessions of {svc}, a service the transfer does not hand over"))?;
            check_listed(svc, &list, &ours, self.cfg.max_session_bytes)?;
            if !self.apps.has(local) {
                return Err(format!("no application registered for {local} to import {} sessions into", list.len()));
            }
            out.push((svc, local, list));
        }
        Ok(out)
    }

    fn offer(&self, from: &str, id: u64, connections: u64, clients: u32) -> Answer {
        let now = Instant::now();
        let high = self.cfg.high_watermark;
        let mut st = self.state();
        let (reserved, promised) = st.volunteer.promised(now);
        let load = st.load.total;
        let room = policy::room(high, load, reserved, promised);
        let why_not = if st.leaving {
            Some("stopping".to_string())
        } else if st.drained.is_some() {
            Some("drained for maintenance (`redirector drain`)".to_string())
        } else if self.sibling(from).is_some_and(|s| s.services.is_empty()) {
            Some("this node's configuration lists no services of yours to adopt ([[sibling]] services)".to_string())
        } else if st.rounds.negotiating {
            Some("shedding itself".to_string())
        } else if load > high {
            Some(format!("over its own high watermark (load {load}, high {high})"))
        } else if room == 0 {
            Some(format!("no room: load {load} + reserved for offers {reserved} + promised to adopted clients not arrived yet {promised} vs high {high}"))
        } else if connections == 0 {
            Some("asked for no connections".to_string())
        } else if st.volunteer.reservations_of(from, now) >= RESERVATIONS_PER_SIBLING {
            Some(format!("already holds {RESERVATIONS_PER_SIBLING} offers of room here: take them or let them run out first"))
        } else {
            None
        };
        if let Some(reason) = why_not {
            info!(origin = %from, id, load, reserved, promised, "declining help: {reason}");
            return Answer::Decline { id, reason };
        }
        let capacity = room.min(connections);
        // Frames before the `Transfer` keep the lease alive, up to the time a transfer's frames
        // are kept at all.
        let (lease, expiry) = (Duration::from_millis(self.cfg.lease_ms), Duration::from_millis(self.cfg.handoff_expiry_ms));
        st.volunteer.reserve(from, id, capacity, now + lease, now + expiry);
        info!(origin = %from, id, capacity, asked = connections, clients, load, reserved, promised, "offering help");
        Answer::Offer { id, capacity, lease_ms: self.cfg.lease_ms }
    }

    /// Volunteer bookkeeping that would otherwise grow without end (transfers whose
    /// `Transfer` never came, adopted clients their origin never released that stay away),
    /// and acknowledged transfers whose `Commit` or `Abort` is late: their origin is asked.
    pub(super) fn expire(self: &Arc<Self>) {
        let now = Instant::now();
        let expiry = Duration::from_millis(self.cfg.handoff_expiry_ms);
        let idle = Duration::from_secs(self.cfg.adopted_expiry_secs);
        let (ask, unneeded) = {
            let mut st = self.state();
            st.moved.forget_dwelled(now);
            let ask = st.volunteer.expire(now, expiry, idle);
            (ask, st.volunteer.unneeded_services(now, Duration::from_secs(self.cfg.unadopt_after_secs)))
        };
        for (origin, id) in ask {
            tokio::spawn(self.clone().ask_outcome(origin, id));
        }
        if !unneeded.is_empty() {
            tokio::spawn(self.clone().unadopt(unneeded));
        }
        self.records().forget_old();
    }

    /// Gives back adopted `services` that nothing has needed for `unadopt_after_secs`: their
    /// local route and listener entry go. Checked again under the datapath's lock, which a
    /// transfer holds to adopt: one that needs a service again either shows here first (it
    /// holds a reservation from its offer on) or adopts it anew afterwards.
    async fn unadopt(self: Arc<Self>, services: Vec<SocketAddr>) {
        let me = self.clone();
        let r = self
            .with_dp(move |dp| {
                let mut gone = Vec::new();
                for svc in services {
                    if !me.state().volunteer.still_unneeded(svc) {
                        continue;
                    }
                    match dp.unadopt((svc.ip(), svc.port())) {
                        Ok(()) => gone.push((svc, me.state().volunteer.services.remove(&svc).map(|u| u.origin))),
                        Err(e) => warn!(service = %svc, "giving back an adopted service: {e}"),
                    }
                }
                gone
            })
            .await;
        for (svc, origin) in r.unwrap_or_default() {
            info!(service = %svc, origin = origin.as_deref().unwrap_or("?"), after_secs = self.cfg.unadopt_after_secs, "gave back an adopted service: nothing of its origin is here any more");
        }
    }
}
