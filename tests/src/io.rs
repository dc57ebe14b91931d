//! Blocking reads that carry on through a stop, and still time out when they should.
//!
//! A process that is stopped and continued (SIGSTOP then SIGCONT, or a frozen cgroup, as a
//! CI machine may do to its jobs) gets EINTR from a blocking socket call that has a timeout
//! (`SO_RCVTIMEO`), even with no signal handler: signal(7), "Interruption of system calls
//! and library functions by stop signals". A bare `read` returns that error. The standard
//! library's `read_line`, `read_exact` and `read_to_end` read again, but with the whole
//! timeout again: stopped every few seconds, a read of a peer that died would wait for ever.
//! So the tests read their sockets through [`Patient`] (or [`read_some`]), which reads again
//! with what is left of the timeout; clippy refuses a bare `read` in `tests/`
//! (`tests/clippy.toml`), and a `BufReader` of a socket wraps a [`Patient`].

use std::{
    io::{ErrorKind, Read},
    os::fd::{AsFd, BorrowedFd},
    time::{Duration, Instant},
};

use nix::sys::{
    socket::{getsockopt, setsockopt, sockopt::ReceiveTimeout},
    time::{TimeVal, TimeValLike as _},
};

/// A socket whose reads keep their timeout (`SO_RCVTIMEO`) through stops: a read interrupted
/// by one reads again for what is left of the timeout, then times out (`WouldBlock`, as the
/// kernel's timeout). Its other errors, its bytes and its end are the socket's.
pub struct Patient<S>(pub S);

impl<S: Read + AsFd> Read for Patient<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let start = Instant::now();
        // The socket's own timeout, once a stop shortened it: put back before returning.
        let mut own: Option<Duration> = None;
        let got = loop {
            #[expect(clippy::disallowed_methods, reason = "the bare read that EINTR comes back from")]
            match self.0.read(buf) {
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                got => break got,
            }
            let timeout = match own {
                Some(t) => t,
                None => match read_timeout(self.0.as_fd()) {
                    Ok(Some(t)) => *own.insert(t),
                    // No timeout: nothing to keep, just read again.
                    Ok(None) => continue,
                    Err(e) => break Err(e),
                },
            };
            let left = timeout.saturating_sub(start.elapsed());
            if left < Duration::from_micros(1) {
                break Err(ErrorKind::WouldBlock.into());
            }
            if let Err(e) = set_read_timeout(self.0.as_fd(), left) {
                break Err(e);
            }
        };
        match own {
            Some(t) => set_read_timeout(self.0.as_fd(), t).and(got),
            None => got,
        }
    }
}

/// One read of socket `s` into `buf` through [`Patient`]: its bytes, 0 at its end, or an
/// error (a timeout is `WouldBlock` or `TimedOut`; never `Interrupted`).
///
/// # Errors
/// As `read`'s, except `Interrupted`.
#[expect(clippy::disallowed_methods, reason = "a Patient's read")]
pub fn read_some<S: Read + AsFd>(s: &mut S, buf: &mut [u8]) -> std::io::Result<usize> {
    Patient(s).read(buf)
}

/// The socket's receive timeout (`None`: it has none).
fn read_timeout(fd: BorrowedFd<'_>) -> std::io::Result<Option<Duration>> {
    let t = getsockopt(&fd, ReceiveTimeout)?;
    let us = u64::try_from(t.num_microseconds()).unwrap_or(0);
    Ok((us > 0).then(|| Duration::from_micros(us)))
}

fn set_read_timeout(fd: BorrowedFd<'_>, t: Duration) -> std::io::Result<()> {
    let us = i64::try_from(t.as_micros()).unwrap_or(i64::MAX).max(1);
    Ok(setsockopt(&fd, ReceiveTimeout, &TimeVal::microseconds(us))?)
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader, Write as _},
        net::{TcpListener, TcpStream},
        process::{Command, Stdio},
        time::{Duration, Instant},
    };

    use super::{Patient, read_some};
    use crate::http::expect_close;

    /// Set in the child that [`reads_carry_on_when_the_process_is_stopped_and_continued`]
    /// starts, which runs [`stopped_child`] only.
    const CHILD: &str = "RD_STOPPED_CHILD";

    /// The reads a test makes on its sockets (which all have timeouts) see neither EINTR nor a
    /// late timeout when the test's process is stopped and continued while they wait, and
    /// still time out when nothing comes. The reads run in a child process (this binary
    /// again, one test), so the stops reach nothing else.
    #[test]
    fn reads_carry_on_when_the_process_is_stopped_and_continued() {
        if std::env::var_os(CHILD).is_some() {
            return;
        }
        let exe = std::env::current_exe().expect("this test binary");
        let mut child = Command::new(exe)
            .args(["--exact", "io::tests::stopped_child", "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the child");
        let pid = libc::pid_t::try_from(child.id()).expect("pid");
        // SAFETY: a signal to our own child, not yet reaped.
        let signal = |sig| assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "signal {sig} to the child");
        let mut out = BufReader::new(child.stdout.take().expect("stdout"));
        let mut said = Vec::new();
        // Each "waiting" comes just before a read that waits about a second: stopped three
        // times meanwhile, for 50 ms each.
        for _ in 0..3 {
            let mut line = String::new();
            while !line.contains("waiting") {
                line.clear();
                if out.read_line(&mut line).expect("the child's output") == 0 {
                    break;
                }
                said.push(line.clone());
            }
            for _ in 0..3 {
                std::thread::sleep(Duration::from_millis(200));
                signal(libc::SIGSTOP);
                std::thread::sleep(Duration::from_millis(50));
                signal(libc::SIGCONT);
            }
        }
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut rest);
        let done = child.wait_with_output().expect("the child's end");
        let said = format!("{}{rest}", said.concat());
        assert!(done.status.success(), "the child failed ({}):\n{said}\n{}", done.status, String::from_utf8_lossy(&done.stderr));
        assert_eq!(said.matches("waiting").count(), 3, "the child's three reads:\n{said}");
    }

    /// The child's part: a read that waits a second for a byte, one that waits a second more
    /// for the peer's end, and one that waits for nothing (1 s timeout), while the parent
    /// stops and continues this process.
    #[test]
    fn stopped_child() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen on loopback");
        let addr = listener.local_addr().expect("address");
        let client = TcpStream::connect(addr).expect("connect");
        client.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let (server, _) = listener.accept().expect("accept");
        let peer = std::thread::spawn(move || {
            let mut server = server;
            std::thread::sleep(Duration::from_secs(1));
            server.write_all(b"x").expect("the peer's byte");
            std::thread::sleep(Duration::from_secs(1));
        });
        let mut c = client.try_clone().expect("clone");
        let mut r = BufReader::new(Patient(client));

        println!("waiting for a byte");
        let mut b = [0u8; 1];
        let got = read_some(&mut c, &mut b);
        assert!(matches!(got, Ok(1)) && b == *b"x", "read_some through a stop: {got:?}");

        println!("waiting for the end");
        let got = expect_close(&mut r);
        assert!(got.is_ok(), "expect_close through a stop: {got:?}");
        peer.join().expect("the peer");

        let mut quiet = TcpStream::connect(addr).expect("connect");
        let _kept = listener.accept().expect("accept");
        quiet.set_read_timeout(Some(Duration::from_secs(1))).expect("timeout");
        println!("waiting for nothing");
        let t0 = Instant::now();
        let got = read_some(&mut quiet, &mut b);
        let took = t0.elapsed();
        assert!(matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock), "read_some of nothing: {got:?}");
        // Without the stops, 1 s; with each stop starting the timeout again, 1.65 s at least.
        assert!(took < Duration::from_millis(1400), "the 1 s timeout kept through three stops: it took {took:?}");
        let own = quiet.read_timeout().expect("the timeout");
        assert_eq!(own, Some(Duration::from_secs(1)), "the socket's own timeout is back");
    }
}
