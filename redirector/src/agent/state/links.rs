//! The links' side of the state: each sibling as this node knows it (its outbound link, when it
//! was last heard, the load it says, releases owed to it), the requests waiting for an answer
//! on a link, and which siblings are suspected or unreachable.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot};

use crate::peer::{Answer, NodeName, Request};

/// One sibling as this node knows it.
#[derive(Default)]
pub struct SiblingState {
    /// The outbound link's queue, while it is up.
    pub out: Option<mpsc::Sender<Request>>,
    /// Resolves once the outbound link's connection has ended (its task drops the sender).
    pub ended: Option<oneshot::Receiver<()>>,
    /// Last frame received from it, on either connection; `None` until it is first heard.
    pub last_seen: Option<Instant>,
    /// Its last heartbeat.
    pub last_heartbeat: Option<Instant>,
    /// The load its last heartbeat said.
    pub load: u64,
    /// Clients taken back while the link was down: released when it is up again.
    pub unreleased: Vec<IpAddr>,
}

impl SiblingState {
    /// Linked (its outbound connection is up) and heard from within `live`.
    pub fn reachable(&self, live: Duration) -> bool {
        self.out.is_some() && self.last_seen.is_some_and(|t| t.elapsed() < live)
    }

    /// Owes it the release of `clients` (each once), sent when the link allows.
    pub fn owe_release(&mut self, clients: impl IntoIterator<Item = IpAddr>) {
        self.unreleased.extend(clients);
        self.unreleased.sort_unstable();
        self.unreleased.dedup();
    }
}

/// The siblings and the requests on their links.
#[derive(Default)]
pub struct Links {
    /// Every configured sibling (and any heard from), by name.
    pub siblings: HashMap<NodeName, SiblingState>,
    /// Requests sent on a link and waiting for their answer, by (sibling, request id).
    pub pending: HashMap<(NodeName, u64), oneshot::Sender<Answer>>,
    /// Siblings being taken clients home from because they were suspected.
    pub suspected: HashSet<String>,
    /// Siblings whose agent is unreachable while their datapath serves (said once).
    pub unreachable: HashSet<String>,
    /// Links are closing for good (the agent exits): none is opened again.
    pub closing: bool,
}
