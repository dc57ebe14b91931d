//! The direct-server-return probe (`redirector doctor`): one UDP datagram a sibling sends
//! with this server's service address as its source, to this server's own address. If it
//! arrives, the network between them lets a volunteer answer clients as this server (the
//! same spoofed source its replies carry). Both ends are here: [`send`] (the sibling's agent)
//! and [`Capture`] (the doctor on this server).
//!
//! The datagram is seen with a packet socket, before the IP layer: a packet whose source is
//! one of the receiver's own addresses is dropped there as a martian, so no UDP socket could
//! read it.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use crate::sockopt;

/// What the datagram carries: this, then the token (8 bytes, big-endian).
const MAGIC: &[u8; 16] = b"redirector-probe";

fn payload(token: u64) -> Vec<u8> {
    let mut p = MAGIC.to_vec();
    p.extend_from_slice(&token.to_be_bytes());
    p
}

/// Sends the probe datagram holding `token` from `source` (an address of another node: the
/// socket is transparent, which takes `CAP_NET_ADMIN`) to `to`.
///
/// # Errors
/// The socket could not be made, bound to `source` or send (the reason from the kernel).
pub fn send(source: IpAddr, to: SocketAddr, token: u64) -> io::Result<()> {
    if source.is_ipv4() != to.is_ipv4() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{source} and {to} are of different families")));
    }
    let fd = sockopt::socket(if source.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 }, libc::SOCK_DGRAM, 0)?;
    let (level, name) = if source.is_ipv4() { (libc::SOL_IP, libc::IP_TRANSPARENT) } else { (libc::SOL_IPV6, libc::IPV6_TRANSPARENT) };
    let one: libc::c_int = 1;
    sockopt::set(&fd, level, name, &one).map_err(|e| io::Error::new(e.kind(), format!("making the socket transparent (CAP_NET_ADMIN): {e}")))?;
    nix::sys::socket::bind(fd.as_raw_fd(), &nix::sys::socket::SockaddrStorage::from(SocketAddr::new(source, 0)))
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("binding to {source}: {e}")))?;
    std::net::UdpSocket::from(fd).send_to(&payload(token), to).map_err(|e| io::Error::new(e.kind(), format!("sending to {to}: {e}")))?;
    Ok(())
}

/// Watches every interface of this network namespace for the probe datagrams of one family
/// to one UDP port (a classic BPF filter keeps everything else out of the socket).
pub struct Capture {
    fd: OwnedFd,
    v4: bool,
    port: u16,
}

/// The filter: UDP to `port`, unfragmented (IPv4; the packet socket delivers from the
/// network header on).
fn filter(v4: bool, port: u16) -> Vec<libc::sock_filter> {
    use sockopt::cbpf::{JEQ, JSET, LDB, LDH, LDH_IND, LDXB_MSH, RET, op};
    let port = u32::from(port);
    if v4 {
        vec![
            op(LDB, 0, 0, 9),
            op(JEQ, 0, 5, 17),
            op(LDH, 0, 0, 6),
            op(JSET, 3, 0, 0x1fff),
            op(LDXB_MSH, 0, 0, 0),
            op(LDH_IND, 0, 0, 2),
            op(JEQ, 1, 0, port),
            op(RET, 0, 0, 0),
            op(RET, 0, 0, 0xffff),
        ]
    } else {
        vec![op(LDB, 0, 0, 6), op(JEQ, 0, 2, 17), op(LDH, 0, 0, 42), op(JEQ, 1, 0, port), op(RET, 0, 0, 0), op(RET, 0, 0, 0xffff)]
    }
}

impl Capture {
    /// Starts watching for IPv4 (`v4`) or IPv6 datagrams to `port` (takes `CAP_NET_RAW`).
    ///
    /// # Errors
    /// The packet socket could not be opened or filtered.
    pub fn open(v4: bool, port: u16) -> io::Result<Self> {
        let fd = sockopt::packet_socket(if v4 { libc::ETH_P_IP } else { libc::ETH_P_IPV6 }, &filter(v4, port), None)?;
        Ok(Self { fd, v4, port })
    }

    /// Whether the probe holding `token` from `source` arrives within `timeout`.
    ///
    /// # Errors
    /// Reading the packet socket failed.
    pub fn wait(&self, source: IpAddr, token: u64, timeout: Duration) -> io::Result<bool> {
        let want = payload(token);
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 2048];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&raw mut pfd, 1, ms) };
            if ready < 0 {
                return Err(io::Error::last_os_error());
            }
            if ready == 0 {
                continue;
            }
            // SAFETY: `buf` is writable for its length.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
            let Ok(n) = usize::try_from(n) else { return Err(io::Error::last_os_error()) };
            if self.is_probe(&buf[..n], source, &want) {
                return Ok(true);
            }
        }
    }

    /// Whether `packet` (from its IP header on) is the probe: UDP from `source` to our port,
    /// carrying `want`.
    fn is_probe(&self, packet: &[u8], source: IpAddr, want: &[u8]) -> bool {
        let (src, udp): (IpAddr, &[u8]) = if self.v4 {
            let Some(&first) = packet.first() else { return false };
            let ihl = usize::from(first & 0x0f) * 4;
            if packet.len() < ihl + 8 || ihl < 20 || packet[9] != 17 {
                return false;
            }
            let s: [u8; 4] = packet[12..16].try_into().expect("4 bytes");
            (IpAddr::V4(Ipv4Addr::from(s)), &packet[ihl..])
        } else {
            if packet.len() < 48 || packet[6] != 17 {
                return false;
            }
            let s: [u8; 16] = packet[8..24].try_into().expect("16 bytes");
            (IpAddr::V6(Ipv6Addr::from(s)), &packet[40..])
        };
        src == source && u16::from_be_bytes([udp[2], udp[3]]) == self.port && udp.get(8..) == Some(want)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_is_recognised_only_from_its_source_to_its_port_with_its_token() {
        let c = Capture { fd: sockopt::socket(libc::AF_INET, libc::SOCK_DGRAM, 0).unwrap(), v4: true, port: 4000 };
        let source: IpAddr = "198.18.0.10".parse().unwrap();
        let packet = |src: [u8; 4], port: u16, token: u64| {
            let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
            p.extend(src);
            p.extend([198, 18, 0, 1]);
            p.extend([0x9c, 0x40]);
            p.extend(port.to_be_bytes());
            p.extend([0, 0, 0, 0]);
            p.extend(payload(token));
            p
        };
        let want = payload(7);
        assert!(c.is_probe(&packet([198, 18, 0, 10], 4000, 7), source, &want));
        assert!(!c.is_probe(&packet([198, 18, 0, 11], 4000, 7), source, &want), "another source");
        assert!(!c.is_probe(&packet([198, 18, 0, 10], 4001, 7), source, &want), "another port");
        assert!(!c.is_probe(&packet([198, 18, 0, 10], 4000, 8), source, &want), "another token");
        assert!(!c.is_probe(&[0x45, 0, 0], source, &want), "a short packet");
    }
}
