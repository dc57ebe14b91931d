//! Open connections moving with their clients (`live_moves` services, applications of hook
//! protocol version 3), inside the two-phase hand-overs, both ways. Whichever way, the origin's
//! classifier sees every packet of a client first, so the origin freezes the flows (and keeps
//! a copy of what arrives meanwhile, [`Hold`]) before the side the connections leave dumps
//! them; the side they go to restores them (still in repair mode) before the commit point, and
//! takes them live after it; the copies go to the live sockets before the flows thaw.
//!
//! - out ([`out`]): the origin freezes and dumps after its applications' export, the
//!   volunteer restores before it acknowledges ([`arrive`]), and takes them live when the
//!   origin says its rules are in (`Live`).
//! - home ([`home`]): the volunteer's applications export, it asks the origin to freeze
//!   (`Freeze`, `Frozen`), dumps, and sends them after the sessions; the origin restores them
//!   before it withdraws its rules and takes them live right after.
//!
//! Aborted, the dumped sockets leave repair mode where they were, the restored ones close
//! without a word, and the applications get their connections back with the `abort`. A
//! connection that cannot move (not the service's or the client's, the dump refused, too big
//! for a frame) goes back to its application with the outcome: after a commit it is closed as
//! in version 2.

mod arrive;
mod home;
mod out;

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd as _, OwnedFd},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::oneshot;
use tracing::warn;

pub(super) use self::{
    arrive::{Incoming, RestoredConn, Restoring},
    home::Homecoming,
    out::Moving,
};
use super::Agent;
use crate::{
    app::{AppConnection, Exported},
    peer::{MovedConnection, NodeName},
    repair::{self, Hold, TcpState},
};

/// The longest a flow stays frozen should nobody thaw it (an agent that died mid-move).
const FREEZE_LIMIT: Duration = Duration::from_secs(30);

/// How long a freeze takes to settle: a packet that passed the classifier just before the
/// freeze is on its way to its socket (within one softirq run, microseconds), and must be in
/// the dump rather than arrive after it.
const SETTLE: Duration = Duration::from_millis(1);

/// Waits until [`SETTLE`] passed since `since`, and hardly more: tokio's timers tick in whole
/// milliseconds, and its 1 ms sleep took 2.2 ms here (measured), all of it inside the freeze,
/// so the client's pause. A thread of the blocking pool sleeps it instead.
async fn settle(since: Instant) {
    let left = SETTLE.saturating_sub(since.elapsed());
    if left.is_zero() {
        return;
    }
    if tokio::task::spawn_blocking(move || std::thread::sleep(left)).await.is_err() {
        tokio::time::sleep(left).await;
    }
}

/// The most threads a dump takes, and the fewest connections worth a thread of their own
/// (starting one takes tens of microseconds, a dump about 15).
const DUMP_THREADS: usize = 4;
const DUMP_PER_THREAD: usize = 32;

/// A flow as the classifier keys it: (client, service).
type Flow = (SocketAddr, SocketAddr);

/// A hand-over as a sibling names it: (sibling, id).
type Key = (NodeName, u64);

/// What live moves keep between the steps of the hand-overs this node takes part in (as the
/// volunteer, but for `frozen_home`).
#[derive(Default)]
pub(super) struct Pending {
    /// Moves out to here: the connections restored, then live.
    incoming: HashMap<Key, Incoming>,
    /// Hand-backs from here: the connections handed over (dumped, if they move), until the
    /// origin says how the hand-back ended.
    leaving: HashMap<Key, Leaving>,
    /// Hand-backs from here waiting for the origin to freeze their flows.
    freezing: HashMap<Key, oneshot::Sender<Vec<Flow>>>,
    /// Hand-backs to here (this node the origin): the flows frozen for them, until they end.
    /// A hand-back cut short (its task dropped as the agent stops) lets them go from here
    /// (`thaw_cut_short`), or they would stay frozen for [`FREEZE_LIMIT`].
    frozen_home: HashMap<Key, Vec<Flow>>,
}

/// A connection an application handed over, on the side it leaves.
struct Conn {
    /// The service as the origin knows it (the connection's local address).
    service: SocketAddr,
    /// The local service whose application handed it over (the same on the origin).
    app: SocketAddr,
    client: IpAddr,
    fd: OwnedFd,
    /// Its flow, once checked ([`Leaving::flows`]); it is frozen if it moves.
    flow: Option<Flow>,
    /// Its dump: it moves. None: it goes back to the application.
    state: Option<TcpState>,
    blob: Vec<u8>,
}

/// The connections the applications handed over with an export, on the side they leave,
/// from the export to the hand-over's end.
#[derive(Default)]
pub(super) struct Leaving {
    conns: Vec<Conn>,
    /// Their flows frozen on this node (a volunteer giving them back), until they end.
    frozen_here: Vec<Flow>,
}

/// `a` with an IPv4-mapped address as IPv4: how flows are compared and keyed here.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// A socket's local or peer address, canonical.
fn address(fd: &OwnedFd, peer: bool) -> Option<SocketAddr> {
    repair::address(fd.as_fd(), peer).ok().map(canonical)
}

impl Leaving {
    /// Takes the connections handed over with `exports` (each under the service as the origin
    /// knows it).
    fn take(exports: &mut [(SocketAddr, Exported)]) -> Self {
        let mut conns = Vec::new();
        for (service, e) in exports.iter_mut() {
            let app = e.service();
            for (client, fd) in e.take_sockets() {
                conns.push(Conn { service: *service, app, client, fd, flow: None, state: None, blob: Vec::new() });
            }
        }
        Self { conns, frozen_here: Vec::new() }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// The flows of the connections that may move (each one's noted): TCP connections of
    /// their service with their client. The others stay listed, to go back.
    fn flows(&mut self, handoff: &str) -> Vec<Flow> {
        let mut flows = Vec::new();
        for c in &mut self.conns {
            let (local, peer) = (address(&c.fd, false), address(&c.fd, true));
            let is_tcp = crate::sockopt::get::<libc::c_int>(&c.fd, libc::SOL_SOCKET, libc::SO_PROTOCOL).is_ok_and(|p| p == libc::IPPROTO_TCP);
            match (local, peer) {
                (Some(l), Some(p)) if is_tcp && l == c.service && p.ip() == c.client => {
                    c.flow = Some((p, l));
                    flows.push((p, l));
                }
                _ => {
                    warn!(service = %c.service, client = %c.client, handoff, "an application handed over a connection that is not one of this client with this service ({local:?} <- {peer:?}): it goes back");
                }
            }
        }
        flows
    }

    /// Dumps the connections of `frozen` (their packets stopped): from now on they send
    /// nothing. Returns the flows of those that cannot move (out of repair mode again, they
    /// go on here): to thaw.
    ///
    /// Many at once are dumped on as many threads as there are CPUs (up to [`DUMP_THREADS`]):
    /// their flows are frozen meanwhile, and each takes some 20 system calls (1,000 took
    /// 13-20 ms on one thread here).
    fn dump(&mut self, frozen: &[Flow], handoff: &str) -> Vec<Flow> {
        // A set: a move may take thousands.
        let frozen: HashSet<&Flow> = frozen.iter().collect();
        let dump_some = |conns: &mut [Conn]| {
            let mut failed = Vec::new();
            for c in conns {
                let Some(flow) = c.flow.filter(|f| frozen.contains(f)) else { continue };
                match repair::dump(&c.fd) {
                    Ok(state) => c.state = Some(state),
                    Err(e) => {
                        warn!(service = %c.service, client = %c.client, handoff, "a connection cannot move ({e}): it goes back to its application");
                        failed.push(flow);
                    }
                }
            }
            failed
        };
        let n = self.conns.len();
        let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get).min(DUMP_THREADS).min(n / DUMP_PER_THREAD).max(1);
        let mut parts = self.conns.chunks_mut(n.div_ceil(threads).max(1));
        let first = parts.next();
        std::thread::scope(|s| {
            let others: Vec<_> = parts.map(|part| s.spawn(|| dump_some(part))).collect();
            let mut failed = first.map(&dump_some).unwrap_or_default();
            for o in others {
                failed.extend(o.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
            }
            failed
        })
    }

    /// The clients of the dumped connections whose sockets moved on since their dump (or
    /// cannot be read): their dumps are stale.
    fn stale(&self) -> Vec<IpAddr> {
        self.conns.iter().filter(|c| c.state.as_ref().is_some_and(|s| !repair::as_dumped(&c.fd, s).unwrap_or(false))).map(|c| c.client).collect()
    }

    /// The connections that move, per service: what `Sealed` counts.
    fn counts(&self) -> HashMap<SocketAddr, u64> {
        let mut n = HashMap::new();
        for c in self.conns.iter().filter(|c| c.state.is_some()) {
            *n.entry(c.service).or_insert(0) += 1;
        }
        n
    }

    /// The dumped connections in frames of at most `max_frame` bytes, in the order they go,
    /// with their `blobs` ([`blobs`]). A connection whose queues do not fit in a frame goes
    /// last in one, with their heads, and the rest follows ([`ConnFrame::Bytes`]). One whose
    /// blob alone takes half a frame does not move: it resumes, and its flow is returned, to
    /// thaw.
    fn frames(&mut self, mut blobs: HashMap<SocketAddr, Vec<Vec<u8>>>, max_frame: usize) -> (Vec<ConnFrame>, Vec<Flow>) {
        for (service, list) in &mut blobs {
            let mut list = std::mem::take(list).into_iter();
            for c in self.conns.iter_mut().filter(|c| c.service == *service) {
                c.blob = list.next().unwrap_or_default();
            }
        }
        // Room in a frame for connections (or bytes), and for one connection's own fields.
        let budget = max_frame.saturating_sub(4096).max(1);
        let fields = 512;
        let mut thaw = Vec::new();
        let mut frames = Vec::new();
        let mut services: Vec<SocketAddr> = self.conns.iter().map(|c| c.service).collect();
        services.sort_unstable();
        services.dedup();
        for service in services {
            let (mut list, mut used) = (Vec::new(), 0usize);
            for c in self.conns.iter_mut().filter(|c| c.service == service) {
                let Some(state) = c.state.as_ref() else { continue };
                if c.blob.len() + fields > budget / 2 {
                    warn!(service = %c.service, client = %c.client, bytes = c.blob.len(), max_frame, "a connection's blob takes half a frame: it stays");
                    if let Err(e) = repair::resume(&c.fd, state) {
                        warn!(client = %c.client, "resuming it failed: {e}");
                    }
                    thaw.extend(c.flow);
                    c.state = None;
                    continue;
                }
                let size = state.send_queue.len() + state.recv_queue.len() + c.blob.len() + fields;
                if used + size > budget && !list.is_empty() {
                    frames.push(ConnFrame::Conns(service, std::mem::take(&mut list)));
                    used = 0;
                }
                if size <= budget {
                    used += size;
                    list.push(MovedConnection { state: state.sent_now(), blob: c.blob.clone(), more_send: 0, more_recv: 0 });
                    continue;
                }
                // Its queues' heads in a frame of its own, the rest after it.
                let room = budget - c.blob.len() - fields;
                let send = state.send_queue.len().min(room);
                let recv = state.recv_queue.len().min(room - send);
                let mut head = state.sent_now();
                head.send_queue.truncate(send);
                head.recv_queue.truncate(recv);
                let (more_send, more_recv) = ((state.send_queue.len() - send) as u64, (state.recv_queue.len() - recv) as u64);
                frames.push(ConnFrame::Conns(service, vec![MovedConnection { state: head, blob: c.blob.clone(), more_send, more_recv }]));
                let rest: Vec<u8> = [&state.send_queue[send..], &state.recv_queue[recv..]].concat();
                frames.extend(rest.chunks(budget).map(|b| ConnFrame::Bytes(service, b.to_vec())));
            }
            if !list.is_empty() {
                frames.push(ConnFrame::Conns(service, list));
            }
        }
        (frames, thaw)
    }

    /// Ends the connections' side of a hand-over: committed, the dumped ones are returned, to
    /// close without a word ([`discard`]: they live on elsewhere); aborted, they leave repair
    /// mode and go on here. Returns the connections for the applications with the outcome, per
    /// local service, and the sockets that moved.
    fn end(self, committed: bool) -> (HashMap<SocketAddr, Vec<AppConnection>>, Vec<OwnedFd>) {
        let mut back: HashMap<SocketAddr, Vec<AppConnection>> = HashMap::new();
        let mut moved = Vec::new();
        for c in self.conns {
            match c.state {
                Some(_) if committed => moved.push(c.fd),
                dumped => {
                    if let Some(state) = &dumped
                        && let Err(e) = repair::resume(&c.fd, state)
                    {
                        warn!(client = %c.client, "resuming a connection that did not move failed: {e}");
                    }
                    back.entry(c.app).or_default().push(AppConnection { client: c.client, fd: c.fd, blob: c.blob });
                }
            }
        }
        (back, moved)
    }
}

/// Closes dumped sockets whose connections moved, without a word. Before their flows thaw:
/// from then the classifier forwards the flows' packets only because no socket here has them.
fn discard(moved: Vec<OwnedFd>) {
    moved.into_iter().for_each(repair::discard);
}

/// A frame's worth of moving connections: some connections of a service, or the next bytes
/// of the queues of the last one sent.
enum ConnFrame {
    Conns(SocketAddr, Vec<MovedConnection>),
    Bytes(SocketAddr, Vec<u8>),
}

/// The blobs of the connections handed over with `exports`, per service: the applications
/// send them after their sessions.
async fn blobs(exports: &mut [(SocketAddr, Exported)]) -> anyhow::Result<HashMap<SocketAddr, Vec<Vec<u8>>>> {
    let mut out = HashMap::new();
    for (service, e) in exports.iter_mut() {
        out.insert(*service, e.connection_blobs().await?);
    }
    Ok(out)
}

/// Packet copies opening on a blocking thread, one per uplink and port.
type Opening = tokio::task::JoinHandle<Vec<((String, u16), std::io::Result<Hold>)>>;

/// Closes packet copies on a blocking thread: closing one waits for the kernel's grace
/// period, milliseconds nobody should wait for.
fn close_later(holds: Vec<Hold>) {
    if !holds.is_empty() {
        drop(tokio::task::spawn_blocking(move || drop(holds)));
    }
}

/// The packet copies a move of connections needs, opening while the applications export
/// ([`Agent::open_holds`]), for the freeze to take; closed off the async workers if it does
/// not (the move ended first, or nothing is frozen).
pub(super) struct Opened(Option<Opening>);

impl Drop for Opened {
    fn drop(&mut self) {
        if let Some(o) = self.0.take() {
            tokio::spawn(async move {
                if let Ok(v) = o.await {
                    close_later(v.into_iter().filter_map(|(_, h)| h.ok()).collect());
                }
            });
        }
    }
}

/// Frozen flows of this node's classifier and the copies of their packets.
#[derive(Default)]
struct Freeze {
    holds: Vec<Hold>,
    flows: Vec<Flow>,
}

impl Agent {
    /// Starts opening the packet copies a move of the connections of `services` would need,
    /// on a blocking thread, while the applications export: none if no such service moves its
    /// connections.
    pub(super) fn open_holds(&self, services: &[SocketAddr]) -> Opened {
        let wanted: std::collections::BTreeSet<(String, u16)> =
            self.cfg.services.iter().filter(|s| s.live_moves && services.contains(&s.address)).map(|s| (s.dev.clone(), s.address.port())).collect();
        if wanted.is_empty() {
            return Opened(None);
        }
        Opened(Some(tokio::task::spawn_blocking(move || {
            wanted
                .into_iter()
                .map(|(dev, port)| {
                    let h = Hold::open(&dev, port);
                    ((dev, port), h)
                })
                .collect()
        })))
    }

    /// Freezes `flows` (of this node's services) in the classifier, their packets kept from
    /// before on by the copies `holds` opens for their uplinks and ports. The flows of an
    /// uplink whose copy cannot start are not frozen; the copies not needed close.
    async fn freeze(self: &Arc<Self>, flows: Vec<Flow>, mut holds: Opened, handoff: &str) -> Freeze {
        let mut opened: HashMap<(String, u16), std::io::Result<Hold>> = match holds.0.take() {
            Some(o) if !flows.is_empty() => o.await.map(|v| v.into_iter().collect()).unwrap_or_default(),
            // Closed as they open (nothing to freeze, or none opening).
            other => {
                drop(Opened(other));
                HashMap::new()
            }
        };
        let mut by_dev: HashMap<(String, u16), Vec<Flow>> = HashMap::new();
        for flow in flows {
            let dev = self.cfg.services.iter().find(|s| s.address == flow.1).map(|s| s.dev.clone()).unwrap_or_default();
            by_dev.entry((dev, flow.1.port())).or_default().push(flow);
        }
        let mut f = Freeze::default();
        for ((dev, port), group) in by_dev {
            let copy = opened.remove(&(dev.clone(), port)).unwrap_or_else(|| Err(std::io::Error::other("no copy was opened for this uplink and port")));
            match copy.and_then(|mut h| h.watch(&group).map(|()| h)) {
                Ok(h) => {
                    f.holds.push(h);
                    f.flows.extend(group);
                }
                Err(e) => warn!(dev, handoff, connections = group.len(), "cannot keep the packets of moving connections ({e}): they stay"),
            }
        }
        close_later(opened.into_values().filter_map(Result::ok).collect());
        let flows = f.flows.clone();
        if let Err(e) = super::flat(self.with_dp(move |dp| dp.freeze(&flows, FREEZE_LIMIT)).await) {
            warn!(handoff, connections = f.flows.len(), "cannot freeze moving connections ({e}): they stay");
            self.thaw(std::mem::take(&mut f.flows)).await;
            close_later(std::mem::take(&mut f.holds));
        }
        f
    }

    /// Lets `flows` through the classifier again.
    async fn thaw(self: &Arc<Self>, flows: Vec<Flow>) {
        if flows.is_empty() {
            return;
        }
        if let Err(e) = super::flat(self.with_dp(move |dp| dp.thaw(&flows)).await) {
            warn!("thawing moved connections failed ({e}); their freeze ends by itself within {} s", FREEZE_LIMIT.as_secs());
        }
    }

    /// Ends freeze `f`: what its copies kept goes on (`send`, before the flows thaw, then
    /// again for what came between), then the copies close. Returns how many packets went.
    async fn let_go(self: &Arc<Self>, f: Freeze, send: impl Fn(Vec<Vec<u8>>) -> usize) -> usize {
        let take = |holds: &[Hold]| -> usize {
            holds
                .iter()
                .map(|h| match h.take() {
                    Ok(p) => send(p),
                    Err(e) => {
                        warn!("reading the kept packets of moving connections: {e}");
                        0
                    }
                })
                .sum()
        };
        let mut went = take(&f.holds);
        self.thaw(f.flows).await;
        went += take(&f.holds);
        let lost: u64 = f.holds.iter().map(Hold::lost).sum();
        if lost > 0 {
            warn!(lost, "packets of moving connections were not kept (the copy's buffer was full): their senders resend them after a timeout");
        }
        close_later(f.holds);
        went
    }

    /// Sends `packets` (kept for moved connections) to sibling `name` through the tunnel, as
    /// the classifier would have; how many went.
    fn replay_to(&self, name: &str, packets: Vec<Vec<u8>>) -> usize {
        let Some(sib) = self.sibling(name) else { return 0 };
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
}

/// Delivers `packets` (kept for connections that live here) to this node's own stack; how
/// many went.
fn deliver_here(packets: &[Vec<u8>]) -> usize {
    repair::deliver(packets).unwrap_or_else(|e| {
        warn!("delivering the kept packets of moved connections: {e}");
        0
    })
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

impl Agent {
    /// Whether the connections of local service `svc` move with their clients (`live_moves`).
    pub(super) fn moves_live(&self, svc: SocketAddr) -> bool {
        self.cfg.services.iter().any(|s| s.address == svc && s.live_moves)
    }

    /// The live moves' state kept between steps.
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.live.lock().expect("lock")
    }
}
