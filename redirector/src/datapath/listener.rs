//! Finding a listening socket of another process by its local address, and duplicating it
//! (`pidfd_getfd`) so the `sk_lookup` program can hand connections to it.

use std::{
    fs,
    net::IpAddr,
    os::fd::{FromRawFd as _, OwnedFd},
};

use super::{Error, Result};

/// Duplicates the listening socket bound to `addr:port` out of the process that holds it.
pub fn find(addr: IpAddr, port: u16) -> Result<OwnedFd> {
    let inode = super::netlink::listening_inode(addr, port)?;
    let target = format!("socket:[{inode}]");
    let procs = fs::read_dir("/proc").map_err(|e| Error::io("listing /proc", e))?;
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(fds) = fs::read_dir(p.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            if fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == target) {
                let Ok(n) = fd.file_name().to_string_lossy().parse::<i32>() else { continue };
                return steal(pid, n);
            }
        }
    }
    Err(Error::invalid(format!("no process holds the listener on {}", super::types::sock(addr, port))))
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
