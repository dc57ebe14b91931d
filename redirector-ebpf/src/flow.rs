//! Looking a packet's flow up among this namespace's sockets: whether it lives here (for the
//! classifier and the XDP fast path alike).

use core::{mem, ptr};

use aya_ebpf::{
    bindings::{BPF_F_CURRENT_NETNS, bpf_sock, bpf_sock_tuple},
    helpers::generated::{bpf_sk_release, bpf_skc_lookup_tcp, bpf_tcp_check_syncookie},
};
use redirector_common::decide::{self, Found, TCP_ACK, TCP_RST, TCP_SYN};

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
    // SAFETY: an all-zero tuple is valid; fields read within bounds checked by ptr_at.
    let mut tuple: bpf_sock_tuple = unsafe { mem::zeroed() };
    unsafe {
        tuple.__bindgen_anon_1.ipv4.saddr = u32::from_ne_bytes((*ip).src);
        tuple.__bindgen_anon_1.ipv4.daddr = u32::from_ne_bytes((*ip).dst);
        tuple.__bindgen_anon_1.ipv4.sport = u16::from_ne_bytes((*tcp).sport);
        tuple.__bindgen_anon_1.ipv4.dport = u16::from_ne_bytes((*tcp).dport);
    }
    // SAFETY: as above.
    let flags = unsafe { (*tcp).flags };
    Ok(lookup_flow(ctx, &mut tuple, 12, Some((ip.cast(), IP4_LEN as u32, tcp, flags))))
}

/// [`lookup_packet_v4`] for IPv6.
#[inline(always)]
pub fn lookup_packet_v6<P: Packet>(ctx: &P) -> Result<Found, Error> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, ETH_LEN)?;
    let tcp: *const TcpHdr = ptr_at(ctx, ETH_LEN + IP6_LEN)?;
    // SAFETY: as in lookup_packet_v4.
    let mut tuple: bpf_sock_tuple = unsafe { mem::zeroed() };
    unsafe {
        tuple.__bindgen_anon_1.ipv6.saddr = words(&(*ip).src);
        tuple.__bindgen_anon_1.ipv6.daddr = words(&(*ip).dst);
        tuple.__bindgen_anon_1.ipv6.sport = u16::from_ne_bytes((*tcp).sport);
        tuple.__bindgen_anon_1.ipv6.dport = u16::from_ne_bytes((*tcp).dport);
    }
    // SAFETY: as above.
    let flags = unsafe { (*tcp).flags };
    Ok(lookup_flow(ctx, &mut tuple, 36, Some((ip.cast(), IP6_LEN as u32, tcp, flags))))
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
