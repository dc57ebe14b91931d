//! Blocking reads that carry on through a stop.
//!
//! A process that is stopped and continued (SIGSTOP then SIGCONT, or a frozen cgroup, as a
//! CI machine may do to its jobs) gets EINTR from a blocking socket call that has a timeout
//! (`SO_RCVTIMEO`), even with no signal handler: signal(7), "Interruption of system calls
//! and library functions by stop signals". The standard library's `read_exact`, `read_line`,
//! `read_to_end` and `write_all` try again; a bare `read` returns the error. Every client
//! socket of the tests has a timeout, so their bare reads go through [`read_some`].

use std::io::{ErrorKind, Read};

/// One `read` of `r` into `buf`, tried again when a stop interrupted it: its bytes, 0 at the
/// end, or any other error (a timeout is `WouldBlock` or `TimedOut`).
///
/// # Errors
/// As `read`'s, except `Interrupted`.
#[expect(clippy::disallowed_methods, reason = "the one bare read, which tries again after EINTR")]
pub fn read_some(r: &mut (impl Read + ?Sized), buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            got => return got,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader, Write as _},
        net::{TcpListener, TcpStream},
        process::{Command, Stdio},
        time::Duration,
    };

    use crate::http::expect_close;

    /// Set in the child that [`reads_carry_on_when_the_process_is_stopped_and_continued`]
    /// starts, which runs [`stopped_child`] only.
    const CHILD: &str = "RD_STOPPED_CHILD";

    /// The reads a test makes on its sockets (which all have timeouts) see neither EINTR nor a
    /// timeout when the test's process is stopped and continued while they wait. The reads run
    /// in a child process (this binary again, one test), so the stop reaches nothing else.
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
        // Each "waiting" comes just before a read that waits about a second for its data.
        for _ in 0..2 {
            let mut line = String::new();
            while !line.contains("waiting") {
                line.clear();
                if out.read_line(&mut line).expect("the child's output") == 0 {
                    break;
                }
                said.push(line.clone());
            }
            std::thread::sleep(Duration::from_millis(200));
            signal(libc::SIGSTOP);
            std::thread::sleep(Duration::from_millis(100));
            signal(libc::SIGCONT);
        }
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut rest);
        let done = child.wait_with_output().expect("the child's end");
        let said = format!("{}{rest}", said.concat());
        assert!(done.status.success(), "the child failed ({}):\n{said}\n{}", done.status, String::from_utf8_lossy(&done.stderr));
        assert_eq!(said.matches("waiting").count(), 2, "the child's two reads:\n{said}");
    }

    /// The child's part: two reads that wait for a peer which answers (then closes) after a
    /// second, while the parent stops and continues this process.
    #[test]
    fn stopped_child() {
        if std::env::var_os(CHILD).is_none() {
            return;
        }
        let listener = TcpListener::bind("127.0.0.1:0").expect("listen on loopback");
        let client = TcpStream::connect(listener.local_addr().expect("address")).expect("connect");
        client.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let (server, _) = listener.accept().expect("accept");
        let peer = std::thread::spawn(move || {
            let mut server = server;
            std::thread::sleep(Duration::from_secs(1));
            server.write_all(b"x").expect("the peer's byte");
            std::thread::sleep(Duration::from_secs(1));
        });
        let mut r = BufReader::new(client);

        println!("waiting for a byte");
        let mut b = [0u8; 1];
        let got = super::read_some(r.get_mut(), &mut b);
        assert!(matches!(got, Ok(1)) && b == *b"x", "read_some through a stop: {got:?}");

        println!("waiting for the end");
        let got = expect_close(&mut r);
        assert!(got.is_ok(), "expect_close through a stop: {got:?}");
        peer.join().expect("the peer");
    }
}
