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

/// The most bytes a moving connection's queues may announce: far more than any socket buffer
/// holds, so a peer's mistake cannot make this node gather without end.
const MAX_QUEUES: u64 = 1 << 30;

/// Where the open connections of a transfer go (the origin's service -> the local service
/// whose application takes them), and those restored so far.
#[derive(Default)]
pub(in crate::agent) struct Restoring {
    locals: HashMap<SocketAddr, SocketAddr>,
    pub out: Vec<RestoredConn>,
    assembly: Assembly,
}

impl Restoring {
    /// Connections of the origin's services in `locals` (-> the local service whose
    /// application takes them).
    pub(in crate::agent) fn to(locals: HashMap<SocketAddr, SocketAddr>) -> Self {
        Self { locals, ..Self::default() }
    }

    /// Restores `connections` of the origin's `service` (the last may wait for the rest of its
    /// queues). An error: why the transfer is refused.
    pub(in crate::agent) fn take(&mut self, service: SocketAddr, connections: Vec<MovedConnection>) -> Result<(), String> {
        let Some(local) = self.locals.get(&service).copied() else {
            return Err(format!("open connections of {service}, which this hand-over does not move connections of"));
        };
        for c in self.assembly.take(local, connections)? {
            restore_one(local, c, &mut self.out)?;
        }
        Ok(())
    }

    /// The next `bytes` of the queues of the connection waiting for them (of the origin's
    /// `service`). Restored once complete.
    pub(in crate::agent) fn more(&mut self, service: SocketAddr, bytes: &[u8]) -> Result<(), String> {
        let local = self.locals.get(&service).copied().ok_or_else(|| format!("queue bytes of {service}, which this hand-over does not move connections of"))?;
        if let Some(c) = self.assembly.more(local, bytes)? {
            restore_one(local, c, &mut self.out)?;
        }
        Ok(())
    }

    /// Every connection's queues arrived whole.
    pub(in crate::agent) fn finish(&self) -> Result<(), String> {
        self.assembly.finish()
    }

    /// How many connections of the origin's `service` were restored.
    pub(in crate::agent) fn arrived(&self, service: SocketAddr) -> usize {
        let local = self.locals.get(&service);
        self.out.iter().filter(|r| Some(&r.local) == local).count()
    }
}

/// Connections as their frames bring them: whole, or (one whose queues do not fit in a frame)
/// the heads of its queues first and the rest in the frames after it.
#[derive(Default)]
struct Assembly {
    /// The connection whose queues are still arriving, for its local service.
    partial: Option<(SocketAddr, MovedConnection)>,
}

impl Assembly {
    /// The connections of `conns` (for local service `local`) that are whole; the last may
    /// wait for the rest of its queues.
    fn take(&mut self, local: SocketAddr, conns: Vec<MovedConnection>) -> Result<Vec<MovedConnection>, String> {
        if self.partial.is_some() {
            return Err("open connections before the rest of the queues of the one before: some bytes were lost on the way".into());
        }
        let n = conns.len();
        let mut whole = Vec::with_capacity(n);
        let arrived = std::time::Instant::now();
        for (i, mut c) in conns.into_iter().enumerate() {
            // The restored socket's clock goes on from here, however long it waits.
            c.state.clock_at = Some(arrived);
            let more = c.more_send.saturating_add(c.more_recv);
            if more == 0 {
                whole.push(c);
            } else if i + 1 < n || more > MAX_QUEUES {
                return Err(format!("a connection announces {more} more bytes of queues, and is not the last of its frame or announces too many"));
            } else {
                self.partial = Some((local, c));
            }
        }
        Ok(whole)
    }

    /// The next `bytes` of the waiting connection's queues (its send queue's, then its
    /// receive queue's), for local service `local`: the connection, once whole.
    fn more(&mut self, local: SocketAddr, bytes: &[u8]) -> Result<Option<MovedConnection>, String> {
        let Some((_, c)) = self.partial.as_mut().filter(|(at, _)| *at == local) else {
            return Err("queue bytes that no connection waits for: some were lost on the way".into());
        };
        let mut rest = bytes;
        for (queue, more) in [(&mut c.state.send_queue, &mut c.more_send), (&mut c.state.recv_queue, &mut c.more_recv)] {
            let n = rest.len().min(usize::try_from(*more).unwrap_or(usize::MAX));
            queue.extend_from_slice(&rest[..n]);
            *more -= n as u64;
            rest = &rest[n..];
        }
        if !rest.is_empty() {
            return Err(format!("{} bytes of queues more than a connection announced", rest.len()));
        }
        if c.more_send == 0 && c.more_recv == 0 { Ok(self.partial.take().map(|(_, c)| c)) } else { Ok(None) }
    }

    /// Every connection's queues arrived whole.
    fn finish(&self) -> Result<(), String> {
        match &self.partial {
            Some((_, c)) => Err(format!("{} bytes of a connection's queues never came", c.more_send.saturating_add(c.more_recv))),
            None => Ok(()),
        }
    }
}

/// Restores connection `c` for the application of `local`.
fn restore_one(local: SocketAddr, c: MovedConnection, out: &mut Vec<RestoredConn>) -> Result<(), String> {
    let client = c.state.peer.ip().to_canonical();
    let flow = (super::canonical(c.state.peer), super::canonical(c.state.local));
    let restored = repair::restore(&c.state).map_err(|e| format!("restoring a connection of {client}: {e}"))?;
    out.push(RestoredConn { local, client, restored, blob: c.blob, flow });
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        agent::live::{Conn, ConnFrame, Leaving},
        peer::{Frame, Request},
        repair::{TcpState, Window},
    };

    fn state(client: u8, send: usize, recv: usize) -> TcpState {
        let bytes = |n: usize, seed: u8| (0..n).map(|i| u8::try_from(i % 251).unwrap() ^ seed).collect::<Vec<u8>>();
        TcpState {
            local: "198.18.0.10:80".parse().unwrap(),
            peer: SocketAddr::new(IpAddr::from([198, 18, 1, client]), 40000),
            snd_seq: 1,
            rcv_seq: 2,
            mss: 1448,
            wscale: Some((7, 7)),
            sack: true,
            timestamps: true,
            timestamp: 3,
            clock_at: None,
            own_mark: 0,
            window: Window::default(),
            sndbuf: 1 << 22,
            rcvbuf: 1 << 22,
            buffer_locks: 0,
            recv_queue: bytes(recv, client),
            send_queue: bytes(send, !client),
            unsent: 0,
        }
    }

    /// Connections whose queues are far bigger than a frame go in frames that each fit, and
    /// come out of them whole, byte for byte, in order, with the small ones around them.
    #[test]
    fn big_queues_travel_in_several_frames_and_arrive_whole() {
        let svc: SocketAddr = "198.18.0.10:80".parse().unwrap();
        let max_frame = 64 << 10;
        let states = [state(1, 100, 10), state(2, 300_000, 70_000), state(3, 0, 200_000), state(4, 5, 5), state(5, 65_000, 0)];
        let conns = states
            .iter()
            .map(|s| Conn {
                service: svc,
                app: svc,
                client: s.peer.ip(),
                fd: std::fs::File::open("/dev/null").unwrap().into(),
                flow: Some((s.peer, s.local)),
                state: Some(s.clone()),
                blob: vec![s.peer.ip().to_canonical().to_string().as_bytes()[0]; 9],
            })
            .collect();
        let mut leaving = Leaving { conns, frozen_here: Vec::new() };
        let (frames, thaw) = leaving.frames(HashMap::new(), max_frame);
        assert!(thaw.is_empty());
        assert!(frames.len() > 8, "several frames: {}", frames.len());
        let mut a = Assembly::default();
        let mut whole = Vec::new();
        for f in frames {
            let (wire, out) = match f {
                ConnFrame::Conns(service, connections) => {
                    let out = a.take(svc, connections.clone()).unwrap();
                    (Request::Connections { id: u64::MAX, service, connections }, out)
                }
                ConnFrame::Bytes(service, bytes) => {
                    let out = a.more(svc, &bytes).unwrap().into_iter().collect();
                    (Request::ConnectionBytes { id: u64::MAX, service, bytes }, out)
                }
            };
            assert!(Frame::from(wire).encode().len() <= max_frame, "a frame over the limit");
            whole.extend(out);
        }
        a.finish().unwrap();
        assert!(whole.iter().all(|c| c.state.clock_at.is_some()), "each one's arrival is when its clock goes on from");
        assert_eq!(whole.iter().map(|c| TcpState { clock_at: None, ..c.state.clone() }).collect::<Vec<_>>(), states.to_vec(), "every connection whole, in order");
        assert!(whole.iter().all(|c| c.more_send == 0 && c.more_recv == 0));
        // Bytes nobody waits for, a connection that announces more and is not last, and a
        // transfer that ends before the rest came are refused.
        assert!(Assembly::default().more(svc, b"x").is_err());
        let mut big = MovedConnection { state: state(6, 1, 1), blob: Vec::new(), more_send: 10, more_recv: 0 };
        assert!(Assembly::default().take(svc, vec![big.clone(), big.clone()]).is_err());
        let mut a = Assembly::default();
        assert!(a.take(svc, vec![big.clone()]).unwrap().is_empty());
        assert!(a.finish().is_err());
        assert!(a.more(svc, &[0; 11]).is_err(), "more bytes than announced");
        big.more_send = u64::MAX;
        assert!(Assembly::default().take(svc, vec![big]).is_err(), "more than any queue holds");
    }
}
