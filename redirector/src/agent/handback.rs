//! The hand-back: clients (and their sessions) come home from a volunteer. The mirror of the
//! hand-over out, with the origin's rules still the only commit point:
//!
//! origin `HandBack` -> the volunteer's applications export (freeze) -> `Sessions` and
//! `Returning` (counted and digested per service) -> the origin's applications import
//! (tentative) -> the origin withdraws its rules (they drain: new connections stay home, open
//! ones keep reaching the volunteer) -> `Commit` to the volunteer (its applications drop the
//! sessions and close those clients' connections; their next request comes home) and to the
//! origin's applications (final). Any failure before the rules are withdrawn aborts: the
//! volunteer's applications unfreeze, the origin's drop what they imported, the clients stay
//! on the volunteer with their sessions.
//!
//! The origin always runs it (its rules decide); a volunteer that wants its room back, or
//! leaves, asks it to (`GiveBack`). A volunteer never passes clients on to a third node
//! itself: the origin takes them home, and moves them on in its next round if it is over its
//! own high watermark.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::anyhow;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{
    Acked, Agent, Streamed,
    handoff::{Arriving, Busy, FRAMES_AHEAD, Handover, check_listed, keepalive, names, send_sessions, take_sessions},
    host_prefix,
    live::Restoring,
    records::{Dir, Record},
    state::ByNode,
    tally::{End, Stage},
    volunteer::QUERY_AFTER,
};
use crate::{
    app::{Exported, Role},
    datapath::Prefix,
    peer::{self, Answer, HandoffId, ListedSession, MovedClient, NodeName, Request, Said, Verdict},
};

tokio::task_local! {
    /// Where a leaving agent ([`Agent::leave`](super::Agent)) collects the ids of the
    /// hand-backs it starts: those its exit timeout cuts short are ended after it, from the
    /// rules. Hand-backs started by other tasks meanwhile are not in it.
    pub(super) static STARTED: std::sync::Arc<std::sync::Mutex<Vec<u64>>>;
}

/// How long a volunteer whose clients an origin took back waits for that origin's Commit,
/// which may arrive after its answer. Past it, they count as still here.
const SETTLE_WAIT: Duration = Duration::from_secs(5);

impl Agent {
    /// Origin: takes `clients` home from volunteer `name`, with their sessions (those this
    /// agent steers there and no hand-over holds), in as many hand-backs as frames need;
    /// unless `urgent`, not before [`MOVE_DWELL`] has passed since they moved. Returns how
    /// many came home.
    pub(super) async fn take_home(self: &Arc<Self>, name: &str, clients: Vec<IpAddr>, why: &str, urgent: bool) -> usize {
        let picked = self.state().hold_moved_to(name, clients);
        if picked.is_empty() {
            return 0;
        }
        let guard = Busy::new(self.clone(), picked.clone());
        let wait = if urgent { Duration::ZERO } else { self.state().moved.dwell_left(&picked, Instant::now()) };
        if !wait.is_zero() {
            info!(sibling = %name, clients = picked.len(), wait_ms = wait.as_millis(), "some of these clients moved a moment ago: their waiting requests are answered first");
            tokio::time::sleep(wait).await;
        }
        let mut guard = guard;
        let _ = guard.take();
        info!(sibling = %name, clients = picked.len(), "taking clients home ({why}): {}", names(&picked));
        let families: BTreeSet<bool> = picked.iter().map(IpAddr::is_ipv4).collect();
        let services: Vec<SocketAddr> = self.cfg.services.iter().map(|s| s.address).filter(|s| families.contains(&s.is_ipv4())).collect();
        let mut groups: Vec<Busy> = peer::hand_back_groups(picked, &services, self.cfg.max_frame).into_iter().map(|g| Busy::new(self.clone(), g)).collect();
        let mut home = 0;
        while let Some(g) = groups.pop() {
            home += self.hand_back(name, &services, g).await;
        }
        home
    }

    /// Origin: one hand-back of the (busy) clients of `busy` from `name`.
    async fn hand_back(self: &Arc<Self>, name: &str, services: &[SocketAddr], busy: Busy) -> usize {
        let clients = busy.clients().to_vec();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let handoff = HandoffId::new(self.cfg.node.as_str(), id, name).to_string();
        let t0 = Instant::now();
        // Families of these clients only; a service that keeps sessions must have its
        // application here to take them.
        let families: BTreeSet<bool> = clients.iter().map(IpAddr::is_ipv4).collect();
        let services: Vec<SocketAddr> = services.iter().copied().filter(|s| families.contains(&s.is_ipv4())).collect();
        if let Some(svc) = services.iter().find(|s| self.keeps_sessions(**s) && !self.apps.has(**s)) {
            warn!(sibling = %name, clients = clients.len(), "not taking clients home: {svc} keeps sessions (sessions = true) and no application is registered for it; they stay on {name}");
            return 0;
        }
        let apps: Vec<SocketAddr> = services.iter().copied().filter(|s| self.apps.has(*s) || self.keeps_sessions(*s)).collect();
        // The services whose open connections come home too: those that move them, with an
        // application that takes them.
        let live: Vec<SocketAddr> = services.iter().copied().filter(|s| self.moves_live(*s) && self.apps.takes_connections(*s)).collect();
        let targets = self.sibling(name).map(|s| s.control_addresses()).unwrap_or_default();
        let started = self.records().start(Record { id, dir: Dir::Back, volunteer: name.to_string(), targets, clients: clients.clone(), apps: apps.clone() });
        let rec = match started {
            Ok(r) => r,
            Err(e) => {
                warn!(sibling = %name, handoff, "not taking clients home: the hand-back cannot be recorded: {e:#}");
                return 0;
            }
        };
        let _ = STARTED.try_with(|ids| ids.lock().expect("lock").push(id));
        self.tally.started(Dir::Back);
        let mut h = Handover::new(rec, busy, t0);
        let (n_sessions, bytes, t_export) = match self.receive_back(&mut h, &services, &live).await {
            Ok(r) => r,
            Err(why) => {
                self.conclude(h, End::Aborted(Stage::Transfer, why)).await;
                return 0;
            }
        };
        h.sessions = (n_sessions, bytes);
        let t_import = t0.elapsed();
        self.faults.pause("pause-before-rules", &handoff).await;
        // The commit point: the rules drain (new connections stay here, open ones finish there).
        let period = Duration::from_secs(self.cfg.drain_secs);
        let prefixes: Vec<Prefix> = clients.iter().map(|c| host_prefix(*c)).collect();
        let withdrawn = super::flat(self.with_dp(move |dp| dp.drain_many(&prefixes, period)).await).map(|_| ());
        let Some(t_rules) = self.at_commit_point(h, withdrawn).await else { return 0 };
        info!(
            sibling = %name,
            handoff,
            clients = clients.len(),
            sessions = n_sessions,
            export_ms = t_export.as_millis(),
            imported_ms = t_import.as_millis(),
            withdrawn_ms = t_rules.as_millis(),
            committed_ms = t0.elapsed().as_millis(),
            "hand-back committed: the clients come home with their sessions"
        );
        self.state().moved.last_home_ms = Some(t0.elapsed().as_secs_f64() * 1000.0);
        clients.len()
    }

    /// Origin: asks the volunteer of hand-back `h` for its clients (of `services`), checks what
    /// comes back (exactly the clients asked for; sessions of them only, exactly as listed and
    /// sealed) and imports the sessions into this node's applications (tentative) as they
    /// arrive; the open connections of `live` services come too (frozen here, then restored:
    /// `h.coming`). Returns the sessions imported and when the volunteer's answer came; an
    /// error says why the hand-back aborts.
    async fn receive_back(self: &Arc<Self>, h: &mut Handover, services: &[SocketAddr], live: &[SocketAddr]) -> Result<(usize, u64, Duration), String> {
        let rec = h.rec.clone();
        let (name, id, t0) = (rec.volunteer.as_str(), rec.id, h.t0);
        let (tx, mut frames) = mpsc::channel(FRAMES_AHEAD);
        self.state().moved.await_back(name, id, t0, tx);
        let r = self.import_back(h, services, live, &mut frames).await;
        self.state().moved.end_back(name, id);
        r
    }

    async fn import_back(
        self: &Arc<Self>,
        h: &mut Handover,
        services: &[SocketAddr],
        live: &[SocketAddr],
        frames: &mut mpsc::Receiver<Streamed>,
    ) -> Result<(usize, u64, Duration), String> {
        let rec = h.rec.clone();
        let (name, id, clients, t0) = (rec.volunteer.as_str(), rec.id, rec.clients.as_slice(), h.t0);
        let handoff = &h.name(self.cfg.node.as_str());
        let request = Request::HandBack { id, services: services.to_vec(), clients: clients.to_vec(), live: live.to_vec() };
        // The copies of the packets of connections coming home open while the volunteer's
        // applications export (opening one waits for the kernel's grace period).
        let holds = self.open_holds(live);
        let answer = self.ask_patiently(name, request, id).await;
        let back = match answer {
            Ok(Answer::Returning { clients, .. }) => clients,
            Ok(Answer::Abort { reason, .. } | Answer::Decline { reason, .. }) => return Err(format!("the volunteer refused: {}", Said(&reason))),
            Ok(other) => return Err(format!("unexpected answer: {}", other.what())),
            Err(e) => return Err(format!("no answer: {e:#}")),
        };
        let t_export = t0.elapsed();
        let asked: HashSet<IpAddr> = clients.iter().copied().collect();
        let returned: HashSet<IpAddr> = back.iter().map(|c| c.addr).collect();
        if returned != asked || back.len() != asked.len() {
            return Err(format!("the volunteer returns {} clients, not the {} asked for", back.len(), clients.len()));
        }
        // The sessions listed go to this node's applications as they arrive (tentatively: any
        // failure from here on aborts the hand-back, and the applications drop them).
        let listed = self.state().moved.take_listed(name, id);
        let mut arriving: HashMap<SocketAddr, Arriving> = HashMap::new();
        let (mut moved, mut bytes) = (0, 0u64);
        for (svc, list) in listed.into_iter().filter(|(_, l)| !l.is_empty()) {
            if !services.contains(&svc) {
                return Err(format!("sessions of {svc}, which is not this node's service of these clients"));
            }
            check_listed(svc, &list, &asked, self.cfg.max_session_bytes)?;
            let import = if self.apps.has(svc) {
                let lens = list.iter().map(|l| (l.client, usize::try_from(l.len).unwrap_or(usize::MAX))).collect();
                Some(self.apps.import_stream(svc, handoff, lens).map_err(|e| format!("import failed: {e:#}"))?)
            } else {
                warn!(sibling = %name, service = %svc, sessions = list.len(), "no application registered for {svc} (sessions = false): the clients come home without their sessions");
                None
            };
            moved += list.len();
            bytes = list.iter().fold(bytes, |b, l| b.saturating_add(l.len));
            let n = u64::try_from(list.len()).unwrap_or(u64::MAX);
            arriving.insert(svc, Arriving { local: svc, expected: list.into(), listed: n, digest: 0, import });
        }
        // The volunteer sends as its applications export: it may pause as long as an
        // application may stall, and a send on the link may take its deadline.
        let stall = self.limits().allowance(u64::try_from(self.cfg.max_frame).unwrap_or(u64::MAX)).saturating_mul(2).saturating_add(self.send_deadline());
        // Open connections coming home: first the flows to freeze, right after `Returning`.
        let mut restoring = Restoring::to(live.iter().map(|s| (*s, *s)).collect());
        if !live.is_empty() {
            let flows = match tokio::time::timeout(stall, frames.recv()).await {
                Ok(Some(Streamed::Freeze(flows))) => flows,
                Ok(Some(Streamed::Abort(reason))) => return Err(format!("the volunteer aborted: {}", Said(&reason))),
                Ok(Some(_)) => return Err("the volunteer sent sessions before the connections to freeze".to_string()),
                Ok(None) => return Err("the hand-back was aborted, or the link went away, before the connections to freeze came".to_string()),
                Err(_) => return Err(format!("no connections to freeze came for {} ms", stall.as_millis())),
            };
            h.coming = Some(self.freeze_home((name, id, handoff), flows, (&asked, live), holds).await?);
        }
        take_sessions(frames, &mut arriving, &mut restoring, stall).await?;
        if let Some(home) = h.coming.as_mut() {
            self.arrived_home(name, home, std::mem::take(&mut restoring.out)).await?;
        }
        for (_, a) in arriving.drain() {
            if let Some(Err(e)) = a.finish().await {
                return Err(format!("import failed: {e:#}"));
            }
        }
        Ok((moved, bytes, t_export))
    }

    /// Asks `name` for hand-back `id` and waits for its answer for as long as the volunteer
    /// keeps sending (`Sessions` frames, empty ones while it exports), and at most
    /// `negotiate_timeout_ms` plus `app_timeout_ms` between two of them.
    async fn ask_patiently(&self, name: &str, msg: Request, id: u64) -> anyhow::Result<Answer> {
        let idle = Duration::from_millis(self.cfg.negotiate_timeout_ms).saturating_add(self.limits().timeout);
        let ask = self.ask(name, msg, id, Duration::from_hours(24));
        tokio::pin!(ask);
        loop {
            let last = self.state().moved.back_heard(name, id).unwrap_or_else(Instant::now);
            tokio::select! {
                r = &mut ask => return r,
                () = tokio::time::sleep_until((last + idle).into()) => {
                    let now_last = self.state().moved.back_heard(name, id);
                    if now_last == Some(last) {
                        return Err(anyhow!("{name} sent nothing for {} ms", idle.as_millis()));
                    }
                }
            }
        }
    }

    /// An operator's give-back: of `clients`, those moved out from here come home from their
    /// volunteers, and those adopted here go back to their origins, all with their sessions.
    /// Returns how many came home or went back; an error names clients that are neither.
    pub async fn give_back_clients(self: &Arc<Self>, clients: Vec<IpAddr>) -> anyhow::Result<usize> {
        let (mut home, mut back): (ByNode, ByNode) = Default::default();
        let mut neither = Vec::new();
        {
            let st = self.state();
            for c in clients {
                if let Some(m) = st.moved.clients.get(&c) {
                    home.entry(m.to.clone()).or_default().push(c);
                } else if let Some(a) = st.volunteer.adopted.get(&c) {
                    back.entry(a.from.clone()).or_default().push(c);
                } else {
                    neither.push(c);
                }
            }
        }
        if !neither.is_empty() {
            anyhow::bail!("not moved out from here nor adopted here: {}", names(&neither));
        }
        if !home.is_empty() && self.state().drained.is_some() {
            anyhow::bail!("this node is drained: its clients do not come home until `redirector undrain`");
        }
        let returning: Vec<IpAddr> = back.values().flatten().copied().collect();
        let homes = home.into_iter().map(|(to, c)| async move { self.take_home(&to, c, "an operator asked", false).await });
        let backs = back.into_iter().map(|(origin, c)| async move {
            if let Err(e) = self.give_back(&origin, c).await {
                warn!(origin, "cannot give clients back: {e:#}");
            }
        });
        let (came, ()) = futures::future::join(futures::future::join_all(homes), async {
            futures::future::join_all(backs).await;
        })
        .await;
        let st = self.state();
        Ok(came.into_iter().sum::<usize>() + returning.iter().filter(|c| !st.volunteer.adopted.contains_key(c)).count())
    }

    /// Origin: sessions listed for hand-back `id` of `name` (none: an empty `Sessions` frame,
    /// the volunteer still exports).
    pub(super) fn returned_listed(&self, name: &str, id: u64, service: SocketAddr, listed: Vec<ListedSession>) {
        if !self.state().moved.back_listed(name, id, service, listed, Instant::now()) {
            debug!(sibling = %name, id, "sessions of a hand-back this agent is not waiting for: dropped");
        }
    }

    /// Origin: volunteer `from` gives `clients` back (`GiveBack` `id`); answered once the
    /// hand-back ended.
    pub(super) fn given_back(self: &Arc<Self>, from: &str, id: u64, clients: Vec<IpAddr>, reply: &mpsc::Sender<Answer>) {
        let (me, from, reply) = (self.clone(), from.to_string(), reply.clone());
        tokio::spawn(async move {
            let n = clients.len();
            let home = me.take_home(&from, clients, "the volunteer gives them back", false).await;
            info!(sibling = %from, asked = n, home, "a volunteer gave clients back");
            let verdict = if home > 0 { Verdict::Committed } else { Verdict::Aborted };
            if reply.send_timeout(Answer::OutcomeIs { id, verdict }, me.send_deadline()).await.is_err() {
                warn!(sibling = %from, "could not answer a give-back: the link is gone or stuck");
            }
        });
    }

    /// Volunteer: asks origin `origin` to take `clients` back; whether it did. When it did, the
    /// clients are no longer adopted here on return (or, past `SETTLE_WAIT`, still are).
    pub(super) async fn give_back(self: &Arc<Self>, origin: &str, clients: Vec<IpAddr>) -> anyhow::Result<bool> {
        let mut any = false;
        for chunk in peer::addr_chunks(clients, self.cfg.max_frame) {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let n = chunk.len();
            // The origin's hand-back may move a lot of data: bounded by the caller.
            match self.ask(origin, Request::GiveBack { id, clients: chunk.clone() }, id, Duration::from_hours(24)).await? {
                Answer::OutcomeIs { verdict: Verdict::Committed, .. } => {
                    any = true;
                    // The origin answers once its hand-back is decided, but its Commit of it
                    // comes on the other connection and may land a moment later: until then
                    // the clients are still adopted (and busy) here.
                    self.until_settled(&chunk, SETTLE_WAIT).await;
                }
                Answer::OutcomeIs { .. } => info!(origin, clients = n, "the origin did not take the clients back (they stay here)"),
                Answer::Decline { reason, .. } => info!(origin, clients = n, "the origin declined to take the clients back: {}", Said(&reason)),
                other => warn!(origin, "unexpected answer: {}", other.what()),
            }
        }
        Ok(any)
    }

    /// Volunteer: origin `from` takes `clients` home (`HandBack` `id`): this node's
    /// applications export them (frozen), the sessions go back on `reply`, then `Returning`.
    /// Any failure: the applications unfreeze and the origin is told why (`Abort`).
    pub(super) async fn hand_back_out(self: Arc<Self>, from: &str, id: u64, services: Vec<SocketAddr>, clients: Vec<IpAddr>, live: Vec<SocketAddr>, reply: mpsc::Sender<Answer>) {
        let handoff = HandoffId::new(from, id, self.cfg.node.as_str()).to_string();
        let answer = self.export_back(from, id, &services, clients, &live, &reply).await;
        let msg = answer.unwrap_or_else(|reason| {
            warn!(origin = %from, handoff, "refusing to give clients back: {reason}");
            Answer::Abort { id, reason }
        });
        if reply.send_timeout(msg, self.send_deadline()).await.is_err() {
            warn!(origin = %from, handoff, "could not answer the hand-back: the link is gone or stuck (the origin aborts it)");
        }
    }

    async fn export_back(
        self: &Arc<Self>,
        from: &str,
        id: u64,
        services: &[SocketAddr],
        clients: Vec<IpAddr>,
        live: &[SocketAddr],
        reply: &mpsc::Sender<Answer>,
    ) -> Result<Answer, String> {
        let handoff = HandoffId::new(from, id, self.cfg.node.as_str()).to_string();
        let handoff = handoff.as_str();
        if self.sibling(from).is_none() {
            return Err("not a configured sibling".into());
        }
        let mut busy = {
            self.state().hold_to_give_back(&clients)?;
            Busy::new(self.clone(), clients.clone())
        };
        // The local services that serve the origin's services here, and their applications.
        let families: BTreeSet<bool> = clients.iter().map(IpAddr::is_ipv4).collect();
        let mut local_of: HashMap<SocketAddr, SocketAddr> = HashMap::new();
        for svc in services.iter().filter(|s| families.contains(&s.is_ipv4())) {
            let own = self.cfg.serving(*svc).ok_or_else(|| format!("no local service serves {svc} here"))?;
            if own.sessions && !self.apps.has(own.address) {
                return Err(format!("{} keeps sessions (sessions = true) and no application is registered for it", own.address));
            }
            local_of.insert(own.address, *svc);
        }
        let apps: Vec<SocketAddr> = local_of.keys().copied().filter(|s| self.apps.has(*s)).collect();
        // The origin takes the open connections of `live` home too.
        let moves: Vec<SocketAddr> = apps.iter().copied().filter(|s| local_of.get(s).is_some_and(|svc| live.contains(svc))).collect();
        // The export (the applications' answers list their sessions), under the origin's
        // service addresses; an empty `Sessions` frame every half lease keeps the origin waiting.
        let (max_frame, deadline) = (self.cfg.max_frame, self.send_deadline());
        let exported = {
            let work = self.export_all(handoff, &apps, &clients, &moves);
            tokio::pin!(work);
            let mut keepalive = keepalive(self.cfg.lease_ms);
            let any = services.first().copied();
            loop {
                tokio::select! {
                    r = &mut work => break r,
                    _ = keepalive.tick() => if let Some(service) = any {
                        let _ = reply.send_timeout(Answer::Sessions { id, service, sessions: Vec::new() }, deadline).await;
                    },
                }
            }
        };
        let exports: Vec<(SocketAddr, Exported)> = match exported {
            Ok(e) => e.into_iter().map(|(local, e)| (local_of.get(&local).copied().unwrap_or(local), e)).collect(),
            Err(e) => {
                // Some may have frozen: they unfreeze (told until they confirm).
                self.settle_apps_back(apps, handoff.to_string(), busy.take(), false, HashMap::new());
                return Err(format!("export failed: {e:#}"));
            }
        };
        let n_sessions: usize = exports.iter().map(|(_, e)| e.sizes().count()).sum();
        let here: HashMap<IpAddr, u64> = self.state().load.clients.iter().copied().collect();
        let back: Vec<MovedClient> = clients.iter().map(|c| MovedClient { addr: *c, connections: here.get(c).copied().unwrap_or(0) }).collect();
        // Recorded before the answer leaves, so that Commit and Abort find it (and an
        // interrupted hand-back is settled by asking the origin).
        {
            let acked = Acked::new(apps, handoff.to_string(), Role::Export, busy.take(), Instant::now() + QUERY_AFTER);
            self.state().volunteer.acked.insert((NodeName::from(from), id), acked);
        }
        // The sessions listed, `Returning`, then the sessions as they arrive from the
        // applications, and `Sealed` with their count and digest per service.
        let mut frames: Vec<Answer> = Vec::new();
        for (service, e) in &exports {
            let listed = e.sizes().map(|(client, len)| ListedSession { client, len: u64::try_from(len).unwrap_or(u64::MAX) }).collect();
            frames.extend(peer::listed_chunks(listed, max_frame).into_iter().map(|sessions| Answer::Listed { id, service: *service, sessions }));
        }
        let n_back = back.len();
        frames.push(Answer::Returning { id, clients: back });
        for f in frames {
            reply.send_timeout(f, deadline).await.map_err(|_| "the link to the origin is gone or stuck".to_string())?;
        }
        info!(origin = %from, handoff, clients = n_back, sessions = n_sessions, "giving clients back: exported (frozen until the origin commits), sessions on their way");
        let mut exports = exports;
        // Their open connections: frozen by the origin, then dumped here.
        if !live.is_empty() {
            self.leave_home(from, id, handoff, &mut exports, reply).await?;
        }
        let mut sets = send_sessions(&mut exports, max_frame, |service, sessions| {
            Box::pin(async move { reply.send_timeout(Answer::Sessions { id, service, sessions }, deadline).await.map_err(|_| anyhow!("the link to the origin is gone or stuck")) })
        })
        .await
        .map_err(|e| format!("{e:#}"))?;
        self.send_home(from, id, &mut exports, reply, &mut sets).await?;
        self.faults.pause("pause-after-export", handoff).await;
        Ok(Answer::Sealed { id, sessions: sets })
    }

    /// Volunteer: tells the applications of `apps` how hand-back `handoff` ended, giving each
    /// its connections in `given`; on commit the clients' room here is free again. `clients`
    /// stay busy until they confirm.
    pub(super) fn settle_apps_back(
        self: &Arc<Self>,
        apps: Vec<SocketAddr>,
        handoff: String,
        clients: Vec<IpAddr>,
        commit: bool,
        mut given: HashMap<SocketAddr, Vec<crate::app::AppConnection>>,
    ) {
        let me = self.clone();
        tokio::spawn(async move {
            futures::future::join_all(apps.iter().map(|s| me.apps.settle_with(*s, &handoff, commit, given.remove(s).unwrap_or_default()))).await;
            me.unbusy(&clients);
        });
    }
}
