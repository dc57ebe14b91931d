//! The volunteer's side of the state: room reserved for origins, transfers arriving, hand-overs
//! acknowledged and awaiting their outcome, imports in progress, the clients adopted, the
//! adopted services' listeners, and the clients given back whose connections go on here.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use crate::{
    app::Role,
    peer::{MovedClient, NodeName, SessionBlob},
};

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
}

/// What a volunteer received of a transfer before its `Transfer` frame.
#[derive(Default)]
pub struct Incoming {
    /// Sessions by the origin's service they belong to.
    pub sessions: HashMap<SocketAddr, Vec<SessionBlob>>,
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
    /// The clients adopted from origins, by address.
    pub adopted: HashMap<IpAddr, AdoptedIn>,
    /// Adopted services' local listeners as last checked: the socket inode registered for
    /// `sk_lookup`, or `None` while nothing listens (warned once).
    pub listeners: BTreeMap<SocketAddr, Option<u64>>,
    /// Clients this node gave back to their origin whose connections here go on (they end
    /// where they are): load it cannot shed, and no client of its own to move; forgotten when
    /// they have no connection here.
    pub returned: HashSet<IpAddr>,
}

impl Volunteer {
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
