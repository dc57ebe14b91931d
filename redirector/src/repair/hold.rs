//! Packets of frozen flows, kept and replayed: the origin's classifier drops a frozen flow's
//! packets (the dumped socket must not take them), and a dropped segment would cost the client
//! its retransmission timeout (200 ms or more, and its tail-loss probe is dropped too when
//! the freeze lasts). So while the flows are frozen, a packet socket on the uplink copies
//! their packets (it sees them before the classifier: taps come first), and once the
//! socket that takes the connection over is live they go to it: through the tunnel, as the
//! classifier would have sent them, when it is on another host ([`replay`]); to this host's own
//! stack when it is here ([`deliver`]: a connection that came home, or resumed after a move
//! that failed). Their TCP checksums are set (a copy may carry the partial one its sender's
//! offload left). Duplicates of what the dump already held are harmless (TCP drops them).

use std::{
    collections::HashSet,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, OwnedFd},
};

use crate::{sockopt, tunnel::Tunnel};

/// `PACKET_IGNORE_OUTGOING` (from `linux/if_packet.h`): our own packets are not copied back.
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
/// `PACKET_STATISTICS`: what the socket took and what it dropped, since the last read.
const PACKET_STATISTICS: libc::c_int = 6;
/// The copies' buffer: what arrives while flows are frozen waits here until the move ends (a
/// full buffer drops copies, and their senders wait for their retransmission timeouts). Only
/// what arrives is charged.
const KEEP_BYTES: libc::c_int = 32 << 20;

/// The kernel's `struct tpacket_stats`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Stats {
    packets: u32,
    drops: u32,
}

/// Copies of the packets of some flows arriving on one interface.
pub struct Hold {
    fd: OwnedFd,
    port: u16,
    /// A set: every packet is looked up, and a move may take thousands of flows.
    flows: HashSet<(SocketAddr, SocketAddr)>,
    /// Copies the kernel dropped (the buffer full), counted so far.
    lost: std::sync::atomic::AtomicU64,
}

/// TCP to `port` of either family, unfragmented IPv4 (the flows are told apart in user
/// space; the filter keeps the rest of the uplink's traffic out of the socket).
fn filter(port: u16) -> Vec<libc::sock_filter> {
    use sockopt::cbpf::{JEQ, JSET, LDB, LDH, LDH_IND, LDXB_MSH, RET, SKF_AD_PROTOCOL, op};
    let port = u32::from(port);
    vec![
        /* 0 */ op(LDH, 0, 0, SKF_AD_PROTOCOL),
        /* 1 */ op(JEQ, 0, 7, 0x0800),
        /* 2 */ op(LDB, 0, 0, 9),
        /* 3 */ op(JEQ, 0, 10, 6),
        /* 4 */ op(LDH, 0, 0, 6),
        // A fragment past the first: the classifier passes those, never frozen.
        /* 5 */ op(JSET, 8, 0, 0x1fff),
        /* 6 */ op(LDXB_MSH, 0, 0, 0),
        /* 7 */ op(LDH_IND, 0, 0, 2),
        /* 8 */ op(JEQ, 6, 5, port),
        /* 9 */ op(JEQ, 0, 4, 0x86dd),
        /* 10 */ op(LDB, 0, 0, 6),
        /* 11 */ op(JEQ, 0, 2, 6),
        /* 12 */ op(LDH, 0, 0, 42),
        /* 13 */ op(JEQ, 1, 0, port),
        /* 14 */ op(RET, 0, 0, 0),
        /* 15 */ op(RET, 0, 0, 0x0004_0000),
    ]
}

impl Hold {
    /// Starts copying the packets of `flows` (client, service; all to one service port)
    /// arriving on interface `dev`: before the flows are frozen, so none is missed.
    ///
    /// # Errors
    /// No such interface, the flows are not of one port, or the packet socket could not be
    /// made (`CAP_NET_RAW`).
    pub fn start(dev: &str, flows: &[(SocketAddr, SocketAddr)]) -> io::Result<Self> {
        let Some(port) = flows.first().map(|f| f.1.port()) else { return Err(io::Error::new(io::ErrorKind::InvalidInput, "no flows to hold")) };
        let mut hold = Self::open(dev, port)?;
        hold.watch(flows)?;
        Ok(hold)
    }

    /// Starts copying the packets to service port `port` arriving on interface `dev`, to
    /// keep those of the flows [`Hold::watch`] names. Closing a packet socket waits for the
    /// kernel's network-wide grace period (milliseconds): a move closes its copy after the
    /// move, off its way.
    ///
    /// # Errors
    /// No such interface, or the packet socket could not be made (`CAP_NET_RAW`).
    pub fn open(dev: &str, port: u16) -> io::Result<Self> {
        let index = nix::net::if_::if_nametoindex(dev).map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("interface {dev}: {e}")))?;
        let fd = sockopt::packet_socket(libc::ETH_P_ALL, &filter(port), Some(index))?;
        sockopt::set(&fd, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, &1)?;
        // Past the system's limit where allowed (CAP_NET_ADMIN, which moves need anyway).
        sockopt::receive_buffer(&fd, KEEP_BYTES)?;
        Ok(Self { fd, port, flows: HashSet::new(), lost: std::sync::atomic::AtomicU64::new(0) })
    }

    /// The flows (client, service; all to the port it copies) whose packets it keeps.
    ///
    /// # Errors
    /// A flow of another port.
    pub fn watch(&mut self, flows: &[(SocketAddr, SocketAddr)]) -> io::Result<()> {
        if flows.iter().any(|f| f.1.port() != self.port) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("flows of a service port other than {}", self.port)));
        }
        self.flows = flows.iter().copied().collect();
        Ok(())
    }

    /// The flows whose packets it keeps.
    pub fn flows(&self) -> impl Iterator<Item = (SocketAddr, SocketAddr)> + '_ {
        self.flows.iter().copied()
    }

    /// How many copies the kernel dropped so far, its buffer full (of any flow to the port:
    /// it cannot tell).
    #[must_use]
    pub fn lost(&self) -> u64 {
        self.count_lost();
        self.lost.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn count_lost(&self) {
        if let Ok(s) = sockopt::get::<Stats>(&self.fd, libc::SOL_PACKET, PACKET_STATISTICS) {
            self.lost.fetch_add(u64::from(s.drops), std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The packets of the flows copied so far (whole IP packets, in arrival order).
    ///
    /// # Errors
    /// Reading the packet socket failed.
    pub fn take(&self) -> io::Result<Vec<Vec<u8>>> {
        // Read before the queue is emptied: what it dropped, it dropped before.
        self.count_lost();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65_536];
        loop {
            // SAFETY: `buf` is writable for its length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            let Ok(n) = usize::try_from(n) else {
                let e = io::Error::last_os_error();
                return if e.kind() == io::ErrorKind::WouldBlock { Ok(out) } else { Err(e) };
            };
            let p = &buf[..n];
            if flow_of(p).is_some_and(|f| self.flows.contains(&f)) {
                let mut p = p.to_vec();
                // A copy taken on arrival may carry only the partial checksum its sender's
                // offload left (veth does): the receiver would drop it as corrupt.
                redirector_common::decide::set_tcp_checksum(&mut p);
                out.push(p);
            }
        }
    }
}

/// The (client, service) of a TCP packet, from its IP header on.
#[must_use]
pub fn flow_of(p: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    let port = |b: &[u8], at: usize| Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]));
    match p.first()? >> 4 {
        4 => {
            let ihl = usize::from(p[0] & 0x0f) * 4;
            let (s, d): ([u8; 4], [u8; 4]) = (p.get(12..16)?.try_into().ok()?, p.get(16..20)?.try_into().ok()?);
            Some((SocketAddr::new(IpAddr::V4(Ipv4Addr::from(s)), port(p, ihl)?), SocketAddr::new(IpAddr::V4(Ipv4Addr::from(d)), port(p, ihl + 2)?)))
        }
        6 => {
            let (s, d): ([u8; 16], [u8; 16]) = (p.get(8..24)?.try_into().ok()?, p.get(24..40)?.try_into().ok()?);
            Some((SocketAddr::new(IpAddr::V6(Ipv6Addr::from(s)), port(p, 40)?), SocketAddr::new(IpAddr::V6(Ipv6Addr::from(d)), port(p, 42)?)))
        }
        _ => None,
    }
}

/// Sends `packets` (whole IP packets of one family) to `target` through the tunnel from
/// `tunnel_src`, as the origin's classifier forwards a moved flow: IP-in-IP, or
/// IPv6-in-IPv6. Returns how many went.
///
/// # Errors
/// The raw socket could not be made (`CAP_NET_RAW`) or bound, or a send failed.
pub fn replay(packets: &[Vec<u8>], tunnel_src: IpAddr, target: IpAddr) -> io::Result<usize> {
    if packets.is_empty() {
        return Ok(0);
    }
    let tunnel = Tunnel::open(tunnel_src, target)?;
    for p in packets {
        tunnel.send(p)?;
    }
    Ok(packets.len())
}

/// Delivers `packets` (whole IP packets, each to an address of this host) to this host's own
/// stack, as if they had just arrived: the kept packets of connections restored here. A raw
/// socket's packet to a local address loops back and is received like any other, to the
/// socket of its 4-tuple. Returns how many went.
///
/// # Errors
/// The raw socket could not be made (`CAP_NET_RAW`), or a send failed.
pub fn deliver(packets: &[Vec<u8>]) -> io::Result<usize> {
    let mut sockets: [Option<OwnedFd>; 2] = [None, None];
    let mut sent = 0;
    for p in packets {
        let Some((_, to)) = flow_of(p) else { continue };
        let slot = usize::from(to.is_ipv6());
        let fd = match &mut sockets[slot] {
            Some(fd) => fd,
            empty => {
                let domain = if to.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
                // IPPROTO_RAW: the packet brings its own IP header (both families).
                let fd = sockopt::socket(domain, libc::SOCK_RAW, libc::IPPROTO_RAW).map_err(|e| io::Error::new(e.kind(), format!("opening a raw socket (CAP_NET_RAW): {e}")))?;
                empty.insert(fd)
            }
        };
        let dst = nix::sys::socket::SockaddrStorage::from(SocketAddr::new(to.ip(), 0));
        nix::sys::socket::sendto(fd.as_raw_fd(), p, &dst, nix::sys::socket::MsgFlags::empty())
            .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("delivering a kept packet to {to}: {e}")))?;
        sent += 1;
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_are_read_from_both_families() {
        let mut v4 = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, 6, 0, 0, 198, 18, 1, 5, 198, 18, 0, 10];
        v4.extend([0x9c, 0x40, 0, 80]);
        assert_eq!(flow_of(&v4), Some(("198.18.1.5:40000".parse().unwrap(), "198.18.0.10:80".parse().unwrap())));
        let mut v6 = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
        v6.extend("2001:db8::1:5".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend("2001:db8::10".parse::<Ipv6Addr>().unwrap().octets());
        v6.extend([0x9c, 0x40, 0, 80]);
        assert_eq!(flow_of(&v6), Some(("[2001:db8::1:5]:40000".parse().unwrap(), "[2001:db8::10]:80".parse().unwrap())));
        assert_eq!(flow_of(&v4[..22]), None, "truncated");
        assert_eq!(flow_of(&[]), None);
    }
}
