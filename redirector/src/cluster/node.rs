//! One member's gossip: foca's SWIM state machine driven by a task that owns the UDP socket
//! and the timers; a handle shares what the task learns (the live members, their loads, the
//! traffic) and takes what the agent publishes (its load).

use std::{
    collections::HashMap,
    net::SocketAddr,
    num::NonZeroU32,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use foca::{AccumulatingRuntime, Foca, OwnedNotification, PostcardCodec, Timer};
use futures::StreamExt as _;
use rand::rngs::StdRng;
use tokio::{net::UdpSocket, sync::mpsc, task::JoinHandle};
use tokio_util::time::DelayQueue;
use tracing::{debug, warn};

use super::{
    Member,
    loads::{Board, Handler, LoadRecord, worth_publishing},
    sample,
    seal::{self, Key, Kind},
};

/// How often each member probes one other (foca's LAN default, memberlist's). A dead member is
/// first probed after a wait that is geometric (each period, each of the N-1 others probes it
/// with chance 1/(N-1): someone does with chance about 1 - 1/e), so a death is now and then
/// known a few seconds later than usual (3 killed at once: 4.4 s for all three one run, 7.2 s
/// another). Probing twice as often halved that tail but doubled the traffic at rest, and a
/// thousand members sharing two cores then probed each other too hard to finish joining.
pub const PROBE_PERIOD: Duration = Duration::from_secs(1);
/// A member suspected of death has this long to refute it. foca's LAN default grows with the
/// cluster (12 s at 1,000 members) and a dead member must be known dead within 5 s: death is
/// known after a probe period (a probe, then indirect probes), the suspicion, and the spread
/// (0.7 s at 1,000 members, p99): 4.2-4.9 s measured with 2 s here. A live member hears that
/// it is suspected within the spread and refutes it at once, so 2 s leaves it about three
/// times that.
pub const SUSPICION: Duration = Duration::from_secs(2);
/// How often a member not yet in a cluster announces itself to its seeds again.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);
/// The gossip socket's receive buffer (bytes, as asked of the kernel, which doubles it).
const RECEIVE_BUFFER: libc::c_int = 4 << 20;
/// The largest datagram a member sends or reads (foca packs its messages under this).
const MAX_PACKET: usize = 1400;

/// The SWIM settings of a cluster of about `size` members.
#[must_use]
pub fn swim_config(size: u32) -> foca::Config {
    let mut c = foca::Config::new_lan(NonZeroU32::new(size.max(1)).expect("at least one"));
    c.probe_period = PROBE_PERIOD;
    c.probe_rtt = PROBE_PERIOD / 2;
    c.suspect_to_down_after = SUSPICION;
    c.max_transmissions = c.max_transmissions.max(transmissions(size));
    c.max_packet_size = (MAX_PACKET - seal::OVERHEAD).try_into().expect("non-zero");
    c
}

/// How many times each member passes an update on so that all of a cluster's `size` members
/// hear it. Each member that holds an update sends it to random members, so the times one
/// given member is sent it are about Poisson(k): it misses it with probability e^-k, and with
/// every member and every update of a whole cluster joining (size² pairs) about size²·e^-k
/// pairs miss. k = 5 + 2·ln(size) keeps that under one in a hundred; foca's default
/// (4·log10(size + 1): 5 at 30 members, 12 at 1,000) left 2 of 870 pairs of a 30-member
/// cluster unknown to each other (measured) and the periodic announcements take minutes to
/// heal that. Updates are rare (membership changes, a member's room changing by a step), so
/// the cost is small.
fn transmissions(size: u32) -> std::num::NonZeroU8 {
    let k = (5.0 + 2.0 * f64::from(size.max(1)).ln()).ceil().min(255.0);
    #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "between 5 and 255")]
    std::num::NonZeroU8::new(k as u8).expect("at least 5")
}

/// What a member is told about the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A member is live (joined, came back, or restarted as a newer identity).
    Up(Member),
    /// A member was declared dead by the cluster.
    Down(Member),
    /// This member was declared dead while alive and came back as `Member` (a false death).
    Rejoined(Member),
}

/// Messages and bytes a member sent and received, and datagrams it refused.
#[derive(Default)]
pub struct Traffic {
    pub sent: AtomicU64,
    pub sent_bytes: AtomicU64,
    pub received: AtomicU64,
    pub received_bytes: AtomicU64,
    /// Datagrams that failed authentication or did not decode.
    pub refused: AtomicU64,
    /// Updates and load records this member still has to pass on.
    pub backlog: AtomicU64,
}

/// What the gossip task shares.
#[derive(Default)]
struct View {
    live: HashMap<SocketAddr, Member>,
    /// The live members' gossip addresses, by name.
    by_name: HashMap<String, SocketAddr>,
    /// The room this member last published.
    published: Option<u64>,
    /// Its records' count (the version's second half; the first is the boot).
    version: u64,
    /// Its boot now: a member declared dead rejoins as a newer identity ([`Event::Rejoined`]),
    /// and its records must win over those it published before.
    boot: u64,
}

impl View {
    fn add(&mut self, m: &Member) {
        if let Some(old) = self.live.insert(m.gossip, m.clone()) {
            self.by_name.remove(&old.name);
        }
        self.by_name.insert(m.name.clone(), m.gossip);
    }

    /// Whether the member at `gossip` was live.
    fn remove(&mut self, gossip: &SocketAddr) -> bool {
        let Some(old) = self.live.remove(gossip) else { return false };
        if self.by_name.get(&old.name) == Some(gossip) {
            self.by_name.remove(&old.name);
        }
        true
    }

    /// This member's record of `load` and `room`, newer than any it published before.
    fn stamp(&mut self, member: SocketAddr, load: u64, room: u64) -> LoadRecord {
        self.version += 1;
        LoadRecord { member, version: (self.boot, self.version), load, room }
    }
}

/// How to start a member.
pub struct Settings {
    pub me: Member,
    pub key: Key,
    /// Members to join through (any one live member is enough); none for the first member.
    pub seeds: Vec<SocketAddr>,
    /// About how many members the cluster has (how many times an update is passed on).
    pub size: u32,
}

enum Command {
    Publish(LoadRecord),
    Leave(tokio::sync::oneshot::Sender<()>),
    /// Stop answering for a while, as a member starved of CPU would (tests).
    #[cfg(test)]
    Stall(Duration),
}

/// A running member.
pub struct Gossip {
    me: Member,
    view: Arc<Mutex<View>>,
    board: Board,
    traffic: Arc<Traffic>,
    commands: mpsc::UnboundedSender<Command>,
    task: JoinHandle<()>,
}

impl Gossip {
    /// Starts gossiping on `socket` (bound to `settings.me.gossip`).
    pub fn start(socket: UdpSocket, settings: Settings) -> (Self, mpsc::UnboundedReceiver<Event>) {
        widen(&socket);
        let (events_tx, events) = mpsc::unbounded_channel();
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let view = Arc::new(Mutex::new(View { boot: settings.me.boot, ..View::default() }));
        let board = Board::default();
        let traffic = Arc::new(Traffic::default());
        let me = settings.me.clone();
        let driver = Driver {
            foca: Foca::with_custom_broadcast(settings.me.clone(), swim_config(settings.size), rand::make_rng(), PostcardCodec, Handler(board.clone())),
            rt: AccumulatingRuntime::new(),
            timers: DelayQueue::new(),
            socket,
            key: settings.key,
            // A configuration may list every server, this one too.
            seeds: settings.seeds.into_iter().filter(|s| *s != settings.me.gossip).collect(),
            view: view.clone(),
            board: board.clone(),
            traffic: traffic.clone(),
            events: events_tx,
        };
        let span = tracing::debug_span!("gossip", member = %me.name);
        let task = tokio::spawn(tracing::Instrument::instrument(driver.run(commands_rx), span));
        (Self { me, view, board, traffic, commands, task }, events)
    }

    /// The identity this member started with (a rejoin after a false death makes its boot
    /// newer; its name and addresses stay).
    #[must_use]
    pub fn me(&self) -> &Member {
        &self.me
    }

    fn view(&self) -> MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The members this one holds live (itself excluded).
    #[must_use]
    pub fn live(&self) -> Vec<Member> {
        self.view().live.values().cloned().collect()
    }

    /// How many members this one holds live (itself excluded), and of how many of them it knows
    /// the room: counted, not copied (a thousand members' lists copied often cost more CPU
    /// than their gossip).
    #[must_use]
    pub fn known(&self) -> (usize, usize) {
        let v = self.view();
        let recs = self.board.records();
        (v.live.len(), v.live.keys().filter(|a| recs.contains_key(a)).count())
    }

    /// The live member at a gossip address.
    #[must_use]
    pub fn member(&self, gossip: &SocketAddr) -> Option<Member> {
        self.view().live.get(gossip).cloned()
    }

    /// The room live member `name` published, if it is live and did.
    #[must_use]
    pub fn room_of(&self, name: &str) -> Option<u64> {
        let at = *self.view().by_name.get(name)?;
        self.board.records().get(&at).map(|r| r.room)
    }

    /// Publishes this member's load if its room changed enough since it last did
    /// ([`worth_publishing`]); returns whether it did.
    #[expect(clippy::must_use_candidate, reason = "the agent publishes and moves on; tests look")]
    pub fn set_load(&self, load: u64, high: u64) -> bool {
        let room = high.saturating_sub(load);
        let mut v = self.view();
        if !worth_publishing(v.published, room, high) {
            return false;
        }
        v.published = Some(room);
        let r = v.stamp(self.me.gossip, load, room);
        self.commands.send(Command::Publish(r)).is_ok()
    }

    /// Live members with a known load and their room.
    #[must_use]
    pub fn candidates(&self) -> Vec<(SocketAddr, u64)> {
        let live: Vec<SocketAddr> = self.view().live.keys().copied().collect();
        let recs = self.board.records();
        live.into_iter().filter_map(|m| recs.get(&m).map(|r| (m, r.room))).collect()
    }

    /// Whom to ask for `need` connections' room: `d` live members with room, drawn at random,
    /// those `preferred` first, roomiest first ([`sample::sample`]).
    #[must_use]
    pub fn sample(&self, need: u64, d: usize, preferred: impl Fn(&Member) -> bool) -> Vec<(Member, u64)> {
        let preferred: std::collections::HashSet<SocketAddr> = self.view().live.iter().filter(|(_, m)| preferred(m)).map(|(a, _)| *a).collect();
        let picked = sample::sample(&self.candidates(), need, d, &preferred, &mut rand::rng());
        let v = self.view();
        picked.into_iter().filter_map(|(a, room)| Some((v.live.get(&a)?.clone(), room))).collect()
    }

    #[must_use]
    pub fn traffic(&self) -> &Traffic {
        &self.traffic
    }

    /// Leaves the cluster: tells a few members, so that it is known gone at once.
    pub async fn leave(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.commands.send(Command::Leave(tx)).is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), rx).await;
        }
        self.task.abort();
    }

    /// Stops answering for `d`, as a member starved of CPU would.
    #[cfg(test)]
    pub fn stall(&self, d: Duration) {
        let _ = self.commands.send(Command::Stall(d));
    }

    /// Stops at once, as a crash would: the others find out by probing.
    pub fn kill(self) {
        self.task.abort();
    }
}

impl Drop for Gossip {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Gives the socket room for a burst: when many members join at once, each passes hundreds
/// of updates on in full datagrams, and the default 208 KiB (about 150 datagrams) overflowed
/// while the task waited for a core (a thousand members in one process lost updates and half
/// of them never learned of the other half).
fn widen(socket: &UdpSocket) {
    // The agent runs as root: past `net.core.rmem_max`.
    if let Err(e) = crate::sockopt::receive_buffer(socket, RECEIVE_BUFFER) {
        warn!("cannot widen the gossip socket's receive buffer: {e}");
    }
}

type Swim = Foca<Member, PostcardCodec, StdRng, Handler>;

struct Driver {
    foca: Swim,
    rt: AccumulatingRuntime<Member>,
    timers: DelayQueue<Timer<Member>>,
    socket: UdpSocket,
    key: Key,
    seeds: Vec<SocketAddr>,
    view: Arc<Mutex<View>>,
    board: Board,
    traffic: Arc<Traffic>,
    events: mpsc::UnboundedSender<Event>,
}

impl Driver {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut buf = vec![0u8; MAX_PACKET + 1];
        let mut announce = tokio::time::interval(ANNOUNCE_EVERY);
        loop {
            tokio::select! {
                got = self.socket.recv_from(&mut buf) => match got {
                    Ok((n, from)) => self.received(&buf[..n], from),
                    Err(e) => warn!("gossip socket: {e}"),
                },
                Some(t) = self.timers.next() => {
                    if let Err(e) = self.foca.handle_timer(t.into_inner(), &mut self.rt) {
                        debug!("gossip timer: {e}");
                    }
                }
                _ = announce.tick(), if !self.seeds.is_empty() => {
                    // Until a seed is a live member, not merely until some member is: two
                    // members that start together and announce to each other would otherwise
                    // make a cluster of their own and never join the rest (seen: 2 of 300).
                    // Once joined, foca's own periodic announcements keep the cluster whole.
                    let reached = {
                        let v = self.view.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        self.seeds.iter().any(|s| v.live.contains_key(s))
                    };
                    if reached {
                        self.seeds.clear();
                    }
                    for s in self.seeds.clone() {
                        if let Err(e) = self.foca.announce(Member::seed(s), &mut self.rt) {
                            debug!("announcing to {s}: {e}");
                        }
                    }
                }
                cmd = commands.recv() => match cmd {
                    Some(Command::Publish(r)) => {
                        // The handler keeps it on this member's board too.
                        match self.foca.add_broadcast(&r.encode()) {
                            // Out now rather than with the next message.
                            Ok(_) => drop(self.foca.broadcast(&mut self.rt)),
                            Err(e) => warn!("publishing this member's load: {e}"),
                        }
                    }
                    Some(Command::Leave(done)) => {
                        drop(self.foca.leave_cluster(&mut self.rt));
                        self.flush().await;
                        let _ = done.send(());
                        return;
                    }
                    #[cfg(test)]
                    Some(Command::Stall(d)) => tokio::time::sleep(d).await,
                    None => return,
                },
            }
            self.flush().await;
        }
    }

    fn received(&mut self, datagram: &[u8], from: SocketAddr) {
        self.traffic.received.fetch_add(1, Ordering::Relaxed);
        self.traffic.received_bytes.fetch_add(datagram.len() as u64, Ordering::Relaxed);
        let ok = match seal::open(&self.key, datagram) {
            Some((Kind::Swim, body)) => match self.foca.handle_data(body, &mut self.rt) {
                Ok(()) => true,
                Err(e) => {
                    debug!("gossip from {from}: {e}");
                    false
                }
            },
            Some((Kind::Load, body)) => LoadRecord::decode(body).map(|r| self.board.offer(r)).is_some(),
            None => false,
        };
        if !ok {
            self.traffic.refused.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Sends what foca wants sent, schedules its timers, and applies its notifications.
    async fn flush(&mut self) {
        let backlog = self.foca.updates_backlog() + self.foca.custom_broadcast_backlog();
        self.traffic.backlog.store(backlog as u64, Ordering::Relaxed);
        while let Some(n) = self.rt.to_notify() {
            self.notified(n).await;
        }
        while let Some((after, t)) = self.rt.to_schedule() {
            self.timers.insert(t, after);
        }
        while let Some((to, data)) = self.rt.to_send() {
            self.send(to.gossip, Kind::Swim, &data).await;
        }
    }

    async fn send(&self, to: SocketAddr, kind: Kind, body: &[u8]) {
        let d = seal::seal(&self.key, kind, body);
        match self.socket.send_to(&d, to).await {
            Ok(n) => {
                self.traffic.sent.fetch_add(1, Ordering::Relaxed);
                self.traffic.sent_bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(e) => debug!("gossip to {to}: {e}"),
        }
    }

    async fn notified(&mut self, n: OwnedNotification<Member>) {
        let event = self.apply(n);
        // A member that comes up is told this one's load straight away: records are gossiped
        // only when they change, so it would not hear it otherwise.
        if let Some(Event::Up(m)) = &event {
            let mine = self.board.records().get(&self.foca.identity().gossip).copied();
            if let Some(r) = mine {
                self.send(m.gossip, Kind::Load, &r.encode()).await;
            }
        }
        if let Some(e) = event {
            let _ = self.events.send(e);
        }
    }

    /// Applies a notification to the shared view; the event it makes, if any.
    fn apply(&mut self, n: OwnedNotification<Member>) -> Option<Event> {
        let mut view = self.view.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match n {
            OwnedNotification::MemberUp(m) => {
                view.add(&m);
                Some(Event::Up(m))
            }
            OwnedNotification::MemberDown(m) => {
                view.remove(&m.gossip);
                self.board.forget(&m.gossip);
                Some(Event::Down(m))
            }
            OwnedNotification::Rename(old, new) => {
                // A member restarted (or renewed) at its address as a newer identity: the same
                // member to foca, renamed, but a new one to its agent, which knows nothing of
                // the loads (gossiped only when they change): up, so it is told them.
                view.remove(&old.gossip).then(|| {
                    view.add(&new);
                    Event::Up(new)
                })
            }
            OwnedNotification::Rejoin(me) => {
                // The others forgot this member's load when they declared it dead: publish it
                // again, newer than before.
                view.boot = me.boot;
                let mine = self.board.records().get(&me.gossip).copied();
                if let Some(r) = mine {
                    let r = view.stamp(r.member, r.load, r.room);
                    if let Err(e) = self.foca.add_broadcast(&r.encode()) {
                        warn!("publishing this member's load again: {e}");
                    }
                }
                Some(Event::Rejoined(me))
            }
            OwnedNotification::Defunct => {
                warn!("this member was declared dead and cannot rejoin");
                None
            }
            // Active and Idle (the seeds are announced to until one is live, whatever these
            // say), and foca's unstable notifications if some crate turns them on.
            _ => None,
        }
    }
}
