//! Sending a packet through the tunnel from user space, as the origin's classifier forwards
//! one: a whole inner IP packet in IP-in-IP (IPv4) or IPv6-in-IPv6, from this node's tunnel
//! source to a target. The readiness probe (`datapath::probe`) and the replay of a frozen
//! flow's packets (`repair::replay`) send so.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, OwnedFd},
};

use nix::sys::socket::{MsgFlags, SockaddrStorage, bind, sendto};

use crate::sockopt;

/// A raw socket sending into the tunnel to one target.
pub struct Tunnel {
    fd: OwnedFd,
    to: SockaddrStorage,
    target: IpAddr,
}

impl Tunnel {
    /// A tunnel from `src` (a local address the target accepts tunnels from) to `target`.
    ///
    /// # Errors
    /// The families differ, or the raw socket could not be made (`CAP_NET_RAW`) or bound.
    pub fn open(src: IpAddr, target: IpAddr) -> io::Result<Self> {
        if src.is_ipv4() != target.is_ipv4() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("tunnel source {src} and target {target} are of different families")));
        }
        let (domain, proto) = if target.is_ipv4() { (libc::AF_INET, libc::IPPROTO_IPIP) } else { (libc::AF_INET6, libc::IPPROTO_IPV6) };
        let fd = sockopt::socket(domain, libc::SOCK_RAW, proto).map_err(|e| io::Error::new(e.kind(), format!("opening a raw tunnel socket (CAP_NET_RAW): {e}")))?;
        bind(fd.as_raw_fd(), &SockaddrStorage::from(SocketAddr::new(src, 0)))
            .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("binding the tunnel socket to the tunnel source {src}: {e}")))?;
        Ok(Self { fd, to: SockaddrStorage::from(SocketAddr::new(target, 0)), target })
    }

    /// Sends `packet` (a whole IP packet of the tunnel's family) to the target.
    ///
    /// # Errors
    /// The kernel's.
    pub fn send(&self, packet: &[u8]) -> io::Result<()> {
        sendto(self.fd.as_raw_fd(), packet, &self.to, MsgFlags::empty())
            .map(drop)
            .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("sending to {} through the tunnel: {e}", self.target)))
    }
}
