//! Packet headers as plain byte structs (no alignment requirements, network order fields).

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub proto: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub csum: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

impl Ipv4Hdr {
    /// More-fragments set or a non-zero fragment offset.
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        is_fragment(self.frag)
    }
}

/// Whether the flags-and-offset field of an IPv4 header says fragment: more-fragments set or a
/// non-zero offset (for code that reads the field alone, not the whole header).
#[inline(always)]
pub fn is_fragment(frag: [u8; 2]) -> bool {
    (frag[0] & 0x3f) != 0 || frag[1] != 0
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    pub vtc: u8,
    pub tc_flow: [u8; 3],
    pub payload_len: [u8; 2],
    pub next: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct TcpHdr {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub seq: [u8; 4],
    pub ack: [u8; 4],
    pub doff_res: u8,
    pub flags: u8,
    pub window: [u8; 2],
    pub csum: [u8; 2],
    pub urg: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct IcmpHdr {
    pub ty: u8,
    pub code: u8,
    pub csum: [u8; 2],
    pub rest: [u8; 4],
}

/// Header lengths (without options).
pub const ETH_LEN: usize = core::mem::size_of::<EthHdr>();
pub const IP4_LEN: usize = core::mem::size_of::<Ipv4Hdr>();
pub const IP6_LEN: usize = core::mem::size_of::<Ipv6Hdr>();
pub const TCP_LEN: usize = core::mem::size_of::<TcpHdr>();
/// Offset of the TCP checksum in its header.
pub const TCP_CSUM_OFF: usize = 16;

/// EtherTypes.
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;

/// IP protocol numbers (and IPv6 extension headers).
pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_ESP: u8 = 50;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_DSTOPTS: u8 = 60;

/// Address families as socket contexts report them.
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;
