//! Open connections moving with their clients (`live_moves` services, applications of hook
//! protocol version 3), inside the two-phase hand-over out:
//!
//! - origin, after the export: the applications handed their idle connections over; their
//!   packets are kept ([`Hold`]) and frozen in the classifier, then each socket is dumped
//!   (repair mode: from now on it sends nothing). The dumps go after the sessions
//!   (`Connections`), counted in `Sealed`.
//! - volunteer, before it acknowledges: each is restored, still in repair mode (a restore that
//!   fails refuses the transfer: everything stays on the origin).
//! - origin, at the end: committed (the rules are in), its dumped sockets close without a
//!   word, the volunteer takes the restored ones live (`Live`), the kept packets go to them
//!   through the tunnel and the flows thaw (from then the classifier forwards their packets,
//!   as the origin has no socket for them); the volunteer's applications get them with the
//!   `commit`. Aborted: the dumped sockets leave repair mode, the flows thaw, and the
//!   applications get their connections back with the `abort`, as they were.
//!
//! A connection that cannot move (not the service's or the client's, the dump refused, too
//! big for a frame) goes back to its application with the outcome: after a commit it is
//! closed as in version 2.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd as _, OwnedFd},
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::Agent;
use crate::{
    app::{AppConnection, Exported},
    peer::{Answer, MovedConnection, NodeName, Request},
    repair::{self, Hold, Restored, TcpState},
};

/// The longest a flow stays frozen should nobody thaw it (an agent that died mid-move).
const FREEZE_LIMIT: Duration = Duration::from_secs(30);

/// How long the origin waits for the volunteer to take the connections live before it lets
/// their packets through anyway.
const LIVE_WAIT: Duration = Duration::from_secs(2);

/// A flow as the classifier keys it: (client, service).
type Flow = (SocketAddr, SocketAddr);

/// A connection an application handed over, on the origin.
struct Conn {
    service: SocketAddr,
    client: IpAddr,
    fd: OwnedFd,
    /// Its flow, once checked.
    flow: Option<Flow>,
    /// Its dump: it moves. None: it goes back to the application.
    state: Option<TcpState>,
    blob: Vec<u8>,
}

/// The connections of a hand-over out, from the export to its end.
#[derive(Default)]
pub(super) struct Moving {
    conns: Vec<Conn>,
    holds: Vec<Hold>,
    frozen: Vec<Flow>,
}

impl Moving {
    /// Connections that move, per service: what `Sealed` counts.
    pub(super) fn counts(&self) -> HashMap<SocketAddr, u64> {
        let mut n = HashMap::new();
        for c in self.conns.iter().filter(|c| c.state.is_some()) {
            *n.entry(c.service).or_insert(0) += 1;
        }
        n
    }

    pub(super) fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }
}

/// A socket's local or peer address, canonical (an IPv4-mapped address is IPv4).
fn address(fd: &OwnedFd, peer: bool) -> Option<SocketAddr> {
    repair::address(fd.as_fd(), peer).ok().map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
}

/// Packet copies opening while the applications export, one per uplink and port of the
/// services whose connections move ([`Agent::open_holds`]).
pub(super) type Opening = tokio::task::JoinHandle<Vec<((String, u16), std::io::Result<Hold>)>>;

/// Closes packet copies on a blocking thread: closing one waits for the kernel's grace
/// period, milliseconds nobody should wait for.
fn close_later(holds: Vec<Hold>) {
    if !holds.is_empty() {
        drop(tokio::task::spawn_blocking(move || drop(holds)));
    }
}

/// Closes the packet copies `o` opens, once they are open, off the async workers.
pub(super) fn discard(o: Opening) {
    tokio::spawn(async move {
        if let Ok(v) = o.await {
            close_later(v.into_iter().filter_map(|(_, h)| h.ok()).collect());
        }
    });
}

impl Agent {
    /// Starts opening the packet copies a move of the connections of `apps`' services would
    /// need, on a blocking thread, while their applications export (opening one takes
    /// milliseconds). None: no such service moves its connections.
    pub(super) fn open_holds(&self, apps: &[SocketAddr]) -> Option<Opening> {
        let wanted: std::collections::BTreeSet<(String, u16)> =
            self.cfg.services.iter().filter(|s| s.live_moves && apps.contains(&s.address)).map(|s| (s.dev.clone(), s.address.port())).collect();
        if wanted.is_empty() {
            return None;
        }
        Some(tokio::task::spawn_blocking(move || {
            wanted
                .into_iter()
                .map(|(dev, port)| {
                    let h = Hold::open(&dev, port);
                    ((dev, port), h)
                })
                .collect()
        }))
    }

    /// Takes the connections the applications handed over with their exports: each must be a
    /// TCP connection of the export's service with one of the clients; their packets are kept
    /// (by the copies `opening` opened) and frozen, then they are dumped. Connections that
    /// cannot move stay listed, to go back.
    pub(super) async fn freeze_connections(self: &Arc<Self>, exports: &mut [(SocketAddr, Exported)], handoff: &str, opening: Option<Opening>) -> Moving {
        let mut moving = Moving::default();
        for (service, e) in exports.iter_mut() {
            for (client, fd) in e.take_sockets() {
                moving.conns.push(Conn { service: *service, client, fd, flow: None, state: None, blob: Vec::new() });
            }
        }
        let t0 = Instant::now();
        let mut opened: HashMap<(String, u16), std::io::Result<Hold>> = match opening {
            Some(o) if !moving.conns.is_empty() => o.await.map(|v| v.into_iter().collect()).unwrap_or_default(),
            Some(o) => {
                discard(o);
                HashMap::new()
            }
            None => HashMap::new(),
        };
        if moving.conns.is_empty() {
            return moving;
        }
        let mut flows = Vec::new();
        for (i, c) in moving.conns.iter().enumerate() {
            let (local, peer) = (address(&c.fd, false), address(&c.fd, true));
            let is_tcp = crate::sockopt::get::<libc::c_int>(&c.fd, libc::SOL_SOCKET, libc::SO_PROTOCOL).is_ok_and(|p| p == libc::IPPROTO_TCP);
            match (local, peer) {
                (Some(l), Some(p)) if is_tcp && l == c.service && p.ip() == c.client => flows.push((i, (p, l))),
                _ => {
                    warn!(service = %c.service, client = %c.client, handoff, "an application handed over a connection that is not one of this client with this service ({local:?} <- {peer:?}): it goes back");
                }
            }
        }
        // Copies of their packets from before the freeze on, one packet socket per uplink and
        // port; the flows of an uplink whose copy cannot start do not move.
        let mut by_dev: HashMap<(String, u16), Vec<(usize, Flow)>> = HashMap::new();
        for (i, flow) in flows {
            let dev = self.cfg.services.iter().find(|s| s.address == flow.1).map(|s| s.dev.clone()).unwrap_or_default();
            by_dev.entry((dev, flow.1.port())).or_default().push((i, flow));
        }
        let mut held = Vec::new();
        for ((dev, port), group) in by_dev {
            let f: Vec<(SocketAddr, SocketAddr)> = group.iter().map(|(_, flow)| *flow).collect();
            let copy = opened.remove(&(dev.clone(), port)).unwrap_or_else(|| Err(std::io::Error::other("no copy was opened for this uplink and port")));
            match copy.and_then(|mut h| h.watch(&f).map(|()| h)) {
                Ok(h) => {
                    moving.holds.push(h);
                    held.extend(group);
                }
                Err(e) => warn!(dev, handoff, connections = f.len(), "cannot keep the packets of moving connections ({e}): they stay"),
            }
        }
        close_later(opened.into_values().filter_map(Result::ok).collect());
        let t_held = t0.elapsed();
        let frozen: Vec<(SocketAddr, SocketAddr)> = held.iter().map(|(_, f)| *f).collect();
        let flows_for_dp = frozen.clone();
        let freeze = self.with_dp(move |dp| dp.freeze(&flows_for_dp, FREEZE_LIMIT)).await;
        if let Err(e) = super::flat(freeze) {
            warn!(handoff, connections = frozen.len(), "cannot freeze moving connections ({e}): they stay");
            let flows_for_dp = frozen.clone();
            let _ = self.with_dp(move |dp| dp.thaw(&flows_for_dp)).await;
            close_later(std::mem::take(&mut moving.holds));
            return moving;
        }
        moving.frozen = frozen;
        let t_frozen = t0.elapsed();
        let mut thaw = Vec::new();
        for (i, flow) in held {
            let c = &mut moving.conns[i];
            c.flow = Some(flow);
            match repair::dump(&c.fd) {
                Ok(state) => c.state = Some(state),
                Err(e) => {
                    // Out of repair mode again: it goes on here.
                    warn!(service = %c.service, client = %c.client, handoff, "a connection cannot move ({e}): it goes back to its application");
                    thaw.push(flow);
                }
            }
        }
        if !thaw.is_empty() {
            moving.frozen.retain(|f| !thaw.contains(f));
            let _ = self.with_dp(move |dp| dp.thaw(&thaw)).await;
        }
        let n = moving.conns.iter().filter(|c| c.state.is_some()).count();
        info!(
            handoff,
            connections = n,
            handed_over = moving.conns.len(),
            dump_us = t0.elapsed().as_micros(),
            held_us = t_held.as_micros(),
            frozen_us = t_frozen.as_micros(),
            "connections frozen and dumped"
        );
        moving
    }

    /// Sends the moving connections to volunteer `name` (`Connections` of transfer `id`), with
    /// the blobs their applications sent after the sessions. A connection too big for a frame
    /// does not move: it is resumed here. Returns how many of each service went.
    pub(super) async fn send_connections(
        self: &Arc<Self>,
        name: &str,
        id: u64,
        moving: &mut Moving,
        exports: &mut [(SocketAddr, Exported)],
    ) -> anyhow::Result<HashMap<SocketAddr, u64>> {
        for (service, e) in exports.iter_mut() {
            let blobs = e.connection_blobs().await?;
            let mut blobs = blobs.into_iter();
            for c in moving.conns.iter_mut().filter(|c| c.service == *service) {
                c.blob = blobs.next().unwrap_or_default();
            }
        }
        let budget = self.cfg.max_frame.saturating_sub(4096).max(1);
        let mut thaw = Vec::new();
        let mut frames: HashMap<SocketAddr, Vec<Vec<MovedConnection>>> = HashMap::new();
        let mut sizes: HashMap<SocketAddr, usize> = HashMap::new();
        for c in &mut moving.conns {
            let Some(state) = c.state.as_ref() else { continue };
            let size = state.send_queue.len() + state.recv_queue.len() + c.blob.len() + 256;
            if size > budget {
                warn!(service = %c.service, client = %c.client, bytes = size, max_frame = self.cfg.max_frame, "a connection's queues do not fit in a frame: it stays here");
                if let Err(e) = repair::resume(&c.fd) {
                    warn!(client = %c.client, "resuming it failed: {e}");
                }
                thaw.extend(c.flow);
                c.state = None;
                continue;
            }
            let list = frames.entry(c.service).or_default();
            let used = sizes.entry(c.service).or_insert(usize::MAX);
            if used.saturating_add(size) > budget {
                list.push(Vec::new());
                *used = 0;
            }
            *used += size;
            let state = c.state.clone().expect("checked above");
            list.last_mut().expect("pushed").push(MovedConnection { state, blob: c.blob.clone() });
        }
        if !thaw.is_empty() {
            moving.frozen.retain(|f| !thaw.contains(f));
            let _ = self.with_dp(move |dp| dp.thaw(&thaw)).await;
        }
        for (service, list) in frames {
            for connections in list {
                self.send_to(name, Request::Connections { id, service, connections }).await?;
            }
        }
        Ok(moving.counts())
    }

    /// Ends the move of hand-over `id` with `name` on the origin: committed, the connections
    /// go live on the volunteer and their packets follow; aborted, they go on here. Returns
    /// the connections to give the applications with the outcome, per service.
    pub(super) async fn end_moving(self: &Arc<Self>, name: &str, id: u64, moving: Moving, committed: bool) -> HashMap<SocketAddr, Vec<AppConnection>> {
        let Moving { conns, holds, frozen } = moving;
        let t0 = Instant::now();
        let mut back: HashMap<SocketAddr, Vec<AppConnection>> = HashMap::new();
        let mut moved = 0usize;
        for c in conns {
            match c.state {
                Some(_) if committed => {
                    // In repair mode: closed without a word; the connection lives on there.
                    repair::discard(c.fd);
                    moved += 1;
                }
                Some(_) => {
                    if let Err(e) = repair::resume(&c.fd) {
                        warn!(client = %c.client, "resuming a connection that did not move failed: {e}");
                    }
                    back.entry(c.service).or_default().push(AppConnection { client: c.client, fd: c.fd, blob: c.blob });
                }
                None => back.entry(c.service).or_default().push(AppConnection { client: c.client, fd: c.fd, blob: c.blob }),
            }
        }
        let mut live = None;
        if committed && moved > 0 {
            let req = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            live = Some(match self.ask(name, Request::Live { id: req, handoff: id }, req, LIVE_WAIT).await {
                Ok(Answer::Live { live, .. }) => Ok(live),
                Ok(other) => Err(format!("unexpected answer: {}", other.what())),
                Err(e) => Err(format!("{e:#}")),
            });
        }
        let t_live = t0.elapsed();
        // The packets kept meanwhile: to the new sockets (committed), then the flows thaw,
        // then what came between the two.
        let replay = |holds: &[Hold]| -> usize { if committed && moved > 0 { holds.iter().map(|h| self.replay_held(name, h)).sum() } else { 0 } };
        let mut replayed = replay(&holds);
        let t_replayed = t0.elapsed();
        if !frozen.is_empty() {
            let flows = frozen.clone();
            if let Err(e) = super::flat(self.with_dp(move |dp| dp.thaw(&flows)).await) {
                warn!(sibling = %name, id, "thawing moved connections failed ({e}); their freeze ends by itself within {} s", FREEZE_LIMIT.as_secs());
            }
        }
        let t_thawed = t0.elapsed();
        replayed += replay(&holds);
        let t_again = t0.elapsed();
        close_later(holds);
        match live {
            Some(Ok(n)) => {
                info!(sibling = %name, id, connections = moved, live = n, replayed, live_ms = t_live.as_secs_f64() * 1e3, replayed_ms = t_replayed.as_secs_f64() * 1e3, thawed_ms = t_thawed.as_secs_f64() * 1e3, again_ms = t_again.as_secs_f64() * 1e3, done_ms = t0.elapsed().as_secs_f64() * 1e3, "connections moved live");
            }
            Some(Err(e)) => warn!(sibling = %name, id, connections = moved, "the volunteer did not say the moved connections are live ({e}); their packets go to it anyway"),
            None if !frozen.is_empty() => {
                info!(sibling = %name, id, connections = back.values().map(Vec::len).sum::<usize>(), "the hand-over did not commit: its connections go on here");
            }
            None => {}
        }
        back
    }

    /// Sends the packets `hold` kept to volunteer `name` through the tunnel; how many went.
    fn replay_held(&self, name: &str, hold: &Hold) -> usize {
        let packets = match hold.take() {
            Ok(p) => p,
            Err(e) => {
                warn!(sibling = %name, "reading the kept packets of moved connections: {e}");
                return 0;
            }
        };
        let Some(sib) = self.cfg.sibling(name) else { return 0 };
        let (v4, v6): (Vec<Vec<u8>>, Vec<Vec<u8>>) = packets.into_iter().partition(|p| p.first().is_some_and(|b| b >> 4 == 4));
        let mut sent = 0;
        // Each family through the tunnel of that family (`of`: any address of it).
        for (fam, of) in [(v4, IpAddr::from([0u8; 4])), (v6, IpAddr::from([0u16; 8]))] {
            if fam.is_empty() {
                continue;
            }
            let (Some(src), Some(target)) = (self.cfg.control_address(of), sib.control_address(of)) else { continue };
            match repair::replay(&fam, src, target) {
                Ok(n) => sent += n,
                Err(e) => warn!(sibling = %name, "replaying the kept packets of moved connections: {e}"),
            }
        }
        sent
    }

    /// Volunteer: the connections of transfer (`from`, `id`), restored, kept until the origin
    /// says its rules are in (`Live`) or how the hand-over ended.
    pub(super) fn keep_restored(&self, from: &str, id: u64, restored: Vec<RestoredConn>) {
        if !restored.is_empty() {
            self.restored.lock().expect("lock").insert((NodeName::from(from), id), Incoming::Restored(restored));
        }
    }

    /// Volunteer: takes the restored connections of transfer (`from`, `id`) live (once; again
    /// is a no-op). Returns how many are live.
    pub(super) fn go_live(&self, from: &str, id: u64) -> u64 {
        let mut all = self.restored.lock().expect("lock");
        let key = (NodeName::from(from), id);
        let Some(incoming) = all.remove(&key) else { return 0 };
        let live = match incoming {
            Incoming::Live(l) => l,
            Incoming::Restored(list) => {
                let t0 = Instant::now();
                let mut live = Vec::with_capacity(list.len());
                for r in list {
                    match r.restored.go_live() {
                        Ok(fd) => live.push((r.local, AppConnection { client: r.client, fd, blob: r.blob })),
                        Err(e) => warn!(origin = %from, id, client = %r.client, "a moved connection could not go live: {e}"),
                    }
                }
                info!(origin = %from, id, connections = live.len(), live_us = t0.elapsed().as_micros(), "moved connections live");
                live
            }
        };
        let n = u64::try_from(live.len()).unwrap_or(u64::MAX);
        all.insert(key, Incoming::Live(live));
        n
    }

    /// Volunteer: the connections of transfer (`from`, `id`) for its applications, per local
    /// service: live (committed) or closed without a word (aborted).
    pub(super) fn take_restored(&self, from: &str, id: u64, committed: bool) -> HashMap<SocketAddr, Vec<AppConnection>> {
        if committed {
            self.go_live(from, id);
        }
        let mut out: HashMap<SocketAddr, Vec<AppConnection>> = HashMap::new();
        if let Some(Incoming::Live(list)) = self.restored.lock().expect("lock").remove(&(NodeName::from(from), id)) {
            for (local, c) in list {
                out.entry(local).or_default().push(c);
            }
        }
        out
    }
}

/// Adds the connections of `counts` to the `Sealed` sets of their services.
pub(super) fn count_into(sets: &mut Vec<crate::peer::SessionSet>, counts: HashMap<SocketAddr, u64>) {
    for (service, n) in counts {
        match sets.iter_mut().find(|s| s.service == service) {
            Some(s) => s.connections = n,
            None => sets.push(crate::peer::SessionSet { service, count: 0, digest: 0, connections: n }),
        }
    }
}

/// A connection restored on the volunteer, not live yet: for the application of `local`.
pub(super) struct RestoredConn {
    pub local: SocketAddr,
    pub client: IpAddr,
    pub restored: Restored,
    pub blob: Vec<u8>,
}

/// A transfer's connections on the volunteer.
pub(super) enum Incoming {
    Restored(Vec<RestoredConn>),
    Live(Vec<(SocketAddr, AppConnection)>),
}

/// Restores `connections` of the origin's `service` for the application of `local`.
pub(super) fn restore_all(local: SocketAddr, connections: Vec<MovedConnection>, out: &mut Vec<RestoredConn>) -> Result<(), String> {
    for c in connections {
        let client = c.state.peer.ip().to_canonical();
        let restored = repair::restore(&c.state).map_err(|e| format!("restoring a connection of {client}: {e}"))?;
        out.push(RestoredConn { local, client, restored, blob: c.blob });
    }
    Ok(())
}
