//! The agent: talks to its siblings over mutual TLS, watches the application's load in the
//! kernel, and when the node passes its high watermark asks its siblings for help and moves
//! clients to the volunteers until the projected load is at or below the low watermark.
//!
//! Requests travel on the requester's own (outbound) connection; each node answers on its
//! inbound connections. Heartbeats go both ways; a sibling silent for `liveness_ms` has the
//! rules that point at it drained, so its clients come home.


mod link;
mod liveness;
mod origin;
mod policy;
mod volunteer;

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, anyhow, bail};
use serde::Serialize;
use tokio::{net::TcpListener, sync::{mpsc, oneshot}};
use tracing::info;

pub use self::policy::pick_clients;
use crate::{
    app::Apps,
    config::Config,
    datapath::{Datapath, Load, Location, Prefix},
    peer::{Msg, SessionBlob, Tls},
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
