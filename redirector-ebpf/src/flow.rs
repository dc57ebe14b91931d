//! Looking a packet's flow up among this namespace's sockets: whether it lives here (for the
//! classifier and the XDP fast path alike).

use core::ptr;

use aya_ebpf::{
    bindings::{
        BPF_F_CURRENT_NETNS, bpf_sock, bpf_sock_tuple, bpf_sock_tuple__bindgen_ty_1 as TupleAddrs, bpf_sock_tuple__bindgen_ty_1__bindgen_ty_1 as Tuple4,
        bpf_sock_tuple__bindgen_ty_1__bindgen_ty_2 as Tuple6,
    },
    helpers::generated::{bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_check_syncookie},
};
use redirector_common::{
    Addr,
    decide::{self, Found, TCP_ACK, TCP_RST, TCP_SYN},
};

use crate::{
    addr::words,
    hdr::{ETH_LEN, IP4_LEN, IP6_LEN, Ipv4Hdr, Ipv6Hdr, TCP_LEN, TcpHdr},
    packet::{Packet, ptr_at},
    verdict::Error,
};

/// Looks up this IPv4 packet's own flow (checking a listener match for a SYN-cookie ACK).
#[inline(always)]
pub fn lookup_packet_v4<P: Packet>(ctx: &P) -> Result<Found, Error> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
    let tcp: *const TcpHdr = ptr_at(ctx, ETH_LEN + IP4_LEN)?;
    // SAFETY: fields read within bounds checked by ptr_at.
    let (mut tuple, flags) = unsafe { (tuple_v4((*ip).src, (*ip).dst, (*tcp).sport, (*tcp).dport), (*tcp).flags) };
    Ok(lookup_flow(ctx, &mut tuple, TUPLE4_LEN, Some((ip.cast(), IP4_LEN as u32, tcp, flags))))
}

/// [`lookup_packet_v4`] for IPv6.
#[inline(always)]
pub fn lookup_packet_v6<P: Packet>(ctx: &P) -> Result<Found, Error> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, ETH_LEN)?;
    let tcp: *const TcpHdr = ptr_at(ctx, ETH_LEN + IP6_LEN)?;
    // SAFETY: as in lookup_packet_v4.
    let (mut tuple, flags) = unsafe { (tuple_v6(&(*ip).src, &(*ip).dst, (*tcp).sport, (*tcp).dport), (*tcp).flags) };
    Ok(lookup_flow(ctx, &mut tuple, TUPLE6_LEN, Some((ip.cast(), IP6_LEN as u32, tcp, flags))))
}

/// The bytes of a socket tuple the lookup reads for each family.
pub const TUPLE4_LEN: u32 = size_of::<Tuple4>() as u32;
pub const TUPLE6_LEN: u32 = size_of::<Tuple6>() as u32;

/// The socket tuple of an IPv4 flow (network-order fields as they are in the packet). Only its
/// first [`TUPLE4_LEN`] bytes are written, which is all the lookup reads: zeroing the whole
/// union first compiles to a call of `memset`, a loop storing one byte per turn, on every
/// looked-up packet.
#[inline(always)]
pub fn tuple_v4(saddr: [u8; 4], daddr: [u8; 4], sport: [u8; 2], dport: [u8; 2]) -> bpf_sock_tuple {
    let ipv4 = Tuple4 { saddr: u32::from_ne_bytes(saddr), daddr: u32::from_ne_bytes(daddr), sport: u16::from_ne_bytes(sport), dport: u16::from_ne_bytes(dport) };
    bpf_sock_tuple { __bindgen_anon_1: TupleAddrs { ipv4 } }
}

/// [`tuple_v4`] for IPv6 (every byte written).
#[inline(always)]
pub fn tuple_v6(saddr: &Addr, daddr: &Addr, sport: [u8; 2], dport: [u8; 2]) -> bpf_sock_tuple {
    let ipv6 = Tuple6 { saddr: words(saddr), daddr: words(daddr), sport: u16::from_ne_bytes(sport), dport: u16::from_ne_bytes(dport) };
    bpf_sock_tuple { __bindgen_anon_1: TupleAddrs { ipv6 } }
}

/// Looks the flow up among this namespace's sockets. With `cookie`, a listener match is
/// checked for a SYN-cookie ACK of this host's own handshake. Every reference is released.
#[inline(always)]
pub fn lookup_flow<P: Packet>(ctx: &P, tuple: &mut bpf_sock_tuple, tuple_len: u32, cookie: Option<(*const u8, u32, *const TcpHdr, u8)>) -> Found {
    // SAFETY: tuple is a valid stack object of tuple_len bytes; the returned reference is
    // released on every path below.
    let sk: *mut bpf_sock = unsafe { bpf_skc_lookup_tcp(ctx.as_ptr(), ptr::from_mut(tuple), tuple_len, BPF_F_CURRENT_NETNS as u64, 0) };
    if sk.is_null() {
        return Found::Nothing;
    }
    // SAFETY: sk is a valid socket reference.
    let state = unsafe { (*sk).state };
    let found = decide::found_socket(state, || match cookie {
        Some((iph, iph_len, th, flags)) if flags & (TCP_SYN | TCP_RST | TCP_ACK) == TCP_ACK => {
            // SAFETY: iph and th point into the packet, bounds checked by the caller; sk is
            // the listener the lookup returned, still referenced.
            unsafe { bpf_tcp_check_syncookie(sk.cast(), iph as *mut _, iph_len, th as *mut _, TCP_LEN as u32) == 0 }
        }
        _ => false,
    });
    // SAFETY: releasing the reference taken above.
    unsafe { bpf_sk_release(sk.cast()) };
    found
}
