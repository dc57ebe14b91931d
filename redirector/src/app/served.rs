//! Which connection serves each service on the hook: one application per service, for as long
//! as its connection is open. A second registration of a service that is served waits a
//! moment for the first connection to end (an application reconnecting), then is refused:
//! replacing a live application would send the next hand-overs to an instance that does not
//! hold its clients' sessions (they would be lost), and the first one's unfinished hand-overs
//! to one that never took part in them.

use std::{
    collections::{HashMap, hash_map::Entry},
    fmt,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{net::UnixStream, sync::Notify};

use super::AppConn;

/// How long a registration waits for the connection that serves its service to end.
pub const RECONNECT_WAIT: Duration = Duration::from_secs(2);

/// Who is at the other end of a hook connection (`SO_PEERCRED`), for the logs and for the
/// error a second instance gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peer {
    pub pid: Option<i32>,
    pub uid: u32,
    pub gid: u32,
}

impl Peer {
    /// The credentials of the process that connected `stream` (`None`: the kernel did not say).
    #[must_use]
    pub fn of(stream: &UnixStream) -> Option<Self> {
        stream.peer_cred().ok().map(|c| Self { pid: c.pid(), uid: c.uid(), gid: c.gid() })
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pid {
            Some(pid) => write!(f, "pid {pid}, uid {}, gid {}", self.uid, self.gid),
            None => write!(f, "uid {}, gid {}", self.uid, self.gid),
        }
    }
}

/// The holder of a service: the connection that registered it, and once its unfinished
/// hand-overs were decided, the connection requests go to.
struct Holder {
    token: u64,
    peer: Option<Peer>,
    since: Instant,
    conn: Option<Arc<AppConn>>,
}

/// Services and the connections that serve them.
#[derive(Default)]
pub(super) struct Served {
    held: Mutex<HashMap<SocketAddr, Holder>>,
    /// Woken whenever a service is let go.
    released: Notify,
    next: AtomicU64,
}

/// A service held by one connection; let go when dropped (however the connection ends).
pub(super) struct Hold<'a> {
    served: &'a Served,
    service: SocketAddr,
    token: u64,
}

/// Why a registration was refused: another connection serves the service.
#[derive(Debug)]
pub(super) struct Taken {
    pub peer: Option<Peer>,
    pub for_secs: u64,
}

impl fmt::Display for Taken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let who = self.peer.map_or_else(|| "a process the kernel did not name".to_string(), |p| p.to_string());
        write!(f, "served by another application connection ({who}, registered {} s ago): one application instance per service on a node", self.for_secs)
    }
}

impl Served {
    /// Holds `service` for the connection of `peer`, waiting up to `wait` for the connection
    /// that holds it to end.
    pub async fn hold(&self, service: SocketAddr, peer: Option<Peer>, wait: Duration) -> Result<Hold<'_>, Taken> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            match self.held.lock().expect("lock").entry(service) {
                Entry::Vacant(v) => {
                    let token = self.next.fetch_add(1, Ordering::Relaxed);
                    v.insert(Holder { token, peer, since: Instant::now(), conn: None });
                    return Ok(Hold { served: self, service, token });
                }
                Entry::Occupied(o) if tokio::time::Instant::now() >= deadline => {
                    return Err(Taken { peer: o.get().peer, for_secs: o.get().since.elapsed().as_secs() });
                }
                Entry::Occupied(_) => {}
            }
            let _ = tokio::time::timeout_at(deadline, released).await;
        }
    }

    /// The connection requests for `service` go to, once it is ready for them.
    pub fn conn(&self, service: SocketAddr) -> Option<Arc<AppConn>> {
        self.held.lock().expect("lock").get(&service).and_then(|h| h.conn.clone())
    }

    /// Who registered `service`, if it is held.
    pub fn peer(&self, service: SocketAddr) -> Option<Peer> {
        self.held.lock().expect("lock").get(&service).and_then(|h| h.peer)
    }

    /// Services whose connection takes requests, with who is at its other end.
    pub fn ready(&self) -> Vec<(SocketAddr, Option<Peer>)> {
        self.held.lock().expect("lock").iter().filter(|(_, h)| h.conn.is_some()).map(|(s, h)| (*s, h.peer)).collect()
    }
}

impl Hold<'_> {
    /// From now on requests for the service go to `conn`.
    pub fn ready(&self, conn: Arc<AppConn>) {
        if let Some(h) = self.served.held.lock().expect("lock").get_mut(&self.service).filter(|h| h.token == self.token) {
            h.conn = Some(conn);
        }
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut held = self.served.held.lock().expect("lock");
        if held.get(&self.service).is_some_and(|h| h.token == self.token) {
            held.remove(&self.service);
        }
        drop(held);
        self.served.released.notify_waiters();
    }
}
