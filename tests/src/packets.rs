//! Crafting Ethernet/IP/TCP/ICMP packets with valid checksums, for the classifier tests, the
//! pitfall tests and the benchmark.
#![allow(clippy::cast_possible_truncation, clippy::many_single_char_names, reason = "test packets are small; short names follow the header field names")]

use std::net::{Ipv4Addr, Ipv6Addr};

pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const RST: u8 = 0x04;
pub const ACK: u8 = 0x10;

/// The destination: `BPF_PROG_TEST_RUN` runs a packet as received by the loopback device,
/// whose address is all zeros; a frame for another address is another host's
/// (`PACKET_OTHERHOST`), which the classifier leaves to the stack ([`for_another_host`]).
const MAC_HERE: [u8; 6] = [0; 6];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];

/// Source and destination of a packet.
#[derive(Clone, Copy)]
pub enum Ip {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

/// A packet under construction.
pub struct Pkt {
    ip: Ip,
    proto: u8,
    sport: u16,
    dport: u16,
    flags: u8,
    mss: Option<u16>,
    options: Option<Vec<u8>>,
    payload: Vec<u8>,
    frag: u16,
    ip_options: bool,
    ext: Option<u8>,
    seq: u32,
    ack: u32,
}

fn sum16(mut sum: u32, b: &[u8]) -> u32 {
    for c in b.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo(ip: Ip, proto: u8, len: usize) -> u32 {
    match ip {
        Ip::V4(s, d) => sum16(sum16(0, &s.octets()), &d.octets()) + u32::from(proto) + len as u32,
        Ip::V6(s, d) => sum16(sum16(0, &s.octets()), &d.octets()) + u32::from(proto) + len as u32,
    }
}

fn eth(ethertype: u16) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&MAC_HERE);
    v.extend_from_slice(&MAC_B);
    v.extend_from_slice(&ethertype.to_be_bytes());
    v
}

fn ipv4_header(s: Ipv4Addr, d: Ipv4Addr, proto: u8, payload_len: usize, frag: u16, options: bool) -> Vec<u8> {
    let hl = if options { 24 } else { 20 };
    let mut h = vec![0u8; hl];
    h[0] = 0x40 | (hl / 4) as u8;
    h[2..4].copy_from_slice(&((hl + payload_len) as u16).to_be_bytes());
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&s.octets());
    h[16..20].copy_from_slice(&d.octets());
    if options {
        h[20] = 1; // NOPs
        h[21] = 1;
        h[22] = 1;
        h[23] = 0;
    }
    let c = fold(sum16(0, &h));
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h
}

fn ipv6_header(s: Ipv6Addr, d: Ipv6Addr, next: u8, payload_len: usize) -> Vec<u8> {
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(payload_len as u16).to_be_bytes());
    h[6] = next;
    h[7] = 64;
    h[8..24].copy_from_slice(&s.octets());
    h[24..40].copy_from_slice(&d.octets());
    h
}

impl Pkt {
    pub fn tcp(ip: Ip, sport: u16, dport: u16, flags: u8) -> Self {
        Self { ip, proto: 6, sport, dport, flags, mss: None, options: None, payload: Vec::new(), frag: 0, ip_options: false, ext: None, seq: 0x1000_0000, ack: 0x2000_0000 }
    }

    pub fn udp(ip: Ip, sport: u16, dport: u16) -> Self {
        Self { proto: 17, ..Self::tcp(ip, sport, dport, 0) }
    }

    pub fn mss(mut self, mss: u16) -> Self {
        self.mss = Some(mss);
        self
    }

    /// These TCP option bytes (a multiple of 4) instead of Linux's layout with [`Pkt::mss`].
    pub fn tcp_options(mut self, options: &[u8]) -> Self {
        assert!(options.len().is_multiple_of(4) && options.len() <= 40, "TCP options come in words, at most 40 bytes");
        self.options = Some(options.to_vec());
        self
    }

    pub fn seq(mut self, seq: u32) -> Self {
        self.seq = seq;
        self
    }

    /// The acknowledgment number (sent when the flags have ACK).
    pub fn ack(mut self, ack: u32) -> Self {
        self.ack = ack;
        self
    }

    pub fn payload(mut self, p: &[u8]) -> Self {
        self.payload = p.to_vec();
        self
    }

    pub fn more_fragments(mut self) -> Self {
        self.frag |= 0x2000;
        self
    }

    pub fn frag_offset(mut self, off: u16) -> Self {
        self.frag |= off & 0x1fff;
        self
    }

    pub fn ip_options(mut self) -> Self {
        self.ip_options = true;
        self
    }

    /// An IPv6 extension header of type `next` (8 bytes) before the transport header.
    pub fn ext_header(mut self, next: u8) -> Self {
        self.ext = Some(next);
        self
    }

    fn l4(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        if self.proto == 17 {
            l4.extend_from_slice(&self.sport.to_be_bytes());
            l4.extend_from_slice(&self.dport.to_be_bytes());
            l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
            l4.extend_from_slice(&self.payload);
            return l4;
        }
        let opts: Vec<u8> = match (&self.options, self.mss) {
            (Some(o), _) => o.clone(),
            // MSS, then SACK-permitted, timestamps and window scale as Linux sends them.
            (None, Some(m)) => {
                let mut o = vec![2, 4];
                o.extend_from_slice(&m.to_be_bytes());
                o.extend_from_slice(&[4, 2, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0, 1, 3, 3, 7]);
                o
            }
            (None, None) => Vec::new(),
        };
        let doff = (20 + opts.len()) / 4;
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        l4.extend_from_slice(&self.seq.to_be_bytes());
        l4.extend_from_slice(&(if self.flags & ACK != 0 { self.ack } else { 0 }).to_be_bytes());
        l4.push((doff as u8) << 4);
        l4.push(self.flags);
        l4.extend_from_slice(&64240u16.to_be_bytes());
        l4.extend_from_slice(&[0, 0, 0, 0]);
        l4.extend_from_slice(&opts);
        l4.extend_from_slice(&self.payload);
        let c = fold(sum16(pseudo(self.ip, 6, l4.len()), &l4));
        l4[16..18].copy_from_slice(&c.to_be_bytes());
        l4
    }

    /// The packet without its Ethernet header.
    pub fn build_ip(&self) -> Vec<u8> {
        self.build()[14..].to_vec()
    }

    /// The Ethernet frame.
    pub fn build(&self) -> Vec<u8> {
        let l4 = self.l4();
        match self.ip {
            Ip::V4(s, d) => {
                let mut p = eth(0x0800);
                p.extend(ipv4_header(s, d, self.proto, l4.len(), self.frag, self.ip_options));
                p.extend(l4);
                p
            }
            Ip::V6(s, d) => {
                let mut p = eth(0x86dd);
                match self.ext {
                    None => p.extend(ipv6_header(s, d, self.proto, l4.len())),
                    Some(next) => {
                        p.extend(ipv6_header(s, d, next, l4.len() + 8));
                        p.extend_from_slice(&[self.proto, 0, 0, 0, 0, 0, 0, 0]);
                    }
                }
                p.extend(l4);
                p
            }
        }
    }
}

pub fn arp() -> Vec<u8> {
    let mut p = eth(0x0806);
    p.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    p.extend_from_slice(&[0; 20]);
    p
}

/// The MSS option of a TCP segment (starting at its IP header).
pub fn tcp_mss(ip_packet: &[u8]) -> Option<u16> {
    let (l4, _) = split_l4(ip_packet);
    let doff = usize::from(l4[12] >> 4) * 4;
    let opts = &l4[20..doff];
    let mut i = 0;
    while i < opts.len() {
        match opts[i] {
            0 => return None,
            1 => i += 1,
            2 => return Some(u16::from_be_bytes([opts[i + 2], opts[i + 3]])),
            _ => i += usize::from(opts[i + 1]).max(2),
        }
    }
    None
}

fn split_l4(ip_packet: &[u8]) -> (&[u8], Ip) {
    if ip_packet[0] >> 4 == 4 {
        let hl = usize::from(ip_packet[0] & 0xf) * 4;
        let s = Ipv4Addr::new(ip_packet[12], ip_packet[13], ip_packet[14], ip_packet[15]);
        let d = Ipv4Addr::new(ip_packet[16], ip_packet[17], ip_packet[18], ip_packet[19]);
        (&ip_packet[hl..], Ip::V4(s, d))
    } else {
        let s: [u8; 16] = ip_packet[8..24].try_into().unwrap();
        let d: [u8; 16] = ip_packet[24..40].try_into().unwrap();
        (&ip_packet[40..], Ip::V6(s.into(), d.into()))
    }
}

/// The TCP header fields of a segment, as read back from the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub src: std::net::SocketAddr,
    pub dst: std::net::SocketAddr,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
}

/// The TCP segment in `ip_packet` (starting at its IP header, IPv4 without options or IPv6
/// without extension headers), if it is one.
#[must_use]
pub fn tcp_segment(ip_packet: &[u8]) -> Option<Segment> {
    let v4 = ip_packet.first()? >> 4 == 4;
    let (proto, hl) = if v4 { (*ip_packet.get(9)?, usize::from(ip_packet[0] & 0xf) * 4) } else { (*ip_packet.get(6)?, 40) };
    if proto != 6 || ip_packet.len() < hl + 20 {
        return None;
    }
    let (l4, ip) = split_l4(ip_packet);
    let (s, d): (std::net::IpAddr, std::net::IpAddr) = match ip {
        Ip::V4(s, d) => (s.into(), d.into()),
        Ip::V6(s, d) => (s.into(), d.into()),
    };
    let word = |i: usize| u32::from_be_bytes([l4[i], l4[i + 1], l4[i + 2], l4[i + 3]]);
    Some(Segment {
        src: std::net::SocketAddr::new(s, u16::from_be_bytes([l4[0], l4[1]])),
        dst: std::net::SocketAddr::new(d, u16::from_be_bytes([l4[2], l4[3]])),
        seq: word(4),
        ack: word(8),
        flags: l4[13],
    })
}

/// Whether the TCP checksum of a segment (starting at its IP header) is valid.
pub fn tcp_checksum_ok(ip_packet: &[u8]) -> bool {
    let (l4, ip) = split_l4(ip_packet);
    fold(sum16(pseudo(ip, 6, l4.len()), l4)) == 0
}

pub fn ipv4_header_ok(h: &[u8]) -> bool {
    fold(sum16(0, &h[..20])) == 0
}

/// Zeroes the MSS value and TCP checksum, to compare packets apart from the clamp.
pub fn blank_mss_and_csum(ip_packet: &mut [u8]) {
    let hl = if ip_packet[0] >> 4 == 4 { usize::from(ip_packet[0] & 0xf) * 4 } else { 40 };
    ip_packet[hl + 16] = 0;
    ip_packet[hl + 17] = 0;
    if ip_packet[hl + 20] == 2 {
        ip_packet[hl + 22] = 0;
        ip_packet[hl + 23] = 0;
    }
}

/// `inner` (an Ethernet frame) tunnelled IP-in-IP from `s` to `d`.
pub fn encap4(s: Ipv4Addr, d: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
    let mut p = eth(0x0800);
    p.extend(ipv4_header(s, d, 4, inner.len() - 14, 0x4000, false));
    p.extend_from_slice(&inner[14..]);
    p
}

/// `frame` addressed to another host's MAC address, as a switch floods it to every port.
#[must_use]
pub fn for_another_host(frame: &[u8]) -> Vec<u8> {
    let mut f = frame.to_vec();
    f[..6].copy_from_slice(&MAC_B);
    f
}

/// `inner` tunnelled IPv6-in-IPv6 from `s` to `d`.
pub fn encap6(s: Ipv6Addr, d: Ipv6Addr, inner: &[u8]) -> Vec<u8> {
    let mut p = eth(0x86dd);
    p.extend(ipv6_header(s, d, 41, inner.len() - 14));
    p.extend_from_slice(&inner[14..]);
    p
}

/// ICMP "fragmentation needed" from `s` to `d` quoting `quoted` (an IP packet).
pub fn icmp4_frag_needed(s: Ipv4Addr, d: Ipv4Addr, quoted: &[u8], mtu: u16) -> Vec<u8> {
    let q = &quoted[..quoted.len().min(20 + 8)];
    let mut icmp = vec![3, 4, 0, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(q);
    let c = fold(sum16(0, &icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut p = eth(0x0800);
    p.extend(ipv4_header(s, d, 1, icmp.len(), 0, false));
    p.extend(icmp);
    p
}

pub fn icmp4_echo(s: Ipv4Addr, d: Ipv4Addr) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0, 1, 0, 1, 1, 2, 3, 4];
    let c = fold(sum16(0, &icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut p = eth(0x0800);
    p.extend(ipv4_header(s, d, 1, icmp.len(), 0, false));
    p.extend(icmp);
    p
}

/// `ICMPv6` "packet too big" from `s` to `d` quoting `quoted`.
pub fn icmp6_too_big(s: Ipv6Addr, d: Ipv6Addr, quoted: &[u8], mtu: u32) -> Vec<u8> {
    let mut icmp = vec![2, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(quoted);
    let c = fold(sum16(pseudo(Ip::V6(s, d), 58, icmp.len()), &icmp));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut p = eth(0x86dd);
    p.extend(ipv6_header(s, d, 58, icmp.len()));
    p.extend(icmp);
    p
}
