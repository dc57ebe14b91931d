//! Moving an established TCP connection between sockets, hosts included, with `TCP_REPAIR`
//! (Linux; `CAP_NET_ADMIN`): [`dump`] reads everything the peer has agreed on with this
//! end (sequence numbers, both queues, the negotiated options, the timestamp clock, the
//! window), [`restore`] makes a socket at the same 4-tuple that carries on from there. The
//! peer notices nothing: no handshake, no reset, no byte lost or repeated. Both ends are
//! two-phase: the dumped socket can [`resume`] or be [`discard`]ed, the restored one can go
//! live or be discarded ([`Restored`]), so a move that fails leaves the connection where it
//! was and never in two places. What is not moved:
//! congestion state and RTT estimates (they start fresh), urgent data (such a connection is
//! refused), and anything above TCP (TLS state is the application's).
//!
//! A socket being dumped is in repair mode: it sends nothing, but it still accepts and
//! acknowledges what arrives, so whoever moves a busy connection stops its packets first
//! (the origin's freeze) or the bytes that arrive meanwhile are acknowledged and lost with the
//! old socket. The frozen packets are kept meanwhile ([`Hold`]) and replayed to the new
//! socket ([`replay`]), so the client does not wait for its retransmission timeout.

mod dump;
mod hold;
mod restore;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use self::{
    dump::{address, as_dumped, discard, dump, resume},
    hold::{Hold, deliver, flow_of, replay},
    restore::{Restored, restore},
};

/// The kernel's `struct tcp_repair_window`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub snd_wl1: u32,
    pub snd_wnd: u32,
    pub max_window: u32,
    pub rcv_wnd: u32,
    pub rcv_wup: u32,
}

impl Window {
    /// This window with the peer's side closed: a socket given it sends nothing new (the dump
    /// holds a socket still so; a restored one goes live so, and the answer to its window
    /// probe opens it as it is then).
    #[must_use]
    pub const fn closed(self) -> Self {
        Self { snd_wnd: 0, ..self }
    }
}

/// Everything a connection's new socket needs to carry on where the old one stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpState {
    /// This end's address (the service's, for a server).
    pub local: SocketAddr,
    /// The peer's (the client's).
    pub peer: SocketAddr,
    /// The sequence number after the last byte written to the send queue.
    pub snd_seq: u32,
    /// The sequence number after the last byte received.
    pub rcv_seq: u32,
    /// The largest segment this end sends (`TCP_MAXSEG`).
    pub mss: u32,
    /// Options negotiated in the handshake: window scaling (with each direction's shift),
    /// selective acknowledgements, timestamps.
    pub wscale: Option<(u8, u8)>,
    pub sack: bool,
    pub timestamps: bool,
    /// This end's timestamp clock (`TCP_TIMESTAMP`) when it was dumped: the peer drops
    /// segments whose timestamp goes back. Its lowest bit says in what it counts (set:
    /// microseconds, clear: milliseconds; [`TcpState::clock_later`]).
    pub timestamp: u32,
    /// When `timestamp` was the clock's value, on this host: the dump where it was dumped, its
    /// arrival where it is restored (not sent: [`TcpState::sent_now`] moves the timestamp
    /// clock on by the time since, the restored socket's clock goes on from its arrival).
    #[serde(skip)]
    pub clock_at: Option<std::time::Instant>,
    /// The dumped socket's own mark (`SO_MARK`), given back if it resumes (not sent: the
    /// restored socket starts unmarked).
    #[serde(skip)]
    pub own_mark: u32,
    pub window: Window,
    /// The socket's buffer sizes (`SO_SNDBUF`, `SO_RCVBUF`, as the kernel reports them): the
    /// new socket gets room for at least as much, so the send queue's tail goes out without
    /// waiting and what the peer may send within the window it was told fits.
    pub sndbuf: u32,
    pub rcvbuf: u32,
    /// Which of them the application fixed (`SO_BUF_LOCK`): the others the kernel tunes.
    pub buffer_locks: libc::c_int,
    /// Received, not read by the application yet.
    #[serde(with = "serde_bytes")]
    pub recv_queue: Vec<u8>,
    /// Written by the application, not acknowledged by the peer yet; the last `unsent` bytes
    /// were never sent.
    #[serde(with = "serde_bytes")]
    pub send_queue: Vec<u8>,
    pub unsent: u32,
}

impl TcpState {
    /// This state as it leaves the host now: its timestamp clock moved on by the time since
    /// the dump, as the old socket's own clock did (which may still stamp a retransmission
    /// until it is closed).
    #[must_use]
    pub fn sent_now(&self) -> Self {
        let mut s = self.clone();
        if let Some(t) = s.clock_at.take() {
            s.timestamp = s.clock_later(u32::try_from(t.elapsed().as_millis()).unwrap_or(u32::MAX));
        }
        s
    }

    /// The timestamp clock `ms` milliseconds later, in the clock's own units. The kernel reads
    /// the lowest bit of a clock it is given (`TCP_TIMESTAMP`) as the unit (set: microseconds)
    /// and sets it in one it reports: a clock moved on by an odd number of milliseconds
    /// turned a millisecond clock into a microsecond one, half the restored sockets. Such a
    /// socket's clock runs a thousand times faster than its peer had seen it run, and the
    /// next dump's (in microseconds) was moved on in milliseconds.
    #[must_use]
    pub fn clock_later(&self, ms: u32) -> u32 {
        let usec = self.timestamp & 1;
        let step = if usec == 1 { ms.wrapping_mul(1000) } else { ms };
        (self.timestamp.wrapping_add(step) & !1) | usec
    }
}

/// How far ahead of the old socket's clock a restored socket's timestamp clock starts, in ms:
/// the time the state took between the hosts (the sender added the time since the dump,
/// [`TcpState::sent_now`]; the receiver adds the time from its arrival to the restore, and
/// the clock runs on from there). Timestamps only have to move forward, but not by much: a segment
/// resent before the restore is acknowledged with an echo of the old clock, and the kernel
/// takes the difference for a round trip (a minute's step made the restored socket's
/// retransmission timeout over a minute, and a connection that lost a segment after its move
/// stalled that long).
pub const CLOCK_STEP_MS: u32 = 100;

/// Socket-level constants of the repair interface (linux/tcp.h) the libc crate lacks.
mod sys {
    pub const TCP_NO_QUEUE: libc::c_int = 0;
    pub const TCP_RECV_QUEUE: libc::c_int = 1;
    pub const TCP_SEND_QUEUE: libc::c_int = 2;
    pub const TCPOPT_MAXSEG: u32 = 2;
    pub const TCPOPT_WINDOW: u32 = 3;
    pub const TCPOPT_SACK_PERM: u32 = 4;
    pub const TCPOPT_TIMESTAMP: u32 = 8;
    pub const TCPI_OPT_TIMESTAMPS: u8 = 1;
    pub const TCPI_OPT_SACK: u8 = 2;
    pub const TCPI_OPT_WSCALE: u8 = 4;
    /// `SIOCINQ`, `SIOCOUTQ` (the tty names are the same numbers), `SIOCOUTQNSD`.
    pub const SIOCINQ: libc::Ioctl = libc::FIONREAD;
    pub const SIOCOUTQ: libc::Ioctl = libc::TIOCOUTQ;
    pub const SIOCOUTQNSD: libc::Ioctl = 0x894B;
    /// `SO_BUF_LOCK` (Linux 5.14): whether the buffer sizes are fixed or tuned by the kernel.
    pub const SO_BUF_LOCK: libc::c_int = 72;
    /// `TCP_ESTABLISHED` in `tcpi_state`.
    pub const ESTABLISHED: u8 = 1;
    /// `TCP_REPAIR` values that leave repair mode: with a window probe, or without one.
    pub const TCP_REPAIR_OFF: libc::c_int = 0;
    pub const TCP_REPAIR_OFF_NO_WP: libc::c_int = -1;

    /// The kernel's `struct tcp_repair_opt`.
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct RepairOpt {
        pub code: u32,
        pub val: u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(timestamp: u32) -> TcpState {
        TcpState {
            local: "198.18.0.1:80".parse().expect("address"),
            peer: "198.18.1.1:40000".parse().expect("address"),
            snd_seq: 0,
            rcv_seq: 0,
            mss: 1448,
            wscale: None,
            sack: false,
            timestamps: true,
            timestamp,
            clock_at: None,
            own_mark: 0,
            window: Window::default(),
            sndbuf: 0,
            rcvbuf: 0,
            buffer_locks: 0,
            recv_queue: Vec::new(),
            send_queue: Vec::new(),
            unsent: 0,
        }
    }

    #[test]
    fn a_clock_moves_on_in_its_own_units() {
        // Milliseconds: an odd step leaves the unit bit clear (one millisecond less at most).
        assert_eq!(state(1000).clock_later(101), 1100);
        assert_eq!(state(1000).clock_later(100), 1100);
        // Microseconds: a millisecond is a thousand, the unit bit stays set.
        assert_eq!(state(1001).clock_later(101), 102_001);
        // Around the wrap.
        assert_eq!(state(u32::MAX).clock_later(1), 999);
        assert_eq!(state(u32::MAX - 1).clock_later(3), 0);
    }
}
