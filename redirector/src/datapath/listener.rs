//! Finding a listening socket of another process by its local address, and duplicating it
//! (`pidfd_getfd`) so the `sk_lookup` program can hand connections to it.

use std::{
    fs,
    net::{IpAddr, SocketAddr},
    os::fd::{FromRawFd as _, OwnedFd},
};

use super::{Error, Result};

/// A local application's listening socket: where it listens, and the process that most likely
/// holds it (the application registered on the hook for that service), searched before all
/// the others. Searching every process's descriptors took 2.4 ms with about a hundred
/// processes (the test VM), and more with more: a volunteer does it inside the freeze of the
/// connections moving to it, when it first adopts a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    pub addr: (IpAddr, u16),
    pub holder: Option<i32>,
}

impl Listener {
    /// The socket listening at `at`, most likely held by process `holder`.
    #[must_use]
    pub fn new(at: SocketAddr, holder: Option<i32>) -> Self {
        Self { addr: (at.ip(), at.port()), holder }
    }
}

/// Duplicates the listening socket of `l` out of the process that holds it.
pub fn find(l: Listener) -> Result<OwnedFd> {
    let (addr, port) = l.addr;
    let inode = super::netlink::listening_inode(addr, port)?;
    let target = format!("socket:[{inode}]");
    if let Some(pid) = l.holder
        && let Some(fd) = held_by(pid, &target)
    {
        return steal(pid, fd);
    }
    let procs = fs::read_dir("/proc").map_err(|e| Error::io("listing /proc", e))?;
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else { continue };
        if Some(pid) == l.holder {
            continue;
        }
        if let Some(fd) = held_by(pid, &target) {
            return steal(pid, fd);
        }
    }
    Err(Error::invalid(format!("no process holds the listener on {}", super::types::sock(addr, port))))
}

/// The descriptor of process `pid` that is `target` (`socket:[inode]`), if it has one.
fn held_by(pid: i32, target: &str) -> Option<i32> {
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    fds.flatten().filter(|fd| fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == target)).find_map(|fd| fd.file_name().to_string_lossy().parse().ok())
}

fn steal(pid: i32, fd: i32) -> Result<OwnedFd> {
    // SAFETY: plain syscalls; the returned descriptors are owned here.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if pidfd < 0 {
            return Err(Error::io(format!("pidfd_open({pid})"), std::io::Error::last_os_error()));
        }
        let pidfd = OwnedFd::from_raw_fd(i32::try_from(pidfd).unwrap_or(-1));
        let dup = libc::syscall(libc::SYS_pidfd_getfd, std::os::fd::AsRawFd::as_raw_fd(&pidfd), fd, 0);
        if dup < 0 {
            return Err(Error::io(format!("pidfd_getfd(pid {pid}, fd {fd})"), std::io::Error::last_os_error()));
        }
        Ok(OwnedFd::from_raw_fd(i32::try_from(dup).unwrap_or(-1)))
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{Ipv4Addr, TcpListener},
        os::fd::AsRawFd as _,
    };

    use super::*;

    /// The local address of socket `fd`.
    fn local(fd: &OwnedFd) -> SocketAddr {
        TcpListener::from(fd.try_clone().unwrap()).local_addr().unwrap()
    }

    #[test]
    fn a_listener_is_found_in_its_holder_and_without_one_or_with_a_wrong_one() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("skipped: needs root (pidfd_getfd of any process, sock_diag)");
            return;
        }
        let held = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let at = held.local_addr().unwrap();
        let me = i32::try_from(std::process::id()).unwrap();
        for holder in [Some(me), None, Some(1)] {
            let fd = find(Listener::new(at, holder)).unwrap_or_else(|e| panic!("holder {holder:?}: {e}"));
            assert_ne!(fd.as_raw_fd(), held.as_raw_fd(), "a duplicate");
            assert_eq!(local(&fd), at, "holder {holder:?}");
        }
        drop(held);
        assert!(find(Listener::new(at, Some(me))).is_err(), "nobody listens there any more");
    }
}
