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
