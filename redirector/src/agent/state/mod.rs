//! The agent's state, behind its one mutex: the node-wide facts (the load, leaving, the
//! clients in a hand-over) and one part per concern, each with its own transitions and their
//! tests (no runtime, no root): `links` (siblings and requests on their links), `rounds` (the
//! origin's shedding rounds), `moved` (the origin's clients on other nodes and their
//! hand-backs), `volunteer` (what this node holds for other origins).

mod links;
mod moved;
mod rounds;
mod volunteer;

use std::{collections::HashSet, net::IpAddr};

pub use self::{
    links::Links,
    moved::{MigratedOut, Moved, Returned},
    rounds::{Rounds, Seen},
    volunteer::{Acked, AdoptedIn, Incoming, Reservation, Volunteer},
};
use crate::datapath::Load;

/// Everything the agent's tasks share, locked as one.
#[derive(Default)]
pub struct State {
    /// The load as last read from the kernel.
    pub load: Load,
    /// The agent is leaving (SIGTERM): it offers no room and starts no round.
    pub leaving: bool,
    /// Clients in a hand-over that has not ended here, either way (applications included):
    /// never picked for another one meanwhile.
    pub busy: HashSet<IpAddr>,
    /// The siblings and the requests on their links.
    pub links: Links,
    /// The origin's shedding rounds.
    pub rounds: Rounds,
    /// The origin's clients on other nodes, and their hand-backs.
    pub moved: Moved,
    /// What this node holds for other origins as their volunteer.
    pub volunteer: Volunteer,
}
