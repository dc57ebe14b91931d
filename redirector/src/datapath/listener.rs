//! Finding a listening socket of another process by its local address, and duplicating it
//! (`pidfd_getfd`) so the `sk_lookup` program can hand connections to it.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{FromRawFd as _, OwnedFd},
};

use super::{Error, Result};

const TCP_LISTEN: &str = "0A";

/// Parses one address of /proc/net/tcp{,6} (hex, host-order words) and port.
#[expect(clippy::many_single_char_names, reason = "address, port, bytes, index, word")]
fn parse_proc_addr(s: &str) -> Option<(IpAddr, u16)> {
    let (a, p) = s.split_once(':')?;
    let port = u16::from_str_radix(p, 16).ok()?;
    let addr = match a.len() {
        8 => IpAddr::V4(Ipv4Addr::from(u32::from_str_radix(a, 16).ok()?.to_ne_bytes())),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                let w = u32::from_str_radix(&a[i * 8..i * 8 + 8], 16).ok()?;
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some((addr, port))
}

/// Inode of the listening TCP socket bound exactly to `addr:port` in this namespace.
pub fn listening_inode(addr: IpAddr, port: u16) -> Result<u64> {
    let file = if addr.is_ipv4() { "/proc/net/tcp" } else { "/proc/net/tcp6" };
    let text = fs::read_to_string(file).map_err(|e| Error::io(format!("reading {file}"), e))?;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[3] != TCP_LISTEN {
            continue;
        }
        if parse_proc_addr(f[1]) == Some((addr, port)) {
            return f[9].parse().map_err(|_| Error::invalid(format!("bad inode in {file}")));
        }
    }
    Err(Error::invalid(format!("no TCP socket listens on {} in this network namespace", super::types::sock(addr, port))))
}

/// Duplicates the listening socket bound to `addr:port` out of the process that holds it.
pub fn find(addr: IpAddr, port: u16) -> Result<OwnedFd> {
    let inode = listening_inode(addr, port)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_addresses_parse() {
        // 198.18.0.2:80 as the kernel prints it on little-endian hosts.
        let v4 = u32::from_ne_bytes([198, 18, 0, 2]);
        assert_eq!(parse_proc_addr(&format!("{v4:08X}:0050")), Some((IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2)), 80)));
        assert_eq!(parse_proc_addr("zz:0050"), None);
        assert_eq!(parse_proc_addr("00000000"), None);
    }
}
