//! The volunteer's side of the state: room reserved for origins, transfers arriving, hand-overs
//! acknowledged and awaiting their outcome, imports in progress, the clients adopted, the
//! adopted services' listeners, and the clients given back whose connections go on here.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::ByNode;
use crate::{
    agent::{handoff::sample, policy},
    app::Role,
    peer::{ListedSession, MovedClient, NodeName, SessionBlob, SessionSet},
};

/// The longest wait between two `Outcome` questions about one hand-over.
const QUERY_MAX: Duration = Duration::from_secs(10);

/// What a volunteer took from an origin.
#[derive(Clone, Debug)]
pub struct AdoptedIn {
    /// The client.
    pub client: IpAddr,
    /// Its origin.
    pub from: String,
    /// When it was adopted (wall clock, for the status).
    pub since_unix: u64,
    /// Connections the origin said the client had: room is kept for them until they arrive.
    pub promised: u64,
    /// The client's connections here now.
    pub connections: u64,
    /// The origin's request id of the transfer that brought it.
    pub id: u64,
    /// Whether the client was ever seen here: proof that the origin steers it.
    pub arrived: bool,
    /// When it last had a connection here (or was adopted).
    pub last_seen: Instant,
}

/// Room offered to an origin for one transfer, until its lease runs out.
pub struct Reservation {
    /// The origin.
    pub origin: String,
    /// The origin's request id.
    pub id: u64,
    /// Connections reserved.
    pub capacity: u64,
    /// When the lease runs out.
    pub until: Instant,
    /// The latest the transfer's frames can keep the lease alive to (before its `Transfer`):
    /// a sibling cannot hold room by sending frames for ever.
    pub latest: Instant,
}

/// What a volunteer received of a transfer before its `Transfer` frame.
#[derive(Default)]
pub struct Incoming {
    /// The sessions listed, by the origin's service they belong to.
    pub sessions: HashMap<SocketAddr, Vec<ListedSession>>,
    /// The clients listed so far.
    pub clients: Vec<MovedClient>,
    /// Why the rest of this transfer will be refused.
    pub refused: Option<String>,
    /// When a frame of it last arrived.
    pub last: Option<Instant>,
}

/// A hand-over a volunteer took part in (it acknowledged a transfer, or gave clients back; or
/// its application reported one unfinished), awaiting the origin's `Commit` or `Abort`;
/// asked for with `Outcome` when they are late.
pub struct Acked {
    /// The local services whose applications imported (out) or exported (back) the sessions.
    pub apps: Vec<SocketAddr>,
    /// Its name, as applications see it.
    pub handoff: String,
    /// Import: a transfer out to this node; export: a hand-back from it.
    pub role: Role,
    /// Its clients (a hand-back's stay busy here until it ends).
    pub clients: Vec<IpAddr>,
    /// Some of its clients, for the origin to check its rules with.
    pub sample: Vec<IpAddr>,
    /// When to ask the origin next, and how long to wait after that.
    pub next_query: Instant,
    /// How long to wait after the next question.
    pub backoff: Duration,
    /// An `Outcome` question is on its way.
    pub querying: bool,
    /// Its clients are held busy here until it ends (an import an application reported
    /// unfinished: a transfer of the same clients would replace its tentative sessions, and
    /// its end would then drop or keep the wrong ones).
    pub holds: bool,
}

impl Acked {
    /// A hand-over of `clients` with `role`, its applications `apps` so far; the origin is first
    /// asked how it ended at `next_query` (unless it says so before).
    pub fn new(apps: Vec<SocketAddr>, handoff: String, role: Role, clients: Vec<IpAddr>, next_query: Instant) -> Self {
        Self { apps, handoff, role, sample: sample(&clients), clients, next_query, backoff: Duration::from_secs(1), querying: false, holds: false }
    }

    /// The clients it holds busy here ([`Acked::holds`]), to free once it is settled.
    #[must_use]
    pub fn held(&self) -> Vec<IpAddr> {
        if self.holds { self.clients.clone() } else { Vec::new() }
    }
}

/// What follows a transfer's `Transfer` frame, on its way to the task that imports it.
#[derive(Debug)]
pub enum Streamed {
    /// Sessions of one of the origin's services, in the order listed.
    Sessions(SocketAddr, Vec<SessionBlob>),
    /// Open connections of one of the origin's services, moving with their clients.
    Connections(SocketAddr, Vec<crate::peer::MovedConnection>),
    /// The rest of the queues of the last of them.
    ConnectionBytes(SocketAddr, Vec<u8>),
    /// Every session was sent: their count and digest per service.
    Sealed(Vec<SessionSet>),
    /// A hand-back's open connections, to freeze before the volunteer dumps them.
    Freeze(Vec<crate::peer::Flow>),
    /// The sender gave up, for this reason.
    Abort(String),
}

/// What became of a frame of a transfer's sessions or clients.
#[derive(Debug, PartialEq, Eq)]
pub enum Received {
    /// Kept (or dropped quietly: the transfer is refused already).
    Kept,
    /// Dropped: the transfer has no reservation, and nothing of it arrived before.
    Ignored,
    /// The transfer will be refused, for this reason; what it held is dropped.
    Refused(String),
}

/// What this node holds for other origins as their volunteer.
#[derive(Default)]
pub struct Volunteer {
    /// Room offered and not yet taken by a transfer.
    pub reservations: Vec<Reservation>,
    /// Transfers in the making, by (origin, id).
    pub incoming: HashMap<(NodeName, u64), Incoming>,
    /// Hand-overs acknowledged, awaiting `Commit` or `Abort`, by (origin, id).
    pub acked: HashMap<(NodeName, u64), Acked>,
    /// Transfers whose import is in progress here, by (origin, id).
    pub importing: HashSet<(NodeName, u64)>,
    /// Where the sessions of a transfer in progress go (to the task that imports them), by
    /// (origin, id); gone once it ended or aborted.
    pub streams: HashMap<(NodeName, u64), tokio::sync::mpsc::Sender<Streamed>>,
    /// The clients adopted from origins, by address.
    pub adopted: HashMap<IpAddr, AdoptedIn>,
    /// Adopted services' local listeners as last checked: the socket inode registered for
    /// `sk_lookup`, or `None` while nothing listens (warned once).
    pub listeners: BTreeMap<SocketAddr, Option<u64>>,
    /// Clients this node gave back to their origin whose connections here go on (they end
    /// where they are): load it cannot shed, and no client of its own to move; forgotten when
    /// they have no connection here.
    pub returned: HashSet<IpAddr>,
    /// Services adopted for an origin since this agent started, and when something last
    /// needed them (see [`Volunteer::unneeded_services`]).
    pub services: BTreeMap<SocketAddr, ServiceUse>,
}

/// An adopted service (its local route and listener entry): whose, and when it was last
/// needed.
pub struct ServiceUse {
    pub origin: String,
    pub last_needed: Instant,
}

impl Volunteer {
    /// The room this node has promised at `now`: reserved for offers not yet taken (expired
    /// ones are let go), and kept for adopted clients not arrived yet.
    pub fn promised(&mut self, now: Instant) -> (u64, u64) {
        self.reservations.retain(|r| r.until > now);
        let reserved = self.reservations.iter().fold(0u64, |s, r| s.saturating_add(r.capacity));
        (reserved, self.adopted_promised())
    }

    /// The room kept for adopted clients not arrived yet.
    pub fn adopted_promised(&self) -> u64 {
        policy::promised(self.adopted.values().map(|a| (a.promised, a.connections)))
    }

    /// Reserves `capacity` connections for transfer (`origin`, `id`) until `until`, which its
    /// frames can extend to `latest` at most.
    pub fn reserve(&mut self, origin: &str, id: u64, capacity: u64, until: Instant, latest: Instant) {
        self.reservations.push(Reservation { origin: origin.to_string(), id, capacity, until, latest: latest.max(until) });
    }

    /// Reservations `origin` holds at `now`.
    #[must_use]
    pub fn reservations_of(&self, origin: &str, now: Instant) -> usize {
        self.reservations.iter().filter(|r| r.origin == origin && r.until > now).count()
    }

    /// The reservation of transfer (`origin`, `id`) if its lease has not run out at `now`.
    pub fn live_reservation(&mut self, origin: &str, id: u64, now: Instant) -> Option<&mut Reservation> {
        self.reservations.iter_mut().find(|r| r.origin == origin && r.id == id && r.until > now)
    }

    /// Removes the reservation of transfer (`origin`, `id`), expired or not; whether there was
    /// one.
    pub fn take_reservation(&mut self, origin: &str, id: u64) -> bool {
        let before = self.reservations.len();
        self.reservations.retain(|r| !(r.origin == origin && r.id == id));
        self.reservations.len() != before
    }
}

impl Volunteer {
    /// A frame of transfer (`from`, `id`) at `now`: `sessions` of `service` and `clients`, kept
    /// within its reservation (which they keep alive for `lease`: big hand-overs outlast one),
    /// no session over `max_blob` bytes.
    #[expect(clippy::too_many_arguments, reason = "one frame's fields and the limits it is held to")]
    pub fn receive(
        &mut self,
        from: &str,
        id: u64,
        service: Option<SocketAddr>,
        sessions: Vec<ListedSession>,
        clients: Vec<MovedClient>,
        now: Instant,
        lease: Duration,
        max_blob: usize,
    ) -> Received {
        let cap = self.live_reservation(from, id, now).map_or(0, |r| {
            r.until = r.until.max(now + lease).min(r.latest);
            r.capacity
        });
        let key = (NodeName::from(from), id);
        if cap == 0 && !self.incoming.contains_key(&key) {
            // Nothing to keep: the Transfer will be refused for want of a reservation.
            return Received::Ignored;
        }
        let held = self.incoming.entry(key).or_default();
        held.last = Some(now);
        if held.refused.is_some() {
            return Received::Kept;
        }
        let n_sessions = u64::try_from(held.sessions.values().map(Vec::len).sum::<usize>() + sessions.len()).unwrap_or(u64::MAX);
        let weight = policy::transfer_weight(&held.clients).zip(policy::transfer_weight(&clients)).and_then(|(a, b)| a.checked_add(b));
        let refused = if cap == 0 {
            Some(format!("no reservation for request {id} (lease expired?)"))
        } else if sessions.iter().any(|s| usize::try_from(s.len).map_or(true, |l| l > max_blob)) {
            Some(format!("a session is over max_session_bytes ({max_blob})"))
        } else if n_sessions > cap || weight.is_none_or(|w| w > cap) {
            Some(format!("more sessions or clients than the {cap} connections reserved"))
        } else {
            None
        };
        if let Some(why) = refused {
            *held = Incoming { refused: Some(why.clone()), last: Some(now), ..Incoming::default() };
            return Received::Refused(why);
        }
        if let Some(svc) = service.filter(|_| !sessions.is_empty()) {
            held.sessions.entry(svc).or_default().extend(sessions);
        }
        held.clients.extend(clients);
        Received::Kept
    }

    /// What arrived of transfer (`from`, `id`) before its `Transfer`, taken for it.
    pub fn take_incoming(&mut self, from: &str, id: u64) -> Incoming {
        self.incoming.remove(&(NodeName::from(from), id)).unwrap_or_default()
    }

    /// The transfer owns its reservation while it imports: held until `until` if it is live at
    /// `now`; its capacity.
    pub fn hold_reservation(&mut self, from: &str, id: u64, now: Instant, until: Instant) -> Option<u64> {
        self.live_reservation(from, id, now).map(|r| {
            r.until = until;
            r.capacity
        })
    }

    /// Transfer (`from`, `id`) of `clients` was imported and acknowledged as `acked`: they are
    /// adopted, the reservation taken. False, and nothing recorded, when there is no
    /// reservation any more (an `Abort` came during the import).
    pub fn adopt(&mut self, from: &str, id: u64, clients: &[MovedClient], acked: Acked, since_unix: u64, now: Instant) -> bool {
        if !self.take_reservation(from, id) {
            return false;
        }
        for c in clients {
            let a = AdoptedIn { client: c.addr, from: from.to_string(), since_unix, promised: policy::weight(c.connections), connections: 0, id, arrived: false, last_seen: now };
            self.adopted.insert(c.addr, a);
        }
        self.acked.insert((NodeName::from(from), id), acked);
        true
    }

    /// Hand-over (`from`, `id`) aborted: returns it if acknowledged. A transfer here (or one
    /// not acknowledged yet) leaves nothing: its reservation, what arrived of it and its
    /// adopted clients are forgotten (they were not steered after all).
    pub fn aborted(&mut self, from: &str, id: u64) -> Option<Acked> {
        let key = (NodeName::from(from), id);
        let acked = self.acked.remove(&key);
        if acked.as_ref().is_none_or(|a| a.role == Role::Import) {
            self.take_reservation(from, id);
            self.incoming.remove(&key);
            // A transfer still importing sees its stream end: it aborts its imports.
            self.streams.remove(&key);
            self.adopted.retain(|_, a| !(a.from == from && a.id == id));
        }
        acked
    }

    /// Hand-over (`from`, `id`) committed: returns it if acknowledged. Clients this node gave
    /// back are no longer adopted (their room is free), their connections here still end
    /// here; the second value counts them.
    pub fn committed(&mut self, from: &str, id: u64) -> Option<(Acked, usize)> {
        let a = self.acked.remove(&(NodeName::from(from), id))?;
        if a.role == Role::Import {
            return Some((a, 0));
        }
        let home: HashSet<IpAddr> = a.clients.iter().copied().collect();
        let before = self.adopted.len();
        self.adopted.retain(|c, x| !(x.from == from && home.contains(c)));
        self.returned.extend(home);
        let n = before - self.adopted.len();
        Some((a, n))
    }

    /// Origin `from` took `clients` back: no longer adopted here (their connections here go
    /// on, as a given-back client's do); how many were.
    pub fn released(&mut self, from: &str, clients: Vec<IpAddr>) -> usize {
        let gone: HashSet<IpAddr> = clients.into_iter().collect();
        let left: Vec<IpAddr> = self.adopted.extract_if(|c, a| a.from == from && gone.contains(c)).map(|(c, _)| c).collect();
        let n = left.len();
        self.returned.extend(left);
        n
    }

    /// A transfer from `origin` adopted `svc` (or found it adopted) at `now`.
    pub fn service_needed(&mut self, svc: SocketAddr, origin: &str, now: Instant) {
        self.services.insert(svc, ServiceUse { origin: origin.to_string(), last_needed: now });
    }

    /// Whether anything here may still need `origin`'s adopted services: a client adopted from
    /// it, a hand-over with it in any stage, or a client whose connections go on here (any
    /// origin's: they are not told apart).
    fn needs(&self, origin: &str) -> bool {
        self.adopted.values().any(|a| a.from == origin)
            || self.reservations.iter().any(|r| r.origin == origin)
            || self.incoming.keys().chain(self.acked.keys()).chain(self.importing.iter()).chain(self.streams.keys()).any(|(o, _)| o == origin)
            || !self.returned.is_empty()
    }

    /// The adopted services nothing has needed for `after` at `now` (the others are marked
    /// needed now): they go back (route and listener entry), so that an address a sibling
    /// once had this node adopt does not stay local here for ever. Services adopted before
    /// this agent started are not known here and stay.
    pub fn unneeded_services(&mut self, now: Instant, after: Duration) -> Vec<SocketAddr> {
        let needed: Vec<SocketAddr> = self.services.iter().filter(|(_, u)| self.needs(&u.origin)).map(|(s, _)| *s).collect();
        for s in needed {
            if let Some(u) = self.services.get_mut(&s) {
                u.last_needed = now;
            }
        }
        self.services.iter().filter(|(_, u)| now.duration_since(u.last_needed) >= after).map(|(s, _)| *s).collect()
    }

    /// Whether `svc` is adopted here for an origin and still unneeded: checked again, under
    /// the datapath's lock, right before it goes.
    #[must_use]
    pub fn still_unneeded(&self, svc: SocketAddr) -> bool {
        self.services.get(&svc).is_some_and(|u| !self.needs(&u.origin))
    }

    /// The clients' connections here now (`here`, read at `now`): adopted clients seen here
    /// have arrived; given-back clients with none left are forgotten.
    pub fn observe(&mut self, here: &HashMap<IpAddr, u64>, now: Instant) {
        for (c, a) in &mut self.adopted {
            a.connections = here.get(c).copied().unwrap_or(0);
            if a.connections > 0 {
                a.arrived = true;
                a.last_seen = now;
            }
        }
        self.returned.retain(|c| here.contains_key(c));
    }

    /// Every adopted client, by its origin.
    pub fn by_origin(&self) -> ByNode {
        let mut by = ByNode::new();
        for a in self.adopted.values() {
            by.entry(a.from.clone()).or_default().push(a.client);
        }
        by
    }

    /// Bookkeeping that would otherwise grow without end, at `now`: reservations past their
    /// lease, transfers whose `Transfer` never came within `expiry`, adopted clients of no
    /// acknowledged hand-over away for `idle`. Returns the acknowledged hand-overs whose
    /// origin is to be asked how they ended now (marked as asked).
    pub fn expire(&mut self, now: Instant, expiry: Duration, idle: Duration) -> Vec<(NodeName, u64)> {
        self.reservations.retain(|r| r.until > now);
        self.incoming.retain(|(from, id), i| {
            let keep = i.last.is_some_and(|t| now.duration_since(t) < expiry);
            if !keep {
                warn!(origin = %from, id, "dropping a transfer's sessions and clients: its Transfer never came");
            }
            keep
        });
        let acked = &self.acked;
        self.adopted.retain(|c, a| {
            let keep = acked.contains_key(&(NodeName::from(a.from.as_str()), a.id)) || now.duration_since(a.last_seen) < idle;
            if !keep {
                info!(client = %c, origin = %a.from, "forgetting an adopted client: never released by its origin and no connection here for {} s", idle.as_secs());
            }
            keep
        });
        // A lost Commit or Abort (or a restart here): the origin knows, from its rules.
        self.acked
            .iter_mut()
            .filter(|(_, a)| !a.querying && a.next_query <= now)
            .map(|(k, a)| {
                a.querying = true;
                k.clone()
            })
            .collect()
    }

    /// The origin of hand-over (`origin`, `id`) could not say how it ended at `now`: asked
    /// again after the back-off, which doubles (up to [`QUERY_MAX`]); the wait after that,
    /// if the hand-over is still awaited.
    pub fn ask_again(&mut self, origin: &NodeName, id: u64, now: Instant) -> Option<Duration> {
        let a = self.acked.get_mut(&(origin.clone(), id))?;
        a.querying = false;
        a.next_query = now + a.backoff;
        a.backoff = (a.backoff * 2).min(QUERY_MAX);
        Some(a.backoff)
    }

    /// An application of `service` reports hand-over (`origin`, `id`) unfinished: whether this
    /// node knows of it already (importing it, or awaiting its outcome: then the application
    /// is told too when it ends).
    pub fn knows(&mut self, origin: &str, id: u64, service: SocketAddr) -> bool {
        let key = (NodeName::from(origin), id);
        if self.importing.contains(&key) {
            return true;
        }
        let Some(a) = self.acked.get_mut(&key) else { return false };
        if !a.apps.contains(&service) {
            a.apps.push(service);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_secs(1);

    #[test]
    fn an_adopted_service_is_unneeded_only_once_nothing_of_its_origin_is_left_for_long_enough() {
        let (mut v, t0) = (Volunteer::default(), Instant::now());
        let after = Duration::from_mins(1);
        let svc: SocketAddr = "198.18.0.20:80".parse().unwrap();
        let at = |s: u64| t0 + Duration::from_secs(s);
        v.reserve("a", 1, 10, at(0) + LEASE, at(0) + LEASE);
        let acked = Acked::new(vec![], "a/1/b".into(), Role::Import, vec![ip(1)], at(100));
        assert!(v.adopt("a", 1, &[MovedClient { addr: ip(1), connections: 1 }], acked, 0, at(0)));
        v.service_needed(svc, "a", at(0));
        assert!(v.unneeded_services(at(0), after).is_empty());
        // Committed, but its client is adopted still: needed, for as long as it takes.
        assert!(v.committed("a", 1).is_some());
        assert!(v.unneeded_services(at(120), after).is_empty(), "a client of a is adopted");
        // Released: its connections here go on, then end.
        assert_eq!(v.released("a", vec![ip(1)]), 1);
        assert!(v.unneeded_services(at(200), after).is_empty(), "its connections here go on");
        v.observe(&HashMap::new(), at(201));
        assert!(v.still_unneeded(svc));
        assert!(v.unneeded_services(at(230), after).is_empty(), "not for long enough yet");
        // Another origin's business does not hold a's service.
        v.reserve("c", 7, 10, at(240) + LEASE, at(240) + LEASE);
        assert_eq!(v.unneeded_services(at(260), after), vec![svc]);
        // A new offer to a, before it goes: needed again.
        v.reserve("a", 2, 10, at(261) + LEASE, at(261) + LEASE);
        assert!(!v.still_unneeded(svc), "a transfer of a may come");
        assert!(v.unneeded_services(at(261), after).is_empty());
    }

    fn ip(i: u8) -> IpAddr {
        IpAddr::from([198, 18, 1, i])
    }

    fn moved(i: u8, connections: u64) -> MovedClient {
        MovedClient { addr: ip(i), connections }
    }

    fn blob(i: u8, n: u64) -> ListedSession {
        ListedSession { client: ip(i), len: n }
    }

    fn svc() -> SocketAddr {
        "198.18.0.10:80".parse().unwrap()
    }

    #[test]
    fn reservations_run_out_with_their_lease() {
        let (mut v, now) = (Volunteer::default(), Instant::now());
        v.reserve("a", 1, 5, now + LEASE, now + LEASE * 100);
        v.reserve("a", 2, 7, now + LEASE * 2, now + LEASE * 100);
        assert_eq!(v.promised(now), (12, 0));
        assert_eq!(v.promised(now + LEASE), (7, 0), "the first ran out");
        assert!(v.live_reservation("a", 2, now + LEASE * 2).is_none());
        assert_eq!(v.hold_reservation("a", 2, now, now + LEASE * 9), Some(7));
        assert!(v.live_reservation("a", 2, now + LEASE * 8).is_some(), "held while importing");
        assert!(v.take_reservation("a", 2) && !v.take_reservation("a", 2));
    }

    #[test]
    fn frames_of_a_transfer_are_kept_within_its_reservation() {
        let (mut v, now) = (Volunteer::default(), Instant::now());
        assert_eq!(v.receive("a", 1, Some(svc()), vec![blob(1, 3)], vec![], now, LEASE, 10), Received::Ignored, "no reservation");
        v.reserve("a", 1, 4, now + LEASE, now + LEASE * 100);
        let later = now + LEASE / 2;
        assert_eq!(v.receive("a", 1, Some(svc()), vec![blob(1, 3)], vec![moved(1, 1)], later, LEASE, 10), Received::Kept);
        assert!(v.live_reservation("a", 1, now + LEASE).is_some(), "kept alive a lease from the last frame");
        assert_eq!(v.receive("a", 1, Some(svc()), vec![], vec![moved(2, 2)], later, LEASE, 10), Received::Kept);
        let i = v.take_incoming("a", 1);
        assert_eq!((i.sessions[&svc()].len(), i.clients.len(), i.last), (1, 2, Some(later)));
        assert!(v.take_incoming("a", 1).clients.is_empty());
    }

    #[test]
    fn a_sibling_cannot_keep_room_reserved_by_sending_frames() {
        let (mut v, now) = (Volunteer::default(), Instant::now());
        v.reserve("a", 1, 100, now + LEASE, now + LEASE * 3);
        // A frame every half lease, for ever: the lease ends at `latest` all the same.
        let mut t = now;
        for i in 0..20u8 {
            t += LEASE / 2;
            let _ = v.receive("a", 1, None, vec![], vec![moved(i, 1)], t, LEASE, 10);
        }
        assert!(v.live_reservation("a", 1, now + LEASE * 3).is_none(), "the lease ran out at its latest");
        assert_eq!(v.reservations_of("a", now), 1);
        v.reserve("a", 2, 1, now + LEASE, now + LEASE);
        assert_eq!((v.reservations_of("a", now), v.reservations_of("b", now), v.reservations_of("a", now + LEASE * 4)), (2, 0, 0));
        assert_eq!(v.promised(now + LEASE * 3), (0, 0), "the room is free again");
    }

    #[test]
    fn a_transfer_over_its_reservation_is_refused_and_stays_refused() {
        let (mut v, now) = (Volunteer::default(), Instant::now());
        v.reserve("a", 1, 2, now + LEASE, now + LEASE * 100);
        assert!(matches!(v.receive("a", 1, Some(svc()), vec![blob(1, 11)], vec![], now, LEASE, 10), Received::Refused(w) if w.contains("max_session_bytes")));
        assert_eq!(v.receive("a", 1, Some(svc()), vec![blob(1, 1)], vec![], now, LEASE, 10), Received::Kept, "dropped quietly");
        assert!(v.take_incoming("a", 1).refused.is_some());
        v.reserve("a", 2, 2, now + LEASE, now + LEASE * 100);
        assert!(matches!(v.receive("a", 2, None, vec![], vec![moved(1, 1), moved(2, 1), moved(3, 1)], now, LEASE, 10), Received::Refused(w) if w.contains("the 2 connections")));
        let i = v.take_incoming("a", 2);
        assert!(i.clients.is_empty() && i.sessions.is_empty(), "what it held is dropped");
    }

    #[test]
    fn adoption_takes_the_reservation_unless_an_abort_came_first() {
        let (mut v, now) = (Volunteer::default(), Instant::now());
        let acked = || Acked::new(vec![svc()], "a/1/b".into(), Role::Import, vec![ip(1)], now);
        assert!(!v.adopt("a", 1, &[moved(1, 3)], acked(), 0, now), "no reservation");
        assert!(v.adopted.is_empty() && v.acked.is_empty());
        v.reserve("a", 1, 5, now + LEASE, now + LEASE * 100);
        assert!(v.adopt("a", 1, &[moved(1, 3)], acked(), 0, now));
        assert!(v.reservations.is_empty());
        assert_eq!((v.adopted[&ip(1)].promised, v.adopted[&ip(1)].arrived), (3, false));
        assert_eq!(v.promised(now), (0, 3), "room kept until it arrives");
        v.observe(&HashMap::from([(ip(1), 2)]), now);
        assert_eq!(v.promised(now), (0, 1));
        assert!(v.adopted[&ip(1)].arrived);
    }

    #[test]
    fn an_aborted_transfer_leaves_nothing_a_hand_back_keeps_its_clients() {
        let (mut v, now) = (Volunteer::default(), Instant::now());
        v.reserve("a", 1, 5, now + LEASE, now + LEASE * 100);
        v.adopt("a", 1, &[moved(1, 1)], Acked::new(vec![], "a/1/b".into(), Role::Import, vec![ip(1)], now), 0, now);
        v.reserve("a", 2, 5, now + LEASE, now + LEASE * 100);
        v.adopt("a", 2, &[moved(2, 1)], Acked::new(vec![], "a/2/b".into(), Role::Import, vec![ip(2)], now), 0, now);
        assert!(v.aborted("a", 1).is_some_and(|a| a.role == Role::Import));
        assert!(!v.adopted.contains_key(&ip(1)) && v.adopted.contains_key(&ip(2)), "only that transfer's clients");
        v.reserve("a", 3, 5, now + LEASE, now + LEASE * 100);
        assert!(v.aborted("a", 3).is_none() && v.reservations.is_empty(), "not acknowledged yet: its room is free");
        v.acked.insert(("a".into(), 4), Acked::new(vec![], "a/4/b".into(), Role::Export, vec![ip(2)], now));
        assert!(v.aborted("a", 4).is_some_and(|a| a.role == Role::Export));
        assert!(v.adopted.contains_key(&ip(2)), "a hand-back aborted: the client stays");
    }

    #[test]
    fn a_committed_hand_back_frees_its_room_and_its_connections_stay() {
        let (mut v, now) = (Volunteer::default(), Instant::now());
        v.reserve("a", 1, 5, now + LEASE, now + LEASE * 100);
        v.adopt("a", 1, &[moved(1, 1), moved(2, 1)], Acked::new(vec![], "a/1/b".into(), Role::Import, vec![ip(1), ip(2)], now), 0, now);
        assert!(v.committed("a", 1).is_some_and(|(a, n)| a.role == Role::Import && n == 0));
        assert!(v.committed("a", 1).is_none(), "once");
        v.acked.insert(("a".into(), 2), Acked::new(vec![], "a/2/b".into(), Role::Export, vec![ip(1)], now));
        assert_eq!(v.committed("a", 2).map(|(_, n)| n), Some(1));
        assert!(!v.adopted.contains_key(&ip(1)) && v.returned.contains(&ip(1)));
        v.observe(&HashMap::new(), now);
        assert!(v.returned.is_empty(), "forgotten with its last connection");
        assert_eq!(v.released("other", vec![ip(2)]), 0, "only its origin releases it");
        assert_eq!(v.by_origin(), ByNode::from([("a".to_string(), vec![ip(2)])]));
        assert_eq!(v.released("a", vec![ip(2)]), 1);
    }

    #[test]
    fn expiry_forgets_what_never_came_and_asks_about_late_outcomes() {
        let (mut v, now) = (Volunteer::default(), Instant::now());
        let (expiry, idle) = (Duration::from_secs(5), Duration::from_mins(1));
        v.reserve("a", 1, 5, now + LEASE, now + LEASE * 100);
        v.receive("a", 1, None, vec![], vec![moved(1, 1)], now, LEASE, 10);
        v.reserve("a", 2, 5, now + LEASE, now + LEASE * 100);
        v.adopt("a", 2, &[moved(2, 1)], Acked::new(vec![], "a/2/b".into(), Role::Import, vec![ip(2)], now + LEASE), 0, now);
        v.reserve("a", 3, 5, now + LEASE, now + LEASE * 100);
        v.adopt("a", 3, &[moved(3, 1)], Acked::new(vec![], "a/3/b".into(), Role::Import, vec![ip(3)], now + LEASE), 0, now);
        v.committed("a", 3);
        assert_eq!(v.expire(now, expiry, idle), vec![], "nothing due");
        let late = now + idle;
        assert_eq!(v.expire(late, expiry, idle), vec![(NodeName::from("a"), 2)]);
        assert!(v.incoming.is_empty(), "its Transfer never came");
        assert!(v.adopted.contains_key(&ip(2)), "awaiting its outcome: kept");
        assert!(!v.adopted.contains_key(&ip(3)), "away for too long");
        assert_eq!(v.expire(late, expiry, idle), vec![], "asked already");
        let key = NodeName::from("a");
        assert_eq!(v.ask_again(&key, 2, late), Some(Duration::from_secs(2)));
        assert_eq!(v.expire(late + Duration::from_secs(1), expiry, idle), vec![(key.clone(), 2)], "after the back-off");
        for _ in 0..5 {
            v.ask_again(&key, 2, late);
        }
        assert_eq!(v.ask_again(&key, 2, late), Some(QUERY_MAX));
        assert_eq!(v.ask_again(&key, 9, late), None);
    }

    #[test]
    fn an_unfinished_hand_over_reported_twice_is_known() {
        let (mut v, now) = (Volunteer::default(), Instant::now());
        let other: SocketAddr = "198.18.0.11:80".parse().unwrap();
        assert!(!v.knows("a", 1, svc()));
        v.acked.insert(("a".into(), 1), Acked::new(vec![svc()], "a/1/b".into(), Role::Import, vec![ip(1)], now));
        assert!(v.knows("a", 1, other) && v.knows("a", 1, other));
        assert_eq!(v.acked[&(NodeName::from("a"), 1)].apps, vec![svc(), other], "told too, once");
        v.importing.insert(("a".into(), 2));
        assert!(v.knows("a", 2, svc()));
    }
}
