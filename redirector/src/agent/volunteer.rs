//! The volunteer side: offers, transfers (import, then adoption in the datapath), commits and
//! aborts.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail};
use tracing::{info, warn};

use super::{AdoptedIn, Agent, Reservation, unix_now};
use crate::{
    app::Limits,
    peer::{MovedClient, Msg, SessionBlob},
};

impl Agent {
    pub(super) async fn handle_request(self: Arc<Self>, from: &str, msg: Msg) -> Option<Msg> {
        match msg {
            Msg::Heartbeat { load, .. } => {
                let mut st = self.state();
                let s = st.siblings.entry(from.to_string()).or_default();
                s.load = load;
                s.last_heartbeat = Some(Instant::now());
                None
            }
            Msg::HelpRequest { id, connections, clients } => Some(self.offer(from, id, connections, clients)),
            Msg::Sessions { id, sessions } => {
                let mut st = self.state();
                let lease = Duration::from_millis(self.cfg.lease_ms);
                // Sessions arriving keep the reservation alive: large hand-overs outlast a lease.
                let cap = st.reservations.iter_mut().find(|r| r.origin == from && r.id == id).map_or(0, |r| {
                    r.until = Instant::now() + lease;
                    r.capacity
                });
                let held = st.incoming.entry((from.to_string(), id)).or_default();
                let too_big = sessions.iter().any(|s| s.blob.len() > self.cfg.max_session_bytes);
                if too_big || u64::try_from(held.len() + sessions.len()).unwrap_or(u64::MAX) > cap {
                    warn!(origin = %from, id, "refusing sessions: over the reservation or max_session_bytes");
                    held.clear();
                    held.push(SessionBlob { client: IpAddr::from([0, 0, 0, 0]), blob: Vec::new() });
                } else {
                    held.extend(sessions);
                }
                None
            }
            Msg::Transfer { id, services, tunnel_src, clients } => {
                let Some(&tunnel_src) = tunnel_src.first() else { return Some(Msg::Abort { id, reason: "no tunnel source".into() }) };
                let sessions = self.state().incoming.remove(&(from.to_string(), id)).unwrap_or_default();
                Some(self.clone().accept_transfer(from, id, services, tunnel_src, clients, sessions).await)
            }
            Msg::Commit { id } => {
                let imported = self.state().imported.remove(&(from.to_string(), id));
                if let Some((svc, handoff)) = imported {
                    self.apps.finish(svc, &handoff, true, self.limits()).await;
                }
                None
            }
            Msg::Abort { id, reason } => {
                let imported = {
                    let mut st = self.state();
                    st.reservations.retain(|r| !(r.origin == from && r.id == id));
                    st.incoming.remove(&(from.to_string(), id));
                    // Clients of this transfer were not steered after all.
                    st.adopted.retain(|_, a| !(a.from == from && a.id == id));
                    st.imported.remove(&(from.to_string(), id))
                };
                if let Some((svc, handoff)) = imported {
                    // Nothing was steered: the imported sessions must not live here too.
                    self.apps.finish(svc, &handoff, false, self.limits()).await;
                }
                info!(origin = %from, id, "origin aborted: {reason}");
                None
            }
            Msg::Release { clients } => {
                let mut st = self.state();
                for c in clients {
                    st.adopted.remove(&c);
                }
                None
            }
            other => {
                warn!(sibling = %from, "unexpected message {other:?}");
                None
            }
        }
    }

    pub(super) fn limits(&self) -> Limits {
        Limits { timeout: Duration::from_millis(self.cfg.app_timeout_ms), max_session_bytes: self.cfg.max_session_bytes }
    }

    /// The local service (and its application) that serves a sibling's `svc`: same port.
    pub(super) fn local_service_for(&self, svc: SocketAddr) -> Option<SocketAddr> {
        self.cfg.services.iter().find(|s| s.address.port() == svc.port() && s.address.is_ipv4() == svc.is_ipv4()).map(|s| s.address)
    }

    /// Volunteer: imports the sessions into the local application, then prepares delivery; only
    /// then acknowledges. Any failure undoes the import and answers `Abort`.
    pub(super) async fn accept_transfer(
        self: Arc<Self>,
        from: &str,
        id: u64,
        services: Vec<SocketAddr>,
        tunnel_src: IpAddr,
        clients: Vec<MovedClient>,
        sessions: Vec<SessionBlob>,
    ) -> Msg {
        let handoff = format!("{from}-{id}-{}", self.cfg.node);
        {
            // The transfer now owns its reservation: it must not expire during a long import.
            let now = Instant::now();
            let mut st = self.state();
            let Some(r) = st.reservations.iter_mut().find(|r| r.origin == from && r.id == id && r.until > now) else {
                return Msg::Abort { id, reason: format!("no reservation for request {id} (lease expired?)") };
            };
            r.until = now + Duration::from_millis(self.cfg.app_timeout_ms.saturating_mul(2)) + Duration::from_mins(1);
        }
        let mut imported_into = None;
        if !sessions.is_empty() {
            if sessions.iter().any(|s| s.blob.is_empty() && s.client.is_unspecified()) {
                return Msg::Abort { id, reason: "sessions refused: over the reservation or max_session_bytes".into() };
            }
            let Some(local) = services.first().and_then(|s| self.local_service_for(*s)) else {
                return Msg::Abort { id, reason: "no local service to import the sessions into".into() };
            };
            if let Err(e) = self.apps.import(local, &handoff, &sessions, self.limits()).await {
                warn!(origin = %from, id, "import refused, aborting the transfer: {e:#}");
                self.apps.finish(local, &handoff, false, self.limits()).await;
                return Msg::Abort { id, reason: format!("import failed: {e:#}") };
            }
            info!(origin = %from, id, sessions = sessions.len(), "sessions imported into the application");
            imported_into = Some(local);
        }
        let me = self.clone();
        let from2 = from.to_string();
        let r = tokio::task::spawn_blocking(move || me.adopt(&from2, id, &services, tunnel_src, &clients)).await;
        let r = r.map_err(|e| anyhow!("{e}")).and_then(|r| r);
        match r {
            Ok(()) => {
                if let Some(local) = imported_into {
                    self.state().imported.insert((from.to_string(), id), (local, handoff));
                }
                Msg::TransferAck { id }
            }
            Err(e) => {
                warn!(origin = %from, id, "transfer refused: {e:#}");
                if let Some(local) = imported_into {
                    self.apps.finish(local, &handoff, false, self.limits()).await;
                }
                Msg::Abort { id, reason: format!("{e:#}") }
            }
        }
    }

    pub(super) fn offer(&self, from: &str, id: u64, connections: u64, clients: u32) -> Msg {
        let now = Instant::now();
        let mut st = self.state();
        st.reservations.retain(|r| r.until > now);
        st.settling.retain(|s| s.0 > now);
        let committed: u64 = st.reservations.iter().map(|r| r.capacity).sum::<u64>() + st.settling.iter().map(|s| s.1).sum::<u64>();
        let used = st.load.total + committed;
        // Keep own headroom: never offer past the high watermark.
        let room = self.cfg.high_watermark.saturating_sub(used);
        if st.negotiating || st.load.total > self.cfg.high_watermark || room == 0 {
            info!(origin = %from, id, load = st.load.total, committed, "declining help: no room under the high watermark");
            return Msg::Decline { id, reason: format!("no room: load {} + committed {committed} vs high {}", st.load.total, self.cfg.high_watermark) };
        }
        let capacity = room.min(connections);
        st.reservations.push(Reservation { origin: from.to_string(), id, capacity, until: now + Duration::from_millis(self.cfg.lease_ms) });
        info!(origin = %from, id, capacity, clients, load = st.load.total, "offering help");
        Msg::Offer { id, capacity, lease_ms: self.cfg.lease_ms }
    }

    pub(super) fn adopt(&self, from: &str, id: u64, services: &[SocketAddr], tunnel_src: IpAddr, clients: &[MovedClient]) -> anyhow::Result<()> {
        let want: u64 = clients.iter().map(|c| c.connections).sum();
        {
            let now = Instant::now();
            let st = self.state();
            let r = st
                .reservations
                .iter()
                .find(|r| r.origin == from && r.id == id && r.until > now)
                .ok_or_else(|| anyhow!("no reservation for request {id} (lease expired?)"))?;
            if want > r.capacity {
                bail!("transfer of {want} connections exceeds the {} offered", r.capacity);
            }
        }
        let mut dp = self.dp();
        let mut done: Vec<SocketAddr> = Vec::new();
        let result = (|| -> anyhow::Result<()> {
            for svc in services {
                let own = self
                    .cfg
                    .services
                    .iter()
                    .find(|s| s.address.port() == svc.port() && s.address.is_ipv4() == svc.is_ipv4())
                    .ok_or_else(|| anyhow!("no local service on port {} to serve {svc}", svc.port()))?;
                dp.add_sibling(tunnel_src, &own.dev)?;
                let already = dp.list_adopted()?.iter().any(|(a, p, _)| *a == svc.ip() && *p == svc.port());
                if !already {
                    let l = own.listener();
                    dp.adopt((svc.ip(), svc.port()), &own.dev, Some((l.ip(), l.port())), None)?;
                    done.push(*svc);
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            for svc in done {
                let _ = dp.unadopt((svc.ip(), svc.port()));
            }
            return Err(e);
        }
        drop(dp);
        let mut st = self.state();
        st.reservations.retain(|r| !(r.origin == from && r.id == id));
        st.settling.push((Instant::now() + Duration::from_secs(10), want));
        for c in clients {
            st.adopted.insert(c.addr, AdoptedIn { client: c.addr, from: from.to_string(), since_unix: unix_now(), id });
        }
        info!(origin = %from, id, clients = clients.len(), connections = want, "adopted clients (ready: sibling, route, listener)");
        Ok(())
    }
}
