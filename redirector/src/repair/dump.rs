//! Reading a connection out of its socket.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, OwnedFd},
};

use super::{TcpState, Window, sys};
use crate::sockopt;

fn repair(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    sockopt::set(&fd, libc::IPPROTO_TCP, libc::TCP_REPAIR, &libc::c_int::from(on))
}

fn queue(fd: BorrowedFd<'_>, which: libc::c_int) -> io::Result<()> {
    sockopt::set(&fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_QUEUE, &which)
}

/// A socket's own address, or (`peer`) its peer's, as the kernel reports it.
///
/// # Errors
/// The kernel's, or not an IPv4 or IPv6 socket.
pub fn address(fd: BorrowedFd<'_>, peer: bool) -> io::Result<SocketAddr> {
    let raw = fd.as_raw_fd();
    let a: nix::sys::socket::SockaddrStorage = if peer { nix::sys::socket::getpeername(raw) } else { nix::sys::socket::getsockname(raw) }.map_err(io::Error::from)?;
    a.as_sockaddr_in()
        .map(|a| SocketAddr::from(std::net::SocketAddrV4::from(*a)))
        .or_else(|| a.as_sockaddr_in6().map(|a| SocketAddr::from(std::net::SocketAddrV6::from(*a))))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an IPv4 or IPv6 socket"))
}

/// The `len` bytes at the head of queue `which` (the socket in repair mode), copied.
fn peek(fd: BorrowedFd<'_>, which: libc::c_int, len: usize) -> io::Result<Vec<u8>> {
    queue(fd, which)?;
    let mut buf = vec![0u8; len];
    // One peek returns the whole queue (peeking again would start over at its head); a short
    // one means the queue is not what the kernel said a moment ago.
    // SAFETY: `buf` is writable for `len` bytes.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), len, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    let Ok(n) = usize::try_from(n) else { return Err(io::Error::last_os_error()) };
    if n != len {
        return Err(io::Error::other(format!("a queue of {len} bytes gave {n} on peeking")));
    }
    Ok(buf)
}

/// Whether the peer sent urgent data not read yet (its byte here, or announced): the kernel
/// says "invalid" to peeking out of band only when there is none.
fn urgent_pending(fd: BorrowedFd<'_>) -> bool {
    let mut byte = 0u8;
    // SAFETY: one writable byte.
    let n = unsafe { libc::recv(fd.as_raw_fd(), (&raw mut byte).cast(), 1, libc::MSG_OOB | libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    n >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
}

fn int(fd: BorrowedFd<'_>, request: libc::Ioctl) -> io::Result<usize> {
    usize::try_from(sockopt::ioctl_int(&fd, request)?).map_err(|_| io::Error::other("a negative queue length"))
}

/// Puts `fd` in repair mode, stops it sending anything new and reads its connection. Its
/// timers may still resend what it sent: it is marked ([`redirector_common::MUTED_MARK`]), and
/// the egress program drops what it sends while its flow is frozen. Packets that arrive are
/// still acknowledged, and an acknowledgement that opens the peer's window lets it send
/// again: stop them first (freeze). On an error the socket leaves repair mode again and goes
/// on as before.
///
/// # Errors
/// Not an established TCP connection, urgent data pending, or the kernel's refusal (repair
/// takes `CAP_NET_ADMIN`).
pub fn dump(fd: &impl AsFd) -> io::Result<TcpState> {
    let fd = fd.as_fd();
    let own_mark: u32 = sockopt::get(&fd, libc::SOL_SOCKET, libc::SO_MARK)?;
    repair(fd, true).map_err(|e| io::Error::new(e.kind(), format!("TCP_REPAIR (CAP_NET_ADMIN): {e}")))?;
    // Each step undone on an error, in reverse: the window and the mark, then repair mode.
    let r = sockopt::get(&fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_WINDOW).and_then(|window: Window| {
        let r = hold_still(fd, &window).and_then(|()| read(fd, window));
        if r.is_err() {
            let _ = sockopt::set(&fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_WINDOW, &window);
            let _ = sockopt::set(&fd, libc::SOL_SOCKET, libc::SO_MARK, &own_mark);
        }
        r
    });
    if r.is_err() {
        let _ = repair(fd, false);
    }
    r.map(|state| TcpState { own_mark, ..state })
}

/// Makes a socket in repair mode send nothing new, before anything is read: repair mode
/// alone does not. A socket goes on sending what its peer's window allows (its pacing timer,
/// or an acknowledgement that came just before the freeze, let it), and what it sent between
/// the dump's reads reached the client while the dump called it unsent: the restored socket
/// then dropped the client's acknowledgements (of data it had not sent) and, its congestion
/// window full of what was in flight, never sent again (`live_download`, 1 run in 20 under
/// load). With the peer's window closed it sends nothing new; its own timers may still resend
/// (retransmission, loss probe), which the mark mutes.
fn hold_still(fd: BorrowedFd<'_>, window: &Window) -> io::Result<()> {
    sockopt::set(&fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_WINDOW, &window.closed()).map_err(|e| io::Error::new(e.kind(), format!("closing the send window: {e}")))?;
    sockopt::set(&fd, libc::SOL_SOCKET, libc::SO_MARK, &redirector_common::MUTED_MARK).map_err(|e| io::Error::new(e.kind(), format!("SO_MARK: {e}")))
}

fn read(fd: BorrowedFd<'_>, window: Window) -> io::Result<TcpState> {
    let info: libc::tcp_info = sockopt::get(&fd, libc::IPPROTO_TCP, libc::TCP_INFO)?;
    if info.tcpi_state != sys::ESTABLISHED {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("the connection is not established (TCP state {})", info.tcpi_state)));
    }
    if urgent_pending(fd) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "urgent (out-of-band) data is pending: such a connection does not move"));
    }
    // The next byte expected first, then the queues' lengths: a packet that arrives between
    // the reads makes the lengths disagree with it, and [`as_dumped`] sees it moved on.
    queue(fd, sys::TCP_RECV_QUEUE)?;
    let rcv_seq: u32 = sockopt::get(&fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ)?;
    let (recv_len, send_len, unsent) = (int(fd, sys::SIOCINQ)?, int(fd, sys::SIOCOUTQ)?, int(fd, sys::SIOCOUTQNSD)?);
    queue(fd, sys::TCP_SEND_QUEUE)?;
    let snd_seq: u32 = sockopt::get(&fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ)?;
    let mss: u32 = sockopt::get(&fd, libc::IPPROTO_TCP, libc::TCP_MAXSEG)?;
    let timestamp: u32 = sockopt::get(&fd, libc::IPPROTO_TCP, libc::TCP_TIMESTAMP)?;
    let buffer = |name| sockopt::get::<libc::c_int>(&fd, libc::SOL_SOCKET, name).map(|v| u32::try_from(v).unwrap_or(0));
    let (sndbuf, rcvbuf) = (buffer(libc::SO_SNDBUF)?, buffer(libc::SO_RCVBUF)?);
    let buffer_locks: libc::c_int = sockopt::get(&fd, libc::SOL_SOCKET, sys::SO_BUF_LOCK)?;
    let opts = info.tcpi_options;
    let scales = info.tcpi_snd_rcv_wscale;
    let state = TcpState {
        local: address(fd, false)?,
        peer: address(fd, true)?,
        snd_seq,
        rcv_seq,
        mss,
        wscale: (opts & sys::TCPI_OPT_WSCALE != 0).then_some((scales & 0x0f, scales >> 4)),
        sack: opts & sys::TCPI_OPT_SACK != 0,
        timestamps: opts & sys::TCPI_OPT_TIMESTAMPS != 0,
        timestamp,
        clock_at: Some(std::time::Instant::now()),
        own_mark: 0,
        window,
        sndbuf,
        rcvbuf,
        buffer_locks,
        recv_queue: if recv_len > 0 { peek(fd, sys::TCP_RECV_QUEUE, recv_len)? } else { Vec::new() },
        send_queue: if send_len > 0 { peek(fd, sys::TCP_SEND_QUEUE, send_len)? } else { Vec::new() },
        unsent: u32::try_from(unsent).map_err(|_| io::Error::other("an unsent tail over 4 GiB"))?,
    };
    // Out of the send queue again: a socket in repair mode with the send queue chosen takes
    // anything it would send (its pacing timer's next segments) for sent without sending it.
    queue(fd, sys::TCP_NO_QUEUE)?;
    Ok(state)
}

/// Whether a dumped socket still holds the connection its dump `state` read: nothing
/// received since (the same next byte expected) and nothing it sent acknowledged since (the
/// same bytes unacknowledged; it sends nothing new, [`dump`] closed its window). Its flow was
/// frozen before the dump, but a packet that had just passed the classifier may reach it
/// after: then the dump is stale and the connection must stay where it is.
///
/// # Errors
/// The kernel's.
pub fn as_dumped(fd: &impl AsFd, state: &TcpState) -> io::Result<bool> {
    let fd = fd.as_fd();
    queue(fd, sys::TCP_RECV_QUEUE)?;
    let rcv_seq = sockopt::get::<u32>(&fd, libc::IPPROTO_TCP, libc::TCP_QUEUE_SEQ);
    queue(fd, sys::TCP_NO_QUEUE)?;
    Ok(rcv_seq? == state.rcv_seq && int(fd, sys::SIOCOUTQ)? == state.send_queue.len())
}

/// Takes a dumped socket (its dump `state`) out of repair mode, with its own mark again: the
/// connection goes on here (a move that did not happen).
///
/// # Errors
/// The kernel's.
pub fn resume(fd: &impl AsFd, state: &TcpState) -> io::Result<()> {
    let fd = fd.as_fd();
    // Heard again before it leaves repair mode: leaving sends a window probe. Its peer's
    // window as it was (the dump closed it); the next acknowledgement updates it.
    sockopt::set(&fd, libc::SOL_SOCKET, libc::SO_MARK, &state.own_mark)?;
    sockopt::set(&fd, libc::IPPROTO_TCP, libc::TCP_REPAIR_WINDOW, &state.window)?;
    repair(fd, false)
}

/// Ends a dumped socket's connection here without a word to the peer (no FIN, no reset: it
/// is in repair mode), and closes it: the connection lives on in the restored socket.
pub fn discard(fd: OwnedFd) {
    // Disconnected first, not only closed: closing ends the connection only with the last
    // reference to the socket, and a copy may live on (the application's, or a child's
    // forked meanwhile by any thread, until it execs), with the connection's addresses still
    // taken here: a connection that comes back to this host could not be restored
    // (EADDRNOTAVAIL, seen in tcp_repair's tests while other tests spawned commands).
    // Disconnecting a socket in repair mode sends nothing. It fails only on a socket that
    // holds no connection any more, which is what it is for.
    let _ = sockopt::disconnect(&fd);
    drop(fd);
}
