//! Making a socket that carries a dumped connection on.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd as _, OwnedFd},
};

use super::{TcpState, sys, sys::SO_BUF_LOCK};
use crate::sockopt;

/// The largest piece of a queue written at once; a piece the kernel has no memory for is
/// written again in halves, down to this.
const PIECE: usize = 1 << 20;
const SMALLEST_PIECE: usize = 4096;

fn tcp<T>(fd: &OwnedFd, name: libc::c_int, v: &T) -> io::Result<()> {
    sockopt::set(fd, libc::IPPROTO_TCP, name, v)
}

fn with(what: &'static str) -> impl Fn(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Writes `data` into the socket's queue (repair mode: it goes into the queue as is,
/// nothing is sent) or, out of repair mode, sends it; in pieces.
fn write_all(fd: &OwnedFd, data: &[u8], flags: libc::c_int) -> io::Result<()> {
    let mut piece = PIECE;
    let mut at = 0;
    while at < data.len() {
        let end = (at + piece).min(data.len());
        // SAFETY: `data[at..end]` is readable.
        let n = unsafe { libc::send(fd.as_raw_fd(), data[at..end].as_ptr().cast(), end - at, libc::MSG_NOSIGNAL | flags) };
        match usize::try_from(n) {
            Ok(0) => return Err(io::Error::other("the socket took no bytes")),
            Ok(n) => at += n,
            Err(_) => {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::ENOMEM) if piece > SMALLEST_PIECE => piece /= 2,
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(())
}

/// A socket restored from a dump, still in repair mode: it sends nothing until
/// [`Restored::go_live`] (what arrives meanwhile is queued and acknowledged, kept for the
/// application if the move happens and lost with the socket if it does not: the connection
/// must not reach it before its move is decided, unless the old socket is gone anyway), and [`Restored::discard`]
/// closes it without a word to the peer. A move is two-phase: restore, then either.
pub struct Restored {
    fd: OwnedFd,
    window: super::Window,
    /// The tail of the send queue that was never sent: sent once live.
    tail: Vec<u8>,
    /// The peer's window cannot close before its first acknowledgement is read: it goes
    /// live without a word ([`Restored::go_live`], [`first_flight_fits`]).
    quiet: bool,
}

/// Restores `state`'s connection into a new socket, in repair mode ([`Restored`]). Its local
/// address need not be this host's (the socket binds freely: a volunteer serves the origin's
/// service address).
///
/// # Errors
/// The kernel refused a step (repair takes `CAP_NET_ADMIN`; the 4-tuple may be in use here).
pub fn restore(state: &TcpState) -> io::Result<Restored> {
    let v4 = state.local.is_ipv4();
    let fd = sockopt::socket(if v4 { libc::AF_INET } else { libc::AF_INET6 }, libc::SOCK_STREAM, 0)?;
    // Repair mode also lets the socket bind the port of a listener (the server's own).
    tcp(&fd, libc::TCP_REPAIR, &1).map_err(with("TCP_REPAIR (CAP_NET_ADMIN)"))?;
    let (level, freebind) = if v4 { (libc::SOL_IP, libc::IP_FREEBIND) } else { (libc::SOL_IPV6, libc::IPV6_FREEBIND) };
    sockopt::set(&fd, level, freebind, &1).map_err(with("FREEBIND"))?;
    // And route from it before it is: a volunteer restores before it adopts the address
    // (FREEBIND lets the socket bind it, only a transparent socket may connect from it).
    let transparent = if v4 { libc::IP_TRANSPARENT } else { libc::IPV6_TRANSPARENT };
    sockopt::set(&fd, level, transparent, &1).map_err(with("TRANSPARENT"))?;
    bind_connect(&fd, state.local, false)?;
    // Room for the queues where the new socket's own buffer is too small: the tail must go
    // out at once when live (the peer's acknowledgements are still frozen on the origin), and
    // the receive queue must fit.
    grow(&fd, libc::SO_SNDBUF, libc::SO_SNDBUFFORCE, state.sndbuf, state.send_queue.len()).map_err(with("SO_SNDBUFFORCE"))?;
    grow(&fd, libc::SO_RCVBUF, libc::SO_RCVBUFFORCE, state.rcvbuf, state.recv_queue.len()).map_err(with("SO_RCVBUFFORCE"))?;
    // The kernel tunes both buffers again from there, as it did the old socket's.
    sockopt::set(&fd, libc::SOL_SOCKET, SO_BUF_LOCK, &state.buffer_locks).map_err(with("SO_BUF_LOCK"))?;
    // Sequence numbers of each queue's head: the queues are written next.
    let head = |end: u32, len: usize| end.wrapping_sub(u32::try_from(len).unwrap_or(u32::MAX));
    tcp(&fd, libc::TCP_REPAIR_QUEUE, &sys::TCP_SEND_QUEUE)?;
    tcp(&fd, libc::TCP_QUEUE_SEQ, &head(state.snd_seq, state.send_queue.len())).map_err(with("the send queue's sequence"))?;
    tcp(&fd, libc::TCP_REPAIR_QUEUE, &sys::TCP_RECV_QUEUE)?;
    tcp(&fd, libc::TCP_QUEUE_SEQ, &head(state.rcv_seq, state.recv_queue.len())).map_err(with("the receive queue's sequence"))?;
    // In repair mode, connect() sends no SYN: the socket is established at once.
    bind_connect(&fd, state.peer, true)?;
    let mut opts = vec![sys::RepairOpt { code: sys::TCPOPT_MAXSEG, val: state.mss }];
    if let Some((snd, rcv)) = state.wscale {
        opts.push(sys::RepairOpt { code: sys::TCPOPT_WINDOW, val: u32::from(snd) | (u32::from(rcv) << 16) });
    }
    if state.sack {
        opts.push(sys::RepairOpt { code: sys::TCPOPT_SACK_PERM, val: 0 });
    }
    if state.timestamps {
        opts.push(sys::RepairOpt { code: sys::TCPOPT_TIMESTAMP, val: 0 });
    }
    sockopt::set_slice(&fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_OPTIONS, &opts).map_err(with("the negotiated options"))?;
    if state.timestamps {
        // Set now, not as it goes live: a socket in repair mode acknowledges what reaches it
        // (a flow thawed before the move was decided), and an acknowledgement stamped by a new
        // socket's own clock (this host's, where the old one's was offset at random) is either
        // dropped by the peer as old or taken as the latest, and then everything this socket
        // sends afterwards is dropped as old, for good (half the connections in the test
        // `data_that_reaches_a_restored_connection_before_it_goes_live_is_answered`).
        //
        // Ahead of the old socket's clock, which runs on: until it is closed it may still
        // send (its loss-probe and retransmission timers run in repair mode, and its peer's
        // acknowledgements are frozen), and a segment of the old socket stamped later than
        // this one's makes the peer drop this one's as old (PAWS) until it resends them, a
        // second later (no RTT estimate yet). So the clock is the old one's as it arrived
        // (the sender added the time since the dump, `TcpState::sent_now`), plus the time
        // since its arrival, plus a step; it runs on from there however long the move takes
        // to be decided.
        let arrived = state.clock_at.unwrap_or_else(std::time::Instant::now);
        let elapsed = u32::try_from(arrived.elapsed().as_millis()).unwrap_or(u32::MAX);
        tcp(&fd, libc::TCP_TIMESTAMP, &state.clock_later(elapsed.saturating_add(super::CLOCK_STEP_MS))).map_err(with("the timestamp clock"))?;
    }
    tcp(&fd, libc::TCP_REPAIR_QUEUE, &sys::TCP_RECV_QUEUE)?;
    write_all(&fd, &state.recv_queue, 0).map_err(with("the receive queue"))?;
    // Only what was sent goes into the send queue in repair mode; the tail that never was
    // goes out once the socket is live (sent before the window is set, it hung in passt).
    let unsent = usize::try_from(state.unsent).unwrap_or(usize::MAX).min(state.send_queue.len());
    let (sent, tail) = state.send_queue.split_at(state.send_queue.len() - unsent);
    tcp(&fd, libc::TCP_REPAIR_QUEUE, &sys::TCP_SEND_QUEUE)?;
    write_all(&fd, sent, 0).map_err(with("the send queue"))?;
    let quiet = first_flight_fits(&fd, state.window.snd_wnd, state.send_queue.len());
    Ok(Restored { fd, window: state.window, tail: tail.to_vec(), quiet })
}

impl Restored {
    /// The connection goes on from this socket: its window is set, it leaves repair mode and
    /// sends the tail that was never sent.
    ///
    /// # Errors
    /// The kernel refused a step.
    pub fn go_live(self) -> io::Result<OwnedFd> {
        let Self { fd, window, tail, quiet } = self;
        // Quiet: a window that cannot close before the peer's next acknowledgement is read,
        // as dumped (a window update of the peer's that came meanwhile is newer, and read),
        // and no probe: nothing goes to the peer. A probe's answer comes back while the flow is
        // still frozen on the origin, to be kept and replayed there (1,000 connections moved:
        // 1,760 kept packets, 11-19 ms to replay, while the moves' clients waited).
        //
        // Otherwise the peer's window as closed: leaving repair mode sends a window probe, and
        // the peer's answer opens it as it is now. The dumped window may be closed by now (an
        // acknowledgement held while the flow was frozen, or one that reached this socket in
        // repair mode, which setting the dumped window would undo); and a socket connected in
        // repair mode predicts the next segment's header with a window of zero whatever window
        // it is given, so an acknowledgement that closed the window matched the prediction and
        // its window was never read: the socket sent into the peer's closed window and waited
        // out retransmission timeouts (`live_download`, moving home). 0, not -1: the probe gets
        // the peer talking at once (-1 stalled such a connection about 260 ms).
        let (window, leave) = if quiet { (window, sys::TCP_REPAIR_OFF_NO_WP) } else { (window.closed(), sys::TCP_REPAIR_OFF) };
        tcp(&fd, libc::TCP_REPAIR_WINDOW, &window).map_err(with("the window"))?;
        tcp(&fd, libc::TCP_REPAIR, &leave).map_err(with("leaving repair mode"))?;
        // Never waiting: the buffer has room for it (restore), and waiting for room could
        // wait for acknowledgements still frozen on the origin.
        write_all(&fd, &tail, libc::MSG_DONTWAIT).map_err(with("the never-sent tail"))?;
        Ok(fd)
    }

    /// Closes the socket in repair mode: nothing reaches the peer (the move did not happen;
    /// the connection goes on where it was).
    pub fn discard(self) {
        drop(self.fd);
    }
}

/// Whether the peer's window as dumped (`snd_wnd` bytes, its right edge where the peer's last
/// acknowledgement put it) stays open through what may fill it before the restored socket
/// reads the peer's next acknowledgement: the send queue (`queued` bytes, in flight or never
/// sent) and a first flight (the socket's congestion window, fresh). The socket was connected
/// in repair mode, where the kernel predicts the next segment's header with a window of zero,
/// whatever window it is given later: a segment that closes the window matches the prediction
/// and its window is not read; one that leaves it open is read, and the prediction is made
/// again from it.
fn first_flight_fits(fd: &OwnedFd, snd_wnd: u32, queued: usize) -> bool {
    sockopt::get::<libc::tcp_info>(fd, libc::IPPROTO_TCP, libc::TCP_INFO)
        .is_ok_and(|i| u64::from(snd_wnd) > u64::try_from(queued).unwrap_or(u64::MAX).saturating_add(u64::from(i.tcpi_snd_cwnd) * u64::from(i.tcpi_snd_mss)))
}

/// Makes buffer `get` (set through `force`) as large as the old socket's (`reported`, as the
/// kernel reported it) if `queue` bytes do not fit in it now.
fn grow(fd: &OwnedFd, get: libc::c_int, force: libc::c_int, reported: u32, queue: usize) -> io::Result<()> {
    let now = usize::try_from(sockopt::get::<libc::c_int>(fd, libc::SOL_SOCKET, get)?).unwrap_or(0);
    // The kernel counts overhead against the buffer too: half of it holds data.
    if queue <= now / 2 {
        return Ok(());
    }
    let want = (reported / 2).max(u32::try_from(queue).unwrap_or(u32::MAX));
    sockopt::set(fd, libc::SOL_SOCKET, force, &libc::c_int::try_from(want).unwrap_or(libc::c_int::MAX))
}

fn bind_connect(fd: &OwnedFd, a: SocketAddr, connect: bool) -> io::Result<()> {
    let addr = nix::sys::socket::SockaddrStorage::from(a);
    let r = if connect { nix::sys::socket::connect(fd.as_raw_fd(), &addr) } else { nix::sys::socket::bind(fd.as_raw_fd(), &addr) };
    r.map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("{} {a}: {e}", if connect { "connecting (repair) to" } else { "binding to" })))
}
