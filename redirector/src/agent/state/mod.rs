//! The agent's state, behind its one mutex: the node-wide facts (the load, leaving, the
//! clients in a hand-over) and one part per concern, each with its own transitions and their
//! tests (no runtime, no root): `links` (siblings and requests on their links), `rounds` (the
//! origin's shedding rounds), `moved` (the origin's clients on other nodes and their
//! hand-backs), `volunteer` (what this node holds for other origins).

mod links;
mod moved;
mod rounds;
mod volunteer;

use std::{collections::HashSet, net::IpAddr, time::Instant};

pub use self::{
    links::Links,
    moved::{ByNode, Moved},
    rounds::{Rounds, Seen},
    volunteer::{Acked, Incoming, Received, Streamed, Volunteer},
};
use crate::datapath::Load;

/// Everything the agent's tasks share, locked as one.
#[derive(Default)]
pub struct State {
    /// The load as last read from the kernel.
    pub load: Load,
    /// The agent is leaving (SIGTERM): it offers no room and starts no round.
    pub leaving: bool,
    /// Drained since then (Unix seconds): every client moves away, none comes home, no room
    /// is offered (`drain.rs`).
    pub drained: Option<u64>,
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

/// Clients picked to move, sorted by why they may not (each in the first that applies).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Picked {
    /// Adopted from siblings: their traffic comes through the sibling's tunnel.
    pub adopted: Vec<(IpAddr, u64)>,
    /// Moved less than [`crate::agent::MOVE_DWELL`] ago.
    pub recent: Vec<(IpAddr, u64)>,
    /// Moved out already, or given back to their origin.
    pub moved: Vec<(IpAddr, u64)>,
    /// In a hand-over that has not ended here.
    pub in_handoff: Vec<(IpAddr, u64)>,
    /// Home, their rule still draining to the volunteer they came from.
    pub draining: Vec<(IpAddr, u64)>,
    /// The others: they may move.
    pub rest: Vec<(IpAddr, u64)>,
}

impl State {
    /// Marks `clients` busy: in a hand-over here.
    pub fn hold(&mut self, clients: impl IntoIterator<Item = IpAddr>) {
        self.busy.extend(clients);
    }

    /// `clients`' hand-over has ended here.
    pub fn free(&mut self, clients: &[IpAddr]) {
        for c in clients {
            self.busy.remove(c);
        }
    }

    /// Whether any of `clients` is in a hand-over here.
    pub fn any_busy(&self, clients: &[IpAddr]) -> bool {
        clients.iter().any(|c| self.busy.contains(c))
    }

    /// Sorts clients (address, connections) `picked` to move at `now` by whether they may.
    pub fn sort_picked(&self, picked: Vec<(IpAddr, u64)>, now: Instant) -> Picked {
        let (adopted, rest): (Vec<_>, Vec<_>) = picked.into_iter().partition(|(a, _)| self.volunteer.adopted.contains_key(a));
        // A client that moved a moment ago stays put a while: its requests that waited when it
        // moved are answered on their retry first.
        let (recent, rest): (Vec<_>, Vec<_>) = rest.into_iter().partition(|(a, _)| self.moved.dwelling(a, now));
        // A client lives on one node at a time: one moved out comes home before it moves again,
        // and one given back to its origin is not this node's to move.
        let (moved, rest): (Vec<_>, Vec<_>) = rest.into_iter().partition(|(a, _)| self.stays(a));
        let (in_handoff, rest): (Vec<_>, Vec<_>) = rest.into_iter().partition(|(a, _)| self.busy.contains(a));
        // Its open connections still go to the volunteer it came home from, whose rule no
        // other volunteer's may replace before the drain ends.
        let (draining, rest): (Vec<_>, Vec<_>) = rest.into_iter().partition(|(a, _)| self.moved.drains(a));
        Picked { adopted, recent, moved, in_handoff, draining, rest }
    }

    /// Holds `clients`, adopted here, for giving them back to their origin; refused (why) when
    /// one is a client this node moved out itself, or is in another hand-over here.
    pub fn hold_to_give_back(&mut self, clients: &[IpAddr]) -> Result<(), String> {
        if let Some(c) = clients.iter().find(|c| self.moved.clients.contains_key(c)) {
            return Err(format!("{c} is a client this node moved out itself"));
        }
        if let Some(c) = clients.iter().find(|c| self.busy.contains(c)) {
            return Err(format!("{c} is in another hand-over here; ask again"));
        }
        self.hold(clients.iter().copied());
        Ok(())
    }

    /// Of `clients`, those moved out to `name` and in no hand-over, each once and sorted,
    /// marked busy (for a hand-back).
    pub fn hold_moved_to(&mut self, name: &str, clients: Vec<IpAddr>) -> Vec<IpAddr> {
        let mut c: Vec<IpAddr> = clients.into_iter().filter(|c| self.moved.clients.get(c).is_some_and(|m| m.to == name) && !self.busy.contains(c)).collect();
        c.sort_unstable();
        c.dedup();
        self.hold(c.iter().copied());
        c
    }

    /// Whether `client`'s connections here end where they are, the client being another node's
    /// now: this node moved it out, or gave it back to its origin.
    pub fn stays(&self, client: &IpAddr) -> bool {
        self.moved.clients.contains_key(client) || self.volunteer.returned.contains(client)
    }

    /// Whether this node has clients on `name`, holds clients of it, or is in a hand-over or
    /// hand-back with it: its links to `name` are needed.
    pub fn shares_clients_with(&self, name: &str) -> bool {
        self.moved.clients.values().any(|m| m.to == name)
            || self.moved.returning.keys().any(|(n, _)| n.as_str() == name)
            || self.volunteer.adopted.values().any(|a| a.from == name)
            || self.volunteer.incoming.keys().any(|(n, _)| n.as_str() == name)
            || self.volunteer.acked.keys().any(|(n, _)| n.as_str() == name)
            || self.links.suspected.contains(name)
    }

    /// The connections in `load` that end where they are ([`State::stays`]), not load this
    /// node can shed.
    pub fn staying(&self, load: &Load) -> u64 {
        load.clients.iter().filter(|(a, _)| self.stays(a)).map(|c| c.1).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::{volunteer::AdoptedIn, *};

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

    #[test]
    fn only_clients_of_this_node_that_rest_may_move() {
        let (mut st, now) = (State::default(), Instant::now());
        let long_ago = now.checked_sub(crate::agent::MOVE_DWELL * 2).unwrap();
        st.volunteer.adopted.insert(ip(1), AdoptedIn { client: ip(1), from: "a".into(), since_unix: 0, promised: 1, connections: 1, id: 1, arrived: true, last_seen: now });
        st.moved.just_moved(&[ip(2)], now);
        st.moved.just_moved(&[ip(3)], long_ago);
        st.moved.steered(ip(3), "b", 1, now);
        st.volunteer.returned.insert(ip(4));
        st.hold([ip(5)]);
        st.moved.drain_home.insert(ip(7), (Some("b".into()), long_ago));
        let picked: Vec<(IpAddr, u64)> = (1..=7).map(|i| (ip(i), u64::from(i))).collect();
        let p = st.sort_picked(picked, now);
        assert_eq!(
            p,
            Picked {
                adopted: vec![(ip(1), 1)],
                recent: vec![(ip(2), 2)],
                moved: vec![(ip(3), 3), (ip(4), 4)],
                in_handoff: vec![(ip(5), 5)],
                draining: vec![(ip(7), 7)],
                rest: vec![(ip(6), 6)]
            }
        );
        st.free(&[ip(5)]);
        assert!(!st.any_busy(&[ip(5), ip(6)]));
    }

    #[test]
    fn clients_given_back_are_held_unless_moved_out_or_busy() {
        let (mut st, now) = (State::default(), Instant::now());
        st.moved.steered(ip(1), "b", 1, now);
        assert!(st.hold_to_give_back(&[ip(2), ip(1)]).unwrap_err().contains("moved out itself"));
        assert!(!st.any_busy(&[ip(2)]), "nothing held");
        assert_eq!(st.hold_to_give_back(&[ip(2), ip(3)]), Ok(()));
        assert!(st.any_busy(&[ip(3)]));
        assert!(st.hold_to_give_back(&[ip(3)]).unwrap_err().contains("another hand-over"));
    }
}
