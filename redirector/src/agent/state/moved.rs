//! The origin's clients on other nodes: the clients it moved out (and steers), when clients last
//! moved either way, the hand-backs it asked for, what came home, and the kernel's rules it
//! leaves alone.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use crate::{
    admin::api::OrphanRule,
    peer::{NodeName, SessionBlob},
};

/// What an origin moved to a volunteer.
#[derive(Clone, Debug)]
pub struct MigratedOut {
    /// The client.
    pub client: IpAddr,
    /// The volunteer its new connections go to.
    pub to: String,
    /// When it moved (wall clock, for the status).
    pub since_unix: u64,
    /// Connections the client had here when it moved.
    pub connections: u64,
    /// When this agent recorded it: reconciliation with the kernel only forgets entries older
    /// than the rule listing it compares with.
    pub recorded: Instant,
}

/// What arrived of a hand-back's answer before its `Returning`.
#[derive(Default)]
pub struct Returned {
    /// Sessions by the service they belong to.
    pub sessions: HashMap<SocketAddr, Vec<SessionBlob>>,
    /// When the volunteer was last heard on it: a long export keeps the wait alive.
    pub last: Option<Instant>,
}

/// The origin's clients on other nodes, and their hand-backs.
#[derive(Default)]
pub struct Moved {
    /// The clients this node moved out, by address.
    pub clients: HashMap<IpAddr, MigratedOut>,
    /// When clients last moved (a hand-over either way committed), for [`super::super::MOVE_DWELL`].
    pub last_move: HashMap<IpAddr, Instant>,
    /// Sessions arriving for hand-backs this node asked for, by (volunteer, id).
    pub returning: HashMap<(NodeName, u64), Returned>,
    /// Clients that came home with their sessions (hand-backs committed).
    pub handed_back: u64,
    /// Sessions lost: clients that came home without them because their volunteer stayed
    /// unreachable (counting those re-adopted from a previous run, whose sessions this agent
    /// cannot know of).
    pub sessions_lost: u64,
    /// Time of the last hand-back, asked to committed.
    pub last_home_ms: Option<f64>,
    /// Rules in the kernel this agent does not manage (last reconciliation).
    pub orphans: Vec<OrphanRule>,
    /// Rules draining in the kernel (last reconciliation).
    pub draining: usize,
}
