//! Liveness and housekeeping, every heartbeat interval: a sibling silent past the timeout is
//! suspected, and the clients moved to it are taken home with their sessions; only if it
//! cannot be reached for that are the rules pointing at it drained (its clients come home
//! without their sessions, counted as lost). The agent's view of its rules is reconciled with
//! the kernel's (rules removed or changed outside the agent); rules whose drain ended are
//! removed; the volunteer's bookkeeping expires.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::{debug, info, warn};

use super::{Agent, classify_rules, flat, host_prefix};
use crate::datapath::{Listener, Prefix};

impl Agent {
    pub(super) async fn liveness_loop(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.heartbeat_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut last_collect, mut last_reconcile) = (Instant::now(), Instant::now());
        loop {
            tick.tick().await;
            self.expire();
            self.suspect_silent();
            self.flush_unreleased().await;
            if last_reconcile.elapsed() >= Duration::from_secs(2) {
                last_reconcile = Instant::now();
                self.reconcile().await;
                self.refresh_listeners().await;
            }
            // Rules whose drain ended are inert in the kernel; remove them so the map never
            // fills up with them.
            if last_collect.elapsed() >= Duration::from_secs(5) {
                last_collect = Instant::now();
                match flat(self.with_dp(|d| d.collect_drained()).await) {
                    Ok(0) => {}
                    Ok(n) => info!(rules = n, "removed rules whose drain ended"),
                    Err(e) => warn!("removing drained rules: {e}"),
                }
            }
        }
    }

    /// Registers again the local listener of an adopted service whose listening socket changed:
    /// when the application restarts, its old socket leaves the `sk_lookup` map and steered
    /// clients would be refused (`sk-no-listener`) until its new one is registered. The socket's
    /// inode tells a change cheaply; only then are the processes searched for it.
    async fn refresh_listeners(self: &Arc<Self>) {
        type Check = (SocketAddr, SocketAddr, Result<u64, String>);
        let services: Vec<(SocketAddr, SocketAddr)> = match flat(self.with_reader(|d| d.list_adopted()).await) {
            Ok(list) => list
                .into_iter()
                .filter_map(|(ip, port, _)| {
                    let svc = SocketAddr::new(ip, port);
                    Some((svc, self.cfg.serving(svc)?.listener()))
                })
                .collect(),
            _ => return,
        };
        let checks: Vec<Check> =
            match self.with_reader(move |d| services.into_iter().map(|(svc, l)| (svc, l, d.listener_inode((l.ip(), l.port())).map_err(|e| e.to_string()))).collect()).await {
                Ok(c) => c,
                Err(_) => return,
            };
        self.state().volunteer.listeners.retain(|svc, _| checks.iter().any(|c| c.0 == *svc));
        for (svc, listener, inode) in checks {
            let known = self.state().volunteer.listeners.get(&svc).copied();
            let registered = match inode {
                Ok(ino) if known == Some(Some(ino)) => continue,
                Ok(ino) => {
                    let holder = self.cfg.serving(svc).and_then(|own| self.apps.holder(own.address));
                    let listener = Listener::new(listener, holder);
                    flat(self.with_dp(move |dp| dp.register_listener((svc.ip(), svc.port()), listener)).await).map(|()| ino)
                }
                Err(e) => Err(e),
            };
            let mut st = self.state();
            match registered {
                Ok(ino) => {
                    if known == Some(None) {
                        info!(service = %svc, %listener, "the application listens again: its clients are served");
                    }
                    st.volunteer.listeners.insert(svc, Some(ino));
                }
                Err(why) => {
                    if known != Some(None) {
                        warn!(service = %svc, %listener, "clients steered here for {svc} are refused until the application listens again: {why}");
                    }
                    st.volunteer.listeners.insert(svc, None);
                }
            }
        }
    }

    /// Siblings silent for the liveness timeout, counted from when they were last heard or,
    /// until then, from this agent's start (a restarted origin gives its volunteers the whole
    /// timeout to link up again), with the clients moved to them.
    fn silent_siblings(&self) -> Vec<(String, Vec<IpAddr>, Duration)> {
        let live = Duration::from_millis(self.cfg.liveness_ms);
        // The volunteers holding clients of this node, not every member known: a node of a
        // large cluster would copy a thousand members each tick to find a few.
        let holding = self.state().moved.by_volunteer();
        let holding: Vec<(String, Vec<IpAddr>)> = holding.into_iter().filter(|(name, _)| self.sibling(name).is_some()).collect();
        let st = self.state();
        holding
            .into_iter()
            .filter_map(|(name, clients)| {
                let silent = st.links.last_seen(&name).unwrap_or(self.started).elapsed();
                (silent >= live).then_some((name, clients, silent))
            })
            .collect()
    }

    fn suspect_silent(self: &Arc<Self>) {
        for (name, clients, silent) in self.silent_siblings() {
            if !self.state().links.suspect(&name) {
                continue;
            }
            let me = self.clone();
            tokio::spawn(async move {
                me.suspect(&name, clients, silent).await;
                me.state().links.unsuspect(&name);
            });
        }
    }

    /// Sibling `name` has been silent for `silent`, past the liveness timeout, with `clients`
    /// moved to it. Suspicion is not death. While its agent can be reached, its clients are
    /// taken home with their sessions. While only its datapath answers (its agent restarts, or
    /// only the control channel is cut), they stay where they are served, with their sessions.
    /// Only when that does not answer either (its clients' new connections would fail) are its
    /// rules drained: the clients come home without their sessions (counted as lost).
    pub(super) async fn suspect(self: &Arc<Self>, name: &str, clients: Vec<IpAddr>, silent: Duration) {
        let live = Duration::from_millis(self.cfg.liveness_ms);
        let linked = self.state().links.linked(name);
        if linked {
            warn!(sibling = %name, clients = clients.len(), silent_ms = silent.as_millis(), "sibling silent past the liveness timeout: suspected; taking its clients home with their sessions");
            self.take_home(name, clients, "suspected: silent past the liveness timeout", true).await;
        }
        let (left, heard): (Vec<IpAddr>, bool) = {
            let st = self.state();
            let left = st.moved.on(name).into_iter().filter(|c| !st.busy.contains(c)).collect();
            let heard = st.links.last_seen(name).is_some_and(|t| t.elapsed() < live);
            (left, heard)
        };
        if left.is_empty() {
            return;
        }
        if heard {
            info!(sibling = %name, clients = left.len(), "sibling heard again: the clients that did not come home stay on it");
            return;
        }
        // Does its datapath still serve them? A probe through the tunnel, per family.
        let targets: Vec<IpAddr> = self
            .sibling(name)
            .map(|s| {
                [true, false]
                    .into_iter()
                    .filter(|v4| left.iter().any(|c| c.is_ipv4() == *v4))
                    .filter_map(|v4| s.control_address(if v4 { IpAddr::from([0u8; 4]) } else { IpAddr::from([0u16; 8]) }))
                    .collect()
            })
            .unwrap_or_default();
        let timeout = Duration::from_millis((self.cfg.liveness_ms / 3).clamp(200, 1000));
        // Nothing to probe is no answer: only a datapath that answers keeps the clients there.
        let probed = if targets.is_empty() {
            Err(format!("no control address of {name} is known for the families of its clients"))
        } else {
            flat(self.with_dp(move |dp| targets.iter().try_for_each(|t| dp.probe_target(*t, timeout))).await)
        };
        if probed.is_ok() {
            if self.state().links.agent_unreachable(name) {
                warn!(sibling = %name, clients = left.len(), silent_ms = silent.as_millis(), "sibling's agent unreachable, but its datapath serves its clients: they stay on it with their sessions until it is back");
            }
            return;
        }
        warn!(
            sibling = %name,
            clients = left.len(),
            silent_ms = silent.as_millis(),
            "sibling unreachable past the liveness timeout and its datapath does not answer ({}): draining its rules, its clients come home without their sessions",
            probed.err().unwrap_or_default()
        );
        let period = Duration::from_secs(self.cfg.drain_secs);
        let prefixes: Vec<Prefix> = left.iter().map(|c| host_prefix(*c)).collect();
        match flat(self.with_dp(move |dp| dp.drain_many(&prefixes, period)).await) {
            Ok(n) => info!(sibling = %name, rules = n, drain_secs = period.as_secs(), "rules draining"),
            Err(e) => return warn!(sibling = %name, "draining failed, trying again: {e}"),
        }
        // It cannot hear it now (a link that looks up is stuck): it is told first thing
        // when its link is up again.
        let mut st = self.state();
        // Every one of them was served there, so whatever session it had there is gone; which
        // of them had none by then only the dead sibling knew.
        let lost = st.moved.lost(name, &left, Instant::now());
        warn!(sibling = %name, sessions_lost = lost, total_lost = st.moved.sessions_lost, "sessions lost: their clients came home from an unreachable sibling and start new sessions here");
        st.links.owe_release(name, left);
    }

    /// Releases owed to siblings that are heard again on a link that never went down (a
    /// link that does go down releases them first thing when it is up again).
    async fn flush_unreleased(self: &Arc<Self>) {
        let live = Duration::from_millis(self.cfg.liveness_ms);
        let owed = self.state().links.take_owed(live);
        for (name, clients) in owed {
            info!(sibling = %name, clients = clients.len(), "sibling heard again: releasing the clients taken back meanwhile");
            self.release(&name, clients).await;
        }
    }

    /// Compares what the agent believes it steered with the kernel's rules: clients whose rule
    /// was removed, drained or retargeted outside the agent (CLI, drain collection) are
    /// forgotten and released on their volunteer; active rules to a sibling that the agent
    /// did not know of are watched from now on; others are reported as orphans.
    async fn reconcile(self: &Arc<Self>) {
        let listed_at = Instant::now();
        let rules = match flat(self.with_reader(|d| d.list_rules()).await) {
            Ok(r) => r,
            Err(e) => return debug!("listing rules to reconcile: {e}"),
        };
        // Most nodes of a large cluster steer nobody: no member list copied for them.
        let siblings = if rules.is_empty() { Vec::new() } else { self.siblings() };
        let (managed, orphans, draining) = classify_rules(&siblings, &rules);
        let active: HashMap<IpAddr, (String, u64)> = managed.into_iter().map(|(c, to, since)| (c, (to, since))).collect();
        let released = {
            let mut st = self.state();
            let super::State { moved, busy, .. } = &mut *st;
            let released = moved.reconcile(&active, listed_at, busy);
            for o in moved.rules_left(orphans, &draining, listed_at) {
                warn!(prefix = %o.prefix, target = %o.target, "rule not managed by the agent: {}", o.why);
            }
            released
        };
        for (name, clients) in released {
            self.release(&name, clients).await;
        }
    }
}
