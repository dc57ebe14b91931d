//! The volunteer side: offers, transfers (checks, import, then adoption in the datapath),
//! commits, aborts and releases. A volunteer keeps room for the clients it adopted until they
//! arrive, and believes nothing a sibling says about addresses that its own configuration does
//! not confirm.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::anyhow;
use tokio::sync::{Semaphore, mpsc};
use tracing::{info, warn};

use super::{Acked, AdoptedIn, Agent, Incoming, Reservation, family, policy, unix_now};
use crate::{
    config::Sibling,
    peer::{MovedClient, Msg, SessionBlob},
};

/// One of the origin's services as this volunteer serves it, checked against its own
/// configuration.
struct Adoption {
    /// The origin's service address.
    svc: SocketAddr,
    /// The local service of the same port and family, whose application imports.
    local: SocketAddr,
    dev: String,
    listener: SocketAddr,
    /// The origin's tunnel source of that family (from this node's configuration).
    src: IpAddr,
}

impl Agent {
    /// Handles one request from sibling `from`. Quick ones are answered at once; transfers,
    /// commits and aborts (which wait on the application) run on their own tasks, so this
    /// connection keeps reading heartbeats. An error closes the connection.
    pub(super) async fn handle_request(self: Arc<Self>, from: &str, msg: Msg, reply: &mpsc::Sender<Msg>, transfers: &Arc<Semaphore>) -> anyhow::Result<()> {
        let answer = |m: Msg| {
            let reply = reply.clone();
            let deadline = self.send_deadline();
            async move { reply.send_timeout(m, deadline).await.map_err(|_| anyhow!("the answers to this sibling are stuck")) }
        };
        match msg {
            Msg::Heartbeat { load, .. } => {
                let mut st = self.state();
                let s = st.siblings.entry(from.to_string()).or_default();
                s.load = load;
                s.last_heartbeat = Some(Instant::now());
            }
            Msg::HelpRequest { id, connections, clients } => answer(self.offer(from, id, connections, clients)).await?,
            Msg::Sessions { id, sessions } => self.receive(from, id, sessions, Vec::new()),
            Msg::Clients { id, clients } => self.receive(from, id, Vec::new(), clients),
            Msg::Transfer { id, services, tunnel_src, clients } => {
                self.receive(from, id, Vec::new(), clients);
                let incoming = self.state().incoming.remove(&(from.to_string(), id)).unwrap_or_default();
                let Ok(permit) = transfers.clone().try_acquire_owned() else {
                    return answer(Msg::Abort { id, reason: "too many transfers in progress from this sibling; ask again".into() }).await;
                };
                let (me, from, reply) = (self.clone(), from.to_string(), reply.clone());
                tokio::spawn(async move {
                    let a = me.clone().accept_transfer(&from, id, services, tunnel_src, incoming).await;
                    drop(permit);
                    if reply.send_timeout(a, me.send_deadline()).await.is_err() {
                        warn!(origin = %from, id, "could not answer the transfer: the link is gone or stuck");
                    }
                });
            }
            Msg::Commit { id } => {
                let acked = self.state().acked.remove(&(from.to_string(), id));
                info!(origin = %from, id, "origin committed the hand-over");
                if let Some(Acked { app: Some(svc), handoff, .. }) = acked {
                    let me = self.clone();
                    tokio::spawn(async move { me.apps.finish(svc, &handoff, true, me.limits()).await });
                }
            }
            Msg::Abort { id, reason } => {
                info!(origin = %from, id, "origin aborted: {reason}");
                self.forget_transfer(from, id);
            }
            Msg::Release { clients } => {
                let mut st = self.state();
                let before = st.adopted.len();
                let gone: std::collections::HashSet<IpAddr> = clients.into_iter().collect();
                st.adopted.retain(|c, a| !(a.from == from && gone.contains(c)));
                info!(origin = %from, clients = before - st.adopted.len(), "origin took clients back: their room is free again");
            }
            other => warn!(sibling = %from, "unexpected message {other:?}"),
        }
        Ok(())
    }

    /// Forgets transfer (`from`, `id`), which will not be steered: its reservation, what
    /// arrived of it, its adopted clients; the application drops what it imported.
    fn forget_transfer(self: &Arc<Self>, from: &str, id: u64) {
        let acked = {
            let mut st = self.state();
            st.reservations.retain(|r| !(r.origin == from && r.id == id));
            st.incoming.remove(&(from.to_string(), id));
            // Clients of this transfer were not steered after all.
            st.adopted.retain(|_, a| !(a.from == from && a.id == id));
            st.acked.remove(&(from.to_string(), id))
        };
        if let Some(Acked { app: Some(svc), handoff, .. }) = acked {
            // Nothing was steered: the imported sessions must not live here too.
            let me = self.clone();
            tokio::spawn(async move { me.apps.finish(svc, &handoff, false, me.limits()).await });
        }
    }

    /// Sessions and clients of a transfer, arriving ahead of (or in) its `Transfer`: kept
    /// within the reservation (which they keep alive: big hand-overs outlast a lease).
    fn receive(&self, from: &str, id: u64, sessions: Vec<SessionBlob>, clients: Vec<MovedClient>) {
        let now = Instant::now();
        let lease = Duration::from_millis(self.cfg.lease_ms);
        let max_blob = self.cfg.max_session_bytes;
        let mut st = self.state();
        let cap = st.reservations.iter_mut().find(|r| r.origin == from && r.id == id && r.until > now).map_or(0, |r| {
            r.until = r.until.max(now + lease);
            r.capacity
        });
        if cap == 0 && !st.incoming.contains_key(&(from.to_string(), id)) {
            // Nothing to keep: the Transfer will be refused for want of a reservation.
            warn!(origin = %from, id, "ignoring sessions or clients of a transfer with no reservation (lease expired?)");
            return;
        }
        let held = st.incoming.entry((from.to_string(), id)).or_default();
        held.last = Some(now);
        if held.refused.is_some() {
            return;
        }
        let n_sessions = u64::try_from(held.sessions.len() + sessions.len()).unwrap_or(u64::MAX);
        let weight = policy::transfer_weight(&held.clients).zip(policy::transfer_weight(&clients)).and_then(|(a, b)| a.checked_add(b));
        let refused = if cap == 0 {
            Some(format!("no reservation for request {id} (lease expired?)"))
        } else if sessions.iter().any(|s| s.blob.len() > max_blob) {
            Some(format!("a session is over max_session_bytes ({max_blob})"))
        } else if n_sessions > cap || weight.is_none_or(|w| w > cap) {
            Some(format!("more sessions or clients than the {cap} connections reserved"))
        } else {
            None
        };
        if let Some(why) = refused {
            warn!(origin = %from, id, "refusing the transfer: {why}");
            *held = Incoming { refused: Some(why), last: Some(now), ..Incoming::default() };
        } else {
            held.sessions.extend(sessions);
            held.clients.extend(clients);
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
            let ours: Vec<String> = clients.iter().filter(|c| st.migrated.contains_key(&c.addr)).map(|c| c.addr.to_string()).collect();
            if !ours.is_empty() {
                return Err(format!("this node moved some of these clients out itself ({}): a client is never both", ours.join(", ")));
            }
        }
        let mut plan = Vec::new();
        for svc in services.iter().filter(|s| families.contains(&s.is_ipv4())) {
            self.cfg.check_adoptable(origin, *svc)?;
            let src = origin.control_address(svc.ip()).ok_or_else(|| format!("{} has no {} control address here to accept tunnels from", origin.name, family(svc.ip())))?;
            let own = self
                .cfg
                .services
                .iter()
                .find(|s| s.address.port() == svc.port() && s.address.is_ipv4() == svc.is_ipv4())
                .ok_or_else(|| format!("no local {} service on port {} to serve {svc}", family(svc.ip()), svc.port()))?;
            plan.push(Adoption { svc: *svc, local: own.address, dev: own.dev.clone(), listener: own.listener(), src });
        }
        for f in &families {
            if !plan.iter().any(|a| a.svc.is_ipv4() == *f) {
                return Err(format!("no {} service of {} to serve its {} clients", if *f { "IPv4" } else { "IPv6" }, origin.name, if *f { "IPv4" } else { "IPv6" }));
            }
        }
        Ok(plan)
    }

    /// Volunteer: checks the transfer, imports the sessions into the local application, then
    /// prepares delivery; only then acknowledges. Any failure undoes the import and answers
    /// `Abort`.
    async fn accept_transfer(self: Arc<Self>, from: &str, id: u64, services: Vec<SocketAddr>, tunnel_src: Vec<IpAddr>, incoming: Incoming) -> Msg {
        let abort = |reason: String| {
            warn!(origin = %from, id, "transfer refused: {reason}");
            // The room it reserved is free again.
            self.state().reservations.retain(|r| !(r.origin == from && r.id == id));
            Msg::Abort { id, reason }
        };
        let Some(origin) = self.cfg.siblings.iter().find(|s| s.name == from).cloned() else {
            return abort("not a configured sibling".into());
        };
        if let Some(why) = incoming.refused {
            return abort(why);
        }
        let Incoming { sessions, clients, .. } = incoming;
        let handoff = format!("{from}-{id}-{}", self.cfg.node);
        // The transfer owns its reservation now: it must not expire during a long import.
        let capacity = {
            let now = Instant::now();
            let hold = now + Duration::from_millis(self.cfg.app_timeout_ms.saturating_mul(2)) + Duration::from_mins(1);
            let mut st = self.state();
            let Some(r) = st.reservations.iter_mut().find(|r| r.origin == from && r.id == id && r.until > now) else {
                return abort(format!("no reservation for request {id} (lease expired?)"));
            };
            r.until = hold;
            r.capacity
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
        let mut imported_into = None;
        if !sessions.is_empty() {
            let Some(local) = plan.first().map(|a| a.local) else {
                return abort("no local service to import the sessions into".into());
            };
            if let Err(e) = self.apps.import(local, &handoff, &sessions, self.limits()).await {
                self.apps.finish(local, &handoff, false, self.limits()).await;
                return abort(format!("import failed: {e:#}"));
            }
            info!(origin = %from, id, sessions = sessions.len(), "sessions imported into the application");
            imported_into = Some(local);
        }
        let adopted = self
            .with_dp(move |dp| -> anyhow::Result<()> {
                let mut done: Vec<SocketAddr> = Vec::new();
                let r = (|| {
                    for a in &plan {
                        dp.add_sibling(a.src, &a.dev)?;
                        if !dp.list_adopted()?.iter().any(|(ip, port, _)| *ip == a.svc.ip() && *port == a.svc.port()) {
                            dp.adopt((a.svc.ip(), a.svc.port()), &a.dev, Some((a.listener.ip(), a.listener.port())), None)?;
                            done.push(a.svc);
                        }
                    }
                    Ok(())
                })();
                if r.is_err() {
                    for svc in done {
                        let _ = dp.unadopt((svc.ip(), svc.port()));
                    }
                }
                r
            })
            .await
            .and_then(|r| r);
        // Recorded before the acknowledgement leaves, so that Commit and Abort find it. An
        // Abort that came during the import took the reservation: then nothing is recorded.
        let recorded = adopted.as_ref().is_ok_and(|()| {
            let mut st = self.state();
            let before = st.reservations.len();
            st.reservations.retain(|r| !(r.origin == from && r.id == id));
            if st.reservations.len() == before {
                return false;
            }
            let now = Instant::now();
            for c in &clients {
                st.adopted.insert(
                    c.addr,
                    AdoptedIn { client: c.addr, from: from.to_string(), since_unix: unix_now(), promised: policy::weight(c.connections), connections: 0, id, arrived: false, last_seen: now },
                );
            }
            st.acked.insert((from.to_string(), id), Acked { app: imported_into, handoff: handoff.clone(), at: now });
            true
        });
        if recorded {
            info!(origin = %from, id, clients = clients.len(), connections = want, "adopted clients (ready: sibling, route, listener); room kept for them until they arrive");
            return Msg::TransferAck { id };
        }
        if let Some(local) = imported_into {
            self.apps.finish(local, &handoff, false, self.limits()).await;
        }
        match adopted {
            Err(e) => abort(format!("{e:#}")),
            Ok(()) => abort("the origin aborted during the import".into()),
        }
    }

    fn offer(&self, from: &str, id: u64, connections: u64, clients: u32) -> Msg {
        let now = Instant::now();
        let high = self.cfg.high_watermark;
        let mut st = self.state();
        st.reservations.retain(|r| r.until > now);
        let reserved = st.reservations.iter().fold(0u64, |s, r| s.saturating_add(r.capacity));
        let promised = policy::promised(st.adopted.values().map(|a| (a.promised, a.connections)));
        let load = st.load.total;
        let room = policy::room(high, load, reserved, promised);
        let why_not = if st.negotiating {
            Some("shedding itself".to_string())
        } else if load > high {
            Some(format!("over its own high watermark (load {load}, high {high})"))
        } else if room == 0 {
            Some(format!("no room: load {load} + reserved for offers {reserved} + promised to adopted clients not arrived yet {promised} vs high {high}"))
        } else if connections == 0 {
            Some("asked for no connections".to_string())
        } else {
            None
        };
        if let Some(reason) = why_not {
            info!(origin = %from, id, load, reserved, promised, "declining help: {reason}");
            return Msg::Decline { id, reason };
        }
        let capacity = room.min(connections);
        st.reservations.push(Reservation { origin: from.to_string(), id, capacity, until: now + Duration::from_millis(self.cfg.lease_ms) });
        info!(origin = %from, id, capacity, asked = connections, clients, load, reserved, promised, "offering help");
        Msg::Offer { id, capacity, lease_ms: self.cfg.lease_ms }
    }

    /// Volunteer bookkeeping that would otherwise grow without end: transfers whose `Transfer`,
    /// `Commit` or `Abort` never came, and adopted clients their origin never released that
    /// stay away.
    pub(super) fn expire(self: &Arc<Self>) {
        let now = Instant::now();
        let expiry = Duration::from_millis(self.cfg.handoff_expiry_ms);
        let idle = Duration::from_secs(self.cfg.adopted_expiry_secs);
        let settle = {
            let mut st = self.state();
            st.reservations.retain(|r| r.until > now);
            st.incoming.retain(|(from, id), i| {
                let keep = i.last.is_some_and(|t| now.duration_since(t) < expiry);
                if !keep {
                    warn!(origin = %from, id, "dropping a transfer's sessions and clients: its Transfer never came");
                }
                keep
            });
            let late: Vec<(String, u64)> = st.acked.iter().filter(|(_, a)| now.duration_since(a.at) >= expiry).map(|(k, _)| k.clone()).collect();
            // A lost Commit or Abort: the transfer is settled by what happened since. A client
            // of it that arrived here proves the origin steered it, so the origin committed.
            let settle: Vec<((String, u64), bool)> = late
                .into_iter()
                .map(|k| {
                    let arrived = st.adopted.values().any(|a| a.from == k.0 && a.id == k.1 && a.arrived);
                    (k, arrived)
                })
                .collect();
            let acked: std::collections::HashSet<(String, u64)> = st.acked.keys().cloned().collect();
            st.adopted.retain(|c, a| {
                let keep = acked.contains(&(a.from.clone(), a.id)) || now.duration_since(a.last_seen) < idle;
                if !keep {
                    info!(client = %c, origin = %a.from, "forgetting an adopted client: never released by its origin and no connection here for {} s", idle.as_secs());
                }
                keep
            });
            settle
        };
        for ((from, id), arrived) in settle {
            let handoff = self.state().acked.get(&(from.clone(), id)).map(|a| a.handoff.clone()).unwrap_or_default();
            if arrived {
                warn!(origin = %from, id, handoff, "no Commit or Abort after {} ms, but its clients arrive here: settled as committed", expiry.as_millis());
                if let Some(Acked { app: Some(svc), handoff, .. }) = self.state().acked.remove(&(from, id)) {
                    let me = self.clone();
                    tokio::spawn(async move { me.apps.finish(svc, &handoff, true, me.limits()).await });
                }
            } else {
                warn!(origin = %from, id, handoff, "no Commit or Abort after {} ms and none of its clients came: settled as aborted", expiry.as_millis());
                self.forget_transfer(&from, id);
            }
        }
    }
}
