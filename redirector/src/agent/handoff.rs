//! The hand-over of clients and their sessions, and how its outcome is known.
//!
//! Two phases: export (sessions frozen by the origin's applications) -> `Sessions` frames and
//! `Transfer` (counted and digested per service) -> import on the volunteer (tentative) ->
//! `TransferAck` -> the origin installs the kernel rules -> commit.
//!
//! The commit point is the origin installing the rules: they are pinned in the kernel and
//! outlive the agent. So the outcome of every hand-over is recoverable from the origin's
//! kernel: committed if and only if its rules send those clients to that volunteer. The
//! origin keeps a record of each decision for an hour (so a volunteer that asks later gets the
//! same answer), but the rules decide whenever there is no record (after a restart).
//! Applications never decide: commit and abort are retried until they confirm them, and when
//! an application registers again it reports what it has not seen end, which the agent
//! answers from the rules (origin) or by asking the origin (volunteer, `Outcome`).

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::anyhow;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::{Acked, Agent, MigratedOut, flat, host_prefix, unix_now};
use crate::{
    app::{PendingHandoff, Registration, Role},
    datapath::{Datapath, Prefix, RuleInfo, RuleState, family_name},
    peer::{self, MovedClient, Msg, OUTCOME_SAMPLE, SessionBlob, SessionSet, Verdict},
};

/// At most this many clients are named in one log line.
pub(super) const NAMED: usize = 16;

/// How long an origin remembers how its hand-overs ended (the rules decide after that).
const REMEMBER: Duration = Duration::from_hours(1);

/// A hand-over's name, as applications see it: `ORIGIN/ID/VOLUNTEER` (node names never
/// contain '/'; the id is the origin's transfer id, unique across its restarts).
pub(super) fn handoff_name(origin: &str, id: u64, volunteer: &str) -> String {
    format!("{origin}/{id}/{volunteer}")
}

/// (origin, id, volunteer) of a hand-over name.
pub(super) fn parse_handoff(h: &str) -> Option<(&str, u64, &str)> {
    let mut it = h.split('/');
    let (o, id, v) = (it.next()?, it.next()?.parse().ok()?, it.next()?);
    (it.next().is_none() && !o.is_empty() && !v.is_empty()).then_some((o, id, v))
}

/// Some of `clients`, of each family, for an `Outcome` question.
pub(super) fn sample(clients: &[IpAddr]) -> Vec<IpAddr> {
    let half = OUTCOME_SAMPLE / 2;
    let v4 = clients.iter().filter(|c| c.is_ipv4()).take(half);
    let v6 = clients.iter().filter(|c| c.is_ipv6()).take(half);
    v4.chain(v6).copied().collect()
}

/// Clients in a hand-over in progress: no longer busy when dropped, unless taken.
pub(super) struct Busy {
    agent: Arc<Agent>,
    clients: Vec<IpAddr>,
}

impl Busy {
    /// Takes over `clients`, already marked busy.
    pub(super) fn new(agent: Arc<Agent>, clients: Vec<IpAddr>) -> Self {
        Self { agent, clients }
    }

    /// Hands the clients on (to whoever frees them later).
    pub(super) fn take(&mut self) -> Vec<IpAddr> {
        std::mem::take(&mut self.clients)
    }

    /// Frees `keep`'s complement now: clients that will not be part of any transfer.
    pub(super) fn keep_only(&mut self, keep: &std::collections::HashSet<IpAddr>) {
        let (stay, free): (Vec<IpAddr>, Vec<IpAddr>) = self.clients.iter().partition(|c| keep.contains(c));
        self.agent.unbusy(&free);
        self.clients = stay;
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.agent.unbusy(&self.clients);
    }
}

/// The `Sessions` frames of transfer `id`: each service's sessions in frames under
/// `max_frame`.
fn session_frames(id: u64, exported: Vec<(SocketAddr, Vec<SessionBlob>)>, max_frame: usize) -> Vec<Msg> {
    let mut frames: Vec<Msg> = Vec::new();
    let budget = max_frame.saturating_sub(4096).max(1);
    for (service, sessions) in exported {
        let (mut chunk, mut size): (Vec<SessionBlob>, usize) = (Vec::new(), 0);
        for s in sessions {
            if size + s.blob.len() + 64 > budget && !chunk.is_empty() {
                frames.push(Msg::Sessions { id, service, sessions: std::mem::take(&mut chunk) });
                size = 0;
            }
            size += s.blob.len() + 64;
            chunk.push(s);
        }
        if !chunk.is_empty() {
            frames.push(Msg::Sessions { id, service, sessions: chunk });
        }
    }
    frames
}

/// How a client appears in a log line: its address, with its connections when known.
pub(super) trait Named {
    fn named(&self) -> String;
}

impl Named for IpAddr {
    fn named(&self) -> String {
        self.to_string()
    }
}

impl Named for (IpAddr, u64) {
    fn named(&self) -> String {
        format!("{}({})", self.0, self.1)
    }
}

/// The first [`NAMED`] of `clients` for a log line, and how many more there are.
pub(super) fn names<T: Named>(clients: &[T]) -> String {
    let mut s: Vec<String> = clients.iter().take(NAMED).map(Named::named).collect();
    if clients.len() > NAMED {
        s.push(format!("and {} more", clients.len() - NAMED));
    }
    s.join(" ")
}

/// How `clients` stand in the kernel's `rules` with respect to a sibling whose control
/// addresses are `targets`: (steered there, active or draining; with no rule at all).
fn classify_for(rules: &[RuleInfo], targets: &[IpAddr], clients: &[IpAddr]) -> (Vec<IpAddr>, Vec<IpAddr>) {
    let by: HashMap<IpAddr, &RuleInfo> = rules.iter().filter(|r| r.prefix == host_prefix(r.prefix.addr) && r.state != RuleState::Drained).map(|r| (r.prefix.addr, r)).collect();
    let (mut steered, mut none) = (Vec::new(), Vec::new());
    for c in clients {
        match by.get(c) {
            Some(r) if targets.contains(&r.target) => steered.push(*c),
            Some(_) => {}
            None => none.push(*c),
        }
    }
    (steered, none)
}

impl Agent {
    pub(super) fn unbusy(&self, clients: &[IpAddr]) {
        if clients.is_empty() {
            return;
        }
        let mut st = self.state();
        for c in clients {
            st.busy.remove(c);
        }
    }

    /// Whether `svc` is a local service configured with `sessions = true`.
    pub(super) fn keeps_sessions(&self, svc: SocketAddr) -> bool {
        self.cfg.services.iter().any(|s| s.address == svc && s.sessions)
    }

    /// Origin: one volunteer's share, two-phase. Export (sessions frozen in the applications)
    /// -> Sessions + Clients + Transfer -> `TransferAck` -> rules installed (the commit point)
    /// -> commit; any failure before the rules are in place aborts everywhere (sessions
    /// unfrozen here, dropped there).
    pub(super) async fn transfer(self: &Arc<Self>, name: &str, id: u64, clients: Vec<MovedClient>, timeout: Duration) -> usize {
        let handoff = handoff_name(&self.cfg.node, id, name);
        let addrs: Vec<IpAddr> = clients.iter().map(|c| c.addr).collect();
        let mut busy = Busy::new(self.clone(), addrs.clone());
        let t0 = Instant::now();
        self.state().outcomes.insert((name.to_string(), id), (Verdict::Pending, t0));
        let families: BTreeSet<bool> = clients.iter().map(|c| c.addr.is_ipv4()).collect();
        let services: Vec<SocketAddr> = self.cfg.services.iter().map(|s| s.address).filter(|s| families.contains(&s.is_ipv4())).collect();
        let tunnel_src: Vec<IpAddr> = self.cfg.control_addresses().into_iter().filter(|a| families.contains(&a.is_ipv4())).collect();
        // Every application of these clients' services hands their sessions over (a service
        // that keeps sessions must have one: `move_clients` checked).
        let apps: Vec<SocketAddr> = services.iter().copied().filter(|s| self.apps.has(*s) || self.keeps_sessions(*s)).collect();
        // The export, and what the volunteer must receive of it, per service (count and
        // digest), with the volunteer's reservation kept alive all along.
        let prepared = self
            .keep_lease(name, id, &apps, async {
                let exported = self.export_all(&handoff, &apps, &addrs).await?;
                let t_export = t0.elapsed();
                let (exported, sets) = tokio::task::spawn_blocking(move || {
                    let sets: Vec<SessionSet> =
                        exported.iter().map(|(svc, s)| SessionSet { service: *svc, count: u64::try_from(s.len()).unwrap_or(u64::MAX), digest: peer::digest(s) }).collect();
                    (exported, sets)
                })
                .await?;
                Ok::<_, anyhow::Error>((exported, sets, t_export))
            })
            .await;
        let (exported, sets, t_export) = match prepared {
            Ok(p) => p,
            Err(e) => {
                self.conclude(name, id, &handoff, &apps, busy.take(), false, format!("export failed: {e:#}")).await;
                return 0;
            }
        };
        let n_sessions: usize = exported.iter().map(|(_, s)| s.len()).sum();
        // The time the volunteer's imports may take.
        let allowance: Duration = exported.iter().filter(|(_, s)| !s.is_empty()).map(|(_, s)| self.limits().import_allowance(s)).sum();
        // Session blobs and long client lists first, in frames under the peer limit.
        let mut frames = session_frames(id, exported, self.cfg.max_frame);
        let mut parts = peer::client_chunks(clients.clone(), &services, self.cfg.max_frame);
        let last = parts.pop().unwrap_or_default();
        frames.extend(parts.into_iter().map(|c| Msg::Clients { id, clients: c }));
        let mut dropped = false;
        for f in frames {
            if self.faults.drop_sessions_frame && !dropped && matches!(&f, Msg::Sessions { sessions, .. } if !sessions.is_empty()) {
                warn!(sibling = %name, handoff, "TEST FAULT drop-sessions-frame: leaving out a Sessions frame");
                dropped = true;
                continue;
            }
            if let Err(e) = self.send_to(name, f).await {
                self.conclude(name, id, &handoff, &apps, busy.take(), false, format!("sending the transfer failed: {e:#}")).await;
                return 0;
            }
        }
        let msg = Msg::Transfer { id, services, tunnel_src, clients: last, sessions: sets };
        let answer = self.ask(name, msg, id, timeout.saturating_add(allowance)).await;
        let refused = match answer {
            Ok(Msg::TransferAck { .. }) => None,
            Ok(Msg::Abort { reason, .. }) => Some(format!("the volunteer refused: {reason}")),
            Ok(other) => Some(format!("unexpected answer {other:?}")),
            Err(e) => Some(format!("transfer failed: {e:#}")),
        };
        if let Some(why) = refused {
            self.conclude(name, id, &handoff, &apps, busy.take(), false, why).await;
            return 0;
        }
        let t_ack = t0.elapsed();
        let n = clients.len();
        if let Err(e) = self.steer(name, &clients).await {
            // All or nothing, unless something failed to clean up: the rules decide.
            match self.steered_to(name, &addrs).await {
                Ok((steered, _)) if !steered.is_empty() => {
                    error!(sibling = %name, handoff, steered = steered.len(), "installing the rules failed ({e:#}) but some are in place: the hand-over commits (the rules decide)");
                }
                _ => {
                    self.conclude(name, id, &handoff, &apps, busy.take(), false, format!("rules not installed: {e:#}")).await;
                    return 0;
                }
            }
        }
        let t_steer = t0.elapsed();
        if let Some(d) = self.faults.pause_before_commit {
            warn!(sibling = %name, handoff, "TEST FAULT pause-before-commit: rules installed, waiting {} ms before committing", d.as_millis());
            tokio::time::sleep(d).await;
        }
        self.conclude(name, id, &handoff, &apps, busy.take(), true, String::new()).await;
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

    /// Exports the sessions of `clients` from every application in `apps` at once.
    async fn export_all(self: &Arc<Self>, handoff: &str, apps: &[SocketAddr], clients: &[IpAddr]) -> anyhow::Result<Vec<(SocketAddr, Vec<SessionBlob>)>> {
        if let Some(svc) = apps.iter().find(|s| !self.apps.has(**s)) {
            return Err(anyhow!("service {svc} keeps sessions (sessions = true) and no application is registered for it"));
        }
        futures::future::try_join_all(apps.iter().map(|svc| async move { self.apps.export(*svc, handoff, clients).await.map(|s| (*svc, s)) })).await
    }

    /// Runs `work` while keeping volunteer `name`'s reservation for transfer `id` alive (an
    /// empty `Sessions` frame every half lease): a big export outlasts a lease.
    async fn keep_lease<T>(self: &Arc<Self>, name: &str, id: u64, apps: &[SocketAddr], work: impl Future<Output = T>) -> T {
        let Some(service) = apps.first().copied() else { return work.await };
        tokio::pin!(work);
        let mut keepalive = tokio::time::interval(Duration::from_millis((self.cfg.lease_ms / 2).max(50)));
        keepalive.tick().await;
        loop {
            tokio::select! {
                r = &mut work => return r,
                _ = keepalive.tick() => {
                    let _ = self.send_to(name, Msg::Sessions { id, service, sessions: Vec::new() }).await;
                }
            }
        }
    }

    /// Decides hand-over (`name`, `id`): records it, tells the volunteer, and tells the
    /// applications in `apps` until they confirm; `clients` stay busy until then.
    #[expect(clippy::too_many_arguments, reason = "one hand-over's facts")]
    async fn conclude(self: &Arc<Self>, name: &str, id: u64, handoff: &str, apps: &[SocketAddr], clients: Vec<IpAddr>, commit: bool, why: String) {
        let verdict = if commit { Verdict::Committed } else { Verdict::Aborted };
        self.state().outcomes.insert((name.to_string(), id), (verdict, Instant::now()));
        let me = self.clone();
        let (apps, h) = (apps.to_vec(), handoff.to_string());
        let settled = tokio::spawn(async move {
            futures::future::join_all(apps.iter().map(|s| me.apps.settle(*s, &h, commit))).await;
            me.unbusy(&clients);
        });
        if commit {
            self.tell(name, handoff, Msg::Commit { id }).await;
        } else {
            warn!(sibling = %name, handoff, "hand-over aborted, nothing steered: {why}");
            if self.faults.drop_abort {
                warn!(sibling = %name, handoff, "TEST FAULT drop-abort: not telling the volunteer");
            } else {
                self.tell(name, handoff, Msg::Abort { id, reason: why }).await;
            }
        }
        // The applications normally confirm at once: the hand-over ends with them (and its
        // clients may move again). One that does not is told in the background, for as long
        // as it takes.
        let _ = tokio::time::timeout(self.limits().timeout, settled).await;
    }

    /// Installs the rules for clients a volunteer acknowledged: per family, one probe through
    /// the tunnel to the volunteer's control address of that family, then every rule; all or
    /// nothing.
    pub(super) async fn steer(self: &Arc<Self>, name: &str, clients: &[MovedClient]) -> anyhow::Result<()> {
        let sib = self.cfg.sibling(name).ok_or_else(|| anyhow!("{name} is not a configured sibling"))?;
        let mut groups: Vec<(IpAddr, Vec<Prefix>)> = Vec::new();
        for v4 in [true, false] {
            let prefixes: Vec<Prefix> = clients.iter().filter(|c| c.addr.is_ipv4() == v4).map(|c| host_prefix(c.addr)).collect();
            if let Some(first) = prefixes.first() {
                let target = sib.control_address(first.addr).ok_or_else(|| anyhow!("{name} has no {} control address", family_name(first.addr.is_ipv4())))?;
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

    /// Of `clients`, those the kernel's rules send to sibling `name`, and those with no rule.
    async fn steered_to(self: &Arc<Self>, name: &str, clients: &[IpAddr]) -> anyhow::Result<(Vec<IpAddr>, Vec<IpAddr>)> {
        let targets = self.cfg.sibling(name).ok_or_else(|| anyhow!("{name} is not a configured sibling"))?.control_addresses();
        let rules = self.with_reader(Datapath::list_rules).await??;
        Ok(classify_for(&rules, &targets, clients))
    }

    /// Origin: how hand-over `id` to `volunteer` ended, for the volunteer's `Outcome`
    /// question: the record, or else the kernel's rules for `clients`.
    pub(super) async fn verdict_for(self: &Arc<Self>, volunteer: &str, id: u64, clients: &[IpAddr]) -> Verdict {
        let key = (volunteer.to_string(), id);
        if let Some((v, _)) = self.state().outcomes.get(&key) {
            return *v;
        }
        match self.steered_to(volunteer, clients).await {
            Ok((steered, _)) => {
                let v = if steered.is_empty() { Verdict::Aborted } else { Verdict::Committed };
                info!(sibling = %volunteer, id, clients = clients.len(), steered = steered.len(), verdict = ?v, "asked how a hand-over ended that this agent keeps no record of: the kernel's rules say");
                // Another question gets the same answer, whatever happens to the rules.
                self.state().outcomes.entry(key).or_insert((v, Instant::now())).0
            }
            Err(e) => {
                warn!(sibling = %volunteer, id, "cannot tell how a hand-over ended, the rules cannot be read: {e:#}");
                Verdict::Pending
            }
        }
    }

    /// Forgets decisions older than an hour (the rules still decide).
    pub(super) fn forget_old_outcomes(&self) {
        self.state().outcomes.retain(|_, (v, at)| *v == Verdict::Pending || at.elapsed() < REMEMBER);
    }

    /// Applications registering: their unfinished hand-overs are decided before they get any
    /// request.
    pub(super) async fn registrations(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Registration>) {
        while let Some(r) = rx.recv().await {
            let (exports, imports): (Vec<PendingHandoff>, Vec<PendingHandoff>) = r.pending.into_iter().partition(|p| p.role == Role::Export);
            if !exports.is_empty() {
                self.resolve_exports(r.service, exports).await;
            }
            for p in imports {
                self.resolve_import(r.service, p);
            }
            let _ = r.done.send(());
        }
    }

    /// Origin: the application of `service` froze the clients of these hand-overs and never
    /// heard how they ended (it or this agent restarted). The record says, or else the rules:
    /// committed if they send any of its clients to its volunteer (those without a rule are
    /// then steered too: the old agent died half way), aborted otherwise.
    async fn resolve_exports(self: &Arc<Self>, service: SocketAddr, pending: Vec<PendingHandoff>) {
        let mut undecided = Vec::new();
        for p in pending {
            let Some((origin, id, volunteer)) = parse_handoff(&p.handoff).map(|(o, i, v)| (o.to_string(), i, v.to_string())) else {
                warn!(%service, handoff = p.handoff, "the application reports an unfinished export this agent cannot have asked for (not ORIGIN/ID/VOLUNTEER): left unfinished");
                continue;
            };
            if origin != self.cfg.node {
                warn!(%service, handoff = p.handoff, "the application reports an unfinished export of another origin ({origin}): left unfinished");
                continue;
            }
            if self.apps.owes(service, &p.handoff).is_some() {
                continue;
            }
            let known = self.state().outcomes.get(&(volunteer.clone(), id)).map(|v| v.0);
            match known {
                // Its transfer is running: it tells the application when it ends.
                Some(Verdict::Pending) => info!(%service, handoff = p.handoff, "the application reports a hand-over still in progress: it is told when it ends"),
                Some(v) => {
                    info!(%service, handoff = p.handoff, verdict = ?v, "the application reports a hand-over it did not see end: telling it again");
                    self.settle_export(service, p.handoff, p.clients, v == Verdict::Committed);
                }
                None => undecided.push((p, volunteer, id)),
            }
        }
        if undecided.is_empty() {
            return;
        }
        let rules = match flat(self.with_reader(Datapath::list_rules).await) {
            Ok(r) => r,
            Err(e) => return error!(%service, "cannot read the rules to decide unfinished hand-overs (left unfinished): {e}"),
        };
        for (p, volunteer, id) in undecided {
            let Some(sib) = self.cfg.sibling(&volunteer) else {
                // Not a sibling any more: committed is undecidable. A client steered nowhere can
                // only be served here, with this copy.
                let (_, none) = classify_for(&rules, &[], &p.clients);
                if none.len() == p.clients.len() {
                    warn!(%service, handoff = p.handoff, "unfinished hand-over to {volunteer}, no longer a sibling; none of its clients is steered anywhere: aborted");
                    self.settle_export(service, p.handoff, p.clients, false);
                } else {
                    error!(%service, handoff = p.handoff, "unfinished hand-over to {volunteer}, no longer a sibling, whose clients are steered: left unfinished (add the sibling back or remove the rules)");
                }
                continue;
            };
            let (steered, none) = classify_for(&rules, &sib.control_addresses(), &p.clients);
            let commit = !steered.is_empty();
            let verdict = if commit { Verdict::Committed } else { Verdict::Aborted };
            self.state().outcomes.insert((volunteer.clone(), id), (verdict, Instant::now()));
            info!(
                %service,
                handoff = p.handoff,
                clients = p.clients.len(),
                steered = steered.len(),
                "the application reports an unfinished hand-over; the kernel's rules {}",
                if commit { "send its clients to the volunteer: committed" } else { "do not: aborted" }
            );
            if commit && !none.is_empty() {
                warn!(%service, handoff = p.handoff, clients = none.len(), "the hand-over's rules are only partly in place (the agent stopped half way): steering the rest: {}", names(&none));
                let (me, missing) = (self.clone(), none.iter().map(|c| MovedClient { addr: *c, connections: 0 }).collect::<Vec<_>>());
                tokio::spawn(async move {
                    if let Err(e) = me.steer(&volunteer, &missing).await {
                        error!(sibling = %volunteer, "steering the rest of a committed hand-over failed: {e:#}");
                    }
                });
            }
            self.settle_export(service, p.handoff, p.clients, commit);
        }
    }

    /// Tells the application of `service` how export `handoff` ended, its clients busy until
    /// it confirms.
    fn settle_export(self: &Arc<Self>, service: SocketAddr, handoff: String, clients: Vec<IpAddr>, commit: bool) {
        {
            let mut st = self.state();
            st.busy.extend(clients.iter().copied());
        }
        let me = self.clone();
        tokio::spawn(async move {
            me.apps.settle(service, &handoff, commit).await;
            me.unbusy(&clients);
        });
    }

    /// Volunteer: the application of `service` imported the sessions of this hand-over and
    /// never heard how it ended: the origin is asked (again and again until it knows).
    fn resolve_import(self: &Arc<Self>, service: SocketAddr, p: PendingHandoff) {
        let Some((origin, id, volunteer)) = parse_handoff(&p.handoff) else {
            warn!(%service, handoff = p.handoff, "the application reports an unfinished import this agent cannot have asked for (not ORIGIN/ID/VOLUNTEER): left unfinished");
            return;
        };
        if volunteer != self.cfg.node {
            warn!(%service, handoff = p.handoff, "the application reports an unfinished import for another node ({volunteer}): left unfinished");
            return;
        }
        if self.cfg.sibling(origin).is_none() {
            warn!(%service, handoff = p.handoff, "the application reports an unfinished import from {origin}, not a sibling: cannot ask it, left unfinished");
            return;
        }
        if self.apps.owes(service, &p.handoff).is_some() {
            return;
        }
        let key = (origin.to_string(), id);
        let mut st = self.state();
        if st.importing.contains(&key) {
            return;
        }
        let now = Instant::now();
        if let Some(a) = st.acked.get_mut(&key) {
            if !a.apps.contains(&service) {
                a.apps.push(service);
            }
            return;
        }
        info!(%service, handoff = p.handoff, clients = p.clients.len(), "the application reports an unfinished import: asking {origin} how it ended");
        st.acked.insert(key, Acked { apps: vec![service], handoff: p.handoff, sample: sample(&p.clients), next_query: now, backoff: Duration::from_secs(1), querying: false });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_over_names_carry_origin_id_and_volunteer() {
        let h = handoff_name("node-1", 12345, "b");
        assert_eq!(h, "node-1/12345/b");
        assert_eq!(parse_handoff(&h), Some(("node-1", 12345, "b")));
        for bad in ["a-1-b", "a/x/b", "a/1", "a/1/b/c", "/1/b", "a/1/"] {
            assert_eq!(parse_handoff(bad), None, "{bad}");
        }
    }

    #[test]
    fn log_lines_name_a_few_clients_and_count_the_rest() {
        let c: Vec<IpAddr> = (0..=u8::try_from(NAMED).unwrap()).map(|i| IpAddr::from([198, 18, 1, i])).collect();
        let line = names(&c);
        assert!(line.starts_with("198.18.1.0 198.18.1.1 "), "{line}");
        assert!(line.ends_with(&format!("198.18.1.{} and 1 more", NAMED - 1)), "{line}");
        assert_eq!(names(&[(c[5], 3), (c[6], 1)]), "198.18.1.5(3) 198.18.1.6(1)");
    }

    #[test]
    fn the_rules_say_where_clients_are_steered() {
        let rule = |c: &str, to: &str, state| RuleInfo { prefix: host_prefix(c.parse().unwrap()), target: to.parse().unwrap(), state, drain_left_ms: 0, since_unix: 0 };
        let rules = [
            rule("198.18.1.1", "198.18.0.2", RuleState::Active),
            rule("198.18.1.2", "198.18.0.2", RuleState::Draining),
            rule("198.18.1.3", "198.18.0.3", RuleState::Active),
            rule("198.18.1.4", "198.18.0.2", RuleState::Drained),
        ];
        let c: Vec<IpAddr> = (1..=5).map(|i| IpAddr::from([198, 18, 1, i])).collect();
        let (steered, none) = classify_for(&rules, &["198.18.0.2".parse().unwrap()], &c);
        assert_eq!(steered, c[..2].to_vec(), "active and draining rules to the volunteer");
        assert_eq!(none, vec![c[3], c[4]], "a drained rule is no rule; .3 goes elsewhere");
        let many: Vec<IpAddr> = (0..1000u32).map(|i| IpAddr::from(std::net::Ipv4Addr::from(i))).chain([IpAddr::from(std::net::Ipv6Addr::LOCALHOST)]).collect();
        let s = sample(&many);
        assert_eq!(s.len(), OUTCOME_SAMPLE / 2 + 1, "both families are in the sample");
    }
}
