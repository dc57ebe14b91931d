//! Decapsulation on the target: tunnelled packets from configured siblings, for services
//! adopted here, lose their outer header; every other tunnelled packet is dropped.

use core::mem;

use aya_ebpf::{
    bindings::{__sk_buff, BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_DECAP_L3_IPV6, BPF_F_ADJ_ROOM_FIXED_GSO, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC},
    macros::map,
    maps::HashMap,
    programs::TcContext,
};
use redirector_common::{
    Addr, Counter, MAX_SIBLINGS, ServiceKey, SiblingValue, as_v4,
    decide::{TCP_ACK, TCP_RST, TCP_SYN, never_a_client},
};

use crate::{
    addr::mapped_v4,
    adopted::is_adopted,
    counters::count_extra,
    frozen,
    hdr::{self, ETH_LEN, IP4_LEN, IP6_LEN, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IcmpHdr, Ipv4Hdr, Ipv6Hdr, TcpHdr},
    packet::{ptr_at, subprogram_ctx},
    services::{service_at_v4, service_at_v6},
    verdict::{Error, Verdict, drop, pass},
};

/// `PACKET_OTHERHOST` (`linux/if_packet.h`): a frame for another host's MAC address.
const PACKET_OTHERHOST: u32 = 3;

/// The configured siblings: the only outer sources whose tunnelled packets are accepted.
#[map]
static SIBLINGS: HashMap<Addr, SiblingValue> = HashMap::pinned(MAX_SIBLINGS, 0);

/// Strips the outer header of a tunnelled packet (IP-in-IP, or IPv6-in-IPv6 when `v6`) from
/// a configured sibling whose inner packet is for a service adopted here; drops the rest.
#[inline(never)]
pub fn decap<const V6: bool>(skb: *mut __sk_buff) -> Result<Verdict, Error> {
    let ctx = &subprogram_ctx(skb);
    let v6 = V6;
    let (outer_src, outer_dst, outer_len, flags) = if v6 {
        let ip: *const Ipv6Hdr = ptr_at(ctx, ETH_LEN)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe { ((*ip).src, (*ip).dst, IP6_LEN, BPF_F_ADJ_ROOM_DECAP_L3_IPV6) }
    } else {
        let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_LEN)?;
        // SAFETY: bounds checked by ptr_at.
        let (vihl, frag, src, dst) = unsafe { ((*ip).vihl, (*ip).frag, (*ip).src, (*ip).dst) };
        if vihl != 0x45 || hdr::is_fragment(frag) {
            return Err(Error::BadTunnel);
        }
        (mapped_v4(src), mapped_v4(dst), IP4_LEN, BPF_F_ADJ_ROOM_DECAP_L3_IPV4)
    };
    if SIBLINGS.get_ptr(outer_src).is_none() {
        // A switch floods frames whose destination it has not learnt (a volunteer that just
        // went down) to every port: another host's tunnel is the stack's to drop, not a bad
        // one to count and report. (A sibling's is decapsulated as ever: on a lower device of
        // a bridge or macvlan, this node's own frames arrive for another address too.)
        // SAFETY: the context of a classifier program is a valid `__sk_buff`.
        if unsafe { (*skb).pkt_type } == PACKET_OTHERHOST {
            return Ok(pass(Counter::Passed));
        }
        return Err(Error::BadTunnel);
    }
    let (key, client) = if v6 { inner_target_v6(ctx, ETH_LEN + IP6_LEN)? } else { inner_target_v4(ctx, ETH_LEN + IP4_LEN)? };
    if !is_adopted(key) {
        return Err(Error::NotAdopted);
    }
    if let Some((src, tcp_flags)) = client
        && forged_client(&src, tcp_flags, &key, &outer_src, &outer_dst)
    {
        // Past `COUNTERS`: counted here (see `counters::count_extra`).
        count_extra(Counter::DroppedSpoofed);
        return Err(Error::Spoofed);
    }
    // A connection going back to its origin, frozen here too (`frozen`).
    if client.is_some() && frozen::any() && if v6 { frozen::frozen_v6_at(skb, ETH_LEN + outer_len) } else { frozen::frozen_v4_at(skb, ETH_LEN + outer_len) } {
        count_extra(Counter::DroppedFrozen);
        return Ok(drop(Counter::DroppedFrozen));
    }
    ctx.adjust_room(-(outer_len as i32), BPF_ADJ_ROOM_MAC, u64::from(BPF_F_ADJ_ROOM_FIXED_GSO | flags)).map_err(|_| Error::BadTunnel)?;
    Ok(pass(Counter::Decapsulated))
}

/// Whether `src`, the source of a tunnelled TCP segment (with `tcp_flags`) for adopted service
/// `key` that sibling `outer_src` sent to this node's address `outer_dst`, is not a client's:
/// loopback or unspecified, a sibling's control address, this node's own (the tunnel's
/// destination, the adopted address itself, another adopted address or a service of this node
/// on that port). Decapsulated, such a segment would look like one of this node's own or its
/// siblings' connections (the uplink accepts local sources for adopted services:
/// `accept_local`). The one exception is the sending sibling's readiness probe (a SYN, then a
/// reset, from its own address): it can never become a connection, whose SYN-ACK would go to
/// that sibling.
#[inline(never)]
fn forged_client(src: &Addr, tcp_flags: u8, key: &ServiceKey, outer_src: &Addr, outer_dst: &Addr) -> bool {
    if src == outer_src {
        let probe = tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN || tcp_flags & TCP_RST != 0;
        return !probe;
    }
    if never_a_client(src) || src == outer_dst || *src == key.addr || SIBLINGS.get_ptr(*src).is_some() {
        return true;
    }
    if is_adopted(ServiceKey { addr: *src, port: key.port, _pad: [0; 2] }) {
        return true;
    }
    match as_v4(src) {
        Some(v4) => service_at_v4(u32::from_ne_bytes(v4), v4, key.port).is_some(),
        None => service_at_v6(src, key.port).is_some(),
    }
}

/// The adopted service a tunnelled IPv4 packet at `off` is for: the destination and TCP port
/// of a steered segment or probe, or of the flow quoted by a relayed ICMP error; and, for a
/// segment, its source (the client; a relayed error's source is whoever sent it).
#[inline(always)]
fn inner_target_v4(ctx: &TcContext, off: usize) -> Result<(ServiceKey, Option<(Addr, u8)>), Error> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, off).map_err(|_| Error::BadTunnel)?;
    // SAFETY: bounds checked by ptr_at.
    let h = unsafe { *ip };
    if h.vihl != 0x45 || h.is_fragment() {
        return Err(Error::BadTunnel);
    }
    let l4 = off + IP4_LEN;
    let (port, client) = match h.proto {
        IPPROTO_TCP => (quoted_port(ctx, l4 + 2)?, Some((mapped_v4(h.src), tcp_flags(ctx, l4)?))),
        IPPROTO_ICMP => {
            let q: *const Ipv4Hdr = ptr_at(ctx, l4 + mem::size_of::<IcmpHdr>()).map_err(|_| Error::BadTunnel)?;
            // SAFETY: bounds checked by ptr_at.
            if unsafe { (*q).vihl } != 0x45 {
                return Err(Error::NotAdopted);
            }
            (quoted_port(ctx, l4 + mem::size_of::<IcmpHdr>() + IP4_LEN)?, None)
        }
        _ => return Err(Error::NotAdopted),
    };
    Ok((ServiceKey { addr: mapped_v4(h.dst), port, _pad: [0; 2] }, client))
}

/// [`inner_target_v4`] for IPv6.
#[inline(always)]
fn inner_target_v6(ctx: &TcContext, off: usize) -> Result<(ServiceKey, Option<(Addr, u8)>), Error> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, off).map_err(|_| Error::BadTunnel)?;
    // SAFETY: bounds checked by ptr_at.
    let h = unsafe { *ip };
    if h.vtc >> 4 != 6 {
        return Err(Error::BadTunnel);
    }
    let l4 = off + IP6_LEN;
    let (port, client) = match h.next {
        IPPROTO_TCP => (quoted_port(ctx, l4 + 2)?, Some((h.src, tcp_flags(ctx, l4)?))),
        IPPROTO_ICMPV6 => (quoted_port(ctx, l4 + mem::size_of::<IcmpHdr>() + IP6_LEN)?, None),
        _ => return Err(Error::NotAdopted),
    };
    Ok((ServiceKey { addr: h.dst, port, _pad: [0; 2] }, client))
}

/// The flags of the TCP header at `off`.
#[inline(always)]
fn tcp_flags(ctx: &TcContext, off: usize) -> Result<u8, Error> {
    let t: *const TcpHdr = ptr_at(ctx, off).map_err(|_| Error::BadTunnel)?;
    // SAFETY: bounds checked by ptr_at.
    Ok(unsafe { (*t).flags })
}

#[inline(always)]
fn quoted_port(ctx: &TcContext, off: usize) -> Result<[u8; 2], Error> {
    let p: *const [u8; 2] = ptr_at(ctx, off).map_err(|_| Error::BadTunnel)?;
    // SAFETY: bounds checked by ptr_at.
    Ok(unsafe { *p })
}
