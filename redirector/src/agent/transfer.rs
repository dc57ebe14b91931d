//! The hand-over out, on the origin: export (the sessions frozen in this node's applications)
//! -> `Sessions`, `Clients` and `Transfer` -> `TransferAck` (the volunteer imported and is
//! ready) -> the rules installed (the commit point) -> commit. Any failure before the rules
//! are in aborts everywhere; a failure while installing them is decided by the rules.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::anyhow;
use tracing::{info, warn};

use super::{
    Agent,
    handoff::{Busy, Handover, NAMED, keepalive, send_sessions},
    host_prefix,
    records::{Dir, Record},
    tally::{End, Stage},
};
use crate::{
    app::Exported,
    datapath::{Prefix, family_name},
    peer::{self, Answer, HandoffId, ListedSession, MovedClient, Request, Said, SessionBlob},
};

impl Agent {
    /// One volunteer's share of a round, two-phase; returns the clients moved.
    pub(super) async fn transfer(self: &Arc<Self>, name: &str, id: u64, clients: Vec<MovedClient>, timeout: Duration) -> usize {
        let handoff = HandoffId::new(self.cfg.node.as_str(), id, name).to_string();
        let addrs: Vec<IpAddr> = clients.iter().map(|c| c.addr).collect();
        let busy = Busy::new(self.clone(), addrs.clone());
        let t0 = Instant::now();
        let families: BTreeSet<bool> = clients.iter().map(|c| c.addr.is_ipv4()).collect();
        let services: Vec<SocketAddr> = self.cfg.services.iter().map(|s| s.address).filter(|s| families.contains(&s.is_ipv4())).collect();
        let tunnel_src: Vec<IpAddr> = self.cfg.control_addresses().into_iter().filter(|a| families.contains(&a.is_ipv4())).collect();
        // Every application of these clients' services hands their sessions over (a service
        // that keeps sessions must have one: `move_clients` checked).
        let apps: Vec<SocketAddr> = services.iter().copied().filter(|s| self.apps.has(*s) || self.keeps_sessions(*s)).collect();
        let targets = self.sibling(name).map(|s| s.control_addresses()).unwrap_or_default();
        let rec = Record { id, dir: Dir::Out, volunteer: name.to_string(), targets, clients: addrs.clone(), apps: apps.clone() };
        let started = self.records().start(rec);
        let rec = match started {
            Ok(r) => r,
            Err(e) => {
                warn!(sibling = %name, handoff, "not starting the hand-over: it cannot be recorded: {e:#}");
                let _ = self.send_to(name, Request::Abort { id, reason: "the origin cannot record the hand-over".into() }).await;
                return 0;
            }
        };
        self.tally.started(Dir::Out);
        let mut h = Handover::new(rec, busy, t0);
        // The export: the applications' answers list their sessions (the volunteer's
        // reservation is kept alive meanwhile).
        let (mut exports, holds) = match self.export_out(name, id, &handoff, &apps, &addrs).await {
            Ok(e) => e,
            Err(e) => {
                self.conclude(h, End::Aborted(Stage::Export, format!("export failed: {e:#}"))).await;
                return 0;
            }
        };
        // Their open connections handed over: frozen and dumped, sent after the sessions.
        h.moving = Some(self.freeze_connections(&mut exports, &handoff, holds).await).filter(|m| !m.is_empty());
        let t_export = t0.elapsed();
        let (n_sessions, bytes) =
            exports.iter().flat_map(|(_, e)| e.sizes()).fold((0usize, 0u64), |(n, b), (_, len)| (n + 1, b.saturating_add(u64::try_from(len).unwrap_or(u64::MAX))));
        h.sessions = (n_sessions, bytes);
        // The time the volunteer's imports may take.
        let allowance: Duration = exports.iter().filter(|(_, e)| e.sizes().next().is_some()).map(|(_, e)| self.limits().import_allowance(e.sizes().map(|(_, len)| len))).sum();
        // The clients and the sessions listed, in frames under the peer limit, then the
        // `Transfer`, which the volunteer checks before it starts importing; then the sessions
        // as they arrive from the applications, counted and digested per service (`Sealed`).
        // The volunteer answers once they are all in, or refuses at any time.
        let max_frame = self.cfg.max_frame;
        let frames = transfer_frames(id, &clients, services, tunnel_src, &exports, max_frame);
        let (faults, mut dropped, mut t_sent) = (self.faults.clone(), false, t0.elapsed());
        let mut moving_ref = h.moving.take();
        let send = async {
            for f in frames {
                self.send_to(name, f).await.map_err(|e| anyhow!("sending the transfer failed: {e:#}"))?;
            }
            let mut sets = send_sessions(&mut exports, max_frame, |service, sessions| {
                if faults.drop_sessions_frame && !dropped && !sessions.is_empty() {
                    warn!(sibling = %name, handoff, "TEST FAULT drop-sessions-frame: leaving out a Sessions frame");
                    dropped = true;
                    return Box::pin(std::future::ready(Ok(())));
                }
                Box::pin(async move { self.send_to(name, Request::Sessions { id, service, sessions }).await.map_err(|e| anyhow!("sending the transfer failed: {e:#}")) })
            })
            .await?;
            if let Some(m) = moving_ref.as_mut() {
                let counts = self.send_connections(name, id, m, &mut exports).await.map_err(|e| anyhow!("sending the open connections failed: {e:#}"))?;
                super::live::count_into(&mut sets, counts);
            }
            self.faults.pause("pause-after-export", &handoff).await;
            self.send_to(name, Request::Sealed { id, sessions: sets }).await.map_err(|e| anyhow!("sending the transfer failed: {e:#}"))?;
            t_sent = t0.elapsed();
            Ok(())
        };
        let answer = self.ask_while(name, id, timeout.saturating_add(allowance), send).await;
        h.moving = moving_ref;
        let refused = match answer {
            Ok(Answer::TransferAck { .. }) => None,
            Ok(Answer::Abort { reason, .. }) => Some(format!("the volunteer refused: {}", Said(&reason))),
            Ok(other) => Some(format!("unexpected answer: {}", other.what())),
            Err(e) => Some(format!("transfer failed: {e:#}")),
        };
        if let Some(why) = refused {
            self.conclude(h, End::Aborted(Stage::Transfer, why)).await;
            return 0;
        }
        let t_ack = t0.elapsed();
        if let Err(why) = self.settled(h.moving.as_mut()).await {
            self.conclude(h, End::Aborted(Stage::Transfer, why)).await;
            return 0;
        }
        self.faults.pause("pause-before-rules", &handoff).await;
        let n = clients.len();
        // All or nothing, unless something failed to clean up: then the rules decide.
        let steered = self.steer(name, &clients).await.map_err(|e| format!("{e:#}"));
        let Some(t_steer) = self.at_commit_point(h, steered).await else { return 0 };
        info!(
            sibling = %name,
            handoff,
            clients = n,
            sessions = n_sessions,
            export_ms = t_export.as_millis(),
            sent_ms = t_sent.as_millis(),
            acked_ms = t_ack.as_millis(),
            steered_ms = t_steer.as_millis(),
            committed_ms = t0.elapsed().as_millis(),
            "hand-over committed"
        );
        n
    }

    /// The export of a hand-over out (volunteer `name`'s reservation for transfer `id` kept
    /// alive meanwhile), with the packet copies a move of its connections needs opening
    /// alongside.
    async fn export_out(
        self: &Arc<Self>,
        name: &str,
        id: u64,
        handoff: &str,
        apps: &[SocketAddr],
        clients: &[IpAddr],
    ) -> anyhow::Result<(Vec<(SocketAddr, Exported)>, super::live::Opened)> {
        let holds = self.open_holds(apps);
        let moves: Vec<SocketAddr> = apps.iter().copied().filter(|s| self.moves_live(*s)).collect();
        let exports = self.keep_lease(name, id, apps, self.export_all(handoff, apps, clients, &moves)).await?;
        Ok((exports, holds))
    }

    /// Asks every application in `apps` at once to export the sessions of `clients`: their
    /// answers, whose sessions follow as they are taken. The applications of `moves` hand over
    /// the clients' open connections too.
    pub(super) async fn export_all(self: &Arc<Self>, handoff: &str, apps: &[SocketAddr], clients: &[IpAddr], moves: &[SocketAddr]) -> anyhow::Result<Vec<(SocketAddr, Exported)>> {
        if let Some(svc) = apps.iter().find(|s| !self.apps.has(**s)) {
            return Err(anyhow!("service {svc} keeps sessions (sessions = true) and no application is registered for it"));
        }
        futures::future::try_join_all(apps.iter().map(|svc| async move { self.apps.export(*svc, handoff, clients, moves.contains(svc)).await.map(|e| (*svc, e)) })).await
    }

    /// Runs `work` while keeping volunteer `name`'s reservation for transfer `id` alive (an
    /// empty `Sessions` frame every half lease): a big export outlasts a lease.
    async fn keep_lease<T>(self: &Arc<Self>, name: &str, id: u64, apps: &[SocketAddr], work: impl Future<Output = T>) -> T {
        let Some(service) = apps.first().copied() else { return work.await };
        tokio::pin!(work);
        let mut keepalive = keepalive(self.cfg.lease_ms);
        loop {
            tokio::select! {
                r = &mut work => return r,
                _ = keepalive.tick() => {
                    let _ = self.send_to(name, Request::Sessions { id, service, sessions: Vec::new() }).await;
                }
            }
        }
    }

    /// Installs the rules for clients a volunteer acknowledged: per family, one probe through
    /// the tunnel to the volunteer's control address of that family, then every rule; all or
    /// nothing.
    pub(super) async fn steer(self: &Arc<Self>, name: &str, clients: &[MovedClient]) -> anyhow::Result<()> {
        let sib = self.sibling(name).ok_or_else(|| anyhow!("{name} is not a configured sibling"))?;
        self.keep_member(name);
        let mut groups: Vec<(IpAddr, Vec<Prefix>)> = Vec::new();
        for v4 in [true, false] {
            let prefixes: Vec<Prefix> = clients.iter().filter(|c| c.addr.is_ipv4() == v4).map(|c| host_prefix(c.addr)).collect();
            if let Some(first) = prefixes.first() {
                let target = sib.control_address(first.addr).ok_or_else(|| anyhow!("{name} has no {} control address", family_name(first.addr.is_ipv4())))?;
                groups.push((target, prefixes));
            }
        }
        let steers = self.steers.fetch_add(1, Ordering::Relaxed) + 1;
        if self.faults.fail_probe_from.is_some_and(|n| steers >= n) {
            warn!(sibling = %name, "TEST FAULT fail-probe-from: the probe of this hand-over's rules fails");
            anyhow::bail!("TEST FAULT fail-probe-from: {name} did not answer the probe");
        }
        let (faults, name_s) = (self.faults.clone(), name.to_string());
        self.with_dp(move |dp| {
            let mut done: Vec<Prefix> = Vec::new();
            for (i, (target, prefixes)) in groups.into_iter().enumerate() {
                if i > 0 {
                    faults.pause_blocking("pause-between-families", &name_s);
                }
                if let Err(e) = dp.migrate_many(&prefixes, target, Some(Duration::from_secs(1)), false) {
                    // Released at once (a zero drain period): the hand-over failed.
                    let _ = dp.drain_many(&done, Duration::ZERO);
                    return Err(e);
                }
                done.extend(prefixes);
            }
            Ok(())
        })
        .await??;
        self.state().rounds.rules_installed(crate::datapath::monotonic_ns());
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
                if let Some(old) = st.moved.steered(c.addr, name, c.connections, now) {
                    before.entry(old).or_default().push(c.addr);
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

/// The frames of transfer `id` before its sessions: the `clients` and the sessions `exports`
/// list, in frames under `max_frame`, then the `Transfer` of `services` and `tunnel_src`.
fn transfer_frames(id: u64, clients: &[MovedClient], services: Vec<SocketAddr>, tunnel_src: Vec<IpAddr>, exports: &[(SocketAddr, Exported)], max_frame: usize) -> Vec<Request> {
    let mut parts = peer::client_chunks(clients.to_vec(), &services, max_frame);
    let last = parts.pop().unwrap_or_default();
    let mut frames: Vec<Request> = parts.into_iter().map(|c| Request::Clients { id, clients: c }).collect();
    for (service, e) in exports {
        let listed = e.sizes().map(|(client, len)| ListedSession { client, len: u64::try_from(len).unwrap_or(u64::MAX) }).collect();
        frames.extend(peer::listed_chunks(listed, max_frame).into_iter().map(|sessions| Request::Listed { id, service: *service, sessions }));
    }
    frames.push(Request::Transfer { id, services, tunnel_src, clients: last });
    frames
}

// A session goes between the application hook and the peer channel as it is: each side has
// its own type (its own wire format), the agent moves the bytes from one to the other.
impl From<crate::app::Session> for SessionBlob {
    fn from(s: crate::app::Session) -> Self {
        Self { client: s.client, blob: s.blob }
    }
}

impl From<SessionBlob> for crate::app::Session {
    fn from(s: SessionBlob) -> Self {
        Self { client: s.client, blob: s.blob }
    }
}
