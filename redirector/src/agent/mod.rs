//! The agent: talks to its siblings over mutual TLS, watches the application's load in the
//! kernel, and when the node passes its high watermark asks its siblings for help and moves
//! clients to the volunteers until the projected load is at or below the low watermark.
//!
//! Requests travel on the requester's own (outbound) connection; each node answers on its
//! inbound connections, handling requests concurrently so that a long import never stops
//! heartbeats from being read; heartbeats flow both ways on every connection. A sibling
//! silent for `liveness_ms` (counted from the agent's start, or from when a link came up, until
//! it is first heard) is suspected: the clients moved to it are taken home with their
//! sessions (`handback.rs`), and only if it cannot be reached for that are its rules drained.
//!
//! Datapath work (probes, netlink, map scans) runs on blocking threads only: changes go through
//! one handle, reads (load, counters, rule listings) through a second handle of the same pinned
//! maps, so the load is read every 50 ms even while a probe holds the first.

mod drain;
mod expiry;
pub mod faults;
mod gate;
mod gossip;
mod handback;
mod handoff;
mod kernel_log;
mod link;
mod live;
mod liveness;
mod origin;
mod policy;
mod probe;
mod records;
mod ring;
mod siblings;
mod standby;
mod state;
pub mod tally;
mod transfer;
mod verdict;
mod volunteer;

use std::{
    net::IpAddr,
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, anyhow};
use tokio::{net::TcpListener, sync::mpsc};
use tracing::{info, warn};

pub use self::{
    policy::{ago, pick_clients},
    records::Dir,
};

/// A client is not handed over again (either way) within this long of its last move: its
/// requests that waited when it moved are answered on their retry first (a second move at
/// once would close that retry's connection too).
pub const MOVE_DWELL: Duration = Duration::from_secs(2);

/// How long an exiting agent waits for its links to send what is queued on them and close.
const CLOSE_WAIT: Duration = Duration::from_secs(2);
use self::state::{Acked, Incoming, Links, Received, State, Streamed};
use crate::{
    admin::api::{self, OrphanRule, Status},
    app::{Apps, Limits, Registration},
    config::Valid,
    datapath::{Datapath, Location, Prefix, RuleInfo, RuleState, family_name, unix_now},
    peer::tls::Tls,
    plane::Plane,
};

/// A running agent.
pub struct Agent {
    /// Itself, for what starts a task from a borrowed agent (a link opened on demand).
    me: std::sync::Weak<Agent>,
    cfg: Valid,
    tls: Tls,
    /// Changes to the datapath (rules, adoption; a probe holds it up to a second): only ever
    /// locked on blocking threads.
    dp: Mutex<Box<dyn Plane>>,
    /// Reads of the same pinned maps (load, counters, rules), never waiting behind a probe;
    /// also only locked on blocking threads.
    reader: Mutex<Box<dyn Plane>>,
    /// Whether datapath calls may block ([`Plane::blocks`]).
    plane_blocks: bool,
    state: Mutex<State>,
    next_id: AtomicU64,
    apps: Arc<Apps>,
    /// Registrations of applications, until `run` takes them.
    registrations: Mutex<Option<mpsc::UnboundedReceiver<Registration>>>,
    /// Test-only faults (`REDIRECTOR_TEST_FAULTS`).
    faults: faults::Faults,
    /// When this agent started: a sibling not heard from yet is silent since then.
    started: Instant,
    /// Shedding rounds that moved nothing make the next one wait longer.
    round_backoff: Mutex<policy::Backoff>,
    /// Wakes the load loop at once when the kernel reports a crossing.
    load_wake: tokio::sync::Notify,
    /// Wakes whoever waits for a link ([`Agent::link_to`]) when one comes up.
    link_up: tokio::sync::Notify,
    /// The origin's hand-over records (`state_dir`).
    records: Mutex<records::Records>,
    /// Hand-overs decided without a record are decided one at a time.
    deciding: tokio::sync::Mutex<()>,
    /// Connections on the control port until they proved who they are.
    gate: Arc<gate::Gate>,
    /// Rule installations started (test faults count them).
    steers: std::sync::atomic::AtomicUsize,
    /// Set once `run` has bound its sockets and started its tasks ([`Agent::running`]).
    running: tokio::sync::watch::Sender<bool>,
    /// Hand-overs counted as they end.
    tally: tally::Tally,
    /// Volunteer: connections moved here, by transfer, until its end ([`live`]).
    /// What live moves keep between the steps of hand-overs.
    live: Mutex<live::Pending>,
    /// Members gossip brought (gossip mode; [`siblings`]).
    known: Mutex<siblings::Known>,
    /// This node in the gossip, once it joined (gossip mode).
    membership: std::sync::OnceLock<gossip::Membership>,
}

/// Raises the soft limit of open descriptors to the hard one: connections moving live are a
/// descriptor each here, in flight to an application too (a move of a thousand connections
/// would pass the usual soft limit of 1024).
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid rlimit to fill, then to set.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim) != 0 {
                warn!("cannot raise the open descriptors' limit: {}", std::io::Error::last_os_error());
            }
        }
    }
}

/// A datapath call made on a blocking thread, as one result: the datapath's error, or the
/// blocking task's failure (with its causes), as text for a log line.
fn flat<T>(r: anyhow::Result<crate::datapath::Result<T>>) -> Result<T, String> {
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(format!("{e:#}")),
    }
}

fn host_prefix(a: IpAddr) -> Prefix {
    Prefix { addr: a, len: if a.is_ipv4() { 32 } else { 128 } }
}

/// An active rule the agent manages: the client, the sibling it is steered to, since when
/// (wall clock).
type ManagedRule = (IpAddr, String, u64);

/// A rule draining: its prefix, and the sibling it drains to (none if its target is no known
/// sibling).
type DrainingRule = (Prefix, Option<String>);

/// Sorts the kernel's rules for an agent: the active rules it manages, rules it leaves alone
/// (and why), and those draining.
fn classify_rules(siblings: &[crate::config::Sibling], rules: &[RuleInfo]) -> (Vec<ManagedRule>, Vec<OrphanRule>, Vec<DrainingRule>) {
    let (mut managed, mut orphans, mut draining) = (Vec::new(), Vec::new(), Vec::new());
    for r in rules {
        match r.state {
            RuleState::Drained => {}
            RuleState::Draining => draining.push((r.prefix, crate::config::sibling_at(siblings, r.target).map(|s| s.name.clone()))),
            RuleState::Active => {
                let host = r.prefix == host_prefix(r.prefix.addr);
                match crate::config::sibling_at(siblings, r.target) {
                    Some(s) if host => managed.push((r.prefix.addr, s.name.clone(), r.since_unix)),
                    Some(_) => {
                        orphans.push(OrphanRule { prefix: r.prefix.to_string(), target: r.target, why: "a prefix rule (the agent moves single clients): left alone".into() });
                    }
                    None => orphans.push(OrphanRule {
                        prefix: r.prefix.to_string(),
                        target: r.target,
                        why: format!("target {} is not a known sibling: left alone, not watched", r.target),
                    }),
                }
            }
        }
    }
    (managed, orphans, draining)
}

impl Agent {
    /// Opens the kernel's datapath, steers the configured services and starts counting the
    /// load; re-adopts the active rules a previous run left.
    pub fn new(cfg: Valid) -> anyhow::Result<Arc<Self>> {
        let loc = Location { bpffs: cfg.bpffs.clone(), instance: cfg.instance() };
        let mut dp = Datapath::open(&loc).context("opening the datapath")?;
        for (s, tunnel_src) in cfg.services_with_tunnel_source() {
            let steered =
                dp.add_service_xdp((s.address.ip(), s.address.port()), &s.dev, Some(tunnel_src), None, s.xdp).with_context(|| format!("steering service {}", s.address))?;
            if let Some(why) = &steered.xdp_unavailable {
                warn!(service = %s.address, "{why}: the TC classifier alone steers it");
            }
            dp.set_live_moves((s.address.ip(), s.address.port()), s.live_moves).with_context(|| format!("live moves of service {}", s.address))?;
            dp.attach_load(&s.cgroup).with_context(|| format!("counting the load of {}", s.cgroup.display()))?;
            // Ready to volunteer at once: adoption then only touches maps and a route.
            dp.attach_egress(&s.dev, false)?;
            dp.attach_sk_lookup(false)?;
        }
        // A new version of the agent runs its own programs: swapped into the pinned links,
        // atomically per hook, with the pinned maps (and so the steering) kept.
        let replaced = dp.upgrade().context("putting this version's programs in place")?;
        // Connections a predecessor froze while moving them: their moves are decided (or
        // will be, from the rules), and a freeze left alone lasts its full limit.
        let thawed = dp.thaw_all().context("thawing connections frozen by a previous run")?;
        if thawed > 0 {
            warn!(flows = thawed, "thawed connections a previous run froze while moving them");
        }
        info!(programs = replaced, "this version's programs attached (atomically, pinned maps kept)");
        let reader = Datapath::open(&loc).context("opening the datapath for reading")?;
        Self::with_plane(cfg, Box::new(dp), Box::new(reader))
    }

    /// An agent on datapath `dp` (changes) and `reader` (reads of the same state): the
    /// kernel's ([`Agent::new`]), or an in-memory one ([`crate::plane::memory`]).
    pub fn with_plane(cfg: Valid, mut dp: Box<dyn Plane>, reader: Box<dyn Plane>) -> anyhow::Result<Arc<Self>> {
        raise_fd_limit();
        // Moving connections: room for their descriptors now, not while their clients wait.
        if let Err(e) = redirector_hook::fds::reserve_table(redirector_hook::fds::TABLE_ROOM) {
            warn!("cannot make room for descriptors in advance ({e}): a first big move of connections will wait for it");
        }
        let tls = Tls::load(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)?;
        // Siblings refuse an expired certificate: an agent with one could never link.
        for path in [&cfg.tls.cert, &cfg.tls.ca] {
            crate::peer::tls::expiry(path).map_err(|e| anyhow!("{e}: make a new one with `redirector tls`"))?;
        }
        let mut state = State { links: Links::new(cfg.siblings.iter().map(|s| s.name.as_str().into())), ..State::default() };
        for s in &cfg.siblings {
            for svc in &cfg.services {
                if s.control_address(svc.address.ip()).is_none() {
                    warn!(sibling = %s.name, service = %svc.address, "{} clients never move to this sibling: it has no {} control address (dual_stack_address)", family_name(svc.address.is_ipv4()), family_name(svc.address.is_ipv4()));
                }
            }
        }
        // Re-adopt the active rules a previous run left; drained ones are gone, draining ones
        // finish draining, and rules to unknown targets are reported, not managed.
        // Gossip mode: the members a previous run knew (the rules name them).
        let known = if cfg.cluster.gossip() { siblings::Known::read(&cfg.state_dir()) } else { siblings::Known::default() };
        let siblings = if cfg.cluster.gossip() { known.list() } else { cfg.siblings.clone() };
        let (managed, orphans, draining) = classify_rules(&siblings, &dp.list_rules()?);
        let now = Instant::now();
        for (client, to, since_unix) in &managed {
            state.moved.watch(*client, to, *since_unix, now);
        }
        for o in &orphans {
            warn!(prefix = %o.prefix, target = %o.target, "rule not managed by the agent: {}", o.why);
        }
        if !managed.is_empty() || !draining.is_empty() {
            info!(active = managed.len(), draining = draining.len(), "re-adopted the rules of a previous run (draining ones finish draining)");
        }
        // Reported above.
        let _ = state.moved.rules_left(orphans, &draining, now);
        // Request ids never repeat across restarts: a volunteer may still hold state of ours.
        let first_id = u64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())).unwrap_or(0) << 16;
        let faults = faults::Faults::from_env().map_err(|e| anyhow!("{}: {e}", faults::ENV))?;
        if faults.any() {
            warn!(?faults, "TEST FAULTS ENABLED ({}): this agent misbehaves on purpose", faults::ENV);
        }
        let records = records::Records::open(&cfg.state_dir()).context("opening the hand-over records")?;
        state.drained = drain::read(&cfg.state_dir())?;
        if let Some(since) = state.drained {
            warn!(since_unix = since, "this node is drained (`redirector drain`): every client moves to siblings, none comes home, until `redirector undrain`");
        }
        let unfinished = records.undecided();
        if unfinished > 0 {
            warn!(handoffs = unfinished, dir = %cfg.state_dir().display(), "hand-overs a previous run left undecided: the kernel's rules decide them at start");
        }
        let limits = Limits { timeout: Duration::from_millis(cfg.app_timeout_ms), per_mib_ms: cfg.app_timeout_per_mib_ms, max_session_bytes: cfg.max_session_bytes };
        let (apps, registrations) = Apps::new(limits, cfg.services.iter().map(|s| s.address));
        Ok(Arc::new_cyclic(|me| Self {
            me: me.clone(),
            cfg,
            tls,
            plane_blocks: dp.blocks() || reader.blocks(),
            dp: Mutex::new(dp),
            reader: Mutex::new(reader),
            state: Mutex::new(state),
            next_id: AtomicU64::new(first_id.max(1)),
            apps,
            registrations: Mutex::new(Some(registrations)),
            faults,
            started: Instant::now(),
            round_backoff: Mutex::new(policy::Backoff::new(Duration::from_millis(500), Duration::from_secs(4))),
            load_wake: tokio::sync::Notify::new(),
            link_up: tokio::sync::Notify::new(),
            records: Mutex::new(records),
            deciding: tokio::sync::Mutex::new(()),
            gate: gate::Gate::new(),
            running: tokio::sync::watch::Sender::new(false),
            tally: tally::Tally::default(),
            live: Mutex::default(),
            steers: std::sync::atomic::AtomicUsize::new(0),
            known: Mutex::new(known),
            membership: std::sync::OnceLock::new(),
        }))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("state lock")
    }

    fn records(&self) -> std::sync::MutexGuard<'_, records::Records> {
        self.records.lock().expect("records lock")
    }

    /// Runs `f` on the datapath's change handle, on a blocking thread (if its calls may block).
    async fn with_dp<T: Send + 'static>(self: &Arc<Self>, f: impl FnOnce(&mut dyn Plane) -> T + Send + 'static) -> anyhow::Result<T> {
        self.on_plane(|a| &a.dp, f).await
    }

    /// Runs `f` on the datapath's read handle, on a blocking thread (if its calls may block).
    async fn with_reader<T: Send + 'static>(self: &Arc<Self>, f: impl FnOnce(&mut dyn Plane) -> T + Send + 'static) -> anyhow::Result<T> {
        self.on_plane(|a| &a.reader, f).await
    }

    /// Runs `f` on the handle `which` picks: inline if the plane never blocks, else on a
    /// blocking thread.
    async fn on_plane<T: Send + 'static>(self: &Arc<Self>, which: fn(&Self) -> &Mutex<Box<dyn Plane>>, f: impl FnOnce(&mut dyn Plane) -> T + Send + 'static) -> anyhow::Result<T> {
        if !self.plane_blocks {
            return Ok(f(&mut **which(self).lock().expect("datapath lock")));
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&mut **which(&me).lock().expect("datapath lock"))).await.map_err(|e| anyhow!("datapath task failed: {e}"))
    }

    fn limits(&self) -> Limits {
        self.apps.limits()
    }

    /// Runs until ctrl-c / SIGTERM, then leaves (`hand_back_on_exit`).
    pub async fn run(self: Arc<Self>) -> anyhow::Result<()> {
        self.start().await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        // A second signal ends the agent at once.
        tokio::select! {
            () = async {
                self.leave().await;
                self.leave_cluster().await;
                self.close_links(CLOSE_WAIT).await;
            } => {}
            _ = tokio::signal::ctrl_c() => warn!("stopping at once (second signal)"),
            _ = term.recv() => warn!("stopping at once (second signal)"),
        }
        self.keep_all_known();
        let _ = std::fs::remove_file(self.cfg.app_socket());
        Ok(())
    }

    /// Binds the agent's sockets and starts its work on the runtime's tasks, which run until
    /// the runtime ends (an end without leaving, as a process killed). [`Agent::run`] for a
    /// process; this alone for many agents in one (`cargo xtask bench cluster`).
    ///
    /// # Errors
    /// A socket that cannot be bound; a second start.
    pub async fn start(self: &Arc<Self>) -> anyhow::Result<()> {
        let listen = self.cfg.listen();
        let listener = TcpListener::bind(listen).await.with_context(|| format!("listening on {listen}"))?;
        // The hook socket is bound before anything can move: an agent whose applications
        // cannot reach it must not run (their clients would move without their sessions).
        let hook = crate::app::bind(&self.cfg.app_socket(), self.cfg.app_socket_owner())?;
        let gossip = self.bind_gossip_if_any()?;
        let registrations = self.registrations.lock().expect("lock").take().ok_or_else(|| anyhow!("the agent runs once"))?;
        tokio::spawn(self.clone().registrations(registrations));
        tokio::spawn(crate::app::serve(self.apps.clone(), hook));
        info!(node = %self.cfg.node, %listen, app_socket = %self.cfg.app_socket().display(), "agent started");
        tokio::spawn(self.clone().accept_loop(listener));
        if let Some(gossip) = gossip {
            // Links open when they are needed ([`Agent::link_to`]); to the volunteers of the
            // rules a previous run left, now (their liveness is watched).
            let volunteers: Vec<String> = self.state().moved.by_volunteer().into_keys().collect();
            for name in volunteers {
                if let Some(s) = self.sibling(&name) {
                    self.clone().dial_loop(&name, s.address);
                }
            }
            tokio::spawn(self.clone().gossip_loop(gossip));
        } else {
            for s in self.cfg.siblings.clone() {
                self.clone().dial_loop(&s.name, s.address);
            }
        }
        tokio::spawn(self.clone().load_loop());
        tokio::spawn(self.clone().load_events());
        tokio::spawn(self.clone().kernel_log());
        tokio::spawn(self.clone().liveness_loop());
        tokio::spawn(self.clone().finish_unfinished());
        tokio::spawn(expiry::warn_daily(self.cfg.tls.clone()));
        if let Some(after) = self.faults.panic_after {
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                panic!("TEST FAULT panic-after");
            });
        }
        self.running.send_replace(true);
        Ok(())
    }

    /// Resolves once [`Agent::run`] has bound its sockets and started its work: what watches the
    /// agent (the admin socket) appears only then, so that an answer means the agent runs.
    pub async fn running(&self) {
        let _ = self.running.subscribe().wait_for(|r| *r).await;
    }

    /// On SIGTERM: gives the clients adopted here back to their origins and takes the clients
    /// moved out home, with their sessions, within `exit_timeout_ms`. What is left stays
    /// steered by the pinned rules (the next agent takes it over), and is logged.
    async fn leave(self: &Arc<Self>) {
        if !self.cfg.hand_back_on_exit {
            info!("agent stopping (hand_back_on_exit = false): every client stays where it is, steered by the pinned rules");
            return;
        }
        self.state().leaving = true;
        // No round starts any more; the hand-overs in progress end first (their clients are
        // held meanwhile), so that what they moved goes back too.
        let deadline = Instant::now() + Duration::from_millis(self.cfg.exit_timeout_ms);
        while Instant::now() < deadline && {
            let st = self.state();
            st.rounds.negotiating || !st.busy.is_empty()
        } {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (adopted, migrated, drained) = {
            let st = self.state();
            // A drained node is usually stopped for maintenance: its clients stay away.
            let drained = st.drained.is_some();
            let migrated = if drained { state::ByNode::default() } else { st.moved.by_volunteer() };
            (st.volunteer.by_origin(), migrated, drained)
        };
        if drained {
            info!("this node is drained: the clients moved out stay where they are (steered by the pinned rules; the next agent keeps them there until `redirector undrain`)");
        }
        let (n_adopted, n_migrated): (usize, usize) = (adopted.values().map(Vec::len).sum(), migrated.values().map(Vec::len).sum());
        info!(
            adopted = n_adopted,
            moved_out = n_migrated,
            timeout_ms = self.cfg.exit_timeout_ms,
            "agent stopping: giving adopted clients back and taking moved clients home, with their sessions"
        );
        let gives = adopted.into_iter().map(|(origin, clients)| async move {
            if let Err(e) = self.give_back(&origin, clients).await {
                warn!(origin, "cannot give clients back: {e:#}");
            }
        });
        let homes = migrated.into_iter().map(|(to, clients)| async move {
            self.take_home(&to, clients, "this agent is stopping", false).await;
        });
        // The hand-backs started below are noted: those the deadline cuts short are ended
        // after it.
        let started: Arc<std::sync::Mutex<Vec<u64>>> = Arc::default();
        let all = handback::STARTED.scope(started.clone(), futures::future::join(futures::future::join_all(gives), futures::future::join_all(homes)));
        let timed_out = tokio::time::timeout_at(deadline.into(), all).await.is_err();
        if timed_out {
            let ids = started.lock().expect("lock").clone();
            self.end_cut_short(&ids).await;
        }
        let st = self.state();
        let (left_adopted, left_out) = (st.volunteer.adopted.len(), if drained { 0 } else { st.moved.clients.len() });
        if left_adopted + left_out == 0 {
            info!("agent stopped: every client is home or back with its origin");
        } else {
            warn!(
                adopted = left_adopted,
                moved_out = left_out,
                timed_out,
                "agent stopping with clients not handed back: they stay where they are, steered by the pinned rules (the next agent takes them over)"
            );
        }
    }

    // ---- status --------------------------------------------------------------------------

    /// What keeps this node from doing its work now (empty: healthy): the classifier not
    /// attached to a service's interface, or no application registered for a service that
    /// keeps sessions (its clients cannot move).
    pub async fn health(self: &Arc<Self>) -> Vec<String> {
        let mut devs: Vec<String> = self.cfg.services.iter().map(|s| s.dev.clone()).collect();
        devs.sort();
        devs.dedup();
        let attached = self.with_reader(move |dp| devs.into_iter().map(|d| (dp.ingress_attached_to(&d), d)).collect::<Vec<_>>()).await;
        let mut problems: Vec<String> = match attached {
            Ok(devs) => devs
                .into_iter()
                .filter_map(|(a, dev)| match a {
                    Ok(true) => None,
                    Ok(false) => Some(format!("the classifier is not attached to {dev}")),
                    Err(e) => Some(format!("{dev}: {e}")),
                })
                .collect(),
            Err(e) => vec![format!("{e:#}")],
        };
        for s in self.cfg.services.iter().filter(|s| s.sessions && !self.apps.has(s.address)) {
            problems.push(format!("no application registered for {} (sessions = true): its clients cannot move", s.address));
        }
        problems
    }

    /// The hand-overs counted as they ended (for the metrics).
    #[must_use]
    pub fn tally(&self) -> &tally::Tally {
        &self.tally
    }

    /// The node's status, for `redirector status`.
    pub async fn status(self: &Arc<Self>) -> Status {
        let counters =
            self.with_reader(|d| d.stats()).await.ok().and_then(Result::ok).map(|s| s.counters.into_iter().map(|(n, v)| (n.to_string(), v)).collect()).unwrap_or_default();
        let cluster = self.members_status();
        let known = self.siblings();
        let st = self.state();
        let ms = |t: Instant| u64::try_from(t.elapsed().as_millis()).unwrap_or(u64::MAX);
        let siblings = known
            .iter()
            .map(|s| {
                let x = st.links.siblings.get(s.name.as_str());
                let last = x.and_then(|x| x.last_heartbeat).map(ms);
                api::SiblingStatus {
                    name: s.name.clone(),
                    address: s.address,
                    up: x.is_some_and(|x| x.out.is_some()) && last.is_some_and(|l| l < self.cfg.liveness_ms),
                    last_heartbeat_ms: last,
                    last_seen_ms: x.and_then(|x| x.last_seen).map(ms),
                    load: x.map_or(0, |x| x.load),
                }
            })
            .collect();
        let mut migrated_out: Vec<api::MovedOut> =
            st.moved.clients.values().map(|m| api::MovedOut { client: m.client, to: m.to.clone(), since_unix: m.since_unix, connections: m.connections }).collect();
        migrated_out.sort_by_key(|m| m.client);
        let mut adopted: Vec<api::Adopted> = st
            .volunteer
            .adopted
            .values()
            .map(|a| api::Adopted { client: a.client, from: a.from.clone(), since_unix: a.since_unix, promised: a.promised, connections: a.connections })
            .collect();
        adopted.sort_by_key(|a| a.client);
        let (registered, unconfirmed) = self.apps.status();
        Status {
            node: self.cfg.node.clone(),
            load: st.load.total,
            high_watermark: self.cfg.high_watermark,
            low_watermark: self.cfg.low_watermark,
            shedding: st.rounds.negotiating,
            last_shed_ms: st.rounds.last_shed_ms,
            last_round: st.rounds.last_round.clone(),
            promised: st.volunteer.adopted_promised(),
            siblings,
            migrated_out,
            adopted,
            draining: st.moved.draining,
            orphaned: st.moved.orphans.clone(),
            hook: api::HookStatus { registered, unconfirmed },
            handoffs: api::HandoffStatus {
                clients_in_progress: st.busy.len(),
                awaiting_outcome: st.volunteer.acked.len(),
                undecided: self.records().undecided(),
                handed_back: st.moved.handed_back,
                last_home_ms: st.moved.last_home_ms,
            },
            sessions_lost: st.moved.sessions_lost,
            leaving: st.leaving,
            drain: st.drained.map(|since| drain::progress(&st, since)),
            counters,
            cluster,
        }
    }
}
