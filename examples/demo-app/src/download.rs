//! `GET /download/N`: an answer of N bytes of a fixed pattern ([`byte`]), written as the client
//! takes them. A download can move to another server in the middle with its connection: at a
//! hand-over the writing stops between two writes, and the connection goes with a blob that
//! says how far the application got ([`Resume`]); what it wrote before is in the socket's send
//! queue, which moves with the socket. The server that adopts it writes the rest.

use std::{
    io,
    net::TcpStream,
    os::fd::{AsRawFd as _, OwnedFd},
    time::Duration,
};

/// What a download's path starts with; its length follows.
pub const PATH: &str = "/download/";

/// The longest download served: 1 GiB.
pub const MAX: u64 = 1 << 30;

/// At most this much is written at once: a hand-over waits for one write at most.
const WRITE: usize = 64 << 10;

/// How long a wait for room in the socket lasts before the caller is asked again whether to stop.
const TICK: Duration = Duration::from_millis(50);

/// Byte `i` of every download: changes every byte and every 4 KiB block, so a byte lost,
/// repeated or out of place shows.
#[must_use]
pub fn byte(i: u64) -> u8 {
    // The low byte of each (`i % 251` fits in it).
    (i % 251).to_le_bytes()[0] ^ (i >> 12).to_le_bytes()[0]
}

/// The length a request's target asks for, if it is a download's.
#[must_use]
pub fn requested(target: &str) -> Option<u64> {
    target.strip_prefix(PATH)?.parse().ok().filter(|n| *n <= MAX)
}

/// How far a download that moved got: `sent` of its `total` bytes were written; whether its
/// connection stays open after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    pub total: u64,
    pub sent: u64,
    pub keep_alive: bool,
}

/// A blob that resumes a download starts so (an HTTP request never does); `total sent keep\n`
/// follows (`keep`: 1 or 0), then what was read of the connection ahead of it.
const TAG: &[u8] = b"\0download ";

/// The blob of a connection handed over in the middle of download `r`, `input` read ahead.
#[must_use]
pub fn blob(r: Resume, input: &[u8]) -> Vec<u8> {
    [TAG, format!("{} {} {}\n", r.total, r.sent, u8::from(r.keep_alive)).as_bytes(), input].concat()
}

/// What a connection's blob says: a download to resume, if any, and the input read ahead.
#[must_use]
pub fn from_blob(blob: Vec<u8>) -> (Option<Resume>, Vec<u8>) {
    let Some(rest) = blob.strip_prefix(TAG) else { return (None, blob) };
    let Some(end) = rest.iter().position(|b| *b == b'\n') else { return (None, blob) };
    let head = String::from_utf8_lossy(&rest[..end]).into_owned();
    let mut it = head.split(' ').map(str::parse::<u64>);
    match (it.next(), it.next(), it.next(), it.next()) {
        (Some(Ok(total)), Some(Ok(sent)), Some(Ok(keep @ (0 | 1))), None) if sent <= total && total <= MAX => {
            (Some(Resume { total, sent, keep_alive: keep == 1 }), rest[end + 1..].to_vec())
        }
        _ => (None, blob),
    }
}

/// How writing a download ended.
pub enum Wrote {
    /// All of it.
    All,
    /// Stopped when asked, this far.
    Stopped(u64),
}

/// Writes bytes `sent..total` of the pattern to `s` as it takes them, waiting for room with
/// `poll(2)` (woken early by `wake`, an eventfd it drains); asks `stop` between writes.
///
/// # Errors
/// A write failed (the client went away).
pub fn write(s: &TcpStream, wake: &OwnedFd, mut sent: u64, total: u64, stop: impl Fn() -> bool) -> io::Result<Wrote> {
    let mut buf = Vec::with_capacity(WRITE);
    while sent < total {
        if stop() {
            return Ok(Wrote::Stopped(sent));
        }
        let mut p = [libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLOUT, revents: 0 }, libc::pollfd { fd: wake.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
        // SAFETY: two valid pollfds, borrowed for the call only.
        let n = unsafe { libc::poll(p.as_mut_ptr(), 2, libc::c_int::try_from(TICK.as_millis()).unwrap_or(50)) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if p[1].revents != 0 {
            crate::drain(wake);
        }
        if p[0].revents == 0 {
            continue;
        }
        let len = usize::try_from(total - sent).unwrap_or(usize::MAX).min(WRITE);
        buf.clear();
        buf.extend((sent..sent + len as u64).map(byte));
        // SAFETY: `buf` is readable for its length.
        let n = unsafe { libc::send(s.as_raw_fd(), buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if let Ok(n) = u64::try_from(n) {
            sent += n;
        } else {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
    Ok(Wrote::All)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resume_blob_says_how_far_and_keeps_the_input() {
        let r = Resume { total: 10 << 20, sent: 3_000_001, keep_alive: true };
        assert_eq!(from_blob(blob(r, b"GET / HTTP/1.1\r\n")), (Some(r), b"GET / HTTP/1.1\r\n".to_vec()));
        // A plain blob (a request read ahead) stays what it is, as does anything malformed.
        for plain in [&b"GET / HTTP/1.1\r\n\r\n"[..], b"", b"\0download 5 6 1\n", b"\0download 5 5\n", b"\0download 5 5 2\n", b"\0download x y 1\n", b"\0download 1 1 1"] {
            assert_eq!(from_blob(plain.to_vec()), (None, plain.to_vec()));
        }
        assert_eq!(requested("/download/1048576"), Some(1 << 20));
        assert_eq!(requested("/download/x"), None);
        assert_eq!(requested("/"), None);
        assert_ne!(byte(0), byte(4096), "blocks differ");
    }
}
