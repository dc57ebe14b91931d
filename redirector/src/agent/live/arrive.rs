//! The side connections move to: each is restored (still in repair mode) before the commit
//! point (a restore that fails refuses the transfer: everything stays where it was), and taken
//! live once the rules say it lives here; the applications get it with the `commit`.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    time::Instant,
};

use tracing::{info, warn};

use crate::{
    agent::Agent,
    app::AppConnection,
    peer::{MovedConnection, NodeName},
    repair::{self, Restored},
};

/// A connection restored, not live yet: for the application of `local`.
pub(in crate::agent) struct RestoredConn {
    pub local: SocketAddr,
    pub client: IpAddr,
    pub restored: Restored,
    pub blob: Vec<u8>,
    /// Its flow: (client, service).
    pub flow: (SocketAddr, SocketAddr),
}

/// Takes restored connections live; those that cannot go live are dropped (closed without a
/// word).
pub(super) fn go_live(list: Vec<RestoredConn>, from: &str, id: u64) -> Vec<(SocketAddr, AppConnection)> {
    let t0 = Instant::now();
    let mut live = Vec::with_capacity(list.len());
    for r in list {
        match r.restored.go_live() {
            Ok(fd) => live.push((r.local, AppConnection { client: r.client, fd, blob: r.blob })),
            Err(e) => warn!(sibling = %from, id, client = %r.client, "a moved connection could not go live: {e}"),
        }
    }
    info!(sibling = %from, id, connections = live.len(), live_us = t0.elapsed().as_micros(), "moved connections live");
    live
}

/// A transfer's connections on the volunteer.
pub(in crate::agent) enum Incoming {
    Restored(Vec<RestoredConn>),
    Live(Vec<(SocketAddr, AppConnection)>),
}

/// Restores `connections` of the origin's `service` for the application of `local`.
pub(in crate::agent) fn restore_all(local: SocketAddr, connections: Vec<MovedConnection>, out: &mut Vec<RestoredConn>) -> Result<(), String> {
    for c in connections {
        let client = c.state.peer.ip().to_canonical();
        let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
        let flow = (canonical(c.state.peer), canonical(c.state.local));
        let restored = repair::restore(&c.state).map_err(|e| format!("restoring a connection of {client}: {e}"))?;
        out.push(RestoredConn { local, client, restored, blob: c.blob, flow });
    }
    Ok(())
}

impl Agent {
    /// Volunteer: the connections of transfer (`from`, `id`), restored, kept until the origin
    /// says its rules are in (`Live`) or how the hand-over ended.
    pub(in crate::agent) fn keep_restored(&self, from: &str, id: u64, restored: Vec<RestoredConn>) {
        if !restored.is_empty() {
            self.pending().incoming.insert((NodeName::from(from), id), Incoming::Restored(restored));
        }
    }

    /// Volunteer: takes the restored connections of transfer (`from`, `id`) live (once; again
    /// is a no-op). Returns how many are live.
    pub(in crate::agent) fn go_live(&self, from: &str, id: u64) -> u64 {
        let mut p = self.pending();
        let key = (NodeName::from(from), id);
        let Some(incoming) = p.incoming.remove(&key) else { return 0 };
        let live = match incoming {
            Incoming::Live(l) => l,
            Incoming::Restored(list) => go_live(list, from, id),
        };
        let n = u64::try_from(live.len()).unwrap_or(u64::MAX);
        p.incoming.insert(key, Incoming::Live(live));
        n
    }

    /// Volunteer: the connections of transfer (`from`, `id`) for its applications, per local
    /// service: live (committed) or closed without a word (aborted).
    pub(in crate::agent) fn take_restored(&self, from: &str, id: u64, committed: bool) -> HashMap<SocketAddr, Vec<AppConnection>> {
        if committed {
            self.go_live(from, id);
        }
        let mut out: HashMap<SocketAddr, Vec<AppConnection>> = HashMap::new();
        if let Some(Incoming::Live(list)) = self.pending().incoming.remove(&(NodeName::from(from), id)) {
            for (local, c) in list {
                out.entry(local).or_default().push(c);
            }
        }
        out
    }
}
