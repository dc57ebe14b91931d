//! The origin side: watching the load, shedding (negotiation, hand-over, rules).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::bail;
use tracing::{info, warn};

use super::{Agent, MigratedOut, host_prefix, pick_clients, unix_now};
use crate::{
    datapath::{Load, Prefix},
    peer::{MovedClient, Msg, SessionBlob},
};

impl Agent {
    pub(super) async fn load_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tick.tick().await;
            let load = match self.dp().load() {
                Ok(l) => l,
                Err(e) => {
                    warn!("reading the load: {e}");
                    continue;
                }
            };
            let (projected, start) = {
                let mut st = self.state();
                // Connections of moved clients still here end where they are: not load to shed.
                let staying: u64 = load.clients.iter().filter(|(a, _)| st.migrated.contains_key(a)).map(|c| c.1).sum();
                let projected = load.total.saturating_sub(staying);
                st.load = load.clone();
                let now = Instant::now();
                if projected <= self.cfg.low_watermark {
                    st.shed_until = None;
                }
                let continuing = projected > self.cfg.low_watermark && st.shed_until.is_some_and(|t| now < t);
                let start = !st.negotiating && (projected > self.cfg.high_watermark || continuing);
                if start {
                    st.negotiating = true;
                }
                (projected, start)
            };
            if start {
                info!(load = load.total, projected, high = self.cfg.high_watermark, "over the high watermark: asking siblings for help");
                let me = self.clone();
                tokio::spawn(async move {
                    let t0 = Instant::now();
                    match me.clone().shed(&load, projected).await {
                        Ok(n) => {
                            let ms = t0.elapsed().as_secs_f64() * 1000.0;
                            info!(moved = n, ms = format!("{ms:.1}"), "shedding done");
                            if n > 0 {
                                me.state().last_shed_ms = Some(ms);
                            }
                        }
                        Err(e) => warn!("shedding failed, nothing steered: {e:#}"),
                    }
                    // Let the moved clients' connections drain before deciding again; until 2 s
                    // later, a load still above the low watermark keeps shedding.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let mut st = me.state();
                    st.negotiating = false;
                    st.shed_until = Some(Instant::now() + Duration::from_secs(2));
                });
            }
        }
    }

    pub(super) fn live_siblings(&self) -> Vec<String> {
        let st = self.state();
        let live = Duration::from_millis(self.cfg.liveness_ms);
        self.cfg
            .siblings
            .iter()
            .filter(|s| {
                st.siblings.get(&s.name).is_some_and(|x| x.out.is_some() && x.last_heartbeat.is_some_and(|t| t.elapsed() < live))
            })
            .map(|s| s.name.clone())
            .collect()
    }

    /// Asks every live sibling in parallel, splits the picked clients over the best offers,
    /// transfers, and installs rules after each acknowledgement. Returns clients moved.
    pub(super) async fn shed(self: Arc<Self>, load: &Load, projected: u64) -> anyhow::Result<usize> {
        let candidates: Vec<(IpAddr, u64)> = {
            let st = self.state();
            load.clients.iter().filter(|(a, _)| !st.migrated.contains_key(a)).copied().collect()
        };
        let picked = pick_clients(&candidates, projected, self.cfg.low_watermark);
        self.move_clients(picked).await
    }

    /// Moves `picked` clients (address, connections) to siblings with room: negotiation,
    /// hand-over, rules. Also the admin socket's `move` request.
    pub async fn move_clients(self: Arc<Self>, picked: Vec<(IpAddr, u64)>) -> anyhow::Result<usize> {
        if picked.is_empty() {
            bail!("no client left to move");
        }
        let need: u64 = picked.iter().map(|c| c.1).sum();
        let siblings = self.live_siblings();
        if siblings.is_empty() {
            bail!("no live sibling to ask");
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let timeout = Duration::from_millis(self.cfg.negotiate_timeout_ms);
        let asks = siblings.iter().map(|n| {
            let req = Msg::HelpRequest { id, connections: need, clients: u32::try_from(picked.len()).unwrap_or(u32::MAX) };
            let me = self.clone();
            let n = n.clone();
            async move { (n.clone(), me.ask(&n, req, id, timeout).await) }
        });
        let answers = futures::future::join_all(asks).await;
        let mut offers: Vec<(String, u64)> = Vec::new();
        for (name, a) in answers {
            match a {
                Ok(Msg::Offer { capacity, .. }) if capacity > 0 => offers.push((name, capacity)),
                Ok(Msg::Decline { reason, .. }) => info!(sibling = %name, "declined: {reason}"),
                Ok(other) => warn!(sibling = %name, "unexpected answer {other:?}"),
                Err(e) => warn!(sibling = %name, "no offer: {e:#}"),
            }
        }
        if offers.is_empty() {
            bail!("no sibling offered room");
        }
        offers.sort_by_key(|o| std::cmp::Reverse(o.1));
        // Clients, largest first, onto the volunteers with room.
        let mut plan: HashMap<String, Vec<MovedClient>> = HashMap::new();
        let mut room: Vec<(String, u64)> = offers.clone();
        for (addr, n) in &picked {
            if let Some(v) = room.iter_mut().find(|v| v.1 >= *n) {
                v.1 -= n;
                plan.entry(v.0.clone()).or_default().push(MovedClient { addr: *addr, connections: *n });
            }
        }
        for (name, _) in &offers {
            if !plan.contains_key(name) {
                self.tell(name, Msg::Abort { id, reason: "offer not needed".into() }).await;
            }
        }
        let services: Vec<SocketAddr> = self.cfg.services.iter().map(|s| s.address).collect();
        let tunnel_src = self.cfg.listen.expect("validated").ip();
        let transfers = plan.into_iter().map(|(name, clients)| {
            let me = self.clone();
            let services = services.clone();
            async move { me.transfer(&name, id, services, tunnel_src, clients, timeout).await }
        });
        Ok(futures::future::join_all(transfers).await.into_iter().sum())
    }

    /// Origin: one volunteer's share, two-phase. Export (sessions frozen in the application)
    /// -> Sessions + Transfer -> `TransferAck` -> rules installed -> commit; any failure before
    /// the rules are in place aborts everywhere (sessions unfrozen here, dropped there).
    pub(super) async fn transfer(
        self: &Arc<Self>,
        name: &str,
        id: u64,
        services: Vec<SocketAddr>,
        tunnel_src: IpAddr,
        clients: Vec<MovedClient>,
        timeout: Duration,
    ) -> usize {
        let handoff = format!("{}-{id}-{name}", self.cfg.node);
        let lim = self.limits();
        let t0 = Instant::now();
        let app_svc = services.iter().copied().find(|s| self.apps.has(*s));
        let mut sessions = Vec::new();
        if let Some(svc) = app_svc {
            let addrs: Vec<IpAddr> = clients.iter().map(|c| c.addr).collect();
            match self.apps.export(svc, &handoff, &addrs, lim).await {
                Ok(s) => sessions = s,
                Err(e) => {
                    warn!(sibling = %name, "export failed, hand-over aborted, nothing steered: {e:#}");
                    self.apps.finish(svc, &handoff, false, lim).await;
                    self.tell(name, Msg::Abort { id, reason: format!("export failed: {e:#}") }).await;
                    return 0;
                }
            }
        }
        let abort = |why: String| {
            let me = self.clone();
            let name = name.to_string();
            let handoff = handoff.clone();
            async move {
                if let Some(svc) = app_svc {
                    me.apps.finish(svc, &handoff, false, lim).await;
                }
                me.tell(&name, Msg::Abort { id, reason: why }).await;
            }
        };
        let t_export = t0.elapsed();
        // Session blobs first, in frames under the peer limit.
        let budget = self.cfg.max_frame.saturating_sub(4096).max(1);
        let mut chunk: Vec<SessionBlob> = Vec::new();
        let mut size = 0;
        let n_sessions = sessions.len();
        for s in sessions {
            if size + s.blob.len() + 64 > budget && !chunk.is_empty() {
                self.tell(name, Msg::Sessions { id, sessions: std::mem::take(&mut chunk) }).await;
                size = 0;
            }
            size += s.blob.len() + 64;
            chunk.push(s);
        }
        if !chunk.is_empty() {
            self.tell(name, Msg::Sessions { id, sessions: chunk }).await;
        }
        let msg = Msg::Transfer { id, services, tunnel_src: vec![tunnel_src], clients: clients.clone() };
        match self.ask(name, msg, id, timeout).await {
            Ok(Msg::TransferAck { .. }) => {}
            Ok(Msg::Abort { reason, .. }) => {
                warn!(sibling = %name, "transfer aborted by the volunteer, nothing steered: {reason}");
                abort(reason).await;
                return 0;
            }
            Ok(other) => {
                warn!(sibling = %name, "unexpected answer {other:?}; nothing steered");
                abort("unexpected answer".into()).await;
                return 0;
            }
            Err(e) => {
                warn!(sibling = %name, "transfer failed, nothing steered: {e:#}");
                abort(e.to_string()).await;
                return 0;
            }
        }
        let t_ack = t0.elapsed();
        let n = clients.len();
        let moved = self.steer(name, clients).await;
        let t_steer = t0.elapsed();
        if moved < n {
            warn!(sibling = %name, moved, of = n, "not every rule went in: hand-over aborted");
            abort("rules could not be installed".into()).await;
            return 0;
        }
        if let Some(svc) = app_svc {
            self.apps.finish(svc, &handoff, true, lim).await;
        }
        self.tell(name, Msg::Commit { id }).await;
        info!(
            sibling = %name,
            clients = n,
            sessions = n_sessions,
            export_ms = t_export.as_millis(),
            acked_ms = t_ack.as_millis(),
            steered_ms = t_steer.as_millis(),
            committed_ms = t0.elapsed().as_millis(),
            "hand-over committed"
        );
        moved
    }

    /// Installs the rules for clients a volunteer acknowledged (each after the probe).
    pub(super) async fn steer(self: &Arc<Self>, name: &str, clients: Vec<MovedClient>) -> usize {
        let Some(target) = self.cfg.siblings.iter().find(|s| s.name == name).map(|s| s.address.ip()) else { return 0 };
        let me = self.clone();
        let result = tokio::task::spawn_blocking(move || {
            let prefixes: Vec<Prefix> = clients.iter().map(|c| host_prefix(c.addr)).collect();
            // One probe through the tunnel proves the path; then every rule, all or nothing.
            let r = me.dp().migrate_many(&prefixes, target, Some(Duration::from_secs(1)));
            (r, clients)
        })
        .await;
        let Ok((r, clients)) = result else { return 0 };
        if let Err(e) = r {
            warn!(sibling = %name, "rules not installed: {e}");
            self.tell(name, Msg::Release { clients: clients.iter().map(|c| c.addr).collect() }).await;
            return 0;
        }
        let moved = clients;
        if moved.len() > 16 {
            info!(to = %name, clients = moved.len(), "clients moved");
        }
        let mut st = self.state();
        for c in &moved {
            if moved.len() <= 16 {
                info!(client = %c.addr, to = %name, connections = c.connections, "client moved");
            }
            st.migrated.insert(c.addr, MigratedOut { client: c.addr, to: name.to_string(), since_unix: unix_now(), connections: c.connections });
        }
        moved.len()
    }
}
