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
    moved::{ByNode, Moved},
    rounds::{Rounds, Seen},
    volunteer::{Acked, Incoming, Received, Volunteer},
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

impl State {
    /// Of `clients`, those moved out to `name` and in no hand-over, each once and sorted,
    /// marked busy (for a hand-back).
    pub fn hold_moved_to(&mut self, name: &str, clients: Vec<IpAddr>) -> Vec<IpAddr> {
        let mut c: Vec<IpAddr> = clients.into_iter().filter(|c| self.moved.clients.get(c).is_some_and(|m| m.to == name) && !self.busy.contains(c)).collect();
        c.sort_unstable();
        c.dedup();
        self.busy.extend(c.iter().copied());
        c
    }

    /// The connections in `load` that end where they are, not load this node can shed: those of
    /// clients it moved out, and of clients it gave back to their origin.
    pub fn staying(&self, load: &Load) -> u64 {
        load.clients.iter().filter(|(a, _)| self.moved.clients.contains_key(a) || self.volunteer.returned.contains(a)).map(|c| c.1).sum()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    fn ip(i: u8) -> IpAddr {
        IpAddr::from([198, 18, 1, i])
    }

    #[test]
    fn a_hand_back_holds_clients_moved_to_that_volunteer_and_free() {
        let (mut st, now) = (State::default(), Instant::now());
        st.moved.steered(ip(1), "b", 1, now);
        st.moved.steered(ip(2), "b", 1, now);
        st.moved.steered(ip(3), "c", 1, now);
        st.busy.insert(ip(2));
        assert_eq!(st.hold_moved_to("b", vec![ip(3), ip(2), ip(1), ip(1), ip(4)]), vec![ip(1)]);
        assert!(st.busy.contains(&ip(1)));
        assert!(st.hold_moved_to("b", vec![ip(1)]).is_empty(), "held already");
    }

    #[test]
    fn moved_and_returned_clients_connections_stay() {
        let (mut st, now) = (State::default(), Instant::now());
        st.moved.steered(ip(1), "b", 1, now);
        st.volunteer.returned.insert(ip(2));
        let load = Load { total: 7, clients: vec![(ip(1), 1), (ip(2), 2), (ip(3), 4)] };
        assert_eq!(st.staying(&load), 3);
    }
}
