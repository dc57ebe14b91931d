//! The agent: talks to its siblings over mutual TLS, watches the application's load in the
//! kernel, and when the node passes its high watermark asks its siblings for help and moves
//! clients to the volunteers until the projected load is at or below the low watermark.
//!
//! Requests travel on the requester's own (outbound) connection; each node answers on its
//! inbound connections. Heartbeats go both ways; a sibling silent for `liveness_ms` has the
//! rules that point at it drained, so its clients come home.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, anyhow, bail};
use futures::{SinkExt as _, StreamExt as _};
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};
use tokio_util::codec::Framed;
use tracing::{info, warn};

use crate::{
    app::{Apps, Limits},
    config::Config,
    datapath::{Datapath, Load, Location, Prefix},
    peer::{self, MovedClient, Msg, PROTOCOL_VERSION, SessionBlob, Tls},
};

/// What an origin moved to a volunteer.
#[derive(Clone, Debug, Serialize)]
pub struct MigratedOut {
    pub client: IpAddr,
    pub to: String,
    pub since_unix: u64,
    /// Connections the client had here when it moved.
    pub connections: u64,
}

/// What a volunteer took from an origin.
#[derive(Clone, Debug, Serialize)]
pub struct AdoptedIn {
    pub client: IpAddr,
    pub from: String,
    pub since_unix: u64,
    /// The origin's request id of the transfer that brought it.
    #[serde(skip)]
    pub id: u64,
}

#[derive(Default)]
struct SiblingState {
    out: Option<mpsc::Sender<Msg>>,
    last_heartbeat: Option<Instant>,
    load: u64,
}

struct Reservation {
    origin: String,
    id: u64,
    capacity: u64,
    until: Instant,
}

#[derive(Default)]
struct State {
    load: Load,
    siblings: HashMap<String, SiblingState>,
    pending: HashMap<(String, u64), oneshot::Sender<Msg>>,
    reservations: Vec<Reservation>,
    /// Connections expected from clients adopted recently (they arrive as clients reconnect).
    settling: Vec<(Instant, u64)>,
    migrated: HashMap<IpAddr, MigratedOut>,
    adopted: HashMap<IpAddr, AdoptedIn>,
    negotiating: bool,
    /// Session blobs received ahead of a `Transfer`, by (origin, id).
    incoming: HashMap<(String, u64), Vec<SessionBlob>>,
    /// Hand-overs imported into the local application, by (origin, id), awaiting `Commit`.
    imported: HashMap<(String, u64), (SocketAddr, String)>,
    /// After a shedding round, until when a load still above the low watermark (clients still
    /// arriving in the same burst) keeps shedding: the hysteresis goes down to low, not high.
    shed_until: Option<Instant>,
    /// Time of the last successful shedding, threshold crossing to rules installed.
    last_shed_ms: Option<f64>,
}

/// A running agent.
pub struct Agent {
    cfg: Config,
    tls: Tls,
    dp: Mutex<Datapath>,
    state: Mutex<State>,
    next_id: AtomicU64,
    apps: Arc<Apps>,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn host_prefix(a: IpAddr) -> Prefix {
    Prefix { addr: a, len: if a.is_ipv4() { 32 } else { 128 } }
}

/// The shedding policy: the clients with the most connections first, until the projected load
/// is at or below `low`. One function, easy to change.
#[must_use]
pub fn pick_clients(clients: &[(IpAddr, u64)], total: u64, low: u64) -> Vec<(IpAddr, u64)> {
    let mut sorted: Vec<(IpAddr, u64)> = clients.to_vec();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut projected = total;
    let mut out = Vec::new();
    for c in sorted {
        if projected <= low {
            break;
        }
        projected = projected.saturating_sub(c.1);
        out.push(c);
    }
    out
}

impl Agent {
    /// Opens the datapath, steers the configured services and starts counting the load.
    pub fn new(cfg: Config) -> anyhow::Result<Arc<Self>> {
        let problems = cfg.problems();
        if !problems.is_empty() {
            bail!("invalid configuration: {}", problems.join("; "));
        }
        let tls = Tls::load(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)?;
        let loc = Location { bpffs: cfg.bpffs.clone(), instance: cfg.instance() };
        let mut dp = Datapath::open(&loc).context("opening the datapath")?;
        let listen = cfg.listen.expect("validated");
        for s in &cfg.services {
            let tunnel_src = (s.address.is_ipv4() == listen.is_ipv4()).then_some(listen.ip());
            dp.add_service((s.address.ip(), s.address.port()), &s.dev, tunnel_src, None)
                .with_context(|| format!("steering service {}", s.address))?;
            dp.attach_load(&s.cgroup).with_context(|| format!("counting the load of {}", s.cgroup.display()))?;
            // Ready to volunteer at once: adoption then only touches maps and a route.
            dp.attach_egress(&s.dev, false)?;
            dp.attach_sk_lookup(false)?;
        }
        // Re-adopt rules left by a previous run.
        let mut state = State::default();
        for r in dp.list_rules()? {
            if let Some(sib) = cfg.siblings.iter().find(|s| s.address.ip() == r.target) {
                state.migrated.insert(
                    r.prefix.addr,
                    MigratedOut { client: r.prefix.addr, to: sib.name.clone(), since_unix: r.since_unix, connections: 0 },
                );
            }
        }
        for s in &cfg.siblings {
            state.siblings.insert(s.name.clone(), SiblingState::default());
        }
        Ok(Arc::new(Self { cfg, tls, dp: Mutex::new(dp), state: Mutex::new(state), next_id: AtomicU64::new(1), apps: Arc::default() }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("state lock")
    }

    fn dp(&self) -> std::sync::MutexGuard<'_, Datapath> {
        self.dp.lock().expect("datapath lock")
    }

    /// Runs until ctrl-c / SIGTERM.
    pub async fn run(self: Arc<Self>) -> anyhow::Result<()> {
        let listen = self.cfg.listen.expect("validated");
        let listener = TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
        info!(node = %self.cfg.node, %listen, "agent started");
        tokio::spawn(self.clone().accept_loop(listener));
        for s in self.cfg.siblings.clone() {
            tokio::spawn(self.clone().connect_loop(s.name, s.address));
        }
        tokio::spawn(self.clone().load_loop());
        tokio::spawn(self.clone().liveness_loop());
        tokio::spawn(crate::admin::serve(self.clone()));
        let owner = self.cfg.app_socket_owner().map_err(|e| anyhow!(e))?;
        tokio::spawn(crate::app::serve(self.apps.clone(), self.cfg.app_socket(), owner));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        info!("agent stopping; steering stays pinned in the kernel");
        let _ = std::fs::remove_file(self.cfg.admin_socket());
        let _ = std::fs::remove_file(self.cfg.app_socket());
        Ok(())
    }

    // ---- connections ---------------------------------------------------------------------

    async fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.server.clone());
        loop {
            let Ok((tcp, peer_addr)) = listener.accept().await else { continue };
            let (me, acceptor) = (self.clone(), acceptor.clone());
            tokio::spawn(async move {
                if let Err(e) = me.clone().serve_inbound(acceptor, tcp).await {
                    warn!(peer = %peer_addr, "peer connection closed: {e:#}");
                }
            });
        }
    }

    async fn serve_inbound(self: Arc<Self>, acceptor: tokio_rustls::TlsAcceptor, tcp: TcpStream) -> anyhow::Result<()> {
        // Small request/answer frames: without this, Nagle and delayed ACKs add ~40 ms stalls.
        tcp.set_nodelay(true)?;
        let tls = tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp))
            .await
            .map_err(|_| anyhow!("TLS handshake timed out"))?
            .context("TLS handshake refused (no certificate from the cluster CA?)")?;
        let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned().ok_or_else(|| anyhow!("no client certificate"))?;
        let name = peer::identity(&cert, self.cfg.siblings.iter().map(|s| s.name.as_str()))
            .ok_or_else(|| anyhow!("refused: the certificate is not for a configured sibling"))?
            .to_string();
        let mut framed = Framed::new(tls, peer::codec(self.cfg.max_frame));
        let hello = next_msg(&mut framed).await?;
        peer::check_hello(&hello, &name)?;
        framed.send(Msg::Hello { version: PROTOCOL_VERSION, node: self.cfg.node.clone() }.frame()).await?;
        info!(sibling = %name, "sibling connected");
        loop {
            let msg = next_msg(&mut framed).await?;
            let reply = self.clone().handle_request(&name, msg).await;
            if let Some(r) = reply {
                framed.send(r.frame()).await?;
            }
        }
    }

    async fn connect_loop(self: Arc<Self>, name: String, addr: SocketAddr) {
        let connector = tokio_rustls::TlsConnector::from(self.tls.client.clone());
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.clone().connect_once(&connector, &name, addr).await {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(e) => {
                    if backoff >= Duration::from_secs(1) {
                        warn!(sibling = %name, "link down: {e:#}");
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
            if let Some(s) = self.state().siblings.get_mut(&name) {
                s.out = None;
            }
            tokio::time::sleep(backoff).await;
        }
    }

    async fn connect_once(self: Arc<Self>, connector: &tokio_rustls::TlsConnector, name: &str, addr: SocketAddr) -> anyhow::Result<()> {
        let tcp = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("connecting to {addr} timed out"))??;
        tcp.set_nodelay(true)?;
        let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).context("sibling name")?;
        let tls = tokio::time::timeout(Duration::from_secs(5), connector.connect(server_name, tcp))
            .await
            .map_err(|_| anyhow!("TLS handshake with {addr} timed out"))?
            .with_context(|| format!("TLS handshake with {name} at {addr}"))?;
        let mut framed = Framed::new(tls, peer::codec(self.cfg.max_frame));
        framed.send(Msg::Hello { version: PROTOCOL_VERSION, node: self.cfg.node.clone() }.frame()).await?;
        let hello = next_msg(&mut framed).await?;
        peer::check_hello(&hello, name)?;
        let (tx, mut rx) = mpsc::channel::<Msg>(64);
        self.state().siblings.entry(name.to_string()).or_default().out = Some(tx);
        info!(sibling = %name, %addr, "link up");
        let mut beat = tokio::time::interval(Duration::from_millis(self.cfg.heartbeat_ms));
        loop {
            tokio::select! {
                _ = beat.tick() => {
                    let load = self.state().load.total;
                    let hb = Msg::Heartbeat { load, high: self.cfg.high_watermark, low: self.cfg.low_watermark };
                    framed.send(hb.frame()).await?;
                }
                out = rx.recv() => {
                    let Some(m) = out else { bail!("channel closed") };
                    framed.send(m.frame()).await?;
                }
                frame = framed.next() => {
                    let msg = decode_frame(frame)?;
                    self.handle_answer(name, msg);
                }
            }
        }
    }

    fn handle_answer(&self, name: &str, msg: Msg) {
        let id = match &msg {
            Msg::Offer { id, .. } | Msg::Decline { id, .. } | Msg::TransferAck { id } | Msg::Abort { id, .. } => *id,
            Msg::Heartbeat { load, .. } => {
                let mut st = self.state();
                let s = st.siblings.entry(name.to_string()).or_default();
                s.load = *load;
                s.last_heartbeat = Some(Instant::now());
                return;
            }
            _ => return,
        };
        if let Some(tx) = self.state().pending.remove(&(name.to_string(), id)) {
            let _ = tx.send(msg);
        }
    }

    // ---- volunteer side ------------------------------------------------------------------

    async fn handle_request(self: Arc<Self>, from: &str, msg: Msg) -> Option<Msg> {
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

    fn limits(&self) -> Limits {
        Limits { timeout: Duration::from_millis(self.cfg.app_timeout_ms), max_session_bytes: self.cfg.max_session_bytes }
    }

    /// The local service (and its application) that serves a sibling's `svc`: same port.
    fn local_service_for(&self, svc: SocketAddr) -> Option<SocketAddr> {
        self.cfg.services.iter().find(|s| s.address.port() == svc.port() && s.address.is_ipv4() == svc.is_ipv4()).map(|s| s.address)
    }

    /// Volunteer: imports the sessions into the local application, then prepares delivery; only
    /// then acknowledges. Any failure undoes the import and answers `Abort`.
    async fn accept_transfer(
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

    fn offer(&self, from: &str, id: u64, connections: u64, clients: u32) -> Msg {
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

    fn adopt(&self, from: &str, id: u64, services: &[SocketAddr], tunnel_src: IpAddr, clients: &[MovedClient]) -> anyhow::Result<()> {
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

    // ---- origin side ---------------------------------------------------------------------

    async fn load_loop(self: Arc<Self>) {
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

    async fn ask(&self, name: &str, msg: Msg, id: u64, timeout: Duration) -> anyhow::Result<Msg> {
        let (tx, rx) = oneshot::channel();
        let out = {
            let mut st = self.state();
            st.pending.insert((name.to_string(), id), tx);
            st.siblings.get(name).and_then(|s| s.out.clone())
        };
        let out = out.ok_or_else(|| anyhow!("no link to {name}"))?;
        out.send(msg).await.map_err(|_| anyhow!("link to {name} closed"))?;
        let r = tokio::time::timeout(timeout, rx).await;
        self.state().pending.remove(&(name.to_string(), id));
        r.map_err(|_| anyhow!("{name} did not answer within {} ms", timeout.as_millis()))?.map_err(|_| anyhow!("link to {name} closed"))
    }

    fn live_siblings(&self) -> Vec<String> {
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
    async fn shed(self: Arc<Self>, load: &Load, projected: u64) -> anyhow::Result<usize> {
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
    async fn transfer(
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
        let msg = Msg::Transfer { id, services, tunnel_src, clients: clients.clone() };
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

    async fn tell(&self, name: &str, msg: Msg) {
        let out = self.state().siblings.get(name).and_then(|s| s.out.clone());
        if let Some(out) = out {
            let _ = out.send(msg).await;
        }
    }

    /// Installs the rules for clients a volunteer acknowledged (each after the probe).
    async fn steer(self: &Arc<Self>, name: &str, clients: Vec<MovedClient>) -> usize {
        let Some(target) = self.cfg.siblings.iter().find(|s| s.name == name).map(|s| s.address.ip()) else { return 0 };
        let me = self.clone();
        let result = tokio::task::spawn_blocking(move || {
            let prefixes: Vec<Prefix> = clients.iter().map(|c| host_prefix(c.addr)).collect();
            // One probe through the tunnel proves the path; then every rule, all or nothing.
            let r = me.dp().migrate_many(&prefixes, target, Some(Duration::from_secs(1)), false);
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

    async fn liveness_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.heartbeat_ms));
        let live = Duration::from_millis(self.cfg.liveness_ms);
        let mut last_collect = Instant::now();
        loop {
            tick.tick().await;
            // Rules whose drain ended are inert in the kernel; remove them so the map never
            // fills up with them.
            if last_collect.elapsed() >= Duration::from_secs(5) {
                last_collect = Instant::now();
                match self.dp().collect_drained() {
                    Ok(0) => {}
                    Ok(n) => info!(rules = n, "removed rules whose drain ended"),
                    Err(e) => warn!("removing drained rules: {e}"),
                }
            }
            let dead: Vec<(String, Vec<IpAddr>)> = {
                let st = self.state();
                self.cfg
                    .siblings
                    .iter()
                    .filter(|s| st.siblings.get(&s.name).is_none_or(|x| x.last_heartbeat.is_none_or(|t| t.elapsed() >= live)))
                    .map(|s| (s.name.clone(), st.migrated.values().filter(|m| m.to == s.name).map(|m| m.client).collect::<Vec<_>>()))
                    .filter(|(_, c)| !c.is_empty())
                    .collect()
            };
            for (name, clients) in dead {
                warn!(sibling = %name, clients = clients.len(), "sibling silent past the liveness timeout: draining its rules, clients come home");
                let period = Duration::from_secs(self.cfg.drain_secs);
                {
                    let mut dp = self.dp();
                    for c in &clients {
                        if let Err(e) = dp.drain(host_prefix(*c), period) {
                            warn!(client = %c, "drain failed: {e}");
                        }
                    }
                }
                let mut st = self.state();
                for c in clients {
                    st.migrated.remove(&c);
                }
            }
        }
    }

    // ---- status --------------------------------------------------------------------------

    /// Path of the admin socket.
    #[must_use]
    pub fn admin_socket(&self) -> std::path::PathBuf {
        self.cfg.admin_socket()
    }

    /// The node's status, for `redirector status`.
    pub fn status(&self) -> serde_json::Value {
        let counters = self.dp().stats().map(|s| s.counters.into_iter().map(|(n, v)| (n.to_string(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>()).unwrap_or_default();
        let st = self.state();
        let siblings: Vec<serde_json::Value> = self
            .cfg
            .siblings
            .iter()
            .map(|s| {
                let x = st.siblings.get(&s.name);
                let last = x.and_then(|x| x.last_heartbeat).map(|t| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX));
                serde_json::json!({
                    "name": s.name,
                    "address": s.address,
                    "up": x.is_some_and(|x| x.out.is_some()) && last.is_some_and(|l| l < self.cfg.liveness_ms),
                    "last_heartbeat_ms": last,
                    "load": x.map_or(0, |x| x.load),
                })
            })
            .collect();
        let mut migrated: Vec<&MigratedOut> = st.migrated.values().collect();
        migrated.sort_by_key(|m| m.client);
        let mut adopted: Vec<&AdoptedIn> = st.adopted.values().collect();
        adopted.sort_by_key(|a| a.client);
        serde_json::json!({
            "node": self.cfg.node,
            "load": st.load.total,
            "high_watermark": self.cfg.high_watermark,
            "low_watermark": self.cfg.low_watermark,
            "shedding": st.negotiating,
            "last_shed_ms": st.last_shed_ms,
            "siblings": siblings,
            "migrated_out": migrated,
            "adopted": adopted,
            "counters": counters,
        })
    }
}

async fn next_msg<T: AsyncRead + AsyncWrite + Unpin>(framed: &mut Framed<T, tokio_util::codec::LengthDelimitedCodec>) -> anyhow::Result<Msg> {
    decode_frame(framed.next().await)
}

fn decode_frame(frame: Option<Result<bytes::BytesMut, std::io::Error>>) -> anyhow::Result<Msg> {
    match frame {
        None => bail!("connection closed by the peer"),
        Some(Err(e)) => bail!("bad frame: {e}"),
        Some(Ok(b)) => Msg::decode(&b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_moves_the_biggest_clients_until_under_low() {
        let c = |i: u8, n| (IpAddr::from([198, 18, 1, i]), n);
        let clients = [c(1, 5), c(2, 40), c(3, 10), c(4, 30), c(5, 15)];
        // total 100, low 50: move 40 (->60), then 30 (->30).
        assert_eq!(pick_clients(&clients, 100, 50), vec![c(2, 40), c(4, 30)]);
        assert!(pick_clients(&clients, 40, 50).is_empty(), "already under low");
        assert_eq!(pick_clients(&clients, 100, 0).len(), 5, "never more than there are");
    }
}
