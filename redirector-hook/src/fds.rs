//! Descriptors passed with a line (version 3): the open connections that move with their
//! sessions. A writer attaches a line's descriptors (`SCM_RIGHTS`) to that line's own bytes,
//! at most a given number to each `sendmsg`: one when the reader may be Node.js
//! ([`ONE_PER_SEND`]), as many as a message holds when it is the agent ([`MAX_PER_MESSAGE`]);
//! the line counts them in its `fds`. A reader keeps every descriptor it receives, in arrival
//! order, and gives each line that announces N the first N it holds: the kernel never lets one
//! read run past a message that carries descriptors, so a line's descriptors are always in by
//! the time its last byte is.

use std::{
    collections::VecDeque,
    io::{self, IoSlice, IoSliceMut},
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

/// Descriptors one `sendmsg` carries to a reader that may be Node.js (what the agent writes to
/// applications): one. Node.js (libuv) takes one descriptor per read and delivers the others of
/// a message only with later bytes, which may never come (the writer waits for an answer); one
/// per message, the kernel ends each read at it.
pub const ONE_PER_SEND: usize = 1;

/// The most descriptors one message can carry (the kernel's `SCM_MAX_FD`): what a reader
/// makes room for, and what a writer to the agent, which reads them all, may attach to one
/// `sendmsg` (a thousand connections handed over one per `sendmsg` took the Rust SDK 26 ms
/// here, inside their clients' pause).
pub const MAX_PER_MESSAGE: usize = 253;

/// Writes all of `bytes` to the Unix stream socket `sock`, with `fds` attached to them
/// (spread over the first writes, `per_send` at a time, at least one and at most
/// [`MAX_PER_MESSAGE`]: a line listing N connections is always longer than the N writes it
/// may take). Blocks as the socket does; a non-blocking socket that is full returns
/// `WouldBlock` with what was written so far lost to the caller, so use it on blocking
/// sockets, or see [`send_some`].
///
/// # Errors
/// The kernel's, or `bytes` too short to carry `fds`.
pub fn send_all(sock: BorrowedFd<'_>, mut bytes: &[u8], mut fds: &[BorrowedFd<'_>], per_send: usize) -> io::Result<()> {
    while !bytes.is_empty() {
        let n = send_some(sock, bytes, &mut fds, per_send)?;
        bytes = &bytes[n..];
    }
    if fds.is_empty() { Ok(()) } else { Err(io::Error::new(io::ErrorKind::InvalidInput, "a line too short to carry its descriptors")) }
}

/// One `sendmsg` of (a first part of) `bytes`, carrying up to `per_send` of `fds` (at least
/// one, at most [`MAX_PER_MESSAGE`]; those it carried are taken off the front of `fds`).
/// Returns the bytes written. A descriptor goes with the write's first byte, so a write that
/// sent anything sent them.
///
/// # Errors
/// The kernel's (`WouldBlock` on a full non-blocking socket: nothing was sent).
pub fn send_some(sock: BorrowedFd<'_>, bytes: &[u8], fds: &mut &[BorrowedFd<'_>], per_send: usize) -> io::Result<usize> {
    let per_send = per_send.clamp(1, MAX_PER_MESSAGE);
    let k = fds.len().min(per_send);
    // Each write carrying descriptors takes only as many bytes as leave one for each write
    // the remaining descriptors still need.
    let later = (fds.len() - k).div_ceil(per_send);
    let len = if fds.is_empty() { bytes.len() } else { bytes.len().saturating_sub(later).max(1).min(bytes.len()) };
    let raw: Vec<RawFd> = fds[..k].iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let iov = [IoSlice::new(&bytes[..len])];
    let n = loop {
        match sendmsg::<()>(sock.as_raw_fd(), &iov, if k > 0 { &cmsg } else { &[] }, MsgFlags::MSG_NOSIGNAL, None) {
            Err(nix::errno::Errno::EINTR) => {}
            r => break r.map_err(io::Error::from)?,
        }
    };
    if n > 0 {
        *fds = &fds[k..];
    }
    Ok(n)
}

/// Room for the control message of one read: the most one message can carry.
fn cmsg_room() -> Vec<u8> {
    nix::cmsg_space!([RawFd; MAX_PER_MESSAGE])
}

/// One `recvmsg` into `buf`; descriptors that came with it go to the back of `fds` (close on
/// exec). Returns the bytes read (0: the end of the stream).
///
/// # Errors
/// The kernel's (`WouldBlock` on a non-blocking socket with nothing to read), or a control
/// message cut short (descriptors lost: the stream cannot be trusted any further).
pub fn recv_some(sock: BorrowedFd<'_>, buf: &mut [u8], fds: &mut VecDeque<OwnedFd>) -> io::Result<usize> {
    let mut room = cmsg_room();
    let mut iov = [IoSliceMut::new(buf)];
    let msg = loop {
        match recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut room), MsgFlags::MSG_CMSG_CLOEXEC) {
            Err(nix::errno::Errno::EINTR) => {}
            r => break r.map_err(io::Error::from)?,
        }
    };
    let n = msg.bytes;
    let truncated = msg.flags.contains(MsgFlags::MSG_CTRUNC);
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(list) = c {
            // SAFETY: the kernel just installed these descriptors in this process for us.
            fds.extend(list.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    if truncated {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "descriptors were cut short on their way (control message truncated)"));
    }
    Ok(n)
}

/// The first `n` descriptors of `fds` for a line that announces them.
///
/// # Errors
/// Fewer than `n` came: the writer did not attach what its line says.
pub fn take(fds: &mut VecDeque<OwnedFd>, n: u64) -> Result<Vec<OwnedFd>, String> {
    let n = usize::try_from(n).unwrap_or(usize::MAX);
    if fds.len() < n {
        return Err(format!("a line announcing {n} descriptors came with {}", fds.len()));
    }
    Ok(fds.drain(..n).collect())
}

/// Descriptors a process that takes moved connections reserves room for in its table
/// ([`reserve_table`]): a move of ten thousand connections, with room to spare.
pub const TABLE_ROOM: usize = 16_384;

/// Grows this process's descriptor table now to hold descriptors numbered below `upto` (at
/// most its soft limit of open descriptors), so that receiving or opening many later does not
/// grow it then. In a process with several threads, each time the kernel doubles the table it
/// waits for an RCU grace period first: 8 to 20 ms each on this project's test machine,
/// measured, and a first move of a thousand connections made an agent's table grow three
/// times while their clients waited. Growing it once at start costs at most one such wait and
/// `upto` pointers of kernel memory (128 KiB for [`TABLE_ROOM`]); a table never shrinks.
/// Returns the room reserved.
///
/// # Errors
/// `/dev/null` cannot be opened, or the kernel refused to grow the table (out of memory).
pub fn reserve_table(upto: usize) -> io::Result<usize> {
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    let room = upto.min(usize::try_from(soft).unwrap_or(usize::MAX));
    let Some(highest) = room.checked_sub(1).and_then(|h| RawFd::try_from(h).ok()) else { return Ok(0) };
    let null = std::fs::File::open("/dev/null")?;
    // The lowest free descriptor at or above `highest`: the table grows to hold it. Closed at
    // once; the room stays.
    let high = nix::fcntl::fcntl(&null, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(highest)).map_err(io::Error::from)?;
    // SAFETY: the kernel just made `high` for this call alone.
    drop(unsafe { OwnedFd::from_raw_fd(high) });
    Ok(room)
}

#[cfg(test)]
mod tests {
    use std::os::{fd::AsFd, unix::net::UnixStream};

    use super::*;

    /// Reads `want` bytes from `r`; returns them and how many of the reads brought
    /// descriptors (as many as the messages that carried them).
    fn read_all(r: &UnixStream, want: usize, fds: &mut VecDeque<OwnedFd>) -> (Vec<u8>, usize) {
        let (mut got, mut with_fds) = (Vec::new(), 0);
        let mut buf = [0u8; 100];
        while got.len() < want {
            let before = fds.len();
            let n = recv_some(r.as_fd(), &mut buf, fds).unwrap();
            assert!(n > 0, "the stream ended early");
            with_fds += usize::from(fds.len() > before);
            got.extend_from_slice(&buf[..n]);
        }
        (got, with_fds)
    }

    #[test]
    fn descriptors_arrive_with_their_line_in_order_however_many_and_however_split() {
        let (a, b) = UnixStream::pair().unwrap();
        let files: Vec<OwnedFd> = (0..600).map(|_| std::fs::File::open("/dev/null").unwrap().into()).collect();
        let borrowed: Vec<BorrowedFd<'_>> = files.iter().map(AsFd::as_fd).collect();
        let line1 = format!("{}\n", "x".repeat(700));
        // One per message (to Node.js), or as many as a message holds (to the agent).
        for (per_send, messages) in [(ONE_PER_SEND, 600 + 2), (MAX_PER_MESSAGE, 3 + 1), (0, 600 + 2), (1000, 3 + 1)] {
            let mut fds = VecDeque::new();
            // 600 descriptors on one line, then a line with none, then two. Read while
            // writing: the socket holds a few hundred messages at most.
            let (got, with_fds) = std::thread::scope(|s| {
                s.spawn(|| {
                    send_all(a.as_fd(), line1.as_bytes(), &borrowed, per_send).unwrap();
                    send_all(a.as_fd(), b"plain\n", &[], per_send).unwrap();
                    send_all(a.as_fd(), b"ab\n", &borrowed[..2], per_send).unwrap();
                });
                read_all(&b, line1.len() + 6 + 3, &mut fds)
            });
            assert_eq!(got, [line1.as_bytes(), b"plain\n", b"ab\n"].concat(), "{per_send} per sendmsg");
            assert_eq!(with_fds, messages, "messages with descriptors, {per_send} per sendmsg");
            assert_eq!(take(&mut fds, 600).unwrap().len(), 600);
            assert_eq!(take(&mut fds, 0).unwrap().len(), 0);
            assert_eq!(take(&mut fds, 2).unwrap().len(), 2);
            assert!(take(&mut fds, 1).unwrap_err().contains("announcing 1 descriptors came with 0"));
        }
        // A line too short for its descriptors' writes.
        assert!(send_all(a.as_fd(), b"xy", &borrowed[..3], ONE_PER_SEND).is_err());
        assert!(send_all(a.as_fd(), b"", &borrowed[..3], MAX_PER_MESSAGE).is_err());
    }

    /// The table's size, from the kernel (`FDSize` in /proc/self/status).
    fn table_size() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status.lines().find_map(|l| l.strip_prefix("FDSize:")).unwrap().trim().parse().unwrap()
    }

    #[test]
    fn the_descriptor_table_is_grown_once_and_nothing_stays_open() {
        let room = reserve_table(8192).unwrap();
        assert!(room > 0 && room <= 8192, "{room}");
        assert!(table_size() >= room, "the table holds {} descriptors, {room} were reserved", table_size());
        assert!(!std::path::Path::new(&format!("/proc/self/fd/{}", room - 1)).exists(), "the descriptor that grew it is closed");
        assert_eq!(reserve_table(0).unwrap(), 0);
    }
}
